//! `vmplant bench`: benchmarks that print JSON lines and a summary line,
//! side by side with the anchors in ../shared/anchors.

mod boot;
mod measure;

use super::CliResult;
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Boot the test guest N times in vmplant, Firecracker and Cloud
    /// Hypervisor in turn: time to the first ready line, and RSS.
    Boot(boot::BootBenchArgs),
}

pub fn run(cmd: BenchCommand) -> CliResult {
    match cmd {
        BenchCommand::Boot(args) => boot::run(args),
    }
}
