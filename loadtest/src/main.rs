//! The `relay-loadtest` command line. All logic lives in the library; this file parses flags,
//! prints, and maps outcomes to exit codes (0 ok, 1 contract failed, nothing accepted or no
//! passing rate, 2 error or interrupted).
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// The harness shares the machine with the relay: a lean allocator leaves it more CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use relay_loadtest::plan::{DomainSpec, domains_from_relay_config, parse_domain_flag};
use relay_loadtest::receiver::ReceiveMode;
use relay_loadtest::report::{compare, compare_text, summary_text};
use relay_loadtest::runner::{
    DeploymentSpec, Faults, FindMaxOptions, RunOptions, XmppEmbeddedSpec, XmppTargetSpec,
    default_out_dir, find_max, run_and_report,
};
use relay_loadtest::scenario::{Protocol, ScenarioKind, Shape, XMPP_DOMAIN, parse_duration};
use relay_loadtest::system::{ClusterMode, StoreKind};
use relay_loadtest::tls::TlsFiles;
use serde::Deserialize;

#[derive(Debug, Parser)]
#[command(
    name = "relay-loadtest",
    version,
    about = "Load-test harness for fedrelay"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a scenario once and write result.json, SVG plots and a summary.
    Run {
        /// The scenario to run (or `scenario = "..."` in --file).
        #[arg(value_enum)]
        scenario: Option<ScenarioKind>,
        #[command(flatten)]
        args: RunArgs,
    },
    /// Compare two result.json files: each key metric of A and B and the ratio B/A.
    Compare { a: PathBuf, b: PathBuf },
    /// Step the rate up (from --rate, x --step-factor per step, each step --duration long)
    /// against one system; report the highest rate whose p99 stayed within --p99-ms with no
    /// loss, no send errors and the contract intact.
    FindMax {
        /// The end-to-end p99 target in milliseconds.
        #[arg(long)]
        p99_ms: f64,
        /// The scenario to step (default: the --file's, else one-to-one).
        #[arg(long, value_enum)]
        scenario: Option<ScenarioKind>,
        /// Rate multiplier per step.
        #[arg(long, default_value_t = 1.25)]
        step_factor: f64,
        /// At most this many steps.
        #[arg(long, default_value_t = 20)]
        max_steps: usize,
        /// Stop before exceeding this rate.
        #[arg(long)]
        max_rate: Option<f64>,
        /// Extra attempts at a rate that failed once before giving up (short runs are noisy).
        #[arg(long, default_value_t = 1)]
        retries: usize,
        #[command(flatten)]
        args: RunArgs,
    },
}

fn dur(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| format!("{e:#}"))
}

