//! The requests a logged-in client sends, run against the export, and
//! the connection state they use: its open files, counted against the
//! connection's share, its peer's and the server's total.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::{debug, warn};

use super::{ServerConfig, Shared, lock};
use crate::limit::Budget;
use crate::proto::{self, Attr, DirEntry, Kind, Request, Response, SetAttr, SetTime, Time};
use crate::sys;

/// Bytes of entries per READDIR reply (at most [`proto::MAX_READDIR_BYTES`]):
/// about a thousand entries, so that a client can hand out the first
/// entries of a large directory while the server reads the rest.
pub(super) const READDIR_BATCH_BYTES: usize = 128 * 1024;

/// A logged-in connection's state.
pub(super) struct Conn {
    pub(super) shared: Arc<Shared>,
    /// The peer it comes from (as counted: an IPv6 peer by its /64).
    ip: IpAddr,
    handles: Mutex<HashMap<u64, Arc<File>>>,
    next_handle: AtomicU64,
    /// This connection's share of open files.
    handle_budget: Budget,
    /// The connection failed or ended: its queued requests are dropped.
    dead: AtomicBool,
}

/// A place for one more open file, taken before the file is opened and
/// given back unless [`HandleSlot::keep`] fills it.
struct HandleSlot<'a> {
    conn: &'a Conn,
    kept: bool,
}

impl HandleSlot<'_> {
    fn keep(mut self, f: File) -> u64 {
        self.kept = true;
        let h = self.conn.next_handle.fetch_add(1, Ordering::Relaxed);
        lock(&self.conn.handles).insert(h, Arc::new(f));
        h
    }
}

