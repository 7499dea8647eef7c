//! The cluster on real processes — one `etcd`, one `redis-server` and one to four
//! `relay-node`s on loopback — measured from outside, over the HTTP edge:
//!
//! - **cpu**: relay CPU per message, one node against three. An open-loop, fixed-rate load of
//!   1:1 messages over many sessions, all POSTed to n1's HTTP edge (so with three nodes about
//!   2/3 of it is forwarded over gRPC to the session's owner), read back from b.example's
//!   event stream (every message checked: none lost, none twice). Relay CPU is the sum of
//!   utime + stime (`/proc/<pid>/stat`) of every relay-node over the measured window, divided
//!   by the messages of that window. Both sizes run with `membership = "etcd"`; rounds
//!   alternate 1, 3, 1, 3 … so drift of the shared machine hits both alike.
//! - **presence**: three nodes; N users of b.example accept alice's contact request
//!   (`contact_response`, spread over the nodes); one `presence` to `"*"` at n1; the time until
//!   the last of the N presence events is read from b.example's stream.
//! - **failover**: three nodes, lease TTL 3 s, a light paced load; kill -9 of n2; the time
//!   until every session n2 owned accepts a message again at a survivor (same event id,
//!   re-POSTed every 20 ms while refused).
//! - **join**: the share of 10,000 sessions whose owner changes from three members to four
//!   (by the cluster's own rendezvous hash); then, on the three-node cluster of the last cpu
//!   round, a fourth node joins, every session gets one more message, and every node must
//!   host exactly the sessions the hash gives it (`GET /cluster`, `sessions_active`).
//!
//! `cargo bench -p relay-node --bench cluster` passes `--bench`: full sizes (a few minutes;
//! cargo builds the bench-profile `relay-node` into `target/release`, next to this binary).
//! Without `--bench` — as `cargo test --workspace --all-targets` runs it — a smoke version of
//! every scenario (seconds) checks that everything still works. Any broken check fails the run.
//!
//! Flags (after `cargo bench … --`): `--out FILE` (JSON results), `--only cpu,presence,failover,join`,
//! `--rate N` (msg/s), `--warmup S`, `--duration S`, `--pairs N`, `--rounds N`,
//! `--subscribers N`, `--concurrency N`, `--failover-pairs N`, `--moved-sessions N`,
//! `--idle S` (relay CPU with no load, sampled before each cpu round), `--node-env
//! FEDRELAY_KEY=VALUE` (a config override for every node; repeatable).

#[path = "../tests/common/mod.rs"]
mod common;

use anyhow::{Context, Result, bail, ensure};
use common::cluster::{
    Cluster, Examples, NodeConfig, View, etcd_section, lock, message_body, node_id, outbox_end,
    owners_by_hash, parse_text, seq_gaps, stream_id,
};
use common::{SECRET_A, SECRET_B, Stream, now_secs, signed_request};
use fedrelay_proto::Address;
use futures::StreamExt;
use relay_loadtest::stats::{MachineInfo, clock_ticks_per_sec, read_cpu};
use serde_json::{Value, json};
use session_actor::SessionId;
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::task::JoinHandle;

/// Generous bound of the waits for conditions.
const T: Duration = Duration::from_secs(30);
/// How often a refused POST is tried again.
const RETRY_EVERY: Duration = Duration::from_millis(20);
/// Timeout of one POST.
const POST_TIMEOUT: Duration = Duration::from_secs(5);
/// Lease TTL of the nodes, and of the failover scenario's nodes.
const LEASE_TTL: u64 = 5;
const FAILOVER_LEASE_TTL: u64 = 3;
/// Concurrent POSTs of the open-loop generator at most (a later one waits, its latency still
/// counted from its intended time).
const MAX_INFLIGHT: usize = 2048;

/// A line on stderr: progress while the bench runs (`eprintln!` is denied by lint).
macro_rules! note {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

// === options =====================================================================

#[derive(Debug, Clone)]
struct Opts {
    full: bool,
    out: Option<PathBuf>,
    scenarios: Vec<String>,
    rate: f64,
    warmup: Duration,
    duration: Duration,
    pairs: usize,
    rounds: usize,
    subscribers: usize,
    concurrency: usize,
    failover_pairs: usize,
    moved_sessions: usize,
    /// Relay CPU with no load is sampled this long before each cpu round's load.
    idle: Duration,
    /// `FEDRELAY_*` overrides every node starts with (`--node-env KEY=VALUE`, repeatable),
    /// e.g. `FEDRELAY_RUNTIME__WORKER_THREADS=1`.
    node_env: Vec<(String, String)>,
    /// `--list` (test runners asking what is in here): nothing to list, nothing to run.
    list: bool,
    /// Arguments a test runner may pass that mean nothing here (`--nocapture`, filters).
    ignored: Vec<String>,
}

const SCENARIOS: [&str; 4] = ["cpu", "presence", "failover", "join"];

impl Opts {
    fn new(full: bool) -> Self {
        let scenarios = SCENARIOS.iter().map(|s| s.to_string()).collect();
        if full {
            Self {
                full,
                out: None,
                scenarios,
                rate: 2000.0,
                warmup: Duration::from_secs(3),
                duration: Duration::from_secs(15),
                pairs: 500,
                rounds: 2,
                subscribers: 10_000,
                concurrency: 64,
                failover_pairs: 60,
                moved_sessions: 10_000,
                idle: Duration::from_secs(3),
                node_env: Vec::new(),
                list: false,
                ignored: Vec::new(),
            }
        } else {
            Self {
                full,
                out: None,
                scenarios,
                rate: 100.0,
                warmup: Duration::from_millis(500),
                duration: Duration::from_millis(1500),
                pairs: 50,
                rounds: 1,
                subscribers: 200,
                concurrency: 16,
                failover_pairs: 15,
                moved_sessions: 10_000,
                idle: Duration::from_millis(500),
                node_env: Vec::new(),
                list: false,
                ignored: Vec::new(),
            }
        }
    }

    fn parse(args: Vec<String>) -> Result<Self> {
        let mut o = Self::new(args.iter().any(|a| a == "--bench"));
        let mut it = args.into_iter();
        while let Some(arg) = it.next() {
            let (key, inline) = match arg.split_once('=') {
                Some((k, v)) if k.starts_with("--") => (k.to_string(), Some(v.to_string())),
                _ => (arg.clone(), None),
            };
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| it.next())
                    .with_context(|| format!("{key} needs a value"))
            };
            match key.as_str() {
                "--bench" => {}
                "--list" => o.list = true,
                "--out" => o.out = Some(value()?.into()),
                "--only" => {
                    let v = value()?;
                    o.scenarios = v.split(',').map(|s| s.trim().to_string()).collect();
                    for s in &o.scenarios {
                        ensure!(
                            SCENARIOS.contains(&s.as_str()),
                            "--only: unknown scenario {s:?} (known: {SCENARIOS:?})"
                        );
                    }
                }
                "--rate" => o.rate = value()?.parse().context("--rate")?,
                "--warmup" => o.warmup = secs_arg(&value()?).context("--warmup")?,
                "--duration" => o.duration = secs_arg(&value()?).context("--duration")?,
                "--pairs" => o.pairs = value()?.parse().context("--pairs")?,
                "--rounds" => o.rounds = value()?.parse().context("--rounds")?,
                "--subscribers" => o.subscribers = value()?.parse().context("--subscribers")?,
                "--concurrency" => o.concurrency = value()?.parse().context("--concurrency")?,
                "--failover-pairs" => {
                    o.failover_pairs = value()?.parse().context("--failover-pairs")?
                }
                "--idle" => o.idle = secs_arg(&value()?).context("--idle")?,
                "--node-env" => {
                    let kv = value()?;
                    let (k, v) = kv
                        .split_once('=')
                        .with_context(|| format!("--node-env {kv}: not KEY=VALUE"))?;
                    ensure!(
                        k.starts_with("FEDRELAY_"),
                        "--node-env {k}: not a FEDRELAY_ variable"
                    );
                    o.node_env.push((k.to_string(), v.to_string()));
                }
                "--moved-sessions" => {
                    o.moved_sessions = value()?.parse().context("--moved-sessions")?
                }
                _ => o.ignored.push(arg),
            }
        }
        ensure!(o.rate > 0.0, "--rate must be positive");
        ensure!(!o.duration.is_zero(), "--duration must be positive");
        ensure!(
            o.pairs > 0 && o.rounds > 0,
            "--pairs and --rounds must be positive"
        );
        ensure!(
            o.subscribers > 0 && o.concurrency > 0,
            "--subscribers and --concurrency must be positive"
        );
        ensure!(
            o.failover_pairs >= 3 && o.moved_sessions > 0,
            "--failover-pairs must be at least 3, --moved-sessions positive"
        );
        Ok(o)
    }

    fn runs(&self, scenario: &str) -> bool {
        self.scenarios.iter().any(|s| s == scenario)
    }
}

