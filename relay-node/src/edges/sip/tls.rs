//! Which SIP domains a peer's certificate proves (RFC 5922 §7.1): the chain must lead to a
//! trusted root; then the domains are the `sip:` URIs among its subjectAltNames, else its DNS
//! names, else (only when it has no subjectAltName at all) its Common Name. Wildcards never
//! match (§7.2).

use crate::edges::xmpp::tls::Tls;
use rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The domains (lowercase) a trusted certificate names, per RFC 5922.
pub fn domains_of(ee: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, cert)) = X509Certificate::from_der(ee.as_ref()) else {
        return Vec::new();
    };
    let mut uris = Vec::new();
    let mut dns = Vec::new();
    let mut has_san = false;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        has_san = true;
        for n in &san.value.general_names {
            match n {
                GeneralName::URI(u) => {
                    // sip:domain only: a user part or parameters make it not a domain identity.
                    if let Some(d) = u.strip_prefix("sip:").or_else(|| u.strip_prefix("SIP:"))
                        && !d.contains(['@', ';', '?', ':'])
                    {
                        uris.push(d.to_ascii_lowercase());
                    }
                }
                GeneralName::DNSName(d) => dns.push(d.to_ascii_lowercase()),
                _ => {}
            }
        }
    }
    let mut out = if !uris.is_empty() {
        uris
    } else if !dns.is_empty() {
        dns
    } else if !has_san {
        cert.subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok())
            .map(str::to_ascii_lowercase)
            .collect()
    } else {
        Vec::new()
    };
    out.retain(|d| !d.contains('*') && !d.is_empty());
    out
}

/// The transport's check of TLS peers: trusted chain, then RFC 5922 names.
pub struct PeerCheck(pub Tls);

impl super::transport::PeerNames for PeerCheck {
    fn names(&self, chain: &[CertificateDer<'_>]) -> Vec<String> {
        match chain.first() {
            Some(ee) if self.0.chain_trusted(chain) => domains_of(ee),
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::domains_of;
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};

    type R<T> = Result<T, Box<dyn std::error::Error>>;

    /// The domains a self-signed certificate with these names proves.
    fn names(sans: Vec<SanType>, cn: &str) -> R<Vec<String>> {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.subject_alt_names = sans;
        p.distinguished_name.push(DnType::CommonName, cn);
        let k = KeyPair::generate()?;
        Ok(domains_of(p.self_signed(&k)?.der()))
    }

    #[test]
    fn sip_uris_win_over_dns_names_and_wildcards_never_match() -> R<()> {
        let uri = |s: &str| -> R<SanType> { Ok(SanType::URI(s.try_into()?)) };
        let dns = |s: &str| -> R<SanType> { Ok(SanType::DnsName(s.try_into()?)) };
        assert_eq!(
            names(
                vec![
                    uri("sip:Sip.Example")?,
                    dns("other.example")?,
                    uri("sip:bob@x.example")?
                ],
                "cn.example"
            )?,
            ["sip.example"]
        );
        assert_eq!(
            names(vec![dns("a.example")?, dns("*.b.example")?], "cn.example")?,
            ["a.example"]
        );
        // The CN counts only without any subjectAltName.
        assert_eq!(names(vec![], "cn.example")?, ["cn.example"]);
        assert!(
            names(
                vec![SanType::IpAddress([127, 0, 0, 1].into())],
                "cn.example"
            )?
            .is_empty()
        );
        Ok(())
    }
}
