//! Deliveries to SIP users, and the dialogs behind them.
//!
//! - Text and typing go as `MESSAGE` (pager mode, RFC 3428), or inside an IM session
//!   (INVITE with `m=message`, then in-dialog MESSAGE) when the peer is configured for
//!   sessions or the SIP user opened one.
//! - A contact request is a presence `SUBSCRIBE` from the relay user to the SIP user: the
//!   SIP user's server answers with NOTIFYs whose `Subscription-State` says accepted
//!   (`active`), still to decide (`pending`) or declined (`terminated;reason=rejected`), or
//!   refuses the SUBSCRIBE at once (403/603, declined).
//! - A SIP user's SUBSCRIBE to a relay user is that user's contact request (202, NOTIFY
//!   `pending`) unless they are already contacts (200, NOTIFY `active`); the relay user's
//!   answer becomes NOTIFY `active` with PIDF or `terminated;reason=rejected`. Presence
//!   updates then go as NOTIFY on that subscription.
//!
//! Subscriptions are kept in the store (they outlive a node); the relay refreshes its own
//! before they expire and ends the SIP users' ones that were not refreshed.

use super::inbound::{self, Reply};
use super::msg::{Message, NameAddr, Uri};
use super::transport::Incoming;
use super::{SendError, SipEdge, codec, txn};
use crate::config::{SipImMode, SipTransport};
use bytes::Bytes;
use fedrelay_proto::{Address, Envelope, v1};
use serde::{Deserialize, Serialize};
use session_actor::DeliveryError;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tracing::debug;
use v1::envelope::Body;

/// `sip:user@domain` of an address (the user part %-escaped where the grammar needs it).
pub fn aor(a: &Address) -> String {
    Uri {
        scheme: "sip".into(),
        user: Some(a.user.clone()),
        password: None,
        host: a.domain.clone(),
        port: None,
        params: Vec::new(),
        headers: Vec::new(),
        opaque: None,
    }
    .address_of_record()
}

/// The store field for a (relay user, SIP user) pair.
fn pair(relay: &Address, sip: &Address) -> String {
    format!(
        "{}/{}@{}|{}@{}",
        relay.platform, relay.user, relay.domain, sip.user, sip.domain
    )
}

/// A presence subscription dialog, as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sub {
    pub call_id: String,
    pub local_tag: String,
    pub remote_tag: Option<String>,
    /// The relay user and the SIP user.
    pub relay: (String, String, String),
    pub sip: (String, String),
    /// Where in-dialog requests go (the peer's Contact).
    pub target: String,
    pub cseq: u32,
    pub expires_at_ms: i64,
    /// `pending`, `active`.
    pub state: String,
    /// The relay's own reciprocal subscription, made when its user accepted: its becoming
    /// active is not news to anyone.
    #[serde(default)]
    pub auto: bool,
}

impl Sub {
    pub fn relay_addr(&self) -> Address {
        Address::new(
            self.relay.0.clone(),
            self.relay.1.clone(),
            self.relay.2.clone(),
        )
    }

    pub fn sip_addr(&self) -> Address {
        Address::new("sip", self.sip.1.clone(), self.sip.0.clone())
    }

    fn key(&self) -> String {
        pair(&self.relay_addr(), &self.sip_addr())
    }
}

fn now_ms() -> i64 {
    crate::edges::now_ms()
}

/// An IM session (an INVITE dialog carrying MESSAGEs).
#[derive(Debug)]
pub struct ImSession {
    pub call_id: String,
    pub local_tag: String,
    pub remote_tag: String,
    pub relay: Address,
    pub sip: Address,
    pub target: String,
    pub transport: SipTransport,
    pub cseq: AtomicU32,
    pub acked: Notify,
}

/// The IM sessions of this node, by Call-ID and by pair of users.
#[derive(Debug, Default)]
pub struct ImSessions {
    by_call: Mutex<HashMap<String, Arc<ImSession>>>,
    by_pair: Mutex<HashMap<String, String>>,
}

impl ImSessions {
    pub fn knows(&self, call_id: &str) -> bool {
        self.session(call_id).is_some()
    }

    pub fn session(&self, call_id: &str) -> Option<Arc<ImSession>> {
        self.by_call.lock().ok()?.get(call_id).cloned()
    }

    fn for_pair(&self, relay: &Address, sip: &Address) -> Option<Arc<ImSession>> {
        let id = self.by_pair.lock().ok()?.get(&pair(relay, sip)).cloned()?;
        self.session(&id)
    }

    fn insert(&self, s: Arc<ImSession>) {
        if let Ok(mut p) = self.by_pair.lock() {
            p.insert(pair(&s.relay, &s.sip), s.call_id.clone());
        }
        if let Ok(mut c) = self.by_call.lock() {
            c.insert(s.call_id.clone(), s);
        }
    }

