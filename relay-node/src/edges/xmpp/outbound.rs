//! Outgoing server-to-server streams and what the relay sends on them.
//!
//! One stream per (relay domain, remote domain), opened on first use: TCP to the address
//! from the config or SRV, STARTTLS (the peer's certificate must be valid for its domain),
//! then SASL EXTERNAL with the relay's certificate or dialback, as the peer's policy allows;
//! then Stream Management (XEP-0198) when the peer offers it. A delivery is done when the
//! peer has acknowledged its stanzas (or, without XEP-0198, when they are written). A broken
//! stream is dropped and the next delivery connects again; connection failures back off.

use super::XmppEdge;
use super::codec::{self, Jid};
use super::element::Element;
use super::stream::{
    self, Conn, NS_DIALBACK, NS_DIALBACK_FEATURE, NS_SASL, NS_SERVER, NS_SM, NS_STREAMS, NS_TLS,
    Reader, StreamError,
};
use super::xml::Event;
use crate::config::XmppAuth;
use fedrelay_proto::{Address, Envelope, v1};
use session_actor::DeliveryError;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncWriteExt, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, watch};
use tracing::{debug, info};

/// The first wait after a failed connection; doubled per failure up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// An authenticated outgoing stream.
pub struct OutStream {
    writer: Mutex<Writer>,
    /// Stanzas the peer has acknowledged (XEP-0198 `h`).
    acked: watch::Receiver<u64>,
    sm: bool,
    dead: Arc<AtomicBool>,
}

struct Writer {
    half: WriteHalf<Conn>,
    sent: u64,
}

#[derive(Default)]
struct Slot {
    stream: Option<Arc<OutStream>>,
    failures: u32,
    retry_at: Option<Instant>,
}

/// A (relay domain, remote domain) pair's stream slot, locked while connecting.
type Slots = HashMap<(String, String), Arc<Mutex<Slot>>>;

/// The outgoing streams, by (relay domain, remote domain).
#[derive(Default)]
pub struct Pool {
    slots: std::sync::Mutex<Slots>,
}

fn unreachable(e: impl std::fmt::Display) -> DeliveryError {
    DeliveryError::retryable("xmpp_unreachable", e.to_string())
}

impl Pool {
    fn slot(&self, local: &str, remote: &str) -> Arc<Mutex<Slot>> {
        let mut m = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        m.entry((local.to_string(), remote.to_string()))
            .or_default()
            .clone()
    }

    /// Sends `stanzas` from `local` to `remote` and waits until the peer has them.
    pub async fn send(
        &self,
        edge: &Arc<XmppEdge>,
        local: &str,
        remote: &str,
        stanzas: &[Element],
    ) -> Result<(), DeliveryError> {
        if !edge.hosted.contains(local) {
            return Err(DeliveryError::permanent(
                "xmpp_not_hosted",
                "the sender's domain is not hosted by this relay",
            ));
        }
        let out = self.stream(edge, local, remote).await?;
        let r = out.send(stanzas, edge.cfg.ack_timeout_secs).await;
        if r.is_err() {
            out.dead.store(true, Ordering::Relaxed);
        }
        r
    }

