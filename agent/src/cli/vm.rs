//! `vmplant vm`: the client of a running VMM's control socket.

use super::CliResult;
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use vmm::control::{self, Request};

#[derive(Debug, Args)]
pub struct VmArgs {
    /// The VM's control socket (`vmplant run --control PATH`).
    #[arg(long, value_name = "PATH")]
    control: PathBuf,
    #[command(subcommand)]
    op: Op,
}

#[derive(Debug, Subcommand)]
enum Op {
    /// Print the VM's state, vCPUs, memory and devices as JSON.
    Info,
    /// Stop the vCPUs (the devices go on); the console shows all the guest
    /// wrote before.
    Pause,
    /// Let the vCPUs run again.
    Resume,
    /// End the VM; its `vmplant run` exits 0.
    Stop,
}

pub fn run(args: VmArgs) -> CliResult {
    let request = match args.op {
        Op::Info => Request::Info,
        Op::Pause => Request::Pause,
        Op::Resume => Request::Resume,
        Op::Stop => Request::Stop,
    };
    let result = control::call(&args.control, &request)?;
    if request == Request::Info {
        println!("{}", serde_json::to_string_pretty(&result)?);
    }
    Ok(ExitCode::SUCCESS)
}
