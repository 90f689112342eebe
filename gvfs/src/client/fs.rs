//! The client's file-system core: FUSE-like operations by inode number,
//! served from caches where they are fresh and from the server otherwise.
//! Both the host FUSE mount and the virtio-fs device sit on top of it.
//!
//! Consistency is NFS-like: attributes and directory listings are cached
//! for `attr_timeout`; `open` always asks the server (close-to-open), and a
//! file whose version (size, mtime, ctime) changed loses its cached blocks;
//! writes reach the server before they are acknowledged. A file read in
//! full can also be kept as a whole local copy (`whole_copy_bytes`), which
//! `open` hands out for the same version (the FUSE mount's passthrough).
//!
//! Inode numbers are the client's own and stay valid across reconnects:
//! each inode remembers its parent and name, and its server node id is
//! looked up again when the connection epoch changes (a restarted server
//! hands out new node ids). Open files are reopened the same way.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tracing::debug;

use super::cache::{BLOCK_SIZE, BlockCache, BlockKey, CacheError, CacheStats};
use super::conn::{ClientError, ConnectConfig, Remote, Session, check};
use super::copies::Copies;
use crate::proto::{self, Attr, Kind, Request, Response, SetAttr, StatFs};

/// The root directory's inode number.
pub const ROOT_INO: u64 = 1;

/// What to do when the server cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDisconnect {
    /// Fail the call with EIO (the next call tries to reconnect).
    Eio,
    /// Retry until the server is back.
    Wait,
}

/// Whole-file copy space the benchmark gives its mount with copies.
pub const BENCH_WHOLE_COPY_BYTES: u64 = 4 << 30;

/// Client options.
#[derive(Debug, Clone)]
pub struct FsOptions {
    pub attr_timeout: Duration,
    pub on_disconnect: OnDisconnect,
    pub cache_dir: Option<PathBuf>,
    pub mem_cache_bytes: u64,
    pub disk_cache_bytes: u64,
    /// Blocks fetched ahead of a sequential reader.
    pub readahead_blocks: u64,
    /// Bytes of whole-file local copies (unnamed files in `cache_dir`,
    /// or the temporary directory without one): a file read in full is
    /// kept whole, and `open` of that version hands the copy out
    /// ([`Opened::backing`]) for the FUSE mount to pass reads through
    /// to. 0: no copies.
    pub whole_copy_bytes: u64,
}

impl Default for FsOptions {
    fn default() -> Self {
        FsOptions {
            attr_timeout: Duration::from_secs(1),
            on_disconnect: OnDisconnect::Eio,
            cache_dir: None,
            mem_cache_bytes: 256 << 20,
            disk_cache_bytes: 4 << 30,
            readahead_blocks: 16,
            whole_copy_bytes: 0,
        }
    }
}

/// An inode and its attributes (the attributes' `node` is the server's id
/// and means nothing to callers).
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub ino: u64,
    pub attr: Attr,
}

/// One directory entry with its attributes.
#[derive(Debug, Clone)]
pub struct DirItem {
    pub name: Vec<u8>,
    pub ino: u64,
    pub attr: Attr,
}

/// Where a listing read a batch at a time stands (see
/// [`Fs::read_dir_batch`]).
#[derive(Debug)]
pub struct DirReader {
    ino: u64,
    /// The server's cookie for the next batch; `None` once complete.
    next: Option<u64>,
    /// Names and inodes so far, for the directory cache.
    names: Vec<(Vec<u8>, u64)>,
}

impl DirReader {
    pub fn new(ino: u64) -> DirReader {
        DirReader {
            ino,
            next: Some(0),
            names: Vec::new(),
        }
    }

    /// The directory listed.
    pub fn ino(&self) -> u64 {
        self.ino
    }

    /// Every entry has been read.
    pub fn is_complete(&self) -> bool {
        self.next.is_none()
    }
}

/// A directory's entries: names and inode numbers.
type Listing = Arc<Vec<(Vec<u8>, u64)>>;

struct Inode {
    parent: u64,
    name: Vec<u8>,
    /// (epoch, server node id).
    node: Option<(u64, u64)>,
    attr: Option<(Attr, Instant)>,
    /// A directory's listing: names and inodes, and when it was fetched.
    listing: Option<(Listing, Instant)>,
    /// Entries handed out and not yet forgotten (FUSE lookup count).
    lookups: u64,
}

struct Inodes {
    map: HashMap<u64, Inode>,
    names: HashMap<(u64, Vec<u8>), u64>,
    next: u64,
}

struct OpenFile {
    ino: u64,
    flags: u32,
    /// (epoch, server handle).
    remote: Mutex<Option<(u64, u64)>>,
    /// Where the last read ended (sequential detection).
    last_end: AtomicU64,
}

