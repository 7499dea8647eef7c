//! Helpers for the relay-node integration tests: a signing client, an event-stream reader and
//! a webhook sink that checks the relay's signatures.
#![allow(dead_code)]

pub mod cluster;
pub mod teams;

use anyhow::{Context, Result, bail};
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use relay_node::edges::http::sign;
use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const SECRET_A: &str = "secret-of-a-0123456789";
pub const SECRET_B: &str = "secret-of-b-0123456789";
pub const SECRET_C: &str = "secret-of-c-0123456789";
pub const SECRET_D: &str = "secret-of-d-0123456789";

/// A config with four domains: a and b (stream delivery), c (webhook to `WEBHOOK_URL`), and
/// d, which no rule connects to anyone. Rules: a–b, a–c.
pub fn config(redis_url: &str, webhook_url: &str, extra: &str) -> String {
    format!(
        r#"node_id = "test-1"
[http]
listen = "127.0.0.1:{{HTTP_PORT}}"
max_body_bytes = 4096
[admin]
listen = "127.0.0.1:{{ADMIN_PORT}}"
[store]
backend = "redis"
redis_url = "{redis_url}"
response_timeout_ms = 500
[session]
retry_base_ms = 20
retry_max_ms = 200
ack_flush_ms = 10
[telemetry]
log_format = "json"
log_level = "info"
{extra}
[[domains]]
name = "a.example"
platform = "http"
secret = "{SECRET_A}"
[[domains]]
name = "b.example"
platform = "http"
secret = "{SECRET_B}"
[[domains]]
name = "c.example"
platform = "http"
secret = "{SECRET_C}"
delivery = "webhook"
webhook_url = "{webhook_url}"
[[domains]]
name = "d.example"
platform = "http"
secret = "{SECRET_D}"
[[federation]]
between = ["a.example", "b.example"]
[[federation]]
between = ["a.example", "c.example"]
"#
    )
}

pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub fn client() -> Result<reqwest::Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Ok(reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?)
}

/// A node's `/metrics` text.
pub async fn metrics(c: &reqwest::Client, admin_url: &str) -> Result<String> {
    Ok(c.get(format!("{admin_url}/metrics"))
        .send()
        .await?
        .text()
        .await?)
}

/// A `POST /v1/events` of `body` with `content_type`, signed as `domain` at time `ts`.
pub fn signed_request(
    c: &reqwest::Client,
    base: &str,
    domain: &str,
    secret: &str,
    ts: i64,
    body: &[u8],
    content_type: &str,
) -> reqwest::RequestBuilder {
    c.post(format!("{base}/v1/events"))
        .header("content-type", content_type)
        .header("x-fedrelay-domain", domain)
        .header("x-fedrelay-timestamp", ts.to_string())
        .header(
            "x-fedrelay-signature",
            sign::sign(secret.as_bytes(), ts, body),
        )
        .body(body.to_vec())
}

/// POSTs `body` to `/v1/events` signed as `domain`; returns the status and JSON answer.
pub async fn post_raw(
    c: &reqwest::Client,
    base: &str,
    domain: &str,
    secret: &str,
    ts: i64,
    body: &[u8],
) -> Result<(u16, Value)> {
    let resp = signed_request(c, base, domain, secret, ts, body, "application/json")
        .send()
        .await?;
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await?;
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Ok((status, json))
}

pub async fn post(
    c: &reqwest::Client,
    base: &str,
    domain: &str,
    secret: &str,
    event: &Value,
) -> Result<(u16, Value)> {
    post_raw(
        c,
        base,
        domain,
        secret,
        now_secs(),
        &serde_json::to_vec(event)?,
    )
    .await
}

