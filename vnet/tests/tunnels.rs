//! Tunnels between switches: real Linux namespaces on each side, joined
//! by UDP, TCP and TLS; certificates; reconnection; big frames.

mod common;

use common::{NetNs, eventually, pki, unique};
use std::sync::Arc;
use vnet::counters::DropReason;
use vnet::switch::{Switch, SwitchConfig};
use vnet::tap::TapPort;
use vnet::tunnel::{Endpoint, Listener, Proto, TlsConfig, Tunnel, TunnelOptions, TunnelState};

fn tap_in(sw: &Arc<Switch>, ns: &NetNs, addr: &str) -> TapPort {
    let tap = TapPort::create(sw, &unique("vt")).expect("create TAP");
    ns.adopt(tap.name(), addr).unwrap();
    tap
}

fn tls_pair() -> (TlsConfig, TlsConfig) {
    let p = pki(2).unwrap();
    (p[0].tls_config().unwrap(), p[1].tls_config().unwrap())
}

fn opts(tls: Option<TlsConfig>) -> TunnelOptions {
    TunnelOptions {
        tls,
        ..Default::default()
    }
}

fn ep(proto: Proto, addr: std::net::SocketAddr) -> Endpoint {
    Endpoint {
        proto,
        addr: addr.to_string(),
    }
}

/// Two switches (A connects to B's listener), a namespace behind each:
/// ping and a 2 s iperf3 across the tunnel.
fn namespaces_across_a_tunnel(proto: Proto, subnet: u8) {
    let (ta, tb) = match proto {
        Proto::Tls => {
            let (a, b) = tls_pair();
            (Some(a), Some(b))
        }
        _ => (None, None),
    };
    let cfg = SwitchConfig::default();
    let (swa, swb) = (Switch::new(cfg.clone()).unwrap(), Switch::new(cfg).unwrap());
    let l = Listener::bind(&swb, ep(proto, "127.0.0.1:0".parse().unwrap()), &opts(tb)).unwrap();
    let t = Tunnel::connect(&swa, ep(proto, l.local_addr()), &opts(ta)).unwrap();
    assert!(
        eventually(5, || t.info().state == TunnelState::Up),
        "{:?}",
        t.info()
    );
    let (a, b) = (NetNs::new().unwrap(), NetNs::new().unwrap());
    let _pa = tap_in(&swa, &a, &format!("10.99.{subnet}.1/24"));
    let _pb = tap_in(&swb, &b, &format!("10.99.{subnet}.2/24"));
    let peer = format!("10.99.{subnet}.2");
    let rtt = a.ping(&peer, 3).unwrap();
    b.iperf_server().unwrap();
    let bps = a.iperf_client(&peer, 2).unwrap().received_bps;
    eprintln!("{proto} tunnel: rtt {rtt:.3} ms, {:.0} Mbit/s", bps / 1e6);
    assert!(bps > 5e6, "throughput {bps} bit/s");
    let accepted = l.info().tunnels;
    assert_eq!(accepted.len(), 1);
    assert_eq!(accepted[0].state, TunnelState::Up);
    assert_eq!(accepted[0].peer_switch, Some(swa.matrix().origin()));
    let port = t.info().port.unwrap();
    let c = swa.port(port).unwrap().counters;
    assert!(c.tx_bytes > 1_000_000, "{c:?}");
}

#[test]
fn udp_tunnel_carries_ping_and_iperf() {
    namespaces_across_a_tunnel(Proto::Udp, 11);
}

#[test]
fn tcp_tunnel_carries_ping_and_iperf() {
    namespaces_across_a_tunnel(Proto::Tcp, 12);
}

#[test]
fn tls_tunnel_carries_ping_and_iperf() {
    namespaces_across_a_tunnel(Proto::Tls, 13);
}

#[test]
fn tls_with_a_certificate_from_another_ca_is_refused() {
    let (good, _) = tls_pair();
    let (stranger, _) = tls_pair();
    let (swa, swb) = (
        Switch::new(SwitchConfig::default()).unwrap(),
        Switch::new(SwitchConfig::default()).unwrap(),
    );
    let l = Listener::bind(
        &swb,
        ep(Proto::Tls, "127.0.0.1:0".parse().unwrap()),
        &opts(Some(good)),
    )
    .unwrap();
    let t = Tunnel::connect(&swa, ep(Proto::Tls, l.local_addr()), &opts(Some(stranger))).unwrap();
    assert!(eventually(5, || t.info().state == TunnelState::Down));
    std::thread::sleep(std::time::Duration::from_millis(500));
    let info = t.info();
    assert_eq!(info.ups, 0, "{info:?}");
    assert_ne!(info.state, TunnelState::Up);
    let err = info.last_error.unwrap();
    assert!(
        err.contains("certificate") || err.contains("Unknown"),
        "{err}"
    );
    assert!(l.info().tunnels.iter().all(|t| t.state != TunnelState::Up));
    assert!(swa.ports().is_empty() && swb.ports().is_empty());
    // TLS needs certificates.
    assert!(Tunnel::connect(&swa, ep(Proto::Tls, l.local_addr()), &opts(None)).is_err());
}

