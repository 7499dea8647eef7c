//! The live state of one run, shared by the driver's request tasks, the receivers and the
//! progress display: the contract checker, the HDR histograms and the time series, behind one
//! mutex that is never held across an `.await`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::contract::{ContractChecker, ContractReport, DeliveredEvent, Received};
use crate::plan::Plan;
use crate::scenario::duration_ns;
use crate::stats::{Percentiles, SecondPoint, TimeSeries, new_histogram, record_ns};

/// The 202 answer of `POST /v1/events`.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct Accepted {
    #[serde(default)]
    pub relay_msg_id: Option<String>,
    #[serde(default)]
    pub session_id: Option<String>,
    #[serde(default)]
    pub seq: Option<u64>,
    #[serde(default)]
    pub duplicate: bool,
}

struct LiveState {
    checker: ContractChecker,
    /// End-to-end latency (intended send → received) of measured messages, µs.
    e2e: Histogram<u64>,
    /// POST latency (intended send → 202) of measured messages, µs.
    post: Histogram<u64>,
    series: TimeSeries,
    send_errors: BTreeMap<String, u64>,
    send_errors_total: u64,
    dispatched: u64,
    accepted_measured: u64,
    received_in_window: u64,
    duplicate_flagged: u64,
    /// Relay ids of accepted messages that later events refer to (mixed).
    relay_ids: HashMap<u64, String>,
    retries: RetryStats,
    /// When each event that had to be retried first failed (ns after t0).
    first_failure: HashMap<u64, u64>,
    /// (first failure, acceptance) of every retried event that was accepted, ns after t0.
    recoveries: Vec<(u64, u64)>,
}

/// Sends that failed and were tried again (with fault injection or `--retry-for`).
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct RetryStats {
    /// Extra attempts made.
    pub attempts: u64,
    /// Events that needed at least one.
    pub events: u64,
    /// Of those, accepted in the end.
    pub recovered: u64,
    /// The longest time from an event's first failure to its acceptance, ms.
    pub max_recovery_ms: f64,
    /// When the last retried event was accepted, ms after the start of sending.
    pub last_recovered_at_ms: Option<f64>,
}

/// Numbers for the progress bar.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    pub dispatched: u64,
    pub accepted: u64,
    pub received: u64,
    pub errors: u64,
    pub e2e_p99_ms: f64,
}

/// Everything counted during the run, taken at its end.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub contract: ContractReport,
    pub e2e: Percentiles,
    pub post: Percentiles,
    pub e2e_curve: Vec<crate::stats::CurvePoint>,
    pub series: Vec<SecondPoint>,
    pub send_errors: BTreeMap<String, u64>,
    pub send_errors_total: u64,
    pub dispatched: u64,
    pub accepted_measured: u64,
    pub received_in_window: u64,
    /// 202 answers that said `"duplicate": true` (event ids are unique, so none expected
    /// unless a retry follows an acceptance whose answer was lost).
    pub duplicate_flagged: u64,
    pub retries: RetryStats,
    /// (first failure, acceptance) of every retried event that was accepted, ns after t0.
    pub recoveries: Vec<(u64, u64)>,
}

/// Shared state of one run.
pub struct Shared {
    pub plan: Arc<Plan>,
    /// When message 0 is meant to be sent.
    pub t0: Instant,
    state: Mutex<LiveState>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("run_id", &self.plan.run_id)
            .finish_non_exhaustive()
    }
}

