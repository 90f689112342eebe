//! The `guests` part of `vmplant bench vnet`: two test guests
//! (tests/probe) on one VNET switch, in one `vmplant run --config` child
//! process of this binary, measure guest to guest (1) bulk TCP
//! throughput, checking that both ends' CRC32s match, (2) the median ping
//! RTT, and (3) raw frames per second of a burst of 64-byte frames, with
//! what the other guest received and the loss.
//!
//! Each measurement is one run of the pair (a few seconds: the sender
//! first waits with `serve:` so that the receiver is ready); each run is
//! bounded by [`RUN_LIMIT`], and a guest error line ends it early.
//! Prints one JSON line per measurement with `"setup":"guests"`.

use super::measure::{MeasureError, Measured, ScratchDir, describe_status, round};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Bytes moved by the TCP measurement.
pub const TCP_BYTES: u64 = 100_000_000;
/// Pings of the RTT measurement.
pub const PINGS: u32 = 200;
/// Frames of the burst, and their size.
pub const BURST_FRAMES: u64 = 200_000;
pub const BURST_SIZE: u32 = 64;
/// The longest one run of the pair may take.
pub const RUN_LIMIT: Duration = Duration::from_secs(60);

const MAC_A: &str = "52:54:00:00:00:0a";
const MAC_B: &str = "52:54:00:00:00:0b";
const IP_A: &str = "10.0.0.1";
const IP_B: &str = "10.0.0.2";
const TCP_PORT: u16 = 5001;

#[derive(Debug, thiserror::Error)]
pub enum GuestsError {
    #[error(
        "cannot find the repository (a directory with Cargo.toml and tests/probe) from the \
         current directory or the executable: pass --probe"
    )]
    NoRepo,
    #[error("no test guest at {0}: build it with tests/probe/build.sh, or pass --probe")]
    NoProbe(PathBuf),
    #[error("cannot tell which executable this is")]
    CurrentExe(#[source] std::io::Error),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Measure(#[from] MeasureError),
    #[error("{what}: the guests did not finish within {limit:?}; {tail}")]
    Timeout {
        what: &'static str,
        limit: Duration,
        tail: String,
    },
    #[error("{what}: vmplant run ended with {status}; {tail}")]
    Exit {
        what: &'static str,
        status: String,
        tail: String,
    },
    #[error("{what}: guest {vm} reported an error: {line}")]
    Guest {
        what: &'static str,
        vm: String,
        line: String,
    },
    #[error("{what}: no {kind:?} line from guest {vm}")]
    NoLine {
        what: &'static str,
        vm: &'static str,
        kind: &'static str,
    },
    #[error("{what}: guest {vm}'s {kind} line has no {field}: {line}")]
    NoField {
        what: &'static str,
        vm: &'static str,
        kind: &'static str,
        field: &'static str,
        line: String,
    },
    #[error("tcp: {detail}")]
    Corrupt { detail: String },
    #[error("ping: none of {sent} pings was answered")]
    NoReplies { sent: u64 },
}

type Result<T> = std::result::Result<T, GuestsError>;

/// Guest to guest TCP bulk transfer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TcpFigures {
    /// As the receiver measured it (first byte to FIN).
    pub mbit_s: f64,
    pub sender_mbit_s: f64,
    pub bytes: u64,
    /// The CRC32 both ends computed (they matched).
    pub crc32: u32,
}

/// Guest to guest ping.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PingFigures {
    pub sent: u64,
    pub received: u64,
    pub median_us: f64,
    pub min_us: f64,
    pub max_us: f64,
}

/// A raw frame burst from one guest to the other.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BurstFigures {
    pub sent: u64,
    pub sent_fps: f64,
    /// Burst frames the receiver counted.
    pub received: u64,
    /// The receiver's rate, first to last burst frame (None if fewer than
    /// two came).
    pub received_fps: Option<f64>,
}

impl BurstFigures {
    /// The share of sent frames that did not arrive, 0..=1.
    pub fn loss(&self) -> f64 {
        if self.sent == 0 {
            return 0.0;
        }
        1.0 - self.received.min(self.sent) as f64 / self.sent as f64
    }
}

