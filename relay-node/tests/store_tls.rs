//! TLS to the node's own backends: Redis over `rediss://` and etcd over `https://`, each
//! requiring a client certificate, with a CA made by the test. A node with the right CA and
//! certificates serves a message end to end; a wrong CA or a missing client certificate is
//! refused (verification is never off).

mod common;

use anyhow::{Context, Result, ensure};
use common::*;
use session_actor::store::{RedisStore, RedisStoreConfig, RedisTls};
use std::path::Path;
use std::time::Duration;
use test_support::certs::issue;
use test_support::{EtcdServer, RedisServer, RelayNode, ServerTls};

const T: Duration = Duration::from_secs(15);

fn server_tls(dir: &Path) -> ServerTls {
    ServerTls {
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
        ca: dir.join("ca.pem"),
        require_client_cert: true,
    }
}

fn p(dir: &Path, f: &str) -> String {
    dir.join(f).display().to_string()
}

/// The node's config: Redis over TLS with the CA `ca` and the client certificate, etcd over
/// HTTPS likewise.
fn node_config(redis: &RedisServer, etcd: &EtcdServer, dir: &Path, ca: &str) -> String {
    let store_tls = format!(
        "tls_ca = \"{}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
        p(dir, ca),
        p(dir, "client.pem"),
        p(dir, "client.key")
    );
    let etcd_tls = format!(
        "etcd_tls_ca = \"{}\"\netcd_tls_cert = \"{}\"\netcd_tls_key = \"{}\"\n",
        p(dir, ca),
        p(dir, "client.pem"),
        p(dir, "client.key")
    );
    cluster_config(
        &redis.url(),
        "http://127.0.0.1:9/hook",
        &etcd.endpoint(),
        "store-tls",
        "tls-1",
        "",
        &etcd_tls,
    )
    .replace(
        "response_timeout_ms = 500\n",
        &format!("response_timeout_ms = 500\n{store_tls}"),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_on_tls_redis_and_etcd_relays_and_wrong_trust_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    issue(dir.path(), "", "backends CA", &["server", "client"])?;
    issue(dir.path(), "other-", "some other CA", &["server", "client"])?;
    let redis = RedisServer::start_tls(server_tls(dir.path()))?;
    let etcd = EtcdServer::start_tls(server_tls(dir.path()))?;
    ensure!(redis.url().starts_with("rediss://") && etcd.endpoint().starts_with("https://"));

    // The right CA and client certificate: a message goes through Redis and etcd membership.
    let node = RelayNode::start(&node_config(&redis, &etcd, dir.path(), "ca.pem"))?;
    let c = client()?;
    wait_members(&c, &node.admin_url(), 1).await?;
    let base = node.http_url();
    let mut stream = Stream::open(&c, &base, "b.example", SECRET_B, None).await?;
    let acc = alice_to_bob(&c, &base, "tls-1", "over TLS all the way").await?;
    let ev = stream.next(T).await?;
    ensure!(ev.data["text"] == "over TLS all the way", "{}", ev.data);
    ensure!(
        ev.data["relay_msg_id"] == acc["relay_msg_id"],
        "{} {acc}",
        ev.data
    );
    drop(node);

    // Trusting another CA: etcd's certificate is refused and the node does not start.
    let e = match RelayNode::start(&node_config(&redis, &etcd, dir.path(), "other-ca.pem")) {
        Ok(_) => anyhow::bail!("a node that trusts another CA joined etcd"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(e.contains("etcd") && e.contains("UnknownIssuer"), "{e}");

    // The relay's Redis client: another CA, or no client certificate, gets no answer.
    let ping = |tls: RedisTls| {
        let mut cfg = RedisStoreConfig::new(redis.url());
        cfg.tls = tls;
        async move {
            let store = RedisStore::new(&cfg)?;
            let mut conn = store.connection();
            let pong: String = tokio::time::timeout(T, redis::cmd("PING").query_async(&mut conn))
                .await
                .context("PING timed out")??;
            anyhow::Ok(pong)
        }
    };
    let read = |f: &str| -> Result<Vec<u8>> { Ok(std::fs::read(dir.path().join(f))?) };
    let client = Some((read("client.pem")?, read("client.key")?));
    let good = ping(RedisTls {
        ca: Some(read("ca.pem")?),
        client: client.clone(),
    })
    .await?;
    ensure!(good == "PONG", "{good}");
    let wrong_ca = ping(RedisTls {
        ca: Some(read("other-ca.pem")?),
        client: client.clone(),
    })
    .await;
    ensure!(
        wrong_ca
            .as_ref()
            .is_err_and(|e| format!("{e:#}").contains("UnknownIssuer")),
        "PING with a CA that did not sign the server's certificate: {wrong_ca:?}"
    );
    let no_client_cert = ping(RedisTls {
        ca: Some(read("ca.pem")?),
        client: None,
    })
    .await;
    ensure!(
        no_client_cert.is_err(),
        "PING answered without the client certificate Redis requires"
    );
    Ok(())
}