    fn remove(&self, call_id: &str) -> Option<Arc<ImSession>> {
        let s = self.by_call.lock().ok()?.remove(call_id)?;
        if let Ok(mut p) = self.by_pair.lock() {
            let k = pair(&s.relay, &s.sip);
            if p.get(&k).is_some_and(|c| *c == s.call_id) {
                p.remove(&k);
            }
        }
        Some(s)
    }

    /// Accepts a SIP user's INVITE for an IM session.
    pub fn accept(
        &self,
        req: &Message,
        sip: &Address,
        relay: &Address,
        transport: SipTransport,
    ) -> Arc<ImSession> {
        let call_id = req.call_id().unwrap_or("").to_string();
        let target = req
            .header("contact")
            .and_then(NameAddr::parse)
            .map(|c| c.uri.to_string())
            .unwrap_or_else(|| aor(sip));
        let s = Arc::new(ImSession {
            call_id,
            local_tag: txn::new_token(),
            remote_tag: req
                .from()
                .and_then(|f| f.tag().map(str::to_string))
                .unwrap_or_default(),
            relay: relay.clone(),
            sip: sip.clone(),
            target,
            transport,
            cseq: AtomicU32::new(1),
            acked: Notify::new(),
        });
        self.insert(s.clone());
        s
    }
}

/// Locks per stored subscription (by kind, `w` or `s`, and pair of users). Whoever reads,
/// changes and writes a subscription holds its lock; for a watcher's subscription, until the
/// NOTIFY telling the change is answered. So NOTIFYs go out one at a time, in the order of
/// the states they report and with growing CSeq numbers, and a NOTIFY cannot report a state
/// that another task has changed or ended meanwhile (a `pending` after a `rejected`).
#[derive(Debug, Default)]
pub struct SubLocks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl SubLocks {
    /// Waits for the lock of `kind`'s subscription `key`.
    pub(crate) async fn lock(self: &Arc<Self>, kind: &str, key: &str) -> SubGuard {
        let name = format!("{kind}|{key}");
        let m = self
            .0
            .lock()
            .map(|mut m| m.entry(name.clone()).or_default().clone())
            .unwrap_or_default();
        SubGuard {
            guard: Some(m.lock_owned().await),
            locks: self.clone(),
            name,
        }
    }
}

/// A held subscription lock; the entry goes when nobody holds or waits for it.
#[derive(Debug)]
pub struct SubGuard {
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    locks: Arc<SubLocks>,
    name: String,
}

impl Drop for SubGuard {
    fn drop(&mut self) {
        self.guard.take();
        if let Ok(mut m) = self.locks.0.lock()
            && m.get(&self.name).is_some_and(|l| Arc::strong_count(l) == 1)
        {
            m.remove(&self.name);
        }
    }
}

/// The SDP of the relay's side of an IM session.
fn sdp(edge: &SipEdge, t: SipTransport) -> String {
    let sent_by = edge.sent_by(t);
    let (host, port) = sent_by.rsplit_once(':').unwrap_or((&sent_by, "5060"));
    let v = rand::random::<u32>();
    format!(
        "v=0\r\no=- {v} {v} IN IP4 {host}\r\ns=-\r\nc=IN IP4 {host}\r\nt=0 0\r\nm=message {port} sip null\r\na=accept-types:text/plain text/html application/im-iscomposing+xml\r\n"
    )
}

/// The relay's Contact for a user.
fn contact(edge: &SipEdge, user: &str, t: SipTransport) -> String {
    let tp = match t {
        SipTransport::Udp => "",
        SipTransport::Tcp => ";transport=tcp",
        SipTransport::Tls => ";transport=tls",
    };
    let u = Uri {
        scheme: "sip".into(),
        user: Some(user.to_string()),
        password: None,
        host: edge.sent_by(t),
        port: None,
        params: Vec::new(),
        headers: Vec::new(),
        opaque: None,
    }
    .address_of_record();
    format!("<{u}{tp}>")
}

/// The 200 to an IM session's INVITE.
pub(crate) fn session_answer(edge: &SipEdge, t: SipTransport, s: &ImSession) -> Reply {
    let mut r = Reply::new(200).header("Contact", contact(edge, &s.relay.user, t));
    r.to_tag = Some(s.local_tag.clone());
    r.body = Some(Box::new((
        "application/sdp".into(),
        sdp(edge, t).into_bytes(),
    )));
    r
}

