//! The in-memory store, for `--dev` and unit tests. Same semantics as Redis, in one process.

use super::{AckUpdate, AppendOutcome, AppendRequest, Claimed, SessionStore};
use crate::{SessionId, StoreError};
use async_trait::async_trait;
use fedrelay_proto::Envelope;
use prost::Message;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

#[derive(Default)]
struct Session {
    epoch: u64,
    last_seq: u64,
    cursors: HashMap<String, u64>,
    journal: BTreeMap<u64, Vec<u8>>,
    map: HashMap<String, String>,
}

/// Sessions held in a mutex-guarded map. Nothing survives the process.
#[derive(Default)]
pub struct MemoryStore {
    sessions: Mutex<HashMap<SessionId, Session>>,
    active: Mutex<std::collections::HashSet<SessionId>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, id: SessionId, f: impl FnOnce(&mut Session) -> T) -> Result<T, StoreError> {
        let mut all = self
            .sessions
            .lock()
            .map_err(|_| StoreError::Unavailable("memory store poisoned".into()))?;
        Ok(f(all.entry(id).or_default()))
    }

    fn active_set(
        &self,
    ) -> Result<std::sync::MutexGuard<'_, std::collections::HashSet<SessionId>>, StoreError> {
        self.active
            .lock()
            .map_err(|_| StoreError::Unavailable("memory store poisoned".into()))
    }

    /// Number of journal entries currently kept for a session (for tests of trimming).
    pub fn journal_len(&self, id: SessionId) -> usize {
        self.with(id, |s| s.journal.len()).unwrap_or(0)
    }
}

fn check_epoch(s: &Session, epoch: u64) -> Result<(), StoreError> {
    if s.epoch != epoch {
        return Err(StoreError::Fenced {
            ours: epoch,
            current: s.epoch,
        });
    }
    Ok(())
}

#[async_trait]
impl SessionStore for MemoryStore {
    async fn claim(&self, id: SessionId) -> Result<Claimed, StoreError> {
        let (epoch, last_seq, cursors, raw) = self.with(id, |s| {
            s.epoch += 1;
            (
                s.epoch,
                s.last_seq,
                s.cursors.clone(),
                s.journal.values().cloned().collect::<Vec<_>>(),
            )
        })?;
        let journal = raw
            .iter()
            .map(|b| Envelope::decode(b.as_slice()).map_err(|e| StoreError::Corrupt(e.to_string())))
            .collect::<Result<_, _>>()?;
        Ok(Claimed {
            epoch,
            last_seq,
            cursors,
            journal,
        })
    }

    async fn append(
        &self,
        id: SessionId,
        epoch: u64,
        req: AppendRequest<'_>,
    ) -> Result<AppendOutcome, StoreError> {
        self.with(id, |s| {
            check_epoch(s, epoch)?;
            if let Some((platform, native)) = req.origin
                && let Some(v) = s.map.get(&super::native_field(platform, native))
            {
                let (seq, relay_msg_id) = super::parse_seq_relay(v)?;
                return Ok(AppendOutcome::Duplicate { relay_msg_id, seq });
            }
            if req.seq != s.last_seq + 1 {
                return Err(StoreError::OutOfStep {
                    expected: req.seq,
                    found: s.last_seq,
                });
            }
            s.last_seq = req.seq;
            s.journal.insert(req.seq, req.payload);
            s.map.insert(
                super::sender_field(req.relay_msg_id),
                req.sender.to_string(),
            );
            if let Some((platform, native)) = req.origin {
                s.map.insert(
                    super::native_field(platform, native),
                    format!("{}:{}", req.seq, req.relay_msg_id),
                );
                s.map.insert(
                    super::relay_field(req.relay_msg_id, platform),
                    native.to_string(),
                );
            }
            Ok(AppendOutcome::Appended)
        })?
    }

    async fn ack(&self, id: SessionId, epoch: u64, update: &AckUpdate) -> Result<(), StoreError> {
        self.with(id, |s| {
            check_epoch(s, epoch)?;
            for (k, seq) in &update.cursors {
                let c = s.cursors.entry(k.clone()).or_default();
                *c = (*c).max(*seq);
            }
            for n in &update.natives {
                s.map.insert(
                    super::native_field(&n.platform, &n.native_id),
                    format!("{}:{}", n.seq, n.relay_msg_id),
                );
                s.map.insert(
                    super::relay_field(&n.relay_msg_id, &n.platform),
                    n.native_id.clone(),
                );
            }
            s.journal = s.journal.split_off(&(update.trim_through + 1));
            Ok(())
        })?
    }

    async fn resolve_native(
        &self,
        id: SessionId,
        platform: &str,
        native_id: &str,
    ) -> Result<Option<String>, StoreError> {
        self.with(id, |s| {
            s.map
                .get(&super::native_field(platform, native_id))
                .map(|v| super::parse_seq_relay(v).map(|(_, r)| r))
                .transpose()
        })?
    }

    async fn native_for(
        &self,
        id: SessionId,
        relay_msg_id: &str,
        platform: &str,
    ) -> Result<Option<String>, StoreError> {
        self.with(id, |s| {
            s.map
                .get(&super::relay_field(relay_msg_id, platform))
                .cloned()
        })
    }

    async fn sender_of(
        &self,
        id: SessionId,
        relay_msg_id: &str,
    ) -> Result<Option<String>, StoreError> {
        self.with(id, |s| {
            s.map.get(&super::sender_field(relay_msg_id)).cloned()
        })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn mark_active(&self, id: SessionId) -> Result<(), StoreError> {
        self.active_set()?.insert(id);
        Ok(())
    }

    async fn mark_idle(&self, id: SessionId) -> Result<(), StoreError> {
        self.active_set()?.remove(&id);
        Ok(())
    }

    async fn active_sessions(&self) -> Result<Vec<SessionId>, StoreError> {
        Ok(self.active_set()?.iter().copied().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_store_honours_the_store_contract() {
        let r = super::super::conformance::run(&MemoryStore::new()).await;
        assert!(r.is_ok(), "{r:?}");
    }
}
