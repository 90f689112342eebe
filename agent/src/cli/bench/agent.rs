//! `vmplant bench agent`: the agent's API latency, the time from
//! `POST /vms` to the guest's first console line (and Firecracker's path
//! to the same line: process start, `PUT /boot-source`,
//! `/machine-config`, `/actions InstanceStart` on its socket), and clones
//! of one snapshot started through the API, one after another.

use super::measure::{Measured, ScratchDir, ms, round};
use crate::cli::CliResult;
use crate::cli::ctl::Client;
use clap::Args;
use serde_json::json;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum AgentBenchError {
    #[error("the test guest {0:?} is missing: run tests/probe/build.sh")]
    NoKernel(PathBuf),
    #[error("cannot find the repository (for the test guest and ../shared/anchors)")]
    NoRepo,
    #[error("{0}")]
    Setup(String),
    #[error("the agent: {0}")]
    Agent(String),
    #[error("Firecracker: {0}")]
    Firecracker(String),
}

#[derive(Debug, Args)]
pub struct AgentBenchArgs {
    /// Requests for the GET /vms latency.
    #[arg(long, default_value_t = 200)]
    requests: usize,
    /// VMs created (and Firecracker boots) for the first-line times.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Clones of one snapshot started through the API.
    #[arg(long, default_value_t = 100)]
    clones: usize,
    /// The test guest (default: target/probe/probe.elf).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Firecracker (default: ../shared/anchors/firecracker); the
    /// comparison is left out when it is missing.
    #[arg(long)]
    firecracker: Option<PathBuf>,
}

const TOKEN: &str = "bench-admin";
const READY: &str = r#"{"probe":"ready""#;
const TIMEOUT: Duration = Duration::from_secs(20);

