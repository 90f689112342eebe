//! The UDP listener: one socket, every confirmed peer a port.
//!
//! A datagram from an address that has no session is looked at only if
//! it is a hello (its type and size checked before its tag). A hello
//! that does not echo a valid cookie gets a `COOKIE` no bigger than
//! itself. One that does, which proves the sender gets datagrams at that
//! address, starts a session within the listener's admission bounds: the
//! listener answers with its own hello (the first datagram of the
//! session, no bigger than the hello), and makes a port only when a
//! datagram of that session comes back. A session's keys come from both
//! hellos' nonces, so a hello recorded and sent again (from the old
//! address, within the cookie's lifetime) gets one answer and no port:
//! whoever sent it cannot answer in the new session. A forged source
//! address gets no port and at most one small datagram back per
//! datagram sent.

use super::sys::{self, datagrams, recv_gro, set_offloads};
use super::{RECV_BUF, UdpSink, decode, deliver, reassembler, send_handshake};
use crate::counters::DropReason;
use crate::frame::Bytes;
use crate::ratelimit::LogLimit;
use crate::switch::{PortId, PortKind, Switch};
use crate::tunnel::admission::{Admission, HANDSHAKE_DEADLINE, Ticket, neighbour_id};
use crate::tunnel::auth::{self, Auth, Cookies, End, Receiver, UdpKey};
use crate::tunnel::stream::Sessions;
use crate::tunnel::wire::{self, MSG_COOKIE, MSG_HELLO, Nonce};
use crate::tunnel::{DEAD_AFTER, Proto, Role, Status, TICK, TunnelError, lock, next_id};
use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Instant;

/// A session with a peer: answered (pending), or up once a datagram of
/// it came.
struct Peer {
    status: Arc<Status>,
    sink: Arc<UdpSink>,
    recv: Receiver,
    reasm: wire::Reassembler,
    last_rx: Instant,
    /// When the session was answered.
    since: Instant,
    /// The nonce of the hello that started it.
    nonce: Nonce,
    /// Our hello's payload, sent again if the peer says hello again.
    reply: [u8; wire::UDP_REPLY_LEN],
    /// The peer's switch id.
    origin: u64,
    /// The peer's address, as the traffic matrix knows it.
    neighbour: u128,
    /// Its port, once up.
    port: Option<PortId>,
    /// Its place in the listener's bounds.
    ticket: Ticket,
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
    /// Sessions that are up, by peer address.
    peers: HashMap<SocketAddr, Peer>,
    /// Sessions answered that no datagram of has come yet (at most
    /// [`crate::tunnel::MAX_PENDING`]: each holds an admission ticket).
    pending: HashMap<SocketAddr, Peer>,
    /// Datagrams from strangers that are not hellos or fail the key check.
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
    let mut l = UdpListener::new(switch, sock, mtu, key.as_ref(), sessions, admission);
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
    l.pending.clear();
    for (_, p) in l.peers.drain() {
        retire(&l.switch, &l.sessions, p, &TunnelError::Closed);
    }
    lock(&l.sessions).clear();
}

/// Takes down a session that was up.
fn retire(switch: &Switch, sessions: &Sessions, p: Peer, why: &TunnelError) {
    if let Some(port) = p.port {
        let _ = switch.remove_port(port);
    }
    // Logged there, with the peer's address.
    p.status.down(why);
    lock(sessions).retain(|(s, _)| !Arc::ptr_eq(s, &p.status));
}

/// Takes a datagram of `p`'s session (its counter and tag checked).
fn receive(switch: &Switch, p: &mut Peer, port: PortId, d: &[u8]) {
    p.last_rx = Instant::now();
    for _ in 0..p.reasm.take_lost() {
        switch.count_drop(port, DropReason::Reassembly);
    }
    match decode(d, &mut p.reasm) {
        Ok(Some(m)) => deliver(switch, port, p.neighbour, m),
        Ok(None) => {}
        Err(_) => switch.count_drop(port, DropReason::Malformed),
    }
}

impl UdpListener {
    fn new(
        switch: Arc<Switch>,
        sock: Arc<UdpSocket>,
        mtu: usize,
        key: Option<&UdpKey>,
        sessions: Sessions,
        admission: Arc<Admission>,
    ) -> UdpListener {
        let gso = set_offloads(&sock, mtu);
        UdpListener {
            switch,
            sock,
            mtu,
            gso,
            auth: Auth::new(key, End::Listener),
            cookies: Cookies::new(),
            admission,
            sessions,
            peers: HashMap::new(),
            pending: HashMap::new(),
            strangers_log: LogLimit::default(),
        }
    }

    /// Once a second: handshakes not confirmed in time, or stopped to
    /// make room, go; so do peers silent too long; the others get a
    /// keepalive and the matrix.
    fn tick(&mut self, now: Instant) {
        self.pending.retain(|_, p| {
            !p.status.stopped() && now.duration_since(p.since) <= HANDSHAKE_DEADLINE
        });
        let (switch, sessions) = (&self.switch, &self.sessions);
        let silent = |_: &SocketAddr, p: &mut Peer| now.duration_since(p.last_rx) > DEAD_AFTER;
        for (_, p) in self.peers.extract_if(silent) {
            retire(switch, sessions, p, &TunnelError::Silent(DEAD_AFTER));
        }
        for p in self.peers.values() {
            p.sink.send_control(switch);
        }
    }

    fn stranger(&self, from: SocketAddr, what: &str) {
        if let Some(held) = self.strangers_log.check() {
            tracing::debug!(peer = %from, held_back = held, "UDP datagram dropped: {what}");
        }
    }

