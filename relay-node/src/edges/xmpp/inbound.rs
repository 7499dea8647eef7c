//! Incoming server-to-server streams.
//!
//! A peer connects, STARTTLS (required by default), then proves its domain: SASL EXTERNAL
//! when its certificate is trusted and names the domain (XEP-0178), or dialback (XEP-0220),
//! which the relay checks by asking the domain's own server over a stream of its own. Each
//! stanza is then checked (its `from` domain authenticated on this stream, its `to` domain
//! hosted here, the pair federated by policy), turned into an envelope and handed to the
//! session. With Stream Management (XEP-0198) the peer learns a stanza is safe only when it
//! is journaled or answered with an error: `<a h='…'/>` counts finished stanzas, in order.
//! Stanzas between one pair of users keep their order; other pairs proceed in parallel.

use super::codec::{self, Jid, Meaning};
use super::element::Element;
use super::outbound;
use super::stream::{
    self, Conn, NS_DIALBACK, NS_DIALBACK_FEATURE, NS_LIMITS, NS_SASL, NS_SERVER, NS_SM, NS_STANZAS,
    NS_TLS, Reader, StreamError,
};
use super::xml::{Event, StreamHeader};
use super::{XmppEdge, now_ms};
use crate::config::XmppAuth;
use fedrelay_proto::{Address, v1};
use session_actor::SessionError;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info_span, warn};

