//! Byte streams under the protocol: plain TCP or TLS (rustls), split into
//! a read half and a write half that two threads can use at once.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::sys;

/// What can go wrong while setting up a transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot read {path}")]
    Pem {
        path: String,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("no certificate in {0}")]
    NoCert(String),
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
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
    #[error("TLS configuration refused")]
    Tls(#[from] rustls::Error),
    #[error("TLS handshake failed")]
    Handshake(#[source] io::Error),
    #[error("bad server name {0}")]
    ServerName(String),
    #[error("socket failed")]
    Io(#[from] io::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What a PEM file should hold.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PemKind {
    Certificate,
    Key,
    CaCertificate,
}

/// Reads a PEM file and checks that it holds what it should, saying so
/// when it holds the other thing instead (a certificate and a key given
/// the wrong way round).
fn read_pem(path: &Path, want: PemKind) -> Result<Vec<u8>, TransportError> {
    let file = path.display().to_string();
    let pem = std::fs::read(path).map_err(|source| TransportError::Read {
        path: file.clone(),
        source,
    })?;
    let has = |needle: &[u8]| pem.windows(needle.len()).any(|w| w == needle);
    let cert = has(b"-----BEGIN CERTIFICATE-----");
    let key = has(b"PRIVATE KEY-----");
    let (wants, marker) = match want {
        PemKind::Certificate => ("certificate", "CERTIFICATE"),
        PemKind::CaCertificate => ("CA certificate", "CERTIFICATE"),
        PemKind::Key => ("private key", "PRIVATE KEY"),
    };
    match want {
        PemKind::Certificate | PemKind::CaCertificate if cert => Ok(pem),
        PemKind::Key if key => Ok(pem),
        PemKind::Certificate if key => Err(TransportError::Swapped {
            file,
            holds: "private key",
            wants,
        }),
        PemKind::Key if cert => Err(TransportError::Swapped {
            file,
            holds: "certificate",
            wants,
        }),
        _ => Err(TransportError::NoPem {
            file,
            wants,
            marker,
        }),
    }
}

/// A server TLS configuration from PEM files: a certificate chain and its key.
pub fn server_tls_config(
    cert: &Path,
    key: &Path,
) -> Result<Arc<rustls::ServerConfig>, TransportError> {
    let pem = |path: &Path| {
        let p = path.display().to_string();
        move |source| TransportError::Pem { path: p, source }
    };
    let cert_pem = read_pem(cert, PemKind::Certificate)?;
    let key_pem = read_pem(key, PemKind::Key)?;
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem(cert))?;
    if certs.is_empty() {
        return Err(TransportError::NoCert(cert.display().to_string()));
    }
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(pem(key))?;
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, private)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                TransportError::KeyMismatch {
                    cert: cert.display().to_string(),
                    key: key.display().to_string(),
                }
            }
            e => TransportError::Tls(e),
        })?;
    Ok(Arc::new(cfg))
}

/// A client TLS configuration that trusts the CA certificates in a PEM file.
pub fn client_tls_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>, TransportError> {
    let p = ca.display().to_string();
    let pem = read_pem(ca, PemKind::CaCertificate)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|source| TransportError::Pem {
            path: p.clone(),
            source,
        })?;
        roots.add(cert)?;
    }
    if roots.is_empty() {
        return Err(TransportError::NoCert(p));
    }
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// The two halves of a connected stream, and the socket to shut it down.
pub struct Split {
    pub reader: Box<dyn Read + Send>,
    pub writer: Box<dyn Write + Send>,
    pub socket: TcpStream,
    /// When the writer's writes must be done by (none: plain blocking
    /// writes, bounded only by the socket's `SO_SNDTIMEO`).
    pub deadline: WriteDeadline,
}

/// A deadline for the writes of a [`Split`]'s writer, set by its user
/// (say, before each answer). With one, a write waits in `poll(2)` and
/// sends without blocking, and fails with `TimedOut` once the deadline
/// has passed, however the peer paces its reads: unlike `SO_SNDTIMEO`,
/// which only asks for some progress, a peer taking a byte now and then
/// cannot stretch a write forever.
#[derive(Debug, Clone, Default)]
pub struct WriteDeadline(Arc<Mutex<Option<Instant>>>);

impl WriteDeadline {
    pub fn set(&self, at: Option<Instant>) {
        *lock(&self.0) = at;
    }

    fn get(&self) -> Option<Instant> {
        *lock(&self.0)
    }
}

/// Sends some of `buf` (at least one byte) on `sock`: by `deadline` if
/// there is one, else with a plain blocking write.
fn send_by(sock: &TcpStream, buf: &[u8], deadline: Option<Instant>) -> io::Result<usize> {
    let Some(at) = deadline else {
        let mut s = sock;
        return s.write(buf);
    };
    loop {
        match sys::send_nonblocking(sock.as_fd(), buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = at.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "write deadline passed",
                    ));
                }
                sys::wait_writable(sock.as_fd(), left)?;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            r => return r,
        }
    }
}

/// Sends all of `buf` on `sock`, by `deadline` if there is one.
fn send_all_by(sock: &TcpStream, mut buf: &[u8], deadline: Option<Instant>) -> io::Result<()> {
    while !buf.is_empty() {
        match send_by(sock, buf, deadline)? {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n => buf = &buf[n..],
        }
    }
    Ok(())
}

/// The write half of a plain TCP stream.
struct SocketWriter {
    sock: TcpStream,
    deadline: WriteDeadline,
}

