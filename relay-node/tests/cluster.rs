//! The cluster under faults: three (or four) `relay-node` processes on one real Redis and one
//! real etcd, a load generator spreading messages for many sessions over them, a reader of
//! b.example's event stream, and a checker of the delivery contract:
//!
//! - every acknowledged message is delivered exactly once, to its recipient, with the
//!   (session, seq, relay id) its acknowledgement named; nothing acknowledged is lost,
//! - per session the seqs delivered increase strictly and leave no gap (a message journaled
//!   twice would show up as a second seq), and per sender the messages keep their order.
//!
//! A node that gets SIGTERM drains (it leaves etcd first, finishes what is in flight, hands
//! its sessions over) under the same load and checker, and `relay-node cluster status` prints
//! the members as every node sees them.
//!
//! The tests run one at a time (they share the machine's two cores) and print their figures
//! (failover time, fraction of sessions moved, …) on stderr.

mod common;

use anyhow::{Context, Result, bail, ensure};
use common::cluster::{
    Cluster, Examples, NodeConfig, View, etcd_section, lock, message_body, node_id, outbox_end,
    owners_by_hash, parse_text, seq_gaps, stream_id, view_at, wait_seen,
};
use common::{SECRET_A, SECRET_B, Stream, now_secs, signed_request};
use relay_node::edges::http::sign;
use serde_json::Value;
use session_actor::SessionId;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use test_support::{FaultProxy, ProxyMode, RelayNode};
use tokio::task::JoinHandle;

/// The lease TTL the nodes register with.
const LEASE_TTL: Duration = Duration::from_secs(3);
/// Sender/recipient pairs, one session each: enough for every node to own several.
const PAIRS: usize = 60;
/// Each pair sends its next message this long after the previous one started (≈ 300 msg/s).
const PACE: Duration = Duration::from_millis(200);
/// How long one message may take to be accepted, retries included.
const SEND_DEADLINE: Duration = Duration::from_secs(30);
/// Timeout of one POST; longer than a forward to a stalled owner should take.
const POST_TIMEOUT: Duration = Duration::from_secs(3);
/// The longest retry backoff of the load generator.
const MAX_BACKOFF: Duration = Duration::from_millis(250);
/// The reader moves to another node when its stream is silent this long under load.
const STALL: Duration = Duration::from_millis(1500);
/// Generous bound of the waits for conditions.
const T: Duration = Duration::from_secs(20);
/// The drain deadline the nodes are configured with (`[shutdown] drain_timeout_secs`).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// The tests share two cores with three relay nodes, Redis and etcd each: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A line on stderr (the figures the tests measure; `println!` is denied by lint).
macro_rules! note {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

// === the cluster =================================================================

/// The config of each node: the HTTP-edge test config plus an etcd `[cluster]` section. The
/// nodes in `behind_proxy` advertise `{PROXY_PORT}`, where the test puts a [`FaultProxy`] to
/// their gRPC port.
fn node_config(behind_proxy: Vec<usize>) -> NodeConfig {
    Box::new(move |redis_url, etcd, name, i| {
        let advertise = if behind_proxy.contains(&i) {
            "127.0.0.1:{PROXY_PORT}"
        } else {
            "127.0.0.1:{GRPC_PORT}"
        };
        let extra = format!(
            "{}grpc_advertise = \"{advertise}\"\n[shutdown]\ndrain_timeout_secs = {}\n",
            etcd_section(name, etcd, LEASE_TTL.as_secs()),
            DRAIN_TIMEOUT.as_secs()
        );
        common::cluster::node_config(redis_url, &extra, i, &[])
    })
}

/// Waits for the other tests to finish (they share two cores), then starts Redis, etcd and
/// three nodes (those in `behind_proxy` advertise their proxy port) and waits until every
/// node sees all of them.
async fn start_serial(
    test: &str,
    behind_proxy: &[usize],
) -> Result<(tokio::sync::MutexGuard<'static, ()>, Cluster)> {
    let serial = SERIAL.lock().await;
    let cl = Cluster::start(test, 3, node_config(behind_proxy.to_vec()), Vec::new(), T).await?;
    Ok((serial, cl))
}

impl Cluster {
    /// Every node as a load-balancer target.
    fn targets(&self) -> Targets {
        let t = Targets::default();
        for (i, n) in self.nodes.iter().enumerate() {
            t.add(i, n.http_url());
        }
        t
    }

    /// The owner of each pair's session by the cluster's own rendezvous hash, for a member
    /// set of `nodes`.
    fn owners(&self, sessions: &BTreeMap<usize, String>, nodes: &[usize]) -> Result<Owners> {
        let ids = sessions
            .values()
            .map(|hex| SessionId::from_hex(hex).with_context(|| format!("session id {hex}")))
            .collect::<Result<Vec<_>>>()?;
        let owners = owners_by_hash(nodes, &ids)?;
        Ok(Owners(sessions.keys().copied().zip(owners).collect()))
    }

    /// The pairs whose sessions node `node` of n1..n3 owns, as `load` named them; fails when
    /// it owns none.
    fn pairs_owned_by(&self, load: &Load, node: usize) -> Result<HashSet<usize>> {
        let pairs = self
            .owners(&sessions(&load.acks()), &[0, 1, 2])?
            .pairs_of(node);
        ensure!(!pairs.is_empty(), "{} owns no session", node_id(node));
        Ok(pairs)
    }
}

/// Pair → index of the node owning its session.
#[derive(Debug, Clone)]
struct Owners(BTreeMap<usize, usize>);

impl Owners {
    fn pairs_of(&self, node: usize) -> HashSet<usize> {
        self.0
            .iter()
            .filter(|&(_, &n)| n == node)
            .map(|(&p, _)| p)
            .collect()
    }

    fn count(&self, node: usize) -> usize {
        self.0.values().filter(|&&n| n == node).count()
    }
}

// === load generator ===============================================================

/// The nodes a load balancer would send to: `(node index, base URL)`.
#[derive(Clone, Default)]
struct Targets(Arc<Mutex<Vec<(usize, String)>>>);

impl Targets {
    fn add(&self, node: usize, url: String) {
        let mut t = lock(&self.0);
        t.retain(|(n, _)| *n != node);
        t.push((node, url));
        t.sort();
    }

    fn remove(&self, node: usize) {
        lock(&self.0).retain(|(n, _)| *n != node);
    }

    /// The `k`-th target, round robin.
    fn pick(&self, k: usize) -> Option<(usize, String)> {
        let t = lock(&self.0);
        (!t.is_empty()).then(|| t[k % t.len()].clone())
    }
}

/// One acknowledged message.
#[derive(Debug, Clone)]
struct Ack {
    pair: usize,
    idx: u64,
    relay_msg_id: String,
    session_id: String,
    seq: u64,
    /// The node whose HTTP edge accepted it.
    node: usize,
    first_sent: Instant,
    acked_at: Instant,
    attempts: u32,
    /// Accepted as a duplicate of an earlier attempt that was journaled unanswered.
    duplicate: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Accepted,
    /// A retryable status (5xx, 429).
    Status(u16),
    /// Connection refused or reset, timeout, unreadable answer.
    Failed,
}

impl Outcome {
    /// `accepted`, the status, or `conn/timeout`.
    fn label(self) -> String {
        match self {
            Outcome::Accepted => "accepted".to_string(),
            Outcome::Status(s) => s.to_string(),
            Outcome::Failed => "conn/timeout".to_string(),
        }
    }
}

/// One POST.
#[derive(Debug, Clone)]
struct Attempt {
    at: Instant,
    node: usize,
    pair: usize,
    outcome: Outcome,
}

struct LoadShared {
    run: String,
    client: reqwest::Client,
    targets: Targets,
    rr: AtomicUsize,
    stop: AtomicBool,
    acks: Mutex<Vec<Ack>>,
    attempts: Mutex<Vec<Attempt>>,
}

/// What a load run did.
struct History {
    acks: Vec<Ack>,
    attempts: Vec<Attempt>,
}

/// Senders `alice-<i>@a.example` → `bob-<i>@b.example`, one task per pair, each sending its
/// next message once the previous one is acknowledged (so a pair's order is defined) and at
/// most every [`PACE`]. Every POST goes to the next target round robin; 5xx and connection
/// errors are retried with the same event id and a bounded backoff. Any other answer fails
/// the run.
struct Load {
    shared: Arc<LoadShared>,
    tasks: Vec<JoinHandle<Result<()>>>,
}

impl Load {
    fn start(run: &str, targets: Targets) -> Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .timeout(POST_TIMEOUT)
            .connect_timeout(Duration::from_secs(1))
            .build()?;
        let shared = Arc::new(LoadShared {
            run: run.to_string(),
            client,
            targets,
            rr: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            acks: Mutex::new(Vec::new()),
            attempts: Mutex::new(Vec::new()),
        });
        let tasks = (0..PAIRS)
            .map(|p| tokio::spawn(pair_task(shared.clone(), p)))
            .collect();
        Ok(Self { shared, tasks })
    }

    fn acks(&self) -> Vec<Ack> {
        lock(&self.shared.acks).clone()
    }

    fn attempts(&self) -> Vec<Attempt> {
        lock(&self.shared.attempts).clone()
    }

    /// Waits until `cond` holds for the acknowledgements so far; fails early when a sender
    /// failed.
    async fn wait(
        &mut self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&[Ack]) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if cond(&lock(&self.shared.acks)) {
                return Ok(());
            }
            if let Some(pos) = self.tasks.iter().position(JoinHandle::is_finished) {
                let task = self.tasks.remove(pos);
                task.await??;
                bail!("a sender stopped early while waiting for {what}");
            }
            if Instant::now() >= deadline {
                let refused: Vec<String> = lock(&self.shared.attempts)
                    .iter()
                    .rev()
                    .filter(|a| a.outcome != Outcome::Accepted)
                    .take(5)
                    .map(|a| format!("p{} at {}: {:?}", a.pair, node_id(a.node), a.outcome))
                    .collect();
                bail!(
                    "timed out after {timeout:?} waiting for {what} ({} acknowledged; last refusals {refused:?})",
                    lock(&self.shared.acks).len()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every pair has `n` acknowledgements after `t`.
    async fn wait_all(&mut self, what: &str, t: Instant, n: usize) -> Result<()> {
        self.wait(what, T, |a| all_acked_after(a, &all_pairs(), t, n))
            .await
    }

    /// Stops sending (each sender finishes the message it has in hand) and returns what
    /// happened.
    async fn stop(self) -> Result<History> {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await??;
        }
        Ok(History {
            acks: lock(&self.shared.acks).clone(),
            attempts: lock(&self.shared.attempts).clone(),
        })
    }
}

async fn pair_task(sh: Arc<LoadShared>, pair: usize) -> Result<()> {
    let mut idx = 0u64;
    while !sh.stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let ack = send_until_accepted(&sh, pair, idx).await?;
        lock(&sh.acks).push(ack);
        idx += 1;
        // Pacing, not waiting for anything.
        tokio::time::sleep_until((started + PACE).into()).await;
    }
    Ok(())
}