/// A `vmplant agent` in the scratch directory, killed with its VMs.
struct Agent {
    child: Child,
    state: PathBuf,
    client: Client,
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Its VMs first (through it), then the agent.
        if let Ok(v) = self.client.json("GET", "/vms", None) {
            for vm in v["vms"].as_array().into_iter().flatten() {
                if let Some(id) = vm["id"].as_str() {
                    let _ = self.client.json("DELETE", &format!("/vms/{id}"), None);
                }
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn p50_p99(mut v: Vec<f64>) -> serde_json::Value {
    v.sort_by(f64::total_cmp);
    json!({ "p50": round(percentile(&v, 0.5), 2), "p99": round(percentile(&v, 0.99), 2), "n": v.len() })
}

fn emit(v: serde_json::Value) {
    println!("{v}");
    let _ = std::io::stdout().flush();
}

pub fn run(args: AgentBenchArgs) -> CliResult {
    let root = super::boot::repo_root();
    let kernel = match (&args.kernel, &root) {
        (Some(k), _) => k.clone(),
        (None, Some(r)) => r.join("target/probe/probe.elf"),
        (None, None) => return Err(AgentBenchError::NoRepo.into()),
    };
    if !kernel.is_file() {
        return Err(AgentBenchError::NoKernel(kernel).into());
    }
    let kernel = kernel.canonicalize()?;
    let firecracker = args
        .firecracker
        .clone()
        .or_else(|| {
            root.as_ref()
                .map(|r| r.join("../shared/anchors/firecracker"))
        })
        .filter(|p| p.is_file());
    let scratch = ScratchDir::new("vmplant-bench-agent")?;
    let agent = start_agent(scratch.path(), &kernel)?;

    // GET /vms, with one VM recorded.
    agent.client.json(
        "POST",
        "/vms",
        Some(&json!({"kernel": kernel, "start": false})),
    )?;
    let mut list = Vec::with_capacity(args.requests);
    for _ in 0..args.requests {
        let t = Instant::now();
        agent.client.json("GET", "/vms", None)?;
        list.push(ms(t.elapsed()));
    }
    let list = p50_p99(list);
    emit(json!({"bench": "agent", "measure": "get_vms_ms", "stats": list}));

    // POST /vms to its answer (the VMM's control socket answers), and to
    // the guest's first line in its console log.
    let (mut answered, mut first_line) = (Vec::new(), Vec::new());
    for _ in 0..args.runs {
        let t = Instant::now();
        let created = agent.client.json(
            "POST",
            "/vms",
            Some(&json!({"kernel": kernel, "cmdline": "console=ttyS0 probe=tick:1000", "mem_mib": 64})),
        )?;
        answered.push(ms(t.elapsed()));
        let id = created["id"].as_str().unwrap_or_default().to_owned();
        let console = agent.state.join("vms").join(&id).join("console.log");
        first_line.push(ms(wait_for_line(&console, t)?));
        agent.client.json("DELETE", &format!("/vms/{id}"), None)?;
    }
    let answered = p50_p99(answered);
    let first_line = p50_p99(first_line);
    emit(json!({"bench": "agent", "measure": "create_and_start_ms", "stats": answered}));
    emit(json!({"bench": "agent", "measure": "post_to_first_line_ms", "stats": first_line}));

    let fc_first_line = match &firecracker {
        Some(fc) => {
            let mut v = Vec::new();
            for i in 0..args.runs {
                v.push(ms(firecracker_first_line(fc, &kernel, scratch.path(), i)?));
            }
            let v = p50_p99(v);
            emit(
                json!({"bench": "agent", "measure": "firecracker_api_to_first_line_ms", "stats": v}),
            );
            Some(v)
        }
        None => {
            eprintln!("vmplant: no Firecracker at ../shared/anchors: its path is left out");
            None
        }
    };

    // Clones of one snapshot, started one after another through the API.
    let src = agent.client.json(
        "POST",
        "/vms",
        Some(&json!({"kernel": kernel, "cmdline": "console=ttyS0 probe=tick:1000", "mem_mib": 64})),
    )?;
    let src = src["id"].as_str().unwrap_or_default().to_owned();
    agent
        .client
        .json("POST", &format!("/vms/{src}/snapshot"), Some(&json!({})))?;
    let t = Instant::now();
    let mut clones = Vec::new();
    for _ in 0..args.clones {
        let c = agent
            .client
            .json("POST", &format!("/vms/{src}/clone"), Some(&json!({})))?;
        clones.push(c["id"].as_str().unwrap_or_default().to_owned());
    }
    let took = t.elapsed();
    let per_s = args.clones as f64 / took.as_secs_f64();
    emit(
        json!({"bench": "agent", "measure": "clones", "n": args.clones, "ms": round(ms(took), 1), "per_s": round(per_s, 1)}),
    );
    for id in &clones {
        let _ = agent.client.json("DELETE", &format!("/vms/{id}"), None);
    }

    let ratio = fc_first_line.as_ref().map(|fc| {
        round(
            first_line["p50"].as_f64().unwrap_or(f64::NAN) / fc["p50"].as_f64().unwrap_or(f64::NAN),
            2,
        )
    });
    emit(json!({
        "bench": "agent",
        "summary": {
            "get_vms_p50_ms": list["p50"], "get_vms_p99_ms": list["p99"],
            "create_and_start_p50_ms": answered["p50"], "create_and_start_p99_ms": answered["p99"],
            "first_line_p50_ms": first_line["p50"],
            "firecracker_first_line_p50_ms": fc_first_line.as_ref().map(|v| v["p50"].clone()),
            "first_line_vs_firecracker": ratio,
            "clones_per_s": round(per_s, 1),
        }
    }));
    Ok(ExitCode::SUCCESS)
}

fn start_agent(dir: &Path, kernel: &Path) -> Result<Agent, AgentBenchError> {
    let tokens = dir.join("tokens.json");
    std::fs::write(
        &tokens,
        json!({"tokens": [{"token": TOKEN, "tenant": "bench", "role": "admin"}]}).to_string(),
    )
    .map_err(|e| AgentBenchError::Setup(format!("cannot write {tokens:?}: {e}")))?;
    let sock = dir.join("api.sock");
    let state = dir.join("state");
    let log = std::fs::File::create(dir.join("agent.log"))
        .map_err(|e| AgentBenchError::Setup(e.to_string()))?;
    let exe = std::env::current_exe().map_err(|e| AgentBenchError::Setup(e.to_string()))?;
    let mut child = Command::new(exe)
        .arg("agent")
        .arg("--state-dir")
        .arg(&state)
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .arg("--tokens")
        .arg(&tokens)
        .arg("--kernel-dir")
        .arg(kernel.parent().unwrap_or(Path::new("/")))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| AgentBenchError::Agent(format!("cannot start it: {e}")))?;
    let deadline = Instant::now() + TIMEOUT;
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
            return Err(AgentBenchError::Agent(format!(
                "it ended ({status}): {log}"
            )));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(AgentBenchError::Agent("it does not serve".into()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(Agent {
        child,
        state,
        client: Client::unix(&sock, TOKEN),
    })
}

/// Waits until `console` holds a whole line; the time since `start`.
fn wait_for_line(console: &Path, start: Instant) -> Result<Duration, AgentBenchError> {
    loop {
        if std::fs::read(console).is_ok_and(|b| b.contains(&b'\n')) {
            return Ok(start.elapsed());
        }
        if start.elapsed() > TIMEOUT {
            return Err(AgentBenchError::Agent(format!(
                "no console line in {console:?} within {TIMEOUT:?}"
            )));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Firecracker's API path: process start, then boot source, machine
/// configuration and InstanceStart on its socket; the time to the
/// guest's first line on its standard output.
fn firecracker_first_line(
    fc: &Path,
    kernel: &Path,
    dir: &Path,
    i: usize,
) -> Result<Duration, AgentBenchError> {
    let sock = dir.join(format!("fc-{i}.sock"));
    let log = dir.join(format!("fc-{i}.log"));
    let err = |e: String| AgentBenchError::Firecracker(e);
    std::fs::File::create(&log).map_err(|e| err(e.to_string()))?;
    let mut cmd = Command::new(fc);
    cmd.arg("--api-sock")
        .arg(&sock)
        .args(["--no-seccomp", "--level", "Warn", "--log-path"])
        .arg(&log)
        .stderr(Stdio::null());
    let mut m = Measured::spawn(&mut cmd).map_err(|e| err(e.to_string()))?;
    let deadline = Instant::now() + TIMEOUT;
    let mut api = loop {
        match std::os::unix::net::UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_micros(200)),
            Err(e) => return Err(err(format!("its API socket: {e}"))),
        }
    };
    api.set_read_timeout(Some(TIMEOUT))
        .map_err(|e| err(e.to_string()))?;
    let calls = [
        (
            "/boot-source",
            json!({"kernel_image_path": kernel, "boot_args": "console=ttyS0 probe=tick:1000"}),
        ),
        (
            "/machine-config",
            json!({"vcpu_count": 1, "mem_size_mib": 64}),
        ),
        ("/actions", json!({"action_type": "InstanceStart"})),
    ];
    for (path, body) in calls {
        fc_put(&mut api, path, &body).map_err(|e| err(format!("PUT {path}: {e}")))?;
    }
    let took = m.wait_for(READY, TIMEOUT).map_err(|e| err(e.to_string()))?;
    m.kill();
    let _ = std::fs::remove_file(&sock);
    Ok(took)
}

/// One PUT on Firecracker's API (keep-alive); fails on a status >= 300.
fn fc_put(
    api: &mut std::os::unix::net::UnixStream,
    path: &str,
    body: &serde_json::Value,
) -> Result<(), String> {
    let body = body.to_string();
    let req = format!(
        "PUT {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nAccept: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    api.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = api.read(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the connection closed".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some((head, rest)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            if rest.len() >= len {
                let status: u16 = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                return if (200..300).contains(&status) {
                    Ok(())
                } else {
                    Err(format!("{head} {rest}"))
                };
            }
        }
    }
}
