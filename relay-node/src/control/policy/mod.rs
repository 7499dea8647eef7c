//! Federation policy: which domains the relay serves, on which side and platform, which pairs
//! of domains may talk and about what, and which internal users may federate with whom.
//!
//! The document ([`model::PolicyDoc`]) lives in etcd (in memory for `--dev`) and is watched;
//! each version is compiled ([`compiled::Compiled`]) and swapped in atomically, so the message
//! path reads it with no I/O and no lock. Every envelope an edge submits passes one function,
//! [`Policy::enforce`], through the node's [`PolicyGate`].

pub mod compiled;
pub mod model;
pub mod store;
#[cfg(test)]
mod tests;

use crate::config::{Config, Platform};
use arc_swap::ArcSwap;
use async_trait::async_trait;
use compiled::{Compiled, Decision, DenyCode, Explanation, Outcome, Party};
use fedrelay_proto::v1::envelope::Body;
use fedrelay_proto::{Address, Envelope};
use model::{Kind, PolicyDoc};
use session_actor::{Accepted, Ingress, MetadataSink, SessionError};
use std::sync::Arc;
use thiserror::Error;
use tokio::sync::watch;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("domain {0} is not served by this relay")]
    UnknownDomain(String),
    #[error("no federation rule connects {from} and {to}")]
    NotFederated { from: String, to: String },
    #[error("{reason}")]
    Denied { code: &'static str, reason: String },
}

impl PolicyError {
    pub fn code(&self) -> &'static str {
        match self {
            PolicyError::UnknownDomain(_) => "unknown_domain",
            PolicyError::NotFederated { .. } => "not_federated",
            PolicyError::Denied { code, .. } => code,
        }
    }
}

/// The kind of traffic an envelope body is, and whether it starts a conversation; `None`
/// for the relay's own error reports, which policy does not stop.
pub fn kind_of(body: &Body) -> Option<(Kind, bool)> {
    Some(match body {
        Body::Text(_) | Body::Edit(_) | Body::Delete(_) | Body::Reaction(_) => (Kind::Im, false),
        Body::File(_) => (Kind::Files, false),
        Body::Typing(_) => (Kind::Typing, false),
        Body::Presence(_) | Body::ProfileQuery(_) | Body::Profile(_) => (Kind::Presence, false),
        Body::ContactRequest(_) => (Kind::Contacts, true),
        Body::ContactResponse(_) => (Kind::Contacts, false),
        Body::ChannelInvite(_) => (Kind::Invites, true),
        Body::Membership(_) => (Kind::Invites, false),
        Body::Error(_) => return None,
    })
}

/// `s` in lower case, borrowed when it already is.
fn lower(s: &str) -> std::borrow::Cow<'_, str> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(s.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// The node's live policy: the compiled current version, swapped whole on each change.
pub struct Policy {
    current: ArcSwap<Compiled>,
    /// The version applied, for whoever waits for a change to take effect.
    applied: watch::Sender<u64>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("version", &self.current.load().version())
            .finish()
    }
}

impl Policy {
    pub fn new(doc: PolicyDoc, version: u64) -> Self {
        Self {
            current: ArcSwap::from_pointee(Compiled::new(doc, version)),
            applied: watch::channel(version).0,
        }
    }

    /// The policy a config file implies (the seed of a new cluster, and of `--dev`).
    pub fn from_config(cfg: &Config) -> Self {
        Self::new(PolicyDoc::from_config(cfg), 0)
    }

    /// The current compiled policy.
    pub fn current(&self) -> Arc<Compiled> {
        self.current.load_full()
    }

    /// Applies a new version (already validated). Older versions than the current are ignored,
    /// so a late watch event never rolls the policy back.
    pub fn apply(&self, doc: PolicyDoc, version: u64) -> bool {
        if version != 0 && version < self.current.load().version() {
            return false;
        }
        self.current.store(Arc::new(Compiled::new(doc, version)));
        self.applied.send_replace(version);
        metrics::gauge!("fedrelay_policy_version").set(version as f64);
        metrics::counter!("fedrelay_policy_applied_total").increment(1);
        true
    }

