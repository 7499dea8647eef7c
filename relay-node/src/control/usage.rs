//! Usage accounting: messages and distinct users per UTC day, by internal domain, external
//! domain, platform and type, and a report of the trailing months as JSON and CSV.
//!
//! # Flow
//!
//! Every metadata entry (one per relayed message or refusal) goes to [`UsageAggregator::add`],
//! which only touches memory under a short lock: it bumps counters and puts the users into
//! per-day sets. About once a second [`UsageAggregator::spawn_flusher`] hands what was gathered
//! to a [`UsageStore`] in one write: Redis for a cluster (message counters in a hash per day,
//! distinct users in HyperLogLogs per day), or memory for a single `--dev` node (exact sets).
//! No message costs a Redis round trip. [`UsageStore::report`] reads the trailing calendar
//! months back: a month is the merge of its days.
//!
//! # What is counted
//!
//! One message per entry, whatever the number of receivers, under its type (the entry's
//! category: `im`, `presence`, `typing`, `error`) and under each distinct value it touches:
//! the domains of the sender and of every receiver (internal or external, as
//! [`DomainSides`] says) and the sender's and receivers' platforms (an empty platform is
//! skipped). Users are the sender and every receiver (`user@domain`, lowercased), each under
//! its own domain and platform. Refusals (`error`) are counted apart from messages; their users
//! go into the `error` type's set only, so addresses that were refused never inflate the
//! unique users of a domain, a platform or the total.
//!
//! # Keys
//!
//! Every key carries the hash tag `{usage}`, so all usage data lives in one Redis Cluster slot
//! and the multi-key commands below (the write script, `PFCOUNT` and `PFMERGE` over days) are
//! legal there. With the default prefix `fr`:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `fr:{usage}:<YYYY-MM-DD>:msgs` | hash | `<dim>:<value>:<type>` → messages, with `<dim>` one of `int`, `ext`, `plat`; `all::<type>` → messages of that type in total |
//! | `fr:{usage}:<YYYY-MM-DD>:users:<set>` | HyperLogLog | users of the day in `<set>`: `all`, `type:<type>`, `int:<domain>`, `ext:<domain>`, `plat:<platform>` |
//! | `fr:{usage}:<YYYY-MM>:users:<set>` | HyperLogLog | the month's days merged, built by the first report after the month is over |
//! | `fr:{usage}:<YYYY-MM>:msgs` | hash | the month's day hashes summed, built with the merged sets |
//! | `fr:{usage}:<YYYY-MM>:merged` | string | present while the month's merged sets and sums are complete; every write into a day of that month deletes it |
//! | `fr:{usage}:applied:<writer>` | string | the last batch number that writer applied (expires after a day) |
//!
//! Day and month keys expire after the retention (400 days by default, so a 12-month report
//! always finds its data). A finished month (a day past its end) is cached on its first
//! report: its unique-user sets merged and its day hashes summed, in one transaction; later
//! reports read one hash and one set per dimension for it instead of its days.
//!
//! # Exactly once
//!
//! A batch is written by one Lua script: `HINCRBY`, `PFADD` and `EXPIRE` for all its keys, in one
//! round trip, atomically. Each batch carries its writer's id and a sequence number, and the
//! script applies it only if that writer's last applied number is lower. A write that fails
//! keeps its batch and number; the next flush sends that same batch again before anything
//! newer. So a timeout after Redis applied the batch (the reply was lost) does not count it
//! twice, and a failure before it was applied loses nothing.
//!
//! # Accuracy and bounds
//!
//! Message and error counts are exact. Unique users from Redis are HyperLogLog estimates
//! (standard error 0.81 %; exact in practice for small sets); from memory they are exact.
//!
//! While writes keep failing, counters keep merging (a few per value and day), and user sets
//! keep growing up to [`UsageConfig::max_pending_users`] members in all. Beyond that bound,
//! users not yet held are dropped (counted in `fedrelay_usage_users_dropped_total`): message
//! counts stay exact, unique users may be under-counted for the outage; what is held is
//! written when Redis is back. Values per dimension and day are capped at
//! [`UsageConfig::max_values_per_dimension`] on each node; further values (say, refusals from
//! ever new domains) are counted under `(other)`, so hostile input cannot grow the key space
//! without bound.
//!
//! Logs and metrics carry counts only, never user addresses.

use crate::control::metadata::day_of;
use redis::aio::ConnectionManager;
use serde::Serialize;
use session_actor::MetadataEntry;
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// Days a day's (and a month's) usage keys live in Redis: more than 13 months, so a report of
/// the trailing 12 months always has its data.
pub const DEFAULT_RETENTION_DAYS: u32 = 400;

/// How often the flusher writes.
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// The value counted instead of any beyond [`UsageConfig::max_values_per_dimension`] (or
/// longer than 255 bytes). Parentheses are in no domain or platform name.
pub const OTHER: &str = "(other)";

/// The category of refusals, counted apart from messages.
const ERROR_TYPE: &str = "error";
const MAX_VALUE_LEN: usize = 255;
const MS_PER_DAY: i64 = 86_400_000;
/// Days after its end before a month's unique-user sets are merged and cached.
const GRACE_DAYS: i64 = 1;
/// The longest report, in months.
const MAX_REPORT_MONTHS: u32 = 60;
/// How long Redis remembers a writer's last applied batch: far longer than any retry.
const APPLIED_TTL_SECS: u64 = 86_400;
/// Days for which the values seen per dimension are remembered (for the cap).
const KNOWN_DAYS: usize = 3;
/// Attempts of the last flush when the flusher is told to stop.
const FINAL_ATTEMPTS: u32 = 3;
const FINAL_RETRY_DELAY: Duration = Duration::from_millis(200);

/// Why usage could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("invalid day {0:?}: expected YYYY-MM-DD")]
    InvalidDay(String),
    #[error("invalid report range: {0}")]
    InvalidRange(String),
    #[error("unexpected reply from redis: {0}")]
    UnexpectedReply(&'static str),
}

/// Which domains are the deployment's own. The node answers from its federation policy.
pub trait DomainSides: Send + Sync {
    /// Whether `domain` (lowercase ASCII) is internal; every other domain is external.
    fn is_internal(&self, domain: &str) -> bool;
}

/// A fixed set of internal domains.
#[derive(Debug, Clone, Default)]
pub struct StaticSides {
    internal: HashSet<String>,
}

impl StaticSides {
    pub fn new<I, S>(internal: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self {
            internal: internal
                .into_iter()
                .map(|d| d.as_ref().to_ascii_lowercase())
                .collect(),
        }
    }
}

impl DomainSides for StaticSides {
    fn is_internal(&self, domain: &str) -> bool {
        self.internal.contains(domain)
    }
}

/// Memory bounds of an aggregator.
#[derive(Debug, Clone)]
pub struct UsageConfig {
    /// Users held for writing, over all sets, days and failed batches. Beyond it, new users are
    /// dropped until a write succeeds (message counts stay exact).
    pub max_pending_users: usize,
    /// Distinct values per dimension (internal domain, external domain, platform) and day on
    /// this node; further values are counted as [`OTHER`].
    pub max_values_per_dimension: usize,
}

