//! Presence: one [`PresenceActor`] per user, owned by the node the shard map picks for that
//! user (the same rendezvous hashing as sessions).
//!
//! Edges send a user's presence changes to the owner of that user's actor. The actor bumps
//! the user's presence version in the store and fans the update out to the user's
//! subscribers, grouped by the node that serves each subscriber: one local delivery, and one
//! `PresenceService.Fanout` call per other node — never one call per subscriber. Presence is
//! state, not history: it is not journaled, each subscriber keeps the newest version, and a
//! new subscriber gets the current presence at once.

use crate::peer::endpoint;
use crate::router::owns;
use crate::{Member, Membership, ShardMap};
use async_trait::async_trait;
use fedrelay_proto::v1::presence_service_client::PresenceServiceClient;
use fedrelay_proto::v1::presence_service_server::PresenceService;
use fedrelay_proto::v1::{PresenceFanout, PresenceReply, PresenceUpdate, Subscription};
use fedrelay_proto::{Address, Body, Envelope, v1};
use prost::Message;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use redis::aio::ConnectionManager;
use session_actor::ids::{new_relay_msg_id, recipient_key};
use session_actor::{Outbound, SessionError, SessionId, StoreError};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Mutex as AsyncMutex;
use tonic::transport::{Channel, ClientTlsConfig};
use tonic::{Request, Response, Status};
use tracing::{Instrument, debug, warn};

/// Where users' presence and subscribers are kept.
#[async_trait]
pub trait PresenceStore: Send + Sync + 'static {
    /// Records `presence` as `user`'s current one and returns its new version.
    async fn publish(&self, user: &Address, presence: &v1::Presence) -> Result<u64, StoreError>;
    /// The current presence and its version, if the user ever published.
    async fn current(&self, user: &Address) -> Result<Option<(v1::Presence, u64)>, StoreError>;
    async fn set_subscribed(
        &self,
        publisher: &Address,
        subscriber: &Address,
        on: bool,
    ) -> Result<(), StoreError>;
    async fn subscribers(&self, publisher: &Address) -> Result<Vec<Address>, StoreError>;
    /// Records that `requester` sent `target` a contact request (or forgets it).
    async fn set_requested(
        &self,
        requester: &Address,
        target: &Address,
        on: bool,
    ) -> Result<(), StoreError>;
    /// Whether `requester` sent `target` a contact request that was not declined.
    async fn requested(&self, requester: &Address, target: &Address) -> Result<bool, StoreError>;
}

/// The session id presence deliveries carry: one per publisher, so a receiver's dedup on
/// (session, seq) keeps only newer versions.
pub fn presence_session(user: &Address) -> SessionId {
    SessionId::channel("presence", &recipient_key(user))
}

fn encode_addr(a: &Address) -> Vec<u8> {
    a.encode_to_vec()
}

/// Presence in memory (`--dev`, tests).
#[derive(Default)]
pub struct MemoryPresenceStore {
    state: Mutex<HashMap<String, (v1::Presence, u64)>>,
    subs: Mutex<HashMap<String, HashSet<Vec<u8>>>>,
    /// Target → requesters.
    requests: Mutex<HashMap<String, HashSet<Vec<u8>>>>,
}

/// Adds `member` to (or removes it from) the set of `owner` in `sets`.
fn toggle(
    sets: &Mutex<HashMap<String, HashSet<Vec<u8>>>>,
    owner: &Address,
    member: &Address,
    on: bool,
) -> Result<(), StoreError> {
    let mut sets = sets.lock().map_err(poisoned)?;
    let set = sets.entry(recipient_key(owner)).or_default();
    if on {
        set.insert(encode_addr(member));
    } else {
        set.remove(&encode_addr(member));
    }
    Ok(())
}

fn poisoned<T>(_: T) -> StoreError {
    StoreError::Unavailable("presence store poisoned".into())
}

#[async_trait]
impl PresenceStore for MemoryPresenceStore {
    async fn publish(&self, user: &Address, presence: &v1::Presence) -> Result<u64, StoreError> {
        let mut s = self.state.lock().map_err(poisoned)?;
        let e = s
            .entry(recipient_key(user))
            .or_insert_with(|| (presence.clone(), 0));
        e.0 = presence.clone();
        e.1 += 1;
        Ok(e.1)
    }

