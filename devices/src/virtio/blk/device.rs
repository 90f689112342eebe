//! The virtio-blk device and the threads that serve its queue.
//!
//! Up to four threads wait for the guest's kick; the one it wakes takes
//! the requests off the queue and runs them against the disk, waking
//! another for the rest, and each goes back to the guest as soon as it
//! is done, in any order: a request that waits (on a remote block,
//! later) does not hold up the others (see [`Shared::work`]).
//!
//! A snapshot of it: [`VirtioDevice::quiesce`] stops taking requests and
//! waits, for at most [`QUIESCE_TIMEOUT`], until every request taken has
//! been answered, so that nothing is in flight; one still running then
//! makes [`VirtioDevice::save_device`] fail. Its state ([`BlkPersist`])
//! is the disk's size, read-only flag and ID, to check that the restored
//! VM gets the same disk; the queue is the transport's.

use super::persist::{BLK_PERSIST_FORMAT, BlkPersist};
use super::queue::{self, InFlight, Job, Scratch};
use super::rate_limit::{Limiter, RateLimit};
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
use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
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

/// How long a snapshot waits for the requests being run.
pub const QUIESCE_TIMEOUT: Duration = Duration::from_secs(10);

/// The most threads serving the queue: a request that waits on its
/// backend does not hold up the others behind it, up to this many at
/// once.
const THREADS: usize = 4;

/// The stop event's data in the epoll set.
const STOP: u64 = 1;

/// A guest disk.
pub struct Blk {
    disk: Arc<dyn BlockBackend>,
    acked: u64,
    counters: Arc<BlkCounters>,
    worker: Option<Worker>,
    /// Why the last quiesce did not settle (requests still running).
    unsettled: Option<String>,
    limit: RateLimit,
    /// The limit's buckets, kept across driver resets.
    limiter: Option<Arc<Limiter>>,
}

/// The device's threads, as the device holds them: they are not joined
/// (one may be waiting on a slow backend when the device stops, and a
/// reset must not wait for it); each ends once it sees the stop event,
/// and none gives an answer back once [`Shared::stop`] has returned.
struct Worker {
    shared: Arc<Shared>,
}

impl Blk {
    pub fn new(disk: Arc<dyn BlockBackend>) -> Blk {
        Blk {
            disk,
            acked: 0,
            counters: Arc::new(BlkCounters::default()),
            worker: None,
            unsettled: None,
            limit: RateLimit::default(),
            limiter: None,
        }
    }

    /// A disk whose requests are held to `limit`.
    pub fn with_rate_limit(disk: Arc<dyn BlockBackend>, limit: RateLimit) -> Blk {
        let mut blk = Blk::new(disk);
        blk.limit = limit;
        blk.limiter = (!limit.is_none()).then(|| Arc::new(Limiter::new(limit)));
        blk
    }

    pub fn rate_limit(&self) -> RateLimit {
        self.limit
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
            w.shared.stop();
            if let Err(e) = w.shared.stop_event.write(1) {
                tracing::warn!("virtio-blk: cannot stop the device's threads: {e}");
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
        // The device's own handle on the queue's event, which it watches.
        let kick = kick.try_clone().map_err(ActivateError::Events)?;
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::Events)?;
        let epoll = Epoll::new().map_err(ActivateError::Events)?;
        // The stop event stays set, so every thread sees it; a kick
        // wakes one waiting thread (edge-triggered: it is not seen again
        // until the next one).
        for (fd, data, set) in [
            (stop.as_raw_fd(), STOP, EventSet::IN),
            (kick.as_raw_fd(), 0, EventSet::IN | EventSet::EDGE_TRIGGERED),
        ] {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(set, data))
                .map_err(ActivateError::Events)?;
        }
        let shared = Arc::new(Shared {
            mem: ctx.mem,
            active: Mutex::new(Active {
                queue,
                in_flight: InFlight::default(),
                stopped: false,
            }),
            interrupt: ctx.interrupt,
            epoll,
            stop_event: stop,
            queued: Mutex::new(VecDeque::new()),
            limiter: self.limiter.clone(),
            disk: self.disk.clone(),
            counters: self.counters.clone(),
            kick,
            paused: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            log: Throttle::default(),
            threads: AtomicUsize::new(1),
            idle: AtomicUsize::new(0),
        });
        let first = shared.clone();
        std::thread::Builder::new()
            .name("virtio-blk-0".into())
            .spawn(move || first.work())
            .map_err(ActivateError::Events)?;
        // Requests queued before the threads started (a restored VM).
        shared.come_back();
        self.worker = Some(Worker { shared });
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

