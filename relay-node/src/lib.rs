//! The fedrelay node: configuration, the protocol edges, the control plane, telemetry, and
//! the assembly of one node from the `session-actor` and `cluster` crates.
//!
//! An event arrives at an edge (`edges/<name>`), is checked against the federation policy
//! (`control::policy`), becomes an envelope and goes through the cluster router to its session,
//! which journals it and delivers it back out through the recipient's edge. `node` wires it
//! all; `main.rs` is the CLI.
#![forbid(unsafe_code)]

pub mod admin;
pub mod batch;
pub mod config;
pub mod control;
pub mod edges;
pub mod jwt;
pub mod node;
pub mod serve;
pub mod teams_manifest;
pub mod telemetry;
