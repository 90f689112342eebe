//! The copy-on-write overlay file of a disk, and [`CowDisk`], a read-only
//! base seen through it. The format is described in images/README.md.
//!
//! In short: a 4 KiB header (magic, version, geometry, the identity of the
//! base it was made on, CRC-32), a bitmap with one bit per block (the block
//! is in the overlay), then a data area where disk offset `o` is file offset
//! `data_offset + o` (a sparse file: only written blocks take space).
//!
//! Crash safety: a block's bit is set in memory once its data is written,
//! and on disk only after that data was made durable (`fdatasync`), so a
//! bit on disk never points at data that is not there. Bits only go from 0
//! to 1, so a torn bitmap write leaves each bit old or new, both valid. A
//! write to a block whose bit is not yet on disk reads back, after a crash,
//! as the base: its old contents. Writes to a block already in the overlay
//! go in place: each sector holds its old or its new contents.

use crate::fsutil;
use nix::fcntl::Flock;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// Errors of opening, creating or using an overlay file.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("cannot open the overlay {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the overlay {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the overlay {0} is in use by another process (a running VM?)")]
    InUse(PathBuf),
    #[error("{0} is not a vmplant overlay (bad magic number)")]
    NotOverlay(PathBuf),
    #[error("the overlay {path} has format version {found}, this vmplant reads {VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("the overlay {0} has a corrupted header (checksum mismatch)")]
    Checksum(PathBuf),
    #[error("the overlay {path} has a corrupted header: {what}")]
    BadHeader { path: PathBuf, what: String },
    #[error("the overlay {path} is truncated: {len} bytes, its header says {want}")]
    Truncated { path: PathBuf, len: u64, want: u64 },
    #[error("the overlay {path} was made on {found}, not on {want}")]
    WrongBase {
        path: PathBuf,
        found: String,
        want: String,
    },
    #[error("{what} of {len} bytes at {offset} is past the end of the disk ({capacity} bytes)")]
    OutOfRange {
        what: &'static str,
        offset: u64,
        len: u64,
        capacity: u64,
    },
    #[error("cannot read the base")]
    Base(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the overlay {0} failed to sync earlier and takes no more writes (reopen it)")]
    Failed(PathBuf),
    #[error("overlay I/O failed")]
    Io(#[source] std::io::Error),
}

type Result<T> = std::result::Result<T, OverlayError>;

const MAGIC: [u8; 8] = *b"VMPLOVL\0";
/// The format version this code writes and reads.
pub const VERSION: u32 = 1;
const HEADER_LEN: u64 = 4096;
const NAME_MAX: usize = 256;
/// Bytes of the header the CRC-32 covers; the CRC follows them.
const CRC_AT: usize = 96 + NAME_MAX;
/// The data area starts at a multiple of this.
const DATA_ALIGN: u64 = 1 << 20;
/// Default block size: the unit the overlay tracks and copies up.
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;
/// Blocks written since the last sync after which a write makes them
/// durable and records them on disk without waiting for a flush.
const SYNC_AFTER_BLOCKS: usize = 4096;
const STRIPES: usize = 64;

/// What a base is, as an overlay records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseKind {
    /// A raw file, identified by its size.
    Raw = 1,
    /// An image of a store, identified by its top layer.
    Image = 2,
}

/// The base an overlay was made on: opening it on another one is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseIdentity {
    pub kind: BaseKind,
    /// The top layer's id (images), zeros for a raw file.
    pub id: [u8; 32],
    /// The base's size in bytes: the disk's capacity.
    pub size: u64,
    /// The image's name or the raw file's path (for messages only).
    pub name: String,
}

impl std::fmt::Display for BaseIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            BaseKind::Raw => write!(f, "a raw base of {} bytes ({})", self.size, self.name),
            BaseKind::Image => write!(
                f,
                "image {} at layer {}",
                self.name,
                blake3::Hash::from_bytes(self.id).to_hex()
            ),
        }
    }
}

impl BaseIdentity {
    fn same_base(&self, other: &BaseIdentity) -> bool {
        self.kind == other.kind && self.id == other.id && self.size == other.size
    }
}

/// An overlay file's header.
#[derive(Debug, Clone)]
pub struct Header {
    pub block_size: u32,
    pub capacity: u64,
    pub bitmap_offset: u64,
    pub bitmap_len: u64,
    pub data_offset: u64,
    pub base: BaseIdentity,
}

