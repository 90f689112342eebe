//! Tunnels to the switch of another process, over UDP, TCP or TLS.
//!
//! A connecting tunnel keeps one link up: it connects, says hello, carries
//! frames, and on any failure reports `down` with the error, waits (100 ms
//! doubling up to 5 s) and connects again. A listener accepts peers within
//! the bounds of [`admission`]; each is a port of the switch while it is
//! up. Both sides send a keepalive and their traffic matrices every
//! second.

pub mod admission;
pub mod auth;
pub mod stream;
pub mod tls;
pub mod udp;
pub mod wire;

use crate::counters::DropReason;
use crate::frame::Frame;
use crate::switch::{PortId, Switch};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::fmt;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use admission::{
    HANDSHAKE_DEADLINE, MAX_PEERS, MAX_PEERS_PER_ADDR, MAX_PENDING, MAX_PENDING_PER_ADDR,
};
pub use auth::{AuthError, UdpKey};
pub use tls::TlsConfig;

/// First wait before reconnecting.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait before reconnecting.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Keepalives and matrix reports are sent this often.
pub const TICK: Duration = Duration::from_secs(1);
/// A peer silent for this long is down.
pub const DEAD_AFTER: Duration = Duration::from_secs(5);
/// Default largest UDP payload: an Ethernet path (1500) minus IPv4 and UDP.
pub const DEFAULT_UDP_MTU: usize = 1472;

/// Errors of tunnels.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("{0:?} is not PROTO:HOST:PORT with PROTO one of udp, tcp, tls")]
    BadSpec(String),
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("TLS tunnel without TLS certificates")]
    NoTls,
    #[error("I/O error")]
    Io(#[from] std::io::Error),
    #[error("TLS error")]
    Tls(#[from] rustls::Error),
    #[error("TLS setup failed")]
    TlsSetup(#[from] tls::TlsError),
    #[error("protocol error")]
    Wire(#[from] wire::WireError),
    #[error("peer closed the tunnel")]
    Closed,
    #[error("peer silent for {0:?}")]
    Silent(Duration),
    #[error("peer refused")]
    Refused,
    #[error("handshake not done within {0:?}")]
    HandshakeTimeout(Duration),
}

/// How a switch's tunnels and listeners connect.
#[derive(Clone, Debug, Default)]
pub struct TunnelOptions {
    /// Certificates, needed for `tls:`.
    pub tls: Option<TlsConfig>,
    /// Largest UDP payload of UDP tunnels (0: [`DEFAULT_UDP_MTU`]).
    pub udp_mtu: usize,
    /// Pre-shared key of UDP tunnels: with one, every datagram carries a
    /// tag and those without a valid one are dropped.
    pub udp_key: Option<UdpKey>,
}

impl TunnelOptions {
    fn udp_mtu(&self) -> usize {
        if self.udp_mtu == 0 {
            DEFAULT_UDP_MTU
        } else {
            self.udp_mtu
        }
    }
}

/// Transport of a tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Proto {
    Udp,
    Tcp,
    Tls,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Udp => "udp",
            Proto::Tcp => "tcp",
            Proto::Tls => "tls",
        })
    }
}

/// Where to connect or listen: `udp:ADDR`, `tcp:ADDR`, `tls:ADDR`, with
/// ADDR a `host:port`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub proto: Proto,
    pub addr: String,
}

impl FromStr for Endpoint {
    type Err = TunnelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || TunnelError::BadSpec(s.to_string());
        let (p, addr) = s.split_once(':').ok_or_else(bad)?;
        let proto = match p {
            "udp" => Proto::Udp,
            "tcp" => Proto::Tcp,
            "tls" => Proto::Tls,
            _ => return Err(bad()),
        };
        if !addr.contains(':') {
            return Err(bad());
        }
        Ok(Endpoint {
            proto,
            addr: addr.to_string(),
        })
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.proto, self.addr)
    }
}

impl Endpoint {
    pub fn resolve(&self) -> Result<SocketAddr, TunnelError> {
        self.addr
            .to_socket_addrs()
            .map_err(|_| TunnelError::Resolve(self.addr.clone()))?
            .next()
            .ok_or_else(|| TunnelError::Resolve(self.addr.clone()))
    }

