//! The device on its threads: kicks, slow requests, resets, snapshots.

use super::*;
use crate::virtio::test_utils::add_chain;
use std::io;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

/// A disk in memory; with a gate, a read of sector 0 waits until the
/// gate is opened (a remote block that is slow to come).
struct MemDisk(Mutex<Vec<u8>>, Option<Mutex<std::sync::mpsc::Receiver<()>>>);

impl BlockBackend for MemDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if let (0, Some(gate)) = (offset, &self.1) {
            let _ = gate.lock().unwrap().recv();
        }
        let d = self.0.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut d = self.0.lock().unwrap();
        d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64) -> io::Result<()> {
        Ok(())
    }
    fn capacity(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }
    fn read_only(&self) -> bool {
        false
    }
    fn id(&self) -> String {
        "mem".into()
    }
}

fn wait_for(what: &str, f: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// A started device on a 16-entry queue at 0, and its kick.
fn started(
    mem: &GuestMemoryMmap,
    disk: MemDisk,
) -> (
    Blk,
    MockSplitQueue<'_, GuestMemoryMmap>,
    EventFd,
    Arc<VirtioInterrupt>,
) {
    let mut blk = Blk::new(Arc::new(disk));
    blk.ack_features(1 << VIRTIO_F_VERSION_1);
    let mq = MockSplitQueue::create(mem, GuestAddress(0), 16);
    let evt = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let kick = evt();
    let interrupt = Arc::new(VirtioInterrupt::new(evt()));
    blk.activate(ActivateContext {
        mem: mem.clone(),
        queues: vec![mq.create_queue().unwrap()],
        queue_events: vec![kick.try_clone().unwrap()],
        interrupt: interrupt.clone(),
    })
    .unwrap();
    (blk, mq, kick, interrupt)
}

/// Posts a read of `sector` as chain `start` (3 descriptors), its
/// header at 0x8000 + 32 * start, data at 0x10000 + 512 * start.
fn post_read(
    mem: &GuestMemoryMmap,
    mq: &MockSplitQueue<'_, GuestMemoryMmap>,
    start: u16,
    sector: u64,
) {
    let hdr = 0x8000 + 32 * u64::from(start);
    mem.write_slice(&[0u8; 16], GuestAddress(hdr)).unwrap();
    mem.write_obj(sector, GuestAddress(hdr + 8)).unwrap();
    let data = 0x1_0000 + 512 * u64::from(start);
    add_chain(
        mq,
        start,
        &[
            (hdr, 16, false),
            (data, 512, true),
            (0xc000 + u64::from(start), 1, true),
        ],
    );
}

/// A driver that resets the device and sets it up again, on the same
/// queue event, gets its requests served each time: the threads of
/// the device it reset are gone and take none of its kicks.
#[test]
fn each_activation_after_a_reset_serves_the_queue() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let mut blk = Blk::new(Arc::new(MemDisk(Mutex::new(vec![1u8; 8192]), None)));
    let evt = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let kick = evt();
    let c = blk.counters();
    for round in 1..=20 {
        let mq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        blk.activate(ActivateContext {
            mem: mem.clone(),
            queues: vec![mq.create_queue().unwrap()],
            queue_events: vec![kick.try_clone().unwrap()],
            interrupt: Arc::new(VirtioInterrupt::new(evt())),
        })
        .unwrap();
        post_read(&mem, &mq, 0, 1);
        kick.write(1).unwrap();
        wait_for("the read is served", || c.snapshot().read_ops == round);
        blk.reset();
    }
}

#[test]
fn a_slow_request_does_not_hold_up_the_ones_behind_it() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let (open, gate) = std::sync::mpsc::channel();
    let disk = MemDisk(Mutex::new(vec![9u8; 8192]), Some(Mutex::new(gate)));
    let (blk, mq, kick, interrupt) = started(&mem, disk);
    let c = blk.counters();
    post_read(&mem, &mq, 0, 0);
    post_read(&mem, &mq, 3, 1);
    post_read(&mem, &mq, 6, 2);
    kick.write(1).unwrap();
    wait_for("the reads behind the slow one are answered", || {
        c.snapshot().read_ops == 2
    });
    let used = |i: u16| mq.used().ring().ref_at(usize::from(i)).unwrap().load().id();
    let mut first_two = [used(0), used(1)];
    first_two.sort();
    assert_eq!(first_two, [3, 6], "chain 0 is still out");
    // The driver makes chain 0 available again while the device still
    // holds it: the device fails, and the VM goes on.
    crate::virtio::test_utils::repost(&mem, mq.avail_addr(), 16, 0, 1);
    kick.write(1).unwrap();
    wait_for("the device fails", || interrupt.needs_reset());
    // The slow read still completes once its block comes.
    open.send(()).unwrap();
    wait_for("the slow read is answered", || c.snapshot().read_ops == 3);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x1_0000)).unwrap(), 9);
}

#[test]
fn the_thread_serves_kicks_pauses_for_a_snapshot_and_saves_the_disk() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let disk = Arc::new(MemDisk(Mutex::new(vec![5u8; 8192]), None));
    let mut blk = Blk::new(disk);
    assert_eq!(blk.features() & (1 << features::RO), 0);
    assert_ne!(blk.features() & (1 << features::DISCARD), 0);
    let mut cap = [0u8; 8];
    blk.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 16);
    blk.ack_features(1 << VIRTIO_F_VERSION_1);
    let mq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    let evt = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let kick = evt();
    let interrupt = Arc::new(VirtioInterrupt::new(evt()));
    blk.activate(ActivateContext {
        mem: mem.clone(),
        queues: vec![mq.create_queue().unwrap()],
        queue_events: vec![kick.try_clone().unwrap()],
        interrupt: interrupt.clone(),
    })
    .unwrap();
    // A read of sector 1.
    let read = |start: u16| {
        mem.write_slice(&[0u8; 16], GuestAddress(0x8000)).unwrap();
        mem.write_obj(1u64, GuestAddress(0x8008)).unwrap();
        add_chain(
            &mq,
            start,
            &[(0x8000, 16, false), (0x9000, 512, true), (0xa000, 1, true)],
        );
        kick.write(1).unwrap();
    };
    read(0);
    let c = blk.counters();
    wait_for("the read is served", || c.snapshot().read_ops == 1);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x9000)).unwrap(), 5);
    assert_ne!(interrupt.status() & crate::virtio::INT_USED_RING, 0);

    // Quiesced: a kick is not served until unquiesce.
    blk.quiesce();
    read(3);
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(c.snapshot().read_ops, 1);
    let q = blk.queue_states();
    assert_eq!((q.len(), q[0].next_avail, q[0].next_used), (1, 1, 1));
    let saved = blk.save_device().unwrap();
    blk.unquiesce();
    wait_for("the read is served after the snapshot", || {
        c.snapshot().read_ops == 2
    });

    // The same disk restores; another size does not.
    let mut again = Blk::new(Arc::new(MemDisk(Mutex::new(vec![0u8; 8192]), None)));
    again.restore_device(&saved).unwrap();
    let mut other = Blk::new(Arc::new(MemDisk(Mutex::new(vec![0u8; 4096]), None)));
    let e = other.restore_device(&saved).unwrap_err();
    assert!(e.contains("16 sectors"), "{e}");
    blk.reset();
    assert!(blk.queue_states().is_empty());
}
