//! `relay-node`: run a fedrelay node, or check a config file.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use anyhow::Context;
use clap::{Parser, Subcommand};
use relay_node::config::Config;
use relay_node::{admin, node, telemetry};
use std::path::PathBuf;

/// glibc's allocator spent a quarter of the relay's CPU under load (see docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "relay-node", version, about = "fedrelay federation relay node")]
struct Cli {
    /// Config file (TOML). FEDRELAY_* environment variables override its values.
    #[arg(long, short, env = "FEDRELAY_CONFIG", conflicts_with = "dev")]
    config: Option<PathBuf>,
    /// The embedded default: one node, in-memory store, HTTP edge on 127.0.0.1:8080 with
    /// two demo domains (alpha.example, beta.example).
    #[arg(long)]
    dev: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a config file (and its environment overrides) and exit.
    CheckConfig { file: PathBuf },
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relay-node: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::CheckConfig { file }) = cli.command {
        let cfg = Config::load(&file, std::env::vars())?;
        cfg.secrets()?;
        println!(
            "{}: ok ({} domains, {} federation rules)",
            file.display(),
            cfg.domains.len(),
            cfg.federation.len()
        );
        return Ok(());
    }
    let cfg = match (cli.dev, cli.config) {
        (true, _) => Config::dev(std::env::vars())?,
        (false, Some(path)) => Config::load(&path, std::env::vars())?,
        (false, None) => anyhow::bail!("give --config FILE, or --dev for the embedded default"),
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if cfg.runtime.worker_threads > 0 {
        builder.worker_threads(cfg.runtime.worker_threads);
    }
    let runtime = builder
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        let _telemetry = telemetry::init(&cfg.telemetry)?;
        let metrics = admin::install_metrics()?;
        node::run(cfg, metrics, shutdown_signal()).await
    })
}

/// SIGTERM (Kubernetes) or Ctrl-C.
async fn shutdown_signal() {
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
