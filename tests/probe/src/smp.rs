//! Starting the other vCPUs: count them (MP table, else ACPI MADT), copy the
//! real-mode trampoline below 1 MiB, send INIT / SIPI / SIPI to "all
//! excluding self" through the xAPIC, and wait (bounded) for check-ins.

use crate::acpi::{self, ebda, find_sig};
use crate::boot::{self, MAX_CPUS, TRAMPOLINE, TRAMPOLINE_LEN, TRAMPOLINE_TEMPLATE};
use crate::clock;
use crate::hw::{self, read_u8, read_u16, read_u32};
use crate::serial;
use core::sync::atomic::{AtomicU32, Ordering};

const LAPIC: u64 = 0xfee0_0000;
const LAPIC_ID: u64 = LAPIC + 0x20;
const LAPIC_ICR_LO: u64 = LAPIC + 0x300;
const LAPIC_ICR_HI: u64 = LAPIC + 0x310;
const ICR_PENDING: u32 = 1 << 12;
/// INIT, level assert, shorthand "all excluding self".
const ICR_INIT_ALL: u32 = 0x000c_4500;
/// Start-up, shorthand "all excluding self" (vector added).
const ICR_SIPI_ALL: u32 = 0x000c_4600;
/// How long vCPU 0 waits for the others.
const WAIT_MS: u64 = 2000;

/// APs that have printed their ready line.
static ONLINE: AtomicU32 = AtomicU32::new(0);

/// Runs the `smp` step; `want` is the `smp:N` override.
pub fn start_all(want: Option<u32>) {
    let found = mp_cpu_count().or_else(acpi::madt_cpu_count);
    let expected = want.or(found).map(|n| n.clamp(1, MAX_CPUS as u32));
    if expected != Some(1) {
        boot::reset_ap_slots();
        ONLINE.store(0, Ordering::SeqCst);
        copy_trampoline();
        send_init_sipi();
        let target = expected.unwrap_or(MAX_CPUS as u32) - 1;
        let t0 = hw::rdtsc();
        let limit = clock::ticks_ms(WAIT_MS);
        while ONLINE.load(Ordering::Acquire) < target && hw::rdtsc().wrapping_sub(t0) < limit {
            core::hint::spin_loop();
        }
    }
    let online = ONLINE.load(Ordering::Acquire) + 1;
    serial::line(format_args!(
        r#"{{"probe":"smp","online":{},"expected":{}}}"#,
        online,
        expected.unwrap_or(0)
    ));
}

/// Rust entry of an AP at CPL3 (`index` is its slot for stacks and TSS).
pub extern "C" fn ap_main(_index: u64) -> ! {
    serial::line(format_args!(r#"{{"probe":"ready","vcpu":{}}}"#, apic_id()));
    ONLINE.fetch_add(1, Ordering::Release);
    boot::halt()
}

/// This vCPU's local APIC id, from the xAPIC ID register. (Not CPUID: on a
/// PVM host CPUID at CPL3 is not intercepted and reports the host's CPU.)
pub fn apic_id() -> u32 {
    hw::mmio_read_u32(LAPIC_ID) >> 24
}

fn copy_trampoline() {
    // SAFETY: the template is TRAMPOLINE_LEN bytes of the `.boot` section;
    // the destination page below 1 MiB holds no Rust object, and the boot
    // parameters and command line were copied out before any step ran.
    unsafe {
        core::ptr::copy_nonoverlapping(
            TRAMPOLINE_TEMPLATE as *const u8,
            TRAMPOLINE as *mut u8,
            TRAMPOLINE_LEN,
        );
    }
}

fn send_init_sipi() {
    crate::lapic::enable();
    send_ipi(ICR_INIT_ALL);
    clock::delay_us(10_000);
    let sipi = ICR_SIPI_ALL | (TRAMPOLINE >> 12) as u32;
    send_ipi(sipi);
    clock::delay_us(200);
    send_ipi(sipi);
}

fn send_ipi(icr: u32) {
    hw::mmio_write_u32(LAPIC_ICR_HI, 0);
    hw::mmio_write_u32(LAPIC_ICR_LO, icr);
    for _ in 0..1000 {
        if hw::mmio_read_u32(LAPIC_ICR_LO) & ICR_PENDING == 0 {
            break;
        }
    }
}

/// Enabled processors in the MP table, if there is one.
fn mp_cpu_count() -> Option<u32> {
    let fp = ebda()
        .and_then(|e| find_sig(e, e + 1024, b"_MP_", 16))
        .or_else(|| find_sig(0x9_fc00, 0xa_0000, b"_MP_", 16))
        .or_else(|| find_sig(0xf_0000, 0x10_0000, b"_MP_", 16))?;
    let table = u64::from(read_u32(fp + 4));
    if table == 0 || read_u32(table) != u32::from_le_bytes(*b"PCMP") {
        return None;
    }
    let len = u64::from(read_u16(table + 4));
    let entries = read_u16(table + 0x22);
    let mut at = table + 0x2c;
    let mut cpus = 0;
    for _ in 0..entries {
        if at >= table + len {
            break;
        }
        if read_u8(at) == 0 {
            if read_u8(at + 3) & 1 != 0 {
                cpus += 1;
            }
            at += 20;
        } else {
            at += 8;
        }
    }
    (cpus > 0).then_some(cpus)
}
