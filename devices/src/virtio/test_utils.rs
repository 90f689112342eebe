//! What the device tests share: putting descriptor chains on a queue as
//! a driver would.

use super::GuestMemoryMmap;
use virtio_queue::desc::{RawDescriptor, split::Descriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress};

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

/// Runs `f` on a thread of its own and returns what it returns, failing
/// the test if it takes longer than `secs` (a device loop that spins
/// forever fails the test instead of hanging it).
pub fn finishes_within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("still running after {secs} s"))
}

/// Puts `n` more entries for chain `head` on the avail ring at `avail` (of
/// a queue of `size` entries) without any checks: what a buggy or hostile
/// driver can do.
pub fn repost(mem: &GuestMemoryMmap, avail: GuestAddress, size: u16, head: u16, n: u16) {
    let idx_at = avail.unchecked_add(2);
    for _ in 0..n {
        let i: u16 = mem.read_obj(idx_at).unwrap();
        let slot = avail.unchecked_add(4 + 2 * u64::from(i % size));
        mem.write_obj(head, slot).unwrap();
        mem.write_obj(i.wrapping_add(1), idx_at).unwrap();
    }
}

/// Counts the log events `f` makes on this thread.
pub fn count_log_events(f: impl FnOnce()) -> u64 {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tracing::span;

    struct Counter(Arc<AtomicU64>);
    impl tracing::Subscriber for Counter {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
            span::Id::from_u64(1)
        }
        fn record(&self, _: &span::Id, _: &span::Record<'_>) {}
        fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
        fn event(&self, _: &tracing::Event<'_>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
        fn enter(&self, _: &span::Id) {}
        fn exit(&self, _: &span::Id) {}
    }

    let n = Arc::new(AtomicU64::new(0));
    tracing::subscriber::with_default(Counter(n.clone()), f);
    n.load(Ordering::Relaxed)
}
