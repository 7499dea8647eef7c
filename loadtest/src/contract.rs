//! The delivery contract, checked on what arrives.
//!
//! - every accepted event (202, or an ok ack over gRPC) reaches each of its recipients exactly
//!   once (else `lost`); presence is the exception the relay documents: a follower who misses
//!   a version but gets a newer one of the same publisher has lost nothing (`superseded`),
//! - no delivery is seen twice, by `(session_id, seq, recipient)` or by the event's tag
//!   (`duplicates`),
//! - per receiving domain, session and recipient, `seq` strictly increases (`order_violations`),
//! - an event arrives at one of its recipients' domains, addressed to that recipient
//!   (`misrouted`),
//! - the `(session_id, seq)` delivered matches the one the acceptance gave (`id_mismatches`).
//!
//! Events are numbered `0..total` by the driver. Messages, edits and presence carry the number
//! in a tag in their text or note; reactions, typing and deletes carry no text, so they are
//! recognised by the `(session_id, seq)` their acceptance gave — one that arrives before its
//! acceptance was processed waits ("parked") until then.

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
    #[serde(default)]
    pub note: Option<String>,
}

impl DeliveredEvent {
    /// The run tag the event carries, if any: in the text of messages and edits, in the note
    /// of presence.
    fn tag(&self) -> Option<Tag> {
        match self.kind.as_str() {
            "message" | "edit" => self.text.as_deref().and_then(Tag::parse),
            "presence" => self.note.as_deref().and_then(Tag::parse),
            _ => None,
        }
    }
}

/// What one received event turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// First arrival of event `global` at one of its recipients.
    First { global: u64 },
    /// A copy of something already received.
    Duplicate,
    /// Recognisable only by its ids, whose acceptance has not been processed yet: it counts
    /// once that happens (see [`ContractChecker::on_accepted`]).
    Parked,
    /// Not an event of this run (other run, other type); ignored.
    Foreign,
    /// A relay `error` event.
    Error,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SendState {
    Pending,
    Accepted,
    Failed,
    /// Never sent (a reaction, edit or delete whose target was not accepted).
    Skipped,
}

/// Who receives each event.
#[derive(Debug, Clone)]
pub enum Fan {
    /// One recipient per event (1:1).
    One,
    /// Every event goes to all of `audience` (channel members, followers).
    Audience {
        audience: Vec<String>,
        /// Presence: a missed version followed by a newer one is not loss. The publishers
        /// (user indices, as tags name senders) in the order they take turns: event `g` is
        /// published by `publishers[g % len]`.
        supersede: Option<Vec<u32>>,
    },
}

/// Final counts of the contract check.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ContractReport {
    pub accepted: u64,
    pub send_failed: u64,
    /// Events not sent because what they refer to was not accepted.
    #[serde(default)]
    pub skipped: u64,
    /// Deliveries expected: accepted events × their recipients.
    #[serde(default)]
    pub expected_deliveries: u64,
    pub received_unique: u64,
    pub lost: u64,
    /// Presence versions a follower missed but followed by a newer one it got.
    #[serde(default)]
    pub superseded: u64,
    /// Presence updates delivered again under a newer version: a publish retried after its
    /// answer was lost (presence is not deduplicated; followers keep the newest).
    #[serde(default)]
    pub republished: u64,
    /// Reactions, typing or deletes in this run's sessions whose ids match no acceptance (a
    /// repeat under a new seq, or something nobody sent).
    #[serde(default)]
    pub unmatched: u64,
    pub duplicates: u64,
    pub order_violations: u64,
    pub misrouted: u64,
    pub id_mismatches: u64,
    /// Received although the send did not succeed (timeout or error after enqueueing).
    pub received_unaccepted: u64,
    /// Events that are not events of this run (other runs' leftovers, set-up traffic).
    pub foreign: u64,
    /// `type: "error"` events from the relay.
    pub error_events: u64,
    /// Some event numbers with a lost delivery, for debugging.
    pub lost_examples: Vec<u64>,
    /// Whether the contract held (no loss, duplicate, unmatched delivery, order violation,
    /// misrouting or id mismatch).
    pub passed: bool,
}

