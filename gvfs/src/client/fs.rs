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
//! hands out new node ids). Open files are reopened the same way. The
//! same holds across a VM snapshot: what a caller holds (inode numbers
//! with their paths and lookup counts, open files) is saved with
//! [`Fs::save_state`] and put back into a new client with
//! [`Fs::restore_state`] (`saved.rs`).
//!
//! Memory is bounded whatever the server lists: inodes nothing holds (no
//! caller reference, open file or inode below them, such as the entries
//! of a plain listing) are dropped least recently used first past
//! `max_idle_inodes`, and cached listings past `max_cached_dir_entries`
//! entries in all.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tracing::debug;

use super::cache::{BLOCK_SIZE, BlockCache, BlockKey, CacheError, CacheStats};
use super::conn::{ClientError, ConnectConfig, Remote, Session, check};
use super::copies::Copies;
use crate::limit::Budget;

mod files;
mod saved;

use crate::proto::{self, Attr, Request, Response, SetAttr, StatFs};
pub use files::Opened;
use files::{Flight, OpenFile};
pub use saved::{FileState, FsState, InodeState, MAX_SAVED_INODES, MAX_SAVED_NAME, StateError};

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

/// Files one client (one mount, or one guest's share) may hold open: far
/// beyond what a mount's processes usually hold (1024 per process by
/// default), and what the server grants one connection
/// ([`crate::server::DEFAULT_MAX_HANDLES_PER_CONN`]). Each costs an entry
/// here and a descriptor on the server. Past it an open gets EMFILE.
pub const DEFAULT_MAX_OPEN_FILES: usize = 8192;

/// Directories one FUSE session (a guest's share, or the host mount) may
/// hold open: a deep tree walk holds one per level, a few parallel walkers
/// a few hundred. Past it an opendir gets EMFILE.
pub const DEFAULT_MAX_OPEN_DIRS: usize = 1024;

/// Entries of one directory listing, and of all the listings a guest's
/// open directories hold together: about 200 MiB of entries with their
/// attributes at most, and larger than all but very rare directories. A
/// longer listing gets EIO; open directories past it in all get ENOMEM.
pub const DEFAULT_MAX_DIR_ENTRIES: usize = 1 << 20;

/// Batches (round trips) of one directory listing. A server sends about a
/// thousand entries per batch (a few hundred with the longest names), so
/// a listing of [`DEFAULT_MAX_DIR_ENTRIES`] takes a few thousand; past
/// this many the listing gets EIO (a server handing out cookies forever).
pub const MAX_LISTING_BATCHES: usize = 16_384;

/// Inodes nothing holds (no caller reference, open file or inode below
/// them) kept as a cache, such as the entries of a plain listing, which
/// the kernel looks up by name only later: past this many the least
/// recently used are dropped. About 250 bytes each with its name (some
/// 32 MiB in all), and more than the entries of all but the largest
/// directories, so that a listing's entries stay while it is read.
pub const DEFAULT_MAX_IDLE_INODES: usize = 1 << 17;

/// Entries of all cached directory listings together (a name and an
/// inode number each, about 60 bytes: some 8 MiB in all): past it the
/// listings least recently used are dropped, and a larger listing is not
/// cached at all. As many as [`DEFAULT_MAX_IDLE_INODES`], as a cached
/// listing answers only while its entries' inodes are kept.
pub const DEFAULT_MAX_CACHED_DIR_ENTRIES: usize = 1 << 17;

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
    /// Files open at once ([`DEFAULT_MAX_OPEN_FILES`]).
    pub max_open_files: usize,
    /// Directories open at once in a FUSE session or mount
    /// ([`DEFAULT_MAX_OPEN_DIRS`]).
    pub max_open_dirs: usize,
    /// Entries of one listing, and of a session's open directories in all
    /// ([`DEFAULT_MAX_DIR_ENTRIES`]).
    pub max_dir_entries: usize,
    /// Inodes kept that nothing holds ([`DEFAULT_MAX_IDLE_INODES`]).
    pub max_idle_inodes: usize,
    /// Entries of all cached listings together
    /// ([`DEFAULT_MAX_CACHED_DIR_ENTRIES`]).
    pub max_cached_dir_entries: usize,
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
            max_open_files: DEFAULT_MAX_OPEN_FILES,
            max_open_dirs: DEFAULT_MAX_OPEN_DIRS,
            max_dir_entries: DEFAULT_MAX_DIR_ENTRIES,
            max_idle_inodes: DEFAULT_MAX_IDLE_INODES,
            max_cached_dir_entries: DEFAULT_MAX_CACHED_DIR_ENTRIES,
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
    /// Batches asked for so far.
    batches: usize,
}

