//! vCPU state save and restore on real vCPUs: a round trip of known
//! registers and MSRs, the state of a running guest's paused vCPUs taken
//! through `VcpuHandle::save_state`, through serde and into a second VM
//! that goes on where the first stopped, and a refused MSR named.
//!
//! Needs /dev/kvm and, for the guest, the test guest (tests/probe/build.sh).

use devices::{Bus, BusDevice};
use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_HALTED, KVM_PIT_SPEAKER_DUMMY, kvm_debugregs, kvm_fpu,
    kvm_pit_config, kvm_regs, kvm_userspace_memory_region,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm::BootProtocol;
use vmm::loader::{self, Entry};
use vmm::vcpu::{Vcpu, VcpuCommand, VcpuError, VcpuHandle, VcpuState as RunState};
use vmm::x86_64::vcpu_state::{self, Msr, VcpuState, VcpuStateError};
use vmm::x86_64::{boot_params, cpuid, mptable, msr, paging, regs};
use vmm_sys_util::eventfd::EventFd;

const TIMEOUT: Duration = Duration::from_secs(10);
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_PAT: u32 = 0x277;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_MTRR_PHYSBASE0: u32 = 0x200;

fn vm(kvm: &Kvm) -> VmFd {
    let vm = kvm.create_vm().unwrap();
    vm.set_tss_address(vmm::layout::KVM_TSS_START as usize)
        .unwrap();
    vm.create_irq_chip().unwrap();
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .unwrap();
    vm
}

/// A vCPU with the CPUID vmplant gives vCPU `id` of `count`.
fn vcpu(kvm: &Kvm, vm: &VmFd, id: u8, count: u8) -> VcpuFd {
    let fd = vm.create_vcpu(u64::from(id)).unwrap();
    let mut c = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    cpuid::configure(&mut c, id, count).unwrap();
    fd.set_cpuid2(&c).unwrap();
    fd
}

fn set_msrs(fd: &VcpuFd, msrs: &[(u32, u64)]) {
    assert_eq!(fd.set_msrs(&msr::to_kvm(msrs)).unwrap(), msrs.len());
}

/// Compares two saved states field by field, for a readable failure.
fn assert_same(a: &VcpuState, b: &VcpuState) {
    assert_eq!(a.regs, b.regs, "regs");
    assert_eq!(a.sregs, b.sregs, "sregs");
    assert_eq!(a.xsave, b.xsave, "xsave");
    assert_eq!(a.xcrs, b.xcrs, "xcrs");
    assert_eq!(a.debugregs, b.debugregs, "debugregs");
    assert_eq!(a.lapic, b.lapic, "lapic");
    assert_eq!(a.mp_state, b.mp_state, "mp_state");
    assert_eq!(a.vcpu_events, b.vcpu_events, "vcpu_events");
    assert_eq!(a.cpuid, b.cpuid, "cpuid");
    assert_eq!(a.tsc_khz, b.tsc_khz, "tsc_khz");
    assert_eq!(a.msrs, b.msrs, "msrs");
    assert_eq!(a, b);
}

/// The TSC runs: a second save reads a later value. Returns `b` with
/// `a`'s TSC, after checking it did not go back.
fn without_tsc_drift(a: &VcpuState, b: &VcpuState) -> VcpuState {
    let (ta, tb) = (a.msr(MSR_IA32_TSC).unwrap(), b.msr(MSR_IA32_TSC).unwrap());
    assert!(tb >= ta, "the TSC went back from {ta:#x} to {tb:#x}");
    let mut b = b.clone();
    for m in &mut b.msrs {
        if m.index == MSR_IA32_TSC {
            m.value = ta;
        }
    }
    b
}

