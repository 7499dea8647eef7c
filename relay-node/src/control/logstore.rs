//! Reading the metadata log: queries by time range, domain, user, type and session, paginated;
//! CSV and NDJSON export; rotation of old days from Redis into a durable archive of files
//! through `object_store` (a local directory, S3, GCS or Azure); retention; pseudonymisation
//! of a forgotten user.
//!
//! Where entries are:
//! - **Redis**: a stream per UTC day of the entry's time, `<prefix>:meta:<YYYY-MM-DD>` (see
//!   [`super::metadata`]), for `redis_window_days` days when an archive is configured (the
//!   whole retention otherwise);
//! - **the archive**: one NDJSON object per day, `meta/<YYYY>/<MM>/<DD>.ndjson`, in stream
//!   order, written by the rotation of a day once it is older than the window (one node at a
//!   time: a Redis lock), and the day's stream deleted only after the object is complete;
//! - **memory** (`--dev`): the newest entries in a ring.
//!
//! A query walks the days of its range in order, each from the archive when the day has an
//! object there, else from Redis; the cursor names the day and the position in it (a stream
//! id, or a byte offset in the object), so pages are stable while new entries arrive. Each
//! page scans a bounded number of entries: a page may hold fewer than `limit` entries and still
//! have a next cursor.

use super::metadata::day_of;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt};
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use session_actor::MetadataEntry;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

const DAY_MS: i64 = 86_400_000;
/// Entries read from Redis per round trip.
const CHUNK: usize = 500;
/// Entries looked at per page at most.
const SCAN_BUDGET: usize = 50_000;
/// The largest page.
pub const MAX_LIMIT: usize = 1_000;

#[derive(Debug, Error)]
pub enum LogError {
    #[error("invalid query: {0}")]
    Invalid(String),
    #[error("metadata log unavailable: {0}")]
    Unavailable(String),
    #[error("metadata archive: {0}")]
    Archive(String),
}

impl From<redis::RedisError> for LogError {
    fn from(e: redis::RedisError) -> Self {
        LogError::Unavailable(e.to_string())
    }
}

impl From<object_store::Error> for LogError {
    fn from(e: object_store::Error) -> Self {
        LogError::Archive(e.to_string())
    }
}

/// One entry as queries and exports show it. No field ever holds message content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    pub at_ms: i64,
    /// The session id (hex), empty for refusals before a session.
    pub session: String,
    pub msg: String,
    pub from: String,
    pub from_platform: String,
    pub to: Vec<String>,
    pub to_platform: String,
    /// `im`, `presence`, `typing` or `error`.
    pub category: String,
    /// The body kind, or the refusal's code.
    pub kind: String,
}

impl From<&MetadataEntry> for LogEntry {
    fn from(e: &MetadataEntry) -> Self {
        LogEntry {
            at_ms: e.at_ms,
            session: e.session_id.map(|s| s.to_hex()).unwrap_or_default(),
            msg: e.relay_msg_id.clone(),
            from: e.sender.clone(),
            from_platform: e.sender_platform.clone(),
            to: e.receivers.clone(),
            to_platform: e.receiver_platform.clone(),
            category: e.category.to_string(),
            kind: e.kind.clone(),
        }
    }
}

fn domain_of(a: &str) -> &str {
    a.rsplit_once('@').map_or("", |(_, d)| d)
}