fn secs_arg(s: &str) -> Result<Duration> {
    let v: f64 = s.trim_end_matches('s').parse()?;
    ensure!(v >= 0.0 && v.is_finite(), "not a duration in seconds: {s}");
    Ok(Duration::from_secs_f64(v))
}

// === the cluster =================================================================

/// The config of node `i`: the HTTP-edge test config (domains a–d) with an etcd `[cluster]`
/// section, at the node's defaults for sessions and the store (not the tests' fast retries).
fn node_config(lease_ttl: u64) -> NodeConfig {
    Box::new(move |redis_url, etcd, name, i| {
        common::cluster::node_config(
            redis_url,
            &etcd_section(name, etcd, lease_ttl),
            i,
            &[
                ("response_timeout_ms = 500\n", ""),
                (
                    "[session]\nretry_base_ms = 20\nretry_max_ms = 200\nack_flush_ms = 10\n",
                    "",
                ),
            ],
        )
    })
}

/// Starts Redis, etcd and `n` nodes (with the `--node-env` overrides), and waits until all of
/// them see all of them.
async fn start_cluster(name: &str, n: usize, lease_ttl: u64, opts: &Opts) -> Result<Cluster> {
    Cluster::start(name, n, node_config(lease_ttl), opts.node_env.clone(), T).await
}

/// The session of pair `p`: alice-p@a.example ↔ bob-p@b.example.
fn pair_session(p: usize) -> SessionId {
    SessionId::one_to_one(
        &Address::new("http", "a.example", format!("alice-{p}")),
        &Address::new("http", "b.example", format!("bob-{p}")),
    )
}

/// The owning node (index) of each of pairs `0..pairs` over members `n1..n{members}`, by the
/// cluster's own rendezvous hash.
fn owners(pairs: usize, members: usize) -> Result<Vec<usize>> {
    let nodes: Vec<usize> = (0..members).collect();
    let sessions: Vec<SessionId> = (0..pairs).map(pair_session).collect();
    owners_by_hash(&nodes, &sessions)
}

// === posting =======================================================================

/// What a 202 named.
#[derive(Debug, Clone)]
struct Ack {
    relay_msg_id: String,
    session_id: String,
    seq: u64,
    duplicate: bool,
}

enum Answer {
    Accepted(Ack),
    /// 5xx, 429, or no answer: worth trying again.
    Retry(String),
    /// Anything else: a bug.
    Refused(String),
}

fn post_client() -> Result<reqwest::Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Ok(reqwest::Client::builder()
        .timeout(POST_TIMEOUT)
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .build()?)
}

async fn post_event(
    client: &reqwest::Client,
    base: &str,
    domain: &str,
    secret: &str,
    body: &[u8],
) -> Answer {
    let sent = signed_request(
        client,
        base,
        domain,
        secret,
        now_secs(),
        body,
        "application/json",
    )
    .send()
    .await;
    let resp = match sent {
        Ok(r) => r,
        Err(e) => return Answer::Retry(format!("{e}")),
    };
    let status = resp.status().as_u16();
    let text = match resp.text().await {
        Ok(t) => t,
        Err(e) => return Answer::Retry(format!("{status}, then {e}")),
    };
    match status {
        202 => {
            let parsed: Result<Ack> = (|| {
                let v: Value = serde_json::from_str(&text)?;
                Ok(Ack {
                    relay_msg_id: v["relay_msg_id"].as_str().context("relay_msg_id")?.into(),
                    session_id: v["session_id"].as_str().context("session_id")?.into(),
                    seq: v["seq"].as_u64().context("seq")?,
                    duplicate: v["duplicate"].as_bool().unwrap_or(false),
                })
            })();
            match parsed {
                Ok(a) => Answer::Accepted(a),
                Err(e) => Answer::Refused(format!("202 with {text}: {e}")),
            }
        }
        s if s >= 500 || s == 429 => Answer::Retry(format!("{s}: {text}")),
        s => Answer::Refused(format!("{s}: {text}")),
    }
}

/// POSTs `body` until it is accepted, every [`RETRY_EVERY`] while refused retryably, to
/// `bases` in turn; the acknowledgement, when, and the attempts it took.
async fn post_until_accepted(
    client: &reqwest::Client,
    bases: &[String],
    domain: &str,
    secret: &str,
    body: &[u8],
    timeout: Duration,
) -> Result<(Ack, Instant, u32)> {
    let deadline = Instant::now() + timeout;
    let mut attempts = 0u32;
    loop {
        let base = bases
            .get(attempts as usize % bases.len().max(1))
            .context("no node to post to")?;
        attempts += 1;
        match post_event(client, base, domain, secret, body).await {
            Answer::Accepted(a) => return Ok((a, Instant::now(), attempts)),
            Answer::Refused(e) => bail!("{base} refused an event: {e}"),
            Answer::Retry(e) if Instant::now() >= deadline => {
                bail!("not accepted within {timeout:?} ({attempts} attempts; last: {e})")
            }
            Answer::Retry(_) => tokio::time::sleep(RETRY_EVERY).await,
        }
    }
}

// === reading b.example's stream ====================================================

/// One event of the stream, and when it was read.
struct Seen {
    at: Instant,
    id: String,
    data: Value,
}

