//! The embedded system as a cluster, on real processes on loopback: etcd, Redis and three relay
//! nodes; one node killed, one added. Every generated config is also checked by the relay's
//! own validator (`relay-node check-config`). Waits poll `GET /cluster` up to a deadline.

use anyhow::{Context, Result, ensure};
use relay_loadtest::plan::DomainSpec;
use relay_loadtest::system::{
    ClusterMode, DeliverySpec, EmbeddedOptions, EmbeddedSystem, StoreKind, member_ids, wait_ready,
};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Bound of every wait.
const T: Duration = Duration::from_secs(30);
/// The lease TTL of the cluster's nodes: how long a killed node stays a member.
const LEASE_TTL_SECS: u64 = 3;

/// A line on stderr (shown with `--nocapture`): how long things took.
macro_rules! note {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

fn domains() -> Vec<DomainSpec> {
    (0..2)
        .map(|i| DomainSpec {
            name: format!("d{i}.cluster-test.example"),
            secret: format!("cluster-test-secret-{i}-0123456789"),
        })
        .collect()
}

fn options(
    log_dir: &Path,
    store: StoreKind,
    nodes: usize,
    cluster: ClusterMode,
) -> Result<EmbeddedOptions> {
    Ok(EmbeddedOptions {
        store,
        relay_bin: Some(test_support::workspace_binary("relay-node")?),
        redis_bin: None,
        domains: domains(),
        delivery: DeliverySpec::Stream,
        log_dir: log_dir.to_owned(),
        ready_timeout: T,
        nodes,
        cluster,
        etcd_bin: None,
        node_env: vec![("FEDRELAY_RUNTIME__WORKER_THREADS".into(), "1".into())],
        xmpp: None,
    })
}

/// `relay-node check-config <path>`, with none of this process's `FEDRELAY_*` overrides.
fn check_config(path: &Path) -> Result<()> {
    let mut cmd = Command::new(test_support::workspace_binary("relay-node")?);
    cmd.arg("check-config").arg(path);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("FEDRELAY_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd.output().context("running relay-node check-config")?;
    ensure!(
        out.status.success(),
        "relay-node check-config {} failed: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Polls `GET /cluster` of each of `nodes` until every one lists exactly `want`; fails after
/// `timeout` with what was seen last.
async fn wait_listed(
    sys: &EmbeddedSystem,
    nodes: &[usize],
    want: &[&str],
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut seen = Vec::new();
        for &i in nodes {
            match sys.cluster_view(i).await {
                Ok(v) => seen.push(Some(member_ids(&v))),
                Err(_) => seen.push(None),
            }
        }
        if seen
            .iter()
            .all(|s| s.as_deref().is_some_and(|ids| ids == want))
        {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "nodes {nodes:?} did not list exactly {want:?} within {timeout:?}; last seen {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test]
async fn three_nodes_with_etcd_survive_a_kill_and_take_a_new_node() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let t0 = Instant::now();
    let mut sys = EmbeddedSystem::start(options(
        dir.path(),
        StoreKind::Redis,
        3,
        ClusterMode::Etcd {
            lease_ttl_secs: LEASE_TTL_SECS,
        },
    )?)
    .await?;
    note!("3 nodes with etcd up and agreeing in {:?}", t0.elapsed());

    // Three nodes, all ready, each seeing all three.
    let ids: Vec<&str> = sys.nodes().iter().map(|n| n.id.as_str()).collect();
    ensure!(ids == ["n1", "n2", "n3"], "node ids {ids:?}");
    ensure!(sys.http_targets().len() == 3, "{:?}", sys.http_targets());
    ensure!(sys.grpc_targets().len() == 3, "{:?}", sys.grpc_targets());
    ensure!(sys.relay_pids().len() == 3);
    ensure!(sys.etcd_pid().is_some() && sys.redis_pid().is_some());
    ensure!(
        sys.cluster_name()
            .is_some_and(|n| n.starts_with("loadtest-"))
    );
    ensure!(sys.http_targets()[0] == format!("http://{}", sys.http));
    ensure!(sys.relay_pid() == sys.relay_pids()[0]);
    for n in sys.nodes() {
        wait_ready(&n.admin_url(), None, Duration::from_secs(2)).await?;
    }
    for i in 0..3 {
        let v = sys.cluster_view(i).await?;
        ensure!(v["node_id"] == format!("n{}", i + 1), "{v}");
        ensure!(v["ready"] == true, "{v}");
        ensure!(member_ids(&v) == ["n1", "n2", "n3"], "{v}");
    }

    // The configs: one per node, node 1's also as relay-config.toml; the relay accepts each.
    ensure!(sys.config_path == dir.path().join("relay-config.toml"));
    let mut configs: Vec<PathBuf> = sys.nodes().iter().map(|n| n.config_path.clone()).collect();
    configs.push(sys.config_path.clone());
    for c in &configs {
        check_config(c)?;
    }
    ensure!(std::fs::read_to_string(&configs[0])? == std::fs::read_to_string(&sys.config_path)?);
    for n in sys.nodes() {
        ensure!(
            n.log_path == dir.path().join(format!("relay-node-{}.log", n.id)),
            "{}",
            n.log_path.display()
        );
    }

    // Kill n2: two targets left, and that is no failure.
    let killed_pid = sys.nodes()[1].pid();
    let killed_at = sys.kill_node(1)?;
    ensure!(gone(killed_pid), "n2 (pid {killed_pid}) still there");
    ensure!(!sys.nodes()[1].is_alive() && sys.nodes()[1].child.is_none());
    ensure!(sys.http_targets().len() == 2, "{:?}", sys.http_targets());
    ensure!(sys.relay_pids().len() == 2);
    sys.check_alive()?;
    ensure!(sys.kill_node(1).is_err(), "killed twice");
    ensure!(sys.cluster_view(1).await.is_err(), "a view of a dead node");

    // The survivors drop n2 once its lease expires.
    wait_listed(&sys, &[0, 2], &["n1", "n3"], T).await?;
    note!(
        "the survivors dropped n2 {:?} after the kill (lease TTL {LEASE_TTL_SECS} s)",
        killed_at.elapsed()
    );
    sys.wait_converged(Duration::from_secs(5)).await?;

    // A fourth node joins.
    let (idx, took) = sys.add_node(T).await?;
    note!("n4 ready and listed by every node in {took:?}");
    ensure!(idx == 3 && sys.nodes()[3].id == "n4");
    ensure!(sys.http_targets().len() == 3 && sys.grpc_targets().len() == 3);
    wait_listed(&sys, &[0, 2, 3], &["n1", "n3", "n4"], T).await?;
    sys.check_alive()?;
    check_config(&sys.nodes()[3].config_path)?;

    // Dropping the system stops everything.
    let mut pids = sys.relay_pids();
    pids.extend(sys.etcd_pid());
    pids.extend(sys.redis_pid());
    drop(sys);
    for pid in pids {
        ensure!(gone(pid), "pid {pid} survived the drop");
    }
    Ok(())
}

#[tokio::test]
async fn a_static_node_serves_grpc() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut sys = EmbeddedSystem::start(options(
        dir.path(),
        StoreKind::Memory,
        1,
        ClusterMode::Static,
    )?)
    .await?;
    let grpc = sys.nodes()[0].grpc.context("no gRPC listener")?;
    ensure!(sys.grpc_targets() == [format!("http://{grpc}")]);
    tokio::net::TcpStream::connect(grpc)
        .await
        .with_context(|| format!("connecting to the gRPC listener {grpc}"))?;
    ensure!(sys.etcd_pid().is_none() && sys.redis_pid().is_none());
    ensure!(sys.cluster_name().is_none());
    ensure!(member_ids(&sys.cluster_view(0).await?) == ["n1"]);
    check_config(&sys.config_path)?;
    sys.check_alive()?;
    ensure!(
        sys.add_node(Duration::from_secs(1)).await.is_err(),
        "a node added without etcd"
    );
    Ok(())
}

#[tokio::test]
async fn a_cluster_without_etcd_or_redis_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let etcd = ClusterMode::Etcd {
        lease_ttl_secs: LEASE_TTL_SECS,
    };
    let e = EmbeddedSystem::start(options(dir.path(), StoreKind::Memory, 2, etcd)?)
        .await
        .err()
        .context("2 nodes on the memory store started")?;
    ensure!(format!("{e:#}").contains("Redis store"), "{e:#}");
    let e = EmbeddedSystem::start(options(dir.path(), StoreKind::Redis, 2, ClusterMode::None)?)
        .await
        .err()
        .context("2 nodes without etcd started")?;
    ensure!(format!("{e:#}").contains("etcd"), "{e:#}");
    // Refused before anything started or was written.
    ensure!(std::fs::read_dir(dir.path())?.next().is_none());
    Ok(())
}
