//! Address buses for port I/O and MMIO exits.
//!
//! A bus maps address ranges to devices. An access that hits no device is
//! not an error for the guest: reads return all ones (as on real hardware,
//! where nothing drives the lines) and writes are dropped; both are
//! counted so that a misbehaving guest or a missing device shows up.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A device that answers reads and writes at offsets within its range.
pub trait BusDevice: Send {
    /// Fills `data` with the bytes at `offset` from the device's base.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Takes the bytes of a guest write at `offset` from the device's base.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the vCPU threads that may access it.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange { base: u64, len: u64 },
    #[error("range {base:#x}+{len:#x} overlaps a device already on the bus")]
    Overlap { base: u64, len: u64 },
}

struct Entry {
    len: u64,
    device: SharedDevice,
}

/// Counters of accesses that hit no device.
#[derive(Debug, Default)]
pub struct UnmappedCounters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
}

/// An address space of non-overlapping device ranges.
#[derive(Default)]
pub struct Bus {
    name: &'static str,
    devices: BTreeMap<u64, Entry>,
    unmapped: UnmappedCounters,
}

impl Bus {
    /// An empty bus; `name` appears in log lines ("pio", "mmio").
    pub fn new(name: &'static str) -> Self {
        Bus {
            name,
            ..Default::default()
        }
    }

    /// Puts `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        let overlaps_prev = self
            .devices
            .range(..end)
            .next_back()
            .is_some_and(|(b, e)| b + e.len > base);
        if overlaps_prev {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(base, Entry { len, device });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let (base, entry) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        // The whole access must fall inside the device's range.
        (offset.checked_add(size as u64)? <= entry.len).then_some((offset, &entry.device))
    }

    /// Reads from the device at `addr`; returns whether one answered.
    /// Unanswered reads fill `data` with 0xff.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        if let Some((offset, dev)) = self.find(addr, data.len()) {
            lock(dev).read(offset, data);
            return true;
        }
        data.fill(0xff);
        let n = self.unmapped.reads.fetch_add(1, Ordering::Relaxed);
        if n < 16 {
            tracing::debug!(
                bus = self.name,
                addr = format_args!("{addr:#x}"),
                len = data.len(),
                "read from nothing"
            );
        }
        false
    }

    /// Writes to the device at `addr`; returns whether one took it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        if let Some((offset, dev)) = self.find(addr, data.len()) {
            lock(dev).write(offset, data);
            return true;
        }
        let n = self.unmapped.writes.fetch_add(1, Ordering::Relaxed);
        if n < 16 {
            tracing::debug!(
                bus = self.name,
                addr = format_args!("{addr:#x}"),
                len = data.len(),
                "write to nothing"
            );
        }
        false
    }

    /// Accesses so far that hit no device: (reads, writes).
    pub fn unmapped(&self) -> (u64, u64) {
        (
            self.unmapped.reads.load(Ordering::Relaxed),
            self.unmapped.writes.load(Ordering::Relaxed),
        )
    }
}

/// Locks a device, carrying on if another vCPU thread panicked while
/// holding it: device state is plain data, and one vCPU's failure must not
/// take the others down with it.
pub fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Scratch {
        bytes: [u8; 8],
    }

    impl BusDevice for Scratch {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            let o = offset as usize;
            data.copy_from_slice(&self.bytes[o..o + data.len()]);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            let o = offset as usize;
            self.bytes[o..o + data.len()].copy_from_slice(data);
        }
    }

    fn scratch() -> SharedDevice {
        Arc::new(Mutex::new(Scratch::default()))
    }

    #[test]
    fn routes_by_offset_and_reads_back() {
        let mut bus = Bus::new("test");
        bus.insert(scratch(), 0x100, 8).unwrap();
        assert!(bus.write(0x102, &[1, 2]));
        let mut buf = [0u8; 4];
        assert!(bus.read(0x100, &mut buf));
        assert_eq!(buf, [0, 0, 1, 2]);
    }

    #[test]
    fn nothing_there_reads_all_ones_and_is_counted() {
        let mut bus = Bus::new("test");
        bus.insert(scratch(), 0x100, 8).unwrap();
        let mut buf = [0u8; 4];
        assert!(!bus.read(0x50, &mut buf));
        assert_eq!(buf, [0xff; 4]);
        // Straddling the end of a device is not an access to it.
        assert!(!bus.read(0x106, &mut buf));
        assert!(!bus.write(0x200, &[1]));
        assert_eq!(bus.unmapped(), (2, 1));
    }

    #[test]
    fn refuses_overlaps_and_empty_ranges() {
        let mut bus = Bus::new("test");
        bus.insert(scratch(), 0x100, 0x10).unwrap();
        assert_eq!(
            bus.insert(scratch(), 0x108, 0x10),
            Err(BusError::Overlap {
                base: 0x108,
                len: 0x10
            })
        );
        assert_eq!(
            bus.insert(scratch(), 0xf8, 0x10),
            Err(BusError::Overlap {
                base: 0xf8,
                len: 0x10
            })
        );
        assert_eq!(
            bus.insert(scratch(), 0x0, 0),
            Err(BusError::BadRange { base: 0, len: 0 })
        );
        assert!(bus.insert(scratch(), u64::MAX, 2).is_err());
        bus.insert(scratch(), 0x110, 0x10).unwrap();
    }
}
