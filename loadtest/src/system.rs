//! The embedded system: a `redis-server` (unless `--store memory`), an `etcd` when the nodes
//! find each other through etcd, and one or more `relay-node`s on free loopback ports, each
//! with a generated config; readiness waits with deadlines; faults on demand (kill a node,
//! add one); children are killed when the guards drop (end of run, error, Ctrl-C).
//!
//! Node `i` (an index of [`EmbeddedSystem::nodes`]) is `n{i+1}`: its config is
//! `relay-config-n{i+1}.toml` and its log `relay-node-n{i+1}.log` in the log directory. Node 1's
//! config is also written as `relay-config.toml`, and `relay-node.log` links to its log.

use std::ffi::OsString;
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::plan::DomainSpec;

/// Which store the relay runs with.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
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

/// How the embedded nodes are clustered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "membership", rename_all = "lowercase")]
pub enum ClusterMode {
    /// No `[cluster]` section: one node, alone, without a cluster gRPC listener.
    #[default]
    None,
    /// One node with static membership (itself alone) that also serves the cluster gRPC
    /// listener (the session service: gRPC clients can deliver envelopes to it), on a free
    /// loopback port.
    Static,
    /// Membership in an `etcd` the harness starts: every node registers with a lease of
    /// `lease_ttl_secs` (at least 2) and serves gRPC to its peers. Needs the Redis store.
    Etcd { lease_ttl_secs: u64 },
}

/// The `[cluster]` section of a generated config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ClusterSection {
    /// No `[cluster]` section.
    #[default]
    None,
    /// `membership = "static"`, and `grpc_listen` when given.
    Static { grpc_listen: Option<SocketAddr> },
    /// `membership = "etcd"` in cluster `name`.
    Etcd {
        name: String,
        etcd_endpoints: Vec<String>,
        lease_ttl_secs: u64,
        grpc_listen: SocketAddr,
    },
}

impl ClusterSection {
    /// Where the node serves cluster gRPC, if it does.
    pub fn grpc_listen(&self) -> Option<SocketAddr> {
        match self {
            Self::None => None,
            Self::Static { grpc_listen } => *grpc_listen,
            Self::Etcd { grpc_listen, .. } => Some(*grpc_listen),
        }
    }
}

/// The `[xmpp]` section of a generated config: the node's XMPP listener, its TLS material,
/// and one remote domain the harness plays, federated with every HTTP domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XmppSection {
    pub listen: SocketAddr,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub tls_ca: PathBuf,
    /// The remote XMPP domain (a `[[domains]]` entry with `platform = "xmpp"`, and a peer
    /// that must authenticate with SASL EXTERNAL).
    pub peer_domain: String,
    /// Where the relay reaches that domain (the harness's listener for its answers).
    pub peer_address: Option<SocketAddr>,
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
    pub cluster: ClusterSection,
    /// The XMPP edge, for `--protocol xmpp`.
    pub xmpp: Option<XmppSection>,
}

fn q(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// Renders the relay config: exactly the keys the relay knows (it rejects unknown ones), and a
/// federation rule between every pair of domains (and between each of them and the remote
/// XMPP domain, with an `[xmpp]` section).
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
    match &spec.cluster {
        ClusterSection::None => {}
        ClusterSection::Static { grpc_listen } => {
            s.push_str("[cluster]\nmembership = \"static\"\n");
            if let Some(l) = grpc_listen {
                s.push_str(&format!("grpc_listen = {}\n", q(&l.to_string())));
            }
            s.push('\n');
        }
        ClusterSection::Etcd {
            name,
            etcd_endpoints,
            lease_ttl_secs,
            grpc_listen,
        } => {
            let endpoints: Vec<String> = etcd_endpoints.iter().map(|e| q(e)).collect();
            s.push_str(&format!(
                "[cluster]\nmembership = \"etcd\"\nname = {}\netcd_endpoints = [{}]\n\
                 lease_ttl_secs = {lease_ttl_secs}\ngrpc_listen = {}\n\n",
                q(name),
                endpoints.join(", "),
                q(&grpc_listen.to_string())
            ));
        }
    }
    if let Some(x) = &spec.xmpp {
        let path = |p: &Path| q(&p.to_string_lossy());
        s.push_str(&format!(
            "[xmpp]\nlisten = {}\ntls_cert = {}\ntls_key = {}\ntls_ca = {}\n\n",
            q(&x.listen.to_string()),
            path(&x.tls_cert),
            path(&x.tls_key),
            path(&x.tls_ca)
        ));
        s.push_str(&format!(
            "[[xmpp.peers]]\ndomain = {}\nauth = \"external\"\n",
            q(&x.peer_domain)
        ));
        if let Some(a) = x.peer_address {
            s.push_str(&format!("address = {}\n", q(&a.to_string())));
        }
        s.push('\n');
        s.push_str(&format!(
            "[[domains]]\nname = {}\nplatform = \"xmpp\"\n\n",
            q(&x.peer_domain)
        ));
    }
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
    if let Some(x) = &spec.xmpp {
        for d in &spec.domains {
            s.push_str(&format!(
                "[[federation]]\nbetween = [{}, {}]\n\n",
                q(&d.name),
                q(&x.peer_domain)
            ));
        }
    }
    s
}

