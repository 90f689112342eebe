//! Helpers for the end-to-end tests: find the `vmplant` binary and the
//! test guest, start a VM as a child process, read its serial console
//! line by line with time limits, and start a GVFS server for file
//! shares.
//!
//! The binary is built by the test command (`cargo build -p agent` in
//! `scripts/test`), the guest by `tests/probe/build.sh`.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// The workspace root.
pub mod blk;
pub mod migration;

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

/// The `vmplant` binary under test: `$VMPLANT_BIN`, else the debug build.
pub fn vmplant() -> PathBuf {
    let path = std::env::var_os("VMPLANT_BIN")
        .map_or_else(|| target_dir().join("debug/vmplant"), PathBuf::from);
    assert!(
        path.is_file(),
        "{path:?} is missing: build it first (cargo build -p agent), or run scripts/test"
    );
    path
}

/// The test guest, built by tests/probe/build.sh.
pub fn probe_elf() -> PathBuf {
    let path = root().join("target/probe/probe.elf");
    assert!(
        path.is_file(),
        "{path:?} is missing: run tests/probe/build.sh"
    );
    path
}

/// The reference virtio-fs backend, built from crates.io by
/// `scripts/setup` (`cargo install virtiofsd --root target/tools`):
/// `$VIRTIOFSD`, else that build.
pub fn virtiofsd() -> PathBuf {
    let path = std::env::var_os("VIRTIOFSD")
        .map_or_else(|| root().join("target/tools/bin/virtiofsd"), PathBuf::from);
    assert!(
        path.is_file(),
        "{path:?} is missing: run scripts/setup (it builds virtiofsd), or set VIRTIOFSD"
    );
    path
}

/// A running `vmplant` child with its console read on a thread.
pub struct Vmm {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

/// How a VMM process ended and what it said.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    /// Every console line, in order.
    pub lines: Vec<String>,
    pub stderr: String,
}

impl Finished {
    /// Asserts that the VMM exited 0; on failure shows its status, its
    /// standard error and the console.
    #[track_caller]
    pub fn assert_success(&self) {
        assert!(
            self.status.success(),
            "exit {:?}: {}\nconsole:\n{}",
            self.status,
            self.stderr,
            self.lines.join("\n")
        );
    }

    /// The JSON lines the probe printed.
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.lines
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v.get("probe").is_some())
            .collect()
    }

    /// The JSON lines the probe in VM `vm` printed, when several VMs share
    /// the output (`vmplant run --config`, lines behind `NAME: `), each
    /// with its line number in the whole console (for the order of events
    /// across VMs).
    pub fn vm_events(&self, vm: &str) -> Vec<(usize, serde_json::Value)> {
        let prefix = format!("{vm}: ");
        self.lines
            .iter()
            .enumerate()
            .filter_map(|(i, l)| Some((i, l.strip_prefix(&prefix)?)))
            .filter_map(|(i, l)| Some((i, serde_json::from_str::<serde_json::Value>(l).ok()?)))
            .filter(|(_, v)| v.get("probe").is_some())
            .collect()
    }

    /// The first line of kind `kind` that VM `vm` printed, with its line
    /// number; panics with the console if there is none.
    #[track_caller]
    pub fn vm_event(&self, vm: &str, kind: &str) -> (usize, serde_json::Value) {
        self.vm_events(vm)
            .into_iter()
            .find(|(_, v)| v["probe"] == kind)
            .unwrap_or_else(|| {
                panic!(
                    "no {kind} line from VM {vm}; console:\n{}\nstderr:\n{}",
                    self.console(),
                    self.stderr
                )
            })
    }

    /// The console for a failure message, long lines shortened.
    pub fn console(&self) -> String {
        shown(&self.lines)
    }
}

