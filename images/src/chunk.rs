//! Content-addressed chunks: their hashes, the [`ChunkSource`] trait every
//! read of a chunk goes through, and [`LocalChunks`], the source that reads
//! a store's `chunks/` directory.
//!
//! A chunk is named by the blake3 hash of its bytes (always a whole chunk,
//! the last one of a disk padded with zeros). A remote store (GVFS, fetched
//! on demand) is another [`ChunkSource`]; [`CountingSource`] counts what
//! any source is asked for.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk {hash} is missing from {dir}")]
    Missing { hash: ChunkHash, dir: PathBuf },
    #[error("chunk {hash} is truncated (read past its end at byte {offset})")]
    Truncated { hash: ChunkHash, offset: u64 },
    #[error("cannot read chunk {hash}")]
    Read {
        hash: ChunkHash,
        #[source]
        source: std::io::Error,
    },
    #[error("{0:?} is not a chunk hash (64 hex digits)")]
    BadHash(String),
    #[error("chunk {hash} from {from} is damaged: its bytes do not match its hash")]
    Damaged { hash: ChunkHash, from: String },
}

/// The blake3 hash of a chunk's bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    pub fn of(data: &[u8]) -> ChunkHash {
        ChunkHash(*blake3::hash(data).as_bytes())
    }

    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    pub fn from_hex(s: &str) -> Result<ChunkHash, ChunkError> {
        if s.len() != 64 {
            return Err(ChunkError::BadHash(s.to_string()));
        }
        blake3::Hash::from_hex(s)
            .map(|h| ChunkHash(*h.as_bytes()))
            .map_err(|_| ChunkError::BadHash(s.to_string()))
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkHash({})", self.to_hex())
    }
}

impl serde::Serialize for ChunkHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for ChunkHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        ChunkHash::from_hex(&s).map_err(serde::de::Error::custom)
    }
}

/// Where the bytes of chunks come from: the local store now, a GVFS-backed
/// fetcher later. Implementations are shared by every thread of a disk.
pub trait ChunkSource: Send + Sync {
    /// Fills `buf` with the chunk's bytes from `offset` (within the chunk)
    /// on. `offset + buf.len()` is at most the chunk size.
    fn read_chunk_at(
        &self,
        hash: &ChunkHash,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ChunkError>;
}

/// What a [`CountingSource`] was asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SourceStats {
    /// Calls to `read_chunk_at`.
    pub reads: u64,
    /// Bytes they returned.
    pub bytes: u64,
    /// Distinct chunks read at least once.
    pub chunks: u64,
}

/// A [`ChunkSource`] that counts the reads, bytes and distinct chunks it
/// passes on to another.
pub struct CountingSource {
    inner: Arc<dyn ChunkSource>,
    reads: AtomicU64,
    bytes: AtomicU64,
    seen: Mutex<std::collections::HashSet<ChunkHash>>,
}

impl CountingSource {
    pub fn new(inner: Arc<dyn ChunkSource>) -> CountingSource {
        CountingSource {
            inner,
            reads: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            seen: Mutex::new(Default::default()),
        }
    }

    pub fn stats(&self) -> SourceStats {
        SourceStats {
            reads: self.reads.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            chunks: self.seen.lock().map_or(0, |s| s.len() as u64),
        }
    }
}

impl ChunkSource for CountingSource {
    fn read_chunk_at(
        &self,
        hash: &ChunkHash,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ChunkError> {
        self.inner.read_chunk_at(hash, offset, buf)?;
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        if let Ok(mut seen) = self.seen.lock() {
            seen.insert(*hash);
        }
        Ok(())
    }
}

/// Open chunk files kept for reuse; past this many the cache starts over.
const OPEN_FILES: usize = 256;

/// Reads chunks from a store's `chunks/` directory (one file per chunk,
/// named by its hash in hex), keeping up to 256 of them open.
pub struct LocalChunks {
    dir: PathBuf,
    open: RwLock<HashMap<ChunkHash, Arc<File>>>,
}

impl LocalChunks {
    pub fn new(dir: &Path) -> LocalChunks {
        LocalChunks {
            dir: dir.to_path_buf(),
            open: RwLock::new(HashMap::new()),
        }
    }

    fn file(&self, hash: &ChunkHash) -> Result<Arc<File>, ChunkError> {
        if let Some(f) = self.open.read().ok().and_then(|m| m.get(hash).cloned()) {
            return Ok(f);
        }
        let f = match File::open(self.dir.join(hash.to_hex())) {
            Ok(f) => Arc::new(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ChunkError::Missing {
                    hash: *hash,
                    dir: self.dir.clone(),
                });
            }
            Err(source) => {
                return Err(ChunkError::Read {
                    hash: *hash,
                    source,
                });
            }
        };
        if let Ok(mut m) = self.open.write() {
            if m.len() >= OPEN_FILES {
                m.clear();
            }
            m.insert(*hash, f.clone());
        }
        Ok(f)
    }
}

impl ChunkSource for LocalChunks {
    fn read_chunk_at(
        &self,
        hash: &ChunkHash,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ChunkError> {
        let f = self.file(hash)?;
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            match f.read_at(&mut buf[done..], at) {
                Ok(0) => {
                    return Err(ChunkError::Truncated {
                        hash: *hash,
                        offset: at,
                    });
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(ChunkError::Read {
                        hash: *hash,
                        source,
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_hex_round_trip_and_bad_input() {
        let h = ChunkHash::of(b"hello");
        assert_eq!(ChunkHash::from_hex(&h.to_hex()).unwrap(), h);
        assert!(ChunkHash::from_hex("zz").is_err());
        assert!(ChunkHash::from_hex(&"g".repeat(64)).is_err());
    }

    #[test]
    fn local_chunks_count_and_report_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let data = vec![7u8; 100];
        let h = ChunkHash::of(&data);
        std::fs::write(dir.path().join(h.to_hex()), &data).unwrap();
        let src = CountingSource::new(Arc::new(LocalChunks::new(dir.path())));
        let mut buf = [0u8; 10];
        src.read_chunk_at(&h, 90, &mut buf).unwrap();
        assert_eq!(buf, [7u8; 10]);
        src.read_chunk_at(&h, 0, &mut buf).unwrap();
        assert_eq!(
            src.stats(),
            SourceStats {
                reads: 2,
                bytes: 20,
                chunks: 1
            }
        );
        let err = src.read_chunk_at(&h, 95, &mut buf).unwrap_err();
        assert!(matches!(err, ChunkError::Truncated { .. }), "{err}");
        let missing = ChunkHash::of(b"other");
        let err = src.read_chunk_at(&missing, 0, &mut buf).unwrap_err();
        assert!(matches!(err, ChunkError::Missing { .. }), "{err}");
    }
}
