//! SIP transports (RFC 3261 §18): UDP datagrams, and TCP and TLS streams framed by
//! `Content-Length`, with connections reused both ways (a peer's connection carries the
//! responses to its requests, and the relay's requests to that peer while it is open).
//!
//! Every message read is handed to a [`Handler`]; bytes that are not a SIP message are
//! answered with 400 where the message can be answered, else dropped (a stream that cannot
//! be framed is closed).

use super::msg::{self, Frame, Limits, Message};
use super::net::IpNet;
use crate::config::SipTransport;
use async_trait::async_trait;
use bytes::Bytes;
use rustls::pki_types::ServerName;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

#[derive(Debug, Error)]
pub enum TransportError {
    #[error("no {0} transport is configured")]
    NotConfigured(&'static str),
    #[error("connecting to {0}: {1}")]
    Connect(SocketAddr, String),
    #[error("sending to {0}: {1}")]
    Send(SocketAddr, String),
}

/// A message and where it came from.
#[derive(Debug)]
pub struct Incoming {
    pub msg: Message,
    pub src: SocketAddr,
    pub transport: SipTransport,
    /// The connection it arrived on (TCP/TLS).
    pub conn: Option<Arc<Conn>>,
}

impl Incoming {
    /// The domains a TLS peer's certificate proves (RFC 5922); empty otherwise.
    pub fn proven_domains(&self) -> &[String] {
        self.conn
            .as_ref()
            .map(|c| c.names.as_slice())
            .unwrap_or(&[])
    }
}

/// Receives what the transports read.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    async fn handle(self: Arc<Self>, inc: Incoming);
}

/// One TCP or TLS connection.
#[derive(Debug)]
pub struct Conn {
    pub id: u64,
    pub transport: SipTransport,
    pub remote: SocketAddr,
    /// For TLS: the domains the peer's certificate is valid for (checked against the
    /// trusted roots, SIP URI and DNS SANs, RFC 5922).
    pub names: Vec<String>,
    tx: mpsc::Sender<Bytes>,
}

impl Conn {
    /// Queues bytes on the connection.
    pub async fn send(&self, b: Bytes) -> Result<(), TransportError> {
        self.tx
            .send(b)
            .await
            .map_err(|_| TransportError::Send(self.remote, "connection closed".into()))
    }
}

/// Checks a TLS peer's certificate chain: the domains it proves.
pub trait PeerNames: Send + Sync + 'static {
    fn names(&self, chain: &[rustls::pki_types::CertificateDer<'_>]) -> Vec<String>;
}

/// The transports of one edge.
pub struct Transport {
    pub udp: Option<Arc<UdpSocket>>,
    /// The addresses bound, for Via and Contact: (transport, address).
    pub local: Vec<(SipTransport, SocketAddr)>,
    conns: Mutex<HashMap<(SipTransport, SocketAddr), Arc<Conn>>>,
    next_id: AtomicU64,
    pub limits: Limits,
    tls: Option<(tokio_rustls::TlsAcceptor, tokio_rustls::TlsConnector)>,
    names: Arc<dyn PeerNames>,
    connect_timeout: Duration,
    idle: Duration,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("local", &self.local)
            .finish()
    }
}

/// The listeners, bound but not yet serving.
pub struct Listeners {
    pub tcp: Option<TcpListener>,
    pub tls: Option<TcpListener>,
}

/// How long a connection may stay silent (RFC 5626 keepalives count).
const IDLE: Duration = Duration::from_secs(600);
/// Messages queued per connection before senders wait.
const CONN_QUEUE: usize = 1024;

impl Transport {
    /// Binds the configured listeners.
    #[allow(clippy::too_many_arguments)]
    pub async fn bind(
        udp: Option<SocketAddr>,
        tcp: Option<SocketAddr>,
        tls_addr: Option<SocketAddr>,
        tls: Option<(tokio_rustls::TlsAcceptor, tokio_rustls::TlsConnector)>,
        names: Arc<dyn PeerNames>,
        limits: Limits,
        connect_timeout: Duration,
    ) -> std::io::Result<(Arc<Self>, Listeners)> {
        let mut local = Vec::new();
        let udp = match udp {
            Some(a) => {
                let s = bind_udp(a)?;
                local.push((SipTransport::Udp, s.local_addr()?));
                Some(Arc::new(s))
            }
            None => None,
        };
        let tcp_l = match tcp {
            Some(a) => {
                let l = TcpListener::bind(a).await?;
                local.push((SipTransport::Tcp, l.local_addr()?));
                Some(l)
            }
            None => None,
        };
        let tls_l = match tls_addr {
            Some(a) => {
                let l = TcpListener::bind(a).await?;
                local.push((SipTransport::Tls, l.local_addr()?));
                Some(l)
            }
            None => None,
        };
        Ok((
            Arc::new(Self {
                udp,
                local,
                conns: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                limits,
                tls,
                names,
                connect_timeout,
                idle: IDLE,
            }),
            Listeners {
                tcp: tcp_l,
                tls: tls_l,
            },
        ))
    }

