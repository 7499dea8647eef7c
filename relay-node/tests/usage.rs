//! Usage accounting against a real redis-server: exact message counts, unique users within
//! HyperLogLog error, no loss and no double counting across Redis failures, months across a
//! year boundary, and the memory backend answering like Redis.
//!
//! Unique users from Redis are estimates: they must be within 2 % of the exact number, or
//! within 1 when 2 % is less than 1.

use anyhow::{Context, Result, bail, ensure};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use relay_node::control::usage::{
    Counts, DEFAULT_RETENTION_DAYS, StaticSides, Usage, UsageAggregator, UsageConfig, UsageReport,
    UsageStore,
};
use session_actor::MetadataEntry;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use test_support::{RedisServer, wait_for};

const MS_PER_DAY: i64 = 86_400_000;
const T: Duration = Duration::from_secs(15);

fn manager(url: &str, response_timeout: Duration) -> Result<ConnectionManager> {
    let client = redis::Client::open(url)?;
    let cfg = ConnectionManagerConfig::new()
        .set_response_timeout(Some(response_timeout))
        .set_connection_timeout(Some(Duration::from_millis(500)))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(200));
    Ok(ConnectionManager::new_lazy_with_config(client, cfg)?)
}

fn aggregator() -> UsageAggregator {
    UsageAggregator::new(
        Arc::new(StaticSides::new(["contoso.com", "fabrikam.com"])),
        UsageConfig::default(),
    )
}

/// Days since the epoch of a date (proleptic Gregorian), for seeding.
fn day(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468
}

fn entry(
    day: i64,
    category: &'static str,
    from: String,
    from_platform: &str,
    to: Vec<String>,
    to_platform: &str,
) -> MetadataEntry {
    MetadataEntry {
        at_ms: day * MS_PER_DAY + 12 * 3_600_000,
        session_id: None,
        relay_msg_id: "r".into(),
        sender: from,
        sender_platform: from_platform.into(),
        receivers: to,
        receiver_platform: to_platform.into(),
        category,
        kind: "message".into(),
    }
}

/// The traffic of a day, `k` = 0, 1, 2 (see `expected_traffic` for what it amounts to).
fn traffic(d: i64, k: usize) -> Vec<MetadataEntry> {
    let mut out = Vec::new();
    for i in 0..200 {
        out.push(entry(
            d,
            "im",
            format!("c{}@contoso.com", (i + 50 * k) % 300),
            "teams",
            vec![format!("p{}@partner.org", i % 120)],
            "xmpp",
        ));
    }
    for i in 0..30 {
        out.push(entry(
            d,
            "presence",
            format!("f{i}@fabrikam.com"),
            "sip",
            vec![format!("o{i}@other.net"), format!("o{}@other.net", i + 1)],
            "http",
        ));
    }
    for _ in 0..10 {
        out.push(entry(
            d,
            "typing",
            "c0@contoso.com".into(),
            "teams",
            vec!["C1@Contoso.com".into()],
            "teams",
        ));
    }
    for i in 0..5 {
        out.push(entry(
            d,
            "error",
            format!("x{}@evil{i}.example", k * 5 + i),
            "xmpp",
            vec!["c0@contoso.com".into()],
            "teams",
        ));
    }
    out
}

/// Days of `traffic`: two in March 2025, one in April.
fn traffic_days() -> [i64; 3] {
    [day(2025, 3, 30), day(2025, 3, 31), day(2025, 4, 1)]
}

fn c(messages: u64, errors: u64, unique_users: u64) -> Counts {
    Counts {
        messages,
        errors,
        unique_users,
    }
}

