//! TLS for the harness's clients: HTTPS to a relay's HTTP edge (trusting the system's roots and
//! any `--tls-ca`), and TLS or mTLS to the nodes' cluster gRPC listeners (`https://` gRPC
//! targets, with `--tls-ca` and optionally a client certificate), all with rustls.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// Where the client TLS material comes from.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// PEM CA certificates to trust besides the system's (HTTPS) / instead of them (gRPC).
    pub ca: Option<PathBuf>,
    /// A client certificate and key (PEM) for the cluster's mTLS.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The name the gRPC servers' certificates carry (default: the target's host).
    pub server_name: Option<String>,
}

/// The clients' TLS settings for one run.
#[derive(Clone)]
pub struct ClientTls {
    http: Arc<rustls::ClientConfig>,
    grpc: Option<ClientTlsConfig>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("grpc", &self.grpc.is_some())
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

impl ClientTls {
    /// Loads the system's roots and the files given.
    pub fn load(files: &TlsFiles) -> Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for cert in native.certs {
            // A system certificate rustls cannot use is skipped, as browsers do.
            let _ = roots.add(cert);
        }
        let ca_pem = files.ca.as_deref().map(read).transpose()?;
        if let Some(pem) = &ca_pem {
            let mut added = 0;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.context("parsing --tls-ca")?;
                roots.add(cert).context("adding a --tls-ca certificate")?;
                added += 1;
            }
            if added == 0 {
                bail!("--tls-ca holds no PEM certificate");
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let http = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let identity = match (&files.cert, &files.key) {
            (Some(c), Some(k)) => Some(Identity::from_pem(read(c)?, read(k)?)),
            (None, None) => None,
            _ => bail!("--grpc-tls-cert and --grpc-tls-key go together"),
        };
        let grpc = match (&ca_pem, identity) {
            (None, None) if files.server_name.is_none() => None,
            (None, _) => bail!("TLS to the cluster's gRPC listeners needs --tls-ca (its CA)"),
            (Some(pem), identity) => {
                let mut c = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
                if let Some(id) = identity {
                    c = c.identity(id);
                }
                if let Some(name) = &files.server_name {
                    c = c.domain_name(name.clone());
                }
                Some(c)
            }
        };
        Ok(Self {
            http: Arc::new(http),
            grpc,
        })
    }

    /// A connector that speaks plain HTTP to `http://` and HTTPS to `https://` URLs.
    pub fn connector(&self, nodelay: bool) -> HttpsConnector<HttpConnector> {
        let mut http = HttpConnector::new();
        http.set_nodelay(nodelay);
        http.set_connect_timeout(Some(std::time::Duration::from_secs(5)));
        http.enforce_http(false);
        hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*self.http).clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(http)
    }

    /// The TLS settings for `https://` gRPC targets, if any were given.
    pub fn grpc(&self) -> Option<&ClientTlsConfig> {
        self.grpc.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_no_files() -> Result<()> {
        let t = ClientTls::load(&TlsFiles::default())?;
        assert!(t.grpc().is_none());
        Ok(())
    }

    #[test]
    fn bad_files_are_refused() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n")?;
        let e = ClientTls::load(&TlsFiles {
            ca: Some(empty),
            ..Default::default()
        });
        assert!(e.is_err_and(|e| format!("{e:#}").contains("no PEM certificate")));
        let e = ClientTls::load(&TlsFiles {
            cert: Some(dir.path().join("c.pem")),
            ..Default::default()
        });
        assert!(e.is_err_and(|e| format!("{e:#}").contains("go together")));
        let e = ClientTls::load(&TlsFiles {
            ca: Some(dir.path().join("missing.pem")),
            ..Default::default()
        });
        assert!(e.is_err_and(|e| format!("{e:#}").contains("missing.pem")));
        Ok(())
    }
}
