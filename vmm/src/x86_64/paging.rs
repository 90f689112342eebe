//! Identity page tables for the 64-bit entry: the first 1 GiB mapped with
//! 2 MiB pages, enough for the kernel, its boot parameters and the
//! command line, as the Linux 64-bit boot protocol requires.

use crate::layout::{PDE_START, PDPTE_START, PML4_START};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const HUGE: u64 = 1 << 7;

/// The three tables, as 512-entry arrays, ready to write.
pub fn identity_tables() -> [(u64, [u64; 512]); 3] {
    let mut pml4 = [0u64; 512];
    let mut pdpte = [0u64; 512];
    let mut pde = [0u64; 512];
    pml4[0] = PDPTE_START | PRESENT | WRITABLE;
    pdpte[0] = PDE_START | PRESENT | WRITABLE;
    for (i, e) in pde.iter_mut().enumerate() {
        *e = ((i as u64) << 21) | PRESENT | WRITABLE | HUGE;
    }
    [(PML4_START, pml4), (PDPTE_START, pdpte), (PDE_START, pde)]
}

/// Writes the tables into guest memory; returns the value for CR3.
pub fn write_identity_tables<M: GuestMemory>(mem: &M) -> Result<u64, vm_memory::GuestMemoryError> {
    for (addr, table) in identity_tables() {
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_le_bytes()).collect();
        mem.write_slice(&bytes, GuestAddress(addr))?;
    }
    Ok(PML4_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks the tables the way the MMU does for a 2 MiB mapping.
    fn translate(tables: &[(u64, [u64; 512]); 3], va: u64) -> Option<u64> {
        let lookup = |addr: u64, idx: u64| -> Option<u64> {
            let t = tables.iter().find(|(a, _)| *a == addr)?;
            let e = t.1[idx as usize];
            (e & PRESENT != 0).then_some(e)
        };
        let l4 = lookup(PML4_START, (va >> 39) & 0x1ff)?;
        let l3 = lookup(l4 & !0xfff, (va >> 30) & 0x1ff)?;
        let l2 = lookup(l3 & !0xfff, (va >> 21) & 0x1ff)?;
        assert_ne!(l2 & HUGE, 0);
        Some((l2 & !0x1f_ffff & 0x000f_ffff_ffff_f000) | (va & 0x1f_ffff))
    }

    #[test]
    fn maps_the_first_gigabyte_onto_itself() {
        let t = identity_tables();
        for va in [0u64, 0x7000, 0x10_0000, 0x123_4567, (1 << 30) - 1] {
            assert_eq!(translate(&t, va), Some(va), "va {va:#x}");
        }
        assert_eq!(translate(&t, 1 << 30), None);
    }

    #[test]
    fn tables_land_in_guest_memory() {
        let mem = crate::memory::create(4 << 20, false).unwrap();
        assert_eq!(write_identity_tables(&mem).unwrap(), PML4_START);
        let e: u64 = mem.read_obj(GuestAddress(PDE_START + 8)).unwrap();
        assert_eq!(e, (1 << 21) | PRESENT | WRITABLE | HUGE);
    }
}