fn map(items: &[(&str, Counts)]) -> BTreeMap<String, Counts> {
    items.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// What `traffic` over `traffic_days` must give, worked out by hand: per day 200 im (contoso
/// c[50k..50k+200) mod 300 to partner p0..p119), 30 presence (fabrikam f0..f29 to two of
/// other.net o0..o30), 10 typing (c0 to c1, both internal), 5 refusals (x.. at evilN to c0).
fn expected_traffic() -> (Usage, Usage, Usage) {
    let per_evil = |n| c(0, n, 0);
    let march = Usage {
        messages: 480,
        errors: 10,
        // contoso c0..c249, partner 120, fabrikam 30, other.net 31.
        unique_users: 250 + 120 + 30 + 31,
        by_type: map(&[
            ("im", c(400, 0, 250 + 120)),
            ("presence", c(60, 0, 61)),
            ("typing", c(20, 0, 2)),
            ("error", c(0, 10, 11)),
        ]),
        internal_domains: map(&[
            ("contoso.com", c(420, 10, 250)),
            ("fabrikam.com", c(60, 0, 30)),
        ]),
        external_domains: map(&[
            ("partner.org", c(400, 0, 120)),
            ("other.net", c(60, 0, 31)),
            ("evil0.example", per_evil(2)),
            ("evil1.example", per_evil(2)),
            ("evil2.example", per_evil(2)),
            ("evil3.example", per_evil(2)),
            ("evil4.example", per_evil(2)),
        ]),
        platforms: map(&[
            ("teams", c(420, 10, 250)),
            ("xmpp", c(400, 10, 120)),
            ("sip", c(60, 0, 30)),
            ("http", c(60, 0, 31)),
        ]),
    };
    let april = Usage {
        messages: 240,
        errors: 5,
        // contoso c100..c299 and c0, c1 (typing).
        unique_users: 202 + 120 + 30 + 31,
        by_type: map(&[
            ("im", c(200, 0, 200 + 120)),
            ("presence", c(30, 0, 61)),
            ("typing", c(10, 0, 2)),
            ("error", c(0, 5, 6)),
        ]),
        internal_domains: map(&[
            ("contoso.com", c(210, 5, 202)),
            ("fabrikam.com", c(30, 0, 30)),
        ]),
        external_domains: map(&[
            ("partner.org", c(200, 0, 120)),
            ("other.net", c(30, 0, 31)),
            ("evil0.example", per_evil(1)),
            ("evil1.example", per_evil(1)),
            ("evil2.example", per_evil(1)),
            ("evil3.example", per_evil(1)),
            ("evil4.example", per_evil(1)),
        ]),
        platforms: map(&[
            ("teams", c(210, 5, 202)),
            ("xmpp", c(200, 5, 120)),
            ("sip", c(30, 0, 30)),
            ("http", c(30, 0, 31)),
        ]),
    };
    let total = Usage {
        messages: 720,
        errors: 15,
        unique_users: 300 + 120 + 30 + 31,
        by_type: map(&[
            ("im", c(600, 0, 300 + 120)),
            ("presence", c(90, 0, 61)),
            ("typing", c(30, 0, 2)),
            ("error", c(0, 15, 16)),
        ]),
        internal_domains: map(&[
            ("contoso.com", c(630, 15, 300)),
            ("fabrikam.com", c(90, 0, 30)),
        ]),
        external_domains: map(&[
            ("partner.org", c(600, 0, 120)),
            ("other.net", c(90, 0, 31)),
            ("evil0.example", per_evil(3)),
            ("evil1.example", per_evil(3)),
            ("evil2.example", per_evil(3)),
            ("evil3.example", per_evil(3)),
            ("evil4.example", per_evil(3)),
        ]),
        platforms: map(&[
            ("teams", c(630, 15, 300)),
            ("xmpp", c(600, 15, 120)),
            ("sip", c(90, 0, 30)),
            ("http", c(90, 0, 31)),
        ]),
    };
    (march, april, total)
}

/// Whether an estimate of `exact` distinct users is within the stated HyperLogLog bound.
fn close(estimate: u64, exact: u64) -> bool {
    let tolerance = (exact * 2).div_ceil(100).max(1);
    estimate.abs_diff(exact) <= tolerance
}

fn check_counts(what: &str, got: &Counts, want: &Counts) -> Result<()> {
    ensure!(
        got.messages == want.messages && got.errors == want.errors,
        "{what}: got {got:?}, want {want:?}"
    );
    ensure!(
        close(got.unique_users, want.unique_users),
        "{what}: {} unique users, want {} (±2 %, ±1)",
        got.unique_users,
        want.unique_users
    );
    Ok(())
}

/// `got` has exactly `want`'s counts and values, and unique users within the bound.
fn check_usage(what: &str, got: &Usage, want: &Usage) -> Result<()> {
    check_counts(
        what,
        &c(got.messages, got.errors, got.unique_users),
        &c(want.messages, want.errors, want.unique_users),
    )?;
    let dims = [
        ("type", &got.by_type, &want.by_type),
        ("internal", &got.internal_domains, &want.internal_domains),
        ("external", &got.external_domains, &want.external_domains),
        ("platform", &got.platforms, &want.platforms),
    ];
    for (dim, g, w) in dims {
        ensure!(
            g.keys().eq(w.keys()),
            "{what} {dim}: values {:?}, want {:?}",
            g.keys().collect::<Vec<_>>(),
            w.keys().collect::<Vec<_>>()
        );
        for (value, wc) in w {
            check_counts(&format!("{what} {dim} {value}"), &g[value], wc)?;
        }
    }
    Ok(())
}

fn check_report(got: &UsageReport, want: &UsageReport) -> Result<()> {
    ensure!(
        (&got.first_day, &got.last_day) == (&want.first_day, &want.last_day),
        "window {}..{}, want {}..{}",
        got.first_day,
        got.last_day,
        want.first_day,
        want.last_day
    );
    let labels = |r: &UsageReport| -> Vec<(String, String, String)> {
        r.periods
            .iter()
            .map(|p| (p.period.clone(), p.first_day.clone(), p.last_day.clone()))
            .collect()
    };
    ensure!(labels(got) == labels(want), "periods {:?}", labels(got));
    for (g, w) in got.periods.iter().zip(&want.periods) {
        check_usage(&g.period, &g.usage, &w.usage)?;
    }
    check_usage("total", &got.total, &want.total)
}

fn feed(a: &UsageAggregator) {
    for (k, d) in traffic_days().into_iter().enumerate() {
        for e in traffic(d, k) {
            a.add(&e);
        }
    }
}

#[tokio::test]
async fn counts_are_exact_and_unique_users_within_hyperloglog_error() -> Result<()> {
    let redis = RedisServer::start()?;
    let store = UsageStore::redis(
        manager(&redis.url(), Duration::from_secs(2))?,
        "fr",
        DEFAULT_RETENTION_DAYS,
    );
    let a = aggregator();
    feed(&a);
    a.flush(&store).await?;
    ensure!(a.pending_users() == 0);

    let report = store.report("2025-04-01", 2).await?;
    let (march, april, total) = expected_traffic();
    ensure!(report.first_day == "2025-03-01" && report.last_day == "2025-04-01");
    let labels: Vec<_> = report.periods.iter().map(|p| p.period.as_str()).collect();
    ensure!(labels == ["2025-03", "2025-04"], "{labels:?}");
    check_usage("2025-03", &report.periods[0].usage, &march)?;
    check_usage("2025-04", &report.periods[1].usage, &april)?;
    check_usage("total", &report.total, &total)?;

    // JSON and CSV carry the same numbers.
    let json = serde_json::to_value(&report)?;
    ensure!(json["periods"][0]["period"] == "2025-03", "{json}");
    ensure!(json["periods"][0]["messages"] == 480 && json["periods"][0]["errors"] == 10);
    ensure!(json["total"]["internal_domains"]["contoso.com"]["messages"] == 630);
    let csv = report.to_csv();
    ensure!(csv.starts_with("period,dimension,value,messages,errors,unique_users\r\n"));
    let lines: Vec<&str> = csv.split("\r\n").collect();
    for prefix in [
        "2025-03,total,,480,10,",
        "2025-03,internal_domain,contoso.com,420,10,",
        "2025-04,type,error,0,5,",
        "2025-03-01/2025-04-01,platform,sip,90,0,",
    ] {
        ensure!(
            lines.iter().any(|l| l.starts_with(prefix)),
            "no CSV row {prefix:?} in\n{csv}"
        );
    }
    ensure!(
        lines.contains(&"2025-04,external_domain,evil0.example,0,1,0"),
        "{csv}"
    );
    // 1 header + per period and window: total, 4 types, 2 internal, 7 external, 4 platforms.
    ensure!(csv.lines().count() == 1 + 3 * 18, "{csv}");

    // Flushing again writes nothing more.
    a.flush(&store).await?;
    check_report(&store.report("2025-04-01", 2).await?, &report)?;
    Ok(())
}

#[tokio::test]
async fn a_flush_while_redis_is_down_loses_nothing_and_counts_nothing_twice() -> Result<()> {
    // Persistence on: what was written before the kill survives the restart.
    let mut redis = RedisServer::start_with(true)?;
    let store = UsageStore::redis(
        manager(&redis.url(), Duration::from_millis(500))?,
        "fr",
        DEFAULT_RETENTION_DAYS,
    );
    let a = aggregator();
    let [d0, d1, d2] = traffic_days();
    for e in traffic(d0, 0) {
        a.add(&e);
    }
    a.flush(&store).await?;

    redis.kill()?;
    for e in traffic(d1, 1) {
        a.add(&e);
    }
    ensure!(
        a.flush(&store).await.is_err(),
        "a flush with Redis down succeeded"
    );
    ensure!(a.pending_users() > 0);
    for e in traffic(d2, 2) {
        a.add(&e);
    }
    ensure!(a.flush(&store).await.is_err());

    redis.restart()?;
    wait_for("a flush after the restart", T, || async {
        a.flush(&store).await.ok()
    })
    .await?;
    ensure!(a.pending_users() == 0);

    let report = store.report("2025-04-01", 2).await?;
    let (march, april, total) = expected_traffic();
    check_usage("2025-03", &report.periods[0].usage, &march)?;
    check_usage("2025-04", &report.periods[1].usage, &april)?;
    check_usage("total", &report.total, &total)?;
    Ok(())
}

/// A Lua script that keeps Redis busy for `ms` milliseconds.
const BUSY: &str = "local s = redis.call('TIME') \
    local start = s[1] * 1000000 + s[2] \
    while true do \
      local t = redis.call('TIME') \
      if t[1] * 1000000 + t[2] - start > tonumber(ARGV[1]) * 1000 then break end \
    end \
    return 1";

#[tokio::test]
async fn a_write_applied_after_its_timeout_is_not_applied_again() -> Result<()> {
    let redis = RedisServer::start()?;
    let store = UsageStore::redis(
        manager(&redis.url(), Duration::from_millis(300))?,
        "fr",
        DEFAULT_RETENTION_DAYS,
    );
    let a = aggregator();
    let [d0, d1, _] = traffic_days();
    for e in traffic(d0, 0) {
        a.add(&e);
    }
    // Also loads the write script, so the write below is a single EVALSHA.
    a.flush(&store).await?;
    for e in traffic(d1, 1) {
        a.add(&e);
    }

    // Keep Redis busy: the write reaches it, times out here, and runs once Redis is free.
    let done = Arc::new(AtomicBool::new(false));
    let busy = {
        let url = redis.url();
        let done = done.clone();
        std::thread::spawn(move || -> Result<()> {
            let mut con = redis::Client::open(url)?.get_connection()?;
            let r: redis::RedisResult<i64> = redis::cmd("EVAL")
                .arg(BUSY)
                .arg(0)
                .arg(2_000)
                .query(&mut con);
            done.store(true, Ordering::SeqCst);
            r.context("busy script")?;
            Ok(())
        })
    };
    let probe = manager(&redis.url(), Duration::from_millis(50))?;
    wait_for("redis to be busy", T, || {
        let mut probe = probe.clone();
        async move {
            let r: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut probe).await;
            r.is_err().then_some(())
        }
    })
    .await?;
    ensure!(
        a.flush(&store).await.is_err(),
        "the write did not time out (Redis was not busy long enough)"
    );
    wait_for("the busy script to end", T, || async {
        done.load(Ordering::SeqCst).then_some(())
    })
    .await?;
    match busy.join() {
        Ok(r) => r?,
        Err(_) => bail!("busy thread panicked"),
    }

    // Redis ran the timed-out write after all: the report has both days already.
    let messages = |r: &UsageReport| r.periods[0].usage.messages;
    let report = wait_for("the late write to land", T, || async {
        let r = store.report("2025-03-31", 1).await.ok()?;
        (messages(&r) == 480).then_some(r)
    })
    .await?;
    // The retry sends the same batch again: Redis recognises it.
    wait_for("the retried flush", T, || async {
        a.flush(&store).await.ok()
    })
    .await?;
    ensure!(a.pending_users() == 0);
    let again = store.report("2025-03-31", 1).await?;
    ensure!(
        again == report,
        "the retry changed the counts: {} messages, want 480",
        messages(&again)
    );
    let (march, _, _) = expected_traffic();
    check_usage("2025-03", &again.periods[0].usage, &march)?;
    Ok(())
}

