//! One multiplexed connection to a server, and a reconnecting wrapper.

use std::collections::HashMap;
use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::limit::LogLimiter;
use crate::proto::{self, HelloStatus, Request, Response};
use crate::transport::{self, Split, TransportError};

/// What a client call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("server error {0}")]
    Remote(i32),
    #[error("not connected to the server")]
    Disconnected,
    #[error("server refused the handshake: {}", refused_why(*.0))]
    Refused(HelloStatus),
    #[error("cannot connect to {0}")]
    Connect(String, #[source] io::Error),
    #[error(
        "{0:?} is not a server address: give HOST:PORT (e.g. 127.0.0.1:7070 or files.example.org:7070)"
    )]
    Address(String),
    #[error("transport failed")]
    Transport(#[from] TransportError),
    #[error("protocol error")]
    Proto(#[from] proto::ProtoError),
    #[error("no GVFS handshake from the server (TLS on one side only?)")]
    Handshake(#[source] proto::ProtoError),
    #[error("unexpected answer from the server")]
    Unexpected,
    #[error("local copy failed")]
    Local(#[source] io::Error),
    #[error("over a bound of the client (errno {0})")]
    Limit(i32),
    #[error("the server's listing passed {entries} entries or {batches} batches")]
    ListingTooLong { entries: usize, batches: usize },
}

/// What a refused handshake means, and what to do.
fn refused_why(status: HelloStatus) -> &'static str {
    match status {
        HelloStatus::BadToken => {
            "wrong token (the token file must hold what the server's --token-file holds)"
        }
        HelloStatus::BadVersion => "it speaks another GVFS protocol version (update one side)",
        HelloStatus::Accepted => "accepted",
    }
}

impl ClientError {
    /// The errno a file-system caller should see.
    pub fn errno(&self) -> i32 {
        match self {
            ClientError::Remote(e) | ClientError::Limit(e) => *e,
            ClientError::Refused(_) => libc::EACCES,
            _ => libc::EIO,
        }
    }
    /// Whether the call failed because the connection is gone (and may
    /// succeed after a reconnect).
    pub fn is_disconnect(&self) -> bool {
        matches!(
            self,
            ClientError::Disconnected
                | ClientError::Connect(..)
                | ClientError::Transport(_)
                | ClientError::Proto(_)
                | ClientError::Handshake(_)
        )
    }
}

/// How to reach a server.
#[derive(Clone)]
pub struct ConnectConfig {
    /// `host:port`.
    pub addr: String,
    pub token: Vec<u8>,
    /// `None`: plain TCP.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub connect_timeout: Duration,
    /// How long to wait for an answer before the connection counts as
    /// dead (a hung or unreachable server); it is then dropped.
    pub request_timeout: Duration,
}

impl ConnectConfig {
    fn host(&self) -> String {
        let h = match self.addr.rsplit_once(':') {
            Some((h, _)) => h,
            None => &self.addr,
        };
        h.trim_start_matches('[').trim_end_matches(']').to_string()
    }
}

/// Whether `addr` ends in `:PORT` (a number), as `HOST:PORT` and
/// `[V6]:PORT` do.
pub fn has_port(addr: &str) -> bool {
    match addr.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && port.parse::<u16>().is_ok()
                && (!host.contains(':') || host.starts_with('['))
        }
        None => false,
    }
}

type Waiters = HashMap<u64, mpsc::SyncSender<Response>>;

/// Log lines a server can make a client repeat (on every reconnect).
static NO_ANSWER_LOG: LogLimiter = LogLimiter::new();
static MALFORMED_LOG: LogLimiter = LogLimiter::new();

/// One live connection; many requests may be in flight at once.
pub struct Conn {
    writer: Mutex<Box<dyn io::Write + Send>>,
    pending: Arc<Mutex<(bool, Waiters)>>,
    next_id: AtomicU64,
    dead: Arc<AtomicBool>,
    socket: Arc<TcpStream>,
    request_timeout: Duration,
    /// Says once, in the log, that the connection was lost.
    lost: Arc<Lost>,
    pub read_only: bool,
}

/// Logs, once per connection, that it was lost: who (a share's tag or a
/// mount point), which server, and why. A connection closed on purpose
/// (the client ends) is not lost.
struct Lost {
    label: Arc<str>,
    addr: String,
    /// Set when the client closes the connection itself, or once the loss
    /// was logged.
    quiet: AtomicBool,
}

impl Lost {
    fn report(&self, why: &str) {
        if !self.quiet.swap(true, Ordering::SeqCst) {
            warn!(share = %self.label, addr = %self.addr, "disconnected from the server: {why}");
        }
    }
}

/// An answer not yet received.
pub struct Pending {
    rx: mpsc::Receiver<Response>,
    timeout: Duration,
    socket: Arc<TcpStream>,
    dead: Arc<AtomicBool>,
    lost: Arc<Lost>,
}

