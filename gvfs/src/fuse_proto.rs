//! A handler of raw FUSE protocol messages over the client core, for the
//! virtio-fs device: it gets one request as the guest wrote it
//! (`fuse_in_header` and body, already gathered from the descriptor
//! chain) and returns the reply bytes (`fuse_out_header` and body).
//!
//! Every length and offset in the request is checked: a malformed request
//! gets an EINVAL reply (or, with no readable header, an error), never a
//! panic. Layouts follow `include/uapi/linux/fuse.h`, protocol 7.31.
//!
//! A guest's session survives a VM snapshot: [`FuseHandler::save_session`]
//! returns what the guest's FUSE client relies on ([`SessionState`]: the
//! INIT outcome, the node ids and file and directory handles it was
//! given), and [`FuseHandler::restore_session`] puts it into the handler
//! of a new client before the restored guest's next request. Node ids and
//! handles keep their values; files are opened again on the server, and
//! directories listed again, on first use.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::client::{ClientError, DirItem, Fs, FsState, StateError};
use crate::proto::{Attr, Kind, SetAttr, SetTime, Time};

/// A request too short to carry a header to answer, or a saved session
/// that cannot be put back.
#[derive(Debug, thiserror::Error)]
pub enum FuseProtoError {
    #[error("request of {0} bytes has no complete header")]
    ShortHeader(usize),
    #[error("the saved FUSE session is in format {0}; this build reads format {SESSION_FORMAT}")]
    SessionFormat(u32),
    #[error(
        "the saved FUSE session negotiated protocol {major}.{minor}, flags {flags:#x} and max_write {max_write}, which this handler does not offer"
    )]
    SessionInit {
        major: u32,
        minor: u32,
        flags: u32,
        max_write: u32,
    },
    #[error("the saved FUSE session holds {found} open directories, more than the {max} allowed")]
    SessionDirs { found: usize, max: usize },
    #[error("saved directory handle {0} is not a valid one, or appears twice")]
    SessionDirHandle(u64),
    #[error("the handler already serves a session: restore before the guest's first request")]
    SessionInUse,
    #[error("the saved FUSE session cannot be put back")]
    SessionState(#[from] StateError),
}

/// Size of `fuse_in_header`.
pub const IN_HEADER: usize = 40;
/// Size of `fuse_out_header`.
pub const OUT_HEADER: usize = 16;
/// The largest write payload we announce in INIT.
pub const MAX_WRITE: u32 = 1 << 20;

mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
}

// INIT flags.
const FUSE_ASYNC_READ: u32 = 1 << 0;
const FUSE_BIG_WRITES: u32 = 1 << 5;
const FUSE_AUTO_INVAL_DATA: u32 = 1 << 12;
const FUSE_DO_READDIRPLUS: u32 = 1 << 13;
const FUSE_PARALLEL_DIROPS: u32 = 1 << 18;
const FUSE_MAX_PAGES: u32 = 1 << 22;
/// The INIT flags this handler agrees to.
const OUR_FLAGS: u32 = FUSE_ASYNC_READ
    | FUSE_BIG_WRITES
    | FUSE_AUTO_INVAL_DATA
    | FUSE_DO_READDIRPLUS
    | FUSE_PARALLEL_DIROPS
    | FUSE_MAX_PAGES;
/// The newest minor version of protocol 7 this handler speaks.
const OUR_MINOR: u32 = 31;

/// The format of [`SessionState`] this build writes and reads.
pub const SESSION_FORMAT: u32 = 1;

// SETATTR valid bits.
const FATTR_MODE: u32 = 1 << 0;
const FATTR_UID: u32 = 1 << 1;
const FATTR_GID: u32 = 1 << 2;
const FATTR_SIZE: u32 = 1 << 3;
const FATTR_ATIME: u32 = 1 << 4;
const FATTR_MTIME: u32 = 1 << 5;
const FATTR_ATIME_NOW: u32 = 1 << 7;
const FATTR_MTIME_NOW: u32 = 1 << 8;

const FOPEN_KEEP_CACHE: u32 = 1 << 1;

/// The request header.
#[derive(Debug, Clone, Copy)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// Bounds-checked little-endian reader over a request body.
struct Body<'a>(&'a [u8]);