impl Header {
    fn new(base: BaseIdentity, block_size: u32) -> Header {
        let blocks = base.size.div_ceil(u64::from(block_size));
        let bitmap_len = blocks.div_ceil(64) * 8;
        let data_offset = (HEADER_LEN + bitmap_len).div_ceil(DATA_ALIGN) * DATA_ALIGN;
        Header {
            block_size,
            capacity: base.size,
            bitmap_offset: HEADER_LEN,
            bitmap_len,
            data_offset,
            base,
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN as usize];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.block_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.capacity.to_le_bytes());
        b[24..32].copy_from_slice(&self.bitmap_offset.to_le_bytes());
        b[32..40].copy_from_slice(&self.bitmap_len.to_le_bytes());
        b[40..48].copy_from_slice(&self.data_offset.to_le_bytes());
        b[48..52].copy_from_slice(&(self.base.kind as u32).to_le_bytes());
        let name = truncate_utf8(&self.base.name, NAME_MAX);
        b[52..56].copy_from_slice(&(name.len() as u32).to_le_bytes());
        b[56..88].copy_from_slice(&self.base.id);
        b[88..96].copy_from_slice(&self.base.size.to_le_bytes());
        b[96..96 + name.len()].copy_from_slice(name.as_bytes());
        let crc = crc32fast::hash(&b[..CRC_AT]);
        b[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(path: &Path, b: &[u8]) -> Result<Header> {
        let bad = |what: &str| OverlayError::BadHeader {
            path: path.to_path_buf(),
            what: what.to_string(),
        };
        if b.len() < HEADER_LEN as usize || b[0..8] != MAGIC {
            return Err(OverlayError::NotOverlay(path.to_path_buf()));
        }
        let u32_at = |at: usize| {
            let mut x = [0u8; 4];
            x.copy_from_slice(&b[at..at + 4]);
            u32::from_le_bytes(x)
        };
        let u64_at = |at: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(x)
        };
        let version = u32_at(8);
        if version != VERSION {
            return Err(OverlayError::Version {
                path: path.to_path_buf(),
                found: version,
            });
        }
        if crc32fast::hash(&b[..CRC_AT]) != u32_at(CRC_AT) {
            return Err(OverlayError::Checksum(path.to_path_buf()));
        }
        let kind = match u32_at(48) {
            1 => BaseKind::Raw,
            2 => BaseKind::Image,
            _ => return Err(bad("unknown base kind")),
        };
        let name_len = u32_at(52) as usize;
        if name_len > NAME_MAX {
            return Err(bad("base name too long"));
        }
        let name = std::str::from_utf8(&b[96..96 + name_len])
            .map_err(|_| bad("base name is not UTF-8"))?
            .to_string();
        let mut id = [0u8; 32];
        id.copy_from_slice(&b[56..88]);
        let base = BaseIdentity {
            kind,
            id,
            size: u64_at(88),
            name,
        };
        let block_size = u32_at(12);
        if !(512..=(1 << 20)).contains(&block_size) || !block_size.is_power_of_two() {
            return Err(bad("block size is not a power of two from 512 to 1 MiB"));
        }
        let want = Header::new(base, block_size);
        let h = Header {
            block_size,
            capacity: u64_at(16),
            bitmap_offset: u64_at(24),
            bitmap_len: u64_at(32),
            data_offset: u64_at(40),
            base: want.base.clone(),
        };
        if h.capacity != want.capacity
            || h.bitmap_offset != want.bitmap_offset
            || h.bitmap_len != want.bitmap_len
            || h.data_offset != want.data_offset
        {
            return Err(bad("geometry does not match the capacity"));
        }
        if h.data_offset.checked_add(h.capacity).is_none() {
            return Err(bad("capacity too large"));
        }
        Ok(h)
    }

