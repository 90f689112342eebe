//! `vmplant gvfs serve` and `vmplant gvfs mount` as a user runs them: the
//! mount shows the export's files; Ctrl-C (SIGINT) or SIGTERM unmounts it
//! cleanly (the process exits 130 or 143, as `run` does, and the mount
//! point is no longer mounted); `fusermount3 -u` from outside is a normal
//! end (exit 0). Needs root for FUSE; no KVM.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use vmplant_tests::vmplant;

const WAIT: Duration = Duration::from_secs(20);

/// A child killed and reaped on drop.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `vmplant gvfs ARGS` and waits for a standard-error line that
/// starts with `ready`; returns the child, that line, and the lines after.
fn start(args: &[&str], ready: &str) -> (Reaped, String, mpsc::Receiver<String>) {
    let mut child = Command::new(vmplant())
        .arg("gvfs")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start vmplant gvfs");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.starts_with(ready) => return (Reaped(child), line, rx),
            Ok(_) => {}
            Err(_) => panic!("vmplant gvfs {args:?} did not say {ready:?}"),
        }
    }
}

fn is_mounted(at: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let at = at.to_str().unwrap();
    mounts.lines().any(|l| l.split(' ').nth(1) == Some(at))
}

/// How the mount is ended.
#[derive(Clone, Copy, Debug)]
enum Stop {
    Signal(i32),
    Fusermount,
}

