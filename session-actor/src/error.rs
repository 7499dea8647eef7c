//! Errors of the session layer.

use thiserror::Error;

/// What can go wrong talking to the session store.
#[derive(Debug, Error, Clone)]
pub enum StoreError {
    /// The store could not be reached or did not answer in time; the caller may retry.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Another owner raised the session's epoch: this owner must give the session up.
    #[error("session fenced: epoch {ours} is stale (current {current})")]
    Fenced { ours: u64, current: u64 },
    /// The journal does not hold what this owner believed (a seq gap); reload and retry.
    #[error("journal out of step: expected seq {expected}, store has {found}")]
    OutOfStep { expected: u64, found: u64 },
    /// The store answered something that cannot be decoded.
    #[error("corrupt store data: {0}")]
    Corrupt(String),
    /// The store's settings cannot work (e.g. TLS material for a plain `redis://` URL).
    #[error("store settings: {0}")]
    Config(String),
}

impl From<redis::RedisError> for StoreError {
    fn from(e: redis::RedisError) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

/// Why a session refused or could not take an envelope.
#[derive(Debug, Error, Clone)]
pub enum SessionError {
    /// The envelope is malformed for the session layer (missing body, no recipients, ...).
    #[error("invalid envelope: {0}")]
    Invalid(String),
    /// An edit, delete or reaction names a message this session does not know.
    #[error("unknown target message")]
    UnknownTarget,
    /// The sender may not do this (edit or delete someone else's message).
    #[error("not allowed: {0}")]
    NotAllowed(String),
    /// The journal could not be written; the origin should retry.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The session is restarting or the node is draining; the origin should retry.
    #[error("session unavailable: {0}")]
    Unavailable(String),
    /// This node does not own the session (ownership moved); route it again.
    #[error("this node does not own session {0}")]
    NotOwner(String),
    /// The sender's domain is over its rate limit; the origin should retry later.
    #[error("rate limited: {0}")]
    RateLimited(String),
    /// A contact request waits for an administrator's approval (the pending request's id).
    #[error("waiting for approval: {0}")]
    PendingApproval(String),
}

impl SessionError {
    /// Whether the origin platform should send the event again later.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            SessionError::Store(_)
                | SessionError::Unavailable(_)
                | SessionError::NotOwner(_)
                | SessionError::RateLimited(_)
        )
    }

    /// A stable, content-free code for protocol answers and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            SessionError::Invalid(_) => "invalid",
            SessionError::UnknownTarget => "unknown_target",
            SessionError::NotAllowed(_) => "not_allowed",
            SessionError::Store(_) => "store_unavailable",
            SessionError::Unavailable(_) => "unavailable",
            SessionError::NotOwner(_) => "not_owner",
            SessionError::RateLimited(_) => "rate_limited",
            SessionError::PendingApproval(_) => "pending_approval",
        }
    }

    /// Rebuilds an error from its [`SessionError::code`] and detail, as it crosses nodes.
    pub fn from_code(code: &str, detail: String) -> Self {
        match code {
            "invalid" => SessionError::Invalid(detail),
            "unknown_target" => SessionError::UnknownTarget,
            "not_allowed" => SessionError::NotAllowed(detail),
            "store_unavailable" => SessionError::Store(StoreError::Unavailable(detail)),
            "not_owner" => SessionError::NotOwner(detail),
            "rate_limited" => SessionError::RateLimited(detail),
            "pending_approval" => SessionError::PendingApproval(detail),
            _ => SessionError::Unavailable(detail),
        }
    }
}
