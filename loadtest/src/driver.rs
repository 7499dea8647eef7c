//! The open-loop sender. One dispatcher walks the fixed schedule (event `i` at `t0 + i/R`),
//! waking once per time slice and spawning a request task for every event that is due, never
//! waiting for earlier answers. A semaphore caps the requests in flight; when the cap is hit the
//! dispatcher waits for a slot, and the late requests still measure latency from their
//! *intended* time, so a slow relay shows up as latency (no coordinated omission).
//!
//! Events go out over the HTTP edge (signed `POST /v1/events`), straight into the session
//! service over gRPC (`SessionService.Deliver` streams, as an edge uses them), spread over the
//! nodes in [`Targets`] round robin, or as XMPP stanzas over server-to-server streams
//! ([`crate::xmpp`]), where the relay's XEP-0198 acknowledgement plays the 202. A send that fails in a way worth retrying (connection
//! refused, 503, a closed stream) is tried again on the next node, with the same event id so
//! the relay deduplicates it, for up to `retry_for`: what a well-behaved client does while a
//! node dies or joins.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use fedrelay_proto::v1::session_service_client::SessionServiceClient;
use fedrelay_proto::v1::{Ack, EnvelopeBatch};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::live::{Accepted, Shared};
use crate::scenario::Protocol;
use crate::sign::{HEADER_DOMAIN, HEADER_SIGNATURE, HEADER_TIMESTAMP, sign_body, unix_now_secs};
use crate::tls::ClientTls;
use crate::xmpp::XmppClient;
use hyper_rustls::HttpsConnector;
use tonic::transport::{ClientTlsConfig, Endpoint};

/// The nodes the driver sends to; fault injection changes the list during a run.
#[derive(Debug, Default)]
pub struct Targets {
    http: RwLock<Vec<String>>,
    grpc: RwLock<Vec<String>>,
}

impl Targets {
    pub fn new(http: Vec<String>, grpc: Vec<String>) -> Arc<Self> {
        Arc::new(Self {
            http: RwLock::new(http),
            grpc: RwLock::new(grpc),
        })
    }

    /// Replaces the lists (after a node was killed or added).
    pub fn set(&self, http: Vec<String>, grpc: Vec<String>) {
        *self.http.write().unwrap_or_else(|p| p.into_inner()) = http;
        *self.grpc.write().unwrap_or_else(|p| p.into_inner()) = grpc;
    }

    fn pick(list: &RwLock<Vec<String>>, k: u64) -> Option<String> {
        let l = list.read().unwrap_or_else(|p| p.into_inner());
        if l.is_empty() {
            return None;
        }
        l.get((k % l.len() as u64) as usize).cloned()
    }

