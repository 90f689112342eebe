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
    #[error("server refused the handshake: {0:?}")]
    Refused(HelloStatus),
    #[error("cannot connect to {0}")]
    Connect(String, #[source] io::Error),
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
    pub read_only: bool,
}

/// An answer not yet received.
pub struct Pending {
    rx: mpsc::Receiver<Response>,
    timeout: Duration,
    socket: Arc<TcpStream>,
    dead: Arc<AtomicBool>,
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
        let err = |e| ClientError::Connect(cfg.addr.clone(), e);
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
        {
            let pending = pending.clone();
            let dead = dead.clone();
            let sock = socket.try_clone().map_err(TransportError::Io)?;
            thread::Builder::new()
                .name("gvfs-client-rx".into())
                .spawn(move || {
                    loop {
                        let body = match proto::read_frame(&mut reader) {
                            Ok(Some(b)) => b,
                            Ok(None) => break,
                            Err(e) => {
                                debug!(error = %e, "connection lost");
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
        if res.is_err() {
            lock(&self.pending).1.remove(&id);
            self.close();
            return Err(ClientError::Disconnected);
        }
        Ok(Pending {
            rx,
            timeout: self.request_timeout,
            socket: self.socket.clone(),
            dead: self.dead.clone(),
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
    fn drop(&mut self) {
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
}

impl Remote {
    pub fn new(cfg: ConnectConfig) -> Remote {
        Remote {
            cfg,
            current: Mutex::new(None),
            epoch: AtomicU64::new(0),
        }
    }

    /// The live session, connecting (once) if there is none.
    pub fn session(&self) -> Result<Session, ClientError> {
        let mut cur = lock(&self.current);
        if let Some(s) = cur.as_ref().filter(|s| !s.conn.is_dead()) {
            return Ok(s.clone());
        }
        *cur = None;
        let conn = Conn::connect(&self.cfg)?;
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        info!(addr = %self.cfg.addr, epoch, "connected");
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
