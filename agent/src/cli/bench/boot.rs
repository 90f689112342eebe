//! `vmplant bench boot`.

use crate::cli::CliResult;
use clap::Args;

#[derive(Debug, Args)]
pub struct BootBenchArgs {}

pub fn run(_args: BootBenchArgs) -> CliResult {
    Err("`vmplant bench boot` is being built".into())
}
