//! A virtio-fs device whose queues are served by another process over
//! vhost-user (for example virtiofsd).
//!
//! The VMM keeps the control plane: the transport, feature negotiation
//! and config space (the tag) stay here. At activation the backend gets
//! the guest's memory (memfd regions), each ring's host addresses and
//! two events per queue: the kick, which is the very event KVM writes
//! when the guest notifies the queue (so requests go from guest to
//! backend without passing through this process), and the call, which a
//! thread of ours turns into the device's interrupt, because a
//! virtio-mmio interrupt must also set the InterruptStatus register.

use super::{QUEUE_SIZE, TAG_LEN, Tag, VIRTIO_ID_FS};
use crate::virtio::{
    ActivateContext, ActivateError, GuestMemoryMmap, VIRTIO_F_VERSION_1, VirtioDevice,
    VirtioInterrupt,
};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;
use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// The high-priority queue plus one request queue.
const NUM_QUEUES: usize = 2;

/// Transport features passed between driver and backend; anything else
/// the backend offers (packed rings, platform IOMMU, ...) this transport
/// cannot carry.
const PASSED_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX);

/// How long the backend may take over the handshake, or over setting up
/// or stopping the rings.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Protocol features this frontend speaks.
const PROTOCOL_FEATURES: VhostUserProtocolFeatures =
    VhostUserProtocolFeatures::MQ.union(VhostUserProtocolFeatures::REPLY_ACK);

#[derive(Debug, thiserror::Error)]
pub enum VhostUserFsError {
    #[error("the tag {0:?} is empty, longer than {TAG_LEN} bytes, or holds a NUL")]
    BadTag(String),
    #[error("cannot connect to the vhost-user backend at {path:?}: {reason}")]
    Connect { path: PathBuf, reason: String },
    #[error("the vhost-user backend at {path:?} failed {step}: {reason}")]
    Handshake {
        path: PathBuf,
        step: &'static str,
        reason: String,
    },
    #[error("the vhost-user backend at {path:?} does not offer VIRTIO_F_VERSION_1")]
    NotVersion1 { path: PathBuf },
    #[error("the vhost-user backend at {path:?} serves {has} queues, virtio-fs needs {NUM_QUEUES}")]
    TooFewQueues { path: PathBuf, has: u64 },
}

/// A file share served by a vhost-user backend, mounted in the guest by
/// its tag.
pub struct VhostUserFs {
    tag: Tag,
    socket: PathBuf,
    /// The frontend's socket, to shut down when the backend stops
    /// answering (see [`bounded`]).
    guard: UnixStream,
    frontend: Frontend,
    backend_features: u64,
    acked_features: u64,
    protocol: bool,
    worker: Option<CallWorker>,
}

impl VhostUserFs {
    /// Connects to the backend listening on `socket` and learns what it
    /// offers; the device can then be added to a VM.
    pub fn connect(tag: &str, socket: &Path) -> Result<Self, VhostUserFsError> {
        let t = Tag::new(tag).ok_or_else(|| VhostUserFsError::BadTag(tag.into()))?;
        let cannot = |e: std::io::Error| VhostUserFsError::Connect {
            path: socket.into(),
            reason: e.to_string(),
        };
        let stream = UnixStream::connect(socket).map_err(cannot)?;
        let guard = stream.try_clone().map_err(cannot)?;
        let mut frontend = Frontend::from_stream(stream, NUM_QUEUES as u64);
        let (backend_features, protocol) =
            bounded(&guard, || Self::handshake(&mut frontend, socket))?;
        tracing::debug!(
            ?socket,
            features = backend_features,
            "vhost-user-fs connected"
        );
        Ok(VhostUserFs {
            tag: t,
            socket: socket.into(),
            guard,
            frontend,
            backend_features,
            acked_features: 0,
            protocol,
            worker: None,
        })
    }

