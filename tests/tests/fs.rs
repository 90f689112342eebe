//! A test guest on a virtio-fs share end to end: `vmplant gvfs serve`
//! exports a directory, `vmplant run --fs` gives the probe a virtio-fs
//! device served by a GVFS client of that server, and the probe's minimal
//! FUSE client lists, reads and writes files on it.
//!
//! What it checks:
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
//! Needs /dev/kvm. The server listens on a loopback port the kernel picks
//! (`--listen 127.0.0.1:0`; the port comes from its "serving on" line) and
//! is killed when the test ends, also on failure.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use vmplant_tests::{Finished, Vmm, vmplant};

const RUN: Duration = Duration::from_secs(60);
const BIG: usize = (1 << 20) + 123;
const WRITTEN: usize = 100_000;

/// A `vmplant gvfs serve` child, killed and reaped on drop, and its
/// scratch directory removed.
struct Server {
    child: Child,
    addr: String,
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Server {
    /// Serves `dir`/export with `dir`/token; returns once it listens.
    fn start(dir: &Path) -> Server {
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
        let mut server = Server {
            child,
            addr: String::new(),
            dir: dir.to_path_buf(),
        };
        // "gvfs: serving on 127.0.0.1:PORT"; read on a thread so a silent
        // server cannot hang the test, and keep draining stderr after.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("gvfs: serving on ") {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        });
        server.addr = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("gvfs serve did not say where it listens");
        server
    }
}

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

#[test]
fn guest_lists_reads_and_writes_files_over_virtio_fs() {
    let dir = std::env::temp_dir().join(format!("vmplant-fs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let export = dir.join("export");
    std::fs::create_dir_all(export.join("sub")).unwrap();
    let big = random_bytes(BIG, 0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id()));
    std::fs::write(export.join("big.bin"), &big).unwrap();
    std::fs::write(export.join("a.txt"), "hello from the host\n").unwrap();
    let server = Server::start(&dir);

    let share = format!(
        "data={},token-file={},plaintext",
        server.addr,
        dir.join("token").display()
    );
    let steps =
        format!("fs-ls:/+fs-read:/big.bin+fs-read:/missing+fs-write:/out.bin:{WRITTEN}+shutdown");
    let done = Vmm::probe(&steps, &["--fs", &share, "--mem", "64"]).wait(RUN);
    assert!(
        done.status.success(),
        "exit {:?}: {}\nconsole:\n{}",
        done.status,
        done.stderr,
        done.lines.join("\n")
    );

    let fs = event(&done, "fs");
    assert_eq!(fs["tag"], "data", "{fs}");

    let ls = event(&done, "fs-ls");
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
    assert_eq!(read["crc32"], crc_hex(&big).as_str(), "{read}");
    assert_eq!(
        (reads[1]["path"].as_str(), reads[1]["error"].as_str()),
        (Some("/missing"), Some("ENOENT")),
        "{}",
        reads[1]
    );

    let write = event(&done, "fs-write");
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
    drop(server);
}
