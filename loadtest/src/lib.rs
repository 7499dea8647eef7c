//! `relay-loadtest`: the fedrelay load-test harness. It drives relay nodes over the network
//! only (the HTTP edge of `docs/http-edge.md`) and links no relay internals.
//!
//! Where things live:
//!
//! - [`scenario`]: scenario kinds, users and peers, the open-loop arrival schedule, the tag
//!   carried in each message's text, duration parsing (pure);
//! - [`plan`]: the domains and secrets of a run, message bodies, domains of an existing
//!   deployment (`--config-file`, `--domain`);
//! - [`sign`]: HMAC-SHA256 request signing and webhook verification;
//! - [`system`]: the embedded system (redis-server, relay-node, generated config, free ports,
//!   readiness waits, kill on drop);
//! - [`driver`]: the open-loop sender (hyper 1 keep-alive client, in-flight cap);
//! - [`sse`]: the incremental Server-Sent Events parser (pure);
//! - [`receiver`]: SSE stream clients and the webhook sink;
//! - [`contract`]: the delivery-contract checker (loss, duplicates, order) (pure);
//! - [`live`]: the shared live state of a run (checker, histograms, time series);
//! - [`stats`]: HDR percentiles, per-second series, `/proc` CPU and machine info;
//! - [`report`]: `result.json`, SVG plots, the summary table, `compare`;
//! - [`runner`]: orchestration of a run and of `find-max`.

pub mod contract;
pub mod driver;
pub mod live;
pub mod plan;
pub mod receiver;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod sign;
pub mod sse;
pub mod stats;
pub mod system;
