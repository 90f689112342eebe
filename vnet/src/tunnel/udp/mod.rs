//! UDP tunnels: one message per datagram, fragmented within the tunnel
//! protocol when bigger than the path MTU. One thread per socket does
//! the receiving, the hellos, keepalives and matrix reports; frames are
//! sent straight from the switch's threads.
//!
//! A connecting tunnel says hello (with a fresh nonce) until the listener
//! answers with its own, the first datagram of their session; a listener
//! answers a hello from an address it has not confirmed with a cookie
//! only, and makes a port once a datagram of the session comes back (see
//! `listen.rs`). With a key, handshake datagrams carry a tag, session
//! datagrams a counter and a tag; those without a valid tag are dropped,
//! and so are those whose counter was seen ([`super::auth`]).

mod listen;
mod sys;

pub(crate) use listen::listen_loop;

use super::admission::neighbour_id;
use super::auth::{self, Auth, End, Receiver, Sender, UdpKey};
use super::wire::{
    self, FRAG_HEADER, HELLO_LEN, MSG_COOKIE, MSG_FRAG, MSG_FRAME, MSG_FRAME_HDR, MSG_HELLO,
    MSG_KEEPALIVE, MSG_MATRIX, NONCE_LEN, Nonce, Reassembler,
};
use super::{
    BACKOFF_MIN, DEAD_AFTER, Endpoint, Status, TICK, TunnelError, lock, next_backoff, reconnect,
};
use crate::counters::DropReason;
use crate::frame::{Bytes, Frame, NetHdr};
use crate::matrix::MatrixReport;
use crate::switch::{PortId, PortKind, PortSink, Switch};
use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use sys::{bind_any, clear_segment, datagrams, recv_gro, set_bufs, set_offloads};

/// How long a receive waits before the thread looks at its timers and
/// whether it must stop.
const POLL: Duration = Duration::from_millis(100);
/// Largest reassembled message: a 64 KiB super-frame with its headers,
/// or a matrix report, in at most [`wire::MAX_FRAGS`] fragments.
const MAX_MSG: usize = 1 << 17;
/// Messages being reassembled at once per peer: a few frames in flight.
const REASSEMBLY_SLOTS: usize = 8;
/// A message whose fragments have not all come in this time is lost.
const REASSEMBLY_TIMEOUT: Duration = Duration::from_secs(1);
/// Receive buffer: the biggest GRO batch.
const RECV_BUF: usize = 65536;

fn reassembler() -> Reassembler {
    Reassembler::new(REASSEMBLY_SLOTS, REASSEMBLY_TIMEOUT)
}

struct Scratch {
    msg: Vec<u8>,
    dgram: Vec<u8>,
    batch: Vec<u8>,
}

/// Sends messages to one peer (on a connected socket, or to `dest`).
pub(crate) struct UdpSink {
    sock: Arc<UdpSocket>,
    dest: Option<SocketAddr>,
    mtu: usize,
    next_id: AtomicU32,
    /// The socket cuts big sends into `mtu` datagrams (UDP_SEGMENT).
    gso: AtomicBool,
    /// Numbers and tags each datagram (with a key).
    session: Sender,
    scratch: Mutex<Scratch>,
}

impl UdpSink {
    fn new(
        sock: Arc<UdpSocket>,
        dest: Option<SocketAddr>,
        mtu: usize,
        gso: bool,
        session: Sender,
    ) -> UdpSink {
        UdpSink {
            sock,
            dest,
            mtu,
            next_id: AtomicU32::new(0),
            gso: AtomicBool::new(gso),
            session,
            scratch: Mutex::new(Scratch {
                msg: Vec::with_capacity(16 * 1024),
                dgram: Vec::with_capacity(mtu),
                batch: Vec::with_capacity(64 * 1024),
            }),
        }
    }

    fn send_raw(&self, b: &[u8]) -> std::io::Result<usize> {
        match self.dest {
            Some(a) => self.sock.send_to(b, a),
            None => self.sock.send(b),
        }
    }

