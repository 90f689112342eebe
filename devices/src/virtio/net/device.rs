//! The virtio-net device and its port on a VNET switch.

use super::backlog::Backlog;
use super::queue::{self, Segment};
use super::{LINK_UP, NET_HDR_LEN, QUEUE_SIZE, VIRTIO_ID_NET, features};
use crate::virtio::mmio::QueuePersist;
use crate::virtio::{
    ActivateContext, ActivateError, GuestMemoryMmap, VIRTIO_F_VERSION_1, VirtioDevice,
    VirtioInterrupt, check_avail, read_config_bytes,
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
    /// Frames for the guest that arrived while its RX ring was full and
    /// were held until it posted buffers (delivered or not).
    pub rx_held: AtomicU64,
    /// Frames for the guest that did not fit, or that found its RX ring
    /// full with the backlog full too.
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
    pub rx_held: u64,
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
            rx_held: self.rx_held.load(Relaxed),
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
    /// Frames that found the ring full, oldest first. While it holds any,
    /// RX notifications are on, so that the guest's refill wakes the event
    /// loop to deliver them, and new frames queue behind them.
    backlog: Backlog,
    /// A snapshot is being taken: guest memory must not change, so frames
    /// are dropped (as a full ring would drop them).
    frozen: bool,
}

impl RxSide {
    /// Writes `frame` into the guest's buffers, or holds it when they are
    /// all taken; frames keep their order.
    fn deliver(
        &mut self,
        frame: &dyn Frame,
        offloads: bool,
        counters: &NetCounters,
    ) -> Result<(), DropReason> {
        if self.queue.is_none() || self.frozen {
            // The driver has not started the device (the link is down), or
            // a snapshot is being taken.
            counters.rx_dropped.fetch_add(1, Relaxed);
            return Err(DropReason::TxError);
        }
        if !self.backlog.is_empty() {
            self.flush(offloads, counters);
        }
        if self.backlog.is_empty() {
            let mergeable = self.mergeable;
            let q = self.queue.as_mut().expect("checked above");
            match receive_one(q, frame, mergeable, offloads, counters) {
                Err(DropReason::QueueFull) => {}
                Ok(()) => {
                    q.notify();
                    return Ok(());
                }
                Err(reason) => return Err(reason),
            }
        }
        if !self.backlog.push(frame) {
            counters.rx_dropped.fetch_add(1, Relaxed);
            return Err(DropReason::QueueFull);
        }
        counters.rx_held.fetch_add(1, Relaxed);
        if self.backlog.len() == 1 {
            self.watch_refills(offloads, counters);
        }
        Ok(())
    }

    /// Delivers held frames while the guest has buffers; once none are
    /// held, refills no longer notify the device.
    fn flush(&mut self, offloads: bool, counters: &NetCounters) {
        let mergeable = self.mergeable;
        let Some(q) = self.queue.as_mut() else {
            return;
        };
        let mut delivered = false;
        while let Some(frame) = self.backlog.front() {
            match receive_one(q, frame, mergeable, offloads, counters) {
                Err(DropReason::QueueFull) => break,
                Ok(()) => delivered = true,
                // Counted by receive_one; the frame is dropped.
                Err(_) => {}
            }
            self.backlog.pop();
        }
        if delivered {
            q.notify();
        }
        if self.backlog.is_empty()
            && let Err(e) = q.queue.disable_notification(&q.mem)
        {
            tracing::debug!("virtio-net: RX notifications stay on: {e}");
        }
    }

    /// Turns RX notifications on, and flushes at once if buffers came in
    /// before they were on.
    fn watch_refills(&mut self, offloads: bool, counters: &NetCounters) {
        let Some(q) = self.queue.as_mut() else {
            return;
        };
        match q.queue.enable_notification(&q.mem) {
            Ok(true) => self.flush(offloads, counters),
            Ok(false) => {}
            Err(e) => tracing::debug!("virtio-net: cannot watch RX refills: {e}"),
        }
    }
}

