//! The local APIC (xAPIC at 0xFEE00000, identity mapped and so reachable
//! from CPL3) and its timer, for sleeping: the `tick` step and the pauses
//! of `dirty`.
//!
//! Sleeping: [`wait`] arms the timer (periodic mode, vector 32) for the
//! time left and calls [`boot::sleep`], a `hlt` at CPL3 whose #GP handler
//! does `sti; hlt` at CPL0 and returns after the interrupt (the handler of
//! vector 32 is EOI and `iretq`). After every wake-up the TSC decides
//! whether the wait is over; if not, the timer is armed again for what is
//! left. So a lost or early interrupt costs one more nap (periodic mode
//! fires again a period later), a late one delays by its lateness, and a
//! TSC that jumps (a restored or migrated VM) ends the wait at once
//! instead of sleeping for the jump.
//!
//! The timer runs at an unknown rate (KVM: 1 GHz before the divider), so
//! it is calibrated once against the TSC (20 ms). Without a working timer
//! (the count does not move) waits spin on the TSC instead.

use crate::boot::{self, SPURIOUS_VECTOR, TIMER_VECTOR};
use crate::{clock, hw};
use core::sync::atomic::{AtomicU64, Ordering};

const LAPIC: u64 = 0xfee0_0000;
/// Register offsets (xAPIC).
const TPR: u64 = 0x80;
const SVR: u64 = 0xf0;
const LVT_TIMER: u64 = 0x320;
const LVT_LINT0: u64 = 0x350;
const TIMER_INITIAL: u64 = 0x380;
const TIMER_CURRENT: u64 = 0x390;
const TIMER_DIVIDE: u64 = 0x3e0;
/// SVR bit 8: APIC software enable.
const SVR_ENABLE: u32 = 1 << 8;
const LVT_MASKED: u32 = 1 << 16;
const LVT_PERIODIC: u32 = 1 << 17;
/// Divide configuration 0b0011: by 16 (KVM: 62.5 MHz, 68 s in 32 bits).
const DIVIDE_BY_16: u32 = 0x3;

/// Longest single nap (a wait longer than this wakes up in between).
const MAX_NAP_MS: u64 = 1000;
/// Below this much time left, spin on the TSC instead of sleeping (KVM
/// stretches periodic timers to at least 200 µs anyway).
const SPIN_US: u64 = 50;

/// Timer counts per second (divided by 16); 0: not calibrated yet;
/// `NO_TIMER`: the timer does not count.
static TIMER_HZ: AtomicU64 = AtomicU64::new(0);
const NO_TIMER: u64 = u64::MAX;

fn read(reg: u64) -> u32 {
    hw::mmio_read_u32(LAPIC + reg)
}

fn write(reg: u64, value: u32) {
    hw::mmio_write_u32(LAPIC + reg, value);
}

/// Software-enables this vCPU's local APIC with the probe's spurious
/// vector (33, whose handler is a bare `iretq`).
pub fn enable() {
    let svr = read(SVR);
    write(SVR, (svr & !0xff) | SVR_ENABLE | SPURIOUS_VECTOR);
}

/// Prepares this vCPU to take timer interrupts and nothing else: masks
/// both 8259 PICs (uninitialised, a KVM PIC delivers IRQ 0 of the PIT, used
/// for calibration, at vector 0) and LINT0 (their ExtINT input), enables
/// the APIC, accepts all priorities (TPR 0), masks the timer.
fn init() {
    hw::outb(0x21, 0xff);
    hw::outb(0xa1, 0xff);
    write(LVT_LINT0, read(LVT_LINT0) | LVT_MASKED);
    enable();
    write(TPR, 0);
    write(TIMER_DIVIDE, DIVIDE_BY_16);
    write(LVT_TIMER, LVT_MASKED | TIMER_VECTOR);
    write(TIMER_INITIAL, 0);
}

