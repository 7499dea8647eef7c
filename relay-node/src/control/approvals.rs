//! Contact requests that wait for an administrator: a domain with `approval = true` in the
//! policy holds every new contact request to or from its users until an administrator
//! approves it (it is then relayed as if just sent) or declines it (the requester gets a
//! declined answer). The requester is told at once that the request waits.
//!
//! Pending requests are kept in the state store (a Redis hash `<prefix>:approvals`, memory
//! for `--dev`), so every node lists and decides the same ones, and a restart loses none. A
//! request sent again while it waits (the origin retrying) is held once. Each pending entry
//! keeps the envelope (the request and its optional note) only until it is decided.

use super::policy::compiled::Explanation;
use super::policy::{Approvals, Policy};
use crate::edges::teams::state::Kv;
use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use fedrelay_proto::v1::envelope::Body;
use fedrelay_proto::{Envelope, v1};
use prost::Message;
use serde::{Deserialize, Serialize};
use session_actor::{Accepted, Ingress, SessionError};
use std::sync::{Arc, OnceLock};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ApprovalError {
    #[error("no pending request {0}")]
    NotFound(String),
    #[error("request {0} has been decided already")]
    Decided(String),
    #[error("approvals unavailable: {0}")]
    Unavailable(String),
    #[error("the request could not be relayed: {0}")]
    Relay(SessionError),
}

/// A pending request as administrators see it (no note, no other content).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub id: String,
    pub requested_at_ms: i64,
    /// `user@domain` of the requester.
    pub from: String,
    pub from_platform: String,
    /// `user@domain` of the person asked.
    pub to: String,
    pub to_platform: String,
    /// Why it waits (the domain that requires approval).
    pub reason: String,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    #[serde(flatten)]
    pending: Pending,
    /// The envelope, protobuf in base64.
    envelope: String,
    /// The field that holds the request once per origin id.
    origin: String,
}

/// The book of pending requests, and the way on once one is approved.
pub struct ApprovalBook {
    kv: Box<dyn Kv>,
    key: String,
    /// Where approved requests go: the router, past the policy gate.
    ingress: OnceLock<Arc<dyn Ingress>>,
    policy: Arc<Policy>,
}

fn unavailable(e: impl std::fmt::Display) -> ApprovalError {
    ApprovalError::Unavailable(e.to_string())
}

fn addr(a: &fedrelay_proto::Address) -> String {
    format!("{}@{}", a.user, a.domain)
}

impl ApprovalBook {
    pub fn new(kv: Box<dyn Kv>, prefix: &str, policy: Arc<Policy>) -> Self {
        Self {
            kv,
            key: format!("{prefix}:approvals"),
            ingress: OnceLock::new(),
            policy,
        }
    }

    /// Connects the book to the router (approved requests skip the approval check only).
    pub fn set_ingress(&self, ingress: Arc<dyn Ingress>) {
        let _ = self.ingress.set(ingress);
    }

    /// Every pending request, oldest first.
    pub async fn list(&self) -> Result<Vec<Pending>, ApprovalError> {
        let all = self.kv.all(&self.key).await.map_err(unavailable)?;
        let mut out: Vec<Pending> = all
            .iter()
            .filter(|(f, _)| f.starts_with("req:"))
            .filter_map(|(_, v)| serde_json::from_str::<Stored>(v).ok())
            .map(|s| s.pending)
            .collect();
        out.sort_by(|a, b| (a.requested_at_ms, &a.id).cmp(&(b.requested_at_ms, &b.id)));
        Ok(out)
    }

    pub async fn get(&self, id: &str) -> Result<Pending, ApprovalError> {
        Ok(self.stored(id).await?.pending)
    }

    async fn stored(&self, id: &str) -> Result<Stored, ApprovalError> {
        let v = self
            .kv
            .get(&self.key, &format!("req:{id}"))
            .await
            .map_err(unavailable)?
            .ok_or_else(|| ApprovalError::NotFound(id.to_string()))?;
        serde_json::from_str(&v).map_err(unavailable)
    }

