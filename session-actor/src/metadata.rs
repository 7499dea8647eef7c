//! The metadata log: one content-free entry per message, for administrators and auditors.

use crate::SessionId;

/// One line of the metadata log. It never holds message content: only who, to whom, what
/// kind, when, and in which session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataEntry {
    /// Milliseconds since the Unix epoch when the relay accepted (or refused) the message.
    pub at_ms: i64,
    /// The session, when the message reached one (policy refusals happen before).
    pub session_id: Option<SessionId>,
    pub relay_msg_id: String,
    /// `user@domain` of the sender.
    pub sender: String,
    pub sender_platform: String,
    /// `user@domain` of each recipient.
    pub receivers: Vec<String>,
    pub receiver_platform: String,
    /// `im`, `presence`, `typing` or `error`.
    pub category: &'static str,
    /// The body kind (`message`, `edit`, `reaction`, ...), or the error code for `error`.
    pub kind: String,
}

/// Where sessions and edges report metadata entries. Recording must not block the message
/// path: implementations buffer and write in batches.
pub trait MetadataSink: Send + Sync + 'static {
    fn record(&self, entry: MetadataEntry);
}

/// A sink that drops entries, for tests that do not look at the log.
#[derive(Debug, Default)]
pub struct NoMetadata;

impl MetadataSink for NoMetadata {
    fn record(&self, _entry: MetadataEntry) {}
}
