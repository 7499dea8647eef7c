//! What a run does: the scenario kind, the users and their peers, the open-loop arrival
//! schedule, the message tag that travels in each message's text, and duration parsing.
//!
//! Everything here is pure (no I/O) so it can be unit tested.

use std::fmt;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

/// The scenarios the harness knows. Each decides its workload: who sends what to whom, and in
/// which order.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum ScenarioKind {
    /// Pairs of users in different domains chat 1:1; every user sends to its fixed peer.
    OneToOne,
    /// One sender per channel posts to all of its members (default one channel of 1,000
    /// members spread over the domains): every post is one envelope with many recipients.
    FanOut,
    /// Publishers flap their presence (available, away, busy, do not disturb); each has every
    /// subscriber as a follower, so every update fans out to all of them.
    PresenceStorm,
    /// 1:1 pairs sending messages with edits, deletes, reactions and typing among them.
    Mixed,
    /// The mixed workload at a fixed rate for a long time (default 10 minutes), with the
    /// relay's memory sampled every second.
    Soak,
}

impl ScenarioKind {
    /// The name used on the command line and in output paths.
    pub fn name(self) -> &'static str {
        match self {
            ScenarioKind::OneToOne => "one-to-one",
            ScenarioKind::FanOut => "fan-out",
            ScenarioKind::PresenceStorm => "presence-storm",
            ScenarioKind::Mixed => "mixed",
            ScenarioKind::Soak => "soak",
        }
    }

    /// Builds the users and who talks to whom, for the HTTP edge or gRPC.
    pub fn workload(self, shape: &Shape) -> Result<Workload> {
        self.workload_over(shape, Protocol::Http)
    }

    /// Builds the users and who talks to whom when sending over `protocol`: over XMPP the
    /// senders are users of the remote XMPP domain (one-to-one only).
    pub fn workload_over(self, shape: &Shape, protocol: Protocol) -> Result<Workload> {
        if protocol == Protocol::Xmpp {
            return match self {
                ScenarioKind::OneToOne => Workload::inbound_pairs(shape.users, shape.domains),
                other => bail!("{other} does not run over xmpp (one-to-one does)"),
            };
        }
        match self {
            ScenarioKind::OneToOne => Workload::pairs(shape.users, shape.domains, false),
            ScenarioKind::Mixed | ScenarioKind::Soak => {
                Workload::pairs(shape.users, shape.domains, true)
            }
            ScenarioKind::FanOut => {
                Workload::channels(shape.channels, shape.members, shape.domains)
            }
            ScenarioKind::PresenceStorm => {
                Workload::presence(shape.publishers, shape.subscribers, shape.domains)
            }
        }
    }

    /// The protocols the scenario can be driven over.
    pub fn protocols(self) -> &'static [Protocol] {
        match self {
            ScenarioKind::OneToOne => &[Protocol::Http, Protocol::Grpc, Protocol::Xmpp],
            ScenarioKind::Mixed | ScenarioKind::Soak => &[Protocol::Http, Protocol::Grpc],
            // A channel post is one envelope with many recipients: edges make those, so the
            // harness plays the edge and delivers it over gRPC.
            ScenarioKind::FanOut => &[Protocol::Grpc],
            // Presence to "*" (the sender's followers) is an HTTP-edge event.
            ScenarioKind::PresenceStorm => &[Protocol::Http],
        }
    }

    /// The protocol used when none is asked for.
    pub fn default_protocol(self) -> Protocol {
        self.protocols()[0]
    }
}

impl fmt::Display for ScenarioKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How the harness sends.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Signed `POST /v1/events` on the HTTP edge.
    Http,
    /// Envelopes straight into `SessionService.Deliver` on a node's cluster gRPC listener, as
    /// an edge does.
    Grpc,
    /// `<message type='chat'>` stanzas from users of a remote XMPP domain, over
    /// server-to-server streams into the nodes' XMPP edge (one-to-one only).
    Xmpp,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Grpc => "grpc",
            Protocol::Xmpp => "xmpp",
        }
    }
}

/// The remote XMPP domain the harness plays by default.
pub const XMPP_DOMAIN: &str = "xmpp.load";

/// The sizes a workload is built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub domains: usize,
    /// 1:1 scenarios: users (paired, so users/2 sessions).
    pub users: usize,
    /// fan-out: channels, one sender each, and the members every channel has.
    pub channels: usize,
    pub members: usize,
    /// presence-storm: users who publish, and the followers each of them has.
    pub publishers: usize,
    pub subscribers: usize,
}

