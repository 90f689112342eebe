//! TCP and TLS tunnels: length-prefixed messages over one stream. A
//! reader thread feeds the switch; a writer thread drains the port's
//! queue in batches (one write per batch).
//!
//! The handshake (TLS, then both hellos) has [`HANDSHAKE_DEADLINE`] in
//! all, and until it is done a peer gets a few KiB: the first message
//! must be a hello of exactly a hello's size. The big buffers come after.
//! A listener admits connections within the bounds of [`super::admission`].

use super::admission::{Admission, HANDSHAKE_DEADLINE, Ticket, neighbour_id};
use super::wire::{self, MSG_FRAME, MSG_FRAME_HDR, MSG_HELLO, MSG_KEEPALIVE, MSG_MATRIX};
use super::{
    DEAD_AFTER, Endpoint, Proto, Role, Status, TICK, TlsConfig, TunnelError, TxQueue, lock,
    reconnect,
};
use crate::counters::DropReason;
use crate::frame::Frame;
use crate::matrix::MatrixReport;
use crate::ratelimit::LogLimit;
use crate::switch::{PortKind, PortSink, Switch};
use rustls::Connection;
use std::collections::VecDeque;
use std::io::{self, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A TCP connect that takes longer fails (and is tried again after the
/// back-off): far more than any round trip, short next to the back-off.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Messages queued for a tunnel's writer; more are dropped as
/// `queue_full`: about a TAP's transmit queue (1000).
const QUEUE_FRAMES: usize = 1024;
/// TLS ciphertext read at a time during the handshake: a few KiB is all
/// a peer gets before it has said who it is (records span reads).
const HANDSHAKE_READ_BUF: usize = 4 * 1024;
/// TLS ciphertext read at a time once up: a few records per system call.
const TLS_READ_BUF: usize = 64 * 1024;
/// Plaintext read-ahead once up: a 64 KiB super-frame, or a thousand
/// small frames, per system call (a bigger one gained nothing measurable
/// and cost every peer, up to [`super::MAX_PEERS`] of them, more).
const READ_BUF: usize = 64 * 1024;
/// Outgoing bytes (a batch of messages, encrypted) set aside once up;
/// a bigger batch grows it.
const WRITE_BUF: usize = 64 * 1024;
/// While accept(2) fails (no descriptors left, say), wait this long
/// before trying again: the peer's connection stays in the backlog, so
/// trying at once would spin. Short enough that peers get in soon after.
const ACCEPT_RETRY: Duration = Duration::from_millis(200);
/// How often the accept loop looks for a new connection or a stop.
const ACCEPT_POLL: Duration = Duration::from_millis(50);

/// Plaintext side of the stream for the reader thread.
struct Reader {
    sock: TcpStream,
    tls: Option<Arc<Mutex<Connection>>>,
    tmp: Vec<u8>,
    start: usize,
    end: usize,
    /// While set, each socket read times out at this instant.
    deadline: Option<Instant>,
}

/// Makes the socket's reads and writes time out at `deadline`.
fn until(sock: &TcpStream, deadline: Instant) -> io::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(ErrorKind::TimedOut.into());
    }
    sock.set_read_timeout(Some(left))?;
    sock.set_write_timeout(Some(left))
}

/// The socket with every read and write timing out at `deadline`
/// (rustls's `complete_io` reads until the handshake is done).
struct ByDeadline<'a> {
    sock: &'a mut TcpStream,
    deadline: Instant,
}

impl Read for ByDeadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        until(self.sock, self.deadline)?;
        self.sock.read(buf)
    }
}

impl Write for ByDeadline<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        until(self.sock, self.deadline)?;
        self.sock.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.sock.flush()
    }
}

/// A read from the socket, by `deadline` if there is one.
fn sock_read(sock: &mut TcpStream, deadline: Option<Instant>, buf: &mut [u8]) -> io::Result<usize> {
    if let Some(d) = deadline {
        until(sock, d)?;
    }
    sock.read(buf)
}

impl Read for Reader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = &self.tls else {
            return sock_read(&mut self.sock, self.deadline, buf);
        };
        loop {
            {
                let mut c = lock(tls);
                match c.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if self.start < self.end {
                    let mut rd = &self.tmp[self.start..self.end];
                    let n = c.read_tls(&mut rd)?;
                    self.start += n;
                    c.process_new_packets()
                        .map_err(|e| io::Error::new(ErrorKind::InvalidData, e))?;
                    continue;
                }
            }
            let n = sock_read(&mut self.sock, self.deadline, &mut self.tmp)?;
            if n == 0 {
                return Ok(0);
            }
            (self.start, self.end) = (0, n);
        }
    }
}

