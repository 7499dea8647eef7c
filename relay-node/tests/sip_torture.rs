//! The SIP edge against the RFC 4475 torture messages (tests/data/sip-rfc4475), each
//! sent over UDP and over TCP to a relay in front of a real Redis: valid messages are parsed
//! and answered as an IM relay answers them, invalid ones get 400 or are dropped,
//! application-layer ones get their 4xx, and after every case the edge still relays a valid
//! MESSAGE. Nothing a torture message carries is relayed.

use anyhow::{Context, Result, bail, ensure};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use test_support::{RedisServer, RelayNode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

const T: Duration = Duration::from_secs(5);

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/sip-rfc4475")
}

/// The domains of the corpus, all SIP peers sending from loopback; deliveries to them go to
/// the test's sink socket.
fn config(redis_url: &str, sink: u16) -> String {
    let mut c = format!(
        r#"node_id = "sip-torture"
[http]
listen = "127.0.0.1:{{HTTP_PORT}}"
[admin]
listen = "127.0.0.1:{{ADMIN_PORT}}"
[store]
redis_url = "{redis_url}"
[telemetry]
log_format = "json"
log_level = "info"
[sip]
udp = "127.0.0.1:{{SIP_PORT}}"
tcp = "127.0.0.1:{{SIP_PORT}}"
"#
    );
    let domains = [
        "example.com",
        "example.net",
        "example.org",
        "chair-dnrc.example.com",
        "company.com",
        "ift.client.example.net",
    ];
    for d in domains {
        c.push_str(&format!(
            "[[sip.peers]]\ndomain = \"{d}\"\ntransport = \"udp\"\naddress = \"127.0.0.1:{sink}\"\nsources = [\"127.0.0.1\"]\n"
        ));
    }
    for d in domains {
        c.push_str(&format!(
            "[[domains]]\nname = \"{d}\"\nplatform = \"sip\"\n"
        ));
    }
    for (i, a) in domains.iter().enumerate() {
        for b in &domains[i + 1..] {
            c.push_str(&format!("[[federation]]\nbetween = [\"{a}\", \"{b}\"]\n"));
        }
    }
    c
}

/// The status code of the first response line in `buf`, if a whole one is there.
fn status_of(buf: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(buf);
    let line = text.lines().next()?;
    line.strip_prefix("SIP/2.0 ")?.get(..3)?.parse().ok()
}