/// Over UDP a 2xx to an INVITE is sent again until its ACK arrives (§13.3.1.4).
pub(crate) fn retransmit_2xx(edge: Arc<SipEdge>, src: SocketAddr, req: &Message, bytes: Bytes) {
    let Some(s) = req.call_id().and_then(|c| edge.im.session(c)) else {
        return;
    };
    let to = src;
    tokio::spawn(async move {
        let t1 = edge.t1();
        let mut wait = t1;
        let deadline = tokio::time::Instant::now() + t1 * 64;
        loop {
            tokio::select! {
                _ = s.acked.notified() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                // Never acknowledged: the session is over (§13.3.1.4).
                edge.im.remove(&s.call_id);
                return;
            }
            if let Some(tr) = edge.transport.get() {
                let _ = tr.send_udp(to, &bytes).await;
            }
            wait = (wait * 2).min(Duration::from_secs(4));
        }
    });
}

/// An ACK outside any transaction: the ACK of a 2xx to an IM session's INVITE.
pub(crate) fn ack_received(edge: &SipEdge, req: &Message) {
    if let Some(s) = req.call_id().and_then(|c| edge.im.session(c)) {
        s.acked.notify_one();
    }
}

pub(crate) fn bye_received(edge: &SipEdge, req: &Message) -> Reply {
    match req.call_id().and_then(|c| edge.im.remove(c)) {
        Some(_) => Reply::new(200),
        None => Reply::new(481),
    }
}

/// A presence envelope from a SIP user to their followers.
pub(crate) fn presence_envelope(sender: &Address, p: v1::Presence) -> Envelope {
    let mut env = SipEdge::envelope(
        sender,
        sender,
        format!("presence:{}", uuid::Uuid::now_v7()),
        Body::Presence(p),
    );
    env.recipients.clear();
    env
}

/// The relay user's last presence, as the SIP edge last saw it (offline when never seen).
async fn last_presence(edge: &SipEdge, relay: &Address) -> v1::Presence {
    let field = format!("{}/{}@{}", relay.platform, relay.user, relay.domain);
    edge.kv_get("p", &field)
        .await
        .ok()
        .flatten()
        .and_then(|s| {
            let (a, note) = s.split_once('|')?;
            Some(v1::Presence {
                availability: a.parse().ok()?,
                note: note.to_string(),
            })
        })
        .unwrap_or(v1::Presence {
            availability: v1::presence::Availability::Offline as i32,
            note: String::new(),
        })
}

fn state_err(e: crate::edges::teams::state::StateError) -> DeliveryError {
    DeliveryError::internal("sip_state", e.to_string())
}

async fn load(edge: &SipEdge, kind: &str, key: &str) -> Option<Sub> {
    edge.kv_get(kind, key)
        .await
        .ok()
        .flatten()
        .and_then(|s| serde_json::from_str(&s).ok())
}

async fn save(edge: &SipEdge, kind: &str, sub: &Sub) -> Result<(), DeliveryError> {
    let ttl = Duration::from_millis((sub.expires_at_ms - now_ms()).max(0) as u64 + 3_600_000);
    let v = serde_json::to_string(sub)
        .map_err(|e| DeliveryError::internal("sip_state", e.to_string()))?;
    edge.kv_set(kind, &sub.key(), &v, Some(ttl))
        .await
        .map_err(state_err)?;
    if kind == "s" {
        edge.kv_set("sc", &sub.call_id, &sub.key(), Some(ttl))
            .await
            .map_err(state_err)?;
    }
    Ok(())
}

async fn drop_sub(edge: &SipEdge, kind: &str, sub: &Sub) {
    let _ = edge.kv_del(kind, &sub.key()).await;
    if kind == "s" {
        let _ = edge.kv_del("sc", &sub.call_id).await;
    }
}

async fn is_contact(edge: &SipEdge, relay: &Address, sip: &Address) -> bool {
    edge.kv_get("c", &pair(relay, sip))
        .await
        .ok()
        .flatten()
        .is_some()
}

async fn set_contact(edge: &SipEdge, relay: &Address, sip: &Address, yes: bool) {
    let k = pair(relay, sip);
    let _ = if yes {
        edge.kv_set("c", &k, "1", None).await
    } else {
        edge.kv_del("c", &k).await
    };
}

