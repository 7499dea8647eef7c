//! The sipp harness's own check: two real sipp's exchanging MESSAGE requests with the
//! scenarios of `loadtest/sip/` (the benchmark's), over UDP, over TCP, and over TLS through
//! two stunnels (sipp UAC → stunnel client → stunnel server → sipp UAS); a UAS kept in the
//! background; and a UAC with nobody to answer it failing.

use anyhow::{Context, Result, ensure};
use std::time::Duration;
use test_support::certs;
use test_support::sipp::{
    MESSAGE_UAC, MESSAGE_UAS, Sipp, SippOptions, SippRun, SippTransport, TracedMessage,
    free_udp_port, users_csv,
};
use test_support::stunnel::{Stunnel, StunnelClient, StunnelServer};

const WAIT: Duration = Duration::from_secs(20);

/// The UAS for `calls` messages over `transport`, answering at once (no linger: nothing is
/// retransmitted in these runs, and over TCP a linger would race the UAC's close).
fn uas(transport: SippTransport, calls: u64) -> SippOptions {
    SippOptions::uas(MESSAGE_UAS)
        .transport(transport)
        .calls(calls)
        .set("linger_ms", "0")
}

fn uac(transport: SippTransport, remote: std::net::SocketAddr, calls: u64) -> SippOptions {
    SippOptions::uac(MESSAGE_UAC, remote)
        .transport(transport)
        .calls(calls)
        .rate(50)
        .injection(&users_csv(3, "sip-a.test", "sip-b.test"))
}

