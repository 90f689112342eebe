//! The virtio-net device and its port on a VNET switch.

use super::queue::{self, Segment};
use super::{LINK_UP, NET_HDR_LEN, QUEUE_SIZE, VIRTIO_ID_NET, features};
use crate::virtio::{
    ActivateContext, ActivateError, GuestMemoryMmap, VIRTIO_F_VERSION_1, VirtioDevice,
    VirtioInterrupt, read_config_bytes,
};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;
use vnet::{DropReason, Frame, Mac, PortId, PortKind, PortSink, Switch};

const RX: usize = 0;
const TX: usize = 1;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot create the device's activation event")]
    Event(#[source] std::io::Error),
    #[error("{0} is a group address, not a NIC's")]
    GroupMac(Mac),
}

/// What the device counts, besides the switch's per-port counters.
#[derive(Debug, Default)]
pub struct NetCounters {
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// TX chains that were not a valid frame.
    pub tx_malformed: AtomicU64,
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Frames for the guest that it had no buffers for, or did not fit.
    pub rx_dropped: AtomicU64,
}

/// A point-in-time copy of [`NetCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetCounterSnapshot {
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub tx_malformed: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
}

impl NetCounters {
    pub fn snapshot(&self) -> NetCounterSnapshot {
        NetCounterSnapshot {
            tx_frames: self.tx_frames.load(Relaxed),
            tx_bytes: self.tx_bytes.load(Relaxed),
            tx_malformed: self.tx_malformed.load(Relaxed),
            rx_frames: self.rx_frames.load(Relaxed),
            rx_bytes: self.rx_bytes.load(Relaxed),
            rx_dropped: self.rx_dropped.load(Relaxed),
        }
    }
}

/// A started queue with what it needs to run.
struct ActiveQueue {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<VirtioInterrupt>,
    segs: Vec<Segment>,
}

impl ActiveQueue {
    fn notify(&mut self) {
        if self.queue.needs_notification(&self.mem).unwrap_or(true)
            && let Err(e) = self.interrupt.signal_used_queue()
        {
            tracing::warn!("virtio-net: cannot interrupt the guest: {e}");
        }
    }
}

/// The RX side, shared with the switch, which writes frames into it from
/// whatever thread they arrive on.
#[derive(Default)]
struct RxSide {
    queue: Option<ActiveQueue>,
    mergeable: bool,
}

/// The switch's view of the guest NIC.
struct GuestPort {
    rx: Arc<Mutex<RxSide>>,
    counters: Arc<NetCounters>,
    /// The guest takes partial checksums and TCP super-frames.
    offloads: Arc<AtomicBool>,
}

impl PortSink for GuestPort {
    fn offloads(&self) -> bool {
        self.offloads.load(Relaxed)
    }

    fn send(&self, frame: &dyn Frame) -> Result<(), DropReason> {
        let offloads = self.offloads.load(Relaxed);
        let mut rx = self.rx.lock().unwrap_or_else(|p| p.into_inner());
        let mergeable = rx.mergeable;
        let Some(q) = rx.queue.as_mut() else {
            // The driver has not started the device: the link is down.
            self.counters.rx_dropped.fetch_add(1, Relaxed);
            return Err(DropReason::TxError);
        };
        match queue::receive(
            &q.mem,
            &mut q.queue,
            frame,
            mergeable,
            offloads,
            &mut q.segs,
        ) {
            Ok(_) => {
                self.counters.rx_frames.fetch_add(1, Relaxed);
                self.counters
                    .rx_bytes
                    .fetch_add(frame.len() as u64, Relaxed);
                q.notify();
                Ok(())
            }
            Err(reason) => {
                self.counters.rx_dropped.fetch_add(1, Relaxed);
                if reason == DropReason::Malformed {
                    q.notify();
                }
                Err(reason)
            }
        }
    }
}

/// A guest NIC on a VNET switch.
pub struct Net {
    mac: Mac,
    switch: Arc<Switch>,
    port: PortId,
    acked: u64,
    rx: Arc<Mutex<RxSide>>,
    rx_offloads: Arc<AtomicBool>,
    tx: Option<ActiveQueue>,
    counters: Arc<NetCounters>,
    /// Written on activation so the event loop registers the queue events.
    pub(super) activate_evt: EventFd,
    pub(super) queue_events: Vec<EventFd>,
    pub(super) events_registered: bool,
}