/// All three measurements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GuestFigures {
    pub tcp: TcpFigures,
    pub ping: PingFigures,
    pub burst: BurstFigures,
}

impl GuestFigures {
    /// For the JSON summary.
    pub fn json(&self) -> Value {
        json!({
            "tcp_mbps": self.tcp.mbit_s.round(),
            "crc_match": true,
            "rtt_median_us": round(self.ping.median_us, 1),
            "burst_sent_fps": self.burst.sent_fps.round(),
            "burst_received_fps": self.burst.received_fps.map(f64::round),
            "burst_loss": round(self.burst.loss(), 4),
        })
    }

    /// For the plain summary line, e.g. `guests 1.1 Gbit/s 98 us burst
    /// 120k fps sent, 84k received (loss 30%)`.
    pub fn line(&self) -> String {
        let b = &self.burst;
        let rx = match b.received_fps {
            Some(f) => format!("{} received", kilo(f)),
            None => format!("{} frames received", b.received),
        };
        format!(
            "guests {:.2} Gbit/s {:.0} us burst {} fps sent, {rx} (loss {:.0}%)",
            self.tcp.mbit_s / 1e3,
            self.ping.median_us,
            kilo(b.sent_fps),
            b.loss() * 100.0
        )
    }
}

/// `120k`, `1.25M`.
fn kilo(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else {
        format!("{:.0}k", x / 1e3)
    }
}

/// The test guest: `probe`, else target/probe/probe.elf in the repository.
pub fn probe_path(probe: Option<&Path>) -> Result<PathBuf> {
    let p = match probe {
        Some(p) => p.to_path_buf(),
        None => super::boot::repo_root()
            .ok_or(GuestsError::NoRepo)?
            .join("target/probe/probe.elf"),
    };
    if !p.is_file() {
        return Err(GuestsError::NoProbe(p));
    }
    Ok(std::path::absolute(&p).unwrap_or(p))
}

/// Runs the three measurements, printing a JSON line for each.
pub fn run(probe: &Path) -> Result<GuestFigures> {
    let scratch = ScratchDir::new("vmplant-bench-guests")?;
    let pair = Pair { probe, scratch };

    let lines = pair.run(
        "tcp",
        &format!("tcp-bulk-recv:{TCP_PORT}:30"),
        &format!("serve:2+tcp-bulk-send:{IP_A}:{TCP_PORT}:{TCP_BYTES}"),
    )?;
    let tcp = tcp_figures(&lines)?;
    println!(
        "{}",
        json!({
            "bench": "vnet", "setup": "guests", "measure": "tcp", "host_load_1m": load_1m(),
            "path": "guest b -> guest a, one switch, one vmplant run process",
            "bytes": tcp.bytes, "mbit_s": round(tcp.mbit_s, 1),
            "sender_mbit_s": round(tcp.sender_mbit_s, 1),
            "crc32": format!("{:08x}", tcp.crc32), "crc_match": true,
        })
    );

    let lines = pair.run("ping", "serve:4", &format!("serve:1+ping:{IP_A}:{PINGS}"))?;
    let ping = ping_figures(&lines)?;
    println!(
        "{}",
        json!({
            "bench": "vnet", "setup": "guests", "measure": "ping", "host_load_1m": load_1m(),
            "path": "guest b -> guest a, one switch",
            "sent": ping.sent, "received": ping.received,
            "rtt_us_median": round(ping.median_us, 1),
            "rtt_us_min": round(ping.min_us, 1), "rtt_us_max": round(ping.max_us, 1),
        })
    );

    let mac_a = MAC_A.replace(':', "-");
    let lines = pair.run(
        "burst",
        &format!("count-rx:5:{BURST_FRAMES}"),
        &format!("serve:1+burst:{mac_a}:{BURST_FRAMES}:{BURST_SIZE}"),
    )?;
    let burst = burst_figures(&lines)?;
    println!(
        "{}",
        json!({
            "bench": "vnet", "setup": "guests", "measure": "burst", "host_load_1m": load_1m(),
            "path": "guest b -> guest a, one switch, raw frames",
            "frame_bytes": BURST_SIZE, "sent": burst.sent,
            "sent_fps": burst.sent_fps.round(), "received": burst.received,
            "received_fps": burst.received_fps.map(f64::round),
            "loss_pct": round(burst.loss() * 100.0, 2),
        })
    );
    Ok(GuestFigures { tcp, ping, burst })
}