impl Default for UsageConfig {
    fn default() -> Self {
        Self {
            max_pending_users: 500_000,
            max_values_per_dimension: 10_000,
        }
    }
}

// === impl Dim ===

/// A dimension a message is broken down by (besides its type).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Dim {
    Internal,
    External,
    Platform,
}

impl Dim {
    /// Its tag in hash fields and set names.
    fn tag(self) -> &'static str {
        match self {
            Dim::Internal => "int",
            Dim::External => "ext",
            Dim::Platform => "plat",
        }
    }

    fn from_tag(tag: &str) -> Option<Self> {
        match tag {
            "int" => Some(Dim::Internal),
            "ext" => Some(Dim::External),
            "plat" => Some(Dim::Platform),
            _ => None,
        }
    }
}

// === impl Batch ===

/// What was gathered and not yet written.
#[derive(Debug, Default)]
struct Batch {
    /// Per day (since the epoch): hash field → increment.
    counts: BTreeMap<i64, HashMap<String, i64>>,
    /// Per day: set name (`all`, `type:im`, `int:contoso.com`, ...) → users.
    users: BTreeMap<i64, HashMap<String, HashSet<String>>>,
    /// Members over all sets: what the memory bound counts.
    members: usize,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.counts.is_empty() && self.users.is_empty()
    }

    fn count(&mut self, day: i64, field: String, n: i64) {
        *self
            .counts
            .entry(day)
            .or_default()
            .entry(field)
            .or_default() += n;
    }

    /// Adds `user` to a set; `room` says whether a new member may be held. False when the
    /// user was new and there was no room.
    fn add_user(&mut self, day: i64, set: String, user: &str, room: bool) -> bool {
        let members = self.users.entry(day).or_default().entry(set).or_default();
        if members.contains(user) {
            return true;
        }
        if !room {
            return false;
        }
        members.insert(user.to_string());
        self.members += 1;
        true
    }
}

// === impl UsageAggregator ===

/// Gathers usage in memory; cheap to clone (clones share the same data).
#[derive(Clone)]
pub struct UsageAggregator {
    inner: Arc<Inner>,
}

struct Inner {
    sides: Arc<dyn DomainSides>,
    cfg: UsageConfig,
    state: Mutex<State>,
    /// Held for a whole flush: batches are written one at a time, in number order.
    flush: tokio::sync::Mutex<FlushState>,
    /// Identifies this aggregator's batches in Redis, so a batch sent twice is applied once.
    writer: String,
}

struct State {
    pending: Batch,
    /// Members of batches a flush took and has not written yet: they still take memory.
    in_flight_members: usize,
    /// Values seen per day and dimension, for the cap (the newest few days).
    known: BTreeMap<i64, HashMap<Dim, HashSet<String>>>,
}

struct FlushState {
    next_seq: u64,
    /// A batch whose write failed, with its number: sent again, unchanged, before anything
    /// newer (Redis may have applied it and only the reply been lost).
    retry: Option<(u64, Batch)>,
    /// Whether the last write failed (to log a failure once, and the recovery).
    failing: bool,
}

/// One user of an entry, normalised.
struct Person {
    user: String,
    domain: Option<(Dim, String)>,
    platform: Option<String>,
}

impl UsageAggregator {
    pub fn new(sides: Arc<dyn DomainSides>, cfg: UsageConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                sides,
                cfg,
                state: Mutex::new(State {
                    pending: Batch::default(),
                    in_flight_members: 0,
                    known: BTreeMap::new(),
                }),
                flush: tokio::sync::Mutex::new(FlushState {
                    next_seq: 1,
                    retry: None,
                    failing: false,
                }),
                writer: uuid::Uuid::now_v7().to_string(),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts one metadata entry. Memory only, under a short lock.
    pub fn add(&self, entry: &MetadataEntry) {
        let day = entry.at_ms.div_euclid(MS_PER_DAY);
        let typ = entry.category;
        let counted = typ != ERROR_TYPE;
        let sender_platform = normalize(&entry.sender_platform);
        let receiver_platform = normalize(&entry.receiver_platform);
        let mut people = Vec::with_capacity(1 + entry.receivers.len());
        let users = std::iter::once((&entry.sender, &sender_platform))
            .chain(entry.receivers.iter().map(|r| (r, &receiver_platform)));
        for (user, platform) in users {
            let user = user.trim().to_ascii_lowercase();
            if user.is_empty() {
                continue;
            }
            let domain = domain_of(&user).map(|d| {
                let dim = if self.inner.sides.is_internal(d) {
                    Dim::Internal
                } else {
                    Dim::External
                };
                (dim, d.to_string())
            });
            people.push(Person {
                user,
                domain,
                platform: platform.clone(),
            });
        }

        let cfg = &self.inner.cfg;
        let mut guard = self.state();
        let st = &mut *guard;
        let known = known_for(&mut st.known, day);
        // Each distinct (dimension, value) of the entry counts the message once.
        let mut values: Vec<(Dim, String)> = Vec::new();
        for p in &mut people {
            if let Some((dim, d)) = p.domain.take() {
                let d = admit(known, dim, d, cfg.max_values_per_dimension);
                if !values.iter().any(|(vd, vv)| *vd == dim && *vv == d) {
                    values.push((dim, d.clone()));
                }
                p.domain = Some((dim, d));
            }
            if let Some(pl) = p.platform.take() {
                let pl = admit(known, Dim::Platform, pl, cfg.max_values_per_dimension);
                if !values
                    .iter()
                    .any(|(vd, vv)| *vd == Dim::Platform && *vv == pl)
                {
                    values.push((Dim::Platform, pl.clone()));
                }
                p.platform = Some(pl);
            }
        }
        st.pending.count(day, format!("all::{typ}"), 1);
        for (dim, v) in &values {
            st.pending.count(day, format!("{}:{v}:{typ}", dim.tag()), 1);
        }

        let mut dropped = 0u64;
        let limit = cfg.max_pending_users;
        for p in &people {
            let mut sets = Vec::with_capacity(4);
            sets.push(format!("type:{typ}"));
            if counted {
                sets.push("all".to_string());
                if let Some((dim, d)) = &p.domain {
                    sets.push(format!("{}:{d}", dim.tag()));
                }
                if let Some(pl) = &p.platform {
                    sets.push(format!("plat:{pl}"));
                }
            }
            for set in sets {
                let room = st.pending.members + st.in_flight_members < limit;
                if !st.pending.add_user(day, set, &p.user, room) {
                    dropped += 1;
                }
            }
        }
        drop(guard);
        if dropped > 0 {
            metrics::counter!("fedrelay_usage_users_dropped_total").increment(dropped);
        }
    }

    /// Users held in memory for writing (pending and in failed batches).
    pub fn pending_users(&self) -> usize {
        let st = self.state();
        st.pending.members + st.in_flight_members
    }

    /// Writes everything gathered so far to `store`: first a batch whose earlier write
    /// failed, then what was added since. On error nothing is lost: the batch is kept and
    /// sent again, unchanged, by the next flush.
    pub async fn flush(&self, store: &UsageStore) -> Result<(), UsageError> {
        let mut fs = self.inner.flush.lock().await;
        let result = self.flush_locked(&mut fs, store).await;
        match &result {
            Ok(()) => {
                if fs.failing {
                    info!("usage writes recovered");
                }
                fs.failing = false;
            }
            Err(e) => {
                metrics::counter!("fedrelay_usage_flush_errors_total").increment(1);
                if fs.failing {
                    debug!(error = %e, "usage write failed again; kept for the next flush");
                } else {
                    warn!(error = %e, pending_users = self.pending_users(), "usage write failed; kept for the next flush");
                }
                fs.failing = true;
            }
        }
        result
    }

    async fn flush_locked(
        &self,
        fs: &mut FlushState,
        store: &UsageStore,
    ) -> Result<(), UsageError> {
        if let Some((seq, batch)) = fs.retry.take() {
            if let Err(e) = store.write(&self.inner.writer, seq, &batch).await {
                fs.retry = Some((seq, batch));
                return Err(e);
            }
            metrics::counter!("fedrelay_usage_flushes_total").increment(1);
            self.state().in_flight_members = 0;
        }
        let batch = {
            let mut st = self.state();
            let batch = std::mem::take(&mut st.pending);
            st.in_flight_members = batch.members;
            batch
        };
        if batch.is_empty() {
            return Ok(());
        }
        let seq = fs.next_seq;
        fs.next_seq += 1;
        if let Err(e) = store.write(&self.inner.writer, seq, &batch).await {
            fs.retry = Some((seq, batch));
            return Err(e);
        }
        metrics::counter!("fedrelay_usage_flushes_total").increment(1);
        self.state().in_flight_members = 0;
        Ok(())
    }

    /// Flushes every `interval` (use [`DEFAULT_FLUSH_INTERVAL`]) until `stop` turns true (or
    /// its sender is dropped), then once more, retrying that last flush a few times.
    pub fn spawn_flusher(
        self,
        store: UsageStore,
        interval: Duration,
        mut stop: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                if *stop.borrow_and_update() {
                    break;
                }
                tokio::select! {
                    _ = tick.tick() => {
                        // Failures are counted and logged by `flush`; the data is kept.
                        let _ = self.flush(&store).await;
                    }
                    changed = stop.changed() => {
                        if changed.is_err() {
                            break;
                        }
                    }
                }
            }
            for attempt in 1..=FINAL_ATTEMPTS {
                if self.flush(&store).await.is_ok() {
                    return;
                }
                if attempt < FINAL_ATTEMPTS {
                    tokio::time::sleep(FINAL_RETRY_DELAY).await;
                }
            }
            warn!(
                pending_users = self.pending_users(),
                "usage not written at shutdown"
            );
        })
    }
}