#[test]
fn a_restored_vcpu_saves_as_it_was_saved() {
    let kvm = Kvm::new().unwrap();
    let list = kvm.get_msr_index_list().unwrap();
    let list = list.as_slice();
    let vm = vm(&kvm);
    let fd = vcpu(&kvm, &vm, 0, 1);
    let has_mtrr = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .unwrap()
        .as_slice()
        .iter()
        .any(|e| e.function == 1 && e.edx & (1 << 12) != 0);

    // Known values everywhere.
    let mem = vmm::memory::create(4 << 20, false).unwrap();
    let mode = regs::EntryMode::Linux64 {
        entry: 0x100_0000,
        boot_params: 0x7000,
        cr3: 0x9000,
    };
    let sregs = regs::boot_sregs(&mem, mode, fd.get_sregs().unwrap()).unwrap();
    fd.set_sregs(&sregs).unwrap();
    let known = kvm_regs {
        rax: 0x1111_2222_3333_4444,
        rbx: 0x5555,
        rcx: 0xdead_beef,
        rdx: 7,
        rsi: 0x7000,
        rdi: 0xffff_ffff_ffff_fff0,
        rsp: 0x8ff0,
        rbp: 0x8ff0,
        r8: 8,
        r15: 0x0f0f_0f0f,
        rip: 0x100_0000,
        rflags: 0x2 | 0x40 | 0x800,
        ..Default::default()
    };
    fd.set_regs(&known).unwrap();
    let known_msrs = [
        (msr::MSR_LSTAR, 0xffff_ffff_8160_0000),
        (msr::MSR_STAR, 0x0023_0010_0000_0000),
        (msr::MSR_SYSCALL_MASK, 0x4_7700),
        (msr::MSR_KERNEL_GS_BASE, 0xffff_8880_1234_5000),
        (msr::MSR_IA32_SYSENTER_ESP, 0x1234_5678),
        (MSR_IA32_PAT, 0x0007_0406_0007_0406),
    ];
    let mut wanted = msr::boot_msrs();
    wanted.retain(|&(i, _)| known_msrs.iter().all(|&(k, _)| k != i));
    wanted.extend(known_msrs);
    if has_mtrr {
        wanted.push((MSR_MTRR_PHYSBASE0, 0x6));
    }
    set_msrs(&fd, &wanted);
    fd.set_fpu(&regs::boot_fpu()).unwrap();
    // XMM0 through the XSAVE area (KVM_SET_FPU leaves XSTATE_BV alone, so
    // its XMM registers do not show), where the area is 4096 bytes.
    let xmm0 = *b"vmplant xmm0 reg";
    let small_xsave = kvm.check_extension_int(Cap::Xsave2) <= 4096;
    if small_xsave {
        let mut xsave = fd.get_xsave().unwrap();
        for (word, bytes) in xsave.region[40..44].iter_mut().zip(xmm0.chunks_exact(4)) {
            *word = u32::from_le_bytes(bytes.try_into().unwrap());
        }
        xsave.region[128] |= 1 << 1; // XSTATE_BV: SSE state present
        // SAFETY: KVM reads no more than KVM_CAP_XSAVE2, 4096 bytes here:
        // the size of `kvm_xsave`.
        unsafe { fd.set_xsave(&xsave) }.unwrap();
    }
    let mut xcrs = fd.get_xcrs().unwrap();
    xcrs.xcrs[0].value = 0x3; // x87 | SSE
    fd.set_xcrs(&xcrs).unwrap();
    let debugregs = kvm_debugregs {
        db: [0x1000, 0x2000, 0x3000, 0x4000],
        dr6: 0xffff_0ff0,
        dr7: 0x401,
        ..Default::default()
    };
    fd.set_debug_regs(&debugregs).unwrap();
    let mut lapic = fd.get_lapic().unwrap();
    regs::configure_lapic(&mut lapic);
    fd.set_lapic(&lapic).unwrap();

    let t = Instant::now();
    let saved = vcpu_state::save(&fd, list).unwrap();
    let first_save = t.elapsed();
    assert_eq!(saved.regs, known);
    assert_eq!(saved.sregs.cr3, 0x9000);
    assert_eq!(saved.debugregs.db, debugregs.db);
    assert_eq!(saved.xcrs.xcrs[0].value, 0x3);
    for &(index, value) in &wanted {
        let mtrr =
            (MSR_MTRR_PHYSBASE0..=MSR_MTRR_DEF_TYPE).contains(&index) && index != MSR_IA32_PAT;
        if index == MSR_IA32_TSC || (mtrr && !has_mtrr) || !vcpu_state::is_serializable(index) {
            continue;
        }
        assert_eq!(saved.msr(index), Some(value), "MSR {index:#x}");
    }
    assert!(saved.msr(0x3a).is_none() && saved.msr(0x4b56_4df0).is_none());
    assert!(saved.xsave.len() >= 4096);
    if small_xsave {
        assert_eq!(saved.xsave[160..176], xmm0);
    }
    assert!(saved.msrs.windows(2).all(|w| w[0].index < w[1].index));

    // Change everything, restore, save again.
    fd.set_regs(&kvm_regs {
        rflags: 0x2,
        ..Default::default()
    })
    .unwrap();
    let mut changed: Vec<(u32, u64)> = wanted.iter().map(|&(i, _)| (i, 0)).collect();
    changed.retain(|&(i, _)| i != MSR_IA32_PAT && i != MSR_IA32_TSC);
    set_msrs(&fd, &changed);
    fd.set_fpu(&kvm_fpu {
        fcw: 0x37f,
        ..Default::default()
    })
    .unwrap();
    fd.set_debug_regs(&kvm_debugregs::default()).unwrap();
    let mut lapic = fd.get_lapic().unwrap();
    lapic.regs[0x350..0x354].copy_from_slice(&[0, 0, 1, 0]); // LVT0 masked
    fd.set_lapic(&lapic).unwrap();
    assert_ne!(vcpu_state::save(&fd, list).unwrap().regs, known);

    let t = Instant::now();
    vcpu_state::restore(&fd, &saved).unwrap();
    let restore = t.elapsed();
    let again = vcpu_state::save(&fd, list).unwrap();
    assert_same(&saved, &without_tsc_drift(&saved, &again));

    // Rough timings: the median of a few rounds.
    let rounds = 25;
    let mut saves = Vec::new();
    let mut restores = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        let s = vcpu_state::save(&fd, list).unwrap();
        saves.push(t.elapsed());
        let t = Instant::now();
        vcpu_state::restore(&fd, &s).unwrap();
        restores.push(t.elapsed());
    }
    saves.sort();
    restores.sort();
    eprintln!(
        "vcpu_state: {} MSRs saved (KVM lists {}), XSAVE {} bytes, {} CPUID entries, TSC {} kHz; \
         save {:?} (first {:?}), restore {:?} (first {:?}), medians of {rounds}",
        saved.msrs.len(),
        list.len(),
        saved.xsave.len(),
        saved.cpuid.len(),
        saved.tsc_khz,
        saves[rounds / 2],
        first_save,
        restores[rounds / 2],
        restore,
    );
    eprintln!(
        "vcpu_state: MSRs {:x?}",
        saved.msrs.iter().map(|m| m.index).collect::<Vec<_>>()
    );
}

