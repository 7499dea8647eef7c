//! The node's ingress: each envelope goes to the owner of its session.

use crate::Membership;
use async_trait::async_trait;
use fedrelay_proto::Envelope;
use session_actor::{Accepted, Ingress, SessionError, SessionId, SupervisorHandle};
use std::sync::Arc;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum RouterError {
    #[error("no live member owns session {0}")]
    NoOwner(SessionId),
    #[error("session {session} is owned by node {owner}, which this node cannot reach")]
    Remote { session: SessionId, owner: String },
}

/// Sends envelopes to the local supervisor when this node owns their session.
pub struct Router {
    node_id: String,
    membership: Arc<dyn Membership>,
    local: SupervisorHandle,
}

impl Router {
    pub fn new(
        node_id: impl Into<String>,
        membership: Arc<dyn Membership>,
        local: SupervisorHandle,
    ) -> Self {
        Self {
            node_id: node_id.into(),
            membership,
            local,
        }
    }

    fn check_owner(&self, id: SessionId) -> Result<(), RouterError> {
        let map = self.membership.shard_map();
        match map.owner(&id) {
            Some(m) if m.node_id == self.node_id => Ok(()),
            Some(m) => Err(RouterError::Remote {
                session: id,
                owner: m.node_id.clone(),
            }),
            None => Err(RouterError::NoOwner(id)),
        }
    }
}

#[async_trait]
impl Ingress for Router {
    async fn submit(&self, env: Envelope) -> Result<Accepted, SessionError> {
        let id = SessionId::from_bytes(&env.session_id)
            .ok_or_else(|| SessionError::Invalid("session id must be 16 bytes".into()))?;
        self.check_owner(id)
            .map_err(|e| SessionError::Unavailable(e.to_string()))?;
        self.local.route(env).await
    }
}
