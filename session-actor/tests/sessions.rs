//! Session semantics, each scenario run twice: on the in-memory store and on a real
//! `redis-server` started for the test.

use anyhow::{Context, Result, bail, ensure};
use async_trait::async_trait;
use fedrelay_proto::{Address, Body, Envelope, v1};
use session_actor::metadata::NoMetadata;
use session_actor::store::{
    AckUpdate, AppendOutcome, AppendRequest, Claimed, MemoryStore, RedisStore, RedisStoreConfig,
};
use session_actor::{
    DeliveryError, Outbound, Ownership, SessionConfig, SessionDeps, SessionError, SessionId,
    SessionStore, StoreError, SupervisorHandle,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use test_support::{RedisServer, wait_for};

const WAIT: Duration = Duration::from_secs(10);

// === test outbound ===

/// What a recipient's edge does with a delivery call.
type Behaviour = Box<dyn Fn(&Address, &[Arc<Envelope>]) -> Result<(), DeliveryError> + Send + Sync>;

/// Records every envelope delivered, per recipient, and answers with a native id
/// `"<platform>-<relay id>"`, like a platform assigning its own ids.
struct Recorder {
    delivered: Mutex<HashMap<String, Vec<Envelope>>>,
    calls: AtomicU32,
    behaviour: Behaviour,
}

impl Recorder {
    fn new(behaviour: Behaviour) -> Arc<Self> {
        Arc::new(Self {
            delivered: Mutex::default(),
            calls: AtomicU32::new(0),
            behaviour,
        })
    }

    fn ok() -> Arc<Self> {
        Self::new(Box::new(|_, _| Ok(())))
    }

    fn to(&self, user: &str) -> Vec<Envelope> {
        self.delivered
            .lock()
            .map(|m| m.get(user).cloned().unwrap_or_default())
            .unwrap_or_default()
    }

    async fn wait_count(&self, user: &str, n: usize) -> Result<Vec<Envelope>> {
        wait_for(&format!("{n} deliveries to {user}"), WAIT, || async {
            let got = self.to(user);
            (got.len() >= n).then_some(got)
        })
        .await
    }
}

#[async_trait]
impl Outbound for Recorder {
    async fn deliver(
        &self,
        recipient: &Address,
        batch: &[Arc<Envelope>],
    ) -> Result<Vec<Option<String>>, DeliveryError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        (self.behaviour)(recipient, batch)?;
        let mut m = self
            .delivered
            .lock()
            .map_err(|_| DeliveryError::permanent("poisoned", ""))?;
        let list = m.entry(recipient.user.clone()).or_default();
        for e in batch {
            list.push((**e).clone());
        }
        Ok(batch
            .iter()
            .map(|e| Some(format!("{}-{}", recipient.platform, e.relay_msg_id)))
            .collect())
    }
}

// === helpers ===

fn alice() -> Address {
    Address::new("teams", "contoso.example", "alice")
}
fn bob() -> Address {
    Address::new("xmpp", "partner.example", "bob")
}

fn envelope(from: &Address, to: &Address, native: &str, body: Body) -> Envelope {
    Envelope {
        session_id: SessionId::one_to_one(from, to).0.to_vec(),
        origin: Some(v1::Origin {
            platform: from.platform.clone(),
            native_id: native.to_string(),
        }),
        sender: Some(from.clone()),
        recipients: vec![to.clone()],
        body: Some(body),
        ..Default::default()
    }
}

fn text(s: &str) -> Body {
    Body::Text(v1::Text {
        plain: s.to_string(),
        rich: vec![],
    })
}

/// An edit naming its target by the sender platform's own id.
fn edit_of(native: &str, new_text: &str) -> Body {
    Body::Edit(v1::Edit {
        target: Some(v1::MessageRef {
            relay_msg_id: String::new(),
            native_id: native.into(),
        }),
        new_body: Some(v1::Text {
            plain: new_text.into(),
            rich: vec![],
        }),
    })
}

fn plain(e: &Envelope) -> Option<&str> {
    match e.body.as_ref()? {
        Body::Text(t) => Some(&t.plain),
        _ => None,
    }
}

fn fast_config() -> SessionConfig {
    SessionConfig {
        retry_base: Duration::from_millis(5),
        retry_max: Duration::from_millis(50),
        ack_flush_interval: Duration::from_millis(5),
        ..SessionConfig::default()
    }
}

