//! The XMPP edge against a real Prosody (Debian's package) and real slixmpp clients logged
//! into it: a Prosody user and a user on the HTTP edge talk through the relay over
//! server-to-server federation, with SASL EXTERNAL and with dialback.

mod common;

use anyhow::{Context, Result, bail, ensure};
use common::{Stream, client, post};
use relay_node::edges::xmpp::element::Element;
use relay_node::edges::xmpp::xml::{Event, Limits, Parser};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use test_support::prosody::{Peer, Prosody, ProsodyConfig, S2sAuth};
use test_support::xmpp_client::{Stanza, XmppClient};
use test_support::{RedisServer, RelayNode, certs, free_port};

const SECRET_ALPHA: &str = "secret-of-alpha-0123456789";
const SECRET_GAMMA: &str = "secret-of-gamma-0123456789";
const T: Duration = Duration::from_secs(15);
const NS_CLIENT: &str = "jabber:client";

/// Parses a stanza a client received.
fn parse(s: &Stanza) -> Result<Element> {
    let mut p = Parser::new(Limits::default());
    p.feed(
        b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>",
    );
    p.feed(s.xml.as_bytes());
    loop {
        match p.next_event()? {
            Some(Event::Stanza(e)) => return Ok(e),
            Some(_) => {}
            None => bail!("incomplete stanza: {}", s.xml),
        }
    }
}

fn child_attr(e: &Element, name: &str, ns: &str, attr: &str) -> Option<String> {
    e.get_child(name, ns)
        .and_then(|c| c.get_attr(attr))
        .map(str::to_string)
}

struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    fn new() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        certs::issue_named(
            dir.path(),
            "",
            "fedrelay test CA",
            &[
                ("prosody", &["prosody.test"]),
                ("relay", &["alpha.test", "gamma.test"]),
            ],
        )?;
        Ok(Self { dir })
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }
}

fn relay_config(
    redis_url: &str,
    certs: &Certs,
    xmpp_port: u16,
    prosody_s2s: u16,
    auth: &str,
) -> String {
    format!(
        r#"node_id = "xmpp-1"
[http]
listen = "127.0.0.1:{{HTTP_PORT}}"
[admin]
listen = "127.0.0.1:{{ADMIN_PORT}}"
[store]
backend = "redis"
redis_url = "{redis_url}"
[session]
retry_base_ms = 50
retry_max_ms = 500
ack_flush_ms = 10
[telemetry]
log_format = "json"
log_level = "info,relay_node=trace,session_actor=trace,cluster=trace"
[xmpp]
listen = "127.0.0.1:{xmpp_port}"
tls_cert = "{cert}"
tls_key = "{key}"
tls_ca = "{ca}"
handshake_timeout_secs = 3
connect_timeout_secs = 5
[[xmpp.peers]]
domain = "prosody.test"
address = "127.0.0.1:{prosody_s2s}"
auth = "{auth}"
[[domains]]
name = "alpha.test"
platform = "http"
secret = "{SECRET_ALPHA}"
[[domains]]
name = "gamma.test"
platform = "http"
secret = "{SECRET_GAMMA}"
[[domains]]
name = "prosody.test"
platform = "xmpp"
[[federation]]
between = ["alpha.test", "prosody.test"]
"#,
        cert = certs.path("relay.pem").display(),
        key = certs.path("relay.key").display(),
        ca = certs.path("ca.pem").display(),
    )
}

/// Prosody with bob, the relay in front of Redis, bob logged in and alice's event stream.
struct World {
    certs: Certs,
    redis: RedisServer,
    prosody: Prosody,
    relay: RelayNode,
    xmpp_port: u16,
    auth: &'static str,
    http: reqwest::Client,
    bob: XmppClient,
    alice: Stream,
}

