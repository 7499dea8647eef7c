//! Orchestration: bring up (or connect to) the system under test, run a scenario against it
//! (receivers, CPU sampling, progress, open-loop driver, drain), build the [`RunResult`], and
//! the `find-max` rate search.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::driver::{DriverOptions, SetupOptions, Targets, drive, post_all};
use crate::live::Shared;
use crate::plan::{DomainSpec, Plan, random_hex};
use crate::receiver::{ReceiveMode, Receivers};
use crate::report::{
    Counts, CpuReport, FaultEvent, Latency, MemoryPoint, RunConfig, RunResult, Throughput,
    utc_stamp, write_all, write_json,
};
use crate::scenario::{Protocol, ScenarioKind, Schedule, Shape, domain_name};
use crate::sign::{unix_now_millis, unix_now_secs};
use crate::stats::{
    CpuTicks, MachineInfo, clock_ticks_per_sec, cpu_use, nofile_soft_limit, read_cpu,
    read_peak_rss_kb, read_rss_kb,
};
use crate::system::{
    ClusterMode, DeliverySpec, EmbeddedOptions, EmbeddedSystem, StoreKind, XmppEmbedded,
    admin_json, wait_ready,
};
use crate::tls::{ClientTls, TlsFiles};
use crate::xmpp::{XmppClient, XmppClientSpec, XmppSink, client_tls, server_tls};

/// The workload knobs of one run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub scenario: ScenarioKind,
    pub protocol: Protocol,
    /// Users, channels and members, publishers and subscribers (`shape.domains` is ignored:
    /// the deployment's domains count).
    pub shape: Shape,
    pub rate: f64,
    pub duration: Duration,
    pub warmup: Duration,
    pub max_inflight: usize,
    pub drain_timeout: Duration,
    pub request_timeout: Duration,
    /// How long a failed send is retried on other nodes (zero: never).
    pub retry_for: Duration,
    pub faults: Faults,
    pub quiet: bool,
}

/// Nodes to kill or add during a run (embedded only), counted from the start of sending.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// SIGKILL the newest node then.
    pub kill_node_after: Option<Duration>,
    /// Start one more node then.
    pub add_node_after: Option<Duration>,
}

impl Faults {
    pub fn any(&self) -> bool {
        self.kill_node_after.is_some() || self.add_node_after.is_some()
    }
}

/// `--protocol xmpp` on the embedded system: the remote domain the harness plays, and how
/// many streams it opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XmppEmbeddedSpec {
    pub domain: String,
    /// Streams in all, rounded up to a multiple of the receiving domains.
    pub connections: usize,
}

/// `--protocol xmpp` against an existing deployment: its XMPP listeners, the remote domain
/// the harness plays there (an XMPP peer with SASL EXTERNAL) and that domain's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XmppTargetSpec {
    /// `host:port` of each node's XMPP listener (`--xmpp-addr`).
    pub addrs: Vec<String>,
    pub domain: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA for the relay's certificate (`--tls-ca`; the system's roots otherwise).
    pub ca: Option<PathBuf>,
    /// Where the remote domain's listener accepts the relay's refusals (`--xmpp-listen`; the
    /// deployment's `[[xmpp.peers]] address` must point there).
    pub listen: Option<SocketAddr>,
    pub connections: usize,
}

/// Where the system under test comes from.
#[derive(Debug, Clone)]
pub enum DeploymentSpec {
    /// Start redis-server (unless memory), etcd (for a cluster) and relay-nodes here.
    Embedded {
        store: StoreKind,
        relay_bin: Option<PathBuf>,
        redis_bin: Option<PathBuf>,
        etcd_bin: Option<PathBuf>,
        domains: usize,
        nodes: usize,
        /// Serve the cluster gRPC listener (for `--protocol grpc`), and run etcd membership.
        cluster: ClusterMode,
        node_env: Vec<(String, String)>,
        /// Serve the XMPP edge and drive it (`--protocol xmpp`).
        xmpp: Option<XmppEmbeddedSpec>,
    },
    /// An existing deployment.
    Target {
        /// HTTP-edge base URLs (`http://host:port`), one per node or one load balancer.
        targets: Vec<String>,
        /// Cluster gRPC listeners (`http://host:port`), for `--protocol grpc`.
        grpc_targets: Vec<String>,
        admin: Option<String>,
        domains: Vec<DomainSpec>,
        /// Where the webhook sink listens (the relay's `webhook_url`s must point there).
        webhook_listen: Option<SocketAddr>,
        /// CA, client certificate and server name for `https://` targets.
        tls: TlsFiles,
        /// Its XMPP edge (`--protocol xmpp`).
        xmpp: Option<Box<XmppTargetSpec>>,
    },
}

