//! `vmplant`: the VM host agent and its command line.

mod agent;
mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let process_start = std::time::Instant::now();
    // Bad arguments are bad input: status 1, as for every other kind
    // (clap's own status 2 is a triple fault's here).
    let args = match cli::Cli::try_parse() {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 1 } else { 0 });
        }
    };
    cli::init_logging(args.verbose);
    match cli::dispatch(args.command, process_start) {
        Ok(code) => code,
        Err(err) => {
            // What failed, then why, down to the OS's reason (not
            // eprintln!, which panics when standard error is closed).
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "vmplant: {}", cli::chain(err.as_ref()));
            ExitCode::from(1)
        }
    }
}
