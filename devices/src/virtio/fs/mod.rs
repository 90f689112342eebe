//! The virtio-fs device: a guest file share whose FUSE requests are
//! served in-process by a [`FuseServer`] (GVFS's caching client).
//!
//! - `queue.rs`: request chains to FUSE messages and back, every guest
//!   address and length checked, testable with the mock driver;
//! - `device.rs`: the [`Fs`] device, its config space, the thread that
//!   takes requests off its queues and the handler threads that answer
//!   them, in any order (FUSE requests may wait on a remote server, so
//!   they are kept off the VM's event loop, and a slow one does not hold
//!   up the others);
//! - `vhost_user.rs`: [`VhostUserFs`], the same device with its queues
//!   served by an external vhost-user backend (virtiofsd);
//! - `persist.rs`: the state kept in a snapshot: the tag and the FUSE
//!   server's session (for GVFS, `gvfs::fuse_proto::SessionState`).

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

/// A share's tag, the name the guest mounts it by, NUL-padded as config
/// space holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag([u8; TAG_LEN]);

impl Tag {
    /// `None` for a tag that is empty, longer than [`TAG_LEN`] bytes, or
    /// holds a NUL.
    pub fn new(tag: &str) -> Option<Tag> {
        if tag.is_empty() || tag.len() > TAG_LEN || tag.contains('\0') {
            return None;
        }
        let mut t = [0u8; TAG_LEN];
        t[..tag.len()].copy_from_slice(tag.as_bytes());
        Some(Tag(t))
    }

    pub fn as_str(&self) -> &str {
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(TAG_LEN);
        std::str::from_utf8(&self.0[..end]).unwrap_or_default()
    }

    /// Reads the device's config space: the tag, then the number of
    /// request queues.
    pub fn read_config(&self, request_queues: u32, offset: u64, data: &mut [u8]) {
        let mut c = [0u8; TAG_LEN + 4];
        c[..TAG_LEN].copy_from_slice(&self.0);
        c[TAG_LEN..].copy_from_slice(&request_queues.to_le_bytes());
        crate::virtio::read_config_bytes(&c, offset, data);
    }
}

/// Whoever answers the guest's FUSE requests.
pub trait FuseServer: Send + Sync {
    /// Takes one request (`fuse_in_header` and body) and returns the reply
    /// (`fuse_out_header` and body), or `None` for requests that get none
    /// (FORGET, BATCH_FORGET, INTERRUPT).
    fn handle(&self, request: &[u8]) -> Option<Vec<u8>>;
    /// The guest's FUSE session, serialized, for a snapshot (taken while
    /// no request is being handled); `Err` says why it cannot be saved.
    fn save_session(&self) -> Result<Vec<u8>, String> {
        Err("its FUSE server cannot save the guest's session".into())
    }
    /// Puts back what [`Self::save_session`] saved (it comes from a file:
    /// a bad one is an error), before the guest's next request.
    fn restore_session(&self, _state: &[u8]) -> Result<(), String> {
        Err("its FUSE server cannot restore a guest's session".into())
    }
}

/// The error and its sources, as one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
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

    fn save_session(&self) -> Result<Vec<u8>, String> {
        bitcode::serialize(&gvfs::fuse_proto::FuseHandler::save_session(self))
            .map_err(|e| format!("cannot serialize the GVFS session: {e}"))
    }

    fn restore_session(&self, state: &[u8]) -> Result<(), String> {
        let state: gvfs::fuse_proto::SessionState = bitcode::deserialize(state)
            .map_err(|e| format!("the saved GVFS session cannot be read: {e}"))?;
        gvfs::fuse_proto::FuseHandler::restore_session(self, state).map_err(|e| chain(&e))
    }
}
