//! The virtio-net device through virtio-drivers' raw driver
//! (`VirtIONetRaw`, no alloc): `QSIZE` receive buffers stay posted, `QSIZE`
//! transmit buffers are handed out from a free list, and every buffer holds
//! the virtio-net header followed by one Ethernet frame. Polled: no
//! interrupts. Also the smoltcp `Device`.

use super::hal::ProbeHal;
use super::mmio::MmioDevice;
use super::pool;
use super::transport::{self, Linuxish};
use crate::hw;
use core::ptr::NonNull;
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time;
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};

/// Descriptors per queue (the device must offer at least this many).
pub const QSIZE: usize = 256;
/// One buffer: a 12-byte virtio-net header and a frame up to 1514 bytes.
const BUF: usize = 2048;
/// Ethernet MTU the probe uses (frames up to 1514 bytes without FCS).
pub const MTU: usize = 1500;
/// Largest frame.
pub const MAX_FRAME: usize = MTU + 14;

type Raw = VirtIONetRaw<ProbeHal, Linuxish<MmioTransport<'static>>, QSIZE>;
type Buffers = [[u8; BUF]; QSIZE];

/// Frame and error counters since the device came up.
#[derive(Clone, Copy, Default)]
pub struct Counters {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Used-ring entries with an unknown id or a bad length, and failed
    /// driver calls.
    pub device_errors: u64,
    /// Frames dropped because no transmit buffer came free in time.
    pub tx_dropped: u64,
}

/// Transmit side: the driver (which owns both queues) and its buffers.
struct Tx {
    /// The device's virtio-mmio registers (for held-back kicks).
    base: u64,
    /// In the pool: its queues' shadow descriptors are 4 KiB each.
    raw: &'static mut Raw,
    bufs: &'static mut Buffers,
    len: [u16; QSIZE],
    free: [u8; QSIZE],
    nfree: usize,
    /// Transmit buffer of each in-flight token (descriptor index).
    of_token: [u8; QSIZE],
    counters: Counters,
}

/// Receive side: posted buffers.
struct Rx {
    bufs: &'static mut Buffers,
    /// Receive buffer of each posted token (descriptor index).
    of_token: [u8; QSIZE],
    /// A buffer handed to a reader, to post again on the next call.
    repost: Option<usize>,
}

/// A started virtio-net device.
pub struct NetDev {
    /// The device's virtio-mmio registers.
    base: u64,
    tx: Tx,
    rx: Rx,
    mac: [u8; 6],
    link: Option<bool>,
}

/// Why a device did not come up.
pub enum UpError {
    Transport,
    Driver(virtio_drivers::Error),
    QueueTooSmall(u32),
    NoMemory,
    /// The status register after initialisation, without DRIVER_OK (or
    /// with FAILED or DEVICE_NEEDS_RESET).
    Status(u32),
}

/// The status register's value once the driver is up:
/// ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK.
pub const STATUS_UP: u32 = 0xf;

