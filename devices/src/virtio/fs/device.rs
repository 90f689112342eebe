//! The virtio-fs device and the thread that serves its queues.
//!
//! A snapshot of it: [`VirtioDevice::quiesce`] stops taking requests off
//! the queues and waits, for at most [`QUIESCE_TIMEOUT`], until every
//! request taken has been answered (the requests the device holds are
//! drained, not saved), so that guest memory, the used rings and the FUSE
//! server's session stay still; a request still being answered then
//! (one waiting on a slow server) makes [`VirtioDevice::save_device`]
//! fail, rather than save a session that changes while it is saved. The
//! device's state is its tag and the server's session
//! ([`super::persist::FsPersist`]); the queues are the transport's.

use super::persist::{FS_PERSIST_FORMAT, FsPersist};
use super::queue::{self, InFlight, Job};
use super::{FuseServer, MAX_REQUEST, QUEUE_SIZE, TAG_LEN, Tag, VIRTIO_ID_FS};
use crate::virtio::mmio::QueuePersist;
use crate::virtio::{
    ActivateContext, ActivateError, GuestMemoryMmap, VIRTIO_F_VERSION_1, VirtioDevice,
    VirtioInterrupt,
};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("the tag {0:?} is empty, longer than {TAG_LEN} bytes, or holds a NUL")]
    BadTag(String),
}

/// What the device counts.
#[derive(Debug, Default)]
pub struct FsCounters {
    pub requests: AtomicU64,
    pub malformed: AtomicU64,
}

/// How long a snapshot waits for the requests being answered.
pub const QUIESCE_TIMEOUT: Duration = Duration::from_secs(10);

/// A file share the guest mounts by its tag (`mount -t virtiofs TAG DIR`).
pub struct Fs {
    tag: Tag,
    server: Arc<dyn FuseServer>,
    counters: Arc<FsCounters>,
    worker: Option<Worker>,
    quiesce_timeout: Duration,
    /// Why the last quiesce did not settle (requests still answered).
    unsettled: Option<String>,
}

struct Worker {
    stop: EventFd,
    thread: JoinHandle<()>,
    shared: Arc<Shared>,
}

impl Fs {
    pub fn new(tag: &str, server: Arc<dyn FuseServer>) -> Result<Fs, FsError> {
        Ok(Fs {
            tag: Tag::new(tag).ok_or_else(|| FsError::BadTag(tag.into()))?,
            server,
            counters: Arc::new(FsCounters::default()),
            worker: None,
            quiesce_timeout: QUIESCE_TIMEOUT,
            unsettled: None,
        })
    }

    #[cfg(test)]
    fn set_quiesce_timeout(&mut self, timeout: Duration) {
        self.quiesce_timeout = timeout;
    }

    pub fn tag(&self) -> &str {
        self.tag.as_str()
    }

    pub fn counters(&self) -> Arc<FsCounters> {
        self.counters.clone()
    }

    fn stop_worker(&mut self) {
        if let Some(w) = self.worker.take() {
            let _ = w.stop.write(1);
            if w.thread.join().is_err() {
                tracing::error!("virtio-fs worker panicked");
            }
        }
    }
}