/// Ciphertext out: encrypts under the lock, writes to the socket outside
/// it, so a blocked write never holds up the reader.
struct Writer {
    sock: TcpStream,
    tls: Option<Arc<Mutex<Connection>>>,
    out: Vec<u8>,
}

impl Writer {
    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        let Some(tls) = &self.tls else {
            return self.sock.write_all(data);
        };
        self.out.clear();
        {
            let mut c = lock(tls);
            for chunk in data.chunks(16 * 1024) {
                c.writer().write_all(chunk)?;
                while c.wants_write() {
                    c.write_tls(&mut self.out)?;
                }
            }
            while c.wants_write() {
                c.write_tls(&mut self.out)?;
            }
        }
        if self.out.is_empty() {
            return Ok(());
        }
        self.sock.write_all(&self.out)
    }
}

struct StreamSink {
    q: Arc<TxQueue>,
}

impl PortSink for StreamSink {
    fn send(&self, frame: &dyn Frame) -> Result<(), DropReason> {
        match frame.net_hdr() {
            Some(h) => self.q.push_with(MSG_FRAME_HDR, &h.to_bytes(), frame),
            None => self.q.push(MSG_FRAME, frame),
        }
    }

    fn offloads(&self) -> bool {
        true
    }
}

fn io_err(e: io::Error) -> TunnelError {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => TunnelError::Silent(DEAD_AFTER),
        ErrorKind::UnexpectedEof => TunnelError::Closed,
        _ => TunnelError::Io(e),
    }
}

/// An I/O error of the handshake: a timeout is the deadline's.
fn handshake_err(e: io::Error) -> TunnelError {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => {
            TunnelError::HandshakeTimeout(HANDSHAKE_DEADLINE)
        }
        _ => io_err(e),
    }
}

/// Reads the peer's hello: one message of exactly a hello's size, so
/// that nothing bigger is read, or buffered, for a peer not known yet.
fn read_hello(r: &mut impl Read) -> Result<u64, TunnelError> {
    let mut m = [0u8; 4 + 1 + wire::HELLO_LEN];
    r.read_exact(&mut m[..4]).map_err(handshake_err)?;
    let n = wire::stream_len([m[0], m[1], m[2], m[3]])?;
    if n != 1 + wire::HELLO_LEN {
        return Err(wire::WireError::BadHello.into());
    }
    r.read_exact(&mut m[4..]).map_err(handshake_err)?;
    if m[4] != MSG_HELLO {
        return Err(wire::WireError::BadHello.into());
    }
    Ok(wire::parse_hello(&m[5..])?)
}

/// Reads one message into `buf`, which grows to the biggest message so
/// far (at most [`wire::MAX_STREAM_MSG`]) rather than starting there.
fn read_msg<'a>(r: &mut impl Read, buf: &'a mut Vec<u8>) -> Result<&'a [u8], TunnelError> {
    let mut h = [0u8; 4];
    r.read_exact(&mut h).map_err(io_err)?;
    let n = wire::stream_len(h)?;
    if buf.len() < n {
        buf.resize(n, 0);
    }
    let m = &mut buf[..n];
    r.read_exact(m).map_err(io_err)?;
    Ok(m)
}

/// Runs one connected stream until it fails or the tunnel stops. An
/// accepted one has its `ticket`, marked established after the hellos.
fn run_session(
    switch: &Arc<Switch>,
    status: &Status,
    sock: TcpStream,
    tls: Option<Connection>,
    name: &str,
    ticket: Option<&Ticket>,
) -> Result<(), TunnelError> {
    let r = session(switch, status, sock, tls, name, ticket);
    *lock(&status.sock) = None;
    r
}

