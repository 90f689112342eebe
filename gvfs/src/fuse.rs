//! The host FUSE mount: a `fuser` file system over the client core.
//!
//! Opens use the kernel page cache, kept across opens of an unchanged
//! file (`FOPEN_KEEP_CACHE`). On a read-only mount, an open of a file the
//! client holds a complete local copy of (for the version `open` found on
//! the server) passes through to that copy in the kernel (FUSE
//! passthrough): its reads are reads of a local file (its page cache, with
//! large folios, which the FUSE page cache does not have) and never reach
//! this process.
//!
//! The kernel keeps an inode either in passthrough mode (all its open
//! files pass through to one backing file) or in cached mode, and fails an
//! open that does not fit (EIO). So an inode with cached opens gets no
//! passthrough, and while an inode has passthrough opens every new open
//! passes through to the same backing file; if the server has a new
//! version by then, the backing file is refilled with it first (its other
//! users then see the new version, as they would after the page cache is
//! dropped for a new version; opens of other files do not wait for the
//! refill, those of the same file do). A thread refills it likewise when
//! a file passed through changes on the server (checked every attribute
//! timeout), so opens held meanwhile see the change as they would through
//! the page cache. Writers cannot share an inode with passthrough readers
//! (their writes would go to the copy), hence read-only mounts only.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak, mpsc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    BsdFileFlags, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use tracing::debug;

use crate::client::{ClientError, DirItem, DirReader, Fs, Opened};
use crate::proto::{Attr, Kind, SetAttr, SetTime, Time};

/// Adapts [`Fs`] to `fuser::Filesystem`.
pub struct FuseFs {
    fs: Arc<Fs>,
    ttl: Duration,
    dirs: Mutex<HashMap<u64, Arc<OpenDir>>>,
    next_dir: AtomicU64,
    /// For each directory, a digest of the listing last given to the
    /// kernel, which keeps it in its readdir cache while it is unchanged.
    listed: Arc<Mutex<HashMap<u64, u64>>>,
    /// Mounted read-only.
    read_only: bool,
    /// Passthrough is on: read-only, whole copies allowed, and the
    /// kernel took FUSE_PASSTHROUGH at INIT.
    passthrough: bool,
    /// How each inode's open files do I/O (see the module comment).
    io: Arc<Mutex<IoModes>>,
    /// Dropped with this: stops the thread that revalidates passed-through
    /// files.
    _watch_stop: Option<mpsc::Sender<()>>,
}

/// How one open file does I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Through the kernel page cache.
    Cached,
    /// Passed through to the inode's backing file.
    Passthrough,
}

/// The backing file of an inode in passthrough mode.
struct Backing {
    file: Arc<File>,
    id: fuser::BackingId,
    /// The file version it holds.
    version: u64,
}

/// Open files per inode, and the backing file of a passthrough inode.
#[derive(Default)]
struct InodeIo {
    cached: u64,
    passthrough: u64,
    backing: Option<Backing>,
    /// Held while the backing file is refilled (one refill at a time).
    gate: Arc<Mutex<()>>,
}

#[derive(Default)]
struct IoModes {
    inodes: HashMap<u64, InodeIo>,
    /// fh -> (ino, mode).
    files: HashMap<u64, (u64, Mode)>,
    /// Inodes whose backing file took a new version without the kernel
    /// seeing new attributes: pages of the old version may be left in
    /// its page cache (the kernel drops them at a passthrough open without
    /// `FOPEN_KEEP_CACHE` today; this does not count on it). The next
    /// page-cache open of each drops them (no `FOPEN_KEEP_CACHE`).
    refilled: HashSet<u64>,
}

impl IoModes {
    fn released(&mut self, fh: u64) {
        let Some((ino, mode)) = self.files.remove(&fh) else {
            return;
        };
        let Some(st) = self.inodes.get_mut(&ino) else {
            return;
        };
        match mode {
            Mode::Cached => st.cached = st.cached.saturating_sub(1),
            Mode::Passthrough => {
                st.passthrough = st.passthrough.saturating_sub(1);
                if st.passthrough == 0 {
                    // Closes the backing id; the kernel keeps the file
                    // for as long as it needs it.
                    st.backing = None;
                }
            }
        }
        if st.cached == 0 && st.passthrough == 0 {
            self.inodes.remove(&ino);
        }
    }
}

