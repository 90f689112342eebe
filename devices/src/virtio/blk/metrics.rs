//! What a virtio-blk device counts: requests by kind and bytes, and the
//! requests that failed, by why.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// What the device counts (its metrics).
#[derive(Debug, Default)]
pub struct BlkCounters {
    /// Chains taken off the queue.
    pub requests: AtomicU64,
    pub read_ops: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_ops: AtomicU64,
    pub write_bytes: AtomicU64,
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
    pub write_zeroes: AtomicU64,
    /// Chains that broke the rules (outside guest memory, no status
    /// byte, a short header, a partial sector, too many segments).
    pub malformed: AtomicU64,
    /// Requests for sectors past the disk's end.
    pub out_of_range: AtomicU64,
    /// Writes, discards and write-zeroes on a read-only disk.
    pub read_only_writes: AtomicU64,
    /// Request types (or flags) the device does not support.
    pub unsupported: AtomicU64,
    /// Requests the backend failed.
    pub io_errors: AtomicU64,
    /// Requests that waited for the disk's rate limit.
    pub throttled: AtomicU64,
}

/// A point-in-time copy of [`BlkCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlkCounterSnapshot {
    pub requests: u64,
    pub read_ops: u64,
    pub read_bytes: u64,
    pub write_ops: u64,
    pub write_bytes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    pub malformed: u64,
    pub out_of_range: u64,
    pub read_only_writes: u64,
    pub unsupported: u64,
    pub io_errors: u64,
    pub throttled: u64,
}

impl BlkCounters {
    pub fn snapshot(&self) -> BlkCounterSnapshot {
        BlkCounterSnapshot {
            requests: self.requests.load(Relaxed),
            read_ops: self.read_ops.load(Relaxed),
            read_bytes: self.read_bytes.load(Relaxed),
            write_ops: self.write_ops.load(Relaxed),
            write_bytes: self.write_bytes.load(Relaxed),
            flushes: self.flushes.load(Relaxed),
            discards: self.discards.load(Relaxed),
            write_zeroes: self.write_zeroes.load(Relaxed),
            malformed: self.malformed.load(Relaxed),
            out_of_range: self.out_of_range.load(Relaxed),
            read_only_writes: self.read_only_writes.load(Relaxed),
            unsupported: self.unsupported.load(Relaxed),
            io_errors: self.io_errors.load(Relaxed),
            throttled: self.throttled.load(Relaxed),
        }
    }
}
