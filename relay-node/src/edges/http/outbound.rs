//! Deliveries to HTTP-edge domains: into the domain's outbox (stream delivery) or POSTed to
//! its webhook, in both cases batched across sessions.

use super::codec;
use super::sign;
use super::{DomainEntry, Domains};
use crate::batch::Batcher;
use crate::config::{Delivery, HttpConfig};
use fedrelay_proto::{Address, Body, Envelope};
use serde::Deserialize;
use session_actor::store::{Outbox, OutboxItem};
use session_actor::{DeliveryError, SessionId};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tracing::debug;

/// One rendered delivery (cheap to clone: the payload is shared).
#[derive(Clone)]
struct Item {
    session_id: SessionId,
    recipient: String,
    seq: u64,
    payload: bytes::Bytes,
}

type DomainBatcher = Batcher<Item, Option<String>, DeliveryError>;

/// The HTTP edge's delivery half.
pub struct HttpOutbound {
    batchers: HashMap<String, DomainBatcher>,
}

#[derive(Deserialize)]
struct WebhookAnswer {
    #[serde(default)]
    receipts: Vec<Receipt>,
}

#[derive(Deserialize)]
struct Receipt {
    session_id: String,
    seq: u64,
    native_id: String,
}

impl HttpOutbound {
    pub fn new(
        domains: &Domains,
        outbox: Arc<dyn Outbox>,
        cfg: &HttpConfig,
    ) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.webhook_timeout_ms))
            .connect_timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(32)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let mut batchers = HashMap::new();
        for d in domains.iter() {
            let batcher = match d.delivery {
                Delivery::Stream => {
                    let outbox = outbox.clone();
                    let name = d.name.clone();
                    Batcher::spawn(
                        1024,
                        4,
                        65_536,
                        |_| false,
                        move |items: Vec<Item>| {
                            let outbox = outbox.clone();
                            let name = name.clone();
                            async move { push_outbox(outbox.as_ref(), &name, items).await }
                        },
                    )
                }
                Delivery::Webhook => {
                    let client = client.clone();
                    let domain = Arc::new(d.clone());
                    // A permanent refusal (4xx) may be one session's bad event: retry each
                    // session's events alone rather than fail the others with it.
                    Batcher::spawn(
                        cfg.webhook_batch,
                        8,
                        65_536,
                        |e: &DeliveryError| !e.retryable,
                        move |items: Vec<Item>| {
                            let client = client.clone();
                            let domain = domain.clone();
                            async move { post_webhook(&client, &domain, items).await }
                        },
                    )
                }
            };
            batchers.insert(d.name.clone(), batcher);
        }
        Ok(Self { batchers })
    }

    pub async fn deliver(
        &self,
        recipient: &Address,
        batch: &[Arc<Envelope>],
    ) -> Result<Vec<Option<String>>, DeliveryError> {
        let domain = recipient.domain.to_ascii_lowercase();
        let Some(batcher) = self.batchers.get(&domain) else {
            return Err(DeliveryError::permanent(
                "unknown_domain",
                "domain not served by the http edge",
            ));
        };
        let mut items = Vec::with_capacity(batch.len());
        for env in batch {
            let session_id = SessionId::from_bytes(&env.session_id).ok_or_else(|| {
                DeliveryError::permanent("invalid", "envelope without session id")
            })?;
            let payload = codec::render(env, recipient)
                .map_err(|_| DeliveryError::permanent("render_failed", "could not render event"))?;
            items.push(Item {
                session_id,
                recipient: recipient.user.clone(),
                seq: env.seq,
                payload: payload.into(),
            });
        }
        let natives = batcher
            .submit(items)
            .await
            .map_err(|_| DeliveryError::internal("shutting_down", "edge is stopping"))??;
        for env in batch {
            let kind = env.body.as_ref().map(Body::kind).unwrap_or("unknown");
            metrics::counter!("fedrelay_messages_out_total", "edge" => "http", "kind" => kind)
                .increment(1);
        }
        Ok(natives)
    }
}

async fn push_outbox(
    outbox: &dyn Outbox,
    domain: &str,
    items: Vec<Item>,
) -> Result<Vec<Option<String>>, DeliveryError> {
    let n = items.len();
    let items: Vec<OutboxItem> = items
        .into_iter()
        .map(|i| OutboxItem {
            session_id: i.session_id,
            recipient: i.recipient,
            seq: i.seq,
            payload: i.payload,
        })
        .collect();
    outbox
        .push(domain, &items)
        .await
        .map_err(|e| DeliveryError::internal("store_unavailable", e.to_string()))?;
    Ok(vec![None; n])
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Largest webhook answer read for receipts; a larger one is ignored (receipts are optional).
const MAX_ANSWER: usize = 1 << 20;

/// The body of `resp` if it fits in `limit` bytes, else nothing.
async fn read_limited(mut resp: reqwest::Response, limit: usize) -> Vec<u8> {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        if body.len() + chunk.len() > limit {
            return Vec::new();
        }
        body.extend_from_slice(&chunk);
    }
    body
}

/// POSTs `{"events": [...]}` signed with the domain's secret.
async fn post_webhook(
    client: &reqwest::Client,
    domain: &DomainEntry,
    items: Vec<Item>,
) -> Result<Vec<Option<String>>, DeliveryError> {
    let Some(url) = domain.webhook_url.as_deref() else {
        return Err(DeliveryError::permanent(
            "no_webhook",
            "domain has no webhook_url",
        ));
    };
    let mut body =
        Vec::with_capacity(items.iter().map(|i| i.payload.len() + 1).sum::<usize>() + 12);
    body.extend_from_slice(b"{\"events\":[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&item.payload);
    }
    body.extend_from_slice(b"]}");
    let ts = now_secs();
    let sig = sign::sign(&domain.secret, ts, &body);
    let resp = client
        .post(url)
        .header("content-type", "application/json")
        .header("x-fedrelay-domain", &domain.name)
        .header("x-fedrelay-timestamp", ts.to_string())
        .header("x-fedrelay-signature", sig)
        .body(body)
        .send()
        .await
        .map_err(|e| {
            let code = if e.is_timeout() {
                "timeout"
            } else {
                "connect_failed"
            };
            DeliveryError::retryable(code, "webhook request failed")
        })?;
    let status = resp.status();
    if status.is_success() {
        // Receipts are optional; a 2xx without them (or with a body we cannot read) still
        // acknowledges the batch.
        let bytes = read_limited(resp, MAX_ANSWER).await;
        let answer: Option<WebhookAnswer> = serde_json::from_slice(&bytes).ok();
        let mut by_key: HashMap<(String, u64), String> = answer
            .map(|a| {
                a.receipts
                    .into_iter()
                    .map(|r| ((r.session_id, r.seq), r.native_id))
                    .collect()
            })
            .unwrap_or_default();
        return Ok(items
            .iter()
            .map(|i| {
                by_key
                    .remove(&(i.session_id.to_hex(), i.seq))
                    .filter(|n| !n.is_empty() && n.len() <= 256)
                    .map(|n| codec::native_id(&domain.name, &n))
            })
            .collect());
    }
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s.min(300)));
    debug!(domain = %domain.name, status = status.as_u16(), "webhook refused");
    let code = format!("http_{}", status.as_u16());
    if status.as_u16() == 429 || status.is_server_error() || status.as_u16() == 408 {
        Err(DeliveryError {
            code,
            detail: "webhook answered with a retryable status".into(),
            retryable: true,
            retry_after,
            internal: false,
        })
    } else {
        Err(DeliveryError::permanent(code, "webhook refused the events"))
    }
}
