//! What a guest disk is stored on: the [`BlockBackend`] trait, and
//! [`RawFile`], a disk that is a plain file.
//!
//! Dependencies point from devices to images (which knows nothing of
//! KVM), so an image type gets its `impl BlockBackend` here in devices,
//! next to `RawFile`'s (a thin adapter over the image's own methods),
//! not in the images crate.

use super::ID_LEN;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The storage behind a virtio-blk device, addressed in bytes.
///
/// The device checks every request against [`Self::capacity`] and
/// [`Self::read_only`] before it calls the backend, so a backend sees
/// only ranges within `0..capacity()`, and no write, discard or
/// write-zeroes when it is read-only. Offsets and lengths are multiples
/// of 512 bytes. Calls may come from several threads at once (the
/// device may serve requests in parallel), hence `&self` and `Sync`.
///
/// An `Err` becomes `VIRTIO_BLK_S_IOERR` for the guest's request; the
/// device logs it (rate-limited) and goes on.
pub trait BlockBackend: Send + Sync {
    /// Fills all of `buf` with the disk's bytes from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` to the disk at `offset`. Once it returns, a
    /// read sees the data; it is durable only after [`Self::flush`].
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every write that returned before durable.
    fn flush(&self) -> io::Result<()>;
    /// The guest no longer needs `len` bytes from `offset`: a hint (the
    /// range may then read as anything, zeros or the old bytes).
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes `len` bytes from `offset` read as zeros.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()>;
    /// The disk's size in bytes (the guest sees `capacity() / 512`
    /// sectors). It does not change while the device exists.
    fn capacity(&self) -> u64;
    /// Whether the disk refuses writes.
    fn read_only(&self) -> bool;
    /// The disk's ID (its serial number), at most [`ID_LEN`] bytes of
    /// ASCII; a longer one is cut.
    fn id(&self) -> String;
    /// A file whose bytes are the disk's at the same offsets, if the disk
    /// is one: the device then reads from it straight into guest memory
    /// (one copy, not two). Writes still go through [`Self::write_at`].
    fn file(&self) -> Option<&File> {
        None
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot open the disk {path:?}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the disk {0:?} is not a regular file or block device")]
    NotAFile(PathBuf),
    #[error("the disk {0:?} is smaller than one sector (512 bytes)")]
    TooSmall(PathBuf),
    #[error("the disk {0:?} is in use by another VM or process (it holds a lock on it)")]
    Locked(PathBuf),
}

/// A disk that is a raw file (or a block device): sector N is at byte
/// N * 512. Discards punch holes, so a sparse file stays sparse.
///
/// The file is locked while it is open (`flock`): exclusively for a
/// read-write disk, shared for a read-only one, so that two VMs (clones
/// restored from one snapshot, say) cannot both write one file, nor one
/// read it while another writes it.
#[derive(Debug)]
pub struct RawFile {
    file: File,
    capacity: u64,
    read_only: bool,
    id: String,
}

impl RawFile {
    /// Opens `path`, read-only or for reading and writing.
    pub fn open(path: &Path, read_only: bool) -> Result<RawFile, BackendError> {
        let open = |source| BackendError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(open)?;
        let lock = if read_only {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on the descriptor just opened; no memory involved.
        if unsafe { libc::flock(file.as_raw_fd(), lock | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                BackendError::Locked(path.to_path_buf())
            } else {
                open(e)
            });
        }
        let meta = file.metadata().map_err(open)?;
        let capacity = if meta.is_file() {
            meta.len()
        } else if meta.file_type().is_block_device() {
            use std::io::{Seek, SeekFrom};
            (&file).seek(SeekFrom::End(0)).map_err(open)?
        } else {
            return Err(BackendError::NotAFile(path.to_path_buf()));
        };
        if capacity < super::SECTOR_SIZE {
            return Err(BackendError::TooSmall(path.to_path_buf()));
        }
        // The file's identity on this host: a guest telling its disks
        // apart by serial sees the same one after a restart.
        let mut id = format!("vmplant-{:x}-{:x}", meta.dev(), meta.ino());
        id.truncate(ID_LEN);
        Ok(RawFile {
            file,
            capacity,
            read_only,
            id,
        })
    }