/// Flags shared by `run` and `find-max`. Every one may also come from a scenario file
/// (`--file`, TOML, the same names with `_` for `-`); a flag given on the command line wins.
#[derive(Debug, Args, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RunArgs {
    /// A scenario file: TOML with `scenario = "fan-out"` and any of these options.
    #[arg(long)]
    #[serde(skip)]
    file: Option<PathBuf>,
    /// How to send: signed events on the HTTP edge, envelopes straight into the session
    /// service over gRPC (fan-out: grpc only; presence-storm: http only), or XMPP stanzas from
    /// a remote domain's users over server-to-server streams (one-to-one only).
    #[arg(long, value_enum)]
    protocol: Option<Protocol>,
    /// --protocol xmpp: server-to-server streams in all (default 4), rounded up to a multiple
    /// of the receiving domains (a stream carries stanzas to one domain); each sender always
    /// uses the same one.
    #[arg(long)]
    xmpp_connections: Option<usize>,
    /// --protocol xmpp: the remote XMPP domain whose users send (default xmpp.load; with
    /// --target, an XMPP peer of the deployment that authenticates with SASL EXTERNAL).
    #[arg(long)]
    xmpp_domain: Option<String>,
    /// With --target and --protocol xmpp: a node's XMPP s2s listener, host:port (repeatable).
    #[arg(long)]
    xmpp_addr: Vec<String>,
    /// With --target and --protocol xmpp: the remote domain's certificate (PEM), presented for
    /// SASL EXTERNAL (and by --xmpp-listen).
    #[arg(long)]
    xmpp_cert: Option<PathBuf>,
    /// With --xmpp-cert: its key (PEM).
    #[arg(long)]
    xmpp_key: Option<PathBuf>,
    /// With --target and --protocol xmpp: listen here as the remote domain for the stanza
    /// errors the relay sends back (its [[xmpp.peers]] address must point here); without it,
    /// refused stanzas show up as lost.
    #[arg(long)]
    xmpp_listen: Option<SocketAddr>,
    /// 1:1 scenarios: simulated users (pairs of them chat, so users/2 sessions; default 1000).
    #[arg(long)]
    users: Option<usize>,
    /// fan-out: channels, one sender each (default 1).
    #[arg(long)]
    channels: Option<usize>,
    /// fan-out: members of every channel, spread over the domains (default 1000).
    #[arg(long)]
    members: Option<usize>,
    /// presence-storm: users who flap their presence (default 100).
    #[arg(long)]
    publishers: Option<usize>,
    /// presence-storm: followers of every publisher (default 100).
    #[arg(long)]
    subscribers: Option<usize>,
    /// HTTP-edge domains d0.loadtest.example... (embedded, default 4); with --target, use the
    /// first N domains given (default all).
    #[arg(long)]
    domains: Option<usize>,
    /// Offered load in events per second, open loop (run: default 2000, fan-out 20,
    /// presence-storm 100, soak 500; find-max: the starting rate, default 500).
    #[arg(long)]
    rate: Option<f64>,
    /// Measured duration after the warmup, e.g. 30s, 2m (run: default 20s, soak 10m;
    /// find-max: per step, default 8s).
    #[arg(long, value_parser = dur)]
    #[serde(default, deserialize_with = "de_dur")]
    duration: Option<Duration>,
    /// Warmup before the measured window; sent and checked, but excluded from statistics
    /// (default 2s).
    #[arg(long, value_parser = dur)]
    #[serde(default, deserialize_with = "de_dur")]
    warmup: Option<Duration>,
    /// Cap on requests in flight; a request delayed by the cap still counts latency from its
    /// intended send time (default 4096).
    #[arg(long)]
    max_inflight: Option<usize>,
    /// How long to wait, after the last send answered, for accepted events to arrive before
    /// counting them lost (default 10s).
    #[arg(long, value_parser = dur)]
    #[serde(default, deserialize_with = "de_dur")]
    drain_timeout: Option<Duration>,
    /// Timeout of one send (default 10s).
    #[arg(long, value_parser = dur)]
    #[serde(default, deserialize_with = "de_dur")]
    request_timeout: Option<Duration>,
    /// Retry a send that failed transiently (connection refused, 503, a closed stream) on the
    /// next node for this long (default 0s, or 30s with fault injection).
    #[arg(long, value_parser = dur)]
    #[serde(default, deserialize_with = "de_dur")]
    retry_for: Option<Duration>,
    /// How the harness receives: SSE GET /v1/stream per domain, or a local webhook sink
    /// (default stream).
    #[arg(long, value_enum)]
    receive: Option<ReceiveMode>,
    /// Embedded only: relay nodes (default 1). More than one runs a cluster: etcd membership
    /// and the Redis store.
    #[arg(long)]
    nodes: Option<usize>,
    /// Embedded only: membership of the nodes (default: etcd with more than one node or with
    /// fault injection, else static). `etcd` with one node makes 1-node and 3-node runs
    /// comparable.
    #[arg(long, value_enum)]
    membership: Option<MembershipArg>,
    /// Embedded only: the lease TTL of etcd membership (how soon a killed node's sessions
    /// move; default 5s).
    #[arg(long, value_parser = dur)]
    #[serde(default, deserialize_with = "de_dur")]
    lease_ttl: Option<Duration>,
    /// Embedded only: SIGKILL the newest node this long after sending starts.
    #[arg(long, value_parser = dur)]
    #[serde(default, deserialize_with = "de_dur")]
    kill_node_after: Option<Duration>,
    /// Embedded only: start one more node this long after sending starts.
    #[arg(long, value_parser = dur)]
    #[serde(default, deserialize_with = "de_dur")]
    add_node_after: Option<Duration>,
    /// Embedded only: an environment override for every node, KEY=VALUE (repeatable), e.g.
    /// FEDRELAY_RUNTIME__WORKER_THREADS=1.
    #[arg(long = "node-env")]
    node_env: Vec<String>,
    /// Embedded only: the relay's store (default redis, started on a free port).
    #[arg(long, value_enum)]
    store: Option<StoreKind>,
    /// Embedded only: the relay-node binary (default: next to this binary, else PATH).
    #[arg(long)]
    relay_bin: Option<PathBuf>,
    /// Embedded only: the redis-server binary (default: PATH).
    #[arg(long)]
    redis_bin: Option<PathBuf>,
    /// Embedded only: the etcd binary (default: PATH, /usr/bin/etcd).
    #[arg(long)]
    etcd_bin: Option<PathBuf>,
    /// Drive an existing deployment's HTTP edge (http://host:port) instead of starting one;
    /// repeat it for several nodes (sends go round robin, and fail over).
    #[arg(long)]
    target: Vec<String>,
    /// With --target and --protocol grpc: a node's cluster gRPC listener (http://host:7443);
    /// repeatable.
    #[arg(long)]
    grpc_target: Vec<String>,
    /// With --target: PEM CA certificates to trust for https:// targets (besides the system's),
    /// for https:// gRPC targets, and for the XMPP edge's certificate (--protocol xmpp).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// With --grpc-target https://…: the client certificate (PEM) for the cluster's mTLS.
    #[arg(long)]
    grpc_tls_cert: Option<PathBuf>,
    /// With --grpc-tls-cert: its key (PEM).
    #[arg(long)]
    grpc_tls_key: Option<PathBuf>,
    /// The name in the gRPC servers' certificates (the cluster's `tls_server_name`), when it is
    /// not the target's host.
    #[arg(long)]
    grpc_tls_server_name: Option<String>,
    /// With --target: its admin listener (http://host:port), polled for /readyz first.
    #[arg(long)]
    admin: Option<String>,
    /// With --target: the deployment's relay config file; its [[domains]] with
    /// platform = "http" (name, secret or secret_file) are the domains the harness plays.
    #[arg(long)]
    config_file: Option<PathBuf>,
    /// With --target: a domain to play, NAME=SECRET (repeatable; instead of --config-file).
    #[arg(long = "domain")]
    domain: Vec<String>,
    /// With --target and --receive webhook: where the sink listens; the relay's webhook_url
    /// for each domain must be http://ADDR/hook.
    #[arg(long)]
    webhook_listen: Option<SocketAddr>,
    /// Deadline for redis, etcd, the relays' /readyz and the SSE streams to come up (default
    /// 30s).
    #[arg(long, value_parser = dur)]
    #[serde(default, deserialize_with = "de_dur")]
    ready_timeout: Option<Duration>,
    /// Output directory (default loadtest-results/<scenario>-<UTC timestamp>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    #[serde(default)]
    quiet: bool,
    /// In a scenario file: the scenario to run.
    #[arg(skip)]
    scenario: Option<ScenarioKind>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