struct ReaderShared {
    seen: Mutex<Vec<Seen>>,
    failed: Mutex<Option<String>>,
}

/// Reads b.example's `/v1/stream` at one node, from the start of the outbox.
struct Reader {
    shared: Arc<ReaderShared>,
    stop: tokio::sync::watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Reader {
    async fn start(base: &str) -> Result<Self> {
        let client = common::client()?;
        let mut stream = Stream::open(&client, base, "b.example", SECRET_B, Some("$")).await?;
        let shared = Arc::new(ReaderShared {
            seen: Mutex::new(Vec::new()),
            failed: Mutex::new(None),
        });
        let (stop, mut stop_rx) = tokio::sync::watch::channel(false);
        let sh = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop_rx.changed() => return,
                    ev = stream.next(Duration::from_secs(3600)) => match ev {
                        Ok(ev) => lock(&sh.seen).push(Seen { at: Instant::now(), id: ev.id, data: ev.data }),
                        Err(e) => {
                            *lock(&sh.failed) = Some(format!("{e:#}"));
                            return;
                        }
                    },
                }
            }
        });
        Ok(Self { shared, stop, task })
    }

    /// Feeds every event read so far, then each new one, to `feed` until it answers true.
    async fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        mut feed: impl FnMut(&[Seen]) -> bool,
    ) -> Result<()> {
        wait_streams(std::slice::from_ref(self), what, timeout, |_, new| {
            feed(new)
        })
        .await
    }

    /// Waits until the reader has read up to the outbox's end as it is now, so that a late
    /// second copy of anything (appended before that end) has been read too.
    async fn wait_outbox_end(&self, redis_url: &str) -> Result<()> {
        let Some(end) = outbox_end(redis_url, "b.example").await? else {
            return Ok(());
        };
        self.wait_until("the reader at the outbox's end", T, |new| {
            new.iter()
                .any(|s| stream_id(&s.id).is_some_and(|id| id >= end))
        })
        .await
    }

    async fn stop(self) -> Result<Vec<Seen>> {
        self.stop.send_replace(true);
        self.task.await?;
        let seen = std::mem::take(&mut *lock(&self.shared.seen));
        Ok(seen)
    }
}