/// A SIP user's SUBSCRIBE to a relay user's presence (new, refreshed or ended).
pub(crate) async fn watcher_subscribe(
    edge: &Arc<SipEdge>,
    inc: &Incoming,
    sip: &Address,
    relay: &Address,
    expires: u32,
) -> Reply {
    let req = &inc.msg;
    let key = pair(relay, sip);
    let guard = edge.sub_locks.lock("w", &key).await;
    let call_id = req.call_id().unwrap_or("").to_string();
    let in_dialog = req.to().is_some_and(|t| t.tag().is_some());
    let existing = load(edge, "w", &key).await.filter(|s| s.call_id == call_id);
    let target = req
        .header("contact")
        .and_then(NameAddr::parse)
        .map(|c| c.uri.to_string())
        .unwrap_or_else(|| aor(sip));
    let mut sub = match (existing, in_dialog) {
        (Some(s), _) => s,
        (None, true) => return Reply::new(481),
        (None, false) => Sub {
            call_id,
            local_tag: txn::new_token(),
            remote_tag: req.from().and_then(|f| f.tag().map(str::to_string)),
            relay: (
                relay.platform.clone(),
                relay.domain.clone(),
                relay.user.clone(),
            ),
            sip: (sip.user.clone(), sip.domain.clone()),
            target: target.clone(),
            cseq: 0,
            expires_at_ms: 0,
            state: String::new(),
            auto: false,
        },
    };
    sub.target = target;
    sub.expires_at_ms = now_ms() + i64::from(expires) * 1000;
    let contact_hdr = contact(edge, &relay.user, inc.transport);
    if expires == 0 {
        drop_sub(edge, "w", &sub).await;
        sub.state = "terminated".into();
        let mut r = Reply::new(200)
            .header("Expires", "0")
            .header("Contact", contact_hdr);
        r.to_tag = Some(sub.local_tag.clone());
        r.notify = Some(Box::new((key, sub, guard)));
        return r;
    }
    let code = if sub.state == "active" || is_contact(edge, relay, sip).await {
        sub.state = "active".into();
        200
    } else {
        if sub.state.is_empty() {
            // A new request to become contacts: journaled before it is acknowledged.
            let env = SipEdge::envelope(
                sip,
                relay,
                format!("subscribe:{}", sub.call_id),
                Body::ContactRequest(v1::ContactRequest {
                    note: req
                        .header("subject")
                        .unwrap_or("")
                        .chars()
                        .take(200)
                        .collect(),
                }),
            );
            let r = inbound::journal(edge, env).await;
            // 202: held for an administrator's approval; the subscription waits pending.
            if r.code != 200 && r.code != 202 {
                return r;
            }
        }
        sub.state = "pending".into();
        202
    };
    if let Err(e) = save(edge, "w", &sub).await {
        debug!(code = %e.code, "subscription not saved");
        return inbound::session_error(&session_actor::SessionError::Unavailable(e.detail));
    }
    let mut r = Reply::new(code)
        .header("Expires", expires.to_string())
        .header("Contact", contact_hdr);
    r.to_tag = Some(sub.local_tag.clone());
    r.notify = Some(Box::new((key, sub, guard)));
    r
}

/// Sends the NOTIFY of a watcher subscription's current state, still under the lock taken
/// when the state was set.
pub(crate) async fn notify_watcher(edge: &Arc<SipEdge>, key: &str, sub: Sub, _guard: SubGuard) {
    let presence = if sub.state == "active" {
        Some(last_presence(edge, &sub.relay_addr()).await)
    } else {
        None
    };
    if let Err(e) = send_notify(edge, key, sub, presence.as_ref(), None).await {
        debug!(code = %e.code, "notify not delivered");
    }
}

/// A request in the dialog of a presence subscription, from the relay user to the SIP user:
/// Request-URI, From, To, Call-ID, CSeq, Contact and `Event: presence`.
fn in_subscription(edge: &SipEdge, sub: &Sub, method: &str) -> Message {
    let relay = sub.relay_addr();
    let sip = sub.sip_addr();
    let t = edge.transport_for(&sip.domain);
    let mut m = Message::request(method, &sub.target);
    m.push("From", format!("<{}>;tag={}", aor(&relay), sub.local_tag));
    m.push(
        "To",
        match &sub.remote_tag {
            Some(tag) => format!("<{}>;tag={tag}", aor(&sip)),
            None => format!("<{}>", aor(&sip)),
        },
    );
    m.push("Call-ID", sub.call_id.clone());
    m.push("CSeq", format!("{} {method}", sub.cseq));
    m.push("Contact", contact(edge, &relay.user, t));
    m.push("Event", "presence");
    m
}

/// A NOTIFY in a watcher subscription; `reason` ends it. The caller holds its lock.
async fn send_notify(
    edge: &Arc<SipEdge>,
    key: &str,
    mut sub: Sub,
    presence: Option<&v1::Presence>,
    reason: Option<&str>,
) -> Result<(), DeliveryError> {
    let relay = sub.relay_addr();
    let sip = sub.sip_addr();
    sub.cseq += 1;
    let left = ((sub.expires_at_ms - now_ms()) / 1000).max(0);
    let state = match reason {
        Some(r) => format!("terminated;reason={r}"),
        None if left == 0 => "terminated;reason=timeout".to_string(),
        None => format!("{};expires={left}", sub.state),
    };
    if reason.is_none() && left > 0 {
        save(edge, "w", &sub).await?;
    } else {
        drop_sub(edge, "w", &sub).await;
    }
    let mut m = in_subscription(edge, &sub, "NOTIFY");
    m.push("Subscription-State", state);
    if let Some(p) = presence.filter(|_| sub.state == "active" && reason.is_none()) {
        m.push("Content-Type", codec::CT_PIDF);
        m.body = codec::pidf(&aor(&relay), p).into_bytes();
    }
    match edge.send_request(&sip.domain, m).await {
        Ok(_) => Ok(()),
        Err(SendError::Status(481, _)) => {
            // The watcher forgot the subscription.
            let _ = edge.kv_del("w", key).await;
            Ok(())
        }
        Err(e) => Err(e.to_delivery()),
    }
}