/// Lowercase, trimmed; `None` when empty.
fn normalize(value: &str) -> Option<String> {
    let v = value.trim();
    (!v.is_empty()).then(|| v.to_ascii_lowercase())
}

/// The domain of `user@domain` (without any `/resource`), if any.
fn domain_of(user: &str) -> Option<&str> {
    let (_, d) = user.rsplit_once('@')?;
    let d = d.split('/').next().unwrap_or(d);
    (!d.is_empty()).then_some(d)
}

/// The values seen on `day`, remembering only the newest few days.
fn known_for(
    known: &mut BTreeMap<i64, HashMap<Dim, HashSet<String>>>,
    day: i64,
) -> &mut HashMap<Dim, HashSet<String>> {
    known.entry(day).or_default();
    while known.len() > KNOWN_DAYS {
        match known.keys().copied().find(|d| *d != day) {
            Some(oldest) => {
                known.remove(&oldest);
            }
            None => break,
        }
    }
    known.entry(day).or_default()
}

/// `value`, or [`OTHER`] when it is too long or its dimension already has `cap` values.
fn admit(known: &mut HashMap<Dim, HashSet<String>>, dim: Dim, value: String, cap: usize) -> String {
    if value.len() > MAX_VALUE_LEN {
        return OTHER.to_string();
    }
    let seen = known.entry(dim).or_default();
    if seen.contains(&value) {
        return value;
    }
    if seen.len() < cap {
        seen.insert(value.clone());
        value
    } else {
        OTHER.to_string()
    }
}

// === impl UsageStore ===

/// Where usage is written and read back: Redis, or memory for a single node.
#[derive(Clone)]
pub struct UsageStore {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Redis(RedisUsage),
    Memory(Arc<Mutex<MemoryUsage>>),
}

#[derive(Clone)]
struct RedisUsage {
    conn: ConnectionManager,
    prefix: String,
    retention_secs: u64,
    write: Arc<redis::Script>,
}

/// Exact usage in memory.
#[derive(Default)]
struct MemoryUsage {
    days: BTreeMap<i64, MemoryDay>,
    retention_days: i64,
}

#[derive(Default)]
struct MemoryDay {
    counts: HashMap<String, i64>,
    users: HashMap<String, HashSet<String>>,
}

/// Sums the day hashes KEYS[2..] into the month hash KEYS[1] (replaced), expiring after
/// ARGV[1] seconds; run in the transaction that marks the month merged, so a write into one
/// of its days either comes before (and is summed) or after (and removes the marker).
const MONTH_SUM_SCRIPT: &str = r"
local sums = {}
for i = 2, #KEYS do
  local kv = redis.call('HGETALL', KEYS[i])
  for j = 1, #kv, 2 do
    sums[kv[j]] = (sums[kv[j]] or 0) + tonumber(kv[j + 1])
  end