/// The TLS material of the XMPP edge and of the remote domain the harness plays, issued by a
/// CA of the run's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XmppCerts {
    pub ca: PathBuf,
    /// The relay's certificate: a DNS name for every HTTP domain (XMPP peers reach those).
    pub relay_cert: PathBuf,
    pub relay_key: PathBuf,
    /// The remote domain's certificate (the client certificate for SASL EXTERNAL, and its
    /// listener's).
    pub peer_cert: PathBuf,
    pub peer_key: PathBuf,
}

/// Issues a CA (`xmpp-ca.pem`), the relay's certificate for `relay_names`
/// (`xmpp-relay.pem`/`.key`) and the remote domain's for `peer_domain` (`xmpp-peer.pem`/`.key`)
/// in `dir`, with `rcgen`.
pub fn issue_xmpp_certs(
    dir: &Path,
    relay_names: &[String],
    peer_domain: &str,
) -> Result<XmppCerts> {
    let ca_key = rcgen::KeyPair::generate().context("generating the CA key")?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "relay-loadtest XMPP CA");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let certs = XmppCerts {
        ca: dir.join("xmpp-ca.pem"),
        relay_cert: dir.join("xmpp-relay.pem"),
        relay_key: dir.join("xmpp-relay.key"),
        peer_cert: dir.join("xmpp-peer.pem"),
        peer_key: dir.join("xmpp-peer.key"),
    };
    let write = |p: &Path, text: String| {
        std::fs::write(p, text).with_context(|| format!("writing {}", p.display()))
    };
    write(&certs.ca, ca_cert.pem())?;
    let peer = [peer_domain.to_owned()];
    for (names, cert, key) in [
        (relay_names, &certs.relay_cert, &certs.relay_key),
        (&peer[..], &certs.peer_cert, &certs.peer_key),
    ] {
        let leaf_key = rcgen::KeyPair::generate().context("generating a key")?;
        let mut params = rcgen::CertificateParams::new(names.to_vec())
            .with_context(|| format!("certificate names {names:?}"))?;
        if let Some(first) = names.first() {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, first.as_str());
        }
        let leaf = params.signed_by(&leaf_key, &issuer)?;
        write(cert, leaf.pem())?;
        write(key, leaf_key.serialize_pem())?;
    }
    Ok(certs)
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

/// The etcd binary: `explicit`, else `etcd` on `PATH`, else `/usr/bin/etcd`.
pub fn find_etcd_bin(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if p.is_file() {
            return Ok(p.to_owned());
        }
        bail!("etcd binary {} does not exist", p.display());
    }
    find_on_path("etcd")
        .or_else(|| Some(PathBuf::from("/usr/bin/etcd")).filter(|p| p.is_file()))
        .ok_or_else(|| {
            anyhow!("etcd not found on PATH: install etcd-server (apt-get install etcd-server)")
        })
}

/// A child process killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    name: String,
    child: Child,
    log: PathBuf,
}

impl ChildGuard {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The file its stdout and stderr go to.
    pub fn log_path(&self) -> &Path {
        &self.log
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

    /// SIGKILL, then waits for the process to be gone.
    fn kill_and_reap(&mut self) -> Result<()> {
        self.child
            .kill()
            .with_context(|| format!("killing {}", self.name))?;
        self.child
            .wait()
            .with_context(|| format!("reaping {}", self.name))?;
        Ok(())
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

fn spawn_logged(name: &str, cmd: &mut Command, log: &Path) -> Result<ChildGuard> {
    let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone().context("duplicating a log file handle")?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    Ok(ChildGuard {
        name: name.to_owned(),
        child,
        log: log.to_owned(),
    })
}

/// Environment variables of this process whose names start with `prefix`.
fn env_names_with_prefix(prefix: &str) -> Vec<OsString> {
    std::env::vars_os()
        .map(|(k, _)| k)
        .filter(|k| k.to_string_lossy().starts_with(prefix))
        .collect()
}

/// `bytes` random bytes from `/dev/urandom`, in hex.
fn random_hex(bytes: usize) -> Result<String> {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("reading /dev/urandom")?;
    Ok(hex::encode(buf))
}

/// What to start.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    pub store: StoreKind,
    pub relay_bin: Option<PathBuf>,
    pub redis_bin: Option<PathBuf>,
    pub domains: Vec<DomainSpec>,
    pub delivery: DeliverySpec,
    /// Where the configs and the children's logs go.
    pub log_dir: PathBuf,
    /// The bound of each wait while starting (etcd, Redis, every node's `/readyz`, the
    /// membership).
    pub ready_timeout: Duration,
    /// How many relay nodes (at least 1; more than 1 needs [`ClusterMode::Etcd`] and the
    /// Redis store).
    pub nodes: usize,
    pub cluster: ClusterMode,
    /// The etcd binary (for [`ClusterMode::Etcd`]): default `etcd` on `PATH`, else
    /// `/usr/bin/etcd`.
    pub etcd_bin: Option<PathBuf>,
    /// Extra environment of every node, e.g. `FEDRELAY_RUNTIME__WORKER_THREADS=1` (a config
    /// override). `FEDRELAY_*` variables of the harness's own environment are not passed on:
    /// the generated config and these are what the nodes run with.
    pub node_env: Vec<(String, String)>,
    /// Serve the XMPP edge to a remote domain the harness plays (`--protocol xmpp`).
    pub xmpp: Option<XmppEmbedded>,
}

/// The XMPP side of the embedded system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XmppEmbedded {
    /// The remote XMPP domain (`xmpp.load`).
    pub domain: String,
    /// The harness's listener for that domain, where the relay sends what it refuses.
    pub sink: Option<SocketAddr>,
}

impl Default for EmbeddedOptions {
    /// Redis store, relay and Redis binaries looked up, no domains, stream delivery, the
    /// current directory for logs, 30 s waits, one node without a `[cluster]` section.
    fn default() -> Self {
        Self {
            store: StoreKind::Redis,
            relay_bin: None,
            redis_bin: None,
            domains: Vec::new(),
            delivery: DeliverySpec::Stream,
            log_dir: PathBuf::from("."),
            ready_timeout: Duration::from_secs(30),
            nodes: 1,
            cluster: ClusterMode::None,
            etcd_bin: None,
            node_env: Vec::new(),
            xmpp: None,
        }
    }
}

/// Refuses combinations the relay (or a cluster) cannot run.
pub fn validate_options(opts: &EmbeddedOptions) -> Result<()> {
    if opts.nodes == 0 {
        bail!("the embedded system needs at least one node");
    }
    match opts.cluster {
        ClusterMode::Etcd { lease_ttl_secs } => {
            if opts.store != StoreKind::Redis {
                bail!(
                    "a cluster with etcd membership needs the Redis store (nodes share their \
                     sessions in Redis): use --store redis"
                );
            }
            if lease_ttl_secs < 2 {
                bail!("the etcd lease TTL must be at least 2 s (got {lease_ttl_secs})");
            }
        }
        ClusterMode::None | ClusterMode::Static if opts.nodes > 1 => bail!(
            "{} nodes need etcd membership and the Redis store: a node without etcd is alone",
            opts.nodes
        ),
        ClusterMode::None | ClusterMode::Static => {}
    }
    Ok(())
}

/// One relay node of the embedded system.
#[derive(Debug)]
pub struct Node {
    /// `n1`, `n2`, …
    pub id: String,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    /// The cluster gRPC listener, when the node serves one.
    pub grpc: Option<SocketAddr>,
    /// The XMPP s2s listener, when the node serves one.
    pub xmpp: Option<SocketAddr>,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    /// The process; `None` once killed on purpose ([`EmbeddedSystem::kill_node`]).
    pub child: Option<ChildGuard>,
    pid: u32,
    killed_at: Option<Instant>,
}

impl Node {
    pub fn is_alive(&self) -> bool {
        self.child.is_some()
    }

