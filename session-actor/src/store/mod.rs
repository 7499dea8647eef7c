//! Where sessions keep their state: the [`SessionStore`] trait and its two implementations,
//! [`RedisStore`] (production) and [`MemoryStore`] (`--dev` and unit tests), plus the
//! per-domain [`Outbox`] that pull-mode edges stream from.
//!
//! A session's state is its owner epoch, its last seq, the journal of envelopes not yet
//! delivered to every recipient, one delivery cursor per recipient, and the map between relay
//! message ids and each platform's native ids (which doubles as the inbound dedup set).

pub mod conformance;
mod memory;
mod outbox;
mod redis;

pub use memory::MemoryStore;
pub use outbox::{MemoryOutbox, Outbox, OutboxEvent, OutboxItem, RedisOutbox};
pub use redis::{RedisStore, RedisStoreConfig, RedisTls};

use crate::{SessionId, StoreError};
use async_trait::async_trait;
use fedrelay_proto::Envelope;
use std::collections::HashMap;

/// What a new owner learns when it claims a session.
#[derive(Debug, Default, Clone)]
pub struct Claimed {
    /// The owner epoch this claim raised the session to; every later write names it.
    pub epoch: u64,
    /// The highest seq in the journal (0 for a new session).
    pub last_seq: u64,
    /// Per recipient key, the highest seq delivered to that recipient.
    pub cursors: HashMap<String, u64>,
    /// Journal entries not yet trimmed, in seq order.
    pub journal: Vec<Envelope>,
}

/// One envelope to append.
#[derive(Debug)]
pub struct AppendRequest<'a> {
    /// The seq the owner assigns; must be exactly one past the journal's last.
    pub seq: u64,
    pub relay_msg_id: &'a str,
    /// The origin (platform, native id), when the origin gave one: the dedup key, and the
    /// first entry of the message's native-id map.
    pub origin: Option<(&'a str, &'a str)>,
    /// The encoded envelope, seq included.
    pub payload: Vec<u8>,
    /// The sender's recipient key: only the sender may later edit or delete the message.
    pub sender: &'a str,
}

/// The result of an append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendOutcome {
    Appended,
    /// The origin id was journaled before, as this message.
    Duplicate {
        relay_msg_id: String,
        seq: u64,
    },
}

/// A native id a platform gave a relayed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NativeId {
    pub relay_msg_id: String,
    pub platform: String,
    pub native_id: String,
    pub seq: u64,
}

/// Delivery progress to persist, written lazily and in one call per session.
#[derive(Debug, Default, Clone)]
pub struct AckUpdate {
    /// (recipient key, highest delivered seq).
    pub cursors: Vec<(String, u64)>,
    /// Journal entries with seq at or below this are delivered everywhere and may go.
    pub trim_through: u64,
    pub natives: Vec<NativeId>,
}

impl AckUpdate {
    pub fn is_empty(&self) -> bool {
        self.cursors.is_empty() && self.natives.is_empty() && self.trim_through == 0
    }
}

/// Session state storage. Every write names the owner's epoch and is refused with
/// [`StoreError::Fenced`] once another owner has claimed the session.
#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// Takes ownership of a session: raises its epoch and returns the state to resume from.
    async fn claim(&self, id: SessionId) -> Result<Claimed, StoreError>;

    /// Deduplicates on the origin id, checks the epoch and the seq, and appends — atomically.
    async fn append(
        &self,
        id: SessionId,
        epoch: u64,
        req: AppendRequest<'_>,
    ) -> Result<AppendOutcome, StoreError>;

    /// Persists delivery cursors and native ids, and trims the delivered journal prefix.
    async fn ack(&self, id: SessionId, epoch: u64, update: &AckUpdate) -> Result<(), StoreError>;

    /// The relay message id a platform's native id stands for in this session.
    async fn resolve_native(
        &self,
        id: SessionId,
        platform: &str,
        native_id: &str,
    ) -> Result<Option<String>, StoreError>;

    /// The native id a platform gave a relay message in this session.
    async fn native_for(
        &self,
        id: SessionId,
        relay_msg_id: &str,
        platform: &str,
    ) -> Result<Option<String>, StoreError>;

    /// The sender (recipient key) of a message of this session, or `None` if the session has
    /// no such message.
    async fn sender_of(
        &self,
        id: SessionId,
        relay_msg_id: &str,
    ) -> Result<Option<String>, StoreError>;

    /// Whether the store answers (readiness).
    async fn ping(&self) -> Result<(), StoreError>;

    /// Adds the session to the index of sessions that may owe deliveries, so whichever node
    /// owns it next resumes them even if no new message arrives. Idempotent.
    async fn mark_active(&self, id: SessionId) -> Result<(), StoreError>;

    /// Removes the session from that index (everything it journaled is delivered).
    async fn mark_idle(&self, id: SessionId) -> Result<(), StoreError>;

    /// The sessions in the index.
    async fn active_sessions(&self) -> Result<Vec<SessionId>, StoreError>;
}

/// Field names of the per-session id map, shared by both stores so they agree.
pub(crate) fn native_field(platform: &str, native_id: &str) -> String {
    format!("n:{platform}:{native_id}")
}

pub(crate) fn relay_field(relay_msg_id: &str, platform: &str) -> String {
    format!("r:{relay_msg_id}:{platform}")
}

pub(crate) fn sender_field(relay_msg_id: &str) -> String {
    format!("s:{relay_msg_id}")
}

/// The map's value for a native id: `<seq>:<relay id>`.
pub(crate) fn parse_seq_relay(v: &str) -> Result<(u64, String), StoreError> {
    let (seq, relay) = v
        .split_once(':')
        .ok_or_else(|| StoreError::Corrupt("id map entry without seq".into()))?;
    let seq = seq
        .parse()
        .map_err(|_| StoreError::Corrupt("id map entry with bad seq".into()))?;
    Ok((seq, relay.to_string()))
}
