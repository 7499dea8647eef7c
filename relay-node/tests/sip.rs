//! The SIP/SIMPLE edge end to end: real sipp peers (over UDP, TCP, and TLS through stunnel)
//! and a relay in front of a real Redis, with users on the HTTP edge (and on Teams through
//! the fake Bot Connector, and on a real Prosody) on the other side: messages and typing both
//! ways, retransmissions, presence and contact requests, policy, rate limits, digest
//! authentication, IM sessions. Every relay runs with `relay_node=trace` logging, and no
//! message text, note, display name or password may show up in what it writes.
//!
//! The sipp scenarios are in `tests/sip/`; their `-key` parameters are described in each.

mod common;

use anyhow::{Context, Result, bail, ensure};
use base64::Engine as _;
use common::teams::{self, User};
use common::{Stream, client, post};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use test_support::fake_bot_connector::{FakeBotConnector, FakeConfig};
use test_support::prosody::{Peer as ProsodyPeer, Prosody, ProsodyConfig, S2sAuth};
use test_support::sipp::{Direction, Sipp, SippOptions, SippRun, SippTransport, TracedMessage};
use test_support::stunnel::{Stunnel, StunnelClient, StunnelServer};
use test_support::xmpp_client::XmppClient;
use test_support::{RedisServer, RelayNode, certs, free_port, free_udp_tcp_port};

const T: Duration = Duration::from_secs(15);
const SECRET_ALPHA: &str = "secret-of-alpha-0123456789";
const SECRET_BETA: &str = "secret-of-beta-0123456789";
/// bob's display name in every From he sends.
const BOB_NAME: &str = "Bobby Sipwright";

const MESSAGE_UAC: &str = include_str!("sip/message_uac.xml");
const MESSAGE_UAS: &str = include_str!("sip/message_uas.xml");
const FIXED_MESSAGE_UAC: &str = include_str!("sip/fixed_message_uac.xml");
const BURST_UAC: &str = include_str!("sip/burst_uac.xml");
const SUBSCRIBE_UAC: &str = include_str!("sip/subscribe_uac.xml");
const SUBSCRIBE_ONCE_UAC: &str = include_str!("sip/subscribe_once_uac.xml");
const SUBSCRIBE_UAS: &str = include_str!("sip/subscribe_uas.xml");
const SUBSCRIBE_DECLINE_UAS: &str = include_str!("sip/subscribe_decline_uas.xml");
const AUTH_UAS: &str = include_str!("sip/auth_uas.xml");
const SESSION_UAC: &str = include_str!("sip/session_uac.xml");
const SESSION_UAS: &str = include_str!("sip/session_uas.xml");
const SUBSCRIBE_DECLINED_UAC: &str = include_str!("sip/subscribe_declined_uac.xml");
const SLOW_MESSAGE_UAS: &str = include_str!("sip/slow_message_uas.xml");
const AUTH_SESSION_UAS: &str = include_str!("sip/auth_session_uas.xml");
const NOTIFY_FIRST_UAS: &str = include_str!("sip/notify_first_uas.xml");

const CT_ISCOMPOSING: &str = "application/im-iscomposing+xml";

/// An isComposing document (RFC 3994).
fn is_composing(state: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><isComposing xmlns=\"urn:ietf:params:xml:ns:im-iscomposing\"><state>{state}</state><contenttype>text/plain</contenttype></isComposing>"
    )
}

/// A PIDF document (RFC 3863): open or closed, with a note.
fn pidf(entity: &str, basic: &str, note: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><presence xmlns=\"urn:ietf:params:xml:ns:pidf\" entity=\"sip:{entity}\"><tuple id=\"t1\"><status><basic>{basic}</basic></status><note>{note}</note></tuple></presence>"
    )
}

// ---------------------------------------------------------------------------------------
// The relay's config.

/// One SIP peer domain: its `[[sip.peers]]` entry, a `[[domains]]` entry with
/// `platform = "sip"` and a federation rule with alpha.test.
struct Peer {
    domain: &'static str,
    transport: &'static str,
    address: SocketAddr,
    /// More keys of its `[[sip.peers]]` entry.
    extra: String,
}

impl Peer {
    fn new(domain: &'static str, transport: &'static str, address: SocketAddr) -> Self {
        Self {
            domain,
            transport,
            address,
            extra: String::new(),
        }
    }

    /// A peer reached over UDP on 127.0.0.1:`port`.
    fn udp(domain: &'static str, port: u16) -> Self {
        Self::new(domain, "udp", loopback(port))
    }

