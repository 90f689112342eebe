//! The virtio-blk device and the thread that serves its queue.
//!
//! A snapshot of it: [`VirtioDevice::quiesce`] stops taking requests and
//! waits until the pass being served (if any) is done, so that nothing
//! is in flight: every request taken is answered in guest memory. Its
//! state ([`BlkPersist`]) is the disk's size, read-only flag and ID, to
//! check that the restored VM gets the same disk; the queue is the
//! transport's.

use super::persist::{BLK_PERSIST_FORMAT, BlkPersist};
use super::queue::{self, Scratch};
use super::{
    BlockBackend, ID_LEN, MAX_ZEROES_SECTORS, MAX_ZEROES_SEG, QUEUE_SIZE, SECTOR_SIZE, SEG_MAX,
    VIRTIO_ID_BLOCK, features,
};
use crate::throttle::Throttle;
use crate::virtio::mmio::QueuePersist;
use crate::virtio::{
    ActivateContext, ActivateError, GuestMemoryMmap, VIRTIO_F_VERSION_1, VirtioDevice,
    VirtioInterrupt, read_config_bytes,
};
use serde::{Deserialize, Serialize};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

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
        }
    }
}

/// A guest disk.
pub struct Blk {
    disk: Arc<dyn BlockBackend>,
    acked: u64,
    counters: Arc<BlkCounters>,
    worker: Option<Worker>,
}

struct Worker {
    stop: EventFd,
    thread: JoinHandle<()>,
    shared: Arc<Shared>,
}

impl Blk {
    pub fn new(disk: Arc<dyn BlockBackend>) -> Blk {
        Blk {
            disk,
            acked: 0,
            counters: Arc::new(BlkCounters::default()),
            worker: None,
        }
    }

    pub fn counters(&self) -> Arc<BlkCounters> {
        self.counters.clone()
    }

    /// The disk's size in sectors, as the guest sees it.
    pub fn capacity_sectors(&self) -> u64 {
        self.disk.capacity() / SECTOR_SIZE
    }

    pub fn read_only(&self) -> bool {
        self.disk.read_only()
    }

    /// The disk's ID, as a GET_ID request returns it.
    pub fn id(&self) -> String {
        let mut id = self.disk.id();
        while id.len() > ID_LEN {
            id.pop();
        }
        id
    }

    /// The device's state for a snapshot.
    pub fn save(&self) -> BlkPersist {
        BlkPersist {
            format: BLK_PERSIST_FORMAT,
            capacity_sectors: self.capacity_sectors(),
            read_only: self.read_only(),
            id: self.id(),
            acked_features: self.acked,
        }
    }

    /// `virtio_blk_config` up to `write_zeroes_may_unmap` (virtio 1.2,
    /// 5.2.4), little-endian.
    fn config_bytes(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        c[0..8].copy_from_slice(&self.capacity_sectors().to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c[34..36].copy_from_slice(&1u16.to_le_bytes()); // num_queues
        if !self.read_only() {
            // max_discard_sectors, max_discard_seg, discard_sector_alignment
            c[36..40].copy_from_slice(&MAX_ZEROES_SECTORS.to_le_bytes());
            c[40..44].copy_from_slice(&MAX_ZEROES_SEG.to_le_bytes());
            c[44..48].copy_from_slice(&1u32.to_le_bytes());
            // max_write_zeroes_sectors, max_write_zeroes_seg, may_unmap
            c[48..52].copy_from_slice(&MAX_ZEROES_SECTORS.to_le_bytes());
            c[52..56].copy_from_slice(&MAX_ZEROES_SEG.to_le_bytes());
            c[56] = 1;
        }
        c
    }

    fn stop_worker(&mut self) {
        if let Some(w) = self.worker.take() {
            let _ = w.stop.write(1);
            if w.thread.join().is_err() {
                tracing::error!("virtio-blk worker panicked");
            }
        }
    }
}

impl Drop for Blk {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

impl VirtioDevice for Blk {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    /// VERSION_1, FLUSH, SEG_MAX, BLK_SIZE; RO on a read-only disk,
    /// DISCARD and WRITE_ZEROES on one that is not.
    fn features(&self) -> u64 {
        let mut bits = vec![
            VIRTIO_F_VERSION_1,
            features::FLUSH,
            features::SEG_MAX,
            features::BLK_SIZE,
        ];
        if self.read_only() {
            bits.push(features::RO);
        } else {
            bits.extend([features::DISCARD, features::WRITE_ZEROES]);
        }
        bits.iter().fold(0, |f, bit| f | (1u64 << bit))
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // Only `writeback` is writable, with CONFIG_WCE, not offered.
        tracing::debug!(offset, "virtio-blk: config write ignored");
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.stop_worker();
        let (Some(queue), Some(kick)) = (ctx.queues.into_iter().next(), ctx.queue_events.first())
        else {
            return Err(ActivateError::Device("no request queue".into()));
        };
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::Events)?;
        let epoll = Epoll::new().map_err(ActivateError::Events)?;
        for (fd, data) in [(stop.as_raw_fd(), 1), (kick.as_raw_fd(), 0)] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, data),
                )
                .map_err(ActivateError::Events)?;
        }
        let shared = Arc::new(Shared {
            mem: ctx.mem,
            active: Mutex::new(Active {
                queue,
                scratch: Scratch::default(),
            }),
            interrupt: ctx.interrupt,
            disk: self.disk.clone(),
            counters: self.counters.clone(),
            kick: kick.try_clone().map_err(ActivateError::Events)?,
            paused: AtomicBool::new(false),
            log: Throttle::default(),
        });
        let serve = Serve {
            shared: shared.clone(),
            epoll,
        };
        let thread = std::thread::Builder::new()
            .name("virtio-blk".into())
            .spawn(move || serve.run())
            .map_err(ActivateError::Events)?;
        self.worker = Some(Worker {
            stop,
            thread,
            shared,
        });
        tracing::debug!(
            sectors = self.capacity_sectors(),
            read_only = self.read_only(),
            "virtio-blk started"
        );
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
        self.acked = 0;
    }

    /// Takes no more requests, and waits for the pass being served: then
    /// nothing changes guest memory, the queue or the disk until
    /// [`Self::unquiesce`].
    fn quiesce(&mut self) {
        if let Some(w) = &self.worker {
            w.shared.paused.store(true, SeqCst);
            // A pass holds the lock throughout: once it is ours, none runs.
            drop(w.shared.active());
        }
    }

    fn unquiesce(&mut self) {
        if let Some(w) = &self.worker {
            w.shared.paused.store(false, SeqCst);
            // Requests the guest queued meanwhile are taken now.
            w.shared.come_back();
        }
    }

    fn can_snapshot(&self) -> Result<(), String> {
        Ok(())
    }

    fn queue_states(&self) -> Vec<QueuePersist> {
        self.worker.as_ref().map_or_else(Vec::new, |w| {
            vec![QueuePersist::from(&w.shared.active().queue)]
        })
    }

    fn save_device(&self) -> Result<Vec<u8>, String> {
        bitcode::serialize(&self.save()).map_err(|e| format!("virtio-blk: {e}"))
    }

    fn restore_device(&mut self, state: &[u8]) -> Result<(), String> {
        if self.worker.is_some() {
            return Err("the virtio-blk disk already runs: restore it before it starts".into());
        }
        let saved: BlkPersist = bitcode::deserialize(state)
            .map_err(|e| format!("the saved state of a virtio-blk disk cannot be read: {e}"))?;
        saved.check(&self.save())
    }
}