/// A system under test with its receivers, alive for one or more runs.
#[derive(Debug)]
pub struct Deployment {
    // Field order matters: receivers and XMPP streams stop before the system is killed.
    receivers: Receivers,
    /// The XMPP streams (`--protocol xmpp`).
    pub xmpp: Option<Arc<XmppClient>>,
    /// The remote XMPP domain's listener for the relay's refusals.
    xmpp_sink: Option<XmppSink>,
    system: Option<EmbeddedSystem>,
    pub targets: Arc<Targets>,
    pub admin: Option<String>,
    pub domains: Vec<DomainSpec>,
    pub store: Option<StoreKind>,
    pub receive: ReceiveMode,
    pub tls: ClientTls,
}

impl Deployment {
    /// Starts or connects to the system and opens the receivers.
    pub async fn start(
        spec: DeploymentSpec,
        receive: ReceiveMode,
        log_dir: PathBuf,
        ready_timeout: Duration,
    ) -> Result<Self> {
        match spec {
            DeploymentSpec::Embedded {
                store,
                relay_bin,
                redis_bin,
                etcd_bin,
                domains,
                nodes,
                cluster,
                node_env,
                xmpp,
            } => {
                if domains < 2 {
                    bail!("--domains must be at least 2");
                }
                let domains = (0..domains)
                    .map(|i| {
                        Ok(DomainSpec {
                            name: domain_name(i),
                            secret: random_hex(32)?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let (receivers, delivery) = match receive {
                    ReceiveMode::Stream => (None, DeliverySpec::Stream),
                    ReceiveMode::Webhook => {
                        let (r, addr) =
                            Receivers::webhook(SocketAddr::from(([127, 0, 0, 1], 0)), &domains)
                                .await?;
                        (
                            Some(r),
                            DeliverySpec::Webhook {
                                url: format!("http://{addr}/hook"),
                            },
                        )
                    }
                };
                // The remote domain's listener is bound first: the nodes' configs name it.
                let sink_listener = match &xmpp {
                    Some(_) => Some(
                        tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
                            .await
                            .context("binding the XMPP listener of the remote domain")?,
                    ),
                    None => None,
                };
                let sink = sink_listener
                    .as_ref()
                    .map(|l| l.local_addr())
                    .transpose()
                    .context("the XMPP listener's address")?;
                let system = EmbeddedSystem::start(EmbeddedOptions {
                    store,
                    relay_bin,
                    redis_bin,
                    etcd_bin,
                    nodes,
                    cluster,
                    node_env,
                    domains: domains.clone(),
                    delivery,
                    log_dir,
                    ready_timeout,
                    xmpp: xmpp.as_ref().map(|x| XmppEmbedded {
                        domain: x.domain.clone(),
                        sink,
                    }),
                })
                .await?;
                let http = system.http_targets();
                let tls = ClientTls::load(&TlsFiles::default())?;
                let receivers = match receivers {
                    Some(r) => r,
                    // Streams read from the first node, which fault injection never kills.
                    None => Receivers::streams(&http[0], &domains, &tls)?,
                };
                receivers.wait_connected(ready_timeout).await?;
                let (xmpp_client, xmpp_sink) = match (&xmpp, system.xmpp_certs(), sink_listener) {
                    (Some(x), Some(certs), Some(listener)) => {
                        let sink = XmppSink::serve(
                            listener,
                            x.domain.clone(),
                            server_tls(&certs.peer_cert, &certs.peer_key)?,
                            receivers.router.clone(),
                        )?;
                        let client = XmppClient::new(XmppClientSpec {
                            domain: x.domain.clone(),
                            addrs: system.xmpp_targets(),
                            targets: domains.iter().map(|d| d.name.clone()).collect(),
                            connections: x.connections,
                            tls: client_tls(Some(&certs.ca), &certs.peer_cert, &certs.peer_key)?,
                        })?;
                        (Some(Arc::new(client)), Some(sink))
                    }
                    _ => (None, None),
                };
                Ok(Self {
                    receivers,
                    xmpp: xmpp_client,
                    xmpp_sink,
                    targets: Targets::new(http, system.grpc_targets()),
                    admin: Some(format!("http://{}", system.admin)),
                    system: Some(system),
                    domains,
                    store: Some(store),
                    receive,
                    tls,
                })
            }
            DeploymentSpec::Target {
                targets,
                grpc_targets,
                admin,
                domains,
                webhook_listen,
                tls,
                xmpp,
            } => {
                let tls = ClientTls::load(&tls)?;
                if domains.len() < 2 {
                    bail!(
                        "--target needs at least 2 HTTP-edge domains (from --config-file or --domain NAME=SECRET)"
                    );
                }
                let Some(first) = targets.first().cloned() else {
                    bail!("--target needs at least one URL");
                };
                if let Some(admin) = &admin {
                    wait_ready(admin, None, ready_timeout).await?;
                }
                let receivers = match receive {
                    ReceiveMode::Stream => Receivers::streams(&first, &domains, &tls)?,
                    ReceiveMode::Webhook => {
                        let Some(listen) = webhook_listen else {
                            bail!(
                                "--receive webhook with --target needs --webhook-listen ADDR \
                                 (the relay's webhook_url for each domain must point at \
                                 http://ADDR/hook)"
                            );
                        };
                        Receivers::webhook(listen, &domains).await?.0
                    }
                };
                receivers.wait_connected(ready_timeout).await?;
                let (xmpp_client, xmpp_sink) = match xmpp {
                    Some(x) => {
                        let sink = match x.listen {
                            Some(listen) => {
                                let l = tokio::net::TcpListener::bind(listen).await.with_context(
                                    || format!("binding the XMPP listener on {listen}"),
                                )?;
                                Some(XmppSink::serve(
                                    l,
                                    x.domain.clone(),
                                    server_tls(&x.cert, &x.key)?,
                                    receivers.router.clone(),
                                )?)
                            }
                            None => None,
                        };
                        let client = XmppClient::new(XmppClientSpec {
                            domain: x.domain.clone(),
                            addrs: x.addrs.clone(),
                            targets: domains.iter().map(|d| d.name.clone()).collect(),
                            connections: x.connections,
                            tls: client_tls(x.ca.as_deref(), &x.cert, &x.key)?,
                        })?;
                        (Some(Arc::new(client)), sink)
                    }
                    None => (None, None),
                };
                Ok(Self {
                    receivers,
                    xmpp: xmpp_client,
                    xmpp_sink,
                    system: None,
                    targets: Targets::new(targets, grpc_targets),
                    admin,
                    domains,
                    store: None,
                    receive,
                    tls,
                })
            }
        }
    }

    /// An error (with the log's end) if an embedded child died.
    pub fn check_alive(&mut self) -> Result<()> {
        match &mut self.system {
            Some(s) => s.check_alive(),
            None => Ok(()),
        }
    }

    /// Stanza errors the relay sent back to the remote XMPP domain's listener so far.
    pub fn xmpp_refusals(&self) -> u64 {
        self.xmpp_sink.as_ref().map_or(0, |s| {
            s.counters.errors.load(std::sync::atomic::Ordering::Relaxed)
        })
    }

    fn relay_pids(&self) -> Vec<u32> {
        self.system
            .as_ref()
            .map(|s| s.relay_pids())
            .unwrap_or_default()
    }
}

/// CPU used over the measured window: the relay nodes' (every node alive in it, sampled every
/// second so nodes killed or added count for the time they ran), Redis's and the harness's.
struct CpuWindow {
    relay_ticks: Option<u64>,
    redis: Option<(CpuTicks, CpuTicks)>,
    harness: Option<(CpuTicks, CpuTicks)>,
    wall: Duration,
}

/// Measures [`CpuWindow`] from `start` to `end`, following the node list as it changes.
fn sample_cpu(
    pids: Arc<std::sync::Mutex<Vec<u32>>>,
    redis: Option<u32>,
    start: Instant,
    end: Instant,
) -> tokio::task::JoinHandle<CpuWindow> {
    let read_all = |pids: &std::sync::Mutex<Vec<u32>>| -> HashMap<u32, CpuTicks> {
        let list = pids.lock().map(|p| p.clone()).unwrap_or_default();
        list.iter()
            .filter_map(|&p| read_cpu(Some(p)).ok().map(|t| (p, t)))
            .collect()
    };
    tokio::spawn(async move {
        tokio::time::sleep_until(start.into()).await;
        let began = Instant::now();
        let mut prev = read_all(&pids);
        let any_relay = !prev.is_empty();
        let redis_a = redis.and_then(|p| read_cpu(Some(p)).ok());
        let harness_a = read_cpu(None).ok();
        let mut relay_ticks = 0u64;
        loop {
            let next = (Instant::now() + Duration::from_secs(1)).min(end);
            tokio::time::sleep_until(next.into()).await;
            for (pid, now) in read_all(&pids) {
                if let Some(before) = prev.get(&pid) {
                    relay_ticks += now.total().saturating_sub(before.total());
                }
                // A node seen for the first time counts from here.
                prev.insert(pid, now);
            }
            if Instant::now() >= end {
                break;
            }
        }
        let redis_b = redis.and_then(|p| read_cpu(Some(p)).ok());
        let harness_b = read_cpu(None).ok();
        CpuWindow {
            relay_ticks: any_relay.then_some(relay_ticks),
            redis: redis_a.zip(redis_b),
            harness: harness_a.zip(harness_b),
            wall: began.elapsed(),
        }
    })
}

fn progress_bar(total: u64, quiet: bool) -> ProgressBar {
    let pb = ProgressBar::new(total);
    if quiet || !std::io::stderr().is_terminal() {
        pb.set_draw_target(ProgressDrawTarget::hidden());
    } else {
        pb.set_draw_target(ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} {msg}",
        ) {
            pb.set_style(style);
        }
    }
    pb
}

/// Sets up what the workload needs before it starts: presence followers.
async fn set_up(dep: &Deployment, plan: &Plan, opts: &RunOptions) -> Result<()> {
    let (requests, answers) = plan.presence_setup()?;
    if requests.is_empty() {
        return Ok(());
    }
    let setup = SetupOptions {
        targets: dep.targets.clone(),
        concurrency: opts.max_inflight.clamp(1, 64),
        request_timeout: opts.request_timeout,
        // Give the relay as long as the drain allows to take each one.
        retry_for: opts.drain_timeout.max(Duration::from_secs(5)),
        tls: dep.tls.clone(),
    };
    // Answers count only once their request is in: all requests first.
    post_all(&plan.domains, requests, &setup)
        .await
        .context("presence set-up: contact requests")?;
    post_all(&plan.domains, answers, &setup)
        .await
        .context("presence set-up: contact answers")?;
    Ok(())
}

/// Kills and adds nodes as `faults` says, while the driver runs; records what happened.
async fn inject_faults(
    system: Option<&mut EmbeddedSystem>,
    faults: Faults,
    t0: Instant,
    targets: &Targets,
    pids: &std::sync::Mutex<Vec<u32>>,
    ready_timeout: Duration,
) -> Result<Vec<FaultEvent>> {
    let mut events = Vec::new();
    if !faults.any() {
        return Ok(events);
    }
    let Some(system) = system else {
        bail!("--kill-node-after and --add-node-after apply to the embedded system only");
    };
    let mut plan: Vec<(Duration, &str)> = Vec::new();
    if let Some(d) = faults.kill_node_after {
        plan.push((d, "kill"));
    }
    if let Some(d) = faults.add_node_after {
        plan.push((d, "add"));
    }
    plan.sort();
    for (after, kind) in plan {
        tokio::time::sleep_until((t0 + after).into()).await;
        let at_ms = t0.elapsed().as_secs_f64() * 1e3;
        match kind {
            "kill" => {
                // Never the first node: the stream receivers read from it.
                let alive = system.alive_nodes();
                let Some(&victim) = alive.iter().rev().find(|&&i| i != 0) else {
                    bail!("--kill-node-after needs at least 2 nodes (--nodes)");
                };
                let id = system.nodes()[victim].id.clone();
                system.kill_node(victim)?;
                // Sends stop going to it, as behind a load balancer whose health check caught
                // it; sends in flight to it fail and are retried on the others. What remains
                // is the failover proper: sessions it owned answer 503 until its lease expires.
                targets.set(system.http_targets(), system.grpc_targets());
                if let Ok(mut p) = pids.lock() {
                    *p = system.relay_pids();
                }
                events.push(FaultEvent {
                    kind: "kill".into(),
                    node: id,
                    at_ms,
                    ready_after_ms: None,
                    recovered_after_ms: None,
                });
            }
            _ => {
                let (idx, took) = system.add_node(ready_timeout).await?;
                // Like a load balancer that adds a node once its readiness probe passes.
                targets.set(system.http_targets(), system.grpc_targets());
                if let Ok(mut p) = pids.lock() {
                    *p = system.relay_pids();
                }
                events.push(FaultEvent {
                    kind: "add".into(),
                    node: system.nodes()[idx].id.clone(),
                    at_ms,
                    ready_after_ms: Some(took.as_secs_f64() * 1e3),
                    recovered_after_ms: None,
                });
            }
        }
    }
    Ok(events)
}

/// For each kill: from the kill until the last send that first failed after it (and before
/// the next fault) was accepted again.
pub fn attribute_recoveries(faults: &mut [FaultEvent], recoveries: &[(u64, u64)]) {
    let starts: Vec<f64> = faults.iter().map(|f| f.at_ms).collect();
    for f in faults.iter_mut() {
        if f.kind != "kill" {
            continue;
        }
        let from = f.at_ms;
        let until = starts
            .iter()
            .copied()
            .filter(|&t| t > from)
            .fold(f64::INFINITY, f64::min);
        f.recovered_after_ms = recoveries
            .iter()
            .map(|&(first, done)| (first as f64 / 1e6, done as f64 / 1e6))
            .filter(|&(first, _)| first >= from && first < until)
            .map(|(_, done)| done - from)
            .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
    }
}

/// Samples the relay nodes' resident memory every second (and each node's peak) until
/// aborted, following the node list as it changes.
fn sample_memory(
    pids: Arc<std::sync::Mutex<Vec<u32>>>,
    t0: Instant,
    out: Arc<std::sync::Mutex<(Vec<MemoryPoint>, u64)>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let list = pids.lock().map(|p| p.clone()).unwrap_or_default();
            let kb: u64 = list.iter().filter_map(|&p| read_rss_kb(p)).sum();
            let peak = list.iter().filter_map(|&p| read_peak_rss_kb(p)).max();
            if let Ok(mut o) = out.lock() {
                o.0.push(MemoryPoint {
                    t_s: t0.elapsed().as_secs_f64(),
                    relay_rss_kb: kb,
                });
                o.1 = o.1.max(peak.unwrap_or(0));
            }
        }
    })
}