/// One frame into the guest's RX buffers, counted.
fn receive_one(
    q: &mut ActiveQueue,
    frame: &dyn Frame,
    mergeable: bool,
    offloads: bool,
    counters: &NetCounters,
) -> Result<(), DropReason> {
    // A failed device takes nothing more: its link is down until the
    // driver resets it.
    let broken = check_avail(&q.mem, &q.queue);
    if q.interrupt.needs_reset() || broken.is_err() {
        if let Err(e) = broken {
            q.interrupt.device_failed("virtio-net RX", &e);
        }
        counters.rx_dropped.fetch_add(1, Relaxed);
        return Err(DropReason::TxError);
    }
    match queue::receive(
        &q.mem,
        &mut q.queue,
        frame,
        mergeable,
        offloads,
        &mut q.segs,
    ) {
        Ok(_) => {
            counters.rx_frames.fetch_add(1, Relaxed);
            counters.rx_bytes.fetch_add(frame.len() as u64, Relaxed);
            Ok(())
        }
        Err(DropReason::QueueFull) => Err(DropReason::QueueFull),
        Err(reason) => {
            counters.rx_dropped.fetch_add(1, Relaxed);
            if reason == DropReason::Malformed {
                // Chains went back empty: the guest must see them.
                q.notify();
            }
            Err(reason)
        }
    }
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
        rx.deliver(frame, offloads, &self.counters)
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
    /// A snapshot is being taken: the TX queue waits.
    tx_frozen: bool,
}

impl Net {
    /// A NIC with address `mac`, plugged into `switch` as port `name`.
    pub fn new(switch: Arc<Switch>, name: &str, mac: Mac) -> Result<Net, NetError> {
        Net::with_source(switch, name, mac, vnet::SourcePolicy::Only(mac))
    }