async fn start(
    store: Arc<dyn SessionStore>,
    out: Arc<Recorder>,
    config: SessionConfig,
) -> Result<SupervisorHandle> {
    let deps = SessionDeps {
        store,
        outbound: out,
        metadata: Arc::new(NoMetadata),
        config: Arc::new(config),
    };
    Ok(SupervisorHandle::start(deps).await?.0)
}

/// The two stores every scenario runs on. The Redis server lives as long as the store.
enum Backend {
    Memory,
    Redis,
}

struct Stores {
    store: Arc<dyn SessionStore>,
    _redis: Option<RedisServer>,
}

fn stores(b: Backend) -> Result<Stores> {
    Ok(match b {
        Backend::Memory => Stores {
            store: Arc::new(MemoryStore::new()),
            _redis: None,
        },
        Backend::Redis => {
            let redis = RedisServer::start()?;
            let store = RedisStore::new(&RedisStoreConfig::new(redis.url()))?;
            Stores {
                store: Arc::new(store),
                _redis: Some(redis),
            }
        }
    })
}

macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(#[tokio::test] async fn $name() -> anyhow::Result<()> { super::$name(super::Backend::Memory).await })*
        }
        mod redis {
            $(#[tokio::test] async fn $name() -> anyhow::Result<()> { super::$name(super::Backend::Redis).await })*
        }
    };
}

on_both_stores!(
    order_and_dedup,
    edits_deletes_and_reactions_land_on_the_right_message,
    failed_deliveries_are_retried_then_reported,
    unknown_targets_are_refused,
    idle_sessions_hibernate_and_revive,
    a_crashed_session_restarts_with_no_loss_and_no_duplicate,
    an_ambiguous_store_error_still_delivers_without_new_traffic,
    a_recipient_far_behind_pushes_back_on_senders,
    relay_side_failures_do_not_use_up_the_recipients_attempts,
    a_delivery_finishing_after_a_reload_keeps_its_native_id,
    store_conformance,
    a_moved_session_is_handed_off_and_resumed_by_its_new_owner,
    a_stale_owner_cannot_append_after_another_claims,
);

// === scenarios ===

async fn store_conformance(b: Backend) -> Result<()> {
    let s = stores(b)?;
    session_actor::store::conformance::run(s.store.as_ref()).await?;
    Ok(())
}

async fn order_and_dedup(b: Backend) -> Result<()> {
    let s = stores(b)?;
    let out = Recorder::ok();
    let sup = start(s.store.clone(), out.clone(), fast_config()).await?;
    let mut firsts = Vec::new();
    for i in 0..40 {
        let acc = sup
            .route(envelope(
                &alice(),
                &bob(),
                &format!("m{i}"),
                text(&format!("hello {i}")),
            ))
            .await?;
        ensure!(
            !acc.duplicate && acc.seq == i + 1,
            "seq {} for message {i}",
            acc.seq
        );
        firsts.push(acc);
        if i % 5 == 0 {
            // The platform sends the same event again: same ids back, nothing new journaled.
            let again = sup
                .route(envelope(
                    &alice(),
                    &bob(),
                    &format!("m{i}"),
                    text(&format!("hello {i}")),
                ))
                .await?;
            ensure!(again.duplicate, "resend not detected");
            ensure!(again.relay_msg_id == firsts[i as usize].relay_msg_id && again.seq == i + 1);
        }
    }
    let got = out.wait_count("bob", 40).await?;
    let texts: Vec<String> = got.iter().filter_map(plain).map(String::from).collect();
    let want: Vec<String> = (0..40).map(|i| format!("hello {i}")).collect();
    ensure!(texts == want, "bob saw {texts:?}");
    ensure!(got.windows(2).all(|w| w[0].seq < w[1].seq), "out of order");
    // Nothing more arrives: each message exactly once.
    let settled = sup.drain().await?;
    ensure!(settled == 0, "{settled} deliveries still owed");
    ensure!(out.to("bob").len() == 40, "duplicates delivered");
    Ok(())
}

