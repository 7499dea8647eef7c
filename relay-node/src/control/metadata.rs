//! The metadata log writer: a content-free record of every message, buffered off the message
//! path and written in batches.
//!
//! In Redis, each day is a stream `fr:meta:<YYYY-MM-DD>` (expiring after the retention), one
//! entry per message with the fields `at`, `session`, `msg`, `from`, `from_platform`, `to`,
//! `to_platform`, `category`, `kind`. No field ever holds message content.

use super::logstore::MemLog;
use redis::aio::ConnectionManager;
use session_actor::{MetadataEntry, MetadataSink};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::warn;

/// Entries written per Redis pipeline at most.
const BATCH: usize = 512;

/// Where entries end up.
enum Backend {
    Redis {
        conn: ConnectionManager,
        prefix: String,
        retention: Duration,
    },
    Memory(Arc<Mutex<MemLog>>),
}

enum Item {
    Entry(MetadataEntry),
    /// Answered once every entry sent before it is written.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// The node's [`MetadataSink`]: `record` never blocks; a background task writes.
#[derive(Clone)]
pub struct MetadataLog {
    tx: mpsc::UnboundedSender<Item>,
    memory: Option<Arc<Mutex<MemLog>>>,
}

impl MetadataLog {
    pub fn redis(
        conn: ConnectionManager,
        prefix: &str,
        retention_days: u32,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let backend = Backend::Redis {
            conn,
            prefix: prefix.to_string(),
            retention: Duration::from_secs(u64::from(retention_days) * 86_400),
        };
        Self::spawn(backend, None)
    }

    pub fn memory(capacity: usize) -> (Self, tokio::task::JoinHandle<()>) {
        let buf = Arc::new(Mutex::new(MemLog::default()));
        let (log, task) = Self::spawn(Backend::Memory(buf.clone()), Some(capacity));
        (
            Self {
                memory: Some(buf),
                ..log
            },
            task,
        )
    }

    fn spawn(backend: Backend, capacity: Option<usize>) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(backend, rx, capacity.unwrap_or(0)));
        (Self { tx, memory: None }, task)
    }

    /// Waits until everything recorded so far is written.
    pub async fn flush(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.tx.send(Item::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// The newest entries of the in-memory log (empty for Redis).
    pub fn recent(&self, n: usize) -> Vec<MetadataEntry> {
        self.memory
            .as_ref()
            .and_then(|m| {
                m.lock().ok().map(|q| {
                    q.entries
                        .iter()
                        .rev()
                        .take(n)
                        .map(|(_, e)| e.clone())
                        .collect()
                })
            })
            .unwrap_or_default()
    }

    /// The in-memory log, for queries (`None` for Redis).
    pub fn memory_log(&self) -> Option<Arc<Mutex<MemLog>>> {
        self.memory.clone()
    }
}

impl MetadataSink for MetadataLog {
    fn record(&self, entry: MetadataEntry) {
        metrics::counter!("fedrelay_metadata_entries_total", "category" => entry.category)
            .increment(1);
        if self.tx.send(Item::Entry(entry)).is_err() {
            warn!("metadata log writer stopped; entry lost");
        }
    }
}

/// Writes until every sender is gone and the queue is empty (so shutdown flushes).
async fn run(backend: Backend, mut rx: mpsc::UnboundedReceiver<Item>, capacity: usize) {
    let mut items = Vec::with_capacity(BATCH);
    let mut batch = Vec::with_capacity(BATCH);
    let mut flushes = Vec::new();
    while rx.recv_many(&mut items, BATCH).await > 0 {
        for item in items.drain(..) {
            match item {
                Item::Entry(e) => batch.push(e),
                Item::Flush(tx) => flushes.push(tx),
            }
        }
        match &backend {
            Backend::Memory(buf) => {
                if let Ok(mut q) = buf.lock() {
                    for e in batch.drain(..) {
                        if q.entries.len() >= capacity {
                            q.entries.pop_front();
                        }
                        let seq = q.next;
                        q.next += 1;
                        q.entries.push_back((seq, e));
                    }
                }
            }
            // A flush request may arrive with no entries: nothing to write.
            Backend::Redis { .. } if batch.is_empty() => {}
            Backend::Redis {
                conn,
                prefix,
                retention,
            } => {
                // Retry with backoff: entries wait in memory while Redis is away.
                let mut delay = Duration::from_millis(100);
                loop {
                    match write_redis(conn.clone(), prefix, *retention, &batch).await {
                        Ok(()) => break,
                        Err(e) => {
                            metrics::counter!("fedrelay_metadata_write_errors_total").increment(1);
                            warn!(error = %e, entries = batch.len(), "metadata log write failed; retrying");
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(Duration::from_secs(5));
                        }
                    }
                }
                batch.clear();
            }
        }
        for tx in flushes.drain(..) {
            let _ = tx.send(());
        }
    }
}

async fn write_redis(
    mut conn: ConnectionManager,
    prefix: &str,
    retention: Duration,
    batch: &[MetadataEntry],
) -> Result<(), redis::RedisError> {
    let mut pipe = redis::pipe();
    let mut days = Vec::new();
    for e in batch {
        let key = format!("{prefix}:meta:{}", day_of(e.at_ms));
        pipe.cmd("XADD")
            .arg(&key)
            .arg("*")
            .arg("at")
            .arg(e.at_ms)
            .arg("session")
            .arg(e.session_id.map(|s| s.to_hex()).unwrap_or_default())
            .arg("msg")
            .arg(&e.relay_msg_id)
            .arg("from")
            .arg(&e.sender)
            .arg("from_platform")
            .arg(&e.sender_platform)
            .arg("to")
            .arg(e.receivers.join(","))
            .arg("to_platform")
            .arg(&e.receiver_platform)
            .arg("category")
            .arg(e.category)
            .arg("kind")
            .arg(&e.kind)
            .ignore();
        if !days.contains(&key) {
            days.push(key);
        }
    }
    for key in days {
        pipe.cmd("EXPIRE")
            .arg(key)
            .arg(retention.as_secs())
            .ignore();
    }
    pipe.query_async::<()>(&mut conn).await
}

/// `YYYY-MM-DD` (UTC) of a Unix time in milliseconds.
pub fn day_of(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_utc_calendar_days() {
        assert_eq!(day_of(0), "1970-01-01");
        assert_eq!(day_of(1_732_350_000_000), "2024-11-23");
        assert_eq!(day_of(951_782_400_000), "2000-02-29");
        assert_eq!(day_of(-1), "1969-12-31");
    }
}