/// The caching file-system client.
pub struct Fs {
    remote: Remote,
    opts: FsOptions,
    inodes: Mutex<Inodes>,
    files: Mutex<HashMap<u64, Arc<OpenFile>>>,
    next_fh: AtomicU64,
    cache: BlockCache,
    /// Bumped when the server reports a stale node id.
    stale_gen: AtomicU64,
    /// Blocks being fetched right now, and who to wait on for them.
    inflight: Mutex<HashMap<BlockKey, Arc<Flight>>>,
    /// Whole-file copies, if enabled.
    copies: Option<Copies>,
    /// Whether copies are made and handed out (the mount's choice).
    copies_on: AtomicBool,
}

/// One batch of blocks being fetched; readers wanting one of them wait.
#[derive(Default)]
struct Flight {
    done: Mutex<bool>,
    cv: Condvar,
}

impl Flight {
    fn wait(&self) {
        let mut done = lock(&self.done);
        while !*done {
            // Bounded so that a lost wake-up cannot hang a reader.
            done = self
                .cv
                .wait_timeout(done, Duration::from_secs(1))
                .map(|r| r.0)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }
    fn finish(&self) {
        *lock(&self.done) = true;
        self.cv.notify_all();
    }
}

/// What [`Fs::new`] can fail with.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("block cache")]
    Cache(#[from] CacheError),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn attr_of(resp: Response) -> Result<Attr, ClientError> {
    match check(resp)? {
        Response::Attr(a) => Ok(a),
        _ => Err(ClientError::Unexpected),
    }
}

fn ok_of(resp: Response) -> Result<(), ClientError> {
    match check(resp)? {
        Response::Ok => Ok(()),
        _ => Err(ClientError::Unexpected),
    }
}

/// Result of [`Fs::open`].
#[derive(Debug, Clone)]
pub struct Opened {
    pub fh: u64,
    /// The file did not change since its blocks were cached: the caller
    /// may keep its own page cache (FUSE `FOPEN_KEEP_CACHE`).
    pub keep_cache: bool,
    pub attr: Attr,
    /// A read-only open of a file this client holds a complete local copy
    /// of, for exactly the version the server reported at this open: the
    /// copy, whose reads are the file's reads (FUSE passthrough). Holding
    /// it keeps it readable even after the client drops it.
    pub backing: Option<Arc<File>>,
}

impl Fs {
    /// A client of the server `cfg` points to. Nothing is sent until the
    /// first call.
    pub fn new(cfg: ConnectConfig, opts: FsOptions) -> Result<Fs, FsError> {
        let cache = BlockCache::new(
            opts.mem_cache_bytes,
            opts.cache_dir.as_deref(),
            opts.disk_cache_bytes,
        )?;
        let mut map = HashMap::new();
        map.insert(
            ROOT_INO,
            Inode {
                parent: ROOT_INO,
                name: Vec::new(),
                node: None,
                attr: None,
                listing: None,
                lookups: 1,
            },
        );
        Ok(Fs {
            remote: Remote::new(cfg),
            inodes: Mutex::new(Inodes {
                map,
                names: HashMap::new(),
                next: ROOT_INO + 1,
            }),
            files: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            cache,
            inflight: Mutex::new(HashMap::new()),
            stale_gen: AtomicU64::new(0),
            copies_on: AtomicBool::new(opts.whole_copy_bytes > 0),
            copies: (opts.whole_copy_bytes > 0).then(|| {
                let dir = opts.cache_dir.clone().unwrap_or_else(std::env::temp_dir);
                Copies::new(dir, opts.whole_copy_bytes)
            }),
            opts,
        })
    }

    pub fn options(&self) -> &FsOptions {
        &self.opts
    }

    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// Bytes held by whole-file copies.
    pub fn whole_copy_bytes(&self) -> u64 {
        self.copies.as_ref().map_or(0, |c| c.used())
    }

    /// Waits until the whole-file copies hold every block read so far
    /// (they are written by a thread of their own).
    pub fn flush_whole_copies(&self) {
        if let Some(c) = &self.copies {
            c.flush();
        }
    }

    /// Turns whole-file copies off (or on again, if `whole_copy_bytes`
    /// allows them): a mount that cannot use them saves their writes.
    pub fn set_whole_copies(&self, on: bool) {
        self.copies_on
            .store(on && self.copies.is_some(), Ordering::Relaxed);
    }

    fn copies(&self) -> Option<&Copies> {
        self.copies
            .as_ref()
            .filter(|_| self.copies_on.load(Ordering::Relaxed))
    }

    /// The file changed through this client: its copy is no longer right.
    fn drop_copy(&self, attr: &Attr) {
        if let Some(c) = &self.copies {
            c.invalidate(attr.dev, attr.ino);
        }
    }

    /// Connects now (to fail early on a bad address or token).
    pub fn connect(&self) -> Result<(), ClientError> {
        self.remote.session().map(drop)
    }

