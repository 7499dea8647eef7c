//! Assembling and running one relay node.
//!
//! store + outbox + metadata log → membership (static, or etcd) → session supervisor
//! (hosting the sessions this node owns, delivering through the edges) → cluster node
//! (router = the edges' ingress, gRPC for peers, presence) → HTTP edge and admin listeners.
//!
//! On shutdown: not ready; in a cluster, leave etcd first, so the other nodes take the
//! sessions over at once while this node hands them off after their in-flight appends;
//! stop accepting, finish in-flight requests; on a single node, let sessions finish their
//! deliveries instead. All of it bounded by the drain deadline; then flush the metadata log
//! and exit.

use crate::admin::{self, AdminState};
use crate::config::{ClusterConfig, Config, MembershipKind, StoreBackend, StoreConfig};
use crate::control::api::{self, ApiState};
use crate::control::approvals::ApprovalBook;
use crate::control::logstore::{Archive, LogReader};
use crate::control::metadata::MetadataLog;
use crate::control::metering::{Metering, PolicySides};
use crate::control::policy::store::{
    AuditEntry, EtcdPolicyStore, MemoryPolicyStore, PolicyStore, StoreError as PolicyStoreError,
};
use crate::control::policy::{Policy, PolicyGate, model::PolicyDoc};
use crate::control::portal::{self, PortalState, session::Sessions};
use crate::control::usage::{DEFAULT_FLUSH_INTERVAL, UsageAggregator, UsageConfig, UsageStore};
use crate::edges::sip::SipEdge;
use crate::edges::teams::state::{MemoryKv, RedisKv, TeamsState};
use crate::edges::teams::{self, TeamsEdge};
use crate::edges::xmpp::{self, XmppEdge};
use crate::edges::{Edges, http};
use crate::jwt::{JwtConfig, JwtVerifier, KeySource};
use crate::serve;
use anyhow::Context;
use cluster::presence::{MemoryPresenceStore, Presence, PresenceStore, RedisPresenceStore};
use cluster::{
    ClusterNode, ClusterNodeConfig, EtcdConfig, EtcdMembership, MapOwnership, Member, Membership,
    PeerConfig, StaticMembership,
};
use metrics_exporter_prometheus::PrometheusHandle;
use session_actor::store::{
    MemoryOutbox, MemoryStore, Outbox, RedisOutbox, RedisStore, RedisStoreConfig, RedisTls,
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
    let Stores {
        store,
        outbox,
        metadata,
        metadata_task,
        presence: presence_store,
        teams_kv,
        xmpp_kv,
        sip_kv,
        approvals_kv,
        portal_kv,
        usage: usage_store,
        redis: redis_conn,
    } = open_stores(&cfg)?;
    let (policy, policy_store) = open_policy(&cfg).await?;
    let policy_task = policy_store.clone().follow(policy.clone());
    let usage_agg = UsageAggregator::new(
        Arc::new(PolicySides(policy.clone())),
        UsageConfig::default(),
    );
    let (metering, usage_feed) = Metering::new(metadata.clone(), usage_agg.clone());
    let metadata_sink: Arc<dyn MetadataSink> = Arc::new(metering);
    let log_reader = match &redis_conn {
        Some(conn) => LogReader::Redis {
            conn: conn.clone(),
            prefix: cfg.store.key_prefix.clone(),
            archive: match &cfg.metadata.archive_url {
                Some(u) => Some(Archive::open(u).context("the metadata archive")?),
                None => None,
            },
            window_days: cfg.metadata.redis_window_days,
            retention_days: cfg.metadata.retention_days,
        },
        None => LogReader::Memory(metadata.memory_log().unwrap_or_default()),
    };
    let (maintenance_stop_tx, maintenance_stop_rx) = watch::channel(false);
    let usage_warmer = warm_usage(
        usage_store.clone(),
        Duration::from_secs(cfg.metadata.maintenance_interval_secs),
        maintenance_stop_rx.clone(),
    );
    let maintenance = log_reader.clone().spawn_maintenance(
        Duration::from_secs(cfg.metadata.maintenance_interval_secs),
        maintenance_stop_rx,
    );
    let (usage_stop_tx, usage_stop_rx) = watch::channel(false);
    let usage_flusher =
        usage_agg.spawn_flusher(usage_store.clone(), DEFAULT_FLUSH_INTERVAL, usage_stop_rx);

    let domains = Arc::new(http::Domains::from_config(&cfg)?);
    let http_out = Arc::new(
        http::HttpOutbound::new(&domains, outbox.clone(), &cfg.http).context("webhook client")?,
    );
    let approvals = Arc::new(ApprovalBook::new(
        approvals_kv,
        &cfg.store.key_prefix,
        policy.clone(),
    ));
    let teams = TeamsEdge::from_config(
        &cfg,
        TeamsState::new(teams_kv, &cfg.store.key_prefix),
        policy.clone(),
        metadata_sink.clone(),
    )?;
    let xmpp = XmppEdge::from_config(&cfg, xmpp_kv, policy.clone(), metadata_sink.clone())?;
    let sip = SipEdge::from_config(&cfg, sip_kv, policy.clone(), metadata_sink.clone())?;
    let edges: Arc<Edges> = Arc::new(Edges {
        http: http_out,
        teams: teams.clone(),
        xmpp: xmpp.clone(),
        sip: sip.clone(),
    });
    let deps = SessionDeps {
        store: store.clone(),
        outbound: edges.clone(),
        metadata: metadata_sink.clone(),
        config: Arc::new(cfg.session.to_session_config()),
    };

    // Peers may dial this node as soon as it is registered: listen first.
    let grpc_listener = match cfg.cluster.grpc_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the cluster gRPC listener to {addr}"))?,
        ),
        None => None,
    };
    let grpc_addr = match (&cfg.cluster.grpc_advertise, &grpc_listener) {
        (Some(a), _) => a.clone(),
        (None, Some(l)) => l.local_addr()?.to_string(),
        (None, None) => String::new(),
    };
    let (client_tls, server_tls) = cluster_tls(&cfg.cluster)?;
    let membership: Arc<dyn Membership> = match cfg.cluster.membership {
        MembershipKind::Static => Arc::new(StaticMembership::new(
            &node_id,
            vec![Member::new(&node_id, &grpc_addr)],
        )),
        MembershipKind::Etcd => EtcdMembership::start(EtcdConfig {
            endpoints: cfg.cluster.etcd_endpoints.clone(),
            prefix: format!("/fedrelay/{}/", cfg.cluster.name),
            lease_ttl: Duration::from_secs(cfg.cluster.lease_ttl_secs),
            me: Member::new(&node_id, &grpc_addr),
            tls: etcd_tls(&cfg.cluster)?,
        })
        .await
        .context("joining the cluster in etcd")?,
    };
    let (supervisor, supervisor_task) =
        SupervisorHandle::start_owning(deps, Arc::new(MapOwnership(membership.clone()))).await?;
    let presence = Presence::new(
        membership.clone(),
        presence_store,
        edges.clone(),
        client_tls.clone(),
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let (grpc_stop_tx, grpc_stop_rx) = watch::channel(false);
    let cluster = ClusterNode::start(
        membership.clone(),
        supervisor.clone(),
        store.clone(),
        presence,
        ClusterNodeConfig {
            peers: PeerConfig {
                max_batch: cfg.cluster.max_batch,
                flush_delay: Duration::from_micros(cfg.cluster.flush_delay_us),
                queue: cfg.cluster.peer_queue,
                max_in_flight: cfg.cluster.peer_queue,
                forward_timeout: Duration::from_millis(cfg.cluster.forward_timeout_ms),
                connect_timeout: Duration::from_secs(1),
                tls: client_tls,
            },
            grpc_addr: grpc_addr.clone(),
            server_tls,
            resume_scan: Duration::from_secs(cfg.cluster.resume_scan_secs),
        },
        grpc_listener,
        grpc_stop_rx,
    )
    .await?;
    // Every envelope an edge submits passes the policy first.
    let router: Arc<dyn session_actor::Ingress> = Arc::new(PolicyGate::new(
        cluster.router.clone(),
        policy.clone(),
        metadata_sink.clone(),
        Some(approvals.clone()),
    ));
    approvals.set_ingress(cluster.router.clone());
    if let Some(t) = &teams {
        t.set_ingress(router.clone());
    }
    if let Some(x) = &xmpp {
        x.set_ingress(router.clone());
    }
    if let Some(x) = &sip {
        x.set_ingress(router.clone());
    }

    let inbound = Arc::new(http::Inbound {
        domains,
        policy: policy.clone(),
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
        cluster: cluster.clone(),
    });

    let http_listener = TcpListener::bind(cfg.http.listen)
        .await
        .with_context(|| format!("binding the http edge to {}", cfg.http.listen))?;
    let admin_listener = TcpListener::bind(cfg.admin.listen)
        .await
        .with_context(|| format!("binding the admin listener to {}", cfg.admin.listen))?;
    let (http_addr, admin_addr) = (http_listener.local_addr()?, admin_listener.local_addr()?);
    let api_listener = match cfg.api.listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the management API to {addr}"))?,
        ),
        None => None,
    };
    let xmpp_server = match (&xmpp, &cfg.xmpp) {
        (Some(x), Some(xc)) => {
            let l = TcpListener::bind(xc.listen)
                .await
                .with_context(|| format!("binding the xmpp edge to {}", xc.listen))?;
            info!(xmpp = %l.local_addr()?, "xmpp s2s listening");
            Some(tokio::spawn(xmpp::inbound::serve(
                x.clone(),
                l,
                stop_rx.clone(),
            )))
        }
        _ => None,
    };
    let sip_tasks = match &sip {
        Some(x) => {
            let l = x.bind().await.context("binding the sip edge")?;
            for (t, a) in x.local_addrs() {
                info!(transport = t.via_name(), sip = %a, "sip listening");
            }
            x.serve(l, stop_rx.clone())
        }
        None => Vec::new(),
    };
    let http_server = tokio::spawn(serve::serve(
        http_listener,
        tls.clone(),
        match &teams {
            Some(t) => http::router(inbound).merge(teams::router(t.clone())),
            None => http::router(inbound),
        },
        stop_rx.clone(),
    ));
    let (admin_stop_tx, admin_stop_rx) = watch::channel(false);
    let admin_server = tokio::spawn(serve::serve(
        admin_listener,
        None,
        admin::router(admin_state.clone()),
        admin_stop_rx.clone(),
    ));
    let api_server = match api_listener {
        Some(l) => {
            let tls = match (&cfg.api.tls_cert, &cfg.api.tls_key) {
                (Some(c), Some(k)) => Some(serve::load_tls(c, k)?),
                _ => None,
            };
            info!(api = %l.local_addr()?, tls = tls.is_some(), "management API listening");
            let cluster_node = cluster.clone();
            let state = Arc::new(ApiState {
                policy: policy.clone(),
                store: policy_store.clone(),
                approvals: approvals.clone(),
                teams: teams.clone(),
                forget_log: Some({
                    let reader = log_reader.clone();
                    let log = metadata.clone();
                    Arc::new(move |address: String| {
                        let (reader, log) = (reader.clone(), log.clone());
                        Box::pin(async move {
                            // Entries still on their way to the store are rewritten too.
                            log.flush().await;
                            let pseudonym = format!(
                                "forgotten-{}@{}",
                                &uuid::Uuid::new_v4().simple().to_string()[..12],
                                address.rsplit_once('@').map_or("", |(_, d)| d)
                            );
                            reader
                                .pseudonymise(&address, &pseudonym)
                                .await
                                .map_err(|e| e.to_string())
                        })
                            as futures::future::BoxFuture<'static, Result<u64, String>>
                    })
                }),
                usage: usage_store.clone(),
                log: log_reader.clone(),
                auth: api_authenticator(&cfg, policy_store.clone())?,
                cluster: Arc::new(move || {
                    let c = cluster_node.clone();
                    Box::pin(async move { admin::cluster_json(&c, false).await })
                }),
            });
            let api_router = api::router(state, axum::Router::new());
            let portal = Arc::new(PortalState {
                api: api_router.clone(),
                sessions: Sessions::new(portal_kv, &cfg.store.key_prefix),
                login: portal_login(&cfg)?,
                secure: tls.is_some() || cfg.api.allow_plaintext,
                token_session_secs: PORTAL_TOKEN_SESSION_SECS,
            });
            Some(tokio::spawn(serve::serve(
                l,
                tls,
                api_router.merge(portal::router(portal)),
                admin_stop_rx,
            )))
        }
        None => None,
    };
    info!(
        node_id = %node_id,
        http = %http_addr,
        tls = tls.is_some(),
        teams = teams.is_some(),
        admin = %admin_addr,
        grpc = %grpc_addr,
        membership = ?cfg.cluster.membership,
        store = ?cfg.store.backend,
        "relay node running"
    );

    shutdown.await;
    let deadline = Instant::now() + Duration::from_secs(cfg.shutdown.drain_timeout_secs);
    info!("shutting down: draining");
    admin_state.draining.store(true, Ordering::Relaxed);
    let clustered = cfg.cluster.membership != MembershipKind::Static;
    if clustered {
        // Deregister first: the others take this node's sessions over now, not after the
        // lease TTL, and this node hands them off once their in-flight appends are done.
        if let Err(e) = membership.leave().await {
            warn!(error = %e, "could not deregister; peers notice when the lease expires");
        }
    }
    let _ = stop_tx.send(true);
    // In-flight requests finish their appends; no new ones are accepted.
    match tokio::time::timeout_at(deadline.into(), http_server).await {
        Ok(_) => {}
        Err(_) => warn!("in-flight requests did not finish before the drain deadline"),
    }
    // XMPP peers get what they sent acknowledged, then the streams close.
    if let Some(x) = xmpp_server
        && tokio::time::timeout_at(deadline.into(), x).await.is_err()
    {
        warn!("xmpp streams did not close before the drain deadline");
    }
    for t in sip_tasks {
        let _ = tokio::time::timeout_at(deadline.into(), t).await;
    }
    if clustered {
        // Envelopes peers still send here are forwarded to the new owners meanwhile.
        loop {
            match supervisor.stats().await {
                Ok(s) if s.active == 0 => break,
                Ok(s) if Instant::now() >= deadline => {
                    warn!(
                        sessions = s.active,
                        "drain deadline reached before every session was handed off"
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
    } else {
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
    }
    let _ = grpc_stop_tx.send(true);
    if let Some(x) = &xmpp {
        x.pool.close_all().await;
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
    policy_task.abort();
    // Usage: everything recorded is added, then flushed once more.
    usage_feed.settle().await;
    let _ = usage_stop_tx.send(true);
    if tokio::time::timeout(Duration::from_secs(5), usage_flusher)
        .await
        .is_err()
    {
        warn!("usage counters not flushed before the deadline");
    }
    usage_feed.abort();
    let _ = maintenance_stop_tx.send(true);
    maintenance.abort();
    usage_warmer.abort();
    let _ = admin_stop_tx.send(true);
    let _ = admin_server.await;
    if let Some(a) = api_server {
        let _ = a.await;
    }
    info!("stopped");
    Ok(())
}

/// The gRPC client and server TLS settings for mTLS between nodes, when configured.
fn cluster_tls(
    c: &ClusterConfig,
) -> anyhow::Result<(
    Option<tonic::transport::ClientTlsConfig>,
    Option<tonic::transport::ServerTlsConfig>,
)> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
    let (Some(cert), Some(key), Some(ca)) = (&c.tls_cert, &c.tls_key, &c.tls_ca) else {
        return Ok((None, None));
    };
    let read =
        |p: &std::path::Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let identity = Identity::from_pem(read(cert)?, read(key)?);
    let ca = Certificate::from_pem(read(ca)?);
    let mut client = ClientTlsConfig::new()
        .ca_certificate(ca.clone())
        .identity(identity.clone());
    if let Some(name) = &c.tls_server_name {
        client = client.domain_name(name.clone());
    }
    let server = ServerTlsConfig::new().identity(identity).client_ca_root(ca);
    Ok((Some(client), Some(server)))
}

fn read_pem(p: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(p).with_context(|| format!("reading {}", p.display()))
}

/// TLS to Redis (`rediss://`): the CA to trust and a client certificate, from the config.
fn redis_tls(s: &StoreConfig) -> anyhow::Result<RedisTls> {
    Ok(RedisTls {
        ca: s.tls_ca.as_deref().map(read_pem).transpose()?,
        client: match (&s.tls_cert, &s.tls_key) {
            (Some(c), Some(k)) => Some((read_pem(c)?, read_pem(k)?)),
            _ => None,
        },
    })
}

/// TLS to etcd (`https://` endpoints): its CA and, for client-certificate auth, this node's.
fn etcd_tls(c: &ClusterConfig) -> anyhow::Result<Option<cluster::etcd::TlsOptions>> {
    use tonic::transport::{Certificate, Identity};
    let Some(ca) = &c.etcd_tls_ca else {
        return Ok(None);
    };
    let mut tls =
        cluster::etcd::TlsOptions::new().ca_certificate(Certificate::from_pem(read_pem(ca)?));
    if let (Some(cert), Some(key)) = (&c.etcd_tls_cert, &c.etcd_tls_key) {
        tls = tls.identity(Identity::from_pem(read_pem(cert)?, read_pem(key)?));
    }
    Ok(Some(tls))
}

/// The management API's authenticator: issued tokens, the bootstrap token, OIDC.
fn api_authenticator(
    cfg: &Config,
    store: Arc<dyn PolicyStore>,
) -> anyhow::Result<api::auth::Authenticator> {
    let bootstrap = match &cfg.api.bootstrap_token_file {
        Some(f) => {
            let t = std::fs::read_to_string(f)
                .with_context(|| format!("reading api.bootstrap_token_file {}", f.display()))?;
            let t = t.trim().to_string();
            if t.len() < 32 {
                anyhow::bail!(
                    "api.bootstrap_token_file: the token must have at least 32 characters"
                );
            }
            Some(t)
        }
        None => None,
    };
    let oidc = match &cfg.api.oidc {
        Some(o) => {
            let keys = match &o.jwks_url {
                Some(j) => KeySource::Jwks(j.clone()),
                None => KeySource::Metadata(format!(
                    "{}/.well-known/openid-configuration",
                    o.issuer.trim_end_matches('/')
                )),
            };
            Some(api::auth::OidcAuth {
                verifier: JwtVerifier::new(
                    JwtConfig {
                        keys,
                        issuer: o.issuer.clone(),
                        audience: o.audience.clone(),
                        skew: Duration::from_secs(o.clock_skew_secs),
                        refresh: Duration::from_secs(3600),
                        min_refetch: Duration::from_secs(60),
                        metric: "fedrelay_api_jwks_fetches_total",
                    },
                    oidc_http(o)?,
                ),
                roles_claim: o.roles_claim.clone(),
                domains_claim: o.domains_claim.clone(),
            })
        }
        None => None,
    };
    Ok(api::auth::Authenticator::new(
        store,
        bootstrap.as_deref(),
        oidc,
    ))
}

/// Reads the trailing 12 months' usage now and then, off any request's path: a finished month
/// is cached (its user sets merged, its counters summed) by the first report that reads it, so
/// the portal's first overview after a month ends is as quick as the rest.
fn warm_usage(
    usage: UsageStore,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let today = crate::control::metadata::day_of(crate::edges::now_ms());
                    if let Err(e) = usage.report(&today, 12).await {
                        warn!(error = %e, "reading the usage of the last 12 months failed; retried later");
                    }
                }
                _ = stop.changed() => break,
            }
        }
    })
}