    /// SET_OWNER and feature negotiation; returns the backend's features
    /// and whether it speaks protocol features.
    fn handshake(frontend: &mut Frontend, socket: &Path) -> Result<(u64, bool), VhostUserFsError> {
        let failed = |step: &'static str| {
            move |e: vhost::Error| VhostUserFsError::Handshake {
                path: socket.into(),
                step,
                reason: e.to_string(),
            }
        };
        frontend.set_owner().map_err(failed("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(failed("GET_FEATURES"))?;
        if backend_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(VhostUserFsError::NotVersion1 {
                path: socket.into(),
            });
        }
        let protocol = backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        if protocol {
            let offered = frontend
                .get_protocol_features()
                .map_err(failed("GET_PROTOCOL_FEATURES"))?;
            let chosen = offered & PROTOCOL_FEATURES;
            frontend
                .set_protocol_features(chosen)
                .map_err(failed("SET_PROTOCOL_FEATURES"))?;
            if chosen.contains(VhostUserProtocolFeatures::MQ) {
                let has = frontend.get_queue_num().map_err(failed("GET_QUEUE_NUM"))?;
                if has < NUM_QUEUES as u64 {
                    return Err(VhostUserFsError::TooFewQueues {
                        path: socket.into(),
                        has,
                    });
                }
            }
        }
        Ok((backend_features, protocol))
    }

    pub fn tag(&self) -> &str {
        self.tag.as_str()
    }