/// A delivery recognised only by ids whose acceptance is not known yet.
#[derive(Debug, Clone)]
struct ParkedDelivery {
    domain: usize,
    rcpt: u32,
    arrived_ns: u64,
}

/// Tracks sends and receipts of one run.
#[derive(Debug)]
pub struct ContractChecker {
    run: String,
    fan: Fan,
    per_event: u32,
    send: Vec<SendState>,
    received: Vec<u32>,
    /// `(session, seq)` the acceptance gave, per event (`NO_SESSION` = unknown).
    accepted_id: Vec<(u32, u64)>,
    /// `(session, seq)` an event arrived with, per event (the first arrival).
    received_id: Vec<(u32, u64)>,
    /// Events without a tag, by the `(session, seq)` of their acceptance.
    by_id: HashMap<(u32, u64), u64>,
    parked: HashMap<(u32, u64), Vec<ParkedDelivery>>,
    sessions: HashMap<String, u32>,
    recipients: HashMap<String, u32>,
    seen_deliveries: HashSet<(u32, u64, u32)>,
    got: HashSet<(u64, u32)>,
    last_seq: HashMap<(usize, u32, u32), u64>,
    /// Presence: the newest event of each (publisher, follower) received.
    newest: HashMap<(u32, u32), u64>,
    /// Recipient names by id (the reverse of `recipients`).
    recipient_names: Vec<String>,
    /// Sessions this run's acceptances named.
    run_sessions: HashSet<u32>,
    /// Presence: the same update delivered again under a newer version is a republish.
    republish: bool,
    outstanding: u64,
    report: ContractReport,
}

const NO_SESSION: u32 = u32::MAX;

impl ContractChecker {
    /// A checker for events `0..total` of run `run`.
    pub fn new(run: impl Into<String>, total: u64, fan: Fan) -> Self {
        let n = usize::try_from(total).unwrap_or(usize::MAX);
        let mut recipients = HashMap::new();
        let mut recipient_names = Vec::new();
        let per_event = match &fan {
            Fan::One => 1,
            Fan::Audience { audience, .. } => {
                for a in audience {
                    if !recipients.contains_key(a) {
                        let id = u32::try_from(recipient_names.len()).unwrap_or(u32::MAX);
                        recipients.insert(a.clone(), id);
                        recipient_names.push(a.clone());
                    }
                }
                u32::try_from(audience.len()).unwrap_or(u32::MAX)
            }
        };
        let republish = matches!(
            &fan,
            Fan::Audience {
                supersede: Some(_),
                ..
            }
        );
        Self {
            run: run.into(),
            fan,
            per_event,
            send: vec![SendState::Pending; n],
            received: vec![0; n],
            accepted_id: vec![(NO_SESSION, 0); n],
            received_id: vec![(NO_SESSION, 0); n],
            by_id: HashMap::new(),
            parked: HashMap::new(),
            sessions: HashMap::new(),
            recipients,
            seen_deliveries: HashSet::new(),
            got: HashSet::new(),
            last_seq: HashMap::new(),
            newest: HashMap::new(),
            recipient_names,
            run_sessions: HashSet::new(),
            republish,
            outstanding: 0,
            report: ContractReport::default(),
        }
    }

    fn intern_session(&mut self, session: &str) -> u32 {
        intern(&mut self.sessions, session)
    }

    fn intern_recipient(&mut self, to: &str) -> u32 {
        let id = intern(&mut self.recipients, to);
        if id as usize == self.recipient_names.len() {
            self.recipient_names.push(to.to_owned());
        }
        id
    }

    fn recipient_name(&self, rcpt: u32) -> String {
        self.recipient_names
            .get(rcpt as usize)
            .cloned()
            .unwrap_or_default()
    }

    /// Events accepted and deliveries received so far (cheap, for progress).
    pub fn accepted_and_received(&self) -> (u64, u64) {
        (self.report.accepted, self.report.received_unique)
    }

    /// Deliveries accepted and not yet received.
    pub fn outstanding(&self) -> u64 {
        self.outstanding
    }