/// How long a portal session signed in with an API token lasts (the API checks the token on
/// every call as well).
const PORTAL_TOKEN_SESSION_SECS: u64 = 8 * 3600;

/// The HTTP client for the OpenID Connect provider (trusting `api.oidc.ca_file` if given).
fn oidc_http(o: &crate::config::OidcConfig) -> anyhow::Result<reqwest::Client> {
    let mut http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none());
    if let Some(ca) = &o.ca_file {
        let pem = std::fs::read(ca)
            .with_context(|| format!("reading api.oidc.ca_file {}", ca.display()))?;
        http = http.add_root_certificate(
            reqwest::Certificate::from_pem(&pem).context("api.oidc.ca_file")?,
        );
    }
    http.build().context("the OIDC HTTP client")
}

/// The portal's sign-in at the OpenID Connect provider, when configured.
fn portal_login(cfg: &Config) -> anyhow::Result<Option<portal::OidcLogin>> {
    let Some(o) = &cfg.api.oidc else {
        return Ok(None);
    };
    let Some(p) = &o.portal else {
        return Ok(None);
    };
    let secret = match &p.client_secret_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .with_context(|| {
                    format!("reading api.oidc.portal.client_secret_file {}", f.display())
                })?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    Ok(Some(portal::OidcLogin::new(
        p.clone(),
        &o.issuer,
        &o.audience,
        secret,
        Duration::from_secs(o.clock_skew_secs),
        oidc_http(o)?,
    )))
}

