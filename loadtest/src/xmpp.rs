//! `--protocol xmpp`: the harness plays a remote XMPP server (default `xmpp.load`) whose users
//! message the harness's HTTP-edge users over server-to-server streams into the relay's XMPP
//! edge, as a Prosody or ejabberd would.
//!
//! - [`XmppClient`]: streams to the relay, each authenticated for one (remote domain →
//!   receiving domain) pair: TCP, STARTTLS, SASL EXTERNAL with the remote domain's
//!   certificate, Stream Management (XEP-0198). Stanzas are written in batches, each followed
//!   by `<r/>`; the relay's `<a h='N'/>` counts the stanzas it has finished (journaled, or
//!   answered with an error) in order, and answers the sends it covers.
//! - [`XmppSink`]: the remote domain's own listener, where the relay connects to send back
//!   what it refuses: `<message type='error'>` answers come on a stream of their own (s2s
//!   streams go one way), possibly after the `<a/>` that covered the stanza. They are routed
//!   by the stanza id to the current run and counted as send errors.
//!
//! Both only talk to the relay, so the XML reader is small and tolerant ([`scan`]): it finds
//! the stream header, whole top-level elements and the stream's end, and is no general parser.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::plan::xml_escape;
use crate::receiver::Router;

const NS_SM: &str = "urn:xmpp:sm:3";
/// Stanzas written at most per batch (one `<r/>` each).
const MAX_BATCH: usize = 256;
/// The deadline of each step of a stream's set-up.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest element the reader waits for (the relay's stanzas are far smaller).
const MAX_ELEMENT: usize = 1 << 20;

// ---------------------------------------------------------------------------------------------
// The tolerant reader.

/// One complete top-level element: its qualified name, attributes and whole text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frag {
    pub name: String,
    pub attrs: Vec<(String, String)>,
    pub raw: String,
}

impl Frag {
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The name without its prefix (`stream:features` → `features`).
    pub fn local_name(&self) -> &str {
        self.name.rsplit(':').next().unwrap_or(&self.name)
    }

    /// The error condition inside (a stream error's first child, or a stanza's `<error>`'s
    /// first child, not `text`), and the `<text>` if there is one: `condition: text`.
    pub fn condition(&self) -> String {
        let inner = match self.local_name() {
            "error" if self.name.starts_with("stream:") => self.raw.as_str(),
            _ => match self.raw.find("<error") {
                Some(i) => &self.raw[i + 1..],
                None => return "unknown".into(),
            },
        };
        let mut cond = None;
        let mut text = None;
        for tag in inner.split('<').skip(1) {
            let name: String = tag
                .chars()
                .take_while(|c| !c.is_whitespace() && *c != '>' && *c != '/')
                .collect();
            if name.is_empty() || name.starts_with('!') || name.starts_with('?') {
                continue;
            }
            let local = name.rsplit(':').next().unwrap_or(&name);
            match local {
                "error" => {}
                "text" if text.is_none() => {
                    text = tag.split_once('>').map(|(_, t)| unescape(t.trim()));
                }
                "text" => {}
                _ if cond.is_none() => cond = Some(local.to_owned()),
                _ => {}
            }
        }
        let cond = cond.unwrap_or_else(|| "unknown".into());
        match text.filter(|t| !t.is_empty()) {
            Some(t) => format!("{cond}: {t}"),
            None => cond,
        }
    }
}

/// What the reader found at the top level of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// `<stream:stream …>`: its attributes.
    Header(Vec<(String, String)>),
    /// A complete element below the stream.
    Element(Frag),
    /// `</stream:stream>`.
    Close,
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&apos;", "'")
        .replace("&quot;", "\"")
        .replace("&amp;", "&")
}

/// The index of the `>` that ends the tag starting at `start` (a `<`), skipping quoted
/// attribute values; `None` if it has not arrived yet.
fn tag_end(buf: &[u8], start: usize) -> Option<usize> {
    let mut quote = None;
    for (i, &b) in buf.iter().enumerate().skip(start + 1) {
        match (quote, b) {
            (None, b'\'' | b'"') => quote = Some(b),
            (Some(q), _) if b == q => quote = None,
            (None, b'>') => return Some(i),
            _ => {}
        }
    }
    None
}

