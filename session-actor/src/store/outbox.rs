//! Per-domain outboxes: where deliveries wait for a pull-mode receiver (the HTTP edge's
//! event stream). Each domain's outbox is an ordered, bounded log with opaque ids a receiver
//! resumes after; pushing deduplicates on (session, seq).

use super::redis::{RedisStoreConfig, connect};
use crate::{SessionId, StoreError};
use async_trait::async_trait;
use redis::aio::ConnectionManager;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// One delivery into an outbox.
#[derive(Debug, Clone)]
pub struct OutboxItem {
    pub session_id: SessionId,
    /// The recipient within the domain: two users of one domain may share a session.
    pub recipient: String,
    pub seq: u64,
    /// The rendered event, as the receiver will read it.
    pub payload: bytes::Bytes,
}

/// One stored event, with the id a receiver resumes after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEvent {
    pub id: String,
    pub payload: Vec<u8>,
}

#[async_trait]
pub trait Outbox: Send + Sync + 'static {
    /// Appends `items` (one session's in seq order, or several sessions'); items whose
    /// (session, recipient, seq) the outbox already holds are dropped.
    async fn push(&self, domain: &str, items: &[OutboxItem]) -> Result<(), StoreError>;

    /// Up to `max` events after `after` (from the oldest kept when `None`).
    async fn read_after(
        &self,
        domain: &str,
        after: Option<&str>,
        max: usize,
    ) -> Result<Vec<OutboxEvent>, StoreError>;

    /// The id of the newest event kept (`0-0` when none), for receivers that want only what
    /// comes next.
    async fn last_id(&self, domain: &str) -> Result<String, StoreError>;

    /// Whether retention has dropped events that came after `after`: a receiver resuming there
    /// has missed them.
    async fn dropped_after(&self, domain: &str, after: &str) -> Result<bool, StoreError>;

    /// Woken whenever this process pushes to `domain`. Readers also poll, for pushes made by
    /// other nodes.
    fn notifier(&self, domain: &str) -> Arc<Notify>;
}

#[derive(Default)]
struct Signals(Mutex<HashMap<String, Arc<Notify>>>);

impl Signals {
    fn wake_all(&self) {
        if let Ok(m) = self.0.lock() {
            for n in m.values() {
                n.notify_waiters();
            }
        }
    }

    fn get(&self, domain: &str) -> Arc<Notify> {
        match self.0.lock() {
            Ok(mut m) => m.entry(domain.to_ascii_lowercase()).or_default().clone(),
            // A poisoned map only loses wake-ups; readers still poll.
            Err(_) => Arc::new(Notify::new()),
        }
    }
}

// === impl MemoryOutbox ===

#[derive(Default)]
struct MemoryDomain {
    next_id: u64,
    events: VecDeque<(u64, bytes::Bytes)>,
    /// Id of the newest event dropped by retention (0: none).
    dropped_through: u64,
    last: HashMap<(SessionId, String), u64>,
}

/// Outboxes in process memory, keeping the newest `capacity` events per domain.
pub struct MemoryOutbox {
    capacity: usize,
    domains: Mutex<HashMap<String, MemoryDomain>>,
    signals: Signals,
}

impl MemoryOutbox {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            domains: Mutex::default(),
            signals: Signals::default(),
        }
    }
}

fn parse_memory_id(id: &str) -> Option<u64> {
    id.strip_prefix("0-")?.parse().ok()
}

#[async_trait]
impl Outbox for MemoryOutbox {
    async fn push(&self, domain: &str, items: &[OutboxItem]) -> Result<(), StoreError> {
        {
            let mut all = self
                .domains
                .lock()
                .map_err(|_| StoreError::Unavailable("outbox poisoned".into()))?;
            let d = all.entry(domain.to_string()).or_default();
            for item in items {
                let last = d
                    .last
                    .entry((item.session_id, item.recipient.clone()))
                    .or_default();
                if item.seq <= *last {
                    continue;
                }
                *last = item.seq;
                d.next_id += 1;
                d.events.push_back((d.next_id, item.payload.clone()));
                if d.events.len() > self.capacity
                    && let Some((id, _)) = d.events.pop_front()
                {
                    d.dropped_through = id;
                }
            }
        }
        self.signals.get(domain).notify_waiters();
        Ok(())
    }

