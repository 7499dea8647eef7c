//! The harness against a deployment that speaks TLS everywhere: the HTTP edge over HTTPS with a
//! certificate from a private CA, and the cluster gRPC listener with mutual TLS. `--tls-ca`
//! makes the harness trust that CA; `--grpc-tls-cert/key` is its client certificate.

use anyhow::{Context, Result, ensure};
use std::path::Path;
use std::process::{Command, Output};
use test_support::certs::issue;
use test_support::{RedisServer, RelayNode};

const SECRETS: [(&str, &str); 2] = [
    ("d0.tls.example", "tls-test-secret-d0-0123456789"),
    ("d1.tls.example", "tls-test-secret-d1-0123456789"),
];

fn config(redis: &str, dir: &Path) -> String {
    let p = |f: &str| dir.join(f).display().to_string();
    let mut c = format!(
        "node_id = \"tls-1\"\n\n[http]\nlisten = \"127.0.0.1:{{HTTP_PORT}}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n\n\
         [admin]\nlisten = \"127.0.0.1:{{ADMIN_PORT}}\"\n\n\
         [store]\nbackend = \"redis\"\nredis_url = \"{redis}\"\n\n\
         [telemetry]\nlog_level = \"warn\"\n\n\
         [cluster]\ngrpc_listen = \"127.0.0.1:{{GRPC_PORT}}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\ntls_ca = \"{}\"\n\n",
        p("node.pem"),
        p("node.key"),
        p("node.pem"),
        p("node.key"),
        p("ca.pem"),
    );
    for (name, secret) in SECRETS {
        c.push_str(&format!(
            "[[domains]]\nname = \"{name}\"\nplatform = \"http\"\nsecret = \"{secret}\"\ndelivery = \"stream\"\n\n"
        ));
    }
    c.push_str(&format!(
        "[[federation]]\nbetween = [\"{}\", \"{}\"]\n",
        SECRETS[0].0, SECRETS[1].0
    ));
    c
}

fn loadtest(node: &RelayNode, out: &Path, args: &[&str]) -> Result<Output> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_relay-loadtest"));
    cmd.arg("run")
        .args(args)
        .arg("--target")
        .arg(format!("https://localhost:{}", node.http_port))
        .arg("--admin")
        .arg(node.admin_url())
        .args([
            "--rate",
            "50",
            "--duration",
            "2s",
            "--warmup",
            "0s",
            "--quiet",
        ])
        .arg("--out")
        .arg(out);
    for (name, secret) in SECRETS {
        cmd.arg("--domain").arg(format!("{name}={secret}"));
    }
    cmd.output().context("running relay-loadtest")
}

fn passed(o: &Output, what: &str) -> Result<()> {
    ensure!(
        o.status.success(),
        "{what}: {}\n{}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    ensure!(
        String::from_utf8_lossy(&o.stdout).contains("contract              OK"),
        "{what}"
    );
    Ok(())
}

#[test]
fn https_edge_and_mutual_tls_grpc() -> Result<()> {
    let redis = RedisServer::start()?;
    let dir = tempfile::tempdir()?;
    issue(dir.path(), "", "loadtest test CA", &["node", "client"])?;
    let node = RelayNode::start(&config(&redis.url(), dir.path()))?;
    let ca = dir.path().join("ca.pem");
    let ca = ca.to_str().context("path")?;
    let out = tempfile::tempdir()?;

    // HTTPS: sends and the event streams, trusting the private CA.
    let o = loadtest(
        &node,
        out.path(),
        &["one-to-one", "--users", "8", "--tls-ca", ca],
    )?;
    passed(&o, "one-to-one over https")?;

    // gRPC with mutual TLS: the harness presents a certificate of the cluster's CA.
    let grpc = format!("https://localhost:{}", node.grpc_port);
    let cert = dir.path().join("client.pem");
    let key = dir.path().join("client.key");
    let o = loadtest(
        &node,
        out.path(),
        &[
            "fan-out",
            "--members",
            "10",
            "--tls-ca",
            ca,
            "--grpc-target",
            &grpc,
            "--grpc-tls-cert",
            cert.to_str().context("path")?,
            "--grpc-tls-key",
            key.to_str().context("path")?,
        ],
    )?;
    passed(&o, "fan-out over mutual TLS")?;

    // Without the CA the edge's certificate is not trusted: nothing connects, exit 2.
    let o = loadtest(
        &node,
        out.path(),
        &["one-to-one", "--users", "8", "--ready-timeout", "3s"],
    )?;
    let err = String::from_utf8_lossy(&o.stderr);
    ensure!(o.status.code() == Some(2), "{:?}: {err}", o.status);
    ensure!(
        err.contains("certificate") || err.contains("Certificate"),
        "{err}"
    );

    // Without a client certificate the cluster listener refuses the stream: every send fails.
    let o = loadtest(
        &node,
        out.path(),
        &[
            "fan-out",
            "--members",
            "10",
            "--tls-ca",
            ca,
            "--grpc-target",
            &grpc,
        ],
    )?;
    let stdout = String::from_utf8_lossy(&o.stdout);
    ensure!(o.status.code() == Some(1), "{:?}: {stdout}", o.status);
    ensure!(
        stdout.contains("accepted 0 "),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(())
}