    fn file_len(&self) -> u64 {
        self.data_offset + self.capacity
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Creates an empty overlay file for `base` (refusing to replace one):
/// written under a temporary name, synced and renamed into place.
pub fn create(path: &Path, base: BaseIdentity, block_size: u32) -> Result<()> {
    let err = |source| OverlayError::Create {
        path: path.to_path_buf(),
        source,
    };
    if !block_size.is_power_of_two() || !(512..=(1 << 20)).contains(&block_size) {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the block size must be a power of two from 512 to 1 MiB",
        )));
    }
    let header = Header::new(base, block_size);
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        path.file_name()
            .map_or_else(Default::default, |n| n.to_string_lossy()),
        std::process::id()
    ));
    let res = (|| {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all_at(&header.encode(), 0)?;
        f.set_len(header.file_len())?;
        f.sync_all()?;
        // Never replace an overlay someone else just made.
        std::fs::hard_link(&tmp, path)?;
        std::fs::remove_file(&tmp)?;
        fsutil::sync_parent(path)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.map_err(err)
}

/// Bits set in memory and not yet on disk.
#[derive(Default)]
struct Pending {
    /// Bitmap word index -> the bits of it to add.
    words: std::collections::BTreeMap<usize, u64>,
    blocks: usize,
}

/// An open overlay file, locked against every other process.
pub struct Overlay {
    path: PathBuf,
    file: Flock<File>,
    header: Header,
    /// Blocks in the overlay, as this process sees them.
    present: Vec<AtomicU64>,
    /// Blocks set in `present` whose bit is not on disk yet.
    pending: Mutex<Pending>,
    /// The bitmap as on disk (bits only for data made durable first).
    durable: Mutex<Vec<u64>>,
    /// Set by a failed sync: writes and flushes are refused from then on.
    failed: std::sync::atomic::AtomicBool,
    /// Serialise copy-ups of a block with other writes to it while it is
    /// not in the overlay (block index modulo STRIPES).
    stripes: Vec<Mutex<()>>,
}

impl Overlay {
    /// Opens an overlay, checking that it was made on `base` when given.
    pub fn open(path: &Path, base: Option<&BaseIdentity>) -> Result<Overlay> {
        let open_err = |source| OverlayError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(open_err)?;
        let file = fsutil::try_lock(file, fsutil::LockKind::Exclusive)
            .map_err(open_err)?
            .ok_or_else(|| OverlayError::InUse(path.to_path_buf()))?;
        let len = file.metadata().map_err(open_err)?.len();
        if len < HEADER_LEN {
            return Err(if len < 8 {
                OverlayError::NotOverlay(path.to_path_buf())
            } else {
                OverlayError::Truncated {
                    path: path.to_path_buf(),
                    len,
                    want: HEADER_LEN,
                }
            });
        }
        let mut hb = vec![0u8; HEADER_LEN as usize];
        file.read_exact_at(&mut hb, 0).map_err(open_err)?;
        let header = Header::decode(path, &hb)?;
        if len < header.file_len() {
            return Err(OverlayError::Truncated {
                path: path.to_path_buf(),
                len,
                want: header.file_len(),
            });
        }
        match base {
            Some(want) if !header.base.same_base(want) => {
                return Err(OverlayError::WrongBase {
                    path: path.to_path_buf(),
                    found: header.base.to_string(),
                    want: want.to_string(),
                });
            }
            _ => {}
        }
        let mut bm = vec![0u8; header.bitmap_len as usize];
        file.read_exact_at(&mut bm, header.bitmap_offset)
            .map_err(open_err)?;
        let words: Vec<u64> = bm
            .chunks_exact(8)
            .map(|w| {
                let mut x = [0u8; 8];
                x.copy_from_slice(w);
                u64::from_le_bytes(x)
            })
            .collect();
        Ok(Overlay {
            path: path.to_path_buf(),
            file,
            present: words.iter().map(|&w| AtomicU64::new(w)).collect(),
            durable: Mutex::new(words),
            pending: Mutex::new(Pending::default()),
            header,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            failed: Default::default(),
        })
    }

    /// Opens the overlay at `path` made on `base`, creating it if missing.
    pub fn open_or_create(path: &Path, base: &BaseIdentity, block_size: u32) -> Result<Overlay> {
        match std::fs::symlink_metadata(path) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                match create(path, base.clone(), block_size) {
                    Ok(()) => {}
                    // Made meanwhile by another process: open theirs.
                    Err(OverlayError::Create { source, .. })
                        if source.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(e),
                }
            }
            Err(source) => {
                return Err(OverlayError::Open {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
        Overlay::open(path, Some(base))
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn block_size(&self) -> u64 {
        u64::from(self.header.block_size)
    }

    pub fn blocks(&self) -> u64 {
        self.header.capacity.div_ceil(self.block_size())
    }

    /// Whether block `b` is in the overlay.
    pub fn is_present(&self, b: u64) -> bool {
        let w = &self.present[(b / 64) as usize];
        w.load(Ordering::Acquire) & (1 << (b % 64)) != 0
    }

    /// Blocks in the overlay, in order.
    pub fn present_blocks(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.blocks()).filter(|&b| self.is_present(b))
    }

    /// Locks the stripes of blocks `first..end`, in the order of their
    /// index (the one order every thread takes them in: no deadlock).
    fn lock_stripes(&self, first: u64, end: u64) -> Vec<MutexGuard<'_, ()>> {
        let mut idx: Vec<usize> = if end - first >= STRIPES as u64 {
            (0..STRIPES).collect()
        } else {
            (first..end)
                .map(|b| (b % STRIPES as u64) as usize)
                .collect()
        };
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter().map(|i| lock(&self.stripes[i])).collect()
    }

    /// Bytes of disk block `b` (the last one may be short).
    fn block_len(&self, b: u64) -> u64 {
        let bs = self.block_size();
        (self.header.capacity - b * bs).min(bs)
    }

    /// Records that blocks `first..end` hold their data; call after the
    /// write. Their bits go to disk with the next sync.
    fn mark(&self, first: u64, end: u64) -> Result<()> {
        let mut newly: Vec<(usize, u64)> = Vec::new();
        let mut b = first;
        while b < end {
            // The bits of this word in the run.
            let w = (b / 64) as usize;
            let lo = b % 64;
            let hi = (end - (b - lo)).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            let old = self.present[w].fetch_or(mask, Ordering::AcqRel);
            if old & mask != mask {
                newly.push((w, mask & !old));
            }
            b += hi - lo;
        }
        if newly.is_empty() {
            return Ok(());
        }
        let many = {
            let mut p = lock(&self.pending);
            for (w, bits) in newly {
                p.blocks += bits.count_ones() as usize;
                *p.words.entry(w).or_insert(0) |= bits;
            }
            p.blocks >= SYNC_AFTER_BLOCKS
        };
        if many { self.persist(false) } else { Ok(()) }
    }

    /// Makes written data durable, then records the blocks written since
    /// the last time in the bitmap on disk; with `flush`, makes that
    /// durable too.
    pub fn persist(&self, flush: bool) -> Result<()> {
        let res = self.try_persist(flush);
        if res.is_err() {
            // After a failed fdatasync the kernel may have dropped the
            // data: never record bits for it, take no more writes.
            self.failed.store(true, Ordering::Release);
        }
        res
    }

    fn check_usable(&self) -> Result<()> {
        if self.failed.load(Ordering::Acquire) {
            return Err(OverlayError::Failed(self.path.clone()));
        }
        Ok(())
    }

    fn try_persist(&self, flush: bool) -> Result<()> {
        self.check_usable()?;
        let mut durable = lock(&self.durable);
        let batch = std::mem::take(&mut *lock(&self.pending));
        if batch.words.is_empty() && !flush {
            return Ok(());
        }
        self.file.sync_data().map_err(OverlayError::Io)?;
        if batch.words.is_empty() {
            return Ok(());
        }
        // 512 words to a 4 KiB page of the bitmap.
        let mut pages: Vec<usize> = Vec::new();
        for (&w, &bits) in &batch.words {
            durable[w] |= bits;
            if pages.last() != Some(&(w / 512)) {
                pages.push(w / 512);
            }
        }
        let mut bytes = Vec::with_capacity(4096);
        for page in pages {
            let first = page * 512;
            let last = (first + 512).min(durable.len());
            bytes.clear();
            for w in &durable[first..last] {
                bytes.extend_from_slice(&w.to_le_bytes());
            }
            self.file
                .write_all_at(&bytes, self.header.bitmap_offset + page as u64 * 4096)
                .map_err(OverlayError::Io)?;
        }
        if flush {
            self.file.sync_data().map_err(OverlayError::Io)?;
        }
        Ok(())
    }

    fn read_data(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file
            .read_exact_at(buf, self.header.data_offset + offset)
            .map_err(OverlayError::Io)
    }

    fn write_data(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_usable()?;
        self.file
            .write_all_at(buf, self.header.data_offset + offset)
            .map_err(OverlayError::Io)
    }

    /// Makes `len` bytes of the data area at disk offset `offset` read as
    /// zeros, freeing their space where the file system can.
    fn zero_data(&self, offset: u64, len: u64) -> Result<()> {
        use nix::fcntl::{FallocateFlags, fallocate};
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        self.check_usable()?;
        let at = self.header.data_offset + offset;
        let punched = i64::try_from(at)
            .ok()
            .zip(i64::try_from(len).ok())
            .is_some_and(|(a, l)| fallocate(&*self.file, flags, a, l).is_ok());
        if punched {
            return Ok(());
        }
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64);
            self.write_data(&zeros[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        if let Err(e) = self.persist(false) {
            tracing::warn!(
                "overlay {}: cannot record the last writes: {e}",
                self.path.display()
            );
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The read-only base under an overlay.
pub trait BaseRead: Send + Sync {
    /// Fills `buf` with the base's bytes at `offset` (within its size).
    fn read_base(
        &self,
        buf: &mut [u8],
        offset: u64,
    ) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;
}

/// Merges a write into a copied-up block spanning the given disk range.
type Merge<'a> = &'a dyn Fn(&mut [u8], (u64, u64));

/// A disk: a read-only base seen through an overlay that takes its writes.
/// Every method takes `&self`; threads share it.
pub struct CowDisk<B> {
    overlay: Overlay,
    base: B,
}

impl<B: BaseRead> CowDisk<B> {
    pub fn new(overlay: Overlay, base: B) -> CowDisk<B> {
        CowDisk { overlay, base }
    }

    pub fn overlay(&self) -> &Overlay {
        &self.overlay
    }

    pub fn base(&self) -> &B {
        &self.base
    }

    pub fn capacity(&self) -> u64 {
        self.overlay.header.capacity
    }

    fn check(&self, what: &'static str, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.capacity() => Ok(()),
            _ => Err(OverlayError::OutOfRange {
                what,
                offset,
                len,
                capacity: self.capacity(),
            }),
        }
    }

    fn read_base(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.base.read_base(buf, offset).map_err(OverlayError::Base)
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check("a read", offset, buf.len() as u64)?;
        let bs = self.overlay.block_size();
        let end = offset + buf.len() as u64;
        let mut at = offset;
        while at < end {
            // The longest run of blocks from `at` in the same place.
            let present = self.overlay.is_present(at / bs);
            let mut run_end = ((at / bs) + 1) * bs;
            while run_end < end && self.overlay.is_present(run_end / bs) == present {
                run_end += bs;
            }
            let run_end = run_end.min(end);
            let part = &mut buf[(at - offset) as usize..(run_end - offset) as usize];
            if present {
                self.overlay.read_data(part, at)?;
            } else {
                self.read_base(part, at)?;
            }
            at = run_end;
        }
        Ok(())
    }

    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check("a write", offset, buf.len() as u64)?;
        self.write_blocks(
            offset,
            buf.len() as u64,
            &|part, at| {
                self.overlay
                    .write_data(&buf[(at - offset) as usize..][..part as usize], at)
            },
            &|block, within| {
                let start = offset.max(within.0);
                let end = (offset + buf.len() as u64).min(within.1);
                block[(start - within.0) as usize..(end - within.0) as usize]
                    .copy_from_slice(&buf[(start - offset) as usize..(end - offset) as usize]);
            },
        )
    }

    /// Writes `[offset, offset + len)`: whole blocks through `whole(len,
    /// at)`, parts of blocks not yet in the overlay by copying the block up
    /// from the base and merging with `merge(block, (start, end))`, parts
    /// of blocks already there through `whole` as well.
    fn write_blocks(
        &self,
        offset: u64,
        len: u64,
        whole: &dyn Fn(u64, u64) -> Result<()>,
        merge: Merge<'_>,
    ) -> Result<()> {
        let bs = self.overlay.block_size();
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let b = at / bs;
            let b_start = b * bs;
            let b_end = b_start + self.overlay.block_len(b);
            if at == b_start && end >= b_end {
                // A run of whole blocks: written in place, then marked.
                let mut run_end = b_end;
                while run_end < end {
                    let next = run_end / bs;
                    let next_end = run_end + self.overlay.block_len(next);
                    if next_end > end {
                        break;
                    }
                    run_end = next_end;
                }
                let blocks_end = run_end.div_ceil(bs);
                // A copy-up of one of these blocks racing with this write
                // would put the base back over it: hold their stripes
                // while any is not in the overlay yet.
                let _stripes = if (b..blocks_end).all(|x| self.overlay.is_present(x)) {
                    Vec::new()
                } else {
                    self.overlay.lock_stripes(b, blocks_end)
                };
                whole(run_end - at, at)?;
                self.overlay.mark(b, blocks_end)?;
                at = run_end;
                continue;
            }
            let part_end = end.min(b_end);
            if self.overlay.is_present(b) {
                whole(part_end - at, at)?;
            } else {
                let _copy_up = self.overlay.lock_stripes(b, b + 1);
                if self.overlay.is_present(b) {
                    whole(part_end - at, at)?;
                } else {
                    let mut block = vec![0u8; (b_end - b_start) as usize];
                    self.read_base(&mut block, b_start)?;
                    merge(&mut block, (b_start, b_end));
                    self.overlay.write_data(&block, b_start)?;
                    self.overlay.mark(b, b + 1)?;
                }
            }
            at = part_end;
        }
        Ok(())
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> Result<()> {
        self.overlay.persist(true)
    }

    /// Makes `[offset, offset + len)` read as zeros.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check("write-zeroes", offset, len)?;
        self.write_blocks(
            offset,
            len,
            &|part, at| self.overlay.zero_data(at, part),
            &|block, within| {
                let start = offset.max(within.0);
                let end = (offset + len).min(within.1);
                block[(start - within.0) as usize..(end - within.0) as usize].fill(0);
            },
        )
    }

    /// Discards `[offset, offset + len)`: it reads as zeros afterwards (the
    /// base's data there is hidden, the overlay's space freed).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check("a discard", offset, len)?;
        self.write_zeroes(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct VecBase(Vec<u8>);

    impl BaseRead for VecBase {
        fn read_base(
            &self,
            buf: &mut [u8],
            offset: u64,
        ) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>> {
            let at = offset as usize;
            buf.copy_from_slice(&self.0[at..at + buf.len()]);
            Ok(())
        }
    }

    fn identity(size: u64) -> BaseIdentity {
        BaseIdentity {
            kind: BaseKind::Raw,
            id: [0; 32],
            size,
            name: "test".into(),
        }
    }

    fn disk(path: &Path, base: &[u8]) -> CowDisk<VecBase> {
        let ov = Overlay::open_or_create(path, &identity(base.len() as u64), 4096).unwrap();
        CowDisk::new(ov, VecBase(base.to_vec()))
    }

    #[test]
    fn header_round_trip() {
        let h = Header::new(identity(12345), 4096);
        let d = Header::decode(Path::new("x"), &h.encode()).unwrap();
        assert_eq!(d.capacity, 12345);
        assert_eq!(d.bitmap_len, 8);
        assert_eq!(d.data_offset, 1 << 20);
        assert_eq!(d.base, h.base);
        let dir = tempfile::tempdir().unwrap();
        let err = create(&dir.path().join("o"), identity(10), 1000).unwrap_err();
        assert!(matches!(err, OverlayError::Create { .. }), "{err}");
    }

    #[test]
    fn short_last_block_and_marks_across_words() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o");
        // 200 blocks and 100 bytes.
        let base: Vec<u8> = (0..200 * 4096 + 100).map(|i| (i % 251) as u8).collect();
        let mut want = base.clone();
        {
            let d = disk(&path, &base);
            d.write_at(&vec![1u8; 70 * 4096], 60 * 4096).unwrap();
            want[60 * 4096..130 * 4096].fill(1);
            d.write_at(&[2u8; 50], 200 * 4096 + 20).unwrap();
            want[200 * 4096 + 20..200 * 4096 + 70].fill(2);
            let present: Vec<u64> = d.overlay().present_blocks().collect();
            let mut expect: Vec<u64> = (60..130).collect();
            expect.push(200);
            assert_eq!(present, expect);
            let mut buf = vec![0u8; base.len()];
            d.read_at(&mut buf, 0).unwrap();
            assert!(buf == want);
            assert!(d.write_at(&[0u8; 101], 200 * 4096).is_err());
        }
        // Closed without a flush: the bits were recorded on close.
        let d = disk(&path, &base);
        assert_eq!(d.overlay().present_blocks().count(), 71);
        let mut buf = vec![0u8; base.len()];
        d.read_at(&mut buf, 0).unwrap();
        assert!(buf == want);
    }

    #[test]
    fn large_discard_hides_the_base() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o");
        let base = vec![9u8; 10_000 * 4096];
        {
            let d = disk(&path, &base);
            d.discard(100, base.len() as u64 - 200).unwrap();
            d.flush().unwrap();
        }
        let d = disk(&path, &base);
        let mut buf = vec![1u8; base.len()];
        d.read_at(&mut buf, 0).unwrap();
        assert!(buf[..100].iter().all(|&b| b == 9));
        assert!(buf[100..base.len() - 100].iter().all(|&b| b == 0));
        assert!(buf[base.len() - 100..].iter().all(|&b| b == 9));
        // The data area stayed sparse.
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&path).unwrap().blocks();
        assert!(blocks * 512 < 4 << 20, "{blocks} blocks allocated");
    }
}