    /// Whether the export is read-only.
    pub fn read_only(&self) -> Result<bool, ClientError> {
        self.remote.read_only()
    }

    /// Node ids are valid within one connection epoch and one "stale
    /// generation" (bumped when the server says a node id is stale).
    fn node_gen(&self, s: &Session) -> u64 {
        (s.epoch << 32) | (self.stale_gen.load(Ordering::SeqCst) & 0xffff_ffff)
    }

    /// Runs `f` against a live session; disconnects are retried after a
    /// reconnect when `on_disconnect` is `Wait`, and fail with EIO otherwise.
    /// A stale node id (the server forgot it) is looked up again by path
    /// and the call retried once.
    fn run<T>(
        &self,
        mut f: impl FnMut(&Session) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        let mut backoff = Duration::from_millis(50);
        let mut stale_retry = true;
        loop {
            let res = self.remote.session().and_then(|s| {
                let r = f(&s);
                if matches!(&r, Err(e) if e.is_disconnect()) {
                    self.remote.drop_session(&s);
                }
                r
            });
            match res {
                Err(e) if e.is_disconnect() && self.opts.on_disconnect == OnDisconnect::Wait => {
                    debug!(error = %e, "server unreachable; waiting");
                    thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err(e) if e.is_disconnect() => return Err(ClientError::Disconnected),
                Err(ClientError::Remote(libc::ESTALE)) if stale_retry => {
                    stale_retry = false;
                    self.stale_gen.fetch_add(1, Ordering::SeqCst);
                }
                r => return r,
            }
        }
    }

    // ------------------------------------------------------------ inodes

    fn intern(&self, parent: u64, name: &[u8], attr: Attr, epoch: u64) -> u64 {
        let mut t = lock(&self.inodes);
        let key = (parent, name.to_vec());
        let now = Instant::now();
        if let Some(&ino) = t.names.get(&key)
            && let Some(i) = t.map.get_mut(&ino)
        {
            i.node = Some((epoch, attr.node));
            i.attr = Some((attr, now));
            return ino;
        }
        let ino = t.next;
        t.next += 1;
        t.map.insert(
            ino,
            Inode {
                parent,
                name: name.to_vec(),
                node: Some((epoch, attr.node)),
                attr: Some((attr, now)),
                listing: None,
                lookups: 0,
            },
        );
        t.names.insert(key, ino);
        ino
    }

    /// Counts one more reference held by the caller (the kernel) to `ino`;
    /// every call that returns an [`Entry`] counts one itself. Call it for
    /// each entry given out by a READDIRPLUS answer.
    pub fn remember(&self, ino: u64) {
        if let Some(i) = lock(&self.inodes).map.get_mut(&ino) {
            i.lookups += 1;
        }
    }

    fn counted(&self, e: Result<Entry, ClientError>) -> Result<Entry, ClientError> {
        if let Ok(e) = &e {
            self.remember(e.ino);
        }
        e
    }

    /// The caller dropped `n` references to `ino` (FUSE FORGET); an inode
    /// with none left is removed. The root is never removed.
    pub fn forget(&self, ino: u64, n: u64) {
        let mut t = lock(&self.inodes);
        let Some(i) = t.map.get_mut(&ino) else { return };
        i.lookups = i.lookups.saturating_sub(n);
        if i.lookups > 0 || ino == ROOT_INO {
            return;
        }
        if let Some(i) = t.map.remove(&ino) {
            let key = (i.parent, i.name);
            if t.names.get(&key) == Some(&ino) {
                t.names.remove(&key);
            }
        }
    }

    /// How many inodes the client holds (for tests and monitoring).
    pub fn inode_count(&self) -> usize {
        lock(&self.inodes).map.len()
    }

    fn set_attr(&self, ino: u64, mut attr: Attr) {
        let mut t = lock(&self.inodes);
        if let Some(i) = t.map.get_mut(&ino) {
            if attr.node == 0 {
                // Write answers carry no node id: keep the one we have.
                attr.node = i.attr.map_or(0, |a| a.0.node);
            }
            i.attr = Some((attr, Instant::now()));
        }
    }

    fn drop_listing(&self, ino: u64) {
        if let Some(i) = lock(&self.inodes).map.get_mut(&ino) {
            i.listing = None;
        }
    }

    fn forget_name(&self, parent: u64, name: &[u8]) {
        let mut t = lock(&self.inodes);
        if let Some(ino) = t.names.remove(&(parent, name.to_vec()))
            && let Some(i) = t.map.get_mut(&ino)
        {
            i.node = None;
            i.attr = None;
        }
        if let Some(p) = t.map.get_mut(&parent) {
            p.listing = None;
        }
    }

    /// The server node id of `ino` in session `s`, looked up again along
    /// the path from the root if the epoch changed.
    fn node(&self, s: &Session, ino: u64) -> Result<u64, ClientError> {
        let (parent, name) = {
            let t = lock(&self.inodes);
            let i = t.map.get(&ino).ok_or(ClientError::Remote(libc::ESTALE))?;
            if let Some((epoch, node)) = i.node
                && epoch == self.node_gen(s)
            {
                return Ok(node);
            }
            (i.parent, i.name.clone())
        };
        if ino == ROOT_INO {
            return Ok(proto::ROOT_NODE);
        }
        if name.is_empty() {
            return Err(ClientError::Remote(libc::ESTALE));
        }
        let pnode = self.node(s, parent)?;
        let attr = attr_of(s.conn.call(&Request::Lookup {
            parent: pnode,
            name: name.clone(),
        })?)?;
        let mut t = lock(&self.inodes);
        if let Some(i) = t.map.get_mut(&ino) {
            i.node = Some((self.node_gen(s), attr.node));
            i.attr = Some((attr, Instant::now()));
        }
        Ok(attr.node)
    }

    fn fresh_attr(&self, ino: u64) -> Option<Attr> {
        let t = lock(&self.inodes);
        let (a, at) = t.map.get(&ino)?.attr?;
        (at.elapsed() < self.opts.attr_timeout).then_some(a)
    }

    fn cached_attr(&self, ino: u64) -> Option<Attr> {
        lock(&self.inodes).map.get(&ino)?.attr.map(|a| a.0)
    }

    // ------------------------------------------------------------ metadata

    /// Looks up `name` in directory `parent`.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Entry, ClientError> {
        self.counted(self.lookup_uncounted(parent, name))
    }

