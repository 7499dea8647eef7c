//! Locating a SIP domain's servers (RFC 3263): a static address from the config, else the
//! domain's NAPTR records for the peer's transport (`SIPS+D2T`, `SIP+D2T`, `SIP+D2U`) leading
//! to SRV records, else the SRV names themselves (`_sipfederationtls._tcp` as Skype for
//! Business publishes it, then `_sips._tcp`, `_sip._tcp` or `_sip._udp`), else the domain on
//! the transport's default port. SRV records go in RFC 2782 order.

use crate::config::SipTransport;
use crate::edges::xmpp::resolve::{Target, dns_resolver, order, split_host_port};
use hickory_resolver::TokioResolver;
use hickory_resolver::proto::rr::{RData, RecordType};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ResolveError {
    #[error("{0} offers no SIP service over {1}")]
    NoService(String, &'static str),
    #[error("resolving {0}: {1}")]
    Resolver(String, String),
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

/// The NAPTR service of a transport (RFC 3263 §4.1).
fn naptr_service(t: SipTransport) -> &'static str {
    match t {
        SipTransport::Tls => "SIPS+D2T",
        SipTransport::Tcp => "SIP+D2T",
        SipTransport::Udp => "SIP+D2U",
    }
}

/// The SRV names tried without NAPTR, best first.
fn srv_names(t: SipTransport, domain: &str) -> Vec<String> {
    match t {
        SipTransport::Tls => vec![
            format!("_sipfederationtls._tcp.{domain}."),
            format!("_sips._tcp.{domain}."),
        ],
        SipTransport::Tcp => vec![format!("_sip._tcp.{domain}.")],
        SipTransport::Udp => vec![format!("_sip._udp.{domain}.")],
    }
}

pub fn default_port(t: SipTransport) -> u16 {
    match t {
        SipTransport::Tls => 5061,
        _ => 5060,
    }
}

/// Of NAPTR records (order, preference, flags, service, replacement), the SRV names for
/// `t`, in order then preference.
pub fn naptr_targets(
    mut records: Vec<(u16, u16, String, String, String)>,
    t: SipTransport,
) -> Vec<String> {
    let want = naptr_service(t);
    records.retain(|r| r.2.eq_ignore_ascii_case("s") && r.3.eq_ignore_ascii_case(want));
    records.sort_by_key(|r| (r.0, r.1));
    records.into_iter().map(|r| r.4).collect()
}

impl Resolver {
    pub fn new(
        overrides: HashMap<String, Target>,
        dns_server: Option<SocketAddr>,
    ) -> Result<Self, ResolveError> {
        let dns = dns_resolver(dns_server)
            .map_err(|e| ResolveError::Resolver("the system resolver".into(), e))?;
        Ok(Self { overrides, dns })
    }

    async fn srv(&self, domain: &str, name: &str) -> Result<Option<Vec<Target>>, ResolveError> {
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
                if records.is_empty() {
                    return Ok(None);
                }
                order(domain, records, rand::random::<u32>)
                    .map(Some)
                    .map_err(|e| ResolveError::Resolver(domain.into(), e.to_string()))
            }
            Err(_) => Ok(None),
        }
    }

    /// The hosts and ports to try for `domain` over `t`, best first.
    pub async fn targets(
        &self,
        domain: &str,
        t: SipTransport,
    ) -> Result<Vec<Target>, ResolveError> {
        if let Some(x) = self.overrides.get(domain) {
            return Ok(vec![x.clone()]);
        }
        let mut names = Vec::new();
        if let Ok(l) = self
            .dns
            .lookup(format!("{domain}."), RecordType::NAPTR)
            .await
        {
            let recs = l
                .iter()
                .filter_map(|r| match r {
                    RData::NAPTR(n) => Some((
                        n.order(),
                        n.preference(),
                        String::from_utf8_lossy(n.flags()).into_owned(),
                        String::from_utf8_lossy(n.services()).into_owned(),
                        n.replacement().to_utf8(),
                    )),
                    _ => None,
                })
                .collect::<Vec<_>>();
            if !recs.is_empty() {
                names = naptr_targets(recs, t);
                if names.is_empty() {
                    // NAPTR records exist, none for this transport (RFC 3263 §4.1).
                    return Err(ResolveError::NoService(domain.into(), t.via_name()));
                }
            }
        }
        if names.is_empty() {
            names = srv_names(t, domain);
        }
        for n in names {
            if let Some(v) = self.srv(domain, &n).await? {
                return Ok(v);
            }
        }
        Ok(vec![Target {
            host: domain.to_string(),
            port: default_port(t),
        }])
    }

    /// The socket addresses of a target.
    pub async fn addresses(&self, t: &Target) -> Result<Vec<SocketAddr>, ResolveError> {
        if let Ok(ip) = t.host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, t.port)]);
        }
        let ips = self
            .dns
            .lookup_ip(format!("{}.", t.host))
            .await
            .map_err(|e| ResolveError::Resolver(t.host.clone(), e.to_string()))?;
        Ok(ips.iter().map(|ip| SocketAddr::new(ip, t.port)).collect())
    }
}

/// Reads a peer's `address` setting.
pub fn static_target(s: &str) -> Option<Target> {
    split_host_port(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn naptr_picks_the_transport_in_order_then_preference() {
        let recs = vec![
            (
                20,
                10,
                "s".into(),
                "SIPS+D2T".into(),
                "_sips._tcp.b.example.".into(),
            ),
            (
                10,
                20,
                "s".into(),
                "SIPS+D2T".into(),
                "_sips._tcp.a2.example.".into(),
            ),
            (
                10,
                10,
                "S".into(),
                "SIPS+D2T".into(),
                "_sips._tcp.a1.example.".into(),
            ),
            (
                5,
                10,
                "s".into(),
                "SIP+D2U".into(),
                "_sip._udp.example.".into(),
            ),
            (5, 10, "a".into(), "SIPS+D2T".into(), "host.example.".into()),
        ];
        assert_eq!(
            naptr_targets(recs.clone(), SipTransport::Tls),
            [
                "_sips._tcp.a1.example.",
                "_sips._tcp.a2.example.",
                "_sips._tcp.b.example."
            ]
        );
        assert_eq!(
            naptr_targets(recs.clone(), SipTransport::Udp),
            ["_sip._udp.example."]
        );
        assert!(naptr_targets(recs, SipTransport::Tcp).is_empty());
        assert_eq!(
            srv_names(SipTransport::Tls, "sfb.example")[0],
            "_sipfederationtls._tcp.sfb.example."
        );
        assert_eq!(default_port(SipTransport::Tls), 5061);
    }
}