    fn send_dgram(&self, b: &[u8]) -> Result<(), DropReason> {
        self.send_raw(b)
            .map(|_| ())
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::ENOBUFS) => DropReason::QueueFull,
                Some(libc::EMSGSIZE) => DropReason::PathMtu,
                _ => DropReason::TxError,
            })
    }

    /// Sends back-to-back `mtu`-byte datagrams (the last may be shorter)
    /// in one system call if the socket segments, else one by one.
    fn send_batch(&self, b: &[u8]) -> Result<(), DropReason> {
        if self.gso.load(Relaxed) {
            match self.send_raw(b) {
                Ok(_) => return Ok(()),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::EINVAL)) => {
                    tracing::debug!(error = %e, "UDP segmentation offload refused; sending datagrams one by one");
                    self.gso.store(false, Relaxed);
                    clear_segment(&self.sock);
                }
                Err(_) => return self.send_dgram(b),
            }
        }
        for d in b.chunks(self.mtu) {
            self.send_dgram(d)?;
        }
        Ok(())
    }

    /// Sends one message of type `ty`, fragmenting it if needed.
    fn send_msg(&self, ty: u8, payload: &dyn Frame) -> Result<(), DropReason> {
        self.send_msg_with(ty, None, payload)
    }

    /// Sends type, the virtio-net header if any, payload as one message.
    fn send_msg_with(
        &self,
        ty: u8,
        hdr: Option<&[u8; NetHdr::LEN]>,
        payload: &dyn Frame,
    ) -> Result<(), DropReason> {
        let mut g = lock(&self.scratch);
        let Scratch { msg, dgram, batch } = &mut *g;
        let mut head = [0u8; 1 + NetHdr::LEN];
        head[0] = ty;
        let hl = match hdr {
            Some(h) => {
                head[1..].copy_from_slice(h);
                head.len()
            }
            None => 1,
        };
        if !super::append_frame(payload, &head[..hl], msg) {
            return Err(DropReason::TxError);
        }
        // Each datagram is at most `mtu` bytes, its counter and tag
        // included.
        let tag_len = self.session.overhead();
        if msg.len() + tag_len <= self.mtu {
            let t = self.session.seal(msg)?;
            msg.extend_from_slice(t.as_slice());
            return self.send_dgram(msg);
        }
        let id = self.next_id.fetch_add(1, Relaxed);
        let per = if self.gso.load(Relaxed) {
            (60_000 / self.mtu).clamp(1, wire::MAX_FRAGS)
        } else {
            1
        };
        let mut res = Ok(());
        let mut k = 0;
        batch.clear();
        let r = wire::fragment(msg, id, self.mtu.saturating_sub(tag_len), dgram, |d| {
            let t = match self.session.seal(d) {
                Ok(t) => t,
                Err(e) => {
                    res = Err(e);
                    return false;
                }
            };
            batch.extend_from_slice(d);
            batch.extend_from_slice(t.as_slice());
            k += 1;
            if k == per {
                res = self.send_batch(batch);
                batch.clear();
                k = 0;
            }
            res.is_ok()
        });
        if r.is_err() {
            return Err(DropReason::PathMtu);
        }
        if k > 0 && res.is_ok() {
            res = self.send_batch(batch);
        }
        res
    }

    /// Largest message (type byte included) this sink sends: what
    /// [`wire::MAX_FRAGS`] fragments carry, and a peer reassembles.
    fn max_msg(&self) -> usize {
        let per = self
            .mtu
            .saturating_sub(self.session.overhead() + FRAG_HEADER);
        (wire::MAX_FRAGS * per).min(MAX_MSG)
    }

    /// A keepalive and the matrix reports, trimmed to what one message
    /// carries (built once per tick for all peers).
    fn send_control(&self, switch: &Switch) {
        let _ = self.send_msg(MSG_KEEPALIVE, &Bytes(&[]));
        let m = switch
            .matrix()
            .encoded_reports(self.max_msg().saturating_sub(1));
        let _ = self.send_msg(MSG_MATRIX, &Bytes(&m));
    }
}

impl PortSink for UdpSink {
    fn send(&self, frame: &dyn Frame) -> Result<(), DropReason> {
        match frame.net_hdr() {
            Some(h) => self.send_msg_with(MSG_FRAME_HDR, Some(&h.to_bytes()), frame),
            None => self.send_msg(MSG_FRAME, frame),
        }
    }

    fn offloads(&self) -> bool {
        true
    }
}

/// A whole message from a datagram (reassembling fragments).
fn decode<'a>(d: &'a [u8], r: &'a mut Reassembler) -> Result<Option<&'a [u8]>, wire::WireError> {
    match d.first() {
        None => Err(wire::WireError::BadLength(0)),
        Some(&MSG_FRAG) => r.push(d, MAX_MSG),
        Some(_) => Ok(Some(d)),
    }
}

/// Handles a message of a peer that is up; `neighbour` names it to the
/// traffic matrix.
fn deliver(switch: &Switch, port: PortId, neighbour: u128, m: &[u8]) {
    match m[0] {
        MSG_FRAME | MSG_FRAME_HDR => super::ingress_msg(switch, port, m[0], &m[1..]),
        MSG_MATRIX => match serde_json::from_slice::<Vec<MatrixReport>>(&m[1..]) {
            Ok(v) => switch.matrix().merge_from(neighbour, v),
            Err(_) => switch.count_drop(port, DropReason::Malformed),
        },
        MSG_KEEPALIVE | MSG_HELLO | MSG_COOKIE => {}
        _ => switch.count_drop(port, DropReason::Malformed),
    }
}

