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

use super::metrics::BlkCounters;
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
use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

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
    /// How long a thread polls the queue after its last request.
    poll: Option<Duration>,
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
            poll: None,
        }
    }

    /// After each request, a thread watches the queue for `window`
    /// (spinning), the guest's notifications off meanwhile: a guest that
    /// sends one request after another then makes no VM exit for them.
    /// It costs a host core while the guest keeps the disk busy.
    pub fn with_poll(mut self, window: Duration) -> Blk {
        self.poll = (!window.is_zero()).then_some(window);
        self
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
            poll: self.poll,
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
        // What the guest wrote is on the disk for the restore to find: an
        // overlay's bitmap, above all, lives in memory until a flush.
        self.disk
            .flush()
            .map_err(|e| format!("virtio-blk: cannot flush the disk: {e}"))?;
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
    /// [`Blk::with_poll`].
    poll: Option<Duration>,
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
            let took = queue::take(&self.mem, queue, in_flight, |job| taken.push(job));
            if self.poll.is_some() && !taken.is_empty() {
                // The thread polls once this is answered: no kick needed.
                let _ = queue.disable_notification(&self.mem);
            }
            match took {
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
            if let Some(window) = self.poll
                && self.poll_for(window)
            {
                continue;
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

    /// Watches the queue for `window`; true if requests were taken (and
    /// queued for this thread). Notifications are on again when it
    /// returns false, and the queue was looked at after that.
    fn poll_for(&self, window: Duration) -> bool {
        let deadline = Instant::now() + window;
        let mut taken = Vec::new();
        loop {
            if self.stopping.load(Relaxed) {
                return false;
            }
            let waiting = {
                let a = self.active();
                a.queue
                    .avail_idx(&self.mem, std::sync::atomic::Ordering::Acquire)
                    .is_ok_and(|i| i.0 != a.queue.next_avail())
            };
            if waiting {
                self.take(|job| taken.push(job));
                if !taken.is_empty() {
                    self.queued().extend(taken);
                    return true;
                }
            }
            if Instant::now() >= deadline {
                break;
            }
            // Not a bare spin: a vCPU waiting for this core gets it.
            std::thread::yield_now();
        }
        // Back to kicks; a request that came before they were on is
        // taken now.
        let more = self
            .active()
            .queue
            .enable_notification(&self.mem)
            .unwrap_or(true);
        if more {
            self.take(|job| taken.push(job));
            if !taken.is_empty() {
                // Notifications were turned off again by the take.
                self.queued().extend(taken);
                return true;
            }
        }
        false
    }

    fn queued(&self) -> std::sync::MutexGuard<'_, VecDeque<Job>> {
        self.queued.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests;
