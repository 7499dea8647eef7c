//! The control plane of a node: federation policy and the metadata log.

pub mod api;
pub mod approvals;
pub mod metadata;
pub mod policy;
