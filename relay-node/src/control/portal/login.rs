//! Signing in to the portal at the enterprise's OpenID Connect provider: the authorization
//! code flow with PKCE (S256), `state` bound to the browser and `nonce` checked in the ID
//! token, whose signature, issuer, audience (the portal's client id) and lifetime are
//! verified. The access token asked for (with the API's audience as resource indicator) is
//! what the session's calls to the management API carry: the API, not the portal, decides what
//! the person may do.

use super::session::{PendingLogin, random_token};
use crate::config::PortalLoginConfig;
use crate::jwt::{JwtConfig, JwtVerifier, KeySource};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::time::Duration;
use thiserror::Error;
use tokio::sync::Mutex;

#[derive(Debug, Error)]
pub enum LoginError {
    #[error("the identity provider could not be reached: {0}")]
    Provider(String),
    #[error("the identity provider refused: {0}")]
    Refused(String),
    #[error("the identity provider's ID token is not valid: {0}")]
    IdToken(String),
}

/// The provider's endpoints, from its discovery document.
#[derive(Debug, Clone, Deserialize)]
struct Endpoints {
    authorization_endpoint: String,
    token_endpoint: String,
}

#[derive(Debug, Deserialize)]
struct TokenAnswer {
    access_token: String,
    id_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// What a sign-in brings back.
pub struct SignedIn {
    pub access_token: String,
    /// Seconds the access token lives, as the provider said.
    pub expires_in: Option<u64>,
}

pub struct OidcLogin {
    cfg: PortalLoginConfig,
    issuer: String,
    /// The resource indicator asked for (the management API's audience), if any.
    resource: Option<String>,
    secret: Option<String>,
    http: reqwest::Client,
    endpoints: Mutex<Option<Endpoints>>,
    id_tokens: JwtVerifier,
}

/// The S256 challenge of a PKCE verifier.
pub fn challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

impl OidcLogin {
    pub fn new(
        cfg: PortalLoginConfig,
        issuer: &str,
        audience: &str,
        secret: Option<String>,
        skew: Duration,
        http: reqwest::Client,
    ) -> Self {
        let issuer = issuer.to_string();
        let id_tokens = JwtVerifier::new(
            JwtConfig {
                keys: KeySource::Metadata(discovery_url(&issuer)),
                issuer: issuer.clone(),
                audience: cfg.client_id.clone(),
                skew,
                refresh: Duration::from_secs(3600),
                min_refetch: Duration::from_secs(60),
                metric: "fedrelay_api_jwks_fetches_total",
            },
            http.clone(),
        );
        let resource = match &cfg.resource {
            None => Some(audience.to_string()),
            Some(r) if r.trim().is_empty() => None,
            Some(r) => Some(r.trim().to_string()),
        };
        Self {
            cfg,
            issuer,
            resource,
            secret,
            http,
            endpoints: Mutex::new(None),
            id_tokens,
        }
    }

    pub fn session_secs(&self) -> u64 {
        self.cfg.session_secs
    }

    async fn endpoints(&self) -> Result<Endpoints, LoginError> {
        let mut e = self.endpoints.lock().await;
        if let Some(x) = &*e {
            return Ok(x.clone());
        }
        let r = self
            .http
            .get(discovery_url(&self.issuer))
            .send()
            .await
            .map_err(|e| LoginError::Provider(e.to_string()))?;
        if !r.status().is_success() {
            return Err(LoginError::Provider(format!(
                "discovery answered {}",
                r.status()
            )));
        }
        let x: Endpoints = r
            .json()
            .await
            .map_err(|e| LoginError::Provider(format!("discovery document: {e}")))?;
        *e = Some(x.clone());
        Ok(x)
    }

    /// Where to send the browser, the `state` of the sign-in and what to keep until it comes
    /// back (bound to the browser's sign-in cookie `browser`).
    pub async fn begin(&self, browser: &str) -> Result<(String, String, PendingLogin), LoginError> {
        let ep = self.endpoints().await?;
        let state = random_token();
        let pending = PendingLogin {
            verifier: random_token(),
            nonce: random_token(),
            browser: browser.to_string(),
        };
        let scope = format!("openid {}", self.cfg.scopes.trim());
        let challenge = challenge(&pending.verifier);
        let mut params = vec![
            ("response_type", "code"),
            ("client_id", self.cfg.client_id.as_str()),
            ("redirect_uri", self.cfg.redirect_url.as_str()),
            ("scope", scope.trim()),
            ("state", state.as_str()),
            ("nonce", pending.nonce.as_str()),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
        ];
        if let Some(r) = &self.resource {
            params.push(("resource", r.as_str()));
        }
        let url = reqwest::Url::parse_with_params(&ep.authorization_endpoint, &params)
            .map_err(|e| LoginError::Provider(format!("authorization endpoint: {e}")))?;
        Ok((url.to_string(), state, pending))
    }

