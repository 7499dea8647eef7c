//! The node's ingress: each envelope goes to the owner of its session, here or on a peer.

use crate::peer::Peers;
use crate::presence::{Presence, presence_session};
use crate::{Membership, ShardMap};
use async_trait::async_trait;
use fedrelay_proto::{Body, Envelope};
use session_actor::{Accepted, Ingress, Ownership, SessionError, SessionId, SupervisorHandle};
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

/// A forwarded envelope may be forwarded once more by a node whose view differs, never more.
pub const MAX_HOPS: u32 = 2;

/// Sends envelopes to their session's owner: the local supervisor, or a peer over gRPC.
pub struct Router {
    membership: Arc<dyn Membership>,
    local: SupervisorHandle,
    peers: Arc<Peers>,
    presence: Arc<Presence>,
}

impl Router {
    pub fn new(
        membership: Arc<dyn Membership>,
        local: SupervisorHandle,
        peers: Arc<Peers>,
        presence: Arc<Presence>,
    ) -> Self {
        Self {
            membership,
            local,
            peers,
            presence,
        }
    }

    /// A presence change with no recipients: published to the user's subscribers through
    /// the owner of the user's presence actor.
    async fn publish_presence(&self, env: Envelope) -> Result<Accepted, SessionError> {
        let sender = env
            .sender
            .ok_or_else(|| SessionError::Invalid("envelope without sender".into()))?;
        let Some(Body::Presence(p)) = env.body else {
            return Err(SessionError::Invalid("not a presence change".into()));
        };
        let (version, _) = self.presence.publish(&sender, p, env.trace_context).await?;
        Ok(Accepted {
            session_id: presence_session(&sender),
            relay_msg_id: if env.relay_msg_id.is_empty() {
                session_actor::ids::new_relay_msg_id()
            } else {
                env.relay_msg_id
            },
            seq: version,
            duplicate: false,
        })
    }

    /// Accepting a contact request makes both sides follow each other's presence; declining
    /// it (or a later removal) undoes it. An "accepted" that answers no request of its
    /// recipient follows nobody: presence is shared only with someone who asked.
    async fn follow_contact(&self, env: &Envelope) -> Result<(), SessionError> {
        let Some(Body::ContactResponse(r)) = &env.body else {
            return Ok(());
        };
        let Some(sender) = &env.sender else {
            return Ok(());
        };
        for other in &env.recipients {
            if r.accepted && !self.presence.was_requested(other, sender).await? {
                metrics::counter!("fedrelay_contact_responses_unrequested_total").increment(1);
                continue;
            }
            if !r.accepted {
                self.presence.note_request(other, sender, false).await?;
            }
            self.presence.subscribe(sender, other, r.accepted).await?;
            self.presence.subscribe(other, sender, r.accepted).await?;
        }
        Ok(())
    }

    /// Routes an envelope that has already crossed `hops` nodes.
    pub async fn submit_hop(&self, env: Envelope, hops: u32) -> Result<Accepted, SessionError> {
        let id = SessionId::from_bytes(&env.session_id)
            .ok_or_else(|| SessionError::Invalid("session id must be 16 bytes".into()))?;
        let mut changes = self.membership.subscribe();
        for attempt in 0..3 {
            changes.borrow_and_update();
            let map = self.membership.shard_map();
            let Some(owner) = map.owner(&id).cloned() else {
                return Err(SessionError::Unavailable(
                    "no live member owns the session".into(),
                ));
            };
            let result = if owner.node_id == self.membership.node_id() {
                self.local.route(env.clone()).await
            } else if hops >= MAX_HOPS {
                Err(SessionError::NotOwner(id.to_hex()))
            } else {
                metrics::counter!("fedrelay_forwarded_total").increment(1);
                let span =
                    tracing::info_span!("cluster.forward", session_id = %id, peer = %owner.node_id);
                self.peers
                    .forward(&owner, env.clone(), hops)
                    .instrument(span)
                    .await
            };
            match result {
                // Ownership is moving: wait briefly for this node's view to catch up, then
                // route again; the origin gets a retryable error if it does not settle.
                Err(SessionError::NotOwner(_)) if attempt < 2 => {
                    let _ =
                        tokio::time::timeout(Duration::from_millis(250), changes.changed()).await;
                }
                Err(SessionError::NotOwner(_)) => {
                    return Err(SessionError::Unavailable(
                        "session ownership is moving; retry".into(),
                    ));
                }
                r => return r,
            }
        }
        Err(SessionError::Unavailable(
            "session ownership is moving; retry".into(),
        ))
    }
}

#[async_trait]
impl Ingress for Router {
    async fn submit(&self, env: Envelope) -> Result<Accepted, SessionError> {
        if env.recipients.is_empty() && matches!(env.body, Some(Body::Presence(_))) {
            return self.publish_presence(env).await;
        }
        if matches!(env.body, Some(Body::ContactRequest(_))) {
            // Noted before the request is journaled: its recipient may answer as soon as it
            // is delivered. A request that then fails to journal only lets the recipient
            // accept what the sender tried to ask.
            if let Some(sender) = &env.sender {
                for target in &env.recipients {
                    self.presence.note_request(sender, target, true).await?;
                }
            }
            return self.submit_hop(env, 0).await;
        }
        if matches!(env.body, Some(Body::ContactResponse(_))) {
            let accepted = self.submit_hop(env.clone(), 0).await?;
            // Journaled first: a failure here is answered with a retryable error, and the
            // retry (a duplicate by then) subscribes again.
            self.follow_contact(&env).await?;
            return Ok(accepted);
        }
        self.submit_hop(env, 0).await
    }
}

/// Ownership as the current shard map says.
pub struct MapOwnership(pub Arc<dyn Membership>);

impl Ownership for MapOwnership {
    fn owns(&self, id: &SessionId) -> bool {
        owns(&self.0.shard_map(), self.0.node_id(), id)
    }
}

pub(crate) fn owns(map: &ShardMap, me: &str, id: &SessionId) -> bool {
    map.owner(id).is_some_and(|m| m.node_id == me)
}
