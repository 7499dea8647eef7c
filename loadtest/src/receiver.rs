//! Receiving what the relay delivers: one SSE connection per domain to `GET /v1/stream`
//! (signed, resumed with `Last-Event-ID` after a drop), or a local webhook sink (a hyper
//! server on 127.0.0.1) that verifies the relay's signature and answers `{"receipts":[]}`.
//!
//! Receivers live as long as the system under test; each run points them at its [`Shared`]
//! state through a [`Router`], so `find-max` steps reuse the same connections.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use crate::contract::DeliveredEvent;
use crate::live::Shared;
use crate::plan::DomainSpec;
use crate::sign::{
    HEADER_DOMAIN, HEADER_SIGNATURE, HEADER_TIMESTAMP, sign_bodyless, unix_now_secs, verify_body,
};
use crate::sse::SseParser;
use crate::tls::ClientTls;

type StreamConnector =
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

/// How the harness receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReceiveMode {
    /// SSE `GET /v1/stream`, one connection per domain.
    Stream,
    /// A local webhook sink the relay pushes batches to.
    Webhook,
}

/// Hands delivered events to the current run, if any.
#[derive(Debug, Default)]
pub struct Router {
    current: RwLock<Option<Arc<Shared>>>,
    /// Events that arrived while no run was current.
    stray: AtomicU64,
    /// Event payloads that were not valid JSON events.
    unparseable: AtomicU64,
}

