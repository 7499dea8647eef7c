//! The delivery contract, checked on what arrives.
//!
//! - every message the relay accepted (202) arrives exactly once (else `lost`),
//! - no delivery is seen twice, by `(session_id, seq)` or by the message's tag (`duplicates`),
//! - per receiving domain and session, `seq` strictly increases (`order_violations`),
//! - a message arrives at its recipient's domain, addressed to the recipient (`misrouted`),
//! - the `(session_id, seq)` delivered matches the one the 202 answered (`id_mismatches`).
//!
//! Messages are numbered `0..total` by the driver (their tag's `global`), so per-message state
//! is a dense vector.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::scenario::Tag;

/// The fields of a delivered event the checker looks at (see `docs/http-edge.md`,
/// "Receiving"); anything else is ignored.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct DeliveredEvent {
    #[serde(default)]
    pub session_id: String,
    #[serde(default)]
    pub seq: u64,
    #[serde(default, rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub to: Option<String>,
    #[serde(default)]
    pub text: Option<String>,
}

/// What the driver expects of message `global`: who should receive it, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// The recipient's domain index.
    pub domain: usize,
    /// `user@domain` of the recipient.
    pub to: String,
}

/// What one received event turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// First arrival of message `global`, meant to be sent `intended_ns` after t0.
    First { global: u64, intended_ns: u64 },
    /// A copy of something already received.
    Duplicate,
    /// Not a message of this run (other run, other type); ignored.
    Foreign,
    /// A relay `error` event.
    Error,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SendState {
    Pending,
    Accepted,
    Failed,
}

/// Final counts of the contract check.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ContractReport {
    pub accepted: u64,
    pub send_failed: u64,
    pub received_unique: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub order_violations: u64,
    pub misrouted: u64,
    pub id_mismatches: u64,
    /// Received although the POST did not answer 202 (timeout or error after enqueueing).
    pub received_unaccepted: u64,
    /// Events that are not messages of this run (other runs' leftovers, other types).
    pub foreign: u64,
    /// `type: "error"` events from the relay.
    pub error_events: u64,
    /// Some lost message numbers, for debugging.
    pub lost_examples: Vec<u64>,
    /// Whether the contract held (no loss, duplicate, order violation, misrouting or id
    /// mismatch).
    pub passed: bool,
}

/// Tracks sends and receipts of one run.
#[derive(Debug)]
pub struct ContractChecker {
    run: String,
    send: Vec<SendState>,
    received: Vec<bool>,
    /// `(session, seq)` the 202 answered, per message (`u32::MAX` session = unknown).
    accepted_id: Vec<(u32, u64)>,
    /// `(session, seq)` that arrived, per message.
    received_id: Vec<(u32, u64)>,
    sessions: HashMap<String, u32>,
    seen_deliveries: HashSet<(u32, u64)>,
    last_seq: HashMap<(usize, u32), u64>,
    outstanding: u64,
    report: ContractReport,
}

const NO_SESSION: u32 = u32::MAX;

impl ContractChecker {
    /// A checker for messages `0..total` of run `run`.
    pub fn new(run: impl Into<String>, total: u64) -> Self {
        let n = usize::try_from(total).unwrap_or(usize::MAX);
        Self {
            run: run.into(),
            send: vec![SendState::Pending; n],
            received: vec![false; n],
            accepted_id: vec![(NO_SESSION, 0); n],
            received_id: vec![(NO_SESSION, 0); n],
            sessions: HashMap::new(),
            seen_deliveries: HashSet::new(),
            last_seq: HashMap::new(),
            outstanding: 0,
            report: ContractReport::default(),
        }
    }

    fn intern(&mut self, session: &str) -> u32 {
        if let Some(&id) = self.sessions.get(session) {
            return id;
        }
        let id = u32::try_from(self.sessions.len()).unwrap_or(NO_SESSION - 1);
        self.sessions.insert(session.to_owned(), id);
        id
    }