    /// Takes no more requests, and waits (at most [`QUIESCE_TIMEOUT`])
    /// until those taken are answered: then nothing changes guest memory,
    /// the queue or the disk until [`Self::unquiesce`].
    fn quiesce(&mut self) {
        self.unsettled = None;
        let Some(w) = &self.worker else {
            return;
        };
        w.shared.paused.store(true, SeqCst);
        let deadline = Instant::now() + QUIESCE_TIMEOUT;
        loop {
            // Under the lock: a pass that started before the pause has
            // put what it took in `in_flight`, and a later one takes
            // nothing.
            let held = w.shared.active().in_flight.len();
            if held == 0 {
                return;
            }
            if Instant::now() >= deadline {
                let why = format!(
                    "a virtio-blk disk still had {held} request(s) running after {QUIESCE_TIMEOUT:?}"
                );
                tracing::warn!("{why}");
                self.unsettled = Some(why);
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn unquiesce(&mut self) {
        self.unsettled = None;
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
        if let Some(why) = &self.unsettled {
            return Err(why.clone());
        }
        if self
            .worker
            .as_ref()
            .is_some_and(|w| !w.shared.paused.load(SeqCst))
        {
            return Err("a virtio-blk disk is not quiesced".into());
        }
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

/// The queue and the requests taken off it, under one lock.
struct Active {
    queue: Queue,
    in_flight: InFlight,
    /// The device stopped (a reset): nothing more goes back on the queue.
    stopped: bool,
}

/// What the device and its threads share.
struct Shared {
    mem: GuestMemoryMmap,
    active: Mutex<Active>,
    interrupt: Arc<VirtioInterrupt>,
    /// The queue's and the stop events, which the idle threads wait on.
    epoll: Epoll,
    /// Written once when the device stops, and never read: kept open
    /// until the last thread has seen it (an event closed before would
    /// leave the epoll set, and a thread waiting on it would stay, and
    /// take the next activation's kicks).
    stop_event: EventFd,
    /// Requests taken and not yet started.
    queued: Mutex<VecDeque<Job>>,
    limiter: Option<Arc<Limiter>>,
    disk: Arc<dyn BlockBackend>,
    counters: Arc<BlkCounters>,
    /// The queue's event, to come back to a queue left with chains.
    kick: EventFd,
    /// A snapshot is being taken: no request is taken off the queue
    /// (read under the lock).
    paused: AtomicBool,
    /// The device is stopping: requests not yet started are dropped.
    stopping: AtomicBool,
    /// Failed requests are logged the first few times, then thinner.
    log: Throttle,
    /// Threads started, and those waiting for a kick.
    threads: AtomicUsize,
    idle: AtomicUsize,
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

    fn notify(&self, queue: &mut Queue) {
        if queue.needs_notification(&self.mem).unwrap_or(true)
            && let Err(e) = self.interrupt.signal_used_queue()
        {
            tracing::warn!("virtio-blk: cannot interrupt the guest: {e}");
        }
    }

    /// Takes what the guest has queued and hands each request to
    /// `dispatch`.
    fn take(&self, mut dispatch: impl FnMut(Job)) {
        if self.interrupt.needs_reset() {
            return;
        }
        let mut taken = Vec::new();
        {
            let mut a = self.active();
            if self.paused.load(SeqCst) {
                // Taken when the snapshot is done (unquiesce kicks).
                return;
            }
            let Active {
                queue, in_flight, ..
            } = &mut *a;
            match queue::take(&self.mem, queue, in_flight, |job| taken.push(job)) {
                Ok(drained) => {
                    if drained.more {
                        // A queue's worth taken: come back after a look
                        // at the stop event.
                        self.come_back();
                    }
                }
                Err(e) => self.interrupt.device_failed("virtio-blk", &e),
            }
        }
        for job in taken {
            dispatch(job);
        }
    }

    /// Runs one request and gives its chain back; once the device has
    /// stopped (a reset), requests still queued are dropped unanswered,
    /// and one answered meanwhile does not go back (the queue may be the
    /// driver's new one at the same address by then).
    fn answer(&self, job: Job, scratch: &mut Scratch) {
        if self.stopping.load(Relaxed) || !self.admit(&job) {
            return;
        }
        let len = queue::run(
            &self.mem,
            &job,
            &*self.disk,
            &self.counters,
            scratch,
            &self.log,
        );
        let mut a = self.active();
        if a.stopped {
            return;
        }
        let Active {
            queue, in_flight, ..
        } = &mut *a;
        if queue::complete(&self.mem, queue, in_flight, job.head, len) {
            self.notify(queue);
        }
    }

    /// Waits until the rate limit lets `job` start; false if the device
    /// stopped meanwhile. A snapshot lets a waiting request through (it
    /// waits for the requests taken to be answered).
    fn admit(&self, job: &Job) -> bool {
        let Some(limiter) = &self.limiter else {
            return true;
        };
        let bytes = job.data_bytes(&self.mem);
        let mut counted = false;
        loop {
            let wait = limiter.admit(bytes, Instant::now());
            if wait.is_zero() || self.paused.load(SeqCst) {
                return true;
            }
            if self.stopping.load(Relaxed) {
                return false;
            }
            if !std::mem::replace(&mut counted, true) {
                self.counters.throttled.fetch_add(1, Relaxed);
            }
            // In slices, to see a stop or a snapshot.
            std::thread::sleep(wait.min(Duration::from_millis(10)));
        }
    }

    /// Stops the device: no answer goes back after this returns, and
    /// requests not yet started are dropped. Handlers busy with a request
    /// are not waited for; they drop its answer.
    fn stop(&self) {
        self.stopping.store(true, Relaxed);
        self.active().stopped = true;
    }
}

/// Each thread runs what is queued, then waits for the guest's kick,
/// takes the requests off the queue and runs the first. So a lone
/// request runs on the thread the kick woke (no hand-over between
/// threads, which costs more than the request on a loaded host); when it
/// leaves others queued behind it, it kicks the queue's event again
/// first, so that an idle thread takes them. A thread about to run a
/// request when no other waits for kicks starts one more (up to
/// [`THREADS`]): a slow request holds up nothing while there are fewer
/// than that many. A disk starts with one thread, and has two once the
/// guest uses it one request at a time.
impl Shared {
    /// Starts one more thread, unless there are [`THREADS`] already.
    fn grow(self: &Arc<Self>) {
        let n = self.threads.load(SeqCst);
        if n >= THREADS
            || self
                .threads
                .compare_exchange(n, n + 1, SeqCst, SeqCst)
                .is_err()
        {
            return;
        }
        let mine = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("virtio-blk-{n}"))
            .spawn(move || mine.work());
        if let Err(e) = spawned {
            self.threads.fetch_sub(1, SeqCst);
            tracing::warn!("virtio-blk: cannot start thread {n}: {e}");
        }
    }

    fn work(self: Arc<Self>) {
        let mut scratch = Scratch::default();
        let mut ready = [EpollEvent::default(); 2];
        loop {
            loop {
                if self.stopping.load(Relaxed) {
                    return;
                }
                let (job, more) = {
                    let mut q = self.queued();
                    (q.pop_front(), !q.is_empty())
                };
                let Some(job) = job else {
                    break;
                };
                if more {
                    self.come_back();
                }
                if self.idle.load(SeqCst) == 0 {
                    self.grow();
                }
                self.answer(job, &mut scratch);
            }
            self.idle.fetch_add(1, SeqCst);
            let woke = self.epoll.wait(-1, &mut ready);
            self.idle.fetch_sub(1, SeqCst);
            match woke {
                Ok(n) if ready[..n].iter().any(|ev| ev.data() == STOP) => {
                    self.stop();
                    return;
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio-blk: the device stops: {e}");
                    self.stop();
                    return;
                }
            }
            let kicked = self.kick.read().is_ok();
            if self.stopping.load(Relaxed) {
                // The device stopped, and the event may be the queue's
                // next activation's already (the same event): hand the
                // kick on to it.
                if kicked {
                    self.come_back();
                }
                return;
            }
            let mut taken = Vec::new();
            self.take(|job| taken.push(job));
            if !taken.is_empty() {
                self.queued().extend(taken);
            }
        }
    }

    fn queued(&self) -> std::sync::MutexGuard<'_, VecDeque<Job>> {
        self.queued.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
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
}