/// The UAS's `uas token=<call-id> <sec> <usec>` log lines' tokens.
fn logged_tokens(run: &SippRun) -> Vec<String> {
    run.log
        .lines()
        .filter_map(|l| l.strip_prefix("uas token="))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Checks that every MESSAGE the UAC sent reached the UAS with its From, To, Request-URI
/// and body, and that the UAC got a 200 for each, with the Call-ID and CSeq it sent.
fn check_exchange(uac: &SippRun, uas: &SippRun, calls: usize) -> Result<()> {
    let sent = uac.messages_sent("MESSAGE");
    let received = uas.messages_received("MESSAGE");
    ensure!(sent.len() == calls, "UAC sent {} MESSAGEs", sent.len());
    ensure!(
        received.len() == calls,
        "UAS received {} MESSAGEs:\n{}",
        received.len(),
        uas.messages
    );
    for (i, (s, r)) in sent.iter().zip(&received).enumerate() {
        let call_id = s.header("Call-ID").context("no Call-ID")?;
        ensure!(r.header("Call-ID") == Some(call_id.clone()), "{r:?}");
        // The injection file's rows, in order (SEQUENTIAL).
        let user = format!("user{}", i % 3);
        ensure!(
            r.first_line() == format!("MESSAGE sip:{user}@sip-b.test SIP/2.0"),
            "{}",
            r.first_line()
        );
        ensure!(
            r.header("From")
                .is_some_and(|f| f.starts_with(&format!("<sip:{user}@sip-a.test>;tag="))),
            "{r:?}"
        );
        ensure!(r.header("To") == Some(format!("<sip:{user}@sip-b.test>")));
        ensure!(r.header("Content-Type").as_deref() == Some("text/plain"));
        ensure!(
            r.body().trim_end() == format!("Hello from {user}, token={call_id}"),
            "body {:?}",
            r.body()
        );
        ensure!(r.body() == s.body(), "body changed on the way");
    }
    let tokens = logged_tokens(uas);
    let call_ids: Vec<String> = sent.iter().filter_map(|m| m.header("Call-ID")).collect();
    ensure!(
        tokens == call_ids,
        "UAS logged {tokens:?}, sent {call_ids:?}"
    );

    let oks = uac.messages_received("200");
    ensure!(oks.len() == calls, "UAC got {} 200s", oks.len());
    for (s, ok) in sent.iter().zip(&oks) {
        ensure!(ok.header("Call-ID") == s.header("Call-ID"));
        ensure!(ok.header("CSeq").as_deref() == Some("1 MESSAGE"));
        ensure!(ok.header("Via") == s.header("Via"), "{ok:?}");
        ensure!(
            ok.header("To").is_some_and(|t| t.contains(";tag=")),
            "{ok:?}"
        );
    }
    let timed = uac.log.lines().filter(|l| l.starts_with("uac ")).count();
    ensure!(timed == calls, "UAC logged {timed} timings:\n{}", uac.log);
    ensure!(
        uac.successful_calls() == Some(calls as u64),
        "{:?}",
        uac.stats
    );
    ensure!(uac.failed_calls() == Some(0), "{:?}", uac.stats);
    Ok(())
}

fn exchange(transport: SippTransport) -> Result<()> {
    let mut uas_sipp = Sipp::start(uas(transport, 3))?;
    let mut uac_sipp = Sipp::start(uac(transport, uas_sipp.addr(), 3))?;
    let uac_run = uac_sipp.wait(WAIT)?;
    let uas_run = uas_sipp.wait(WAIT)?;
    check_exchange(&uac_run, &uas_run, 3)?;
    let via = |m: &TracedMessage| m.header("Via").unwrap_or_default();
    let proto = match transport {
        SippTransport::Udp => "SIP/2.0/UDP ",
        SippTransport::Tcp => "SIP/2.0/TCP ",
    };
    let r = uas_run.messages_received("MESSAGE");
    ensure!(r.iter().all(|m| via(m).starts_with(proto)), "{r:?}");
    ensure!(r.iter().all(|m| m.transport == proto[8..11]), "{r:?}");
    Ok(())
}

#[test]
fn message_over_udp() -> Result<()> {
    exchange(SippTransport::Udp)
}

#[test]
fn message_over_tcp() -> Result<()> {
    exchange(SippTransport::Tcp)
}

#[test]
fn message_over_tls_through_two_stunnels() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let named: [(&str, &[&str]); 2] = [
        ("sip-a.test", &["sip-a.test"]),
        ("sip-b.test", &["sip-b.test"]),
    ];
    certs::issue_named(d, "", "sip test CA", &named)?;

    let mut uas_sipp = Sipp::start(uas(SippTransport::Tcp, 3))?;
    // sip-b.test's side: TLS in, its certificate, sip-a.test's required.
    let server = Stunnel::server(StunnelServer {
        connect: uas_sipp.addr(),
        cert: d.join("sip-b.test.pem"),
        key: d.join("sip-b.test.key"),
        client_ca: Some(d.join("ca.pem")),
        client_check_host: Some("sip-a.test".into()),
    })?;
    // sip-a.test's side: TLS out with its certificate, sip-b.test's checked.
    let client = Stunnel::client(StunnelClient {
        connect: server.addr(),
        ca: d.join("ca.pem"),
        check_host: Some("sip-b.test".into()),
        cert: Some(d.join("sip-a.test.pem")),
        key: Some(d.join("sip-a.test.key")),
    })?;
    let mut uac_sipp = Sipp::start(uac(SippTransport::Tcp, client.addr(), 3))?;
    let uac_run = uac_sipp.wait(WAIT).with_context(|| {
        format!(
            "client log:\n{}\nserver log:\n{}",
            client.log(),
            server.log()
        )
    })?;
    let uas_run = uas_sipp.wait(WAIT)?;
    check_exchange(&uac_run, &uas_run, 3)?;
    // Both ends checked the other's certificate: the chain, and the name.
    for (side, log) in [("client", client.log()), ("server", server.log())] {
        ensure!(
            log.contains("Certificate accepted at depth=0"),
            "{side} did not verify the peer:\n{log}"
        );
    }
    Ok(())
}

