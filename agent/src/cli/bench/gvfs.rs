//! `vmplant bench gvfs`: sequential and random reads, stat and readdir,
//! through the local file system, a GVFS mount (plain TCP and TLS) and
//! sshfs, over loopback. The measurements are `gvfs::bench`'s.

use crate::cli::CliResult;
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct GvfsBenchArgs {
    /// Size of the file read sequentially, in MiB.
    #[arg(long, default_value_t = 1024, value_parser = crate::cli::mib)]
    pub file_mib: u64,
    /// Files in the directory stat and readdir go over.
    #[arg(long, default_value_t = 10_000)]
    pub files: usize,
    /// 4 KiB random reads per target.
    #[arg(long, default_value_t = 20_000)]
    pub random_reads: usize,
    /// Leave out sshfs (which needs openssh-server and sshfs installed).
    #[arg(long)]
    pub no_sshfs: bool,
    /// Work directory (test data, mount points, sshd files).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

pub fn run(args: GvfsBenchArgs) -> CliResult {
    let defaults = gvfs::bench::BenchConfig::default();
    let cfg = gvfs::bench::BenchConfig {
        dir: args.dir.unwrap_or(defaults.dir),
        file_mib: args.file_mib,
        files: args.files,
        random_reads: args.random_reads,
        sshfs: !args.no_sshfs,
    };
    gvfs::bench::run(&cfg, &mut std::io::stdout())?;
    Ok(ExitCode::SUCCESS)
}