impl Router {
    pub fn set(&self, shared: Option<Arc<Shared>>) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = shared;
    }

    fn current(&self) -> Option<Arc<Shared>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Delivers one event's JSON.
    pub fn deliver_json(&self, domain: usize, data: &[u8]) {
        match serde_json::from_slice::<DeliveredEvent>(data) {
            Ok(ev) => self.deliver(domain, &ev),
            Err(_) => {
                self.unparseable.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The relay refused the event with id `id` (an XMPP stanza error): counted as a send
    /// error `label` of the current run, if the id is one of its events.
    pub fn refused(&self, id: &str, label: &str) {
        match self.current() {
            Some(s) => match s.plan.global_of_event_id(id) {
                Some(g) if g < s.plan.schedule.total_messages() => s.on_refused(g, label),
                _ => {
                    self.stray.fetch_add(1, Ordering::Relaxed);
                }
            },
            None => {
                self.stray.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn deliver(&self, domain: usize, ev: &DeliveredEvent) {
        match self.current() {
            Some(s) => {
                s.on_event(domain, ev);
            }
            None => {
                self.stray.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The state of one domain's SSE connection.
#[derive(Debug, Default)]
pub struct StreamStatus {
    connected: AtomicBool,
    connects: AtomicU64,
    events: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// Receiver counters for the report.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ReceiverStats {
    pub mode: String,
    /// SSE: successful connects over all domains (domains + reconnects).
    pub stream_connects: u64,
    pub stream_reconnects: u64,
    pub stream_events: u64,
    pub webhook_batches: u64,
    pub webhook_events: u64,
    /// Webhook requests rejected for a missing or bad signature, or an unknown domain.
    pub webhook_auth_failures: u64,
    pub webhook_bad_requests: u64,
    pub stray_events: u64,
    pub unparseable_events: u64,
}

/// The running receivers of a system.
#[derive(Debug)]
pub struct Receivers {
    pub router: Arc<Router>,
    mode: ReceiveMode,
    streams: Vec<Arc<StreamStatus>>,
    tasks: Vec<JoinHandle<()>>,
    sink: Option<Arc<SinkCounters>>,
}

impl Drop for Receivers {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

const STREAM_IDLE: Duration = Duration::from_secs(45);
const STREAM_CONNECT: Duration = Duration::from_secs(10);

impl Receivers {
    /// Opens one SSE stream per domain against `target` (`http://host:port`).
    pub fn streams(target: &str, domains: &[DomainSpec], tls: &ClientTls) -> Result<Self> {
        let uri: hyper::Uri = format!("{}/v1/stream", target.trim_end_matches('/'))
            .parse()
            .with_context(|| format!("bad --target {target}"))?;
        let router = Arc::new(Router::default());
        let mut streams = Vec::new();
        let mut tasks = Vec::new();
        for (i, d) in domains.iter().enumerate() {
            let status = Arc::new(StreamStatus::default());
            streams.push(status.clone());
            tasks.push(tokio::spawn(stream_loop(
                tls.connector(false),
                uri.clone(),
                i,
                d.clone(),
                router.clone(),
                status,
            )));
        }
        Ok(Self {
            router,
            mode: ReceiveMode::Stream,
            streams,
            tasks,
            sink: None,
        })
    }

    /// Starts the webhook sink on `listen` (`127.0.0.1:0` for any free port).
    pub async fn webhook(listen: SocketAddr, domains: &[DomainSpec]) -> Result<(Self, SocketAddr)> {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding the webhook sink on {listen}"))?;
        let addr = listener.local_addr().context("webhook sink address")?;
        let router = Arc::new(Router::default());
        let counters = Arc::new(SinkCounters::default());
        let ctx = Arc::new(SinkCtx {
            domains: domains.to_vec(),
            router: router.clone(),
            counters: counters.clone(),
        });
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let ctx = ctx.clone();
                        async move { Ok::<_, Infallible>(handle_webhook(&ctx, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok((
            Self {
                router,
                mode: ReceiveMode::Webhook,
                streams: Vec::new(),
                tasks: vec![task],
                sink: Some(counters),
            },
            addr,
        ))
    }

    /// Waits until every SSE stream has connected once (immediate for webhooks).
    pub async fn wait_connected(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let missing: Vec<usize> = self
                .streams
                .iter()
                .enumerate()
                .filter(|(_, s)| s.connects.load(Ordering::Relaxed) == 0)
                .map(|(i, _)| i)
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let err = self.streams[missing[0]]
                    .last_error
                    .lock()
                    .map(|e| e.clone())
                    .unwrap_or_default()
                    .unwrap_or_else(|| "no answer".into());
                bail!(
                    "SSE streams of {} domain(s) did not connect within {timeout:?} (last error: {err})",
                    missing.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn stats(&self) -> ReceiverStats {
        let mut s = ReceiverStats {
            mode: match self.mode {
                ReceiveMode::Stream => "stream".into(),
                ReceiveMode::Webhook => "webhook".into(),
            },
            stray_events: self.router.stray.load(Ordering::Relaxed),
            unparseable_events: self.router.unparseable.load(Ordering::Relaxed),
            ..Default::default()
        };
        for st in &self.streams {
            let c = st.connects.load(Ordering::Relaxed);
            s.stream_connects += c;
            s.stream_reconnects += c.saturating_sub(1);
            s.stream_events += st.events.load(Ordering::Relaxed);
        }
        if let Some(c) = &self.sink {
            s.webhook_batches = c.batches.load(Ordering::Relaxed);
            s.webhook_events = c.events.load(Ordering::Relaxed);
            s.webhook_auth_failures = c.auth_failures.load(Ordering::Relaxed);
            s.webhook_bad_requests = c.bad_requests.load(Ordering::Relaxed);
        }
        s
    }

    /// Whether every stream is connected right now.
    pub fn all_connected(&self) -> bool {
        self.streams
            .iter()
            .all(|s| s.connected.load(Ordering::Relaxed))
    }
}

async fn stream_loop(
    connector: StreamConnector,
    uri: hyper::Uri,
    domain: usize,
    spec: DomainSpec,
    router: Arc<Router>,
    status: Arc<StreamStatus>,
) {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let mut parser = SseParser::new();
    let mut backoff = Duration::from_millis(50);
    loop {
        let before = status.connects.load(Ordering::Relaxed);
        let r = stream_once(&client, &uri, domain, &spec, &router, &status, &mut parser).await;
        status.connected.store(false, Ordering::Relaxed);
        if let Err(e) = r
            && let Ok(mut l) = status.last_error.lock()
        {
            *l = Some(format!("{e:#}"));
        }
        if status.connects.load(Ordering::Relaxed) > before {
            // It had connected: a dropped stream reconnects quickly.
            backoff = Duration::from_millis(50);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

async fn stream_once(
    client: &Client<StreamConnector, Empty<Bytes>>,
    uri: &hyper::Uri,
    domain: usize,
    spec: &DomainSpec,
    router: &Router,
    status: &StreamStatus,
    parser: &mut SseParser,
) -> Result<()> {
    let ts = unix_now_secs();
    let sig = sign_bodyless(spec.secret.as_bytes(), ts, "GET", "/v1/stream");
    let mut req = Request::builder()
        .method(Method::GET)
        .uri(uri.clone())
        .header(hyper::header::ACCEPT, "text/event-stream")
        .header(HEADER_DOMAIN, spec.name.as_str())
        .header(HEADER_TIMESTAMP, ts.to_string())
        .header(HEADER_SIGNATURE, sig);
    if let Some(id) = parser.last_id() {
        req = req.header("last-event-id", id);
    }
    let req = req
        .body(Empty::new())
        .context("building the stream request")?;
    let resp = tokio::time::timeout(STREAM_CONNECT, client.request(req))
        .await
        .context("stream connect timed out")?
        .context("stream connect")?;
    if resp.status() != StatusCode::OK {
        let code = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        bail!(
            "GET /v1/stream for {} answered {code}: {}",
            spec.name,
            String::from_utf8_lossy(&body)
        );
    }
    parser.reset_connection();
    status.connected.store(true, Ordering::Relaxed);
    status.connects.fetch_add(1, Ordering::Relaxed);
    let mut body = resp.into_body();
    loop {
        let frame = match tokio::time::timeout(STREAM_IDLE, body.frame()).await {
            Err(_) => bail!("stream idle for {STREAM_IDLE:?}"),
            Ok(None) => bail!("stream ended"),
            Ok(Some(Err(e))) => bail!("stream read: {e}"),
            Ok(Some(Ok(f))) => f,
        };
        if let Some(data) = frame.data_ref() {
            for ev in parser.push(data) {
                status.events.fetch_add(1, Ordering::Relaxed);
                router.deliver_json(domain, ev.data.as_bytes());
            }
        }
    }
}

#[derive(Debug, Default)]
struct SinkCounters {
    batches: AtomicU64,
    events: AtomicU64,
    auth_failures: AtomicU64,
    bad_requests: AtomicU64,
}

struct SinkCtx {
    domains: Vec<DomainSpec>,
    router: Arc<Router>,
    counters: Arc<SinkCounters>,
}

#[derive(Deserialize)]
struct Batch {
    events: Vec<serde_json::Value>,
}

const MAX_BATCH_BYTES: usize = 64 * 1024 * 1024;

fn reply(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

async fn handle_webhook(ctx: &SinkCtx, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::POST || req.uri().path() != "/hook" {
        ctx.counters.bad_requests.fetch_add(1, Ordering::Relaxed);
        return reply(StatusCode::NOT_FOUND, r#"{"error":"not_found"}"#);
    }
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (domain, ts, sig) = (
        header(HEADER_DOMAIN),
        header(HEADER_TIMESTAMP),
        header(HEADER_SIGNATURE),
    );
    let body = match Limited::new(req.into_body(), MAX_BATCH_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            ctx.counters.bad_requests.fetch_add(1, Ordering::Relaxed);
            return reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                r#"{"error":"payload_too_large"}"#,
            );
        }
    };
    let verified = match (domain, ts, sig) {
        (Some(d), Some(ts), Some(sig)) => {
            ctx.domains.iter().position(|x| x.name == d).filter(|&i| {
                verify_body(
                    ctx.domains[i].secret.as_bytes(),
                    &ts,
                    &body,
                    &sig,
                    unix_now_secs(),
                )
                .is_ok()
            })
        }
        _ => None,
    };
    let Some(domain) = verified else {
        ctx.counters.auth_failures.fetch_add(1, Ordering::Relaxed);
        return reply(StatusCode::UNAUTHORIZED, r#"{"error":"unauthorized"}"#);
    };
    let batch: Batch = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(_) => {
            ctx.counters.bad_requests.fetch_add(1, Ordering::Relaxed);
            return reply(StatusCode::BAD_REQUEST, r#"{"error":"bad_request"}"#);
        }
    };
    ctx.counters.batches.fetch_add(1, Ordering::Relaxed);
    for ev in batch.events {
        ctx.counters.events.fetch_add(1, Ordering::Relaxed);
        match serde_json::from_value::<DeliveredEvent>(ev) {
            Ok(ev) => ctx.router.deliver(domain, &ev),
            Err(_) => {
                ctx.router.unparseable.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    reply(StatusCode::OK, r#"{"receipts":[]}"#)
}
