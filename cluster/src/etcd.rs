//! Membership in etcd.
//!
//! Each node keeps one key, `<prefix>nodes/<node id>`, attached to a lease it keeps alive;
//! the value says how to reach it (JSON: gRPC address, version, start time). Every node reads
//! the prefix and then watches it from the revision it read, so all nodes build the same
//! [`ShardMap`] from the same revision. When the watch fails (etcd restarted, the connection
//! dropped, the revision was compacted) the node reconnects and reads the whole prefix again;
//! until then it keeps relaying on its last map — leases are liveness, not locks, and the
//! session epochs in Redis keep two owners from ever both appending.
//!
//! A node whose lease expired (it was paused, or cut off from etcd for longer than the TTL)
//! sees its own key deleted, hands its sessions over, and registers again with a new lease.

use crate::ShardMap;
use crate::membership::{Member, Membership, MembershipError};
use async_trait::async_trait;
use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions, WatchResponse,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

/// Where and how to register.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    /// Key prefix of this cluster, e.g. `/fedrelay/prod/`.
    pub prefix: String,
    /// Lease TTL: a node that stops keeping it alive drops out after this long.
    pub lease_ttl: Duration,
    /// This node.
    pub me: Member,
    /// TLS for `https://` endpoints: the CA to trust and, for etcd's client-certificate
    /// authentication, this node's certificate.
    pub tls: Option<TlsOptions>,
}

/// TLS settings for `https://` etcd endpoints (tonic's client TLS, with rustls).
pub use etcd_client::TlsOptions;

/// The value of a node key.
#[derive(Debug, Serialize, Deserialize)]
struct NodeValue {
    grpc_addr: String,
    version: String,
    started_at_ms: i64,
}

struct Shared {
    left: AtomicBool,
    leave: Notify,
    gone: Notify,
    /// Lease currently holding this node's key (0: none).
    lease: AtomicI64,
    /// Connected and watching (not just running on the last map).
    watching: AtomicBool,
}

/// Membership kept in etcd (see the module docs).
pub struct EtcdMembership {
    node_id: String,
    tx: watch::Sender<Arc<ShardMap>>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for EtcdMembership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdMembership")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

impl EtcdMembership {
    /// Registers this node and starts following the member set. Returns once the first map
    /// (holding this node) is known, or with the error of the first attempt.
    pub async fn start(cfg: EtcdConfig) -> Result<Arc<Self>, MembershipError> {
        if cfg.lease_ttl < Duration::from_secs(2) {
            return Err(MembershipError::Etcd(
                "lease TTL must be at least 2 s".into(),
            ));
        }
        let (tx, mut rx) = watch::channel(Arc::new(ShardMap::new(0, Vec::new())));
        let shared = Arc::new(Shared {
            left: AtomicBool::new(false),
            leave: Notify::new(),
            gone: Notify::new(),
            lease: AtomicI64::new(0),
            watching: AtomicBool::new(false),
        });
        let this = Arc::new(Self {
            node_id: cfg.me.node_id.clone(),
            tx: tx.clone(),
            shared: shared.clone(),
        });
        let (first_tx, first_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(run(cfg, tx, shared, first_tx));
        match first_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(MembershipError::Etcd("membership task ended".into())),
        }
        rx.borrow_and_update();
        Ok(this)
    }

