//! Time for the network steps: the TSC, converted with the calibrated
//! frequency (3 GHz assumed when unknown, as the other timeouts do).

use crate::{clock, hw};
use smoltcp::time::Instant;

/// Nanoseconds in `cycles` TSC ticks.
pub fn ns(cycles: u64) -> u64 {
    clock::cycles_to_ns(cycles).unwrap_or(cycles / 3)
}

/// smoltcp's clock: microseconds of TSC since it was reset.
pub fn now() -> Instant {
    Instant::from_micros((ns(hw::rdtsc()) / 1000) as i64)
}

/// A point in time some milliseconds from when it was made.
#[derive(Clone, Copy)]
pub struct Deadline {
    start: u64,
    ticks: u64,
}

impl Deadline {
    pub fn after_ms(ms: u64) -> Self {
        Deadline {
            start: hw::rdtsc(),
            ticks: clock::ticks_ms(ms),
        }
    }

    pub fn expired(&self) -> bool {
        hw::rdtsc().wrapping_sub(self.start) >= self.ticks
    }

    /// Nanoseconds since the deadline was made.
    pub fn elapsed_ns(&self) -> u64 {
        ns(hw::rdtsc().wrapping_sub(self.start))
    }
}

/// Mbit/s of `bytes` in `ns` nanoseconds, shown with one decimal.
pub struct Mbps(pub u64, pub u64);

impl core::fmt::Display for Mbps {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // bits * 1000 / ns = Mbit/s; times 10 for the decimal.
        let tenths = (u128::from(self.0) * 8 * 10_000)
            .checked_div(u128::from(self.1))
            .unwrap_or(0);
        write!(f, "{}.{}", tenths / 10, tenths % 10)
    }
}

/// Events per second of `n` events in `ns` nanoseconds.
pub fn per_sec(n: u64, ns: u64) -> u64 {
    (u128::from(n) * 1_000_000_000)
        .checked_div(u128::from(ns))
        .unwrap_or(0) as u64
}
