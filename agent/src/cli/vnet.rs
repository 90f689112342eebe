//! `vmplant vnet`: a switch with no VMs.
//!
//! Runs one VNET switch with TAP ports and tunnels until SIGINT or
//! SIGTERM, then stops the tunnels, deletes the TAPs and exits 128 + the
//! signal's number (130, 143), as `run` and `gvfs` do. Tunnel state
//! changes are logged (`-v` for more).

use super::CliResult;
use super::switch::SwitchArgs;
use clap::Args;
use nix::sys::signal::{SigSet, Signal};
use std::sync::mpsc;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct VnetArgs {
    #[command(flatten)]
    pub switch: SwitchArgs,
    /// Print the status (ports, tunnels, counters) as one JSON line on
    /// standard output every this many seconds (0: never).
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    pub status_every: u64,
}

pub fn run(args: VnetArgs) -> CliResult {
    if !args.switch.has_ports() {
        return Err("nothing to switch: give --tap, --listen or --connect".into());
    }
    // Block the signals before any thread starts, so that only sigwait
    // below receives them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block()?;

    let vnet = args.switch.start()?;

    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(sig) = signals.wait() {
                let _ = tx.send(sig);
            }
        })?;
    let every = match args.status_every {
        0 => Duration::from_secs(3600),
        n => Duration::from_secs(n),
    };
    let sig = loop {
        match rx.recv_timeout(every) {
            Ok(sig) => break sig,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if args.status_every > 0 {
                    println!("{}", serde_json::to_string(&vnet.status())?);
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break Signal::SIGTERM,
        }
    };
    tracing::info!(signal = %sig, "shutting down");
    vnet.shutdown();
    // As a shell reports a process the signal killed: 130, 143.
    Ok(super::gvfs::signal_exit(Some(sig as i32)))
}
