//! The node's session supervisor: routes envelopes to session actors, starting them on first
//! use, restarting crashed ones with backoff, and hibernating idle ones.
//!
//! ractor's default supervisor reaction to a failed child is to stop itself; this one never
//! does. A crashed session's in-flight callers get an error (their origin retries, and dedup
//! makes that safe); the session is restarted from the store after a backoff so its pending
//! deliveries resume even if no new message arrives.
//!
//! Hibernation is a handshake so no message is lost in a stopping actor's mailbox: the
//! session asks, the supervisor holds new envelopes for it and tells it to stop, the session
//! stops only if still idle (otherwise it cancels), and once it has terminated the held
//! envelopes go to a fresh actor.

use crate::session::{
    AcceptReply, Accepted, Lanes, SessionActor, SessionArgs, SessionDeps, SessionMsg,
};
use crate::{SessionError, SessionId};
use fedrelay_proto::Envelope;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, error, warn};

/// Most envelopes held for one session while it stops or restarts; more are refused with a
/// retryable error rather than buffered without bound.
const MAX_HELD: usize = 10_000;

pub enum SupervisorMsg {
    Route(Box<Envelope>, AcceptReply),
    RequestHibernate(SessionId, ActorId),
    HibernateCancelled(SessionId),
    Restart(SessionId),
    /// Stop taking envelopes; answer how many deliveries sessions still owe.
    Drain(RpcReplyPort<usize>),
    Stats(RpcReplyPort<SupervisorStats>),
    /// Ownership changed: hand off the sessions this node no longer owns.
    Rebalance,
    /// Start these sessions (owed deliveries to resume) if this node owns them.
    Ensure(Vec<SessionId>),
}

/// Which sessions this node owns; asked on every start and every rebalance.
pub trait Ownership: Send + Sync + 'static {
    fn owns(&self, id: &SessionId) -> bool;
}

/// A node that owns every session (single node, tests).
#[derive(Debug, Clone, Copy, Default)]
pub struct OwnsAll;

impl Ownership for OwnsAll {
    fn owns(&self, _id: &SessionId) -> bool {
        true
    }
}

/// Counts for health pages and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SupervisorStats {
    pub active: usize,
    pub hibernated_total: u64,
    pub restarts_total: u64,
    /// Sessions finishing their in-flight appends before another node takes them over.
    pub handoffs_in_flight: usize,
    pub handoffs_total: u64,
}

enum Slot {
    Running(ActorRef<SessionMsg>),
    Stopping {
        actor: ActorRef<SessionMsg>,
        held: Vec<(Box<Envelope>, AcceptReply)>,
    },
    Restarting {
        held: Vec<(Box<Envelope>, AcceptReply)>,
    },
    /// Told to hand off: finishing what is in its mailbox; new envelopes go elsewhere.
    HandingOff(ActorRef<SessionMsg>),
}

pub struct SessionSupervisor;

pub struct SupervisorState {
    deps: SessionDeps,
    ownership: Arc<dyn Ownership>,
    slots: HashMap<SessionId, Slot>,
    by_actor: HashMap<ActorId, SessionId>,
    /// Delivery lanes of every session not hibernated, surviving its actor's restarts.
    lanes: HashMap<SessionId, Arc<Lanes>>,
    /// Recent crash count and time per session, for the restart backoff.
    crashes: HashMap<SessionId, (u32, Instant)>,
    draining: bool,
    stats: SupervisorStats,
}

