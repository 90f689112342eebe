//! UDP tunnel listeners against peers that do not play along: hellos
//! from addresses that never answer, made-up matrix origins, missing or
//! wrong keys.

mod common;

use common::eventually;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vnet::frame::build_frame;
use vnet::matrix::{MAX_REMOTE_ORIGINS, MatrixReport};
use vnet::tunnel::wire::{self, MSG_HELLO, MSG_MATRIX};
use vnet::tunnel::{
    Endpoint, Listener, MAX_PEERS_PER_ADDR, Proto, Tunnel, TunnelOptions, TunnelState, UdpKey,
};
use vnet::{DropReason, Frame, Mac, PortKind, PortSink, Switch, SwitchConfig};

fn switch() -> Arc<Switch> {
    Switch::new(SwitchConfig::default()).unwrap()
}

fn ep(proto: Proto, addr: SocketAddr) -> Endpoint {
    Endpoint {
        proto,
        addr: addr.to_string(),
    }
}

fn keyed(key: Option<&UdpKey>) -> TunnelOptions {
    TunnelOptions {
        udp_key: key.cloned(),
        ..Default::default()
    }
}

fn listen_udp(sw: &Arc<Switch>, key: Option<&UdpKey>) -> Listener {
    Listener::bind(
        sw,
        ep(Proto::Udp, "127.0.0.1:0".parse().unwrap()),
        &keyed(key),
    )
    .unwrap()
}

#[derive(Default)]
struct Collector(Mutex<Vec<Vec<u8>>>);

impl PortSink for Collector {
    fn send(&self, f: &dyn Frame) -> Result<(), DropReason> {
        let mut v = vec![0; f.len()];
        f.read_at(0, &mut v);
        self.0.lock().unwrap().push(v);
        Ok(())
    }
}

/// The first datagram a real connecting tunnel sends (with `key`).
fn first_hello(key: Option<&UdpKey>) -> Vec<u8> {
    let trap = UdpSocket::bind("127.0.0.1:0").unwrap();
    trap.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let sw = switch();
    let t = Tunnel::connect(&sw, ep(Proto::Udp, trap.local_addr().unwrap()), &keyed(key)).unwrap();
    let mut buf = [0u8; 2048];
    let (n, _) = trap.recv_from(&mut buf).unwrap();
    drop(t);
    buf[..n].to_vec()
}

/// Everything that arrives at `s` for `d`.
fn replies(s: &UdpSocket, d: Duration) -> Vec<Vec<u8>> {
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let end = Instant::now() + d;
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    while Instant::now() < end {
        if let Ok((n, _)) = s.recv_from(&mut buf) {
            got.push(buf[..n].to_vec());
        }
    }
    got
}

#[test]
fn a_hello_from_an_unconfirmed_source_gets_no_port_and_at_most_a_cookie() {
    let sw = switch();
    let l = listen_udp(&sw, None);
    // A real hello, sent again from an address that never answers (as a
    // forged source address would be).
    let hello = first_hello(None);
    let forged = UdpSocket::bind("127.0.0.1:0").unwrap();
    forged.send_to(&hello, l.local_addr()).unwrap();
    forged.send_to(&hello, l.local_addr()).unwrap();
    let got = replies(&forged, Duration::from_millis(1500));
    assert!(sw.ports().is_empty(), "{:?}", sw.ports());
    assert!(l.info().tunnels.is_empty(), "{:?}", l.info());
    assert!(got.len() <= 2, "{} datagrams back", got.len());
    for r in &got {
        assert!(
            r.len() <= hello.len(),
            "{} bytes back for {}",
            r.len(),
            hello.len()
        );
        assert_eq!(r[0], wire::MSG_COOKIE, "{r:?}");
    }
}

/// Two switches joined by a tunnel; a frame each way between ports that
/// collect what they get.
fn carries_frames(a: &Arc<Switch>, b: &Arc<Switch>) {
    let (ca, cb) = (
        Arc::new(Collector::default()),
        Arc::new(Collector::default()),
    );
    let pa = a.add_port("a", PortKind::Other, ca.clone());
    let pb = b.add_port("b", PortKind::Other, cb.clone());
    let (ma, mb) = (Mac::local(0xa), Mac::local(0xb));
    let to_b = build_frame(Mac::BROADCAST, ma, 0x0800, &[1; 100]);
    a.ingress_bytes(pa, &to_b);
    assert!(eventually(3, || cb.0.lock().unwrap().contains(&to_b)));
    let to_a = build_frame(ma, mb, 0x0800, &[2; 1400]);
    b.ingress_bytes(pb, &to_a);
    assert!(eventually(3, || ca.0.lock().unwrap().contains(&to_a)));
}