/// The name, attributes and self-closing flag of a start tag (`<…>`).
fn parse_tag(tag: &str) -> (String, Vec<(String, String)>, bool) {
    let inner = tag.trim_start_matches('<').trim_end_matches('>');
    let self_closing = inner.ends_with('/');
    let inner = inner.trim_end_matches('/');
    let name_end = inner.find(char::is_whitespace).unwrap_or(inner.len());
    let name = inner[..name_end].to_owned();
    let mut attrs = Vec::new();
    let mut rest = &inner[name_end..];
    loop {
        rest = rest.trim_start();
        let Some(eq) = rest.find('=') else { break };
        let key = rest[..eq].trim().to_owned();
        let after = rest[eq + 1..].trim_start();
        let Some(q) = after.chars().next().filter(|c| *c == '\'' || *c == '"') else {
            break;
        };
        let Some(close) = after[1..].find(q) else {
            break;
        };
        attrs.push((key, unescape(&after[1..1 + close])));
        rest = &after[close + 2..];
    }
    (name, attrs, self_closing)
}

/// Finds the next item at the start of `buf` (after whitespace, prologs and comments): the
/// item and how many bytes it used, or `None` if it is not complete yet.
pub fn scan(buf: &[u8]) -> Result<Option<(Item, usize)>> {
    let mut pos = 0;
    loop {
        let Some(lt) = buf[pos..].iter().position(|&b| b == b'<').map(|p| p + pos) else {
            return Ok(None);
        };
        let Some(end) = tag_end(buf, lt) else {
            return Ok(None);
        };
        let tag = String::from_utf8_lossy(&buf[lt..=end]);
        if tag.starts_with("<?") || tag.starts_with("<!") {
            pos = end + 1;
            continue;
        }
        if let Some(name) = tag.strip_prefix("</") {
            let name = name.trim_end_matches('>').trim();
            if name == "stream:stream" {
                return Ok(Some((Item::Close, end + 1)));
            }
            bail!("unexpected end tag {tag}");
        }
        let (name, attrs, self_closing) = parse_tag(&tag);
        if name == "stream:stream" {
            return Ok(Some((Item::Header(attrs), end + 1)));
        }
        if self_closing {
            let raw = tag.into_owned();
            return Ok(Some((Item::Element(Frag { name, attrs, raw }), end + 1)));
        }
        let mut depth = 1usize;
        let mut p = end + 1;
        while depth > 0 {
            let Some(next) = buf[p..].iter().position(|&b| b == b'<').map(|x| x + p) else {
                return Ok(None);
            };
            let Some(e) = tag_end(buf, next) else {
                return Ok(None);
            };
            match (buf.get(next + 1), buf.get(e.saturating_sub(1))) {
                (Some(b'/'), _) => depth -= 1,
                (Some(b'?' | b'!'), _) | (_, Some(b'/')) => {}
                _ => depth += 1,
            }
            p = e + 1;
        }
        let raw = String::from_utf8_lossy(&buf[lt..p]).into_owned();
        return Ok(Some((Item::Element(Frag { name, attrs, raw }), p)));
    }
}

