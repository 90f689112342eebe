//! UDP tunnels: one message per datagram, fragmented within the tunnel
//! protocol when bigger than the path MTU. One thread per socket does
//! the receiving, the hellos, keepalives and matrix reports; frames are
//! sent straight from the switch's threads.

use super::wire::{
    self, MSG_FRAG, MSG_FRAME, MSG_FRAME_HDR, MSG_HELLO, MSG_KEEPALIVE, MSG_MATRIX, Reassembler,
};
use super::{
    BACKOFF_MIN, DEAD_AFTER, Endpoint, Proto, Role, Status, TICK, TunnelError, lock, next_backoff,
    reconnect, stream::Sessions,
};
use crate::counters::DropReason;
use crate::frame::{Frame, NetHdr};
use crate::matrix::MatrixReport;
use crate::switch::{PortId, PortKind, PortSink, Switch};
use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
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

/// Sets the `SOL_UDP` option `opt` to `value`; whether it took.
fn set_udp_option(s: &UdpSocket, opt: libc::c_int, value: libc::c_int) -> bool {
    // SAFETY: passes a pointer to a live c_int and its size.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_UDP,
            opt,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    r == 0
}

/// Turns on UDP segmentation offload (sends of up to 64 KiB are cut
/// into `mtu`-byte datagrams by the kernel) and GRO on receive. Returns
/// whether segmentation offload is on.
fn set_offloads(s: &UdpSocket, mtu: usize) -> bool {
    set_udp_option(s, libc::UDP_GRO, 1);
    set_udp_option(s, libc::UDP_SEGMENT, mtu as libc::c_int)
}

fn clear_segment(s: &UdpSocket) {
    set_udp_option(s, libc::UDP_SEGMENT, 0);
}

/// recvmsg(2) that also returns the source and the GRO segment size
/// (0 when the buffer holds a single datagram).
fn recv_gro(s: &UdpSocket, buf: &mut [u8]) -> std::io::Result<(usize, Option<SocketAddr>, usize)> {
    // SAFETY: sockaddr_storage and msghdr are plain old data; zeroes are
    // valid values.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = [0u64; 8];
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut addr as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    // The field is a usize in glibc and a socklen_t (u32) in musl.
    msg.msg_controllen = size_of_val(&cbuf) as _;
    // SAFETY: every pointer in `msg` points to a live buffer of the size
    // given next to it, for the duration of the call.
    let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut seg = 0;
    // SAFETY: `msg` was filled in by recvmsg; the CMSG macros walk the
    // control buffer within msg_controllen.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !c.is_null() {
        // SAFETY: `c` is a non-null header inside the control buffer.
        let h = unsafe { &*c };
        if h.cmsg_level == libc::SOL_UDP && h.cmsg_type == libc::UDP_GRO {
            // SAFETY: `c` is a valid header; CMSG_DATA only computes an
            // address inside the control buffer.
            let data = unsafe { libc::CMSG_DATA(c) };
            // SAFETY: a UDP_GRO message carries one int after its header,
            // possibly unaligned.
            let v = unsafe { std::ptr::read_unaligned(data.cast::<libc::c_int>()) };
            seg = v.max(0) as usize;
        }
        // SAFETY: as for CMSG_FIRSTHDR.
        c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
    }
    let src = match i32::from(addr.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a =
                unsafe { &*(&addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::from((
                u32::from_be(a.sin_addr.s_addr).to_be_bytes(),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a =
                unsafe { &*(&addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::from((
                a.sin6_addr.s6_addr,
                u16::from_be(a.sin6_port),
            )))
        }
        _ => None,
    };
    Ok((n as usize, src, seg))
}

/// The datagrams in a receive buffer (one, or several coalesced by GRO).
fn datagrams(b: &[u8], seg: usize) -> std::slice::Chunks<'_, u8> {
    b.chunks(if seg == 0 { b.len().max(1) } else { seg })
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
    scratch: Mutex<Scratch>,
}

impl UdpSink {
    fn new(sock: Arc<UdpSocket>, dest: Option<SocketAddr>, mtu: usize, gso: bool) -> UdpSink {
        UdpSink {
            sock,
            dest,
            mtu,
            next_id: AtomicU32::new(0),
            gso: AtomicBool::new(gso),
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
        if msg.len() <= self.mtu {
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
        let r = wire::fragment(msg, id, self.mtu, dgram, |d| {
            batch.extend_from_slice(d);
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
    reconnect(&status, || {
        let mut port = None;
        let r = session(&switch, &status, &ep, mtu, &mut port);
        if let Some(p) = port {
            let _ = switch.remove_port(p);
        }
        r
    });
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
    let gso = set_offloads(&sock, mtu);
    let sink = Arc::new(UdpSink::new(sock.clone(), None, mtu, gso));
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
        let (n, seg) = match recv_gro(&sock, &mut buf) {
            Ok((n, _, seg)) => (n, seg),
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
        for d in datagrams(&buf[..n], seg) {
            let lost = reasm.take_lost();
            let m = match decode(d, &mut reasm) {
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
    let gso = set_offloads(&sock, mtu);
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
        let (n, from, seg) = match recv_gro(&sock, &mut buf) {
            Ok((n, Some(from), seg)) => (n, from, seg),
            Ok(_) => continue,
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
        for d in datagrams(&buf[..n], seg) {
            let Some(p) = peers.get_mut(&from) else {
                if d.first() == Some(&MSG_HELLO)
                    && let Ok(id) = wire::parse_hello(&d[1..])
                {
                    let sink = Arc::new(UdpSink::new(sock.clone(), Some(from), mtu, gso));
                    let _ = sink.send_msg(MSG_HELLO, &crate::frame::Bytes(&hello));
                    let status = Arc::new(Status::new(
                        super::next_id(),
                        Proto::Udp,
                        Role::Accepted,
                        from.to_string(),
                    ));
                    let port =
                        switch.add_port(&format!("udp:{from}"), PortKind::Tunnel, sink.clone());
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
    }
    for (_, p) in peers {
        let _ = switch.remove_port(p.port);
        p.status.down(&TunnelError::Closed);
    }
    lock(&sessions).clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Bytes;

    /// Sends `frames` through a sink and reassembles what arrives.
    fn round_trip(gso_wanted: bool, mtu: usize, frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        set_bufs(&rx);
        set_offloads(&rx, mtu);
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.connect(rx.local_addr().unwrap()).unwrap();
        let gso = gso_wanted && set_offloads(&tx, mtu);
        assert_eq!(gso, gso_wanted, "this kernel has UDP_SEGMENT");
        let sink = UdpSink::new(Arc::new(tx), None, mtu, gso);
        for f in frames {
            sink.send(&Bytes(f)).unwrap();
        }
        let mut r = Reassembler::new(8, Duration::from_secs(1));
        let mut buf = vec![0u8; 65536];
        let mut got = Vec::new();
        while got.len() < frames.len() {
            let Ok((n, _, seg)) = recv_gro(&rx, &mut buf) else {
                break;
            };
            for d in datagrams(&buf[..n], seg) {
                assert!(d.len() <= mtu);
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
        for gso in [false, true] {
            assert_eq!(round_trip(gso, 1472, &frames), frames, "gso={gso}");
        }
    }
}
