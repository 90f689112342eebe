//! TLS for tunnels: mutual authentication with certificates the operator
//! gives (PEM certificate chain, private key, and the CA that signs peers).

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use std::path::Path;
use std::sync::Arc;

/// Errors setting up TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {0}")]
    Read(String, #[source] std::io::Error),
    #[error("no PEM {0} found")]
    Pem(&'static str),
    #[error("bad certificate or key")]
    Rustls(#[from] rustls::Error),
    #[error("bad CA certificate")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("{0:?} is not a valid TLS server name")]
    Name(String),
}

/// Client and server configurations from one certificate, key and CA.
#[derive(Clone)]
pub struct TlsConfig {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsConfig")
    }
}

fn read(p: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(p).map_err(|e| TlsError::Read(p.display().to_string(), e))
}

impl TlsConfig {
    pub fn from_pem_files(cert: &Path, key: &Path, ca: &Path) -> Result<TlsConfig, TlsError> {
        Self::from_pem(&read(cert)?, &read(key)?, &read(ca)?)
    }

    /// `cert`: this switch's certificate chain; `key`: its private key;
    /// `ca`: the certificates that sign the peers' certificates.
    pub fn from_pem(cert: &[u8], key: &[u8], ca: &[u8]) -> Result<TlsConfig, TlsError> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<_, _>>()
            .map_err(|_| TlsError::Pem("certificate"))?;
        if certs.is_empty() {
            return Err(TlsError::Pem("certificate"));
        }
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|_| TlsError::Pem("private key"))?;
        let mut roots = RootCertStore::empty();
        let mut n = 0;
        for c in CertificateDer::pem_slice_iter(ca) {
            roots.add(c.map_err(|_| TlsError::Pem("CA certificate"))?)?;
            n += 1;
        }
        if n == 0 {
            return Err(TlsError::Pem("CA certificate"));
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(certs.clone(), key.clone_key())?;
        let verifier =
            WebPkiClientVerifier::builder_with_provider(roots, provider.clone()).build()?;
        let server = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)?;
        Ok(TlsConfig {
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }

    /// A client connection to `host` (a DNS name or an IP address, which
    /// the server's certificate must name).
    pub fn client(&self, host: &str) -> Result<ClientConnection, TlsError> {
        let name =
            ServerName::try_from(host.to_string()).map_err(|_| TlsError::Name(host.to_string()))?;
        Ok(ClientConnection::new(self.client.clone(), name)?)
    }

    pub fn server(&self) -> Result<ServerConnection, TlsError> {
        Ok(ServerConnection::new(self.server.clone())?)
    }
}