    async fn current(&self, user: &Address) -> Result<Option<(v1::Presence, u64)>, StoreError> {
        Ok(self
            .state
            .lock()
            .map_err(poisoned)?
            .get(&recipient_key(user))
            .cloned())
    }

    async fn set_subscribed(
        &self,
        publisher: &Address,
        subscriber: &Address,
        on: bool,
    ) -> Result<(), StoreError> {
        toggle(&self.subs, publisher, subscriber, on)
    }

    async fn set_requested(
        &self,
        requester: &Address,
        target: &Address,
        on: bool,
    ) -> Result<(), StoreError> {
        toggle(&self.requests, target, requester, on)
    }

    async fn requested(&self, requester: &Address, target: &Address) -> Result<bool, StoreError> {
        Ok(self
            .requests
            .lock()
            .map_err(poisoned)?
            .get(&recipient_key(target))
            .is_some_and(|s| s.contains(&encode_addr(requester))))
    }

    async fn subscribers(&self, publisher: &Address) -> Result<Vec<Address>, StoreError> {
        let subs = self.subs.lock().map_err(poisoned)?;
        Ok(subs
            .get(&recipient_key(publisher))
            .map(|s| {
                s.iter()
                    .filter_map(|b| Address::decode(b.as_slice()).ok())
                    .collect()
            })
            .unwrap_or_default())
    }
}

/// Presence in Redis: `<prefix>:p:{<user>}:state` (hash: `v` version, `p` encoded presence),
/// `<prefix>:p:{<user>}:subs` (set of encoded subscriber addresses) and
/// `<prefix>:p:{<user>}:req` (set of encoded addresses that sent the user a contact request).
#[derive(Clone)]
pub struct RedisPresenceStore {
    conn: ConnectionManager,
    prefix: String,
}

impl RedisPresenceStore {
    pub fn new(conn: ConnectionManager, prefix: &str) -> Self {
        Self {
            conn,
            prefix: prefix.to_string(),
        }
    }

    fn key(&self, user: &Address, what: &str) -> String {
        let id = presence_session(user);
        format!("{}:p:{{{}}}:{what}", self.prefix, id.to_hex())
    }

    /// Adds `member` to (or removes it from) the set at `key`.
    async fn toggle(&self, key: String, member: &Address, on: bool) -> Result<(), StoreError> {
        let _: u64 = redis::cmd(if on { "SADD" } else { "SREM" })
            .arg(key)
            .arg(encode_addr(member))
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }
}

#[async_trait]
impl PresenceStore for RedisPresenceStore {
    async fn publish(&self, user: &Address, presence: &v1::Presence) -> Result<u64, StoreError> {
        let key = self.key(user, "state");
        let (v, _): (u64, u64) = redis::pipe()
            .atomic()
            .cmd("HINCRBY")
            .arg(&key)
            .arg("v")
            .arg(1)
            .cmd("HSET")
            .arg(&key)
            .arg("p")
            .arg(presence.encode_to_vec())
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(v)
    }

    async fn current(&self, user: &Address) -> Result<Option<(v1::Presence, u64)>, StoreError> {
        let (v, p): (Option<u64>, Option<Vec<u8>>) = redis::cmd("HMGET")
            .arg(self.key(user, "state"))
            .arg("v")
            .arg("p")
            .query_async(&mut self.conn.clone())
            .await?;
        match (v, p) {
            (Some(v), Some(p)) => Ok(Some((
                v1::Presence::decode(p.as_slice())
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                v,
            ))),
            _ => Ok(None),
        }
    }

    async fn set_subscribed(
        &self,
        publisher: &Address,
        subscriber: &Address,
        on: bool,
    ) -> Result<(), StoreError> {
        self.toggle(self.key(publisher, "subs"), subscriber, on)
            .await
    }

