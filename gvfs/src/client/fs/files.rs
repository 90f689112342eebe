//! Open files of the client core: open and create (counted against
//! [`super::FsOptions::max_open_files`]), reads through the block cache with
//! read-ahead, writes, whole-file refills, release.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tracing::warn;

use super::super::cache::{BLOCK_SIZE, BlockKey};
use super::super::conn::{ClientError, Session, check};
use super::{Entry, Fs, lock, ok_of};
use crate::limit::LogLimiter;
use crate::proto::{self, Attr, Kind, Request, Response};

/// A guest or process opening past its bound does so over and over.
static OPEN_FILES_LOG: LogLimiter = LogLimiter::new();

/// A file open through [`Fs::open`] or [`Fs::create`].
pub(super) struct OpenFile {
    pub(super) ino: u64,
    pub(super) flags: u32,
    /// (epoch, server handle).
    remote: Mutex<Option<(u64, u64)>>,
    /// Where the last read ended (sequential detection).
    last_end: AtomicU64,
}

impl OpenFile {
    /// A file open on `ino` with `flags` that the server has not opened
    /// on this connection (a restored one): it is opened there on first
    /// use, as after a reconnect.
    pub(super) fn unopened(ino: u64, flags: u32) -> OpenFile {
        OpenFile {
            ino,
            flags,
            remote: Mutex::new(None),
            last_end: AtomicU64::new(u64::MAX),
        }
    }
}

/// One batch of blocks being fetched; readers wanting one of them wait.
#[derive(Default)]
pub(super) struct Flight {
    done: Mutex<bool>,
    cv: Condvar,
}

impl Flight {
    pub(super) fn wait(&self) {
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
    pub(super) fn finish(&self) {
        *lock(&self.done) = true;
        self.cv.notify_all();
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
    /// Counts one more open file, or refuses it (EMFILE) past
    /// [`super::FsOptions::max_open_files`]; given back if the open fails or
    /// when the file is released.
    fn take_file_place(&self) -> Result<(), ClientError> {
        if self.open_files.try_take() {
            return Ok(());
        }
        if let Some(held_back) = OPEN_FILES_LOG.allow() {
            warn!(
                max = self.opts.max_open_files,
                held_back, "open refused: too many open files"
            );
        }
        Err(ClientError::Limit(libc::EMFILE))
    }

    /// How many files are open (for tests and monitoring).
    pub fn open_file_count(&self) -> usize {
        self.open_files.used()
    }

    fn new_fh(&self, ino: u64, flags: u32, epoch: u64, handle: u64) -> u64 {
        // The inode stays while the file is open (it is reopened through it).
        {
            let mut t = lock(&self.inodes);
            if let Some(i) = t.map.get_mut(&ino) {
                i.opens += 1;
                t.settle(ino);
            }
        }
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
        self.take_file_place()?;
        let (attr, handle, epoch) = self
            .run(|s| {
                let node = self.node(s, ino)?;
                match check(s.conn.call(&Request::Open { node, flags })?)? {
                    Response::Opened { handle, attr } => Ok((attr, handle, s.epoch)),
                    _ => Err(ClientError::Unexpected),
                }
            })
            .inspect_err(|_| self.open_files.give(1))?;
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
        self.take_file_place()?;
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
                    let ino = self.intern(parent, name, attr, self.node_gen(s), 1);
                    Ok((
                        Entry { ino, attr },
                        self.new_fh(ino, flags, s.epoch, handle),
                    ))
                }
                _ => Err(ClientError::Unexpected),
            }
        });
        self.drop_listing(parent);
        if r.is_err() {
            self.open_files.give(1);
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
        // Saturating: a size near u64::MAX (a server may say anything)
        // must not wrap the end of the range.
        let end = offset.saturating_add(size as u64).min(attr.size);
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
                    b.saturating_add(self.opts.readahead_blocks.max(1))
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
        // No copy larger than the copies may hold (whatever size the
        // server claims): nothing is written beyond it.
        if self.copies.as_ref().is_none_or(|c| attr.size > c.budget()) {
            return Err(ClientError::Limit(libc::EFBIG));
        }
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
                Response::Data(d) => {
                    self.count_fetch(d.len(), 1);
                    Ok(d)
                }
                _ => Err(ClientError::Unexpected),
            }
        })
    }

    fn count_fetch(&self, bytes: usize, requests: u64) {
        self.fetched_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
        self.fetch_requests.fetch_add(requests, Ordering::Relaxed);
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
                    Response::Data(d) => {
                        self.count_fetch(d.len(), 1);
                        out.push(d)
                    }
                    _ => return Err(ClientError::Unexpected),
                }
            }
            Ok(out)
        })
    }

    /// Writes to an open file; returns once the server has the data.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32, ClientError> {
        let f = self.file(fh)?;
        // Past the largest file offset (as the kernel's EFBIG), and never
        // wrapping in the block arithmetic below.
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|end| end > i64::MAX as u64)
        {
            return Err(ClientError::Limit(libc::EFBIG));
        }
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
        self.open_files.give(1);
        {
            let mut t = lock(&self.inodes);
            if let Some(i) = t.map.get_mut(&f.ino) {
                i.opens = i.opens.saturating_sub(1);
                t.settle(f.ino);
                t.trim();
            }
        }
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
