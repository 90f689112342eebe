//! TSC frequency: from CPUID (hypervisor leaf 0x40000010, leaves 0x15 and
//! 0x16) or, failing that, calibrated for 20 ms against PIT channel 0
//! (Firecracker, QEMU) or the ACPI PM timer (Cloud Hypervisor).
//!
//! Note that on a PVM host CPUID at CPL3 is not intercepted: it reports the
//! host's leaves, whose TSC frequency is still the guest's.

use crate::hw::{cpuid, inb, outb, rdtsc};
use core::sync::atomic::{AtomicU64, Ordering};

/// 0: not yet known; `UNKNOWN`: no source worked; else kHz.
static TSC_KHZ: AtomicU64 = AtomicU64::new(0);
const UNKNOWN: u64 = u64::MAX;
/// Frequency assumed for timeouts when the real one is unknown.
const ASSUMED_KHZ: u64 = 3_000_000;

/// The TSC frequency in kHz, if some source gave it.
pub fn tsc_khz() -> Option<u64> {
    let mut khz = TSC_KHZ.load(Ordering::Relaxed);
    if khz == 0 {
        khz = probe_khz().unwrap_or(UNKNOWN);
        TSC_KHZ.store(khz, Ordering::Relaxed);
    }
    (khz != UNKNOWN).then_some(khz)
}

/// The TSC frequency in kHz, 3 GHz if no source gave it (as every
/// timeout assumes then).
pub fn tsc_khz_or_assumed() -> u64 {
    tsc_khz().unwrap_or(ASSUMED_KHZ)
}

/// TSC ticks in `ms` milliseconds (assuming 3 GHz if unknown).
pub fn ticks_ms(ms: u64) -> u64 {
    tsc_khz_or_assumed().saturating_mul(ms)
}

/// Spins for about `us` microseconds.
pub fn delay_us(us: u64) {
    let ticks = tsc_khz().unwrap_or(ASSUMED_KHZ).saturating_mul(us) / 1000;
    let t0 = rdtsc();
    while rdtsc().wrapping_sub(t0) < ticks {
        core::hint::spin_loop();
    }
}

/// Nanoseconds in `cycles` TSC ticks, if the frequency is known.
pub fn cycles_to_ns(cycles: u64) -> Option<u64> {
    let khz = tsc_khz()?;
    Some((u128::from(cycles) * 1_000_000 / u128::from(khz)) as u64)
}

fn probe_khz() -> Option<u64> {
    let (hv_max, ..) = cpuid(0x4000_0000, 0);
    if (0x4000_0010..0x4001_0000).contains(&hv_max) {
        let (khz, ..) = cpuid(0x4000_0010, 0);
        if khz != 0 {
            return Some(u64::from(khz));
        }
    }
    let (max, ..) = cpuid(0, 0);
    if max >= 0x15 {
        let (den, num, hz, _) = cpuid(0x15, 0);
        if den != 0 && num != 0 && hz != 0 {
            return Some(u64::from(hz) * u64::from(num) / u64::from(den) / 1000);
        }
    }
    if max >= 0x16 {
        let (mhz, ..) = cpuid(0x16, 0);
        if mhz != 0 {
            return Some(u64::from(mhz) * 1000);
        }
    }
    pit_calibrate().or_else(pm_timer_calibrate)
}

/// Whether `khz` is a plausible TSC frequency (100 MHz .. 20 GHz).
fn plausible(khz: u64) -> bool {
    (100_000..20_000_000).contains(&khz)
}

/// A reading of a slow clock bracketed by two TSC reads.
#[derive(Clone, Copy)]
struct Stamp {
    before: u64,
    after: u64,
}

impl Stamp {
    fn take<T>(read: impl FnOnce() -> T) -> (Self, T) {
        let before = rdtsc();
        let value = read();
        (
            Stamp {
                before,
                after: rdtsc(),
            },
            value,
        )
    }
}