/// A NOTIFY for one of the relay's own subscriptions: the SIP user's answer to a contact
/// request, and their presence.
pub(crate) async fn notify_received(edge: &Arc<SipEdge>, req: &Message, sip: &Address) -> Reply {
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
    let call_id = req.call_id().unwrap_or("");
    let Some(key) = edge.kv_get("sc", call_id).await.ok().flatten() else {
        return Reply::new(481);
    };
    let _guard = edge.sub_locks.lock("s", &key).await;
    let Some(mut sub) = load(edge, "s", &key).await else {
        return Reply::new(481);
    };
    if sub.sip_addr() != *sip || sub.call_id != call_id {
        return Reply::new(481);
    }
    let relay = sub.relay_addr();
    let state = req.header("subscription-state").unwrap_or("");
    let mut parts = state.split(';');
    let value = parts.next().unwrap_or("").trim().to_ascii_lowercase();
    let reason = parts
        .find_map(|p| p.trim().strip_prefix("reason="))
        .unwrap_or("")
        .to_ascii_lowercase();
    if sub.remote_tag.is_none() {
        sub.remote_tag = req.from().and_then(|f| f.tag().map(str::to_string));
    }
    if let Some(c) = req.header("contact").and_then(NameAddr::parse) {
        sub.target = c.uri.to_string();
    }
    let was = sub.state.clone();
    match value.as_str() {
        "active" => {
            if was != "active" && !sub.auto {
                let env = SipEdge::envelope(
                    sip,
                    &relay,
                    format!("notify:{call_id}:accepted"),
                    Body::ContactResponse(v1::ContactResponse { accepted: true }),
                );
                let r = inbound::journal(edge, env).await;
                if r.code != 200 {
                    return r;
                }
            }
            set_contact(edge, &relay, sip, true).await;
            sub.state = "active".into();
            if let Err(e) = save(edge, "s", &sub).await {
                return inbound::session_error(&session_actor::SessionError::Unavailable(e.detail));
            }
        }
        "pending" => {
            sub.state = "pending".into();
            if let Err(e) = save(edge, "s", &sub).await {
                return inbound::session_error(&session_actor::SessionError::Unavailable(e.detail));
            }
        }
        "terminated" => {
            if reason == "rejected" || (was == "active" && reason == "noresource") {
                let env = SipEdge::envelope(
                    sip,
                    &relay,
                    format!("notify:{call_id}:declined"),
                    Body::ContactResponse(v1::ContactResponse { accepted: false }),
                );
                let r = inbound::journal(edge, env).await;
                if r.code != 200 {
                    return r;
                }
                set_contact(edge, &relay, sip, false).await;
                drop_sub(edge, "s", &sub).await;
                return Reply::new(200);
            }
            drop_sub(edge, "s", &sub).await;
            if matches!(
                reason.as_str(),
                "deactivated" | "timeout" | "probation" | ""
            ) {
                // Subscribe again (RFC 6665 §4.1.3), as a contact already.
                let e = edge.clone();
                tokio::spawn(async move {
                    if let Err(err) = subscribe_to(&e, &relay, &sub.sip_addr(), true).await {
                        debug!(code = %err.code, "resubscription failed");
                    }
                });
            }
            return Reply::new(200);
        }
        _ => return Reply::why(400, "Bad Request: Subscription-State"),
    }
    if value == "active" && !req.body.is_empty() {
        if req.content_type().map(|c| c.mime) != Some(codec::CT_PIDF.to_string()) {
            return Reply::new(415).header("Accept", codec::CT_PIDF);
        }
        let Some(p) = codec::parse_pidf(&req.body) else {
            return Reply::why(400, "Bad Request: not a PIDF document");
        };
        return inbound::journal(edge, presence_envelope(sip, p)).await;
    }
    Reply::new(200)
}