    /// Exchanges the code for tokens and verifies the ID token against the sign-in.
    pub async fn finish(&self, code: &str, pending: &PendingLogin) -> Result<SignedIn, LoginError> {
        let ep = self.endpoints().await?;
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", self.cfg.redirect_url.as_str()),
            ("code_verifier", pending.verifier.as_str()),
        ];
        if let Some(r) = &self.resource {
            form.push(("resource", r.as_str()));
        }
        let mut req = self.http.post(&ep.token_endpoint);
        match &self.secret {
            Some(s) => req = req.basic_auth(&self.cfg.client_id, Some(s)),
            None => form.push(("client_id", self.cfg.client_id.as_str())),
        }
        let r = req
            .form(&form)
            .send()
            .await
            .map_err(|e| LoginError::Provider(e.to_string()))?;
        let status = r.status();
        if !status.is_success() {
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            let why = body["error_description"]
                .as_str()
                .or(body["error"].as_str())
                .unwrap_or("no reason given");
            return Err(LoginError::Refused(format!(
                "the token request got {status}: {why}"
            )));
        }
        let t: TokenAnswer = r
            .json()
            .await
            .map_err(|e| LoginError::Provider(format!("token answer: {e}")))?;
        let id_token = t
            .id_token
            .ok_or_else(|| LoginError::IdToken("the answer has no ID token".into()))?;
        let v = self
            .id_tokens
            .verify(&id_token)
            .await
            .map_err(|e| LoginError::IdToken(e.to_string()))?;
        if v.claims.get("nonce").and_then(|n| n.as_str()) != Some(pending.nonce.as_str()) {
            return Err(LoginError::IdToken(
                "its nonce is not the one of this sign-in".into(),
            ));
        }
        Ok(SignedIn {
            access_token: t.access_token,
            expires_in: t.expires_in,
        })
    }
}

fn discovery_url(issuer: &str) -> String {
    format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn login(resource: Option<&str>) -> OidcLogin {
        let l = OidcLogin::new(
            PortalLoginConfig {
                client_id: "portal".into(),
                client_secret_file: None,
                redirect_url: "https://admin.example/portal/callback".into(),
                scopes: "profile".into(),
                resource: resource.map(String::from),
                session_secs: 60,
            },
            "https://idp.example",
            "urn:fedrelay:api",
            None,
            Duration::from_secs(0),
            reqwest::Client::new(),
        );
        l.endpoints
            .try_lock()
            .map(|mut e| {
                *e = Some(Endpoints {
                    authorization_endpoint: "https://idp.example/auth".into(),
                    token_endpoint: "https://idp.example/token".into(),
                })
            })
            .unwrap_or_default();
        l
    }

    async fn params(l: &OidcLogin) -> anyhow::Result<(HashMap<String, String>, PendingLogin)> {
        let (url, state, pending) = l.begin("browser-cookie").await?;
        let url = reqwest::Url::parse(&url)?;
        let q: HashMap<String, String> = url.query_pairs().into_owned().collect();
        anyhow::ensure!(q.get("state") == Some(&state));
        Ok((q, pending))
    }

    #[tokio::test]
    async fn the_authorization_request_carries_pkce_state_nonce_and_the_resource()
    -> anyhow::Result<()> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (q, pending) = params(&login(None)).await?;
        assert_eq!(q["response_type"], "code");
        assert_eq!(q["scope"], "openid profile");
        assert_eq!(q["code_challenge_method"], "S256");
        assert_eq!(q["code_challenge"], challenge(&pending.verifier));
        assert_ne!(q["code_challenge"], pending.verifier);
        assert!(
            pending.verifier.len() >= 43,
            "RFC 7636: 43 to 128 characters"
        );
        assert_eq!(q["nonce"], pending.nonce);
        assert_eq!(pending.browser, "browser-cookie");
        assert_eq!(q["resource"], "urn:fedrelay:api");
        // A second sign-in has its own secrets.
        let (q2, p2) = params(&login(None)).await?;
        assert!(q2["state"] != q["state"] && p2.verifier != pending.verifier);
        // Entra ID style: no resource indicator.
        let (q, _) = params(&login(Some(""))).await?;
        assert!(!q.contains_key("resource"));
        let (q, _) = params(&login(Some("urn:other"))).await?;
        assert_eq!(q["resource"], "urn:other");
        Ok(())
    }
}
