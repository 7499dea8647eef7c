//! The admin listener: liveness, readiness, Prometheus metrics and the cluster view.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use cluster::ClusterNode;
use metrics_exporter_prometheus::PrometheusHandle;
use session_actor::SessionStore;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

pub struct AdminState {
    pub store: Arc<dyn SessionStore>,
    pub metrics: PrometheusHandle,
    /// True from SIGTERM on: the node is leaving, so it is not ready.
    pub draining: AtomicBool,
    pub cluster: Arc<ClusterNode>,
}

pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/cluster", get(cluster_view))
        .with_state(state)
}

async fn readyz(State(s): State<Arc<AdminState>>) -> impl IntoResponse {
    if s.draining.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining");
    }
    if !s.cluster.membership.is_member() {
        return (StatusCode::SERVICE_UNAVAILABLE, "not a cluster member");
    }
    match s.store.ping().await {
        Ok(()) => (StatusCode::OK, "ready"),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "store unavailable"),
    }
}

/// `GET /cluster`: this node's view (members, revision) and every member's own counts.
async fn cluster_view(State(s): State<Arc<AdminState>>) -> impl IntoResponse {
    axum::Json(cluster_json(&s.cluster, s.draining.load(Ordering::Relaxed)).await)
}

/// The cluster as this node sees it, with every member's own counts.
pub async fn cluster_json(cluster: &ClusterNode, draining: bool) -> serde_json::Value {
    let me = cluster.status().await;
    let nodes = cluster.cluster_status().await;
    let node_json = |n: &fedrelay_proto::v1::NodeStatus| {
        serde_json::json!({
            "node_id": n.node_id,
            "grpc_addr": n.grpc_addr,
            "version": n.version,
            "ready": n.ready,
            "revision": n.revision,
            "sessions_active": n.sessions_active,
            "handoffs_in_flight": n.handoffs_in_flight,
            "presence_active": n.presence_active,
        })
    };
    serde_json::json!({
        "node_id": me.node_id,
        "revision": me.revision,
        "ready": me.ready && !draining,
        "handoffs_in_flight": me.handoffs_in_flight,
        "members": nodes.iter().map(node_json).collect::<Vec<_>>(),
    })
}

async fn metrics(State(s): State<Arc<AdminState>>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        s.metrics.render(),
    )
}

/// Installs the Prometheus recorder and describes the node's metrics.
pub fn install_metrics() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("fedrelay_append_seconds".into()),
            &[
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ],
        )?
        .install_recorder()?;
    metrics::describe_counter!(
        "fedrelay_messages_in_total",
        "events accepted from an edge, by edge and kind"
    );
    metrics::describe_counter!(
        "fedrelay_messages_out_total",
        "events delivered to an edge, by edge and kind"
    );
    metrics::describe_histogram!(
        "fedrelay_append_seconds",
        metrics::Unit::Seconds,
        "journal append latency (dedup + epoch check + append)"
    );
    metrics::describe_gauge!(
        "fedrelay_sessions_active",
        "session actors running on this node"
    );
    metrics::describe_counter!(
        "fedrelay_sessions_hibernated_total",
        "sessions stopped for idleness"
    );
    metrics::describe_counter!(
        "fedrelay_session_restarts_total",
        "session actors restarted after a crash"
    );
    metrics::describe_counter!(
        "fedrelay_delivery_retries_total",
        "delivery attempts retried"
    );
    metrics::describe_counter!(
        "fedrelay_deliveries_total",
        "deliveries by outcome (delivered, failed)"
    );
    metrics::describe_counter!(
        "fedrelay_http_rejected_total",
        "HTTP-edge requests refused, by reason"
    );
    metrics::describe_counter!(
        "fedrelay_policy_refusals_total",
        "messages refused by federation policy"
    );
    metrics::describe_counter!(
        "fedrelay_inbound_duplicates_total",
        "inbound events already journaled"
    );
    metrics::describe_counter!(
        "fedrelay_metadata_entries_total",
        "metadata log entries, by category"
    );
    metrics::describe_gauge!("fedrelay_http_streams_open", "open HTTP-edge event streams");
    metrics::describe_counter!(
        "fedrelay_forwarded_total",
        "envelopes forwarded to their session's owner on another node"
    );
    metrics::describe_counter!(
        "fedrelay_peer_refused_total",
        "forwards refused with a retryable error, by reason (unreachable, queue_full, timeout)"
    );
    metrics::describe_counter!(
        "fedrelay_session_handoffs_total",
        "sessions handed to another owner after a membership change"
    );
    metrics::describe_gauge!(
        "fedrelay_cluster_members",
        "members in this node's shard map"
    );
    metrics::describe_gauge!(
        "fedrelay_cluster_revision",
        "etcd revision of this node's shard map"
    );
    metrics::describe_counter!(
        "fedrelay_backpressure_total",
        "messages refused because a recipient had too many undelivered"
    );
    metrics::describe_gauge!(
        "fedrelay_policy_version",
        "the federation policy version this node enforces (etcd mod revision)"
    );
    metrics::describe_counter!(
        "fedrelay_policy_applied_total",
        "policy versions compiled and applied on this node"
    );
    metrics::describe_counter!(
        "fedrelay_policy_rejected_total",
        "stored policy versions that failed validation and were not applied"
    );
    metrics::describe_counter!(
        "fedrelay_policy_watch_errors_total",
        "losses of the policy watch on etcd (the last good policy stays in force)"
    );
    metrics::describe_counter!(
        "fedrelay_approvals_held_total",
        "contact requests held for an administrator's approval"
    );
    metrics::describe_counter!(
        "fedrelay_api_errors_total",
        "management API requests answered with an error, by code"
    );
    metrics::describe_counter!(
        "fedrelay_api_jwks_fetches_total",
        "fetches of the OpenID Connect provider's signing keys, by result"
    );
    metrics::describe_counter!(
        "fedrelay_usage_flushes_total",
        "usage counter batches written to the store"
    );
    metrics::describe_counter!(
        "fedrelay_usage_flush_errors_total",
        "usage counter writes that failed (kept and retried)"
    );
    metrics::describe_counter!(
        "fedrelay_usage_users_dropped_total",
        "users not counted as unique because the node's pending set was full"
    );
    metrics::describe_counter!(
        "fedrelay_metadata_days_archived_total",
        "days of the metadata log moved from Redis into the archive"
    );
    metrics::describe_counter!(
        "fedrelay_metadata_archive_errors_total",
        "failed rotation or retention runs of the metadata log"
    );
    Ok(handle)
}