    fn lookup_uncounted(&self, parent: u64, name: &[u8]) -> Result<Entry, ClientError> {
        if name == b"." {
            return Ok(Entry {
                ino: parent,
                attr: self.getattr(parent)?,
            });
        }
        // A fresh listing answers both hits and misses.
        {
            let t = lock(&self.inodes);
            if let Some((list, at)) = t.map.get(&parent).and_then(|p| p.listing.clone())
                && at.elapsed() < self.opts.attr_timeout
            {
                match list.iter().find(|(n, _)| n == name) {
                    None => return Err(ClientError::Remote(libc::ENOENT)),
                    Some((_, ino)) => {
                        if let Some((a, at)) = t.map.get(ino).and_then(|i| i.attr)
                            && at.elapsed() < self.opts.attr_timeout
                        {
                            return Ok(Entry { ino: *ino, attr: a });
                        }
                    }
                }
            }
        }
        self.run(|s| {
            let pnode = self.node(s, parent)?;
            let attr = attr_of(s.conn.call(&Request::Lookup {
                parent: pnode,
                name: name.to_vec(),
            })?)?;
            Ok(Entry {
                ino: self.intern(parent, name, attr, self.node_gen(s)),
                attr,
            })
        })
    }

    /// Attributes of an inode, from the cache while fresh.
    pub fn getattr(&self, ino: u64) -> Result<Attr, ClientError> {
        if let Some(a) = self.fresh_attr(ino) {
            return Ok(a);
        }
        self.refresh_attr(ino)
    }

    fn refresh_attr(&self, ino: u64) -> Result<Attr, ClientError> {
        self.run(|s| {
            let node = self.node(s, ino)?;
            let attr = attr_of(s.conn.call(&Request::Getattr { node })?)?;
            self.set_attr(ino, attr);
            Ok(attr)
        })
    }

    pub fn setattr(&self, ino: u64, set: SetAttr) -> Result<Attr, ClientError> {
        let old = self.cached_attr(ino);
        let attr = self.run(|s| {
            let node = self.node(s, ino)?;
            attr_of(s.conn.call(&Request::Setattr { node, set })?)
        })?;
        self.drop_copy(&attr);
        if let (Some(size), Some(old)) = (set.size, old) {
            // Blocks past the new end (and the one it cuts) are no longer right.
            let first = size / BLOCK_SIZE;
            let last = old.size.max(size) / BLOCK_SIZE;
            self.cache.invalidate(attr.dev, attr.ino, first, last);
        }
        self.set_attr(ino, attr);
        Ok(attr)
    }

    /// Every entry of a directory with attributes (no `.` and `..`), from
    /// the cache while fresh: one round trip per directory, not per file.
    /// The whole listing of directory `ino` (see [`Fs::read_dir_batch`]).
    pub fn readdir(&self, ino: u64) -> Result<Vec<DirItem>, ClientError> {
        let mut r = DirReader::new(ino);
        let mut all = Vec::new();
        while let Some(batch) = self.read_dir_batch(&mut r)? {
            all.extend(batch);
        }
        Ok(all)
    }