    /// A NIC whose port lets through frames from the `source` addresses
    /// ([`Net::new`]: from `mac` only).
    pub fn with_source(
        switch: Arc<Switch>,
        name: &str,
        mac: Mac,
        source: vnet::SourcePolicy,
    ) -> Result<Net, NetError> {
        if mac.is_multicast() {
            return Err(NetError::GroupMac(mac));
        }
        let rx = Arc::new(Mutex::new(RxSide::default()));
        let counters = Arc::new(NetCounters::default());
        let rx_offloads = Arc::new(AtomicBool::new(false));
        // By default the guest may send from its NIC's address only.
        let port = switch.add_port_with(
            name,
            PortKind::Guest,
            Arc::new(GuestPort {
                rx: rx.clone(),
                counters: counters.clone(),
                offloads: rx_offloads.clone(),
            }),
            source,
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
            tx_frozen: false,
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
        if tx.interrupt.needs_reset() || self.tx_frozen {
            return;
        }
        let (switch, port) = (&self.switch, self.port);
        let offloads = self.acked & (1 << features::CSUM) != 0;
        let pass = queue::transmit(&tx.mem, &mut tx.queue, &mut tx.segs, offloads, |frame| {
            switch.ingress(port, frame);
        });
        let c = &self.counters;
        c.tx_frames.fetch_add(pass.frames, Relaxed);
        c.tx_bytes.fetch_add(pass.bytes, Relaxed);
        c.tx_malformed.fetch_add(pass.malformed, Relaxed);
        if let Some(e) = pass.broken {
            tx.interrupt.device_failed("virtio-net TX", &e);
            return;
        }
        if pass.used {
            tx.notify();
        }
        if pass.more {
            // A queue's worth sent: the event loop comes back after its
            // other events.
            if let Some(Err(e)) = self.queue_events.get(TX).map(|e| e.write(1)) {
                tracing::warn!("virtio-net: cannot signal the TX queue: {e}");
            }
        }
    }

    /// The guest posted RX buffers: delivers frames held for it.
    pub fn process_rx_refill(&mut self) {
        let offloads = self.rx_offloads.load(Relaxed);
        let mut rx = self.rx.lock().unwrap_or_else(|p| p.into_inner());
        if !rx.frozen {
            rx.flush(offloads, &self.counters);
        }
    }

    fn rx(&self) -> std::sync::MutexGuard<'_, RxSide> {
        self.rx.lock().unwrap_or_else(|p| p.into_inner())
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
            // the guest need not exit to tell the device about new buffers
            // (until frames are held for it; see RxSide).
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

    fn quiesce(&mut self) {
        self.tx_frozen = true;
        // Taken under the lock: no frame is being written once this returns.
        self.rx().frozen = true;
    }

    fn unquiesce(&mut self) {
        self.rx().frozen = false;
        self.tx_frozen = false;
        // Frames the guest queued meanwhile go out now, and buffers it
        // posted meanwhile take what is held for it.
        for q in [TX, RX] {
            if let Some(Err(e)) = self.queue_events.get(q).map(|e| e.write(1)) {
                tracing::warn!("virtio-net: cannot signal queue {q}: {e}");
            }
        }
    }

    fn can_snapshot(&self) -> Result<(), String> {
        Ok(())
    }

    fn queue_states(&self) -> Vec<QueuePersist> {
        let rx = self.rx();
        match (&rx.queue, &self.tx) {
            (Some(r), Some(t)) => vec![QueuePersist::from(&r.queue), QueuePersist::from(&t.queue)],
            _ => Vec::new(),
        }
    }

    /// Announces the MAC from the NIC's port, as QEMU does after a
    /// migration: a broadcast RARP request whose source is the MAC, so
    /// that this switch and every switch its tunnels reach learn at once
    /// that the MAC is here now (the guest's peers' frames then come
    /// here, not to where the VM was).
    fn restored(&mut self) {
        self.switch
            .ingress_bytes(self.port, &rarp_announce(self.mac));
        tracing::debug!(mac = %self.mac, "virtio-net: announced after a restore");
    }

    fn reset(&mut self) {
        self.rx_offloads.store(false, Relaxed);
        let mut rx = self.rx.lock().unwrap_or_else(|p| p.into_inner());
        rx.queue = None;
        let lost = rx.backlog.clear();
        self.counters.rx_dropped.fetch_add(lost as u64, Relaxed);
        drop(rx);
        self.tx = None;
        self.acked = 0;
    }
}

/// A RARP request ("who has this hardware address?", RFC 903) broadcast
/// from `mac`, padded to Ethernet's minimum frame.
fn rarp_announce(mac: Mac) -> [u8; 60] {
    let mut f = [0u8; 60];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac.0);
    f[12..14].copy_from_slice(&0x8035u16.to_be_bytes());
    // Ethernet hardware, IPv4 protocol, address lengths 6 and 4,
    // operation 3 (request reverse); sender and target hardware address
    // the MAC, protocol addresses unknown (zero).
    f[14..16].copy_from_slice(&1u16.to_be_bytes());
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes());
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&3u16.to_be_bytes());
    f[22..28].copy_from_slice(&mac.0);
    f[32..38].copy_from_slice(&mac.0);
    f
}

