//! Output: `result.json`, the SVG plots (latency over time, throughput over time, latency
//! distribution), the human summary, and `compare` of two results.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::contract::ContractReport;
use crate::driver::DriverStats;
use crate::live::RetryStats;
use crate::receiver::ReceiverStats;
use crate::stats::{CpuUse, CurvePoint, MachineInfo, Percentiles, SecondPoint};

/// The configuration a run used.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RunConfig {
    pub rate: f64,
    pub users: usize,
    pub sessions: usize,
    pub domains: usize,
    pub duration_s: f64,
    pub warmup_s: f64,
    /// `redis` or `memory` for the embedded system, `null` for `--target`.
    pub store: Option<String>,
    pub receive: String,
    pub max_inflight: usize,
    pub drain_timeout_s: f64,
    pub request_timeout_s: f64,
    /// `embedded`, or the `--target` URL.
    pub target: String,
    /// `http` or `grpc`.
    #[serde(default)]
    pub protocol: String,
    /// Relay nodes at the start (embedded), or targets given.
    #[serde(default)]
    pub nodes: usize,
    /// Recipients of every event (1 for 1:1; channel members or followers).
    #[serde(default)]
    pub recipients_per_event: usize,
    /// How long a failed send was retried, s.
    #[serde(default)]
    pub retry_for_s: f64,
    /// `--protocol xmpp`: the server-to-server streams the stanzas went over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xmpp_streams: Option<usize>,
}

/// Message counts of a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Counts {
    pub planned: u64,
    pub dispatched: u64,
    pub accepted: u64,
    /// Accepted messages whose intended time is in the measured window.
    pub accepted_measured: u64,
    pub send_errors_total: u64,
    /// Failed sends by HTTP status (`"503"`) or kind (`"timeout"`, `"connect_error"`, ...).
    pub send_errors: BTreeMap<String, u64>,
    pub received_unique: u64,
    /// First receipts that happened inside the measured window.
    pub received_in_window: u64,
    /// 202 answers flagged `"duplicate": true`.
    pub duplicate_flagged_202: u64,
    /// Seconds from the last answered POST until everything accepted had arrived (or the drain
    /// timeout).
    pub drain_s: f64,
    pub drain_timed_out: bool,
}

/// Rates over the measured window.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Throughput {
    pub offered_per_s: f64,
    pub accepted_per_s: f64,
    pub received_per_s: f64,
}

/// Latency distributions over the measured window, in ms.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    /// Intended send time → received.
    pub end_to_end: Percentiles,
    /// Intended send time → 202.
    pub post: Percentiles,
}

/// CPU use over the measured window.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CpuReport {
    pub window_s: f64,
    /// Accepted messages of the window (the divisor of `us_per_message`).
    pub messages: u64,
    pub relay: Option<CpuUse>,
    pub redis: Option<CpuUse>,
    pub harness: Option<CpuUse>,
    pub relay_peak_rss_kb: Option<u64>,
}

/// Everything `result.json` holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RunResult {
    pub scenario: String,
    pub run_id: String,
    pub started_at_unix_ms: u64,
    /// The delivery contract held (see `contract`).
    pub passed: bool,
    pub config: RunConfig,
    pub machine: MachineInfo,
    pub counts: Counts,
    pub contract: ContractReport,
    pub throughput: Throughput,
    pub latency_ms: Latency,
    pub cpu: CpuReport,
    pub driver: DriverStats,
    pub receivers: ReceiverStats,
    /// Per-second series over the whole run (warmup, measured window, drain).
    pub series: Vec<SecondPoint>,
    /// End-to-end latency by percentile, for the distribution plot.
    pub percentile_curve: Vec<CurvePoint>,
    /// Things the harness adjusted or noticed (e.g. a lowered in-flight cap).
    #[serde(default)]
    pub warnings: Vec<String>,
    /// Sends that failed and were tried again.
    #[serde(default)]
    pub retries: RetryStats,
    /// Nodes killed or added during the run.
    #[serde(default)]
    pub faults: Vec<FaultEvent>,
    /// The relay nodes' resident memory, sampled every second.
    #[serde(default)]
    pub memory: Vec<MemoryPoint>,
    /// Seconds spent setting up before sending (presence: the contact requests and answers).
    #[serde(default)]
    pub setup_s: f64,
    /// The first node's `GET /cluster` at the end (members, sessions each hosts).
    #[serde(default)]
    pub cluster: Option<serde_json::Value>,
}