    async fn stream(
        &self,
        edge: &Arc<XmppEdge>,
        local: &str,
        remote: &str,
    ) -> Result<Arc<OutStream>, DeliveryError> {
        let slot = self.slot(local, remote);
        let mut s = slot.lock().await;
        if let Some(st) = &s.stream
            && !st.dead.load(Ordering::Relaxed)
        {
            return Ok(st.clone());
        }
        s.stream = None;
        if let Some(at) = s.retry_at
            && Instant::now() < at
        {
            return Err(unreachable(format!(
                "{remote} was unreachable moments ago; retrying later"
            )));
        }
        let timeout = Duration::from_secs(edge.cfg.connect_timeout_secs);
        match tokio::time::timeout(timeout * 2, connect(edge, local, remote)).await {
            Ok(Ok(st)) => {
                metrics::counter!("fedrelay_xmpp_streams_total", "direction" => "out", "result" => "ok")
                    .increment(1);
                info!(local, remote, sm = st.sm, "outgoing s2s stream up");
                let st = Arc::new(st);
                s.stream = Some(st.clone());
                s.failures = 0;
                s.retry_at = None;
                Ok(st)
            }
            Ok(Err(e)) => {
                metrics::counter!("fedrelay_xmpp_streams_total", "direction" => "out", "result" => e.code())
                    .increment(1);
                s.failures = s.failures.saturating_add(1);
                let backoff = MIN_BACKOFF
                    .saturating_mul(1 << (s.failures - 1).min(10))
                    .min(MAX_BACKOFF);
                s.retry_at = Some(Instant::now() + backoff);
                debug!(local, remote, code = e.code(), "outgoing s2s stream failed");
                Err(unreachable(format!("connecting to {remote}: {e}")))
            }
            Err(_) => {
                s.failures = s.failures.saturating_add(1);
                s.retry_at = Some(Instant::now() + MIN_BACKOFF);
                Err(unreachable(format!("connecting to {remote} timed out")))
            }
        }
    }

    /// Closes every stream (on shutdown).
    pub async fn close_all(&self) {
        let slots: Vec<_> = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        for s in slots {
            let mut s = s.lock().await;
            if let Some(st) = s.stream.take() {
                let mut w = st.writer.lock().await;
                let _ = w.half.write_all(b"</stream:stream>").await;
                let _ = w.half.shutdown().await;
            }
        }
    }
}

impl OutStream {
    async fn send(&self, stanzas: &[Element], ack_timeout: u64) -> Result<(), DeliveryError> {
        let target = {
            let mut w = self.writer.lock().await;
            let mut buf = String::with_capacity(256 * stanzas.len());
            for s in stanzas {
                s.write(&mut buf, NS_SERVER);
            }
            if self.sm {
                buf.push_str("<r xmlns='urn:xmpp:sm:3'/>");
            }
            w.half
                .write_all(buf.as_bytes())
                .await
                .map_err(unreachable)?;
            w.half.flush().await.map_err(unreachable)?;
            w.sent += stanzas.len() as u64;
            w.sent
        };
        if !self.sm {
            return Ok(());
        }
        let mut acked = self.acked.clone();
        let wait = acked.wait_for(|h| *h >= target);
        match tokio::time::timeout(Duration::from_secs(ack_timeout), wait).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(unreachable(
                "the stream closed before the peer acknowledged",
            )),
            Err(_) => Err(unreachable("the peer did not acknowledge in time")),
        }
    }
}

/// Opens TCP to `remote`'s server.
async fn dial(edge: &XmppEdge, remote: &str) -> Result<TcpStream, StreamError> {
    let targets = edge
        .resolver
        .targets(remote)
        .await
        .map_err(|e| StreamError::protocol("remote-connection-failed", e.to_string()))?;
    let timeout = Duration::from_secs(edge.cfg.connect_timeout_secs);
    let mut last = StreamError::Closed;
    for t in targets {
        match tokio::time::timeout(timeout, TcpStream::connect((t.host.as_str(), t.port))).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Ok(Err(e)) => last = StreamError::Io(e),
            Err(_) => last = StreamError::Timeout,
        }
    }
    Err(last)
}

/// Opens a stream and reads the peer's header and features; returns the stream id and the
/// features.
async fn open(
    r: &mut Reader<Conn>,
    local: &str,
    remote: &str,
    t: Duration,
) -> Result<(String, Element), StreamError> {
    stream::write(&mut r.io, &stream::header(local, remote, None)).await?;
    let id = match r.next(t).await? {
        Event::StreamOpen(h) => {
            if h.default_ns != NS_SERVER {
                return Err(StreamError::protocol(
                    "invalid-namespace",
                    "not jabber:server",
                ));
            }
            h.get("id").unwrap_or("").to_string()
        }
        _ => {
            return Err(StreamError::protocol(
                "not-well-formed",
                "expected a stream header",
            ));
        }
    };
    let f = r.element(t).await?;
    if !f.is("features", NS_STREAMS) {
        return Err(StreamError::protocol(
            "not-well-formed",
            "expected stream features",
        ));
    }
    Ok((id, f))
}