impl<'a> Body<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], i32> {
        if self.0.len() < n {
            return Err(libc::EINVAL);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, i32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, i32> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn skip(&mut self, n: usize) -> Result<(), i32> {
        self.take(n).map(drop)
    }
    /// A NUL-terminated name.
    fn name(&mut self) -> Result<&'a [u8], i32> {
        let end = self.0.iter().position(|&c| c == 0).ok_or(libc::EINVAL)?;
        let name = &self.0[..end];
        self.0 = &self.0[end + 1..];
        if name.is_empty() || name.len() > 4096 {
            return Err(libc::EINVAL);
        }
        Ok(name)
    }
}

fn parse_header(req: &[u8]) -> Result<InHeader, FuseProtoError> {
    if req.len() < IN_HEADER {
        return Err(FuseProtoError::ShortHeader(req.len()));
    }
    let u32_at = |o: usize| u32::from_le_bytes([req[o], req[o + 1], req[o + 2], req[o + 3]]);
    let u64_at = |o: usize| (u32_at(o) as u64) | ((u32_at(o + 4) as u64) << 32);
    Ok(InHeader {
        len: u32_at(0),
        opcode: u32_at(4),
        unique: u64_at(8),
        nodeid: u64_at(16),
        uid: u32_at(24),
        gid: u32_at(28),
        pid: u32_at(32),
    })
}

/// Little-endian writer of a reply body.
#[derive(Default)]
struct Out(Vec<u8>);

impl Out {
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn zeros(&mut self, n: usize) {
        self.0.resize(self.0.len() + n, 0);
    }
}

fn mode_of(a: &Attr) -> u32 {
    let t = match a.kind {
        Kind::File => libc::S_IFREG,
        Kind::Dir => libc::S_IFDIR,
        Kind::Symlink => libc::S_IFLNK,
        Kind::Fifo => libc::S_IFIFO,
        Kind::Socket => libc::S_IFSOCK,
        Kind::CharDev => libc::S_IFCHR,
        Kind::BlockDev => libc::S_IFBLK,
    };
    t | (a.perm & 0o7777)
}

fn dtype(k: Kind) -> u32 {
    (match k {
        Kind::File => libc::DT_REG,
        Kind::Dir => libc::DT_DIR,
        Kind::Symlink => libc::DT_LNK,
        Kind::Fifo => libc::DT_FIFO,
        Kind::Socket => libc::DT_SOCK,
        Kind::CharDev => libc::DT_CHR,
        Kind::BlockDev => libc::DT_BLK,
    }) as u32
}

/// Serves raw FUSE requests from [`Fs`].
///
/// What one guest session holds is bounded: open files by
/// [`crate::client::FsOptions::max_open_files`] (in [`Fs`]), open
/// directories by `max_open_dirs` (EMFILE past it) and the entries their
/// listings hold, together, by `max_dir_entries` (ENOMEM past it). INIT
/// (a guest that rebooted) and DESTROY release everything the session
/// still held, so a guest that never sent RELEASE does not keep it.
pub struct FuseHandler {
    fs: Arc<Fs>,
    ttl: Duration,
    session: Mutex<Session>,
    next_dir: AtomicU64,
}

/// An open directory: its inode and listing (`None`: a restored one, not
/// listed again yet).
#[derive(Clone)]
struct OpenDir {
    ino: u64,
    items: Option<Arc<Vec<DirItem>>>,
}

/// Handles a guest session holds.
#[derive(Default)]
struct Session {
    /// What INIT settled, once the guest sent it.
    init: Option<InitState>,
    dirs: HashMap<u64, OpenDir>,
    /// Entries of all `dirs` together.
    dir_entries: usize,
    /// Open files (handles of [`Fs`]).
    files: HashSet<u64>,
}

/// What the guest was told in answer to its FUSE_INIT, and holds to: it
/// does not send INIT again after a restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitState {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    /// The flags both sides agreed to.
    pub flags: u32,
    pub max_write: u32,
}

/// One open directory handle of a saved session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirState {
    pub fh: u64,
    pub ino: u64,
}

/// A guest's FUSE session, saved: what its FUSE client relies on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionState {
    /// [`SESSION_FORMAT`].
    pub format: u32,
    /// `None`: the guest had not mounted the share.
    pub init: Option<InitState>,
    /// The node ids (the client's inode numbers) the guest was given,
    /// with their paths and lookup counts, and its open files.
    pub fs: FsState,
    /// Open directories, listed again on first use after a restore (in
    /// the server's order, so offsets mean the same entries while the
    /// directory does not change).
    pub dirs: Vec<DirState>,
    /// The next directory handle to give out.
    pub next_dir: u64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn err(e: ClientError) -> i32 {
    e.errno()
}

