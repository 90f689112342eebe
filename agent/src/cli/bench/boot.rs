//! `vmplant bench boot`: boot the test guest N times in vmplant,
//! Firecracker and Cloud Hypervisor in turn; time from just before the
//! spawn to the guest's first ready line on the VMM's standard output, and
//! the VMM's RSS then (and after a short settle).
//!
//! Output: one JSON line per run, one per VMM with medians, min and max,
//! and a last plain line with the ratios of vmplant to each anchor. Fields:
//! `ready_ms` spawn to the ready line; `first_byte_ms` spawn to the first
//! console byte (the rest of `ready_ms` is the guest printing the line, one
//! VM exit per port access); `rss_kib` VmRSS at the ready line,
//! `rss_settled_kib` after `--settle-ms`; `cpu_ms` CPU time of the VMM's
//! live threads at the ready line; `marker_ms` the VMM's own log of the
//! boot-complete marker (vmplant: from its `main`, Firecracker: from its
//! start), absent for Cloud Hypervisor.

use super::measure::{
    MeasureError, Measured, ScratchDir, Stats, StatsOut, ms, number_after, round,
};
use crate::cli::CliResult;
use clap::{Args, ValueEnum};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

/// What the guest prints first, on every VMM.
const READY: &str = r#"{"probe":"ready""#;
const CMDLINE: &str = "console=ttyS0 probe=ready";