#[tokio::test]
async fn twelve_months_across_a_year_boundary_in_order() -> Result<()> {
    let redis = RedisServer::start()?;
    let conn = manager(&redis.url(), Duration::from_secs(2))?;
    let store = UsageStore::redis(conn.clone(), "fr", DEFAULT_RETENTION_DAYS);
    let memory = UsageStore::memory(DEFAULT_RETENTION_DAYS);
    let a = aggregator();
    let m = aggregator();
    let im = |d: i64, from: &str, to: &str| {
        entry(
            d,
            "im",
            from.to_string(),
            "teams",
            vec![to.to_string()],
            "xmpp",
        )
    };
    let mut entries = Vec::new();
    // Month j (0 = February 2024 ... 11 = January 2025): j + 1 messages from u<j> to p<j>,
    // and one from s to p0.
    let months = (0..12).map(|j| (2024 + (j + 1) / 12, (j + 1) % 12 + 1));
    for (j, (y, mo)) in months.enumerate() {
        let d = day(y, mo, 15);
        for _ in 0..=j {
            entries.push(im(
                d,
                &format!("u{j}@contoso.com"),
                &format!("p{j}@partner.org"),
            ));
        }
        entries.push(im(d, "s@contoso.com", "p0@partner.org"));
    }
    // On the end day: counted. Before the window and after the end day: not.
    entries.push(im(day(2025, 1, 20), "late@contoso.com", "p0@partner.org"));
    entries.push(im(day(2024, 1, 31), "before@contoso.com", "p0@partner.org"));
    entries.push(im(day(2025, 1, 21), "after@contoso.com", "p0@partner.org"));
    for e in &entries {
        a.add(e);
        m.add(e);
    }
    a.flush(&store).await?;
    m.flush(&memory).await?;

    let report = store.report("2025-01-20", 12).await?;
    let labels: Vec<&str> = report.periods.iter().map(|p| p.period.as_str()).collect();
    ensure!(
        labels
            == [
                "2024-02", "2024-03", "2024-04", "2024-05", "2024-06", "2024-07", "2024-08",
                "2024-09", "2024-10", "2024-11", "2024-12", "2025-01"
            ],
        "{labels:?}"
    );
    ensure!(report.first_day == "2024-02-01" && report.last_day == "2025-01-20");
    ensure!(
        report.periods[0].last_day == "2024-02-29" && report.periods[11].last_day == "2025-01-20"
    );
    for (j, p) in report.periods.iter().enumerate() {
        let j = j as u64;
        let (messages, users) = match j {
            11 => (j + 3, 5),
            0 => (j + 2, 3),
            _ => (j + 2, 4),
        };
        ensure!(
            p.usage.messages == messages && close(p.usage.unique_users, users),
            "{}: {} messages, {} users; want {messages}, {users}",
            p.period,
            p.usage.messages,
            p.usage.unique_users
        );
    }
    // u0..u11, p0..p11, s, late.
    ensure!(
        report.total.messages == 91 && close(report.total.unique_users, 26),
        "{:?}",
        report.total
    );
    check_report(&report, &memory.report("2025-01-20", 12).await?)?;

    // Past months are cached as merged sets; a report from the cache says the same.
    let mut c = conn.clone();
    let cached: bool = redis::cmd("EXISTS")
        .arg("fr:{usage}:2024-06:merged")
        .query_async(&mut c)
        .await?;
    ensure!(cached, "2024-06 was not cached");
    ensure!(store.report("2025-01-20", 12).await? == report);

    // A late write into a cached month drops its cache, and the next report counts it.
    let late = im(day(2024, 6, 10), "latecomer@contoso.com", "p4@partner.org");
    a.add(&late);
    m.add(&late);
    a.flush(&store).await?;
    m.flush(&memory).await?;
    let cached: bool = redis::cmd("EXISTS")
        .arg("fr:{usage}:2024-06:merged")
        .query_async(&mut c)
        .await?;
    ensure!(!cached, "the late write left 2024-06's cache in place");
    let after = store.report("2025-01-20", 12).await?;
    let june = &after.periods[4];
    ensure!(
        june.period == "2024-06" && june.usage.messages == 7 && close(june.usage.unique_users, 5),
        "{june:?}"
    );
    ensure!(after.total.messages == 92 && close(after.total.unique_users, 27));
    check_report(&after, &memory.report("2025-01-20", 12).await?)?;
    // Cached again, with the late write in its sums: read from the cache, the same report.
    let sums: std::collections::HashMap<String, i64> = redis::cmd("HGETALL")
        .arg("fr:{usage}:2024-06:msgs")
        .query_async(&mut c)
        .await?;
    ensure!(sums.get("all::im") == Some(&7), "{sums:?}");
    ensure!(store.report("2025-01-20", 12).await? == after);
    Ok(())
}

