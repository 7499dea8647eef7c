//! A test double of Microsoft's Bot Connector service and of the Microsoft identity platform's
//! token endpoint, served over plain HTTP on a free loopback port.
//!
//! It follows Microsoft's public REST documentation: Bot Framework "Authenticate requests from
//! the Bot Connector service" (OpenID metadata, JWKS with endorsements, the RS256 JWT the
//! connector sends with each activity), the Bot Connector REST API reference (send, reply,
//! update and delete activities; get one conversation member) and the Microsoft identity
//! platform client-credentials flow (`POST /{tenant}/oauth2/v2.0/token`).
//!
//! The fake only plays Microsoft's side: it issues and checks its own tokens, signs inbound
//! JWTs (valid ones and [`Forgery`] variants) and records every connector call. Nothing in it
//! turns off a check of the relay under test; a relay pointed at it validates exactly as it
//! would against the real service, only with different URLs.

use anyhow::{Context, Result, bail};
use axum::extract::rejection::FormRejection;
use axum::extract::{Form, Path, State as AxState};
use axum::http::header::{AUTHORIZATION, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac};
use rsa::pkcs1v15::SigningKey;
use rsa::pkcs8::{EncodePublicKey, LineEnding};
use rsa::rand_core::{OsRng, RngCore};
use rsa::signature::{SignatureEncoding, Signer};
use rsa::traits::PublicKeyParts;
use rsa::{RsaPrivateKey, RsaPublicKey};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The issuer of the Bot Connector's JWTs (public cloud).
pub const ISSUER: &str = "https://api.botframework.com";
const SCOPE: &str = "https://api.botframework.com/.default";
/// The service URL's path on the fake, like `https://smba.trafficmanager.net/amer/`.
const SERVICE_PATH: &str = "/amer/";

/// The bot registration the fake knows: app id and password, tenant, token lifetime.
#[derive(Debug, Clone)]
pub struct FakeConfig {
    pub app_id: String,
    pub app_password: String,
    pub app_tenant_id: String,
    /// The `expires_in` of the access tokens issued (see [`FakeBotConnector::set_token_lifetime`]).
    pub token_lifetime_secs: u64,
}

impl Default for FakeConfig {
    fn default() -> Self {
        Self {
            app_id: "00000000-0000-0000-0000-0000000000b0".into(),
            app_password: "fake-bot-secret-0123456789".into(),
            app_tenant_id: "11111111-1111-1111-1111-111111111111".into(),
            token_lifetime_secs: 3600,
        }
    }
}

/// A conversation member, served by `GET .../members/{id}` in the TeamsChannelAccount shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The Teams user id, `29:...`.
    pub id: String,
    pub aad_object_id: String,
    pub name: String,
    pub given_name: String,
    pub surname: String,
    pub email: String,
    pub user_principal_name: String,
    pub tenant_id: String,
}

impl Member {
    /// The member's JSON. The object id is under both `objectId` (the REST wire name) and
    /// `aadObjectId` (the SDKs' property name).
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id, "name": self.name,
            "aadObjectId": self.aad_object_id, "objectId": self.aad_object_id,
            "givenName": self.given_name, "surname": self.surname, "email": self.email,
            "userPrincipalName": self.user_principal_name, "tenantId": self.tenant_id,
            "userRole": "user",
        })
    }
}

/// One connector call as received, including refused ones.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    /// The percent-decoded path, e.g. `/amer/v3/conversations/a:1/activities`.
    pub path: String,
    /// The percent-decoded conversation id (empty for a path the fake does not serve).
    pub conversation_id: String,
    pub activity_id: Option<String>,
    pub authorization: Option<String>,
    /// The JSON body; `Null` when empty, a JSON string holding the text when not JSON.
    pub body: Value,
    pub status: u16,
    /// What the fake answered (`{"id": …}` for a send); `Null` when it answered no body.
    pub reply: Value,
    pub at: Instant,
}

/// A JWT that a relay must reject (all but [`Forgery::ExpiredWithinSkew`], which it must accept).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forgery {
    /// Header `alg` "none", empty signature.
    AlgNone,
    /// HS256, HMAC keyed with the signing key's public key as PEM (SPKI) text.
    Hs256WithPublicKey,
    WrongIssuer,
    WrongAudience,
    /// `exp` 6 minutes ago: beyond the 5-minute clock skew.
    ExpiredPastSkew,
    /// `exp` 4 minutes ago: within the 5-minute clock skew, so still valid.
    ExpiredWithinSkew,
    /// `nbf` 6 minutes ahead.
    NotYetValid,
    /// Signed by a key that the JWKS does not serve, kid `unknown-kid`.
    UnknownKid,
    /// `serviceurl` claim `https://evil.example/amer/`, not the activity's `serviceUrl`.
    ServiceUrlMismatch,
    /// Signed by a served key whose endorsements lack `msteams`.
    NoEndorsement,
    /// A valid token with one signature byte flipped.
    BadSignature,
}