enum MembershipArg {
    Static,
    Etcd,
}

fn de_dur<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s: Option<String> = Option::deserialize(d)?;
    s.map(|s| parse_duration(&s).map_err(serde::de::Error::custom))
        .transpose()
}

impl RunArgs {
    /// Fills what the command line left out from `--file`.
    fn with_file(mut self) -> Result<Self> {
        let Some(path) = self.file.clone() else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let f: RunArgs = toml::from_str(&text)
            .with_context(|| format!("parsing scenario file {}", path.display()))?;
        self.protocol = self.protocol.or(f.protocol);
        self.xmpp_connections = self.xmpp_connections.or(f.xmpp_connections);
        self.xmpp_domain = self.xmpp_domain.or(f.xmpp_domain);
        if self.xmpp_addr.is_empty() {
            self.xmpp_addr = f.xmpp_addr;
        }
        self.xmpp_cert = self.xmpp_cert.or(f.xmpp_cert);
        self.xmpp_key = self.xmpp_key.or(f.xmpp_key);
        self.xmpp_listen = self.xmpp_listen.or(f.xmpp_listen);
        self.users = self.users.or(f.users);
        self.channels = self.channels.or(f.channels);
        self.members = self.members.or(f.members);
        self.publishers = self.publishers.or(f.publishers);
        self.subscribers = self.subscribers.or(f.subscribers);
        self.domains = self.domains.or(f.domains);
        self.rate = self.rate.or(f.rate);
        self.duration = self.duration.or(f.duration);
        self.warmup = self.warmup.or(f.warmup);
        self.max_inflight = self.max_inflight.or(f.max_inflight);
        self.drain_timeout = self.drain_timeout.or(f.drain_timeout);
        self.request_timeout = self.request_timeout.or(f.request_timeout);
        self.retry_for = self.retry_for.or(f.retry_for);
        self.receive = self.receive.or(f.receive);
        self.nodes = self.nodes.or(f.nodes);
        self.membership = self.membership.or(f.membership);
        self.lease_ttl = self.lease_ttl.or(f.lease_ttl);
        self.kill_node_after = self.kill_node_after.or(f.kill_node_after);
        self.add_node_after = self.add_node_after.or(f.add_node_after);
        if self.node_env.is_empty() {
            self.node_env = f.node_env;
        }
        self.store = self.store.or(f.store);
        self.relay_bin = self.relay_bin.or(f.relay_bin);
        self.redis_bin = self.redis_bin.or(f.redis_bin);
        self.etcd_bin = self.etcd_bin.or(f.etcd_bin);
        if self.target.is_empty() {
            self.target = f.target;
        }
        if self.grpc_target.is_empty() {
            self.grpc_target = f.grpc_target;
        }
        self.admin = self.admin.or(f.admin);
        self.tls_ca = self.tls_ca.or(f.tls_ca);
        self.grpc_tls_cert = self.grpc_tls_cert.or(f.grpc_tls_cert);
        self.grpc_tls_key = self.grpc_tls_key.or(f.grpc_tls_key);
        self.grpc_tls_server_name = self.grpc_tls_server_name.or(f.grpc_tls_server_name);
        self.config_file = self.config_file.or(f.config_file);
        if self.domain.is_empty() {
            self.domain = f.domain;
        }
        self.webhook_listen = self.webhook_listen.or(f.webhook_listen);
        self.ready_timeout = self.ready_timeout.or(f.ready_timeout);
        self.out = self.out.or(f.out);
        self.quiet |= f.quiet;
        self.scenario = f.scenario;
        Ok(self)
    }