/// The queue and what serving it needs, under one lock.
struct Active {
    queue: Queue,
    scratch: Scratch,
}

/// What the device and its thread share.
struct Shared {
    mem: GuestMemoryMmap,
    active: Mutex<Active>,
    interrupt: Arc<VirtioInterrupt>,
    disk: Arc<dyn BlockBackend>,
    counters: Arc<BlkCounters>,
    /// The queue's event, to come back to a queue left with chains.
    kick: EventFd,
    /// A snapshot is being taken: no request is taken off the queue
    /// (read under the lock).
    paused: AtomicBool,
    /// Failed requests are logged the first few times, then thinner.
    log: Throttle,
}

impl Shared {
    fn active(&self) -> std::sync::MutexGuard<'_, Active> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn come_back(&self) {
        if let Err(e) = self.kick.write(1) {
            tracing::warn!("virtio-blk: cannot signal the queue: {e}");
        }
    }

    /// Serves what the guest has queued.
    fn take(&self) {
        if self.interrupt.needs_reset() {
            return;
        }
        let mut a = self.active();
        if self.paused.load(SeqCst) {
            return;
        }
        let Active { queue, scratch } = &mut *a;
        match queue::process(
            &self.mem,
            queue,
            &*self.disk,
            &self.counters,
            scratch,
            &self.log,
        ) {
            Ok(drained) => {
                if drained.used
                    && queue.needs_notification(&self.mem).unwrap_or(true)
                    && let Err(e) = self.interrupt.signal_used_queue()
                {
                    tracing::warn!("virtio-blk: cannot interrupt the guest: {e}");
                }
                if drained.more {
                    // A queue's worth served: come back after a look at
                    // the stop event.
                    self.come_back();
                }
            }
            Err(e) => self.interrupt.device_failed("virtio-blk", &e),
        }
    }
}

/// The device's thread: serves the queue when the guest kicks it, until
/// told to stop.
struct Serve {
    shared: Arc<Shared>,
    epoll: Epoll,
}

impl Serve {
    fn run(self) {
        let mut ready = [EpollEvent::default(); 2];
        // Requests queued before the thread started (a restored VM).
        self.shared.take();
        loop {
            let n = match self.epoll.wait(-1, &mut ready) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio-blk worker stops: {e}");
                    return;
                }
            };
            if ready[..n].iter().any(|ev| ev.data() == 1) {
                return;
            }
            let _ = self.shared.kick.read();
            self.shared.take();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::add_chain;
    use std::io;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    /// A disk in memory.
    struct MemDisk(Mutex<Vec<u8>>);

    impl BlockBackend for MemDisk {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
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

    #[test]
    fn the_thread_serves_kicks_pauses_for_a_snapshot_and_saves_the_disk() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let disk = Arc::new(MemDisk(Mutex::new(vec![5u8; 8192])));
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
        let mut again = Blk::new(Arc::new(MemDisk(Mutex::new(vec![0u8; 8192]))));
        again.restore_device(&saved).unwrap();
        let mut other = Blk::new(Arc::new(MemDisk(Mutex::new(vec![0u8; 4096]))));
        let e = other.restore_device(&saved).unwrap_err();
        assert!(e.contains("16 sectors"), "{e}");
        blk.reset();
        assert!(blk.queue_states().is_empty());
    }
}