end
redis.call('DEL', KEYS[1])
local args = {}
for f, n in pairs(sums) do
  args[#args + 1] = f
  args[#args + 1] = n
end
for i = 1, #args, 1000 do
  redis.call('HSET', KEYS[1], unpack(args, i, math.min(i + 999, #args)))
end
if #args > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return #args / 2
";

/// Applies one batch: see the module docs. KEYS[1] is the writer's applied-batch key; ARGV is
/// the batch number, that key's TTL, the data TTL, then operations: `h <key> <n> (field
/// incr)*n`, `p <key> <n> member*n`, `d <key>` (a key is its index in KEYS).
const WRITE_SCRIPT: &str = r"
local seq = tonumber(ARGV[1])
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
if seq <= last then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
local i = 4
local n_argv = #ARGV
while i <= n_argv do
  local op = ARGV[i]
  local key = KEYS[tonumber(ARGV[i + 1])]
  if op == 'd' then
    redis.call('DEL', key)
    i = i + 2
  else
    local n = tonumber(ARGV[i + 2])
    i = i + 3
    if op == 'h' then
      for j = 0, n - 1 do
        redis.call('HINCRBY', key, ARGV[i + 2 * j], ARGV[i + 2 * j + 1])
      end
      i = i + 2 * n
    else
      local j = 0
      while j < n do
        local m = math.min(n - j, 1000)
        redis.call('PFADD', key, unpack(ARGV, i + j, i + j + m - 1))
        j = j + m
      end
      i = i + n
    end
    redis.call('EXPIRE', key, ARGV[3])
  end
end
return 1
";

impl UsageStore {
    /// Usage in Redis under `prefix` (the store's key prefix), kept `retention_days` (at
    /// least 1; use [`DEFAULT_RETENTION_DAYS`]).
    pub fn redis(conn: ConnectionManager, prefix: &str, retention_days: u32) -> Self {
        Self {
            backend: Backend::Redis(RedisUsage {
                conn,
                prefix: prefix.to_string(),
                retention_secs: u64::from(retention_days.max(1)) * 86_400,
                write: Arc::new(redis::Script::new(WRITE_SCRIPT)),
            }),
        }
    }

    /// Usage in this process's memory (exact), keeping `retention_days` days back from the
    /// newest day written.
    pub fn memory(retention_days: u32) -> Self {
        Self {
            backend: Backend::Memory(Arc::new(Mutex::new(MemoryUsage {
                days: BTreeMap::new(),
                retention_days: i64::from(retention_days.max(1)),
            }))),
        }
    }

    async fn write(&self, writer: &str, seq: u64, batch: &Batch) -> Result<(), UsageError> {
        match &self.backend {
            Backend::Redis(r) => r.write(writer, seq, batch).await,
            Backend::Memory(m) => {
                let mut m = m.lock().unwrap_or_else(PoisonError::into_inner);
                m.apply(batch);
                Ok(())
            }
        }
    }

    /// The trailing `months` calendar months (1 to 60) ending with the month of `end_day`
    /// (`YYYY-MM-DD`, UTC), oldest first. The last month runs from its first day to
    /// `end_day`.
    pub async fn report(&self, end_day: &str, months: u32) -> Result<UsageReport, UsageError> {
        let end = parse_day(end_day)?;
        let periods = month_periods(end, months)?;
        self.report_periods(&periods, today()).await
    }

    /// Today (UTC) so far, as a report of one period labelled with the day.
    pub async fn today(&self) -> Result<UsageReport, UsageError> {
        let t = today();
        let period = Period {
            label: day_label(t),
            first: t,
            last: t,
            whole_month: false,
        };
        self.report_periods(&[period], t).await
    }

    async fn report_periods(
        &self,
        periods: &[Period],
        today: i64,
    ) -> Result<UsageReport, UsageError> {
        let counted = match &self.backend {
            Backend::Redis(r) => r.count(periods, today).await?,
            Backend::Memory(m) => m
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .count(periods),
        };
        Ok(assemble(periods, &counted))
    }
}

/// What a backend read for a report: per period its tally and unique users per set, and the
/// unique users per set over the whole window.
struct Counted {
    tallies: Vec<Tally>,
    uniques: Vec<HashMap<String, u64>>,
    window: HashMap<String, u64>,
}

impl RedisUsage {
    fn base(&self) -> String {
        format!("{}:{{usage}}", self.prefix)
    }

    fn msgs_key(&self, day: i64) -> String {
        format!("{}:{}:msgs", self.base(), day_label(day))
    }

    /// The users of `set` in a period labelled `label` (a day or a month).
    fn users_key(&self, label: &str, set: &str) -> String {
        format!("{}:{label}:users:{set}", self.base())
    }

    fn merged_key(&self, month: &str) -> String {
        format!("{}:{month}:merged", self.base())
    }

    /// A finished month's day hashes summed (valid while its `merged` marker is there).
    fn month_msgs_key(&self, month: &str) -> String {
        format!("{}:{month}:msgs", self.base())
    }

    async fn write(&self, writer: &str, seq: u64, batch: &Batch) -> Result<(), UsageError> {
        let mut inv = self.write.prepare_invoke();
        inv.key(format!("{}:applied:{writer}", self.base()))
            .arg(seq)
            .arg(APPLIED_TTL_SECS)
            .arg(self.retention_secs);
        let mut nkeys = 1usize;
        let mut months = BTreeSet::new();
        for (&day, fields) in &batch.counts {
            months.insert(month_label(day));
            nkeys += 1;
            inv.key(self.msgs_key(day))
                .arg("h")
                .arg(nkeys)
                .arg(fields.len());
            for (field, n) in fields {
                inv.arg(field).arg(*n);
            }
        }
        for (&day, sets) in &batch.users {
            months.insert(month_label(day));
            let label = day_label(day);
            for (set, users) in sets {
                nkeys += 1;
                inv.key(self.users_key(&label, set))
                    .arg("p")
                    .arg(nkeys)
                    .arg(users.len());
                for u in users {
                    inv.arg(u.as_str());
                }
            }
        }
        // A month's cached merge no longer holds everything: the next report rebuilds it.
        for month in months {
            nkeys += 1;
            inv.key(self.merged_key(&month)).arg("d").arg(nkeys);
        }
        let applied: i64 = inv.invoke_async(&mut self.conn.clone()).await?;
        if applied == 0 {
            debug!(seq, "usage batch was already applied");
        }
        Ok(())
    }

    /// Four round trips at most: which past months are cached, the message counts (a cached
    /// month's sum, the days of the others), the caching of past months not cached yet, and
    /// every `PFCOUNT`.
    async fn count(&self, periods: &[Period], today: i64) -> Result<Counted, UsageError> {
        let mut conn = self.conn.clone();

        let cacheable: Vec<usize> = periods
            .iter()
            .enumerate()
            .filter(|(_, p)| p.whole_month && p.last + GRACE_DAYS < today)
            .map(|(i, _)| i)
            .collect();
        let mut cached = vec![false; periods.len()];
        if !cacheable.is_empty() {
            let mut pipe = redis::pipe();
            for &i in &cacheable {
                pipe.cmd("EXISTS").arg(self.merged_key(&periods[i].label));
            }
            let found: Vec<i64> = pipe.query_async(&mut conn).await?;
            if found.len() != cacheable.len() {
                return Err(UsageError::UnexpectedReply("month markers"));
            }
            for (&i, n) in cacheable.iter().zip(found) {
                cached[i] = n > 0;
            }
        }

        let mut pipe = redis::pipe();
        let mut nhashes = 0;
        for (i, p) in periods.iter().enumerate() {
            if cached[i] {
                pipe.cmd("HGETALL").arg(self.month_msgs_key(&p.label));
                nhashes += 1;
            } else {
                for d in p.first..=p.last {
                    pipe.cmd("HGETALL").arg(self.msgs_key(d));
                    nhashes += 1;
                }
            }
        }
        let replies: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
        if replies.len() != nhashes {
            return Err(UsageError::UnexpectedReply("day hashes"));
        }
        let mut replies = replies.into_iter();
        let mut tallies = Vec::with_capacity(periods.len());
        for (i, p) in periods.iter().enumerate() {
            let mut t = Tally::default();
            let n = if cached[i] { 1 } else { p.last - p.first + 1 };
            for _ in 0..n {
                let v = replies
                    .next()
                    .ok_or(UsageError::UnexpectedReply("day hashes"))?;
                let fields: HashMap<String, i64> =
                    redis::from_redis_value(v).map_err(redis::RedisError::from)?;
                for (f, n) in &fields {
                    t.add_field(f, *n);
                }
            }
            tallies.push(t);
        }

        let to_build: Vec<usize> = cacheable.into_iter().filter(|&i| !cached[i]).collect();
        if !to_build.is_empty() {
            let mut pipe = redis::pipe();
            pipe.atomic();
            for &i in &to_build {
                let p = &periods[i];
                for set in tallies[i].sets() {
                    let dest = self.users_key(&p.label, &set);
                    let cmd = pipe.cmd("PFMERGE").arg(&dest);
                    for d in p.first..=p.last {
                        cmd.arg(self.users_key(&day_label(d), &set));
                    }
                    cmd.ignore();
                    pipe.cmd("EXPIRE")
                        .arg(&dest)
                        .arg(self.retention_secs)
                        .ignore();
                }
                // The month's counts, summed by Redis from the days as they are now.
                pipe.cmd("EVAL")
                    .arg(MONTH_SUM_SCRIPT)
                    .arg(1 + (p.last - p.first + 1))
                    .arg(self.month_msgs_key(&p.label));
                for d in p.first..=p.last {
                    pipe.arg(self.msgs_key(d));
                }
                pipe.arg(self.retention_secs).ignore();
                pipe.cmd("SET")
                    .arg(self.merged_key(&p.label))
                    .arg(1)
                    .arg("EX")
                    .arg(self.retention_secs)
                    .ignore();
                cached[i] = true;
            }
            pipe.query_async::<()>(&mut conn).await?;
        }

        let keys = |i: usize, set: &str| -> Vec<String> {
            let p = &periods[i];
            if cached[i] {
                vec![self.users_key(&p.label, set)]
            } else {
                (p.first..=p.last)
                    .map(|d| self.users_key(&day_label(d), set))
                    .collect()
            }
        };
        let mut pipe = redis::pipe();
        let mut order: Vec<(Option<usize>, String)> = Vec::new();
        for (i, t) in tallies.iter().enumerate() {
            for set in t.sets() {
                pipe.cmd("PFCOUNT").arg(keys(i, &set));
                order.push((Some(i), set));
            }
        }
        let mut window = Tally::default();
        for t in &tallies {
            window.merge(t);
        }
        for set in window.sets() {
            let mut all_keys = Vec::new();
            for (i, t) in tallies.iter().enumerate() {
                if t.has_set(&set) {
                    all_keys.extend(keys(i, &set));
                }
            }
            if all_keys.is_empty() {
                continue;
            }
            pipe.cmd("PFCOUNT").arg(all_keys);
            order.push((None, set));
        }
        let counts: Vec<u64> = pipe.query_async(&mut conn).await?;
        if counts.len() != order.len() {
            return Err(UsageError::UnexpectedReply("unique counts"));
        }
        let mut uniques = vec![HashMap::new(); periods.len()];
        let mut window_uniques = HashMap::new();
        for ((at, set), n) in order.into_iter().zip(counts) {
            match at {
                Some(i) => uniques[i].insert(set, n),
                None => window_uniques.insert(set, n),
            };
        }
        Ok(Counted {
            tallies,
            uniques,
            window: window_uniques,
        })
    }
}

impl MemoryUsage {
    fn apply(&mut self, batch: &Batch) {
        for (&day, fields) in &batch.counts {
            let counts = &mut self.days.entry(day).or_default().counts;
            for (f, n) in fields {
                *counts.entry(f.clone()).or_default() += n;
            }
        }
        for (&day, sets) in &batch.users {
            let users = &mut self.days.entry(day).or_default().users;
            for (set, members) in sets {
                users
                    .entry(set.clone())
                    .or_default()
                    .extend(members.iter().cloned());
            }
        }
        if let Some(&newest) = self.days.keys().next_back() {
            let oldest_kept = newest - self.retention_days + 1;
            self.days = self.days.split_off(&oldest_kept);
        }
    }

    fn count(&self, periods: &[Period]) -> Counted {
        let days_of = |p: &Period| self.days.range(p.first..=p.last).map(|(_, d)| d);
        let mut tallies = Vec::with_capacity(periods.len());
        let mut uniques = Vec::with_capacity(periods.len());
        for p in periods {
            let mut t = Tally::default();
            for d in days_of(p) {
                for (f, n) in &d.counts {
                    t.add_field(f, *n);
                }
            }
            let u = t
                .sets()
                .into_iter()
                .map(|set| {
                    let n = union_len(days_of(p), &set);
                    (set, n)
                })
                .collect();
            tallies.push(t);
            uniques.push(u);
        }
        let mut window = Tally::default();
        for t in &tallies {
            window.merge(t);
        }
        let all_days = || periods.iter().flat_map(days_of);
        let window = window
            .sets()
            .into_iter()
            .map(|set| {
                let n = union_len(all_days(), &set);
                (set, n)
            })
            .collect();
        Counted {
            tallies,
            uniques,
            window,
        }
    }
}

/// Distinct users of `set` over `days`.
fn union_len<'a>(days: impl Iterator<Item = &'a MemoryDay>, set: &str) -> u64 {
    let mut all: HashSet<&str> = HashSet::new();
    for d in days {
        if let Some(users) = d.users.get(set) {
            all.extend(users.iter().map(String::as_str));
        }
    }
    all.len() as u64
}

// === impl Tally ===

/// Message counts of a period, summed from the day hashes.
#[derive(Debug, Default, Clone)]
struct Tally {
    /// Type → count (errors included, under `error`).
    by_type: BTreeMap<String, u64>,
    /// (dimension, value) → (messages, errors).
    dims: BTreeMap<(Dim, String), (u64, u64)>,
}

impl Tally {
    /// Adds a hash field `<dim>:<value>:<type>` (the value may itself hold `:`).
    fn add_field(&mut self, field: &str, n: i64) {
        let n = u64::try_from(n).unwrap_or(0);
        let Some((tag, rest)) = field.split_once(':') else {
            return;
        };
        let Some((value, typ)) = rest.rsplit_once(':') else {
            return;
        };
        if tag == "all" {
            *self.by_type.entry(typ.to_string()).or_default() += n;
        } else if let Some(dim) = Dim::from_tag(tag) {
            let c = self.dims.entry((dim, value.to_string())).or_default();
            if typ == ERROR_TYPE {
                c.1 += n;
            } else {
                c.0 += n;
            }
        }
    }

    fn merge(&mut self, other: &Tally) {
        for (t, n) in &other.by_type {
            *self.by_type.entry(t.clone()).or_default() += n;
        }
        for (k, (m, e)) in &other.dims {
            let c = self.dims.entry(k.clone()).or_default();
            c.0 += m;
            c.1 += e;
        }
    }

    /// The user sets the period has data for (always `all`).
    fn sets(&self) -> Vec<String> {
        let mut sets = vec!["all".to_string()];
        sets.extend(self.by_type.keys().map(|t| format!("type:{t}")));
        sets.extend(
            self.dims
                .keys()
                .map(|(dim, v)| format!("{}:{v}", dim.tag())),
        );
        sets
    }

    fn has_set(&self, set: &str) -> bool {
        if set == "all" {
            return !self.by_type.is_empty();
        }
        let Some((tag, value)) = set.split_once(':') else {
            return false;
        };
        if tag == "type" {
            return self.by_type.contains_key(value);
        }
        Dim::from_tag(tag).is_some_and(|dim| self.dims.contains_key(&(dim, value.to_string())))
    }
}

// === impl UsageReport ===

/// Usage over the trailing months (or a day), and over the whole window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageReport {
    /// First day of the window, `YYYY-MM-DD`.
    pub first_day: String,
    /// Last day of the window (the end day given), `YYYY-MM-DD`.
    pub last_day: String,
    /// Oldest first.
    pub periods: Vec<PeriodUsage>,
    /// The whole window: counts summed, users counted once however many months they were
    /// active in.
    pub total: Usage,
}

/// One month (`YYYY-MM`) of a report, or one day (`YYYY-MM-DD`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeriodUsage {
    pub period: String,
    pub first_day: String,
    pub last_day: String,
    #[serde(flatten)]
    pub usage: Usage,
}

/// Counts of a period.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Messages of every type but `error`.
    pub messages: u64,
    /// Refusals (`error` entries).
    pub errors: u64,
    /// Distinct senders and receivers of messages (refused addresses excluded).
    pub unique_users: u64,
    /// Per type; the `error` type has its count under `errors`.
    pub by_type: BTreeMap<String, Counts>,
    pub internal_domains: BTreeMap<String, Counts>,
    pub external_domains: BTreeMap<String, Counts>,
    pub platforms: BTreeMap<String, Counts>,
}

/// Counts of one value of a dimension.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub messages: u64,
    pub errors: u64,
    pub unique_users: u64,
}

