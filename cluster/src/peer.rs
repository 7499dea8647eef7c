//! Links to the other nodes: one long-lived bidirectional `SessionService.Deliver` stream per
//! peer, envelopes batched onto it, acks matched back in order.
//!
//! Each link has a bounded queue. A caller whose envelope does not fit, or whose ack does not
//! come back within the forward timeout, gets a retryable error at once — a slow or dead peer
//! costs a bounded amount of memory, never an unbounded one, and the origin retries (inbound
//! dedup makes that safe).

use crate::Member;
use fedrelay_proto::Envelope;
use fedrelay_proto::v1::session_service_client::SessionServiceClient;
use fedrelay_proto::v1::{Ack, EnvelopeBatch};
use session_actor::{Accepted, SessionError, SessionId};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
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
            flush_delay: Duration::from_micros(200),
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

struct Link {
    addr: String,
    tx: mpsc::Sender<Item>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
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
        let (tx, rx) = mpsc::channel(self.cfg.queue.max(1));
        let task = tokio::spawn(run_link(
            member.node_id.clone(),
            member.grpc_addr.clone(),
            self.cfg.clone(),
            rx,
        ));
        let link = Arc::new(Link {
            addr: member.grpc_addr.clone(),
            tx,
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
        link.tx.try_send(Item { env, hops, reply }).map_err(|e| {
            metrics::counter!("fedrelay_peer_refused_total", "reason" => "queue_full").increment(1);
            SessionError::Unavailable(match e {
                mpsc::error::TrySendError::Full(_) => {
                    format!("node {} is not keeping up", member.node_id)
                }
                mpsc::error::TrySendError::Closed(_) => {
                    format!("link to node {} closed", member.node_id)
                }
            })
        })?;
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

fn fail(item: Item, why: &str) {
    let _ = item
        .reply
        .send(Err(SessionError::Unavailable(why.to_string())));
}

/// Keeps one stream to a peer open and moves envelopes over it until the link is dropped.
async fn run_link(node_id: String, addr: String, cfg: PeerConfig, mut rx: mpsc::Receiver<Item>) {
    let mut failures = 0u32;
    let mut carry: Option<Item> = None;
    loop {
        // Connect only when there is something to send.
        if carry.is_none() {
            match rx.recv().await {
                Some(i) => carry = Some(i),
                None => return,
            }
        }
        let outcome = stream_once(&node_id, &addr, &cfg, &mut rx, &mut carry, &mut failures).await;
        match outcome {
            Ok(()) => return,
            Err(e) => {
                failures = failures.saturating_add(1);
                warn!(peer = %node_id, error = %e, "link to peer broke; retrying");
                metrics::counter!("fedrelay_peer_link_errors_total").increment(1);
                // While the peer is unreachable, queued envelopes are refused at once rather
                // than left to time out.
                let backoff = Duration::from_millis(50 * u64::from(failures.min(20)));
                let until = tokio::time::Instant::now() + backoff;
                if let Some(i) = carry.take() {
                    fail(i, "peer unreachable");
                }
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep_until(until) => break,
                        i = rx.recv() => match i {
                            Some(i) => fail(i, "peer unreachable"),
                            None => return,
                        },
                    }
                }
            }
        }
    }
}

async fn stream_once(
    node_id: &str,
    addr: &str,
    cfg: &PeerConfig,
    rx: &mut mpsc::Receiver<Item>,
    carry: &mut Option<Item>,
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
    let (req_tx, req_rx) = mpsc::channel::<EnvelopeBatch>(16);
    let mut acks = tokio::time::timeout(
        cfg.connect_timeout,
        client.deliver(ReceiverStream::new(req_rx)),
    )
    .await
    .map_err(|_| "stream not opened in time".to_string())?
    .map_err(|e| format!("open stream: {e}"))?
    .into_inner();
    debug!(peer = %node_id, "link to peer open");
    *failures = 0;
    let mut pending: VecDeque<oneshot::Sender<Result<Ack, SessionError>>> = VecDeque::new();
    let result = loop {
        let room = pending.len() < cfg.max_in_flight;
        tokio::select! {
            biased;
            msg = acks.message() => match msg {
                Ok(Some(batch)) => {
                    for ack in batch.acks {
                        match pending.pop_front() {
                            Some(reply) => { let _ = reply.send(Ok(ack)); }
                            None => break,
                        }
                    }
                }
                Ok(None) => break Err("peer closed the stream".to_string()),
                Err(e) => break Err(format!("stream: {e}")),
            },
            first = next_item(rx, carry), if room => {
                let Some(first) = first else { break Ok(()) };
                let batch = collect_batch(first, rx, carry, cfg).await;
                let hops = batch.first().map_or(0, |i| i.hops);
                let mut envelopes = Vec::with_capacity(batch.len());
                for item in batch {
                    if item.reply.is_closed() {
                        // Its caller gave up; do not journal what nobody will acknowledge.
                        continue;
                    }
                    envelopes.push(item.env);
                    pending.push_back(item.reply);
                }
                if envelopes.is_empty() {
                    continue;
                }
                metrics::histogram!("fedrelay_peer_batch_size").record(envelopes.len() as f64);
                if req_tx.send(EnvelopeBatch { envelopes, hops }).await.is_err() {
                    break Err("request stream closed".to_string());
                }
            }
        }
    };
    let why = match &result {
        Ok(()) => "node shutting down".to_string(),
        Err(e) => format!("link to node {node_id} broke: {e}"),
    };
    for reply in pending {
        let _ = reply.send(Err(SessionError::Unavailable(why.clone())));
    }
    result
}

async fn next_item(rx: &mut mpsc::Receiver<Item>, carry: &mut Option<Item>) -> Option<Item> {
    match carry.take() {
        Some(i) => Some(i),
        None => rx.recv().await,
    }
}

/// The first item plus whatever follows within the flush delay, up to the batch size; all of
/// one batch have the same hop count (an item with another is carried to the next batch).
async fn collect_batch(
    first: Item,
    rx: &mut mpsc::Receiver<Item>,
    carry: &mut Option<Item>,
    cfg: &PeerConfig,
) -> Vec<Item> {
    let hops = first.hops;
    let mut batch = vec![first];
    let deadline = tokio::time::Instant::now() + cfg.flush_delay;
    while batch.len() < cfg.max_batch {
        let next = match rx.try_recv() {
            Ok(i) => i,
            Err(mpsc::error::TryRecvError::Empty) if !cfg.flush_delay.is_zero() => {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(i)) => i,
                    _ => break,
                }
            }
            Err(_) => break,
        };
        if next.hops != hops {
            *carry = Some(next);
            break;
        }
        batch.push(next);
    }
    batch
}