impl FuseHandler {
    pub fn new(fs: Arc<Fs>) -> FuseHandler {
        let ttl = fs.options().attr_timeout;
        FuseHandler {
            fs,
            ttl,
            session: Mutex::new(Session::default()),
            next_dir: AtomicU64::new(1),
        }
    }

    /// Releases every file and directory the session holds (a new session
    /// starts, or the guest unmounted).
    fn end_session(&self) {
        let old = std::mem::take(&mut *lock(&self.session));
        for fh in old.files {
            let _ = self.fs.release(fh);
        }
    }

    /// What the guest's FUSE client relies on, for a snapshot (see
    /// [`SessionState`]). Take it while no request is being handled.
    pub fn save_session(&self) -> SessionState {
        let s = lock(&self.session);
        let mut dirs: Vec<DirState> = s
            .dirs
            .iter()
            .map(|(&fh, d)| DirState { fh, ino: d.ino })
            .collect();
        dirs.sort_unstable_by_key(|d| d.fh);
        SessionState {
            format: SESSION_FORMAT,
            init: s.init,
            fs: self.fs.save_state(Some(&s.files)),
            dirs,
            next_dir: self.next_dir.load(Ordering::Relaxed),
        }
    }

    /// Puts a saved session back, into a handler whose client is new (no
    /// request served yet, no file open), before the restored guest's
    /// next request: node ids and handles mean what they meant. The state
    /// is checked whole first (it comes from a file); nothing changes if
    /// it is refused. A file or directory deleted on the server meanwhile
    /// gives its request ENOENT (or ESTALE), not this an error.
    pub fn restore_session(&self, state: SessionState) -> Result<(), FuseProtoError> {
        if state.format != SESSION_FORMAT {
            return Err(FuseProtoError::SessionFormat(state.format));
        }
        if let Some(i) = state.init
            && (i.major != 7
                || i.minor > OUR_MINOR
                || i.flags & !OUR_FLAGS != 0
                || i.max_write > MAX_WRITE)
        {
            return Err(FuseProtoError::SessionInit {
                major: i.major,
                minor: i.minor,
                flags: i.flags,
                max_write: i.max_write,
            });
        }
        let max_dirs = self.fs.options().max_open_dirs;
        if state.dirs.len() > max_dirs {
            return Err(FuseProtoError::SessionDirs {
                found: state.dirs.len(),
                max: max_dirs,
            });
        }
        let mut dirs = HashMap::with_capacity(state.dirs.len());
        for d in &state.dirs {
            let fresh = dirs
                .insert(
                    d.fh,
                    OpenDir {
                        ino: d.ino,
                        items: None,
                    },
                )
                .is_none();
            if d.fh == 0 || d.fh == u64::MAX || !fresh {
                return Err(FuseProtoError::SessionDirHandle(d.fh));
            }
        }
        let next_dir = state
            .dirs
            .iter()
            .map(|d| d.fh + 1)
            .fold(state.next_dir.max(1), u64::max);
        let mut s = lock(&self.session);
        if s.init.is_some() || !s.dirs.is_empty() || !s.files.is_empty() {
            return Err(FuseProtoError::SessionInUse);
        }
        // The directories' inodes need not be saved: one the guest forgot
        // while it held the directory open gives its READDIR ESTALE.
        let files = self.fs.restore_state(state.fs)?;
        *s = Session {
            init: state.init,
            dirs,
            dir_entries: 0,
            files,
        };
        self.next_dir.store(next_dir, Ordering::Relaxed);
        Ok(())
    }

    /// The listing of open directory `fh`, listed again first if the
    /// session was restored since it was opened.
    fn dir_listing(&self, fh: u64) -> Result<(u64, Arc<Vec<DirItem>>), i32> {
        let d = lock(&self.session)
            .dirs
            .get(&fh)
            .cloned()
            .ok_or(libc::EBADF)?;
        if let Some(items) = d.items {
            return Ok((d.ino, items));
        }
        let items = Arc::new(self.fs.readdir(d.ino).map_err(err)?);
        let max = self.fs.options().max_dir_entries;
        let mut s = lock(&self.session);
        let entries = s.dir_entries.saturating_add(items.len());
        let Some(open) = s.dirs.get_mut(&fh) else {
            return Err(libc::EBADF);
        };
        if let Some(other) = &open.items {
            // Another request listed it meanwhile.
            return Ok((d.ino, other.clone()));
        }
        if entries > max {
            return Err(libc::ENOMEM);
        }
        open.items = Some(items.clone());
        s.dir_entries = entries;
        Ok((d.ino, items))
    }