    fn datagram(&mut self, d: &[u8], from: SocketAddr) {
        if d.len() == 1 + wire::UDP_HELLO_LEN + self.auth.handshake_overhead() && d[0] == MSG_HELLO
        {
            return self.hello(d, from);
        }
        // The first datagram of a session answered: now it is up.
        if let Some(p) = self.pending.get_mut(&from)
            && !p.status.stopped()
            && let Ok(body) = p.recv.open(d)
            && let Some(p) = self.pending.remove(&from)
        {
            let port = self.up(from, p);
            if let Some(p) = self.peers.get_mut(&from) {
                receive(&self.switch, p, port, body);
            }
            return;
        }
        let Some(p) = self.peers.get_mut(&from) else {
            return self.stranger(from, "no session");
        };
        let Some(port) = p.port else {
            return;
        };
        match p.recv.open(d) {
            Ok(body) => receive(&self.switch, p, port, body),
            Err(why) => self.switch.count_drop(port, why),
        }
    }

    /// A session's first datagram came: it gets its port (in place of an
    /// older session from the same address).
    fn up(&mut self, from: SocketAddr, mut p: Peer) -> PortId {
        if let Some(old) = self.peers.remove(&from) {
            retire(&self.switch, &self.sessions, old, &TunnelError::Closed);
        }
        p.ticket.established();
        let port = self
            .switch
            .add_port(&format!("udp:{from}"), PortKind::Tunnel, p.sink.clone());
        p.port = Some(port);
        p.status.up(port, p.origin);
        lock(&self.sessions).push((p.status.clone(), None));
        self.peers.insert(from, p);
        port
    }

    /// A hello (of a hello's size): a cookie for one without a valid
    /// cookie; the answer again for one whose session was answered; a
    /// new session otherwise.
    fn hello(&mut self, d: &[u8], from: SocketAddr) {
        let Some(m) = self.auth.open_handshake(d, &[]) else {
            match self.peers.get(&from).and_then(|p| p.port) {
                Some(port) => self.switch.count_drop(port, DropReason::Unauthenticated),
                None => self.stranger(from, "hello without a valid tag"),
            }
            return;
        };
        let Ok((origin, cookie, nonce)) = wire::parse_udp_hello(&m[1..]) else {
            return self.stranger(from, "not a hello of this version");
        };
        if !self.cookies.check(from, &cookie) {
            // `[COOKIE][cookie]` and the tag, bound to the hello's nonce:
            // smaller than the hello it answers.
            let mut c = [0u8; 1 + wire::COOKIE_LEN];
            c[0] = MSG_COOKIE;
            c[1..].copy_from_slice(&self.cookies.make(from));
            return send_handshake(&self.sock, Some(from), &self.auth, &c, &nonce);
        }
        if let Some(p) = self.pending.get(&from)
            && p.nonce == nonce
            && !p.status.stopped()
        {
            // It did not hear our answer.
            let _ = p.sink.send_msg(MSG_HELLO, &Bytes(&p.reply));
            return;
        }
        if let Some(p) = self.peers.get(&from)
            && p.nonce == nonce
        {
            // The hello of a session that is up: the connector says
            // hello no more once it is, so someone sent it again.
            if let Some(port) = p.port {
                self.switch.count_drop(port, DropReason::Replayed);
            }
            return;
        }
        // A new session (in place of one this address left unanswered).
        self.pending.remove(&from);
        let status = Arc::new(Status::new(
            next_id(),
            Proto::Udp,
            Role::Accepted,
            from.to_string(),
        ));
        let Some(ticket) = self.admission.admit(from.ip(), &status) else {
            return;
        };
        let ours = auth::nonce();
        let (send, recv) = self.auth.session(&nonce, &ours);
        let sink = Arc::new(UdpSink::new(
            self.sock.clone(),
            Some(from),
            self.mtu,
            self.gso,
            send,
        ));
        let reply = wire::udp_reply(self.switch.matrix().origin(), &nonce, &ours);
        let _ = sink.send_msg(MSG_HELLO, &Bytes(&reply));
        let now = Instant::now();
        self.pending.insert(
            from,
            Peer {
                status,
                sink,
                recv,
                reasm: reassembler(),
                last_rx: now,
                since: now,
                nonce,
                reply,
                origin,
                neighbour: neighbour_id(from.ip()),
                port: None,
                ticket,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::switch::SwitchConfig;
    use crate::tunnel::auth::CHECKED;

    fn listener(key: &UdpKey) -> UdpListener {
        UdpListener::new(
            Switch::new(SwitchConfig::default()).unwrap(),
            Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap()),
            1472,
            Some(key),
            Arc::default(),
            Arc::default(),
        )
    }

    #[test]
    fn a_strangers_datagram_of_the_wrong_size_or_type_costs_no_hmac() {
        let key = UdpKey::new(&[7; 32]).unwrap();
        let mut l = listener(&key);
        let from: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let checked = || CHECKED.with(|c| c.get());
        let before = checked();
        // A 64 KiB datagram, a frame, a hello one byte short.
        l.datagram(&vec![MSG_HELLO; 65000], from);
        l.datagram(&vec![wire::MSG_FRAME; 1400], from);
        let mut hello = vec![MSG_HELLO; 1 + wire::UDP_HELLO_LEN + auth::TAG_LEN];
        l.datagram(&hello[1..], from);
        assert_eq!(checked(), before, "a tag was checked");
        // A hello of the right size is checked (and fails).
        hello[0] = MSG_HELLO;
        l.datagram(&hello, from);
        assert_eq!(checked(), before + 1);
        assert!(l.peers.is_empty() && l.pending.is_empty());
    }
}
