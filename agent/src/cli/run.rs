//! `vmplant run`: boot guests in this process, their NICs on one VNET
//! switch, until they shut down or the host stops them.
//!
//! One VM from flags (its console on standard output), or several from a
//! JSON file (`--config`), each console on standard output behind its
//! name or in a file of its own.

use super::disk::{Disk, DiskHandle};
use super::nic::Nic;
use super::share::{Share, VhostUserShare};
use super::switch::SwitchArgs;
use super::{CliResult, chain};
use clap::{Args, ValueEnum};
use devices::virtio::fs::{Fs, VhostUserFs};
use devices::virtio::net::Net;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use vmm::control::{ControlServer, DeviceInfo, VmControl};
use vmm::migration::link::{self, Conn};
use vmm::snapshot::Restore;
use vmm::{BootProtocol, SerialOutput, Vm, VmConfig, VmExit};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The guest kernel: an ELF vmlinux or a bzImage.
    #[arg(long, required_unless_present_any = ["config", "restore", "incoming"])]
    pub kernel: Option<PathBuf>,
    /// An initial ramdisk for the kernel.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// The kernel command line [default: console=ttyS0 reboot=k panic=1 pci=off].
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Number of vCPUs (1..=254: APIC id 255 is the broadcast address;
    /// KVM on the host may allow fewer, `vmplant host` says how many).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=254))]
    pub vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128, value_parser = crate::cli::mib)]
    pub mem: u64,
    /// Kernel entry point: pvh when the ELF has a PVH note (auto), or the
    /// Linux 64-bit entry.
    #[arg(long, value_enum, default_value_t = Boot::Auto)]
    pub boot: Boot,
    /// Write the serial console to this file instead of standard output.
    #[arg(long)]
    pub serial_file: Option<PathBuf>,
    /// Do not feed standard input to the serial console.
    #[arg(long)]
    pub no_stdin: bool,
    /// Give the guest a virtio-net NIC with this MAC address on the
    /// process's VNET switch (repeatable). It sends from MAC only, or from
    /// any address with `,any-source`.
    #[arg(long = "net", value_name = "MAC[,any-source]")]
    pub nets: Vec<Nic>,
    /// Give the guest a virtio-fs share served by a GVFS client in this
    /// process (repeatable): TAG=HOST:PORT,token-file=FILE,(tls-ca=FILE|plaintext)[,cache-dir=DIR].
    /// The guest mounts it with `mount -t virtiofs TAG DIR`.
    #[arg(long = "fs", value_name = "SHARE")]
    pub shares: Vec<Share>,
    /// Give the guest a virtio-fs share served by a vhost-user backend
    /// such as virtiofsd listening on SOCKET (repeatable): TAG=SOCKET.
    /// Guest memory is then a memfd the backend maps.
    #[arg(long = "vhost-user-fs", value_name = "TAG=SOCKET")]
    pub vhost_user_shares: Vec<VhostUserShare>,
    /// Give the guest a virtio-blk disk (repeatable): PATH (a raw file,
    /// read-write) or PATH,ro; PATH,overlay=FILE (PATH read-only, the
    /// writes in the copy-on-write overlay FILE); image=NAME,store=DIR,overlay=FILE
    /// (an image of a local store); image=NAME,store=gvfs://HOST:PORT,token-file=F,(tls-ca=F|plaintext)[,cache-dir=D],overlay=FILE
    /// (an image of a store a GVFS server serves, fetched as the guest
    /// reads it). `,bps=N` and `,iops=N` limit its bytes and requests
    /// per second; `,poll=US` has the device poll the queue for US
    /// microseconds after each request.
    #[arg(long = "disk", value_name = "DISK")]
    pub disks: Vec<Disk>,
    /// Restore the VM saved in DIR (`vmplant vm snapshot DIR`) instead of
    /// booting a kernel: it goes on where it was paused. Its vCPUs, memory
    /// and kernel come from the snapshot, and so do its NICs, file
    /// shares and disks, unless `--net` (the MACs), `--fs` (the same tags,
    /// on another server, say) or `--disk` (copies of the disks) replace
    /// them, in order.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "initrd", "cmdline", "vcpus", "mem", "boot", "config"])]
    pub restore: Option<PathBuf>,
    /// Wait for one VM to migrate here (`vmplant vm migrate` on its
    /// source), then run it: `tcp:ADDR:PORT`, `tls:ADDR:PORT` (mutual TLS
    /// with `--tls-cert`, `--tls-key`, `--tls-ca`) or `unix:PATH` to
    /// listen on. Its NICs and shares are the source's unless `--net` or
    /// `--fs` replace them, as with `--restore`.
    #[arg(long, value_name = "PROTO:ADDR", conflicts_with_all = ["kernel", "initrd", "cmdline", "vcpus", "mem", "boot", "config", "restore"])]
    pub incoming: Option<String>,
    /// Keep guest memory in a memfd (as `--vhost-user-fs` does), so that
    /// a local migration (`migrate unix:PATH`) hands it over to the new
    /// VMM instead of copying it.
    #[arg(long)]
    pub shared_memory: bool,
    /// Serve the VM's control API on a unix socket at PATH (see `vmplant
    /// vm`); the socket is removed when the VM ends.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Run the VMs a JSON file describes, all on one switch, instead of
    /// one from flags: {"vms": [{"name", "kernel", "initrd", "cmdline",
    /// "vcpus", "mem_mib", "boot", "nets": [MAC[,any-source]...], "shares": [SHARE...], "vhost_user_shares": [TAG=SOCKET...],
    /// "disks": [DISK...], "serial_file", "control"}]}.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["kernel", "initrd", "cmdline", "serial_file", "nets", "shares", "vhost_user_shares", "disks", "control"])]
    pub config: Option<PathBuf>,
    /// The switch the VMs' NICs are on: its TAP ports and tunnels.
    #[command(flatten)]
    pub switch: SwitchArgs,
}

