//! `relay-node`: run a fedrelay node, or check a config file.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use relay_node::config::Config;
use relay_node::teams_manifest::{self, ManifestOptions};
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
    CheckConfig {
        file: PathBuf,
        /// Do not read the files that `secret_file`, `app_password_file`,
        /// `dialback_secret_file` and the SIP peers' `password_file` name (they exist
        /// only where the node runs, e.g. Secrets mounted into a pod); validate the rest.
        #[arg(long)]
        skip_secret_files: bool,
    },
    /// Inspect a running cluster through one node's admin listener.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Microsoft Teams tools.
    Teams {
        #[command(subcommand)]
        command: TeamsCommand,
    },
}

#[derive(Subcommand)]
enum TeamsCommand {
    /// Write the Teams app package (manifest.json and two icons in a zip) that a Teams admin
    /// uploads to make the relay's bot available.
    Manifest(Box<TeamsManifestArgs>),
}

#[derive(Args)]
struct TeamsManifestArgs {
    /// The bot's Microsoft App ID (a GUID), as registered in Azure Bot Service / Entra ID.
    #[arg(long)]
    app_id: String,
    /// Where to write the zip.
    #[arg(long)]
    out: PathBuf,
    /// The app's short name, as users see it in Teams (at most 30 characters).
    #[arg(long, default_value = teams_manifest::DEFAULT_NAME)]
    name: String,
    /// The app's full name (at most 100 characters) [default: "<name> federation relay"].
    #[arg(long)]
    full_name: Option<String>,
    /// The package version, MAJOR.MINOR.PATCH; raise it for Teams to offer an update.
    #[arg(long, default_value = teams_manifest::DEFAULT_VERSION)]
    version: String,
    /// The developer name shown in the Teams store listing.
    #[arg(long, default_value = teams_manifest::DEFAULT_DEVELOPER_NAME)]
    developer_name: String,
    /// The developer's website (https://).
    #[arg(long, default_value = teams_manifest::DEFAULT_WEBSITE_URL)]
    website_url: String,
    /// The privacy statement (https://).
    #[arg(long, default_value = teams_manifest::DEFAULT_PRIVACY_URL)]
    privacy_url: String,
    /// The terms of use (https://).
    #[arg(long, default_value = teams_manifest::DEFAULT_TERMS_URL)]
    terms_url: String,
    /// The relay's public host name (no scheme or path; *.example.com allowed). Repeatable.
    #[arg(long = "valid-domain", value_name = "HOST")]
    valid_domains: Vec<String>,
    /// The accent colour, #RRGGBB; also the colour icon's background.
    #[arg(long, default_value = teams_manifest::DEFAULT_ACCENT_COLOR)]
    accent_color: String,
    /// The manifest's packageName, a reverse-domain identifier (optional).
    #[arg(long)]
    package_name: Option<String>,
    /// The Teams app id when it must differ from the bot's app id (a GUID).
    #[arg(long)]
    manifest_id: Option<String>,
    /// Ask team owners for ChannelMessage.Read.Group (resource-specific consent), so the bot
    /// receives every channel message, not only those that @mention it.
    #[arg(long)]
    channel_messages: bool,
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Members, their readiness, revision, sessions and presence actors, handoffs in flight.
    Status {
        /// A node's admin listener.
        #[arg(long, default_value = "http://127.0.0.1:9090")]
        admin: String,
        /// Print the JSON the node answers instead of a table.
        #[arg(long)]
        json: bool,
    },
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
    if let Some(Command::Teams {
        command: TeamsCommand::Manifest(args),
    }) = cli.command
    {
        return teams_manifest_command(*args);
    }
    if let Some(Command::Cluster {
        command: ClusterCommand::Status { admin, json },
    }) = cli.command
    {
        return cluster_status(&admin, json);
    }
    if let Some(Command::CheckConfig {
        file,
        skip_secret_files,
    }) = cli.command
    {
        let cfg = Config::load(&file, std::env::vars())?;
        if !skip_secret_files {
            cfg.secrets()?;
            if let Some(t) = &cfg.teams {
                t.password()?;
            }
            if let Some(x) = &cfg.xmpp {
                x.dialback_secret()?;
            }
            for p in cfg.sip.iter().flat_map(|s| &s.peers) {
                p.password()?;
            }
            if let Some(f) = &cfg.api.bootstrap_token_file {
                let t = std::fs::read_to_string(f)
                    .with_context(|| format!("reading api.bootstrap_token_file {}", f.display()))?;
                anyhow::ensure!(
                    t.trim().len() >= 32,
                    "api.bootstrap_token_file: the token must have at least 32 characters"
                );
            }
        }
        println!(
            "{}: ok ({} domains, {} federation rules{})",
            file.display(),
            cfg.domains.len(),
            cfg.federation.len(),
            if skip_secret_files {
                "; secret files not read"
            } else {
                ""
            }
        );
        return Ok(());
    }
    let dev = cli.dev;
    let cfg = match (cli.dev, cli.config) {
        (true, _) => dev_api_token(Config::dev(std::env::vars())?)?,
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
    // The dev token's folder goes with the node.
    let dev_token_dir = cfg
        .api
        .bootstrap_token_file
        .as_ref()
        .filter(|_| dev)
        .and_then(|f| f.parent().map(std::path::Path::to_path_buf));
    let result = runtime.block_on(async move {
        let _telemetry = telemetry::init(&cfg.telemetry)?;
        let metrics = admin::install_metrics()?;
        node::run(cfg, metrics, shutdown_signal()).await
    });
    if let Some(d) = dev_token_dir.filter(|d| {
        d.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("fedrelay-dev-"))
    }) {
        let _ = std::fs::remove_dir_all(d);
    }
    result
}

