//! `vmplant bench vnet`: ping RTT and iperf3 TCP throughput between two
//! network namespaces through (a) a Linux bridge, (b) one VNET switch,
//! (c) two VNET switches joined by a UDP tunnel, (d) by a TLS tunnel
//! (certificates made with rcgen in a temporary directory); the time to
//! add and remove a rule and a tunnel; and the switch's own frames per
//! second between in-memory guest ports; and, between two test guests on
//! one switch in a `vmplant run` process, TCP throughput, ping RTT and raw
//! frames per second (see [`super::guests`]).
//!
//! The switches of (b)-(d) run as `vmplant vnet` processes (this binary),
//! one per switch, as the issue asks; or, with `--in-process`, in this
//! process (the vnet library: a reader thread per TAP, threads per
//! tunnel). The control and frame figures are always in-process. The setups and their namespaces
//! come from [`vnet::testbed`] and are removed on drop.
//! Needs root and `ip`, `ping`, `iperf3`, `ss`; no traffic leaves the
//! namespaces the benchmark makes (tunnels run over 127.0.0.1).
//!
//! Output: one JSON line per setup, one JSON summary with the issue's
//! goals, and a last plain line with the figures side by side.

use super::guests::{GuestFigures, GuestsError};
use super::measure::{
    MeasureError, Measured, ScratchDir, Stats, StatsOut, parse_schedstat_ns, round,
};
use crate::cli::CliResult;
use ::vnet::testbed::{
    IperfResult, LinuxBridge, NetNs, PingStats, TempPki, TestbedError, eventually, tap_into, unique,
};
use ::vnet::tunnel::{Endpoint, Proto, TlsConfig, TunnelState};
use ::vnet::{Mac, PortKind, Rule, Switch, SwitchConfig, Vnet, VnetConfig, VnetError};
use clap::{Args, ValueEnum};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where the switches run, as reported in the JSON lines.
const IN_PROCESS: &str = "in-process";
const PROCESSES: &str = "processes";
/// Goal: one switch adds at most this much RTT over the bridge (us).
const GOAL_ADDED_RTT_US: f64 = 20.0;
/// Goal: the UDP tunnel reaches at least this share of the bridge.
const GOAL_UDP_SHARE: f64 = 0.5;
/// Goal: rule and tunnel changes take less than this (us).
const GOAL_CHANGE_US: f64 = 1000.0;

#[derive(Debug, Args)]
pub struct VnetBenchArgs {
    /// iperf3 duration per setup, in seconds.
    #[arg(long, default_value_t = 5)]
    pub seconds: u32,
    /// Pings per setup, at 5 ms intervals (after single warm-up pings until
    /// one is answered).
    #[arg(long, default_value_t = 200)]
    pub pings: u32,
    /// The parts to run, in this order (udp9000: a UDP tunnel with a
    /// 9000-byte path MTU; tcp: a TCP tunnel).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "bridge,switch,udp,tls,control,frames,guests"
    )]
    pub only: Vec<Part>,
    /// The test guest of the guests part [default: target/probe/probe.elf
    /// in the repository].
    #[arg(long, value_name = "FILE")]
    pub probe: Option<PathBuf>,
    /// Run the switches of switch, udp, udp9000, tcp and tls in this
    /// process (the vnet library), not as `vmplant vnet` processes.
    #[arg(long)]
    pub in_process: bool,
}