async fn edits_deletes_and_reactions_land_on_the_right_message(b: Backend) -> Result<()> {
    let s = stores(b)?;
    let out = Recorder::ok();
    let sup = start(s.store.clone(), out.clone(), fast_config()).await?;
    let first = sup
        .route(envelope(&alice(), &bob(), "t-1", text("first")))
        .await?;
    let second = sup
        .route(envelope(&alice(), &bob(), "t-2", text("second")))
        .await?;
    out.wait_count("bob", 2).await?;

    // Alice edits her first message, naming it by her platform's id.
    let edit = edit_of("t-1", "first (edited)");
    sup.route(envelope(&alice(), &bob(), "t-3", edit)).await?;
    // Bob reacts to the second, naming it by the id *his* platform gave it on delivery.
    let reaction = Body::Reaction(v1::Reaction {
        target: Some(v1::MessageRef {
            relay_msg_id: String::new(),
            native_id: format!("xmpp-{}", second.relay_msg_id),
        }),
        emoji: "👍".into(),
        added: true,
    });
    sup.route(envelope(&bob(), &alice(), "x-1", reaction))
        .await?;
    // Alice deletes the second by relay id.
    let delete = Body::Delete(v1::Delete {
        target: Some(v1::MessageRef {
            relay_msg_id: second.relay_msg_id.clone(),
            native_id: String::new(),
        }),
    });
    sup.route(envelope(&alice(), &bob(), "t-4", delete)).await?;

    let to_bob = out.wait_count("bob", 4).await?;
    let to_alice = out.wait_count("alice", 1).await?;
    let target = |e: &Envelope| e.body.as_ref().and_then(Body::target).cloned();

    let t = target(&to_bob[2]).context("edit has a target")?;
    ensure!(
        t.relay_msg_id == first.relay_msg_id,
        "edit names the wrong message"
    );
    ensure!(
        t.native_id == format!("xmpp-{}", first.relay_msg_id),
        "edit lacks bob's native id"
    );

    let t = target(&to_alice[0]).context("reaction has a target")?;
    ensure!(
        t.relay_msg_id == second.relay_msg_id,
        "reaction names the wrong message"
    );
    ensure!(
        t.native_id == "t-2",
        "reaction should name alice's own id, got {}",
        t.native_id
    );

    // Bob may react to alice's message, but not edit or delete it.
    let hijack = Body::Delete(v1::Delete {
        target: Some(v1::MessageRef {
            relay_msg_id: first.relay_msg_id.clone(),
            native_id: String::new(),
        }),
    });
    let r = sup.route(envelope(&bob(), &alice(), "x-2", hijack)).await;
    ensure!(
        matches!(r, Err(SessionError::NotAllowed(_))),
        "bob deleted alice's message: {r:?}"
    );
    let ghost = Body::Reaction(v1::Reaction {
        target: Some(v1::MessageRef {
            relay_msg_id: "no-such-message".into(),
            native_id: String::new(),
        }),
        emoji: "x".into(),
        added: true,
    });
    let r = sup.route(envelope(&bob(), &alice(), "x-3", ghost)).await;
    ensure!(matches!(r, Err(SessionError::UnknownTarget)), "got {r:?}");

    let t = target(&to_bob[3]).context("delete has a target")?;
    ensure!(
        t.relay_msg_id == second.relay_msg_id
            && t.native_id == format!("xmpp-{}", second.relay_msg_id)
    );
    Ok(())
}

async fn failed_deliveries_are_retried_then_reported(b: Backend) -> Result<()> {
    let s = stores(b)?;
    // bob's edge fails its first three calls, then works; carol's always refuses.
    let fails = Arc::new(AtomicU32::new(3));
    let f = fails.clone();
    let out = Recorder::new(Box::new(move |to, _| {
        if to.user == "carol" {
            return Err(DeliveryError::permanent("unknown_user", "no such user"));
        }
        if to.user == "bob"
            && f.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            return Err(DeliveryError::retryable("timeout", "edge timed out"));
        }
        Ok(())
    }));
    let sup = start(s.store.clone(), out.clone(), fast_config()).await?;
    sup.route(envelope(&alice(), &bob(), "r-1", text("eventually")))
        .await?;
    let got = out.wait_count("bob", 1).await?;
    ensure!(plain(&got[0]) == Some("eventually"));
    ensure!(fails.load(Ordering::SeqCst) == 0, "not retried");

    let carol = Address::new("xmpp", "partner.example", "carol");
    let lost = sup
        .route(envelope(&alice(), &carol, "r-2", text("never")))
        .await?;
    let notice = out.wait_count("alice", 1).await?;
    match notice[0].body.as_ref() {
        Some(Body::Error(e)) => {
            ensure!(e.code == "undeliverable" && e.detail == "unknown_user");
            ensure!(
                e.about.as_ref().map(|a| a.relay_msg_id.as_str())
                    == Some(lost.relay_msg_id.as_str())
            );
        }
        other => bail!("alice got {other:?} instead of an error"),
    }
    ensure!(out.to("carol").is_empty());
    ensure!(out.to("bob").len() == 1, "bob got duplicates");
    Ok(())
}