#[derive(Debug, Args)]
pub struct BootBenchArgs {
    /// Boots per VMM.
    #[arg(long, default_value_t = 10)]
    pub runs: u32,
    /// The test guest [default: target/probe/probe.elf in the repository].
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Where the firecracker and cloud-hypervisor binaries are
    /// [default: ../shared/anchors next to the repository].
    #[arg(long)]
    pub anchors: Option<PathBuf>,
    /// The vmplant binary to measure [default: this one].
    #[arg(long)]
    pub vmplant: Option<PathBuf>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    pub mem: u32,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// The VMMs to boot, in this order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "vmplant,firecracker,cloud-hypervisor"
    )]
    pub only: Vec<Vmm>,
    /// How long to wait after the ready line before reading the RSS again.
    #[arg(long, default_value_t = 50)]
    pub settle_ms: u64,
    /// Give up on a boot after this many seconds.
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Vmm {
    Vmplant,
    Firecracker,
    CloudHypervisor,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Vmplant => "vmplant",
            Vmm::Firecracker => "firecracker",
            Vmm::CloudHypervisor => "cloud-hypervisor",
        }
    }

    /// What the VMM logs when the guest writes the boot-complete marker
    /// (followed by microseconds), and on which stream.
    fn marker_log(self) -> Option<(Stream, &'static str)> {
        match self {
            Vmm::Vmplant => Some((Stream::Stderr, "guest boot complete")),
            Vmm::Firecracker => Some((Stream::FirecrackerLog, "Guest-boot-time =")),
            Vmm::CloudHypervisor => None,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Stream {
    Stderr,
    /// Firecracker logs to standard output, where its lines could split the
    /// guest's; the benchmark sends them to this file instead.
    FirecrackerLog,
}

const FC_CONFIG: &str = "fc.json";
const FC_LOG: &str = "firecracker.log";

#[derive(Debug, thiserror::Error)]
pub enum BootBenchError {
    #[error(
        "cannot find the repository (a directory with Cargo.toml and tests/probe) from the \
         current directory or the executable; pass --kernel and --anchors"
    )]
    NoRepo,
    #[error("no test guest at {0}: build it with tests/probe/build.sh, or pass --kernel")]
    NoKernel(PathBuf),
    #[error("cannot tell which executable this is")]
    CurrentExe(#[source] std::io::Error),
    #[error("no vmplant binary at {0}")]
    NoVmplant(PathBuf),
    #[error("--runs must be at least 1")]
    NoRuns,
    #[error("--only names {0} twice")]
    Duplicate(&'static str),
    #[error("cannot write the Firecracker configuration {path}")]
    FcConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the log file {path}")]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Measure(#[from] MeasureError),
    #[error("{0}")]
    Failed(String),
}

/// One measured boot.
#[derive(Debug, Clone, Default)]
struct Sample {
    ready_ms: f64,
    /// When the first byte of the console arrived.
    first_byte_ms: Option<f64>,
    rss_kib: u64,
    rss_settled_kib: Option<u64>,
    cpu_ms: Option<f64>,
    /// The VMM's own boot-complete time (marker write), when it logs one.
    marker_ms: Option<f64>,
}

/// What one VMM did over all runs.
struct Tally {
    vmm: Vmm,
    binary: PathBuf,
    missing: Option<String>,
    samples: Vec<Sample>,
    failures: u32,
}

pub fn run(args: BootBenchArgs) -> CliResult {
    if args.runs == 0 {
        return Err(BootBenchError::NoRuns.into());
    }
    for (i, v) in args.only.iter().enumerate() {
        if args.only[..i].contains(v) {
            return Err(BootBenchError::Duplicate(v.name()).into());
        }
    }
    let root = repo_root();
    let kernel = match (&args.kernel, &root) {
        (Some(k), _) => k.clone(),
        (None, Some(r)) => r.join("target/probe/probe.elf"),
        (None, None) => return Err(BootBenchError::NoRepo.into()),
    };
    if !kernel.is_file() {
        return Err(BootBenchError::NoKernel(kernel).into());
    }
    let kernel = std::path::absolute(&kernel).unwrap_or(kernel);
    let anchors = match (&args.anchors, &root) {
        (Some(a), _) => a.clone(),
        (None, Some(r)) => r.join("../shared/anchors"),
        (None, None) => return Err(BootBenchError::NoRepo.into()),
    };
    let anchors = anchors.canonicalize().unwrap_or(anchors);
    let vmplant = match &args.vmplant {
        Some(p) => p.clone(),
        None => std::env::current_exe().map_err(BootBenchError::CurrentExe)?,
    };
    if args.only.contains(&Vmm::Vmplant) && !vmplant.is_file() {
        return Err(BootBenchError::NoVmplant(vmplant).into());
    }

    let scratch = ScratchDir::new("vmplant-bench-boot")?;
    let mut tallies: Vec<Tally> = args
        .only
        .iter()
        .map(|&vmm| {
            let binary = match vmm {
                Vmm::Vmplant => vmplant.clone(),
                Vmm::Firecracker => anchors.join("firecracker"),
                Vmm::CloudHypervisor => anchors.join("cloud-hypervisor"),
            };
            let missing = (!binary.is_file()).then(|| format!("not found at {}", binary.display()));
            Tally {
                vmm,
                binary,
                missing,
                samples: Vec::new(),
                failures: 0,
            }
        })
        .collect();

    let mut out = std::io::stdout().lock();
    for t in &tallies {
        if let Some(why) = &t.missing {
            tracing::warn!("{}: {why}; skipped", t.vmm.name());
            emit(
                &mut out,
                &NoteLine {
                    vmm: t.vmm.name(),
                    run: None,
                    error: None,
                    skipped: Some(why),
                },
            );
        }
    }
    write_fc_config(scratch.path(), &kernel, &args)?;
    for run in 1..=args.runs {
        for t in tallies.iter_mut().filter(|t| t.missing.is_none()) {
            let cmd = command(t.vmm, &t.binary, &kernel, scratch.path(), &args);
            match boot_once(t.vmm, cmd, scratch.path(), &args) {
                Ok(s) => {
                    emit(&mut out, &RunLine::new(t.vmm, run, &s));
                    t.samples.push(s);
                }
                Err(e) => {
                    let e = crate::cli::chain(&e);
                    tracing::warn!("{} run {run}: {e}", t.vmm.name());
                    emit(
                        &mut out,
                        &NoteLine {
                            vmm: t.vmm.name(),
                            run: Some(run),
                            error: Some(&e),
                            skipped: None,
                        },
                    );
                    t.failures += 1;
                }
            }
        }
    }

    let mut rows = Vec::new();
    for t in &tallies {
        if t.missing.is_some() {
            rows.push(Row {
                vmm: t.vmm.name(),
                result: RowResult::Skipped("not found".into()),
            });
            continue;
        }
        emit(&mut out, &TallyLine::new(t));
        let ready = Stats::of(&t.samples.iter().map(|s| s.ready_ms).collect::<Vec<_>>());
        let rss = Stats::of(
            &t.samples
                .iter()
                .map(|s| s.rss_kib as f64)
                .collect::<Vec<_>>(),
        );
        rows.push(Row {
            vmm: t.vmm.name(),
            result: match (ready, rss) {
                (Some(r), Some(m)) => RowResult::Measured {
                    ready_ms: r.median,
                    rss_mib: m.median / 1024.0,
                },
                _ => RowResult::Skipped(format!("failed {} of {} runs", t.failures, args.runs)),
            },
        });
    }
    let _ = writeln!(out, "{}", summary_line(&rows));
    let _ = out.flush();
    Ok(ExitCode::SUCCESS)
}

fn emit(out: &mut impl Write, line: &impl Serialize) {
    match serde_json::to_string(line) {
        Ok(s) => {
            let _ = writeln!(out, "{s}");
        }
        Err(e) => tracing::error!("cannot format a result: {e}"),
    }
    let _ = out.flush();
}

/// One run's line.
#[derive(Debug, Serialize)]
struct RunLine {
    vmm: &'static str,
    run: u32,
    ready_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_byte_ms: Option<f64>,
    rss_kib: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    rss_settled_kib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    marker_ms: Option<f64>,
}

impl RunLine {
    fn new(vmm: Vmm, run: u32, s: &Sample) -> Self {
        RunLine {
            vmm: vmm.name(),
            run,
            ready_ms: round(s.ready_ms, 3),
            first_byte_ms: s.first_byte_ms.map(|f| round(f, 3)),
            rss_kib: s.rss_kib,
            rss_settled_kib: s.rss_settled_kib,
            cpu_ms: s.cpu_ms.map(|c| round(c, 3)),
            marker_ms: s.marker_ms.map(|m| round(m, 3)),
        }
    }
}

/// A run that failed, or a VMM that was skipped.
#[derive(Debug, Serialize)]
struct NoteLine<'a> {
    vmm: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    run: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    skipped: Option<&'a str>,
}

/// A VMM's medians, minima and maxima over its runs.
#[derive(Debug, Serialize)]
struct TallyLine {
    vmm: &'static str,
    runs: usize,
    failed: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    ready_ms: Option<StatsOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_byte_ms: Option<StatsOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rss_kib: Option<StatsOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rss_settled_kib: Option<StatsOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_ms: Option<StatsOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    marker_ms: Option<StatsOut>,
}

impl TallyLine {
    fn new(t: &Tally) -> Self {
        let stats = |f: &dyn Fn(&Sample) -> Option<f64>| {
            let v: Vec<f64> = t.samples.iter().filter_map(f).collect();
            Stats::of(&v)
        };
        TallyLine {
            vmm: t.vmm.name(),
            runs: t.samples.len(),
            failed: t.failures,
            ready_ms: stats(&|s| Some(s.ready_ms)).map(|s| s.rounded(3)),
            first_byte_ms: stats(&|s| s.first_byte_ms).map(|s| s.rounded(3)),
            rss_kib: stats(&|s| Some(s.rss_kib as f64)).map(|s| s.rounded(0)),
            rss_settled_kib: stats(&|s| s.rss_settled_kib.map(|r| r as f64)).map(|s| s.rounded(0)),
            cpu_ms: stats(&|s| s.cpu_ms).map(|s| s.rounded(3)),
            marker_ms: stats(&|s| s.marker_ms).map(|s| s.rounded(3)),
        }
    }
}

/// Boots once: spawn, wait for the ready line, read RSS and CPU time, let
/// it settle, read RSS again, kill and reap.
fn boot_once(
    vmm: Vmm,
    mut cmd: Command,
    scratch: &Path,
    args: &BootBenchArgs,
) -> Result<Sample, BootBenchError> {
    let log = scratch.join(format!("{}.stderr", vmm.name()));
    let stderr = std::fs::File::create(&log).map_err(|source| BootBenchError::Log {
        path: log.clone(),
        source,
    })?;
    cmd.stderr(Stdio::from(stderr));
    let fc_log = scratch.join(FC_LOG);
    if vmm == Vmm::Firecracker {
        // Firecracker opens its log file but does not create it.
        std::fs::File::create(&fc_log).map_err(|source| BootBenchError::Log {
            path: fc_log.clone(),
            source,
        })?;
    }
    let mut m = Measured::spawn(&mut cmd)?;
    let ready = match m.wait_for(READY, Duration::from_secs(args.timeout)) {
        Ok(d) => d,
        Err(e) => {
            let stdout = String::from_utf8_lossy(m.output()).into_owned();
            drop(m);
            // Say why, in the VMM's own last words.
            let stderr = std::fs::read_to_string(&log).unwrap_or_default();
            return match last_line(&stderr).or_else(|| last_line(&stdout)) {
                Some(l) => Err(BootBenchError::Failed(format!(
                    "{}; its last line: {l}",
                    crate::cli::chain(&e)
                ))),
                None => Err(e.into()),
            };
        }
    };
    let rss_kib = m.rss_kib()?;
    let first_byte_ms = m.first_output().map(ms);
    let cpu_ms = m.cpu_time().ok().map(ms);
    let mut rss_settled_kib = None;
    if args.settle_ms > 0 {
        m.drain_for(Duration::from_millis(args.settle_ms))?;
        rss_settled_kib = m.rss_kib().ok();
    }
    m.kill();
    let marker_ms = vmm.marker_log().and_then(|(stream, prefix)| {
        let text = match stream {
            Stream::Stderr => std::fs::read_to_string(&log),
            Stream::FirecrackerLog => std::fs::read_to_string(&fc_log),
        }
        .unwrap_or_default();
        number_after(&text, prefix).map(|us| us as f64 / 1e3)
    });
    Ok(Sample {
        ready_ms: ms(ready),
        first_byte_ms,
        rss_kib,
        rss_settled_kib,
        cpu_ms,
        marker_ms,
    })
}

fn last_line(text: &str) -> Option<&str> {
    text.lines().rev().map(str::trim).find(|l| !l.is_empty())
}

fn command(
    vmm: Vmm,
    binary: &Path,
    kernel: &Path,
    scratch: &Path,
    args: &BootBenchArgs,
) -> Command {
    let mut cmd = Command::new(binary);
    match vmm {
        Vmm::Vmplant => {
            cmd.arg("run")
                .arg("--kernel")
                .arg(kernel)
                .args(["--cmdline", CMDLINE, "--no-stdin"])
                .arg("--vcpus")
                .arg(args.vcpus.to_string())
                .arg("--mem")
                .arg(args.mem.to_string());
        }
        Vmm::Firecracker => {
            cmd.args([
                "--no-api",
                "--no-seccomp",
                "--boot-timer",
                "--level",
                "Info",
            ])
            .arg("--log-path")
            .arg(scratch.join(FC_LOG))
            .arg("--config-file")
            .arg(scratch.join(FC_CONFIG));
        }
        Vmm::CloudHypervisor => {
            cmd.arg("--kernel")
                .arg(kernel)
                .args(["--cmdline", CMDLINE])
                .arg("--memory")
                .arg(format!("size={}M", args.mem))
                .arg("--cpus")
                .arg(format!("boot={}", args.vcpus))
                .args(["--serial", "tty", "--console", "off"]);
        }
    }
    cmd
}

fn write_fc_config(dir: &Path, kernel: &Path, args: &BootBenchArgs) -> Result<(), BootBenchError> {
    let path = dir.join(FC_CONFIG);
    let config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": kernel,
            "boot_args": CMDLINE,
        },
        "machine-config": { "vcpu_count": args.vcpus, "mem_size_mib": args.mem },
        "drives": [],
    });
    std::fs::write(&path, config.to_string())
        .map_err(|source| BootBenchError::FcConfig { path, source })
}