impl World {
    async fn start(mode: S2sAuth) -> Result<Self> {
        let certs = Certs::new()?;
        let redis = RedisServer::start()?;
        let xmpp_port = free_port()?;
        let mut pc = ProsodyConfig::new(
            "prosody.test",
            &certs.path("prosody.pem"),
            &certs.path("prosody.key"),
        );
        pc.auth = mode;
        if mode == S2sAuth::External {
            pc.peer_ca = Some(certs.path("ca.pem"));
        }
        pc.peers = vec![
            Peer {
                domain: "alpha.test".into(),
                port: xmpp_port,
            },
            Peer {
                domain: "gamma.test".into(),
                port: xmpp_port,
            },
        ];
        let prosody = Prosody::start(pc).await?;
        prosody.register("bob", "bob-password")?;
        let auth = match mode {
            S2sAuth::External => "external",
            S2sAuth::Dialback => "dialback",
        };
        let relay = RelayNode::start(&relay_config(
            &redis.url(),
            &certs,
            xmpp_port,
            prosody.s2s_port(),
            auth,
        ))?;
        let http = client()?;
        let alice =
            Stream::open(&http, &relay.http_url(), "alpha.test", SECRET_ALPHA, None).await?;
        let bob = XmppClient::login(
            "bob@prosody.test",
            "bob-password",
            prosody.c2s_port(),
            &certs.path("ca.pem"),
        )
        .await?;
        Ok(Self {
            certs,
            redis,
            prosody,
            relay,
            xmpp_port,
            auth,
            http,
            bob,
            alice,
        })
    }

    /// alice (HTTP edge) sends an event; it must be accepted.
    async fn alice_sends(&self, ev: Value) -> Result<Value> {
        let (s, v) = post(
            &self.http,
            &self.relay.http_url(),
            "alpha.test",
            SECRET_ALPHA,
            &ev,
        )
        .await?;
        ensure!(s == 202, "alice's {ev} answered {s}: {v}");
        Ok(v)
    }

