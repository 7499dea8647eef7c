//! The control plane of a node: federation policy, approvals, the metadata log, usage
//! accounting, the management API and its portal.

pub mod api;
pub mod approvals;
pub mod logstore;
pub mod metadata;
pub mod metering;
pub mod policy;
pub mod portal;
pub mod usage;
