//! The SIP/SIMPLE edge: Skype for Business, Lync, Cisco and other SIP systems federate IM and
//! presence with the relay's users over SIP (RFC 3261) on UDP, TCP and TLS.
//!
//! - `msg`: the message parser and serializer; `transport`: sockets, connections, framing;
//!   `txn`: server and client transactions (retransmissions, Timers A–K).
//! - `inbound`: requests from peers: who sent them (TLS certificate or source address), policy,
//!   then MESSAGE → text or typing, SUBSCRIBE/NOTIFY/PUBLISH → contact requests and presence,
//!   INVITE → an IM session.
//! - `outbound`: deliveries: MESSAGE (pager mode, or inside an IM session for peers that want
//!   one), SUBSCRIBE as a contact request, NOTIFY with PIDF for presence.
//! - `codec`: bodies; `digest`: RFC 8760 digest; `resolve`: NAPTR/SRV; `tls`: RFC 5922.
//!
//! What SIP users see, with ladder diagrams, is in `docs/sip.md`.

pub mod codec;
pub mod digest;
pub mod inbound;
pub mod msg;
pub mod net;
pub mod outbound;
pub mod ratelimit;
pub mod resolve;
pub mod tls;
pub mod transport;
pub mod txn;

use crate::config::{Config, ConfigError, Platform, SipConfig, SipTransport};
use crate::control::policy::Policy;
use crate::edges::teams::state::{Kv, StateError};
use bytes::Bytes;
use fedrelay_proto::{Address, Envelope, v1};
use msg::Message;
use net::IpNet;
use session_actor::{Accepted, DeliveryError, Ingress, MetadataSink, SessionError};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::watch;
use tracing::debug;
use transport::{Listeners, Transport};

/// The SIP edge.
pub struct SipEdge {
    pub(crate) cfg: SipConfig,
    /// Every declared domain (lowercase) and its platform.
    pub(crate) domains: HashMap<String, Platform>,
    /// Per SIP peer domain: the networks it may send from without TLS.
    pub(crate) sources: HashMap<String, Vec<IpNet>>,
    pub(crate) policy: Arc<Policy>,
    pub(crate) tls: Option<tls::PeerCheck>,
    pub(crate) resolver: resolve::Resolver,
    pub(crate) server: txn::ServerTxns,
    pub(crate) client: txn::ClientTxns,
    pub(crate) limiter: ratelimit::Limiter,
    /// Digest credentials per peer domain: (username, password, allow MD5).
    pub(crate) credentials: HashMap<String, (String, String, bool)>,
    pub(crate) transport: OnceLock<Arc<Transport>>,
    pub(crate) stop: OnceLock<watch::Receiver<bool>>,
    pub(crate) im: outbound::ImSessions,
    /// One task at a time per stored subscription (see [`outbound::SubLocks`]).
    pub(crate) sub_locks: Arc<outbound::SubLocks>,
    kv: Box<dyn Kv>,
    prefix: String,
    ingress: OnceLock<Arc<dyn Ingress>>,
    pub(crate) metadata: Arc<dyn MetadataSink>,
}

impl std::fmt::Debug for SipEdge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SipEdge")
            .field("domains", &self.domains)
            .finish()
    }
}

/// Methods the edge takes (the `Allow` header).
pub const ALLOW: &str = "INVITE, ACK, BYE, CANCEL, OPTIONS, MESSAGE, SUBSCRIBE, NOTIFY, PUBLISH";

/// Why a request to a peer failed.
#[derive(Debug, Clone)]
pub enum SendError {
    /// The peer answered with a final non-2xx response.
    Status(u16, String),
    /// No final response within 64·T1 (Timer B/F), or the transport failed.
    Timeout,
    Transport(String),
}

impl SendError {
    /// The delivery error a session sees: retryable for timeouts, 408, 5xx and 6xx
    /// "busy/decline"-free cases; permanent for a refusal.
    pub fn to_delivery(&self) -> DeliveryError {
        match self {
            SendError::Status(c, r) if matches!(*c, 408 | 480 | 486 | 491 | 500..=599) => {
                DeliveryError::retryable(format!("sip_{c}"), r.clone())
            }
            SendError::Status(c, r) => DeliveryError::permanent(format!("sip_{c}"), r.clone()),
            SendError::Timeout => {
                DeliveryError::retryable("sip_timeout", "no response from the SIP peer")
            }
            SendError::Transport(m) => DeliveryError::retryable("sip_transport", m.clone()),
        }
    }
}