/// Posts until the relay answers 202 (as an origin platform retrying would), with a deadline.
pub async fn post_until_accepted(
    c: &reqwest::Client,
    base: &str,
    domain: &str,
    secret: &str,
    event: &Value,
    timeout: Duration,
) -> Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        match post(c, base, domain, secret, event).await {
            Ok((202, v)) => return Ok(v),
            Ok((s, v)) if s != 503 => bail!("unexpected {s}: {v}"),
            _ => {}
        }
        if Instant::now() >= deadline {
            bail!("not accepted within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// alice@a.example sends `text` to bob@b.example; fails unless the relay answers 202.
pub async fn alice_to_bob(c: &reqwest::Client, base: &str, id: &str, text: &str) -> Result<Value> {
    let (s, acc) = post(
        c,
        base,
        "a.example",
        SECRET_A,
        &message(id, "alice", "bob@b.example", text),
    )
    .await?;
    if s != 202 {
        bail!("alice's message {id} answered {s}: {acc}");
    }
    Ok(acc)
}

pub fn message(id: &str, from: &str, to: &str, text: &str) -> Value {
    serde_json::json!({"id": id, "type": "message", "from": from, "to": to, "text": text})
}

#[derive(Debug, Clone)]
pub struct SseEvent {
    pub id: String,
    pub data: Value,
}

/// Reads a domain's `/v1/stream`.
pub struct Stream {
    resp: reqwest::Response,
    buf: Vec<u8>,
}

impl Stream {
    pub async fn open(
        c: &reqwest::Client,
        base: &str,
        domain: &str,
        secret: &str,
        after: Option<&str>,
    ) -> Result<Self> {
        let ts = now_secs();
        let mut req = c
            .get(format!("{base}/v1/stream"))
            .timeout(Duration::from_secs(3600))
            .header("x-fedrelay-domain", domain)
            .header("x-fedrelay-timestamp", ts.to_string())
            .header(
                "x-fedrelay-signature",
                sign::sign(secret.as_bytes(), ts, b"GET /v1/stream"),
            );
        if let Some(a) = after {
            req = req.header("last-event-id", a);
        }
        let resp = req.send().await?;
        if resp.status() != StatusCode::OK {
            bail!("stream refused: {}", resp.status());
        }
        Ok(Self {
            resp,
            buf: Vec::new(),
        })
    }

    /// The next event, or an error after `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Result<SseEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..pos + 2).collect();
                let text = String::from_utf8(block)?;
                let mut id = String::new();
                let mut data = String::new();
                for line in text.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = v.to_string();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push_str(v);
                    }
                }
                if data.is_empty() {
                    continue; // keep-alive comment
                }
                return Ok(SseEvent {
                    id,
                    data: serde_json::from_str(&data)?,
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("no event within {timeout:?}");
            }
            match tokio::time::timeout(left, self.resp.chunk()).await {
                Ok(Ok(Some(chunk))) => self.buf.extend_from_slice(&chunk),
                Ok(Ok(None)) => bail!("stream ended"),
                Ok(Err(e)) => bail!("stream failed: {e}"),
                Err(_) => bail!("no event within {timeout:?}"),
            }
        }
    }

    /// Asserts that no event arrives within `quiet`.
    pub async fn expect_none(&mut self, quiet: Duration) -> Result<()> {
        match self.next(quiet).await {
            Ok(e) => bail!("unexpected event {}", e.data),
            Err(_) => Ok(()),
        }
    }
}

/// What the webhook sink does with a POST.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SinkMode {
    Ok,
    Unavailable,
}

/// A webhook receiver on a free port that verifies the relay's signature (with domain c's
/// secret) and answers with receipts `native-<seq>`.
pub struct Sink {
    pub url: String,
    pub events: Arc<Mutex<Vec<Value>>>,
    pub bad_signatures: Arc<Mutex<u32>>,
    pub mode: Arc<Mutex<SinkMode>>,
    pub delay: Arc<Mutex<Duration>>,
    _task: tokio::task::JoinHandle<()>,
}

impl Sink {
    pub async fn start() -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/hook", listener.local_addr()?);
        let events = Arc::new(Mutex::new(Vec::new()));
        let bad = Arc::new(Mutex::new(0));
        let mode = Arc::new(Mutex::new(SinkMode::Ok));
        let delay = Arc::new(Mutex::new(Duration::ZERO));
        let (e, b, m, d) = (events.clone(), bad.clone(), mode.clone(), delay.clone());
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let (e, b, m, d) = (e.clone(), b.clone(), m.clone(), d.clone());
                async move { sink_handle(headers, body, e, b, m, d).await }
            }),
        );
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            url,
            events,
            bad_signatures: bad,
            mode,
            delay,
            _task: task,
        })
    }

    pub fn received(&self) -> Vec<Value> {
        self.events.lock().map(|v| v.clone()).unwrap_or_default()
    }

    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Result<Vec<Value>> {
        test_support::wait_for(&format!("{n} webhook events"), timeout, || async {
            let got = self.received();
            (got.len() >= n).then_some(got)
        })
        .await
    }
}

