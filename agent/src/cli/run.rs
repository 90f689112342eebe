//! `vmplant run`: boot one guest.

use super::CliResult;
use clap::Args;

#[derive(Debug, Args)]
pub struct RunArgs {}

pub fn run(_args: RunArgs) -> CliResult {
    Err("`vmplant run` is being built".into())
}