impl Actor for SessionSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = (SessionDeps, Arc<dyn Ownership>);

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        (deps, ownership): (SessionDeps, Arc<dyn Ownership>),
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(SupervisorState {
            deps,
            ownership,
            slots: HashMap::new(),
            by_actor: HashMap::new(),
            lanes: HashMap::new(),
            crashes: HashMap::new(),
            draining: false,
            stats: SupervisorStats::default(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Route(env, reply) => state.route(&myself, env, reply).await,
            SupervisorMsg::RequestHibernate(id, actor_id) => {
                if let Some(Slot::Running(actor)) = state.slots.get(&id)
                    && actor.get_id() == actor_id
                    && !state.draining
                {
                    let actor = actor.clone();
                    let _ = actor.cast(SessionMsg::Hibernate);
                    let held = Vec::new();
                    state.slots.insert(id, Slot::Stopping { actor, held });
                }
            }
            SupervisorMsg::HibernateCancelled(id) => match state.slots.remove(&id) {
                Some(Slot::Stopping { actor, held }) => {
                    for (env, reply) in held {
                        forward(&actor, env, reply);
                    }
                    state.slots.insert(id, Slot::Running(actor));
                }
                // It crashed (or was replaced) meanwhile: leave that slot as it is.
                Some(other) => {
                    state.slots.insert(id, other);
                }
                None => {}
            },
            SupervisorMsg::Restart(id) => {
                if let Some(Slot::Restarting { held }) = state.slots.remove(&id) {
                    if state.ownership.owns(&id) {
                        state.start(&myself, id, held).await;
                    } else {
                        refuse_moved(id, held);
                    }
                }
            }
            SupervisorMsg::Rebalance => state.rebalance(),
            SupervisorMsg::Ensure(ids) => {
                for id in ids {
                    if !state.draining
                        && !state.slots.contains_key(&id)
                        && state.ownership.owns(&id)
                    {
                        state.start(&myself, id, Vec::new()).await;
                    }
                }
            }
            SupervisorMsg::Drain(reply) => {
                state.draining = true;
                // Ask every session at once: each flushes its progress to the store.
                let mut restarting = 0;
                let mut asks = Vec::with_capacity(state.slots.len());
                for slot in state.slots.values() {
                    match slot {
                        Slot::Running(a) | Slot::Stopping { actor: a, .. } => {
                            asks.push(a.call(SessionMsg::Drain, Some(Duration::from_secs(5))));
                        }
                        Slot::Restarting { .. } | Slot::HandingOff(_) => restarting += 1,
                    }
                }
                let owed: usize = futures::future::join_all(asks)
                    .await
                    .into_iter()
                    .map(|r| match r {
                        Ok(ractor::rpc::CallResult::Success(n)) => n,
                        // No answer: count it as owing, so draining goes on.
                        _ => 1,
                    })
                    .sum();
                let _ = reply.send(owed + restarting);
            }
            SupervisorMsg::Stats(reply) => {
                let _ = reply.send(SupervisorStats {
                    active: state.slots.len(),
                    handoffs_in_flight: state
                        .slots
                        .values()
                        .filter(|s| matches!(s, Slot::HandingOff(_)))
                        .count(),
                    ..state.stats
                });
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                let Some(id) = state.by_actor.remove(&cell.get_id()) else {
                    return Ok(());
                };
                match state.slots.remove(&id) {
                    Some(Slot::Stopping { actor, held }) if actor.get_id() == cell.get_id() => {
                        state.stats.hibernated_total += 1;
                        // Everything it delivered is in the store now.
                        state.lanes.remove(&id);
                        state.crashes.remove(&id);
                        metrics::counter!("fedrelay_sessions_hibernated_total").increment(1);
                        debug!(session_id = %id, "session hibernated");
                        if !held.is_empty() {
                            state.start(&myself, id, held).await;
                        }
                    }
                    Some(Slot::HandingOff(actor)) if actor.get_id() == cell.get_id() => {
                        state.lanes.remove(&id);
                        state.crashes.remove(&id);
                        state.stats.handoffs_total += 1;
                        metrics::counter!("fedrelay_session_handoffs_total").increment(1);
                        debug!(session_id = %id, "session handed off");
                    }
                    Some(Slot::Running(actor)) if actor.get_id() == cell.get_id() => {
                        // Stopped on its own (fenced by a newer owner).
                        state.lanes.remove(&id);
                        warn!(session_id = %id, reason = reason.as_deref().unwrap_or(""), "session stopped");
                    }
                    Some(other) => {
                        state.slots.insert(id, other);
                    }
                    None => {}
                }
            }
            SupervisionEvent::ActorFailed(cell, err) => {
                let Some(id) = state.by_actor.remove(&cell.get_id()) else {
                    return Ok(());
                };
                state.stats.restarts_total += 1;
                metrics::counter!("fedrelay_session_restarts_total").increment(1);
                let held = match state.slots.remove(&id) {
                    Some(Slot::Stopping { held, .. }) | Some(Slot::Restarting { held }) => held,
                    Some(Slot::HandingOff(_)) => {
                        // It was leaving anyway; the new owner resumes from the store.
                        state.lanes.remove(&id);
                        metrics::gauge!("fedrelay_sessions_active").set(state.slots.len() as f64);
                        return Ok(());
                    }
                    _ => Vec::new(),
                };
                let crash = state.crashes.entry(id).or_insert((0, Instant::now()));
                if crash.1.elapsed() > Duration::from_secs(60) {
                    crash.0 = 0;
                }
                crash.0 += 1;
                crash.1 = Instant::now();
                let delay = restart_delay(crash.0);
                error!(session_id = %id, error = %err, restart_in_ms = delay.as_millis() as u64, "session crashed; restarting");
                state.slots.insert(id, Slot::Restarting { held });
                myself.send_after(delay, move || SupervisorMsg::Restart(id));
            }
            _ => {}
        }
        metrics::gauge!("fedrelay_sessions_active").set(state.slots.len() as f64);
        Ok(())
    }
}