/// The relay user subscribes to the SIP user's presence: a contact request, or (`auto`)
/// the relay's side of a contact already agreed.
async fn subscribe_to(
    edge: &Arc<SipEdge>,
    relay: &Address,
    sip: &Address,
    auto: bool,
) -> Result<(), DeliveryError> {
    let t = edge.transport_for(&sip.domain);
    let mut sub = Sub {
        call_id: format!("{}@{}", txn::new_token(), edge.sent_by(t)),
        local_tag: txn::new_token(),
        remote_tag: None,
        relay: (
            relay.platform.clone(),
            relay.domain.clone(),
            relay.user.clone(),
        ),
        sip: (sip.user.clone(), sip.domain.clone()),
        target: aor(sip),
        cseq: 1,
        expires_at_ms: now_ms() + 3_600_000,
        state: "pending".into(),
        auto,
    };
    // Saved first: the NOTIFY may come before the 2xx.
    save(edge, "s", &sub).await?;
    match send_subscribe(edge, &sub, 3600).await {
        Ok(resp) => {
            // The NOTIFY may have come first and updated the stored dialog meanwhile, or
            // ended it (declined; or another subscription took its place): an ended
            // subscription is not stored again.
            let _guard = edge.sub_locks.lock("s", &sub.key()).await;
            match edge.kv_get("s", &sub.key()).await {
                Ok(None) => return Ok(()),
                Ok(Some(cur)) => match serde_json::from_str::<Sub>(&cur) {
                    Ok(cur) if cur.call_id != sub.call_id => return Ok(()),
                    Ok(cur) => sub = cur,
                    Err(_) => {}
                },
                Err(_) => {}
            }
            if sub.remote_tag.is_none() {
                sub.remote_tag = txn::to_tag(&resp);
            }
            if let Some(c) = resp.header("contact").and_then(NameAddr::parse) {
                sub.target = c.uri.to_string();
            }
            let granted = resp
                .header("expires")
                .and_then(|e| e.trim().parse::<i64>().ok())
                .unwrap_or(3600)
                .clamp(60, 86_400);
            sub.expires_at_ms = now_ms() + granted * 1000;
            save(edge, "s", &sub).await
        }
        Err(SendError::Status(code @ (403 | 603), _)) if !auto => {
            drop_sub(edge, "s", &sub).await;
            // Declined at once: the answer goes back to the relay user.
            let env = SipEdge::envelope(
                sip,
                relay,
                format!("subscribe:{}:{code}", sub.call_id),
                Body::ContactResponse(v1::ContactResponse { accepted: false }),
            );
            let e = edge.clone();
            tokio::spawn(async move {
                if let Err(err) = e.submit(env).await {
                    debug!(code = err.code(), "decline not journaled");
                }
            });
            Ok(())
        }
        Err(e) => {
            drop_sub(edge, "s", &sub).await;
            Err(e.to_delivery())
        }
    }
}

/// A SUBSCRIBE in (or opening) the dialog of `sub`.
async fn send_subscribe(
    edge: &Arc<SipEdge>,
    sub: &Sub,
    expires: u32,
) -> Result<Message, SendError> {
    let sip = sub.sip_addr();
    let mut m = in_subscription(edge, sub, "SUBSCRIBE");
    m.push("Accept", codec::CT_PIDF);
    m.push("Expires", expires.to_string());
    edge.send_request(&sip.domain, m).await
}

/// Refreshes the relay's subscriptions before they expire and ends the SIP users' ones that
/// expired, every `period`.
pub(crate) async fn refresh_loop(edge: Arc<SipEdge>, mut stop: watch::Receiver<bool>) {
    let period = Duration::from_secs(30);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.changed() => return,
        }
        let now = now_ms();
        if let Ok(all) = edge.kv_all("s").await {
            for v in all.values() {
                let Ok(mut sub) = serde_json::from_str::<Sub>(v) else {
                    continue;
                };
                // Refreshed when less than a quarter of an hour's lifetime (or two minutes) is left.
                if sub.expires_at_ms - now > 120_000 {
                    continue;
                }
                sub.cseq += 1;
                let result = send_subscribe(&edge, &sub, 3600).await;
                // Stored again as it is now (a NOTIFY may have changed or ended it meanwhile),
                // with the refresh's CSeq and expiry.
                let _guard = edge.sub_locks.lock("s", &sub.key()).await;
                let Some(mut cur) = load(&edge, "s", &sub.key())
                    .await
                    .filter(|c| c.call_id == sub.call_id)
                else {
                    continue;
                };
                cur.cseq = cur.cseq.max(sub.cseq);
                match result {
                    Ok(resp) => {
                        let granted = resp
                            .header("expires")
                            .and_then(|e| e.trim().parse::<i64>().ok())
                            .unwrap_or(3600)
                            .clamp(60, 86_400);
                        cur.expires_at_ms = now_ms() + granted * 1000;
                        let _ = save(&edge, "s", &cur).await;
                    }
                    Err(e) => {
                        debug!(error = ?e, "subscription refresh failed");
                        if cur.expires_at_ms <= now {
                            drop_sub(&edge, "s", &cur).await;
                        } else {
                            let _ = save(&edge, "s", &cur).await;
                        }
                    }
                }
            }
        }
        if let Ok(all) = edge.kv_all("w").await {
            for (k, v) in all {
                let Ok(sub) = serde_json::from_str::<Sub>(&v) else {
                    continue;
                };
                if sub.expires_at_ms > now {
                    continue;
                }
                // Looked at again under the lock: a refresh may have come meanwhile.
                let _guard = edge.sub_locks.lock("w", &k).await;
                if let Some(sub) = load(&edge, "w", &k)
                    .await
                    .filter(|s| s.call_id == sub.call_id && s.expires_at_ms <= now)
                {
                    let _ = send_notify(&edge, &k, sub, None, Some("timeout")).await;
                }
            }
        }
    }
}