/// Accepts peers until `stop` flips, then lets open streams finish and close.
pub async fn serve(edge: Arc<XmppEdge>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            a = listener.accept() => match a {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    let span = info_span!("xmpp.inbound", peer = %peer);
                    conns.spawn(handle(edge.clone(), tcp, stop.clone()).instrument(span));
                }
                Err(e) => {
                    debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
}

async fn handle(edge: Arc<XmppEdge>, tcp: TcpStream, stop: watch::Receiver<bool>) {
    metrics::gauge!("fedrelay_xmpp_streams_open", "direction" => "in").increment(1.0);
    match run(&edge, tcp, stop).await {
        Ok(()) => debug!("stream closed"),
        Err(e) => {
            metrics::counter!("fedrelay_xmpp_stream_errors_total", "condition" => e.code())
                .increment(1);
            debug!(code = e.code(), "stream ended with an error");
        }
    }
    metrics::gauge!("fedrelay_xmpp_streams_open", "direction" => "in").decrement(1.0);
}

/// What the handshake established.
struct Peer {
    /// Our stream id (dialback keys are bound to it).
    id: String,
    /// The domain proved by SASL EXTERNAL: every pair (it, hosted domain) is authenticated.
    external: Option<String>,
    /// (remote domain, hosted domain) pairs proved by dialback.
    dialback: HashSet<(String, String)>,
}

impl Peer {
    fn may_send(&self, from: &str, to: &str) -> bool {
        self.external.as_deref() == Some(from) || self.dialback.contains(&(from.into(), to.into()))
    }
}

/// Writes a stream error (after our header, if it was not sent yet) and closes.
async fn fail<W: AsyncWrite + Unpin>(
    w: &mut W,
    header_sent: bool,
    to: &str,
    e: &StreamError,
) -> Result<(), StreamError> {
    let (condition, text, app) = match e {
        StreamError::Xml(x) => (x.condition(), x.to_string(), x.app_condition()),
        StreamError::Protocol { condition, text } => (*condition, text.clone(), None),
        StreamError::Timeout => ("connection-timeout", "no data in time".to_string(), None),
        _ => return Ok(()),
    };
    let mut s = String::new();
    if !header_sent {
        s.push_str(&stream::header(to, "", Some(&stream::new_id())));
    }
    s.push_str(&stream::stream_error(condition, &text, app));
    let r = tokio::time::timeout(Duration::from_secs(2), async {
        w.write_all(s.as_bytes()).await?;
        w.flush().await?;
        w.shutdown().await
    })
    .await;
    if !matches!(r, Ok(Ok(()))) {
        debug!("could not send the stream error");
    }
    Ok(())
}

fn check_header(edge: &XmppEdge, h: &StreamHeader) -> Result<String, StreamError> {
    if h.default_ns != NS_SERVER {
        return Err(StreamError::protocol(
            "invalid-namespace",
            "the default namespace must be jabber:server",
        ));
    }
    if h.get("version").is_none_or(|v| !v.starts_with("1.")) {
        return Err(StreamError::protocol(
            "unsupported-version",
            "XMPP 1.0 streams only",
        ));
    }
    let to = h.get("to").unwrap_or("").to_ascii_lowercase();
    if !edge.hosted.contains(&to) {
        return Err(StreamError::protocol(
            "host-unknown",
            "that domain is not hosted here",
        ));
    }
    Ok(to)
}

fn limits_feature(edge: &XmppEdge) -> Element {
    Element::new("limits", NS_LIMITS)
        .child(Element::new("max-bytes", NS_LIMITS).text(edge.cfg.max_stanza_bytes.to_string()))
        .child(Element::new("idle-seconds", NS_LIMITS).text(edge.cfg.idle_timeout_secs.to_string()))
}

async fn run(
    edge: &Arc<XmppEdge>,
    tcp: TcpStream,
    stop: watch::Receiver<bool>,
) -> Result<(), StreamError> {
    let mut r = Reader::new(Conn::Plain(tcp), edge.limits());
    let deadline = Instant::now() + Duration::from_secs(edge.cfg.handshake_timeout_secs);
    let mut header_sent = false;
    let mut to = String::new();
    let hs = tokio::time::timeout_at(
        deadline.into(),
        handshake(edge, &mut r, &mut header_sent, &mut to),
    )
    .await
    .unwrap_or(Err(StreamError::Timeout));
    let (peer, sm) = match hs {
        Ok(p) => p,
        Err(e) => {
            fail(&mut r.io, header_sent, &to, &e).await?;
            return Err(e);
        }
    };
    established(edge, r, peer, sm, stop).await
}

/// Negotiates TLS and authentication. Returns the peer and whether its features (after
/// SASL) offered Stream Management.
async fn handshake(
    edge: &Arc<XmppEdge>,
    r: &mut Reader<Conn>,
    header_sent: &mut bool,
    to_out: &mut String,
) -> Result<(Peer, bool), StreamError> {
    let long = Duration::from_secs(edge.cfg.handshake_timeout_secs);
    let mut peer = Peer {
        id: String::new(),
        external: None,
        dialback: HashSet::new(),
    };
    loop {
        // A (new) stream header.
        let h = match r.next(long).await? {
            Event::StreamOpen(h) => h,
            _ => {
                return Err(StreamError::protocol(
                    "not-well-formed",
                    "expected a stream header",
                ));
            }
        };
        // A stream error's header names us only as a domain we host.
        *to_out = String::new();
        let to = check_header(edge, &h)?;
        *to_out = to.clone();
        let from = h.get("from").map(str::to_ascii_lowercase);
        peer.id = stream::new_id();
        let mut out = stream::header(&to, from.as_deref().unwrap_or(""), Some(&peer.id));
        *header_sent = true;
        let tls = r.io.is_tls();
        let mut feats = Vec::new();
        if !tls {
            let mut st = Element::new("starttls", NS_TLS);
            if edge.cfg.require_tls {
                st = st.child(Element::new("required", NS_TLS));
            }
            feats.push(st);
        }
        let after_sasl = peer.external.is_some();
        if after_sasl {
            feats.push(Element::new("sm", NS_SM));
        } else if tls || !edge.cfg.require_tls {
            let certs = r.io.peer_certificates();
            if let Some(f) = &from
                && edge.allows(f, XmppAuth::External)
                && edge.tls.peer_valid_for(&certs, f)
            {
                feats.push(
                    Element::new("mechanisms", NS_SASL)
                        .child(Element::new("mechanism", NS_SASL).text("EXTERNAL")),
                );
            }
            feats.push(
                Element::new("dialback", NS_DIALBACK_FEATURE)
                    .child(Element::new("errors", NS_DIALBACK_FEATURE)),
            );
        }
        feats.push(limits_feature(edge));
        out.push_str(&stream::features(&feats));
        stream::write(&mut r.io, &out).await?;
        if after_sasl {
            if from.as_deref() != peer.external.as_deref() {
                return Err(StreamError::protocol(
                    "invalid-from",
                    "the stream's from is not the authenticated domain",
                ));
            }
            return Ok((peer, true));
        }
        // Elements until the stream restarts (TLS, SASL) or is authenticated.
        loop {
            let el = r.element(long).await?;
            if !r.io.is_tls() && edge.cfg.require_tls && !el.is("starttls", NS_TLS) {
                return Err(StreamError::protocol(
                    "policy-violation",
                    "STARTTLS is required",
                ));
            }
            if el.is("starttls", NS_TLS) {
                if r.io.is_tls() {
                    return Err(StreamError::protocol(
                        "policy-violation",
                        "TLS is on already",
                    ));
                }
                if r.buffered() > 0 {
                    return Err(StreamError::protocol(
                        "not-well-formed",
                        "data after <starttls/>",
                    ));
                }
                stream::write(
                    &mut r.io,
                    "<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>",
                )
                .await?;
                let Conn::Plain(tcp) = std::mem::replace(&mut r.io, Conn::Taken) else {
                    return Err(StreamError::protocol("policy-violation", "TLS twice"));
                };
                let tls = edge.tls.acceptor.accept(tcp).await?;
                r.io = Conn::Tls(Box::new(tokio_rustls::TlsStream::Server(tls)));
                r.reset();
                *header_sent = false;
                break;
            }
            if el.is("auth", NS_SASL) {
                let mech = el.get_attr("mechanism").unwrap_or("");
                let authzid = el.text_content();
                let claimed = match authzid.trim() {
                    "" | "=" => from.clone(),
                    b64 => base64_decode(b64).map(|s| s.to_ascii_lowercase()),
                };
                let certs = r.io.peer_certificates();
                let ok = mech == "EXTERNAL"
                    && r.io.is_tls()
                    && claimed.is_some()
                    && claimed == from
                    && claimed
                        .as_deref()
                        .is_some_and(|d| edge.allows(d, XmppAuth::External))
                    && claimed
                        .as_deref()
                        .is_some_and(|d| edge.tls.peer_valid_for(&certs, d));
                if ok {
                    stream::write(
                        &mut r.io,
                        "<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>",
                    )
                    .await?;
                    peer.external = claimed;
                    r.reset();
                    *header_sent = false;
                    break;
                }
                stream::write(
                    &mut r.io,
                    "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><not-authorized/></failure>",
                )
                .await?;
                continue;
            }
            if el.ns == NS_DIALBACK {
                let (reply, valid) = dialback(edge, &peer, &el).await?;
                stream::write(&mut r.io, &reply).await?;
                if let Some(pair) = valid {
                    peer.dialback.insert(pair);
                    return Ok((peer, false));
                }
                continue;
            }
            return Err(StreamError::protocol(
                "not-authorized",
                "authenticate first (SASL EXTERNAL or dialback)",
            ));
        }
    }
}

fn base64_decode(s: &str) -> Option<String> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
}