#[derive(Debug, Clone, Copy, Default, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Boot {
    #[default]
    Auto,
    Linux64,
    Pvh,
}

impl From<Boot> for BootProtocol {
    fn from(b: Boot) -> Self {
        match b {
            Boot::Auto => BootProtocol::Auto,
            Boot::Linux64 => BootProtocol::Linux64,
            Boot::Pvh => BootProtocol::Pvh,
        }
    }
}

/// Several VMs in one process.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunFile {
    vms: Vec<VmSpec>,
}

/// One VM of a [`RunFile`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmSpec {
    name: String,
    /// The kernel to boot, or (`restore`) a snapshot directory to restore.
    kernel: Option<PathBuf>,
    restore: Option<PathBuf>,
    initrd: Option<PathBuf>,
    cmdline: Option<String>,
    #[serde(default = "one")]
    vcpus: u8,
    #[serde(default = "default_mem")]
    mem_mib: u64,
    #[serde(default)]
    boot: Boot,
    #[serde(default)]
    nets: Vec<String>,
    /// The VM's control socket.
    control: Option<PathBuf>,
    /// `--fs` values.
    #[serde(default)]
    shares: Vec<String>,
    /// `--vhost-user-fs` values.
    #[serde(default)]
    vhost_user_shares: Vec<String>,
    /// `--disk` values.
    #[serde(default)]
    disks: Vec<String>,
    /// The console's file; standard output behind "NAME: " if absent.
    serial_file: Option<PathBuf>,
}

fn one() -> u8 {
    1
}

fn default_mem() -> u64 {
    128
}

/// A VM to build: its config and its NICs.
struct Planned {
    name: String,
    config: VmConfig,
    nets: Vec<Nic>,
    shares: Vec<Share>,
    vhost_user_shares: Vec<VhostUserShare>,
    disks: Vec<Disk>,
    control: Option<PathBuf>,
    /// A snapshot to restore instead of booting `config`'s kernel.
    restore: Option<vmm::snapshot::Snapshot>,
}