    /// Whether the node is connected to etcd and watching right now.
    pub fn is_watching(&self) -> bool {
        self.shared.watching.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl Membership for EtcdMembership {
    fn node_id(&self) -> &str {
        &self.node_id
    }

    fn shard_map(&self) -> Arc<ShardMap> {
        self.tx.borrow().clone()
    }

    fn subscribe(&self) -> watch::Receiver<Arc<ShardMap>> {
        self.tx.subscribe()
    }

    fn is_member(&self) -> bool {
        !self.shared.left.load(Ordering::SeqCst)
            && self
                .shard_map()
                .members()
                .iter()
                .any(|m| m.node_id == self.node_id)
    }

    async fn leave(&self) -> Result<(), MembershipError> {
        if self.shared.left.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        // This node's own view drops it at once, so its sessions move now.
        let map = self.shard_map().without(&self.node_id);
        self.tx.send_replace(Arc::new(map));
        let gone = self.shared.gone.notified();
        tokio::pin!(gone);
        gone.as_mut().enable();
        self.shared.leave.notify_one();
        // Deleting the key tells the others now instead of after the lease TTL.
        if tokio::time::timeout(Duration::from_secs(3), gone)
            .await
            .is_err()
        {
            return Err(MembershipError::Etcd(
                "could not deregister within 3 s; the lease expires on its own".into(),
            ));
        }
        Ok(())
    }
}

fn node_prefix(prefix: &str) -> String {
    format!("{prefix}nodes/")
}

async fn run(
    cfg: EtcdConfig,
    tx: watch::Sender<Arc<ShardMap>>,
    shared: Arc<Shared>,
    first: tokio::sync::oneshot::Sender<Result<(), MembershipError>>,
) {
    let mut first = Some(first);
    let mut failures = 0u32;
    loop {
        let outcome = follow(&cfg, &tx, &shared, &mut first).await;
        shared.watching.store(false, Ordering::Relaxed);
        match outcome {
            Ok(()) => {
                shared.gone.notify_waiters();
                return;
            }
            Err(e) => {
                if let Some(f) = first.take() {
                    let _ = f.send(Err(e));
                    return;
                }
                if shared.left.load(Ordering::SeqCst) {
                    // Leaving and etcd is unreachable: the lease expires on its own.
                    shared.gone.notify_waiters();
                    return;
                }
                failures = failures.saturating_add(1);
                let delay = Duration::from_millis(100 * u64::from(failures.min(10)));
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "etcd membership interrupted; keeping the last shard map");
                metrics::counter!("fedrelay_membership_resyncs_total").increment(1);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shared.leave.notified() => {
                        shared.gone.notify_waiters();
                        return;
                    }
                }
            }
        }
    }
}

fn etcd_err(e: etcd_client::Error) -> MembershipError {
    MembershipError::Etcd(e.to_string())
}

/// One connected stretch: register, read, watch, keep alive — until an error or leaving.
async fn follow(
    cfg: &EtcdConfig,
    tx: &watch::Sender<Arc<ShardMap>>,
    shared: &Shared,
    first: &mut Option<tokio::sync::oneshot::Sender<Result<(), MembershipError>>>,
) -> Result<(), MembershipError> {
    let ttl = cfg.lease_ttl;
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(ttl / 2)
        .with_keep_alive(Duration::from_secs(1), Duration::from_secs(2));
    if let Some(tls) = &cfg.tls {
        opts = opts.with_tls(tls.clone());
    }
    let mut client = Client::connect(&cfg.endpoints, Some(opts))
        .await
        .map_err(etcd_err)?;
    let prefix = node_prefix(&cfg.prefix);
    let key = format!("{prefix}{}", cfg.me.node_id);

    // Keep the lease across reconnects while etcd still knows it.
    let mut lease = shared.lease.load(Ordering::SeqCst);
    if lease != 0 {
        let alive = client
            .lease_time_to_live(lease, None)
            .await
            .map(|r| r.ttl() > 0)
            .unwrap_or(false);
        if !alive {
            lease = 0;
        }
    }
    if lease == 0 {
        lease = client
            .lease_grant(ttl.as_secs() as i64, None)
            .await
            .map_err(etcd_err)?
            .id();
        shared.lease.store(lease, Ordering::SeqCst);
        info!(lease, "etcd lease granted");
    }
    let (mut keeper, mut keep_stream) = client.lease_keep_alive(lease).await.map_err(etcd_err)?;
    if !shared.left.load(Ordering::SeqCst) {
        let value = serde_json::to_vec(&NodeValue {
            grpc_addr: cfg.me.grpc_addr.clone(),
            version: cfg.me.version.clone(),
            started_at_ms: cfg.me.started_at_ms,
        })
        .map_err(|e| MembershipError::Etcd(e.to_string()))?;
        client
            .put(
                key.clone(),
                value,
                Some(PutOptions::new().with_lease(lease)),
            )
            .await
            .map_err(etcd_err)?;
    }

    let resp = client
        .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(etcd_err)?;
    let mut revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    let mut members = BTreeMap::new();
    for kv in resp.kvs() {
        match parse_member(&prefix, kv.key(), kv.value()) {
            Ok(m) => {
                members.insert(m.node_id.clone(), m);
            }
            Err(e) => warn!(error = %e, "ignoring a malformed member key"),
        }
    }
    publish(tx, shared, &cfg.me.node_id, revision, &members);
    let mut watch = client
        .watch(
            prefix.clone(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1)
                    .with_progress_notify(),
            ),
        )
        .await
        .map_err(etcd_err)?;
    shared.watching.store(true, Ordering::Relaxed);
    if let Some(f) = first.take() {
        let _ = f.send(Ok(()));
    }
    debug!(
        revision,
        members = members.len(),
        "following etcd membership"
    );