/// Answers a dialback element. Returns the reply and, for a verified `db:result`, the pair
/// it authenticates.
async fn dialback(
    edge: &Arc<XmppEdge>,
    peer: &Peer,
    el: &Element,
) -> Result<(String, Option<(String, String)>), StreamError> {
    let from = el.get_attr("from").unwrap_or("").to_ascii_lowercase();
    let to = el.get_attr("to").unwrap_or("").to_ascii_lowercase();
    let key = el.text_content();
    let key = key.trim();
    let reply = |name: &str, kind: &str, extra: Option<Element>| {
        let mut e = Element::new(name, NS_DIALBACK)
            .attr("from", to.as_str())
            .attr("to", from.as_str())
            .attr("type", kind);
        if let Some(id) = el.get_attr("id") {
            e = e.attr("id", id);
        }
        if let Some(x) = extra {
            e = e.child(x);
        }
        outbound::db_xml(&e)
    };
    match el.name.as_str() {
        // The peer checks a key the relay sent on one of its outgoing streams.
        "verify" => {
            let id = el.get_attr("id").unwrap_or("");
            let ok = edge.hosted.contains(&to)
                && !id.is_empty()
                && stream::dialback_key(&edge.dialback_secret, &from, &to, id) == key;
            let kind = if ok { "valid" } else { "invalid" };
            Ok((reply("verify", kind, None), None))
        }
        // The peer claims `from` for its stream to `to`.
        "result" => {
            let err = |cond: &str| {
                Some(
                    Element::new("error", NS_SERVER)
                        .attr("type", "cancel")
                        .child(Element::new(cond, NS_STANZAS)),
                )
            };
            if !edge.hosted.contains(&to) {
                return Ok((reply("result", "error", err("item-not-found")), None));
            }
            if !edge.allows(&from, XmppAuth::Dialback) || key.is_empty() {
                return Ok((reply("result", "error", err("not-authorized")), None));
            }
            match outbound::verify_dialback(edge, &to, &from, &peer.id, key).await {
                Ok(true) => Ok((
                    reply("result", "valid", None),
                    Some((from.clone(), to.clone())),
                )),
                Ok(false) => Err(StreamError::protocol(
                    "not-authorized",
                    "the dialback key did not verify",
                )),
                Err(e) => {
                    debug!(code = e.code(), "dialback verification failed");
                    Ok((reply("result", "error", err("remote-server-timeout")), None))
                }
            }
        }
        _ => Err(StreamError::protocol(
            "unsupported-stanza-type",
            "unknown dialback element",
        )),
    }
}

