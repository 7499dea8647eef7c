//! Measurements: HDR latency histograms and their percentile summaries, the per-second time
//! series, CPU time of processes from `/proc/<pid>/stat`, and machine info.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest latency a histogram tracks, in microseconds (one hour); larger values saturate.
const MAX_US: u64 = 3_600_000_000;

/// A latency histogram in microseconds, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    make_histogram(3)
}

/// A coarser histogram for per-second buckets (2 significant digits, smaller).
fn new_small_histogram() -> Histogram<u64> {
    make_histogram(2)
}

fn make_histogram(sigfig: u8) -> Histogram<u64> {
    match Histogram::new_with_bounds(1, MAX_US, sigfig) {
        Ok(h) => h,
        // Constant, valid bounds: cannot fail.
        Err(e) => unreachable!("histogram bounds: {e}"),
    }
}

/// Records a latency in nanoseconds into a microsecond histogram.
pub fn record_ns(h: &mut Histogram<u64>, ns: u64) {
    h.saturating_record((ns / 1000).max(1));
}

/// The usual percentiles of a latency distribution, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

fn us_to_ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

impl Percentiles {
    /// Summarises a microsecond histogram; all zero when it is empty.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            mean: (h.mean() / 1000.0 * 1000.0).round() / 1000.0,
            p50: us_to_ms(h.value_at_quantile(0.50)),
            p90: us_to_ms(h.value_at_quantile(0.90)),
            p99: us_to_ms(h.value_at_quantile(0.99)),
            p999: us_to_ms(h.value_at_quantile(0.999)),
            max: us_to_ms(h.max()),
        }
    }
}

/// One point of a percentile curve (for the latency distribution plot).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct CurvePoint {
    /// In percent, e.g. 99.9.
    pub percentile: f64,
    pub latency_ms: f64,
}

/// The quantiles the percentile curve is sampled at, denser towards the tail.
pub fn curve_quantiles() -> Vec<f64> {
    let mut q: Vec<f64> = (0..=18).map(|i| f64::from(i) * 0.05).collect(); // 0 .. 0.90
    for nines in 1..=5 {
        let tail = 10f64.powi(-nines);
        for k in [1.0, 0.75, 0.5, 0.25] {
            q.push(1.0 - tail * k);
        }
    }
    q.push(1.0);
    q.dedup_by(|a, b| (*a - *b).abs() < 1e-12);
    q
}

/// The percentile curve of a histogram.
pub fn percentile_curve(h: &Histogram<u64>) -> Vec<CurvePoint> {
    if h.is_empty() {
        return Vec::new();
    }
    curve_quantiles()
        .into_iter()
        .map(|q| CurvePoint {
            percentile: (q * 100.0 * 1e6).round() / 1e6,
            latency_ms: us_to_ms(h.value_at_quantile(q)),
        })
        .collect()
}

/// Counters and latency percentiles of one second of the run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SecondPoint {
    /// Seconds since t0 (the start of this second).
    pub t: u64,
    /// Messages whose intended send time falls in this second.
    pub offered: u64,
    /// 202 answers received in this second.
    pub accepted: u64,
    /// Failed sends completed in this second.
    pub errors: u64,
    /// Messages first received in this second.
    pub received: u64,
    /// End-to-end latency of the messages received in this second, ms.
    pub e2e_p50_ms: f64,
    pub e2e_p90_ms: f64,
    pub e2e_p99_ms: f64,
    pub e2e_max_ms: f64,
    /// POST latency (intended send → 202) of the answers in this second, p99, ms.
    pub post_p99_ms: f64,
}

/// Per-second series, filled as events happen. Latency percentiles per second come from
/// histograms that are kept per second (2 significant digits).
#[derive(Debug, Default)]
pub struct TimeSeries {
    points: Vec<SecondPoint>,
    e2e: Vec<Option<Histogram<u64>>>,
    post: Vec<Option<Histogram<u64>>>,
}

impl TimeSeries {
    pub fn new() -> Self {
        Self::default()
    }

