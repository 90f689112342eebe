//! The virtio-fs device's state in a snapshot: its tag and the FUSE
//! server's session (opaque here: [`super::FuseServer::save_session`]),
//! serialized with bitcode. The queues are saved by the transport.
//!
//! Requests the device holds when it is saved (taken off a queue, not
//! yet answered) are not in it: quiescing waits until there are none
//! (see `device.rs`), so that a restored guest never waits for an answer
//! to a request nobody holds.

use serde::{Deserialize, Serialize};

/// The format of [`FsPersist`] this build writes and reads.
pub const FS_PERSIST_FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsPersist {
    /// [`FS_PERSIST_FORMAT`].
    pub format: u32,
    pub tag: String,
    /// The FUSE server's session, as it serialized it.
    pub session: Vec<u8>,
}