/// Acknowledgement bookkeeping for XEP-0198: stanzas are numbered as they arrive and
/// finish in any order; `h` is the count finished without a gap.
#[derive(Debug, Default)]
struct Acks {
    received: u64,
    h: u64,
    done: BTreeSet<u64>,
    /// `<r/>` requests waiting until `h` reaches what had arrived before them.
    waiting: Vec<u64>,
    /// Stanzas received before Stream Management was enabled: the peer counts from there.
    base: u64,
}

impl Acks {
    fn finish(&mut self, n: u64) {
        self.done.insert(n);
        while self.done.remove(&(self.h + 1)) {
            self.h += 1;
        }
    }

    /// The answers now due, as `<a/>` elements.
    fn due(&mut self) -> Option<String> {
        let h = self.h;
        let before = self.waiting.len();
        self.waiting.retain(|w| *w > h);
        let counted = h.saturating_sub(self.base);
        (self.waiting.len() < before).then(|| format!("<a xmlns='urn:xmpp:sm:3' h='{counted}'/>"))
    }
}

type Job = (u64, Element);

/// On shutdown: how long the peer has to close its side, and the stanzas read to finish.
const DRAIN: Duration = Duration::from_secs(5);

async fn established(
    edge: &Arc<XmppEdge>,
    r: Reader<Conn>,
    mut peer: Peer,
    sm_offered: bool,
    mut stop: watch::Receiver<bool>,
) -> Result<(), StreamError> {
    let idle = Duration::from_secs(edge.cfg.idle_timeout_secs);
    let (mut rd, mut wr) = r.split();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<u64>();
    let mut workers: HashMap<String, (mpsc::UnboundedSender<Job>, Instant)> = HashMap::new();
    let mut acks = Acks::default();
    let mut sm = false;
    // The peer closed (or we stopped reading): finish what arrived, then close.
    let mut closing = false;
    // We sent our closing tag (shutting down) and take what the peer had already sent,
    // until its own closing tag: stanzas are never dropped after they were read.
    let mut draining = false;
    let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
    let mut drain_until = far;
    let mut close_until = far;
    loop {
        if closing && (acks.h == acks.received || tokio::time::Instant::now() >= close_until) {
            if !draining {
                if sm && let Some(a) = acks.due() {
                    stream::write(&mut wr, &a).await?;
                }
                let _ = stream::write(&mut wr, "</stream:stream>").await;
            }
            let _ = wr.shutdown().await;
            return Ok(());
        }
        tokio::select! {
            biased;
            Some(n) = done_rx.recv() => {
                acks.finish(n);
                if sm && !draining && let Some(a) = acks.due() {
                    stream::write(&mut wr, &a).await?;
                }
            }
            _ = stop.changed(), if !closing && !draining => {
                draining = true;
                drain_until = tokio::time::Instant::now() + DRAIN;
                if sm && let Some(a) = acks.due() {
                    stream::write(&mut wr, &a).await?;
                }
                stream::write(&mut wr, "</stream:stream>").await?;
            }
            _ = tokio::time::sleep_until(drain_until), if draining && !closing => {
                closing = true;
                close_until = tokio::time::Instant::now() + DRAIN;
                workers.clear();
            }
            _ = tokio::time::sleep_until(close_until), if closing => {}
            ev = rd.next(idle), if !closing => {
                let el = match ev {
                    Ok(Event::Stanza(el)) => el,
                    Ok(Event::StreamClose) => {
                        closing = true;
                        close_until = tokio::time::Instant::now() + DRAIN;
                        workers.clear();
                        continue;
                    }
                    Ok(Event::StreamOpen(_)) if !draining => {
                        let e = StreamError::protocol("not-well-formed", "a second stream header");
                        fail(&mut wr, true, "", &e).await?;
                        return Err(e);
                    }
                    Err(e) if !draining => {
                        fail(&mut wr, true, "", &e).await?;
                        return Err(e);
                    }
                    Ok(_) | Err(_) => {
                        closing = true;
                        close_until = tokio::time::Instant::now() + DRAIN;
                        workers.clear();
                        continue;
                    }
                };
                if el.ns == NS_SM {
                    match el.name.as_str() {
                        "enable" if sm_offered && !sm => {
                            sm = true;
                            acks.base = acks.received;
                            stream::write(&mut wr, "<enabled xmlns='urn:xmpp:sm:3'/>").await?;
                        }
                        "r" if sm && !draining => {
                            acks.waiting.push(acks.received);
                            if let Some(a) = acks.due() {
                                stream::write(&mut wr, &a).await?;
                            }
                        }
                        "a" => {}
                        _ => {
                            stream::write(&mut wr,
                                "<failed xmlns='urn:xmpp:sm:3'><unexpected-request xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></failed>").await?;
                        }
                    }
                    continue;
                }
                if el.ns == NS_DIALBACK {
                    let (reply, valid) = match dialback(edge, &peer, &el).await {
                        Ok(x) => x,
                        Err(e) => {
                            fail(&mut wr, true, "", &e).await?;
                            return Err(e);
                        }
                    };
                    stream::write(&mut wr, &reply).await?;
                    if let Some(pair) = valid {
                        peer.dialback.insert(pair);
                    }
                    continue;
                }
                if el.ns != NS_SERVER || !matches!(el.name.as_str(), "message" | "presence" | "iq") {
                    let e = StreamError::protocol("unsupported-stanza-type", "not a stanza");
                    fail(&mut wr, true, "", &e).await?;
                    return Err(e);
                }
                let from = el.get_attr("from").and_then(Jid::parse);
                let to = el.get_attr("to").and_then(Jid::parse);
                let (Some(from), Some(to)) = (from, to) else {
                    let e = StreamError::protocol("improper-addressing", "a stanza needs valid from and to");
                    fail(&mut wr, true, "", &e).await?;
                    return Err(e);
                };
                if !edge.hosted.contains(&to.domain) {
                    let e = StreamError::protocol("host-unknown", "that domain is not hosted here");
                    fail(&mut wr, true, "", &e).await?;
                    return Err(e);
                }
                if !peer.may_send(&from.domain, &to.domain) {
                    let e = StreamError::protocol("invalid-from", "that domain is not authenticated on this stream");
                    fail(&mut wr, true, "", &e).await?;
                    return Err(e);
                }
                acks.received += 1;
                let n = acks.received;
                let key = format!("{}>{}", from.bare(), to.bare());
                if workers.len() > 256 {
                    workers.retain(|_, (_, t)| t.elapsed() < Duration::from_secs(10));
                }
                let entry = workers.entry(key).or_insert_with(|| {
                    let (tx, rx) = mpsc::unbounded_channel();
                    tokio::spawn(worker(edge.clone(), rx, done_tx.clone()).in_current_span());
                    (tx, Instant::now())
                });
                entry.1 = Instant::now();
                if entry.0.send((n, el)).is_err() {
                    acks.finish(n);
                }
            }
        }
    }
}