    fn slot(&mut self, ns: u64) -> usize {
        let s = usize::try_from(ns / 1_000_000_000).unwrap_or(usize::MAX);
        // Cap the series at a day to bound memory if a clock goes wild.
        let s = s.min(86_400);
        while self.points.len() <= s {
            let t = self.points.len() as u64;
            self.points.push(SecondPoint {
                t,
                ..Default::default()
            });
            self.e2e.push(None);
            self.post.push(None);
        }
        s
    }

    pub fn offered(&mut self, intended_ns: u64) {
        let s = self.slot(intended_ns);
        self.points[s].offered += 1;
    }

    pub fn accepted(&mut self, now_ns: u64, post_latency_ns: u64) {
        let s = self.slot(now_ns);
        self.points[s].accepted += 1;
        record_ns(
            self.post[s].get_or_insert_with(new_small_histogram),
            post_latency_ns,
        );
    }

    pub fn error(&mut self, now_ns: u64) {
        let s = self.slot(now_ns);
        self.points[s].errors += 1;
    }

    pub fn received(&mut self, now_ns: u64, e2e_ns: u64) {
        let s = self.slot(now_ns);
        self.points[s].received += 1;
        record_ns(self.e2e[s].get_or_insert_with(new_small_histogram), e2e_ns);
    }

    /// The series with per-second percentiles filled in.
    pub fn points(&self) -> Vec<SecondPoint> {
        self.points
            .iter()
            .zip(self.e2e.iter().zip(&self.post))
            .map(|(p, (e, q))| {
                let mut p = p.clone();
                if let Some(h) = e {
                    let s = Percentiles::of(h);
                    p.e2e_p50_ms = s.p50;
                    p.e2e_p90_ms = s.p90;
                    p.e2e_p99_ms = s.p99;
                    p.e2e_max_ms = s.max;
                }
                if let Some(h) = q {
                    p.post_p99_ms = Percentiles::of(h).p99;
                }
                p
            })
            .collect()
    }
}

/// User and system CPU time of a process, in clock ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTicks {
    pub utime: u64,
    pub stime: u64,
}

impl CpuTicks {
    pub fn total(&self) -> u64 {
        self.utime + self.stime
    }
}

/// Parses a `/proc/<pid>/stat` line. The command name (field 2) is in parentheses and may
/// hold spaces and parentheses itself, so fields are counted after the *last* `)`: utime and
/// stime are fields 14 and 15.
pub fn parse_proc_stat(line: &str) -> Result<CpuTicks> {
    let close = line
        .rfind(')')
        .ok_or_else(|| anyhow!("no ')' in /proc stat line"))?;
    let fields: Vec<&str> = line[close + 1..].split_ascii_whitespace().collect();
    // fields[0] is field 3 (state); field n is fields[n - 3].
    let get = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .ok_or_else(|| anyhow!("/proc stat line has no field {n}"))?
            .parse()
            .with_context(|| format!("/proc stat field {n} is not a number"))
    };
    Ok(CpuTicks {
        utime: get(14)?,
        stime: get(15)?,
    })
}

/// Reads the CPU ticks of `pid` (or of this process with `None`).
pub fn read_cpu(pid: Option<u32>) -> Result<CpuTicks> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let s = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_proc_stat(&s)
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 if that fails, as on all common Linux).
pub fn clock_ticks_per_sec() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t: &u64| t > 0)
        .unwrap_or(100)
}

/// CPU used by one process over the measured window.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct CpuUse {
    /// CPU-seconds (user + system) used in the window.
    pub cpu_seconds: f64,
    /// CPU-seconds divided by the window's wall time: how many cores it kept busy.
    pub cores: f64,
    /// CPU microseconds per message accepted in the window.
    pub us_per_message: f64,
}

/// CPU use from two tick readings.
pub fn cpu_use(
    before: CpuTicks,
    after: CpuTicks,
    ticks_per_sec: u64,
    window_secs: f64,
    messages: u64,
) -> CpuUse {
    let secs = after.total().saturating_sub(before.total()) as f64 / ticks_per_sec.max(1) as f64;
    CpuUse {
        cpu_seconds: secs,
        cores: if window_secs > 0.0 {
            secs / window_secs
        } else {
            0.0
        },
        us_per_message: if messages > 0 {
            secs * 1e6 / messages as f64
        } else {
            0.0
        },
    }
}