/// The timer's rate in counts per second, calibrating it (and setting the
/// APIC up) on first use; `None` if it does not count. Once calibrated
/// the timer is left periodic and unmasked but stopped (initial count 0),
/// so that arming it is one register write: each APIC access from CPL3 is
/// a VM exit (about 40 µs on PVM).
fn timer_hz() -> Option<u64> {
    let mut hz = TIMER_HZ.load(Ordering::Relaxed);
    if hz == 0 {
        init();
        hz = calibrate().unwrap_or(NO_TIMER);
        if hz != NO_TIMER {
            write(LVT_TIMER, LVT_PERIODIC | TIMER_VECTOR);
        }
        TIMER_HZ.store(hz, Ordering::Relaxed);
    }
    (hz != NO_TIMER).then_some(hz)
}

/// Counts per second of the (masked) timer over 20 ms of TSC, each end a
/// timer read bracketed by two TSC reads (such a read is a VM exit, 40 µs
/// on PVM, but about the same each time, so the two ends' errors mostly
/// cancel: five runs here agreed within 0.04%); retried when a bracket is
/// wider than 2.5% of the span (the vCPU was preempted there).
fn calibrate() -> Option<u64> {
    let tsc_khz = clock::tsc_khz_or_assumed();
    let stamp = || {
        let before = hw::rdtsc();
        let count = read(TIMER_CURRENT);
        let after = hw::rdtsc();
        (before, after, count)
    };
    let span = clock::ticks_ms(20);
    let mut result = None;
    for _ in 0..5 {
        write(TIMER_INITIAL, u32::MAX);
        let (b0, a0, c0) = stamp();
        while hw::rdtsc().wrapping_sub(a0) < span {
            core::hint::spin_loop();
        }
        let (b1, a1, c1) = stamp();
        write(TIMER_INITIAL, 0);
        let ticks = (b1 / 2 + a1 / 2).wrapping_sub(b0 / 2 + a0 / 2);
        let slack = (a0 - b0) + (a1 - b1);
        let counts = u64::from(c0.wrapping_sub(c1));
        if counts == 0 || c1 > c0 {
            return None; // not counting down: no timer
        }
        if ticks == 0 || slack > ticks / 40 {
            continue;
        }
        let hz = (u128::from(counts) * u128::from(tsc_khz) * 1000 / u128::from(ticks)) as u64;
        if (1_000_000..100_000_000_000).contains(&hz) {
            result = Some(hz);
            break;
        }
    }
    result
}

/// Stops the timer (an interrupt already pending stays pending and at
/// worst wakes the next sleep early), so that an idle vCPU is not woken.
fn stop() {
    write(TIMER_INITIAL, 0);
}

/// Waits until `ticks` TSC ticks have passed since `start` (a TSC value),
/// sleeping in between. A TSC that went backwards or jumped ahead counts
/// as the wait being over.
pub fn wait(start: u64, ticks: u64) {
    let hz = timer_hz();
    let tsc_khz = clock::tsc_khz_or_assumed();
    let spin = clock::ticks_ms(1) * SPIN_US / 1000;
    let max_nap = clock::ticks_ms(MAX_NAP_MS);
    let mut armed = false;
    loop {
        let elapsed = hw::rdtsc().wrapping_sub(start);
        if elapsed >= ticks {
            break;
        }
        let left = ticks - elapsed;
        let Some(hz) = hz.filter(|_| left > spin) else {
            while hw::rdtsc().wrapping_sub(start) < ticks {
                core::hint::spin_loop();
            }
            break;
        };
        // Aim a little late (1/512 and 20 µs), so that a slightly fast
        // timer does not wake us just before the end and cost a second
        // nap; the caller measures from the deadline, not from the wake.
        let nap = left.min(max_nap);
        let nap = nap + nap / 512 + tsc_khz / 50;
        let counts = u128::from(nap) * u128::from(hz) / (u128::from(tsc_khz) * 1000);
        let counts = counts.clamp(1, u128::from(u32::MAX)) as u32;
        write(TIMER_INITIAL, counts);
        armed = true;
        boot::sleep();
    }
    if armed {
        stop();
    }
}
