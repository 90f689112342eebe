//! The GVFS benchmark: sequential reads (cold and warm), 4 KiB random
//! reads, and stat plus readdir over many files, through (a) the local
//! file system, (b) a GVFS mount over loopback (plain TCP; plain TCP with
//! whole-file copies and passthrough; TLS) and (c) sshfs to a local sshd.
//! Prints one JSON line per measurement and a summary line.
//!
//! "Cold" for a mount means a fresh mount with empty client caches (the
//! server's page cache holds the data, so the transport is measured);
//! for the local file system it means after dropping the page cache.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client::{ConnectConfig, Fs, FsOptions};
use crate::server::{IdMap, Server, ServerConfig, ServerHandle};

/// What can stop the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("I/O failed: {0}")]
    Io(String, #[source] io::Error),
    #[error("setup failed: {0}")]
    Setup(String),
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Work directory (data, mount points, sshd files).
    pub dir: PathBuf,
    pub file_mib: u64,
    pub files: usize,
    pub random_reads: usize,
    /// Also measure sshfs (needs sshd and sshfs installed).
    pub sshfs: bool,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            dir: std::env::temp_dir().join("gvfs-bench"),
            file_mib: 1024,
            files: 10_000,
            random_reads: 20_000,
            sshfs: true,
        }
    }
}

/// One measurement.
#[derive(Debug, Clone)]
pub struct Sample {
    pub target: &'static str,
    pub test: &'static str,
    pub value: f64,
    pub unit: &'static str,
}

impl Sample {
    pub fn json(&self) -> String {
        format!(
            "{{\"target\":\"{}\",\"test\":\"{}\",\"value\":{:.1},\"unit\":\"{}\"}}",
            self.target, self.test, self.value, self.unit
        )
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> BenchError {
    let what = what.into();
    move |e| BenchError::Io(what, e)
}

fn drop_caches() {
    let _ = Command::new("sync").status();
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
}

fn seq_read(path: &Path) -> Result<f64, BenchError> {
    let mut f = File::open(path).map_err(io_err(path.display().to_string()))?;
    let mut buf = vec![0u8; 1 << 20];
    let t = Instant::now();
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io_err("read"))?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    Ok(total as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64())
}

/// Sequential read by a separate `dd` process (as a user of the mount
/// would), MiB/s.
fn dd_read(path: &Path) -> Result<f64, BenchError> {
    let t = Instant::now();
    let out = Command::new("dd")
        .arg(format!("if={}", path.display()))
        .args(["of=/dev/null", "bs=1M"])
        .output()
        .map_err(io_err("dd"))?;
    if !out.status.success() {
        return Err(BenchError::Setup("dd failed".into()));
    }
    let len = fs::metadata(path).map_err(io_err("stat"))?.len();
    Ok(len as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64())
}

fn rand_read(path: &Path, n: usize) -> Result<f64, BenchError> {
    let f = File::open(path).map_err(io_err(path.display().to_string()))?;
    let blocks = f.metadata().map_err(io_err("stat"))?.len() / 4096;
    let mut x: u64 = 0x2545f4914f6cdd1d;
    let mut buf = [0u8; 4096];
    let t = Instant::now();
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        f.read_exact_at(&mut buf, (x % blocks) * 4096)
            .map_err(io_err("pread"))?;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// Lists `dir` and stats every entry; files per second.
fn stat_pass(dir: &Path) -> Result<f64, BenchError> {
    let t = Instant::now();
    let mut n = 0usize;
    for e in fs::read_dir(dir).map_err(io_err("readdir"))? {
        let e = e.map_err(io_err("readdir"))?;
        fs::symlink_metadata(e.path()).map_err(io_err("stat"))?;
        n += 1;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// A mounted target that can be remounted with empty caches.
trait Target {
    fn name(&self) -> &'static str;
    fn root(&self) -> &Path;
    /// Makes the next access cold.
    fn make_cold(&mut self) -> Result<(), BenchError>;
}

struct Local(PathBuf);

impl Target for Local {
    fn name(&self) -> &'static str {
        "local"
    }
    fn root(&self) -> &Path {
        &self.0
    }
    fn make_cold(&mut self) -> Result<(), BenchError> {
        drop_caches();
        Ok(())
    }
}

struct Gvfs {
    name: &'static str,
    /// Whole-file copies and passthrough on.
    copies: bool,
    mnt: PathBuf,
    addr: std::net::SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
    session: Option<fuser::BackgroundSession>,
    _server: ServerHandle,
}

impl Gvfs {
    fn mount(&mut self) -> Result<(), BenchError> {
        if let Some(s) = self.session.take() {
            let _ = s.umount_and_join();
        }
        let fs_ = Fs::new(
            ConnectConfig {
                addr: self.addr.to_string(),
                token: b"bench".to_vec(),
                tls: self.tls.clone(),
                connect_timeout: Duration::from_secs(5),
                request_timeout: Duration::from_secs(60),
            },
            FsOptions {
                attr_timeout: Duration::from_secs(60),
                mem_cache_bytes: 512 << 20,
                whole_copy_bytes: if self.copies {
                    crate::client::BENCH_WHOLE_COPY_BYTES
                } else {
                    0
                },
                ..FsOptions::default()
            },
        )
        .map_err(|e| BenchError::Setup(e.to_string()))?;
        self.session = Some(
            // The export is read-only: mounted so, as `gvfs mount` does.
            crate::fuse::mount(Arc::new(fs_), &self.mnt, true).map_err(io_err("mount gvfs"))?,
        );
        Ok(())
    }
}

impl Target for Gvfs {
    fn name(&self) -> &'static str {
        self.name
    }
    fn root(&self) -> &Path {
        &self.mnt
    }
    fn make_cold(&mut self) -> Result<(), BenchError> {
        self.mount()
    }
}

impl Drop for Gvfs {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = s.umount_and_join();
        }
    }
}

