//! The GVFS file server: exports one directory over the wire protocol.
//!
//! Clients never send paths: they name files by node ids the server hands
//! out, plus single validated name components. The server maps each node
//! id to a path relative to the export and opens it with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)` relative to the
//! export's directory descriptor, so neither `..`, nor an absolute or
//! dangling symlink, nor a rename racing the lookup can leave the export.
//! The last component is never followed (`O_NOFOLLOW`,
//! `AT_SYMLINK_NOFOLLOW`): symlinks are returned to the client as links.
//!
//! What a peer or client may hold is bounded ([`ServerLimits`]):
//! connections per peer address and in all, handshakes per peer and in
//! all (each within one deadline, its first frame no larger than a hello;
//! a newcomer pushes out the oldest handshake of the busiest peer when
//! all places are taken), requests being worked on in all, requests and
//! answer bytes queued per connection, open files per connection, per
//! peer and in all (a fair share each past half). Answers are written by
//! a thread of each connection, each within a deadline, so a client that
//! stops or slows its reading holds only its own places until it is
//! dropped. Running out of descriptors makes the accept loop back off
//! instead of spinning.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::limit::{Budget, LogLimiter};
use crate::proto::{self, OpCount};
use crate::sys;
use crate::transport;

mod conn;
mod limits;
mod ops;

pub use limits::{
    DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_MAX_ANSWER_BYTES_PER_CONN, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_PEER, DEFAULT_MAX_HANDLES, DEFAULT_MAX_HANDLES_PER_CONN,
    DEFAULT_MAX_HANDLES_PER_PEER, DEFAULT_MAX_HANDSHAKES, DEFAULT_MAX_HANDSHAKES_PER_PEER,
    DEFAULT_MAX_REQUESTS, DEFAULT_MAX_REQUESTS_PER_CONN, DEFAULT_WRITE_TIMEOUT, ServerLimits,
};
use limits::{Deadlines, Handles, Peers, Slots};

