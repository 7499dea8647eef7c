//! The XMPP edge: server-to-server federation (RFC 6120/6121). To XMPP servers the relay is
//! one more server hosting its domains (the Teams and HTTP ones), so their users add
//! `alice@contoso.com` as an ordinary contact.
//!
//! - `xml`: the hardened streaming parser; `element`: the stanza tree.
//! - `stream`: a connection's XML stream, STARTTLS, stream errors, dialback keys.
//! - `tls`: rustls for both directions and the peer-certificate check (XEP-0178).
//! - `inbound`: the listener; peers authenticate with SASL EXTERNAL or dialback (XEP-0220),
//!   then their stanzas become envelopes, acknowledged (XEP-0198) once journaled.
//! - `outbound`: a pool of streams per (relay domain, remote domain), found by SRV or the
//!   config, reconnecting with backoff; deliveries wait for the peer's XEP-0198 ack.
//! - `codec`: stanzas ↔ envelope bodies.
//!
//! What XMPP users see is in `docs/xmpp.md`.

pub mod codec;
pub mod element;
pub mod inbound;
pub mod outbound;
pub mod resolve;
pub mod stream;
pub mod tls;
pub mod xml;

use crate::config::{Config, ConfigError, Platform, XmppAuth, XmppConfig};
use crate::control::policy::Policy;
use crate::edges::teams::state::{Kv, StateError};
use codec::Jid;
use element::Element;
use fedrelay_proto::{Address, Envelope, v1};
use session_actor::{Accepted, DeliveryError, Ingress, MetadataSink, SessionError};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tracing::debug;

pub(crate) use crate::edges::now_ms;

/// The XMPP edge, shared by its listener and its deliveries.
pub struct XmppEdge {
    pub(crate) cfg: XmppConfig,
    /// The domains the relay hosts for XMPP peers (every non-XMPP domain), lowercase.
    pub(crate) hosted: HashSet<String>,
    /// The remote XMPP domains the config declares, lowercase.
    pub(crate) remote: HashSet<String>,
    pub(crate) policy: Arc<Policy>,
    pub(crate) tls: tls::Tls,
    pub(crate) dialback_secret: Vec<u8>,
    pub(crate) resolver: resolve::Resolver,
    pub(crate) pool: outbound::Pool,
    kv: Box<dyn Kv>,
    prefix: String,
    ingress: OnceLock<Arc<dyn Ingress>>,
    pub(crate) metadata: Arc<dyn MetadataSink>,
}

impl std::fmt::Debug for XmppEdge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XmppEdge")
            .field("hosted", &self.hosted)
            .field("remote", &self.remote)
            .finish()
    }
}

/// How long the edge remembers a pending vCard request, and an automatic subscription.
const PENDING_TTL: Duration = Duration::from_secs(300);
const AUTOSUB_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long the sets of reactions are kept (XEP-0444 always sends the whole set).
const REACTIONS_TTL: Duration = Duration::from_secs(90 * 24 * 3600);

impl XmppEdge {
    /// The edge for `cfg`, or `None` when it has no `[xmpp]` section.
    pub fn from_config(
        cfg: &Config,
        kv: Box<dyn Kv>,
        policy: Arc<Policy>,
        metadata: Arc<dyn MetadataSink>,
    ) -> Result<Option<Arc<Self>>, ConfigError> {
        let Some(x) = cfg.xmpp.clone() else {
            return Ok(None);
        };
        let invalid = |m: String| ConfigError::Invalid(format!("xmpp: {m}"));
        let hosted = cfg
            .domains
            .iter()
            .filter(|d| d.platform != Platform::Xmpp)
            .map(|d| d.name.to_ascii_lowercase())
            .collect();
        let remote = cfg
            .domains
            .iter()
            .filter(|d| d.platform == Platform::Xmpp)
            .map(|d| d.name.to_ascii_lowercase())
            .collect();
        let tls = tls::Tls::from_config(&x).map_err(|e| invalid(e.to_string()))?;
        let dialback_secret = match x.dialback_secret()? {
            Some(s) => s,
            None => rand::random::<[u8; 32]>().to_vec(),
        };
        let overrides: HashMap<String, resolve::Target> = x
            .peers
            .iter()
            .filter_map(|p| {
                let t = resolve::split_host_port(p.address.as_deref()?)?;
                Some((p.domain.to_ascii_lowercase(), t))
            })
            .collect();
        let resolver =
            resolve::Resolver::new(overrides, x.dns_server).map_err(|e| invalid(e.to_string()))?;
        Ok(Some(Arc::new(Self {
            cfg: x,
            hosted,
            remote,
            policy,
            tls,
            dialback_secret,
            resolver,
            pool: outbound::Pool::default(),
            kv,
            prefix: cfg.store.key_prefix.clone(),
            ingress: OnceLock::new(),
            metadata,
        })))
    }

    /// Connects the edge to the node's router.
    pub fn set_ingress(&self, ingress: Arc<dyn Ingress>) {
        let _ = self.ingress.set(ingress);
    }

    pub(crate) fn limits(&self) -> xml::Limits {
        xml::Limits {
            max_stanza_bytes: self.cfg.max_stanza_bytes,
            max_depth: self.cfg.max_depth,
            ..xml::Limits::default()
        }
    }

