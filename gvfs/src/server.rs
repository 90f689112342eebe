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

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::proto::{self, Attr, DirEntry, Kind, OpCount, Request, Response, SetTime, Time};
use crate::sys;
use crate::transport::{self, Split};

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

/// Bytes of entries per READDIR reply (at most [`proto::MAX_READDIR_BYTES`]):
/// about a thousand entries, so that a client can hand out the first
/// entries of a large directory while the server reads the rest.
const READDIR_BATCH_BYTES: usize = 128 * 1024;

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

struct Shared {
    root: OwnedFd,
    cfg: ServerConfig,
    nodes: Mutex<Nodes>,
    counters: Counters,
    stop: AtomicBool,
    /// Live connections by id, to drop them all on shutdown.
    conns: Mutex<HashMap<u64, TcpStream>>,
    next_conn: AtomicU64,
}

type Job = Box<dyn FnOnce() + Send>;

/// A bound server, not yet accepting.
pub struct Server {
    shared: Arc<Shared>,
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
        sys::raise_nofile_limit();
        let listener = TcpListener::bind(addr).map_err(|e| ServerError::Listen(addr, e))?;
        Ok(Server {
            shared: Arc::new(Shared {
                root,
                nodes: Mutex::new(Nodes::new(cfg.max_nodes)),
                cfg,
                counters: Counters::new(),
                stop: AtomicBool::new(false),
                conns: Mutex::new(HashMap::new()),
                next_conn: AtomicU64::new(1),
            }),
            listener,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Starts accepting on a background thread.
    pub fn spawn(self) -> ServerHandle {
        let addr = self.local_addr();
        let shared = self.shared.clone();
        let thread = thread::Builder::new()
            .name("gvfs-accept".into())
            .spawn(move || self.run())
            .ok();
        ServerHandle {
            shared,
            addr,
            thread,
        }
    }

    /// Accepts connections until stopped.
    pub fn run(self) {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..self.shared.cfg.workers.max(1) {
            let rx = rx.clone();
            let _ = thread::Builder::new()
                .name(format!("gvfs-worker-{i}"))
                .spawn(move || {
                    loop {
                        let job = lock(&rx).recv();
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                });
        }
        info!(addr = %self.local_addr(), export = %self.shared.cfg.export.display(), "serving");
        for sock in self.listener.incoming() {
            if self.shared.stop.load(Ordering::SeqCst) {
                break;
            }
            let sock = match sock {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    continue;
                }
            };
            let shared = self.shared.clone();
            let tx = tx.clone();
            let _ = thread::Builder::new()
                .name("gvfs-conn".into())
                .spawn(move || {
                    let peer = sock.peer_addr().ok();
                    let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
                    if let Ok(c) = sock.try_clone() {
                        lock(&shared.conns).insert(id, c);
                    }
                    if let Err(e) = serve_conn(shared.clone(), sock, tx) {
                        debug!(?peer, error = %e, "connection ended");
                    }
                    lock(&shared.conns).remove(&id);
                });
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

/// What can end one connection.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("transport")]
    Transport(#[from] transport::TransportError),
    #[error("protocol")]
    Proto(#[from] proto::ProtoError),
    #[error("handshake refused")]
    Refused,
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

type Writer = Arc<Mutex<Box<dyn io::Write + Send>>>;

struct Conn {
    shared: Arc<Shared>,
    handles: Mutex<HashMap<u64, Arc<File>>>,
    next_handle: AtomicU64,
}

fn serve_conn(
    shared: Arc<Shared>,
    sock: TcpStream,
    jobs: mpsc::Sender<Job>,
) -> Result<(), ConnError> {
    let _ = sock.set_nodelay(true);
    if shared.stop.load(Ordering::SeqCst) {
        return Ok(());
    }
    let timeout = Duration::from_secs(10);
    let split = match &shared.cfg.tls {
        Some(cfg) => Split::tls_server(sock, cfg.clone(), timeout)?,
        None => Split::plain(sock)?,
    };
    let Split {
        mut reader,
        writer,
        socket,
    } = split;
    let socket = Arc::new(socket);
    // Handshake, bounded in time.
    socket
        .set_read_timeout(Some(timeout))
        .map_err(transport::TransportError::Io)?;
    let hello = proto::read_frame(&mut reader)?.ok_or(proto::ProtoError::Truncated)?;
    let writer: Writer = Arc::new(Mutex::new(writer));
    let (status, ok) = match proto::decode_hello(&hello) {
        Ok(h) if h.version != proto::VERSION => (proto::HelloStatus::BadVersion, false),
        Ok(h) if constant_time_eq(&h.token, &shared.cfg.token) => {
            (proto::HelloStatus::Accepted, true)
        }
        Ok(_) => (proto::HelloStatus::BadToken, false),
        Err(e) => return Err(e.into()),
    };
    let welcome = proto::encode_welcome(&proto::Welcome {
        version: proto::VERSION,
        status,
        read_only: shared.cfg.read_only,
    });
    proto::write_frame(&mut *lock(&writer), &welcome)?;
    if !ok {
        warn!(peer = ?socket.peer_addr().ok(), ?status, "handshake refused");
        transport::shutdown(&socket);
        return Err(ConnError::Refused);
    }
    socket
        .set_read_timeout(None)
        .map_err(transport::TransportError::Io)?;
    let conn = Arc::new(Conn {
        shared: shared.clone(),
        handles: Mutex::new(HashMap::new()),
        next_handle: AtomicU64::new(1),
    });
    loop {
        let body = match proto::read_frame(&mut reader) {
            Ok(Some(b)) => b,
            Ok(None) => break,
            Err(e) => {
                transport::shutdown(&socket);
                return Err(e.into());
            }
        };
        let (id, req) = match proto::decode_request(&body) {
            Ok(x) => x,
            Err(e) => {
                // Not even an id: the stream cannot be trusted any more.
                transport::shutdown(&socket);
                return Err(e.into());
            }
        };
        let conn = conn.clone();
        let writer = writer.clone();
        let sock = socket.clone();
        let job: Job = Box::new(move || {
            let (op, resp) = match req {
                Ok(req) => {
                    let op = req.op();
                    (op, conn.handle(req).unwrap_or_else(Response::Error))
                }
                Err(e) => {
                    debug!(error = %e, "malformed request");
                    (0, Response::Error(libc::EINVAL))
                }
            };
            let out = proto::response_frame(id, &resp);
            drop(resp);
            conn.shared.counters.add(op, out.len());
            if proto::write_whole_frame(&mut *lock(&writer), &out).is_err() {
                // The client would wait for this answer forever: end the
                // connection so that it sees the loss and reconnects.
                transport::shutdown(&sock);
            }
        });
        if jobs.send(job).is_err() {
            break;
        }
    }
    transport::shutdown(&socket);
    Ok(())
}

type OpResult = Result<Response, i32>;

fn errno(e: io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// A name the client may use: one component, not `.` or `..`.
fn valid_name(name: &[u8]) -> Result<&OsStr, i32> {
    if name.is_empty() || name.len() > proto::MAX_NAME {
        return Err(libc::EINVAL);
    }
    if name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0) {
        return Err(libc::EACCES);
    }
    Ok(OsStr::from_bytes(name))
}

/// Permission bits a client may set: never set-user-id, and set-group-id
/// only on directories (where it means "inherit the group"), so that a
/// client cannot plant privileged executables on the server.
fn client_mode(mode: u32, dir: bool) -> u32 {
    let allowed = if dir { 0o3777 } else { 0o1777 };
    mode & allowed
}

fn time_of(sec: i64, nsec: i64) -> Time {
    Time {
        sec,
        nsec: nsec.clamp(0, 999_999_999) as u32,
    }
}

impl Conn {
    fn cfg(&self) -> &ServerConfig {
        &self.shared.cfg
    }

    fn root(&self) -> BorrowedFd<'_> {
        self.shared.root.as_fd()
    }

    fn path(&self, node: u64) -> Result<PathBuf, i32> {
        lock(&self.shared.nodes)
            .paths
            .get(&node)
            .cloned()
            .ok_or(libc::ESTALE)
    }

    /// The directory containing `node` (opened beneath the root) and its name.
    fn parent_of(&self, node: u64) -> Result<(OwnedFd, PathBuf, OsString), i32> {
        let path = self.path(node)?;
        let name = path.file_name().ok_or(libc::EINVAL)?.to_os_string();
        let parent = path.parent().unwrap_or(Path::new("")).to_path_buf();
        let fd = self.open_dir(&parent)?;
        Ok((fd, path, name))
    }

    fn open_dir(&self, path: &Path) -> Result<OwnedFd, i32> {
        sys::open_beneath(self.root(), path, libc::O_PATH | libc::O_DIRECTORY, 0).map_err(errno)
    }

    fn attr(&self, node: u64, st: &libc::stat) -> Attr {
        Attr {
            node,
            dev: st.st_dev,
            ino: st.st_ino,
            kind: Kind::from_mode(st.st_mode),
            perm: st.st_mode & 0o7777,
            nlink: st.st_nlink as u32,
            uid: self.cfg().uid_map.to_remote(st.st_uid),
            gid: self.cfg().gid_map.to_remote(st.st_gid),
            rdev: st.st_rdev,
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            blksize: st.st_blksize as u32,
            atime: time_of(st.st_atime, st.st_atime_nsec),
            mtime: time_of(st.st_mtime, st.st_mtime_nsec),
            ctime: time_of(st.st_ctime, st.st_ctime_nsec),
        }
    }

    fn node_attr(&self, node: u64) -> Result<Attr, i32> {
        let path = self.path(node)?;
        let fd = sys::open_beneath(self.root(), &path, libc::O_PATH | libc::O_NOFOLLOW, 0)
            .map_err(errno)?;
        let st = sys::fstat(fd.as_fd()).map_err(errno)?;
        Ok(self.attr(node, &st))
    }

    /// Stats `name` in directory `dir` (path `dir_path`) and interns its node.
    fn child_attr(&self, dir: BorrowedFd<'_>, dir_path: &Path, name: &OsStr) -> Result<Attr, i32> {
        let st = sys::stat_at(dir, name).map_err(errno)?;
        let node = lock(&self.shared.nodes).intern(dir_path.join(name));
        Ok(self.attr(node, &st))
    }

    fn writable(&self) -> Result<(), i32> {
        if self.cfg().read_only {
            Err(libc::EROFS)
        } else {
            Ok(())
        }
    }

    fn file(&self, handle: u64) -> Result<Arc<File>, i32> {
        lock(&self.handles).get(&handle).cloned().ok_or(libc::EBADF)
    }

    fn add_handle(&self, f: File) -> u64 {
        let h = self.next_handle.fetch_add(1, Ordering::Relaxed);
        lock(&self.handles).insert(h, Arc::new(f));
        h
    }

    fn chown_new(&self, dir: BorrowedFd<'_>, name: &OsStr, uid: u32, gid: u32) {
        let uid = self.cfg().uid_map.to_local(uid);
        let gid = self.cfg().gid_map.to_local(gid);
        if let Err(e) = sys::chown_at(dir, name, uid, gid) {
            debug!(error = %e, "chown of a new file failed");
        }
    }

    fn handle(&self, req: Request) -> OpResult {
        match req {
            Request::Lookup { parent, name } => {
                let name = valid_name(&name)?;
                let dir_path = self.path(parent)?;
                let dir = self.open_dir(&dir_path)?;
                Ok(Response::Attr(self.child_attr(
                    dir.as_fd(),
                    &dir_path,
                    name,
                )?))
            }
            Request::Getattr { node } => Ok(Response::Attr(self.node_attr(node)?)),
            Request::Setattr { node, set } => {
                self.writable()?;
                let path = self.path(node)?;
                let flags = if set.size.is_some() {
                    libc::O_WRONLY
                } else {
                    libc::O_RDONLY
                };
                // O_NOFOLLOW: a symlink is refused (ELOOP), never followed.
                let fd = sys::open_beneath(
                    self.root(),
                    &path,
                    flags | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY,
                    0,
                )
                .map_err(errno)?;
                if let Some(mode) = set.mode {
                    let st = sys::fstat(fd.as_fd()).map_err(errno)?;
                    let dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
                    sys::fchmod(fd.as_fd(), client_mode(mode, dir)).map_err(errno)?;
                }
                if set.uid.is_some() || set.gid.is_some() {
                    let uid = set.uid.map_or(u32::MAX, |u| self.cfg().uid_map.to_local(u));
                    let gid = set.gid.map_or(u32::MAX, |g| self.cfg().gid_map.to_local(g));
                    sys::chown_at(fd.as_fd(), OsStr::new(""), uid, gid).map_err(errno)?;
                }
                if let Some(size) = set.size {
                    sys::ftruncate(fd.as_fd(), size).map_err(errno)?;
                }
                if set.atime.is_some() || set.mtime.is_some() {
                    let ts = |t: Option<SetTime>| match t {
                        None => libc::timespec {
                            tv_sec: 0,
                            tv_nsec: libc::UTIME_OMIT,
                        },
                        Some(SetTime::Now) => libc::timespec {
                            tv_sec: 0,
                            tv_nsec: libc::UTIME_NOW,
                        },
                        Some(SetTime::At(t)) => libc::timespec {
                            tv_sec: t.sec,
                            tv_nsec: t.nsec as i64,
                        },
                    };
                    sys::futimens(fd.as_fd(), &[ts(set.atime), ts(set.mtime)]).map_err(errno)?;
                }
                let st = sys::fstat(fd.as_fd()).map_err(errno)?;
                Ok(Response::Attr(self.attr(node, &st)))
            }
            Request::Readdir { node, cookie } => self.readdir(node, cookie),
            Request::Open { node, flags } => {
                let flags = flags as i32;
                let acc = flags & libc::O_ACCMODE;
                if acc != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
                    self.writable()?;
                }
                let path = self.path(node)?;
                // Only regular files and directories are opened: opening a
                // FIFO would block a worker, a device could act on open.
                // Checked on an O_PATH descriptor first (no open side
                // effects), and again on the opened one.
                let plain = |st: &libc::stat| {
                    matches!(st.st_mode & libc::S_IFMT, libc::S_IFREG | libc::S_IFDIR)
                };
                let probe =
                    sys::open_beneath(self.root(), &path, libc::O_PATH | libc::O_NOFOLLOW, 0)
                        .map_err(errno)?;
                let st = sys::fstat(probe.as_fd()).map_err(errno)?;
                if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
                    return Err(libc::ELOOP);
                }
                if !plain(&st) {
                    return Err(libc::EOPNOTSUPP);
                }
                let keep = libc::O_ACCMODE | libc::O_APPEND | libc::O_TRUNC | libc::O_DIRECTORY;
                let fd = sys::open_beneath(
                    self.root(),
                    &path,
                    (flags & keep) | libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_NONBLOCK,
                    0,
                )
                .map_err(errno)?;
                let st = sys::fstat(fd.as_fd()).map_err(errno)?;
                if !plain(&st) {
                    return Err(libc::EOPNOTSUPP);
                }
                let attr = self.attr(node, &st);
                let handle = self.add_handle(File::from(fd));
                Ok(Response::Opened { handle, attr })
            }
            Request::Read {
                handle,
                offset,
                len,
            } => {
                let f = self.file(handle)?;
                let mut buf = vec![0u8; len as usize];
                let mut got = 0;
                while got < buf.len() {
                    match f.read_at(&mut buf[got..], offset + got as u64) {
                        Ok(0) => break,
                        Ok(n) => got += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(errno(e)),
                    }
                }
                buf.truncate(got);
                Ok(Response::Data(buf))
            }
            Request::Write {
                handle,
                offset,
                data,
            } => {
                self.writable()?;
                let f = self.file(handle)?;
                f.write_all_at(&data, offset).map_err(errno)?;
                let st = sys::fstat(f.as_fd()).map_err(errno)?;
                Ok(Response::Written {
                    len: data.len() as u32,
                    attr: self.attr(0, &st),
                })
            }
            Request::Create {
                parent,
                name,
                mode,
                flags,
                uid,
                gid,
            } => {
                self.writable()?;
                let name = valid_name(&name)?;
                let dir_path = self.path(parent)?;
                let path = dir_path.join(name);
                let flags = flags as i32;
                let keep = libc::O_ACCMODE | libc::O_APPEND | libc::O_TRUNC | libc::O_EXCL;
                let fd = sys::open_beneath(
                    self.root(),
                    &path,
                    (flags & keep) | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_NOCTTY,
                    client_mode(mode, false),
                )
                .map_err(errno)?;
                let dir = self.open_dir(&dir_path)?;
                self.chown_new(dir.as_fd(), name, uid, gid);
                let st = sys::fstat(fd.as_fd()).map_err(errno)?;
                let node = lock(&self.shared.nodes).intern(path);
                let attr = self.attr(node, &st);
                let handle = self.add_handle(File::from(fd));
                Ok(Response::Opened { handle, attr })
            }
            Request::Mkdir {
                parent,
                name,
                mode,
                uid,
                gid,
            } => {
                self.writable()?;
                let name = valid_name(&name)?;
                let dir_path = self.path(parent)?;
                let dir = self.open_dir(&dir_path)?;
                sys::mkdir_at(dir.as_fd(), name, client_mode(mode, true)).map_err(errno)?;
                self.chown_new(dir.as_fd(), name, uid, gid);
                Ok(Response::Attr(self.child_attr(
                    dir.as_fd(),
                    &dir_path,
                    name,
                )?))
            }
            Request::Unlink { parent, name } => self.remove(parent, &name, 0),
            Request::Rmdir { parent, name } => self.remove(parent, &name, libc::AT_REMOVEDIR),
            Request::Rename {
                parent,
                name,
                new_parent,
                new_name,
                flags,
            } => {
                self.writable()?;
                let name = valid_name(&name)?;
                let new_name = valid_name(&new_name)?;
                let from_path = self.path(parent)?;
                let to_path = self.path(new_parent)?;
                let from = self.open_dir(&from_path)?;
                let to = self.open_dir(&to_path)?;
                sys::rename_at(from.as_fd(), name, to.as_fd(), new_name, flags).map_err(errno)?;
                lock(&self.shared.nodes).rename(&from_path.join(name), &to_path.join(new_name));
                Ok(Response::Ok)
            }
            Request::Link {
                node,
                new_parent,
                new_name,
            } => {
                self.writable()?;
                let new_name = valid_name(&new_name)?;
                let (from, _, name) = self.parent_of(node)?;
                let to_path = self.path(new_parent)?;
                let to = self.open_dir(&to_path)?;
                sys::link_at(from.as_fd(), &name, to.as_fd(), new_name).map_err(errno)?;
                Ok(Response::Attr(self.child_attr(
                    to.as_fd(),
                    &to_path,
                    new_name,
                )?))
            }
            Request::Symlink {
                parent,
                name,
                target,
                uid,
                gid,
            } => {
                self.writable()?;
                let name = valid_name(&name)?;
                if target.is_empty() || target.contains(&0) {
                    return Err(libc::EINVAL);
                }
                let dir_path = self.path(parent)?;
                let dir = self.open_dir(&dir_path)?;
                sys::symlink_at(&target, dir.as_fd(), name).map_err(errno)?;
                self.chown_new(dir.as_fd(), name, uid, gid);
                Ok(Response::Attr(self.child_attr(
                    dir.as_fd(),
                    &dir_path,
                    name,
                )?))
            }
            Request::Readlink { node } => {
                let (dir, _, name) = self.parent_of(node)?;
                Ok(Response::Target(
                    sys::readlink_at(dir.as_fd(), &name).map_err(errno)?,
                ))
            }
            Request::Statfs => {
                let s = sys::fstatvfs(self.root()).map_err(errno)?;
                Ok(Response::StatFs(proto::StatFs {
                    blocks: s.f_blocks,
                    bfree: s.f_bfree,
                    bavail: s.f_bavail,
                    files: s.f_files,
                    ffree: s.f_ffree,
                    bsize: s.f_bsize as u32,
                    namelen: s.f_namemax as u32,
                    frsize: s.f_frsize as u32,
                }))
            }
            Request::Fsync { handle, datasync } => {
                let f = self.file(handle)?;
                if datasync {
                    f.sync_data().map_err(errno)?;
                } else {
                    f.sync_all().map_err(errno)?;
                }
                Ok(Response::Ok)
            }
            Request::Release { handle } => {
                lock(&self.handles).remove(&handle);
                Ok(Response::Ok)
            }
            Request::Stats => Ok(Response::Stats(self.shared.counters.snapshot())),
        }
    }

    fn remove(&self, parent: u64, name: &[u8], flags: i32) -> OpResult {
        self.writable()?;
        let name = valid_name(name)?;
        let dir_path = self.path(parent)?;
        let dir = self.open_dir(&dir_path)?;
        sys::unlink_at(dir.as_fd(), name, flags).map_err(errno)?;
        lock(&self.shared.nodes).forget_path(&dir_path.join(name));
        Ok(Response::Ok)
    }

    fn readdir(&self, node: u64, cookie: u64) -> OpResult {
        let dir_path = self.path(node)?;
        let fd = sys::open_beneath(
            self.root(),
            &dir_path,
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
        )
        .map_err(errno)?;
        if cookie != 0 {
            sys::lseek_set(fd.as_fd(), cookie).map_err(errno)?;
        }
        let mut buf = vec![0u8; 64 * 1024];
        let mut entries = Vec::new();
        let mut bytes = 0usize;
        let mut last = cookie;
        let budget = READDIR_BATCH_BYTES;
        loop {
            let batch = sys::getdents(fd.as_fd(), &mut buf).map_err(errno)?;
            if batch.is_empty() {
                return Ok(Response::Dir {
                    entries,
                    next: None,
                });
            }
            for d in batch {
                let name = d.name.to_bytes();
                if name == b"." || name == b".." {
                    last = d.off;
                    continue;
                }
                let size = 4 + name.len() + proto::ATTR_LEN;
                if bytes + size > budget {
                    return Ok(Response::Dir {
                        entries,
                        next: Some(last),
                    });
                }
                let os = OsStr::from_bytes(name);
                match self.child_attr(fd.as_fd(), &dir_path, os) {
                    Ok(attr) => {
                        entries.push(DirEntry {
                            name: OsString::from(os).into_vec(),
                            attr,
                        });
                        bytes += size;
                    }
                    Err(libc::ENOENT) => {} // removed meanwhile
                    Err(e) => return Err(e),
                }
                last = d.off;
            }
        }
    }
}
