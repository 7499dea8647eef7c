//! `relay-loadtest`: the fedrelay load-test harness. It drives relay nodes over the network
//! only (the HTTP edge of `docs/http-edge.md`, the session service's gRPC stream as an edge
//! uses it, or the XMPP edge's server-to-server streams) and links no relay internals, only
//! the wire model.
//!
//! Where things live:
//!
//! - [`scenario`]: scenario kinds, protocols, users and who sends what to whom, the open-loop
//!   arrival schedule, the tag carried in each event, duration parsing (pure);
//! - [`plan`]: the domains and secrets of a run, event bodies and envelopes, presence set-up,
//!   domains of an existing deployment (`--config-file`, `--domain`);
//! - [`sign`]: HMAC-SHA256 request signing and webhook verification;
//! - [`system`]: the embedded system (redis-server, etcd, relay-nodes, generated configs, free
//!   ports, readiness waits, killing and adding nodes, kill on drop);
//! - [`driver`]: the open-loop sender (HTTP keep-alive client or gRPC `Deliver` streams,
//!   in-flight cap, fail-over retries);
//! - [`sse`]: the incremental Server-Sent Events parser (pure);
//! - [`receiver`]: SSE stream clients and the webhook sink;
//! - [`contract`]: the delivery-contract checker (loss, duplicates, order; one recipient or
//!   many) (pure);
//! - [`live`]: the shared live state of a run (checker, histograms, time series);
//! - [`stats`]: HDR percentiles, per-second series, `/proc` CPU and machine info;
//! - [`report`]: `result.json`, SVG plots, the summary table, `compare`;
//! - [`tls`]: rustls for HTTPS targets and TLS/mTLS to the cluster's gRPC listeners;
//! - [`xmpp`]: `--protocol xmpp`: server-to-server streams from a remote XMPP domain into the
//!   relay's XMPP edge (STARTTLS, SASL EXTERNAL, XEP-0198 acks) and that domain's listener
//!   for the relay's refusals;
//! - [`runner`]: orchestration of a run (set-up, faults, sampling) and of `find-max`.

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
pub mod tls;
pub mod xmpp;
