//! The state of one x86_64 vCPU, for snapshots and migration: what KVM
//! holds for a vCPU, read with [`save`] from a vCPU that is not running and
//! written with [`restore`] into a new vCPU (created, not yet run, in a VM
//! whose memory and in-kernel irqchip are already in place).
//!
//! # What is saved
//!
//! General registers, segment and control registers, the XSAVE area (as
//! the raw bytes KVM gives: KVM_GET_XSAVE2 when KVM_CAP_XSAVE2 reports more
//! than the 4096 bytes of `struct kvm_xsave`, else KVM_GET_XSAVE), the XCRs,
//! the debug registers, the local APIC, the MP state, the pending events,
//! the CPUID the vCPU was given (KVM_GET_CPUID2), its TSC frequency
//! (KVM_GET_TSC_KHZ) and the MSRs of [`SERIALIZABLE_MSRS`].
//!
//! MSRs come from KVM_GET_MSR_INDEX_LIST (the caller passes it, see
//! `Kvm::get_msr_index_list`), filtered through [`SERIALIZABLE_MSRS`], plus
//! the MTRRs when the vCPU's CPUID has them: KVM emulates the MTRRs but
//! leaves them out of its index list (QEMU saves them by hand for the same
//! reason), and a guest would otherwise find its MTRRs disabled after a
//! restore, all of memory uncacheable as far as it can tell. They are read in chunks of `KVM_MAX_MSR_ENTRIES`
//! and kept exactly as KVM returned them; an MSR KVM refuses to read (the
//! count KVM_GET_MSRS returns stops at it) is logged at debug and left out,
//! and reading goes on after it.
//!
//! Never saved, on purpose:
//! - IA32_FEATURE_CONTROL (0x3a): its VMX/SMX lock bits are about nested
//!   virtualization, which is not supported, and PVM hosts refuse to
//!   restore it.
//! - MSR_PVM_LINEAR_ADDRESS_RANGE (0x4b564df0): set from the host's own
//!   address-space reservation, so it is not the guest's to carry to
//!   another host (a restore there can fail). The other PVM guest-ABI MSRs
//!   (0x4b564df1..) are guest state and are kept when the host lists them.
//! - MSRs already in another part of the state (APIC base, EFER, FS/GS
//!   base are in `sregs`; the x2APIC registers 0x800.. are in `lapic`, and
//!   writing some of them, EOI or ICR, has side effects).
//! - Performance-monitoring MSRs (counters, event selects,
//!   IA32_PERF_CAPABILITIES): the CPUID hides the PMU from guests
//!   (`cpuid::configure`).
//! - Nested-virtualization MSRs (VMX capabilities, VM_CR, VM_HSAVE_PA,
//!   TSC_RATIO) and Hyper-V MSRs (no Hyper-V CPUID is shown).
//! - Read-only capability MSRs (MTRRCAP, MCG_CAP) and write-only commands
//!   (PRED_CMD, FLUSH_CMD).
//!
//! KVM_CAP_XSAVE2 and KVM_CAP_TSC_CONTROL are read once per process, from
//! the handle given to [`prepare`] or else from `/dev/kvm` opened at the
//! first save or restore.
//!
//! # Nested state
//!
//! Not saved. KVM_CAP_NESTED_STATE is 0 on PVM hosts (KVM_GET_NESTED_STATE
//! fails with EINVAL; calling it unconditionally is why Cloud Hypervisor
//! cannot save VMs there). On hosts where it is non-zero, a guest that
//! runs its own VMs is not supported yet: [`save`] refuses a vCPU in VMX
//! operation (CR4.VMXE) or with SVM enabled (EFER.SVME), whose nested
//! state would otherwise be lost.
//!
//! # Order
//!
//! Save (after Firecracker's findings):
//! 1. MP state first: KVM_GET_MP_STATE runs `kvm_apic_accept_events()`,
//!    which may change the vCPU and local APIC state read afterwards.
//! 2. regs, sregs, xsave, xcrs, debugregs.
//! 3. lapic (KVM_GET_LAPIC itself may update the APIC state it returns).
//! 4. TSC frequency, CPUID, MSRs.
//! 5. vcpu_events last: the other GET ioctls may change pending events.
//!
//! Restore:
//! 1. CPUID first: what KVM accepts in the ioctls that follow depends on
//!    it (XSAVE features, MSRs, the BSP checks).
//! 2. TSC frequency, before the TSC MSR is written (see below).
//! 3. MP state, then regs (KVM_SET_REGS drops pending exceptions, so it
//!    must come before the events), then sregs (they carry the APIC base
//!    and a pending interrupt), xsave, xcrs, debugregs.
//! 4. lapic after sregs (KVM_SET_SREGS sets the APIC base that
//!    KVM_SET_LAPIC depends on) and before the MSRs (IA32_TSC_DEADLINE only
//!    takes effect with the local APIC timer in TSC-deadline mode).
//! 5. MSRs, ascending, with IA32_TSC_DEADLINE in a last KVM_SET_MSRS call of
//!    its own so that it is written after IA32_TSC.
//! 6. vcpu_events last, with KVM_VCPUEVENT_VALID_NMI_PENDING and
//!    KVM_VCPUEVENT_VALID_SIPI_VECTOR added (KVM_GET_VCPU_EVENTS does not
//!    set them, and without them KVM ignores a pending NMI and the SIPI
//!    vector).
//! 7. KVM_KVMCLOCK_CTRL, so that a guest using kvmclock learns it was
//!    stopped and does not report soft lockups; it fails harmlessly
//!    (logged at debug) when the guest has no kvmclock.
//!
//! If KVM_SET_MSRS sets fewer MSRs than it was given, [`restore`] fails
//! with the first refused MSR named ([`VcpuStateError::MsrRefused`]);
//! nothing is silently dropped.
//!
//! # TSC
//!
//! The saved TSC frequency is compared with this host's (within 250 ppm,
//! as calibrations differ). When they differ, the vCPU is set to the saved
//! frequency if KVM can scale the TSC (KVM_CAP_TSC_CONTROL); otherwise (it
//! is 0 on PVM hosts) the restore goes on with a warning: the guest's
//! clock may drift.
//!
//! One more of Firecracker's findings: a TSC-deadline timer that expired
//! while the vCPU was out of KVM_RUN can be saved with IA32_TSC_DEADLINE
//! already 0 and the interrupt not yet in the local APIC, so the guest
//! would never get it. When the saved local APIC timer is unmasked in
//! TSC-deadline mode and the saved deadline is 0, [`restore`] writes the
//! saved TSC as the deadline: the timer then fires at once. At worst the
//! guest gets one spurious timer interrupt, which guests tolerate. The
//! saved state itself is kept as KVM returned it.