    fn faults(&self) -> Faults {
        Faults {
            kill_node_after: self.kill_node_after,
            add_node_after: self.add_node_after,
        }
    }

    fn ready_timeout(&self) -> Duration {
        self.ready_timeout.unwrap_or(Duration::from_secs(30))
    }

    fn receive(&self) -> ReceiveMode {
        self.receive.unwrap_or(ReceiveMode::Stream)
    }

    fn deployment(&self, protocol: Protocol) -> Result<DeploymentSpec> {
        let xmpp = protocol == Protocol::Xmpp;
        if !xmpp
            && (self.xmpp_connections.is_some()
                || self.xmpp_domain.is_some()
                || !self.xmpp_addr.is_empty()
                || self.xmpp_cert.is_some()
                || self.xmpp_key.is_some()
                || self.xmpp_listen.is_some())
        {
            bail!("--xmpp-* options go with --protocol xmpp");
        }
        if xmpp && self.faults().any() {
            bail!("fault injection is not supported with --protocol xmpp");
        }
        if self.xmpp_connections == Some(0) {
            bail!("--xmpp-connections must be at least 1");
        }
        let xmpp_domain = self
            .xmpp_domain
            .clone()
            .unwrap_or_else(|| XMPP_DOMAIN.to_owned());
        let xmpp_connections = self.xmpp_connections.unwrap_or(4);
        if self.target.is_empty() {
            if !self.xmpp_addr.is_empty()
                || self.xmpp_cert.is_some()
                || self.xmpp_key.is_some()
                || self.xmpp_listen.is_some()
            {
                bail!("--xmpp-addr, --xmpp-cert, --xmpp-key and --xmpp-listen go with --target");
            }
            if !self.grpc_target.is_empty()
                || self.admin.is_some()
                || self.tls_ca.is_some()
                || self.grpc_tls_cert.is_some()
                || self.grpc_tls_key.is_some()
                || self.grpc_tls_server_name.is_some()
                || self.config_file.is_some()
                || !self.domain.is_empty()
                || self.webhook_listen.is_some()
            {
                bail!(
                    "--grpc-target, --admin, --tls-ca, --grpc-tls-*, --config-file, --domain and --webhook-listen go with --target"
                );
            }
            let nodes = self.nodes.unwrap_or(1);
            if nodes == 0 {
                bail!("--nodes must be at least 1");
            }
            let etcd = match self.membership {
                Some(MembershipArg::Etcd) => true,
                Some(MembershipArg::Static) => {
                    if nodes > 1 || self.faults().any() {
                        bail!("more than one node, and fault injection, need --membership etcd");
                    }
                    false
                }
                None => nodes > 1 || self.faults().any(),
            };
            let cluster = if etcd {
                ClusterMode::Etcd {
                    lease_ttl_secs: self.lease_ttl.map_or(5, |d| d.as_secs()),
                }
            } else if protocol == Protocol::Grpc {
                ClusterMode::Static
            } else {
                ClusterMode::None
            };
            let node_env = self
                .node_env
                .iter()
                .map(|kv| match kv.split_once('=') {
                    Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
                    _ => bail!("--node-env takes KEY=VALUE (got {kv:?})"),
                })
                .collect::<Result<Vec<_>>>()?;
            return Ok(DeploymentSpec::Embedded {
                store: self.store.unwrap_or(StoreKind::Redis),
                relay_bin: self.relay_bin.clone(),
                redis_bin: self.redis_bin.clone(),
                etcd_bin: self.etcd_bin.clone(),
                domains: self.domains.unwrap_or(4),
                nodes,
                cluster,
                node_env,
                xmpp: xmpp.then(|| XmppEmbeddedSpec {
                    domain: xmpp_domain.clone(),
                    connections: xmpp_connections,
                }),
            });
        }
        if self.store.is_some()
            || self.relay_bin.is_some()
            || self.redis_bin.is_some()
            || self.etcd_bin.is_some()
            || self.nodes.is_some()
            || self.membership.is_some()
            || self.lease_ttl.is_some()
            || !self.node_env.is_empty()
            || self.faults().any()
        {
            bail!(
                "--store, --relay-bin, --redis-bin, --etcd-bin, --nodes, --membership, --lease-ttl, \
                 --node-env and fault injection apply to the embedded system only, not --target"
            );
        }
        if protocol == Protocol::Grpc && self.grpc_target.is_empty() {
            bail!("--protocol grpc with --target needs --grpc-target http://NODE:7443");
        }
        let xmpp = if xmpp {
            let (Some(cert), Some(key)) = (&self.xmpp_cert, &self.xmpp_key) else {
                bail!(
                    "--protocol xmpp with --target needs --xmpp-cert and --xmpp-key (the \
                     certificate of --xmpp-domain, for SASL EXTERNAL)"
                );
            };
            if self.xmpp_addr.is_empty() {
                bail!("--protocol xmpp with --target needs --xmpp-addr HOST:5269");
            }
            Some(Box::new(XmppTargetSpec {
                addrs: self.xmpp_addr.clone(),
                domain: xmpp_domain,
                cert: cert.clone(),
                key: key.clone(),
                ca: self.tls_ca.clone(),
                listen: self.xmpp_listen,
                connections: xmpp_connections,
            }))
        } else {
            None
        };
        let mut domains: Vec<DomainSpec> = match &self.config_file {
            Some(p) => domains_from_relay_config(p)?,
            None => Vec::new(),
        };
        for d in &self.domain {
            domains.push(parse_domain_flag(d)?);
        }
        if domains.is_empty() {
            bail!(
                "--target needs the domains to play: --config-file RELAY_CONFIG or --domain NAME=SECRET (twice or more)"
            );
        }
        if let Some(n) = self.domains {
            if n > domains.len() {
                bail!(
                    "--domains {n} but only {} domains were given",
                    domains.len()
                );
            }
            domains.truncate(n);
        }
        Ok(DeploymentSpec::Target {
            targets: self.target.clone(),
            grpc_targets: self.grpc_target.clone(),
            admin: self.admin.clone(),
            domains,
            webhook_listen: self.webhook_listen,
            tls: TlsFiles {
                ca: self.tls_ca.clone(),
                cert: self.grpc_tls_cert.clone(),
                key: self.grpc_tls_key.clone(),
                server_name: self.grpc_tls_server_name.clone(),
            },
            xmpp,
        })
    }

