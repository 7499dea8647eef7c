//! How sessions hand envelopes to edges for delivery.

use async_trait::async_trait;
use fedrelay_proto::{Address, Envelope};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

/// A failed delivery attempt, as the recipient's edge classifies it.
#[derive(Debug, Error, Clone)]
#[error("delivery failed ({code}): {detail}")]
pub struct DeliveryError {
    /// Stable code for metrics and the error event sent back to the sender.
    pub code: String,
    pub detail: String,
    /// Whether trying again later may succeed (timeouts, 5xx, 429) or not (4xx, unknown user).
    pub retryable: bool,
    /// A wait the recipient asked for (HTTP `Retry-After`), honoured over the backoff.
    pub retry_after: Option<Duration>,
    /// The relay's own fault (its store unreachable, shutting down), not the recipient's: retried
    /// for as long as it lasts, without using up the recipient's attempts.
    pub internal: bool,
}

impl DeliveryError {
    pub fn retryable(code: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            detail: detail.into(),
            retryable: true,
            retry_after: None,
            internal: false,
        }
    }

    /// A failure on the relay's side; see [`DeliveryError::internal`].
    pub fn internal(code: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            detail: detail.into(),
            retryable: true,
            retry_after: None,
            internal: true,
        }
    }

    pub fn permanent(code: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            detail: detail.into(),
            retryable: false,
            retry_after: None,
            internal: false,
        }
    }
}

/// The delivery side of the edges. A session calls `deliver` with consecutive envelopes of
/// one session for one recipient, in seq order, and waits for the outcome before sending that
/// recipient anything else; the batch succeeds or fails as a whole.
#[async_trait]
pub trait Outbound: Send + Sync + 'static {
    /// Delivers `batch` to `recipient`. On success returns, per envelope, the id the
    /// recipient's platform gave the message (if any), so later edits can name it.
    async fn deliver(
        &self,
        recipient: &Address,
        batch: &[Arc<Envelope>],
    ) -> Result<Vec<Option<String>>, DeliveryError>;
}