use super::msr::{
    MSR_CSTAR, MSR_IA32_MISC_ENABLE, MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_EIP,
    MSR_IA32_SYSENTER_ESP, MSR_IA32_TSC, MSR_KERNEL_GS_BASE, MSR_LSTAR, MSR_MTRR_DEF_TYPE,
    MSR_STAR, MSR_SYSCALL_MASK,
};
use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES, KVM_VCPUEVENT_VALID_NMI_PENDING,
    KVM_VCPUEVENT_VALID_SIPI_VECTOR, Msrs, Xsave, kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state,
    kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use serde::{Deserialize, Serialize};
use std::sync::OnceLock;

/// An MSR and its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Msr {
    pub index: u32,
    pub value: u64,
}

/// Everything needed to resume a vCPU exactly where it was.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The XSAVE area as KVM gave it: 4096 bytes (`struct kvm_xsave`), or
    /// the KVM_CAP_XSAVE2 size where that is larger (AMX), in the host's
    /// (little-endian) byte order.
    pub xsave: Vec<u8>,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub vcpu_events: kvm_vcpu_events,
    /// The CPUID the vCPU was given (KVM_GET_CPUID2).
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// The vCPU's TSC frequency in kHz (KVM_GET_TSC_KHZ).
    pub tsc_khz: u32,
    /// The saved MSRs, in ascending index order, each once.
    pub msrs: Vec<Msr>,
}

impl VcpuState {
    /// The saved value of an MSR.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|m| m.index == index).map(|m| m.value)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("cannot open /dev/kvm to read KVM's capabilities")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM refused to report {what} ({ioctl})")]
    Get {
        what: &'static str,
        ioctl: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM refused to restore {what} ({ioctl})")]
    Set {
        what: &'static str,
        ioctl: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(
        "KVM refused to restore MSR {} (value {value:#x}): KVM_SET_MSRS set {set} of the {wanted} \
         MSRs of its call",
        MsrLabel(*index)
    )]
    MsrRefused {
        index: u32,
        value: u64,
        set: usize,
        wanted: usize,
    },
    #[error("the guest uses nested virtualization ({0}), whose state snapshots do not save yet")]
    NestedGuest(&'static str),
    #[error("the saved XSAVE state is {0} bytes; KVM's is at least 4096 bytes, in 4-byte words")]
    XsaveSize(usize),
    #[error("the saved CPUID has {0} entries, more than KVM takes ({KVM_MAX_CPUID_ENTRIES})")]
    CpuidSize(usize),
}

/// "0x3a (IA32_FEATURE_CONTROL)", or just the number for MSRs without a
/// well-known name.
struct MsrLabel(u32);

impl std::fmt::Display for MsrLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match msr_name(self.0) {
            Some(name) => write!(f, "{:#x} ({name})", self.0),
            None => write!(f, "{:#x}", self.0),
        }
    }
}

fn get_err(
    what: &'static str,
    ioctl: &'static str,
) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Get {
        what,
        ioctl,
        source,
    }
}

fn set_err(
    what: &'static str,
    ioctl: &'static str,
) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Set {
        what,
        ioctl,
        source,
    }
}

const MSR_IA32_FEATURE_CONTROL: u32 = 0x3a;
const MSR_IA32_MTRRCAP: u32 = 0xfe;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
const MSR_PVM_LINEAR_ADDRESS_RANGE: u32 = 0x4b56_4df0;
/// The first variable-range MTRR (PHYSBASE0; PHYSMASK0 follows).
const MSR_MTRR_PHYSBASE0: u32 = 0x200;
/// The fixed-range MTRRs.
const MTRR_FIXED: [u32; 11] = [
    0x250, 0x258, 0x259, 0x268, 0x269, 0x26a, 0x26b, 0x26c, 0x26d, 0x26e, 0x26f,
];

/// Written in a KVM_SET_MSRS call of their own, after all the others.
const DEFERRED_MSRS: [u32; 1] = [MSR_IA32_TSC_DEADLINE];