impl Drop for Fs {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    /// The high-priority queue, then one request queue.
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, _features: u64) {}

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.tag.read_config(1, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!(offset, "virtio-fs: config write ignored");
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.stop_worker();
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::Events)?;
        let epoll = Epoll::new().map_err(ActivateError::Events)?;
        let watch = |fd: i32, data: u64| {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, data),
                )
                .map_err(ActivateError::Events)
        };
        watch(stop.as_raw_fd(), u64::MAX)?;
        for (i, evt) in ctx.queue_events.iter().enumerate() {
            watch(evt.as_raw_fd(), i as u64)?;
        }
        let shared = Arc::new(Shared {
            mem: ctx.mem,
            queues: ctx
                .queues
                .into_iter()
                .map(|queue| {
                    Mutex::new(RequestQueue {
                        queue,
                        in_flight: InFlight::default(),
                        throttled: false,
                        stopped: false,
                    })
                })
                .collect(),
            interrupt: ctx.interrupt,
            server: self.server.clone(),
            counters: self.counters.clone(),
            kicks: ctx
                .queue_events
                .iter()
                .map(EventFd::try_clone)
                .collect::<Result<_, _>>()
                .map_err(ActivateError::Events)?,
            stopping: AtomicBool::new(false),
            paused: AtomicBool::new(false),
        });
        let serve = Serve {
            shared: shared.clone(),
            events: ctx.queue_events,
            epoll,
        };
        let thread = std::thread::Builder::new()
            .name(format!("virtio-fs-{}", self.tag()))
            .spawn(move || serve.run())
            .map_err(ActivateError::Events)?;
        self.worker = Some(Worker {
            stop,
            thread,
            shared,
        });
        tracing::debug!(tag = self.tag(), "virtio-fs started");
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
    }

    /// Takes no more requests, and waits (at most the quiesce time-out)
    /// until those taken are answered: then nothing changes guest memory,
    /// the queues or the server's session until [`Self::unquiesce`].
    fn quiesce(&mut self) {
        self.unsettled = None;
        let Some(w) = &self.worker else {
            return;
        };
        let shared = &w.shared;
        shared.paused.store(true, SeqCst);
        let deadline = Instant::now() + self.quiesce_timeout;
        loop {
            // Under each queue's lock: a pass that started before the
            // pause has put what it took in `in_flight`, and a later one
            // sees the pause and takes nothing.
            let held: usize = (0..shared.queues.len())
                .map(|i| shared.queue(i).in_flight.len())
                .sum();
            if held == 0 {
                return;
            }
            if Instant::now() >= deadline {
                let why = format!(
                    "the virtio-fs share {:?} still had {held} request(s) being answered after {:?}",
                    self.tag(),
                    self.quiesce_timeout
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
        let Some(w) = &self.worker else {
            return;
        };
        w.shared.paused.store(false, SeqCst);
        // Requests the guest queued meanwhile are taken now.
        for i in 0..w.shared.queues.len() {
            w.shared.kick(i);
        }
    }

    fn can_snapshot(&self) -> Result<(), String> {
        Ok(())
    }

    fn queue_states(&self) -> Vec<QueuePersist> {
        self.worker.as_ref().map_or_else(Vec::new, |w| {
            (0..w.shared.queues.len())
                .map(|i| QueuePersist::from(&w.shared.queue(i).queue))
                .collect()
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
            return Err(format!(
                "the virtio-fs share {:?} is not quiesced",
                self.tag()
            ));
        }
        let session = self
            .server
            .save_session()
            .map_err(|e| format!("the virtio-fs share {:?}: {e}", self.tag()))?;
        bitcode::serialize(&FsPersist {
            format: FS_PERSIST_FORMAT,
            tag: self.tag().into(),
            session,
        })
        .map_err(|e| format!("the virtio-fs share {:?}: {e}", self.tag()))
    }

    fn restore_device(&mut self, state: &[u8]) -> Result<(), String> {
        let tag = self.tag().to_string();
        if self.worker.is_some() {
            return Err(format!(
                "the virtio-fs share {tag:?} already runs: restore it before it starts"
            ));
        }
        let saved: FsPersist = bitcode::deserialize(state).map_err(|e| {
            format!("the saved state of virtio-fs share {tag:?} cannot be read: {e}")
        })?;
        if saved.format != FS_PERSIST_FORMAT {
            return Err(format!(
                "the saved state of virtio-fs share {tag:?} is in format {}; this build reads format {FS_PERSIST_FORMAT}",
                saved.format
            ));
        }
        if saved.tag != tag {
            return Err(format!(
                "the snapshot's virtio-fs share is {:?}, the one being restored is {tag:?}",
                saved.tag
            ));
        }
        self.server
            .restore_session(&saved.session)
            .map_err(|e| format!("virtio-fs share {tag:?}: {e}"))
    }
}

/// Threads answering requests: a request that waits on the remote server
/// (a cold read, say) does not hold up the others behind it.
const HANDLERS: usize = 4;

/// The largest request the high-priority queue takes: Linux sends only
/// FORGET and INTERRUPT there (a header and a few words).
const MAX_HIPRIO_REQUEST: usize = 4096;

/// A queue and the requests taken off it that are not answered yet.
struct RequestQueue {
    queue: Queue,
    in_flight: InFlight,
    /// The queue stopped taking requests at its byte budget: the answer
    /// that frees room signals its event.
    throttled: bool,
    /// The device stopped (a reset): nothing more goes back on this queue.
    stopped: bool,
}

/// What the queue thread and the handlers share.
struct Shared {
    mem: GuestMemoryMmap,
    queues: Vec<Mutex<RequestQueue>>,
    interrupt: Arc<VirtioInterrupt>,
    server: Arc<dyn FuseServer>,
    counters: Arc<FsCounters>,
    /// Each queue's event, to come back to a queue left with chains.
    kicks: Vec<EventFd>,
    /// The device is stopping: requests not yet started are dropped.
    stopping: AtomicBool,
    /// A snapshot is being taken: no request is taken off the queues
    /// (read under a queue's lock).
    paused: AtomicBool,
}

impl Shared {
    fn queue(&self, i: usize) -> std::sync::MutexGuard<'_, RequestQueue> {
        self.queues[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells the guest about chains given back on queue `i`.
    fn notify(&self, q: &mut Queue) {
        if q.needs_notification(&self.mem).unwrap_or(true)
            && let Err(e) = self.interrupt.signal_used_queue()
        {
            tracing::warn!("virtio-fs: cannot interrupt the guest: {e}");
        }
    }

    /// Answers one request and gives its chain back; once the device has
    /// stopped (a reset), requests still queued are dropped unanswered,
    /// and one answered meanwhile does not go back (the queue may be the
    /// driver's new one at the same address by then).
    fn answer(&self, i: usize, job: Job) {
        if self.stopping.load(Relaxed) {
            return;
        }
        let reply = self.server.handle(&job.request);
        let mut q = self.queue(i);
        if q.stopped {
            return;
        }
        let RequestQueue {
            queue,
            in_flight,
            throttled,
            ..
        } = &mut *q;
        if queue::complete(&self.mem, queue, in_flight, job, reply.as_deref()) {
            self.notify(queue);
        }
        if *throttled && !in_flight.full() {
            *throttled = false;
            self.kick(i);
        }
    }

    /// Has the queue thread come back to queue `i`.
    fn kick(&self, i: usize) {
        if let Some(Err(e)) = self.kicks.get(i).map(|k| k.write(1)) {
            tracing::warn!("virtio-fs: cannot signal queue {i}: {e}");
        }
    }

    /// Stops the device: no answer goes back after this returns, and
    /// requests not yet started are dropped. Handlers busy with a request
    /// are not waited for (it may wait on the remote server for a
    /// minute); they drop its answer.
    fn stop(&self) {
        self.stopping.store(true, Relaxed);
        for i in 0..self.queues.len() {
            self.queue(i).stopped = true;
        }
    }
}

/// The queue thread: takes requests off the queues when the guest kicks
/// them and hands them to the handlers, until told to stop.
struct Serve {
    shared: Arc<Shared>,
    events: Vec<EventFd>,
    epoll: Epoll,
}

impl Serve {
    fn run(self) {
        let (jobs, rx) = mpsc::channel::<(usize, Job)>();
        let rx = Arc::new(Mutex::new(rx));
        // Not joined: a handler may be waiting on the remote server when
        // the device stops, and a reset must not wait for it. Each ends
        // once the channel is closed and its request is done.
        let handlers: Vec<JoinHandle<()>> = (0..HANDLERS)
            .filter_map(|n| {
                let (shared, rx) = (self.shared.clone(), rx.clone());
                std::thread::Builder::new()
                    .name(format!("virtio-fs-h{n}"))
                    .spawn(move || {
                        loop {
                            let next = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                            match next {
                                Ok((i, job)) => shared.answer(i, job),
                                Err(_) => return,
                            }
                        }
                    })
                    .map_err(|e| tracing::warn!("virtio-fs: a handler thread: {e}"))
                    .ok()
            })
            .collect();
        // Without handlers the queue thread answers requests itself.
        let dispatch = |i: usize, job: Job| {
            if handlers.is_empty() {
                self.shared.answer(i, job);
            } else if let Err(mpsc::SendError((i, job))) = jobs.send((i, job)) {
                self.shared.answer(i, job);
            }
        };
        let mut ready = [EpollEvent::default(); 4];
        // Requests queued before the worker started.
        for i in 0..self.shared.queues.len() {
            self.take(i, &dispatch);
        }
        loop {
            let n = match self.epoll.wait(-1, &mut ready) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio-fs worker stops: {e}");
                    break;
                }
            };
            if ready[..n].iter().any(|ev| ev.data() == u64::MAX) {
                break;
            }
            for ev in &ready[..n] {
                let i = ev.data() as usize;
                if let Some(evt) = self.events.get(i) {
                    let _ = evt.read();
                    self.take(i, &dispatch);
                }
            }
        }
        self.shared.stop();
        drop(jobs);
        drop(handlers);
    }

    fn take(&self, i: usize, dispatch: &impl Fn(usize, Job)) {
        let s = &self.shared;
        if i >= s.queues.len() {
            return;
        }
        if s.interrupt.needs_reset() {
            return;
        }
        let mut pass = queue::Pass::default();
        let mut taken = Vec::new();
        let max_request = if i == 0 {
            MAX_HIPRIO_REQUEST
        } else {
            MAX_REQUEST
        };
        {
            let mut q = s.queue(i);
            if s.paused.load(SeqCst) {
                // Taken when the snapshot is done (unquiesce kicks).
                return;
            }
            let RequestQueue {
                queue,
                in_flight,
                throttled,
                ..
            } = &mut *q;
            match queue::take(&s.mem, queue, in_flight, max_request, &mut pass, |job| {
                taken.push(job)
            }) {
                Ok(drained) => {
                    // Malformed chains went back at once.
                    if drained.used {
                        s.notify(queue);
                    }
                    if drained.more {
                        if in_flight.full() {
                            // The answer that frees room comes back.
                            *throttled = true;
                        } else {
                            // A queue's worth taken: come back after the
                            // other events.
                            s.kick(i);
                        }
                    }
                }
                Err(e) => s.interrupt.device_failed("virtio-fs", &e),
            }
        }
        s.counters.requests.fetch_add(pass.requests, Relaxed);
        s.counters.malformed.fetch_add(pass.malformed, Relaxed);
        for job in taken {
            dispatch(i, job);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nobody;
    impl FuseServer for Nobody {
        fn handle(&self, _request: &[u8]) -> Option<Vec<u8>> {
            None
        }
    }

    #[test]
    fn tag_and_queue_count_are_in_config_space() {
        let fs = Fs::new("data", Arc::new(Nobody)).unwrap();
        let mut tag = [0u8; TAG_LEN];
        fs.read_config(0, &mut tag);
        assert_eq!(&tag[..5], b"data\0");
        let mut n = [0u8; 4];
        fs.read_config(TAG_LEN as u64, &mut n);
        assert_eq!(u32::from_le_bytes(n), 1);
        assert_eq!(fs.queue_max_sizes().len(), 2);
    }

    #[test]
    fn bad_tags_are_refused() {
        for bad in ["", "a\0b", &"x".repeat(TAG_LEN + 1)] {
            assert!(Fs::new(bad, Arc::new(Nobody)).is_err(), "{bad:?}");
        }
        assert!(Fs::new(&"x".repeat(TAG_LEN), Arc::new(Nobody)).is_ok());
    }

    /// Holds request 1 until request 2 has been answered (or 10 s went
    /// by), as a request waiting on the remote server would.
    #[derive(Default)]
    struct Slow {
        second_done: Mutex<bool>,
        done: std::sync::Condvar,
        first_saw_second: AtomicBool,
    }

    impl FuseServer for Slow {
        fn handle(&self, request: &[u8]) -> Option<Vec<u8>> {
            let unique = u64::from_le_bytes(request[8..16].try_into().unwrap());
            if unique == 1 {
                let g = self.second_done.lock().unwrap();
                let (g, _) = self
                    .done
                    .wait_timeout_while(g, std::time::Duration::from_secs(10), |d| !*d)
                    .unwrap();
                self.first_saw_second.store(*g, Relaxed);
            } else {
                *self.second_done.lock().unwrap() = true;
                self.done.notify_all();
            }
            let mut r = vec![0u8; 16];
            r[..4].copy_from_slice(&16u32.to_le_bytes());
            r[8..16].copy_from_slice(&unique.to_le_bytes());
            Some(r)
        }
    }

    #[test]
    fn a_slow_request_does_not_hold_up_the_next() {
        use crate::virtio::test_utils::add_chain;
        use virtio_queue::mock::MockSplitQueue;
        use vm_memory::{Bytes, GuestAddress};

        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
        let hiprio = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let requests = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        // Two requests (ids 1 and 2), each a readable and a writable
        // descriptor.
        for (n, unique) in [(0u16, 1u64), (1, 2)] {
            let mut req = vec![0u8; 40];
            req[..4].copy_from_slice(&40u32.to_le_bytes());
            req[4..8].copy_from_slice(&3u32.to_le_bytes()); // GETATTR
            req[8..16].copy_from_slice(&unique.to_le_bytes());
            let at = u64::from(n) * 0x1000;
            mem.write_slice(&req, GuestAddress(0x10_0000 + at)).unwrap();
            add_chain(
                &requests,
                2 * n,
                &[(0x10_0000 + at, 40, false), (0x20_0000 + at, 64, true)],
            );
        }
        let server = Arc::new(Slow::default());
        let mut fs = Fs::new("data", server.clone()).unwrap();
        let evt = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        fs.activate(ActivateContext {
            mem: mem.clone(),
            queues: vec![
                hiprio.create_queue().unwrap(),
                requests.create_queue().unwrap(),
            ],
            queue_events: vec![evt(), evt()],
            interrupt: Arc::new(VirtioInterrupt::new(evt())),
        })
        .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while requests.used().idx().load() < 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "requests not answered"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(
            server.first_saw_second.load(Relaxed),
            "request 2 waited for request 1"
        );
        // Both replies are where the guest put room for them.
        for (n, unique) in [(0u64, 1u64), (1, 2)] {
            let got: u64 = mem
                .read_obj(GuestAddress(0x20_0000 + n * 0x1000 + 8))
                .unwrap();
            assert_eq!(got, unique);
        }
        let c = fs.counters();
        assert_eq!(c.requests.load(Relaxed), 2);
    }

    /// Holds every request until opened (or 10 s went by), counting those
    /// it started on.
    #[derive(Default)]
    struct Gate {
        open: Mutex<bool>,
        opened: std::sync::Condvar,
        started: AtomicU64,
    }

    impl Gate {
        fn open(&self) {
            *self.open.lock().unwrap() = true;
            self.opened.notify_all();
        }

        fn wait_started(&self, n: u64) {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while self.started.load(Relaxed) < n {
                assert!(std::time::Instant::now() < deadline, "requests not started");
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
    }

    impl FuseServer for Gate {
        fn handle(&self, _request: &[u8]) -> Option<Vec<u8>> {
            self.started.fetch_add(1, Relaxed);
            let g = self.open.lock().unwrap();
            let _ = self
                .opened
                .wait_timeout_while(g, std::time::Duration::from_secs(10), |o| !*o)
                .unwrap();
            None
        }

        fn save_session(&self) -> Result<Vec<u8>, String> {
            Ok(b"gate".to_vec())
        }
    }

    /// A started share whose request queue (16 entries) holds `n` GETATTR
    /// requests, heads 0, 2, 4, ...
    struct Started {
        fs: Fs,
        interrupt: Arc<VirtioInterrupt>,
        kick: EventFd,
        mem: GuestMemoryMmap,
        avail: vm_memory::GuestAddress,
        used: vm_memory::GuestAddress,
    }

    fn started_share(
        server: Arc<dyn FuseServer>,
        n: u16,
        tweak: impl FnOnce(&GuestMemoryMmap, vm_memory::GuestAddress),
    ) -> Started {
        use crate::virtio::test_utils::add_chain;
        use virtio_queue::mock::MockSplitQueue;
        use vm_memory::{Bytes, GuestAddress};

        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
        let hiprio = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let requests = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        for i in 0..n {
            let mut req = vec![0u8; 40];
            req[..4].copy_from_slice(&40u32.to_le_bytes());
            req[4..8].copy_from_slice(&3u32.to_le_bytes()); // GETATTR
            req[8..16].copy_from_slice(&u64::from(i + 1).to_le_bytes());
            let at = 0x10_0000 + u64::from(i) * 0x1000;
            mem.write_slice(&req, GuestAddress(at)).unwrap();
            add_chain(&requests, 2 * i, &[(at, 40, false), (at + 0x800, 64, true)]);
        }
        tweak(&mem, requests.avail_addr());
        let mut fs = Fs::new("data", server).unwrap();
        let evt = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new(evt()));
        let kick = evt();
        fs.activate(ActivateContext {
            mem: mem.clone(),
            queues: vec![
                hiprio.create_queue().unwrap(),
                requests.create_queue().unwrap(),
            ],
            queue_events: vec![evt(), kick.try_clone().unwrap()],
            interrupt: interrupt.clone(),
        })
        .unwrap();
        Started {
            fs,
            interrupt,
            kick,
            avail: requests.avail_addr(),
            used: requests.used_addr(),
            mem,
        }
    }

    /// A ring whose avail index runs past its size fails the device, and
    /// a later reset (which waits for the queue thread) returns.
    #[test]
    fn a_broken_ring_fails_the_device_and_reset_still_returns() {
        use crate::virtio::test_utils::{finishes_within, repost};
        let needs_reset = finishes_within(10, || {
            let mut s = started_share(Arc::new(Nobody), 1, |m, a| repost(m, a, 16, 0, 20));
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while !s.interrupt.needs_reset() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            let failed = s.interrupt.needs_reset();
            s.fs.reset();
            failed
        });
        assert!(needs_reset);
    }

    /// A chain made available again while its request is still being
    /// answered is a driver error: the device fails instead of queueing
    /// another copy of the request.
    #[test]
    fn a_chain_posted_again_while_held_fails_the_device() {
        use crate::virtio::test_utils::repost;

        let gate = Arc::new(Gate::default());
        let s = started_share(gate.clone(), 1, |_, _| {});
        gate.wait_started(1);
        // The driver posts head 0 again, 15 times, and kicks.
        repost(&s.mem, s.avail, 16, 0, 15);
        s.kick.write(1).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !s.interrupt.needs_reset() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert!(s.interrupt.needs_reset());
        gate.open();
        drop(s);
        assert_eq!(gate.started.load(Relaxed), 1, "the copies were not run");
    }

    /// Waits until no handler thread holds `server` any more (the test's
    /// own reference and the device's remain).
    fn wait_handlers_gone(server: &Arc<Gate>) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while Arc::strong_count(server) > 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "handlers still running"
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// A reset drops the requests the handlers have not started on.
    #[test]
    fn reset_drops_queued_requests() {
        let gate = Arc::new(Gate::default());
        let mut s = started_share(gate.clone(), 8, |_, _| {});
        gate.wait_started(HANDLERS as u64);
        s.fs.reset();
        gate.open();
        wait_handlers_gone(&gate);
        assert_eq!(gate.started.load(Relaxed), HANDLERS as u64);
        use vm_memory::{Address, Bytes};
        let used_idx: u16 = s.mem.read_obj(s.used.unchecked_add(2)).unwrap();
        assert_eq!(used_idx, 0, "no answer went back after the reset");
    }

    /// A reset (a guest write to Status, on a vCPU) does not wait for a
    /// request stuck on the remote server.
    #[test]
    fn reset_does_not_wait_for_a_request_on_the_server() {
        use crate::virtio::test_utils::finishes_within;
        let gate = Arc::new(Gate::default());
        let s = started_share(gate.clone(), 1, |_, _| {});
        gate.wait_started(1);
        let mut fs = s.fs;
        finishes_within(5, move || fs.reset());
        gate.open();
        wait_handlers_gone(&gate);
    }

    /// Requests held past the byte budget stay on the ring until answers
    /// free room; then they are taken and answered too.
    #[test]
    fn held_requests_are_bounded_in_bytes() {
        use super::queue::MAX_HELD_BYTES;
        use crate::virtio::test_utils::add_chain;
        use virtio_queue::mock::MockSplitQueue;
        use vm_memory::{Bytes, GuestAddress};

        const MIB: u32 = 1 << 20;
        let n = (MAX_HELD_BYTES / MIB as usize) as u16 + 8;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x200_0000)]).unwrap();
        let hiprio = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let requests = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 128);
        // Every request is the same 1 MiB GETATTR (a header, then
        // padding), as a guest can post the same buffer again and again.
        let mut req = vec![0u8; 40];
        req[..4].copy_from_slice(&MIB.to_le_bytes());
        req[4..8].copy_from_slice(&3u32.to_le_bytes());
        mem.write_slice(&req, GuestAddress(0x100_0000)).unwrap();
        for i in 0..n {
            let reply = 0x10_0000 + u64::from(i) * 0x100;
            add_chain(
                &requests,
                2 * i,
                &[(0x100_0000, MIB, false), (reply, 64, true)],
            );
        }
        let gate = Arc::new(Gate::default());
        let mut fs = Fs::new("data", gate.clone()).unwrap();
        let evt = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        fs.activate(ActivateContext {
            mem: mem.clone(),
            queues: vec![
                hiprio.create_queue().unwrap(),
                requests.create_queue().unwrap(),
            ],
            queue_events: vec![evt(), evt()],
            interrupt: Arc::new(VirtioInterrupt::new(evt())),
        })
        .unwrap();
        gate.wait_started(HANDLERS as u64);
        let taken = fs.counters().requests.load(Relaxed);
        assert_eq!(taken, (MAX_HELD_BYTES / MIB as usize) as u64);
        gate.open();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while requests.used().idx().load() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "{} of {n} answered",
                requests.used().idx().load()
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(fs.counters().requests.load(Relaxed), u64::from(n));
    }

    /// The index of the used ring at `used`.
    fn used_idx(mem: &GuestMemoryMmap, used: vm_memory::GuestAddress) -> u16 {
        use vm_memory::{Address, Bytes};
        mem.read_obj(used.unchecked_add(2)).unwrap()
    }

    fn wait_used(s: &Started, n: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while used_idx(&s.mem, s.used) < n {
            assert!(Instant::now() < deadline, "{n} answers did not come");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// A snapshot's quiesce waits until the requests being answered are
    /// answered, takes no new ones meanwhile, and the device then saves;
    /// requests queued meanwhile are taken once it goes on.
    #[test]
    fn quiesce_waits_for_the_requests_being_answered() {
        use vm_memory::{Address, Bytes};
        let gate = Arc::new(Gate::default());
        // Three requests on the ring, the third not made available yet.
        let mut s = started_share(gate.clone(), 3, |m, avail| {
            m.write_obj(2u16, avail.unchecked_add(2)).unwrap();
        });
        gate.wait_started(2);
        let quiesced = std::thread::scope(|scope| {
            let fs = &mut s.fs;
            let q = scope.spawn(move || {
                fs.quiesce();
                Instant::now()
            });
            std::thread::sleep(Duration::from_millis(200));
            assert!(!q.is_finished(), "quiesce returned with requests held");
            let opened = Instant::now();
            gate.open();
            let quiesced = q.join().unwrap();
            assert!(quiesced >= opened);
            quiesced
        });
        assert!(quiesced.elapsed() < Duration::from_secs(5));
        assert_eq!(
            used_idx(&s.mem, s.used),
            2,
            "both answered before it returned"
        );
        // The guest makes the third available and kicks: not taken.
        s.mem.write_obj(3u16, s.avail.unchecked_add(2)).unwrap();
        s.kick.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(s.fs.counters().requests.load(Relaxed), 2);
        assert_eq!(used_idx(&s.mem, s.used), 2);
        let queues = s.fs.queue_states();
        assert_eq!(queues.len(), 2);
        assert_eq!((queues[1].next_avail, queues[1].next_used), (2, 2));
        let saved: FsPersist = bitcode::deserialize(&s.fs.save_device().unwrap()).unwrap();
        assert_eq!(
            saved,
            FsPersist {
                format: FS_PERSIST_FORMAT,
                tag: "data".into(),
                session: b"gate".to_vec(),
            }
        );
        s.fs.unquiesce();
        wait_used(&s, 3);
        assert_eq!(s.fs.counters().requests.load(Relaxed), 3);
    }

    /// A request still being answered when the quiesce time-out passes
    /// fails the snapshot instead of saving a session that changes; the
    /// device goes on, and a later snapshot succeeds.
    #[test]
    fn a_request_answered_past_the_time_out_fails_the_snapshot() {
        let gate = Arc::new(Gate::default());
        let mut s = started_share(gate.clone(), 1, |_, _| {});
        gate.wait_started(1);
        s.fs.set_quiesce_timeout(Duration::from_millis(100));
        let t0 = Instant::now();
        s.fs.quiesce();
        assert!(t0.elapsed() >= Duration::from_millis(100));
        let err = s.fs.save_device().unwrap_err();
        assert!(
            err.contains("still had 1 request(s) being answered"),
            "{err}"
        );
        s.fs.unquiesce();
        gate.open();
        wait_used(&s, 1);
        s.fs.quiesce();
        assert!(s.fs.save_device().is_ok());
        s.fs.unquiesce();
    }

    /// Saves what it is given back, and records what it restores.
    #[derive(Default)]
    struct Recorder {
        restored: Mutex<Option<Vec<u8>>>,
    }

    impl FuseServer for Recorder {
        fn handle(&self, _request: &[u8]) -> Option<Vec<u8>> {
            None
        }
        fn save_session(&self) -> Result<Vec<u8>, String> {
            Ok(b"session".to_vec())
        }
        fn restore_session(&self, state: &[u8]) -> Result<(), String> {
            *self.restored.lock().unwrap() = Some(state.to_vec());
            Ok(())
        }
    }

    #[test]
    fn restore_takes_back_the_session_of_the_same_share_only() {
        let saved = Fs::new("data", Arc::new(Recorder::default()))
            .unwrap()
            .save_device()
            .unwrap();
        let server = Arc::new(Recorder::default());
        let mut fs = Fs::new("data", server.clone()).unwrap();
        fs.restore_device(&saved).unwrap();
        assert_eq!(
            server.restored.lock().unwrap().as_deref(),
            Some(&b"session"[..])
        );

        let other = Arc::new(Recorder::default());
        let err = Fs::new("other", other.clone())
            .unwrap()
            .restore_device(&saved)
            .unwrap_err();
        assert!(err.contains("\"data\""), "{err}");
        assert!(other.restored.lock().unwrap().is_none());

        // Damaged state: an error, never a panic.
        for bad in [&[][..], &saved[..saved.len() / 2], &[0xff; 64][..]] {
            let mut fs = Fs::new("data", Arc::new(Recorder::default())).unwrap();
            assert!(fs.restore_device(bad).is_err(), "{bad:?}");
        }
        let mut wrong = bitcode::deserialize::<FsPersist>(&saved).unwrap();
        wrong.format = 99;
        let err = Fs::new("data", Arc::new(Recorder::default()))
            .unwrap()
            .restore_device(&bitcode::serialize(&wrong).unwrap())
            .unwrap_err();
        assert!(err.contains("format 99"), "{err}");
    }

    /// A server that cannot save its session makes the snapshot fail,
    /// saying so.
    #[test]
    fn a_server_without_sessions_cannot_be_saved() {
        let err = Fs::new("data", Arc::new(Nobody))
            .unwrap()
            .save_device()
            .unwrap_err();
        assert!(err.contains("\"data\""), "{err}");
    }
}
