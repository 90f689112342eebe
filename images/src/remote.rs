//! An image store on a GVFS server (`vmplant gvfs serve --export DIR` of
//! the store's directory), read on demand through the GVFS caching client.
//!
//! [`GvfsStore`] reads the store's metadata (`store.json`, the image file,
//! its layers) through the client when a disk opens, and is the disk's
//! [`ChunkSource`]: a chunk is fetched whole the first time the guest
//! touches it (its 128 KiB cache blocks pipelined on the one connection)
//! and kept in the client's block cache, in memory and, with a cache
//! directory, on disk, where the next VM on the host finds it. A read
//! waits only for its own chunk: reads of other chunks go on meanwhile on
//! the disk's other threads, and two reads of one chunk not yet there
//! wait for one fetch (the client keeps one fetch per block in flight).
//! Chunks the guest never touches are never fetched. [`GvfsStore::fetched`]
//! counts the bytes that came from the server. A chunk read whole is
//! checked against its hash before the guest sees any of it.

use crate::chunk::{ChunkError, ChunkHash, ChunkSource};
use crate::store::{self, ResolvedImage, StoreError, StoreFiles};
use gvfs::client::{ClientError, ConnectConfig, Fs, FsOptions, ROOT_INO};
use std::collections::{HashMap, HashSet};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