/// Reads until the next item, within `t`.
async fn next_item<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
    t: Duration,
) -> Result<Item> {
    let read = async {
        loop {
            if let Some((item, used)) = scan(buf)? {
                buf.drain(..used);
                return Ok(item);
            }
            if buf.len() > MAX_ELEMENT {
                bail!("an element of more than {MAX_ELEMENT} bytes");
            }
            let mut chunk = [0u8; 8192];
            let n = s.read(&mut chunk).await.context("reading the stream")?;
            if n == 0 {
                bail!("the connection closed");
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(t, read)
        .await
        .map_err(|_| anyhow!("no answer within {t:?}"))?
}

/// The next element, which must be `local` (a stream error or anything else is an error
/// naming what came instead).
async fn expect<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
    local: &str,
    what: &str,
) -> Result<Frag> {
    match next_item(s, buf, STEP_TIMEOUT).await? {
        Item::Element(f) if f.local_name() == local => Ok(f),
        Item::Element(f) if f.name == "stream:error" => {
            bail!("{what}: the relay sent stream error {}", f.condition())
        }
        Item::Element(f) => bail!("{what}: expected <{local}>, got {}", f.raw),
        Item::Header(_) => bail!("{what}: expected <{local}>, got a stream header"),
        Item::Close => bail!("{what}: the relay closed the stream"),
    }
}

/// Reads the relay's stream header and features.
async fn header_and_features<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
    what: &str,
) -> Result<Frag> {
    match next_item(s, buf, STEP_TIMEOUT).await? {
        Item::Header(_) => {}
        Item::Element(f) if f.name == "stream:error" => {
            bail!("{what}: the relay sent stream error {}", f.condition())
        }
        other => bail!("{what}: expected the relay's stream header, got {other:?}"),
    }
    expect(s, buf, "features", what).await
}

/// A stream header from `from` to `to`.
fn header(from: &str, to: &str, id: Option<&str>) -> String {
    let mut h = format!(
        "<?xml version='1.0'?><stream:stream xmlns='jabber:server' \
         xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' \
         from='{}' to='{}' version='1.0'",
        xml_escape(from),
        xml_escape(to)
    );
    if let Some(id) = id {
        h.push_str(&format!(" id='{}'", xml_escape(id)));
    }
    h.push('>');
    h
}

async fn write<S: AsyncWrite + Unpin>(s: &mut S, text: &str) -> Result<()> {
    s.write_all(text.as_bytes())
        .await
        .context("writing to the stream")?;
    s.flush().await.context("writing to the stream")
}

// ---------------------------------------------------------------------------------------------
// TLS material.

fn pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no PEM certificate", path.display());
    }
    Ok(certs)
}

fn pem_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .with_context(|| format!("parsing {}", path.display()))?
        .ok_or_else(|| anyhow!("{} holds no PEM private key", path.display()))
}

/// The client side of the streams: trusts `ca` (else the system's roots) for the relay's
/// certificate, and presents `cert` (the remote domain's) for SASL EXTERNAL.
pub fn client_tls(ca: Option<&Path>, cert: &Path, key: &Path) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(ca) => {
            for c in pem_certs(ca)? {
                roots.add(c).context("adding a CA certificate")?;
            }
        }
        None => {
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(c);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_client_auth_cert(pem_certs(cert)?, pem_key(key)?)
        .context("the XMPP client certificate and key")?;
    Ok(Arc::new(config))
}

/// The remote domain's own listener: its certificate, no client certificate asked for (the
/// relay's SASL EXTERNAL is taken at its word: this listener only counts refusals).
pub fn server_tls(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(pem_certs(cert)?, pem_key(key)?)
        .context("the XMPP server certificate and key")?;
    Ok(Arc::new(config))
}

// ---------------------------------------------------------------------------------------------
// Streams to the relay.

type TlsClient = tokio_rustls::client::TlsStream<TcpStream>;