impl Drop for HandleSlot<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.conn.handle_budget.give(1);
            self.conn.shared.handles.give(self.conn.ip, 1);
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Its files close with it.
        let n = lock(&self.handles).len();
        self.shared.handles.give(self.ip, n);
    }
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
    pub(super) fn new(shared: Arc<Shared>, ip: IpAddr) -> Conn {
        Conn {
            handle_budget: Budget::new(shared.limits.max_handles_per_conn),
            shared,
            ip,
            handles: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            dead: AtomicBool::new(false),
        }
    }

    pub(super) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    pub(super) fn set_dead(&self) {
        self.dead.store(true, Ordering::SeqCst);
    }

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

    /// A place for one more open file: EMFILE past this connection's
    /// share or its peer's, ENFILE past the server's total (or, once more
    /// than half of it is open, past the peer's fair share).
    fn reserve_handle(&self) -> Result<HandleSlot<'_>, i32> {
        let refuse = |errno: i32| {
            if let Some(held_back) = self.shared.logs.handles.allow() {
                warn!(
                    errno,
                    peer = %self.ip,
                    held = self.handle_budget.used(),
                    in_all = self.shared.handles.used(),
                    held_back,
                    "open refused: too many open files"
                );
            }
            Err(errno)
        };
        if !self.handle_budget.try_take() {
            return refuse(libc::EMFILE);
        }
        if let Err(why) = self.shared.handles.try_take(self.ip) {
            self.handle_budget.give(1);
            return refuse(why.errno());
        }
        Ok(HandleSlot {
            conn: self,
            kept: false,
        })
    }

    fn release(&self, handle: u64) {
        if lock(&self.handles).remove(&handle).is_some() {
            self.handle_budget.give(1);
            self.shared.handles.give(self.ip, 1);
        }
    }

    /// Opens `path` as OPEN does: regular files and (if `dirs`)
    /// directories only, never following a last-component symlink, never
    /// blocking (a FIFO would hold a worker) and never acting on a device.
    /// The type is checked on an `O_PATH` descriptor first (no open side
    /// effects), and again on the opened one.
    fn open_plain(
        &self,
        path: &Path,
        flags: i32,
        dirs: bool,
    ) -> Result<(OwnedFd, libc::stat), i32> {
        let plain = |st: &libc::stat| match st.st_mode & libc::S_IFMT {
            libc::S_IFREG => Ok(()),
            libc::S_IFDIR if dirs => Ok(()),
            libc::S_IFDIR => Err(libc::EISDIR),
            libc::S_IFLNK => Err(libc::ELOOP),
            _ => Err(libc::EOPNOTSUPP),
        };
        let probe = sys::open_beneath(self.root(), path, libc::O_PATH | libc::O_NOFOLLOW, 0)
            .map_err(errno)?;
        plain(&sys::fstat(probe.as_fd()).map_err(errno)?)?;
        let fd = sys::open_beneath(
            self.root(),
            path,
            flags | libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_NONBLOCK,
            0,
        )
        .map_err(errno)?;
        let st = sys::fstat(fd.as_fd()).map_err(errno)?;
        plain(&st)?;
        Ok((fd, st))
    }

    /// Creates `path` as a new regular file (`O_EXCL`), owned by the
    /// caller's mapped ids; an existing file, unless the caller asked for
    /// `O_EXCL`, is opened as OPEN opens it and keeps its owner.
    fn create_or_open(
        &self,
        path: &Path,
        flags: i32,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<(OwnedFd, libc::stat), i32> {
        let keep = libc::O_ACCMODE | libc::O_APPEND | libc::O_TRUNC;
        let excl = flags & libc::O_EXCL != 0;
        // Twice at most: a file removed between the two tries is created.
        for _ in 0..2 {
            match sys::open_beneath(
                self.root(),
                path,
                (flags & keep)
                    | libc::O_CREAT
                    | libc::O_EXCL
                    | libc::O_NOFOLLOW
                    | libc::O_NOCTTY
                    | libc::O_NONBLOCK,
                client_mode(mode, false),
            ) {
                Ok(fd) => {
                    let uid = self.cfg().uid_map.to_local(uid);
                    let gid = self.cfg().gid_map.to_local(gid);
                    if let Err(e) = sys::chown_at(fd.as_fd(), OsStr::new(""), uid, gid) {
                        debug!(error = %e, "chown of a new file failed");
                    }
                    let st = sys::fstat(fd.as_fd()).map_err(errno)?;
                    return Ok((fd, st));
                }
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) && !excl => {
                    match self.open_plain(path, flags & keep, false) {
                        Err(libc::ENOENT) => continue,
                        r => return r,
                    }
                }
                Err(e) => return Err(errno(e)),
            }
        }
        Err(libc::ENOENT)
    }

    fn chown_new(&self, dir: BorrowedFd<'_>, name: &OsStr, uid: u32, gid: u32) {
        let uid = self.cfg().uid_map.to_local(uid);
        let gid = self.cfg().gid_map.to_local(gid);
        if let Err(e) = sys::chown_at(dir, name, uid, gid) {
            debug!(error = %e, "chown of a new file failed");
        }
    }

    pub(super) fn handle(&self, req: Request) -> OpResult {
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
            Request::Setattr { node, set } => self.setattr(node, set),
            Request::Readdir { node, cookie } => self.readdir(node, cookie),
            Request::Open { node, flags } => {
                let flags = flags as i32;
                let acc = flags & libc::O_ACCMODE;
                if acc != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
                    self.writable()?;
                }
                let path = self.path(node)?;
                let slot = self.reserve_handle()?;
                let keep = libc::O_ACCMODE | libc::O_APPEND | libc::O_TRUNC | libc::O_DIRECTORY;
                let (fd, st) = self.open_plain(&path, flags & keep, true)?;
                let attr = self.attr(node, &st);
                let handle = slot.keep(File::from(fd));
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
                    let at = offset.checked_add(got as u64).ok_or(libc::EINVAL)?;
                    match f.read_at(&mut buf[got..], at) {
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
                let path = self.path(parent)?.join(name);
                let slot = self.reserve_handle()?;
                let (fd, st) = self.create_or_open(&path, flags as i32, mode, uid, gid)?;
                let node = lock(&self.shared.nodes).intern(path);
                let attr = self.attr(node, &st);
                let handle = slot.keep(File::from(fd));
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
                self.release(handle);
                Ok(Response::Ok)
            }
            Request::Stats => Ok(Response::Stats(self.shared.counters.snapshot())),
        }
    }

    /// SETATTR. Everything but the size is changed through an `O_PATH`
    /// descriptor: nothing is opened, so a device node's driver is never
    /// called and a FIFO never waited on. Only a regular file has a size
    /// to set (opened as OPEN opens it); a symlink is refused (ELOOP),
    /// never followed.
    fn setattr(&self, node: u64, set: SetAttr) -> OpResult {
        self.writable()?;
        let path = self.path(node)?;
        let fd = sys::open_beneath(self.root(), &path, libc::O_PATH | libc::O_NOFOLLOW, 0)
            .map_err(errno)?;
        let kind = sys::fstat(fd.as_fd()).map_err(errno)?.st_mode & libc::S_IFMT;
        match kind {
            libc::S_IFLNK => return Err(libc::ELOOP),
            libc::S_IFREG => {}
            libc::S_IFDIR if set.size.is_some() => return Err(libc::EISDIR),
            _ if set.size.is_some() => return Err(libc::EINVAL),
            _ => {}
        }
        if let Some(mode) = set.mode {
            sys::chmod_fd(fd.as_fd(), client_mode(mode, kind == libc::S_IFDIR)).map_err(errno)?;
        }
        if set.uid.is_some() || set.gid.is_some() {
            let uid = set.uid.map_or(u32::MAX, |u| self.cfg().uid_map.to_local(u));
            let gid = set.gid.map_or(u32::MAX, |g| self.cfg().gid_map.to_local(g));
            sys::chown_at(fd.as_fd(), OsStr::new(""), uid, gid).map_err(errno)?;
        }
        if let Some(size) = set.size {
            let (file, _) = self.open_plain(&path, libc::O_WRONLY, false)?;
            sys::ftruncate(file.as_fd(), size).map_err(errno)?;
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
            sys::utimens_fd(fd.as_fd(), &[ts(set.atime), ts(set.mtime)]).map_err(errno)?;
        }
        let st = sys::fstat(fd.as_fd()).map_err(errno)?;
        Ok(Response::Attr(self.attr(node, &st)))
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