impl LogEntry {
    /// From a stream entry's fields.
    fn from_fields(fields: &[(String, String)]) -> Self {
        let get = |k: &str| {
            fields
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        LogEntry {
            at_ms: get("at").parse().unwrap_or(0),
            session: get("session"),
            msg: get("msg"),
            from: get("from"),
            from_platform: get("from_platform"),
            to: get("to")
                .split(',')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
            to_platform: get("to_platform"),
            category: get("category"),
            kind: get("kind"),
        }
    }

    fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("at", self.at_ms.to_string()),
            ("session", self.session.clone()),
            ("msg", self.msg.clone()),
            ("from", self.from.clone()),
            ("from_platform", self.from_platform.clone()),
            ("to", self.to.join(",")),
            ("to_platform", self.to_platform.clone()),
            ("category", self.category.clone()),
            ("kind", self.kind.clone()),
        ]
    }

    /// Whether `address` (lower case) is the sender or a receiver.
    fn names(&self, address: &str) -> bool {
        self.from.eq_ignore_ascii_case(address)
            || self.to.iter().any(|t| t.eq_ignore_ascii_case(address))
    }

    /// The entry with `address` replaced by `pseudonym`.
    fn replaced(&self, address: &str, pseudonym: &str) -> Self {
        let swap = |a: &String| {
            if a.eq_ignore_ascii_case(address) {
                pseudonym.to_string()
            } else {
                a.clone()
            }
        };
        LogEntry {
            from: swap(&self.from),
            to: self.to.iter().map(swap).collect(),
            ..self.clone()
        }
    }

    /// A CSV row (RFC 4180; a leading `=`, `+`, `-` or `@` is neutralised for spreadsheets).
    pub fn csv_row(&self) -> String {
        let q = |s: &str| {
            let s = if s.starts_with(['=', '+', '-', '@']) {
                format!("'{s}")
            } else {
                s.to_string()
            };
            if s.contains([',', '"', '\n', '\r']) {
                format!("\"{}\"", s.replace('"', "\"\""))
            } else {
                s
            }
        };
        [
            self.at_ms.to_string(),
            q(&self.session),
            q(&self.msg),
            q(&self.from),
            q(&self.from_platform),
            q(&self.to.join(" ")),
            q(&self.to_platform),
            q(&self.category),
            q(&self.kind),
        ]
        .join(",")
    }
}

pub const CSV_HEADER: &str = "at_ms,session,msg,from,from_platform,to,to_platform,type,kind";

/// What to look for. Domains and users compare case-insensitively.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct LogQuery {
    pub from_ms: i64,
    pub to_ms: i64,
    /// The sender's or any receiver's domain.
    #[serde(default)]
    pub domain: Option<String>,
    /// `user@domain`: the sender or any receiver.
    #[serde(default)]
    pub user: Option<String>,
    /// `im`, `presence`, `typing` or `error`.
    #[serde(default)]
    pub category: Option<String>,
    /// A session id (hex).
    #[serde(default)]
    pub session: Option<String>,
    #[serde(default)]
    pub cursor: Option<String>,
    #[serde(default)]
    pub limit: usize,
}

impl LogQuery {
    /// Checks the query; lower-cases what compares case-insensitively.
    pub fn checked(mut self) -> Result<Self, LogError> {
        if self.to_ms < self.from_ms {
            return Err(LogError::Invalid("`to` is before `from`".into()));
        }
        if self.to_ms - self.from_ms > 800 * DAY_MS {
            return Err(LogError::Invalid("a query spans at most 800 days".into()));
        }
        if let Some(c) = &self.category
            && !["im", "presence", "typing", "error"].contains(&c.as_str())
        {
            return Err(LogError::Invalid(format!(
                "unknown type `{c}`: im, presence, typing or error"
            )));
        }
        if let Some(s) = &self.session
            && (s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(LogError::Invalid("`session` is 32 hex digits".into()));
        }
        if let Some(u) = &self.user
            && !u.contains('@')
        {
            return Err(LogError::Invalid("`user` is a user@domain address".into()));
        }
        self.domain = self.domain.map(|d| d.trim().to_ascii_lowercase());
        self.user = self.user.map(|d| d.trim().to_ascii_lowercase());
        self.session = self.session.map(|d| d.to_ascii_lowercase());
        self.limit = self.limit.clamp(1, MAX_LIMIT);
        Ok(self)
    }

    pub fn matches(&self, e: &LogEntry) -> bool {
        if e.at_ms < self.from_ms || e.at_ms > self.to_ms {
            return false;
        }
        if let Some(c) = &self.category
            && &e.category != c
        {
            return false;
        }
        if let Some(s) = &self.session
            && !e.session.eq_ignore_ascii_case(s)
        {
            return false;
        }
        if let Some(d) = &self.domain
            && !domain_of(&e.from).eq_ignore_ascii_case(d)
            && !e.to.iter().any(|t| domain_of(t).eq_ignore_ascii_case(d))
        {
            return false;
        }
        if let Some(u) = &self.user
            && !e.names(u)
        {
            return false;
        }
        true
    }
}

/// One page of results.
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    pub entries: Vec<LogEntry>,
    /// Where the next page starts; `None` at the end.
    pub next_cursor: Option<String>,
}

