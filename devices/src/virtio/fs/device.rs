//! The virtio-fs device and the thread that serves its queues.

use super::queue::{self, Scratch};
use super::{FuseServer, QUEUE_SIZE, TAG_LEN, Tag, VIRTIO_ID_FS};
use crate::virtio::{
    ActivateContext, ActivateError, GuestMemoryMmap, VIRTIO_F_VERSION_1, VirtioDevice,
    VirtioInterrupt,
};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::thread::JoinHandle;
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

/// A file share the guest mounts by its tag (`mount -t virtiofs TAG DIR`).
pub struct Fs {
    tag: Tag,
    server: Arc<dyn FuseServer>,
    counters: Arc<FsCounters>,
    worker: Option<Worker>,
}

struct Worker {
    stop: EventFd,
    thread: JoinHandle<()>,
}

impl Fs {
    pub fn new(tag: &str, server: Arc<dyn FuseServer>) -> Result<Fs, FsError> {
        Ok(Fs {
            tag: Tag::new(tag).ok_or_else(|| FsError::BadTag(tag.into()))?,
            server,
            counters: Arc::new(FsCounters::default()),
            worker: None,
        })
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
        let serve = Serve {
            mem: ctx.mem,
            queues: ctx.queues,
            events: ctx.queue_events,
            interrupt: ctx.interrupt,
            server: self.server.clone(),
            counters: self.counters.clone(),
            epoll,
        };
        let thread = std::thread::Builder::new()
            .name(format!("virtio-fs-{}", self.tag()))
            .spawn(move || serve.run())
            .map_err(ActivateError::Events)?;
        self.worker = Some(Worker { stop, thread });
        tracing::debug!(tag = self.tag(), "virtio-fs started");
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
    }
}

/// The worker's state: the queues it serves until told to stop.
struct Serve {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    events: Vec<EventFd>,
    interrupt: Arc<VirtioInterrupt>,
    server: Arc<dyn FuseServer>,
    counters: Arc<FsCounters>,
    epoll: Epoll,
}

impl Serve {
    fn run(mut self) {
        let mut scratch = Scratch::default();
        let mut ready = [EpollEvent::default(); 4];
        // Requests queued before the worker started.
        for i in 0..self.queues.len() {
            self.serve(i, &mut scratch);
        }
        loop {
            let n = match self.epoll.wait(-1, &mut ready) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio-fs worker stops: {e}");
                    return;
                }
            };
            for ev in &ready[..n] {
                let i = ev.data();
                if i == u64::MAX {
                    return;
                }
                let i = i as usize;
                if let Some(evt) = self.events.get(i) {
                    let _ = evt.read();
                    self.serve(i, &mut scratch);
                }
            }
        }
    }

    fn serve(&mut self, i: usize, scratch: &mut Scratch) {
        let Some(q) = self.queues.get_mut(i) else {
            return;
        };
        let pass = queue::process(&self.mem, q, self.server.as_ref(), scratch);
        self.counters.requests.fetch_add(pass.requests, Relaxed);
        self.counters.malformed.fetch_add(pass.malformed, Relaxed);
        if pass.used
            && q.needs_notification(&self.mem).unwrap_or(true)
            && let Err(e) = self.interrupt.signal_used_queue()
        {
            tracing::warn!("virtio-fs: cannot interrupt the guest: {e}");
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
}
