//! A test guest on a virtio-fs share end to end, served two ways:
//! - in-process: `vmplant gvfs serve` exports a directory and `vmplant
//!   run --fs` gives the probe a virtio-fs device served by a GVFS client
//!   of that server;
//! - over vhost-user: the reference virtiofsd (built from crates.io by
//!   scripts/setup) exports the directory and `vmplant run
//!   --vhost-user-fs` hands it the device's queues and the guest's memory.
//!
//! Either way the probe's minimal FUSE client lists, reads and writes
//! files on it, and the test checks:
//! - `fs-ls:/` lists exactly the export's entries (two files, a
//!   directory), without `.` and `..`;
//! - `fs-read:/big.bin` reads a 1 MiB + 123 byte file of random bytes (not
//!   a multiple of the 64 KiB chunk) with the right length and the CRC-32
//!   the test computes from the file;
//! - `fs-write:/out.bin:100000` creates a file that then holds, on the
//!   export, exactly the probe's pattern (byte i = i % 251), and the CRC-32
//!   the probe reports matches those bytes;
//! - a missing file is reported as `"error":"ENOENT"` and the next step
//!   still runs.
//!
//! A missing vhost-user backend, or one that hangs up or falls silent
//! during the handshake, is a one-line error, not a hang; one killed while the guest
//! runs costs the guest its file system (its requests time out) but not
//! the VM, which still shuts down cleanly.
//!
//! Needs /dev/kvm. The GVFS server listens on a loopback port the kernel picks
//! (`--listen 127.0.0.1:0`; the port comes from its "serving on" line) and
//! is killed when the test ends, also on failure.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use vmplant_tests::{Finished, GvfsServer, Process, Vmm, virtiofsd};

const RUN: Duration = Duration::from_secs(60);
const BIG: usize = (1 << 20) + 123;
const WRITTEN: usize = 100_000;

/// Deterministic pseudo-random bytes (xorshift64*).
fn random_bytes(n: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        out.extend_from_slice(&seed.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(n);
    out
}

/// The probe's line of kind `kind`.
fn event(done: &Finished, kind: &str) -> Value {
    done.events()
        .into_iter()
        .find(|v| v["probe"] == kind)
        .unwrap_or_else(|| panic!("no {kind} line; console:\n{}", done.lines.join("\n")))
}

fn crc_hex(data: &[u8]) -> String {
    format!("{:08x}", crc32fast::hash(data))
}

/// An export with two files and a directory; returns its directory and
/// the big file's bytes.
fn make_export(dir: &Path) -> (PathBuf, Vec<u8>) {
    let _ = std::fs::remove_dir_all(dir);
    let export = dir.join("export");
    std::fs::create_dir_all(export.join("sub")).unwrap();
    let big = random_bytes(BIG, 0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id()));
    std::fs::write(export.join("big.bin"), &big).unwrap();
    std::fs::write(export.join("a.txt"), "hello from the host\n").unwrap();
    (export, big)
}

const STEPS: &str = "fs-ls:/+fs-read:/big.bin+fs-read:/missing+fs-write:/out.bin:100000+shutdown";

/// What a user checks after the probe's run on `export`: the listing,
/// the big file's length and CRC, ENOENT, and the written file on the
/// export.
fn check_guest_io(done: &Finished, export: &Path, big: &[u8]) {
    done.assert_success();

    let fs = event(done, "fs");
    assert_eq!(fs["tag"], "data", "{fs}");

    let ls = event(done, "fs-ls");
    let mut names: Vec<&str> = ls["entries"]
        .as_array()
        .unwrap_or_else(|| panic!("{ls}"))
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["a.txt", "big.bin", "sub"], "{ls}");
    assert_eq!(ls["count"], 3, "{ls}");

    let reads: Vec<Value> = done
        .events()
        .into_iter()
        .filter(|v| v["probe"] == "fs-read")
        .collect();
    assert_eq!(reads.len(), 2, "{reads:?}");
    let read = &reads[0];
    assert_eq!(read["path"], "/big.bin", "{read}");
    assert_eq!(read["bytes"], BIG as u64, "{read}");
    assert_eq!(read["crc32"], crc_hex(big).as_str(), "{read}");
    assert_eq!(
        (reads[1]["path"].as_str(), reads[1]["error"].as_str()),
        (Some("/missing"), Some("ENOENT")),
        "{}",
        reads[1]
    );

    let write = event(done, "fs-write");
    let expected: Vec<u8> = (0..WRITTEN).map(|i| (i % 251) as u8).collect();
    assert!(write.get("error").is_none(), "{write}");
    assert_eq!(write["bytes"], WRITTEN as u64, "{write}");
    assert_eq!(write["crc32"], crc_hex(&expected).as_str(), "{write}");
    let on_export = std::fs::read(export.join("out.bin")).expect("/out.bin on the export");
    assert_eq!(on_export.len(), WRITTEN);
    assert!(
        on_export == expected,
        "/out.bin on the export is not the pattern"
    );
}

