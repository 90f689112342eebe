//! `vmplant vnet`: a switch with no VMs.

use super::CliResult;
use clap::Args;

#[derive(Debug, Args)]
pub struct VnetArgs {}

pub fn run(_args: VnetArgs) -> CliResult {
    Err("`vmplant vnet` is being built".into())
}