/// Peak resident set size (`VmHWM`) in KiB from a `/proc/<pid>/status` text.
pub fn parse_vm_hwm_kb(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_ascii_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Peak RSS of a process in KiB, if readable.
pub fn read_peak_rss_kb(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .as_deref()
        .and_then(parse_vm_hwm_kb)
}

/// `VmRSS:` of a `/proc/<pid>/status`, in kB.
pub fn parse_vm_rss_kb(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The resident memory of a process now.
pub fn read_rss_kb(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .as_deref()
        .and_then(parse_vm_rss_kb)
}

/// What the run ran on.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MachineInfo {
    pub nproc: usize,
    pub cpu_model: String,
    pub mem_total_kb: u64,
    pub kernel: String,
}

/// `model name` of the first CPU in a `/proc/cpuinfo` text.
pub fn parse_cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == "model name").then(|| v.trim().to_owned())
    })
}

/// `MemTotal` in KiB from a `/proc/meminfo` text.
pub fn parse_mem_total_kb(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_ascii_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn read(path: impl AsRef<Path>) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

impl MachineInfo {
    pub fn detect() -> Self {
        Self {
            nproc: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            cpu_model: parse_cpu_model(&read("/proc/cpuinfo")).unwrap_or_default(),
            mem_total_kb: parse_mem_total_kb(&read("/proc/meminfo")).unwrap_or(0),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
        }
    }
}

/// The soft limit on open files from a `/proc/self/limits` text.
pub fn parse_nofile_soft(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let rest = line.strip_prefix("Max open files")?;
    let soft = rest.split_ascii_whitespace().next()?;
    if soft == "unlimited" {
        Some(u64::MAX)
    } else {
        soft.parse().ok()
    }
}

/// This process's soft limit on open files, if readable.
pub fn nofile_soft_limit() -> Option<u64> {
    parse_nofile_soft(&read("/proc/self/limits"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_with_tricky_comm() -> Result<()> {
        // Real layout: pid (comm) state ppid pgrp session tty_nr tpgid flags minflt cminflt
        // majflt cmajflt utime stime ...
        let line = "1234 (relay (node) x) S 1 1234 1234 0 -1 4194560 5000 0 0 0 \
                    1520 310 0 0 20 0 8 0 12345 100000000 2000 18446744073709551615";
        let t = parse_proc_stat(line)?;
        assert_eq!(
            t,
            CpuTicks {
                utime: 1520,
                stime: 310
            }
        );
        assert_eq!(t.total(), 1830);
        assert!(parse_proc_stat("1234 relay S 1").is_err());
        assert!(parse_proc_stat("1234 (relay) S 1 2 3").is_err());
        assert!(parse_proc_stat("1 (a) S 1 1 1 0 -1 0 0 0 0 0 x 1").is_err());
        Ok(())
    }

    #[test]
    fn own_stat_is_readable() -> Result<()> {
        // /proc is there on Linux, where this harness runs.
        let t = read_cpu(None)?;
        assert!(t.total() < u64::MAX);
        Ok(())
    }

    #[test]
    fn cpu_use_math() {
        let u = cpu_use(
            CpuTicks {
                utime: 100,
                stime: 50,
            },
            CpuTicks {
                utime: 250,
                stime: 100,
            },
            100,
            4.0,
            1000,
        );
        assert!((u.cpu_seconds - 2.0).abs() < 1e-9);
        assert!((u.cores - 0.5).abs() < 1e-9);
        assert!((u.us_per_message - 2000.0).abs() < 1e-9);
        let z = cpu_use(CpuTicks::default(), CpuTicks::default(), 100, 0.0, 0);
        assert_eq!(z, CpuUse::default());
    }

    #[test]
    fn percentiles_of_known_distribution() {
        let mut h = new_histogram();
        // 1..=1000 ms, each once.
        for ms in 1..=1000u64 {
            record_ns(&mut h, ms * 1_000_000);
        }
        let p = Percentiles::of(&h);
        assert_eq!(p.count, 1000);
        let near = |a: f64, b: f64| (a - b).abs() <= b * 0.002 + 1e-9;
        assert!(near(p.p50, 500.0), "{p:?}");
        assert!(near(p.p90, 900.0), "{p:?}");
        assert!(near(p.p99, 990.0), "{p:?}");
        assert!(near(p.p999, 999.0), "{p:?}");
        assert!(near(p.max, 1000.0), "{p:?}");
        assert!(near(p.mean, 500.5), "{p:?}");
        assert_eq!(Percentiles::of(&new_histogram()), Percentiles::default());
        // Sub-microsecond values count as 1 µs, not lost.
        let mut h = new_histogram();
        record_ns(&mut h, 10);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn percentiles_serialize_with_stable_keys() -> Result<()> {
        let mut h = new_histogram();
        record_ns(&mut h, 2_000_000);
        let v = serde_json::to_value(Percentiles::of(&h))?;
        for k in ["count", "mean", "p50", "p90", "p99", "p999", "max"] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
        assert_eq!(v["count"], 1);
        assert_eq!(v["p99"], 2.0);
        Ok(())
    }

    #[test]
    fn curve_is_monotonic_and_ends_at_max() {
        let q = curve_quantiles();
        assert!(q.windows(2).all(|w| w[0] < w[1]), "{q:?}");
        assert_eq!(q.first().copied(), Some(0.0));
        assert_eq!(q.last().copied(), Some(1.0));
        let mut h = new_histogram();
        for us in 1..=100_000u64 {
            h.saturating_record(us);
        }
        let c = percentile_curve(&h);
        assert!(c.windows(2).all(|w| w[0].latency_ms <= w[1].latency_ms));
        assert!(c.iter().any(|p| (p.percentile - 99.9).abs() < 1e-9));
        assert_eq!(c.last().map(|p| p.latency_ms), Some(us_to_ms(h.max())));
    }

    #[test]
    fn time_series_buckets_by_second() {
        let mut ts = TimeSeries::new();
        ts.offered(0);
        ts.offered(999_999_999);
        ts.offered(1_000_000_000);
        ts.accepted(1_500_000_000, 3_000_000);
        ts.error(2_100_000_000);
        for i in 0..100 {
            ts.received(2_000_000_000 + i, (i + 1) * 1_000_000);
        }
        let p = ts.points();
        assert_eq!(p.len(), 3);
        assert_eq!(p.iter().map(|x| x.t).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(p[0].offered, 2);
        assert_eq!(p[1].offered, 1);
        assert_eq!(p[1].accepted, 1);
        assert!((p[1].post_p99_ms - 3.0).abs() < 0.05);
        assert_eq!(p[2].errors, 1);
        assert_eq!(p[2].received, 100);
        assert!((p[2].e2e_p99_ms - 99.0).abs() < 1.0, "{:?}", p[2]);
        assert!((p[2].e2e_max_ms - 100.0).abs() < 1.0);
        assert_eq!(p[0].e2e_p99_ms, 0.0);
    }

    #[test]
    fn proc_text_parsers() {
        let cpuinfo = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\nmodel name\t: other\n";
        assert_eq!(
            parse_cpu_model(cpuinfo).as_deref(),
            Some("Intel(R) Xeon(R) CPU @ 2.20GHz")
        );
        assert_eq!(parse_cpu_model("processor : 0\n"), None);
        let meminfo = "MemTotal:       24589712 kB\nMemFree:         1000 kB\n";
        assert_eq!(parse_mem_total_kb(meminfo), Some(24_589_712));
        assert_eq!(
            parse_vm_hwm_kb("Name:\trelay\nVmHWM:\t   51234 kB\n"),
            Some(51_234)
        );
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(parse_nofile_soft(limits), Some(1024));
        assert_eq!(
            parse_nofile_soft(
                "Max open files            unlimited            unlimited            files\n"
            ),
            Some(u64::MAX)
        );
    }
}