#[test]
fn a_real_udp_peer_comes_up_and_carries_frames() {
    let (a, b) = (switch(), switch());
    let l = listen_udp(&b, None);
    let t = Tunnel::connect(&a, ep(Proto::Udp, l.local_addr()), &keyed(None)).unwrap();
    assert!(
        eventually(5, || t.info().state == TunnelState::Up),
        "{:?}",
        t.info()
    );
    assert_eq!(l.info().tunnels.len(), 1);
    carries_frames(&a, &b);
}

fn forged_reports(from: u64, n: u64) -> Vec<u8> {
    let v: Vec<MatrixReport> = (from..from + n)
        .map(|origin| MatrixReport {
            origin,
            seq: 1,
            entries: Vec::new(),
            omitted: 0,
        })
        .collect();
    serde_json::to_vec(&v).unwrap()
}

/// A peer at `s` doing the UDP handshake by hand (no key): a hello, the
/// cookie back, the hello again with it, the listener's hello back, a
/// keepalive (the session's first datagram); true if the listener said
/// hello.
fn handshake(s: &UdpSocket, to: SocketAddr, origin: u64) -> bool {
    let nonce = [origin as u8; wire::NONCE_LEN];
    let hello = |cookie: &[u8; wire::COOKIE_LEN]| {
        let mut m = vec![MSG_HELLO];
        m.extend_from_slice(&wire::udp_hello(origin, cookie, &nonce));
        s.send_to(&m, to).unwrap();
    };
    hello(&wire::NO_COOKIE);
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 65536];
    let Ok((n, _)) = s.recv_from(&mut buf) else {
        return false;
    };
    assert_eq!(buf[0], wire::MSG_COOKIE);
    hello(&wire::parse_cookie(&buf[1..n]).unwrap());
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    while let Ok((n, _)) = s.recv_from(&mut buf) {
        if buf[0] == MSG_HELLO {
            let (_, echo, _) = wire::parse_udp_reply(&buf[1..n]).unwrap();
            assert_eq!(echo, nonce);
            s.send_to(&[wire::MSG_KEEPALIVE], to).unwrap();
            return true;
        }
    }
    false
}

/// Sends reports from 5,000 made-up origins, then one from origin 42;
/// once 42 is there, all were taken in, and the origins kept must be
/// under the cap.
fn forge_origins(sw: &Switch, mut send: impl FnMut(&[u8])) {
    for k in 0..50 {
        send(&forged_reports(1000 + k * 100, 100));
    }
    send(&forged_reports(42, 1));
    let matrix = sw.matrix();
    assert!(eventually(5, || matrix.remote_origins().contains(&42)));
    let n = matrix.remote_origins().len();
    assert!(n <= MAX_REMOTE_ORIGINS, "{n} origins kept");
    assert_eq!(matrix.reports_to_send().len(), n + 1);
}

#[test]
fn made_up_matrix_origins_stay_under_the_cap() {
    // A peer that is up sends reports from thousands of origins, over
    // UDP and over TCP.
    let sw = switch();
    let l = listen_udp(&sw, None);
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    assert!(handshake(&s, l.local_addr(), 1));
    forge_origins(&sw, |r| {
        let mut m = vec![MSG_MATRIX];
        m.extend_from_slice(r);
        s.send_to(&m, l.local_addr()).unwrap();
    });

    let sw = switch();
    let l = Listener::bind(
        &sw,
        ep(Proto::Tcp, "127.0.0.1:0".parse().unwrap()),
        &TunnelOptions::default(),
    )
    .unwrap();
    let mut c = TcpStream::connect(l.local_addr()).unwrap();
    let mut m = Vec::new();
    wire::encode_stream(&mut m, MSG_HELLO, &wire::hello(1));
    c.write_all(&m).unwrap();
    let mut h = [0u8; 4 + 1 + wire::HELLO_LEN];
    c.read_exact(&mut h).unwrap();
    forge_origins(&sw, |r| {
        m.clear();
        wire::encode_stream(&mut m, MSG_MATRIX, r);
        c.write_all(&m).unwrap();
    });
}