    /// The pid the node was started with (also after it was killed).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// When it was killed on purpose.
    pub fn killed_at(&self) -> Option<Instant> {
        self.killed_at
    }

    /// `http://<http>`: the HTTP edge.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.http)
    }

    /// `http://<admin>`: `/readyz`, `/metrics`, `/cluster`.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    /// `http://<grpc>`: the cluster gRPC listener, when the node serves one.
    pub fn grpc_url(&self) -> Option<String> {
        self.grpc.map(|g| format!("http://{g}"))
    }
}

/// The etcd of a cluster.
#[derive(Debug)]
struct Etcd {
    child: ChildGuard,
    endpoint: String,
}

/// What every node is started from (also a node added later).
#[derive(Debug)]
struct NodeTemplate {
    relay_bin: PathBuf,
    redis_url: Option<String>,
    domains: Vec<DomainSpec>,
    delivery: DeliverySpec,
    cluster: ClusterMode,
    /// The etcd cluster name (`/fedrelay/<name>/`), for [`ClusterMode::Etcd`].
    cluster_name: String,
    etcd_endpoint: Option<String>,
    log_dir: PathBuf,
    node_env: Vec<(String, String)>,
    /// The XMPP edge: the certificates, the remote domain and the harness's listener for it.
    xmpp: Option<(XmppCerts, XmppEmbedded)>,
}

/// Ports a node takes: HTTP, admin, gRPC, XMPP.
const PORTS_PER_NODE: usize = 4;

impl NodeTemplate {
    /// Writes node `i`'s config and starts it on `ports` (HTTP, admin, gRPC, XMPP); does not
    /// wait.
    fn spawn(&self, i: usize, ports: &[u16]) -> Result<Node> {
        let &[http_port, admin_port, grpc_port, xmpp_port] = ports else {
            bail!("a node needs {PORTS_PER_NODE} ports, got {}", ports.len());
        };
        let id = format!("n{}", i + 1);
        let local = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let cluster = match self.cluster {
            ClusterMode::None => ClusterSection::None,
            ClusterMode::Static => ClusterSection::Static {
                grpc_listen: Some(local(grpc_port)),
            },
            ClusterMode::Etcd { lease_ttl_secs } => ClusterSection::Etcd {
                name: self.cluster_name.clone(),
                etcd_endpoints: self.etcd_endpoint.iter().cloned().collect(),
                lease_ttl_secs,
                grpc_listen: local(grpc_port),
            },
        };
        let spec = RelayConfigSpec {
            node_id: id.clone(),
            http_listen: local(http_port),
            admin_listen: local(admin_port),
            redis_url: self.redis_url.clone(),
            domains: self.domains.clone(),
            delivery: self.delivery.clone(),
            cluster,
            xmpp: self.xmpp.as_ref().map(|(certs, x)| XmppSection {
                listen: local(xmpp_port),
                tls_cert: certs.relay_cert.clone(),
                tls_key: certs.relay_key.clone(),
                tls_ca: certs.ca.clone(),
                peer_domain: x.domain.clone(),
                peer_address: x.sink,
            }),
        };
        let text = render_relay_config(&spec);
        let config_path = self.log_dir.join(format!("relay-config-{id}.toml"));
        std::fs::write(&config_path, &text)
            .with_context(|| format!("writing {}", config_path.display()))?;
        let log_path = self.log_dir.join(format!("relay-node-{id}.log"));
        if i == 0 {
            let plain = self.log_dir.join("relay-config.toml");
            std::fs::write(&plain, &text)
                .with_context(|| format!("writing {}", plain.display()))?;
            // `relay-node.log`, the single node's log of old, names node 1's (best effort).
            let link = self.log_dir.join("relay-node.log");
            let _ = std::fs::remove_file(&link);
            let _ = std::os::unix::fs::symlink(format!("relay-node-{id}.log"), &link);
        }
        let mut cmd = Command::new(&self.relay_bin);
        cmd.arg("--config").arg(&config_path);
        for k in env_names_with_prefix("FEDRELAY_") {
            cmd.env_remove(k);
        }
        cmd.envs(self.node_env.iter().map(|(k, v)| (k, v)));
        let child = spawn_logged(&format!("relay-node {id}"), &mut cmd, &log_path)?;
        Ok(Node {
            id,
            http: spec.http_listen,
            admin: spec.admin_listen,
            grpc: spec.cluster.grpc_listen(),
            xmpp: spec.xmpp.as_ref().map(|x| x.listen),
            config_path,
            log_path,
            pid: child.pid(),
            child: Some(child),
            killed_at: None,
        })
    }
}

