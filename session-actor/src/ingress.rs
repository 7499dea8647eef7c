//! The one door edges use to hand envelopes to sessions.
//!
//! Edges know this trait and the wire model, never the cluster: the node wires an
//! implementation that sends each envelope to its session's owner, here or on another node.

use crate::{Accepted, SessionError};
use async_trait::async_trait;
use fedrelay_proto::Envelope;

#[async_trait]
pub trait Ingress: Send + Sync + 'static {
    /// Delivers `env` to its session and returns once it is journaled (or refused). Only an
    /// `Ok` may be acknowledged to the origin platform.
    async fn submit(&self, env: Envelope) -> Result<Accepted, SessionError>;
}

#[async_trait]
impl Ingress for crate::SupervisorHandle {
    async fn submit(&self, env: Envelope) -> Result<Accepted, SessionError> {
        self.route(env).await
    }
}