impl FuseFs {
    /// `read_only`: the mount is read-only (the only kind that passes
    /// reads through to whole-file copies).
    pub fn new(fs: Arc<Fs>, read_only: bool) -> FuseFs {
        let ttl = fs.options().attr_timeout;
        FuseFs {
            fs,
            ttl,
            dirs: Mutex::new(HashMap::new()),
            listed: Arc::new(Mutex::new(HashMap::new())),
            next_dir: AtomicU64::new(1),
            read_only,
            passthrough: false,
            io: Arc::new(Mutex::new(IoModes::default())),
            _watch_stop: None,
        }
    }

    /// Counts a new open of `ino` through the page cache (tracked only
    /// when opens may also pass through); false if the kernel must drop
    /// the pages it has of `ino`.
    fn count_cached(&self, ino: u64, fh: u64) -> bool {
        if !self.passthrough {
            return true;
        }
        let mut io = lock(&self.io);
        io.inodes.entry(ino).or_default().cached += 1;
        io.files.insert(fh, (ino, Mode::Cached));
        !io.refilled.remove(&ino)
    }

    /// Whether `max_open_dirs` directories are open already.
    fn dirs_full(&self) -> bool {
        lock(&self.dirs).len() >= self.fs.options().max_open_dirs
    }

    /// The open directory `fh`.
    fn open_dir(&self, fh: FileHandle) -> Result<Arc<OpenDir>, Errno> {
        lock(&self.dirs).get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    /// Answers an open of `ino` with passthrough if it can (see the module
    /// comment); gives `reply` back otherwise.
    fn open_passthrough(&self, ino: u64, o: &Opened, reply: ReplyOpen) -> Option<ReplyOpen> {
        if !self.passthrough {
            return Some(reply);
        }
        let fh = FileHandle(o.fh);
        let version = o.attr.version();
        let mut refreshed = false;
        // Decided and answered under the lock, so that no other open of
        // the inode can take another mode in between.
        let mut io = lock(&self.io);
        loop {
            let st = io.inodes.entry(ino).or_default();
            let Some(b) = st.backing.as_ref().filter(|_| st.passthrough > 0) else {
                break;
            };
            if b.version == version || refreshed {
                st.passthrough += 1;
                reply.opened_passthrough(fh, FopenFlags::empty(), &b.id);
                io.files.insert(o.fh, (ino, Mode::Passthrough));
                return None;
            }
            // Changed on the server since the backing file was filled:
            // filled again (without the lock; this inode's other opens
            // wait at its gate), then decided again.
            let (gate, file, seen) = (st.gate.clone(), b.file.clone(), b.version);
            drop(io);
            if let Err(e) = refill(&self.fs, &self.io, ino, o.fh, &gate, &file, Some(seen)) {
                let _ = self.fs.release(o.fh);
                reply.error(errno(e));
                return None;
            }
            refreshed = true;
            io = lock(&self.io);
        }
        let IoModes { inodes, files, .. } = &mut *io;
        let st = inodes.entry(ino).or_default();
        let Some(file) = o.backing.as_ref().filter(|_| st.cached == 0) else {
            return Some(reply);
        };
        match reply.open_backing(&**file) {
            Ok(id) => {
                reply.opened_passthrough(fh, FopenFlags::empty(), &id);
                st.backing = Some(Backing {
                    file: file.clone(),
                    id,
                    version,
                });
                st.passthrough += 1;
                files.insert(o.fh, (ino, Mode::Passthrough));
                None
            }
            Err(e) => {
                debug!(ino, error = %e, "no passthrough");
                if e.raw_os_error() == Some(libc::EPERM) {
                    // Not allowed here (it takes CAP_SYS_ADMIN): no more
                    // copies, nor tries.
                    self.fs.set_whole_copies(false);
                }
                Some(reply)
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn errno(e: ClientError) -> Errno {
    Errno::from_i32(e.errno())
}

fn systime(t: Time) -> SystemTime {
    if t.sec >= 0 {
        UNIX_EPOCH + Duration::new(t.sec as u64, t.nsec)
    } else {
        UNIX_EPOCH
    }
}

fn time_of(t: SystemTime) -> Time {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Time {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        },
        Err(_) => Time::default(),
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
    }
}

fn fattr(ino: u64, a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: a.size,
        blocks: a.blocks,
        atime: systime(a.atime),
        mtime: systime(a.mtime),
        ctime: systime(a.ctime),
        crtime: UNIX_EPOCH,
        kind: file_type(a.kind),
        perm: (a.perm & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev as u32,
        blksize: a.blksize,
        flags: 0,
    }
}

fn set_time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(s) => SetTime::At(time_of(s)),
    })
}

impl fuser::Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        for cap in [
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_AUTO_INVAL_DATA,
            InitFlags::FUSE_PARALLEL_DIROPS,
        ] {
            let _ = config.add_capabilities(cap);
        }
        if self.read_only && self.fs.options().whole_copy_bytes > 0 {
            // Backing files are on a plain local file system: depth 1.
            self.passthrough = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
        }
        debug!(passthrough = self.passthrough, "FUSE init");
        if self.passthrough {
            let (tx, rx) = mpsc::channel();
            let (fs, io) = (self.fs.clone(), Arc::downgrade(&self.io));
            // As often as attributes time out (with a floor).
            let every = self.ttl.max(Duration::from_millis(200));
            std::thread::Builder::new()
                .name("gvfs-revalidate".into())
                .spawn(move || watch(&fs, &io, &rx, every))?;
            self._watch_stop = Some(tx);
        }
        // Copies nothing can use are not made.
        self.fs.set_whole_copies(self.passthrough);
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_write(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.fs.lookup(parent.0, name.as_bytes()) {
            Ok(e) => reply.entry(&self.ttl, &fattr(e.ino, &e.attr), Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(ino.0) {
            Ok(a) => reply.attr(&self.ttl, &fattr(ino.0, &a)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: set_time(atime),
            mtime: set_time(mtime),
        };
        match self.fs.setattr(ino.0, set) {
            Ok(a) => reply.attr(&self.ttl, &fattr(ino.0, &a)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        match self.fs.mkdir(
            parent.0,
            name.as_bytes(),
            mode & !umask,
            req.uid(),
            req.gid(),
        ) {
            Ok(e) => reply.entry(&self.ttl, &fattr(e.ino, &e.attr), Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.fs.unlink(parent.0, name.as_bytes()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.fs.rmdir(parent.0, name.as_bytes()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        match self.fs.symlink(
            parent.0,
            link_name.as_bytes(),
            target.as_os_str().as_bytes(),
            req.uid(),
            req.gid(),
        ) {
            Ok(e) => reply.entry(&self.ttl, &fattr(e.ino, &e.attr), Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match self.fs.rename(
            parent.0,
            name.as_bytes(),
            newparent.0,
            newname.as_bytes(),
            flags.bits(),
        ) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        match self.fs.link(ino.0, newparent.0, newname.as_bytes()) {
            Ok(e) => reply.entry(&self.ttl, &fattr(e.ino, &e.attr), Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let o = match self.fs.open(ino.0, flags.0 as u32) {
            Ok(o) => o,
            Err(e) => return reply.error(errno(e)),
        };
        let Some(reply) = self.open_passthrough(ino.0, &o, reply) else {
            return;
        };
        let keep = self.count_cached(ino.0, o.fh);
        let f = if o.keep_cache && keep {
            FopenFlags::FOPEN_KEEP_CACHE
        } else {
            FopenFlags::empty()
        };
        reply.opened(FileHandle(o.fh), f)
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.fs.read(fh.0, offset, size) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.fs.write(fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Writes are on the server before they are acknowledged.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // Forgotten here first: a handle listed there is open in `fs`.
        lock(&self.io).released(fh.0);
        let _ = self.fs.release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.fs.fsync(fh.0, datasync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    /// Lists the directory: from the client's directory cache while its
    /// time-out runs, else from the server a batch at a time. The first
    /// batch comes before the reply; a thread reads the others while the
    /// kernel takes the first entries, so server and kernel work at once
    /// on a large directory. The kernel caches the entries it reads
    /// (FOPEN_CACHE_DIR), and keeps that cache across opens
    /// (FOPEN_KEEP_CACHE) while the listing is the one it last got, so
    /// listing an unchanged directory again does not reach the daemon.
    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // At most `max_open_dirs` open at once (checked again below).
        if self.dirs_full() {
            return reply.error(Errno::EMFILE);
        }
        let mut r = DirReader::new(ino.0);
        let first = match self.fs.read_dir_batch(&mut r) {
            Ok(b) => b.unwrap_or_default(),
            Err(e) => return reply.error(errno(e)),
        };
        let mut flags = FopenFlags::FOPEN_CACHE_DIR;
        let dir = if r.is_complete() {
            let digest = listing_digest(&first);
            if lock(&self.listed).insert(ino.0, digest) == Some(digest) {
                flags |= FopenFlags::FOPEN_KEEP_CACHE;
            }
            Arc::new(OpenDir::new(first, true))
        } else {
            // Recorded once the listing is complete.
            lock(&self.listed).remove(&ino.0);
            let dir = Arc::new(OpenDir::new(first, false));
            let (fs, listed, d) = (self.fs.clone(), self.listed.clone(), dir.clone());
            let rest = move || list_rest(&fs, &mut r, &d, &listed);
            if let Err(e) = std::thread::Builder::new()
                .name("gvfs-readdir".into())
                .spawn(rest)
            {
                debug!(error = %e, "no lister thread; listing in place");
                let all = match self.fs.readdir(ino.0) {
                    Ok(all) => all,
                    Err(e) => return reply.error(errno(e)),
                };
                lock(&self.listed).insert(ino.0, listing_digest(&all));
                Arc::new(OpenDir::new(all, true))
            } else {
                dir
            }
        };
        let mut dirs = lock(&self.dirs);
        if dirs.len() >= self.fs.options().max_open_dirs {
            return reply.error(Errno::EMFILE);
        }
        let fh = self.next_dir.fetch_add(1, Ordering::Relaxed);
        dirs.insert(fh, dir);
        drop(dirs);
        reply.opened(FileHandle(fh), flags);
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let dir = match self.open_dir(fh) {
            Ok(d) => d,
            Err(e) => return reply.error(e),
        };
        let listed = match dir.entries_from(offset as usize) {
            Ok(l) => l,
            Err(e) => return reply.error(e),
        };
        for (i, it) in listed.items.iter().enumerate().skip(offset as usize) {
            if reply.add(
                INodeNo(it.ino),
                i as u64 + 1,
                file_type(it.attr.kind),
                OsStr::from_bytes(&it.name),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        dir_ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let dir = match self.open_dir(fh) {
            Ok(d) => d,
            Err(e) => return reply.error(e),
        };
        let listed = match dir.entries_from(offset as usize) {
            Ok(l) => l,
            Err(e) => return reply.error(e),
        };
        for (i, it) in listed.items.iter().enumerate().skip(offset as usize) {
            // The kernel holds a reference to each entry it is given.
            let ino = self.fs.remember_entry(dir_ino.0, it);
            if reply.add(
                INodeNo(ino),
                i as u64 + 1,
                OsStr::from_bytes(&it.name),
                &self.ttl,
                &fattr(ino, &it.attr),
                Generation(0),
            ) {
                // No room left: not given after all.
                self.fs.forget(ino, 1);
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        lock(&self.dirs).remove(&fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.fs.statfs() {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        // No extended attributes: the kernel stops asking after this answer.
        reply.error(Errno::EOPNOTSUPP);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: fuser::ReplyXattr) {
        reply.error(Errno::EOPNOTSUPP);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // Permissions are checked by the kernel (default_permissions).
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self.fs.create(
            parent.0,
            name.as_bytes(),
            mode & !umask,
            flags as u32,
            req.uid(),
            req.gid(),
        ) {
            Ok((e, fh)) => {
                // A new file: nothing cached to keep or drop.
                let _ = self.count_cached(e.ino, fh);
                reply.created(
                    &self.ttl,
                    &fattr(e.ino, &e.attr),
                    Generation(0),
                    FileHandle(fh),
                    FopenFlags::empty(),
                )
            }
            Err(e) => reply.error(errno(e)),
        }
    }
}

/// Refills `file`, the backing file of `ino` (it held version `seen`),
/// with the version open file `fh` finds (see [`Fs::refill`]), at the
/// inode's `gate` and without the io lock. Nothing to do if the backing
/// file changed or took another version meanwhile.
fn refill(
    fs: &Fs,
    io: &Mutex<IoModes>,
    ino: u64,
    fh: u64,
    gate: &Mutex<()>,
    file: &Arc<File>,
    seen: Option<u64>,
) -> Result<(), ClientError> {
    let _gate = lock(gate);
    let current = |io: &mut IoModes| {
        io.inodes
            .get_mut(&ino)
            .and_then(|st| st.backing.as_mut())
            .filter(|b| Arc::ptr_eq(&b.file, file))
            .map(|b| b.version)
    };
    if current(&mut lock(io)) != seen {
        return Ok(());
    }
    match fs.refill(fh, file) {
        Ok(version) => {
            debug!(ino, "backing file refilled with a new version");
            let mut g = lock(io);
            if let Some(b) = g
                .inodes
                .get_mut(&ino)
                .and_then(|st| st.backing.as_mut())
                .filter(|b| Arc::ptr_eq(&b.file, file))
            {
                b.version = version;
            }
            g.refilled.insert(ino);
            Ok(())
        }
        Err(e) => {
            debug!(ino, error = %e, "refilling the backing file failed");
            Err(e)
        }
    }
}

/// Every `every`, asks for the attributes of each passed-through inode
/// and refills its backing file if the server has a new version: readers
/// holding it open see a change after the attribute timeout, as they
/// would through the page cache. Ends when `stop`'s sender goes.
fn watch(fs: &Fs, io: &Weak<Mutex<IoModes>>, stop: &mpsc::Receiver<()>, every: Duration) {
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(every) {
        let Some(io) = io.upgrade() else { return };
        let live: Vec<(u64, u64)> = lock(&io)
            .inodes
            .iter()
            .filter(|(_, st)| st.passthrough > 0)
            .filter_map(|(ino, st)| st.backing.as_ref().map(|b| (*ino, b.version)))
            .collect();
        for (ino, version) in live {
            match fs.getattr(ino) {
                Ok(a) if a.version() != version => {}
                _ => continue,
            }
            let found = {
                let g = lock(&io);
                let fh = g
                    .files
                    .iter()
                    .find(|(_, (i, m))| *i == ino && *m == Mode::Passthrough)
                    .map(|(fh, _)| *fh);
                let st = g.inodes.get(&ino);
                match (fh, st, st.and_then(|st| st.backing.as_ref())) {
                    (Some(fh), Some(st), Some(b)) => Some((fh, st.gate.clone(), b.file.clone())),
                    _ => None,
                }
            };
            if let Some((fh, gate, file)) = found {
                // An open closing meanwhile fails it: tried again next time.
                let _ = refill(fs, &io, ino, fh, &gate, &file, Some(version));
            }
        }
    }
}

/// The session [`mount`] returns.
pub use fuser::BackgroundSession;

/// Mounts `fs` at `mountpoint`, served by background threads. Dropping
/// the returned session (or [`fuser::BackgroundSession::umount_and_join`])
/// unmounts it.
pub fn mount(
    fs: Arc<Fs>,
    mountpoint: &Path,
    read_only: bool,
) -> io::Result<fuser::BackgroundSession> {
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        MountOption::FSName("gvfs".into()),
        MountOption::Subtype("gvfs".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
        if read_only {
            MountOption::RO
        } else {
            MountOption::RW
        },
    ];
    cfg.n_threads = Some(4);
    cfg.clone_fd = true;
    fuser::spawn_mount(FuseFs::new(fs, read_only), mountpoint, &cfg)
}

/// An open directory's entries, which a lister thread may still be
/// adding to while the kernel reads the first ones.
struct OpenDir {
    listed: Mutex<Listed>,
    grown: Condvar,
}

struct Listed {
    items: Vec<DirItem>,
    /// Set once the listing is complete (`Ok`) or has failed.
    end: Option<Result<(), Errno>>,
}

impl OpenDir {
    fn new(items: Vec<DirItem>, complete: bool) -> OpenDir {
        OpenDir {
            listed: Mutex::new(Listed {
                items,
                end: complete.then_some(Ok(())),
            }),
            grown: Condvar::new(),
        }
    }

    /// The listing once it holds entry `offset` or has ended; the
    /// listing's error if it failed before reaching `offset`.
    fn entries_from(&self, offset: usize) -> Result<MutexGuard<'_, Listed>, Errno> {
        let mut l = lock(&self.listed);
        while l.items.len() <= offset && l.end.is_none() {
            l = self.grown.wait(l).unwrap_or_else(|e| e.into_inner());
        }
        match l.end {
            Some(Err(e)) if offset >= l.items.len() => Err(e),
            _ => Ok(l),
        }
    }

    fn push(&self, batch: Vec<DirItem>) {
        lock(&self.listed).items.extend(batch);
        self.grown.notify_all();
    }

    fn end(&self, end: Result<(), Errno>) {
        lock(&self.listed).end = Some(end);
        self.grown.notify_all();
    }
}

/// The lister thread: reads the rest of the listing `r` into `dir`, and
/// once it is complete records its digest for the next open.
fn list_rest(fs: &Fs, r: &mut DirReader, dir: &OpenDir, listed: &Mutex<HashMap<u64, u64>>) {
    loop {
        match fs.read_dir_batch(r) {
            Ok(Some(batch)) => dir.push(batch),
            Ok(None) => {
                let digest = listing_digest(&lock(&dir.listed).items);
                lock(listed).insert(r.ino(), digest);
                return dir.end(Ok(()));
            }
            Err(e) => return dir.end(Err(errno(e))),
        }
    }
}

/// What the kernel's readdir cache holds of a listing: names, inode
/// numbers and types, in order.
fn listing_digest(items: &[DirItem]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for it in items {
        it.name.hash(&mut h);
        it.ino.hash(&mut h);
        (file_type(it.attr.kind) as u8).hash(&mut h);
    }
    items.len().hash(&mut h);
    h.finish()
}
