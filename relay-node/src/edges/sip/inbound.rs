//! Requests from SIP peers.
//!
//! Each request passes, in order: the transaction layer (retransmissions answered from it),
//! the rate limit per source (503), the grammar of its headers (400), Max-Forwards (483), the
//! method (405/501), the Request-URI scheme (416), Require (420), the sender — a declared SIP
//! peer domain proven by its TLS certificate or, without TLS, by its source address (403) —
//! and the target — a declared domain that policy connects with the sender's (403: the
//! relay is no open relay). Then the method's own handling; a request is answered 200 only
//! once what it carries is journaled.

use super::codec::{self, BodyError, ImBody};
use super::msg::{Message, Uri};
use super::outbound::{self, Sub, SubGuard};
use super::transport::Incoming;
use super::txn::{Seen, Stored};
use super::{ALLOW, SipEdge};
use crate::config::SipTransport;
use bytes::Bytes;
use fedrelay_proto::{Address, v1};
use session_actor::SessionError;
use std::sync::Arc;
use tracing::{Instrument, debug, info_span};

/// A response to send, and what to do once it is sent.
#[derive(Debug, Default)]
pub(crate) struct Reply {
    pub code: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Box<(String, Vec<u8>)>>,
    pub to_tag: Option<String>,
    /// A NOTIFY to send after the response (a new or refreshed subscription), with the
    /// subscription's lock, held from its change until that NOTIFY is answered.
    pub notify: Option<Box<(String, Sub, SubGuard)>>,
}

impl Reply {
    pub fn new(code: u16) -> Self {
        Self {
            code,
            ..Self::default()
        }
    }

    /// A response with a reason phrase saying what was wrong (CR and LF removed).
    pub fn why(code: u16, reason: impl Into<String>) -> Self {
        let r: String = reason.into();
        Self {
            code,
            reason: r.replace(['\r', '\n'], " "),
            ..Self::default()
        }
    }

    pub fn header(mut self, n: &str, v: impl Into<String>) -> Self {
        self.headers.push((n.into(), v.into()));
        self
    }
}

/// The option tags the edge supports (none beyond the base spec; `Require` of any is 420).
const SUPPORTED: &[&str] = &[];

/// A method name fit for a metric label or log field.
fn method_label(m: &str) -> &'static str {
    match m {
        "INVITE" => "INVITE",
        "ACK" => "ACK",
        "BYE" => "BYE",
        "CANCEL" => "CANCEL",
        "OPTIONS" => "OPTIONS",
        "MESSAGE" => "MESSAGE",
        "SUBSCRIBE" => "SUBSCRIBE",
        "NOTIFY" => "NOTIFY",
        "PUBLISH" => "PUBLISH",
        "REGISTER" => "REGISTER",
        _ => "other",
    }
}

