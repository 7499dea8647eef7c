//! What a run does: the scenario kind, the users and their peers, the open-loop arrival
//! schedule, the message tag that travels in each message's text, and duration parsing.
//!
//! Everything here is pure (no I/O) so it can be unit tested.

use std::fmt;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

/// The scenarios the harness knows. New ones (channel fan-out, presence storm, mixed, soak)
/// become new variants; each decides its workload and which message index goes where.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScenarioKind {
    /// Pairs of users in different domains chat 1:1; every user sends to its fixed peer.
    OneToOne,
}

impl ScenarioKind {
    /// The name used on the command line and in output paths.
    pub fn name(self) -> &'static str {
        match self {
            ScenarioKind::OneToOne => "one-to-one",
        }
    }

    /// Builds the users and who talks to whom.
    pub fn workload(self, users: usize, domains: usize) -> Result<Workload> {
        match self {
            ScenarioKind::OneToOne => Workload::one_to_one(users, domains),
        }
    }
}

impl fmt::Display for ScenarioKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
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

/// The users of a run and each one's fixed peer.
#[derive(Debug, Clone)]
pub struct Workload {
    pub domains: usize,
    pub users: Vec<User>,
    /// `peer[u]` is the user `u` sends to.
    pub peer: Vec<usize>,
    /// The order in which users take turns sending (a permutation of `0..users.len()`).
    pub send_order: Vec<usize>,
}

impl Workload {
    /// `users / 2` sessions; session `k` is between users `2k` and `2k + 1`, whose domains cycle
    /// through every unordered pair of distinct domains so all federation links carry traffic.
    /// Senders take turns so that one direction of every session goes first, then the other.
    pub fn one_to_one(users: usize, domains: usize) -> Result<Self> {
        if domains < 2 {
            bail!("one-to-one needs at least 2 domains (got {domains})");
        }
        if users < 2 {
            bail!("one-to-one needs at least 2 users (got {users})");
        }
        let sessions = users / 2;
        let mut domain_pairs = Vec::new();
        for a in 0..domains {
            for b in (a + 1)..domains {
                domain_pairs.push((a, b));
            }
        }
        let mut next_local = vec![0u32; domains];
        let mut take = |d: usize| {
            let local = next_local[d];
            next_local[d] += 1;
            User { domain: d, local }
        };
        let mut out = Vec::with_capacity(sessions * 2);
        let mut peer = Vec::with_capacity(sessions * 2);
        for k in 0..sessions {
            let (a, b) = domain_pairs[k % domain_pairs.len()];
            out.push(take(a));
            out.push(take(b));
            peer.push(2 * k + 1);
            peer.push(2 * k);
        }
        let send_order = (0..sessions)
            .map(|k| 2 * k)
            .chain((0..sessions).map(|k| 2 * k + 1))
            .collect();
        Ok(Self {
            domains,
            users: out,
            peer,
            send_order,
        })
    }

    /// How many 1:1 sessions the workload opens.
    pub fn sessions(&self) -> usize {
        self.users.len() / 2
    }

    /// Sender, recipient and the sender's own message number for message `i`.
    pub fn message(&self, i: u64) -> (usize, usize, u64) {
        let n = self.send_order.len() as u64;
        let sender = self.send_order[(i % n) as usize];
        (sender, self.peer[sender], i / n)
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
        let w = Workload::one_to_one(1000, 4)?;
        assert_eq!(w.users.len(), 1000);
        assert_eq!(w.sessions(), 500);
        let mut pairs = BTreeMap::new();
        for (u, &p) in w.peer.iter().enumerate() {
            assert_eq!(w.peer[p], u, "peers are symmetric");
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
        assert_eq!(Workload::one_to_one(7, 3)?.users.len(), 6);
        assert!(Workload::one_to_one(10, 1).is_err());
        assert!(Workload::one_to_one(1, 2).is_err());
        Ok(())
    }

    #[test]
    fn messages_round_robin_over_senders() -> Result<()> {
        let w = Workload::one_to_one(6, 2)?;
        let senders: Vec<usize> = (0..6).map(|i| w.message(i).0).collect();
        assert_eq!(senders, vec![0, 2, 4, 1, 3, 5]);
        let (s, r, n) = w.message(7);
        assert_eq!((s, r, n), (2, 3, 1));
        // Every sender sends the same number of messages per round.
        let mut count = [0u64; 6];
        for i in 0..600 {
            let (s, r, _) = w.message(i);
            assert_eq!(w.peer[s], r);
            count[s] += 1;
        }
        assert!(count.iter().all(|&c| c == 100));
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
    }
}
