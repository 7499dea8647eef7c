//! Spans are exported over OTLP to a collector, joined to the caller's W3C trace, and carry
//! ids, never content. The collector is an in-process OTLP/gRPC trace service.

mod common;

use anyhow::{Result, ensure};
use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use test_support::{RedisServer, RelayNode};

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Span>>>);

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
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

const CANARY: &str = "CANARY-span-91c4";

#[tokio::test]
async fn spans_reach_the_collector_in_the_callers_trace_without_content() -> Result<()> {
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
            let spans = collector.0.lock().ok()?.clone();
            let ours: Vec<String> = spans
                .iter()
                .filter(|s| hex::encode(&s.trace_id) == trace_id)
                .map(|s| s.name.clone())
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
