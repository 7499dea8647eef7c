//! TLS for server-to-server streams (rustls).
//!
//! Incoming: the relay's certificate; a client certificate is asked for but not required, so
//! peers without one can still use dialback. Its signature (possession of the key) is checked
//! in the handshake; whether it is trusted and names the peer's domain is decided afterwards
//! ([`Tls::peer_valid_for`]), when the stream header says which domain the peer claims.
//! Certificates with only the serverAuth purpose are accepted for that (public CAs stop
//! issuing clientAuth ones), as Prosody does.
//!
//! Outgoing: the peer's certificate must be valid for its domain, and the relay presents
//! its own as client certificate for SASL EXTERNAL.

use crate::config::XmppConfig;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use std::path::Path;
use std::sync::Arc;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0} holds no certificate or key")]
    Empty(String),
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The edge's TLS material.
#[derive(Clone)]
pub struct Tls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub connector: tokio_rustls::TlsConnector,
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls")
    }
}

fn read(p: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(p).map_err(|source| TlsError::Read {
        path: p.display().to_string(),
        source,
    })
}

fn certs(p: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let v: Vec<_> = rustls_pemfile::certs(&mut read(p)?.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Read {
            path: p.display().to_string(),
            source,
        })?;
    if v.is_empty() {
        return Err(TlsError::Empty(p.display().to_string()));
    }
    Ok(v)
}

fn key(p: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut read(p)?.as_slice())
        .map_err(|source| TlsError::Read {
            path: p.display().to_string(),
            source,
        })?
        .ok_or_else(|| TlsError::Empty(p.display().to_string()))
}

impl Tls {
    pub fn from_config(cfg: &XmppConfig) -> Result<Self, TlsError> {
        Self::new(&cfg.tls_cert, &cfg.tls_key, cfg.tls_ca.as_deref())
    }

    /// The relay's certificate and key, and the CAs trusted for peers (the system's roots
    /// when `ca` is `None`).
    pub fn new(cert: &Path, key_file: &Path, ca: Option<&Path>) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = certs(cert)?;
        let mut roots = RootCertStore::empty();
        match ca {
            Some(ca) => {
                for c in certs(ca)? {
                    roots.add(c)?;
                }
            }
            None => {
                for c in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(c);
                }
            }
        }
        let roots = Arc::new(roots);
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(Arc::new(AnyClientCert(provider.clone())))
            .with_single_cert(chain.clone(), key(key_file)?)?;
        let client = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(chain, key(key_file)?)?;
        Ok(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
            roots,
            provider,
        })
    }

    /// Whether the certificate chain a peer presented is trusted and names `domain`
    /// (a DNS-ID, as XEP-0178 and RFC 6125 have it).
    pub fn peer_valid_for(&self, chain: &[CertificateDer<'_>], domain: &str) -> bool {
        let Some(ee) = chain.first() else {
            return false;
        };
        let Ok(cert) = webpki::EndEntityCert::try_from(ee) else {
            return false;
        };
        let Ok(name) = ServerName::try_from(domain.to_string()) else {
            return false;
        };
        self.chain_trusted(chain) && cert.verify_is_valid_for_subject_name(&name).is_ok()
    }

    /// Whether a peer's certificate chain leads to a trusted root, for a server or a client
    /// (names are checked apart).
    pub fn chain_trusted(&self, chain: &[CertificateDer<'_>]) -> bool {
        let Some((ee, rest)) = chain.split_first() else {
            return false;
        };
        let Ok(cert) = webpki::EndEntityCert::try_from(ee) else {
            return false;
        };
        let now = UnixTime::now();
        let algs = self.provider.signature_verification_algorithms.all;
        [
            webpki::KeyUsage::client_auth(),
            webpki::KeyUsage::server_auth(),
        ]
        .into_iter()
        .any(|usage| {
            cert.verify_for_usage(algs, &self.roots.roots, rest, now, usage, None, None)
                .is_ok()
        })
    }
}

/// Asks for a client certificate, checks the handshake signature made with its key, and
/// leaves trust to [`Tls::peer_valid_for`].
#[derive(Debug)]
struct AnyClientCert(Arc<CryptoProvider>);

impl ClientCertVerifier for AnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
