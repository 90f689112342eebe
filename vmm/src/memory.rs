//! Guest RAM laid out around the MMIO gap: anonymous host memory, or a
//! memfd when another process (a vhost-user backend) must map it too.

use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};
use devices::virtio::GuestMemoryMmap;
use std::fs::File;
use vm_memory::{FileOffset, GuestAddress};

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot create a memfd of {size} bytes for shared guest memory")]
    Memfd {
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot map {size} bytes of guest memory")]
    Map {
        size: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("the guest memory handed over ({size} bytes) cannot be used: {why}")]
    Handover { size: u64, why: String },
}

/// The RAM ranges for `size` bytes of guest memory: below the MMIO gap
/// first, the rest above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    let low = size.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low)];
    if size > low {
        ranges.push((GuestAddress(MMIO_GAP_END), size - low));
    }
    ranges
}

/// Maps `size` bytes of guest RAM. Pages are only backed once touched.
/// `shared` puts it in one memfd, each range at its own offset, so that
/// the file descriptor can be handed to another process.
pub fn create(size: u64, shared: bool) -> Result<GuestMemoryMmap, MemoryError> {
    let file = if shared {
        Some(memfd(size).map_err(|source| MemoryError::Memfd { size, source })?)
    } else {
        None
    };
    map(size, file)
}

/// Maps `size` bytes of guest RAM from `file` (another VMM's memfd, laid
/// out as [`create`] lays it out), shared: the same pages as that VMM's.
/// The memfd must be `size` bytes and sealed against shrinking and
/// growing, so that no one can take pages from under the guest.
pub fn from_memfd(size: u64, file: File) -> Result<GuestMemoryMmap, MemoryError> {
    let bad = |why: String| MemoryError::Handover { size, why };
    let len = file.metadata().map_err(|e| bad(e.to_string()))?.len();
    if len != size {
        return Err(bad(format!("it is {len} bytes")));
    }
    if seals(&file).is_none_or(|s| s & FIXED_SIZE != FIXED_SIZE) {
        return Err(bad("it is not a memfd sealed at its size".into()));
    }
    map(size, Some(std::sync::Arc::new(file)))
}

/// The seals a memfd may not lose: its size is fixed.
const FIXED_SIZE: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;

/// The seals of `file`, if it is a memfd (other files have none to ask).
fn seals(file: &File) -> Option<libc::c_int> {
    use std::os::fd::AsRawFd;
    // F_GET_SEALS only reads the descriptor's seals; the
    // descriptor is open for as long as `file` is borrowed.
    // SAFETY: sound for the reasons just given.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    (r >= 0).then_some(r)
}

/// The memfd `mem` lives in, if it is one with the ranges side by side as
/// [`create`] makes it (not a snapshot file a restored VM maps).
pub fn memfd_of(mem: &GuestMemoryMmap) -> Option<&File> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let first = mem.iter().next()?.file_offset()?.file();
    seals(first)?;
    let mut offset = 0;
    for region in mem.iter() {
        let fo = region.file_offset()?;
        if !std::ptr::eq(fo.file(), first) || fo.start() != offset {
            return None;
        }
        offset += region.len();
    }
    Some(first)
}

fn map(size: u64, file: Option<std::sync::Arc<File>>) -> Result<GuestMemoryMmap, MemoryError> {
    let mut offset = 0;
    let ranges: Vec<(GuestAddress, usize, Option<FileOffset>)> = ram_ranges(size)
        .into_iter()
        .map(|(a, l)| {
            let fo = file
                .as_ref()
                .map(|f| FileOffset::from_arc(f.clone(), offset));
            offset += l;
            (a, l as usize, fo)
        })
        .collect();
    GuestMemoryMmap::from_ranges_with_files(ranges)
        .map_err(|source| MemoryError::Map { size, source })
}

fn memfd(size: u64) -> std::io::Result<std::sync::Arc<File>> {
    use std::os::fd::AsRawFd;
    let fd = nix::sys::memfd::memfd_create(
        c"vmplant-guest-ram",
        nix::sys::memfd::MFdFlags::MFD_CLOEXEC | nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING,
    )?;
    let file = File::from(fd);
    file.set_len(size)?;
    // Sealed at its size: a process it is handed to (a vhost-user
    // backend, a local migration's destination) cannot shrink it under
    // the guest.
    // F_ADD_SEALS only changes the descriptor's seals; the
    // descriptor is open for as long as `file` lives.
    // SAFETY: sound for the reasons just given.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, FIXED_SIZE) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(std::sync::Arc::new(file))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    #[test]
    fn small_memory_is_one_range() {
        assert_eq!(ram_ranges(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
    }

    #[test]
    fn large_memory_skips_the_mmio_gap() {
        let r = ram_ranges(4 << 30);
        assert_eq!(
            r,
            vec![(GuestAddress(0), 3 << 30), (GuestAddress(4 << 30), 1 << 30)]
        );
        assert_eq!(r.iter().map(|(_, l)| l).sum::<u64>(), 4 << 30);
    }

    #[test]
    fn creates_the_regions() {
        let m = create(64 << 20, false).unwrap();
        assert_eq!(m.num_regions(), 1);
        assert_eq!(m.last_addr(), GuestAddress((64 << 20) - 1));
        assert!(m.iter().all(|r| r.file_offset().is_none()));
    }

    #[test]
    fn shared_memory_is_one_memfd_with_the_ranges_side_by_side() {
        use vm_memory::{Bytes, GuestMemoryRegion};
        let size = (3 << 30) + (64 << 20);
        let m = create(size, true).unwrap();
        let offsets: Vec<u64> = m
            .iter()
            .map(|r| r.file_offset().expect("file backed").start())
            .collect();
        assert_eq!(offsets, vec![0, 3 << 30]);
        // What the guest writes is in the file, where another process
        // mapping it would see it.
        m.write_obj(0xabcd_u32, GuestAddress(4 << 30)).unwrap();
        let f = m.iter().nth(1).unwrap().file_offset().unwrap().file();
        let mut word = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(f, &mut word, 3 << 30).unwrap();
        assert_eq!(u32::from_le_bytes(word), 0xabcd);
    }
}