/// The running embedded system. Dropping it kills the relay nodes, then etcd, then Redis, then
/// removes the temporary directory.
#[derive(Debug)]
pub struct EmbeddedSystem {
    nodes: Vec<Node>,
    etcd: Option<Etcd>,
    redis: Option<ChildGuard>,
    template: NodeTemplate,
    _tmp: tempfile::TempDir,
    /// Node 1's HTTP edge.
    pub http: SocketAddr,
    /// Node 1's admin listener.
    pub admin: SocketAddr,
    /// Node 1's config (`relay-config.toml`, a copy of `relay-config-n1.toml`).
    pub config_path: PathBuf,
}

impl EmbeddedSystem {
    /// Starts Redis (Redis store), etcd ([`ClusterMode::Etcd`]) and the nodes, and waits until
    /// every node's `/readyz` answers 200 and, with etcd, every node lists all of them as
    /// members (`GET /cluster`).
    pub async fn start(opts: EmbeddedOptions) -> Result<Self> {
        validate_options(&opts)?;
        let tmp = tempfile::Builder::new()
            .prefix("relay-loadtest-")
            .tempdir()
            .context("creating a temporary directory")?;
        std::fs::create_dir_all(&opts.log_dir)
            .with_context(|| format!("creating {}", opts.log_dir.display()))?;
        let relay_bin = find_relay_bin(opts.relay_bin.as_deref())?;
        let redis_bin = match opts.store {
            StoreKind::Memory => None,
            StoreKind::Redis => Some(match &opts.redis_bin {
                Some(b) => b.clone(),
                None => find_on_path("redis-server").ok_or_else(|| {
                    anyhow!(
                        "redis-server not found on PATH: install it: apt-get install \
                         redis-server (or run with --store memory)"
                    )
                })?,
            }),
        };
        let etcd_bin = match opts.cluster {
            ClusterMode::Etcd { .. } => Some(find_etcd_bin(opts.etcd_bin.as_deref())?),
            ClusterMode::None | ClusterMode::Static => None,
        };

        // Declared in this order, so that on an error below the nodes go first, then etcd,
        // then Redis.
        let (redis, redis_url) = match redis_bin {
            None => (None, None),
            Some(bin) => {
                let port = free_ports(1)?
                    .first()
                    .copied()
                    .context("no free port for Redis")?;
                let mut cmd = Command::new(bin);
                cmd.arg("--port")
                    .arg(port.to_string())
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
                wait_redis(&mut g, port, opts.ready_timeout).await?;
                (Some(g), Some(format!("redis://127.0.0.1:{port}")))
            }
        };
        let etcd = match etcd_bin {
            None => None,
            Some(bin) => Some(
                start_etcd(
                    &bin,
                    &tmp.path().join("etcd"),
                    &opts.log_dir.join("etcd.log"),
                    opts.ready_timeout,
                )
                .await?,
            ),
        };
        let template = NodeTemplate {
            relay_bin,
            redis_url,
            domains: opts.domains.clone(),
            delivery: opts.delivery.clone(),
            cluster: opts.cluster,
            cluster_name: format!("loadtest-{}", random_hex(6)?),
            etcd_endpoint: etcd.as_ref().map(|e| e.endpoint.clone()),
            log_dir: opts.log_dir.clone(),
            node_env: opts.node_env.clone(),
            xmpp: match &opts.xmpp {
                Some(x) => {
                    let names: Vec<String> = opts.domains.iter().map(|d| d.name.clone()).collect();
                    Some((issue_xmpp_certs(tmp.path(), &names, &x.domain)?, x.clone()))
                }
                None => None,
            },
        };

        let ports = free_ports(PORTS_PER_NODE * opts.nodes)?;
        let mut nodes = Vec::with_capacity(opts.nodes);
        for (i, p) in ports.chunks(PORTS_PER_NODE).enumerate() {
            nodes.push(template.spawn(i, p)?);
        }
        for n in &mut nodes {
            wait_ready(&n.admin_url(), n.child.as_mut(), opts.ready_timeout)
                .await
                .with_context(|| {
                    format!(
                        "waiting for node {} ({}) to become ready",
                        n.id,
                        template.relay_bin.display()
                    )
                })?;
        }
        if matches!(opts.cluster, ClusterMode::Etcd { .. }) {
            wait_members(&mut nodes, Members::Exactly, opts.ready_timeout).await?;
        }
        let first = nodes.first().context("no node started")?;
        let (http, admin) = (first.http, first.admin);
        Ok(Self {
            http,
            admin,
            config_path: opts.log_dir.join("relay-config.toml"),
            nodes,
            etcd,
            redis,
            template,
            _tmp: tmp,
        })
    }

