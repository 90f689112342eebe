//! Command-line parsing and dispatch: one module per subcommand.

mod agent;
mod bench;
pub(crate) mod ctl;
mod disk;
mod gvfs;
mod host;
mod image;
mod nic;
mod pki;
mod run;
mod share;
mod switch;
mod vm;
mod vnet;

pub use switch::chain;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// The VM host agent: boots guests on KVM, switches their networks,
/// serves their files and disks.
#[derive(Debug, Parser)]
#[command(name = "vmplant", version, about)]
pub struct Cli {
    /// More log output (-v: debug, -vv: trace). RUST_LOG overrides it.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot one guest (its serial console on standard output), or several
    /// on one switch from a JSON file (--config).
    Run(Box<run::RunArgs>),
    /// Control a running VM through its control socket.
    Vm(vm::VmArgs),
    /// Run a VNET switch with no VMs (TAP and tunnel ports only).
    Vnet(vnet::VnetArgs),
    /// GVFS: serve a directory, or mount a served one with FUSE.
    #[command(subcommand)]
    Gvfs(gvfs::GvfsCommand),
    /// Print what this host's KVM offers (kind of virtualization, limits).
    Host,
    /// Manage an image store: import, commit, ls, info, rm, gc.
    Image(image::ImageArgs),
    /// Make a CA and the certificates TLS tunnels and GVFS servers need.
    Pki(pki::PkiArgs),
    /// Run the host's VM agent: a REST API, records in a state dir, one
    /// VMM process per VM.
    Agent(agent::AgentArgs),
    /// A client of the agent's API.
    Ctl(ctl::CtlArgs),
    /// Benchmarks, side by side with Firecracker and Cloud Hypervisor.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// Parses a size in MiB, refusing one whose byte count does not fit in 64
/// bits (so that `<< 20` on it cannot wrap).
pub fn mib(s: &str) -> Result<u64, String> {
    const MAX: u64 = u64::MAX >> 20;
    let n: u64 = s
        .parse()
        .map_err(|e| format!("{s:?} is not a number of MiB: {e}"))?;
    if n > MAX {
        return Err(format!("{n} MiB is too large (at most {MAX} MiB)"));
    }
    Ok(n)
}

/// Any error a subcommand returns; printed as one line by `main`.
pub type CliResult = Result<ExitCode, Box<dyn std::error::Error + Send + Sync>>;

pub fn dispatch(command: Command, process_start: std::time::Instant) -> CliResult {
    match command {
        Command::Run(args) => run::run(*args, process_start),
        Command::Vm(args) => vm::run(args),
        Command::Vnet(args) => vnet::run(args),
        Command::Gvfs(cmd) => gvfs::run(cmd),
        Command::Host => host::run(),
        Command::Image(args) => image::run(args),
        Command::Pki(args) => pki::run(args),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Agent(args) => agent::run(args),
        Command::Ctl(args) => ctl::run(args),
    }
}

/// Logs go to standard error so that the guest console keeps standard output.
///
/// Without RUST_LOG a plain level filter does: the directive parser of
/// `EnvFilter` is only brought in (and paged in) when RUST_LOG asks.
pub fn init_logging(verbose: u8) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::filter::LevelFilter;
    // Colours only on a terminal, never in files or pipes, and never
    // when NO_COLOR is set (https://no-color.org).
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    // A log line that cannot be written (standard error closed, say a
    // pipe to `head` that ended) is dropped: the subscriber's own report
    // of it would panic in eprintln! and take a vCPU thread down.
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .log_internal_errors(false);
    match std::env::var_os("RUST_LOG") {
        Some(_) => builder
            .with_env_filter(EnvFilter::from_default_env())
            .init(),
        None => builder
            .with_max_level(match verbose {
                0 => LevelFilter::INFO,
                1 => LevelFilter::DEBUG,
                _ => LevelFilter::TRACE,
            })
            .init(),
    }
}
