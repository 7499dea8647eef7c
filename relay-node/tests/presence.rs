//! Presence across a three-node cluster: contacts who accepted each other follow each
//! other's presence; one update reaches every subscriber once, whichever node serves them.

mod common;

use anyhow::{Result, ensure};
use common::*;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::Duration;
use test_support::{EtcdServer, RedisServer, RelayNode};

const WAIT: Duration = Duration::from_secs(15);

/// Reads presence events from a stream until `n` distinct subscribers have the wanted
/// availability; answers how many presence events each subscriber got in all.
async fn presence_events(
    stream: &mut Stream,
    availability: &str,
    n: usize,
) -> Result<HashMap<String, Vec<Value>>> {
    let mut got: HashMap<String, Vec<Value>> = HashMap::new();
    loop {
        let done = got
            .values()
            .filter(|evs| evs.iter().any(|e| e["availability"] == availability))
            .count();
        if done >= n {
            return Ok(got);
        }
        let ev = stream.next(WAIT).await?;
        if ev.data["type"] == "presence" {
            let to = ev.data["to"].as_str().unwrap_or_default().to_string();
            got.entry(to).or_default().push(ev.data);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn presence_fans_out_to_contacts_on_every_node() -> Result<()> {
    let redis = RedisServer::start()?;
    let etcd = EtcdServer::start()?;
    let sink = Sink::start().await?;
    let nodes = ["p1", "p2", "p3"]
        .iter()
        .map(|id| {
            let cfg = cluster_config(
                &redis.url(),
                &sink.url,
                &etcd.endpoint(),
                "presence",
                id,
                "",
                "lease_ttl_secs = 3",
            );
            RelayNode::start(&cfg)
        })
        .collect::<Result<Vec<_>>>()?;
    let c = client()?;
    wait_members(&c, &nodes[0].admin_url(), 3).await?;

    // alice asks 31 users of b.example to connect; 30 accept, through different nodes.
    let subscribers: Vec<String> = (0..30).map(|i| format!("u{i}")).collect();
    for (i, u) in subscribers.iter().chain([&"late".to_string()]).enumerate() {
        let ev = json!({"id": format!("req-{u}"), "type": "contact_request", "from": "alice",
                        "to": format!("{u}@b.example")});
        post_until_accepted(
            &c,
            &nodes[i % 3].http_url(),
            "a.example",
            SECRET_A,
            &ev,
            WAIT,
        )
        .await?;
    }
    for (i, u) in subscribers.iter().enumerate() {
        let node = &nodes[i % 3];
        let ev = json!({"id": format!("cr-{u}"), "type": "contact_response", "from": u,
                        "to": "alice@a.example", "accepted": true});
        post_until_accepted(&c, &node.http_url(), "b.example", SECRET_B, &ev, WAIT).await?;
    }
    // An "accepted" nobody asked for makes its sender follow nobody.
    let unasked = json!({"id": "cr-nosy", "type": "contact_response", "from": "nosy",
                         "to": "alice@a.example", "accepted": true});
    post_until_accepted(
        &c,
        &nodes[0].http_url(),
        "b.example",
        SECRET_B,
        &unasked,
        WAIT,
    )
    .await?;
    let mut stream = Stream::open(&c, &nodes[2].http_url(), "b.example", SECRET_B, None).await?;

    let away = json!({"id": "p-1", "type": "presence", "from": "alice", "to": "*",
                      "availability": "away", "note": "at lunch"});
    let acc =
        post_until_accepted(&c, &nodes[0].http_url(), "a.example", SECRET_A, &away, WAIT).await?;
    ensure!(acc["seq"] == 1, "first presence version: {acc}");
    let got = presence_events(&mut stream, "away", subscribers.len()).await?;
    ensure!(
        subscribers
            .iter()
            .all(|u| got.contains_key(&format!("{u}@b.example"))),
        "every contact gets alice's presence: {:?}",
        got.keys()
    );
    ensure!(
        !got.contains_key("nosy@b.example"),
        "an unasked-for accept made its sender a follower"
    );
    for (to, evs) in &got {
        ensure!(evs.len() == 1, "{to} got {} presence events", evs.len());
        ensure!(evs[0]["from"] == "alice@a.example" && evs[0]["note"] == "at lunch");
    }

    // A newer update supersedes; a new contact gets the current presence at once.
    let busy = json!({"id": "p-2", "type": "presence", "from": "alice", "to": "*",
                      "availability": "busy"});
    post_until_accepted(&c, &nodes[1].http_url(), "a.example", SECRET_A, &busy, WAIT).await?;
    let got = presence_events(&mut stream, "busy", subscribers.len()).await?;
    ensure!(got.values().all(|evs| evs.len() == 1));
    ensure!(!got.contains_key("nosy@b.example"));
    let late = json!({"id": "cr-late", "type": "contact_response", "from": "late",
                      "to": "alice@a.example", "accepted": true});
    post_until_accepted(&c, &nodes[2].http_url(), "b.example", SECRET_B, &late, WAIT).await?;
    let got = presence_events(&mut stream, "busy", 1).await?;
    ensure!(got.contains_key("late@b.example"), "{:?}", got.keys());

    // Presence owners are spread like sessions: every node ran some fan-out work, and the
    // publisher's actor lives on exactly one node.
    let v: Value = c
        .get(format!("{}/cluster", nodes[0].admin_url()))
        .send()
        .await?
        .json()
        .await?;
    let actors: u64 = v["members"]
        .as_array()
        .map(|m| m.iter().filter_map(|n| n["presence_active"].as_u64()).sum())
        .unwrap_or(0);
    ensure!(actors >= 1, "presence actors running: {v}");
    Ok(())
}
