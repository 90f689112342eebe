//! Disks a VM writes to: [`Disk`], an image of a store under a private
//! copy-on-write overlay, and [`OverlayDisk`], a raw file read-only under
//! one (`PATH,overlay=FILE`). Both have the method shapes of a virtio-blk
//! backend: `read_at`, `write_at`, `flush`, `discard`, `write_zeroes`,
//! `capacity`, all on `&self` from any thread.

use crate::chunk::{ChunkSource, CountingSource, SourceStats};
use crate::overlay::{
    self, BaseIdentity, BaseKind, BaseRead, CowDisk, DEFAULT_BLOCK_SIZE, Overlay, OverlayError,
};
use crate::store::{ResolvedImage, Store, StoreError};
use nix::fcntl::Flock;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Errors of opening or using a disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Overlay(#[from] OverlayError),
    #[error("cannot open the base {path}")]
    Base {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, DiskError>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An image's chunks, resolved top-down, read through a [`ChunkSource`].
pub struct ImageBase {
    image: ResolvedImage,
    source: Arc<dyn ChunkSource>,
}

impl ImageBase {
    pub fn new(image: ResolvedImage, source: Arc<dyn ChunkSource>) -> ImageBase {
        ImageBase { image, source }
    }

    pub fn image(&self) -> &ResolvedImage {
        &self.image
    }
}

impl BaseRead for ImageBase {
    fn read_base(&self, buf: &mut [u8], offset: u64) -> std::result::Result<(), BoxError> {
        let cs = u64::from(self.image.chunk_size);
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let within = at % cs;
            let n = (cs - within).min((buf.len() - done) as u64) as usize;
            let part = &mut buf[done..done + n];
            match self.image.chunks.get((at / cs) as usize).copied().flatten() {
                Some(h) => self.source.read_chunk_at(&h, within, part)?,
                None => part.fill(0),
            }
            done += n;
        }
        Ok(())
    }
}

/// A raw file as a read-only base.
pub struct RawBase {
    file: File,
    size: u64,
}

impl BaseRead for RawBase {
    fn read_base(&self, buf: &mut [u8], offset: u64) -> std::result::Result<(), BoxError> {
        // The file may have shrunk since it was opened: a read past its
        // end is an error, never garbage.
        let end = offset.saturating_add(buf.len() as u64);
        if end > self.size {
            return Err("read past the end of the base".into());
        }
        Ok(self.file.read_exact_at(buf, offset)?)
    }
}

/// An image of a store seen through a private copy-on-write overlay.
pub struct Disk {
    inner: CowDisk<ImageBase>,
    source: Arc<CountingSource>,
    /// Keeps `vmplant image rm` away while the disk is open.
    _in_use: Option<Flock<File>>,
}

impl Disk {
    /// Opens image `image` of `store` with its overlay at `overlay`
    /// (created if missing), reading chunks from the store.
    pub fn open(store: &Store, image: &str, overlay: &Path) -> Result<Disk> {
        let source: Arc<dyn ChunkSource> = Arc::new(store.local_chunks());
        Disk::open_with_source(store, image, overlay, source)
    }

    /// As [`Disk::open`], reading chunks from `source` (a remote fetcher).
    pub fn open_with_source(
        store: &Store,
        image: &str,
        overlay: &Path,
        source: Arc<dyn ChunkSource>,
    ) -> Result<Disk> {
        let in_use = store.lock_image(image)?;
        let resolved = store.resolve(image)?;
        Disk::from_resolved(resolved, overlay, source, Some(in_use))
    }

    /// A disk of an image already resolved (by whatever reads its store),
    /// optionally holding the lock that marks it in use.
    pub fn from_resolved(
        image: ResolvedImage,
        overlay: &Path,
        source: Arc<dyn ChunkSource>,
        in_use: Option<Flock<File>>,
    ) -> Result<Disk> {
        let overlay = Overlay::open_or_create(overlay, &image.identity(), DEFAULT_BLOCK_SIZE)?;
        let source = Arc::new(CountingSource::new(source));
        let base = ImageBase::new(image, source.clone());
        Ok(Disk {
            inner: CowDisk::new(overlay, base),
            source,
            _in_use: in_use,
        })
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        Ok(self.inner.read_at(buf, offset)?)
    }

    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        Ok(self.inner.write_at(buf, offset)?)
    }

    pub fn flush(&self) -> Result<()> {
        Ok(self.inner.flush()?)
    }

    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        Ok(self.inner.discard(offset, len)?)
    }

    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        Ok(self.inner.write_zeroes(offset, len)?)
    }

    pub fn capacity(&self) -> u64 {
        self.inner.capacity()
    }

    /// What was read from the chunk source since the disk was opened.
    pub fn source_stats(&self) -> SourceStats {
        self.source.stats()
    }

    pub fn image(&self) -> &ResolvedImage {
        self.inner.base().image()
    }
}

/// A raw file, read-only, seen through a copy-on-write overlay.
pub struct OverlayDisk {
    inner: CowDisk<RawBase>,
}

impl OverlayDisk {
    /// Opens `base` read-only with its overlay at `overlay` (created if
    /// missing; one made on a base of another size is refused).
    pub fn open(base: &Path, overlay: &Path) -> Result<OverlayDisk> {
        let err = |source| DiskError::Base {
            path: base.to_path_buf(),
            source,
        };
        let mut file = File::open(base).map_err(err)?;
        // Seeking to the end sizes block devices too.
        let size = file.seek(SeekFrom::End(0)).map_err(err)?;
        let identity = BaseIdentity {
            kind: BaseKind::Raw,
            id: [0; 32],
            size,
            name: base.display().to_string(),
        };
        let overlay = Overlay::open_or_create(overlay, &identity, overlay::DEFAULT_BLOCK_SIZE)?;
        Ok(OverlayDisk {
            inner: CowDisk::new(overlay, RawBase { file, size }),
        })
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        Ok(self.inner.read_at(buf, offset)?)
    }

    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        Ok(self.inner.write_at(buf, offset)?)
    }

    pub fn flush(&self) -> Result<()> {
        Ok(self.inner.flush()?)
    }

    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        Ok(self.inner.discard(offset, len)?)
    }

    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        Ok(self.inner.write_zeroes(offset, len)?)
    }

    pub fn capacity(&self) -> u64 {
        self.inner.capacity()
    }
}