/// Connects and negotiates TLS; returns the reader over TLS, the stream id and features.
async fn secure(
    edge: &XmppEdge,
    local: &str,
    remote: &str,
) -> Result<(Reader<Conn>, String, Element), StreamError> {
    let t = Duration::from_secs(edge.cfg.connect_timeout_secs);
    let tcp = dial(edge, remote).await?;
    let mut r = Reader::new(Conn::Plain(tcp), edge.limits());
    let (mut id, mut features) = open(&mut r, local, remote, t).await?;
    if features.get_child("starttls", NS_TLS).is_some() {
        stream::write(
            &mut r.io,
            "<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>",
        )
        .await?;
        let p = r.element(t).await?;
        if !p.is("proceed", NS_TLS) {
            return Err(StreamError::protocol(
                "undefined-condition",
                "STARTTLS refused",
            ));
        }
        let Conn::Plain(tcp) = std::mem::replace(&mut r.io, Conn::Taken) else {
            return Err(StreamError::protocol("undefined-condition", "TLS twice"));
        };
        let name = rustls::pki_types::ServerName::try_from(remote.to_string())
            .map_err(|_| StreamError::protocol("improper-addressing", "bad domain"))?;
        let tls = edge.tls.connector.connect(name, tcp).await?;
        r.io = Conn::Tls(Box::new(tokio_rustls::TlsStream::Client(tls)));
        r.reset();
        (id, features) = open(&mut r, local, remote, t).await?;
    } else if edge.cfg.require_tls {
        return Err(StreamError::protocol(
            "policy-violation",
            "the peer does not offer STARTTLS",
        ));
    }
    Ok((r, id, features))
}

async fn connect(
    edge: &Arc<XmppEdge>,
    local: &str,
    remote: &str,
) -> Result<OutStream, StreamError> {
    let t = Duration::from_secs(edge.cfg.connect_timeout_secs);
    let (mut r, id, mut features) = secure(edge, local, remote).await?;
    let policy = edge.cfg.auth_for(remote);
    let external = features
        .get_child("mechanisms", NS_SASL)
        .is_some_and(|m| m.elements().any(|c| c.text_content().trim() == "EXTERNAL"));
    let mut authed = false;
    if external && r.io.is_tls() && policy != XmppAuth::Dialback {
        stream::write(
            &mut r.io,
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>",
        )
        .await?;
        let a = r.element(t).await?;
        if a.is("success", NS_SASL) {
            r.reset();
            (_, features) = open(&mut r, local, remote, t).await?;
            authed = true;
        } else {
            debug!(remote, "SASL EXTERNAL refused");
        }
    }
    if !authed {
        let offers_dialback = features
            .get_child("dialback", NS_DIALBACK_FEATURE)
            .is_some();
        if policy == XmppAuth::External || !offers_dialback {
            return Err(StreamError::protocol(
                "not-authorized",
                "no authentication method both sides allow",
            ));
        }
        let key = stream::dialback_key(&edge.dialback_secret, remote, local, &id);
        let req = Element::new("result", NS_DIALBACK)
            .attr("from", local)
            .attr("to", remote)
            .text(key);
        stream::write(&mut r.io, &db_xml(&req)).await?;
        loop {
            let a = r.element(t).await?;
            if a.is("result", NS_DIALBACK) {
                if a.get_attr("type") == Some("valid") {
                    break;
                }
                return Err(StreamError::protocol(
                    "not-authorized",
                    "the peer refused our dialback key",
                ));
            }
        }
    }
    let mut sm = false;
    if features.get_child("sm", NS_SM).is_some() {
        stream::write(&mut r.io, "<enable xmlns='urn:xmpp:sm:3'/>").await?;
        let e = r.element(t).await?;
        sm = e.is("enabled", NS_SM);
    }
    let (mut r, write_half) = r.split();
    let (ack_tx, ack_rx) = watch::channel(0u64);
    let dead = Arc::new(AtomicBool::new(false));
    let writer = Mutex::new(Writer {
        half: write_half,
        sent: 0,
    });
    let out = OutStream {
        writer,
        acked: ack_rx,
        sm,
        dead: dead.clone(),
    };
    let remote = remote.to_string();
    tokio::spawn(async move {
        loop {
            // A receiving peer sends little: acks, keepalives, the stream's end.
            match r.next(Duration::from_secs(3600)).await {
                Ok(Event::Stanza(e)) if e.is("a", NS_SM) => {
                    if let Some(h) = e.get_attr("h").and_then(|h| h.parse::<u64>().ok()) {
                        let _ = ack_tx.send(h);
                    }
                }
                Ok(Event::Stanza(_)) => {}
                Ok(_) | Err(_) => break,
            }
        }
        dead.store(true, Ordering::Relaxed);
        debug!(remote = %remote, "outgoing s2s stream ended");
    });
    Ok(out)
}