/// 50 ms, doubling per recent crash, at most 10 s.
fn restart_delay(crashes: u32) -> Duration {
    let ms = 50u64.saturating_mul(1 << crashes.saturating_sub(1).min(8));
    Duration::from_millis(ms.min(10_000))
}

/// Answers held envelopes of a session another node owns now: the router sends them there.
fn refuse_moved(id: SessionId, held: Vec<(Box<Envelope>, AcceptReply)>) {
    for (_, reply) in held {
        let _ = reply.send(Err(SessionError::NotOwner(id.to_hex())));
    }
}

fn forward(actor: &ActorRef<SessionMsg>, env: Box<Envelope>, reply: AcceptReply) {
    if let Err(e) = actor.cast(SessionMsg::Inbound(env, reply)) {
        // The reply port went with the failed message; its caller sees a closed reply.
        debug!(error = %e, "session mailbox closed");
    }
}

// === impl SupervisorState ===

impl SupervisorState {
    async fn route(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        env: Box<Envelope>,
        reply: AcceptReply,
    ) {
        if self.draining {
            let _ = reply.send(Err(SessionError::Unavailable("node is draining".into())));
            return;
        }
        let Some(id) = SessionId::from_bytes(&env.session_id) else {
            let _ = reply.send(Err(SessionError::Invalid(
                "session id must be 16 bytes".into(),
            )));
            return;
        };
        match self.slots.get_mut(&id) {
            Some(Slot::Running(actor)) => forward(actor, env, reply),
            Some(Slot::HandingOff(_)) => {
                let _ = reply.send(Err(SessionError::NotOwner(id.to_hex())));
            }
            Some(Slot::Stopping { held, .. }) | Some(Slot::Restarting { held }) => {
                if held.len() >= MAX_HELD {
                    let _ = reply.send(Err(SessionError::Unavailable("session restarting".into())));
                } else {
                    held.push((env, reply));
                }
            }
            None if !self.ownership.owns(&id) => {
                let _ = reply.send(Err(SessionError::NotOwner(id.to_hex())));
            }
            None => self.start(myself, id, vec![(env, reply)]).await,
        }
    }

    /// Tells every session this node no longer owns to finish its in-flight appends, persist
    /// its progress and stop; envelopes for it are refused as moved from now on.
    fn rebalance(&mut self) {
        let moved: Vec<SessionId> = self
            .slots
            .keys()
            .filter(|id| !self.ownership.owns(id))
            .copied()
            .collect();
        for id in moved {
            match self.slots.remove(&id) {
                Some(Slot::Running(actor)) => {
                    let _ = actor.cast(SessionMsg::Handoff);
                    self.slots.insert(id, Slot::HandingOff(actor));
                }
                Some(Slot::Stopping { actor, held }) => {
                    // Hibernating: it stops anyway; what it was holding goes to the new owner.
                    refuse_moved(id, held);
                    let _ = actor.cast(SessionMsg::Handoff);
                    self.slots.insert(id, Slot::HandingOff(actor));
                }
                Some(Slot::Restarting { held }) => {
                    refuse_moved(id, held);
                    self.lanes.remove(&id);
                }
                Some(other) => {
                    self.slots.insert(id, other);
                }
                None => {}
            }
        }
    }

