//! `relayctl`: the management API from a terminal or a script.
//!
//! Tables for people by default, `--output json` for scripts. Exit codes:
//! 0 done; 1 a local error (bad arguments, unreadable file, invalid policy file);
//! 2 `policy diff` found changes; 3 the relay refused the request (4xx other than 401);
//! 4 not authenticated (401); 5 the relay or its store is unavailable (5xx, no connection).
#![allow(clippy::print_stdout, clippy::print_stderr)]

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use relay_node::control::policy::model::PolicyDoc;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "relayctl",
    version,
    about = "manage a fedrelay cluster through its management API"
)]
struct Cli {
    /// The management API's base URL.
    #[arg(long, env = "FEDRELAY_API", default_value = "http://127.0.0.1:9443")]
    api: String,
    /// A bearer token (an API token, the bootstrap token or an OIDC access token).
    #[arg(long, env = "FEDRELAY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file holding the token.
    #[arg(long, env = "FEDRELAY_TOKEN_FILE", conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// A CA (PEM) to trust for the API's HTTPS instead of the system's roots.
    #[arg(long, env = "FEDRELAY_CA_FILE")]
    ca_file: Option<PathBuf>,
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// The federation policy: export, diff against a file, apply a file.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Allowed or not, and which rule decided.
    Explain {
        /// The sender, user@domain.
        from: String,
        /// The receiver, user@domain.
        to: String,
        /// im, presence, typing, files, invites or contacts.
        #[arg(long, default_value = "im")]
        kind: String,
    },
    /// Contact requests waiting for an administrator.
    Approvals {
        #[command(subcommand)]
        command: ApprovalCommand,
    },
    /// The metadata log (never message content).
    Log {
        #[command(subcommand)]
        command: LogCommand,
    },
    /// Usage over the trailing months.
    Usage {
        #[command(subcommand)]
        command: UsageCommand,
    },
    /// API tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Erases a user's profile, contacts and conversation references and pseudonymises them
    /// in the metadata log.
    Forget {
        /// user@domain
        user: String,
    },
    /// Administrative changes, oldest first.
    Audit {
        /// From this time on (Unix ms).
        #[arg(long, default_value_t = 0)]
        since: i64,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Who the token is.
    Whoami,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Writes the current policy (TOML, or JSON with --format json).
    Export {
        #[arg(long, value_enum, default_value_t = Format::Toml)]
        format: Format,
        /// Where to write it; standard output when absent.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// What applying FILE would change (exit 2 when something would).
    Diff { file: PathBuf },
    /// Replaces the policy with FILE.
    Apply {
        file: PathBuf,
        /// Refuse unless the policy is still at this version.
        #[arg(long)]
        if_version: Option<u64>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Toml,
    Json,
}

#[derive(Subcommand)]
enum ApprovalCommand {
    List,
    Approve { id: String },
    Decline { id: String },
}

#[derive(Args, Clone)]
struct LogFilter {
    /// From this time (RFC 3339 or Unix ms); default 24 hours ago.
    #[arg(long)]
    from: Option<String>,
    /// Until this time (RFC 3339 or Unix ms); default now.
    #[arg(long)]
    to: Option<String>,
    #[arg(long)]
    domain: Option<String>,
    /// user@domain
    #[arg(long)]
    user: Option<String>,
    /// im, presence, typing or error.
    #[arg(long = "type")]
    category: Option<String>,
    /// A session id (hex).
    #[arg(long)]
    session: Option<String>,
}

#[derive(Subcommand)]
enum LogCommand {
    /// The newest entries of the last hour (or since --from); with --follow, new ones as they
    /// come.
    Tail {
        #[command(flatten)]
        filter: LogFilter,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long, short)]
        follow: bool,
    },
    /// Every entry of a query as CSV or NDJSON.
    Export {
        #[command(flatten)]
        filter: LogFilter,
        #[arg(long, value_enum, default_value_t = ExportFormat::Csv)]
        format: ExportFormat,
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ExportFormat {
    Csv,
    Ndjson,
}

#[derive(Subcommand)]
enum UsageCommand {
    /// Unique users and messages per month, by internal and external domain and platform.
    Report {
        #[arg(long, default_value_t = 12)]
        months: u32,
        /// Write CSV instead of a table.
        #[arg(long)]
        csv: bool,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// A new token; printed once.
    Create {
        #[arg(long)]
        name: String,
        /// admin, auditor or domain-admin.
        #[arg(long)]
        role: String,
        /// A domain admin's internal domains (repeatable).
        #[arg(long = "domain")]
        domains: Vec<String>,
        #[arg(long, default_value_t = 90)]
        expires_in_days: u32,
    },
    List,
    Revoke {
        id: String,
    },
}

/// A failure with the exit code scripts see.
struct Failure {
    code: u8,
    message: String,
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure {
            code: 1,
            message: format!("{e:#}"),
        }
    }
}

struct Client {
    http: reqwest::Client,
    api: String,
    token: Option<String>,
}

impl Client {
    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, Failure> {
        let req = match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let resp = req.send().await.map_err(|e| Failure {
            code: 5,
            message: format!("cannot reach {}: {e}", self.api),
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        let message = body["message"]
            .as_str()
            .map(String::from)
            .unwrap_or_else(|| status.to_string());
        Err(Failure {
            code: match status.as_u16() {
                401 => 4,
                400..=499 => 3,
                _ => 5,
            },
            message: format!("{} ({})", message, status.as_u16()),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.api.trim_end_matches('/'))
    }

    async fn get(&self, path: &str) -> Result<Value, Failure> {
        let r = self.send(self.http.get(self.url(path))).await?;
        r.json().await.map_err(|e| Failure {
            code: 5,
            message: format!("unreadable answer: {e}"),
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, Failure> {
        let mut req = self.http.request(method, self.url(path));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = self.send(req).await?;
        Ok(r.json().await.unwrap_or(Value::Null))
    }
}

/// Prints rows as aligned columns under a header.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_uppercase()).collect());
    for r in rows {
        line(r.clone());
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn ms_to_rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let day = relay_node::control::metadata::day_of(ms);
    let t = secs.rem_euclid(86_400);
    format!(
        "{day}T{:02}:{:02}:{:02}.{:03}Z",
        t / 3600,
        t % 3600 / 60,
        t % 60,
        ms.rem_euclid(1000)
    )
}

/// Unix ms from Unix ms or an RFC 3339 UTC time (`2026-11-23T10:00:00Z`).
fn parse_time(s: &str) -> anyhow::Result<i64> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    let bad =
        || anyhow::anyhow!("`{s}` is neither Unix ms nor a UTC time like 2026-11-23T10:00:00Z");
    let (date, time) = s.split_once('T').ok_or_else(bad)?;
    let time = time.strip_suffix('Z').ok_or_else(bad)?;
    let d: Vec<i64> = date
        .split('-')
        .map(|p| p.parse())
        .collect::<Result<_, _>>()
        .map_err(|_| bad())?;
    let t: Vec<f64> = time
        .split(':')
        .map(|p| p.parse())
        .collect::<Result<_, _>>()
        .map_err(|_| bad())?;
    let ([y, m, dd], [hh, mm, ss]) = (d.as_slice(), t.as_slice()) else {
        return Err(bad());
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y = if *m <= 2 { y - 1 } else { *y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + dd - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Ok(days * 86_400_000 + ((hh * 3600.0 + mm * 60.0 + ss) * 1000.0) as i64)
}

fn log_query(f: &LogFilter, limit: usize, cursor: Option<&str>) -> anyhow::Result<String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let from = f
        .from
        .as_deref()
        .map(parse_time)
        .transpose()?
        .unwrap_or(now - 86_400_000);
    let to =
        f.to.as_deref()
            .map(parse_time)
            .transpose()?
            .unwrap_or(now + 60_000);
    let mut q = vec![
        format!("from={from}"),
        format!("to={to}"),
        format!("limit={limit}"),
    ];
    let enc = |v: &str| {
        v.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    for (k, v) in [
        ("domain", &f.domain),
        ("user", &f.user),
        ("type", &f.category),
        ("session", &f.session),
    ] {
        if let Some(v) = v {
            q.push(format!("{k}={}", enc(v)));
        }
    }
    if let Some(c) = cursor {
        q.push(format!("cursor={}", enc(c)));
    }
    Ok(q.join("&"))
}

fn print_log(entries: &[Value]) {
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                e["at_ms"].as_i64().map(ms_to_rfc3339).unwrap_or_default(),
                s(&e["category"]),
                s(&e["kind"]),
                s(&e["from"]),
                e["to"]
                    .as_array()
                    .map(|a| a.iter().map(s).collect::<Vec<_>>().join(","))
                    .unwrap_or_else(|| s(&e["to"])),
                s(&e["session"]),
            ]
        })
        .collect();
    table(&["time", "type", "kind", "from", "to", "session"], &rows);
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let token = match (&cli.token, &cli.token_file) {
        (Some(t), _) => Some(t.trim().to_string()),
        (None, Some(f)) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("reading {}", f.display()))?
                .trim()
                .to_string(),
        ),
        (None, None) => None,
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut http = reqwest::Client::builder().timeout(std::time::Duration::from_secs(30));
    if let Some(ca) = &cli.ca_file {
        let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        http =
            http.add_root_certificate(reqwest::Certificate::from_pem(&pem).context("the CA file")?);
    }
    let c = Client {
        http: http.build().context("the HTTP client")?,
        api: cli.api.clone(),
        token,
    };
    let json_out = cli.output == Output::Json;
    let print_json =
        |v: &Value| println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    match cli.command {
        Command::Whoami => {
            let v = c.get("/api/v1/whoami").await?;
            if json_out {
                print_json(&v);
            } else {
                table(
                    &["name", "role", "domains"],
                    &[vec![s(&v["name"]), s(&v["role"]), s(&v["domains"])]],
                );
            }
        }
        Command::Policy { command } => match command {
            PolicyCommand::Export { format, out } => {
                let f = match format {
                    Format::Toml => "toml",
                    Format::Json => "json",
                };
                let r = c
                    .send(
                        c.http
                            .get(c.url(&format!("/api/v1/policy/export?format={f}"))),
                    )
                    .await?;
                let text = r.text().await.map_err(|e| Failure {
                    code: 5,
                    message: e.to_string(),
                })?;
                match out {
                    Some(p) => std::fs::write(&p, text)
                        .with_context(|| format!("writing {}", p.display()))?,
                    None => print!("{text}"),
                }
            }
            PolicyCommand::Diff { file } => {
                let doc = read_policy(&file)?;
                let v = c
                    .call(
                        reqwest::Method::PUT,
                        "/api/v1/policy?dry_run=true",
                        Some(serde_json::to_value(&doc).context("the policy")?),
                    )
                    .await?;
                let changes = v["changes"].as_array().cloned().unwrap_or_default();
                if json_out {
                    print_json(&v);
                } else if changes.is_empty() {
                    println!("no changes (version {})", s(&v["base_version"]));
                } else {
                    print_changes(&changes);
                }
                if !changes.is_empty() {
                    return Err(Failure {
                        code: 2,
                        message: String::new(),
                    });
                }
            }
            PolicyCommand::Apply { file, if_version } => {
                let doc = read_policy(&file)?;
                let mut req = c
                    .http
                    .put(c.url("/api/v1/policy"))
                    .header("x-fedrelay-import", file.display().to_string())
                    .json(&doc);
                if let Some(v) = if_version {
                    req = req.header("if-match", format!("\"{v}\""));
                }
                let v: Value = c.send(req).await?.json().await.unwrap_or(Value::Null);
                if json_out {
                    print_json(&v);
                } else {
                    let changes = v["changes"].as_array().cloned().unwrap_or_default();
                    if changes.is_empty() {
                        println!("no changes; policy at version {}", s(&v["version"]));
                    } else {
                        print_changes(&changes);
                        println!("applied: policy at version {}", s(&v["version"]));
                    }
                }
            }
        },
        Command::Explain { from, to, kind } => {
            let v = c
                .call(
                    reqwest::Method::POST,
                    "/api/v1/explain",
                    Some(json!({"from": from, "to": to, "kind": kind})),
                )
                .await?;
            if json_out {
                print_json(&v);
            } else {
                println!(
                    "{}: {}",
                    if v["allowed"] == true {
                        "allowed"
                    } else {
                        "refused"
                    },
                    s(&v["reason"])
                );
                println!(
                    "decided by: {} {}",
                    s(&v["decided_by"]["type"]),
                    s(&v["decided_by"]["id"])
                );
            }
        }
        Command::Approvals { command } => match command {
            ApprovalCommand::List => {
                let v = c.get("/api/v1/approvals").await?;
                if json_out {
                    print_json(&v);
                } else {
                    let rows: Vec<Vec<String>> = v["pending"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|p| {
                            vec![
                                s(&p["id"]),
                                p["requested_at_ms"]
                                    .as_i64()
                                    .map(ms_to_rfc3339)
                                    .unwrap_or_default(),
                                s(&p["from"]),
                                s(&p["to"]),
                            ]
                        })
                        .collect();
                    table(&["id", "requested", "from", "to"], &rows);
                }
            }
            ApprovalCommand::Approve { id } => {
                decide(&c, &id, "approve", json_out).await?;
            }
            ApprovalCommand::Decline { id } => {
                decide(&c, &id, "decline", json_out).await?;
            }
        },
        Command::Log { command } => match command {
            LogCommand::Tail {
                filter,
                limit,
                follow,
            } => {
                // The newest `limit` entries of the range (the last hour unless --from says
                // otherwise): pages are oldest first, so walk them and keep the end.
                let filter = LogFilter {
                    from: filter.from.clone().or_else(|| {
                        let now = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_millis() as i64)
                            .unwrap_or(0);
                        Some((now - 3_600_000).to_string())
                    }),
                    ..filter
                };
                let mut entries: std::collections::VecDeque<Value> =
                    std::collections::VecDeque::new();
                let mut cursor: Option<String> = None;
                loop {
                    let q = log_query(&filter, 1000, cursor.as_deref())?;
                    let v = c.get(&format!("/api/v1/log?{q}")).await?;
                    for e in v["entries"].as_array().into_iter().flatten() {
                        if entries.len() == limit {
                            entries.pop_front();
                        }
                        entries.push_back(e.clone());
                    }
                    match v["next_cursor"].as_str() {
                        Some(c) => cursor = Some(c.to_string()),
                        None => break,
                    }
                }
                let entries: Vec<Value> = entries.into_iter().collect();
                if json_out {
                    for e in &entries {
                        println!("{e}");
                    }
                } else {
                    print_log(&entries);
                }
                if follow {
                    let mut last = entries
                        .last()
                        .and_then(|e| e["at_ms"].as_i64())
                        .unwrap_or(0);
                    let mut seen: std::collections::HashSet<String> =
                        entries.iter().map(|e| e.to_string()).collect();
                    loop {
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        let f = LogFilter {
                            from: Some(last.to_string()),
                            to: None,
                            ..filter.clone()
                        };
                        let v = c
                            .get(&format!("/api/v1/log?{}", log_query(&f, 1000, None)?))
                            .await?;
                        let fresh: Vec<Value> = v["entries"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter(|e| seen.insert(e.to_string()))
                            .cloned()
                            .collect();
                        for e in &fresh {
                            if json_out {
                                println!("{e}");
                            } else {
                                print_log(std::slice::from_ref(e));
                            }
                            last = last.max(e["at_ms"].as_i64().unwrap_or(last));
                        }
                    }
                }
            }
            LogCommand::Export {
                filter,
                format,
                out,
            } => {
                let f = match format {
                    ExportFormat::Csv => "csv",
                    ExportFormat::Ndjson => "ndjson",
                };
                let q = log_query(&filter, 1000, None)?;
                let mut r = c
                    .send(
                        c.http
                            .get(c.url(&format!("/api/v1/log/export?{q}&format={f}"))),
                    )
                    .await?;
                let mut sink: Box<dyn std::io::Write> = match out {
                    Some(p) => Box::new(
                        std::fs::File::create(&p)
                            .with_context(|| format!("creating {}", p.display()))?,
                    ),
                    None => Box::new(std::io::stdout()),
                };
                while let Some(chunk) = r.chunk().await.map_err(|e| Failure {
                    code: 5,
                    message: e.to_string(),
                })? {
                    sink.write_all(&chunk).context("writing the export")?;
                }
            }
        },
        Command::Usage {
            command: UsageCommand::Report { months, csv },
        } => {
            if csv {
                let r = c
                    .send(
                        c.http
                            .get(c.url(&format!("/api/v1/usage?months={months}&format=csv"))),
                    )
                    .await?;
                print!("{}", r.text().await.unwrap_or_default());
            } else {
                let v = c.get(&format!("/api/v1/usage?months={months}")).await?;
                if json_out {
                    print_json(&v);
                } else {
                    print_usage(&v);
                }
            }
        }
        Command::Token { command } => match command {
            TokenCommand::Create {
                name,
                role,
                domains,
                expires_in_days,
            } => {
                let v = c
                    .call(
                        reqwest::Method::POST,
                        "/api/v1/tokens",
                        Some(json!({"name": name, "role": role, "domains": domains, "expires_in_days": expires_in_days})),
                    )
                    .await?;
                if json_out {
                    print_json(&v);
                } else {
                    println!("{}", s(&v["token"]));
                    eprintln!(
                        "token {} ({}) expires {}; it is shown only now",
                        s(&v["id"]),
                        s(&v["role"]),
                        v["expires_at_ms"]
                            .as_i64()
                            .map(ms_to_rfc3339)
                            .unwrap_or_default()
                    );
                }
            }
            TokenCommand::List => {
                let v = c.get("/api/v1/tokens").await?;
                if json_out {
                    print_json(&v);
                } else {
                    let rows: Vec<Vec<String>> = v
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|t| {
                            let state = if t["revoked_at_ms"].is_i64() {
                                "revoked"
                            } else {
                                "active"
                            };
                            vec![
                                s(&t["id"]),
                                s(&t["name"]),
                                s(&t["role"]),
                                t["domains"]
                                    .as_array()
                                    .map(|d| d.iter().map(s).collect::<Vec<_>>().join(","))
                                    .unwrap_or_default(),
                                t["expires_at_ms"]
                                    .as_i64()
                                    .map(ms_to_rfc3339)
                                    .unwrap_or_default(),
                                state.to_string(),
                            ]
                        })
                        .collect();
                    table(
                        &["id", "name", "role", "domains", "expires", "state"],
                        &rows,
                    );
                }
            }
            TokenCommand::Revoke { id } => {
                let v = c
                    .call(
                        reqwest::Method::DELETE,
                        &format!("/api/v1/tokens/{id}"),
                        None,
                    )
                    .await?;
                if json_out {
                    print_json(&v);
                } else {
                    println!("token {} revoked", s(&v["id"]));
                }
            }
        },
        Command::Forget { user } => {
            let v = c
                .call(
                    reqwest::Method::POST,
                    &format!("/api/v1/users/{user}/forget"),
                    None,
                )
                .await?;
            if json_out {
                print_json(&v);
            } else {
                println!("{user} forgotten: {}", s(&v["summary"]));
            }
        }
        Command::Audit { since, limit } => {
            let v = c
                .get(&format!("/api/v1/audit?since={since}&limit={limit}"))
                .await?;
            if json_out {
                print_json(&v);
            } else {
                let rows: Vec<Vec<String>> = v["entries"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|e| {
                        let what = match e["changes"].as_array() {
                            Some(c) if !c.is_empty() => c
                                .iter()
                                .map(|c| {
                                    format!("{} {} {}", s(&c["op"]), s(&c["what"]), s(&c["id"]))
                                })
                                .collect::<Vec<_>>()
                                .join("; "),
                            _ => s(&e["detail"]),
                        };
                        vec![
                            e["at_ms"].as_i64().map(ms_to_rfc3339).unwrap_or_default(),
                            s(&e["who"]),
                            s(&e["action"]),
                            s(&e["version"]),
                            what,
                        ]
                    })
                    .collect();
                table(&["time", "who", "action", "version", "what"], &rows);
            }
        }
    }
    Ok(())
}

async fn decide(c: &Client, id: &str, what: &str, json_out: bool) -> Result<(), Failure> {
    let v = c
        .call(
            reqwest::Method::POST,
            &format!("/api/v1/approvals/{id}/{what}"),
            None,
        )
        .await?;
    if json_out {
        println!("{v}");
    } else {
        println!("request {id}: {}", s(&v["decision"]));
    }
    Ok(())
}

fn read_policy(file: &std::path::Path) -> anyhow::Result<PolicyDoc> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    PolicyDoc::parse(&text).with_context(|| format!("{}", file.display()))
}

fn print_changes(changes: &[Value]) {
    for ch in changes {
        let sign = match ch["op"].as_str() {
            Some("added") => '+',
            Some("removed") => '-',
            _ => '~',
        };
        println!("{sign} {} {}", s(&ch["what"]), s(&ch["id"]));
        if let Some(b) = ch.get("before").filter(|b| !b.is_null()) {
            println!("    before: {b}");
        }
        if let Some(a) = ch.get("after").filter(|a| !a.is_null()) {
            println!("    after:  {a}");
        }
    }
}

fn print_usage(v: &Value) {
    let rows: Vec<Vec<String>> = v["periods"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            vec![
                s(&m["period"]),
                s(&m["messages"]),
                s(&m["unique_users"]),
                s(&m["errors"]),
            ]
        })
        .collect();
    table(&["month", "messages", "unique users", "errors"], &rows);
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if !f.message.is_empty() {
                eprintln!("relayctl: {}", f.message);
            }
            ExitCode::from(f.code)
        }
    }
}
