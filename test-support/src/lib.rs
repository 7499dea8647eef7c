//! Test support: real servers on free loopback ports, killed on drop, and waits with a
//! deadline instead of sleeps.
//!
//! A missing server binary is a loud failure that names the package to install, never a
//! skipped test.
#![forbid(unsafe_code)]

pub mod browser;
pub mod certs;
mod etcd;
pub mod fake_bot_connector;
pub mod oidc;
pub mod prosody;
mod proxy;
pub mod sipp;
pub mod stunnel;
pub mod xmpp_client;

pub use etcd::EtcdServer;
pub use proxy::{FaultProxy, ProxyMode};

use anyhow::{Context, Result, bail};
use std::future::Future;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 (bound, then released for the server to take). Never the
/// same port twice in one process: the kernel may hand a just-released port out again, and
/// two servers of one test (etcd's client and peer ports, a node's listeners) must differ.
pub fn free_port() -> Result<u16> {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    for _ in 0..64 {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut given = GIVEN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !given.contains(&port) {
            given.push(port);
            return Ok(port);
        }
    }
    bail!("no fresh free port on 127.0.0.1")
}

/// A port free on 127.0.0.1 over both UDP and TCP (a SIP listener takes both), never the
/// same twice in one process.
pub fn free_udp_tcp_port() -> Result<u16> {
    for _ in 0..64 {
        let port = free_port()?;
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no port free over both UDP and TCP on 127.0.0.1")
}

/// Polls `cond` until it returns `Some`, or fails after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut cond: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Finds a server binary on PATH (and in /usr/sbin, /usr/bin, where Debian puts them).
pub fn find_binary(name: &str, package: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.push("/usr/sbin".into());
    dirs.push("/usr/bin".into());
    for d in dirs {
        let p = d.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "`{name}` not found: install it with `apt-get install -y {package}` (or run the README's test command, which does)"
    )
}

pub(crate) fn wait_port(addr: SocketAddr, child: &mut Child, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("server exited with {status} before listening on {addr}");
        }
        if Instant::now() >= deadline {
            bail!("server did not listen on {addr} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A server's TLS: its certificate and key, and the CA whose client certificates it
/// requires (when `require_client_cert`).
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub require_client_cert: bool,
}

/// A `redis-server` of its own, on a free port, with its data in a temporary directory.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    appendonly: bool,
    tls: Option<ServerTls>,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts a server with persistence off.
    pub fn start() -> Result<Self> {
        Self::start_with(false)
    }

    /// Starts a server; with `appendonly`, every write is in the AOF (fsync always) so a
    /// restart keeps everything acknowledged.
    pub fn start_with(appendonly: bool) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut s = Self {
            child: None,
            port: free_port()?,
            appendonly,
            tls: None,
            dir,
        };
        s.spawn()?;
        Ok(s)
    }

    /// Starts a server that speaks only TLS (`rediss://`), persistence off.
    pub fn start_tls(tls: ServerTls) -> Result<Self> {
        let mut s = Self {
            child: None,
            port: free_port()?,
            appendonly: false,
            tls: Some(tls),
            dir: tempfile::tempdir()?,
        };
        s.spawn()?;
        Ok(s)
    }

    fn spawn(&mut self) -> Result<()> {
        let bin = find_binary("redis-server", "redis-server")?;
        let mut cmd = Command::new(bin);
        match &self.tls {
            None => {
                cmd.arg("--port").arg(self.port.to_string());
            }
            Some(t) => {
                cmd.args(["--port", "0", "--tls-port"])
                    .arg(self.port.to_string())
                    .arg("--tls-cert-file")
                    .arg(&t.cert)
                    .arg("--tls-key-file")
                    .arg(&t.key)
                    .arg("--tls-ca-cert-file")
                    .arg(&t.ca)
                    .arg("--tls-auth-clients")
                    .arg(if t.require_client_cert { "yes" } else { "no" });
            }
        }
        cmd.arg("--bind")
            .arg("127.0.0.1")
            .arg("--save")
            .arg("")
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if self.appendonly {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        let mut child = cmd.spawn().context("starting redis-server")?;
        wait_port(
            SocketAddr::from(([127, 0, 0, 1], self.port)),
            &mut child,
            Duration::from_secs(10),
        )?;
        self.child = Some(child);
        Ok(())
    }

    /// `redis://127.0.0.1:<port>`, or `rediss://…` for a TLS server.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id while it runs (for its CPU time in `/proc/<pid>/stat`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the server with SIGKILL (no shutdown save) and waits for it to go.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// Starts the server again on the same port and directory.
    pub fn restart(&mut self) -> Result<()> {
        self.kill()?;
        self.spawn()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// Path of a binary built by this workspace (`relay-node`, `relay-loadtest`), in the test
/// (or bench) executable's profile directory: `target/<profile>/deps/<test>-<hash>` →
/// `target/<profile>/<name>` (`cargo bench` builds benches and the binaries they need into
/// `target/release`, `cargo test` into `target/debug`).
pub fn workspace_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test executable has no profile directory")?;
    let p = profile_dir.join(name);
    if p.is_file() {
        Ok(p)
    } else if profile_dir.file_name().is_some_and(|d| d == "release") {
        bail!(
            "{} not built: run `cargo build --release --workspace` first (`cargo bench` does)",
            p.display()
        )
    } else {
        bail!(
            "{} not built: run `cargo build --workspace --all-targets` first (the README's test command does)",
            p.display()
        )
    }
}

/// A `relay-node` process of its own, on free ports, with its output captured to files.
pub struct RelayNode {
    child: Option<Child>,
    pub http_port: u16,
    pub admin_port: u16,
    /// Substituted for `{GRPC_PORT}` in the config (the node's gRPC listener).
    pub grpc_port: u16,
    /// Substituted for `{PROXY_PORT}` in the config: free for a [`FaultProxy`] in front of
    /// the node's gRPC port (advertise it as the node's gRPC address).
    pub proxy_port: u16,
    /// Substituted for `{SIP_PORT}`: free over both UDP and TCP (the SIP edge's listeners).
    pub sip_port: u16,
    /// Substituted for `{API_PORT}`: the management API's listener.
    pub api_port: u16,
    dir: tempfile::TempDir,
}

impl RelayNode {
    /// Starts `relay-node --config` with `config` (TOML). The strings `{HTTP_PORT}`,
    /// `{ADMIN_PORT}`, `{GRPC_PORT}`, `{PROXY_PORT}`, `{SIP_PORT}` and `{API_PORT}` in it are replaced by free ports
    /// (kept in the fields of the same names). Waits until `/readyz` answers 200.
    pub fn start(config: &str) -> Result<Self> {
        Self::start_with_env(config, &[])
    }

    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Result<Self> {
        // A free port can be taken by someone else between choosing and binding it: try
        // again on fresh ports when the node could not bind.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::try_start(config, env) {
                Err(e) if attempt < 3 && format!("{e:#}").contains("Address already in use") => {}
                r => return r,
            }
        }
    }

    /// A node not started yet, with fresh ports and a directory of its own.
    fn unstarted() -> Result<Self> {
        Ok(Self {
            child: None,
            http_port: free_port()?,
            admin_port: free_port()?,
            grpc_port: free_port()?,
            proxy_port: free_port()?,
            sip_port: free_udp_tcp_port()?,
            api_port: free_port()?,
            dir: tempfile::tempdir()?,
        })
    }

    fn try_start(config: &str, env: &[(&str, &str)]) -> Result<Self> {
        let mut node = Self::unstarted()?;
        let text = config
            .replace("{HTTP_PORT}", &node.http_port.to_string())
            .replace("{ADMIN_PORT}", &node.admin_port.to_string())
            .replace("{GRPC_PORT}", &node.grpc_port.to_string())
            .replace("{PROXY_PORT}", &node.proxy_port.to_string())
            .replace("{SIP_PORT}", &node.sip_port.to_string())
            .replace("{API_PORT}", &node.api_port.to_string());
        std::fs::write(node.config_path(), text)?;
        node.spawn(false, env)?;
        Ok(node)
    }

    /// Starts `relay-node --dev` (the embedded default), moved to free ports.
    pub fn start_dev() -> Result<Self> {
        let mut node = Self::unstarted()?;
        let http = format!("127.0.0.1:{}", node.http_port);
        let admin = format!("127.0.0.1:{}", node.admin_port);
        let api = format!("127.0.0.1:{}", node.api_port);
        node.spawn(
            true,
            &[
                ("FEDRELAY_HTTP__LISTEN", http.as_str()),
                ("FEDRELAY_ADMIN__LISTEN", admin.as_str()),
                ("FEDRELAY_API__LISTEN", api.as_str()),
            ],
        )?;
        Ok(node)
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("relay.toml")
    }

    /// Everything the process wrote to stdout and stderr so far.
    pub fn output(&self) -> Result<String> {
        let mut s = std::fs::read_to_string(self.dir.path().join("stdout.log"))?;
        s.push_str(&std::fs::read_to_string(
            self.dir.path().join("stderr.log"),
        )?);
        Ok(s)
    }

    fn spawn(&mut self, dev: bool, env: &[(&str, &str)]) -> Result<()> {
        let bin = workspace_binary("relay-node")?;
        let stdout = std::fs::File::create(self.dir.path().join("stdout.log"))?;
        let stderr = std::fs::File::create(self.dir.path().join("stderr.log"))?;
        let mut cmd = Command::new(bin);
        if dev {
            cmd.arg("--dev");
        } else {
            cmd.arg("--config").arg(self.config_path());
        }
        cmd.env_remove("RUST_LOG").stdout(stdout).stderr(stderr);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().context("starting relay-node")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "relay-node exited with {status}: {}",
                    self.output().unwrap_or_default()
                );
            }
            if http_get_status(self.admin_port, "/readyz") == Some(200) {
                break;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                bail!(
                    "relay-node not ready within 20s: {}",
                    self.output().unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }

    /// The management API over plain HTTP (a config listening on `{API_PORT}`).
    pub fn api_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    /// Whether the process was started and has not been stopped by this handle.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the process with SIGKILL (no draining, nothing flushed) and waits for it.
    pub fn kill9(&mut self) -> Result<std::process::ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("relay-node is not running");
        };
        child.kill()?;
        Ok(child.wait()?)
    }

    /// Freezes the process (SIGSTOP): it keeps its sockets but answers nothing.
    pub fn sigstop(&self) -> Result<()> {
        self.signal("STOP")
    }

    /// Resumes a process frozen by [`sigstop`](Self::sigstop) (SIGCONT).
    pub fn sigcont(&self) -> Result<()> {
        self.signal("CONT")
    }

    fn signal(&self, name: &str) -> Result<()> {
        let Some(child) = self.child.as_ref() else {
            bail!("relay-node is not running");
        };
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(child.id().to_string())
            .status()?;
        if !status.success() {
            bail!("kill -{name} failed");
        }
        Ok(())
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("relay-node is not running");
        };
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()?;
        if !status.success() {
            bail!("kill -TERM failed");
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                bail!("relay-node did not exit within {timeout:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for RelayNode {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The status and body of a plain `GET` on 127.0.0.1 (`Connection: close`, read to the end
/// within 2 s), or `None` when nothing answers. A chunked body is returned as sent.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// The status of a plain `GET` on 127.0.0.1, or `None` when nothing answers.
pub fn http_get_status(port: u16, path: &str) -> Option<u16> {
    http_get(port, path).map(|(status, _)| status)
}