    fn with(mut self, extra: &str) -> Self {
        self.extra.push_str(extra);
        self.extra.push('\n');
        self
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A relay serving alpha.test and beta.test on the HTTP edge (federated with each other),
/// with SIP over UDP and TCP on `{SIP_PORT}` (plus `sip_extra` in `[sip]`), each of `peers`
/// federated with alpha.test, and `tail` at the end (more domains and rules).
fn relay_config(redis_url: &str, sip_extra: &str, peers: &[Peer], tail: &str) -> String {
    let mut c = format!(
        r#"node_id = "sip-1"
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
log_level = "info,relay_node=trace"
"#
    );
    c.push_str(&sip_section(sip_extra, peers));
    c.push_str(&format!(
        r#"[[domains]]
name = "alpha.test"
platform = "http"
secret = "{SECRET_ALPHA}"
[[domains]]
name = "beta.test"
platform = "http"
secret = "{SECRET_BETA}"
[[federation]]
between = ["alpha.test", "beta.test"]
"#
    ));
    c.push_str(&peer_domains(peers, "alpha.test"));
    c.push_str(tail);
    c
}

/// The `[sip]` section with its peers.
fn sip_section(sip_extra: &str, peers: &[Peer]) -> String {
    let mut c = format!(
        "[sip]\nudp = \"127.0.0.1:{{SIP_PORT}}\"\ntcp = \"127.0.0.1:{{SIP_PORT}}\"\n{sip_extra}\n"
    );
    for p in peers {
        c.push_str(&format!(
            "[[sip.peers]]\ndomain = \"{}\"\ntransport = \"{}\"\naddress = \"{}\"\n",
            p.domain, p.transport, p.address
        ));
        if p.transport != "tls" && !p.extra.contains("sources") {
            c.push_str("sources = [\"127.0.0.1\"]\n");
        }
        c.push_str(&p.extra);
    }
    c
}

/// The peers' `[[domains]]` entries, each federated with `with`.
fn peer_domains(peers: &[Peer], with: &str) -> String {
    peers
        .iter()
        .map(|p| {
            format!(
                "[[domains]]\nname = \"{d}\"\nplatform = \"sip\"\n[[federation]]\nbetween = [\"{with}\", \"{d}\"]\n",
                d = p.domain
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// A test world: Redis, the relay, alice's event stream.

struct World {
    _redis: RedisServer,
    redis_url: String,
    relay: RelayNode,
    http: reqwest::Client,
    alice: Stream,
}

impl World {
    /// Starts Redis and a relay with the config `make` writes for Redis's URL, and opens
    /// alpha.test's stream.
    async fn start(make: impl FnOnce(&str) -> String) -> Result<Self> {
        let redis = RedisServer::start()?;
        let redis_url = redis.url();
        let relay = RelayNode::start(&make(&redis_url))?;
        let http = client()?;
        let alice =
            Stream::open(&http, &relay.http_url(), "alpha.test", SECRET_ALPHA, None).await?;
        Ok(Self {
            _redis: redis,
            redis_url,
            relay,
            http,
            alice,
        })
    }

    /// The relay's SIP address over UDP (and TCP: the same port).
    fn sip(&self) -> SocketAddr {
        loopback(self.relay.sip_port)
    }

    /// alice (alpha.test, HTTP edge) sends an event; it must be accepted.
    async fn alice_sends(&self, ev: Value) -> Result<Value> {
        self.sends("alpha.test", SECRET_ALPHA, ev).await
    }

    async fn sends(&self, domain: &str, secret: &str, ev: Value) -> Result<Value> {
        let (s, v) = post(&self.http, &self.relay.http_url(), domain, secret, &ev).await?;
        ensure!(s == 202, "{ev} answered {s}: {v}");
        Ok(v)
    }

    /// The next event on alice's stream that is not presence; it must be a `kind`.
    async fn alice_next(&mut self, kind: &str) -> Result<Value> {
        let deadline = Instant::now() + T;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ev = self.alice.next(left).await.with_context(|| {
                format!("alice waiting for {kind}; relay:\n{}", self.relay_log())
            })?;
            if ev.data["type"] == kind {
                return Ok(ev.data);
            }
            ensure!(
                ev.data["type"] == "presence",
                "alice expected {kind}, got {}",
                ev.data
            );
        }
    }

    /// The last lines of the relay's output.
    fn relay_log(&self) -> String {
        let out = self.relay.output().unwrap_or_default();
        let lines: Vec<&str> = out.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// Fails if the relay's output holds any of `secrets` (texts, notes, display names).
    fn assert_no_content(&self, secrets: &[&str]) -> Result<()> {
        assert_no_content(&self.relay, secrets)
    }
}

fn assert_no_content(relay: &RelayNode, secrets: &[&str]) -> Result<()> {
    let out = relay.output()?;
    // The SIP edge's own debug lines are there: the level let everything through.
    ensure!(
        out.lines().any(|l| l.contains("\"level\":\"DEBUG\"")
            && l.contains("\"target\":\"relay_node::edges::sip")),
        "the relay logged nothing of the SIP edge below info:\n{out}"
    );
    for s in secrets {
        let needle = s.trim();
        ensure!(!needle.is_empty(), "an empty secret");
        if let Some(line) = out.lines().find(|l| l.contains(needle)) {
            bail!("the relay's output holds {needle:?}:\n{line}");
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// sipp.

/// `-key name value` for each pair (generic parameters the scenarios name as `[name]`).
fn keys(mut o: SippOptions, kv: &[(&str, &str)]) -> SippOptions {
    for (k, v) in kv {
        o = o.arg("-key").arg(k).arg(v);
    }
    o
}

/// message_uac.xml: one MESSAGE From `from` (display name [`BOB_NAME`]) to `to`.
fn message_uac(remote: SocketAddr, from: &str, to: &str, ctype: &str, body: &str) -> SippOptions {
    keys(
        SippOptions::uac(MESSAGE_UAC, remote),
        &[
            ("from", from),
            ("display", BOB_NAME),
            ("to", to),
            ("ctype", ctype),
            ("body", body),
        ],
    )
}

/// Runs sipp to its end (blocking this worker thread only) and returns what it did.
fn run(opts: SippOptions) -> Result<SippRun> {
    tokio::task::block_in_place(|| Sipp::start(opts)?.wait(T))
}

/// Blocks this worker thread on a running sipp.
fn blocking<R>(f: impl FnOnce() -> Result<R>) -> Result<R> {
    tokio::task::block_in_place(f)
}

/// The final responses a run received, in order.
fn finals(run: &SippRun) -> Vec<TracedMessage> {
    run.traced()
        .into_iter()
        .filter(|m| m.direction == Direction::Received && m.status().is_some_and(|s| s >= 200))
        .collect()
}

/// The one final response a UAC's run received.
fn final_response(run: &SippRun) -> Result<TracedMessage> {
    let f = finals(run);
    ensure!(
        f.len() == 1,
        "{} final responses:\n{}",
        f.len(),
        run.messages
    );
    f.into_iter().next().context("no final response")
}

/// Runs a UAC that must get `code` as its one final response; returns it and the run.
fn expect_answer(opts: SippOptions, code: u16) -> Result<(TracedMessage, SippRun)> {
    let r = run(opts)?;
    let resp = final_response(&r)?;
    ensure!(
        resp.status() == Some(code),
        "expected {code}, got {}:\n{}",
        resp.first_line(),
        r.messages
    );
    Ok((resp, r))
}

/// A header's parameter (`tag`, `branch`…) in a header value.
fn param(value: &str, name: &str) -> Option<String> {
    value.split(';').skip(1).find_map(|p| {
        let (n, v) = p.split_once('=')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// Checks a MESSAGE the relay sent to a SIP user: alice to `to`, of `ctype`.
fn check_from_alice(m: &TracedMessage, to: &str, ctype: &str) -> Result<()> {
    ensure!(
        m.first_line() == format!("MESSAGE sip:{to} SIP/2.0"),
        "{}",
        m.text
    );
    let from = m.header("From").unwrap_or_default();
    ensure!(
        from.starts_with("<sip:alice@alpha.test>") && param(&from, "tag").is_some(),
        "From: {from}"
    );
    ensure!(m.header("To") == Some(format!("<sip:{to}>")), "{}", m.text);
    let ct = m.header("Content-Type").unwrap_or_default();
    ensure!(
        ct.split(';').next() == Some(ctype),
        "Content-Type {ct}, not {ctype}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Pager-mode messages and typing, both ways, over UDP.

/// bob (`bob`, a SIP user) sends alice plain text, HTML with bold and isComposing through
/// `remote` (the relay, or a stunnel in front of it) over `transport`: each is answered 200
/// and reaches alice's stream as text, styled text and typing. Returns the texts sent.
async fn bob_to_alice(
    w: &mut World,
    remote: SocketAddr,
    transport: SippTransport,
    bob: &str,
    over: &str,
) -> Result<Vec<String>> {
    let uac = |ctype: &str, body: &str| {
        message_uac(remote, bob, "alice@alpha.test", ctype, body).transport(transport)
    };
    // Plain text: the body as sent (sipp ends it with CRLF), unstyled.
    let plain = format!("Plain words from bob over {over}");
    let (resp, r) = expect_answer(uac("text/plain", &plain), 200)?;
    ensure!(resp.transport == transport_name(transport), "{resp:?}");
    let sent = r.messages_sent("MESSAGE");
    let m = w.alice_next("message").await?;
    ensure!(
        m["from"] == bob && m["from_platform"] == "sip" && m["to"] == "alice@alpha.test",
        "{m}"
    );
    ensure!(m["text"] == sent[0].body(), "{m}");
    ensure!(
        m["text"].as_str().map(str::trim_end) == Some(plain.as_str()),
        "{m}"
    );
    ensure!(
        m["rich"].as_array().is_none_or(Vec::is_empty),
        "plain text came styled: {m}"
    );

    // HTML with bold: the text, and the bold run.
    let html = format!("<b>Bold</b> news over {over}");
    expect_answer(uac("text/html", &html), 200)?;
    let m = w.alice_next("message").await?;
    let rest = format!(" news over {over}");
    ensure!(
        m["from"] == bob && m["text"] == format!("Bold{rest}"),
        "{m}"
    );
    ensure!(
        m["rich"] == json!([{"text": "Bold", "bold": true}, {"text": rest}]),
        "{m}"
    );

    // isComposing (RFC 3994): typing.
    expect_answer(uac(CT_ISCOMPOSING, &is_composing("active")), 200)?;
    let t = w.alice_next("typing").await?;
    ensure!(t["from"] == bob && t["active"] == true, "{t}");
    Ok(vec![plain, rest])
}

fn transport_name(t: SippTransport) -> &'static str {
    match t {
        SippTransport::Udp => "UDP",
        SippTransport::Tcp => "TCP",
    }
}

/// alice sends `bob` (a SIP user whose UAS listens on `port` over `transport`, or behind a
/// stunnel that forwards there) plain text, styled text and typing: three MESSAGEs with her
/// text as body (text/plain, then text/html) and isComposing, each its own transaction.
/// Returns them, and the texts sent.
async fn alice_to_bob(
    w: &World,
    port: u16,
    transport: SippTransport,
    bob: &str,
    over: &str,
) -> Result<(Vec<TracedMessage>, Vec<String>)> {
    let mut uas = Sipp::start(
        SippOptions::uas(MESSAGE_UAS)
            .transport(transport)
            .port(port)
            .calls(3)
            .timeout(T),
    )?;
    let reply = format!("A plain reply from alice over {over}");
    w.alice_sends(
        json!({"id": format!("{over}-1"), "type": "message", "from": "alice",
        "to": bob, "text": reply}),
    )
    .await?;
    let got = blocking(|| uas.wait_received("MESSAGE", 1, T))?;
    check_from_alice(&got[0], bob, "text/plain")?;
    ensure!(got[0].body() == reply, "body {:?}", got[0].body());

    let styled = format!(" soon over {over}");
    w.alice_sends(
        json!({"id": format!("{over}-2"), "type": "message", "from": "alice",
        "to": bob, "text": format!("see you{styled}"),
        "rich": [{"text": "see "}, {"text": "you", "bold": true}, {"text": styled}]}),
    )
    .await?;
    let got = blocking(|| uas.wait_received("MESSAGE", 2, T))?;
    check_from_alice(&got[1], bob, "text/html")?;
    ensure!(
        got[1].body() == format!("see <b>you</b>{styled}"),
        "body {:?}",
        got[1].body()
    );

    w.alice_sends(
        json!({"id": format!("{over}-3"), "type": "typing", "from": "alice",
        "to": bob, "active": true}),
    )
    .await?;
    let got = blocking(|| uas.wait_received("MESSAGE", 3, T))?;
    check_from_alice(&got[2], bob, CT_ISCOMPOSING)?;
    ensure!(
        got[2].body().contains("<state>active</state>"),
        "body {:?}",
        got[2].body()
    );
    let run = blocking(|| uas.wait(T))?;
    let got = run.messages_received("MESSAGE");
    let mut call_ids: Vec<_> = got.iter().filter_map(|m| m.header("Call-ID")).collect();
    call_ids.dedup();
    ensure!(got.len() == 3 && call_ids.len() == 3, "{}", run.messages);
    Ok((got, vec![reply, styled]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_and_typing_both_ways_over_udp() -> Result<()> {
    let bob_port = free_udp_tcp_port()?;
    let mut w =
        World::start(|redis| relay_config(redis, "", &[Peer::udp("sip.test", bob_port)], ""))
            .await?;
    let relay = w.sip();
    let mut texts = bob_to_alice(&mut w, relay, SippTransport::Udp, "bob@sip.test", "UDP").await?;
    let (got, sent) = alice_to_bob(&w, bob_port, SippTransport::Udp, "bob@sip.test", "UDP").await?;
    ensure!(got.iter().all(|m| m.transport == "UDP"), "{got:?}");
    texts.extend(sent);
    texts.push(BOB_NAME.into());
    w.assert_no_content(&texts.iter().map(String::as_str).collect::<Vec<_>>())
}

// ---------------------------------------------------------------------------------------
// The same over TCP, and over TLS through stunnel both ways; a certificate for another
// domain proves nothing.

/// Certificates of one CA: the relay's (its hosted domains), sip.test's, and other.test's.
struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    fn new() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        certs::issue_named(
            dir.path(),
            "",
            "fedrelay sip test CA",
            &[
                ("relay", &["alpha.test", "beta.test"]),
                ("sip", &["sip.test"]),
                ("other", &["other.test"]),
            ],
        )?;
        Ok(Self { dir })
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }
}

/// A stunnel client into the relay's TLS listener, presenting `leaf`'s certificate and
/// checking the relay's for alpha.test.
fn tls_client(certs: &Certs, relay_tls: SocketAddr, leaf: &str) -> Result<Stunnel> {
    Stunnel::client(StunnelClient {
        connect: relay_tls,
        ca: certs.path("ca.pem"),
        check_host: Some("alpha.test".into()),
        cert: Some(certs.path(&format!("{leaf}.pem"))),
        key: Some(certs.path(&format!("{leaf}.key"))),
    })
}

fn via_is(m: &TracedMessage, proto: &str) -> bool {
    m.header("Via")
        .is_some_and(|v| v.starts_with(&format!("SIP/2.0/{proto} ")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_over_tcp_and_over_tls_through_stunnel() -> Result<()> {
    let certs = Certs::new()?;
    // tcp.test: bob's UAS on TCP. sip.test: over TLS, stunnel in front of bob's UAS.
    let tcp_bob = free_udp_tcp_port()?;
    let tls_bob = free_udp_tcp_port()?;
    let relay_tls = loopback(free_port()?);
    let tls_server = Stunnel::server(StunnelServer {
        connect: loopback(tls_bob),
        cert: certs.path("sip.pem"),
        key: certs.path("sip.key"),
        client_ca: Some(certs.path("ca.pem")),
        client_check_host: Some("alpha.test".into()),
    })?;
    let sip_extra = format!(
        "tls = \"{relay_tls}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\ntls_ca = \"{}\"",
        certs.path("relay.pem").display(),
        certs.path("relay.key").display(),
        certs.path("ca.pem").display(),
    );
    let peers = [
        Peer::new("tcp.test", "tcp", loopback(tcp_bob)),
        Peer::new("sip.test", "tls", tls_server.addr()),
    ];
    let mut w = World::start(|redis| relay_config(redis, &sip_extra, &peers, "")).await?;
    let mut texts = Vec::new();

    // TCP both ways.
    let relay = w.sip();
    texts.extend(bob_to_alice(&mut w, relay, SippTransport::Tcp, "bob@tcp.test", "TCP").await?);
    let (got, sent) = alice_to_bob(&w, tcp_bob, SippTransport::Tcp, "bob@tcp.test", "TCP").await?;
    ensure!(
        got.iter().all(|m| m.transport == "TCP" && via_is(m, "TCP")),
        "{got:?}"
    );
    texts.extend(sent);

    // TLS, bob → alice: through a stunnel presenting sip.test's certificate and checking
    // the relay's for alpha.test.
    let client = tls_client(&certs, relay_tls, "sip")?;
    texts.extend(
        bob_to_alice(
            &mut w,
            client.addr(),
            SippTransport::Tcp,
            "bob@sip.test",
            "TLS",
        )
        .await
        .with_context(|| format!("stunnel client:\n{}", client.log()))?,
    );
    ensure!(
        client.log().contains("Certificate accepted at depth=0"),
        "stunnel did not check the relay's certificate:\n{}",
        client.log()
    );

    // TLS, alice → bob: the relay connects to sip.test's stunnel with its client certificate.
    let (got, sent) = alice_to_bob(&w, tls_bob, SippTransport::Tcp, "bob@sip.test", "TLS")
        .await
        .with_context(|| format!("stunnel server:\n{}", tls_server.log()))?;
    ensure!(got.iter().all(|m| via_is(m, "TLS")), "{got:?}");
    texts.extend(sent);
    ensure!(
        tls_server.log().contains("Certificate accepted at depth=0"),
        "stunnel did not get the relay's client certificate:\n{}",
        tls_server.log()
    );

    // A TLS client whose certificate names other.test cannot send for sip.test.
    let impostor = tls_client(&certs, relay_tls, "other")?;
    let forged = "Forged over TLS";
    let (resp, _) = expect_answer(
        message_uac(
            impostor.addr(),
            "bob@sip.test",
            "alice@alpha.test",
            "text/plain",
            forged,
        )
        .transport(SippTransport::Tcp),
        403,
    )?;
    ensure!(
        resp.first_line().contains("sip.test"),
        "{}",
        resp.first_line()
    );
    // Nothing of it reached alice: her next message is the next one bob sends.
    let after = "After the impostor";
    expect_answer(
        message_uac(
            client.addr(),
            "bob@sip.test",
            "alice@alpha.test",
            "text/plain",
            after,
        )
        .transport(SippTransport::Tcp),
        200,
    )?;
    let m = w.alice_next("message").await?;
    ensure!(m["text"].as_str().map(str::trim_end) == Some(after), "{m}");

    texts.extend([forged.to_string(), after.to_string(), BOB_NAME.to_string()]);
    w.assert_no_content(&texts.iter().map(String::as_str).collect::<Vec<_>>())
}

// ---------------------------------------------------------------------------------------
// Retransmissions over UDP: answered every time, relayed once.

/// fixed_message_uac.xml from `port`: a MESSAGE with the given branch, From tag and Call-ID
/// (sipp's Call-ID format, here without anything that varies).
fn fixed_message(
    relay: SocketAddr,
    port: u16,
    body: &str,
    branch: &str,
    tag: &str,
    call_id: &str,
) -> SippOptions {
    keys(
        SippOptions::uac(FIXED_MESSAGE_UAC, relay)
            .port(port)
            .arg("-cid_str")
            .arg(call_id),
        &[
            ("from", "bob@sip.test"),
            ("display", BOB_NAME),
            ("to", "alice@alpha.test"),
            ("ctype", "text/plain"),
            ("body", body),
            ("via_branch", branch),
            ("from_tag", tag),
        ],
    )
}

/// A counter's value in the relay's `/metrics`.
async fn metric(w: &World, name: &str) -> Result<f64> {
    let text = common::metrics(&w.http, &w.relay.admin_url()).await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retransmissions_are_answered_and_relayed_once() -> Result<()> {
    // T1 = 100 ms: the relay's own retransmissions at 100, 300, 700 ms…
    let bob_port = free_udp_tcp_port()?;
    let mut w = World::start(|redis| {
        relay_config(redis, "t1_ms = 100", &[Peer::udp("sip.test", bob_port)], "")
    })
    .await?;
    let relay = w.sip();
    // One port for bob's three sends: the same sent-by in each Via.
    let port = free_udp_tcp_port()?;
    let text = "Said once, sent three times";
    let call_id = "retrans-1@127.0.0.1";
    let branch = "z9hG4bK-retrans-first";
    let (first, r1) = expect_answer(
        fixed_message(relay, port, text, branch, "bobtag-1", call_id),
        200,
    )?;
    // The same request again, byte for byte: a retransmission of the transaction.
    let (second, r2) = expect_answer(
        fixed_message(relay, port, text, branch, "bobtag-1", call_id),
        200,
    )?;
    ensure!(
        r1.messages_sent("MESSAGE")[0].text == r2.messages_sent("MESSAGE")[0].text,
        "the two sends differ"
    );
    // The transaction's answer again: same To tag, same branch.
    let tag = |m: &TracedMessage| m.header("To").and_then(|t| param(&t, "tag"));
    ensure!(
        tag(&first).is_some() && tag(&first) == tag(&second),
        "{first:?}\n{second:?}"
    );
    for m in [&first, &second] {
        ensure!(
            m.header("Via").and_then(|v| param(&v, "branch")).as_deref() == Some(branch),
            "{m:?}"
        );
        ensure!(m.header("Call-ID").as_deref() == Some(call_id), "{m:?}");
    }
    ensure!(
        metric(&w, "fedrelay_sip_retransmissions_absorbed_total").await? >= 1.0,
        "the retransmission was not absorbed by the transaction layer"
    );
    // The same Call-ID and CSeq in a new transaction (a peer's retry after a lost 200).
    expect_answer(
        fixed_message(
            relay,
            port,
            text,
            "z9hG4bK-retrans-second",
            "bobtag-1",
            call_id,
        ),
        200,
    )?;

    // alice got the text once: the next message after it is the one bob sends next.
    let marker = "And this one once too";
    expect_answer(
        message_uac(
            relay,
            "bob@sip.test",
            "alice@alpha.test",
            "text/plain",
            marker,
        ),
        200,
    )?;
    let m = w.alice_next("message").await?;
    ensure!(m["text"].as_str().map(str::trim_end) == Some(text), "{m}");
    let m = w.alice_next("message").await?;
    ensure!(
        m["text"].as_str().map(str::trim_end) == Some(marker),
        "alice's second message: {m}"
    );

    // The relay's own MESSAGE to a peer slow to answer: sent again until the 200, the same
    // request each time.
    let before = metric(&w, "fedrelay_sip_retransmissions_total").await?;
    let mut slow = Sipp::start(
        SippOptions::uas(SLOW_MESSAGE_UAS)
            .port(bob_port)
            .timeout(T)
            .set("pause", "450"),
    )?;
    let question = "Are you there, bob?";
    w.alice_sends(json!({"id": "r1", "type": "message", "from": "alice",
        "to": "bob@sip.test", "text": question}))
        .await?;
    let r = blocking(|| slow.wait(T))?;
    let got = r.messages_received("MESSAGE");
    ensure!(
        got.len() >= 2 && got.iter().all(|m| m.text == got[0].text),
        "{} copies:\n{}",
        got.len(),
        r.messages
    );
    check_from_alice(&got[0], "bob@sip.test", "text/plain")?;
    ensure!(got[0].body() == question, "{:?}", got[0]);
    ensure!(
        metric(&w, "fedrelay_sip_retransmissions_total").await? >= before + 1.0,
        "the relay's retransmissions are not counted"
    );
    w.assert_no_content(&[text, marker, question, BOB_NAME])
}

// ---------------------------------------------------------------------------------------
// Policy: no open relay.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_outside_policy_get_403_and_go_nowhere() -> Result<()> {
    let peers = [
        Peer::udp("sip.test", free_port()?),
        // A declared SIP domain that may send only from a network the test is not on.
        Peer::new("pbx.test", "udp", "10.255.0.9:5060".parse()?)
            .with("sources = [\"10.255.0.0/24\"]"),
    ];
    let mut w = World::start(|redis| relay_config(redis, "", &peers, "")).await?;
    let relay = w.sip();
    let mut beta =
        Stream::open(&w.http, &w.relay.http_url(), "beta.test", SECRET_BETA, None).await?;

    // A domain the relay does not serve.
    let (resp, _) = expect_answer(
        message_uac(
            relay,
            "bob@sip.test",
            "carol@elsewhere.test",
            "text/plain",
            "Not served here",
        ),
        403,
    )?;
    ensure!(
        resp.first_line().contains("elsewhere.test"),
        "{}",
        resp.first_line()
    );
    // A declared domain no rule connects with sip.test.
    let (resp, _) = expect_answer(
        message_uac(
            relay,
            "bob@sip.test",
            "carol@beta.test",
            "text/plain",
            "No rule for this",
        ),
        403,
    )?;
    ensure!(resp.first_line().starts_with("SIP/2.0 403"), "{resp:?}");
    // beta.test's stream: the first thing on it is what alice sends carol afterwards.
    w.alice_sends(json!({"id": "p1", "type": "message", "from": "alice",
        "to": "carol@beta.test", "text": "alice to carol"}))
        .await?;
    let ev = beta.next(T).await?;
    ensure!(
        ev.data["type"] == "message" && ev.data["from"] == "alice@alpha.test",
        "beta's first event: {}",
        ev.data
    );
    // Both refusals are in the metadata log, without content.
    let entries = common::metadata_entries(&w.redis_url).await?;
    for (to, why) in [
        ("carol@elsewhere.test", "domain_not_served"),
        ("carol@beta.test", "not_federated"),
    ] {
        let get = |e: &std::collections::HashMap<String, String>, k: &str| {
            e.get(k).cloned().unwrap_or_default()
        };
        ensure!(
            entries.iter().any(|e| {
                get(e, "from") == "bob@sip.test"
                    && get(e, "to") == to
                    && get(e, "kind") == why
                    && get(e, "msg").is_empty()
            }),
            "no refusal of bob → {to} in {entries:?}"
        );
    }

    // A MESSAGE claiming pbx.test, from an address not in pbx.test's sources.
    let (resp, _) = expect_answer(
        message_uac(
            relay,
            "mallory@pbx.test",
            "alice@alpha.test",
            "text/plain",
            "Spoofed source",
        ),
        403,
    )?;
    ensure!(
        resp.first_line().contains("pbx.test"),
        "{}",
        resp.first_line()
    );
    // alice's first message is the one bob sends next.
    let marker = "Legit after the refusals";
    expect_answer(
        message_uac(
            relay,
            "bob@sip.test",
            "alice@alpha.test",
            "text/plain",
            marker,
        ),
        200,
    )?;
    let m = w.alice_next("message").await?;
    ensure!(
        m["from"] == "bob@sip.test" && m["text"].as_str().map(str::trim_end) == Some(marker),
        "{m}"
    );
    w.assert_no_content(&[
        "Not served here",
        "No rule for this",
        "Spoofed source",
        marker,
        BOB_NAME,
    ])
}

// ---------------------------------------------------------------------------------------
// Rate limiting per source.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_over_the_rate_gets_503_and_only_the_accepted_are_relayed() -> Result<()> {
    let mut w = World::start(|redis| {
        relay_config(
            redis,
            "rate_per_source = 5\nburst_per_source = 5",
            &[Peer::udp("sip.test", free_port().unwrap_or(9))],
            "",
        )
    })
    .await?;
    let relay = w.sip();
    let burst = run(keys(
        SippOptions::uac(BURST_UAC, relay).calls(20).rate(1000),
        &[("from", "bob@sip.test"), ("to", "alice@alpha.test")],
    ))?;
    let sent = burst.messages_sent("MESSAGE");
    ensure!(sent.len() == 20, "{} sent", sent.len());
    let answers = finals(&burst);
    ensure!(
        answers.len() == 20,
        "{} answers:\n{}",
        answers.len(),
        burst.messages
    );
    let body_of = |call_id: &str| format!("burst {call_id}");
    let mut accepted = Vec::new();
    let mut limited = Vec::new();
    for a in &answers {
        let call_id = a.header("Call-ID").context("Call-ID")?;
        match a.status() {
            Some(200) => accepted.push(body_of(&call_id)),
            Some(503) => {
                ensure!(
                    a.header("Retry-After")
                        .is_some_and(|v| v.trim().parse::<u32>().is_ok()),
                    "503 without Retry-After: {a:?}"
                );
                limited.push(body_of(&call_id));
            }
            _ => bail!("unexpected answer {a:?}"),
        }
    }
    ensure!(
        !accepted.is_empty() && !limited.is_empty() && accepted.len() <= 10,
        "{} accepted, {} limited",
        accepted.len(),
        limited.len()
    );

    // A last message after the burst, sent again as the 503's Retry-After asks.
    let marker = "After the burst";
    let mut tries = 0;
    loop {
        tries += 1;
        let r = run(message_uac(
            relay,
            "bob@sip.test",
            "alice@alpha.test",
            "text/plain",
            marker,
        ))?;
        let resp = final_response(&r)?;
        match resp.status() {
            Some(200) => break,
            Some(503) if tries < 5 => {
                let secs: u64 = resp
                    .header("Retry-After")
                    .and_then(|v| v.trim().parse().ok())
                    .context("Retry-After")?;
                tokio::time::sleep(Duration::from_secs(secs)).await;
            }
            _ => bail!("the marker got {}", resp.first_line()),
        }
    }
    // Everything before the marker on alice's stream: the accepted messages, once each.
    let mut got = Vec::new();
    loop {
        let m = w.alice_next("message").await?;
        let text = m["text"]
            .as_str()
            .unwrap_or_default()
            .trim_end()
            .to_string();
        if text == marker {
            break;
        }
        got.push(text);
    }
    let mut want = accepted.clone();
    want.sort();
    got.sort();
    ensure!(
        got == want,
        "relayed {got:?}, accepted {want:?} (limited {limited:?})"
    );
    ensure!(
        metric(&w, "fedrelay_sip_rate_limited_total").await? >= limited.len() as f64,
        "the rate limit metric does not count the 503s"
    );
    w.assert_no_content(&[marker])
}

// ---------------------------------------------------------------------------------------
// Presence and contact requests (RFC 3856 watcher authorisation).

impl World {
    /// Reads alice's stream until `pred` holds for an event, and returns it with the
    /// presence events read before it; any other event before it is a failure.
    async fn alice_until(
        &mut self,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<(Value, Vec<Value>)> {
        let deadline = Instant::now() + T;
        let mut skipped = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ev = match self.alice.next(left).await {
                Ok(ev) => ev.data,
                Err(e) => bail!(
                    "alice waiting for {what}: {e}; she got {skipped:?}; relay:\n{}",
                    self.relay_log()
                ),
            };
            if pred(&ev) {
                return Ok((ev, skipped));
            }
            ensure!(
                ev["type"] == "presence",
                "alice waiting for {what} got {ev}"
            );
            skipped.push(ev);
        }
    }
}

/// A file in `dir` holding `text` (for sipp's -oocsf).
fn write_file(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    std::fs::write(&p, text)?;
    Ok(p)
}

fn subscription_state(m: &TracedMessage) -> String {
    m.header("Subscription-State").unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_subscriptions_are_contact_requests_both_ways() -> Result<()> {
    let port = free_udp_tcp_port()?;
    let mut w =
        World::start(|redis| relay_config(redis, "", &[Peer::udp("sip.test", port)], "")).await?;
    let relay = w.sip();
    let dir = tempfile::tempdir()?;
    // bob's server, for the relay's own SUBSCRIBE: 202, then NOTIFY active with his presence.
    let ooc = write_file(dir.path(), "ooc.xml", SUBSCRIBE_UAS)?;
    let bob_in = "Bob is in the office";

    // bob subscribes to alice: a contact request, pending until she answers.
    let ask = "Bob would like to connect";
    let mut bob = Sipp::start(keys(
        SippOptions::uac(SUBSCRIBE_UAC, relay)
            .port(port)
            .timeout(T)
            .arg("-oocsf")
            .arg(&ooc.display().to_string()),
        &[
            ("from", "bob@sip.test"),
            ("display", BOB_NAME),
            ("to", "alice@alpha.test"),
            ("subject", ask),
            ("me", "bob@sip.test"),
            ("state", "active;expires=600"),
            ("body", &pidf("bob@sip.test", "open", bob_in)),
        ],
    ))?;
    let req = w.alice_next("contact_request").await?;
    ensure!(
        req["from"] == "bob@sip.test" && req["from_platform"] == "sip" && req["note"] == ask,
        "{req}"
    );
    let notifies = blocking(|| bob.wait_received("NOTIFY", 1, T))?;
    ensure!(
        subscription_state(&notifies[0]).starts_with("pending"),
        "{:?}",
        notifies[0]
    );
    ensure!(notifies[0].body().trim().is_empty(), "{:?}", notifies[0]);

    // alice accepts: NOTIFY active with PIDF, and the relay subscribes to bob in turn.
    w.alice_sends(
        json!({"id": "c1", "type": "contact_response", "from": "alice",
        "to": "bob@sip.test", "accepted": true}),
    )
    .await?;
    let notifies = blocking(|| bob.wait_received("NOTIFY", 2, T))?;
    let active = &notifies[1];
    ensure!(
        subscription_state(active).starts_with("active"),
        "{active:?}"
    );
    ensure!(
        active.header("Content-Type").as_deref() == Some("application/pidf+xml")
            && active.body().contains("<basic>")
            && active.body().contains("entity=\"sip:alice@alpha.test\""),
        "{active:?}"
    );
    let subs = blocking(|| bob.wait_received("SUBSCRIBE", 1, T))?;
    let back = &subs[0];
    ensure!(
        back.first_line() == "SUBSCRIBE sip:bob@sip.test SIP/2.0"
            && back
                .header("From")
                .is_some_and(|f| f.starts_with("<sip:alice@alpha.test>"))
            && back.header("To").as_deref() == Some("<sip:bob@sip.test>")
            && back.header("Event").as_deref() == Some("presence"),
        "the relay's SUBSCRIBE: {back:?}"
    );
    // bob's server accepts it at once: alice sees bob's presence, and nothing else before it
    // (no answer to a request she never made).
    let (p, _) = w
        .alice_until("bob's presence", |e| {
            e["type"] == "presence" && e["from"] == "bob@sip.test"
        })
        .await?;
    ensure!(
        p["availability"] == "available" && p["note"] == bob_in,
        "{p}"
    );

    // alice is away, at lunch: bob's NOTIFY says open, away, and the note.
    let lunch = "at lunch";
    w.alice_sends(
        json!({"id": "p1", "type": "presence", "from": "alice", "to": "*",
        "availability": "away", "note": lunch}),
    )
    .await?;
    // bob refreshes in the dialog (200, NOTIFY), then unsubscribes (200, NOTIFY terminated).
    let run_a = blocking(|| bob.wait(T))?;
    let call_id = run_a.messages_sent("SUBSCRIBE")[0].header("Call-ID");
    let notifies: Vec<TracedMessage> = run_a
        .messages_received("NOTIFY")
        .into_iter()
        .filter(|n| n.header("Call-ID") == call_id)
        .collect();
    let states: Vec<String> = notifies.iter().map(subscription_state).collect();
    ensure!(
        notifies.len() >= 5
            && states[0].starts_with("pending")
            && states[1..states.len() - 1]
                .iter()
                .all(|s| s.starts_with("active"))
            && states[states.len() - 1].starts_with("terminated"),
        "{states:?}"
    );
    let at_lunch = &notifies[notifies.len() - 3];
    let body = at_lunch.body();
    ensure!(
        body.contains("<basic>open</basic>")
            && body.contains("away/>")
            && body.contains(&format!("<note>{lunch}</note>")),
        "{body}"
    );
    // The refresh's NOTIFY carries the presence as it is now.
    ensure!(
        notifies[notifies.len() - 2].body().contains(lunch),
        "{:?}",
        notifies[notifies.len() - 2]
    );
    // Every NOTIFY in bob's dialog: the relay's tag in From, the one its 202 gave.
    let ok = &run_a.messages_received("202")[0];
    let relay_tag = ok.header("To").and_then(|t| param(&t, "tag"));
    ensure!(relay_tag.is_some(), "{ok:?}");
    for n in &notifies {
        ensure!(
            n.header("From").and_then(|f| param(&f, "tag")) == relay_tag
                && n.header("Event").as_deref() == Some("presence"),
            "{n:?}"
        );
    }
    let refreshes: Vec<String> = finals(&run_a)
        .iter()
        .filter(|m| m.header("Call-ID") == call_id)
        .map(|m| {
            format!(
                "{} {}",
                m.status().unwrap_or(0),
                m.header("CSeq").unwrap_or_default()
            )
        })
        .collect();
    ensure!(
        refreshes == ["202 1 SUBSCRIBE", "200 2 SUBSCRIBE", "200 3 SUBSCRIBE"],
        "{refreshes:?}"
    );

    // A new subscription from bob, a contact now: 200 and NOTIFY active at once.
    let again = run(keys(
        SippOptions::uac(SUBSCRIBE_ONCE_UAC, relay).port(port),
        &[
            ("from", "bob@sip.test"),
            ("display", BOB_NAME),
            ("to", "alice@alpha.test"),
        ],
    ))?;
    let n = &again.messages_received("NOTIFY")[0];
    ensure!(
        subscription_state(n).starts_with("active") && n.body().contains(lunch),
        "{n:?}"
    );

    // gina asks too, and alice declines as soon as she sees the request: gina's NOTIFYs
    // come in the order of the states, pending then rejected (never pending last).
    let gina_asks = "Gina would like to connect";
    let mut gina = Sipp::start(keys(
        SippOptions::uac(SUBSCRIBE_DECLINED_UAC, relay)
            .port(port)
            .timeout(T),
        &[
            ("from", "gina@sip.test"),
            ("display", "Gina Sipwright"),
            ("to", "alice@alpha.test"),
            ("subject", gina_asks),
        ],
    ))?;
    let (req, _) = w
        .alice_until("gina's request", |e| e["type"] == "contact_request")
        .await?;
    ensure!(
        req["from"] == "gina@sip.test" && req["note"] == gina_asks,
        "{req}"
    );
    w.alice_sends(
        json!({"id": "c0", "type": "contact_response", "from": "alice",
        "to": "gina@sip.test", "accepted": false}),
    )
    .await?;
    let r = blocking(|| gina.wait(T))?;
    let states: Vec<String> = r
        .messages_received("NOTIFY")
        .iter()
        .map(subscription_state)
        .collect();
    ensure!(
        states.len() == 2
            && states[0].starts_with("pending")
            && states[1].replace(' ', "") == "terminated;reason=rejected",
        "{states:?}"
    );

    // alice asks carol: the relay subscribes; carol's server accepts (202, NOTIFY
    // active with her presence).
    let around = "Carol is around";
    let mut carol = Sipp::start(keys(
        SippOptions::uas(SUBSCRIBE_UAS).port(port).timeout(T),
        &[
            ("me", "carol@sip.test"),
            ("state", "active;expires=600"),
            ("body", &pidf("carol@sip.test", "open", around)),
        ],
    ))?;
    w.alice_sends(
        json!({"id": "c2", "type": "contact_request", "from": "alice",
        "to": "carol@sip.test", "note": "Hello carol"}),
    )
    .await?;
    let run_b = blocking(|| carol.wait(T))?;
    let sub = &run_b.messages_received("SUBSCRIBE")[0];
    ensure!(
        sub.first_line() == "SUBSCRIBE sip:carol@sip.test SIP/2.0"
            && sub
                .header("From")
                .is_some_and(|f| f.starts_with("<sip:alice@alpha.test>"))
            && sub.header("Event").as_deref() == Some("presence")
            && sub
                .header("Accept")
                .is_some_and(|a| a.contains("application/pidf+xml")),
        "{sub:?}"
    );
    let (resp, skipped) = w
        .alice_until("carol's answer", |e| e["type"] == "contact_response")
        .await?;
    ensure!(
        resp["from"] == "carol@sip.test" && resp["accepted"] == true,
        "{resp}"
    );
    let carols = |e: &Value| e["type"] == "presence" && e["from"] == "carol@sip.test";
    let p = match skipped.into_iter().find(carols) {
        Some(p) => p,
        None => w.alice_until("carol's presence", carols).await?.0,
    };
    ensure!(
        p["availability"] == "available" && p["note"] == around,
        "{p}"
    );

    // declined: dave's server refuses at once (603); erin's accepts the SUBSCRIBE, then
    // ends it as rejected.
    let mut dave = Sipp::start(
        SippOptions::uas(SUBSCRIBE_DECLINE_UAS)
            .port(port)
            .timeout(T),
    )?;
    w.alice_sends(
        json!({"id": "c3", "type": "contact_request", "from": "alice",
        "to": "dave@sip.test"}),
    )
    .await?;
    blocking(|| dave.wait(T))?;
    let (resp, _) = w
        .alice_until("dave's answer", |e| e["type"] == "contact_response")
        .await?;
    ensure!(
        resp["from"] == "dave@sip.test" && resp["accepted"] == false,
        "{resp}"
    );
    let mut erin = Sipp::start(keys(
        SippOptions::uas(SUBSCRIBE_UAS).port(port).timeout(T),
        &[
            ("me", "erin@sip.test"),
            ("state", "terminated;reason=rejected"),
            ("body", ""),
        ],
    ))?;
    w.alice_sends(
        json!({"id": "c4", "type": "contact_request", "from": "alice",
        "to": "erin@sip.test"}),
    )
    .await?;
    let run_c = blocking(|| erin.wait(T))?;
    ensure!(
        run_c.messages_received("200").len() == 1,
        "{}",
        run_c.messages
    );
    let (resp, _) = w
        .alice_until("erin's answer", |e| e["type"] == "contact_response")
        .await?;
    ensure!(
        resp["from"] == "erin@sip.test" && resp["accepted"] == false,
        "{resp}"
    );
    // fay's server declines with a NOTIFY that arrives before its 202; asked again later,
    // she accepts: the decline left nothing behind that would swallow the new request.
    let mut fay = Sipp::start(keys(
        SippOptions::uas(NOTIFY_FIRST_UAS).port(port).timeout(T),
        &[
            ("me", "fay@sip.test"),
            ("state", "terminated;reason=rejected"),
            ("body", ""),
        ],
    ))?;
    w.alice_sends(
        json!({"id": "c5", "type": "contact_request", "from": "alice",
        "to": "fay@sip.test"}),
    )
    .await?;
    let r = blocking(|| fay.wait(T))?;
    ensure!(r.messages_received("200").len() == 1, "{}", r.messages);
    let (resp, _) = w
        .alice_until("fay's answer", |e| e["type"] == "contact_response")
        .await?;
    ensure!(
        resp["from"] == "fay@sip.test" && resp["accepted"] == false,
        "{resp}"
    );
    let mut fay = Sipp::start(keys(
        SippOptions::uas(SUBSCRIBE_UAS).port(port).timeout(T),
        &[
            ("me", "fay@sip.test"),
            ("state", "active;expires=600"),
            (
                "body",
                &pidf("fay@sip.test", "open", "Fay changed her mind"),
            ),
        ],
    ))?;
    w.alice_sends(
        json!({"id": "c6", "type": "contact_request", "from": "alice",
        "to": "fay@sip.test", "note": "Asking once more"}),
    )
    .await?;
    blocking(|| fay.wait(T)).context("alice's second request to fay")?;
    let (resp, _) = w
        .alice_until("fay's second answer", |e| e["type"] == "contact_response")
        .await?;
    ensure!(
        resp["from"] == "fay@sip.test" && resp["accepted"] == true,
        "{resp}"
    );

    w.assert_no_content(&[
        "Fay changed her mind",
        "Asking once more",
        ask,
        lunch,
        around,
        bob_in,
        gina_asks,
        "Hello carol",
        BOB_NAME,
        "Gina Sipwright",
    ])
}

// ---------------------------------------------------------------------------------------
// Digest authentication (RFC 8760): SHA-256 answered, MD5 not unless allowed.

/// The parameters of a `Digest …` header value (quotes removed), read independently of the
/// relay's parser.
fn digest_params(value: &str) -> Result<Vec<(String, String)>> {
    let rest = value
        .trim()
        .strip_prefix("Digest ")
        .context("not a Digest value")?;
    let mut out = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let name: String = chars.by_ref().take_while(|c| *c != '=').collect();
        let mut v = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => v.extend(chars.next()),
                    '"' => break,
                    c => v.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek().copied() {
                if c == ',' {
                    break;
                }
                v.push(c);
                chars.next();
            }
        }
        out.push((name.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
}

/// Checks the `Authorization` of a request against the challenge it answers (realm, nonce,
/// opaque, SHA-256 with qop=auth) and the password, with RFC 7616's formula.
fn check_digest(
    req: &TracedMessage,
    realm: &str,
    nonce: &str,
    password: &str,
    opaque: Option<&str>,
) -> Result<()> {
    let auth = req.header("Authorization").context("no Authorization")?;
    let p = digest_params(&auth)?;
    let get = |n: &str| {
        p.iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let method = req.method().context("not a request")?;
    let uri = req
        .first_line()
        .split_whitespace()
        .nth(1)
        .context("Request-URI")?
        .to_string();
    ensure!(
        get("username") == "fedrelay"
            && get("realm") == realm
            && get("nonce") == nonce
            && get("uri") == uri
            && get("algorithm") == "SHA-256"
            && get("qop") == "auth"
            && get("nc") == "00000001"
            && !get("cnonce").is_empty()
            && get("opaque") == opaque.unwrap_or_default(),
        "{auth}"
    );
    let ha1 = sha256_hex(&format!("fedrelay:{realm}:{password}"));
    let ha2 = sha256_hex(&format!("{method}:{uri}"));
    let want = sha256_hex(&format!(
        "{ha1}:{nonce}:{}:{}:auth:{ha2}",
        get("nc"),
        get("cnonce")
    ));
    ensure!(
        get("response") == want,
        "response {} ≠ {want}",
        get("response")
    );
    Ok(())
}

fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digest_challenges_get_sha256_answers_and_md5_only_peers_fail() -> Result<()> {
    let password = "Digest-Secret-42";
    let creds = format!("username = \"fedrelay\"\npassword = \"{password}\"");
    let bob_port = free_udp_tcp_port()?;
    let old_port = free_udp_tcp_port()?;
    let pbx_port = free_udp_tcp_port()?;
    let peers = [
        Peer::udp("sip.test", bob_port).with(&creds),
        Peer::udp("legacy.test", old_port).with(&format!("{creds}\nallow_md5 = false")),
        // As docs/sip.md's example PBX: digest and IM sessions.
        Peer::udp("pbx.test", pbx_port).with(&format!("{creds}\nim_mode = \"session\"")),
    ];
    // T1 = 100 ms: a retransmission would come within the PBX's 400 ms of ringing.
    let mut w = World::start(|redis| relay_config(redis, "t1_ms = 100", &peers, "")).await?;

    // bob's server challenges with SHA-256 and qop=auth.
    let nonce = "b5f0c2a9e1d34f7a8c6e0d2b4a69f1e3";
    let challenge = format!(
        "Digest realm=\"sip.test\", nonce=\"{nonce}\", algorithm=SHA-256, qop=\"auth\", opaque=\"op-7\""
    );
    let mut bob = Sipp::start(keys(
        SippOptions::uas(AUTH_UAS).port(bob_port).timeout(T),
        &[("challenge", &challenge)],
    ))?;
    let text = "Authenticated hello";
    w.alice_sends(json!({"id": "d1", "type": "message", "from": "alice",
        "to": "bob@sip.test", "text": text}))
        .await?;
    let r = blocking(|| bob.wait(T))?;
    let got = r.messages_received("MESSAGE");
    ensure!(got.len() == 2, "{}", r.messages);
    let (first, second) = (&got[0], &got[1]);
    ensure!(first.header("Authorization").is_none(), "{first:?}");
    ensure!(
        first.header("Call-ID") == second.header("Call-ID")
            && first.body() == text
            && second.body() == text,
        "{first:?}\n{second:?}"
    );
    let seq = |m: &TracedMessage| -> Option<u32> {
        m.header("CSeq")?.split_whitespace().next()?.parse().ok()
    };
    ensure!(
        seq(second) == seq(first).map(|s| s + 1),
        "CSeq {:?} then {:?}",
        first.header("CSeq"),
        second.header("CSeq")
    );
    ensure!(
        first.header("Via").and_then(|v| param(&v, "branch"))
            != second.header("Via").and_then(|v| param(&v, "branch")),
        "the authenticated MESSAGE is not a new transaction"
    );
    check_digest(second, "sip.test", nonce, password, Some("op-7"))?;

    // legacy.test offers only MD5, which this peer is not allowed: the delivery fails and
    // alice hears of it; no MESSAGE with MD5 credentials is sent.
    let mut legacy = Sipp::start(keys(
        SippOptions::uas(AUTH_UAS)
            .port(old_port)
            .timeout(T)
            .expect_success(false),
        &[(
            "challenge",
            "Digest realm=\"legacy.test\", nonce=\"0a1b2c3d4e5f\", algorithm=MD5, qop=\"auth\"",
        )],
    ))?;
    let acc = w
        .alice_sends(json!({"id": "d2", "type": "message", "from": "alice",
            "to": "dan@legacy.test", "text": "Never in MD5"}))
        .await?;
    let (err, _) = w
        .alice_until("the undeliverable notice", |e| e["type"] == "error")
        .await?;
    ensure!(
        err["target"]["relay_msg_id"] == acc["relay_msg_id"],
        "{err} for {acc}"
    );
    let r = blocking(|| legacy.stop())?;
    let got = r.messages_received("MESSAGE");
    ensure!(
        got.len() == 1 && got[0].header("Authorization").is_none(),
        "{}",
        r.messages
    );

    // The PBX challenges the INVITE of the IM session: the 401 is acknowledged, the INVITE
    // sent again with credentials rings, and is not sent again while it does; then the
    // session and the message in it.
    let pbx_nonce = "6d1e0f4a7b2c9e8d";
    let mut pbx = Sipp::start(keys(
        SippOptions::uas(AUTH_SESSION_UAS)
            .port(pbx_port)
            .timeout(T)
            .set("pause", "400"),
        &[(
            "challenge",
            &format!(
                "Digest realm=\"pbx.test\", nonce=\"{pbx_nonce}\", algorithm=SHA-256, qop=\"auth\""
            ),
        )],
    ))?;
    let via_pbx = "Hello hank, through the PBX";
    w.alice_sends(json!({"id": "d3", "type": "message", "from": "alice",
        "to": "hank@pbx.test", "text": via_pbx}))
        .await?;
    let r = blocking(|| pbx.wait(T))?;
    let invites = r.messages_received("INVITE");
    ensure!(
        invites.len() == 2,
        "{} INVITEs:\n{}",
        invites.len(),
        r.messages
    );
    ensure!(
        invites[0].header("Authorization").is_none(),
        "{:?}",
        invites[0]
    );
    check_digest(&invites[1], "pbx.test", pbx_nonce, password, None)?;
    let acks = r.messages_received("ACK");
    ensure!(acks.len() == 2, "{} ACKs:\n{}", acks.len(), r.messages);
    // The ACK of the 401 (RFC 3261 §17.1.1.3): the INVITE's Request-URI, branch and CSeq
    // number, and the To of the 401.
    let challenge_401 = &r.messages_sent("401")[0];
    let (ack1, inv1) = (&acks[0], &invites[0]);
    let branch = |m: &TracedMessage| m.header("Via").and_then(|v| param(&v, "branch"));
    ensure!(
        ack1.first_line().split_whitespace().nth(1) == inv1.first_line().split_whitespace().nth(1)
            && branch(ack1) == branch(inv1)
            && ack1.header("CSeq").as_deref() == Some("1 ACK")
            && ack1.header("To") == challenge_401.header("To")
            && ack1.header("Call-ID") == inv1.header("Call-ID"),
        "{ack1:?}\nfor {inv1:?}"
    );
    // The ACK of the 200: a transaction of its own, to the PBX's Contact.
    let ack2 = &acks[1];
    ensure!(
        ack2.first_line() == format!("ACK sip:127.0.0.1:{pbx_port} SIP/2.0")
            && branch(ack2) != branch(&invites[1])
            && ack2.header("CSeq").as_deref() == Some("2 ACK"),
        "{ack2:?}"
    );
    let msg = &r.messages_received("MESSAGE")[0];
    ensure!(
        msg.body() == via_pbx && msg.header("Call-ID") == invites[1].header("Call-ID"),
        "{msg:?}"
    );
    w.assert_no_content(&[text, "Never in MD5", via_pbx, password])
}

// ---------------------------------------------------------------------------------------
// IM sessions (INVITE with m=message), as Skype for Business and Lync use them.

/// The `m=` lines of an SDP body.
fn media_lines(sdp: &str) -> Vec<String> {
    sdp.lines()
        .filter(|l| l.starts_with("m="))
        .map(|l| l.trim_end().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn im_sessions_both_ways() -> Result<()> {
    let bob_port = free_udp_tcp_port()?;
    let sfb_port = free_udp_tcp_port()?;
    let peers = [
        Peer::udp("sip.test", bob_port),
        Peer::udp("sfb.test", sfb_port).with("im_mode = \"session\""),
    ];
    let mut w = World::start(|redis| relay_config(redis, "", &peers, "")).await?;
    let relay = w.sip();

    // bob opens a session, sends in it, gets alice's reply in it, ends it; a MESSAGE in the
    // ended dialog gets 481.
    let first = "First words, in the INVITE";
    let first_b64 = base64::engine::general_purpose::STANDARD.encode(first);
    let in_session = "Hello alice, in a session";
    let too_late = "After the goodbye";
    let mut bob = Sipp::start(keys(
        SippOptions::uac(SESSION_UAC, relay)
            .port(bob_port)
            .timeout(T),
        &[
            ("from", "bob@sip.test"),
            ("display", BOB_NAME),
            ("to", "alice@alpha.test"),
            ("first_b64", &first_b64),
            ("body", in_session),
            ("late", too_late),
        ],
    ))?;
    let m = w.alice_next("message").await?;
    ensure!(m["from"] == "bob@sip.test" && m["text"] == first, "{m}");
    let m = w.alice_next("message").await?;
    ensure!(
        m["from"] == "bob@sip.test" && m["text"].as_str().map(str::trim_end) == Some(in_session),
        "{m}"
    );
    let reply = "Hi bob, replying in the session";
    w.alice_sends(json!({"id": "s1", "type": "message", "from": "alice",
        "to": "bob@sip.test", "text": reply}))
        .await?;
    let r = blocking(|| bob.wait(T))?;
    let invite = &r.messages_sent("INVITE")[0];
    let ok = r
        .traced()
        .into_iter()
        .find(|m| m.direction == Direction::Received && m.is("200") && m.text.contains("INVITE"))
        .context("no 200 to the INVITE")?;
    ensure!(
        ok.header("Content-Type").as_deref() == Some("application/sdp")
            && media_lines(ok.body())
                .iter()
                .any(|l| l.starts_with("m=message ")),
        "{ok:?}"
    );
    ensure!(ok.header("Contact").is_some(), "{ok:?}");
    let relay_tag = ok.header("To").and_then(|t| param(&t, "tag"));
    let bob_tag = invite.header("From").and_then(|f| param(&f, "tag"));
    ensure!(relay_tag.is_some() && bob_tag.is_some(), "{ok:?}");
    // alice's reply: in the dialog (bob's Call-ID, his tag in To, the relay's in From).
    let got = r.messages_received("MESSAGE");
    ensure!(got.len() == 1, "{}", r.messages);
    let a = &got[0];
    ensure!(a.body() == reply, "{a:?}");
    ensure!(a.header("Call-ID") == invite.header("Call-ID"), "{a:?}");
    ensure!(
        a.header("To").and_then(|t| param(&t, "tag")) == bob_tag
            && a.header("From").and_then(|f| param(&f, "tag")) == relay_tag
            && a.header("From")
                .is_some_and(|f| f.starts_with("<sip:alice@alpha.test>")),
        "{a:?}"
    );
    // bob's in-dialog MESSAGE and BYE got 200, the late MESSAGE 481.
    let codes: Vec<String> = finals(&r)
        .iter()
        .map(|m| {
            format!(
                "{} {}",
                m.status().unwrap_or(0),
                m.header("CSeq").unwrap_or_default()
            )
        })
        .collect();
    ensure!(
        codes
            == [
                "200 1 INVITE",
                "200 2 MESSAGE",
                "200 3 BYE",
                "481 4 MESSAGE"
            ],
        "{codes:?}"
    );

    // With im_mode = "session", alice's message to frank opens a session first.
    let mut frank = Sipp::start(SippOptions::uas(SESSION_UAS).port(sfb_port).timeout(T))?;
    let hello = "Hello frank, session first";
    w.alice_sends(json!({"id": "s2", "type": "message", "from": "alice",
        "to": "frank@sfb.test", "text": hello}))
        .await?;
    let r = blocking(|| frank.wait(T))?;
    let invite = &r.messages_received("INVITE")[0];
    ensure!(
        invite.first_line() == "INVITE sip:frank@sfb.test SIP/2.0"
            && invite.header("Content-Type").as_deref() == Some("application/sdp")
            && media_lines(invite.body())
                .iter()
                .any(|l| l.starts_with("m=message ")),
        "{invite:?}"
    );
    let ack = &r.messages_received("ACK")[0];
    let msg = &r.messages_received("MESSAGE")[0];
    let frank_tag = r.messages_sent("200")[0]
        .header("To")
        .and_then(|t| param(&t, "tag"));
    for m in [ack, msg] {
        ensure!(
            m.header("Call-ID") == invite.header("Call-ID")
                && m.header("To").and_then(|t| param(&t, "tag")) == frank_tag
                && m.header("From") == invite.header("From"),
            "not in the dialog: {m:?}"
        );
        // Sent to the Contact frank's 200 gave.
        ensure!(
            m.first_line().starts_with(&format!(
                "{} sip:127.0.0.1:{sfb_port} ",
                m.method().unwrap_or("")
            )),
            "{}",
            m.first_line()
        );
    }
    ensure!(msg.body() == hello, "{msg:?}");
    w.assert_no_content(&[first, in_session, too_late, reply, hello, BOB_NAME])
}

// ---------------------------------------------------------------------------------------
// A Teams user (through the fake Bot Connector) and a SIP user.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_teams_user_and_a_sip_user_chat() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let bob_port = free_udp_tcp_port()?;
    let redis = RedisServer::start()?;
    let fake = FakeBotConnector::start(FakeConfig::default()).await?;
    let peers = [Peer::udp("sip.test", bob_port)];
    let config = teams::teams_config(&fake, &redis.url(), "").replace(
        "log_level = \"info\"",
        "log_level = \"info,relay_node=trace\"",
    ) + &sip_section("", &peers)
        + &peer_domains(&peers, "contoso.com");
    let relay = RelayNode::start(&config)?;
    let rig = teams::Rig { fake, relay, redis };
    let alice = User::new("alice", "Alice Anders", 1);
    teams::install(&rig, &alice).await?;

    // alice writes to bob from Teams: a MESSAGE from alice@contoso.com.
    let mut bob = Sipp::start(SippOptions::uas(MESSAGE_UAS).port(bob_port).timeout(T))?;
    let hello = "Hello bob, this is Teams";
    teams::send_ok(
        &rig,
        &teams::personal(
            &rig,
            &alice,
            "message",
            json!({"text": format!("to bob@sip.test {hello}")}),
        ),
    )
    .await?;
    let r = blocking(|| bob.wait(T))?;
    let got = r.messages_received("MESSAGE");
    ensure!(got.len() == 1, "{}", r.messages);
    ensure!(
        got[0].first_line() == "MESSAGE sip:bob@sip.test SIP/2.0"
            && got[0]
                .header("From")
                .is_some_and(|f| f.starts_with("<sip:alice@contoso.com>"))
            && got[0].body() == hello,
        "{:?}",
        got[0]
    );

    // bob answers: the bot posts it in alice's chat, saying who sent it from where.
    let answer = "Hello alice, SIP here";
    expect_answer(
        message_uac(
            loopback(rig.relay.sip_port),
            "bob@sip.test",
            "alice@contoso.com",
            "text/plain",
            answer,
        ),
        200,
    )?;
    teams::wait_post(
        &rig,
        &alice.conversation,
        &["bob@sip.test", "SIP", answer],
        T,
    )
    .await?;
    assert_no_content(&rig.relay, &[hello, answer, BOB_NAME, "Alice Anders"])
}

// ---------------------------------------------------------------------------------------
// An XMPP user (a real Prosody, server-to-server with SASL EXTERNAL) and a SIP user.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_xmpp_user_and_a_sip_user_chat() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    // The relay stands for sip.test toward Prosody.
    certs::issue_named(
        d,
        "",
        "fedrelay xmpp-sip test CA",
        &[("prosody", &["prosody.test"]), ("relay", &["sip.test"])],
    )?;
    let xmpp_port = free_port()?;
    let mut pc = ProsodyConfig::new(
        "prosody.test",
        &d.join("prosody.pem"),
        &d.join("prosody.key"),
    );
    pc.auth = S2sAuth::External;
    pc.peer_ca = Some(d.join("ca.pem"));
    pc.peers = vec![ProsodyPeer {
        domain: "sip.test".into(),
        port: xmpp_port,
    }];
    let prosody = Prosody::start(pc).await?;
    prosody.register("dora", "dora-password")?;
    let carol_port = free_udp_tcp_port()?;
    let xmpp = format!(
        r#"[xmpp]
listen = "127.0.0.1:{xmpp_port}"
tls_cert = "{cert}"
tls_key = "{key}"
tls_ca = "{ca}"
handshake_timeout_secs = 3
connect_timeout_secs = 5
[[xmpp.peers]]
domain = "prosody.test"
address = "127.0.0.1:{s2s}"
auth = "external"
[[domains]]
name = "prosody.test"
platform = "xmpp"
[[federation]]
between = ["prosody.test", "sip.test"]
"#,
        cert = d.join("relay.pem").display(),
        key = d.join("relay.key").display(),
        ca = d.join("ca.pem").display(),
        s2s = prosody.s2s_port(),
    );
    let w =
        World::start(|redis| relay_config(redis, "", &[Peer::udp("sip.test", carol_port)], &xmpp))
            .await?;
    let dora = XmppClient::login(
        "dora@prosody.test",
        "dora-password",
        prosody.c2s_port(),
        &d.join("ca.pem"),
    )
    .await?;

    // dora (XMPP) → carol (SIP): a MESSAGE from sip:dora@prosody.test.
    let mut carol = Sipp::start(SippOptions::uas(MESSAGE_UAS).port(carol_port).timeout(T))?;
    let hello = "Hello carol, from Prosody";
    dora.send(&format!(
        "<message type='chat' to='carol@sip.test' id='x1'><body>{hello}</body></message>"
    ))
    .await?;
    let r = blocking(|| carol.wait(T)).with_context(|| prosody.log_tail(30))?;
    let got = r.messages_received("MESSAGE");
    ensure!(got.len() == 1, "{}", r.messages);
    ensure!(
        got[0].first_line() == "MESSAGE sip:carol@sip.test SIP/2.0"
            && got[0]
                .header("From")
                .is_some_and(|f| f.starts_with("<sip:dora@prosody.test>"))
            && got[0].body() == hello,
        "{:?}",
        got[0]
    );

    // carol answers over SIP: a chat message in dora's client.
    let answer = "Hello dora, from SIP";
    expect_answer(
        message_uac(
            w.sip(),
            "carol@sip.test",
            "dora@prosody.test",
            "text/plain",
            answer,
        ),
        200,
    )?;
    let m = dora
        .wait_stanza("carol's answer", T, |s| {
            s.name == "message" && s.from.starts_with("carol@sip.test") && s.xml.contains(answer)
        })
        .await
        .with_context(|| format!("prosody:\n{}", prosody.log_tail(30)))?;
    ensure!(m.kind == "chat", "{}", m.xml);
    w.assert_no_content(&[hello, answer, BOB_NAME])
}