async fn unknown_targets_are_refused(b: Backend) -> Result<()> {
    let s = stores(b)?;
    let out = Recorder::ok();
    let sup = start(s.store.clone(), out.clone(), fast_config()).await?;
    let del = Body::Delete(v1::Delete {
        target: Some(v1::MessageRef {
            relay_msg_id: String::new(),
            native_id: "never-sent".into(),
        }),
    });
    let r = sup.route(envelope(&alice(), &bob(), "d-1", del)).await;
    ensure!(matches!(r, Err(SessionError::UnknownTarget)), "got {r:?}");
    // Nothing was journaled: the next message is seq 1.
    let acc = sup
        .route(envelope(&alice(), &bob(), "d-2", text("hi")))
        .await?;
    ensure!(acc.seq == 1);
    Ok(())
}

async fn idle_sessions_hibernate_and_revive(b: Backend) -> Result<()> {
    let s = stores(b)?;
    let out = Recorder::ok();
    let cfg = SessionConfig {
        hibernate_after: Duration::from_millis(50),
        ..fast_config()
    };
    let sup = start(s.store.clone(), out.clone(), cfg).await?;
    let a = sup
        .route(envelope(&alice(), &bob(), "h-1", text("before")))
        .await?;
    out.wait_count("bob", 1).await?;
    let stats = wait_for("the session to hibernate", WAIT, || async {
        let st = sup.stats().await.ok()?;
        (st.hibernated_total >= 1 && st.active == 0).then_some(st)
    })
    .await?;
    ensure!(stats.restarts_total == 0);
    // Revived from the store: the seq continues, the dedup set is intact.
    let again = sup
        .route(envelope(&alice(), &bob(), "h-1", text("before")))
        .await?;
    ensure!(again.duplicate && again.relay_msg_id == a.relay_msg_id);
    let b2 = sup
        .route(envelope(&alice(), &bob(), "h-2", text("after")))
        .await?;
    ensure!(b2.seq == 2 && !b2.duplicate);
    let got = out.wait_count("bob", 2).await?;
    ensure!(plain(&got[1]) == Some("after"));
    ensure!(sup.stats().await?.active == 1);
    Ok(())
}

/// A store that misbehaves on chosen appends: panics inside the session actor (like a bug
/// would), or reports a timeout although the append went through (like a lost answer).
struct PanickingStore {
    inner: Arc<dyn SessionStore>,
    appends: AtomicU32,
    panic_on: Vec<u32>,
    lose_answer_on: Vec<u32>,
}

