//! Virtio devices and the virtio-mmio transport that presents them.
//!
//! A device implements [`VirtioDevice`]: what it offers (type, features,
//! queue sizes, config space) and what it does once the driver has set it
//! up ([`VirtioDevice::activate`]). The transport ([`mmio::MmioTransport`])
//! owns the register state machine that gets it there.

pub mod fs;
pub mod mmio;
pub mod net;
#[cfg(test)]
mod test_utils;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::bitmap::AtomicBitmap;
use vmm_sys_util::eventfd::EventFd;

/// Guest memory as devices see it: with a dirty bitmap, so that pages a
/// device writes are tracked for migration like those the guest writes.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Feature bit: the device follows virtio 1.x (required on virtio-mmio v2).
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

/// Interrupt status bits of virtio-mmio's InterruptStatus register.
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// A device's interrupt line plus the status register the driver reads to
/// tell why it was raised.
#[derive(Debug)]
pub struct VirtioInterrupt {
    status: AtomicU32,
    irq: EventFd,
}

impl VirtioInterrupt {
    pub fn new(irq: EventFd) -> Self {
        VirtioInterrupt {
            status: AtomicU32::new(0),
            irq,
        }
    }

    /// Tells the driver that used rings have new entries.
    pub fn signal_used_queue(&self) -> std::io::Result<()> {
        self.raise(INT_USED_RING)
    }

    /// Tells the driver that the config space changed.
    pub fn signal_config_change(&self) -> std::io::Result<()> {
        self.raise(INT_CONFIG)
    }

    fn raise(&self, bit: u32) -> std::io::Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.irq.write(1)
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// Everything a device gets when the driver sets DRIVER_OK.
pub struct ActivateContext {
    pub mem: GuestMemoryMmap,
    /// The queues the driver configured, in order.
    pub queues: Vec<Queue>,
    /// One event per queue, written when the driver notifies that queue.
    pub queue_events: Vec<EventFd>,
    pub interrupt: Arc<VirtioInterrupt>,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the device cannot start: {0}")]
    Device(String),
    #[error("cannot set up the device's events")]
    Events(#[source] std::io::Error),
}

/// A virtio device behind some transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID (1 net, 2 block, 26 fs, ...).
    fn device_type(&self) -> u32;
    /// The maximum size of each queue; its length is the queue count.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// The feature bits the device offers.
    fn features(&self) -> u64;
    /// The features the driver accepted (a subset of [`Self::features`]).
    fn ack_features(&mut self, features: u64);
    /// Reads from the device-specific config space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes to the device-specific config space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device on the queues the driver set up.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops the device after a driver reset, so it can be activated again.
    fn reset(&mut self);
}

/// Serves every chain the driver has made available on `queue`: `serve`
/// handles one chain and returns how many bytes it wrote into it; the
/// chain then goes back to the driver. Notifications stay off while the
/// queue is drained, and it is drained again if chains arrived meanwhile.
/// Returns whether any chain went back (an interrupt may be due).
pub fn drain_queue<'m>(
    mem: &'m GuestMemoryMmap,
    queue: &mut Queue,
    device: &str,
    mut serve: impl FnMut(DescriptorChain<&'m GuestMemoryMmap>) -> u32,
) -> bool {
    drain_queue_deferred(mem, queue, device, |chain| Some(serve(chain)))
}

/// Like [`drain_queue`], but `serve` may keep a chain to give back later
/// (by returning `None`; the caller then adds it to the used ring itself);
/// `Some(len)` gives it back now with `len` bytes written.
pub fn drain_queue_deferred<'m>(
    mem: &'m GuestMemoryMmap,
    queue: &mut Queue,
    device: &str,
    mut serve: impl FnMut(DescriptorChain<&'m GuestMemoryMmap>) -> Option<u32>,
) -> bool {
    let mut used = false;
    loop {
        if queue.disable_notification(mem).is_err() {
            break;
        }
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let Some(len) = serve(chain) else {
                continue;
            };
            if queue.add_used(mem, head, len).is_err() {
                tracing::warn!("{device}: used ring is not writable");
                return used;
            }
            used = true;
        }
        match queue.enable_notification(mem) {
            Ok(true) => continue,
            _ => break,
        }
    }
    used
}

/// Copies `src[offset..]` into `data`, or fills `data` with zeros where the
/// access falls outside `src`: config-space reads never fail.
pub fn read_config_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(avail) = src.get(start..) {
        let n = avail.len().min(data.len());
        data[..n].copy_from_slice(&avail[..n]);
    }
}

/// A device shared with another owner (typically the event loop, which
/// runs its queues) is still a device.
impl<T: VirtioDevice> VirtioDevice for Arc<Mutex<T>> {
    fn device_type(&self) -> u32 {
        self.lock().unwrap_or_else(|p| p.into_inner()).device_type()
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        self.lock()
            .unwrap_or_else(|p| p.into_inner())
            .queue_max_sizes()
    }
    fn features(&self) -> u64 {
        self.lock().unwrap_or_else(|p| p.into_inner()).features()
    }
    fn ack_features(&mut self, features: u64) {
        self.lock()
            .unwrap_or_else(|p| p.into_inner())
            .ack_features(features)
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.lock()
            .unwrap_or_else(|p| p.into_inner())
            .read_config(offset, data)
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.lock()
            .unwrap_or_else(|p| p.into_inner())
            .write_config(offset, data)
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.lock().unwrap_or_else(|p| p.into_inner()).activate(ctx)
    }
    fn reset(&mut self) {
        self.lock().unwrap_or_else(|p| p.into_inner()).reset()
    }
}
