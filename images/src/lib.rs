//! Disk images for vmplant: a store of content-addressed chunks, layers
//! and named images ([`store`]), the copy-on-write overlay a VM writes to
//! ([`overlay`]), and the disks made of them ([`disk`]). Nothing here knows
//! of KVM or of the devices that use it; images/README.md describes the
//! store's layout and the overlay's format.

pub mod chunk;
pub mod disk;
mod fsutil;
pub mod overlay;
pub mod remote;
pub mod store;

pub use chunk::{ChunkError, ChunkHash, ChunkSource, CountingSource, LocalChunks, SourceStats};
pub use disk::{Disk, DiskError, ImageBase, OverlayDisk};
pub use overlay::{BaseIdentity, BaseKind, OverlayError};
pub use remote::{FetchStats, GvfsStore, RemoteError};
pub use store::{DEFAULT_CHUNK_SIZE, ResolvedImage, Store, StoreError, StoreFiles};

/// An error and its causes, one after the other
/// ("cannot read the base: chunk ... is missing from ...").
pub fn chain_message(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}