/// Opens one authenticated stream from `from` to `to` at `addr`: STARTTLS, SASL EXTERNAL,
/// Stream Management. Returns the TLS stream and whatever was read past `<enabled/>`.
pub async fn open_stream(
    addr: &str,
    from: &str,
    to: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Result<(TlsClient, Vec<u8>)> {
    let mut tcp = tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow!("connecting to {addr} timed out"))?
        .with_context(|| format!("connecting to {addr}"))?;
    let _ = tcp.set_nodelay(true);
    let mut buf = Vec::new();
    write(&mut tcp, &header(from, to, None)).await?;
    let f = header_and_features(&mut tcp, &mut buf, "opening the stream").await?;
    if !f.raw.contains("starttls") {
        bail!("the relay does not offer STARTTLS: {}", f.raw);
    }
    write(
        &mut tcp,
        "<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>",
    )
    .await?;
    expect(&mut tcp, &mut buf, "proceed", "STARTTLS").await?;
    if !buf.is_empty() {
        bail!("STARTTLS: data after <proceed/>");
    }
    let name = ServerName::try_from(to.to_owned()).with_context(|| format!("bad domain {to}"))?;
    let mut s = tokio::time::timeout(
        STEP_TIMEOUT,
        tokio_rustls::TlsConnector::from(tls).connect(name, tcp),
    )
    .await
    .map_err(|_| anyhow!("the TLS handshake with {addr} timed out"))?
    .with_context(|| format!("the TLS handshake with {addr} (as {to})"))?;
    write(&mut s, &header(from, to, None)).await?;
    let f = header_and_features(&mut s, &mut buf, "after STARTTLS").await?;
    if !f.raw.contains("EXTERNAL") {
        bail!(
            "the relay offers no SASL EXTERNAL for {from} (is {from} an XMPP peer with \
             auth = \"external\" there, and does it trust the CA of {from}'s certificate?): {}",
            f.raw
        );
    }
    write(
        &mut s,
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>",
    )
    .await?;
    expect(&mut s, &mut buf, "success", "SASL EXTERNAL").await?;
    write(&mut s, &header(from, to, None)).await?;
    let f = header_and_features(&mut s, &mut buf, "after SASL").await?;
    if !f.raw.contains(NS_SM) {
        bail!(
            "the relay offers no Stream Management (XEP-0198): {}",
            f.raw
        );
    }
    write(&mut s, "<enable xmlns='urn:xmpp:sm:3'/>").await?;
    expect(&mut s, &mut buf, "enabled", "enabling Stream Management").await?;
    Ok((s, buf))
}

/// What a send on a stream ended with: acknowledged, or why not.
pub type AckReply = oneshot::Sender<Result<(), String>>;

/// One open stream: stanzas go out in batches, each batch followed by `<r/>`; the relay's
/// `<a h='N'/>` answers the first N sends, in order.
pub struct XmppLink {
    tx: mpsc::UnboundedSender<String>,
    waiting: Arc<Mutex<VecDeque<AckReply>>>,
    dead: Arc<AtomicBool>,
}

/// How a stream ended, for the sends it had not answered: a label for the error counts and a
/// description for the run's warnings.
struct Ending {
    label: String,
    detail: Option<String>,
}

