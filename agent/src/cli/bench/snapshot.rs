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

use super::guests::load_1m;
use super::measure::{MeasureError, Measured, ScratchDir, Stats, StatsOut, ms, round};
use crate::cli::CliResult;
use clap::{Args, ValueEnum};
use nix::sys::signal::{SigSet, Signal};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Counts of the restore guest: enough for hours.
const COUNT_FOREVER: u64 = 1_000_000_000_000_000;
/// The longest one HTTP request to Firecracker may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(60);
/// The least pause between one VMM's clones and the next's: the host goes
/// on tearing VMs down for seconds after their processes were reaped.
const CLONES_SETTLE: Duration = Duration::from_secs(5);
/// The longest pause: then the next VMM's clones start however busy the
/// host still is.
const CLONES_SETTLE_MAX: Duration = Duration::from_secs(60);
/// How long a clone's first tick may take past its period.
const TICK_GRACE: Duration = Duration::from_secs(10);

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
// Signals and child processes

/// Set by the signal thread; every wait of the bench looks at it.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread (and the threads it
/// starts) and takes them in a thread of their own: the first asks the
/// bench to stop (it then ends its VMs), a second one exits at once (the
/// VMs die with it through their parent-death signal).
fn watch_signals() -> Result<()> {
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    set.thread_block().map_err(SnapshotBenchError::Signals)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            while let Ok(sig) = set.wait() {
                if INTERRUPTED.swap(true, Ordering::SeqCst) {
                    eprintln!("vmplant: {sig} again: exiting now");
                    std::process::exit(130);
                }
                eprintln!("vmplant: {sig}: ending every VM the bench started");
            }
        })
        .map_err(|source| SnapshotBenchError::Spawn {
            what: "the signal thread".into(),
            source,
        })?;
    Ok(())
}

fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err(SnapshotBenchError::Interrupted)
    } else {
        Ok(())
    }
}

/// Makes the process `cmd` starts receive SIGKILL when the thread that
/// starts it (the bench's main thread) ends, however it ends.
fn die_with_us(cmd: &mut Command) -> &mut Command {
    // SAFETY: the closure runs in the child between fork and exec; it makes
    // one prctl system call, which is async-signal-safe, allocates nothing
    // and touches no lock.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        })
    }
}

/// A VM process whose console goes to a file. Killed and reaped when
/// dropped.
struct Guest {
    what: String,
    child: Child,
    console: PathBuf,
    log: PathBuf,
}