/// Where a query is: a day, and a position in it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pos {
    /// After this stream id of the day's Redis stream (`0-0`: from the start).
    Redis(String),
    /// At this byte offset of the day's archived object.
    Archive(u64),
    /// After this sequence number of the in-memory log.
    Memory(u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Cursor {
    /// Days since the epoch.
    day: i64,
    pos: Pos,
}

impl Cursor {
    fn encode(&self) -> String {
        let p = match &self.pos {
            Pos::Redis(id) => format!("r{id}"),
            Pos::Archive(o) => format!("a{o}"),
            Pos::Memory(s) => format!("m{s}"),
        };
        URL_SAFE_NO_PAD.encode(format!("1:{}:{p}", self.day))
    }

    fn decode(s: &str) -> Result<Self, LogError> {
        let bad = || LogError::Invalid("the cursor is not one this log gave".into());
        let raw = URL_SAFE_NO_PAD.decode(s).map_err(|_| bad())?;
        let text = String::from_utf8(raw).map_err(|_| bad())?;
        let mut parts = text.splitn(3, ':');
        let (Some("1"), Some(day), Some(p)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad());
        };
        let day: i64 = day.parse().map_err(|_| bad())?;
        let pos = match p.split_at_checked(1) {
            Some(("r", id))
                if id.split_once('-').is_some_and(|(a, b)| {
                    a.bytes().all(|c| c.is_ascii_digit()) && b.bytes().all(|c| c.is_ascii_digit())
                }) =>
            {
                Pos::Redis(id.to_string())
            }
            Some(("a", o)) => Pos::Archive(o.parse().map_err(|_| bad())?),
            Some(("m", n)) => Pos::Memory(n.parse().map_err(|_| bad())?),
            _ => return Err(bad()),
        };
        Ok(Cursor { day, pos })
    }
}

/// The in-memory log of `--dev`: the newest entries with sequence numbers.
#[derive(Default)]
pub struct MemLog {
    pub next: u64,
    pub entries: VecDeque<(u64, MetadataEntry)>,
}

/// The durable archive.
#[derive(Clone)]
pub struct Archive {
    store: Arc<dyn ObjectStore>,
    root: ObjPath,
}

impl std::fmt::Debug for Archive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Archive({}/{})", self.store, self.root)
    }
}

impl Archive {
    /// An archive at `url`: `file:///dir`, `s3://bucket/prefix`, `gs://bucket/prefix`,
    /// `az://container/prefix` (credentials from the environment, as each cloud's SDK reads
    /// them: `AWS_*`, `GOOGLE_*`, `AZURE_*`).
    pub fn open(url: &str) -> Result<Self, LogError> {
        let bad = |m: String| LogError::Archive(m);
        let u = url::Url::parse(url).map_err(|e| bad(format!("{url}: {e}")))?;
        let root_path = u.path().trim_start_matches('/').to_string();
        let store: Arc<dyn ObjectStore> = match u.scheme() {
            "file" => {
                std::fs::create_dir_all(u.path()).map_err(|e| bad(format!("{url}: {e}")))?;
                return Ok(Archive {
                    store: Arc::new(object_store::local::LocalFileSystem::new_with_prefix(
                        u.path(),
                    )?),
                    root: ObjPath::from("meta"),
                });
            }
            "s3" => Arc::new(
                object_store::aws::AmazonS3Builder::from_env()
                    .with_url(url)
                    .build()?,
            ),
            "gs" => Arc::new(
                object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_url(url)
                    .build()?,
            ),
            "az" | "azure" | "abfs" | "abfss" => Arc::new(
                object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_url(url)
                    .build()?,
            ),
            other => {
                return Err(bad(format!(
                    "{url}: unknown scheme `{other}` (file, s3, gs or az)"
                )));
            }
        };
        let root = if root_path.is_empty() {
            ObjPath::from("meta")
        } else {
            ObjPath::from(format!("{root_path}/meta"))
        };
        Ok(Archive { store, root })
    }

    fn day_path(&self, day: i64) -> ObjPath {
        let d = day_of(day * DAY_MS);
        let (y, m, dd) = (&d[0..4], &d[5..7], &d[8..10]);
        ObjPath::from(format!("{}/{y}/{m}/{dd}.ndjson", self.root))
    }