    /// Approves `id`: the request is relayed now (the policy is checked again, except for
    /// the approval itself). Only one of concurrent decisions wins.
    pub async fn approve(&self, id: &str) -> Result<(Pending, Accepted), ApprovalError> {
        let stored = self.stored(id).await?;
        self.claim(id, "approved").await?;
        let bytes = STANDARD.decode(&stored.envelope).map_err(unavailable)?;
        let mut env = Envelope::decode(bytes.as_slice()).map_err(unavailable)?;
        let relayed = match self.policy.enforce(&mut env) {
            Err(r) => Err(SessionError::NotAllowed(r.reason)),
            Ok(_) => match self.ingress.get() {
                Some(i) => i.submit(env).await,
                None => Err(SessionError::Unavailable("the node is starting".into())),
            },
        };
        match relayed {
            Ok(acc) => {
                self.forget(id, &stored).await?;
                Ok((stored.pending, acc))
            }
            Err(e) => {
                // Not relayed: it stays pending, to be approved again or declined.
                let _ = self.kv.del(&self.key, &format!("decided:{id}")).await;
                Err(ApprovalError::Relay(e))
            }
        }
    }

    /// Declines `id`: the requester gets a declined answer, as if the person asked had.
    pub async fn decline(&self, id: &str) -> Result<Pending, ApprovalError> {
        let stored = self.stored(id).await?;
        self.claim(id, "declined").await?;
        let bytes = STANDARD.decode(&stored.envelope).map_err(unavailable)?;
        let env = Envelope::decode(bytes.as_slice()).map_err(unavailable)?;
        if let (Some(from), Some(to)) = (env.sender.clone(), env.recipients.first().cloned()) {
            let mut answer = crate::edges::one_to_one(
                &to.platform,
                &to,
                &from,
                format!("approval-declined:{id}"),
                Body::ContactResponse(v1::ContactResponse { accepted: false }),
            );
            answer.origin = Some(v1::Origin {
                platform: "relay".into(),
                native_id: format!("approval-declined:{id}"),
            });
            let sent = match self.ingress.get() {
                Some(i) => i.submit(answer).await,
                None => Err(SessionError::Unavailable("the node is starting".into())),
            };
            if let Err(e) = sent {
                let _ = self.kv.del(&self.key, &format!("decided:{id}")).await;
                return Err(ApprovalError::Relay(e));
            }
        }
        self.forget(id, &stored).await?;
        Ok(stored.pending)
    }

    async fn claim(&self, id: &str, what: &str) -> Result<(), ApprovalError> {
        let field = format!("decided:{id}");
        let holder = self
            .kv
            .claim(&self.key, &field, what)
            .await
            .map_err(unavailable)?;
        if holder != what {
            return Err(ApprovalError::Decided(id.to_string()));
        }
        Ok(())
    }

    async fn forget(&self, id: &str, stored: &Stored) -> Result<(), ApprovalError> {
        for f in [
            format!("req:{id}"),
            stored.origin.clone(),
            format!("decided:{id}"),
        ] {
            self.kv.del(&self.key, &f).await.map_err(unavailable)?;
        }
        Ok(())
    }
}

#[async_trait]
impl Approvals for ApprovalBook {
    async fn hold(&self, env: Envelope, why: &Explanation) -> Result<String, SessionError> {
        let store_err = |e: ApprovalError| SessionError::Unavailable(e.to_string());
        let (Some(from), Some(to)) = (env.sender.as_ref(), env.recipients.first()) else {
            return Err(SessionError::Invalid(
                "a contact request names its two people".into(),
            ));
        };
        // The origin's own id: a request sent again while it waits is held once.
        let origin = env
            .origin
            .as_ref()
            .map(|o| format!("origin:{}:{}", o.platform, o.native_id))
            .unwrap_or_else(|| format!("origin:~:{}:{}", addr(from), addr(to)));
        let id = uuid::Uuid::now_v7().simple().to_string();
        let holder = self
            .kv
            .claim(&self.key, &origin, &id)
            .await
            .map_err(|e| store_err(unavailable(e)))?;
        if holder != id {
            return Ok(holder);
        }
        let stored = Stored {
            pending: Pending {
                id: id.clone(),
                requested_at_ms: crate::edges::now_ms(),
                from: addr(from),
                from_platform: from.platform.clone(),
                to: addr(to),
                to_platform: to.platform.clone(),
                reason: why.reason.clone(),
            },
            envelope: STANDARD.encode(env.encode_to_vec()),
            origin,
        };
        let value = serde_json::to_string(&stored).map_err(|e| store_err(unavailable(e)))?;
        self.kv
            .set(&self.key, &format!("req:{id}"), &value, None)
            .await
            .map_err(|e| store_err(unavailable(e)))?;
        metrics::counter!("fedrelay_approvals_held_total").increment(1);
        Ok(id)
    }
}
