//! What survives what: Redis going away and coming back, and a SIGTERM under load.

mod common;

use anyhow::{Result, ensure};
use common::*;
use std::collections::HashSet;
use std::time::Duration;
use test_support::{RedisServer, RelayNode};

const T: Duration = Duration::from_secs(15);

#[tokio::test]
async fn redis_killed_between_messages_then_restarted_loses_nothing_acked() -> Result<()> {
    // AOF with fsync on every write: what Redis acknowledged survives a kill -9.
    let mut redis = RedisServer::start_with(true)?;
    let sink = Sink::start().await?;
    let node = RelayNode::start(&config(&redis.url(), &sink.url, ""))?;
    let c = client()?;
    let base = node.http_url();
    let mut acked = Vec::new();
    for i in 0..5 {
        let ev = message(
            &format!("k{i}"),
            "alice",
            "bob@b.example",
            &format!("before {i}"),
        );
        let (s, _) = post(&c, &base, "a.example", SECRET_A, &ev).await?;
        ensure!(s == 202);
        acked.push(format!("before {i}"));
    }

    redis.kill()?;
    // While Redis is down, senders get a retryable error, never a false ack.
    for i in 0..3 {
        let ev = message(
            &format!("down{i}"),
            "alice",
            "bob@b.example",
            &format!("down {i}"),
        );
        let body = serde_json::to_vec(&ev)?;
        let resp = signed_request(
            &c,
            &base,
            "a.example",
            SECRET_A,
            now_secs(),
            &body,
            "application/json",
        )
        .send()
        .await?;
        ensure!(
            resp.status().as_u16() == 503,
            "got {} while redis is down",
            resp.status()
        );
        ensure!(resp.headers().contains_key("retry-after"));
    }
    ensure!(
        test_support::http_get_status(node.admin_port, "/readyz") == Some(503),
        "ready without redis"
    );

    redis.restart()?;
    // The origin retries the refused events (same ids) until they are accepted; then new
    // events flow again.
    for label in ["down", "after"] {
        for i in 0..3 {
            let ev = message(
                &format!("{label}{i}"),
                "alice",
                "bob@b.example",
                &format!("{label} {i}"),
            );
            post_until_accepted(&c, &base, "a.example", SECRET_A, &ev, T).await?;
            acked.push(format!("{label} {i}"));
        }
    }

    // Everything acknowledged reaches bob once, in order.
    let mut stream = Stream::open(&c, &base, "b.example", SECRET_B, None).await?;
    let mut got = Vec::new();
    let mut seqs = Vec::new();
    while got.len() < acked.len() {
        let ev = stream.next(T).await?;
        got.push(ev.data["text"].as_str().unwrap_or_default().to_string());
        seqs.push(ev.data["seq"].as_u64().unwrap_or(0));
    }
    stream.expect_none(Duration::from_millis(300)).await?;
    ensure!(got == acked, "bob saw {got:?}");
    ensure!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "out of order: {seqs:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_work_and_exits_zero() -> Result<()> {
    let redis = RedisServer::start()?;
    let sink = Sink::start().await?;
    // Slow webhook: deliveries are still in flight when SIGTERM arrives.
    if let Ok(mut d) = sink.delay.lock() {
        *d = Duration::from_millis(200);
    }
    let mut node = RelayNode::start(&config(&redis.url(), &sink.url, ""))?;
    let c = client()?;
    let base = node.http_url();
    let mut sent = HashSet::new();
    for i in 0..20 {
        let ev = message(
            &format!("s{i}"),
            &format!("u{i}"),
            "carol@c.example",
            &format!("m{i}"),
        );
        let (s, _) = post(&c, &base, "a.example", SECRET_A, &ev).await?;
        ensure!(s == 202);
        sent.insert(format!("m{i}"));
    }
    // The webhook sink runs on this runtime: wait for the exit off its threads.
    let asked = std::time::Instant::now();
    let status = tokio::task::block_in_place(|| node.terminate(Duration::from_secs(20)));
    let status =
        status.map_err(|e| anyhow::anyhow!("{e}: {}", node.output().unwrap_or_default()))?;
    ensure!(status.success(), "exit status {status}");
    // Draining ends when the work is done, not at the deadline (20 s by default).
    let took = asked.elapsed();
    ensure!(
        took < Duration::from_secs(10),
        "exit took {took:?}: {}",
        node.output()?
    );
    // Every acknowledged message was delivered before the process exited.
    let got: HashSet<String> = sink
        .received()
        .iter()
        .filter_map(|e| e["text"].as_str().map(String::from))
        .collect();
    ensure!(got == sent, "delivered {} of {}", got.len(), sent.len());
    // The metadata log was flushed before exit: one `im` entry per message.
    let log = metadata_entries(&redis.url()).await?;
    let im = log
        .iter()
        .filter(|e| e.get("category").map(String::as_str) == Some("im"))
        .count();
    ensure!(
        im == sent.len(),
        "{im} metadata entries for {} messages",
        sent.len()
    );
    // And nothing listens any more.
    ensure!(test_support::http_get_status(node.http_port, "/openapi.json").is_none());
    Ok(())
}
