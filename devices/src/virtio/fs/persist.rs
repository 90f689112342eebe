//! The virtio-fs device's state in a snapshot: its tag. The queues are
//! saved by the transport; the file system's own state (open files,
//! inode numbers) lives in the FUSE server.

use super::Fs;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsPersist {
    pub tag: String,
}

impl Fs {
    pub fn save(&self) -> FsPersist {
        FsPersist {
            tag: self.tag().into(),
        }
    }
}