/// The repository root: the first directory with Cargo.toml and
/// tests/probe, from the current directory up, then from the executable's.
pub(super) fn repo_root() -> Option<PathBuf> {
    let is_root = |d: &Path| d.join("Cargo.toml").is_file() && d.join("tests/probe").is_dir();
    let from = |start: PathBuf| {
        start
            .ancestors()
            .find(|d| is_root(d))
            .map(Path::to_path_buf)
    };
    std::env::current_dir()
        .ok()
        .and_then(from)
        .or_else(|| std::env::current_exe().ok().and_then(from))
}

/// One VMM in the summary line.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    vmm: &'static str,
    result: RowResult,
}

#[derive(Debug, Clone, PartialEq)]
enum RowResult {
    Measured { ready_ms: f64, rss_mib: f64 },
    Skipped(String),
}

/// The last line: every VMM's medians, and for each anchor the ratios of
/// vmplant's to its (below 1 is better for vmplant).
fn summary_line(rows: &[Row]) -> String {
    let ours = rows.iter().find_map(|r| match (r.vmm, &r.result) {
        ("vmplant", RowResult::Measured { ready_ms, rss_mib }) => Some((*ready_ms, *rss_mib)),
        _ => None,
    });
    let parts: Vec<String> = rows
        .iter()
        .map(|r| match &r.result {
            RowResult::Skipped(why) => format!("{} skipped ({why})", r.vmm),
            RowResult::Measured { ready_ms, rss_mib } => {
                let mut s = format!("{} {ready_ms:.1} ms {rss_mib:.1} MiB", r.vmm);
                if let (Some((t, m)), false) = (ours, r.vmm == "vmplant") {
                    s += &format!(" ({:.2}x time, {:.2}x RSS)", t / ready_ms, m / rss_mib);
                }
                s
            }
        })
        .collect();
    format!("boot: {}", parts.join(" | "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(vmm: &'static str, ready_ms: f64, rss_mib: f64) -> Row {
        Row {
            vmm,
            result: RowResult::Measured { ready_ms, rss_mib },
        }
    }

    #[test]
    fn summary_has_ratios_to_each_anchor() {
        let line = summary_line(&[
            measured("vmplant", 5.1, 3.9),
            measured("firecracker", 9.9, 4.1),
            measured("cloud-hypervisor", 6.2, 12.8),
        ]);
        assert_eq!(
            line,
            "boot: vmplant 5.1 ms 3.9 MiB | firecracker 9.9 ms 4.1 MiB (0.52x time, 0.95x RSS) \
             | cloud-hypervisor 6.2 ms 12.8 MiB (0.82x time, 0.30x RSS)"
        );
    }

    #[test]
    fn summary_reports_skipped_and_missing_vmplant() {
        let line = summary_line(&[
            Row {
                vmm: "vmplant",
                result: RowResult::Skipped("failed 10 of 10 runs".into()),
            },
            measured("firecracker", 9.9, 4.1),
            Row {
                vmm: "cloud-hypervisor",
                result: RowResult::Skipped("not found".into()),
            },
        ]);
        assert_eq!(
            line,
            "boot: vmplant skipped (failed 10 of 10 runs) | firecracker 9.9 ms 4.1 MiB \
             | cloud-hypervisor skipped (not found)"
        );
    }

    #[test]
    fn commands_boot_the_probe() {
        let args = BootBenchArgs {
            runs: 1,
            kernel: None,
            anchors: None,
            vmplant: None,
            mem: 256,
            vcpus: 2,
            only: vec![Vmm::CloudHypervisor],
            settle_ms: 0,
            timeout: 1,
        };
        let k = Path::new("/k.elf");
        let cmd = command(
            Vmm::CloudHypervisor,
            Path::new("ch"),
            k,
            Path::new("/s"),
            &args,
        );
        let argv: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy()).collect();
        assert_eq!(
            argv.join(" "),
            "--kernel /k.elf --cmdline console=ttyS0 probe=ready --memory size=256M \
             --cpus boot=2 --serial tty --console off"
        );
        let cmd = command(Vmm::Vmplant, Path::new("v"), k, Path::new("/s"), &args);
        let argv: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy()).collect();
        assert_eq!(
            argv.join(" "),
            "run --kernel /k.elf --cmdline console=ttyS0 probe=ready --no-stdin --vcpus 2 \
             --mem 256"
        );
        let cmd = command(Vmm::Firecracker, Path::new("fc"), k, Path::new("/s"), &args);
        let argv: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy()).collect();
        assert_eq!(
            argv.join(" "),
            "--no-api --no-seccomp --boot-timer --level Info --log-path /s/firecracker.log \
             --config-file /s/fc.json"
        );
    }
}