    /// Messages accepted and not yet received.
    pub fn outstanding(&self) -> u64 {
        self.outstanding
    }

    /// The POST of message `global` answered 202 with these ids.
    pub fn on_accepted(&mut self, global: u64, session_id: Option<&str>, seq: Option<u64>) {
        let Some(i) = self.index(global) else { return };
        if self.send[i] != SendState::Pending {
            return;
        }
        self.send[i] = SendState::Accepted;
        self.report.accepted += 1;
        if let (Some(s), Some(q)) = (session_id, seq) {
            let sid = self.intern(s);
            self.accepted_id[i] = (sid, q);
            if self.received[i] {
                self.compare_ids(i);
            }
        }
        if self.received[i] {
            self.report.received_unaccepted = self.report.received_unaccepted.saturating_sub(1);
        } else {
            self.outstanding += 1;
        }
    }

    /// The POST of message `global` failed (non-202, timeout, connection error).
    pub fn on_send_failed(&mut self, global: u64) {
        let Some(i) = self.index(global) else { return };
        if self.send[i] == SendState::Pending {
            self.send[i] = SendState::Failed;
            self.report.send_failed += 1;
        }
    }

    fn index(&self, global: u64) -> Option<usize> {
        usize::try_from(global)
            .ok()
            .filter(|&i| i < self.send.len())
    }

    fn compare_ids(&mut self, i: usize) {
        let a = self.accepted_id[i];
        let r = self.received_id[i];
        if a.0 != NO_SESSION && r.0 != NO_SESSION && a != r {
            self.report.id_mismatches += 1;
        }
    }

    /// An event arrived on the stream (or webhook) of domain `domain`. `expected` tells where
    /// message `global` should go.
    pub fn on_received(
        &mut self,
        domain: usize,
        ev: &DeliveredEvent,
        expected: impl Fn(u64) -> Option<Expected>,
    ) -> Received {
        if ev.kind == "error" {
            self.report.error_events += 1;
            return Received::Error;
        }
        let tag = match ev.text.as_deref().and_then(Tag::parse) {
            Some(t) if ev.kind == "message" && t.run == self.run => t,
            _ => {
                self.report.foreign += 1;
                return Received::Foreign;
            }
        };
        let sid = self.intern(&ev.session_id);
        let Some(i) = self.index(tag.global) else {
            self.report.foreign += 1;
            return Received::Foreign;
        };
        let new_delivery = self.seen_deliveries.insert((sid, ev.seq));
        if !new_delivery || self.received[i] {
            self.report.duplicates += 1;
            return Received::Duplicate;
        }
        match self.last_seq.get_mut(&(domain, sid)) {
            Some(last) => {
                if ev.seq <= *last {
                    self.report.order_violations += 1;
                } else {
                    *last = ev.seq;
                }
            }
            None => {
                self.last_seq.insert((domain, sid), ev.seq);
            }
        }
        if let Some(exp) = expected(tag.global)
            && (exp.domain != domain || ev.to.as_deref() != Some(exp.to.as_str()))
        {
            self.report.misrouted += 1;
        }
        self.received[i] = true;
        self.received_id[i] = (sid, ev.seq);
        self.report.received_unique += 1;
        match self.send[i] {
            SendState::Accepted => {
                self.outstanding = self.outstanding.saturating_sub(1);
                self.compare_ids(i);
            }
            // The 202 may simply not have been processed yet; `on_accepted` corrects this.
            SendState::Pending | SendState::Failed => self.report.received_unaccepted += 1,
        }
        Received::First {
            global: tag.global,
            intended_ns: tag.intended_ns,
        }
    }

