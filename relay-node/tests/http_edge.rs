//! The HTTP edge end to end: a real relay-node process, a real redis-server, signed events in,
//! the event stream and signed webhooks out.

mod common;

use anyhow::{Result, ensure};
use common::*;
use serde_json::json;
use std::time::Duration;
use test_support::{RedisServer, RelayNode};

const T: Duration = Duration::from_secs(10);

async fn system(extra: &str) -> Result<(RedisServer, Sink, RelayNode)> {
    let redis = RedisServer::start()?;
    let sink = Sink::start().await?;
    let node = RelayNode::start(&config(&redis.url(), &sink.url, extra))?;
    Ok((redis, sink, node))
}

#[tokio::test]
async fn messages_flow_both_ways_over_the_stream_and_resume_after_reconnect() -> Result<()> {
    let (_redis, _sink, node) = system("").await?;
    let c = client()?;
    let base = node.http_url();
    let mut to_b = Stream::open(&c, &base, "b.example", SECRET_B, None).await?;
    let mut to_a = Stream::open(&c, &base, "a.example", SECRET_A, None).await?;

    let (s, acc) = post(
        &c,
        &base,
        "a.example",
        SECRET_A,
        &message("e1", "alice", "bob@b.example", "hello bob"),
    )
    .await?;
    ensure!(
        s == 202 && acc["seq"] == 1 && acc["duplicate"] == false,
        "{s} {acc}"
    );
    let ev = to_b.next(T).await?;
    ensure!(
        ev.data["text"] == "hello bob"
            && ev.data["from"] == "alice@a.example"
            && ev.data["to"] == "bob@b.example"
    );
    ensure!(
        ev.data["relay_msg_id"] == acc["relay_msg_id"]
            && ev.data["session_id"] == acc["session_id"]
    );

    // Reply with rich text; then react to alice's message by relay id, and edit the reply.
    let reply = json!({"id": "b1", "type": "message", "from": "bob", "to": "alice@a.example", "text": "hi *alice*",
                       "rich": [{"text": "hi "}, {"text": "alice", "bold": true}]});
    let (s, r) = post(&c, &base, "b.example", SECRET_B, &reply).await?;
    ensure!(s == 202 && r["seq"] == 2, "{s} {r}");
    let ev = to_a.next(T).await?;
    ensure!(
        ev.data["rich"][1] == json!({"text": "alice", "bold": true}),
        "{}",
        ev.data
    );

    let react = json!({"id": "b2", "type": "reaction", "from": "bob", "to": "alice@a.example",
                       "target": {"relay_msg_id": acc["relay_msg_id"]}, "emoji": "🎉", "added": true});
    ensure!(post(&c, &base, "b.example", SECRET_B, &react).await?.0 == 202);
    let edit = json!({"id": "b3", "type": "edit", "from": "bob", "to": "alice@a.example",
                      "target": {"event_id": "b1"}, "text": "hi alice!"});
    ensure!(post(&c, &base, "b.example", SECRET_B, &edit).await?.0 == 202);
    let ev = to_a.next(T).await?;
    ensure!(
        ev.data["type"] == "reaction" && ev.data["target"]["relay_msg_id"] == acc["relay_msg_id"]
    );
    // alice's own id for her message is her event id.
    ensure!(ev.data["target"]["event_id"] == "e1", "{}", ev.data);
    let ev = to_a.next(T).await?;
    ensure!(
        ev.data["type"] == "edit" && ev.data["target"]["relay_msg_id"] == r["relay_msg_id"],
        "{}",
        ev.data
    );

    // Bob cannot edit alice's message.
    let hijack = json!({"id": "b4", "type": "edit", "from": "bob", "to": "alice@a.example",
                        "target": {"relay_msg_id": acc["relay_msg_id"]}, "text": "not yours"});
    let (s, body) = post(&c, &base, "b.example", SECRET_B, &hijack).await?;
    ensure!(s == 403 && body["error"] == "forbidden", "{s} {body}");

    // Resending an event is harmless: same ids, nothing delivered twice.
    let (s, again) = post(
        &c,
        &base,
        "a.example",
        SECRET_A,
        &message("e1", "alice", "bob@b.example", "hello bob"),
    )
    .await?;
    ensure!(s == 202 && again["duplicate"] == true && again["relay_msg_id"] == acc["relay_msg_id"]);

    // b disconnects; messages arrive meanwhile; b resumes after the last id it saw.
    let last_seen = {
        alice_to_bob(&c, &base, "e2", "two").await?;
        to_b.next(T).await?.id
    };
    drop(to_b);
    for i in 3..6 {
        alice_to_bob(&c, &base, &format!("e{i}"), &format!("n{i}")).await?;
    }
    let mut resumed = Stream::open(&c, &base, "b.example", SECRET_B, Some(&last_seen)).await?;
    for i in 3..6 {
        let ev = resumed.next(T).await?;
        ensure!(ev.data["text"] == format!("n{i}"), "got {}", ev.data);
    }
    resumed.expect_none(Duration::from_millis(300)).await?;
    // `$` starts with the next new event, skipping everything kept.
    let mut tail = Stream::open(&c, &base, "b.example", SECRET_B, Some("$")).await?;
    alice_to_bob(&c, &base, "e6", "newest").await?;
    ensure!(tail.next(T).await?.data["text"] == "newest");
    ensure!(resumed.next(T).await?.data["text"] == "newest");

    let doc: serde_json::Value = c
        .get(format!("{base}/openapi.json"))
        .send()
        .await?
        .json()
        .await?;
    ensure!(
        doc["openapi"] == "3.1.0"
            && doc["paths"]["/v1/events"]["post"]["responses"]["202"].is_object()
    );
    Ok(())
}

