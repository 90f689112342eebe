//! A test bed of real Linux peers, shared by the tests, and by
//! `vmplant bench vnet`: network namespaces, veth pairs, a Linux bridge,
//! TAP ports moved into namespaces, `ping` and `iperf3` runs with their
//! output parsed, and a throwaway PKI for TLS tunnels.
//!
//! Needs root and the `ip`, `ping`, `iperf3` and `ss` programs. Every
//! name is unique to the process ([`unique`]); everything made here is
//! removed when its guard ([`NetNs`], [`LinkGuard`], [`LinuxBridge`],
//! [`TempPki`]) is dropped, also when a test or a benchmark fails. Bad
//! output from the programs is an error, never a panic.

use crate::node::{Vnet, VnetError};
use crate::switch::PortId;
use crate::tunnel::TlsConfig;
use crate::tunnel::tls::TlsError;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Errors of the test bed.
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    #[error("cannot start {cmd}: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{cmd} failed ({status}): {output}")]
    Failed {
        cmd: String,
        status: String,
        output: String,
    },
    #[error("{0}")]
    NotReady(String),
    #[error("unexpected ping output: {0}")]
    PingOutput(String),
    #[error("ping to {addr}: {received} of {transmitted} replies")]
    PingLoss {
        addr: String,
        transmitted: u32,
        received: u32,
    },
    #[error("unexpected iperf3 output: {0}")]
    IperfOutput(String),
    #[error("iperf3: {0}")]
    Iperf(String),
    #[error("cannot make certificates: {0}")]
    Pki(#[from] rcgen::Error),
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS configuration")]
    Tls(#[from] TlsError),
    #[error("switch")]
    Vnet(#[from] VnetError),
}

pub type Result<T> = std::result::Result<T, TestbedError>;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A name no other caller (or process) uses: prefix, pid, sequence. Short
/// enough for an interface name (15 bytes) with a prefix of up to 3.
pub fn unique(prefix: &str) -> String {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}

/// Runs `args` (program and arguments) to the end and returns its output,
/// whatever its exit status.
pub fn run(args: &[&str]) -> Result<Output> {
    let (prog, rest) = args.split_first().ok_or_else(|| TestbedError::Spawn {
        cmd: String::new(),
        source: std::io::Error::other("empty command"),
    })?;
    Command::new(prog)
        .args(rest)
        .output()
        .map_err(|source| TestbedError::Spawn {
            cmd: args.join(" "),
            source,
        })
}

/// Runs `args`; its standard output, or an error when it fails.
pub fn must(args: &[&str]) -> Result<String> {
    checked(args, run(args)?)
}

fn checked(args: &[&str], out: Output) -> Result<String> {
    if !out.status.success() {
        return Err(TestbedError::Failed {
            cmd: args.join(" "),
            status: out.status.to_string(),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
            .trim()
            .to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace with its loopback up and IPv6 off (no router and
/// neighbour solicitations in counts); deleted on drop, with an iperf3
/// server started in it.
pub struct NetNs {
    pub name: String,
    pidfile: PathBuf,
}

impl NetNs {
    pub fn new() -> Result<NetNs> {
        let name = unique("vnt");
        must(&["ip", "netns", "add", &name])?;
        let ns = NetNs {
            pidfile: std::env::temp_dir().join(format!("{name}.iperf.pid")),
            name,
        };
        ns.exec_ok(&["ip", "link", "set", "lo", "up"])?;
        ns.exec_ok(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])?;
        ns.exec_ok(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"])?;
        Ok(ns)
    }

    fn argv<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec!["ip", "netns", "exec", &self.name];
        v.extend_from_slice(args);
        v
    }

    /// Runs `args` in this namespace; its output whatever its status.
    pub fn exec(&self, args: &[&str]) -> Result<Output> {
        run(&self.argv(args))
    }

    /// Runs `args` in this namespace; its standard output, or an error
    /// when it fails.
    pub fn exec_ok(&self, args: &[&str]) -> Result<String> {
        must(&self.argv(args))
    }

    /// Moves host interface `dev` here, gives it `addr` (CIDR), sets it up.
    pub fn adopt(&self, dev: &str, addr: &str) -> Result<()> {
        must(&["ip", "link", "set", dev, "netns", &self.name])?;
        self.exec_ok(&["ip", "addr", "add", addr, "dev", dev])?;
        self.exec_ok(&["ip", "link", "set", dev, "up"])?;
        Ok(())
    }

    /// `ping -c n -i 0.2` to `addr`; the average RTT in ms. Every reply
    /// must come back.
    pub fn ping(&self, addr: &str, n: u32) -> Result<f64> {
        let stats = self.ping_stats(addr, n, 0.2)?;
        if stats.received < stats.transmitted {
            return Err(TestbedError::PingLoss {
                addr: addr.into(),
                transmitted: stats.transmitted,
                received: stats.received,
            });
        }
        Ok(stats.avg_ms)
    }

    /// `ping -c count -i interval` to `addr` (intervals below 0.2 s need
    /// root); its statistics, with the median of the replies. Some replies may be lost, not all.
    pub fn ping_stats(&self, addr: &str, count: u32, interval: f64) -> Result<PingStats> {
        let limit = (f64::from(count) * interval) as u64 + 10;
        let out = self.exec(&[
            "timeout",
            &limit.to_string(),
            "ping",
            "-c",
            &count.to_string(),
            "-i",
            &format!("{interval}"),
            "-W",
            "2",
            addr,
        ])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let stats = parse_ping(&text).map_err(|e| match out.status.success() {
            true => e,
            false => TestbedError::Failed {
                cmd: format!("ping {addr} in {}", self.name),
                status: out.status.to_string(),
                output: format!("{text}{}", String::from_utf8_lossy(&out.stderr)),
            },
        })?;
        if stats.received == 0 {
            return Err(TestbedError::PingLoss {
                addr: addr.into(),
                transmitted: stats.transmitted,
                received: stats.received,
            });
        }
        Ok(stats)
    }

    /// Starts a one-shot iperf3 server here (killed on drop if it is still
    /// running) and waits until it listens.
    pub fn iperf_server(&self) -> Result<()> {
        self.stop_iperf_server();
        let pidfile = self.pidfile.to_string_lossy();
        self.exec_ok(&["iperf3", "-s", "-D", "-1", "-I", &pidfile])?;
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            let out = self.exec_ok(&["ss", "-ltn"])?;
            if out.contains(":5201") {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(TestbedError::NotReady(format!(
            "the iperf3 server in {} does not listen after 5 s",
            self.name
        )))
    }

    /// Runs an iperf3 TCP client to `addr` for `secs`; its result.
    pub fn iperf_client(&self, addr: &str, secs: u32) -> Result<IperfResult> {
        let out = self.exec(&[
            "timeout",
            &(secs + 20).to_string(),
            "iperf3",
            "-c",
            addr,
            "-t",
            &secs.to_string(),
            "-J",
        ])?;
        let text = String::from_utf8_lossy(&out.stdout);
        match parse_iperf3(&text) {
            Err(e) if !out.status.success() && !matches!(e, TestbedError::Iperf(_)) => {
                Err(TestbedError::Failed {
                    cmd: format!("iperf3 -c {addr} in {}", self.name),
                    status: out.status.to_string(),
                    output: format!("{text}{}", String::from_utf8_lossy(&out.stderr)),
                })
            }
            r => r,
        }
    }

    fn stop_iperf_server(&self) {
        if let Ok(pid) = std::fs::read_to_string(&self.pidfile) {
            if let Ok(pid) = pid.trim().parse::<i32>()
                && pid > 0
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let _ = std::fs::remove_file(&self.pidfile);
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        self.stop_iperf_server();
        if let Err(e) = must(&["ip", "netns", "del", &self.name]) {
            tracing::warn!(ns = %self.name, "cannot delete namespace: {e}");
        }
    }
}

/// A host interface deleted on drop if it still exists (in the host
/// namespace; moved ones go with their namespace).
pub struct LinkGuard(pub String);

impl Drop for LinkGuard {
    fn drop(&mut self) {
        let _ = run(&["ip", "link", "del", &self.0]);
    }
}

/// A Linux bridge `br0` in a namespace of its own; namespaces join it
/// through veth pairs. Removed (with the veths) on drop.
pub struct LinuxBridge {
    ns: NetNs,
}

impl LinuxBridge {
    pub fn new() -> Result<LinuxBridge> {
        let ns = NetNs::new()?;
        ns.exec_ok(&["ip", "link", "add", "br0", "type", "bridge"])?;
        ns.exec_ok(&["ip", "link", "set", "br0", "up"])?;
        Ok(LinuxBridge { ns })
    }

    /// Joins `ns` to the bridge with a veth pair; its end in `ns` gets
    /// `addr` (CIDR).
    pub fn attach(&self, ns: &NetNs, addr: &str) -> Result<()> {
        let (v, p) = (unique("vb"), unique("vp"));
        let _guard = LinkGuard(v.clone());
        must(&["ip", "link", "add", &v, "type", "veth", "peer", "name", &p])?;
        must(&["ip", "link", "set", &p, "netns", &self.ns.name])?;
        self.ns
            .exec_ok(&["ip", "link", "set", &p, "master", "br0"])?;
        self.ns.exec_ok(&["ip", "link", "set", &p, "up"])?;
        ns.adopt(&v, addr)
    }
}

/// Adds a TAP port to `v`, moves it into `ns` and gives it `addr` (CIDR).
/// The TAP goes when the port is removed or `v` is dropped.
pub fn tap_into(v: &Vnet, ns: &NetNs, addr: &str) -> Result<(PortId, String)> {
    let name = unique("vt");
    let id = v.add_tap(&name)?;
    ns.adopt(&name, addr)?;
    Ok((id, name))
}

/// What `ping -q` reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PingStats {
    pub transmitted: u32,
    pub received: u32,
    pub min_ms: f64,
    pub avg_ms: f64,
    pub max_ms: f64,
    /// The standard deviation (iputils' `mdev`; 0 when not given).
    pub mdev_ms: f64,
    /// The median of the replies' `time=` (None when ping ran with `-q`).
    pub median_ms: Option<f64>,
}

/// Parses the summary of iputils or busybox `ping`:
///
/// ```text
/// 200 packets transmitted, 200 received, 0% packet loss, time 1194ms
/// rtt min/avg/max/mdev = 0.031/0.052/0.101/0.011 ms
/// ```
pub fn parse_ping(out: &str) -> Result<PingStats> {
    let bad = |why: &str| TestbedError::PingOutput(format!("{why} in {:?}", out.trim()));
    let counts = out
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .ok_or_else(|| bad("no packet counts"))?;
    let mut fields = counts.split(',');
    let mut first_number = |what: &str| -> Result<u32> {
        fields
            .next()
            .and_then(|f| f.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| bad(what))
    };
    let transmitted = first_number("no transmitted count")?;
    let received = first_number("no received count")?;
    let Some(rtt) = out.lines().find(|l| l.contains("min/avg/max")) else {
        if received == 0 {
            // No replies, no RTT line: the loss is the news.
            let nan = f64::NAN;
            return Ok(PingStats {
                transmitted,
                received,
                min_ms: nan,
                avg_ms: nan,
                max_ms: nan,
                mdev_ms: nan,
                median_ms: None,
            });
        }
        return Err(bad("no rtt line"));
    };
    let values = rtt
        .split_once('=')
        .map(|(_, v)| v.trim())
        .ok_or_else(|| bad("no '=' in the rtt line"))?;
    let values = values.strip_suffix("ms").unwrap_or(values).trim();
    let nums = values
        .split('/')
        .map(|v| v.trim().parse::<f64>())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| bad("a number that does not parse in the rtt line"))?;
    if nums.len() < 3 {
        return Err(bad("fewer than 3 numbers in the rtt line"));
    }
    Ok(PingStats {
        transmitted,
        received,
        min_ms: nums[0],
        avg_ms: nums[1],
        max_ms: nums[2],
        mdev_ms: nums.get(3).copied().unwrap_or(0.0),
        median_ms: median(reply_times(out)),
    })
}

/// The `time=` of each reply line (`64 bytes from ...: icmp_seq=1 ttl=64
/// time=0.052 ms`), in ms; lines without a number there are skipped.
pub fn reply_times(out: &str) -> Vec<f64> {
    out.lines()
        .filter_map(|l| {
            let t = &l[l.find("time=")? + 5..];
            t.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

/// The median of some numbers (None when there are none).
fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| !x.is_nan());
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// What an iperf3 TCP client run reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IperfResult {
    /// Throughput at the receiver, bits/s.
    pub received_bps: f64,
    /// Throughput at the sender, bits/s.
    pub sent_bps: f64,
    /// TCP retransmissions at the sender (0 when not given).
    pub retransmits: u64,
}

/// Parses `iperf3 -c ... -J` output (`end.sum_received`, `end.sum_sent`);
/// iperf3's own `error` field becomes [`TestbedError::Iperf`].
pub fn parse_iperf3(json: &str) -> Result<IperfResult> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| {
        let head: String = json.trim().chars().take(200).collect();
        TestbedError::IperfOutput(format!("not JSON ({e}): {head:?}"))
    })?;
    if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
        return Err(TestbedError::Iperf(err.into()));
    }
    let bps = |sum: &str| {
        v["end"][sum]["bits_per_second"]
            .as_f64()
            .ok_or_else(|| TestbedError::IperfOutput(format!("no end.{sum}.bits_per_second")))
    };
    Ok(IperfResult {
        received_bps: bps("sum_received")?,
        sent_bps: bps("sum_sent")?,
        retransmits: v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
    })
}

/// PEM certificate, key, and CA for one switch.
#[derive(Clone, Debug)]
pub struct Pem {
    pub cert: String,
    pub key: String,
    pub ca: String,
}

impl Pem {
    /// The TLS configuration of a switch with these certificates.
    pub fn tls_config(&self) -> Result<TlsConfig> {
        Ok(TlsConfig::from_pem(
            self.cert.as_bytes(),
            self.key.as_bytes(),
            self.ca.as_bytes(),
        )?)
    }
}

/// A fresh CA and `n` switch certificates it signs (names `vnet` and
/// 127.0.0.1), generated with rcgen.
pub fn pki(n: usize) -> Result<Vec<Pem>> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut p = CertificateParams::new(vec![])?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(p, KeyPair::generate()?)?;
    (0..n)
        .map(|_| {
            let key = KeyPair::generate()?;
            let cp = CertificateParams::new(vec!["vnet".to_string(), "127.0.0.1".to_string()])?;
            let cert = cp.signed_by(&key, &ca)?;
            Ok(Pem {
                cert: cert.pem(),
                key: key.serialize_pem(),
                ca: ca.pem(),
            })
        })
        .collect()
}

/// A [`pki`] written as PEM files (`sw{i}.pem`, `sw{i}.key`, `ca.pem`) into
/// a temporary directory, as an operator would give them; removed on drop.
pub struct TempPki {
    dir: tempfile::TempDir,
    n: usize,
}

impl TempPki {
    pub fn new(n: usize) -> Result<TempPki> {
        let dir = tempfile::Builder::new()
            .prefix("vnet-pki-")
            .tempdir()
            .map_err(|source| TestbedError::Io {
                path: std::env::temp_dir(),
                source,
            })?;
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).map_err(|source| TestbedError::Io { path, source })
        };
        for (i, pem) in pki(n)?.iter().enumerate() {
            write(&format!("sw{i}.pem"), &pem.cert)?;
            write(&format!("sw{i}.key"), &pem.key)?;
            write("ca.pem", &pem.ca)?;
        }
        Ok(TempPki { dir, n })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The TLS configuration of switch `i` (< n), read from the files.
    pub fn tls_config(&self, i: usize) -> Result<TlsConfig> {
        let d = self.dir.path();
        if i >= self.n {
            return Err(TestbedError::Io {
                path: d.join(format!("sw{i}.pem")),
                source: std::io::ErrorKind::NotFound.into(),
            });
        }
        Ok(TlsConfig::from_pem_files(
            &d.join(format!("sw{i}.pem")),
            &d.join(format!("sw{i}.key")),
            &d.join("ca.pem"),
        )?)
    }
}

/// Polls `f` every 20 ms for up to `secs`; true once it holds.
pub fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_iputils_ping() {
        let out = "PING 10.99.30.2 (10.99.30.2) 56(84) bytes of data.\n\n\
                   --- 10.99.30.2 ping statistics ---\n\
                   200 packets transmitted, 200 received, 0% packet loss, time 1194ms\n\
                   rtt min/avg/max/mdev = 0.031/0.052/0.101/0.011 ms\n";
        let s = parse_ping(out).unwrap();
        assert_eq!((s.transmitted, s.received), (200, 200));
        assert_eq!(s.median_ms, None);
        assert_eq!(
            (s.min_ms, s.avg_ms, s.max_ms, s.mdev_ms),
            (0.031, 0.052, 0.101, 0.011)
        );
        let out = "PING 10.0.0.2 (10.0.0.2) 56(84) bytes of data.\n\
                   64 bytes from 10.0.0.2: icmp_seq=1 ttl=64 time=0.090 ms\n\
                   64 bytes from 10.0.0.2: icmp_seq=2 ttl=64 time=0.030 ms\n\
                   64 bytes from 10.0.0.2: icmp_seq=3 ttl=64 time=2.5 ms\n\
                   64 bytes from 10.0.0.2: icmp_seq=4 ttl=64 time=0.050 ms\n\
                   64 bytes from 10.0.0.2: icmp_seq=5 ttl=64 time=junk ms\n\n\
                   --- 10.0.0.2 ping statistics ---\n\
                   5 packets transmitted, 5 received, 0% packet loss, time 4ms\n\
                   rtt min/avg/max/mdev = 0.030/0.667/2.500/1.058 ms\n";
        let s = parse_ping(out).unwrap();
        assert_eq!(s.median_ms, Some(0.07));
        assert_eq!(
            (s.min_ms, s.avg_ms, s.max_ms, s.mdev_ms),
            (0.030, 0.667, 2.5, 1.058)
        );
    }

    #[test]
    fn parses_busybox_ping_and_loss() {
        let out = "--- 10.0.0.1 ping statistics ---\n\
                   3 packets transmitted, 2 packets received, 33% packet loss\n\
                   round-trip min/avg/max = 0.100/0.200/0.300 ms\n";
        let s = parse_ping(out).unwrap();
        assert_eq!(
            (s.transmitted, s.received, s.avg_ms, s.mdev_ms),
            (3, 2, 0.2, 0.0)
        );
        let none = "5 packets transmitted, 0 received, +5 errors, 100% packet loss, time 4ms\n";
        let s = parse_ping(none).unwrap();
        assert_eq!(s.received, 0);
        assert!(s.avg_ms.is_nan());
    }

    #[test]
    fn bad_ping_output_is_an_error() {
        for out in [
            "",
            "ping: connect: Network is unreachable\n",
            "x packets transmitted, 1 received\nrtt min/avg/max/mdev = 1/2/3/4 ms\n",
            "1 packets transmitted, 1 received\n",
            "1 packets transmitted, 1 received\nrtt min/avg/max/mdev = 1/two/3/4 ms\n",
            "1 packets transmitted, 1 received\nrtt min/avg/max/mdev 1/2/3 ms\n",
            "1 packets transmitted, 1 received\nrtt min/avg/max/mdev = 1/2 ms\n",
        ] {
            assert!(
                matches!(parse_ping(out), Err(TestbedError::PingOutput(_))),
                "{out:?}"
            );
        }
    }

    #[test]
    fn parses_iperf3_json() {
        let json = r#"{"start":{},"intervals":[],"end":{
            "sum_sent":{"bytes":1,"bits_per_second":5.3e9,"retransmits":12},
            "sum_received":{"bytes":1,"bits_per_second":5.2e9}}}"#;
        let r = parse_iperf3(json).unwrap();
        assert_eq!(r.received_bps, 5.2e9);
        assert_eq!(r.sent_bps, 5.3e9);
        assert_eq!(r.retransmits, 12);
    }

    #[test]
    fn bad_iperf3_output_is_an_error() {
        let err = parse_iperf3(r#"{"start":{},"end":{},"error":"unable to connect to server"}"#)
            .unwrap_err();
        assert!(matches!(&err, TestbedError::Iperf(m) if m.contains("unable to connect")));
        assert!(matches!(
            parse_iperf3("iperf3: error"),
            Err(TestbedError::IperfOutput(_))
        ));
        assert!(matches!(
            parse_iperf3(r#"{"end":{"sum_sent":{"bits_per_second":1.0}}}"#),
            Err(TestbedError::IperfOutput(_))
        ));
    }

    #[test]
    fn pki_files_make_tls_configs() {
        let pki = TempPki::new(2).unwrap();
        assert!(pki.dir().join("ca.pem").is_file());
        pki.tls_config(0).unwrap();
        pki.tls_config(1).unwrap();
        assert!(pki.tls_config(2).is_err());
        let dir = pki.dir().to_path_buf();
        drop(pki);
        assert!(!dir.exists());
    }
}