/// Handles the stanzas of one pair of users, in order.
async fn worker(
    edge: Arc<XmppEdge>,
    mut rx: mpsc::UnboundedReceiver<Job>,
    done: mpsc::UnboundedSender<u64>,
) {
    while let Some((n, el)) = rx.recv().await {
        stanza(&edge, &el).await;
        let _ = done.send(n);
    }
}

fn reply_error(edge: &Arc<XmppEdge>, st: &Element, kind: &str, cond: &str, text: &str) {
    // Errors are never answered with errors.
    if st.get_attr("type") == Some("error") {
        return;
    }
    edge.send_detached(codec::stanza_error(st, kind, cond, text));
}

/// One stanza from an authenticated peer: policy, envelope, submit, answer.
async fn stanza(edge: &Arc<XmppEdge>, st: &Element) {
    let (Some(from), Some(to)) = (
        st.get_attr("from").and_then(Jid::parse),
        st.get_attr("to").and_then(Jid::parse),
    ) else {
        return;
    };
    let meaning = codec::meaning(st);
    let kind = match &meaning {
        Meaning::Body(b) => b.kind(),
        Meaning::Reactions { .. } => "reaction",
        Meaning::Presence(_) | Meaning::Probe => "presence",
        Meaning::ProfileQuery => "profile_query",
        Meaning::Profile(_) => "profile",
        Meaning::Ignore(_) => "ignored",
        Meaning::UnsupportedIq => "iq",
    };
    let span =
        info_span!("xmpp.stanza", stanza = %st.name, kind, relay_msg_id = tracing::field::Empty);
    async {
        debug!("stanza received");
        if let Meaning::Ignore(why) = meaning {
            debug!(why, "stanza not relayed");
            return;
        }
        if let Meaning::UnsupportedIq = meaning {
            reply_error(edge, st, "cancel", "service-unavailable", "");
            return;
        }
        // Stanzas to the domain itself (no user) are not relayed.
        if to.local.is_empty() || from.local.is_empty() {
            if st.name == "iq" {
                reply_error(edge, st, "cancel", "service-unavailable", "");
            }
            return;
        }
        let sender = Address::new("xmpp", from.domain.clone(), from.local.clone());
        let platform = match edge.policy.check(&from.domain, &to.domain) {
            Ok(p) => p,
            Err(e) => {
                edge.record_refusal(&sender, &to, e.code());
                if st.name != "presence" || matches!(meaning, Meaning::Body(_)) {
                    reply_error(edge, st, "cancel", "not-allowed", &e.to_string());
                }
                return;
            }
        };
        let recipient = Address::new(platform.as_str(), to.domain.clone(), to.local.clone());
        let bare = from.bare();
        let id = codec::message_id(st);
        let native = |suffix: &str| match &id {
            Some(id) => format!("{bare}/{id}{suffix}"),
            None => format!("{bare}/~{}", uuid::Uuid::now_v7()),
        };
        let scoped = |target: &str| format!("{bare}/{target}");
        let mut envs = Vec::new();
        // A reaction set is remembered only once all its changes are journaled, so a
        // stanza the peer sends again after an error is compared with the old set.
        let mut reactions_after = None;
        match meaning {
            Meaning::Body(mut body) => {
                if let v1::envelope::Body::ContactResponse(c) = &body
                    && c.accepted
                    && edge.take_autosub(&to.bare(), &bare).await.unwrap_or(false)
                {
                    // The answer to the relay's own reciprocal request: already contacts.
                    return;
                }
                if let Some(t) = body.target_mut() {
                    t.native_id = scoped(&t.native_id);
                }
                envs.push(XmppEdge::envelope(&sender, &recipient, native(""), body));
            }
            Meaning::Reactions { target, emojis } => {
                let who = format!("{bare}>{}", to.bare());
                let before = match edge.reactions(&who, &target).await {
                    Ok(b) => b,
                    Err(e) => {
                        debug!(error = %e, "reaction state unavailable");
                        reply_error(edge, st, "wait", "internal-server-error", "try again later");
                        return;
                    }
                };
                for (emoji, added) in emojis
                    .iter()
                    .filter(|e| !before.contains(e))
                    .map(|e| (e, true))
                    .chain(
                        before
                            .iter()
                            .filter(|e| !emojis.contains(e))
                            .map(|e| (e, false)),
                    )
                {
                    let sign = if added { "+" } else { "-" };
                    envs.push(XmppEdge::envelope(
                        &sender,
                        &recipient,
                        native(&format!("#{sign}{emoji}")),
                        v1::envelope::Body::Reaction(v1::Reaction {
                            target: Some(v1::MessageRef {
                                relay_msg_id: String::new(),
                                native_id: scoped(&target),
                            }),
                            emoji: emoji.clone(),
                            added,
                        }),
                    ));
                }
                reactions_after = Some((who, target, emojis));
            }
            Meaning::Presence(p) => {
                let mut env = XmppEdge::envelope(
                    &sender,
                    &sender,
                    format!("presence:{}", uuid::Uuid::now_v7()),
                    v1::envelope::Body::Presence(p),
                );
                env.recipients.clear();
                envs.push(env);
            }
            Meaning::Probe => {
                debug!("presence probe not answered");
                return;
            }
            Meaning::ProfileQuery => {
                let iq_id = st.get_attr("id").unwrap_or("");
                let full = st.get_attr("from").unwrap_or("");
                let me = format!("{}@{}", to.local, to.domain);
                if let Err(e) = edge
                    .remember_query(&me, &bare, &format!("{iq_id} {full}"))
                    .await
                {
                    debug!(error = %e, "profile request not remembered");
                    reply_error(edge, st, "wait", "internal-server-error", "try again later");
                    return;
                }
                envs.push(XmppEdge::envelope(
                    &sender,
                    &recipient,
                    native(""),
                    v1::envelope::Body::ProfileQuery(v1::ProfileQuery {}),
                ));
            }
            Meaning::Profile(p) => {
                envs.push(XmppEdge::envelope(
                    &sender,
                    &recipient,
                    native(""),
                    v1::envelope::Body::Profile(p),
                ));
            }
            Meaning::Ignore(_) | Meaning::UnsupportedIq => return,
        }
        let mut all_journaled = true;
        for env in envs {
            let r = edge.submit(env).await;
            all_journaled &= r.is_ok();
            match r {
                Ok(acc) => {
                    tracing::Span::current().record("relay_msg_id", acc.relay_msg_id.as_str());
                    debug!(seq = acc.seq, duplicate = acc.duplicate, "stanza journaled");
                    if st.name == "message"
                        && st.get_child("request", codec::NS_RECEIPTS).is_some()
                        && let Some(mid) = st.get_attr("id")
                    {
                        edge.send_detached(
                            Element::new("message", NS_SERVER)
                                .attr("from", st.get_attr("to").unwrap_or(""))
                                .attr("to", st.get_attr("from").unwrap_or(""))
                                .child(
                                    Element::new("received", codec::NS_RECEIPTS).attr("id", mid),
                                ),
                        );
                    }
                }
                Err(SessionError::UnknownTarget) => {
                    reply_error(
                        edge,
                        st,
                        "cancel",
                        "item-not-found",
                        "the message referred to is not known",
                    );
                }
                Err(SessionError::NotAllowed(m)) => {
                    reply_error(edge, st, "cancel", "not-allowed", &m);
                }
                // A subscription request stays pending, as XMPP has it, until approved.
                Err(SessionError::PendingApproval(_)) => {}
                Err(SessionError::RateLimited(m)) => {
                    reply_error(edge, st, "wait", "resource-constraint", &m);
                }
                Err(SessionError::Invalid(m)) => {
                    reply_error(edge, st, "modify", "bad-request", &m);
                }
                Err(e) => {
                    warn!(code = e.code(), at_ms = now_ms(), "stanza not journaled");
                    reply_error(
                        edge,
                        st,
                        "wait",
                        "internal-server-error",
                        "could not accept the message; try again later",
                    );
                }
            }
        }
        if all_journaled
            && let Some((who, target, set)) = reactions_after
            && let Err(e) = edge.set_reactions(&who, &target, &set).await
        {
            debug!(error = %e, "reaction state not saved");
        }
    }
    .instrument(span)
    .await;
}

#[cfg(test)]
mod tests {
    use super::Acks;

    #[test]
    fn acks_count_finished_stanzas_in_order_from_enable() {
        // Two stanzas before <enable/>, then three after, and an <r/>.
        let mut a = Acks {
            received: 5,
            base: 2,
            waiting: vec![5],
            ..Acks::default()
        };
        a.finish(3);
        a.finish(5);
        assert_eq!(a.due(), None, "1, 2 and 4 are still in flight");
        a.finish(1);
        a.finish(2);
        a.finish(4);
        assert_eq!(a.due().as_deref(), Some("<a xmlns='urn:xmpp:sm:3' h='3'/>"));
        assert_eq!(a.due(), None, "answered once");
    }
}
