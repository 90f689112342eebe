//! Signals and child processes: the bench's interruption flag, the
//! parent-death signal of every process it starts, and [`Guest`], a VM
//! process whose console goes to a file.

use super::{Result, SnapshotBenchError, io_err};
use crate::cli::bench::guests::strip_ansi;
use crate::cli::bench::measure::describe_status;
use nix::sys::signal::{SigSet, Signal};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Set by the signal thread; every wait of the bench looks at it.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// The signal that stopped the bench, for its exit status (128 + it).
static SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread (and the threads it
/// starts) and takes them in a thread of their own: the first asks the
/// bench to stop (it then ends its VMs), a second one exits at once (the
/// VMs die with it through their parent-death signal).
pub(super) fn watch_signals() -> Result<()> {
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    set.thread_block().map_err(SnapshotBenchError::Signals)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            while let Ok(sig) = set.wait() {
                let _ = SIGNAL.compare_exchange(0, sig as i32, Ordering::SeqCst, Ordering::SeqCst);
                if INTERRUPTED.swap(true, Ordering::SeqCst) {
                    eprintln!("vmplant: {sig} again: exiting now");
                    std::process::exit(128 + sig as i32);
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

/// Whether SIGINT, SIGTERM or SIGHUP asked the bench to stop.
pub(super) fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// The exit status after the signal that interrupted the bench: 128 + its
/// number (130 for Ctrl-C).
pub(super) fn interrupted_status() -> u8 {
    128u8.saturating_add(SIGNAL.load(Ordering::SeqCst).clamp(1, 127) as u8)
}

pub(super) fn check_interrupt() -> Result<()> {
    if interrupted() {
        Err(SnapshotBenchError::Interrupted)
    } else {
        Ok(())
    }
}

/// Makes the process `cmd` starts receive SIGKILL when the thread that
/// starts it (the bench's main thread) ends, however it ends.
pub(super) fn die_with_us(cmd: &mut Command) -> &mut Command {
    // The closure runs in the child between fork and exec; it makes
    // one prctl system call, which is async-signal-safe, allocates nothing
    // and touches no lock.
    // SAFETY: sound for the reasons just given.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        })
    }
}

/// A VM process whose console goes to a file. Killed and reaped when
/// dropped.
pub(super) struct Guest {
    pub(super) what: String,
    child: Child,
    pub(super) console: PathBuf,
    pub(super) log: PathBuf,
}

impl Guest {
    /// Starts `cmd` with standard input from /dev/null, standard output
    /// into `console`, standard error into `log`.
    pub(super) fn spawn(
        what: String,
        cmd: &mut Command,
        console: &Path,
        log: &Path,
    ) -> Result<Guest> {
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

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Why the process is gone, if it is.
    pub(super) fn ended(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(describe_status(status)),
            Ok(None) => None,
            Err(e) => Some(format!("cannot tell its status: {e}")),
        }
    }

    /// Waits for a console line containing `needle`; returns it. A guest
    /// error line, the process's end or `timeout` is an error quoting the
    /// last console and log lines.
    pub(super) fn wait_console(&mut self, needle: &str, timeout: Duration) -> Result<String> {
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

    pub(super) fn failed(&self, why: &str) -> SnapshotBenchError {
        SnapshotBenchError::Failed(format!("{}: {why}; {}", self.what, self.tail()))
    }

    /// The last console and log lines, for error messages.
    pub(super) fn tail(&self) -> String {
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
    pub(super) fn wait_exit(&mut self, wait: Duration) -> bool {
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
pub(super) fn end_all(guests: &mut Vec<Guest>) {
    for g in guests.iter_mut() {
        let _ = g.child.kill();
    }
    for g in guests.iter_mut() {
        let _ = g.child.wait();
    }
    guests.clear();
}

/// Whether a probe console line reports a failure.
pub(super) fn guest_error(line: &str) -> bool {
    line.contains(r#""probe":"error""#)
        || line.contains(r#""probe":"exception""#)
        || line.contains(r#""error":"#)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_guest_errors() {
        assert!(guest_error(r#"{"probe":"error","msg":"unknown step x"}"#));
        assert!(guest_error(
            r#"{"probe":"fill","mib":64,"error":"RAM ends"}"#
        ));
        assert!(guest_error(r#"{"probe":"exception","vcpu":0,"vector":13}"#));
        assert!(!guest_error(r#"{"probe":"tick","n":3}"#));
    }
}
