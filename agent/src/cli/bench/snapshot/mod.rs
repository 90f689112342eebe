//! `vmplant bench snapshot`: snapshot, restore and clones, vmplant and
//! Firecracker side by side in one run, on the same test guest
//! (tests/probe) with the same vCPUs and memory.
//!
//! - `create`: a guest of `--mem` MiB fills `--fill` MiB (`fill:MIB`),
//!   then idles (`tick:1000`); after its first tick it is saved. vmplant:
//!   `vmplant vm --control C snapshot DIR --stop`, its own `ms` and the
//!   command's wall time; Firecracker: `PATCH /vm` Paused then
//!   `PUT /snapshot/create` Full, each timed. Then the files' disk use
//!   (allocated blocks, `st_blocks` * 512) next to their apparent size.
//!   Each run boots a fresh guest; the page cache is written back (`sync`)
//!   before each snapshot, outside the timing.
//! - `restore`: a guest that filled `--fill` MiB and then counts at CPL3,
//!   printing a line every `--count-every` counts (a millisecond of
//!   counting, then about as long to print the line), is saved once per
//!   VMM; each run restores it in a fresh process and times process start
//!   to the first whole console line the restored guest begins (`line_ms`; `first_byte_ms` to any byte, which may end
//!   a line cut by the snapshot). vmplant: `vmplant run --restore DIR`;
//!   Firecracker: `--api-sock`, then `PUT /snapshot/load` (File backend,
//!   `resume_vm`), its socket's first accepted connection (`api_ms`) and
//!   the load call (`load_ms`) timed too. RSS at the line.
//! - `clones`: a `--clone-mem` MiB guest ticking every `--tick-ms` ms is
//!   saved once per VMM, then `--clones` clones of it start one after
//!   another, each in its own process (vmplant: `run --restore` with a
//!   control socket, ready when the socket takes a connection, which it
//!   does once the vCPUs run; Firecracker: a fresh process and its load
//!   call with resume). Then every clone must tick (a tick line in its
//!   console file), and the bench reads each one's PSS
//!   (/proc/PID/smaps_rollup) and the host's MemAvailable against what it
//!   was before the first clone. Launching stops early when MemAvailable
//!   falls below `--reserve-mib`, or at the first clone that fails.
//!   Between one VMM's clones and the next's the bench waits for the host
//!   to finish tearing the first ones down (at least 5 s, then until the
//!   CPUs are about as idle as before them, at most 60 s); the clones'
//!   line has the growth of the kernel's memory counters too.
//!
//! Output: one JSON line per measurement (`"phase"`, `"vmm"`, `"run"`), one
//! per VMM and phase with medians, min and max, and a last plain line with
//! vmplant's figures over Firecracker's. Every process the bench starts
//! dies with it (parent-death signal), and SIGINT, SIGTERM or SIGHUP stop
//! the bench, which then ends every VM it started and exits 130.
//!
//! Firecracker's API is HTTP/1.1 over a unix socket. The bench sends one
//! request at a time, each on a connection of its own, and reads exactly
//! one response (status line, headers, a `Content-Length` body), so a few
//! dozen lines over std's `UnixStream` do: the workspace has no HTTP crate,
//! and an HTTP client with its own runtime would be far more than needed.

mod clones;
mod create;
mod firecracker;
mod host;
mod http;
mod procs;
mod restore;
mod summary;
mod vmplant;