    /// The local address of a transport.
    pub fn local_addr(&self, t: SipTransport) -> Option<SocketAddr> {
        self.local.iter().find(|(x, _)| *x == t).map(|(_, a)| *a)
    }

    /// Serves every listener until `stop`.
    pub fn serve(
        self: &Arc<Self>,
        listeners: Listeners,
        handler: Arc<dyn Handler>,
        stop: watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = Vec::new();
        if let Some(sock) = self.udp.clone() {
            let me = self.clone();
            let h = handler.clone();
            let stop = stop.clone();
            tasks.push(tokio::spawn(
                async move { me.udp_loop(sock, h, stop).await },
            ));
        }
        for (l, t) in [
            (listeners.tcp, SipTransport::Tcp),
            (listeners.tls, SipTransport::Tls),
        ] {
            let Some(l) = l else { continue };
            let me = self.clone();
            let h = handler.clone();
            let stop = stop.clone();
            tasks.push(tokio::spawn(
                async move { me.accept_loop(l, t, h, stop).await },
            ));
        }
        tasks
    }

    async fn udp_loop(
        self: Arc<Self>,
        sock: Arc<UdpSocket>,
        handler: Arc<dyn Handler>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut buf = vec![0u8; 65_536];
        loop {
            let (n, src) = tokio::select! {
                r = sock.recv_from(&mut buf) => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // ICMP errors from earlier sends surface here on some systems.
                        debug!(error = %e, "udp receive");
                        continue;
                    }
                },
                _ = stop.changed() => return,
            };
            let data = &buf[..n];
            // RFC 5626 keepalives over UDP are STUN; bare CRLFs are ignored.
            if data.iter().all(|b| *b == b'\r' || *b == b'\n') {
                continue;
            }
            if n > self.limits.max_message_bytes {
                metrics::counter!("fedrelay_sip_malformed_total", "reason" => "too_large")
                    .increment(1);
                // A 513 needs the headers; what fits in the limit is read for them.
                if let Some((m, _)) = salvage(data, &self.limits) {
                    let r = m.response(513, "", None);
                    let _ = self.send_udp(src, &r.to_bytes()).await;
                }
                continue;
            }
            let parsed = msg::parse(data, &self.limits).or_else(|e| {
                // A datagram ends the message: a header block that runs to its end without the
                // empty line is read as if it had one.
                if data.ends_with(b"\r\n") && !data.windows(4).any(|w| w == b"\r\n\r\n") {
                    let mut d = data.to_vec();
                    d.extend_from_slice(b"\r\n");
                    msg::parse(&d, &self.limits)
                } else {
                    Err(e)
                }
            });
            match parsed {
                Ok(m) => {
                    let h = handler.clone();
                    tokio::spawn(h.handle(Incoming {
                        msg: m,
                        src,
                        transport: SipTransport::Udp,
                        conn: None,
                    }));
                }
                Err(e) => {
                    metrics::counter!("fedrelay_sip_malformed_total", "reason" => "parse")
                        .increment(1);
                    debug!(error = %e, "unparsable datagram");
                    if let Some((m, code)) = salvage(data, &self.limits) {
                        let r = m.response(code, &bad_start_reason(code), None);
                        let _ = self.send_udp(src, &r.to_bytes()).await;
                    }
                }
            }
        }
    }

    async fn accept_loop(
        self: Arc<Self>,
        l: TcpListener,
        t: SipTransport,
        handler: Arc<dyn Handler>,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            let (tcp, remote) = tokio::select! {
                r = l.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        warn!(error = %e, "sip accept");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stop.changed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let me = self.clone();
            let h = handler.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                match t {
                    SipTransport::Tls => {
                        let Some((acceptor, _)) = me.tls.clone() else {
                            return;
                        };
                        let hs = tokio::time::timeout(me.connect_timeout, acceptor.accept(tcp));
                        let tls = match hs.await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                debug!(error = %e, %remote, "tls handshake failed");
                                metrics::counter!("fedrelay_sip_tls_failures_total").increment(1);
                                return;
                            }
                            Err(_) => return,
                        };
                        let names = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .map(|c| me.names.names(c))
                            .unwrap_or_default();
                        me.run_conn(tls, t, remote, names, h, stop).await;
                    }
                    _ => me.run_conn(tcp, t, remote, Vec::new(), h, stop).await,
                }
            });
        }
    }

    /// Registers a connection and runs its reader and writer until either ends.
    async fn run_conn<S>(
        self: Arc<Self>,
        stream: S,
        t: SipTransport,
        remote: SocketAddr,
        names: Vec<String>,
        handler: Arc<dyn Handler>,
        stop: watch::Receiver<bool>,
    ) where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let conn = self.register(t, remote, names, stream, handler, stop);
        drop(conn);
    }

    fn register<S>(
        self: &Arc<Self>,
        t: SipTransport,
        remote: SocketAddr,
        names: Vec<String>,
        stream: S,
        handler: Arc<dyn Handler>,
        mut stop: watch::Receiver<bool>,
    ) -> Arc<Conn>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<Bytes>(CONN_QUEUE);
        let conn = Arc::new(Conn {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            transport: t,
            remote,
            names,
            tx,
        });
        if let Ok(mut m) = self.conns.lock() {
            m.insert((t, remote), conn.clone());
        }
        let (mut rd, mut wr) = tokio::io::split(stream);
        let writer = tokio::spawn(async move {
            while let Some(b) = rx.recv().await {
                if wr.write_all(&b).await.is_err() {
                    break;
                }
                // Write what is queued before flushing once.
                let mut ok = true;
                while let Ok(b) = rx.try_recv() {
                    if wr.write_all(&b).await.is_err() {
                        ok = false;
                        break;
                    }
                }
                if !ok || wr.flush().await.is_err() {
                    break;
                }
            }
            let _ = wr.shutdown().await;
        });
        let me = self.clone();
        let c = conn.clone();
        tokio::spawn(async move {
            let mut buf: Vec<u8> = Vec::with_capacity(8192);
            let mut chunk = vec![0u8; 16_384];
            'conn: loop {
                let n = tokio::select! {
                    r = tokio::time::timeout(me.idle, rd.read(&mut chunk)) => match r {
                        Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                        Ok(Ok(n)) => n,
                    },
                    _ = stop.changed() => break,
                };
                buf.extend_from_slice(&chunk[..n]);
                loop {
                    match msg::frame(&buf, &me.limits) {
                        Ok(Frame::Need) => break,
                        Ok(Frame::Keepalive(k)) => {
                            // A CRLFCRLF ping gets a CRLF pong (RFC 5626 §4.4.1).
                            if k >= 4 {
                                let _ = c.tx.try_send(Bytes::from_static(b"\r\n"));
                            }
                            buf.drain(..k);
                        }
                        Ok(Frame::Message(len)) => {
                            let parsed = msg::parse(&buf[..len], &me.limits);
                            buf.drain(..len);
                            match parsed {
                                Ok(m) => {
                                    let h = handler.clone();
                                    tokio::spawn(h.handle(Incoming {
                                        msg: m,
                                        src: remote,
                                        transport: t,
                                        conn: Some(c.clone()),
                                    }));
                                }
                                Err(e) => {
                                    metrics::counter!("fedrelay_sip_malformed_total", "reason" => "parse")
                                        .increment(1);
                                    debug!(error = %e, "unparsable message on a stream dropped");
                                }
                            }
                        }
                        Err(e) => {
                            // The framing cannot be trusted past this point.
                            metrics::counter!("fedrelay_sip_malformed_total", "reason" => "framing")
                                .increment(1);
                            debug!(error = %e, "stream closed: bad framing");
                            if let Some((m, code)) = salvage(&buf, &me.limits) {
                                let code = if matches!(e, msg::ParseError::TooLarge(_)) {
                                    513
                                } else {
                                    code
                                };
                                let r = m.response(code, &bad_start_reason(code), None);
                                let _ = c.tx.try_send(Bytes::from(r.to_bytes()));
                            }
                            break 'conn;
                        }
                    }
                }
            }
            if let Ok(mut m) = me.conns.lock()
                && m.get(&(t, remote)).is_some_and(|x| x.id == c.id)
            {
                m.remove(&(t, remote));
            }
            drop(c);
            let _ = writer.await;
        });
        conn
    }

    /// The open connection to `addr` over `t`, or a new one (TLS checks the server's
    /// certificate for `domain`).
    pub async fn connection(
        self: &Arc<Self>,
        t: SipTransport,
        addr: SocketAddr,
        domain: &str,
        handler: Arc<dyn Handler>,
        stop: watch::Receiver<bool>,
    ) -> Result<Arc<Conn>, TransportError> {
        if let Some(c) = self
            .conns
            .lock()
            .ok()
            .and_then(|m| m.get(&(t, addr)).cloned())
            && !c.tx.is_closed()
        {
            return Ok(c);
        }
        let connect = async {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|e| TransportError::Connect(addr, e.to_string()))?;
            let _ = tcp.set_nodelay(true);
            match t {
                SipTransport::Tls => {
                    let Some((_, connector)) = self.tls.clone() else {
                        return Err(TransportError::NotConfigured("TLS"));
                    };
                    let name = ServerName::try_from(domain.to_string())
                        .map_err(|e| TransportError::Connect(addr, e.to_string()))?;
                    let s = connector
                        .connect(name, tcp)
                        .await
                        .map_err(|e| TransportError::Connect(addr, e.to_string()))?;
                    let names = s
                        .get_ref()
                        .1
                        .peer_certificates()
                        .map(|c| self.names.names(c))
                        .unwrap_or_default();
                    if !names.iter().any(|n| n == domain) {
                        return Err(TransportError::Connect(
                            addr,
                            format!("the certificate is not valid for {domain} (RFC 5922)"),
                        ));
                    }
                    Ok(self.register(t, addr, names, s, handler, stop))
                }
                _ => Ok(self.register(t, addr, Vec::new(), tcp, handler, stop)),
            }
        };
        tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| TransportError::Connect(addr, "timed out".into()))?
    }

    /// Sends a datagram.
    pub async fn send_udp(&self, to: SocketAddr, b: &[u8]) -> Result<(), TransportError> {
        let Some(s) = &self.udp else {
            return Err(TransportError::NotConfigured("UDP"));
        };
        s.send_to(b, to)
            .await
            .map(|_| ())
            .map_err(|e| TransportError::Send(to, e.to_string()))
    }
}

