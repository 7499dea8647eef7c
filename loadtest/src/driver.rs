//! The open-loop sender. One dispatcher walks the fixed schedule (message `i` at `t0 + i/R`),
//! waking once per time slice and spawning a request task for every message that is due, never
//! waiting for earlier answers. A semaphore caps the requests in flight; when the cap is hit the
//! dispatcher waits for a slot, and the late requests still measure latency from their
//! *intended* time, so a slow relay shows up as latency (no coordinated omission).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Semaphore;

use crate::live::{Accepted, Shared};
use crate::sign::{HEADER_DOMAIN, HEADER_SIGNATURE, HEADER_TIMESTAMP, sign_body, unix_now_secs};

/// The HTTP/1.1 keep-alive client the driver sends with.
pub type PostClient = Client<HttpConnector, Full<Bytes>>;

/// A client with a keep-alive pool large enough for `max_inflight` connections.
pub fn post_client(max_inflight: usize) -> PostClient {
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    conn.set_connect_timeout(Some(Duration::from_secs(5)));
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(max_inflight)
        .pool_idle_timeout(Duration::from_secs(60))
        .build(conn)
}

/// How to send.
#[derive(Debug, Clone)]
pub struct DriverOptions {
    /// `http://host:port` of the relay's HTTP edge.
    pub target: String,
    pub max_inflight: usize,
    pub request_timeout: Duration,
}

/// What the dispatcher itself observed.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct DriverStats {
    pub dispatched: u64,
    /// Requests that had to wait for a free slot under `--max-inflight`.
    pub delayed_by_inflight_cap: u64,
    /// The largest delay between a message's intended and actual dispatch, ms.
    pub max_dispatch_lag_ms: f64,
}

/// Sends every message of the plan on schedule; returns once all requests have finished.
pub async fn drive(
    shared: Arc<Shared>,
    client: PostClient,
    opts: &DriverOptions,
) -> Result<DriverStats> {
    let uri: Uri = format!("{}/v1/events", opts.target.trim_end_matches('/'))
        .parse()
        .with_context(|| format!("bad --target {}", opts.target))?;
    let cap = opts.max_inflight.clamp(1, Semaphore::MAX_PERMITS);
    let sem = Arc::new(Semaphore::new(cap));
    let schedule = shared.plan.schedule;
    let total = schedule.total_messages();
    let mut stats = DriverStats::default();
    let mut max_lag = Duration::ZERO;
    let mut i = 0u64;
    while i < total {
        let due = shared.t0 + Duration::from_nanos(schedule.intended_ns(i));
        tokio::time::sleep_until(due.into()).await;
        let now_ns = shared.now_ns();
        // Everything due by now goes out in this time slice.
        while i < total && schedule.intended_ns(i) <= now_ns {
            let permit = match sem.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    stats.delayed_by_inflight_cap += 1;
                    sem.clone()
                        .acquire_owned()
                        .await
                        .context("in-flight semaphore closed")?
                }
            };
            let lag = Duration::from_nanos(shared.now_ns().saturating_sub(schedule.intended_ns(i)));
            max_lag = max_lag.max(lag);
            shared.on_dispatched();
            stats.dispatched += 1;
            let (sh, cl, u, timeout) = (
                shared.clone(),
                client.clone(),
                uri.clone(),
                opts.request_timeout,
            );
            tokio::spawn(async move {
                send_one(&sh, &cl, u, i, timeout).await;
                drop(permit);
            });
            i += 1;
        }
    }
    // Wait for every request in flight: they each hold a permit until they finish.
    let all = u32::try_from(cap).unwrap_or(u32::MAX);
    let _all = sem
        .acquire_many(all)
        .await
        .context("in-flight semaphore closed")?;
    stats.max_dispatch_lag_ms = max_lag.as_secs_f64() * 1000.0;
    Ok(stats)
}

/// Label of a failed send for the error counts.
fn error_label(e: &hyper_util::client::legacy::Error) -> &'static str {
    if e.is_connect() {
        "connect_error"
    } else {
        "transport_error"
    }
}

async fn send_one(shared: &Shared, client: &PostClient, uri: Uri, i: u64, timeout: Duration) {
    let msg = match shared.plan.message(i) {
        Ok(m) => m,
        Err(_) => {
            shared.on_send_error(i, "encode_error");
            return;
        }
    };
    let domain = &shared.plan.domains[msg.domain];
    let ts = unix_now_secs();
    let sig = sign_body(domain.secret.as_bytes(), ts, &msg.body);
    let req = Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(HEADER_DOMAIN, domain.name.as_str())
        .header(HEADER_TIMESTAMP, ts.to_string())
        .header(HEADER_SIGNATURE, sig)
        .body(Full::new(Bytes::from(msg.body)));
    let req = match req {
        Ok(r) => r,
        Err(_) => {
            shared.on_send_error(i, "request_build_error");
            return;
        }
    };
    let exchange = async {
        let resp = client.request(req).await.map_err(|e| error_label(&e))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|_| "body_error")?
            .to_bytes();
        Ok::<_, &'static str>((status, body))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok((StatusCode::ACCEPTED, body))) => {
            let a: Accepted = serde_json::from_slice(&body).unwrap_or_default();
            shared.on_accepted(i, msg.intended_ns, &a);
        }
        Ok(Ok((status, _))) => shared.on_send_error(i, status.as_str()),
        Ok(Err(label)) => shared.on_send_error(i, label),
        Err(_) => shared.on_send_error(i, "timeout"),
    }
}