impl XmppLink {
    fn start(
        stream: TlsClient,
        buf: Vec<u8>,
        name: String,
        errors: Arc<Mutex<Vec<String>>>,
    ) -> Arc<Self> {
        let (rd, mut wr) = tokio::io::split(stream);
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        let waiting: Arc<Mutex<VecDeque<AckReply>>> = Arc::new(Mutex::new(VecDeque::new()));
        let dead = Arc::new(AtomicBool::new(false));
        let link = Arc::new(Self {
            tx,
            waiting: waiting.clone(),
            dead: dead.clone(),
        });
        // Fails every send not yet answered, once, and marks the stream dead.
        let finish = {
            let (waiting, dead) = (waiting.clone(), dead.clone());
            move |end: Ending| {
                let mut w = waiting.lock().unwrap_or_else(|p| p.into_inner());
                if dead.swap(true, Ordering::AcqRel) {
                    return;
                }
                if let Some(d) = end.detail
                    && let Ok(mut e) = errors.lock()
                {
                    e.push(format!("{name}: {d}"));
                }
                for reply in w.drain(..) {
                    let _ = reply.send(Err(end.label.clone()));
                }
            }
        };
        let finish = Arc::new(finish);
        let on_write_end = finish.clone();
        tokio::spawn(async move {
            let mut out = String::new();
            while let Some(first) = rx.recv().await {
                out.clear();
                out.push_str(&first);
                for _ in 1..MAX_BATCH {
                    match rx.try_recv() {
                        Ok(s) => out.push_str(&s),
                        Err(_) => break,
                    }
                }
                out.push_str("<r xmlns='urn:xmpp:sm:3'/>");
                if let Err(e) = write(&mut wr, &out).await {
                    on_write_end(Ending {
                        label: "stream_closed".into(),
                        detail: Some(format!("{e:#}")),
                    });
                    return;
                }
            }
            let _ = write(&mut wr, "</stream:stream>").await;
        });
        tokio::spawn(async move {
            let mut rd = rd;
            let mut buf = buf;
            let mut acked = 0u64;
            let end = loop {
                let item = match next_item(&mut rd, &mut buf, Duration::from_secs(24 * 3600)).await
                {
                    Ok(i) => i,
                    Err(e) => {
                        break Ending {
                            label: "stream_closed".into(),
                            detail: Some(format!("{e:#}")),
                        };
                    }
                };
                match item {
                    Item::Element(f) if f.local_name() == "a" => {
                        let Some(h) = f.attr("h").and_then(|h| h.parse::<u64>().ok()) else {
                            continue;
                        };
                        let mut w = waiting.lock().unwrap_or_else(|p| p.into_inner());
                        while acked < h {
                            match w.pop_front() {
                                Some(reply) => {
                                    let _ = reply.send(Ok(()));
                                }
                                None => break,
                            }
                            acked += 1;
                        }
                    }
                    Item::Element(f) if f.name == "stream:error" => {
                        let cond = f.condition();
                        let short = cond.split(':').next().unwrap_or("unknown").to_owned();
                        break Ending {
                            label: format!("stream_error:{short}"),
                            detail: Some(format!("stream error {cond}")),
                        };
                    }
                    Item::Element(f) if f.local_name() == "failed" => {
                        break Ending {
                            label: "sm_failed".into(),
                            detail: Some(format!("Stream Management failed: {}", f.raw)),
                        };
                    }
                    Item::Element(_) | Item::Header(_) => {}
                    Item::Close => {
                        break Ending {
                            label: "stream_closed".into(),
                            detail: Some("the relay closed the stream".into()),
                        };
                    }
                }
            };
            finish(end);
        });
        link
    }

    /// Queues one stanza; the receiver gets `Ok` once the relay's `h` covers it, or the label
    /// of what ended the stream first. `None` if the stream has ended.
    pub fn send(&self, stanza: String) -> Option<oneshot::Receiver<Result<(), String>>> {
        let (reply, rx) = oneshot::channel();
        // Queue the waiter and the stanza under one lock so acks meet their sends in order.
        let mut w = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if self.dead.load(Ordering::Acquire) {
            return None;
        }
        w.push_back(reply);
        if self.tx.send(stanza).is_err() {
            w.pop_back();
            return None;
        }
        Some(rx)
    }

    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }
}

/// Where the streams go and as whom.
#[derive(Debug, Clone)]
pub struct XmppClientSpec {
    /// The remote domain the harness plays (`from` of every stream and stanza).
    pub domain: String,
    /// `host:port` of each node's XMPP listener.
    pub addrs: Vec<String>,
    /// The receiving domains, by index (the harness's HTTP-edge domains).
    pub targets: Vec<String>,
    /// Streams in all (`--xmpp-connections`), rounded up to a multiple of the targets.
    pub connections: usize,
    pub tls: Arc<rustls::ClientConfig>,
}

/// The streams of a run: `per_domain` per receiving domain, opened up front and again after
/// one ends; each sender always uses the same one.
pub struct XmppClient {
    spec: XmppClientSpec,
    per_domain: usize,
    slots: Vec<tokio::sync::Mutex<Option<Arc<XmppLink>>>>,
    errors: Arc<Mutex<Vec<String>>>,
    opened: AtomicU64,
}

impl std::fmt::Debug for XmppClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XmppClient")
            .field("domain", &self.spec.domain)
            .field("addrs", &self.spec.addrs)
            .field("streams", &self.slots.len())
            .finish_non_exhaustive()
    }
}

