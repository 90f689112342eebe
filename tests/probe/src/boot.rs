//! CPL0 side of the probe: the fixed-layout `.boot` section.
//!
//! Everything the CPU needs at CPL0 is pre-built at link time at fixed
//! physical addresses (page tables, GDT, TSSs, IDT), so the interpreted CPL0
//! path is a few dozen instructions: load CR4/CR3 (64-bit entry) or enable
//! long mode (PVH entry), `lgdt`, `lidt`, `ltr`, `iretq` to CPL3 with IOPL=3
//! and IF=0. CPU exceptions 0..31 go to a stub that returns to a CPL3
//! reporter (see [`exception_main`]), except the deliberate #GPs of `hlt`
//! ([`halt`], [`sleep`]) and `lidt` ([`triple_fault`]) at CPL3. Vector 32
//! is the local APIC timer (EOI, `iretq`), vector 33 the APIC's spurious
//! vector (`iretq`), vector 34 the ACPI generic event device's interrupt
//! (counted in [`ged_interrupts`], then EOI, `iretq`).
//!
//! Memory map (identity mapped, all 2 MiB pages of 0..4 GiB, U/W set on
//! every level, 3..4 GiB with PCD|PWT):
//!
//! | address            | what                                          |
//! |--------------------|-----------------------------------------------|
//! | 0x008000..0x008100 | AP real-mode trampoline (copied at run time)  |
//! | 0x100000           | PML4                                          |
//! | 0x101000           | PDPT (4 entries)                              |
//! | 0x102000..0x106000 | 4 page directories                            |
//! | 0x106000           | GDT (null, kcode64, kdata, udata, ucode64, kcode32, 8 TSS descriptors) |
//! | 0x106200..0x106600 | 8 TSSs (RSP0 = per-CPU kernel stack top)      |
//! | 0x106600..0x106800 | I/O permission bitmap (ports 0..0xff7 open)   |
//! | 0x106134           | generic event interrupts seen (u32)           |
//! | 0x106800..0x106a30 | IDT (vectors 0..34)                           |
//! | 0x107100..0x107700 | CPL0 code, entries, trampoline template       |
//! | 0x180000..0x190000 | kernel stacks, 8 x 8 KiB                      |
//! | 0x190000..0x1d0000 | user stacks, 8 x 32 KiB                       |

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU32, Ordering};

/// Where the `.boot` section (and so the image) starts.
pub const BOOT_BASE: u64 = 0x10_0000;
/// PML4: the value loaded into CR3.
pub const PML4: u64 = BOOT_BASE;
const PDPT: u64 = BOOT_BASE + 0x1000;
const PD: u64 = BOOT_BASE + 0x2000;
const GDT: u64 = BOOT_BASE + 0x6000;
const GDT_PTR: u64 = BOOT_BASE + 0x6100;
const IDT_PTR: u64 = BOOT_BASE + 0x6110;
const NULL_IDT_PTR: u64 = BOOT_BASE + 0x6120;
const AP_NEXT: u64 = BOOT_BASE + 0x6130;
const GED_COUNT: u64 = BOOT_BASE + 0x6134;
const TSS: u64 = BOOT_BASE + 0x6200;
const IOMAP: u64 = BOOT_BASE + 0x6600;
/// The I/O map's last byte (all ones, as the CPU wants).
const IOMAP_END: u64 = BOOT_BASE + 0x67ff;
const IDT: u64 = BOOT_BASE + 0x6800;
const STUBS: u64 = BOOT_BASE + 0x7100;
const PVH64: u64 = BOOT_BASE + 0x74c0;
const AP64: u64 = BOOT_BASE + 0x7500;
const USER_BSP: u64 = BOOT_BASE + 0x7580;
const USER_AP: u64 = BOOT_BASE + 0x75c0;
const USER_EXC: u64 = BOOT_BASE + 0x75e0;
const TIMER_ISR: u64 = BOOT_BASE + 0x73c0;
const SPURIOUS_ISR: u64 = BOOT_BASE + 0x73e0;
const GED_ISR: u64 = BOOT_BASE + 0x73f0;
/// The AP trampoline template inside the image.
pub const TRAMPOLINE_TEMPLATE: u64 = BOOT_BASE + 0x7600;
/// Size of the AP trampoline.
pub const TRAMPOLINE_LEN: usize = 0x100;
/// Where the AP trampoline runs (SIPI vector `TRAMPOLINE >> 12`).
pub const TRAMPOLINE: u64 = 0x8000;