impl Default for Shape {
    fn default() -> Self {
        Self {
            domains: 4,
            users: 1000,
            channels: 1,
            members: 1000,
            publishers: 100,
            subscribers: 100,
        }
    }
}

/// The name of the `i`-th generated HTTP-edge domain.
pub fn domain_name(i: usize) -> String {
    format!("d{i}.loadtest.example")
}

/// One simulated user: the index of its domain and its local part number (`u<local>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct User {
    pub domain: usize,
    pub local: u32,
}

impl User {
    /// The local part sent as `from`.
    pub fn local_part(&self) -> String {
        format!("u{}", self.local)
    }
}

/// What one event does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// A text message (its text carries the [`Tag`]).
    Message,
    /// A correction of the sender's own earlier message `target` (new text carries the tag).
    Edit { target: u64 },
    /// A reaction to message `target` (the peer's).
    Reaction { target: u64 },
    /// The sender started typing.
    Typing,
    /// A retraction of the sender's own earlier message `target`.
    Delete { target: u64 },
    /// A presence update to all followers (its note carries the tag).
    Presence { availability: &'static str },
}

impl Action {
    /// The HTTP edge's event type.
    pub fn kind(self) -> &'static str {
        match self {
            Action::Message => "message",
            Action::Edit { .. } => "edit",
            Action::Reaction { .. } => "reaction",
            Action::Typing => "typing",
            Action::Delete { .. } => "delete",
            Action::Presence { .. } => "presence",
        }
    }

    /// The earlier message the action refers to.
    pub fn target(self) -> Option<u64> {
        match self {
            Action::Edit { target } | Action::Reaction { target } | Action::Delete { target } => {
                Some(target)
            }
            _ => None,
        }
    }
}

/// Event `i` of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub sender: usize,
    /// The sender's own event number.
    pub n: u64,
    pub action: Action,
    /// For fan-out, the channel posted in.
    pub channel: Option<usize>,
}

/// Who talks to whom.
#[derive(Debug, Clone)]
enum Pattern {
    /// `peer[u]` is the one user `u` sends to; `mixed` interleaves edits, reactions, typing
    /// and deletes with the messages.
    Pairs { peer: Vec<usize>, mixed: bool },
    /// Channel `k` has sender `senders[k]`; every channel has `audience` as its members.
    Channels { senders: Vec<usize> },
    /// Every publisher is followed by every user of `audience`.
    Presence { publishers: Vec<usize> },
}

/// The users of a run and who sends to whom.
#[derive(Debug, Clone)]
pub struct Workload {
    pub domains: usize,
    pub users: Vec<User>,
    /// The order in which users take turns sending (a permutation of the senders).
    pub send_order: Vec<usize>,
    /// `position[u]`: where user `u` is in `send_order` (`usize::MAX` for users who only
    /// receive).
    position: Vec<usize>,
    /// Channel members or presence followers (empty for pairs).
    pub audience: Vec<usize>,
    pattern: Pattern,
}

/// Hands out `u<n>` local parts per domain.
struct Locals(Vec<u32>);

impl Locals {
    fn take(&mut self, d: usize) -> User {
        let local = self.0[d];
        self.0[d] += 1;
        User { domain: d, local }
    }
}

/// Where `mixed` puts each kind of event in a sender's cycle of ten: six messages, an edit of
/// the sender's message three events before, a reaction to the peer's message one event before,
/// typing, and a delete of the sender's message one event before.
const MIXED_CYCLE: u64 = 10;

impl Workload {
    /// 1:1 pairs: `users / 2` sessions; session `k` is between users `2k` and `2k + 1`, whose
    /// domains cycle through every unordered pair of distinct domains so all federation links
    /// carry traffic. Senders take turns so that one direction of every session goes first,
    /// then the other.
    pub fn pairs(users: usize, domains: usize, mixed: bool) -> Result<Self> {
        if domains < 2 {
            bail!("1:1 scenarios need at least 2 domains (got {domains})");
        }
        if users < 2 {
            bail!("1:1 scenarios need at least 2 users (got {users})");
        }
        let sessions = users / 2;
        let mut domain_pairs = Vec::new();
        for a in 0..domains {
            for b in (a + 1)..domains {
                domain_pairs.push((a, b));
            }
        }
        let mut locals = Locals(vec![0; domains]);
        let mut out = Vec::with_capacity(sessions * 2);
        let mut peer = Vec::with_capacity(sessions * 2);
        for k in 0..sessions {
            let (a, b) = domain_pairs[k % domain_pairs.len()];
            out.push(locals.take(a));
            out.push(locals.take(b));
            peer.push(2 * k + 1);
            peer.push(2 * k);
        }
        let send_order: Vec<usize> = (0..sessions)
            .map(|k| 2 * k)
            .chain((0..sessions).map(|k| 2 * k + 1))
            .collect();
        Ok(Self::new(
            domains,
            out,
            send_order,
            Vec::new(),
            Pattern::Pairs { peer, mixed },
        ))
    }

