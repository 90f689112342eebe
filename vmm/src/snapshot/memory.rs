//! The snapshot's `memory` file: guest RAM, the regions one after the
//! other, as a sparse file, then a trailer page naming its snapshot.
//! Pages of zeros (which pages never touched read as) are left as holes,
//! so a 4 GiB guest that used 100 MiB writes about 100 MiB. A restore maps the file
//! `MAP_PRIVATE`: pages load on first touch and are copy-on-write, so all
//! VMs restored from one snapshot share the pages they have not written.
//!
//! Guest memory goes to the file with `O_DIRECT` where the file system
//! takes it: straight from guest memory to the disk, without filling the
//! page cache first. On this kind of host that writes and syncs 64 MiB in
//! about 35 ms, against 80-210 ms through the page cache (whose new
//! pages are what costs). Where `O_DIRECT` is refused, writes go through
//! the page cache.

use devices::virtio::GuestMemoryMmap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

const PAGE: usize = 4096;
static ZERO_PAGE: [u8; PAGE] = [0; PAGE];
/// Guest memory is read in chunks of this size.
const CHUNK: usize = 2 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    #[error("cannot write the memory file {path:?}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read guest memory at {addr:#x}")]
    Guest {
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("cannot open the memory file {path:?}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the memory file {path:?} is {len} bytes, but the snapshot's is {want}")]
    Size { path: PathBuf, len: u64, want: u64 },
    #[error(
        "the memory file {path:?} is not this snapshot's (a snapshot into this directory was cut short?)"
    )]
    Foreign { path: PathBuf },
    #[error("cannot map the memory file {path:?}")]
    Map {
        path: PathBuf,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("the snapshot's memory regions overlap or are empty")]
    Layout,
}

/// Where guest RAM is: (guest-physical start, length) of each region, in
/// file order.
pub type Layout = Vec<(u64, u64)>;

/// The layout of `mem`, as the state file records it.
pub fn layout(mem: &GuestMemoryMmap) -> Layout {
    mem.iter().map(|r| (r.start_addr().0, r.len())).collect()
}

/// What [`save`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Saved {
    /// All of guest RAM (the file holds it, then its trailer).
    pub size: u64,
    /// Bytes of it that hold data (the rest are holes).
    pub data: u64,
}

/// The memory file ends with a page after guest RAM: this magic number
/// and the snapshot's id, which its state file holds too, so that a
/// memory file and a state file of different snapshots (a snapshot cut
/// short between its two files) are never restored together.
pub const TRAILER: u64 = 4096;
const TRAILER_MAGIC: [u8; 8] = *b"VMPLMEM1";

/// Writes guest RAM into `file` (new and empty, at `path`) as a sparse
/// file followed by the trailer with `id`. Pages of zeros are left as
/// holes; every other page is read and written, whether the guest or
/// (for a restored VM) the file it was mapped from holds it. The vCPUs
/// and the devices must not change guest memory meanwhile.
pub fn save(
    mem: &GuestMemoryMmap,
    file: &File,
    path: &Path,
    id: &[u8; 16],
) -> Result<Saved, MemoryFileError> {
    let werr = |source| MemoryFileError::Write {
        path: path.to_owned(),
        source,
    };
    let size: u64 = mem.iter().map(|r| r.len()).sum();
    file.set_len(size + TRAILER).map_err(werr)?;
    let direct = DirectWriter::open(path);
    let mut data = 0u64;
    let mut file_at = 0u64;
    let mut entries = Vec::with_capacity(CHUNK / PAGE);
    for region in mem.iter() {
        let len = region.len() as usize;
        // Anonymous memory's pages the kernel never gave a frame are
        // zeros: the page map tells them without touching them. Pages of
        // a restored VM may be in the file it was mapped from: all read.
        let anonymous = region.file_offset().is_none();
        let mut off = 0usize;
        while off < len {
            let n = CHUNK.min(len - off);
            let pages = n.div_ceil(PAGE);
            let base = region.as_ptr().wrapping_add(off);
            let mapped = anonymous && page_map(base, pages, &mut entries).is_ok();
            // `base` is `off` bytes into the region's live mapping
            // and `off + n` is within the region's length, so the slice
            // lies in mapped memory that the region keeps alive while
            // `mem` is borrowed; the caller guarantees that neither the
            // vCPUs (paused) nor the devices (quiesced) write to it
            // meanwhile, so it does not change while the slice lives.
            // SAFETY: sound for the reasons just given.
            let chunk: &[u8] = unsafe { std::slice::from_raw_parts(base, n) };
            // Runs of pages with data, written one pwrite each, straight
            // from guest memory.
            let mut run: Option<usize> = None;
            for p in 0..=pages {
                let has_data =
                    p < pages && (!mapped || entries[p] & (PM_PRESENT | PM_SWAPPED) != 0) && {
                        let page = &chunk[p * PAGE..((p + 1) * PAGE).min(n)];
                        // memcmp against zeros: several times faster than
                        // a byte loop.
                        page != &ZERO_PAGE[..page.len()]
                    };
                match (has_data, run) {
                    (true, None) => run = Some(p),
                    (false, Some(start)) => {
                        let bytes = &chunk[start * PAGE..(p * PAGE).min(n)];
                        let at = file_at + (off + start * PAGE) as u64;
                        if !direct.as_ref().is_some_and(|d| d.write_all_at(bytes, at)) {
                            file.write_all_at(bytes, at).map_err(werr)?;
                        }
                        data += bytes.len() as u64;
                        run = None;
                    }
                    _ => {}
                }
            }
            off += n;
        }
        file_at += region.len();
    }
    // A whole page, aligned, so that the direct writer takes it too.
    let mut trailer = Box::new(AlignedPage([0u8; PAGE]));
    trailer.0[..8].copy_from_slice(&TRAILER_MAGIC);
    trailer.0[8..24].copy_from_slice(id);
    if !direct
        .as_ref()
        .is_some_and(|d| d.write_all_at(&trailer.0, size))
    {
        file.write_all_at(&trailer.0, size).map_err(werr)?;
    }
    file.sync_all().map_err(werr)?;
    Ok(Saved { size, data })
}