/// Handles one request from a peer.
pub async fn request(edge: &Arc<SipEdge>, inc: Incoming) {
    let req = &inc.msg;
    let method = req.method().unwrap_or("");
    let label = method_label(method);
    let Some(tr) = edge.transport.get() else {
        return;
    };
    match edge.server.seen(req) {
        Seen::New => {}
        Seen::InProgress | Seen::AckAbsorbed => {
            metrics::counter!("fedrelay_sip_retransmissions_absorbed_total").increment(1);
            return;
        }
        Seen::Completed(st) => {
            metrics::counter!("fedrelay_sip_retransmissions_absorbed_total").increment(1);
            let b = st.bytes_for(req);
            let _ = send_bytes(edge, &inc, b).await;
            return;
        }
    }
    if method == "ACK" {
        outbound::ack_received(edge, req);
        return;
    }
    metrics::counter!("fedrelay_sip_requests_total", "method" => label).increment(1);
    let span = info_span!(
        "sip.request",
        method = label,
        code = tracing::field::Empty,
        relay_msg_id = tracing::field::Empty
    );
    let reply = async {
        let r = if edge.limiter.allow(inc.src.ip()) {
            handle(edge, &inc).await
        } else {
            metrics::counter!("fedrelay_sip_rate_limited_total").increment(1);
            Reply::why(503, "Rate limit exceeded").header("Retry-After", "1")
        };
        tracing::Span::current().record("code", r.code);
        debug!("request answered");
        r
    }
    .instrument(span)
    .await;
    let Reply {
        code,
        reason,
        headers,
        body,
        to_tag,
        notify,
    } = reply;
    // A 100 is never stored: the final answer is still to come.
    let to_tag = to_tag.or_else(|| {
        (code > 100 && req.to().and_then(|t| t.tag().map(str::to_string)).is_none())
            .then(super::txn::new_token)
    });
    let mut resp = req.response(code, &reason, to_tag.as_deref());
    for (n, v) in &headers {
        resp.push(n, v.clone());
    }
    if let Some((ct, b)) = body.map(|b| *b) {
        resp.push("Content-Type", ct);
        resp.body = b;
    }
    let plain = headers.is_empty() && resp.body.is_empty() && reason.is_empty();
    let bytes = Bytes::from(resp.to_bytes());
    let _ = tr;
    // The transaction completes before its answer leaves: a copy of the request that
    // arrives once the peer has the answer (over another transport, say) gets it again
    // instead of being taken for one still in progress.
    if code >= 200 {
        edge.server.complete(
            req,
            if plain {
                Stored::Plain { code, to_tag }
            } else {
                Stored::Full(bytes.clone())
            },
        );
    }
    let _ = send_bytes(edge, &inc, bytes.clone()).await;
    if method == "INVITE" && (200..300).contains(&code) && inc.transport == SipTransport::Udp {
        outbound::retransmit_2xx(edge.clone(), inc.src, req, bytes);
    }
    if let Some((key, sub, guard)) = notify.map(|n| *n) {
        let e = edge.clone();
        tokio::spawn(async move { outbound::notify_watcher(&e, &key, sub, guard).await });
    }
}

async fn send_bytes(edge: &Arc<SipEdge>, inc: &Incoming, b: Bytes) -> Result<(), ()> {
    let Some(tr) = edge.transport.get() else {
        return Err(());
    };
    if let Some(c) = &inc.conn {
        return c.send(b).await.map_err(|_| ());
    }
    // Over UDP: to the address and port the request came from, whether or not its Via asks
    // for it with `rport` (RFC 3581): peers behind NAT, and peers whose Via names a port
    // they do not read, still get their answers.
    tr.send_udp(inc.src, &b).await.map_err(|_| ())
}

