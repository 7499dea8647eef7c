//! The gRPC services a node offers its peers.

use crate::Membership;
use crate::peer::ack_of;
use crate::presence::Presence;
use crate::router::Router;
use fedrelay_proto::Envelope;
use fedrelay_proto::v1::admin_service_server::AdminService;
use fedrelay_proto::v1::session_service_server::SessionService;
use fedrelay_proto::v1::{AckBatch, EnvelopeBatch, NodeStatus, StatusRequest};
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use session_actor::{Accepted, SessionError, SessionId, SupervisorHandle};
use std::pin::Pin;
use std::sync::Arc;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

/// Batches of one stream being worked on at once; the peer waits (HTTP/2 flow control) beyond.
const MAX_BATCHES_IN_FLIGHT: usize = 64;

/// Where a node hands the envelopes its peers send it: the [`Router`] (which gives each to
/// the local session, or forwards it once more when this node's view differs).
#[async_trait::async_trait]
pub trait HopIngress: Send + Sync + 'static {
    async fn submit_hop(&self, env: Envelope, hops: u32) -> Result<Accepted, SessionError>;
}

#[async_trait::async_trait]
impl HopIngress for Router {
    async fn submit_hop(&self, env: Envelope, hops: u32) -> Result<Accepted, SessionError> {
        Router::submit_hop(self, env, hops).await
    }
}

/// `SessionService`: envelopes from peers for sessions this node owns.
pub struct SessionSvc {
    pub router: Arc<dyn HopIngress>,
}

type AckStream = Pin<Box<dyn futures::Stream<Item = Result<AckBatch, Status>> + Send>>;

#[tonic::async_trait]
impl SessionService for SessionSvc {
    type DeliverStream = AckStream;

    async fn deliver(
        &self,
        req: Request<Streaming<EnvelopeBatch>>,
    ) -> Result<Response<Self::DeliverStream>, Status> {
        let inbound = req.into_inner();
        let router = self.router.clone();
        // The response stream itself drives the work: polled by the connection, it reads
        // batches (at most MAX_BATCHES_IN_FLIGHT ahead) and yields their acks in order.
        let acks = futures::stream::unfold(
            (inbound, FuturesOrdered::new(), true, router),
            |(mut inbound, mut work, mut open, router)| async move {
                loop {
                    tokio::select! {
                        batch = inbound.message(), if open && work.len() < MAX_BATCHES_IN_FLIGHT => {
                            match batch {
                                Ok(Some(b)) => work.push_back(handle_batch(router.clone(), b)),
                                Ok(None) | Err(_) => open = false,
                            }
                        }
                        Some(acks) = work.next(), if !work.is_empty() => {
                            return Some((Ok(acks), (inbound, work, open, router)));
                        }
                        else => return None,
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(acks)))
    }
}

async fn handle_batch(router: Arc<dyn HopIngress>, batch: EnvelopeBatch) -> AckBatch {
    let hops = batch.hops.saturating_add(1);
    let acks = futures::future::join_all(batch.envelopes.into_iter().map(|env| {
        let router = router.clone();
        let session = SessionId::from_bytes(&env.session_id)
            .map(|s| s.to_hex())
            .unwrap_or_default();
        let span = tracing::info_span!("cluster.receive", session_id = %session, hops);
        crate::trace::set_parent(&span, env.trace_context.as_ref());
        async move { ack_of(router.submit_hop(env, hops).await) }.instrument(span)
    }))
    .await;
    AckBatch { acks }
}

/// `AdminService`: this node's view, for `cluster status`.
pub struct AdminSvc {
    pub membership: Arc<dyn Membership>,
    pub supervisor: SupervisorHandle,
    pub presence: Arc<Presence>,
    pub grpc_addr: String,
}

impl AdminSvc {
    pub async fn status(&self) -> NodeStatus {
        let map = self.membership.shard_map();
        let stats = self.supervisor.stats().await.unwrap_or_default();
        NodeStatus {
            node_id: self.membership.node_id().to_string(),
            grpc_addr: self.grpc_addr.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            revision: map.revision(),
            ready: self.membership.is_member(),
            sessions_active: stats.active as u64,
            handoffs_in_flight: stats.handoffs_in_flight as u64,
            presence_active: self.presence.active().await as u64,
            members: map.members().iter().map(|m| m.node_id.clone()).collect(),
        }
    }
}

/// The gRPC face of [`AdminSvc`].
pub struct AdminGrpc(pub Arc<AdminSvc>);

#[tonic::async_trait]
impl AdminService for AdminGrpc {
    async fn status(&self, _req: Request<StatusRequest>) -> Result<Response<NodeStatus>, Status> {
        Ok(Response::new(self.0.status().await))
    }
}
