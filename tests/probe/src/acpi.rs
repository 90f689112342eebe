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

/// The tables the XSDT (or RSDT) lists, in order.
fn root_tables() -> impl Iterator<Item = u64> {
    let root = rsdp().and_then(|rsdp| {
        let (root, width) = match read_u64(rsdp + 24) {
            x if read_u8(rsdp + 15) >= 2 && x != 0 => (x, 8),
            _ => (u64::from(read_u32(rsdp + 16)), 4),
        };
        hw::mapped(root, 36).then_some((root, width))
    });
    let (root, width, len) = match root {
        Some((root, width)) => (root, width, u64::from(read_u32(root + 4)).min(4096)),
        None => (0, 8, 0),
    };
    (36..len).step_by(width as usize).map(move |off| {
        if width == 8 {
            read_u64(root + off)
        } else {
            u64::from(read_u32(root + off))
        }
    })
}

/// The first table with signature `sig` listed in the XSDT (or RSDT).
fn find_table(sig: &[u8; 4]) -> Option<u64> {
    root_tables().find(|&t| hw::mapped(t, 36) && read_u32(t) == u32::from_le_bytes(*sig))
}

/// The DSDT the FADT points to (X_DSDT, else DSDT), if mapped.
fn dsdt(fadt: u64) -> Option<u64> {
    let dsdt = match read_u64(fadt + 140) {
        0 => u64::from(read_u32(fadt + 40)),
        x => x,
    };
    hw::mapped(dsdt, 36).then_some(dsdt)
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
    let Some(dsdt) = dsdt(fadt) else {
        return DEFAULT;
    };
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

/// Where the VM generation ID (16 bytes) is, from the ACPI tables, by the
/// convention Firecracker's AML follows (see the README): in the DSDT or
/// an SSDT, a `Device` whose `_HID` or `_CID` is the string
/// `VM_Gen_Counter` or `VMGENCTR` (any case) and that holds
/// `Name (ADDR, Package () { low 32 bits, high 32 bits })`. (QEMU's
/// `Method (ADDR)` over a firmware-patched `VGIA` is not read.)
pub fn vmgenid_addr() -> Option<u64> {
    let fadt = find_table(b"FACP");
    let ssdts =
        root_tables().filter(|&t| hw::mapped(t, 36) && read_u32(t) == u32::from_le_bytes(*b"SSDT"));
    fadt.and_then(dsdt)
        .into_iter()
        .chain(ssdts)
        .find_map(vmgenid_in)
}

/// AML opcodes and prefixes used below.
const NAME_OP: u8 = 0x08;
const PACKAGE_OP: u8 = 0x12;
const STRING_PREFIX: u8 = 0x0d;
const EXT_OP: u8 = 0x5b;
const DEVICE_OP: u8 = 0x82;

/// The VMGenID address in the AML table at `table`, if it has one.
fn vmgenid_in(table: u64) -> Option<u64> {
    let end = table + u64::from(read_u32(table + 4)).min(1 << 20);
    let body = table + 36;
    const IDS: [&[u8]; 2] = [b"VM_GEN_COUNTER", b"VMGENCTR"];
    (body..end).find_map(|at| {
        // A string object: StringPrefix, the id, NUL.
        if read_u8(at) != STRING_PREFIX {
            return None;
        }
        let is_id = |id: &&[u8]| {
            let n = id.len() as u64;
            at + 2 + n <= end
                && read_u8(at + 1 + n) == 0
                && id
                    .iter()
                    .enumerate()
                    .all(|(i, &b)| read_u8(at + 1 + i as u64).eq_ignore_ascii_case(&b))
        };
        if !IDS.iter().any(is_id) {
            return None;
        }
        let (dev_start, dev_end) = enclosing_device(body, at, end)?;
        find_addr_package(dev_start, dev_end)
    })
}

/// The GSI of the ACPI generic event device (`_HID` "ACPI0013") in the
/// DSDT: the first interrupt of the Extended Interrupt descriptor in its
/// body.
pub fn ged_gsi() -> Option<u32> {
    let dsdt = find_table(b"FACP").and_then(dsdt)?;
    let end = dsdt + u64::from(read_u32(dsdt + 4)).min(1 << 20);
    let body = dsdt + 36;
    const HID: &[u8] = b"ACPI0013\0";
    let hid = (body..end.saturating_sub(HID.len() as u64)).find(|&at| {
        read_u8(at) == STRING_PREFIX
            && HID
                .iter()
                .enumerate()
                .all(|(i, &b)| read_u8(at + 1 + i as u64) == b)
    })?;
    let (dev_start, dev_end) = enclosing_device(body, hid, end)?;
    // Extended Interrupt descriptor: 0x89, length (u16, at least 6),
    // flags, count (at least 1), then the GSIs (u32 each).
    (dev_start..dev_end.saturating_sub(9)).find_map(|at| {
        (read_u8(at) == EXTENDED_INTERRUPT && read_u16(at + 1) >= 6 && read_u8(at + 4) >= 1)
            .then(|| read_u32(at + 5))
    })
}

/// The large resource descriptor tag of an Extended Interrupt.
const EXTENDED_INTERRUPT: u8 = 0x89;

/// The body (after its PkgLength) and end of the innermost `Device` that
/// holds `at`, searching back at most 64 KiB from it.
fn enclosing_device(body: u64, at: u64, end: u64) -> Option<(u64, u64)> {
    let lowest = at.saturating_sub(64 * 1024).max(body);
    (lowest..at).rev().find_map(|op| {
        if read_u8(op) != EXT_OP || read_u8(op + 1) != DEVICE_OP {
            return None;
        }
        let (len, _) = pkg_length(op + 2)?;
        let dev_end = op + 2 + len;
        (dev_end > at && dev_end <= end).then_some((op + 2, dev_end))
    })
}

/// An AML PkgLength at `at`: (the length it encodes, counting itself; its
/// own size in bytes).
fn pkg_length(at: u64) -> Option<(u64, u64)> {
    let lead = read_u8(at);
    let follow = u64::from(lead >> 6);
    if follow == 0 {
        return Some((u64::from(lead & 0x3f), 1));
    }
    let mut len = u64::from(lead & 0x0f);
    for i in 0..follow {
        len |= u64::from(read_u8(at + 1 + i)) << (4 + 8 * i);
    }
    Some((len, 1 + follow))
}

/// An AML integer (ZeroOp, OneOp, Byte/Word/DWord/QWord constant) at `at`:
/// (its value, its size in bytes).
fn aml_integer(at: u64) -> Option<(u64, u64)> {
    Some(match read_u8(at) {
        0x00 => (0, 1),
        0x01 => (1, 1),
        0x0a => (u64::from(read_u8(at + 1)), 2),
        0x0b => (u64::from(read_u16(at + 1)), 3),
        0x0c => (u64::from(read_u32(at + 1)), 5),
        0x0e => (read_u64(at + 1), 9),
        _ => return None,
    })
}

/// `Name (ADDR, Package () { low, high })` between `start` and `end`: the
/// address `low | high << 32`.
fn find_addr_package(start: u64, end: u64) -> Option<u64> {
    (start..end.saturating_sub(6)).find_map(|at| {
        if read_u8(at) != NAME_OP
            || read_u32(at + 1) != u32::from_le_bytes(*b"ADDR")
            || read_u8(at + 5) != PACKAGE_OP
        {
            return None;
        }
        let (_, size) = pkg_length(at + 6)?;
        let count = read_u8(at + 6 + size);
        if count < 2 {
            return None;
        }
        let first = at + 7 + size;
        let (low, n) = aml_integer(first)?;
        let (high, _) = aml_integer(first + n)?;
        let addr = (low & 0xffff_ffff) | (high << 32);
        hw::mapped(addr, 16).then_some(addr)
    })
}
