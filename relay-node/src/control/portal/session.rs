//! Portal sessions and sign-ins under way, kept in the state store (Redis in a cluster), so
//! that any node serves any session.
//!
//! A session id is 32 random bytes in the browser's cookie; the store knows it only by its
//! SHA-256. A session holds the bearer token its calls to the management API carry (an OIDC
//! access token, or the API token given at sign-in) and the CSRF token of its forms.

use crate::edges::teams::state::{Kv, StateError};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::time::Duration;

/// A signed-in browser.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Session {
    /// The bearer token of the session's API calls.
    pub token: String,
    /// Who, as the API names them (`oidc:<subject>`, `token:<name>`, `bootstrap`).
    pub name: String,
    /// `admin`, `auditor` or `domain-admin`.
    pub role: String,
    pub domains: Vec<String>,
    /// The token every form of the session carries.
    pub csrf: String,
    pub expires_ms: i64,
}

/// A sign-in at the OpenID Connect provider, between the redirect there and the way back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingLogin {
    /// PKCE: the secret whose hash went to the provider.
    pub verifier: String,
    pub nonce: String,
    /// The value of the browser's sign-in cookie: the callback must come from that browser.
    pub browser: String,
}

/// Random bytes, base64url.
pub fn random_token() -> String {
    URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
}

fn digest(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

pub struct Sessions {
    kv: Box<dyn Kv>,
    prefix: String,
}

/// How long the notice of a change waits for the page after it.
const FLASH_TTL: Duration = Duration::from_secs(60);

/// How long a sign-in at the provider may take.
pub const LOGIN_TTL: Duration = Duration::from_secs(600);

impl Sessions {
    pub fn new(kv: Box<dyn Kv>, prefix: &str) -> Self {
        Self {
            kv,
            prefix: prefix.to_string(),
        }
    }

    fn session_key(&self, id: &str) -> String {
        format!("{}:portal:s:{}", self.prefix, digest(id))
    }

    fn login_key(&self, state: &str) -> String {
        format!("{}:portal:l:{}", self.prefix, digest(state))
    }

    /// Stores a new session; its id, for the cookie.
    pub async fn create(&self, s: &Session) -> Result<String, StateError> {
        let id = random_token();
        let ttl = (s.expires_ms - crate::edges::now_ms()).max(1000) as u64;
        let v = serde_json::to_string(s).map_err(|e| StateError(e.to_string()))?;
        self.kv
            .set(
                &self.session_key(&id),
                "s",
                &v,
                Some(Duration::from_millis(ttl)),
            )
            .await?;
        Ok(id)
    }

    /// The session of a cookie, unless unknown or expired.
    pub async fn get(&self, id: &str) -> Result<Option<Session>, StateError> {
        if id.is_empty() || id.len() > 128 {
            return Ok(None);
        }
        let Some(v) = self.kv.get(&self.session_key(id), "s").await? else {
            return Ok(None);
        };
        Ok(serde_json::from_str::<Session>(&v)
            .ok()
            .filter(|s| s.expires_ms > crate::edges::now_ms()))
    }

    pub async fn end(&self, id: &str) -> Result<(), StateError> {
        self.kv.remove(&self.session_key(id)).await?;
        self.kv.remove(&self.flash_key(id)).await
    }

    fn flash_key(&self, id: &str) -> String {
        format!("{}:portal:f:{}", self.prefix, digest(id))
    }

    /// Keeps what the session's last change did, for the page it is sent to next.
    pub async fn flash(&self, id: &str, message: &str) -> Result<(), StateError> {
        self.kv
            .set(&self.flash_key(id), "m", message, Some(FLASH_TTL))
            .await
    }

    /// The message [`Self::flash`] kept, once.
    pub async fn take_flash(&self, id: &str) -> Result<Option<String>, StateError> {
        let key = self.flash_key(id);
        let m = self.kv.get(&key, "m").await?;
        if m.is_some() {
            self.kv.remove(&key).await?;
        }
        Ok(m)
    }

    pub async fn put_login(&self, state: &str, l: &PendingLogin) -> Result<(), StateError> {
        let v = serde_json::to_string(l).map_err(|e| StateError(e.to_string()))?;
        self.kv
            .set(&self.login_key(state), "l", &v, Some(LOGIN_TTL))
            .await
    }

    /// The sign-in of `state`, once: it is gone afterwards.
    pub async fn take_login(&self, state: &str) -> Result<Option<PendingLogin>, StateError> {
        if state.is_empty() || state.len() > 128 {
            return Ok(None);
        }
        let key = self.login_key(state);
        // Only the first to mark it used gets it.
        let marker = random_token();
        if self.kv.claim(&key, "used", &marker).await? != marker {
            return Ok(None);
        }
        let v = self.kv.get(&key, "l").await?;
        self.kv.remove(&key).await?;
        Ok(v.and_then(|v| serde_json::from_str(&v).ok()))
    }
}
