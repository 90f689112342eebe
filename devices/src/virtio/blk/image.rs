//! Disks on images: [`ImageBackend`], the thin adapter that gives the
//! images crate's disks (an image of a store under a copy-on-write
//! overlay, or a raw file read-only under one) to virtio-blk as a
//! [`BlockBackend`]. The images types do the work; this maps their calls
//! and errors onto the trait's.

use super::ID_LEN;
use super::backend::BlockBackend;
use images::{Disk, DiskError, OverlayDisk, SourceStats};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ImageBackendError {
    #[error("cannot open the disk's base {path:?}")]
    Base {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the base {0:?} is in use by a VM that writes to it")]
    BaseLocked(PathBuf),
    #[error("cannot open the overlay {path:?}")]
    Overlay {
        path: PathBuf,
        #[source]
        source: DiskError,
    },
    #[error("the image's size ({0} bytes) is less than one sector")]
    TooSmall(u64),
}

enum Inner {
    Image(Disk),
    Overlay(OverlayDisk),
}

/// A guest disk on an image (or a raw base) under its overlay: always
/// read-write (writes go to the overlay), with the serial
/// `vmplant-DEV-INODE` of the overlay file, the VM's own part of it.
pub struct ImageBackend {
    inner: Inner,
    id: String,
    /// A raw base is held shared (`flock`), so that no VM opens it to
    /// write while overlays rest on it.
    _base_lock: Option<File>,
}

fn io_err(e: DiskError) -> io::Error {
    io::Error::other(images::chain_message(&e))
}

fn overlay_id(overlay: &Path) -> String {
    let mut id = match std::fs::metadata(overlay) {
        Ok(m) => format!("vmplant-{:x}-{:x}", m.dev(), m.ino()),
        Err(_) => "vmplant-overlay".to_string(),
    };
    id.truncate(ID_LEN);
    id
}

impl ImageBackend {
    /// `PATH,overlay=FILE`: the raw file `base`, read-only, under the
    /// overlay `overlay` (made if missing).
    pub fn raw_overlay(base: &Path, overlay: &Path) -> Result<ImageBackend, ImageBackendError> {
        let lock = File::open(base).map_err(|source| ImageBackendError::Base {
            path: base.to_path_buf(),
            source,
        })?;
        // SAFETY: flock on the descriptor just opened; no memory involved.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                ImageBackendError::BaseLocked(base.to_path_buf())
            } else {
                ImageBackendError::Base {
                    path: base.to_path_buf(),
                    source: e,
                }
            });
        }
        let disk =
            OverlayDisk::open(base, overlay).map_err(|source| ImageBackendError::Overlay {
                path: overlay.to_path_buf(),
                source,
            })?;
        Self::check_size(disk.capacity())?;
        Ok(ImageBackend {
            inner: Inner::Overlay(disk),
            id: overlay_id(overlay),
            _base_lock: Some(lock),
        })
    }

    /// An image's disk, opened by the caller (from a local store or a
    /// remote one) with its overlay at `overlay`.
    pub fn image(disk: Disk, overlay: &Path) -> Result<ImageBackend, ImageBackendError> {
        Self::check_size(disk.capacity())?;
        Ok(ImageBackend {
            inner: Inner::Image(disk),
            id: overlay_id(overlay),
            _base_lock: None,
        })
    }

    fn check_size(capacity: u64) -> Result<(), ImageBackendError> {
        if capacity < super::SECTOR_SIZE {
            return Err(ImageBackendError::TooSmall(capacity));
        }
        Ok(())
    }

    /// What an image's disk read from its chunk source so far (`None`
    /// for a raw base).
    pub fn source_stats(&self) -> Option<SourceStats> {
        match &self.inner {
            Inner::Image(d) => Some(d.source_stats()),
            Inner::Overlay(_) => None,
        }
    }
}