fn mount_and_stop_with(stop: Stop) {
    let signal = match stop {
        Stop::Signal(s) => s,
        Stop::Fusermount => 0,
    };
    let dir =
        std::env::temp_dir().join(format!("vmplant-gvfs-cli-{}-{signal}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let export = dir.join("export");
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&export).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::write(export.join("hello.txt"), "hello over gvfs\n").unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "cli-test-token\n").unwrap();
    let path = |p: &PathBuf| p.to_str().unwrap().to_string();

    let (_server, line, _) = start(
        &[
            "serve",
            "--plaintext",
            "--listen",
            "127.0.0.1:0",
            "--export",
            &path(&export),
            "--token-file",
            &path(&token),
        ],
        "gvfs: serving on ",
    );
    let addr = line
        .trim_start_matches("gvfs: serving on ")
        .trim()
        .to_string();
    let (mut mount, _, later) = start(
        &[
            "mount",
            "--server",
            &addr,
            "--token-file",
            &path(&token),
            "--plaintext",
            &path(&mnt),
        ],
        &format!("gvfs: {addr} mounted on"),
    );
    assert!(is_mounted(&mnt), "{mnt:?} is not mounted");
    assert_eq!(
        std::fs::read_to_string(mnt.join("hello.txt")).unwrap(),
        "hello over gvfs\n"
    );

    match stop {
        Stop::Signal(signal) => {
            // SAFETY: kill(2) on our own child's pid has no memory effects.
            let r = unsafe { libc::kill(mount.0.id() as i32, signal) };
            assert_eq!(r, 0);
        }
        Stop::Fusermount => {
            let out = Command::new("fusermount3")
                .arg("-u")
                .arg(&mnt)
                .output()
                .unwrap();
            assert!(out.status.success(), "fusermount3 -u: {out:?}");
        }
    }
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = mount.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the mount did not end on signal {signal}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // Standard error ends with the process; no error on the way out.
    let said: Vec<String> = later.iter().collect();
    match stop {
        Stop::Signal(signal) => {
            assert_eq!(status.code(), Some(128 + signal), "{stop:?}: {said:?}")
        }
        Stop::Fusermount => assert_eq!(status.code(), Some(0), "{stop:?}: {said:?}"),
    }
    assert!(
        !said
            .iter()
            .any(|l| l.starts_with("vmplant: ") || l.contains("Invalid argument")),
        "{stop:?}: {said:?}"
    );
    assert!(
        !is_mounted(&mnt),
        "{mnt:?} is still mounted after signal {signal}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ctrl_c_unmounts_cleanly() {
    mount_and_stop_with(Stop::Signal(libc::SIGINT));
}

#[test]
fn sigterm_unmounts_cleanly() {
    mount_and_stop_with(Stop::Signal(libc::SIGTERM));
}

#[test]
fn fusermount_from_outside_is_a_normal_end() {
    mount_and_stop_with(Stop::Fusermount);
}

/// A cache size whose byte count does not fit in 64 bits is refused, not
/// wrapped round to a small one.
#[test]
fn cache_sizes_too_large_are_refused() {
    for flag in ["--mem-cache-mib", "--cache-size-mib", "--whole-copy-mib"] {
        let out = Command::new(vmplant())
            .args(["gvfs", "mount", "--server", "127.0.0.1:1", "--plaintext"])
            .args(["--token-file", "/dev/null"])
            .args([flag, "17592186044544", "/nonexistent"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flag}: {stderr}");
        assert!(
            stderr.contains("17592186044544 MiB is too large"),
            "{flag}: {stderr}"
        );
    }
}

/// A mount logs the loss of its server and its reconnect, naming its
/// mount point.
#[test]
fn a_mount_logs_its_disconnects_and_reconnects() {
    let dir = std::env::temp_dir().join(format!("vmplant-gvfs-cli-{}-rec", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (export, mnt, token) = (dir.join("export"), dir.join("mnt"), dir.join("token"));
    std::fs::create_dir_all(&export).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::write(export.join("a.txt"), "a").unwrap();
    std::fs::write(&token, "cli-test-token\n").unwrap();
    let path = |p: &PathBuf| p.to_str().unwrap().to_string();
    let serve = |listen: &str| {
        start(
            &[
                "serve",
                "--plaintext",
                "--listen",
                listen,
                "--export",
                &path(&export),
                "--token-file",
                &path(&token),
            ],
            "gvfs: serving on ",
        )
    };
    let (server, line, _) = serve("127.0.0.1:0");
    let addr = line
        .trim_start_matches("gvfs: serving on ")
        .trim()
        .to_string();
    let (mut mount, _, later) = start(
        &[
            "mount",
            "--server",
            &addr,
            "--token-file",
            &path(&token),
            "--plaintext",
            "--attr-timeout",
            "0",
            &path(&mnt),
        ],
        &format!("gvfs: {addr} mounted on"),
    );
    let expect = |what: &str| {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match later.recv_timeout(left) {
                Ok(l) if l.contains(what) => return l,
                Ok(_) => {}
                Err(_) => panic!("the mount never logged {what:?}"),
            }
        }
    };
    drop(server);
    let lost = expect("disconnected from the server");
    assert!(lost.contains(&format!("share={}", mnt.display())), "{lost}");
    let (_again, _, _) = serve(&addr);
    // The next call connects again.
    assert_eq!(std::fs::read_to_string(mnt.join("a.txt")).unwrap(), "a");
    let back = expect("reconnected");
    assert!(back.contains(&format!("share={}", mnt.display())), "{back}");
    // SAFETY: kill(2) on our own child's pid has no memory effects.
    unsafe { libc::kill(mount.0.id() as i32, libc::SIGTERM) };
    let status = mount.0.wait().unwrap();
    assert_eq!(status.code(), Some(143));
    assert!(!is_mounted(&mnt));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A mount still in use when it is told to stop is detached (it goes when
/// its last user lets go), and the process ends as for any signal.
#[test]
fn a_busy_mount_is_detached_on_sigterm() {
    let dir = std::env::temp_dir().join(format!("vmplant-gvfs-cli-{}-busy", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (export, mnt, token) = (dir.join("export"), dir.join("mnt"), dir.join("token"));
    std::fs::create_dir_all(&export).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::write(export.join("a.txt"), "a").unwrap();
    std::fs::write(&token, "cli-test-token\n").unwrap();
    let path = |p: &PathBuf| p.to_str().unwrap().to_string();
    let (_server, line, _) = start(
        &[
            "serve",
            "--plaintext",
            "--listen",
            "127.0.0.1:0",
            "--export",
            &path(&export),
            "--token-file",
            &path(&token),
        ],
        "gvfs: serving on ",
    );
    let addr = line
        .trim_start_matches("gvfs: serving on ")
        .trim()
        .to_string();
    let (mut mount, _, later) = start(
        &[
            "mount",
            "--server",
            &addr,
            "--token-file",
            &path(&token),
            "--plaintext",
            &path(&mnt),
        ],
        &format!("gvfs: {addr} mounted on"),
    );
    let held = std::fs::File::open(mnt.join("a.txt")).unwrap();
    // SAFETY: kill(2) on our own child's pid has no memory effects.
    unsafe { libc::kill(mount.0.id() as i32, libc::SIGTERM) };
    let status = mount.0.wait().unwrap();
    let said: Vec<String> = later.iter().collect();
    assert_eq!(status.code(), Some(143), "{said:?}");
    assert!(said.iter().any(|l| l.contains("detached")), "{said:?}");
    assert!(!is_mounted(&mnt), "{said:?}");
    drop(held);
    let _ = std::fs::remove_dir_all(&dir);
}
