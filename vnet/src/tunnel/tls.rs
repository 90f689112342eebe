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
    #[error(
        "{file} holds a {holds} and no {wants}: are the certificate (--tls-cert) and the key (--tls-key) swapped?"
    )]
    Swapped {
        file: String,
        holds: &'static str,
        wants: &'static str,
    },
    #[error("{file} holds no PEM {wants} (a \"-----BEGIN {marker}-----\" block)")]
    NoPem {
        file: String,
        wants: &'static str,
        marker: &'static str,
    },
    #[error(
        "the private key in {key} does not belong to the certificate in {cert}: give the key made with that certificate"
    )]
    KeyMismatch { cert: String, key: String },
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

/// What a PEM file should hold.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PemKind {
    Certificate,
    Key,
    CaCertificate,
}

/// Checks that `pem` (the text of `file`) holds what it should, and says
/// so when it holds the other thing instead (a certificate and a key
/// given the wrong way round).
fn check_pem(pem: &[u8], file: &str, want: PemKind) -> Result<(), TlsError> {
    let has = |needle: &[u8]| pem.windows(needle.len()).any(|w| w == needle);
    let cert = has(b"-----BEGIN CERTIFICATE-----");
    let key = has(b"PRIVATE KEY-----");
    let file = file.to_string();
    match want {
        PemKind::Certificate | PemKind::CaCertificate if cert => Ok(()),
        PemKind::Key if key => Ok(()),
        PemKind::Certificate if key => Err(TlsError::Swapped {
            file,
            holds: "private key",
            wants: "certificate",
        }),
        PemKind::Key if cert => Err(TlsError::Swapped {
            file,
            holds: "certificate",
            wants: "private key",
        }),
        PemKind::Certificate => Err(TlsError::NoPem {
            file,
            wants: "certificate",
            marker: "CERTIFICATE",
        }),
        PemKind::Key => Err(TlsError::NoPem {
            file,
            wants: "private key",
            marker: "PRIVATE KEY",
        }),
        PemKind::CaCertificate => Err(TlsError::NoPem {
            file,
            wants: "CA certificate",
            marker: "CERTIFICATE",
        }),
    }
}

fn read(p: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(p).map_err(|e| TlsError::Read(p.display().to_string(), e))
}

impl TlsConfig {
    /// Like [`TlsConfig::from_pem`], from files; a problem is named with
    /// the file that has it (one that holds a key where a certificate
    /// belongs, or a key that does not match its certificate).
    pub fn from_pem_files(cert: &Path, key: &Path, ca: &Path) -> Result<TlsConfig, TlsError> {
        let (c, k, a) = (read(cert)?, read(key)?, read(ca)?);
        let name = |p: &Path| p.display().to_string();
        check_pem(&c, &name(cert), PemKind::Certificate)?;
        check_pem(&k, &name(key), PemKind::Key)?;
        check_pem(&a, &name(ca), PemKind::CaCertificate)?;
        Self::from_pem(&c, &k, &a).map_err(|e| match e {
            TlsError::Rustls(rustls::Error::InconsistentKeys(
                rustls::InconsistentKeys::KeyMismatch,
            )) => TlsError::KeyMismatch {
                cert: name(cert),
                key: name(key),
            },
            e => e,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes two switches' PEM files into a temporary directory.
    fn files() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (i, pem) in crate::testbed::pki(2).unwrap().iter().enumerate() {
            std::fs::write(dir.path().join(format!("sw{i}.pem")), &pem.cert).unwrap();
            std::fs::write(dir.path().join(format!("sw{i}.key")), &pem.key).unwrap();
            std::fs::write(dir.path().join("ca.pem"), &pem.ca).unwrap();
        }
        dir
    }

    #[test]
    fn file_errors_say_which_file_holds_what() {
        let dir = files();
        let f = |n: &str| dir.path().join(n);
        TlsConfig::from_pem_files(&f("sw0.pem"), &f("sw0.key"), &f("ca.pem")).unwrap();
        let err = |c: &str, k: &str, a: &str| {
            TlsConfig::from_pem_files(&f(c), &f(k), &f(a))
                .unwrap_err()
                .to_string()
        };
        assert!(
            err("sw0.key", "sw0.pem", "ca.pem")
                .contains("sw0.key holds a private key and no certificate"),
        );
        assert!(
            err("sw0.pem", "sw0.pem", "ca.pem")
                .contains("sw0.pem holds a certificate and no private key"),
        );
        let e = err("sw0.pem", "sw1.key", "ca.pem");
        assert!(
            e.contains("sw1.key does not belong to the certificate in"),
            "{e}"
        );
        let e = err("sw0.pem", "sw0.key", "sw0.key");
        assert!(e.contains("holds no PEM CA certificate"), "{e}");
        assert!(err("sw0.pem", "none.key", "ca.pem").starts_with("cannot read"));
    }
}