/// Delivers one envelope to a SIP user.
pub(crate) async fn deliver_one(
    edge: &Arc<SipEdge>,
    to: &Address,
    env: &Envelope,
) -> Result<Option<String>, DeliveryError> {
    let Some(body) = env.body.as_ref() else {
        return Ok(None);
    };
    let sender = env.sender.clone().unwrap_or_default();
    let text = |s: String| {
        Some(Body::Text(v1::Text {
            plain: s,
            rich: Vec::new(),
        }))
    };
    // What goes as a MESSAGE: SIP has no edits, reactions or deletions, so they are told.
    let im: Option<Body> = match body {
        Body::Text(_) | Body::Typing(_) => Some(body.clone()),
        Body::File(f) => text(format!("{} ({})", f.url, f.name)),
        Body::Edit(e) => text(format!(
            "✏️ {}",
            e.new_body.as_ref().map(|t| t.plain.as_str()).unwrap_or("")
        )),
        Body::Delete(_) => text("(deleted a message)".into()),
        Body::Reaction(r) if r.added => text(format!("reacted {}", r.emoji)),
        Body::Reaction(_) => None,
        Body::ChannelInvite(c) => text(format!(
            "invited you to the channel {} ({})",
            c.channel_name, c.channel_id
        )),
        Body::Membership(m) => {
            let verb = match v1::membership::Change::try_from(m.change) {
                Ok(v1::membership::Change::Left) => "left",
                _ => "joined",
            };
            text(format!("{verb} the conversation"))
        }
        Body::Error(e) => text(format!(
            "⚠️ A message could not be delivered ({}): {}",
            e.code, e.detail
        )),
        _ => None,
    };
    if let Some(b) = im {
        return send_im(edge, &sender, to, env, &b).await;
    }
    match body {
        Body::Presence(p) => {
            let field = format!("{}/{}@{}", sender.platform, sender.user, sender.domain);
            edge.kv_set("p", &field, &format!("{}|{}", p.availability, p.note), None)
                .await
                .map_err(state_err)?;
            let key = pair(&sender, to);
            let _guard = edge.sub_locks.lock("w", &key).await;
            if let Some(sub) = load(edge, "w", &key).await.filter(|s| s.state == "active") {
                send_notify(edge, &key, sub, Some(p), None).await?;
            }
            Ok(None)
        }
        Body::ContactRequest(_) => {
            if load(edge, "s", &pair(&sender, to)).await.is_some() {
                // Asked already; the SIP user's answer is still to come.
                return Ok(None);
            }
            subscribe_to(edge, &sender, to, false).await?;
            Ok(None)
        }
        Body::ContactResponse(c) => {
            let key = pair(&sender, to);
            set_contact(edge, &sender, to, c.accepted).await;
            let guard = edge.sub_locks.lock("w", &key).await;
            if let Some(mut sub) = load(edge, "w", &key).await {
                if c.accepted {
                    sub.state = "active".into();
                    let p = last_presence(edge, &sender).await;
                    send_notify(edge, &key, sub, Some(&p), None).await?;
                } else {
                    send_notify(edge, &key, sub, None, Some("rejected")).await?;
                }
            }
            drop(guard);
            if c.accepted && load(edge, "s", &key).await.is_none() {
                // Contacts go both ways: the relay user follows the SIP user too.
                subscribe_to(edge, &sender, to, true).await?;
            }
            Ok(None)
        }
        _ => Ok(None),
    }
}

