//! The connections a VM migrates over: `tcp:HOST:PORT`,
//! `tls:HOST:PORT` (TCP with mutual TLS, the certificates VNET's tunnels
//! use: each end's certificate signed by the CA the other trusts, the
//! destination's naming HOST) and `unix:PATH` (a local migration).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;
use vnet::tunnel::TlsConfig;

/// How long a migration waits on its peer before giving up.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{0:?} is not a migration address: give tcp:HOST:PORT, tls:HOST:PORT or unix:PATH")]
    Address(String),
    #[error("a tls: migration needs --tls-cert, --tls-key and --tls-ca")]
    NoTls,
    #[error("cannot resolve {0}")]
    Resolve(String, #[source] std::io::Error),
    #[error("cannot connect to {0}")]
    Connect(String, #[source] std::io::Error),
    #[error("cannot listen on {0}")]
    Listen(String, #[source] std::io::Error),
    #[error("cannot accept a migration on {0}")]
    Accept(String, #[source] std::io::Error),
    #[error("TLS with {0} failed")]
    Tls(String, #[source] std::io::Error),
    #[error(transparent)]
    TlsSetup(#[from] vnet::tunnel::tls::TlsError),
    #[error(
        "a process of user {uid}, not this one ({me}), connected to migrate a VM here: refused"
    )]
    Stranger { uid: u32, me: u32 },
}

/// Where a migration goes or comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp(String),
    Tls(String),
    Unix(PathBuf),
}

impl std::str::FromStr for Address {
    type Err = LinkError;

    fn from_str(s: &str) -> Result<Address, LinkError> {
        let bad = || LinkError::Address(s.to_string());
        let (proto, rest) = s.split_once(':').ok_or_else(bad)?;
        let host_port = |r: &str| match r.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(r.into()),
            _ => Err(bad()),
        };
        match proto {
            "tcp" => Ok(Address::Tcp(host_port(rest)?)),
            "tls" => Ok(Address::Tls(host_port(rest)?)),
            "unix" if !rest.is_empty() => Ok(Address::Unix(rest.into())),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Tcp(a) => write!(f, "tcp:{a}"),
            Address::Tls(a) => write!(f, "tls:{a}"),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// An open migration connection.
pub enum Conn {
    Tcp(TcpStream),
    TlsClient(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
    TlsServer(Box<rustls::StreamOwned<rustls::ServerConnection, TcpStream>>),
    Unix(UnixStream),
}

impl Conn {
    fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Conn::Tcp(s) => Some(s),
            Conn::TlsClient(s) => Some(&s.sock),
            Conn::TlsServer(s) => Some(&s.sock),
            Conn::Unix(_) => None,
        }
    }

    /// The unix socket of a local migration, which can carry file
    /// descriptors.
    pub fn unix(&self) -> Option<&UnixStream> {
        match self {
            Conn::Unix(s) => Some(s),
            _ => None,
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::TlsClient(s) => s.read(buf),
            Conn::TlsServer(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::TlsClient(s) => s.write(buf),
            Conn::TlsServer(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Tcp(s) => s.flush(),
            Conn::TlsClient(s) => s.flush(),
            Conn::TlsServer(s) => s.flush(),
            Conn::Unix(s) => s.flush(),
        }
    }
}

impl super::Link for Conn {
    fn queued(&self) -> u64 {
        match (self.tcp(), self) {
            (Some(s), _) => super::send_queue(s),
            (None, Conn::Unix(s)) => super::send_queue(s),
            (None, _) => 0,
        }
    }

    fn is_local(&self) -> bool {
        matches!(self, Conn::Unix(_))
    }

    fn send_memfd(&mut self, memfd: Option<&std::fs::File>) -> std::io::Result<()> {
        use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
        use std::os::fd::AsRawFd;
        let Conn::Unix(s) = self else {
            return Ok(());
        };
        let fds = memfd.map(|f| [f.as_raw_fd()]);
        let cmsgs: Vec<ControlMessage> = fds.iter().map(|f| ControlMessage::ScmRights(f)).collect();
        let marker = [u8::from(memfd.is_some())];
        let iov = [std::io::IoSlice::new(&marker)];
        sendmsg::<()>(s.as_raw_fd(), &iov, &cmsgs, MsgFlags::empty(), None)?;
        Ok(())
    }

    fn recv_memfd(&mut self) -> std::io::Result<Option<std::fs::File>> {
        use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
        use std::os::fd::{AsRawFd, FromRawFd};
        let Conn::Unix(s) = self else {
            return Ok(None);
        };
        let mut marker = [0u8; 1];
        let mut iov = [std::io::IoSliceMut::new(&mut marker)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<()>(
            s.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut memfd = None;
        for cmsg in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                for fd in fds {
                    // The kernel just installed `fd` in this
                    // process for this message; nothing else owns it, and
                    // the File takes ownership (closing any extra ones).
                    // SAFETY: sound for the reasons just given.
                    let file = unsafe { std::fs::File::from_raw_fd(fd) };
                    if memfd.is_none() {
                        memfd = Some(file);
                    }
                }
            }
        }
        if msg.bytes != 1 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if marker[0] == 1 && memfd.is_none() {
            return Err(std::io::Error::other(
                "the guest memory's descriptor did not come",
            ));
        }
        Ok(memfd)
    }
}

fn timeouts(s: &TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))
}

/// Connects to a migration destination.
pub fn connect(to: &Address, tls: Option<&TlsConfig>) -> Result<Conn, LinkError> {
    let tcp = |a: &str| -> Result<TcpStream, LinkError> {
        let addr = a
            .to_socket_addrs()
            .map_err(|e| LinkError::Resolve(a.into(), e))?
            .next()
            .ok_or_else(|| LinkError::Resolve(a.into(), std::io::ErrorKind::NotFound.into()))?;
        let s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
            .map_err(|e| LinkError::Connect(a.into(), e))?;
        timeouts(&s).map_err(|e| LinkError::Connect(a.into(), e))?;
        Ok(s)
    };
    Ok(match to {
        Address::Tcp(a) => Conn::Tcp(tcp(a)?),
        Address::Tls(a) => {
            let tls = tls.ok_or(LinkError::NoTls)?;
            let host = a.rsplit_once(':').map_or(a.as_str(), |(h, _)| h);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let mut s = rustls::StreamOwned::new(tls.client(host)?, tcp(a)?);
            // The handshake now, so that a refused certificate is named
            // before any memory is sent.
            while s.conn.is_handshaking() {
                s.conn
                    .complete_io(&mut s.sock)
                    .map_err(|e| LinkError::Tls(a.clone(), e))?;
            }
            Conn::TlsClient(Box::new(s))
        }
        Address::Unix(p) => {
            let s = UnixStream::connect(p)
                .map_err(|e| LinkError::Connect(p.display().to_string(), e))?;
            s.set_read_timeout(Some(IO_TIMEOUT))
                .and_then(|()| s.set_write_timeout(Some(IO_TIMEOUT)))
                .map_err(|e| LinkError::Connect(p.display().to_string(), e))?;
            Conn::Unix(s)
        }
    })
}

/// A destination waiting for one migration.
pub enum Listener {
    Tcp(TcpListener, Option<TlsConfig>),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Listens on `at`; a `tls:` address needs `tls`. A unix socket file
    /// is created (and removed when the listener goes).
    pub fn bind(at: &Address, tls: Option<TlsConfig>) -> Result<Listener, LinkError> {
        match at {
            Address::Tcp(a) => Ok(Listener::Tcp(
                TcpListener::bind(a).map_err(|e| LinkError::Listen(a.clone(), e))?,
                None,
            )),
            Address::Tls(a) => {
                let tls = tls.ok_or(LinkError::NoTls)?;
                Ok(Listener::Tcp(
                    TcpListener::bind(a).map_err(|e| LinkError::Listen(a.clone(), e))?,
                    Some(tls),
                ))
            }
            Address::Unix(p) => {
                use std::os::unix::fs::PermissionsExt;
                let err = |e| LinkError::Listen(p.display().to_string(), e);
                let l = UnixListener::bind(p).map_err(err)?;
                // This user's processes only (the peer is checked too).
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
                Ok(Listener::Unix(l, p.clone()))
            }
        }
    }

    /// Where it listens (the port the kernel chose for `:0`).
    pub fn local(&self) -> String {
        match self {
            Listener::Tcp(l, tls) => {
                let proto = if tls.is_some() { "tls" } else { "tcp" };
                match l.local_addr() {
                    Ok(a) => format!("{proto}:{a}"),
                    Err(_) => format!("{proto}:?"),
                }
            }
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }

    /// Waits for the source, and for TLS completes the handshake (the
    /// source must show a certificate the CA signed). Returns the
    /// connection and who the peer is.
    pub fn accept(&self) -> Result<(Conn, String), LinkError> {
        let here = self.local();
        match self {
            Listener::Tcp(l, tls) => {
                let (s, peer) = l.accept().map_err(|e| LinkError::Accept(here.clone(), e))?;
                timeouts(&s).map_err(|e| LinkError::Accept(here.clone(), e))?;
                let peer = peer.to_string();
                match tls {
                    None => Ok((Conn::Tcp(s), peer)),
                    Some(tls) => {
                        let mut s = rustls::StreamOwned::new(tls.server()?, s);
                        while s.conn.is_handshaking() {
                            s.conn
                                .complete_io(&mut s.sock)
                                .map_err(|e| LinkError::Tls(peer.clone(), e))?;
                        }
                        Ok((Conn::TlsServer(Box::new(s)), peer))
                    }
                }
            }
            Listener::Unix(l, _) => {
                let (s, _) = l.accept().map_err(|e| LinkError::Accept(here.clone(), e))?;
                let peer =
                    nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::PeerCredentials)
                        .map_err(|e| LinkError::Accept(here.clone(), e.into()))?;
                let me = nix::unistd::geteuid().as_raw();
                if peer.uid() != me {
                    return Err(LinkError::Stranger {
                        uid: peer.uid(),
                        me,
                    });
                }
                s.set_read_timeout(Some(IO_TIMEOUT))
                    .map_err(|e| LinkError::Accept(here.clone(), e))?;
                Ok((Conn::Unix(s), "a local VMM".into()))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_or_say_what_they_want() {
        assert_eq!(
            "tcp:10.0.0.2:4444".parse::<Address>().unwrap(),
            Address::Tcp("10.0.0.2:4444".into())
        );
        assert_eq!(
            "tls:host.example:4444".parse::<Address>().unwrap(),
            Address::Tls("host.example:4444".into())
        );
        assert_eq!(
            "unix:/run/m.sock".parse::<Address>().unwrap(),
            Address::Unix("/run/m.sock".into())
        );
        for bad in [
            "10.0.0.2:4444",
            "tcp:10.0.0.2",
            "udp:1.2.3.4:5",
            "tcp::80",
            "unix:",
            "tls:h:port",
        ] {
            let e = bad.parse::<Address>().unwrap_err().to_string();
            assert!(e.contains("tcp:HOST:PORT"), "{bad}: {e}");
        }
    }
}
