//! The virtio-mmio transport (virtio 1.2, section 4.2, version 2).
//!
//! The driver walks the device through ACKNOWLEDGE, DRIVER, feature
//! negotiation, FEATURES_OK, queue setup and DRIVER_OK; the transport
//! checks each step, refuses out-of-order ones without failing the VM,
//! and activates the device once the driver is done. Writing 0 to Status
//! resets it.

use super::{
    ActivateContext, GuestMemoryMmap, VIRTIO_F_VERSION_1, VirtioDevice, VirtioInterrupt, status,
};
use crate::bus::BusDevice;
use crate::throttle::Throttle;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

/// Size of one device's register window.
pub const MMIO_LEN: u64 = 0x1000;
/// Offset of the QueueNotify register, for binding ioeventfds to it.
pub const NOTIFY_OFFSET: u64 = 0x50;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x766d_706c; // "vmpl"
const CONFIG_OFFSET: u64 = 0x100;

/// The transport's state, as saved in a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioPersist {
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub queues: Vec<QueuePersist>,
}

/// One queue's registers and ring positions, as saved in a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuePersist {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub event_idx: bool,
    pub next_avail: u16,
    pub next_used: u16,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<&Queue> for QueuePersist {
    fn from(q: &Queue) -> Self {
        let s = q.state();
        QueuePersist {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            event_idx: s.event_idx_enabled,
            next_avail: s.next_avail,
            next_used: s.next_used,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl TryFrom<&QueuePersist> for Queue {
    type Error = virtio_queue::Error;

    fn try_from(p: &QueuePersist) -> Result<Self, Self::Error> {
        Queue::try_from(virtio_queue::QueueState {
            max_size: p.max_size,
            next_avail: p.next_avail,
            next_used: p.next_used,
            event_idx_enabled: p.event_idx,
            size: p.size,
            ready: p.ready,
            desc_table: p.desc_table,
            avail_ring: p.avail_ring,
            used_ring: p.used_ring,
        })
    }
}

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    config_generation: u32,
    activated: bool,
    /// Register writes refused because they came at the wrong time: a
    /// guest can make them at will, so they are logged thinly.
    refused: Throttle,
}

#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("queue of size {0} is not a valid virtio queue")]
    Queue(u16),
    #[error("cannot create a queue event")]
    Event(#[source] std::io::Error),
    #[error("cannot restore the virtio device: {0}")]
    Restore(String),
}

impl MmioTransport {
    /// Wraps `device`; `irq` is the event bound to the device's interrupt
    /// line.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: EventFd,
    ) -> Result<Self, MmioError> {
        let queues = device
            .queue_max_sizes()
            .into_iter()
            .map(|n| Queue::new(n).map_err(|_| MmioError::Queue(n)))
            .collect::<Result<Vec<_>, _>>()?;
        let queue_events = queues
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map_err(MmioError::Event))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Arc::new(VirtioInterrupt::new(irq)),
            queues,
            queue_events,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            config_generation: 0,
            activated: false,
            refused: Throttle::default(),
        })
    }

    /// The events written when the driver notifies each queue; the VMM can
    /// bind them to QueueNotify writes (ioeventfd, datamatch = index).
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// The Status register as the driver reads it: what it set, plus
    /// DEVICE_NEEDS_RESET once the device has failed.
    pub fn status(&self) -> u32 {
        if self.interrupt.needs_reset() {
            self.status | status::DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// Register writes refused so far (driver errors).
    pub fn refused_writes(&self) -> u64 {
        self.refused.count()
    }

    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// See [`VirtioDevice::save_device`].
    pub fn save_device(&self) -> Result<Vec<u8>, String> {
        self.device.save_device()
    }

    /// See [`VirtioDevice::restore_device`]; call before [`Self::restore`].
    pub fn restore_device(&mut self, state: &[u8]) -> Result<(), MmioError> {
        self.device
            .restore_device(state)
            .map_err(MmioError::Restore)
    }

    /// The transport's state, with the device's live queue positions
    /// once it runs (the device works on copies of the queues).
    pub fn save(&self) -> MmioPersist {
        let live = if self.activated {
            self.device.queue_states()
        } else {
            Vec::new()
        };
        let queues = if live.len() == self.queues.len() {
            live
        } else {
            self.queues.iter().map(QueuePersist::from).collect()
        };
        MmioPersist {
            status: self.status(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            queues,
        }
    }

    /// Puts a saved state back into a transport whose device was just
    /// built again (the same kind, with the same queues), and restarts the
    /// device where it was if the driver had started it.
    pub fn restore(&mut self, state: &MmioPersist) -> Result<(), MmioError> {
        let refuse = |why: String| Err(MmioError::Restore(why));
        if state.queues.len() != self.queues.len() {
            return refuse(format!(
                "{} queues saved for a device with {}",
                state.queues.len(),
                self.queues.len()
            ));
        }
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, (saved, now)) in state.queues.iter().zip(&self.queues).enumerate() {
            if saved.max_size != now.max_size() {
                return refuse(format!(
                    "queue {i} was saved with {} entries at most, the device has {}",
                    saved.max_size,
                    now.max_size()
                ));
            }
            match Queue::try_from(saved) {
                Ok(q) => queues.push(q),
                Err(e) => return refuse(format!("queue {i}: {e}")),
            }
        }
        if state.driver_features & !self.device.features() != 0 {
            return refuse(format!(
                "the driver had features {:#x} the device does not offer",
                state.driver_features
            ));
        }
        self.queues = queues;
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.config_generation = state.config_generation;
        self.interrupt.set_status(state.interrupt_status);
        use status::*;
        let started = DRIVER_OK | FEATURES_OK;
        if state.status & started == started && state.status & (FAILED | DEVICE_NEEDS_RESET) == 0 {
            self.device.ack_features(state.driver_features);
            self.activate();
            if !self.activated {
                return refuse("the device did not start again".into());
            }
        }
        Ok(())
    }

    /// See [`VirtioDevice::restored`]: once the restored VM runs (or is
    /// about to), for a device the driver had started.
    pub fn announce(&mut self) {
        if self.activated {
            self.device.restored();
        }
    }

    /// See [`VirtioDevice::quiesce`].
    pub fn quiesce(&mut self) {
        self.device.quiesce();
    }

    /// See [`VirtioDevice::unquiesce`].
    pub fn unquiesce(&mut self) {
        self.device.unquiesce();
    }

    /// See [`VirtioDevice::can_snapshot`].
    pub fn can_snapshot(&self) -> Result<(), String> {
        self.device.can_snapshot()
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK.
    fn queue_config_allowed(&self) -> bool {
        self.status & (status::FEATURES_OK | status::DRIVER_OK | status::FAILED)
            == status::FEATURES_OK
    }

    /// Applies a queue register write to the selected queue, if queue
    /// registers may change now and the value is one virtio allows (a
    /// power-of-two size within the maximum, aligned ring addresses).
    fn with_queue(&mut self, f: impl FnOnce(&mut Queue) -> Result<(), virtio_queue::Error>) {
        if !self.queue_config_allowed() {
            if let Some(n) = self.refused.hit() {
                tracing::warn!(
                    status = self.status,
                    refused = n,
                    "virtio-mmio: queue set up at the wrong time, ignored"
                );
            }
            return;
        }
        let refused = match self.selected_queue() {
            Some(q) => f(q).err(),
            None => None,
        };
        if let Some(e) = refused
            && let Some(n) = self.refused.hit()
        {
            tracing::warn!(
                refused = n,
                "virtio-mmio: queue register value refused: {e}"
            );
        }
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
            self.activated = false;
        }
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.clear();
    }

    fn set_status(&mut self, new: u32) {
        use status::*;
        if new == 0 {
            self.reset();
            return;
        }
        if new & FAILED != 0 {
            self.status |= FAILED;
            return;
        }
        let old = self.status;
        let added = new & !old;
        // Bits are only ever added, in the order of the specification; a
        // driver may add several steps in one write (virtio-drivers writes
        // ACKNOWLEDGE | DRIVER at once).
        const STEPS: [u32; 5] = [
            0,
            ACKNOWLEDGE,
            ACKNOWLEDGE | DRIVER,
            ACKNOWLEDGE | DRIVER | FEATURES_OK,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        ];
        let ok = new & old == old
            && added != 0
            && STEPS.contains(&new)
            && (added & FEATURES_OK == 0 || self.features_acceptable());
        if !ok {
            if let Some(n) = self.refused.hit() {
                tracing::warn!(old, new, refused = n, "virtio-mmio: status change refused");
            }
            return;
        }
        self.status = new;
        if added & DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn features_acceptable(&mut self) -> bool {
        let offered = self.device.features();
        let fine = self.driver_features & !offered == 0
            && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
        if fine {
            self.device.ack_features(self.driver_features);
        } else if let Some(n) = self.refused.hit() {
            tracing::warn!(
                offered = format_args!("{offered:#x}"),
                asked = format_args!("{:#x}", self.driver_features),
                refused = n,
                "virtio-mmio: driver features refused"
            );
        }
        fine
    }

    fn activate(&mut self) {
        // virtio-queue takes rings at address 0 for "not set up": a ready
        // queue with one there would be walked as empty forever.
        let all_valid = self.queues.iter().all(|q| {
            !q.ready()
                || (q.is_valid(&self.mem)
                    && q.desc_table() != 0
                    && q.avail_ring() != 0
                    && q.used_ring() != 0)
        });
        let events: Result<Vec<_>, _> = self.queue_events.iter().map(|e| e.try_clone()).collect();
        // The device gets its own copies; the transport keeps the registers.
        let queues: Result<Vec<Queue>, _> = self
            .queues
            .iter()
            .map(|q| Queue::try_from(&QueuePersist::from(q)))
            .collect();
        let result = match (all_valid, events, queues) {
            (false, _, _) | (_, _, Err(_)) => {
                Err("a ready queue lies outside guest memory or is malformed".to_string())
            }
            (true, Err(e), _) => Err(format!("cannot share queue events: {e}")),
            (true, Ok(queue_events), Ok(queues)) => self
                .device
                .activate(ActivateContext {
                    mem: self.mem.clone(),
                    queues,
                    queue_events,
                    interrupt: self.interrupt.clone(),
                })
                .map_err(|e| e.to_string()),
        };
        match result {
            Ok(()) => self.activated = true,
            Err(msg) => {
                if let Some(n) = self.refused.hit() {
                    tracing::error!(
                        device = self.device.device_type(),
                        refused = n,
                        "virtio device did not start: {msg}"
                    );
                }
                self.status |= status::DEVICE_NEEDS_RESET;
                self.config_generation = self.config_generation.wrapping_add(1);
                // Tell the driver to look at the status.
                let _ = self.interrupt.signal_config_change();
            }
        }
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => self.device.device_type(),
            0x0c => VENDOR_ID,
            0x10 => {
                let f = self.device.features();
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            0x34 => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            0x44 => self.selected_queue().is_some_and(|q| q.ready()).into(),
            0x60 => self.interrupt.status(),
            0x70 => self.status(),
            0xfc => self.config_generation,
            _ => {
                tracing::debug!(offset, "virtio-mmio: read of an unknown register");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, v: u32) {
        let features_allowed =
            self.status & (status::DRIVER | status::FEATURES_OK | status::FAILED) == status::DRIVER;
        match offset {
            0x14 => self.device_features_sel = v,
            0x20 if features_allowed => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            0x24 => self.driver_features_sel = v,
            0x30 => self.queue_sel = v,
            0x38 => self.with_queue(|q| match u16::try_from(v) {
                Ok(size) => q.try_set_size(size),
                Err(_) => Err(virtio_queue::Error::InvalidSize),
            }),
            0x44 => self.with_queue(|q| {
                q.set_ready(v == 1);
                Ok(())
            }),
            0x50 => match self.queue_events.get(v as usize) {
                Some(evt) if self.activated => {
                    if let Err(e) = evt.write(1) {
                        tracing::error!("virtio-mmio: cannot signal queue {v}: {e}");
                    }
                }
                _ => tracing::debug!(queue = v, "virtio-mmio: notify ignored"),
            },
            0x64 => self.interrupt.ack(v),
            0x70 => self.set_status(v),
            0x80 | 0x84 => self.with_queue(|q| {
                let at = half(q.desc_table(), offset == 0x84, v);
                q.try_set_desc_table_address(GuestAddress(at))
            }),
            0x90 | 0x94 => self.with_queue(|q| {
                let at = half(q.avail_ring(), offset == 0x94, v);
                q.try_set_avail_ring_address(GuestAddress(at))
            }),
            0xa0 | 0xa4 => self.with_queue(|q| {
                let at = half(q.used_ring(), offset == 0xa4, v);
                q.try_set_used_ring_address(GuestAddress(at))
            }),
            _ => tracing::debug!(offset, value = v, "virtio-mmio: write ignored"),
        }
    }
}

/// `addr` with its high (`high`) or low 32 bits replaced by `v`.
fn half(addr: u64, high: bool, v: u32) -> u64 {
    if high {
        (addr & 0xffff_ffff) | (u64::from(v) << 32)
    } else {
        (addr & !0xffff_ffff) | u64::from(v)
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        // Registers are 32 bits wide and read whole.
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        let v = self.read_register(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            if self.status & status::FAILED == 0 {
                self.device.write_config(offset - CONFIG_OFFSET, data);
            }
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset.is_multiple_of(4) => {
                self.write_register(offset, u32::from_le_bytes(bytes))
            }
            _ => tracing::debug!(
                offset,
                len = data.len(),
                "virtio-mmio: odd-sized write ignored"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::{ActivateError, read_config_bytes};
    use std::sync::Mutex;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryBackend};

    /// A device that records what the transport hands it.
    #[derive(Default)]
    struct Recorder {
        acked: u64,
        activated: Arc<Mutex<Option<usize>>>,
        resets: usize,
        fail: bool,
        config: [u8; 8],
    }

    impl VirtioDevice for Recorder {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![16, 16]
        }
        fn features(&self) -> u64 {
            (1 << VIRTIO_F_VERSION_1) | 0b101
        }
        fn ack_features(&mut self, f: u64) {
            self.acked = f;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            read_config_bytes(&self.config, offset, data);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            let o = offset as usize;
            if let Some(dst) = self.config.get_mut(o..o + data.len()) {
                dst.copy_from_slice(data);
            }
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
            if self.fail {
                return Err(ActivateError::Device("refused".into()));
            }
            let ready = ctx.queues.iter().filter(|q| q.ready()).count();
            *self.activated.lock().unwrap() = Some(ready);
            Ok(())
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn transport(dev: Recorder) -> MmioTransport {
        MmioTransport::new(
            Box::new(dev),
            mem(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        )
        .unwrap()
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport, features: u64) {
        w(t, 0x70, status::ACKNOWLEDGE);
        w(t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        w(t, 0x24, 0);
        w(t, 0x20, features as u32);
        w(t, 0x24, 1);
        w(t, 0x20, (features >> 32) as u32);
        w(
            t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    fn setup_queue(t: &mut MmioTransport, index: u32, q: &MockSplitQueue<'_, GuestMemoryMmap>) {
        w(t, 0x30, index);
        w(t, 0x38, 16);
        w(t, 0x80, q.desc_table_addr().0 as u32);
        w(t, 0x84, (q.desc_table_addr().0 >> 32) as u32);
        w(t, 0x90, q.avail_addr().0 as u32);
        w(t, 0x94, 0);
        w(t, 0xa0, q.used_addr().0 as u32);
        w(t, 0xa4, 0);
        w(t, 0x44, 1);
    }

    #[test]
    fn identifies_itself() {
        let mut t = transport(Recorder::default());
        assert_eq!(r(&mut t, 0x00), MAGIC);
        assert_eq!(r(&mut t, 0x04), 2);
        assert_eq!(r(&mut t, 0x08), 42);
        w(&mut t, 0x14, 0);
        assert_eq!(r(&mut t, 0x10), 0b101);
        w(&mut t, 0x14, 1);
        assert_eq!(r(&mut t, 0x10), 1);
        w(&mut t, 0x30, 1);
        assert_eq!(r(&mut t, 0x34), 16);
        w(&mut t, 0x30, 7);
        assert_eq!(r(&mut t, 0x34), 0, "a queue that does not exist has size 0");
    }

    #[test]
    fn full_handshake_activates_with_the_configured_queues() {
        let dev = Recorder::default();
        let activated = dev.activated.clone();
        let mut t = transport(dev);
        let m = t.mem.clone();
        let q0 = MockSplitQueue::create(&m, GuestAddress(0x1000), 16);
        negotiate(&mut t, (1 << VIRTIO_F_VERSION_1) | 1);
        assert_eq!(r(&mut t, 0x70) & status::FEATURES_OK, status::FEATURES_OK);
        setup_queue(&mut t, 0, &q0);
        assert_eq!(r(&mut t, 0x44), 1);
        w(
            &mut t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert!(t.is_activated());
        assert_eq!(*activated.lock().unwrap(), Some(1));
        // Queue registers are frozen once the driver is done.
        w(&mut t, 0x30, 0);
        w(&mut t, 0x44, 0);
        assert_eq!(r(&mut t, 0x44), 1);
    }

    #[test]
    fn refuses_features_the_device_does_not_offer_or_without_version_1() {
        let mut t = transport(Recorder::default());
        negotiate(&mut t, (1 << VIRTIO_F_VERSION_1) | 0b10);
        assert_eq!(r(&mut t, 0x70) & status::FEATURES_OK, 0);
        let mut t = transport(Recorder::default());
        negotiate(&mut t, 0b1);
        assert_eq!(r(&mut t, 0x70) & status::FEATURES_OK, 0);
    }

    #[test]
    fn several_steps_in_one_write_are_taken() {
        let mut t = transport(Recorder::default());
        w(&mut t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        assert_eq!(r(&mut t, 0x70), status::ACKNOWLEDGE | status::DRIVER);
        // Skipping a step, or going back, is still refused.
        w(
            &mut t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
        );
        w(&mut t, 0x70, status::ACKNOWLEDGE);
        assert_eq!(r(&mut t, 0x70), status::ACKNOWLEDGE | status::DRIVER);
    }

    #[test]
    fn out_of_order_status_is_refused() {
        let mut t = transport(Recorder::default());
        w(&mut t, 0x70, status::DRIVER_OK);
        assert_eq!(r(&mut t, 0x70), 0);
        w(&mut t, 0x70, status::ACKNOWLEDGE);
        w(
            &mut t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert_eq!(r(&mut t, 0x70), status::ACKNOWLEDGE);
        // Queue setup before FEATURES_OK is ignored.
        w(&mut t, 0x30, 0);
        w(&mut t, 0x44, 1);
        assert_eq!(r(&mut t, 0x44), 0);
    }

    #[test]
    fn queue_outside_guest_memory_needs_reset_instead_of_activation() {
        let mut t = transport(Recorder::default());
        negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
        w(&mut t, 0x30, 0);
        w(&mut t, 0x38, 16);
        w(&mut t, 0x80, 0xffff_0000); // far past the end of guest memory
        w(&mut t, 0x90, 0x2000);
        w(&mut t, 0xa0, 0x3000);
        w(&mut t, 0x44, 1);
        w(
            &mut t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert!(!t.is_activated());
        assert_ne!(r(&mut t, 0x70) & status::DEVICE_NEEDS_RESET, 0);
        assert_ne!(r(&mut t, 0x60) & crate::virtio::INT_CONFIG, 0);
    }

    #[test]
    fn failed_activation_and_reset_start_over() {
        let mut t = transport(Recorder {
            fail: true,
            ..Default::default()
        });
        let m = t.mem.clone();
        let q0 = MockSplitQueue::create(&m, GuestAddress(0x1000), 16);
        negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, &q0);
        w(
            &mut t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert!(!t.is_activated());
        w(&mut t, 0x70, 0);
        assert_eq!(r(&mut t, 0x70), 0);
        w(&mut t, 0x30, 0);
        assert_eq!(r(&mut t, 0x44), 0, "reset clears queue state");
    }

    #[test]
    fn notify_reaches_the_queue_event_after_activation_only() {
        let mut t = transport(Recorder::default());
        let m = t.mem.clone();
        let q0 = MockSplitQueue::create(&m, GuestAddress(0x1000), 16);
        w(&mut t, 0x50, 0);
        assert!(t.queue_events()[0].read().is_err());
        negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, &q0);
        w(
            &mut t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        w(&mut t, 0x50, 0);
        assert_eq!(t.queue_events()[0].read().unwrap(), 1);
        w(&mut t, 0x50, 9); // no such queue: ignored
    }

    #[test]
    fn interrupt_status_and_ack() {
        let mut t = transport(Recorder::default());
        t.interrupt.signal_used_queue().unwrap();
        assert_eq!(r(&mut t, 0x60), crate::virtio::INT_USED_RING);
        w(&mut t, 0x64, crate::virtio::INT_USED_RING);
        assert_eq!(r(&mut t, 0x60), 0);
    }

    #[test]
    fn config_space_and_odd_accesses() {
        let mut t = transport(Recorder::default());
        t.write(0x102, &[0xab]);
        let mut b = [0u8; 4];
        t.read(0x100, &mut b);
        assert_eq!(b, [0, 0, 0xab, 0]);
        // Past the end of config space reads as zeros.
        t.read(0x200, &mut b);
        assert_eq!(b, [0; 4]);
        // Narrow register reads are not honoured.
        let mut one = [0xffu8];
        t.read(0x00, &mut one);
        assert_eq!(one, [0]);
        // Saved state names the negotiated status.
        negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
        let saved = t.save();
        assert_eq!(
            saved.status,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK
        );
        assert_eq!(saved.queues.len(), 2);
        let _ = t.mem.num_regions();
    }

    #[test]
    fn refused_writes_do_not_flood_the_log() {
        let mut t = transport(Recorder::default());
        let logged = crate::virtio::test_utils::count_log_events(|| {
            for _ in 0..100_000 {
                w(&mut t, 0x70, status::DRIVER_OK);
                w(&mut t, 0x38, 8);
            }
        });
        assert_eq!(t.refused_writes(), 200_000);
        assert!(
            (8..=30).contains(&logged),
            "{logged} log lines for 200,000 refused writes"
        );
    }

    #[test]
    fn bad_queue_register_values_are_refused_and_counted() {
        let mut t = transport(Recorder::default());
        negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
        w(&mut t, 0x30, 0);
        let logged = crate::virtio::test_utils::count_log_events(|| {
            for _ in 0..10_000 {
                w(&mut t, 0x38, 3); // not a power of two
                w(&mut t, 0x38, 0x1_0010); // not 16 bits
                w(&mut t, 0x80, 0x1001); // misaligned
            }
        });
        assert_eq!(t.refused_writes(), 30_000);
        assert!((8..=30).contains(&logged), "{logged} log lines");
        assert_eq!(t.queues[0].size(), 16, "the size is unchanged");
    }

    #[test]
    fn a_ready_queue_with_a_ring_at_zero_is_not_activated() {
        let mut t = transport(Recorder::default());
        negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
        w(&mut t, 0x30, 0);
        w(&mut t, 0x80, 0x1000);
        w(&mut t, 0xa0, 0x3000);
        // The avail ring is left at 0.
        w(&mut t, 0x44, 1);
        w(
            &mut t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert!(!t.is_activated());
        assert_ne!(r(&mut t, 0x70) & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn a_failed_device_reads_needs_reset_until_the_driver_resets_it() {
        let mut t = transport(Recorder::default());
        negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
        w(
            &mut t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert!(t.is_activated());
        t.interrupt
            .device_failed("test", &crate::virtio::QueueError::HeadInFlight(0));
        assert_ne!(r(&mut t, 0x70) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(
            t.save().status & status::DEVICE_NEEDS_RESET,
            status::DEVICE_NEEDS_RESET
        );
        assert_ne!(r(&mut t, 0x60) & crate::virtio::INT_CONFIG, 0);
        w(&mut t, 0x70, 0);
        assert_eq!(r(&mut t, 0x70), 0);
        assert_eq!(r(&mut t, 0x60), 0);
    }
}
