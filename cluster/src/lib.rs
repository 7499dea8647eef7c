//! fedrelay cluster: which node owns which session, and getting envelopes there.
//!
//! - [`membership`]: the [`Membership`] trait — the live member set plus the revision it was
//!   read at — with [`StaticMembership`] for `--dev` and fixed deployments and
//!   [`EtcdMembership`] (leases, keep-alive, watch, resync) for real clusters.
//! - [`shard`]: the [`ShardMap`], rendezvous hashing over the members: every node computes
//!   the same owner for a session with no coordination, and a membership change moves only
//!   the sessions whose winner changed (about 1/N of them).
//! - [`router`]: the [`Router`], the node's [`session_actor::Ingress`]: an envelope goes to
//!   the local session supervisor when this node owns its session, else over [`peer`] links
//!   (one batched gRPC stream per peer) to the owner.
//! - [`service`]: the gRPC services a node offers its peers.
//! - [`presence`]: one actor per user's presence, sharded like sessions, fanning updates out
//!   per destination node.
//! - [`node`]: [`ClusterNode`], all of it wired together, reacting to membership changes
//!   (hand off sessions that moved away, resume those that moved here).
#![forbid(unsafe_code)]

pub mod etcd;
pub mod membership;
pub mod node;
pub mod peer;
pub mod presence;
pub mod router;
pub mod service;
pub mod shard;
pub mod trace;

pub use etcd::{EtcdConfig, EtcdMembership};
pub use membership::{Member, Membership, MembershipError, StaticMembership};
pub use node::{ClusterNode, ClusterNodeConfig};
pub use peer::{PeerConfig, Peers};
pub use router::{MapOwnership, Router};
pub use shard::ShardMap;