    let mut tick = tokio::time::interval(ttl / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                keeper.keep_alive().await.map_err(etcd_err)?;
            }
            msg = keep_stream.message() => {
                match msg.map_err(etcd_err)? {
                    Some(r) if r.ttl() <= 0 => {
                        // Expired while this node was paused or cut off: register anew.
                        shared.lease.store(0, Ordering::SeqCst);
                        return Err(MembershipError::Etcd("lease expired".into()));
                    }
                    Some(_) => {}
                    None => return Err(MembershipError::Etcd("keep-alive stream ended".into())),
                }
            }
            msg = watch.message() => {
                let Some(resp) = msg.map_err(etcd_err)? else {
                    return Err(MembershipError::Etcd("watch stream ended".into()));
                };
                if resp.compact_revision() > 0 {
                    return Err(MembershipError::Etcd(format!(
                        "watch compacted at revision {}; resynchronising",
                        resp.compact_revision()
                    )));
                }
                if resp.canceled() {
                    return Err(MembershipError::Etcd(format!(
                        "watch cancelled: {}",
                        resp.cancel_reason()
                    )));
                }
                // Any event moves the map to its revision, even a re-registration that
                // leaves the member set as it was: every node then names the same revision.
                if !resp.events().is_empty() {
                    apply(&prefix, &resp, &mut members);
                    revision = resp.header().map(|h| h.revision()).unwrap_or(revision);
                    publish(tx, shared, &cfg.me.node_id, revision, &members);
                }
            }
            _ = shared.leave.notified() => {
                let _ = client.delete(key.clone(), None).await;
                let _ = client.lease_revoke(lease).await;
                info!("left the cluster");
                return Ok(());
            }
        }
    }
}

/// Applies watch events to the member set.
fn apply(prefix: &str, resp: &WatchResponse, members: &mut BTreeMap<String, Member>) {
    for ev in resp.events() {
        let Some(kv) = ev.kv() else { continue };
        match ev.event_type() {
            EventType::Put => match parse_member(prefix, kv.key(), kv.value()) {
                Ok(m) => {
                    members.insert(m.node_id.clone(), m);
                }
                Err(e) => warn!(error = %e, "ignoring a malformed member key"),
            },
            EventType::Delete => {
                if let Some(id) = String::from_utf8_lossy(kv.key()).strip_prefix(prefix) {
                    members.remove(id);
                }
            }
        }
    }
}

fn publish(
    tx: &watch::Sender<Arc<ShardMap>>,
    shared: &Shared,
    me: &str,
    revision: i64,
    members: &BTreeMap<String, Member>,
) {
    let left = shared.left.load(Ordering::SeqCst);
    let list: Vec<Member> = members
        .values()
        .filter(|m| !(left && m.node_id == me))
        .cloned()
        .collect();
    metrics::gauge!("fedrelay_cluster_members").set(list.len() as f64);
    metrics::gauge!("fedrelay_cluster_revision").set(revision as f64);
    info!(revision, members = list.len(), "shard map changed");
    tx.send_replace(Arc::new(ShardMap::new(revision, list)));
}

fn parse_member(prefix: &str, key: &[u8], value: &[u8]) -> Result<Member, MembershipError> {
    let key = String::from_utf8_lossy(key);
    let node_id = key
        .strip_prefix(prefix)
        .filter(|id| !id.is_empty() && !id.contains('/'))
        .ok_or_else(|| MembershipError::Invalid {
            key: key.to_string(),
            detail: "not a node key".into(),
        })?;
    let v: NodeValue = serde_json::from_slice(value).map_err(|e| MembershipError::Invalid {
        key: key.to_string(),
        detail: e.to_string(),
    })?;
    Ok(Member {
        node_id: node_id.to_string(),
        grpc_addr: v.grpc_addr,
        version: v.version,
        started_at_ms: v.started_at_ms,
    })
}
