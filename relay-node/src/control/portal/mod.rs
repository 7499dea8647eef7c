//! The management portal: server-rendered pages on the management API's listener, for
//! administrators and auditors, with their stylesheet and script embedded in the binary.
//!
//! The portal holds no authority of its own. A session keeps the bearer token its person
//! signed in with (an OIDC access token, or an API token for break-glass access), and every
//! page is made from calls to the management API's router, in process, carrying that token:
//! the API authenticates each call, checks the role, validates and audits every change.
//!
//! Security: sessions in the state store behind an HttpOnly, SameSite=Lax cookie (`Secure` and
//! `__Host-` unless served as plain HTTP on loopback), a CSRF token checked on every POST
//! before any handler runs, a Content-Security-Policy allowing only the portal's own script
//! and stylesheet (no inline script), `frame-ancestors 'none'`, and HSTS when the browser
//! speaks HTTPS.

mod charts;
mod html;
mod login;
mod pages;
pub mod session;

pub use html::esc;
pub use login::OidcLogin;

use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use html::{Form, Nav, Notice, page};
use serde::Deserialize;
use serde_json::Value;
use session::{Session, Sessions, random_token};
use std::sync::Arc;
use tower::ServiceExt;

/// The largest form the portal accepts.
const MAX_FORM: usize = 256 * 1024;

pub struct PortalState {
    /// The management API's router, which every page calls.
    pub api: Router,
    pub sessions: Sessions,
    pub login: Option<OidcLogin>,
    /// The browser reaches the portal over HTTPS (TLS here, or a TLS-terminating proxy).
    pub secure: bool,
    /// How long a session signed in with an API token lasts.
    pub token_session_secs: u64,
}

/// A failed call to the API: its status and message.
#[derive(Debug)]
pub struct Failure {
    pub status: StatusCode,
    pub message: String,
}

impl PortalState {
    /// Calls the management API as the session's person.
    pub async fn call(
        &self,
        token: &str,
        method: Method,
        uri: &str,
        body: Option<&Value>,
        if_match: Option<u64>,
    ) -> Result<Value, Failure> {
        let r = self.raw(token, method, uri, body, if_match).await?;
        let status = r.status();
        let bytes = axum::body::to_bytes(r.into_body(), 64 * 1024 * 1024)
            .await
            .map_err(|e| Failure {
                status: StatusCode::BAD_GATEWAY,
                message: format!("reading the API's answer: {e}"),
            })?;
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status.is_success() {
            Ok(v)
        } else {
            Err(Failure {
                status,
                message: v["message"]
                    .as_str()
                    .map_or_else(|| status.to_string(), String::from),
            })
        }
    }

    /// The API's answer as it is (for exports, streamed through).
    pub async fn raw(
        &self,
        token: &str,
        method: Method,
        uri: &str,
        body: Option<&Value>,
        if_match: Option<u64>,
    ) -> Result<Response, Failure> {
        let mut b = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::AUTHORIZATION, format!("Bearer {token}"));
        if let Some(v) = if_match {
            b = b.header(header::IF_MATCH, format!("\"{v}\""));
        }
        let req = match body {
            Some(v) => b
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(v.to_string())),
            None => b.body(Body::empty()),
        }
        .map_err(|e| Failure {
            status: StatusCode::BAD_REQUEST,
            message: e.to_string(),
        })?;
        self.api.clone().oneshot(req).await.map_err(|e| match e {})
    }

    fn cookie_name(&self) -> &'static str {
        if self.secure {
            "__Host-fedrelay"
        } else {
            "fedrelay"
        }
    }

    fn login_cookie_name(&self) -> &'static str {
        if self.secure {
            "__Host-fedrelay-login"
        } else {
            "fedrelay-login"
        }
    }

    fn cookie(&self, name: &str, value: &str, max_age: i64) -> HeaderValue {
        let secure = if self.secure { "; Secure" } else { "" };
        HeaderValue::from_str(&format!(
            "{name}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age}{secure}"
        ))
        .unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

/// The value of cookie `name` in a request.
fn cookie_of(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// Equality in time independent of where the inputs differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The signed-in session of a request, for the handlers behind [`require_session`].
#[derive(Clone)]
pub struct Sess {
    pub id: String,
    pub s: Session,
}

/// The portal's routes.
pub fn router(state: Arc<PortalState>) -> Router {
    let authed = Router::new()
        .route("/portal/", get(pages::overview))
        .route("/portal/policy", get(pages::policy))
        .route("/portal/policy/domain", post(pages::domain_submit))
        .route("/portal/policy/domain/delete", post(pages::domain_delete))
        .route("/portal/policy/rule", post(pages::rule_submit))
        .route("/portal/policy/rule/delete", post(pages::rule_delete))
        .route("/portal/users", get(pages::users))
        .route("/portal/users/block", post(pages::block))
        .route("/portal/users/forget", post(pages::forget))
        .route("/portal/approvals", get(pages::approvals))
        .route("/portal/approvals/decide", post(pages::decide))
        .route("/portal/log", get(pages::log))
        .route("/portal/log/export", get(pages::log_export))
        .route("/portal/audit", get(pages::audit))
        .route("/portal/cluster", get(pages::cluster))
        .route("/portal/logout", post(logout))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            require_session,
        ));
    Router::new()
        .route("/", get(|| async { Redirect::to("/portal/") }))
        .route("/portal", get(|| async { Redirect::to("/portal/") }))
        .route("/portal/login", get(login_page).post(login_with_token))
        .route("/portal/login/oidc", get(login_oidc))
        .route("/portal/callback", get(callback))
        .route("/portal/assets/{file}", get(asset))
        .merge(authed)
        .layer(middleware::from_fn_with_state(state.clone(), headers))
        .with_state(state)
}

