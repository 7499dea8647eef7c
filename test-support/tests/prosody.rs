//! The XMPP harness's own check: real Prosody servers and real slixmpp clients.
//!
//! - c2s: two users of one server exchange a chat message, set and read a vCard, and a
//!   wrong password fails the login with a clear error;
//! - s2s with SASL EXTERNAL between two servers (the peer found through the hosts file and
//!   an SRV record, two peers: the other server and a bare listener);
//! - s2s with dialback between two servers, one of them with three peers (more than
//!   libunbound's options hold SRV records for: routed by the harness's plugin).

use anyhow::{Context, Result, ensure};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use test_support::prosody::{Peer, Prosody, ProsodyConfig, S2sAuth};
use test_support::xmpp_client::XmppClient;
use test_support::{FaultProxy, certs, free_port};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

const WAIT: Duration = Duration::from_secs(5);

struct Certs {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Certs {
    fn new() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        // Each server's certificate names its domain (SAN DNS:<domain>).
        let named: [(&str, &[&str]); 4] = [
            ("prosody.test", &["prosody.test"]),
            ("other.test", &["other.test"]),
            ("d1.test", &["d1.test"]),
            ("d2.test", &["d2.test"]),
        ];
        certs::issue_named(dir.path(), "", "fedrelay test CA", &named)?;
        let path = dir.path().to_path_buf();
        Ok(Self { _dir: dir, path })
    }

    fn ca(&self) -> PathBuf {
        self.path.join("ca.pem")
    }

    fn config(&self, domain: &str, auth: S2sAuth, peers: Vec<Peer>) -> ProsodyConfig {
        ProsodyConfig {
            domain: domain.to_string(),
            cert: self.path.join(format!("{domain}.pem")),
            key: self.path.join(format!("{domain}.key")),
            peer_ca: (auth == S2sAuth::External).then(|| self.ca()),
            auth,
            peers,
            extra: String::new(),
        }
    }
}

fn peer(domain: &str, port: u16) -> Peer {
    Peer {
        domain: domain.to_string(),
        port,
    }
}

async fn login(p: &Prosody, user: &str, password: &str, ca: &Path) -> Result<XmppClient> {
    XmppClient::login(
        &format!("{user}@{}", p.domain()),
        password,
        p.c2s_port(),
        ca,
    )
    .await
}

fn chat(to: &str, id: &str, body: &str) -> String {
    format!("<message to='{to}' type='chat' id='{id}'><body>{body}</body></message>")
}

/// Waits for `client` to receive the chat message `id` from `from` (a bare JID) with `body`.
async fn expect_chat(
    client: &XmppClient,
    servers: &[&Prosody],
    from: &str,
    id: &str,
    body: &str,
) -> Result<()> {
    let got = client
        .wait_stanza(&format!("message {id} from {from}"), WAIT, |s| {
            s.name == "message" && s.id == id
        })
        .await
        .with_context(|| logs(servers))?;
    ensure!(got.kind == "chat", "not a chat message: {got}");
    ensure!(
        got.from.starts_with(&format!("{from}/")),
        "wrong from: {got}"
    );
    ensure!(
        got.xml.contains(&format!("<body>{body}</body>")),
        "wrong body: {got}"
    );
    Ok(())
}