/// Most vCPUs the probe supports (one TSS, kernel and user stack each).
pub const MAX_CPUS: u64 = 8;
const KSTACKS: u64 = 0x18_0000;
const KSTACK_SIZE: u64 = 0x2000;
const USTACKS: u64 = 0x19_0000;
const USTACK_SIZE: u64 = 0x8000;

const GDT_LIMIT: u64 = 0x30 + 16 * MAX_CPUS - 1;
const IDT_LIMIT: u64 = 35 * 16 - 1;

/// Interrupt vector of the local APIC timer (its handler: EOI, `iretq`).
pub const TIMER_VECTOR: u32 = 32;
/// The local APIC's spurious-interrupt vector (its handler: `iretq`).
pub const SPURIOUS_VECTOR: u32 = 33;
/// The vector the ACPI generic event device's interrupt is routed to (its
/// handler counts it, then EOI, `iretq`).
pub const GED_VECTOR: u32 = 34;
/// EAX for a `hlt` at CPL3 that asks to sleep until an interrupt (see
/// [`sleep`]); any other value halts the vCPU for good.
const SLEEP_MAGIC: u32 = 0x534c_4550;
/// The xAPIC end-of-interrupt register.
const LAPIC_EOI: u64 = 0xfee0_00b0;

global_asm!(
    r#"
    .section .boot, "awx", @progbits
    .code64

    /* ---- page tables: identity map of 0..4 GiB, 2 MiB pages ---- */
    .org 0
    .quad {pdpt} + 7
    .org 0x1000
    .quad {pd} + 0x0000 + 7
    .quad {pd} + 0x1000 + 7
    .quad {pd} + 0x2000 + 7
    .quad {pd} + 0x3000 + 7
    .org 0x2000
    .set probe_pde, 0
    .rept 1536
    .quad probe_pde + 0x87
    .set probe_pde, probe_pde + 0x200000
    .endr
    .rept 512
    .quad probe_pde + 0x9f
    .set probe_pde, probe_pde + 0x200000
    .endr

    /* ---- GDT ---- */
    .org 0x6000
    .quad 0
    .quad 0x00af9a000000ffff    /* 0x08 kernel code, 64-bit */
    .quad 0x00cf92000000ffff    /* 0x10 kernel data */
    .quad 0x00cff2000000ffff    /* 0x18 user data (0x1b) */
    .quad 0x00affa000000ffff    /* 0x20 user code, 64-bit (0x23) */
    .quad 0x00cf9a000000ffff    /* 0x28 kernel code, 32-bit */
    .set probe_tss, {tss}
    .rept {max_cpus}            /* 0x30 + 16 * cpu: 64-bit TSS, available */
    .word {iomap_end} - probe_tss   /* limit: through the I/O map's last byte */
    .word probe_tss & 0xffff
    .byte (probe_tss >> 16) & 0xff
    .byte 0x89
    .byte 0
    .byte (probe_tss >> 24) & 0xff
    .long 0
    .long 0
    .set probe_tss, probe_tss + 0x80
    .endr
    .org 0x6100
    .word {gdt_limit}
    .quad {gdt}
    .org 0x6110
    .word {idt_limit}
    .quad {idt}
    .org 0x6120
    .word 0
    .quad 0
    .org 0x6130
    .long 1                     /* next AP index */
    .long 0                     /* generic event interrupts seen */

    /* ---- TSSs ---- */
    .org 0x6200
    .set probe_rsp0, {kstacks} + {kstack_size}
    .set probe_rsp0_tss, {tss}
    .rept {max_cpus}
    .long 0
    .quad probe_rsp0
    .fill 11, 8, 0
    .word 0
    .word {iomap} - probe_rsp0_tss  /* I/O bitmap offset: the shared map */
    .fill 0x80 - 104, 1, 0
    .set probe_rsp0, probe_rsp0 + {kstack_size}
    .set probe_rsp0_tss, probe_rsp0_tss + 0x80
    .endr

    /* ---- I/O permission bitmap shared by all TSSs: ports 0..0xff7 allowed.
       IOPL=3 already allows them on hardware; PVM ignores IOPL and checks
       this map. ---- */
    .org 0x6600
    .fill {iomap_end} - {iomap}, 1, 0
    .byte 0xff

    /* ---- IDT ---- */
    .org 0x6800
    .set probe_h, {stubs}
    .rept 32
    .word probe_h & 0xffff
    .word 0x08
    .byte 0
    .byte 0x8e                  /* present, DPL 0, interrupt gate */
    .word (probe_h >> 16) & 0xffff
    .long 0
    .long 0
    .set probe_h, probe_h + 16
    .endr
    .org 0x6a00                 /* vector 32: local APIC timer */
    .word {timer_isr} & 0xffff
    .word 0x08
    .byte 0
    .byte 0x8e
    .word ({timer_isr} >> 16) & 0xffff
    .long 0
    .long 0
    .org 0x6a10                 /* vector 33: APIC spurious interrupt */
    .word {spurious_isr} & 0xffff
    .word 0x08
    .byte 0
    .byte 0x8e
    .word ({spurious_isr} >> 16) & 0xffff
    .long 0
    .long 0
    .org 0x6a20                 /* vector 34: ACPI generic event device */
    .word {ged_isr} & 0xffff
    .word 0x08
    .byte 0
    .byte 0x8e
    .word ({ged_isr} >> 16) & 0xffff
    .long 0
    .long 0

    /* ---- exception stubs, 16 bytes each: push [0,] vector; jmp common ---- */
    .macro probe_stub v, err
    .org 0x7100 + 16 * \v
    .if \err == 0
    push 0
    .endif
    push \v
    jmp probe_exc_common
    .endm
    probe_stub 0, 0
    probe_stub 1, 0
    probe_stub 2, 0
    probe_stub 3, 0
    probe_stub 4, 0
    probe_stub 5, 0
    probe_stub 6, 0
    probe_stub 7, 0
    probe_stub 8, 1
    probe_stub 9, 0
    probe_stub 10, 1
    probe_stub 11, 1
    probe_stub 12, 1
    .org 0x7100 + 16 * 13
    jmp probe_gp
    probe_stub 14, 1
    probe_stub 15, 0
    probe_stub 16, 0
    probe_stub 17, 1
    probe_stub 18, 0
    probe_stub 19, 0
    probe_stub 20, 0
    probe_stub 21, 1
    probe_stub 22, 0
    probe_stub 23, 0
    probe_stub 24, 0
    probe_stub 25, 0
    probe_stub 26, 0
    probe_stub 27, 0
    probe_stub 28, 0
    probe_stub 29, 1
    probe_stub 30, 1
    probe_stub 31, 0

    /* halt this vCPU for good */
    .org 0x7300
probe_halt_loop:
    cli
    hlt
    jmp probe_halt_loop

    /* triple fault: no IDT, then #UD -> #GP -> #DF -> shutdown */
    .org 0x7310
probe_triple_fault:
    lidt [{null_idt_ptr}]
    ud2

    /* exception: return to the CPL3 reporter on the lower half of this
       vCPU's kernel stack, with (vector, error, rip, cr2) in registers */
    .org 0x7320
probe_exc_common:
    pop rdi
    pop rsi
    mov rdx, [rsp]
    mov rcx, cr2
    lea rax, [rsp + 40 - 4096]
    and rax, -16
    sub rax, 8
    push 0x1b
    push rax
    push 0x3002
    push 0x23
    push {user_exc}
    iretq

    /* #GP. CPL3 cannot use software interrupts under PVM (KVM's emulator
       fails INT n outside real mode and injects #UD), so CPL3 asks for CPL0
       services by faulting on purpose: `hlt` (F4) with EAX = the sleep
       magic -> sleep until an interrupt and return after the `hlt`;
       other `hlt` -> halt this vCPU; `lidt` (0F 01) -> triple fault.
       Anything else is reported. Clobbers RCX (the sleep's caller says
       so). The sleep is 12 instructions, all interpreted on PVM: STI's
       one-instruction shadow makes `sti; hlt` atomic, so an interrupt
       that came while CPL3 ran with IF=0 (pending in the APIC) wakes the
       `hlt` at once and none is lost. `iretq` restores the CPL3 RFLAGS,
       IF=0 again. */
    .org 0x7360
probe_gp:
    test byte ptr [rsp + 16], 3
    jz 2f
    mov rcx, [rsp + 8]
    cmp byte ptr [rcx], 0xf4
    jne 1f
    cmp eax, {sleep_magic}
    jne probe_halt_loop
    add qword ptr [rsp + 8], 1  /* resume after the hlt */
    add rsp, 8                  /* drop the error code */
    sti
    hlt
    iretq
1:
    cmp word ptr [rcx], 0x010f
    je probe_triple_fault
2:
    push 13
    jmp probe_exc_common

    /* Vector 32, the local APIC timer: EOI (the xAPIC page is identity
       mapped) and return to the sleep above. */
    .org 0x73c0
probe_timer:
    push rax
    mov eax, {lapic_eoi}
    mov dword ptr [rax], 0
    pop rax
    iretq

    /* Vector 33, the APIC's spurious interrupt: no EOI. */
    .org 0x73e0
probe_spurious:
    iretq

    /* Vector 34, the generic event device: count it, then as the timer. */
    .org 0x73f0
    lock inc dword ptr [{ged_count}]
    jmp probe_timer

    /* ---- 64-bit entry (ELF e_entry): long mode, CPL0, RSI = boot_params ---- */
    .org 0x7400
    .global probe_entry64
probe_entry64:
    cli
    mov rdi, rsi
    xor esi, esi
    mov eax, 0x20               /* CR4: PAE only (no SMEP/SMAP/PGE/PCIDE) */
    mov cr4, rax
    mov eax, {pml4}
    mov cr3, rax
probe_common64:
    lgdt [{gdt_ptr}]
    lidt [{idt_ptr}]
    mov ax, 0x30
    ltr ax
    mov esp, {kstacks} + {kstack_size}
    push 0x1b
    push {ustacks} + {ustack_size} - 8
    push 0x3002                 /* IOPL=3, IF=0 */
    push 0x23
    push {user_bsp}
    iretq

    /* ---- PVH entry: 32-bit protected mode, paging off, EBX = start_info ---- */
    .org 0x7480
    .code32
    .global probe_pvh32
probe_pvh32:
    cli
    mov eax, 0x20
    mov cr4, eax
    mov eax, {pml4}
    mov cr3, eax
    mov ecx, 0xc0000080
    rdmsr
    or eax, 0x100               /* EFER.LME */
    wrmsr
    mov eax, 0x80000031         /* PG | NE | ET | PE */
    mov cr0, eax
    lgdt [{gdt_ptr}]
    .byte 0xea
    .long {pvh64}
    .word 0x08
    .org 0x74c0
    .code64
    mov edi, ebx
    mov esi, 1
    jmp probe_common64

    /* ---- AP 64-bit entry, from the trampoline ---- */
    .org 0x7500
    mov eax, 1
    lock xadd dword ptr [{ap_next}], eax
    cmp eax, {max_cpus}
    jae probe_halt_loop
    lidt [{idt_ptr}]
    mov edi, eax
    shl eax, 4
    add eax, 0x30
    ltr ax
    lea eax, [edi + 1]
    shl eax, 13
    add eax, {kstacks}
    mov esp, eax
    lea eax, [edi + 1]
    shl eax, 15
    add eax, {ustacks} - 8
    push 0x1b
    push rax
    push 0x3002
    push 0x23
    push {user_ap}
    iretq

    /* ---- CPL3 entries into Rust ---- */
    .org 0x7580
    mov r12, rdi
    mov r13, rsi
    lea rdi, [rip + __probe_bss_start]
    lea rcx, [rip + __probe_bss_end]
    sub rcx, rdi
    xor eax, eax
    rep stosb
    mov rdi, r12
    mov rsi, r13
    jmp {bsp_main}
    .org 0x75c0
    jmp {ap_main}
    .org 0x75e0
    jmp {exc_main}

    /* ---- AP trampoline template, copied to {tramp} ---- */
    .org 0x7600
    .code16
    cli
    mov ax, cs
    mov ds, ax
    .byte 0x66
    lgdt [0x30]
    mov eax, cr0
    or eax, 1
    mov cr0, eax
    .byte 0x66, 0xea
    .long {tramp} + 0x40
    .word 0x28
    .org 0x7630
    .word {gdt_limit}
    .quad {gdt}
    .org 0x7640
    .code32
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov eax, 0x20
    mov cr4, eax
    mov eax, {pml4}
    mov cr3, eax
    mov ecx, 0xc0000080
    rdmsr
    or eax, 0x100
    wrmsr
    mov eax, 0x80000031
    mov cr0, eax
    .byte 0xea
    .long {ap64}
    .word 0x08
    .org 0x7700
    .code64

    .text
    "#,
    pdpt = const PDPT,
    pd = const PD,
    tss = const TSS,
    iomap = const IOMAP,
    iomap_end = const IOMAP_END,
    max_cpus = const MAX_CPUS,
    gdt_limit = const GDT_LIMIT,
    gdt = const GDT,
    idt_limit = const IDT_LIMIT,
    idt = const IDT,
    ap_next = const AP_NEXT,
    kstacks = const KSTACKS,
    kstack_size = const KSTACK_SIZE,
    ustacks = const USTACKS,
    ustack_size = const USTACK_SIZE,
    stubs = const STUBS,
    null_idt_ptr = const NULL_IDT_PTR,
    user_exc = const USER_EXC,
    user_bsp = const USER_BSP,
    user_ap = const USER_AP,
    pml4 = const PML4,
    gdt_ptr = const GDT_PTR,
    idt_ptr = const IDT_PTR,
    pvh64 = const PVH64,
    ap64 = const AP64,
    tramp = const TRAMPOLINE,
    sleep_magic = const SLEEP_MAGIC,
    timer_isr = const TIMER_ISR,
    spurious_isr = const SPURIOUS_ISR,
    ged_isr = const GED_ISR,
    ged_count = const GED_COUNT,
    lapic_eoi = const LAPIC_EOI,
    bsp_main = sym crate::bsp_main,
    ap_main = sym crate::smp::ap_main,
    exc_main = sym exception_main,
);