struct Sshfs {
    mnt: PathBuf,
    export: PathBuf,
    key: PathBuf,
    port: u16,
    sshd: Child,
}

impl Sshfs {
    fn start(work: &Path, export: &Path) -> Result<Sshfs, BenchError> {
        let d = work.join("ssh");
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).map_err(io_err("ssh dir"))?;
        let key = d.join("id");
        let hostkey = d.join("hostkey");
        for k in [&key, &hostkey] {
            let ok = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(k)
                .status()
                .map_err(io_err("ssh-keygen"))?;
            if !ok.success() {
                return Err(BenchError::Setup("ssh-keygen failed".into()));
            }
        }
        fs::copy(d.join("id.pub"), d.join("authorized_keys")).map_err(io_err("keys"))?;
        let port = 22000 + (std::process::id() % 1000) as u16;
        let cfg = d.join("sshd_config");
        fs::write(
            &cfg,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\n\
                 PermitRootLogin yes\nPasswordAuthentication no\nStrictModes no\n\
                 Subsystem sftp internal-sftp\nPidFile {}\n",
                hostkey.display(),
                d.join("authorized_keys").display(),
                d.join("sshd.pid").display()
            ),
        )
        .map_err(io_err("sshd_config"))?;
        let _ = fs::create_dir_all("/run/sshd");
        let sshd = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&cfg)
            .stderr(Stdio::null())
            .spawn()
            .map_err(io_err("sshd"))?;
        std::thread::sleep(Duration::from_millis(500));
        let mut s = Sshfs {
            mnt: work.join("mnt-sshfs"),
            export: export.to_path_buf(),
            key,
            port,
            sshd,
        };
        s.mount()?;
        Ok(s)
    }

    fn umount(&self) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.mnt)
            .stderr(Stdio::null())
            .status();
    }

    fn mount(&mut self) -> Result<(), BenchError> {
        self.umount();
        fs::create_dir_all(&self.mnt).map_err(io_err("mnt"))?;
        let ok = Command::new("sshfs")
            .arg(format!("root@127.0.0.1:{}", self.export.display()))
            .arg(&self.mnt)
            .args([
                "-p",
                &self.port.to_string(),
                "-o",
                &format!(
                    "IdentityFile={},StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,BatchMode=yes",
                    self.key.display()
                ),
            ])
            .status()
            .map_err(io_err("sshfs"))?;
        if !ok.success() {
            return Err(BenchError::Setup("sshfs mount failed".into()));
        }
        Ok(())
    }
}