    /// Every node started, killed ones included; index `i` is `n{i+1}`.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn cluster_mode(&self) -> ClusterMode {
        self.template.cluster
    }

    /// The etcd cluster name of the nodes (`/fedrelay/<name>/`), with etcd membership.
    pub fn cluster_name(&self) -> Option<&str> {
        self.etcd
            .as_ref()
            .map(|_| self.template.cluster_name.as_str())
    }

    /// `http://127.0.0.1:<port>` of etcd, with etcd membership.
    pub fn etcd_endpoint(&self) -> Option<&str> {
        self.etcd.as_ref().map(|e| e.endpoint.as_str())
    }

    /// Where the configs and logs are.
    pub fn log_dir(&self) -> &Path {
        &self.template.log_dir
    }

    /// `http://<addr>` of the HTTP edge of every node alive.
    pub fn http_targets(&self) -> Vec<String> {
        self.alive().map(Node::http_url).collect()
    }

    /// `http://<addr>` of the cluster gRPC listener of every node alive that serves one.
    pub fn grpc_targets(&self) -> Vec<String> {
        self.alive().filter_map(Node::grpc_url).collect()
    }

    /// `host:port` of the XMPP listener of every node alive that serves one.
    pub fn xmpp_targets(&self) -> Vec<String> {
        self.alive()
            .filter_map(|n| n.xmpp.map(|a| a.to_string()))
            .collect()
    }

    /// The XMPP edge's certificates (in the system's temporary directory), when it has one.
    pub fn xmpp_certs(&self) -> Option<&XmppCerts> {
        self.template.xmpp.as_ref().map(|(c, _)| c)
    }

    /// Node 1's pid (the pid it had, if it was killed).
    pub fn relay_pid(&self) -> u32 {
        self.nodes.first().map_or(0, Node::pid)
    }

    /// The pids of the nodes alive.
    pub fn relay_pids(&self) -> Vec<u32> {
        self.alive().map(Node::pid).collect()
    }

    pub fn redis_pid(&self) -> Option<u32> {
        self.redis.as_ref().map(|r| r.pid())
    }

    pub fn etcd_pid(&self) -> Option<u32> {
        self.etcd.as_ref().map(|e| e.child.pid())
    }

    /// The indexes of the nodes alive.
    pub fn alive_nodes(&self) -> Vec<usize> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.is_alive())
            .map(|(i, _)| i)
            .collect()
    }

    fn alive(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| n.is_alive())
    }

    /// An error if a child died (nodes killed on purpose aside).
    pub fn check_alive(&mut self) -> Result<()> {
        for n in &mut self.nodes {
            if let Some(c) = &mut n.child {
                c.check_alive()?;
            }
        }
        if let Some(e) = &mut self.etcd {
            e.child.check_alive()?;
        }
        if let Some(r) = &mut self.redis {
            r.check_alive()?;
        }
        Ok(())
    }

    /// Kills node `idx` (SIGKILL, no chance to leave the cluster) and reaps it; returns when
    /// the signal was sent. Its slot, addresses and log stay.
    pub fn kill_node(&mut self, idx: usize) -> Result<Instant> {
        let count = self.nodes.len();
        let node = self
            .nodes
            .get_mut(idx)
            .ok_or_else(|| anyhow!("no node {idx}: there are {count}"))?;
        let mut child = node
            .child
            .take()
            .ok_or_else(|| anyhow!("node {} was already killed", node.id))?;
        let at = Instant::now();
        node.killed_at = Some(at);
        child.kill_and_reap()?;
        Ok(at)
    }

    /// Starts one more node (`n<k+1>`, with etcd membership only), waits until it is ready and
    /// every node alive lists it as a member; returns its index and how long that took.
    pub async fn add_node(&mut self, timeout: Duration) -> Result<(usize, Duration)> {
        if !matches!(self.template.cluster, ClusterMode::Etcd { .. }) {
            bail!("adding a node needs etcd membership");
        }
        let t0 = Instant::now();
        let deadline = t0 + timeout;
        let idx = self.nodes.len();
        let ports = free_ports(PORTS_PER_NODE)?;
        let node = self.template.spawn(idx, &ports)?;
        self.nodes.push(node);
        let node = self
            .nodes
            .last_mut()
            .context("the node just added is gone")?;
        let id = node.id.clone();
        wait_ready(&node.admin_url(), node.child.as_mut(), timeout)
            .await
            .with_context(|| format!("waiting for the added node {id} to become ready"))?;
        let left = deadline.saturating_duration_since(Instant::now());
        wait_members(&mut self.nodes, Members::AtLeast, left)
            .await
            .with_context(|| format!("waiting for the nodes to see the added node {id}"))?;
        Ok((idx, t0.elapsed()))
    }

    /// Waits until every node alive is ready and lists exactly the nodes alive as members
    /// (after a kill: until the lease of the killed node expired and everyone noticed);
    /// returns how long it took.
    pub async fn wait_converged(&mut self, timeout: Duration) -> Result<Duration> {
        let t0 = Instant::now();
        wait_members(&mut self.nodes, Members::Exactly, timeout).await?;
        Ok(t0.elapsed())
    }

    /// `GET /cluster` of node `idx`'s admin listener: its view of the cluster (`node_id`,
    /// `revision`, `ready`, `handoffs_in_flight`, and `members`, each with `node_id`,
    /// `grpc_addr`, `ready`, `sessions_active`, `presence_active`, …).
    pub async fn cluster_view(&self, idx: usize) -> Result<serde_json::Value> {
        let node = self
            .nodes
            .get(idx)
            .ok_or_else(|| anyhow!("no node {idx}: there are {}", self.nodes.len()))?;
        if !node.is_alive() {
            bail!("node {} was killed", node.id);
        }
        get_json(&http_client(), &format!("{}/cluster", node.admin_url())).await
    }
}

