//! Authenticating the Bot Connector's requests, as Microsoft's "Authenticate requests from
//! the Bot Connector service" describes: a Bearer JWT signed RS256 by a key from the
//! OpenID metadata's JWKS; issuer; audience = the bot's app id; expiry and not-before with
//! a clock skew; the `serviceurl` claim equal to the activity's `serviceUrl`; the signing
//! key endorsed for the activity's channel.
//!
//! The token is checked before the activity is parsed. Nothing here can be switched off.

use crate::jwt::{JwtConfig, JwtError, JwtVerifier, KeySource};
use std::time::Duration;
use thiserror::Error;

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

impl From<JwtError> for AuthError {
    fn from(e: JwtError) -> Self {
        match e {
            JwtError::Malformed => AuthError::Malformed,
            JwtError::Algorithm => AuthError::Algorithm,
            JwtError::Issuer => AuthError::Issuer,
            JwtError::UnknownKey => AuthError::UnknownKey,
            JwtError::Signature => AuthError::Signature,
            JwtError::Audience => AuthError::Audience,
            JwtError::Expired => AuthError::Expired,
            JwtError::NotYetValid => AuthError::NotYetValid,
            JwtError::KeysUnavailable => AuthError::KeysUnavailable,
        }
    }
}

/// The verifier with its cached signing keys.
pub struct BotAuth {
    verifier: JwtVerifier,
}

impl BotAuth {
    pub fn new(cfg: AuthConfig, http: reqwest::Client) -> Self {
        Self {
            verifier: JwtVerifier::new(
                JwtConfig {
                    keys: KeySource::Metadata(cfg.openid_metadata_url),
                    issuer: cfg.issuer,
                    audience: cfg.audience,
                    skew: cfg.skew,
                    refresh: cfg.refresh,
                    min_refetch: cfg.min_refetch,
                    metric: "fedrelay_teams_jwks_fetches_total",
                },
                http,
            ),
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
        let v = self.verifier.verify(token).await?;
        let service_url = v
            .claims
            .get("serviceurl")
            .and_then(|s| s.as_str())
            .ok_or(AuthError::ServiceUrl)?
            .to_string();
        Ok(Verified {
            service_url,
            endorsements: v.endorsements,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

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
