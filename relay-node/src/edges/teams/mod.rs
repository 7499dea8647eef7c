//! The Teams edge: a Bot Framework bot. Activities come in at `POST /api/messages`, each
//! authenticated as the Bot Connector's (`auth`); the edge turns them into envelopes or bot
//! commands (`inbound`, `commands`) and delivers envelopes back out through the Bot
//! Connector's REST API (`outbound`, `connector`). What it remembers is in `state`. The
//! user's side of it is in `docs/teams.md`.

pub mod activity;
pub mod auth;
pub mod commands;
pub mod connector;
pub mod html;
pub mod inbound;
pub mod outbound;
pub mod state;

use crate::config::{Config, ConfigError, Platform, TeamsConfig};
use crate::control::policy::{Policy, PolicyError};
use auth::{AuthConfig, BotAuth};
use commands::Addr;
use connector::{Connector, ConnectorConfig, ConnectorError};
use fedrelay_proto::{Address, Envelope, v1};
use serde_json::{Value, json};
use session_actor::{Accepted, Ingress, MetadataSink, SessionError};
use state::{TeamsState, TeamsUser};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub use inbound::router;

/// The Teams edge, shared by its inbound and outbound halves.
pub struct TeamsEdge {
    cfg: TeamsConfig,
    /// Tenant id (lowercase) → the domain its users' addresses are on.
    tenants: HashMap<String, String>,
    auth: BotAuth,
    connector: Connector,
    state: TeamsState,
    policy: Arc<Policy>,
    /// Set once the node's router exists (it needs the edges to exist first).
    ingress: OnceLock<Arc<dyn Ingress>>,
    metadata: Arc<dyn MetadataSink>,
    /// When each user's automatic "available" was last published, on this node.
    presence_seen: Mutex<HashMap<String, Instant>>,
    /// When typing was last shown in each conversation, on this node.
    typing_seen: Mutex<HashMap<String, Instant>>,
}

/// Automatic presence from activity is published at most this often per user.
const PRESENCE_EVERY: Duration = Duration::from_secs(300);
/// Teams shows a typing indicator for about 3 s; sending more often is waste.
const TYPING_EVERY: Duration = Duration::from_secs(3);

/// The stable short key of a Teams channel, the user part of its relay address `#<key>`.
pub fn channel_key(channel_id: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(channel_id.as_bytes())[..8])
}

/// The platform's name as people read it.
pub fn platform_label(p: &str) -> &str {
    match p {
        "http" => "HTTP",
        "teams" => "Teams",
        "xmpp" => "XMPP",
        "sip" => "SIP",
        "slack" => "Slack",
        "matrix" => "Matrix",
        other => other,
    }
}