    async fn read_after(
        &self,
        domain: &str,
        after: Option<&str>,
        max: usize,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        let after = after.and_then(parse_memory_id).unwrap_or(0);
        let all = self
            .domains
            .lock()
            .map_err(|_| StoreError::Unavailable("outbox poisoned".into()))?;
        let Some(d) = all.get(domain) else {
            return Ok(Vec::new());
        };
        // Ids are dense, so the first event after `after` is found by offset.
        let start = match d.events.front() {
            Some((first, _)) if after >= *first => (after - first + 1) as usize,
            _ => 0,
        };
        Ok(d.events
            .iter()
            .skip(start)
            .take(max)
            .map(|(id, p)| OutboxEvent {
                id: format!("0-{id}"),
                payload: p.to_vec(),
            })
            .collect())
    }

    async fn last_id(&self, domain: &str) -> Result<String, StoreError> {
        let all = self
            .domains
            .lock()
            .map_err(|_| StoreError::Unavailable("outbox poisoned".into()))?;
        Ok(format!("0-{}", all.get(domain).map_or(0, |d| d.next_id)))
    }

    async fn dropped_after(&self, domain: &str, after: &str) -> Result<bool, StoreError> {
        let after = parse_memory_id(after).unwrap_or(0);
        let all = self
            .domains
            .lock()
            .map_err(|_| StoreError::Unavailable("outbox poisoned".into()))?;
        Ok(all.get(domain).is_some_and(|d| d.dropped_through > after))
    }

    fn notifier(&self, domain: &str) -> Arc<Notify> {
        self.signals.get(domain)
    }
}

// === impl RedisOutbox ===

/// Outboxes as Redis streams `fr:o:{<domain>}`, trimmed to `capacity` entries, with the
/// dedup hash `fr:o:{<domain>}:last` beside each (which also records the newest trimmed id).
pub struct RedisOutbox {
    conn: ConnectionManager,
    prefix: String,
    capacity: usize,
    push: redis::Script,
    signals: Arc<Signals>,
    listener: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for RedisOutbox {
    fn drop(&mut self) {
        if let Some(l) = self.listener.take() {
            l.abort();
        }
    }
}

impl RedisOutbox {
    /// Opens the outbox. Within a Tokio runtime it also subscribes to the outbox's
    /// notification channel, so streams on this node wake as soon as any node appends to
    /// their domain (without it they poll once a second).
    pub fn new(cfg: &RedisStoreConfig, capacity: usize) -> Result<Self, StoreError> {
        let signals = Arc::new(Signals::default());
        let channel = format!("{}:o:notify", cfg.key_prefix);
        let listener = match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let client = super::redis::client(cfg)?;
                Some(rt.spawn(listen(client, channel, signals.clone())))
            }
            Err(_) => None,
        };
        Ok(Self {
            conn: connect(cfg)?,
            prefix: cfg.key_prefix.clone(),
            capacity: capacity.max(1),
            push: redis::Script::new(include_str!("lua/outbox_push.lua")),
            signals,
            listener,
        })
    }

    fn key(&self, domain: &str) -> String {
        format!("{}:o:{{{}}}", self.prefix, domain.to_ascii_lowercase())
    }
}

#[async_trait]
impl Outbox for RedisOutbox {
    async fn push(&self, domain: &str, items: &[OutboxItem]) -> Result<(), StoreError> {
        if items.is_empty() {
            return Ok(());
        }
        let key = self.key(domain);
        let mut inv = self.push.prepare_invoke();
        inv.key(&key)
            .key(format!("{key}:last"))
            .arg(self.capacity)
            .arg(format!("{}:o:notify", self.prefix))
            .arg(domain.to_ascii_lowercase());
        for item in items {
            inv.arg(format!("{}/{}", item.session_id.to_hex(), item.recipient))
                .arg(item.seq)
                .arg(item.payload.as_ref());
        }
        let _added: u64 = inv.invoke_async(&mut self.conn.clone()).await?;
        self.signals.get(domain).notify_waiters();
        Ok(())
    }

    async fn read_after(
        &self,
        domain: &str,
        after: Option<&str>,
        max: usize,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        let start = match after {
            Some(id) if valid_stream_id(id) => format!("({id}"),
            _ => "-".to_string(),
        };
        let entries: Vec<(String, Vec<Vec<u8>>)> = redis::cmd("XRANGE")
            .arg(self.key(domain))
            .arg(start)
            .arg("+")
            .arg("COUNT")
            .arg(max)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(entries
            .into_iter()
            .filter_map(|(id, mut fields)| {
                // fields = ["e", payload]
                (fields.len() == 2).then(|| OutboxEvent {
                    id,
                    payload: fields.swap_remove(1),
                })
            })
            .collect())
    }

    async fn last_id(&self, domain: &str) -> Result<String, StoreError> {
        let last: Vec<(String, Vec<Vec<u8>>)> = redis::cmd("XREVRANGE")
            .arg(self.key(domain))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(last
            .into_iter()
            .next()
            .map_or_else(|| "0-0".to_string(), |(id, _)| id))
    }