    async fn set_requested(
        &self,
        requester: &Address,
        target: &Address,
        on: bool,
    ) -> Result<(), StoreError> {
        self.toggle(self.key(target, "req"), requester, on).await
    }

    async fn requested(&self, requester: &Address, target: &Address) -> Result<bool, StoreError> {
        let member: bool = redis::cmd("SISMEMBER")
            .arg(self.key(target, "req"))
            .arg(encode_addr(requester))
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(member)
    }

    async fn subscribers(&self, publisher: &Address) -> Result<Vec<Address>, StoreError> {
        let raw: Vec<Vec<u8>> = redis::cmd("SMEMBERS")
            .arg(self.key(publisher, "subs"))
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(raw
            .iter()
            .filter_map(|b| Address::decode(b.as_slice()).ok())
            .collect())
    }
}

// === The actor ===

pub enum PresenceMsg {
    Publish(
        Box<v1::Presence>,
        Option<v1::TraceContext>,
        RpcReplyPort<Result<(u64, usize), SessionError>>,
    ),
    Subscribe(Box<Address>, bool, RpcReplyPort<Result<u64, SessionError>>),
    Tick,
}

/// The actor of one user's presence.
pub struct PresenceActor;

pub struct PresenceState {
    user: Address,
    hub: Arc<Presence>,
    subscribers: Option<HashSet<Address>>,
    last_used: Instant,
}