fn probe(n: usize, via: &str, from_port: u16) -> Vec<u8> {
    let body = format!("probe {n}");
    format!(
        "MESSAGE sip:sink@example.com SIP/2.0\r\nVia: SIP/2.0/{via} 127.0.0.1:{from_port};branch=z9hG4bKprobe{via}{n}\r\nMax-Forwards: 70\r\nFrom: <sip:probe@example.net>;tag=p{n}\r\nTo: <sip:sink@example.com>\r\nCall-ID: probe-{via}-{n}@127.0.0.1\r\nCSeq: 1 MESSAGE\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Sends `data` over UDP and returns the first response (or none within `wait`).
async fn udp_case(relay: SocketAddr, data: &[u8], wait: Duration) -> Result<Option<u16>> {
    let s = UdpSocket::bind("127.0.0.1:0").await?;
    s.send_to(data, relay).await?;
    let mut buf = vec![0u8; 65_536];
    match tokio::time::timeout(wait, s.recv_from(&mut buf)).await {
        Ok(r) => {
            let (n, _) = r?;
            Ok(status_of(&buf[..n]))
        }
        Err(_) => Ok(None),
    }
}

/// Sends `data` on a new TCP connection, closes the sending side, and returns the status
/// codes of the responses, sorted, once the relay has closed the connection (an empty list
/// when it closed it without answering).
async fn tcp_case(relay: SocketAddr, data: &[u8]) -> Result<Vec<u16>> {
    let mut s = TcpStream::connect(relay).await?;
    s.write_all(data).await?;
    s.shutdown().await?;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(T, s.read_to_end(&mut buf)).await;
    ensure!(
        read.is_ok(),
        "the relay neither answered nor closed the connection"
    );
    let text = String::from_utf8_lossy(&buf);
    let mut codes: Vec<u16> = text
        .split("SIP/2.0 ")
        .skip(1)
        .filter_map(|r| r.get(..3)?.parse().ok())
        .collect();
    codes.sort();
    Ok(codes)
}

/// What each file gets over UDP and over TCP where that differs: the response code, or 0
/// for "dropped without an answer".
fn expected_tcp(name: &str) -> Option<Vec<u16>> {
    match name {
        // No Content-Length: a stream cannot be framed without it (RFC 3261 §18.3).
        "inv2543" => Some(vec![400]),
        // Two requests back to back: on a stream both are read and answered (a datagram
        // ends where the first one's Content-Length says).
        "dblreq" => Some(vec![405, 488]),
        // A body shorter than its Content-Length: on a stream the rest may still come, so
        // nothing is answered before the peer closes (on a datagram: 400, RFC 3261 §18.3).
        "clerr" => Some(vec![]),
        // No empty line after the headers: a stream waits for it; a datagram ends there.
        "baddn" => Some(vec![]),
        _ => None,
    }
}

/// What each file gets: the response code, or 0 for "dropped without an answer".
fn expected() -> BTreeMap<&'static str, u16> {
    BTreeMap::from([
        // 3.1.1 valid messages
        // A To tag: a request inside a dialog the relay does not know.
        ("wsinv", 481),
        // A valid but unknown method; esc02's escaped method is not REGISTER but one more.
        ("intmeth", 501),
        // From and To at the same domain: no rule connects a domain with itself.
        ("esc01", 403),
        // REGISTER: the relay is not a registrar.
        ("escnull", 405),
        ("esc02", 501),
        // OPTIONS between federated domains: 200 with Allow and Accept.
        ("lwsdisp", 200),
        // An INVITE for audio or video: the relay takes IM sessions only.
        ("longreq", 488),
        ("dblreq", 405),
        ("semiuri", 200),
        ("transports", 200),
        // A MESSAGE with a text part (relayed) and a signature part.
        ("mpart01", 200),
        // Responses to no transaction of the relay's: dropped.
        ("unreason", 0),
        ("noreason", 0),
        // 3.1.2 invalid messages
        ("badinv01", 400),
        ("clerr", 400),
        ("ncl", 400),
        ("scalar02", 400),
        ("scalarlg", 0),
        ("quotbal", 400),
        ("ltgtruri", 400),
        ("lwsruri", 400),
        ("lwsstart", 400),
        ("trws", 400),
        ("escruri", 400),
        ("baddate", 400),
        ("regbadct", 400),
        ("badaspec", 400),
        ("baddn", 400),
        // SIP/7.0: Version Not Supported.
        ("badvers", 505),
        ("mismatch01", 400),
        ("mismatch02", 400),
        // A response: never answered, so dropped.
        ("bigcode", 0),
        // 3.2.1 transport
        ("badbranch", 400),
        // 3.3 application-layer semantics
        ("insuf", 400),
        ("unkscm", 416),
        ("novelsc", 416),
        // REGISTERs (whatever else is wrong with them): not a registrar.
        ("unksm2", 405),
        ("bext01", 420),
        ("invut", 415),
        ("regaut01", 405),
        ("multi01", 400),
        ("mcl01", 400),
        ("bcast", 0),
        // Max-Forwards: 0; the relay forwards to another platform.
        ("zeromf", 483),
        ("cparam01", 405),
        ("cparam02", 405),
        ("regescrt", 405),
        // Audio SDP whose answer could not be of an accepted type: not acceptable here.
        ("sdp01", 488),
        // 3.4.1 backward compatibility
        ("inv2543", 488),
        // Not in the RFC: a request line without a version, and no Via to answer to.
        ("test", 0),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_torture_message_gets_its_answer_over_udp_and_tcp() -> Result<()> {
    let redis = RedisServer::start()?;
    let sink = UdpSocket::bind("127.0.0.1:0").await?;
    let sink_port = sink.local_addr()?.port();
    let relay = RelayNode::start(&config(&redis.url(), sink_port))?;
    // The sink answers every MESSAGE the relay delivers and keeps its body.
    let (tx, mut relayed_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((len, from)) = sink.recv_from(&mut buf).await {
            let Ok(req) = relay_node::edges::sip::msg::parse(&buf[..len], &Default::default())
            else {
                continue;
            };
            let resp = req.response(200, "", Some("sink"));
            let _ = sink.send_to(&resp.to_bytes(), from).await;
            let _ = tx.send(String::from_utf8_lossy(&req.body).into_owned());
        }
    });
    let addr: SocketAddr = format!("127.0.0.1:{}", relay.sip_port).parse()?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus())
        .with_context(|| format!("reading {}", corpus().display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "dat"))
        .collect();
    files.sort();
    let want = expected();
    ensure!(
        files.len() == want.len(),
        "{} files, {} expected",
        files.len(),
        want.len()
    );
    let mut got = BTreeMap::new();
    let mut n = 0;
    let mut relayed: Vec<String> = Vec::new();
    for f in &files {
        let name = f
            .file_stem()
            .and_then(|s| s.to_str())
            .context("file name")?
            .to_string();
        let data = std::fs::read(f)?;
        let udp = udp_case(addr, &data, Duration::from_millis(700)).await?;
        let tcp = tcp_case(addr, &data).await?;
        got.insert(name.clone(), (udp.unwrap_or(0), tcp));
        // The edge still relays a valid MESSAGE after each case, over both transports.
        for via in ["UDP", "TCP"] {
            n += 1;
            let p = probe(n, via, 5060);
            let code = match via {
                "UDP" => udp_case(addr, &p, T).await?,
                _ => tcp_case(addr, &p).await?.first().copied(),
            };
            ensure!(
                code == Some(200),
                "after {name}: the probe over {via} got {code:?}"
            );
            // Everything relayed up to and including this probe.
            loop {
                let body = tokio::time::timeout(T, relayed_rx.recv())
                    .await
                    .with_context(|| format!("after {name}: the probe over {via} was not relayed"))?
                    .context("the sink stopped")?;
                let done = body == format!("probe {n}");
                relayed.push(body);
                if done {
                    break;
                }
            }
        }
    }
    let mut wrong = Vec::new();
    for (name, (udp, tcp)) in &got {
        let w = want.get(name.as_str()).copied().unwrap_or(999);
        let wt = expected_tcp(name).unwrap_or(if w == 0 { vec![] } else { vec![w] });
        if *udp != w || *tcp != wt {
            wrong.push(format!(
                "{name}: want udp {w} tcp {wt:?}, got udp {udp} tcp {tcp:?}"
            ));
        }
    }
    if !wrong.is_empty() {
        bail!(
            "{} cases answered wrongly:\n{}",
            wrong.len(),
            wrong.join("\n")
        );
    }
    // The probes were relayed once each, in order, and of the torture messages only the
    // valid MESSAGE's text part (mpart01) — once, though it came over UDP and TCP: the second
    // copy has the same Call-ID and CSeq, so it is the same message.
    let mut want_relayed: Vec<String> = (1..=n).map(|i| format!("probe {i}")).collect();
    let pos = relayed
        .iter()
        .position(|b| b == "Hello")
        .context("mpart01's text was not relayed")?;
    want_relayed.insert(pos, "Hello".into());
    ensure!(relayed == want_relayed, "relayed: {relayed:?}");
    Ok(())
}
