//! stunnel (Debian's `stunnel4`, 5.x) in front of a plain-TCP SIP peer, for SIP over TLS:
//! Debian's sipp has no TLS.
//!
//! - [`StunnelClient`]: sipp connects over TCP to stunnel's port, stunnel connects over TLS
//!   to the server (the relay), presenting a client certificate and checking the server's
//!   against a CA (`verifyChain`) and a name (`checkHost`, sent as SNI too).
//! - [`StunnelServer`]: the relay connects over TLS to stunnel's port, stunnel presents the
//!   certificate of the SIP domain, optionally requires and checks the relay's client
//!   certificate, and forwards to sipp's TCP port.
//!
//! Each runs in the foreground with its configuration, pid file and log in a temporary
//! directory, on a free port of 127.0.0.1, killed on drop.
//!
//! sipp writes its own transport in the messages it builds (`Via: SIP/2.0/TCP`), though the
//! peer beyond stunnel sees TLS.

use crate::sipp::bound;
use crate::{find_binary, free_port};
use anyhow::{Context, Result, bail};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const START_TIMEOUT: Duration = Duration::from_secs(10);

/// stunnel's client side: plain TCP in on its port, TLS out to `connect`.
#[derive(Debug, Clone)]
pub struct StunnelClient {
    /// The TLS server (the relay's SIP TLS listener).
    pub connect: SocketAddr,
    /// The CA the server's certificate must chain to (`CAfile`, `verifyChain = yes`).
    pub ca: PathBuf,
    /// The DNS name the server's certificate must hold (`checkHost`), also sent as SNI.
    pub check_host: Option<String>,
    /// The client certificate (PEM) and its key, presented to the server.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// stunnel's server side: TLS in on its port, plain TCP out to `connect`.
#[derive(Debug, Clone)]
pub struct StunnelServer {
    /// Where the plain TCP goes (sipp's TCP port).
    pub connect: SocketAddr,
    /// The certificate (PEM, naming the SIP domain) and its key.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, a client certificate is required and must chain to this CA
    /// (`requireCert`, `verifyChain`).
    pub client_ca: Option<PathBuf>,
    /// The DNS name the client's certificate must hold (`checkHost`; needs `client_ca`).
    pub client_check_host: Option<String>,
}

/// A running stunnel, killed on drop.
pub struct Stunnel {
    child: Option<Child>,
    port: u16,
    what: String,
    dir: tempfile::TempDir,
}

impl Stunnel {
    /// Starts a client-mode stunnel and returns once its port listens.
    pub fn client(c: StunnelClient) -> Result<Self> {
        let mut section = String::from("client = yes\n");
        let _ = writeln!(section, "connect = {}", c.connect);
        let _ = writeln!(section, "CAfile = {}", c.ca.display());
        section.push_str("verifyChain = yes\n");
        if let Some(host) = &c.check_host {
            let _ = writeln!(section, "checkHost = {host}");
            let _ = writeln!(section, "sni = {host}");
        }
        match (&c.cert, &c.key) {
            (Some(cert), Some(key)) => {
                let _ = writeln!(section, "cert = {}", cert.display());
                let _ = writeln!(section, "key = {}", key.display());
            }
            (None, None) => {}
            _ => bail!("StunnelClient: give both cert and key, or neither"),
        }
        Self::start(&section, &format!("stunnel client to {}", c.connect))
    }

    /// Starts a server-mode stunnel and returns once its port listens.
    pub fn server(s: StunnelServer) -> Result<Self> {
        let mut section = String::new();
        let _ = writeln!(section, "connect = {}", s.connect);
        let _ = writeln!(section, "cert = {}", s.cert.display());
        let _ = writeln!(section, "key = {}", s.key.display());
        match &s.client_ca {
            Some(ca) => {
                let _ = writeln!(section, "CAfile = {}", ca.display());
                section.push_str("requireCert = yes\nverifyChain = yes\n");
                if let Some(host) = &s.client_check_host {
                    let _ = writeln!(section, "checkHost = {host}");
                }
            }
            None if s.client_check_host.is_some() => {
                bail!("StunnelServer: client_check_host needs client_ca")
            }
            None => {}
        }
        Self::start(&section, &format!("stunnel server to {}", s.connect))
    }

    fn start(section: &str, what: &str) -> Result<Self> {
        let bin =
            find_binary("stunnel4", "stunnel4").or_else(|_| find_binary("stunnel", "stunnel4"))?;
        // A free port can be taken by someone else before stunnel binds it: try again on a
        // fresh one then.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut s = Self::spawn(&bin, section, what)?;
            match s.wait_listening() {
                Ok(()) => return Ok(s),
                Err(e) if attempt < 3 && s.output().contains("Address already in use") => {
                    drop(e);
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn spawn(bin: &Path, section: &str, what: &str) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("stunnel-").tempdir()?;
        let d = dir.path();
        let port = free_port()?;
        let conf = format!(
            "; written by test-support (src/stunnel.rs)\n\
             foreground = yes\n\
             pid = {pid}\n\
             output = {log}\n\
             syslog = no\n\
             debug = info\n\
             [sip]\n\
             accept = 127.0.0.1:{port}\n\
             {section}",
            pid = d.join("stunnel.pid").display(),
            log = d.join("stunnel.log").display(),
        );
        std::fs::write(d.join("stunnel.conf"), conf)?;
        let child = Command::new(bin)
            .arg(d.join("stunnel.conf"))
            .current_dir(d)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(d.join("stdout.log"))?)
            .stderr(std::fs::File::create(d.join("stderr.log"))?)
            .spawn()
            .context("starting stunnel")?;
        Ok(Self {
            child: Some(child),
            port,
            what: format!("{what} on 127.0.0.1:{port}"),
            dir,
        })
    }

    /// Waits for the LISTEN socket (read from `/proc/net/tcp`: connecting to probe would
    /// make stunnel open a connection of its own to the far side).
    fn wait_listening(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if bound(false, self.port) {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!(
                    "{} exited with {status} before listening:\n{}",
                    self.what,
                    self.output()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not listen within {START_TIMEOUT:?}:\n{}",
                    self.what,
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The port it accepts on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Its directory: `stunnel.conf`, `stunnel.log`, `stderr.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Its log so far (`debug = info`: connections, TLS handshakes, certificate checks).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stunnel.log")).unwrap_or_default()
    }

    fn output(&self) -> String {
        let stderr =
            std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default();
        format!("{stderr}{}", self.log())
    }
}

impl Drop for Stunnel {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
