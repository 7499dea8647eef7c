//! The README's demo against `relay-node --dev`: beta's stream, a signed message from alpha.

mod common;

use anyhow::{Result, ensure};
use common::{Stream, client, message, post};
use std::time::Duration;
use test_support::RelayNode;

#[tokio::test]
async fn the_readme_demo_works_on_the_embedded_default() -> Result<()> {
    let node = RelayNode::start_dev()?;
    let c = client()?;
    let base = node.http_url();
    let mut stream = Stream::open(
        &c,
        &base,
        "beta.example",
        "beta-demo-secret-0123456789",
        None,
    )
    .await?;
    let ev = message("evt-1", "alice", "bob@beta.example", "Hello Bob");
    let (s, acc) = post(
        &c,
        &base,
        "alpha.example",
        "alpha-demo-secret-0123456789",
        &ev,
    )
    .await?;
    ensure!(s == 202 && acc["seq"] == 1, "{s} {acc}");
    let got = stream.next(Duration::from_secs(10)).await?;
    ensure!(
        got.id == "0-1"
            && got.data["text"] == "Hello Bob"
            && got.data["from"] == "alice@alpha.example"
    );
    let (s, again) = post(
        &c,
        &base,
        "alpha.example",
        "alpha-demo-secret-0123456789",
        &ev,
    )
    .await?;
    ensure!(s == 202 && again["duplicate"] == true);
    stream.expect_none(Duration::from_millis(300)).await?;
    Ok(())
}