#[async_trait]
impl SessionStore for PanickingStore {
    async fn claim(&self, id: SessionId) -> Result<Claimed, StoreError> {
        self.inner.claim(id).await
    }
    async fn append(
        &self,
        id: SessionId,
        epoch: u64,
        req: AppendRequest<'_>,
    ) -> Result<AppendOutcome, StoreError> {
        let n = self.appends.fetch_add(1, Ordering::SeqCst) + 1;
        let outcome = self.inner.append(id, epoch, req).await;
        // Panic *after* the append reached the store: the worst case, an append the origin
        // never heard about.
        if self.panic_on.contains(&n) {
            panic!("injected session failure on append {n}");
        }
        if self.lose_answer_on.contains(&n) {
            return Err(StoreError::Unavailable("injected: answer lost".into()));
        }
        outcome
    }
    async fn ack(&self, id: SessionId, epoch: u64, u: &AckUpdate) -> Result<(), StoreError> {
        self.inner.ack(id, epoch, u).await
    }
    async fn resolve_native(
        &self,
        id: SessionId,
        p: &str,
        n: &str,
    ) -> Result<Option<String>, StoreError> {
        self.inner.resolve_native(id, p, n).await
    }
    async fn native_for(
        &self,
        id: SessionId,
        r: &str,
        p: &str,
    ) -> Result<Option<String>, StoreError> {
        self.inner.native_for(id, r, p).await
    }
    async fn sender_of(&self, id: SessionId, r: &str) -> Result<Option<String>, StoreError> {
        self.inner.sender_of(id, r).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
    async fn mark_active(&self, id: SessionId) -> Result<(), StoreError> {
        self.inner.mark_active(id).await
    }
    async fn mark_idle(&self, id: SessionId) -> Result<(), StoreError> {
        self.inner.mark_idle(id).await
    }
    async fn active_sessions(&self) -> Result<Vec<SessionId>, StoreError> {
        self.inner.active_sessions().await
    }
}

async fn a_crashed_session_restarts_with_no_loss_and_no_duplicate(b: Backend) -> Result<()> {
    let s = stores(b)?;
    let store = Arc::new(PanickingStore {
        inner: s.store.clone(),
        appends: AtomicU32::new(0),
        panic_on: vec![7, 15],
        lose_answer_on: vec![],
    });
    let out = Recorder::ok();
    let sup = start(store, out.clone(), fast_config()).await?;
    let mut acked = Vec::new();
    for i in 0..20 {
        // Like an origin platform: retry until acknowledged.
        let acc = wait_for("an ack", WAIT, || {
            let sup = sup.clone();
            async move {
                sup.route(envelope(
                    &alice(),
                    &bob(),
                    &format!("c{i}"),
                    text(&format!("msg {i}")),
                ))
                .await
                .ok()
            }
        })
        .await?;
        acked.push(acc);
    }
    let st = sup.stats().await?;
    ensure!(
        st.restarts_total == 2,
        "expected two restarts, saw {}",
        st.restarts_total
    );
    // The sends that crashed were journaled before the panic; their retries were dedup hits.
    ensure!(acked.iter().map(|a| a.seq).collect::<Vec<_>>() == (1..=20).collect::<Vec<u64>>());
    let got = out.wait_count("bob", 20).await?;
    ensure!(sup.drain().await? == 0);
    let got_all = out.to("bob");
    let texts: Vec<&str> = got_all.iter().filter_map(plain).collect();
    let want: Vec<String> = (0..20).map(|i| format!("msg {i}")).collect();
    ensure!(texts == want, "bob saw {texts:?}");
    ensure!(got.len() == 20);
    Ok(())
}

async fn an_ambiguous_store_error_still_delivers_without_new_traffic(b: Backend) -> Result<()> {
    let s = stores(b)?;
    let store = Arc::new(PanickingStore {
        inner: s.store.clone(),
        appends: AtomicU32::new(0),
        panic_on: vec![],
        lose_answer_on: vec![2],
    });
    let out = Recorder::ok();
    let sup = start(store, out.clone(), fast_config()).await?;
    sup.route(envelope(&alice(), &bob(), "a-1", text("one")))
        .await?;
    // The second append reaches the store but its answer is lost: the origin hears an error.
    let r = sup
        .route(envelope(&alice(), &bob(), "a-2", text("two")))
        .await;
    ensure!(matches!(r, Err(SessionError::Store(_))), "got {r:?}");
    // No retry, no new message: the journaled message is still delivered, once.
    let got = out.wait_count("bob", 2).await?;
    ensure!(plain(&got[1]) == Some("two"));
    ensure!(sup.drain().await? == 0);
    ensure!(out.to("bob").len() == 2, "duplicates delivered");
    Ok(())
}

async fn a_recipient_far_behind_pushes_back_on_senders(b: Backend) -> Result<()> {
    let s = stores(b)?;
    let down = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let d = down.clone();
    let out = Recorder::new(Box::new(move |_, _| {
        if d.load(Ordering::SeqCst) {
            Err(DeliveryError::retryable("timeout", "down"))
        } else {
            Ok(())
        }
    }));
    let cfg = SessionConfig {
        max_backlog: 3,
        max_attempts: 1_000,
        ..fast_config()
    };
    let sup = start(s.store.clone(), out.clone(), cfg).await?;
    for i in 0..3 {
        sup.route(envelope(
            &alice(),
            &bob(),
            &format!("b{i}"),
            text(&format!("m{i}")),
        ))
        .await?;
    }
    let r = sup
        .route(envelope(&alice(), &bob(), "b3", text("m3")))
        .await;
    ensure!(
        matches!(&r, Err(e) if e.is_retryable()),
        "not pushed back: {r:?}"
    );
    // Messages to others still flow.
    let carol = Address::new("xmpp", "partner.example", "carol");
    sup.route(envelope(&alice(), &carol, "c0", text("to carol")))
        .await?;
    down.store(false, Ordering::SeqCst);
    out.wait_count("bob", 3).await?;
    // Caught up: the refused message is taken now (the origin retried).
    sup.route(envelope(&alice(), &bob(), "b3", text("m3")))
        .await?;
    let got = out.wait_count("bob", 4).await?;
    let texts: Vec<&str> = got.iter().filter_map(plain).collect();
    ensure!(texts == ["m0", "m1", "m2", "m3"], "{texts:?}");
    Ok(())
}

async fn relay_side_failures_do_not_use_up_the_recipients_attempts(b: Backend) -> Result<()> {
    let s = stores(b)?;
    let stalls = Arc::new(AtomicU32::new(12));
    let st = stalls.clone();
    let out = Recorder::new(Box::new(move |_, _| {
        if st
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(DeliveryError::internal(
                "store_unavailable",
                "relay store down",
            ));
        }
        Ok(())
    }));
    let cfg = SessionConfig {
        max_attempts: 3,
        ..fast_config()
    };
    let sup = start(s.store.clone(), out.clone(), cfg).await?;
    sup.route(envelope(&alice(), &bob(), "s-1", text("patience")))
        .await?;
    let got = out.wait_count("bob", 1).await?;
    ensure!(plain(&got[0]) == Some("patience"));
    ensure!(stalls.load(Ordering::SeqCst) == 0);
    // Twelve relay-side failures against a budget of three, and no error notice to alice.
    ensure!(out.to("alice").is_empty(), "alice was told it failed");
    Ok(())
}