impl XmppClient {
    pub fn new(spec: XmppClientSpec) -> Result<Self> {
        if spec.addrs.is_empty() {
            bail!("no XMPP listener to connect to");
        }
        if spec.targets.is_empty() {
            bail!("no receiving domain for the XMPP streams");
        }
        let per_domain = spec.connections.max(1).div_ceil(spec.targets.len());
        let slots = (0..per_domain * spec.targets.len())
            .map(|_| tokio::sync::Mutex::new(None))
            .collect();
        Ok(Self {
            spec,
            per_domain,
            slots,
            errors: Arc::new(Mutex::new(Vec::new())),
            opened: AtomicU64::new(0),
        })
    }

    /// The remote domain the harness plays.
    pub fn domain(&self) -> &str {
        &self.spec.domain
    }

    /// The XMPP listeners the streams go to.
    pub fn addrs(&self) -> &[String] {
        &self.spec.addrs
    }

    /// Streams in all.
    pub fn streams(&self) -> usize {
        self.slots.len()
    }

    /// Streams opened so far (reconnects included).
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// How streams ended before their time since the last call (stream errors the relay sent,
    /// closes), for the run's warnings.
    pub fn take_errors(&self) -> Vec<String> {
        self.errors
            .lock()
            .map(|mut e| std::mem::take(&mut *e))
            .unwrap_or_default()
    }

