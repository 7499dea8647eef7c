//! The embedded system: a `redis-server` (unless `--store memory`) and one `relay-node` on
//! free loopback ports, with a generated config; readiness waits with deadlines; children are
//! killed when the guards drop (end of run, error, Ctrl-C).

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::plan::DomainSpec;

/// Which store the relay runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    Redis,
    Memory,
}

/// How the relay hands events to the harness's domains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliverySpec {
    Stream,
    Webhook { url: String },
}

/// The inputs of the generated relay config.
#[derive(Debug, Clone)]
pub struct RelayConfigSpec {
    pub node_id: String,
    pub http_listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// `None` for the in-memory store.
    pub redis_url: Option<String>,
    pub domains: Vec<DomainSpec>,
    pub delivery: DeliverySpec,
}

fn q(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// Renders the relay config: exactly the keys the relay knows (it rejects unknown ones), and a
/// federation rule between every pair of domains.
pub fn render_relay_config(spec: &RelayConfigSpec) -> String {
    let mut s = String::new();
    s.push_str(&format!("node_id = {}\n\n", q(&spec.node_id)));
    s.push_str(&format!(
        "[http]\nlisten = {}\nallow_plaintext = true\n\n",
        q(&spec.http_listen.to_string())
    ));
    s.push_str(&format!(
        "[admin]\nlisten = {}\n\n",
        q(&spec.admin_listen.to_string())
    ));
    match &spec.redis_url {
        Some(url) => s.push_str(&format!(
            "[store]\nbackend = \"redis\"\nredis_url = {}\n\n",
            q(url)
        )),
        None => s.push_str("[store]\nbackend = \"memory\"\n\n"),
    }
    s.push_str("[telemetry]\nlog_format = \"json\"\nlog_level = \"warn\"\n\n");
    for d in &spec.domains {
        s.push_str(&format!(
            "[[domains]]\nname = {}\nplatform = \"http\"\nsecret = {}\n",
            q(&d.name),
            q(&d.secret)
        ));
        match &spec.delivery {
            DeliverySpec::Stream => s.push_str("delivery = \"stream\"\n\n"),
            DeliverySpec::Webhook { url } => s.push_str(&format!(
                "delivery = \"webhook\"\nwebhook_url = {}\n\n",
                q(url)
            )),
        }
    }
    for (i, a) in spec.domains.iter().enumerate() {
        for b in &spec.domains[i + 1..] {
            s.push_str(&format!(
                "[[federation]]\nbetween = [{}, {}]\n\n",
                q(&a.name),
                q(&b.name)
            ));
        }
    }
    s
}

/// `n` distinct free ports on 127.0.0.1 (held open together while choosing, then released;
/// another process could take one in between, which is unlikely on a test machine).
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .context("binding 127.0.0.1:0 to find a free port")?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// Looks `name` up on `PATH`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The relay binary: `--relay-bin`, else next to this executable (or one level up, for
/// `target/debug/deps` test binaries), else on `PATH`.
pub fn find_relay_bin(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if p.is_file() {
            return Ok(p.to_owned());
        }
        bail!("--relay-bin {} does not exist", p.display());
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        for d in [Some(dir), dir.parent()].into_iter().flatten() {
            let p = d.join("relay-node");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    find_on_path("relay-node").ok_or_else(|| {
        anyhow!(
            "relay-node binary not found next to relay-loadtest nor on PATH: \
             build it with `cargo build -p relay-node` or pass --relay-bin PATH"
        )
    })
}

/// A child process killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl ChildGuard {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error if the process has exited, with the end of its log.
    pub fn check_alive(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => bail!(
                "{} exited early ({status}); last lines of {}:\n{}",
                self.name,
                self.log.display(),
                log_tail(&self.log, 30)
            ),
            Err(e) => Err(e).with_context(|| format!("checking on {}", self.name)),
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last `n` lines of a log file.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn spawn_logged(name: &'static str, cmd: &mut Command, log: &Path) -> Result<ChildGuard> {
    let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone().context("duplicating a log file handle")?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    Ok(ChildGuard {
        name,
        child,
        log: log.to_owned(),
    })
}

/// What to start.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    pub store: StoreKind,
    pub relay_bin: Option<PathBuf>,
    pub redis_bin: Option<PathBuf>,
    pub domains: Vec<DomainSpec>,
    pub delivery: DeliverySpec,
    /// Where the config and the children's logs go.
    pub log_dir: PathBuf,
    pub ready_timeout: Duration,
}

/// The running embedded system. Dropping it kills the relay, then Redis, then removes the
/// temporary directory.
#[derive(Debug)]
pub struct EmbeddedSystem {
    relay: ChildGuard,
    redis: Option<ChildGuard>,
    _tmp: tempfile::TempDir,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
}

impl EmbeddedSystem {
    pub async fn start(opts: EmbeddedOptions) -> Result<Self> {
        let tmp = tempfile::Builder::new()
            .prefix("relay-loadtest-")
            .tempdir()
            .context("creating a temporary directory")?;
        std::fs::create_dir_all(&opts.log_dir)
            .with_context(|| format!("creating {}", opts.log_dir.display()))?;
        let relay_bin = find_relay_bin(opts.relay_bin.as_deref())?;
        let ports = free_ports(3)?;
        let http: SocketAddr = SocketAddr::from(([127, 0, 0, 1], ports[0]));
        let admin: SocketAddr = SocketAddr::from(([127, 0, 0, 1], ports[1]));
        let redis_port = ports[2];

        let redis = match opts.store {
            StoreKind::Memory => None,
            StoreKind::Redis => {
                let bin = match &opts.redis_bin {
                    Some(b) => b.clone(),
                    None => find_on_path("redis-server").ok_or_else(|| {
                        anyhow!(
                            "redis-server not found on PATH: install it: apt-get install \
                             redis-server (or run with --store memory)"
                        )
                    })?,
                };
                let mut cmd = Command::new(bin);
                cmd.arg("--port")
                    .arg(redis_port.to_string())
                    .arg("--bind")
                    .arg("127.0.0.1")
                    .arg("--save")
                    .arg("")
                    .arg("--appendonly")
                    .arg("no")
                    .arg("--dir")
                    .arg(tmp.path());
                let mut g =
                    spawn_logged("redis-server", &mut cmd, &opts.log_dir.join("redis.log"))?;
                wait_redis(&mut g, redis_port, opts.ready_timeout).await?;
                Some(g)
            }
        };

        let spec = RelayConfigSpec {
            node_id: "loadtest-1".into(),
            http_listen: http,
            admin_listen: admin,
            redis_url: redis
                .as_ref()
                .map(|_| format!("redis://127.0.0.1:{redis_port}")),
            domains: opts.domains.clone(),
            delivery: opts.delivery.clone(),
        };
        let config_path = opts.log_dir.join("relay-config.toml");
        std::fs::write(&config_path, render_relay_config(&spec))
            .with_context(|| format!("writing {}", config_path.display()))?;
        let mut cmd = Command::new(&relay_bin);
        cmd.arg("--config").arg(&config_path);
        let mut relay = spawn_logged("relay-node", &mut cmd, &opts.log_dir.join("relay-node.log"))?;
        let admin_uri = format!("http://{admin}");
        wait_ready(&admin_uri, Some(&mut relay), opts.ready_timeout)
            .await
            .with_context(|| format!("waiting for {} to become ready", relay_bin.display()))?;
        Ok(Self {
            relay,
            redis,
            _tmp: tmp,
            http,
            admin,
            config_path,
        })
    }

    pub fn relay_pid(&self) -> u32 {
        self.relay.pid()
    }

    pub fn redis_pid(&self) -> Option<u32> {
        self.redis.as_ref().map(|r| r.pid())
    }

    /// An error if a child died.
    pub fn check_alive(&mut self) -> Result<()> {
        self.relay.check_alive()?;
        if let Some(r) = &mut self.redis {
            r.check_alive()?;
        }
        Ok(())
    }
}

const POLL: Duration = Duration::from_millis(50);

async fn wait_redis(child: &mut ChildGuard, port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        child.check_alive()?;
        if redis_ping(port).await.unwrap_or(false) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("redis-server on port {port} did not answer PING within {timeout:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn redis_ping(port: u16) -> Result<bool> {
    let mut s = tokio::time::timeout(
        Duration::from_secs(1),
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    )
    .await??;
    s.write_all(b"PING\r\n").await?;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await??;
    Ok(buf[..n].starts_with(b"+PONG"))
}

/// Polls `GET <admin>/readyz` until it answers 200, the child dies, or the deadline passes.
pub async fn wait_ready(
    admin_base: &str,
    mut child: Option<&mut ChildGuard>,
    timeout: Duration,
) -> Result<()> {
    let uri: hyper::Uri = format!("{}/readyz", admin_base.trim_end_matches('/'))
        .parse()
        .with_context(|| format!("bad admin address {admin_base}"))?;
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(c) = child.as_deref_mut() {
            c.check_alive()?;
        }
        let last = match tokio::time::timeout(Duration::from_secs(2), client.get(uri.clone())).await
        {
            Ok(Ok(resp)) if resp.status() == hyper::StatusCode::OK => return Ok(()),
            Ok(Ok(resp)) => format!("status {}", resp.status()),
            Ok(Err(e)) => format!("{e}"),
            Err(_) => "timed out".to_owned(),
        };
        if Instant::now() >= deadline {
            bail!("{uri} not ready within {timeout:?} (last: {last})");
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(delivery: DeliverySpec, redis: bool) -> RelayConfigSpec {
        RelayConfigSpec {
            node_id: "loadtest-1".into(),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 1001)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 1002)),
            redis_url: redis.then(|| "redis://127.0.0.1:1003".to_owned()),
            domains: (0..3)
                .map(|i| DomainSpec {
                    name: crate::scenario::domain_name(i),
                    secret: format!("sec\"{i}"),
                })
                .collect(),
            delivery,
        }
    }

    fn keys(t: &toml::Table) -> Vec<&str> {
        let mut k: Vec<&str> = t.keys().map(String::as_str).collect();
        k.sort_unstable();
        k
    }

    #[test]
    fn config_has_exactly_the_known_keys() -> Result<()> {
        let text = render_relay_config(&spec(DeliverySpec::Stream, true));
        let t: toml::Table = toml::from_str(&text)?;
        assert_eq!(
            keys(&t),
            vec![
                "admin",
                "domains",
                "federation",
                "http",
                "node_id",
                "store",
                "telemetry"
            ]
        );
        assert_eq!(t["node_id"].as_str(), Some("loadtest-1"));
        let http = t["http"].as_table().ok_or_else(|| anyhow!("http"))?;
        assert_eq!(keys(http), vec!["allow_plaintext", "listen"]);
        assert_eq!(http["listen"].as_str(), Some("127.0.0.1:1001"));
        assert_eq!(http["allow_plaintext"].as_bool(), Some(true));
        assert_eq!(t["admin"]["listen"].as_str(), Some("127.0.0.1:1002"));
        assert_eq!(t["store"]["backend"].as_str(), Some("redis"));
        assert_eq!(
            t["store"]["redis_url"].as_str(),
            Some("redis://127.0.0.1:1003")
        );
        assert_eq!(t["telemetry"]["log_format"].as_str(), Some("json"));
        assert_eq!(t["telemetry"]["log_level"].as_str(), Some("warn"));
        let domains = t["domains"].as_array().ok_or_else(|| anyhow!("domains"))?;
        assert_eq!(domains.len(), 3);
        for (i, d) in domains.iter().enumerate() {
            let d = d.as_table().ok_or_else(|| anyhow!("domain"))?;
            assert_eq!(keys(d), vec!["delivery", "name", "platform", "secret"]);
            assert_eq!(d["secret"].as_str(), Some(format!("sec\"{i}").as_str()));
            assert_eq!(d["delivery"].as_str(), Some("stream"));
        }
        let fed = t["federation"]
            .as_array()
            .ok_or_else(|| anyhow!("federation"))?;
        assert_eq!(fed.len(), 3, "every pair of 3 domains");
        assert_eq!(fed[0]["between"].as_array().map(|a| a.len()), Some(2));
        Ok(())
    }

    #[test]
    fn memory_and_webhook_config() -> Result<()> {
        let text = render_relay_config(&spec(
            DeliverySpec::Webhook {
                url: "http://127.0.0.1:9/hook".into(),
            },
            false,
        ));
        let t: toml::Table = toml::from_str(&text)?;
        let store = t["store"].as_table().ok_or_else(|| anyhow!("store"))?;
        assert_eq!(keys(store), vec!["backend"]);
        assert_eq!(store["backend"].as_str(), Some("memory"));
        let d = t["domains"][0]
            .as_table()
            .ok_or_else(|| anyhow!("domain"))?;
        assert_eq!(
            keys(d),
            vec!["delivery", "name", "platform", "secret", "webhook_url"]
        );
        assert_eq!(d["delivery"].as_str(), Some("webhook"));
        assert_eq!(d["webhook_url"].as_str(), Some("http://127.0.0.1:9/hook"));
        Ok(())
    }

    #[test]
    fn free_ports_are_distinct() -> Result<()> {
        let p = free_ports(4)?;
        let set: std::collections::HashSet<_> = p.iter().collect();
        assert_eq!(set.len(), 4);
        assert!(p.iter().all(|&x| x != 0));
        Ok(())
    }

    #[test]
    fn missing_relay_bin_is_reported() {
        let e = find_relay_bin(Some(Path::new("/nonexistent/relay-node")));
        assert!(e.is_err());
    }

    #[test]
    fn child_guard_kills_on_drop() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let mut g = spawn_logged(
            "sleep",
            Command::new("sleep").arg("600"),
            &dir.path().join("sleep.log"),
        )?;
        g.check_alive()?;
        let pid = g.pid();
        drop(g);
        // Reaped: /proc/<pid> is gone (pid reuse within this instant is not a concern).
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        Ok(())
    }

    #[test]
    fn log_tail_takes_last_lines() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("x.log");
        std::fs::write(&p, "a\nb\nc\nd\n")?;
        assert_eq!(log_tail(&p, 2), "c\nd");
        assert_eq!(log_tail(&p, 10), "a\nb\nc\nd");
        assert_eq!(log_tail(&dir.path().join("none"), 3), "");
        Ok(())
    }
}