// The PVH ELF note (XEN_ELFNOTE_PHYS32_ENTRY = 18, name "Xen", 4-byte
// entry). Feature `no-pvh` leaves it out, to test the 64-bit entry in VMMs
// that prefer PVH when the note is there (Firecracker does).
#[cfg(not(feature = "no-pvh"))]
global_asm!(
    r#"
    /* ---- PVH ELF note: XEN_ELFNOTE_PHYS32_ENTRY ---- */
    .section .note.pvh, "a", @note
    .p2align 2
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .long probe_pvh32
    .text
    "#
);

/// Makes the AP slots (index, TSS, stacks) reusable, so that a second `smp`
/// step can restart the APs: the next AP gets index 1 again, and the TSS
/// descriptors that `ltr` marked busy are marked available. Only while every
/// AP is halted (or not started).
pub fn reset_ap_slots() {
    // AP_NEXT is the 4-byte counter in `.boot` that only the APs'
    // CPL0 entry touches (all halted now); the identity map makes it
    // user-writable; an atomic view of it is sound as no Rust reference to
    // it exists.
    // SAFETY: sound for the reasons just given.
    let next = unsafe { AtomicU32::from_ptr(AP_NEXT as *mut u32) };
    next.store(1, Ordering::SeqCst);
    for cpu in 1..MAX_CPUS {
        // The type byte (offset 5) of TSS descriptor `cpu`: 0x8b busy, 0x89
        // available.
        let ty = GDT + 0x30 + 16 * cpu + 5;
        if crate::hw::read_u8(ty) == 0x8b {
            crate::hw::mmio_write_u8(ty, 0x89);
        }
    }
}