impl UsageReport {
    /// CSV (RFC 4180, CRLF line ends), header
    /// `period,dimension,value,messages,errors,unique_users`: per period a `total` row, then
    /// one row per value of `type`, `internal_domain`, `external_domain` and `platform`; then
    /// the same rows for the whole window, whose period is `<first_day>/<last_day>`. Fields
    /// holding a comma, quote or line break are quoted; a value starting with `=`, `+`, `-`,
    /// `@`, tab or CR gets a leading `'`, so that no spreadsheet takes it for a formula.
    pub fn to_csv(&self) -> String {
        let mut out = String::from("period,dimension,value,messages,errors,unique_users\r\n");
        for p in &self.periods {
            csv_rows(&mut out, &p.period, &p.usage);
        }
        csv_rows(
            &mut out,
            &format!("{}/{}", self.first_day, self.last_day),
            &self.total,
        );
        out
    }
}

fn csv_rows(out: &mut String, period: &str, u: &Usage) {
    let total = Counts {
        messages: u.messages,
        errors: u.errors,
        unique_users: u.unique_users,
    };
    csv_row(out, period, "total", "", &total);
    let dims = [
        ("type", &u.by_type),
        ("internal_domain", &u.internal_domains),
        ("external_domain", &u.external_domains),
        ("platform", &u.platforms),
    ];
    for (dim, values) in dims {
        for (value, c) in values {
            csv_row(out, period, dim, value, c);
        }
    }
}