    fn options(&self, scenario: ScenarioKind, find_max: bool) -> RunOptions {
        let defaults = Shape::default();
        let (rate, duration) = match (find_max, scenario) {
            (true, _) => (500.0, Duration::from_secs(8)),
            (false, ScenarioKind::FanOut) => (20.0, Duration::from_secs(20)),
            (false, ScenarioKind::PresenceStorm) => (100.0, Duration::from_secs(20)),
            (false, ScenarioKind::Soak) => (500.0, Duration::from_secs(600)),
            (false, _) => (2000.0, Duration::from_secs(20)),
        };
        let faults = self.faults();
        RunOptions {
            scenario,
            protocol: self.protocol.unwrap_or(scenario.default_protocol()),
            shape: Shape {
                domains: self.domains.unwrap_or(defaults.domains),
                users: self.users.unwrap_or(defaults.users),
                channels: self.channels.unwrap_or(defaults.channels),
                members: self.members.unwrap_or(defaults.members),
                publishers: self.publishers.unwrap_or(defaults.publishers),
                subscribers: self.subscribers.unwrap_or(defaults.subscribers),
            },
            rate: self.rate.unwrap_or(rate),
            duration: self.duration.unwrap_or(duration),
            warmup: self.warmup.unwrap_or(Duration::from_secs(2)),
            max_inflight: self.max_inflight.unwrap_or(4096),
            drain_timeout: self.drain_timeout.unwrap_or(Duration::from_secs(10)),
            request_timeout: self.request_timeout.unwrap_or(Duration::from_secs(10)),
            retry_for: self.retry_for.unwrap_or(if faults.any() {
                Duration::from_secs(30)
            } else {
                Duration::ZERO
            }),
            faults,
            quiet: self.quiet,
        }
    }
}