#[tokio::test]
async fn webhooks_are_signed_retried_and_receipts_name_later_edits() -> Result<()> {
    let (_redis, sink, node) = system("").await?;
    let c = client()?;
    let base = node.http_url();

    let (s, first) = post(
        &c,
        &base,
        "a.example",
        SECRET_A,
        &message("w1", "alice", "carol@c.example", "to a webhook"),
    )
    .await?;
    ensure!(s == 202);
    let got = sink.wait_for(1, T).await?;
    ensure!(got[0]["text"] == "to a webhook" && got[0]["to"] == "carol@c.example");

    // The receiver is down for a while: the relay retries, nothing is lost or doubled.
    if let Ok(mut m) = sink.mode.lock() {
        *m = SinkMode::Unavailable;
    }
    for i in 2..5 {
        let (s, _) = post(
            &c,
            &base,
            "a.example",
            SECRET_A,
            &message(
                &format!("w{i}"),
                "alice",
                "carol@c.example",
                &format!("m{i}"),
            ),
        )
        .await?;
        ensure!(s == 202);
    }
    // Let a few retries fail, then recover.
    test_support::wait_for("a retry", T, || async {
        let m = c
            .get(format!("{}/metrics", node.admin_url()))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        m.contains("fedrelay_delivery_retries_total").then_some(())
    })
    .await?;
    if let Ok(mut m) = sink.mode.lock() {
        *m = SinkMode::Ok;
    }
    let got = sink.wait_for(4, T).await?;
    let texts: Vec<&str> = got.iter().filter_map(|e| e["text"].as_str()).collect();
    ensure!(texts == ["to a webhook", "m2", "m3", "m4"], "{texts:?}");

    // The edit names carol's own id for the first message (from the sink's receipt).
    let edit = json!({"id": "w5", "type": "edit", "from": "alice", "to": "carol@c.example",
                      "target": {"event_id": "w1"}, "text": "edited"});
    ensure!(post(&c, &base, "a.example", SECRET_A, &edit).await?.0 == 202);
    let got = sink.wait_for(5, T).await?;
    ensure!(
        got[4]["target"]["relay_msg_id"] == first["relay_msg_id"],
        "{}",
        got[4]
    );
    ensure!(
        got[4]["target"]["event_id"] == format!("native-{}", first["seq"]),
        "{}",
        got[4]
    );
    // Carol reacts to alice's first message by her own id (from her receipt); alice's stream
    // names it by alice's own event id: each HTTP domain keeps its own ids.
    let mut to_a = Stream::open(&c, &base, "a.example", SECRET_A, None).await?;
    let react = json!({"id": "cr1", "type": "reaction", "from": "carol", "to": "alice@a.example",
                       "target": {"event_id": format!("native-{}", first["seq"])}, "emoji": "👀", "added": true});
    let (s, r) = post(&c, &base, "c.example", SECRET_C, &react).await?;
    ensure!(s == 202, "{s} {r}");
    let ev = to_a.next(T).await?;
    ensure!(
        ev.data["target"]["relay_msg_id"] == first["relay_msg_id"],
        "{}",
        ev.data
    );
    ensure!(ev.data["target"]["event_id"] == "w1", "{}", ev.data);
    ensure!(
        sink.bad_signatures.lock().map(|b| *b).unwrap_or(1) == 0,
        "relay sent a bad signature"
    );
    ensure!(sink.received().len() == 5, "duplicates delivered");
    Ok(())
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx_and_nothing_is_enqueued() -> Result<()> {
    let (redis, _sink, node) = system("").await?;
    let c = client()?;
    let base = node.http_url();
    let good = serde_json::to_vec(&message("x1", "alice", "bob@b.example", "hi"))?;
    let now = now_secs();
    let cases: Vec<(&str, u16, &str, reqwest::RequestBuilder)> = vec![
        (
            "malformed json",
            400,
            "bad_request",
            signed(&c, &base, "a.example", SECRET_A, now, b"{\"id\": "),
        ),
        (
            "wrong field type",
            400,
            "bad_request",
            signed(
                &c,
                &base,
                "a.example",
                SECRET_A,
                now,
                br#"{"id":1,"type":"message","from":"a","to":"b@b.example","text":"x"}"#,
            ),
        ),
        (
            "missing text",
            400,
            "bad_request",
            signed(
                &c,
                &base,
                "a.example",
                SECRET_A,
                now,
                br#"{"id":"x","type":"message","from":"a","to":"b@b.example"}"#,
            ),
        ),
        (
            "unknown domain",
            401,
            "unauthorized",
            signed(&c, &base, "evil.example", SECRET_A, now, &good),
        ),
        (
            "bad signature",
            401,
            "unauthorized",
            signed(&c, &base, "a.example", SECRET_B, now, &good),
        ),
        (
            "stale signature",
            401,
            "unauthorized",
            signed(&c, &base, "a.example", SECRET_A, now - 360, &good),
        ),
        (
            "future signature",
            401,
            "unauthorized",
            signed(&c, &base, "a.example", SECRET_A, now + 360, &good),
        ),
        (
            "no signature",
            401,
            "unauthorized",
            c.post(format!("{base}/v1/events"))
                .header("content-type", "application/json")
                .body(good.clone()),
        ),
        (
            "oversize body",
            413,
            "payload_too_large",
            signed(&c, &base, "a.example", SECRET_A, now, &vec![b' '; 5000]),
        ),
        (
            "not json",
            415,
            "unsupported_media_type",
            signed_request(&c, &base, "a.example", SECRET_A, now, &good, "text/plain"),
        ),
        (
            "not federated",
            403,
            "forbidden",
            signed(
                &c,
                &base,
                "d.example",
                SECRET_D,
                now,
                &serde_json::to_vec(&message("x2", "dan", "bob@b.example", "hi"))?,
            ),
        ),
        (
            "unserved recipient domain",
            403,
            "forbidden",
            signed(
                &c,
                &base,
                "a.example",
                SECRET_A,
                now,
                &serde_json::to_vec(&message("x3", "alice", "eve@elsewhere.example", "hi"))?,
            ),
        ),
        (
            "unknown edit target",
            422,
            "unknown_target",
            signed(
                &c,
                &base,
                "a.example",
                SECRET_A,
                now,
                &serde_json::to_vec(
                    &json!({"id":"x4","type":"delete","from":"alice","to":"bob@b.example","target":{"event_id":"never"}}),
                )?,
            ),
        ),
    ];
    for (what, status, code, req) in cases {
        let resp = req.send().await?;
        let got = resp.status().as_u16();
        let body: serde_json::Value = resp.json().await?;
        ensure!(got == status, "{what}: expected {status}, got {got} {body}");
        ensure!(
            body["error"] == code && body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {body}"
        );
    }
    // A resume id that is not one the stream hands out is refused.
    for bad in ["99999999999999999999-0", "1-x", "-1", "$$"] {
        let r = Stream::open(&c, &base, "b.example", SECRET_B, Some(bad)).await;
        ensure!(r.is_err(), "stream opened after {bad}");
    }
    // A body that lies about its length is cut off at the limit too.
    let resp = signed(&c, &base, "a.example", SECRET_A, now, &vec![b'x'; 10_000])
        .send()
        .await?;
    ensure!(resp.status().as_u16() == 413);

    // Nothing was journaled or queued: no journal, no id map, no outbox. (The unknown-target
    // case claimed its session, so that session's owner epoch exists, and only that.)
    let keys = redis_keys(&redis.url()).await?;
    ensure!(
        !keys
            .iter()
            .any(|k| k.ends_with(":j") || k.ends_with(":i") || k.starts_with("fr:o:")),
        "{keys:?}"
    );
    // The policy refusals are in the metadata log as errors.
    let log = test_support::wait_for("policy refusals in the metadata log", T, || async {
        let log = metadata_entries(&redis.url()).await.ok()?;
        (log.iter()
            .filter(|e| e.get("category").map(String::as_str) == Some("error"))
            .count()
            >= 2)
            .then_some(log)
    })
    .await?;
    ensure!(log.iter().any(
        |e| e.get("kind").map(String::as_str) == Some("not_federated")
            && e.get("from").map(String::as_str) == Some("dan@d.example")
    ));
    ensure!(
        log.iter()
            .any(|e| e.get("kind").map(String::as_str) == Some("unknown_domain"))
    );

    // And the edge still works.
    ensure!(
        post(
            &c,
            &base,
            "a.example",
            SECRET_A,
            &message("ok", "alice", "bob@b.example", "fine")
        )
        .await?
        .0 == 202
    );
    Ok(())
}

fn signed(
    c: &reqwest::Client,
    base: &str,
    domain: &str,
    secret: &str,
    ts: i64,
    body: &[u8],
) -> reqwest::RequestBuilder {
    signed_request(c, base, domain, secret, ts, body, "application/json")
}

#[tokio::test]
async fn the_edge_speaks_tls_when_given_a_certificate() -> Result<()> {
    let redis = RedisServer::start()?;
    let dir = tempfile::tempdir()?;
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem())?;
    std::fs::write(&key_path, cert.signing_key.serialize_pem())?;
    let extra = format!(
        "[http]\nlisten = \"127.0.0.1:{{HTTP_PORT}}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
        cert_path.display(),
        key_path.display()
    );
    // The [http] table of the base config is replaced by this one.
    let cfg = config(&redis.url(), "http://127.0.0.1:1/hook", "").replace(
        "[http]\nlisten = \"127.0.0.1:{HTTP_PORT}\"\nmax_body_bytes = 4096\n",
        &extra,
    );
    let node = RelayNode::start(&cfg)?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let root = reqwest::Certificate::from_pem(cert.cert.pem().as_bytes())?;
    let tls_client = reqwest::Client::builder().tls_certs_only([root]).build()?;
    let base = format!("https://localhost:{}", node.http_port);
    let (s, _) = post(
        &tls_client,
        &base,
        "a.example",
        SECRET_A,
        &message("t1", "alice", "bob@b.example", "secure"),
    )
    .await?;
    ensure!(s == 202, "https post answered {s}");
    // Plain HTTP on the TLS port gets no HTTP answer.
    let plain = client()?
        .get(format!("http://127.0.0.1:{}/openapi.json", node.http_port))
        .send()
        .await;
    ensure!(plain.is_err() || plain.is_ok_and(|r| !r.status().is_success()));
    Ok(())
}

