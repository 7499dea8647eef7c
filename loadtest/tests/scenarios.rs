//! Every scenario of the harness, run by its command line against the real thing: an embedded
//! redis-server, relay-node(s) and, for clusters, etcd, started by the harness itself. Each run
//! must keep the delivery contract (the harness exits 1 otherwise) and deliver every accepted
//! event to every recipient. Not a speed test: rates are low and nothing about time is
//! asserted except that a killed node's sessions came back.

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use std::path::Path;
use std::process::Command;

/// Runs `relay-loadtest run ARGS…` with the workspace's relay-node; returns its result.json.
fn run(args: &[&str]) -> Result<Value> {
    let relay = test_support::workspace_binary("relay-node")?;
    let out = tempfile::tempdir()?;
    let output = Command::new(env!("CARGO_BIN_EXE_relay-loadtest"))
        .arg("run")
        .args(args)
        .args(["--quiet", "--warmup", "1s"])
        .arg("--relay-bin")
        .arg(&relay)
        .arg("--out")
        .arg(out.path())
        .output()
        .context("running relay-loadtest")?;
    let text = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "relay-loadtest {args:?} exited with {}:\n{text}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    for plot in [
        "latency_over_time.svg",
        "throughput.svg",
        "latency_distribution.svg",
        "memory.svg",
    ] {
        ensure!(out.path().join(plot).is_file(), "{plot} missing");
    }
    let r: Value = serde_json::from_str(&std::fs::read_to_string(out.path().join("result.json"))?)?;
    Ok(r)
}

/// The contract held and every accepted event reached all its recipients.
fn delivered_all(r: &Value) -> Result<()> {
    let c = &r["contract"];
    ensure!(r["passed"] == true, "{c}");
    let accepted = c["accepted"].as_u64().unwrap_or(0);
    ensure!(accepted > 0, "nothing accepted: {c}");
    ensure!(
        r["counts"]["accepted"] == r["counts"]["planned"],
        "{}",
        r["counts"]
    );
    let per = r["config"]["recipients_per_event"].as_u64().unwrap_or(0);
    ensure!(
        c["expected_deliveries"].as_u64() == Some(accepted * per)
            && c["received_unique"] == c["expected_deliveries"],
        "{c}"
    );
    Ok(())
}

#[test]
fn one_to_one_over_grpc_straight_into_the_session_service() -> Result<()> {
    let r = run(&[
        "one-to-one",
        "--protocol",
        "grpc",
        "--users",
        "40",
        "--domains",
        "2",
        "--rate",
        "200",
        "--duration",
        "2s",
    ])?;
    delivered_all(&r)?;
    ensure!(r["config"]["protocol"] == "grpc");
    ensure!(r["config"]["recipients_per_event"] == 1);
    Ok(())
}

#[test]
fn mixed_edits_reactions_typing_and_deletes_over_http_and_grpc() -> Result<()> {
    for protocol in ["http", "grpc"] {
        // 20 users at 200/s for 3 s: 30 events each, three whole cycles of ten.
        let r = run(&[
            "mixed",
            "--protocol",
            protocol,
            "--users",
            "20",
            "--domains",
            "2",
            "--rate",
            "200",
            "--duration",
            "2s",
        ])?;
        delivered_all(&r).with_context(|| protocol.to_owned())?;
        ensure!(
            r["contract"]["skipped"] == 0,
            "{protocol}: {}",
            r["contract"]
        );
    }
    Ok(())
}

#[test]
fn channel_fan_out_reaches_every_member() -> Result<()> {
    let r = run(&[
        "fan-out",
        "--members",
        "100",
        "--domains",
        "3",
        "--rate",
        "10",
        "--duration",
        "2s",
    ])?;
    delivered_all(&r)?;
    ensure!(r["config"]["recipients_per_event"] == 100);
    // 30 posts × 100 members.
    ensure!(
        r["contract"]["received_unique"] == 3000,
        "{}",
        r["contract"]
    );
    Ok(())
}

#[test]
fn presence_storm_reaches_every_follower() -> Result<()> {
    let r = run(&[
        "presence-storm",
        "--publishers",
        "5",
        "--subscribers",
        "20",
        "--domains",
        "3",
        "--rate",
        "20",
        "--duration",
        "2s",
    ])?;
    delivered_all(&r)?;
    ensure!(r["config"]["recipients_per_event"] == 20);
    ensure!(
        r["setup_s"].as_f64().unwrap_or(0.0) > 0.0,
        "followers set up first"
    );
    Ok(())
}

#[test]
fn a_killed_node_is_survived_and_a_new_one_joins_from_a_scenario_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("failover.toml");
    std::fs::write(
        &file,
        r#"
scenario = "one-to-one"
nodes = 3
lease_ttl = "2s"
users = 60
domains = 2
rate = 100
duration = "6s"
kill_node_after = "2s"
add_node_after = "4s"
drain_timeout = "20s"
"#,
    )?;
    let r = run(&["--file", path(&file)?])?;
    delivered_all(&r)?;
    let faults = r["faults"].as_array().cloned().unwrap_or_default();
    ensure!(faults.len() == 2, "{}", r["faults"]);
    ensure!(
        faults[0]["kind"] == "kill" && faults[0]["node"] == "n3",
        "{}",
        faults[0]
    );
    ensure!(
        faults[1]["kind"] == "add" && faults[1]["node"] == "n4",
        "{}",
        faults[1]
    );
    // Sends to the dead node failed over, and the sessions it owned came back (a node's lease
    // outlives it by up to the TTL, so some sends had to wait for that).
    ensure!(
        r["retries"]["events"].as_u64().unwrap_or(0) > 0,
        "{}",
        r["retries"]
    );
    ensure!(
        r["retries"]["events"] == r["retries"]["recovered"],
        "{}",
        r["retries"]
    );
    ensure!(
        faults[0]["recovered_after_ms"].as_f64().is_some(),
        "{}",
        faults[0]
    );
    ensure!(
        faults[1]["ready_after_ms"].as_f64().is_some(),
        "{}",
        faults[1]
    );
    // The new node is a member at the end.
    let members = r["cluster"].to_string();
    ensure!(members.contains("\"n4\""), "{members}");
    Ok(())
}

#[test]
fn bad_scenario_files_and_flags_are_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "scenario = \"one-to-one\"\nratee = 5\n")?;
    for (args, expect) in [
        (vec!["--file", path(&file)?], "ratee"),
        (vec!["fan-out", "--protocol", "http"], "grpc only"),
        (vec!["presence-storm", "--protocol", "grpc"], "http only"),
        (
            vec!["one-to-one", "--nodes", "2", "--store", "memory"],
            "redis",
        ),
        (
            vec!["one-to-one", "--kill-node-after", "1s"],
            "at least 2 nodes",
        ),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_relay-loadtest"))
            .arg("run")
            .args(&args)
            .args(["--quiet", "--duration", "1s", "--out"])
            .arg(dir.path().join("out"))
            .output()?;
        let err = String::from_utf8_lossy(&output.stderr);
        ensure!(
            output.status.code() == Some(2),
            "{args:?}: {:?} {err}",
            output.status
        );
        ensure!(err.contains(expect), "{args:?}: {err}");
    }
    Ok(())
}

fn path(p: &Path) -> Result<&str> {
    p.to_str().context("non-UTF-8 path")
}
