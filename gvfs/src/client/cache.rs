//! The block cache: fixed-size blocks of file content, in memory (LRU) and
//! on disk (bounded in size, each entry checksummed).
//!
//! A block is named by the file's identity on the server (device and
//! inode) and its index; it carries the file version (size, mtime, ctime)
//! it was read at, and is a hit only for that same version. The disk cache
//! therefore stays valid across client restarts for files that did not
//! change on the server.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::{debug, warn};

/// Size of one cache block.
pub const BLOCK_SIZE: u64 = 128 * 1024;

const DISK_MAGIC: [u8; 4] = *b"GVB1";
/// magic, version u64, length u32, crc32 u32.
const DISK_HEADER: usize = 4 + 8 + 4 + 4;

/// What can go wrong while opening the disk cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot use cache directory {0}")]
    Dir(String, #[source] io::Error),
}

/// Which block of which file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockKey {
    pub dev: u64,
    pub ino: u64,
    pub block: u64,
}

/// How often the cache answered from where.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub mem_hits: u64,
    pub disk_hits: u64,
    pub misses: u64,
    /// Disk entries found torn or corrupt (and dropped).
    pub corrupt: u64,
}

#[derive(Default)]
struct Counters {
    mem_hits: AtomicU64,
    disk_hits: AtomicU64,
    misses: AtomicU64,
    corrupt: AtomicU64,
}

/// A bounded LRU index: key -> (size, tick).
struct Lru<K: Ord + Copy + std::hash::Hash, V> {
    map: HashMap<K, (V, u64, u64)>,
    order: BTreeMap<u64, K>,
    bytes: u64,
    cap: u64,
    tick: u64,
}

impl<K: Ord + Copy + std::hash::Hash, V> Lru<K, V> {
    fn new(cap: u64) -> Self {
        Lru {
            map: HashMap::new(),
            order: BTreeMap::new(),
            bytes: 0,
            cap,
            tick: 0,
        }
    }
    fn get(&mut self, k: &K) -> Option<&V> {
        self.tick += 1;
        let tick = self.tick;
        let e = self.map.get_mut(k)?;
        self.order.remove(&e.2);
        e.2 = tick;
        self.order.insert(tick, *k);
        Some(&e.0)
    }
    fn remove(&mut self, k: &K) -> Option<V> {
        let (v, size, tick) = self.map.remove(k)?;
        self.order.remove(&tick);
        self.bytes -= size;
        Some(v)
    }
    /// Inserts and returns what had to be evicted to stay within the cap.
    fn insert(&mut self, k: K, v: V, size: u64) -> Vec<(K, V)> {
        self.remove(&k);
        self.tick += 1;
        self.map.insert(k, (v, size, self.tick));
        self.order.insert(self.tick, k);
        self.bytes += size;
        let mut out = Vec::new();
        while self.bytes > self.cap {
            let Some((_, old)) = self.order.pop_first() else {
                break;
            };
            if let Some((v, size, _)) = self.map.remove(&old) {
                self.bytes -= size;
                out.push((old, v));
            }
        }
        out
    }
}

impl<V> Lru<BlockKey, V> {
    /// The keys held of blocks `first..=last` of `(dev, ino)`. The work
    /// is bounded by the entries held, not by the range: a file size near
    /// u64::MAX (from the server) makes a range of 2^47 blocks.
    fn keys_in(&self, dev: u64, ino: u64, first: u64, last: u64) -> Vec<BlockKey> {
        let span = last.saturating_sub(first).saturating_add(1);
        if span <= self.map.len() as u64 {
            (first..=last)
                .map(|block| BlockKey { dev, ino, block })
                .filter(|k| self.map.contains_key(k))
                .collect()
        } else {
            self.map
                .keys()
                .filter(|k| k.dev == dev && k.ino == ino && (first..=last).contains(&k.block))
                .copied()
                .collect()
        }
    }
}

/// A block in memory: the file version it was read at, and its bytes.
type MemBlock = (u64, Arc<Vec<u8>>);

struct Disk {
    dir: PathBuf,
    index: Mutex<Lru<BlockKey, ()>>,
}

/// Memory plus optional disk block cache.
pub struct BlockCache {
    mem: Mutex<Lru<BlockKey, MemBlock>>,
    disk: Option<Disk>,
    counters: Counters,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn file_name(k: &BlockKey) -> String {
    format!("{:x}-{:x}-{:x}", k.dev, k.ino, k.block)
}

fn parse_name(s: &str) -> Option<BlockKey> {
    let mut it = s.split('-');
    let dev = u64::from_str_radix(it.next()?, 16).ok()?;
    let ino = u64::from_str_radix(it.next()?, 16).ok()?;
    let block = u64::from_str_radix(it.next()?, 16).ok()?;
    if it.next().is_some() {
        return None;
    }
    Some(BlockKey { dev, ino, block })
}

fn entry_crc(version: u64, data: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&version.to_le_bytes());
    h.update(&(data.len() as u32).to_le_bytes());
    h.update(data);
    h.finalize()
}