impl NetDev {
    /// Initialises the device at `dev` (which must be a virtio-net device)
    /// and posts all receive buffers. `stepwise`: set the status bits one
    /// write at a time, as Linux does (else as virtio-drivers does).
    pub fn up(dev: MmioDevice, stepwise: bool) -> Result<Self, UpError> {
        let status_offered = dev.features_lo() & (1 << 16) != 0;
        // QueueSel = 0 (receiveq), then QueueNumMax.
        hw::mmio_write_u32(dev.base + 0x30, 0);
        let max = hw::mmio_read_u32(dev.base + 0x34);
        if (max as usize) < QSIZE {
            return Err(UpError::QueueTooSmall(max));
        }
        let header = NonNull::new(dev.base as *mut VirtIOHeader).ok_or(UpError::Transport)?;
        // SAFETY: `dev.base` is a virtio-mmio register block (its magic and
        // device id were checked) of `dev.size` bytes inside the identity
        // map; nothing else in the probe touches it while the transport
        // lives, and it lives for the rest of the run.
        let transport = unsafe { MmioTransport::new(header, dev.size as usize) }
            .map_err(|_| UpError::Transport)?;
        let raw =
            Raw::new(Linuxish::new(transport, stepwise, dev.base)).map_err(UpError::Driver)?;
        let raw = pool::place(raw).ok_or(UpError::NoMemory)?;
        // The probe polls: ask the device not to interrupt
        // (VRING_AVAIL_F_NO_INTERRUPT, or used_event with EVENT_IDX).
        raw.disable_interrupts();
        // virtio-drivers does not check that the device took FEATURES_OK
        // and DRIVER_OK; do it here.
        let status = hw::mmio_read_u32(dev.base + 0x70);
        if status != STATUS_UP {
            return Err(UpError::Status(status));
        }
        let mac = raw.mac_address();
        let link = status_offered.then(|| {
            // The config space status field (offset 6) bit 0: link up.
            hw::mmio_read_u32(dev.base + 0x104) >> 16 & 1 != 0
        });
        let (Some(rx_bufs), Some(tx_bufs)) = (buffers(), buffers()) else {
            return Err(UpError::NoMemory);
        };
        let mut free = [0u8; QSIZE];
        for (i, f) in free.iter_mut().enumerate() {
            *f = i as u8;
        }
        let base = dev.base;
        let mut dev = NetDev {
            base,
            tx: Tx {
                base,
                raw,
                bufs: tx_bufs,
                len: [0; QSIZE],
                free,
                nfree: QSIZE,
                of_token: [0; QSIZE],
                counters: Counters::default(),
            },
            rx: Rx {
                bufs: rx_bufs,
                of_token: [0; QSIZE],
                repost: None,
            },
            mac,
            link,
        };
        for i in 0..QSIZE {
            dev.post_rx(i).map_err(UpError::Driver)?;
        }
        transport::flush_rx(base);
        Ok(dev)
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The link status bit, if the device offers VIRTIO_NET_F_STATUS.
    pub fn link(&self) -> Option<bool> {
        self.link
    }

    pub fn counters(&self) -> Counters {
        self.tx.counters
    }

    fn post_rx(&mut self, i: usize) -> Result<(), virtio_drivers::Error> {
        // SAFETY: buffer `i` is not in the queue and is not touched again
        // until its token comes back in the used ring (`poll_rx`).
        let token = unsafe { self.tx.raw.receive_begin(&mut self.rx.bufs[i]) }?;
        self.rx.of_token[usize::from(token) % QSIZE] = i as u8;
        Ok(())
    }

    /// Posts again the buffer handed out by the last `poll_rx`.
    fn repost(&mut self) {
        if let Some(i) = self.rx.repost.take()
            && self.post_rx(i).is_err()
        {
            self.tx.counters.device_errors += 1;
        }
        if transport::rx_batch_full() {
            transport::flush_rx(self.base);
        }
    }

    /// The next received frame as (buffer, offset, length), if any; the
    /// buffer is posted again on the next call.
    fn poll_rx(&mut self) -> Option<(usize, usize, usize)> {
        self.repost();
        loop {
            let Some(token) = self.tx.raw.poll_receive() else {
                // Drained: now kick for the buffers reposted meanwhile.
                transport::flush_rx(self.base);
                return None;
            };
            let Some(&i) = self.rx.of_token.get(usize::from(token)) else {
                // An id the driver never posted: virtio-drivers refuses to
                // pop it, so the queue is stuck; count it and give up.
                self.tx.counters.device_errors += 1;
                return None;
            };
            let i = usize::from(i);
            // SAFETY: buffer `i` was posted with this token and is passed
            // back unchanged.
            let done = unsafe { self.tx.raw.receive_complete(token, &mut self.rx.bufs[i]) };
            match done {
                Ok((hdr, len)) if hdr + len <= BUF => {
                    self.tx.counters.rx_frames += 1;
                    self.tx.counters.rx_bytes += len as u64;
                    self.rx.repost = Some(i);
                    return Some((i, hdr, len));
                }
                _ => {
                    self.tx.counters.device_errors += 1;
                    if self.post_rx(i).is_err() {
                        self.tx.counters.device_errors += 1;
                        return None;
                    }
                }
            }
        }
    }

    /// Calls `f` with the next received frame, if any.
    pub fn recv_with<R>(&mut self, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        let (i, off, len) = self.poll_rx()?;
        Some(f(&self.rx.bufs[i][off..off + len]))
    }

    /// Kicks the transmit queue for frames queued since the last kick.
    pub fn flush_tx(&mut self) {
        transport::flush_tx(self.base);
    }

    /// Sends one frame of `len` bytes built by `f`, waiting at most 1 s for
    /// a free transmit buffer. False if none came free (frame dropped).
    pub fn send_with(&mut self, len: usize, f: impl FnOnce(&mut [u8])) -> bool {
        let t0 = hw::rdtsc();
        let limit = crate::clock::ticks_ms(1000);
        while !self.tx.has_free() {
            if hw::rdtsc().wrapping_sub(t0) > limit {
                self.tx.counters.tx_dropped += 1;
                return false;
            }
            core::hint::spin_loop();
        }
        self.tx.send(len, f).0
    }
}

/// Zeroed frame buffers in the pool (too big to build on the stack).
fn buffers() -> Option<&'static mut Buffers> {
    let ptr = pool::alloc(size_of::<Buffers>(), 64)?.cast::<Buffers>();
    // SAFETY: the pool returned `size_of::<Buffers>()` zeroed bytes, never
    // freed nor handed out again; all-zero bytes are valid `u8` arrays.
    Some(unsafe { &mut *ptr.as_ptr() })
}