/// A dialback element, written with the `db:` prefix the stream header declared.
pub fn db_xml(e: &Element) -> String {
    use super::element::escape;
    let mut s = format!("<db:{}", e.name);
    for (n, v) in &e.attrs {
        s.push_str(&format!(" {n}='{}'", escape(v)));
    }
    if e.children.is_empty() {
        s.push_str("/>");
        return s;
    }
    s.push('>');
    for c in &e.children {
        match c {
            // Unprefixed children are in the stream's default namespace.
            super::element::Node::Element(x) => x.write(&mut s, NS_SERVER),
            super::element::Node::Text(t) => s.push_str(&escape(t)),
        }
    }
    s.push_str(&format!("</db:{}>", e.name));
    s
}

/// Asks `originating`'s authoritative server whether `key` is its dialback key for the
/// stream `id` it opened to `receiving` (XEP-0220 §2.2): a separate stream, TLS as usual.
pub async fn verify_dialback(
    edge: &XmppEdge,
    receiving: &str,
    originating: &str,
    id: &str,
    key: &str,
) -> Result<bool, StreamError> {
    let t = Duration::from_secs(edge.cfg.connect_timeout_secs);
    let (mut r, _, _) = secure(edge, receiving, originating).await?;
    let q = Element::new("verify", NS_DIALBACK)
        .attr("from", receiving)
        .attr("to", originating)
        .attr("id", id)
        .text(key);
    stream::write(&mut r.io, &db_xml(&q)).await?;
    loop {
        let a = r.element(t).await?;
        if a.is("verify", NS_DIALBACK) && a.get_attr("id") == Some(id) {
            let _ = stream::write(&mut r.io, "</stream:stream>").await;
            return Ok(a.get_attr("type") == Some("valid"));
        }
    }
}

fn jid(a: &Address) -> String {
    format!("{}@{}", a.user, a.domain).to_lowercase()
}

/// The recipient's own id for a message, from the native id the relay gave them.
fn their_id<'a>(native: &'a str, to: &Jid) -> Option<&'a str> {
    native
        .strip_prefix(to.bare().as_str())
        .and_then(|r| r.strip_prefix('/'))
        .filter(|s| !s.is_empty())
}

