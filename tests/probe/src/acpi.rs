//! Just enough ACPI: find the RSDP and a table, count enabled CPUs in the
//! MADT, and power off through the FADT's sleep control register.

use crate::hw::{self, read_u8, read_u16, read_u32, read_u64};
use core::sync::atomic::{AtomicU64, Ordering};

/// The RSDP address the VMM gave at boot (0 if none).
static RSDP_HINT: AtomicU64 = AtomicU64::new(0);

/// Remembers the RSDP address from the boot protocol.
pub fn set_rsdp_hint(addr: u64) {
    RSDP_HINT.store(addr, Ordering::Relaxed);
}

fn checksum_ok(addr: u64, len: u64) -> bool {
    (0..len).fold(0u8, |s, i| s.wrapping_add(read_u8(addr + i))) == 0
}

pub fn find_sig(start: u64, end: u64, sig: &[u8], len: u64) -> Option<u64> {
    (start..end).step_by(16).find(|&a| {
        sig.iter()
            .enumerate()
            .all(|(i, &b)| read_u8(a + i as u64) == b)
            && checksum_ok(a, len)
    })
}

/// The EBDA, as given by the BIOS data area word at 0x40e (if plausible).
pub fn ebda() -> Option<u64> {
    let ebda = u64::from(read_u16(0x40e)) << 4;
    (0x8_0000..0xa_0000).contains(&ebda).then_some(ebda)
}

/// The RSDP: the VMM's hint if valid, else searched in the EBDA and
/// 0xE0000..0xFFFFF.
fn rsdp() -> Option<u64> {
    Some(RSDP_HINT.load(Ordering::Relaxed))
        .filter(|&a| hw::mapped(a, 36) && read_u64(a) == u64::from_le_bytes(*b"RSD PTR "))
        .or_else(|| ebda().and_then(|e| find_sig(e, e + 1024, b"RSD PTR ", 20)))
        .or_else(|| find_sig(0xe_0000, 0x10_0000, b"RSD PTR ", 20))
}

/// The first table with signature `sig` listed in the XSDT (or RSDT).
fn find_table(sig: &[u8; 4]) -> Option<u64> {
    let rsdp = rsdp()?;
    let (root, width) = match read_u64(rsdp + 24) {
        x if read_u8(rsdp + 15) >= 2 && x != 0 => (x, 8),
        _ => (u64::from(read_u32(rsdp + 16)), 4),
    };
    if !hw::mapped(root, 36) {
        return None;
    }
    let root_len = u64::from(read_u32(root + 4)).min(4096);
    (36..root_len)
        .step_by(width)
        .map(|off| {
            if width == 8 {
                read_u64(root + off)
            } else {
                u64::from(read_u32(root + off))
            }
        })
        .find(|&t| hw::mapped(t, 36) && read_u32(t) == u32::from_le_bytes(*sig))
}

/// Enabled local APICs in the ACPI MADT, if there is one.
pub fn madt_cpu_count() -> Option<u32> {
    let madt = find_table(b"APIC")?;
    let len = u64::from(read_u32(madt + 4)).min(64 * 1024);
    let mut at = madt + 44;
    let mut cpus = 0;
    while at + 2 <= madt + len {
        let (kind, elen) = (read_u8(at), u64::from(read_u8(at + 1)));
        if elen < 2 {
            break;
        }
        let flags = match kind {
            0 => read_u32(at + 4),
            9 => read_u32(at + 8),
            _ => 0,
        };
        if flags & 1 != 0 {
            cpus += 1;
        }
        at += elen;
    }
    (cpus > 0).then_some(cpus)
}

/// The ACPI PM timer's I/O port, from the FADT (X_PM_TMR_BLK, else
/// PM_TMR_BLK).
pub fn pm_timer_port() -> Option<u16> {
    let fadt = find_table(b"FACP")?;
    let len = read_u32(fadt + 4);
    let port = match (len >= 220, read_u8(fadt + 208), read_u64(fadt + 212)) {
        (true, 1, x) if x != 0 => x,
        _ => u64::from(read_u32(fadt + 76)),
    };
    u16::try_from(port).ok().filter(|&p| p != 0)
}

/// Requests S5 (power off) through the FADT's sleep control register (the
/// hardware-reduced ACPI way: Cloud Hypervisor, QEMU microvm). Returns if
/// there is no such register (or the write did nothing).
pub fn power_off() {
    let Some(fadt) = find_table(b"FACP") else {
        return;
    };
    if read_u32(fadt + 4) < 256 {
        return;
    }
    let (space, addr) = (read_u8(fadt + 244), read_u64(fadt + 248));
    let value = (s5_sleep_type(fadt) << 2) | (1 << 5); // SLP_TYPx | SLP_EN
    match space {
        0 if addr != 0 && hw::mapped(addr, 1) => hw::mmio_write_u8(addr, value),
        1 if addr != 0 && addr <= 0xffff => hw::outb(addr as u16, value),
        _ => {}
    }
}

/// SLP_TYPa of `\_S5` from the DSDT (5, as Cloud Hypervisor and QEMU use,
/// if it cannot be found).
fn s5_sleep_type(fadt: u64) -> u8 {
    const DEFAULT: u8 = 5;
    let dsdt = match read_u64(fadt + 140) {
        0 => u64::from(read_u32(fadt + 40)),
        x => x,
    };
    if !hw::mapped(dsdt, 36) {
        return DEFAULT;
    }
    let len = u64::from(read_u32(dsdt + 4)).min(1 << 20);
    // `_S5_` PackageOp PkgLength NumElements <SLP_TYPa>
    let Some(at) =
        (36..len.saturating_sub(8)).find(|&o| read_u32(dsdt + o) == u32::from_le_bytes(*b"_S5_"))
    else {
        return DEFAULT;
    };
    let p = dsdt + at + 4;
    if read_u8(p) != 0x12 {
        return DEFAULT;
    }
    match read_u8(p + 3) {
        0x0a => read_u8(p + 4) & 7, // BytePrefix
        0x00 => 0,                  // Zero
        0x01 => 1,                  // One
        _ => DEFAULT,
    }
}