/// The checks every request passes, then its method's handling.
async fn handle(edge: &Arc<SipEdge>, inc: &Incoming) -> Reply {
    let req = &inc.msg;
    if let Err(e) = req.check() {
        metrics::counter!("fedrelay_sip_malformed_total", "reason" => "grammar").increment(1);
        return Reply::why(400, format!("Bad Request: {e}"));
    }
    let method = req.method().unwrap_or("");
    if req
        .header("max-forwards")
        .and_then(|v| v.trim().parse::<u32>().ok())
        == Some(0)
    {
        return Reply::new(483);
    }
    match method {
        "MESSAGE" | "SUBSCRIBE" | "NOTIFY" | "PUBLISH" | "INVITE" | "BYE" | "CANCEL"
        | "OPTIONS" => {}
        "REGISTER" | "PRACK" | "UPDATE" | "REFER" | "INFO" => {
            return Reply::why(
                405,
                "Method Not Allowed: the relay is not a registrar or proxy",
            )
            .header("Allow", ALLOW);
        }
        _ => return Reply::new(501).header("Allow", ALLOW),
    }
    let Some(ruri) = req.uri().and_then(Uri::parse) else {
        return Reply::why(400, "Bad Request: unreadable Request-URI");
    };
    if !ruri.is_sip() {
        return Reply::new(416);
    }
    let unsupported: Vec<&str> = req
        .list("require")
        .into_iter()
        .chain(req.list("proxy-require"))
        .map(str::trim)
        .filter(|t| !SUPPORTED.iter().any(|s| s.eq_ignore_ascii_case(t)))
        .collect();
    if !unsupported.is_empty() && method != "CANCEL" {
        return Reply::new(420).header("Unsupported", unsupported.join(", "));
    }
    if let Some(enc) = req.header("content-encoding")
        && !enc.trim().eq_ignore_ascii_case("identity")
    {
        return Reply::why(415, "Unsupported Media Type: no content encodings")
            .header("Accept-Encoding", "identity");
    }
    // CANCEL, BYE and in-dialog requests name a dialog; everything else a person.
    let sender = match sender(edge, inc) {
        Ok(s) => s,
        Err(r) => return r,
    };
    if method == "CANCEL" {
        // INVITEs are answered at once: nothing is left to cancel (§9.2).
        return Reply::new(481);
    }
    if method == "BYE" {
        return outbound::bye_received(edge, req);
    }
    if method == "OPTIONS" {
        return Reply::new(200)
            .header("Allow", ALLOW)
            .header(
                "Accept",
                format!("{}, application/sdp, {}", codec::ACCEPT_IM, codec::CT_PIDF),
            )
            .header("Allow-Events", "presence");
    }
    if method == "PUBLISH" {
        return publish(edge, req, &sender, &ruri).await;
    }
    if method == "NOTIFY" {
        return outbound::notify_received(edge, req, &sender).await;
    }
    // Inside a dialog the Request-URI is the remote target the relay gave (its Contact,
    // `sip:alice@<relay host>`): the person is the one the dialog is with, the To URI
    // (RFC 3261 §12.2.1.1). Policy applies to them all the same.
    let to_uri = match req.to() {
        Some(t) if t.tag().is_some() => t.uri,
        _ => ruri,
    };
    let recipient = match target(edge, &sender, &to_uri) {
        Ok(r) => r,
        Err(r) => return r,
    };
    match method {
        "MESSAGE" => message(edge, req, &sender, &recipient).await,
        "INVITE" => invite(edge, inc, &sender, &recipient).await,
        "SUBSCRIBE" => subscribe(edge, inc, &sender, &recipient).await,
        _ => Reply::new(501).header("Allow", ALLOW),
    }
}

/// Who sent the request: the From user at a declared SIP peer domain that the connection
/// proves (TLS certificate, RFC 5922) or, over UDP/TCP, whose source address the peer's
/// config allows.
fn sender(edge: &SipEdge, inc: &Incoming) -> Result<Address, Reply> {
    let Some(from) = inc.msg.from() else {
        return Err(Reply::why(400, "Bad Request: unreadable From"));
    };
    if !from.uri.is_sip() {
        return Err(Reply::new(416));
    }
    let domain = from.uri.host.to_ascii_lowercase();
    let user = from.uri.user.clone().unwrap_or_default();
    if !edge.is_peer(&domain) {
        metrics::counter!("fedrelay_sip_refused_total", "reason" => "unknown_peer").increment(1);
        return Err(Reply::why(
            403,
            format!("Forbidden: {domain} is not a SIP domain this relay federates with"),
        ));
    }
    let proven = inc.proven_domains().contains(&domain)
        || (inc.transport != SipTransport::Tls
            && edge
                .sources
                .get(&domain)
                .is_some_and(|n| super::transport::allowed(n, inc.src.ip())));
    if !proven {
        metrics::counter!("fedrelay_sip_refused_total", "reason" => "unauthenticated").increment(1);
        return Err(Reply::why(
            403,
            format!("Forbidden: the connection does not prove the domain {domain}"),
        ));
    }
    if user.is_empty() {
        return Err(Reply::why(403, "Forbidden: the From URI names no user"));
    }
    Ok(Address::new("sip", domain, user))
}

/// The person a request is for: a user at a declared domain that policy lets the sender
/// reach.
fn target(edge: &SipEdge, sender: &Address, ruri: &Uri) -> Result<Address, Reply> {
    let domain = ruri.host.to_ascii_lowercase();
    let Some(platform) = edge.domains.get(&domain).copied() else {
        metrics::counter!("fedrelay_sip_refused_total", "reason" => "not_served").increment(1);
        edge.record_refusal(
            sender,
            &domain,
            ruri.user.as_deref().unwrap_or(""),
            "domain_not_served",
        );
        return Err(Reply::why(
            403,
            format!("Forbidden: this relay does not serve {domain}"),
        ));
    };
    let Some(user) = ruri.user.clone().filter(|u| !u.is_empty()) else {
        return Err(Reply::why(404, "Not Found: the Request-URI names no user"));
    };
    match edge.policy.check(&sender.domain, &domain) {
        Ok(p) => {
            debug_assert_eq!(p, platform);
            Ok(Address::new(p.as_str(), domain, user))
        }
        Err(e) => {
            edge.record_refusal(sender, &domain, &user, e.code());
            Err(Reply::why(403, format!("Forbidden: {e}")))
        }
    }
}