fn session(
    switch: &Arc<Switch>,
    status: &Status,
    mut sock: TcpStream,
    tls: Option<Connection>,
    name: &str,
    ticket: Option<&Ticket>,
) -> Result<(), TunnelError> {
    sock.set_nodelay(true)?;
    *lock(&status.sock) = Some(sock.try_clone()?);
    if status.stopped() {
        return Ok(());
    }
    // The handshake, small buffers only, all of it by the deadline.
    let deadline = Instant::now() + HANDSHAKE_DEADLINE;
    let tls = match tls {
        Some(mut c) => {
            let mut io = ByDeadline {
                sock: &mut sock,
                deadline,
            };
            while c.is_handshaking() {
                c.complete_io(&mut io).map_err(handshake_err)?;
            }
            Some(Arc::new(Mutex::new(c)))
        }
        None => None,
    };
    let mut w = Writer {
        sock: sock.try_clone()?,
        tls: tls.clone(),
        out: Vec::new(),
    };
    let mut r = Reader {
        sock: sock.try_clone()?,
        tls,
        tmp: vec![0; HANDSHAKE_READ_BUF],
        start: 0,
        end: 0,
        deadline: Some(deadline),
    };
    let mut hello = Vec::new();
    wire::encode_stream(
        &mut hello,
        MSG_HELLO,
        &wire::hello(switch.matrix().origin()),
    );
    until(&sock, deadline).map_err(handshake_err)?;
    w.write_all(&hello).map_err(handshake_err)?;
    let peer = read_hello(&mut r)?;
    if let Some(t) = ticket {
        t.established();
    }
    // Up: a silent peer is down after DEAD_AFTER, one that does not read
    // too; now the buffers for full-speed traffic.
    r.deadline = None;
    sock.set_read_timeout(Some(DEAD_AFTER))?;
    sock.set_write_timeout(Some(DEAD_AFTER))?;
    r.tmp.resize(TLS_READ_BUF, 0);
    w.out.reserve(WRITE_BUF);
    let mut r = BufReader::with_capacity(READ_BUF, r);
    let mut buf = Vec::new();
    let neighbour = neighbour_id(sock.peer_addr()?.ip());
    let q = Arc::new(TxQueue::new(QUEUE_FRAMES));
    let port = switch.add_port(
        name,
        PortKind::Tunnel,
        Arc::new(StreamSink { q: q.clone() }),
    );
    status.up(port, peer);
    let (sw, q2) = (switch.clone(), q.clone());
    let writer = std::thread::Builder::new()
        .name(format!("vnet-tx-{port}"))
        .spawn(move || writer_loop(w, q2, sw));
    let res = match writer {
        Ok(writer) => {
            let res = reader_loop(&mut r, &mut buf, switch, status, port, neighbour);
            q.close();
            let _ = sock.shutdown(Shutdown::Both);
            let _ = writer.join();
            res
        }
        Err(e) => Err(e.into()),
    };
    let _ = switch.remove_port(port);
    res
}

fn reader_loop(
    r: &mut impl Read,
    buf: &mut Vec<u8>,
    switch: &Switch,
    status: &Status,
    port: u32,
    neighbour: u128,
) -> Result<(), TunnelError> {
    loop {
        let m = match read_msg(r, buf) {
            Ok(m) => m,
            Err(_) if status.stopped() => return Ok(()),
            Err(e) => return Err(e),
        };
        match m[0] {
            MSG_FRAME | MSG_FRAME_HDR => super::ingress_msg(switch, port, m[0], &m[1..]),
            MSG_MATRIX => match serde_json::from_slice::<Vec<MatrixReport>>(&m[1..]) {
                Ok(v) => switch.matrix().merge_from(neighbour, v),
                Err(_) => switch.count_drop(port, DropReason::Malformed),
            },
            MSG_KEEPALIVE | MSG_HELLO => {}
            _ => switch.count_drop(port, DropReason::Malformed),
        }
    }
}

fn writer_loop(mut w: Writer, q: Arc<TxQueue>, switch: Arc<Switch>) {
    let mut batch = VecDeque::with_capacity(QUEUE_FRAMES);
    let mut out = Vec::with_capacity(WRITE_BUF);
    let mut last_tick = Instant::now();
    loop {
        let open = q.pop_all(&mut batch, TICK / 2);
        if !open {
            break;
        }
        out.clear();
        for (ty, b) in &batch {
            wire::encode_stream(&mut out, *ty, b);
        }
        q.recycle(&mut batch);
        if last_tick.elapsed() >= TICK {
            last_tick = Instant::now();
            wire::encode_stream(&mut out, MSG_KEEPALIVE, &[]);
            // Trimmed to one message (type byte included); built once a
            // tick for all peers.
            let m = switch.matrix().encoded_reports(wire::MAX_STREAM_MSG - 1);
            wire::encode_stream(&mut out, MSG_MATRIX, &m);
        }
        if (!out.is_empty() || w.tls.is_some()) && w.write_all(&out).is_err() {
            break;
        }
    }
    let _ = w.sock.shutdown(Shutdown::Both);
}

fn session_name(proto: Proto, peer: &str) -> String {
    format!("{proto}:{peer}")
}

/// The thread of a connecting TCP or TLS tunnel.
pub(crate) fn connect_loop(
    switch: Arc<Switch>,
    status: Arc<Status>,
    ep: Endpoint,
    tls: Option<TlsConfig>,
) {
    reconnect(&status, || {
        let addr = ep.resolve()?;
        let sock = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
        let conn = match &tls {
            Some(t) => Some(Connection::Client(t.client(ep.host())?)),
            None => None,
        };
        run_session(
            &switch,
            &status,
            sock,
            conn,
            &session_name(ep.proto, &ep.addr),
            None,
        )
    });
}