/// A node killed or added during a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FaultEvent {
    /// `kill` (SIGKILL) or `add`.
    pub kind: String,
    pub node: String,
    /// When, ms after sending started.
    pub at_ms: f64,
    /// `add`: how long until the new node was ready and a member on every node, ms.
    pub ready_after_ms: Option<f64>,
    /// `kill`: from the kill until the last send it disturbed was accepted again, ms (none
    /// when no send needed a retry).
    pub recovered_after_ms: Option<f64>,
}

/// One memory sample.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct MemoryPoint {
    /// Seconds after sending started.
    pub t_s: f64,
    /// Sum of the resident memory of the relay nodes alive, kB.
    pub relay_rss_kb: u64,
}

/// Writes `result.json` and the three SVG plots into `dir`.
pub fn write_all(dir: &Path, r: &RunResult) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write_json(&dir.join("result.json"), r)?;
    plot_latency_over_time(&dir.join("latency_over_time.svg"), r)?;
    plot_throughput(&dir.join("throughput.svg"), r)?;
    plot_distribution(&dir.join("latency_distribution.svg"), r)?;
    plot_memory(&dir.join("memory.svg"), r)?;
    Ok(())
}

/// Writes any serializable value as pretty JSON.
pub fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(v).context("encoding JSON")?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

fn plot_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("plotting: {e}")
}

const SIZE: (u32, u32) = (1000, 560);
const COLORS: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

/// Draws lines sharing one x axis (seconds or similar) on a linear chart.
fn line_chart(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[(&str, Vec<(f64, f64)>)],
    marker_x: Option<f64>,
) -> Result<()> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let xmax = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.0))
        .fold(1.0f64, f64::max);
    let ymax = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.1))
        .fold(0.0f64, f64::max);
    let ymax = if ymax > 0.0 { ymax * 1.1 } else { 1.0 };
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .draw()
        .map_err(plot_err)?;
    if let Some(x) = marker_x {
        chart
            .draw_series(LineSeries::new(
                vec![(x, 0.0), (x, ymax)],
                BLACK.mix(0.3).stroke_width(1),
            ))
            .map_err(plot_err)?
            .label("end of warmup")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.3)));
    }
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(plot_err)?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .draw()
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

fn per_second(r: &RunResult, f: impl Fn(&SecondPoint) -> f64) -> Vec<(f64, f64)> {
    r.series.iter().map(|p| (p.t as f64 + 0.5, f(p))).collect()
}

fn plot_latency_over_time(path: &Path, r: &RunResult) -> Result<()> {
    // Seconds without receipts have no latency: leave them out of the lines.
    let with_data: Vec<&SecondPoint> = r.series.iter().filter(|p| p.received > 0).collect();
    let pts = |f: fn(&SecondPoint) -> f64| -> Vec<(f64, f64)> {
        with_data.iter().map(|p| (p.t as f64 + 0.5, f(p))).collect()
    };
    line_chart(
        path,
        &format!(
            "{}: end-to-end latency per second ({} msg/s offered)",
            r.scenario, r.config.rate
        ),
        "seconds since start",
        "latency (ms)",
        &[
            ("p50", pts(|p| p.e2e_p50_ms)),
            ("p90", pts(|p| p.e2e_p90_ms)),
            ("p99", pts(|p| p.e2e_p99_ms)),
            ("max", pts(|p| p.e2e_max_ms)),
        ],
        Some(r.config.warmup_s),
    )
}

fn plot_throughput(path: &Path, r: &RunResult) -> Result<()> {
    line_chart(
        path,
        &format!("{}: throughput per second", r.scenario),
        "seconds since start",
        "events / s (deliveries / s)",
        &[
            ("offered", per_second(r, |p| p.offered as f64)),
            ("accepted", per_second(r, |p| p.accepted as f64)),
            ("deliveries", per_second(r, |p| p.received as f64)),
            ("send errors", per_second(r, |p| p.errors as f64)),
        ],
        Some(r.config.warmup_s),
    )
}

