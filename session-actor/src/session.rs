//! The actor that owns one chat session.
//!
//! It accepts envelopes one at a time — resolve the target of an edit/delete/reaction,
//! assign the next seq, append (dedup + epoch check + append in one store call), and only then
//! acknowledge — and fans each journaled envelope out to its recipients. Every recipient has
//! its own in-order queue: one batch in flight at a time, retried with exponential backoff,
//! and a batch that cannot be delivered within the budget turns into an `error` envelope to its
//! sender. Delivery cursors and native ids are written back lazily in one store call; the
//! journal prefix every recipient has is trimmed then.

use crate::ids::{id_space, new_relay_msg_id, recipient_key};
use crate::metadata::{MetadataEntry, MetadataSink};
use crate::outbound::{DeliveryError, Outbound};
use crate::store::{AckUpdate, AppendOutcome, AppendRequest, NativeId, SessionStore};
use crate::supervisor::SupervisorMsg;
use crate::{SessionError, SessionId, StoreError};
use fedrelay_proto::{Address, Body, Envelope, v1};
use prost::Message;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, info_span, warn};

/// Tunables of every session on a node.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// A session with nothing to do for this long stops; its state stays in the store and the
    /// next message revives it.
    pub hibernate_after: Duration,
    /// Most envelopes handed to an edge in one delivery call.
    pub max_batch: usize,
    /// First retry delay; doubles per attempt (with jitter) up to `retry_max`.
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// Delivery attempts before a message becomes an error event to its sender.
    pub max_attempts: u32,
    /// Typing indicators are stale quickly: fewer attempts.
    pub max_attempts_ephemeral: u32,
    /// How long delivery cursors may wait before they are written back (one call per session
    /// per interval, however many deliveries completed).
    pub ack_flush_interval: Duration,
    /// Relay-id ⇄ native-id pairs a session keeps in memory (older ones are read from the store).
    pub id_cache: usize,
    /// Undelivered envelopes one recipient may have waiting; past it, new messages to that
    /// recipient are refused with a retryable error (back-pressure on the origin) instead of
    /// growing memory and the journal without bound.
    pub max_backlog: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            hibernate_after: Duration::from_secs(300),
            max_batch: 64,
            retry_base: Duration::from_millis(200),
            retry_max: Duration::from_secs(30),
            max_attempts: 10,
            max_attempts_ephemeral: 2,
            ack_flush_interval: Duration::from_millis(50),
            id_cache: 64,
            max_backlog: 10_000,
        }
    }
}

/// What the session answers for an accepted envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub session_id: SessionId,
    pub relay_msg_id: String,
    pub seq: u64,
    /// The origin id had been journaled before; the ids are the first copy's.
    pub duplicate: bool,
}

pub type AcceptReply = RpcReplyPort<Result<Accepted, SessionError>>;

pub enum SessionMsg {
    /// An envelope from an edge (or from the relay itself) to journal and deliver.
    Inbound(Box<Envelope>, AcceptReply),
    /// Load state now and resume deliveries (sent right after a (re)start).
    Resume,
    /// A delivery task finished.
    Delivered {
        generation: u64,
        key: String,
        count: usize,
        /// On success, the native ids the recipient's platform gave (for some envelopes).
        result: Result<Vec<NativeId>, DeliveryError>,
    },
    /// A recipient's backoff elapsed.
    Retry {
        generation: u64,
        key: String,
    },
    FlushAcks,
    Tick,
    /// The supervisor agreed to hibernate this session: stop if still idle.
    Hibernate,
    /// Flush progress and report how many deliveries are still owed (draining).
    Drain(RpcReplyPort<usize>),
    /// Another node owns this session now: persist progress and stop. Envelopes already in
    /// the mailbox were appended before this arrives; the new owner resumes the rest.
    Handoff,
}

/// Everything a session needs from its node.
#[derive(Clone)]
pub struct SessionDeps {
    pub store: Arc<dyn SessionStore>,
    pub outbound: Arc<dyn Outbound>,
    pub metadata: Arc<dyn MetadataSink>,
    pub config: Arc<SessionConfig>,
}

