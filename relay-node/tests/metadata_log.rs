//! The metadata log against a real redis-server and an archive in a local directory (the
//! `object_store` file backend): days older than the Redis window are rotated into the
//! archive, queries and exports span both, pages join to the whole, a rotation cut short
//! duplicates nothing, retention deletes old days in both places, and a forgotten user is
//! pseudonymised everywhere.

use anyhow::{Context, Result, ensure};
use futures::StreamExt;
use relay_node::control::logstore::{Archive, LogQuery, LogReader};
use relay_node::control::metadata::{MetadataLog, day_of};
use session_actor::{MetadataEntry, MetadataSink, SessionId};
use test_support::RedisServer;

const DAY: i64 = 86_400_000;
const PER_DAY: i64 = 5;

fn entry(at_ms: i64, i: i64) -> MetadataEntry {
    let users = ["alice@a.example", "bob@b.example", "carol@a.example"];
    MetadataEntry {
        at_ms,
        session_id: SessionId::from_hex(&format!("{:032x}", i % 3)),
        relay_msg_id: format!("m{i}"),
        sender: users[(i % 3) as usize].into(),
        sender_platform: "http".into(),
        receivers: vec![format!("peer{}@partner.example", i % 2)],
        receiver_platform: "xmpp".into(),
        category: if i % 5 == 4 { "error" } else { "im" },
        kind: if i % 5 == 4 {
            "not_federated".into()
        } else {
            "message".into()
        },
    }
}

async fn all(
    reader: &LogReader,
    q: &LogQuery,
) -> Result<Vec<relay_node::control::logstore::LogEntry>> {
    let mut out = Vec::new();
    let mut q = q.clone();
    loop {
        let page = reader.query(&q).await?;
        out.extend(page.entries);
        match page.next_cursor {
            Some(c) => q.cursor = Some(c),
            None => return Ok(out),
        }
    }
}

fn query(from_ms: i64, to_ms: i64, limit: usize) -> Result<LogQuery> {
    Ok(LogQuery {
        from_ms,
        to_ms,
        limit,
        ..Default::default()
    }
    .checked()?)
}

async fn keys(redis: &RedisServer, pattern: &str) -> Result<Vec<String>> {
    let mut c = redis::Client::open(redis.url())?
        .get_multiplexed_async_connection()
        .await?;
    let mut k: Vec<String> = redis::cmd("KEYS").arg(pattern).query_async(&mut c).await?;
    k.sort();
    Ok(k)
}