/// Runs one scenario against the deployment and returns its result.
pub async fn run_once(dep: &mut Deployment, opts: &RunOptions) -> Result<RunResult> {
    if !opts.scenario.protocols().contains(&opts.protocol) {
        bail!(
            "{} runs over {} only, not {}",
            opts.scenario,
            opts.scenario
                .protocols()
                .iter()
                .map(|p| p.name())
                .collect::<Vec<_>>()
                .join(" or "),
            opts.protocol.name()
        );
    }
    let schedule = Schedule::new(opts.rate, opts.warmup, opts.duration)?;
    let shape = Shape {
        domains: dep.domains.len(),
        ..opts.shape
    };
    let workload = opts.scenario.workload_over(&shape, opts.protocol)?;
    let mut warnings = Vec::new();
    let mut max_inflight = opts.max_inflight.max(1);
    if let Some(limit) = nofile_soft_limit() {
        // Each request in flight holds a connection; keep room for the rest.
        let room = usize::try_from(limit.saturating_sub(256))
            .unwrap_or(usize::MAX)
            .max(16);
        if max_inflight > room {
            warnings.push(format!(
                "--max-inflight {max_inflight} exceeds the open-file limit ({limit}); using {room} \
                 (raise it with `ulimit -n`)"
            ));
            max_inflight = room;
        }
    }
    let mut plan = Plan::new(random_hex(6)?, dep.domains.clone(), workload, schedule, 0);
    plan.remote_domain = dep.xmpp.as_ref().map(|x| x.domain().to_owned());
    let setup_start = Instant::now();
    set_up(dep, &plan, opts).await?;
    if opts.protocol == Protocol::Xmpp {
        let Some(x) = &dep.xmpp else {
            bail!("--protocol xmpp needs the XMPP edge (embedded, or --xmpp-addr with --target)");
        };
        // Every stream is up before the clock starts (again after one ended).
        x.connect_all().await.context("opening the XMPP streams")?;
        x.take_errors();
    }
    let setup_s = setup_start.elapsed().as_secs_f64();

    // Start a little in the future so the setup below is not counted as lag.
    let lead = Duration::from_millis(50);
    plan.start_unix_ms = unix_now_millis() + 50;
    let start_unix_ms = plan.start_unix_ms;
    let plan = Arc::new(plan);
    let t0 = Instant::now() + lead;
    let shared = Shared::new(plan.clone(), t0);
    dep.receivers.router.set(Some(shared.clone()));

    let nodes_at_start = dep.relay_pids().len();
    let redis_pid = dep.system.as_ref().and_then(|s| s.redis_pid());
    let (win_start, win_end) = (shared.window_start(), shared.send_end());
    // The relay processes alive; fault injection keeps it current.
    let pids = Arc::new(std::sync::Mutex::new(dep.relay_pids()));
    let cpu_task = sample_cpu(pids.clone(), redis_pid, win_start, win_end);
    let memory = Arc::new(std::sync::Mutex::new((Vec::new(), 0u64)));
    let mem_task = sample_memory(pids.clone(), t0, memory.clone());

    let pb = progress_bar(schedule.total_messages(), opts.quiet);
    let pshared = shared.clone();
    let ppb = pb.clone();
    let progress_task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut last = (Instant::now(), 0u64, 0u64);
        loop {
            tick.tick().await;
            let p = pshared.progress();
            let now = Instant::now();
            let dt = now.duration_since(last.0).as_secs_f64().max(1e-3);
            let sent_rate = (p.dispatched - last.1.min(p.dispatched)) as f64 / dt;
            let recv_rate = (p.received - last.2.min(p.received)) as f64 / dt;
            last = (now, p.dispatched, p.received);
            ppb.set_position(p.dispatched);
            ppb.set_message(format!(
                "sent {sent_rate:.0}/s  recv {recv_rate:.0}/s  p99 {:.1} ms  errors {}",
                p.e2e_p99_ms, p.errors
            ));
        }
    });

    let driver_opts = DriverOptions {
        protocol: opts.protocol,
        targets: dep.targets.clone(),
        max_inflight,
        request_timeout: opts.request_timeout,
        retry_for: opts.retry_for,
        tls: dep.tls.clone(),
        xmpp: dep.xmpp.clone(),
    };
    let ready_timeout = opts.drain_timeout.max(Duration::from_secs(30));
    let (driven, faulted) = tokio::join!(
        drive(shared.clone(), &driver_opts),
        inject_faults(
            dep.system.as_mut(),
            opts.faults,
            t0,
            &dep.targets,
            &pids,
            ready_timeout
        )
    );
    let (driver_stats, mut faults) = match (driven, faulted) {
        (Ok(s), Ok(f)) => (s, f),
        (Err(e), _) | (_, Err(e)) => {
            progress_task.abort();
            cpu_task.abort();
            mem_task.abort();
            pb.finish_and_clear();
            dep.receivers.router.set(None);
            return Err(e);
        }
    };

    // Drain: wait for everything accepted to arrive, at most `drain_timeout`.
    let drain_start = Instant::now();
    let deadline = drain_start + opts.drain_timeout;
    let mut drain_timed_out = false;
    while shared.outstanding() > 0 {
        if Instant::now() >= deadline {
            drain_timed_out = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let drain_s = drain_start.elapsed().as_secs_f64();
    progress_task.abort();
    mem_task.abort();
    pb.finish_and_clear();
    dep.receivers.router.set(None);

    let snap = shared.snapshot();
    attribute_recoveries(&mut faults, &snap.recoveries);
    if snap.contract.skipped > 0 {
        warnings.push(format!(
            "{} edits, reactions or deletes were not sent: the message each refers to was not \
             accepted within --request-timeout",
            snap.contract.skipped
        ));
    }
    if let Some(x) = &dep.xmpp {
        let ended = x.take_errors();
        if !ended.is_empty() {
            warnings.push(format!(
                "{} XMPP stream(s) ended during the run: {}",
                ended.len(),
                ended.iter().take(5).cloned().collect::<Vec<_>>().join("; ")
            ));
        }
    }
    if let Some(s) = &dep.xmpp_sink {
        let refused = s.counters.errors.load(std::sync::atomic::Ordering::Relaxed);
        if refused > 0 {
            warnings.push(format!(
                "the relay answered {refused} stanza(s) with errors so far (counted as send errors)"
            ));
        }
    }
    let cluster = match &dep.admin {
        Some(admin) => admin_json(&format!("{admin}/cluster")).await.ok(),
        None => None,
    };
    let window_s = opts.duration.as_secs_f64();
    let (memory, peak_rss_kb) = memory.lock().map(|m| m.clone()).unwrap_or_default();
    let cpu = match cpu_task.await {
        Ok(w) => {
            let ticks = clock_ticks_per_sec();
            let wall = w.wall.as_secs_f64();
            let m = snap.accepted_measured;
            let use_of =
                |x: Option<(CpuTicks, CpuTicks)>| x.map(|(a, b)| cpu_use(a, b, ticks, wall, m));
            let relay = w
                .relay_ticks
                .map(|t| (CpuTicks::default(), CpuTicks { utime: t, stime: 0 }));
            CpuReport {
                window_s: wall,
                messages: m,
                relay: use_of(relay),
                redis: use_of(w.redis),
                harness: use_of(w.harness),
                relay_peak_rss_kb: (peak_rss_kb > 0).then_some(peak_rss_kb),
            }
        }
        Err(_) => CpuReport::default(),
    };

    let passed = snap.contract.passed;
    let recipients_per_event = plan.workload.recipients(&plan.workload.event(0)).len();
    Ok(RunResult {
        scenario: opts.scenario.name().to_owned(),
        run_id: plan.run_id.clone(),
        started_at_unix_ms: start_unix_ms,
        passed,
        config: RunConfig {
            rate: opts.rate,
            users: plan.workload.users.len(),
            sessions: plan.workload.sessions(),
            domains: dep.domains.len(),
            duration_s: window_s,
            warmup_s: opts.warmup.as_secs_f64(),
            store: dep.store.map(|s| match s {
                StoreKind::Redis => "redis".to_owned(),
                StoreKind::Memory => "memory".to_owned(),
            }),
            receive: match dep.receive {
                ReceiveMode::Stream => "stream".into(),
                ReceiveMode::Webhook => "webhook".into(),
            },
            max_inflight,
            drain_timeout_s: opts.drain_timeout.as_secs_f64(),
            request_timeout_s: opts.request_timeout.as_secs_f64(),
            target: if dep.system.is_some() {
                "embedded".into()
            } else {
                dep.targets.http().join(",")
            },
            protocol: opts.protocol.name().into(),
            nodes: match opts.protocol {
                Protocol::Http => nodes_at_start.max(dep.targets.http().len()),
                Protocol::Grpc => nodes_at_start.max(dep.targets.grpc().len()),
                Protocol::Xmpp => {
                    nodes_at_start.max(dep.xmpp.as_ref().map_or(0, |x| x.addrs().len()))
                }
            },
            xmpp_streams: match opts.protocol {
                Protocol::Xmpp => dep.xmpp.as_ref().map(|x| x.streams()),
                _ => None,
            },
            recipients_per_event,
            retry_for_s: opts.retry_for.as_secs_f64(),
        },
        machine: MachineInfo::detect(),
        counts: Counts {
            planned: schedule.total_messages(),
            dispatched: snap.dispatched,
            accepted: snap.contract.accepted,
            accepted_measured: snap.accepted_measured,
            send_errors_total: snap.send_errors_total,
            send_errors: snap.send_errors,
            received_unique: snap.contract.received_unique,
            received_in_window: snap.received_in_window,
            duplicate_flagged_202: snap.duplicate_flagged,
            drain_s,
            drain_timed_out,
        },
        contract: snap.contract,
        throughput: Throughput {
            offered_per_s: opts.rate,
            accepted_per_s: snap.accepted_measured as f64 / window_s,
            received_per_s: snap.received_in_window as f64 / window_s,
        },
        latency_ms: Latency {
            end_to_end: snap.e2e,
            post: snap.post,
        },
        cpu,
        driver: driver_stats,
        receivers: dep.receivers.stats(),
        series: snap.series,
        percentile_curve: snap.e2e_curve,
        warnings,
        retries: snap.retries,
        faults,
        memory,
        setup_s,
        cluster,
    })
}

/// The default output directory: `loadtest-results/<name>-<UTC stamp>`.
pub fn default_out_dir(name: &str) -> PathBuf {
    PathBuf::from("loadtest-results").join(format!("{name}-{}", utc_stamp(unix_now_secs())))
}

/// Runs the scenario once and writes `result.json` and the plots into `out`.
pub async fn run_and_report(
    spec: DeploymentSpec,
    receive: ReceiveMode,
    opts: &RunOptions,
    out: &std::path::Path,
    ready_timeout: Duration,
) -> Result<RunResult> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut dep = Deployment::start(spec, receive, out.to_owned(), ready_timeout).await?;
    let result = run_once(&mut dep, opts).await?;
    write_all(out, &result)?;
    dep.check_alive()
        .context("the relay system died during the run (results were written)")?;
    Ok(result)
}

