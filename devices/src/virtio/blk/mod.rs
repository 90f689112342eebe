//! The virtio-blk device: a guest disk on a [`BlockBackend`] (a raw
//! file, [`RawFile`], or a layered image of the images crate under a
//! copy-on-write overlay, [`ImageBackend`]).
//!
//! - `backend.rs`: the [`BlockBackend`] trait and the raw-file backend;
//! - `image.rs`: the adapter of the images crate's disks;
//! - `queue.rs`: request chains to backend calls and back, every guest
//!   address and length checked, testable with the mock driver;
//! - `device.rs`: the [`Blk`] device (features, config space) and the
//!   threads that serve its queue, off the VM's event loop, so that disk
//!   I/O never holds up the other devices; up to four requests run at
//!   once and each goes back when it is done, so a slow one does not
//!   hold up those behind it;
//! - `metrics.rs`: what the device counts ([`BlkCounters`]);
//! - `rate_limit.rs`: optional token buckets of bytes/s and requests/s;
//! - `persist.rs`: the state kept in a snapshot.
//!
//! There is no event-loop glue (`event_handler.rs`): like virtio-fs, the
//! device waits for its queue's notifications on its own threads.

mod backend;
mod device;
mod image;
mod metrics;
pub mod persist;
pub mod queue;
mod rate_limit;

pub use backend::{BackendError, BlockBackend, RawFile};
pub use device::Blk;
pub use image::{ImageBackend, ImageBackendError};
pub use metrics::{BlkCounterSnapshot, BlkCounters};
pub use rate_limit::RateLimit;

/// The virtio device ID of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Entries in the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Bytes per sector: virtio-blk addresses disks in 512-byte sectors
/// whatever the backend's block size.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the device ID a GET_ID request returns (virtio 1.2, 5.2.6).
pub const ID_LEN: usize = 20;
/// Data segments per request the device takes (`seg_max`): what a chain
/// of a full queue holds besides its header and status descriptors.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// The most sectors one DISCARD or WRITE_ZEROES segment may cover (1 GiB).
pub const MAX_ZEROES_SECTORS: u32 = 1 << 21;
/// Segments per DISCARD or WRITE_ZEROES request.
pub const MAX_ZEROES_SEG: u32 = 1;

/// Feature bits (virtio 1.2, 5.2.3).
pub mod features {
    pub const SEG_MAX: u32 = 2;
    pub const RO: u32 = 5;
    pub const BLK_SIZE: u32 = 6;
    pub const FLUSH: u32 = 9;
    pub const DISCARD: u32 = 13;
    pub const WRITE_ZEROES: u32 = 14;
}

/// Request types (`virtio_blk_req.type`).
pub mod request {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
    pub const DISCARD: u32 = 11;
    pub const WRITE_ZEROES: u32 = 13;
}

/// Request status bytes.
pub mod status {
    pub const OK: u8 = 0;
    pub const IOERR: u8 = 1;
    pub const UNSUPP: u8 = 2;
}
