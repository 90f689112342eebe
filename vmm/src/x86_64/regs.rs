//! The register state a kernel expects at its entry point: long mode
//! with identity paging for the Linux 64-bit entry, flat 32-bit protected
//! mode for the PVH entry; FPU defaults and the local APIC's LINT pins.

use super::gdt::{GDT_32BIT, GDT_64BIT, kvm_segment_from_gdt};
use crate::layout::{BOOT_STACK_POINTER, GDT_START, IDT_START};
use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

const X86_CR0_PE: u64 = 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// How the kernel is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// The Linux 64-bit boot protocol: long mode, RSI = boot_params.
    Linux64 {
        entry: u64,
        boot_params: u64,
        cr3: u64,
    },
    /// The PVH boot protocol: 32-bit protected mode, paging off,
    /// EBX = hvm_start_info.
    Pvh { entry: u64, start_info: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("cannot write the GDT into guest memory")]
    Gdt(#[source] vm_memory::GuestMemoryError),
}

/// General-purpose registers at entry.
pub fn boot_regs(mode: EntryMode) -> kvm_regs {
    match mode {
        EntryMode::Linux64 {
            entry, boot_params, ..
        } => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: boot_params,
            ..Default::default()
        },
        EntryMode::Pvh { entry, start_info } => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rbx: start_info,
            ..Default::default()
        },
    }
}

/// Writes the GDT the mode needs and returns `sregs` set up for it.
pub fn boot_sregs<M: GuestMemory>(
    mem: &M,
    mode: EntryMode,
    mut sregs: kvm_sregs,
) -> Result<kvm_sregs, RegsError> {
    let gdt = match mode {
        EntryMode::Linux64 { .. } => GDT_64BIT,
        EntryMode::Pvh { .. } => GDT_32BIT,
    };
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_START + 8 * i as u64))
            .map_err(RegsError::Gdt)?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START))
        .map_err(RegsError::Gdt)?;
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;

    let code = kvm_segment_from_gdt(gdt[1], 1);
    let data = kvm_segment_from_gdt(gdt[2], 2);
    let tss = kvm_segment_from_gdt(gdt[3], 3);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    match mode {
        EntryMode::Linux64 { cr3, .. } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.cr3 = cr3;
            sregs.cr4 = X86_CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        EntryMode::Pvh { .. } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    Ok(sregs)
}

/// FPU defaults after FNINIT, with SSE exceptions masked.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    let mut b = [0u8; 4];
    for (d, s) in b.iter_mut().zip(&state.regs[offset..offset + 4]) {
        *d = *s as u8;
    }
    u32::from_le_bytes(b)
}

fn set_lapic_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (d, s) in state.regs[offset..offset + 4]
        .iter_mut()
        .zip(value.to_le_bytes())
    {
        *d = s as _;
    }
}

/// LINT0 delivers ExtINT (the legacy PIC) and LINT1 delivers NMI, as the
/// MP table says and as a PC's BIOS leaves them.
pub fn configure_lapic(state: &mut kvm_lapic_state) {
    let set_mode = |v: u32, mode: u32| (v & !0x700) | (mode << 8);
    let lvt0 = lapic_reg(state, APIC_LVT0);
    set_lapic_reg(state, APIC_LVT0, set_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(state, APIC_LVT1);
    set_lapic_reg(state, APIC_LVT1, set_mode(lvt1, APIC_MODE_NMI));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux64_entry_is_long_mode_with_boot_params_in_rsi() {
        let mem = crate::memory::create(4 << 20, false).unwrap();
        let mode = EntryMode::Linux64 {
            entry: 0x100_0000,
            boot_params: 0x7000,
            cr3: 0x9000,
        };
        let r = boot_regs(mode);
        assert_eq!(
            (r.rip, r.rsi, r.rsp, r.rflags),
            (0x100_0000, 0x7000, BOOT_STACK_POINTER, 2)
        );
        let s = boot_sregs(&mem, mode, kvm_sregs::default()).unwrap();
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE | X86_CR0_PG);
        assert_eq!(
            (s.cr3, s.cr4 & X86_CR4_PAE, s.efer & (EFER_LME | EFER_LMA)),
            (0x9000, X86_CR4_PAE, EFER_LME | EFER_LMA)
        );
        assert_eq!((s.cs.l, s.cs.selector, s.ds.selector), (1, 8, 0x10));
        let gdt1: u64 = mem.read_obj(GuestAddress(GDT_START + 8)).unwrap();
        assert_eq!(gdt1, GDT_64BIT[1]);
    }

    #[test]
    fn pvh_entry_is_flat_protected_mode_with_start_info_in_rbx() {
        let mem = crate::memory::create(4 << 20, false).unwrap();
        let mode = EntryMode::Pvh {
            entry: 0x10_1000,
            start_info: 0x6000,
        };
        let r = boot_regs(mode);
        assert_eq!((r.rip, r.rbx), (0x10_1000, 0x6000));
        let s = boot_sregs(&mem, mode, kvm_sregs::default()).unwrap();
        assert_eq!(
            (s.cr0 & X86_CR0_PG, s.cr0 & X86_CR0_PE, s.efer),
            (0, X86_CR0_PE, 0)
        );
        assert_eq!((s.cs.l, s.cs.db, s.cs.limit), (0, 1, 0xffff_ffff));
    }

    #[test]
    fn lapic_lint_pins_get_extint_and_nmi() {
        let mut st = kvm_lapic_state::default();
        set_lapic_reg(&mut st, APIC_LVT0, 0x0001_0000); // masked, fixed
        configure_lapic(&mut st);
        assert_eq!(lapic_reg(&st, APIC_LVT0), 0x0001_0700);
        assert_eq!(lapic_reg(&st, APIC_LVT1), 0x0000_0400);
    }
}
