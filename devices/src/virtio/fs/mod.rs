//! The virtio-fs device: a guest file share whose FUSE requests are
//! served in-process by a [`FuseServer`] (GVFS's caching client).
//!
//! - `queue.rs`: request chains to FUSE messages and back, every guest
//!   address and length checked, testable with the mock driver;
//! - `device.rs`: the [`Fs`] device, its config space and the worker
//!   thread that serves its queues (FUSE requests may wait on a remote
//!   server, so they are kept off the VM's event loop);
//! - `vhost_user.rs`: [`VhostUserFs`], the same device with its queues
//!   served by an external vhost-user backend (virtiofsd);
//! - `persist.rs`: the state kept in a snapshot.

mod device;
pub mod persist;
pub mod queue;
mod vhost_user;

pub use device::{Fs, FsError};
pub use vhost_user::{VhostUserFs, VhostUserFsError};

/// The virtio device ID of a file system.
pub const VIRTIO_ID_FS: u32 = 26;
/// The longest tag (the name the guest mounts by).
pub const TAG_LEN: usize = 36;
/// Entries per queue.
pub const QUEUE_SIZE: u16 = 256;
/// The largest request a guest may send: a 1 MiB write plus headers.
pub const MAX_REQUEST: usize = (1 << 20) + 4096;

/// Whoever answers the guest's FUSE requests.
pub trait FuseServer: Send + Sync {
    /// Takes one request (`fuse_in_header` and body) and returns the reply
    /// (`fuse_out_header` and body), or `None` for requests that get none
    /// (FORGET, BATCH_FORGET, INTERRUPT).
    fn handle(&self, request: &[u8]) -> Option<Vec<u8>>;
}

impl FuseServer for gvfs::fuse_proto::FuseHandler {
    fn handle(&self, request: &[u8]) -> Option<Vec<u8>> {
        match gvfs::fuse_proto::FuseHandler::handle(self, request) {
            Ok(reply) => reply,
            Err(e) => {
                // No header to answer to: the chain goes back empty.
                tracing::debug!("virtio-fs: {e}");
                None
            }
        }
    }
}
