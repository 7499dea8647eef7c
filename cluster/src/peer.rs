//! Links to the other nodes: one long-lived bidirectional `SessionService.Deliver` stream per
//! peer, envelopes batched onto it, acks matched back in order.
//!
//! Callers put envelopes on the link's queue and wake the connection; the request stream the
//! connection polls drains whatever has gathered into one batch (natural batching: the busier
//! the link, the bigger the batches, and no timer or extra task in the way). A task per link
//! reads the acks and hands each to its caller, in order.
//!
//! Each link has a bounded queue. A caller whose envelope does not fit, or whose ack does not
//! come back within the forward timeout, gets a retryable error at once — a slow or dead peer
//! costs a bounded amount of memory, never an unbounded one, and the origin retries (inbound
//! dedup makes that safe).

use crate::Member;
use fedrelay_proto::Envelope;
use fedrelay_proto::v1::session_service_client::SessionServiceClient;
use fedrelay_proto::v1::{Ack, EnvelopeBatch};
use futures::Stream;
use session_actor::{Accepted, SessionError, SessionId};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::sync::oneshot;
use tonic::transport::{ClientTlsConfig, Endpoint};
use tracing::{debug, warn};

/// Tunables of the links between nodes.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// Most envelopes in one batch.
    pub max_batch: usize,
    /// After the first envelope of a batch, how long to wait for more before sending (zero:
    /// send what is queued at once; batches still form under load).
    pub flush_delay: Duration,
    /// Envelopes queued for one peer; past it, callers get a retryable error.
    pub queue: usize,
    /// Envelopes sent to one peer and not yet acknowledged.
    pub max_in_flight: usize,
    /// How long a caller waits for the peer's ack.
    pub forward_timeout: Duration,
    pub connect_timeout: Duration,
    /// mTLS to the peers, when configured.
    pub tls: Option<ClientTlsConfig>,
}

impl Default for PeerConfig {
    fn default() -> Self {
        Self {
            max_batch: 256,
            flush_delay: Duration::from_millis(2),
            queue: 8192,
            max_in_flight: 8192,
            forward_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
            tls: None,
        }
    }
}

struct Item {
    env: Envelope,
    hops: u32,
    reply: oneshot::Sender<Result<Ack, SessionError>>,
}

type Reply = oneshot::Sender<Result<Ack, SessionError>>;

/// What callers, the request stream and the ack reader of one link share.
#[derive(Default)]
struct LinkState {
    /// Waiting to be sent.
    queue: VecDeque<Item>,
    /// Sent on the current stream and not yet acknowledged, in order.
    pending: VecDeque<Reply>,
    /// The current stream's generation; a stream of an older one ends.
    generation: u64,
    /// The last attempt failed and the link is waiting to retry: callers are refused at once
    /// instead of queueing for a peer that is not there.
    down: bool,
    /// The request stream waiting for envelopes (or for room in flight).
    waker: Option<Waker>,
    /// When the oldest queued envelope arrived (for `flush_delay`).
    since: Option<tokio::time::Instant>,
}

struct Link {
    addr: String,
    state: Arc<Mutex<LinkState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
        if let Ok(mut st) = self.state.lock() {
            fail_all(&mut st, "peer left the cluster");
        }
    }
}

fn fail_all(st: &mut LinkState, why: &str) {
    for reply in st.pending.drain(..) {
        let _ = reply.send(Err(SessionError::Unavailable(why.to_string())));
    }
    for item in st.queue.drain(..) {
        let _ = item
            .reply
            .send(Err(SessionError::Unavailable(why.to_string())));
    }
    st.since = None;
}

/// The links of this node to its peers, created on first use.
pub struct Peers {
    cfg: PeerConfig,
    links: Mutex<HashMap<String, Arc<Link>>>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers").finish_non_exhaustive()
    }
}

impl Peers {
    pub fn new(cfg: PeerConfig) -> Self {
        Self {
            cfg,
            links: Mutex::new(HashMap::new()),
        }
    }