impl BlockCache {
    /// A cache of `mem_bytes` in memory and, with `disk`, up to
    /// `disk_bytes` in that directory (entries already there are kept).
    pub fn new(
        mem_bytes: u64,
        disk: Option<&Path>,
        disk_bytes: u64,
    ) -> Result<BlockCache, CacheError> {
        let disk = match disk {
            None => None,
            Some(dir) => {
                let err = |e| CacheError::Dir(dir.display().to_string(), e);
                fs::create_dir_all(dir).map_err(err)?;
                // Rebuild the index, oldest first, so LRU order survives restarts.
                let mut found = Vec::new();
                for ent in fs::read_dir(dir).map_err(err)? {
                    let Ok(ent) = ent else { continue };
                    let name = ent.file_name();
                    let Some(key) = name.to_str().and_then(parse_name) else {
                        // Leftover temporary files from an interrupted write.
                        let _ = fs::remove_file(ent.path());
                        continue;
                    };
                    let Ok(md) = ent.metadata() else { continue };
                    let mtime = md.modified().ok();
                    found.push((mtime, key, md.len()));
                }
                found.sort_by_key(|f| f.0);
                let mut index = Lru::new(disk_bytes);
                for (_, key, size) in found {
                    for (old, ()) in index.insert(key, (), size) {
                        let _ = fs::remove_file(dir.join(file_name(&old)));
                    }
                }
                Some(Disk {
                    dir: dir.to_path_buf(),
                    index: Mutex::new(index),
                })
            }
        };
        Ok(BlockCache {
            mem: Mutex::new(Lru::new(mem_bytes)),
            disk,
            counters: Counters::default(),
        })
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            mem_hits: self.counters.mem_hits.load(Ordering::Relaxed),
            disk_hits: self.counters.disk_hits.load(Ordering::Relaxed),
            misses: self.counters.misses.load(Ordering::Relaxed),
            corrupt: self.counters.corrupt.load(Ordering::Relaxed),
        }
    }

    /// The block if cached for exactly this file version.
    pub fn get(&self, key: &BlockKey, version: u64) -> Option<Arc<Vec<u8>>> {
        {
            let mut mem = lock(&self.mem);
            if let Some((v, data)) = mem.get(key) {
                if *v == version {
                    self.counters.mem_hits.fetch_add(1, Ordering::Relaxed);
                    return Some(data.clone());
                }
                mem.remove(key);
            }
        }
        if let Some(data) = self.disk_get(key, version) {
            self.counters.disk_hits.fetch_add(1, Ordering::Relaxed);
            let data = Arc::new(data);
            let size = data.len() as u64;
            lock(&self.mem).insert(*key, (version, data.clone()), size);
            return Some(data);
        }
        self.counters.misses.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// Whether the block is cached for this version (memory or disk),
    /// without counting a hit or a miss.
    pub fn contains(&self, key: &BlockKey, version: u64) -> bool {
        if lock(&self.mem)
            .map
            .get(key)
            .is_some_and(|e| e.0.0 == version)
        {
            return true;
        }
        self.disk
            .as_ref()
            .is_some_and(|d| lock(&d.index).map.contains_key(key))
    }

    /// Caches a block read at `version`.
    pub fn put(&self, key: BlockKey, version: u64, data: Arc<Vec<u8>>) {
        let size = data.len() as u64;
        lock(&self.mem).insert(key, (version, data.clone()), size);
        if let Err(e) = self.disk_put(&key, version, &data) {
            debug!(error = %e, "disk cache write failed");
        }
    }

    /// Drops blocks `first..=last` of a file, in memory and on disk.
    pub fn invalidate(&self, dev: u64, ino: u64, first: u64, last: u64) {
        {
            let mut mem = lock(&self.mem);
            for key in mem.keys_in(dev, ino, first, last) {
                mem.remove(&key);
            }
        }
        if let Some(d) = &self.disk {
            let keys = lock(&d.index).keys_in(dev, ino, first, last);
            for key in keys {
                if lock(&d.index).remove(&key).is_some() {
                    let _ = fs::remove_file(d.dir.join(file_name(&key)));
                }
            }
        }
    }

    fn disk_get(&self, key: &BlockKey, version: u64) -> Option<Vec<u8>> {
        let d = self.disk.as_ref()?;
        lock(&d.index).get(key)?;
        let path = d.dir.join(file_name(key));
        let raw = fs::read(&path).ok()?;
        let ok = raw.len() >= DISK_HEADER && raw[..4] == DISK_MAGIC && {
            let v = u64::from_le_bytes(raw[4..12].try_into().unwrap_or_default());
            let len = u32::from_le_bytes(raw[12..16].try_into().unwrap_or_default()) as usize;
            let crc = u32::from_le_bytes(raw[16..20].try_into().unwrap_or_default());
            let data = &raw[DISK_HEADER..];
            if v != version {
                // An older version of the file: stale, not corrupt.
                lock(&d.index).remove(key);
                let _ = fs::remove_file(&path);
                return None;
            }
            len == data.len() && entry_crc(v, data) == crc
        };
        if !ok {
            warn!(path = %path.display(), "corrupt cache entry dropped");
            self.counters.corrupt.fetch_add(1, Ordering::Relaxed);
            lock(&d.index).remove(key);
            let _ = fs::remove_file(&path);
            return None;
        }
        Some(raw[DISK_HEADER..].to_vec())
    }

    fn disk_put(&self, key: &BlockKey, version: u64, data: &[u8]) -> io::Result<()> {
        let Some(d) = &self.disk else { return Ok(()) };
        let name = file_name(key);
        let tmp = d.dir.join(format!("tmp.{name}.{}", std::process::id()));
        {
            let mut f = fs::File::create(&tmp)?;
            let mut hdr = Vec::with_capacity(DISK_HEADER);
            hdr.extend_from_slice(&DISK_MAGIC);
            hdr.extend_from_slice(&version.to_le_bytes());
            hdr.extend_from_slice(&(data.len() as u32).to_le_bytes());
            hdr.extend_from_slice(&entry_crc(version, data).to_le_bytes());
            f.write_all(&hdr)?;
            f.write_all(data)?;
        }
        fs::rename(&tmp, d.dir.join(&name))?;
        let evicted = lock(&d.index).insert(*key, (), (DISK_HEADER + data.len()) as u64);
        for (old, ()) in evicted {
            let _ = fs::remove_file(d.dir.join(file_name(&old)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u64) -> BlockKey {
        BlockKey {
            dev: 1,
            ino: 2,
            block: b,
        }
    }

    #[test]
    fn memory_lru_evicts_oldest_and_checks_version() {
        let c = BlockCache::new(3 * 10, None, 0).unwrap();
        for b in 0..3 {
            c.put(key(b), 7, Arc::new(vec![b as u8; 10]));
        }
        assert!(c.get(&key(0), 7).is_some()); // 0 is now the newest
        c.put(key(3), 7, Arc::new(vec![3; 10])); // evicts 1
        assert!(c.get(&key(1), 7).is_none());
        assert_eq!(c.get(&key(0), 7).unwrap()[0], 0);
        assert!(c.get(&key(0), 8).is_none(), "other version must miss");
        assert!(c.get(&key(0), 7).is_none(), "a stale block is dropped");
    }

    #[test]
    fn disk_cache_survives_restart_and_detects_corruption() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = BlockCache::new(1 << 20, Some(dir.path()), 1 << 20).unwrap();
            c.put(key(0), 5, Arc::new(vec![1; 1000]));
            c.put(key(1), 5, Arc::new(vec![2; 1000]));
        }
        // Corrupt block 1 on disk: flip one data byte.
        let p = dir.path().join(file_name(&key(1)));
        let mut raw = fs::read(&p).unwrap();
        raw[DISK_HEADER + 10] ^= 0xff;
        fs::write(&p, raw).unwrap();
        let c = BlockCache::new(1 << 20, Some(dir.path()), 1 << 20).unwrap();
        assert_eq!(*c.get(&key(0), 5).unwrap(), vec![1; 1000]);
        assert!(c.get(&key(1), 5).is_none());
        let s = c.stats();
        assert_eq!((s.disk_hits, s.corrupt, s.misses), (1, 1, 1));
        assert!(!p.exists(), "the corrupt entry is removed");
        // A torn (truncated) entry is corrupt too.
        let p0 = dir.path().join(file_name(&key(0)));
        let raw = fs::read(&p0).unwrap();
        fs::write(&p0, &raw[..raw.len() / 2]).unwrap();
        let c = BlockCache::new(1 << 20, Some(dir.path()), 1 << 20).unwrap();
        assert!(c.get(&key(0), 5).is_none());
        assert_eq!(c.stats().corrupt, 1);
    }

    #[test]
    fn disk_cache_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let entry = (DISK_HEADER + 1000) as u64;
        let c = BlockCache::new(0, Some(dir.path()), 3 * entry).unwrap();
        for b in 0..10 {
            c.put(key(b), 1, Arc::new(vec![0; 1000]));
        }
        let n = fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(n, 3);
        assert!(c.get(&key(9), 1).is_some());
        assert!(c.get(&key(0), 1).is_none());
    }

    #[test]
    fn invalidating_a_huge_range_costs_only_what_is_held() {
        let dir = tempfile::tempdir().unwrap();
        let c = BlockCache::new(1 << 20, Some(dir.path()), 1 << 20).unwrap();
        for b in [0, 5, u64::MAX / BLOCK_SIZE] {
            c.put(key(b), 1, Arc::new(vec![1; 10]));
        }
        let other = BlockKey { ino: 3, ..key(5) };
        c.put(other, 1, Arc::new(vec![1; 10]));
        // Every block index a file of u64::MAX bytes has (2^47 of them).
        c.invalidate(1, 2, 1, u64::MAX / BLOCK_SIZE);
        assert!(c.contains(&key(0), 1));
        assert!(!c.contains(&key(5), 1));
        assert!(!c.contains(&key(u64::MAX / BLOCK_SIZE), 1));
        assert!(c.contains(&other, 1), "another file's block stays");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
        // A small range is looked up block by block.
        c.invalidate(1, 2, 0, 0);
        assert!(!c.contains(&key(0), 1));
    }
}