/// What a snapshot keeps of a VM's devices, for its restore: the NICs'
/// MACs, the `--fs` shares (their servers are connected again; the
/// guests' sessions are in the devices' saved state) and the disks (their
/// files are opened again).
#[derive(Debug, Default, serde::Serialize, Deserialize)]
struct DevicePlan {
    /// As `--net` takes them (`MAC[,any-source]`).
    nets: Vec<String>,
    #[serde(default)]
    shares: Vec<Share>,
    /// As `--disk` takes them, with absolute paths.
    #[serde(default)]
    disks: Vec<String>,
}

/// The devices of a restored VM: `saved`, or `given` on the command line
/// in their place, one for one.
fn replacing<T: Clone>(
    saved: &[T],
    given: Vec<T>,
    what: &str,
    flags: &str,
) -> Result<Vec<T>, String> {
    if given.is_empty() {
        return Ok(saved.to_vec());
    }
    if given.len() != saved.len() {
        return Err(format!(
            "the snapshot's VM has {} {what}, and {} {flags} were given",
            saved.len(),
            given.len()
        ));
    }
    Ok(given)
}

impl DevicePlan {
    /// A VM that came over plain TCP, from whoever connected first, does
    /// not decide which host files this process opens: its disks and
    /// shares must be given here (`--disk`, `--fs`). Over TLS (a peer the
    /// CA signed) and a unix socket (this host's), they may come with it.
    fn check_trusted(&self, at: &str, disks: &[Disk], shares: &[Share]) -> Result<(), String> {
        let plain = at.starts_with("tcp:");
        let untrusted = (!self.disks.is_empty() && disks.is_empty())
            || (!self.shares.is_empty() && shares.is_empty());
        if plain && untrusted {
            return Err(format!(
                "the VM migrated over {at} has {} disks and {} file shares: over plain tcp: their host files are not taken from the sender; give them here with --disk and --fs, or migrate over tls: or unix:",
                self.disks.len(),
                self.shares.len()
            ));
        }
        Ok(())
    }
}

impl Planned {
    fn device_plan(&self) -> String {
        let plan = DevicePlan {
            nets: self.nets.iter().map(Nic::spec).collect(),
            shares: self.shares.iter().map(Share::absolute).collect(),
            disks: self.disks.iter().map(|d| d.absolute().spec()).collect(),
        };
        serde_json::to_string(&plan).unwrap_or_default()
    }
}

impl DevicePlan {
    fn of(snapshot: &vmm::snapshot::Snapshot) -> Result<DevicePlan, String> {
        serde_json::from_str(&snapshot.state.owner)
            .map_err(|e| format!("the snapshot's device plan cannot be read: {e}"))
    }

    /// The NICs of a restored VM: the MACs given with `--net` in place of
    /// the saved ones, in order (clones need their own), or the saved
    /// ones.
    fn nets(&self, given: Vec<Nic>) -> Result<Vec<Nic>, String> {
        let saved = self
            .nets
            .iter()
            .map(|n| n.parse::<Nic>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("the snapshot's device plan: {e}"))?;
        let given = replacing(&saved, given, "NIC(s)", "--net MAC(s)")?;
        for (i, (saved, new)) in saved.iter().map(|n| n.mac).zip(&given).enumerate() {
            if saved != new.mac && !new.any_source {
                tracing::warn!(
                    "NIC {i}: {} replaces the saved {saved}; a guest that read its MAC at \
                     boot (Linux does) keeps sending from {saved}, which the switch drops \
                     unless the NIC is given as {},any-source",
                    new.mac,
                    new.mac
                );
            }
        }
        Ok(given)
    }

    /// The file shares of a restored VM: those given with `--fs` in place
    /// of the saved ones, in order (another server, token or cache for
    /// the same tag), or the saved ones.
    fn shares(&self, given: Vec<Share>) -> Result<Vec<Share>, String> {
        let given = replacing(&self.shares, given, "file share(s)", "--fs share(s)")?;
        for (i, (saved, new)) in self.shares.iter().zip(&given).enumerate() {
            if saved.tag != new.tag {
                return Err(format!(
                    "--fs share {} has tag {:?}; the snapshot's share {} has tag {:?}",
                    i + 1,
                    new.tag,
                    i + 1,
                    saved.tag
                ));
            }
        }
        Ok(given)
    }