async fn send_until_accepted(sh: &LoadShared, pair: usize, idx: u64) -> Result<Ack> {
    let event_id = format!("{}-p{pair}-m{idx}", sh.run);
    let body = message_body(&sh.run, pair, idx)?;
    let first_sent = Instant::now();
    let deadline = first_sent + SEND_DEADLINE;
    let mut backoff = Duration::from_millis(20);
    let mut attempts = 0u32;
    let mut last = String::from("no target");
    loop {
        let k = sh.rr.fetch_add(1, Ordering::Relaxed);
        if let Some((node, url)) = sh.targets.pick(k) {
            attempts += 1;
            let res = signed_request(
                &sh.client,
                &url,
                "a.example",
                SECRET_A,
                now_secs(),
                &body,
                "application/json",
            )
            .send()
            .await;
            let (outcome, answer) = match res {
                Err(e) => (Outcome::Failed, format!("{e}")),
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    match (status, resp.bytes().await) {
                        (200 | 202, Ok(b)) => {
                            (Outcome::Accepted, String::from_utf8_lossy(&b).into())
                        }
                        (200 | 202, Err(e)) => (Outcome::Failed, format!("{status}, then {e}")),
                        (s, b) if s >= 500 || s == 429 => (
                            Outcome::Status(s),
                            b.map(|b| String::from_utf8_lossy(&b).into_owned())
                                .unwrap_or_default(),
                        ),
                        (s, b) => bail!(
                            "event {event_id} at {}: unexpected {s}: {}",
                            node_id(node),
                            b.map(|b| String::from_utf8_lossy(&b).into_owned())
                                .unwrap_or_default()
                        ),
                    }
                }
            };
            lock(&sh.attempts).push(Attempt {
                at: Instant::now(),
                node,
                pair,
                outcome,
            });
            if outcome == Outcome::Accepted {
                let v: Value = serde_json::from_str(&answer)
                    .with_context(|| format!("event {event_id}: accepted with {answer}"))?;
                let field = |k: &str| {
                    v[k].as_str()
                        .map(str::to_string)
                        .with_context(|| format!("event {event_id}: no {k} in {v}"))
                };
                return Ok(Ack {
                    pair,
                    idx,
                    relay_msg_id: field("relay_msg_id")?,
                    session_id: field("session_id")?,
                    seq: v["seq"]
                        .as_u64()
                        .with_context(|| format!("event {event_id}: no seq in {v}"))?,
                    node,
                    first_sent,
                    acked_at: Instant::now(),
                    attempts,
                    duplicate: v["duplicate"].as_bool().unwrap_or(false),
                });
            }
            last = format!("{} answered {outcome:?}: {answer}", node_id(node));
        }
        if Instant::now() >= deadline {
            bail!(
                "event {event_id} not accepted within {SEND_DEADLINE:?} ({attempts} attempts; last: {last})"
            );
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Pairs with at least `n` acknowledgements after `t`.
fn pairs_acked_after(acks: &[Ack], t: Instant, n: usize) -> HashSet<usize> {
    let mut count: HashMap<usize, usize> = HashMap::new();
    for a in acks.iter().filter(|a| a.acked_at > t) {
        *count.entry(a.pair).or_default() += 1;
    }
    count
        .into_iter()
        .filter(|&(_, c)| c >= n)
        .map(|(p, _)| p)
        .collect()
}

/// Every pair in `pairs` has `n` acknowledgements after `t`.
fn all_acked_after(acks: &[Ack], pairs: &HashSet<usize>, t: Instant, n: usize) -> bool {
    let done = pairs_acked_after(acks, t, n);
    pairs.iter().all(|p| done.contains(p))
}

fn all_pairs() -> HashSet<usize> {
    (0..PAIRS).collect()
}

/// Each pair's session id, as its acknowledgements named it.
fn sessions(acks: &[Ack]) -> BTreeMap<usize, String> {
    acks.iter()
        .map(|a| (a.pair, a.session_id.clone()))
        .collect()
}

/// The longest time between consecutive acknowledgements of one pair, over `pairs`, counting
/// from `from`.
fn longest_ack_gap(acks: &[Ack], pairs: &HashSet<usize>, from: Instant) -> Duration {
    let mut by_pair: HashMap<usize, Vec<Instant>> = HashMap::new();
    for a in acks.iter().filter(|a| pairs.contains(&a.pair)) {
        by_pair.entry(a.pair).or_default().push(a.acked_at);
    }
    let mut longest = Duration::ZERO;
    for times in by_pair.values_mut() {
        times.sort();
        let mut prev = from;
        for &t in times.iter().filter(|&&t| t > from) {
            longest = longest.max(t - prev);
            prev = t;
        }
    }
    longest
}

// === stream reader ================================================================

/// One event read from b.example's stream.
#[derive(Debug, Clone)]
struct Delivered {
    sse_id: String,
    data: Value,
    node: usize,
}

struct ReaderShared {
    targets: Targets,
    events: Mutex<Vec<Delivered>>,
    last_id: Mutex<Option<String>>,
    connects: AtomicU64,
}

/// Reads b.example's `/v1/stream` from one of the targets; when that node dies, stalls or
/// ends the stream, resumes on the next target with `Last-Event-ID`.
struct Reader {
    shared: Arc<ReaderShared>,
    stop: tokio::sync::watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Reader {
    /// Starts reading from the `first`-th target (the first node to fail over from).
    fn start(targets: Targets, first: usize) -> Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(1))
            .build()?;
        let shared = Arc::new(ReaderShared {
            targets,
            events: Mutex::new(Vec::new()),
            last_id: Mutex::new(None),
            connects: AtomicU64::new(0),
        });
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(read_stream(shared.clone(), client, first, stop_rx));
        Ok(Self { shared, stop, task })
    }

    /// Waits until every acknowledged message has arrived and the reader has reached the end
    /// of the outbox as it is now (so a late second copy, which would be appended before that
    /// end, has been read too).
    async fn drain(&self, acks: &[Ack], redis_url: &str) -> Result<()> {
        let want: HashSet<&str> = acks.iter().map(|a| a.relay_msg_id.as_str()).collect();
        let missing = Mutex::new(want.len());
        let res = test_support::wait_for("every acknowledged message delivered", T, || async {
            let events = lock(&self.shared.events);
            let seen: HashSet<&str> = events
                .iter()
                .filter_map(|e| e.data["relay_msg_id"].as_str())
                .collect();
            let m = want.iter().filter(|id| !seen.contains(**id)).count();
            *lock(&missing) = m;
            (m == 0).then_some(())
        })
        .await;
        res.with_context(|| format!("{} of {} still missing", lock(&missing), want.len()))?;
        let end = outbox_end(redis_url, "b.example").await?;
        let Some(end) = end else {
            bail!("the b.example outbox is empty after deliveries");
        };
        test_support::wait_for("the reader at the outbox's end", T, || async {
            let last = lock(&self.shared.last_id).clone();
            last.and_then(|l| stream_id(&l))
                .filter(|l| *l >= end)
                .map(|_| ())
        })
        .await
    }

    async fn stop(self) -> Result<(Vec<Delivered>, u64)> {
        self.stop.send_replace(true);
        self.task.await?;
        let events = lock(&self.shared.events).clone();
        Ok((events, self.shared.connects.load(Ordering::Relaxed)))
    }
}

async fn read_stream(
    sh: Arc<ReaderShared>,
    client: reqwest::Client,
    first: usize,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut k = first;
    while !*stop.borrow_and_update() {
        let Some((node, url)) = sh.targets.pick(k) else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        k += 1;
        let after = lock(&sh.last_id).clone();
        let open = tokio::time::timeout(
            Duration::from_secs(2),
            Stream::open(&client, &url, "b.example", SECRET_B, after.as_deref()),
        )
        .await;
        let Ok(Ok(mut stream)) = open else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        sh.connects.fetch_add(1, Ordering::Relaxed);
        loop {
            tokio::select! {
                ev = stream.next(STALL) => match ev {
                    Ok(ev) => {
                        if !ev.id.is_empty() {
                            *lock(&sh.last_id) = Some(ev.id.clone());
                        }
                        lock(&sh.events).push(Delivered { sse_id: ev.id, data: ev.data, node });
                    }
                    // Ended, failed or silent: resume from the next node.
                    Err(_) => break,
                },
                _ = stop.changed() => return,
            }
        }
    }
}

// === the contract ================================================================

#[derive(Debug, Default)]
struct Contract {
    acked: usize,
    delivered: usize,
    lost: usize,
    duplicates: usize,
    order_violations: usize,
    seq_gaps: u64,
    id_mismatches: usize,
    misrouted: usize,
    delivered_unacked: usize,
    foreign: usize,
    stream_gaps: usize,
    examples: Examples,
}

impl Contract {
    fn holds(&self) -> bool {
        self.lost == 0
            && self.duplicates == 0
            && self.order_violations == 0
            && self.seq_gaps == 0
            && self.id_mismatches == 0
            && self.misrouted == 0
            && self.delivered_unacked == 0
            && self.foreign == 0
            && self.stream_gaps == 0
    }
}

impl fmt::Display for Contract {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "acked {}, delivered {}, lost {}, duplicates {}, order violations {}, seq gaps {}, \
             id mismatches {}, misrouted {}, delivered unacked {}, foreign {}, stream gaps {}",
            self.acked,
            self.delivered,
            self.lost,
            self.duplicates,
            self.order_violations,
            self.seq_gaps,
            self.id_mismatches,
            self.misrouted,
            self.delivered_unacked,
            self.foreign,
            self.stream_gaps
        )?;
        for e in &self.examples.0 {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

fn check(run: &str, acks: &[Ack], delivered: &[Delivered]) -> Contract {
    let mut c = Contract {
        acked: acks.len(),
        delivered: delivered.len(),
        ..Contract::default()
    };
    let acked: HashMap<(usize, u64), &Ack> = acks.iter().map(|a| ((a.pair, a.idx), a)).collect();
    let mut copies: HashMap<(usize, u64), usize> = HashMap::new();
    let mut last_seq: HashMap<&str, u64> = HashMap::new();
    let mut last_idx: HashMap<usize, u64> = HashMap::new();
    let mut seqs: HashMap<&str, HashSet<u64>> = HashMap::new();
    for d in delivered {
        let e = &d.data;
        if e["type"] == "gap" {
            c.stream_gaps += 1;
            c.examples.add(format!("stream gap at {}: {e}", d.sse_id));
            continue;
        }
        let Some((pair, idx)) = e["text"].as_str().and_then(|t| parse_text(run, t)) else {
            c.foreign += 1;
            c.examples.add(format!(
                "foreign event {} (via {}): {e}",
                d.sse_id,
                node_id(d.node)
            ));
            continue;
        };
        let session = e["session_id"].as_str().unwrap_or_default();
        let seq = e["seq"].as_u64().unwrap_or(0);
        if e["type"] != "message"
            || e["to"] != format!("bob-{pair}@b.example").as_str()
            || e["from"] != format!("alice-{pair}@a.example").as_str()
        {
            c.misrouted += 1;
            c.examples.add(format!("misrouted: {e}"));
        }
        let n = copies.entry((pair, idx)).or_default();
        *n += 1;
        if *n > 1 {
            c.duplicates += 1;
            c.examples
                .add(format!("p{pair} m{idx} delivered {n} times, now as {e}"));
        }
        match acked.get(&(pair, idx)) {
            None => {
                c.delivered_unacked += 1;
                c.examples
                    .add(format!("p{pair} m{idx} delivered but never acknowledged"));
            }
            Some(a) => {
                if a.relay_msg_id != e["relay_msg_id"].as_str().unwrap_or_default()
                    || a.session_id != session
                    || a.seq != seq
                {
                    c.id_mismatches += 1;
                    c.examples.add(format!(
                        "p{pair} m{idx} acked as ({}, {}, {}), delivered as {e}",
                        a.session_id, a.seq, a.relay_msg_id
                    ));
                }
            }
        }
        if let Some(&prev) = last_seq.get(session)
            && seq <= prev
        {
            c.order_violations += 1;
            c.examples
                .add(format!("session {session}: seq {seq} after {prev}"));
        }
        last_seq.insert(session, seq);
        if let Some(&prev) = last_idx.get(&pair)
            && idx <= prev
        {
            c.order_violations += 1;
            c.examples.add(format!("pair {pair}: m{idx} after m{prev}"));
        }
        last_idx.insert(pair, idx);
        seqs.entry(session).or_default().insert(seq);
    }
    for a in acks {
        if !copies.contains_key(&(a.pair, a.idx)) {
            c.lost += 1;
            c.examples.add(format!(
                "p{} m{} acked as seq {} (entered at {}) never delivered",
                a.pair,
                a.idx,
                a.seq,
                node_id(a.node)
            ));
        }
    }
    // A fresh Redis: every session's seqs are 1..=max, each journaled message delivered.
    for (session, gaps, max) in seq_gaps(&seqs) {
        c.seq_gaps += gaps;
        c.examples.add(format!(
            "session {session}: {gaps} seqs of 1..={max} never delivered"
        ));
    }
    c
}

/// Stops the load, reads everything acknowledged, checks the contract and prints it.
async fn finish(
    test: &str,
    cl: &Cluster,
    load: Load,
    reader: Reader,
) -> Result<(History, Contract)> {
    let history = load.stop().await?;
    reader.drain(&history.acks, &cl.redis.url()).await?;
    let (delivered, connects) = reader.stop().await?;
    let contract = check(test, &history.acks, &delivered);
    let retried = history.acks.iter().filter(|a| a.attempts > 1).count();
    let dup_acks = history.acks.iter().filter(|a| a.duplicate).count();
    let slowest = history
        .acks
        .iter()
        .map(|a| a.acked_at - a.first_sent)
        .max()
        .unwrap_or_default();
    let mut refused: BTreeMap<String, usize> = BTreeMap::new();
    for a in &history.attempts {
        if a.outcome != Outcome::Accepted {
            *refused.entry(a.outcome.label()).or_default() += 1;
        }
    }
    note!(
        "cluster/{test}: {} POSTs; {retried} messages retried, {dup_acks} acknowledged as \
         duplicates, slowest accepted after {:.2} s; refused attempts {refused:?}; stream \
         (re)connects {connects}",
        history.attempts.len(),
        secs(slowest)
    );
    note!("cluster/{test}: contract: {contract}");
    ensure!(contract.holds(), "delivery contract broken: {contract}");
    Ok((history, contract))
}

// === test scaffolding ============================================================

/// A running load over every node of a cluster, and b.example's reader.
struct Loaded {
    targets: Targets,
    load: Load,
    reader: Reader,
    /// When the load started.
    t0: Instant,
}

/// Starts the load over every node of `cl` and the reader (at node `read_at` first), and
/// waits until every pair has `n` messages acknowledged.
async fn start_load(test: &str, cl: &Cluster, read_at: usize, n: usize) -> Result<Loaded> {
    let targets = cl.targets();
    let reader = Reader::start(targets.clone(), read_at)?;
    let mut load = Load::start(test, targets.clone())?;
    let t0 = Instant::now();
    let what = match n {
        2 => "two messages per pair",
        3 => "three messages per pair",
        _ => "messages for every pair",
    };
    load.wait_all(what, t0, n).await?;
    Ok(Loaded {
        targets,
        load,
        reader,
        t0,
    })
}

/// Once every pair has two more messages acknowledged, [`finish`]es the run.
async fn finish_after_two_more(
    test: &str,
    cl: &Cluster,
    mut load: Load,
    reader: Reader,
) -> Result<()> {
    load.wait_all("two more messages per pair", Instant::now(), 2)
        .await?;
    finish(test, cl, load, reader).await?;
    Ok(())
}

/// How long after `t` the last of `pairs` had its first acknowledgement after `t`.
fn all_accepting_after(acks: &[Ack], pairs: &HashSet<usize>, t: Instant) -> Duration {
    pairs
        .iter()
        .filter_map(|p| {
            acks.iter()
                .filter(|a| a.pair == *p && a.acked_at > t)
                .map(|a| a.acked_at - t)
                .min()
        })
        .max()
        .unwrap_or_default()
}

/// Per node of `nodes`, as many sessions as `owners` gives it.
fn want_hosted(owners: &Owners, nodes: &[usize]) -> Vec<Option<u64>> {
    nodes
        .iter()
        .map(|&i| Some(owners.count(i) as u64))
        .collect()
}

// === the tests ===================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_enter_at_every_node_for_sessions_owned_by_every_node() -> Result<()> {
    let test = "every-node";
    let (_serial, cl) = start_serial(test, &[]).await?;
    let r = every_node(test, &cl).await;
    cl.explain(r)
}

async fn every_node(test: &str, cl: &Cluster) -> Result<()> {
    let all = [0, 1, 2];
    let Loaded { load, reader, .. } = start_load(test, cl, 0, 3).await?;

    // Messages entered at every node for sessions owned by every node.
    let owners = cl.owners(&sessions(&load.acks()), &all)?;
    let mut matrix = [[0usize; 3]; 3];
    for a in load.acks() {
        if let Some(&o) = owners.0.get(&a.pair) {
            matrix[a.node][o] += 1;
        }
    }
    note!(
        "cluster/{test}: sessions owned per node {:?}; accepted at node (row) for owner (col): {matrix:?}",
        all.map(|i| owners.count(i))
    );
    for (entry, row) in matrix.iter().enumerate() {
        for (owner, &n) in row.iter().enumerate() {
            ensure!(
                n > 0,
                "no message entered at {} for a session of {}: {matrix:?}",
                node_id(entry),
                node_id(owner)
            );
        }
    }
    // And every node hosts exactly the sessions the rendezvous hash gives it.
    let views = cl
        .wait_hosting(&all, &want_hosted(&owners, &all), T)
        .await?;
    let counts: Vec<Option<u64>> = views.iter().map(View::own_sessions).collect();
    note!("cluster/{test}: sessions_active per node {counts:?}");
    finish(test, cl, load, reader).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_node_under_load_fails_its_sessions_over_within_the_lease() -> Result<()> {
    let test = "kill-9";
    let (_serial, mut cl) = start_serial(test, &[]).await?;
    let r = kill_9(test, &mut cl).await;
    cl.explain(r)
}

async fn kill_9(test: &str, cl: &mut Cluster) -> Result<()> {
    let victim = 1;
    let Loaded {
        targets,
        mut load,
        reader,
        ..
    } = start_load(test, cl, victim, 2).await?;
    let orphans = cl.pairs_owned_by(&load, victim)?;

    let killed_at = Instant::now();
    let node = cl.node_mut(victim)?;
    tokio::task::block_in_place(|| node.kill9())?;
    targets.remove(victim);

    // The orphaned sessions serve again once the lease has expired and the map moved on.
    load.wait("the dead node's sessions to serve again", T, |a| {
        all_acked_after(a, &orphans, killed_at, 1)
    })
    .await?;
    let acks = load.acks();
    let failover = all_accepting_after(&acks, &orphans, killed_at);
    let survivors: HashSet<usize> = all_pairs().difference(&orphans).copied().collect();
    note!(
        "cluster/{test}: {} of {PAIRS} sessions were on {}; failover (kill → every one of them \
         accepting again) {:.2} s; longest ack gap: orphaned sessions {:.2} s, others {:.2} s",
        orphans.len(),
        node_id(victim),
        secs(failover),
        secs(longest_ack_gap(&acks, &orphans, killed_at)),
        secs(longest_ack_gap(&acks, &survivors, killed_at)),
    );
    ensure!(
        failover <= LEASE_TTL + Duration::from_secs(2),
        "failover took {failover:?}, over the lease TTL + 2 s"
    );
    // The survivors' own sessions never waited for the lease.
    let others_gap = longest_ack_gap(&acks, &survivors, killed_at);
    ensure!(
        others_gap < LEASE_TTL,
        "sessions of the survivors stalled {others_gap:?} after the kill"
    );

    let views = cl.wait_converged(&[0, 2], T).await?;
    note!(
        "cluster/{test}: survivors agree at revision {}",
        views[0].revision
    );
    finish_after_two_more(test, cl, load, reader).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_node_joins_under_load_and_takes_about_a_quarter_of_the_sessions() -> Result<()> {
    let test = "join";
    let (_serial, mut cl) = start_serial(test, &[]).await?;
    let r = join(test, &mut cl).await;
    cl.explain(r)
}

async fn join(test: &str, cl: &mut Cluster) -> Result<()> {
    let Loaded {
        targets,
        mut load,
        reader,
        ..
    } = start_load(test, cl, 0, 2).await?;

    let joining = Instant::now();
    let new = cl.add_node().await?;
    targets.add(new, cl.node(new)?.http_url());
    let views = cl.wait_converged(&[0, 1, 2, new], T).await?;
    let converged = joining.elapsed();

    let ids = sessions(&load.acks());
    let before = cl.owners(&ids, &[0, 1, 2])?;
    let after = cl.owners(&ids, &[0, 1, 2, new])?;
    let moved: HashSet<usize> = ids
        .keys()
        .copied()
        .filter(|p| before.0.get(p) != after.0.get(p))
        .collect();
    let fraction = moved.len() as f64 / ids.len() as f64;
    note!(
        "cluster/{test}: {} joined, all four agree at revision {} after {:.2} s; {} of {} \
         sessions moved ({:.3}, ideal 0.25)",
        node_id(new),
        views[0].revision,
        secs(converged),
        moved.len(),
        ids.len(),
        fraction
    );
    ensure!(
        moved.iter().all(|p| after.0.get(p) == Some(&new)),
        "a session moved between old nodes"
    );
    ensure!(
        (0.1..=0.4).contains(&fraction),
        "moved fraction {fraction:.3} is not about 1/4"
    );

    // The moved sessions serve from their new owner, which says it hosts them.
    load.wait_all("two messages per pair after the join", Instant::now(), 2)
        .await?;
    let res = wait_seen(
        "the new node to host the moved sessions and handoffs to end",
        T,
        || async {
            let Ok(views) = cl.views(&[0, 1, 2, new]).await else {
                return (None, "no views".to_string());
            };
            let hosted = views.last().and_then(View::own_sessions);
            let handoffs: Vec<Option<u64>> = views.iter().map(|v| v.handoffs_in_flight).collect();
            let seen = format!("{:?}", Some((hosted, handoffs.clone())));
            let done = hosted == Some(moved.len() as u64) && handoffs.iter().all(|h| *h == Some(0));
            (done.then_some(hosted), seen)
        },
    )
    .await;
    let hosted = res.with_context(|| {
        format!(
            "(sessions on the new node, handoffs per node); {} moved",
            moved.len()
        )
    })?;
    note!("cluster/{test}: {} hosts {hosted:?} sessions", node_id(new));
    finish(test, cl, load, reader).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_of_an_owner_past_its_lease_appends_and_delivers_nothing_twice() -> Result<()> {
    let test = "sigstop";
    let (_serial, cl) = start_serial(test, &[]).await?;
    let r = sigstop(test, &cl).await;
    // Whatever happened, resume the node (its log then shows what it did after the pause).
    if let Ok(n) = cl.node(1) {
        let _ = n.sigcont();
    }
    cl.explain(r)
}

async fn sigstop(test: &str, cl: &Cluster) -> Result<()> {
    let victim = 1;
    let stop_for = LEASE_TTL * 2;
    let Loaded {
        targets,
        mut load,
        reader,
        ..
    } = start_load(test, cl, victim, 2).await?;
    let frozen_pairs = cl.pairs_owned_by(&load, victim)?;

    let node = cl.node(victim)?;
    let stopped_at = Instant::now();
    tokio::task::block_in_place(|| node.sigstop())?;
    targets.remove(victim);
    // Once its lease is gone, the frozen node's sessions serve from the others.
    load.wait("the frozen node's sessions to serve elsewhere", T, |a| {
        all_acked_after(a, &frozen_pairs, stopped_at, 1)
    })
    .await?;
    let takeover = all_accepting_after(&load.acks(), &frozen_pairs, stopped_at);
    // The fault's length is the test's parameter: keep the node frozen until then.
    tokio::time::sleep_until((stopped_at + stop_for).into()).await;
    tokio::task::block_in_place(|| node.sigcont())?;
    let resumed_at = Instant::now();
    // Straight back into the rotation: whatever it still believes it owns, it must not
    // acknowledge anything it did not journal under a current claim.
    targets.add(victim, node.http_url());
    note!(
        "cluster/{test}: {} frozen {:.2} s; its {} sessions served elsewhere after {:.2} s",
        node_id(victim),
        secs(resumed_at - stopped_at),
        frozen_pairs.len(),
        secs(takeover)
    );

    let views = cl.wait_converged(&[0, 1, 2], T).await?;
    note!(
        "cluster/{test}: all three agree again at revision {} {:.2} s after SIGCONT",
        views[0].revision,
        secs(resumed_at.elapsed())
    );
    finish_after_two_more(test, cl, load, reader).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_for_ten_seconds_keeps_messages_flowing_and_views_converge() -> Result<()> {
    let test = "etcd-outage";
    let (_serial, mut cl) = start_serial(test, &[]).await?;
    let r = etcd_outage(test, &mut cl).await;
    cl.explain(r)
}

async fn etcd_outage(test: &str, cl: &mut Cluster) -> Result<()> {
    let outage = Duration::from_secs(10);
    let all = [0, 1, 2];
    let Loaded {
        load, reader, t0, ..
    } = start_load(test, cl, 0, 3).await?;
    let before_views = cl.views(&all).await?;

    let down_at = Instant::now();
    tokio::task::block_in_place(|| cl.etcd.stop())?;
    // The outage's length is the test's parameter.
    tokio::time::sleep_until((down_at + outage).into()).await;
    let up_at = Instant::now();
    let acks = load.acks();
    let attempts = load.attempts();
    tokio::task::block_in_place(|| cl.etcd.start_again())?;

    let window = |from: Instant, to: Instant| {
        acks.iter()
            .filter(|a| a.acked_at >= from && a.acked_at < to)
            .count()
    };
    let ref_len = (down_at - t0).min(Duration::from_secs(5));
    let rate_before = window(down_at - ref_len, down_at) as f64 / secs(ref_len);
    let rate_during = window(down_at, up_at) as f64 / secs(up_at - down_at);
    let refused_during = attempts
        .iter()
        .filter(|a| a.at >= down_at && a.at < up_at && a.outcome != Outcome::Accepted)
        .count();
    let tried_during = attempts
        .iter()
        .filter(|a| a.at >= down_at && a.at < up_at)
        .count();
    let gap = longest_ack_gap(&acks, &all_pairs(), down_at);
    note!(
        "cluster/{test}: etcd down {:.2} s: {:.0} acks/s before, {:.0} during; {refused_during} \
         of {tried_during} POSTs refused during; longest per-session ack gap {:.2} s",
        secs(up_at - down_at),
        rate_before,
        rate_during,
        secs(gap)
    );
    ensure!(
        rate_during >= 0.5 * rate_before,
        "acceptance fell from {rate_before:.0}/s to {rate_during:.0}/s while etcd was down"
    );
    ensure!(
        all_acked_after(&acks, &all_pairs(), down_at + outage / 2, 1),
        "some sessions accepted nothing in the second half of the outage"
    );

    let views = cl.wait_converged(&all, T).await?;
    note!(
        "cluster/{test}: all three members again {:.2} s after etcd was restarted (revision {} → {})",
        secs(up_at.elapsed()),
        before_views[0].revision,
        views[0].revision
    );
    finish_after_two_more(test, cl, load, reader).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_on_grpc_gets_retryable_refusals_and_loses_nothing() -> Result<()> {
    let test = "grpc-partition";
    let isolated = 2;
    // Until the proxy is up, nothing reaches the isolated node's gRPC port; membership (all
    // that starting waits for) goes through etcd only.
    let (_serial, cl) = start_serial(test, &[isolated]).await?;
    let node = cl.node(isolated)?;
    let proxy = FaultProxy::start(
        node.proxy_port,
        std::net::SocketAddr::from(([127, 0, 0, 1], node.grpc_port)),
    )?;
    let r = grpc_partition(test, &cl, &proxy, isolated).await;
    cl.explain(r)
}

async fn grpc_partition(
    test: &str,
    cl: &Cluster,
    proxy: &FaultProxy,
    isolated: usize,
) -> Result<()> {
    let Loaded {
        mut load, reader, ..
    } = start_load(test, cl, 0, 2).await?;
    let cut_off = cl.pairs_owned_by(&load, isolated)?;

    let mut phases = Vec::new();
    for (mode, hold) in [
        (ProxyMode::Blackhole, Duration::from_secs(4)),
        (ProxyMode::Refuse, Duration::from_secs(3)),
    ] {
        let from = Instant::now();
        proxy.set_mode(mode);
        // The fault's length is the test's parameter.
        tokio::time::sleep_until((from + hold).into()).await;
        phases.push((mode, from, Instant::now()));
    }
    let healed = Instant::now();
    proxy.set_mode(ProxyMode::Pass);

    let attempts = load.attempts();
    let acks = load.acks();
    for (mode, from, to) in &phases {
        // POSTs for the cut-off node's sessions that entered elsewhere.
        let mut by: BTreeMap<String, usize> = BTreeMap::new();
        for a in attempts.iter().filter(|a| {
            a.at >= *from && a.at < *to && a.node != isolated && cut_off.contains(&a.pair)
        }) {
            *by.entry(a.outcome.label()).or_default() += 1;
        }
        let local = acks
            .iter()
            .filter(|a| {
                a.acked_at >= *from
                    && a.acked_at < *to
                    && a.node == isolated
                    && cut_off.contains(&a.pair)
            })
            .count();
        note!(
            "cluster/{test}: {mode:?} {:.2} s: its sessions' POSTs at other nodes {by:?}; {local} \
             accepted at {} itself",
            secs(*to - *from),
            node_id(isolated)
        );
    }

    // After healing, the retries go through and every session moves on.
    load.wait_all("two messages per pair after healing", healed, 2)
        .await?;
    let recovered = all_accepting_after(&load.acks(), &cut_off, healed);
    note!(
        "cluster/{test}: {} sessions on {}; all accepting again {:.2} s after healing; proxy \
         accepted {} connections, refused {}",
        cut_off.len(),
        node_id(isolated),
        secs(recovered),
        proxy.accepted(),
        proxy.refused()
    );
    cl.wait_converged(&[0, 1, 2], T).await?;
    finish(test, cl, load, reader).await?;
    Ok(())
}

// === drain ========================================================================

/// How soon after SIGTERM a draining node's `/readyz` must stop answering 200.
const UNREADY_WITHIN: Duration = Duration::from_secs(1);
/// How long a request in flight at SIGTERM holds the drain up (its body comes this late).
const HOLD: Duration = Duration::from_millis(1500);

/// A POST to `/v1/events`, signed as a.example, held in flight: its head (with `Expect:
/// 100-continue`) is sent and the node has asked for the body, which only
/// [`finish`](HeldPost::finish) sends.
struct HeldPost {
    stream: tokio::net::TcpStream,
    body: Vec<u8>,
}

impl HeldPost {
    async fn open(port: u16, body: Vec<u8>) -> Result<Self> {
        use tokio::io::AsyncWriteExt;
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let ts = now_secs();
        let head = format!(
            "POST /v1/events HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nconnection: close\r\n\
             content-type: application/json\r\ncontent-length: {}\r\nexpect: 100-continue\r\n\
             x-fedrelay-domain: a.example\r\nx-fedrelay-timestamp: {ts}\r\n\
             x-fedrelay-signature: {}\r\n\r\n",
            body.len(),
            sign::sign(SECRET_A.as_bytes(), ts, &body)
        );
        stream.write_all(head.as_bytes()).await?;
        // The node asks for the body once its handler reads it: the request is in flight.
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), async {
            use tokio::io::AsyncReadExt;
            let mut chunk = [0u8; 256];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = stream.read(&mut chunk).await?;
                ensure!(n > 0, "connection closed before 100 Continue");
                buf.extend_from_slice(&chunk[..n]);
            }
            anyhow::Ok(())
        })
        .await
        .context("no 100 Continue within 5 s")??;
        let got = String::from_utf8_lossy(&buf);
        ensure!(
            got.starts_with("HTTP/1.1 100"),
            "want 100 Continue, got {got}"
        );
        Ok(Self { stream, body })
    }

    /// Sends the body; the status and JSON of the answer.
    async fn finish(mut self) -> Result<(u16, Value)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.stream.write_all(&self.body).await?;
        let mut buf = Vec::new();
        tokio::time::timeout(T, self.stream.read_to_end(&mut buf))
            .await
            .context("no answer to the held request")??;
        let text = String::from_utf8_lossy(&buf);
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("not an HTTP answer: {text}"))?;
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        Ok((status, serde_json::from_str(body).unwrap_or(Value::Null)))
    }
}

/// What the poller of a draining node's `/readyz` saw, counted from SIGTERM.
#[derive(Debug, Default)]
struct Readiness {
    /// The first answer other than 200: when, and its status (`None`: nothing answered).
    unready: Option<(Duration, Option<u16>)>,
    /// A 200 after that: readiness must not come back while the node drains.
    ready_again: Option<Duration>,
    /// Polls answered 503 before the process exited.
    answered_503: usize,
}

/// Polls `/readyz` on `port` until `exited` turns true or `limit` has passed since `from`;
/// as a load balancer would, takes `node` out of `targets` at the first answer other than
/// 200. Blocking: run it on a thread of its own.
fn poll_readyz(
    port: u16,
    node: usize,
    targets: &Targets,
    exited: &AtomicBool,
    from: Instant,
    limit: Duration,
) -> Readiness {
    let mut r = Readiness::default();
    while !exited.load(Ordering::SeqCst) && from.elapsed() < limit {
        let status = test_support::http_get_status(port, "/readyz");
        let at = from.elapsed();
        match status {
            Some(200) => {
                if r.unready.is_some() && r.ready_again.is_none() {
                    r.ready_again = Some(at);
                }
            }
            other => {
                if r.unready.is_none() {
                    r.unready = Some((at, other));
                    targets.remove(node);
                }
                if other == Some(503) {
                    r.answered_503 += 1;
                }
            }
        }
        // The poll's period, not a wait for anything.
        std::thread::sleep(Duration::from_millis(5));
    }
    r
}

/// Polls the `GET /cluster` of the node at `admin_url` until its members are exactly `want`
/// (sorted); answers how long after `from` the first such answer arrived.
async fn members_become(
    http: &reqwest::Client,
    admin_url: &str,
    want: &[String],
    from: Instant,
) -> Result<Duration> {
    wait_seen(
        &format!("{admin_url}/cluster to list exactly {want:?}"),
        T,
        || async {
            match view_at(http, admin_url).await {
                Ok(v) => {
                    let ids = v.member_ids();
                    let seen = format!("{ids:?} at revision {}", v.revision);
                    ((ids == want).then(|| from.elapsed()), seen)
                }
                Err(e) => (None, format!("{e:#}")),
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_node_under_load_leaving_etcd_first_and_losing_nothing() -> Result<()> {
    let test = "drain";
    let (_serial, mut cl) = start_serial(test, &[]).await?;
    let r = drain(test, &mut cl).await;
    cl.explain(r)
}

async fn drain(test: &str, cl: &mut Cluster) -> Result<()> {
    let victim = 1;
    let survivors = [0, 2];
    // The reader starts on the node that drains: its stream ends, and it resumes elsewhere.
    let Loaded {
        targets,
        mut load,
        reader,
        ..
    } = start_load(test, cl, victim, 2).await?;
    let moving = cl.pairs_owned_by(&load, victim)?;
    let staying: HashSet<usize> = all_pairs().difference(&moving).copied().collect();

    let victim_admin = cl.node(victim)?.admin_port;
    let before =
        tokio::task::block_in_place(|| test_support::http_get_status(victim_admin, "/readyz"));
    ensure!(
        before == Some(200),
        "{} answered /readyz with {before:?} before SIGTERM",
        node_id(victim)
    );
    let want: Vec<String> = survivors.iter().map(|&i| node_id(i)).collect();
    let admin_urls = survivors
        .iter()
        .map(|&i| cl.node(i).map(RelayNode::admin_url))
        .collect::<Result<Vec<_>>>()?;
    let http = cl.http.clone();
    let rt = tokio::runtime::Handle::current();
    // A retry of a message already acknowledged for one of the node's sessions is in flight
    // at the node when SIGTERM comes, and holds the drain up until its body arrives.
    let retried = load
        .acks()
        .into_iter()
        .filter(|a| moving.contains(&a.pair))
        .min_by_key(|a| (a.pair, a.idx))
        .context("no acknowledgement of a moving session")?;
    let (pair, idx) = (retried.pair, retried.idx);
    let body = message_body(test, pair, idx)?;
    let held = HeldPost::open(cl.node(victim)?.http_port, body).await?;
    // Longer than the drain deadline, so that a slow drain is measured rather than cut short.
    let limit = DRAIN_TIMEOUT + Duration::from_secs(5);
    let node = cl.node_mut(victim)?;
    let exited_flag = AtomicBool::new(false);
    let exited = &exited_flag;

    // SIGTERM; meanwhile poll the node's readiness on one thread (the load stops sending to
    // it once it is not ready) and the survivors' views on this one, and send the held
    // request's body late.
    let sigterm_at = Instant::now();
    let (exit, readiness, (dropped, held_answer)) = tokio::task::block_in_place(|| {
        std::thread::scope(|s| {
            let waiter = s.spawn(move || {
                let status = node.terminate(limit);
                let at = Instant::now();
                exited.store(true, Ordering::SeqCst);
                (status, at)
            });
            let lb = &targets;
            let poller =
                s.spawn(move || poll_readyz(victim_admin, victim, lb, exited, sigterm_at, limit));
            let watched = rt.block_on(async {
                let views = futures::future::join_all(
                    admin_urls
                        .iter()
                        .map(|u| members_become(&http, u, &want, sigterm_at)),
                );
                let answer = async {
                    // The hold is the test's parameter.
                    tokio::time::sleep_until((sigterm_at + HOLD).into()).await;
                    let r = held.finish().await;
                    (r, Instant::now())
                };
                tokio::join!(views, answer)
            });
            (waiter.join(), poller.join(), watched)
        })
    });
    let (status, exited_at) = exit.map_err(|_| anyhow::anyhow!("the SIGTERM thread panicked"))?;
    let readiness = readiness.map_err(|_| anyhow::anyhow!("the /readyz poller panicked"))?;
    // Had /readyz never failed, the load balancer forgets the node now it is gone.
    targets.remove(victim);
    let status = status?;
    let exit_after = exited_at - sigterm_at;
    let dropped = dropped.into_iter().collect::<Result<Vec<_>>>()?;
    let dropped_after = dropped.iter().copied().max().unwrap_or_default();
    let (held_answer, answered_at) = held_answer;
    let (held_status, held_json) = held_answer.context("the request held in flight")?;

    // The load during the drain: answers by kind and node (POSTs still on their way to the
    // draining node when the load balancer took it out count there).
    let mut during: BTreeMap<String, usize> = BTreeMap::new();
    let mut posts = 0usize;
    for a in load
        .attempts()
        .iter()
        .filter(|a| a.at >= sigterm_at && a.at <= exited_at)
    {
        posts += 1;
        let what = a.outcome.label();
        let at = if a.node == victim {
            "draining node"
        } else {
            "others"
        };
        *during.entry(format!("{what} at {at}")).or_default() += 1;
    }
    let count_503: usize = during
        .iter()
        .filter(|(k, _)| k.starts_with("503 "))
        .map(|(_, n)| n)
        .sum();
    note!(
        "cluster/{test}: SIGTERM to {} ({} of {PAIRS} sessions): /readyz first {:?} after {:.3} s \
         ({} polls answered 503 while draining); survivors listed 2 members after {:?} s \
         (lease TTL {} s); exited with {status} after {:.2} s (drain deadline {} s)",
        node_id(victim),
        moving.len(),
        readiness.unready.map(|(_, s)| s),
        readiness.unready.map_or(f64::NAN, |(t, _)| secs(t)),
        readiness.answered_503,
        dropped
            .iter()
            .map(|d| format!("{:.3}", secs(*d)))
            .collect::<Vec<_>>(),
        LEASE_TTL.as_secs(),
        secs(exit_after),
        DRAIN_TIMEOUT.as_secs()
    );
    note!(
        "cluster/{test}: during the drain the load saw {count_503} answers of 503 in {posts} \
         POSTs: {during:?}"
    );
    note!(
        "cluster/{test}: the request held in flight was answered {held_status} {:.2} s after \
         SIGTERM ({held_json}); the node exited {:.3} s after that",
        secs(answered_at - sigterm_at),
        secs(exited_at.saturating_duration_since(answered_at))
    );

    ensure!(
        status.success(),
        "{} exited with {status} after SIGTERM",
        node_id(victim)
    );
    ensure!(
        exit_after <= DRAIN_TIMEOUT,
        "{} took {exit_after:?} to exit, past its drain deadline of {DRAIN_TIMEOUT:?}",
        node_id(victim)
    );
    match readiness.unready {
        Some((t, Some(503))) if t <= UNREADY_WITHIN => {}
        other => bail!(
            "/readyz of the draining node: first non-200 answer (after, status) {other:?}; \
             want 503 within {UNREADY_WITHIN:?} of SIGTERM"
        ),
    }
    // The request in flight at SIGTERM was finished and answered as the retry it was.
    ensure!(
        held_status == 202
            && held_json["duplicate"] == true
            && held_json["relay_msg_id"] == retried.relay_msg_id.as_str()
            && held_json["seq"] == retried.seq,
        "the request in flight at SIGTERM (a retry of p{pair} m{idx}, acknowledged as seq {} \
         {}) was answered {held_status} {held_json}",
        retried.seq,
        retried.relay_msg_id
    );
    ensure!(
        readiness.ready_again.is_none(),
        "/readyz answered 200 again {:?} after SIGTERM",
        readiness.ready_again
    );
    // Deregistration, not lease expiry: the lease would have run out no sooner than 2/3 of
    // its TTL after the node's last keep-alive (they come every TTL/3), so half the TTL
    // tells the two apart.
    ensure!(
        dropped_after < LEASE_TTL / 2,
        "the survivors listed two members only {dropped_after:?} after SIGTERM; deregistering \
         should beat the lease ({LEASE_TTL:?}) by far"
    );
    let log = cl.node(victim)?.output()?;
    for warning in [
        "could not deregister",
        "did not finish before the drain deadline",
        "drain deadline reached",
        "not flushed before the deadline",
    ] {
        ensure!(
            !log.contains(warning),
            "the draining node logged `{warning}`"
        );
    }

    let views = cl.wait_converged(&survivors, T).await?;
    load.wait_all("two more messages per pair", Instant::now(), 2)
        .await?;
    let acks = load.acks();
    let gap_moved = longest_ack_gap(&acks, &moving, sigterm_at);
    let gap_staying = longest_ack_gap(&acks, &staying, sigterm_at);
    note!(
        "cluster/{test}: survivors agree at revision {}; longest ack gap since SIGTERM: the \
         drained node's sessions {:.2} s, the others' {:.2} s",
        views[0].revision,
        secs(gap_moved),
        secs(gap_staying)
    );
    // Its sessions moved on at once, not when a lease ran out.
    ensure!(
        gap_moved < LEASE_TTL,
        "sessions of the draining node stalled {gap_moved:?}"
    );
    finish(test, cl, load, reader).await?;
    Ok(())
}

// === cluster status ===============================================================

/// Runs `relay-node <args>`: its exit status, stdout and stderr.
async fn relay_node_cli(args: &[&str]) -> Result<(std::process::ExitStatus, String, String)> {
    let bin = test_support::workspace_binary("relay-node")?;
    let out = tokio::time::timeout(
        T,
        tokio::process::Command::new(&bin)
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("FEDRELAY_CONFIG")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .with_context(|| format!("relay-node {} still running after {T:?}", args.join(" ")))??;
    Ok((
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_status_lists_every_member_from_any_nodes_admin_listener() -> Result<()> {
    let test = "status";
    let (_serial, cl) = start_serial(test, &[]).await?;
    let r = status_command(test, &cl).await;
    cl.explain(r)
}

async fn status_command(test: &str, cl: &Cluster) -> Result<()> {
    let all = [0, 1, 2];
    // Sessions on every node, so that the counts mean something.
    let mut load = Load::start(test, cl.targets())?;
    load.wait_all("a message per pair", Instant::now(), 1)
        .await?;
    let history = load.stop().await?;
    let owners = cl.owners(&sessions(&history.acks), &all)?;
    let views = cl
        .wait_hosting(&all, &want_hosted(&owners, &all), T)
        .await?;
    let revision = views[0].revision;
    let grpc = |i: usize| -> Result<String> { Ok(format!("127.0.0.1:{}", cl.node(i)?.grpc_port)) };

    // The table, from every node's admin listener.
    for &at in &all {
        let admin = cl.node(at)?.admin_url();
        let (status, out, err) = relay_node_cli(&["cluster", "status", "--admin", &admin]).await?;
        ensure!(
            status.success(),
            "cluster status --admin {admin}: {status}\n{out}{err}"
        );
        let mut lines = out.lines();
        let head = format!(
            "cluster as seen by {} at revision {revision} (ready)",
            node_id(at)
        );
        ensure!(
            lines.next() == Some(head.as_str()),
            "want `{head}` first:\n{out}"
        );
        ensure!(
            lines.next().is_some_and(|l| l.starts_with("NODE ")),
            "no column header:\n{out}"
        );
        let rows: Vec<Vec<&str>> = lines.map(|l| l.split_whitespace().collect()).collect();
        ensure!(rows.len() == 3, "want three members:\n{out}");
        for &i in &all {
            let row = rows
                .iter()
                .find(|r| r.first() == Some(&node_id(i).as_str()))
                .with_context(|| format!("{} not listed:\n{out}", node_id(i)))?;
            // NODE READY REVISION SESSIONS HANDOFFS PRESENCE GRPC
            let sessions = owners.count(i).to_string();
            let rev = revision.to_string();
            let addr = grpc(i)?;
            let id = node_id(i);
            let want_row = [
                Some(id.as_str()),
                Some("yes"),
                Some(rev.as_str()),
                Some(sessions.as_str()),
                Some("0"),
            ];
            ensure!(
                row.len() == 7
                    && row.iter().take(5).map(|c| Some(*c)).eq(want_row)
                    && row.get(5).is_some_and(|p| p.parse::<u64>().is_ok())
                    && row.get(6) == Some(&addr.as_str()),
                "row of {}: {row:?}; want {want_row:?}, a presence count, {addr}:\n{out}",
                node_id(i)
            );
        }
        if at == 0 {
            note!("cluster/{test}: `relay-node cluster status` printed:\n{out}");
        }
    }

    // The JSON.
    let admin = cl.node(1)?.admin_url();
    let (status, out, err) =
        relay_node_cli(&["cluster", "status", "--admin", &admin, "--json"]).await?;
    ensure!(
        status.success(),
        "cluster status --json: {status}\n{out}{err}"
    );
    let v: Value = serde_json::from_str(&out).with_context(|| format!("not JSON:\n{out}"))?;
    ensure!(
        v["node_id"] == node_id(1).as_str() && v["ready"] == true && v["revision"] == revision,
        "the answering node: {v}"
    );
    let members = v["members"].as_array().context("no members array")?;
    ensure!(members.len() == 3, "want three members: {v}");
    for &i in &all {
        let m = members
            .iter()
            .find(|m| m["node_id"] == node_id(i).as_str())
            .with_context(|| format!("{} not in {v}", node_id(i)))?;
        ensure!(
            m["sessions_active"].as_u64() == Some(owners.count(i) as u64)
                && m["ready"] == true
                && m["grpc_addr"] == grpc(i)?.as_str()
                && m["handoffs_in_flight"].as_u64() == Some(0)
                && m["presence_active"].is_u64(),
            "{} in the JSON: {m}; want {} sessions",
            node_id(i),
            owners.count(i)
        );
    }

    // Where nothing listens, and where something answers that is no admin listener: an
    // error naming the URL, and no table.
    let nothing = format!("http://127.0.0.1:{}", test_support::free_port()?);
    let not_admin = cl.node(0)?.http_url();
    for (url, json) in [(&nothing, false), (&nothing, true), (&not_admin, false)] {
        let mut args = vec!["cluster", "status", "--admin", url.as_str()];
        if json {
            args.push("--json");
        }
        let started = Instant::now();
        let (status, out, err) = relay_node_cli(&args).await?;
        note!(
            "cluster/{test}: `relay-node {}` → {status} after {:.2} s: {}",
            args.join(" "),
            secs(started.elapsed()),
            err.trim()
        );
        ensure!(
            !status.success() && status.code().is_some(),
            "`relay-node {}` exited with {status}\n{out}{err}",
            args.join(" ")
        );
        ensure!(
            err.contains(url.as_str()),
            "the error does not name {url}: {err}"
        );
        ensure!(out.is_empty(), "printed on failure: {out}");
    }
    Ok(())
}