fn csv_row(out: &mut String, period: &str, dim: &str, value: &str, c: &Counts) {
    let _ = write!(
        out,
        "{},{dim},{},{},{},{}\r\n",
        csv_field(period),
        csv_field(value),
        c.messages,
        c.errors,
        c.unique_users
    );
}

/// A CSV field: formula-neutralised, then quoted when it must be (RFC 4180).
fn csv_field(s: &str) -> Cow<'_, str> {
    let s: Cow<'_, str> = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        Cow::Owned(format!("'{s}"))
    } else {
        Cow::Borrowed(s)
    };
    if s.contains([',', '"', '\r', '\n']) {
        Cow::Owned(format!("\"{}\"", s.replace('"', "\"\"")))
    } else {
        s
    }
}

fn assemble(periods: &[Period], counted: &Counted) -> UsageReport {
    let mut window = Tally::default();
    let mut out = Vec::with_capacity(periods.len());
    for (i, p) in periods.iter().enumerate() {
        let (Some(t), Some(u)) = (counted.tallies.get(i), counted.uniques.get(i)) else {
            continue;
        };
        window.merge(t);
        out.push(PeriodUsage {
            period: p.label.clone(),
            first_day: day_label(p.first),
            last_day: day_label(p.last),
            usage: usage_of(t, u),
        });
    }
    UsageReport {
        first_day: periods
            .first()
            .map(|p| day_label(p.first))
            .unwrap_or_default(),
        last_day: periods
            .last()
            .map(|p| day_label(p.last))
            .unwrap_or_default(),
        periods: out,
        total: usage_of(&window, &counted.window),
    }
}

fn usage_of(t: &Tally, uniques: &HashMap<String, u64>) -> Usage {
    let uniq = |set: &str| uniques.get(set).copied().unwrap_or(0);
    let mut u = Usage {
        unique_users: uniq("all"),
        ..Usage::default()
    };
    for (typ, &n) in &t.by_type {
        let mut c = Counts {
            unique_users: uniq(&format!("type:{typ}")),
            ..Counts::default()
        };
        if typ == ERROR_TYPE {
            c.errors = n;
            u.errors += n;
        } else {
            c.messages = n;
            u.messages += n;
        }
        u.by_type.insert(typ.clone(), c);
    }
    for ((dim, value), &(messages, errors)) in &t.dims {
        let c = Counts {
            messages,
            errors,
            unique_users: uniq(&format!("{}:{value}", dim.tag())),
        };
        let map = match dim {
            Dim::Internal => &mut u.internal_domains,
            Dim::External => &mut u.external_domains,
            Dim::Platform => &mut u.platforms,
        };
        map.insert(value.clone(), c);
    }
    u
}

// === Calendar ===

/// Days of a report period, inclusive (days since the Unix epoch, UTC).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Period {
    label: String,
    first: i64,
    last: i64,
    /// The whole calendar month (its merged users may be cached once it is over).
    whole_month: bool,
}

/// The trailing `months` calendar months ending with the month of `end`, the last one cut
/// at `end`.
fn month_periods(end: i64, months: u32) -> Result<Vec<Period>, UsageError> {
    if months == 0 || months > MAX_REPORT_MONTHS {
        return Err(UsageError::InvalidRange(format!(
            "months must be 1 to {MAX_REPORT_MONTHS}, not {months}"
        )));
    }
    let (y, m, _) = civil_from_days(end);
    let end_index = y * 12 + m - 1;
    let mut out = Vec::with_capacity(months as usize);
    for k in (0..i64::from(months)).rev() {
        let idx = end_index - k;
        let (yy, mm) = (idx.div_euclid(12), idx.rem_euclid(12) + 1);
        let (ny, nm) = ((idx + 1).div_euclid(12), (idx + 1).rem_euclid(12) + 1);
        let first = days_from_civil(yy, mm, 1);
        let month_last = days_from_civil(ny, nm, 1) - 1;
        let last = month_last.min(end);
        out.push(Period {
            label: format!("{yy:04}-{mm:02}"),
            first,
            last,
            whole_month: last == month_last,
        });
    }
    Ok(out)
}

