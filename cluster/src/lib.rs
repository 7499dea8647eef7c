//! fedrelay cluster: which node owns which session, and getting envelopes there.
//!
//! - [`membership`]: the [`Membership`] trait — the live member set plus the revision it was
//!   read at — and [`StaticMembership`] for single-node and fixed deployments.
//! - [`shard`]: the [`ShardMap`], rendezvous hashing over the members: every node computes
//!   the same owner for a session with no coordination, and a membership change moves only
//!   the sessions whose winner changed (about 1/N of them).
//! - [`router`]: the [`Router`], the node's [`session_actor::Ingress`]: an envelope goes to
//!   the local session supervisor when this node owns its session.
#![forbid(unsafe_code)]

pub mod membership;
pub mod router;
pub mod shard;

pub use membership::{Member, Membership, StaticMembership};
pub use router::{Router, RouterError};
pub use shard::ShardMap;