impl Target for Sshfs {
    fn name(&self) -> &'static str {
        "sshfs"
    }
    fn root(&self) -> &Path {
        &self.mnt
    }
    fn make_cold(&mut self) -> Result<(), BenchError> {
        self.mount()
    }
}

impl Drop for Sshfs {
    fn drop(&mut self) {
        self.umount();
        let _ = self.sshd.kill();
        let _ = self.sshd.wait();
    }
}

/// A CA and a server certificate for 127.0.0.1 signed by it (openssl).
fn make_certs(work: &Path) -> Result<(PathBuf, PathBuf, PathBuf), BenchError> {
    let d = work.join("tls");
    fs::create_dir_all(&d).map_err(io_err("tls dir"))?;
    let p = |n: &str| d.join(n).display().to_string();
    fs::write(d.join("ext"), "subjectAltName=IP:127.0.0.1\n").map_err(io_err("ext"))?;
    let steps: [Vec<String>; 3] = [
        format!(
            "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout {} -out {} -days 2 -subj /CN=gvfs-bench-ca",
            p("ca.key"),
            p("ca.pem")
        )
        .split(' ')
        .map(String::from)
        .collect(),
        format!(
            "req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout {} -out {} -subj /CN=127.0.0.1",
            p("key.pem"),
            p("req.csr")
        )
        .split(' ')
        .map(String::from)
        .collect(),
        format!(
            "x509 -req -in {} -CA {} -CAkey {} -CAcreateserial -out {} -days 2 -extfile {}",
            p("req.csr"),
            p("ca.pem"),
            p("ca.key"),
            p("cert.pem"),
            p("ext")
        )
        .split(' ')
        .map(String::from)
        .collect(),
    ];
    for args in steps {
        let ok = Command::new("openssl")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(io_err("openssl"))?;
        if !ok.success() {
            return Err(BenchError::Setup(format!("openssl {} failed", args[0])));
        }
    }
    Ok((d.join("cert.pem"), d.join("key.pem"), d.join("ca.pem")))
}

fn prepare(export: &Path, cfg: &BenchConfig) -> Result<(), BenchError> {
    let big = export.join("big.bin");
    let want = cfg.file_mib << 20;
    if fs::metadata(&big).map(|m| m.len()).ok() != Some(want) {
        let mut f = File::create(&big).map_err(io_err("create big.bin"))?;
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..cfg.file_mib {
            for c in buf.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                c.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&buf).map_err(io_err("write big.bin"))?;
        }
    }
    let many = export.join("many");
    let have = fs::read_dir(&many).map(|d| d.count()).unwrap_or(0);
    if have != cfg.files {
        let _ = fs::remove_dir_all(&many);
        fs::create_dir_all(&many).map_err(io_err("many"))?;
        for i in 0..cfg.files {
            fs::write(many.join(format!("f{i:05}")), b"small file\n").map_err(io_err("small"))?;
        }
    }
    Ok(())
}

fn measure(
    t: &mut dyn Target,
    cfg: &BenchConfig,
    out: &mut dyn Write,
    samples: &mut Vec<Sample>,
) -> Result<(), BenchError> {
    let big = t.root().join("big.bin");
    let many = t.root().join("many");
    t.make_cold()?;
    let cold = seq_read(&big)?;
    // Best of two: the first pass may still fetch what the cold read's
    // page cache did not keep.
    let warm = seq_read(&big)?.max(seq_read(&big)?);
    let warm_dd = dd_read(&big)?;
    t.make_cold()?;
    let rand = rand_read(&big, cfg.random_reads)?;
    t.make_cold()?;
    let first = stat_pass(&many)?;
    let second = stat_pass(&many)?;
    let target = t.name();
    let mut emit = |test: &'static str, value: f64, unit: &'static str| {
        let s = Sample {
            target,
            test,
            value,
            unit,
        };
        let _ = writeln!(out, "{}", s.json());
        samples.push(s);
    };
    emit("seq_read_cold", cold, "MiB/s");
    emit("seq_read_warm", warm, "MiB/s");
    emit("seq_read_warm_dd", warm_dd, "MiB/s");
    emit("rand_read_4k_cold", rand, "ops/s");
    emit("stat_pass_first", first, "files/s");
    emit("stat_pass_second", second, "files/s");
    Ok(())
}

