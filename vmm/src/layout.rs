//! Where things go in guest-physical memory (x86_64).
//!
//! ```text
//! 0x0000_0500  GDT, then an empty IDT
//! 0x0000_6000  PVH start info, memory map and module list
//! 0x0000_7000  Linux boot_params ("zero page")
//! 0x0000_8ff0  boot stack (grows down)
//! 0x0000_9000  identity page tables for the 64-bit entry (PML4, PDPT, PD)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  start of the EBDA: RAM below it, reserved above
//! 0x000e_0000  ACPI RSDP (in the BIOS area Linux scans), then the DSDT,
//!              FADT, MADT and XSDT, up to the MP table
//! 0x000f_0000  MP table (in the BIOS area Linux scans)
//! 0x0010_0000  kernel (ELF segments or bzImage protected-mode code)
//!   ...        initrd at the top of low RAM
//! 0xc000_0000  MMIO gap: boot-complete marker, then virtio-mmio devices,
//!              IOAPIC, KVM's TSS, LAPIC
//! 0x1_0000_0000  RAM beyond 3 GiB continues here
//! ```

pub const GDT_START: u64 = 0x500;
pub const IDT_START: u64 = 0x520;
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MEMMAP_START: u64 = 0x6100;
pub const PVH_MODLIST_START: u64 = 0x6800;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
pub const CMDLINE_START: u64 = 0x20000;
/// The longest command line we pass (Linux x86's COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
pub const EBDA_START: u64 = 0x9fc00;
/// The VM generation ID, 16 bytes, in the reserved area below 1 MiB; the
/// DSDT's VMGenID device points to it.
pub const VMGENID_START: u64 = 0x9ff00;
/// The ACPI tables: the RSDP first (16-byte aligned in 0xE0000..0xFFFFF,
/// where guests search for it), the other tables after it, all below the
/// MP table. The whole BIOS area is reserved in the memory map.
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_END: u64 = MPTABLE_START;
pub const MPTABLE_START: u64 = 0xf0000;
pub const HIMEM_START: u64 = 0x10_0000;

/// The hole below 4 GiB where devices live instead of RAM.
pub const MMIO_GAP_START: u64 = 0xC000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// The first virtio-mmio device; each takes one 4 KiB window.
pub const VIRTIO_MMIO_START: u64 = 0xD000_0000;
/// GSIs for virtio devices start here (0-15 are the ISA lines) and end
/// before [`GED_GSI`].
pub const VIRTIO_IRQ_START: u32 = 5;
/// The ACPI generic event device's interrupt, the IOAPIC's last pin: it
/// tells the guest that the VM generation ID changed (after a restore).
pub const GED_GSI: u32 = 23;
/// How many virtio devices a VM can have: one GSI each, from
/// [`VIRTIO_IRQ_START`] up to [`GED_GSI`].
pub const MAX_VIRTIO_DEVICES: u32 = GED_GSI - VIRTIO_IRQ_START;
pub const IOAPIC_START: u64 = 0xFEC0_0000;
/// Three pages KVM needs for its real-mode TSS.
pub const KVM_TSS_START: u64 = 0xFFFB_D000;
pub const LAPIC_START: u64 = 0xFEE0_0000;