#[tokio::test]
async fn redis_outbox_dedups_and_reports_what_retention_dropped() -> Result<()> {
    use session_actor::store::{Outbox, OutboxItem, RedisOutbox};
    let redis = RedisServer::start()?;
    // Keep 10 events.
    let outbox = RedisOutbox::new(&RedisStoreConfig::new(redis.url()), 10)?;
    let item = |n: u64| OutboxItem {
        session_id: SessionId([7; 16]),
        recipient: "bob".into(),
        seq: n,
        payload: format!("e{n}").into_bytes().into(),
    };
    outbox.push("d.example", &[item(1), item(2)]).await?;
    let first = outbox.read_after("d.example", None, 10).await?;
    ensure!(first.len() == 2);
    ensure!(!outbox.dropped_after("d.example", &first[0].id).await?);
    ensure!(!outbox.dropped_after("empty.example", "0-0").await?);
    // A redelivered (session, recipient, seq) is dropped.
    outbox.push("d.example", &[item(2)]).await?;
    ensure!(
        outbox
            .read_after("d.example", Some(&first[0].id), 10)
            .await?
            .len()
            == 1
    );
    for chunk in (3..=400).collect::<Vec<u64>>().chunks(50) {
        let items: Vec<OutboxItem> = chunk.iter().map(|n| item(*n)).collect();
        outbox.push("d.example", &items).await?;
    }
    ensure!(
        outbox.dropped_after("d.example", &first[0].id).await?,
        "trimming not reported"
    );
    let kept = outbox.read_after("d.example", None, 100).await?;
    ensure!(kept.len() == 10, "{} kept", kept.len());
    ensure!(
        !outbox.dropped_after("d.example", &kept[0].id).await?,
        "the oldest kept is no gap"
    );
    let tail = outbox.last_id("d.example").await?;
    ensure!(!outbox.dropped_after("d.example", &tail).await?);
    Ok(())
}