fn plot_memory(path: &Path, r: &RunResult) -> Result<()> {
    line_chart(
        path,
        &format!("{}: relay resident memory (all nodes)", r.scenario),
        "seconds since start",
        "MiB",
        &[(
            "relay RSS",
            r.memory
                .iter()
                .map(|m| (m.t_s, m.relay_rss_kb as f64 / 1024.0))
                .collect(),
        )],
        Some(r.config.warmup_s),
    )
}

/// The x position of a percentile on the distribution plot: the number of nines,
/// `-log10(1 - p/100)`, capped at 6.
pub fn nines(percentile: f64) -> f64 {
    let rest = 1.0 - percentile / 100.0;
    if rest <= 1e-6 { 6.0 } else { -rest.log10() }
}

/// The percentile at x position `x` of the distribution plot, as a label.
pub fn nines_label(x: f64) -> String {
    let p = 100.0 * (1.0 - 10f64.powf(-x));
    let s = format!("{p:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}%")
}

fn plot_distribution(path: &Path, r: &RunResult) -> Result<()> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let pts: Vec<(f64, f64)> = r
        .percentile_curve
        .iter()
        .map(|c| (nines(c.percentile), c.latency_ms))
        .collect();
    let ymax = pts.iter().map(|p| p.1).fold(0.0f64, f64::max);
    let ymax = if ymax > 0.0 { ymax * 1.1 } else { 1.0 };
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{}: end-to-end latency by percentile ({} msg/s)",
                r.scenario, r.config.rate
            ),
            ("sans-serif", 22),
        )
        .margin(15)
        .margin_right(45)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..6f64, 0f64..ymax)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .x_labels(7)
        .x_label_formatter(&|x| nines_label(*x))
        .draw()
        .map_err(plot_err)?;
    chart
        .draw_series(LineSeries::new(
            pts.iter().copied(),
            COLORS[0].stroke_width(2),
        ))
        .map_err(plot_err)?;
    chart
        .draw_series(pts.iter().map(|&p| Circle::new(p, 3, COLORS[0].filled())))
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

fn fmt_opt_cpu(c: &Option<CpuUse>) -> String {
    match c {
        Some(c) => format!(
            "{:>8.1} µs/msg  {:>5.2} cores  {:>7.2} s",
            c.us_per_message, c.cores, c.cpu_seconds
        ),
        None => "n/a".into(),
    }
}