/// An inclusive range of MSR indices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsrRange {
    pub first: u32,
    pub last: u32,
}

const fn one(index: u32) -> MsrRange {
    MsrRange {
        first: index,
        last: index,
    }
}

const fn range(first: u32, last: u32) -> MsrRange {
    MsrRange { first, last }
}

/// The MSRs that are saved when KVM lists them, ascending. Each is guest
/// state that no other part of [`VcpuState`] holds.
pub const SERIALIZABLE_MSRS: &[MsrRange] = &[
    // IA32_TSC; MSR_KVM_WALL_CLOCK and MSR_KVM_SYSTEM_TIME (the first
    // kvmclock interface, still used by old guests).
    range(MSR_IA32_TSC, 0x12),
    // MSR_SMI_COUNT: a counter the guest can read.
    one(0x34),
    // IA32_TSC_ADJUST: the guest's own TSC adjustment.
    one(0x3b),
    // IA32_SPEC_CTRL: the guest's speculation controls (IBRS, STIBP, SSBD).
    one(0x48),
    // IA32_UCODE_REV: the microcode revision the guest was shown.
    one(0x8b),
    // IA32_SMBASE: where the guest's SMM state lives.
    one(0x9e),
    // MSR_PLATFORM_INFO: CPUID-faulting support the guest was shown.
    one(0xce),
    // IA32_UMWAIT_CONTROL: the guest's UMWAIT limits.
    one(0xe1),
    // IA32_ARCH_CAPABILITIES: the mitigations the guest was told it does
    // not need; a host that cannot show the same refuses the restore.
    one(0x10a),
    // IA32_TSX_CTRL: the guest's TSX setting.
    one(0x122),
    // MSR_MISC_FEATURES_ENABLES: CPUID faulting, when the guest enabled it.
    one(0x140),
    // IA32_SYSENTER_CS/ESP/EIP: the 32-bit system call entry.
    range(MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_EIP),
    // IA32_MCG_STATUS, IA32_MCG_CTL: machine-check state the guest set.
    range(0x17a, 0x17b),
    // IA32_MISC_ENABLE: fast strings, MWAIT, and the other enables.
    one(MSR_IA32_MISC_ENABLE),
    // IA32_XFD, IA32_XFD_ERR: extended feature disable (AMX).
    range(0x1c4, 0x1c5),
    // IA32_DEBUGCTL: branch tracing and single-step on branches.
    one(0x1d9),
    // The last-branch and last-interrupt from/to records.
    range(0x1db, 0x1de),
    // MSR_IA32_POWER_CTL: the guest's C1E setting.
    one(0x1fc),
    // The variable and fixed-range MTRRs, IA32_PAT (0x277) and
    // IA32_MTRR_DEF_TYPE (0x2ff): the guest's memory types.
    range(MSR_MTRR_PHYSBASE0, MSR_MTRR_DEF_TYPE),
    // IA32_MCG_EXT_CTL: local machine-check enable.
    one(0x4d0),
    // Intel Processor Trace: output base and mask, control, status, CR3
    // match, address ranges (listed only where the guest can have it).
    range(0x560, 0x561),
    range(0x570, 0x572),
    range(0x580, 0x587),
    // CET: IA32_U_CET, IA32_S_CET, the shadow-stack pointers of rings 0-3
    // and the interrupt SSP table.
    one(0x6a0),
    one(0x6a2),
    range(0x6a4, 0x6a8),
    // IA32_TSC_DEADLINE: the local APIC timer in TSC-deadline mode.
    // Restored last, after IA32_TSC.
    one(MSR_IA32_TSC_DEADLINE),
    // IA32_BNDCFGS: MPX in supervisor mode.
    one(0xd90),
    // IA32_XSS: the supervisor XSAVE components enabled (without it the
    // guest's XRSTORS of CET or PT state faults).
    one(0xda0),
    // KVM's paravirtual MSRs: kvmclock, async page faults, steal time,
    // PV EOI, poll control, migration control.
    range(0x4b56_4d00, 0x4b56_4def),
    // PVM's guest-ABI MSRs (its per-vCPU structure, event entry, return
    // addresses), but not MSR_PVM_LINEAR_ADDRESS_RANGE (0x4b564df0): see
    // the module documentation.
    range(MSR_PVM_LINEAR_ADDRESS_RANGE + 1, 0x4b56_4dff),
    // STAR, LSTAR, CSTAR, SFMASK: the 64-bit system call entry.
    range(MSR_STAR, MSR_SYSCALL_MASK),
    // KERNEL_GS_BASE (what SWAPGS swaps in) and TSC_AUX (RDTSCP/RDPID).
    range(MSR_KERNEL_GS_BASE, 0xc000_0103),
    // AMD HWCR: the guest's hardware configuration bits.
    one(0xc001_0015),
    // AMD VIRT_SPEC_CTRL: the guest's SSBD setting on AMD.
    one(0xc001_011f),
];

/// Whether an MSR that KVM lists is saved.
pub fn is_serializable(index: u32) -> bool {
    SERIALIZABLE_MSRS
        .iter()
        .any(|r| r.first <= index && index <= r.last)
}