/// How `find-max` steps.
#[derive(Debug, Clone)]
pub struct FindMaxOptions {
    pub p99_ms: f64,
    pub start_rate: f64,
    pub factor: f64,
    pub max_steps: usize,
    pub max_rate: Option<f64>,
    /// Extra attempts at a rate whose first attempt failed (short runs on a small machine
    /// are noisy); the rate passes if any attempt does.
    pub retries: usize,
}

/// One step of `find-max`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepResult {
    pub rate: f64,
    pub e2e_p99_ms: f64,
    pub post_p99_ms: f64,
    pub received_per_s: f64,
    pub relay_us_per_message: Option<f64>,
    pub passed: bool,
    pub reason: String,
    /// Runs made at this rate (1 + retries used).
    pub attempts: usize,
}

/// What `find-max` found.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FindMaxResult {
    pub scenario: String,
    pub p99_target_ms: f64,
    /// The highest rate that kept p99 within target with no loss, no send errors and the
    /// contract intact; `None` if even the first step failed.
    pub best_rate: Option<f64>,
    pub steps: Vec<StepResult>,
    pub machine: MachineInfo,
}

/// Whether a step's result is good enough, and why not.
pub fn judge_step(r: &RunResult, p99_target_ms: f64) -> (bool, String) {
    let mut why = Vec::new();
    if !r.contract.passed {
        why.push(format!(
            "contract failed (lost {}, duplicates {}, order {})",
            r.contract.lost, r.contract.duplicates, r.contract.order_violations
        ));
    }
    if r.counts.send_errors_total > 0 {
        why.push(format!("{} send errors", r.counts.send_errors_total));
    }
    if r.latency_ms.end_to_end.count == 0 {
        why.push("nothing received".into());
    } else if r.latency_ms.end_to_end.p99 > p99_target_ms {
        why.push(format!(
            "p99 {:.2} ms > {:.2} ms",
            r.latency_ms.end_to_end.p99, p99_target_ms
        ));
    }
    if r.counts.drain_timed_out {
        why.push("drain timed out".into());
    }
    if why.is_empty() {
        (true, "ok".into())
    } else {
        (false, why.join("; "))
    }
}