    pub fn http(&self) -> Vec<String> {
        self.http.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn grpc(&self) -> Vec<String> {
        self.grpc.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The HTTP/1.1 keep-alive client the driver sends with (HTTPS for `https://` targets).
pub type PostClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A client with a keep-alive pool large enough for `max_inflight` connections.
pub fn post_client(max_inflight: usize, tls: &ClientTls) -> PostClient {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(max_inflight)
        .pool_idle_timeout(Duration::from_secs(60))
        .build(tls.connector(true))
}

/// How to send.
#[derive(Debug, Clone)]
pub struct DriverOptions {
    pub protocol: Protocol,
    pub targets: Arc<Targets>,
    pub max_inflight: usize,
    pub request_timeout: Duration,
    /// How long a send may keep being retried after its first failure (zero: never).
    pub retry_for: Duration,
    pub tls: ClientTls,
    /// The XMPP streams, for [`Protocol::Xmpp`].
    pub xmpp: Option<Arc<XmppClient>>,
}

/// What the dispatcher itself observed.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct DriverStats {
    pub dispatched: u64,
    /// Requests that had to wait for a free slot under `--max-inflight`.
    pub delayed_by_inflight_cap: u64,
    /// The largest delay between a message's intended and actual dispatch, ms.
    pub max_dispatch_lag_ms: f64,
}

/// The connections the driver sends over.
#[derive(Clone)]
enum Sender {
    Http(Arc<PostClient>),
    Grpc(Arc<GrpcPool>),
    Xmpp(Arc<XmppClient>),
}

/// Sends every event of the plan on schedule; returns once all requests have finished.
pub async fn drive(shared: Arc<Shared>, opts: &DriverOptions) -> Result<DriverStats> {
    let cap = opts.max_inflight.clamp(1, Semaphore::MAX_PERMITS);
    let sender = match opts.protocol {
        Protocol::Http => {
            if opts.targets.http().is_empty() {
                bail!("no HTTP-edge target to send to");
            }
            Sender::Http(Arc::new(post_client(cap, &opts.tls)))
        }
        Protocol::Grpc => {
            if opts.targets.grpc().is_empty() {
                bail!(
                    "no gRPC target to send to (the nodes' cluster gRPC listeners: --grpc-target)"
                );
            }
            Sender::Grpc(Arc::new(GrpcPool::new(
                GRPC_STREAMS_PER_NODE,
                opts.tls.grpc().cloned(),
            )))
        }
        Protocol::Xmpp => match &opts.xmpp {
            Some(x) => Sender::Xmpp(x.clone()),
            None => bail!("no XMPP streams to send over"),
        },
    };
    let sem = Arc::new(Semaphore::new(cap));
    let schedule = shared.plan.schedule;
    let total = schedule.total_messages();
    let mut stats = DriverStats::default();
    let mut max_lag = Duration::ZERO;
    let mut i = 0u64;
    while i < total {
        let due = shared.t0 + Duration::from_nanos(schedule.intended_ns(i));
        tokio::time::sleep_until(due.into()).await;
        let now_ns = shared.now_ns();
        // Everything due by now goes out in this time slice.
        while i < total && schedule.intended_ns(i) <= now_ns {
            let permit = match sem.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    stats.delayed_by_inflight_cap += 1;
                    sem.clone()
                        .acquire_owned()
                        .await
                        .context("in-flight semaphore closed")?
                }
            };
            let lag = Duration::from_nanos(shared.now_ns().saturating_sub(schedule.intended_ns(i)));
            max_lag = max_lag.max(lag);
            shared.on_dispatched();
            stats.dispatched += 1;
            let (sh, snd, o) = (shared.clone(), sender.clone(), opts.clone());
            tokio::spawn(async move {
                send_with_retries(&sh, &snd, &o, i).await;
                drop(permit);
            });
            i += 1;
        }
    }
    // Wait for every request in flight: they each hold a permit until they finish.
    let all = u32::try_from(cap).unwrap_or(u32::MAX);
    let _all = sem
        .acquire_many(all)
        .await
        .context("in-flight semaphore closed")?;
    stats.max_dispatch_lag_ms = max_lag.as_secs_f64() * 1000.0;
    Ok(stats)
}

/// How one attempt ended.
enum Outcome {
    Accepted(Accepted),
    /// Worth trying again (on another node): `label` says why.
    Retry(String),
    /// Final failure.
    Failed(String),
}

/// Sends event `i`, retrying on the next node while the failure is transient and
/// `retry_for` allows.
async fn send_with_retries(shared: &Shared, sender: &Sender, opts: &DriverOptions, i: u64) {
    let plan = &shared.plan;
    let intended_ns = plan.schedule.intended_ns(i);
    let target = match plan.workload.event(i).action.target() {
        // A client edits, reacts to or deletes a message once its send has succeeded: wait
        // for that (the wait counts as latency, from this event's intended time).
        Some(t) => match wait_for_target(shared, t, opts.request_timeout).await {
            Some(id) => Some(id),
            None => {
                // What it refers to was not accepted: a client would not send it.
                shared.on_skipped(i);
                return;
            }
        },
        None => None,
    };
    let started = Instant::now();
    let mut attempt = 0u64;
    loop {
        let outcome = match sender {
            Sender::Http(client) => match Targets::pick(&opts.targets.http, i + attempt) {
                Some(base) => send_http(shared, client, &base, i, target.as_deref(), opts).await,
                None => Outcome::Retry("no_target".into()),
            },
            Sender::Grpc(pool) => match Targets::pick(&opts.targets.grpc, i + attempt) {
                Some(base) => send_grpc(shared, pool, &base, i, target.as_deref(), opts).await,
                None => Outcome::Retry("no_target".into()),
            },
            Sender::Xmpp(client) => send_xmpp(shared, client, i, opts).await,
        };
        match outcome {
            Outcome::Accepted(a) => {
                shared.on_accepted(i, intended_ns, &a);
                return;
            }
            Outcome::Retry(_) if started.elapsed() < opts.retry_for => {
                shared.on_retry(i);
                attempt += 1;
                // Quick first retries (another node is usually fine), at most 100 ms apart.
                let backoff = Duration::from_millis((10u64 << attempt.min(4)).min(100));
                tokio::time::sleep(backoff).await;
            }
            Outcome::Retry(label) | Outcome::Failed(label) => {
                shared.on_send_error(i, &label);
                return;
            }
        }
    }
}