/// The human summary printed at the end of a run.
pub fn summary_text(r: &RunResult) -> String {
    let mut s = String::new();
    let c = &r.config;
    let _ = writeln!(
        s,
        "scenario {}  run {}  target {}  nodes {}  protocol {}  store {}  receive {}",
        r.scenario,
        r.run_id,
        c.target,
        c.nodes,
        if c.protocol.is_empty() {
            "http"
        } else {
            &c.protocol
        },
        c.store.as_deref().unwrap_or("-"),
        c.receive
    );
    let _ = writeln!(
        s,
        "{} users / {} sessions over {} domains, {} recipient(s) per event, {} events/s for {}s after {}s warmup",
        c.users,
        c.sessions,
        c.domains,
        c.recipients_per_event.max(1),
        c.rate,
        c.duration_s,
        c.warmup_s
    );
    if r.setup_s > 0.01 {
        let _ = writeln!(s, "set-up {:.1}s", r.setup_s);
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "{:<22}{:>10}{:>10}{:>10}{:>10}{:>10}{:>10}",
        "latency (ms)", "p50", "p90", "p99", "p99.9", "max", "count"
    );
    for (name, p) in [
        ("end-to-end", &r.latency_ms.end_to_end),
        ("send → accepted", &r.latency_ms.post),
    ] {
        let _ = writeln!(
            s,
            "{:<22}{:>10.2}{:>10.2}{:>10.2}{:>10.2}{:>10.2}{:>10}",
            name, p.p50, p.p90, p.p99, p.p999, p.max, p.count
        );
    }
    let _ = writeln!(s);
    let t = &r.throughput;
    let _ = writeln!(
        s,
        "throughput (/s)       offered {:.1}  accepted {:.1}  deliveries {:.1}",
        t.offered_per_s, t.accepted_per_s, t.received_per_s
    );
    let n = &r.counts;
    let _ = writeln!(
        s,
        "events                planned {}  sent {}  accepted {}  deliveries {}/{}  send errors {}{}",
        n.planned,
        n.dispatched,
        n.accepted,
        n.received_unique,
        r.contract.expected_deliveries,
        n.send_errors_total,
        if n.send_errors.is_empty() {
            String::new()
        } else {
            format!(" {:?}", n.send_errors)
        }
    );
    let _ = writeln!(s, "cpu relay             {}", fmt_opt_cpu(&r.cpu.relay));
    let _ = writeln!(s, "cpu redis             {}", fmt_opt_cpu(&r.cpu.redis));
    let _ = writeln!(s, "cpu harness           {}", fmt_opt_cpu(&r.cpu.harness));
    if let Some(rss) = r.cpu.relay_peak_rss_kb {
        let _ = writeln!(s, "relay peak RSS        {:.1} MiB", rss as f64 / 1024.0);
    }
    if let (Some(first), Some(last)) = (r.memory.first(), r.memory.last()) {
        let peak = r.memory.iter().map(|m| m.relay_rss_kb).max().unwrap_or(0);
        let _ = writeln!(
            s,
            "relay RSS (all nodes)  {:.1} MiB at {:.0}s, {:.1} MiB at {:.0}s, peak {:.1} MiB",
            first.relay_rss_kb as f64 / 1024.0,
            first.t_s,
            last.relay_rss_kb as f64 / 1024.0,
            last.t_s,
            peak as f64 / 1024.0
        );
    }
    let rt = &r.retries;
    if rt.attempts > 0 {
        let _ = writeln!(
            s,
            "retries               {} attempts for {} events, {} accepted in the end, longest {:.0} ms",
            rt.attempts, rt.events, rt.recovered, rt.max_recovery_ms
        );
    }
    for f in &r.faults {
        let _ = match f.kind.as_str() {
            "kill" => writeln!(
                s,
                "fault                 kill -9 {} at {:.1}s; {}",
                f.node,
                f.at_ms / 1e3,
                match f.recovered_after_ms {
                    Some(ms) => format!(
                        "every send it disturbed accepted again {:.2}s later",
                        ms / 1e3
                    ),
                    None => "no send needed a retry".to_owned(),
                }
            ),
            _ => writeln!(
                s,
                "fault                 {} joined at {:.1}s, ready and a member everywhere {:.2}s later",
                f.node,
                f.at_ms / 1e3,
                f.ready_after_ms.unwrap_or(0.0) / 1e3
            ),
        };
    }
    let k = &r.contract;
    let _ = writeln!(
        s,
        "contract              {}  lost {}  duplicates {}  order violations {}  misrouted {}  id mismatches {}",
        if k.passed { "OK" } else { "FAILED" },
        k.lost,
        k.duplicates,
        k.order_violations,
        k.misrouted,
        k.id_mismatches
    );
    if k.error_events > 0
        || k.foreign > 0
        || k.received_unaccepted > 0
        || k.skipped > 0
        || k.superseded > 0
    {
        let _ = writeln!(
            s,
            "                      error events {}  foreign {}  received without acceptance {}  skipped {}  superseded {}",
            k.error_events, k.foreign, k.received_unaccepted, k.skipped, k.superseded
        );
    }
    if !k.lost_examples.is_empty() {
        let _ = writeln!(s, "                      lost e.g. {:?}", k.lost_examples);
    }
    if n.drain_timed_out {
        let _ = writeln!(s, "drain timed out after {:.1}s", n.drain_s);
    }
    for w in &r.warnings {
        let _ = writeln!(s, "warning: {w}");
    }
    s
}

/// One compared metric.
#[derive(Debug, Clone, PartialEq)]
pub struct CompareRow {
    pub metric: &'static str,
    pub a: Option<f64>,
    pub b: Option<f64>,
    /// B / A; `None` if either is missing or A is 0 (unless both are 0: then 1).
    pub ratio: Option<f64>,
}