    /// EMFILE if the session holds its most open directories.
    fn dir_room(&self) -> Result<(), i32> {
        if lock(&self.session).dirs.len() >= self.fs.options().max_open_dirs {
            return Err(libc::EMFILE);
        }
        Ok(())
    }

    /// Keeps the listing of the open directory `ino`, within the
    /// session's bounds.
    fn add_dir(&self, ino: u64, items: Vec<DirItem>) -> Result<u64, i32> {
        let opts = self.fs.options();
        let mut s = lock(&self.session);
        if s.dirs.len() >= opts.max_open_dirs {
            return Err(libc::EMFILE);
        }
        let entries = s.dir_entries.saturating_add(items.len());
        if entries > opts.max_dir_entries {
            return Err(libc::ENOMEM);
        }
        let fh = self.next_dir.fetch_add(1, Ordering::Relaxed);
        s.dirs.insert(
            fh,
            OpenDir {
                ino,
                items: Some(Arc::new(items)),
            },
        );
        s.dir_entries = entries;
        Ok(fh)
    }

    fn remove_dir(&self, fh: u64) {
        let mut s = lock(&self.session);
        if let Some(d) = s.dirs.remove(&fh).and_then(|d| d.items) {
            s.dir_entries = s.dir_entries.saturating_sub(d.len());
        }
    }

    fn attr(&self, o: &mut Out, ino: u64, a: &Attr) {
        o.u64(ino);
        o.u64(a.size);
        o.u64(a.blocks);
        o.u64(a.atime.sec as u64);
        o.u64(a.mtime.sec as u64);
        o.u64(a.ctime.sec as u64);
        o.u32(a.atime.nsec);
        o.u32(a.mtime.nsec);
        o.u32(a.ctime.nsec);
        o.u32(mode_of(a));
        o.u32(a.nlink);
        o.u32(a.uid);
        o.u32(a.gid);
        o.u32(a.rdev as u32);
        o.u32(a.blksize);
        o.u32(0);
    }

    fn entry(&self, o: &mut Out, ino: u64, a: &Attr) {
        o.u64(ino);
        o.u64(0); // generation
        o.u64(self.ttl.as_secs());
        o.u64(self.ttl.as_secs());
        o.u32(self.ttl.subsec_nanos());
        o.u32(self.ttl.subsec_nanos());
        self.attr(o, ino, a);
    }

    fn attr_out(&self, o: &mut Out, ino: u64, a: &Attr) {
        o.u64(self.ttl.as_secs());
        o.u32(self.ttl.subsec_nanos());
        o.u32(0);
        self.attr(o, ino, a);
    }

    /// Handles one request. `Ok(None)`: the op takes no reply (FORGET,
    /// BATCH_FORGET, INTERRUPT).
    pub fn handle(&self, req: &[u8]) -> Result<Option<Vec<u8>>, FuseProtoError> {
        let h = parse_header(req)?;
        let body = if (h.len as usize) < IN_HEADER || (h.len as usize) > req.len() {
            Err(libc::EINVAL)
        } else {
            Ok(&req[IN_HEADER..h.len as usize])
        };
        match (h.opcode, body) {
            (opcode::FORGET, Ok(b)) => {
                if let Ok(n) = Body(b).u64() {
                    self.fs.forget(h.nodeid, n);
                }
                return Ok(None);
            }
            (opcode::BATCH_FORGET, Ok(b)) => {
                let mut b = Body(b);
                if let (Ok(count), Ok(_)) = (b.u32(), b.u32()) {
                    for _ in 0..count {
                        let (Ok(node), Ok(n)) = (b.u64(), b.u64()) else {
                            break;
                        };
                        self.fs.forget(node, n);
                    }
                }
                return Ok(None);
            }
            (opcode::FORGET | opcode::BATCH_FORGET | opcode::INTERRUPT, _) => return Ok(None),
            _ => {}
        }
        let res = body.and_then(|b| self.dispatch(&h, Body(b)));
        let (errno, payload) = match res {
            Ok(out) => (0, out.0),
            Err(e) => (e, Vec::new()),
        };
        let mut reply = Vec::with_capacity(OUT_HEADER + payload.len());
        reply.extend_from_slice(&((OUT_HEADER + payload.len()) as u32).to_le_bytes());
        reply.extend_from_slice(&(-errno).to_le_bytes());
        reply.extend_from_slice(&h.unique.to_le_bytes());
        reply.extend_from_slice(&payload);
        Ok(Some(reply))
    }