static PANICS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[test]
fn tunnels_reconnect_with_backoff_and_report_state() {
    // A tunnel or listener thread that panics (they are joined quietly)
    // fails this test.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |i| {
        PANICS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        hook(i)
    }));
    for proto in [Proto::Udp, Proto::Tcp] {
        let (swa, swb) = (
            Switch::new(SwitchConfig::default()).unwrap(),
            Switch::new(SwitchConfig::default()).unwrap(),
        );
        // Find a free port, then connect before anyone listens there.
        let addr = {
            let l = Listener::bind(&swb, ep(proto, "127.0.0.1:0".parse().unwrap()), &opts(None))
                .unwrap();
            l.local_addr()
        };
        let t = Tunnel::connect(&swa, ep(proto, addr), &opts(None)).unwrap();
        assert!(
            eventually(8, || t.info().state == TunnelState::Down),
            "{proto}: {:?}",
            t.info()
        );
        assert!(t.info().last_error.is_some());
        let l = Listener::bind(&swb, ep(proto, addr), &opts(None)).unwrap();
        assert!(
            eventually(10, || t.info().state == TunnelState::Up),
            "{proto}: {:?}",
            t.info()
        );
        assert_eq!(swa.ports().len(), 1);
        // The peer goes away: down (with a reason), port removed...
        drop(l);
        assert!(
            eventually(10, || t.info().state != TunnelState::Up),
            "{proto}: {:?}",
            t.info()
        );
        assert!(eventually(2, || swa.ports().is_empty()));
        // ...and back up when it returns.
        let _l = Listener::bind(&swb, ep(proto, addr), &opts(None)).unwrap();
        assert!(
            eventually(15, || t.info().state == TunnelState::Up),
            "{proto}: {:?}",
            t.info()
        );
        assert_eq!(t.info().ups, 2);
        drop(t);
    }
    assert_eq!(
        PANICS.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a thread panicked"
    );
}

#[test]
fn jumbo_frames_cross_a_udp_tunnel_in_fragments() {
    let cfg = SwitchConfig {
        mtu: 9000,
        ..Default::default()
    };
    let (swa, swb) = (Switch::new(cfg.clone()).unwrap(), Switch::new(cfg).unwrap());
    let l = Listener::bind(
        &swb,
        ep(Proto::Udp, "127.0.0.1:0".parse().unwrap()),
        &opts(None),
    )
    .unwrap();
    let t = Tunnel::connect(&swa, ep(Proto::Udp, l.local_addr()), &opts(None)).unwrap();
    assert!(eventually(5, || t.info().state == TunnelState::Up));
    let (a, b) = (NetNs::new().unwrap(), NetNs::new().unwrap());
    let _pa = tap_in(&swa, &a, "10.99.14.1/24");
    let _pb = tap_in(&swb, &b, "10.99.14.2/24");
    // 8000-byte ICMP payload, no IP fragmentation: one 8042-byte frame.
    let out = a
        .exec_ok(&[
            "ping",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "2",
            "-M",
            "do",
            "-s",
            "8000",
            "10.99.14.2",
        ])
        .unwrap();
    assert!(out.contains("3 received"), "{out}");
    let port = t.info().port.unwrap();
    assert!(swa.port(port).unwrap().counters.tx_bytes >= 3 * 8042);
    assert_eq!(swa.info().counters.dropped(DropReason::PathMtu), 0);
}

fn vnet() -> vnet::Vnet {
    vnet::Vnet::new(vnet::VnetConfig::default()).unwrap()
}

fn tap_of(v: &vnet::Vnet, ns: &NetNs, addr: &str) -> (vnet::PortId, String) {
    let name = unique("vt");
    let id = v.add_tap(&name).unwrap();
    ns.adopt(&name, addr).unwrap();
    (id, name)
}