impl Net {
    /// A NIC with address `mac`, plugged into `switch` as port `name`.
    pub fn new(switch: Arc<Switch>, name: &str, mac: Mac) -> Result<Net, NetError> {
        if mac.is_multicast() {
            return Err(NetError::GroupMac(mac));
        }
        let rx = Arc::new(Mutex::new(RxSide::default()));
        let counters = Arc::new(NetCounters::default());
        let rx_offloads = Arc::new(AtomicBool::new(false));
        let port = switch.add_port(
            name,
            PortKind::Guest,
            Arc::new(GuestPort {
                rx: rx.clone(),
                counters: counters.clone(),
                offloads: rx_offloads.clone(),
            }),
        );
        Ok(Net {
            mac,
            switch,
            port,
            acked: 0,
            rx,
            rx_offloads,
            tx: None,
            counters,
            activate_evt: EventFd::new(libc::EFD_NONBLOCK).map_err(NetError::Event)?,
            queue_events: Vec::new(),
            events_registered: false,
        })
    }

    pub fn mac(&self) -> Mac {
        self.mac
    }

    /// The NIC's port on its switch.
    pub fn port(&self) -> PortId {
        self.port
    }

    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    pub(super) fn acked_features(&self) -> u64 {
        self.acked
    }

    /// Sends every frame the guest has queued for transmission.
    pub fn process_tx(&mut self) {
        let Some(tx) = self.tx.as_mut() else {
            return;
        };
        let (switch, port) = (&self.switch, self.port);
        let offloads = self.acked & (1 << features::CSUM) != 0;
        let pass = queue::transmit(&tx.mem, &mut tx.queue, &mut tx.segs, offloads, |frame| {
            switch.ingress(port, frame);
        });
        let c = &self.counters;
        c.tx_frames.fetch_add(pass.frames, Relaxed);
        c.tx_bytes.fetch_add(pass.bytes, Relaxed);
        c.tx_malformed.fetch_add(pass.malformed, Relaxed);
        if pass.used {
            tx.notify();
        }
    }

    fn config_bytes(&self) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.mac.0);
        c[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes()); // one queue pair
        let mtu = self.switch.mtu().min(usize::from(u16::MAX)) as u16;
        c[10..12].copy_from_slice(&mtu.to_le_bytes());
        c
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = self.switch.remove_port(self.port);
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        [
            VIRTIO_F_VERSION_1,
            features::MTU,
            features::MAC,
            features::MRG_RXBUF,
            features::STATUS,
        ]
        .iter()
        .fold(0, |f, bit| f | (1u64 << bit))
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // The MAC is the host's to choose; writes are ignored.
        tracing::debug!(offset, "virtio-net: config write ignored");
    }

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.queues.len() != 2 {
            return Err(ActivateError::Device(format!(
                "{} queues instead of 2",
                ctx.queues.len()
            )));
        }
        let tx_queue = ctx.queues.pop().expect("two queues");
        let rx_queue = ctx.queues.pop().expect("two queues");
        let queue = |queue| ActiveQueue {
            mem: ctx.mem.clone(),
            queue,
            interrupt: ctx.interrupt.clone(),
            segs: Vec::with_capacity(32),
        };
        let acked = |bit: u32| self.acked & (1 << bit) != 0;
        // Super-frames reach the guest only if it takes all of them.
        let rx_offloads = acked(features::GUEST_CSUM)
            && acked(features::GUEST_TSO4)
            && acked(features::GUEST_TSO6);
        self.rx_offloads.store(rx_offloads, Relaxed);
        {
            let mut rx = self.rx.lock().unwrap_or_else(|p| p.into_inner());
            rx.mergeable = acked(features::MRG_RXBUF);
            let mut rx_queue = queue(rx_queue);
            // Frames come from the switch, not from the guest's refills:
            // the guest need not exit to tell the device about new buffers.
            if let Err(e) = rx_queue.queue.disable_notification(&rx_queue.mem) {
                tracing::debug!("virtio-net: RX notifications stay on: {e}");
            }
            rx.queue = Some(rx_queue);
        }
        self.tx = Some(queue(tx_queue));
        if self.queue_events.is_empty() {
            self.queue_events = ctx.queue_events;
        }
        self.activate_evt.write(1).map_err(ActivateError::Events)?;
        tracing::debug!(mac = %self.mac, header = NET_HDR_LEN, "virtio-net started");
        Ok(())
    }

    fn reset(&mut self) {
        self.rx_offloads.store(false, Relaxed);
        self.rx.lock().unwrap_or_else(|p| p.into_inner()).queue = None;
        self.tx = None;
        self.acked = 0;
    }
}

/// Queue indices, for the event handler.
pub(super) const RX_QUEUE: usize = RX;
pub(super) const TX_QUEUE: usize = TX;
