//! The management API (`/api/v1/`) on its own listener: the federation policy (domains, rules,
//! groups, user controls) with explain, API tokens, the audit log and the cluster's status.
//!
//! Every request carries a bearer token ([`auth`]); every change is validated whole before it
//! is stored, stored with the version it was based on (a concurrent change gives 409, never a
//! lost update), and audited with who made it. Errors are JSON `{"error", "message"}`.

pub mod auth;
mod preview;

use crate::control::approvals::{ApprovalBook, ApprovalError, Pending};
use crate::control::logstore::LogQuery;
use crate::control::policy::Policy;
use crate::control::policy::model::{
    DomainPolicy, Group, Kind, PolicyDoc, Rule, Side, UserControl,
};
use crate::control::policy::store::{AuditEntry, PolicyStore, StoreError, TokenRecord};
use auth::{Authenticator, Principal, Role};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;

/// An API error: an HTTP status and a JSON body saying what went wrong.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn unauthorized(m: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", m)
    }

    pub fn forbidden(m: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", m)
    }

    pub fn bad_request(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", m)
    }

    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", m)
    }

    pub fn unavailable(m: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", m)
    }

    fn invalid(m: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_policy", m)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict { .. } => {
                Self::new(StatusCode::CONFLICT, "conflict", e.to_string())
            }
            StoreError::Unavailable(_) => Self::unavailable(e.to_string()),
            StoreError::Corrupt(_) => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "store_corrupt",
                e.to_string(),
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        metrics::counter!("fedrelay_api_errors_total", "code" => self.code).increment(1);
        let mut r = (
            self.status,
            Json(json!({ "error": self.code, "message": self.message })),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

type ApiResult<T = Response> = Result<T, ApiError>;

/// Pseudonymises an address in the metadata log.
pub type ForgetLog =
    Arc<dyn Fn(String) -> futures::future::BoxFuture<'static, Result<u64, String>> + Send + Sync>;

/// What the handlers share.
pub struct ApiState {
    pub policy: Arc<Policy>,
    pub store: Arc<dyn PolicyStore>,
    pub approvals: Arc<ApprovalBook>,
    /// The Teams edge, for its users' profiles and contacts.
    pub teams: Option<Arc<crate::edges::teams::TeamsEdge>>,
    /// Pseudonymises an address in the metadata log; the number of entries rewritten.
    pub forget_log: Option<ForgetLog>,
    /// Usage counters, for reports.
    pub usage: crate::control::usage::UsageStore,
    /// The metadata log, for queries and exports.
    pub log: crate::control::logstore::LogReader,
    pub auth: Authenticator,
    /// The cluster view, as the admin listener's `/cluster` gives it.
    pub cluster: Arc<dyn Fn() -> futures::future::BoxFuture<'static, Value> + Send + Sync>,
}

/// The API's routes.
pub fn router(state: Arc<ApiState>, extra: Router<Arc<ApiState>>) -> Router {
    let authed = Router::new()
        .route("/api/v1/whoami", get(whoami))
        .route("/api/v1/policy", get(get_policy).put(put_policy))
        .route("/api/v1/policy/export", get(export_policy))
        .route("/api/v1/domains", get(list_domains))
        .route(
            "/api/v1/domains/{name}",
            get(get_domain).put(put_domain).delete(delete_domain),
        )
        .route("/api/v1/rules", get(list_rules))
        .route(
            "/api/v1/rules/{id}",
            get(get_rule).put(put_rule).delete(delete_rule),
        )
        .route("/api/v1/groups", get(list_groups))
        .route("/api/v1/groups/{name}", put(put_group).delete(delete_group))
        .route("/api/v1/controls", get(list_controls))
        .route(
            "/api/v1/controls/{id}",
            put(put_control).delete(delete_control),
        )
        .route("/api/v1/explain", get(explain_get).post(explain_post))
        .route("/api/v1/audit", get(audit_log))
        .route("/api/v1/cluster", get(cluster_status))
        .route("/api/v1/tokens", get(list_tokens).post(create_token))
        .route("/api/v1/tokens/{id}", axum::routing::delete(revoke_token))
        .route(
            "/api/v1/policy/preview",
            axum::routing::post(preview::preview),
        )
        .route("/api/v1/users", get(list_users))
        .route("/api/v1/users/{address}", get(get_user))
        .route(
            "/api/v1/users/{address}/forget",
            axum::routing::post(forget_user),
        )
        .route("/api/v1/log", get(log_query))
        .route("/api/v1/log/export", get(log_export))
        .route("/api/v1/usage", get(usage_report))
        .route("/api/v1/usage/today", get(usage_today))
        .route("/api/v1/approvals", get(list_approvals))
        .route(
            "/api/v1/approvals/{id}/approve",
            axum::routing::post(approve),
        )
        .route(
            "/api/v1/approvals/{id}/decline",
            axum::routing::post(decline),
        )
        .merge(extra)
        .layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .route("/api/v1/openapi.json", get(openapi))
        .merge(authed)
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .layer(middleware::from_fn(security_headers))
        .with_state(state)
}

async fn authenticate(State(s): State<Arc<ApiState>>, mut req: Request, next: Next) -> Response {
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match s.auth.authenticate(auth).await {
        Ok(p) => {
            req.extensions_mut().insert(p);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

async fn security_headers(req: Request, next: Next) -> Response {
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

const OPENAPI: &str = include_str!("openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn whoami(Extension(p): Extension<Principal>) -> Json<Principal> {
    Json(p)
}

// === the policy as a whole ===

/// The policy a domain admin sees: every domain (to name them in rules), and the rules,
/// groups and controls of its own domains.
fn visible(p: &Principal, doc: &PolicyDoc) -> PolicyDoc {
    if p.role == Role::Admin {
        return doc.clone();
    }
    PolicyDoc {
        domains: doc.domains.clone(),
        groups: doc
            .groups
            .iter()
            .filter(|g| owns_group(p, g))
            .cloned()
            .collect(),
        rules: doc
            .rules
            .iter()
            .filter(|r| owns_rule(p, doc, r))
            .cloned()
            .collect(),
        users: doc
            .users
            .iter()
            .filter(|u| owns_control(p, doc, u))
            .cloned()
            .collect(),
    }
}

fn domain_of(address: &str) -> &str {
    address.rsplit_once('@').map_or(address, |(_, d)| d)
}

/// A domain admin's rule: one side is its domain, the other is not someone else's internal
/// domain.
fn owns_rule(p: &Principal, doc: &PolicyDoc, r: &Rule) -> bool {
    if p.role == Role::Admin {
        return true;
    }
    let internal = |d: &str| {
        doc.domains
            .iter()
            .any(|x| x.name == d && x.side == Side::Internal)
    };
    let [a, b] = &r.between;
    (p.owns_domain(a) && (b == "*" || !internal(b) || p.owns_domain(b)))
        || (p.owns_domain(b) && (a == "*" || !internal(a) || p.owns_domain(a)))
}

fn owns_group(p: &Principal, g: &Group) -> bool {
    !g.members.is_empty() && g.members.iter().all(|m| p.owns_domain(domain_of(m)))
}

fn owns_control(p: &Principal, doc: &PolicyDoc, u: &UserControl) -> bool {
    u.who.iter().all(|w| match w.strip_prefix("group:") {
        Some(g) => doc
            .groups
            .iter()
            .find(|x| x.name == g)
            .is_some_and(|g| owns_group(p, g)),
        None => p.owns_domain(domain_of(w)),
    })
}

async fn get_policy(
    State(s): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
) -> ApiResult {
    p.require(&[Role::Admin, Role::DomainAdmin])?;
    let c = s.policy.current();
    let mut r = Json(json!({
        "version": c.version(),
        "policy": visible(&p, c.doc()),
    }))
    .into_response();
    r.headers_mut().insert(
        header::ETAG,
        HeaderValue::from_str(&format!("\"{}\"", c.version()))
            .unwrap_or(HeaderValue::from_static("\"0\"")),
    );
    Ok(r)
}

#[derive(Deserialize)]
struct ExportQuery {
    #[serde(default)]
    format: Option<String>,
}

async fn export_policy(
    State(s): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
    Query(q): Query<ExportQuery>,
) -> ApiResult {
    p.require(&[Role::Admin])?;
    let c = s.policy.current();
    Ok(match q.format.as_deref().unwrap_or("toml") {
        "toml" => (
            [(header::CONTENT_TYPE, "application/toml")],
            format!(
                "# fedrelay policy, version {}\n{}",
                c.version(),
                c.doc().to_toml()
            ),
        )
            .into_response(),
        "json" => Json(c.doc().clone()).into_response(),
        other => {
            return Err(ApiError::bad_request(format!(
                "unknown format `{other}`: toml or json"
            )));
        }
    })
}

#[derive(Deserialize)]
struct PutPolicyQuery {
    #[serde(default)]
    dry_run: bool,
}

/// The version an `If-Match` header names.
fn if_match(headers: &HeaderMap) -> ApiResult<Option<u64>> {
    match headers.get(header::IF_MATCH) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .map(|s| s.trim().trim_matches('"'))
            .and_then(|s| s.parse().ok())
            .map(Some)
            .ok_or_else(|| ApiError::bad_request("If-Match must be a policy version, e.g. \"42\"")),
    }
}

/// `PUT /api/v1/policy`: replaces the whole policy (admin). The body is the policy as JSON, or
/// TOML with `Content-Type: application/toml`. `?dry_run=true` validates and shows the changes
/// without storing anything.
async fn put_policy(
    State(s): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
    Query(q): Query<PutPolicyQuery>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult {
    p.require(&[Role::Admin])?;
    let text =
        std::str::from_utf8(&body).map_err(|_| ApiError::bad_request("the body is not UTF-8"))?;
    let is_toml = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.contains("toml"));
    let doc = if is_toml {
        toml::from_str::<PolicyDoc>(text).map_err(|e| ApiError::invalid(e.message().to_string()))?
    } else {
        serde_json::from_str::<PolicyDoc>(text).map_err(|e| ApiError::invalid(e.to_string()))?
    }
    .normalized();
    doc.validate()
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    let expected = if_match(&headers)?;
    if q.dry_run {
        let current = s.policy.current();
        let changes = current.doc().diff(&doc);
        return Ok(Json(json!({
            "dry_run": true,
            "valid": true,
            "base_version": current.version(),
            "changes": changes,
        }))
        .into_response());
    }
    let action = if headers.contains_key("x-fedrelay-import") {
        "policy.import"
    } else {
        "policy.update"
    };
    let (version, changes) = commit(&s, &p, action, expected, |d| {
        *d = doc.clone();
        Ok(())
    })
    .await?;
    Ok(Json(json!({ "version": version, "changes": changes })).into_response())
}

/// Reads the stored policy, changes it with `f`, validates and stores it based on the version
/// read (retrying a few times when someone else wrote in between, unless the caller named
/// the version with If-Match), audits it, and applies it here at once.
async fn commit(
    s: &ApiState,
    p: &Principal,
    action: &str,
    expected: Option<u64>,
    f: impl Fn(&mut PolicyDoc) -> ApiResult<()>,
) -> ApiResult<(u64, Vec<crate::control::policy::model::Change>)> {
    for _ in 0..5 {
        let (old, version) = s
            .store
            .load()
            .await?
            .unwrap_or_else(|| (PolicyDoc::default(), 0));
        if let Some(e) = expected
            && e != version
        {
            return Err(ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                "version_mismatch",
                format!("the policy is at version {version}, not {e}; reload and retry"),
            ));
        }
        let mut doc = old.clone();
        f(&mut doc)?;
        let doc = doc.normalized();
        doc.validate()
            .map_err(|e| ApiError::invalid(e.to_string()))?;
        let changes = old.diff(&doc);
        if changes.is_empty() {
            return Ok((version, changes));
        }
        let audit = AuditEntry {
            at_ms: crate::edges::now_ms(),
            who: p.name.clone(),
            action: action.into(),
            changes: changes.clone(),
            detail: None,
            version: None,
        };
        match s.store.save(&doc, Some(version), audit).await {
            Ok(v) => {
                s.policy.apply(doc, v);
                return Ok((v, changes));
            }
            Err(StoreError::Conflict { .. }) if expected.is_none() => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::new(
        StatusCode::CONFLICT,
        "conflict",
        "the policy kept changing underneath this request; retry",
    ))
}

fn changed(version: u64, changes: Vec<crate::control::policy::model::Change>) -> Response {
    Json(json!({ "version": version, "changes": changes })).into_response()
}

// === domains ===

async fn list_domains(
    State(s): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
) -> ApiResult {
    p.require(&[Role::Admin, Role::DomainAdmin])?;
    Ok(Json(s.policy.current().doc().domains.clone()).into_response())
}

async fn get_domain(
    State(s): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult {
    p.require(&[Role::Admin, Role::DomainAdmin])?;
    let name = name.to_ascii_lowercase();
    s.policy
        .current()
        .doc()
        .domains
        .iter()
        .find(|d| d.name == name)
        .map(|d| Json(d.clone()).into_response())
        .ok_or_else(|| ApiError::not_found(format!("no domain {name}")))
}

/// `PUT /api/v1/domains/{name}` (admin): declares or changes a domain.
async fn put_domain(
    State(s): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult {
    p.require(&[Role::Admin])?;
    let mut d: DomainPolicy = json_body(&body)?;
    let name = name.to_ascii_lowercase();
    if d.name.to_ascii_lowercase() != name {
        d.name = name.clone();
    }
    let (v, c) = commit(&s, &p, "domain.put", if_match(&headers)?, |doc| {
        set_domain(doc, d.clone());
        Ok(())
    })
    .await?;
    Ok(changed(v, c))
}

/// `DELETE /api/v1/domains/{name}` (admin). Refused while a rule, group or control names it.
async fn delete_domain(
    State(s): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    p.require(&[Role::Admin])?;
    let name = name.to_ascii_lowercase();
    let (v, c) = commit(&s, &p, "domain.delete", if_match(&headers)?, |doc| {
        remove_domain(doc, &name)
    })
    .await?;
    Ok(changed(v, c))
}

fn set_domain(doc: &mut PolicyDoc, d: DomainPolicy) {
    match doc.domains.iter_mut().find(|x| x.name == d.name) {
        Some(x) => *x = d,
        None => doc.domains.push(d),
    }
}

fn remove_domain(doc: &mut PolicyDoc, name: &str) -> ApiResult<()> {
    let before = doc.domains.len();
    doc.domains.retain(|x| x.name != name);
    if doc.domains.len() == before {
        return Err(ApiError::not_found(format!("no domain {name}")));
    }
    Ok(())
}

fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

// === rules ===

async fn list_rules(
    State(s): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
) -> ApiResult {
    p.require(&[Role::Admin, Role::DomainAdmin])?;
    let c = s.policy.current();
    Ok(Json(visible(&p, c.doc()).rules).into_response())
}

async fn get_rule(
    State(s): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult {
    p.require(&[Role::Admin, Role::DomainAdmin])?;
    let c = s.policy.current();
    visible(&p, c.doc())
        .rules
        .into_iter()
        .find(|r| r.id == id)
        .map(|r| Json(r).into_response())
        .ok_or_else(|| ApiError::not_found(format!("no rule {id}")))
}

/// `PUT /api/v1/rules/{id}`: creates or replaces a rule; a domain admin only for its domains.
async fn put_rule(
    State(s): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult {
    p.require(&[Role::Admin, Role::DomainAdmin])?;
    let mut rule: Rule = json_body(&body)?;
    rule.id = id.clone();
    rule.between = rule.between.map(|d| d.to_ascii_lowercase());
    let (v, c) = commit(&s, &p, "rule.put", if_match(&headers)?, |doc| {
        set_rule(&p, doc, rule.clone())
    })
    .await?;
    Ok(changed(v, c))
}

/// Creates or replaces `rule` (by its id) in `doc`, when the caller may write it.
fn set_rule(p: &Principal, doc: &mut PolicyDoc, rule: Rule) -> ApiResult<()> {
    if !owns_rule(p, doc, &rule) {
        return Err(ApiError::forbidden(
            "a domain admin may only write rules of its own domains",
        ));
    }
    let pos = doc.rules.iter().position(|x| x.id == rule.id);
    if let Some(i) = pos
        && !owns_rule(p, doc, &doc.rules[i])
    {
        return Err(ApiError::forbidden(format!(
            "rule {} belongs to other domains",
            rule.id
        )));
    }
    match pos {
        Some(i) => doc.rules[i] = rule,
        None => doc.rules.push(rule),
    }
    Ok(())
}

async fn delete_rule(
    State(s): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    p.require(&[Role::Admin, Role::DomainAdmin])?;
    let (v, c) = commit(&s, &p, "rule.delete", if_match(&headers)?, |doc| {
        remove_owned(doc, &p, "rule", &id, |d| &mut d.rules, |r| &r.id, owns_rule)
    })
    .await?;
    Ok(changed(v, c))
}

/// Removes item `id` from one list of the policy (`what` names it in errors), when the caller
/// owns it.
fn remove_owned<T>(
    doc: &mut PolicyDoc,
    p: &Principal,
    what: &str,
    id: &str,
    list: fn(&mut PolicyDoc) -> &mut Vec<T>,
    key: fn(&T) -> &str,
    owned: fn(&Principal, &PolicyDoc, &T) -> bool,
) -> ApiResult<()> {
    let i = list(doc)
        .iter()
        .position(|x| key(x) == id)
        .ok_or_else(|| ApiError::not_found(format!("no {what} {id}")))?;
    let item = list(doc).remove(i);
    if !owned(p, doc, &item) {
        return Err(ApiError::forbidden(format!(
            "{what} {id} concerns other domains"
        )));
    }
    Ok(())
}

// === groups and user controls ===

async fn list_groups(
    State(s): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
) -> ApiResult {
    p.require(&[Role::Admin, Role::DomainAdmin])?;
    let c = s.policy.current();
    Ok(Json(visible(&p, c.doc()).groups).into_response())
}

async fn put_group(
    State(s): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult {
    p.require(&[Role::Admin, Role::DomainAdmin])?;
    let mut g: Group = json_body(&body)?;
    g.name = name.clone();
    g.members
        .iter_mut()
        .for_each(|m| *m = m.trim().to_ascii_lowercase());
    let (v, c) = commit(&s, &p, "group.put", if_match(&headers)?, |doc| {
        if !owns_group(&p, &g) {
            return Err(ApiError::forbidden(
                "a domain admin may only list users of its own domains",
            ));
        }
        match doc.groups.iter_mut().find(|x| x.name == name) {
            Some(x) => {
                if !owns_group(&p, x) {
                    return Err(ApiError::forbidden(format!(
                        "group {name} has users of other domains"
                    )));
                }
                *x = g.clone();
            }
            None => doc.groups.push(g.clone()),
        }
        Ok(())
    })
    .await?;
    Ok(changed(v, c))
}

async fn delete_group(
    State(s): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    p.require(&[Role::Admin, Role::DomainAdmin])?;
    let (v, c) = commit(&s, &p, "group.delete", if_match(&headers)?, |doc| {
        remove_owned(
            doc,
            &p,
            "group",
            &name,
            |d| &mut d.groups,
            |g| &g.name,
            |p, _, g| owns_group(p, g),
        )
    })
    .await?;
    Ok(changed(v, c))
}

async fn list_controls(
    State(s): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
) -> ApiResult {
    p.require(&[Role::Admin, Role::DomainAdmin])?;
    let c = s.policy.current();
    Ok(Json(visible(&p, c.doc()).users).into_response())
}

async fn put_control(
    State(s): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult {
    p.require(&[Role::Admin, Role::DomainAdmin])?;
    let mut u: UserControl = json_body(&body)?;
    u.id = id.clone();
    let (v, c) = commit(&s, &p, "control.put", if_match(&headers)?, |doc| {
        let u = UserControl {
            who: u
                .who
                .iter()
                .map(|w| w.trim().to_ascii_lowercase())
                .collect(),
            ..u.clone()
        };
        if !owns_control(&p, doc, &u) {
            return Err(ApiError::forbidden(
                "a domain admin may only control users of its own domains",
            ));
        }
        let pos = doc.users.iter().position(|x| x.id == id);
        if let Some(i) = pos
            && !owns_control(&p, doc, &doc.users[i])
        {
            return Err(ApiError::forbidden(format!(
                "control {id} covers users of other domains"
            )));
        }
        match pos {
            Some(i) => doc.users[i] = u,
            None => doc.users.push(u),
        }
        Ok(())
    })
    .await?;
    Ok(changed(v, c))
}

async fn delete_control(
    State(s): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    p.require(&[Role::Admin, Role::DomainAdmin])?;
    let (v, c) = commit(&s, &p, "control.delete", if_match(&headers)?, |doc| {
        remove_owned(
            doc,
            &p,
            "control",
            &id,
            |d| &mut d.users,
            |u| &u.id,
            owns_control,
        )
    })
    .await?;
    Ok(changed(v, c))
}

// === explain ===

#[derive(Deserialize)]
struct ExplainQuery {
    from: String,
    to: String,
    #[serde(default)]
    kind: Option<String>,
}

async fn explain_get(
    State(s): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
    Query(q): Query<ExplainQuery>,
) -> ApiResult {
    explain(&s, &p, q)
}

async fn explain_post(
    State(s): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
    body: axum::body::Bytes,
) -> ApiResult {
    explain(&s, &p, json_body(&body)?)
}

/// Allowed or not, and which rule decided, for (from, to, kind).
fn explain(s: &ApiState, p: &Principal, q: ExplainQuery) -> ApiResult {
    p.require(&[Role::Admin, Role::DomainAdmin])?;
    let kind = match q.kind.as_deref() {
        None => Kind::Im,
        Some(k) => Kind::parse(k).ok_or_else(|| {
            ApiError::bad_request(format!(
                "unknown kind `{k}`: im, presence, typing, files, invites or contacts"
            ))
        })?,
    };
    for a in [&q.from, &q.to] {
        if !a.contains('@') {
            return Err(ApiError::bad_request(format!(
                "`{a}` is not a user@domain address"
            )));
        }
    }
    if p.role == Role::DomainAdmin
        && !p.owns_domain(&domain_of(&q.from).to_ascii_lowercase())
        && !p.owns_domain(&domain_of(&q.to).to_ascii_lowercase())
    {
        return Err(ApiError::forbidden(
            "a domain admin may only explain traffic of its own domains",
        ));
    }
    let e = s
        .policy
        .explain(&q.from, &q.to, kind)
        .ok_or_else(|| ApiError::bad_request("addresses must be user@domain"))?;
    Ok(Json(e).into_response())
}

// === audit, cluster ===

#[derive(Deserialize)]
struct AuditQuery {
    #[serde(default)]
    since: Option<i64>,
    #[serde(default)]
    limit: Option<usize>,
}

async fn audit_log(
    State(s): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
    Query(q): Query<AuditQuery>,
) -> ApiResult {
    p.require(&[Role::Admin, Role::Auditor])?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let entries = s.store.audit_log(q.since.unwrap_or(0), limit).await?;
    Ok(Json(json!({ "entries": entries })).into_response())
}

async fn cluster_status(
    State(s): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
) -> ApiResult {
    p.require(&[Role::Admin, Role::Auditor])?;
    let mut v = (s.cluster)().await;
    if let Some(o) = v.as_object_mut() {
        o.insert("policy_version".into(), json!(s.policy.current().version()));
    }
    Ok(Json(v).into_response())
}

// === tokens ===

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    name: String,
    role: String,
    #[serde(default)]
    domains: Vec<String>,
    /// Days until it expires; 90 when neither this nor `expires_at_ms` is given; at most 3650.
    #[serde(default)]
    expires_in_days: Option<u32>,
    /// When it expires (Unix ms), instead of `expires_in_days`: in the future, within 3650 days.
    #[serde(default)]
    expires_at_ms: Option<i64>,
}

fn public(t: &TokenRecord) -> Value {
    json!({
        "id": t.id,
        "name": t.name,
        "role": t.role,
        "domains": t.domains,
        "created_at_ms": t.created_at_ms,
        "created_by": t.created_by,
        "expires_at_ms": t.expires_at_ms,
        "revoked_at_ms": t.revoked_at_ms,
    })
}

/// `POST /api/v1/tokens` (admin): a new API token, shown in this answer only.
async fn create_token(
    State(s): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
    body: axum::body::Bytes,
) -> ApiResult {
    p.require(&[Role::Admin])?;
    let req: NewToken = json_body(&body)?;
    let name = req.name.trim();
    if name.is_empty() || name.len() > 100 || name.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "`name` must be 1-100 printable characters",
        ));
    }
    let role = Role::parse(&req.role)
        .ok_or_else(|| ApiError::bad_request("`role` must be admin, auditor or domain-admin"))?;
    let domains: Vec<String> = req
        .domains
        .iter()
        .map(|d| d.trim().to_ascii_lowercase())
        .collect();
    let policy = s.policy.current();
    match role {
        Role::DomainAdmin => {
            if domains.is_empty() {
                return Err(ApiError::bad_request(
                    "a domain-admin token needs `domains`",
                ));
            }
            for d in &domains {
                if policy.side_of(d) != Some(Side::Internal) {
                    return Err(ApiError::bad_request(format!(
                        "{d} is not an internal domain of the policy"
                    )));
                }
            }
        }
        _ if !domains.is_empty() => {
            return Err(ApiError::bad_request(
                "only domain-admin tokens have `domains`",
            ));
        }
        _ => {}
    }
    let now = crate::edges::now_ms();
    let max = now + 3650 * 86_400_000;
    let expires_at_ms = match (req.expires_in_days, req.expires_at_ms) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "give `expires_in_days` or `expires_at_ms`, not both",
            ));
        }
        (None, Some(at)) if at > now && at <= max => at,
        (None, Some(_)) => {
            return Err(ApiError::bad_request(
                "`expires_at_ms` must be in the future and within 3650 days",
            ));
        }
        (days, None) => {
            let days = days.unwrap_or(90);
            if days == 0 || days > 3650 {
                return Err(ApiError::bad_request("`expires_in_days` must be 1-3650"));
            }
            now + i64::from(days) * 86_400_000
        }
    };
    let (token, id, hash) = auth::new_token();
    let rec = TokenRecord {
        id,
        name: name.to_string(),
        role: role.as_str().to_string(),
        domains,
        created_at_ms: now,
        created_by: p.name.clone(),
        expires_at_ms: Some(expires_at_ms),
        revoked_at_ms: None,
        secret_sha256: hash,
    };
    s.store.put_token(&rec).await?;
    s.store
        .audit(AuditEntry {
            at_ms: now,
            who: p.name.clone(),
            action: "token.create".into(),
            changes: Vec::new(),
            detail: Some(format!("token {} ({}) for {}", rec.id, rec.role, rec.name)),
            version: None,
        })
        .await?;
    let mut v = public(&rec);
    v["token"] = json!(token);
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

async fn list_tokens(
    State(s): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
) -> ApiResult {
    p.require(&[Role::Admin])?;
    let tokens = s.store.list_tokens().await?;
    Ok(Json(tokens.iter().map(public).collect::<Vec<_>>()).into_response())
}

async fn revoke_token(
    State(s): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult {
    p.require(&[Role::Admin])?;
    let mut rec = s
        .store
        .get_token(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no token {id}")))?;
    let now = crate::edges::now_ms();
    if rec.revoked_at_ms.is_none() {
        rec.revoked_at_ms = Some(now);
        s.store.put_token(&rec).await?;
        s.store
            .audit(AuditEntry {
                at_ms: now,
                who: p.name.clone(),
                action: "token.revoke".into(),
                changes: Vec::new(),
                detail: Some(format!("token {} ({}) of {}", rec.id, rec.role, rec.name)),
                version: None,
            })
            .await?;
    }
    Ok(Json(public(&rec)).into_response())
}

// === approvals ===

impl From<ApprovalError> for ApiError {
    fn from(e: ApprovalError) -> Self {
        match &e {
            ApprovalError::NotFound(_) => ApiError::not_found(e.to_string()),
            ApprovalError::Decided(_) => {
                ApiError::new(StatusCode::CONFLICT, "decided", e.to_string())
            }
            ApprovalError::Unavailable(_) => ApiError::unavailable(e.to_string()),
            ApprovalError::Relay(se) if se.is_retryable() => ApiError::unavailable(e.to_string()),
            ApprovalError::Relay(_) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "not_relayed",
                e.to_string(),
            ),
        }
    }
}

/// Whether a pending request concerns one of the caller's domains.
fn owns_pending(p: &Principal, r: &Pending) -> bool {
    p.owns_domain(domain_of(&r.from)) || p.owns_domain(domain_of(&r.to))
}

async fn list_approvals(
    State(s): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
) -> ApiResult {
    p.require(&[Role::Admin, Role::DomainAdmin])?;
    let list: Vec<Pending> = s
        .approvals
        .list()
        .await?
        .into_iter()
        .filter(|r| owns_pending(&p, r))
        .collect();
    Ok(Json(json!({ "pending": list })).into_response())
}

async fn decide_approval(s: &ApiState, p: &Principal, id: &str, approve: bool) -> ApiResult {
    p.require(&[Role::Admin, Role::DomainAdmin])?;
    let pending = s.approvals.get(id).await?;
    if !owns_pending(p, &pending) {
        return Err(ApiError::forbidden(
            "the request concerns none of your domains",
        ));
    }
    let (action, pending, relay_msg_id) = if approve {
        let (pending, acc) = s.approvals.approve(id).await?;
        ("approval.approve", pending, Some(acc.relay_msg_id))
    } else {
        ("approval.decline", s.approvals.decline(id).await?, None)
    };
    s.store
        .audit(AuditEntry {
            at_ms: crate::edges::now_ms(),
            who: p.name.clone(),
            action: action.into(),
            changes: Vec::new(),
            detail: Some(format!(
                "contact request {} from {} to {}",
                pending.id, pending.from, pending.to
            )),
            version: None,
        })
        .await?;
    Ok(Json(json!({
        "id": pending.id,
        "decision": if approve { "approved" } else { "declined" },
        "relay_msg_id": relay_msg_id,
    }))
    .into_response())
}

async fn approve(
    State(s): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult {
    decide_approval(&s, &p, &id, true).await
}

async fn decline(
    State(s): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult {
    decide_approval(&s, &p, &id, false).await
}

// === users ===

/// `user@domain`, lower case, split.
fn split_user(address: &str) -> ApiResult<(String, String)> {
    let a = address.trim().to_ascii_lowercase();
    match a.rsplit_once('@') {
        Some((u, d)) if !u.is_empty() && !d.is_empty() => Ok((u.to_string(), d.to_string())),
        _ => Err(ApiError::bad_request(format!(
            "`{address}` is not a user@domain address"
        ))),
    }
}

#[derive(Deserialize)]
struct UsersQuery {
    domain: String,
}

/// `GET /api/v1/users?domain=`: the users the relay knows in an internal domain (the Teams
/// users who have talked to its bot; the relay keeps no directory of other platforms' users).
async fn list_users(
    State(s): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
    Query(q): Query<UsersQuery>,
) -> ApiResult {
    p.require(&[Role::Admin, Role::DomainAdmin])?;
    let domain = q.domain.trim().to_ascii_lowercase();
    if !p.owns_domain(&domain) {
        return Err(ApiError::forbidden(format!(
            "{domain} is not one of your domains"
        )));
    }
    let policy = s.policy.current();
    let platform = policy
        .platform_of(&domain)
        .ok_or_else(|| ApiError::not_found(format!("{domain} is not a domain of the policy")))?;
    let mut users = Vec::new();
    if platform == crate::config::Platform::Teams
        && let Some(t) = &s.teams
    {
        users = t
            .state()
            .users(&domain)
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?
            .into_iter()
            .map(|u| format!("{u}@{domain}"))
            .collect();
    }
    Ok(
        Json(json!({ "domain": domain, "platform": platform.as_str(), "users": users }))
            .into_response(),
    )
}

/// `GET /api/v1/users/{address}`: what the relay keeps about a user: a Teams user's profile
/// (the id, name and email the Bot Framework gave) and contacts.
async fn get_user(
    State(s): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
    Path(address): Path<String>,
) -> ApiResult {
    p.require(&[Role::Admin, Role::DomainAdmin])?;
    let (user, domain) = split_user(&address)?;
    if !p.owns_domain(&domain) {
        return Err(ApiError::forbidden(format!(
            "{domain} is not one of your domains"
        )));
    }
    let policy = s.policy.current();
    let platform = policy
        .platform_of(&domain)
        .ok_or_else(|| ApiError::not_found(format!("{domain} is not a domain of the policy")))?;
    let mut out = json!({
        "address": format!("{user}@{domain}"),
        "platform": platform.as_str(),
        "profile": null,
        "contacts": [],
    });
    if platform == crate::config::Platform::Teams
        && let Some(t) = &s.teams
    {
        let st = t.state();
        let unavailable =
            |e: crate::edges::teams::state::StateError| ApiError::unavailable(e.to_string());
        if let Some(u) = st.user(&domain, &user).await.map_err(unavailable)? {
            out["profile"] = json!({"id": u.aad, "name": u.name, "email": u.email});
        }
        let contacts: Vec<Value> = st
            .contacts(&domain, &user)
            .await
            .map_err(unavailable)?
            .into_iter()
            .map(|(a, c)| json!({"address": a, "platform": c.platform, "state": c.state, "name": c.name}))
            .collect();
        out["contacts"] = json!(contacts);
    }
    Ok(Json(out).into_response())
}

/// `POST /api/v1/users/{address}/forget`: erases what the relay keeps about the user and
/// pseudonymises them in the metadata log; audited.
async fn forget_user(
    State(s): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
    Path(address): Path<String>,
) -> ApiResult {
    p.require(&[Role::Admin, Role::DomainAdmin])?;
    let (user, domain) = split_user(&address)?;
    if !p.owns_domain(&domain) {
        return Err(ApiError::forbidden(format!(
            "{domain} is not one of your domains"
        )));
    }
    let address = format!("{user}@{domain}");
    let mut summary = serde_json::Map::new();
    if let Some(t) = &s.teams {
        let f = t
            .state()
            .forget_user(&domain, &user)
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?;
        summary.insert("teams".into(), json!(f));
    }
    if let Some(f) = &s.forget_log {
        let n = f(address.clone()).await.map_err(ApiError::unavailable)?;
        summary.insert("metadata_entries_pseudonymised".into(), json!(n));
    }
    s.store
        .audit(AuditEntry {
            at_ms: crate::edges::now_ms(),
            who: p.name.clone(),
            action: "user.forget".into(),
            changes: Vec::new(),
            detail: Some(format!("forgot {address}")),
            version: None,
        })
        .await?;
    Ok(Json(json!({ "address": address, "summary": summary })).into_response())
}

// === usage ===

#[derive(Deserialize)]
struct UsageQuery {
    /// Months ending with the one of `end` (default 12).
    #[serde(default)]
    months: Option<u32>,
    /// `YYYY-MM-DD`, default today (UTC).
    #[serde(default)]
    end: Option<String>,
    /// `json` (default) or `csv`.
    #[serde(default)]
    format: Option<String>,
}

fn usage_error(e: crate::control::usage::UsageError) -> ApiError {
    use crate::control::usage::UsageError;
    match e {
        UsageError::InvalidDay(_) | UsageError::InvalidRange(_) => {
            ApiError::bad_request(e.to_string())
        }
        _ => ApiError::unavailable(e.to_string()),
    }
}

fn usage_answer(report: crate::control::usage::UsageReport, format: Option<&str>) -> ApiResult {
    match format.unwrap_or("json") {
        "json" => Ok(Json(report).into_response()),
        "csv" => Ok((
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"fedrelay-usage.csv\"",
                ),
            ],
            report.to_csv(),
        )
            .into_response()),
        other => Err(ApiError::bad_request(format!(
            "unknown format `{other}`: json or csv"
        ))),
    }
}

/// `GET /api/v1/usage`: unique users and messages per month over the trailing months, by
/// internal and external domain, platform and type.
async fn usage_report(
    State(s): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
    Query(q): Query<UsageQuery>,
) -> ApiResult {
    p.require(&[Role::Admin, Role::Auditor])?;
    let end = q
        .end
        .clone()
        .unwrap_or_else(|| crate::control::metadata::day_of(crate::edges::now_ms()));
    let months = q.months.unwrap_or(12);
    let report = s.usage.report(&end, months).await.map_err(usage_error)?;
    usage_answer(report, q.format.as_deref())
}

/// `GET /api/v1/usage/today`: today so far (UTC).
async fn usage_today(
    State(s): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
    Query(q): Query<UsageQuery>,
) -> ApiResult {
    p.require(&[Role::Admin, Role::Auditor])?;
    let report = s.usage.today().await.map_err(usage_error)?;
    usage_answer(report, q.format.as_deref())
}

// === the metadata log ===

#[derive(Deserialize)]
struct LogParams {
    /// Unix ms; default 24 hours before `to`.
    #[serde(default)]
    from: Option<i64>,
    /// Unix ms; default now.
    #[serde(default)]
    to: Option<i64>,
    #[serde(default)]
    domain: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default, rename = "type")]
    category: Option<String>,
    #[serde(default)]
    session: Option<String>,
    #[serde(default)]
    cursor: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
    /// Export: `csv` or `ndjson`.
    #[serde(default)]
    format: Option<String>,
}

fn log_error(e: crate::control::logstore::LogError) -> ApiError {
    use crate::control::logstore::LogError;
    match e {
        LogError::Invalid(_) => ApiError::bad_request(e.to_string()),
        _ => ApiError::unavailable(e.to_string()),
    }
}

fn log_query_of(p: LogParams) -> ApiResult<crate::control::logstore::LogQuery> {
    let to = p.to.unwrap_or_else(|| crate::edges::now_ms() + 60_000);
    let from = p.from.unwrap_or(to - 86_400_000);
    crate::control::logstore::LogQuery {
        from_ms: from,
        to_ms: to,
        domain: p.domain,
        user: p.user,
        category: p.category,
        session: p.session,
        cursor: p.cursor,
        limit: p.limit.unwrap_or(100),
    }
    .checked()
    .map_err(log_error)
}

/// `GET /api/v1/log`: one page of the metadata log, oldest first, and the cursor of the next.
async fn log_query(
    State(s): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
    Query(params): Query<LogParams>,
) -> ApiResult {
    p.require(&[Role::Admin, Role::Auditor])?;
    let q = log_query_of(params)?;
    let page = s.log.query(&q).await.map_err(log_error)?;
    Ok(Json(page).into_response())
}

/// `GET /api/v1/log/export?format=csv|ndjson`: every entry of the query, streamed.
async fn log_export(
    State(s): State<Arc<ApiState>>,
    Extension(p): Extension<Principal>,
    Query(mut params): Query<LogParams>,
) -> ApiResult {
    p.require(&[Role::Admin, Role::Auditor])?;
    let csv = match params.format.take().as_deref() {
        None | Some("csv") => true,
        Some("ndjson") => false,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "unknown format `{other}`: csv or ndjson"
            )));
        }
    };
    params.limit = Some(crate::control::logstore::MAX_LIMIT);
    let q = log_query_of(params)?;
    // The first page is read before answering, so a bad cursor or an unreachable store is an
    // error status, not a cut-off body.
    s.log
        .query(&LogQuery {
            limit: 1,
            ..q.clone()
        })
        .await
        .map_err(log_error)?;
    let body = axum::body::Body::from_stream(s.log.clone().export(q, csv));
    let (ct, name) = if csv {
        ("text/csv; charset=utf-8", "fedrelay-log.csv")
    } else {
        ("application/x-ndjson", "fedrelay-log.ndjson")
    };
    Ok((
        [
            (header::CONTENT_TYPE, ct.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        body,
    )
        .into_response())
}
