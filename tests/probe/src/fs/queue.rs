//! A minimal split virtqueue for one request at a time: descriptor 0 is
//! the device-readable part of the request, descriptor 1 (chained) the
//! device-writable part. Polled: VRING_AVAIL_F_NO_INTERRUPT is set and
//! the used ring is read until the request comes back or time runs out.
//! (virtio-drivers' `VirtQueue` needs its `Transport`, whose MMIO
//! transport refuses device id 26, which it does not know.)

use crate::net::pool;
use crate::net::time::Deadline;
use core::sync::atomic::{Ordering, fence};

/// Entries in the ring (only two descriptors are ever in use).
pub const SIZE: u16 = 8;

const DESC: u64 = 0;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;
/// Bytes of ring memory (one page).
const RING_BYTES: usize = 0x1000;

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// The ring memory of one queue (guest-physical = virtual).
pub struct Queue {
    base: u64,
    /// Our next avail index (free-running, modulo 2^16).
    avail_idx: u16,
    /// The next used index we expect.
    used_idx: u16,
}

/// Why a request did not come back.
#[derive(Clone, Copy)]
pub enum QueueError {
    /// Not back before the deadline: the device may still own the buffers.
    Timeout,
    /// The used ring returned something other than our chain.
    BadUsed,
}

impl Queue {
    /// Zeroed ring memory from the pool, with interrupts suppressed.
    pub fn new() -> Option<Self> {
        let base = pool::alloc(RING_BYTES, 0x1000)?.as_ptr() as u64;
        let q = Queue {
            base,
            avail_idx: 0,
            used_idx: 0,
        };
        q.w16(AVAIL, VRING_AVAIL_F_NO_INTERRUPT);
        Some(q)
    }

    /// Guest-physical addresses of (descriptor table, avail ring, used ring).
    pub fn areas(&self) -> (u64, u64, u64) {
        (self.base + DESC, self.base + AVAIL, self.base + USED)
    }

    fn w16(&self, off: u64, v: u16) {
        // SAFETY: `off` < RING_BYTES and even, so the address lies in this
        // queue's page of pool memory, which only this queue and the device
        // use; volatile because the device reads it.
        unsafe { core::ptr::write_volatile((self.base + off) as *mut u16, v) };
    }

    fn r16(&self, off: u64) -> u16 {
        // SAFETY: as in `w16`; volatile because the device writes it.
        unsafe { core::ptr::read_volatile((self.base + off) as *const u16) }
    }

    fn r32(&self, off: u64) -> u32 {
        // SAFETY: as in `w16` (4-aligned offsets only).
        unsafe { core::ptr::read_volatile((self.base + off) as *const u32) }
    }

    fn w32(&self, off: u64, v: u32) {
        // SAFETY: as in `w16` (4-aligned offsets only).
        unsafe { core::ptr::write_volatile((self.base + off) as *mut u32, v) };
    }

    fn w64(&self, off: u64, v: u64) {
        // SAFETY: as in `w16` (8-aligned offsets only).
        unsafe { core::ptr::write_volatile((self.base + off) as *mut u64, v) };
    }

    /// Descriptor `i` (< SIZE): 16 bytes at the start of the page.
    fn desc(&self, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let off = DESC + 16 * i;
        self.w64(off, addr);
        self.w32(off + 8, len);
        self.w16(off + 12, flags);
        self.w16(off + 14, next);
    }

    /// Posts the chain (`readable`, `writable`), calls `kick`, and waits
    /// up to `ms` milliseconds for it to come back. Returns the number of
    /// bytes the device wrote. The buffers must stay untouched until this
    /// returns `Ok` (after a timeout the queue must not be used again).
    pub fn transact(
        &mut self,
        readable: &[u8],
        writable: &mut [u8],
        kick: impl FnOnce(),
        ms: u64,
    ) -> Result<u32, QueueError> {
        self.desc(
            0,
            readable.as_ptr() as u64,
            readable.len() as u32,
            VIRTQ_DESC_F_NEXT,
            1,
        );
        self.desc(
            1,
            writable.as_mut_ptr() as u64,
            writable.len() as u32,
            VIRTQ_DESC_F_WRITE,
            0,
        );
        let slot = u64::from(self.avail_idx % SIZE);
        self.w16(AVAIL + 4 + 2 * slot, 0);
        // The descriptors and ring entry before the index (virtio 1.2, 2.7.13).
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.w16(AVAIL + 2, self.avail_idx);
        fence(Ordering::SeqCst);
        kick();
        let deadline = Deadline::after_ms(ms);
        while self.r16(USED + 2) == self.used_idx {
            if deadline.expired() {
                return Err(QueueError::Timeout);
            }
            core::hint::spin_loop();
        }
        // The used entry after its index.
        fence(Ordering::SeqCst);
        let slot = u64::from(self.used_idx % SIZE);
        let id = self.r32(USED + 4 + 8 * slot);
        let len = self.r32(USED + 4 + 8 * slot + 4);
        self.used_idx = self.used_idx.wrapping_add(1);
        if id != 0 {
            return Err(QueueError::BadUsed);
        }
        Ok(len)
    }
}
