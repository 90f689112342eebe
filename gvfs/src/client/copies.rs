//! Whole-file local copies. Every block a reader gets (from the server or
//! the block cache) is also written at its offset into an unnamed local
//! file (`O_TMPFILE`) for that file's version; once every block of the
//! version is there, the copy is complete and [`Copies::complete`] hands
//! it out. The host FUSE mount gives a complete copy to the kernel as the
//! backing file of a passthrough open, so reads of an unchanged file are
//! plain reads of a local file (its page cache, its large folios) and never
//! reach the daemon.
//!
//! The writes are made by a thread of their own, off the read path (the
//! queue is bounded: a reader waits for room rather than a block being
//! lost).
//!
//! A copy belongs to one version (size, mtime, ctime): `open` asks the
//! server for the version and takes a copy only if it is that version, so
//! close-to-open consistency is the same as for the block cache. Writes
//! and attribute changes through this client drop the copy. The copies
//! are bounded in bytes (least recently used goes first); being unnamed
//! files, they are gone with the process.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use tracing::debug;

use super::cache::BLOCK_SIZE;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One version of one file being copied (or copied in full).
struct Copy {
    version: u64,
    size: u64,
    file: Arc<File>,
    fill: Mutex<Fill>,
}

struct Fill {
    /// One bit per block written.
    have: Vec<u64>,
    /// One bit per block handed to the writer.
    queued: Vec<u64>,
    count: u64,
    /// A write failed: the copy is never complete.
    broken: bool,
    /// When a block was last recorded.
    touched: Instant,
}

impl Fill {
    fn new(blocks: u64) -> Fill {
        Fill {
            have: vec![0; blocks.div_ceil(64) as usize],
            queued: vec![0; blocks.div_ceil(64) as usize],
            count: 0,
            broken: false,
            touched: Instant::now(),
        }
    }
}

/// A copy still being filled is not evicted for another one unless no
/// block came for this long (two readers of large files would otherwise
/// take each other's room block by block, and neither copy would end).
const IDLE: Duration = Duration::from_secs(5);

/// Evicts least recently used copies (complete ones, or ones left idle)
/// until `size` more bytes fit in `budget`; false if they cannot.
fn make_room(g: &mut Inner, size: u64, budget: u64) -> bool {
    if size > budget {
        return false;
    }
    while g.used.saturating_add(size) > budget {
        let victim = g
            .map
            .iter()
            .filter(|(_, (c, _))| {
                let fill = lock(&c.fill);
                fill.broken
                    || fill.count == c.size.div_ceil(BLOCK_SIZE)
                    || fill.touched.elapsed() > IDLE
            })
            .min_by_key(|(_, (_, t))| *t)
            .map(|(k, _)| *k);
        let Some(victim) = victim else {
            return false;
        };
        if let Some((old, _)) = g.map.remove(&victim) {
            g.used -= old.size;
        }
    }
    true
}

struct Inner {
    /// By the server's (dev, ino).
    map: HashMap<(u64, u64), (Arc<Copy>, u64)>,
    used: u64,
    tick: u64,
    /// The directory does not take unnamed files: no copies at all.
    disabled: bool,
}

/// Work for the writer thread.
enum Job {
    Write {
        copy: Arc<Copy>,
        block: u64,
        data: Arc<Vec<u8>>,
    },
    /// Answered once everything queued before it is written.
    Flush(mpsc::Sender<()>),
}

/// Blocks queued for writing at most (32 MiB of 128 KiB blocks).
const QUEUE: usize = 256;

/// The whole-file copies of one client.
pub(crate) struct Copies {
    dir: PathBuf,
    budget: u64,
    inner: Mutex<Inner>,
    /// To the writer thread, which ends when this goes.
    jobs: Mutex<Option<mpsc::SyncSender<Job>>>,
}

/// The writer thread: writes queued blocks into their copies.
fn write_blocks(jobs: mpsc::Receiver<Job>) {
    for job in jobs {
        let (c, block, data) = match job {
            Job::Write { copy, block, data } => (copy, block, data),
            Job::Flush(done) => {
                let _ = done.send(());
                continue;
            }
        };
        let res = c.file.write_all_at(&data, block * BLOCK_SIZE);
        let (word, bit) = ((block / 64) as usize, 1u64 << (block % 64));
        let mut fill = lock(&c.fill);
        match res {
            Ok(()) if fill.have[word] & bit == 0 => {
                fill.have[word] |= bit;
                fill.count += 1;
            }
            Ok(()) => {}
            Err(e) => {
                debug!(error = %e, "whole-file copy write failed");
                fill.broken = true;
            }
        }
    }
}

impl Copies {
    /// The most bytes all copies may hold (and so one copy).
    pub(crate) fn budget(&self) -> u64 {
        self.budget
    }

