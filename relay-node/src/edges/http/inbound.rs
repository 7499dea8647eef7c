//! Requests from HTTP-edge domains: signed events in, the event stream out.

use super::codec::{self, InboundEvent};
use super::sign::{self, AuthError};
use super::{DomainEntry, Domains};
use crate::config::{Delivery, HttpConfig};
use crate::control::policy::Policy;
use crate::telemetry;
use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use fedrelay_proto::{Address, Envelope};
use serde::Deserialize;
use session_actor::store::Outbox;
use session_actor::{Ingress, MetadataEntry, MetadataSink, SessionError, SessionId};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tracing::{Instrument, Span, debug, field, info_span};

/// Everything the inbound half needs.
pub struct Inbound {
    pub domains: Arc<Domains>,
    pub policy: Arc<Policy>,
    pub ingress: Arc<dyn Ingress>,
    pub outbox: Arc<dyn Outbox>,
    pub metadata: Arc<dyn MetadataSink>,
    pub cfg: HttpConfig,
    /// Flips to `true` on shutdown: event streams end so the server can drain.
    pub shutdown: watch::Receiver<bool>,
}

pub fn router(state: Arc<Inbound>) -> Router {
    Router::new()
        .route("/v1/events", post(post_event))
        .route("/v1/stream", get(stream))
        .route(
            "/openapi.json",
            get(|| async { axum::Json(super::openapi::document()) }),
        )
        .with_state(state)
}

/// A JSON error in the edge's format.
fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    metrics::counter!("fedrelay_http_rejected_total", "reason" => code.to_string()).increment(1);
    let body = serde_json::json!({ "error": code, "message": message.into() });
    (status, axum::Json(body)).into_response()
}

fn unauthorized(e: AuthError) -> Response {
    error(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string())
}

fn now() -> (i64, i64) {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as i64, d.as_millis() as i64)
}

fn header<'a>(h: &'a HeaderMap, name: &'static str) -> Result<&'a str, AuthError> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .ok_or(AuthError::Missing(name))
}

/// Authenticates a request: the domain header names a served domain whose secret signed
/// `payload` at a fresh timestamp.
fn authenticate<'a>(
    s: &'a Inbound,
    h: &HeaderMap,
    payload: &[u8],
) -> Result<&'a DomainEntry, AuthError> {
    let domain = header(h, "x-fedrelay-domain")?.to_ascii_lowercase();
    let ts = header(h, "x-fedrelay-timestamp")?;
    let sig = header(h, "x-fedrelay-signature")?;
    let entry = s.domains.get(&domain).ok_or(AuthError::UnknownDomain)?;
    sign::verify(
        &entry.secret,
        ts,
        sig,
        payload,
        now().0,
        s.cfg.signature_window_secs,
    )?;
    Ok(entry)
}

fn is_json(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"))
}

async fn post_event(State(s): State<Arc<Inbound>>, headers: HeaderMap, body: Body) -> Response {
    let span = info_span!(
        "http.inbound",
        domain = field::Empty,
        kind = field::Empty,
        session_id = field::Empty,
        relay_msg_id = field::Empty,
        seq = field::Empty,
        status = field::Empty,
    );
    telemetry::set_parent_from_headers(&span, &headers);
    let resp = handle_event(&s, headers, body)
        .instrument(span.clone())
        .await;
    span.record("status", resp.status().as_u16());
    resp
}

