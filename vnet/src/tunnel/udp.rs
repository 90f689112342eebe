//! UDP tunnels: one message per datagram, fragmented within the tunnel
//! protocol when bigger than the path MTU. One thread per socket does
//! the receiving, the hellos, keepalives and matrix reports; frames are
//! sent straight from the switch's threads.

use super::wire::{
    self, MSG_FRAG, MSG_FRAME, MSG_FRAME_HDR, MSG_HELLO, MSG_KEEPALIVE, MSG_MATRIX, Reassembler,
};
use super::{
    BACKOFF_MIN, DEAD_AFTER, Endpoint, Proto, Role, Status, TICK, TunnelError, lock, next_backoff,
    stream::Sessions,
};
use crate::counters::DropReason;
use crate::frame::{Frame, NetHdr};
use crate::matrix::MatrixReport;
use crate::switch::{PortId, PortKind, PortSink, Switch};
use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const POLL: Duration = Duration::from_millis(100);
const SOCK_BUF: libc::c_int = 4 << 20;
/// Largest reassembled message.
const MAX_MSG: usize = 1 << 17;

fn set_bufs(s: &UdpSocket) {
    for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // SAFETY: passes a pointer to a live c_int and its size.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&SOCK_BUF as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }
}

struct Scratch {
    msg: Vec<u8>,
    dgram: Vec<u8>,
}

/// Sends messages to one peer (on a connected socket, or to `dest`).
pub(crate) struct UdpSink {
    sock: Arc<UdpSocket>,
    dest: Option<SocketAddr>,
    mtu: usize,
    next_id: AtomicU32,
    scratch: Mutex<Scratch>,
}

impl UdpSink {
    fn new(sock: Arc<UdpSocket>, dest: Option<SocketAddr>, mtu: usize) -> UdpSink {
        UdpSink {
            sock,
            dest,
            mtu,
            next_id: AtomicU32::new(0),
            scratch: Mutex::new(Scratch {
                msg: Vec::with_capacity(16 * 1024),
                dgram: Vec::with_capacity(mtu),
            }),
        }
    }

