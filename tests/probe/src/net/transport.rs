//! A transport wrapper that makes virtio-drivers' driver look like Linux's:
//! status bits are set one write at a time (ACKNOWLEDGE, DRIVER,
//! FEATURES_OK, DRIVER_OK), and queue kicks are batched: one per refill
//! batch on the receive queue ([`flush_rx`]) and one per batch of frames
//! on the transmit queue ([`flush_tx`]), rather than one per buffer. virtio-drivers writes ACKNOWLEDGE|DRIVER in one
//! write after the reset, a transition Firecracker (and vmplant) refuse.
//! It also bounds the config-generation retry loop, which virtio-drivers
//! runs without limit, and hides VIRTIO_F_EVENT_IDX: virtio-drivers 0.13
//! decides whether to kick with `avail_idx >= avail_event + 1`, which is
//! wrong once the 16-bit index wraps (Linux's `vring_need_event` compares
//! modulo 2^16), and a polling driver gains nothing from it.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{PhysAddr, Result};

/// Queue notifications ("kicks", each a VM exit) written so far, for
/// queues 0 (receiveq) and 1 (transmitq).
static KICKS: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// Receive-queue kicks held back since the last [`flush_rx`].
static RX_DEFERRED: AtomicU32 = AtomicU32::new(0);
/// Flush a held-back receive kick after this many reposted buffers even if
/// frames keep coming.
const RX_BATCH: u32 = 32;

/// Transmit-queue kicks held back since the last [`flush_tx`].
static TX_DEFERRED: AtomicU32 = AtomicU32::new(0);
/// Flush held-back transmit kicks after this many frames.
const TX_BATCH: u32 = 32;

/// Writes the transmit queue's kick if one was held back: the caller has
/// queued what it had (Linux's `xmit_more`), or waits for a buffer.
pub fn flush_tx(base: u64) {
    if TX_DEFERRED.swap(0, Ordering::Relaxed) != 0 {
        KICKS[1].fetch_add(1, Ordering::Relaxed);
        crate::hw::mmio_write_u32(base + QUEUE_NOTIFY, 1);
    }
}

/// Writes the receive queue's kick if one was held back (the caller's ring
/// is drained, or `RX_BATCH` buffers were reposted): like Linux's
/// virtio-net, which kicks once per refill batch, not per buffer.
pub fn flush_rx(base: u64) {
    if RX_DEFERRED.swap(0, Ordering::Relaxed) != 0 {
        KICKS[0].fetch_add(1, Ordering::Relaxed);
        crate::hw::mmio_write_u32(base + QUEUE_NOTIFY, 0);
    }
}

/// Whether enough receive kicks were held back to flush now.
pub fn rx_batch_full() -> bool {
    RX_DEFERRED.load(Ordering::Relaxed) >= RX_BATCH
}

/// Kicks of (receiveq, transmitq) so far.
pub fn kicks() -> (u64, u64) {
    (
        KICKS[0].load(Ordering::Relaxed),
        KICKS[1].load(Ordering::Relaxed),
    )
}

/// QueueNotify register of virtio-mmio.
const QUEUE_NOTIFY: u64 = 0x50;
/// VIRTIO_F_EVENT_IDX (virtio 1.2, 6).
const EVENT_IDX: u64 = 29;
/// How often a config read is retried while the generation changes.
const GENERATION_TRIES: u32 = 1000;

/// `T` with Linux's status write order and kick batching (or, if
/// `stepwise` is false, virtio-drivers' own behaviour).
pub struct Linuxish<T> {
    inner: T,
    stepwise: bool,
    /// Whether the net queues' kicks are batched (with `stepwise`).
    batch: bool,
    /// The virtio-mmio registers (for held-back kicks).
    base: u64,
}

impl<T: Transport> Linuxish<T> {
    pub fn new(inner: T, stepwise: bool, base: u64) -> Self {
        Linuxish {
            inner,
            stepwise,
            batch: stepwise,
            base,
        }
    }

    /// Status bits one write at a time, and every kick written as the
    /// driver asks (the block device's transport).
    pub fn stepwise_status(inner: T, base: u64) -> Self {
        Linuxish {
            inner,
            stepwise: true,
            batch: false,
            base,
        }
    }
}

impl<T: Transport> Transport for Linuxish<T> {
    fn device_type(&self) -> DeviceType {
        self.inner.device_type()
    }

    fn read_device_features(&mut self) -> u64 {
        self.inner.read_device_features() & !(1 << EVENT_IDX)
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        self.inner.write_driver_features(driver_features)
    }

    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.inner.max_queue_size(queue)
    }

    fn notify(&mut self, queue: u16) {
        if queue == 0 && self.batch {
            // Held back until the ring is drained (see `flush_rx`).
            RX_DEFERRED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if queue == 1 && self.batch {
            // Held back until the sender is done for now (see `flush_tx`).
            if TX_DEFERRED.fetch_add(1, Ordering::Relaxed) + 1 >= TX_BATCH {
                flush_tx(self.base);
            }
            return;
        }
        if let Some(k) = KICKS.get(usize::from(queue)) {
            k.fetch_add(1, Ordering::Relaxed);
        }
        self.inner.notify(queue)
    }

    fn get_status(&self) -> DeviceStatus {
        self.inner.get_status()
    }

    fn set_status(&mut self, status: DeviceStatus) {
        if self.stepwise && !status.is_empty() {
            let order = [
                DeviceStatus::ACKNOWLEDGE,
                DeviceStatus::DRIVER,
                DeviceStatus::FEATURES_OK,
                DeviceStatus::DRIVER_OK,
            ];
            let mut now = self.inner.get_status();
            if status.contains(now) {
                for bit in order {
                    if status.contains(bit) && !now.contains(bit) && now | bit != status {
                        now |= bit;
                        self.inner.set_status(now);
                    }
                }
            }
        }
        self.inner.set_status(status)
    }

    fn set_guest_page_size(&mut self, guest_page_size: u32) {
        self.inner.set_guest_page_size(guest_page_size)
    }

    fn requires_legacy_layout(&self) -> bool {
        self.inner.requires_legacy_layout()
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        self.inner
            .queue_set(queue, size, descriptors, driver_area, device_area)
    }

    fn queue_unset(&mut self, queue: u16) {
        self.inner.queue_unset(queue)
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.inner.queue_used(queue)
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        self.inner.ack_interrupt()
    }

    fn read_config_generation(&self) -> u32 {
        self.inner.read_config_generation()
    }

    fn read_config_space<V: zerocopy::FromBytes + zerocopy::IntoBytes>(
        &self,
        offset: usize,
    ) -> Result<V> {
        self.inner.read_config_space(offset)
    }

    fn write_config_space<V: zerocopy::IntoBytes + zerocopy::Immutable>(
        &mut self,
        offset: usize,
        value: V,
    ) -> Result<()> {
        self.inner.write_config_space(offset, value)
    }

    fn read_consistent<V>(&self, f: impl Fn() -> Result<V>) -> Result<V> {
        for _ in 0..GENERATION_TRIES {
            let before = self.read_config_generation();
            let result = f();
            if self.read_config_generation() == before {
                return result;
            }
        }
        Err(virtio_drivers::Error::IoError)
    }
}