/// Feeds the events each of `readers` read so far, then each new one, to `feed` (with the
/// reader's index) until it answers true.
async fn wait_streams(
    readers: &[Reader],
    what: &str,
    timeout: Duration,
    mut feed: impl FnMut(usize, &[Seen]) -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut next = vec![0; readers.len()];
    loop {
        let mut done = false;
        for (k, r) in readers.iter().enumerate() {
            let seen = lock(&r.shared.seen);
            done = feed(k, &seen[next[k]..]);
            next[k] = seen.len();
        }
        if done {
            return Ok(());
        }
        for r in readers {
            if let Some(e) = lock(&r.shared.failed).clone() {
                bail!("b.example's stream failed while waiting for {what}: {e}");
            }
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn drain(reader: &Reader, acks: &HashMap<(usize, u64), Ack>, redis_url: &str) -> Result<()> {
    let mut missing: HashSet<&str> = acks.values().map(|a| a.relay_msg_id.as_str()).collect();
    let total = missing.len();
    let r = reader
        .wait_until("every acknowledged message delivered", T, |new| {
            for s in new {
                if let Some(id) = s.data["relay_msg_id"].as_str() {
                    missing.remove(id);
                }
            }
            missing.is_empty()
        })
        .await;
    r.with_context(|| {
        format!(
            "{} of {total} acknowledged messages not delivered",
            missing.len()
        )
    })?;
    reader.wait_outbox_end(redis_url).await
}

// === the delivery contract ========================================================

#[derive(Debug, Default)]
struct Contract {
    acked: usize,
    delivered: usize,
    lost: usize,
    duplicates: usize,
    mismatched: usize,
    unexpected: usize,
    seq_gaps: u64,
    examples: Examples,
}

impl Contract {
    fn holds(&self) -> bool {
        self.lost == 0
            && self.duplicates == 0
            && self.mismatched == 0
            && self.unexpected == 0
            && self.seq_gaps == 0
    }

    fn summary(&self) -> String {
        format!(
            "acked {}, delivered {}, lost {}, duplicates {}, id mismatches {}, unexpected {}, \
             seq gaps {}{}",
            self.acked,
            self.delivered,
            self.lost,
            self.duplicates,
            self.mismatched,
            self.unexpected,
            self.seq_gaps,
            self.examples
                .0
                .iter()
                .map(|e| format!("\n  {e}"))
                .collect::<String>()
        )
    }

    fn json(&self) -> Value {
        json!({
            "acked": self.acked, "delivered": self.delivered, "lost": self.lost,
            "duplicates": self.duplicates, "id_mismatches": self.mismatched,
            "unexpected": self.unexpected, "seq_gaps": self.seq_gaps,
        })
    }
}

/// Every acknowledged message of `run` delivered exactly once, under the (session, seq,
/// relay id) its 202 named, to its recipient; every session's seqs 1..=max delivered (a
/// fresh Redis: nothing else was ever journaled there).
fn check(run: &str, acks: &HashMap<(usize, u64), Ack>, seen: &[Seen]) -> Contract {
    let mut c = Contract {
        acked: acks.len(),
        ..Contract::default()
    };
    let mut copies: HashMap<(usize, u64), usize> = HashMap::new();
    let mut seqs: HashMap<String, HashSet<u64>> = HashMap::new();
    for s in seen.iter().filter(|s| s.data["type"] == "message") {
        let e = &s.data;
        c.delivered += 1;
        let Some((p, idx)) = e["text"].as_str().and_then(|t| parse_text(run, t)) else {
            c.unexpected += 1;
            c.examples.add(format!("unexpected event {}: {e}", s.id));
            continue;
        };
        let n = copies.entry((p, idx)).or_default();
        *n += 1;
        if *n > 1 {
            c.duplicates += 1;
            c.examples
                .add(format!("p{p} m{idx} delivered {n} times, now as {e}"));
        }
        let session = e["session_id"].as_str().unwrap_or_default();
        let seq = e["seq"].as_u64().unwrap_or(0);
        seqs.entry(session.to_string()).or_default().insert(seq);
        match acks.get(&(p, idx)) {
            None => {
                c.unexpected += 1;
                c.examples
                    .add(format!("p{p} m{idx} delivered but never acknowledged"));
            }
            Some(a) => {
                if a.relay_msg_id != e["relay_msg_id"].as_str().unwrap_or_default()
                    || a.session_id != session
                    || a.seq != seq
                    || session != pair_session(p).to_hex()
                    || e["to"] != format!("bob-{p}@b.example").as_str()
                {
                    c.mismatched += 1;
                    c.examples.add(format!(
                        "p{p} m{idx} acked as ({}, {}, {}), delivered as {e}",
                        a.session_id, a.seq, a.relay_msg_id
                    ));
                }
            }
        }
    }
    for (&(p, idx), a) in acks {
        if !copies.contains_key(&(p, idx)) {
            c.lost += 1;
            c.examples.add(format!(
                "p{p} m{idx} acked as seq {} never delivered",
                a.seq
            ));
        }
    }
    for (session, gaps, max) in seq_gaps(&seqs) {
        c.seq_gaps += gaps;
        c.examples.add(format!(
            "session {session}: {gaps} of seqs 1..={max} never delivered"
        ));
    }
    c
}

/// Reads every acknowledged message of `run` (and the outbox to its end), stops the reader and
/// checks the delivery contract; fails when it is broken.
async fn read_and_check(
    reader: Reader,
    run: &str,
    acks: &HashMap<(usize, u64), Ack>,
    redis_url: &str,
) -> Result<Contract> {
    drain(&reader, acks, redis_url).await?;
    let seen = reader.stop().await?;
    let contract = check(run, acks, &seen);
    note!("cluster bench: {run}: contract: {}", contract.summary());
    ensure!(
        contract.holds(),
        "delivery contract broken: {}",
        contract.summary()
    );
    Ok(contract)
}

// === cpu (and join): relay CPU per message, 1 node vs 3 ===========================

/// One POST of the open-loop load.
struct Sent {
    pair: usize,
    idx: u64,
    intended: Instant,
    latency: Duration,
    answer: Result<Ack, String>,
}

/// Message `i` is due at `t0 + i / rate`, whatever happened to earlier ones; all go to `base`.
async fn open_loop(
    client: &reqwest::Client,
    base: &str,
    run: &str,
    pairs: usize,
    rate: f64,
    total: u64,
    t0: Instant,
) -> Result<Vec<Sent>> {
    let sem = Arc::new(tokio::sync::Semaphore::new(MAX_INFLIGHT));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        let intended = t0 + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(intended.into()).await;
        let permit = sem.clone().acquire_owned().await?;
        let (client, base, run) = (client.clone(), base.to_string(), run.to_string());
        tasks.spawn(async move {
            let _permit = permit;
            let pair = (i % pairs as u64) as usize;
            let answer = match message_body(&run, pair, i) {
                Ok(body) => match post_event(&client, &base, "a.example", SECRET_A, &body).await {
                    Answer::Accepted(a) => Ok(a),
                    Answer::Retry(e) | Answer::Refused(e) => Err(e),
                },
                Err(e) => Err(format!("{e:#}")),
            };
            Sent {
                pair,
                idx: i,
                intended,
                latency: intended.elapsed(),
                answer,
            }
        });
    }
    let mut out = Vec::with_capacity(total as usize);
    while let Some(s) = tasks.join_next().await {
        out.push(s?);
    }
    Ok(out)
}

/// CPU ticks of some processes at one moment.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    relay: u64,
    redis: u64,
    me: u64,
}

fn sample(relay: &[u32], redis: Option<u32>) -> Result<Sample> {
    let mut relay_ticks = 0;
    for &pid in relay {
        relay_ticks += read_cpu(Some(pid))?.total();
    }
    Ok(Sample {
        at: Instant::now(),
        relay: relay_ticks,
        redis: match redis {
            Some(p) => read_cpu(Some(p))?.total(),
            None => 0,
        },
        me: read_cpu(None)?.total(),
    })
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let k = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[k - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The figures of one cpu round.
#[derive(Debug, Clone)]
struct CpuRun {
    round: usize,
    nodes: usize,
    sent: usize,
    window_messages: usize,
    window_secs: f64,
    relay_cpu_secs: f64,
    relay_us_per_msg: f64,
    relay_cores: f64,
    /// Relay cores busy before the load, with nothing to do.
    idle_cores: f64,
    redis_us_per_msg: f64,
    harness_us_per_msg: f64,
    forwarded_fraction: f64,
    post_p50_ms: f64,
    post_p99_ms: f64,
    post_p999_ms: f64,
    post_max_ms: f64,
    contract: Value,
}

impl CpuRun {
    fn json(&self) -> Value {
        json!({
            "round": self.round, "nodes": self.nodes, "sent": self.sent,
            "window_messages": self.window_messages, "window_secs": self.window_secs,
            "relay_cpu_secs": self.relay_cpu_secs, "relay_us_per_msg": self.relay_us_per_msg,
            "relay_cores": self.relay_cores, "relay_idle_cores": self.idle_cores,
            "redis_us_per_msg": self.redis_us_per_msg,
            "harness_us_per_msg": self.harness_us_per_msg,
            "forwarded_fraction": self.forwarded_fraction,
            "post_latency_ms": {"p50": self.post_p50_ms, "p99": self.post_p99_ms, "p999": self.post_p999_ms, "max": self.post_max_ms},
            "contract": self.contract,
        })
    }
}

/// What the join measured on the running cluster.
#[derive(Debug, Clone)]
struct JoinRun {
    sessions: usize,
    converged_secs: f64,
    expected: Vec<usize>,
    hosted: Vec<u64>,
}

async fn cpu_round(
    opts: &Opts,
    round: usize,
    nodes: usize,
    join: bool,
) -> Result<(CpuRun, Option<JoinRun>)> {
    let name = format!("cpu-{nodes}n-r{round}");
    let mut cl = start_cluster(&name, nodes, LEASE_TTL, opts).await?;
    let r = cpu_round_on(opts, &mut cl, round, &name, join).await;
    cl.explain(r)
}

async fn cpu_round_on(
    opts: &Opts,
    cl: &mut Cluster,
    round: usize,
    run: &str,
    join: bool,
) -> Result<(CpuRun, Option<JoinRun>)> {
    let nodes = cl.nodes.len();
    let client = post_client()?;
    let entry = cl.url(0)?;
    let reader = Reader::start(&entry).await?;
    let total = ((opts.warmup + opts.duration).as_secs_f64() * opts.rate).round() as u64;
    let ticks = clock_ticks_per_sec();

    let pids = cl.relay_pids();
    ensure!(pids.len() == nodes, "a relay node is not running");
    let redis_pid = cl.redis.pid();
    // What the nodes spend with nothing to do (leases, timers, the idle stream): the
    // measurement's length is the bench's parameter.
    let idle0 = sample(&pids, redis_pid)?;
    tokio::time::sleep(opts.idle).await;
    let idle1 = sample(&pids, redis_pid)?;
    let idle_cores = idle1.relay.saturating_sub(idle0.relay) as f64
        / ticks as f64
        / (idle1.at - idle0.at).as_secs_f64().max(1e-9);

    // The window's CPU, sampled by a task of its own at the window's edges.
    let t0 = Instant::now() + Duration::from_millis(50);
    let (w0, w1) = (t0 + opts.warmup, t0 + opts.warmup + opts.duration);
    let sampler = tokio::spawn(async move {
        tokio::time::sleep_until(w0.into()).await;
        let a = sample(&pids, redis_pid)?;
        tokio::time::sleep_until(w1.into()).await;
        let b = sample(&pids, redis_pid)?;
        Ok::<_, anyhow::Error>((a, b))
    });
    let sent = open_loop(&client, &entry, run, opts.pairs, opts.rate, total, t0).await?;
    let (a, b) = sampler.await??;

    let failed: Vec<String> = sent
        .iter()
        .filter_map(|s| {
            s.answer
                .as_ref()
                .err()
                .map(|e| format!("p{} m{}: {e}", s.pair, s.idx))
        })
        .collect();
    ensure!(
        failed.is_empty(),
        "{} of {} POSTs were not accepted, e.g. {:?}",
        failed.len(),
        sent.len(),
        &failed[..failed.len().min(5)]
    );
    let mut acks: HashMap<(usize, u64), Ack> = HashMap::new();
    for s in &sent {
        if let Ok(a) = &s.answer {
            acks.insert((s.pair, s.idx), a.clone());
        }
    }
    let in_window: Vec<&Sent> = sent
        .iter()
        .filter(|s| s.intended >= w0 && s.intended < w1)
        .collect();
    let mut lat: Vec<Duration> = in_window.iter().map(|s| s.latency).collect();
    lat.sort();
    let forwarded = cl.metric_sum("fedrelay_forwarded_total").await?;

    let joined = if join {
        Some(join_on(opts, cl, &client, run, total, &mut acks).await?)
    } else {
        None
    };

    let contract = read_and_check(reader, run, &acks, &cl.redis.url()).await?;

    let window_secs = (b.at - a.at).as_secs_f64();
    let per_msg =
        |ticks_used: u64| ticks_used as f64 / ticks as f64 * 1e6 / in_window.len().max(1) as f64;
    let relay_cpu_secs = b.relay.saturating_sub(a.relay) as f64 / ticks as f64;
    let figures = CpuRun {
        round,
        nodes,
        sent: sent.len(),
        window_messages: in_window.len(),
        window_secs,
        relay_cpu_secs,
        relay_us_per_msg: per_msg(b.relay.saturating_sub(a.relay)),
        relay_cores: relay_cpu_secs / window_secs.max(1e-9),
        idle_cores,
        redis_us_per_msg: per_msg(b.redis.saturating_sub(a.redis)),
        harness_us_per_msg: per_msg(b.me.saturating_sub(a.me)),
        forwarded_fraction: forwarded / sent.len().max(1) as f64,
        post_p50_ms: ms(percentile(&lat, 0.50)),
        post_p99_ms: ms(percentile(&lat, 0.99)),
        post_p999_ms: ms(percentile(&lat, 0.999)),
        post_max_ms: ms(lat.last().copied().unwrap_or_default()),
        contract: contract.json(),
    };
    note!(
        "cluster bench: {}: relay {:.1} µs/msg ({:.2} cores, {:.3} idle), Redis {:.1} µs/msg, \
         harness {:.1} µs/msg, forwarded {:.2}, POST p50 {:.2} ms p99 {:.2} ms",
        run_name(round, nodes),
        figures.relay_us_per_msg,
        figures.relay_cores,
        figures.idle_cores,
        figures.redis_us_per_msg,
        figures.harness_us_per_msg,
        figures.forwarded_fraction,
        figures.post_p50_ms,
        figures.post_p99_ms
    );
    Ok((figures, joined))
}

fn run_name(round: usize, nodes: usize) -> String {
    format!("round {round}, {nodes} node(s)")
}

/// A fourth node joins the (loaded) cluster; every pair gets one more message (at n1); then
/// every node must host exactly the sessions the rendezvous hash over four gives it.
async fn join_on(
    opts: &Opts,
    cl: &mut Cluster,
    client: &reqwest::Client,
    run: &str,
    first_idx: u64,
    acks: &mut HashMap<(usize, u64), Ack>,
) -> Result<JoinRun> {
    let old: Vec<usize> = (0..cl.nodes.len()).collect();
    ensure!(old.len() == 3, "the join starts from three nodes");
    let started = Instant::now();
    let new = cl.add_node().await?;
    let all: Vec<usize> = (0..=new).collect();
    cl.wait_converged(&all, T).await?;
    let converged = started.elapsed();

    // Touch every session once more, so that each runs where it belongs now.
    let bases = vec![cl.url(0)?];
    let touched: Vec<(usize, u64, Ack)> = futures::stream::iter(0..opts.pairs)
        .map(|p| {
            let bases = &bases;
            async move {
                let idx = first_idx + p as u64;
                let body = message_body(run, p, idx)?;
                let (a, _, _) =
                    post_until_accepted(client, bases, "a.example", SECRET_A, &body, T).await?;
                Ok::<_, anyhow::Error>((p, idx, a))
            }
        })
        .buffer_unordered(opts.concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    for (p, idx, a) in touched {
        acks.insert((p, idx), a);
    }

    let own = owners(opts.pairs, all.len())?;
    let expected: Vec<usize> = all
        .iter()
        .map(|&i| own.iter().filter(|&&o| o == i).count())
        .collect();
    let want: Vec<Option<u64>> = expected.iter().map(|&n| Some(n as u64)).collect();
    let last = Mutex::new(String::new());
    let r = test_support::wait_for(
        "every node to host the sessions it owns, and handoffs to end",
        T,
        || async {
            let views = cl.views(&all).await.ok()?;
            let hosted: Vec<Option<u64>> = views.iter().map(View::own_sessions).collect();
            let handoffs: Vec<Option<u64>> = views.iter().map(|v| v.handoffs_in_flight).collect();
            *lock(&last) = format!("hosted {hosted:?}, handoffs {handoffs:?}");
            (hosted == want && handoffs.iter().all(|h| *h == Some(0))).then_some(hosted)
        },
    )
    .await;
    let hosted = r.with_context(|| format!("want {want:?}; last seen {}", lock(&last)))?;
    Ok(JoinRun {
        sessions: opts.pairs,
        converged_secs: converged.as_secs_f64(),
        expected,
        hosted: hosted.into_iter().map(|h| h.unwrap_or(0)).collect(),
    })
}

/// The share of `n` sessions whose owner changes when n4 joins n1..n3, and whether every one
/// of them moved to n4.
fn moved_fraction(n: usize) -> Result<(f64, bool)> {
    let (before, after) = (owners(n, 3)?, owners(n, 4)?);
    let moved: Vec<usize> = (0..n).filter(|&p| before[p] != after[p]).collect();
    let all_to_new = moved.iter().all(|&p| after[p] == 3);
    Ok((moved.len() as f64 / n as f64, all_to_new))
}

// === presence fan-out ============================================================

#[derive(Debug, Clone)]
struct PresenceRun {
    subscribers: usize,
    setup_secs: f64,
    post_answered_secs: f64,
    /// The first subscriber's event, first read on any stream.
    first_event_secs: f64,
    /// The last subscriber's event, first read on any stream.
    last_event_secs: f64,
    /// When each stream (one per node) had read all of them.
    stream_secs: Vec<f64>,
    /// Events read, over all streams.
    events: usize,
}

async fn presence(opts: &Opts) -> Result<PresenceRun> {
    let cl = start_cluster("presence", 3, LEASE_TTL, opts).await?;
    let r = presence_on(opts, &cl).await;
    cl.explain(r)
}

async fn presence_on(opts: &Opts, cl: &Cluster) -> Result<PresenceRun> {
    let n = opts.subscribers;
    let client = post_client()?;
    let bases: Vec<String> = (0..3).map(|i| cl.url(i)).collect::<Result<_>>()?;
    // alice asks users u<i>@b.example to connect and they accept, at n1, n2, n3 in turn.
    let setup = Instant::now();
    let results: Vec<Result<()>> = futures::stream::iter(0..n)
        .map(|i| {
            let (client, base) = (&client, vec![bases[i % 3].clone()]);
            async move {
                let req = json!({"id": format!("req-u{i}"), "type": "contact_request",
                                 "from": "alice", "to": format!("u{i}@b.example")});
                let body = serde_json::to_vec(&req)?;
                post_until_accepted(client, &base, "a.example", SECRET_A, &body, T).await?;
                let ev = json!({"id": format!("cr-u{i}"), "type": "contact_response",
                                "from": format!("u{i}"), "to": "alice@a.example", "accepted": true});
                let body = serde_json::to_vec(&ev)?;
                post_until_accepted(client, &base, "b.example", SECRET_B, &body, T).await?;
                Ok(())
            }
        })
        .buffer_unordered(opts.concurrency)
        .collect()
        .await;
    results.into_iter().collect::<Result<()>>()?;
    let setup_secs = setup.elapsed().as_secs_f64();
    note!(
        "cluster bench: presence: {n} contacts accepted in {setup_secs:.1} s ({:.0}/s)",
        n as f64 / setup_secs
    );

    // A reader per node: an event a node appends wakes that node's streams at once, and the
    // streams at other nodes at their next wake-up (at the latest their poll, once a second).
    let mut readers = Vec::new();
    for b in &bases {
        readers.push(Reader::start(b).await?);
    }
    let ev = json!({"id": "presence-1", "type": "presence", "from": "alice", "to": "*",
                    "availability": "away", "note": "at the bench"});
    let body = serde_json::to_vec(&ev)?;
    let posted = Instant::now();
    let (acc, answered, _) =
        post_until_accepted(&client, &bases[..1], "a.example", SECRET_A, &body, T).await?;
    ensure!(
        acc.seq == 1,
        "alice's first presence has version {}",
        acc.seq
    );

    let is_alices = |s: &Seen| {
        s.data["type"] == "presence"
            && s.data["from"] == "alice@a.example"
            && s.data["availability"] == "away"
    };
    // Each subscriber counts once, when first read on any stream.
    let mut first: HashMap<String, Instant> = HashMap::new();
    let mut per_stream: Vec<HashSet<String>> = vec![HashSet::new(); readers.len()];
    let mut stream_done: Vec<Option<Instant>> = vec![None; readers.len()];
    let wait = T + Duration::from_millis(10 * n as u64);
    let r = wait_streams(
        &readers,
        &format!("{n} subscribers' presence on every stream"),
        wait,
        |k, new| {
            for s in new.iter().filter(|s| is_alices(s)) {
                let to = s.data["to"].as_str().unwrap_or_default().to_string();
                first
                    .entry(to.clone())
                    .and_modify(|t| *t = (*t).min(s.at))
                    .or_insert(s.at);
                if per_stream[k].insert(to) && per_stream[k].len() == n {
                    stream_done[k] = Some(s.at);
                }
            }
            stream_done.iter().all(Option::is_some)
        },
    )
    .await;
    r.with_context(|| {
        format!(
            "{} of {n} subscribers got alice's presence (per stream {:?})",
            first.len(),
            per_stream.iter().map(HashSet::len).collect::<Vec<_>>()
        )
    })?;
    let since = |t: Instant| (t - posted).as_secs_f64();
    let first_at = first.values().min().copied().context("no presence event")?;
    let last_at = first.values().max().copied().context("no presence event")?;
    let stream_secs: Vec<f64> = stream_done.iter().flatten().map(|&t| since(t)).collect();

    // Then every stream to the outbox's end: exactly one event per subscriber on each.
    let redis_url = cl.redis.url();
    let mut events = 0;
    for reader in readers {
        reader.wait_outbox_end(&redis_url).await?;
        let seen = reader.stop().await?;
        let mut per: HashMap<&str, usize> = HashMap::new();
        for s in seen.iter().filter(|s| is_alices(s)) {
            *per.entry(s.data["to"].as_str().unwrap_or_default())
                .or_default() += 1;
        }
        let twice = per.values().filter(|&&c| c > 1).count();
        let wrong = per
            .keys()
            .filter(|k| {
                k.strip_prefix('u')
                    .and_then(|r| r.strip_suffix("@b.example"))
                    .and_then(|i| i.parse::<usize>().ok())
                    .is_none_or(|i| i >= n)
            })
            .count();
        ensure!(
            per.len() == n && twice == 0 && wrong == 0,
            "presence: {} subscribers reached of {n}, {twice} more than once, {wrong} not \
             subscribers",
            per.len()
        );
        events += per.values().sum::<usize>();
    }
    Ok(PresenceRun {
        subscribers: n,
        setup_secs,
        post_answered_secs: since(answered),
        first_event_secs: since(first_at),
        last_event_secs: since(last_at),
        stream_secs,
        events,
    })
}

// === failover after kill -9 =====================================================

struct PacedShared {
    run: String,
    client: reqwest::Client,
    /// Base URLs the load posts to, in turn.
    targets: Mutex<Vec<String>>,
    stop: Vec<AtomicBool>,
    acks: Mutex<HashMap<(usize, u64), Ack>>,
}

/// One task per pair: a message, once acknowledged (retried every [`RETRY_EVERY`] while
/// refused) the next, at most one per `pace`. Answers the index of the next message.
async fn paced_pair(sh: Arc<PacedShared>, p: usize, pace: Duration) -> Result<u64> {
    let mut idx = 0u64;
    while !sh.stop[p].load(Ordering::Relaxed) {
        let started = Instant::now();
        let body = message_body(&sh.run, p, idx)?;
        let targets = lock(&sh.targets).clone();
        let rotated: Vec<String> = targets
            .iter()
            .cycle()
            .skip(p + idx as usize)
            .take(targets.len())
            .cloned()
            .collect();
        let (a, _, _) =
            post_until_accepted(&sh.client, &rotated, "a.example", SECRET_A, &body, T).await?;
        lock(&sh.acks).insert((p, idx), a);
        idx += 1;
        // The load's pace, not a wait for anything.
        tokio::time::sleep_until((started + pace).into()).await;
    }
    Ok(idx)
}

#[derive(Debug, Clone)]
struct FailoverRun {
    pairs: usize,
    orphaned: usize,
    failover_secs: f64,
    first_secs: f64,
    median_secs: f64,
    attempts: u32,
    duplicates: usize,
    converged_secs: f64,
    contract: Value,
}

async fn failover(opts: &Opts) -> Result<FailoverRun> {
    let mut cl = start_cluster("failover", 3, FAILOVER_LEASE_TTL, opts).await?;
    let r = failover_on(opts, &mut cl).await;
    cl.explain(r)
}

async fn failover_on(opts: &Opts, cl: &mut Cluster) -> Result<FailoverRun> {
    let victim = 1;
    let survivors = [0usize, 2];
    let pairs = opts.failover_pairs;
    let own = owners(pairs, 3)?;
    let orphans: Vec<usize> = (0..pairs).filter(|&p| own[p] == victim).collect();
    ensure!(
        !orphans.is_empty(),
        "{} owns none of {pairs} sessions",
        node_id(victim)
    );
    let run = "failover";
    let reader = Reader::start(&cl.url(0)?).await?;
    let sh = Arc::new(PacedShared {
        run: run.into(),
        client: post_client()?,
        targets: Mutex::new((0..3).map(|i| cl.url(i)).collect::<Result<_>>()?),
        stop: (0..pairs).map(|_| AtomicBool::new(false)).collect(),
        acks: Mutex::new(HashMap::new()),
    });
    // About 4 messages per second per pair.
    let pace = Duration::from_millis(250);
    let mut tasks: Vec<Option<JoinHandle<Result<u64>>>> = (0..pairs)
        .map(|p| Some(tokio::spawn(paced_pair(sh.clone(), p, pace))))
        .collect();
    // Every session has run on its owner.
    test_support::wait_for("two messages per pair", T, || async {
        let acks = lock(&sh.acks);
        (0..pairs).all(|p| acks.contains_key(&(p, 1))).then_some(())
    })
    .await?;

    // The victim's sessions go quiet (each finishes the message it has in hand); the rest
    // keeps going at the survivors.
    let mut next_idx = HashMap::new();
    for &p in &orphans {
        sh.stop[p].store(true, Ordering::Relaxed);
        let t = tasks[p].take().context("a pair task twice")?;
        next_idx.insert(p, t.await??);
    }
    *lock(&sh.targets) = survivors
        .iter()
        .map(|&i| cl.url(i))
        .collect::<Result<_>>()?;
    let node = cl.nodes.get_mut(victim).context("no victim")?;
    tokio::task::block_in_place(|| node.kill9())?;
    let killed_at = Instant::now();

    // Each orphaned session: one message, the same event id, at a survivor, until accepted.
    let probes = futures::future::join_all(orphans.iter().map(|&p| {
        let (sh, idx) = (sh.clone(), next_idx.get(&p).copied().unwrap_or(0));
        let base = cl.url(survivors[p % 2]);
        async move {
            let base = vec![base?];
            let body = message_body(run, p, idx)?;
            let (a, at, attempts) =
                post_until_accepted(&sh.client, &base, "a.example", SECRET_A, &body, T).await?;
            Ok::<_, anyhow::Error>((p, idx, a, at, attempts))
        }
    }))
    .await
    .into_iter()
    .collect::<Result<Vec<_>>>()?;
    let mut times: Vec<Duration> = probes
        .iter()
        .map(|(_, _, _, at, _)| *at - killed_at)
        .collect();
    times.sort();
    let attempts = probes.iter().map(|(_, _, _, _, n)| n).sum();
    let duplicates = probes.iter().filter(|(_, _, a, _, _)| a.duplicate).count();
    {
        let mut acks = lock(&sh.acks);
        for (p, idx, a, _, _) in probes {
            acks.insert((p, idx), a);
        }
    }
    let views = cl.wait_converged(&survivors, T).await?;
    let converged = killed_at.elapsed();
    note!(
        "cluster bench: failover: survivors agree at revision {} (checked {:.2} s after the kill)",
        views[0].revision,
        converged.as_secs_f64()
    );

    for s in &sh.stop {
        s.store(true, Ordering::Relaxed);
    }
    for t in tasks.iter_mut().filter_map(Option::take) {
        t.await??;
    }
    let acks = std::mem::take(&mut *lock(&sh.acks));
    let contract = read_and_check(reader, run, &acks, &cl.redis.url()).await?;
    Ok(FailoverRun {
        pairs,
        orphaned: orphans.len(),
        failover_secs: times.last().copied().unwrap_or_default().as_secs_f64(),
        first_secs: times.first().copied().unwrap_or_default().as_secs_f64(),
        median_secs: percentile(&times, 0.5).as_secs_f64(),
        attempts,
        duplicates,
        converged_secs: converged.as_secs_f64(),
        contract: contract.json(),
    })
}

// === main =========================================================================

fn main() -> Result<()> {
    let opts = Opts::parse(std::env::args().skip(1).collect())?;
    if opts.list {
        return Ok(());
    }
    if !opts.ignored.is_empty() {
        note!("cluster bench: ignoring arguments {:?}", opts.ignored);
    }
    // The node binary of this build's profile: target/<profile>/relay-node, next to this
    // binary's deps/ directory (cargo builds it for benches and tests).
    let bin = test_support::workspace_binary("relay-node")?;
    let built = PathBuf::from(env!("CARGO_BIN_EXE_relay-node"));
    ensure!(
        bin.canonicalize()? == built.canonicalize()?,
        "relay-node found at {} but cargo built {}",
        bin.display(),
        built.display()
    );
    // reqwest is built without a default TLS provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(opts, bin))
}

async fn run(opts: Opts, bin: PathBuf) -> Result<()> {
    let machine = MachineInfo::detect();
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let started = Instant::now();
    let mut out = String::new();
    let mut report = json!({
        "bench": "cluster",
        "mode": if opts.full { "full" } else { "smoke" },
        "date_utc": relay_loadtest::report::utc_stamp(unix),
        "machine": {"nproc": machine.nproc, "cpu_model": machine.cpu_model,
                    "mem_total_kb": machine.mem_total_kb, "kernel": machine.kernel},
        "relay_node": bin.display().to_string(),
        "options": {"rate": opts.rate, "warmup_secs": opts.warmup.as_secs_f64(),
                    "duration_secs": opts.duration.as_secs_f64(), "pairs": opts.pairs,
                    "rounds": opts.rounds, "subscribers": opts.subscribers,
                    "concurrency": opts.concurrency, "failover_pairs": opts.failover_pairs,
                    "moved_sessions": opts.moved_sessions, "idle_secs": opts.idle.as_secs_f64(),
                    "node_env": opts.node_env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>()},
    });
    out.push_str(&format!(
        "cluster bench ({}), {} UTC, {} × {}, relay-node {}\n",
        if opts.full {
            "full"
        } else {
            "smoke: tiny sizes, a check that everything works, not a measurement"
        },
        relay_loadtest::report::utc_stamp(unix),
        machine.nproc,
        machine.cpu_model,
        bin.display()
    ));

    if opts.runs("cpu") || opts.runs("join") {
        let mut runs = Vec::new();
        let mut joined = None;
        let rounds = if opts.runs("cpu") { opts.rounds } else { 1 };
        for round in 1..=rounds {
            for nodes in [1, 3] {
                if nodes == 1 && !opts.runs("cpu") {
                    continue;
                }
                let join = nodes == 3 && round == rounds && opts.runs("join");
                let (r, j) = cpu_round(&opts, round, nodes, join).await?;
                runs.push(r);
                if j.is_some() {
                    joined = j;
                }
            }
        }
        out.push_str(&cpu_table(&opts, &runs));
        let sum = |n: usize| {
            let rs: Vec<&CpuRun> = runs.iter().filter(|r| r.nodes == n).collect();
            let cpu: f64 = rs.iter().map(|r| r.relay_cpu_secs).sum();
            let msgs: usize = rs.iter().map(|r| r.window_messages).sum();
            cpu * 1e6 / msgs.max(1) as f64
        };
        let ratio = if opts.runs("cpu") {
            let (one, three) = (sum(1), sum(3));
            let ratio = three / one.max(1e-9);
            out.push_str(&format!(
                "relay CPU, all rounds: 1 node {one:.1} µs/msg, 3 nodes {three:.1} µs/msg: \
                 3-node/1-node {ratio:.2} (target ≤ 1.25: {})\n",
                if ratio <= 1.25 { "met" } else { "NOT met" }
            ));
            Some(ratio)
        } else {
            None
        };
        report["cpu"] = json!({
            "runs": runs.iter().map(CpuRun::json).collect::<Vec<_>>(),
            "ratio_3_to_1": ratio,
            "target_ratio": 1.25,
        });
        if let Some(j) = joined {
            let (fraction, all_to_new) = moved_fraction(opts.moved_sessions)?;
            ensure!(all_to_new, "a session moved between old nodes");
            let hosted_new = j.hosted.get(3).copied().unwrap_or(0);
            out.push_str(&format!(
                "join: {} of {} sessions change owner from 3 to 4 members (by the shard map; \
                 ideal 0.25): {fraction:.4}\n\
                 join: on the cluster, n4 converged in {:.2} s and hosts {hosted_new} of the \
                 {} sessions the load touched ({:.4}); expected per node {:?}, hosted {:?}\n",
                (fraction * opts.moved_sessions as f64).round(),
                opts.moved_sessions,
                j.converged_secs,
                j.sessions,
                hosted_new as f64 / j.sessions as f64,
                j.expected,
                j.hosted
            ));
            report["join"] = json!({
                "computed": {"sessions": opts.moved_sessions, "moved_fraction": fraction,
                             "all_moved_to_new_node": all_to_new},
                "cluster": {"sessions": j.sessions, "converged_secs": j.converged_secs,
                            "expected_per_node": j.expected, "hosted_per_node": j.hosted,
                            "n4_fraction": hosted_new as f64 / j.sessions as f64},
            });
        }
    }

    if opts.runs("presence") {
        let p = presence(&opts).await?;
        out.push_str(&format!(
            "presence: {} subscribers over 3 nodes (contacts accepted in {:.1} s, {:.0}/s); one \
             update at n1: POST answered after {:.3} s; first event read after {:.3} s, the \
             last subscriber's after {:.3} s (first read on any of the 3 streams): {:.0} \
             deliveries/s; each stream (n1, n2, n3) had all of them after {:?} s\n",
            p.subscribers,
            p.setup_secs,
            p.subscribers as f64 / p.setup_secs,
            p.post_answered_secs,
            p.first_event_secs,
            p.last_event_secs,
            p.subscribers as f64 / p.last_event_secs,
            p.stream_secs
                .iter()
                .map(|s| (s * 1000.0).round() / 1000.0)
                .collect::<Vec<_>>()
        ));
        report["presence"] = json!({
            "subscribers": p.subscribers, "setup_secs": p.setup_secs,
            "post_answered_secs": p.post_answered_secs,
            "first_event_secs": p.first_event_secs, "last_event_secs": p.last_event_secs,
            "deliveries_per_sec": p.subscribers as f64 / p.last_event_secs,
            "per_stream_complete_secs": p.stream_secs, "events_read": p.events,
        });
    }

    if opts.runs("failover") {
        let f = failover(&opts).await?;
        out.push_str(&format!(
            "failover: kill -9 of n2 (lease TTL {FAILOVER_LEASE_TTL} s) under a light load of {} \
             sessions: all {} of its sessions accept again after {:.2} s (first {:.2} s, median \
             {:.2} s; {} POSTs, {} answered as duplicates)\n",
            f.pairs,
            f.orphaned,
            f.failover_secs,
            f.first_secs,
            f.median_secs,
            f.attempts,
            f.duplicates
        ));
        report["failover"] = json!({
            "lease_ttl_secs": FAILOVER_LEASE_TTL, "pairs": f.pairs, "orphaned": f.orphaned,
            "failover_secs": f.failover_secs, "first_secs": f.first_secs,
            "median_secs": f.median_secs, "attempts": f.attempts,
            "duplicates": f.duplicates, "converged_checked_secs": f.converged_secs,
            "contract": f.contract,
        });
    }

    out.push_str(&format!("total {:.0} s\n", started.elapsed().as_secs_f64()));
    report["total_secs"] = json!(started.elapsed().as_secs_f64());
    std::io::stdout().write_all(out.as_bytes())?;
    if let Some(path) = &opts.out {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn cpu_table(opts: &Opts, runs: &[CpuRun]) -> String {
    let mut s = format!(
        "relay CPU per message: open loop {} msg/s over {} sessions, {:.1} s warm-up + {:.1} s \
         measured, every POST at n1, read back from b.example's stream at n1\n",
        opts.rate,
        opts.pairs,
        opts.warmup.as_secs_f64(),
        opts.duration.as_secs_f64()
    );
    s.push_str(&format!(
        "{:>5} {:>5} {:>8} {:>12} {:>7} {:>10} {:>12} {:>14} {:>9} {:>9} {:>9} {:>9} {:>9} {:>5} {:>4}\n",
        "round",
        "nodes",
        "msgs",
        "relay µs/msg",
        "cores",
        "idle cores",
        "Redis µs/msg",
        "harness µs/msg",
        "forwarded",
        "POST p50",
        "POST p99",
        "p99.9",
        "POST max",
        "lost",
        "dup"
    ));
    for r in runs {
        s.push_str(&format!(
            "{:>5} {:>5} {:>8} {:>12.1} {:>7.2} {:>10.3} {:>12.1} {:>14.1} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>5} {:>4}\n",
            r.round,
            r.nodes,
            r.window_messages,
            r.relay_us_per_msg,
            r.relay_cores,
            r.idle_cores,
            r.redis_us_per_msg,
            r.harness_us_per_msg,
            r.forwarded_fraction,
            r.post_p50_ms,
            r.post_p99_ms,
            r.post_p999_ms,
            r.post_max_ms,
            r.contract["lost"].as_u64().unwrap_or(0),
            r.contract["duplicates"].as_u64().unwrap_or(0)
        ));
    }
    for round in 1..=opts.rounds {
        let one = runs.iter().find(|r| r.round == round && r.nodes == 1);
        let three = runs.iter().find(|r| r.round == round && r.nodes == 3);
        if let (Some(a), Some(b)) = (one, three) {
            s.push_str(&format!(
                "round {round}: 3-node/1-node relay CPU per message {:.2}\n",
                b.relay_us_per_msg / a.relay_us_per_msg.max(1e-9)
            ));
        }
    }
    s
}