const CSS: &str = include_str!("assets/portal.css");
const JS: &str = include_str!("assets/portal.js");

async fn asset(axum::extract::Path(file): axum::extract::Path<String>) -> Response {
    let (ct, body) = match file.as_str() {
        "portal.css" => ("text/css; charset=utf-8", CSS),
        "portal.js" => ("text/javascript; charset=utf-8", JS),
        _ => return (StatusCode::NOT_FOUND, "no such asset").into_response(),
    };
    ([(header::CONTENT_TYPE, ct)], body).into_response()
}

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

async fn headers(State(st): State<Arc<PortalState>>, req: Request, next: Next) -> Response {
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if st.secure {
        h.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000"),
        );
    }
    r
}

/// Sends a request without a live session to the sign-in page, and refuses a POST whose CSRF
/// token is not the session's; otherwise hands the session (and a POST's form) on.
async fn require_session(
    State(st): State<Arc<PortalState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let id = cookie_of(req.headers(), st.cookie_name()).unwrap_or_default();
    let session = match st.sessions.get(&id).await {
        Ok(s) => s,
        Err(e) => {
            return error_page(
                None,
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("The session store is unavailable: {e}"),
            );
        }
    };
    let Some(s) = session else {
        let expired = if id.is_empty() { "" } else { "?expired=1" };
        return Redirect::to(&format!("/portal/login{expired}")).into_response();
    };
    if req.method() == Method::POST {
        let (parts, body) = req.into_parts();
        let bytes = match axum::body::to_bytes(body, MAX_FORM).await {
            Ok(b) => b,
            Err(_) => {
                return error_page(
                    Some(&s),
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "The form is too large.",
                );
            }
        };
        let form = Form::parse(&bytes);
        if !same(&form.get("_csrf"), &s.csrf) {
            return error_page(
                Some(&s),
                StatusCode::FORBIDDEN,
                "The form's security token is missing or out of date, so nothing was changed. Reload the page and try again.",
            );
        }
        req = Request::from_parts(parts, Body::empty());
        req.extensions_mut().insert(form);
    } else {
        req.extensions_mut().insert(Form::default());
    }
    req.extensions_mut().insert(Sess { id, s });
    next.run(req).await
}

/// A page saying what went wrong.
pub fn error_page(s: Option<&Session>, status: StatusCode, message: &str) -> Response {
    let body = "<p><a href=\"/portal/\">Back to the overview</a></p>";
    (
        status,
        Html(page(
            "Not done",
            Nav::None,
            s,
            Some(&Notice::Error(message.to_string())),
            body,
        )),
    )
        .into_response()
}

/// What to show for a failed API call: the sign-in page when the session's token is no
/// longer accepted, otherwise the API's reason.
pub fn failed(st: &PortalState, sess: &Sess, f: Failure) -> Response {
    if f.status == StatusCode::UNAUTHORIZED {
        let mut r = Redirect::to("/portal/login?expired=1").into_response();
        r.headers_mut()
            .insert(header::SET_COOKIE, st.cookie(st.cookie_name(), "", 0));
        return r;
    }
    error_page(Some(&sess.s), f.status, &f.message)
}