pub struct SessionArgs {
    pub id: SessionId,
    pub deps: SessionDeps,
    pub supervisor: ActorRef<SupervisorMsg>,
    pub lanes: Arc<Lanes>,
}

/// Per-recipient delivery lanes of one session, kept by the supervisor across restarts of the
/// session's actor. A delivery holds its recipient's lane for the whole call and advances the
/// lane's cursor on success, so a restarted actor neither races a delivery its crashed
/// predecessor left in flight nor resends what that predecessor delivered but had not yet
/// written back to the store.
#[derive(Default)]
pub struct Lanes(std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<u64>>>>);

impl Lanes {
    fn lane(&self, key: &str) -> Arc<tokio::sync::Mutex<u64>> {
        match self.0.lock() {
            Ok(mut m) => m.entry(key.to_string()).or_default().clone(),
            Err(_) => Arc::default(),
        }
    }

    /// Cursors of lanes not in use right now (a busy lane is checked by its next delivery).
    fn snapshot(&self) -> HashMap<String, u64> {
        let Ok(m) = self.0.lock() else {
            return HashMap::new();
        };
        m.iter()
            .filter_map(|(k, l)| l.try_lock().ok().map(|c| (k.clone(), *c)))
            .collect()
    }
}

/// One chat session (see the module docs).
pub struct SessionActor;

pub struct SessionState {
    id: SessionId,
    deps: SessionDeps,
    supervisor: ActorRef<SupervisorMsg>,
    lanes: Arc<Lanes>,
    ticker: Option<JoinHandle<()>>,
    /// `None` until the session is claimed from the store, and again after an error that
    /// leaves the in-memory view in doubt (it is reloaded before the next append).
    loaded: Option<Loaded>,
    /// Bumped on every (re)load, so results of delivery tasks started before are ignored.
    generation: u64,
    last_activity: Instant,
    /// The in-memory view was dropped after a store error (or a load failed): a reload is
    /// owed even if no message arrives, because the journal may hold undelivered messages.
    reload_owed: bool,
    reload_scheduled: bool,
    reload_failures: u32,
    /// Native ids learnt but not yet written when the view was dropped.
    carry: Vec<NativeId>,
    /// The session is in the store's index of sessions that may owe deliveries.
    indexed: bool,
}

struct Loaded {
    epoch: u64,
    last_seq: u64,
    recipients: HashMap<String, Recipient>,
    ids: IdCache,
    pending: PendingAck,
}

struct Recipient {
    addr: Address,
    /// The recipient platform instance's id space (see [`id_space`]).
    space: String,
    /// Highest seq delivered to this recipient: anything at or below is never sent again.
    delivered: u64,
    queue: VecDeque<Arc<Envelope>>,
    /// Envelopes of the queue's front currently with the edge (0: none).
    in_flight: usize,
    attempts: u32,
    /// Consecutive failures on the relay's own side (they grow the backoff, not `attempts`).
    stalls: u32,
    waiting_retry: bool,
    /// After a permanent failure of a batch, send one envelope at a time to find the bad one.
    isolate: bool,
}

#[derive(Default)]
struct PendingAck {
    cursors: HashMap<String, u64>,
    natives: Vec<NativeId>,
    scheduled: bool,
    dirty_trim: bool,
}

/// A bounded FIFO map of recent id-map entries (`n:`/`r:` fields, as in the store).
struct IdCache {
    cap: usize,
    map: HashMap<String, String>,
    order: VecDeque<String>,
}

