//! `vmplant gvfs`: serve or mount a GVFS file system.

use super::CliResult;
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum GvfsCommand {}

pub fn run(cmd: GvfsCommand) -> CliResult {
    match cmd {}
}