impl Forgery {
    pub const ALL: [Forgery; 11] = [
        Forgery::AlgNone,
        Forgery::Hs256WithPublicKey,
        Forgery::WrongIssuer,
        Forgery::WrongAudience,
        Forgery::ExpiredPastSkew,
        Forgery::ExpiredWithinSkew,
        Forgery::NotYetValid,
        Forgery::UnknownKid,
        Forgery::ServiceUrlMismatch,
        Forgery::NoEndorsement,
        Forgery::BadSignature,
    ];

    /// Whether a correct validator accepts this token (only [`Forgery::ExpiredWithinSkew`]).
    pub fn must_be_accepted(self) -> bool {
        self == Forgery::ExpiredWithinSkew
    }
}

struct Key {
    kid: String,
    endorsements: Vec<&'static str>,
    signer: SigningKey<Sha256>,
    public: RsaPublicKey,
    pem: String,
    /// Thumbprint-shaped (27 base64url characters) but derived from the modulus: the fake has
    /// no certificate.
    x5t: String,
}

impl Key {
    fn generate(kid: String, endorsements: &[&'static str]) -> Result<Self> {
        let private = RsaPrivateKey::new(&mut OsRng, 2048)?;
        let public = private.to_public_key();
        let pem = public.to_public_key_pem(LineEnding::LF)?;
        let x5t = B64.encode(&Sha256::digest(public.n().to_bytes_be())[..20]);
        Ok(Self {
            kid,
            endorsements: endorsements.to_vec(),
            signer: SigningKey::new(private),
            public,
            pem,
            x5t,
        })
    }

    fn jwk(&self) -> Value {
        json!({
            "kty": "RSA", "use": "sig", "kid": self.kid, "x5t": self.x5t,
            "n": B64.encode(self.public.n().to_bytes_be()),
            "e": B64.encode(self.public.e().to_bytes_be()),
            "endorsements": self.endorsements,
        })
    }

    fn header(&self) -> Value {
        json!({"alg": "RS256", "kid": self.kid, "typ": "JWT", "x5t": self.x5t})
    }

    fn sign(&self, header: &Value, claims: &Value) -> String {
        let input = signing_input(header, claims);
        let sig = self.signer.sign(input.as_bytes());
        format!("{input}.{}", B64.encode(sig.to_bytes()))
    }
}

fn signing_input(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    )
}

async fn generate_key(kid: &str, endorsements: &'static [&'static str]) -> Result<Key> {
    let kid = kid.to_owned();
    tokio::task::spawn_blocking(move || Key::generate(kid, endorsements)).await?
}

struct Failure {
    left: usize,
    status: u16,
    retry_after: Option<u64>,
}

/// The served keys; `current` signs.
struct Keys {
    served: Vec<Arc<Key>>,
    current: Arc<Key>,
}

#[derive(Default)]
struct State {
    lifetime: u64,
    tokens: HashMap<String, Instant>,
    issued: u64,
    activities: u64,
    token_requests: usize,
    jwks_fetches: usize,
    metadata_fetches: usize,
    members: HashMap<String, Member>,
    fail: Option<Failure>,
    down: bool,
    calls: Vec<Call>,
}