/// Errors of a store on a GVFS server.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("cannot use the cache directory")]
    Cache(#[source] gvfs::client::fs::FsError),
    #[error("cannot reach the image store at gvfs://{addr}")]
    Connect {
        addr: String,
        #[source]
        source: ClientError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Chunk files kept open; past this many the table starts over (files
/// still being read stay open until their readers are done).
const OPEN_CHUNKS: usize = 1024;
/// The most one read asks the client for.
const READ_MAX: usize = 1 << 20;

/// An open chunk file, released when the last reader drops it.
struct OpenChunk {
    fs: Arc<Fs>,
    fh: u64,
}

impl Drop for OpenChunk {
    fn drop(&mut self) {
        let _ = self.fs.release(self.fh);
    }
}

/// What a disk on a remote store fetched.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct FetchStats {
    /// Bytes read from the server (not from the client's caches).
    pub bytes: u64,
    /// Read requests sent for them.
    pub requests: u64,
    /// Distinct chunks fetched whole (or found in the cache) so far.
    pub chunks: u64,
}

/// An image store served by a GVFS server.
pub struct GvfsStore {
    fs: Arc<Fs>,
    addr: String,
    chunk_size: u32,
    /// The client's inode of `chunks/`.
    chunks_dir: OnceLock<u64>,
    open: Mutex<HashMap<ChunkHash, Arc<OpenChunk>>>,
    /// Chunks read whole once by this process: in the block cache since.
    warm: Mutex<HashSet<ChunkHash>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn client_io(e: ClientError) -> std::io::Error {
    let errno = e.errno();
    if errno > 0 && matches!(e, ClientError::Remote(_)) {
        std::io::Error::from_raw_os_error(errno)
    } else {
        std::io::Error::other(e)
    }
}

impl GvfsStore {
    /// Connects to the server `cfg` names (whose export is a store's
    /// directory) and reads the store's `store.json`. With `cache_dir`,
    /// fetched blocks are also kept there, for later VMs on this host.
    pub fn connect(
        cfg: ConnectConfig,
        cache_dir: Option<PathBuf>,
    ) -> Result<GvfsStore, RemoteError> {
        let addr = cfg.addr.clone();
        let opts = FsOptions {
            cache_dir,
            ..Default::default()
        };
        let fs = Fs::new(cfg, opts).map_err(RemoteError::Cache)?;
        fs.connect().map_err(|source| RemoteError::Connect {
            addr: addr.clone(),
            source,
        })?;
        let mut store = GvfsStore {
            fs: Arc::new(fs),
            addr,
            chunk_size: 0,
            chunks_dir: OnceLock::new(),
            open: Mutex::new(HashMap::new()),
            warm: Mutex::new(HashSet::new()),
        };
        store.chunk_size = store::read_config(&store)?;
        Ok(store)
    }

    /// `gvfs://HOST:PORT`.
    pub fn url(&self) -> String {
        format!("gvfs://{}", self.addr)
    }

    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Image `name` resolved top-down, its layers read from the server.
    pub fn resolve(&self, name: &str) -> Result<ResolvedImage, RemoteError> {
        Ok(store::resolve_in(self, self.chunk_size, name)?)
    }

    /// What was fetched from the server so far.
    pub fn fetched(&self) -> FetchStats {
        let (bytes, requests) = self.fs.fetched();
        FetchStats {
            bytes,
            requests,
            chunks: lock(&self.warm).len() as u64,
        }
    }

    /// The client's inode of `rel`, looked up from the root (each name
    /// looked up counts one reference, which the caller forgets).
    fn walk(&self, rel: &Path) -> Result<Vec<u64>, ClientError> {
        let mut inos = Vec::new();
        let mut at = ROOT_INO;
        for c in rel.components() {
            let Component::Normal(name) = c else {
                return Err(ClientError::Remote(nix::libc::ENOENT));
            };
            match self.fs.lookup(at, name.as_encoded_bytes()) {
                Ok(e) => {
                    at = e.ino;
                    inos.push(e.ino);
                }
                Err(e) => {
                    self.forget(&inos);
                    return Err(e);
                }
            }
        }
        Ok(inos)
    }

    fn forget(&self, inos: &[u64]) {
        for &ino in inos {
            self.fs.forget(ino, 1);
        }
    }

    /// The whole of an open file of `size` bytes.
    fn read_all(&self, fh: u64, size: u64) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::with_capacity(size.min(64 << 20) as usize);
        loop {
            let d = self.fs.read(fh, out.len() as u64, READ_MAX as u32)?;
            if d.is_empty() {
                return Ok(out);
            }
            out.extend_from_slice(&d);
        }
    }

    fn chunk_file(&self, hash: &ChunkHash) -> Result<Arc<OpenChunk>, ChunkError> {
        if let Some(f) = lock(&self.open).get(hash) {
            return Ok(f.clone());
        }
        let read_err = |e: ClientError| ChunkError::Read {
            hash: *hash,
            source: client_io(e),
        };
        let dir = match self.chunks_dir.get() {
            Some(&d) => d,
            None => {
                let d = self
                    .walk(Path::new("chunks"))
                    .map_err(read_err)?
                    .last()
                    .copied()
                    .unwrap_or(ROOT_INO);
                // The directory's reference is kept for the store's life.
                *self.chunks_dir.get_or_init(|| d)
            }
        };
        let entry = self.fs.lookup(dir, hash.to_hex().as_bytes()).map_err(|e| {
            if e.errno() == nix::libc::ENOENT {
                ChunkError::Missing {
                    hash: *hash,
                    dir: PathBuf::from(format!("{}/chunks", self.url())),
                }
            } else {
                read_err(e)
            }
        })?;
        // The open file holds the inode from here on.
        let opened = self.fs.open(entry.ino, nix::libc::O_RDONLY as u32);
        self.fs.forget(entry.ino, 1);
        let opened = opened.map_err(read_err)?;
        let f = Arc::new(OpenChunk {
            fs: self.fs.clone(),
            fh: opened.fh,
        });
        let mut open = lock(&self.open);
        if open.len() >= OPEN_CHUNKS {
            open.clear();
        }
        Ok(open.entry(*hash).or_insert(f).clone())
    }
}

impl StoreFiles for GvfsStore {
    fn read_file(&self, rel: &Path) -> std::io::Result<Option<Vec<u8>>> {
        let inos = match self.walk(rel) {
            Ok(i) => i,
            Err(e) if e.errno() == nix::libc::ENOENT => return Ok(None),
            Err(e) => return Err(client_io(e)),
        };
        let res = (|| {
            let ino = *inos.last().ok_or(ClientError::Remote(nix::libc::EISDIR))?;
            let opened = self.fs.open(ino, nix::libc::O_RDONLY as u32)?;
            let data = self.read_all(opened.fh, opened.attr.size);
            let _ = self.fs.release(opened.fh);
            data
        })();
        self.forget(&inos);
        res.map(Some).map_err(client_io)
    }

    fn describe(&self, rel: &Path) -> PathBuf {
        PathBuf::from(format!("{}/{}", self.url(), rel.display()))
    }
}

impl ChunkSource for GvfsStore {
    fn read_chunk_at(
        &self,
        hash: &ChunkHash,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ChunkError> {
        let f = self.chunk_file(hash)?;
        let read_err = |e: ClientError| ChunkError::Read {
            hash: *hash,
            source: client_io(e),
        };
        let end = offset.saturating_add(buf.len() as u64);
        if !lock(&self.warm).contains(hash) {
            // First touch: the whole chunk, in one pipelined batch, into
            // the block cache (or out of it, if a VM before this one
            // fetched it into the cache directory).
            let data = self.fs.read(f.fh, 0, self.chunk_size).map_err(read_err)?;
            let Some(part) = data.get(offset as usize..end as usize) else {
                return Err(ChunkError::Truncated {
                    hash: *hash,
                    offset: data.len() as u64,
                });
            };
            // Whole, so checked: what comes over the network (or out of
            // the cache directory) is the chunk its name says.
            if data.len() != self.chunk_size as usize || ChunkHash::of(&data) != *hash {
                return Err(ChunkError::Damaged {
                    hash: *hash,
                    from: self.url(),
                });
            }
            buf.copy_from_slice(part);
            lock(&self.warm).insert(*hash);
            return Ok(());
        }
        let mut done = 0usize;
        while done < buf.len() {
            let want = (buf.len() - done).min(READ_MAX);
            let at = offset + done as u64;
            let d = self.fs.read(f.fh, at, want as u32).map_err(read_err)?;
            if d.is_empty() {
                return Err(ChunkError::Truncated {
                    hash: *hash,
                    offset: at,
                });
            }
            let n = d.len().min(want);
            buf[done..done + n].copy_from_slice(&d[..n]);
            done += n;
        }
        Ok(())
    }
}
