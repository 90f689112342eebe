//! `vmplant`: the VM host agent and its command line.

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let process_start = std::time::Instant::now();
    let args = cli::Cli::parse();
    cli::init_logging(args.verbose);
    match cli::dispatch(args.command, process_start) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("vmplant: {err}");
            ExitCode::from(1)
        }
    }
}