fn ignores_msrs() -> bool {
    std::fs::read_to_string("/sys/module/kvm/parameters/ignore_msrs").is_ok_and(|s| s.trim() == "Y")
}

#[test]
fn an_msr_kvm_refuses_is_named() {
    if ignores_msrs() {
        eprintln!("skipped: kvm.ignore_msrs=Y makes KVM accept any MSR");
        return;
    }
    let kvm = Kvm::new().unwrap();
    let list = kvm.get_msr_index_list().unwrap();
    let vm = vm(&kvm);
    let mut state = vcpu_state::save(&vcpu(&kvm, &vm, 0, 1), list.as_slice()).unwrap();
    let made_up = Msr {
        index: 0x0bad_c0de,
        value: 1,
    };
    let at = state.msrs.len() / 2;
    state.msrs.insert(at, made_up);
    let fresh = vm.create_vcpu(1).unwrap();
    match vcpu_state::restore(&fresh, &state) {
        Err(e @ VcpuStateError::MsrRefused { index, set, .. }) => {
            assert_eq!((index, set), (made_up.index, at));
            assert!(e.to_string().contains("MSR 0xbadc0de"), "{e}");
        }
        other => panic!("restored with a made-up MSR: {other:?}"),
    }
}

#[test]
fn a_foreign_tsc_frequency_or_a_bad_xsave_size() {
    let kvm = Kvm::new().unwrap();
    let list = kvm.get_msr_index_list().unwrap();
    let vm = vm(&kvm);
    let fd = vcpu(&kvm, &vm, 0, 1);
    let mut state = vcpu_state::save(&fd, list.as_slice()).unwrap();
    // 1% off: with TSC scaling the vCPU gets it, without the restore goes
    // on with a warning.
    state.tsc_khz += state.tsc_khz / 100;
    vcpu_state::restore(&fd, &state).unwrap();
    state.xsave.truncate(100);
    assert!(matches!(
        vcpu_state::restore(&fd, &state),
        Err(VcpuStateError::XsaveSize(100))
    ));
}