/// The stanzas for one envelope to `to`, and the native id it gets (`<bare jid>/<id>`).
pub async fn render(
    edge: &Arc<XmppEdge>,
    env: &Envelope,
    sender: &Address,
    to: &Jid,
) -> Result<(Vec<Element>, Option<String>), DeliveryError> {
    use v1::envelope::Body;
    let from = jid(sender);
    let to_s = to.bare();
    let id = env.relay_msg_id.clone();
    let native = Some(format!("{to_s}/{id}"));
    let Some(body) = env.body.as_ref() else {
        return Ok((Vec::new(), None));
    };
    let target = |r: Option<&v1::MessageRef>| {
        r.and_then(|r| their_id(&r.native_id, to))
            .map(str::to_string)
    };
    let chat = || codec::chat(&from, &to_s, &id);
    let state_err = |e: crate::edges::teams::state::StateError| {
        DeliveryError::internal("xmpp_state", e.to_string())
    };
    let stanzas = match body {
        Body::Text(t) => {
            let text = codec::render_text(t);
            vec![
                chat()
                    .child(codec::body(&text))
                    .child(codec::origin_id(&id))
                    .child(Element::new("active", codec::NS_CHATSTATES)),
            ]
        }
        Body::File(f) => vec![
            chat().child(codec::body(&f.url)).child(
                Element::new("x", codec::NS_OOB)
                    .child(Element::new("url", codec::NS_OOB).text(&f.url))
                    .child(Element::new("desc", codec::NS_OOB).text(&f.name)),
            ),
        ],
        Body::Edit(e) => {
            let text = e.new_body.as_ref().map(codec::render_text).unwrap_or_default();
            match target(e.target.as_ref()) {
                Some(t) => vec![
                    chat()
                        .child(codec::body(&text))
                        .child(Element::new("replace", codec::NS_CORRECT).attr("id", t))
                        .child(codec::origin_id(&id)),
                ],
                None => vec![chat().child(codec::body(&format!("✏️ {text}")))],
            }
        }
        Body::Delete(d) => match target(d.target.as_ref()) {
            Some(t) => vec![
                chat()
                    .child(Element::new("retract", codec::NS_RETRACT).attr("id", t))
                    .child(
                        Element::new("fallback", codec::NS_FALLBACK)
                            .attr("for", codec::NS_RETRACT),
                    )
                    .child(codec::body(
                        "This person attempted to retract a previous message, but it's unsupported by your client.",
                    )),
            ],
            None => Vec::new(),
        },
        Body::Reaction(r) => {
            let Some(t) = target(r.target.as_ref()) else {
                return Ok((
                    vec![chat().child(codec::body(&format!("reacted {}", r.emoji)))],
                    None,
                ));
            };
            // XEP-0444 sends the sender's whole set for the message.
            let who = format!("{from}>{to_s}");
            let mut set = edge.reactions(&who, &t).await.map_err(state_err)?;
            set.retain(|e| *e != r.emoji);
            if r.added {
                set.push(r.emoji.clone());
            }
            edge.set_reactions(&who, &t, &set).await.map_err(state_err)?;
            let mut re = Element::new("reactions", codec::NS_REACTIONS).attr("id", t);
            for e in &set {
                re = re.child(Element::new("reaction", codec::NS_REACTIONS).text(e));
            }
            vec![
                chat()
                    .child(re)
                    .child(Element::new("store", "urn:xmpp:hints")),
            ]
        }
        Body::Typing(ty) => {
            let state = if ty.active { "composing" } else { "paused" };
            vec![
                Element::new("message", NS_SERVER)
                    .attr("type", "chat")
                    .attr("from", &from)
                    .attr("to", &to_s)
                    .child(Element::new(state, codec::NS_CHATSTATES))
                    .child(Element::new("no-store", "urn:xmpp:hints")),
            ]
        }
        Body::Presence(p) => vec![presence(&from, &to_s, p)],
        Body::ContactRequest(c) => vec![
            Element::new("presence", NS_SERVER)
                .attr("type", "subscribe")
                .attr("from", &from)
                .attr("to", &to_s)
                .attr("id", &id)
                .child(Element::new("status", NS_SERVER).text(&c.note)),
        ],
        Body::ContactResponse(c) if c.accepted => {
            // XMPP subscriptions go one way; the relay's contacts go both ways, so the
            // approval comes with a request to see the XMPP user's presence too.
            edge.remember_autosub(&from, &to_s)
                .await
                .map_err(state_err)?;
            vec![
                Element::new("presence", NS_SERVER)
                    .attr("type", "subscribed")
                    .attr("from", &from)
                    .attr("to", &to_s),
                Element::new("presence", NS_SERVER)
                    .attr("type", "subscribe")
                    .attr("from", &from)
                    .attr("to", &to_s),
            ]
        }
        Body::ContactResponse(_) => vec![
            Element::new("presence", NS_SERVER)
                .attr("type", "unsubscribed")
                .attr("from", &from)
                .attr("to", &to_s),
        ],
        Body::ProfileQuery(_) => vec![
            Element::new("iq", NS_SERVER)
                .attr("type", "get")
                .attr("from", &from)
                .attr("to", &to_s)
                .attr("id", &id)
                .child(Element::new("vCard", codec::NS_VCARD)),
        ],
        Body::Profile(p) => match edge.take_query(&from, &to_s).await.map_err(state_err)? {
            Some(pending) => {
                let (iq_id, full) = pending.split_once(' ').unwrap_or((pending.as_str(), ""));
                vec![
                    Element::new("iq", NS_SERVER)
                        .attr("type", "result")
                        .attr("from", &from)
                        .attr("to", if full.is_empty() { to_s.as_str() } else { full })
                        .attr("id", iq_id)
                        .child(codec::vcard(p)),
                ]
            }
            // Nobody is waiting for it: a vCard cannot be pushed.
            None => Vec::new(),
        },
        Body::Error(e) => {
            let about = e
                .about
                .as_ref()
                .and_then(|a| their_id(&a.native_id, to).map(str::to_string));
            match about {
                Some(orig) => vec![
                    Element::new("message", NS_SERVER)
                        .attr("type", "error")
                        .attr("from", &from)
                        .attr("to", &to_s)
                        .attr("id", orig)
                        .child(
                            Element::new("error", NS_SERVER)
                                .attr("type", "cancel")
                                .child(Element::new(
                                    "recipient-unavailable",
                                    stream::NS_STANZAS,
                                ))
                                .child(
                                    Element::new("text", stream::NS_STANZAS)
                                        .attr("xml:lang", "en")
                                        .text(format!("{}: {}", e.code, e.detail)),
                                ),
                        ),
                ],
                None => vec![chat().child(codec::body(&format!(
                    "⚠️ A message could not be delivered ({}): {}",
                    e.code, e.detail
                )))],
            }
        }
        Body::ChannelInvite(c) => vec![chat().child(codec::body(&format!(
            "invited you to the channel {} ({})",
            c.channel_name, c.channel_id
        )))],
        Body::Membership(m) => {
            let verb = match v1::membership::Change::try_from(m.change) {
                Ok(v1::membership::Change::Left) => "left",
                _ => "joined",
            };
            vec![chat().child(codec::body(&format!("{verb} the conversation")))]
        }
    };
    let native = match body {
        Body::Text(_) | Body::File(_) => native,
        _ => None,
    };
    Ok((stanzas, native))
}

fn presence(from: &str, to: &str, p: &v1::Presence) -> Element {
    use v1::presence::Availability as A;
    let mut e = Element::new("presence", NS_SERVER)
        .attr("from", from)
        .attr("to", to);
    let show = match A::try_from(p.availability) {
        Ok(A::Offline) => {
            return e.attr("type", "unavailable");
        }
        Ok(A::Away) => "away",
        Ok(A::Busy) | Ok(A::DoNotDisturb) => "dnd",
        _ => "",
    };
    if !show.is_empty() {
        e = e.child(Element::new("show", NS_SERVER).text(show));
    }
    e.child(Element::new("status", NS_SERVER).text(&p.note))
}