impl Guest {
    /// Starts `cmd` with standard input from /dev/null, standard output
    /// into `console`, standard error into `log`.
    fn spawn(what: String, cmd: &mut Command, console: &Path, log: &Path) -> Result<Guest> {
        let out = std::fs::File::create(console).map_err(io_err("create", console))?;
        let err = std::fs::File::create(log).map_err(io_err("create", log))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let child = die_with_us(cmd)
            .spawn()
            .map_err(|source| SnapshotBenchError::Spawn {
                what: what.clone(),
                source,
            })?;
        Ok(Guest {
            what,
            child,
            console: console.to_path_buf(),
            log: log.to_path_buf(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Why the process is gone, if it is.
    fn ended(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(super::measure::describe_status(status)),
            Ok(None) => None,
            Err(e) => Some(format!("cannot tell its status: {e}")),
        }
    }

    /// Waits for a console line containing `needle`; returns it. A guest
    /// error line, the process's end or `timeout` is an error quoting the
    /// last console and log lines.
    fn wait_console(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = std::fs::read_to_string(&self.console).unwrap_or_default();
            let complete = match text.rfind('\n') {
                Some(i) => &text[..i],
                None => "",
            };
            if let Some(bad) = complete.lines().find(|l| guest_error(l)) {
                return Err(self.failed(&format!("the guest reported {bad}")));
            }
            if let Some(line) = complete.lines().find(|l| l.contains(needle)) {
                return Ok(line.to_string());
            }
            if let Some(status) = self.ended() {
                return Err(self.failed(&format!("ended ({status}) before printing {needle:?}")));
            }
            if Instant::now() >= deadline {
                return Err(self.failed(&format!("printed no {needle:?} within {timeout:?}")));
            }
            check_interrupt()?;
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn failed(&self, why: &str) -> SnapshotBenchError {
        SnapshotBenchError::Failed(format!("{}: {why}; {}", self.what, self.tail()))
    }

    /// The last console and log lines, for error messages.
    fn tail(&self) -> String {
        let last = |path: &Path, n: usize| {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let v: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .rev()
                .take(n)
                .collect();
            v.into_iter().rev().collect::<Vec<_>>().join(" / ")
        };
        format!(
            "console ends: {}; log ends: {}",
            last(&self.console, 2),
            strip_ansi(&last(&self.log, 2))
        )
    }

    /// Waits up to `wait` for the process to end by itself.
    fn wait_exit(&mut self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        loop {
            if self.ended().is_some() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Ends many guests at once: SIGKILL to all, then reap them all.
fn end_all(guests: &mut Vec<Guest>) {
    for g in guests.iter_mut() {
        let _ = g.child.kill();
    }
    for g in guests.iter_mut() {
        let _ = g.child.wait();
    }
    guests.clear();
}

/// Whether a probe console line reports a failure.
fn guest_error(line: &str) -> bool {
    line.contains(r#""probe":"error""#)
        || line.contains(r#""probe":"exception""#)
        || line.contains(r#""error":"#)
}

/// `text` without ANSI escape sequences (ESC `[` ... a letter).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        if chars.next() == Some('[') {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// HTTP/1.1 over a unix socket, one request at a time (Firecracker's API)

/// Firecracker's answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HttpResponse {
    status: u16,
    body: String,
}

/// The longest response head read.
const MAX_HEAD: usize = 16 * 1024;

/// Parses the HTTP/1.x response at the start of `buf`: `Ok(None)` while
/// its head or body is not all there. A body is what `Content-Length`
/// says (none without it: Firecracker sends it with every body); chunked
/// bodies are refused.
fn parse_response(buf: &[u8]) -> Result<Option<HttpResponse>, String> {
    let Some(end) = find_bytes(buf, b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD {
            return Err(format!("a response head longer than {MAX_HEAD} bytes"));
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| "a response head not in UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let status = match (parts.next(), parts.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") => {
            code.parse::<u16>().ok().filter(|c| (100..1000).contains(c))
        }
        _ => None,
    }
    .ok_or_else(|| format!("a bad status line {status_line:?}"))?;
    let mut length = 0usize;
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("a bad header line {line:?}"))?;
        let name = name.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = value
                .trim()
                .parse()
                .map_err(|_| format!("a bad Content-Length {:?}", value.trim()))?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(format!("a body in transfer encoding {:?}", value.trim()));
        }
    }
    let start = end + 4;
    let Some(body) = buf.get(start..start.saturating_add(length)) else {
        return Ok(None);
    };
    Ok(Some(HttpResponse {
        status,
        body: String::from_utf8_lossy(body).into_owned(),
    }))
}

fn find_bytes(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Connects to the API socket at `path`, again and again (every 100 µs)
/// until it takes the connection or `deadline`; `gone` says whether the
/// process that should serve it has ended, and why.
fn connect_api(
    path: &Path,
    deadline: Instant,
    gone: &mut dyn FnMut() -> Option<String>,
) -> Result<UnixStream, String> {
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) => {
                if let Some(why) = gone() {
                    return Err(format!(
                        "it ended ({why}) before serving {}",
                        path.display()
                    ));
                }
                if Instant::now() >= deadline || INTERRUPTED.load(Ordering::SeqCst) {
                    return Err(format!("no connection to {}: {e}", path.display()));
                }
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    }
}

/// Sends one request on `stream` and reads its response.
fn http(
    stream: &mut UnixStream,
    method: &str,
    uri: &str,
    body: &Value,
) -> Result<HttpResponse, String> {
    let body = body.to_string();
    let request = format!(
        "{method} {uri} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let what = |e: std::io::Error| format!("{method} {uri}: {e}");
    stream.set_read_timeout(Some(HTTP_TIMEOUT)).map_err(what)?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT)).map_err(what)?;
    stream.write_all(request.as_bytes()).map_err(what)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).map_err(what)?;
        if n == 0 {
            return Err(format!(
                "{method} {uri}: the connection closed before a whole response"
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(r) = parse_response(&buf).map_err(|e| format!("{method} {uri}: {e}"))? {
            return Ok(r);
        }
    }
}

/// One request that must succeed (2xx), timed.
fn fc_call(
    stream: &mut UnixStream,
    method: &str,
    uri: &str,
    body: &Value,
) -> Result<Duration, String> {
    let t = Instant::now();
    let r = http(stream, method, uri, body)?;
    let took = t.elapsed();
    if !(200..300).contains(&r.status) {
        return Err(format!(
            "{method} {uri}: HTTP {}: {}",
            r.status,
            r.body.trim()
        ));
    }
    Ok(took)
}

/// One request on a connection of its own, timed.
fn fc_request(sock: &Path, method: &str, uri: &str, body: &Value) -> Result<Duration, String> {
    let mut s = UnixStream::connect(sock).map_err(|e| format!("{}: {e}", sock.display()))?;
    fc_call(&mut s, method, uri, body)
}

// ---------------------------------------------------------------------------
// /proc and file figures

/// A `Name:  N kB` field of /proc/meminfo or /proc/PID/smaps_rollup, in
/// KiB.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
}

/// The host's MemAvailable, in KiB.
fn mem_available_kib() -> Option<u64> {
    kib_field(
        &std::fs::read_to_string("/proc/meminfo").ok()?,
        "MemAvailable",
    )
}

/// The busy and total jiffies of all CPUs, from the `cpu` line of
/// /proc/stat (busy: all but idle and iowait).
fn parse_cpu_jiffies(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    if v.len() < 5 {
        return None;
    }
    let total: u64 = v.iter().sum();
    Some((total - v[3] - v[4], total))
}

fn cpu_jiffies() -> Option<(u64, u64)> {
    parse_cpu_jiffies(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// How many CPUs were busy, on average, over the next `period`.
fn cpu_busy(period: Duration) -> Option<f64> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let (b0, t0) = cpu_jiffies()?;
    std::thread::sleep(period);
    let (b1, t1) = cpu_jiffies()?;
    (t1 > t0).then(|| cpus * (b1 - b0) as f64 / (t1 - t0) as f64)
}

/// The /proc/meminfo fields that show where the clones' memory went.
const MEMINFO_FIELDS: [&str; 8] = [
    "AnonPages",
    "Cached",
    "Shmem",
    "Slab",
    "SUnreclaim",
    "KernelStack",
    "PageTables",
    "SecPageTables",
];

/// How much each of [`MEMINFO_FIELDS`] grew from `before` to `after`
/// (/proc/meminfo texts), in KiB; fields missing from either are left out.
fn meminfo_growth(before: &str, after: &str) -> serde_json::Map<String, Value> {
    MEMINFO_FIELDS
        .iter()
        .filter_map(|f| {
            let (b, a) = (kib_field(before, f)?, kib_field(after, f)?);
            Some((f.to_string(), json!(a as i64 - b as i64)))
        })
        .collect()
}

/// A process's proportional set size, in KiB: total, anonymous, file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pss {
    total: u64,
    anon: u64,
    file: u64,
}

fn parse_pss(smaps_rollup: &str) -> Option<Pss> {
    Some(Pss {
        total: kib_field(smaps_rollup, "Pss")?,
        anon: kib_field(smaps_rollup, "Pss_Anon").unwrap_or(0),
        file: kib_field(smaps_rollup, "Pss_File").unwrap_or(0),
    })
}

fn pss_of(pid: u32) -> Option<Pss> {
    parse_pss(&std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?)
}

/// Bytes allocated on disk (`st_blocks` * 512) and apparent sizes of
/// some files.
fn disk_use(files: &[PathBuf]) -> Result<(u64, u64)> {
    let mut allocated = 0;
    let mut apparent = 0;
    for f in files {
        let m = std::fs::metadata(f).map_err(io_err("stat", f))?;
        allocated += m.blocks() * 512;
        apparent += m.len();
    }
    Ok((allocated, apparent))
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

/// One snapshot's figures.
#[derive(Debug, Clone, Default)]
struct CreateSample {
    /// The whole operation as the bench saw it: the `vmplant vm snapshot`
    /// command, or Firecracker's pause and create calls.
    wall_ms: f64,
    /// vmplant's own `ms`.
    own_ms: Option<f64>,
    pause_ms: Option<f64>,
    create_ms: Option<f64>,
    disk_bytes: u64,
    apparent_bytes: u64,
    /// vmplant's count of memory bytes written.
    data_bytes: Option<u64>,
}

/// One restore's figures.
#[derive(Debug, Clone, Default)]
struct RestoreSample {
    line_ms: f64,
    first_byte_ms: Option<f64>,
    rss_kib: u64,
    api_ms: Option<f64>,
    load_ms: Option<f64>,
}

/// What the clones of one VMM came to.
#[derive(Debug, Clone, Default)]
struct CloneFigures {
    wanted: u32,
    started: u32,
    ticking: u32,
    per_s: f64,
    pss_kib_mean: f64,
    host_used_mib: f64,
    stopped: Option<String>,
}

/// Medians of one VMM, for the summary.
#[derive(Debug, Clone, Default)]
struct Medians {
    create_ms: Option<f64>,
    disk_mib: Option<f64>,
    restore_ms: Option<f64>,
    rss_mib: Option<f64>,
    clones: Option<CloneFigures>,
    errors: Vec<String>,
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
    let root = super::boot::repo_root();
    let kernel = match (&args.kernel, &root) {
        (Some(k), _) => k.clone(),
        (None, Some(r)) => r.join("target/probe/probe.elf"),
        (None, None) => return Err(SnapshotBenchError::NoRepo.into()),
    };
    if !kernel.is_file() {
        return Err(SnapshotBenchError::NoKernel(kernel).into());
    }
    let kernel = std::path::absolute(&kernel).unwrap_or(kernel);
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
    watch_signals()?;
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
            return Ok(ExitCode::from(130));
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

    // --- booting and saving -------------------------------------------------

    /// Boots the test guest with `steps` in `vmm`, with an API or control
    /// socket at `sock`; its console goes to `name`.console.
    fn boot(&self, vmm: Vmm, name: &str, mem: u32, steps: &str, sock: &Path) -> Result<Guest> {
        let cmdline = format!("console=ttyS0 probe={steps}");
        let console = self.path(&format!("{name}.console"));
        let log = self.path(&format!("{name}.log"));
        let _ = std::fs::remove_file(sock);
        match vmm {
            Vmm::Vmplant => {
                let mut cmd = Command::new(&self.vmplant);
                cmd.arg("run")
                    .arg("--kernel")
                    .arg(&self.kernel)
                    .arg("--cmdline")
                    .arg(&cmdline)
                    .arg("--vcpus")
                    .arg(self.args.vcpus.to_string())
                    .arg("--mem")
                    .arg(mem.to_string())
                    .arg("--no-stdin")
                    .arg("--control")
                    .arg(sock)
                    .env("NO_COLOR", "1");
                Guest::spawn(format!("vmplant {name}"), &mut cmd, &console, &log)
            }
            Vmm::Firecracker => {
                let config = self.path(&format!("{name}.json"));
                let spec = json!({
                    "boot-source": { "kernel_image_path": self.kernel, "boot_args": cmdline },
                    "machine-config": { "vcpu_count": self.args.vcpus, "mem_size_mib": mem },
                    "drives": [],
                });
                std::fs::write(&config, spec.to_string()).map_err(io_err("write", &config))?;
                let fc_log = self.path(&format!("{name}.fclog"));
                // Firecracker opens its log file but does not create it.
                std::fs::File::create(&fc_log).map_err(io_err("create", &fc_log))?;
                let mut cmd = Command::new(&self.firecracker);
                cmd.arg("--api-sock")
                    .arg(sock)
                    .args(["--no-seccomp", "--level", "Warn", "--log-path"])
                    .arg(&fc_log)
                    .arg("--config-file")
                    .arg(&config);
                let mut g = Guest::spawn(format!("firecracker {name}"), &mut cmd, &console, &log)?;
                // Its log says more than its standard error.
                g.log = fc_log;
                Ok(g)
            }
        }
    }

    /// Saves the running `guest` into `dest` (a directory for vmplant, a
    /// file prefix for Firecracker), leaving it stopped or paused; times
    /// it, and measures the files.
    fn save(
        &self,
        vmm: Vmm,
        guest: &mut Guest,
        sock: &Path,
        dest: &Path,
    ) -> Result<(CreateSample, Saved)> {
        // Write back what earlier runs left in the page cache, outside the
        // timing.
        nix::unistd::sync();
        check_interrupt()?;
        match vmm {
            Vmm::Vmplant => {
                let t = Instant::now();
                let out = Command::new(&self.vmplant)
                    .arg("vm")
                    .arg("--control")
                    .arg(sock)
                    .arg("snapshot")
                    .arg(dest)
                    .arg("--stop")
                    .stdin(Stdio::null())
                    .output()
                    .map_err(|source| SnapshotBenchError::Spawn {
                        what: "vmplant vm snapshot".into(),
                        source,
                    })?;
                let wall = t.elapsed();
                if !out.status.success() {
                    return Err(guest.failed(&format!(
                        "vmplant vm snapshot: {}: {}",
                        super::measure::describe_status(out.status),
                        String::from_utf8_lossy(&out.stderr).trim()
                    )));
                }
                let reply: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
                let files = vec![dest.join("state"), dest.join("memory")];
                let (disk, apparent) = disk_use(&files)?;
                if !guest.wait_exit(Duration::from_secs(5)) {
                    tracing::warn!("{}: still running 5 s after snapshot --stop", guest.what);
                }
                Ok((
                    CreateSample {
                        wall_ms: ms(wall),
                        own_ms: reply["ms"].as_f64(),
                        pause_ms: None,
                        create_ms: None,
                        disk_bytes: disk,
                        apparent_bytes: apparent,
                        data_bytes: reply["memory_data_bytes"].as_u64(),
                    },
                    Saved {
                        files,
                        dir: dest.to_path_buf(),
                    },
                ))
            }
            Vmm::Firecracker => {
                let state = dest.with_extension("state");
                let memory = dest.with_extension("mem");
                let pause = fc_request(sock, "PATCH", "/vm", &json!({"state": "Paused"}))
                    .map_err(|e| guest.failed(&e))?;
                let create = fc_request(
                    sock,
                    "PUT",
                    "/snapshot/create",
                    &json!({"snapshot_type": "Full", "snapshot_path": state, "mem_file_path": memory}),
                )
                .map_err(|e| guest.failed(&e))?;
                let files = vec![state, memory];
                let (disk, apparent) = disk_use(&files)?;
                Ok((
                    CreateSample {
                        wall_ms: ms(pause + create),
                        own_ms: None,
                        pause_ms: Some(ms(pause)),
                        create_ms: Some(ms(create)),
                        disk_bytes: disk,
                        apparent_bytes: apparent,
                        data_bytes: None,
                    },
                    Saved {
                        files,
                        dir: dest.to_path_buf(),
                    },
                ))
            }
        }
    }

    /// Boots a guest with `steps`, waits for `ready` on its console, saves
    /// it as `name`, and ends it.
    fn prepare(
        &self,
        vmm: Vmm,
        name: &str,
        mem: u32,
        steps: &str,
        ready: &[&str],
    ) -> Result<(CreateSample, Saved)> {
        let sock = self.path(&format!("{name}.sock"));
        let mut guest = self.boot(vmm, name, mem, steps, &sock)?;
        for needle in ready {
            guest.wait_console(needle, self.timeout)?;
        }
        let r = self.save(vmm, &mut guest, &sock, &self.path(name));
        drop(guest);
        let _ = std::fs::remove_file(&sock);
        r
    }

    fn create_line(&self, vmm: Vmm, run: Option<u32>, what: &str, s: &CreateSample) -> Value {
        json!({
            "bench": "snapshot", "phase": what, "vmm": vmm.name(), "run": run,
            "wall_ms": round(s.wall_ms, 3),
            "ms": s.own_ms.map(|m| round(m, 3)),
            "pause_ms": s.pause_ms.map(|m| round(m, 3)),
            "create_ms": s.create_ms.map(|m| round(m, 3)),
            "disk_bytes": s.disk_bytes, "apparent_bytes": s.apparent_bytes,
            "memory_data_bytes": s.data_bytes,
            "host_load_1m": load_1m(),
        })
    }

    // --- create ----------------------------------------------------------------

    fn create_phase(&self, medians: &mut [Medians; 2]) -> Result<()> {
        let steps = format!("fill:{}+tick:1000", self.args.fill);
        let mut samples: [Vec<CreateSample>; 2] = [Vec::new(), Vec::new()];
        let mut failed = [0u32; 2];
        for run in 1..=self.args.runs {
            for &vmm in &self.args.only {
                let name = format!("create-{}-{run}", vmm.name());
                let r = self.prepare(
                    vmm,
                    &name,
                    self.args.mem,
                    &steps,
                    &[r#""probe":"fill""#, r#""probe":"tick""#],
                );
                match r {
                    Ok((s, saved)) => {
                        emit(&self.create_line(vmm, Some(run), "create", &s));
                        samples[index(vmm)].push(s);
                        remove_saved(&saved);
                    }
                    Err(e) => {
                        failed[index(vmm)] += 1;
                        self.note_failure(medians, "create", vmm, Some(run), e)?;
                    }
                }
            }
        }
        for &vmm in &self.args.only {
            let v = &samples[index(vmm)];
            let f = |g: &dyn Fn(&CreateSample) -> Option<f64>| {
                v.iter().filter_map(g).collect::<Vec<f64>>()
            };
            let wall = f(&|s| Some(s.wall_ms));
            let disk = f(&|s| Some(s.disk_bytes as f64));
            emit(&json!({
                "bench": "snapshot", "phase": "create", "vmm": vmm.name(),
                "runs": v.len(), "failed": failed[index(vmm)],
                "guest_mem_mib": self.args.mem, "guest_filled_mib": self.args.fill,
                "wall_ms": stats_of(&wall, 3),
                "ms": stats_of(&f(&|s| s.own_ms), 3),
                "pause_ms": stats_of(&f(&|s| s.pause_ms), 3),
                "create_ms": stats_of(&f(&|s| s.create_ms), 3),
                "disk_bytes": stats_of(&disk, 0),
                "apparent_bytes": stats_of(&f(&|s| Some(s.apparent_bytes as f64)), 0),
            }));
            let m = &mut medians[index(vmm)];
            m.create_ms = median(&wall);
            m.disk_mib = median(&disk).map(|d| d / (1024.0 * 1024.0));
        }
        Ok(())
    }

    // --- restore ---------------------------------------------------------------

    fn restore_phase(&self, medians: &mut [Medians; 2]) -> Result<()> {
        let steps = format!(
            "fill:{}+count:{COUNT_FOREVER}:{}",
            self.args.fill, self.args.count_every
        );
        let mut saved: [Option<Saved>; 2] = [None, None];
        for &vmm in &self.args.only {
            let name = format!("restore-{}", vmm.name());
            let ready = [r#""probe":"fill""#, r#""probe":"count""#];
            match self.prepare(vmm, &name, self.args.mem, &steps, &ready) {
                Ok((s, sv)) => {
                    emit(&self.create_line(vmm, None, "restore-snapshot", &s));
                    saved[index(vmm)] = Some(sv);
                }
                Err(e) => self.note_failure(medians, "restore", vmm, None, e)?,
            }
        }
        let mut samples: [Vec<RestoreSample>; 2] = [Vec::new(), Vec::new()];
        let mut failed = [0u32; 2];
        for run in 1..=self.args.runs {
            for &vmm in &self.args.only {
                let Some(sv) = &saved[index(vmm)] else {
                    continue;
                };
                match self.restore_once(vmm, sv, run) {
                    Ok(s) => {
                        emit(&json!({
                            "bench": "snapshot", "phase": "restore", "vmm": vmm.name(), "run": run,
                            "line_ms": round(s.line_ms, 3),
                            "first_byte_ms": s.first_byte_ms.map(|m| round(m, 3)),
                            "api_ms": s.api_ms.map(|m| round(m, 3)),
                            "load_ms": s.load_ms.map(|m| round(m, 3)),
                            "rss_kib": s.rss_kib,
                        }));
                        samples[index(vmm)].push(s);
                    }
                    Err(e) => {
                        failed[index(vmm)] += 1;
                        self.note_failure(medians, "restore", vmm, Some(run), e)?;
                    }
                }
            }
        }
        for &vmm in &self.args.only {
            if saved[index(vmm)].is_none() {
                continue;
            }
            let v = &samples[index(vmm)];
            let f = |g: &dyn Fn(&RestoreSample) -> Option<f64>| {
                v.iter().filter_map(g).collect::<Vec<f64>>()
            };
            let line = f(&|s| Some(s.line_ms));
            let rss = f(&|s| Some(s.rss_kib as f64));
            emit(&json!({
                "bench": "snapshot", "phase": "restore", "vmm": vmm.name(),
                "runs": v.len(), "failed": failed[index(vmm)],
                "line_ms": stats_of(&line, 3),
                "first_byte_ms": stats_of(&f(&|s| s.first_byte_ms), 3),
                "api_ms": stats_of(&f(&|s| s.api_ms), 3),
                "load_ms": stats_of(&f(&|s| s.load_ms), 3),
                "rss_kib": stats_of(&rss, 0),
                "host_load_1m": load_1m(),
            }));
            let m = &mut medians[index(vmm)];
            m.restore_ms = median(&line);
            m.rss_mib = median(&rss).map(|r| r / 1024.0);
        }
        Ok(())
    }

    /// One restore in a fresh process, timed from just before its spawn to
    /// the first whole console line the restored guest begins.
    fn restore_once(&self, vmm: Vmm, saved: &Saved, run: u32) -> Result<RestoreSample> {
        check_interrupt()?;
        let log = self.path(&format!("restore-{}-{run}.log", vmm.name()));
        let errors = self.path(&format!("restore-{}-{run}.stderr", vmm.name()));
        // vmplant logs to standard error; Firecracker to its log file.
        let stderr_path = if vmm == Vmm::Vmplant { &log } else { &errors };
        let stderr = std::fs::File::create(stderr_path).map_err(io_err("create", stderr_path))?;
        let sock = self.path(&format!("restore-{}-{run}.sock", vmm.name()));
        let mut cmd = match vmm {
            Vmm::Vmplant => {
                let mut c = Command::new(&self.vmplant);
                c.arg("run")
                    .arg("--restore")
                    .arg(&saved.dir)
                    .arg("--no-stdin")
                    .env("NO_COLOR", "1");
                c
            }
            Vmm::Firecracker => {
                std::fs::File::create(&log).map_err(io_err("create", &log))?;
                let mut c = Command::new(&self.firecracker);
                c.arg("--api-sock")
                    .arg(&sock)
                    .args(["--no-seccomp", "--level", "Warn", "--log-path"])
                    .arg(&log);
                c
            }
        };
        cmd.stderr(Stdio::from(stderr));
        die_with_us(&mut cmd);
        let t0 = Instant::now();
        let mut m = Measured::spawn(&mut cmd)?;
        let deadline = t0 + self.timeout;
        let mut sample = RestoreSample::default();
        let last_words = |e: String| {
            let text = strip_ansi(&std::fs::read_to_string(&log).unwrap_or_default());
            let last = text
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            SnapshotBenchError::Failed(format!(
                "{} restore run {run}: {e}; log ends: {last}",
                vmm.name()
            ))
        };
        if vmm == Vmm::Firecracker {
            let mut stream = connect_api(&sock, deadline, &mut || {
                m.exit_status(Duration::ZERO)
                    .map(super::measure::describe_status)
            })
            .map_err(last_words)?;
            sample.api_ms = Some(ms(t0.elapsed()));
            let [state, memory] = [&saved.files[0], &saved.files[1]];
            let load = fc_call(
                &mut stream,
                "PUT",
                "/snapshot/load",
                &json!({
                    "snapshot_path": state,
                    "mem_backend": {"backend_type": "File", "backend_path": memory},
                    "resume_vm": true,
                }),
            )
            .map_err(last_words)?;
            sample.load_ms = Some(ms(load));
        }
        let needle = r#"{"probe":"count""#;
        let line = wait_line(&mut m, t0, needle, self.timeout)
            .map_err(|e| last_words(crate::cli::chain(&e)))?;
        sample.line_ms = ms(line);
        sample.first_byte_ms = m.first_output().map(ms);
        sample.rss_kib = m.rss_kib()?;
        let out = String::from_utf8_lossy(m.output()).into_owned();
        m.kill();
        let _ = std::fs::remove_file(&sock);
        if let Some(bad) = out.lines().find(|l| guest_error(l)) {
            return Err(last_words(format!("the guest reported {bad}")));
        }
        Ok(sample)
    }

    // --- clones ----------------------------------------------------------------

    fn clones_phase(&self, medians: &mut [Medians; 2]) -> Result<()> {
        let steps = format!("tick:{}", self.args.tick_ms);
        // How busy the host is without clones (other work on it).
        let baseline = cpu_busy(Duration::from_secs(1)).unwrap_or(0.0);
        for (k, &vmm) in self.args.only.iter().enumerate() {
            if k > 0 {
                self.settle(baseline)?;
            }
            let name = format!("clones-{}", vmm.name());
            let saved = match self.prepare(
                vmm,
                &name,
                self.args.clone_mem,
                &steps,
                &[r#""probe":"tick""#],
            ) {
                Ok((s, sv)) => {
                    emit(&self.create_line(vmm, None, "clones-snapshot", &s));
                    sv
                }
                Err(e) => {
                    self.note_failure(medians, "clones", vmm, None, e)?;
                    continue;
                }
            };
            let wanted = match vmm {
                Vmm::Vmplant => self.args.clones,
                Vmm::Firecracker => self.args.fc_clones.unwrap_or(self.args.clones),
            };
            let figures = self.clones_of(vmm, &saved, wanted)?;
            if let Some(why) = &figures.stopped {
                medians[index(vmm)].errors.push(format!("clones: {why}"));
            }
            medians[index(vmm)].clones = Some(figures);
            remove_saved(&saved);
        }
        Ok(())
    }

    /// Waits until the host has torn the last VMM's clones down: at least
    /// [`CLONES_SETTLE`], then until the CPUs are no busier than
    /// `baseline` (and half a CPU), at most [`CLONES_SETTLE_MAX`].
    fn settle(&self, baseline: f64) -> Result<()> {
        let t = Instant::now();
        std::thread::sleep(CLONES_SETTLE);
        let mut busy = None;
        while t.elapsed() < CLONES_SETTLE_MAX {
            check_interrupt()?;
            busy = cpu_busy(Duration::from_secs(1));
            if busy.is_none_or(|b| b <= baseline + 0.5) {
                break;
            }
        }
        emit(&json!({
            "bench": "snapshot", "phase": "clones-settle",
            "seconds": round(t.elapsed().as_secs_f64(), 1),
            "cpu_busy": busy.map(|b| round(b, 2)), "cpu_busy_baseline": round(baseline, 2),
        }));
        Ok(())
    }

    /// Starts `wanted` clones of `saved` one after another, checks that they
    /// tick, measures them, ends them.
    fn clones_of(&self, vmm: Vmm, saved: &Saved, wanted: u32) -> Result<CloneFigures> {
        let dir = self.path(&format!("clones-{}.d", vmm.name()));
        std::fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        nix::unistd::sync();
        std::thread::sleep(Duration::from_millis(500));
        let meminfo_before = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let before = kib_field(&meminfo_before, "MemAvailable").unwrap_or(0);
        let busy_before = cpu_busy(Duration::from_millis(500));
        let reserve = self.args.reserve_mib * 1024;
        let mut guests: Vec<Guest> = Vec::with_capacity(wanted as usize);
        let mut start_ms = Vec::with_capacity(wanted as usize);
        let mut stopped = None;
        let progress_every = (wanted / 10).max(1);
        let t_all = Instant::now();
        let result = (|| -> Result<()> {
            for i in 0..wanted {
                check_interrupt()?;
                let avail = mem_available_kib().unwrap_or(u64::MAX);
                if avail < reserve {
                    stopped = Some(format!(
                        "stopped at {i} of {wanted} clones: MemAvailable {} MiB, below the {} MiB reserve",
                        avail / 1024,
                        self.args.reserve_mib
                    ));
                    break;
                }
                let t = Instant::now();
                match self.start_clone(vmm, saved, &dir, i) {
                    Ok(g) => {
                        start_ms.push(ms(t.elapsed()));
                        guests.push(g);
                    }
                    Err(SnapshotBenchError::Interrupted) => {
                        return Err(SnapshotBenchError::Interrupted);
                    }
                    Err(e) => {
                        stopped = Some(format!(
                            "clone {} of {wanted} failed: {}",
                            i + 1,
                            crate::cli::chain(&e)
                        ));
                        break;
                    }
                }
                let n = i + 1;
                if n % progress_every == 0 || n == wanted {
                    let secs = t_all.elapsed().as_secs_f64();
                    emit(&json!({
                        "bench": "snapshot", "phase": "clones-progress", "vmm": vmm.name(),
                        "running": n, "seconds": round(secs, 3),
                        "clones_per_s": round(f64::from(n) / secs, 2),
                        "last_start_ms": start_ms.last().map(|m| round(*m, 3)),
                        "mem_available_mib": mem_available_kib().map(|k| k / 1024),
                        "host_load_1m": load_1m(),
                    }));
                }
            }
            Ok(())
        })();
        let seconds = t_all.elapsed().as_secs_f64();
        if let Err(e) = result {
            end_all(&mut guests);
            return Err(e);
        }
        if let Some(why) = &stopped {
            tracing::warn!("{} clones: {why}", vmm.name());
        }
        let started = guests.len() as u32;
        // Every clone must tick: a tick line in its console file.
        let mut ticking = vec![false; guests.len()];
        let deadline = Instant::now() + Duration::from_millis(self.args.tick_ms) + TICK_GRACE;
        loop {
            for (g, t) in guests.iter().zip(ticking.iter_mut()).filter(|(_, t)| !**t) {
                let text = std::fs::read_to_string(&g.console).unwrap_or_default();
                *t = text.contains(r#""probe":"tick""#);
            }
            if ticking.iter().all(|t| *t) || Instant::now() >= deadline {
                break;
            }
            if let Err(e) = check_interrupt() {
                end_all(&mut guests);
                return Err(e);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut dead = 0;
        for g in guests.iter_mut() {
            if g.ended().is_some() {
                dead += 1;
            }
        }
        let pss: Vec<Pss> = guests.iter().filter_map(|g| pss_of(g.pid())).collect();
        let meminfo_after = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let after = kib_field(&meminfo_after, "MemAvailable").unwrap_or(0);
        let load = load_1m();
        let silent: Vec<String> = guests
            .iter()
            .zip(&ticking)
            .filter(|(_, t)| !**t)
            .take(2)
            .map(|(g, _)| format!("{}: {}", g.what, g.tail()))
            .collect();
        end_all(&mut guests);
        let ticking = ticking.iter().filter(|t| **t).count() as u32;
        let total: Vec<f64> = pss.iter().map(|p| p.total as f64).collect();
        let mean = |f: &dyn Fn(&Pss) -> u64| {
            if pss.is_empty() {
                0.0
            } else {
                pss.iter().map(|p| f(p) as f64).sum::<f64>() / pss.len() as f64
            }
        };
        let per_s = if seconds > 0.0 {
            f64::from(started) / seconds
        } else {
            0.0
        };
        let host_used_mib = before.saturating_sub(after) as f64 / 1024.0;
        emit(&json!({
            "bench": "snapshot", "phase": "clones", "vmm": vmm.name(),
            "clone_mem_mib": self.args.clone_mem, "tick_ms": self.args.tick_ms,
            "wanted": wanted, "started": started, "ticking": ticking, "dead": dead,
            "seconds": round(seconds, 3), "clones_per_s": round(per_s, 2),
            "start_ms": stats_of(&start_ms, 3),
            "pss_kib": stats_of(&total, 0),
            "pss_kib_mean": round(mean(&|p| p.total), 1),
            "pss_anon_kib_mean": round(mean(&|p| p.anon), 1),
            "pss_file_kib_mean": round(mean(&|p| p.file), 1),
            "pss_mib_sum": round(total.iter().sum::<f64>() / 1024.0, 1),
            "mem_available_mib_before": before / 1024,
            "mem_available_mib_after": after / 1024,
            "host_used_mib": round(host_used_mib, 1),
            "meminfo_growth_kib": meminfo_growth(&meminfo_before, &meminfo_after),
            "host_used_kib_per_clone": if started > 0 { round(host_used_mib * 1024.0 / f64::from(started), 1) } else { 0.0 },
            "stopped": stopped,
            "silent": silent,
            "cpu_busy_before": busy_before.map(|b| round(b, 2)),
            "host_load_1m": load,
        }));
        Ok(CloneFigures {
            wanted,
            started,
            ticking,
            per_s,
            pss_kib_mean: mean(&|p| p.total),
            host_used_mib,
            stopped,
        })
    }

    /// Starts clone `i` of `saved` and waits until it runs.
    fn start_clone(&self, vmm: Vmm, saved: &Saved, dir: &Path, i: u32) -> Result<Guest> {
        let console = dir.join(format!("{i}.console"));
        let log = dir.join(format!("{i}.log"));
        let sock = dir.join(format!("{i}.sock"));
        let deadline = Instant::now() + self.timeout;
        match vmm {
            Vmm::Vmplant => {
                let mut cmd = Command::new(&self.vmplant);
                cmd.arg("run")
                    .arg("--restore")
                    .arg(&saved.dir)
                    .arg("--no-stdin")
                    .arg("--control")
                    .arg(&sock)
                    .env("NO_COLOR", "1");
                let mut g = Guest::spawn(format!("vmplant clone {i}"), &mut cmd, &console, &log)?;
                // The control socket is served once the vCPUs run.
                connect_api(&sock, deadline, &mut || g.ended()).map_err(|e| g.failed(&e))?;
                Ok(g)
            }
            Vmm::Firecracker => {
                std::fs::File::create(&log).map_err(io_err("create", &log))?;
                let mut cmd = Command::new(&self.firecracker);
                cmd.arg("--api-sock")
                    .arg(&sock)
                    .args(["--no-seccomp", "--level", "Warn", "--log-path"])
                    .arg(&log);
                let errors = dir.join(format!("{i}.stderr"));
                let mut g = Guest::spawn(
                    format!("firecracker clone {i}"),
                    &mut cmd,
                    &console,
                    &errors,
                )?;
                g.log = log;
                let mut stream =
                    connect_api(&sock, deadline, &mut || g.ended()).map_err(|e| g.failed(&e))?;
                fc_call(
                    &mut stream,
                    "PUT",
                    "/snapshot/load",
                    &json!({
                        "snapshot_path": saved.files[0],
                        "mem_backend": {"backend_type": "File", "backend_path": saved.files[1]},
                        "resume_vm": true,
                    }),
                )
                .map_err(|e| g.failed(&e))?;
                Ok(g)
            }
        }
    }
}

/// Reads `m`'s output until a whole line that begins with `needle` is
/// there; returns the time from `t0` to then.
fn wait_line(m: &mut Measured, t0: Instant, needle: &str, timeout: Duration) -> Result<Duration> {
    m.wait_for(needle, timeout)?;
    let deadline = t0 + timeout;
    loop {
        let out = m.output();
        if let Some(p) = find_bytes(out, needle.as_bytes())
            && out[p..].contains(&b'\n')
        {
            return Ok(t0.elapsed());
        }
        if Instant::now() >= deadline {
            return Err(SnapshotBenchError::Failed(format!(
                "the line that begins with {needle:?} did not end within {timeout:?}"
            )));
        }
        check_interrupt()?;
        m.drain_for(Duration::from_micros(200))?;
    }
}

fn remove_saved(saved: &Saved) {
    for f in &saved.files {
        let _ = std::fs::remove_file(f);
    }
    if saved.dir.is_dir() {
        let _ = std::fs::remove_dir_all(&saved.dir);
    }
}

/// `0.42x`, or `-` when either side is missing.
fn ratio(ours: Option<f64>, theirs: Option<f64>) -> String {
    match (ours, theirs) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    }
}

/// The last line: each phase's medians, vmplant's over Firecracker's.
fn summary_line(setup: &Setup, medians: &[Medians; 2]) -> String {
    let (ours, fc) = (&medians[0], &medians[1]);
    let has = |v: Vmm| setup.args.only.contains(&v);
    let mut parts = Vec::new();
    let opt = |x: Option<f64>, unit: &str| x.map_or("-".into(), |x| format!("{x:.1} {unit}"));
    for phase in &setup.args.phases {
        let mut p = Vec::new();
        match phase {
            Phase::Create => {
                for (v, m) in [(Vmm::Vmplant, ours), (Vmm::Firecracker, fc)] {
                    if has(v) {
                        p.push(format!(
                            "{} {} {} on disk",
                            v.name(),
                            opt(m.create_ms, "ms"),
                            opt(m.disk_mib, "MiB")
                        ));
                    }
                }
                if has(Vmm::Vmplant) && has(Vmm::Firecracker) {
                    p.push(format!(
                        "vmplant/firecracker {} time, {} disk",
                        ratio(ours.create_ms, fc.create_ms),
                        ratio(ours.disk_mib, fc.disk_mib)
                    ));
                }
                parts.push(format!(
                    "create ({} MiB guest, {} MiB written): {}",
                    setup.args.mem,
                    setup.args.fill,
                    p.join(", ")
                ));
            }
            Phase::Restore => {
                for (v, m) in [(Vmm::Vmplant, ours), (Vmm::Firecracker, fc)] {
                    if has(v) {
                        p.push(format!(
                            "{} {} RSS {}",
                            v.name(),
                            opt(m.restore_ms, "ms"),
                            opt(m.rss_mib, "MiB")
                        ));
                    }
                }
                if has(Vmm::Vmplant) && has(Vmm::Firecracker) {
                    p.push(format!(
                        "vmplant/firecracker {} time, {} RSS",
                        ratio(ours.restore_ms, fc.restore_ms),
                        ratio(ours.rss_mib, fc.rss_mib)
                    ));
                }
                parts.push(format!("restore: {}", p.join(", ")));
            }
            Phase::Clones => {
                for (v, m) in [(Vmm::Vmplant, ours), (Vmm::Firecracker, fc)] {
                    if !has(v) {
                        continue;
                    }
                    match &m.clones {
                        Some(c) => p.push(format!(
                            "{} {}/{} ticking, {:.1}/s, PSS {:.2} MiB per clone, host {:.0} MiB",
                            v.name(),
                            c.ticking,
                            c.wanted,
                            c.per_s,
                            c.pss_kib_mean / 1024.0,
                            c.host_used_mib
                        )),
                        None => p.push(format!("{} -", v.name())),
                    }
                }
                if let (Some(a), Some(b)) = (&ours.clones, &fc.clones) {
                    p.push(format!(
                        "vmplant/firecracker {} rate, {} PSS, {} host memory per clone",
                        ratio(Some(a.per_s), Some(b.per_s)),
                        ratio(Some(a.pss_kib_mean), Some(b.pss_kib_mean)),
                        ratio(
                            (a.started > 0).then(|| a.host_used_mib / f64::from(a.started)),
                            (b.started > 0).then(|| b.host_used_mib / f64::from(b.started))
                        )
                    ));
                }
                parts.push(format!(
                    "clones ({} MiB): {}",
                    setup.args.clone_mem,
                    p.join(", ")
                ));
            }
        }
    }
    let mut line = format!("snapshot: {}", parts.join(" | "));
    for (v, m) in [(Vmm::Vmplant, ours), (Vmm::Firecracker, fc)] {
        for e in &m.errors {
            line += &format!(" | {} {e}", v.name());
        }
    }
    if let Some(l) = load_1m() {
        line += &format!(" | load {l:.2}");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_firecracker_responses() {
        let ok = b"HTTP/1.1 204 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\r\n";
        assert_eq!(
            parse_response(ok),
            Ok(Some(HttpResponse {
                status: 204,
                body: String::new()
            }))
        );
        let body = r#"{"fault_message":"Load snapshot error: Cannot open the memory file"}"#;
        let bad = format!(
            "HTTP/1.1 400 \r\nServer: Firecracker API\r\nContent-Type: application/json\r\n\
             content-length: {}\r\n\r\n{body}",
            body.len()
        );
        assert_eq!(
            parse_response(bad.as_bytes()),
            Ok(Some(HttpResponse {
                status: 400,
                body: body.into()
            }))
        );
        // Not all there yet: the head, then the body.
        assert_eq!(parse_response(&ok[..ok.len() - 2]), Ok(None));
        assert_eq!(parse_response(&bad.as_bytes()[..bad.len() - 1]), Ok(None));
        assert_eq!(parse_response(b""), Ok(None));
        // A reason phrase, and a body followed by more bytes.
        let r = parse_response(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}extra")
            .unwrap()
            .unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "{}"));
    }

    #[test]
    fn refuses_broken_responses() {
        for bad in [
            &b"HTTP/2 200\r\n\r\n"[..],
            b"HTTP/1.1 abc \r\n\r\n",
            b"HTTP/1.1 99 \r\n\r\n",
            b"garbage\r\n\r\n",
            b"HTTP/1.1 200 \r\nno colon\r\n\r\n",
            b"HTTP/1.1 200 \r\nContent-Length: many\r\n\r\n",
            b"HTTP/1.1 200 \r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert!(
                parse_response(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let endless = vec![b'x'; MAX_HEAD + 1];
        assert!(parse_response(&endless).is_err());
    }

    #[test]
    fn parses_pss_and_meminfo() {
        let rollup = "55b228a50000-7fffaf9c7000 ---p 00000000 00:00 0    [rollup]\n\
                      Rss:                5348 kB\nPss:                4141 kB\n\
                      Pss_Dirty:           524 kB\nPss_Anon:            520 kB\n\
                      Pss_File:           3621 kB\nPss_Shmem:             0 kB\n";
        assert_eq!(
            parse_pss(rollup),
            Some(Pss {
                total: 4141,
                anon: 520,
                file: 3621
            })
        );
        assert_eq!(parse_pss("Rss: 12 kB\n"), None);
        // An older kernel without the split.
        assert_eq!(
            parse_pss("Pss:  7 kB\n"),
            Some(Pss {
                total: 7,
                anon: 0,
                file: 0
            })
        );
        let meminfo = "MemTotal:       24683524 kB\nMemFree:        17700000 kB\n\
                       MemAvailable:   23899000 kB\n";
        assert_eq!(kib_field(meminfo, "MemAvailable"), Some(23_899_000));
        assert_eq!(kib_field(meminfo, "MemAvail"), None);
        assert_eq!(kib_field("MemAvailable: 12 MB\n", "MemAvailable"), None);
        let after = "AnonPages: 1000 kB\nSlab: 50 kB\nPageTables: 10 kB\n";
        let growth = meminfo_growth("AnonPages: 400 kB\nSlab: 80 kB\n", after);
        assert_eq!(
            Value::Object(growth),
            json!({"AnonPages": 600, "Slab": -30})
        );
    }

    #[test]
    fn parses_cpu_jiffies() {
        let stat = "cpu  100 5 50 800 20 3 2 10 0 0\ncpu0 50 2 25 400 10 1 1 5 0 0\n";
        assert_eq!(parse_cpu_jiffies(stat), Some((170, 990)));
        assert_eq!(parse_cpu_jiffies("cpu0 1 2 3 4 5\n"), None);
        assert_eq!(parse_cpu_jiffies("cpu  1 2 x 4 5\n"), None);
    }

    #[test]
    fn finds_guest_errors_and_ratios() {
        assert!(guest_error(r#"{"probe":"error","msg":"unknown step x"}"#));
        assert!(guest_error(
            r#"{"probe":"fill","mib":64,"error":"RAM ends"}"#
        ));
        assert!(guest_error(r#"{"probe":"exception","vcpu":0,"vector":13}"#));
        assert!(!guest_error(r#"{"probe":"tick","n":3}"#));
        assert_eq!(ratio(Some(5.0), Some(20.0)), "0.25x");
        assert_eq!(ratio(Some(5.0), None), "-");
        assert_eq!(ratio(Some(5.0), Some(0.0)), "-");
        assert_eq!(strip_ansi("\u{1b}[33m WARN\u{1b}[0m x"), " WARN x");
    }

    #[test]
    fn talks_http_over_a_unix_socket() {
        let dir = ScratchDir::new("vmplant-bench-snapshot-test").unwrap();
        let path = dir.path().join("api.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            while !buf.ends_with(b"}") {
                let n = s.read(&mut chunk).unwrap();
                buf.extend_from_slice(&chunk[..n]);
            }
            s.write_all(b"HTTP/1.1 400 \r\nContent-Length: 5\r\n\r\nno!!!")
                .unwrap();
            String::from_utf8(buf).unwrap()
        });
        let mut gone = || None;
        let mut s = connect_api(&path, Instant::now() + Duration::from_secs(5), &mut gone).unwrap();
        let e = fc_call(&mut s, "PUT", "/snapshot/load", &json!({"a": 1})).unwrap_err();
        assert_eq!(e, "PUT /snapshot/load: HTTP 400: no!!!");
        let request = server.join().unwrap();
        assert!(
            request.starts_with("PUT /snapshot/load HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(request.contains("Content-Length: 7\r\n"), "{request}");
        assert!(request.ends_with("\r\n\r\n{\"a\":1}"), "{request}");
        let e = connect_api(
            &dir.path().join("none.sock"),
            Instant::now() + Duration::from_millis(5),
            &mut gone,
        )
        .unwrap_err();
        assert!(e.contains("no connection"), "{e}");
    }
}
