//! Tunnels between switches: real Linux namespaces on each side, joined
//! by UDP, TCP and TLS; certificates; reconnection; big frames.

mod common;

use common::{NetNs, eventually, pki, unique};
use std::sync::Arc;
use vnet::counters::DropReason;
use vnet::switch::{Switch, SwitchConfig};
use vnet::tap::TapPort;
use vnet::tunnel::{DEFAULT_UDP_MTU, Endpoint, Listener, Proto, TlsConfig, Tunnel, TunnelState};

fn tap_in(sw: &Arc<Switch>, ns: &NetNs, addr: &str) -> TapPort {
    let tap = TapPort::create(sw, &unique("vt")).expect("create TAP");
    ns.adopt(tap.name(), addr);
    tap
}

fn tls_pair() -> (TlsConfig, TlsConfig) {
    let p = pki(2);
    let c = |p: &common::Pem| {
        TlsConfig::from_pem(p.cert.as_bytes(), p.key.as_bytes(), p.ca.as_bytes()).unwrap()
    };
    (c(&p[0]), c(&p[1]))
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
    let l = Listener::bind(
        &swb,
        ep(proto, "127.0.0.1:0".parse().unwrap()),
        tb,
        DEFAULT_UDP_MTU,
    )
    .unwrap();
    let t = Tunnel::connect(&swa, ep(proto, l.local_addr()), ta, DEFAULT_UDP_MTU).unwrap();
    assert!(
        eventually(5, || t.info().state == TunnelState::Up),
        "{:?}",
        t.info()
    );
    let (a, b) = (NetNs::new(), NetNs::new());
    let _pa = tap_in(&swa, &a, &format!("10.99.{subnet}.1/24"));
    let _pb = tap_in(&swb, &b, &format!("10.99.{subnet}.2/24"));
    let peer = format!("10.99.{subnet}.2");
    let rtt = a.ping(&peer, 3);
    b.iperf_server();
    let bps = a.iperf_client(&peer, 2);
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
        Some(good),
        1472,
    )
    .unwrap();
    let t = Tunnel::connect(&swa, ep(Proto::Tls, l.local_addr()), Some(stranger), 1472).unwrap();
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
    assert!(Tunnel::connect(&swa, ep(Proto::Tls, l.local_addr()), None, 1472).is_err());
}

#[test]
fn tunnels_reconnect_with_backoff_and_report_state() {
    for proto in [Proto::Udp, Proto::Tcp] {
        let (swa, swb) = (
            Switch::new(SwitchConfig::default()).unwrap(),
            Switch::new(SwitchConfig::default()).unwrap(),
        );
        // Find a free port, then connect before anyone listens there.
        let addr = {
            let l = Listener::bind(&swb, ep(proto, "127.0.0.1:0".parse().unwrap()), None, 1472)
                .unwrap();
            l.local_addr()
        };
        let t = Tunnel::connect(&swa, ep(proto, addr), None, 1472).unwrap();
        assert!(
            eventually(8, || t.info().state == TunnelState::Down),
            "{proto}: {:?}",
            t.info()
        );
        assert!(t.info().last_error.is_some());
        let l = Listener::bind(&swb, ep(proto, addr), None, 1472).unwrap();
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
        let _l = Listener::bind(&swb, ep(proto, addr), None, 1472).unwrap();
        assert!(
            eventually(15, || t.info().state == TunnelState::Up),
            "{proto}: {:?}",
            t.info()
        );
        assert_eq!(t.info().ups, 2);
    }
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
        None,
        1472,
    )
    .unwrap();
    let t = Tunnel::connect(&swa, ep(Proto::Udp, l.local_addr()), None, 1472).unwrap();
    assert!(eventually(5, || t.info().state == TunnelState::Up));
    let (a, b) = (NetNs::new(), NetNs::new());
    let _pa = tap_in(&swa, &a, "10.99.14.1/24");
    let _pb = tap_in(&swb, &b, "10.99.14.2/24");
    // 8000-byte ICMP payload, no IP fragmentation: one 8042-byte frame.
    let out = a.exec_ok(&[
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
    ]);
    assert!(out.contains("3 received"), "{out}");
    let port = t.info().port.unwrap();
    assert!(swa.port(port).unwrap().counters.tx_bytes >= 3 * 8042);
    assert_eq!(swa.info().counters.dropped(DropReason::PathMtu), 0);
}