    /// Inbound 1:1 from a remote domain: `users / 2` sessions; session `k` is between a user of
    /// the remote domain (domain index `domains`, one past the harness's own domains), who
    /// sends, and a user of domain `k % domains`, who receives. Every sender takes its turn
    /// once per round.
    pub fn inbound_pairs(users: usize, domains: usize) -> Result<Self> {
        if domains == 0 {
            bail!("inbound 1:1 needs at least one receiving domain");
        }
        if users < 2 {
            bail!("1:1 scenarios need at least 2 users (got {users})");
        }
        let sessions = users / 2;
        let mut locals = Locals(vec![0; domains + 1]);
        let mut out = Vec::with_capacity(sessions * 2);
        let mut peer = Vec::with_capacity(sessions * 2);
        for k in 0..sessions {
            out.push(locals.take(domains));
            out.push(locals.take(k % domains));
            peer.push(2 * k + 1);
            peer.push(2 * k);
        }
        let send_order: Vec<usize> = (0..sessions).map(|k| 2 * k).collect();
        Ok(Self::new(
            domains,
            out,
            send_order,
            Vec::new(),
            Pattern::Pairs { peer, mixed: false },
        ))
    }

    /// Whether user `u` belongs to the remote (XMPP) domain rather than one the harness plays.
    pub fn is_remote(&self, u: usize) -> bool {
        self.users.get(u).is_some_and(|x| x.domain >= self.domains)
    }

    /// Fan-out: `channels` senders in the first domain, and `members` users spread over all
    /// domains who are members of every channel.
    pub fn channels(channels: usize, members: usize, domains: usize) -> Result<Self> {
        if channels == 0 || members == 0 {
            bail!("fan-out needs at least one channel and one member");
        }
        let mut locals = Locals(vec![0; domains.max(1)]);
        let mut users: Vec<User> = (0..channels).map(|_| locals.take(0)).collect();
        let audience: Vec<usize> = (0..members)
            .map(|m| {
                users.push(locals.take(m % domains.max(1)));
                users.len() - 1
            })
            .collect();
        let senders: Vec<usize> = (0..channels).collect();
        Ok(Self::new(
            domains,
            users,
            senders.clone(),
            audience,
            Pattern::Channels { senders },
        ))
    }

    /// Presence: `publishers` users in the first domain, each followed by the same
    /// `subscribers` users of the other domains.
    pub fn presence(publishers: usize, subscribers: usize, domains: usize) -> Result<Self> {
        if domains < 2 {
            bail!("presence-storm needs at least 2 domains (got {domains})");
        }
        if publishers == 0 || subscribers == 0 {
            bail!("presence-storm needs at least one publisher and one subscriber");
        }
        let mut locals = Locals(vec![0; domains]);
        let mut users: Vec<User> = (0..publishers).map(|_| locals.take(0)).collect();
        let audience: Vec<usize> = (0..subscribers)
            .map(|s| {
                users.push(locals.take(1 + s % (domains - 1)));
                users.len() - 1
            })
            .collect();
        let publishers: Vec<usize> = (0..publishers).collect();
        Ok(Self::new(
            domains,
            users,
            publishers.clone(),
            audience,
            Pattern::Presence { publishers },
        ))
    }

    fn new(
        domains: usize,
        users: Vec<User>,
        send_order: Vec<usize>,
        audience: Vec<usize>,
        pattern: Pattern,
    ) -> Self {
        let mut position = vec![usize::MAX; users.len()];
        for (p, &u) in send_order.iter().enumerate() {
            position[u] = p;
        }
        Self {
            domains,
            users,
            send_order,
            position,
            audience,
            pattern,
        }
    }

