//! Virtio-mmio devices announced on the kernel command line, as Linux reads
//! them: `virtio_mmio.device=<size>@<base>:<irq>[:<id>]`, sizes and bases
//! with an optional `0x` and a K/M/G suffix (Linux's `memparse`), possibly
//! several entries.

use crate::hw;

const MAGIC: u32 = 0x7472_6976; // "virt"
/// Virtio device id of a network card.
pub const DEVICE_NET: u32 = 1;

/// Register offsets and bits of virtio-mmio version 2 (virtio 1.2, 4.2.2),
/// for the drivers the probe writes itself.
pub mod reg {
    pub const VERSION: u64 = 0x04;
    pub const DEVICE_FEATURES: u64 = 0x10;
    pub const DEVICE_FEATURES_SEL: u64 = 0x14;
    pub const DRIVER_FEATURES: u64 = 0x20;
    pub const DRIVER_FEATURES_SEL: u64 = 0x24;
    pub const QUEUE_SEL: u64 = 0x30;
    pub const QUEUE_NUM_MAX: u64 = 0x34;
    pub const QUEUE_NUM: u64 = 0x38;
    pub const QUEUE_READY: u64 = 0x44;
    pub const QUEUE_NOTIFY: u64 = 0x50;
    pub const INTERRUPT_STATUS: u64 = 0x60;
    pub const STATUS: u64 = 0x70;
    pub const QUEUE_DESC: u64 = 0x80;
    pub const QUEUE_DRIVER: u64 = 0x90;
    pub const QUEUE_DEVICE: u64 = 0xa0;
    pub const CONFIG: u64 = 0x100;

    /// Status bits.
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
    /// VIRTIO_F_VERSION_1 is feature bit 32: bit 0 of feature word 1.
    pub const VERSION_1_WORD1: u32 = 1;
    /// InterruptStatus bit: the configuration changed (or the device failed).
    pub const INT_CONFIG: u32 = 2;
}

/// One announced device.
#[derive(Clone, Copy)]
pub struct MmioDevice {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

impl MmioDevice {
    /// The device id register (0 if there is no virtio-mmio header there).
    pub fn device_id(&self) -> u32 {
        if !hw::mapped(self.base, 0x100) || hw::mmio_read_u32(self.base) != MAGIC {
            return 0;
        }
        hw::mmio_read_u32(self.base + 8)
    }

    /// Device feature bits 0..31 (before the driver touches the device).
    pub fn features_lo(&self) -> u32 {
        hw::mmio_write_u32(self.base + 0x14, 0);
        hw::mmio_read_u32(self.base + 0x10)
    }
}

/// The devices on `cmdline`, in order.
pub fn devices(cmdline: &str) -> impl Iterator<Item = MmioDevice> + '_ {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|w| w.strip_prefix("virtio_mmio.device="))
        .filter_map(parse)
}

/// The `index`-th network device on `cmdline`.
pub fn net_device(cmdline: &str, index: u32) -> Option<MmioDevice> {
    devices(cmdline)
        .filter(|d| d.device_id() == DEVICE_NET)
        .nth(index as usize)
}

fn parse(spec: &str) -> Option<MmioDevice> {
    let (size, rest) = spec.split_once('@')?;
    let mut parts = rest.split(':');
    let base = memparse(parts.next()?)?;
    let irq = parts.next()?.parse().ok()?;
    Some(MmioDevice {
        base,
        size: memparse(size)?,
        irq,
    })
}

/// A number (decimal, or hex after `0x`) with an optional K/M/G suffix.
fn memparse(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let value = match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(hex) => u64::from_str_radix(hex, 16).ok()?,
        None => digits.parse().ok()?,
    };
    value.checked_mul(1 << shift)
}
