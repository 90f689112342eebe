//! The Intel MultiProcessor table (MP spec 1.4): how a guest without ACPI
//! learns how many CPUs it has, and where its interrupt controllers are.
//! Linux and the test guest scan the BIOS area for its floating pointer.

use crate::layout::{IOAPIC_START, LAPIC_START, MPTABLE_START};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("{0} vCPUs do not fit in an MP table (at most 254)")]
    TooManyCpus(usize),
    #[error("cannot write the MP table into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

const SPEC_REV: u8 = 4;
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// Family 6, the value QEMU and others put in processor entries.
const CPU_SIGNATURE: u32 = 0x600;
/// FPU and APIC present.
const CPU_FEATURES: u32 = 0x201;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
const ISA_IRQS: u8 = 16;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the floating pointer and configuration table for `cpus` vCPUs,
/// laid out from `base`.
pub fn build(cpus: usize, base: u64) -> Result<Vec<u8>, MpTableError> {
    if cpus == 0 || cpus > 254 {
        return Err(MpTableError::TooManyCpus(cpus));
    }
    let ioapic_id = cpus as u8;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus as u8 {
        let flags = CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 };
        entries.extend([ENTRY_PROCESSOR, id, LAPIC_VERSION, flags]);
        entries.extend(CPU_SIGNATURE.to_le_bytes());
        entries.extend(CPU_FEATURES.to_le_bytes());
        entries.extend([0u8; 8]);
        count += 1;
    }
    entries.extend([ENTRY_BUS, 0]);
    entries.extend(b"ISA   ");
    count += 1;
    entries.extend([ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend((IOAPIC_START as u32).to_le_bytes());
    count += 1;
    for irq in 0..ISA_IRQS {
        // Type, polarity/trigger (bus default), bus, bus IRQ, IOAPIC, pin.
        entries.extend([
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            0,
            irq,
            ioapic_id,
            irq,
        ]);
        count += 1;
    }
    entries.extend([ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend([ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = base + 16;
    let table_len = 44 + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend(b"PCMP");
    table.extend((table_len as u16).to_le_bytes());
    table.push(SPEC_REV);
    table.push(0); // checksum, below
    table.extend(b"VMPLANT ");
    table.extend(b"MICROVM     ");
    table.extend(0u32.to_le_bytes()); // OEM table pointer
    table.extend(0u16.to_le_bytes()); // OEM table size
    table.extend(count.to_le_bytes());
    table.extend((LAPIC_START as u32).to_le_bytes());
    table.extend(0u16.to_le_bytes()); // extended table length
    table.extend([0u8, 0]); // extended checksum, reserved
    table.extend(entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend(b"_MP_");
    fp.extend((table_addr as u32).to_le_bytes());
    fp.extend([1, SPEC_REV, 0, 0, 0, 0, 0, 0]); // length in 16-byte units, rev, checksum, features
    fp[10] = checksum(&fp);
    fp.extend(table);
    Ok(fp)
}

/// Writes the MP table for `cpus` vCPUs into the BIOS area.
pub fn write<M: GuestMemory>(mem: &M, cpus: usize) -> Result<(), MpTableError> {
    let bytes = build(cpus, MPTABLE_START)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    /// Parses a table the way a guest does: processor entries and flags.
    fn processors(bytes: &[u8]) -> Vec<(u8, u8)> {
        let table = &bytes[16..];
        let count = u16::from_le_bytes([table[34], table[35]]);
        let mut at = 44;
        let mut cpus = Vec::new();
        for _ in 0..count {
            match table[at] {
                ENTRY_PROCESSOR => {
                    cpus.push((table[at + 1], table[at + 3]));
                    at += 20;
                }
                _ => at += 8,
            }
        }
        assert_eq!(at, table.len(), "entries fill the table exactly");
        cpus
    }

    #[test]
    fn checksums_are_valid() {
        let b = build(2, MPTABLE_START).unwrap();
        assert_eq!(&b[..4], b"_MP_");
        assert_eq!(sum(&b[..16]), 0);
        let len = u16::from_le_bytes([b[20], b[21]]) as usize;
        assert_eq!(&b[16..20], b"PCMP");
        assert_eq!(len, b.len() - 16);
        assert_eq!(sum(&b[16..]), 0);
        let ptr = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        assert_eq!(u64::from(ptr), MPTABLE_START + 16);
    }

    #[test]
    fn lists_every_vcpu_with_the_first_as_bsp() {
        let b = build(3, MPTABLE_START).unwrap();
        assert_eq!(
            processors(&b),
            vec![
                (0, CPU_ENABLED | CPU_BSP),
                (1, CPU_ENABLED),
                (2, CPU_ENABLED)
            ]
        );
    }

    #[test]
    fn refuses_impossible_cpu_counts() {
        assert!(build(0, 0).is_err());
        assert!(build(255, 0).is_err());
        // The largest table still fits in the 64 KiB BIOS area.
        assert!(build(254, 0).unwrap().len() < 0x1_0000);
    }
}
