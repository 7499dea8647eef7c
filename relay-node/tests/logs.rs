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
    check_no_content(&redis, &sink, &node, &[&node]).await
}

/// The same across two nodes: every event enters at the node that does not own its session,
/// so it crosses the gRPC stream (and alice's presence crosses to her follower's node).
#[tokio::test(flavor = "multi_thread")]
async fn message_content_never_reaches_logs_of_a_cluster() -> Result<()> {
    let redis = RedisServer::start()?;
    let etcd = test_support::EtcdServer::start()?;
    let sink = Sink::start().await?;
    let node_config = |id: &str| {
        cluster_config(
            &redis.url(),
            &sink.url,
            &etcd.endpoint(),
            "logs",
            id,
            "",
            "",
        )
    };
    let env = [("RUST_LOG", "trace")];
    let l1 = RelayNode::start_with_env(&node_config("l1"), &env)?;
    let l2 = RelayNode::start_with_env(&node_config("l2"), &env)?;
    let map = cluster::ShardMap::new(
        0,
        vec![
            cluster::Member::new("l1", ""),
            cluster::Member::new("l2", ""),
        ],
    );
    let session = session_actor::SessionId::one_to_one(
        &fedrelay_proto::Address::new("http", "a.example", "alice"),
        &fedrelay_proto::Address::new("http", "b.example", "bob"),
    );
    let entry = match map.owner(&session).map(|m| m.node_id.as_str()) {
        Some("l1") => &l2,
        _ => &l1,
    };
    let c = client()?;
    wait_members(&c, &entry.admin_url(), 2).await?;
    check_no_content(&redis, &sink, entry, &[&l1, &l2]).await
}

async fn check_no_content(
    redis: &RedisServer,
    sink: &Sink,
    entry: &RelayNode,
    nodes: &[&RelayNode],
) -> Result<()> {
    let node = entry;
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
        // alice asks bob to connect and he accepts: he follows her presence, then alice
        // publishes to her followers.
        json!({"id": "c8r", "type": "contact_request", "from": "alice", "to": "bob@b.example"}),
        json!({"id": "c9", "type": "contact_response", "from": "bob", "to": "alice@a.example", "accepted": true}),
    ] {
        let domain = if ev["from"] == "bob" {
            ("b.example", SECRET_B)
        } else {
            ("a.example", SECRET_A)
        };
        ensure!(post(&c, &base, domain.0, domain.1, &ev).await?.0 == 202);
    }
    for ev in [
        json!({"id": "c10", "type": "presence", "from": "alice", "to": "*", "availability": "busy", "note": CANARY}),
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

    // Everything was delivered (so every hop ran and logged): five events with the canary to
    // bob, and alice's presence (published to her followers) as the sixth.
    let mut with_canary = 0;
    while with_canary < 6 {
        let ev = stream.next(Duration::from_secs(10)).await?;
        if ev.data.to_string().contains(CANARY) {
            with_canary += 1;
        }
    }
    sink.wait_for(1, Duration::from_secs(10)).await?;

    let metrics = common::metrics(&c, &node.admin_url()).await?;
    ensure!(
        metrics.contains("fedrelay_messages_in_total"),
        "metrics are served"
    );
    ensure!(!metrics.contains(CANARY), "content in /metrics");
    if nodes.len() > 1 {
        ensure!(
            metrics.contains("fedrelay_forwarded_total"),
            "the events did not cross nodes"
        );
    }

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
            let out: String = nodes.iter().filter_map(|n| n.output().ok()).collect();
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

/// Through the Teams edge, both ways, at trace level: message text, rich HTML, edits,
/// reactions, files, contact-request notes and status notes never reach the logs or metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teams_content_never_reaches_logs_or_metrics() -> Result<()> {
    use common::teams::{self, User};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let redis = RedisServer::start()?;
    let fake =
        test_support::fake_bot_connector::FakeBotConnector::start(Default::default()).await?;
    let node = RelayNode::start_with_env(
        &teams::teams_config(&fake, &redis.url(), ""),
        &[("RUST_LOG", "trace")],
    )?;
    let rig = teams::Rig {
        fake,
        relay: node,
        redis,
    };
    let base = rig.relay.http_url();
    let c = client()?;
    let mut bob = Stream::open(&c, &base, "b.example", SECRET_B, Some("$")).await?;
    let alice = User::new("alice", "Alice Anders", 1);
    teams::install(&rig, &alice).await?;
    let say = |text: String, extra: serde_json::Value| {
        let mut a = teams::personal(&rig, &alice, "message", extra);
        a["text"] = json!(text);
        a
    };
    teams::send_ok(
        &rig,
        &say(format!("invite bob@b.example {CANARY}"), json!({})),
    )
    .await?;
    teams::send_ok(&rig, &say("chat bob@b.example".into(), json!({}))).await?;
    let m = say(
        CANARY.into(),
        json!({"attachments": [{"contentType": "text/html", "content": format!("<b>{CANARY}</b>")}]}),
    );
    teams::send_ok(&rig, &m).await?;
    let edit = teams::edit(&rig, &alice, &m["id"], &format!("{CANARY} 2"));
    teams::send_ok(&rig, &edit).await?;
    teams::send_ok(&rig, &say(format!("status away {CANARY}"), json!({}))).await?;
    for ev in [
        message("b1", "bob", "alice@contoso.com", CANARY),
        json!({"id": "b2", "type": "file", "from": "bob", "to": "alice@contoso.com",
               "file": {"name": CANARY, "size": 1, "mime": "text/plain", "url": format!("https://f.example/{CANARY}")}}),
        json!({"id": "b3", "type": "reaction", "from": "bob", "to": "alice@contoso.com", "target": {"event_id": "b1"}, "emoji": CANARY, "added": true}),
    ] {
        let (s, v) = post(&c, &base, "b.example", SECRET_B, &ev).await?;
        ensure!(s == 202, "{s} {v}");
    }
    // Everything went through: bob saw the request, message and edit; Teams got bob's three.
    let mut seen = 0;
    while seen < 3 {
        let ev = bob.next(Duration::from_secs(10)).await?;
        if ev.data.to_string().contains(CANARY) {
            seen += 1;
        }
    }
    rig.fake
        .wait_calls("bob's three posts", Duration::from_secs(10), |cs| {
            cs.iter()
                .filter(|c| c.body["text"].as_str().is_some_and(|t| t.contains(CANARY)))
                .count()
                >= 3
        })
        .await?;
    let metrics = common::metrics(&c, &rig.relay.admin_url()).await?;
    ensure!(
        metrics.contains("fedrelay_teams_activities_total"),
        "metrics are served"
    );
    ensure!(!metrics.contains(CANARY), "content in /metrics");
    let output = rig.relay.output()?;
    ensure!(
        output.lines().count() > 20,
        "the relay logged too little to prove anything"
    );
    let leaks: Vec<&str> = output.lines().filter(|l| l.contains(CANARY)).collect();
    ensure!(leaks.is_empty(), "content in logs:\n{}", leaks.join("\n"));
    Ok(())
}