    /// The next event on alice's stream that is not presence (unless asked for).
    async fn alice_next(&mut self, kind: &str) -> Result<Value> {
        let deadline = Instant::now() + T;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ev = self.alice.next(left).await.with_context(|| {
                format!("alice waiting for {kind}; relay: {}", self.relay_log())
            })?;
            if ev.data["type"] == kind {
                return Ok(ev.data);
            }
            if ev.data["type"] != "presence" {
                bail!("alice expected {kind}, got {}", ev.data);
            }
        }
    }

    async fn bob_gets(&self, what: &str, pred: impl Fn(&Element) -> bool) -> Result<Element> {
        let s = self
            .bob
            .wait_stanza(what, T, |s| parse(s).is_ok_and(|e| pred(&e)))
            .await
            .with_context(|| format!("prosody log:\n{}", self.prosody.log_tail(40)))?;
        parse(&s)
    }

    fn relay_log(&self) -> String {
        let out = self.relay.output().unwrap_or_default();
        let tail: Vec<&str> = out.lines().rev().take(200).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

fn body_of(e: &Element) -> String {
    e.child_text("body", NS_CLIENT).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prosody_user_and_an_http_user_federate_over_sasl_external() -> Result<()> {
    let mut w = World::start(S2sAuth::External).await?;

    // Subscription: bob asks, alice accepts; the relay asks back for her, bob approves.
    w.bob
        .send("<presence to='alice@alpha.test' type='subscribe'><status>hi from bob</status></presence>")
        .await?;
    let req = w.alice_next("contact_request").await?;
    assert_eq!(req["from"], "bob@prosody.test");
    assert_eq!(req["from_platform"], "xmpp");
    assert_eq!(req["note"], "hi from bob");
    w.alice_sends(
        json!({"id": "c1", "type": "contact_response", "from": "alice",
        "to": "bob@prosody.test", "accepted": true}),
    )
    .await?;
    w.bob_gets("subscribed from alice", |e| {
        e.name == "presence"
            && e.get_attr("type") == Some("subscribed")
            && e.get_attr("from")
                .is_some_and(|f| f.starts_with("alice@alpha.test"))
    })
    .await?;
    w.bob_gets("alice's reciprocal subscribe", |e| {
        e.name == "presence" && e.get_attr("type") == Some("subscribe")
    })
    .await?;
    w.bob
        .send("<presence to='alice@alpha.test' type='subscribed'/>")
        .await?;

    // Presence both ways.
    w.bob
        .send("<presence><show>away</show><status>at lunch</status></presence>")
        .await?;
    let deadline = Instant::now() + T;
    loop {
        let ev = w
            .alice
            .next(deadline.saturating_duration_since(Instant::now()))
            .await?;
        if ev.data["type"] == "presence" && ev.data["availability"] == "away" {
            assert_eq!(ev.data["from"], "bob@prosody.test");
            assert_eq!(ev.data["note"], "at lunch");
            break;
        }
        ensure!(ev.data["type"] == "presence", "unexpected {}", ev.data);
    }
    w.alice_sends(
        json!({"id": "p1", "type": "presence", "from": "alice", "to": "*",
        "availability": "busy", "note": "in a meeting"}),
    )
    .await?;
    let p = w
        .bob_gets("alice's presence", |e| {
            e.name == "presence"
                && e.get_attr("type").is_none()
                && e.get_attr("from")
                    .is_some_and(|f| f.starts_with("alice@alpha.test"))
        })
        .await?;
    assert_eq!(p.child_text("show", NS_CLIENT).as_deref(), Some("dnd"));
    assert_eq!(
        p.child_text("status", NS_CLIENT).as_deref(),
        Some("in a meeting")
    );

    // Chat bob → alice, with styling and a receipt request.
    w.bob
        .send(
            "<message type='chat' to='alice@alpha.test' id='b1'><body>hi *alice*</body>\
               <request xmlns='urn:xmpp:receipts'/></message>",
        )
        .await?;
    let m1 = w.alice_next("message").await?;
    assert_eq!(m1["text"], "hi *alice*");
    assert_eq!(m1["rich"][1], json!({"text": "alice", "bold": true}));
    let b1_relay = m1["relay_msg_id"].as_str().context("relay id")?.to_string();
    w.bob_gets("the receipt for b1", |e| {
        child_attr(e, "received", "urn:xmpp:receipts", "id").as_deref() == Some("b1")
    })
    .await?;

    // Chat alice → bob.
    w.alice_sends(
        json!({"id": "a1", "type": "message", "from": "alice", "to": "bob@prosody.test",
        "text": "hello bob", "rich": [{"text": "hello "}, {"text": "bob", "italic": true}]}),
    )
    .await?;
    let a1 = w
        .bob_gets("alice's message", |e| {
            e.name == "message" && body_of(e).contains("bob")
        })
        .await?;
    assert_eq!(body_of(&a1), "hello _bob_");
    assert_eq!(a1.get_attr("type"), Some("chat"));
    let a1_id = a1.get_attr("id").context("id")?.to_string();
    assert_eq!(
        child_attr(&a1, "origin-id", "urn:xmpp:sid:0", "id"),
        Some(a1_id.clone())
    );

    // Correction (XEP-0308) bob → alice names b1 by its relay id.
    w.bob
        .send(
            "<message type='chat' to='alice@alpha.test' id='b2'><body>hi Alice</body>\
               <replace xmlns='urn:xmpp:message-correct:0' id='b1'/></message>",
        )
        .await?;
    let ed = w.alice_next("edit").await?;
    assert_eq!(ed["text"], "hi Alice");
    assert_eq!(ed["target"]["relay_msg_id"], b1_relay.as_str());

    // Reactions (XEP-0444) both ways: bob's set, then its removal; alice's on b1.
    w.bob
        .send(&format!("<message type='chat' to='alice@alpha.test' id='b3'>\
               <reactions xmlns='urn:xmpp:reactions:0' id='{a1_id}'><reaction>👍</reaction></reactions></message>"))
        .await?;
    let r = w.alice_next("reaction").await?;
    assert_eq!(
        (r["emoji"].as_str(), r["added"].as_bool()),
        (Some("👍"), Some(true))
    );
    assert_eq!(
        r["target"]["event_id"], "a1",
        "named by alice's own event id"
    );
    w.bob
        .send(&format!(
            "<message type='chat' to='alice@alpha.test' id='b4'>\
               <reactions xmlns='urn:xmpp:reactions:0' id='{a1_id}'/></message>"
        ))
        .await?;
    let r = w.alice_next("reaction").await?;
    assert_eq!(
        (r["emoji"].as_str(), r["added"].as_bool()),
        (Some("👍"), Some(false))
    );
    w.alice_sends(
        json!({"id": "a2", "type": "reaction", "from": "alice", "to": "bob@prosody.test",
        "target": {"relay_msg_id": b1_relay}, "emoji": "🎉", "added": true}),
    )
    .await?;
    let re = w
        .bob_gets("alice's reaction", |e| {
            e.get_child("reactions", "urn:xmpp:reactions:0").is_some()
        })
        .await?;
    let set = re
        .get_child("reactions", "urn:xmpp:reactions:0")
        .context("reactions")?;
    assert_eq!(
        set.get_attr("id"),
        Some("b1"),
        "bob's own id for his message"
    );
    assert_eq!(
        set.child_text("reaction", "urn:xmpp:reactions:0")
            .as_deref(),
        Some("🎉")
    );

    // alice edits and deletes a1: a correction and a retraction naming bob's id for it.
    w.alice_sends(
        json!({"id": "a3", "type": "edit", "from": "alice", "to": "bob@prosody.test",
        "target": {"event_id": "a1"}, "text": "hello again bob"}),
    )
    .await?;
    let c = w
        .bob_gets("alice's correction", |e| {
            e.get_child("replace", "urn:xmpp:message-correct:0")
                .is_some()
        })
        .await?;
    assert_eq!(
        child_attr(&c, "replace", "urn:xmpp:message-correct:0", "id"),
        Some(a1_id.clone())
    );
    assert_eq!(body_of(&c), "hello again bob");
    w.alice_sends(
        json!({"id": "a4", "type": "delete", "from": "alice", "to": "bob@prosody.test",
        "target": {"event_id": "a1"}}),
    )
    .await?;
    let d = w
        .bob_gets("alice's retraction", |e| {
            e.get_child("retract", "urn:xmpp:message-retract:1")
                .is_some()
        })
        .await?;
    assert_eq!(
        child_attr(&d, "retract", "urn:xmpp:message-retract:1", "id"),
        Some(a1_id.clone())
    );

    // Retraction (XEP-0424) bob → alice.
    w.bob
        .send(
            "<message type='chat' to='alice@alpha.test' id='b5'><body>retracted</body>\
               <retract xmlns='urn:xmpp:message-retract:1' id='b1'/>\
               <fallback xmlns='urn:xmpp:fallback:0' for='urn:xmpp:message-retract:1'/></message>",
        )
        .await?;
    let del = w.alice_next("delete").await?;
    assert_eq!(del["target"]["relay_msg_id"], b1_relay.as_str());

    // Typing (XEP-0085) both ways.
    w.bob
        .send("<message type='chat' to='alice@alpha.test'><composing xmlns='http://jabber.org/protocol/chatstates'/></message>")
        .await?;
    let ty = w.alice_next("typing").await?;
    assert_eq!(ty["active"], true);
    w.alice_sends(json!({"id": "a5", "type": "typing", "from": "alice", "to": "bob@prosody.test", "active": true}))
        .await?;
    w.bob_gets("alice typing", |e| {
        e.get_child("composing", "http://jabber.org/protocol/chatstates")
            .is_some()
    })
    .await?;

    // Files (XEP-0066) both ways.
    w.bob
        .send("<message type='chat' to='alice@alpha.test' id='b6'><body>https://files.prosody.test/u/plan.pdf</body>\
               <x xmlns='jabber:x:oob'><url>https://files.prosody.test/u/plan.pdf</url></x></message>")
        .await?;
    let f = w.alice_next("file").await?;
    assert_eq!(f["file"]["url"], "https://files.prosody.test/u/plan.pdf");
    assert_eq!(f["file"]["name"], "plan.pdf");
    w.alice_sends(
        json!({"id": "a6", "type": "file", "from": "alice", "to": "bob@prosody.test",
        "file": {"name": "q3.xlsx", "size": 2048, "mime": "application/vnd.ms-excel",
                 "url": "https://files.alpha.test/q3.xlsx"}}),
    )
    .await?;
    let oob = w
        .bob_gets("alice's file", |e| {
            e.get_child("x", "jabber:x:oob").is_some()
        })
        .await?;
    assert_eq!(
        oob.get_child("x", "jabber:x:oob")
            .and_then(|x| x.child_text("url", "jabber:x:oob"))
            .as_deref(),
        Some("https://files.alpha.test/q3.xlsx")
    );

    // Profiles (vcard-temp) both ways: bob's from Prosody's store, alice's from her edge.
    w.bob
        .send(
            "<iq type='set' id='vset'><vCard xmlns='vcard-temp'><FN>Bob Builder</FN>\
               <TITLE>Foreman</TITLE></vCard></iq>",
        )
        .await?;
    w.bob_gets("the vCard stored", |e| {
        e.name == "iq" && e.get_attr("id") == Some("vset")
    })
    .await?;
    w.alice_sends(
        json!({"id": "a7", "type": "profile_query", "from": "alice", "to": "bob@prosody.test"}),
    )
    .await?;
    let prof = w.alice_next("profile").await?;
    assert_eq!(prof["profile"]["display_name"], "Bob Builder");
    assert_eq!(prof["profile"]["title"], "Foreman");
    w.bob
        .send("<iq type='get' to='alice@alpha.test' id='vget'><vCard xmlns='vcard-temp'/></iq>")
        .await?;
    w.alice_next("profile_query").await?;
    w.alice_sends(
        json!({"id": "a8", "type": "profile", "from": "alice", "to": "bob@prosody.test",
        "profile": {"display_name": "Alice Liddell", "email": "alice@alpha.test"}}),
    )
    .await?;
    let v = w
        .bob_gets("alice's vCard", |e| {
            e.name == "iq" && e.get_attr("id") == Some("vget")
        })
        .await?;
    assert_eq!(v.get_attr("type"), Some("result"));
    assert_eq!(
        v.get_child("vCard", "vcard-temp")
            .and_then(|c| c.child_text("FN", "vcard-temp"))
            .as_deref(),
        Some("Alice Liddell")
    );

    // No federation rule between prosody.test and gamma.test: not-allowed, nothing relayed.
    let before = relayed_in(&w).await?;
    let mut gamma = Stream::open(
        &w.http,
        &w.relay.http_url(),
        "gamma.test",
        SECRET_GAMMA,
        None,
    )
    .await?;
    w.bob
        .send("<message type='chat' to='carol@gamma.test' id='g1'><body>let me in</body></message>")
        .await?;
    let err = w
        .bob_gets("the refusal", |e| {
            e.get_attr("id") == Some("g1") && e.get_attr("type") == Some("error")
        })
        .await?;
    let cond = err.get_child("error", NS_CLIENT).context("error element")?;
    assert!(
        cond.get_child("not-allowed", "urn:ietf:params:xml:ns:xmpp-stanzas")
            .is_some(),
        "{err:?}"
    );
    assert_eq!(
        relayed_in(&w).await?,
        before,
        "nothing from the refused stanza was journaled"
    );
    // The relay decided before answering; a later event on gamma's stream would be a leak.
    w.bob
        .send("<message type='chat' to='alice@alpha.test' id='b9'><body>marker</body></message>")
        .await?;
    assert_eq!(w.alice_next("message").await?["text"], "marker");
    gamma.expect_none(Duration::from_millis(200)).await?;

    // Stream Management ran on Prosody's stream to the relay, with counts Prosody agreed with.
    let plog = w.prosody.log_tail(100_000);
    // (Prosody writes attributes in no fixed order.)
    ensure!(
        plog.lines().any(|l| l.contains("Received[s2sout]: <a ")
            && l.contains("xmlns='urn:xmpp:sm:3'")
            && l.contains(" h='")),
        "no XEP-0198 acks"
    );
    ensure!(
        !plog.contains("The client says it handled"),
        "a wrong XEP-0198 count"
    );

    // The relay logged at trace level throughout: ids and kinds, never what people wrote.
    let out = w.relay.output()?;
    ensure!(out.contains("stanza journaled"), "trace logs were written");
    for secret in [
        "hi *alice*",
        "hello bob",
        "hi Alice",
        "hello again bob",
        "let me in",
        "at lunch",
        "in a meeting",
        "hi from bob",
        "plan.pdf",
        "q3.xlsx",
        "Bob Builder",
        "Alice Liddell",
    ] {
        ensure!(!out.contains(secret), "the relay's log holds {secret:?}");
    }
    Ok(())
}

/// `fedrelay_messages_in_total{edge="xmpp"}` summed over kinds.
async fn relayed_in(w: &World) -> Result<f64> {
    let m = common::metrics(&w.http, &w.relay.admin_url()).await?;
    Ok(m.lines()
        .filter(|l| l.starts_with("fedrelay_messages_in_total") && l.contains("edge=\"xmpp\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialback_authenticates_both_directions() -> Result<()> {
    let mut w = World::start(S2sAuth::Dialback).await?;
    w.bob
        .send("<message type='chat' to='alice@alpha.test' id='d1'><body>over dialback</body></message>")
        .await?;
    assert_eq!(w.alice_next("message").await?["text"], "over dialback");
    w.alice_sends(
        json!({"id": "d2", "type": "message", "from": "alice", "to": "bob@prosody.test",
        "text": "and back"}),
    )
    .await?;
    w.bob_gets("alice's answer", |e| body_of(e) == "and back")
        .await?;
    let log = w.prosody.log_tail(3000);
    assert!(
        !log.contains("Accepting SASL EXTERNAL"),
        "dialback was asked for, not EXTERNAL"
    );
    // Prosody → relay: Prosody sent its key, the relay asked Prosody back and got "valid".
    assert!(
        log.contains("sent dialback key on outgoing s2s stream"),
        "{log}"
    );
    assert!(
        log.contains("verified dialback key... it is valid"),
        "{log}"
    );
    // Relay → Prosody: Prosody asked the relay whether the key was its own.
    assert!(log.contains("asking alpha.test if key"), "{log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_restart_mid_conversation_loses_nothing_acknowledged() -> Result<()> {
    let mut w = World::start(S2sAuth::External).await?;
    // Both directions flowing before the restart.
    let total = 30;
    for i in 0..total / 2 {
        w.bob
            .send(&format!(
                "<message type='chat' to='alice@alpha.test' id='r{i}'><body>m{i}</body></message>"
            ))
            .await?;
    }
    for i in 0..5 {
        w.alice_sends(
            json!({"id": format!("x{i}"), "type": "message", "from": "alice",
            "to": "bob@prosody.test", "text": format!("from alice {i}")}),
        )
        .await?;
    }
    // Restart: SIGTERM (streams acknowledged and closed), then a new process on the same
    // ports and store.
    let status = w.relay.terminate(Duration::from_secs(20))?;
    ensure!(status.success(), "relay exited with {status}");
    let cfg = relay_config(
        &w.redis.url(),
        &w.certs,
        w.xmpp_port,
        w.prosody.s2s_port(),
        w.auth,
    );
    w.relay = RelayNode::start(&cfg)?;
    for i in total / 2..total {
        w.bob
            .send(&format!(
                "<message type='chat' to='alice@alpha.test' id='r{i}'><body>m{i}</body></message>"
            ))
            .await?;
    }
    // Every message bob sent either reached alice once or came back to bob as an error.
    let mut seen = std::collections::BTreeMap::new();
    let mut resumed = Stream::open(
        &w.http,
        &w.relay.http_url(),
        "alpha.test",
        SECRET_ALPHA,
        Some("0-0"),
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let bounced = |w: &World| {
        w.bob
            .received()
            .iter()
            .filter(|s| s.kind == "error" && s.id.starts_with('r'))
            .map(|s| s.id.clone())
            .collect::<std::collections::BTreeSet<_>>()
    };
    while seen.len() + bounced(&w).len() < total {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = resumed.next(left.min(Duration::from_secs(2))).await;
        match ev {
            Ok(ev) if ev.data["type"] == "message" => {
                let text = ev.data["text"].as_str().unwrap_or("").to_string();
                *seen.entry(text).or_insert(0) += 1;
            }
            Ok(_) => {}
            Err(_) if Instant::now() < deadline => {}
            Err(e) => bail!(
                "{} of {total} arrived, {} bounced: {e}\n{}\nprosody:\n{}",
                seen.len(),
                bounced(&w).len(),
                w.relay_log(),
                w.prosody.log_tail(3000)
            ),
        }
    }
    for (text, n) in &seen {
        ensure!(*n == 1, "{text} arrived {n} times");
    }
    // alice's messages journaled before the restart all reach bob, once each.
    for i in 0..5 {
        let want = format!("from alice {i}");
        w.bob_gets(&want, |e| body_of(e) == want).await?;
    }
    let dup = w
        .bob
        .received()
        .iter()
        .filter(|s| s.xml.contains("from alice 0<"))
        .count();
    ensure!(dup == 1, "alice's first message reached bob {dup} times");
    Ok(())
}

/// A raw TCP connection to the relay's s2s port.
async fn raw(port: u16) -> Result<tokio::net::TcpStream> {
    Ok(tokio::net::TcpStream::connect(("127.0.0.1", port)).await?)
}

/// Sends `payload` and reads until the relay closes the connection.
async fn answer_to(port: u16, payload: &[u8]) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = raw(port).await?;
    // The relay may close before reading everything: a failed write is fine.
    let _ = s.write_all(payload).await;
    let mut out = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    ensure!(r.is_ok(), "the relay did not close the connection");
    Ok(String::from_utf8_lossy(&out).into_owned())
}

const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:server' \
    xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' \
    from='prosody.test' to='alpha.test' version='1.0'>";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_xml_gets_the_right_stream_error_and_nothing_is_relayed() -> Result<()> {
    let w = World::start(S2sAuth::External).await?;
    let port = w.xmpp_port;
    let laughs = "<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol \"lol\">\
        <!ENTITY lol2 \"&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;\">\
        <!ENTITY lol3 \"&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;\">]>\
        <lolz>&lol3;</lolz>";
    let xxe = "<?xml version='1.0'?><!DOCTYPE foo [<!ENTITY xxe SYSTEM \"file:///etc/passwd\">]>\
        <stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' to='alpha.test' version='1.0'>&xxe;";
    let big = format!(
        "{HEADER}<message from='bob@prosody.test' to='alice@alpha.test'><body>{}</body></message>",
        "x".repeat(600 * 1024)
    );
    let deep = format!("{HEADER}{}", "<a>".repeat(200));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("billion laughs", laughs.as_bytes().to_vec(), "restricted-xml"),
        ("external entity", xxe.as_bytes().to_vec(), "restricted-xml"),
        ("comment", format!("{HEADER}<!-- hi -->").into_bytes(), "restricted-xml"),
        ("processing instruction", format!("{HEADER}<?evil x?>").into_bytes(), "restricted-xml"),
        ("undeclared entity", format!("{HEADER}<message>&ent;</message>").into_bytes(), "restricted-xml"),
        ("oversized stanza", big.into_bytes(), "policy-violation"),
        ("over-deep stanza", deep.into_bytes(), "policy-violation"),
        ("invalid UTF-8", [HEADER.as_bytes(), b"<message><body>\xff\xfe</body></message>"].concat(), "not-well-formed"),
        ("mismatched tags", format!("{HEADER}<message></iq>").into_bytes(), "not-well-formed"),
        ("wrong namespace", HEADER.replace("jabber:server'", "jabber:client'").into_bytes(), "invalid-namespace"),
        ("unknown host", HEADER.replace("to='alpha.test'", "to='evil.test'").into_bytes(), "host-unknown"),
        ("stanza before TLS", format!("{HEADER}<message from='bob@prosody.test' to='alice@alpha.test'><body>x</body></message>").into_bytes(), "policy-violation"),
        ("a stream never closed", HEADER.as_bytes().to_vec(), "connection-timeout"),
    ];
    for (what, payload, condition) in cases {
        let answer = answer_to(port, &payload)
            .await
            .with_context(|| what.to_string())?;
        ensure!(
            answer.contains(&format!(
                "<{condition} xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
            )),
            "{what}: expected {condition}, got {answer:.400}"
        );
        ensure!(
            answer.ends_with("</stream:stream>"),
            "{what}: stream not closed: {answer:.400}"
        );
    }
    // The oversized stanza's error says why.
    let answer = answer_to(
        port,
        format!("{HEADER}<message><body>{}", "y".repeat(600 * 1024)).as_bytes(),
    )
    .await?;
    assert!(
        answer.contains("<stanza-too-big xmlns='urn:xmpp:errors'/>"),
        "{answer:.400}"
    );
    assert_eq!(relayed_in(&w).await?, 0.0, "nothing relayed");
    // And the relay still federates.
    w.bob
        .send(
            "<message type='chat' to='alice@alpha.test' id='ok1'><body>still here</body></message>",
        )
        .await?;
    let mut w = w;
    assert_eq!(w.alice_next("message").await?["text"], "still here");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_teams_user_and_a_prosody_user_chat() -> Result<()> {
    use common::teams::{self, Rig, User};
    use test_support::fake_bot_connector::{FakeBotConnector, FakeConfig};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir()?;
    certs::issue_named(
        dir.path(),
        "",
        "fedrelay test CA",
        &[("prosody", &["prosody.test"]), ("relay", &["contoso.com"])],
    )?;
    let p = |f: &str| dir.path().join(f);
    let redis = RedisServer::start()?;
    let fake = FakeBotConnector::start(FakeConfig::default()).await?;
    let xmpp_port = free_port()?;
    let mut pc = ProsodyConfig::new("prosody.test", &p("prosody.pem"), &p("prosody.key"));
    pc.auth = S2sAuth::External;
    pc.peer_ca = Some(p("ca.pem"));
    pc.peers = vec![Peer {
        domain: "contoso.com".into(),
        port: xmpp_port,
    }];
    let prosody = Prosody::start(pc).await?;
    prosody.register("bob", "bob-password")?;
    let config = format!(
        r#"{teams}
[xmpp]
listen = "127.0.0.1:{xmpp_port}"
tls_cert = "{cert}"
tls_key = "{key}"
tls_ca = "{ca}"
[[xmpp.peers]]
domain = "prosody.test"
address = "127.0.0.1:{s2s}"
auth = "external"
[[domains]]
name = "prosody.test"
platform = "xmpp"
[[federation]]
between = ["contoso.com", "prosody.test"]
"#,
        teams = teams::teams_config(&fake, &redis.url(), ""),
        cert = p("relay.pem").display(),
        key = p("relay.key").display(),
        ca = p("ca.pem").display(),
        s2s = prosody.s2s_port(),
    );
    let rig = Rig {
        relay: RelayNode::start(&config)?,
        fake,
        redis,
    };
    let alice = User::new("alice", "Alice Liddell", 1);
    teams::install(&rig, &alice).await?;
    let bob = XmppClient::login(
        "bob@prosody.test",
        "bob-password",
        prosody.c2s_port(),
        &p("ca.pem"),
    )
    .await?;
    let say = |text: &str| teams::personal(&rig, &alice, "message", json!({"text": text}));

    // alice invites bob from Teams; bob approves in his XMPP client.
    teams::send_ok(&rig, &say("invite bob@prosody.test")).await?;
    bob.wait_stanza("alice's request", T, |s| {
        s.name == "presence" && s.kind == "subscribe" && s.from.starts_with("alice@contoso.com")
    })
    .await?;
    bob.send("<presence to='alice@contoso.com' type='subscribed'/>")
        .await?;
    teams::wait_post(
        &rig,
        &alice.conversation,
        &["bob@prosody.test", "accepted"],
        T,
    )
    .await?;

    // Chat both ways.
    teams::send_ok(&rig, &say("hello bob, from Teams")).await?;
    let m = bob
        .wait_stanza("alice's message", T, |s| {
            s.name == "message" && s.xml.contains("from Teams")
        })
        .await?;
    assert!(m.from.starts_with("alice@contoso.com"), "{m}");
    bob.send("<message type='chat' to='alice@contoso.com' id='t1'><body>hi alice, from *XMPP*</body></message>")
        .await?;
    teams::wait_post(
        &rig,
        &alice.conversation,
        &["bob@prosody.test", "XMPP", "hi alice, from <b>XMPP</b>"],
        T,
    )
    .await?;
    Ok(())
}