    /// Follows the applied version.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// The platform of a declared domain (lower case).
    pub fn platform_of(&self, domain: &str) -> Result<Platform, PolicyError> {
        self.current
            .load()
            .platform_of(domain)
            .ok_or_else(|| PolicyError::UnknownDomain(domain.to_string()))
    }

    /// Whether users of `from` may reach users of `to` at all, and the platform of `to`: an
    /// edge's check when it addresses a recipient. The message itself still passes
    /// [`Policy::enforce`]. Domains are lowercase.
    pub fn check(&self, from: &str, to: &str) -> Result<Platform, PolicyError> {
        let c = self.current.load();
        let d = c.domains_connected(from, to);
        match d.outcome {
            Outcome::Deny(DenyCode::UnknownDomain) => {
                let unknown = if c.platform_of(from).is_none() {
                    from
                } else {
                    to
                };
                Err(PolicyError::UnknownDomain(unknown.to_string()))
            }
            Outcome::Deny(DenyCode::NotFederated) => Err(PolicyError::NotFederated {
                from: from.to_string(),
                to: to.to_string(),
            }),
            Outcome::Deny(code) => {
                let p = |d| Party {
                    user: "",
                    domain: d,
                };
                Err(PolicyError::Denied {
                    code: code.as_str(),
                    reason: c.explain(&d, p(from), p(to), Kind::Im).reason,
                })
            }
            _ => c
                .platform_of(to)
                .ok_or_else(|| PolicyError::UnknownDomain(to.to_string())),
        }
    }

    /// Allowed or not, and why: for (sender, receiver, kind), as the management API shows it.
    pub fn explain(&self, sender: &str, receiver: &str, kind: Kind) -> Option<Explanation> {
        explain_in(&self.current.load(), sender, receiver, kind)
    }

    /// The one check every envelope from an edge passes. Recipients the policy refuses are
    /// removed (and each refusal returned, to be logged); when none is left, or the sender's
    /// domain is over its rate limit, the envelope is refused as a whole.
    pub fn enforce(&self, env: &mut Envelope) -> Result<Enforced, Refusal> {
        let Some((kind, initiating)) = env.body.as_ref().and_then(kind_of) else {
            return Ok(Enforced::default());
        };
        // A presence change with no recipients is published to the sender's followers, who
        // became followers through contact requests this policy let through.
        let Some(sender) = env.sender.as_ref().filter(|_| !env.recipients.is_empty()) else {
            return Ok(Enforced::default());
        };
        let c = self.current.load();
        let (su, sd) = (lower(&sender.user), lower(&sender.domain));
        let s = Party {
            user: &su,
            domain: &sd,
        };
        let mut out = Enforced::default();
        let mut refused: Vec<(usize, Decision)> = Vec::new();
        for (i, rcpt) in env.recipients.iter().enumerate() {
            let (ru, rd) = (lower(&rcpt.user), lower(&rcpt.domain));
            let r = Party {
                user: &ru,
                domain: &rd,
            };
            let d = c.decide(s, r, kind, initiating);
            match d.outcome {
                Outcome::Allow => {}
                Outcome::Approval => out.approval = Some(c.explain(&d, s, r, kind)),
                Outcome::Deny(_) => refused.push((i, d)),
            }
        }
        let explain = |i: usize, d: &Decision| {
            let rcpt = &env.recipients[i];
            let (ru, rd) = (lower(&rcpt.user), lower(&rcpt.domain));
            c.explain(
                d,
                s,
                Party {
                    user: &ru,
                    domain: &rd,
                },
                kind,
            )
        };
        if refused.len() == env.recipients.len() {
            let Some(&(i, d)) = refused.first() else {
                return Ok(out);
            };
            let e = explain(i, &d);
            return Err(Refusal {
                code: e.code.unwrap_or("not_allowed"),
                reason: e.reason,
                refused: refused
                    .iter()
                    .map(|(i, d)| (env.recipients[*i].clone(), explain(*i, d)))
                    .collect(),
            });
        }
        if !c.admit(&sd) {
            let d = c.rate_limited(&sd);
            let e = explain(0, &d);
            return Err(Refusal {
                code: DenyCode::RateLimited.as_str(),
                reason: e.reason,
                refused: Vec::new(),
            });
        }
        if !refused.is_empty() {
            out.refused = refused
                .iter()
                .map(|(i, d)| (env.recipients[*i].clone(), explain(*i, d)))
                .collect();
            let mut i = 0;
            env.recipients.retain(|_| {
                let keep = !refused.iter().any(|(j, _)| *j == i);
                i += 1;
                keep
            });
        }
        Ok(out)
    }
}

