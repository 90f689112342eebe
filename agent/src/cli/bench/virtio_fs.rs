//! `vmplant bench virtio-fs`: the test guest reads a file twice and writes
//! one through virtio-fs served (1) in the VMM process by a GVFS client of
//! a GVFS server on loopback, and (2) by virtiofsd, the reference backend,
//! over vhost-user; side by side in one run, on the same export.
//!
//! The guest (tests/probe) has no page cache: every read is a FUSE READ of
//! 64 KiB that reaches the device. GVFS's first read fills its client
//! block cache from the server, the second is served from that cache;
//! virtiofsd reads the host page cache both times (the file was just
//! written). Every read's CRC-32 is checked against the file's, and the
//! written file against the probe's pattern.
//!
//! Prints one JSON line per backend and measurement, then a summary line
//! with GVFS's ratios to virtiofsd.

use super::guests::{self, GuestLine, GuestsError};
use super::measure::{MeasureError, ScratchDir, round};
use crate::cli::CliResult;
use clap::Args;
use serde_json::{Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Args)]
pub struct VirtioFsBenchArgs {
    /// Size of the file the guest reads, in MiB.
    #[arg(long, default_value_t = 256, value_parser = crate::cli::mib)]
    pub file_mib: u64,
    /// Size of the file the guest writes, in MiB.
    #[arg(long, default_value_t = 64, value_parser = crate::cli::mib)]
    pub write_mib: u64,
    /// The test guest [default: target/probe/probe.elf in the repository].
    #[arg(long)]
    pub probe: Option<PathBuf>,
    /// virtiofsd [default: target/tools/bin/virtiofsd in the repository,
    /// built by scripts/setup].
    #[arg(long)]
    pub virtiofsd: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum VirtioFsBenchError {
    #[error(transparent)]
    Guests(#[from] GuestsError),
    #[error(transparent)]
    Measure(#[from] MeasureError),
    #[error("cannot {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the GVFS server cannot start: {0}")]
    Server(String),
    #[error("no virtiofsd at {0}: run scripts/setup, or pass --virtiofsd")]
    NoVirtiofsd(PathBuf),
    #[error("virtiofsd {0}")]
    Virtiofsd(String),
    #[error("{backend}: the guest printed no {kind} line number {n}")]
    NoLine {
        backend: &'static str,
        kind: &'static str,
        n: usize,
    },
    #[error("{backend}: {detail}")]
    Corrupt {
        backend: &'static str,
        detail: String,
    },
    #[error("the file sizes must be at least 1 MiB")]
    TooSmall,
}

type Result<T> = std::result::Result<T, VirtioFsBenchError>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VirtioFsBenchError {
    let what = what.into();
    move |source| VirtioFsBenchError::Io { what, source }
}

/// One backend's figures, in Mbit/s.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Figures {
    read_first: f64,
    read_second: f64,
    write: f64,
}

pub fn run(args: VirtioFsBenchArgs) -> CliResult {
    if args.file_mib == 0 || args.write_mib == 0 {
        return Err(VirtioFsBenchError::TooSmall.into());
    }
    let probe = guests::probe_path(args.probe.as_deref())?;
    let virtiofsd = match args.virtiofsd {
        Some(p) => p,
        None => super::boot::repo_root()
            .ok_or(GuestsError::NoRepo)?
            .join("target/tools/bin/virtiofsd"),
    };
    if !virtiofsd.is_file() {
        return Err(VirtioFsBenchError::NoVirtiofsd(virtiofsd).into());
    }
    let scratch = ScratchDir::new("vmplant-bench-virtio-fs")?;
    let export = scratch.path().join("export");
    std::fs::create_dir_all(&export).map_err(io("create the export"))?;
    let file_bytes = args.file_mib << 20;
    let file_crc = write_random_file(&export.join("big.bin"), file_bytes)?;
    let write_bytes = args.write_mib << 20;
    let bench = Bench {
        probe: &probe,
        dir: scratch.path(),
        export: &export,
        file_bytes,
        file_crc,
        write_bytes,
    };

    let gvfs = bench.gvfs()?;
    let vfsd = bench.virtiofsd(&virtiofsd)?;
    let ratio = |a: f64, b: f64| if b > 0.0 { round(a / b, 2) } else { 0.0 };
    println!(
        "{}",
        json!({
            "summary": true, "bench": "virtio-fs", "file_mib": args.file_mib,
            "gvfs_vs_virtiofsd": {
                "read_first": ratio(gvfs.read_first, vfsd.read_first),
                "read_second": ratio(gvfs.read_second, vfsd.read_second),
                "write": ratio(gvfs.write, vfsd.write),
            },
        })
    );
    Ok(ExitCode::SUCCESS)
}

struct Bench<'a> {
    probe: &'a Path,
    dir: &'a Path,
    export: &'a Path,
    file_bytes: u64,
    file_crc: u32,
    write_bytes: u64,
}

impl Bench<'_> {
    /// The guest's steps: read the file twice, write one.
    fn cmdline(&self, out: &str) -> String {
        format!(
            "console=ttyS0 probe=fs-read:/big.bin+fs-read:/big.bin+fs-write:/{out}:{}+shutdown",
            self.write_bytes
        )
    }