    /// Hands the rings to the backend; on success the backend serves them
    /// and `calls` carry its interrupts.
    fn start_backend(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &[Queue],
        kicks: &[EventFd],
        calls: &[EventFd],
    ) -> Result<(), String> {
        let fail = |step: &'static str| move |e: vhost::Error| format!("{step}: {e}");
        let mut features = self.acked_features;
        if self.protocol {
            features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        self.frontend
            .set_features(features)
            .map_err(fail("SET_FEATURES"))?;
        let regions = mem
            .iter()
            .map(|r| {
                VhostUserMemoryRegionInfo::from_guest_region(r).map_err(|_| {
                    "guest memory is not shared (a vhost-user device needs the VM's \
                     memory in a memfd)"
                        .to_string()
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(fail("SET_MEM_TABLE"))?;
        for (i, q) in queues.iter().enumerate() {
            if !q.ready() {
                continue;
            }
            let host = |a: u64| {
                mem.get_host_address(GuestAddress(a))
                    .map(|p| p as u64)
                    .map_err(|e| format!("queue {i} lies outside guest memory: {e}"))
            };
            let config = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: host(q.desc_table())?,
                used_ring_addr: host(q.used_ring())?,
                avail_ring_addr: host(q.avail_ring())?,
                log_addr: None,
            };
            self.frontend
                .set_vring_num(i, q.size())
                .map_err(fail("SET_VRING_NUM"))?;
            self.frontend
                .set_vring_addr(i, &config)
                .map_err(fail("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(i, q.next_avail())
                .map_err(fail("SET_VRING_BASE"))?;
            self.frontend
                .set_vring_call(i, &calls[i])
                .map_err(fail("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(i, &kicks[i])
                .map_err(fail("SET_VRING_KICK"))?;
            if self.protocol {
                self.frontend
                    .set_vring_enable(i, true)
                    .map_err(fail("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }

    /// Stops the backend's rings (GET_VRING_BASE) and our call thread.
    fn stop(&mut self) {
        let Some(w) = self.worker.take() else {
            return;
        };
        bounded(&self.guard, || {
            for i in 0..w.queues {
                if let Err(e) = self.frontend.get_vring_base(i) {
                    tracing::debug!(queue = i, "vhost-user-fs: stopping a ring: {e}");
                }
            }
        });
        let _ = w.stop.write(1);
        if w.thread.join().is_err() {
            tracing::error!("vhost-user-fs call thread panicked");
        }
    }
}

impl Drop for VhostUserFs {
    fn drop(&mut self) {
        self.stop();
    }
}

impl VirtioDevice for VhostUserFs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn can_snapshot(&self) -> Result<(), String> {
        Err(format!(
            "the vhost-user-fs share {:?} keeps its state in its backend at {:?}, which vmplant cannot save",
            self.tag.as_str(),
            self.socket
        ))
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; NUM_QUEUES]
    }

    fn features(&self) -> u64 {
        self.backend_features & PASSED_FEATURES
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.tag.read_config(NUM_QUEUES as u32 - 1, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!(offset, "vhost-user-fs: config write ignored");
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.stop();
        let calls = (0..ctx.queues.len())
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(ActivateError::Events)?;
        let guard = self.guard.try_clone().map_err(ActivateError::Events)?;
        bounded(&guard, || {
            self.start_backend(&ctx.mem, &ctx.queues, &ctx.queue_events, &calls)
        })
        .map_err(|e| ActivateError::Device(format!("vhost-user {:?}: {e}", self.socket)))?;
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::Events)?;
        let epoll = Epoll::new().map_err(ActivateError::Events)?;
        let watch = |fd: i32, events: EventSet, data: u64| {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(events, data))
                .map_err(ActivateError::Events)
        };
        watch(stop.as_raw_fd(), EventSet::IN, STOP)?;
        watch(
            self.frontend.as_raw_fd(),
            EventSet::HANG_UP | EventSet::READ_HANG_UP,
            HANG_UP,
        )?;
        for (i, c) in calls.iter().enumerate() {
            watch(c.as_raw_fd(), EventSet::IN, i as u64)?;
        }
        let queues = ctx.queues.len();
        let calls = Calls {
            calls,
            interrupt: ctx.interrupt,
            epoll,
            socket: self.socket.clone(),
            socket_fd: self.frontend.as_raw_fd(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("vhost-user-fs-{}", self.tag()))
            .spawn(move || calls.run())
            .map_err(ActivateError::Events)?;
        self.worker = Some(CallWorker {
            stop,
            thread,
            queues,
        });
        tracing::debug!(tag = self.tag(), "vhost-user-fs started");
        Ok(())
    }

    fn reset(&mut self) {
        self.stop();
    }
}

/// Runs `requests` to the backend; if they take longer than
/// [`REPLY_TIMEOUT`], shuts `socket` down, so that a backend that stops
/// answering fails them instead of blocking the caller (a vCPU, at
/// activation) for ever. The connection is gone after that.
fn bounded<T>(socket: &UnixStream, requests: impl FnOnce() -> T) -> T {
    let (done, finished) = mpsc::channel::<()>();
    std::thread::scope(|s| {
        s.spawn(move || {
            if let Err(RecvTimeoutError::Timeout) = finished.recv_timeout(REPLY_TIMEOUT) {
                tracing::error!(
                    "the vhost-user backend did not answer within {REPLY_TIMEOUT:?}; \
                     closing the connection"
                );
                let _ = socket.shutdown(Shutdown::Both);
            }
        });
        let out = requests();
        let _ = done.send(());
        out
    })
}

const STOP: u64 = u64::MAX;
const HANG_UP: u64 = u64::MAX - 1;

struct CallWorker {
    stop: EventFd,
    thread: JoinHandle<()>,
    queues: usize,
}

/// The thread that turns the backend's call events into interrupts.
struct Calls {
    calls: Vec<EventFd>,
    interrupt: Arc<VirtioInterrupt>,
    epoll: Epoll,
    socket: PathBuf,
    socket_fd: std::os::fd::RawFd,
}

impl Calls {
    fn run(self) {
        let mut ready = [EpollEvent::default(); 4];
        loop {
            let n = match self.epoll.wait(-1, &mut ready) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("vhost-user-fs call thread stops: {e}");
                    return;
                }
            };
            for ev in &ready[..n] {
                match ev.data() {
                    STOP => return,
                    HANG_UP => {
                        // The guest's requests go unanswered from now on;
                        // the VM itself goes on. Stop watching the socket
                        // (it stays hung up) but keep forwarding calls
                        // until told to stop.
                        tracing::error!(
                            socket = ?self.socket,
                            "the vhost-user-fs backend closed its connection"
                        );
                        let _ = self.epoll.ctl(
                            ControlOperation::Delete,
                            self.socket_fd,
                            EpollEvent::default(),
                        );
                    }
                    i => {
                        if let Some(c) = self.calls.get(i as usize)
                            && c.read().is_ok()
                            && let Err(e) = self.interrupt.signal_used_queue()
                        {
                            tracing::warn!("vhost-user-fs: cannot interrupt the guest: {e}");
                        }
                    }
                }
            }
        }
    }
}
