//! `vmplant pki`: a small certificate authority for TLS tunnels and GVFS.
//!
//! `vmplant pki --dir DIR ca` makes DIR/ca.pem (the CA certificate every
//! side trusts) and DIR/ca.key; `vmplant pki --dir DIR cert NAME --san
//! ADDR...` makes DIR/NAME.pem and DIR/NAME.key, a certificate the CA
//! signs for NAME, valid for the names and addresses given (a peer checks
//! the one it connects to against them), usable by a server and a client
//! alike (mutual TLS). Keys are written readable by their owner only, and
//! no file is ever overwritten.

use super::CliResult;
use clap::{Args, Subcommand};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The CA's subject: certificates name it as their issuer.
const CA_NAME: &str = "vmplant CA";

#[derive(Debug, Args)]
pub struct PkiArgs {
    /// Where the CA and the certificates are (created if missing).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    #[command(subcommand)]
    op: PkiOp,
}

#[derive(Debug, Subcommand)]
enum PkiOp {
    /// Make a new CA: DIR/ca.pem (give it to every side as --tls-ca) and
    /// DIR/ca.key (keep it to sign certificates).
    Ca,
    /// Make DIR/NAME.pem and DIR/NAME.key, signed by the CA in DIR, for
    /// TLS servers and clients (tunnels, GVFS servers).
    Cert {
        /// The certificate's name (its common name, and its files' names).
        name: String,
        /// A DNS name or IP address peers reach it by (repeatable; at
        /// least one): a peer that connects to HOST:PORT checks HOST
        /// against these.
        #[arg(long = "san", value_name = "ADDR", required = true)]
        sans: Vec<String>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot create the directory {0}")]
    Dir(PathBuf, #[source] std::io::Error),
    #[error("{0} exists already: remove it, or use another --dir or NAME")]
    Exists(PathBuf),
    #[error("cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error("cannot read {0} (make a CA first: vmplant pki --dir DIR ca)")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{0} holds no private key that can sign")]
    Key(PathBuf, #[source] rcgen::Error),
    #[error("{key} is not the key of the CA certificate {cert}")]
    NotCaKey { key: PathBuf, cert: PathBuf },
    #[error("{0:?} is not a usable certificate name: letters, digits, '.', '-' and '_' only")]
    Name(String),
    #[error("{0:?} is neither a DNS name nor an IP address")]
    San(String, #[source] rcgen::Error),
    #[error("cannot make the certificate")]
    Rcgen(#[from] rcgen::Error),
}

pub fn run(args: PkiArgs) -> CliResult {
    std::fs::create_dir_all(&args.dir).map_err(|e| PkiError::Dir(args.dir.clone(), e))?;
    match args.op {
        PkiOp::Ca => {
            let (cert, key) = make_ca(&args.dir)?;
            eprintln!(
                "pki: CA certificate {} (trust it: --tls-ca), key {}",
                cert.display(),
                key.display()
            );
        }
        PkiOp::Cert { name, sans } => {
            let (cert, key) = make_cert(&args.dir, &name, &sans)?;
            eprintln!(
                "pki: certificate {} (for {}), key {}",
                cert.display(),
                sans.join(", "),
                key.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The CA's parameters: the same each time, so that certificates signed
/// later name it as their issuer exactly as its certificate names itself.
fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

/// Makes DIR/ca.pem and DIR/ca.key; returns their paths.
pub fn make_ca(dir: &Path) -> Result<(PathBuf, PathBuf), PkiError> {
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    refuse_existing(&[&cert_path, &key_path])?;
    let key = KeyPair::generate()?;
    let cert = ca_params().self_signed(&key)?;
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok((cert_path, key_path))
}

/// Makes DIR/NAME.pem and DIR/NAME.key, signed by the CA in DIR.
pub fn make_cert(dir: &Path, name: &str, sans: &[String]) -> Result<(PathBuf, PathBuf), PkiError> {
    let usable = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
    if name.is_empty() || name.starts_with('.') || !name.chars().all(usable) || name == "ca" {
        return Err(PkiError::Name(name.into()));
    }
    let (ca_cert, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let ca_key_pem =
        std::fs::read_to_string(&ca_key).map_err(|e| PkiError::Read(ca_key.clone(), e))?;
    let ca_cert_pem =
        std::fs::read_to_string(&ca_cert).map_err(|e| PkiError::Read(ca_cert.clone(), e))?;
    let signing = KeyPair::from_pem(&ca_key_pem).map_err(|e| PkiError::Key(ca_key.clone(), e))?;
    // The CA certificate holds its public key's bytes verbatim: a key that is not
    // in it would sign certificates nobody trusting ca.pem accepts.
    let spki = signing.der_bytes().to_vec();
    let in_cert = pem_der(&ca_cert_pem)
        .iter()
        .any(|der| der.windows(spki.len()).any(|w| w == spki.as_slice()));
    if !in_cert {
        return Err(PkiError::NotCaKey {
            key: ca_key,
            cert: ca_cert,
        });
    }
    let issuer = Issuer::new(ca_params(), signing);

    let (cert_path, key_path) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    refuse_existing(&[&cert_path, &key_path])?;
    let mut params = CertificateParams::default();
    for san in sans {
        let one =
            CertificateParams::new(vec![san.clone()]).map_err(|e| PkiError::San(san.clone(), e))?;
        params.subject_alt_names.extend(one.subject_alt_names);
    }
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    // A switch is a TLS server to the peers that connect to it and a
    // client to those it connects to (mutual TLS).
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok((cert_path, key_path))
}

/// The DER bodies of the PEM blocks in `pem`.
fn pem_der(pem: &str) -> Vec<Vec<u8>> {
    pem::parse_many(pem)
        .map(|blocks| blocks.into_iter().map(|b| b.into_contents()).collect())
        .unwrap_or_default()
}

fn refuse_existing(paths: &[&Path]) -> Result<(), PkiError> {
    match paths.iter().find(|p| p.symlink_metadata().is_ok()) {
        Some(p) => Err(PkiError::Exists(p.to_path_buf())),
        None => Ok(()),
    }
}

/// Writes a new file (never one that exists, nor through a link) with
/// `mode`.
fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    let err = |e| PkiError::Write(path.to_path_buf(), e);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    f.write_all(data).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_make_tls_configs_for_tunnels_and_gvfs() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        make_ca(d).unwrap();
        make_cert(d, "sw0", &["127.0.0.1".into(), "sw0.example".into()]).unwrap();
        make_cert(d, "sw1", &["127.0.0.1".into()]).unwrap();
        vnet::tunnel::TlsConfig::from_pem_files(
            &d.join("sw0.pem"),
            &d.join("sw0.key"),
            &d.join("ca.pem"),
        )
        .unwrap();
        gvfs::transport::server_tls_config(&d.join("sw1.pem"), &d.join("sw1.key")).unwrap();
        gvfs::transport::client_tls_config(&d.join("ca.pem")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.join("sw0.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Nothing is overwritten.
        assert!(matches!(make_ca(d), Err(PkiError::Exists(_))));
        assert!(matches!(
            make_cert(d, "sw0", &["127.0.0.1".into()]),
            Err(PkiError::Exists(_))
        ));
        assert!(matches!(make_cert(d, "../x", &[]), Err(PkiError::Name(_))));
    }

    #[test]
    fn a_ca_key_that_is_not_the_certificates_is_refused() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        make_ca(a.path()).unwrap();
        make_ca(b.path()).unwrap();
        std::fs::copy(b.path().join("ca.key"), a.path().join("other.key")).unwrap();
        std::fs::rename(a.path().join("other.key"), a.path().join("ca.key")).unwrap();
        assert!(matches!(
            make_cert(a.path(), "x", &["127.0.0.1".into()]),
            Err(PkiError::NotCaKey { .. })
        ));
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            make_cert(empty.path(), "x", &["127.0.0.1".into()]),
            Err(PkiError::Read(..))
        ));
    }
}