impl IdCache {
    fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(2),
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn insert(&mut self, k: String, v: String) {
        if self.map.insert(k.clone(), v).is_none() {
            self.order.push_back(k);
            while self.order.len() > self.cap {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }

    fn get(&self, k: &str) -> Option<&String> {
        self.map.get(k)
    }

    fn record(&mut self, relay: &str, platform: &str, native: &str) {
        self.insert(
            crate::store::native_field(platform, native),
            relay.to_string(),
        );
        self.insert(
            crate::store::relay_field(relay, platform),
            native.to_string(),
        );
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn user_at(a: &Address) -> String {
    format!("{}@{}", a.user, a.domain)
}

impl Actor for SessionActor {
    type Msg = SessionMsg;
    type State = SessionState;
    type Arguments = SessionArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SessionArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        // No I/O here: a (re)started session loads on its first message, so a slow store
        // never stalls the supervisor.
        let period = (args.deps.config.hibernate_after / 2).max(Duration::from_millis(10));
        let ticker = myself.send_interval(period, || SessionMsg::Tick);
        Ok(SessionState {
            id: args.id,
            deps: args.deps,
            supervisor: args.supervisor,
            lanes: args.lanes,
            ticker: Some(ticker),
            loaded: None,
            generation: 0,
            last_activity: Instant::now(),
            reload_owed: false,
            reload_scheduled: false,
            reload_failures: 0,
            carry: Vec::new(),
            indexed: false,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(t) = state.ticker.take() {
            t.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SessionMsg::Inbound(env, reply) => {
                state.last_activity = Instant::now();
                let result = state.accept(&myself, *env).await;
                if let Err(SessionError::Store(StoreError::Fenced { .. })) = &result {
                    let _ = reply.send(result);
                    myself.stop(Some("fenced".into()));
                    return Ok(());
                }
                let _ = reply.send(result);
            }
            SessionMsg::Resume => {
                state.reload_scheduled = false;
                if let Err(e) = state.ensure_loaded(&myself).await {
                    warn!(session_id = %state.id, error = %e, "session could not load; retrying");
                }
            }
            SessionMsg::Delivered {
                generation,
                key,
                count,
                result,
            } => {
                if generation == state.generation {
                    state.last_activity = Instant::now();
                    state.on_delivered(&myself, key, count, result).await;
                } else if let Ok(natives) = result {
                    // A delivery that finished after a reload: its envelopes are requeued and
                    // skipped by their lane, but the ids the recipient gave them still count.
                    state.keep_natives(&myself, natives);
                }
            }
            SessionMsg::Retry { generation, key } => {
                if generation == state.generation {
                    if let Some(r) = state
                        .loaded
                        .as_mut()
                        .and_then(|l| l.recipients.get_mut(&key))
                    {
                        r.waiting_retry = false;
                    }
                    state.kick(&myself, &key);
                }
            }
            SessionMsg::FlushAcks => {
                if let Err(StoreError::Fenced { .. }) = state.flush_acks(&myself).await {
                    myself.stop(Some("fenced".into()));
                }
            }
            SessionMsg::Tick => {
                if state.is_idle()
                    && state.last_activity.elapsed() >= state.deps.config.hibernate_after
                {
                    let _ = state
                        .supervisor
                        .cast(SupervisorMsg::RequestHibernate(state.id, myself.get_id()));
                }
            }
            SessionMsg::Hibernate => {
                if state.is_idle() {
                    // Best effort: a session left in the index is loaded by its next owner,
                    // finds nothing owed, and hibernates again.
                    if let Err(e) = state.deps.store.mark_idle(state.id).await {
                        debug!(session_id = %state.id, error = %e, "could not unindex session");
                    }
                    myself.stop(Some("hibernate".into()));
                } else {
                    let _ = state
                        .supervisor
                        .cast(SupervisorMsg::HibernateCancelled(state.id));
                }
            }
            SessionMsg::Drain(reply) => {
                let _ = state.flush_acks(&myself).await;
                let _ = reply.send(state.owed());
            }
            SessionMsg::Handoff => {
                if let Err(e) = state.flush_acks(&myself).await {
                    debug!(session_id = %state.id, error = %e, "progress not persisted at handoff; the new owner redelivers");
                }
                myself.stop(Some("handoff".into()));
            }
        }
        Ok(())
    }
}

// === impl SessionState ===

impl SessionState {
    fn is_idle(&self) -> bool {
        match &self.loaded {
            // Unloaded after a store error, it still owes whatever its journal holds.
            None => !self.reload_owed,
            Some(l) => {
                l.pending.cursors.is_empty()
                    && l.pending.natives.is_empty()
                    && !l.pending.dirty_trim
                    && l.recipients.values().all(|r| r.queue.is_empty())
            }
        }
    }

    /// Forgets the in-memory view after a store error (keeping learnt native ids) and
    /// schedules a reload, so owed deliveries resume without waiting for traffic.
    fn drop_loaded(&mut self, myself: &ActorRef<SessionMsg>) {
        if let Some(l) = self.loaded.take() {
            self.carry.extend(l.pending.natives);
        }
        self.reload_owed = true;
        self.schedule_reload(myself);
    }

    fn schedule_reload(&mut self, myself: &ActorRef<SessionMsg>) {
        if !self.reload_scheduled {
            self.reload_scheduled = true;
            let delay = backoff(&self.deps.config, self.reload_failures.max(1));
            myself.send_after(delay, || SessionMsg::Resume);
        }
    }

    /// Records native ids learnt outside the normal delivery path.
    fn keep_natives(&mut self, myself: &ActorRef<SessionMsg>, natives: Vec<NativeId>) {
        if natives.is_empty() {
            return;
        }
        let Some(loaded) = self.loaded.as_mut() else {
            self.carry.extend(natives);
            return;
        };
        for n in natives {
            loaded
                .ids
                .record(&n.relay_msg_id, &n.platform, &n.native_id);
            loaded.pending.natives.push(n);
        }
        if !loaded.pending.scheduled {
            loaded.pending.scheduled = true;
            myself.send_after(self.deps.config.ack_flush_interval, || {
                SessionMsg::FlushAcks
            });
        }
    }

    /// Deliveries still owed to recipients.
    fn owed(&self) -> usize {
        match &self.loaded {
            Some(l) => l.recipients.values().map(|r| r.queue.len()).sum(),
            None => usize::from(self.reload_owed),
        }
    }

    async fn ensure_loaded(&mut self, myself: &ActorRef<SessionMsg>) -> Result<(), StoreError> {
        if self.loaded.is_some() {
            return Ok(());
        }
        let claimed = match self.deps.store.claim(self.id).await {
            Ok(c) => c,
            Err(e) => {
                self.reload_failures = self.reload_failures.saturating_add(1);
                self.reload_owed = true;
                self.schedule_reload(myself);
                return Err(e);
            }
        };
        self.reload_owed = false;
        self.reload_failures = 0;
        self.generation += 1;
        let mut loaded = Loaded {
            epoch: claimed.epoch,
            last_seq: claimed.last_seq,
            recipients: HashMap::new(),
            ids: IdCache::new(self.deps.config.id_cache),
            pending: PendingAck::default(),
        };
        let resumed = claimed.journal.len();
        let mut cursors = claimed.cursors;
        for (k, c) in self.lanes.snapshot() {
            let e = cursors.entry(k).or_default();
            *e = (*e).max(c);
        }
        for env in claimed.journal {
            enqueue(&mut loaded, &cursors, Arc::new(env));
        }
        let keys: Vec<String> = loaded.recipients.keys().cloned().collect();
        debug!(session_id = %self.id, epoch = loaded.epoch, last_seq = loaded.last_seq, resumed, "session loaded");
        self.loaded = Some(loaded);
        let carried = std::mem::take(&mut self.carry);
        self.keep_natives(myself, carried);
        for k in keys {
            self.kick(myself, &k);
        }
        Ok(())
    }

    /// Journals one envelope; on success it is queued for every recipient.
    async fn accept(
        &mut self,
        myself: &ActorRef<SessionMsg>,
        mut env: Envelope,
    ) -> Result<Accepted, SessionError> {
        let body = env
            .body
            .as_ref()
            .ok_or_else(|| SessionError::Invalid("envelope without body".into()))?;
        let kind = body.kind();
        let category = body.category();
        if env.recipients.is_empty() {
            return Err(SessionError::Invalid("envelope without recipients".into()));
        }
        let sender = env
            .sender
            .clone()
            .ok_or_else(|| SessionError::Invalid("envelope without sender".into()))?;
        self.ensure_loaded(myself).await?;
        let id = self.id;
        let store = self.deps.store.clone();
        if !self.indexed {
            // Before the first append of this actor: whoever owns the session next must find
            // it, even if this node dies with deliveries owed.
            store.mark_active(id).await?;
            self.indexed = true;
        }
        let Some(loaded) = self.loaded.as_mut() else {
            return Err(SessionError::Unavailable("session not loaded".into()));
        };
        // Native ids are unique within one platform instance (a Teams tenant's bot, an XMPP
        // server, an HTTP-edge domain): the sender's id space scopes the origin's id.
        let space = id_space(&sender);
        let sender_key = recipient_key(&sender);
        let origin_native = env
            .origin
            .as_ref()
            .map(|o| o.native_id.clone())
            .filter(|n| !n.is_empty());

        // An edit/delete/reaction may name its target by the origin platform's own id.
        if let Some(target) = env.body.as_mut().and_then(Body::target_mut) {
            if target.relay_msg_id.is_empty() {
                let platform = space.as_str();
                if target.native_id.is_empty() {
                    return Err(SessionError::Invalid("reference without an id".into()));
                }
                let field = crate::store::native_field(platform, &target.native_id);
                let relay = match loaded.ids.get(&field) {
                    Some(r) => Some(r.clone()),
                    None => {
                        store
                            .resolve_native(id, platform, &target.native_id)
                            .await?
                    }
                };
                target.relay_msg_id = relay.ok_or(SessionError::UnknownTarget)?;
            }
            // The origin's native id means nothing to recipients; delivery fills in theirs.
            target.native_id.clear();
        }
        // The target must be a message of this session, and only its sender may change it.
        if let Some(body) = env.body.as_ref()
            && let Some(target) = body.target()
        {
            let field = crate::store::sender_field(&target.relay_msg_id);
            let author = match loaded.ids.get(&field) {
                Some(a) => Some(a.clone()),
                None => store.sender_of(id, &target.relay_msg_id).await?,
            };
            let author = author.ok_or(SessionError::UnknownTarget)?;
            if matches!(body, Body::Edit(_) | Body::Delete(_)) && author != sender_key {
                return Err(SessionError::NotAllowed(
                    "only the sender of a message may edit or delete it".into(),
                ));
            }
        }

        if env.relay_msg_id.is_empty() {
            env.relay_msg_id = new_relay_msg_id();
        }
        if env.sent_at_ms == 0 {
            env.sent_at_ms = now_ms();
        }
        let max_backlog = self.deps.config.max_backlog;
        let full = env.recipients.iter().any(|a| {
            loaded
                .recipients
                .get(&recipient_key(a))
                .is_some_and(|r| r.queue.len() >= max_backlog)
        });
        if full {
            metrics::counter!("fedrelay_backpressure_total").increment(1);
            return Err(SessionError::Unavailable(
                "recipient has too many undelivered messages".into(),
            ));
        }
        let seq = loaded.last_seq + 1;
        env.seq = seq;
        env.session_id = id.0.to_vec();
        let started = Instant::now();
        let outcome = {
            let span = info_span!("session.append", session_id = %id, relay_msg_id = %env.relay_msg_id, seq, kind);
            store
                .append(
                    id,
                    loaded.epoch,
                    AppendRequest {
                        seq,
                        relay_msg_id: &env.relay_msg_id,
                        origin: origin_native.as_deref().map(|n| (space.as_str(), n)),
                        payload: env.encode_to_vec(),
                        sender: &sender_key,
                    },
                )
                .instrument(span)
                .await
        };
        metrics::histogram!("fedrelay_append_seconds").record(started.elapsed().as_secs_f64());
        match outcome {
            Ok(AppendOutcome::Duplicate { relay_msg_id, seq }) => {
                metrics::counter!("fedrelay_inbound_duplicates_total").increment(1);
                Ok(Accepted {
                    session_id: id,
                    relay_msg_id,
                    seq,
                    duplicate: true,
                })
            }
            Ok(AppendOutcome::Appended) => {
                loaded.last_seq = seq;
                if let Some(n) = &origin_native {
                    loaded.ids.record(&env.relay_msg_id, &space, n);
                }
                loaded
                    .ids
                    .insert(crate::store::sender_field(&env.relay_msg_id), sender_key);
                let accepted = Accepted {
                    session_id: id,
                    relay_msg_id: env.relay_msg_id.clone(),
                    seq,
                    duplicate: false,
                };
                self.deps.metadata.record(MetadataEntry {
                    at_ms: now_ms(),
                    session_id: Some(id),
                    relay_msg_id: env.relay_msg_id.clone(),
                    sender: user_at(&sender),
                    sender_platform: sender.platform.clone(),
                    receivers: env.recipients.iter().map(user_at).collect(),
                    receiver_platform: env
                        .recipients
                        .first()
                        .map(|r| r.platform.clone())
                        .unwrap_or_default(),
                    category,
                    kind: kind.to_string(),
                });
                let keys: Vec<String> = env.recipients.iter().map(recipient_key).collect();
                enqueue(loaded, &HashMap::new(), Arc::new(env));
                for k in keys {
                    self.kick(myself, &k);
                }
                Ok(accepted)
            }
            Err(e) => {
                // The append may or may not have happened: reload before the next one (a
                // retried event is then found by dedup, a journaled one is redelivered).
                if !matches!(e, StoreError::Fenced { .. }) {
                    self.drop_loaded(myself);
                }
                Err(e.into())
            }
        }
    }

    /// Starts a delivery to `key` if it has work and nothing in flight.
    fn kick(&mut self, myself: &ActorRef<SessionMsg>, key: &str) {
        let generation = self.generation;
        let id = self.id;
        let Some(loaded) = self.loaded.as_mut() else {
            return;
        };
        let Some(r) = loaded.recipients.get_mut(key) else {
            return;
        };
        if r.in_flight > 0 || r.waiting_retry || r.queue.is_empty() {
            return;
        }
        let max = if r.isolate {
            1
        } else {
            self.deps.config.max_batch.max(1)
        };
        let mut batch: Vec<Arc<Envelope>> = r.queue.iter().take(max).cloned().collect();
        r.in_flight = batch.len();
        // Name each edit/delete/reaction target by the recipient platform's own id when known.
        let mut misses = Vec::new();
        for (i, env) in batch.iter_mut().enumerate() {
            let Some(relay) = env
                .body
                .as_ref()
                .and_then(Body::target)
                .map(|t| t.relay_msg_id.clone())
            else {
                continue;
            };
            match loaded.ids.get(&crate::store::relay_field(&relay, &r.space)) {
                Some(native) => set_target_native(env, native.clone()),
                None => misses.push((i, relay)),
            }
        }
        let addr = r.addr.clone();
        let space = r.space.clone();
        let store = self.deps.store.clone();
        let outbound = self.deps.outbound.clone();
        let lane = self.lanes.lane(key);
        let myself = myself.clone();
        let key = key.to_string();
        let count = batch.len();
        let first = batch.first().map(|e| e.seq).unwrap_or(0);
        let span = info_span!("session.deliver", session_id = %id, first_seq = first, count, platform = %addr.platform);
        tokio::spawn(
            async move {
                for (i, relay) in misses {
                    if let Ok(Some(native)) = store.native_for(id, &relay, &space).await {
                        set_target_native(&mut batch[i], native);
                    }
                }
                let mut delivered = lane.lock().await;
                let done = *delivered;
                let fresh: Vec<Arc<Envelope>> =
                    batch.iter().filter(|e| e.seq > done).cloned().collect();
                let skipped = batch.len() - fresh.len();
                let result = if fresh.is_empty() {
                    Ok(Vec::new())
                } else {
                    outbound.deliver(&addr, &fresh).await.map(|natives| {
                        *delivered = fresh.last().map_or(done, |e| e.seq);
                        fresh
                            .iter()
                            .zip(natives)
                            .filter_map(|(e, n)| {
                                let native_id = n.filter(|n| !n.is_empty())?;
                                Some(NativeId {
                                    relay_msg_id: e.relay_msg_id.clone(),
                                    platform: space.clone(),
                                    native_id,
                                    seq: e.seq,
                                })
                            })
                            .collect()
                    })
                };
                drop(delivered);
                match &result {
                    Ok(_) => debug!(first_seq = first, skipped, "delivered"),
                    Err(e) => debug!(code = %e.code, retryable = e.retryable, "delivery failed"),
                }
                let _ = myself.cast(SessionMsg::Delivered {
                    generation,
                    key,
                    count,
                    result,
                });
            }
            .instrument(span),
        );
    }

    async fn on_delivered(
        &mut self,
        myself: &ActorRef<SessionMsg>,
        key: String,
        count: usize,
        result: Result<Vec<NativeId>, DeliveryError>,
    ) {
        let cfg = self.deps.config.clone();
        let Some(loaded) = self.loaded.as_mut() else {
            return;
        };
        let Some(r) = loaded.recipients.get_mut(&key) else {
            return;
        };
        r.in_flight = 0;
        let mut failed: Vec<(Arc<Envelope>, DeliveryError)> = Vec::new();
        match result {
            Ok(natives) => {
                r.attempts = 0;
                r.stalls = 0;
                r.isolate = false;
                for _ in 0..count {
                    let Some(env) = r.queue.pop_front() else {
                        break;
                    };
                    r.delivered = r.delivered.max(env.seq);
                }
                for n in natives {
                    loaded
                        .ids
                        .record(&n.relay_msg_id, &n.platform, &n.native_id);
                    loaded.pending.natives.push(n);
                }
                metrics::counter!("fedrelay_deliveries_total", "outcome" => "delivered")
                    .increment(count as u64);
            }
            Err(e) => {
                let ephemeral = r
                    .queue
                    .iter()
                    .take(count)
                    .all(|env| env.body.as_ref().is_some_and(Body::is_ephemeral));
                let budget = if ephemeral {
                    cfg.max_attempts_ephemeral
                } else {
                    cfg.max_attempts
                };
                if e.retryable && (e.internal || r.attempts + 1 < budget) {
                    if e.internal {
                        r.stalls = r.stalls.saturating_add(1);
                    } else {
                        r.attempts += 1;
                    }
                    r.waiting_retry = true;
                    let delay = e
                        .retry_after
                        .unwrap_or_else(|| backoff(&cfg, r.attempts.saturating_add(r.stalls)));
                    metrics::counter!("fedrelay_delivery_retries_total").increment(1);
                    debug!(recipient_platform = %r.addr.platform, attempts = r.attempts, code = %e.code, "delivery failed; retrying");
                    let generation = self.generation;
                    let k = key.clone();
                    myself.send_after(delay, move || SessionMsg::Retry { generation, key: k });
                    return;
                }
                if !e.retryable && count > 1 {
                    // One bad envelope must not sink the batch: find it.
                    r.isolate = true;
                } else {
                    r.attempts = 0;
                    for _ in 0..count {
                        let Some(env) = r.queue.pop_front() else {
                            break;
                        };
                        r.delivered = r.delivered.max(env.seq);
                        failed.push((env, e.clone()));
                    }
                    metrics::counter!("fedrelay_deliveries_total", "outcome" => "failed")
                        .increment(failed.len() as u64);
                }
            }
        }
        loaded.pending.cursors.insert(key.clone(), r.delivered);
        loaded.pending.dirty_trim = true;
        if !loaded.pending.scheduled {
            loaded.pending.scheduled = true;
            myself.send_after(cfg.ack_flush_interval, || SessionMsg::FlushAcks);
        }
        for (env, e) in failed {
            self.report_undeliverable(myself, &env, &e).await;
        }
        self.kick(myself, &key);
    }

    /// Turns an undeliverable envelope into an `error` envelope to its sender (journaled and
    /// delivered like any other) and an `error` entry in the metadata log.
    async fn report_undeliverable(
        &mut self,
        myself: &ActorRef<SessionMsg>,
        env: &Envelope,
        e: &DeliveryError,
    ) {
        let Some(sender) = env.sender.clone() else {
            return;
        };
        warn!(session_id = %self.id, seq = env.seq, relay_msg_id = %env.relay_msg_id, code = %e.code, "message undeliverable");
        self.deps.metadata.record(MetadataEntry {
            at_ms: now_ms(),
            session_id: Some(self.id),
            relay_msg_id: env.relay_msg_id.clone(),
            sender: user_at(&sender),
            sender_platform: sender.platform.clone(),
            receivers: env.recipients.iter().map(user_at).collect(),
            receiver_platform: env
                .recipients
                .first()
                .map(|r| r.platform.clone())
                .unwrap_or_default(),
            category: "error",
            kind: e.code.clone(),
        });
        // Errors about errors, and about typing, would only echo.
        if env
            .body
            .as_ref()
            .is_some_and(|b| matches!(b, Body::Error(_)) || b.is_ephemeral())
        {
            return;
        }
        let relay_sender = Address::new(sender.platform.clone(), sender.domain.clone(), "fedrelay");
        let error = Envelope {
            origin: Some(v1::Origin {
                platform: "relay".into(),
                native_id: format!("undeliverable:{}", env.relay_msg_id),
            }),
            sender: Some(relay_sender),
            recipients: vec![sender],
            trace_context: env.trace_context.clone(),
            body: Some(Body::Error(v1::Error {
                code: "undeliverable".into(),
                detail: e.code.clone(),
                about: Some(v1::MessageRef {
                    relay_msg_id: env.relay_msg_id.clone(),
                    native_id: String::new(),
                }),
            })),
            ..Default::default()
        };
        if let Err(err) = self.accept(myself, error).await {
            warn!(session_id = %self.id, error = %err, "could not journal an undeliverable notice");
        }
    }

    async fn flush_acks(&mut self, myself: &ActorRef<SessionMsg>) -> Result<(), StoreError> {
        let Some(loaded) = self.loaded.as_mut() else {
            return Ok(());
        };
        loaded.pending.scheduled = false;
        if loaded.pending.cursors.is_empty()
            && loaded.pending.natives.is_empty()
            && !loaded.pending.dirty_trim
        {
            return Ok(());
        }
        // Everything below the oldest undelivered envelope of any recipient is done.
        let trim_through = loaded
            .recipients
            .values()
            .filter_map(|r| r.queue.front().map(|e| e.seq.saturating_sub(1)))
            .min()
            .unwrap_or(loaded.last_seq);
        let update = AckUpdate {
            cursors: loaded.pending.cursors.drain().collect(),
            trim_through,
            natives: std::mem::take(&mut loaded.pending.natives),
        };
        loaded.pending.dirty_trim = false;
        match self.deps.store.ack(self.id, loaded.epoch, &update).await {
            Ok(()) => Ok(()),
            Err(e) => {
                // Keep the progress for the next try; losing it only means redelivery.
                for (k, s) in update.cursors {
                    let c = loaded.pending.cursors.entry(k).or_default();
                    *c = (*c).max(s);
                }
                loaded.pending.natives.extend(update.natives);
                loaded.pending.dirty_trim = true;
                if !matches!(e, StoreError::Fenced { .. }) && !loaded.pending.scheduled {
                    loaded.pending.scheduled = true;
                    let delay = self
                        .deps
                        .config
                        .retry_base
                        .max(self.deps.config.ack_flush_interval);
                    myself.send_after(delay, || SessionMsg::FlushAcks);
                }
                warn!(session_id = %self.id, error = %e, "could not persist delivery progress");
                Err(e)
            }
        }
    }
}

fn set_target_native(env: &mut Arc<Envelope>, native: String) {
    if let Some(t) = Arc::make_mut(env).body.as_mut().and_then(Body::target_mut) {
        t.native_id = native;
    }
}

/// Queues `env` for each of its recipients that has not had it yet.
fn enqueue(loaded: &mut Loaded, cursors: &HashMap<String, u64>, env: Arc<Envelope>) {
    for addr in &env.recipients {
        let key = recipient_key(addr);
        let r = loaded
            .recipients
            .entry(key.clone())
            .or_insert_with(|| Recipient {
                addr: addr.clone(),
                space: id_space(addr),
                delivered: cursors.get(&key).copied().unwrap_or(0),
                queue: VecDeque::new(),
                in_flight: 0,
                attempts: 0,
                stalls: 0,
                waiting_retry: false,
                isolate: false,
            });
        if env.seq > r.delivered && r.queue.back().is_none_or(|b| b.seq < env.seq) {
            r.queue.push_back(env.clone());
        }
    }
}

/// Exponential backoff with ±25% jitter.
fn backoff(cfg: &SessionConfig, attempt: u32) -> Duration {
    let exp = cfg
        .retry_base
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let base = exp.min(cfg.retry_max);
    let jitter = rand::random_range(0.75..1.25);
    base.mul_f64(jitter)
}
