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
        let span = tracing::Span::current();
        let thread = std::thread::Builder::new()
            .name(format!("virtio-fs-{}", self.tag()))
            .spawn(move || span.in_scope(|| serve.run()))
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
                let span = tracing::Span::current();
                std::thread::Builder::new()
                    .name(format!("virtio-fs-h{n}"))
                    .spawn(move || {
                        let _span = span.entered();
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
mod tests;