impl Drop for EmbeddedSystem {
    fn drop(&mut self) {
        // Nodes first (they would otherwise log about losing etcd or Redis), then etcd, then
        // Redis; the temporary directory goes with the fields.
        for n in &mut self.nodes {
            n.child = None;
        }
        self.etcd = None;
        self.redis = None;
    }
}

/// The sorted `node_id`s of the `members` of a `GET /cluster` view.
pub fn member_ids(view: &serde_json::Value) -> Vec<String> {
    let mut ids: Vec<String> = view["members"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .filter_map(|m| m["node_id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

const POLL: Duration = Duration::from_millis(50);
/// How often the membership views are polled (each asks every member over gRPC).
const MEMBERS_POLL: Duration = Duration::from_millis(100);

fn http_client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// `GET uri`, 200 and a JSON body, within 3 s.
async fn get_json(
    client: &Client<HttpConnector, Empty<Bytes>>,
    uri: &str,
) -> Result<serde_json::Value> {
    let parsed: hyper::Uri = uri.parse().with_context(|| format!("bad URI {uri}"))?;
    let fetch = async {
        let resp = client.get(parsed).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, body))
    };
    let (status, body) = tokio::time::timeout(Duration::from_secs(3), fetch)
        .await
        .map_err(|_| anyhow!("GET {uri} timed out"))?
        .with_context(|| format!("GET {uri}"))?;
    if status != hyper::StatusCode::OK {
        bail!(
            "GET {uri}: status {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    serde_json::from_slice(&body).with_context(|| format!("GET {uri}: not JSON"))
}

/// `GET url` on an admin listener: 200 and a JSON body, within 3 s.
pub async fn admin_json(url: &str) -> Result<serde_json::Value> {
    get_json(&http_client(), url).await
}

/// What [`wait_members`] waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Members {
    /// Each node alive lists exactly the nodes alive.
    Exactly,
    /// Each node alive lists at least the nodes alive (a killed node may linger until its
    /// lease expires).
    AtLeast,
}

/// Polls `GET /cluster` of every node alive until each says it is ready and lists the nodes
/// alive as `want` says, a node dies, or `timeout` passes.
async fn wait_members(nodes: &mut [Node], want: Members, timeout: Duration) -> Result<()> {
    let mut alive: Vec<String> = nodes
        .iter()
        .filter(|n| n.is_alive())
        .map(|n| n.id.clone())
        .collect();
    alive.sort();
    let client = http_client();
    let deadline = Instant::now() + timeout;
    loop {
        let mut all = true;
        let mut seen = Vec::new();
        for n in nodes.iter_mut() {
            let Some(child) = n.child.as_mut() else {
                continue;
            };
            child.check_alive()?;
            match get_json(&client, &format!("{}/cluster", n.admin_url())).await {
                Ok(view) => {
                    let ids = member_ids(&view);
                    let ready = view["ready"].as_bool() == Some(true);
                    let listed = match want {
                        Members::Exactly => ids == alive,
                        Members::AtLeast => alive.iter().all(|a| ids.contains(a)),
                    };
                    all &= ready && listed;
                    seen.push(format!("{}: ready {ready}, members {ids:?}", n.id));
                }
                Err(e) => {
                    all = false;
                    seen.push(format!("{}: {e:#}", n.id));
                }
            }
        }
        if all {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "the nodes did not all list {alive:?} as members ({want:?}) within \
                 {timeout:?}; last seen: {}",
                seen.join("; ")
            );
        }
        tokio::time::sleep(MEMBERS_POLL).await;
    }
}

/// Starts a single-member etcd (client and peer URLs on free loopback ports, data under
/// `data_dir`) and waits until `GET /health` says so. A port taken between choosing and
/// binding it gets fresh ports, twice at most.
async fn start_etcd(bin: &Path, data_dir: &Path, log: &Path, timeout: Duration) -> Result<Etcd> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let ports = free_ports(2)?;
        let (client_port, peer_port) = match ports.as_slice() {
            &[c, p] => (c, p),
            _ => bail!("expected two free ports"),
        };
        let client = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let mut cmd = Command::new(bin);
        cmd.arg("--name")
            .arg("loadtest")
            .arg("--data-dir")
            .arg(data_dir.join(format!("data-{attempt}")))
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("loadtest={peer}"));
        // etcd reads every flag from `ETCD_<FLAG>` too: only the flags above count.
        for k in env_names_with_prefix("ETCD_") {
            cmd.env_remove(k);
        }
        let mut child = spawn_logged("etcd", &mut cmd, log)?;
        match wait_etcd(&mut child, client_port, timeout).await {
            Ok(()) => {
                return Ok(Etcd {
                    child,
                    endpoint: client,
                });
            }
            Err(_) if attempt < 3 && log_tail(log, 100).contains("address already in use") => {}
            Err(e) => return Err(e),
        }
    }
}

