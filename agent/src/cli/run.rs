//! `vmplant run`: boot one guest with its serial console on standard
//! output, until it shuts down or the host stops it.

use super::CliResult;
use clap::{Args, ValueEnum};
use devices::virtio::net::Net;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use vmm::{BootProtocol, SerialOutput, Vm, VmConfig, VmExit};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The guest kernel: an ELF vmlinux or a bzImage.
    #[arg(long)]
    pub kernel: PathBuf,
    /// An initial ramdisk for the kernel.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// The kernel command line [default: console=ttyS0 reboot=k panic=1 pci=off].
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
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
    /// process's VNET switch (repeatable).
    #[arg(long = "net", value_name = "MAC")]
    pub nets: Vec<vnet::Mac>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Boot {
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

pub fn run(args: RunArgs, process_start: Instant) -> CliResult {
    let config = VmConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        vcpus: args.vcpus,
        mem_mib: args.mem,
        boot: args.boot.into(),
        serial: args
            .serial_file
            .map_or(SerialOutput::Stdout, SerialOutput::File),
        serial_input: !args.no_stdin,
    };
    let mut vm = Vm::build(&config, process_start)?;
    let switch = vnet::Switch::new(vnet::SwitchConfig::default())?;
    for (i, mac) in args.nets.iter().enumerate() {
        let nic = Arc::new(Mutex::new(Net::new(
            switch.clone(),
            &format!("net{i}"),
            *mac,
        )?));
        vm.add_virtio_device(Box::new(nic.clone()), Some(nic))?;
    }
    let exit = vm.run()?;
    match &exit {
        VmExit::GuestShutdown => tracing::info!("{exit}"),
        VmExit::Signal(_) => tracing::warn!("{exit}"),
        _ => eprintln!("vmplant: {exit}"),
    }
    Ok(ExitCode::from(exit.exit_code()))
}