impl Pending {
    /// Waits for the answer; a server silent for the request time-out is
    /// taken for gone: the connection is shut down and this (and every
    /// other waiting call) fails as disconnected.
    pub fn wait(self) -> Result<Response, ClientError> {
        match self.rx.recv_timeout(self.timeout) {
            Ok(r) => Ok(r),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Some(held_back) = NO_ANSWER_LOG.allow() {
                    warn!(timeout = ?self.timeout, held_back, "no answer from the server; dropping the connection");
                }
                self.lost.report("no answer within the request time-out");
                self.dead.store(true, Ordering::SeqCst);
                transport::shutdown(&self.socket);
                Err(ClientError::Disconnected)
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(ClientError::Disconnected),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Conn {
    /// Connects, runs the TLS and GVFS handshakes, starts the reader thread.
    pub fn connect(cfg: &ConnectConfig) -> Result<Conn, ClientError> {
        Conn::connect_as(cfg, Arc::from(cfg.addr.as_str()))
    }

    /// [`Conn::connect`] for `label` (a share's tag, a mount point), which
    /// the log names when the connection is lost.
    pub fn connect_as(cfg: &ConnectConfig, label: Arc<str>) -> Result<Conn, ClientError> {
        let err = |e| ClientError::Connect(cfg.addr.clone(), e);
        if !has_port(&cfg.addr) {
            return Err(ClientError::Address(cfg.addr.clone()));
        }
        let addr = cfg
            .addr
            .to_socket_addrs()
            .map_err(err)?
            .next()
            .ok_or_else(|| err(io::ErrorKind::NotFound.into()))?;
        let sock = TcpStream::connect_timeout(&addr, cfg.connect_timeout).map_err(err)?;
        let _ = sock.set_nodelay(true);
        let split = match &cfg.tls {
            Some(tls) => Split::tls_client(sock, tls.clone(), &cfg.host(), cfg.connect_timeout)?,
            None => Split::plain(sock)?,
        };
        let Split {
            mut reader,
            mut writer,
            socket,
            ..
        } = split;
        socket
            .set_read_timeout(Some(cfg.connect_timeout))
            .map_err(TransportError::Io)?;
        proto::write_frame(
            &mut writer,
            &proto::encode_hello(&proto::Hello {
                version: proto::VERSION,
                token: cfg.token.clone(),
            }),
        )?;
        let body = proto::read_frame_max(&mut reader, proto::WELCOME_FRAME)
            .map_err(ClientError::Handshake)?
            .ok_or(ClientError::Disconnected)?;
        let welcome = proto::decode_welcome(&body).map_err(ClientError::Handshake)?;
        if welcome.status != HelloStatus::Accepted {
            return Err(ClientError::Refused(welcome.status));
        }
        socket.set_read_timeout(None).map_err(TransportError::Io)?;
        // A server that stops reading must not block writers forever.
        socket
            .set_write_timeout(Some(cfg.request_timeout))
            .map_err(TransportError::Io)?;
        let pending: Arc<Mutex<(bool, Waiters)>> = Arc::new(Mutex::new((false, HashMap::new())));
        let dead = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(Lost {
            label,
            addr: cfg.addr.clone(),
            quiet: AtomicBool::new(false),
        });
        {
            let pending = pending.clone();
            let dead = dead.clone();
            let lost = lost.clone();
            let sock = socket.try_clone().map_err(TransportError::Io)?;
            thread::Builder::new()
                .name("gvfs-client-rx".into())
                .spawn(move || {
                    loop {
                        let body = match proto::read_frame(&mut reader) {
                            Ok(Some(b)) => b,
                            Ok(None) => {
                                lost.report("the server closed the connection");
                                break;
                            }
                            Err(e) => {
                                debug!(error = %e, "connection lost");
                                lost.report(&crate::limit::chain(&e));
                                break;
                            }
                        };
                        match proto::decode_response(&body) {
                            Ok((id, resp)) => {
                                let tx = lock(&pending).1.remove(&id);
                                if let Some(tx) = tx {
                                    let _ = tx.send(resp);
                                }
                            }
                            Err(e) => {
                                if let Some(held_back) = MALFORMED_LOG.allow() {
                                    warn!(error = %e, held_back, "malformed answer; dropping the connection");
                                }
                                lost.report("malformed answer");
                                break;
                            }
                        }
                    }
                    dead.store(true, Ordering::SeqCst);
                    transport::shutdown(&sock);
                    let mut p = lock(&pending);
                    p.0 = true;
                    p.1.clear();
                })
                .map_err(TransportError::Io)?;
        }
        Ok(Conn {
            writer: Mutex::new(writer),
            pending,
            next_id: AtomicU64::new(1),
            dead,
            socket: Arc::new(socket),
            request_timeout: cfg.request_timeout,
            lost,
            read_only: welcome.read_only,
        })
    }

    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    /// Sends a request; the answer is waited for with [`Pending::wait`].
    pub fn send(&self, req: &Request) -> Result<Pending, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::sync_channel(1);
        {
            let mut p = lock(&self.pending);
            if p.0 {
                return Err(ClientError::Disconnected);
            }
            p.1.insert(id, tx);
        }
        let frame = proto::request_frame(id, req);
        let res = proto::write_whole_frame(&mut *lock(&self.writer), &frame);
        if let Err(e) = res {
            lock(&self.pending).1.remove(&id);
            self.lost.report(&format!("cannot send: {e}"));
            self.close();
            return Err(ClientError::Disconnected);
        }
        Ok(Pending {
            rx,
            timeout: self.request_timeout,
            socket: self.socket.clone(),
            dead: self.dead.clone(),
            lost: self.lost.clone(),
        })
    }

    /// Sends a request and waits for its answer.
    pub fn call(&self, req: &Request) -> Result<Response, ClientError> {
        self.send(req)?.wait()
    }

    pub fn close(&self) {
        self.dead.store(true, Ordering::SeqCst);
        transport::shutdown(&self.socket);
    }
}

impl Drop for Conn {
    /// The client is done with the connection: closing it is no loss.
    fn drop(&mut self) {
        self.lost.quiet.store(true, Ordering::SeqCst);
        self.close();
    }
}

/// A connection and the epoch it belongs to: node ids and handles the
/// server gave out are valid only within one epoch.
#[derive(Clone)]
pub struct Session {
    pub conn: Arc<Conn>,
    pub epoch: u64,
}

/// A connection that is re-established on demand after it breaks.
pub struct Remote {
    cfg: ConnectConfig,
    current: Mutex<Option<Session>>,
    epoch: AtomicU64,
    /// Who the log names: a share's tag, a mount point (the server's
    /// address until [`Remote::set_label`]).
    label: Mutex<Arc<str>>,
    /// Failed reconnects, logged thinly.
    reconnect_log: LogLimiter,
}

impl Remote {
    pub fn new(cfg: ConnectConfig) -> Remote {
        let label = Mutex::new(Arc::from(cfg.addr.as_str()));
        Remote {
            cfg,
            current: Mutex::new(None),
            epoch: AtomicU64::new(0),
            label,
            reconnect_log: LogLimiter::new(),
        }
    }

    /// Names this client in the log (its connects, disconnects and
    /// reconnects).
    pub fn set_label(&self, label: &str) {
        *lock(&self.label) = Arc::from(label);
    }

    /// The live session, connecting (once) if there is none.
    pub fn session(&self) -> Result<Session, ClientError> {
        let mut cur = lock(&self.current);
        if let Some(s) = cur.as_ref().filter(|s| !s.conn.is_dead()) {
            return Ok(s.clone());
        }
        *cur = None;
        let label = lock(&self.label).clone();
        let was = self.epoch.load(Ordering::SeqCst);
        let conn = match Conn::connect_as(&self.cfg, label.clone()) {
            Ok(c) => c,
            Err(e) => {
                if was > 0
                    && let Some(held_back) = self.reconnect_log.allow()
                {
                    warn!(share = %label, addr = %self.cfg.addr, held_back, "cannot reconnect: {}", crate::limit::chain(&e));
                }
                return Err(e);
            }
        };
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        if epoch == 1 {
            info!(share = %label, addr = %self.cfg.addr, "connected");
        } else {
            info!(share = %label, addr = %self.cfg.addr, epoch, "reconnected");
        }
        let s = Session {
            conn: Arc::new(conn),
            epoch,
        };
        *cur = Some(s.clone());
        Ok(s)
    }

    /// Drops the session if it is still `s` (it broke).
    pub fn drop_session(&self, s: &Session) {
        let mut cur = lock(&self.current);
        if cur.as_ref().is_some_and(|c| c.epoch == s.epoch) {
            s.conn.close();
            *cur = None;
        }
    }

    /// Whether the server said the export is read-only (connects if needed).
    pub fn read_only(&self) -> Result<bool, ClientError> {
        Ok(self.session()?.conn.read_only)
    }
}

/// Turns an error answer into an error.
pub fn check(resp: Response) -> Result<Response, ClientError> {
    match resp {
        Response::Error(e) => Err(ClientError::Remote(e)),
        r => Ok(r),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_addresses_need_a_port() {
        for ok in ["127.0.0.1:7070", "files.example.org:1", "[::1]:7070"] {
            assert!(has_port(ok), "{ok}");
        }
        for bad in [
            "localhost",
            "127.0.0.1",
            ":7070",
            "::1",
            "h:port",
            "h:70000",
            "",
        ] {
            assert!(!has_port(bad), "{bad}");
        }
    }
}