/// The relay id of message `t` once its send succeeded; `None` if it failed, was skipped, or
/// is still unanswered after `timeout`.
async fn wait_for_target(shared: &Shared, t: u64, timeout: Duration) -> Option<String> {
    let deadline = Instant::now() + timeout;
    loop {
        match shared.outcome(t) {
            Some(true) => return shared.relay_id(t),
            Some(false) => return None,
            None if Instant::now() >= deadline => return None,
            None => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// Label of a failed send for the error counts.
fn error_label(e: &hyper_util::client::legacy::Error) -> &'static str {
    if e.is_connect() {
        "connect_error"
    } else {
        "transport_error"
    }
}

async fn send_http(
    shared: &Shared,
    client: &PostClient,
    base: &str,
    i: u64,
    target: Option<&str>,
    opts: &DriverOptions,
) -> Outcome {
    let msg = match shared.plan.message(i, target) {
        Ok(m) => m,
        Err(_) => return Outcome::Failed("encode_error".into()),
    };
    let domain = &shared.plan.domains[msg.domain];
    match post_signed(client, base, domain, msg.body, opts.request_timeout).await {
        Ok((StatusCode::ACCEPTED, body)) => {
            Outcome::Accepted(serde_json::from_slice(&body).unwrap_or_default())
        }
        Ok((status, _)) if is_transient(status) => Outcome::Retry(status.as_str().into()),
        Ok((status, _)) => Outcome::Failed(status.as_str().into()),
        Err(label @ ("bad_target" | "request_build_error")) => Outcome::Failed(label.into()),
        Err(label) => Outcome::Retry(label.into()),
    }
}

/// Statuses a client tries again: the node is not serving the session right now.
fn is_transient(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT
    )
}

async fn send_grpc(
    shared: &Shared,
    pool: &GrpcPool,
    base: &str,
    i: u64,
    target: Option<&str>,
    opts: &DriverOptions,
) -> Outcome {
    let env = match shared.plan.envelope(i, target) {
        Ok(e) => e,
        Err(_) => return Outcome::Failed("encode_error".into()),
    };
    let session_id = hex::encode(&env.session_id);
    let link = match pool.link(base, i).await {
        Ok(l) => l,
        Err(_) => return Outcome::Retry("connect_error".into()),
    };
    let Ok(reply) = link.send(env) else {
        return Outcome::Retry("stream_closed".into());
    };
    match tokio::time::timeout(opts.request_timeout, reply).await {
        Ok(Ok(Ok(ack))) if ack.error_code.is_empty() => Outcome::Accepted(Accepted {
            relay_msg_id: Some(ack.relay_msg_id),
            session_id: Some(session_id),
            seq: Some(ack.seq),
            duplicate: ack.duplicate,
        }),
        Ok(Ok(Ok(ack))) if ack.retryable => Outcome::Retry(ack.error_code),
        Ok(Ok(Ok(ack))) => Outcome::Failed(ack.error_code),
        Ok(Ok(Err(()))) | Ok(Err(_)) => Outcome::Retry("stream_closed".into()),
        Err(_) => Outcome::Retry("timeout".into()),
    }
}

async fn send_xmpp(shared: &Shared, client: &XmppClient, i: u64, opts: &DriverOptions) -> Outcome {
    let (domain, stanza) = match shared.plan.stanza(i) {
        Ok(x) => x,
        Err(_) => return Outcome::Failed("encode_error".into()),
    };
    let sender = shared.plan.workload.event(i).sender;
    let link = match client.link(client.slot_of(domain, sender)).await {
        Ok(l) => l,
        Err(_) => return Outcome::Retry("connect_error".into()),
    };
    let Some(reply) = link.send(stanza) else {
        return Outcome::Retry("stream_closed".into());
    };
    match tokio::time::timeout(opts.request_timeout, reply).await {
        // Covered by the relay's `h`: finished (journaled, or refused with a stanza error
        // that comes back on the remote domain's listener and is counted there).
        Ok(Ok(Ok(()))) => Outcome::Accepted(Accepted::default()),
        Ok(Ok(Err(label))) if label.starts_with("stream_error") => Outcome::Failed(label),
        Ok(Ok(Err(label))) => Outcome::Retry(label),
        Ok(Err(_)) => Outcome::Retry("stream_closed".into()),
        Err(_) => Outcome::Retry("timeout".into()),
    }
}

/// How set-up events (contact requests and answers) are posted.
#[derive(Debug, Clone)]
pub struct SetupOptions {
    pub targets: Arc<Targets>,
    pub concurrency: usize,
    pub request_timeout: Duration,
    /// How long one event may be retried (503, connection errors) before set-up fails.
    pub retry_for: Duration,
    pub tls: ClientTls,
}

/// Posts every event (signed by its domain) to the HTTP edge, `concurrency` at a time,
/// retrying transient failures; fails on the first event that is refused for good.
pub async fn post_all(
    domains: &[crate::plan::DomainSpec],
    events: Vec<crate::plan::OutMessage>,
    opts: &SetupOptions,
) -> Result<()> {
    use futures::StreamExt;
    let client = post_client(opts.concurrency, &opts.tls);
    let mut results = futures::stream::iter(events.into_iter().enumerate().map(|(k, ev)| {
        let client = client.clone();
        async move {
            let started = Instant::now();
            let mut attempt = 0u64;
            loop {
                let Some(base) = Targets::pick(&opts.targets.http, k as u64 + attempt) else {
                    bail!("no HTTP-edge target");
                };
                let domain = &domains[ev.domain];
                match post_signed(
                    &client,
                    &base,
                    domain,
                    ev.body.clone(),
                    opts.request_timeout,
                )
                .await
                {
                    Ok((StatusCode::ACCEPTED, _)) => return Ok(()),
                    Ok((status, body)) if !is_transient(status) => bail!(
                        "the relay refused a set-up event with {status}: {}",
                        String::from_utf8_lossy(&body)
                    ),
                    _ if started.elapsed() >= opts.retry_for => {
                        bail!(
                            "a set-up event was not accepted within {:?}",
                            opts.retry_for
                        )
                    }
                    _ => {
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(20u64 << attempt.min(5))).await;
                    }
                }
            }
        }
    }))
    .buffer_unordered(opts.concurrency.max(1));
    while let Some(r) = results.next().await {
        r?;
    }
    Ok(())
}