/// Two probe guests, a (10.0.0.1) and b (10.0.0.2), on one switch.
struct Pair<'a> {
    probe: &'a Path,
    scratch: ScratchDir,
}

impl Pair<'_> {
    /// One `vmplant run --config` of the pair with these steps (between
    /// `net` and `shutdown`); the guests' JSON lines once it exited 0.
    fn run(&self, what: &'static str, a_steps: &str, b_steps: &str) -> Result<Vec<GuestLine>> {
        let vm = |name: &str, mac: &str, ip: &str, steps: &str| {
            json!({"name": name, "kernel": self.probe, "nets": [mac], "mem_mib": 64,
                   "cmdline": format!("console=ttyS0 probe=net:{ip}/24+{steps}+shutdown")})
        };
        let spec = json!({"vms": [vm("a", MAC_A, IP_A, a_steps), vm("b", MAC_B, IP_B, b_steps)]});
        run_config(self.scratch.path(), what, &spec)
    }
}

/// Runs the VMs `spec` describes (a `vmplant run --config` file) in a
/// child process of this binary, its log in `dir`/`what`.log; returns the
/// guests' JSON lines once it exited 0. A guest's error line, a non-zero
/// exit or [`RUN_LIMIT`] ends it with an error that quotes the last
/// console and log lines.
pub fn run_config(dir: &Path, what: &'static str, spec: &Value) -> Result<Vec<GuestLine>> {
    let config = dir.join(format!("{what}.json"));
    std::fs::write(&config, spec.to_string()).map_err(|source| GuestsError::Write {
        path: config.clone(),
        source,
    })?;
    let log = dir.join(format!("{what}.log"));
    let file = std::fs::File::create(&log).map_err(|source| GuestsError::Write {
        path: log.clone(),
        source,
    })?;
    let exe = std::env::current_exe().map_err(GuestsError::CurrentExe)?;
    let mut cmd = Command::new(exe);
    cmd.arg("run")
        .arg("--config")
        .arg(&config)
        .env("NO_COLOR", "1")
        .stderr(file);
    tracing::debug!(?cmd, "starting the guests");
    let mut proc = Measured::spawn(&mut cmd)?;
    let tail = |p: &Measured| tail_of(p.output(), &log);
    let deadline = Instant::now() + RUN_LIMIT;
    loop {
        let lines = guest_lines(&String::from_utf8_lossy(proc.output()));
        if let Some((vm, line)) = failure(&lines) {
            return Err(GuestsError::Guest { what, vm, line });
        }
        if proc.output_closed() {
            let status = proc.exit_status(Duration::from_secs(5));
            return match status {
                Some(s) if s.success() => Ok(lines),
                Some(s) => Err(GuestsError::Exit {
                    what,
                    status: describe_status(s),
                    tail: tail(&proc),
                }),
                None => Err(GuestsError::Exit {
                    what,
                    status: "its output closed but it did not exit within 5 s".into(),
                    tail: tail(&proc),
                }),
            };
        }
        let now = Instant::now();
        if now >= deadline {
            // `proc` is killed and reaped when dropped.
            return Err(GuestsError::Timeout {
                what,
                limit: RUN_LIMIT,
                tail: tail(&proc),
            });
        }
        proc.drain_for((deadline - now).min(Duration::from_millis(100)))?;
    }
}

/// The last console lines and log lines, for error messages.
fn tail_of(output: &[u8], log: &Path) -> String {
    let last = |text: &str, n: usize| {
        let v: Vec<&str> = text.lines().rev().take(n).collect();
        v.into_iter().rev().collect::<Vec<_>>().join(" / ")
    };
    let log = strip_ansi(&std::fs::read_to_string(log).unwrap_or_default());
    format!(
        "console ends: {}; log ends: {}",
        last(&String::from_utf8_lossy(output), 4),
        last(&log, 3)
    )
}

/// `text` without ANSI escape sequences (ESC `[` ... a letter).
pub(super) fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        if chars.next() == Some('[') {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        }
    }
    out
}

