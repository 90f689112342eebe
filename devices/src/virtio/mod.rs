//! Virtio devices and the virtio-mmio transport that presents them.
//!
//! A device implements [`VirtioDevice`]: what it offers (type, features,
//! queue sizes, config space) and what it does once the driver has set it
//! up ([`VirtioDevice::activate`]). The transport ([`mmio::MmioTransport`])
//! owns the register state machine that gets it there.

pub mod blk;
pub mod fs;
pub mod mmio;
pub mod net;
#[cfg(test)]
mod test_utils;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
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
/// tell why it was raised, and whether the device has failed and needs a
/// reset (virtio's DEVICE_NEEDS_RESET): what a device running on its own
/// threads shares with its transport.
#[derive(Debug)]
pub struct VirtioInterrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    irq: EventFd,
}

impl VirtioInterrupt {
    pub fn new(irq: EventFd) -> Self {
        VirtioInterrupt {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            irq,
        }
    }

    /// The driver broke the device's queues: the device stops using them,
    /// the transport reports DEVICE_NEEDS_RESET, and the driver is told
    /// through a config-change interrupt (virtio 1.2, 2.1.2). Logged once
    /// per failure, however often the guest repeats it.
    pub fn device_failed(&self, device: &str, why: &dyn std::fmt::Display) {
        if self.needs_reset.swap(true, Ordering::SeqCst) {
            return;
        }
        let raised = self.signal_config_change();
        tracing::warn!("{device}: {why}; the device stops until the driver resets it");
        if let Err(e) = raised {
            tracing::warn!("{device}: cannot interrupt the guest: {e}");
        }
    }

    /// Whether the device has failed since the driver last reset it.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
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

    /// Sets the InterruptStatus bits (a restored device).
    fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    /// The driver reset the device: no interrupt pending, no failure.
    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
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
    /// Stops touching guest memory and the queues (frames for the guest
    /// are dropped meanwhile), so that a snapshot sees them still, until
    /// [`Self::unquiesce`]. Only a device that can be saved needs it.
    fn quiesce(&mut self) {}
    /// Goes on after [`Self::quiesce`].
    fn unquiesce(&mut self) {}
    /// Whether the device's state can be saved in a snapshot; `Err` says
    /// why not.
    fn can_snapshot(&self) -> Result<(), String> {
        Err("this kind of device cannot be saved in a snapshot yet".into())
    }
    /// The live state of the device's queues (where the device is in each
    /// ring), in order, once it is activated; empty before.
    fn queue_states(&self) -> Vec<mmio::QueuePersist> {
        Vec::new()
    }
    /// The device's own state for a snapshot, besides its queues (opaque
    /// to the VMM; empty for a device that keeps none), taken while it is
    /// quiesced.
    fn save_device(&self) -> Result<Vec<u8>, String> {
        Ok(Vec::new())
    }
    /// Puts back what [`Self::save_device`] saved, before the device is
    /// activated again.
    fn restore_device(&mut self, _state: &[u8]) -> Result<(), String> {
        Ok(())
    }
    /// The VM was restored or migrated here, with this device started
    /// again: what it does once in its new place (a NIC announces its
    /// MAC, so that switches learn where it is now).
    fn restored(&mut self) {}
}

/// A queue the driver broke: the device must stop walking it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("the driver made {ahead} chains available on a queue of {size}")]
    AvailTooFarAhead { ahead: u16, size: u16 },
    #[error("the driver made chain {0} available while the device still holds it")]
    HeadInFlight(u16),
    #[error("the driver made chain {head} available on a queue of {size}")]
    HeadOutOfRange { head: u16, size: u16 },
    #[error("the queue's rings are not set up, or not in guest memory")]
    Rings,
}

/// Checks that the driver has made no more chains available than the
/// queue holds (virtio 1.2, 2.7.6): an available index further ahead
/// would have the device walk stale ring entries forever.
pub fn check_avail(mem: &GuestMemoryMmap, queue: &Queue) -> Result<(), QueueError> {
    if !queue.ready() || queue.avail_ring() == 0 {
        // Not set up (virtio-queue takes an avail ring at 0 for "not
        // ready" too): nothing there may be walked.
        return Err(QueueError::Rings);
    }
    let avail = queue
        .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
        .map_err(|_| QueueError::Rings)?;
    let ahead = avail.0.wrapping_sub(queue.next_avail());
    let size = queue.size();
    if ahead > size {
        return Err(QueueError::AvailTooFarAhead { ahead, size });
    }
    Ok(())
}