/// The metrics `compare` shows, with their JSON pointers in `result.json`.
pub const COMPARE_METRICS: &[(&str, &str)] = &[
    ("offered msg/s", "/throughput/offered_per_s"),
    ("received msg/s", "/throughput/received_per_s"),
    ("accepted msg/s", "/throughput/accepted_per_s"),
    ("e2e p50 ms", "/latency_ms/end_to_end/p50"),
    ("e2e p90 ms", "/latency_ms/end_to_end/p90"),
    ("e2e p99 ms", "/latency_ms/end_to_end/p99"),
    ("e2e p99.9 ms", "/latency_ms/end_to_end/p999"),
    ("e2e max ms", "/latency_ms/end_to_end/max"),
    ("POST p50 ms", "/latency_ms/post/p50"),
    ("POST p99 ms", "/latency_ms/post/p99"),
    ("relay µs/msg", "/cpu/relay/us_per_message"),
    ("relay cores", "/cpu/relay/cores"),
    ("redis µs/msg", "/cpu/redis/us_per_message"),
    ("harness µs/msg", "/cpu/harness/us_per_message"),
    ("relay peak RSS KiB", "/cpu/relay_peak_rss_kb"),
    ("deliveries", "/contract/received_unique"),
    ("retried events", "/retries/events"),
    ("failover ms", "/faults/0/recovered_after_ms"),
    ("send errors", "/counts/send_errors_total"),
    ("lost", "/contract/lost"),
    ("duplicates", "/contract/duplicates"),
    ("order violations", "/contract/order_violations"),
];

/// B/A for each metric of two `result.json` values.
pub fn compare(a: &serde_json::Value, b: &serde_json::Value) -> Vec<CompareRow> {
    COMPARE_METRICS
        .iter()
        .map(|&(metric, ptr)| {
            let va = a.pointer(ptr).and_then(serde_json::Value::as_f64);
            let vb = b.pointer(ptr).and_then(serde_json::Value::as_f64);
            let ratio = match (va, vb) {
                (Some(x), Some(y)) if x == 0.0 && y == 0.0 => Some(1.0),
                (Some(x), Some(y)) if x != 0.0 => Some(y / x),
                _ => None,
            };
            CompareRow {
                metric,
                a: va,
                b: vb,
                ratio,
            }
        })
        .collect()
}

fn fmt_num(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(x) if x.fract() == 0.0 && x.abs() < 1e15 => format!("{x:.0}"),
        Some(x) => format!("{x:.3}"),
    }
}

/// The `compare` table.
pub fn compare_text(a_name: &str, b_name: &str, rows: &[CompareRow]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "A = {a_name}\nB = {b_name}\n");
    let _ = writeln!(s, "{:<22}{:>14}{:>14}{:>10}", "metric", "A", "B", "B/A");
    for r in rows {
        let ratio = match r.ratio {
            Some(x) => format!("{x:.3}"),
            None => "-".into(),
        };
        let _ = writeln!(
            s,
            "{:<22}{:>14}{:>14}{:>10}",
            r.metric,
            fmt_num(r.a),
            fmt_num(r.b),
            ratio
        );
    }
    s
}