/// The host's 1-minute load average (the guests poll, so other work on
/// the host shows in their figures).
pub(super) fn load_1m() -> Option<f64> {
    parse_load(&std::fs::read_to_string("/proc/loadavg").ok()?)
}

fn parse_load(loadavg: &str) -> Option<f64> {
    loadavg.split_whitespace().next()?.parse().ok()
}

/// One JSON line of one guest's console.
#[derive(Debug, Clone, PartialEq)]
pub struct GuestLine {
    pub vm: String,
    pub value: Value,
}

/// The guests' JSON lines in `output` ("a: {...}"); other lines, and a
/// last line not yet complete, are skipped.
pub fn guest_lines(output: &str) -> Vec<GuestLine> {
    let complete = match output.rfind('\n') {
        Some(i) => &output[..i],
        None => "",
    };
    complete
        .lines()
        .filter_map(|l| {
            let (vm, rest) = l.split_once(": ")?;
            if vm.is_empty() || vm.contains(char::is_whitespace) {
                return None;
            }
            let value: Value = serde_json::from_str(rest.trim()).ok()?;
            value.get("probe")?;
            Some(GuestLine {
                vm: vm.into(),
                value,
            })
        })
        .collect()
}

/// The first line reporting a failure: a probe error or exception, or a
/// step's line with an `error` field.
pub fn failure(lines: &[GuestLine]) -> Option<(String, String)> {
    lines
        .iter()
        .find(|l| {
            matches!(l.value["probe"].as_str(), Some("error" | "exception"))
                || l.value.get("error").is_some()
        })
        .map(|l| (l.vm.clone(), l.value.to_string()))
}

/// The first line of kind `kind` (its `probe` field) from `vm`.
fn find<'a>(
    lines: &'a [GuestLine],
    what: &'static str,
    vm: &'static str,
    kind: &'static str,
) -> Result<&'a Value> {
    lines
        .iter()
        .find(|l| l.vm == vm && l.value["probe"] == kind)
        .map(|l| &l.value)
        .ok_or(GuestsError::NoLine { what, vm, kind })
}