    /// Copies in `dir` (unnamed files), at most `budget` bytes in all.
    pub(crate) fn new(dir: PathBuf, budget: u64) -> Copies {
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let jobs = std::thread::Builder::new()
            .name("gvfs-copies".into())
            .spawn(move || write_blocks(rx))
            .map(|_| tx)
            .map_err(|e| debug!(error = %e, "no whole-file copy writer"))
            .ok();
        Copies {
            dir,
            budget,
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                used: 0,
                tick: 0,
                disabled: jobs.is_none(),
            }),
            jobs: Mutex::new(jobs),
        }
    }

    /// Waits until every block queued so far is written.
    pub(crate) fn flush(&self) {
        let (tx, rx) = mpsc::channel();
        let jobs = lock(&self.jobs).clone();
        if let Some(jobs) = jobs
            && jobs.send(Job::Flush(tx)).is_ok()
        {
            let _ = rx.recv();
        }
    }

    /// The copy of `(dev, ino)` at `version`, made if there is none (and
    /// room for one); an older version's copy is dropped.
    fn copy_for(&self, dev: u64, ino: u64, version: u64, size: u64) -> Option<Arc<Copy>> {
        let mut g = lock(&self.inner);
        if g.disabled {
            return None;
        }
        g.tick += 1;
        let tick = g.tick;
        if let Some((c, used_at)) = g.map.get_mut(&(dev, ino))
            && c.version == version
            && c.size == size
        {
            *used_at = tick;
            return Some(c.clone());
        }
        if let Some((old, _)) = g.map.remove(&(dev, ino)) {
            g.used -= old.size;
        }
        if !make_room(&mut g, size, self.budget) {
            return None;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
            .open(&self.dir)
            .and_then(|f| f.set_len(size).map(|()| f));
        let file = match file {
            Ok(f) => f,
            Err(e) => {
                debug!(dir = %self.dir.display(), error = %e, "no whole-file copies");
                g.disabled = true;
                return None;
            }
        };
        let blocks = size.div_ceil(BLOCK_SIZE);
        let c = Arc::new(Copy {
            version,
            size,
            file: Arc::new(file),
            fill: Mutex::new(Fill::new(blocks)),
        });
        g.used += size;
        g.map.insert((dev, ino), (c.clone(), tick));
        Some(c)
    }

    /// Block `block` of `(dev, ino)` at `version` (a file of `size` bytes)
    /// holds `data`: queues it for writing into the copy. Blocks of the
    /// wrong length are not taken.
    pub(crate) fn record(
        &self,
        dev: u64,
        ino: u64,
        version: u64,
        size: u64,
        block: u64,
        data: &Arc<Vec<u8>>,
    ) {
        let start = block * BLOCK_SIZE;
        if size == 0 || size > self.budget || start >= size {
            return;
        }
        if data.len() as u64 != (size - start).min(BLOCK_SIZE) {
            return;
        }
        let (word, bit) = ((block / 64) as usize, 1u64 << (block % 64));
        if let Some((c, _)) = lock(&self.inner).map.get(&(dev, ino))
            && c.version == version
            && c.size == size
            && lock(&c.fill).queued[word] & bit != 0
        {
            return;
        }
        let Some(c) = self.copy_for(dev, ino, version, size) else {
            return;
        };
        {
            let mut fill = lock(&c.fill);
            if fill.queued[word] & bit != 0 {
                return;
            }
            fill.queued[word] |= bit;
            fill.touched = Instant::now();
        }
        let jobs = lock(&self.jobs).clone();
        if let Some(jobs) = jobs {
            // Waits while the queue is full.
            let _ = jobs.send(Job::Write {
                copy: c,
                block,
                data: data.clone(),
            });
        }
    }

    /// The complete copy of `(dev, ino)` at `version`, if there is one.
    pub(crate) fn complete(&self, dev: u64, ino: u64, version: u64) -> Option<Arc<File>> {
        let mut g = lock(&self.inner);
        g.tick += 1;
        let tick = g.tick;
        let (c, used_at) = g.map.get_mut(&(dev, ino))?;
        if c.version != version {
            return None;
        }
        let fill = lock(&c.fill);
        if fill.broken || fill.count != c.size.div_ceil(BLOCK_SIZE) {
            return None;
        }
        *used_at = tick;
        Some(c.file.clone())
    }

    /// `file` now holds all `size` bytes of `(dev, ino)` at `version`:
    /// it becomes that version's complete copy.
    pub(crate) fn adopt(&self, dev: u64, ino: u64, version: u64, size: u64, file: Arc<File>) {
        let mut g = lock(&self.inner);
        if let Some((old, _)) = g.map.remove(&(dev, ino)) {
            g.used -= old.size;
        }
        if size == 0 || !make_room(&mut g, size, self.budget) {
            return;
        }
        let blocks = size.div_ceil(BLOCK_SIZE);
        let mut have = vec![u64::MAX; blocks.div_ceil(64) as usize];
        if !blocks.is_multiple_of(64)
            && let Some(last) = have.last_mut()
        {
            *last = (1 << (blocks % 64)) - 1;
        }
        g.tick += 1;
        let tick = g.tick;
        g.used += size;
        let c = Copy {
            version,
            size,
            file,
            fill: Mutex::new(Fill {
                queued: have.clone(),
                have,
                count: blocks,
                broken: false,
                touched: Instant::now(),
            }),
        };
        g.map.insert((dev, ino), (Arc::new(c), tick));
    }

    /// Drops the copy of `(dev, ino)` (the file changed). Files already
    /// handed out stay open for their holders.
    pub(crate) fn invalidate(&self, dev: u64, ino: u64) {
        let mut g = lock(&self.inner);
        if let Some((old, _)) = g.map.remove(&(dev, ino)) {
            g.used -= old.size;
        }
    }

    /// Bytes held by copies (complete or not).
    pub(crate) fn used(&self) -> u64 {
        lock(&self.inner).used
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(len: usize, v: u8) -> Arc<Vec<u8>> {
        Arc::new(vec![v; len])
    }

    #[test]
    fn complete_only_when_every_block_of_the_version_is_there() {
        let dir = tempfile::tempdir().unwrap();
        let c = Copies::new(dir.path().to_path_buf(), 1 << 30);
        let size = 2 * BLOCK_SIZE + 10;
        c.record(1, 2, 7, size, 0, &block(BLOCK_SIZE as usize, 1));
        c.record(1, 2, 7, size, 2, &block(10, 3));
        c.flush();
        assert!(c.complete(1, 2, 7).is_none());
        // A short block (the file changed) is not taken.
        c.record(1, 2, 7, size, 1, &block(5, 2));
        c.flush();
        assert!(c.complete(1, 2, 7).is_none());
        c.record(1, 2, 7, size, 1, &block(BLOCK_SIZE as usize, 2));
        c.flush();
        let f = c.complete(1, 2, 7).expect("complete");
        assert!(c.complete(1, 2, 8).is_none(), "another version");
        let mut got = vec![0u8; size as usize];
        f.read_exact_at(&mut got, 0).unwrap();
        assert!(got[..BLOCK_SIZE as usize].iter().all(|&b| b == 1));
        assert!(
            got[BLOCK_SIZE as usize..2 * BLOCK_SIZE as usize]
                .iter()
                .all(|&b| b == 2)
        );
        assert!(got[2 * BLOCK_SIZE as usize..].iter().all(|&b| b == 3));
        assert_eq!(f.metadata().unwrap().len(), size);
        // A new version starts over.
        c.record(1, 2, 8, size, 0, &block(BLOCK_SIZE as usize, 9));
        c.flush();
        assert!(c.complete(1, 2, 7).is_none());
        assert!(c.complete(1, 2, 8).is_none());
        c.invalidate(1, 2);
        assert_eq!(c.used(), 0);
        // Nothing is left in the directory: the copies are unnamed.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn bounded_least_recently_used_first() {
        let dir = tempfile::tempdir().unwrap();
        let c = Copies::new(dir.path().to_path_buf(), 2 * BLOCK_SIZE);
        let one = block(BLOCK_SIZE as usize, 1);
        c.record(1, 1, 1, BLOCK_SIZE, 0, &one);
        c.record(1, 2, 1, BLOCK_SIZE, 0, &one);
        c.flush();
        assert!(c.complete(1, 1, 1).is_some());
        // A third file evicts the least recently used (file 2).
        c.record(1, 3, 1, BLOCK_SIZE, 0, &one);
        c.flush();
        assert!(c.complete(1, 1, 1).is_some());
        assert!(c.complete(1, 2, 1).is_none());
        assert!(c.complete(1, 3, 1).is_some());
        assert_eq!(c.used(), 2 * BLOCK_SIZE);
        // A copy being filled is not evicted for another one.
        c.record(1, 5, 1, 2 * BLOCK_SIZE, 0, &one);
        c.flush();
        assert!(c.complete(1, 1, 1).is_none(), "complete ones go first");
        c.record(1, 6, 1, 2 * BLOCK_SIZE, 0, &one);
        c.record(1, 6, 1, 2 * BLOCK_SIZE, 1, &one);
        c.flush();
        assert!(c.complete(1, 6, 1).is_none(), "file 5 is being filled");
        c.record(1, 5, 1, 2 * BLOCK_SIZE, 1, &one);
        c.flush();
        assert!(c.complete(1, 5, 1).is_some());
        // Larger than the whole budget: never copied.
        c.record(1, 4, 1, 3 * BLOCK_SIZE, 0, &one);
        c.flush();
        assert!(c.complete(1, 5, 1).is_some());
        assert_eq!(c.used(), 2 * BLOCK_SIZE);
    }
}