async fn wait_etcd(child: &mut ChildGuard, port: u16, timeout: Duration) -> Result<()> {
    let client = http_client();
    let uri = format!("http://127.0.0.1:{port}/health");
    let deadline = Instant::now() + timeout;
    loop {
        child.check_alive()?;
        let last = match get_json(&client, &uri).await {
            Ok(v) if v["health"].as_str() == Some("true") => return Ok(()),
            Ok(v) => v.to_string(),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() >= deadline {
            bail!("etcd not healthy on port {port} within {timeout:?} (last: {last})");
        }
        tokio::time::sleep(POLL).await;
    }
}

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
    let client = http_client();
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
            node_id: "n1".into(),
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
            cluster: ClusterSection::None,
            xmpp: None,
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
        assert_eq!(t["node_id"].as_str(), Some("n1"));
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
    fn xmpp_section_peers_and_federation() -> Result<()> {
        let mut s = spec(DeliverySpec::Stream, true);
        s.xmpp = Some(XmppSection {
            listen: SocketAddr::from(([127, 0, 0, 1], 1006)),
            tls_cert: PathBuf::from("/t/relay.pem"),
            tls_key: PathBuf::from("/t/relay.key"),
            tls_ca: PathBuf::from("/t/ca.pem"),
            peer_domain: "xmpp.load".into(),
            peer_address: Some(SocketAddr::from(([127, 0, 0, 1], 1007))),
        });
        let t: toml::Table = toml::from_str(&render_relay_config(&s))?;
        let x = t["xmpp"].as_table().ok_or_else(|| anyhow!("xmpp"))?;
        assert_eq!(
            keys(x),
            vec!["listen", "peers", "tls_ca", "tls_cert", "tls_key"]
        );
        assert_eq!(x["listen"].as_str(), Some("127.0.0.1:1006"));
        assert_eq!(x["tls_ca"].as_str(), Some("/t/ca.pem"));
        let peer = x["peers"][0].as_table().ok_or_else(|| anyhow!("peer"))?;
        assert_eq!(keys(peer), vec!["address", "auth", "domain"]);
        assert_eq!(peer["domain"].as_str(), Some("xmpp.load"));
        assert_eq!(peer["auth"].as_str(), Some("external"));
        assert_eq!(peer["address"].as_str(), Some("127.0.0.1:1007"));
        let domains = t["domains"].as_array().ok_or_else(|| anyhow!("domains"))?;
        assert_eq!(domains.len(), 4);
        let xd = domains[0].as_table().ok_or_else(|| anyhow!("domain"))?;
        assert_eq!(keys(xd), vec!["name", "platform"]);
        assert_eq!(xd["platform"].as_str(), Some("xmpp"));
        let fed = t["federation"]
            .as_array()
            .ok_or_else(|| anyhow!("federation"))?;
        assert_eq!(
            fed.len(),
            3 + 3,
            "every pair of 3 domains, and each with xmpp.load"
        );
        assert_eq!(
            fed[5]["between"].as_array().and_then(|a| a[1].as_str()),
            Some("xmpp.load")
        );
        Ok(())
    }

    #[test]
    fn xmpp_certificates_name_the_domains() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let names = vec![
            "d0.loadtest.example".to_owned(),
            "d1.loadtest.example".to_owned(),
        ];
        let c = issue_xmpp_certs(dir.path(), &names, "xmpp.load")?;
        for p in [
            &c.ca,
            &c.relay_cert,
            &c.relay_key,
            &c.peer_cert,
            &c.peer_key,
        ] {
            assert!(
                std::fs::read_to_string(p)?.starts_with("-----BEGIN"),
                "{}",
                p.display()
            );
        }
        // Both serve as TLS identities.
        crate::xmpp::server_tls(&c.relay_cert, &c.relay_key)?;
        crate::xmpp::client_tls(Some(&c.ca), &c.peer_cert, &c.peer_key)?;
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
    fn static_cluster_section_has_exactly_the_known_keys() -> Result<()> {
        let mut s = spec(DeliverySpec::Stream, false);
        s.cluster = ClusterSection::Static {
            grpc_listen: Some(SocketAddr::from(([127, 0, 0, 1], 1004))),
        };
        let t: toml::Table = toml::from_str(&render_relay_config(&s))?;
        assert_eq!(
            keys(&t),
            vec![
                "admin",
                "cluster",
                "domains",
                "federation",
                "http",
                "node_id",
                "store",
                "telemetry"
            ]
        );
        let c = t["cluster"].as_table().ok_or_else(|| anyhow!("cluster"))?;
        assert_eq!(keys(c), vec!["grpc_listen", "membership"]);
        assert_eq!(c["membership"].as_str(), Some("static"));
        assert_eq!(c["grpc_listen"].as_str(), Some("127.0.0.1:1004"));

        s.cluster = ClusterSection::Static { grpc_listen: None };
        let t: toml::Table = toml::from_str(&render_relay_config(&s))?;
        let c = t["cluster"].as_table().ok_or_else(|| anyhow!("cluster"))?;
        assert_eq!(keys(c), vec!["membership"]);
        Ok(())
    }

    #[test]
    fn etcd_cluster_section_has_exactly_the_known_keys() -> Result<()> {
        let mut s = spec(DeliverySpec::Stream, true);
        s.cluster = ClusterSection::Etcd {
            name: "loadtest-ab\"c".into(),
            etcd_endpoints: vec!["http://127.0.0.1:1005".into()],
            lease_ttl_secs: 3,
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 1004)),
        };
        let t: toml::Table = toml::from_str(&render_relay_config(&s))?;
        assert!(keys(&t).contains(&"cluster"));
        let c = t["cluster"].as_table().ok_or_else(|| anyhow!("cluster"))?;
        assert_eq!(
            keys(c),
            vec![
                "etcd_endpoints",
                "grpc_listen",
                "lease_ttl_secs",
                "membership",
                "name"
            ]
        );
        assert_eq!(c["membership"].as_str(), Some("etcd"));
        assert_eq!(c["name"].as_str(), Some("loadtest-ab\"c"));
        assert_eq!(
            c["etcd_endpoints"]
                .as_array()
                .map(|a| a.iter().filter_map(|e| e.as_str()).collect::<Vec<_>>()),
            Some(vec!["http://127.0.0.1:1005"])
        );
        assert_eq!(c["lease_ttl_secs"].as_integer(), Some(3));
        assert_eq!(c["grpc_listen"].as_str(), Some("127.0.0.1:1004"));
        assert_eq!(t["store"]["backend"].as_str(), Some("redis"));
        Ok(())
    }

    #[test]
    fn no_cluster_section_without_cluster_mode() -> Result<()> {
        let t: toml::Table =
            toml::from_str(&render_relay_config(&spec(DeliverySpec::Stream, true)))?;
        assert!(!t.contains_key("cluster"));
        assert_eq!(ClusterSection::default(), ClusterSection::None);
        assert_eq!(ClusterSection::None.grpc_listen(), None);
        Ok(())
    }

    fn opts(store: StoreKind, nodes: usize, cluster: ClusterMode) -> EmbeddedOptions {
        EmbeddedOptions {
            store,
            nodes,
            cluster,
            ..EmbeddedOptions::default()
        }
    }

    fn refusal(o: &EmbeddedOptions) -> String {
        validate_options(o)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn options_a_cluster_cannot_run_are_refused() {
        let etcd = ClusterMode::Etcd { lease_ttl_secs: 3 };
        assert!(validate_options(&EmbeddedOptions::default()).is_ok());
        assert!(validate_options(&opts(StoreKind::Redis, 3, etcd)).is_ok());
        assert!(validate_options(&opts(StoreKind::Memory, 1, ClusterMode::Static)).is_ok());
        assert!(refusal(&opts(StoreKind::Memory, 2, etcd)).contains("Redis store"));
        assert!(refusal(&opts(StoreKind::Memory, 1, etcd)).contains("Redis store"));
        assert!(refusal(&opts(StoreKind::Redis, 2, ClusterMode::None)).contains("etcd"));
        assert!(refusal(&opts(StoreKind::Redis, 2, ClusterMode::Static)).contains("etcd"));
        assert!(refusal(&opts(StoreKind::Redis, 0, ClusterMode::None)).contains("at least one"));
        assert!(
            refusal(&opts(
                StoreKind::Redis,
                2,
                ClusterMode::Etcd { lease_ttl_secs: 1 }
            ))
            .contains("at least 2")
        );
    }

    #[test]
    fn defaults_are_one_plain_node() {
        let o = EmbeddedOptions::default();
        assert_eq!(o.nodes, 1);
        assert_eq!(o.cluster, ClusterMode::None);
        assert!(o.etcd_bin.is_none() && o.node_env.is_empty());
        assert_eq!(ClusterMode::default(), ClusterMode::None);
    }

    #[test]
    fn cluster_mode_serializes_with_its_membership() -> Result<()> {
        assert_eq!(
            serde_json::to_value(ClusterMode::Etcd { lease_ttl_secs: 3 })?,
            serde_json::json!({"membership": "etcd", "lease_ttl_secs": 3})
        );
        assert_eq!(
            serde_json::to_value(ClusterMode::Static)?,
            serde_json::json!({"membership": "static"})
        );
        assert_eq!(
            serde_json::to_value(ClusterMode::None)?,
            serde_json::json!({"membership": "none"})
        );
        Ok(())
    }

    #[test]
    fn store_kind_reads_and_writes_lowercase() -> Result<()> {
        assert_eq!(
            serde_json::from_str::<StoreKind>("\"memory\"")?,
            StoreKind::Memory
        );
        assert_eq!(serde_json::to_string(&StoreKind::Redis)?, "\"redis\"");
        Ok(())
    }

    #[test]
    fn member_ids_are_sorted_node_ids() {
        let v = serde_json::json!({
            "node_id": "n1",
            "members": [{"node_id": "n3"}, {"node_id": "n1"}, {"grpc_addr": "x"}],
        });
        assert_eq!(member_ids(&v), vec!["n1", "n3"]);
        assert!(member_ids(&serde_json::json!({})).is_empty());
    }

    #[test]
    fn missing_etcd_bin_is_reported() {
        let e = find_etcd_bin(Some(Path::new("/nonexistent/etcd")));
        assert!(e.is_err());
    }

    #[test]
    fn random_names_differ() -> Result<()> {
        let a = random_hex(6)?;
        assert_eq!(a.len(), 12);
        assert_ne!(a, random_hex(6)?);
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