/// Halts this vCPU for good: `hlt` at CPL3 raises #GP, whose CPL0 handler
/// sees the `hlt` (and EAX not the sleep magic) and enters a `cli; hlt`
/// loop, so the vCPU sleeps in the hypervisor instead of spinning.
pub fn halt() -> ! {
    loop {
        // `hlt` at CPL3 only raises #GP, which the `.boot` handler
        // turns into a halt loop (EAX = 0 is not the sleep magic); it never
        // returns and touches no memory.
        // SAFETY: sound for the reasons just given.
        unsafe { asm!("hlt", in("eax") 0u32, options(nomem, nostack)) };
    }
}

/// Sleeps until the next interrupt (the local APIC timer, see
/// [`crate::lapic`]): `hlt` at CPL3 with EAX = the sleep magic raises #GP,
/// whose CPL0 handler does `sti; hlt` and returns after our `hlt` with
/// IF=0 again. An interrupt that became pending before the call wakes it at
/// once; without any interrupt it sleeps for good, so arm a timer first.
pub fn sleep() {
    // `hlt` at CPL3 only raises #GP; with EAX = SLEEP_MAGIC the
    // `.boot` handler halts with interrupts enabled (on its kernel stack;
    // the interrupt handlers there touch only the APIC's EOI register) and
    // `iretq`s to the instruction after the `hlt` with our RFLAGS. It
    // clobbers RCX, declared here; no memory Rust knows is touched. Not
    // `nomem`: the caller's MMIO writes that arm the timer must come first.
    // SAFETY: sound for the reasons just given.
    unsafe { asm!("hlt", in("eax") SLEEP_MAGIC, out("rcx") _, options(nostack)) };
}