impl Shared {
    pub fn new(plan: Arc<Plan>, t0: Instant) -> Arc<Self> {
        let total = plan.schedule.total_messages();
        let mut series = TimeSeries::new();
        for i in 0..total {
            series.offered(plan.schedule.intended_ns(i));
        }
        let checker = ContractChecker::new(plan.run_id.clone(), total, plan.fan());
        Arc::new(Self {
            plan,
            t0,
            state: Mutex::new(LiveState {
                checker,
                e2e: new_histogram(),
                post: new_histogram(),
                series,
                send_errors: BTreeMap::new(),
                send_errors_total: 0,
                dispatched: 0,
                accepted_measured: 0,
                received_in_window: 0,
                duplicate_flagged: 0,
                relay_ids: HashMap::new(),
                retries: RetryStats::default(),
                first_failure: HashMap::new(),
                recoveries: Vec::new(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, LiveState> {
        // A panic while holding the lock leaves counters that are still meaningful.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Nanoseconds since `t0` (0 before it).
    pub fn now_ns(&self) -> u64 {
        duration_ns(Instant::now().saturating_duration_since(self.t0))
    }

    fn in_window(&self, ns: u64) -> bool {
        self.plan.schedule.is_measured(ns)
    }

    pub fn on_dispatched(&self) {
        self.lock().dispatched += 1;
    }

    /// Event `global` was accepted (a 202, or an ok ack over gRPC).
    pub fn on_accepted(&self, global: u64, intended_ns: u64, a: &Accepted) {
        let mut s = self.lock();
        let now = self.now_ns();
        let lat = now.saturating_sub(intended_ns);
        if self.in_window(intended_ns) {
            record_ns(&mut s.post, lat);
            s.accepted_measured += 1;
        }
        s.series.accepted(now, lat);
        if a.duplicate {
            s.duplicate_flagged += 1;
        }
        if let Some(first) = s.first_failure.remove(&global) {
            s.recoveries.push((first, now));
            let r = &mut s.retries;
            r.recovered += 1;
            r.max_recovery_ms = r
                .max_recovery_ms
                .max(now.saturating_sub(first) as f64 / 1e6);
            let at = now as f64 / 1e6;
            r.last_recovered_at_ms = Some(r.last_recovered_at_ms.map_or(at, |x| x.max(at)));
        }
        let plan = &self.plan;
        if plan.is_target(global)
            && let Some(id) = &a.relay_msg_id
        {
            s.relay_ids.insert(global, id.clone());
        }
        let by_id = !plan.carries_tag(global);
        let resolved =
            s.checker
                .on_accepted(global, a.session_id.as_deref(), a.seq, by_id, |g, d, to| {
                    plan.is_recipient(g, d, to)
                });
        for (g, arrived) in resolved {
            self.record_delivery(&mut s, g, arrived);
        }
    }

    /// How the send of event `global` ended: accepted, not, or not yet (`None`).
    pub fn outcome(&self, global: u64) -> Option<bool> {
        self.lock().checker.outcome(global)
    }

    /// The relay id of accepted event `global`, for events that refer to it.
    pub fn relay_id(&self, global: u64) -> Option<String> {
        self.lock().relay_ids.get(&global).cloned()
    }

    /// Event `global` is not sent: what it refers to was not accepted.
    pub fn on_skipped(&self, global: u64) {
        self.lock().checker.on_skipped(global);
    }

    /// An attempt to send event `global` failed and it will be tried again.
    pub fn on_retry(&self, global: u64) {
        let mut s = self.lock();
        let now = self.now_ns();
        s.retries.attempts += 1;
        if let std::collections::hash_map::Entry::Vacant(e) = s.first_failure.entry(global) {
            e.insert(now);
            s.retries.events += 1;
        }
    }

    /// The send of event `global` failed for good; `label` is the status code or the kind of
    /// error.
    pub fn on_send_error(&self, global: u64, label: &str) {
        let mut s = self.lock();
        let now = self.now_ns();
        s.series.error(now);
        *s.send_errors.entry(label.to_owned()).or_insert(0) += 1;
        s.send_errors_total += 1;
        s.first_failure.remove(&global);
        s.checker.on_send_failed(global);
    }

    /// The relay refused event `global` after its send was answered (an XMPP stanza error):
    /// a send error labelled `label`, and no longer an event expected to arrive.
    pub fn on_refused(&self, global: u64, label: &str) {
        let mut s = self.lock();
        let now = self.now_ns();
        s.series.error(now);
        *s.send_errors.entry(label.to_owned()).or_insert(0) += 1;
        s.send_errors_total += 1;
        s.first_failure.remove(&global);
        if s.checker.outcome(global) == Some(true)
            && self.in_window(self.plan.schedule.intended_ns(global))
        {
            s.accepted_measured = s.accepted_measured.saturating_sub(1);
        }
        s.checker.on_refused(global);
    }

    /// An event arrived for domain `domain`.
    pub fn on_event(&self, domain: usize, ev: &DeliveredEvent) -> Received {
        let mut s = self.lock();
        let now = self.now_ns();
        let plan = &self.plan;
        let outcome = s
            .checker
            .on_received(domain, ev, now, |g, d, to| plan.is_recipient(g, d, to));
        if let Received::First { global } = outcome {
            self.record_delivery(&mut s, global, now);
        }
        outcome
    }

    fn record_delivery(&self, s: &mut LiveState, global: u64, arrived_ns: u64) {
        let intended_ns = self.plan.schedule.intended_ns(global);
        let e2e = arrived_ns.saturating_sub(intended_ns);
        if self.in_window(intended_ns) {
            record_ns(&mut s.e2e, e2e);
        }
        if self.in_window(arrived_ns) {
            s.received_in_window += 1;
        }
        s.series.received(arrived_ns, e2e);
    }

    /// Accepted messages not received yet.
    pub fn outstanding(&self) -> u64 {
        self.lock().checker.outstanding()
    }

    pub fn progress(&self) -> Progress {
        let s = self.lock();
        let (accepted, received) = s.checker.accepted_and_received();
        Progress {
            dispatched: s.dispatched,
            accepted,
            received,
            errors: s.send_errors_total,
            e2e_p99_ms: if s.e2e.is_empty() {
                0.0
            } else {
                s.e2e.value_at_quantile(0.99) as f64 / 1000.0
            },
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let s = self.lock();
        Snapshot {
            contract: s.checker.report(),
            e2e: Percentiles::of(&s.e2e),
            post: Percentiles::of(&s.post),
            e2e_curve: crate::stats::percentile_curve(&s.e2e),
            series: s.series.points(),
            send_errors: s.send_errors.clone(),
            send_errors_total: s.send_errors_total,
            dispatched: s.dispatched,
            accepted_measured: s.accepted_measured,
            received_in_window: s.received_in_window,
            duplicate_flagged: s.duplicate_flagged,
            retries: s.retries,
            recoveries: s.recoveries.clone(),
        }
    }

    /// When sending ends: `t0 + warmup + duration`.
    pub fn send_end(&self) -> Instant {
        self.t0 + self.plan.schedule.total()
    }

    /// When the measured window starts: `t0 + warmup`.
    pub fn window_start(&self) -> Instant {
        self.t0 + self.plan.schedule.warmup
    }

    pub fn window(&self) -> Duration {
        self.plan.schedule.duration
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::DomainSpec;
    use crate::scenario::{ScenarioKind, Schedule, domain_name};

    fn shared() -> anyhow::Result<Arc<Shared>> {
        let shape = crate::scenario::Shape {
            domains: 2,
            users: 2,
            ..Default::default()
        };
        let plan = Plan::new(
            "r".into(),
            (0..2)
                .map(|i| DomainSpec {
                    name: domain_name(i),
                    secret: "s".into(),
                })
                .collect(),
            ScenarioKind::OneToOne.workload(&shape)?,
            Schedule::new(1000.0, Duration::from_millis(1), Duration::from_secs(3600))?,
            0,
        );
        // t0 in the past so "now" lies in the measured window.
        let t0 = Instant::now()
            .checked_sub(Duration::from_secs(1))
            .unwrap_or_else(Instant::now);
        Ok(Shared::new(Arc::new(plan), t0))
    }

    #[test]
    fn accept_then_receive_records_latency_and_clears_outstanding() -> anyhow::Result<()> {
        let sh = shared()?;
        // Message 5 (measured: intended 5 ms > 1 ms warmup), message 0 (warmup).
        for g in [0u64, 5] {
            let intended = sh.plan.schedule.intended_ns(g);
            sh.on_dispatched();
            sh.on_accepted(
                g,
                intended,
                &Accepted {
                    relay_msg_id: None,
                    session_id: Some("s".into()),
                    seq: Some(g + 1),
                    duplicate: false,
                },
            );
        }
        assert_eq!(sh.outstanding(), 2);
        for g in [0u64, 5] {
            let ev = sh.plan.workload.event(g);
            let recipient = sh.plan.workload.recipients(&ev)[0];
            let domain = sh.plan.workload.users[recipient].domain;
            let ev = DeliveredEvent {
                session_id: "s".into(),
                seq: g + 1,
                kind: "message".into(),
                from: None,
                to: Some(sh.plan.address(recipient)),
                text: Some(sh.plan.tag(g).to_text()),
                note: None,
            };
            assert!(matches!(sh.on_event(domain, &ev), Received::First { .. }));
        }
        assert_eq!(sh.outstanding(), 0);
        let snap = sh.snapshot();
        assert!(snap.contract.passed, "{:?}", snap.contract);
        // Only the measured message counts in the histograms; ~1 s latency since t0 is 1 s ago.
        assert_eq!(snap.e2e.count, 1);
        assert_eq!(snap.post.count, 1);
        assert!(snap.e2e.p50 > 900.0, "{:?}", snap.e2e);
        assert_eq!(snap.accepted_measured, 1);
        assert_eq!(snap.received_in_window, 2);
        sh.on_send_error(7, "503");
        sh.on_send_error(8, "503");
        sh.on_send_error(9, "timeout");
        let snap = sh.snapshot();
        assert_eq!(snap.send_errors.get("503"), Some(&2));
        assert_eq!(snap.send_errors_total, 3);
        assert_eq!(sh.progress().errors, 3);
        Ok(())
    }

    #[test]
    fn a_refusal_after_acceptance_is_a_send_error() -> anyhow::Result<()> {
        let sh = shared()?;
        sh.on_accepted(5, sh.plan.schedule.intended_ns(5), &Accepted::default());
        assert_eq!(sh.outstanding(), 1);
        sh.on_refused(5, "xmpp_error:not-allowed");
        let snap = sh.snapshot();
        assert_eq!(sh.outstanding(), 0);
        assert_eq!(snap.send_errors.get("xmpp_error:not-allowed"), Some(&1));
        assert_eq!((snap.contract.accepted, snap.contract.send_failed), (0, 1));
        assert_eq!(snap.accepted_measured, 0);
        assert!(snap.contract.passed, "{:?}", snap.contract);
        Ok(())
    }

    #[test]
    fn retries_count_until_accepted() -> anyhow::Result<()> {
        let sh = shared()?;
        sh.on_retry(3);
        sh.on_retry(3);
        sh.on_retry(4);
        sh.on_accepted(3, sh.plan.schedule.intended_ns(3), &Accepted::default());
        sh.on_send_error(4, "503");
        let r = sh.snapshot().retries;
        assert_eq!((r.attempts, r.events, r.recovered), (3, 2, 1));
        assert!(r.last_recovered_at_ms.is_some_and(|t| t >= 1000.0), "{r:?}");
        assert!(r.max_recovery_ms >= 0.0);
        Ok(())
    }
}