fn get(samples: &[Sample], target: &str, test: &str) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.target == target && s.test == test)
        .map(|s| s.value)
}

/// Runs every measurement; JSON lines and then a summary line go to `out`.
pub fn run(cfg: &BenchConfig, out: &mut dyn Write) -> Result<Vec<Sample>, BenchError> {
    let export = cfg.dir.join("export");
    fs::create_dir_all(&export).map_err(io_err("export"))?;
    prepare(&export, cfg)?;
    let mut samples = Vec::new();

    measure(&mut Local(export.clone()), cfg, out, &mut samples)?;

    // Plain TCP, plain TCP with whole-file copies (passthrough), TLS.
    for (name, tls, copies) in [
        ("gvfs", false, false),
        ("gvfs-copies", false, true),
        ("gvfs-tls", true, false),
    ] {
        let (server_tls, client_tls) = if tls {
            let (cert, key, ca) = make_certs(&cfg.dir)?;
            let setup = |e: crate::transport::TransportError| BenchError::Setup(e.to_string());
            (
                Some(crate::transport::server_tls_config(&cert, &key).map_err(setup)?),
                Some(crate::transport::client_tls_config(&ca).map_err(setup)?),
            )
        } else {
            (None, None)
        };
        let server = Server::bind(
            ServerConfig {
                export: export.clone(),
                token: b"bench".to_vec(),
                read_only: true,
                tls: server_tls,
                uid_map: IdMap::default(),
                gid_map: IdMap::default(),
                workers: 8,
                max_nodes: crate::server::DEFAULT_MAX_NODES,
            },
            "127.0.0.1:0"
                .parse()
                .map_err(|_| BenchError::Setup("addr".into()))?,
        )
        .map_err(|e| BenchError::Setup(e.to_string()))?;
        let addr = server.local_addr();
        let mnt = cfg.dir.join("mnt-gvfs");
        fs::create_dir_all(&mnt).map_err(io_err("mnt"))?;
        let mut g = Gvfs {
            name,
            copies,
            mnt,
            addr,
            tls: client_tls,
            session: None,
            _server: server.spawn(),
        };
        // Server-side page cache warm, as for sshfs below.
        seq_read(&export.join("big.bin"))?;
        measure(&mut g, cfg, out, &mut samples)?;
    }
    if cfg.sshfs {
        let mut s = Sshfs::start(&cfg.dir, &export)?;
        seq_read(&export.join("big.bin"))?;
        measure(&mut s, cfg, out, &mut samples)?;
    }

    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "null".into(),
    };
    let g = |t: &str| get(&samples, "gvfs", t);
    let c = |t: &str| get(&samples, "gvfs-copies", t);
    let local = |t: &str| get(&samples, "local", t);
    let sshfs = |t: &str| get(&samples, "sshfs", t);
    let _ = writeln!(
        out,
        "{{\"summary\":true,\"warm_vs_local\":{},\"warm_dd_vs_local\":{},\"cold_vs_sshfs\":{},\"copies_warm_vs_local\":{},\"copies_warm_dd_vs_local\":{},\"copies_cold_vs_sshfs\":{},\"first_stat_vs_sshfs\":{},\"second_stat_vs_local\":{},\"rand_vs_sshfs\":{},\"tls_cold_vs_plain\":{}}}",
        ratio(g("seq_read_warm"), local("seq_read_warm")),
        ratio(g("seq_read_warm_dd"), local("seq_read_warm_dd")),
        ratio(g("seq_read_cold"), sshfs("seq_read_cold")),
        ratio(c("seq_read_warm"), local("seq_read_warm")),
        ratio(c("seq_read_warm_dd"), local("seq_read_warm_dd")),
        ratio(c("seq_read_cold"), sshfs("seq_read_cold")),
        ratio(g("stat_pass_first"), sshfs("stat_pass_first")),
        ratio(g("stat_pass_second"), local("stat_pass_second")),
        ratio(g("rand_read_4k_cold"), sshfs("rand_read_4k_cold")),
        ratio(
            get(&samples, "gvfs-tls", "seq_read_cold"),
            g("seq_read_cold")
        ),
    );
    Ok(samples)
}