/// A COM1 that records what the guest writes and is always ready.
#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<u8>>>);

impl Console {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    fn wait_for(&self, what: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let text = self.text();
            if what(&text) {
                return text;
            }
            assert!(Instant::now() < deadline, "console: {text}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl BusDevice for Console {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // LSR: transmitter empty; everything else 0.
        data.fill(if offset == 5 { 0x60 } else { 0 });
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 {
            self.0.lock().unwrap().extend_from_slice(data);
        }
    }
}

/// A VM whose vCPU threads run: KVM's VM, the vCPU handles, the console.
struct Guest {
    handles: Vec<VcpuHandle>,
    console: Console,
    _vm: VmFd,
}

impl Guest {
    fn command(&self, cmd: VcpuCommand, state: RunState) {
        for h in &self.handles {
            h.send(cmd).unwrap();
        }
        for h in &self.handles {
            h.wait_for(state, TIMEOUT).unwrap();
        }
    }
}

fn register(vm: &VmFd, mem: &devices::virtio::GuestMemoryMmap) {
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping of `memory_size` bytes that
        // the test keeps until every VM using it is gone; the regions do
        // not overlap.
        unsafe { vm.set_user_memory_region(r) }.unwrap();
    }
}

/// Starts threads for `fds`, in state Created.
fn spawn(vm: VmFd, fds: Vec<VcpuFd>) -> Guest {
    let console = Console::default();
    let mut pio = Bus::new("pio");
    pio.insert(Arc::new(Mutex::new(console.clone())), 0x3f8, 8)
        .unwrap();
    let (pio, mmio) = (Arc::new(pio), Arc::new(Bus::new("mmio")));
    let (stops, _) = mpsc::channel();
    let stop_evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let handles = fds
        .into_iter()
        .enumerate()
        .map(|(id, fd)| {
            VcpuHandle::spawn(Vcpu {
                id: id as u8,
                fd,
                pio: pio.clone(),
                mmio: mmio.clone(),
                stops: stops.clone(),
                stop_evt: stop_evt.try_clone().unwrap(),
            })
            .unwrap()
        })
        .collect();
    Guest {
        handles,
        console,
        _vm: vm,
    }
}

fn probe() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/probe/probe.elf");
    assert!(p.is_file(), "{p:?} is missing: run tests/probe/build.sh");
    p
}

/// The test guest loaded into `mem` with `cmdline`, as vmplant boots it
/// through the Linux 64-bit entry, with `count` vCPUs.
fn boot_probe(
    kvm: &Kvm,
    mem: &devices::virtio::GuestMemoryMmap,
    cmdline: &str,
    count: u8,
) -> Guest {
    let vm = vm(kvm);
    register(&vm, mem);
    let kernel = loader::load_kernel(mem, &probe(), BootProtocol::Linux64).unwrap();
    let Entry::Linux64(entry) = kernel.entry else {
        panic!("not a 64-bit entry: {:?}", kernel.entry)
    };
    let cmdline_size = loader::load_cmdline(mem, cmdline).unwrap();
    mptable::write(mem, usize::from(count)).unwrap();
    let cr3 = paging::write_identity_tables(mem).unwrap();
    let mem_bytes = mem.iter().map(|r| r.len()).sum();
    let params =
        boot_params::linux_boot_params(kernel.header, cmdline_size, None, mem_bytes, None).unwrap();
    let boot_params = boot_params::write_linux_boot_params(mem, &params).unwrap();
    let mode = regs::EntryMode::Linux64 {
        entry,
        boot_params,
        cr3,
    };
    let fds = (0..count)
        .map(|id| {
            let fd = vcpu(kvm, &vm, id, count);
            set_msrs(&fd, &msr::boot_msrs());
            fd.set_fpu(&regs::boot_fpu()).unwrap();
            let mut lapic = fd.get_lapic().unwrap();
            regs::configure_lapic(&mut lapic);
            fd.set_lapic(&lapic).unwrap();
            if id == 0 {
                let sregs = regs::boot_sregs(mem, mode, fd.get_sregs().unwrap()).unwrap();
                fd.set_sregs(&sregs).unwrap();
                fd.set_regs(&regs::boot_regs(mode)).unwrap();
            }
            fd
        })
        .collect();
    spawn(vm, fds)
}