#[derive(Deserialize, Default)]
struct LoginQuery {
    #[serde(default)]
    expired: Option<String>,
    #[serde(default)]
    signed_out: Option<String>,
}

fn login_form(
    st: &PortalState,
    binding: &str,
    notice: Option<&Notice>,
    status: StatusCode,
) -> Response {
    let mut body = String::new();
    if st.login.is_some() {
        body.push_str(
            "<section class=\"card\"><h2>Your organisation's account</h2>\
             <p><a class=\"button primary\" id=\"sign-in\" href=\"/portal/login/oidc\">Sign in with your identity provider</a></p></section>",
        );
    }
    body.push_str(&format!(
        "<section class=\"card\"><h2>API token</h2>\
         <p>For break-glass access: an API token, or the bootstrap token of the relay's configuration.</p>\
         <form method=\"post\" action=\"/portal/login\">\
         <input type=\"hidden\" name=\"_login\" value=\"{}\">\
         <div class=\"field\"><label for=\"token\">API token</label>\
         <input type=\"password\" id=\"token\" name=\"token\" autocomplete=\"off\" required></div>\
         <button type=\"submit\" id=\"token-sign-in\">Sign in with the token</button></form></section>",
        esc(binding)
    ));
    let mut r = (
        status,
        Html(page("Sign in", Nav::None, None, notice, &body)),
    )
        .into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        st.cookie(st.login_cookie_name(), binding, 600),
    );
    r
}

/// The browser's sign-in cookie, or a new one.
fn binding_of(st: &PortalState, headers: &HeaderMap) -> String {
    cookie_of(headers, st.login_cookie_name())
        .filter(|b| b.len() == 43)
        .unwrap_or_else(random_token)
}

async fn login_page(
    State(st): State<Arc<PortalState>>,
    headers: HeaderMap,
    Query(q): Query<LoginQuery>,
) -> Response {
    let id = cookie_of(&headers, st.cookie_name()).unwrap_or_default();
    if let Ok(Some(s)) = st.sessions.get(&id).await {
        return Redirect::to(html::home_of(&s.role)).into_response();
    }
    let notice = if q.signed_out.is_some() {
        Some(Notice::Ok("You have signed out.".into()))
    } else if q.expired.is_some() {
        Some(Notice::Error(
            "Your session has ended; sign in again.".into(),
        ))
    } else {
        None
    };
    login_form(
        &st,
        &binding_of(&st, &headers),
        notice.as_ref(),
        StatusCode::OK,
    )
}

/// Starts a session for a person the API accepts with `token`.
async fn start_session(
    st: &PortalState,
    token: String,
    lifetime_secs: u64,
) -> Result<Response, Failure> {
    let who = st
        .call(&token, Method::GET, "/api/v1/whoami", None, None)
        .await?;
    let role = who["role"].as_str().unwrap_or_default().to_string();
    let s = Session {
        token,
        name: who["name"].as_str().unwrap_or_default().to_string(),
        domains: who["domains"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|d| d.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default(),
        csrf: random_token(),
        expires_ms: crate::edges::now_ms() + lifetime_secs as i64 * 1000,
        role: role.clone(),
    };
    let id = st.sessions.create(&s).await.map_err(|e| Failure {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: format!("the session store is unavailable: {e}"),
    })?;
    let mut r = Redirect::to(html::home_of(&role)).into_response();
    let h = r.headers_mut();
    h.append(
        header::SET_COOKIE,
        st.cookie(st.cookie_name(), &id, lifetime_secs as i64),
    );
    h.append(header::SET_COOKIE, st.cookie(st.login_cookie_name(), "", 0));
    Ok(r)
}

async fn login_with_token(
    State(st): State<Arc<PortalState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let form = Form::parse(&body);
    let binding = binding_of(&st, &headers);
    let cookie = cookie_of(&headers, st.login_cookie_name()).unwrap_or_default();
    if cookie.is_empty() || !same(&form.get("_login"), &cookie) {
        return login_form(
            &st,
            &binding,
            Some(&Notice::Error(
                "The sign-in form is out of date; try again.".into(),
            )),
            StatusCode::FORBIDDEN,
        );
    }
    let token = form.get("token");
    if token.is_empty() {
        return login_form(
            &st,
            &binding,
            Some(&Notice::Error("Enter an API token.".into())),
            StatusCode::BAD_REQUEST,
        );
    }
    match start_session(&st, token, st.token_session_secs).await {
        Ok(r) => r,
        Err(f) => login_form(
            &st,
            &binding,
            Some(&Notice::Error(format!(
                "That token was not accepted: {}",
                f.message
            ))),
            if f.status.is_client_error() {
                f.status
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            },
        ),
    }
}

async fn login_oidc(State(st): State<Arc<PortalState>>, headers: HeaderMap) -> Response {
    let binding = binding_of(&st, &headers);
    let Some(l) = &st.login else {
        return login_form(
            &st,
            &binding,
            Some(&Notice::Error(
                "No identity provider is configured; sign in with an API token.".into(),
            )),
            StatusCode::NOT_FOUND,
        );
    };
    let started = match l.begin(&binding).await {
        Ok(x) => x,
        Err(e) => {
            return login_form(
                &st,
                &binding,
                Some(&Notice::Error(e.to_string())),
                StatusCode::BAD_GATEWAY,
            );
        }
    };
    let (url, state, pending) = started;
    if let Err(e) = st.sessions.put_login(&state, &pending).await {
        return error_page(
            None,
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("The session store is unavailable: {e}"),
        );
    }
    let mut r = Redirect::to(&url).into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        st.cookie(st.login_cookie_name(), &binding, 600),
    );
    r
}

