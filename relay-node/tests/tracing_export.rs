//! Spans are exported over OTLP to a collector, joined to the caller's W3C trace — across
//! every node a message crosses — and carry ids, never content. The collector is an
//! in-process OTLP/gRPC trace service.
//!
//! And a node's gRPC port, configured for mutual TLS, refuses plaintext and certificates of
//! any other CA; the tests that run a cluster over mTLS share [`ClusterCerts`].

mod common;

use anyhow::{Context, Result, ensure};
use common::*;
use fedrelay_proto::v1::admin_service_client::AdminServiceClient;
use fedrelay_proto::v1::{NodeStatus, StatusRequest};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::Span;
use serde_json::json;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use test_support::certs::issue;
use test_support::{EtcdServer, RedisServer, RelayNode};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// Spans received, each with the `service.name` of the process that exported it.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<(String, Span)>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self
            .0
            .lock()
            .map_err(|_| tonic::Status::internal("poisoned"))?;
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(any_value::Value::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                spans.extend(ss.spans.into_iter().map(|sp| (service.clone(), sp)));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

const CANARY: &str = "CANARY-span-91c4";

impl Collector {
    /// Serves OTLP/gRPC on a free port; answers the address.
    async fn start() -> Result<(Self, std::net::SocketAddr)> {
        let collector = Collector::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let service = TraceServiceServer::new(collector.clone());
        tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await;
        });
        Ok((collector, addr))
    }

    /// (service, span name) of every span of `trace_id` so far.
    fn in_trace(&self, trace_id: &str) -> Vec<(String, String)> {
        self.0
            .lock()
            .map(|spans| {
                spans
                    .iter()
                    .filter(|(_, s)| hex::encode(&s.trace_id) == trace_id)
                    .map(|(svc, s)| (svc.clone(), s.name.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[tokio::test]
async fn spans_reach_the_collector_in_the_callers_trace_without_content() -> Result<()> {
    let (collector, addr) = Collector::start().await?;

    let redis = RedisServer::start()?;
    let sink = Sink::start().await?;
    let cfg = config(
        &redis.url(),
        &sink.url,
        &format!("otlp_endpoint = \"http://{addr}\""),
    );
    let node = RelayNode::start_with_env(&cfg, &[("OTEL_BSP_SCHEDULE_DELAY", "100")])?;
    let c = client()?;
    let base = node.http_url();
    let mut stream = Stream::open(&c, &base, "b.example", SECRET_B, None).await?;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let body = serde_json::to_vec(&json!({"id": "o1", "type": "message", "from": "alice",
                                          "to": "bob@b.example", "text": CANARY}))?;
    let resp = signed_request(
        &c,
        &base,
        "a.example",
        SECRET_A,
        now_secs(),
        &body,
        "application/json",
    )
    .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
    .send()
    .await?;
    ensure!(resp.status().as_u16() == 202);
    stream.next(Duration::from_secs(10)).await?;

    let names = test_support::wait_for(
        "the message's spans at the collector",
        Duration::from_secs(15),
        || async {
            let ours: Vec<String> = collector
                .in_trace(trace_id)
                .into_iter()
                .map(|(_, name)| name)
                .collect();
            (ours.iter().any(|n| n == "http.inbound") && ours.iter().any(|n| n == "session.append"))
                .then_some(ours)
        },
    )
    .await?;
    ensure!(
        names.iter().any(|n| n == "session.deliver"),
        "delivery not in the trace: {names:?}"
    );
    let all = format!(
        "{:?}",
        collector.0.lock().map(|s| s.clone()).unwrap_or_default()
    );
    ensure!(!all.contains(CANARY), "message content in an exported span");
    Ok(())
}

/// The common name of the cluster's CA (and of the look-alike CA).
const CLUSTER_CA: &str = "fedrelay cluster CA";

/// A CA and one certificate for every node (127.0.0.1 and localhost), as PEM files; and two
/// foreign CAs with a certificate each for the same names: `lookalike-`, whose CA bears the
/// cluster CA's name, and `foreign-`, named otherwise.
struct ClusterCerts {
    dir: tempfile::TempDir,
}

impl ClusterCerts {
    fn make() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        issue(dir.path(), "", CLUSTER_CA, &["node"])?;
        issue(dir.path(), "lookalike-", CLUSTER_CA, &["node"])?;
        issue(dir.path(), "foreign-", "some other CA", &["node"])?;
        Ok(Self { dir })
    }

    fn path(&self, file: &str) -> std::path::PathBuf {
        self.dir.path().join(file)
    }

    /// The `[cluster]` keys of a node: the cluster CA's certificate and key.
    fn config(&self) -> String {
        let p = |f: &str| self.path(f).display().to_string();
        format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"\ntls_ca = \"{}\"\n",
            p("node.pem"),
            p("node.key"),
            p("ca.pem")
        )
    }

    /// A gRPC client's TLS: it trusts the cluster's CA and, with `identity` (`node`,
    /// `lookalike-node` or `foreign-node`), presents that certificate.
    fn client_tls(&self, identity: Option<&str>) -> Result<ClientTlsConfig> {
        let ca = Certificate::from_pem(std::fs::read(self.path("ca.pem"))?);
        let mut tls = ClientTlsConfig::new().ca_certificate(ca);
        if let Some(name) = identity {
            tls = tls.identity(Identity::from_pem(
                std::fs::read(self.path(&format!("{name}.pem")))?,
                std::fs::read(self.path(&format!("{name}.key")))?,
            ));
        }
        Ok(tls)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_trace_spans_both_nodes_over_mutual_tls() -> Result<()> {
    let (collector, addr) = Collector::start().await?;
    let redis = RedisServer::start()?;
    let etcd = EtcdServer::start()?;
    let sink = Sink::start().await?;
    let certs = ClusterCerts::make()?;
    let node_config = |id: &str| {
        let telemetry = format!("otlp_endpoint = \"http://{addr}\"\nservice_name = \"relay-{id}\"");
        let tls = certs.config();
        cluster_config(
            &redis.url(),
            &sink.url,
            &etcd.endpoint(),
            "trace",
            id,
            &telemetry,
            &tls,
        )
    };
    let env = [("OTEL_BSP_SCHEDULE_DELAY", "100")];
    let n1 = RelayNode::start_with_env(&node_config("t1"), &env)?;
    let n2 = RelayNode::start_with_env(&node_config("t2"), &env)?;
    let c = client()?;
    wait_members(&c, &n1.admin_url(), 2).await?;

    // A sender whose session node t2 owns, posted to node t1: the message crosses nodes.
    let map = cluster::ShardMap::new(
        0,
        vec![
            cluster::Member::new("t1", ""),
            cluster::Member::new("t2", ""),
        ],
    );
    let bob = fedrelay_proto::Address::new("http", "b.example", "bob");
    let from = (0..100)
        .map(|i| format!("alice{i}"))
        .find(|u| {
            let a = fedrelay_proto::Address::new("http", "a.example", u.as_str());
            let id = session_actor::SessionId::one_to_one(&a, &bob);
            map.owner(&id).is_some_and(|m| m.node_id == "t2")
        })
        .context("a session owned by t2")?;
    let mut stream = Stream::open(&c, &n2.http_url(), "b.example", SECRET_B, None).await?;
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let body = serde_json::to_vec(&json!({"id": "x1", "type": "message", "from": from,
                                          "to": "bob@b.example", "text": CANARY}))?;
    let resp = signed_request(
        &c,
        &n1.http_url(),
        "a.example",
        SECRET_A,
        now_secs(),
        &body,
        "application/json",
    )
    .header("traceparent", format!("00-{trace_id}-b7ad6b7169203331-01"))
    .send()
    .await?;
    ensure!(resp.status().as_u16() == 202, "status {}", resp.status());
    stream.next(Duration::from_secs(10)).await?;

    let spans = test_support::wait_for(
        "the message's spans from both nodes",
        Duration::from_secs(15),
        || async {
            let ours = collector.in_trace(trace_id);
            let has = |svc: &str, name: &str| ours.iter().any(|(s, n)| s == svc && n == name);
            (has("relay-t1", "http.inbound")
                && has("relay-t1", "cluster.forward")
                && has("relay-t2", "cluster.receive")
                && has("relay-t2", "session.append"))
            .then_some(ours)
        },
    )
    .await?;
    ensure!(
        spans
            .iter()
            .all(|(svc, _)| svc == "relay-t1" || svc == "relay-t2"),
        "{spans:?}"
    );
    let all = format!(
        "{:?}",
        collector.0.lock().map(|s| s.clone()).unwrap_or_default()
    );
    ensure!(!all.contains(CANARY), "message content in an exported span");
    Ok(())
}

/// `AdminService.Status` of the node at `addr` (`host:port`), on a connection of its own:
/// plaintext without `tls`. The inner error is the refusal; the outer one, a call that neither
/// answered nor failed in time.
async fn grpc_status(
    addr: &str,
    tls: Option<ClientTlsConfig>,
) -> Result<std::result::Result<NodeStatus, String>> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls)?;
    }
    let call = async {
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("connect: {e:?}"))?;
        AdminServiceClient::new(channel)
            .status(StatusRequest {})
            .await
            .map(tonic::Response::into_inner)
            .map_err(|e| format!("status: {e}"))
    };
    tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .with_context(|| format!("Status on {addr} neither answered nor failed within 10 s"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cluster_grpc_port_refuses_plaintext_and_certificates_of_another_ca() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let redis = RedisServer::start()?;
    let etcd = EtcdServer::start()?;
    let certs = ClusterCerts::make()?;
    let node_config = |id: &str| {
        let tls = certs.config();
        cluster_config(
            &redis.url(),
            "http://127.0.0.1:9/hook",
            &etcd.endpoint(),
            "mtls",
            id,
            "",
            &tls,
        )
    };
    let nodes = [
        RelayNode::start(&node_config("m1"))?,
        RelayNode::start(&node_config("m2"))?,
    ];
    // The nodes themselves get through to each other: each lists the other as ready, which
    // it learns over the other's gRPC port.
    let c = client()?;
    for n in &nodes {
        wait_members(&c, &n.admin_url(), 2).await?;
    }

    for (n, id) in nodes.iter().zip(["m1", "m2"]) {
        let addr = format!("127.0.0.1:{}", n.grpc_port);
        let status = |r: std::result::Result<NodeStatus, String>| {
            r.map_err(|e| anyhow::anyhow!("a client of the cluster's CA was refused: {e}"))
        };
        // With the cluster CA's certificate: answered.
        let s = status(grpc_status(&addr, Some(certs.client_tls(Some("node"))?)).await?)?;
        ensure!(
            s.node_id == id && s.ready && s.members.len() == 2,
            "{addr} answered {s:?}"
        );
        // Anything else: refused.
        for (what, tls) in [
            ("plaintext", None),
            (
                "TLS without a client certificate",
                Some(certs.client_tls(None)?),
            ),
            (
                "TLS with a client certificate of another CA",
                Some(certs.client_tls(Some("foreign-node"))?),
            ),
            (
                "TLS with a client certificate of a CA named like the cluster's",
                Some(certs.client_tls(Some("lookalike-node"))?),
            ),
        ] {
            match grpc_status(&addr, tls).await? {
                Ok(s) => anyhow::bail!("{what} to {id}'s gRPC port was answered: {s:?}"),
                Err(e) => {
                    let _ = writeln!(std::io::stderr(), "mtls: {what} to {id}: refused ({e})");
                }
            }
        }
        // And the refusals did not break the port for members.
        status(grpc_status(&addr, Some(certs.client_tls(Some("node"))?)).await?)?;
    }
    Ok(())
}