/// The well-known name of an MSR, for error messages.
pub fn msr_name(index: u32) -> Option<&'static str> {
    Some(match index {
        0x10 => "IA32_TSC",
        0x11 => "MSR_KVM_WALL_CLOCK",
        0x12 => "MSR_KVM_SYSTEM_TIME",
        0x1b => "IA32_APIC_BASE",
        0x34 => "MSR_SMI_COUNT",
        MSR_IA32_FEATURE_CONTROL => "IA32_FEATURE_CONTROL",
        0x3b => "IA32_TSC_ADJUST",
        0x48 => "IA32_SPEC_CTRL",
        0x8b => "IA32_UCODE_REV",
        0x9e => "IA32_SMBASE",
        0xce => "MSR_PLATFORM_INFO",
        0xe1 => "IA32_UMWAIT_CONTROL",
        MSR_IA32_MTRRCAP => "IA32_MTRRCAP",
        0x10a => "IA32_ARCH_CAPABILITIES",
        0x122 => "IA32_TSX_CTRL",
        0x140 => "MSR_MISC_FEATURES_ENABLES",
        MSR_IA32_SYSENTER_CS => "IA32_SYSENTER_CS",
        MSR_IA32_SYSENTER_ESP => "IA32_SYSENTER_ESP",
        MSR_IA32_SYSENTER_EIP => "IA32_SYSENTER_EIP",
        0x179 => "IA32_MCG_CAP",
        0x17a => "IA32_MCG_STATUS",
        0x17b => "IA32_MCG_CTL",
        MSR_IA32_MISC_ENABLE => "IA32_MISC_ENABLE",
        0x1c4 => "IA32_XFD",
        0x1c5 => "IA32_XFD_ERR",
        0x1d9 => "IA32_DEBUGCTL",
        0x1db => "MSR_LASTBRANCHFROMIP",
        0x1dc => "MSR_LASTBRANCHTOIP",
        0x1dd => "MSR_LASTINTFROMIP",
        0x1de => "MSR_LASTINTTOIP",
        0x1fc => "MSR_IA32_POWER_CTL",
        0x200..=0x21f if index.is_multiple_of(2) => "IA32_MTRR_PHYSBASEn",
        0x200..=0x21f => "IA32_MTRR_PHYSMASKn",
        0x250 => "IA32_MTRR_FIX64K_00000",
        0x258 => "IA32_MTRR_FIX16K_80000",
        0x259 => "IA32_MTRR_FIX16K_A0000",
        0x268..=0x26f => "IA32_MTRR_FIX4K_xxxxx",
        0x277 => "IA32_PAT",
        MSR_MTRR_DEF_TYPE => "IA32_MTRR_DEF_TYPE",
        0x345 => "IA32_PERF_CAPABILITIES",
        0x4d0 => "IA32_MCG_EXT_CTL",
        0x6e0 => "IA32_TSC_DEADLINE",
        0xd90 => "IA32_BNDCFGS",
        0xda0 => "IA32_XSS",
        0xc000_0080 => "IA32_EFER",
        MSR_STAR => "MSR_STAR",
        MSR_LSTAR => "MSR_LSTAR",
        MSR_CSTAR => "MSR_CSTAR",
        MSR_SYSCALL_MASK => "MSR_SYSCALL_MASK",
        0xc000_0100 => "MSR_FS_BASE",
        0xc000_0101 => "MSR_GS_BASE",
        MSR_KERNEL_GS_BASE => "MSR_KERNEL_GS_BASE",
        0xc000_0103 => "MSR_TSC_AUX",
        0xc001_0015 => "MSR_K7_HWCR",
        0xc001_0117 => "MSR_VM_HSAVE_PA",
        0xc001_011f => "MSR_AMD64_VIRT_SPEC_CTRL",
        0x4b56_4d00 => "MSR_KVM_WALL_CLOCK_NEW",
        0x4b56_4d01 => "MSR_KVM_SYSTEM_TIME_NEW",
        0x4b56_4d02 => "MSR_KVM_ASYNC_PF_EN",
        0x4b56_4d03 => "MSR_KVM_STEAL_TIME",
        0x4b56_4d04 => "MSR_KVM_PV_EOI_EN",
        0x4b56_4d05 => "MSR_KVM_POLL_CONTROL",
        0x4b56_4d06 => "MSR_KVM_ASYNC_PF_INT",
        0x4b56_4d07 => "MSR_KVM_ASYNC_PF_ACK",
        0x4b56_4d08 => "MSR_KVM_MIGRATION_CONTROL",
        MSR_PVM_LINEAR_ADDRESS_RANGE => "MSR_PVM_LINEAR_ADDRESS_RANGE",
        0x4b56_4df1 => "MSR_PVM_VCPU_STRUCT",
        0x4b56_4df4 => "MSR_PVM_EVENT_ENTRY",
        0x4b56_4df5 => "MSR_PVM_RETU_RIP",
        0x4b56_4df6 => "MSR_PVM_RETS_RIP",
        _ => return None,
    })
}

/// What the host's KVM can do, read once per process.
#[derive(Debug, Clone, Copy)]
struct HostCaps {
    /// The size of the XSAVE area KVM_GET_XSAVE2 writes (at least 4096).
    xsave_size: usize,
    /// Whether KVM can run a vCPU at a TSC frequency not the host's.
    tsc_scaling: bool,
}

static HOST_CAPS: OnceLock<HostCaps> = OnceLock::new();

