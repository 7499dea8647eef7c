//! Verifying RS256 JSON Web Tokens against an issuer's published keys (JWKS, found through
//! OpenID Connect discovery metadata or named directly): signature, issuer, audience, expiry
//! and not-before with a clock skew. The Bot Framework's tokens (the Teams edge) and the
//! management API's OpenID Connect tokens are both checked here.
//!
//! Keys are cached and refreshed on a schedule; an unknown key id refetches them, at most once
//! per `min_refetch`; a failed fetch is not retried for ten seconds, and keys already cached
//! keep working while the issuer is unreachable.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use thiserror::Error;
use tokio::sync::Mutex as AsyncMutex;

#[derive(Debug, Error, PartialEq, Eq, Clone, Copy)]
pub enum JwtError {
    #[error("malformed token")]
    Malformed,
    #[error("token algorithm must be RS256")]
    Algorithm,
    #[error("token issuer is not the expected one")]
    Issuer,
    #[error("token signing key is unknown")]
    UnknownKey,
    #[error("token signature is invalid")]
    Signature,
    #[error("token audience is not this service")]
    Audience,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet")]
    NotYetValid,
    #[error("signing keys unavailable")]
    KeysUnavailable,
}

/// Where the keys are and what the tokens must say.
#[derive(Debug, Clone)]
pub struct JwtConfig {
    pub keys: KeySource,
    pub issuer: String,
    pub audience: String,
    pub skew: Duration,
    pub refresh: Duration,
    pub min_refetch: Duration,
    /// The counter of key fetches, by `result` (`ok`, `error`).
    pub metric: &'static str,
}

#[derive(Debug, Clone)]
pub enum KeySource {
    /// An OpenID Connect discovery document naming `jwks_uri`.
    Metadata(String),
    /// The JWKS itself.
    Jwks(String),
}

#[derive(Debug, Clone)]
pub struct Key {
    n: Vec<u8>,
    e: Vec<u8>,
    /// The Bot Framework's channel endorsements of the key.
    pub endorsements: Vec<String>,
}

/// A verified token's claims, and the key's endorsements.
#[derive(Debug, Clone)]
pub struct Verified {
    pub claims: serde_json::Map<String, serde_json::Value>,
    pub endorsements: Vec<String>,
}

#[derive(Default)]
struct KeySet {
    keys: HashMap<String, Key>,
    fetched: Option<Instant>,
    /// When an unknown key id last caused a refetch.
    refetched: Option<Instant>,
    /// When a fetch last failed: no other is tried for [`FETCH_BACKOFF`], so an unreachable
    /// issuer does not hold every request up.
    failed: Option<Instant>,
}

const FETCH_BACKOFF: Duration = Duration::from_secs(10);

/// The verifier with its cached signing keys.
pub struct JwtVerifier {
    cfg: JwtConfig,
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

fn decode_json<T: serde::de::DeserializeOwned>(part: &str) -> Result<T, JwtError> {
    let raw = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| JwtError::Malformed)?;
    serde_json::from_slice(&raw).map_err(|_| JwtError::Malformed)
}

impl JwtVerifier {
    pub fn new(cfg: JwtConfig, http: reqwest::Client) -> Self {
        Self {
            cfg,
            http,
            keys: AsyncMutex::new(KeySet::default()),
        }
    }

    /// Verifies a compact JWT. The algorithm and issuer are checked before any key fetch.
    pub async fn verify(&self, token: &str) -> Result<Verified, JwtError> {
        let mut parts = token.split('.');
        let (Some(h64), Some(c64), Some(s64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed);
        };
        let header: Header = decode_json(h64)?;
        if header.alg != "RS256" {
            return Err(JwtError::Algorithm);
        }
        let claims_map: serde_json::Map<String, serde_json::Value> = decode_json(c64)?;
        let claims: Claims = serde_json::from_value(serde_json::Value::Object(claims_map.clone()))
            .map_err(|_| JwtError::Malformed)?;
        if claims.iss.as_deref() != Some(self.cfg.issuer.as_str()) {
            return Err(JwtError::Issuer);
        }
        let sig = URL_SAFE_NO_PAD
            .decode(s64)
            .map_err(|_| JwtError::Malformed)?;
        let kid = header.kid.ok_or(JwtError::UnknownKey)?;
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
        .map_err(|_| JwtError::Signature)?;
        if !claims.aud.contains(&self.cfg.audience) {
            return Err(JwtError::Audience);
        }
        let now = now_secs();
        let skew = self.cfg.skew.as_secs() as i64;
        match claims.exp {
            Some(exp) if now <= exp.saturating_add(skew) => {}
            _ => return Err(JwtError::Expired),
        }
        if claims.nbf.is_some_and(|nbf| now < nbf.saturating_sub(skew)) {
            return Err(JwtError::NotYetValid);
        }
        Ok(Verified {
            claims: claims_map,
            endorsements: key.endorsements,
        })
    }

    /// The key `kid`: from the cache while it is fresh; an unknown id refetches the keys
    /// once, at most once per `min_refetch`. That limit counts only such refetches, not the
    /// scheduled ones: a key rotated in just after a scheduled fetch is still found.
    async fn key(&self, kid: &str) -> Result<Key, JwtError> {
        let mut set = self.keys.lock().await;
        let stale = set.fetched.is_none_or(|t| t.elapsed() >= self.cfg.refresh);
        if !stale && let Some(k) = set.keys.get(kid) {
            return Ok(k.clone());
        }
        let backing_off = set.failed.is_some_and(|t| t.elapsed() < FETCH_BACKOFF);
        if backing_off && set.keys.is_empty() {
            return Err(JwtError::KeysUnavailable);
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
            let metric = self.cfg.metric;
            match self.fetch().await {
                Ok(keys) => {
                    metrics::counter!(metric, "result" => "ok").increment(1);
                    set.keys = keys;
                    set.fetched = Some(Instant::now());
                    set.failed = None;
                }
                Err(e) => {
                    metrics::counter!(metric, "result" => "error").increment(1);
                    tracing::warn!(metric, error = %e, "could not fetch the token signing keys");
                    set.failed = Some(Instant::now());
                    // Keys still cached keep working while the issuer is unreachable.
                    if set.keys.is_empty() {
                        return Err(JwtError::KeysUnavailable);
                    }
                }
            }
        }
        set.keys.get(kid).cloned().ok_or(JwtError::UnknownKey)
    }

    async fn fetch(&self) -> Result<HashMap<String, Key>, reqwest::Error> {
        let jwks_uri = match &self.cfg.keys {
            KeySource::Jwks(u) => u.clone(),
            KeySource::Metadata(u) => {
                let meta: Metadata = self
                    .http
                    .get(u)
                    .send()
                    .await?
                    .error_for_status()?
                    .json()
                    .await?;
                meta.jwks_uri
            }
        };
        let jwks: Jwks = self
            .http
            .get(&jwks_uri)
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
