//! Where a remote XMPP domain's server listens: a static address from the config, else the
//! `_xmpp-server._tcp.<domain>` SRV records (RFC 6120 §3.2), in priority order with
//! weighted choice within a priority, else the domain itself on port 5269. A target of `.`
//! means the domain offers no XMPP service.

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use std::collections::HashMap;
use std::net::SocketAddr;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ResolveError {
    #[error("{0} offers no XMPP server-to-server service (SRV target \".\")")]
    NoService(String),
    #[error("resolver: {0}")]
    Resolver(String),
}

/// A host and port to try, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
}

pub struct Resolver {
    overrides: HashMap<String, Target>,
    dns: TokioResolver,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("overrides", &self.overrides)
            .finish()
    }
}

/// `host:port` split (IPv6 in brackets).
pub fn split_host_port(s: &str) -> Option<Target> {
    let (h, p) = s.rsplit_once(':')?;
    let h = h.trim_start_matches('[').trim_end_matches(']');
    Some(Target {
        host: h.to_string(),
        port: p.parse().ok()?,
    })
}

/// A DNS resolver asking `dns_server` (`ip:port`), or the system's resolvers.
pub(crate) fn dns_resolver(dns_server: Option<SocketAddr>) -> Result<TokioResolver, String> {
    Ok(match dns_server {
        Some(addr) => {
            let group = NameServerConfigGroup::from_ips_clear(&[addr.ip()], addr.port(), true);
            TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, vec![], group),
                TokioConnectionProvider::default(),
            )
            .with_options(ResolverOpts::default())
            .build()
        }
        None => TokioResolver::builder_tokio()
            .map_err(|e| e.to_string())?
            .build(),
    })
}

impl Resolver {
    pub fn new(
        overrides: HashMap<String, Target>,
        dns_server: Option<SocketAddr>,
    ) -> Result<Self, ResolveError> {
        let dns = dns_resolver(dns_server).map_err(ResolveError::Resolver)?;
        Ok(Self { overrides, dns })
    }

    /// The places to try for `domain`, best first.
    pub async fn targets(&self, domain: &str) -> Result<Vec<Target>, ResolveError> {
        if let Some(t) = self.overrides.get(domain) {
            return Ok(vec![t.clone()]);
        }
        let name = format!("_xmpp-server._tcp.{domain}.");
        match self.dns.srv_lookup(name).await {
            Ok(lookup) => {
                let records: Vec<(u16, u16, String, u16)> = lookup
                    .iter()
                    .map(|s| {
                        (
                            s.priority(),
                            s.weight(),
                            s.target().to_utf8().trim_end_matches('.').to_string(),
                            s.port(),
                        )
                    })
                    .collect();
                order(domain, records, rand::random::<u32>)
            }
            // No SRV records: the domain itself, on the standard port.
            Err(_) => Ok(vec![Target {
                host: domain.to_string(),
                port: 5269,
            }]),
        }
    }
}

/// RFC 2782 ordering: ascending priority; within one, a weighted random order.
pub(crate) fn order(
    domain: &str,
    mut records: Vec<(u16, u16, String, u16)>,
    mut rnd: impl FnMut() -> u32,
) -> Result<Vec<Target>, ResolveError> {
    if records.len() == 1 && records[0].2.is_empty() {
        return Err(ResolveError::NoService(domain.to_string()));
    }
    records.retain(|r| !r.2.is_empty());
    records.sort_by_key(|r| r.0);
    let mut out = Vec::with_capacity(records.len());
    let mut i = 0;
    while i < records.len() {
        let prio = records[i].0;
        let mut group: Vec<_> = records[i..]
            .iter()
            .take_while(|r| r.0 == prio)
            .cloned()
            .collect();
        i += group.len();
        while !group.is_empty() {
            let total: u32 = group.iter().map(|r| u32::from(r.1)).sum();
            let pick = if total == 0 {
                0
            } else {
                let mut x = rnd() % total;
                group
                    .iter()
                    .position(|r| {
                        let w = u32::from(r.1);
                        if x < w {
                            true
                        } else {
                            x -= w;
                            false
                        }
                    })
                    .unwrap_or(0)
            };
            let r = group.remove(pick);
            out.push(Target {
                host: r.2,
                port: r.3,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn srv_records_go_by_priority_then_weight() -> Result<(), ResolveError> {
        let recs = vec![
            (20, 0, "backup.example".to_string(), 5270),
            (10, 0, "zero.example".to_string(), 5269),
            (10, 60, "heavy.example".to_string(), 5269),
        ];
        // A draw of 0 lands in the first non-zero weight.
        let t = order("example", recs.clone(), || 0)?;
        let hosts: Vec<_> = t.iter().map(|t| t.host.as_str()).collect();
        assert_eq!(hosts, ["heavy.example", "zero.example", "backup.example"]);
        assert_eq!(t[2].port, 5270);
        // "." alone: no service at all.
        assert!(matches!(
            order("example", vec![(0, 0, String::new(), 0)], || 0),
            Err(ResolveError::NoService(_))
        ));
        assert_eq!(
            split_host_port("[::1]:5269"),
            Some(Target {
                host: "::1".into(),
                port: 5269
            })
        );
        assert_eq!(split_host_port("nohost"), None);
        Ok(())
    }
}