/// The policy store (etcd in a cluster, memory otherwise) and the policy it holds; a new
/// cluster's policy is seeded from the config file.
async fn open_policy(cfg: &Config) -> anyhow::Result<(Arc<Policy>, Arc<dyn PolicyStore>)> {
    let store: Arc<dyn PolicyStore> = match cfg.cluster.membership {
        MembershipKind::Static => Arc::new(MemoryPolicyStore::default()),
        MembershipKind::Etcd => Arc::new(EtcdPolicyStore::new(
            cfg.cluster.etcd_endpoints.clone(),
            &format!("/fedrelay/{}/", cfg.cluster.name),
            etcd_tls(&cfg.cluster)?,
        )),
    };
    let whence = match cfg.cluster.membership {
        MembershipKind::Static => "memory",
        MembershipKind::Etcd => "etcd",
    };
    let loaded = match store
        .load()
        .await
        .with_context(|| format!("reading the policy from {whence}"))?
    {
        Some(p) => p,
        None => {
            let doc = PolicyDoc::from_config(cfg);
            doc.validate()
                .context("the policy the config file implies")?;
            let seed = AuditEntry {
                at_ms: crate::edges::now_ms(),
                who: format!("config of node {}", cfg.node_id()),
                action: "policy.seed".into(),
                changes: PolicyDoc::default().diff(&doc),
                detail: None,
                version: None,
            };
            match store.save(&doc, Some(0), seed).await {
                Ok(v) => {
                    info!(version = v, "policy seeded from the config file");
                    (doc, v)
                }
                // Another node seeded it first.
                Err(PolicyStoreError::Conflict { .. }) => store
                    .load()
                    .await
                    .context("reading the policy")?
                    .context("the policy vanished while seeding it")?,
                Err(e) => return Err(e).context("seeding the policy"),
            }
        }
    };
    Ok((Arc::new(Policy::new(loaded.0, loaded.1)), store))
}