impl SipEdge {
    /// The edge for `cfg`, or `None` when it has no `[sip]` section.
    pub fn from_config(
        cfg: &Config,
        kv: Box<dyn Kv>,
        policy: Arc<Policy>,
        metadata: Arc<dyn MetadataSink>,
    ) -> Result<Option<Arc<Self>>, ConfigError> {
        let Some(s) = cfg.sip.clone() else {
            return Ok(None);
        };
        let invalid = |m: String| ConfigError::Invalid(format!("sip: {m}"));
        let domains = cfg
            .domains
            .iter()
            .map(|d| (d.name.to_ascii_lowercase(), d.platform))
            .collect();
        let mut sources = HashMap::new();
        let mut overrides = HashMap::new();
        let mut credentials = HashMap::new();
        for p in &s.peers {
            let name = p.domain.to_ascii_lowercase();
            let mut nets: Vec<IpNet> = p.sources.iter().filter_map(|x| IpNet::parse(x)).collect();
            if let Some(a) = &p.address {
                let t = resolve::static_target(a)
                    .ok_or_else(|| invalid(format!("peer `{}`: bad address", p.domain)))?;
                if p.transport != SipTransport::Tls
                    && p.sources.is_empty()
                    && let Ok(ip) = t.host.parse()
                {
                    nets.push(IpNet::host(ip));
                }
                overrides.insert(name.clone(), t);
            }
            sources.insert(name.clone(), nets);
            if let (Some(u), Some(pw)) = (&p.username, p.password()?) {
                credentials.insert(name, (u.clone(), pw, p.allow_md5));
            }
        }
        let tls = match (&s.tls_cert, &s.tls_key) {
            (Some(c), Some(k)) => Some(tls::PeerCheck(
                crate::edges::xmpp::tls::Tls::new(c, k, s.tls_ca.as_deref())
                    .map_err(|e| invalid(e.to_string()))?,
            )),
            _ => None,
        };
        let resolver =
            resolve::Resolver::new(overrides, s.dns_server).map_err(|e| invalid(e.to_string()))?;
        let linger = Duration::from_millis(s.t1_ms * 64);
        Ok(Some(Arc::new(Self {
            limiter: ratelimit::Limiter::new(s.rate_per_source, s.burst_per_source),
            cfg: s,
            domains,
            sources,
            policy,
            tls,
            resolver,
            server: txn::ServerTxns::new(linger),
            client: txn::ClientTxns::default(),
            credentials,
            transport: OnceLock::new(),
            stop: OnceLock::new(),
            im: outbound::ImSessions::default(),
            sub_locks: Arc::default(),
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

    /// Binds the listeners; [`SipEdge::serve`] then runs them.
    pub async fn bind(self: &Arc<Self>) -> std::io::Result<Listeners> {
        let tls = self
            .tls
            .as_ref()
            .map(|t| (t.0.acceptor.clone(), t.0.connector.clone()));
        let names: Arc<dyn transport::PeerNames> = match &self.tls {
            Some(t) => Arc::new(tls::PeerCheck(t.0.clone())),
            None => Arc::new(NoNames),
        };
        let (t, l) = Transport::bind(
            self.cfg.udp,
            self.cfg.tcp,
            self.cfg.tls,
            tls,
            names,
            msg::Limits {
                max_message_bytes: self.cfg.max_message_bytes,
                ..msg::Limits::default()
            },
            Duration::from_secs(self.cfg.connect_timeout_secs),
        )
        .await?;
        let _ = self.transport.set(t);
        Ok(l)
    }

    /// The bound addresses, per transport.
    pub fn local_addrs(&self) -> Vec<(SipTransport, SocketAddr)> {
        self.transport
            .get()
            .map(|t| t.local.clone())
            .unwrap_or_default()
    }

    /// Serves the listeners until `stop`, and refreshes the relay's subscriptions.
    pub fn serve(
        self: &Arc<Self>,
        l: Listeners,
        stop: watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let _ = self.stop.set(stop.clone());
        let Some(t) = self.transport.get() else {
            return Vec::new();
        };
        let mut tasks = t.serve(l, self.clone(), stop.clone());
        tasks.push(tokio::spawn(outbound::refresh_loop(self.clone(), stop)));
        tasks
    }

    pub(crate) fn t1(&self) -> Duration {
        Duration::from_millis(self.cfg.t1_ms)
    }

    pub(crate) async fn submit(&self, env: Envelope) -> Result<Accepted, SessionError> {
        crate::edges::submit(&self.ingress, "sip", env).await
    }

    /// A 1:1 envelope from a SIP user.
    pub(crate) fn envelope(
        from: &Address,
        to: &Address,
        native_id: String,
        body: v1::envelope::Body,
    ) -> Envelope {
        crate::edges::one_to_one("sip", from, to, native_id, body)
    }

    /// Records a refusal by policy in the metadata log (never content).
    pub(crate) fn record_refusal(
        &self,
        from: &Address,
        to_domain: &str,
        to_user: &str,
        code: &str,
    ) {
        crate::edges::record_refusal(self.metadata.as_ref(), from, to_domain, to_user, code);
    }

    fn key(&self, kind: &str) -> String {
        format!("{}:sip:{kind}", self.prefix)
    }

    pub(crate) async fn kv_get(
        &self,
        kind: &str,
        field: &str,
    ) -> Result<Option<String>, StateError> {
        self.kv.get(&self.key(kind), field).await
    }

    pub(crate) async fn kv_set(
        &self,
        kind: &str,
        field: &str,
        value: &str,
        ttl: Option<Duration>,
    ) -> Result<(), StateError> {
        self.kv.set(&self.key(kind), field, value, ttl).await
    }

    pub(crate) async fn kv_del(&self, kind: &str, field: &str) -> Result<(), StateError> {
        self.kv.del(&self.key(kind), field).await
    }

    pub(crate) async fn kv_all(&self, kind: &str) -> Result<HashMap<String, String>, StateError> {
        self.kv.all(&self.key(kind)).await
    }

    /// The host and port the relay names in Via and Contact for a transport.
    pub(crate) fn sent_by(&self, t: SipTransport) -> String {
        let addr = self
            .transport
            .get()
            .and_then(|x| x.local_addr(t))
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 5060)));
        let host = match &self.cfg.host {
            Some(h) => h.clone(),
            None if addr.ip().is_unspecified() => "127.0.0.1".to_string(),
            None => match addr.ip() {
                std::net::IpAddr::V6(v6) => format!("[{v6}]"),
                v4 => v4.to_string(),
            },
        };
        format!("{host}:{}", addr.port())
    }

    /// The transport configured for a peer domain (TLS when unlisted).
    pub(crate) fn transport_for(&self, domain: &str) -> SipTransport {
        self.cfg
            .peer(domain)
            .map(|p| p.transport)
            .unwrap_or_default()
    }

    /// Sends a request to a peer domain and waits for its final response, answering one
    /// digest challenge with the peer's credentials. The request gets the relay's Via (a new
    /// branch per transaction), Max-Forwards and, for a new dialog, nothing else: the caller
    /// sets From, To, Call-ID, CSeq and the rest.
    pub(crate) async fn send_request(
        self: &Arc<Self>,
        domain: &str,
        mut req: Message,
    ) -> Result<Message, SendError> {
        let (t, addr) = self.peer_addr(domain).await?;
        let mut nc = 0u32;
        loop {
            let resp = self.transaction(t, addr, domain, &req).await?;
            let code = resp.code().unwrap_or(0);
            if (code == 401 || code == 407)
                && nc == 0
                && let Some((user, pass, md5)) = self.credentials.get(domain)
            {
                let (chal_h, auth_h) = if code == 401 {
                    ("www-authenticate", "Authorization")
                } else {
                    ("proxy-authenticate", "Proxy-Authorization")
                };
                let values: Vec<&str> = resp.header_values(chal_h).collect();
                let ch = digest::pick_challenge(&values, *md5).map_err(|e| {
                    SendError::Status(code, format!("cannot answer the challenge: {e}"))
                })?;
                nc += 1;
                let method = req.method().unwrap_or("").to_string();
                let uri = req.uri().unwrap_or("").to_string();
                req.remove(auth_h);
                req.push(
                    auth_h,
                    digest::authorization(&ch, user, pass, &method, &uri, nc),
                );
                // The retried request is a new transaction with the next CSeq.
                if let Some(c) = req.cseq() {
                    req.remove("CSeq");
                    req.push("CSeq", format!("{} {}", c.seq + 1, c.method));
                }
                continue;
            }
            if code >= 300 {
                let reason = match &resp.start {
                    msg::Start::Response { reason, .. } => reason.clone(),
                    _ => String::new(),
                };
                return Err(SendError::Status(code, reason));
            }
            return Ok(resp);
        }
    }

    /// Where a peer domain is reached: its transport and first address.
    async fn peer_addr(&self, domain: &str) -> Result<(SipTransport, SocketAddr), SendError> {
        let t = self.transport_for(domain);
        let targets = self
            .resolver
            .targets(domain, t)
            .await
            .map_err(|e| SendError::Transport(e.to_string()))?;
        for target in &targets {
            if let Some(a) = self
                .resolver
                .addresses(target)
                .await
                .ok()
                .and_then(|v| v.first().copied())
            {
                return Ok((t, a));
            }
        }
        Err(SendError::Transport(format!("no address for {domain}")))
    }

    /// The request with the relay's Via on top (a new branch) and Max-Forwards.
    fn stamp(&self, t: SipTransport, req: &Message, branch: &str) -> Message {
        let mut req = req.clone();
        req.remove("Via");
        req.headers.insert(
            0,
            (
                "Via".into(),
                format!(
                    "SIP/2.0/{} {};branch={branch};rport",
                    t.via_name(),
                    self.sent_by(t)
                ),
            ),
        );
        if req.header("max-forwards").is_none() {
            req.push("Max-Forwards", "70");
        }
        req
    }

    /// The connection to use for a peer over TCP or TLS (the open one, else a new one).
    async fn conn(
        self: &Arc<Self>,
        tr: &Arc<Transport>,
        t: SipTransport,
        addr: SocketAddr,
        domain: &str,
    ) -> Result<Arc<transport::Conn>, SendError> {
        let stop = self
            .stop
            .get()
            .cloned()
            .unwrap_or_else(|| watch::channel(false).1);
        tr.connection(t, addr, domain, self.clone(), stop)
            .await
            .map_err(|e| SendError::Transport(e.to_string()))
    }

    /// Sends a request that gets no response (the ACK of a 2xx), once.
    pub(crate) async fn send_stateless(self: &Arc<Self>, domain: &str, req: Message) {
        let Ok((t, addr)) = self.peer_addr(domain).await else {
            return;
        };
        let Some(tr) = self.transport.get().cloned() else {
            return;
        };
        let b = Bytes::from(self.stamp(t, &req, &txn::new_branch()).to_bytes());
        let _ = match t {
            SipTransport::Udp => tr
                .send_udp(addr, &b)
                .await
                .map_err(|e| SendError::Transport(e.to_string())),
            _ => match self.conn(&tr, t, addr, domain).await {
                Ok(c) => c
                    .send(b)
                    .await
                    .map_err(|e| SendError::Transport(e.to_string())),
                Err(e) => Err(e),
            },
        };
    }

    /// One client transaction: the request with a new Via branch, retransmitted over UDP,
    /// until a final response or Timer B/F.
    pub(crate) async fn transaction(
        self: &Arc<Self>,
        t: SipTransport,
        addr: SocketAddr,
        domain: &str,
        req: &Message,
    ) -> Result<Message, SendError> {
        let Some(tr) = self.transport.get().cloned() else {
            return Err(SendError::Transport("the SIP edge is not bound".into()));
        };
        let branch = txn::new_branch();
        let req = self.stamp(t, req, &branch);
        let method = req.method().unwrap_or("").to_string();
        let bytes = Bytes::from(req.to_bytes());
        let mut waiting = self.client.register(&branch, &method);
        let conn = match t {
            SipTransport::Udp => {
                tr.send_udp(addr, &bytes)
                    .await
                    .map_err(|e| SendError::Transport(e.to_string()))?;
                None
            }
            _ => {
                let c = self.conn(&tr, t, addr, domain).await?;
                c.send(bytes.clone())
                    .await
                    .map_err(|e| SendError::Transport(e.to_string()))?;
                Some(c)
            }
        };
        let t1 = self.t1();
        let t2 = Duration::from_secs(4);
        let deadline = tokio::time::Instant::now() + t1 * 64;
        let mut interval = t1;
        let mut next = tokio::time::Instant::now() + interval;
        // Over UDP the request is sent again until a response; an INVITE only until a
        // provisional one (§17.1.1.2), other requests at T2 after it (§17.1.2.2).
        let mut retransmit = conn.is_none();
        let resp = loop {
            let wake = if retransmit {
                next.min(deadline)
            } else {
                deadline
            };
            tokio::select! {
                r = waiting.rx.recv() => match r {
                    Some(resp) if resp.code().unwrap_or(0) >= 200 => break resp,
                    Some(_) if method == "INVITE" => retransmit = false,
                    Some(_) => interval = t2,
                    None => return Err(SendError::Timeout),
                },
                _ = tokio::time::sleep_until(wake) => {
                    if tokio::time::Instant::now() >= deadline {
                        metrics::counter!("fedrelay_sip_timeouts_total", "method" => method.clone()).increment(1);
                        return Err(SendError::Timeout);
                    }
                    metrics::counter!("fedrelay_sip_retransmissions_total").increment(1);
                    let _ = tr.send_udp(addr, &bytes).await;
                    interval = (interval * 2).min(t2);
                    next = tokio::time::Instant::now() + interval;
                }
            }
        };
        drop(waiting);
        if method == "INVITE" && resp.code().unwrap_or(0) >= 300 {
            self.ack_non_2xx(&tr, conn.as_deref(), addr, &req, &resp, &branch)
                .await;
        }
        Ok(resp)
    }

    /// Acknowledges a non-2xx final response to an INVITE, as its client transaction does
    /// (§17.1.1.3): the INVITE's Request-URI, Via (the same branch), From, Call-ID and CSeq
    /// number, the response's To. Over UDP the peer sends its response again until the ACK
    /// reaches it, so each copy gets the ACK again for 64·T1 (Timer D).
    async fn ack_non_2xx(
        self: &Arc<Self>,
        tr: &Arc<Transport>,
        conn: Option<&transport::Conn>,
        addr: SocketAddr,
        invite: &Message,
        resp: &Message,
        branch: &str,
    ) {
        let mut ack = Message::request("ACK", invite.uri().unwrap_or(""));
        for name in ["Via", "Max-Forwards", "From"] {
            if let Some(v) = invite.header(name) {
                ack.push(name, v);
            }
        }
        if let Some(v) = resp.header("to") {
            ack.push("To", v);
        }
        if let Some(v) = invite.call_id() {
            ack.push("Call-ID", v);
        }
        if let Some(c) = invite.cseq() {
            ack.push("CSeq", format!("{} ACK", c.seq));
        }
        for r in invite.header_values("route") {
            ack.push("Route", r);
        }
        let bytes = Bytes::from(ack.to_bytes());
        let Some(conn) = conn else {
            let _ = tr.send_udp(addr, &bytes).await;
            let edge = self.clone();
            let tr = tr.clone();
            let branch = branch.to_string();
            let linger = self.t1() * 64;
            tokio::spawn(async move {
                let mut again = edge.client.register(&branch, "INVITE");
                let until = tokio::time::Instant::now() + linger;
                loop {
                    tokio::select! {
                        r = again.rx.recv() => match r {
                            Some(r) if r.code().unwrap_or(0) >= 300 => {
                                let _ = tr.send_udp(addr, &bytes).await;
                            }
                            Some(_) => {}
                            None => return,
                        },
                        _ = tokio::time::sleep_until(until) => return,
                    }
                }
            });
            return;
        };
        let _ = conn.send(bytes).await;
    }

    /// Delivers a batch to one SIP user.
    pub async fn deliver(
        self: &Arc<Self>,
        recipient: &Address,
        batch: &[Arc<Envelope>],
    ) -> Result<Vec<Option<String>>, DeliveryError> {
        let mut out = Vec::with_capacity(batch.len());
        for env in batch {
            out.push(outbound::deliver_one(self, recipient, env).await?);
            let kind = env.body.as_ref().map(|b| b.kind()).unwrap_or("unknown");
            metrics::counter!("fedrelay_messages_out_total", "edge" => "sip", "kind" => kind)
                .increment(1);
        }
        Ok(out)
    }

    /// Whether a domain is a declared SIP peer.
    pub(crate) fn is_peer(&self, domain: &str) -> bool {
        self.domains.get(domain) == Some(&Platform::Sip)
    }
}

/// Without TLS configured no certificate proves anything.
struct NoNames;

impl transport::PeerNames for NoNames {
    fn names(&self, _: &[rustls::pki_types::CertificateDer<'_>]) -> Vec<String> {
        Vec::new()
    }
}

#[async_trait::async_trait]
impl transport::Handler for SipEdge {
    async fn handle(self: Arc<Self>, inc: transport::Incoming) {
        if inc.msg.is_request() {
            inbound::request(&self, inc).await;
        } else if !self.client.on_response(&inc.msg) {
            debug!("stray response dropped");
        }
    }
}