impl BlockBackend for ImageBackend {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match &self.inner {
            Inner::Image(d) => d.read_at(buf, offset),
            Inner::Overlay(d) => d.read_at(buf, offset),
        }
        .map_err(io_err)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match &self.inner {
            Inner::Image(d) => d.write_at(buf, offset),
            Inner::Overlay(d) => d.write_at(buf, offset),
        }
        .map_err(io_err)
    }

    fn flush(&self) -> io::Result<()> {
        match &self.inner {
            Inner::Image(d) => d.flush(),
            Inner::Overlay(d) => d.flush(),
        }
        .map_err(io_err)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        match &self.inner {
            Inner::Image(d) => d.discard(offset, len),
            Inner::Overlay(d) => d.discard(offset, len),
        }
        .map_err(io_err)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        match &self.inner {
            Inner::Image(d) => d.write_zeroes(offset, len),
            Inner::Overlay(d) => d.write_zeroes(offset, len),
        }
        .map_err(io_err)
    }

    fn capacity(&self) -> u64 {
        match &self.inner {
            Inner::Image(d) => d.capacity(),
            Inner::Overlay(d) => d.capacity(),
        }
    }

    fn read_only(&self) -> bool {
        false
    }

    fn id(&self) -> String {
        self.id.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raw_base_under_an_overlay_keeps_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        let ovl = dir.path().join("ovl");
        let bytes: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(&base, &bytes).unwrap();
        let disk = ImageBackend::raw_overlay(&base, &ovl).unwrap();
        assert_eq!(disk.capacity(), 1 << 20);
        assert!(!disk.read_only() && disk.id().starts_with("vmplant-"));
        disk.write_at(&[9u8; 512], 4096 + 512).unwrap();
        disk.write_zeroes(65536, 8192).unwrap();
        disk.flush().unwrap();
        let mut b = vec![0u8; 8192];
        disk.read_at(&mut b, 4096).unwrap();
        assert_eq!(&b[..512], &bytes[4096..4608]);
        assert!(b[512..1024].iter().all(|&x| x == 9));
        assert_eq!(&b[1024..], &bytes[4096 + 1024..4096 + 8192]);
        disk.read_at(&mut b, 65536).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        assert_eq!(
            std::fs::read(&base).unwrap(),
            bytes,
            "the base is untouched"
        );
        // A second VM on the same overlay is refused; so is a writer of
        // the base (its lock is exclusive, ours shared).
        assert!(ImageBackend::raw_overlay(&base, &ovl).is_err());
        let e = super::super::RawFile::open(&base, false).unwrap_err();
        assert!(e.to_string().contains("in use"), "{e}");
        drop(disk);
        let again = ImageBackend::raw_overlay(&base, &ovl).unwrap();
        let mut s = [0u8; 512];
        again.read_at(&mut s, 4608).unwrap();
        assert_eq!(s, [9u8; 512], "the overlay kept the write");
    }

    #[test]
    fn an_image_of_a_store_reads_its_chunks_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("raw");
        let bytes: Vec<u8> = (0..3u32 << 19).map(|i| (i % 241) as u8).collect();
        std::fs::write(&raw, &bytes).unwrap();
        let store = images::Store::open_or_create(&dir.path().join("store"), 1 << 19).unwrap();
        store.import("base", &raw, &mut |_| {}).unwrap();
        let ovl = dir.path().join("ovl");
        let disk = images::Disk::open(&store, "base", &ovl).unwrap();
        let disk = ImageBackend::image(disk, &ovl).unwrap();
        let mut b = vec![0u8; 1024];
        disk.read_at(&mut b, (1 << 19) - 512).unwrap();
        assert_eq!(&b[..], &bytes[(1 << 19) - 512..(1 << 19) + 512]);
        assert_eq!(disk.source_stats().unwrap().chunks, 2);
        disk.write_at(&[1u8; 512], 0).unwrap();
        disk.read_at(&mut b, 0).unwrap();
        assert!(b[..512].iter().all(|&x| x == 1));
    }
}
