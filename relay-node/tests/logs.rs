//! No message content in logs, spans or metrics.

mod common;

use anyhow::{Result, ensure};
use common::*;
use serde_json::json;
use std::time::Duration;
use test_support::{RedisServer, RelayNode};

const CANARY: &str = "CANARY-7f3a9c2e-do-not-log";

#[tokio::test]
async fn message_content_never_reaches_logs_metrics_or_the_metadata_log() -> Result<()> {
    let redis = RedisServer::start()?;
    let sink = Sink::start().await?;
    // The most verbose level an operator could choose, for every crate.
    let node = RelayNode::start_with_env(
        &config(&redis.url(), &sink.url, ""),
        &[("RUST_LOG", "trace")],
    )?;
    let c = client()?;
    let base = node.http_url();
    let mut stream = Stream::open(&c, &base, "b.example", SECRET_B, None).await?;

    let (s, acc) = post(&c, &base, "a.example", SECRET_A, &json!({
        "id": "c1", "type": "message", "from": "alice", "to": "bob@b.example",
        "text": format!("secret plan {CANARY}"), "rich": [{"text": CANARY, "bold": true, "link": format!("https://x.example/{CANARY}")}]
    })).await?;
    ensure!(s == 202);
    let relay_msg_id = acc["relay_msg_id"].as_str().unwrap_or_default().to_string();
    for ev in [
        json!({"id": "c2", "type": "edit", "from": "alice", "to": "bob@b.example", "target": {"event_id": "c1"}, "text": CANARY}),
        json!({"id": "c3", "type": "reaction", "from": "alice", "to": "bob@b.example", "target": {"event_id": "c1"}, "emoji": CANARY, "added": true}),
        json!({"id": "c4", "type": "file", "from": "alice", "to": "bob@b.example", "file": {"name": CANARY, "size": 1, "mime": "text/plain", "url": format!("https://f.example/{CANARY}")}}),
        json!({"id": "c5", "type": "presence", "from": "alice", "to": "bob@b.example", "availability": "away", "note": CANARY}),
        json!({"id": "c6", "type": "message", "from": "alice", "to": "carol@c.example", "text": CANARY}),
    ] {
        ensure!(post(&c, &base, "a.example", SECRET_A, &ev).await?.0 == 202);
    }
    // A refused event and a malformed one echo nothing into the logs either.
    ensure!(
        post(
            &c,
            &base,
            "d.example",
            SECRET_D,
            &message("c7", "dan", "bob@b.example", CANARY)
        )
        .await?
        .0 == 403
    );
    let bad = format!("{{\"id\":\"c8\",\"type\":\"{CANARY}\"}}");
    ensure!(
        post_raw(&c, &base, "a.example", SECRET_A, now_secs(), bad.as_bytes())
            .await?
            .0
            == 400
    );

    // Everything was delivered (so every hop ran and logged).
    for _ in 0..5 {
        let ev = stream.next(Duration::from_secs(10)).await?;
        ensure!(
            ev.data.to_string().contains(CANARY),
            "the content itself is delivered intact"
        );
    }
    sink.wait_for(1, Duration::from_secs(10)).await?;

    let metrics = c
        .get(format!("{}/metrics", node.admin_url()))
        .send()
        .await?
        .text()
        .await?;
    ensure!(
        metrics.contains("fedrelay_messages_in_total"),
        "metrics are served"
    );
    ensure!(!metrics.contains(CANARY), "content in /metrics");

    let log = metadata_entries(&redis.url()).await?;
    ensure!(!log.is_empty());
    ensure!(
        !format!("{log:?}").contains(CANARY),
        "content in the metadata log"
    );

    let output = test_support::wait_for(
        "the relay to log the delivery",
        Duration::from_secs(10),
        || async {
            let out = node.output().ok()?;
            out.contains(&relay_msg_id).then_some(out)
        },
    )
    .await?;
    ensure!(
        output.lines().count() > 20,
        "the relay logged too little to prove anything"
    );
    let leaks: Vec<&str> = output.lines().filter(|l| l.contains(CANARY)).collect();
    ensure!(leaks.is_empty(), "content in logs:\n{}", leaks.join("\n"));
    Ok(())
}