    async fn start(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        id: SessionId,
        held: Vec<(Box<Envelope>, AcceptReply)>,
    ) {
        let args = SessionArgs {
            id,
            deps: self.deps.clone(),
            supervisor: myself.clone(),
            lanes: self.lanes.entry(id).or_default().clone(),
        };
        match Actor::spawn_linked(None, SessionActor, args, myself.get_cell()).await {
            Ok((actor, _join)) => {
                self.by_actor.insert(actor.get_id(), id);
                let _ = actor.cast(SessionMsg::Resume);
                for (env, reply) in held {
                    forward(&actor, env, reply);
                }
                self.slots.insert(id, Slot::Running(actor));
            }
            Err(e) => {
                error!(session_id = %id, error = %e, "could not start session");
                for (_, reply) in held {
                    let _ = reply.send(Err(SessionError::Unavailable(
                        "session could not start".into(),
                    )));
                }
            }
        }
        metrics::gauge!("fedrelay_sessions_active").set(self.slots.len() as f64);
    }
}

/// A cloneable front door to the supervisor, for edges and the node.
#[derive(Clone)]
pub struct SupervisorHandle {
    actor: ActorRef<SupervisorMsg>,
    call_timeout: Duration,
}

impl SupervisorHandle {
    /// Starts a supervisor for this node's sessions.
    pub async fn start(
        deps: SessionDeps,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), SessionError> {
        Self::start_owning(deps, Arc::new(OwnsAll)).await
    }

    /// Starts a supervisor that hosts only the sessions `ownership` says this node owns.
    pub async fn start_owning(
        deps: SessionDeps,
        ownership: Arc<dyn Ownership>,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), SessionError> {
        let call_timeout = Duration::from_secs(10);
        let (actor, join) = Actor::spawn(None, SessionSupervisor, (deps, ownership))
            .await
            .map_err(|e| SessionError::Unavailable(format!("supervisor did not start: {e}")))?;
        Ok((
            Self {
                actor,
                call_timeout,
            },
            join,
        ))
    }

    /// Hands an envelope to its session and waits until it is journaled (or refused).
    pub async fn route(&self, env: Envelope) -> Result<Accepted, SessionError> {
        match self
            .actor
            .call(
                |reply| SupervisorMsg::Route(Box::new(env), reply),
                Some(self.call_timeout),
            )
            .await
        {
            Ok(ractor::rpc::CallResult::Success(r)) => r,
            Ok(ractor::rpc::CallResult::Timeout) => {
                Err(SessionError::Unavailable("session timed out".into()))
            }
            Ok(ractor::rpc::CallResult::SenderError) => Err(SessionError::Unavailable(
                "session stopped before answering".into(),
            )),
            Err(e) => Err(SessionError::Unavailable(format!(
                "supervisor unreachable: {e}"
            ))),
        }
    }

    /// Stops taking envelopes and reports how many deliveries are still owed.
    pub async fn drain(&self) -> Result<usize, SessionError> {
        match self
            .actor
            .call(SupervisorMsg::Drain, Some(Duration::from_secs(30)))
            .await
        {
            Ok(ractor::rpc::CallResult::Success(n)) => Ok(n),
            _ => Err(SessionError::Unavailable(
                "supervisor did not answer".into(),
            )),
        }
    }

    pub async fn stats(&self) -> Result<SupervisorStats, SessionError> {
        match self
            .actor
            .call(SupervisorMsg::Stats, Some(Duration::from_secs(5)))
            .await
        {
            Ok(ractor::rpc::CallResult::Success(s)) => Ok(s),
            _ => Err(SessionError::Unavailable(
                "supervisor did not answer".into(),
            )),
        }
    }

    /// Ownership changed: hands off the sessions this node no longer owns.
    pub fn rebalance(&self) {
        let _ = self.actor.cast(SupervisorMsg::Rebalance);
    }

    /// Starts the given sessions where this node owns them and they are not running, so
    /// deliveries they owe resume without waiting for a new message.
    pub fn ensure(&self, ids: Vec<SessionId>) {
        let _ = self.actor.cast(SupervisorMsg::Ensure(ids));
    }

    pub fn stop(&self) {
        self.actor.stop(None);
    }
}