    /// `fallocate(mode)` over the range; `Ok(false)` when the file system
    /// does not support that mode.
    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<bool> {
        let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        // fallocate on a file descriptor this struct owns; it
        // touches no memory of ours.
        // SAFETY: sound for the reasons just given.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, n) };
        if r == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(false),
            _ => Err(e),
        }
    }
}

/// `FileExt` on the trait's terms.
impl BlockBackend for RawFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        // A hint: where holes cannot be punched the bytes stay.
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
        .map(|_| ())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        for mode in [
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        ] {
            if self.fallocate(mode, offset, len)? {
                return Ok(());
            }
        }
        // Neither: write the zeros.
        let zeros = vec![0u8; 1 << 20];
        let mut at = 0;
        while at < len {
            let n = (len - at).min(zeros.len() as u64);
            self.file.write_all_at(&zeros[..n as usize], offset + at)?;
            at += n;
        }
        Ok(())
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn id(&self) -> String {
        self.id.clone()
    }

    fn file(&self) -> Option<&File> {
        Some(&self.file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raw_file_reads_writes_punches_and_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::write(&path, vec![0xaau8; 1 << 20]).unwrap();
        let disk = RawFile::open(&path, false).unwrap();
        assert_eq!(disk.capacity(), 1 << 20);
        assert!(!disk.read_only());
        assert!(disk.id().len() <= ID_LEN && disk.id().starts_with("vmplant-"));
        disk.write_at(&[1u8; 512], 512).unwrap();
        let mut b = [0u8; 1024];
        disk.read_at(&mut b, 0).unwrap();
        assert!(b[..512].iter().all(|&x| x == 0xaa) && b[512..].iter().all(|&x| x == 1));
        disk.write_zeroes(4096, 8192).unwrap();
        disk.discard(65536, 4096).unwrap();
        disk.flush().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 1 << 20, "the size stays");
        assert!(bytes[4096..12288].iter().all(|&x| x == 0));
        assert_eq!(bytes[12288], 0xaa);
        assert_eq!(bytes[4095], 0xaa);
    }

    #[test]
    fn a_read_only_raw_file_refuses_changes_and_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::write(&path, vec![7u8; 4096]).unwrap();
        let disk = RawFile::open(&path, true).unwrap();
        assert!(disk.read_only());
        assert!(disk.write_at(&[0; 512], 0).is_err());
        assert!(disk.write_zeroes(0, 512).is_err());
        assert!(disk.discard(0, 512).is_err());
        let e = RawFile::open(&dir.path().join("none"), false).unwrap_err();
        assert!(e.to_string().contains("none"), "{e}");
        std::fs::write(dir.path().join("tiny"), b"x").unwrap();
        let e = RawFile::open(&dir.path().join("tiny"), false).unwrap_err();
        assert!(matches!(e, BackendError::TooSmall(_)), "{e}");
        let e = RawFile::open(dir.path(), true).unwrap_err();
        assert!(matches!(e, BackendError::NotAFile(_)), "{e}");
    }

    #[test]
    fn a_read_write_disk_is_one_vm_s_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let readers = [
            RawFile::open(&path, true).unwrap(),
            RawFile::open(&path, true).unwrap(),
        ];
        let e = RawFile::open(&path, false).unwrap_err();
        assert!(matches!(e, BackendError::Locked(_)), "{e}");
        drop(readers);
        let writer = RawFile::open(&path, false).unwrap();
        for ro in [false, true] {
            let e = RawFile::open(&path, ro).unwrap_err();
            assert!(e.to_string().contains("in use"), "{e}");
        }
        drop(writer);
        RawFile::open(&path, false).unwrap();
    }
}