    async fn dropped_after(&self, domain: &str, after: &str) -> Result<bool, StoreError> {
        let dropped: Option<String> = redis::cmd("HGET")
            .arg(format!("{}:last", self.key(domain)))
            .arg("~dropped")
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(
            match (
                dropped.as_deref().and_then(parse_stream_id),
                parse_stream_id(after),
            ) {
                (Some(d), Some(a)) => d > a,
                _ => false,
            },
        )
    }

    fn notifier(&self, domain: &str) -> Arc<Notify> {
        self.signals.get(domain)
    }
}

/// Wakes this node's streams of a domain whenever any node appends to it (the push script
/// publishes the domain on `channel`); reconnects with backoff while Redis is away.
async fn listen(client: redis::Client, channel: String, signals: Arc<Signals>) {
    use futures::StreamExt;
    let mut failures = 0u32;
    loop {
        match client.get_async_pubsub().await {
            Ok(mut pubsub) => {
                if pubsub.subscribe(&channel).await.is_ok() {
                    failures = 0;
                    // Anything appended while not listening: wake every stream once.
                    signals.wake_all();
                    let mut messages = pubsub.on_message();
                    while let Some(msg) = messages.next().await {
                        if let Ok(domain) = msg.get_payload::<String>() {
                            signals.get(&domain).notify_waiters();
                        }
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "outbox notifications unavailable; retrying"),
        }
        failures = failures.saturating_add(1);
        tokio::time::sleep(Duration::from_millis(100 * u64::from(failures.min(20)))).await;
    }
}

/// `<ms>-<seq>` as a comparable pair.
fn parse_stream_id(id: &str) -> Option<(u64, u64)> {
    let (a, b) = id.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// A Redis stream id is `<ms>-<seq>`, both decimal.
fn valid_stream_id(id: &str) -> bool {
    id.split_once('-').is_some_and(|(a, b)| {
        !a.is_empty()
            && !b.is_empty()
            && a.len() <= 20
            && b.len() <= 20
            && a.bytes().all(|c| c.is_ascii_digit())
            && b.bytes().all(|c| c.is_ascii_digit())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(s: u8, seq: u64) -> OutboxItem {
        OutboxItem {
            session_id: SessionId([s; 16]),
            recipient: "bob".into(),
            seq,
            payload: vec![s, seq as u8].into(),
        }
    }

    #[tokio::test]
    async fn memory_outbox_dedups_resumes_and_bounds() -> Result<(), StoreError> {
        let o = MemoryOutbox::new(3);
        o.push("d", &[item(1, 1), item(1, 2), item(2, 1)]).await?;
        // Redelivery of (1,2) after a crash is dropped; (1,3) is new.
        o.push("d", &[item(1, 2), item(1, 3)]).await?;
        let all = o.read_after("d", None, 10).await?;
        // Capacity 3: the oldest of four events is gone.
        assert_eq!(
            all.iter().map(|e| e.payload.clone()).collect::<Vec<_>>(),
            vec![vec![1, 2], vec![2, 1], vec![1, 3]]
        );
        let after_first = o.read_after("d", Some(&all[0].id), 10).await?;
        assert_eq!(after_first, all[1..].to_vec());
        assert!(o.read_after("d", Some(&all[2].id), 10).await?.is_empty());
        assert!(o.read_after("other", None, 10).await?.is_empty());
        // Retention dropped event 1: resuming after it (or before) missed something.
        assert!(o.dropped_after("d", "0-0").await?);
        assert!(!o.dropped_after("d", &all[0].id).await?);
        assert!(!o.dropped_after("other", "0-0").await?);
        // "Only what comes next" starts after the newest event.
        let tail = o.last_id("d").await?;
        assert!(o.read_after("d", Some(&tail), 10).await?.is_empty());
        o.push("d", &[item(3, 1)]).await?;
        assert_eq!(o.read_after("d", Some(&tail), 10).await?.len(), 1);
        assert_eq!(o.last_id("empty").await?, "0-0");
        // Two recipients of one session in one domain are deduplicated apart.
        let mut other = item(3, 1);
        other.recipient = "carol".into();
        o.push("d", &[other]).await?;
        assert_eq!(o.read_after("d", Some(&tail), 10).await?.len(), 2);
        Ok(())
    }

    #[test]
    fn stream_ids_are_validated() {
        assert!(valid_stream_id("1732350000123-0"));
        assert!(!valid_stream_id("1-"));
        assert!(!valid_stream_id("+"));
        assert!(!valid_stream_id("1-2 junk"));
    }
}