impl TeamsEdge {
    /// The edge for `cfg`, or `None` when it has no `[teams]` section.
    pub fn from_config(
        cfg: &Config,
        state: TeamsState,
        policy: Arc<Policy>,
        metadata: Arc<dyn MetadataSink>,
    ) -> Result<Option<Arc<Self>>, ConfigError> {
        let Some(t) = cfg.teams.clone() else {
            return Ok(None);
        };
        let tenants: HashMap<String, String> = cfg
            .domains
            .iter()
            .filter(|d| d.platform == Platform::Teams)
            .filter_map(|d| {
                Some((
                    d.tenant_id.as_deref()?.trim().to_ascii_lowercase(),
                    d.name.to_ascii_lowercase(),
                ))
            })
            .collect();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(t.request_timeout_ms))
            .connect_timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ConfigError::Invalid(format!("teams: HTTP client: {e}")))?;
        let auth = BotAuth::new(
            AuthConfig {
                openid_metadata_url: t.openid_metadata_url.clone(),
                issuer: t.issuer.clone(),
                audience: t.app_id.clone(),
                skew: Duration::from_secs(t.clock_skew_secs),
                refresh: Duration::from_secs(t.jwks_refresh_secs),
                min_refetch: Duration::from_secs(t.jwks_min_refetch_secs),
            },
            http.clone(),
        );
        let connector = Connector::new(
            ConnectorConfig {
                app_id: t.app_id.clone(),
                app_password: t.password()?,
                token_url: t.token_url(),
                scope: t.token_scope.clone(),
                service_url_prefixes: t.service_url_prefixes.clone(),
            },
            http,
        );
        Ok(Some(Arc::new(Self {
            cfg: t,
            tenants,
            auth,
            connector,
            state,
            policy,
            ingress: OnceLock::new(),
            metadata,
            presence_seen: Mutex::default(),
            typing_seen: Mutex::default(),
        })))
    }

    /// What the edge keeps about Teams users (profiles, contacts, conversations).
    pub fn state(&self) -> &TeamsState {
        &self.state
    }

    /// Connects the edge to the node's router.
    pub fn set_ingress(&self, ingress: Arc<dyn Ingress>) {
        let _ = self.ingress.set(ingress);
    }

    pub(crate) async fn submit(&self, env: Envelope) -> Result<Accepted, SessionError> {
        crate::edges::submit(&self.ingress, "teams", env).await
    }

    pub(crate) fn address_of(u: &TeamsUser) -> Address {
        Address::new("teams", u.domain.clone(), u.user.clone())
    }

    /// The address of `a` as the policy sees it from `from_domain`: its platform, if the
    /// two domains are federated.
    pub(crate) fn resolve(&self, from_domain: &str, a: &Addr) -> Result<Address, PolicyError> {
        let platform = self.policy.check(from_domain, &a.domain)?;
        Ok(Address::new(
            platform.as_str(),
            a.domain.clone(),
            a.user.clone(),
        ))
    }

    /// Records a refusal in the metadata log (never content).
    pub(crate) fn record_refusal(&self, from: &Address, to: &Addr, code: &str) {
        crate::edges::record_refusal(self.metadata.as_ref(), from, &to.domain, &to.user, code);
    }

    /// A 1:1 envelope from a Teams user.
    pub(crate) fn envelope(
        from: &Address,
        to: &Address,
        native_id: String,
        body: v1::envelope::Body,
    ) -> Envelope {
        crate::edges::one_to_one("teams", from, to, native_id, body)
    }

    /// Posts a bot message (HTML) to a conversation.
    pub(crate) async fn post(
        &self,
        service_url: &str,
        conversation: &str,
        tenant: &str,
        html: &str,
        extra: Option<(&str, Value)>,
    ) -> Result<String, ConnectorError> {
        let mut activity = json!({
            "type": "message",
            "textFormat": "xml",
            "text": html,
        });
        if let Some((k, v)) = extra {
            activity[k] = v;
        }
        self.connector
            .send(service_url, conversation, tenant, &activity)
            .await
    }

    /// Publishes a Teams user's presence to the contacts who follow it.
    pub(crate) async fn publish_presence(
        &self,
        u: &TeamsUser,
        availability: v1::presence::Availability,
        note: String,
    ) -> Result<(), SessionError> {
        let me = Self::address_of(u);
        let mut env = Self::envelope(
            &me,
            &me,
            format!("presence:{}", uuid::Uuid::now_v7()),
            v1::envelope::Body::Presence(v1::Presence {
                availability: availability as i32,
                note,
            }),
        );
        env.recipients.clear();
        self.submit(env).await.map(|_| ())
    }

    /// Activity means presence: "available", at most every few minutes, unless the user
    /// set a status themselves.
    pub(crate) async fn seen(&self, u: &TeamsUser) {
        let key = format!("{}@{}", u.user, u.domain);
        let due = self
            .presence_seen
            .lock()
            .is_ok_and(|m| m.get(&key).is_none_or(|t| t.elapsed() >= PRESENCE_EVERY));
        if !due || matches!(self.state.status(&u.domain, &u.user).await, Ok(Some(_))) {
            return;
        }
        if self
            .publish_presence(u, v1::presence::Availability::Available, String::new())
            .await
            .is_ok()
            && let Ok(mut m) = self.presence_seen.lock()
        {
            if m.len() > 100_000 {
                m.retain(|_, t| t.elapsed() < PRESENCE_EVERY);
            }
            m.insert(key, Instant::now());
        }
    }

    /// Whether a typing indicator may be shown in `conversation` now.
    pub(crate) fn typing_due(&self, conversation: &str) -> bool {
        let Ok(mut m) = self.typing_seen.lock() else {
            return false;
        };
        if m.get(conversation)
            .is_some_and(|t| t.elapsed() < TYPING_EVERY)
        {
            return false;
        }
        if m.len() > 100_000 {
            m.retain(|_, t| t.elapsed() < TYPING_EVERY);
        }
        m.insert(conversation.to_string(), Instant::now());
        true
    }
}