    async fn exists(&self, day: i64) -> Result<Option<u64>, LogError> {
        match self.store.head(&self.day_path(day)).await {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The archived days, as days since the epoch.
    async fn days(&self) -> Result<Vec<i64>, LogError> {
        let mut out = Vec::new();
        let mut list = self.store.list(Some(&self.root));
        while let Some(m) = list.next().await {
            let m = m?;
            let parts: Vec<&str> = m.location.as_ref().rsplit('/').take(3).collect();
            if let [file, month, year] = parts.as_slice()
                && let Some(dd) = file.strip_suffix(".ndjson")
                && let Some(day) = parse_day(&format!("{year}-{month}-{dd}"))
            {
                out.push(day);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Writes `entries` (in order) as the object of `day`, then renames it into place, so a
    /// reader sees the whole day or none of it.
    async fn write_day<S>(&self, day: i64, mut entries: S) -> Result<u64, LogError>
    where
        S: futures::Stream<Item = Result<Vec<LogEntry>, LogError>> + Unpin,
    {
        let final_path = self.day_path(day);
        let tmp = ObjPath::from(format!(
            "{final_path}.part-{}",
            uuid::Uuid::now_v7().simple()
        ));
        let mut w = object_store::buffered::BufWriter::new(self.store.clone(), tmp.clone());
        let mut n = 0u64;
        let result: Result<(), LogError> = async {
            while let Some(chunk) = entries.next().await {
                let mut buf = Vec::new();
                for e in chunk? {
                    serde_json::to_writer(&mut buf, &e)
                        .map_err(|e| LogError::Archive(e.to_string()))?;
                    buf.push(b'\n');
                    n += 1;
                }
                w.write_all(&buf)
                    .await
                    .map_err(|e| LogError::Archive(e.to_string()))?;
            }
            w.shutdown()
                .await
                .map_err(|e| LogError::Archive(e.to_string()))
        }
        .await;
        if let Err(e) = result {
            let _ = w.abort().await;
            return Err(e);
        }
        self.store.rename(&tmp, &final_path).await?;
        Ok(n)
    }

    /// Entries of `day` from byte `offset`, up to about `budget` lines; the offset after the
    /// last line returned, `None` at the end of the object.
    async fn read_day(
        &self,
        day: i64,
        offset: u64,
        size: u64,
        budget: usize,
    ) -> Result<(Vec<(LogEntry, u64)>, Option<u64>), LogError> {
        if offset >= size {
            return Ok((Vec::new(), None));
        }
        // Read in blocks, splitting lines; each entry carries the offset after it.
        let mut out = Vec::new();
        let mut at = offset;
        let mut carry: Vec<u8> = Vec::new();
        let block = 1 << 20;
        while at < size && out.len() < budget {
            let end = (at + block).min(size);
            let bytes: Bytes = self.store.get_range(&self.day_path(day), at..end).await?;
            let base = at - carry.len() as u64;
            carry.extend_from_slice(&bytes);
            at = end;
            let mut start = 0;
            while let Some(nl) = carry[start..].iter().position(|&b| b == b'\n') {
                let line = &carry[start..start + nl];
                let after = base + (start + nl + 1) as u64;
                if !line.is_empty() {
                    let e: LogEntry = serde_json::from_slice(line)
                        .map_err(|e| LogError::Archive(format!("a bad line in {day}: {e}")))?;
                    out.push((e, after));
                }
                start += nl + 1;
                if out.len() >= budget {
                    let next = (after < size).then_some(after);
                    return Ok((out, next));
                }
            }
            carry.drain(..start);
        }
        Ok((out, None))
    }
}

pub fn parse_day(s: &str) -> Option<i64> {
    let mut p = s.split('-');
    let (y, m, d): (i64, i64, i64) = (
        p.next()?.parse().ok()?,
        p.next()?.parse().ok()?,
        p.next()?.parse().ok()?,
    );
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    (day_of(days * DAY_MS) == format!("{y:04}-{m:02}-{d:02}")).then_some(days)
}

/// Reads the metadata log.
#[derive(Clone)]
pub enum LogReader {
    Redis {
        conn: ConnectionManager,
        prefix: String,
        archive: Option<Archive>,
        /// Days kept in Redis before rotation (with an archive).
        window_days: u32,
        retention_days: u32,
    },
    Memory(Arc<Mutex<MemLog>>),
}

impl LogReader {
    fn key(prefix: &str, day: i64) -> String {
        format!("{prefix}:meta:{}", day_of(day * DAY_MS))
    }

    /// One page of what `q` asks for.
    pub async fn query(&self, q: &LogQuery) -> Result<Page, LogError> {
        match self {
            LogReader::Memory(m) => memory_query(m, q),
            LogReader::Redis {
                conn,
                prefix,
                archive,
                ..
            } => redis_query(conn.clone(), prefix, archive.as_ref(), q).await,
        }
    }

    /// Every entry of `q`, page by page, as CSV (with a header) or NDJSON chunks.
    pub fn export(
        self,
        q: LogQuery,
        csv: bool,
    ) -> impl futures::Stream<Item = Result<Bytes, LogError>> + Send + 'static {
        futures::stream::unfold(
            (self, Some(q), true),
            move |(reader, q, first)| async move {
                let q = q?;
                let page = match reader.query(&q).await {
                    Ok(p) => p,
                    Err(e) => return Some((Err(e), (reader, None, false))),
                };
                let mut out = String::new();
                if csv && first {
                    out.push_str(CSV_HEADER);
                    out.push_str("\r\n");
                }
                for e in &page.entries {
                    if csv {
                        out.push_str(&e.csv_row());
                        out.push_str("\r\n");
                    } else if let Ok(line) = serde_json::to_string(e) {
                        out.push_str(&line);
                        out.push('\n');
                    }
                }
                let next = page.next_cursor.map(|c| LogQuery {
                    cursor: Some(c),
                    ..q
                });
                Some((Ok(Bytes::from(out)), (reader, next, false)))
            },
        )
    }

    /// Replaces `address` with `pseudonym` in every entry, in Redis and in the archive; the
    /// number of entries rewritten.
    pub async fn pseudonymise(&self, address: &str, pseudonym: &str) -> Result<u64, LogError> {
        let address = address.to_ascii_lowercase();
        match self {
            LogReader::Memory(m) => {
                let mut g = m
                    .lock()
                    .map_err(|_| LogError::Unavailable("poisoned".into()))?;
                let mut n = 0;
                for (_, e) in g.entries.iter_mut() {
                    let le = LogEntry::from(&*e);
                    if le.names(&address) {
                        let r = le.replaced(&address, pseudonym);
                        e.sender = r.from;
                        e.receivers = r.to;
                        n += 1;
                    }
                }
                Ok(n)
            }
            LogReader::Redis {
                conn,
                prefix,
                archive,
                ..
            } => {
                let mut n = 0;
                // Redis: every day stream there is, entry by entry (XDEL and XADD of the
                // rewritten entry, so concurrent appends are never lost).
                let mut c = conn.clone();
                let keys: Vec<String> = {
                    let mut keys = Vec::new();
                    let mut iter: redis::AsyncIter<String> =
                        c.scan_match(format!("{prefix}:meta:*")).await?;
                    while let Some(k) = iter.next_item().await {
                        keys.push(k?);
                    }
                    keys
                };
                // Day streams only (not the rotation lock).
                for key in keys
                    .iter()
                    .filter(|k| k.rsplit(':').next().and_then(parse_day).is_some())
                {
                    n += rewrite_stream(conn.clone(), key, &address, pseudonym).await?;
                }
                if let Some(a) = archive {
                    for day in a.days().await? {
                        n += rewrite_object(a, day, &address, pseudonym).await?;
                    }
                }
                Ok(n)
            }
        }
    }

    /// Moves days older than the window from Redis into the archive and deletes what is past
    /// the retention, in both. Returns (days rotated, days deleted).
    pub async fn maintain(&self, now_ms: i64) -> Result<(usize, usize), LogError> {
        let LogReader::Redis {
            conn,
            prefix,
            archive,
            window_days,
            retention_days,
        } = self
        else {
            return Ok((0, 0));
        };
        let today = now_ms.div_euclid(DAY_MS);
        let oldest_kept = today - i64::from(*retention_days) + 1;
        let mut rotated = 0;
        let mut deleted = 0;
        let Some(archive) = archive else {
            return Ok((0, 0));
        };
        // One node at a time.
        let lock = format!("{prefix}:meta:rotation-lock");
        let token = uuid::Uuid::now_v7().to_string();
        let mut c = conn.clone();
        let got: Option<String> = redis::cmd("SET")
            .arg(&lock)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(600_000)
            .query_async(&mut c)
            .await?;
        if got.is_none() {
            return Ok((0, 0));
        }
        let result = async {
            let mut keys = Vec::new();
            let mut iter: redis::AsyncIter<String> =
                c.scan_match(format!("{prefix}:meta:*")).await?;
            while let Some(k) = iter.next_item().await {
                keys.push(k?);
            }
            drop(iter);
            for key in keys {
                let Some(day) = key.rsplit(':').next().and_then(parse_day) else {
                    continue;
                };
                if day < oldest_kept {
                    redis::cmd("DEL")
                        .arg(&key)
                        .query_async::<()>(&mut c)
                        .await?;
                    deleted += 1;
                } else if day <= today - i64::from(*window_days) {
                    rotate_day(conn.clone(), archive, &key, day).await?;
                    rotated += 1;
                }
            }
            for day in archive.days().await? {
                if day < oldest_kept {
                    archive.store.delete(&archive.day_path(day)).await?;
                    deleted += 1;
                }
            }
            Ok::<_, LogError>(())
        }
        .await;
        let _: Result<(), _> = redis::Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end",
        )
        .key(&lock)
        .arg(&token)
        .invoke_async(&mut c)
        .await;
        result?;
        if rotated + deleted > 0 {
            info!(rotated, deleted, "metadata log maintained");
        }
        Ok((rotated, deleted))
    }

    /// Runs [`LogReader::maintain`] every `every` until `stop`.
    pub fn spawn_maintenance(
        self,
        every: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if let Err(e) = self.maintain(crate::edges::now_ms()).await {
                            metrics::counter!("fedrelay_metadata_archive_errors_total").increment(1);
                            warn!(error = %e, "metadata log rotation failed; retried later");
                        }
                    }
                    _ = stop.changed() => break,
                }
            }
        })
    }
}