#[test]
fn udp_ports_per_address_are_capped() {
    let sw = switch();
    let l = listen_udp(&sw, None);
    let socks: Vec<UdpSocket> = (0..MAX_PEERS_PER_ADDR + 2)
        .map(|_| UdpSocket::bind("127.0.0.5:0").unwrap())
        .collect();
    let up = socks
        .iter()
        .enumerate()
        .filter(|(i, s)| handshake(s, l.local_addr(), 10 + *i as u64))
        .count();
    assert_eq!(up, MAX_PEERS_PER_ADDR);
    assert!(eventually(3, || sw.ports().len() == MAX_PEERS_PER_ADDR));
    assert_eq!(l.info().refused, 2);
    // Another address still gets in.
    let other = UdpSocket::bind("127.0.0.6:0").unwrap();
    assert!(handshake(&other, l.local_addr(), 99));
}

#[test]
fn with_a_udp_key_only_peers_that_have_it_come_up() {
    let key = UdpKey::new(b"correct horse battery staple").unwrap();
    let wrong = UdpKey::new(b"some other key of that length").unwrap();
    let b = switch();
    let l = listen_udp(&b, Some(&key));
    let (a, n, w) = (switch(), switch(), switch());
    let none = Tunnel::connect(&n, ep(Proto::Udp, l.local_addr()), &keyed(None)).unwrap();
    let bad = Tunnel::connect(&w, ep(Proto::Udp, l.local_addr()), &keyed(Some(&wrong))).unwrap();
    let good = Tunnel::connect(&a, ep(Proto::Udp, l.local_addr()), &keyed(Some(&key))).unwrap();
    assert!(
        eventually(5, || good.info().state == TunnelState::Up),
        "{:?}",
        good.info()
    );
    carries_frames(&a, &b);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(none.info().ups, 0, "{:?}", none.info());
    assert_eq!(bad.info().ups, 0, "{:?}", bad.info());
    assert_eq!(l.info().tunnels.len(), 1, "{:?}", l.info());
    assert!(n.ports().is_empty() && w.ports().is_empty());
    // A hello without the key gets nothing back, not even a cookie.
    let stranger = UdpSocket::bind("127.0.0.1:0").unwrap();
    stranger
        .send_to(&first_hello(None), l.local_addr())
        .unwrap();
    stranger
        .send_to(&first_hello(Some(&wrong)), l.local_addr())
        .unwrap();
    assert!(replies(&stranger, Duration::from_millis(500)).is_empty());
    // A connector with a key refuses a listener without it.
    let open = switch();
    let lo = listen_udp(&open, None);
    let t = Tunnel::connect(
        &switch(),
        ep(Proto::Udp, lo.local_addr()),
        &keyed(Some(&key)),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(t.info().ups, 0, "{:?}", t.info());
}

/// A switch whose own matrix has `pairs` pairs, one of them (0xb1 to
/// 0xb2) far bigger than the rest.
fn busy_switch(pairs: u32) -> Arc<Switch> {
    let sw = switch();
    let p = sw.add_port("local", PortKind::Other, Arc::new(Collector::default()));
    for i in 0..pairs {
        let f = build_frame(
            Mac::local(0x10_0000 + i),
            Mac::local(0x20_0000 + i),
            0x0800,
            &[0; 46],
        );
        sw.ingress_bytes(p, &f);
    }
    let big = build_frame(Mac::local(0xb2), Mac::local(0xb1), 0x0800, &[0; 1400]);
    for _ in 0..50 {
        sw.ingress_bytes(p, &big);
    }
    assert_eq!(sw.matrix().local().entries.len(), pairs as usize + 1);
    sw
}

#[test]
fn a_matrix_too_big_for_the_transport_still_reaches_peers_with_its_biggest_pairs() {
    // 8,000 pairs are about 1.4 MB of JSON: more than a UDP message (64
    // fragments) or a stream message (1 MiB) carries.
    let a = busy_switch(8000);
    for proto in [Proto::Udp, Proto::Tcp] {
        let b = switch();
        let l = Listener::bind(
            &b,
            ep(proto, "127.0.0.1:0".parse().unwrap()),
            &TunnelOptions::default(),
        )
        .unwrap();
        let t = Tunnel::connect(&a, ep(proto, l.local_addr()), &TunnelOptions::default()).unwrap();
        assert!(eventually(5, || t.info().state == TunnelState::Up));
        let origin = a.matrix().origin();
        assert!(
            eventually(5, || b.matrix().remote_origins().contains(&origin)),
            "{proto}: the report never came"
        );
        let g = b.matrix().global();
        assert!(
            g.iter()
                .any(|e| e.src == Mac::local(0xb1) && e.dst == Mac::local(0xb2)),
            "{proto}: the biggest pair is missing"
        );
    }
}
