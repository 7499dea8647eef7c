//! Authenticating the Bot Connector's requests, as Microsoft's "Authenticate requests from
//! the Bot Connector service" describes: a Bearer JWT signed RS256 by a key from the
//! OpenID metadata's JWKS; issuer; audience = the bot's app id; expiry and not-before with
//! a clock skew; the `serviceurl` claim equal to the activity's `serviceUrl`; the signing
//! key endorsed for the activity's channel.
//!
//! The token is checked before the activity is parsed. Nothing here can be switched off.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use thiserror::Error;
use tokio::sync::Mutex as AsyncMutex;

/// Why a request was refused. `Forbidden` ones carried a valid token that does not cover
/// this activity (HTTP 403); the others are 401.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing `Authorization: Bearer` token")]
    MissingToken,
    #[error("malformed token")]
    Malformed,
    #[error("token algorithm must be RS256")]
    Algorithm,
    #[error("token issuer is not the Bot Framework")]
    Issuer,
    #[error("token signing key is unknown")]
    UnknownKey,
    #[error("token signature is invalid")]
    Signature,
    #[error("token audience is not this bot")]
    Audience,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet")]
    NotYetValid,
    #[error("signing keys unavailable")]
    KeysUnavailable,
    #[error("token serviceurl does not match the activity's serviceUrl")]
    ServiceUrl,
    #[error("signing key is not endorsed for this channel")]
    Endorsement,
}

impl AuthError {
    pub fn status(&self) -> u16 {
        match self {
            AuthError::ServiceUrl | AuthError::Endorsement => 403,
            AuthError::KeysUnavailable => 503,
            _ => 401,
        }
    }

    /// A stable label for metrics.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::MissingToken => "missing_token",
            AuthError::Malformed => "malformed",
            AuthError::Algorithm => "algorithm",
            AuthError::Issuer => "issuer",
            AuthError::UnknownKey => "unknown_key",
            AuthError::Signature => "signature",
            AuthError::Audience => "audience",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::KeysUnavailable => "keys_unavailable",
            AuthError::ServiceUrl => "service_url",
            AuthError::Endorsement => "endorsement",
        }
    }
}

/// What a verified token says; checked against the activity by [`Verified::check_activity`].
#[derive(Debug, Clone)]
pub struct Verified {
    pub service_url: String,
    endorsements: Vec<String>,
}

