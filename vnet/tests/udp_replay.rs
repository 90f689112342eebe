//! Keyed UDP tunnels against an on-path attacker that records datagrams
//! and sends them again: replayed frames, keepalives and hellos, and
//! datagrams of one session sent on another.

mod common;

use common::eventually;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use vnet::frame::build_frame;
use vnet::tunnel::wire::{MSG_FRAME, MSG_HELLO, MSG_KEEPALIVE};
use vnet::tunnel::{Endpoint, Listener, Proto, Tunnel, TunnelOptions, TunnelState, UdpKey};
use vnet::{DropReason, Frame, Mac, PortId, PortKind, PortSink, Switch, SwitchConfig};

fn switch() -> Arc<Switch> {
    Switch::new(SwitchConfig::default()).unwrap()
}

fn key() -> UdpKey {
    UdpKey::new(b"a key both ends have, 32 bytes..").unwrap()
}

fn keyed() -> TunnelOptions {
    TunnelOptions {
        udp_key: Some(key()),
        ..Default::default()
    }
}

fn udp(addr: SocketAddr) -> Endpoint {
    Endpoint {
        proto: Proto::Udp,
        addr: addr.to_string(),
    }
}

#[derive(Default)]
struct Collector(Mutex<Vec<Vec<u8>>>);

impl Collector {
    fn count(&self, f: &[u8]) -> usize {
        self.0.lock().unwrap().iter().filter(|g| *g == f).count()
    }
}

impl PortSink for Collector {
    fn send(&self, f: &dyn Frame) -> Result<(), DropReason> {
        let mut v = vec![0; f.len()];
        f.read_at(0, &mut v);
        self.0.lock().unwrap().push(v);
        Ok(())
    }
}

