//! Assembling and running one relay node.
//!
//! store + outbox + metadata log → session supervisor (delivering through the edges) →
//! router (the edges' ingress) → HTTP edge and admin listeners. On shutdown: not ready, stop
//! accepting, finish in-flight requests, let sessions finish their deliveries (bounded by the
//! drain deadline), flush the metadata log, exit.

use crate::admin::{self, AdminState};
use crate::config::{Config, StoreBackend};
use crate::control::metadata::MetadataLog;
use crate::control::policy::Policy;
use crate::edges::{Edges, http};
use crate::serve;
use anyhow::Context;
use cluster::{Router, StaticMembership};
use metrics_exporter_prometheus::PrometheusHandle;
use session_actor::store::{
    MemoryOutbox, MemoryStore, Outbox, RedisOutbox, RedisStore, RedisStoreConfig,
};
use session_actor::{MetadataSink, SessionDeps, SessionStore, SupervisorHandle};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

/// Runs a node until `shutdown` resolves, then drains and returns.
pub async fn run(
    cfg: Config,
    metrics: PrometheusHandle,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let node_id = cfg.node_id();
    let (store, outbox, metadata, metadata_task): (
        Arc<dyn SessionStore>,
        Arc<dyn Outbox>,
        MetadataLog,
        _,
    ) = match cfg.store.backend {
        StoreBackend::Memory => {
            let (log, task) = MetadataLog::memory(cfg.metadata.memory_capacity);
            (
                Arc::new(MemoryStore::new()),
                Arc::new(MemoryOutbox::new(cfg.http.stream_retention)),
                log,
                task,
            )
        }
        StoreBackend::Redis => {
            let mut rcfg = RedisStoreConfig::new(cfg.store.redis_url.clone());
            rcfg.key_prefix = cfg.store.key_prefix.clone();
            rcfg.response_timeout = Duration::from_millis(cfg.store.response_timeout_ms);
            let store = RedisStore::new(&rcfg).context("redis store")?;
            let (log, task) = MetadataLog::redis(
                store.connection(),
                &cfg.store.key_prefix,
                cfg.metadata.retention_days,
            );
            let outbox =
                RedisOutbox::new(&rcfg, cfg.http.stream_retention).context("redis outbox")?;
            (Arc::new(store), Arc::new(outbox), log, task)
        }
    };
    let metadata_sink: Arc<dyn MetadataSink> = Arc::new(metadata.clone());

    let domains = Arc::new(http::Domains::from_config(&cfg)?);
    let http_out = Arc::new(
        http::HttpOutbound::new(&domains, outbox.clone(), &cfg.http).context("webhook client")?,
    );
    let deps = SessionDeps {
        store: store.clone(),
        outbound: Arc::new(Edges { http: http_out }),
        metadata: metadata_sink.clone(),
        config: Arc::new(cfg.session.to_session_config()),
    };
    let (supervisor, supervisor_task) = SupervisorHandle::start(deps).await?;
    let router = Arc::new(Router::new(
        node_id.clone(),
        Arc::new(StaticMembership::single(&node_id)),
        supervisor.clone(),
    ));

    let (stop_tx, stop_rx) = watch::channel(false);
    let inbound = Arc::new(http::Inbound {
        domains,
        policy: Arc::new(Policy::from_config(&cfg)),
        ingress: router,
        outbox,
        metadata: metadata_sink,
        cfg: cfg.http.clone(),
        shutdown: stop_rx.clone(),
    });
    let tls = match (&cfg.http.tls_cert, &cfg.http.tls_key) {
        (Some(c), Some(k)) => Some(serve::load_tls(c, k)?),
        _ => None,
    };
    let admin_state = Arc::new(AdminState {
        store,
        metrics,
        draining: Default::default(),
    });

    let http_listener = TcpListener::bind(cfg.http.listen)
        .await
        .with_context(|| format!("binding the http edge to {}", cfg.http.listen))?;
    let admin_listener = TcpListener::bind(cfg.admin.listen)
        .await
        .with_context(|| format!("binding the admin listener to {}", cfg.admin.listen))?;
    let (http_addr, admin_addr) = (http_listener.local_addr()?, admin_listener.local_addr()?);
    let http_server = tokio::spawn(serve::serve(
        http_listener,
        tls.clone(),
        http::router(inbound),
        stop_rx.clone(),
    ));
    let (admin_stop_tx, admin_stop_rx) = watch::channel(false);
    let admin_server = tokio::spawn(serve::serve(
        admin_listener,
        None,
        admin::router(admin_state.clone()),
        admin_stop_rx,
    ));
    info!(
        node_id = %node_id,
        http = %http_addr,
        tls = tls.is_some(),
        admin = %admin_addr,
        store = ?cfg.store.backend,
        "relay node running"
    );

    shutdown.await;
    let deadline = Instant::now() + Duration::from_secs(cfg.shutdown.drain_timeout_secs);
    info!("shutting down: draining");
    admin_state.draining.store(true, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    // In-flight requests finish their appends; no new ones are accepted.
    match tokio::time::timeout_at(deadline.into(), http_server).await {
        Ok(_) => {}
        Err(_) => warn!("in-flight requests did not finish before the drain deadline"),
    }
    // Sessions finish what they owe, within the deadline; the rest waits in the store.
    loop {
        match supervisor.drain().await {
            Ok(0) => break,
            Ok(owed) if Instant::now() >= deadline => {
                warn!(
                    owed,
                    "drain deadline reached; undelivered messages stay journaled"
                );
                break;
            }
            Err(e) => {
                warn!(error = %e, "drain failed");
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    supervisor.stop();
    let _ = supervisor_task.await;
    let flush_left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_secs(1));
    if tokio::time::timeout(flush_left, metadata.flush())
        .await
        .is_err()
    {
        warn!("metadata log not flushed before the deadline");
    }
    drop(metadata);
    metadata_task.abort();
    let _ = admin_stop_tx.send(true);
    let _ = admin_server.await;
    info!("stopped");
    Ok(())
}
