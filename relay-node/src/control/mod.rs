//! The control plane of a node: federation policy, approvals, the metadata log, usage
//! accounting and the management API.

pub mod api;
pub mod approvals;
pub mod logstore;
pub mod metadata;
pub mod metering;
pub mod policy;
pub mod usage;
