//! The HTTP edge: signed JSON events in (`POST /v1/events`), deliveries out by signed webhook
//! push or by a resumable event stream (`GET /v1/stream`). The format is in
//! `docs/http-edge.md`; the OpenAPI document is served at `/openapi.json`.

pub mod codec;
pub mod inbound;
pub mod openapi;
pub mod outbound;
pub mod sign;

pub use inbound::{Inbound, router};
pub use outbound::HttpOutbound;

use crate::config::{Config, ConfigError, Delivery, Platform};
use std::collections::HashMap;

/// What the edge knows of each domain it serves.
#[derive(Debug, Clone)]
pub struct DomainEntry {
    pub name: String,
    pub secret: Vec<u8>,
    pub delivery: Delivery,
    pub webhook_url: Option<String>,
}

/// The HTTP-edge domains, by lowercase name.
#[derive(Debug, Default)]
pub struct Domains(HashMap<String, DomainEntry>);

impl Domains {
    pub fn from_config(cfg: &Config) -> Result<Self, ConfigError> {
        let secrets = cfg.secrets()?;
        let mut map = HashMap::new();
        for d in cfg.domains.iter().filter(|d| d.platform == Platform::Http) {
            let name = d.name.to_ascii_lowercase();
            let secret = secrets.get(&name).cloned().unwrap_or_default();
            map.insert(
                name.clone(),
                DomainEntry {
                    name,
                    secret,
                    delivery: d.delivery,
                    webhook_url: d.webhook_url.clone(),
                },
            );
        }
        Ok(Self(map))
    }

    pub fn get(&self, name: &str) -> Option<&DomainEntry> {
        self.0.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &DomainEntry> {
        self.0.values()
    }
}