    fn link(&self, member: &Member) -> Result<Arc<Link>, SessionError> {
        let mut links = self
            .links
            .lock()
            .map_err(|_| SessionError::Unavailable("peer links poisoned".into()))?;
        if let Some(l) = links.get(&member.node_id)
            && l.addr == member.grpc_addr
        {
            return Ok(l.clone());
        }
        let state = Arc::new(Mutex::new(LinkState::default()));
        let task = tokio::spawn(run_link(
            member.node_id.clone(),
            member.grpc_addr.clone(),
            self.cfg.clone(),
            state.clone(),
        ));
        let link = Arc::new(Link {
            addr: member.grpc_addr.clone(),
            state,
            task,
        });
        links.insert(member.node_id.clone(), link.clone());
        Ok(link)
    }

    /// Drops links to nodes that are no longer members.
    pub fn retain(&self, members: &[Member]) {
        if let Ok(mut links) = self.links.lock() {
            links.retain(|id, l| {
                members
                    .iter()
                    .any(|m| &m.node_id == id && m.grpc_addr == l.addr)
            });
        }
    }

    /// Sends `env` to `member`, the owner of its session, and waits for its ack.
    pub async fn forward(
        &self,
        member: &Member,
        env: Envelope,
        hops: u32,
    ) -> Result<Accepted, SessionError> {
        let id = SessionId::from_bytes(&env.session_id)
            .ok_or_else(|| SessionError::Invalid("session id must be 16 bytes".into()))?;
        let link = self.link(member)?;
        let (reply, rx) = oneshot::channel();
        let waker = {
            let mut st = link
                .state
                .lock()
                .map_err(|_| SessionError::Unavailable("peer link poisoned".into()))?;
            let refused = if st.down {
                Some(("unreachable", "unreachable"))
            } else if st.queue.len() >= self.cfg.queue {
                Some(("queue_full", "not keeping up"))
            } else {
                None
            };
            if let Some((reason, why)) = refused {
                metrics::counter!("fedrelay_peer_refused_total", "reason" => reason).increment(1);
                return Err(SessionError::Unavailable(format!(
                    "node {} is {why}",
                    member.node_id
                )));
            }
            st.queue.push_back(Item { env, hops, reply });
            st.since.get_or_insert_with(tokio::time::Instant::now);
            st.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        let ack = match tokio::time::timeout(self.cfg.forward_timeout, rx).await {
            Ok(Ok(r)) => r?,
            Ok(Err(_)) => {
                return Err(SessionError::Unavailable(format!(
                    "link to node {} dropped",
                    member.node_id
                )));
            }
            Err(_) => {
                metrics::counter!("fedrelay_peer_refused_total", "reason" => "timeout")
                    .increment(1);
                return Err(SessionError::Unavailable(format!(
                    "node {} did not answer in time",
                    member.node_id
                )));
            }
        };
        if ack.error_code.is_empty() {
            Ok(Accepted {
                session_id: id,
                relay_msg_id: ack.relay_msg_id,
                seq: ack.seq,
                duplicate: ack.duplicate,
            })
        } else {
            Err(SessionError::from_code(&ack.error_code, ack.error_detail))
        }
    }
}

/// The answer to one envelope, as it travels back.
pub fn ack_of(r: Result<Accepted, SessionError>) -> Ack {
    match r {
        Ok(a) => Ack {
            relay_msg_id: a.relay_msg_id,
            seq: a.seq,
            duplicate: a.duplicate,
            ..Default::default()
        },
        Err(e) => Ack {
            error_code: e.code().to_string(),
            error_detail: e.to_string(),
            retryable: e.is_retryable(),
            ..Default::default()
        },
    }
}

pub(crate) fn endpoint(
    addr: &str,
    tls: Option<&ClientTlsConfig>,
    connect_timeout: Duration,
) -> Result<Endpoint, tonic::transport::Error> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut ep = Endpoint::from_shared(format!("{scheme}://{addr}"))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(2))
        .keep_alive_while_idle(true)
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(8 << 20));
    if let Some(tls) = tls {
        ep = ep.tls_config(tls.clone())?;
    }
    Ok(ep)
}

/// Keeps one stream to a peer open, reconnecting with backoff; reads its acks.
async fn run_link(node_id: String, addr: String, cfg: PeerConfig, state: Arc<Mutex<LinkState>>) {
    let mut failures = 0u32;
    loop {
        let result = stream_once(&node_id, &addr, &cfg, &state, &mut failures).await;
        let why = match &result {
            Ok(()) => format!("link to node {node_id} closed"),
            Err(e) => format!("link to node {node_id} broke: {e}"),
        };
        if let Ok(mut st) = state.lock() {
            st.down = true;
            st.generation += 1;
            fail_all(&mut st, &why);
            if let Some(w) = st.waker.take() {
                w.wake();
            }
        }
        failures = failures.saturating_add(1);
        warn!(peer = %node_id, reason = %why, "peer link down; reconnecting");
        metrics::counter!("fedrelay_peer_link_errors_total").increment(1);
        tokio::time::sleep(Duration::from_millis(50 * u64::from(failures.min(20)))).await;
        if let Ok(mut st) = state.lock() {
            st.down = false;
        }
    }
}

