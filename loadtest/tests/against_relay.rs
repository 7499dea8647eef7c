//! The harness against the real thing: embedded redis-server and relay-node, a short
//! open-loop run, the delivery contract checked. Not a speed test: rates are low and nothing
//! about time is asserted.

use anyhow::{Context, Result, ensure};
use std::process::Command;

fn run(receive: &str) -> Result<serde_json::Value> {
    let relay = test_support::workspace_binary("relay-node")?;
    let out = tempfile::tempdir()?;
    let status = Command::new(env!("CARGO_BIN_EXE_relay-loadtest"))
        .args([
            "run",
            "one-to-one",
            "--rate",
            "300",
            "--duration",
            "2s",
            "--warmup",
            "1s",
        ])
        .args([
            "--users",
            "40",
            "--domains",
            "2",
            "--receive",
            receive,
            "--quiet",
        ])
        .arg("--relay-bin")
        .arg(&relay)
        .arg("--out")
        .arg(out.path())
        .status()
        .context("running relay-loadtest")?;
    ensure!(
        status.success(),
        "relay-loadtest ({receive}) exited with {status}"
    );
    let text = std::fs::read_to_string(out.path().join("result.json"))?;
    Ok(serde_json::from_str(&text)?)
}

#[test]
fn a_short_run_over_streams_and_webhooks_keeps_the_delivery_contract() -> Result<()> {
    for receive in ["stream", "webhook"] {
        let r = run(receive)?;
        ensure!(r["passed"] == true, "{receive}: {}", r["contract"]);
        let c = &r["counts"];
        ensure!(
            c["planned"].as_u64().unwrap_or(0) > 0 && c["accepted"] == c["planned"],
            "{receive}: {c}"
        );
        ensure!(c["accepted"] == c["received_unique"], "{receive}: {c}");
        ensure!(
            r["cpu"]["relay"]["us_per_message"].as_f64().unwrap_or(0.0) > 0.0,
            "relay CPU not measured"
        );
    }
    Ok(())
}
