//! The `relay-loadtest` command line. All logic lives in the library; this file parses flags,
//! prints, and maps outcomes to exit codes (0 ok, 1 contract failed / no passing rate,
//! 2 error or interrupted).
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
    DeploymentSpec, FindMaxOptions, RunOptions, default_out_dir, find_max, run_and_report,
};
use relay_loadtest::scenario::{ScenarioKind, parse_duration};
use relay_loadtest::system::StoreKind;

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
        /// The scenario to run.
        #[arg(value_enum)]
        scenario: ScenarioKind,
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
        /// The scenario to step.
        #[arg(long, value_enum, default_value = "one-to-one")]
        scenario: ScenarioKind,
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

/// Flags shared by `run` and `find-max`.
#[derive(Debug, Args)]
struct RunArgs {
    /// Simulated users (pairs of them chat 1:1, so users/2 sessions).
    #[arg(long, default_value_t = 1000)]
    users: usize,
    /// HTTP-edge domains d0.loadtest.example... (embedded, default 4); with --target, use the
    /// first N domains given (default all).
    #[arg(long)]
    domains: Option<usize>,
    /// Offered load in messages per second, open loop (run: default 2000; find-max: the
    /// starting rate, default 500).
    #[arg(long)]
    rate: Option<f64>,
    /// Measured duration after the warmup, e.g. 30s, 2m (run: default 20s; find-max: per
    /// step, default 8s).
    #[arg(long, value_parser = dur)]
    duration: Option<Duration>,
    /// Warmup before the measured window; sent and checked, but excluded from statistics.
    #[arg(long, value_parser = dur, default_value = "2s")]
    warmup: Duration,
    /// Cap on requests in flight; a request delayed by the cap still counts latency from its
    /// intended send time.
    #[arg(long, default_value_t = 4096)]
    max_inflight: usize,
    /// How long to wait, after the last POST answered, for accepted messages to arrive before
    /// counting them lost.
    #[arg(long, value_parser = dur, default_value = "10s")]
    drain_timeout: Duration,
    /// Timeout of one POST /v1/events.
    #[arg(long, value_parser = dur, default_value = "10s")]
    request_timeout: Duration,
    /// How the harness receives: SSE GET /v1/stream per domain, or a local webhook sink.
    #[arg(long, value_enum, default_value = "stream")]
    receive: ReceiveMode,
    /// Embedded only: the relay's store (default redis, started on a free port).
    #[arg(long, value_enum)]
    store: Option<StoreKind>,
    /// Embedded only: the relay-node binary (default: next to this binary, else PATH).
    #[arg(long)]
    relay_bin: Option<PathBuf>,
    /// Embedded only: the redis-server binary (default: PATH).
    #[arg(long)]
    redis_bin: Option<PathBuf>,
    /// Drive an existing deployment's HTTP edge (http://host:port) instead of starting one.
    #[arg(long)]
    target: Option<String>,
    /// With --target: its admin listener (http://host:port), polled for /readyz first.
    #[arg(long, requires = "target")]
    admin: Option<String>,
    /// With --target: the deployment's relay config file; its [[domains]] with
    /// platform = "http" (name, secret or secret_file) are the domains the harness plays.
    #[arg(long, requires = "target")]
    config_file: Option<PathBuf>,
    /// With --target: a domain to play, NAME=SECRET (repeatable; instead of --config-file).
    #[arg(long = "domain", requires = "target")]
    domain: Vec<String>,
    /// With --target and --receive webhook: where the sink listens; the relay's webhook_url
    /// for each domain must be http://ADDR/hook.
    #[arg(long, requires = "target")]
    webhook_listen: Option<SocketAddr>,
    /// Deadline for redis, the relay's /readyz and the SSE streams to come up.
    #[arg(long, value_parser = dur, default_value = "30s")]
    ready_timeout: Duration,
    /// Output directory (default loadtest-results/<scenario>-<UTC timestamp>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

impl RunArgs {
    fn deployment(&self) -> Result<DeploymentSpec> {
        match &self.target {
            None => Ok(DeploymentSpec::Embedded {
                store: self.store.unwrap_or(StoreKind::Redis),
                relay_bin: self.relay_bin.clone(),
                redis_bin: self.redis_bin.clone(),
                domains: self.domains.unwrap_or(4),
            }),
            Some(target) => {
                if self.store.is_some() || self.relay_bin.is_some() || self.redis_bin.is_some() {
                    bail!(
                        "--store, --relay-bin and --redis-bin apply to the embedded system only, not --target"
                    );
                }
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
                    target: target.clone(),
                    admin: self.admin.clone(),
                    domains,
                    webhook_listen: self.webhook_listen,
                })
            }
        }
    }

    fn options(
        &self,
        scenario: ScenarioKind,
        default_rate: f64,
        default_duration: Duration,
    ) -> RunOptions {
        RunOptions {
            scenario,
            users: self.users,
            rate: self.rate.unwrap_or(default_rate),
            duration: self.duration.unwrap_or(default_duration),
            warmup: self.warmup,
            max_inflight: self.max_inflight,
            drain_timeout: self.drain_timeout,
            request_timeout: self.request_timeout,
            quiet: self.quiet,
        }
    }
}

fn read_json(p: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
}

async fn cli_main(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Run { scenario, args } => {
            let spec = args.deployment()?;
            let opts = args.options(scenario, 2000.0, Duration::from_secs(20));
            let out = args
                .out
                .clone()
                .unwrap_or_else(|| default_out_dir(scenario.name()));
            let r = run_and_report(spec, args.receive, &opts, &out, args.ready_timeout).await?;
            println!("{}", summary_text(&r));
            println!("results in {}", out.display());
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
            let spec = args.deployment()?;
            let opts = args.options(scenario, 500.0, Duration::from_secs(8));
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
                args.receive,
                &opts,
                &fm,
                &out,
                args.ready_timeout,
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