impl DirReader {
    pub fn new(ino: u64) -> DirReader {
        DirReader {
            ino,
            next: Some(0),
            names: Vec::new(),
            batches: 0,
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
    /// Inodes in the table whose parent this is: a parent stays while
    /// they do (they are looked up again through it).
    children: usize,
    /// Files open on it through this client (reopened through it).
    opens: usize,
    /// When it was last used: a tick of [`Inodes::clock`], its place in
    /// the least-recently-used orders.
    used: u64,
}

impl Inode {
    /// Whether anything holds it (else it is only a cache entry).
    fn held(&self) -> bool {
        self.lookups > 0 || self.children > 0 || self.opens > 0
    }
}

/// The inode table, and what bounds it: inodes nothing holds and cached
/// listings, each in least-recently-used order.
struct Inodes {
    map: HashMap<u64, Inode>,
    names: HashMap<(u64, Vec<u8>), u64>,
    next: u64,
    /// Counts uses, for the orders below.
    clock: u64,
    /// Inodes nothing holds, by (last use, inode).
    idle: BTreeSet<(u64, u64)>,
    max_idle: usize,
    /// Directories with a cached listing, by (last use, inode).
    listed: BTreeSet<(u64, u64)>,
    /// Entries of all cached listings.
    listed_entries: usize,
    max_listed_entries: usize,
}

impl Inodes {
    fn new(opts: &FsOptions) -> Inodes {
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
                children: 0,
                opens: 0,
                used: 0,
            },
        );
        Inodes {
            map,
            names: HashMap::new(),
            next: ROOT_INO + 1,
            clock: 0,
            idle: BTreeSet::new(),
            max_idle: opts.max_idle_inodes,
            listed: BTreeSet::new(),
            listed_entries: 0,
            max_listed_entries: opts.max_cached_dir_entries,
        }
    }

    /// Marks `ino` used now: last to be dropped.
    fn touch(&mut self, ino: u64) {
        self.clock += 1;
        let now = self.clock;
        let Some(i) = self.map.get_mut(&ino) else {
            return;
        };
        let old = std::mem::replace(&mut i.used, now);
        if self.idle.remove(&(old, ino)) {
            self.idle.insert((now, ino));
        }
        if self.listed.remove(&(old, ino)) {
            self.listed.insert((now, ino));
        }
    }

    /// Puts `ino` in the idle order, or takes it out, as its counts say.
    fn settle(&mut self, ino: u64) {
        let Some(i) = self.map.get(&ino) else {
            return;
        };
        let key = (i.used, ino);
        if i.held() || ino == ROOT_INO {
            self.idle.remove(&key);
        } else {
            self.idle.insert(key);
        }
    }

    /// Drops the least recently used inodes nothing holds, past the bound.
    fn trim(&mut self) {
        while self.idle.len() > self.max_idle {
            let Some((_, ino)) = self.idle.pop_first() else {
                break;
            };
            self.remove(ino);
        }
    }

    /// Adds the new inode `ino` as `name` in `parent`.
    fn insert(&mut self, ino: u64, parent: u64, name: &[u8], mut inode: Inode) {
        self.clock += 1;
        inode.used = self.clock;
        self.map.insert(ino, inode);
        self.names.insert((parent, name.to_vec()), ino);
        self.adopt(parent, 1);
        self.settle(ino);
        self.trim();
    }

    /// `parent` has `n` more children (or, negative, fewer).
    fn adopt(&mut self, parent: u64, n: isize) {
        if let Some(p) = self.map.get_mut(&parent) {
            p.children = p.children.saturating_add_signed(n);
            self.settle(parent);
        }
    }

    /// Removes `ino` with its name and listing (never the root).
    fn remove(&mut self, ino: u64) {
        if ino == ROOT_INO {
            return;
        }
        self.drop_listing(ino);
        let Some(i) = self.map.remove(&ino) else {
            return;
        };
        self.idle.remove(&(i.used, ino));
        let parent = i.parent;
        let key = (parent, i.name);
        if self.names.get(&key) == Some(&ino) {
            self.names.remove(&key);
        }
        self.adopt(parent, -1);
    }

    /// Moves `ino` under `parent` (renamed there).
    fn reparent(&mut self, ino: u64, parent: u64, name: &[u8]) {
        let Some(i) = self.map.get_mut(&ino) else {
            return;
        };
        let old = std::mem::replace(&mut i.parent, parent);
        i.name = name.to_vec();
        i.attr = None; // ctime changed
        self.adopt(old, -1);
        self.adopt(parent, 1);
    }