#[test]
fn guest_lists_reads_and_writes_files_over_virtio_fs() {
    let dir = std::env::temp_dir().join(format!("vmplant-fs-{}", std::process::id()));
    let (export, big) = make_export(&dir);
    let server = GvfsServer::start(&dir);
    let share = server.share("data");
    let done = Vmm::probe(STEPS, &["--fs", &share, "--mem", "64"]).wait(RUN);
    check_guest_io(&done, &export, &big);
    drop(server);
}

/// A virtiofsd child listening on `socket`.
struct Virtiofsd {
    process: Process,
    socket: PathBuf,
}

impl Virtiofsd {
    /// Starts virtiofsd on `export`; returns once its socket exists.
    /// `--sandbox none`: the test may run where no new namespaces can be
    /// made; seccomp stays on.
    fn start(dir: &Path, export: &Path) -> Virtiofsd {
        let socket = dir.join("virtiofsd.sock");
        let child = Command::new(virtiofsd())
            .arg("--shared-dir")
            .arg(export)
            .arg("--socket-path")
            .arg(&socket)
            .args(["--sandbox", "none", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot start virtiofsd");
        let mut d = Virtiofsd {
            process: Process {
                child,
                dir: dir.to_path_buf(),
            },
            socket,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !d.socket.exists() {
            if let Ok(Some(status)) = d.process.child.try_wait() {
                panic!("virtiofsd exited before listening: {status}");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "virtiofsd did not create {:?}",
                d.socket
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }
}

#[test]
fn guest_lists_reads_and_writes_files_through_virtiofsd_over_vhost_user() {
    let dir = std::env::temp_dir().join(format!("vmplant-vhost-fs-{}", std::process::id()));
    let (export, big) = make_export(&dir);
    let backend = Virtiofsd::start(&dir, &export);
    let share = format!("data={}", backend.socket.display());
    let done = Vmm::probe(STEPS, &["--vhost-user-fs", &share, "--mem", "64"]).wait(RUN);
    check_guest_io(&done, &export, &big);
    // One guest, one session: virtiofsd ends when its frontend goes.
    drop(backend);
}

#[test]
fn the_guest_survives_its_vhost_user_backend() {
    let dir = std::env::temp_dir().join(format!("vmplant-vhost-gone-{}", std::process::id()));
    let (export, _) = make_export(&dir);
    let mut backend = Virtiofsd::start(&dir, &export);
    let share = format!("data={}", backend.socket.display());
    // Read, then count for about 3 s while the test kills virtiofsd, then
    // read again: the second read must fail inside the guest (the probe
    // gives a request 5 s), and the VM must go on to shut down cleanly.
    let mut vmm = Vmm::probe(
        "fs-read:/a.txt+count:10000000000+fs-read:/a.txt+shutdown",
        &["--vhost-user-fs", &share, "--mem", "64"],
    );
    let first = vmm.expect_line("the first read", RUN, |l| l.contains("\"fs-read\""));
    assert!(first.contains("\"bytes\":20"), "{first}");
    backend.process.child.kill().unwrap();
    backend.process.child.wait().unwrap();
    let done = vmm.wait(RUN);
    done.assert_success();
    let reads: Vec<Value> = done
        .events()
        .into_iter()
        .filter(|v| v["probe"] == "fs-read")
        .collect();
    assert_eq!(reads.len(), 2, "{reads:?}");
    assert!(reads[1].get("error").is_some(), "{}", reads[1]);
    assert!(
        done.stderr.contains("closed its connection"),
        "{}",
        done.stderr
    );
    assert!(done.lines.iter().any(|l| l.contains("\"shutdown\"")));
}

/// Boots the probe with a vhost-user-fs share on `socket` and checks that
/// vmplant refuses it: exit status 1 and a one-line error that names the
/// socket and says `what`.
fn refused_backend(socket: &Path, what: &str) {
    let done = Vmm::probe(
        "ready+shutdown",
        &["--vhost-user-fs", &format!("data={}", socket.display())],
    )
    .wait(RUN);
    assert_eq!(done.status.code(), Some(1), "{}", done.stderr);
    let name = socket.file_name().unwrap().to_str().unwrap();
    assert!(
        done.stderr.contains("vhost-user backend at")
            && done.stderr.contains(name)
            && done.stderr.contains(what),
        "{}",
        done.stderr
    );
}

#[test]
fn a_vhost_user_socket_nobody_serves_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("vmplant-vhost-none-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Nothing there at all.
    refused_backend(&dir.join("missing.sock"), "cannot connect");

    // A listener that accepts and hangs up at once, like a crashed backend.
    let sock = dir.join("hangup.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let hangup = std::thread::spawn(move || {
        if let Ok((s, _)) = listener.accept() {
            drop(s);
        }
    });
    refused_backend(&sock, "failed");
    hangup.join().unwrap();

    // A listener that accepts and then never answers: vmplant gives up
    // after its 5 s reply timeout instead of hanging.
    let sock = dir.join("silent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let silent = std::thread::spawn(move || {
        if let Ok((_s, _)) = listener.accept() {
            let _ = rx.recv_timeout(RUN);
        }
    });
    refused_backend(&sock, "failed");
    let _ = tx.send(());
    silent.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
