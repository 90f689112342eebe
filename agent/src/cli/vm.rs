//! `vmplant vm`: the client of a running VMM's control socket.

use super::CliResult;
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use vmm::control::protocol::TlsFiles;
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
    /// Pause the VM, save it into DIR (`state` and a sparse `memory`
    /// file), and let it run again; print what was written as JSON.
    /// `vmplant run --restore DIR` brings it back in a new process.
    Snapshot {
        dir: PathBuf,
        /// End the VM once it is saved, instead of resuming it.
        #[arg(long)]
        stop: bool,
    },
    /// Move the running VM to a `vmplant run --incoming` (TO:
    /// tcp:HOST:PORT, tls:HOST:PORT or unix:PATH): memory is copied while the guest runs, then
    /// the guest pauses for the last pages and its state. Prints
    /// `{"migration":"completed","total_ms":..,"downtime_ms":..,"rounds":..,"bytes":..}`
    /// once the destination runs it (the VM then ends here), or
    /// `{"migration":"failed","error":".."}` (exit status 1) and the VM
    /// runs on here.
    Migrate {
        to: String,
        /// The longest pause the guest should see.
        #[arg(long, value_name = "MS")]
        downtime_ms: Option<u64>,
        /// For tls:HOST:PORT: this VM's certificate chain (PEM); HOST must
        /// be a name the destination's certificate has.
        #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
        tls_cert: Option<PathBuf>,
        /// Its private key (PEM).
        #[arg(long, value_name = "FILE", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// The CA certificate(s) that sign the destination's (PEM).
        #[arg(long, value_name = "FILE", requires = "tls_cert")]
        tls_ca: Option<PathBuf>,
    },
}

pub fn run(args: VmArgs) -> CliResult {
    let request = match args.op {
        Op::Info => Request::Info,
        Op::Pause => Request::Pause,
        Op::Resume => Request::Resume,
        Op::Stop => Request::Stop,
        Op::Snapshot { dir, stop } => Request::Snapshot {
            // The VMM may run in another directory.
            dir: std::path::absolute(&dir)?,
            stop,
        },
        Op::Migrate {
            to,
            downtime_ms,
            tls_cert,
            tls_key,
            tls_ca,
        } => Request::Migrate {
            // The VMM may run in another directory.
            to: match to.strip_prefix("unix:") {
                Some(path) => format!("unix:{}", std::path::absolute(path)?.display()),
                None => to,
            },
            downtime_ms,
            tls: match (tls_cert, tls_key, tls_ca) {
                // The VMM may run in another directory.
                (Some(cert), Some(key), Some(ca)) => Some(TlsFiles {
                    cert: std::path::absolute(cert)?,
                    key: std::path::absolute(key)?,
                    ca: std::path::absolute(ca)?,
                }),
                _ => None,
            },
        },
    };
    // A migration's rounds, as they go, on standard error.
    let mut progress = |p: &serde_json::Value| {
        eprintln!(
            "migrating: round {} sent {} MiB, {} KiB dirty, {} MiB/s",
            p["round"],
            p["sent_bytes"].as_u64().unwrap_or(0) >> 20,
            p["dirty_bytes"].as_u64().unwrap_or(0) >> 10,
            p["mib_s"]
        )
    };
    let result = match control::call_with_progress(&args.control, &request, &mut progress) {
        Err(e) if matches!(request, Request::Migrate { .. }) => {
            let why = super::chain(&e);
            println!(
                "{}",
                serde_json::json!({ "migration": "failed", "error": why })
            );
            return Err(e.into());
        }
        result => result?,
    };
    match request {
        Request::Info => println!("{}", serde_json::to_string_pretty(&result)?),
        Request::Snapshot { .. } | Request::Migrate { .. } => println!("{result}"),
        _ => {}
    }
    Ok(ExitCode::SUCCESS)
}