/// What the `serve` of [`drain_queue_deferred`] did with a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// Give it back now, with this many bytes written into it.
    Done(u32),
    /// The caller keeps it and gives it back later itself; `full`: take
    /// no more in this pass (a budget of the caller's is spent).
    Kept { full: bool },
}

/// The outcome of one pass over a queue.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Chains went back to the driver: an interrupt may be due.
    pub used: bool,
    /// The pass stopped with chains left (it took a queue's worth, or the
    /// caller's budget is spent): notifications stay off, so the caller
    /// must come back (signal the queue's event) when it can take more.
    pub more: bool,
}

/// Serves the chains the driver has made available on `queue`: `serve`
/// handles one chain and returns how many bytes it wrote into it; the
/// chain then goes back to the driver. Notifications stay off while the
/// queue is drained, and it is drained again if chains arrived meanwhile,
/// up to one queue's worth of chains per call, so that a driver refilling
/// as fast as the device takes cannot hold the caller's thread. Returns
/// what the pass did, or why the queue is broken (the caller fails the
/// device).
pub fn drain_queue<'m>(
    mem: &'m GuestMemoryMmap,
    queue: &mut Queue,
    mut serve: impl FnMut(DescriptorChain<&'m GuestMemoryMmap>) -> u32,
) -> Result<Drained, QueueError> {
    drain_queue_deferred(mem, queue, |chain| Ok(Served::Done(serve(chain))))
}