    fn gvfs(&self) -> Result<Figures> {
        let server = gvfs::server::Server::bind(
            gvfs::server::ServerConfig {
                export: self.export.to_path_buf(),
                token: b"bench".to_vec(),
                read_only: false,
                tls: None,
                uid_map: Default::default(),
                gid_map: Default::default(),
                workers: 8,
                max_nodes: gvfs::server::DEFAULT_MAX_NODES,
            },
            ([127, 0, 0, 1], 0).into(),
        )
        .map_err(|e| VirtioFsBenchError::Server(crate::cli::chain(&e)))?;
        let addr = server.local_addr();
        let _server = server.spawn();
        let token = self.dir.join("token");
        std::fs::write(&token, "bench").map_err(io("write the token file"))?;
        let spec = json!({"vms": [{
            "name": "guest", "kernel": self.probe, "mem_mib": 64,
            "shares": [format!("data={addr},token-file={},plaintext", token.display())],
            "cmdline": self.cmdline("out-gvfs.bin"),
        }]});
        let lines = guests::run_config(self.dir, "gvfs", &spec)?;
        self.figures(
            "gvfs",
            "in-process GVFS client, GVFS server on loopback",
            &lines,
            "out-gvfs.bin",
        )
    }

    fn virtiofsd(&self, program: &Path) -> Result<Figures> {
        let socket = self.dir.join("virtiofsd.sock");
        let log = std::fs::File::create(self.dir.join("virtiofsd.log"))
            .map_err(io("create virtiofsd.log"))?;
        let child = Command::new(program)
            .arg("--shared-dir")
            .arg(self.export)
            .arg("--socket-path")
            .arg(&socket)
            .args(["--sandbox", "none", "--log-level", "error"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(io(format!("start {}", program.display())))?;
        let mut backend = Reaped(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            if let Ok(Some(status)) = backend.0.try_wait() {
                return Err(VirtioFsBenchError::Virtiofsd(format!(
                    "exited before listening ({status}); see virtiofsd.log"
                )));
            }
            if Instant::now() >= deadline {
                return Err(VirtioFsBenchError::Virtiofsd(format!(
                    "did not create {} within 20 s",
                    socket.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let spec = json!({"vms": [{
            "name": "guest", "kernel": self.probe, "mem_mib": 64,
            "vhost_user_shares": [format!("data={}", socket.display())],
            "cmdline": self.cmdline("out-virtiofsd.bin"),
        }]});
        let lines = guests::run_config(self.dir, "virtiofsd", &spec)?;
        drop(backend);
        self.figures(
            "virtiofsd",
            "virtiofsd 1.14 over vhost-user, --sandbox none",
            &lines,
            "out-virtiofsd.bin",
        )
    }

    /// Checks the guest's reads and write and prints their figures.
    fn figures(
        &self,
        backend: &'static str,
        path: &str,
        lines: &[GuestLine],
        out: &str,
    ) -> Result<Figures> {
        let of = |kind: &'static str| -> Vec<&Value> {
            lines
                .iter()
                .filter(|l| l.value["probe"] == kind)
                .map(|l| &l.value)
                .collect()
        };
        let (reads, writes) = (of("fs-read"), of("fs-write"));
        let nth = |v: &[&Value], kind: &'static str, n: usize| -> Result<Value> {
            v.get(n)
                .map(|x| (*x).clone())
                .ok_or(VirtioFsBenchError::NoLine {
                    backend,
                    kind,
                    n: n + 1,
                })
        };
        let corrupt = |detail: String| VirtioFsBenchError::Corrupt { backend, detail };
        let mut mbit = Vec::new();
        for n in 0..2 {
            let r = nth(&reads, "fs-read", n)?;
            let crc = format!("{:08x}", self.file_crc);
            if r["bytes"].as_u64() != Some(self.file_bytes) || r["crc32"] != crc.as_str() {
                return Err(corrupt(format!(
                    "read {} gave {r}, want {} bytes with CRC {crc}",
                    n + 1,
                    self.file_bytes
                )));
            }
            mbit.push(r["mbit_s"].as_f64().unwrap_or(0.0));
        }
        let w = nth(&writes, "fs-write", 0)?;
        let pattern_crc = format!("{:08x}", pattern_crc(self.write_bytes));
        let on_export = std::fs::metadata(self.export.join(out))
            .map(|m| m.len())
            .ok();
        if w["bytes"].as_u64() != Some(self.write_bytes)
            || w["crc32"] != pattern_crc.as_str()
            || on_export != Some(self.write_bytes)
        {
            return Err(corrupt(format!(
                "write gave {w} ({on_export:?} bytes on the export), want {} bytes with CRC \
                 {pattern_crc}",
                self.write_bytes
            )));
        }
        let figures = Figures {
            read_first: mbit[0],
            read_second: mbit[1],
            write: w["mbit_s"].as_f64().unwrap_or(0.0),
        };
        let load = guests::load_1m();
        for (measure, bytes, value) in [
            ("read_first", self.file_bytes, figures.read_first),
            ("read_second", self.file_bytes, figures.read_second),
            ("write", self.write_bytes, figures.write),
        ] {
            println!(
                "{}",
                json!({
                    "bench": "virtio-fs", "backend": backend, "path": path, "measure": measure,
                    "bytes": bytes, "mbit_s": round(value, 1),
                    "mib_s": round(value * 1e6 / 8.0 / 1048576.0, 1),
                    "crc_match": true, "host_load_1m": load,
                })
            );
        }
        Ok(figures)
    }
}

/// Killed and reaped when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Writes `bytes` of pseudo-random data (xorshift64*) to `path`; returns
/// their CRC-32.
fn write_random_file(path: &Path, bytes: u64) -> Result<u32> {
    let file = std::fs::File::create(path).map_err(io(format!("create {}", path.display())))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut crc = crc32fast::Hasher::new();
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut chunk = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        for word in chunk.chunks_exact_mut(8) {
            seed ^= seed >> 12;
            seed ^= seed << 25;
            seed ^= seed >> 27;
            word.copy_from_slice(&seed.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        let n = left.min(chunk.len() as u64) as usize;
        crc.update(&chunk[..n]);
        out.write_all(&chunk[..n])
            .map_err(io(format!("write {}", path.display())))?;
        left -= n as u64;
    }
    out.flush()
        .map_err(io(format!("write {}", path.display())))?;
    Ok(crc.finalize())
}

/// The CRC-32 of the probe's write pattern (byte i = i % 251).
fn pattern_crc(bytes: u64) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    let period: Vec<u8> = (0..251u32).map(|i| i as u8).collect();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(period.len() as u64) as usize;
        crc.update(&period[..n]);
        left -= n as u64;
    }
    crc.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_crc_matches_the_bytes() {
        for n in [1u64, 250, 251, 252, 100_000] {
            let bytes: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            assert_eq!(pattern_crc(n), crc32fast::hash(&bytes), "{n}");
        }
    }

    #[test]
    fn random_file_crc_is_the_file_s() {
        let dir = ScratchDir::new("vmplant-test-random-file").unwrap();
        let p = dir.path().join("f");
        let crc = write_random_file(&p, (1 << 20) + 5).unwrap();
        let data = std::fs::read(&p).unwrap();
        assert_eq!(data.len(), (1 << 20) + 5);
        assert_eq!(crc, crc32fast::hash(&data));
    }
}
