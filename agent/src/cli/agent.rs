//! `vmplant agent`: the host's VM agent daemon (see `crate::agent`).

use super::CliResult;
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Where the agent keeps its records, the VMs' sockets and console
    /// logs, and snapshots (created, mode 0700).
    #[arg(long, value_name = "DIR")]
    state_dir: PathBuf,
    /// Where to serve the API: unix:PATH, or tcp:ADDR:PORT (TLS, with
    /// --tls-cert and --tls-key); may be given more than once.
    #[arg(long, value_name = "unix:PATH|tcp:ADDR:PORT", required = true)]
    listen: Vec<String>,
    /// The certificate chain (PEM) for tcp: listeners.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The tokens file: {"tokens":[{"token","tenant","role":"admin|tenant|reader","quota":{"vms","vcpus","mem_mib"}}]}.
    #[arg(long, value_name = "FILE")]
    tokens: PathBuf,
    /// A directory tenants' kernels and initrds may come from (may be
    /// given more than once; admins may boot any file).
    #[arg(long, value_name = "DIR")]
    kernel_dir: Vec<PathBuf>,
}

pub fn run(args: AgentArgs) -> CliResult {
    crate::agent::run(crate::agent::Options {
        state_dir: args.state_dir,
        listen: args.listen,
        tokens: args.tokens,
        tls: args.tls_cert.zip(args.tls_key),
        kernel_dirs: args.kernel_dir,
    })?;
    Ok(ExitCode::SUCCESS)
}