async fn handle_event(s: &Inbound, headers: HeaderMap, body: Body) -> Response {
    let limit = s.cfg.max_body_bytes;
    if crate::edges::declared_too_large(&headers, limit) {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("body over {limit} bytes"),
        );
    }
    if !is_json(&headers) {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Content-Type must be application/json",
        );
    }
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("body over {limit} bytes"),
            );
        }
    };
    // Nothing unauthenticated is parsed.
    let domain = match authenticate(s, &headers, &bytes) {
        Ok(d) => d,
        Err(e) => return unauthorized(e),
    };
    Span::current().record("domain", domain.name.as_str());
    let event: InboundEvent = match serde_json::from_slice(&bytes) {
        Ok(e) => e,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("invalid event: {e}"),
            );
        }
    };
    if let Err(e) = codec::check_envelope_fields(&event) {
        return error(StatusCode::BAD_REQUEST, "bad_request", e.0);
    }
    if event.kind == codec::EventType::Presence && event.to == "*" {
        return publish_presence(s, domain, event).await;
    }
    let (user, to_domain) = match codec::parse_to(&event.to) {
        Ok(t) => t,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", e.0),
    };
    let (_, now_ms) = now();
    let platform = match s.policy.check(&domain.name, &to_domain) {
        Ok(p) => p,
        Err(e) => {
            metrics::counter!("fedrelay_policy_refusals_total", "reason" => e.code()).increment(1);
            let sender = Address::new("http", domain.name.clone(), event.from.clone());
            let recipient = Address::new("unknown", to_domain.clone(), user.clone());
            s.metadata.record(MetadataEntry {
                at_ms: now_ms,
                session_id: Some(SessionId::one_to_one(&sender, &recipient)),
                relay_msg_id: String::new(),
                sender: format!("{}@{}", event.from, domain.name),
                sender_platform: "http".into(),
                receivers: vec![format!("{user}@{to_domain}")],
                receiver_platform: String::new(),
                category: "error",
                kind: e.code().to_string(),
            });
            return error(StatusCode::FORBIDDEN, "forbidden", e.to_string());
        }
    };
    let recipient = Address::new(platform.as_str(), to_domain, user);
    let env = match codec::to_envelope(event, &domain.name, recipient, now_ms) {
        Ok(env) => env,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", e.0),
    };
    submit(s, env).await
}

/// Hands a built envelope to the ingress and answers the origin: 202 once journaled, the
/// protocol's error otherwise.
async fn submit(s: &Inbound, mut env: Envelope) -> Response {
    env.trace_context = telemetry::current_trace_context();
    let kind = env.body.as_ref().map(|b| b.kind()).unwrap_or("unknown");
    Span::current().record("kind", kind);
    match s.ingress.submit(env).await {
        Ok(acc) => {
            metrics::counter!("fedrelay_messages_in_total", "edge" => "http", "kind" => kind)
                .increment(1);
            let span = Span::current();
            span.record("session_id", field::display(&acc.session_id));
            span.record("relay_msg_id", acc.relay_msg_id.as_str());
            span.record("seq", acc.seq);
            debug!(duplicate = acc.duplicate, "event accepted");
            let body = serde_json::json!({
                "relay_msg_id": acc.relay_msg_id,
                "session_id": acc.session_id.to_hex(),
                "seq": acc.seq,
                "duplicate": acc.duplicate,
            });
            (StatusCode::ACCEPTED, axum::Json(body)).into_response()
        }
        Err(SessionError::Invalid(m)) => error(StatusCode::BAD_REQUEST, "bad_request", m),
        Err(SessionError::NotAllowed(m)) => error(StatusCode::FORBIDDEN, "forbidden", m),
        Err(SessionError::RateLimited(m)) => {
            let mut r = error(StatusCode::TOO_MANY_REQUESTS, "rate_limited", m);
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            r
        }
        Err(SessionError::PendingApproval(id)) => (
            StatusCode::ACCEPTED,
            axum::Json(serde_json::json!({
                "status": "pending_approval",
                "approval_id": id,
            })),
        )
            .into_response(),
        Err(SessionError::UnknownTarget) => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_target",
            "the target message is not known in this conversation",
        ),
        Err(e) => {
            debug!(code = e.code(), "event not journaled");
            let mut r = error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "could not journal the event; retry later",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            r
        }
    }
}

/// `presence` to `"*"`: the sender's presence, published to everyone who follows it (the
/// contacts who accepted, or were accepted by, the sender).
async fn publish_presence(s: &Inbound, domain: &DomainEntry, event: InboundEvent) -> Response {
    let (_, now_ms) = now();
    let me = Address::new("http", domain.name.clone(), event.from.clone());
    let mut env = match codec::to_envelope(event, &domain.name, me, now_ms) {
        Ok(env) => env,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", e.0),
    };
    env.recipients.clear();
    submit(s, env).await
}

#[derive(Deserialize)]
struct StreamQuery {
    after: Option<String>,
}

/// A resume id is `<u64>-<u64>`, as the stream hands them out.
fn valid_event_id(id: &str) -> bool {
    id.split_once('-').is_some_and(|(a, b)| {
        a.parse::<u64>().is_ok()
            && b.parse::<u64>().is_ok()
            && !a.starts_with('+')
            && !b.starts_with('+')
    })
}