    /// The listing of `ino` while the directory cache holds it (within the
    /// attribute time-out), without asking the server.
    pub fn cached_readdir(&self, ino: u64) -> Option<Vec<DirItem>> {
        let t = lock(&self.inodes);
        let (list, at) = t.map.get(&ino)?.listing.clone()?;
        if at.elapsed() >= self.opts.attr_timeout {
            return None;
        }
        list.iter()
            .map(|(name, child)| {
                let a = t.map.get(child)?.attr?.0;
                Some(DirItem {
                    name: name.clone(),
                    ino: *child,
                    attr: a,
                })
            })
            .collect()
    }

    /// The next entries of the listing `r` reads: all of them at once
    /// from the directory cache, else a batch at a time from the server
    /// (one round trip each, attributes included), so that a caller can
    /// hand out the first entries of a large directory while the server
    /// still reads the rest. `None` once the listing is complete; it is
    /// then in the directory cache.
    pub fn read_dir_batch(&self, r: &mut DirReader) -> Result<Option<Vec<DirItem>>, ClientError> {
        let Some(cookie) = r.next else {
            return Ok(None);
        };
        if cookie == 0
            && r.names.is_empty()
            && let Some(items) = self.cached_readdir(r.ino)
        {
            r.next = None;
            return Ok(Some(items));
        }
        let ino = r.ino;
        let (entries, next, epoch) = self.run(|s| {
            let node = self.node(s, ino)?;
            match check(s.conn.call(&Request::Readdir { node, cookie })?)? {
                Response::Dir { entries, next } => Ok((entries, next, self.node_gen(s))),
                _ => Err(ClientError::Unexpected),
            }
        })?;
        let mut items = Vec::with_capacity(entries.len());
        for e in entries {
            let child = self.intern(ino, &e.name, e.attr, epoch);
            r.names.push((e.name.clone(), child));
            items.push(DirItem {
                name: e.name,
                ino: child,
                attr: e.attr,
            });
        }
        r.next = next;
        if next.is_none() {
            let list = Arc::new(std::mem::take(&mut r.names));
            if let Some(i) = lock(&self.inodes).map.get_mut(&ino) {
                i.listing = Some((list, Instant::now()));
            }
        }
        Ok(Some(items))
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>, ClientError> {
        self.run(|s| {
            let node = self.node(s, ino)?;
            match check(s.conn.call(&Request::Readlink { node })?)? {
                Response::Target(t) => Ok(t),
                _ => Err(ClientError::Unexpected),
            }
        })
    }

    pub fn statfs(&self) -> Result<StatFs, ClientError> {
        self.run(|s| match check(s.conn.call(&Request::Statfs)?)? {
            Response::StatFs(st) => Ok(st),
            _ => Err(ClientError::Unexpected),
        })
    }

    /// The server's counters (ops and bytes it sent).
    pub fn server_stats(&self) -> Result<Vec<proto::OpCount>, ClientError> {
        self.run(|s| match check(s.conn.call(&Request::Stats)?)? {
            Response::Stats(v) => Ok(v),
            _ => Err(ClientError::Unexpected),
        })
    }

    // ------------------------------------------------------------ namespace

    fn make(
        &self,
        parent: u64,
        name: &[u8],
        req: impl Fn(u64) -> Request,
    ) -> Result<Entry, ClientError> {
        let r = self.run(|s| {
            let pnode = self.node(s, parent)?;
            let attr = attr_of(s.conn.call(&req(pnode))?)?;
            Ok(Entry {
                ino: self.intern(parent, name, attr, self.node_gen(s)),
                attr,
            })
        });
        self.drop_listing(parent);
        self.counted(r)
    }

    pub fn mkdir(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<Entry, ClientError> {
        self.make(parent, name, |p| Request::Mkdir {
            parent: p,
            name: name.to_vec(),
            mode,
            uid,
            gid,
        })
    }

    pub fn symlink(
        &self,
        parent: u64,
        name: &[u8],
        target: &[u8],
        uid: u32,
        gid: u32,
    ) -> Result<Entry, ClientError> {
        self.make(parent, name, |p| Request::Symlink {
            parent: p,
            name: name.to_vec(),
            target: target.to_vec(),
            uid,
            gid,
        })
    }

    pub fn link(&self, ino: u64, new_parent: u64, new_name: &[u8]) -> Result<Entry, ClientError> {
        let r = self.run(|s| {
            let node = self.node(s, ino)?;
            let pnode = self.node(s, new_parent)?;
            let attr = attr_of(s.conn.call(&Request::Link {
                node,
                new_parent: pnode,
                new_name: new_name.to_vec(),
            })?)?;
            Ok(Entry {
                ino: self.intern(new_parent, new_name, attr, self.node_gen(s)),
                attr,
            })
        });
        self.drop_listing(new_parent);
        // The link count of the source changed.
        if let Some(i) = lock(&self.inodes).map.get_mut(&ino) {
            i.attr = None;
        }
        self.counted(r)
    }

    pub fn unlink(&self, parent: u64, name: &[u8]) -> Result<(), ClientError> {
        let r = self.run(|s| {
            let pnode = self.node(s, parent)?;
            ok_of(s.conn.call(&Request::Unlink {
                parent: pnode,
                name: name.to_vec(),
            })?)
        });
        self.forget_name(parent, name);
        r
    }

    pub fn rmdir(&self, parent: u64, name: &[u8]) -> Result<(), ClientError> {
        let r = self.run(|s| {
            let pnode = self.node(s, parent)?;
            ok_of(s.conn.call(&Request::Rmdir {
                parent: pnode,
                name: name.to_vec(),
            })?)
        });
        self.forget_name(parent, name);
        r
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        flags: u32,
    ) -> Result<(), ClientError> {
        let r = self.run(|s| {
            let pnode = self.node(s, parent)?;
            let npnode = self.node(s, new_parent)?;
            ok_of(s.conn.call(&Request::Rename {
                parent: pnode,
                name: name.to_vec(),
                new_parent: npnode,
                new_name: new_name.to_vec(),
                flags,
            })?)
        });
        let mut t = lock(&self.inodes);
        if r.is_ok() {
            // The target name now means the moved inode.
            if let Some(old) = t.names.remove(&(new_parent, new_name.to_vec()))
                && let Some(i) = t.map.get_mut(&old)
            {
                i.node = None;
                i.attr = None;
            }
            if let Some(ino) = t.names.remove(&(parent, name.to_vec())) {
                t.names.insert((new_parent, new_name.to_vec()), ino);
                if let Some(i) = t.map.get_mut(&ino) {
                    i.parent = new_parent;
                    i.name = new_name.to_vec();
                    i.attr = None; // ctime changed
                }
            }
        }
        for p in [parent, new_parent] {
            if let Some(i) = t.map.get_mut(&p) {
                i.listing = None;
            }
        }
        r
    }

    // ------------------------------------------------------------ files

    fn new_fh(&self, ino: u64, flags: u32, epoch: u64, handle: u64) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.files).insert(
            fh,
            Arc::new(OpenFile {
                ino,
                flags,
                remote: Mutex::new(Some((epoch, handle))),
                last_end: AtomicU64::new(u64::MAX),
            }),
        );
        fh
    }

