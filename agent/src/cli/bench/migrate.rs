//! `vmplant bench migrate`: live migration of the test guest over
//! loopback TCP, vmplant and QEMU side by side in one run (Debian's
//! qemu-system-x86_64, the microvm machine, QMP `migrate` to an
//! `-incoming` process), then what Cloud Hypervisor does with the same
//! request (`ch-remote send-migration`).
//!
//! Each case boots a 256 MiB guest in a source process and an empty
//! destination process, waits until the guest is in the state the case
//! wants (idle and ticking; after `fill:200`; while `dirty` rewrites its
//! 200 MiB at 16 or 128 MiB/s), migrates it with the same downtime
//! target in both VMMs, and checks that the guest prints on in the
//! destination. Total time and downtime are what each VMM reports
//! (vmplant: its `migrate` answer, downtime from the pause to the
//! destination saying it runs the VM; QEMU: `query-migrate`'s
//! `total-time` and `downtime`, whole ms, up to the source's end of
//! sending). Both differ, so the bench also measures what the guest
//! sees, the same way for both: in the idle and filled cases the guest
//! prints a line every millisecond (`tick:1`), and the gap is from the
//! last line that came from the source to the first from the
//! destination, as this process receives them.

use super::guests::probe_path;
use super::measure::{Measured, ScratchDir, describe_status};
use crate::cli::CliResult;
use clap::Args;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Args)]
pub struct MigrateBenchArgs {
    /// The test guest [default: target/probe/probe.elf in the repository].
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Where cloud-hypervisor and ch-remote are [default: ../shared/anchors
    /// next to the repository].
    #[arg(long)]
    anchors: Option<PathBuf>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    mem: u64,
    /// The downtime target given to both VMMs, in ms.
    #[arg(long, default_value_t = 20)]
    downtime_ms: u64,
    /// Migrations per case and VMM (medians are reported).
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// Give up on a migration (or a guest getting ready) after this many
    /// seconds.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateBenchError {
    #[error(transparent)]
    Guests(#[from] super::guests::GuestsError),
    #[error(transparent)]
    Measure(#[from] super::measure::MeasureError),
    #[error("{what}: {why}")]
    Failed { what: String, why: String },
}

type Result<T> = std::result::Result<T, MigrateBenchError>;

fn failed(what: impl Into<String>, why: impl std::fmt::Display) -> MigrateBenchError {
    MigrateBenchError::Failed {
        what: what.into(),
        why: why.to_string(),
    }
}

/// What the guest does while it is moved, and the console line that says
/// it is doing it.
struct Case {
    name: &'static str,
    steps: &'static str,
    ready: &'static str,
}

const CASES: [Case; 4] = [
    Case {
        name: "idle",
        steps: "tick:1",
        ready: r#""n":2}"#,
    },
    Case {
        name: "filled 200 MiB",
        steps: "fill:200+tick:1",
        ready: r#""n":2}"#,
    },
    Case {
        name: "dirty 16 MiB/s",
        steps: "fill:200+dirty:200:16",
        ready: "mib_written",
    },
    Case {
        name: "dirty 128 MiB/s",
        steps: "fill:200+dirty:200:128",
        ready: "mib_written",
    },
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vmm {
    Vmplant,
    Qemu,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Vmplant => "vmplant",
            Vmm::Qemu => "qemu",
        }
    }
}

/// One migration's figures.
#[derive(Debug, Clone, Copy)]
struct Sample {
    total_ms: f64,
    downtime_ms: f64,
    /// The guest's own pause as its console shows it (cases whose guest
    /// prints every millisecond).
    gap_ms: Option<f64>,
}

/// Reads a process's output on a thread of its own, noting when each
/// line came, until told to stop.
struct LineTimes {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Lines seen so far.
    lines: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    thread: Option<std::thread::JoinHandle<(Measured, Vec<Instant>)>>,
}

impl Drop for LineTimes {
    /// The thread ends within a read's wait, and with it the process
    /// (killed when its `Measured` goes), even when a measurement gives up
    /// half way.
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl LineTimes {
    fn watch(mut p: Measured) -> LineTimes {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let lines = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = lines.clone();
        let thread = std::thread::spawn(move || {
            let mut times = Vec::new();
            while !stopped.load(Ordering::Relaxed) && !p.at_eof() {
                let before = p.output().len();
                if p.read_once(Duration::from_millis(5)).is_err() {
                    break;
                }
                if p.output()[before..].contains(&b'\n') {
                    times.push(Instant::now());
                    seen.fetch_add(1, Ordering::Relaxed);
                }
            }
            (p, times)
        });
        LineTimes {
            stop,
            lines,
            thread: Some(thread),
        }
    }

    fn lines(&self) -> usize {
        self.lines.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn finish(mut self) -> Result<(Measured, Vec<Instant>)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .take()
            .ok_or_else(|| failed("reading a VMM's console", "already finished"))?
            .join()
            .map_err(|_| failed("reading a VMM's console", "the thread panicked"))
    }
}

struct Bench {
    probe: PathBuf,
    exe: PathBuf,
    dir: ScratchDir,
    mem: u64,
    downtime_ms: u64,
    timeout: Duration,
}

pub fn run(args: MigrateBenchArgs) -> CliResult {
    let bench = Bench {
        probe: probe_path(args.kernel.as_deref())?,
        exe: std::env::current_exe()?,
        dir: ScratchDir::new("vmplant-bench-migrate")?,
        mem: args.mem,
        downtime_ms: args.downtime_ms,
        timeout: Duration::from_secs(args.timeout),
    };
    let mut summary = Vec::new();
    for case in &CASES {
        let mut medians = Vec::new();
        for vmm in [Vmm::Vmplant, Vmm::Qemu] {
            let mut samples = Vec::new();
            for run in 1..=args.runs {
                let sample = bench.migrate(vmm, case);
                let line = match &sample {
                    Ok(s) => json!({"bench": "migrate", "case": case.name, "vmm": vmm.name(),
                        "run": run, "total_ms": round(s.total_ms), "downtime_ms": round(s.downtime_ms),
                        "guest_gap_ms": s.gap_ms.map(round),
                        "downtime_target_ms": bench.downtime_ms, "mem_mib": bench.mem}),
                    Err(e) => json!({"bench": "migrate", "case": case.name, "vmm": vmm.name(),
                        "run": run, "failed": crate::cli::chain(e)}),
                };
                println!("{line}");
                if let Ok(s) = sample {
                    samples.push(s);
                }
            }
            medians.push(median(&samples));
        }
        if let [Some(ours), Some(qemu)] = medians[..] {
            let gap = match (ours.gap_ms, qemu.gap_ms) {
                (Some(a), Some(b)) => {
                    format!(
                        ", guest paused {a:.1} vs {b:.1} ms ({:.2}x)",
                        a / b.max(0.001)
                    )
                }
                _ => String::new(),
            };
            summary.push(format!(
                "{}: vmplant {:.1} ms ({:.1} ms down), qemu {:.1} ms ({:.0} ms down), {:.2}x total{gap}",
                case.name,
                ours.total_ms,
                ours.downtime_ms,
                qemu.total_ms,
                qemu.downtime_ms,
                ours.total_ms / qemu.total_ms,
            ));
        }
    }
    let anchors = args
        .anchors
        .or_else(|| super::boot::repo_root().map(|r| r.join("../shared/anchors")));
    let ch = match anchors {
        Some(a) => bench.cloud_hypervisor(&a),
        None => "no anchors directory".into(),
    };
    println!(
        "{}",
        json!({"bench": "migrate", "vmm": "cloud-hypervisor", "result": ch})
    );
    println!(
        "migrate ({} MiB guest, loopback TCP, downtime target {} ms): {} | cloud-hypervisor: {ch}",
        bench.mem,
        bench.downtime_ms,
        summary.join(" | ")
    );
    Ok(ExitCode::SUCCESS)
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn median(samples: &[Sample]) -> Option<Sample> {
    let pick = |f: fn(&Sample) -> Option<f64>| {
        let mut v: Vec<f64> = samples.iter().filter_map(f).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    Some(Sample {
        total_ms: pick(|s| Some(s.total_ms))?,
        downtime_ms: pick(|s| Some(s.downtime_ms))?,
        gap_ms: pick(|s| s.gap_ms),
    })
}

/// A free loopback port (free when this returns).
fn free_port() -> Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| failed("a free port", e))
}

/// Waits until something listens on loopback `port`, without connecting
/// (the destinations take one connection only).
fn wait_listening(port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let suffix = format!(":{port:04X}");
    while Instant::now() < deadline {
        let listening = std::fs::read_to_string("/proc/net/tcp")
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.get(1).is_some_and(|a| a.ends_with(&suffix)) && f.get(3) == Some(&"0A")
            });
        if listening {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Err(failed(
        "the destination",
        format!("does not listen on {port}"),
    ))
}

impl Bench {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn migrate(&self, vmm: Vmm, case: &Case) -> Result<Sample> {
        let port = free_port()?;
        let cmdline = format!("console=ttyS0 probe={}", case.steps);
        let timeout = self.timeout;
        let (dest, source, sample) = match vmm {
            Vmm::Vmplant => {
                let dest = Measured::spawn(
                    Command::new(&self.exe)
                        .args(["run", "--no-stdin", "--incoming"])
                        .arg(format!("tcp:127.0.0.1:{port}"))
                        .env("NO_COLOR", "1")
                        .stderr(Stdio::null()),
                )?;
                wait_listening(port, Duration::from_secs(10))?;
                let control = self.path("vmplant.sock");
                let _ = std::fs::remove_file(&control);
                let mut source = Measured::spawn(
                    Command::new(&self.exe)
                        .args(["run", "--no-stdin", "--kernel"])
                        .arg(&self.probe)
                        .args([
                            "--cmdline",
                            &cmdline,
                            "--mem",
                            &self.mem.to_string(),
                            "--control",
                        ])
                        .arg(&control)
                        .env("NO_COLOR", "1")
                        .stderr(Stdio::null()),
                )?;
                source.wait_for(case.ready, timeout)?;
                let (dest, source) = (LineTimes::watch(dest), LineTimes::watch(source));
                let request = vmm::control::Request::Migrate {
                    to: format!("tcp:127.0.0.1:{port}"),
                    downtime_ms: Some(self.downtime_ms),
                    tls: None,
                };
                let done = vmm::control::call(&control, &request)
                    .map_err(|e| failed("vmplant vm migrate", crate::cli::chain(&e)))?;
                let ms = |k: &str| {
                    done[k]
                        .as_f64()
                        .ok_or_else(|| failed("vmplant's answer", &done))
                };
                let sample = Sample {
                    total_ms: ms("total_ms")?,
                    downtime_ms: ms("downtime_ms")?,
                    gap_ms: None,
                };
                (dest, source, sample)
            }
            Vmm::Qemu => {
                let qemu = |extra: &[&str], qmp: &Path| {
                    let mut cmd = Command::new("qemu-system-x86_64");
                    cmd.args([
                        "-M",
                        "microvm",
                        "-enable-kvm",
                        "-cpu",
                        "host,-arch-capabilities",
                    ])
                    .args(["-m", &format!("{}M", self.mem), "-kernel"])
                    .arg(&self.probe)
                    .args([
                        "-append",
                        &cmdline,
                        "-nographic",
                        "-no-reboot",
                        "-nodefaults",
                    ])
                    .args(["-serial", "stdio", "-qmp"])
                    .arg(format!("unix:{},server=on,wait=off", qmp.display()))
                    .args(extra)
                    .stderr(Stdio::null());
                    cmd
                };
                let (src_qmp, dst_qmp) = (self.path("qemu-src.qmp"), self.path("qemu-dst.qmp"));
                let incoming = format!("tcp:127.0.0.1:{port}");
                let dest = Measured::spawn(&mut qemu(&["-incoming", &incoming], &dst_qmp))?;
                wait_listening(port, Duration::from_secs(10))?;
                let mut source = Measured::spawn(&mut qemu(&[], &src_qmp))?;
                source.wait_for(case.ready, timeout)?;
                let (dest, source) = (LineTimes::watch(dest), LineTimes::watch(source));
                let mut qmp = Qmp::connect(&src_qmp)?;
                qmp.execute(
                    "migrate-set-parameters",
                    json!({"downtime-limit": self.downtime_ms}),
                )?;
                qmp.execute("migrate", json!({"uri": incoming}))?;
                let deadline = Instant::now() + timeout;
                let status = loop {
                    let s = qmp.execute("query-migrate", json!({}))?;
                    match s["status"].as_str() {
                        Some("completed") => break s,
                        Some("failed") | Some("cancelled") => {
                            return Err(failed("qemu's migration", s));
                        }
                        _ if Instant::now() > deadline => {
                            return Err(failed(
                                "qemu's migration",
                                format!("did not end within {timeout:?}"),
                            ));
                        }
                        _ => std::thread::sleep(Duration::from_millis(2)),
                    }
                };
                let ms = |k: &str| {
                    status[k]
                        .as_f64()
                        .ok_or_else(|| failed("qemu's query-migrate", &status))
                };
                let sample = Sample {
                    total_ms: ms("total-time")?,
                    downtime_ms: ms("downtime")?,
                    gap_ms: None,
                };
                (dest, source, sample)
            }
        };
        // The guest goes on in the destination: a line it prints there.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !dest.thread.as_ref().is_none_or(|t| t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            if dest.lines() > 0 {
                break;
            }
        }
        let (mut source, source_lines) = source.finish()?;
        let (_dest, dest_lines) = dest.finish()?;
        let Some(first) = dest_lines.first() else {
            return Err(failed(
                format!("{} destination", vmm.name()),
                "the guest printed nothing after the migration",
            ));
        };
        if let Some(status) = source.exit_status(Duration::from_secs(5)) {
            tracing::debug!("{} source: {}", vmm.name(), describe_status(status));
        }
        let mut sample = sample;
        if let (true, Some(last)) = (case.steps.ends_with("tick:1"), source_lines.last()) {
            sample.gap_ms = Some(first.saturating_duration_since(*last).as_secs_f64() * 1e3);
        }
        Ok(sample)
    }

    /// What Cloud Hypervisor does when asked to send a VM to another
    /// instance over loopback TCP with the same downtime target: a
    /// one-line account.
    fn cloud_hypervisor(&self, anchors: &Path) -> String {
        let (ch, remote) = (anchors.join("cloud-hypervisor"), anchors.join("ch-remote"));
        if !ch.is_file() || !remote.is_file() {
            return format!("not found in {}", anchors.display());
        }
        let (src_api, dst_api) = (self.path("ch-src.api"), self.path("ch-dst.api"));
        let Ok(port) = free_port() else {
            return "no free port".into();
        };
        let url = format!("tcp:127.0.0.1:{port}");
        let cmdline = "console=ttyS0 probe=tick:100";
        let source = Measured::spawn(
            Command::new(&ch)
                .arg("--api-socket")
                .arg(&src_api)
                .arg("--kernel")
                .arg(&self.probe)
                .args([
                    "--cmdline",
                    cmdline,
                    "--memory",
                    &format!("size={}M", self.mem),
                ])
                .args(["--serial", "tty", "--console", "off"])
                .stderr(Stdio::null()),
        );
        let Ok(mut source) = source else {
            return "cannot start cloud-hypervisor".into();
        };
        if source
            .wait_for(r#""n":2}"#, Duration::from_secs(30))
            .is_err()
        {
            return "its guest did not tick".into();
        }
        let dest = Measured::spawn(
            Command::new(&ch)
                .arg("--api-socket")
                .arg(&dst_api)
                .stderr(Stdio::null()),
        );
        let Ok(dest) = dest else {
            return "cannot start the destination cloud-hypervisor".into();
        };
        std::thread::sleep(Duration::from_millis(300));
        let receive = Command::new(&remote)
            .arg("--api-socket")
            .arg(&dst_api)
            .arg("receive-migration")
            .arg(format!("receiver_url={url}"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        let send = Command::new(&remote)
            .arg("--api-socket")
            .arg(&src_api)
            .arg("send-migration")
            .arg(format!(
                "destination_url={url},downtime_ms={}",
                self.downtime_ms
            ))
            .output();
        let took = t.elapsed();
        // The call may return before the migration is done: watch both
        // guests for 3 s to see where the VM ends up.
        let mut dest = dest;
        let (src_before, dst_before) = (source.output().len(), dest.output().len());
        for _ in 0..30 {
            let _ = source.drain_for(Duration::from_millis(50));
            let _ = dest.drain_for(Duration::from_millis(50));
        }
        let lines =
            |p: &Measured, from: usize| p.output()[from..].iter().filter(|&&b| b == b'\n').count();
        let (src_lines, dst_lines) = (lines(&source, src_before), lines(&dest, dst_before));
        let mut receive = receive.ok();
        let received = receive.as_mut().and_then(|r| r.try_wait().ok().flatten());
        if let Some(r) = receive.as_mut() {
            let _ = r.kill();
            let _ = r.wait();
        }
        let receiver = match received {
            Some(status) => format!("receive-migration ended ({})", describe_status(status)),
            None => "receive-migration still waiting".into(),
        };
        let after = format!(
            "in the 3 s after, the source guest printed {src_lines} lines and the destination's {dst_lines}; {receiver}"
        );
        match send {
            Ok(out) if out.status.success() => {
                format!("send-migration returned success after {took:.0?}; {after}")
            }
            Ok(out) => {
                let err = String::from_utf8_lossy(&out.stderr);
                let last = err
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("");
                format!(
                    "send-migration failed after {took:.0?} ({}): {}; {after}",
                    describe_status(out.status),
                    last.trim(),
                )
            }
            Err(e) => format!("cannot run ch-remote: {e}"),
        }
    }
}

/// A QMP connection: commands and their answers, events skipped.
struct Qmp {
    out: UnixStream,
    input: BufReader<UnixStream>,
}

impl Qmp {
    fn connect(path: &Path) -> Result<Qmp> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(failed("qemu's QMP socket", e)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| failed("qemu's QMP socket", e))?;
        let out = stream
            .try_clone()
            .map_err(|e| failed("qemu's QMP socket", e))?;
        let mut qmp = Qmp {
            out,
            input: BufReader::new(stream),
        };
        qmp.read()?; // the greeting
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        self.input
            .read_line(&mut line)
            .map_err(|e| failed("qemu's QMP socket", e))?;
        serde_json::from_str(&line).map_err(|e| failed("qemu's QMP answer", format!("{e}: {line}")))
    }

    fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let request = json!({"execute": command, "arguments": arguments});
        writeln!(self.out, "{request}").map_err(|e| failed("qemu's QMP socket", e))?;
        loop {
            let v = self.read()?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(e) = v.get("error") {
                return Err(failed(format!("qemu's {command}"), e));
            }
            return Ok(v["return"].clone());
        }
    }
}