/// What [`Policy::enforce`] let through.
#[derive(Debug, Default)]
pub struct Enforced {
    /// Recipients removed, with why.
    pub refused: Vec<(Address, Explanation)>,
    /// Set when the envelope is a contact request that waits for an administrator.
    pub approval: Option<Explanation>,
}

/// An envelope the policy refuses as a whole.
#[derive(Debug, Error)]
#[error("{code}: {reason}")]
pub struct Refusal {
    pub code: &'static str,
    pub reason: String,
    pub refused: Vec<(Address, Explanation)>,
}

/// The node's ingress as edges see it: the policy, then the router.
pub struct PolicyGate {
    inner: Arc<dyn Ingress>,
    policy: Arc<Policy>,
    metadata: Arc<dyn MetadataSink>,
    approvals: Option<Arc<dyn Approvals>>,
}

/// Where contact requests that wait for an administrator are kept.
#[async_trait]
pub trait Approvals: Send + Sync + 'static {
    /// Keeps `env` until an administrator decides; the id of the pending request.
    async fn hold(&self, env: Envelope, why: &Explanation) -> Result<String, SessionError>;
}

impl PolicyGate {
    pub fn new(
        inner: Arc<dyn Ingress>,
        policy: Arc<Policy>,
        metadata: Arc<dyn MetadataSink>,
        approvals: Option<Arc<dyn Approvals>>,
    ) -> Self {
        Self {
            inner,
            policy,
            metadata,
            approvals,
        }
    }

    fn log_refusal(&self, env: &Envelope, to: &Address, code: &str) {
        if let Some(from) = &env.sender {
            crate::edges::record_refusal(self.metadata.as_ref(), from, &to.domain, &to.user, code);
        }
    }
}

#[async_trait]
impl Ingress for PolicyGate {
    async fn submit(&self, mut env: Envelope) -> Result<Accepted, SessionError> {
        match self.policy.enforce(&mut env) {
            Ok(done) => {
                for (to, e) in &done.refused {
                    self.log_refusal(&env, to, e.code.unwrap_or("not_allowed"));
                }
                if let Some(why) = done.approval {
                    return match &self.approvals {
                        Some(a) => {
                            let id = a.hold(env, &why).await?;
                            Err(SessionError::PendingApproval(id))
                        }
                        None => Err(SessionError::NotAllowed(why.reason)),
                    };
                }
                self.inner.submit(env).await
            }
            Err(r) => {
                if r.refused.is_empty() {
                    if let Some(to) = env.recipients.first() {
                        self.log_refusal(&env, to, r.code);
                    }
                } else {
                    for (to, e) in &r.refused {
                        self.log_refusal(&env, to, e.code.unwrap_or(r.code));
                    }
                }
                if r.code == DenyCode::RateLimited.as_str() {
                    Err(SessionError::RateLimited(r.reason))
                } else {
                    Err(SessionError::NotAllowed(r.reason))
                }
            }
        }
    }
}

/// Allowed or not, and why, by the compiled policy `c` (the live one, or one proposed).
pub fn explain_in(c: &Compiled, sender: &str, receiver: &str, kind: Kind) -> Option<Explanation> {
    let sender = model::norm(sender);
    let receiver = model::norm(receiver);
    let (su, sd) = sender.rsplit_once('@')?;
    let (ru, rd) = receiver.rsplit_once('@')?;
    let s = Party {
        user: su,
        domain: sd,
    };
    let r = Party {
        user: ru,
        domain: rd,
    };
    let initiating = matches!(kind, Kind::Contacts | Kind::Invites);
    let d = c.decide(s, r, kind, initiating);
    Some(c.explain(&d, s, r, kind))
}