#[tokio::test]
async fn rotated_days_and_redis_days_answer_one_query_retention_and_erasure_reach_both()
-> Result<()> {
    let redis = RedisServer::start()?;
    let conn = redis::Client::open(redis.url())?
        .get_connection_manager()
        .await?;
    let dir = tempfile::tempdir()?;
    let now = relay_node::edges::now_ms();
    let today = now.div_euclid(DAY);
    // Ten days of entries, five a day, at noon.
    let (log, _task) = MetadataLog::redis(conn.clone(), "fr", 30);
    let mut n = 0;
    for d in (0..10).rev() {
        for k in 0..PER_DAY {
            log.record(entry((today - d) * DAY + 12 * 3_600_000 + k, n));
            n += 1;
        }
    }
    log.flush().await;
    ensure!(keys(&redis, "fr:meta:*").await?.len() == 10);
    let archive_url = format!("file://{}", dir.path().display());
    let reader = LogReader::Redis {
        conn: conn.clone(),
        prefix: "fr".into(),
        archive: Some(Archive::open(&archive_url)?),
        window_days: 3,
        retention_days: 30,
    };
    let from = (today - 20) * DAY;
    let to = now + DAY;
    let before = all(&reader, &query(from, to, 1000)?).await?;
    ensure!(before.len() == 50, "{} entries", before.len());

    // Days up to three days ago go to the archive; their streams are deleted.
    let (rotated, deleted) = reader.maintain(now).await?;
    ensure!(
        (rotated, deleted) == (7, 0),
        "{rotated} rotated, {deleted} deleted"
    );
    let left = keys(&redis, "fr:meta:*").await?;
    let expect: Vec<String> = (0..3)
        .rev()
        .map(|d| format!("fr:meta:{}", day_of((today - d) * DAY)))
        .collect();
    ensure!(left == expect, "{left:?}");
    let d3 = day_of((today - 3) * DAY);
    let object = dir.path().join(format!(
        "meta/{}/{}/{}.ndjson",
        &d3[0..4],
        &d3[5..7],
        &d3[8..10]
    ));
    let text = std::fs::read_to_string(&object).with_context(|| object.display().to_string())?;
    ensure!(text.lines().count() == PER_DAY as usize, "{text}");

    // One query over both, in the same order; pages of 7 join to the same.
    let after = all(&reader, &query(from, to, 1000)?).await?;
    ensure!(after == before, "archive + Redis differ from Redis alone");
    let paged = all(&reader, &query(from, to, 7)?).await?;
    ensure!(paged == before, "pages of 7 differ");
    let first = reader.query(&query(from, to, 7)?).await?;
    ensure!(first.entries.len() == 7 && first.next_cursor.is_some());
    // Filters across both.
    for (f, want) in [
        ("domain", 50usize),
        ("user", 17),
        ("category", 10),
        ("session", 17),
    ] {
        let mut q = query(from, to, 1000)?;
        match f {
            "domain" => q.domain = Some("partner.example".into()),
            "user" => q.user = Some("alice@a.example".into()),
            "category" => q.category = Some("error".into()),
            _ => q.session = Some(format!("{:032x}", 0)),
        }
        let got = all(&reader, &q.checked()?).await?;
        ensure!(got.len() == want, "{f}: {} entries, want {want}", got.len());
    }
    // A time range inside one archived day.
    let one = all(
        &reader,
        &query((today - 5) * DAY, (today - 4) * DAY - 1, 1000)?,
    )
    .await?;
    ensure!(one.len() == PER_DAY as usize, "{}", one.len());

    // Exports equal the query.
    for csv in [true, false] {
        let mut body = String::new();
        let mut s = Box::pin(reader.clone().export(query(from, to, 1000)?, csv));
        while let Some(chunk) = s.next().await {
            body.push_str(std::str::from_utf8(&chunk?)?);
        }
        let lines: Vec<&str> = body.lines().collect();
        if csv {
            ensure!(
                lines.len() == 51 && lines[0].starts_with("at_ms,"),
                "{body}"
            );
            ensure!(lines[1..] == before.iter().map(|e| e.csv_row()).collect::<Vec<_>>()[..]);
        } else {
            let parsed: Vec<relay_node::control::logstore::LogEntry> = lines
                .iter()
                .map(|l| serde_json::from_str(l))
                .collect::<Result<_, _>>()?;
            ensure!(parsed == before, "ndjson differs");
        }
    }

    // A rotation cut short after the object was written leaves the day in both places: it is
    // read once, and the next rotation finishes it.
    let mut c = conn.clone();
    for e in before.iter().filter(|e| day_of(e.at_ms) == d3) {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(format!("fr:meta:{d3}")).arg("*");
        for (k, v) in [
            ("at", e.at_ms.to_string()),
            ("session", e.session.clone()),
            ("msg", e.msg.clone()),
            ("from", e.from.clone()),
            ("from_platform", e.from_platform.clone()),
            ("to", e.to.join(",")),
            ("to_platform", e.to_platform.clone()),
            ("category", e.category.clone()),
            ("kind", e.kind.clone()),
        ] {
            cmd.arg(k).arg(v);
        }
        cmd.query_async::<()>(&mut c).await?;
    }
    ensure!(
        all(&reader, &query(from, to, 1000)?).await? == before,
        "read twice"
    );
    ensure!(reader.maintain(now).await? == (1, 0));
    ensure!(all(&reader, &query(from, to, 1000)?).await? == before);
    ensure!(keys(&redis, "fr:meta:*").await?.len() == 3);

    // Erasure: alice becomes a pseudonym in the archive and in Redis, while another node's
    // rotation holds its lock (a key among the day streams).
    redis::cmd("SET")
        .arg("fr:meta:rotation-lock")
        .arg("another-node")
        .arg("PX")
        .arg(60_000)
        .query_async::<()>(&mut c)
        .await?;
    ensure!(
        reader.maintain(now).await? == (0, 0),
        "rotation runs on one node at a time"
    );
    let n = reader
        .pseudonymise("Alice@a.example", "forgotten-1234@a.example")
        .await?;
    ensure!(n == 17, "{n} rewritten");
    let mut q = query(from, to, 1000)?;
    q.user = Some("alice@a.example".into());
    ensure!(all(&reader, &q.clone().checked()?).await?.is_empty());
    q.user = Some("forgotten-1234@a.example".into());
    ensure!(all(&reader, &q.checked()?).await?.len() == 17);
    let mut archived = String::new();
    for e in walk(dir.path())? {
        archived.push_str(&std::fs::read_to_string(e)?);
    }
    ensure!(
        !archived.contains("alice@a.example"),
        "alice is still in the archive"
    );
    ensure!(all(&reader, &query(from, to, 1000)?).await?.len() == 50);
    redis::cmd("DEL")
        .arg("fr:meta:rotation-lock")
        .query_async::<()>(&mut c)
        .await?;

    // Retention: 25 days on, with 30 days kept, the five oldest days go, from the archive.
    let (rotated, deleted) = reader.maintain(now + 25 * DAY).await?;
    ensure!(
        rotated == 3 && deleted == 5,
        "{rotated} rotated, {deleted} deleted"
    );
    let kept = all(&reader, &query(from, now + 30 * DAY, 1000)?).await?;
    ensure!(kept.len() == 25, "{} kept", kept.len());
    ensure!(keys(&redis, "fr:meta:*").await?.is_empty());
    ensure!(walk(dir.path())?.len() == 5, "{:?}", walk(dir.path())?);
    Ok(())
}

fn walk(dir: &std::path::Path) -> Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            out.extend(walk(&p)?);
        } else {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}
