//! VNET benchmark (needs root, ip, ping, iperf3):
//!
//! ```text
//! cargo run --release -p vnet --example bench -- [SECONDS [ONLY]]
//! ```
//!
//! Ping RTT and iperf3 TCP throughput between two network namespaces
//! through (a) a Linux bridge, (b) one VNET switch, (c) two switches
//! joined by a UDP tunnel (1472-byte path MTU, so 1514-byte frames go in
//! two fragments), (c') the same with a 9000-byte path MTU (loopback
//! allows it), (d) a TCP and (e) a TLS tunnel; then the time to add and
//! remove a rule and a tunnel, and the switch's own frames per second.
//! One JSON line per result, then a summary (not when ONLY, a substring
//! of setup names, picks some).

#[path = "../tests/common/mod.rs"]
mod common;

use common::{NetNs, eventually, must, pki, unique};
use serde_json::json;
use std::time::{Duration, Instant};
use vnet::tunnel::{Endpoint, Proto, TlsConfig, TunnelState};
use vnet::{Mac, Rule, SwitchConfig, Vnet, VnetConfig};

struct Result {
    rtt_us: f64,
    mbps: f64,
}

fn measure(setup: &str, a: &NetNs, b: &NetNs, peer: &str, secs: u32) -> Result {
    // Warm up ARP and learning.
    a.ping(peer, 2);
    let out = a.exec_ok(&["ping", "-q", "-c", "200", "-i", "0.005", peer]);
    let line = out
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .expect("rtt");
    let rtt_ms: f64 = line
        .split('=')
        .nth(1)
        .unwrap()
        .trim()
        .split('/')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    b.iperf_server();
    let bps = a.iperf_client(peer, secs);
    let r = Result {
        rtt_us: rtt_ms * 1000.0,
        mbps: bps / 1e6,
    };
    println!(
        "{}",
        json!({"bench": "vnet", "setup": setup, "rtt_us": (r.rtt_us * 10.0).round() / 10.0, "tcp_mbps": r.mbps.round()})
    );
    r
}

fn linux_bridge(secs: u32) -> Result {
    let (a, b, br) = (NetNs::new(), NetNs::new(), NetNs::new());
    br.exec_ok(&["ip", "link", "add", "br0", "type", "bridge"]);
    br.exec_ok(&["ip", "link", "set", "br0", "up"]);
    for (ns, addr) in [(&a, "10.99.30.1/24"), (&b, "10.99.30.2/24")] {
        let (v, p) = (unique("vb"), unique("vp"));
        let _g = common::LinkGuard(v.clone());
        must(&["ip", "link", "add", &v, "type", "veth", "peer", "name", &p]);
        must(&["ip", "link", "set", &p, "netns", &br.name]);
        br.exec_ok(&["ip", "link", "set", &p, "master", "br0"]);
        br.exec_ok(&["ip", "link", "set", &p, "up"]);
        ns.adopt(&v, addr);
    }
    measure("linux_bridge", &a, &b, "10.99.30.2", secs)
}

fn tap(v: &Vnet, ns: &NetNs, addr: &str) {
    let name = unique("vt");
    v.add_tap(&name).unwrap();
    ns.adopt(&name, addr);
}

fn vnet(tls: Option<TlsConfig>, udp_mtu: usize) -> Vnet {
    Vnet::new(VnetConfig {
        switch: SwitchConfig::default(),
        tls,
        udp_mtu,
    })
    .unwrap()
}

fn one_switch(secs: u32) -> Result {
    let v = vnet(None, 0);
    let (a, b) = (NetNs::new(), NetNs::new());
    tap(&v, &a, "10.99.31.1/24");
    tap(&v, &b, "10.99.31.2/24");
    measure("vnet_one_switch", &a, &b, "10.99.31.2", secs)
}

fn tls_configs() -> (TlsConfig, TlsConfig) {
    let p = pki(2);
    let c = |p: &common::Pem| {
        TlsConfig::from_pem(p.cert.as_bytes(), p.key.as_bytes(), p.ca.as_bytes()).unwrap()
    };
    (c(&p[0]), c(&p[1]))
}

fn two_switches(setup: &str, proto: Proto, udp_mtu: usize, subnet: u8, secs: u32) -> Result {
    let (ta, tb) = match proto {
        Proto::Tls => {
            let (a, b) = tls_configs();
            (Some(a), Some(b))
        }
        _ => (None, None),
    };
    let (va, vb) = (vnet(ta, udp_mtu), vnet(tb, udp_mtu));
    let (_, l) = vb
        .listen(Endpoint {
            proto,
            addr: "127.0.0.1:0".into(),
        })
        .unwrap();
    va.connect(Endpoint {
        proto,
        addr: l.to_string(),
    })
    .unwrap();
    assert!(eventually(5, || va.tunnels()[0].state == TunnelState::Up));
    let (a, b) = (NetNs::new(), NetNs::new());
    tap(&va, &a, &format!("10.99.{subnet}.1/24"));
    tap(&vb, &b, &format!("10.99.{subnet}.2/24"));
    measure(setup, &a, &b, &format!("10.99.{subnet}.2"), secs)
}