    /// The counts so far (loss counted as outstanding accepted messages).
    pub fn report(&self) -> ContractReport {
        let mut r = self.report.clone();
        r.lost = self.outstanding;
        r.lost_examples = self
            .send
            .iter()
            .zip(&self.received)
            .enumerate()
            .filter(|(_, (s, rcv))| **s == SendState::Accepted && !**rcv)
            .map(|(i, _)| i as u64)
            .take(20)
            .collect();
        r.passed = r.lost == 0
            && r.duplicates == 0
            && r.order_violations == 0
            && r.misrouted == 0
            && r.id_mismatches == 0;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUN: &str = "r1";

    fn msg(session: &str, seq: u64, global: u64, to: &str) -> DeliveredEvent {
        DeliveredEvent {
            session_id: session.into(),
            seq,
            kind: "message".into(),
            from: Some("u0@d0.loadtest.example".into()),
            to: Some(to.into()),
            text: Some(
                Tag {
                    run: RUN.into(),
                    sender: 0,
                    n: global,
                    global,
                    intended_ns: global * 1000,
                }
                .to_text(),
            ),
        }
    }

    fn exp(_: u64) -> Option<Expected> {
        Some(Expected {
            domain: 1,
            to: "u0@d1.loadtest.example".into(),
        })
    }

    const TO: &str = "u0@d1.loadtest.example";

    #[test]
    fn clean_run_passes() {
        let mut c = ContractChecker::new(RUN, 3);
        for g in 0..3 {
            c.on_accepted(g, Some("s"), Some(g + 1));
        }
        assert_eq!(c.outstanding(), 3);
        for g in 0..3 {
            assert_eq!(
                c.on_received(1, &msg("s", g + 1, g, TO), exp),
                Received::First {
                    global: g,
                    intended_ns: g * 1000
                }
            );
        }
        assert_eq!(c.outstanding(), 0);
        let r = c.report();
        assert!(r.passed, "{r:?}");
        assert_eq!(r.received_unique, 3);
        assert_eq!(r.accepted, 3);
        assert_eq!(r.received_unaccepted, 0);
    }

    #[test]
    fn loss_is_detected() {
        let mut c = ContractChecker::new(RUN, 3);
        for g in 0..3 {
            c.on_accepted(g, Some("s"), Some(g + 1));
        }
        c.on_received(1, &msg("s", 1, 0, TO), exp);
        c.on_received(1, &msg("s", 3, 2, TO), exp);
        let r = c.report();
        assert_eq!(r.lost, 1);
        assert_eq!(r.lost_examples, vec![1]);
        assert!(!r.passed);
        // A failed send is not loss.
        let mut c = ContractChecker::new(RUN, 1);
        c.on_send_failed(0);
        let r = c.report();
        assert_eq!((r.lost, r.send_failed), (0, 1));
        assert!(r.passed);
    }

    #[test]
    fn duplicates_by_delivery_id_and_by_tag() {
        let mut c = ContractChecker::new(RUN, 3);
        for g in 0..3 {
            c.on_accepted(g, Some("s"), Some(g + 1));
        }
        c.on_received(1, &msg("s", 1, 0, TO), exp);
        // Same (session, seq) again.
        assert_eq!(
            c.on_received(1, &msg("s", 1, 0, TO), exp),
            Received::Duplicate
        );
        // Same tag under a new seq (the relay journaled it twice).
        assert_eq!(
            c.on_received(1, &msg("s", 5, 0, TO), exp),
            Received::Duplicate
        );
        c.on_received(1, &msg("s", 2, 1, TO), exp);
        c.on_received(1, &msg("s", 3, 2, TO), exp);
        let r = c.report();
        assert_eq!(r.duplicates, 2);
        assert_eq!(
            r.order_violations, 0,
            "a duplicate is not an order violation"
        );
        assert_eq!(r.lost, 0);
        assert!(!r.passed);
    }

    #[test]
    fn order_violation_per_domain_and_session() {
        let mut c = ContractChecker::new(RUN, 4);
        for g in 0..4 {
            c.on_accepted(g, None, None);
        }
        c.on_received(1, &msg("s", 2, 1, TO), exp);
        c.on_received(1, &msg("s", 1, 0, TO), exp); // went backwards
        // Another session has its own seqs.
        c.on_received(1, &msg("t", 1, 2, TO), exp);
        // Same session seen by another domain (the other direction) is tracked apart.
        c.on_received(0, &msg("s", 3, 3, "u0@d0.loadtest.example"), |_| {
            Some(Expected {
                domain: 0,
                to: "u0@d0.loadtest.example".into(),
            })
        });
        let r = c.report();
        assert_eq!(r.order_violations, 1);
        assert_eq!(r.duplicates, 0);
        assert_eq!(r.lost, 0);
        assert_eq!(r.misrouted, 0);
        assert!(!r.passed);
    }

    #[test]
    fn receipt_before_accept_is_not_loss_and_not_unaccepted() {
        let mut c = ContractChecker::new(RUN, 2);
        c.on_received(1, &msg("s", 1, 0, TO), exp);
        assert_eq!(c.report().received_unaccepted, 1);
        c.on_accepted(0, Some("s"), Some(1));
        assert_eq!(c.outstanding(), 0);
        let r = c.report();
        assert_eq!(r.received_unaccepted, 0);
        assert_eq!(r.lost, 0);
        // Received although the POST failed.
        c.on_send_failed(1);
        c.on_received(1, &msg("s", 2, 1, TO), exp);
        let r = c.report();
        assert_eq!(r.received_unaccepted, 1);
        assert!(r.passed);
    }

    #[test]
    fn misrouting_and_id_mismatch() {
        let mut c = ContractChecker::new(RUN, 2);
        c.on_accepted(0, Some("s"), Some(1));
        c.on_accepted(1, Some("s"), Some(2));
        // Arrives at domain 2 instead of 1.
        c.on_received(2, &msg("s", 1, 0, TO), exp);
        // The 202 said seq 2 but it arrived as seq 9.
        c.on_received(1, &msg("s", 9, 1, TO), exp);
        let r = c.report();
        assert_eq!(r.misrouted, 1);
        assert_eq!(r.id_mismatches, 1);
        assert!(!r.passed);
    }

    #[test]
    fn foreign_and_error_events_are_counted_apart() {
        let mut c = ContractChecker::new(RUN, 1);
        c.on_accepted(0, None, None);
        let mut other_run = msg("s", 1, 0, TO);
        other_run.text = other_run.text.map(|t| t.replacen(RUN, "zz", 1));
        assert_eq!(c.on_received(1, &other_run, exp), Received::Foreign);
        let mut typing = msg("s", 2, 0, TO);
        typing.kind = "typing".into();
        assert_eq!(c.on_received(1, &typing, exp), Received::Foreign);
        // Out of range message number.
        assert_eq!(
            c.on_received(1, &msg("s", 3, 7, TO), exp),
            Received::Foreign
        );
        let err = DeliveredEvent {
            kind: "error".into(),
            ..Default::default()
        };
        assert_eq!(c.on_received(0, &err, exp), Received::Error);
        let r = c.report();
        assert_eq!((r.foreign, r.error_events, r.lost), (3, 1, 1));
    }

    #[test]
    fn delivered_event_parses_docs_example() -> Result<(), serde_json::Error> {
        let ev: DeliveredEvent = serde_json::from_str(
            r#"{"session_id": "5b0c", "seq": 7, "relay_msg_id": "0193", "type": "message",
                "from": "bob@partner.example", "from_platform": "http",
                "to": "alice@contoso.example", "sent_at": 1732350000000,
                "text": "Hello *Alice*", "rich": [{"text": "Hello "}]}"#,
        )?;
        assert_eq!(ev.session_id, "5b0c");
        assert_eq!(ev.seq, 7);
        assert_eq!(ev.kind, "message");
        assert_eq!(ev.to.as_deref(), Some("alice@contoso.example"));
        Ok(())
    }
}