impl VnetBenchArgs {
    fn switches(&self) -> &'static str {
        if self.in_process {
            IN_PROCESS
        } else {
            PROCESSES
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Part {
    Bridge,
    Switch,
    Udp,
    Udp9000,
    Tcp,
    Tls,
    Control,
    Frames,
    Guests,
}

impl Part {
    fn name(self) -> &'static str {
        match self {
            Part::Bridge => "bridge",
            Part::Switch => "switch",
            Part::Udp => "udp",
            Part::Udp9000 => "udp9000",
            Part::Tcp => "tcp",
            Part::Tls => "tls",
            Part::Control => "control",
            Part::Frames => "frames",
            Part::Guests => "guests",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VnetBenchError {
    #[error("--seconds must be at least 1")]
    NoSeconds,
    #[error("--pings must be at least 1")]
    NoPings,
    #[error("--only names {0} twice")]
    Duplicate(&'static str),
    #[error("the namespace setups need root")]
    NotRoot,
    #[error("cannot run {0}: is it installed?")]
    Missing(&'static str),
    #[error("the {0} tunnel did not come up within 5 s")]
    TunnelNotUp(&'static str),
    #[error(transparent)]
    Testbed(#[from] TestbedError),
    #[error("switch")]
    Vnet(#[from] VnetError),
    #[error("{0} failed")]
    Failed(String),
    #[error(transparent)]
    Measure(#[from] MeasureError),
    #[error(transparent)]
    Guests(#[from] GuestsError),
    #[error("cannot tell which executable this is")]
    CurrentExe(#[source] std::io::Error),
    #[error("cannot find a free port")]
    Port(#[source] std::io::Error),
    #[error("cannot create {path}")]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("vmplant vnet ({what}): {detail}; its log ends: {log}")]
    Process {
        what: String,
        detail: String,
        log: String,
    },
}

type Result<T> = std::result::Result<T, VnetBenchError>;

/// Ping and iperf3 through one setup.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PathFigures {
    pub rtt: PingStats,
    pub tcp: IperfResult,
}

impl PathFigures {
    /// The median RTT (the average if there is none), in us: on a shared
    /// host a few slow wake-ups make the average swing between runs.
    fn rtt_us(&self) -> f64 {
        self.rtt.median_ms.unwrap_or(self.rtt.avg_ms) * 1e3
    }
    fn gbps(&self) -> f64 {
        self.tcp.received_bps / 1e9
    }
}

/// Times of the control API, in microseconds (medians).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ControlFigures {
    pub add_rule_us: f64,
    pub remove_rule_us: f64,
    pub add_tunnel_us: f64,
    pub remove_tunnel_us: f64,
}

impl ControlFigures {
    fn slowest_us(&self) -> f64 {
        [
            self.add_rule_us,
            self.remove_rule_us,
            self.add_tunnel_us,
            self.remove_tunnel_us,
        ]
        .into_iter()
        .fold(0.0, f64::max)
    }
}

/// Everything the summary needs; a `None` is a part not run or failed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub bridge: Option<PathFigures>,
    pub switch: Option<PathFigures>,
    pub udp: Option<PathFigures>,
    pub udp9000: Option<PathFigures>,
    pub tcp: Option<PathFigures>,
    pub tls: Option<PathFigures>,
    pub control: Option<ControlFigures>,
    /// Millions of 64-byte frames per second through the switch alone.
    pub mfps: Option<f64>,
    /// Two test guests on one switch.
    pub guests: Option<GuestFigures>,
    /// Parts that failed.
    pub failed: Vec<&'static str>,
    /// Where the switches of (b)-(d) ran: in-process or processes.
    pub switches: &'static str,
}

/// A goal: met, missed, or not checkable (a part is missing).
fn goal(v: Option<bool>) -> Value {
    v.map_or(Value::Null, Value::Bool)
}

fn mark(v: Option<bool>) -> &'static str {
    match v {
        Some(true) => "met",
        Some(false) => "MISSED",
        None => "unchecked",
    }
}

impl Summary {
    /// (b) adds at most 20 us RTT over (a).
    fn goal_rtt(&self) -> Option<bool> {
        let (a, b) = (self.bridge?, self.switch?);
        Some(b.rtt_us() - a.rtt_us() <= GOAL_ADDED_RTT_US)
    }

    /// (c) reaches at least half of (a)'s throughput.
    fn goal_udp(&self) -> Option<bool> {
        Some(self.share(self.udp?)? >= GOAL_UDP_SHARE)
    }

    /// Rule and tunnel changes under 1 ms.
    fn goal_changes(&self) -> Option<bool> {
        Some(self.control?.slowest_us() < GOAL_CHANGE_US)
    }

    /// Throughput as a share of the bridge's.
    fn share(&self, p: PathFigures) -> Option<f64> {
        let a = self.bridge?;
        (a.tcp.received_bps > 0.0).then(|| p.tcp.received_bps / a.tcp.received_bps)
    }

    /// The JSON summary line.
    pub fn json(&self) -> Value {
        let path = |p: Option<PathFigures>| {
            p.map(|p| {
                json!({
                    "tcp_mbps": (p.tcp.received_bps / 1e6).round(),
                    "rtt_median_us": round(p.rtt_us(), 1),
                    "of_bridge": self.share(p).map(|s| round(s, 3)),
                })
            })
        };
        json!({
            "bench": "vnet",
            "summary": true,
            "switches": self.switches,
            "bridge": path(self.bridge),
            "switch": path(self.switch),
            "udp": path(self.udp),
            "udp9000": path(self.udp9000),
            "tcp": path(self.tcp),
            "tls": path(self.tls),
            "switch_added_rtt_us": self.bridge.zip(self.switch)
                .map(|(a, b)| round(b.rtt_us() - a.rtt_us(), 1)),
            "control_us": self.control.map(|c| json!({
                "add_rule": round(c.add_rule_us, 2), "remove_rule": round(c.remove_rule_us, 2),
                "add_tunnel": round(c.add_tunnel_us, 1), "remove_tunnel": round(c.remove_tunnel_us, 1),
            })),
            "switch_mfps": self.mfps.map(|m| round(m, 2)),
            "guests": self.guests.map(|g| g.json()),
            "goals": {
                "switch_added_rtt_le_20us": goal(self.goal_rtt()),
                "udp_ge_half_of_bridge": goal(self.goal_udp()),
                "changes_lt_1ms": goal(self.goal_changes()),
            },
            "failed": self.failed,
        })
    }

    /// The plain summary line, e.g. `vnet: bridge 6.6 Gbit/s 52 us |
    /// switch 5.2 Gbit/s (0.79x) +223 us [goal <= +20 us: MISSED] | ...`.
    pub fn line(&self) -> String {
        let mut parts = Vec::new();
        if let Some(a) = self.bridge {
            parts.push(format!(
                "bridge {:.1} Gbit/s {:.0} us",
                a.gbps(),
                a.rtt_us()
            ));
        }
        let tput = |name: &str, p: PathFigures| match self.share(p) {
            Some(s) => format!("{name} {:.1} Gbit/s ({s:.2}x)", p.gbps()),
            None => format!("{name} {:.1} Gbit/s", p.gbps()),
        };
        if let Some(b) = self.switch {
            let mut s = tput("switch", b);
            match self.bridge {
                Some(a) => s += &format!(" {:+.0} us", b.rtt_us() - a.rtt_us()),
                None => s += &format!(" {:.0} us", b.rtt_us()),
            }
            s += &format!(" [goal <= +20 us: {}]", mark(self.goal_rtt()));
            parts.push(s);
        }
        if let Some(c) = self.udp {
            parts.push(format!(
                "{} {:.0} us [goal >= 0.5x: {}]",
                tput("udp", c),
                c.rtt_us(),
                mark(self.goal_udp())
            ));
        }
        for (name, p) in [
            ("udp9000", self.udp9000),
            ("tcp", self.tcp),
            ("tls", self.tls),
        ] {
            if let Some(p) = p {
                parts.push(format!("{} {:.0} us", tput(name, p), p.rtt_us()));
            }
        }
        if let Some(c) = self.control {
            parts.push(format!(
                "rule {} us tunnel add {:.0} us remove {:.0} us [goal < 1 ms: {}]",
                short_us(c.add_rule_us.max(c.remove_rule_us)),
                c.add_tunnel_us,
                c.remove_tunnel_us,
                mark(self.goal_changes())
            ));
        }
        if let Some(m) = self.mfps {
            parts.push(format!("switch alone {m:.2} Mframes/s"));
        }
        if let Some(g) = self.guests {
            parts.push(g.line());
        }
        if !self.failed.is_empty() {
            parts.push(format!("FAILED: {}", self.failed.join(",")));
        }
        let at = match self.switches {
            PROCESSES => "in vmplant vnet processes",
            s => s,
        };
        format!("vnet (switches {at}; median RTT): {}", parts.join(" | "))
    }
}

/// Microseconds with one decimal below 10, none above.
fn short_us(us: f64) -> String {
    if us < 10.0 {
        format!("{us:.1}")
    } else {
        format!("{us:.0}")
    }
}

pub fn run(args: VnetBenchArgs) -> CliResult {
    if args.seconds == 0 {
        return Err(VnetBenchError::NoSeconds.into());
    }
    if args.pings == 0 {
        return Err(VnetBenchError::NoPings.into());
    }
    for (i, p) in args.only.iter().enumerate() {
        if args.only[..i].contains(p) {
            return Err(VnetBenchError::Duplicate(p.name()).into());
        }
    }
    let needs_netns = args
        .only
        .iter()
        .any(|p| !matches!(p, Part::Control | Part::Frames | Part::Guests));
    if needs_netns {
        preflight()?;
    }
    let mut sum = Summary {
        switches: args.switches(),
        ..Summary::default()
    };
    for &part in &args.only {
        tracing::info!(part = part.name(), "running");
        let done = match part {
            Part::Control => control().map(|c| sum.control = Some(c)),
            Part::Frames => frames().map(|m| sum.mfps = Some(m)),
            Part::Guests => super::guests::probe_path(args.probe.as_deref())
                .and_then(|p| super::guests::run(&p))
                .map(|g| sum.guests = Some(g))
                .map_err(VnetBenchError::from),
            _ => path(part, &args, &sum).map(|f| match part {
                Part::Bridge => sum.bridge = Some(f),
                Part::Switch => sum.switch = Some(f),
                Part::Udp => sum.udp = Some(f),
                Part::Udp9000 => sum.udp9000 = Some(f),
                Part::Tcp => sum.tcp = Some(f),
                _ => sum.tls = Some(f),
            }),
        };
        if let Err(e) = done {
            let cause = crate::cli::chain(&e);
            tracing::error!(part = part.name(), "{cause}");
            println!(
                "{}",
                json!({"bench": "vnet", "setup": part.name(), "error": cause})
            );
            sum.failed.push(part.name());
        }
    }
    println!("{}", sum.json());
    println!("{}", sum.line());
    if sum.failed.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(VnetBenchError::Failed(sum.failed.join(", ")).into())
    }
}

fn preflight() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Err(VnetBenchError::NotRoot);
    }
    for (prog, arg) in [
        ("ip", "-V"),
        ("ping", "-V"),
        ("iperf3", "--version"),
        ("ss", "-V"),
    ] {
        match ::vnet::testbed::run(&[prog, arg]) {
            Ok(out) if out.status.success() => {}
            _ => return Err(VnetBenchError::Missing(prog)),
        }
    }
    Ok(())
}

/// Builds one setup, measures it, prints its JSON line.
fn path(part: Part, args: &VnetBenchArgs, sum: &Summary) -> Result<PathFigures> {
    let net = |n: u8| (format!("10.99.{n}.1/24"), format!("10.99.{n}.2/24"));
    let f = match part {
        Part::Bridge => {
            let br = LinuxBridge::new()?;
            let (a, b) = (NetNs::new()?, NetNs::new()?);
            let (aa, ba) = net(130);
            br.attach(&a, &aa)?;
            br.attach(&b, &ba)?;
            measure(&a, &b, "10.99.130.2", args)?
        }
        Part::Switch if !args.in_process => {
            let (a, b) = (NetNs::new()?, NetNs::new()?);
            let scratch = ScratchDir::new("vmplant-bench-vnet")?;
            let (ta, tb) = (unique("vt"), unique("vt"));
            let _sw = SwitchProcess::start(&scratch, "switch", &["--tap", &ta, "--tap", &tb])?;
            wait_link(&ta)?;
            wait_link(&tb)?;
            let (aa, ba) = net(131);
            a.adopt(&ta, &aa)?;
            b.adopt(&tb, &ba)?;
            measure(&a, &b, "10.99.131.2", args)?
        }
        Part::Switch => {
            // Namespaces first, so that they go last: the switch removes
            // its TAPs before their namespaces are deleted.
            let (a, b) = (NetNs::new()?, NetNs::new()?);
            let v = Vnet::new(VnetConfig::default())?;
            let (aa, ba) = net(131);
            tap_into(&v, &a, &aa)?;
            tap_into(&v, &b, &ba)?;
            measure(&a, &b, "10.99.131.2", args)?
        }
        Part::Udp => two_switches(Proto::Udp, 0, 132, args)?,
        Part::Udp9000 => two_switches(Proto::Udp, 9000, 133, args)?,
        Part::Tcp => two_switches(Proto::Tcp, 0, 134, args)?,
        _ => two_switches(Proto::Tls, 0, 135, args)?,
    };
    let us = |ms: f64| round(ms * 1e3, 1);
    println!(
        "{}",
        json!({
            "bench": "vnet",
            "setup": part.name(),
            "switches": if part == Part::Bridge { "linux-bridge" } else { args.switches() },
            "tcp_mbps": (f.tcp.received_bps / 1e6).round(),
            "tcp_sender_mbps": (f.tcp.sent_bps / 1e6).round(),
            "retransmits": f.tcp.retransmits,
            "iperf_secs": args.seconds,
            "rtt_us": {
                "median": f.rtt.median_ms.map(us), "avg": us(f.rtt.avg_ms), "min": us(f.rtt.min_ms),
                "max": us(f.rtt.max_ms), "mdev": us(f.rtt.mdev_ms),
            },
            "pings": f.rtt.transmitted, "ping_lost": f.rtt.transmitted - f.rtt.received,
            "of_bridge": sum.share(f).map(|s| round(s, 3)),
        })
    );
    Ok(f)
}

/// Two switches in this process, B listening on 127.0.0.1, A connecting;
/// a namespace behind a TAP of each.
fn two_switches(
    proto: Proto,
    udp_mtu: usize,
    subnet: u8,
    args: &VnetBenchArgs,
) -> Result<PathFigures> {
    if !args.in_process {
        return two_processes(proto, udp_mtu, subnet, args);
    }
    // Dropped in reverse: the switches (with their TAPs and tunnels), then
    // the namespaces, then the certificates.
    let pki = match proto {
        Proto::Tls => Some(TempPki::new(2)?),
        _ => None,
    };
    let tls = |i: usize| -> Result<Option<TlsConfig>> {
        Ok(match &pki {
            Some(p) => Some(p.tls_config(i)?),
            None => None,
        })
    };
    let cfg = |tls: Option<TlsConfig>| VnetConfig {
        switch: SwitchConfig::default(),
        tls,
        udp_mtu,
        udp_key: None,
    };
    let (a, b) = (NetNs::new()?, NetNs::new()?);
    let va = Vnet::new(cfg(tls(0)?))?;
    let vb = Vnet::new(cfg(tls(1)?))?;
    let (_, addr) = vb.listen(Endpoint {
        proto,
        addr: "127.0.0.1:0".into(),
    })?;
    let id = va.connect(Endpoint {
        proto,
        addr: addr.to_string(),
    })?;
    if !tunnel_up(&va, id, 5) {
        return Err(VnetBenchError::TunnelNotUp(proto_name(proto)));
    }
    tap_into(&va, &a, &format!("10.99.{subnet}.1/24"))?;
    tap_into(&vb, &b, &format!("10.99.{subnet}.2/24"))?;
    measure(&a, &b, &format!("10.99.{subnet}.2"), args)
}

/// Two `vmplant vnet` processes, B listening on a free port of
/// 127.0.0.1, A connecting; a namespace behind a TAP of each.
fn two_processes(
    proto: Proto,
    udp_mtu: usize,
    subnet: u8,
    args: &VnetBenchArgs,
) -> Result<PathFigures> {
    let pki = match proto {
        Proto::Tls => Some(TempPki::new(2)?),
        _ => None,
    };
    let scratch = ScratchDir::new("vmplant-bench-vnet")?;
    let (a, b) = (NetNs::new()?, NetNs::new()?);
    let ep = format!("{}:127.0.0.1:{}", proto_name(proto), free_port(proto)?);
    let (ta, tb) = (unique("vt"), unique("vt"));
    let common = |i: usize| -> Vec<String> {
        let mut v = vec![];
        if udp_mtu != 0 {
            v.extend(["--udp-mtu".to_string(), udp_mtu.to_string()]);
        }
        if let Some(p) = &pki {
            let f = |name: String| p.dir().join(name).to_string_lossy().into_owned();
            v.extend([
                "--tls-cert".into(),
                f(format!("sw{i}.pem")),
                "--tls-key".into(),
                f(format!("sw{i}.key")),
                "--tls-ca".into(),
                f("ca.pem".into()),
            ]);
        }
        v
    };
    let argv = |tap: &str, role: &str, i: usize| {
        let mut v = vec!["--tap".to_string(), tap.into(), role.into(), ep.clone()];
        v.extend(common(i));
        v
    };
    let args_b = argv(&tb, "--listen", 1);
    let sb = SwitchProcess::start(&scratch, "b", &strs(&args_b))?;
    let args_a = argv(&ta, "--connect", 0);
    let mut sa = SwitchProcess::start(&scratch, "a", &strs(&args_a))?;
    sa.wait_for(r#""state":"up""#, Duration::from_secs(10))?;
    wait_link(&ta)?;
    wait_link(&tb)?;
    a.adopt(&ta, &format!("10.99.{subnet}.1/24"))?;
    b.adopt(&tb, &format!("10.99.{subnet}.2/24"))?;
    let f = measure(&a, &b, &format!("10.99.{subnet}.2"), args);
    drop((sa, sb));
    f
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A port of 127.0.0.1 free for `proto` now (bound, read, released).
fn free_port(proto: Proto) -> Result<u16> {
    let port = match proto {
        Proto::Udp => std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .map_err(VnetBenchError::Port)?
            .port(),
        _ => std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .map_err(VnetBenchError::Port)?
            .port(),
    };
    Ok(port)
}

/// Waits up to 5 s for host interface `name` to appear.
fn wait_link(name: &str) -> Result<()> {
    let exists =
        || ::vnet::testbed::run(&["ip", "link", "show", name]).is_ok_and(|o| o.status.success());
    if eventually(5, exists) {
        Ok(())
    } else {
        Err(TestbedError::NotReady(format!("no interface {name} after 5 s")).into())
    }
}

/// A `vmplant vnet` process (this binary) printing its status every
/// second, its log in a file; stopped with SIGTERM (its clean shutdown
/// deletes its TAPs), then killed if it lingers, when dropped.
struct SwitchProcess {
    what: String,
    proc: Option<Measured>,
    log: PathBuf,
}

impl SwitchProcess {
    fn start(scratch: &ScratchDir, what: &str, args: &[&str]) -> Result<SwitchProcess> {
        let exe = std::env::current_exe().map_err(VnetBenchError::CurrentExe)?;
        let log = scratch.path().join(format!("{what}.log"));
        let file = std::fs::File::create(&log).map_err(|source| VnetBenchError::Log {
            path: log.clone(),
            source,
        })?;
        let mut cmd = Command::new(exe);
        cmd.arg("vnet")
            .args(args)
            .args(["--status-every", "1"])
            .stderr(file);
        tracing::debug!(?cmd, "starting a switch process");
        Ok(SwitchProcess {
            what: what.into(),
            proc: Some(Measured::spawn(&mut cmd)?),
            log,
        })
    }

    /// Reads its status lines until `needle` appears.
    fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let Some(p) = self.proc.as_mut() else {
            return Ok(());
        };
        p.wait_for(needle, timeout).map(drop).map_err(|e| {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(3).collect();
            VnetBenchError::Process {
                what: self.what.clone(),
                detail: crate::cli::chain(&e),
                log: tail.into_iter().rev().collect::<Vec<_>>().join(" / "),
            }
        })
    }
}

impl Drop for SwitchProcess {
    fn drop(&mut self) {
        let Some(mut p) = self.proc.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(p.pid()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        // Until its standard output closes (it exits), at most 3 s; then
        // `Measured` kills and reaps it.
        let _ = p.wait_for("\0", Duration::from_secs(3));
    }
}

fn proto_name(p: Proto) -> &'static str {
    match p {
        Proto::Udp => "udp",
        Proto::Tcp => "tcp",
        Proto::Tls => "tls",
    }
}

fn tunnel_up(v: &Vnet, id: u64, secs: u64) -> bool {
    eventually(secs, || {
        v.tunnels()
            .iter()
            .any(|t| t.id == id && t.state == TunnelState::Up)
    })
}

/// Warm-up pings until one is answered (ARP, learning, a switch process
/// getting ready), `--pings` pings at 5 ms, then iperf3.
fn measure(a: &NetNs, b: &NetNs, peer: &str, args: &VnetBenchArgs) -> Result<PathFigures> {
    let mut warm = a.ping_stats(peer, 1, 0.2);
    for _ in 0..4 {
        if warm.is_ok() {
            break;
        }
        warm = a.ping_stats(peer, 1, 0.2);
    }
    warm?;
    let rtt = a.ping_stats(peer, args.pings, 0.005)?;
    b.iperf_server()?;
    let tcp = a.iperf_client(peer, args.seconds)?;
    Ok(PathFigures { rtt, tcp })
}

/// A port that takes frames and drops them (rule targets).
struct Null;

impl vnet::PortSink for Null {
    fn send(&self, _: &dyn vnet::Frame) -> std::result::Result<(), vnet::DropReason> {
        Ok(())
    }
}

/// Tunnels added and removed by `control`.
const TUNNEL_ROUNDS: usize = 10;

/// Adds and removes 1000 rules one at a time, then a UDP tunnel
/// [`TUNNEL_ROUNDS`] times (to a listener of a second switch); medians of
/// each operation.
fn control() -> Result<ControlFigures> {
    let (va, vb) = (
        Vnet::new(VnetConfig::default())?,
        Vnet::new(VnetConfig::default())?,
    );
    let (_, l) = vb.listen(Endpoint {
        proto: Proto::Udp,
        addr: "127.0.0.1:0".into(),
    })?;
    let port = va.add_port("null", PortKind::Other, Arc::new(Null));
    let n = 1000u32;
    let mut add_rule = Vec::with_capacity(n as usize);
    let mut remove_rule = Vec::with_capacity(n as usize);
    for i in 0..n {
        let t = Instant::now();
        va.add_rule(Rule {
            dst: Mac::local(i),
            vlan: None,
            port,
        })?;
        add_rule.push(us(t.elapsed()));
    }
    for i in 0..n {
        let t = Instant::now();
        va.remove_rule(Mac::local(i), None)?;
        remove_rule.push(us(t.elapsed()));
    }
    let (mut add_tunnel, mut up, mut remove_tunnel) = (vec![], vec![], vec![]);
    for _ in 0..TUNNEL_ROUNDS {
        let t = Instant::now();
        let id = va.connect(Endpoint {
            proto: Proto::Udp,
            addr: l.to_string(),
        })?;
        add_tunnel.push(us(t.elapsed()));
        if !tunnel_up(&va, id, 5) {
            return Err(VnetBenchError::TunnelNotUp("udp"));
        }
        up.push(us(t.elapsed()));
        let t = Instant::now();
        va.remove_tunnel(id)?;
        remove_tunnel.push(us(t.elapsed()));
    }
    let stats = |v: &[f64]| {
        Stats::of(v).unwrap_or(Stats {
            median: f64::NAN,
            min: f64::NAN,
            max: f64::NAN,
        })
    };
    let out = |v: &[f64], d| -> StatsOut { stats(v).rounded(d) };
    println!(
        "{}",
        json!({
            "bench": "vnet", "setup": "control", "switches": IN_PROCESS, "unit": "us",
            "add_rule": out(&add_rule, 2), "remove_rule": out(&remove_rule, 2), "rules": n,
            "add_tunnel": out(&add_tunnel, 1), "tunnel_up": out(&up, 0),
            "remove_tunnel": out(&remove_tunnel, 1), "tunnels": add_tunnel.len(),
            "note": "tunnel_up: connect to up, polled every 20 ms",
        })
    );
    Ok(ControlFigures {
        add_rule_us: stats(&add_rule).median,
        remove_rule_us: stats(&remove_rule).median,
        add_tunnel_us: stats(&add_tunnel).median,
        remove_tunnel_us: stats(&remove_tunnel).median,
    })
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// A guest-like sink: copies each frame out whole (as into a guest's RX
/// buffer) and counts it.
struct CopySink {
    frames: std::sync::atomic::AtomicU64,
}

impl vnet::PortSink for CopySink {
    fn send(&self, f: &dyn vnet::Frame) -> std::result::Result<(), vnet::DropReason> {
        let mut buf = [0u8; 1514];
        let n = f.read_at(0, &mut buf);
        std::hint::black_box(&buf[..n]);
        self.frames
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

/// CPU time of the calling thread, from /proc/thread-self/schedstat.
fn thread_cpu() -> Option<Duration> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    parse_schedstat_ns(&s).map(Duration::from_nanos)
}

/// Frames per second through `Switch::ingress` between two in-memory
/// guest ports (no I/O): 64-byte then 1514-byte frames, about 0.5 s each.
/// Returns the 64-byte Mframes/s.
fn frames() -> Result<f64> {
    let sw = Switch::new(SwitchConfig::default()).map_err(VnetError::from)?;
    let sinks: Vec<_> = (0..2)
        .map(|_| {
            Arc::new(CopySink {
                frames: Default::default(),
            })
        })
        .collect();
    let ids: Vec<_> = sinks
        .iter()
        .map(|c| sw.add_port("guest", PortKind::Guest, c.clone()))
        .collect();
    let (a, b) = (Mac::local(1), Mac::local(2));
    let mut mfps64 = 0.0;
    for size in [64usize, 1514] {
        let ab = vnet::frame::build_frame(b, a, 0x0800, &vec![0; size - 14]);
        let ba = vnet::frame::build_frame(a, b, 0x0800, &vec![0; size - 14]);
        // Learn both MACs, so that what follows is unicast.
        sw.ingress_bytes(ids[0], &ab);
        sw.ingress_bytes(ids[1], &ba);
        let before: u64 = sinks
            .iter()
            .map(|s| s.frames.load(std::sync::atomic::Ordering::Relaxed))
            .sum();
        let (c0, t) = (thread_cpu(), Instant::now());
        let mut n = 0u64;
        while t.elapsed() < Duration::from_millis(500) {
            for _ in 0..1000 {
                sw.ingress_bytes(ids[0], &ab);
                sw.ingress_bytes(ids[1], &ba);
            }
            n += 2000;
        }
        let wall = t.elapsed().as_secs_f64();
        let cpu = thread_cpu().zip(c0).map(|(c1, c0)| (c1 - c0).as_secs_f64());
        let after: u64 = sinks
            .iter()
            .map(|s| s.frames.load(std::sync::atomic::Ordering::Relaxed))
            .sum();
        let mfps = n as f64 / wall / 1e6;
        if size == 64 {
            mfps64 = mfps;
        }
        println!(
            "{}",
            json!({
                "bench": "vnet", "setup": "frames", "switches": IN_PROCESS,
                "ports": "2 in-memory guest ports, whole-frame copy",
                "frame_bytes": size, "frames": n, "delivered": after - before,
                "mfps": round(mfps, 2),
                "gbps": round(mfps * 1e6 * size as f64 * 8.0 / 1e9, 2),
                "ns_per_frame": round(wall * 1e9 / n as f64, 0),
                "cpu_ns_per_frame": cpu.map(|c| round(c * 1e9 / n as f64, 0)),
            })
        );
    }
    Ok(mfps64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(rtt_us: f64, gbps: f64) -> Option<PathFigures> {
        Some(PathFigures {
            rtt: PingStats {
                transmitted: 200,
                received: 200,
                min_ms: rtt_us / 2e3,
                avg_ms: rtt_us / 1e3,
                max_ms: rtt_us / 5e2,
                mdev_ms: 0.01,
                median_ms: None,
            },
            tcp: IperfResult {
                received_bps: gbps * 1e9,
                sent_bps: gbps * 1e9,
                retransmits: 0,
            },
        })
    }

    fn full() -> Summary {
        Summary {
            bridge: path(52.0, 6.6),
            switch: path(275.0, 5.2),
            udp: path(264.0, 4.9),
            tls: path(81.0, 5.7),
            control: Some(ControlFigures {
                add_rule_us: 0.1,
                remove_rule_us: 0.08,
                add_tunnel_us: 89.0,
                remove_tunnel_us: 152.0,
            }),
            mfps: Some(1.5),
            switches: IN_PROCESS,
            ..Summary::default()
        }
    }

    #[test]
    fn summary_line_has_the_figures_and_goals() {
        assert_eq!(
            full().line(),
            "vnet (switches in-process; median RTT): bridge 6.6 Gbit/s 52 us | \
             switch 5.2 Gbit/s (0.79x) +223 us [goal <= +20 us: MISSED] | \
             udp 4.9 Gbit/s (0.74x) 264 us [goal >= 0.5x: met] | \
             tls 5.7 Gbit/s (0.86x) 81 us | \
             rule 0.1 us tunnel add 89 us remove 152 us [goal < 1 ms: met] | \
             switch alone 1.50 Mframes/s"
        );
    }

    #[test]
    fn summary_marks_goals_and_failures() {
        let mut s = full();
        s.switch = path(60.0, 6.0);
        s.udp = None;
        s.failed.push("udp");
        s.control = s.control.map(|c| ControlFigures {
            remove_tunnel_us: 1500.0,
            ..c
        });
        let line = s.line();
        assert!(line.contains("+8 us [goal <= +20 us: met]"), "{line}");
        assert!(
            line.contains("remove 1500 us [goal < 1 ms: MISSED]"),
            "{line}"
        );
        assert!(line.ends_with("| FAILED: udp"), "{line}");
        let j = s.json();
        assert_eq!(j["goals"]["switch_added_rtt_le_20us"], true);
        assert_eq!(j["goals"]["udp_ge_half_of_bridge"], Value::Null);
        assert_eq!(j["goals"]["changes_lt_1ms"], false);
        assert_eq!(j["switch_added_rtt_us"], 8.0);
        assert_eq!(j["tls"]["of_bridge"], 0.864);
        // The median RTT when ping gave one, not the average.
        let mut s = full();
        if let Some(b) = s.switch.as_mut() {
            b.rtt.median_ms = Some(0.070);
        }
        assert_eq!(s.json()["switch_added_rtt_us"], 18.0);
        assert!(s.line().contains("+18 us [goal <= +20 us: met]"));
        assert_eq!(j["failed"][0], "udp");
    }

    #[test]
    fn summary_without_a_bridge_has_no_ratios() {
        let s = Summary {
            switch: path(80.0, 5.0),
            switches: IN_PROCESS,
            ..Summary::default()
        };
        assert_eq!(
            s.line(),
            "vnet (switches in-process; median RTT): switch 5.0 Gbit/s 80 us [goal <= +20 us: unchecked]"
        );
        assert_eq!(s.json()["switch"]["of_bridge"], Value::Null);
    }
}