async fn sink_handle(
    headers: HeaderMap,
    body: Bytes,
    events: Arc<Mutex<Vec<Value>>>,
    bad: Arc<Mutex<u32>>,
    mode: Arc<Mutex<SinkMode>>,
    delay: Arc<Mutex<Duration>>,
) -> (StatusCode, String) {
    let d = delay.lock().map(|d| *d).unwrap_or_default();
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let ok_sig = h("x-fedrelay-domain") == "c.example"
        && sign::verify(
            SECRET_C.as_bytes(),
            &h("x-fedrelay-timestamp"),
            &h("x-fedrelay-signature"),
            &body,
            now_secs(),
            300,
        )
        .is_ok();
    if !ok_sig {
        if let Ok(mut b) = bad.lock() {
            *b += 1;
        }
        return (StatusCode::UNAUTHORIZED, String::new());
    }
    if mode
        .lock()
        .map(|m| *m == SinkMode::Unavailable)
        .unwrap_or(false)
    {
        return (StatusCode::SERVICE_UNAVAILABLE, String::new());
    }
    let Ok(batch) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, String::new());
    };
    let mut receipts = Vec::new();
    if let Some(list) = batch["events"].as_array() {
        for ev in list {
            receipts.push(serde_json::json!({
                "session_id": ev["session_id"], "seq": ev["seq"],
                "native_id": format!("native-{}", ev["seq"]),
            }));
            if let Ok(mut v) = events.lock() {
                v.push(ev.clone());
            }
        }
    }
    (
        StatusCode::OK,
        serde_json::json!({ "receipts": receipts }).to_string(),
    )
}

/// Every key of a Redis server, via redis-cli-free RESP (the test has the redis crate).
pub async fn redis_keys(url: &str) -> Result<Vec<String>> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut conn).await?;
    Ok(keys)
}

/// All entries of the metadata log, as field maps.
pub async fn metadata_entries(url: &str) -> Result<Vec<std::collections::HashMap<String, String>>> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut out = Vec::new();
    for key in redis_keys(url)
        .await?
        .into_iter()
        .filter(|k| k.starts_with("fr:meta:"))
    {
        let entries: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
            .arg(&key)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .context("xrange")?;
        for (_, fields) in entries {
            out.push(
                fields
                    .chunks_exact(2)
                    .map(|p| (p[0].clone(), p[1].clone()))
                    .collect(),
            );
        }
    }
    Ok(out)
}

/// `config()` for node `id` of an etcd cluster named `name`, with `extra` in its
/// `[cluster]` section (the gRPC listener is `{GRPC_PORT}`).
pub fn cluster_config(
    redis_url: &str,
    webhook_url: &str,
    etcd_endpoint: &str,
    name: &str,
    id: &str,
    telemetry: &str,
    extra: &str,
) -> String {
    config(
        redis_url,
        webhook_url,
        &format!(
            "{telemetry}\n[cluster]\nmembership = \"etcd\"\nname = \"{name}\"\n\
             etcd_endpoints = [\"{etcd_endpoint}\"]\ngrpc_listen = \"127.0.0.1:{{GRPC_PORT}}\"\n{extra}"
        ),
    )
    .replace("node_id = \"test-1\"", &format!("node_id = \"{id}\""))
}

/// Waits until the node at `admin_url` lists `n` members, all ready (a view it assembles by
/// asking every member over gRPC).
pub async fn wait_members(c: &reqwest::Client, admin_url: &str, n: usize) -> Result<()> {
    test_support::wait_for(
        &format!("{n} ready members in the view of {admin_url}"),
        Duration::from_secs(15),
        || async {
            let v: Value = c
                .get(format!("{admin_url}/cluster"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let members = v["members"].as_array()?;
            (members.len() == n && members.iter().all(|m| m["ready"] == true)).then_some(())
        },
    )
    .await
}