    fn file(&self, fh: u64) -> Result<Arc<OpenFile>, ClientError> {
        lock(&self.files)
            .get(&fh)
            .cloned()
            .ok_or(ClientError::Remote(libc::EBADF))
    }

    /// The server handle of an open file in session `s`, reopened after a
    /// reconnect.
    fn handle(&self, s: &Session, f: &OpenFile) -> Result<u64, ClientError> {
        if let Some((epoch, h)) = *lock(&f.remote)
            && epoch == s.epoch
        {
            return Ok(h);
        }
        let node = self.node(s, f.ino)?;
        let flags = f.flags & !((libc::O_TRUNC | libc::O_CREAT | libc::O_EXCL) as u32);
        match check(s.conn.call(&Request::Open { node, flags })?)? {
            Response::Opened { handle, .. } => {
                *lock(&f.remote) = Some((s.epoch, handle));
                Ok(handle)
            }
            _ => Err(ClientError::Unexpected),
        }
    }

    /// Opens a file: always asks the server (close-to-open consistency).
    pub fn open(&self, ino: u64, flags: u32) -> Result<Opened, ClientError> {
        let before = self.cached_attr(ino);
        let (attr, handle, epoch) = self.run(|s| {
            let node = self.node(s, ino)?;
            match check(s.conn.call(&Request::Open { node, flags })?)? {
                Response::Opened { handle, attr } => Ok((attr, handle, s.epoch)),
                _ => Err(ClientError::Unexpected),
            }
        })?;
        self.set_attr(ino, attr);
        let fh = self.new_fh(ino, flags, epoch, handle);
        let keep_cache = before.is_some_and(|b| b.version() == attr.version());
        let read_only = flags & libc::O_ACCMODE as u32 == libc::O_RDONLY as u32
            && flags & libc::O_TRUNC as u32 == 0;
        let backing = match self.copies() {
            Some(c) if read_only && attr.kind == Kind::File => {
                c.complete(attr.dev, attr.ino, attr.version())
            }
            _ => None,
        };
        Ok(Opened {
            fh,
            keep_cache,
            attr,
            backing,
        })
    }

