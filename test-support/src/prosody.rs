//! A real Prosody (0.12) XMPP server as a test peer: one VirtualHost on free c2s and s2s
//! ports on 127.0.0.1, its own temporary directory, stopped on drop.
//!
//! How it finds the relay's domains ([`Peer`]): through libunbound (Debian's `lua-unbound`,
//! which Prosody needs explicitly), pointed at a hosts file of its own (`127.0.0.1
//! <domain>`) and one `_xmpp-server._tcp.<domain>` SRV record per peer naming its port.
//! lua-unbound's `options` hold at most two such records, and libunbound answers only
//! `.test` names from them, so with three peers or more, or a peer outside `.test`, a small
//! plugin of its own (`mod_test_s2s_routes`) routes those domains to their ports instead,
//! without DNS.

use crate::{find_binary, free_port, wait_for};
use anyhow::{Context, Result, bail};
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How the two servers of an s2s link prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum S2sAuth {
    /// SASL EXTERNAL with certificates (XEP-0178): `s2s_secure_auth = true`, and the peer's
    /// certificate must chain to [`ProsodyConfig::peer_ca`].
    External,
    /// Server dialback (XEP-0220): `mod_dialback`, `s2s_secure_auth = false` and no CA for
    /// peers (Prosody would use EXTERNAL whenever the peer's certificate verifies).
    Dialback,
}

/// A domain served by the relay, reachable on 127.0.0.1:`port`.
#[derive(Debug, Clone)]
pub struct Peer {
    pub domain: String,
    pub port: u16,
}

#[derive(Debug, Clone)]
pub struct ProsodyConfig {
    /// The VirtualHost, e.g. `prosody.test`.
    pub domain: String,
    /// Its certificate (SAN `DNS:<domain>`, e.g. from [`crate::certs::issue_named`]) and key.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA Prosody trusts for s2s (`ssl.cafile`): needed for [`S2sAuth::External`],
    /// ignored for [`S2sAuth::Dialback`].
    pub peer_ca: Option<PathBuf>,
    pub auth: S2sAuth,
    /// How Prosody finds the relay's domains (through DNS records of its own for one or two
    /// `.test` domains, else through its routing plugin; libunbound answers
    /// those from the hosts file and local data alone, at once).
    pub peers: Vec<Peer>,
    /// Extra global Lua lines, appended before the VirtualHost.
    pub extra: String,
}

impl ProsodyConfig {
    /// A config for `domain` with dialback, no peers and nothing extra.
    pub fn new(domain: &str, cert: &Path, key: &Path) -> Self {
        Self {
            domain: domain.to_string(),
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            peer_ca: None,
            auth: S2sAuth::Dialback,
            peers: Vec::new(),
            extra: String::new(),
        }
    }
}

/// A running `prosody`, killed on drop (SIGTERM, then SIGKILL if it lingers).
pub struct Prosody {
    child: Option<Child>,
    domain: String,
    c2s_port: u16,
    s2s_port: u16,
    config_path: PathBuf,
    dir: tempfile::TempDir,
}

/// The log line net.unbound writes once it is set up: without it Prosody fell back to its
/// legacy resolver, which ignores the hosts file and the local data.
const UNBOUND_READY: &str = "Setting up net.server event handling for ub_ctx";

/// The last line Prosody logs on SIGTERM, its streams closed and cleanup done.
const SHUTDOWN_DONE: &str = "Exiting with status code";

/// What Prosody logs when it cannot bind a port (it runs on without it).
const PORT_FAILED: &str = "Failed to open server port";

const STOP_TIMEOUT: Duration = Duration::from_secs(5);

