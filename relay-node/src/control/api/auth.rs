//! Who is calling the management API, and what their role lets them do.
//!
//! Three kinds of bearer token:
//! - API tokens the API issues: `frt_<id>_<secret>`, shown once; only the SHA-256 of the
//!   secret is stored, with the token's role, domains, expiry and revocation;
//! - the break-glass token of `api.bootstrap_token_file` (role `admin`);
//! - access tokens (JWT, RS256) of the enterprise's OpenID Connect provider, with the roles in
//!   a claim.

use super::ApiError;
use crate::control::policy::store::{PolicyStore, TokenRecord};
use crate::jwt::JwtVerifier;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Everything.
    Admin,
    /// Read-only: the metadata log, usage and the audit log.
    Auditor,
    /// Rules, user controls, groups, approvals and explain for its own internal domains.
    DomainAdmin,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "auditor" => Some(Role::Auditor),
            "domain-admin" => Some(Role::DomainAdmin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Auditor => "auditor",
            Role::DomainAdmin => "domain-admin",
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, Serialize)]
pub struct Principal {
    /// For the audit log: `token:<name>`, `oidc:<subject>`, `bootstrap`.
    pub name: String,
    pub role: Role,
    /// A domain admin's internal domains (lower case).
    pub domains: Vec<String>,
}

impl Principal {
    /// Refuses unless the caller has one of `roles`.
    pub fn require(&self, roles: &[Role]) -> Result<(), ApiError> {
        if roles.contains(&self.role) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "the {} role may not do this",
                self.role.as_str()
            )))
        }
    }

    /// Whether the caller administers `domain` (admins administer every domain).
    pub fn owns_domain(&self, domain: &str) -> bool {
        match self.role {
            Role::Admin => true,
            Role::DomainAdmin => self.domains.iter().any(|d| d == domain),
            Role::Auditor => false,
        }
    }
}

/// The API's authenticator.
pub struct Authenticator {
    store: Arc<dyn PolicyStore>,
    bootstrap_sha256: Option<[u8; 32]>,
    oidc: Option<OidcAuth>,
}

pub struct OidcAuth {
    pub verifier: JwtVerifier,
    pub roles_claim: String,
    pub domains_claim: String,
}

fn sha256(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

/// Equality in time independent of where the inputs differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A new token: `(token, id, hex sha256 of the secret)`.
pub fn new_token() -> (String, String, String) {
    let id = hex::encode(rand::random::<[u8; 8]>());
    let secret = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
    let hash = hex::encode(sha256(secret.as_bytes()));
    (format!("frt_{id}_{secret}"), id, hash)
}

fn now_ms() -> i64 {
    crate::edges::now_ms()
}

impl Authenticator {
    pub fn new(
        store: Arc<dyn PolicyStore>,
        bootstrap_token: Option<&str>,
        oidc: Option<OidcAuth>,
    ) -> Self {
        Self {
            store,
            bootstrap_sha256: bootstrap_token.map(|t| sha256(t.trim().as_bytes())),
            oidc,
        }
    }

    /// The caller of a request with this `Authorization` header.
    pub async fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, ApiError> {
        let token = authorization
            .and_then(|h| {
                let (scheme, rest) = h.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then_some(rest.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ApiError::unauthorized("a bearer token is required"))?;
        if let Some(rest) = token.strip_prefix("frt_") {
            return self.api_token(rest).await;
        }
        if let Some(h) = &self.bootstrap_sha256
            && same(&sha256(token.as_bytes()), h)
        {
            return Ok(Principal {
                name: "bootstrap".into(),
                role: Role::Admin,
                domains: Vec::new(),
            });
        }
        if token.split('.').count() == 3
            && let Some(o) = &self.oidc
        {
            return self.oidc_token(o, token).await;
        }
        Err(ApiError::unauthorized("the token is not valid"))
    }

    async fn api_token(&self, rest: &str) -> Result<Principal, ApiError> {
        let invalid = || ApiError::unauthorized("the token is not valid");
        let (id, secret) = rest.split_once('_').ok_or_else(invalid)?;
        if id.len() != 16 || !id.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(invalid());
        }
        let rec: TokenRecord = self
            .store
            .get_token(id)
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?
            .ok_or_else(invalid)?;
        let stored = hex::decode(&rec.secret_sha256).map_err(|_| invalid())?;
        if !same(&sha256(secret.as_bytes()), &stored) {
            return Err(invalid());
        }
        if rec.revoked_at_ms.is_some() {
            return Err(ApiError::unauthorized("the token has been revoked"));
        }
        if rec.expires_at_ms.is_some_and(|e| e <= now_ms()) {
            return Err(ApiError::unauthorized("the token has expired"));
        }
        let role = Role::parse(&rec.role).ok_or_else(invalid)?;
        Ok(Principal {
            name: format!("token:{}", rec.name),
            role,
            domains: rec.domains,
        })
    }

    async fn oidc_token(&self, o: &OidcAuth, token: &str) -> Result<Principal, ApiError> {
        let claims = o
            .verifier
            .verify(token)
            .await
            .map_err(|e| ApiError::unauthorized(format!("the token is not valid: {e}")))?
            .claims;
        let strings = |name: &str| -> Vec<String> {
            match claims.get(name) {
                Some(serde_json::Value::String(s)) => s
                    .split([' ', ','])
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect(),
                Some(serde_json::Value::Array(a)) => a
                    .iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect(),
                _ => Vec::new(),
            }
        };
        // The strongest role the token carries.
        let roles = strings(&o.roles_claim);
        let role = [Role::Admin, Role::DomainAdmin, Role::Auditor]
            .into_iter()
            .find(|r| roles.iter().any(|x| x == r.as_str()))
            .ok_or_else(|| ApiError::forbidden("the token carries no fedrelay role"))?;
        let subject = claims
            .get("sub")
            .and_then(|s| s.as_str())
            .unwrap_or("unknown");
        Ok(Principal {
            name: format!("oidc:{subject}"),
            role,
            domains: strings(&o.domains_claim)
                .iter()
                .map(|d| d.to_ascii_lowercase())
                .collect(),
        })
    }
}