impl HostCaps {
    fn of(kvm: &Kvm) -> HostCaps {
        let xsave2 = kvm.check_extension_int(Cap::Xsave2);
        HostCaps {
            xsave_size: usize::try_from(xsave2)
                .unwrap_or(0)
                .max(std::mem::size_of::<kvm_xsave>()),
            tsc_scaling: kvm.check_extension(Cap::TscControl),
        }
    }

    fn get() -> Result<HostCaps, VcpuStateError> {
        if let Some(caps) = HOST_CAPS.get() {
            return Ok(*caps);
        }
        let kvm = Kvm::new().map_err(VcpuStateError::OpenKvm)?;
        Ok(*HOST_CAPS.get_or_init(|| HostCaps::of(&kvm)))
    }
}

/// Reads the host's KVM capabilities that [`save`] and [`restore`] need
/// from the VMM's own `/dev/kvm` handle. Optional: without it, the first
/// save or restore opens `/dev/kvm` once to read them.
pub fn prepare(kvm: &Kvm) {
    HOST_CAPS.get_or_init(|| HostCaps::of(kvm));
}

/// The MSRs [`save`] reads: those of `msr_index_list` that are
/// serializable, and the MTRRs when `cpuid` has them (`mtrr_count` is
/// IA32_MTRRCAP's count of variable ranges), ascending, each once.
pub fn msrs_to_save(
    msr_index_list: &[u32],
    cpuid: &[kvm_cpuid_entry2],
    mtrr_count: u8,
) -> Vec<u32> {
    let mut indices: Vec<u32> = msr_index_list
        .iter()
        .copied()
        .filter(|&i| is_serializable(i))
        .collect();
    if has_mtrr(cpuid) {
        indices.push(MSR_MTRR_DEF_TYPE);
        indices.extend(MTRR_FIXED);
        indices.extend((0..2 * u32::from(mtrr_count)).map(|i| MSR_MTRR_PHYSBASE0 + i));
    }
    indices.sort_unstable();
    indices.dedup();
    indices
}

/// CPUID.1:EDX.MTRR.
fn has_mtrr(cpuid: &[kvm_cpuid_entry2]) -> bool {
    cpuid
        .iter()
        .any(|e| e.function == 1 && e.edx & (1 << 12) != 0)
}

const CR4_VMXE: u64 = 1 << 13;
const EFER_SVME: u64 = 1 << 12;

/// Reads the state of a vCPU that is not running (its thread paused, or
/// before it ran). `msr_index_list` is KVM_GET_MSR_INDEX_LIST's answer.
pub fn save(fd: &VcpuFd, msr_index_list: &[u32]) -> Result<VcpuState, VcpuStateError> {
    let caps = HostCaps::get()?;
    let mp_state = fd
        .get_mp_state()
        .map_err(get_err("the MP state", "KVM_GET_MP_STATE"))?;
    let regs = fd
        .get_regs()
        .map_err(get_err("the registers", "KVM_GET_REGS"))?;
    let sregs = fd
        .get_sregs()
        .map_err(get_err("the segment registers", "KVM_GET_SREGS"))?;
    if sregs.cr4 & CR4_VMXE != 0 {
        return Err(VcpuStateError::NestedGuest("CR4.VMXE is set"));
    }
    if sregs.efer & EFER_SVME != 0 {
        return Err(VcpuStateError::NestedGuest("EFER.SVME is set"));
    }
    let xsave = get_xsave(fd, caps.xsave_size)?;
    let xcrs = fd.get_xcrs().map_err(get_err("the XCRs", "KVM_GET_XCRS"))?;
    let debugregs = fd
        .get_debug_regs()
        .map_err(get_err("the debug registers", "KVM_GET_DEBUGREGS"))?;
    let lapic = fd
        .get_lapic()
        .map_err(get_err("the local APIC", "KVM_GET_LAPIC"))?;
    let tsc_khz = fd
        .get_tsc_khz()
        .map_err(get_err("the TSC frequency", "KVM_GET_TSC_KHZ"))?;
    let cpuid = get_cpuid(fd)?;
    let mtrr_count = if has_mtrr(&cpuid) {
        let cap = read_msrs(fd, &[MSR_IA32_MTRRCAP])?;
        cap.first().map(|m| m.value as u8).unwrap_or(0)
    } else {
        0
    };
    let msrs = read_msrs(fd, &msrs_to_save(msr_index_list, &cpuid, mtrr_count))?;
    let vcpu_events = fd
        .get_vcpu_events()
        .map_err(get_err("the pending events", "KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        regs,
        sregs,
        xsave,
        xcrs,
        debugregs,
        lapic,
        mp_state,
        vcpu_events,
        cpuid,
        tsc_khz,
        msrs,
    })
}

