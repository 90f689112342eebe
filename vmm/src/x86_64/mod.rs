//! The x86_64 boot path: descriptor tables, page tables, boot parameters,
//! CPUID, MSRs, the MP table, the ACPI tables and the registers a kernel
//! expects at entry; and the vCPU state that snapshots save and restore.

pub mod acpi;
pub mod boot_params;
pub mod cpuid;
pub mod gdt;
pub mod mptable;
pub mod msr;
pub mod paging;
pub mod regs;
pub mod vcpu_state;
