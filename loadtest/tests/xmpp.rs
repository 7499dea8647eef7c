//! `--protocol xmpp` against the real thing: an embedded redis-server and relay-node with its
//! XMPP edge, the harness playing the remote server `xmpp.load` (STARTTLS, SASL EXTERNAL with a
//! certificate from the run's own CA, XEP-0198 acknowledgements), receivers on the HTTP edge's
//! event streams. Not a speed test.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use relay_loadtest::plan::DomainSpec;
use relay_loadtest::receiver::ReceiveMode;
use relay_loadtest::runner::{Deployment, DeploymentSpec, XmppEmbeddedSpec};
use relay_loadtest::system::{
    ClusterMode, EmbeddedOptions, EmbeddedSystem, StoreKind, XmppEmbedded, free_ports,
};
use serde_json::Value;

#[test]
fn one_to_one_over_xmpp_s2s_keeps_the_contract() -> Result<()> {
    let relay = test_support::workspace_binary("relay-node")?;
    let out = tempfile::tempdir()?;
    // 20 senders at xmpp.load, each messaging one user of d0 or d1: 400 stanzas in 4 s.
    let output = Command::new(env!("CARGO_BIN_EXE_relay-loadtest"))
        .args(["run", "one-to-one", "--protocol", "xmpp", "--users", "40"])
        .args(["--domains", "2", "--rate", "100", "--duration", "3s"])
        .args(["--warmup", "1s", "--quiet", "--xmpp-connections", "4"])
        .arg("--relay-bin")
        .arg(&relay)
        .arg("--out")
        .arg(out.path())
        .output()
        .context("running relay-loadtest")?;
    ensure!(
        output.status.success(),
        "relay-loadtest exited with {}:\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(out.path().join("result.json"))?)?;
    let c = &r["contract"];
    ensure!(r["passed"] == true, "{c}");
    ensure!(r["config"]["protocol"] == "xmpp", "{}", r["config"]);
    ensure!(r["config"]["xmpp_streams"] == 4, "{}", r["config"]);
    ensure!(r["config"]["sessions"] == 20, "{}", r["config"]);
    let n = &r["counts"];
    ensure!(n["planned"] == 400 && n["accepted"] == 400, "{n}");
    ensure!(n["send_errors_total"] == 0, "{n}");
    // Every message exactly once, in order, to its recipient.
    ensure!(
        c["expected_deliveries"] == 400 && c["received_unique"] == 400,
        "{c}"
    );
    for k in [
        "lost",
        "duplicates",
        "order_violations",
        "misrouted",
        "unmatched",
    ] {
        ensure!(c[k] == 0, "{k}: {c}");
    }
    ensure!(r["latency_ms"]["end_to_end"]["count"].as_u64() > Some(0));
    // The relay's config as the harness generated it: the remote domain is an XMPP peer that
    // must use SASL EXTERNAL, federated with every HTTP domain.
    let config = std::fs::read_to_string(out.path().join("relay-config.toml"))?;
    ensure!(config.contains("[[xmpp.peers]]\ndomain = \"xmpp.load\"\nauth = \"external\""));
    ensure!(config.contains("between = [\"d1.loadtest.example\", \"xmpp.load\"]"));
    Ok(())
}

/// A stanza the relay refuses comes back as `type='error'` on a stream the relay opens to the
/// remote domain's listener, where the harness counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_stanza_comes_back_to_the_remote_domain() -> Result<()> {
    let relay = test_support::workspace_binary("relay-node")?;
    let logs = tempfile::tempdir()?;
    let dep = Deployment::start(
        DeploymentSpec::Embedded {
            store: StoreKind::Memory,
            relay_bin: Some(relay),
            redis_bin: None,
            etcd_bin: None,
            domains: 2,
            nodes: 1,
            cluster: ClusterMode::None,
            node_env: Vec::new(),
            xmpp: Some(XmppEmbeddedSpec {
                domain: "xmpp.load".into(),
                connections: 2,
            }),
        },
        ReceiveMode::Stream,
        PathBuf::from(logs.path()),
        Duration::from_secs(20),
    )
    .await?;
    let Some(x) = dep.xmpp.clone() else {
        bail!("no XMPP streams");
    };
    x.connect_all().await?;
    ensure!(x.streams() == 2 && x.opened() == 2);
    // An iq the relay does not serve: acknowledged (finished), answered with an error.
    let link = x.link(x.slot_of(0, 0)).await?;
    let ack = link
        .send(
            "<iq type='get' id='lt-none-1' from='u0@xmpp.load' to='u0@d0.loadtest.example'>\
             <query xmlns='jabber:iq:version'/></iq>"
                .into(),
        )
        .ok_or_else(|| anyhow!("the stream is closed"))?;
    tokio::time::timeout(Duration::from_secs(10), ack)
        .await??
        .map_err(|e| anyhow!("not acknowledged: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while dep.xmpp_refusals() == 0 {
        ensure!(Instant::now() < deadline, "no stanza error came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure!(dep.xmpp_refusals() == 1);
    // The generated config passes the relay's own validator.
    let mut cmd = Command::new(test_support::workspace_binary("relay-node")?);
    cmd.arg("check-config")
        .arg(logs.path().join("relay-config.toml"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("FEDRELAY_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd.output().context("running relay-node check-config")?;
    ensure!(
        out.status.success(),
        "check-config: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `--target` with `--protocol xmpp`: an existing relay (started here, by the library), the
/// remote domain's certificate and CA given by flags, and the harness listening where the
/// relay's config sends that domain's stanzas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_deployment_is_driven_over_xmpp() -> Result<()> {
    let logs = tempfile::tempdir()?;
    let listen = format!("127.0.0.1:{}", free_ports(1)?[0]);
    let sys = EmbeddedSystem::start(EmbeddedOptions {
        store: StoreKind::Memory,
        relay_bin: Some(test_support::workspace_binary("relay-node")?),
        domains: (0..2)
            .map(|i| DomainSpec {
                name: format!("d{i}.target.example"),
                secret: format!("target-secret-{i}-0123456789abcdef"),
            })
            .collect(),
        log_dir: logs.path().to_owned(),
        ready_timeout: Duration::from_secs(20),
        xmpp: Some(XmppEmbedded {
            domain: "peer.example".into(),
            sink: Some(listen.parse()?),
        }),
        ..EmbeddedOptions::default()
    })
    .await?;
    let certs = sys.xmpp_certs().context("no XMPP certificates")?.clone();
    let out = tempfile::tempdir()?;
    let bin = env!("CARGO_BIN_EXE_relay-loadtest");
    let output = tokio::process::Command::new(bin)
        .args(["run", "one-to-one", "--protocol", "xmpp", "--users", "20"])
        .args([
            "--rate",
            "50",
            "--duration",
            "2s",
            "--warmup",
            "1s",
            "--quiet",
        ])
        .arg("--target")
        .arg(sys.http_targets()[0].as_str())
        .arg("--config-file")
        .arg(&sys.config_path)
        .arg("--xmpp-addr")
        .arg(sys.xmpp_targets()[0].as_str())
        .args(["--xmpp-domain", "peer.example", "--xmpp-listen", &listen])
        .arg("--xmpp-cert")
        .arg(&certs.peer_cert)
        .arg("--xmpp-key")
        .arg(&certs.peer_key)
        .arg("--tls-ca")
        .arg(&certs.ca)
        .arg("--out")
        .arg(out.path())
        .output()
        .await
        .context("running relay-loadtest")?;
    ensure!(
        output.status.success(),
        "relay-loadtest exited with {}:\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(out.path().join("result.json"))?)?;
    ensure!(r["passed"] == true, "{}", r["contract"]);
    ensure!(
        r["counts"]["accepted"] == 150 && r["contract"]["received_unique"] == 150,
        "{}",
        r["counts"]
    );
    ensure!(r["config"]["xmpp_streams"] == 4, "{}", r["config"]);
    // Without the remote domain's certificate the harness says what the relay offered.
    let output = tokio::process::Command::new(bin)
        .args(["run", "one-to-one", "--protocol", "xmpp", "--users", "4"])
        .args(["--rate", "10", "--duration", "1s", "--quiet"])
        .arg("--target")
        .arg(sys.http_targets()[0].as_str())
        .arg("--config-file")
        .arg(&sys.config_path)
        .arg("--xmpp-addr")
        .arg(sys.xmpp_targets()[0].as_str())
        .args(["--xmpp-domain", "other.example"])
        .arg("--xmpp-cert")
        .arg(&certs.peer_cert)
        .arg("--xmpp-key")
        .arg(&certs.peer_key)
        .arg("--tls-ca")
        .arg(&certs.ca)
        .arg("--out")
        .arg(out.path().join("refused"))
        .output()
        .await?;
    let err = String::from_utf8_lossy(&output.stderr);
    ensure!(output.status.code() == Some(2), "{err}");
    ensure!(
        err.contains("offers no SASL EXTERNAL for other.example"),
        "{err}"
    );
    Ok(())
}