    /// Event `global` was accepted with these ids. `by_id`: the event carries no tag, so its
    /// deliveries are recognised by `(session, seq)`. Returns the parked deliveries this
    /// acceptance resolved, as `(global, arrived_ns)` first arrivals, for latency.
    pub fn on_accepted(
        &mut self,
        global: u64,
        session_id: Option<&str>,
        seq: Option<u64>,
        by_id: bool,
        is_recipient: impl Fn(u64, usize, &str) -> bool,
    ) -> Vec<(u64, u64)> {
        let Some(i) = self.index(global) else {
            return Vec::new();
        };
        if self.send[i] != SendState::Pending {
            return Vec::new();
        }
        self.send[i] = SendState::Accepted;
        self.report.accepted += 1;
        self.report.expected_deliveries += u64::from(self.per_event);
        let already = self.received[i];
        self.report.received_unaccepted = self
            .report
            .received_unaccepted
            .saturating_sub(u64::from(already));
        self.outstanding += u64::from(self.per_event.saturating_sub(already));
        let mut resolved = Vec::new();
        if let (Some(s), Some(q)) = (session_id, seq) {
            let sid = self.intern_session(s);
            self.run_sessions.insert(sid);
            self.accepted_id[i] = (sid, q);
            if already > 0 {
                self.compare_ids(i);
            }
            if by_id {
                self.by_id.insert((sid, q), global);
                for p in self.parked.remove(&(sid, q)).unwrap_or_default() {
                    if let Received::First { global } =
                        self.count(i, sid, q, p.domain, p.rcpt, None, &is_recipient)
                    {
                        resolved.push((global, p.arrived_ns));
                    }
                }
            }
        }
        resolved
    }

    /// The send of event `global` failed (an error status, a timeout, a connection error).
    pub fn on_send_failed(&mut self, global: u64) {
        let Some(i) = self.index(global) else { return };
        if self.send[i] == SendState::Pending {
            self.send[i] = SendState::Failed;
            self.report.send_failed += 1;
        }
    }

    /// The relay refused event `global` after all (an XMPP stanza error, which comes back on a
    /// stream of its own, possibly after the acknowledgement that counted it as accepted): a
    /// failed send, not an accepted one. An event already delivered stays accepted.
    pub fn on_refused(&mut self, global: u64) {
        let Some(i) = self.index(global) else { return };
        match self.send[i] {
            SendState::Pending => {
                self.send[i] = SendState::Failed;
                self.report.send_failed += 1;
            }
            SendState::Accepted if self.received[i] == 0 => {
                self.send[i] = SendState::Failed;
                self.report.accepted = self.report.accepted.saturating_sub(1);
                self.report.send_failed += 1;
                self.report.expected_deliveries = self
                    .report
                    .expected_deliveries
                    .saturating_sub(u64::from(self.per_event));
                self.outstanding = self.outstanding.saturating_sub(u64::from(self.per_event));
            }
            _ => {}
        }
    }

    /// Event `global` was not sent: what it refers to was not accepted.
    pub fn on_skipped(&mut self, global: u64) {
        let Some(i) = self.index(global) else { return };
        if self.send[i] == SendState::Pending {
            self.send[i] = SendState::Skipped;
            self.report.skipped += 1;
        }
    }

    /// Whether event `global` was accepted (so others may refer to it).
    pub fn is_accepted(&self, global: u64) -> bool {
        self.outcome(global) == Some(true)
    }

