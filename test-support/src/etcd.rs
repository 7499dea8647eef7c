//! A real single-member `etcd` (Debian's `etcd-server`, 3.4) on free loopback ports.

use crate::{ServerTls, find_binary, free_port, http_get, wait_port};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a start (or a restart on the kept data directory) may take to become healthy.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// An `etcd` of its own: one member named `t`, client and peer URLs on free ports of
/// 127.0.0.1, its data in a temporary directory that outlives [`EtcdServer::stop`].
/// Dropping it kills the process and removes the directory.
pub struct EtcdServer {
    child: Option<Child>,
    client_port: u16,
    peer_port: u16,
    /// With TLS, clients speak HTTPS (and present a certificate when it is required).
    tls: Option<ServerTls>,
    dir: tempfile::TempDir,
}

impl EtcdServer {
    /// Starts etcd and waits until `GET /health` says `{"health":"true"}`. Fails naming
    /// `apt-get install etcd-server` when the binary is missing.
    pub fn start() -> Result<Self> {
        Self::start_with(None)
    }

    /// Starts etcd whose client URL is `https://` with `tls`'s certificate (and, when it says
    /// so, `--client-cert-auth` against its CA). Waits until the client port listens.
    pub fn start_tls(tls: ServerTls) -> Result<Self> {
        Self::start_with(Some(tls))
    }

    fn start_with(tls: Option<ServerTls>) -> Result<Self> {
        // A port chosen free may be taken by another process before etcd binds it: try
        // again on fresh ports then.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut s = Self {
                child: None,
                client_port: free_port()?,
                peer_port: free_port()?,
                tls: tls.clone(),
                dir: tempfile::tempdir()?,
            };
            match s.spawn() {
                Ok(()) => return Ok(s),
                Err(e) if attempt < 3 && format!("{e:#}").contains("address already in use") => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The client URL, `http://127.0.0.1:<port>` (`https://` with TLS), for `etcd_endpoints`.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    pub fn peer_port(&self) -> u16 {
        self.peer_port
    }

    /// The data directory (kept across [`stop`](Self::stop) / [`start_again`](Self::start_again)).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Everything etcd logged so far (all of its runs).
    pub fn output(&self) -> Result<String> {
        Ok(std::fs::read_to_string(self.log_path())?)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// Kills etcd (SIGKILL) and waits for it to go; the data directory stays.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// Starts etcd again on the same ports and data directory and waits until it is healthy.
    pub fn start_again(&mut self) -> Result<()> {
        self.stop()?;
        self.spawn()
    }

    fn spawn(&mut self) -> Result<()> {
        let bin = find_binary("etcd", "etcd-server")?;
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut cmd = Command::new(bin);
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&t.cert)
                .arg("--key-file")
                .arg(&t.key)
                .arg("--trusted-ca-file")
                .arg(&t.ca);
            if t.require_client_cert {
                cmd.arg("--client-cert-auth");
            }
        }
        let mut child = cmd
            .arg("--name")
            .arg("t")
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("t={peer}"))
            .env_remove("ETCD_NAME")
            .env_remove("ETCD_DATA_DIR")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting etcd")?;
        let up = match &self.tls {
            None => wait_healthy(self.client_port, &mut child, START_TIMEOUT),
            // `/health` is behind TLS then: its client port listening is what can be seen.
            Some(_) => wait_port(
                std::net::SocketAddr::from(([127, 0, 0, 1], self.client_port)),
                &mut child,
                START_TIMEOUT,
            ),
        };
        match up {
            Ok(()) => {
                self.child = Some(child);
                Ok(())
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e.context(format!(
                    "etcd log:\n{}",
                    tail(&self.log_path(), 4000).unwrap_or_default()
                )))
            }
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn wait_healthy(port: u16, child: &mut Child, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some((200, body)) = http_get(port, "/health")
            && body.replace(' ', "").contains(r#""health":"true""#)
        {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("etcd exited with {status} before it was healthy on port {port}");
        }
        if Instant::now() >= deadline {
            bail!("etcd not healthy on port {port} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn tail(path: &Path, max: usize) -> Result<String> {
    let s = std::fs::read_to_string(path)?;
    let start = s.len().saturating_sub(max);
    let start = (start..s.len())
        .find(|i| s.is_char_boundary(*i))
        .unwrap_or(s.len());
    Ok(s[start..].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::ensure;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    /// A `POST` of a JSON body to etcd's v3 gateway; the answer's body.
    fn post(port: u16, path: &str, body: &str) -> Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        ensure!(out.starts_with("HTTP/1.1 200"), "etcd answered {out}");
        Ok(out)
    }

    #[test]
    fn starts_stops_and_keeps_its_data() -> Result<()> {
        let mut etcd = EtcdServer::start()?;
        let port = etcd.client_port();
        ensure!(etcd.endpoint() == format!("http://127.0.0.1:{port}"));
        // key "k" = "v", base64.
        post(port, "/v3/kv/put", r#"{"key":"aw==","value":"dg=="}"#)?;
        etcd.stop()?;
        ensure!(!etcd.is_running());
        ensure!(http_get(port, "/health").is_none(), "still answering");
        etcd.start_again()?;
        ensure!(etcd.is_running());
        let got = post(port, "/v3/kv/range", r#"{"key":"aw=="}"#)?;
        ensure!(
            got.contains(r#""value":"dg==""#),
            "key lost over a restart: {got}"
        );
        Ok(())
    }
}