/// Console lines for a failure message: lines longer than 300 characters
/// shortened (a guest may write 64 KiB without a newline).
fn shown(lines: &[String]) -> String {
    lines
        .iter()
        .map(|l| match l.char_indices().nth(300) {
            Some((at, _)) => format!("{}... ({} bytes)", &l[..at], l.len()),
            None => l.clone(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

impl Vmm {
    /// Starts `vmplant ARGS...` with standard input closed.
    pub fn start<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Vmm {
        let mut child = Command::new(vmplant())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start vmplant");
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut err = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Vmm {
            child,
            lines,
            seen: Vec::new(),
            stderr: Some(stderr),
        }
    }

    /// Boots the probe with `probe=STEPS` and extra `vmplant run` flags.
    pub fn probe(steps: &str, extra: &[&str]) -> Vmm {
        let probe = probe_elf();
        let mut args: Vec<String> = vec![
            "run".into(),
            "--kernel".into(),
            probe.display().to_string(),
            "--cmdline".into(),
            format!("console=ttyS0 probe={steps}"),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Vmm::start(&args)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a console line that satisfies `pred`, and returns it.
    pub fn expect_line(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    panic!(
                        "no {what} within {timeout:?}; console so far:\n{}",
                        self.seen.join("\n")
                    );
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let _ = self.child.wait();
                    panic!(
                        "the VMM ended before {what}; console:\n{}\nstderr:\n{}",
                        self.seen.join("\n"),
                        self.take_stderr()
                    );
                }
            }
        }
    }

    /// The console lines that arrive within `period`.
    pub fn lines_for(&mut self, period: Duration) -> Vec<String> {
        let deadline = Instant::now() + period;
        let mut got = Vec::new();
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push(line.clone());
            got.push(line);
        }
        got
    }

    /// Sends a signal to the VMM process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        let r = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(r, 0, "cannot signal the VMM");
    }

    /// Waits for the process to end by itself (killing it after `timeout`).
    pub fn wait(mut self, timeout: Duration) -> Finished {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait failed") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
                    self.seen.push(line);
                }
                let stderr: Vec<String> = self.take_stderr().lines().map(String::from).collect();
                let stderr = if stderr.len() > 80 {
                    format!(
                        "{}\n... ({} lines in all) ...\n{}",
                        stderr[..40].join("\n"),
                        stderr.len(),
                        stderr[stderr.len() - 40..].join("\n")
                    )
                } else {
                    stderr.join("\n")
                };
                panic!(
                    "the VMM did not exit within {timeout:?}; console:\n{}\nstderr:\n{stderr}",
                    shown(&self.seen),
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        // The reader thread ends at end of file.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.seen.push(line);
        }
        Finished {
            status,
            lines: std::mem::take(&mut self.seen),
            stderr: self.take_stderr(),
        }
    }

    fn take_stderr(&mut self) -> String {
        self.stderr
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }

    /// Kills the process and collects what it said.
    pub fn kill(mut self) -> Finished {
        let _ = self.child.kill();
        self.wait(Duration::from_secs(10))
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A helper process (a file server, say), killed and reaped on drop, and
/// its test's scratch directory removed.
pub struct Process {
    pub child: Child,
    pub dir: PathBuf,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `vmplant gvfs serve` child on a loopback port the kernel picks,
/// exporting `DIR/export` with the token in `DIR/token` (plaintext).
pub struct GvfsServer {
    pub process: Process,
    /// Where it listens, `127.0.0.1:PORT`.
    pub addr: String,
}

impl GvfsServer {
    /// Serves `dir`/export (which must exist) with a token it writes to
    /// `dir`/token; returns once the server listens. `dir` is removed
    /// when the server is dropped.
    pub fn start(dir: &Path) -> GvfsServer {
        let token = dir.join("token");
        std::fs::write(&token, "fs-test-token\n").unwrap();
        let mut child = Command::new(vmplant())
            .args(["gvfs", "serve", "--plaintext", "--listen", "127.0.0.1:0"])
            .arg("--export")
            .arg(dir.join("export"))
            .arg("--token-file")
            .arg(&token)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start vmplant gvfs serve");
        let stderr = child.stderr.take().unwrap();
        let process = Process {
            child,
            dir: dir.to_path_buf(),
        };
        // "gvfs: serving on 127.0.0.1:PORT"; read on a thread so a silent
        // server cannot hang the test, and keep draining stderr after.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("gvfs: serving on ") {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("gvfs serve did not say where it listens");
        GvfsServer { process, addr }
    }

    /// A share of this server for `vmplant run --fs` (or a `--config`
    /// VM's `shares`): `TAG=ADDR,token-file=DIR/token,plaintext`.
    pub fn share(&self, tag: &str) -> String {
        format!(
            "{tag}={},token-file={},plaintext",
            self.addr,
            self.process.dir.join("token").display()
        )
    }
}

/// The ticks a restored guest printed, going on from the last tick
/// before the snapshot: `before` are the console lines before it. The
/// pause may cut a line (each serial byte is an exit of its own): its
/// start is then the last line before, its rest the first line after.
pub fn ticks_after(before: &[String], after: &[String]) -> (u64, Vec<u64>) {
    let last = before.iter().filter_map(|l| tick_n(l)).max().unwrap_or(0);
    let cut = before
        .last()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).is_err());
    let mut lines = after.to_vec();
    if let (Some(cut), Some(first)) = (cut, lines.first_mut()) {
        *first = format!("{cut}{first}");
    }
    (last, lines.iter().filter_map(|l| tick_n(l)).collect())
}

/// The n of a `{"probe":"tick","n":N}` line.
pub fn tick_n(line: &str) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    (v["probe"] == "tick").then(|| v["n"].as_u64())?
}

/// Checks that a guest saved or moved while it ticked went on where it
/// was in `after` (a restore's or a migration's destination): its ticks
/// from the one after the last in `before` up to `until`, its `verify`
/// ok, and no new boot (no `ready` line).
#[track_caller]
pub fn assert_went_on(before: &[String], after: &Finished, until: u64, what: &str) {
    let (last, ticks) = ticks_after(before, &after.lines);
    assert_eq!(
        ticks,
        (last + 1..=until).collect::<Vec<_>>(),
        "{what}: ticks go on from {last}"
    );
    let verify = after
        .events()
        .into_iter()
        .find(|v| v["probe"] == "verify")
        .unwrap_or_else(|| panic!("{what}: no verify line: {:?}", after.lines));
    assert_eq!(verify["ok"], true, "{what}: {verify}");
    assert!(
        !after.lines.iter().any(|l| l.contains(r#""probe":"ready""#)),
        "{what}: the guest booted again: {:?}",
        after.lines
    );
}