/// The answer to a session error.
pub(crate) fn session_error(e: &SessionError) -> Reply {
    match e {
        SessionError::NotAllowed(m) => Reply::why(403, format!("Forbidden: {m}")),
        SessionError::Invalid(m) => Reply::why(400, format!("Bad Request: {m}")),
        SessionError::UnknownTarget => Reply::why(404, "Not Found: unknown message"),
        // RFC 3261 §21.2.3: accepted, not yet delivered.
        SessionError::PendingApproval(_) => Reply::why(202, "Accepted: waiting for approval"),
        SessionError::RateLimited(_) => {
            Reply::why(503, "Service Unavailable: rate limited").header("Retry-After", "1")
        }
        _ => Reply::why(503, "Service Unavailable: try again").header("Retry-After", "1"),
    }
}

/// Journals one envelope; 200 once it is, else the error's answer.
pub(crate) async fn journal(edge: &SipEdge, env: fedrelay_proto::Envelope) -> Reply {
    match edge.submit(env).await {
        Ok(acc) => {
            tracing::Span::current().record("relay_msg_id", acc.relay_msg_id.as_str());
            debug!(
                seq = acc.seq,
                duplicate = acc.duplicate,
                "request journaled"
            );
            Reply::new(200)
        }
        Err(e) => {
            debug!(code = e.code(), "request not journaled");
            session_error(&e)
        }
    }
}

/// The envelope body of an IM request body, or the answer refusing it.
pub(crate) fn im_body(req: &Message) -> Result<v1::envelope::Body, Reply> {
    if req.body.is_empty() {
        return Err(Reply::why(400, "Bad Request: the MESSAGE has no body"));
    }
    let ct = req
        .content_type()
        .ok_or_else(|| Reply::why(400, "Bad Request: no Content-Type"))?;
    match codec::im_body(&ct.mime, &ct.params, &req.body) {
        Ok(ImBody::Text(t)) => Ok(v1::envelope::Body::Text(t)),
        Ok(ImBody::Typing(active)) => Ok(v1::envelope::Body::Typing(v1::Typing { active })),
        Err(BodyError::Unsupported(_)) => Err(Reply::new(415).header("Accept", codec::ACCEPT_IM)),
        Err(BodyError::Malformed(m)) => Err(Reply::why(400, format!("Bad Request: {m}"))),
    }
}

/// The pager-mode message id: Call-ID and CSeq number (RFC 3428 has no other).
pub(crate) fn native_id(req: &Message) -> String {
    format!(
        "{}/{}",
        req.call_id().unwrap_or(""),
        req.cseq().map(|c| c.seq).unwrap_or(0)
    )
}

async fn message(edge: &Arc<SipEdge>, req: &Message, sender: &Address, to: &Address) -> Reply {
    let in_dialog = req.to().is_some_and(|t| t.tag().is_some());
    // In a dialog: an IM session of this sender with this recipient, else 481.
    if in_dialog
        && !edge
            .im
            .session(req.call_id().unwrap_or(""))
            .is_some_and(|s| s.sip == *sender && s.relay == *to)
    {
        return Reply::new(481);
    }
    let body = match im_body(req) {
        Ok(b) => b,
        Err(r) => return r,
    };
    journal(edge, SipEdge::envelope(sender, to, native_id(req), body)).await
}