impl Actor for PresenceActor {
    type Msg = PresenceMsg;
    type State = PresenceState;
    type Arguments = (Address, Arc<Presence>);

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        (user, hub): (Address, Arc<Presence>),
    ) -> Result<Self::State, ActorProcessingErr> {
        let period = (hub.idle_after / 2).max(Duration::from_millis(10));
        myself.send_interval(period, || PresenceMsg::Tick);
        Ok(PresenceState {
            user,
            hub,
            subscribers: None,
            last_used: Instant::now(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            PresenceMsg::Publish(p, tc, reply) => {
                st.last_used = Instant::now();
                let r = st.publish(*p, tc).await;
                let _ = reply.send(r);
            }
            PresenceMsg::Subscribe(sub, on, reply) => {
                st.last_used = Instant::now();
                let r = st.subscribe(*sub, on).await;
                let _ = reply.send(r);
            }
            PresenceMsg::Tick => {
                let key = recipient_key(&st.user);
                let moved = !owns(
                    &st.hub.membership.shard_map(),
                    st.hub.me(),
                    &presence_session(&st.user),
                );
                if moved || st.last_used.elapsed() >= st.hub.idle_after {
                    st.hub.forget(&key, myself.get_id());
                    myself.stop(None);
                }
            }
        }
        Ok(())
    }
}

impl PresenceState {
    async fn load(&mut self) -> Result<&mut HashSet<Address>, SessionError> {
        if self.subscribers.is_none() {
            let subs = self.hub.store.subscribers(&self.user).await?;
            self.subscribers = Some(subs.into_iter().collect());
        }
        self.subscribers
            .as_mut()
            .ok_or_else(|| SessionError::Unavailable("presence not loaded".into()))
    }

    async fn publish(
        &mut self,
        presence: v1::Presence,
        tc: Option<v1::TraceContext>,
    ) -> Result<(u64, usize), SessionError> {
        let version = self.hub.store.publish(&self.user, &presence).await?;
        let subs: Vec<Address> = self.load().await?.iter().cloned().collect();
        let n = subs.len();
        self.hub
            .fan_out(&self.user, &presence, version, subs, tc)
            .await;
        Ok((version, n))
    }

    async fn subscribe(&mut self, sub: Address, on: bool) -> Result<u64, SessionError> {
        self.hub.store.set_subscribed(&self.user, &sub, on).await?;
        let set = self.load().await?;
        if on {
            set.insert(sub.clone());
        } else {
            set.remove(&sub);
        }
        let current = self.hub.store.current(&self.user).await?;
        let version = current.as_ref().map_or(0, |c| c.1);
        if on && let Some((p, v)) = current {
            // A new subscriber sees the current presence at once.
            self.hub.fan_out(&self.user, &p, v, vec![sub], None).await;
        }
        Ok(version)
    }
}

// === The hub: actors of this node, fan-out, the gRPC service ===

/// This node's presence actors and the fan-out machinery.
pub struct Presence {
    membership: Arc<dyn Membership>,
    store: Arc<dyn PresenceStore>,
    outbound: Arc<dyn Outbound>,
    actors: AsyncMutex<HashMap<String, ActorRef<PresenceMsg>>>,
    clients: Mutex<HashMap<String, (String, PresenceServiceClient<Channel>)>>,
    tls: Option<ClientTlsConfig>,
    idle_after: Duration,
    call_timeout: Duration,
}

impl Presence {
    pub fn new(
        membership: Arc<dyn Membership>,
        store: Arc<dyn PresenceStore>,
        outbound: Arc<dyn Outbound>,
        tls: Option<ClientTlsConfig>,
    ) -> Arc<Self> {
        Arc::new(Self {
            membership,
            store,
            outbound,
            actors: AsyncMutex::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
            tls,
            idle_after: Duration::from_secs(300),
            call_timeout: Duration::from_secs(5),
        })
    }

    fn me(&self) -> &str {
        self.membership.node_id()
    }

    /// Records (or forgets) a contact request of `requester` to `target`: only an answer to
    /// one makes the two follow each other.
    pub async fn note_request(
        &self,
        requester: &Address,
        target: &Address,
        on: bool,
    ) -> Result<(), SessionError> {
        self.store
            .set_requested(requester, target, on)
            .await
            .map_err(|e| SessionError::Unavailable(e.to_string()))
    }

    /// Whether `requester` asked `target` to connect.
    pub async fn was_requested(
        &self,
        requester: &Address,
        target: &Address,
    ) -> Result<bool, SessionError> {
        self.store
            .requested(requester, target)
            .await
            .map_err(|e| SessionError::Unavailable(e.to_string()))
    }

    /// Presence actors running on this node.
    pub async fn active(&self) -> usize {
        self.actors.lock().await.len()
    }

    fn forget(self: &Arc<Self>, key: &str, actor: ractor::ActorId) {
        let this = self.clone();
        let key = key.to_string();
        tokio::spawn(async move {
            let mut actors = this.actors.lock().await;
            if actors.get(&key).is_some_and(|a| a.get_id() == actor) {
                actors.remove(&key);
            }
        });
    }

    async fn actor(
        self: &Arc<Self>,
        user: &Address,
    ) -> Result<ActorRef<PresenceMsg>, SessionError> {
        let key = recipient_key(user);
        let mut actors = self.actors.lock().await;
        if let Some(a) = actors.get(&key)
            && a.get_status() == ractor::ActorStatus::Running
        {
            return Ok(a.clone());
        }
        let (a, _) = Actor::spawn(None, PresenceActor, (user.clone(), self.clone()))
            .await
            .map_err(|e| SessionError::Unavailable(format!("presence actor: {e}")))?;
        actors.insert(key, a.clone());
        Ok(a)
    }

    fn owner(&self, user: &Address) -> Result<Member, SessionError> {
        self.membership
            .shard_map()
            .owner(&presence_session(user))
            .cloned()
            .ok_or_else(|| SessionError::Unavailable("no live member".into()))
    }

    fn client(&self, m: &Member) -> Result<PresenceServiceClient<Channel>, SessionError> {
        let mut clients = self
            .clients
            .lock()
            .map_err(|_| SessionError::Unavailable("presence clients poisoned".into()))?;
        if let Some((addr, c)) = clients.get(&m.node_id)
            && *addr == m.grpc_addr
        {
            return Ok(c.clone());
        }
        let ch = endpoint(&m.grpc_addr, self.tls.as_ref(), Duration::from_secs(1))
            .map_err(|e| SessionError::Unavailable(e.to_string()))?
            .connect_lazy();
        let c = PresenceServiceClient::new(ch);
        clients.insert(m.node_id.clone(), (m.grpc_addr.clone(), c.clone()));
        Ok(c)
    }

    /// Publishes `user`'s presence through its owner; answers (version, subscribers).
    pub async fn publish(
        self: &Arc<Self>,
        user: &Address,
        presence: v1::Presence,
        tc: Option<v1::TraceContext>,
    ) -> Result<(u64, usize), SessionError> {
        let owner = self.owner(user)?;
        if owner.node_id == self.me() {
            let a = self.actor(user).await?;
            return call(
                &a,
                |r| PresenceMsg::Publish(Box::new(presence), tc, r),
                self.call_timeout,
            )
            .await;
        }
        let mut c = self.client(&owner)?;
        let r = c
            .publish(Request::new(PresenceUpdate {
                user: Some(user.clone()),
                presence: Some(presence),
                trace_context: tc,
            }))
            .await
            .map_err(status_error)?
            .into_inner();
        Ok((r.version, r.delivered as usize))
    }

    /// Makes `subscriber` follow (or stop following) `publisher`'s presence.
    pub async fn subscribe(
        self: &Arc<Self>,
        publisher: &Address,
        subscriber: &Address,
        on: bool,
    ) -> Result<u64, SessionError> {
        let owner = self.owner(publisher)?;
        if owner.node_id == self.me() {
            let a = self.actor(publisher).await?;
            let sub = Box::new(subscriber.clone());
            return call(
                &a,
                |r| PresenceMsg::Subscribe(sub, on, r),
                self.call_timeout,
            )
            .await;
        }
        let mut c = self.client(&owner)?;
        let r = c
            .subscribe(Request::new(Subscription {
                subscriber: Some(subscriber.clone()),
                publisher: Some(publisher.clone()),
                subscribe: on,
            }))
            .await
            .map_err(status_error)?
            .into_inner();
        Ok(r.version)
    }

    /// Sends one update to its subscribers: grouped by the node serving each, one call per
    /// node, all nodes at once.
    async fn fan_out(
        self: &Arc<Self>,
        publisher: &Address,
        presence: &v1::Presence,
        version: u64,
        subscribers: Vec<Address>,
        tc: Option<v1::TraceContext>,
    ) {
        let map: Arc<ShardMap> = self.membership.shard_map();
        let mut by_node: HashMap<String, (Member, Vec<Address>)> = HashMap::new();
        for s in subscribers {
            let Some(m) = map.owner(&presence_session(&s)) else {
                continue;
            };
            by_node
                .entry(m.node_id.clone())
                .or_insert_with(|| (m.clone(), Vec::new()))
                .1
                .push(s);
        }
        let calls = by_node.into_values().map(|(m, subs)| {
            let this = self.clone();
            let batch = PresenceFanout {
                publisher: Some(publisher.clone()),
                presence: Some(presence.clone()),
                version,
                subscribers: subs,
                trace_context: tc.clone(),
            };
            async move {
                if m.node_id == this.me() {
                    this.deliver_local(batch).await;
                } else {
                    let n = batch.subscribers.len();
                    let sent = match this.client(&m) {
                        Ok(mut c) => c.fanout(Request::new(batch)).await.map(|_| ()).map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    if let Err(e) = sent {
                        // Presence is state: the next update supersedes this one.
                        metrics::counter!("fedrelay_presence_fanout_failed_total").increment(n as u64);
                        warn!(peer = %m.node_id, subscribers = n, error = %e, "presence fan-out to a node failed");
                    }
                }
            }
        });
        futures::future::join_all(calls).await;
    }

    /// Delivers an update to subscribers this node serves, through their edges.
    pub async fn deliver_local(&self, batch: PresenceFanout) -> usize {
        let Some(publisher) = batch.publisher else {
            return 0;
        };
        let session = presence_session(&publisher);
        let subs = batch.subscribers;
        let n = subs.len();
        let mut ok = 0usize;
        for chunk in subs.chunks(256) {
            let results = futures::future::join_all(chunk.iter().map(|s| {
                let env = Arc::new(Envelope {
                    session_id: session.0.to_vec(),
                    relay_msg_id: new_relay_msg_id(),
                    sender: Some(publisher.clone()),
                    recipients: vec![s.clone()],
                    seq: batch.version,
                    sent_at_ms: now_ms(),
                    trace_context: batch.trace_context.clone(),
                    body: Some(Body::Presence(batch.presence.clone().unwrap_or_default())),
                    ..Default::default()
                });
                let outbound = self.outbound.clone();
                async move { outbound.deliver(s, &[env]).await }
            }))
            .await;
            ok += results.iter().filter(|r| r.is_ok()).count();
        }
        metrics::counter!("fedrelay_presence_delivered_total").increment(ok as u64);
        if ok < n {
            debug!(failed = n - ok, "some presence deliveries failed");
        }
        ok
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn status_error(s: Status) -> SessionError {
    SessionError::Unavailable(format!("presence owner: {}", s.message()))
}

async fn call<T: Send + 'static>(
    a: &ActorRef<PresenceMsg>,
    msg: impl FnOnce(RpcReplyPort<Result<T, SessionError>>) -> PresenceMsg,
    timeout: Duration,
) -> Result<T, SessionError> {
    match a.call(msg, Some(timeout)).await {
        Ok(ractor::rpc::CallResult::Success(r)) => r,
        _ => Err(SessionError::Unavailable(
            "presence actor did not answer".into(),
        )),
    }
}

fn to_status(e: SessionError) -> Status {
    if e.is_retryable() {
        Status::unavailable(e.to_string())
    } else {
        Status::invalid_argument(e.to_string())
    }
}

/// `PresenceService`: what other nodes ask of this node's presence actors.
pub struct PresenceSvc(pub Arc<Presence>);

impl PresenceSvc {
    /// Refuses (retryably) a call for a user whose presence another node owns now.
    fn check_owner(&self, user: &Address) -> Result<(), Status> {
        let map = self.0.membership.shard_map();
        if owns(&map, self.0.me(), &presence_session(user)) {
            Ok(())
        } else {
            Err(Status::unavailable("not the owner of this presence"))
        }
    }
}

#[tonic::async_trait]
impl PresenceService for PresenceSvc {
    async fn publish(
        &self,
        req: Request<PresenceUpdate>,
    ) -> Result<Response<PresenceReply>, Status> {
        let u = req.into_inner();
        let user = u
            .user
            .ok_or_else(|| Status::invalid_argument("user missing"))?;
        self.check_owner(&user)?;
        let span = tracing::info_span!("presence.publish");
        crate::trace::set_parent(&span, u.trace_context.as_ref());
        let a = self.0.actor(&user).await.map_err(to_status)?;
        let presence = u.presence.unwrap_or_default();
        let tc = u.trace_context;
        let (version, n) = call(
            &a,
            |r| PresenceMsg::Publish(Box::new(presence), tc, r),
            self.0.call_timeout,
        )
        .instrument(span)
        .await
        .map_err(to_status)?;
        Ok(Response::new(PresenceReply {
            version,
            delivered: n as u64,
        }))
    }

    async fn subscribe(
        &self,
        req: Request<Subscription>,
    ) -> Result<Response<PresenceReply>, Status> {
        let s = req.into_inner();
        let (Some(publisher), Some(sub)) = (s.publisher, s.subscriber) else {
            return Err(Status::invalid_argument(
                "publisher and subscriber required",
            ));
        };
        self.check_owner(&publisher)?;
        let a = self.0.actor(&publisher).await.map_err(to_status)?;
        let version = call(
            &a,
            |r| PresenceMsg::Subscribe(Box::new(sub), s.subscribe, r),
            self.0.call_timeout,
        )
        .await
        .map_err(to_status)?;
        Ok(Response::new(PresenceReply {
            version,
            delivered: 0,
        }))
    }

    async fn fanout(
        &self,
        req: Request<PresenceFanout>,
    ) -> Result<Response<PresenceReply>, Status> {
        let batch = req.into_inner();
        let span = tracing::info_span!("presence.fanout", subscribers = batch.subscribers.len());
        crate::trace::set_parent(&span, batch.trace_context.as_ref());
        let delivered = self.0.deliver_local(batch).instrument(span).await;
        Ok(Response::new(PresenceReply {
            version: 0,
            delivered: delivered as u64,
        }))
    }
}