/// Sends text or typing to a SIP user: in their IM session if one is open, in a new one if
/// the peer wants sessions, else as a pager-mode MESSAGE. The Call-ID is the native id.
async fn send_im(
    edge: &Arc<SipEdge>,
    from: &Address,
    to: &Address,
    env: &Envelope,
    body: &Body,
) -> Result<Option<String>, DeliveryError> {
    let (ct, payload) = match body {
        Body::Text(t) => {
            let (ct, b) = codec::text_body(t);
            (ct.to_string(), b)
        }
        Body::Typing(ty) => (
            codec::CT_ISCOMPOSING.to_string(),
            codec::is_composing(ty.active),
        ),
        _ => return Ok(None),
    };
    let session = match edge.im.for_pair(from, to) {
        Some(s) => Some(s),
        None if edge.cfg.peer(&to.domain).map(|p| p.im_mode) == Some(SipImMode::Session) => {
            Some(open_session(edge, from, to).await?)
        }
        None => None,
    };
    let t = edge.transport_for(&to.domain);
    let mut m;
    match &session {
        Some(s) => {
            m = Message::request("MESSAGE", &s.target);
            m.push("From", format!("<{}>;tag={}", aor(from), s.local_tag));
            m.push("To", format!("<{}>;tag={}", aor(to), s.remote_tag));
            m.push("Call-ID", s.call_id.clone());
            let seq = s.cseq.fetch_add(1, Ordering::Relaxed) + 1;
            m.push("CSeq", format!("{seq} MESSAGE"));
        }
        None => {
            m = Message::request("MESSAGE", &aor(to));
            m.push("From", format!("<{}>;tag={}", aor(from), txn::new_token()));
            m.push("To", format!("<{}>", aor(to)));
            m.push(
                "Call-ID",
                format!("{}@{}", txn::new_token(), edge.sent_by(t)),
            );
            m.push("CSeq", "1 MESSAGE");
        }
    }
    m.push("Content-Type", ct);
    m.body = payload.into_bytes();
    let call_id = m.call_id().unwrap_or("").to_string();
    let seq = m.cseq().map(|c| c.seq).unwrap_or(1);
    match edge.send_request(&to.domain, m).await {
        Ok(_) => {}
        Err(SendError::Status(481, _)) if session.is_some() => {
            // The session ended on the other side: the next try goes without it.
            if let Some(s) = &session {
                edge.im.remove(&s.call_id);
            }
            return Err(DeliveryError::retryable("sip_481", "the IM session ended"));
        }
        Err(e) => return Err(e.to_delivery()),
    }
    debug!(relay_msg_id = %env.relay_msg_id, "message delivered");
    Ok(match body {
        // Marked as the relay's: inside an IM session both sides number their CSeqs apart,
        // so "Call-ID/CSeq" alone would name a SIP user's later message as this one.
        Body::Text(_) => Some(format!("{call_id}/{seq}/relay")),
        _ => None,
    })
}

/// Opens an IM session with a SIP user: INVITE with an `m=message` offer, ACK.
async fn open_session(
    edge: &Arc<SipEdge>,
    from: &Address,
    to: &Address,
) -> Result<Arc<ImSession>, DeliveryError> {
    let t = edge.transport_for(&to.domain);
    let local_tag = txn::new_token();
    let call_id = format!("{}@{}", txn::new_token(), edge.sent_by(t));
    let mut m = Message::request("INVITE", &aor(to));
    m.push("From", format!("<{}>;tag={local_tag}", aor(from)));
    m.push("To", format!("<{}>", aor(to)));
    m.push("Call-ID", call_id.clone());
    m.push("CSeq", "1 INVITE");
    m.push("Contact", contact(edge, &from.user, t));
    m.push("Content-Type", "application/sdp");
    m.body = sdp(edge, t).into_bytes();
    let resp = edge
        .send_request(&to.domain, m.clone())
        .await
        .map_err(|e| e.to_delivery())?;
    let remote_tag = txn::to_tag(&resp).unwrap_or_default();
    let target = resp
        .header("contact")
        .and_then(NameAddr::parse)
        .map(|c| c.uri.to_string())
        .unwrap_or_else(|| aor(to));
    // The ACK of a 2xx is a transaction of its own, with the INVITE's CSeq number.
    let invite_seq = resp.cseq().map(|c| c.seq).unwrap_or(1);
    let mut ack = Message::request("ACK", &target);
    ack.push("From", format!("<{}>;tag={local_tag}", aor(from)));
    ack.push("To", format!("<{}>;tag={remote_tag}", aor(to)));
    ack.push("Call-ID", call_id.clone());
    ack.push("CSeq", format!("{invite_seq} ACK"));
    edge.send_stateless(&to.domain, ack).await;
    let s = Arc::new(ImSession {
        call_id,
        local_tag,
        remote_tag,
        relay: from.clone(),
        sip: to.clone(),
        target,
        transport: t,
        cseq: AtomicU32::new(invite_seq),
        acked: Notify::new(),
    });
    edge.im.insert(s.clone());
    Ok(s)
}