    /// How many sessions the workload uses (1:1 sessions, channels, or presence publishers).
    pub fn sessions(&self) -> usize {
        match &self.pattern {
            Pattern::Pairs { peer, .. } => peer.len() / 2,
            Pattern::Channels { senders } => senders.len(),
            Pattern::Presence { publishers } => publishers.len(),
        }
    }

    /// Whether every event has many recipients (channel members, followers).
    pub fn is_fan_out(&self) -> bool {
        !matches!(self.pattern, Pattern::Pairs { .. })
    }

    /// Whether edits, reactions, typing and deletes are among the messages.
    pub fn is_mixed(&self) -> bool {
        matches!(self.pattern, Pattern::Pairs { mixed: true, .. })
    }

    /// Whether the events are presence updates.
    pub fn is_presence(&self) -> bool {
        matches!(self.pattern, Pattern::Presence { .. })
    }

    /// The 1:1 peer of `u` (pairs only).
    pub fn peer(&self, u: usize) -> Option<usize> {
        match &self.pattern {
            Pattern::Pairs { peer, .. } => peer.get(u).copied(),
            _ => None,
        }
    }

    /// The users event `i` is delivered to.
    pub fn recipients(&self, ev: &Event) -> &[usize] {
        match &self.pattern {
            Pattern::Pairs { peer, .. } => std::slice::from_ref(&peer[ev.sender]),
            _ => &self.audience,
        }
    }

    /// The global index of sender `u`'s event number `n`.
    pub fn global_of(&self, u: usize, n: u64) -> u64 {
        n * self.send_order.len() as u64 + self.position[u] as u64
    }

    /// Event `i`: who sends it, its sender's number, and what it does.
    pub fn event(&self, i: u64) -> Event {
        let senders = self.send_order.len() as u64;
        let sender = self.send_order[(i % senders) as usize];
        let n = i / senders;
        let (action, channel) = match &self.pattern {
            Pattern::Pairs { mixed: false, .. } => (Action::Message, None),
            Pattern::Pairs { peer, mixed: true } => {
                let action = match n % MIXED_CYCLE {
                    3 => Action::Edit {
                        target: self.global_of(sender, n - 3),
                    },
                    5 => Action::Reaction {
                        target: self.global_of(peer[sender], n - 1),
                    },
                    7 => Action::Typing,
                    9 => Action::Delete {
                        target: self.global_of(sender, n - 1),
                    },
                    _ => Action::Message,
                };
                (action, None)
            }
            Pattern::Channels { .. } => (Action::Message, Some(sender)),
            Pattern::Presence { .. } => {
                const STATES: [&str; 4] = ["available", "away", "busy", "do_not_disturb"];
                (
                    Action::Presence {
                        availability: STATES[(n % 4) as usize],
                    },
                    None,
                )
            }
        };
        Event {
            sender,
            n,
            action,
            channel,
        }
    }
}

/// Open-loop arrivals: message `i` is meant to be sent at `t0 + i / rate`, whatever happened to
/// the earlier ones. `warmup` comes first and is excluded from the statistics; then `duration`
/// is measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub rate: f64,
    pub warmup: Duration,
    pub duration: Duration,
}

impl Schedule {
    pub fn new(rate: f64, warmup: Duration, duration: Duration) -> Result<Self> {
        if !(rate.is_finite() && rate > 0.0) {
            bail!("rate must be a positive number of messages per second (got {rate})");
        }
        if duration.is_zero() {
            bail!("duration must be more than zero");
        }
        Ok(Self {
            rate,
            warmup,
            duration,
        })
    }

    /// Warmup plus the measured duration.
    pub fn total(&self) -> Duration {
        self.warmup + self.duration
    }

    /// How many messages the whole run sends: those with intended time `< total`.
    pub fn total_messages(&self) -> u64 {
        self.count_before(self.total())
    }

    /// Messages whose intended time is in the warmup.
    pub fn warmup_messages(&self) -> u64 {
        self.count_before(self.warmup)
    }

    /// The number of messages `i` with `intended_ns(i) < t`.
    fn count_before(&self, t: Duration) -> u64 {
        let t_ns = duration_ns(t);
        let estimate = (t.as_secs_f64() * self.rate).ceil();
        let mut c = if estimate <= 0.0 { 0 } else { estimate as u64 };
        // Correct float rounding at the edge so the count matches `intended_ns` exactly.
        while c > 0 && self.intended_ns(c - 1) >= t_ns {
            c -= 1;
        }
        while self.intended_ns(c) < t_ns {
            c += 1;
        }
        c
    }