type StreamEntries = Vec<(String, Vec<(String, String)>)>;

async fn xrange(
    conn: &mut ConnectionManager,
    key: &str,
    after: &str,
    count: usize,
) -> Result<StreamEntries, LogError> {
    let start = if after == "0-0" {
        "-".to_string()
    } else {
        format!("({after}")
    };
    Ok(redis::cmd("XRANGE")
        .arg(key)
        .arg(start)
        .arg("+")
        .arg("COUNT")
        .arg(count)
        .query_async(conn)
        .await?)
}

/// Writes a day's stream to the archive, then deletes the stream.
async fn rotate_day(
    conn: ConnectionManager,
    archive: &Archive,
    key: &str,
    day: i64,
) -> Result<(), LogError> {
    let entries = futures::stream::unfold(
        (conn.clone(), "0-0".to_string(), false),
        |(mut c, after, done)| async move {
            if done {
                return None;
            }
            match xrange(&mut c, key, &after, 2_000).await {
                Err(e) => Some((Err(e), (c, after, true))),
                Ok(batch) if batch.is_empty() => None,
                Ok(batch) => {
                    let last = batch.last().map(|(id, _)| id.clone()).unwrap_or(after);
                    let entries = batch
                        .iter()
                        .map(|(_, f)| LogEntry::from_fields(f))
                        .collect();
                    Some((Ok(entries), (c, last, false)))
                }
            }
        },
    );
    let n = archive.write_day(day, Box::pin(entries)).await?;
    let mut c = conn;
    redis::cmd("DEL").arg(key).query_async::<()>(&mut c).await?;
    metrics::counter!("fedrelay_metadata_days_archived_total").increment(1);
    info!(day = %day_of(day * DAY_MS), entries = n, "metadata log day archived");
    Ok(())
}