impl Tx {
    /// Takes back transmit buffers the device is done with.
    fn reclaim(&mut self) {
        while let Some(token) = self.raw.poll_transmit() {
            let Some(&i) = self.of_token.get(usize::from(token)) else {
                self.counters.device_errors += 1;
                return;
            };
            let i = usize::from(i);
            let len = usize::from(self.len[i]);
            // SAFETY: buffer `i` was submitted with this token and length.
            let done = unsafe { self.raw.transmit_complete(token, &self.bufs[i][..len]) };
            if done.is_err() {
                self.counters.device_errors += 1;
                return;
            }
            self.free[self.nfree] = i as u8;
            self.nfree += 1;
        }
    }

    fn has_free(&mut self) -> bool {
        if self.nfree == 0 {
            // The device may not have been told about the frames yet.
            transport::flush_tx(self.base);
            self.reclaim();
        }
        self.nfree > 0
    }

    /// Sends a frame of `len` bytes built by `f` (`len` clamped to
    /// `MAX_FRAME`); false if no buffer was free (the frame is built in a
    /// scratch buffer and dropped).
    fn send<R>(&mut self, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> (bool, R) {
        let len = len.min(MAX_FRAME);
        let hdr = if self.has_free() {
            self.raw
                .fill_buffer_header(&mut self.bufs[usize::from(self.free[self.nfree - 1])])
        } else {
            Err(virtio_drivers::Error::QueueFull)
        };
        let Ok(hdr) = hdr else {
            self.counters.tx_dropped += 1;
            let mut scratch = [0u8; MAX_FRAME];
            return (false, f(&mut scratch[..len]));
        };
        self.nfree -= 1;
        let i = usize::from(self.free[self.nfree]);
        let out = f(&mut self.bufs[i][hdr..hdr + len]);
        self.len[i] = (hdr + len) as u16;
        // SAFETY: buffer `i` is off the free list and is not touched again
        // until its token comes back in the used ring (`reclaim`).
        match unsafe { self.raw.transmit_begin(&self.bufs[i][..hdr + len]) } {
            Ok(token) => {
                self.of_token[usize::from(token) % QSIZE] = i as u8;
                self.counters.tx_frames += 1;
                self.counters.tx_bytes += len as u64;
                (true, out)
            }
            Err(_) => {
                self.counters.device_errors += 1;
                self.free[self.nfree] = i as u8;
                self.nfree += 1;
                (false, out)
            }
        }
    }
}

/// smoltcp's receive token: a received frame.
pub struct RxToken<'a>(&'a [u8]);
/// smoltcp's transmit token.
pub struct TxToken<'a>(&'a mut Tx);

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        self.0.send(len, f).1
    }
}

impl phy::Device for NetDev {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(
        &mut self,
        _timestamp: time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let (i, off, len) = self.poll_rx()?;
        Some((
            RxToken(&self.rx.bufs[i][off..off + len]),
            TxToken(&mut self.tx),
        ))
    }

    fn transmit(&mut self, _timestamp: time::Instant) -> Option<Self::TxToken<'_>> {
        self.repost();
        self.tx.has_free().then_some(TxToken(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        caps.max_burst_size = Some(QSIZE / 2);
        caps
    }
}