    fn dispatch(&self, h: &InHeader, mut b: Body<'_>) -> Result<Out, i32> {
        let fs = &self.fs;
        let ino = h.nodeid;
        let mut o = Out::default();
        match h.opcode {
            opcode::INIT => {
                self.end_session();
                let major = b.u32()?;
                let minor = b.u32()?;
                let max_readahead = b.u32()?;
                let flags = b.u32()?;
                if major != 7 {
                    // Tell the kernel which major we speak; it retries or gives up.
                    o.u32(7);
                    o.u32(OUR_MINOR);
                    o.zeros(56);
                    return Ok(o);
                }
                let agreed = InitState {
                    major: 7,
                    minor: minor.min(OUR_MINOR),
                    max_readahead,
                    flags: flags & OUR_FLAGS,
                    max_write: MAX_WRITE,
                };
                lock(&self.session).init = Some(agreed);
                o.u32(agreed.major);
                o.u32(agreed.minor);
                o.u32(agreed.max_readahead);
                o.u32(agreed.flags);
                o.u16(16); // max_background
                o.u16(12); // congestion_threshold
                o.u32(agreed.max_write);
                o.u32(1); // time_gran
                o.u16((MAX_WRITE / 4096) as u16); // max_pages
                o.u16(0); // map_alignment
                o.u32(0); // flags2
                o.zeros(28);
            }
            opcode::DESTROY => self.end_session(),
            opcode::LOOKUP => {
                let name = b.name()?;
                let e = fs.lookup(ino, name).map_err(err)?;
                self.entry(&mut o, e.ino, &e.attr);
            }
            opcode::GETATTR => {
                let a = fs.getattr(ino).map_err(err)?;
                self.attr_out(&mut o, ino, &a);
            }
            opcode::SETATTR => {
                let valid = b.u32()?;
                b.skip(4 + 8)?; // padding, fh
                let size = b.u64()?;
                b.skip(8)?; // lock_owner
                let atime = b.u64()?;
                let mtime = b.u64()?;
                b.skip(8)?; // ctime
                let atimensec = b.u32()?;
                let mtimensec = b.u32()?;
                b.skip(4)?; // ctimensec
                let mode = b.u32()?;
                b.skip(4)?;
                let uid = b.u32()?;
                let gid = b.u32()?;
                let t = |sec: u64, nsec: u32, now: bool| {
                    if now {
                        SetTime::Now
                    } else {
                        SetTime::At(Time {
                            sec: sec as i64,
                            nsec: nsec.min(999_999_999),
                        })
                    }
                };
                let set = SetAttr {
                    mode: (valid & FATTR_MODE != 0).then_some(mode),
                    uid: (valid & FATTR_UID != 0).then_some(uid),
                    gid: (valid & FATTR_GID != 0).then_some(gid),
                    size: (valid & FATTR_SIZE != 0).then_some(size),
                    atime: (valid & FATTR_ATIME != 0)
                        .then(|| t(atime, atimensec, valid & FATTR_ATIME_NOW != 0)),
                    mtime: (valid & FATTR_MTIME != 0)
                        .then(|| t(mtime, mtimensec, valid & FATTR_MTIME_NOW != 0)),
                };
                let a = fs.setattr(ino, set).map_err(err)?;
                self.attr_out(&mut o, ino, &a);
            }
            opcode::READLINK => {
                o.0 = fs.readlink(ino).map_err(err)?;
            }
            opcode::SYMLINK => {
                let name = b.name()?;
                let target = b.name()?;
                let e = fs.symlink(ino, name, target, h.uid, h.gid).map_err(err)?;
                self.entry(&mut o, e.ino, &e.attr);
            }
            opcode::MKDIR => {
                let mode = b.u32()?;
                let umask = b.u32()?;
                let name = b.name()?;
                let e = fs
                    .mkdir(ino, name, mode & !umask & 0o7777, h.uid, h.gid)
                    .map_err(err)?;
                self.entry(&mut o, e.ino, &e.attr);
            }
            opcode::UNLINK => fs.unlink(ino, b.name()?).map_err(err)?,
            opcode::RMDIR => fs.rmdir(ino, b.name()?).map_err(err)?,
            opcode::RENAME | opcode::RENAME2 => {
                let newdir = b.u64()?;
                let flags = if h.opcode == opcode::RENAME2 {
                    let f = b.u32()?;
                    b.skip(4)?;
                    f
                } else {
                    0
                };
                let old = b.name()?;
                let new = b.name()?;
                fs.rename(ino, old, newdir, new, flags).map_err(err)?;
            }
            opcode::LINK => {
                let old = b.u64()?;
                let name = b.name()?;
                let e = fs.link(old, ino, name).map_err(err)?;
                self.entry(&mut o, e.ino, &e.attr);
            }
            opcode::OPEN => {
                let flags = b.u32()?;
                let op = fs.open(ino, flags).map_err(err)?;
                lock(&self.session).files.insert(op.fh);
                o.u64(op.fh);
                o.u32(if op.keep_cache { FOPEN_KEEP_CACHE } else { 0 });
                o.u32(0);
            }
            opcode::CREATE => {
                let flags = b.u32()?;
                let mode = b.u32()?;
                let umask = b.u32()?;
                b.skip(4)?;
                let name = b.name()?;
                let (e, fh) = fs
                    .create(ino, name, mode & !umask & 0o7777, flags, h.uid, h.gid)
                    .map_err(err)?;
                lock(&self.session).files.insert(fh);
                self.entry(&mut o, e.ino, &e.attr);
                o.u64(fh);
                o.u32(0);
                o.u32(0);
            }
            opcode::READ => {
                let fh = b.u64()?;
                let offset = b.u64()?;
                let size = b.u32()?;
                if size > MAX_WRITE {
                    return Err(libc::EINVAL);
                }
                o.0 = fs.read(fh, offset, size).map_err(err)?;
            }
            opcode::WRITE => {
                let fh = b.u64()?;
                let offset = b.u64()?;
                let size = b.u32()?;
                b.skip(4 + 8 + 4 + 4)?;
                let data = b.take(size as usize)?;
                let n = fs.write(fh, offset, data).map_err(err)?;
                o.u32(n);
                o.u32(0);
            }
            opcode::STATFS => {
                let s = fs.statfs().map_err(err)?;
                o.u64(s.blocks);
                o.u64(s.bfree);
                o.u64(s.bavail);
                o.u64(s.files);
                o.u64(s.ffree);
                o.u32(s.bsize);
                o.u32(s.namelen);
                o.u32(s.frsize);
                o.zeros(4 + 24);
            }
            opcode::RELEASE => {
                let fh = b.u64()?;
                // Only what this session opened (and has not released).
                if lock(&self.session).files.remove(&fh) {
                    let _ = fs.release(fh);
                }
            }
            opcode::FLUSH | opcode::ACCESS | opcode::FSYNCDIR => {}
            opcode::FSYNC => {
                let fh = b.u64()?;
                let flags = b.u32()?;
                fs.fsync(fh, flags & 1 != 0).map_err(err)?;
            }
            opcode::OPENDIR => {
                // The cap before the listing: a guest past it costs the
                // server nothing (checked again once listed).
                self.dir_room()?;
                let items = fs.readdir(ino).map_err(err)?;
                let fh = self.add_dir(ino, items)?;
                o.u64(fh);
                o.u32(0);
                o.u32(0);
            }
            opcode::READDIR | opcode::READDIRPLUS => {
                let fh = b.u64()?;
                let offset = b.u64()?;
                let size = b.u32()? as usize;
                let (dir, items) = self.dir_listing(fh)?;
                let plus = h.opcode == opcode::READDIRPLUS;
                for (i, it) in items.iter().enumerate().skip(offset as usize) {
                    let namelen = it.name.len();
                    let dirent = (24 + namelen).div_ceil(8) * 8;
                    let need = dirent + if plus { 128 } else { 0 };
                    if o.0.len() + need > size {
                        break;
                    }
                    let mut ino = it.ino;
                    if plus {
                        // The guest now holds a reference to this entry.
                        ino = self.fs.remember_entry(dir, it);
                        self.entry(&mut o, ino, &it.attr);
                    }
                    let start = o.0.len();
                    o.u64(ino);
                    o.u64(i as u64 + 1);
                    o.u32(namelen as u32);
                    o.u32(dtype(it.attr.kind));
                    o.0.extend_from_slice(&it.name);
                    o.0.resize(start + dirent, 0);
                }
            }
            opcode::RELEASEDIR => {
                let fh = b.u64()?;
                self.remove_dir(fh);
            }
            _ => return Err(libc::ENOSYS),
        }
        Ok(o)
    }
}
