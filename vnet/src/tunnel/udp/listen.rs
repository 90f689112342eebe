//! The UDP listener: one socket, every confirmed peer a port.
//!
//! A datagram from an address that has no port is answered only if it
//! is a hello (tagged, with a key): with a `COOKIE` no bigger than the
//! hello, unless it echoes a valid cookie, which proves the sender gets
//! datagrams at that address. Then the address gets a port, within the
//! listener's admission bounds. So a forged source address gets no
//! port and at most one small datagram back per datagram sent.

use super::sys::{self, datagrams, recv_gro, set_offloads};
use super::{RECV_BUF, UdpSink, decode, deliver, reassembler};
use crate::counters::DropReason;
use crate::frame::Bytes;
use crate::ratelimit::LogLimit;
use crate::switch::{PortId, PortKind, Switch};
use crate::tunnel::admission::{Admission, Ticket};
use crate::tunnel::auth::{Auth, Cookies, End, TAG_LEN, UdpKey};
use crate::tunnel::stream::Sessions;
use crate::tunnel::wire::{self, MSG_COOKIE, MSG_HELLO};
use crate::tunnel::{DEAD_AFTER, Proto, Role, Status, TICK, TunnelError, lock, next_id};
use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Instant;

struct Peer {
    port: PortId,
    status: Arc<Status>,
    sink: Arc<UdpSink>,
    reasm: wire::Reassembler,
    last_rx: Instant,
    /// Its place in the listener's bounds.
    _ticket: Ticket,
}

struct UdpListener {
    switch: Arc<Switch>,
    sock: Arc<UdpSocket>,
    mtu: usize,
    gso: bool,
    auth: Auth,
    cookies: Cookies,
    admission: Arc<Admission>,
    sessions: Sessions,
    peers: HashMap<SocketAddr, Peer>,
    /// The hello this listener answers with.
    hello: [u8; wire::UDP_HELLO_LEN],
    /// Datagrams from strangers that failed the key check.
    strangers_log: LogLimit,
}

/// The thread of a UDP listener.
pub(crate) fn listen_loop(
    switch: Arc<Switch>,
    stop: Arc<Status>,
    sock: Arc<UdpSocket>,
    mtu: usize,
    key: Option<UdpKey>,
    sessions: Sessions,
    admission: Arc<Admission>,
) {
    let gso = set_offloads(&sock, mtu);
    let hello = wire::udp_hello(switch.matrix().origin(), &wire::NO_COOKIE);
    let mut l = UdpListener {
        switch,
        sock,
        mtu,
        gso,
        auth: Auth::new(key.as_ref(), End::Listener),
        cookies: Cookies::new(),
        admission,
        sessions,
        peers: HashMap::new(),
        hello,
        strangers_log: LogLimit::default(),
    };
    let mut buf = vec![0u8; RECV_BUF];
    let mut last_tick = Instant::now();
    while !stop.stopped() {
        let now = Instant::now();
        if now.duration_since(last_tick) >= TICK {
            last_tick = now;
            l.tick(now);
        }
        let (n, from, seg) = match recv_gro(&l.sock, &mut buf) {
            Ok((n, Some(from), seg)) => (n, from, seg),
            Ok(_) => continue,
            Err(e) if sys::nothing_yet(&e) => continue,
            Err(e) => {
                tracing::debug!(error = %e, "UDP receive failed");
                continue;
            }
        };
        for d in datagrams(&buf[..n], seg) {
            l.datagram(d, from);
        }
    }
    for (_, p) in l.peers.drain() {
        let _ = l.switch.remove_port(p.port);
        p.status.down(&TunnelError::Closed);
    }
    lock(&l.sessions).clear();
}

impl UdpListener {
    /// Once a second: peers silent too long go; the others get a
    /// keepalive and the matrix.
    fn tick(&mut self, now: Instant) {
        let (switch, sessions) = (&self.switch, &self.sessions);
        self.peers.retain(|_, p| {
            if now.duration_since(p.last_rx) > DEAD_AFTER {
                let _ = switch.remove_port(p.port);
                // Logged there, with the peer's address.
                p.status.down(&TunnelError::Silent(DEAD_AFTER));
                lock(sessions).retain(|(s, _)| !Arc::ptr_eq(s, &p.status));
                return false;
            }
            p.sink.send_control(switch);
            true
        });
    }

    fn datagram(&mut self, d: &[u8], from: SocketAddr) {
        let Some(p) = self.peers.get_mut(&from) else {
            return self.stranger(d, from);
        };
        let Some(d) = self.auth.open(d) else {
            return self.switch.count_drop(p.port, DropReason::Unauthenticated);
        };
        p.last_rx = Instant::now();
        let lost = p.reasm.take_lost();
        for _ in 0..lost {
            self.switch.count_drop(p.port, DropReason::Reassembly);
        }
        match decode(d, &mut p.reasm) {
            Ok(Some(m)) => {
                if m[0] == MSG_HELLO {
                    // It did not hear ours; it is confirmed already.
                    let _ = p.sink.send_msg(MSG_HELLO, &Bytes(&self.hello));
                }
                deliver(&self.switch, p.port, m)
            }
            Ok(None) => {}
            Err(_) => self.switch.count_drop(p.port, DropReason::Malformed),
        }
    }

    /// Answers a hello from `to` with its cookie: `[COOKIE][cookie]`
    /// and the tag, smaller than the hello it answers.
    fn send_cookie(&mut self, to: SocketAddr) {
        const LEN: usize = 1 + wire::COOKIE_LEN;
        let mut out = [0u8; LEN + TAG_LEN];
        out[0] = MSG_COOKIE;
        out[1..LEN].copy_from_slice(&self.cookies.make(to));
        let tag = self.auth.tag(&out[..LEN]);
        let n = LEN + tag.as_slice().len();
        out[LEN..n].copy_from_slice(tag.as_slice());
        let _ = self.sock.send_to(&out[..n], to);
    }

    /// A datagram from an address without a port: a hello gets a cookie,
    /// or, if it echoes one, a port; anything else gets nothing.
    fn stranger(&mut self, d: &[u8], from: SocketAddr) {
        let Some(m) = self.auth.open(d) else {
            if let Some(held) = self.strangers_log.check() {
                tracing::debug!(peer = %from, held_back = held, "UDP datagram without a valid tag");
            }
            return;
        };
        if m.len() != 1 + wire::UDP_HELLO_LEN || m[0] != MSG_HELLO {
            return;
        }
        let Ok((id, cookie)) = wire::parse_udp_hello(&m[1..]) else {
            return;
        };
        if !self.cookies.check(from, &cookie) {
            return self.send_cookie(from);
        }
        let status = Arc::new(Status::new(
            next_id(),
            Proto::Udp,
            Role::Accepted,
            from.to_string(),
        ));
        let Some(ticket) = self.admission.admit(from.ip(), &status) else {
            return;
        };
        ticket.established();
        let sink = Arc::new(UdpSink::new(
            self.sock.clone(),
            Some(from),
            self.mtu,
            self.gso,
            self.auth.clone(),
        ));
        let _ = sink.send_msg(MSG_HELLO, &Bytes(&self.hello));
        let port = self
            .switch
            .add_port(&format!("udp:{from}"), PortKind::Tunnel, sink.clone());
        status.up(port, id);
        lock(&self.sessions).push((status.clone(), None));
        self.peers.insert(
            from,
            Peer {
                port,
                status,
                sink,
                reasm: reassembler(),
                last_rx: Instant::now(),
                _ticket: ticket,
            },
        );
    }
}