/// Like [`drain_queue`], but `serve` may keep a chain to give back later
/// ([`Served::Kept`]), and may find the queue broken (`Err`, which ends
/// the pass).
pub fn drain_queue_deferred<'m>(
    mem: &'m GuestMemoryMmap,
    queue: &mut Queue,
    mut serve: impl FnMut(DescriptorChain<&'m GuestMemoryMmap>) -> Result<Served, QueueError>,
) -> Result<Drained, QueueError> {
    if !queue.ready() {
        return Ok(Drained::default());
    }
    let budget = queue.size();
    let mut taken = 0u16;
    let mut used = false;
    loop {
        queue
            .disable_notification(mem)
            .map_err(|_| QueueError::Rings)?;
        check_avail(mem, queue)?;
        loop {
            if taken == budget {
                return Ok(Drained { used, more: true });
            }
            // `iter` tells a broken queue from an empty one, where
            // `pop_descriptor_chain` says "nothing" to both.
            let chain = match queue.iter(mem) {
                Ok(mut chains) => chains.next(),
                Err(_) => return Err(QueueError::Rings),
            };
            let Some(chain) = chain else {
                break;
            };
            taken += 1;
            let head = chain.head_index();
            if head >= queue.size() {
                return Err(QueueError::HeadOutOfRange {
                    head,
                    size: queue.size(),
                });
            }
            match serve(chain)? {
                Served::Done(len) => {
                    queue
                        .add_used(mem, head, len)
                        .map_err(|_| QueueError::Rings)?;
                    used = true;
                }
                Served::Kept { full: false } => {}
                Served::Kept { full: true } => return Ok(Drained { used, more: true }),
            }
        }
        if !queue
            .enable_notification(mem)
            .map_err(|_| QueueError::Rings)?
        {
            return Ok(Drained { used, more: false });
        }
    }
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
    fn quiesce(&mut self) {
        self.lock().unwrap_or_else(|p| p.into_inner()).quiesce()
    }
    fn unquiesce(&mut self) {
        self.lock().unwrap_or_else(|p| p.into_inner()).unquiesce()
    }
    fn can_snapshot(&self) -> Result<(), String> {
        self.lock()
            .unwrap_or_else(|p| p.into_inner())
            .can_snapshot()
    }
    fn queue_states(&self) -> Vec<mmio::QueuePersist> {
        self.lock()
            .unwrap_or_else(|p| p.into_inner())
            .queue_states()
    }
    fn save_device(&self) -> Result<Vec<u8>, String> {
        self.lock().unwrap_or_else(|p| p.into_inner()).save_device()
    }
    fn restore_device(&mut self, state: &[u8]) -> Result<(), String> {
        self.lock()
            .unwrap_or_else(|p| p.into_inner())
            .restore_device(state)
    }
    fn restored(&mut self) {
        self.lock().unwrap_or_else(|p| p.into_inner()).restored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{add_chain, finishes_within, repost};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn an_avail_index_too_far_ahead_breaks_the_queue_instead_of_spinning() {
        let outcome = finishes_within(10, || {
            let m = mem();
            let mq = MockSplitQueue::new(&m, 16);
            let mut q: Queue = mq.create_queue().unwrap();
            add_chain(&mq, 0, &[(0x8000, 64, false)]);
            // 17 more: the driver claims more chains than the queue holds.
            repost(&m, mq.avail_addr(), 16, 0, 17);
            let mut served = 0;
            let r = drain_queue(&m, &mut q, |_| {
                served += 1;
                0
            });
            (r, served)
        });
        assert_eq!(
            outcome,
            (
                Err(QueueError::AvailTooFarAhead {
                    ahead: 18,
                    size: 16
                }),
                0
            )
        );
    }

    /// virtio-queue takes an avail ring at 0 for "not set up", but the
    /// index there still reads as chains waiting: the queue is broken,
    /// not empty forever.
    #[test]
    fn a_ready_queue_with_its_avail_ring_at_zero_breaks_instead_of_spinning() {
        let outcome = finishes_within(10, || {
            let m = mem();
            let mq = MockSplitQueue::create(&m, GuestAddress(0x1000), 16);
            let mut q: Queue = mq.create_queue().unwrap();
            q.set_avail_ring_address(Some(0), Some(0));
            // avail->idx at guest address 2: five chains "waiting".
            vm_memory::Bytes::write_obj(&m, 5u16, GuestAddress(2)).unwrap();
            drain_queue(&m, &mut q, |_| 0)
        });
        assert_eq!(outcome, Err(QueueError::Rings));
    }

    /// A driver that refills the ring as fast as the device takes from it
    /// cannot keep one pass going: it stops after a queue's worth.
    #[test]
    fn one_pass_takes_at_most_a_queue_s_worth() {
        let (served, drained) = finishes_within(10, || {
            let m = mem();
            let mq = MockSplitQueue::new(&m, 16);
            let mut q: Queue = mq.create_queue().unwrap();
            add_chain(&mq, 0, &[(0x8000, 64, false)]);
            let mut served = 0;
            let avail = mq.avail_addr();
            let drained = drain_queue(&m, &mut q, |chain| {
                served += 1;
                // The driver posts the chain again as soon as it comes back.
                repost(&m, avail, 16, chain.head_index(), 1);
                0
            });
            (served, drained)
        });
        assert_eq!(served, 16);
        assert_eq!(
            drained,
            Ok(Drained {
                used: true,
                more: true
            })
        );
    }

    #[test]
    fn a_head_past_the_queue_breaks_it() {
        let m = mem();
        let mq = MockSplitQueue::new(&m, 16);
        let mut q: Queue = mq.create_queue().unwrap();
        repost(&m, mq.avail_addr(), 16, 40, 1);
        let r = drain_queue(&m, &mut q, |_| 0);
        assert_eq!(r, Err(QueueError::HeadOutOfRange { head: 40, size: 16 }));
    }

    #[test]
    fn a_failure_is_reported_once_until_the_driver_resets() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let i = VirtioInterrupt::new(irq.try_clone().unwrap());
        let why = QueueError::HeadInFlight(3);
        for _ in 0..100 {
            i.device_failed("test", &why);
        }
        assert!(i.needs_reset());
        assert_eq!(i.status(), INT_CONFIG);
        assert_eq!(irq.read().unwrap(), 1, "one interrupt, not one per report");
        i.clear();
        assert!(!i.needs_reset());
    }
}