impl Prosody {
    /// Starts Prosody with `cfg` in a fresh temporary directory, on free c2s and s2s ports
    /// of 127.0.0.1, and returns once both accept connections (and, with peers, once its
    /// libunbound resolver is set up).
    pub async fn start(cfg: ProsodyConfig) -> Result<Self> {
        let bin = find_binary("prosody", "prosody lua-unbound")?;
        find_binary("prosodyctl", "prosody lua-unbound")?;
        check_config(&cfg)?;
        // A free port can be taken by someone else between choosing and binding it: Prosody
        // then logs the failure and runs on without that port. Try again on fresh ports.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut p = Self::prepare(&cfg)?;
            match p.spawn(&bin, &cfg).await {
                Ok(()) => return Ok(p),
                Err(e) if attempt < 3 && p.log().contains(PORT_FAILED) => {
                    let _ = p.kill_now();
                    drop(e);
                }
                Err(e) => {
                    let tail = p.log_tail(40);
                    let _ = p.kill_now();
                    if tail.is_empty() {
                        return Err(e);
                    }
                    bail!("{e:#}\nProsody's log ends with:\n{tail}");
                }
            }
        }
    }

    fn prepare(cfg: &ProsodyConfig) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("prosody-").tempdir()?;
        let d = dir.path();
        std::fs::create_dir(d.join("data"))?;
        std::fs::create_dir(d.join("certs"))?;
        std::fs::create_dir(d.join("plugins"))?;
        // certmanager finds `<domain>.crt`/`.key` in `certificates` for every service (c2s,
        // s2s in and out), SNI included.
        std::fs::copy(
            &cfg.cert,
            d.join("certs").join(format!("{}.crt", cfg.domain)),
        )
        .with_context(|| format!("copying {}", cfg.cert.display()))?;
        std::fs::copy(
            &cfg.key,
            d.join("certs").join(format!("{}.key", cfg.domain)),
        )
        .with_context(|| format!("copying {}", cfg.key.display()))?;
        let mut hosts = String::from("127.0.0.1 localhost\n");
        for p in &cfg.peers {
            writeln!(hosts, "127.0.0.1 {}", p.domain)?;
        }
        std::fs::write(d.join("hosts"), hosts)?;
        if uses_route_plugin(cfg) {
            std::fs::write(
                d.join("plugins").join("mod_test_s2s_routes.lua"),
                ROUTES_PLUGIN,
            )?;
        }
        let config_path = d.join("prosody.cfg.lua");
        Ok(Self {
            child: None,
            domain: cfg.domain.clone(),
            c2s_port: free_port()?,
            s2s_port: free_port()?,
            config_path,
            dir,
        })
    }

    async fn spawn(&mut self, bin: &Path, cfg: &ProsodyConfig) -> Result<()> {
        std::fs::write(&self.config_path, self.config_text(cfg))?;
        let out = std::fs::File::create(self.dir.path().join("stdout.log"))?;
        let err = std::fs::File::create(self.dir.path().join("stderr.log"))?;
        let child = Command::new(bin)
            .arg("-F")
            .arg("--config")
            .arg(&self.config_path)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .context("starting prosody")?;
        self.child = Some(child);
        let ports = [self.c2s_port, self.s2s_port];
        wait_for(
            "Prosody to listen on its c2s and s2s ports",
            Duration::from_secs(10),
            || {
                let r = match self.exited() {
                    Some(status) => Some(Err(status)),
                    None => ports
                        .iter()
                        .all(|&p| {
                            TcpStream::connect_timeout(
                                &SocketAddr::from(([127, 0, 0, 1], p)),
                                Duration::from_millis(100),
                            )
                            .is_ok()
                        })
                        .then_some(Ok(())),
                };
                async move { r }
            },
        )
        .await?
        .map_err(|status| {
            let out =
                |f: &str| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
            anyhow::anyhow!(
                "prosody exited with {status} before listening; its output:\n{}{}",
                out("stdout.log"),
                out("stderr.log")
            )
        })?;
        // Someone else may have been listening on a port it could not bind.
        if self.log().contains(PORT_FAILED) {
            bail!("Prosody could not listen on its ports");
        }
        if !cfg.peers.is_empty() {
            wait_for(
                "Prosody's libunbound resolver",
                Duration::from_secs(5),
                || {
                    let r = self.log().contains(UNBOUND_READY).then_some(());
                    async move { r }
                },
            )
            .await
            .context(
                "Prosody is not resolving through libunbound, so it ignores the test's hosts \
                 file and SRV records: install it with `apt-get install -y lua-unbound`",
            )?;
        }
        Ok(())
    }

    /// The exit status, if the process has exited (it is reaped then).
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    fn config_text(&self, cfg: &ProsodyConfig) -> String {
        let d = self.dir.path();
        let q = |p: &Path| lua_str(&p.display().to_string());
        let mut modules = vec![
            "roster",
            "saslauth",
            "tls",
            "disco",
            "ping",
            "smacks",
            "pep",
            "vcard_legacy",
        ];
        if cfg.auth == S2sAuth::Dialback {
            modules.push("dialback");
        }
        if uses_route_plugin(cfg) {
            modules.push("test_s2s_routes");
        }
        let modules: Vec<String> = modules.iter().map(|m| lua_str(m)).collect();
        let mut s = String::new();
        let _ = writeln!(s, "-- written by test-support (src/prosody.rs)");
        let _ = writeln!(s, "run_as_root = true");
        let _ = writeln!(s, "pidfile = {}", q(&d.join("prosody.pid")));
        let _ = writeln!(s, "data_path = {}", q(&d.join("data")));
        let _ = writeln!(s, "plugin_paths = {{ {} }}", q(&d.join("plugins")));
        let _ = writeln!(s, "log = {{ debug = {} }}", q(&d.join("prosody.log")));
        let _ = writeln!(s, "interfaces = {{ \"127.0.0.1\" }}");
        let _ = writeln!(s, "c2s_ports = {{ {} }}", self.c2s_port);
        let _ = writeln!(s, "s2s_ports = {{ {} }}", self.s2s_port);
        let _ = writeln!(s, "use_ipv6 = false");
        let _ = writeln!(s, "modules_enabled = {{ {} }}", modules.join("; "));
        let _ = writeln!(s, "authentication = \"internal_hashed\"");
        let _ = writeln!(s, "allow_registration = false");
        let _ = writeln!(s, "c2s_require_encryption = true");
        let _ = writeln!(s, "s2s_require_encryption = true");
        let _ = writeln!(s, "s2s_timeout = 10");
        let _ = writeln!(s, "smacks_s2s_resend = true");
        let _ = writeln!(s, "certificates = {}", q(&d.join("certs")));
        match (cfg.auth, &cfg.peer_ca) {
            (S2sAuth::External, Some(ca)) => {
                let _ = writeln!(s, "s2s_secure_auth = true");
                let _ = writeln!(s, "ssl = {{ cafile = {} }}", q(ca));
            }
            _ => {
                let _ = writeln!(s, "s2s_secure_auth = false");
            }
        }
        let mut unbound = format!("unbound = {{ hoststxt = {}", q(&d.join("hosts")));
        if !cfg.peers.is_empty() && !uses_route_plugin(cfg) {
            // One `local-data` record a key; libunbound appends the colon to the second.
            let records: Vec<String> = cfg
                .peers
                .iter()
                .zip(["local-data:", "local-data"])
                .map(|(p, key)| {
                    format!(
                        "[{}] = {}",
                        lua_str(key),
                        lua_str(&format!(
                            "_xmpp-server._tcp.{d}. 60 IN SRV 0 0 {port} {d}.",
                            d = p.domain,
                            port = p.port
                        ))
                    )
                })
                .collect();
            let _ = write!(unbound, "; options = {{ {} }}", records.join("; "));
        }
        let _ = writeln!(s, "{unbound} }}");
        if uses_route_plugin(cfg) {
            let routes: Vec<String> = cfg
                .peers
                .iter()
                .map(|p| format!("[{}] = {}", lua_str(&p.domain), p.port))
                .collect();
            let _ = writeln!(s, "test_s2s_routes = {{ {} }}", routes.join("; "));
        }
        if !cfg.extra.is_empty() {
            let _ = writeln!(s, "-- extra\n{}", cfg.extra);
        }
        let _ = writeln!(s, "VirtualHost {}", lua_str(&cfg.domain));
        s
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    pub fn c2s_port(&self) -> u16 {
        self.c2s_port
    }

    pub fn s2s_port(&self) -> u16 {
        self.s2s_port
    }

    /// Its temporary directory: `prosody.cfg.lua`, `prosody.log`, `data/`, `certs/`, `hosts`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Creates the account `user@<domain>` (`prosodyctl register`); the running server sees
    /// it at once.
    pub fn register(&self, user: &str, password: &str) -> Result<()> {
        let bin = find_binary("prosodyctl", "prosody")?;
        let out = Command::new(bin)
            .arg("--config")
            .arg(&self.config_path)
            .args(["register", user, &self.domain, password])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .context("running prosodyctl register")?;
        if !out.status.success() {
            bail!(
                "prosodyctl register {user} {} failed ({}): {}{}",
                self.domain,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prosody.log")).unwrap_or_default()
    }

    /// The last `lines` lines of its debug log (every stanza in and out, s2s negotiation,
    /// DNS), for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Stops the server: SIGTERM, which closes its client and server streams (with
    /// `<stream:error><system-shutdown/>`) and waits for them to close, then SIGKILL once
    /// its log says it is done ("Exiting with status code") or after 5 s. (Its event loop
    /// would otherwise idle ~1 s more before the process exits.)
    pub async fn stop(&mut self) -> Result<()> {
        if !self.terminate() {
            return Ok(());
        }
        let done = wait_for("Prosody to shut down after SIGTERM", STOP_TIMEOUT, || {
            let r = self.shut_down().then_some(());
            async move { r }
        })
        .await;
        let killed = self.kill_now();
        done.with_context(|| format!("killed it; its log ends with:\n{}", self.log_tail(20)))?;
        killed
    }

    /// Sends SIGTERM; false if it is not running.
    fn terminate(&mut self) -> bool {
        let Some(child) = self.child.as_ref() else {
            return false;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        true
    }

    /// Whether it has exited, or finished its shutdown and only idles before exiting.
    fn shut_down(&mut self) -> bool {
        self.exited().is_some() || self.log().contains(SHUTDOWN_DONE)
    }

    fn kill_now(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            if c.try_wait()?.is_none() {
                c.kill()?;
            }
            c.wait()?;
        }
        Ok(())
    }
}

impl Drop for Prosody {
    fn drop(&mut self) {
        if self.terminate() {
            let deadline = Instant::now() + STOP_TIMEOUT;
            while Instant::now() < deadline && !self.shut_down() {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = self.kill_now();
    }
}

fn check_config(cfg: &ProsodyConfig) -> Result<()> {
    if cfg.auth == S2sAuth::External && cfg.peer_ca.is_none() {
        bail!(
            "S2sAuth::External needs peer_ca: without a CA for the peer's certificate Prosody \
             refuses it (\"certificate is not trusted\")"
        );
    }
    let mut domains: Vec<&str> = cfg.peers.iter().map(|p| p.domain.as_str()).collect();
    domains.sort_unstable();
    domains.dedup();
    if domains.len() != cfg.peers.len() || domains.contains(&cfg.domain.as_str()) {
        bail!("peer domains must differ from each other and from the VirtualHost");
    }
    Ok(())
}

/// Whether Prosody finds the peers through `mod_test_s2s_routes` rather than DNS: for more
/// than two peers (libunbound takes two SRV records at most) or a peer outside `.test`
/// (libunbound answers only `.test` from the test's own records; others would go to real
/// DNS).
fn uses_route_plugin(cfg: &ProsodyConfig) -> bool {
    cfg.peers.len() > 2 || cfg.peers.iter().any(|p| !p.domain.ends_with(".test"))
}

/// A Lua string literal.
fn lua_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Routes s2s connections to the domains of `test_s2s_routes` (domain → port) to
/// 127.0.0.1:<port> without DNS, for more peers than libunbound's options hold SRV records:
/// mod_s2s looks each outgoing connection up through `net.resolvers.service.new(<domain>,
/// "xmpp-server" | "xmpps-server", …)`, which this replaces for those domains.
const ROUTES_PLUGIN: &str = r#"-- written by test-support (src/prosody.rs)
module:set_global();
local service = require "net.resolvers.service";
local basic = require "net.resolvers.basic";
local routes = module:get_option("test_s2s_routes", {});
local original_new = service.new;
local none = { next = function(_, cb) cb(nil); end };
service.new = function(hostname, service_name, conn_type, extra)
	local port = routes[hostname];
	if port == nil then
		return original_new(hostname, service_name, conn_type, extra);
	end
	if service_name == "xmpp-server" then
		module:log("debug", "test route: %s -> 127.0.0.1:%d", hostname, port);
		return basic.new("127.0.0.1", port, conn_type, extra);
	end
	return setmetatable({}, { __index = none }); -- no direct TLS (xmpps-server)
end
function module.unload()
	service.new = original_new;
end
"#;