/// One signed `POST /v1/events`: the status and body, or why there was none.
async fn post_signed(
    client: &PostClient,
    base: &str,
    domain: &crate::plan::DomainSpec,
    body: Vec<u8>,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), &'static str> {
    let uri: Uri = format!("{}/v1/events", base.trim_end_matches('/'))
        .parse()
        .map_err(|_| "bad_target")?;
    let ts = unix_now_secs();
    let sig = sign_body(domain.secret.as_bytes(), ts, &body);
    let req = Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(HEADER_DOMAIN, domain.name.as_str())
        .header(HEADER_TIMESTAMP, ts.to_string())
        .header(HEADER_SIGNATURE, sig)
        .body(Full::new(Bytes::from(body)))
        .map_err(|_| "request_build_error")?;
    let exchange = async {
        let resp = client.request(req).await.map_err(|e| error_label(&e))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|_| "body_error")?
            .to_bytes();
        Ok::<_, &'static str>((status, body))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| "timeout")?
}

/// gRPC streams opened to each node; events are spread over them.
const GRPC_STREAMS_PER_NODE: usize = 4;

/// `SessionService.Deliver` streams, `per_node` per target, opened on first use and again
/// after one closes.
pub struct GrpcPool {
    per_node: usize,
    tls: Option<ClientTlsConfig>,
    /// One slot per (target, stream): a slow connect holds up only its own slot.
    links: Mutex<HashMap<(String, usize), LinkSlot>>,
}