    /// How the send of event `global` ended: accepted, not (failed or skipped), or not yet.
    pub fn outcome(&self, global: u64) -> Option<bool> {
        match self.index(global).map(|i| self.send[i]) {
            Some(SendState::Accepted) => Some(true),
            Some(SendState::Failed | SendState::Skipped) => Some(false),
            Some(SendState::Pending) | None => None,
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

    /// An event arrived on the stream (or webhook) of domain `domain` at `now_ns`.
    /// `is_recipient(global, domain, to)` says whether `to` at `domain` is one of event
    /// `global`'s recipients.
    pub fn on_received(
        &mut self,
        domain: usize,
        ev: &DeliveredEvent,
        now_ns: u64,
        is_recipient: impl Fn(u64, usize, &str) -> bool,
    ) -> Received {
        if ev.kind == "error" {
            self.report.error_events += 1;
            return Received::Error;
        }
        let sid = self.intern_session(&ev.session_id);
        let to = ev.to.as_deref().unwrap_or("");
        let tag = match ev.tag() {
            Some(t) if t.run == self.run => Some(t),
            Some(_) => {
                self.report.foreign += 1;
                return Received::Foreign;
            }
            None => None,
        };
        let Some(tag) = tag else {
            // Known only by its ids. Repeats and order are judged now, on arrival, whether or
            // not its acceptance has been seen yet.
            let rcpt = self.intern_recipient(to);
            if !self.seen_deliveries.insert((sid, ev.seq, rcpt)) {
                self.report.duplicates += 1;
                return Received::Duplicate;
            }
            self.check_order(domain, sid, rcpt, ev.seq);
            return match self.by_id.get(&(sid, ev.seq)) {
                Some(&g) => match self.index(g) {
                    Some(i) => self.count(i, sid, ev.seq, domain, rcpt, None, &is_recipient),
                    None => Received::Foreign,
                },
                None => {
                    // Maybe an event of this run whose acceptance is still on its way.
                    self.parked
                        .entry((sid, ev.seq))
                        .or_default()
                        .push(ParkedDelivery {
                            domain,
                            rcpt,
                            arrived_ns: now_ns,
                        });
                    Received::Parked
                }
            };
        };
        let Some(i) = self.index(tag.global) else {
            self.report.foreign += 1;
            return Received::Foreign;
        };
        let rcpt = self.intern_recipient(to);
        let new_delivery = self.seen_deliveries.insert((sid, ev.seq, rcpt));
        if !new_delivery {
            self.report.duplicates += 1;
            return Received::Duplicate;
        }
        if self.got.contains(&(tag.global, rcpt)) {
            if self.republish {
                // Presence is not deduplicated: a retried publish is a new version of the same
                // update, not a repeat of a delivery.
                self.report.republished += 1;
            } else {
                self.report.duplicates += 1;
            }
            return Received::Duplicate;
        }
        self.check_order(domain, sid, rcpt, ev.seq);
        self.count(
            i,
            sid,
            ev.seq,
            domain,
            rcpt,
            Some(tag.sender),
            &is_recipient,
        )
    }

    /// Seqs per receiving domain, session and recipient only grow.
    fn check_order(&mut self, domain: usize, sid: u32, rcpt: u32, seq: u64) {
        match self.last_seq.get_mut(&(domain, sid, rcpt)) {
            Some(last) => {
                if seq <= *last {
                    self.report.order_violations += 1;
                } else {
                    *last = seq;
                }
            }
            None => {
                self.last_seq.insert((domain, sid, rcpt), seq);
            }
        }
    }

    /// Counts one delivery of event `i` to recipient `rcpt` (already checked for repeats of
    /// its ids and for order).
    #[allow(clippy::too_many_arguments)]
    fn count(
        &mut self,
        i: usize,
        sid: u32,
        seq: u64,
        domain: usize,
        rcpt: u32,
        sender: Option<u32>,
        is_recipient: &impl Fn(u64, usize, &str) -> bool,
    ) -> Received {
        let global = i as u64;
        if !self.got.insert((global, rcpt)) {
            // The same event under other ids: the relay journaled it twice.
            self.report.duplicates += 1;
            return Received::Duplicate;
        }
        let to = self.recipient_name(rcpt);
        if !is_recipient(global, domain, &to) {
            self.report.misrouted += 1;
        }
        if let Some(s) = sender {
            let newest = self.newest.entry((s, rcpt)).or_insert(global);
            *newest = (*newest).max(global);
        }
        self.received[i] += 1;
        if self.received[i] == 1 {
            self.received_id[i] = (sid, seq);
        }
        self.report.received_unique += 1;
        match self.send[i] {
            SendState::Accepted => {
                self.outstanding = self.outstanding.saturating_sub(1);
                if self.received[i] == 1 {
                    self.compare_ids(i);
                }
            }
            // The acceptance may simply not have been processed yet; `on_accepted` corrects
            // this.
            _ => self.report.received_unaccepted += 1,
        }
        Received::First { global }
    }

    /// The counts so far.
    pub fn report(&self) -> ContractReport {
        let mut r = self.report.clone();
        for ((sid, _), v) in &self.parked {
            // Untagged deliveries in this run's sessions that match no acceptance: copies the
            // relay journaled again under new seqs, or events nobody sent.
            if self.run_sessions.contains(sid) {
                r.unmatched += v.len() as u64;
            } else {
                r.foreign += v.len() as u64;
            }
        }
        let mut lost = 0u64;
        let mut superseded = 0u64;
        let mut examples = Vec::new();
        for (i, (&state, &got)) in self.send.iter().zip(&self.received).enumerate() {
            if state != SendState::Accepted || got >= self.per_event {
                continue;
            }
            let global = i as u64;
            let missing = match &self.fan {
                Fan::Audience {
                    supersede: Some(publishers),
                    ..
                } if !publishers.is_empty() => {
                    // Which followers missed it, and did each get a newer version?
                    let mut really = 0u64;
                    let publisher = Some(publishers[i % publishers.len()]);
                    for rcpt in 0..self.per_event {
                        if self.got.contains(&(global, rcpt)) {
                            continue;
                        }
                        let newer = publisher
                            .and_then(|p| self.newest.get(&(p, rcpt)))
                            .is_some_and(|&n| n > global);
                        if newer {
                            superseded += 1;
                        } else {
                            really += 1;
                        }
                    }
                    really
                }
                _ => u64::from(self.per_event - got),
            };
            if missing > 0 {
                lost += missing;
                if examples.len() < 20 {
                    examples.push(global);
                }
            }
        }
        r.lost = lost;
        r.superseded = superseded;
        r.lost_examples = examples;
        r.passed = r.lost == 0
            && r.duplicates == 0
            && r.unmatched == 0
            && r.order_violations == 0
            && r.misrouted == 0
            && r.id_mismatches == 0;
        r
    }
}

fn intern(map: &mut HashMap<String, u32>, key: &str) -> u32 {
    if let Some(&id) = map.get(key) {
        return id;
    }
    let id = u32::try_from(map.len()).unwrap_or(NO_SESSION - 1);
    map.insert(key.to_owned(), id);
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUN: &str = "r1";
    const TO: &str = "u0@d1.loadtest.example";

    fn tagged(
        kind: &str,
        session: &str,
        seq: u64,
        global: u64,
        sender: u32,
        to: &str,
    ) -> DeliveredEvent {
        let tag = Tag {
            run: RUN.into(),
            sender,
            n: global,
            global,
            intended_ns: global * 1000,
        }
        .to_text();
        DeliveredEvent {
            session_id: session.into(),
            seq,
            kind: kind.into(),
            from: Some("u0@d0.loadtest.example".into()),
            to: Some(to.into()),
            text: (kind != "presence").then(|| tag.clone()),
            note: (kind == "presence").then_some(tag),
        }
    }

    fn msg(session: &str, seq: u64, global: u64, to: &str) -> DeliveredEvent {
        tagged("message", session, seq, global, 0, to)
    }

    /// Every message goes to `TO` at domain 1.
    fn to_d1(_: u64, d: usize, to: &str) -> bool {
        d == 1 && to == TO
    }

    fn accept(c: &mut ContractChecker, g: u64, session: Option<&str>, seq: Option<u64>) {
        c.on_accepted(g, session, seq, false, to_d1);
    }

    fn recv(c: &mut ContractChecker, domain: usize, ev: &DeliveredEvent) -> Received {
        c.on_received(domain, ev, 0, to_d1)
    }

    #[test]
    fn clean_run_passes() {
        let mut c = ContractChecker::new(RUN, 3, Fan::One);
        for g in 0..3 {
            accept(&mut c, g, Some("s"), Some(g + 1));
        }
        assert_eq!(c.outstanding(), 3);
        for g in 0..3 {
            assert_eq!(
                recv(&mut c, 1, &msg("s", g + 1, g, TO)),
                Received::First { global: g }
            );
        }
        assert_eq!(c.outstanding(), 0);
        let r = c.report();
        assert!(r.passed, "{r:?}");
        assert_eq!(r.received_unique, 3);
        assert_eq!(r.accepted, 3);
        assert_eq!(r.expected_deliveries, 3);
        assert_eq!(r.received_unaccepted, 0);
    }

    #[test]
    fn a_refusal_after_the_ack_is_a_failed_send_not_a_loss() {
        let mut c = ContractChecker::new(RUN, 4, Fan::One);
        for g in 0..3 {
            accept(&mut c, g, None, None);
        }
        // 1 refused after its ack; 3 refused before it (its ack comes later and is ignored).
        c.on_refused(1);
        c.on_refused(3);
        accept(&mut c, 3, None, None);
        assert_eq!(c.outstanding(), 2);
        recv(&mut c, 1, &msg("s", 1, 0, TO));
        recv(&mut c, 1, &msg("s", 2, 2, TO));
        // A refusal of something delivered changes nothing.
        c.on_refused(2);
        c.on_refused(99);
        let r = c.report();
        assert!(r.passed, "{r:?}");
        assert_eq!((r.accepted, r.send_failed, r.lost), (2, 2, 0));
        assert_eq!(r.expected_deliveries, 2);
        assert_eq!(c.outstanding(), 0);
    }

    #[test]
    fn loss_is_detected() {
        let mut c = ContractChecker::new(RUN, 3, Fan::One);
        for g in 0..3 {
            accept(&mut c, g, Some("s"), Some(g + 1));
        }
        recv(&mut c, 1, &msg("s", 1, 0, TO));
        recv(&mut c, 1, &msg("s", 3, 2, TO));
        let r = c.report();
        assert_eq!(r.lost, 1);
        assert_eq!(r.lost_examples, vec![1]);
        assert!(!r.passed);
        // A failed or skipped send is not loss.
        let mut c = ContractChecker::new(RUN, 2, Fan::One);
        c.on_send_failed(0);
        c.on_skipped(1);
        let r = c.report();
        assert_eq!((r.lost, r.send_failed, r.skipped), (0, 1, 1));
        assert!(r.passed);
        assert!(!c.is_accepted(0));
    }

    #[test]
    fn duplicates_by_delivery_id_and_by_tag() {
        let mut c = ContractChecker::new(RUN, 3, Fan::One);
        for g in 0..3 {
            accept(&mut c, g, Some("s"), Some(g + 1));
        }
        recv(&mut c, 1, &msg("s", 1, 0, TO));
        // Same (session, seq) again.
        assert_eq!(recv(&mut c, 1, &msg("s", 1, 0, TO)), Received::Duplicate);
        // Same tag under a new seq (the relay journaled it twice).
        assert_eq!(recv(&mut c, 1, &msg("s", 5, 0, TO)), Received::Duplicate);
        recv(&mut c, 1, &msg("s", 2, 1, TO));
        recv(&mut c, 1, &msg("s", 3, 2, TO));
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
        let mut c = ContractChecker::new(RUN, 4, Fan::One);
        for g in 0..4 {
            accept(&mut c, g, None, None);
        }
        recv(&mut c, 1, &msg("s", 2, 1, TO));
        recv(&mut c, 1, &msg("s", 1, 0, TO)); // went backwards
        // Another session has its own seqs.
        recv(&mut c, 1, &msg("t", 1, 2, TO));
        // Same session seen by another domain (the other direction) is tracked apart.
        c.on_received(
            0,
            &msg("s", 3, 3, "u0@d0.loadtest.example"),
            0,
            |_, _, _| true,
        );
        let r = c.report();
        assert_eq!(r.order_violations, 1);
        assert_eq!(r.duplicates, 0);
        assert_eq!(r.lost, 0);
        assert_eq!(r.misrouted, 0);
        assert!(!r.passed);
    }

    #[test]
    fn receipt_before_accept_is_not_loss_and_not_unaccepted() {
        let mut c = ContractChecker::new(RUN, 2, Fan::One);
        recv(&mut c, 1, &msg("s", 1, 0, TO));
        assert_eq!(c.report().received_unaccepted, 1);
        accept(&mut c, 0, Some("s"), Some(1));
        assert_eq!(c.outstanding(), 0);
        let r = c.report();
        assert_eq!(r.received_unaccepted, 0);
        assert_eq!(r.lost, 0);
        // Received although the send failed.
        c.on_send_failed(1);
        recv(&mut c, 1, &msg("s", 2, 1, TO));
        let r = c.report();
        assert_eq!(r.received_unaccepted, 1);
        assert!(r.passed);
    }

    #[test]
    fn misrouting_and_id_mismatch() {
        let mut c = ContractChecker::new(RUN, 2, Fan::One);
        accept(&mut c, 0, Some("s"), Some(1));
        accept(&mut c, 1, Some("s"), Some(2));
        // Arrives at domain 2 instead of 1.
        recv(&mut c, 2, &msg("s", 1, 0, TO));
        // Acceptance said seq 2 but it arrived as seq 9.
        recv(&mut c, 1, &msg("s", 9, 1, TO));
        let r = c.report();
        assert_eq!(r.misrouted, 1);
        assert_eq!(r.id_mismatches, 1);
        assert!(!r.passed);
    }

    #[test]
    fn untagged_events_match_by_ids_even_before_their_acceptance() {
        let mut c = ContractChecker::new(RUN, 3, Fan::One);
        let typing = DeliveredEvent {
            session_id: "s".into(),
            seq: 7,
            kind: "typing".into(),
            to: Some(TO.into()),
            ..Default::default()
        };
        // Arrives first: parked, not yet counted.
        assert_eq!(c.on_received(1, &typing, 5_000, to_d1), Received::Parked);
        assert_eq!(c.report().received_unique, 0);
        // Its acceptance resolves it, with the time it arrived.
        let resolved = c.on_accepted(2, Some("s"), Some(7), true, to_d1);
        assert_eq!(resolved, vec![(2, 5_000)]);
        assert_eq!(c.outstanding(), 0);
        // A delete accepted first, then delivered.
        c.on_accepted(1, Some("s"), Some(8), true, to_d1);
        let delete = DeliveredEvent {
            seq: 8,
            kind: "delete".into(),
            ..typing.clone()
        };
        assert_eq!(
            c.on_received(1, &delete, 0, to_d1),
            Received::First { global: 1 }
        );
        // A repeat of it.
        assert_eq!(c.on_received(1, &delete, 0, to_d1), Received::Duplicate);
        // Something untagged nobody accepted in another session (set-up traffic) ends up
        // foreign.
        let stray = DeliveredEvent {
            session_id: "setup".into(),
            seq: 99,
            kind: "contact_request".into(),
            ..typing.clone()
        };
        assert_eq!(c.on_received(1, &stray, 0, to_d1), Received::Parked);
        let r = c.report();
        assert_eq!((r.foreign, r.duplicates, r.received_unique), (1, 1, 2));
        assert_eq!(r.unmatched, 0, "set-up traffic is not this run's");
        // The delete again under a new seq of this run's session: journaled twice.
        let again = DeliveredEvent { seq: 9, ..delete };
        assert_eq!(c.on_received(1, &again, 0, to_d1), Received::Parked);
        let r = c.report();
        assert_eq!(r.unmatched, 1);
        assert!(!r.passed);
    }

    #[test]
    fn a_parked_event_is_ordered_when_it_arrives() {
        let mut c = ContractChecker::new(RUN, 3, Fan::One);
        let typing = DeliveredEvent {
            session_id: "s".into(),
            seq: 7,
            kind: "typing".into(),
            to: Some(TO.into()),
            ..Default::default()
        };
        // Typing (seq 7) arrives before its acceptance, then the message after it (seq 8)...
        assert_eq!(c.on_received(1, &typing, 0, to_d1), Received::Parked);
        accept(&mut c, 1, Some("s"), Some(8));
        recv(&mut c, 1, &msg("s", 8, 1, TO));
        // ...and only then is the typing's acceptance processed: still in order.
        c.on_accepted(0, Some("s"), Some(7), true, to_d1);
        let r = c.report();
        assert_eq!(r.order_violations, 0, "{r:?}");
        assert!(r.passed, "{r:?}");
        // A parked event that really is out of order is caught on arrival.
        let late = DeliveredEvent { seq: 5, ..typing };
        c.on_received(1, &late, 0, to_d1);
        assert_eq!(c.report().order_violations, 1);
        assert_eq!(c.outcome(0), Some(true));
        assert_eq!(c.outcome(2), None);
        c.on_skipped(2);
        assert_eq!(c.outcome(2), Some(false));
    }

    #[test]
    fn fan_out_expects_every_member_once() {
        let members: Vec<String> = (0..3)
            .map(|i| format!("u{i}@d1.loadtest.example"))
            .collect();
        let is_member = |_: u64, d: usize, to: &str| d == 1 && to.starts_with('u');
        let mut c = ContractChecker::new(
            RUN,
            2,
            Fan::Audience {
                audience: members.clone(),
                supersede: None,
            },
        );
        c.on_accepted(0, Some("ch"), Some(1), false, is_member);
        c.on_accepted(1, Some("ch"), Some(2), false, is_member);
        assert_eq!(c.outstanding(), 6);
        // One session, one seq, three recipients: three deliveries, none a duplicate.
        for m in &members {
            assert_eq!(
                c.on_received(1, &msg("ch", 1, 0, m), 0, is_member),
                Received::First { global: 0 }
            );
        }
        assert_eq!(
            c.on_received(1, &msg("ch", 1, 0, &members[0]), 0, is_member),
            Received::Duplicate
        );
        c.on_received(1, &msg("ch", 2, 1, &members[0]), 0, is_member);
        let r = c.report();
        assert_eq!(r.expected_deliveries, 6);
        assert_eq!((r.received_unique, r.lost, r.duplicates), (4, 2, 1));
        assert_eq!(r.lost_examples, vec![1]);
        assert!(!r.passed);
    }

    #[test]
    fn presence_missed_versions_followed_by_newer_are_not_loss() {
        let followers: Vec<String> = (0..2)
            .map(|i| format!("u{i}@d1.loadtest.example"))
            .collect();
        let ok = |_: u64, _: usize, _: &str| true;
        // Two publishers (users 7 and 8) take turns: events 0, 2 by 7; 1, 3 by 8.
        let mut c = ContractChecker::new(
            RUN,
            4,
            Fan::Audience {
                audience: followers.clone(),
                supersede: Some(vec![7, 8]),
            },
        );
        for g in 0..4 {
            c.on_accepted(g, Some("p"), Some(g + 1), false, ok);
        }
        let pres = |g: u64, sender: u32, to: &str| tagged("presence", "p", g + 1, g, sender, to);
        // Follower 0 misses 0 but gets 2 (publisher 7's newer); follower 1 gets 0 only.
        c.on_received(1, &pres(2, 7, &followers[0]), 0, ok);
        c.on_received(1, &pres(0, 7, &followers[1]), 0, ok);
        c.on_received(1, &pres(2, 7, &followers[1]), 0, ok);
        // Publisher 8: follower 0 gets 1 and 3; follower 1 gets 1 but misses 3, the newest.
        c.on_received(1, &pres(1, 8, &followers[0]), 0, ok);
        c.on_received(1, &pres(3, 8, &followers[0]), 0, ok);
        c.on_received(1, &pres(1, 8, &followers[1]), 0, ok);
        // A retried publish of event 1 came out as a newer version: a republish, no repeat.
        c.on_received(1, &pres(1, 8, &followers[0]), 0, ok);
        let mut again = pres(1, 8, &followers[0]);
        again.seq = 10;
        assert_eq!(c.on_received(1, &again, 0, ok), Received::Duplicate);
        let r = c.report();
        assert_eq!(r.superseded, 1, "{r:?}");
        assert_eq!(r.lost, 1, "{r:?}");
        assert_eq!(r.lost_examples, vec![3]);
        assert_eq!((r.republished, r.duplicates), (1, 1), "{r:?}");
        assert!(!r.passed);
    }

    #[test]
    fn foreign_and_error_events_are_counted_apart() {
        let mut c = ContractChecker::new(RUN, 1, Fan::One);
        accept(&mut c, 0, None, None);
        let mut other_run = msg("s", 1, 0, TO);
        other_run.text = other_run.text.map(|t| t.replacen(RUN, "zz", 1));
        assert_eq!(recv(&mut c, 1, &other_run), Received::Foreign);
        // Out of range message number.
        assert_eq!(recv(&mut c, 1, &msg("s", 3, 7, TO)), Received::Foreign);
        let err = DeliveredEvent {
            kind: "error".into(),
            ..Default::default()
        };
        assert_eq!(recv(&mut c, 0, &err), Received::Error);
        let r = c.report();
        assert_eq!((r.foreign, r.error_events, r.lost), (2, 1, 1));
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