/// Writes a saved state into a vCPU that has not run yet, in the order
/// the module documentation gives.
pub fn restore(fd: &VcpuFd, state: &VcpuState) -> Result<(), VcpuStateError> {
    let caps = HostCaps::get()?;
    let cpuid = CpuId::from_entries(&state.cpuid)
        .map_err(|_| VcpuStateError::CpuidSize(state.cpuid.len()))?;
    fd.set_cpuid2(&cpuid)
        .map_err(set_err("the CPUID", "KVM_SET_CPUID2"))?;
    restore_tsc_khz(fd, state.tsc_khz, caps)?;
    fd.set_mp_state(state.mp_state)
        .map_err(set_err("the MP state", "KVM_SET_MP_STATE"))?;
    fd.set_regs(&state.regs)
        .map_err(set_err("the registers", "KVM_SET_REGS"))?;
    fd.set_sregs(&state.sregs)
        .map_err(set_err("the segment registers", "KVM_SET_SREGS"))?;
    set_xsave(fd, &state.xsave, caps.xsave_size)?;
    fd.set_xcrs(&state.xcrs)
        .map_err(set_err("the XCRs", "KVM_SET_XCRS"))?;
    fd.set_debug_regs(&state.debugregs)
        .map_err(set_err("the debug registers", "KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&state.lapic)
        .map_err(set_err("the local APIC", "KVM_SET_LAPIC"))?;
    let (first, deferred) = msrs_in_restore_order(state);
    write_msrs(fd, &first)?;
    write_msrs(fd, &deferred)?;
    let mut events = state.vcpu_events;
    events.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR;
    fd.set_vcpu_events(&events)
        .map_err(set_err("the pending events", "KVM_SET_VCPU_EVENTS"))?;
    if let Err(e) = fd.kvmclock_ctrl() {
        tracing::debug!("KVM_KVMCLOCK_CTRL failed ({e}): the guest has no kvmclock");
    }
    Ok(())
}

/// TSC frequencies within this many parts per million are the same.
const TSC_KHZ_TOLERANCE_PPM: u64 = 250;

fn restore_tsc_khz(fd: &VcpuFd, saved: u32, caps: HostCaps) -> Result<(), VcpuStateError> {
    let here = fd
        .get_tsc_khz()
        .map_err(get_err("the TSC frequency", "KVM_GET_TSC_KHZ"))?;
    let diff = u64::from(here.abs_diff(saved));
    if diff * 1_000_000 <= u64::from(saved) * TSC_KHZ_TOLERANCE_PPM {
        return Ok(());
    }
    if caps.tsc_scaling {
        fd.set_tsc_khz(saved)
            .map_err(set_err("the TSC frequency", "KVM_SET_TSC_KHZ"))
    } else {
        tracing::warn!(
            "the snapshot's TSC ran at {saved} kHz and this host's runs at {here} kHz, and KVM \
             cannot scale it here (no KVM_CAP_TSC_CONTROL): the guest's clock may drift"
        );
        Ok(())
    }
}

/// The saved MSRs split into the main KVM_SET_MSRS list and the deferred
/// one, with the TSC-deadline fix of the module documentation applied.
fn msrs_in_restore_order(state: &VcpuState) -> (Vec<Msr>, Vec<Msr>) {
    let (deferred, first): (Vec<Msr>, Vec<Msr>) = state
        .msrs
        .iter()
        .copied()
        .partition(|m| DEFERRED_MSRS.contains(&m.index));
    let tsc = state.msr(MSR_IA32_TSC);
    let deferred = deferred
        .into_iter()
        .map(|mut m| {
            let expired = m.index == MSR_IA32_TSC_DEADLINE
                && m.value == 0
                && lapic_timer_armable(&state.lapic);
            if let Some(tsc) = tsc.filter(|_| expired) {
                tracing::debug!(
                    "IA32_TSC_DEADLINE was saved as 0 with the timer unmasked in \
                     TSC-deadline mode; restoring it as the saved TSC {tsc:#x}"
                );
                m.value = tsc;
            }
            m
        })
        .collect();
    (first, deferred)
}

const APIC_LVTT: usize = 0x320;
const LVT_MASKED: u32 = 1 << 16;
const LVTT_MODE_MASK: u32 = 3 << 17;
const LVTT_MODE_TSC_DEADLINE: u32 = 2 << 17;

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let mut b = [0u8; 4];
    for (d, s) in b.iter_mut().zip(&lapic.regs[offset..offset + 4]) {
        *d = *s as u8;
    }
    u32::from_le_bytes(b)
}

/// The local APIC timer is unmasked and in TSC-deadline mode.
fn lapic_timer_armable(lapic: &kvm_lapic_state) -> bool {
    let lvtt = lapic_reg(lapic, APIC_LVTT);
    lvtt & LVT_MASKED == 0 && lvtt & LVTT_MODE_MASK == LVTT_MODE_TSC_DEADLINE
}

/// KVM_GET_CPUID2, without the zeroed entries that follow the real ones
/// when KVM leaves the entry count as it was given.
fn get_cpuid(fd: &VcpuFd) -> Result<Vec<kvm_cpuid_entry2>, VcpuStateError> {
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(get_err("the CPUID", "KVM_GET_CPUID2"))?;
    Ok(cpuid
        .as_slice()
        .iter()
        .filter(|e| !(e.function == 0 && e.index == 0 && e.flags == 0 && e.eax == 0))
        .copied()
        .collect())
}

/// Reads `indices` in chunks KVM takes. An MSR KVM refuses is logged and
/// left out; the rest are read.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<Msr>, VcpuStateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        // The chunk is at most KVM_MAX_MSR_ENTRIES long.
        let mut msrs = Msrs::from_entries(&entries).expect("a chunk within KVM_MAX_MSR_ENTRIES");
        let read = fd
            .get_msrs(&mut msrs)
            .map_err(get_err("the MSRs", "KVM_GET_MSRS"))?
            .min(chunk.len());
        out.extend(msrs.as_slice()[..read].iter().map(|e| Msr {
            index: e.index,
            value: e.data,
        }));
        if read < chunk.len() {
            tracing::debug!(
                "KVM cannot read MSR {}; it is not saved",
                MsrLabel(chunk[read])
            );
            rest = &rest[read + 1..];
        } else {
            rest = &rest[read..];
        }
    }
    Ok(out)
}

