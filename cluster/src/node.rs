//! A node's cluster side, wired together: the router, the gRPC server for peers, and the
//! reaction to membership changes.

use crate::peer::Peers;
use crate::presence::{Presence, PresenceSvc};
use crate::router::{Router, owns};
use crate::service::{AdminGrpc, AdminSvc, SessionSvc};
use crate::{Membership, PeerConfig};
use fedrelay_proto::v1::admin_service_client::AdminServiceClient;
use fedrelay_proto::v1::admin_service_server::AdminServiceServer;
use fedrelay_proto::v1::presence_service_server::PresenceServiceServer;
use fedrelay_proto::v1::session_service_server::SessionServiceServer;
use fedrelay_proto::v1::{NodeStatus, StatusRequest};
use session_actor::{SessionStore, SupervisorHandle};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::ServerTlsConfig;
use tracing::{debug, info, warn};

#[derive(Debug, Error)]
pub enum ClusterError {
    #[error("gRPC server: {0}")]
    Server(String),
}

#[derive(Debug, Clone)]
pub struct ClusterNodeConfig {
    pub peers: PeerConfig,
    /// The address peers use to reach this node (what it registers).
    pub grpc_addr: String,
    /// mTLS for the gRPC server, when configured.
    pub server_tls: Option<ServerTlsConfig>,
    /// How often the index of sessions owing deliveries is scanned besides on every
    /// membership change (a safety net; zero: only on changes).
    pub resume_scan: Duration,
}

/// The cluster side of a node.
pub struct ClusterNode {
    pub membership: Arc<dyn Membership>,
    pub router: Arc<Router>,
    pub presence: Arc<Presence>,
    admin: Arc<AdminSvc>,
    tls: Option<tonic::transport::ClientTlsConfig>,
}

impl ClusterNode {
    /// Starts following membership changes and, when `listener` is given, serves peers on it
    /// until `shutdown` turns true.
    pub async fn start(
        membership: Arc<dyn Membership>,
        supervisor: SupervisorHandle,
        store: Arc<dyn SessionStore>,
        presence: Arc<Presence>,
        cfg: ClusterNodeConfig,
        listener: Option<TcpListener>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Arc<Self>, ClusterError> {
        let tls = cfg.peers.tls.clone();
        let peers = Arc::new(Peers::new(cfg.peers.clone()));
        let router = Arc::new(Router::new(
            membership.clone(),
            supervisor.clone(),
            peers.clone(),
            presence.clone(),
        ));
        let admin = Arc::new(AdminSvc {
            membership: membership.clone(),
            supervisor: supervisor.clone(),
            presence: presence.clone(),
            grpc_addr: cfg.grpc_addr.clone(),
        });
        if let Some(listener) = listener {
            let mut builder = tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .http2_keepalive_interval(Some(Duration::from_secs(1)))
                .http2_keepalive_timeout(Some(Duration::from_secs(2)))
                .initial_stream_window_size(Some(4 << 20))
                .initial_connection_window_size(Some(8 << 20));
            if let Some(tls) = cfg.server_tls.clone() {
                builder = builder
                    .tls_config(tls)
                    .map_err(|e| ClusterError::Server(e.to_string()))?;
            }
            let router_svc = builder
                .add_service(
                    SessionServiceServer::new(SessionSvc {
                        router: router.clone(),
                    })
                    .max_decoding_message_size(64 << 20),
                )
                .add_service(PresenceServiceServer::new(PresenceSvc(presence.clone())))
                .add_service(AdminServiceServer::new(AdminGrpc(admin.clone())));
            let mut stop = shutdown.clone();
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            tokio::spawn(async move {
                let r = router_svc
                    .serve_with_incoming_shutdown(incoming, async move {
                        let _ = stop.wait_for(|s| *s).await;
                    })
                    .await;
                if let Err(e) = r {
                    warn!(error = %e, "gRPC server stopped");
                }
            });
        }
        tokio::spawn(follow_changes(
            membership.clone(),
            supervisor,
            store,
            peers,
            cfg.resume_scan,
            shutdown,
        ));
        Ok(Arc::new(Self {
            membership,
            router,
            presence,
            admin,
            tls,
        }))
    }

    /// This node's view.
    pub async fn status(&self) -> NodeStatus {
        self.admin.status().await
    }

    /// Every member's own view, asked over gRPC (a member that does not answer is listed
    /// with `ready = false` and its id only).
    pub async fn cluster_status(&self) -> Vec<NodeStatus> {
        let map = self.membership.shard_map();
        let asks = map.members().iter().map(|m| {
            let tls = self.tls.clone();
            async move {
                if m.node_id == self.membership.node_id() {
                    return self.status().await;
                }
                let ask = async {
                    let ch =
                        crate::peer::endpoint(&m.grpc_addr, tls.as_ref(), Duration::from_secs(1))
                            .map_err(|e| e.to_string())?
                            .connect()
                            .await
                            .map_err(|e| e.to_string())?;
                    AdminServiceClient::new(ch)
                        .status(StatusRequest {})
                        .await
                        .map(|r| r.into_inner())
                        .map_err(|e| e.to_string())
                };
                match tokio::time::timeout(Duration::from_secs(2), ask).await {
                    Ok(Ok(s)) => s,
                    _ => NodeStatus {
                        node_id: m.node_id.clone(),
                        grpc_addr: m.grpc_addr.clone(),
                        version: m.version.clone(),
                        ready: false,
                        ..Default::default()
                    },
                }
            }
        });
        futures::future::join_all(asks).await
    }
}

/// On every shard map change: drop links to departed peers, hand off the sessions that moved
/// away, and start the sessions that moved here and owe deliveries.
async fn follow_changes(
    membership: Arc<dyn Membership>,
    supervisor: SupervisorHandle,
    store: Arc<dyn SessionStore>,
    peers: Arc<Peers>,
    resume_scan: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut changes = membership.subscribe();
    let mut scan = tokio::time::interval(if resume_scan.is_zero() {
        Duration::from_secs(3600)
    } else {
        resume_scan
    });
    scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            c = changes.changed() => {
                if c.is_err() {
                    return;
                }
                let map = changes.borrow_and_update().clone();
                info!(revision = map.revision(), members = map.members().len(), "rebalancing sessions");
                peers.retain(map.members());
                supervisor.rebalance();
            }
            _ = scan.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        // Sessions that owe deliveries and are ours now.
        match store.active_sessions().await {
            Ok(ids) => {
                let map = membership.shard_map();
                let me = membership.node_id().to_string();
                let mine: Vec<_> = ids.into_iter().filter(|id| owns(&map, &me, id)).collect();
                debug!(sessions = mine.len(), "resuming owned sessions");
                if !mine.is_empty() {
                    supervisor.ensure(mine);
                }
            }
            Err(e) => warn!(error = %e, "could not list sessions to resume"),
        }
    }
}
