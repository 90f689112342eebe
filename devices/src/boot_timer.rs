//! The boot-complete marker: a guest writes the byte 123 at the start of
//! this device (guest-physical 0xC000_0000) when it considers itself
//! booted, and the VMM logs the time since its own process started. The
//! address and value are those of Firecracker's `--boot-timer`, so both
//! VMMs time the same guest event.

use crate::bus::BusDevice;
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const BOOT_TIMER_ADDR: u64 = 0xC000_0000;
pub const BOOT_TIMER_LEN: u64 = 0x1000;
/// The value that marks boot completion.
pub const MAGIC_BOOT_COMPLETE: u8 = 123;

/// Records when the guest wrote the marker, first time only.
pub struct BootTimer {
    start: Instant,
    booted: Arc<OnceLock<Duration>>,
}

impl BootTimer {
    /// `start` is the instant the VMM process started.
    pub fn new(start: Instant) -> Self {
        BootTimer {
            start,
            booted: Arc::new(OnceLock::new()),
        }
    }

    /// A handle that yields the boot time once the guest reported it.
    pub fn boot_time(&self) -> Arc<OnceLock<Duration>> {
        self.booted.clone()
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.first() == Some(&MAGIC_BOOT_COMPLETE) {
            let elapsed = self.start.elapsed();
            if self.booted.set(elapsed).is_ok() {
                tracing::info!(
                    "guest boot complete {} us after the VMM started",
                    elapsed.as_micros()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_the_first_marker_only() {
        let mut t = BootTimer::new(Instant::now());
        let got = t.boot_time();
        t.write(0, &[7]);
        assert!(got.get().is_none());
        t.write(0, &[MAGIC_BOOT_COMPLETE]);
        let first = *got.get().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        t.write(0, &[MAGIC_BOOT_COMPLETE]);
        assert_eq!(*got.get().unwrap(), first);
    }
}