async fn stream_once(
    node_id: &str,
    addr: &str,
    cfg: &PeerConfig,
    state: &Arc<Mutex<LinkState>>,
    failures: &mut u32,
) -> Result<(), String> {
    let channel = endpoint(addr, cfg.tls.as_ref(), cfg.connect_timeout)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut client = SessionServiceClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let generation = {
        let mut st = state
            .lock()
            .map_err(|_| "link state poisoned".to_string())?;
        st.generation += 1;
        st.generation
    };
    let requests = Batches {
        state: state.clone(),
        generation,
        max_batch: cfg.max_batch.max(1),
        max_in_flight: cfg.max_in_flight.max(1),
        flush_delay: cfg.flush_delay,
        linger: None,
    };
    let mut acks = tokio::time::timeout(cfg.connect_timeout, client.deliver(requests))
        .await
        .map_err(|_| "stream not opened in time".to_string())?
        .map_err(|e| format!("open stream: {e}"))?
        .into_inner();
    debug!(peer = %node_id, "link to peer open");
    *failures = 0;
    loop {
        match acks.message().await {
            Ok(Some(batch)) => {
                let mut st = state
                    .lock()
                    .map_err(|_| "link state poisoned".to_string())?;
                for ack in batch.acks {
                    match st.pending.pop_front() {
                        Some(reply) => {
                            let _ = reply.send(Ok(ack));
                        }
                        None => return Err("more acks than envelopes".into()),
                    }
                }
                // Room in flight again: the request stream may go on.
                if let Some(w) = st.waker.take() {
                    w.wake();
                }
            }
            Ok(None) => return Err("peer closed the stream".into()),
            Err(e) => return Err(format!("stream: {e}")),
        }
    }
}

/// The request side of a link's stream: each poll drains what has gathered on the queue
/// into one batch — up to `max_batch`, all of one hop count — and records the callers in
/// order for their acks.
struct Batches {
    state: Arc<Mutex<LinkState>>,
    generation: u64,
    max_batch: usize,
    max_in_flight: usize,
    flush_delay: Duration,
    linger: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Stream for Batches {
    type Item = EnvelopeBatch;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<EnvelopeBatch>> {
        let this = &mut *self;
        let Ok(mut st) = this.state.lock() else {
            return Poll::Ready(None);
        };
        if st.generation != this.generation {
            return Poll::Ready(None);
        }
        if st.queue.is_empty() || st.pending.len() >= this.max_in_flight {
            st.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        // Optionally linger for a fuller batch, at most `flush_delay` after the oldest.
        if !this.flush_delay.is_zero()
            && st.queue.len() < this.max_batch
            && let Some(since) = st.since
        {
            let until = since + this.flush_delay;
            if tokio::time::Instant::now() < until {
                let sleep = this
                    .linger
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
                sleep.as_mut().reset(until);
                if sleep.as_mut().poll(cx).is_pending() {
                    st.waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
            }
        }
        let hops = st.queue.front().map_or(0, |i| i.hops);
        let room = this.max_batch.min(this.max_in_flight - st.pending.len());
        let mut envelopes = Vec::with_capacity(room.min(st.queue.len()));
        while envelopes.len() < room && st.queue.front().is_some_and(|i| i.hops == hops) {
            let Some(item) = st.queue.pop_front() else {
                break;
            };
            if item.reply.is_closed() {
                // Its caller gave up; do not journal what nobody will acknowledge.
                continue;
            }
            envelopes.push(item.env);
            st.pending.push_back(item.reply);
        }
        st.since = (!st.queue.is_empty()).then(tokio::time::Instant::now);
        if envelopes.is_empty() {
            st.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        metrics::histogram!("fedrelay_peer_batch_size").record(envelopes.len() as f64);
        Poll::Ready(Some(EnvelopeBatch { envelopes, hops }))
    }
}