fn logs(servers: &[&Prosody]) -> String {
    servers
        .iter()
        .map(|p| format!("--- {} log:\n{}", p.domain(), p.log_tail(30)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Accepts one connection on `listener` and returns the stream header the server opened it
/// with (an s2s connection starts with `<stream:stream … to='<domain>'>` in the clear).
async fn s2s_header(listener: &TcpListener) -> Result<String> {
    let (mut conn, _) = tokio::time::timeout(WAIT, listener.accept())
        .await
        .context("no s2s connection")??;
    let mut buf = Vec::new();
    let deadline = Instant::now() + WAIT;
    loop {
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some(start) = text.find("<stream:stream")
            && text[start..].contains('>')
        {
            return Ok(text[start..].to_string());
        }
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout_at(deadline.into(), conn.read(&mut chunk))
            .await
            .with_context(|| format!("no stream header; got {text:?}"))??;
        ensure!(n > 0, "connection closed before a stream header: {text:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn listener() -> Result<(TcpListener, u16)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let port = l.local_addr()?.port();
    Ok((l, port))
}

fn to_port(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_and_s2s_with_sasl_external() -> Result<()> {
    let t0 = Instant::now();
    let certs = Certs::new()?;
    let ca = certs.ca();
    // prosody.test reaches other.test through a proxy (its port must be known before
    // other.test starts), and raw.test is a bare listener.
    let proxy_port = free_port()?;
    let (raw, raw_port) = listener().await?;
    let a = Prosody::start(certs.config(
        "prosody.test",
        S2sAuth::External,
        vec![peer("other.test", proxy_port), peer("raw.test", raw_port)],
    ))
    .await?;
    let b = Prosody::start(certs.config(
        "other.test",
        S2sAuth::External,
        vec![peer("prosody.test", a.s2s_port())],
    ))
    .await?;
    let _proxy = FaultProxy::start(proxy_port, to_port(b.s2s_port()))?;
    a.register("alice", "alice-pw")?;
    a.register("bob", "bob-pw")?;
    b.register("carol", "carol-pw")?;
    let started = t0.elapsed();

    let (alice, bob, carol) = tokio::try_join!(
        login(&a, "alice", "alice-pw", &ca),
        login(&a, "bob", "bob-pw", &ca),
        login(&b, "carol", "carol-pw", &ca),
    )?;
    ensure!(
        alice.jid().starts_with("alice@prosody.test/"),
        "{}",
        alice.jid()
    );
    let logged_in = t0.elapsed();

    // A chat message, as raw XML.
    bob.send(&chat("alice@prosody.test", "m1", "hello alice"))
        .await?;
    expect_chat(&alice, &[&a], "bob@prosody.test", "m1", "hello alice").await?;

    // vcard-temp: bob sets his, alice reads it at his bare JID.
    bob.send(
        "<iq type='set' id='v1'><vCard xmlns='vcard-temp'><FN>Bob Builder</FN>\
         <NICKNAME>bob</NICKNAME></vCard></iq>",
    )
    .await?;
    let set = bob
        .wait_stanza("the vCard set's answer", WAIT, |s| s.id == "v1")
        .await?;
    ensure!(set.kind == "result", "vCard set failed: {set}");
    alice
        .send("<iq type='get' id='v2' to='bob@prosody.test'><vCard xmlns='vcard-temp'/></iq>")
        .await?;
    let got = alice
        .wait_stanza("bob's vCard", WAIT, |s| s.id == "v2")
        .await?;
    ensure!(got.kind == "result", "vCard get failed: {got}");
    ensure!(got.from == "bob@prosody.test", "from: {got}");
    ensure!(got.xml.contains("<FN>Bob Builder</FN>"), "no FN: {got}");
    ensure!(
        got.xml.contains("<NICKNAME>bob</NICKNAME>"),
        "no NICKNAME: {got}"
    );

    // A stanza that never comes: the error names it and lists what did.
    let err = match alice
        .wait_stanza(
            "a stanza that never comes",
            Duration::from_millis(200),
            |s| s.id == "never",
        )
        .await
    {
        Ok(s) => anyhow::bail!("got {s}"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        err.contains("a stanza that never comes") && err.contains("<body>hello alice</body>"),
        "unclear error: {err}"
    );
    ensure!(
        alice.received().iter().any(|s| s.id == "v2"),
        "received() lacks v2"
    );

    // A wrong password.
    let err = match login(&a, "alice", "not-her-password", &ca).await {
        Ok(_) => anyhow::bail!("logged in with a wrong password"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        err.contains("alice@prosody.test") && err.contains("authentication failed"),
        "unclear error: {err}"
    );

    // Across servers, with SASL EXTERNAL both ways.
    alice
        .send(&chat("carol@other.test", "s1", "hello carol"))
        .await?;
    expect_chat(&carol, &[&a, &b], "alice@prosody.test", "s1", "hello carol").await?;
    carol
        .send(&chat("alice@prosody.test", "s2", "hi alice"))
        .await?;
    expect_chat(&alice, &[&a, &b], "carol@other.test", "s2", "hi alice").await?;
    for (p, from) in [(&a, "other.test"), (&b, "prosody.test")] {
        let line = format!("Accepting SASL EXTERNAL identity from {from}");
        ensure!(
            p.log_tail(100_000).contains(&line),
            "{} never logged {line:?}:\n{}",
            p.domain(),
            logs(&[p])
        );
    }

    // The second peer, found through the second SRV record.
    alice
        .send(&chat("someone@raw.test", "r1", "anyone?"))
        .await?;
    let header = s2s_header(&raw).await.with_context(|| logs(&[&a]))?;
    ensure!(
        header.contains("to='raw.test'") && header.contains("from='prosody.test'"),
        "{header}"
    );

    let exchanged = t0.elapsed();
    tokio::try_join!(alice.quit(), bob.quit(), carol.quit())?;
    let mut a = a;
    let mut b = b;
    // One after the other: Prosody 0.12 can hit a Lua error when its s2s peer's
    // <system-shutdown/> arrives while it is shutting down itself.
    a.stop().await?;
    b.stop().await?;
    tracing_times(&[
        ("servers started", started),
        ("logged in", logged_in),
        ("exchanged", exchanged),
        ("stopped", t0.elapsed()),
    ]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s2s_with_dialback_and_three_peers() -> Result<()> {
    let t0 = Instant::now();
    let certs = Certs::new()?;
    let ca = certs.ca();
    let proxy_port = free_port()?;
    let (p1, p1_port) = listener().await?;
    let (p2, p2_port) = listener().await?;
    let d1 = Prosody::start(certs.config(
        "d1.test",
        S2sAuth::Dialback,
        vec![
            peer("d2.test", proxy_port),
            peer("p1.test", p1_port),
            peer("p2.test", p2_port),
        ],
    ))
    .await?;
    let d2 = Prosody::start(certs.config(
        "d2.test",
        S2sAuth::Dialback,
        vec![peer("d1.test", d1.s2s_port())],
    ))
    .await?;
    let _proxy = FaultProxy::start(proxy_port, to_port(d2.s2s_port()))?;
    d1.register("dave", "dave-pw")?;
    d2.register("erin", "erin-pw")?;
    let (dave, erin) = tokio::try_join!(
        login(&d1, "dave", "dave-pw", &ca),
        login(&d2, "erin", "erin-pw", &ca)
    )?;

    dave.send(&chat("erin@d2.test", "x1", "hello erin")).await?;
    expect_chat(&erin, &[&d1, &d2], "dave@d1.test", "x1", "hello erin").await?;
    erin.send(&chat("dave@d1.test", "x2", "hi dave")).await?;
    expect_chat(&dave, &[&d1, &d2], "erin@d2.test", "x2", "hi dave").await?;
    for p in [&d1, &d2] {
        let log = p.log_tail(100_000);
        ensure!(
            !log.contains("Accepting SASL EXTERNAL"),
            "{} used SASL EXTERNAL",
            p.domain()
        );
        ensure!(
            log.contains("jabber:server:dialback"),
            "{} shows no dialback:\n{}",
            p.domain(),
            logs(&[p])
        );
    }

    // The other two peers, routed without DNS.
    dave.send(&chat("x@p1.test", "y1", "one")).await?;
    dave.send(&chat("x@p2.test", "y2", "two")).await?;
    for (l, domain) in [(&p1, "p1.test"), (&p2, "p2.test")] {
        let header = s2s_header(l).await.with_context(|| logs(&[&d1]))?;
        ensure!(header.contains(&format!("to='{domain}'")), "{header}");
    }
    tokio::try_join!(dave.quit(), erin.quit())?;
    drop((d1, d2));
    tracing_times(&[("done", t0.elapsed())]);
    Ok(())
}

/// Timings on stderr (shown with `--nocapture`).
fn tracing_times(times: &[(&str, Duration)]) {
    use std::io::Write;
    let line: Vec<String> = times
        .iter()
        .map(|(what, d)| format!("{what} at {:.2}s", d.as_secs_f64()))
        .collect();
    let _ = writeln!(std::io::stderr(), "{}", line.join(", "));
}
