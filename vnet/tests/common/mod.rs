//! Network namespaces for tests, removed on drop even when a test fails.
#![allow(dead_code)]

use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A name no other test (or test process) uses: prefix, pid, sequence.
pub fn unique(prefix: &str) -> String {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}

pub fn run(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn")
}

pub fn must(args: &[&str]) {
    let out = run(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace; deleted (with an iperf3 server in it) on drop.
pub struct NetNs {
    pub name: String,
    pidfile: String,
}

impl NetNs {
    pub fn new() -> NetNs {
        let name = unique("vnt");
        must(&["ip", "netns", "add", &name]);
        let ns = NetNs {
            pidfile: format!("/tmp/{name}.iperf.pid"),
            name,
        };
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        // No IPv6 chatter (router and neighbour solicitations) in counts.
        ns.exec_ok(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
        ns.exec_ok(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"]);
        ns
    }

    pub fn exec(&self, args: &[&str]) -> Output {
        let mut v = vec!["ip", "netns", "exec", &self.name];
        v.extend_from_slice(args);
        run(&v)
    }

    pub fn exec_ok(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(
            out.status.success(),
            "in {}: {args:?} failed: {}{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Moves host interface `dev` here and gives it `addr` (CIDR).
    pub fn adopt(&self, dev: &str, addr: &str) {
        must(&["ip", "link", "set", dev, "netns", &self.name]);
        self.exec_ok(&["ip", "addr", "add", addr, "dev", dev]);
        self.exec_ok(&["ip", "link", "set", dev, "up"]);
    }

    /// `ping -c n` to `addr`; returns the average RTT in ms.
    pub fn ping(&self, addr: &str, n: u32) -> f64 {
        let out = self.exec_ok(&[
            "timeout",
            "20",
            "ping",
            "-c",
            &n.to_string(),
            "-i",
            "0.2",
            "-W",
            "2",
            addr,
        ]);
        assert!(
            out.contains(&format!("{n} received")),
            "ping lost packets: {out}"
        );
        // rtt min/avg/max/mdev = 0.040/0.052/0.066/0.010 ms
        let line = out
            .lines()
            .find(|l| l.contains("min/avg/max"))
            .expect("rtt line");
        let nums = line.split('=').nth(1).unwrap().trim();
        nums.split('/').nth(1).unwrap().parse().unwrap()
    }

    /// Starts a one-shot iperf3 server here.
    pub fn iperf_server(&self) {
        let _ = std::fs::remove_file(&self.pidfile);
        self.exec_ok(&["iperf3", "-s", "-D", "-1", "-I", &self.pidfile]);
        // Wait until it listens.
        for _ in 0..50 {
            let out = self.exec(&["ss", "-ltn"]);
            if String::from_utf8_lossy(&out.stdout).contains(":5201") {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("iperf3 server did not start");
    }

    /// Runs an iperf3 client to `addr` for `secs`; returns received bits/s.
    pub fn iperf_client(&self, addr: &str, secs: u32) -> f64 {
        let out = self.exec_ok(&[
            "timeout",
            "30",
            "iperf3",
            "-c",
            addr,
            "-t",
            &secs.to_string(),
            "-J",
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("iperf3 JSON");
        v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .expect("throughput")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.pidfile) {
            let _ = run(&["kill", pid.trim()]);
            let _ = std::fs::remove_file(&self.pidfile);
        }
        let _ = run(&["ip", "netns", "del", &self.name]);
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

/// PEM certificate, key, and CA for one switch.
pub struct Pem {
    pub cert: String,
    pub key: String,
    pub ca: String,
}

/// A CA and `n` switch certificates it signs (names "vnet", 127.0.0.1).
pub fn pki(n: usize) -> Vec<Pem> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut p = CertificateParams::new(vec![]).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap();
    (0..n)
        .map(|_| {
            let key = KeyPair::generate().unwrap();
            let cp =
                CertificateParams::new(vec!["vnet".to_string(), "127.0.0.1".to_string()]).unwrap();
            let cert = cp.signed_by(&key, &ca).unwrap();
            Pem {
                cert: cert.pem(),
                key: key.serialize_pem(),
                ca: ca.pem(),
            }
        })
        .collect()
}

/// Polls `f` every 20 ms for up to `secs`; true once it holds.
pub fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + Duration::from_secs(secs);
    while std::time::Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}
