//! Rendezvous (highest-random-weight) hashing of sessions over members.

use crate::Member;
use session_actor::SessionId;
use sha2::{Digest, Sha256};

/// The member set at one membership revision, and who owns what.
#[derive(Debug, Clone)]
pub struct ShardMap {
    revision: i64,
    members: Vec<Member>,
}

impl ShardMap {
    pub fn new(revision: i64, mut members: Vec<Member>) -> Self {
        members.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        members.dedup_by(|a, b| a.node_id == b.node_id);
        Self { revision, members }
    }

    /// The membership revision (etcd's) this map was built from.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// This map without one member, at the same revision (a node's own view once it leaves).
    pub fn without(&self, node_id: &str) -> Self {
        Self {
            revision: self.revision,
            members: self
                .members
                .iter()
                .filter(|m| m.node_id != node_id)
                .cloned()
                .collect(),
        }
    }

    /// The member with this id, if it is one.
    pub fn member(&self, node_id: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.node_id == node_id)
    }

    /// The member with the highest score for `id`, or `None` with no members.
    pub fn owner(&self, id: &SessionId) -> Option<&Member> {
        self.members.iter().max_by_key(|m| score(&m.node_id, id))
    }
}

fn score(node_id: &str, id: &SessionId) -> u64 {
    let mut h = Sha256::new();
    h.update(id.0);
    h.update(node_id.as_bytes());
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_be_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize) -> Vec<Member> {
        (0..n)
            .map(|i| Member::new(format!("node-{i}"), format!("10.0.0.{i}:7000")))
            .collect()
    }

    fn ids(n: usize) -> Vec<SessionId> {
        (0..n)
            .map(|i| SessionId::channel("test", &i.to_string()))
            .collect()
    }

    #[test]
    fn owners_spread_evenly() {
        let map = ShardMap::new(1, members(4));
        let mut counts = std::collections::HashMap::new();
        for id in ids(20_000) {
            let owner = map
                .owner(&id)
                .map(|m| m.node_id.clone())
                .unwrap_or_default();
            *counts.entry(owner).or_insert(0u32) += 1;
        }
        assert_eq!(counts.len(), 4);
        for c in counts.values() {
            // 5,000 expected each; allow ±10%.
            assert!((4_500..=5_500).contains(c), "uneven spread: {counts:?}");
        }
    }

    #[test]
    fn adding_a_node_moves_only_its_share() {
        let before = ShardMap::new(1, members(4));
        let after = ShardMap::new(2, members(5));
        let all = ids(20_000);
        let moved = all
            .iter()
            .filter(|id| {
                before.owner(id).map(|m| &m.node_id) != after.owner(id).map(|m| &m.node_id)
            })
            .count();
        // Ideal: 1/5 of sessions move, all of them to the new node.
        assert!((3_400..=4_600).contains(&moved), "{moved} sessions moved");
        for id in &all {
            let (b, a) = (before.owner(id), after.owner(id));
            if b.map(|m| &m.node_id) != a.map(|m| &m.node_id) {
                assert_eq!(a.map(|m| m.node_id.as_str()), Some("node-4"));
            }
        }
    }

    #[test]
    fn member_order_does_not_matter() {
        let mut m = members(3);
        let a = ShardMap::new(1, m.clone());
        m.reverse();
        let b = ShardMap::new(1, m);
        for id in ids(100) {
            assert_eq!(a.owner(&id), b.owner(&id));
        }
        assert!(ShardMap::new(1, vec![]).owner(&ids(1)[0]).is_none());
    }
}