/// Where one stream's link lives; locked while (re)connecting.
type LinkSlot = Arc<tokio::sync::Mutex<Option<Arc<GrpcLink>>>>;

impl GrpcPool {
    /// `tls` is used for `https://` targets (which need it).
    pub fn new(per_node: usize, tls: Option<ClientTlsConfig>) -> Self {
        Self {
            per_node: per_node.max(1),
            tls,
            links: Mutex::new(HashMap::new()),
        }
    }

    async fn link(&self, base: &str, i: u64) -> Result<Arc<GrpcLink>> {
        let key = (base.to_owned(), (i % self.per_node as u64) as usize);
        let slot = self
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default()
            .clone();
        let mut slot = slot.lock().await;
        if let Some(l) = slot.as_ref()
            && !l.dead.load(Ordering::Acquire)
        {
            return Ok(l.clone());
        }
        let link = tokio::time::timeout(
            Duration::from_secs(5),
            GrpcLink::open(base, self.tls.as_ref()),
        )
        .await
        .context("connecting timed out")??;
        *slot = Some(link.clone());
        Ok(link)
    }
}

type AckReply = oneshot::Sender<Result<Ack, ()>>;

/// One open `Deliver` stream: envelopes go out one per batch, acks come back in the same
/// order and answer the oldest waiting send.
pub struct GrpcLink {
    tx: mpsc::UnboundedSender<EnvelopeBatch>,
    waiting: Arc<Mutex<VecDeque<AckReply>>>,
    dead: Arc<AtomicBool>,
}

impl GrpcLink {
    async fn open(base: &str, tls: Option<&ClientTlsConfig>) -> Result<Arc<Self>> {
        let mut endpoint = Endpoint::from_shared(base.to_owned())
            .with_context(|| format!("bad gRPC target {base}"))?
            .tcp_nodelay(true);
        if base.starts_with("https://") {
            let Some(tls) = tls else {
                bail!("{base} is https: give --tls-ca (and the client certificate for mTLS)");
            };
            endpoint = endpoint
                .tls_config(tls.clone())
                .context("TLS settings for gRPC")?;
        }
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("connecting to {base}"))?;
        let mut client = SessionServiceClient::new(channel);
        let (tx, rx) = mpsc::unbounded_channel();
        let acks = client
            .deliver(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
            .await
            .with_context(|| format!("opening a Deliver stream to {base}"))?
            .into_inner();
        let link = Arc::new(Self {
            tx,
            waiting: Arc::new(Mutex::new(VecDeque::new())),
            dead: Arc::new(AtomicBool::new(false)),
        });
        let (waiting, dead) = (link.waiting.clone(), link.dead.clone());
        tokio::spawn(async move {
            let mut acks = acks;
            while let Ok(Some(batch)) = acks.message().await {
                let mut w = waiting.lock().unwrap_or_else(|p| p.into_inner());
                for ack in batch.acks {
                    if let Some(reply) = w.pop_front() {
                        let _ = reply.send(Ok(ack));
                    }
                }
            }
            dead.store(true, Ordering::Release);
            let mut w = waiting.lock().unwrap_or_else(|p| p.into_inner());
            for reply in w.drain(..) {
                let _ = reply.send(Err(()));
            }
        });
        Ok(link)
    }

    /// Queues one envelope; the receiver gets its ack (or `Err` if the stream closed first).
    fn send(
        &self,
        env: fedrelay_proto::Envelope,
    ) -> Result<oneshot::Receiver<Result<Ack, ()>>, ()> {
        let (reply, rx) = oneshot::channel();
        // Queue the waiter and the envelope under one lock so acks meet their sends in order.
        let mut w = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if self.dead.load(Ordering::Acquire) {
            return Err(());
        }
        w.push_back(reply);
        let batch = EnvelopeBatch {
            envelopes: vec![env],
            hops: 0,
        };
        if self.tx.send(batch).is_err() {
            w.pop_back();
            return Err(());
        }
        Ok(rx)
    }
}