/// TSC kHz from two stamps `ns` nanoseconds apart on the reference clock,
/// if the stamps are tight (their widths under 1% of the interval: a vCPU
/// preempted at an end point gives a loose stamp, so try again). Both
/// stamps must be the same kind of read, so that where the reference was
/// sampled inside them (each port access is a VM exit, 50 µs on PVM) is
/// the same and cancels out.
fn khz_between(start: Stamp, end: Stamp, ns: u64) -> Option<u64> {
    let total = end.before.wrapping_sub(start.after);
    let slack = (start.after - start.before) + (end.after - end.before);
    if ns == 0 || slack > total / 100 {
        return None;
    }
    let mid = |s: Stamp| s.before / 2 + s.after / 2;
    let cycles = mid(end).wrapping_sub(mid(start));
    let khz = (u128::from(cycles) * 1_000_000 / u128::from(ns)) as u64;
    plausible(khz).then_some(khz)
}

/// Tries `f` a few times (a calibration can be spoiled by preemption).
fn retry(f: impl Fn() -> Result<Option<u64>, ()>) -> Option<u64> {
    for _ in 0..5 {
        match f() {
            Ok(Some(khz)) => return Some(khz),
            Ok(None) => {}
            Err(()) => return None,
        }
    }
    None
}

/// TSC kHz from PIT channel 0 counting down for 20 ms, or up to 50 ms
/// while the reads are too slow for 1% (its counter read back with latch
/// commands at both ends, three port accesses each: 100 µs in vmplant on
/// PVM, 160 µs in QEMU; channel 2 needs the speaker port 0x61 for its
/// gate, which QEMU microvm lacks). Interrupts are off, so the channel 0
/// interrupt does not matter. `None` without a working PIT.
fn pit_calibrate() -> Option<u64> {
    const HZ: u64 = 1_193_182;
    const TICKS: u16 = 23_864; // 20 ms
    const MAX_TICKS: u16 = 59_659; // 50 ms (mode 0 from 0xffff: 55 ms)
    let latched = || {
        outb(0x43, 0x00); // latch channel 0
        let lo = inb(0x40);
        u16::from_le_bytes([lo, inb(0x40)])
    };
    retry(|| {
        outb(0x43, 0x30); // channel 0, lobyte/hibyte, mode 0
        outb(0x40, 0xff);
        outb(0x40, 0xff);
        // A PIT is there if its counter moves (absent, it reads constant).
        let c1 = latched();
        if !(0..1000).any(|_| latched() != c1) {
            return Err(());
        }
        // Start and end are both latched reads (the latch, the first of
        // three port accesses, samples the count), so that they match.
        let (start, c0) = Stamp::take(latched);
        let limit = ASSUMED_KHZ * 200; // 200 ms at 3 GHz
        loop {
            let (now, count) = Stamp::take(latched);
            let ticks = c0.wrapping_sub(count);
            let total = now.before.wrapping_sub(start.after);
            let slack = (start.after - start.before) + (now.after - now.before);
            let tight = slack <= total / 100;
            if ticks >= TICKS && (tight || ticks >= MAX_TICKS) {
                return Ok(khz_between(
                    start,
                    now,
                    u64::from(ticks) * 1_000_000_000 / HZ,
                ));
            }
            if now.after.wrapping_sub(start.after) > limit {
                return Err(());
            }
        }
    })
}

/// TSC kHz over 20 ms of the ACPI PM timer (3.579545 MHz, 24 bits); `None`
/// without one.
fn pm_timer_calibrate() -> Option<u64> {
    const HZ: u64 = 3_579_545;
    const TICKS: u32 = 71_591; // 20 ms
    let port = crate::acpi::pm_timer_port()?;
    let read = || crate::hw::inl(port) & 0x00ff_ffff;
    retry(|| {
        let (start, p0) = Stamp::take(read);
        let limit = ASSUMED_KHZ * 200;
        loop {
            let (now, p) = Stamp::take(read);
            let ticks = p.wrapping_sub(p0) & 0x00ff_ffff;
            if ticks >= TICKS {
                return Ok(khz_between(
                    start,
                    now,
                    u64::from(ticks) * 1_000_000_000 / HZ,
                ));
            }
            if now.after.wrapping_sub(start.after) > limit {
                return Err(());
            }
        }
    })
}