#[repr(C, align(4096))]
struct AlignedPage([u8; PAGE]);

/// A second descriptor of the memory file opened `O_DIRECT`.
struct DirectWriter(File);

impl DirectWriter {
    /// `None` where the file system refuses `O_DIRECT`.
    fn open(path: &Path) -> Option<DirectWriter> {
        use std::os::unix::fs::OpenOptionsExt;
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
        {
            Ok(f) => Some(DirectWriter(f)),
            Err(e) => {
                tracing::debug!(?path, error = %e, "memory file written through the page cache");
                None
            }
        }
    }

    /// Writes `bytes` (page-aligned in memory, a whole number of pages,
    /// at a page-aligned `at`) at `at`; false if the file system refused
    /// it, so that the caller writes it all again the usual way.
    fn write_all_at(&self, mut bytes: &[u8], mut at: u64) -> bool {
        while !bytes.is_empty() {
            match self.0.write_at(bytes, at) {
                Ok(0) => return false,
                Ok(n) => {
                    bytes = &bytes[n..];
                    at += n as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }
}

/// /proc/self/pagemap bits: the page has a frame, or is in swap.
pub(crate) const PM_PRESENT: u64 = 1 << 63;
pub(crate) const PM_SWAPPED: u64 = 1 << 62;

/// Reads the page-map entries of `pages` pages from `addr` into `out`.
pub(crate) fn page_map(addr: *const u8, pages: usize, out: &mut Vec<u64>) -> std::io::Result<()> {
    thread_local! {
        static PAGEMAP: Option<File> = File::open("/proc/self/pagemap").ok();
    }
    out.clear();
    out.resize(pages, 0);
    let mut raw = vec![0u8; pages * 8];
    PAGEMAP.with(|f| match f {
        Some(f) => f.read_exact_at(&mut raw, (addr as u64 / PAGE as u64) * 8),
        None => Err(std::io::Error::from(std::io::ErrorKind::NotFound)),
    })?;
    for (e, b) in out.iter_mut().zip(raw.chunks_exact(8)) {
        *e = u64::from_le_bytes(b.try_into().unwrap_or_default());
    }
    Ok(())
}

/// The snapshot id in the trailer of the memory file at `path`, if it is
/// one.
pub fn file_id(path: &Path) -> Option<[u8; 16]> {
    let file = File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    let mut trailer = [0u8; 24];
    file.read_exact_at(&mut trailer, len.checked_sub(TRAILER)?)
        .ok()?;
    (trailer[..8] == TRAILER_MAGIC).then(|| trailer[8..].try_into().ok())?
}

/// Maps the memory file at `path` as guest RAM laid out as `layout`,
/// private and copy-on-write, checking that it is the snapshot `id`'s.
pub fn map(
    path: &Path,
    layout: &[(u64, u64)],
    id: &[u8; 16],
) -> Result<GuestMemoryMmap, MemoryFileError> {
    let file = File::open(path).map_err(|source| MemoryFileError::Open {
        path: path.to_owned(),
        source,
    })?;
    let len = file
        .metadata()
        .map_err(|source| MemoryFileError::Open {
            path: path.to_owned(),
            source,
        })?
        .len();
    let want = layout
        .iter()
        .try_fold(0u64, |sum, &(_, l)| sum.checked_add(l))
        .ok_or(MemoryFileError::Layout)?;
    if Some(len) != want.checked_add(TRAILER) {
        return Err(MemoryFileError::Size {
            path: path.to_owned(),
            len,
            want: want.saturating_add(TRAILER),
        });
    }
    let mut trailer = [0u8; 24];
    file.read_exact_at(&mut trailer, want)
        .map_err(|source| MemoryFileError::Open {
            path: path.to_owned(),
            source,
        })?;
    if trailer[..8] != TRAILER_MAGIC || trailer[8..] != id[..] {
        return Err(MemoryFileError::Foreign {
            path: path.to_owned(),
        });
    }
    let file = Arc::new(file);
    let mut regions = Vec::with_capacity(layout.len());
    let mut offset = 0u64;
    for &(gpa, size) in layout {
        let size_usize = usize::try_from(size).map_err(|_| MemoryFileError::Layout)?;
        let mapping =
            MmapRegionBuilder::new_with_bitmap(size_usize, AtomicBitmap::with_len(size_usize))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .with_file_offset(FileOffset::from_arc(file.clone(), offset))
                .build()
                .map_err(|source| MemoryFileError::Map {
                    path: path.to_owned(),
                    source,
                })?;
        regions
            .push(GuestRegionMmap::new(mapping, GuestAddress(gpa)).ok_or(MemoryFileError::Layout)?);
        offset += size;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|_| MemoryFileError::Layout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn a_write_the_direct_writer_refuses_is_left_to_the_caller() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        let Some(direct) = DirectWriter::open(&path) else {
            // This file system takes no O_DIRECT: save writes buffered.
            return;
        };
        let page = Box::new(AlignedPage([7u8; PAGE]));
        // Misaligned in memory: refused, nothing claimed written.
        assert!(!direct.write_all_at(&page.0[1..], 0));
        assert!(direct.write_all_at(&page.0, PAGE as u64));
        let mut back = vec![0u8; PAGE];
        file.read_exact_at(&mut back, PAGE as u64).unwrap();
        assert_eq!(back, page.0);
    }

    #[test]
    fn untouched_and_zero_pages_are_holes_and_data_maps_back() {
        let mem = crate::memory::create(64 << 20, false).unwrap();
        mem.write_slice(&[0xab; 3 * PAGE], GuestAddress(0x10_0000))
            .unwrap();
        mem.write_obj(0x1234_5678u32, GuestAddress((64 << 20) - 4))
            .unwrap();
        // Touched, but zero.
        mem.write_slice(&[0; PAGE], GuestAddress(0x20_0000))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let id = [7u8; 16];
        let file = File::create(&path).unwrap();
        let saved = save(&mem, &file, &path, &id).unwrap();
        assert_eq!(
            saved,
            Saved {
                size: 64 << 20,
                data: 4 * PAGE as u64
            }
        );
        let meta = std::fs::metadata(&path).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert!(
            meta.blocks() * 512 <= 64 * 1024,
            "{} bytes on disk",
            meta.blocks() * 512
        );

        assert!(matches!(
            map(&path, &layout(&mem), &[8u8; 16]),
            Err(MemoryFileError::Foreign { .. })
        ));
        let back = map(&path, &layout(&mem), &id).unwrap();
        let mut page = [0u8; PAGE];
        back.read_slice(&mut page, GuestAddress(0x10_2000)).unwrap();
        assert_eq!(page, [0xab; PAGE]);
        assert_eq!(
            back.read_obj::<u32>(GuestAddress((64 << 20) - 4)).unwrap(),
            0x1234_5678
        );
        // Writes stay private to this mapping.
        back.write_obj(7u8, GuestAddress(0x10_0000)).unwrap();
        let again = map(&path, &layout(&mem), &id).unwrap();
        assert_eq!(again.read_obj::<u8>(GuestAddress(0x10_0000)).unwrap(), 0xab);
    }

    #[test]
    fn a_memory_file_of_the_wrong_size_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let e = map(&path, &[(0, 8192)], &[0; 16]).unwrap_err().to_string();
        assert!(
            e.contains("is 4096 bytes, but the snapshot's is 12288"),
            "{e}"
        );
    }

    /// A restored VM's memory is saved whole, pages it never touched
    /// included (they are in the file it was mapped from, not in memory).
    #[test]
    fn a_restored_vm_s_untouched_pages_are_saved_too() {
        let mem = crate::memory::create(16 << 20, false).unwrap();
        mem.write_slice(&[0x5a; 2 * PAGE], GuestAddress(0x40_0000))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (first, second) = (dir.path().join("m1"), dir.path().join("m2"));
        let id = [1u8; 16];
        save(&mem, &File::create(&first).unwrap(), &first, &id).unwrap();
        let restored = map(&first, &layout(&mem), &id).unwrap();
        let saved = save(&restored, &File::create(&second).unwrap(), &second, &id).unwrap();
        assert_eq!(saved.data, 2 * PAGE as u64);
        let again = map(&second, &layout(&mem), &id).unwrap();
        let mut page = [0u8; PAGE];
        again
            .read_slice(&mut page, GuestAddress(0x40_1000))
            .unwrap();
        assert_eq!(page, [0x5a; PAGE]);
    }
}