    /// Creates and opens a file.
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        flags: u32,
        uid: u32,
        gid: u32,
    ) -> Result<(Entry, u64), ClientError> {
        let r = self.run(|s| {
            let pnode = self.node(s, parent)?;
            match check(s.conn.call(&Request::Create {
                parent: pnode,
                name: name.to_vec(),
                mode,
                flags,
                uid,
                gid,
            })?)? {
                Response::Opened { handle, attr } => {
                    let ino = self.intern(parent, name, attr, self.node_gen(s));
                    Ok((
                        Entry { ino, attr },
                        self.new_fh(ino, flags, s.epoch, handle),
                    ))
                }
                _ => Err(ClientError::Unexpected),
            }
        });
        self.drop_listing(parent);
        if let Ok((e, _)) = &r {
            self.remember(e.ino);
        }
        r
    }

    /// Reads from an open file through the block cache, with read-ahead
    /// for sequential readers.
    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, ClientError> {
        let f = self.file(fh)?;
        let attr = match self.cached_attr(f.ino) {
            Some(a) => a,
            None => self.refresh_attr(f.ino)?,
        };
        if offset >= attr.size || size == 0 {
            return Ok(Vec::new());
        }
        let end = (offset + size as u64).min(attr.size);
        let first = offset / BLOCK_SIZE;
        let last = (end - 1) / BLOCK_SIZE;
        let nblocks = attr.size.div_ceil(BLOCK_SIZE);
        // Sequential: near where the last read ended (the kernel sends
        // read-ahead requests in parallel, so not always exactly there).
        let prev = f.last_end.swap(end, Ordering::Relaxed);
        let sequential = offset == 0 || offset.abs_diff(prev) <= 2 * BLOCK_SIZE * 8;
        let version = attr.version();
        let key = |block| BlockKey {
            dev: attr.dev,
            ino: attr.ino,
            block,
        };
        // A small random read that no cached block covers: fetch just the
        // bytes asked for instead of whole blocks (the caller's page cache
        // keeps them), which saves moving 128 KiB per 4 KiB read.
        if !sequential
            && end - offset < BLOCK_SIZE / 2
            && (first..=last).all(|b| !self.cache.contains(&key(b), version))
        {
            return self.read_range(&f, offset, end);
        }
        let mut blocks: Vec<Arc<Vec<u8>>> = Vec::new();
        let mut fetched: HashMap<u64, Arc<Vec<u8>>> = HashMap::new();
        'blocks: for b in first..=last {
            if let Some(data) = fetched.remove(&b) {
                blocks.push(data);
                continue;
            }
            // A miss: fetch it together with the other missing blocks of
            // the request and, for a sequential reader, the blocks after
            // it, all pipelined on the one connection. A block another
            // reader is already fetching is waited for, not fetched twice.
            let (want, flight) = loop {
                if let Some(data) = self.cache.get(&key(b), version) {
                    blocks.push(data);
                    continue 'blocks;
                }
                let mut inflight = lock(&self.inflight);
                if let Some(other) = inflight.get(&key(b)).cloned() {
                    drop(inflight);
                    other.wait();
                    continue;
                }
                // Checked again under the lock: a fetch that finished since
                // the first check has put its blocks before leaving.
                if self.cache.contains(&key(b), version) {
                    continue;
                }
                let upto = if sequential {
                    (b + self.opts.readahead_blocks.max(1))
                        .max(last + 1)
                        .min(nblocks)
                } else {
                    last + 1
                };
                let want: Vec<u64> = std::iter::once(b)
                    .chain((b + 1..upto).filter(|nb| {
                        !inflight.contains_key(&key(*nb))
                            && !self.cache.contains(&key(*nb), version)
                    }))
                    .collect();
                let flight = Arc::new(Flight::default());
                for nb in &want {
                    inflight.insert(key(*nb), flight.clone());
                }
                break (want, flight);
            };
            let res = self.fetch(&f, &want).map(|datas| {
                for (nb, data) in want.iter().zip(datas) {
                    let data = Arc::new(data);
                    if *nb > last {
                        // Read ahead: the loop below sees the others.
                        self.copy_block(&attr, version, *nb, &data);
                    }
                    self.cache.put(key(*nb), version, data.clone());
                    if *nb <= last {
                        fetched.insert(*nb, data);
                    }
                }
            });
            {
                let mut inflight = lock(&self.inflight);
                for nb in &want {
                    inflight.remove(&key(*nb));
                }
            }
            flight.finish();
            res?;
            blocks.push(fetched.remove(&b).ok_or(ClientError::Unexpected)?);
        }
        let mut out = Vec::with_capacity((end - offset) as usize);
        for (i, data) in blocks.iter().enumerate() {
            self.copy_block(&attr, version, first + i as u64, data);
            let bstart = (first + i as u64) * BLOCK_SIZE;
            let from = offset.saturating_sub(bstart) as usize;
            let to = ((end - bstart) as usize).min(data.len());
            if from < to {
                out.extend_from_slice(&data[from..to]);
            }
        }
        Ok(out)
    }

    fn copy_block(&self, attr: &Attr, version: u64, block: u64, data: &Arc<Vec<u8>>) {
        if let Some(c) = self.copies() {
            c.record(attr.dev, attr.ino, version, attr.size, block, data);
        }
    }

    /// Overwrites `into` with the whole content of open file `fh` (the
    /// version its open found, read through the block cache), which then
    /// is that version's complete copy; returns the version. For a file
    /// whose earlier copy is still in use (a passthrough backing file): its
    /// users see the new version, as they would see a page cache dropped
    /// for a new version.
    pub fn refill(&self, fh: u64, into: &Arc<File>) -> Result<u64, ClientError> {
        let f = self.file(fh)?;
        let attr = match self.cached_attr(f.ino) {
            Some(a) => a,
            None => self.refresh_attr(f.ino)?,
        };
        let mut off = 0;
        while off < attr.size {
            let data = self.read(fh, off, proto::MAX_IO)?;
            if data.is_empty() {
                break;
            }
            into.write_all_at(&data, off).map_err(ClientError::Local)?;
            off += data.len() as u64;
        }
        if off != attr.size {
            // Shorter than its attributes say: changing right now.
            return Err(ClientError::Remote(libc::EIO));
        }
        into.set_len(attr.size).map_err(ClientError::Local)?;
        if let Some(c) = self.copies() {
            c.adopt(attr.dev, attr.ino, attr.version(), attr.size, into.clone());
        }
        Ok(attr.version())
    }

    fn read_range(&self, f: &OpenFile, offset: u64, end: u64) -> Result<Vec<u8>, ClientError> {
        self.run(|s| {
            let handle = self.handle(s, f)?;
            match check(s.conn.call(&Request::Read {
                handle,
                offset,
                len: (end - offset) as u32,
            })?)? {
                Response::Data(d) => Ok(d),
                _ => Err(ClientError::Unexpected),
            }
        })
    }

    fn fetch(&self, f: &OpenFile, blocks: &[u64]) -> Result<Vec<Vec<u8>>, ClientError> {
        self.run(|s| {
            let handle = self.handle(s, f)?;
            let mut pending = Vec::with_capacity(blocks.len());
            for b in blocks {
                pending.push(s.conn.send(&Request::Read {
                    handle,
                    offset: b * BLOCK_SIZE,
                    len: BLOCK_SIZE as u32,
                })?);
            }
            let mut out = Vec::with_capacity(blocks.len());
            for p in pending {
                match check(p.wait()?)? {
                    Response::Data(d) => out.push(d),
                    _ => return Err(ClientError::Unexpected),
                }
            }
            Ok(out)
        })
    }

    /// Writes to an open file; returns once the server has the data.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32, ClientError> {
        let f = self.file(fh)?;
        let mut done = 0usize;
        let mut attr = None;
        while done < data.len() {
            let chunk = &data[done..(done + proto::MAX_IO as usize).min(data.len())];
            let off = offset + done as u64;
            let (len, a) = self.run(|s| {
                let handle = self.handle(s, &f)?;
                match check(s.conn.call(&Request::Write {
                    handle,
                    offset: off,
                    data: chunk.to_vec(),
                })?)? {
                    Response::Written { len, attr } => Ok((len, attr)),
                    _ => Err(ClientError::Unexpected),
                }
            })?;
            done += len as usize;
            attr = Some(a);
            if len == 0 {
                break;
            }
        }
        if let Some(a) = attr {
            if !data.is_empty() {
                let first = offset / BLOCK_SIZE;
                let last = (offset + data.len() as u64 - 1) / BLOCK_SIZE;
                self.cache.invalidate(a.dev, a.ino, first, last);
            }
            self.drop_copy(&a);
            self.set_attr(f.ino, a);
        }
        Ok(done as u32)
    }

    pub fn fsync(&self, fh: u64, datasync: bool) -> Result<(), ClientError> {
        let f = self.file(fh)?;
        self.run(|s| {
            let handle = self.handle(s, &f)?;
            ok_of(s.conn.call(&Request::Fsync { handle, datasync })?)
        })
    }

    /// Closes an open file. Writes are already on the server.
    pub fn release(&self, fh: u64) -> Result<(), ClientError> {
        let Some(f) = lock(&self.files).remove(&fh) else {
            return Err(ClientError::Remote(libc::EBADF));
        };
        let remote = *lock(&f.remote);
        if let (Some((epoch, handle)), Ok(s)) = (remote, self.remote.session())
            && s.epoch == epoch
        {
            let _ = s.conn.send(&Request::Release { handle });
        }
        Ok(())
    }

    /// The inode's file kind, if known.
    pub fn kind(&self, ino: u64) -> Option<Kind> {
        self.cached_attr(ino).map(|a| a.kind)
    }
}