impl Write for SocketWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        send_by(&self.sock, data, self.deadline.get())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Split {
    /// Plain TCP.
    pub fn plain(sock: TcpStream) -> Result<Split, TransportError> {
        let deadline = WriteDeadline::default();
        Ok(Split {
            reader: Box::new(sock.try_clone()?),
            writer: Box::new(SocketWriter {
                sock: sock.try_clone()?,
                deadline: deadline.clone(),
            }),
            socket: sock,
            deadline,
        })
    }

    /// TLS as a server: runs the handshake (bounded by `timeout`) first.
    pub fn tls_server(
        sock: TcpStream,
        cfg: Arc<rustls::ServerConfig>,
        timeout: Duration,
    ) -> Result<Split, TransportError> {
        let conn = rustls::ServerConnection::new(cfg)?;
        Self::tls(sock, conn.into(), timeout)
    }

    /// TLS as a client: `name` is the host name (or IP address) the
    /// server's certificate must carry.
    pub fn tls_client(
        sock: TcpStream,
        cfg: Arc<rustls::ClientConfig>,
        name: &str,
        timeout: Duration,
    ) -> Result<Split, TransportError> {
        let name = ServerName::try_from(name.to_string())
            .map_err(|_| TransportError::ServerName(name.to_string()))?;
        let conn = rustls::ClientConnection::new(cfg, name)?;
        Self::tls(sock, conn.into(), timeout)
    }

    fn tls(
        mut sock: TcpStream,
        mut conn: rustls::Connection,
        timeout: Duration,
    ) -> Result<Split, TransportError> {
        sock.set_read_timeout(Some(timeout))?;
        sock.set_write_timeout(Some(timeout))?;
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)
                .map_err(TransportError::Handshake)?;
        }
        while conn.wants_write() {
            conn.write_tls(&mut sock)?;
        }
        sock.set_read_timeout(None)?;
        sock.set_write_timeout(None)?;
        conn.set_buffer_limit(None);
        let shared = Arc::new(TlsShared {
            conn: Mutex::new(conn),
            write_lock: Mutex::new(sock.try_clone()?),
        });
        let deadline = WriteDeadline::default();
        Ok(Split {
            reader: Box::new(TlsReader {
                shared: shared.clone(),
                sock: sock.try_clone()?,
                pending: Vec::new(),
            }),
            writer: Box::new(TlsWriter {
                shared,
                deadline: deadline.clone(),
            }),
            socket: sock,
            deadline,
        })
    }
}

/// Shuts a socket down both ways, waking any thread blocked on it.
pub fn shutdown(sock: &TcpStream) {
    let _ = sock.shutdown(Shutdown::Both);
}

struct TlsShared {
    /// Held only briefly, never across socket I/O, so that the reader
    /// never waits on a writer blocked by a full socket.
    conn: Mutex<rustls::Connection>,
    /// Serialises writers and keeps TLS records in order on the socket.
    write_lock: Mutex<TcpStream>,
}

struct TlsReader {
    shared: Arc<TlsShared>,
    sock: TcpStream,
    /// Bytes read from the socket that rustls has not taken yet.
    pending: Vec<u8>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Read for TlsReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            {
                let mut conn = lock(&self.shared.conn);
                // Feed rustls all it takes; it refuses more while its
                // plaintext buffer is full, and then the plaintext is read
                // first and the rest stays pending.
                while !self.pending.is_empty() {
                    let mut slice = &self.pending[..];
                    match conn.read_tls(&mut slice) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            self.pending.drain(..n);
                            conn.process_new_packets()
                                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                        }
                    }
                }
                match conn.reader().read(out) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            let mut buf = [0u8; 32 * 1024];
            let n = self.sock.read(&mut buf)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.pending.extend_from_slice(&buf[..n]);
        }
    }
}

struct TlsWriter {
    shared: Arc<TlsShared>,
    deadline: WriteDeadline,
}

impl Write for TlsWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let sock = lock(&self.shared.write_lock);
        let mut out = Vec::with_capacity(data.len() + 256);
        {
            let mut conn = lock(&self.shared.conn);
            // rustls buffers a bounded amount of plaintext: encrypt in
            // pieces, draining the records after each.
            let mut done = 0;
            while done < data.len() {
                let n = conn.writer().write(&data[done..])?;
                while conn.wants_write() {
                    conn.write_tls(&mut out)?;
                }
                if n == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                done += n;
            }
        }
        send_all_by(&sock, &out, self.deadline.get())?;
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_file_errors_say_which_file_holds_what() {
        let dir = tempfile::tempdir().unwrap();
        let f = |n: &str| dir.path().join(n);
        for name in ["a", "b"] {
            let c = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
            std::fs::write(f(&format!("{name}.pem")), c.cert.pem()).unwrap();
            std::fs::write(f(&format!("{name}.key")), c.signing_key.serialize_pem()).unwrap();
        }
        server_tls_config(&f("a.pem"), &f("a.key")).unwrap();
        client_tls_config(&f("a.pem")).unwrap();
        let server = |c: &str, k: &str| {
            server_tls_config(&f(c), &f(k))
                .map(drop)
                .unwrap_err()
                .to_string()
        };
        assert!(server("a.key", "a.pem").contains("a.key holds a private key and no certificate"));
        assert!(server("a.pem", "a.pem").contains("a.pem holds a certificate and no private key"));
        let e = server("a.pem", "b.key");
        assert!(
            e.contains("b.key does not belong to the certificate in"),
            "{e}"
        );
        assert!(server("a.pem", "none.key").starts_with("cannot read"));
        let e = client_tls_config(&f("a.key"))
            .map(drop)
            .unwrap_err()
            .to_string();
        assert!(e.contains("holds no PEM CA certificate"), "{e}");
    }
}
