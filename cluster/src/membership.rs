//! Cluster membership.

use crate::ShardMap;
use std::sync::Arc;

/// One relay node as the cluster sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Stable across restarts (config, or the StatefulSet ordinal).
    pub node_id: String,
    /// Where other nodes reach its session service.
    pub grpc_addr: String,
}

/// The source of the current shard map.
pub trait Membership: Send + Sync + 'static {
    /// The shard map as of the latest membership change this node has seen.
    fn shard_map(&self) -> Arc<ShardMap>;
}

/// A fixed member set: one node in `--dev`, or a list from config.
#[derive(Debug)]
pub struct StaticMembership {
    map: Arc<ShardMap>,
}

impl StaticMembership {
    pub fn new(members: Vec<Member>) -> Self {
        Self {
            map: Arc::new(ShardMap::new(0, members)),
        }
    }

    /// A cluster of just this node.
    pub fn single(node_id: &str) -> Self {
        Self::new(vec![Member {
            node_id: node_id.to_string(),
            grpc_addr: String::new(),
        }])
    }
}

impl Membership for StaticMembership {
    fn shard_map(&self) -> Arc<ShardMap> {
        self.map.clone()
    }
}
