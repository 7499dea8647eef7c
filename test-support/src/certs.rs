//! Certificates for tests: a CA of its own and leaf certificates it signs.

use anyhow::Result;
use std::path::Path;

/// Writes a new CA named `ca_name` to `dir/<prefix>ca.pem`, and for each of `leaves` a
/// certificate it signs for 127.0.0.1 and localhost, `<prefix><leaf>.pem`, with its key,
/// `<prefix><leaf>.key` (PEM). A certificate serves as a server's or a client's alike.
pub fn issue(dir: &Path, prefix: &str, ca_name: &str, leaves: &[&str]) -> Result<()> {
    let named: Vec<(&str, &[&str])> = leaves
        .iter()
        .map(|l| (*l, &["127.0.0.1", "localhost"][..]))
        .collect();
    issue_named(dir, prefix, ca_name, &named)
}

/// Like [`issue`], with each leaf's own subject alternative names: `(file name, names)`.
/// The first name is also the subject's common name (what XMPP and SIP peers check is a
/// `DNS:` SAN naming their domain).
pub fn issue_named(
    dir: &Path,
    prefix: &str,
    ca_name: &str,
    leaves: &[(&str, &[&str])],
) -> Result<()> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, ca_name);
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    std::fs::write(dir.join(format!("{prefix}ca.pem")), ca_cert.pem())?;
    for (leaf, names) in leaves {
        let key = rcgen::KeyPair::generate()?;
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        if let Some(first) = names.first() {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, *first);
        }
        let cert = params.signed_by(&key, &issuer)?;
        std::fs::write(dir.join(format!("{prefix}{leaf}.pem")), cert.pem())?;
        std::fs::write(dir.join(format!("{prefix}{leaf}.key")), key.serialize_pem())?;
    }
    Ok(())
}