/// A field of a guest's line, read by `get`.
fn field<T>(
    v: &Value,
    (what, vm, kind): (&'static str, &'static str, &'static str),
    name: &'static str,
    get: impl Fn(&Value) -> Option<T>,
) -> Result<T> {
    get(&v[name]).ok_or_else(|| GuestsError::NoField {
        what,
        vm,
        kind,
        field: name,
        line: v.to_string(),
    })
}

fn crc(v: &Value) -> Option<u32> {
    u32::from_str_radix(v.as_str()?, 16).ok()
}

/// b's `tcp-bulk-send` and a's `tcp-bulk-recv`: all bytes on both ends,
/// the same CRC32, the pattern intact.
pub fn tcp_figures(lines: &[GuestLine]) -> Result<TcpFigures> {
    let (s, r) = (("tcp", "b", "tcp-bulk-send"), ("tcp", "a", "tcp-bulk-recv"));
    let send = find(lines, s.0, s.1, s.2)?;
    let recv = find(lines, r.0, r.1, r.2)?;
    let sent = field(send, s, "bytes", Value::as_u64)?;
    let got = field(recv, r, "bytes", Value::as_u64)?;
    let send_crc = field(send, s, "crc32", crc)?;
    let recv_crc = field(recv, r, "crc32", crc)?;
    if sent != TCP_BYTES || got != TCP_BYTES {
        return Err(GuestsError::Corrupt {
            detail: format!("{TCP_BYTES} bytes to move, {sent} sent, {got} received"),
        });
    }
    if send_crc != recv_crc {
        return Err(GuestsError::Corrupt {
            detail: format!("CRC32 {send_crc:08x} sent, {recv_crc:08x} received"),
        });
    }
    if recv["pattern_ok"] == false {
        return Err(GuestsError::Corrupt {
            detail: "the receiver found the pattern broken".into(),
        });
    }
    Ok(TcpFigures {
        mbit_s: field(recv, r, "mbit_s", Value::as_f64)?,
        sender_mbit_s: field(send, s, "mbit_s", Value::as_f64)?,
        bytes: got,
        crc32: recv_crc,
    })
}

/// b's `ping` line.
pub fn ping_figures(lines: &[GuestLine]) -> Result<PingFigures> {
    let p = ("ping", "b", "ping");
    let v = find(lines, p.0, p.1, p.2)?;
    let sent = field(v, p, "sent", Value::as_u64)?;
    let received = field(v, p, "received", Value::as_u64)?;
    if received == 0 {
        return Err(GuestsError::NoReplies { sent });
    }
    Ok(PingFigures {
        sent,
        received,
        median_us: field(v, p, "rtt_us_median", Value::as_f64)?,
        min_us: field(v, p, "rtt_us_min", Value::as_f64)?,
        max_us: field(v, p, "rtt_us_max", Value::as_f64)?,
    })
}

/// b's `burst` and a's `rx` lines.
pub fn burst_figures(lines: &[GuestLine]) -> Result<BurstFigures> {
    let (s, r) = (("burst", "b", "burst"), ("burst", "a", "rx"));
    let send = find(lines, s.0, s.1, s.2)?;
    let recv = find(lines, r.0, r.1, r.2)?;
    let received = field(recv, r, "burst_frames", Value::as_u64)?;
    Ok(BurstFigures {
        sent: field(send, s, "sent", Value::as_u64)?,
        sent_fps: field(send, s, "fps", Value::as_f64)?,
        received,
        received_fps: recv["burst_fps"].as_f64().filter(|_| received >= 2),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "a: {\"probe\":\"ready\",\"vcpu\":0}\n\
        b: {\"probe\":\"ready\",\"vcpu\":0}\n\
        b: {\"probe\":\"net\",\"mac\":\"52:54:00:00:00:0b\",\"ip\":\"10.0.0.2/24\",\"link\":true}\n\
        noise from the VMM\n\
        b: {\"probe\":\"serve\",\"seconds\":2,\"rx\":3,\"tx\":1,\"device_errors\":0}\n\
        b: {\"probe\":\"tcp-bulk-send\",\"to\":\"10.0.0.1:5001\",\"bytes\":100000000,\"ns\":700000000,\"mbit_s\":1142.8,\"crc32\":\"9ae0daaf\",\"frames_tx\":68500}\n\
        a: {\"probe\":\"tcp-bulk-recv\",\"port\":5001,\"from\":\"10.0.0.2:49152\",\"bytes\":100000000,\"ns\":710000000,\"mbit_s\":1126.7,\"crc32\":\"9AE0DAAF\",\"pattern_ok\":true}\n\
        a: {\"probe\":\"shutdown\"}\n";

    #[test]
    fn strips_colours_and_reads_the_load() {
        assert_eq!(
            strip_ansi("\u{1b}[2mT\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m x"),
            "T  INFO x"
        );
        assert_eq!(strip_ansi("\u{1b}[33m WARN\u{1b}[0m x"), " WARN x");
        assert_eq!(parse_load("6.32 6.07 5.90 3/412 27925\n"), Some(6.32));
        assert_eq!(parse_load(""), None);
    }

    #[test]
    fn parses_the_consoles_lines() {
        let lines = guest_lines(TCP);
        assert_eq!(lines.len(), 7);
        assert_eq!(lines[0].vm, "a");
        assert_eq!(lines[2].value["mac"], "52:54:00:00:00:0b");
        // A last line without its newline is not read yet.
        let cut = &TCP[..TCP.len() - 5];
        assert_eq!(guest_lines(cut).len(), 6);
        assert!(guest_lines("").is_empty());
        assert!(guest_lines("a: not json\n: {\"probe\":\"x\"}\nx y: {\"probe\":1}\n").is_empty());
        assert!(failure(&lines).is_none());
    }

    #[test]
    fn tcp_needs_all_bytes_and_equal_crcs() {
        let t = tcp_figures(&guest_lines(TCP)).expect("figures");
        assert_eq!(
            t,
            TcpFigures {
                mbit_s: 1126.7,
                sender_mbit_s: 1142.8,
                bytes: TCP_BYTES,
                crc32: 0x9ae0daaf,
            }
        );
        let bad = TCP.replace("\"9AE0DAAF\"", "\"00000001\"");
        let e = tcp_figures(&guest_lines(&bad))
            .expect_err("crc")
            .to_string();
        assert_eq!(e, "tcp: CRC32 9ae0daaf sent, 00000001 received");
        let short = TCP.replace(
            "\"from\":\"10.0.0.2:49152\",\"bytes\":100000000",
            "\"bytes\":5",
        );
        let e = tcp_figures(&guest_lines(&short))
            .expect_err("short")
            .to_string();
        assert_eq!(
            e,
            "tcp: 100000000 bytes to move, 100000000 sent, 5 received"
        );
        let none = TCP.replace("a: {\"probe\":\"tcp-bulk-recv\"", "a: {\"probe\":\"other\"");
        let e = tcp_figures(&guest_lines(&none))
            .expect_err("none")
            .to_string();
        assert_eq!(e, "tcp: no \"tcp-bulk-recv\" line from guest a");
        let nocrc = TCP.replace(",\"crc32\":\"9ae0daaf\"", "");
        assert!(matches!(
            tcp_figures(&guest_lines(&nocrc)),
            Err(GuestsError::NoField {
                field: "crc32",
                vm: "b",
                ..
            })
        ));
    }

    #[test]
    fn errors_in_the_guests_are_found() {
        let e = "a: {\"probe\":\"ready\",\"vcpu\":0}\n\
                 b: {\"probe\":\"tcp-bulk-send\",\"to\":\"10.0.0.1:5001\",\"error\":\"connection refused\"}\n";
        let (vm, line) = failure(&guest_lines(e)).expect("a failure");
        assert_eq!(vm, "b");
        assert!(line.contains("connection refused"), "{line}");
        for l in [
            "a: {\"probe\":\"error\",\"msg\":\"unknown step x\"}\n",
            "b: {\"probe\":\"exception\",\"vcpu\":0,\"vector\":13}\n",
        ] {
            assert!(failure(&guest_lines(l)).is_some(), "{l}");
        }
    }

    #[test]
    fn ping_and_burst_figures() {
        let ping = "b: {\"probe\":\"ping\",\"to\":\"10.0.0.1\",\"sent\":200,\"received\":199,\
                    \"rtt_us_min\":61.5,\"rtt_us_avg\":80.2,\"rtt_us_max\":400.0,\"rtt_us_median\":75.25,\"rtt_us_first\":300}\n";
        let p = ping_figures(&guest_lines(ping)).expect("ping");
        assert_eq!((p.sent, p.received, p.median_us), (200, 199, 75.25));
        let lost = "b: {\"probe\":\"ping\",\"to\":\"10.0.0.1\",\"sent\":200,\"received\":0}\n";
        assert_eq!(
            ping_figures(&guest_lines(lost))
                .expect_err("no replies")
                .to_string(),
            "ping: none of 200 pings was answered"
        );
        let burst = "b: {\"probe\":\"burst\",\"to\":\"52:54:00:00:00:0a\",\"size\":64,\"sent\":200000,\"ns\":1000000000,\"fps\":200000.4,\"mbit_s\":102}\n\
                     a: {\"probe\":\"rx\",\"seconds\":5,\"frames\":140001,\"bytes\":1,\"burst_frames\":140000,\"burst_gaps\":60000,\"burst_ns\":1,\"burst_fps\":150000.0}\n";
        let b = burst_figures(&guest_lines(burst)).expect("burst");
        assert_eq!(
            b,
            BurstFigures {
                sent: 200_000,
                sent_fps: 200000.4,
                received: 140_000,
                received_fps: Some(150000.0),
            }
        );
        assert!((b.loss() - 0.3).abs() < 1e-9);
        let g = GuestFigures {
            tcp: tcp_figures(&guest_lines(TCP)).expect("tcp"),
            ping: p,
            burst: b,
        };
        assert_eq!(
            g.line(),
            "guests 1.13 Gbit/s 75 us burst 200k fps sent, 150k received (loss 30%)"
        );
        assert_eq!(g.json()["burst_loss"], 0.3);
        assert_eq!(g.json()["tcp_mbps"], 1127.0);
        // Nothing received: no rate, all lost.
        let none = burst.replace("\"burst_frames\":140000", "\"burst_frames\":0");
        let b = burst_figures(&guest_lines(&none)).expect("burst");
        assert_eq!((b.received_fps, b.loss()), (None, 1.0));
    }
}