impl Verified {
    /// The activity's `serviceUrl` must be the token's (case-insensitively, as the SDK
    /// compares), and its channel must be one the signing key is endorsed for.
    pub fn check_activity(&self, service_url: &str, channel_id: &str) -> Result<(), AuthError> {
        if !self.service_url.eq_ignore_ascii_case(service_url) {
            return Err(AuthError::ServiceUrl);
        }
        // A key with no endorsements is endorsed for nothing (as the Bot Framework SDKs
        // treat it).
        if !self.endorsements.iter().any(|e| e == channel_id) {
            return Err(AuthError::Endorsement);
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub openid_metadata_url: String,
    pub issuer: String,
    pub audience: String,
    pub skew: Duration,
    pub refresh: Duration,
    pub min_refetch: Duration,
}

#[derive(Debug, Clone)]
struct Key {
    n: Vec<u8>,
    e: Vec<u8>,
    endorsements: Vec<String>,
}

#[derive(Default)]
struct KeySet {
    keys: HashMap<String, Key>,
    fetched: Option<Instant>,
    /// When an unknown key id last caused a refetch.
    refetched: Option<Instant>,
    /// When a fetch last failed: no other is tried for [`FETCH_BACKOFF`], so an unreachable
    /// metadata endpoint does not hold every request up.
    failed: Option<Instant>,
}

const FETCH_BACKOFF: Duration = Duration::from_secs(10);

/// The verifier with its cached signing keys.
pub struct BotAuth {
    cfg: AuthConfig,
    http: reqwest::Client,
    keys: AsyncMutex<KeySet>,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    kid: Option<String>,
}

#[derive(Deserialize)]
struct Claims {
    iss: Option<String>,
    #[serde(default)]
    aud: Audience,
    exp: Option<i64>,
    nbf: Option<i64>,
    serviceurl: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(untagged)]
enum Audience {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl Audience {
    fn contains(&self, aud: &str) -> bool {
        match self {
            Audience::None => false,
            Audience::One(a) => a == aud,
            Audience::Many(v) => v.iter().any(|a| a == aud),
        }
    }
}

#[derive(Deserialize)]
struct Metadata {
    jwks_uri: String,
}

#[derive(Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
}

#[derive(Deserialize)]
struct Jwk {
    kty: Option<String>,
    kid: Option<String>,
    n: Option<String>,
    e: Option<String>,
    #[serde(default)]
    endorsements: Vec<String>,
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl BotAuth {
    pub fn new(cfg: AuthConfig, http: reqwest::Client) -> Self {
        Self {
            cfg,
            http,
            keys: AsyncMutex::new(KeySet::default()),
        }
    }

    /// Verifies the `Authorization` header value.
    pub async fn verify(&self, authorization: Option<&str>) -> Result<Verified, AuthError> {
        let token = authorization
            .and_then(|h| {
                let (scheme, rest) = h.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then_some(rest.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::MissingToken)?;
        let mut parts = token.split('.');
        let (Some(h64), Some(c64), Some(s64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed);
        };
        let header: Header = decode_json(h64)?;
        if header.alg != "RS256" {
            return Err(AuthError::Algorithm);
        }
        let claims: Claims = decode_json(c64)?;
        if claims.iss.as_deref() != Some(self.cfg.issuer.as_str()) {
            return Err(AuthError::Issuer);
        }
        let sig = URL_SAFE_NO_PAD
            .decode(s64)
            .map_err(|_| AuthError::Malformed)?;
        let kid = header.kid.ok_or(AuthError::UnknownKey)?;
        let key = self.key(&kid).await?;
        let signed = &token[..h64.len() + 1 + c64.len()];
        ring::signature::RsaPublicKeyComponents {
            n: &key.n,
            e: &key.e,
        }
        .verify(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            signed.as_bytes(),
            &sig,
        )
        .map_err(|_| AuthError::Signature)?;
        if !claims.aud.contains(&self.cfg.audience) {
            return Err(AuthError::Audience);
        }
        let now = now_secs();
        let skew = self.cfg.skew.as_secs() as i64;
        match claims.exp {
            Some(exp) if now <= exp.saturating_add(skew) => {}
            _ => return Err(AuthError::Expired),
        }
        if claims.nbf.is_some_and(|nbf| now < nbf.saturating_sub(skew)) {
            return Err(AuthError::NotYetValid);
        }
        Ok(Verified {
            service_url: claims.serviceurl.ok_or(AuthError::ServiceUrl)?,
            endorsements: key.endorsements,
        })
    }

    /// The key `kid`: from the cache while it is fresh; an unknown id refetches the keys
    /// once, at most once per `min_refetch`. That limit counts only such refetches, not the
    /// scheduled ones: a key rotated in just after a scheduled fetch is still found.
    async fn key(&self, kid: &str) -> Result<Key, AuthError> {
        let mut set = self.keys.lock().await;
        let stale = set.fetched.is_none_or(|t| t.elapsed() >= self.cfg.refresh);
        if !stale && let Some(k) = set.keys.get(kid) {
            return Ok(k.clone());
        }
        let backing_off = set.failed.is_some_and(|t| t.elapsed() < FETCH_BACKOFF);
        if backing_off && set.keys.is_empty() {
            return Err(AuthError::KeysUnavailable);
        }
        let may_refetch = !backing_off
            && (stale
                || set
                    .refetched
                    .is_none_or(|t| t.elapsed() >= self.cfg.min_refetch));
        if may_refetch {
            if !stale {
                set.refetched = Some(Instant::now());
            }
            match self.fetch().await {
                Ok(keys) => {
                    metrics::counter!("fedrelay_teams_jwks_fetches_total", "result" => "ok")
                        .increment(1);
                    set.keys = keys;
                    set.fetched = Some(Instant::now());
                    set.failed = None;
                }
                Err(e) => {
                    metrics::counter!("fedrelay_teams_jwks_fetches_total", "result" => "error")
                        .increment(1);
                    tracing::warn!(error = %e, "could not fetch the Bot Framework signing keys");
                    set.failed = Some(Instant::now());
                    // Keys still cached keep working while the metadata is unreachable.
                    if set.keys.is_empty() {
                        return Err(AuthError::KeysUnavailable);
                    }
                }
            }
        }
        set.keys.get(kid).cloned().ok_or(AuthError::UnknownKey)
    }

    async fn fetch(&self) -> Result<HashMap<String, Key>, reqwest::Error> {
        let meta: Metadata = self
            .http
            .get(&self.cfg.openid_metadata_url)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let jwks: Jwks = self
            .http
            .get(&meta.jwks_uri)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let mut keys = HashMap::new();
        for k in jwks.keys {
            if k.kty.as_deref() != Some("RSA") {
                continue;
            }
            let (Some(kid), Some(n), Some(e)) = (k.kid, k.n, k.e) else {
                continue;
            };
            let (Ok(n), Ok(e)) = (URL_SAFE_NO_PAD.decode(n), URL_SAFE_NO_PAD.decode(e)) else {
                continue;
            };
            keys.insert(
                kid,
                Key {
                    n,
                    e,
                    endorsements: k.endorsements,
                },
            );
        }
        Ok(keys)
    }
}

fn decode_json<T: serde::de::DeserializeOwned>(part: &str) -> Result<T, AuthError> {
    let raw = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| AuthError::Malformed)?;
    serde_json::from_slice(&raw).map_err(|_| AuthError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endorsements_and_service_url_are_checked() {
        let v = Verified {
            service_url: "https://smba.trafficmanager.net/amer/".into(),
            endorsements: vec!["msteams".into()],
        };
        assert!(
            v.check_activity("https://SMBA.trafficmanager.net/amer/", "msteams")
                .is_ok()
        );
        assert_eq!(
            v.check_activity("https://evil.example/amer/", "msteams"),
            Err(AuthError::ServiceUrl)
        );
        assert_eq!(
            v.check_activity("https://smba.trafficmanager.net/amer/", "webchat"),
            Err(AuthError::Endorsement)
        );
        let unendorsed = Verified {
            service_url: "https://smba.trafficmanager.net/amer/".into(),
            endorsements: vec![],
        };
        assert_eq!(
            unendorsed.check_activity("https://smba.trafficmanager.net/amer/", "msteams"),
            Err(AuthError::Endorsement)
        );
    }

    #[tokio::test]
    async fn malformed_tokens_fail_before_any_fetch() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let auth = BotAuth::new(
            AuthConfig {
                // Unreachable: no test here may fetch.
                openid_metadata_url: "http://127.0.0.1:9/meta".into(),
                issuer: "https://api.botframework.com".into(),
                audience: "app".into(),
                skew: Duration::from_secs(300),
                refresh: Duration::from_secs(3600),
                min_refetch: Duration::from_secs(300),
            },
            reqwest::Client::new(),
        );
        let enc = |v: serde_json::Value| URL_SAFE_NO_PAD.encode(v.to_string());
        let none = format!(
            "Bearer {}.{}.",
            enc(serde_json::json!({"alg":"none"})),
            enc(serde_json::json!({"iss":"https://api.botframework.com"}))
        );
        assert_eq!(
            auth.verify(Some(&none)).await.err(),
            Some(AuthError::Algorithm)
        );
        let wrong_iss = format!(
            "Bearer {}.{}.AAAA",
            enc(serde_json::json!({"alg":"RS256","kid":"k"})),
            enc(serde_json::json!({"iss":"https://evil.example"}))
        );
        assert_eq!(
            auth.verify(Some(&wrong_iss)).await.err(),
            Some(AuthError::Issuer)
        );
        assert_eq!(auth.verify(None).await.err(), Some(AuthError::MissingToken));
        assert_eq!(
            auth.verify(Some("Basic abc")).await.err(),
            Some(AuthError::MissingToken)
        );
        assert_eq!(
            auth.verify(Some("Bearer a.b")).await.err(),
            Some(AuthError::Malformed)
        );
        assert_eq!(
            auth.verify(Some("Bearer !!.??.##")).await.err(),
            Some(AuthError::Malformed)
        );
    }
}