#[test]
fn a_rule_change_moves_a_running_stream_to_another_port() {
    let v = vnet();
    let (a, b, c) = (
        NetNs::new().unwrap(),
        NetNs::new().unwrap(),
        NetNs::new().unwrap(),
    );
    let _pa = tap_of(&v, &a, "10.99.20.1/24");
    // B and C are the same host (MAC and IP), as after a fail-over.
    let mac: vnet::Mac = "02:99:00:00:00:02".parse().unwrap();
    let (pb, nb) = tap_of(&v, &b, "10.99.20.2/24");
    let (pc, nc) = tap_of(&v, &c, "10.99.20.2/24");
    b.exec_ok(&["ip", "link", "set", &nb, "address", &mac.to_string()])
        .unwrap();
    c.exec_ok(&["ip", "link", "set", &nc, "address", &mac.to_string()])
        .unwrap();
    v.add_rule(vnet::Rule {
        dst: mac,
        vlan: None,
        port: pb,
    })
    .unwrap();
    let tx = |p| v.switch().port(p).unwrap().counters.tx_frames;
    let (out, at_switch, took) = std::thread::scope(|s| {
        let ping = s.spawn(|| {
            a.exec(&["ping", "-c", "60", "-i", "0.05", "-W", "1", "10.99.20.2"])
                .unwrap()
        });
        std::thread::sleep(std::time::Duration::from_millis(1500));
        let t0 = std::time::Instant::now();
        v.add_rule(vnet::Rule {
            dst: mac,
            vlan: None,
            port: pc,
        })
        .unwrap();
        let took = t0.elapsed();
        let at_switch = (tx(pb), tx(pc));
        (ping.join().unwrap(), at_switch, took)
    });
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let received: u32 = out
        .split(" received")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    eprintln!(
        "rule change took {took:?}; B/C tx at the change {at_switch:?}; {received}/60 replies"
    );
    assert!(received >= 54, "{out}");
    assert!(
        at_switch.0 >= 10,
        "B carried the stream first: {at_switch:?}"
    );
    assert!(tx(pb) <= at_switch.0 + 2, "B stopped getting it");
    assert!(tx(pc) >= at_switch.1 + 20, "C got it after the change");
    // How long the change takes is measured by `vmplant bench vnet`, not
    // asserted here: a test's timing on a shared machine says little.
}

#[test]
fn removing_a_tunnel_mid_stream_leaves_the_other_ports_working() {
    let (v0, v1) = (vnet(), vnet());
    let (_, l) = v1.listen("udp:127.0.0.1:0".parse().unwrap()).unwrap();
    let tid = v0.connect(format!("udp:{l}").parse().unwrap()).unwrap();
    assert!(eventually(5, || v0.tunnels()[0].state == TunnelState::Up));
    let (a, b, c) = (
        NetNs::new().unwrap(),
        NetNs::new().unwrap(),
        NetNs::new().unwrap(),
    );
    let _pa = tap_of(&v0, &a, "10.99.21.1/24");
    let _pb = tap_of(&v0, &b, "10.99.21.2/24");
    let _pc = tap_of(&v1, &c, "10.99.21.3/24");
    a.ping("10.99.21.3", 1).unwrap();
    b.iperf_server().unwrap();
    let (bps, took) = std::thread::scope(|s| {
        let iperf = s.spawn(|| a.iperf_client("10.99.21.2", 3).unwrap().received_bps);
        std::thread::sleep(std::time::Duration::from_millis(1200));
        let t0 = std::time::Instant::now();
        v0.remove_tunnel(tid).unwrap();
        let took = t0.elapsed();
        (iperf.join().unwrap(), took)
    });
    eprintln!("tunnel removal took {took:?}; A->B {:.0} Mbit/s", bps / 1e6);
    assert!(bps > 50e6, "{bps}");
    assert!(v0.tunnels().is_empty());
    assert_eq!(v0.status().ports.len(), 2);
    a.ping("10.99.21.2", 2).unwrap();
    let out = a
        .exec(&["ping", "-c", "1", "-W", "1", "10.99.21.3"])
        .unwrap();
    assert!(!out.status.success(), "C is gone with the tunnel");
    assert!(eventually(8, || v1.status().listeners[0]
        .tunnels
        .is_empty()));
    let json = serde_json::to_value(v0.status()).unwrap();
    assert_eq!(json["ports"][0]["kind"], "tap");
}

struct Null;
impl vnet::PortSink for Null {
    fn send(&self, _: &dyn vnet::Frame) -> Result<(), DropReason> {
        Ok(())
    }
}