#[derive(Deserialize)]
struct Callback {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    error_description: Option<String>,
}

async fn callback(
    State(st): State<Arc<PortalState>>,
    headers: HeaderMap,
    Query(q): Query<Callback>,
) -> Response {
    let binding = binding_of(&st, &headers);
    let refuse =
        |status: StatusCode, m: String| login_form(&st, &binding, Some(&Notice::Error(m)), status);
    let Some(l) = &st.login else {
        return refuse(
            StatusCode::NOT_FOUND,
            "No identity provider is configured.".into(),
        );
    };
    let pending = match st
        .sessions
        .take_login(q.state.as_deref().unwrap_or_default())
        .await
    {
        Ok(Some(p)) => p,
        Ok(None) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "This sign-in is unknown, expired or already used; sign in again.".into(),
            );
        }
        Err(e) => {
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("The session store is unavailable: {e}"),
            );
        }
    };
    let browser = cookie_of(&headers, st.login_cookie_name()).unwrap_or_default();
    if browser.is_empty() || !same(&browser, &pending.browser) {
        return refuse(
            StatusCode::BAD_REQUEST,
            "This sign-in was started in another browser; sign in again.".into(),
        );
    }
    if let Some(e) = q.error {
        return refuse(
            StatusCode::UNAUTHORIZED,
            format!(
                "The identity provider did not sign you in: {e}{}",
                q.error_description
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default()
            ),
        );
    }
    let Some(code) = q.code.filter(|c| !c.is_empty()) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "The identity provider sent no authorization code.".into(),
        );
    };
    let signed = match l.finish(&code, &pending).await {
        Ok(s) => s,
        Err(e) => return refuse(StatusCode::UNAUTHORIZED, e.to_string()),
    };
    let lifetime = signed
        .expires_in
        .unwrap_or(l.session_secs())
        .min(l.session_secs())
        .max(1);
    match start_session(&st, signed.access_token, lifetime).await {
        Ok(r) => r,
        Err(f) => refuse(
            if f.status.is_client_error() {
                f.status
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            },
            format!("fedrelay did not accept your account: {}", f.message),
        ),
    }
}

async fn logout(State(st): State<Arc<PortalState>>, Extension(sess): Extension<Sess>) -> Response {
    if let Err(e) = st.sessions.end(&sess.id).await {
        return error_page(
            Some(&sess.s),
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("Could not end the session: {e}"),
        );
    }
    let mut r = Redirect::to("/portal/login?signed_out=1").into_response();
    r.headers_mut()
        .insert(header::SET_COOKIE, st.cookie(st.cookie_name(), "", 0));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_among_others() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; fedrelay=xyz"),
        );
        h.append(header::COOKIE, HeaderValue::from_static("op_session=q"));
        assert_eq!(cookie_of(&h, "fedrelay").as_deref(), Some("xyz"));
        assert_eq!(cookie_of(&h, "op_session").as_deref(), Some("q"));
        assert_eq!(cookie_of(&h, "fedrelay-login"), None);
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "ab"));
    }
}