/// How many generic event device interrupts (vector [`GED_VECTOR`]) this
/// VM has taken.
pub fn ged_interrupts() -> u32 {
    // GED_COUNT is an aligned u32 in the `.boot` section, mapped
    // user-readable; only the vector 34 handler writes it (`lock inc`).
    // SAFETY: sound for the reasons just given.
    unsafe { core::ptr::read_volatile(GED_COUNT as *const u32) }
}

/// Triple-faults the VM: `lidt` at CPL3 raises #GP, whose CPL0 handler
/// loads an empty IDT and executes `ud2`, which the CPU cannot deliver
/// (#UD -> #GP -> #DF -> shutdown).
pub fn triple_fault() -> ! {
    loop {
        // `lidt` at CPL3 only raises #GP (the `.boot` handler turns
        // it into a triple fault); the operand is the valid, empty IDT
        // pointer in `.boot`, read-only here.
        // SAFETY: sound for the reasons just given.
        unsafe { asm!("lidt [{p}]", p = const NULL_IDT_PTR, options(readonly, nostack)) };
    }
}

/// CPL3 reporter for CPU exceptions: the CPL0 stub `iretq`s here.
extern "C" fn exception_main(vector: u64, error: u64, rip: u64, cr2: u64) -> ! {
    crate::serial::line(format_args!(
        r#"{{"probe":"exception","vcpu":{},"vector":{},"error":{},"rip":{},"cr2":{}}}"#,
        crate::smp::apic_id(),
        vector,
        error,
        rip,
        cr2
    ));
    halt()
}