/// Holds its first delivery until released, then answers like `Recorder`.
struct Gated {
    inner: Arc<Recorder>,
    gate: tokio::sync::Notify,
    held: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl Outbound for Gated {
    async fn deliver(
        &self,
        recipient: &Address,
        batch: &[Arc<Envelope>],
    ) -> Result<Vec<Option<String>>, DeliveryError> {
        if !self.held.swap(true, Ordering::SeqCst) {
            self.gate.notified().await;
        }
        self.inner.deliver(recipient, batch).await
    }
}

async fn a_delivery_finishing_after_a_reload_keeps_its_native_id(b: Backend) -> Result<()> {
    let s = stores(b)?;
    let store = Arc::new(PanickingStore {
        inner: s.store.clone(),
        appends: AtomicU32::new(0),
        panic_on: vec![],
        lose_answer_on: vec![2],
    });
    let rec = Recorder::ok();
    let gated = Arc::new(Gated {
        inner: rec.clone(),
        gate: tokio::sync::Notify::new(),
        held: std::sync::atomic::AtomicBool::new(false),
    });
    let deps = SessionDeps {
        store,
        outbound: gated.clone(),
        metadata: Arc::new(NoMetadata),
        config: Arc::new(fast_config()),
    };
    let sup = SupervisorHandle::start(deps).await?.0;
    let first = sup
        .route(envelope(&alice(), &bob(), "t-1", text("one")))
        .await?;
    wait_for("the first delivery to be held", WAIT, || async {
        gated.held.load(Ordering::SeqCst).then_some(())
    })
    .await?;
    // The second append's answer is lost: the session drops its view and reloads while the
    // first delivery is still with the edge.
    let _ = sup
        .route(envelope(&alice(), &bob(), "t-2", text("two")))
        .await;
    sup.route(envelope(&alice(), &bob(), "t-3", text("three")))
        .await?;
    gated.gate.notify_one();
    rec.wait_count("bob", 3).await?;
    // Alice edits her first message: bob's copy is named by the id bob's platform gave it.
    let edit = edit_of("t-1", "one!");
    sup.route(envelope(&alice(), &bob(), "t-4", edit)).await?;
    let got = rec.wait_count("bob", 4).await?;
    let target = got[3]
        .body
        .as_ref()
        .and_then(Body::target)
        .context("edit target")?;
    ensure!(target.relay_msg_id == first.relay_msg_id);
    ensure!(
        target.native_id == format!("xmpp-{}", first.relay_msg_id),
        "bob's id for the message was lost: {:?}",
        target.native_id
    );
    ensure!(rec.to("bob").len() == 4, "duplicates delivered");
    Ok(())
}

/// Ownership a test flips, as a membership change would.
struct Flag(Arc<AtomicBool>);

impl Ownership for Flag {
    fn owns(&self, _id: &SessionId) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

async fn start_owning(
    store: Arc<dyn SessionStore>,
    out: Arc<Recorder>,
    owns: Arc<AtomicBool>,
) -> Result<SupervisorHandle> {
    let deps = SessionDeps {
        store,
        outbound: out,
        metadata: Arc::new(NoMetadata),
        config: Arc::new(fast_config()),
    };
    Ok(SupervisorHandle::start_owning(deps, Arc::new(Flag(owns)))
        .await?
        .0)
}

async fn a_moved_session_is_handed_off_and_resumed_by_its_new_owner(b: Backend) -> Result<()> {
    let s = stores(b)?;
    // The old owner's recipient edge is down, so it owes every delivery when ownership moves.
    let old_out = Recorder::new(Box::new(|_, _| {
        Err(DeliveryError::retryable("down", "edge unreachable"))
    }));
    let new_out = Recorder::ok();
    let (old_owns, new_owns) = (
        Arc::new(AtomicBool::new(true)),
        Arc::new(AtomicBool::new(false)),
    );
    let old = start_owning(s.store.clone(), old_out.clone(), old_owns.clone()).await?;
    let new = start_owning(s.store.clone(), new_out.clone(), new_owns.clone()).await?;
    for i in 1..=3 {
        old.route(envelope(
            &alice(),
            &bob(),
            &format!("m-{i}"),
            text(&format!("{i}")),
        ))
        .await?;
    }
    let refused = new
        .route(envelope(&alice(), &bob(), "m-x", text("x")))
        .await;
    ensure!(
        matches!(refused, Err(SessionError::NotOwner(_))),
        "a node that does not own a session refuses it: {refused:?}"
    );

    old_owns.store(false, Ordering::SeqCst);
    new_owns.store(true, Ordering::SeqCst);
    old.rebalance();
    wait_for("the old owner to hand off", WAIT, || async {
        let st = old.stats().await.ok()?;
        (st.active == 0 && st.handoffs_total == 1).then_some(())
    })
    .await?;
    let moved = old
        .route(envelope(&alice(), &bob(), "m-4", text("4")))
        .await;
    ensure!(matches!(moved, Err(SessionError::NotOwner(_))), "{moved:?}");

    // The new owner finds the session in the index and delivers what was owed, with no new
    // message to wake it.
    let owed = s.store.active_sessions().await?;
    ensure!(owed.len() == 1, "one session owes deliveries: {owed:?}");
    new.ensure(owed);
    let got = new_out.wait_count("bob", 3).await?;
    let texts: Vec<_> = got.iter().filter_map(plain).collect();
    ensure!(
        texts == ["1", "2", "3"],
        "owed messages in order: {texts:?}"
    );
    let next = new
        .route(envelope(&alice(), &bob(), "m-4", text("4")))
        .await?;
    ensure!(next.seq == 4 && !next.duplicate);
    let dup = new
        .route(envelope(&alice(), &bob(), "m-2", text("2")))
        .await?;
    ensure!(dup.duplicate && dup.seq == 2, "dedup survives the handoff");
    new_out.wait_count("bob", 4).await?;
    ensure!(new_out.to("bob").len() == 4, "nothing delivered twice");
    Ok(())
}

async fn a_stale_owner_cannot_append_after_another_claims(b: Backend) -> Result<()> {
    let s = stores(b)?;
    let stale_out = Recorder::ok();
    let stale = start(s.store.clone(), stale_out.clone(), fast_config()).await?;
    stale
        .route(envelope(&alice(), &bob(), "s-1", text("1")))
        .await?;
    // Another node takes the session over (the stale one was paused past its lease).
    let fresh_out = Recorder::ok();
    let fresh = start(s.store.clone(), fresh_out.clone(), fast_config()).await?;
    let a2 = fresh
        .route(envelope(&alice(), &bob(), "s-2", text("2")))
        .await?;
    ensure!(a2.seq == 2);
    let r = stale
        .route(envelope(&alice(), &bob(), "s-3", text("3")))
        .await;
    ensure!(
        matches!(r, Err(SessionError::Store(StoreError::Fenced { .. }))),
        "the stale owner's append is refused: {r:?}"
    );
    // It gave the session up: nothing of it runs any more.
    wait_for("the stale owner to give the session up", WAIT, || async {
        (stale.stats().await.ok()?.active == 0).then_some(())
    })
    .await?;
    let a3 = fresh
        .route(envelope(&alice(), &bob(), "s-3", text("3")))
        .await?;
    ensure!(a3.seq == 3 && !a3.duplicate, "no double append: {a3:?}");
    Ok(())
}

#[tokio::test]
async fn a_push_on_one_node_wakes_the_streams_of_another() -> Result<()> {
    use session_actor::store::{Outbox, OutboxItem, RedisOutbox};
    let redis = RedisServer::start()?;
    let cfg = RedisStoreConfig::new(redis.url());
    // Two nodes' outboxes on one Redis.
    let (here, there) = (RedisOutbox::new(&cfg, 100)?, RedisOutbox::new(&cfg, 100)?);
    let item = |n: u64| OutboxItem {
        session_id: SessionId([9; 16]),
        recipient: "bob".into(),
        seq: n,
        payload: format!("e{n}").into_bytes().into(),
    };
    let signal = there.notifier("D.example");
    // Wait until the other node listens (its subscription is asynchronous): each push
    // while it does not yet is simply not seen; the first one seen ends the wait.
    let mut n = 0;
    wait_for("a push here to wake a stream there", WAIT, || {
        n += 1;
        let (signal, here, item) = (signal.clone(), &here, item(n));
        async move {
            let woken = signal.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            here.push("d.example", &[item]).await.ok()?;
            tokio::time::timeout(Duration::from_secs(1), woken)
                .await
                .ok()
        }
    })
    .await?;
    // A wake-up of an earlier push may still be on its way (its wait ran out on a busy
    // machine): let them all arrive, until none has come for a while.
    wait_for("the earlier pushes' wake-ups to have arrived", WAIT, || {
        let signal = signal.clone();
        async move {
            let woken = signal.notified();
            tokio::time::timeout(Duration::from_millis(300), woken)
                .await
                .is_err()
                .then_some(())
        }
    })
    .await?;
    // A push that adds nothing (a repeat) wakes nobody.
    let woken = signal.notified();
    tokio::pin!(woken);
    woken.as_mut().enable();
    here.push("d.example", &[item(n)]).await?;
    ensure!(
        tokio::time::timeout(Duration::from_millis(300), woken)
            .await
            .is_err(),
        "a repeat woke the stream"
    );
    Ok(())
}