/// What can go wrong while starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot open export {0}")]
    Export(String, #[source] io::Error),
    #[error("export {0} is not a directory")]
    NotADirectory(String),
    #[error("cannot listen on {0}")]
    Listen(SocketAddr, #[source] io::Error),
    #[error("plain TCP is allowed only on a loopback address, not {0}")]
    PlaintextNotLoopback(SocketAddr),
    #[error("the token is empty")]
    EmptyToken,
}

/// A mapping between identities on the client ("remote") and on the
/// server ("local"). Unmapped ids pass unchanged.
#[derive(Debug, Clone, Default)]
pub struct IdMap {
    /// (remote, local) pairs.
    pub pairs: Vec<(u32, u32)>,
}

impl IdMap {
    /// Parses `REMOTE:LOCAL`.
    pub fn parse_pair(s: &str) -> Option<(u32, u32)> {
        let (a, b) = s.split_once(':')?;
        Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
    }
    pub fn to_local(&self, remote: u32) -> u32 {
        self.pairs
            .iter()
            .find(|p| p.0 == remote)
            .map_or(remote, |p| p.1)
    }
    pub fn to_remote(&self, local: u32) -> u32 {
        self.pairs
            .iter()
            .find(|p| p.1 == local)
            .map_or(local, |p| p.0)
    }
}

/// How to serve an export.
#[derive(Clone)]
pub struct ServerConfig {
    pub export: PathBuf,
    pub token: Vec<u8>,
    pub read_only: bool,
    /// `None`: plain TCP (loopback only).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub uid_map: IdMap,
    pub gid_map: IdMap,
    /// Threads that execute requests, shared by all connections.
    pub workers: usize,
    /// Most node ids kept; past it all are dropped and clients, getting
    /// ESTALE, look their files up again by name.
    pub max_nodes: usize,
}

/// A sensible [`ServerConfig::max_nodes`].
pub const DEFAULT_MAX_NODES: usize = 1 << 20;

/// Counters of what the server sent, per op.
struct Counters {
    count: [AtomicU64; proto::op::COUNT],
    bytes: [AtomicU64; proto::op::COUNT],
}

impl Counters {
    fn new() -> Counters {
        Counters {
            count: std::array::from_fn(|_| AtomicU64::new(0)),
            bytes: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
    fn add(&self, op: u8, bytes: usize) {
        let i = (op as usize).min(proto::op::COUNT - 1);
        self.count[i].fetch_add(1, Ordering::Relaxed);
        self.bytes[i].fetch_add(bytes as u64, Ordering::Relaxed);
    }
    fn snapshot(&self) -> Vec<OpCount> {
        (1..proto::op::COUNT)
            .map(|i| OpCount {
                op: i as u8,
                count: self.count[i].load(Ordering::Relaxed),
                bytes: self.bytes[i].load(Ordering::Relaxed),
            })
            .collect()
    }
}

/// Node ids and the export-relative paths they stand for.
struct Nodes {
    max: usize,
    paths: HashMap<u64, PathBuf>,
    /// Keyed by the path's bytes: hashing bytes is much cheaper than
    /// hashing a `Path` component by component.
    ids: HashMap<Vec<u8>, u64>,
    next: u64,
}

fn key(p: &Path) -> Vec<u8> {
    p.as_os_str().as_bytes().to_vec()
}

impl Nodes {
    fn new(max: usize) -> Nodes {
        let mut n = Nodes {
            max: max.max(2),
            paths: HashMap::new(),
            ids: HashMap::new(),
            next: proto::ROOT_NODE + 1,
        };
        n.paths.insert(proto::ROOT_NODE, PathBuf::new());
        n.ids.insert(Vec::new(), proto::ROOT_NODE);
        n
    }
    fn intern(&mut self, path: PathBuf) -> u64 {
        let k = key(&path);
        if let Some(id) = self.ids.get(&k) {
            return *id;
        }
        if self.paths.len() >= self.max {
            // Bounded memory: forget every node but the root. Ids are never
            // reused, so clients see ESTALE and look up by name again.
            debug!(nodes = self.paths.len(), "node table full; dropping it");
            self.paths.clear();
            self.ids.clear();
            self.paths.insert(proto::ROOT_NODE, PathBuf::new());
            self.ids.insert(Vec::new(), proto::ROOT_NODE);
        }
        let id = self.next;
        self.next += 1;
        self.paths.insert(id, path);
        self.ids.insert(k, id);
        id
    }
    fn forget_path(&mut self, path: &Path) {
        if let Some(id) = self.ids.remove(&key(path)) {
            self.paths.remove(&id);
        }
    }
    /// Moves `from` and everything below it to `to`.
    fn rename(&mut self, from: &Path, to: &Path) {
        self.forget_path(to);
        let moved: Vec<(u64, PathBuf)> = self
            .paths
            .iter()
            .filter(|(_, p)| p.starts_with(from))
            .map(|(id, p)| {
                let rest = p.strip_prefix(from).unwrap_or(Path::new(""));
                let np = if rest.as_os_str().is_empty() {
                    to.to_path_buf()
                } else {
                    to.join(rest)
                };
                (*id, np)
            })
            .collect();
        for (id, np) in moved {
            if let Some(old) = self.paths.insert(id, np.clone()) {
                self.ids.remove(&key(&old));
            }
            self.ids.insert(key(&np), id);
        }
    }
}

/// Log lines a peer can trigger over and over, each let through at most
/// once per [`crate::limit::LOG_INTERVAL`].
#[derive(Default)]
struct Logs {
    accept: LogLimiter,
    refused: LogLimiter,
    evicted: LogLimiter,
    handshake: LogLimiter,
    stalled: LogLimiter,
    handles: LogLimiter,
    malformed: LogLimiter,
}

/// Shortest pause of the accept loop after it ran out of descriptors or
/// memory (doubled after each failure in a row).
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest such pause: a server whose descriptors free up accepts again
/// within a second.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Longest sleep of the handshake reaper between looks at the stop flag.
const REAP_IDLE: Duration = Duration::from_secs(1);
/// Longest wait of the accept loop for a connection between looks at the
/// stop flag (a stop also wakes it with a connection).
const ACCEPT_POLL: Duration = Duration::from_secs(1);

struct Shared {
    root: OwnedFd,
    cfg: ServerConfig,
    limits: ServerLimits,
    nodes: Mutex<Nodes>,
    counters: Counters,
    stop: AtomicBool,
    /// Live connections by id, to drop them all on shutdown (and one at
    /// its handshake deadline).
    conns: Mutex<HashMap<u64, TcpStream>>,
    next_conn: AtomicU64,
    /// Connections and handshakes per peer and in all.
    peers: Peers,
    /// Requests read and being worked on, in all.
    requests: Arc<Slots>,
    /// Bytes of answers queued (or reserved for requests being worked
    /// on) and not yet written, in all: a gauge, bounded per connection.
    answer_bytes: Budget,
    /// Files open, per peer and in all.
    handles: Handles,
    deadlines: Deadlines,
    logs: Logs,
}

type Job = Box<dyn FnOnce() + Send>;

/// A bound server, not yet accepting.
pub struct Server {
    root: OwnedFd,
    cfg: ServerConfig,
    limits: ServerLimits,
    /// The descriptor limit, once raised.
    nofile: usize,
    listener: TcpListener,
}

/// A running server: its address, counters, and a way to stop it.
pub struct ServerHandle {
    shared: Arc<Shared>,
    addr: SocketAddr,
    thread: Option<thread::JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Server {
    /// Opens the export and binds the listening socket.
    pub fn bind(cfg: ServerConfig, addr: SocketAddr) -> Result<Server, ServerError> {
        if cfg.tls.is_none() && !addr.ip().is_loopback() {
            return Err(ServerError::PlaintextNotLoopback(addr));
        }
        if cfg.token.is_empty() {
            return Err(ServerError::EmptyToken);
        }
        let name = cfg.export.display().to_string();
        let root: OwnedFd = File::open(&cfg.export)
            .map_err(|e| ServerError::Export(name.clone(), e))?
            .into();
        let st = sys::fstat(root.as_fd()).map_err(|e| ServerError::Export(name.clone(), e))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(ServerError::NotADirectory(name));
        }
        let nofile = sys::raise_nofile_limit();
        let listener = TcpListener::bind(addr).map_err(|e| ServerError::Listen(addr, e))?;
        Ok(Server {
            root,
            cfg,
            limits: ServerLimits::default(),
            nofile,
            listener,
        })
    }

    /// Replaces the default limits.
    pub fn with_limits(mut self, limits: ServerLimits) -> Server {
        self.limits = limits;
        self
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    fn into_parts(self) -> (Arc<Shared>, TcpListener) {
        let workers = self.cfg.workers.max(1);
        let l = self.limits;
        let shared = Arc::new(Shared {
            root: self.root,
            nodes: Mutex::new(Nodes::new(self.cfg.max_nodes)),
            cfg: self.cfg,
            counters: Counters::new(),
            stop: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            peers: Peers::default(),
            requests: Arc::new(Slots::new(l.max_requests)),
            answer_bytes: Budget::new(usize::MAX),
            handles: Handles::new(
                l.handle_budget(workers, self.nofile),
                l.max_handles_per_peer,
            ),
            deadlines: Deadlines::default(),
            logs: Logs::default(),
            limits: l,
        });
        (shared, self.listener)
    }

    /// Starts accepting on a background thread.
    pub fn spawn(self) -> ServerHandle {
        let addr = self.local_addr();
        let (shared, listener) = self.into_parts();
        let s = shared.clone();
        let thread = thread::Builder::new()
            .name("gvfs-accept".into())
            .spawn(move || serve(s, listener))
            .ok();
        ServerHandle {
            shared,
            addr,
            thread,
        }
    }

    /// Accepts connections until stopped.
    pub fn run(self) {
        let (shared, listener) = self.into_parts();
        serve(shared, listener);
    }
}

/// Accept errors that mean "out of descriptors or memory": retrying at
/// once would fail the same way.
fn out_of_resources(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// The accept loop, with the worker pool and the handshake reaper.
fn serve(shared: Arc<Shared>, listener: TcpListener) {
    let (jobs, rx) = mpsc::channel::<Job>();
    let rx = Arc::new(Mutex::new(rx));
    for i in 0..shared.cfg.workers.max(1) {
        let rx = rx.clone();
        let _ = thread::Builder::new()
            .name(format!("gvfs-worker-{i}"))
            .spawn(move || {
                loop {
                    let job = lock(&rx).recv();
                    let Ok(job) = job else { return };
                    // A bug in one request must not cost the pool a worker.
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                        warn!("a request panicked");
                    }
                }
            });
    }
    {
        let shared = shared.clone();
        let _ = thread::Builder::new()
            .name("gvfs-reaper".into())
            .spawn(move || shared.reap());
    }
    info!(addr = ?listener.local_addr().ok(), export = %shared.cfg.export.display(), "serving");
    // Waiting in poll(2) rather than in accept(2), which would hold a
    // descriptor reserved: when descriptors run out, a pending connection
    // makes accept fail (EMFILE) and the loop back off, instead of taking
    // the last descriptor and failing right after.
    let polled = listener.set_nonblocking(true).is_ok();
    let mut backoff = ACCEPT_BACKOFF_MIN;
    while !shared.stop.load(Ordering::SeqCst) {
        let ready = if polled {
            sys::wait_readable(listener.as_fd(), ACCEPT_POLL)
        } else {
            Ok(true)
        };
        let accepted = match ready {
            Ok(true) => listener.accept(),
            Ok(false) => continue,
            Err(e) => Err(e),
        };
        let (sock, peer) = match accepted {
            Ok((sock, peer)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                if sock.set_nonblocking(false).is_err() {
                    continue;
                }
                (sock, peer)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(e) => {
                // Out of descriptors or memory: retrying at once would
                // fail the same way. Anything else (a connection aborted
                // before it was taken) is backed off from as well, in case
                // it repeats.
                if let Some(held_back) = shared.logs.accept.allow() {
                    if out_of_resources(&e) {
                        warn!(error = %e, held_back, "accept failed; backing off");
                    } else {
                        debug!(error = %e, held_back, "accept failed");
                    }
                }
                thread::sleep(backoff);
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        shared.admit(sock, peer.ip(), &jobs);
    }
}

impl Shared {
    /// Takes a new connection in if the limits allow, and starts its
    /// thread; closes it otherwise. Never waits: with every handshake
    /// place taken, the oldest handshake of the peer holding the most is
    /// shut down to make room.
    fn admit(self: &Arc<Self>, sock: TcpStream, ip: IpAddr, jobs: &mpsc::Sender<Job>) {
        let ip = limits::peer_key(ip);
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        match self.peers.admit(id, ip, &self.limits) {
            Err(why) => {
                if let Some(held_back) = self.logs.refused.allow() {
                    warn!(peer = %ip, ?why, held_back, "connection refused: over the limit");
                }
                return;
            }
            Ok(Some(victim)) => {
                if let Some(c) = lock(&self.conns).get(&victim) {
                    if let Some(held_back) = self.logs.evicted.allow() {
                        info!(peer = ?c.peer_addr().ok(), held_back, "handshake dropped to make room for a new one");
                    }
                    transport::shutdown(c);
                }
            }
            Ok(None) => {}
        }
        // From here `admitted` gives back what was counted, however the
        // connection ends.
        let admitted = conn::Admitted::new(self.clone(), id, ip);
        match sock.try_clone() {
            Ok(c) => {
                lock(&self.conns).insert(id, c);
            }
            Err(e) => {
                if let Some(held_back) = self.logs.accept.allow() {
                    warn!(error = %e, held_back, "cannot keep a new connection");
                }
                return;
            }
        }
        let jobs = jobs.clone();
        if let Err(e) = thread::Builder::new()
            .name("gvfs-conn".into())
            .spawn(move || conn::serve(admitted, sock, jobs))
            && let Some(held_back) = self.logs.accept.allow()
        {
            warn!(error = %e, held_back, "cannot start a connection thread");
        }
    }

    /// Shuts down each connection whose handshake deadline passed, until
    /// the server stops.
    fn reap(&self) {
        let mut due = lock(&self.deadlines.due);
        while !self.stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            while let Some(&(at, id)) = due.first()
                && at <= now
            {
                due.pop_first();
                if let Some(c) = lock(&self.conns).get(&id) {
                    if let Some(held_back) = self.logs.handshake.allow() {
                        info!(peer = ?c.peer_addr().ok(), held_back, "handshake not done in time; dropped");
                    }
                    transport::shutdown(c);
                }
            }
            let wait = due
                .first()
                .map_or(REAP_IDLE, |&(at, _)| at.saturating_duration_since(now))
                .min(REAP_IDLE);
            due = self
                .deadlines
                .changed
                .wait_timeout(due, wait)
                .map(|r| r.0)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }
}

impl ServerHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
    /// Counters of answers sent, per op.
    pub fn stats(&self) -> Vec<OpCount> {
        self.shared.counters.snapshot()
    }
    /// Answers and bytes sent for one op.
    pub fn op_stats(&self, op: u8) -> OpCount {
        self.stats()
            .into_iter()
            .find(|c| c.op == op)
            .unwrap_or_default()
    }
    /// Live connections (in their handshake or logged in).
    pub fn connections(&self) -> usize {
        lock(&self.shared.conns).len()
    }
    /// Files clients hold open.
    pub fn open_handles(&self) -> usize {
        self.shared.handles.used()
    }
    /// Requests read and being worked on (not those whose answers wait
    /// to be written).
    pub fn requests_in_flight(&self) -> usize {
        self.shared.requests.used()
    }
    /// Bytes of answers waiting to be written (or reserved for requests
    /// being worked on), all connections together.
    pub fn queued_answer_bytes(&self) -> usize {
        self.shared.answer_bytes.used()
    }
    /// Connections in their handshake.
    pub fn handshakes(&self) -> usize {
        self.shared.peers.handshakes()
    }
    /// Stops accepting and drops every connection, as if the server died.
    pub fn shutdown(mut self) {
        self.stop();
    }
    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        for (_, c) in lock(&self.shared.conns).drain() {
            transport::shutdown(&c);
        }
        self.shared.deadlines.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}