/// The thread of a connecting UDP tunnel.
pub(crate) fn connect_loop(
    switch: Arc<Switch>,
    status: Arc<Status>,
    ep: Endpoint,
    mtu: usize,
    key: Option<UdpKey>,
) {
    let auth = Auth::new(key.as_ref(), End::Connector);
    reconnect(&status, || {
        let mut port = None;
        let r = session(&switch, &status, &ep, mtu, &auth, &mut port);
        if let Some(p) = port {
            let _ = switch.remove_port(p);
        }
        r
    });
}

/// Sends handshake datagram `body` on `sock` (connected, or to `to`),
/// tagged over `body` and `context`.
fn send_handshake(
    sock: &UdpSocket,
    to: Option<SocketAddr>,
    auth: &Auth,
    body: &[u8],
    context: &[u8],
) {
    let mut d = [0u8; 1 + wire::UDP_HELLO_LEN + auth::TAG_LEN];
    let Some(out) = auth.seal_handshake(body, context, &mut d) else {
        return;
    };
    let _ = match to {
        Some(a) => sock.send_to(out, a),
        None => sock.send(out),
    };
}

/// A link that is up: its port, how it sends and how it checks.
struct Up {
    port: PortId,
    sink: Arc<UdpSink>,
    recv: Receiver,
    /// The listener's switch id.
    peer: u64,
}

/// What a connector makes of a datagram before its session is up: a
/// cookie to echo, or the listener's hello that starts the session.
enum Answer {
    Cookie([u8; wire::COOKIE_LEN]),
    Hello(Box<Up>),
}

/// The listener's answer to the hello with `nonce`, if `d` is one (its
/// type, size and echoed nonce are looked at before any tag).
fn answer(
    d: &[u8],
    auth: &Auth,
    nonce: &Nonce,
    mk: impl FnOnce(Sender) -> Arc<UdpSink>,
) -> Option<Answer> {
    let cookie_len = 1 + wire::COOKIE_LEN + auth.handshake_overhead();
    let hello_len = 1 + wire::UDP_REPLY_LEN + auth.session_overhead();
    match d.first() {
        Some(&MSG_COOKIE) if d.len() == cookie_len => {
            let m = auth.open_handshake(d, nonce)?;
            wire::parse_cookie(&m[1..]).ok().map(Answer::Cookie)
        }
        Some(&MSG_HELLO)
            if d.len() == hello_len
                && d.get(1 + HELLO_LEN..1 + HELLO_LEN + NONCE_LEN) == Some(&nonce[..]) =>
        {
            let (_, _, theirs) = wire::parse_udp_reply(&d[1..1 + wire::UDP_REPLY_LEN]).ok()?;
            let (send, mut recv) = auth.session(nonce, &theirs);
            let m = recv.open(d).ok()?;
            let (peer, _, _) = wire::parse_udp_reply(&m[1..]).ok()?;
            Some(Answer::Hello(Box::new(Up {
                port: 0,
                sink: mk(send),
                recv,
                peer,
            })))
        }
        _ => None,
    }
}

