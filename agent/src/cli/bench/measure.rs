//! Shared benchmark helpers: spawn a process and time it until a string
//! appears on its standard output, read its RSS and CPU time from /proc,
//! summarize samples (median, min, max), scratch directories, and JSON
//! number formatting.

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use std::io::Read;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    #[error("cannot start {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the output of {program}")]
    Read {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot wait for the output of {program}")]
    Poll {
        program: String,
        #[source]
        source: nix::Error,
    },
    #[error("{program} printed no {needle:?} within {after:?}")]
    Timeout {
        program: String,
        needle: String,
        after: Duration,
    },
    #[error("{program} ended ({status}) before printing {needle:?}")]
    Ended {
        program: String,
        needle: String,
        status: String,
    },
    #[error("cannot read {path}")]
    Proc {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} has no {field} field")]
    ProcField { path: String, field: &'static str },
    #[error("cannot create a scratch directory in {dir}")]
    TempDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A process being measured, its standard output piped to us. Killed and
/// reaped when dropped.
pub struct Measured {
    program: String,
    child: Child,
    stdout: ChildStdout,
    start: Instant,
    output: Vec<u8>,
    first_output: Option<Duration>,
    eof: bool,
}

impl Measured {
    /// Starts `cmd` with standard input from /dev/null and standard output
    /// piped; the clock starts just before the spawn. Standard error is
    /// whatever the caller set on `cmd`.
    pub fn spawn(cmd: &mut Command) -> Result<Self, MeasureError> {
        let program = Path::new(cmd.get_program())
            .file_name()
            .unwrap_or(cmd.get_program())
            .to_string_lossy()
            .into_owned();
        cmd.stdin(Stdio::null()).stdout(Stdio::piped());
        let start = Instant::now();
        let mut child = cmd.spawn().map_err(|source| MeasureError::Spawn {
            program: program.clone(),
            source,
        })?;
        let stdout = child.stdout.take().expect("standard output is piped");
        Ok(Measured {
            program,
            child,
            stdout,
            start,
            output: Vec::new(),
            first_output: None,
            eof: false,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// When the first byte of standard output arrived (from just before the
    /// spawn).
    pub fn first_output(&self) -> Option<Duration> {
        self.first_output
    }

    /// Everything read from standard output so far.
    pub fn output(&self) -> &[u8] {
        &self.output
    }

    /// Reads standard output until `needle` appears in it; returns the time
    /// from just before the spawn to the read that brought it.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<Duration, MeasureError> {
        let deadline = self.start + timeout;
        let mut searched = 0;
        loop {
            if find(&self.output[searched..], needle.as_bytes()).is_some() {
                return Ok(self.start.elapsed());
            }
            // A needle may straddle two reads.
            searched = self.output.len().saturating_sub(needle.len());
            if self.eof {
                let status = self.reap_status();
                return Err(MeasureError::Ended {
                    program: self.program.clone(),
                    needle: needle.into(),
                    status,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(MeasureError::Timeout {
                    program: self.program.clone(),
                    needle: needle.into(),
                    after: timeout,
                });
            }
            self.read_some(deadline - now)?;
        }
    }

    /// Keeps reading standard output for `period` (so that a chatty process
    /// does not block on a full pipe, and to collect what follows).
    pub fn drain_for(&mut self, period: Duration) -> Result<(), MeasureError> {
        let deadline = Instant::now() + period;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(());
            }
            if self.eof {
                std::thread::sleep(deadline - now);
                return Ok(());
            }
            self.read_some(deadline - now)?;
        }
    }

    /// Waits up to `wait` for output and appends what there is (at most
    /// one read): for a caller that timestamps what comes as it comes.
    pub fn read_once(&mut self, wait: Duration) -> Result<(), MeasureError> {
        self.read_some(wait)
    }

    /// Whether standard output has ended.
    pub fn at_eof(&self) -> bool {
        self.eof
    }

    /// Waits up to `wait` for output and appends what there is.
    fn read_some(&mut self, wait: Duration) -> Result<(), MeasureError> {
        // Round up so that a sub-millisecond wait does not spin.
        let ms = wait.as_millis().clamp(1, i32::MAX as u128) as u32;
        let timeout = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(self.stdout.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(nix::Error::EINTR) => return Ok(()),
            Err(source) => {
                return Err(MeasureError::Poll {
                    program: self.program.clone(),
                    source,
                });
            }
        }
        let mut buf = [0u8; 4096];
        // poll said readable (or hung up): this read does not block.
        match self.stdout.read(&mut buf) {
            Ok(0) => self.eof = true,
            Ok(n) => {
                if self.first_output.is_none() {
                    self.first_output = Some(self.start.elapsed());
                }
                self.output.extend_from_slice(&buf[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(MeasureError::Read {
                    program: self.program.clone(),
                    source,
                });
            }
        }
        Ok(())
    }

    /// The process's resident set size, in KiB.
    pub fn rss_kib(&self) -> Result<u64, MeasureError> {
        let path = format!("/proc/{}/status", self.pid());
        let status = read_proc(&path)?;
        parse_vm_rss(&status).ok_or(MeasureError::ProcField {
            path,
            field: "VmRSS",
        })
    }

    /// CPU time used so far by the process's live threads (from
    /// /proc/PID/task/*/schedstat, nanosecond resolution).
    pub fn cpu_time(&self) -> Result<Duration, MeasureError> {
        let dir = format!("/proc/{}/task", self.pid());
        let tasks = std::fs::read_dir(&dir).map_err(|source| MeasureError::Proc {
            path: dir.clone(),
            source,
        })?;
        let mut total = 0u64;
        for task in tasks.flatten() {
            let path = task.path().join("schedstat");
            // A thread may end between the listing and the read.
            if let Ok(s) = std::fs::read_to_string(&path) {
                total += parse_schedstat_ns(&s).unwrap_or(0);
            }
        }
        Ok(Duration::from_nanos(total))
    }

    /// Whether its standard output has closed (the process ended, or
    /// closed it).
    pub fn output_closed(&self) -> bool {
        self.eof
    }

    /// Its exit status, waiting up to `wait` for it to end; None if it has
    /// not ended by then (or its status cannot be read).
    pub fn exit_status(&mut self, wait: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + wait;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                _ => return None,
            }
        }
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(mut self) {
        self.kill_and_reap();
    }

    fn kill_and_reap(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// After end of output: the exit status, waiting briefly for it.
    fn reap_status(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_millis(200);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return describe_status(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                Ok(None) => return "closed its standard output".into(),
                Err(e) => return format!("cannot tell its status: {e}"),
            }
        }
    }
}

impl Drop for Measured {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

pub fn describe_status(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => status.to_string(),
    }
}

/// Where `needle` first occurs in `haystack` (0 for an empty needle).
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn read_proc(path: &str) -> Result<String, MeasureError> {
    std::fs::read_to_string(path).map_err(|source| MeasureError::Proc {
        path: path.into(),
        source,
    })
}

/// The `VmRSS:` value of a /proc/PID/status text, in KiB.
pub fn parse_vm_rss(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
}

/// The time on CPU (first field) of a /proc/PID/task/TID/schedstat text.
pub fn parse_schedstat_ns(schedstat: &str) -> Option<u64> {
    schedstat.split_whitespace().next()?.parse().ok()
}

/// The unsigned integer that follows the first `prefix` in `text`
/// (spaces between them allowed), e.g. a time a process logs.
pub fn number_after(text: &str, prefix: &str) -> Option<u64> {
    let rest = &text[text.find(prefix)? + prefix.len()..];
    let rest = rest.trim_start();
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// The median, minimum and maximum of some samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stats {
    /// None when there are no samples.
    pub fn of(samples: &[f64]) -> Option<Stats> {
        let mut v: Vec<f64> = samples.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(Stats {
            median: median_of_sorted(&v),
            min: v[0],
            max: v[v.len() - 1],
        })
    }

    /// For JSON output, rounded to `decimals` places (integers when 0).
    pub fn rounded(self, decimals: u32) -> StatsOut {
        let num = |x: f64| -> serde_json::Value {
            if decimals == 0 {
                (x.round() as i64).into()
            } else {
                round(x, decimals).into()
            }
        };
        StatsOut {
            median: num(self.median),
            min: num(self.min),
            max: num(self.max),
        }
    }
}

/// [`Stats`] as JSON: `{"median":..,"min":..,"max":..}`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StatsOut {
    pub median: serde_json::Value,
    pub min: serde_json::Value,
    pub max: serde_json::Value,
}

/// The median of sorted samples: the middle one, or the mean of the two
/// middle ones.
fn median_of_sorted(v: &[f64]) -> f64 {
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// `x` rounded to `decimals` places, for JSON output.
pub fn round(x: f64, decimals: u32) -> f64 {
    let f = 10f64.powi(decimals as i32);
    (x * f).round() / f
}

/// Milliseconds as a float.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A scratch directory, removed with its contents when dropped.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    pub fn new(prefix: &str) -> Result<Self, MeasureError> {
        let base = std::env::temp_dir();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let mut last = None;
        for attempt in 0..16u32 {
            let path = base.join(format!(
                "{prefix}-{}-{nanos:x}-{attempt}",
                std::process::id()
            ));
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(ScratchDir(path)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
                Err(source) => return Err(MeasureError::TempDir { dir: base, source }),
            }
        }
        Err(MeasureError::TempDir {
            dir: base,
            source: last.unwrap_or_else(|| std::io::Error::other("no free name")),
        })
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn median(samples: &[f64]) -> Option<f64> {
        Stats::of(samples).map(|s| s.median)
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        let s = Stats::of(&[9.0, 2.0, 7.0, f64::NAN, 4.0]).unwrap();
        assert_eq!(
            s,
            Stats {
                median: 5.5,
                min: 2.0,
                max: 9.0
            }
        );
    }

    #[test]
    fn parses_vm_rss() {
        let status =
            "Name:\tvmplant\nVmPeak:\t  140000 kB\nVmRSS:\t    3988 kB\nRssAnon:\t 1000 kB\n";
        assert_eq!(parse_vm_rss(status), Some(3988));
        assert_eq!(parse_vm_rss("Name:\tzombie\nState:\tZ\n"), None);
        assert_eq!(parse_vm_rss("VmRSS:\t12 MB\n"), None);
    }

    #[test]
    fn parses_schedstat_and_logged_numbers() {
        assert_eq!(parse_schedstat_ns("1234567 890 12\n"), Some(1234567));
        assert_eq!(parse_schedstat_ns(""), None);
        let fc = "[main] Guest-boot-time =  36190 us 36 ms,   4010 CPU us 4 CPU ms";
        assert_eq!(number_after(fc, "Guest-boot-time ="), Some(36190));
        let ours = "INFO devices::boot_timer: guest boot complete 4321 us after the VMM started";
        assert_eq!(number_after(ours, "guest boot complete"), Some(4321));
        assert_eq!(number_after(ours, "absent"), None);
    }

    #[test]
    fn rounds() {
        assert_eq!(round(5.12345, 3), 5.123);
        assert_eq!(round(2.5, 0), 3.0);
        let s = Stats::of(&[3948.0, 4029.0]).unwrap();
        assert_eq!(
            serde_json::to_string(&s.rounded(0)).unwrap(),
            r#"{"median":3989,"min":3948,"max":4029}"#
        );
        assert_eq!(
            serde_json::to_string(&Stats::of(&[1.23456]).unwrap().rounded(2)).unwrap(),
            r#"{"median":1.23,"min":1.23,"max":1.23}"#
        );
    }

    #[test]
    fn times_a_line_and_reads_rss() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo starting; sleep 0.05; echo READY; exec sleep 5"]);
        let mut m = Measured::spawn(&mut cmd).unwrap();
        let took = m.wait_for("READY", Duration::from_secs(5)).unwrap();
        assert!(took >= Duration::from_millis(40), "{took:?}");
        assert!(m.first_output().unwrap() < took);
        assert!(m.rss_kib().unwrap() > 0);
        m.kill();
    }

    #[test]
    fn reports_a_process_that_ends_early() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo nope; exit 3"]);
        let mut m = Measured::spawn(&mut cmd).unwrap();
        let err = m.wait_for("READY", Duration::from_secs(5)).unwrap_err();
        let err = crate::cli::chain(&err);
        assert!(err.contains("exit status 3"), "{err}");
    }
}
