//! Protocol edges. Each edge is a folder with its config, inbound and outbound halves and
//! codec; an edge hands envelopes to an [`session_actor::Ingress`] and receives deliveries
//! through [`Edges`], never seeing the cluster.

pub mod http;
pub mod sip;
pub mod teams;
pub mod xmpp;

use async_trait::async_trait;
use fedrelay_proto::{Address, Envelope};
use session_actor::{DeliveryError, Outbound};
use std::sync::Arc;

/// Whether a request's `Content-Length` already says it is over `limit` (the body is then
/// not read at all; one without the header is cut off at the limit while read).
pub fn declared_too_large(headers: &axum::http::HeaderMap, limit: usize) -> bool {
    headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n > limit)
}

/// Hands an edge's envelope to the node's router (set once the router exists), with the
/// current trace context, and counts what was accepted per edge and kind.
pub async fn submit(
    ingress: &std::sync::OnceLock<Arc<dyn session_actor::Ingress>>,
    edge: &'static str,
    mut env: Envelope,
) -> Result<session_actor::Accepted, session_actor::SessionError> {
    let Some(ingress) = ingress.get() else {
        return Err(session_actor::SessionError::Unavailable(
            "the node is starting".into(),
        ));
    };
    env.trace_context = crate::telemetry::current_trace_context();
    let kind = env.body.as_ref().map(|b| b.kind()).unwrap_or("unknown");
    let r = ingress.submit(env).await;
    if r.is_ok() {
        metrics::counter!("fedrelay_messages_in_total", "edge" => edge, "kind" => kind)
            .increment(1);
    }
    r
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A 1:1 envelope from `from` on `platform` to `to`, with the origin's own id for it.
pub fn one_to_one(
    platform: &str,
    from: &Address,
    to: &Address,
    native_id: String,
    body: fedrelay_proto::v1::envelope::Body,
) -> Envelope {
    Envelope {
        session_id: session_actor::SessionId::one_to_one(from, to).0.to_vec(),
        relay_msg_id: String::new(),
        origin: Some(fedrelay_proto::v1::Origin {
            platform: platform.into(),
            native_id,
        }),
        sender: Some(from.clone()),
        recipients: vec![to.clone()],
        sent_at_ms: now_ms(),
        trace_context: None,
        seq: 0,
        body: Some(body),
    }
}

/// Counts a refusal by policy and records it in the metadata log (never content): `from` tried
/// to reach `to_user@to_domain`.
pub fn record_refusal(
    metadata: &dyn session_actor::MetadataSink,
    from: &Address,
    to_domain: &str,
    to_user: &str,
    code: &str,
) {
    metrics::counter!("fedrelay_policy_refusals_total", "reason" => code.to_string()).increment(1);
    let recipient = Address::new("unknown", to_domain, to_user);
    metadata.record(session_actor::MetadataEntry {
        at_ms: now_ms(),
        session_id: Some(session_actor::SessionId::one_to_one(from, &recipient)),
        relay_msg_id: String::new(),
        sender: format!("{}@{}", from.user, from.domain),
        sender_platform: from.platform.clone(),
        receivers: vec![format!("{to_user}@{to_domain}")],
        receiver_platform: String::new(),
        category: "error",
        kind: code.to_string(),
    });
}

/// The node's [`Outbound`]: sends each delivery to the edge of the recipient's platform.
pub struct Edges {
    pub http: Arc<http::HttpOutbound>,
    /// The bot, when a domain is on Teams.
    pub teams: Option<Arc<teams::TeamsEdge>>,
    /// Server-to-server federation, when a domain is on XMPP.
    pub xmpp: Option<Arc<xmpp::XmppEdge>>,
    /// SIP/SIMPLE, when a domain is on SIP.
    pub sip: Option<Arc<sip::SipEdge>>,
}

#[async_trait]
impl Outbound for Edges {
    async fn deliver(
        &self,
        recipient: &Address,
        batch: &[Arc<Envelope>],
    ) -> Result<Vec<Option<String>>, DeliveryError> {
        match recipient.platform.as_str() {
            "http" => self.http.deliver(recipient, batch).await,
            "teams" => match &self.teams {
                Some(t) => t.deliver(recipient, batch).await,
                None => Err(DeliveryError::permanent(
                    "no_edge",
                    "no edge serves platform teams",
                )),
            },
            "xmpp" => match &self.xmpp {
                Some(x) => x.deliver(recipient, batch).await,
                None => Err(DeliveryError::permanent(
                    "no_edge",
                    "no edge serves platform xmpp",
                )),
            },
            "sip" => match &self.sip {
                Some(x) => x.deliver(recipient, batch).await,
                None => Err(DeliveryError::permanent(
                    "no_edge",
                    "no edge serves platform sip",
                )),
            },
            other => Err(DeliveryError::permanent(
                "no_edge",
                format!("no edge serves platform {other}"),
            )),
        }
    }
}