    /// The disks of a restored VM: those given with `--disk` in place of
    /// the saved ones, in order (a copy of each, for a clone), or the
    /// saved ones. Each must have the size the guest saw (the device's
    /// saved state checks it).
    fn disks(&self, given: Vec<Disk>) -> Result<Vec<Disk>, String> {
        let saved = self
            .disks
            .iter()
            .map(|d| d.parse::<Disk>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("the snapshot's device plan: {e}"))?;
        replacing(&saved, given, "disk(s)", "--disk(s)")
    }
}

fn read_run_file(path: &Path) -> Result<Vec<Planned>, Box<dyn std::error::Error + Send + Sync>> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path:?}: {e}"))?;
    let file: RunFile = serde_json::from_str(&text).map_err(|e| format!("{path:?}: {e}"))?;
    if file.vms.is_empty() {
        return Err(format!("{path:?} lists no VMs").into());
    }
    let base = path.parent().unwrap_or(Path::new("."));
    let mut names = std::collections::HashSet::new();
    file.vms
        .into_iter()
        .map(|vm| {
            if !names.insert(vm.name.clone()) {
                return Err(format!("{path:?}: two VMs are named {:?}", vm.name).into());
            }
            let nets = vm
                .nets
                .iter()
                .map(|m| m.parse().map_err(|e| format!("VM {:?}: {e}", vm.name)))
                .collect::<Result<Vec<Nic>, _>>()?;
            let shares = vm
                .shares
                .iter()
                .map(|s| s.parse().map_err(|e| format!("VM {:?}: {e}", vm.name)))
                .collect::<Result<Vec<Share>, _>>()?;
            let vhost_user_shares = vm
                .vhost_user_shares
                .iter()
                .map(|s| {
                    // Like the kernel's, a relative socket path is the
                    // file's.
                    s.parse().map(|v: VhostUserShare| VhostUserShare {
                        socket: base.join(&v.socket),
                        ..v
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let disks = vm
                .disks
                .iter()
                .map(|d| {
                    // Like the kernel's, a relative disk path is the file's.
                    d.parse().map(|d: Disk| d.relative_to(base))
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("VM {:?}: {e}", vm.name))?;
            let serial = match vm.serial_file {
                Some(f) => SerialOutput::File(base.join(f)),
                None => SerialOutput::StdoutPrefixed(format!("{}: ", vm.name)),
            };
            let kernel = match (vm.kernel, vm.restore) {
                (Some(kernel), None) => kernel,
                (None, Some(dir)) => {
                    let snapshot = vmm::snapshot::Snapshot::open(&base.join(dir))
                        .map_err(|e| format!("VM {:?}: {}", vm.name, super::chain(&e)))?;
                    let plan =
                        DevicePlan::of(&snapshot).map_err(|e| format!("VM {:?}: {e}", vm.name))?;
                    let nets = plan
                        .nets(nets)
                        .map_err(|e| format!("VM {:?}: {e}", vm.name))?;
                    let shares = plan
                        .shares(shares)
                        .map_err(|e| format!("VM {:?}: {e}", vm.name))?;
                    let disks = plan
                        .disks(disks)
                        .map_err(|e| format!("VM {:?}: {e}", vm.name))?;
                    return Ok(Planned {
                        name: vm.name,
                        config: VmConfig {
                            serial,
                            serial_input: false,
                            ..snapshot.state.config.clone()
                        },
                        nets,
                        shares,
                        vhost_user_shares,
                        disks,
                        control: vm.control.map(|c| base.join(c)),
                        restore: Some(snapshot),
                    });
                }
                _ => {
                    return Err(format!(
                        "{path:?}: VM {:?} needs either \"kernel\" or \"restore\"",
                        vm.name
                    )
                    .into());
                }
            };
            Ok(Planned {
                name: vm.name,
                config: VmConfig {
                    kernel: base.join(kernel),
                    initrd: vm.initrd.map(|p| base.join(p)),
                    cmdline: vm.cmdline,
                    vcpus: vm.vcpus,
                    mem_mib: vm.mem_mib,
                    boot: vm.boot.into(),
                    serial,
                    serial_input: false,
                    shared_memory: !vhost_user_shares.is_empty(),
                },
                nets,
                shares,
                vhost_user_shares,
                disks,
                control: vm.control.map(|c| base.join(c)),
                restore: None,
            })
        })
        .collect()
}

/// Gives back to the kernel the heap pages that starting the VMs used and
/// freed (parsing, reading a snapshot's state): glibc keeps them mapped
/// otherwise, and with a thousand clones on a host each one's share of
/// them counts.
fn release_startup_heap() {
    #[cfg(target_env = "gnu")]
    // malloc_trim only walks and trims the allocator's own free
    // lists, under its own locks; it takes no pointers from us.
    // SAFETY: sound for the reasons just given.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Waits on `at` for one migration and receives its VM; returns the
/// connection to answer on once the VM runs. A `tls:` address uses the
/// switch's TLS identity (`--tls-cert`, `--tls-key`, `--tls-ca`).
fn accept_migration(
    at: &str,
    switch: &SwitchArgs,
) -> Result<(Conn, vmm::snapshot::Snapshot), Box<dyn std::error::Error + Send + Sync>> {
    let at: link::Address = at.parse()?;
    let tls = match (&switch.tls_cert, &switch.tls_key, &switch.tls_ca) {
        (Some(c), Some(k), Some(a)) => Some(vnet::tunnel::TlsConfig::from_pem_files(c, k, a)?),
        _ => None,
    };
    let listener = link::Listener::bind(&at, tls)?;
    tracing::info!("waiting for a migration on {}", listener.local());
    let (mut conn, peer) = listener.accept()?;
    drop(listener);
    tracing::info!("receiving a VM from {peer}");
    let snapshot = vmm::migration::receive(&mut conn)
        .map_err(|e| format!("the migration from {peer} failed: {}", chain(&e)))?;
    Ok((conn, snapshot))
}

/// Refuses a MAC given to two NICs (of one VM or of two): on one switch
/// they would take each other's frames.
fn check_macs(planned: &[Planned]) -> Result<(), String> {
    let mut seen = std::collections::HashMap::new();
    let several = planned.len() > 1;
    for p in planned {
        for (i, nic) in p.nets.iter().enumerate() {
            let who = if several {
                format!("VM {:?} NIC {i}", p.name)
            } else {
                format!("NIC {i}")
            };
            if let Some(first) = seen.insert(nic.mac, who.clone()) {
                return Err(format!(
                    "MAC {} is given to two NICs ({first} and {who}): each NIC on the switch needs its own",
                    nic.mac
                ));
            }
        }
    }
    Ok(())
}

/// Makes the VM's overlays durable as it ends, and logs what its image
/// disks read, and fetched from their servers.
fn close_disks(who: &str, disks: &[DiskHandle]) {
    for (i, d) in disks.iter().enumerate() {
        if let Err(e) = d.flush() {
            tracing::warn!("{who}disk {}: cannot flush its overlay: {e}", i + 1);
        }
        match d.report() {
            Some((read, Some(fetched))) => tracing::info!(
                "{who}disk {}: fetched_bytes={} fetch_requests={} fetched_chunks={} chunks_read={} from {}",
                i + 1,
                fetched.bytes,
                fetched.requests,
                fetched.chunks,
                read.chunks,
                d.remote.as_ref().map_or_else(String::new, |r| r.url()),
            ),
            Some((read, None)) => tracing::info!(
                "{who}disk {}: chunks_read={} bytes_read={} from the local store",
                i + 1,
                read.chunks,
                read.bytes
            ),
            None => {}
        }
    }
}

pub fn run(args: RunArgs, process_start: Instant) -> CliResult {
    let serial = args
        .serial_file
        .clone()
        .map_or(SerialOutput::Stdout, SerialOutput::File);
    // A migration's source, told once the VM runs here (or why not).
    let mut incoming = None;
    let received = match &args.incoming {
        Some(addr) => {
            let (stream, snapshot) = accept_migration(addr, &args.switch)?;
            incoming = Some(stream);
            Some(snapshot)
        }
        None => None,
    };
    let snapshot = match &args.restore {
        Some(dir) => Some(vmm::snapshot::Snapshot::open(dir)?),
        None => received,
    };
    let planned = match (&args.config, snapshot) {
        (Some(path), _) => read_run_file(path)?,
        (None, Some(snapshot)) => {
            let plan = DevicePlan::of(&snapshot)?;
            if let Some(at) = &args.incoming
                && let Err(why) = plan.check_trusted(at, &args.disks, &args.shares)
            {
                // The source hears why, and runs the VM on.
                if let Some(source) = incoming.as_mut() {
                    let _ = vmm::migration::ready(source, Err(&why));
                }
                return Err(why.into());
            }
            vec![Planned {
                name: "vm".into(),
                config: VmConfig {
                    serial,
                    serial_input: !args.no_stdin,
                    ..snapshot.state.config.clone()
                },
                nets: plan.nets(args.nets)?,
                shares: plan.shares(args.shares)?,
                vhost_user_shares: args.vhost_user_shares,
                disks: plan.disks(args.disks)?,
                control: args.control,
                restore: Some(snapshot),
            }]
        }
        (None, None) => vec![Planned {
            name: "vm".into(),
            config: VmConfig {
                // clap requires --kernel when there is no --config.
                kernel: args.kernel.clone().unwrap_or_default(),
                initrd: args.initrd,
                cmdline: args.cmdline,
                vcpus: args.vcpus,
                mem_mib: args.mem,
                boot: args.boot.into(),
                serial,
                serial_input: !args.no_stdin,
                shared_memory: args.shared_memory || !args.vhost_user_shares.is_empty(),
            },
            nets: args.nets,
            shares: args.shares,
            vhost_user_shares: args.vhost_user_shares,
            disks: args.disks,
            control: args.control,
            restore: None,
        }],
    };
    let several = planned.len() > 1;
    let named = |name: &str, e: vmm::VmError| -> Box<dyn std::error::Error + Send + Sync> {
        if several {
            format!("VM {name}: {e}").into()
        } else {
            Box::new(e)
        }
    };
    check_macs(&planned)?;
    for path in planned.iter().filter_map(|p| p.control.as_ref()) {
        vmm::control::clear_stale(path)?;
    }
    // Every VM's file shares connect and authenticate before any guest
    // starts: a server that is down or a wrong token stops the run here.
    let mut servers = Vec::with_capacity(planned.len());
    for p in &planned {
        let connected = p
            .shares
            .iter()
            .map(Share::connect)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> {
                if several {
                    format!("VM {}: {e}", p.name).into()
                } else {
                    e
                }
            })?;
        servers.push(connected);
    }
    let vnet = args.switch.start()?;
    let switch = vnet.switch().clone();
    let mut running = Vec::with_capacity(planned.len());
    for (mut p, servers) in planned.into_iter().zip(servers) {
        // Every line logged for this VM, from any of its threads, names
        // it when the process runs several.
        let span = if several {
            tracing::info_span!("vm", name = %p.name)
        } else {
            tracing::Span::none()
        };
        let _in_vm = span.enter();
        let restore = p.restore.take();
        let owner = p.device_plan();
        let mut vm = match &restore {
            Some(s) => Vm::build_with_memory(&p.config, s.memory.clone(), process_start),
            None => Vm::build(&p.config, process_start),
        }
        .map_err(|e| named(&p.name, e))?;
        let mut devices = Vec::new();
        for (i, mac) in p.nets.iter().enumerate() {
            let port = format!("{}-net{i}", p.name);
            let nic = Net::with_source(switch.clone(), &port, mac.mac, mac.source())?;
            let nic = Arc::new(Mutex::new(nic));
            vm.add_virtio_device(Box::new(nic.clone()), Some(nic))?;
            devices.push(DeviceInfo::Net {
                mac: mac.to_string(),
                port,
            });
        }
        for (share, server) in p.shares.iter().zip(servers) {
            let fs = Fs::new(&share.tag, server)?;
            vm.add_virtio_device(Box::new(fs), None)?;
            devices.push(DeviceInfo::Fs {
                tag: share.tag.clone(),
                server: share.server.clone(),
            });
        }
        for share in &p.vhost_user_shares {
            let fs = VhostUserFs::connect(&share.tag, &share.socket)?;
            vm.add_virtio_device(Box::new(fs), None)?;
            devices.push(DeviceInfo::VhostUserFs {
                tag: share.tag.clone(),
                socket: share.socket.display().to_string(),
            });
        }
        let mut disks = Vec::new();
        for (i, disk) in p.disks.iter().enumerate() {
            let (blk, handle) = disk
                .open()
                .map_err(|e| format!("disk {}: {}", i + 1, chain(&e)))?;
            devices.push(DeviceInfo::Blk {
                path: disk.describe(),
                read_only: disk.read_only(),
                sectors: blk.capacity_sectors(),
                overlay: disk.overlay().map(|o| o.display().to_string()),
                store: disk.store(),
                fetched_bytes: handle.remote.as_ref().map(|_| 0),
                fetched_chunks: handle.remote.as_ref().map(|_| 0),
            });
            vm.add_virtio_device(Box::new(blk), None)?;
            disks.push(handle);
        }
        let how = if incoming.is_some() {
            Restore::Migration
        } else {
            Restore::Snapshot
        };
        let started = match &restore {
            Some(s) => vm.start_restored(&s.state, how),
            None => vm.start(),
        };
        if let Some(mut source) = incoming.take() {
            // Built and paused: it runs here only once the source has let
            // it go (and stopped it there), so that it never runs twice.
            let why = started.as_ref().err().map(|e| chain(e));
            let run = vmm::migration::ready(&mut source, why.as_deref().map_or(Ok(()), Err))
                .map_err(|e| {
                    format!(
                        "the migration did not complete, the VM does not run here: {}",
                        chain(&e)
                    )
                })?;
            // (`ready` failed above if the VM could not be built.)
            if let Ok(vm) = &started {
                vm.resume_migrated(run).map_err(|e| named(&p.name, e))?;
                if let Err(e) = vmm::migration::running(&mut source) {
                    // The source stays paused and says why: the VM is here.
                    tracing::warn!("cannot tell the migration's source that the VM runs here: {e}");
                }
                tracing::info!("the migrated VM runs here");
            }
        }
        let vm = Arc::new(started.map_err(|e| named(&p.name, e))?);
        if let (Some(s), Restore::Snapshot) = (&restore, how) {
            s.record_working_set_later(vm.clone());
        }
        let control = match &p.control {
            Some(path) => {
                let remotes: Vec<_> = disks.iter().map(|d| d.remote.clone()).collect();
                let handler =
                    VmControl::new(vm.clone(), p.config.vcpus, p.config.mem_mib, devices, owner)
                        .with_refresh(Box::new(move |devices| {
                            let blks = devices
                                .iter_mut()
                                .filter(|d| matches!(d, DeviceInfo::Blk { .. }));
                            for (d, remote) in blks.zip(&remotes) {
                                if let (
                                    DeviceInfo::Blk {
                                        fetched_bytes,
                                        fetched_chunks,
                                        ..
                                    },
                                    Some(r),
                                ) = (d, remote)
                                {
                                    let f = r.fetched();
                                    *fetched_bytes = Some(f.bytes);
                                    *fetched_chunks = Some(f.chunks);
                                }
                            }
                        }));
                Some(ControlServer::serve(path, Arc::new(handler))?)
            }
            None => None,
        };
        running.push((p.name.clone(), vm, control, disks));
    }
    release_startup_heap();
    let mut code = 0;
    for (name, vm, control, disks) in running {
        let exit = vm.wait()?;
        drop(control);
        let who = if several {
            format!("VM {name}: ")
        } else {
            String::new()
        };
        close_disks(&who, &disks);
        match &exit {
            VmExit::GuestShutdown | VmExit::Stopped | VmExit::Migrated { .. } => {
                tracing::info!("{who}{exit}")
            }
            VmExit::Signal(_) => tracing::warn!("{who}{exit}"),
            _ => eprintln!("vmplant: {who}{exit}"),
        }
        if code == 0 {
            code = exit.exit_code();
        }
    }
    vnet.shutdown();
    Ok(ExitCode::from(code))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(s: &str) -> Share {
        s.parse().unwrap()
    }

    #[test]
    fn restored_nics_keep_their_source_policy_unless_given_anew() {
        // Plans written before the policy was kept hold bare MACs.
        let plan: DevicePlan = serde_json::from_str(
            r#"{"nets":["52:54:00:00:00:01","52:54:00:00:00:02,any-source"]}"#,
        )
        .unwrap();
        let saved = plan.nets(Vec::new()).unwrap();
        assert_eq!(
            saved
                .iter()
                .map(|n| (n.spec(), n.any_source))
                .collect::<Vec<_>>(),
            vec![
                ("52:54:00:00:00:01".to_string(), false),
                ("52:54:00:00:00:02,any-source".to_string(), true)
            ]
        );
        let given: Vec<Nic> = vec!["52:54:00:00:00:03".parse().unwrap(); 2];
        assert_eq!(plan.nets(given.clone()).unwrap(), given);
        assert!(
            plan.nets(vec![given[0]])
                .unwrap_err()
                .contains("has 2 NIC(s)")
        );
    }

    #[test]
    fn restored_shares_are_the_saved_ones_or_the_same_tags_given() {
        let plan = DevicePlan {
            disks: Vec::new(),
            nets: Vec::new(),
            shares: vec![
                share("a=h:1,token-file=/t,plaintext"),
                share("b=h:1,token-file=/t,plaintext"),
            ],
        };
        let json = serde_json::to_string(&plan).unwrap();
        let plan: DevicePlan = serde_json::from_str(&json).unwrap();
        assert_eq!(plan.shares(Vec::new()).unwrap(), plan.shares);
        let moved = vec![
            share("a=other:2,token-file=/u,plaintext"),
            share("b=other:2,token-file=/u,tls-ca=/ca"),
        ];
        assert_eq!(plan.shares(moved.clone()).unwrap(), moved);
        let err = plan
            .shares(vec![share("a=h:1,token-file=/t,plaintext")])
            .unwrap_err();
        assert!(err.contains("2 file share(s), and 1"), "{err}");
        let err = plan
            .shares(vec![
                share("b=h:1,token-file=/t,plaintext"),
                share("a=h:1,token-file=/t,plaintext"),
            ])
            .unwrap_err();
        assert!(err.contains(r#"tag "b""#), "{err}");
        // A plan written before shares were saved has none.
        let old: DevicePlan = serde_json::from_str(r#"{"nets":[]}"#).unwrap();
        assert!(old.shares.is_empty());
    }

    #[test]
    fn restored_disks_are_the_saved_ones_or_as_many_given() {
        let old: DevicePlan = serde_json::from_str(r#"{"nets":[]}"#).unwrap();
        assert!(old.disks(Vec::new()).unwrap().is_empty());
        let plan: DevicePlan =
            serde_json::from_str(r#"{"nets":[],"disks":["/a.img","/b.img,ro"]}"#).unwrap();
        let saved = plan.disks(Vec::new()).unwrap();
        assert_eq!(
            saved.iter().map(Disk::spec).collect::<Vec<_>>(),
            ["/a.img", "/b.img,ro"]
        );
        let copies: Vec<Disk> = vec!["/c.img".parse().unwrap(), "/d.img,ro".parse().unwrap()];
        assert_eq!(plan.disks(copies.clone()).unwrap(), copies);
        let err = plan.disks(copies[..1].to_vec()).unwrap_err();
        assert!(err.contains("2 disk(s), and 1"), "{err}");
    }

    #[test]
    fn a_saved_share_names_its_files_absolutely() {
        let s = share("a=h:1,token-file=tok,plaintext,cache-dir=c").absolute();
        assert!(s.token_file.is_absolute() && s.token_file.ends_with("tok"));
        assert!(s.cache_dir.unwrap().is_absolute());
    }
}