/// Queue indices, for the event handler.
pub(super) const RX_QUEUE: usize = RX;
pub(super) const TX_QUEUE: usize = TX;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::net::backlog::MAX_FRAMES;
    use virtio_queue::desc::{RawDescriptor, split::Descriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};
    use vnet::SwitchConfig;

    const NIC: Mac = Mac([0x52, 0x54, 0, 0, 0, 1]);
    const VRING_DESC_F_WRITE: u16 = 2;
    const VRING_USED_F_NO_NOTIFY: u16 = 1;

    struct Nothing;
    impl PortSink for Nothing {
        fn send(&self, _frame: &dyn Frame) -> Result<(), DropReason> {
            Ok(())
        }
    }

    /// Keeps what it is sent.
    #[derive(Default)]
    struct Seen(Mutex<Vec<Vec<u8>>>);
    impl PortSink for Seen {
        fn send(&self, frame: &dyn Frame) -> Result<(), DropReason> {
            let mut v = vec![0u8; frame.len()];
            frame.read_at(0, &mut v);
            self.0.lock().unwrap().push(v);
            Ok(())
        }
    }

    #[test]
    fn a_restored_nic_announces_its_mac_where_it_is_now() {
        let switch = Switch::new(SwitchConfig::default()).unwrap();
        let seen = Arc::new(Seen::default());
        // Elsewhere (a tunnel, say), the MAC was learned first.
        let elsewhere = switch.add_port("elsewhere", PortKind::Other, seen.clone());
        switch.ingress_bytes(elsewhere, &rarp_announce(NIC));
        assert_eq!(switch.lookup(NIC, None), Some(elsewhere));
        let other = switch.add_port("other", PortKind::Other, seen.clone());
        let mut nic = Net::new(switch.clone(), "nic", NIC).unwrap();
        seen.0.lock().unwrap().clear();
        nic.restored();
        assert_eq!(switch.lookup(NIC, None), Some(nic.port()));
        let frames = seen.0.lock().unwrap().clone();
        assert_eq!(frames.len(), 2, "flooded to the two other ports");
        let f = &frames[0];
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &NIC.0);
        assert_eq!(&f[12..14], &[0x80, 0x35], "RARP");
        assert_eq!(&f[22..28], &NIC.0);
        let _ = other;
    }

    /// A frame to the NIC, its payload starting with `tag`.
    fn frame_to_nic(tag: u8) -> Vec<u8> {
        let mut f = vec![0u8; 60];
        f[..6].copy_from_slice(&NIC.0);
        f[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 2]);
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        f[14] = tag;
        f
    }

    /// Where the RX ring's parts are in guest memory.
    struct RxRing {
        desc: GuestAddress,
        avail: GuestAddress,
        used: GuestAddress,
    }

    impl RxRing {
        /// Posts `n` RX buffers of 2 KiB (at 0x10_0000 + i * 0x1000), as a
        /// driver would.
        fn post(&self, mem: &GuestMemoryMmap, from: u16, n: u16) {
            for i in from..from + n {
                let d = Descriptor::new(
                    0x10_0000 + u64::from(i) * 0x1000,
                    2048,
                    VRING_DESC_F_WRITE,
                    0,
                );
                let at = self.desc.unchecked_add(16 * u64::from(i));
                mem.write_obj(RawDescriptor::from(d), at).unwrap();
                let idx: u16 = mem.read_obj(self.avail.unchecked_add(2)).unwrap();
                let slot = self.avail.unchecked_add(4 + 2 * u64::from(idx % 16));
                mem.write_obj(i, slot).unwrap();
                mem.write_obj(idx.wrapping_add(1), self.avail.unchecked_add(2))
                    .unwrap();
            }
        }

        /// The device's "do not notify me" flag, in the used ring.
        fn used_flags(&self, mem: &GuestMemoryMmap) -> u16 {
            mem.read_obj(self.used).unwrap()
        }
    }

    /// A started NIC whose RX ring (16 entries, at 0) starts with no
    /// buffers, a peer port to send to it from, its interrupt, and where
    /// its TX ring's avail ring is.
    struct Started {
        nic: Net,
        rx: RxRing,
        switch: Arc<Switch>,
        peer: PortId,
        interrupt: Arc<VirtioInterrupt>,
        tx_avail: GuestAddress,
    }

    fn started_nic(mem: &GuestMemoryMmap) -> Started {
        let switch = Switch::new(SwitchConfig::default()).unwrap();
        let peer = switch.add_port("peer", PortKind::Other, Arc::new(Nothing));
        let mut nic = Net::new(switch.clone(), "nic", NIC).unwrap();
        nic.ack_features(1 << VIRTIO_F_VERSION_1);
        let rx = MockSplitQueue::create(mem, GuestAddress(0), 16);
        let ring = RxRing {
            desc: rx.desc_table_addr(),
            avail: rx.avail_addr(),
            used: rx.used_addr(),
        };
        let tx = MockSplitQueue::create(mem, GuestAddress(0x1_0000), 16);
        let evt = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new(evt()));
        nic.activate(ActivateContext {
            mem: mem.clone(),
            queues: vec![rx.create_queue().unwrap(), tx.create_queue().unwrap()],
            queue_events: vec![evt(), evt()],
            interrupt: interrupt.clone(),
        })
        .unwrap();
        Started {
            nic,
            rx: ring,
            switch,
            peer,
            interrupt,
            tx_avail: tx.avail_addr(),
        }
    }

    #[test]
    fn frames_wait_for_rx_buffers_in_order_and_are_bounded() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
        let Started {
            mut nic,
            rx,
            switch,
            peer,
            ..
        } = started_nic(&mem);
        let c = nic.counters();
        assert_eq!(
            rx.used_flags(&mem),
            VRING_USED_F_NO_NOTIFY,
            "refills do not notify while nothing is held"
        );

        // No buffers yet: the frames are held, not dropped, and refills
        // now notify.
        for tag in 1..=3 {
            switch.ingress_bytes(peer, &frame_to_nic(tag));
        }
        let s = c.snapshot();
        assert_eq!((s.rx_frames, s.rx_held, s.rx_dropped), (0, 3, 0));
        assert_eq!(rx.used_flags(&mem), 0);

        // Two buffers: the two oldest frames go in, the third stays.
        rx.post(&mem, 0, 2);
        nic.process_rx_refill();
        assert_eq!(c.snapshot().rx_frames, 2);
        // A new frame queues behind the held one, even with a buffer free.
        rx.post(&mem, 2, 1);
        switch.ingress_bytes(peer, &frame_to_nic(4));
        rx.post(&mem, 3, 1);
        nic.process_rx_refill();
        let s = c.snapshot();
        assert_eq!((s.rx_frames, s.rx_held, s.rx_dropped), (4, 4, 0));
        let tags: Vec<u8> = (0..4u64)
            .map(|i| {
                mem.read_obj(GuestAddress(
                    0x10_0000 + i * 0x1000 + NET_HDR_LEN as u64 + 14,
                ))
                .unwrap()
            })
            .collect();
        assert_eq!(tags, [1, 2, 3, 4], "frames reach the guest in order");
        assert_eq!(
            rx.used_flags(&mem),
            VRING_USED_F_NO_NOTIFY,
            "nothing held: refills stop notifying"
        );

        // Past the bound, frames are dropped and counted.
        for _ in 0..MAX_FRAMES + 5 {
            switch.ingress_bytes(peer, &frame_to_nic(9));
        }
        let s = c.snapshot();
        assert_eq!(s.rx_dropped, 5);
        assert_eq!(s.rx_held, 4 + MAX_FRAMES as u64);

        // A driver reset drops what is held.
        nic.reset();
        assert_eq!(c.snapshot().rx_dropped, 5 + MAX_FRAMES as u64);
    }

    /// A driver that claims more TX chains than the ring holds and kicks
    /// (on the VM's event loop) fails the device, and the loop goes on.
    #[test]
    fn a_broken_tx_ring_fails_the_device_instead_of_hanging_the_loop() {
        use crate::virtio::test_utils::finishes_within;
        let (needs_reset, int_status, malformed) = finishes_within(10, || {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
            let mut s = started_nic(&mem);
            mem.write_obj(100u16, s.tx_avail.unchecked_add(2)).unwrap();
            s.nic.process_tx();
            // Kicked again: the device stays failed and quiet.
            s.nic.process_tx();
            (
                s.interrupt.needs_reset(),
                s.interrupt.status(),
                s.nic.counters().snapshot().tx_malformed,
            )
        });
        assert!(needs_reset);
        assert_eq!(int_status, crate::virtio::INT_CONFIG);
        assert_eq!(malformed, 0);
    }

    /// The same on the RX ring: frames for the guest are dropped and the
    /// device fails, once.
    #[test]
    fn a_broken_rx_ring_fails_the_device_and_drops_frames() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
        let s = started_nic(&mem);
        mem.write_obj(100u16, s.rx.avail.unchecked_add(2)).unwrap();
        for _ in 0..3 {
            s.switch.ingress_bytes(s.peer, &frame_to_nic(1));
        }
        assert!(s.interrupt.needs_reset());
        let c = s.nic.counters().snapshot();
        assert_eq!((c.rx_frames, c.rx_held, c.rx_dropped), (0, 0, 3));
    }
}
