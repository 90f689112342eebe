//! TCP and TLS tunnels: length-prefixed messages over one stream. A
//! reader thread feeds the switch; a writer thread drains the port's
//! queue in batches (one write per batch).

use super::wire::{self, MSG_FRAME, MSG_FRAME_HDR, MSG_HELLO, MSG_KEEPALIVE, MSG_MATRIX};
use super::{
    DEAD_AFTER, Endpoint, Proto, Role, Status, TICK, TlsConfig, TunnelError, TxQueue, lock,
    reconnect,
};
use crate::counters::DropReason;
use crate::frame::Frame;
use crate::matrix::MatrixReport;
use crate::switch::{PortKind, PortSink, Switch};
use rustls::Connection;
use std::collections::VecDeque;
use std::io::{self, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const QUEUE_FRAMES: usize = 1024;

/// Plaintext side of the stream for the reader thread.
struct Reader {
    sock: TcpStream,
    tls: Option<Arc<Mutex<Connection>>>,
    tmp: Vec<u8>,
    start: usize,
    end: usize,
}

impl Read for Reader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = &self.tls else {
            return self.sock.read(buf);
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
            let n = self.sock.read(&mut self.tmp)?;
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

fn read_msg<'a>(r: &mut impl Read, buf: &'a mut [u8]) -> Result<&'a [u8], TunnelError> {
    let mut h = [0u8; 4];
    r.read_exact(&mut h).map_err(io_err)?;
    let n = wire::stream_len(h)?;
    r.read_exact(&mut buf[..n]).map_err(io_err)?;
    Ok(&buf[..n])
}

/// Runs one connected stream until it fails or the tunnel stops.
fn run_session(
    switch: &Arc<Switch>,
    status: &Status,
    sock: TcpStream,
    tls: Option<Connection>,
    name: &str,
) -> Result<(), TunnelError> {
    let r = session(switch, status, sock, tls, name);
    *lock(&status.sock) = None;
    r
}

fn session(
    switch: &Arc<Switch>,
    status: &Status,
    mut sock: TcpStream,
    tls: Option<Connection>,
    name: &str,
) -> Result<(), TunnelError> {
    sock.set_nodelay(true)?;
    sock.set_read_timeout(Some(DEAD_AFTER))?;
    *lock(&status.sock) = Some(sock.try_clone()?);
    if status.stopped() {
        return Ok(());
    }
    let tls = match tls {
        Some(mut c) => {
            while c.is_handshaking() {
                c.complete_io(&mut sock)?;
            }
            Some(Arc::new(Mutex::new(c)))
        }
        None => None,
    };
    let mut w = Writer {
        sock: sock.try_clone()?,
        tls: tls.clone(),
        out: Vec::with_capacity(256 * 1024),
    };
    let mut r = BufReader::with_capacity(
        256 * 1024,
        Reader {
            sock: sock.try_clone()?,
            tls,
            tmp: vec![0; 64 * 1024],
            start: 0,
            end: 0,
        },
    );
    let mut hello = Vec::new();
    wire::encode_stream(
        &mut hello,
        MSG_HELLO,
        &wire::hello(switch.matrix().origin()),
    );
    w.write_all(&hello)?;
    let mut buf = vec![0u8; wire::MAX_STREAM_MSG];
    let m = read_msg(&mut r, &mut buf)?;
    if m[0] != MSG_HELLO {
        return Err(wire::WireError::BadHello.into());
    }
    let peer = wire::parse_hello(&m[1..])?;
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
            let res = reader_loop(&mut r, &mut buf, switch, status, port);
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
    buf: &mut [u8],
    switch: &Switch,
    status: &Status,
    port: u32,
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
                Ok(v) => switch.matrix().merge(v),
                Err(_) => switch.count_drop(port, DropReason::Malformed),
            },
            MSG_KEEPALIVE | MSG_HELLO => {}
            _ => switch.count_drop(port, DropReason::Malformed),
        }
    }
}

fn writer_loop(mut w: Writer, q: Arc<TxQueue>, switch: Arc<Switch>) {
    let mut batch = VecDeque::with_capacity(QUEUE_FRAMES);
    let mut out = Vec::with_capacity(512 * 1024);
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
            if let Ok(m) = serde_json::to_vec(&switch.matrix().reports_to_send())
                && m.len() < wire::MAX_STREAM_MSG
            {
                wire::encode_stream(&mut out, MSG_MATRIX, &m);
            }
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

pub(crate) fn accept_loop(
    switch: Arc<Switch>,
    stop: Arc<Status>,
    l: TcpListener,
    proto: Proto,
    tls: Option<TlsConfig>,
    sessions: Sessions,
) {
    while !stop.stopped() {
        match l.accept() {
            Ok((sock, peer)) => spawn_accepted(&switch, sock, peer, proto, tls.as_ref(), &sessions),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if stop.wait(Duration::from_millis(50)) {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                if stop.wait(Duration::from_millis(200)) {
                    break;
                }
            }
        }
        reap(&sessions);
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

fn spawn_accepted(
    switch: &Arc<Switch>,
    sock: TcpStream,
    peer: SocketAddr,
    proto: Proto,
    tls: Option<&TlsConfig>,
    sessions: &Sessions,
) {
    let status = Arc::new(Status::new(
        super::next_id(),
        proto,
        Role::Accepted,
        peer.to_string(),
    ));
    let (sw, st, tls) = (switch.clone(), status.clone(), tls.cloned());
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
                )
            })();
            match r {
                Ok(()) => st.down(&TunnelError::Closed),
                Err(e) => st.down(&e),
            }
        });
    match t {
        Ok(t) => lock(sessions).push((status, Some(t))),
        Err(e) => tracing::warn!(error = %e, "cannot start a tunnel thread"),
    }
}
