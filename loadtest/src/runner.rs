//! Orchestration: bring up (or connect to) the system under test, run a scenario against it
//! (receivers, CPU sampling, progress, open-loop driver, drain), build the [`RunResult`], and
//! the `find-max` rate search.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::driver::{DriverOptions, drive, post_client};
use crate::live::Shared;
use crate::plan::{DomainSpec, Plan, random_hex};
use crate::receiver::{ReceiveMode, Receivers};
use crate::report::{
    Counts, CpuReport, Latency, RunConfig, RunResult, Throughput, utc_stamp, write_all, write_json,
};
use crate::scenario::{ScenarioKind, Schedule, domain_name};
use crate::sign::{unix_now_millis, unix_now_secs};
use crate::stats::{
    CpuTicks, MachineInfo, clock_ticks_per_sec, cpu_use, nofile_soft_limit, read_cpu,
    read_peak_rss_kb,
};
use crate::system::{DeliverySpec, EmbeddedOptions, EmbeddedSystem, StoreKind, wait_ready};

/// The workload knobs of one run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub scenario: ScenarioKind,
    pub users: usize,
    pub rate: f64,
    pub duration: Duration,
    pub warmup: Duration,
    pub max_inflight: usize,
    pub drain_timeout: Duration,
    pub request_timeout: Duration,
    pub quiet: bool,
}

/// Where the system under test comes from.
#[derive(Debug, Clone)]
pub enum DeploymentSpec {
    /// Start redis-server (unless memory) and relay-node here.
    Embedded {
        store: StoreKind,
        relay_bin: Option<PathBuf>,
        redis_bin: Option<PathBuf>,
        domains: usize,
    },
    /// An existing deployment.
    Target {
        target: String,
        admin: Option<String>,
        domains: Vec<DomainSpec>,
        /// Where the webhook sink listens (the relay's `webhook_url`s must point there).
        webhook_listen: Option<SocketAddr>,
    },
}

/// A system under test with its receivers, alive for one or more runs.
#[derive(Debug)]
pub struct Deployment {
    // Field order matters: receivers stop before the system is killed.
    receivers: Receivers,
    system: Option<EmbeddedSystem>,
    pub target: String,
    pub domains: Vec<DomainSpec>,
    pub store: Option<StoreKind>,
    pub receive: ReceiveMode,
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
                domains,
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
                let system = EmbeddedSystem::start(EmbeddedOptions {
                    store,
                    relay_bin,
                    redis_bin,
                    domains: domains.clone(),
                    delivery,
                    log_dir,
                    ready_timeout,
                })
                .await?;
                let target = format!("http://{}", system.http);
                let receivers = match receivers {
                    Some(r) => r,
                    None => Receivers::streams(&target, &domains)?,
                };
                receivers.wait_connected(ready_timeout).await?;
                Ok(Self {
                    receivers,
                    system: Some(system),
                    target,
                    domains,
                    store: Some(store),
                    receive,
                })
            }
            DeploymentSpec::Target {
                target,
                admin,
                domains,
                webhook_listen,
            } => {
                if domains.len() < 2 {
                    bail!(
                        "--target needs at least 2 HTTP-edge domains (from --config-file or --domain NAME=SECRET)"
                    );
                }
                if let Some(admin) = &admin {
                    wait_ready(admin, None, ready_timeout).await?;
                }
                let receivers = match receive {
                    ReceiveMode::Stream => Receivers::streams(&target, &domains)?,
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
                Ok(Self {
                    receivers,
                    system: None,
                    target,
                    domains,
                    store: None,
                    receive,
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
}

fn read_cpu_opt(pid: Option<u32>) -> Option<CpuTicks> {
    read_cpu(pid).ok()
}

struct CpuSample {
    relay: Option<CpuTicks>,
    redis: Option<CpuTicks>,
    harness: Option<CpuTicks>,
    at: Instant,
}

fn sample(relay: Option<u32>, redis: Option<u32>) -> CpuSample {
    CpuSample {
        relay: relay.and_then(|p| read_cpu_opt(Some(p))),
        redis: redis.and_then(|p| read_cpu_opt(Some(p))),
        harness: read_cpu_opt(None),
        at: Instant::now(),
    }
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

/// Runs one scenario against the deployment and returns its result.
pub async fn run_once(dep: &mut Deployment, opts: &RunOptions) -> Result<RunResult> {
    let schedule = Schedule::new(opts.rate, opts.warmup, opts.duration)?;
    let workload = opts.scenario.workload(opts.users, dep.domains.len())?;
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
    // Start a little in the future so the setup below is not counted as lag.
    let lead = Duration::from_millis(50);
    let start_unix_ms = unix_now_millis() + 50;
    let plan = Arc::new(Plan {
        run_id: random_hex(6)?,
        domains: dep.domains.clone(),
        workload,
        schedule,
        start_unix_ms,
    });
    let t0 = Instant::now() + lead;
    let shared = Shared::new(plan.clone(), t0);
    dep.receivers.router.set(Some(shared.clone()));

    let relay_pid = dep.system.as_ref().map(|s| s.relay_pid());
    let redis_pid = dep.system.as_ref().and_then(|s| s.redis_pid());
    let (win_start, win_end) = (shared.window_start(), shared.send_end());
    let cpu_task = tokio::spawn(async move {
        tokio::time::sleep_until(win_start.into()).await;
        let a = sample(relay_pid, redis_pid);
        tokio::time::sleep_until(win_end.into()).await;
        let b = sample(relay_pid, redis_pid);
        (a, b)
    });

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
        target: dep.target.clone(),
        max_inflight,
        request_timeout: opts.request_timeout,
    };
    let driven = drive(shared.clone(), post_client(max_inflight), &driver_opts).await;
    let driver_stats = match driven {
        Ok(s) => s,
        Err(e) => {
            progress_task.abort();
            cpu_task.abort();
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
    pb.finish_and_clear();
    dep.receivers.router.set(None);

    let snap = shared.snapshot();
    let window_s = opts.duration.as_secs_f64();
    let cpu = match cpu_task.await {
        Ok((a, b)) => {
            let ticks = clock_ticks_per_sec();
            let wall = b.at.duration_since(a.at).as_secs_f64();
            let m = snap.accepted_measured;
            let use_of = |x: Option<CpuTicks>, y: Option<CpuTicks>| match (x, y) {
                (Some(x), Some(y)) => Some(cpu_use(x, y, ticks, wall, m)),
                _ => None,
            };
            CpuReport {
                window_s: wall,
                messages: m,
                relay: use_of(a.relay, b.relay),
                redis: use_of(a.redis, b.redis),
                harness: use_of(a.harness, b.harness),
                relay_peak_rss_kb: relay_pid.and_then(read_peak_rss_kb),
            }
        }
        Err(_) => CpuReport::default(),
    };

    let passed = snap.contract.passed;
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
                dep.target.clone()
            },
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
    fn out_dir_name() {
        let p = default_out_dir("one-to-one");
        let s = p.to_string_lossy();
        assert!(s.starts_with("loadtest-results/one-to-one-"), "{s}");
        assert_eq!(s.len(), "loadtest-results/one-to-one-".len() + 15);
    }
}