/// `--dev` without a bootstrap token: a fresh one, in a file only this user can read, whose
/// path is printed (never the token).
fn dev_api_token(mut cfg: Config) -> anyhow::Result<Config> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if cfg.api.listen.is_none() || cfg.api.bootstrap_token_file.is_some() {
        return Ok(cfg);
    }
    let dir = std::env::temp_dir().join(format!("fedrelay-dev-{}", std::process::id()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("api-token");
    let token = format!("dev-{}", hex::encode(rand::random::<[u8; 24]>()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    std::io::Write::write_all(&mut f, token.as_bytes())?;
    eprintln!(
        "relay-node --dev: management API admin token in {} (relayctl --token-file {})",
        path.display(),
        path.display()
    );
    cfg.api.bootstrap_token_file = Some(path);
    Ok(cfg)
}

/// `relay-node cluster status`: asks a node's `GET /cluster` and prints it.
fn cluster_status(admin: &str, json: bool) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let url = format!("{}/cluster", admin.trim_end_matches('/'));
    let view: serde_json::Value = runtime.block_on(async {
        let resp = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .build()?
            .get(&url)
            .send()
            .await
            .with_context(|| format!("asking {url}"))?
            .error_for_status()?;
        anyhow::Ok(resp.json().await?)
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
        return Ok(());
    }
    println!(
        "cluster as seen by {} at revision {} ({})",
        view["node_id"].as_str().unwrap_or("?"),
        view["revision"],
        if view["ready"].as_bool() == Some(true) {
            "ready"
        } else {
            "not ready"
        }
    );
    println!(
        "{:<20} {:<6} {:>9} {:>9} {:>9} {:>9}  GRPC",
        "NODE", "READY", "REVISION", "SESSIONS", "HANDOFFS", "PRESENCE"
    );
    for m in view["members"].as_array().into_iter().flatten() {
        println!(
            "{:<20} {:<6} {:>9} {:>9} {:>9} {:>9}  {}",
            m["node_id"].as_str().unwrap_or("?"),
            if m["ready"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            },
            m["revision"].to_string(),
            m["sessions_active"].to_string(),
            m["handoffs_in_flight"].to_string(),
            m["presence_active"].to_string(),
            m["grpc_addr"].as_str().unwrap_or(""),
        );
    }
    Ok(())
}

/// `relay-node teams manifest`: validates everything, then writes the package.
fn teams_manifest_command(args: TeamsManifestArgs) -> anyhow::Result<()> {
    let options = ManifestOptions {
        app_id: args.app_id,
        manifest_id: args.manifest_id,
        short_name: args.name,
        full_name: args.full_name,
        version: args.version,
        developer_name: args.developer_name,
        website_url: args.website_url,
        privacy_url: args.privacy_url,
        terms_url: args.terms_url,
        valid_domains: args.valid_domains,
        accent_color: args.accent_color,
        package_name: args.package_name,
        channel_messages: args.channel_messages,
    };
    let zip = teams_manifest::package(&options).context("making the Teams app package")?;
    std::fs::write(&args.out, zip).with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "{}: Teams app package for app id {}",
        args.out.display(),
        options.app_id
    );
    Ok(())
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