fn control_plane() -> serde_json::Value {
    let (va, vb) = (vnet(None, 0), vnet(None, 0));
    let (_, l) = vb.listen("udp:127.0.0.1:0".parse().unwrap()).unwrap();
    struct Null;
    impl vnet::PortSink for Null {
        fn send(&self, _: &dyn vnet::Frame) -> std::result::Result<(), vnet::DropReason> {
            Ok(())
        }
    }
    let p = va.add_port("null", vnet::PortKind::Other, std::sync::Arc::new(Null));
    let n = 1000;
    let t = Instant::now();
    for i in 0..n {
        va.add_rule(Rule {
            dst: Mac::local(i),
            vlan: None,
            port: p,
        })
        .unwrap();
    }
    let add_rule = t.elapsed() / n;
    let t = Instant::now();
    for i in 0..n {
        va.remove_rule(Mac::local(i), None).unwrap();
    }
    let remove_rule = t.elapsed() / n;
    let mut add_tunnel = Duration::ZERO;
    let mut up = Duration::ZERO;
    let mut remove_tunnel = Duration::ZERO;
    let rounds = 5;
    for _ in 0..rounds {
        let t = Instant::now();
        let id = va.connect(format!("udp:{l}").parse().unwrap()).unwrap();
        add_tunnel += t.elapsed();
        assert!(eventually(5, || va.tunnels()[0].state == TunnelState::Up));
        up += t.elapsed();
        let t = Instant::now();
        va.remove_tunnel(id).unwrap();
        remove_tunnel += t.elapsed();
    }
    let us = |d: Duration| (d.as_secs_f64() * 1e7).round() / 10.0;
    let v = json!({
        "bench": "vnet", "setup": "control",
        "add_rule_us": us(add_rule), "remove_rule_us": us(remove_rule),
        "add_tunnel_us": us(add_tunnel / rounds), "tunnel_up_us": us(up / rounds),
        "remove_tunnel_us": us(remove_tunnel / rounds),
    });
    println!("{v}");
    v
}

/// Frames per second through `Switch::ingress` between in-memory ports
/// (no I/O): the switch's own cost per frame.
fn switch_fps() -> serde_json::Value {
    struct Count(std::sync::atomic::AtomicU64);
    impl vnet::PortSink for Count {
        fn send(&self, f: &dyn vnet::Frame) -> std::result::Result<(), vnet::DropReason> {
            let mut b = [0u8; 64];
            f.read_at(0, &mut b);
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        }
    }
    let sw = vnet::Switch::new(SwitchConfig::default()).unwrap();
    let sinks: Vec<_> = (0..2)
        .map(|_| std::sync::Arc::new(Count(Default::default())))
        .collect();
    let ids: Vec<_> = sinks
        .iter()
        .map(|c| sw.add_port("c", vnet::PortKind::Guest, c.clone()))
        .collect();
    let (a, b) = (Mac::local(1), Mac::local(2));
    let ab = vnet::frame::build_frame(b, a, 0x0800, &[0; 50]);
    let ba = vnet::frame::build_frame(a, b, 0x0800, &[0; 50]);
    sw.ingress_bytes(ids[0], &ab);
    sw.ingress_bytes(ids[1], &ba);
    let n = 2_000_000u64;
    let cpu = || {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: writes one timespec into a live local.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
    };
    let c0 = cpu();
    let t = Instant::now();
    for _ in 0..n / 2 {
        sw.ingress_bytes(ids[0], &ab);
        sw.ingress_bytes(ids[1], &ba);
    }
    let el = t.elapsed().as_secs_f64();
    let el_cpu = cpu() - c0;
    let v = json!({"bench": "vnet", "setup": "switch_only_64B", "mfps": (n as f64 / el / 1e5).round() / 10.0,
        "ns_per_frame": (el * 1e9 / n as f64).round(), "cpu_ns_per_frame": (el_cpu * 1e9 / n as f64).round()});
    println!("{v}");
    v
}

fn main() {
    let secs: u32 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    // Optional: run only the setups whose name contains this.
    let only = std::env::args().nth(2).unwrap_or_default();
    let want = |name: &str| name.contains(only.as_str());
    if !only.is_empty() {
        if want("linux_bridge") {
            linux_bridge(secs);
        }
        if want("vnet_one_switch") {
            one_switch(secs);
        }
        for (name, proto, mtu, net) in [
            ("vnet_udp_tunnel", Proto::Udp, 1472, 32),
            ("vnet_udp_tunnel_9000", Proto::Udp, 9000, 33),
            ("vnet_tcp_tunnel", Proto::Tcp, 0, 34),
            ("vnet_tls_tunnel", Proto::Tls, 0, 35),
        ] {
            if want(name) {
                two_switches(name, proto, mtu, net, secs);
            }
        }
        if want("control") {
            control_plane();
        }
        if want("switch_only") {
            switch_fps();
        }
        return;
    }
    let bridge = linux_bridge(secs);
    let one = one_switch(secs);
    let udp = two_switches("vnet_udp_tunnel", Proto::Udp, 1472, 32, secs);
    let udp9k = two_switches("vnet_udp_tunnel_9000", Proto::Udp, 9000, 33, secs);
    let tcp = two_switches("vnet_tcp_tunnel", Proto::Tcp, 0, 34, secs);
    let tls = two_switches("vnet_tls_tunnel", Proto::Tls, 0, 35, secs);
    let ctl = control_plane();
    let fps = switch_fps();
    let pct = |r: &Result| (r.mbps / bridge.mbps * 1000.0).round() / 10.0;
    println!(
        "{}",
        json!({
            "summary": "vnet",
            "bridge_mbps": bridge.mbps.round(), "bridge_rtt_us": (bridge.rtt_us * 10.0).round() / 10.0,
            "one_switch_added_rtt_us": ((one.rtt_us - bridge.rtt_us) * 10.0).round() / 10.0,
            "one_switch_pct_of_bridge": pct(&one),
            "udp_tunnel_pct_of_bridge": pct(&udp),
            "udp9000_tunnel_pct_of_bridge": pct(&udp9k),
            "tcp_tunnel_pct_of_bridge": pct(&tcp),
            "tls_tunnel_pct_of_bridge": pct(&tls),
            "add_rule_us": ctl["add_rule_us"], "remove_tunnel_us": ctl["remove_tunnel_us"],
            "switch_mfps": fps["mfps"],
        })
    );
}