    fn send_dgram(&self, b: &[u8]) -> Result<(), DropReason> {
        let r = match self.dest {
            Some(a) => self.sock.send_to(b, a),
            None => self.sock.send(b),
        };
        match r {
            Ok(_) => Ok(()),
            Err(e) => Err(match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::ENOBUFS) => DropReason::QueueFull,
                Some(libc::EMSGSIZE) => DropReason::PathMtu,
                _ => DropReason::TxError,
            }),
        }
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
        let Scratch { msg, dgram } = &mut *g;
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
        if msg.len() <= self.mtu {
            return self.send_dgram(msg);
        }
        let id = self.next_id.fetch_add(1, Relaxed);
        let mut res = Ok(());
        match wire::fragment(msg, id, self.mtu, dgram, |d| {
            res = self.send_dgram(d);
            res.is_ok()
        }) {
            Ok(_) => res,
            Err(_) => Err(DropReason::PathMtu),
        }
    }

    fn send_control(&self, switch: &Switch) {
        let _ = self.send_msg(MSG_KEEPALIVE, &crate::frame::Bytes(&[]));
        if let Ok(m) = serde_json::to_vec(&switch.matrix().reports_to_send()) {
            let _ = self.send_msg(MSG_MATRIX, &crate::frame::Bytes(&m));
        }
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

/// Handles a message of a peer that is up.
fn deliver(switch: &Switch, port: PortId, m: &[u8]) {
    match m[0] {
        MSG_FRAME | MSG_FRAME_HDR => super::ingress_msg(switch, port, m[0], &m[1..]),
        MSG_MATRIX => match serde_json::from_slice::<Vec<MatrixReport>>(&m[1..]) {
            Ok(v) => switch.matrix().merge(v),
            Err(_) => switch.count_drop(port, DropReason::Malformed),
        },
        MSG_KEEPALIVE | MSG_HELLO => {}
        _ => switch.count_drop(port, DropReason::Malformed),
    }
}

fn bind_any(addr: &SocketAddr) -> std::io::Result<UdpSocket> {
    if addr.is_ipv4() {
        UdpSocket::bind("0.0.0.0:0")
    } else {
        UdpSocket::bind("[::]:0")
    }
}

/// The thread of a connecting UDP tunnel.
pub(crate) fn connect_loop(switch: Arc<Switch>, status: Arc<Status>, ep: Endpoint, mtu: usize) {
    let mut backoff = BACKOFF_MIN;
    while !status.stopped() {
        status.connecting();
        let ups = status.info().ups;
        let mut port = None;
        let r = session(&switch, &status, &ep, mtu, &mut port);
        if let Some(p) = port {
            let _ = switch.remove_port(p);
        }
        if status.stopped() {
            break;
        }
        match r {
            Ok(()) => status.down(&TunnelError::Closed),
            Err(e) => status.down(&e),
        }
        if status.info().ups > ups {
            backoff = BACKOFF_MIN;
        }
        if status.wait(backoff) {
            break;
        }
        backoff = next_backoff(backoff);
    }
}

fn session(
    switch: &Arc<Switch>,
    status: &Status,
    ep: &Endpoint,
    mtu: usize,
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
    let sink = Arc::new(UdpSink::new(sock.clone(), None, mtu));
    let hello = wire::hello(switch.matrix().origin());
    let started = Instant::now();
    let (mut hello_every, mut next_hello) = (BACKOFF_MIN, started);
    let (mut last_rx, mut last_tick) = (started, started);
    let mut buf = vec![0u8; 65536];
    let mut reasm = Reassembler::new(8, Duration::from_secs(1));
    let name = format!("udp:{}", ep.addr);
    while !status.stopped() {
        let now = Instant::now();
        match port {
            None => {
                if now >= next_hello {
                    let _ = sink.send_msg(MSG_HELLO, &crate::frame::Bytes(&hello));
                    next_hello = now + hello_every;
                    hello_every = next_backoff(hello_every);
                }
                if now.duration_since(started) > DEAD_AFTER {
                    return Err(TunnelError::Silent(DEAD_AFTER));
                }
            }
            Some(_) => {
                if now.duration_since(last_rx) > DEAD_AFTER {
                    return Err(TunnelError::Silent(DEAD_AFTER));
                }
                if now.duration_since(last_tick) >= TICK {
                    last_tick = now;
                    sink.send_control(switch);
                }
            }
        }
        let n = match sock.recv(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => return Err(TunnelError::Refused),
            Err(e) => return Err(e.into()),
        };
        last_rx = Instant::now();
        let lost = reasm.take_lost();
        let m = match decode(&buf[..n], &mut reasm) {
            Ok(Some(m)) => m,
            Ok(None) => continue,
            Err(_) => {
                if let Some(p) = *port {
                    switch.count_drop(p, DropReason::Malformed);
                }
                continue;
            }
        };
        match *port {
            Some(p) => {
                for _ in 0..lost {
                    switch.count_drop(p, DropReason::Reassembly);
                }
                deliver(switch, p, m)
            }
            None if m[0] == MSG_HELLO => {
                let peer = wire::parse_hello(&m[1..])?;
                let p = switch.add_port(&name, PortKind::Tunnel, sink.clone());
                *port = Some(p);
                status.up(p, peer);
                last_tick = Instant::now();
                sink.send_control(switch);
            }
            None => {}
        }
    }
    Ok(())
}

struct Peer {
    port: PortId,
    status: Arc<Status>,
    sink: Arc<UdpSink>,
    reasm: Reassembler,
    last_rx: Instant,
}

pub(crate) fn bind(ep: &Endpoint) -> Result<Arc<UdpSocket>, TunnelError> {
    let s = UdpSocket::bind(ep.resolve()?)?;
    set_bufs(&s);
    s.set_read_timeout(Some(POLL))?;
    Ok(Arc::new(s))
}

/// The thread of a UDP listener: every peer that says hello becomes a port.
pub(crate) fn listen_loop(
    switch: Arc<Switch>,
    stop: Arc<Status>,
    sock: Arc<UdpSocket>,
    mtu: usize,
    sessions: Sessions,
) {
    let mut peers: HashMap<SocketAddr, Peer> = HashMap::new();
    let hello = wire::hello(switch.matrix().origin());
    let mut buf = vec![0u8; 65536];
    let mut last_tick = Instant::now();
    while !stop.stopped() {
        let now = Instant::now();
        if now.duration_since(last_tick) >= TICK {
            last_tick = now;
            peers.retain(|addr, p| {
                if now.duration_since(p.last_rx) > DEAD_AFTER {
                    let _ = switch.remove_port(p.port);
                    p.status.down(&TunnelError::Silent(DEAD_AFTER));
                    tracing::info!(peer = %addr, "UDP peer gone");
                    lock(&sessions).retain(|(s, _)| !Arc::ptr_eq(s, &p.status));
                    return false;
                }
                p.sink.send_control(&switch);
                true
            });
        }
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(e) => {
                tracing::debug!(error = %e, "UDP receive failed");
                continue;
            }
        };
        let d = &buf[..n];
        let Some(p) = peers.get_mut(&from) else {
            if d.first() == Some(&MSG_HELLO)
                && let Ok(id) = wire::parse_hello(&d[1..])
            {
                let sink = Arc::new(UdpSink::new(sock.clone(), Some(from), mtu));
                let _ = sink.send_msg(MSG_HELLO, &crate::frame::Bytes(&hello));
                let status = Arc::new(Status::new(
                    super::next_id(),
                    Proto::Udp,
                    Role::Accepted,
                    from.to_string(),
                ));
                let port = switch.add_port(&format!("udp:{from}"), PortKind::Tunnel, sink.clone());
                status.up(port, id);
                lock(&sessions).push((status.clone(), None));
                peers.insert(
                    from,
                    Peer {
                        port,
                        status,
                        sink,
                        reasm: Reassembler::new(8, Duration::from_secs(1)),
                        last_rx: Instant::now(),
                    },
                );
            }
            continue;
        };
        p.last_rx = Instant::now();
        let lost = p.reasm.take_lost();
        for _ in 0..lost {
            switch.count_drop(p.port, DropReason::Reassembly);
        }
        match decode(d, &mut p.reasm) {
            Ok(Some(m)) => {
                if m[0] == MSG_HELLO {
                    let _ = p.sink.send_msg(MSG_HELLO, &crate::frame::Bytes(&hello));
                }
                deliver(&switch, p.port, m)
            }
            Ok(None) => {}
            Err(_) => switch.count_drop(p.port, DropReason::Malformed),
        }
    }
    for (_, p) in peers {
        let _ = switch.remove_port(p.port);
        p.status.down(&TunnelError::Closed);
    }
    lock(&sessions).clear();
}