fn session(
    switch: &Arc<Switch>,
    status: &Status,
    ep: &Endpoint,
    mtu: usize,
    auth: &Auth,
    port: &mut Option<PortId>,
) -> Result<(), TunnelError> {
    let addr = ep.resolve()?;
    let sock = bind_any(&addr)?;
    sock.connect(addr)?;
    set_bufs(&sock);
    sock.set_read_timeout(Some(POLL))?;
    let sock = Arc::new(sock);
    *lock(&status.udp) = Some(sock.clone());
    if status.stopped() {
        return Ok(());
    }
    let gso = set_offloads(&sock, mtu);
    let origin = switch.matrix().origin();
    let neighbour = neighbour_id(addr.ip());
    // This session's: a new one each time.
    let nonce = auth::nonce();
    // What the listener gave us to echo; none at first.
    let mut cookie = wire::NO_COOKIE;
    let started = Instant::now();
    let (mut hello_every, mut next_hello) = (BACKOFF_MIN, started);
    let (mut last_rx, mut last_tick) = (started, started);
    let mut buf = vec![0u8; RECV_BUF];
    let mut reasm = reassembler();
    let name = format!("udp:{}", ep.addr);
    let mut up: Option<Up> = None;
    while !status.stopped() {
        let now = Instant::now();
        match &up {
            None => {
                if now >= next_hello {
                    let mut m = [0u8; 1 + wire::UDP_HELLO_LEN];
                    m[0] = MSG_HELLO;
                    m[1..].copy_from_slice(&wire::udp_hello(origin, &cookie, &nonce));
                    send_handshake(&sock, None, auth, &m, &[]);
                    next_hello = now + hello_every;
                    hello_every = next_backoff(hello_every);
                }
                if now.duration_since(started) > DEAD_AFTER {
                    return Err(TunnelError::Silent(DEAD_AFTER));
                }
            }
            Some(u) => {
                if now.duration_since(last_rx) > DEAD_AFTER {
                    return Err(TunnelError::Silent(DEAD_AFTER));
                }
                if now.duration_since(last_tick) >= TICK {
                    last_tick = now;
                    u.sink.send_control(switch);
                }
            }
        }
        let (n, seg) = match recv_gro(&sock, &mut buf) {
            Ok((n, _, seg)) => (n, seg),
            Err(e) if sys::nothing_yet(&e) => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => return Err(TunnelError::Refused),
            Err(e) => return Err(e.into()),
        };
        for d in datagrams(&buf[..n], seg) {
            let Some(u) = &mut up else {
                let mk = |send| Arc::new(UdpSink::new(sock.clone(), None, mtu, gso, send));
                match answer(d, auth, &nonce, mk) {
                    // Echo it at once: the listener answers a hello with
                    // a valid cookie.
                    Some(Answer::Cookie(c)) => {
                        cookie = c;
                        next_hello = Instant::now();
                    }
                    Some(Answer::Hello(mut u)) => {
                        u.port = switch.add_port(&name, PortKind::Tunnel, u.sink.clone());
                        *port = Some(u.port);
                        status.up(u.port, u.peer);
                        // The first datagrams of the session: the
                        // listener makes its port when they come.
                        (last_rx, last_tick) = (Instant::now(), Instant::now());
                        u.sink.send_control(switch);
                        up = Some(*u);
                    }
                    None => {}
                }
                continue;
            };
            let d = match u.recv.open(d) {
                Ok(d) => d,
                Err(why) => {
                    switch.count_drop(u.port, why);
                    continue;
                }
            };
            last_rx = Instant::now();
            for _ in 0..reasm.take_lost() {
                switch.count_drop(u.port, DropReason::Reassembly);
            }
            match decode(d, &mut reasm) {
                Ok(Some(m)) => deliver(switch, u.port, neighbour, m),
                Ok(None) => {}
                Err(_) => switch.count_drop(u.port, DropReason::Malformed),
            }
        }
    }
    Ok(())
}

pub(crate) fn bind(ep: &Endpoint) -> Result<Arc<UdpSocket>, TunnelError> {
    let s = UdpSocket::bind(ep.resolve()?)?;
    set_bufs(&s);
    s.set_read_timeout(Some(POLL))?;
    Ok(Arc::new(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends `frames` through a sink and reassembles what arrives.
    fn round_trip(
        gso_wanted: bool,
        mtu: usize,
        key: Option<&UdpKey>,
        frames: &[Vec<u8>],
    ) -> Vec<Vec<u8>> {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        set_bufs(&rx);
        set_offloads(&rx, mtu);
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.connect(rx.local_addr().unwrap()).unwrap();
        let gso = gso_wanted && set_offloads(&tx, mtu);
        assert_eq!(gso, gso_wanted, "this kernel has UDP_SEGMENT");
        let (n1, n2) = (auth::nonce(), auth::nonce());
        let (ta, _) = Auth::new(key, End::Connector).session(&n1, &n2);
        let (_, mut ra) = Auth::new(key, End::Listener).session(&n1, &n2);
        let sink = UdpSink::new(Arc::new(tx), None, mtu, gso, ta);
        for f in frames {
            sink.send(&Bytes(f)).unwrap();
        }
        let mut r = reassembler();
        let mut buf = vec![0u8; 65536];
        let mut got = Vec::new();
        while got.len() < frames.len() {
            let Ok((n, _, seg)) = recv_gro(&rx, &mut buf) else {
                break;
            };
            for d in datagrams(&buf[..n], seg) {
                assert!(d.len() <= mtu);
                let d = ra.open(d).expect("a valid tag, once");
                if let Ok(Some(m)) = decode(d, &mut r) {
                    assert_eq!(m[0], MSG_FRAME);
                    got.push(m[1..].to_vec());
                }
            }
        }
        got
    }

    #[test]
    fn frames_of_every_size_cross_in_fragments_with_and_without_segmentation_offload() {
        let frames: Vec<Vec<u8>> = [60usize, 1471, 1472, 1473, 3000, 9018, 65000]
            .iter()
            .map(|&n| (0..n).map(|i| (i * 7 % 256) as u8).collect())
            .collect();
        let key = UdpKey::new(b"a key of some twenty bytes").unwrap();
        for gso in [false, true] {
            for k in [None, Some(&key)] {
                assert_eq!(
                    round_trip(gso, 1472, k, &frames),
                    frames,
                    "gso={gso} key={}",
                    k.is_some()
                );
            }
        }
    }
}