#[test]
fn stunnel_client_refuses_a_certificate_for_another_name() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let named: [(&str, &[&str]); 2] = [("sip-a.test", &["sip-a.test"]), ("other", &["other.test"])];
    certs::issue_named(d, "", "sip test CA", &named)?;
    let mut uas_sipp = Sipp::start(uas(SippTransport::Tcp, 1))?;
    let server = Stunnel::server(StunnelServer {
        connect: uas_sipp.addr(),
        cert: d.join("other.pem"),
        key: d.join("other.key"),
        client_ca: None,
        client_check_host: None,
    })?;
    let client = Stunnel::client(StunnelClient {
        connect: server.addr(),
        ca: d.join("ca.pem"),
        check_host: Some("sip-b.test".into()),
        cert: Some(d.join("sip-a.test.pem")),
        key: Some(d.join("sip-a.test.key")),
    })?;
    let mut uac_sipp = Sipp::start(
        uac(SippTransport::Tcp, client.addr(), 1)
            .timeout(Duration::from_secs(5))
            .expect_success(false),
    )?;
    let run = uac_sipp.wait(WAIT)?;
    ensure!(run.exit_code != 0, "the UAC succeeded: {}", run.messages);
    ensure!(run.messages_received("200").is_empty());
    let log = client.log();
    ensure!(
        log.contains("CERT: Subject checks failed") && log.contains("Rejected by CERT at depth=0"),
        "client log:\n{log}"
    );
    let uas_run = uas_sipp.stop()?;
    ensure!(uas_run.messages_received("MESSAGE").is_empty());
    Ok(())
}

#[test]
fn background_uas_answers_until_stopped() -> Result<()> {
    let mut uas_sipp = Sipp::start(
        SippOptions::uas(MESSAGE_UAS)
            .background()
            .set("linger_ms", "200"),
    )?;
    ensure!(uas_sipp.pid().is_some());
    let mut uac_sipp = Sipp::start(uac(SippTransport::Udp, uas_sipp.addr(), 20).rate(200))?;
    let uac_run = uac_sipp.wait(WAIT)?;
    // Still up after the UAC is done: it is told to stop.
    let received = uas_sipp.wait_received("MESSAGE", 20, WAIT)?;
    ensure!(received.len() == 20);
    ensure!(uas_sipp.pid().is_some(), "the UAS exited by itself");
    let uas_run = uas_sipp.stop()?;
    check_exchange(&uac_run, &uas_run, 20)?;
    Ok(())
}

#[test]
fn uac_fails_when_nobody_answers() -> Result<()> {
    // UDP: nothing listens on the port, the request is retransmitted, the call times out.
    let port = free_udp_port()?;
    let remote = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut udp = Sipp::start(
        uac(SippTransport::Udp, remote, 1)
            .recv_timeout(Duration::from_millis(1500))
            .expect_success(false),
    )?;
    let run = udp.wait(WAIT)?;
    ensure!(
        run.exit_code == 1,
        "exit code {}: {}",
        run.exit_code,
        run.stderr
    );
    ensure!(run.failed_calls() == Some(1), "{:?}", run.stats);
    ensure!(run.messages_sent("MESSAGE").len() >= 2, "not retransmitted");
    ensure!(run.messages_received("*").is_empty());

    // The same expecting success: wait() is the failure, with sipp's own explanation.
    let mut udp =
        Sipp::start(uac(SippTransport::Udp, remote, 1).recv_timeout(Duration::from_millis(500)))?;
    let err = format!("{:#}", udp.wait(WAIT).err().context("wait() succeeded")?);
    ensure!(
        err.contains("exited with 1") && err.contains("at least one call failed"),
        "{err}"
    );

    // TCP: the connection is refused at once.
    let mut tcp = Sipp::start(uac(SippTransport::Tcp, remote, 1).expect_success(false))?;
    let run = tcp.wait(WAIT)?;
    ensure!(run.exit_code != 0, "exit code 0 over TCP");
    ensure!(run.messages_received("*").is_empty());
    Ok(())
}