/// Writes `msrs` in chunks KVM takes; the first MSR KVM refuses ends the
/// restore with its name.
fn write_msrs(fd: &VcpuFd, msrs: &[Msr]) -> Result<(), VcpuStateError> {
    for chunk in msrs.chunks(KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.value,
                ..Default::default()
            })
            .collect();
        let kvm = Msrs::from_entries(&entries).expect("a chunk within KVM_MAX_MSR_ENTRIES");
        let set = fd
            .set_msrs(&kvm)
            .map_err(set_err("the MSRs", "KVM_SET_MSRS"))?;
        if set < chunk.len() {
            return Err(VcpuStateError::MsrRefused {
                index: chunk[set].index,
                value: chunk[set].value,
                set,
                wanted: chunk.len(),
            });
        }
    }
    Ok(())
}

/// 4-byte words beyond `struct kvm_xsave` for an XSAVE area of `size`
/// bytes.
fn xsave_extra_words(size: usize) -> usize {
    size.saturating_sub(std::mem::size_of::<kvm_xsave>())
        .div_ceil(4)
}

fn get_xsave(fd: &VcpuFd, host_size: usize) -> Result<Vec<u8>, VcpuStateError> {
    if host_size <= std::mem::size_of::<kvm_xsave>() {
        let xsave = fd
            .get_xsave()
            .map_err(get_err("the xsave state", "KVM_GET_XSAVE"))?;
        return Ok(words_to_bytes(&xsave.region));
    }
    // The wrapper holds `struct kvm_xsave` and the extra words after it.
    let mut xsave = Xsave::new(xsave_extra_words(host_size))
        .map_err(|_| VcpuStateError::XsaveSize(host_size))?;
    // SAFETY: `xsave` has room for the KVM_CAP_XSAVE2 size of this host,
    // which is what KVM_GET_XSAVE2 writes.
    unsafe { fd.get_xsave2(&mut xsave) }.map_err(get_err("the xsave state", "KVM_GET_XSAVE2"))?;
    let area = xsave.as_fam_struct_ref();
    let mut bytes = words_to_bytes(&area.xsave.region);
    bytes.extend(words_to_bytes(xsave.as_slice()));
    Ok(bytes)
}

fn set_xsave(fd: &VcpuFd, bytes: &[u8], host_size: usize) -> Result<(), VcpuStateError> {
    let base = std::mem::size_of::<kvm_xsave>();
    if bytes.len() < base || !bytes.len().is_multiple_of(4) {
        return Err(VcpuStateError::XsaveSize(bytes.len()));
    }
    let mut words = bytes
        .chunks_exact(4)
        .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
    if bytes.len() == base && host_size <= base {
        let mut xsave = kvm_xsave::default();
        for (d, s) in xsave.region.iter_mut().zip(&mut words) {
            *d = s;
        }
        // SAFETY: KVM reads at most this host's KVM_CAP_XSAVE2 size, which
        // is at most the 4096 bytes of `struct kvm_xsave`.
        return unsafe { fd.set_xsave(&xsave) }
            .map_err(set_err("the xsave state", "KVM_SET_XSAVE"));
    }
    // Room for the larger of the saved area and what this host's KVM
    // reads; components the snapshot does not have stay zero, and its
    // XSTATE_BV leaves them in their initial state.
    let mut xsave = Xsave::new(xsave_extra_words(bytes.len().max(host_size)))
        .map_err(|_| VcpuStateError::XsaveSize(bytes.len()))?;
    // SAFETY: only the fixed part is written, not the length of the
    // extra words that the wrapper relies on.
    let area = unsafe { xsave.as_mut_fam_struct() };
    for (d, s) in area.xsave.region.iter_mut().zip(&mut words) {
        *d = s;
    }
    for (d, s) in xsave.as_mut_slice().iter_mut().zip(&mut words) {
        *d = s;
    }
    // SAFETY: `xsave` has room for at least this host's KVM_CAP_XSAVE2
    // size, which is all that KVM_SET_XSAVE reads.
    unsafe { fd.set_xsave2(&xsave) }.map_err(set_err("the xsave state", "KVM_SET_XSAVE"))
}