    /// Intended send time of message `i`, in nanoseconds after `t0`.
    pub fn intended_ns(&self, i: u64) -> u64 {
        // f64 has 53 bits of mantissa: exact enough for any run we can do.
        ((i as f64) * 1e9 / self.rate).round() as u64
    }

    /// Whether a message meant to be sent at `intended_ns` falls in the measured window.
    pub fn is_measured(&self, intended_ns: u64) -> bool {
        let w = duration_ns(self.warmup);
        intended_ns >= w && intended_ns < w + duration_ns(self.duration)
    }
}

/// A duration in whole nanoseconds, saturating.
pub fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The identity of one sent message, carried in its text so that the receiver can tell which
/// message arrived and compute end-to-end latency from its *intended* send time.
///
/// Text format: `lt <run> <sender> <n> <global> <intended_ns>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tag {
    /// Random id of the run; messages of other runs are ignored.
    pub run: String,
    /// Sender user index.
    pub sender: u32,
    /// The sender's own message number.
    pub n: u64,
    /// Global message index (unique in the run).
    pub global: u64,
    /// Intended send time in ns after the run's `t0`.
    pub intended_ns: u64,
}

impl Tag {
    pub fn to_text(&self) -> String {
        format!(
            "lt {} {} {} {} {}",
            self.run, self.sender, self.n, self.global, self.intended_ns
        )
    }

    /// Parses a message text; `None` if it is not a load-test tag.
    pub fn parse(text: &str) -> Option<Self> {
        let mut it = text.split_ascii_whitespace();
        if it.next()? != "lt" {
            return None;
        }
        let run = it.next()?.to_owned();
        let sender = it.next()?.parse().ok()?;
        let n = it.next()?.parse().ok()?;
        let global = it.next()?.parse().ok()?;
        let intended_ns = it.next()?.parse().ok()?;
        if it.next().is_some() {
            return None;
        }
        Some(Self {
            run,
            sender,
            n,
            global,
            intended_ns,
        })
    }
}