use super::guests::{GuestsError, probe_path};
use super::measure::{MeasureError, ScratchDir, Stats, StatsOut};
use crate::cli::CliResult;
use clap::{Args, ValueEnum};
use serde_json::{Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use summary::{Medians, summary_line};

#[derive(Debug, Args)]
pub struct SnapshotBenchArgs {
    /// Snapshots and restores per VMM.
    #[arg(long, default_value_t = 10)]
    pub runs: u32,
    /// Clones to start per VMM.
    #[arg(long, default_value_t = 100)]
    pub clones: u32,
    /// Clones to start in Firecracker [default: --clones].
    #[arg(long)]
    pub fc_clones: Option<u32>,
    /// The test guest [default: target/probe/probe.elf in the repository].
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Where the firecracker binary is [default: ../shared/anchors next to
    /// the repository].
    #[arg(long)]
    pub anchors: Option<PathBuf>,
    /// The vmplant binary to measure [default: this one].
    #[arg(long)]
    pub vmplant: Option<PathBuf>,
    /// Number of vCPUs of every guest.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Memory of the create and restore guests, in MiB.
    #[arg(long, default_value_t = 256)]
    pub mem: u32,
    /// MiB the create and restore guests write before they are saved.
    #[arg(long, default_value_t = 64)]
    pub fill: u32,
    /// Memory of the cloned guest, in MiB.
    #[arg(long, default_value_t = 128)]
    pub clone_mem: u32,
    /// The clones tick every this many ms.
    #[arg(long, default_value_t = 1000)]
    pub tick_ms: u64,
    /// The restore guest prints a line every this many counts (about 1 ns
    /// each at CPL3).
    #[arg(long, default_value_t = 3_000_000)]
    pub count_every: u64,
    /// The VMMs to measure.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "vmplant,firecracker"
    )]
    pub only: Vec<Vmm>,
    /// The measurements to make, in this order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "create,restore,clones"
    )]
    pub phases: Vec<Phase>,
    /// Start no more clones once the host's MemAvailable is below this many
    /// MiB.
    #[arg(long, default_value_t = 2048)]
    pub reserve_mib: u64,
    /// Give up on any one wait (a boot, a console line, a restore) after
    /// this many seconds.
    #[arg(long, default_value_t = 20)]
    pub timeout: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Vmm {
    Vmplant,
    Firecracker,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Vmplant => "vmplant",
            Vmm::Firecracker => "firecracker",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Phase {
    Create,
    Restore,
    Clones,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotBenchError {
    #[error(
        "cannot find the repository (a directory with Cargo.toml and tests/probe) from the \
         current directory or the executable; pass --kernel and --anchors"
    )]
    NoRepo,
    #[error("no test guest at {0}: build it with tests/probe/build.sh, or pass --kernel")]
    NoKernel(PathBuf),
    #[error("cannot tell which executable this is")]
    CurrentExe(#[source] std::io::Error),
    #[error("no {0} binary at {1}")]
    NoBinary(&'static str, PathBuf),
    #[error("--runs must be at least 1")]
    NoRuns,
    #[error("--{0} names {1} twice")]
    Duplicate(&'static str, &'static str),
    #[error("cannot watch for SIGINT and SIGTERM")]
    Signals(#[source] nix::Error),
    #[error("interrupted")]
    Interrupted,
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start {what}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Measure(#[from] MeasureError),
    #[error("{0}")]
    Failed(String),
}

type Result<T, E = SnapshotBenchError> = std::result::Result<T, E>;

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotBenchError {
    let path = path.to_path_buf();
    move |source| SnapshotBenchError::Io { what, path, source }
}

// ---------------------------------------------------------------------------
// The bench

/// What the bench works with.
struct Setup {
    args: SnapshotBenchArgs,
    kernel: PathBuf,
    vmplant: PathBuf,
    firecracker: PathBuf,
    scratch: ScratchDir,
    timeout: Duration,
}

/// A saved VM: its directory (vmplant) or files (Firecracker).
#[derive(Debug, Clone)]
struct Saved {
    files: Vec<PathBuf>,
    /// vmplant: the snapshot directory.
    dir: PathBuf,
}

fn remove_saved(saved: &Saved) {
    for f in &saved.files {
        let _ = std::fs::remove_file(f);
    }
    if saved.dir.is_dir() {
        let _ = std::fs::remove_dir_all(&saved.dir);
    }
}

pub fn run(args: SnapshotBenchArgs) -> CliResult {
    if args.runs == 0 {
        return Err(SnapshotBenchError::NoRuns.into());
    }
    for (i, v) in args.only.iter().enumerate() {
        if args.only[..i].contains(v) {
            return Err(SnapshotBenchError::Duplicate("only", v.name()).into());
        }
    }
    for (i, p) in args.phases.iter().enumerate() {
        if args.phases[..i].contains(p) {
            let name = match p {
                Phase::Create => "create",
                Phase::Restore => "restore",
                Phase::Clones => "clones",
            };
            return Err(SnapshotBenchError::Duplicate("phases", name).into());
        }
    }
    // probe_path fails only for want of the repository or of the guest.
    let kernel = probe_path(args.kernel.as_deref()).map_err(|e| match e {
        GuestsError::NoProbe(path) => SnapshotBenchError::NoKernel(path),
        _ => SnapshotBenchError::NoRepo,
    })?;
    let root = super::boot::repo_root();
    let anchors = match (&args.anchors, &root) {
        (Some(a), _) => a.clone(),
        (None, Some(r)) => r.join("../shared/anchors"),
        (None, None) => return Err(SnapshotBenchError::NoRepo.into()),
    };
    let anchors = anchors.canonicalize().unwrap_or(anchors);
    let firecracker = anchors.join("firecracker");
    let vmplant = match &args.vmplant {
        Some(p) => p.clone(),
        None => std::env::current_exe().map_err(SnapshotBenchError::CurrentExe)?,
    };
    if args.only.contains(&Vmm::Vmplant) && !vmplant.is_file() {
        return Err(SnapshotBenchError::NoBinary("vmplant", vmplant).into());
    }
    if args.only.contains(&Vmm::Firecracker) && !firecracker.is_file() {
        return Err(SnapshotBenchError::NoBinary("firecracker", firecracker).into());
    }
    procs::watch_signals()?;
    let setup = Setup {
        timeout: Duration::from_secs(args.timeout.max(1)),
        args,
        kernel,
        vmplant,
        firecracker,
        scratch: ScratchDir::new("vmplant-bench-snapshot")?,
    };
    let mut medians = [Medians::default(), Medians::default()];
    match setup.run_phases(&mut medians) {
        Ok(()) => {}
        Err(SnapshotBenchError::Interrupted) => {
            eprintln!("vmplant: bench snapshot interrupted; every VM it started has ended");
            return Ok(ExitCode::from(procs::interrupted_status()));
        }
        Err(e) => return Err(e.into()),
    }
    println!("{}", summary_line(&setup, &medians));
    Ok(ExitCode::SUCCESS)
}

fn emit(line: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn index(vmm: Vmm) -> usize {
    match vmm {
        Vmm::Vmplant => 0,
        Vmm::Firecracker => 1,
    }
}

fn stats_of(v: &[f64], decimals: u32) -> Option<StatsOut> {
    Stats::of(v).map(|s| s.rounded(decimals))
}

fn median(v: &[f64]) -> Option<f64> {
    Stats::of(v).map(|s| s.median)
}

impl Setup {
    fn run_phases(&self, medians: &mut [Medians; 2]) -> Result<()> {
        for phase in &self.args.phases {
            match phase {
                Phase::Create => self.create_phase(medians)?,
                Phase::Restore => self.restore_phase(medians)?,
                Phase::Clones => self.clones_phase(medians)?,
            }
        }
        Ok(())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.scratch.path().join(name)
    }

    /// Records a failure: a JSON line, a warning, and the summary's note.
    /// An interruption goes on up.
    fn note_failure(
        &self,
        medians: &mut [Medians; 2],
        phase: &str,
        vmm: Vmm,
        run: Option<u32>,
        e: SnapshotBenchError,
    ) -> Result<()> {
        if matches!(e, SnapshotBenchError::Interrupted) {
            return Err(e);
        }
        let e = crate::cli::chain(&e);
        tracing::warn!("{phase} {}: {e}", vmm.name());
        emit(
            &json!({"bench": "snapshot", "phase": phase, "vmm": vmm.name(), "run": run, "error": e}),
        );
        let m = &mut medians[index(vmm)];
        if m.errors.len() < 3 {
            m.errors.push(format!("{phase}: {e}"));
        }
        Ok(())
    }
}
