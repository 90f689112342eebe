//! One client connection: its handshake (within one deadline), then a
//! reader that hands requests to the shared workers and a writer thread
//! that sends their answers back.
//!
//! Each request holds, until its answer is written ([`Ticket`]), a place
//! of its connection and the bytes of the largest answer it can get
//! (then those of the answer it got) out of its connection's answer
//! bytes; and, while a worker has it, one of the server's places
//! ([`Working`]). The reader waits for all three before it takes the
//! next request, so a client can have only so many requests and answer
//! bytes queued, and all clients together only so many requests being
//! worked on. Workers never write to a socket: a client that stops or
//! slows its reading holds only its own connection's places, and its
//! writer, which must write each answer within the write deadline, drops
//! it.

use std::io::{self, Read, Write};
use std::net::{IpAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::limits::Slots;
use super::ops::{Conn, READDIR_BATCH_BYTES};
use super::{Job, Shared, lock};
use crate::proto::{self, Request, Response};
use crate::transport::{self, Split, WriteDeadline};

/// Bytes a frame adds around an answer's payload (length, id, status,
/// field lengths, a listing's cookie): ample for every answer.
const ANSWER_OVERHEAD: usize = 64;

/// Bytes reserved for an answer that is neither a read nor a listing:
/// attributes are about 110 bytes, a symlink target at most
/// [`proto::MAX_TARGET`], the per-op counters a few hundred.
const SMALL_ANSWER: usize = proto::MAX_TARGET + ANSWER_OVERHEAD;

/// What can end one connection.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("transport")]
    Transport(#[from] transport::TransportError),
    #[error("protocol")]
    Proto(#[from] proto::ProtoError),
    #[error("handshake refused")]
    Refused,
    #[error("cannot start the connection's writer")]
    Spawn(#[source] io::Error),
}

/// A connection counted in: gives back its counts (peer, handshake,
/// connection table) however it ends.
pub(super) struct Admitted {
    shared: Arc<Shared>,
    id: u64,
    ip: IpAddr,
    handshaking: bool,
}

impl Admitted {
    pub(super) fn new(shared: Arc<Shared>, id: u64, ip: IpAddr) -> Admitted {
        Admitted {
            shared,
            id,
            ip,
            handshaking: true,
        }
    }

    fn handshake_over(&mut self) {
        if std::mem::take(&mut self.handshaking) {
            self.shared.peers.handshake_done(self.id);
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        lock(&self.shared.conns).remove(&self.id);
        self.shared.peers.gone(self.id, self.ip);
    }
}

/// Serves one connection to its end.
pub(super) fn serve(mut admitted: Admitted, sock: TcpStream, jobs: mpsc::Sender<Job>) {
    let shared = admitted.shared.clone();
    let peer = sock.peer_addr().ok();
    let start = handshake_within_deadline(&mut admitted, sock);
    let res = match start {
        Ok(Some(split)) => run(&shared, admitted.ip, split, jobs),
        Ok(None) => Ok(()),
        Err(e) => {
            if let Some(held_back) = shared.logs.handshake.allow() {
                debug!(?peer, error = %e, held_back, "handshake failed");
            }
            return;
        }
    };
    if let Err(e) = res {
        debug!(?peer, error = %e, "connection ended");
    }
}

/// Runs the handshake; the reaper shuts the socket down if it is not
/// done by the deadline, however the peer spaces its bytes.
fn handshake_within_deadline(
    admitted: &mut Admitted,
    sock: TcpStream,
) -> Result<Option<Split>, ConnError> {
    let shared = admitted.shared.clone();
    if shared.stop.load(Ordering::SeqCst) {
        return Ok(None);
    }
    let _ = sock.set_nodelay(true);
    // No deadline only if it is past what an Instant can hold.
    let deadline = Instant::now().checked_add(shared.limits.handshake_timeout);
    if let Some(at) = deadline {
        shared.deadlines.watch(at, admitted.id);
    }
    let res = handshake(&shared, sock);
    if let Some(at) = deadline {
        shared.deadlines.unwatch(at, admitted.id);
    }
    admitted.handshake_over();
    res.map(Some)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// TLS (if configured), then hello and welcome. The first frame may be no
/// larger than a hello: nothing bigger is read before authentication.
fn handshake(shared: &Shared, sock: TcpStream) -> Result<Split, ConnError> {
    let timeout = shared.limits.handshake_timeout;
    let mut split = match &shared.cfg.tls {
        Some(cfg) => Split::tls_server(sock, cfg.clone(), timeout)?,
        None => Split::plain(sock)?,
    };
    let io = |e| ConnError::Transport(transport::TransportError::Io(e));
    split.socket.set_read_timeout(Some(timeout)).map_err(io)?;
    split.socket.set_write_timeout(Some(timeout)).map_err(io)?;
    let hello = proto::read_frame_max(&mut split.reader, proto::MAX_HELLO_FRAME)?
        .ok_or(proto::ProtoError::Truncated)?;
    let hello = proto::decode_hello(&hello)?;
    let (status, ok) = if hello.version != proto::VERSION {
        (proto::HelloStatus::BadVersion, false)
    } else if constant_time_eq(&hello.token, &shared.cfg.token) {
        (proto::HelloStatus::Accepted, true)
    } else {
        (proto::HelloStatus::BadToken, false)
    };
    let welcome = proto::encode_welcome(&proto::Welcome {
        version: proto::VERSION,
        status,
        read_only: shared.cfg.read_only,
    });
    proto::write_frame(&mut split.writer, &welcome)?;
    if !ok {
        if let Some(held_back) = shared.logs.handshake.allow() {
            warn!(peer = ?split.socket.peer_addr().ok(), ?status, held_back, "handshake refused");
        }
        transport::shutdown(&split.socket);
        return Err(ConnError::Refused);
    }
    // From here each answer has a deadline of its own (set by the
    // writer), not the socket's.
    split.socket.set_read_timeout(None).map_err(io)?;
    split.socket.set_write_timeout(None).map_err(io)?;
    Ok(split)
}

/// A request's places in its connection (one request, and bytes of
/// answer), given back when its answer has been written or dropped.
struct Ticket {
    shared: Arc<Shared>,
    mine: Arc<Slots>,
    bytes: Arc<Slots>,
    /// Bytes held of `bytes` (and counted in the server's gauge).
    held: usize,
}

impl Ticket {
    /// Holds `n` bytes of answer instead of what it held (the answer is
    /// built, and rarely larger than reserved: taken without waiting).
    fn hold(&mut self, n: usize) {
        if n < self.held {
            self.bytes.give_n(self.held - n);
            self.shared.answer_bytes.give(self.held - n);
        } else if n > self.held {
            self.bytes.add(n - self.held);
            // The gauge has no maximum: this cannot fail.
            let _ = self.shared.answer_bytes.try_take_n(n - self.held);
        }
        self.held = n;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.hold(0);
        self.mine.give();
    }
}

/// A request's place among those being worked on in all, given back
/// once the worker is done with it (or it is dropped unrun).
struct Working(Arc<Slots>);

impl Drop for Working {
    fn drop(&mut self) {
        self.0.give();
    }
}

/// The most bytes the answer to `req` can have.
fn answer_bound(req: &Result<Request, proto::ProtoError>) -> usize {
    match req {
        Ok(Request::Read { len, .. }) => (*len as usize).saturating_add(ANSWER_OVERHEAD),
        Ok(Request::Readdir { .. }) => READDIR_BATCH_BYTES + ANSWER_OVERHEAD,
        _ => SMALL_ANSWER,
    }
}

/// An answer for the writer, with the places it holds.
struct Answer {
    frame: Vec<u8>,
    _ticket: Ticket,
}

/// Serves a logged-in connection: reads requests until the client goes
/// or the connection fails, then waits for the writer to finish.
fn run(
    shared: &Arc<Shared>,
    ip: IpAddr,
    split: Split,
    jobs: mpsc::Sender<Job>,
) -> Result<(), ConnError> {
    let Split {
        reader,
        writer,
        socket,
        deadline,
    } = split;
    let socket = Arc::new(socket);
    let conn = Arc::new(Conn::new(shared.clone(), ip));
    let (answers, rx) = mpsc::channel::<Answer>();
    let writer = {
        let (conn, socket) = (conn.clone(), socket.clone());
        let timeout = shared.limits.write_timeout;
        thread::Builder::new()
            .name("gvfs-conn-tx".into())
            .spawn(move || write_answers(writer, rx, &conn, &socket, &deadline, timeout))
            .map_err(ConnError::Spawn)?
    };
    let res = read_requests(shared, reader, &conn, &socket, &answers, &jobs);
    conn.set_dead();
    transport::shutdown(&socket);
    // The writer ends once the jobs still queued have answered (they
    // skip a dead connection's work).
    drop(answers);
    let _ = writer.join();
    res
}

fn read_requests(
    shared: &Arc<Shared>,
    mut reader: Box<dyn Read + Send>,
    conn: &Arc<Conn>,
    socket: &Arc<TcpStream>,
    answers: &mpsc::Sender<Answer>,
    jobs: &mpsc::Sender<Job>,
) -> Result<(), ConnError> {
    let mine = Arc::new(Slots::new(shared.limits.max_requests_per_conn));
    let bytes = Arc::new(Slots::new(shared.limits.max_answer_bytes_per_conn));
    let stopping = || conn.is_dead() || shared.stop.load(Ordering::SeqCst);
    loop {
        // A place of this connection first: while it has its most
        // requests unanswered, nothing more is read from it.
        if !mine.take(stopping) {
            return Ok(());
        }
        let mut ticket = Ticket {
            shared: shared.clone(),
            mine: mine.clone(),
            bytes: bytes.clone(),
            held: 0,
        };
        let body = match proto::read_frame(&mut reader) {
            Ok(Some(b)) => b,
            Ok(None) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        // Not even an id: the stream cannot be trusted any more.
        let (id, req) = proto::decode_request(&body)?;
        drop(body);
        // Then room for its answer among this connection's queued
        // answers: a client that reads its answers slowly or not at all
        // waits for them, and no one else does.
        let need = answer_bound(&req);
        if !bytes.take_n(need, stopping) {
            return Ok(());
        }
        let _ = shared.answer_bytes.try_take_n(need);
        ticket.held = need;
        // Then a place among the requests being worked on in all, which
        // other connections give back as their requests are run.
        if !shared.requests.take(stopping) {
            return Ok(());
        }
        let working = Working(shared.requests.clone());
        let (conn, answers) = (conn.clone(), answers.clone());
        let job: Job = Box::new(move || {
            if conn.is_dead() {
                return;
            }
            let (op, resp) = match req {
                Ok(req) => {
                    let op = req.op();
                    (op, conn.handle(req).unwrap_or_else(Response::Error))
                }
                Err(e) => {
                    if let Some(held_back) = conn.shared.logs.malformed.allow() {
                        debug!(error = %e, held_back, "malformed request");
                    }
                    (0, Response::Error(libc::EINVAL))
                }
            };
            let frame = proto::response_frame(id, &resp);
            drop(resp);
            drop(working);
            ticket.hold(frame.len());
            conn.shared.counters.add(op, frame.len());
            let _ = answers.send(Answer {
                frame,
                _ticket: ticket,
            });
        });
        if jobs.send(job).is_err() {
            transport::shutdown(socket);
            return Ok(());
        }
    }
}

/// Writes answers as they come, each whole within `timeout` of its
/// start. A write that fails or misses its deadline ends the connection;
/// the answers after it are dropped, which gives their places back.
fn write_answers(
    mut w: Box<dyn Write + Send>,
    answers: mpsc::Receiver<Answer>,
    conn: &Conn,
    socket: &TcpStream,
    deadline: &WriteDeadline,
    timeout: Duration,
) {
    for a in answers {
        if conn.is_dead() {
            continue;
        }
        // No deadline only if it is past what an Instant can hold.
        deadline.set(Instant::now().checked_add(timeout));
        if let Err(e) = proto::write_whole_frame(&mut w, &a.frame) {
            let stalled = matches!(&e, proto::ProtoError::Io(io)
                if matches!(io.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut));
            if stalled && let Some(held_back) = conn.shared.logs.stalled.allow() {
                warn!(peer = ?socket.peer_addr().ok(), held_back, ?timeout, "client did not read an answer within the write deadline; dropped");
            }
            conn.set_dead();
            transport::shutdown(socket);
        }
    }
}