/// Days since the Unix epoch of `YYYY-MM-DD`.
fn parse_day(s: &str) -> Result<i64, UsageError> {
    let bad = || UsageError::InvalidDay(s.chars().take(32).collect());
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64, UsageError> {
        let part = s.get(r).ok_or_else(bad)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        part.parse().map_err(|_| bad())
    };
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if !(1..=12).contains(&m) || d < 1 {
        return Err(bad());
    }
    let days = days_from_civil(y, m, d);
    // Reject 2024-02-30 and the like: the day must round-trip.
    if civil_from_days(days) != (y, m, d) {
        return Err(bad());
    }
    Ok(days)
}

/// Days since the Unix epoch of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day since the Unix epoch.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn day_label(day: i64) -> String {
    day_of(day * MS_PER_DAY)
}

fn month_label(day: i64) -> String {
    let (y, m, _) = civil_from_days(day);
    format!("{y:04}-{m:02}")
}

/// Today (UTC), in days since the Unix epoch.
fn today() -> i64 {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    ms.div_euclid(MS_PER_DAY)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        day: i64,
        category: &'static str,
        from: &str,
        fp: &str,
        to: &[&str],
        tp: &str,
    ) -> MetadataEntry {
        MetadataEntry {
            at_ms: day * MS_PER_DAY + 3_600_000,
            session_id: None,
            relay_msg_id: "m".into(),
            sender: from.into(),
            sender_platform: fp.into(),
            receivers: to.iter().map(|s| s.to_string()).collect(),
            receiver_platform: tp.into(),
            category,
            kind: "message".into(),
        }
    }

    fn aggregator(cfg: UsageConfig) -> UsageAggregator {
        UsageAggregator::new(
            Arc::new(StaticSides::new(["contoso.com", "fabrikam.com"])),
            cfg,
        )
    }

    fn pending_counts(a: &UsageAggregator, day: i64) -> HashMap<String, i64> {
        a.state()
            .pending
            .counts
            .get(&day)
            .cloned()
            .unwrap_or_default()
    }

    fn pending_set(a: &UsageAggregator, day: i64, set: &str) -> Vec<String> {
        let st = a.state();
        let mut v: Vec<String> = st
            .pending
            .users
            .get(&day)
            .and_then(|s| s.get(set))
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    const D: i64 = 20_000;

    #[test]
    fn one_message_per_entry_under_each_distinct_value() {
        let a = aggregator(UsageConfig::default());
        a.add(&entry(
            D,
            "im",
            "Alice@Contoso.com",
            "teams",
            &["bob@partner.org", "carol@partner.org", "dave@contoso.com"],
            "xmpp",
        ));
        let c = pending_counts(&a, D);
        let expected: HashMap<String, i64> = [
            ("all::im", 1),
            ("int:contoso.com:im", 1),
            ("ext:partner.org:im", 1),
            ("plat:teams:im", 1),
            ("plat:xmpp:im", 1),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        assert_eq!(c, expected);
        assert_eq!(
            pending_set(&a, D, "all"),
            [
                "alice@contoso.com",
                "bob@partner.org",
                "carol@partner.org",
                "dave@contoso.com"
            ]
        );
        assert_eq!(
            pending_set(&a, D, "int:contoso.com"),
            ["alice@contoso.com", "dave@contoso.com"]
        );
        assert_eq!(
            pending_set(&a, D, "ext:partner.org"),
            ["bob@partner.org", "carol@partner.org"]
        );
        assert_eq!(pending_set(&a, D, "plat:teams"), ["alice@contoso.com"]);
        assert_eq!(pending_set(&a, D, "type:im").len(), 4);
        assert_eq!(a.pending_users(), 4 + 2 + 2 + 1 + 3 + 4);
    }

    #[test]
    fn errors_are_counted_but_their_users_only_under_the_error_type() {
        let a = aggregator(UsageConfig::default());
        a.add(&entry(
            D,
            "error",
            "mallory@evil.example",
            "xmpp",
            &["alice@contoso.com"],
            "",
        ));
        let c = pending_counts(&a, D);
        assert_eq!(c.get("all::error"), Some(&1));
        assert_eq!(c.get("ext:evil.example:error"), Some(&1));
        assert_eq!(c.get("int:contoso.com:error"), Some(&1));
        assert_eq!(c.get("plat:xmpp:error"), Some(&1));
        // An empty platform is no value.
        assert!(!c.keys().any(|k| k.starts_with("plat::")), "{c:?}");
        assert!(pending_set(&a, D, "all").is_empty());
        assert!(pending_set(&a, D, "ext:evil.example").is_empty());
        assert_eq!(
            pending_set(&a, D, "type:error"),
            ["alice@contoso.com", "mallory@evil.example"]
        );
    }

    #[test]
    fn entries_go_to_their_utc_day_and_counts_merge() {
        let a = aggregator(UsageConfig::default());
        for _ in 0..3 {
            a.add(&entry(
                D,
                "im",
                "a@contoso.com",
                "teams",
                &["b@contoso.com"],
                "teams",
            ));
        }
        let mut late = entry(
            D,
            "typing",
            "a@contoso.com",
            "teams",
            &["b@contoso.com"],
            "teams",
        );
        late.at_ms = (D + 1) * MS_PER_DAY - 1;
        a.add(&late);
        let mut next = late.clone();
        next.at_ms += 1;
        a.add(&next);
        let c = pending_counts(&a, D);
        assert_eq!(c.get("all::im"), Some(&3));
        assert_eq!(c.get("int:contoso.com:im"), Some(&3));
        assert_eq!(c.get("all::typing"), Some(&1));
        assert_eq!(pending_counts(&a, D + 1).get("all::typing"), Some(&1));
    }

    #[test]
    fn values_beyond_the_cap_count_as_other() {
        let a = aggregator(UsageConfig {
            max_values_per_dimension: 2,
            ..UsageConfig::default()
        });
        for d in ["a.org", "b.org", "c.org", "d.org", "a.org"] {
            a.add(&entry(D, "error", &format!("x@{d}"), "", &[], ""));
        }
        let c = pending_counts(&a, D);
        assert_eq!(c.get("ext:a.org:error"), Some(&2));
        assert_eq!(c.get("ext:b.org:error"), Some(&1));
        assert_eq!(c.get(&format!("ext:{OTHER}:error")), Some(&2));
        assert!(!c.contains_key("ext:c.org:error"));
        // The cap is per day.
        a.add(&entry(D + 1, "error", "x@c.org", "", &[], ""));
        assert_eq!(pending_counts(&a, D + 1).get("ext:c.org:error"), Some(&1));
    }

    #[test]
    fn user_sets_stop_growing_at_the_bound_but_counts_do_not() {
        let a = aggregator(UsageConfig {
            max_pending_users: 10,
            ..UsageConfig::default()
        });
        for i in 0..100 {
            a.add(&entry(
                D,
                "im",
                &format!("u{i}@contoso.com"),
                "teams",
                &[],
                "",
            ));
        }
        assert_eq!(a.pending_users(), 10);
        assert_eq!(pending_counts(&a, D).get("all::im"), Some(&100));
        // A user already held is still "seen" in the sets it is in.
        a.add(&entry(D, "im", "u0@contoso.com", "teams", &[], ""));
        assert_eq!(a.pending_users(), 10);
    }

    #[tokio::test]
    async fn memory_store_reports_exact_counts() -> Result<(), UsageError> {
        let a = aggregator(UsageConfig::default());
        let store = UsageStore::memory(DEFAULT_RETENTION_DAYS);
        // 2024-12-31 and 2025-01-01.
        let d1 = days_from_civil(2024, 12, 31);
        a.add(&entry(
            d1,
            "im",
            "a@contoso.com",
            "teams",
            &["x@partner.org"],
            "xmpp",
        ));
        a.add(&entry(
            d1 + 1,
            "im",
            "a@contoso.com",
            "teams",
            &["y@partner.org"],
            "xmpp",
        ));
        a.add(&entry(
            d1 + 1,
            "error",
            "z@evil.example",
            "xmpp",
            &["a@contoso.com"],
            "teams",
        ));
        a.flush(&store).await?;
        assert_eq!(a.pending_users(), 0);
        let r = store.report("2025-01-15", 2).await?;
        assert_eq!(r.first_day, "2024-12-01");
        assert_eq!(r.last_day, "2025-01-15");
        let labels: Vec<&str> = r.periods.iter().map(|p| p.period.as_str()).collect();
        assert_eq!(labels, ["2024-12", "2025-01"]);
        assert_eq!(r.periods[1].last_day, "2025-01-15");
        assert_eq!(
            (r.periods[0].usage.messages, r.periods[0].usage.unique_users),
            (1, 2)
        );
        assert_eq!(
            (
                r.periods[1].usage.messages,
                r.periods[1].usage.errors,
                r.periods[1].usage.unique_users
            ),
            (1, 1, 2)
        );
        assert_eq!(r.total.messages, 2);
        assert_eq!(r.total.errors, 1);
        // a, x, y: a counted once over the window.
        assert_eq!(r.total.unique_users, 3);
        assert_eq!(
            r.total.internal_domains.get("contoso.com"),
            Some(&Counts {
                messages: 2,
                errors: 1,
                unique_users: 1
            })
        );
        assert_eq!(
            r.total.by_type.get("error"),
            Some(&Counts {
                messages: 0,
                errors: 1,
                unique_users: 2
            })
        );
        assert_eq!(
            r.total.platforms.get("xmpp").map(|c| c.unique_users),
            Some(2)
        );
        Ok(())
    }

    #[test]
    fn csv_quotes_and_neutralises_fields() {
        assert_eq!(csv_field("contoso.com"), "contoso.com");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("two\r\nlines"), "\"two\r\nlines\"");
        assert_eq!(csv_field("=cmd()"), "'=cmd()");
        assert_eq!(csv_field("-1,2"), "\"'-1,2\"");
        assert_eq!(csv_field(""), "");
    }

    #[test]
    fn csv_has_a_row_per_period_dimension_and_value() {
        let mut usage = Usage {
            messages: 5,
            errors: 1,
            unique_users: 3,
            ..Usage::default()
        };
        let c = Counts {
            messages: 5,
            errors: 0,
            unique_users: 3,
        };
        usage.by_type.insert("im".into(), c);
        usage.external_domains.insert(
            "we,ird\".org".into(),
            Counts {
                messages: 2,
                errors: 1,
                unique_users: 1,
            },
        );
        usage.platforms.insert("teams".into(), c);
        let r = UsageReport {
            first_day: "2025-01-01".into(),
            last_day: "2025-01-31".into(),
            periods: vec![PeriodUsage {
                period: "2025-01".into(),
                first_day: "2025-01-01".into(),
                last_day: "2025-01-31".into(),
                usage: usage.clone(),
            }],
            total: usage,
        };
        let csv = r.to_csv();
        let lines: Vec<&str> = csv.split("\r\n").collect();
        assert_eq!(
            lines,
            [
                "period,dimension,value,messages,errors,unique_users",
                "2025-01,total,,5,1,3",
                "2025-01,type,im,5,0,3",
                "2025-01,external_domain,\"we,ird\"\".org\",2,1,1",
                "2025-01,platform,teams,5,0,3",
                "2025-01-01/2025-01-31,total,,5,1,3",
                "2025-01-01/2025-01-31,type,im,5,0,3",
                "2025-01-01/2025-01-31,external_domain,\"we,ird\"\".org\",2,1,1",
                "2025-01-01/2025-01-31,platform,teams,5,0,3",
                "",
            ]
        );
    }

    #[test]
    fn fields_with_colons_in_values_parse() {
        let mut t = Tally::default();
        t.add_field("ext:host:5269:im", 2);
        t.add_field("all::im", 2);
        t.add_field("bogus", 7);
        assert_eq!(
            t.dims.get(&(Dim::External, "host:5269".into())),
            Some(&(2, 0))
        );
        assert_eq!(t.by_type.get("im"), Some(&2));
        assert!(t.has_set("ext:host:5269"));
        assert!(t.has_set("type:im") && t.has_set("all") && !t.has_set("int:host"));
    }

    #[test]
    fn calendar_matches_the_metadata_log_days() {
        for day in (-800..30_000).step_by(7) {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m, d), day);
            assert_eq!(format!("{y:04}-{m:02}-{d:02}"), day_label(day));
        }
        assert_eq!(
            parse_day("2024-02-29").ok(),
            Some(days_from_civil(2024, 2, 29))
        );
        for bad in [
            "2023-02-29",
            "2024-13-01",
            "2024-00-10",
            "2024-1-01",
            "20240101xx",
            "+024-01-01",
            "",
        ] {
            assert!(parse_day(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn months_run_back_across_the_year_boundary() -> Result<(), UsageError> {
        let end = parse_day("2025-02-10")?;
        let p = month_periods(end, 3)?;
        let labels: Vec<&str> = p.iter().map(|p| p.label.as_str()).collect();
        assert_eq!(labels, ["2024-12", "2025-01", "2025-02"]);
        assert_eq!(day_label(p[0].first), "2024-12-01");
        assert_eq!(day_label(p[0].last), "2024-12-31");
        assert!(p[0].whole_month && p[1].whole_month && !p[2].whole_month);
        assert_eq!(day_label(p[2].last), "2025-02-10");
        assert!(month_periods(end, 0).is_err());
        assert!(month_periods(end, MAX_REPORT_MONTHS + 1).is_err());
        // The last day of a month makes it whole.
        assert!(month_periods(parse_day("2024-02-29")?, 1)?[0].whole_month);
        Ok(())
    }
}