/// Fault injection that cannot happen is refused before anything starts.
fn check_faults(args: &RunArgs, opts: &RunOptions) -> Result<()> {
    let end = opts.warmup + opts.duration;
    for (flag, at) in [
        ("--kill-node-after", opts.faults.kill_node_after),
        ("--add-node-after", opts.faults.add_node_after),
    ] {
        if let Some(at) = at
            && at >= end
        {
            bail!("{flag} {at:?} is not before the end of sending (warmup + duration = {end:?})");
        }
    }
    let nodes = args.nodes.unwrap_or(1);
    if opts.faults.kill_node_after.is_some() {
        // The first node is never killed (the receivers read from it); a node added before the
        // kill counts.
        let added_first = matches!(
            (opts.faults.add_node_after, opts.faults.kill_node_after),
            (Some(a), Some(k)) if a < k
        );
        if nodes + usize::from(added_first) < 2 {
            bail!("--kill-node-after needs at least 2 nodes (--nodes 2 or more)");
        }
    }
    Ok(())
}

fn read_json(p: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
}

async fn cli_main(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Run { scenario, args } => {
            let args = args.with_file()?;
            let Some(scenario) = scenario.or(args.scenario) else {
                bail!(
                    "name the scenario (one-to-one, fan-out, presence-storm, mixed, soak) or give it in --file"
                );
            };
            let opts = args.options(scenario, false);
            let spec = args.deployment(opts.protocol)?;
            check_faults(&args, &opts)?;
            let out = args
                .out
                .clone()
                .unwrap_or_else(|| default_out_dir(scenario.name()));
            let r = run_and_report(spec, args.receive(), &opts, &out, args.ready_timeout()).await?;
            println!("{}", summary_text(&r));
            println!("results in {}", out.display());
            if r.counts.accepted == 0 {
                eprintln!("relay-loadtest: the relay accepted nothing (see the send errors)");
                return Ok(ExitCode::from(1));
            }
            Ok(if r.passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Cmd::Compare { a, b } => {
            let rows = compare(&read_json(&a)?, &read_json(&b)?);
            print!(
                "{}",
                compare_text(&a.display().to_string(), &b.display().to_string(), &rows)
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::FindMax {
            p99_ms,
            scenario,
            step_factor,
            max_steps,
            max_rate,
            retries,
            args,
        } => {
            let args = args.with_file()?;
            let scenario = scenario.or(args.scenario).unwrap_or(ScenarioKind::OneToOne);
            if args.faults().any() {
                bail!(
                    "find-max runs every step on the same system: fault injection belongs to `run`"
                );
            }
            let opts = args.options(scenario, true);
            let spec = args.deployment(opts.protocol)?;
            let fm = FindMaxOptions {
                p99_ms,
                start_rate: opts.rate,
                factor: step_factor,
                max_steps,
                max_rate,
                retries,
            };
            let out = args
                .out
                .clone()
                .unwrap_or_else(|| default_out_dir(&format!("find-max-{}", scenario.name())));
            println!(
                "{:>10}  {:>10}  {:>10}  {:>12}  result",
                "rate", "e2e p99", "POST p99", "received/s"
            );
            let res = find_max(
                spec,
                args.receive(),
                &opts,
                &fm,
                &out,
                args.ready_timeout(),
                |s| {
                    println!(
                        "{:>10.0}  {:>10.2}  {:>10.2}  {:>12.1}  {}",
                        s.rate, s.e2e_p99_ms, s.post_p99_ms, s.received_per_s, s.reason
                    );
                },
            )
            .await?;
            match res.best_rate {
                Some(r) => {
                    println!("\nhighest rate with p99 <= {p99_ms} ms and no loss: {r} msg/s")
                }
                None => println!("\nno rate met p99 <= {p99_ms} ms with no loss"),
            }
            if res.steps.last().is_some_and(|s| s.passed) {
                println!(
                    "(the last step still passed: the search stopped at --max-steps or --max-rate, not at saturation)"
                );
            }
            println!("results in {}", out.display());
            Ok(if res.best_rate.is_some() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // Dropping the run future on Ctrl-C or SIGTERM (a CI timeout, `kill`) drops the embedded
    // system, which kills its children.
    let outcome = tokio::select! {
        r = cli_main(cli) => r,
        _ = interrupted() => Err(anyhow::anyhow!("interrupted")),
    };
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("relay-loadtest: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Ctrl-C or SIGTERM.
async fn interrupted() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