/// Parses `500ms`, `2s`, `1.5s`, `3m`, `1h`, `250us`; a bare number means seconds.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        bail!("duration {s:?} has no number (examples: 500ms, 20s, 2m)");
    }
    let value: f64 = num
        .parse()
        .with_context(|| format!("duration {s:?}: {num:?} is not a number"))?;
    let secs = match unit.trim() {
        "" | "s" | "sec" | "secs" => value,
        "ms" => value / 1e3,
        "us" | "µs" => value / 1e6,
        "ns" => value / 1e9,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(anyhow!(
                "duration {s:?}: unknown unit {other:?} (ns, us, ms, s, m, h)"
            ));
        }
    };
    Duration::try_from_secs_f64(secs).with_context(|| format!("duration {s:?} out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    #[test]
    fn durations() -> Result<()> {
        assert_eq!(parse_duration("30s")?, Duration::from_secs(30));
        assert_eq!(parse_duration("20")?, Duration::from_secs(20));
        assert_eq!(parse_duration("500ms")?, Duration::from_millis(500));
        assert_eq!(parse_duration("1.5s")?, Duration::from_millis(1500));
        assert_eq!(parse_duration("2m")?, Duration::from_secs(120));
        assert_eq!(parse_duration("1h")?, Duration::from_secs(3600));
        assert_eq!(parse_duration("250us")?, Duration::from_micros(250));
        assert_eq!(parse_duration(" 0s ")?, Duration::ZERO);
        assert!(parse_duration("").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("10x").is_err());
        assert!(parse_duration("1.2.3s").is_err());
        assert!(parse_duration("-1s").is_err());
        Ok(())
    }

    #[test]
    fn schedule_is_fixed_and_evenly_spaced() -> Result<()> {
        let s = Schedule::new(2000.0, Duration::from_secs(2), Duration::from_secs(20))?;
        assert_eq!(s.total_messages(), 44_000);
        assert_eq!(s.warmup_messages(), 4_000);
        assert_eq!(s.intended_ns(0), 0);
        assert_eq!(s.intended_ns(1), 500_000);
        assert_eq!(s.intended_ns(2000), 1_000_000_000);
        assert_eq!(s.intended_ns(43_999), 21_999_500_000);
        // Every intended time of the run is before its end, and the next one is not.
        assert!(s.intended_ns(s.total_messages() - 1) < duration_ns(s.total()));
        assert!(s.intended_ns(s.total_messages()) >= duration_ns(s.total()));
        assert!(!s.is_measured(s.intended_ns(3_999)));
        assert!(s.is_measured(s.intended_ns(4_000)));
        assert!(s.is_measured(s.intended_ns(43_999)));
        assert!(!s.is_measured(s.intended_ns(44_000)));
        // Strictly increasing.
        for i in 0..10_000 {
            assert!(s.intended_ns(i + 1) > s.intended_ns(i));
        }
        Ok(())
    }

    #[test]
    fn schedule_fractional_rate() -> Result<()> {
        let s = Schedule::new(3.0, Duration::ZERO, Duration::from_secs(1))?;
        assert_eq!(s.total_messages(), 3);
        assert_eq!(s.intended_ns(1), 333_333_333);
        assert_eq!(s.intended_ns(2), 666_666_667);
        let s = Schedule::new(2.5, Duration::from_millis(500), Duration::from_secs(1))?;
        // i / 2.5 < 1.5  =>  i < 3.75  =>  i in 0..=3
        assert_eq!(s.total_messages(), 4);
        assert_eq!(s.warmup_messages(), 2);
        assert!(Schedule::new(0.0, Duration::ZERO, Duration::from_secs(1)).is_err());
        assert!(Schedule::new(f64::NAN, Duration::ZERO, Duration::from_secs(1)).is_err());
        assert!(Schedule::new(1.0, Duration::ZERO, Duration::ZERO).is_err());
        Ok(())
    }

    #[test]
    fn one_to_one_pairs_span_domains() -> Result<()> {
        let w = Workload::pairs(1000, 4, false)?;
        assert_eq!(w.users.len(), 1000);
        assert_eq!(w.sessions(), 500);
        let mut pairs = BTreeMap::new();
        for u in 0..w.users.len() {
            let p = w.peer(u).ok_or_else(|| anyhow!("no peer"))?;
            assert_eq!(w.peer(p), Some(u), "peers are symmetric");
            assert_ne!(
                w.users[u].domain, w.users[p].domain,
                "peers in different domains"
            );
            let (a, b) = (w.users[u].domain, w.users[p].domain);
            *pairs.entry((a.min(b), a.max(b))).or_insert(0usize) += 1;
        }
        assert_eq!(pairs.len(), 6, "all domain pairs carry traffic");
        // Users are unique (domain, local) addresses.
        let set: BTreeSet<_> = w.users.iter().map(|u| (u.domain, u.local)).collect();
        assert_eq!(set.len(), 1000);
        // Domains are roughly balanced.
        let mut per = [0usize; 4];
        for u in &w.users {
            per[u.domain] += 1;
        }
        assert!(per.iter().all(|&c| (240..=260).contains(&c)), "{per:?}");
        // Odd user counts drop the last user; too few domains/users are refused.
        assert_eq!(Workload::pairs(7, 3, false)?.users.len(), 6);
        assert!(Workload::pairs(10, 1, false).is_err());
        assert!(Workload::pairs(1, 2, false).is_err());
        Ok(())
    }

    #[test]
    fn inbound_pairs_send_from_the_remote_domain() -> Result<()> {
        let w = ScenarioKind::OneToOne.workload_over(
            &Shape {
                domains: 3,
                users: 12,
                ..Shape::default()
            },
            Protocol::Xmpp,
        )?;
        assert_eq!(w.users.len(), 12);
        assert_eq!(w.sessions(), 6);
        assert_eq!(w.send_order.len(), 6, "only the remote users send");
        let mut per = [0usize; 3];
        for i in 0..60 {
            let e = w.event(i);
            assert!(w.is_remote(e.sender));
            let &[r] = w.recipients(&e) else {
                bail!("one recipient");
            };
            assert!(!w.is_remote(r));
            per[w.users[r].domain] += 1;
            assert_eq!(w.global_of(e.sender, e.n), i);
        }
        assert_eq!(per, [20, 20, 20], "receivers spread over the domains");
        let remote: BTreeSet<_> = w
            .users
            .iter()
            .filter(|u| u.domain == 3)
            .map(|u| u.local)
            .collect();
        assert_eq!(remote.len(), 6, "distinct remote senders");
        assert!(
            ScenarioKind::Mixed
                .workload_over(&Shape::default(), Protocol::Xmpp)
                .is_err()
        );
        assert!(Workload::inbound_pairs(1, 2).is_err());
        assert!(Workload::inbound_pairs(4, 0).is_err());
        Ok(())
    }

    #[test]
    fn events_round_robin_over_senders() -> Result<()> {
        let w = Workload::pairs(6, 2, false)?;
        let senders: Vec<usize> = (0..6).map(|i| w.event(i).sender).collect();
        assert_eq!(senders, vec![0, 2, 4, 1, 3, 5]);
        let e = w.event(7);
        assert_eq!((e.sender, w.recipients(&e), e.n), (2, &[3usize][..], 1));
        // Every sender sends the same number of events per round, to its peer.
        let mut count = [0u64; 6];
        for i in 0..600 {
            let e = w.event(i);
            assert_eq!(w.recipients(&e), &[w.peer(e.sender).unwrap_or(99)]);
            assert_eq!(w.global_of(e.sender, e.n), i);
            count[e.sender] += 1;
        }
        assert!(count.iter().all(|&c| c == 100));
        Ok(())
    }

    #[test]
    fn mixed_cycle() -> Result<()> {
        let w = Workload::pairs(2, 2, true)?;
        let kinds: Vec<&str> = (0..20)
            .filter(|i| i % 2 == 0)
            .map(|i| w.event(i).action.kind())
            .collect();
        assert_eq!(
            kinds,
            vec![
                "message", "message", "message", "edit", "message", "reaction", "message",
                "typing", "message", "delete"
            ]
        );
        assert!(w.is_mixed() && !w.is_fan_out() && !w.is_presence());
        Ok(())
    }

    #[test]
    fn fan_out_and_presence_audiences() -> Result<()> {
        let w = Workload::channels(3, 10, 4)?;
        assert_eq!(w.users.len(), 13);
        assert_eq!(w.audience.len(), 10);
        assert_eq!(w.sessions(), 3);
        let e = w.event(4);
        assert_eq!((e.sender, e.channel, e.n), (1, Some(1), 1));
        assert_eq!(w.recipients(&e).len(), 10);
        assert!(w.users[..3].iter().all(|u| u.domain == 0));
        assert!(Workload::channels(0, 10, 2).is_err());

        let w = Workload::presence(2, 5, 3)?;
        assert_eq!(w.users.len(), 7);
        assert!(w.is_presence() && w.is_fan_out());
        assert!(
            w.audience.iter().all(|&u| w.users[u].domain != 0),
            "followers elsewhere"
        );
        let states: Vec<_> = (0..8).map(|i| w.event(i).action).collect();
        assert_eq!(
            states[0],
            Action::Presence {
                availability: "available"
            }
        );
        assert_eq!(
            states[2],
            Action::Presence {
                availability: "away"
            }
        );
        assert!(Workload::presence(1, 1, 1).is_err());
        Ok(())
    }

    #[test]
    fn tag_roundtrip_and_rejects() {
        let t = Tag {
            run: "ab12".into(),
            sender: 17,
            n: 42,
            global: 12345,
            intended_ns: 9_876_543_210,
        };
        let text = t.to_text();
        assert_eq!(text, "lt ab12 17 42 12345 9876543210");
        assert_eq!(Tag::parse(&text), Some(t));
        assert_eq!(Tag::parse("hello"), None);
        assert_eq!(Tag::parse("lt ab12 17 42 12345"), None);
        assert_eq!(Tag::parse("lt ab12 17 42 12345 1 extra"), None);
        assert_eq!(Tag::parse("lt ab12 x 42 12345 1"), None);
        assert_eq!(Tag::parse(""), None);
    }

    #[test]
    fn names() {
        assert_eq!(domain_name(3), "d3.loadtest.example");
        assert_eq!(
            User {
                domain: 0,
                local: 9
            }
            .local_part(),
            "u9"
        );
        assert_eq!(ScenarioKind::OneToOne.to_string(), "one-to-one");
        assert_eq!(ScenarioKind::PresenceStorm.to_string(), "presence-storm");
        assert_eq!(ScenarioKind::FanOut.protocols(), &[Protocol::Grpc]);
        assert_eq!(ScenarioKind::Mixed.default_protocol(), Protocol::Http);
        assert!(ScenarioKind::OneToOne.protocols().contains(&Protocol::Xmpp));
        assert!(!ScenarioKind::Mixed.protocols().contains(&Protocol::Xmpp));
        assert_eq!(Protocol::Xmpp.name(), "xmpp");
    }
}