#[tokio::test]
async fn the_memory_backend_reports_like_redis() -> Result<()> {
    let redis = RedisServer::start()?;
    let store = UsageStore::redis(
        manager(&redis.url(), Duration::from_secs(2))?,
        "fr",
        DEFAULT_RETENTION_DAYS,
    );
    let memory = UsageStore::memory(DEFAULT_RETENTION_DAYS);
    let (a, m) = (aggregator(), aggregator());
    feed(&a);
    feed(&m);
    a.flush(&store).await?;
    m.flush(&memory).await?;
    let from_redis = store.report("2025-04-01", 3).await?;
    let from_memory = memory.report("2025-04-01", 3).await?;
    check_report(&from_redis, &from_memory)?;
    // Memory is exact: it matches the hand-worked numbers to the user.
    let (march, april, total) = expected_traffic();
    ensure!(from_memory.periods[0].usage == Usage::default());
    ensure!(from_memory.periods[1].usage == march);
    ensure!(from_memory.periods[2].usage == april);
    ensure!(from_memory.total == total);
    Ok(())
}

#[tokio::test]
async fn the_flusher_writes_periodically_and_once_more_when_stopped() -> Result<()> {
    let redis = RedisServer::start()?;
    let store = UsageStore::redis(
        manager(&redis.url(), Duration::from_secs(2))?,
        "fr",
        DEFAULT_RETENTION_DAYS,
    );
    let now_ms = i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis())?;
    let today = now_ms.div_euclid(MS_PER_DAY);
    let msg = |i: usize| {
        entry(
            today,
            "im",
            format!("u{i}@contoso.com"),
            "teams",
            vec!["bob@partner.org".into()],
            "http",
        )
    };

    let a = aggregator();
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let task = a
        .clone()
        .spawn_flusher(store.clone(), Duration::from_millis(50), stop_rx);
    for i in 0..10 {
        a.add(&msg(i));
    }
    wait_for("the periodic flush", T, || async {
        let r = store.today().await.ok()?;
        (r.total.messages == 10).then_some(())
    })
    .await?;
    let _ = stop.send(true);
    task.await?;

    // With an interval far longer than the test, only the flush at stop can write.
    let b = aggregator();
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let task = b
        .clone()
        .spawn_flusher(store.clone(), Duration::from_secs(3_600), stop_rx);
    for i in 10..15 {
        b.add(&msg(i));
    }
    let _ = stop.send(true);
    task.await?;
    let r = store.today().await?;
    ensure!(r.periods.len() == 1 && r.periods[0].period == r.first_day);
    ensure!(
        r.total.messages == 15 && close(r.total.unique_users, 16),
        "{:?}",
        r.total
    );
    Ok(())
}