/// What the VMM handed over at boot, read before anything else runs.
pub struct BootInfo {
    /// Physical address of the command line (0 if none).
    pub cmdline: u64,
    /// Physical address of the ACPI RSDP if the VMM said (0 if not).
    pub rsdp: u64,
    /// The RAM entries of the memory map: (boot_params' e820 table, or
    /// hvm_start_info's memmap from version 1 on), empty if there is none.
    pub ram: RamMap,
}

/// Magic of the PVH `struct hvm_start_info`.
const HVM_START_MAGIC: u32 = 0x336e_c578;
/// Most memory-map entries kept (boot_params holds at most 128).
const RAM_MAX: usize = 128;
/// Memory-map type of usable RAM (E820_RAM, and PVH's XEN_HVM_MEMMAP_TYPE_RAM).
const MAP_RAM: u32 = 1;

/// The RAM ranges (start, end) of the boot memory map.
#[derive(Clone, Copy)]
pub struct RamMap {
    ranges: [(u64, u64); RAM_MAX],
    len: usize,
}

impl RamMap {
    const EMPTY: RamMap = RamMap {
        ranges: [(0, 0); RAM_MAX],
        len: 0,
    };

    /// Reads `entries` entries of `stride` bytes at `table`, each
    /// (addr u64, size u64, type u32, ...).
    fn read(table: u64, entries: u64, stride: u64) -> Self {
        use crate::hw::{read_u32, read_u64};
        let mut map = RamMap::EMPTY;
        for i in 0..entries.min(RAM_MAX as u64) {
            let e = table + i * stride;
            let (addr, size) = (read_u64(e), read_u64(e + 8));
            if read_u32(e + 16) == MAP_RAM && size != 0 {
                map.ranges[map.len] = (addr, addr.saturating_add(size));
                map.len += 1;
            }
        }
        map
    }

