//! What the device tests share: putting descriptor chains on a queue as
//! a driver would.

use super::GuestMemoryMmap;
use virtio_queue::desc::{RawDescriptor, split::Descriptor};
use virtio_queue::mock::MockSplitQueue;

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

/// Puts a chain of `(addr, len, device-writable)` descriptors, numbered
/// from `start`, on the avail ring of `q`.
pub fn add_chain(q: &MockSplitQueue<'_, GuestMemoryMmap>, start: u16, descs: &[(u64, u32, bool)]) {
    for (i, &(addr, len, writable)) in descs.iter().enumerate() {
        let idx = start + i as u16;
        let mut flags = if writable { VRING_DESC_F_WRITE } else { 0 };
        if i + 1 < descs.len() {
            flags |= VRING_DESC_F_NEXT;
        }
        q.desc_table()
            .store(
                idx,
                RawDescriptor::from(Descriptor::new(addr, len, flags, idx + 1)),
            )
            .unwrap();
    }
    let avail = q.avail();
    let i = avail.idx().load();
    avail
        .ring()
        .ref_at(usize::from(i))
        .unwrap()
        .store(u16::to_le(start));
    avail.idx().store(i.wrapping_add(1));
}