/// `YYYYMMDD-HHMMSS` (UTC) of a Unix time, for default output directory names.
pub fn utc_stamp(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let rem = unix_secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> RunResult {
        let mut r = RunResult {
            scenario: "one-to-one".into(),
            run_id: "abc".into(),
            passed: true,
            ..Default::default()
        };
        r.config.rate = 2000.0;
        r.config.warmup_s = 2.0;
        r.config.receive = "stream".into();
        r.config.target = "embedded".into();
        r.throughput.received_per_s = 1999.5;
        r.latency_ms.end_to_end = Percentiles {
            count: 10,
            mean: 2.0,
            p50: 1.5,
            p90: 3.0,
            p99: 8.25,
            p999: 12.0,
            max: 20.0,
        };
        r.cpu.relay = Some(CpuUse {
            cpu_seconds: 4.0,
            cores: 0.2,
            us_per_message: 100.0,
        });
        r.contract.passed = true;
        r.series = (0..5)
            .map(|t| SecondPoint {
                t,
                offered: 2000,
                accepted: 2000,
                received: if t == 0 { 0 } else { 2000 },
                e2e_p99_ms: t as f64,
                ..Default::default()
            })
            .collect();
        r.percentile_curve = vec![
            CurvePoint {
                percentile: 50.0,
                latency_ms: 1.5,
            },
            CurvePoint {
                percentile: 99.0,
                latency_ms: 8.25,
            },
            CurvePoint {
                percentile: 100.0,
                latency_ms: 20.0,
            },
        ];
        r
    }

    #[test]
    fn result_json_has_the_documented_shape() -> Result<()> {
        let v = serde_json::to_value(sample())?;
        assert_eq!(v["latency_ms"]["end_to_end"]["p99"], 8.25);
        assert_eq!(v["latency_ms"]["end_to_end"]["p999"], 12.0);
        assert_eq!(v["throughput"]["received_per_s"], 1999.5);
        assert_eq!(v["cpu"]["relay"]["us_per_message"], 100.0);
        assert!(v["cpu"]["redis"].is_null());
        assert_eq!(v["config"]["rate"], 2000.0);
        for k in [
            "scenario",
            "run_id",
            "passed",
            "config",
            "machine",
            "counts",
            "contract",
            "throughput",
            "latency_ms",
            "cpu",
            "driver",
            "receivers",
            "series",
            "percentile_curve",
        ] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
        // And it reads back.
        let back: RunResult = serde_json::from_value(v)?;
        assert_eq!(back, sample());
        Ok(())
    }

    #[test]
    fn compare_ratios() {
        let a = json!({"throughput": {"received_per_s": 1000.0},
                       "latency_ms": {"end_to_end": {"p99": 10.0, "p50": 0.0}},
                       "contract": {"lost": 0}});
        let b = json!({"throughput": {"received_per_s": 1500.0},
                       "latency_ms": {"end_to_end": {"p99": 5.0, "p50": 2.0}},
                       "contract": {"lost": 0}});
        let rows = compare(&a, &b);
        let get = |m: &str| rows.iter().find(|r| r.metric == m).cloned();
        let r = get("received msg/s");
        assert_eq!(r.as_ref().and_then(|r| r.ratio), Some(1.5));
        assert_eq!(get("e2e p99 ms").and_then(|r| r.ratio), Some(0.5));
        // A = 0, B > 0: no ratio.
        assert_eq!(get("e2e p50 ms").and_then(|r| r.ratio), None);
        // Both zero: 1.
        assert_eq!(get("lost").and_then(|r| r.ratio), Some(1.0));
        // Missing in both.
        let missing = get("relay µs/msg");
        assert_eq!(
            missing.as_ref().map(|r| (r.a, r.b, r.ratio)),
            Some((None, None, None))
        );
        let text = compare_text("a.json", "b.json", &rows);
        assert!(text.contains("received msg/s"));
        assert!(text.contains("1.500"));
        assert_eq!(rows.len(), COMPARE_METRICS.len());
    }

    #[test]
    fn summary_mentions_the_numbers() {
        let mut r = sample();
        let s = summary_text(&r);
        assert!(s.contains("8.25"), "{s}");
        assert!(s.contains("contract              OK"), "{s}");
        r.contract.passed = false;
        r.contract.lost = 3;
        let s = summary_text(&r);
        assert!(s.contains("FAILED"));
        assert!(s.contains("lost 3"));
    }

    #[test]
    fn writes_json_and_svgs() -> Result<()> {
        let dir = tempfile::tempdir()?;
        write_all(dir.path(), &sample())?;
        for f in [
            "result.json",
            "latency_over_time.svg",
            "throughput.svg",
            "latency_distribution.svg",
        ] {
            let text = std::fs::read_to_string(dir.path().join(f))?;
            assert!(text.len() > 100, "{f} too small");
            if f.ends_with(".svg") {
                assert!(text.contains("<svg"), "{f}");
            }
        }
        let back: RunResult =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("result.json"))?)?;
        assert_eq!(back.latency_ms.end_to_end.p99, 8.25);
        // Empty results still plot.
        write_all(&dir.path().join("empty"), &RunResult::default())?;
        Ok(())
    }

    #[test]
    fn nines_axis() {
        assert!((nines(0.0) - 0.0).abs() < 1e-12);
        assert!((nines(90.0) - 1.0).abs() < 1e-9);
        assert!((nines(99.9) - 3.0).abs() < 1e-9);
        assert_eq!(nines(100.0), 6.0);
        assert_eq!(nines_label(2.0), "99%");
        assert_eq!(nines_label(3.0), "99.9%");
        assert_eq!(nines_label(0.0), "0%");
    }

    #[test]
    fn utc_stamps() {
        assert_eq!(utc_stamp(0), "19700101-000000");
        assert_eq!(utc_stamp(1_732_350_000), "20241123-082000");
        assert_eq!(utc_stamp(951_782_400), "20000229-000000");
    }
}
