//! Federation policy: which domains the relay serves, on which platform, and which pairs of
//! domains may talk. Compiled once into hash lookups, so the message path does no I/O.

use crate::config::{Config, Platform};
use std::collections::{HashMap, HashSet};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("domain {0} is not served by this relay")]
    UnknownDomain(String),
    #[error("no federation rule connects {from} and {to}")]
    NotFederated { from: String, to: String },
}

impl PolicyError {
    pub fn code(&self) -> &'static str {
        match self {
            PolicyError::UnknownDomain(_) => "unknown_domain",
            PolicyError::NotFederated { .. } => "not_federated",
        }
    }
}

/// The compiled policy.
#[derive(Debug, Clone)]
pub struct Policy {
    domains: HashMap<String, Platform>,
    allowed: HashSet<(String, String)>,
}

impl Policy {
    pub fn from_config(cfg: &Config) -> Self {
        let domains = cfg
            .domains
            .iter()
            .map(|d| (d.name.to_ascii_lowercase(), d.platform))
            .collect();
        let mut allowed = HashSet::new();
        for r in &cfg.federation {
            let a = r.between[0].to_ascii_lowercase();
            let b = r.between[1].to_ascii_lowercase();
            allowed.insert((a.clone(), b.clone()));
            allowed.insert((b, a));
        }
        Self { domains, allowed }
    }

    /// The platform a served domain lives on.
    pub fn platform_of(&self, domain: &str) -> Result<Platform, PolicyError> {
        self.domains
            .get(domain)
            .copied()
            .ok_or_else(|| PolicyError::UnknownDomain(domain.to_string()))
    }

    /// Whether a user of `from` may send to a user of `to`. Domains are lowercase.
    pub fn check(&self, from: &str, to: &str) -> Result<Platform, PolicyError> {
        self.platform_of(from)?;
        let platform = self.platform_of(to)?;
        // The pair lookup borrows no allocation when both are present.
        if self.allowed.contains(&(from.to_string(), to.to_string())) {
            Ok(platform)
        } else {
            Err(PolicyError::NotFederated {
                from: from.to_string(),
                to: to.to_string(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_federated_pairs_pass() -> Result<(), Box<dyn std::error::Error>> {
        let mut cfg = Config::dev(std::iter::empty())?;
        cfg.domains.push(crate::config::DomainConfig {
            name: "gamma.example".into(),
            platform: Platform::Http,
            secret: Some("0123456789abcdef".into()),
            secret_file: None,
            delivery: crate::config::Delivery::Stream,
            webhook_url: None,
            tenant_id: None,
        });
        let p = Policy::from_config(&cfg);
        assert_eq!(p.check("alpha.example", "beta.example")?, Platform::Http);
        assert_eq!(p.check("beta.example", "alpha.example")?, Platform::Http);
        assert_eq!(
            p.check("alpha.example", "gamma.example"),
            Err(PolicyError::NotFederated {
                from: "alpha.example".into(),
                to: "gamma.example".into()
            })
        );
        assert_eq!(
            p.check("alpha.example", "evil.example"),
            Err(PolicyError::UnknownDomain("evil.example".into()))
        );
        // A domain does not talk to itself through the relay unless a rule says so.
        assert!(p.check("alpha.example", "alpha.example").is_err());
        Ok(())
    }
}
