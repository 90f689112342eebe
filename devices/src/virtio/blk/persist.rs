//! The virtio-blk device's state in a snapshot, serialized with bitcode.
//! The queue is saved by the transport, the features it acked too; no
//! request is held when it is saved (quiescing waits for the pass being
//! served). The disk itself is not in it: a restore opens the disk again
//! (the owner keeps where it is), and this state checks that the guest
//! finds the disk it knew.

use serde::{Deserialize, Serialize};

/// The format of [`BlkPersist`] this build writes and reads.
pub const BLK_PERSIST_FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlkPersist {
    /// [`BLK_PERSIST_FORMAT`].
    pub format: u32,
    /// The size the guest saw, in 512-byte sectors.
    pub capacity_sectors: u64,
    pub read_only: bool,
    /// The ID a GET_ID request returned.
    pub id: String,
    pub acked_features: u64,
}

impl BlkPersist {
    /// Whether a device with state `now` can take the place of the saved
    /// one: the same size and the same read-only flag (a guest keeps
    /// both from its boot). Another ID is logged, not refused: a clone's
    /// disk is a copy.
    pub fn check(&self, now: &BlkPersist) -> Result<(), String> {
        if self.format != BLK_PERSIST_FORMAT {
            return Err(format!(
                "the saved state of a virtio-blk disk is in format {}; this build reads format {BLK_PERSIST_FORMAT}",
                self.format
            ));
        }
        if self.capacity_sectors != now.capacity_sectors {
            return Err(format!(
                "the snapshot's disk had {} sectors, the one given has {} sectors",
                self.capacity_sectors, now.capacity_sectors
            ));
        }
        if self.read_only != now.read_only {
            let ro = |r| if r { "read-only" } else { "read-write" };
            return Err(format!(
                "the snapshot's disk was {}, the one given is {}",
                ro(self.read_only),
                ro(now.read_only)
            ));
        }
        if self.id != now.id {
            tracing::info!(
                saved = self.id,
                now = now.id,
                "virtio-blk: the restored disk has another ID"
            );
        }
        Ok(())
    }
}
