//! Checks every [`SessionStore`] implementation must pass; the unit tests run them on the
//! memory store and the integration tests on a real `redis-server`.

use super::{AckUpdate, AppendOutcome, AppendRequest, NativeId, SessionStore};
use crate::{SessionId, StoreError};
use fedrelay_proto::{Address, Body, Envelope, v1};
use prost::Message;
use thiserror::Error;

/// A conformance check that did not hold.
#[derive(Debug, Error)]
pub enum ConformanceFailure {
    #[error("check failed: {0}")]
    Check(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn check(cond: bool, what: &str) -> Result<(), ConformanceFailure> {
    if cond {
        Ok(())
    } else {
        Err(ConformanceFailure::Check(what.to_string()))
    }
}

fn envelope(id: SessionId, seq: u64, relay: &str) -> Vec<u8> {
    Envelope {
        session_id: id.0.to_vec(),
        relay_msg_id: relay.to_string(),
        seq,
        sender: Some(Address::new("http", "a.example", "alice")),
        recipients: vec![Address::new("http", "b.example", "bob")],
        body: Some(Body::Typing(v1::Typing { active: true })),
        ..Default::default()
    }
    .encode_to_vec()
}

/// Runs every check on a fresh session of `store`.
pub async fn run(store: &dyn SessionStore) -> Result<(), ConformanceFailure> {
    let id = SessionId::channel("conformance", &crate::ids::new_relay_msg_id());
    let c1 = store.claim(id).await?;
    check(
        c1.last_seq == 0 && c1.journal.is_empty(),
        "a new session is empty",
    )?;

    let req = |seq, relay: &'static str, native: &'static str| AppendRequest {
        seq,
        relay_msg_id: relay,
        origin: Some(("http", native)),
        payload: envelope(id, seq, relay),
        sender: "alice",
    };
    check(
        store.append(id, c1.epoch, req(1, "r1", "n1")).await? == AppendOutcome::Appended,
        "first append is appended",
    )?;
    check(
        store.append(id, c1.epoch, req(2, "r2", "n1")).await?
            == AppendOutcome::Duplicate {
                relay_msg_id: "r1".into(),
                seq: 1,
            },
        "same origin id is a duplicate naming the first copy",
    )?;
    check(
        matches!(
            store.append(id, c1.epoch, req(3, "r3", "n3")).await,
            Err(StoreError::OutOfStep { .. })
        ),
        "a seq gap is refused",
    )?;
    store.append(id, c1.epoch, req(2, "r2", "n2")).await?;
    check(
        store.resolve_native(id, "http", "n2").await?.as_deref() == Some("r2"),
        "origin native id resolves to the relay id",
    )?;
    check(
        store.native_for(id, "r2", "http").await?.as_deref() == Some("n2"),
        "relay id maps back to the origin native id",
    )?;
    check(
        store.sender_of(id, "r2").await?.as_deref() == Some("alice"),
        "a message's sender is kept",
    )?;
    check(
        store.sender_of(id, "r3").await?.is_none(),
        "no sender for a message never appended",
    )?;

    // A second owner claims: the first is fenced on append and on ack.
    let c2 = store.claim(id).await?;
    check(c2.epoch > c1.epoch, "a claim raises the epoch")?;
    check(
        c2.last_seq == 2 && c2.journal.len() == 2,
        "a claim sees the journal",
    )?;
    check(
        c2.journal.iter().map(|e| e.seq).collect::<Vec<_>>() == vec![1, 2],
        "journal is in seq order",
    )?;
    check(
        matches!(
            store.append(id, c1.epoch, req(3, "r3", "n3")).await,
            Err(StoreError::Fenced { .. })
        ),
        "a stale owner cannot append",
    )?;
    check(
        matches!(
            store.ack(id, c1.epoch, &AckUpdate::default()).await,
            Err(StoreError::Fenced { .. })
        ),
        "a stale owner cannot ack",
    )?;

    let update = AckUpdate {
        cursors: vec![("bob".into(), 1)],
        trim_through: 1,
        natives: vec![NativeId {
            relay_msg_id: "r1".into(),
            platform: "teams".into(),
            native_id: "t-1".into(),
            seq: 1,
        }],
    };
    store.ack(id, c2.epoch, &update).await?;
    // A cursor never moves back.
    store
        .ack(
            id,
            c2.epoch,
            &AckUpdate {
                cursors: vec![("bob".into(), 0)],
                ..Default::default()
            },
        )
        .await?;
    check(
        store.native_for(id, "r1", "teams").await?.as_deref() == Some("t-1"),
        "delivered native ids are stored",
    )?;
    check(
        store.resolve_native(id, "teams", "t-1").await?.as_deref() == Some("r1"),
        "delivered native ids resolve back",
    )?;
    let c3 = store.claim(id).await?;
    check(
        c3.cursors.get("bob") == Some(&1),
        "cursors persist and never regress",
    )?;
    check(
        c3.journal.iter().map(|e| e.seq).collect::<Vec<_>>() == vec![2],
        "trim drops the delivered prefix only",
    )?;
    check(c3.last_seq == 2, "trim keeps the last seq")?;

    store.mark_active(id).await?;
    store.mark_active(id).await?;
    let active = store.active_sessions().await?;
    check(
        active.iter().filter(|a| **a == id).count() == 1,
        "a session marked active is listed once",
    )?;
    store.mark_idle(id).await?;
    check(
        !store.active_sessions().await?.contains(&id),
        "a session marked idle is no longer listed",
    )?;
    Ok(())
}