    /// Whether `domain` may authenticate with `how`.
    pub(crate) fn allows(&self, domain: &str, how: XmppAuth) -> bool {
        if !self.remote.contains(domain) {
            return false;
        }
        match self.cfg.auth_for(domain) {
            XmppAuth::Any => true,
            want => want == how,
        }
    }

    pub(crate) async fn submit(&self, env: Envelope) -> Result<Accepted, SessionError> {
        crate::edges::submit(&self.ingress, "xmpp", env).await
    }

    /// Records a refusal by policy in the metadata log (never content).
    pub(crate) fn record_refusal(&self, from: &Address, to: &Jid, code: &str) {
        crate::edges::record_refusal(self.metadata.as_ref(), from, &to.domain, &to.local, code);
    }

    /// Sends one stanza from a relay domain to a remote domain, without waiting for it.
    pub(crate) fn send_detached(self: &Arc<Self>, el: Element) {
        let edge = self.clone();
        tokio::spawn(async move {
            let (Some(from), Some(to)) = (
                el.get_attr("from").and_then(Jid::parse),
                el.get_attr("to").and_then(Jid::parse),
            ) else {
                return;
            };
            if let Err(e) = edge.pool.send(&edge, &from.domain, &to.domain, &[el]).await {
                debug!(code = %e.code, "reply not sent");
            }
        });
    }

    fn key(&self, kind: &str, a: &str) -> String {
        format!("{}:x:{kind}:{a}", self.prefix)
    }

    pub(crate) async fn remember_query(
        &self,
        me: &str,
        asker_bare: &str,
        value: &str,
    ) -> Result<(), StateError> {
        self.kv
            .set(&self.key("vq", me), asker_bare, value, Some(PENDING_TTL))
            .await
    }

    pub(crate) async fn take_query(
        &self,
        me: &str,
        asker_bare: &str,
    ) -> Result<Option<String>, StateError> {
        let k = self.key("vq", me);
        let v = self.kv.get(&k, asker_bare).await?;
        if v.is_some() {
            self.kv.del(&k, asker_bare).await?;
        }
        Ok(v)
    }

    /// The relay asked `remote` to subscribe back on `me`'s behalf.
    pub(crate) async fn remember_autosub(&self, me: &str, remote: &str) -> Result<(), StateError> {
        self.kv
            .set(&self.key("as", me), remote, "1", Some(AUTOSUB_TTL))
            .await
    }

    /// Whether a `subscribed` from `remote` to `me` answers the relay's own request.
    pub(crate) async fn take_autosub(&self, me: &str, remote: &str) -> Result<bool, StateError> {
        let k = self.key("as", me);
        let v = self.kv.get(&k, remote).await?;
        if v.is_some() {
            self.kv.del(&k, remote).await?;
        }
        Ok(v.is_some())
    }

    /// The reaction set `who` has on `target` (as last known), and its key.
    pub(crate) async fn reactions(
        &self,
        who: &str,
        target: &str,
    ) -> Result<Vec<String>, StateError> {
        Ok(self
            .kv
            .get(&self.key("re", who), target)
            .await?
            .map(|s| {
                s.split('\u{1f}')
                    .filter(|x| !x.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default())
    }

    pub(crate) async fn set_reactions(
        &self,
        who: &str,
        target: &str,
        set: &[String],
    ) -> Result<(), StateError> {
        self.kv
            .set(
                &self.key("re", who),
                target,
                &set.join("\u{1f}"),
                Some(REACTIONS_TTL),
            )
            .await
    }

    /// Delivers a batch to one XMPP user.
    pub async fn deliver(
        self: &Arc<Self>,
        recipient: &Address,
        batch: &[Arc<Envelope>],
    ) -> Result<Vec<Option<String>>, DeliveryError> {
        let to = format!("{}@{}", recipient.user, recipient.domain).to_lowercase();
        let Some(to_jid) = Jid::parse(&to) else {
            return Err(DeliveryError::permanent(
                "xmpp_bad_address",
                "the recipient is not a valid JID",
            ));
        };
        let mut out = Vec::with_capacity(batch.len());
        // Stanzas per sending domain, in order; one write (and one ack wait) per domain.
        let mut groups: Vec<(String, Vec<Element>)> = Vec::new();
        for env in batch {
            let sender = env.sender.clone().unwrap_or_default();
            let from_domain = sender.domain.to_ascii_lowercase();
            let (stanzas, native) = outbound::render(self, env, &sender, &to_jid).await?;
            out.push(native);
            match groups.last_mut() {
                Some((d, v)) if *d == from_domain => v.extend(stanzas),
                _ => groups.push((from_domain, stanzas)),
            }
        }
        for (from_domain, stanzas) in groups {
            if stanzas.is_empty() {
                continue;
            }
            self.pool
                .send(self, &from_domain, &to_jid.domain, &stanzas)
                .await?;
        }
        for env in batch {
            let kind = env.body.as_ref().map(|b| b.kind()).unwrap_or("unknown");
            metrics::counter!("fedrelay_messages_out_total", "edge" => "xmpp", "kind" => kind)
                .increment(1);
        }
        Ok(out)
    }

    /// A 1:1 envelope from an XMPP user.
    pub(crate) fn envelope(
        from: &Address,
        to: &Address,
        native_id: String,
        body: v1::envelope::Body,
    ) -> Envelope {
        crate::edges::one_to_one("xmpp", from, to, native_id, body)
    }
}