const EVERY: u64 = 1_000_000;

/// The `at` of every complete count line (a line cut by a pause has no
/// newline yet).
fn count_ats(text: &str) -> Vec<u64> {
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n') && l.contains("\"probe\":\"count\""))
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}"));
            v["at"].as_u64().unwrap_or_else(|| panic!("no at: {l:?}"))
        })
        .collect()
}

#[test]
fn a_paused_guest_is_saved_and_goes_on_in_another_vm() {
    let kvm = Kvm::new().unwrap();
    let list = kvm.get_msr_index_list().unwrap();
    let list = list.as_slice();
    let mem = vmm::memory::create(64 << 20, false).unwrap();
    let cmdline = format!("console=ttyS0 probe=smp:2+count:100000000000000:{EVERY}");
    let first = boot_probe(&kvm, &mem, &cmdline, 2);

    // Created, then running: neither saves.
    assert!(matches!(
        first.handles[0].save_state(list, TIMEOUT),
        Err(VcpuError::NotPaused(0, RunState::Created))
    ));
    first.command(VcpuCommand::Resume, RunState::Running);
    first
        .console
        .wait_for(|t| t.contains("\"probe\":\"smp\"") && count_ats(t).len() >= 3);
    assert!(matches!(
        first.handles[1].save_state(list, TIMEOUT),
        Err(VcpuError::NotPaused(1, RunState::Running))
    ));

    first.command(VcpuCommand::Pause, RunState::Paused);
    let before = first.console.text();
    let t = Instant::now();
    let saved: Vec<VcpuState> = first
        .handles
        .iter()
        .map(|h| h.save_state(list, TIMEOUT).unwrap())
        .collect();
    eprintln!(
        "vcpu_state: {} vCPUs of a paused guest saved through their threads in {:?}",
        saved.len(),
        t.elapsed()
    );
    assert_eq!(saved[0].sregs.cs.selector & 3, 3, "vCPU 0 counts at CPL3");
    eprintln!(
        "vcpu_state: vCPU 0 rip {:#x}, vCPU 1 mp_state {} (halted is {KVM_MP_STATE_HALTED})",
        saved[0].regs.rip, saved[1].mp_state.mp_state
    );

    let json = serde_json::to_string(&saved).unwrap();
    let back: Vec<VcpuState> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, saved);

    // A second VM on the same memory, from the saved state, while the
    // first stays paused: vCPU 0 goes on counting where it stopped.
    let vm2 = vm(&kvm);
    register(&vm2, &mem);
    let fds = back
        .iter()
        .enumerate()
        .map(|(id, state)| {
            let fd = vm2.create_vcpu(id as u64).unwrap();
            vcpu_state::restore(&fd, state).unwrap();
            fd
        })
        .collect();
    let second = spawn(vm2, fds);
    second.command(VcpuCommand::Resume, RunState::Running);
    let after = second.console.wait_for(|t| count_ats(t).len() >= 2);
    second.command(VcpuCommand::Pause, RunState::Paused);

    // The first VM's output and the second's join into one run: no count
    // missing, none twice, and the line cut by the pause made whole.
    let joined = format!("{before}{}", second.console.text());
    let ats = count_ats(&joined);
    assert!(
        ats.windows(2).all(|w| w[1] == w[0] + EVERY),
        "counts do not follow on: {ats:?}\n{before}\n--- restored ---\n{after}"
    );
    assert!(count_ats(&before).len() < ats.len());
    drop(second);
    drop(first);
}