    /// The host part, for the TLS server name.
    pub fn host(&self) -> &str {
        let h = self
            .addr
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(&self.addr);
        h.trim_start_matches('[').trim_end_matches(']')
    }
}

/// State of a tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TunnelState {
    Connecting,
    Up,
    Down,
}

/// Which side opened the tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Connect,
    Accepted,
}

/// A tunnel as listed by the control API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelInfo {
    pub id: u64,
    pub proto: Proto,
    pub role: Role,
    /// The peer's address (as given, or as accepted from).
    pub peer: String,
    pub state: TunnelState,
    /// The switch port while up.
    pub port: Option<PortId>,
    /// The peer switch's id while up.
    pub peer_switch: Option<u64>,
    /// Times the tunnel came up.
    pub ups: u64,
    pub last_error: Option<String>,
}

/// Shared state of one tunnel: what it reports, and how to stop it.
pub(crate) struct Status {
    info: Mutex<TunnelInfo>,
    stop: Mutex<bool>,
    cv: Condvar,
    /// The live stream, to shut it down on stop.
    pub(crate) sock: Mutex<Option<TcpStream>>,
    /// The live connected UDP socket, to wake its receiver on stop (not
    /// for sockets read with `recv_from`: std panics on the empty
    /// address a shut-down socket returns).
    pub(crate) udp: Mutex<Option<Arc<std::net::UdpSocket>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Status {
    pub(crate) fn new(id: u64, proto: Proto, role: Role, peer: String) -> Status {
        Status {
            info: Mutex::new(TunnelInfo {
                id,
                proto,
                role,
                peer,
                state: TunnelState::Connecting,
                port: None,
                peer_switch: None,
                ups: 0,
                last_error: None,
            }),
            stop: Mutex::new(false),
            cv: Condvar::new(),
            sock: Mutex::new(None),
            udp: Mutex::new(None),
        }
    }

    pub(crate) fn info(&self) -> TunnelInfo {
        lock(&self.info).clone()
    }

    pub(crate) fn connecting(&self) {
        let mut i = lock(&self.info);
        if i.state != TunnelState::Connecting {
            tracing::info!(tunnel = i.id, proto = %i.proto, peer = %i.peer, "tunnel connecting");
        }
        i.state = TunnelState::Connecting;
        i.port = None;
    }

    pub(crate) fn up(&self, port: PortId, peer_switch: u64) {
        let mut i = lock(&self.info);
        i.state = TunnelState::Up;
        i.port = Some(port);
        i.peer_switch = Some(peer_switch);
        i.ups += 1;
        tracing::info!(tunnel = i.id, proto = %i.proto, peer = %i.peer, port, "tunnel up");
    }

    pub(crate) fn down(&self, err: &dyn std::error::Error) {
        self.set_down(err, true)
    }

    /// Records the tunnel going down; logs it if `log`.
    pub(crate) fn set_down(&self, err: &dyn std::error::Error, log: bool) {
        let msg = chain(err);
        let mut i = lock(&self.info);
        if log && (i.state != TunnelState::Down || i.last_error.as_deref() != Some(&msg)) {
            tracing::warn!(tunnel = i.id, proto = %i.proto, peer = %i.peer, error = %msg, "tunnel down");
        }
        i.state = TunnelState::Down;
        i.port = None;
        i.peer_switch = None;
        i.last_error = Some(msg);
    }

    pub(crate) fn stopped(&self) -> bool {
        *lock(&self.stop)
    }

    /// Asks the tunnel to stop: wakes its waits, shuts its stream.
    pub(crate) fn stop(&self) {
        *lock(&self.stop) = true;
        self.cv.notify_all();
        if let Some(s) = lock(&self.sock).as_ref() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        if let Some(s) = lock(&self.udp).as_ref() {
            use std::os::fd::AsRawFd;
            // SAFETY: shutdown(2) on a socket we own; it only wakes the
            // blocked receiver, the descriptor stays valid.
            unsafe { libc::shutdown(s.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }

    /// Sleeps for `d` unless stopped first; true if stopped.
    pub(crate) fn wait(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut s = lock(&self.stop);
        while !*s {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            s = self
                .cv
                .wait_timeout(s, deadline - now)
                .map(|r| r.0)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        true
    }
}

/// An error and its sources on one line.
pub(crate) fn chain(err: &dyn std::error::Error) -> String {
    let mut msg = err.to_string();
    let mut src = err.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

/// Next back-off delay.
pub(crate) fn next_backoff(d: Duration) -> Duration {
    (d * 2).min(BACKOFF_MAX)
}

/// The life of a connecting tunnel: runs `session` until the tunnel is
/// stopped. Each try is marked connecting and its end recorded as the
/// tunnel going down; the next try waits a back-off that doubles up to
/// [`BACKOFF_MAX`] and starts over after a session that came up.
pub(crate) fn reconnect<E: std::error::Error>(
    status: &Status,
    mut session: impl FnMut() -> Result<(), E>,
) {
    let mut backoff = BACKOFF_MIN;
    while !status.stopped() {
        status.connecting();
        let ups = status.info().ups;
        let r = session();
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

struct TxInner {
    ready: VecDeque<(u8, Vec<u8>)>,
    free: Vec<Vec<u8>>,
    closed: bool,
}

/// A bounded queue of outgoing messages with a pool of reused buffers:
/// the switch's threads push, the tunnel's writer thread pops.
pub(crate) struct TxQueue {
    inner: Mutex<TxInner>,
    cv: Condvar,
    cap: usize,
}

impl TxQueue {
    pub(crate) fn new(cap: usize) -> TxQueue {
        TxQueue {
            inner: Mutex::new(TxInner {
                ready: VecDeque::with_capacity(cap),
                free: Vec::with_capacity(cap),
                closed: false,
            }),
            cv: Condvar::new(),
            cap,
        }
    }

    pub(crate) fn push(&self, ty: u8, frame: &dyn Frame) -> Result<(), DropReason> {
        self.push_with(ty, &[], frame)
    }

    /// Queues `prefix` then the frame as one message.
    pub(crate) fn push_with(
        &self,
        ty: u8,
        prefix: &[u8],
        frame: &dyn Frame,
    ) -> Result<(), DropReason> {
        let mut q = lock(&self.inner);
        if q.closed {
            return Err(DropReason::TxError);
        }
        if q.ready.len() >= self.cap {
            return Err(DropReason::QueueFull);
        }
        let mut buf = q.free.pop().unwrap_or_default();
        if !append_frame(frame, prefix, &mut buf) {
            q.free.push(buf);
            return Err(DropReason::TxError);
        }
        q.ready.push_back((ty, buf));
        drop(q);
        self.cv.notify_one();
        Ok(())
    }

    /// Moves every queued message to `out`, waiting up to `timeout` for
    /// one. False once closed.
    pub(crate) fn pop_all(&self, out: &mut VecDeque<(u8, Vec<u8>)>, timeout: Duration) -> bool {
        let mut q = lock(&self.inner);
        if q.ready.is_empty() && !q.closed {
            q = self
                .cv
                .wait_timeout(q, timeout)
                .map(|r| r.0)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        std::mem::swap(&mut q.ready, out);
        !q.closed
    }

    pub(crate) fn recycle(&self, out: &mut VecDeque<(u8, Vec<u8>)>) {
        let mut q = lock(&self.inner);
        for (_, b) in out.drain(..) {
            if q.free.len() < self.cap {
                q.free.push(b);
            }
        }
    }

    pub(crate) fn close(&self) {
        lock(&self.inner).closed = true;
        self.cv.notify_all();
    }
}

/// `out` = `prefix` + the frame; false if the frame could not be read.
pub(crate) fn append_frame(frame: &dyn Frame, prefix: &[u8], out: &mut Vec<u8>) -> bool {
    out.clear();
    out.extend_from_slice(prefix);
    match frame.as_contiguous() {
        Some(b) => out.extend_from_slice(b),
        None => {
            let len = frame.len();
            out.resize(prefix.len() + len, 0);
            if frame.read_at(0, &mut out[prefix.len()..]) != len {
                return false;
            }
        }
    }
    true
}

/// Hands a received FRAME or FRAME_HDR message body to the switch.
pub(crate) fn ingress_msg(switch: &Switch, port: PortId, ty: u8, body: &[u8]) {
    if ty == wire::MSG_FRAME {
        return switch.ingress_bytes(port, body);
    }
    match body.split_first_chunk::<{ crate::frame::NetHdr::LEN }>() {
        Some((h, data)) => {
            let hdr = crate::frame::NetHdr::from_bytes(h);
            switch.ingress(port, &crate::frame::HdrFrame { hdr, data })
        }
        None => switch.count_drop(port, DropReason::Malformed),
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A process-wide unique tunnel or listener id.
pub(crate) fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Relaxed)
}

/// A connecting tunnel: keeps a link to `endpoint` up until dropped.
pub struct Tunnel {
    endpoint: Endpoint,
    status: Arc<Status>,
    thread: Option<JoinHandle<()>>,
}

impl Tunnel {
    /// Starts connecting; the tunnel reports its state in [`Tunnel::info`].
    pub fn connect(
        switch: &Arc<Switch>,
        endpoint: Endpoint,
        opts: &TunnelOptions,
    ) -> Result<Tunnel, TunnelError> {
        let tls = match endpoint.proto {
            Proto::Tls => Some(opts.tls.clone().ok_or(TunnelError::NoTls)?),
            _ => None,
        };
        let (udp_mtu, udp_key) = (opts.udp_mtu(), opts.udp_key.clone());
        let status = Arc::new(Status::new(
            next_id(),
            endpoint.proto,
            Role::Connect,
            endpoint.addr.clone(),
        ));
        let (sw, st, ep) = (switch.clone(), status.clone(), endpoint.clone());
        let thread = std::thread::Builder::new()
            .name(format!("vnet-{endpoint}"))
            .spawn(move || match ep.proto {
                Proto::Udp => udp::connect_loop(sw, st, ep, udp_mtu, udp_key),
                _ => stream::connect_loop(sw, st, ep, tls),
            })?;
        Ok(Tunnel {
            endpoint,
            status,
            thread: Some(thread),
        })
    }

    pub fn id(&self) -> u64 {
        self.status.info().id
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    pub fn info(&self) -> TunnelInfo {
        self.status.info()
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.status.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A listener as listed by the control API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerInfo {
    pub id: u64,
    pub endpoint: Endpoint,
    pub local_addr: SocketAddr,
    /// The tunnels it accepted that are still there.
    pub tunnels: Vec<TunnelInfo>,
    /// Connections in their handshake now.
    #[serde(default)]
    pub pending: usize,
    /// Connections turned away so far: the listener or the peer's
    /// address at its limit, or the oldest handshake of the busiest
    /// address dropped to make room.
    #[serde(default)]
    pub refused: u64,
}

/// Accepts tunnels from other switches until dropped.
pub struct Listener {
    id: u64,
    endpoint: Endpoint,
    local: SocketAddr,
    stop: Arc<Status>,
    thread: Option<JoinHandle<()>>,
    sessions: stream::Sessions,
    admission: Arc<admission::Admission>,
}

impl Listener {
    pub fn bind(
        switch: &Arc<Switch>,
        endpoint: Endpoint,
        opts: &TunnelOptions,
    ) -> Result<Listener, TunnelError> {
        let tls = match endpoint.proto {
            Proto::Tls => Some(opts.tls.clone().ok_or(TunnelError::NoTls)?),
            _ => None,
        };
        let (udp_mtu, udp_key) = (opts.udp_mtu(), opts.udp_key.clone());
        let id = next_id();
        let stop = Arc::new(Status::new(
            id,
            endpoint.proto,
            Role::Accepted,
            endpoint.addr.clone(),
        ));
        let sessions: stream::Sessions = Arc::default();
        let admission: Arc<admission::Admission> = Arc::default();
        let (sw, st, ss, adm) = (
            switch.clone(),
            stop.clone(),
            sessions.clone(),
            admission.clone(),
        );
        let name = format!("vnet-listen-{endpoint}");
        let (local, thread) = match endpoint.proto {
            Proto::Udp => {
                let s = udp::bind(&endpoint)?;
                let local = s.local_addr()?;
                let t = std::thread::Builder::new()
                    .name(name)
                    .spawn(move || udp::listen_loop(sw, st, s, udp_mtu, udp_key, ss, adm))?;
                (local, t)
            }
            proto => {
                let l = stream::bind(&endpoint)?;
                let local = l.local_addr()?;
                let a = stream::Accepting {
                    switch: sw,
                    proto,
                    tls,
                    sessions: ss,
                    admission: adm,
                    handshake_failures: Arc::default(),
                };
                let t = std::thread::Builder::new()
                    .name(name)
                    .spawn(move || stream::accept_loop(st, l, a))?;
                (local, t)
            }
        };
        tracing::info!(listen = %endpoint, %local, "listening for tunnels");
        Ok(Listener {
            id,
            endpoint,
            local,
            stop,
            thread: Some(thread),
            sessions,
            admission,
        })
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn info(&self) -> ListenerInfo {
        stream::reap(&self.sessions);
        ListenerInfo {
            id: self.id,
            endpoint: self.endpoint.clone(),
            local_addr: self.local,
            tunnels: lock(&self.sessions).iter().map(|(s, _)| s.info()).collect(),
            pending: self.admission.pending(),
            refused: self.admission.refused(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let sessions: Vec<_> = lock(&self.sessions).drain(..).collect();
        for (s, _) in &sessions {
            s.stop();
        }
        for (_, t) in sessions {
            if let Some(t) = t {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Bytes;

    #[test]
    fn endpoints_parse() {
        let e: Endpoint = "tls:127.0.0.1:4000".parse().unwrap();
        assert_eq!(
            (e.proto, e.addr.as_str(), e.host()),
            (Proto::Tls, "127.0.0.1:4000", "127.0.0.1")
        );
        let e: Endpoint = "udp:[::1]:4000".parse().unwrap();
        assert_eq!(e.host(), "::1");
        assert_eq!(e.to_string(), "udp:[::1]:4000");
        assert!("sctp:1.2.3.4:5".parse::<Endpoint>().is_err());
        assert!("tcp:1.2.3.4".parse::<Endpoint>().is_err());
        assert!("tcp".parse::<Endpoint>().is_err());
    }

    #[test]
    fn tx_queue_is_bounded_and_reuses_buffers() {
        let q = TxQueue::new(2);
        q.push(wire::MSG_FRAME, &Bytes(&[1; 60])).unwrap();
        q.push(wire::MSG_FRAME, &Bytes(&[2; 60])).unwrap();
        assert_eq!(
            q.push(wire::MSG_FRAME, &Bytes(&[3; 60])),
            Err(DropReason::QueueFull)
        );
        let mut out = VecDeque::new();
        assert!(q.pop_all(&mut out, Duration::ZERO));
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].1, vec![2; 60]);
        let ptrs: Vec<*const u8> = out.iter().map(|(_, b)| b.as_ptr()).collect();
        q.recycle(&mut out);
        q.push(wire::MSG_FRAME, &Bytes(&[4; 60])).unwrap();
        q.pop_all(&mut out, Duration::ZERO);
        assert!(
            ptrs.contains(&out[0].1.as_ptr()),
            "a recycled buffer is reused"
        );
        q.close();
        assert!(!q.pop_all(&mut out, Duration::ZERO));
        assert_eq!(
            q.push(wire::MSG_FRAME, &Bytes(&[1; 60])),
            Err(DropReason::TxError)
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_limit() {
        let mut d = BACKOFF_MIN;
        let mut seen = vec![];
        for _ in 0..10 {
            seen.push(d);
            d = next_backoff(d);
        }
        assert_eq!(seen[1], Duration::from_millis(200));
        assert_eq!(*seen.last().unwrap(), BACKOFF_MAX);
    }
}