async fn invite(edge: &Arc<SipEdge>, inc: &Incoming, sender: &Address, to: &Address) -> Reply {
    let req = &inc.msg;
    let call_id = req.call_id().unwrap_or("").to_string();
    if req.to().is_some_and(|t| t.tag().is_some()) {
        // A re-INVITE: the session goes on as it was.
        return match edge.im.session(&call_id) {
            Some(s) => outbound::session_answer(edge, inc.transport, &s),
            None => Reply::new(481),
        };
    }
    if !req.body.is_empty()
        && req
            .content_type()
            .is_none_or(|c| c.mime != "application/sdp")
    {
        return Reply::new(415).header("Accept", "application/sdp");
    }
    let is_im = std::str::from_utf8(&req.body).is_ok_and(|sdp| {
        sdp.lines()
            .any(|l| l.starts_with("m=message ") || l.starts_with("m=x-ms-message "))
    });
    if !is_im {
        return Reply::why(488, "Not Acceptable Here: only instant-message sessions").header(
            "Warning",
            format!(
                "304 {} \"Media type not available\"",
                edge.sent_by(inc.transport)
            ),
        );
    }
    // Skype for Business may carry the first message in the INVITE (Ms-Text-Format).
    if let Some(first) = req.header("ms-text-format").and_then(codec::ms_text_format) {
        let r = journal(
            edge,
            SipEdge::envelope(sender, to, native_id(req), v1::envelope::Body::Text(first)),
        )
        .await;
        if r.code != 200 {
            return r;
        }
    }
    let s = edge.im.accept(req, sender, to, inc.transport);
    outbound::session_answer(edge, inc.transport, &s)
}

async fn subscribe(edge: &Arc<SipEdge>, inc: &Incoming, sender: &Address, to: &Address) -> Reply {
    let req = &inc.msg;
    let event = req.header("event").map(|e| {
        e.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    });
    if event.as_deref() != Some("presence") {
        return Reply::new(489).header("Allow-Events", "presence");
    }
    if !codec::accepts_pidf(req.header("accept")) {
        return Reply::new(406).header("Accept", codec::CT_PIDF);
    }
    let expires = match req.header("expires").map(|e| e.trim().parse::<u32>()) {
        None => 3600,
        Some(Ok(e)) => e,
        Some(Err(_)) => return Reply::why(400, "Bad Request: Expires"),
    };
    if expires != 0 && expires < 60 {
        return Reply::new(423).header("Min-Expires", "60");
    }
    let expires = expires.min(edge.cfg.max_subscription_secs);
    outbound::watcher_subscribe(edge, inc, sender, to, expires).await
}

async fn publish(edge: &Arc<SipEdge>, req: &Message, sender: &Address, ruri: &Uri) -> Reply {
    let event = req.header("event").map(|e| {
        e.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    });
    if event.as_deref() != Some("presence") {
        return Reply::new(489).header("Allow-Events", "presence");
    }
    // A peer publishes its own users' presence, not anyone else's.
    if !ruri.host.eq_ignore_ascii_case(&sender.domain)
        || ruri.user.as_deref() != Some(sender.user.as_str())
    {
        return Reply::why(403, "Forbidden: PUBLISH for someone other than the sender");
    }
    let expires = req
        .header("expires")
        .and_then(|e| e.trim().parse::<u32>().ok())
        .unwrap_or(3600)
        .min(edge.cfg.max_subscription_secs);
    let etag = req
        .header("sip-if-match")
        .map(str::to_string)
        .unwrap_or_else(super::txn::new_token);
    let presence = if req.body.is_empty() {
        if req.header("sip-if-match").is_none() {
            return Reply::why(400, "Bad Request: PUBLISH without a body or SIP-If-Match");
        }
        if expires != 0 {
            // A refresh: nothing changed.
            return Reply::new(200)
                .header("SIP-ETag", etag)
                .header("Expires", expires.to_string());
        }
        v1::Presence {
            availability: v1::presence::Availability::Offline as i32,
            note: String::new(),
        }
    } else {
        if req.content_type().map(|c| c.mime) != Some(codec::CT_PIDF.to_string()) {
            return Reply::new(415).header("Accept", codec::CT_PIDF);
        }
        match codec::parse_pidf(&req.body) {
            Some(p) => p,
            None => return Reply::why(400, "Bad Request: not a PIDF document"),
        }
    };
    let r = journal(edge, outbound::presence_envelope(sender, presence)).await;
    if r.code != 200 {
        return r;
    }
    Reply::new(200)
        .header("SIP-ETag", etag)
        .header("Expires", expires.to_string())
}