async fn rewrite_stream(
    mut conn: ConnectionManager,
    key: &str,
    address: &str,
    pseudonym: &str,
) -> Result<u64, LogError> {
    let mut after = "0-0".to_string();
    let mut n = 0;
    loop {
        let batch = xrange(&mut conn, key, &after, CHUNK).await?;
        let Some((last, _)) = batch.last() else {
            break;
        };
        after = last.clone();
        let mut pipe = redis::pipe();
        let mut any = false;
        for (id, fields) in &batch {
            let e = LogEntry::from_fields(fields);
            if e.names(address) {
                let r = e.replaced(address, pseudonym);
                pipe.cmd("XDEL").arg(key).arg(id).ignore();
                let add = pipe.cmd("XADD").arg(key).arg("*");
                for (k, v) in r.fields() {
                    add.arg(k).arg(v);
                }
                add.ignore();
                any = true;
                n += 1;
            }
        }
        if any {
            pipe.query_async::<()>(&mut conn).await?;
        }
    }
    Ok(n)
}

async fn rewrite_object(
    archive: &Archive,
    day: i64,
    address: &str,
    pseudonym: &str,
) -> Result<u64, LogError> {
    let Some(size) = archive.exists(day).await? else {
        return Ok(0);
    };
    // First a look: most days do not name the user.
    let mut offset = 0;
    let mut hits = 0;
    loop {
        let (batch, next) = archive.read_day(day, offset, size, 20_000).await?;
        hits += batch.iter().filter(|(e, _)| e.names(address)).count() as u64;
        match next {
            Some(o) => offset = o,
            None => break,
        }
    }
    if hits == 0 {
        return Ok(0);
    }
    let a = archive.clone();
    let address = address.to_string();
    let pseudonym = pseudonym.to_string();
    let entries = futures::stream::unfold(Some(0u64), move |offset| {
        let (a, address, pseudonym) = (a.clone(), address.clone(), pseudonym.clone());
        async move {
            let o = offset?;
            match a.read_day(day, o, size, 20_000).await {
                Err(e) => Some((Err(e), None)),
                Ok((batch, next)) if batch.is_empty() => {
                    let _ = next;
                    None
                }
                Ok((batch, next)) => Some((
                    Ok(batch
                        .into_iter()
                        .map(|(e, _)| {
                            if e.names(&address) {
                                e.replaced(&address, &pseudonym)
                            } else {
                                e
                            }
                        })
                        .collect()),
                    next,
                )),
            }
        }
    });
    archive.write_day(day, Box::pin(entries)).await?;
    Ok(hits)
}

