//! `vmplant`: the VM host agent and its command line.

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    cli::init_logging(args.verbose);
    match cli::dispatch(args.command) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("vmplant: {err}");
            ExitCode::from(1)
        }
    }
}