/// Accepts TCP or TLS peers until stopped; each peer runs on its own
/// thread and is listed in `sessions` while it lives.
pub(crate) fn bind(ep: &Endpoint) -> Result<TcpListener, TunnelError> {
    let l = TcpListener::bind(ep.resolve()?)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

pub(crate) type Sessions = Arc<Mutex<Vec<(Arc<Status>, Option<JoinHandle<()>>)>>>;

/// What an accept loop works with.
pub(crate) struct Accepting {
    pub(crate) switch: Arc<Switch>,
    pub(crate) proto: Proto,
    pub(crate) tls: Option<TlsConfig>,
    pub(crate) sessions: Sessions,
    pub(crate) admission: Arc<Admission>,
    /// Handshakes that failed (logged now and then).
    pub(crate) handshake_failures: Arc<LogLimit>,
}

pub(crate) fn accept_loop(stop: Arc<Status>, l: TcpListener, a: Accepting) {
    let failures = LogLimit::default();
    while !stop.stopped() {
        match l.accept() {
            Ok((sock, peer)) => spawn_accepted(&a, sock, peer),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if stop.wait(ACCEPT_POLL) {
                    break;
                }
            }
            Err(e) => {
                if let Some(held) = failures.check() {
                    tracing::warn!(error = %e, held_back = held, "accept failed");
                }
                if stop.wait(ACCEPT_RETRY) {
                    break;
                }
            }
        }
        reap(&a.sessions);
    }
}

pub(crate) fn reap(sessions: &Sessions) {
    let mut s = lock(sessions);
    s.retain_mut(|(_, t)| {
        if t.as_ref().is_some_and(|t| t.is_finished()) {
            if let Some(t) = t.take() {
                let _ = t.join();
            }
            return false;
        }
        true
    });
}

fn spawn_accepted(a: &Accepting, sock: TcpStream, peer: SocketAddr) {
    let proto = a.proto;
    let status = Arc::new(Status::new(
        super::next_id(),
        proto,
        Role::Accepted,
        peer.to_string(),
    ));
    // Refused: dropping the socket closes it at once.
    let Some(ticket) = a.admission.admit(peer.ip(), &status) else {
        return;
    };
    // So that the admission can stop it to make room.
    match sock.try_clone() {
        Ok(s) => *lock(&status.sock) = Some(s),
        Err(_) => return,
    }
    let (sw, st, tls) = (a.switch.clone(), status.clone(), a.tls.clone());
    let failed = a.handshake_failures.clone();
    let t = std::thread::Builder::new()
        .name(format!("vnet-{proto}-{peer}"))
        .spawn(move || {
            let r = (|| {
                sock.set_nonblocking(false)?;
                let conn = match &tls {
                    Some(t) => Some(Connection::Server(t.server()?)),
                    None => None,
                };
                run_session(
                    &sw,
                    &st,
                    sock,
                    conn,
                    &session_name(proto, &peer.to_string()),
                    Some(&ticket),
                )
            })();
            let e = r.err().unwrap_or(TunnelError::Closed);
            if st.info().ups > 0 {
                return st.down(&e);
            }
            // A peer that never came up can fail over and over: one line
            // now and then.
            st.set_down(&e, false);
            if let Some(held) = failed.check() {
                tracing::info!(%peer, error = %crate::tunnel::chain(&e), held_back = held,
                    "tunnel handshake failed");
            }
        });
    match t {
        Ok(t) => lock(&a.sessions).push((status, Some(t))),
        Err(e) => tracing::warn!(error = %e, "cannot start a tunnel thread"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_buffer_grows_with_the_messages_up_to_the_limit() {
        let mut input = Vec::new();
        wire::encode_stream(&mut input, MSG_KEEPALIVE, &[]);
        wire::encode_stream(&mut input, MSG_FRAME, &[7; 1500]);
        wire::encode_stream(&mut input, MSG_MATRIX, &vec![1; wire::MAX_STREAM_MSG - 1]);
        input.extend_from_slice(&(wire::MAX_STREAM_MSG as u32 + 1).to_be_bytes());
        let mut r = &input[..];
        let mut buf = Vec::new();
        assert_eq!(read_msg(&mut r, &mut buf).unwrap(), [MSG_KEEPALIVE]);
        assert_eq!(
            buf.len(),
            1,
            "a peer that sends small messages costs little"
        );
        assert_eq!(read_msg(&mut r, &mut buf).unwrap().len(), 1501);
        assert_eq!(buf.len(), 1501);
        assert_eq!(
            read_msg(&mut r, &mut buf).unwrap().len(),
            wire::MAX_STREAM_MSG
        );
        assert!(matches!(
            read_msg(&mut r, &mut buf),
            Err(TunnelError::Wire(wire::WireError::BadLength(_)))
        ));
        assert_eq!(buf.len(), wire::MAX_STREAM_MSG);
    }
}