    /// Caches `list` as the listing of `ino`, dropping the listings used
    /// least recently past the bound (a listing past it alone is not kept).
    fn set_listing(&mut self, ino: u64, list: Listing) {
        self.drop_listing(ino);
        if list.len() > self.max_listed_entries || !self.map.contains_key(&ino) {
            return;
        }
        self.touch(ino);
        let Some(i) = self.map.get_mut(&ino) else {
            return;
        };
        self.listed_entries += list.len();
        self.listed.insert((i.used, ino));
        i.listing = Some((list, Instant::now()));
        while self.listed_entries > self.max_listed_entries {
            let Some((_, d)) = self.listed.first().copied() else {
                break;
            };
            self.drop_listing(d);
        }
    }

    fn drop_listing(&mut self, ino: u64) {
        if let Some(i) = self.map.get_mut(&ino)
            && let Some((list, _)) = i.listing.take()
        {
            self.listed.remove(&(i.used, ino));
            self.listed_entries = self.listed_entries.saturating_sub(list.len());
        }
    }
}

/// The caching file-system client.
pub struct Fs {
    remote: Remote,
    opts: FsOptions,
    inodes: Mutex<Inodes>,
    files: Mutex<HashMap<u64, Arc<OpenFile>>>,
    /// Open files counted against [`FsOptions::max_open_files`] (taken
    /// before the server is asked).
    open_files: Budget,
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
    /// File content read from the server: bytes, and read requests.
    fetched_bytes: AtomicU64,
    fetch_requests: AtomicU64,
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

impl Fs {
    /// A client of the server `cfg` points to. Nothing is sent until the
    /// first call.
    pub fn new(cfg: ConnectConfig, opts: FsOptions) -> Result<Fs, FsError> {
        let cache = BlockCache::new(
            opts.mem_cache_bytes,
            opts.cache_dir.as_deref(),
            opts.disk_cache_bytes,
        )?;
        Ok(Fs {
            remote: Remote::new(cfg),
            inodes: Mutex::new(Inodes::new(&opts)),
            files: Mutex::new(HashMap::new()),
            open_files: Budget::new(opts.max_open_files),
            next_fh: AtomicU64::new(1),
            cache,
            inflight: Mutex::new(HashMap::new()),
            fetched_bytes: AtomicU64::new(0),
            fetch_requests: AtomicU64::new(0),
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

    /// File content this client read from the server (not from its
    /// caches) so far: bytes and read requests. What on-demand users (a
    /// disk image's chunks) count as fetched.
    pub fn fetched(&self) -> (u64, u64) {
        (
            self.fetched_bytes.load(Ordering::Relaxed),
            self.fetch_requests.load(Ordering::Relaxed),
        )
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

    /// Names this client in the log lines of its connection (connected,
    /// disconnected, reconnected): a share's tag, a mount point.
    pub fn set_label(&self, label: &str) {
        self.remote.set_label(label);
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

    /// The inode of `name` in `parent` (a new one if there is none),
    /// with attributes `attr` from connection epoch `epoch`, counting
    /// `refs` references for the caller.
    fn intern(&self, parent: u64, name: &[u8], attr: Attr, epoch: u64, refs: u64) -> u64 {
        let mut t = lock(&self.inodes);
        let now = Instant::now();
        if let Some(&ino) = t.names.get(&(parent, name.to_vec()))
            && let Some(i) = t.map.get_mut(&ino)
        {
            i.node = Some((epoch, attr.node));
            i.attr = Some((attr, now));
            i.lookups += refs;
            t.touch(ino);
            t.settle(ino);
            return ino;
        }
        let ino = t.next;
        t.next += 1;
        let inode = Inode {
            parent,
            name: name.to_vec(),
            node: Some((epoch, attr.node)),
            attr: Some((attr, now)),
            listing: None,
            lookups: refs,
            children: 0,
            opens: 0,
            used: 0,
        };
        t.insert(ino, parent, name, inode);
        ino
    }

    /// Counts one more reference held by the caller (the kernel) to `ino`;
    /// every call that returns an [`Entry`] counts one itself.
    pub fn remember(&self, ino: u64) {
        let mut t = lock(&self.inodes);
        if let Some(i) = t.map.get_mut(&ino) {
            i.lookups += 1;
            t.settle(ino);
        }
    }

    /// Counts one reference held by the caller to the entry `item` of a
    /// listing of `parent` (call it for each entry a READDIRPLUS answer
    /// gives out), and returns the inode number to give out with it: the
    /// entry's own, or, if its inode was dropped meanwhile (nothing held
    /// it), the one its name has now or the same number made anew.
    pub fn remember_entry(&self, parent: u64, item: &DirItem) -> u64 {
        let mut t = lock(&self.inodes);
        let found = if t.map.contains_key(&item.ino) {
            Some(item.ino)
        } else {
            t.names.get(&(parent, item.name.clone())).copied()
        };
        if let Some(ino) = found
            && let Some(i) = t.map.get_mut(&ino)
        {
            i.lookups += 1;
            t.touch(ino);
            t.settle(ino);
            return ino;
        }
        // Its server node id and attributes are looked up again by name.
        let inode = Inode {
            parent,
            name: item.name.clone(),
            node: None,
            attr: None,
            listing: None,
            lookups: 1,
            children: 0,
            opens: 0,
            used: 0,
        };
        t.insert(item.ino, parent, &item.name, inode);
        item.ino
    }

    /// The caller dropped `n` references to `ino` (FUSE FORGET); an inode
    /// with none left is removed unless an open file or an inode below it
    /// holds it (it is then dropped once nothing does and it is least
    /// recently used). The root is never removed.
    pub fn forget(&self, ino: u64, n: u64) {
        let mut t = lock(&self.inodes);
        let Some(i) = t.map.get_mut(&ino) else { return };
        i.lookups = i.lookups.saturating_sub(n);
        if ino == ROOT_INO || i.lookups > 0 {
            return;
        }
        if i.held() {
            return;
        }
        t.remove(ino);
    }

    /// How many inodes the client holds (for tests and monitoring).
    pub fn inode_count(&self) -> usize {
        lock(&self.inodes).map.len()
    }

    /// Entries of all cached listings (for tests and monitoring).
    pub fn cached_dir_entries(&self) -> usize {
        lock(&self.inodes).listed_entries
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
        lock(&self.inodes).drop_listing(ino);
    }

    fn forget_name(&self, parent: u64, name: &[u8]) {
        let mut t = lock(&self.inodes);
        if let Some(ino) = t.names.remove(&(parent, name.to_vec()))
            && let Some(i) = t.map.get_mut(&ino)
        {
            i.node = None;
            i.attr = None;
        }
        t.drop_listing(parent);
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

    /// Looks up `name` in directory `parent`; counts one reference to the
    /// entry.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Entry, ClientError> {
        if name == b"." {
            let attr = self.getattr(parent)?;
            self.remember(parent);
            return Ok(Entry { ino: parent, attr });
        }
        // A fresh listing answers both hits and misses.
        {
            let mut t = lock(&self.inodes);
            if let Some((list, at)) = t.map.get(&parent).and_then(|p| p.listing.clone())
                && at.elapsed() < self.opts.attr_timeout
            {
                t.touch(parent);
                match list.iter().find(|(n, _)| n == name) {
                    None => return Err(ClientError::Remote(libc::ENOENT)),
                    Some(&(_, ino)) => {
                        if let Some(i) = t.map.get_mut(&ino)
                            && let Some((a, at)) = i.attr
                            && at.elapsed() < self.opts.attr_timeout
                        {
                            i.lookups += 1;
                            t.touch(ino);
                            t.settle(ino);
                            return Ok(Entry { ino, attr: a });
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
                ino: self.intern(parent, name, attr, self.node_gen(s), 1),
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
        let mut t = lock(&self.inodes);
        let (list, at) = t.map.get(&ino)?.listing.clone()?;
        if at.elapsed() >= self.opts.attr_timeout {
            return None;
        }
        t.touch(ino);
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
        let too_long = |r: &mut DirReader, entries: usize| {
            // The reader is done: a server that keeps going gets no more.
            r.next = None;
            r.names = Vec::new();
            Err(ClientError::ListingTooLong {
                entries,
                batches: r.batches,
            })
        };
        if r.batches >= MAX_LISTING_BATCHES {
            return too_long(r, r.names.len());
        }
        r.batches += 1;
        let (entries, next, epoch) = self.run(|s| {
            let node = self.node(s, ino)?;
            match check(s.conn.call(&Request::Readdir { node, cookie })?)? {
                Response::Dir { entries, next } => Ok((entries, next, self.node_gen(s))),
                _ => Err(ClientError::Unexpected),
            }
        })?;
        let total = r.names.len().saturating_add(entries.len());
        if total > self.opts.max_dir_entries {
            return too_long(r, total);
        }
        let mut items = Vec::with_capacity(entries.len());
        for e in entries {
            let child = self.intern(ino, &e.name, e.attr, epoch, 0);
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
            lock(&self.inodes).set_listing(ino, list);
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
                ino: self.intern(parent, name, attr, self.node_gen(s), 1),
                attr,
            })
        });
        self.drop_listing(parent);
        r
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
                ino: self.intern(new_parent, new_name, attr, self.node_gen(s), 1),
                attr,
            })
        });
        self.drop_listing(new_parent);
        // The link count of the source changed.
        if let Some(i) = lock(&self.inodes).map.get_mut(&ino) {
            i.attr = None;
        }
        r
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
                t.reparent(ino, new_parent, new_name);
            }
        }
        for p in [parent, new_parent] {
            t.drop_listing(p);
        }
        r
    }
}
