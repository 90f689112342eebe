//! One client connection: its handshake (within one deadline), then a
//! reader that hands requests to the shared workers and a writer thread
//! that sends their answers back.
//!
//! Each request holds a place of its connection and one of the server's
//! until its answer is written ([`Ticket`]); the reader waits for both
//! before it takes the next request, so a client can have only so many
//! requests queued, and all clients together only so many. Workers never
//! write to a socket: a client that stops reading blocks only its own
//! writer, which the write time-out ends, dropping the client.

use std::io::{self, Read, Write};
use std::net::{IpAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::Instant;

use tracing::{debug, warn};

use super::limits::Slots;
use super::ops::Conn;
use super::{Job, Shared, lock};
use crate::proto::{self, Response};
use crate::transport::{self, Split};

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
            self.shared.handshakes.give();
            self.shared.peers.handshake_done(self.ip);
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.handshake_over();
        lock(&self.shared.conns).remove(&self.id);
        self.shared.peers.gone(self.ip);
    }
}

/// Serves one connection to its end.
pub(super) fn serve(mut admitted: Admitted, sock: TcpStream, jobs: mpsc::Sender<Job>) {
    let shared = admitted.shared.clone();
    let peer = sock.peer_addr().ok();
    let start = handshake_within_deadline(&mut admitted, sock);
    let res = match start {
        Ok(Some(split)) => run(&shared, split, jobs),
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
    split.socket.set_read_timeout(None).map_err(io)?;
    // A client that stops reading is dropped rather than kept forever.
    split
        .socket
        .set_write_timeout(Some(shared.limits.write_timeout))
        .map_err(io)?;
    Ok(split)
}

/// A request's places (its connection's and the server's), given back
/// when its answer has been written or dropped.
struct Ticket {
    mine: Arc<Slots>,
    all: Option<Arc<Slots>>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.mine.give();
        if let Some(all) = &self.all {
            all.give();
        }
    }
}

/// An answer for the writer, with the places it holds.
struct Answer {
    frame: Vec<u8>,
    _ticket: Ticket,
}

/// Serves a logged-in connection: reads requests until the client goes
/// or the connection fails, then waits for the writer to finish.
fn run(shared: &Arc<Shared>, split: Split, jobs: mpsc::Sender<Job>) -> Result<(), ConnError> {
    let Split {
        reader,
        writer,
        socket,
    } = split;
    let socket = Arc::new(socket);
    let conn = Arc::new(Conn::new(shared.clone()));
    let (answers, rx) = mpsc::channel::<Answer>();
    let writer = {
        let (conn, socket) = (conn.clone(), socket.clone());
        thread::Builder::new()
            .name("gvfs-conn-tx".into())
            .spawn(move || write_answers(writer, rx, &conn, &socket))
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
    let stopping = || conn.is_dead() || shared.stop.load(Ordering::SeqCst);
    loop {
        // A place of this connection first: while it has its most
        // requests unanswered, nothing more is read from it.
        if !mine.take(stopping) {
            return Ok(());
        }
        let mut ticket = Ticket {
            mine: mine.clone(),
            all: None,
        };
        let body = match proto::read_frame(&mut reader) {
            Ok(Some(b)) => b,
            Ok(None) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        // Not even an id: the stream cannot be trusted any more.
        let (id, req) = proto::decode_request(&body)?;
        drop(body);
        // Then a place in all, waiting for other connections' answers.
        if !shared.requests.take(stopping) {
            return Ok(());
        }
        ticket.all = Some(shared.requests.clone());
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

/// Writes answers as they come. A write that fails or makes no progress
/// for the write time-out ends the connection; the answers after it are
/// dropped, which gives their places back.
fn write_answers(
    mut w: Box<dyn Write + Send>,
    answers: mpsc::Receiver<Answer>,
    conn: &Conn,
    socket: &TcpStream,
) {
    for a in answers {
        if conn.is_dead() {
            continue;
        }
        if let Err(e) = proto::write_whole_frame(&mut w, &a.frame) {
            let stalled = matches!(&e, proto::ProtoError::Io(io)
                if matches!(io.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut));
            if stalled && let Some(held_back) = conn.shared.logs.stalled.allow() {
                warn!(peer = ?socket.peer_addr().ok(), held_back, "client stopped reading its answers; dropped");
            }
            conn.set_dead();
            transport::shutdown(socket);
        }
    }
}
