//! Membership against a real etcd: joining, leaving, a lease that expires, and following the
//! member set across an etcd restart.

use anyhow::{Result, ensure};
use cluster::{EtcdConfig, EtcdMembership, Member, Membership};
use std::sync::Arc;
use std::time::Duration;
use test_support::{EtcdServer, wait_for};

const WAIT: Duration = Duration::from_secs(15);

fn config(etcd: &EtcdServer, id: &str) -> EtcdConfig {
    EtcdConfig {
        endpoints: vec![etcd.endpoint()],
        prefix: "/fedrelay/membership-test/".into(),
        lease_ttl: Duration::from_secs(2),
        me: Member::new(id, format!("127.0.0.1:1{id}")),
        tls: None,
    }
}

fn ids(m: &dyn Membership) -> Vec<String> {
    m.shard_map()
        .members()
        .iter()
        .map(|m| m.node_id.clone())
        .collect()
}

async fn wait_members(m: &dyn Membership, want: &[&str]) -> Result<()> {
    wait_for(
        &format!("{} to see {want:?}", m.node_id()),
        WAIT,
        || async { (ids(m) == want).then_some(()) },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn members_join_leave_expire_and_survive_an_etcd_restart() -> Result<()> {
    let mut etcd = EtcdServer::start()?;
    let a = EtcdMembership::start(config(&etcd, "001")).await?;
    let b = EtcdMembership::start(config(&etcd, "002")).await?;
    wait_members(a.as_ref(), &["001", "002"]).await?;
    wait_members(b.as_ref(), &["001", "002"]).await?;
    ensure!(a.is_member() && b.is_member());
    ensure!(
        a.shard_map().revision() == b.shard_map().revision(),
        "both maps are built from the same revision"
    );
    let member = a.shard_map().member("002").cloned();
    ensure!(member.is_some_and(|m| m.grpc_addr == "127.0.0.1:1002" && !m.version.is_empty()));

    // A clean leave is seen at once, not after the lease TTL.
    b.leave().await?;
    ensure!(!b.is_member(), "a node that left is not ready");
    wait_members(a.as_ref(), &["001"]).await?;

    // A node that dies without leaving (its runtime gone, no more keep-alives) drops out
    // when its lease expires.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let cfg = config(&etcd, "003");
    let c: Arc<EtcdMembership> = rt
        .spawn(async move { EtcdMembership::start(cfg).await })
        .await??;
    wait_members(a.as_ref(), &["001", "003"]).await?;
    drop(c);
    rt.shutdown_background();
    wait_members(a.as_ref(), &["001"]).await?;

    // etcd down: the node keeps its last map and stays a member; back up: it follows
    // changes again (it resynchronised, and its lease survived).
    let before = a.shard_map().revision();
    etcd.stop()?;
    wait_for("the node to notice etcd is gone", WAIT, || async {
        (!a.is_watching()).then_some(())
    })
    .await?;
    ensure!(ids(a.as_ref()) == ["001"] && a.is_member());
    etcd.start_again()?;
    wait_for("the node to follow etcd again", WAIT, || async {
        a.is_watching().then_some(())
    })
    .await?;
    let d = EtcdMembership::start(config(&etcd, "004")).await?;
    wait_members(a.as_ref(), &["001", "004"]).await?;
    wait_members(d.as_ref(), &["001", "004"]).await?;
    ensure!(a.shard_map().revision() > before);
    Ok(())
}
