//! Cluster membership: who is in the cluster, as of which revision.

use crate::ShardMap;
use async_trait::async_trait;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use thiserror::Error;
use tokio::sync::watch;

/// One relay node as the cluster sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Stable across restarts (config, or the StatefulSet ordinal).
    pub node_id: String,
    /// Where other nodes reach its gRPC services.
    pub grpc_addr: String,
    /// The relay version it runs.
    pub version: String,
    /// When it joined, in milliseconds since the Unix epoch.
    pub started_at_ms: i64,
}

impl Member {
    pub fn new(node_id: impl Into<String>, grpc_addr: impl Into<String>) -> Self {
        Self {
            node_id: node_id.into(),
            grpc_addr: grpc_addr.into(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0),
        }
    }
}

#[derive(Debug, Error)]
pub enum MembershipError {
    #[error("etcd: {0}")]
    Etcd(String),
    #[error("invalid membership entry {key}: {detail}")]
    Invalid { key: String, detail: String },
}

/// The source of the current shard map.
#[async_trait]
pub trait Membership: Send + Sync + 'static {
    /// This node's id.
    fn node_id(&self) -> &str;

    /// The shard map as of the latest membership change this node has seen.
    fn shard_map(&self) -> Arc<ShardMap>;

    /// Changes of the shard map, newest first.
    fn subscribe(&self) -> watch::Receiver<Arc<ShardMap>>;

    /// Whether this node is a member of its current shard map (readiness).
    fn is_member(&self) -> bool {
        let map = self.shard_map();
        map.members().iter().any(|m| m.node_id == self.node_id())
    }

    /// Leaves the cluster (drain): from now on this node's map no longer holds it, and other
    /// nodes learn it is gone without waiting for its lease to expire.
    async fn leave(&self) -> Result<(), MembershipError>;
}

/// A fixed member set: one node in `--dev`, or a list from config.
#[derive(Debug)]
pub struct StaticMembership {
    node_id: String,
    tx: watch::Sender<Arc<ShardMap>>,
    left: AtomicBool,
}

impl StaticMembership {
    pub fn new(node_id: &str, members: Vec<Member>) -> Self {
        let (tx, _) = watch::channel(Arc::new(ShardMap::new(0, members)));
        Self {
            node_id: node_id.to_string(),
            tx,
            left: AtomicBool::new(false),
        }
    }

    /// A cluster of just this node.
    pub fn single(node_id: &str) -> Self {
        Self::new(node_id, vec![Member::new(node_id, "")])
    }
}

#[async_trait]
impl Membership for StaticMembership {
    fn node_id(&self) -> &str {
        &self.node_id
    }

    fn shard_map(&self) -> Arc<ShardMap> {
        self.tx.borrow().clone()
    }

    fn subscribe(&self) -> watch::Receiver<Arc<ShardMap>> {
        self.tx.subscribe()
    }

    async fn leave(&self) -> Result<(), MembershipError> {
        if !self.left.swap(true, Ordering::SeqCst) {
            let map = self.shard_map().without(&self.node_id);
            self.tx.send_replace(Arc::new(map));
        }
        Ok(())
    }
}