    /// The stream sender `sender` uses to reach domain `domain`: the same one every time, so
    /// a sender's stanzas keep their order; senders are spread evenly (Fibonacci hashing).
    pub fn slot_of(&self, domain: usize, sender: usize) -> usize {
        let h = (sender as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
        domain * self.per_domain + (h % self.per_domain as u64) as usize
    }

    /// The open stream of `slot`, opened (again) if it has none or it ended.
    pub async fn link(&self, slot: usize) -> Result<Arc<XmppLink>> {
        let Some(cell) = self.slots.get(slot) else {
            bail!("no XMPP stream {slot}");
        };
        let mut cell = cell.lock().await;
        if let Some(l) = cell.as_ref()
            && !l.is_dead()
        {
            return Ok(l.clone());
        }
        let domain = slot / self.per_domain;
        let to = self
            .spec
            .targets
            .get(domain)
            .ok_or_else(|| anyhow!("no domain {domain}"))?;
        let addr = &self.spec.addrs[slot % self.spec.addrs.len()];
        let (stream, rest) = open_stream(addr, &self.spec.domain, to, self.spec.tls.clone())
            .await
            .with_context(|| format!("XMPP stream {} → {to} at {addr}", self.spec.domain))?;
        let link = XmppLink::start(
            stream,
            rest,
            format!("stream {slot} ({} → {to} at {addr})", self.spec.domain),
            self.errors.clone(),
        );
        self.opened.fetch_add(1, Ordering::Relaxed);
        *cell = Some(link.clone());
        Ok(link)
    }

    /// Opens every stream that is not open; fails with the first that could not be.
    pub async fn connect_all(&self) -> Result<()> {
        let opens = (0..self.slots.len()).map(|s| self.link(s));
        for r in futures::future::join_all(opens).await {
            r?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The remote domain's listener, for what the relay sends back.

/// Counters of the listener.
#[derive(Debug, Default)]
pub struct SinkCounters {
    pub streams: AtomicU64,
    pub stanzas: AtomicU64,
    pub errors: AtomicU64,
}

/// The remote domain's XMPP listener: accepts the relay's streams (STARTTLS, SASL EXTERNAL,
/// Stream Management) and counts every `type='error'` stanza as a refusal of the event its id
/// names.
#[derive(Debug)]
pub struct XmppSink {
    pub addr: SocketAddr,
    pub counters: Arc<SinkCounters>,
    task: JoinHandle<()>,
}

impl Drop for XmppSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl XmppSink {
    /// Serves `listener` as `domain` with `tls`, routing refusals through `router`.
    pub fn serve(
        listener: TcpListener,
        domain: String,
        tls: Arc<rustls::ServerConfig>,
        router: Arc<Router>,
    ) -> Result<Self> {
        let addr = listener
            .local_addr()
            .context("the XMPP listener's address")?;
        let counters = Arc::new(SinkCounters::default());
        let c = counters.clone();
        let task = tokio::spawn(async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    a = listener.accept() => {
                        let Ok((tcp, _)) = a else { continue };
                        let _ = tcp.set_nodelay(true);
                        let (acceptor, domain, router, c) =
                            (acceptor.clone(), domain.clone(), router.clone(), c.clone());
                        conns.spawn(async move {
                            let _ = sink_stream(tcp, acceptor, &domain, &router, &c).await;
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(Self {
            addr,
            counters,
            task,
        })
    }
}

fn features(inner: &str) -> String {
    format!("<stream:features>{inner}</stream:features>")
}

/// One stream from the relay: answers its set-up, then counts stanzas, acknowledges them and
/// routes errors.
async fn sink_stream(
    mut tcp: TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    domain: &str,
    router: &Router,
    c: &SinkCounters,
) -> Result<()> {
    let mut buf = Vec::new();
    let peer = |attrs: &[(String, String)]| {
        attrs
            .iter()
            .find(|(k, _)| k == "from")
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let id = crate::plan::random_hex(8)?;
    let Item::Header(h) = next_item(&mut tcp, &mut buf, STEP_TIMEOUT).await? else {
        bail!("expected a stream header");
    };
    let from = peer(&h);
    write(
        &mut tcp,
        &format!(
            "{}{}",
            header(domain, &from, Some(&id)),
            features("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls>")
        ),
    )
    .await?;
    expect(&mut tcp, &mut buf, "starttls", "STARTTLS").await?;
    write(
        &mut tcp,
        "<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>",
    )
    .await?;
    let mut s = tokio::time::timeout(STEP_TIMEOUT, acceptor.accept(tcp))
        .await
        .map_err(|_| anyhow!("TLS handshake timed out"))??;
    buf.clear();
    let mut authed = false;
    loop {
        let Item::Header(h) = next_item(&mut s, &mut buf, STEP_TIMEOUT).await? else {
            bail!("expected a stream header");
        };
        let from = peer(&h);
        let offer = if authed {
            format!("<sm xmlns='{NS_SM}'/>")
        } else {
            "<mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>EXTERNAL</mechanism></mechanisms>"
                .to_owned()
        };
        write(
            &mut s,
            &format!("{}{}", header(domain, &from, Some(&id)), features(&offer)),
        )
        .await?;
        if authed {
            break;
        }
        expect(&mut s, &mut buf, "auth", "SASL").await?;
        write(
            &mut s,
            "<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>",
        )
        .await?;
        authed = true;
    }
    c.streams.fetch_add(1, Ordering::Relaxed);
    let mut h = 0u64;
    loop {
        match next_item(&mut s, &mut buf, Duration::from_secs(24 * 3600)).await? {
            Item::Element(f) => match f.local_name() {
                "enable" => write(&mut s, "<enabled xmlns='urn:xmpp:sm:3'/>").await?,
                "r" => write(&mut s, &format!("<a xmlns='urn:xmpp:sm:3' h='{h}'/>")).await?,
                "a" => {}
                "message" | "presence" | "iq" => {
                    h += 1;
                    c.stanzas.fetch_add(1, Ordering::Relaxed);
                    if f.attr("type") == Some("error") {
                        c.errors.fetch_add(1, Ordering::Relaxed);
                        let cond = f.condition();
                        let short = cond.split(':').next().unwrap_or("unknown");
                        router.refused(f.attr("id").unwrap_or(""), &format!("xmpp_error:{short}"));
                    }
                }
                _ => {}
            },
            Item::Header(_) => bail!("a second stream header"),
            Item::Close => {
                let _ = write(&mut s, "</stream:stream>").await;
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(mut text: &[u8]) -> Result<Vec<Item>> {
        let mut out = Vec::new();
        while let Some((item, used)) = scan(text)? {
            out.push(item);
            text = &text[used..];
        }
        Ok(out)
    }

    #[test]
    fn reads_headers_elements_and_the_end() -> Result<()> {
        let text = b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' from='a.example' \
            id='x&amp;y'><stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'>\
            <required/></starttls></stream:features> <a xmlns='urn:xmpp:sm:3' h='12'/>\
            <message to=\"b>c\" type='error' id='lt-r-3'><body>x &gt; y</body><error type='wait'>\
            <internal-server-error xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/><text xml:lang='en'>\
            try again</text></error></message></stream:stream>";
        let v = items(text)?;
        assert_eq!(v.len(), 5, "{v:?}");
        let Item::Header(h) = &v[0] else {
            bail!("not a header: {:?}", v[0])
        };
        assert!(h.contains(&("id".to_owned(), "x&y".to_owned())));
        let Item::Element(f) = &v[1] else {
            bail!("not an element")
        };
        assert_eq!(f.local_name(), "features");
        assert!(f.raw.contains("<required/>") && f.raw.ends_with("</stream:features>"));
        let Item::Element(a) = &v[2] else {
            bail!("not an element")
        };
        assert_eq!((a.local_name(), a.attr("h")), ("a", Some("12")));
        let Item::Element(m) = &v[3] else {
            bail!("not an element")
        };
        assert_eq!(m.attr("to"), Some("b>c"));
        assert_eq!(m.attr("id"), Some("lt-r-3"));
        assert_eq!(m.condition(), "internal-server-error: try again");
        assert_eq!(v[4], Item::Close);
        Ok(())
    }

    #[test]
    fn incomplete_input_waits() -> Result<()> {
        let whole = b"<message id='1'><body>hi</body></message>";
        for cut in 0..whole.len() {
            assert_eq!(scan(&whole[..cut])?, None, "cut at {cut}");
        }
        assert!(scan(whole)?.is_some());
        assert_eq!(scan(b"   ")?, None);
        assert!(scan(b"</foo>").is_err());
        Ok(())
    }

    #[test]
    fn stream_error_conditions() -> Result<()> {
        let v = items(
            b"<stream:error><host-unknown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>\
              <text xmlns='urn:ietf:params:xml:ns:xmpp-streams' xml:lang='en'>that domain is \
              not hosted here</text></stream:error><stream:error><invalid-from/></stream:error>",
        )?;
        let conds: Vec<String> = v
            .iter()
            .filter_map(|i| match i {
                Item::Element(f) => Some(f.condition()),
                _ => None,
            })
            .collect();
        assert_eq!(
            conds,
            vec![
                "host-unknown: that domain is not hosted here".to_owned(),
                "invalid-from".to_owned()
            ]
        );
        Ok(())
    }

    #[test]
    fn headers_name_both_ends() {
        let h = header("xmpp.load", "d0.loadtest.example", None);
        assert!(h.starts_with("<?xml version='1.0'?><stream:stream xmlns='jabber:server'"));
        assert!(h.contains("from='xmpp.load' to='d0.loadtest.example' version='1.0'"));
        assert!(h.ends_with("'>"));
        assert!(header("a", "b", Some("i")).contains(" id='i'"));
    }

    #[test]
    fn senders_spread_over_the_streams_of_their_domain() -> Result<()> {
        let tls = {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            Arc::new(
                rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()?
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth(),
            )
        };
        let c = XmppClient::new(XmppClientSpec {
            domain: "xmpp.load".into(),
            addrs: vec!["127.0.0.1:1".into()],
            targets: vec!["a".into(), "b".into()],
            connections: 7,
            tls,
        })?;
        assert_eq!(c.streams(), 8, "rounded up to a multiple of the domains");
        let mut per = [0usize; 8];
        // Senders 0, 4, 8, … all reach domain 1 (an arithmetic progression).
        for s in (0..4000).step_by(4) {
            let slot = c.slot_of(1, s);
            assert!((4..8).contains(&slot), "{slot}");
            assert_eq!(slot, c.slot_of(1, s), "always the same stream");
            per[slot] += 1;
        }
        assert!(
            per[4..].iter().all(|&n| (200..=300).contains(&n)),
            "{per:?}"
        );
        Ok(())
    }
}