/// A man in the middle: the connector talks to `front`, the listener
/// hears it from `back`; every datagram the connector sends is kept.
struct Relay {
    back: Arc<UdpSocket>,
    front_addr: SocketAddr,
    /// What the connector sent, in order.
    sent: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Sizes of what the listener sent while the link was cut.
    unheard: Arc<Mutex<Vec<usize>>>,
    /// Forward at all (off: the link is cut).
    on: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    fn new(listener: SocketAddr) -> Relay {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
        for s in [&front, &back] {
            s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        }
        let sent: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let unheard: Arc<Mutex<Vec<usize>>> = Arc::default();
        let on = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let connector: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let mut threads = Vec::new();
        {
            let (front, back, sent, on, stop, connector) = (
                front.clone(),
                back.clone(),
                sent.clone(),
                on.clone(),
                stop.clone(),
                connector.clone(),
            );
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                while !stop.load(Relaxed) {
                    let Ok((n, from)) = front.recv_from(&mut buf) else {
                        continue;
                    };
                    *connector.lock().unwrap() = Some(from);
                    if on.load(Relaxed) {
                        sent.lock().unwrap().push(buf[..n].to_vec());
                        let _ = back.send_to(&buf[..n], listener);
                    }
                }
            }));
        }
        {
            let (front, back, on, stop, unheard) = (
                front.clone(),
                back.clone(),
                on.clone(),
                stop.clone(),
                unheard.clone(),
            );
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                while !stop.load(Relaxed) {
                    let Ok((n, _)) = back.recv_from(&mut buf) else {
                        continue;
                    };
                    let to = *connector.lock().unwrap();
                    match (to, on.load(Relaxed)) {
                        (Some(to), true) => {
                            let _ = front.send_to(&buf[..n], to);
                        }
                        _ => unheard.lock().unwrap().push(n),
                    }
                }
            }));
        }
        Relay {
            front_addr: front.local_addr().unwrap(),
            back,
            sent,
            unheard,
            on,
            stop,
            threads,
        }
    }

    /// The address the listener knows the connector by.
    fn peer_addr(&self) -> SocketAddr {
        self.back.local_addr().unwrap()
    }

    /// The last datagram the connector sent that `pick` likes.
    fn captured(&self, pick: impl Fn(&[u8]) -> bool) -> Vec<u8> {
        let sent = self.sent.lock().unwrap();
        sent.iter().rev().find(|d| pick(d)).cloned().unwrap()
    }

    /// Sends `d` to the listener from the connector's address.
    fn replay(&self, d: &[u8], listener: SocketAddr) {
        self.back.send_to(d, listener).unwrap();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A keyed listener on `b` with a port that collects frames.
fn keyed_listener(b: &Arc<Switch>) -> (Listener, Arc<Collector>) {
    let l = Listener::bind(b, udp("127.0.0.1:0".parse().unwrap()), &keyed()).unwrap();
    let c = Arc::new(Collector::default());
    b.add_port("collect", PortKind::Other, c.clone());
    (l, c)
}

/// A connector on `a` to `l` through `relay`, up.
fn connect_through(a: &Arc<Switch>, relay: &Relay) -> Tunnel {
    let t = Tunnel::connect(a, udp(relay.front_addr), &keyed()).unwrap();
    assert!(
        eventually(5, || t.info().state == TunnelState::Up),
        "{:?}",
        t.info()
    );
    t
}

/// The listener's port for the peer at `addr`, once up.
fn port_of(l: &Listener, addr: SocketAddr) -> PortId {
    let mut port = None;
    assert!(
        eventually(5, || {
            port = l
                .info()
                .tunnels
                .iter()
                .find(|t| t.peer == addr.to_string() && t.state == TunnelState::Up)
                .and_then(|t| t.port);
            port.is_some()
        }),
        "{:?}",
        l.info()
    );
    port.unwrap()
}

fn dropped(sw: &Switch, port: PortId, why: DropReason) -> u64 {
    sw.port(port).map_or(0, |p| p.counters.dropped(why))
}

/// Sends a broadcast frame with `payload` into `a` by a new port; returns
/// the frame once the collector on `b` has it.
fn frame_across(a: &Switch, c: &Collector, src: u32, payload: &[u8]) -> Vec<u8> {
    let p = a.add_port(
        &format!("src{src}"),
        PortKind::Other,
        Arc::new(Collector::default()),
    );
    let f = build_frame(Mac::BROADCAST, Mac::local(src), 0x0800, payload);
    a.ingress_bytes(p, &f);
    assert!(eventually(3, || c.count(&f) == 1));
    f
}

#[test]
fn replayed_frames_and_keepalives_are_dropped_and_counted() {
    let (a, b) = (switch(), switch());
    let (l, c) = keyed_listener(&b);
    let relay = Relay::new(l.local_addr());
    let _t = connect_through(&a, &relay);
    let port = port_of(&l, relay.peer_addr());
    let f = frame_across(&a, &c, 0xa1, b"a frame recorded on its way");
    let data = relay.captured(|d| d[0] == MSG_FRAME && d.windows(f.len()).any(|w| w == f));
    assert!(eventually(3, || relay
        .sent
        .lock()
        .unwrap()
        .iter()
        .any(|d| d[0] == MSG_KEEPALIVE)));
    let keepalive = relay.captured(|d| d[0] == MSG_KEEPALIVE);
    // The hello that started the session, too.
    let hello = relay.captured(|d| d[0] == MSG_HELLO);
    for _ in 0..3 {
        relay.replay(&data, l.local_addr());
        relay.replay(&keepalive, l.local_addr());
    }
    relay.replay(&hello, l.local_addr());
    assert!(
        eventually(3, || dropped(&b, port, DropReason::Replayed) >= 7),
        "{:?}",
        b.port(port)
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(c.count(&f), 1, "a replayed frame got in");
    // The tunnel itself is fine.
    frame_across(&a, &c, 0xa2, b"after the replay");
}

#[test]
fn a_datagram_of_another_session_is_refused() {
    let (a1, a2, b) = (switch(), switch(), switch());
    let (l, c) = keyed_listener(&b);
    let (r1, r2) = (Relay::new(l.local_addr()), Relay::new(l.local_addr()));
    let _t1 = connect_through(&a1, &r1);
    let _t2 = connect_through(&a2, &r2);
    let p2 = port_of(&l, r2.peer_addr());
    let f = frame_across(&a1, &c, 0xb1, b"sent on the first session");
    let data = r1.captured(|d| d[0] == MSG_FRAME && d.windows(f.len()).any(|w| w == f));
    // The first session's datagram, from the second session's address.
    r2.replay(&data, l.local_addr());
    assert!(
        eventually(3, || dropped(&b, p2, DropReason::Unauthenticated) >= 1),
        "{:?}",
        b.port(p2)
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(c.count(&f), 1, "it got in on the second session");
}

#[test]
fn a_replayed_hello_from_an_old_address_makes_no_port() {
    let (a, b) = (switch(), switch());
    let (l, _c) = keyed_listener(&b);
    let relay = Relay::new(l.local_addr());
    let t = connect_through(&a, &relay);
    port_of(&l, relay.peer_addr());
    // The hello that echoed the cookie (the last one the connector sent)
    // and a keepalive.
    let hello = relay.captured(|d| d[0] == MSG_HELLO);
    let keepalive = relay.captured(|d| d[0] == MSG_KEEPALIVE);
    // The connector goes; the listener drops its silent peer.
    relay.on.store(false, Relaxed);
    drop(t);
    assert!(
        eventually(10, || l.info().tunnels.is_empty() && b.ports().len() == 1),
        "{:?}",
        l.info()
    );
    // Within the cookie's lifetime, the attacker sends it all again from
    // the peer's old address.
    relay.unheard.lock().unwrap().clear();
    for _ in 0..3 {
        relay.replay(&hello, l.local_addr());
        std::thread::sleep(Duration::from_millis(50));
        relay.replay(&keepalive, l.local_addr());
    }
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(b.ports().len(), 1, "{:?}", b.ports());
    // The old address got at most one answer per hello, none bigger.
    let unheard = relay.unheard.lock().unwrap().clone();
    assert!(unheard.len() <= 3, "{unheard:?}");
    assert!(
        unheard.iter().all(|&n| n <= hello.len()),
        "{unheard:?} for {}",
        hello.len()
    );
    assert!(
        l.info().tunnels.iter().all(|t| t.ups == 0),
        "{:?}",
        l.info()
    );
}
