//! A VM: KVM handles, guest memory, devices on their buses, the vCPU
//! threads and the event loop, from build to exit.

use crate::config::{HostLimits, SerialOutput, VmConfig};
use crate::control::RunState;
use crate::event_loop::{ConsoleInput, ExitEvent, ExitSlot, ExitWatcher, route_stop_signals};
use crate::host::{self, HostInfo};
use crate::layout::{
    GED_GSI, KVM_TSS_START, MAX_VIRTIO_DEVICES, VIRTIO_IRQ_START, VIRTIO_MMIO_START,
};
use crate::loader::{self, Entry, LoaderError};
use crate::vcpu::{
    StopReason, Vcpu, VcpuCommand, VcpuError, VcpuHandle, VcpuState, describe_internal_error,
};
use crate::x86_64::{acpi, boot_params, cpuid, mptable, msr, paging, regs};
use devices::Bus;
use devices::boot_timer::{BOOT_TIMER_ADDR, BOOT_TIMER_LEN, BootTimer};
use devices::legacy::{AcpiPowerControl, I8042, Serial, acpi_pm, i8042, serial};
use devices::virtio::GuestMemoryMmap;
use devices::virtio::mmio::{MMIO_LEN, MmioTransport, NOTIFY_OFFSET};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region,
};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};
use std::io::Write;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// How long a vCPU may take to acknowledge a pause or resume.
const VCPU_ACK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0} is not the expected 12")]
    KvmApi(i32),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("KVM refused {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error(transparent)]
    BootParams(#[from] boot_params::BootParamsError),
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error(transparent)]
    Cpuid(#[from] cpuid::CpuidError),
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    #[error("cannot write the page tables into guest memory")]
    PageTables(#[source] vm_memory::GuestMemoryError),
    #[error("cannot place a device")]
    Bus(#[from] devices::BusError),
    #[error("cannot open the serial output file {path:?}")]
    SerialFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create an event")]
    Event(#[source] std::io::Error),
    #[error("the event loop failed")]
    EventLoop(#[source] event_manager::Error),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot set up a virtio device")]
    Virtio(#[from] devices::virtio::mmio::MmioError),
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error(transparent)]
    VmGenId(#[from] crate::vmgenid::VmGenIdError),
    #[error(transparent)]
    Migration(#[from] crate::migration::MigrationError),
    #[error("the VM has ended")]
    Ended,
    #[error("a VM can have at most {max} virtio devices (one interrupt line each)")]
    TooManyDevices { max: u32 },
    #[error("KVM set only {set} of {wanted} boot MSRs on vCPU {vcpu} (first refused: {first:#x})")]
    Msrs {
        vcpu: u8,
        set: usize,
        wanted: usize,
        first: u32,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest shut down or rebooted (i8042 reset or a KVM system event).
    GuestShutdown,
    /// A vCPU triple-faulted.
    TripleFault { vcpu: u8, rip: Option<u64> },
    /// KVM could not run the guest any further.
    KvmInternalError {
        vcpu: u8,
        suberror: u32,
        rip: Option<u64>,
        data: Vec<u64>,
    },
    /// The CPU refused to enter the guest.
    FailEntry { vcpu: u8, reason: u64 },
    /// The guest reported a crash.
    GuestCrash { vcpu: u8 },
    /// The host sent the VMM a stop signal.
    Signal(i32),
    /// The VM's owner stopped it.
    Stopped,
    /// The VM runs on in another VMM, which confirmed it.
    Migrated { to: String },
    /// The VMM itself failed while the guest ran.
    VmmError(String),
}

impl VmExit {
    /// The process exit status `vmplant run` reports for this exit.
    pub fn exit_code(&self) -> u8 {
        match self {
            VmExit::GuestShutdown => 0,
            VmExit::TripleFault { .. } | VmExit::GuestCrash { .. } => 2,
            VmExit::KvmInternalError { .. } | VmExit::FailEntry { .. } => 3,
            VmExit::VmmError(_) => 4,
            VmExit::Signal(sig) => 128u8.saturating_add(*sig as u8),
            VmExit::Stopped | VmExit::Migrated { .. } => 0,
        }
    }

    fn from_event(event: ExitEvent) -> Self {
        match event {
            ExitEvent::GuestReset => VmExit::GuestShutdown,
            ExitEvent::Signal(sig) => VmExit::Signal(sig),
            ExitEvent::HostStop => VmExit::Stopped,
            ExitEvent::Vcpu(stop) => {
                let vcpu = stop.vcpu;
                match stop.reason {
                    StopReason::GuestShutdown => VmExit::GuestShutdown,
                    StopReason::TripleFault { rip } => VmExit::TripleFault { vcpu, rip },
                    StopReason::InternalError {
                        suberror,
                        rip,
                        data,
                    } => VmExit::KvmInternalError {
                        vcpu,
                        suberror,
                        rip,
                        data,
                    },
                    StopReason::FailEntry { reason } => VmExit::FailEntry { vcpu, reason },
                    StopReason::GuestCrash => VmExit::GuestCrash { vcpu },
                    StopReason::Error(msg) => VmExit::VmmError(format!("vCPU {vcpu}: {msg}")),
                }
            }
        }
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = |rip: &Option<u64>| rip.map(|r| format!(" at rip {r:#x}")).unwrap_or_default();
        match self {
            VmExit::GuestShutdown => write!(f, "the guest shut down"),
            VmExit::TripleFault { vcpu, rip } => write!(f, "vCPU {vcpu} triple-faulted{}", at(rip)),
            VmExit::KvmInternalError {
                vcpu,
                suberror,
                rip,
                data,
            } => {
                write!(
                    f,
                    "vCPU {vcpu} stopped: {} (KVM internal error {suberror}{}, data {data:x?})",
                    describe_internal_error(*suberror),
                    at(rip)
                )?;
                if host::detect_virtualization(std::path::Path::new("/"))
                    == host::Virtualization::Pvm
                {
                    write!(
                        f,
                        "; on this PVM host guest kernel code runs in KVM's instruction emulator, \
                         which lacks some instructions"
                    )?;
                }
                Ok(())
            }
            VmExit::FailEntry { vcpu, reason } => {
                write!(
                    f,
                    "vCPU {vcpu} could not enter the guest (hardware reason {reason:#x})"
                )
            }
            VmExit::GuestCrash { vcpu } => write!(f, "the guest reported a crash on vCPU {vcpu}"),
            VmExit::Signal(sig) => write!(f, "stopped by signal {sig}"),
            VmExit::Stopped => write!(f, "stopped by its owner"),
            VmExit::Migrated { to } => write!(f, "migrated to {to}, which runs it"),
            VmExit::VmmError(msg) => write!(f, "the VMM failed: {msg}"),
        }
    }
}

/// A device or other party on the VM's event loop.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// A built VM, ready to run.
pub struct Vm {
    // Kept open for the VM's lifetime.
    _kvm: Kvm,
    pub(crate) fd: Arc<VmFd>,
    pub(crate) mem: GuestMemoryMmap,
    host: HostInfo,
    pub(crate) vcpu_fds: Vec<VcpuFd>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    events: EventManager<Subscriber>,
    exit: ExitSlot,
    stops_tx: mpsc::Sender<crate::vcpu::VcpuStop>,
    stop_evt: EventFd,
    host_stop_evt: EventFd,
    boot_time: Arc<OnceLock<Duration>>,
    console: crate::console::ConsoleHandle,
    pub(crate) config: VmConfig,
    pub(crate) serial: Arc<Mutex<Serial>>,
    /// The virtio devices' transports, in the order they were added.
    pub(crate) transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// `virtio_mmio.device=` parameters for the devices added so far.
    virtio_params: Vec<String>,
    /// The same devices, for the ACPI DSDT.
    virtio_acpi: Vec<acpi::VirtioMmio>,
    /// The generic event device's interrupt: raised after a restore to
    /// tell the guest its generation ID changed.
    pub(crate) genid_changed: EventFd,
}

impl Vm {
    /// Creates the VM described by `config`. `process_start` is when the
    /// VMM process started, for the boot-complete marker.
    pub fn build(config: &VmConfig, process_start: Instant) -> Result<Vm, VmError> {
        Self::build_on(config, None, process_start)
    }

    /// Creates the VM described by `config` on `mem` (guest RAM mapped
    /// from a snapshot, say) instead of new memory.
    pub fn build_with_memory(
        config: &VmConfig,
        mem: GuestMemoryMmap,
        process_start: Instant,
    ) -> Result<Vm, VmError> {
        Self::build_on(config, Some(mem), process_start)
    }

    fn build_on(
        config: &VmConfig,
        mem: Option<GuestMemoryMmap>,
        process_start: Instant,
    ) -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let api = kvm.get_api_version();
        if api != kvm_bindings::KVM_API_VERSION as i32 {
            return Err(VmError::KvmApi(api));
        }
        let host = host::info(&kvm);
        if let Some(w) = host.warning() {
            // Once per process, however many VMs it runs, and about the
            // host: outside the span of the VM being built.
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| tracing::warn!(parent: None, "{w}"));
        }
        let limits = HostLimits {
            max_vcpus: host.max_vcpus.min(254),
            host_mem_bytes: host.mem_total_bytes,
        };
        match mem {
            // A restore: the kernel is not loaded again.
            Some(_) => config.validate_resources(&limits)?,
            None => config.validate(&limits)?,
        }
        if usize::from(config.vcpus) > host.recommended_vcpus {
            tracing::warn!(
                "{} vCPUs is more than the {} KVM recommends on this host",
                config.vcpus,
                host.recommended_vcpus
            );
        }

        let fd = kvm.create_vm().map_err(kvm_err("to create a VM"))?;
        // Guest memory first: on a PVM host, registering it after the
        // in-kernel interrupt controller exists costs milliseconds
        // (measured 6.3 ms against 0.1 ms for 128 MiB).
        let mem = match mem {
            Some(mem) => mem,
            None => crate::memory::create(config.mem_bytes(), config.shared_memory)?,
        };
        register_memory(&fd, &mem)?;

        fd.set_tss_address(KVM_TSS_START as usize)
            .map_err(kvm_err("the TSS address"))?;
        fd.create_irq_chip()
            .map_err(kvm_err("an in-kernel interrupt controller"))?;
        fd.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm_err("an in-kernel PIT"))?;

        let (stops_tx, stops_rx) = mpsc::channel();
        let new_evt = || EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::Event);
        let stop_evt = new_evt()?;
        let reset_evt = new_evt()?;
        let signal_evt = new_evt()?;
        let host_stop_evt = new_evt()?;

        // Legacy devices.
        let mut pio = Bus::new("pio");
        let mut mmio = Bus::new("mmio");
        let serial_irq = new_evt()?;
        fd.register_irqfd(&serial_irq, serial::COM1_IRQ)
            .map_err(kvm_err("the serial interrupt"))?;
        let genid_changed = new_evt()?;
        fd.register_irqfd(&genid_changed, GED_GSI)
            .map_err(kvm_err("the generic event device's interrupt"))?;
        let (console, console_flusher) =
            crate::console::console(serial_output(&config.serial)?).map_err(VmError::Event)?;
        let serial = Arc::new(Mutex::new(Serial::new(serial_irq, Box::new(console))));
        pio.insert(
            serial.clone(),
            u64::from(serial::COM1_BASE),
            u64::from(serial::COM1_LEN),
        )?;
        let reset = reset_evt.try_clone().map_err(VmError::Event)?;
        pio.insert(
            Arc::new(Mutex::new(I8042::new(reset))),
            u64::from(i8042::I8042_BASE),
            u64::from(i8042::I8042_LEN),
        )?;
        // ACPI power off and reset end the VM as the i8042 reset does.
        let acpi_exit = reset_evt.try_clone().map_err(VmError::Event)?;
        pio.insert(
            Arc::new(Mutex::new(AcpiPowerControl::new(acpi_exit))),
            u64::from(acpi_pm::ACPI_PM_BASE),
            u64::from(acpi_pm::ACPI_PM_LEN),
        )?;
        let timer = BootTimer::new(process_start);
        let boot_time = timer.boot_time();
        mmio.insert(Arc::new(Mutex::new(timer)), BOOT_TIMER_ADDR, BOOT_TIMER_LEN)?;

        // The event loop.
        let mut events = EventManager::<Subscriber>::new().map_err(VmError::EventLoop)?;
        let signal_route = route_stop_signals(&signal_evt).map_err(VmError::Event)?;
        let exit: ExitSlot = Arc::new(Mutex::new(None));
        events.add_subscriber(Arc::new(Mutex::new(ExitWatcher {
            signal_route,
            reset_evt,
            host_stop_evt: host_stop_evt.try_clone().map_err(VmError::Event)?,
            stop_evt: stop_evt.try_clone().map_err(VmError::Event)?,
            signal_evt,
            stops: stops_rx,
            slot: exit.clone(),
        })));
        let console = console_flusher.handle();
        events.add_subscriber(Arc::new(Mutex::new(console_flusher)));
        if config.serial_input {
            events.add_subscriber(Arc::new(Mutex::new(ConsoleInput {
                input: libc::STDIN_FILENO,
                serial: serial.clone(),
            })));
        }

        Ok(Vm {
            _kvm: kvm,
            fd: Arc::new(fd),
            mem,
            host,
            vcpu_fds: Vec::new(),
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            events,
            exit,
            stops_tx,
            stop_evt,
            host_stop_evt,
            boot_time,
            console,
            config: config.clone(),
            serial,
            transports: Vec::new(),
            virtio_params: Vec::new(),
            virtio_acpi: Vec::new(),
            genid_changed,
        })
    }

    /// The command line the guest gets: the configured one, then one
    /// parameter per virtio device.
    pub fn cmdline(&self) -> String {
        let mut c = self.config.cmdline().to_string();
        for p in &self.virtio_params {
            c.push(' ');
            c.push_str(p);
        }
        c
    }

    /// Loads the guest, creates the vCPUs and sets their registers.
    fn load_guest(&mut self) -> Result<(), VmError> {
        let config = &self.config;
        let mem = &self.mem;
        let kernel = loader::load_kernel(mem, &config.kernel, config.boot)?;
        let initrd = match &config.initrd {
            Some(path) => {
                let max = kernel
                    .header
                    .map(|h| u64::from(h.initrd_addr_max))
                    .filter(|&m| m != 0);
                Some(loader::load_initrd(mem, path, kernel.end, max)?)
            }
            None => None,
        };
        let cmdline_size = loader::load_cmdline(mem, &self.cmdline())?;
        mptable::write(mem, usize::from(config.vcpus))?;
        crate::vmgenid::renew(mem)?;
        let rsdp = Some(acpi::write(
            mem,
            usize::from(config.vcpus),
            &self.virtio_acpi,
        )?);
        let mode = match kernel.entry {
            Entry::Linux64(entry) => {
                let cr3 = paging::write_identity_tables(mem).map_err(VmError::PageTables)?;
                let params = boot_params::linux_boot_params(
                    kernel.header,
                    cmdline_size,
                    initrd,
                    config.mem_bytes(),
                    rsdp,
                )?;
                let boot_params = boot_params::write_linux_boot_params(mem, &params)?;
                regs::EntryMode::Linux64 {
                    entry,
                    boot_params,
                    cr3,
                }
            }
            Entry::Pvh(entry) => {
                let start_info =
                    boot_params::write_pvh_start_info(mem, initrd, config.mem_bytes(), rsdp)?;
                regs::EntryMode::Pvh { entry, start_info }
            }
        };
        tracing::debug!(?mode, "kernel loaded");

        let supported = self
            ._kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("to report its CPUID"))?;
        for id in 0..config.vcpus {
            let vcpu = self
                .fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("to create a vCPU"))?;
            let mut c = supported.clone();
            cpuid::configure(&mut c, id, config.vcpus)?;
            vcpu.set_cpuid2(&c).map_err(kvm_err("the CPUID"))?;
            let wanted = msr::boot_msrs();
            let set = vcpu
                .set_msrs(&msr::to_kvm(&wanted))
                .map_err(kvm_err("the boot MSRs"))?;
            if set != wanted.len() {
                return Err(VmError::Msrs {
                    vcpu: id,
                    set,
                    wanted: wanted.len(),
                    first: wanted[set].0,
                });
            }
            vcpu.set_fpu(&regs::boot_fpu())
                .map_err(kvm_err("the FPU state"))?;
            let mut lapic = vcpu
                .get_lapic()
                .map_err(kvm_err("to report the local APIC"))?;
            regs::configure_lapic(&mut lapic);
            vcpu.set_lapic(&lapic).map_err(kvm_err("the local APIC"))?;
            // Only the boot vCPU starts at the kernel entry; the others
            // wait for INIT/SIPI in the in-kernel local APIC.
            if id == 0 {
                let sregs = vcpu
                    .get_sregs()
                    .map_err(kvm_err("to report the segment registers"))?;
                let sregs = regs::boot_sregs(&self.mem, mode, sregs)?;
                vcpu.set_sregs(&sregs)
                    .map_err(kvm_err("the segment registers"))?;
                vcpu.set_regs(&regs::boot_regs(mode))
                    .map_err(kvm_err("the registers"))?;
            }
            self.vcpu_fds.push(vcpu);
        }
        Ok(())
    }

    /// Adds a virtio device behind a virtio-mmio transport, announced to
    /// the guest on its command line (`virtio_mmio.device=4K@ADDR:IRQ`).
    /// Devices are added before the VM starts.
    pub fn add_virtio_device(
        &mut self,
        device: Box<dyn devices::virtio::VirtioDevice>,
        subscriber: Option<Subscriber>,
    ) -> Result<(), VmError> {
        let index = self.virtio_params.len() as u32;
        if index >= MAX_VIRTIO_DEVICES {
            return Err(VmError::TooManyDevices {
                max: MAX_VIRTIO_DEVICES,
            });
        }
        let base = VIRTIO_MMIO_START + u64::from(index) * MMIO_LEN;
        let gsi = VIRTIO_IRQ_START + index;
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::Event)?;
        self.fd
            .register_irqfd(&irq, gsi)
            .map_err(kvm_err("a virtio interrupt"))?;
        let transport = MmioTransport::new(device, self.mem.clone(), irq)?;
        for (q, evt) in transport.queue_events().iter().enumerate() {
            self.fd
                .register_ioevent(evt, &IoEventAddress::Mmio(base + NOTIFY_OFFSET), q as u32)
                .map_err(kvm_err("a virtio queue notifier"))?;
        }
        let mmio = Arc::get_mut(&mut self.mmio).expect("devices are added before the VM runs");
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(transport.clone(), base, MMIO_LEN)?;
        self.transports.push(transport);
        if let Some(s) = subscriber {
            self.events.add_subscriber(s);
        }
        self.virtio_params
            .push(format!("virtio_mmio.device=4K@{base:#x}:{gsi}"));
        self.virtio_acpi.push(acpi::VirtioMmio {
            base,
            len: MMIO_LEN,
            gsi,
        });
        Ok(())
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn host(&self) -> &HostInfo {
        &self.host
    }

    /// Runs the guest until it stops or the host stops it.
    pub fn run(self) -> Result<VmExit, VmError> {
        self.start()?.wait()
    }

    /// Loads the guest and starts its vCPUs; the event loop runs on a
    /// thread of its own until the VM ends.
    pub fn start(mut self) -> Result<RunningVm, VmError> {
        self.load_guest()?;
        self.launch(true)
    }

    /// Starts the vCPUs created so far (their registers set), running or
    /// paused, and the event loop on a thread of its own.
    pub(crate) fn launch(mut self, run: bool) -> Result<RunningVm, VmError> {
        let mut vcpus = Vec::with_capacity(self.vcpu_fds.len());
        for (id, fd) in self.vcpu_fds.drain(..).enumerate() {
            let vcpu = Vcpu {
                id: id as u8,
                fd,
                pio: self.pio.clone(),
                mmio: self.mmio.clone(),
                stops: self.stops_tx.clone(),
                stop_evt: self.stop_evt.try_clone().map_err(VmError::Event)?,
            };
            vcpus.push(VcpuHandle::spawn(vcpu)?);
        }
        let running = RunningVm {
            vcpus: Mutex::new(vcpus),
            state: Mutex::new(RunState::Paused),
            host_stop_evt: self.host_stop_evt.try_clone().map_err(VmError::Event)?,
            boot_time: self.boot_time.clone(),
            mem: self.mem.clone(),
            console: self.console.clone(),
            events: Mutex::new(None),
            fd: self.fd.clone(),
            serial: self.serial.clone(),
            transports: self.transports.clone(),
            config: self.config.clone(),
            migrated_to: Mutex::new(None),
            migrating: std::sync::atomic::AtomicBool::new(false),
        };
        if run {
            running.resume()?;
        }
        // The VM's threads log in the span they were started in (the
        // VM's name, when a process runs several).
        let span = tracing::Span::current();
        let events = std::thread::Builder::new()
            .name("vm-events".into())
            .spawn(move || span.in_scope(|| self.event_loop()))
            .map_err(VmError::Event)?;
        *running.events.lock().unwrap_or_else(|p| p.into_inner()) = Some(events);
        Ok(running)
    }

    fn event_loop(mut self) -> Result<VmExit, VmError> {
        let exit = loop {
            self.events.run().map_err(VmError::EventLoop)?;
            let taken = self.exit.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(event) = taken {
                break VmExit::from_event(event);
            }
        };
        let (reads, writes) = self.pio.unmapped();
        let (mreads, mwrites) = self.mmio.unmapped();
        tracing::debug!(
            pio_reads = reads,
            pio_writes = writes,
            mmio_reads = mreads,
            mmio_writes = mwrites,
            "accesses to no device"
        );
        Ok(exit)
    }
}

/// A VM whose vCPUs have started: pause, resume, stop, or wait for it,
/// from any thread (the control socket's, say).
pub struct RunningVm {
    vcpus: Mutex<Vec<VcpuHandle>>,
    /// Held while the vCPUs change state, so that changes never overlap.
    state: Mutex<RunState>,
    host_stop_evt: EventFd,
    boot_time: Arc<OnceLock<Duration>>,
    mem: GuestMemoryMmap,
    console: crate::console::ConsoleHandle,
    events: Mutex<Option<std::thread::JoinHandle<Result<VmExit, VmError>>>>,
    // What a snapshot saves besides the vCPUs and memory.
    pub(crate) fd: Arc<VmFd>,
    pub(crate) serial: Arc<Mutex<Serial>>,
    pub(crate) transports: Vec<Arc<Mutex<MmioTransport>>>,
    pub(crate) config: VmConfig,
    /// Where the VM went, once another VMM confirmed that it runs it.
    pub(crate) migrated_to: Mutex<Option<String>>,
    /// A migration is under way (there is one at a time).
    pub(crate) migrating: std::sync::atomic::AtomicBool,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RunningVm {
    /// Stops every vCPU at its next exit and waits until all have; the
    /// console then shows everything the guest wrote before the pause.
    /// Pausing a paused VM does nothing; an ended one refuses.
    pub fn pause(&self) -> Result<(), VmError> {
        self.pause_locked(&mut self.lock_state())
    }

    /// Lets every vCPU run again. Resuming a running VM does nothing; an
    /// ended one refuses.
    pub fn resume(&self) -> Result<(), VmError> {
        self.resume_locked(&mut self.lock_state())
    }

    /// The run state, held: no pause, resume or snapshot happens while
    /// the guard lives.
    pub(crate) fn lock_state(&self) -> std::sync::MutexGuard<'_, RunState> {
        lock(&self.state)
    }

    pub(crate) fn pause_locked(&self, state: &mut RunState) -> Result<(), VmError> {
        match state {
            RunState::Running => {
                self.command_all(VcpuCommand::Pause, VcpuState::Paused)?;
                *state = RunState::Paused;
            }
            RunState::Paused => {}
            RunState::Stopping => return Err(VmError::Ended),
        }
        self.console.flush();
        Ok(())
    }

    pub(crate) fn resume_locked(&self, state: &mut RunState) -> Result<(), VmError> {
        match state {
            RunState::Paused => {
                self.command_all(VcpuCommand::Resume, VcpuState::Running)?;
                *state = RunState::Running;
            }
            RunState::Running => {}
            RunState::Stopping => return Err(VmError::Ended),
        }
        Ok(())
    }

    /// Whether the vCPUs run, are paused, or the VM is ending.
    pub fn state(&self) -> RunState {
        *lock(&self.state)
    }

    /// The vCPU threads (empty once the VM has ended).
    pub(crate) fn vcpu_handles(&self) -> std::sync::MutexGuard<'_, Vec<VcpuHandle>> {
        lock(&self.vcpus)
    }

    fn command_all(&self, cmd: VcpuCommand, state: VcpuState) -> Result<(), VmError> {
        let vcpus = lock(&self.vcpus);
        for v in vcpus.iter() {
            v.send(cmd)?;
        }
        for v in vcpus.iter() {
            v.wait_for(state, VCPU_ACK_TIMEOUT)?;
        }
        Ok(())
    }

    /// Asks the VM to stop; [`RunningVm::wait`] then returns
    /// [`VmExit::Stopped`].
    pub fn stop(&self) -> Result<(), VmError> {
        *lock(&self.state) = RunState::Stopping;
        self.host_stop_evt.write(1).map_err(VmError::Event)
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The time from process start to the guest's boot-complete marker.
    pub fn boot_time(&self) -> Option<Duration> {
        self.boot_time.get().copied()
    }

    /// Waits until the VM ends, then stops and joins its vCPU threads.
    /// Only the first call waits; later ones find no event loop.
    pub fn wait(&self) -> Result<VmExit, VmError> {
        let events = lock(&self.events).take();
        let result = match events.map(|t| t.join()) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Ok(VmExit::VmmError("the event loop panicked".into())),
            None => Ok(VmExit::VmmError("the VM has no event loop".into())),
        };
        *lock(&self.state) = RunState::Stopping;
        for v in lock(&self.vcpus).drain(..) {
            v.stop();
        }
        match (result, lock(&self.migrated_to).take()) {
            (Ok(VmExit::Stopped), Some(to)) => Ok(VmExit::Migrated { to }),
            (result, _) => result,
        }
    }
}

fn register_memory(fd: &VmFd, mem: &GuestMemoryMmap) -> Result<(), VmError> {
    set_memory_flags(fd, mem, 0)
}

/// Registers `mem`'s regions with KVM (slot `i` for region `i`) with
/// `flags` (`KVM_MEM_LOG_DIRTY_PAGES` to track the pages the guest
/// writes); registering them again changes only the flags.
pub(crate) fn set_memory_flags(
    fd: &VmFd,
    mem: &GuestMemoryMmap,
    flags: u32,
) -> Result<(), VmError> {
    let set = set_memory_flags_each(fd, mem, flags);
    if set.is_err() && flags != 0 {
        // No slot keeps a flag the caller was told did not take.
        let _ = set_memory_flags_each(fd, mem, 0);
    }
    set
}

fn set_memory_flags_each(fd: &VmFd, mem: &GuestMemoryMmap, flags: u32) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags,
        };
        // The region is a live mapping of exactly `memory_size`
        // bytes owned by `mem`, which the VM keeps for as long as the KVM
        // VM exists; slots do not overlap because regions do not.
        // SAFETY: sound for the reasons just given.
        unsafe { fd.set_user_memory_region(r) }.map_err(kvm_err("a guest memory region"))?;
    }
    Ok(())
}

fn serial_output(out: &SerialOutput) -> Result<Box<dyn Write + Send>, VmError> {
    Ok(match out {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::File(path) => {
            Box::new(
                std::fs::File::create(path).map_err(|source| VmError::SerialFile {
                    path: path.clone(),
                    source,
                })?,
            )
        }
        SerialOutput::StdoutPrefixed(prefix) => Box::new(crate::console::PrefixedLines::new(
            prefix.clone().into_bytes(),
            std::io::stdout(),
        )),
        SerialOutput::None => Box::new(std::io::sink()),
    })
}