/// Steps the rate up (`start`, `× factor` each step) against one system until a step fails.
pub async fn find_max(
    spec: DeploymentSpec,
    receive: ReceiveMode,
    base: &RunOptions,
    fm: &FindMaxOptions,
    out: &std::path::Path,
    ready_timeout: Duration,
    mut on_step: impl FnMut(&StepResult),
) -> Result<FindMaxResult> {
    if fm.factor.is_nan() || fm.factor <= 1.0 {
        bail!("--step-factor must be more than 1");
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut dep = Deployment::start(spec, receive, out.to_owned(), ready_timeout).await?;
    let mut rate = fm.start_rate;
    let mut res = FindMaxResult {
        scenario: base.scenario.name().to_owned(),
        p99_target_ms: fm.p99_ms,
        best_rate: None,
        steps: Vec::new(),
        machine: MachineInfo::detect(),
    };
    for step in 1..=fm.max_steps {
        if fm.max_rate.is_some_and(|m| rate > m) {
            break;
        }
        let opts = RunOptions {
            rate,
            ..base.clone()
        };
        let mut attempt = 0;
        let s = loop {
            attempt += 1;
            let r = run_once(&mut dep, &opts).await?;
            let dir = if attempt == 1 {
                format!("step-{step:02}-{rate:.0}")
            } else {
                format!("step-{step:02}-{rate:.0}-retry{}", attempt - 1)
            };
            write_all(&out.join(dir), &r)?;
            dep.check_alive().with_context(|| {
                format!("the relay system died during step {step} ({rate} msg/s)")
            })?;
            let (passed, reason) = judge_step(&r, fm.p99_ms);
            if passed || attempt > fm.retries {
                break StepResult {
                    rate,
                    e2e_p99_ms: r.latency_ms.end_to_end.p99,
                    post_p99_ms: r.latency_ms.post.p99,
                    received_per_s: r.throughput.received_per_s,
                    relay_us_per_message: r.cpu.relay.map(|c| c.us_per_message),
                    passed,
                    reason,
                    attempts: attempt,
                };
            }
        };
        let passed = s.passed;
        on_step(&s);
        res.steps.push(s);
        write_json(&out.join("find-max.json"), &res)?;
        if !passed {
            break;
        }
        res.best_rate = Some(rate);
        rate = (rate * fm.factor).round();
    }
    write_json(&out.join("find-max.json"), &res)?;
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Percentiles;

    #[test]
    fn judge() {
        let mut r = RunResult::default();
        r.contract.passed = true;
        r.latency_ms.end_to_end = Percentiles {
            count: 100,
            p99: 15.0,
            ..Default::default()
        };
        assert_eq!(judge_step(&r, 20.0), (true, "ok".to_owned()));
        let (ok, why) = judge_step(&r, 10.0);
        assert!(!ok);
        assert!(why.contains("p99 15.00 ms > 10.00 ms"), "{why}");
        r.counts.send_errors_total = 2;
        r.contract.passed = false;
        r.contract.lost = 1;
        let (ok, why) = judge_step(&r, 20.0);
        assert!(!ok);
        assert!(
            why.contains("lost 1") && why.contains("2 send errors"),
            "{why}"
        );
        let empty = RunResult {
            contract: crate::contract::ContractReport {
                passed: true,
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(!judge_step(&empty, 20.0).0);
    }

    #[test]
    fn recoveries_belong_to_the_kill_before_them() {
        let fault = |kind: &str, at_ms: f64| FaultEvent {
            kind: kind.into(),
            node: "n".into(),
            at_ms,
            ..Default::default()
        };
        let mut f = vec![
            fault("kill", 1000.0),
            fault("add", 5000.0),
            fault("kill", 8000.0),
        ];
        let ms = |x: u64| x * 1_000_000;
        attribute_recoveries(
            &mut f,
            &[
                (ms(500), ms(600)),   // before any fault: nobody's
                (ms(1100), ms(3000)), // the first kill's
                (ms(1200), ms(3500)), // its last
                (ms(5100), ms(9000)), // during the join: not a kill's
            ],
        );
        assert_eq!(f[0].recovered_after_ms, Some(2500.0));
        assert_eq!(f[1].recovered_after_ms, None);
        assert_eq!(
            f[2].recovered_after_ms, None,
            "no send failed after the second kill"
        );
    }

    #[test]
    fn out_dir_name() {
        let p = default_out_dir("one-to-one");
        let s = p.to_string_lossy();
        assert!(s.starts_with("loadtest-results/one-to-one-"), "{s}");
        assert_eq!(s.len(), "loadtest-results/one-to-one-".len() + 15);
    }
}