#[test]
fn switches_exchange_matrices_and_both_infer_the_ring_of_four() {
    use vnet::matrix::Window;
    // Star: B is the hub; A and C are spokes. Talkers 1, 2 on A, 3 on B,
    // 4 on C; they talk in a ring 1-2-3-4-1.
    let (a, b, c) = (vnet(), vnet(), vnet());
    b.switch().set_hub(true);
    let (_, l) = b.listen("tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    a.connect(format!("tcp:{l}").parse().unwrap()).unwrap();
    c.connect(format!("tcp:{l}").parse().unwrap()).unwrap();
    assert!(eventually(5, || a.tunnels()[0].state == TunnelState::Up
        && c.tunnels()[0].state == TunnelState::Up));
    let macs: Vec<vnet::Mac> = (1..=4).map(vnet::Mac::local).collect();
    let home = [&a, &a, &b, &c];
    let ports: Vec<vnet::PortId> = home
        .iter()
        .enumerate()
        .map(|(i, v)| v.add_port(&format!("t{i}"), vnet::PortKind::Other, Arc::new(Null)))
        .collect();
    for _ in 0..50 {
        for i in 0..4 {
            let j = (i + 1) % 4;
            let f = vnet::frame::build_frame(macs[j], macs[i], 0x0800, &[0; 1000]);
            home[i].switch().ingress_bytes(ports[i], &f);
            let back = vnet::frame::build_frame(macs[i], macs[j], 0x0800, &[0; 100]);
            home[j].switch().ingress_bytes(ports[j], &back);
        }
    }
    // A little chatter across the ring, and ARP, below the cut.
    let f = vnet::frame::build_frame(macs[2], macs[0], 0x0800, &[0; 100]);
    a.switch().ingress_bytes(ports[0], &f);
    for (i, v) in home.iter().enumerate() {
        let arp = vnet::frame::build_frame(vnet::Mac::BROADCAST, macs[i], 0x0806, &[0; 28]);
        for _ in 0..500 {
            v.switch().ingress_bytes(ports[i], &arp);
        }
    }
    for v in [&a, &b, &c] {
        assert!(
            eventually(6, || v.switch().matrix().remote_origins().len() == 2),
            "each switch hears of the two others"
        );
        let t = v.topology(Window::S60, 0.1);
        assert!(t.is_ring(), "{t:?}");
        assert_eq!(t.nodes.len(), 4);
        let g = v.matrix();
        let e = g
            .iter()
            .find(|e| e.src == macs[3] && e.dst == macs[0])
            .unwrap();
        assert_eq!(
            e.last_60s.frames, 50,
            "each frame counted once, by its first switch"
        );
    }
}

#[test]
fn garbage_from_the_network_is_dropped_and_counted_never_a_panic() {
    use std::io::{Read, Write};
    use vnet::tunnel::wire;
    let v = vnet();
    let (_, ul) = v.listen("udp:127.0.0.1:0".parse().unwrap()).unwrap();
    let (_, tl) = v.listen("tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    // Random datagrams, including ones that start like fragments.
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut x: u32 = 7;
    for len in 0..600 {
        let d: Vec<u8> = (0..len % 1500)
            .map(|i| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                if i == 0 {
                    (len % 7) as u8
                } else {
                    (x >> 16) as u8
                }
            })
            .collect();
        s.send_to(&d, ul).unwrap();
    }
    // A TCP peer that does not speak the protocol is dropped.
    let mut t = std::net::TcpStream::connect(tl).unwrap();
    t.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    t.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut sink = Vec::new();
    let _ = t.read_to_end(&mut sink);
    assert!(v.switch().ports().is_empty(), "garbage made no port");
    // A peer that says hello, then sends messages of unknown type and a
    // truncated offload frame: up, with the bad messages counted.
    let mut t = std::net::TcpStream::connect(tl).unwrap();
    let mut out = Vec::new();
    wire::encode_stream(&mut out, wire::MSG_HELLO, &wire::hello(42));
    wire::encode_stream(&mut out, 99, b"what");
    wire::encode_stream(&mut out, wire::MSG_FRAME_HDR, &[1, 2, 3]);
    wire::encode_stream(&mut out, wire::MSG_MATRIX, b"{not json");
    wire::encode_stream(&mut out, wire::MSG_FRAME, &[0; 5]);
    t.write_all(&out).unwrap();
    assert!(eventually(5, || {
        v.switch().ports().first().is_some_and(|p| {
            p.counters.dropped(DropReason::Malformed) == 3
                && p.counters.dropped(DropReason::Runt) == 1
        })
    }));
    let l = &v.status().listeners;
    let tcp = l.iter().find(|l| l.local_addr == tl).unwrap();
    assert_eq!(
        tcp.tunnels
            .iter()
            .filter(|t| t.state == TunnelState::Up)
            .count(),
        1
    );
    assert_eq!(
        tcp.tunnels
            .iter()
            .find(|t| t.state == TunnelState::Up)
            .unwrap()
            .peer_switch,
        Some(42)
    );
    // A length prefix past the limit ends the session.
    t.write_all(&u32::MAX.to_be_bytes()).unwrap();
    assert!(eventually(5, || v.switch().ports().is_empty()));
    // The listeners still work.
    let other = vnet();
    other.connect(format!("udp:{ul}").parse().unwrap()).unwrap();
    other.connect(format!("tcp:{tl}").parse().unwrap()).unwrap();
    assert!(eventually(5, || other
        .tunnels()
        .iter()
        .all(|t| t.state == TunnelState::Up)));
}