fn memory_query(m: &Mutex<MemLog>, q: &LogQuery) -> Result<Page, LogError> {
    let after = match q.cursor.as_deref().map(Cursor::decode).transpose()? {
        None => None,
        Some(Cursor {
            pos: Pos::Memory(s),
            ..
        }) => Some(s),
        Some(_) => {
            return Err(LogError::Invalid(
                "the cursor is not one this log gave".into(),
            ));
        }
    };
    let g = m
        .lock()
        .map_err(|_| LogError::Unavailable("poisoned".into()))?;
    let mut entries = Vec::new();
    let mut last = None;
    let mut more = false;
    for (seq, e) in g.entries.iter() {
        if after.is_some_and(|a| *seq <= a) {
            continue;
        }
        if entries.len() >= q.limit {
            more = true;
            break;
        }
        let le = LogEntry::from(e);
        last = Some(*seq);
        if q.matches(&le) {
            entries.push(le);
        }
    }
    Ok(Page {
        entries,
        next_cursor: match (more, last) {
            (true, Some(s)) => Some(
                Cursor {
                    day: 0,
                    pos: Pos::Memory(s),
                }
                .encode(),
            ),
            _ => None,
        },
    })
}

async fn redis_query(
    mut conn: ConnectionManager,
    prefix: &str,
    archive: Option<&Archive>,
    q: &LogQuery,
) -> Result<Page, LogError> {
    let first_day = q.from_ms.div_euclid(DAY_MS);
    let last_day = q.to_ms.div_euclid(DAY_MS);
    let mut cur = match q.cursor.as_deref().map(Cursor::decode).transpose()? {
        Some(c) if c.day >= first_day && c.day <= last_day => c,
        Some(_) => {
            return Err(LogError::Invalid(
                "the cursor is outside the query's time range".into(),
            ));
        }
        None => Cursor {
            day: first_day,
            pos: Pos::Redis("0-0".into()),
        },
    };
    let mut entries = Vec::new();
    let mut scanned = 0;
    while cur.day <= last_day {
        if entries.len() >= q.limit || scanned >= SCAN_BUDGET {
            return Ok(Page {
                entries,
                next_cursor: Some(cur.encode()),
            });
        }
        // A day is read from the archive when it has an object there.
        let archived = match (&cur.pos, archive) {
            (Pos::Archive(_), Some(a)) => a.exists(cur.day).await?,
            (Pos::Redis(id), Some(a)) if id == "0-0" => a.exists(cur.day).await?,
            _ => None,
        };
        match (archived, archive) {
            (Some(size), Some(a)) => {
                let offset = match cur.pos {
                    Pos::Archive(o) => o,
                    _ => 0,
                };
                let (batch, next) = a
                    .read_day(cur.day, offset, size, (SCAN_BUDGET - scanned).max(1))
                    .await?;
                // Where this day goes on from: after the last entry looked at.
                let mut resume = next;
                for (e, after) in batch {
                    scanned += 1;
                    resume = (after < size).then_some(after);
                    if q.matches(&e) {
                        entries.push(e);
                        if entries.len() >= q.limit {
                            break;
                        }
                    }
                }
                match resume {
                    Some(o) => cur.pos = Pos::Archive(o),
                    None => {
                        cur = Cursor {
                            day: cur.day + 1,
                            pos: Pos::Redis("0-0".into()),
                        }
                    }
                }
            }
            _ => {
                let after = match &cur.pos {
                    Pos::Redis(id) => id.clone(),
                    _ => "0-0".into(),
                };
                let key = LogReader::key(prefix, cur.day);
                let batch = xrange(&mut conn, &key, &after, CHUNK).await?;
                if batch.is_empty() {
                    cur = Cursor {
                        day: cur.day + 1,
                        pos: Pos::Redis("0-0".into()),
                    };
                    continue;
                }
                let mut last = after;
                for (id, fields) in &batch {
                    scanned += 1;
                    last = id.clone();
                    let e = LogEntry::from_fields(fields);
                    if q.matches(&e) {
                        entries.push(e);
                        if entries.len() >= q.limit {
                            break;
                        }
                    }
                }
                cur.pos = Pos::Redis(last);
            }
        }
    }
    Ok(Page {
        entries,
        next_cursor: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_foreign_ones_are_refused() {
        for c in [
            Cursor {
                day: 20_000,
                pos: Pos::Redis("1732350000000-7".into()),
            },
            Cursor {
                day: 20_001,
                pos: Pos::Archive(12_345),
            },
            Cursor {
                day: 0,
                pos: Pos::Memory(99),
            },
        ] {
            assert_eq!(Cursor::decode(&c.encode()).ok(), Some(c));
        }
        for bad in [
            "",
            "!!",
            "MTpyOjA",
            &URL_SAFE_NO_PAD.encode("1:5:rDROP TABLE"),
        ] {
            assert!(Cursor::decode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn csv_rows_are_quoted_and_neutralised() {
        let e = LogEntry {
            at_ms: 5,
            session: "ab".into(),
            msg: "m,1".into(),
            from: "=cmd@x.example".into(),
            from_platform: "http".into(),
            to: vec!["a@b.example".into(), "c\"d@b.example".into()],
            to_platform: "xmpp".into(),
            category: "im".into(),
            kind: "message".into(),
        };
        assert_eq!(
            e.csv_row(),
            "5,ab,\"m,1\",'=cmd@x.example,http,\"a@b.example c\"\"d@b.example\",xmpp,im,message"
        );
    }

    #[test]
    fn filters_match_sender_or_any_receiver() {
        let e = LogEntry {
            at_ms: 1_000,
            session: "00112233445566778899aabbccddeeff".into(),
            msg: "m".into(),
            from: "alice@a.example".into(),
            from_platform: "http".into(),
            to: vec!["bob@B.example".into()],
            to_platform: "http".into(),
            category: "im".into(),
            kind: "message".into(),
        };
        let q = |f: &dyn Fn(&mut LogQuery)| {
            let mut q = LogQuery {
                from_ms: 0,
                to_ms: 2_000,
                limit: 10,
                ..Default::default()
            };
            f(&mut q);
            q.checked().map(|q| q.matches(&e)).unwrap_or(false)
        };
        assert!(q(&|_| {}));
        assert!(q(&|q| q.domain = Some("b.example".into())));
        assert!(q(&|q| q.user = Some("Bob@b.example".into())));
        assert!(q(&|q| q.category = Some("im".into())));
        assert!(q(
            &|q| q.session = Some("00112233445566778899AABBCCDDEEFF".into())
        ));
        assert!(!q(&|q| q.domain = Some("c.example".into())));
        assert!(!q(&|q| q.category = Some("error".into())));
        assert!(!q(&|q| q.from_ms = 1_001));
        assert!(!q(&|q| q.category = Some("bogus".into())));
    }

    #[test]
    fn days_parse_only_real_dates() {
        assert_eq!(parse_day("1970-01-02"), Some(1));
        assert_eq!(
            parse_day("2024-02-29").map(|d| day_of(d * DAY_MS)),
            Some("2024-02-29".into())
        );
        assert_eq!(parse_day("2023-02-29"), None);
        assert_eq!(parse_day("2023-13-01"), None);
        assert_eq!(parse_day("rotation-lock"), None);
    }
}
