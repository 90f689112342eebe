//! What the kernel is told at entry: the Linux zero page (boot_params)
//! for the 64-bit entry, or the PVH start info for the 32-bit PVH entry.
//! Both carry the same memory map.

use crate::layout::{
    CMDLINE_START, EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START, PVH_INFO_START,
    PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// loadflags bit: the heap_end_ptr field is valid.
const CAN_USE_HEAP: u8 = 0x80;

#[derive(Debug, thiserror::Error)]
pub enum BootParamsError {
    #[error("the memory map has more than {0} entries")]
    TooManyEntries(usize),
    #[error("cannot write the boot parameters into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// One entry of the memory map: start, length, type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryMapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The guest's memory map for `mem_size` bytes of RAM: base memory below
/// the EBDA, the BIOS area reserved, RAM from 1 MiB to the MMIO gap, the
/// gap reserved, and RAM above 4 GiB.
pub fn memory_map(mem_size: u64) -> Vec<MemoryMapEntry> {
    let entry = |addr, size, kind| MemoryMapEntry { addr, size, kind };
    let low_end = mem_size.min(MMIO_GAP_START);
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    if low_end > HIMEM_START {
        map.push(entry(HIMEM_START, low_end - HIMEM_START, E820_RAM));
    }
    if mem_size > MMIO_GAP_START {
        map.push(entry(MMIO_GAP_END, mem_size - low_end, E820_RAM));
    }
    map
}

/// The initrd's place and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdInfo {
    pub addr: u64,
    pub size: u64,
}

/// Builds the zero page. `header` is the bzImage's own setup header, if
/// the kernel was one; an ELF kernel gets a minimal header. `rsdp` is the
/// ACPI RSDP's address, if there are ACPI tables.
pub fn linux_boot_params(
    header: Option<setup_header>,
    cmdline_size: usize,
    initrd: Option<InitrdInfo>,
    mem_size: u64,
    rsdp: Option<u64>,
) -> Result<boot_params, BootParamsError> {
    let mut params = boot_params {
        acpi_rsdp_addr: rsdp.unwrap_or(0),
        ..Default::default()
    };
    if let Some(h) = header {
        params.hdr = h;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_size as u32;
    params.hdr.loadflags |= CAN_USE_HEAP;
    params.hdr.heap_end_ptr = 0xfe00;
    if let Some(rd) = initrd {
        params.hdr.ramdisk_image = rd.addr as u32;
        params.hdr.ramdisk_size = rd.size as u32;
        params.ext_ramdisk_image = (rd.addr >> 32) as u32;
        params.ext_ramdisk_size = (rd.size >> 32) as u32;
    }
    let map = memory_map(mem_size);
    if map.len() > params.e820_table.len() {
        return Err(BootParamsError::TooManyEntries(params.e820_table.len()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = map.len() as u8;
    Ok(params)
}

/// Writes the zero page; returns its address (for RSI).
pub fn write_linux_boot_params<M: GuestMemory>(
    mem: &M,
    params: &boot_params,
) -> Result<u64, BootParamsError> {
    mem.write_obj(*params, GuestAddress(ZERO_PAGE_START))
        .map_err(BootParamsError::Write)?;
    Ok(ZERO_PAGE_START)
}

/// Writes the PVH start info, its memory map and module list; returns
/// the start info's address (for EBX). `rsdp` is the ACPI RSDP's address,
/// if there are ACPI tables.
pub fn write_pvh_start_info<M: GuestMemory>(
    mem: &M,
    initrd: Option<InitrdInfo>,
    mem_size: u64,
    rsdp: Option<u64>,
) -> Result<u64, BootParamsError> {
    let map = memory_map(mem_size);
    if map.len() * std::mem::size_of::<hvm_memmap_table_entry>()
        > (PVH_MODLIST_START - PVH_MEMMAP_START) as usize
    {
        return Err(BootParamsError::TooManyEntries(map.len()));
    }
    let write = |e: vm_memory::GuestMemoryError| BootParamsError::Write(e);
    for (i, e) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        };
        let at = PVH_MEMMAP_START + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(entry, GuestAddress(at)).map_err(write)?;
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        rsdp_paddr: rsdp.unwrap_or(0),
        ..Default::default()
    };
    if let Some(rd) = initrd {
        let module = hvm_modlist_entry {
            paddr: rd.addr,
            size: rd.size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_START))
            .map_err(write)?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_START))
        .map_err(write)?;
    Ok(PVH_INFO_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_map_covers_ram_and_reserves_the_holes() {
        let m = memory_map(128 << 20);
        assert_eq!(
            m,
            vec![
                MemoryMapEntry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: E820_RAM
                },
                MemoryMapEntry {
                    addr: 0x9fc00,
                    size: 0x60400,
                    kind: E820_RESERVED
                },
                MemoryMapEntry {
                    addr: 0x10_0000,
                    size: (128 << 20) - 0x10_0000,
                    kind: E820_RAM
                },
            ]
        );
        let ram: u64 = m
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (128 << 20) - (0x10_0000 - 0x9fc00));
    }

    #[test]
    fn memory_above_the_gap_moves_to_4g() {
        let m = memory_map(5 << 30);
        let high = m.last().unwrap();
        assert_eq!((high.addr, high.size), (4 << 30, 2 << 30));
        assert_eq!(m[2].addr + m[2].size, 3 << 30);
    }

    #[test]
    fn zero_page_carries_cmdline_initrd_and_e820() {
        let rd = InitrdInfo {
            addr: 0x700_0000,
            size: 0x12345,
        };
        let p = linux_boot_params(None, 42, Some(rd), 128 << 20, Some(0xe0000)).unwrap();
        let hdr = p.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.cmdline_size }, 42);
        assert_eq!(
            ({ hdr.ramdisk_image }, { hdr.ramdisk_size }),
            (0x700_0000, 0x12345)
        );
        assert_eq!(p.e820_entries, 3);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        let last = p.e820_table[2];
        assert_eq!(
            ({ last.addr }, { last.size }, { last.r#type }),
            (0x10_0000, (128 << 20) - 0x10_0000, E820_RAM)
        );
    }

    #[test]
    fn bzimage_header_fields_are_kept() {
        let h = setup_header {
            version: 0x020f,
            kernel_alignment: 0x20_0000,
            ..Default::default()
        };
        let p = linux_boot_params(Some(h), 10, None, 64 << 20, None).unwrap();
        assert_eq!({ p.hdr.version }, 0x020f);
        assert_eq!({ p.hdr.kernel_alignment }, 0x20_0000);
        assert_eq!({ p.hdr.ramdisk_image }, 0);
        assert_eq!({ p.acpi_rsdp_addr }, 0, "no ACPI tables, no RSDP");
    }

    #[test]
    fn pvh_start_info_points_at_its_tables() {
        let mem = crate::memory::create(64 << 20, false).unwrap();
        let rd = InitrdInfo {
            addr: 0x300_0000,
            size: 0x1000,
        };
        let at = write_pvh_start_info(&mem, Some(rd), 64 << 20, Some(0xe0000)).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(at)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.memmap_entries, 3);
        assert_eq!(info.cmdline_paddr, CMDLINE_START);
        assert_eq!(info.rsdp_paddr, 0xe0000);
        assert_eq!(info.nr_modules, 1);
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((m.paddr, m.size), (0x300_0000, 0x1000));
        let e: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(info.memmap_paddr + 2 * 24))
            .unwrap();
        assert_eq!((e.addr, e.type_), (0x10_0000, E820_RAM));
    }
}