/// Where the node keeps its state.
struct Stores {
    store: Arc<dyn SessionStore>,
    outbox: Arc<dyn Outbox>,
    metadata: MetadataLog,
    metadata_task: tokio::task::JoinHandle<()>,
    presence: Arc<dyn PresenceStore>,
    teams_kv: Box<dyn teams::state::Kv>,
    xmpp_kv: Box<dyn teams::state::Kv>,
    sip_kv: Box<dyn teams::state::Kv>,
    approvals_kv: Box<dyn teams::state::Kv>,
    /// The management portal's sessions.
    portal_kv: Box<dyn teams::state::Kv>,
    usage: UsageStore,
    /// The state store's connection, for reading the metadata log.
    redis: Option<redis::aio::ConnectionManager>,
}

fn open_stores(cfg: &Config) -> anyhow::Result<Stores> {
    Ok(match cfg.store.backend {
        StoreBackend::Memory => {
            let (log, task) = MetadataLog::memory(cfg.metadata.memory_capacity);
            Stores {
                store: Arc::new(MemoryStore::new()),
                outbox: Arc::new(MemoryOutbox::new(cfg.http.stream_retention)),
                metadata: log,
                metadata_task: task,
                presence: Arc::new(MemoryPresenceStore::default()),
                teams_kv: Box::<MemoryKv>::default(),
                xmpp_kv: Box::<MemoryKv>::default(),
                sip_kv: Box::<MemoryKv>::default(),
                approvals_kv: Box::<MemoryKv>::default(),
                portal_kv: Box::<MemoryKv>::default(),
                usage: UsageStore::memory(cfg.metadata.retention_days),
                redis: None,
            }
        }
        StoreBackend::Redis => {
            let mut rcfg = RedisStoreConfig::new(cfg.store.redis_url.clone());
            rcfg.tls = redis_tls(&cfg.store)?;
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
            let presence = RedisPresenceStore::new(store.connection(), &cfg.store.key_prefix);
            let teams_kv = Box::new(RedisKv::new(store.connection()));
            let xmpp_kv = Box::new(RedisKv::new(store.connection()));
            let sip_kv = Box::new(RedisKv::new(store.connection()));
            let approvals_kv = Box::new(RedisKv::new(store.connection()));
            let portal_kv = Box::new(RedisKv::new(store.connection()));
            let redis = Some(store.connection());
            let usage = UsageStore::redis(
                store.connection(),
                &cfg.store.key_prefix,
                cfg.metadata.retention_days,
            );
            Stores {
                store: Arc::new(store),
                outbox: Arc::new(outbox),
                metadata: log,
                metadata_task: task,
                presence: Arc::new(presence),
                teams_kv,
                xmpp_kv,
                sip_kv,
                approvals_kv,
                portal_kv,
                usage,
                redis,
            }
        }
    })
}
