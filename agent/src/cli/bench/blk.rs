//! `vmplant bench blk`: the test guest reads a raw image file through
//! virtio-blk in vmplant and in Firecracker, side by side in one run on
//! the same file and probe ELF: 4 KiB random reads (`blk-rand-read`,
//! IOPS) and 1 MiB sequential reads (`blk-seq-read`, MB/s), one request
//! at a time, the host's page cache warm; then the same two from the host
//! with fio (psync, queue depth 1) as the ceiling. And, from an image
//! store on a GVFS server over loopback, a guest's first reads of 100
//! scattered sectors of a 1 GiB image: the chunks fetched.
//!
//! vmplant runs twice each round: as it is, and with the disk's
//! `poll=US` (its thread polls the queue after each request, so that the
//! guest's next request needs no VM exit).
//!
//! Prints one JSON line per measurement and run, then a summary line with
//! medians and ratios.

use super::guests::{self, GuestsError};
use super::measure::{MeasureError, Measured, ScratchDir, round};
use crate::cli::CliResult;
use clap::Args;
use serde_json::{Value, json};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

#[derive(Debug, Args)]
pub struct BlkBenchArgs {
    /// Size of the raw image the guests read, in MiB.
    #[arg(long, default_value_t = 1024, value_parser = crate::cli::mib)]
    pub image_mib: u64,
    /// 4 KiB random reads per guest run.
    #[arg(long, default_value_t = 20000)]
    pub rand_reads: u64,
    /// MiB read sequentially per guest run.
    #[arg(long, default_value_t = 2048)]
    pub seq_mib: u64,
    /// Runs of each VMM (alternating); the summary takes medians.
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// Seconds each fio job runs.
    #[arg(long, default_value_t = 5)]
    pub fio_secs: u64,
    /// vmplant runs a second time with the disk's `poll=US` (the device
    /// polls the queue that long after each request); 0: not.
    #[arg(long, default_value_t = 100)]
    pub poll_us: u64,
    /// Size of the image on the remote store, in MiB.
    #[arg(long, default_value_t = 1024, value_parser = crate::cli::mib)]
    pub remote_mib: u64,
    /// The test guest [default: target/probe/probe.elf in the repository].
    #[arg(long)]
    pub probe: Option<PathBuf>,
    /// Where the firecracker binary is [default: ../shared/anchors next
    /// to the repository].
    #[arg(long)]
    pub anchors: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum BlkBenchError {
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
    #[error("no firecracker at {0}: pass --anchors")]
    NoFirecracker(PathBuf),
    #[error("{vmm}: no {kind} line with {field}; console: {tail}")]
    NoFigure {
        vmm: &'static str,
        kind: &'static str,
        field: &'static str,
        tail: String,
    },
    #[error("fio {job}: {detail}")]
    Fio { job: &'static str, detail: String },
    #[error("the image store: {0}")]
    Store(String),
    #[error("the GVFS server cannot start: {0}")]
    Server(String),
    #[error("the remote disk's log has no {0}=")]
    NoFetchFigure(&'static str),
    #[error("the image must be at least 1 MiB, and the runs and reads more than 0")]
    TooSmall,
}

type Result<T> = std::result::Result<T, BlkBenchError>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BlkBenchError {
    let what = what.into();
    move |source| BlkBenchError::Io { what, source }
}

/// One run's figures.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Figures {
    iops: f64,
    mb_s: f64,
}

const CHUNK: u64 = 512 * 1024;

pub fn run(args: BlkBenchArgs) -> CliResult {
    if args.image_mib == 0 || args.runs == 0 || args.rand_reads == 0 || args.seq_mib == 0 {
        return Err(BlkBenchError::TooSmall.into());
    }
    let probe = guests::probe_path(args.probe.as_deref())?;
    let anchors = match (&args.anchors, super::boot::repo_root()) {
        (Some(a), _) => a.clone(),
        (None, Some(r)) => r.join("../shared/anchors"),
        (None, None) => return Err(GuestsError::NoRepo.into()),
    };
    let firecracker = anchors.join("firecracker");
    if !firecracker.is_file() {
        return Err(BlkBenchError::NoFirecracker(firecracker).into());
    }
    let scratch = ScratchDir::new("vmplant-bench-blk")?;
    let dir = scratch.path();
    let image = dir.join("disk.raw");
    random_file(&image, args.image_mib << 20)?;
    // The page cache warm: every guest and fio read the file from memory.
    std::fs::read(&image).map_err(io("read the image"))?;
    let steps = format!(
        "blk-rand-read:{}:4096+blk-seq-read:{}",
        args.rand_reads, args.seq_mib
    );
    let load = guests::load_1m();
    let (mut vp, mut pp, mut fc) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..args.runs {
        let v = vmplant_run(dir, &probe, &image, &steps, 0)?;
        emit("vmplant", run, &v, load);
        vp.push(v);
        if args.poll_us > 0 {
            let p = vmplant_run(dir, &probe, &image, &steps, args.poll_us)?;
            emit("vmplant-poll", run, &p, load);
            pp.push(p);
        }
        let f = firecracker_run(dir, &firecracker, &probe, &image, &steps)?;
        emit("firecracker", run, &f, load);
        fc.push(f);
    }
    let host = fio(dir, &image, args.fio_secs)?;
    emit("host-fio", 0, &host, load);
    let med = |v: &[Figures], f: fn(&Figures) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(f64::total_cmp);
        x.get(x.len() / 2).copied().unwrap_or(0.0)
    };
    let (p_iops, p_mbs) = (med(&pp, |f| f.iops), med(&pp, |f| f.mb_s));
    let (v_iops, v_mbs) = (med(&vp, |f| f.iops), med(&vp, |f| f.mb_s));
    let (f_iops, f_mbs) = (med(&fc, |f| f.iops), med(&fc, |f| f.mb_s));
    let ratio = |a: f64, b: f64| if b > 0.0 { round(a / b, 2) } else { 0.0 };

    let remote = remote(dir, &probe, args.remote_mib)?;
    println!(
        "{}",
        json!({
            "summary": true, "bench": "blk", "runs": args.runs, "image_mib": args.image_mib,
            "rand_4k_iops": {"vmplant": v_iops, "firecracker": f_iops, "host_fio": host.iops,
                "vmplant_vs_firecracker": ratio(v_iops, f_iops), "vmplant_vs_host": ratio(v_iops, host.iops),
                "firecracker_vs_host": ratio(f_iops, host.iops),
                "vmplant_poll": p_iops, "vmplant_poll_vs_firecracker": ratio(p_iops, f_iops),
                "vmplant_poll_vs_host": ratio(p_iops, host.iops)},
            "seq_1m_mb_s": {"vmplant": v_mbs, "firecracker": f_mbs, "host_fio": host.mb_s,
                "vmplant_vs_firecracker": ratio(v_mbs, f_mbs), "vmplant_vs_host": ratio(v_mbs, host.mb_s),
                "firecracker_vs_host": ratio(f_mbs, host.mb_s),
                "vmplant_poll": p_mbs, "vmplant_poll_vs_firecracker": ratio(p_mbs, f_mbs),
                "vmplant_poll_vs_host": ratio(p_mbs, host.mb_s)},
            "poll_us": args.poll_us,
            "remote_first_100_sectors": remote,
            "host_load_1m": guests::load_1m(),
        })
    );
    Ok(ExitCode::SUCCESS)
}

fn emit(vmm: &str, run: u32, f: &Figures, load: Option<f64>) {
    println!(
        "{}",
        json!({"bench": "blk", "vmm": vmm, "run": run, "rand_4k_iops": round(f.iops, 0),
               "seq_1m_mb_s": round(f.mb_s, 0), "host_load_1m": load})
    );
}

/// `bytes` of xorshift noise (no chunk like another, none of zeros).
fn random_file(path: &Path, bytes: u64) -> Result<()> {
    use std::io::Write;
    let file = std::fs::File::create(path).map_err(io(format!("create {}", path.display())))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..bytes >> 20 {
        for w in block.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        out.write_all(&block)
            .map_err(io(format!("write {}", path.display())))?;
    }
    out.flush().map_err(io(format!("write {}", path.display())))
}

/// The figures of the probe's `blk-rand-read` and `blk-seq-read` lines.
fn figures(vmm: &'static str, lines: &[Value], tail: &str) -> Result<Figures> {
    let field = |kind: &'static str, field: &'static str| {
        lines
            .iter()
            .find(|v| v["probe"] == kind)
            .and_then(|v| v[field].as_f64())
            .ok_or_else(|| BlkBenchError::NoFigure {
                vmm,
                kind,
                field,
                tail: tail.to_string(),
            })
    };
    Ok(Figures {
        iops: field("blk-rand-read", "iops")?,
        mb_s: field("blk-seq-read", "mb_s")?,
    })
}

fn vmplant_run(
    dir: &Path,
    probe: &Path,
    image: &Path,
    steps: &str,
    poll_us: u64,
) -> Result<Figures> {
    let poll = if poll_us > 0 {
        format!(",poll={poll_us}")
    } else {
        String::new()
    };
    let spec = json!({"vms": [{
        "name": "guest", "kernel": probe, "mem_mib": 64,
        "disks": [format!("{},ro{poll}", image.display())],
        "cmdline": format!("console=ttyS0 probe={steps}+shutdown"),
    }]});
    let lines = guests::run_config(dir, "vmplant", &spec)?;
    let values: Vec<Value> = lines.into_iter().map(|l| l.value).collect();
    figures("vmplant", &values, "")
}

fn firecracker_run(
    dir: &Path,
    firecracker: &Path,
    probe: &Path,
    image: &Path,
    steps: &str,
) -> Result<Figures> {
    let config = dir.join("fc.json");
    let spec = json!({
        "boot-source": {"kernel_image_path": probe,
                        "boot_args": format!("console=ttyS0 probe={steps}+shutdown")},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
        "drives": [{"drive_id": "disk0", "path_on_host": image,
                    "is_root_device": false, "is_read_only": true}],
    });
    std::fs::write(&config, spec.to_string()).map_err(io("write fc.json"))?;
    let log = dir.join("fc.log");
    std::fs::File::create(&log).map_err(io("create fc.log"))?;
    let mut cmd = Command::new(firecracker);
    cmd.args(["--no-api", "--no-seccomp", "--level", "Warn", "--log-path"])
        .arg(&log)
        .arg("--config-file")
        .arg(&config)
        .stderr(Stdio::null());
    let mut proc = Measured::spawn(&mut cmd)?;
    let done = proc.wait_for("\"blk-seq-read\"", Duration::from_secs(300));
    // The rest of the line.
    let _ = proc.drain_for(Duration::from_millis(100));
    let text = String::from_utf8_lossy(proc.output()).into_owned();
    proc.kill();
    let values: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .filter(|v| v.get("probe").is_some())
        .collect();
    let tail: String = text.lines().rev().take(5).collect::<Vec<_>>().join(" / ");
    done.map_err(|e| BlkBenchError::NoFigure {
        vmm: "firecracker",
        kind: "blk-seq-read",
        field: "mb_s",
        tail: format!("{e}; {tail}"),
    })?;
    figures("firecracker", &values, &tail)
}

/// fio on the host, psync at queue depth 1 as the guests read: 4 KiB
/// random reads and 1 MiB sequential reads of the image, page cache warm.
fn fio(dir: &Path, image: &Path, secs: u64) -> Result<Figures> {
    let job = |name: &'static str, rw: &str, bs: &str| -> Result<Value> {
        let out = Command::new("fio")
            .args([
                &format!("--name={name}"),
                &format!("--rw={rw}"),
                &format!("--bs={bs}"),
                "--ioengine=psync",
                "--iodepth=1",
                "--numjobs=1",
                "--readonly",
                // fio drops the file's pages first by default: keep them.
                "--invalidate=0",
                "--time_based",
                &format!("--runtime={secs}"),
                "--output-format=json",
            ])
            .arg(format!("--filename={}", image.display()))
            .current_dir(dir)
            .output()
            .map_err(io("run fio (apt-get install fio)"))?;
        if !out.status.success() {
            return Err(BlkBenchError::Fio {
                job: name,
                detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        let text = String::from_utf8_lossy(&out.stdout);
        // fio may print notes before its JSON.
        let start = text.find('{').unwrap_or(0);
        let v: Value = serde_json::from_str(&text[start..]).map_err(|e| BlkBenchError::Fio {
            job: name,
            detail: format!("unreadable output: {e}"),
        })?;
        Ok(v["jobs"][0]["read"].clone())
    };
    let rand = job("rand-4k", "randread", "4k")?;
    let seq = job("seq-1m", "read", "1m")?;
    let num = |v: &Value, f: &'static str, job: &'static str| {
        v[f].as_f64().ok_or_else(|| BlkBenchError::Fio {
            job,
            detail: format!("no read.{f}"),
        })
    };
    Ok(Figures {
        iops: num(&rand, "iops", "rand-4k")?,
        mb_s: num(&seq, "bw_bytes", "seq-1m")? / 1e6,
    })
}

/// A store with a `mib` MiB image whose chunks each differ (an index and
/// noise at the start of each, the rest a hole), served by an in-process
/// GVFS server on loopback; a guest reads 100 scattered sectors through
/// it: what was fetched.
fn remote(dir: &Path, probe: &Path, mib: u64) -> Result<Value> {
    let raw = dir.join("remote.raw");
    let f = std::fs::File::create(&raw).map_err(io("create remote.raw"))?;
    f.set_len(mib << 20).map_err(io("size remote.raw"))?;
    let chunks = (mib << 20).div_ceil(CHUNK);
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    for i in 0..chunks {
        let mut mark = [0u8; 64];
        mark[..8].copy_from_slice(&i.to_le_bytes());
        for w in mark[8..].chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all_at(&mark, i * CHUNK)
            .map_err(io("write remote.raw"))?;
    }
    drop(f);
    let store_dir = dir.join("store");
    let store = images::Store::open_or_create(&store_dir, CHUNK as u32)
        .map_err(|e| BlkBenchError::Store(images::chain_message(&e)))?;
    store
        .import("big", &raw, &mut |_| {})
        .map_err(|e| BlkBenchError::Store(images::chain_message(&e)))?;
    std::fs::remove_file(&raw).map_err(io("remove remote.raw"))?;
    let server = gvfs::server::Server::bind(
        gvfs::server::ServerConfig {
            export: store_dir.clone(),
            token: b"bench".to_vec(),
            read_only: true,
            tls: None,
            uid_map: Default::default(),
            gid_map: Default::default(),
            workers: 8,
            max_nodes: gvfs::server::DEFAULT_MAX_NODES,
        },
        ([127, 0, 0, 1], 0).into(),
    )
    .map_err(|e| BlkBenchError::Server(crate::cli::chain(&e)))?;
    let addr = server.local_addr();
    let _server = server.spawn();
    let token = dir.join("token");
    std::fs::write(&token, "bench").map_err(io("write the token file"))?;
    let spec = json!({"vms": [{
        "name": "guest", "kernel": probe, "mem_mib": 64,
        "disks": [format!(
            "image=big,store=gvfs://{addr},token-file={},plaintext,cache-dir={},overlay={}",
            token.display(),
            dir.join("cache").display(),
            dir.join("remote.ovl").display()
        )],
        "cmdline": "console=ttyS0 probe=blk-rand-read:100:512+shutdown",
    }]});
    let lines = guests::run_config(dir, "remote", &spec)?;
    let read = lines
        .iter()
        .find(|l| l.value["probe"] == "blk-rand-read")
        .map(|l| l.value.clone())
        .unwrap_or(Value::Null);
    let log = std::fs::read_to_string(dir.join("remote.log")).map_err(io("read remote.log"))?;
    let figure = |key: &'static str| {
        super::measure::number_after(&log, &format!("{key}="))
            .ok_or(BlkBenchError::NoFetchFigure(key))
    };
    let (bytes, fetched) = (figure("fetched_bytes")?, figure("fetched_chunks")?);
    let out = json!({
        "bench": "blk", "measure": "remote_first_read", "image_mib": mib,
        "image_chunks": chunks, "chunk_kib": CHUNK / 1024, "sectors_read": 100,
        "chunks_fetched": fetched, "bytes_fetched": bytes,
        "fetched_mib": round(bytes as f64 / 1048576.0, 1),
        "goal_at_most_100_chunks": fetched <= 100,
        "guest_ms": read["ns"].as_u64().map(|ns| round(ns as f64 / 1e6, 1)),
    });
    println!("{out}");
    Ok(out)
}