    /// Whether the VMM gave a memory map with RAM in it.
    pub fn known(&self) -> bool {
        self.len != 0
    }

    /// The end of the run of RAM (adjacent or overlapping entries) that
    /// contains `addr`; `addr` itself if it is not RAM.
    pub fn run_end(&self, addr: u64) -> u64 {
        let mut end = addr;
        // Each pass can only extend `end`; at most one pass per entry.
        for _ in 0..=self.len {
            let next = self.ranges[..self.len]
                .iter()
                .filter(|&&(s, e)| s <= end && end < e)
                .map(|&(_, e)| e)
                .max();
            match next {
                Some(e) => end = e,
                None => break,
            }
        }
        end
    }
}

impl BootInfo {
    /// Decodes the boot protocol: `proto` 0 is the Linux 64-bit entry
    /// (`info` = boot_params), 1 is PVH (`info` = hvm_start_info).
    pub fn read(info: u64, proto: u64) -> Self {
        use crate::hw::{read_u8, read_u32, read_u64};
        let none = BootInfo {
            cmdline: 0,
            rsdp: 0,
            ram: RamMap::EMPTY,
        };
        if info == 0 {
            return none;
        }
        if proto == 1 {
            if read_u32(info) != HVM_START_MAGIC {
                return none;
            }
            // Version 1 added memmap_paddr (40) and memmap_entries (48);
            // entries are 24 bytes.
            let ram = if read_u32(info + 4) >= 1 {
                RamMap::read(read_u64(info + 40), u64::from(read_u32(info + 48)), 24)
            } else {
                RamMap::EMPTY
            };
            BootInfo {
                cmdline: read_u64(info + 24),
                rsdp: read_u64(info + 32),
                ram,
            }
        } else {
            let lo = u64::from(read_u32(info + 0x228));
            let hi = u64::from(read_u32(info + 0xc8));
            // e820_entries (0x1e8) entries of 20 bytes at e820_table (0x2d0).
            let ram = RamMap::read(info + 0x2d0, u64::from(read_u8(info + 0x1e8)), 20);
            BootInfo {
                cmdline: (hi << 32) | lo,
                rsdp: read_u64(info + 0x70),
                ram,
            }
        }
    }
}