#[tokio::test]
async fn a_receiver_back_after_the_retention_is_told_of_the_gap() -> Result<()> {
    // In-memory store, three events kept per domain.
    let cfg = config("redis://unused", "http://127.0.0.1:1/hook", "")
        .replace("backend = \"redis\"", "backend = \"memory\"")
        .replace(
            "max_body_bytes = 4096\n",
            "max_body_bytes = 4096\nstream_retention = 3\n",
        );
    let node = RelayNode::start(&cfg)?;
    let c = client()?;
    let base = node.http_url();
    let mut first = Stream::open(&c, &base, "b.example", SECRET_B, None).await?;
    alice_to_bob(&c, &base, "g0", "m0").await?;
    let seen = first.next(T).await?.id;
    drop(first);
    for i in 1..6 {
        alice_to_bob(&c, &base, &format!("g{i}"), &format!("m{i}")).await?;
    }
    // m1 and m2 fell out of the retention while b was away.
    let mut back = Stream::open(&c, &base, "b.example", SECRET_B, Some(&seen)).await?;
    let gap = back.next(T).await?;
    ensure!(
        gap.data["type"] == "gap" && gap.data["after"] == seen,
        "{}",
        gap.data
    );
    for i in 3..6 {
        ensure!(back.next(T).await?.data["text"] == format!("m{i}"));
    }
    // Resuming from a point still kept (0-4 is m3, the oldest kept) has no gap.
    let mut fine = Stream::open(&c, &base, "b.example", SECRET_B, Some("0-4")).await?;
    ensure!(fine.next(T).await?.data["text"] == "m4");
    Ok(())
}
