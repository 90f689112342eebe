//! VMM processes: starting one detached from the agent, telling whether
//! a recorded one is still the same live process, finding one by its
//! control socket, and ending one.
//!
//! The process model: each VM runs in a `vmplant run` process that the
//! agent starts with `setsid` in a session of its own, its standard input
//! from /dev/null and its standard output and error appended to
//! `vms/ID/vmm.log`, so no terminal hangup, no signal to the agent's
//! process group and no closed pipe reaches it. The agent stays its
//! parent (no double fork) so that it can reap it and learn its exit
//! status; when the agent dies the VMM is reparented to init (or the
//! nearest subreaper, such as systemd), which reaps it from then on, and
//! the restarted agent watches it by pid and start time, which tells a
//! reused pid apart. A SIGKILL to the agent therefore reaches no VM; the
//! systemd unit says `KillMode=process` so that stopping the service
//! does not either.

use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot create the VM's directory {path:?}")]
    Dir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the VMM process")]
    Spawn(#[source] std::io::Error),
    #[error("the VMM process ended at start: {0}")]
    EndedAtStart(String),
    #[error("the VMM's control socket did not answer within {0:?}")]
    NotReady(Duration),
}

/// A VMM process as recorded: its pid and its start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pid {
    pub pid: u32,
    pub start: u64,
}

/// The start time (clock ticks since boot) and state letter of `pid`.
fn stat(pid: u32) -> Option<(u64, char)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // Field 3 was the state; the start time is field 22.
    let start = fields.nth(18)?.parse().ok()?;
    Some((start, state))
}

impl Pid {
    /// The live process `pid`, with its start time.
    pub fn of(pid: u32) -> Option<Pid> {
        let (start, state) = stat(pid)?;
        (state != 'Z' && state != 'X').then_some(Pid { pid, start })
    }

    /// Whether this very process still runs (not a zombie, not another
    /// process that got its pid).
    pub fn alive(&self) -> bool {
        Pid::of(self.pid).is_some_and(|p| p.start == self.start)
    }

    pub fn kill(&self) {
        if self.alive() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// Waits up to `timeout` for the process to end.
    pub async fn wait_gone(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.alive() {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }
}

/// The live `vmplant run` whose command line has `--control PATH`.
pub fn find_by_control(control: &Path) -> Option<Pid> {
    let want = control.as_os_str().as_encoded_bytes();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let mut args = cmdline.split(|b| *b == 0);
        if args.any(|a| a == b"--control")
            && args.next() == Some(want)
            && let Some(p) = Pid::of(pid)
        {
            return Some(p);
        }
    }
    None
}

/// Starts `exe ARGS` detached (see the module's doc), its output appended
/// to `log`. The caller waits for the child (to reap it).
pub fn spawn(
    exe: &Path,
    args: &[std::ffi::OsString],
    log: &Path,
) -> Result<(tokio::process::Child, Pid), ProcessError> {
    let dir = log.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(|source| ProcessError::Dir {
        path: dir.to_owned(),
        source,
    })?;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(ProcessError::Spawn)?;
    let err = out.try_clone().map_err(ProcessError::Spawn)?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args(args)
        // Its relative paths (none today) land in its own directory, and
        // it keeps no other directory busy.
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(false)
        // The VMM logs without colours to its file.
        .env("NO_COLOR", "1");
    // The closure runs in the child between fork and exec and
    // only calls setsid(2), which is async-signal-safe and touches no
    // memory of the parent.
    // SAFETY: sound for the reasons just given.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(ProcessError::Spawn)?;
    let pid = child.id().ok_or_else(|| {
        ProcessError::EndedAtStart("the process was reaped before it was recorded".into())
    })?;
    // The start time is there as soon as the process is.
    let start = stat(pid).map_or(0, |(s, _)| s);
    Ok((child, Pid { pid, start }))
}

/// The last lines of a VMM's log, for an error message.
pub fn log_tail(log: &Path) -> String {
    let text = std::fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(&text[text.len().saturating_sub(2048)..]).into_owned();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join(" / ")
}

/// How a VMM process ended, as text.
pub fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (_, Some(s)) => format!("killed by signal {s}"),
        _ => "ended".into(),
    }
}

/// Keeps a console log's disk use bounded: everything but its last
/// `keep` bytes (rounded to pages) is punched out once the file holds
/// more than twice that. The file keeps its size (the VMM writes on at
/// its offset); readers read only the tail.
pub fn trim_console(path: &Path, keep: u64) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    if meta.blocks() * 512 <= 2 * keep {
        return;
    }
    let end = meta.len().saturating_sub(keep) & !4095;
    if end == 0 {
        return;
    }
    let Ok(file) = std::fs::OpenOptions::new().write(true).open(path) else {
        return;
    };
    use nix::fcntl::{FallocateFlags, fallocate};
    if let Err(e) = fallocate(
        &file,
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        0,
        end as i64,
    ) {
        tracing::warn!("cannot trim the console log {path:?}: {e}");
    }
}

/// The last `max` bytes of a console log (holes left by trimming
/// skipped).
pub fn read_tail(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut buf = Vec::new();
    file.take(max).read_to_end(&mut buf)?;
    let first = buf.iter().position(|b| *b != 0).unwrap_or(buf.len());
    buf.drain(..first);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_changed_start_is_not() {
        let me = Pid::of(std::process::id()).unwrap();
        assert!(me.alive());
        assert!(
            !Pid {
                start: me.start + 1,
                ..me
            }
            .alive()
        );
    }

    #[test]
    fn console_logs_are_trimmed_to_their_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut data = vec![b'a'; 3 << 20];
        data.extend_from_slice(b"last line\n");
        std::fs::write(&path, &data).unwrap();
        trim_console(&path, 1 << 20);
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), data.len() as u64);
        assert!(meta.blocks() * 512 <= (1 << 20) + 8192, "{}", meta.blocks());
        let tail = read_tail(&path, 1 << 20).unwrap();
        assert!(tail.ends_with(b"last line\n"));
        assert_eq!(tail.len(), 1 << 20);
    }
}