struct Shared {
    cfg: FakeConfig,
    base: String,
    unknown: Key,
    keys: Mutex<Keys>,
    state: Mutex<State>,
    /// The number of recorded calls, for [`FakeBotConnector::wait_calls`].
    recorded: watch::Sender<usize>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
    fn keys(&self) -> MutexGuard<'_, Keys> {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The fake service; its server stops when this is dropped.
pub struct FakeBotConnector {
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl Drop for FakeBotConnector {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeBotConnector {
    /// Generates the signing key `key-1` (endorsed for `msteams`) and the unserved
    /// `unknown-kid` key, and serves on 127.0.0.1 in the current tokio runtime.
    pub async fn start(cfg: FakeConfig) -> Result<Self> {
        let (first, unknown) = tokio::try_join!(
            generate_key("key-1", &["msteams"]),
            generate_key("unknown-kid", &["msteams"]),
        )?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let first = Arc::new(first);
        let shared = Arc::new(Shared {
            base: format!("http://{}", listener.local_addr()?),
            unknown,
            keys: Mutex::new(Keys {
                served: vec![first.clone()],
                current: first,
            }),
            state: Mutex::new(State {
                lifetime: cfg.token_lifetime_secs,
                ..State::default()
            }),
            recorded: watch::Sender::new(0),
            cfg,
        });
        let conversation = "/amer/v3/conversations/{conversation_id}";
        let app = Router::new()
            .route("/v1/.well-known/openidconfiguration", get(metadata))
            .route("/v1/.well-known/keys", get(keys))
            .route("/{tenant}/oauth2/v2.0/token", post(token))
            .route(&format!("{conversation}/activities"), post(rest))
            .route(
                &format!("{conversation}/activities/{{activity_id}}"),
                post(rest).put(rest).delete(rest),
            )
            .route(&format!("{conversation}/members/{{member_id}}"), get(rest))
            .fallback(unknown_path)
            .with_state(shared.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { shared, server })
    }

    pub fn base_url(&self) -> String {
        self.shared.base.clone()
    }
    pub fn openid_metadata_url(&self) -> String {
        format!("{}/v1/.well-known/openidconfiguration", self.shared.base)
    }
    pub fn jwks_url(&self) -> String {
        format!("{}/v1/.well-known/keys", self.shared.base)
    }
    pub fn token_url(&self) -> String {
        let tenant = &self.shared.cfg.app_tenant_id;
        format!("{}/{tenant}/oauth2/v2.0/token", self.shared.base)
    }
    /// The `serviceUrl` for activities, with its trailing slash.
    pub fn service_url(&self) -> String {
        format!("{}{SERVICE_PATH}", self.shared.base)
    }
    /// The configuration given to [`start`](Self::start) (later lifetime changes not included).
    pub fn config(&self) -> &FakeConfig {
        &self.shared.cfg
    }

    /// Generates a key (endorsed for `msteams`), serves it next to the others and signs with it
    /// from now on; returns its kid. Blocks for the key generation.
    pub fn rotate_key(&self) -> String {
        self.add_key(&["msteams"], true).kid.clone()
    }
    /// Generates and serves a key endorsed for `webchat` only (for
    /// [`sign_with_kid`](Self::sign_with_kid)); returns its kid. Blocks for the key generation.
    pub fn add_unendorsed_key(&self) -> String {
        self.add_key(&["webchat"], false).kid.clone()
    }
    fn add_key(&self, endorsements: &[&'static str], current: bool) -> Arc<Key> {
        let mut key = match Key::generate(String::new(), endorsements) {
            Ok(k) => k,
            Err(e) => panic!("RSA key generation failed: {e:#}"),
        };
        let mut keys = self.shared.keys();
        key.kid = format!("key-{}", keys.served.len() + 1);
        let key = Arc::new(key);
        keys.served.push(key.clone());
        if current {
            keys.current = key.clone();
        }
        key
    }

    pub fn jwks_fetches(&self) -> usize {
        self.shared.state().jwks_fetches
    }
    pub fn metadata_fetches(&self) -> usize {
        self.shared.state().metadata_fetches
    }
    /// Requests to the token endpoint, refused ones included.
    pub fn token_requests(&self) -> usize {
        self.shared.state().token_requests
    }
    /// Marks every access token issued so far expired: connector calls with them answer 401.
    pub fn expire_tokens(&self) {
        let now = Instant::now();
        for expiry in self.shared.state().tokens.values_mut() {
            *expiry = now;
        }
    }
    /// The lifetime (`expires_in`, and the actual validity) of tokens issued from now on.
    pub fn set_token_lifetime(&self, secs: u64) {
        self.shared.state().lifetime = secs;
    }
    /// Registers a member for `GET .../members/{id}` in any conversation (by its `29:` id or
    /// its AAD object id).
    pub fn add_member(&self, member: Member) {
        let mut st = self.shared.state();
        st.members.insert(member.id.clone(), member);
    }
    /// The next `n` authorised connector calls answer `status` (with `Retry-After` when given).
    pub fn fail_next(&self, n: usize, status: u16, retry_after_secs: Option<u64>) {
        let (left, retry_after) = (n, retry_after_secs);
        self.shared.state().fail = Some(Failure {
            left,
            status,
            retry_after,
        });
    }
    /// While down, every authorised connector call answers 503 without `Retry-After`.
    pub fn set_down(&self, down: bool) {
        self.shared.state().down = down;
    }

    pub fn calls(&self) -> Vec<Call> {
        self.shared.state().calls.clone()
    }
    /// The successful `POST`s (sends and replies).
    pub fn sent(&self) -> Vec<Call> {
        let st = self.shared.state();
        let ok = |c: &&Call| c.method == "POST" && (200..300).contains(&c.status);
        st.calls.iter().filter(ok).cloned().collect()
    }
    /// All calls once `pred` holds for them, re-checked on every new call; fails after
    /// `timeout` naming `what` and listing the calls seen.
    pub async fn wait_calls<F: Fn(&[Call]) -> bool>(
        &self,
        what: &str,
        timeout: Duration,
        pred: F,
    ) -> Result<Vec<Call>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.shared.recorded.subscribe();
        loop {
            rx.borrow_and_update();
            let calls = self.calls();
            if pred(&calls) {
                return Ok(calls);
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                let seen: Vec<String> = calls
                    .iter()
                    .map(|c| format!("{} {} -> {}", c.method, c.path, c.status))
                    .collect();
                bail!("timed out after {timeout:?} waiting for {what}; calls: {seen:?}");
            }
        }
    }

    fn claims(&self, activity: &Value, now: i64) -> Value {
        let mut claims = json!({
            "iss": ISSUER, "aud": self.shared.cfg.app_id,
            "exp": now + 3600, "nbf": now - 60, "iat": now - 60,
        });
        if let Some(url) = activity.get("serviceUrl") {
            claims["serviceurl"] = url.clone();
        }
        claims
    }
    fn current_key(&self) -> Arc<Key> {
        self.shared.keys().current.clone()
    }

    /// The JWT the Bot Connector would send with `activity`, signed by the current key.
    pub fn token_for(&self, activity: &Value) -> String {
        let key = self.current_key();
        key.sign(&key.header(), &self.claims(activity, unix_now()))
    }
    /// `header` and `claims` as given, RS256-signed by the current key.
    pub fn sign(&self, header: Value, claims: Value) -> String {
        self.current_key().sign(&header, &claims)
    }
    /// `claims` signed by the key `kid` (served, or `unknown-kid`), header naming that kid.
    pub fn sign_with_kid(&self, kid: &str, claims: Value) -> Result<String> {
        if kid == self.shared.unknown.kid {
            let key = &self.shared.unknown;
            return Ok(key.sign(&key.header(), &claims));
        }
        let found = self
            .shared
            .keys()
            .served
            .iter()
            .find(|k| k.kid == kid)
            .cloned();
        let key = found.with_context(|| format!("no key with kid {kid:?}"))?;
        Ok(key.sign(&key.header(), &claims))
    }

    /// A token for `activity` spoiled as `f` says.
    pub fn forge(&self, f: Forgery, activity: &Value) -> String {
        let now = unix_now();
        let mut claims = self.claims(activity, now);
        let mut key = self.current_key();
        match f {
            Forgery::AlgNone => {
                let header = json!({"alg": "none", "kid": key.kid, "typ": "JWT"});
                return format!("{}.", signing_input(&header, &claims));
            }
            Forgery::Hs256WithPublicKey => {
                let header = json!({"alg": "HS256", "kid": key.kid, "typ": "JWT"});
                let input = signing_input(&header, &claims);
                let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key.pem.as_bytes()) else {
                    unreachable!("HMAC accepts keys of any length")
                };
                mac.update(input.as_bytes());
                return format!("{input}.{}", B64.encode(mac.finalize().into_bytes()));
            }
            Forgery::BadSignature => {
                let token = key.sign(&key.header(), &claims);
                let (input, sig) = token.rsplit_once('.').unwrap_or((&token, ""));
                let mut sig = B64.decode(sig).unwrap_or_default();
                if let Some(b) = sig.get_mut(10) {
                    *b ^= 0x01;
                }
                return format!("{input}.{}", B64.encode(sig));
            }
            Forgery::UnknownKid => {
                let unknown = &self.shared.unknown;
                return unknown.sign(&unknown.header(), &claims);
            }
            Forgery::NoEndorsement => {
                let keys = self.shared.keys();
                let found = keys
                    .served
                    .iter()
                    .find(|k| !k.endorsements.contains(&"msteams"));
                let found = found.cloned();
                drop(keys);
                key = found.unwrap_or_else(|| self.add_key(&["webchat"], false));
            }
            Forgery::WrongIssuer => claims["iss"] = json!("https://login.evil.example"),
            Forgery::WrongAudience => claims["aud"] = json!("00000000-0000-0000-0000-00000000bad0"),
            Forgery::ExpiredPastSkew | Forgery::ExpiredWithinSkew => {
                let past_skew = f == Forgery::ExpiredPastSkew;
                claims["exp"] = json!(now - if past_skew { 360 } else { 240 });
                claims["nbf"] = json!(now - 3600);
                claims["iat"] = json!(now - 3600);
            }
            Forgery::NotYetValid => {
                claims["nbf"] = json!(now + 360);
                claims["iat"] = json!(now);
            }
            Forgery::ServiceUrlMismatch => {
                claims["serviceurl"] = json!("https://evil.example/amer/")
            }
        }
        key.sign(&key.header(), &claims)
    }
}

fn unix_now() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
}

async fn metadata(AxState(s): AxState<Arc<Shared>>) -> Json<Value> {
    s.state().metadata_fetches += 1;
    Json(json!({
        "issuer": ISSUER,
        "authorization_endpoint": "https://invalid.botframework.com",
        "jwks_uri": format!("{}/v1/.well-known/keys", s.base),
        "id_token_signing_alg_values_supported": ["RS256"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
    }))
}

async fn keys(AxState(s): AxState<Arc<Shared>>) -> Json<Value> {
    s.state().jwks_fetches += 1;
    let keys: Vec<Value> = s.keys().served.iter().map(|k| k.jwk()).collect();
    Json(json!({ "keys": keys }))
}

/// An AAD-style refusal; `invalid_client` is 401, the rest 400.
fn refuse(error: &str, code: u32, description: &str) -> Response {
    let status = match error {
        "invalid_client" => StatusCode::UNAUTHORIZED,
        _ => StatusCode::BAD_REQUEST,
    };
    let description = format!("AADSTS{code}: {description}");
    let body = json!({"error": error, "error_description": description, "error_codes": [code]});
    (status, Json(body)).into_response()
}

async fn token(
    AxState(s): AxState<Arc<Shared>>,
    Path(tenant): Path<String>,
    form: Result<Form<HashMap<String, String>>, FormRejection>,
) -> Response {
    let mut st = s.state();
    st.token_requests += 1;
    let Ok(Form(form)) = form else {
        return refuse("invalid_request", 900144, "Expected a form body.");
    };
    let field = |name: &str| form.get(name).map(String::as_str).unwrap_or_default();
    if tenant != s.cfg.app_tenant_id {
        return refuse("invalid_request", 90002, "Tenant not found.");
    }
    if field("grant_type") != "client_credentials" {
        return refuse("unsupported_grant_type", 70003, "Unsupported grant type.");
    }
    if field("client_id") != s.cfg.app_id {
        return refuse("unauthorized_client", 700016, "Application not found.");
    }
    if field("client_secret") != s.cfg.app_password {
        return refuse("invalid_client", 7000215, "Invalid client secret.");
    }
    if field("scope") != SCOPE {
        return refuse("invalid_scope", 70011, "Invalid scope.");
    }
    st.issued += 1;
    let access_token = format!("fake-at-{}-{:016x}", st.issued, OsRng.next_u64());
    let lifetime = st.lifetime;
    st.tokens.insert(
        access_token.clone(),
        Instant::now() + Duration::from_secs(lifetime),
    );
    Json(json!({
        "token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime,
        "access_token": access_token,
    }))
    .into_response()
}

enum Op {
    Send,
    Reply,
    Update,
    Delete,
    GetMember(String),
}

/// Every served connector route; the path parameters say which operation it is.
async fn rest(
    AxState(s): AxState<Arc<Shared>>,
    method: Method,
    Path(mut params): Path<HashMap<String, String>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let conversation = params.remove("conversation_id").unwrap_or_default();
    let activity = params.remove("activity_id");
    let op = match (params.remove("member_id"), &activity, &method) {
        (Some(member), _, _) => Op::GetMember(member),
        (None, None, _) => Op::Send,
        (None, Some(_), &Method::POST) => Op::Reply,
        (None, Some(_), &Method::PUT) => Op::Update,
        (None, Some(_), _) => Op::Delete,
    };
    connector(&s, &method, op, conversation, activity, &headers, &body)
}

async fn unknown_path(
    AxState(s): AxState<Arc<Shared>>,
    method: Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let status = StatusCode::NOT_FOUND;
    if uri.path().starts_with(SERVICE_PATH) {
        let call = Call {
            method: method.to_string(),
            path: uri.path().to_owned(),
            conversation_id: String::new(),
            activity_id: None,
            authorization: header(&headers),
            body: parse_body(&body),
            status: status.as_u16(),
            reply: Value::Null,
            at: Instant::now(),
        };
        record(&s, call);
    }
    let (_, body, _) = refusal(404, "NotFound", "The fake does not serve this path.");
    (status, Json(body)).into_response()
}

fn header(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(AUTHORIZATION)?;
    Some(String::from_utf8_lossy(v.as_bytes()).into_owned())
}

fn parse_body(body: &[u8]) -> Value {
    if body.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
}

fn record(s: &Shared, call: Call) {
    s.state().calls.push(call);
    s.recorded.send_modify(|n| *n += 1);
}

/// A connector answer: status, JSON body (`Null` for none) and `Retry-After`.
type Answer = (u16, Value, Option<u64>);

fn refusal(status: u16, code: &str, message: &str) -> Answer {
    let body = json!({"error": {"code": code, "message": message}});
    (status, body, None)
}

fn answer(
    st: &mut State,
    op: &Op,
    activity: Option<&str>,
    auth: Option<&str>,
    body: &Value,
) -> Answer {
    let token = auth.and_then(|a| a.strip_prefix("Bearer "));
    match token.and_then(|t| st.tokens.get(t)) {
        None => return refusal(401, "Unauthorized", "Authorization denied: unknown token."),
        Some(e) if Instant::now() >= *e => {
            return refusal(401, "Unauthorized", "Authorization denied: token expired.");
        }
        Some(_) => {}
    }
    if st.down {
        return refusal(503, "ServiceUnavailable", "The service is down.");
    }
    if let Some(f) = st.fail.as_mut().filter(|f| f.left > 0) {
        f.left -= 1;
        let code = match f.status {
            429 => "TooManyRequests",
            503 => "ServiceUnavailable",
            _ => "ServiceError",
        };
        let (status, body, _) = refusal(f.status, code, "Injected failure.");
        return (status, body, f.retry_after);
    }
    match op {
        Op::Send | Op::Reply | Op::Update if !body.is_object() => {
            refusal(400, "BadArgument", "The body must be an activity object.")
        }
        Op::Send | Op::Reply => {
            st.activities += 1;
            (201, json!({"id": format!("1:{}", st.activities)}), None)
        }
        Op::Update => (200, json!({"id": activity}), None),
        Op::Delete => (200, Value::Null, None),
        Op::GetMember(m) => {
            let mut members = st.members.values();
            match members.find(|x| &x.id == m || &x.aad_object_id == m) {
                Some(x) => (200, x.to_json(), None),
                None => refusal(
                    404,
                    "MemberNotFound",
                    "The member is not in the conversation.",
                ),
            }
        }
    }
}

fn connector(
    s: &Shared,
    method: &Method,
    op: Op,
    conversation: String,
    activity: Option<String>,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let authorization = header(headers);
    let body = parse_body(body);
    let tail = match (&op, &activity) {
        (Op::GetMember(m), _) => format!("/members/{m}"),
        (_, Some(a)) => format!("/activities/{a}"),
        (_, None) => "/activities".to_owned(),
    };
    let (status, reply, retry_after) = answer(
        &mut s.state(),
        &op,
        activity.as_deref(),
        authorization.as_deref(),
        &body,
    );
    record(
        s,
        Call {
            method: method.to_string(),
            path: format!("{SERVICE_PATH}v3/conversations/{conversation}{tail}"),
            conversation_id: conversation,
            activity_id: activity,
            authorization,
            body,
            status,
            reply: reply.clone(),
            at: Instant::now(),
        },
    );
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = match reply {
        Value::Null => code.into_response(),
        reply => (code, Json(reply)).into_response(),
    };
    if let Some(secs) = retry_after {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

/// POSTs `activity` to `{relay_base_url}/api/messages` as the Bot Connector would, with
/// `Authorization: <authorization>` when given (e.g. `Bearer <jwt>`); returns the status and
/// the body text.
pub async fn post_activity(
    relay_base_url: &str,
    activity: &Value,
    authorization: Option<&str>,
) -> Result<(u16, String)> {
    let url = format!("{}/api/messages", relay_base_url.trim_end_matches('/'));
    let mut headers = vec![("Content-Type", "application/json")];
    headers.extend(authorization.map(|a| ("Authorization", a)));
    let r = http_request("POST", &url, &headers, activity.to_string().as_bytes()).await?;
    Ok((r.status, r.body))
}

struct HttpResponse {
    status: u16,
    /// Lower-case names.
    #[cfg_attr(not(test), allow(dead_code))]
    headers: Vec<(String, String)>,
    body: String,
}

/// One HTTP/1.1 request over a fresh connection (`Connection: close`), read to the end.
async fn http_request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<HttpResponse> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("not an http:// URL: {url}"))?;
    let (authority, path) = rest.find('/').map_or((rest, "/"), |i| rest.split_at(i));
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(authority).await?;
        stream.write_all(request.as_bytes()).await?;
        stream.write_all(body).await?;
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await?;
        anyhow::Ok(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .with_context(|| format!("{method} {url}: no complete response within 30 s"))?
        .with_context(|| format!("{method} {url}"))?;
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("response without a header end")?;
    let head = String::from_utf8_lossy(&buf[..split]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok());
    let status = status.with_context(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let raw = &buf[split + 4..];
    let body = if chunked { dechunk(raw)? } else { raw.to_vec() };
    Ok(HttpResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut raw: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let end = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("truncated chunked body")?;
        let size_line = String::from_utf8_lossy(&raw[..end]);
        let size_hex = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .with_context(|| format!("bad chunk size {size_line:?}"))?;
        raw = &raw[end + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(raw.get(..size).context("truncated chunk")?);
        raw = raw.get(size + 2..).context("truncated chunk")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rsa::pkcs1v15::{Signature, VerifyingKey};
    use rsa::signature::Verifier;

    impl HttpResponse {
        fn json(&self) -> Result<Value> {
            serde_json::from_str(&self.body).with_context(|| format!("not JSON: {}", self.body))
        }
    }

    /// Percent-encodes everything but RFC 3986 unreserved characters.
    fn pct(s: &str) -> String {
        let keep = |b: u8| b.is_ascii_alphanumeric() || b"-._~".contains(&b);
        let enc = |b: u8| {
            if keep(b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        };
        s.bytes().map(enc).collect()
    }

    async fn token_request(fake: &FakeBotConnector, secret: &str) -> Result<HttpResponse> {
        let id = fake.config().app_id.as_str();
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", id),
            ("client_secret", secret),
            ("scope", SCOPE),
        ];
        let form: Vec<String> = form
            .iter()
            .map(|(k, v)| format!("{k}={}", pct(v)))
            .collect();
        let headers = [("Content-Type", "application/x-www-form-urlencoded")];
        http_request(
            "POST",
            &fake.token_url(),
            &headers,
            form.join("&").as_bytes(),
        )
        .await
    }

    async fn access_token(fake: &FakeBotConnector) -> Result<String> {
        let issued = token_request(fake, &fake.config().app_password)
            .await?
            .json()?;
        assert_eq!(issued["expires_in"], 3600);
        Ok(issued["access_token"]
            .as_str()
            .context("access_token")?
            .to_owned())
    }

    async fn call(method: &str, url: &str, token: &str) -> Result<HttpResponse> {
        let auth = format!("Bearer {token}");
        let headers = [
            ("Content-Type", "application/json"),
            ("Authorization", auth.as_str()),
        ];
        http_request(method, url, &headers, br#"{"type":"message","text":"hi"}"#).await
    }

    async fn get(url: &str) -> Result<Value> {
        http_request("GET", url, &[], b"").await?.json()
    }

    /// Checks `jwt`'s RS256 signature against the key the JWKS serves under its kid; returns
    /// the header and the claims.
    fn verify(jwt: &str, jwks: &Value) -> Result<(Value, Value)> {
        let [h, c, sig] = jwt.split('.').collect::<Vec<_>>()[..] else {
            bail!("not three parts: {jwt}");
        };
        let header: Value = serde_json::from_slice(&B64.decode(h)?)?;
        anyhow::ensure!(header["alg"] == "RS256", "alg {}", header["alg"]);
        let keys = jwks["keys"].as_array().context("keys")?;
        let jwk = keys
            .iter()
            .find(|k| k["kid"] == header["kid"])
            .context("kid not served")?;
        let int = |name: &str| -> Result<rsa::BigUint> {
            let text = jwk[name].as_str().context("jwk field")?;
            Ok(rsa::BigUint::from_bytes_be(&B64.decode(text)?))
        };
        let key = VerifyingKey::<Sha256>::new(RsaPublicKey::new(int("n")?, int("e")?)?);
        let sig = Signature::try_from(B64.decode(sig)?.as_slice())?;
        key.verify(format!("{h}.{c}").as_bytes(), &sig)?;
        Ok((header, serde_json::from_slice(&B64.decode(c)?)?))
    }

    #[tokio::test]
    async fn tokens_sends_failures_and_members() -> Result<()> {
        let fake = FakeBotConnector::start(FakeConfig::default()).await?;
        let wrong = token_request(&fake, "wrong-secret").await?;
        assert_eq!(
            (wrong.status, &wrong.json()?["error"]),
            (401, &json!("invalid_client"))
        );
        let token = access_token(&fake).await?;
        assert_eq!(fake.token_requests(), 2);

        let conversation = "19:abc@thread.tacv2;messageid=123";
        let url = format!(
            "{}v3/conversations/{}/activities",
            fake.service_url(),
            pct(conversation)
        );
        let first = call("POST", &url, &token).await?;
        assert_eq!(
            (first.status, first.json()?["id"].clone()),
            (201, json!("1:1"))
        );
        assert_eq!(call("POST", &url, "fake-at-0-forged").await?.status, 401);
        fake.fail_next(1, 429, Some(1));
        let limited = call("POST", &url, &token).await?;
        assert_eq!(limited.status, 429);
        assert!(
            limited
                .headers
                .contains(&("retry-after".into(), "1".into()))
        );
        assert_eq!(limited.json()?["error"]["code"], "TooManyRequests");
        assert_eq!(call("POST", &url, &token).await?.status, 201);
        fake.expire_tokens();
        assert_eq!(call("POST", &url, &token).await?.status, 401);

        let calls = fake
            .wait_calls("five sends", Duration::from_secs(5), |c| c.len() == 5)
            .await?;
        let statuses: Vec<u16> = calls.iter().map(|c| c.status).collect();
        assert_eq!(statuses, [201, 401, 429, 201, 401]);
        assert_eq!(calls[0].conversation_id, conversation);
        assert_eq!(
            calls[0].path,
            format!("/amer/v3/conversations/{conversation}/activities")
        );
        assert_eq!(calls[0].body["text"], "hi");
        assert_eq!(fake.sent().len(), 2);

        let token = access_token(&fake).await?;
        fake.add_member(Member {
            id: "29:1abc".into(),
            aad_object_id: "aad-1".into(),
            name: "Ada Lovelace".into(),
            given_name: "Ada".into(),
            surname: "Lovelace".into(),
            email: "ada@example.com".into(),
            user_principal_name: "ada@example.com".into(),
            tenant_id: fake.config().app_tenant_id.clone(),
        });
        let members = format!("{}v3/conversations/a%3A1xyz/members/", fake.service_url());
        let ada = format!("{members}29%3A1abc");
        let waiter = fake.wait_calls("a lookup", Duration::from_secs(5), |c| c.len() == 6);
        let (calls, found) = tokio::join!(waiter, call("GET", &ada, &token));
        let found = found?;
        assert_eq!(
            (found.status, found.json()?["givenName"].clone()),
            (200, json!("Ada"))
        );
        assert_eq!(calls?[5].conversation_id, "a:1xyz");
        let missing = call("GET", &format!("{members}29%3Anobody"), &token).await?;
        assert_eq!(missing.status, 404);
        assert_eq!(missing.json()?["error"]["code"], "MemberNotFound");
        Ok(())
    }

    #[tokio::test]
    async fn inbound_tokens_verify_against_the_served_jwks() -> Result<()> {
        let fake = FakeBotConnector::start(FakeConfig::default()).await?;
        let service_url = fake.service_url();
        let activity =
            json!({"type": "message", "channelId": "msteams", "serviceUrl": service_url});
        let metadata = get(&fake.openid_metadata_url()).await?;
        assert_eq!(metadata["issuer"], ISSUER);
        assert_eq!(metadata["jwks_uri"], fake.jwks_url());
        let jwks = get(&fake.jwks_url()).await?;
        assert_eq!((fake.metadata_fetches(), fake.jwks_fetches()), (1, 1));
        assert_eq!(jwks["keys"][0]["endorsements"], json!(["msteams"]));

        let (_, claims) = verify(&fake.token_for(&activity), &jwks)?;
        assert_eq!(
            (&claims["iss"], &claims["serviceurl"]),
            (&json!(ISSUER), &json!(service_url))
        );
        assert_eq!(claims["aud"], fake.config().app_id.as_str());

        // Forgeries signed by a served RSA key verify (their claims are what is wrong); the
        // others must not. `NoEndorsement` adds a served `webchat` key.
        let forged: Vec<_> = Forgery::ALL.map(|f| (f, fake.forge(f, &activity))).into();
        let jwks = get(&fake.jwks_url()).await?;
        for (f, jwt) in &forged {
            use Forgery::*;
            let unsigned = matches!(f, AlgNone | Hs256WithPublicKey | UnknownKid | BadSignature);
            match verify(jwt, &jwks) {
                Err(_) => assert!(unsigned, "{f:?} does not verify"),
                Ok((header, claims)) => {
                    assert!(!unsigned, "{f:?} verifies");
                    let keys = jwks["keys"].as_array().context("keys")?;
                    let jwk = keys
                        .iter()
                        .find(|k| k["kid"] == header["kid"])
                        .context("jwk")?;
                    let msteams = jwk["endorsements"] == json!(["msteams"]);
                    assert_eq!(msteams, *f != NoEndorsement, "{f:?}");
                    let wrong_url = claims["serviceurl"] != json!(service_url);
                    assert_eq!(wrong_url, *f == ServiceUrlMismatch, "{f:?}");
                }
            }
        }

        let kid = fake.rotate_key();
        let jwks = get(&fake.jwks_url()).await?;
        assert_eq!(jwks["keys"].as_array().map(Vec::len), Some(3));
        let (header, _) = verify(&fake.token_for(&activity), &jwks)?;
        assert_eq!(header["kid"], kid.as_str());
        Ok(())
    }
}
