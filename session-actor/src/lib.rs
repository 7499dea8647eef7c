//! fedrelay sessions.
//!
//! Every chat session (a 1:1 conversation or a channel) is one [`SessionActor`], started on
//! demand and supervised by the node's [`SessionSupervisor`]. Data flows one way:
//!
//! ```text
//! edge ─► SessionSupervisor::route ─► SessionActor
//!            dedup + epoch check + append (one atomic SessionStore call)
//!            ─► ack to the edge (only now may the origin platform be acknowledged)
//!            ─► per-recipient queues ─► Outbound::deliver (retries with backoff)
//!            ─► cursors + native-id map written back to the store
//! ```
//!
//! - [`ids`]: session ids (derived, 128-bit) and relay message ids.
//! - [`store`]: the [`SessionStore`] trait, its Redis and in-memory implementations, and the
//!   per-domain [`store::Outbox`] that pull-mode edges read from.
//! - [`ingress`]: the [`Ingress`] trait edges hand envelopes to.
//! - [`outbound`]: the [`Outbound`] trait edges implement to receive deliveries.
//! - [`metadata`]: the content-free metadata log entries a session reports.
//! - [`session`] and [`supervisor`]: the actors.
#![forbid(unsafe_code)]

pub mod error;
pub mod ids;
pub mod ingress;
pub mod metadata;
pub mod outbound;
pub mod session;
pub mod store;
pub mod supervisor;

pub use error::{SessionError, StoreError};
pub use ids::SessionId;
pub use ingress::Ingress;
pub use metadata::{MetadataEntry, MetadataSink};
pub use outbound::{DeliveryError, Outbound};
pub use session::{Accepted, SessionActor, SessionConfig, SessionDeps};
pub use store::SessionStore;
pub use supervisor::{Ownership, OwnsAll, SessionSupervisor, SupervisorHandle, SupervisorStats};