/// `GET /v1/stream`: Server-Sent Events of the domain's outbox, resumable by event id.
async fn stream(
    State(s): State<Arc<Inbound>>,
    headers: HeaderMap,
    Query(q): Query<StreamQuery>,
) -> Response {
    let domain = match authenticate(&s, &headers, b"GET /v1/stream") {
        Ok(d) => d.clone(),
        Err(e) => return unauthorized(e),
    };
    if domain.delivery != Delivery::Stream {
        return error(
            StatusCode::CONFLICT,
            "wrong_delivery",
            "this domain receives events by webhook",
        );
    }
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or(q.after);
    let after = match after.as_deref() {
        // `$`: only events from now on.
        Some("$") => match s.outbox.last_id(&domain.name).await {
            Ok(id) => Some(id),
            Err(_) => {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "event store unavailable; retry later",
                );
            }
        },
        Some(a) if !valid_event_id(a) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "Last-Event-ID / after must be an event id from this stream, or $",
            );
        }
        _ => after,
    };
    // A receiver away longer than the retention has missed events: say so, never silently.
    let gap = match after.as_deref() {
        Some(a) => match s.outbox.dropped_after(&domain.name, a).await {
            Ok(true) => Some(a.to_string()),
            Ok(false) => None,
            Err(e) => {
                debug!(error = %e, "could not check the stream for a gap");
                None
            }
        },
        None => None,
    };
    if gap.is_some() {
        metrics::counter!("fedrelay_stream_gaps_total").increment(1);
        s.metadata.record(MetadataEntry {
            at_ms: now().1,
            session_id: None,
            relay_msg_id: String::new(),
            sender: String::new(),
            sender_platform: String::new(),
            receivers: vec![domain.name.clone()],
            receiver_platform: "http".into(),
            category: "error",
            kind: "stream_gap".into(),
        });
    }
    debug!(domain = %domain.name, "event stream opened");
    metrics::gauge!("fedrelay_http_streams_open").increment(1.0);
    let state = StreamState {
        outbox: s.outbox.clone(),
        domain: domain.name,
        after,
        gap,
        shutdown: s.shutdown.clone(),
        _open: OpenStream,
    };
    let events = futures::stream::unfold(state, next_events);
    let flat = futures::StreamExt::flat_map(events, futures::stream::iter);
    Sse::new(flat)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// Counts open streams; decremented when the stream (and its state) is dropped.
struct OpenStream;

impl Drop for OpenStream {
    fn drop(&mut self) {
        metrics::gauge!("fedrelay_http_streams_open").decrement(1.0);
    }
}

struct StreamState {
    outbox: Arc<dyn Outbox>,
    domain: String,
    after: Option<String>,
    /// A resume point retention had passed, announced before anything else.
    gap: Option<String>,
    shutdown: watch::Receiver<bool>,
    _open: OpenStream,
}

/// Waits for the next events after `st.after`: woken by local pushes, polling once a second
/// for pushes made by other nodes; ends on shutdown.
async fn next_events(mut st: StreamState) -> Option<(Vec<Result<Event, Infallible>>, StreamState)> {
    if let Some(after) = st.gap.take() {
        let data = serde_json::json!({
            "type": "gap",
            "after": after,
            "detail": "events after this id were dropped by retention before this receiver resumed; resynchronise",
        });
        let event = Event::default().event("gap").data(data.to_string());
        return Some((vec![Ok(event)], st));
    }
    let notify = st.outbox.notifier(&st.domain);
    loop {
        if *st.shutdown.borrow() {
            return None;
        }
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        match st
            .outbox
            .read_after(&st.domain, st.after.as_deref(), 512)
            .await
        {
            Ok(evs) if !evs.is_empty() => {
                st.after = evs.last().map(|e| e.id.clone());
                let out = evs
                    .into_iter()
                    .map(|e| {
                        Ok(Event::default()
                            .id(e.id)
                            .data(String::from_utf8_lossy(&e.payload)))
                    })
                    .collect();
                return Some((out, st));
            }
            Ok(_) => {}
            Err(e) => {
                debug!(error = %e, "event stream read failed; retrying");
            }
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = st.shutdown.changed() => return None,
        }
    }
}
