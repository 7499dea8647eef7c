//! Calling the Bot Connector: an OAuth2 client-credentials token (cached until shortly
//! before it expires, one refresh at a time), REST calls to a conversation's stored
//! `serviceUrl` only, retries of 429/412/5xx honouring `Retry-After`, and per-conversation
//! pacing within Teams' published bot limits.

use rand::Rng;
use serde::Deserialize;
use serde_json::Value;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::Mutex as AsyncMutex;
use tracing::debug;

#[derive(Debug, Error)]
pub enum ConnectorError {
    #[error("service URL is not an allowed Bot Connector host")]
    ForbiddenHost,
    #[error("token endpoint: {0}")]
    Token(String),
    #[error("Bot Connector answered {status}")]
    Status {
        status: u16,
        retry_after: Option<Duration>,
    },
    #[error("Bot Connector unreachable: {0}")]
    Transport(String),
    #[error("Bot Connector answered something unexpected")]
    Body,
}

impl ConnectorError {
    /// Whether trying later may help.
    pub fn retryable(&self) -> bool {
        match self {
            ConnectorError::ForbiddenHost | ConnectorError::Body => false,
            ConnectorError::Status { status, .. } => {
                matches!(status, 401 | 408 | 412 | 429) || *status >= 500
            }
            ConnectorError::Token(_) | ConnectorError::Transport(_) => true,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ConnectorError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ConnectorError::ForbiddenHost => "teams_forbidden_host",
            ConnectorError::Token(_) => "teams_token",
            ConnectorError::Status { status: 429, .. } => "teams_throttled",
            ConnectorError::Status { status: 403, .. } => "teams_forbidden",
            ConnectorError::Status { status: 404, .. } => "teams_not_found",
            ConnectorError::Status { .. } => "teams_status",
            ConnectorError::Transport(_) => "teams_unreachable",
            ConnectorError::Body => "teams_bad_answer",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ConnectorConfig {
    pub app_id: String,
    pub app_password: String,
    pub token_url: String,
    pub scope: String,
    pub service_url_prefixes: Vec<String>,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    expires_in: Option<u64>,
}

struct Token {
    value: String,
    refresh_at: Instant,
}

/// Sliding-window limits, `(window, max requests)`.
type Limits = &'static [(Duration, usize)];

/// One bot, one thread: send/create (Teams' documented limits).
const PER_CONVERSATION: Limits = &[
    (Duration::from_secs(1), 7),
    (Duration::from_secs(2), 8),
    (Duration::from_secs(30), 60),
    (Duration::from_secs(3600), 1800),
];
/// One app, one tenant.
const PER_TENANT: Limits = &[(Duration::from_secs(1), 50)];

/// Teams counts requests as they reach it, and one may take a little longer to get there
/// than the one a window after it: every window is kept this much longer.
const PACING_GUARD: Duration = Duration::from_millis(50);

/// Attempts of one call (the first included) before the error goes back to the session,
/// which retries later with its own backoff.
const ATTEMPTS: u32 = 3;
/// A `Retry-After` longer than this is not waited for inline.
const MAX_INLINE_WAIT: Duration = Duration::from_secs(5);

/// Send times by conversation and by tenant, kept apart (their windows differ).
#[derive(Default)]
struct Pacer {
    sent: Mutex<(Queues, Queues)>,
}

type Queues = HashMap<String, VecDeque<Instant>>;

/// The earliest time one more send fits every window of `limits` for queue `q`.
fn earliest(q: &mut VecDeque<Instant>, limits: Limits, now: Instant) -> Instant {
    let span = limits_span(limits);
    while q
        .front()
        .is_some_and(|t| now.saturating_duration_since(*t) >= span)
    {
        q.pop_front();
    }
    let mut at = now;
    for (window, max) in limits {
        // The slot after the max-th most recent send in this window frees up once that send
        // is `window` old.
        if q.len() >= *max
            && let Some(t) = q.get(q.len() - max)
        {
            at = at.max(*t + *window + PACING_GUARD);
        }
    }
    at
}

fn record(q: &mut VecDeque<Instant>, at: Instant) {
    q.push_back(at);
    if q.len() > 1 && q[q.len() - 2] > at {
        q.make_contiguous().sort();
    }
}

impl Pacer {
    /// Reserves the next slot of a send to `conversation` of `tenant` within both limits and
    /// returns when it may go.
    fn reserve(&self, conversation: &str, tenant: &str) -> Instant {
        let now = Instant::now();
        let Ok(mut guard) = self.sent.lock() else {
            return now;
        };
        let (convs, tenants) = &mut *guard;
        for (map, limits) in [(&mut *convs, PER_CONVERSATION), (&mut *tenants, PER_TENANT)] {
            if map.len() > 10_000 {
                let span = limits_span(limits);
                map.retain(|_, q| {
                    q.back()
                        .is_some_and(|t| now.saturating_duration_since(*t) < span)
                });
            }
        }
        let cq = convs.entry(conversation.to_string()).or_default();
        let at_conv = earliest(cq, PER_CONVERSATION, now);
        let tq = tenants.entry(tenant.to_string()).or_default();
        let at = at_conv.max(earliest(tq, PER_TENANT, now));
        record(tq, at);
        if let Some(cq) = convs.get_mut(conversation) {
            record(cq, at);
        }
        at
    }
}

fn limits_span(limits: Limits) -> Duration {
    limits
        .iter()
        .map(|(w, _)| *w)
        .max()
        .unwrap_or(Duration::from_secs(1))
        + PACING_GUARD
}

pub struct Connector {
    cfg: ConnectorConfig,
    http: reqwest::Client,
    token: Mutex<Option<Token>>,
    refreshing: AsyncMutex<()>,
    pacer: Pacer,
}

/// `Retry-After` as seconds or an HTTP date.
fn retry_after(h: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = h.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(s) = v.parse::<u64>() {
        return Some(Duration::from_secs(s));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Connector {
    pub fn new(cfg: ConnectorConfig, http: reqwest::Client) -> Self {
        Self {
            cfg,
            http,
            token: Mutex::new(None),
            refreshing: AsyncMutex::new(()),
            pacer: Pacer::default(),
        }
    }

    /// Whether the relay may call `service_url` at all.
    pub fn allowed(&self, service_url: &str) -> bool {
        self.cfg.service_url_prefixes.iter().any(|p| {
            service_url
                .as_bytes()
                .get(..p.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(p.as_bytes()))
        })
    }

    fn cached(&self) -> Option<String> {
        let t = self.token.lock().ok()?;
        t.as_ref()
            .filter(|t| Instant::now() < t.refresh_at)
            .map(|t| t.value.clone())
    }

    /// A valid token: cached, or fetched by one caller while the others wait for it.
    async fn token(&self) -> Result<String, ConnectorError> {
        if let Some(t) = self.cached() {
            return Ok(t);
        }
        let _one = self.refreshing.lock().await;
        if let Some(t) = self.cached() {
            return Ok(t);
        }
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", self.cfg.app_id.as_str()),
            ("client_secret", self.cfg.app_password.as_str()),
            ("scope", self.cfg.scope.as_str()),
        ];
        let resp = self
            .http
            .post(&self.cfg.token_url)
            .form(&form)
            .send()
            .await
            .map_err(|e| ConnectorError::Token(e.without_url().to_string()))?;
        let status = resp.status();
        if !status.is_success() {
            metrics::counter!("fedrelay_teams_token_fetches_total", "result" => "error")
                .increment(1);
            return Err(ConnectorError::Token(format!("HTTP {}", status.as_u16())));
        }
        let answer: TokenAnswer = resp
            .json()
            .await
            .map_err(|_| ConnectorError::Token("unreadable answer".into()))?;
        metrics::counter!("fedrelay_teams_token_fetches_total", "result" => "ok").increment(1);
        let life = Duration::from_secs(answer.expires_in.unwrap_or(3600));
        // Refresh five minutes early; a short-lived token at half its life.
        let early = if life > Duration::from_secs(600) {
            life - Duration::from_secs(300)
        } else {
            life / 2
        };
        if let Ok(mut t) = self.token.lock() {
            *t = Some(Token {
                value: answer.access_token.clone(),
                refresh_at: Instant::now() + early,
            });
        }
        Ok(answer.access_token)
    }

    fn drop_token(&self, value: &str) {
        if let Ok(mut t) = self.token.lock()
            && t.as_ref().is_some_and(|t| t.value == value)
        {
            *t = None;
        }
    }

    /// One REST call with retries; `pace` names the conversation and tenant to pace sends by.
    async fn call(
        &self,
        method: reqwest::Method,
        service_url: &str,
        path: &str,
        body: Option<&Value>,
        pace: Option<(&str, &str)>,
    ) -> Result<Value, ConnectorError> {
        if !self.allowed(service_url) {
            return Err(ConnectorError::ForbiddenHost);
        }
        let url = format!("{}/{}", service_url.trim_end_matches('/'), path);
        let mut attempt = 0;
        loop {
            attempt += 1;
            // The token first: fetching one must not hold a request back past its slot.
            let token = self.token().await?;
            if let Some((conversation, tenant)) = pace {
                let at = self.pacer.reserve(conversation, tenant);
                tokio::time::sleep_until(at.into()).await;
            }
            let mut req = self.http.request(method.clone(), &url).bearer_auth(&token);
            if let Some(b) = body {
                req = req.json(b);
            }
            let err = match req.send().await {
                Ok(resp) if resp.status().is_success() => {
                    let bytes = resp.bytes().await.unwrap_or_default();
                    return Ok(serde_json::from_slice(&bytes).unwrap_or(Value::Null));
                }
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    if status == 401 {
                        // The token was revoked or expired early: fetch a new one.
                        self.drop_token(&token);
                    }
                    ConnectorError::Status {
                        status,
                        retry_after: retry_after(resp.headers()),
                    }
                }
                Err(e) => ConnectorError::Transport(e.without_url().to_string()),
            };
            metrics::counter!("fedrelay_teams_connector_errors_total", "code" => err.code())
                .increment(1);
            if !err.retryable() || attempt >= ATTEMPTS {
                return Err(err);
            }
            let wait = match err.retry_after() {
                Some(w) if w > MAX_INLINE_WAIT => return Err(err),
                Some(w) => w,
                None => {
                    let base = 200u64 << attempt;
                    Duration::from_millis(base + rand::rng().random_range(0..base))
                }
            };
            debug!(
                code = err.code(),
                wait_ms = wait.as_millis() as u64,
                "retrying a Bot Connector call"
            );
            tokio::time::sleep(wait).await;
        }
    }

    /// Posts an activity to a conversation; returns its id.
    pub async fn send(
        &self,
        service_url: &str,
        conversation: &str,
        tenant: &str,
        activity: &Value,
    ) -> Result<String, ConnectorError> {
        let path = format!("v3/conversations/{}/activities", path_segment(conversation));
        let v = self
            .call(
                reqwest::Method::POST,
                service_url,
                &path,
                Some(activity),
                Some((conversation, tenant)),
            )
            .await?;
        v.get("id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or(ConnectorError::Body)
    }

    pub async fn update(
        &self,
        service_url: &str,
        conversation: &str,
        tenant: &str,
        activity_id: &str,
        activity: &Value,
    ) -> Result<(), ConnectorError> {
        let at = (service_url, conversation, tenant);
        self.on_activity(reqwest::Method::PUT, at, activity_id, Some(activity))
            .await
    }

    pub async fn delete(
        &self,
        service_url: &str,
        conversation: &str,
        tenant: &str,
        activity_id: &str,
    ) -> Result<(), ConnectorError> {
        let at = (service_url, conversation, tenant);
        self.on_activity(reqwest::Method::DELETE, at, activity_id, None)
            .await
    }

    /// A call on one posted activity; `at` is (service URL, conversation, tenant).
    async fn on_activity(
        &self,
        method: reqwest::Method,
        at: (&str, &str, &str),
        activity_id: &str,
        body: Option<&Value>,
    ) -> Result<(), ConnectorError> {
        let (service_url, conversation, tenant) = at;
        let path = format!(
            "v3/conversations/{}/activities/{}",
            path_segment(conversation),
            path_segment(activity_id)
        );
        self.call(
            method,
            service_url,
            &path,
            body,
            Some((conversation, tenant)),
        )
        .await
        .map(|_| ())
    }

    /// One member of a conversation: `userPrincipalName`, `email`, `name`, `aadObjectId`.
    pub async fn member(
        &self,
        service_url: &str,
        conversation: &str,
        member_id: &str,
    ) -> Result<Value, ConnectorError> {
        let path = format!(
            "v3/conversations/{}/members/{}",
            path_segment(conversation),
            path_segment(member_id)
        );
        self.call(reqwest::Method::GET, service_url, &path, None, None)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacing_keeps_within_every_window() {
        let p = Pacer::default();
        let start = Instant::now();
        let slots: Vec<Instant> = (0..20).map(|_| p.reserve("c", "t")).collect();
        // 7 in the first second, then the 2-second window allows 8 in 2 s.
        for (i, s) in slots.iter().enumerate() {
            for (window, max) in PER_CONVERSATION {
                let in_window = slots
                    .iter()
                    .filter(|t| **t <= *s && s.duration_since(**t) < *window)
                    .count();
                assert!(in_window <= *max, "slot {i}: {in_window} in {window:?}");
            }
        }
        assert!(slots[6].duration_since(start) < Duration::from_millis(50));
        assert!(slots[7].duration_since(start) >= Duration::from_secs(1));
        // Another conversation is not held back.
        assert!(p.reserve("d", "t2").duration_since(start) < Duration::from_millis(50));
        // A tenant's 50 per second hold across its conversations.
        let spread: Vec<Instant> = (0..60).map(|i| p.reserve(&format!("c{i}"), "t3")).collect();
        assert!(spread[49].duration_since(start) < Duration::from_millis(50));
        assert!(spread[50].duration_since(start) >= Duration::from_secs(1));
    }

    #[test]
    fn only_allowed_hosts_and_escaped_paths() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let c = Connector::new(
            ConnectorConfig {
                app_id: "a".into(),
                app_password: "p".into(),
                token_url: "https://t.example/".into(),
                scope: "s".into(),
                service_url_prefixes: vec!["https://smba.trafficmanager.net/".into()],
            },
            reqwest::Client::new(),
        );
        assert!(c.allowed("https://smba.trafficmanager.net/amer/"));
        assert!(!c.allowed("https://smba.trafficmanager.net.evil.example/"));
        assert!(!c.allowed("http://smba.trafficmanager.net/amer/"));
        assert!(!c.allowed("https://smba.traffic€"));
        assert_eq!(
            path_segment("19:abc@thread.tacv2;messageid=1"),
            "19%3Aabc%40thread.tacv2%3Bmessageid%3D1"
        );
    }
}