/// A request that cannot be parsed (its request line, its framing or its size is wrong)
/// but whose headers can still carry an answer: its headers, read under a stand-in request
/// line and without `Content-Length`, and the code to answer with — 505 for another SIP
/// version, else 400. `None` for responses, ACKs (never answered) and anything without the
/// Via, From, To, Call-ID and CSeq a response needs.
fn salvage(data: &[u8], limits: &Limits) -> Option<(Message, u16)> {
    let end = data
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(data.len());
    let head = data.get(..end.min(limits.max_message_bytes))?;
    let mut lines = head.split(|b| *b == b'\n');
    let start = lines.next()?;
    let start = String::from_utf8_lossy(start.strip_suffix(b"\r").unwrap_or(start)).into_owned();
    let first = start.split_whitespace().next()?;
    if first.starts_with("SIP/") || first == "ACK" {
        return None;
    }
    let code = match start.split_whitespace().last() {
        Some(v) if v.starts_with("SIP/") && v != "SIP/2.0" => 505,
        _ => 400,
    };
    let mut rebuilt = b"OPTIONS sip:invalid.invalid SIP/2.0\r\n".to_vec();
    for line in lines {
        let name: Vec<u8> = line
            .iter()
            .take_while(|b| **b != b':')
            .filter(|b| !b.is_ascii_whitespace())
            .map(|b| b.to_ascii_lowercase())
            .collect();
        if name == b"content-length" || name == b"l" {
            continue;
        }
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        rebuilt.extend_from_slice(line);
        rebuilt.extend_from_slice(b"\r\n");
    }
    rebuilt.extend_from_slice(b"\r\n");
    let m = msg::parse(&rebuilt, limits).ok()?;
    let whole = m.call_id().is_some()
        && m.cseq().is_some()
        && m.from().is_some()
        && m.to().is_some()
        && m.header("via").is_some();
    whole.then_some((m, code))
}

/// The reason phrase for a request refused before its headers were read.
fn bad_start_reason(code: u16) -> String {
    match code {
        505 => "Version Not Supported".into(),
        513 => String::new(),
        _ => "Bad Request: malformed request line or framing".into(),
    }
}

/// Whether `ip` is in any of `nets`.
pub fn allowed(nets: &[IpNet], ip: std::net::IpAddr) -> bool {
    nets.iter().any(|n| n.contains(ip))
}

/// A UDP socket with large buffers (the default drops bursts).
fn bind_udp(a: SocketAddr) -> std::io::Result<UdpSocket> {
    let domain = if a.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    // Best effort: the kernel caps them at net.core.[rw]mem_max.
    let _ = s.set_recv_buffer_size(4 * 1024 * 1024);
    let _ = s.set_send_buffer_size(4 * 1024 * 1024);
    s.set_nonblocking(true)?;
    s.bind(&a.into())?;
    UdpSocket::from_std(s.into())
}