fn words_to_bytes(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_specific_and_refused_msrs_are_never_saved() {
        for index in [MSR_IA32_FEATURE_CONTROL, MSR_PVM_LINEAR_ADDRESS_RANGE] {
            assert!(!is_serializable(index), "{index:#x}");
        }
        // In sregs or lapic, PMU, nested, read-only.
        for index in [
            0x1b,
            0xc000_0080,
            0xc000_0100,
            0x802,
            0x80b,
            0xc1,
            0x186,
            0x309,
            0x38f,
            0x345,
            0x480,
            0xc001_0117,
            0xc000_0104,
            MSR_IA32_MTRRCAP,
            0x179,
            0x4000_0000,
        ] {
            assert!(!is_serializable(index), "{index:#x}");
        }
        for index in [
            MSR_IA32_TSC,
            MSR_IA32_TSC_DEADLINE,
            0x3b,
            0x277,
            MSR_MTRR_DEF_TYPE,
            MSR_LSTAR,
            MSR_KERNEL_GS_BASE,
            0x4b56_4d01,
            0x4b56_4df1,
        ] {
            assert!(is_serializable(index), "{index:#x}");
        }
    }

    #[test]
    fn ranges_are_ascending_and_disjoint() {
        for w in SERIALIZABLE_MSRS.windows(2) {
            assert!(w[0].first <= w[0].last && w[0].last < w[1].first, "{w:x?}");
        }
    }

    fn cpuid_with_mtrr() -> Vec<kvm_cpuid_entry2> {
        vec![kvm_cpuid_entry2 {
            function: 1,
            edx: 1 << 12,
            ..Default::default()
        }]
    }

    #[test]
    fn mtrrs_are_added_when_the_cpuid_has_them() {
        let listed = [0x4b56_4df0, MSR_IA32_TSC_DEADLINE, 0x10, 0x3a, 0x277, 0x10];
        let plain = msrs_to_save(&listed, &[], 8);
        assert_eq!(plain, vec![0x10, 0x277, MSR_IA32_TSC_DEADLINE]);
        let with = msrs_to_save(&listed, &cpuid_with_mtrr(), 8);
        assert_eq!(with.len(), 3 + 1 + 11 + 16);
        assert!(with.contains(&0x20f) && !with.contains(&0x210));
        assert!(with.windows(2).all(|w| w[0] < w[1]));
    }

    fn state_with(msrs: &[(u32, u64)], lvtt: u32) -> VcpuState {
        let mut lapic = kvm_lapic_state { regs: [0; 1024] };
        for (d, s) in lapic.regs[APIC_LVTT..APIC_LVTT + 4]
            .iter_mut()
            .zip(lvtt.to_le_bytes())
        {
            *d = s as _;
        }
        VcpuState {
            regs: Default::default(),
            sregs: Default::default(),
            xsave: vec![0; 4096],
            xcrs: Default::default(),
            debugregs: Default::default(),
            lapic,
            mp_state: Default::default(),
            vcpu_events: Default::default(),
            cpuid: Vec::new(),
            tsc_khz: 1,
            msrs: msrs
                .iter()
                .map(|&(index, value)| Msr { index, value })
                .collect(),
        }
    }

    #[test]
    fn tsc_deadline_goes_last_and_an_expired_one_fires_at_once() {
        let msrs = [(0x10, 5000), (0x3b, 7), (0x6e0, 0), (0xc000_0082, 9)];
        let deadline_mode = LVTT_MODE_TSC_DEADLINE | 0xec;
        let (first, deferred) = msrs_in_restore_order(&state_with(&msrs, deadline_mode));
        let idx: Vec<u32> = first.iter().map(|m| m.index).collect();
        assert_eq!(idx, vec![0x10, 0x3b, 0xc000_0082]);
        assert_eq!(
            deferred,
            vec![Msr {
                index: 0x6e0,
                value: 5000
            }]
        );
        // Masked, or one-shot: kept as saved.
        for lvtt in [deadline_mode | LVT_MASKED, 0xec] {
            let (_, deferred) = msrs_in_restore_order(&state_with(&msrs, lvtt));
            assert_eq!(deferred[0].value, 0);
        }
        // An armed deadline is kept.
        let armed = [(0x10, 5000), (0x6e0, 6000)];
        let (_, deferred) = msrs_in_restore_order(&state_with(&armed, deadline_mode));
        assert_eq!(deferred[0].value, 6000);
    }

    #[test]
    fn refused_msrs_are_named() {
        let e = VcpuStateError::MsrRefused {
            index: 0x3a,
            value: 5,
            set: 3,
            wanted: 40,
        };
        assert_eq!(
            e.to_string(),
            "KVM refused to restore MSR 0x3a (IA32_FEATURE_CONTROL) (value 0x5): KVM_SET_MSRS \
             set 3 of the 40 MSRs of its call"
        );
        let e = VcpuStateError::MsrRefused {
            index: 0xbad_c0de,
            value: 1,
            set: 0,
            wanted: 1,
        };
        assert!(e.to_string().contains("MSR 0xbadc0de (value"), "{e}");
        assert_eq!(msr_name(0x4b56_4df0), Some("MSR_PVM_LINEAR_ADDRESS_RANGE"));
        assert_eq!(msr_name(0x203), Some("IA32_MTRR_PHYSMASKn"));
    }

    #[test]
    fn xsave_sizes() {
        assert_eq!(xsave_extra_words(4096), 0);
        assert_eq!(xsave_extra_words(4096 + 8192 + 64), 2064);
        assert_eq!(xsave_extra_words(4097), 1);
    }

    #[test]
    fn state_survives_json() {
        let mut s = state_with(&[(0x10, u64::MAX), (0x4b56_4d01, 0x1234_5679)], 0x2_00ec);
        s.regs.rip = 0xffff_ffff_8100_0000;
        s.sregs.cr3 = 0x9000;
        s.xsave[24] = 0x80;
        s.cpuid = cpuid_with_mtrr();
        let json = serde_json::to_string(&s).unwrap();
        let back: VcpuState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
    }
}
