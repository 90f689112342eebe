//! The server's bounds on what peers and clients may hold: connections,
//! handshakes, queued requests, open files, stalled writes, and running
//! out of descriptors. A slow, stopped or hostile peer must not stop the
//! server for the others.

mod common;

use common::*;
use gvfs::client::conn::{Conn, ConnectConfig};
use gvfs::proto::{self, Request, Response};
use gvfs::server::{Server, ServerConfig, ServerHandle, ServerLimits};
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

fn start_with(cfg: ServerConfig, limits: ServerLimits) -> ServerHandle {
    let server = Server::bind(cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
    server.with_limits(limits).spawn()
}

fn raw(addr: SocketAddr) -> Conn {
    Conn::connect(&ConnectConfig {
        request_timeout: Duration::from_secs(10),
        ..connect_config(addr)
    })
    .unwrap()
}

/// Completes the handshake on `s`; whether the server accepted it.
fn handshake(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    if s.write_all(&hello_frame()).is_err() {
        return false;
    }
    match proto::read_frame(s) {
        Ok(Some(w)) => proto::decode_welcome(&w).unwrap().status == proto::HelloStatus::Accepted,
        _ => false,
    }
}

fn open_file(c: &Conn, node: u64) -> Response {
    c.call(&Request::Open { node, flags: 0 }).unwrap()
}

fn lookup_node(c: &Conn, name: &[u8]) -> u64 {
    match c
        .call(&Request::Lookup {
            parent: proto::ROOT_NODE,
            name: name.to_vec(),
        })
        .unwrap()
    {
        Response::Attr(a) => a.node,
        r => panic!("{r:?}"),
    }
}

fn export_with_file(dir: &Path, size: usize) {
    fs::write(dir.join("f"), data(size, 1)).unwrap();
}

#[test]
fn server_descriptors_are_capped_per_client_and_in_all() {
    let tmp = tempfile::tempdir().unwrap();
    export_with_file(tmp.path(), 10);
    let limits = ServerLimits {
        max_handles_per_conn: 8,
        max_handles: 24,
        ..ServerLimits::default()
    };
    let server = start_with(server_config(tmp.path()), limits);
    bounded(30, None, move || {
        let a = raw(server.local_addr());
        let f = lookup_node(&a, b"f");
        for _ in 0..8 {
            assert!(matches!(open_file(&a, f), Response::Opened { .. }));
        }
        // One client past its share: EMFILE, and nothing more held.
        assert_eq!(open_file(&a, f), Response::Error(libc::EMFILE));
        assert_eq!(server.open_handles(), 8);
        // Another client (of the same peer) still gets descriptors, up to
        // what one peer may hold of all while it is alone: half.
        let b = raw(server.local_addr());
        for _ in 0..4 {
            assert!(matches!(open_file(&b, f), Response::Opened { .. }));
        }
        assert_eq!(open_file(&b, f), Response::Error(libc::ENFILE));
        assert_eq!(server.open_handles(), 12);
        // A client that goes away gives its descriptors back.
        drop(a);
        assert!(eventually(Duration::from_secs(5), || server.open_handles() == 4));
        assert!(matches!(open_file(&b, f), Response::Opened { .. }));
        server.shutdown();
    });
}

#[test]
fn descriptors_are_capped_per_peer() {
    let tmp = tempfile::tempdir().unwrap();
    export_with_file(tmp.path(), 10);
    let limits = ServerLimits {
        max_handles_per_conn: 8,
        max_handles_per_peer: 12,
        max_handles: 1000,
        ..ServerLimits::default()
    };
    let server = start_with(server_config(tmp.path()), limits);
    bounded(30, None, move || {
        let addr = server.local_addr();
        let f = lookup_node(&raw(addr), b"f");
        // Two connections of one peer: 8 + 4, then EMFILE on both.
        let mut a1 = Peer::login([127, 0, 0, 2], addr);
        let mut a2 = Peer::login([127, 0, 0, 2], addr);
        assert_eq!(a1.open_all(f, 20), (8, libc::EMFILE));
        assert_eq!(a2.open_all(f, 20), (4, libc::EMFILE));
        // Another peer is not held up by it.
        let mut b = Peer::login([127, 0, 0, 3], addr);
        assert_eq!(b.open_all(f, 20), (8, libc::EMFILE));
        assert_eq!(server.open_handles(), 20);
        // The peer's files close with its connection: room again.
        drop(a1);
        assert!(eventually(Duration::from_secs(5), || server.open_handles() == 12));
        assert_eq!(a2.open_all(f, 20), (4, libc::EMFILE));
        server.shutdown();
    });
}

#[test]
fn a_trickled_handshake_is_cut_at_its_deadline() {
    let tmp = tempfile::tempdir().unwrap();
    let limits = ServerLimits {
        handshake_timeout: Duration::from_secs(1),
        ..ServerLimits::default()
    };
    let server = start_with(server_config(tmp.path()), limits);
    bounded(30, None, move || {
        // One byte of the hello every 200 ms: every read is quick, the
        // whole handshake is not.
        let mut s = TcpStream::connect(server.local_addr()).unwrap();
        let hello = hello_frame();
        let mut cut = false;
        for b in &hello[..hello.len() - 1] {
            if s.write_all(&[*b]).is_err() || closed_within(&mut s, Duration::from_millis(200)) {
                cut = true;
                break;
            }
        }
        assert!(cut, "the server waited for all {} bytes", hello.len());
        server.shutdown();
    });
}

#[test]
fn a_trickled_tls_handshake_is_cut_at_its_deadline() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    fs::write(dir.path().join("cert.pem"), cert.cert.pem()).unwrap();
    fs::write(dir.path().join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
    let tls = gvfs::transport::server_tls_config(
        &dir.path().join("cert.pem"),
        &dir.path().join("key.pem"),
    )
    .unwrap();
    let limits = ServerLimits {
        handshake_timeout: Duration::from_secs(1),
        ..ServerLimits::default()
    };
    let server = start_with(
        ServerConfig {
            tls: Some(tls),
            ..server_config(tmp.path())
        },
        limits,
    );
    bounded(30, None, move || {
        // A TLS record header announcing a 16 KiB handshake message, then
        // its bytes one at a time.
        let mut s = TcpStream::connect(server.local_addr()).unwrap();
        s.write_all(&[0x16, 0x03, 0x01, 0x40, 0x00]).unwrap();
        let mut cut = false;
        for _ in 0..40 {
            if s.write_all(&[0]).is_err() || closed_within(&mut s, Duration::from_millis(200)) {
                cut = true;
                break;
            }
        }
        assert!(cut, "the server kept a trickled TLS handshake for 8 s");
        server.shutdown();
    });
}

#[test]
fn a_frame_larger_than_a_hello_is_refused_before_authentication() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start(server_config(tmp.path()), "127.0.0.1:0");
    bounded(30, None, move || {
        // A length a hello can never have (it is at most a few hundred
        // bytes): dropped at once, nothing allocated or waited for.
        let mut s = TcpStream::connect(server.local_addr()).unwrap();
        s.write_all(&(proto::MAX_FRAME as u32).to_le_bytes())
            .unwrap();
        assert!(closed_within(&mut s, Duration::from_secs(3)));
        server.shutdown();
    });
}

#[test]
fn connections_are_capped_per_peer_and_in_all() {
    let tmp = tempfile::tempdir().unwrap();
    export_with_file(tmp.path(), 10);
    let limits = ServerLimits {
        max_handshakes_per_peer: 2,
        max_connections_per_peer: 3,
        max_connections: 6,
        ..ServerLimits::default()
    };
    let server = start_with(server_config(tmp.path()), limits);
    bounded(30, None, move || {
        let addr = server.local_addr();
        // Peer 1 opens connections and says nothing: two wait for their
        // hello, the third is closed at once.
        let mut idle: Vec<TcpStream> = (0..2).map(|_| connect_from([127, 0, 0, 1], addr)).collect();
        let mut third = connect_from([127, 0, 0, 1], addr);
        assert!(
            closed_within(&mut third, Duration::from_secs(3)),
            "a third idle connection was kept"
        );
        for s in &mut idle {
            assert!(
                !closed_within(s, Duration::from_millis(100)),
                "an idle connection within the cap was closed"
            );
        }
        // Peer 2 is not held up by it; it may log in three times, not four.
        let mut b = Vec::new();
        for _ in 0..3 {
            let mut s = connect_from([127, 0, 0, 2], addr);
            assert!(handshake(&mut s));
            b.push(s);
        }
        assert!(
            !handshake(&mut connect_from([127, 0, 0, 2], addr)),
            "a fourth connection of one peer was accepted"
        );
        // Six in all (2 idle + 3 + 1): a third peer gets one, not two.
        let mut c1 = connect_from([127, 0, 0, 3], addr);
        assert!(handshake(&mut c1));
        assert!(
            !handshake(&mut connect_from([127, 0, 0, 3], addr)),
            "a connection past the cap in all was accepted"
        );
        assert_eq!(server.connections(), 6);
        // Once one goes, there is room again.
        b.pop();
        assert!(eventually(Duration::from_secs(5), || {
            handshake(&mut connect_from([127, 0, 0, 3], addr))
        }));
        server.shutdown();
    });
}

#[test]
fn a_client_that_stops_reading_does_not_stop_the_others() {
    let tmp = tempfile::tempdir().unwrap();
    export_with_file(tmp.path(), 1 << 20);
    let limits = ServerLimits {
        write_timeout: Duration::from_secs(1),
        ..ServerLimits::default()
    };
    let server = start_with(
        ServerConfig {
            workers: 2,
            ..server_config(tmp.path())
        },
        limits,
    );
    bounded(60, None, move || {
        let addr = server.local_addr();
        // A reads the node id, then asks for 200 MiB and reads nothing.
        let mut a = TcpStream::connect(addr).unwrap();
        assert!(handshake(&mut a));
        let f = lookup_node(&raw(addr), b"f");
        let mut reqs = Vec::new();
        reqs.extend(proto::request_frame(
            1,
            &Request::Open { node: f, flags: 0 },
        ));
        for id in 2..202 {
            reqs.extend(proto::request_frame(
                id,
                &Request::Read {
                    handle: 1,
                    offset: 0,
                    len: proto::MAX_IO,
                },
            ));
        }
        a.write_all(&reqs).unwrap();
        // B is served all along.
        let b = raw(addr);
        for _ in 0..20 {
            let h = match open_file(&b, f) {
                Response::Opened { handle, .. } => handle,
                r => panic!("{r:?}"),
            };
            let r = b
                .call(&Request::Read {
                    handle: h,
                    offset: 0,
                    len: 4096,
                })
                .expect("B must be answered while A does not read");
            assert!(matches!(r, Response::Data(d) if d.len() == 4096));
            b.call(&Request::Release { handle: h }).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
        // A, stalled past the write time-out, is dropped, and what it had
        // queued goes with it.
        assert!(
            eventually(Duration::from_secs(10), || server.connections() == 1),
            "{} connections",
            server.connections()
        );
        assert!(closed_within(&mut a, Duration::from_secs(5)));
        assert!(eventually(Duration::from_secs(5), || server
            .requests_in_flight()
            == 0));
        server.shutdown();
    });
}

/// Answers to READ sent so far (built by a worker, written or not).
fn reads_answered(server: &ServerHandle) -> u64 {
    server.op_stats(proto::op::READ).count
}

/// Waits (up to 20 s) until the server has answered no READ for 300 ms:
/// the clients that stopped reading hold all they can.
fn wait_until_reads_settle(server: &ServerHandle) {
    let end = Instant::now() + Duration::from_secs(20);
    let mut last = (reads_answered(server), Instant::now());
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
        let n = reads_answered(server);
        if n != last.0 {
            last = (n, Instant::now());
        } else if last.1.elapsed() >= Duration::from_millis(300) {
            return;
        }
    }
}

/// A client that logs in and asks for `reads` reads of `len` bytes of
/// the file `node`, then reads nothing.
fn stalled_client(addr: SocketAddr, node: u64, reads: u64, len: u32) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    assert!(handshake(&mut s));
    let mut reqs = proto::request_frame(1, &Request::Open { node, flags: 0 });
    for id in 2..2 + reads {
        reqs.extend(proto::request_frame(
            id,
            &Request::Read {
                handle: 1,
                offset: 0,
                len,
            },
        ));
    }
    // The server stops reading before it has all of them: write from a
    // thread, which ends when the server drops the connection.
    let mut w = s.try_clone().unwrap();
    std::thread::spawn(move || {
        let _ = w.write_all(&reqs);
    });
    s
}

#[test]
fn queued_requests_are_bounded_per_connection_and_in_all() {
    // Default bounds, but the write deadline long enough that no client
    // is dropped during the test.
    const STALLED: usize = 10;
    let tmp = tempfile::tempdir().unwrap();
    export_with_file(tmp.path(), 1 << 20);
    let limits = ServerLimits {
        write_timeout: Duration::from_secs(120),
        ..ServerLimits::default()
    };
    let server = start_with(
        ServerConfig {
            workers: 2,
            ..server_config(tmp.path())
        },
        limits,
    );
    bounded(90, None, move || {
        let addr = server.local_addr();
        let f = lookup_node(&raw(addr), b"f");
        // More clients than it takes to hold every request place if
        // places were held until answers are written (512 / 64 = 8), each
        // asking for 50 MiB and reading nothing.
        let stalled: Vec<TcpStream> = (0..STALLED)
            .map(|_| stalled_client(addr, f, 200, 256 << 10))
            .collect();
        wait_until_reads_settle(&server);
        assert!(server.requests_in_flight() <= gvfs::server::DEFAULT_MAX_REQUESTS);
        // What they hold waiting to be written is bounded per connection.
        let queued = server.queued_answer_bytes();
        assert!(
            queued <= STALLED * gvfs::server::DEFAULT_MAX_ANSWER_BYTES_PER_CONN,
            "{queued} bytes of answers queued"
        );
        // A healthy client is served promptly all along.
        let c = Conn::connect(&ConnectConfig {
            request_timeout: Duration::from_secs(5),
            ..connect_config(addr)
        })
        .unwrap();
        for _ in 0..20 {
            let h = match c.call(&Request::Open { node: f, flags: 0 }) {
                Ok(Response::Opened { handle, .. }) => handle,
                r => panic!("a healthy client was not served: {r:?}"),
            };
            let r = c.call(&Request::Read {
                handle: h,
                offset: 0,
                len: 4096,
            });
            assert!(
                matches!(r, Ok(Response::Data(ref d)) if d.len() == 4096),
                "{r:?}"
            );
            c.call(&Request::Release { handle: h }).unwrap();
        }
        // The stalled clients are still there: it was not their going
        // that let it in.
        assert_eq!(server.connections(), STALLED + 1);
        drop(stalled);
        server.shutdown();
    });
}

#[test]
fn a_client_reading_too_slowly_is_dropped() {
    // A client that reads 128 KiB every 250 ms: always some progress
    // (a write time-out on progress alone never fires), but far below
    // what it takes to write a 1 MiB answer within the 1 s deadline.
    let tmp = tempfile::tempdir().unwrap();
    export_with_file(tmp.path(), 1 << 20);
    let limits = ServerLimits {
        write_timeout: Duration::from_secs(1),
        ..ServerLimits::default()
    };
    let server = start_with(server_config(tmp.path()), limits);
    bounded(60, None, move || {
        let addr = server.local_addr();
        let f = lookup_node(&raw(addr), b"f");
        assert!(eventually(Duration::from_secs(5), || server.connections() == 0));
        let s = stalled_client(addr, f, 200, proto::MAX_IO);
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (mut s, stop) = (s.try_clone().unwrap(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 128 << 10];
                s.set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                while !stop.load(Ordering::SeqCst) {
                    let mut got = 0;
                    while got < buf.len() {
                        match s.read(&mut buf[got..]) {
                            Ok(0) => return,
                            Ok(n) => got += n,
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                            Err(_) => return,
                        }
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
            })
        };
        assert!(
            eventually(Duration::from_secs(15), || server.connections() == 0),
            "a client reading 512 KiB/s was kept while 1 MiB answers must go out within 1 s"
        );
        stop.store(true, Ordering::SeqCst);
        drop(s);
        reader.join().unwrap();
        server.shutdown();
    });
}

/// A logged-in connection from the loopback address `src`, speaking the
/// protocol by hand (one request at a time).
struct Peer {
    s: TcpStream,
    id: u64,
}

impl Peer {
    fn login(src: [u8; 4], addr: SocketAddr) -> Peer {
        let mut s = connect_from(src, addr);
        assert!(handshake(&mut s), "{src:?} could not log in");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Peer { s, id: 0 }
    }

    fn call(&mut self, req: &Request) -> Response {
        self.id += 1;
        self.s
            .write_all(&proto::request_frame(self.id, req))
            .unwrap();
        let body = proto::read_frame(&mut self.s).unwrap().unwrap();
        let (id, resp) = proto::decode_response(&body).unwrap();
        assert_eq!(id, self.id);
        resp
    }

    /// Opens `node` until refused: how many it got, and the refusal.
    fn open_all(&mut self, node: u64, most: usize) -> (usize, i32) {
        for n in 0..most {
            match self.call(&Request::Open { node, flags: 0 }) {
                Response::Opened { .. } => {}
                Response::Error(e) => return (n, e),
                r => panic!("{r:?}"),
            }
        }
        (most, 0)
    }
}

#[test]
fn descriptors_are_shared_fairly_between_peers() {
    let tmp = tempfile::tempdir().unwrap();
    export_with_file(tmp.path(), 10);
    let limits = ServerLimits {
        max_handles_per_conn: 16,
        max_handles: 40,
        ..ServerLimits::default()
    };
    let server = start_with(server_config(tmp.path()), limits);
    bounded(30, None, move || {
        let addr = server.local_addr();
        let f = lookup_node(&raw(addr), b"f");
        // Peer A opens all it can over three connections (a host with
        // three shares that never close their files).
        let mut a: Vec<Peer> = (0..3).map(|_| Peer::login([127, 0, 0, 2], addr)).collect();
        let got_a: usize = a.iter_mut().map(|p| p.open_all(f, 16).0).sum();
        assert!(got_a <= 20, "one peer took {got_a} of 40 descriptors");
        // Three more peers each still get a share.
        for (i, src) in [[127, 0, 0, 3], [127, 0, 0, 4], [127, 0, 0, 5]]
            .into_iter()
            .enumerate()
        {
            let mut p = Peer::login(src, addr);
            let (got, e) = p.open_all(f, 16);
            assert!(
                got >= 4,
                "peer {i} got only {got} descriptors (then errno {e})"
            );
            assert_eq!(e, libc::ENFILE);
            a.push(p);
        }
        assert!(server.open_handles() <= 40);
        server.shutdown();
    });
}

#[test]
fn idle_handshakes_from_many_addresses_do_not_keep_a_client_out() {
    let tmp = tempfile::tempdir().unwrap();
    // Default bounds, but idle handshakes are never cut at their
    // deadline during the test: only making room lets a client in.
    let limits = ServerLimits {
        handshake_timeout: Duration::from_secs(120),
        ..ServerLimits::default()
    };
    let server = start_with(server_config(tmp.path()), limits);
    bounded(90, None, move || {
        let addr = server.local_addr();
        // 20 addresses open 10 connections each and say nothing: more
        // than every handshake place.
        let mut idle = Vec::new();
        for a in 0..20u8 {
            for _ in 0..10 {
                idle.push(connect_from([127, 0, 1, 10 + a], addr));
            }
        }
        // And go on opening new ones, as an attacker reconnecting would.
        let stop = Arc::new(AtomicBool::new(false));
        let churn = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut held = std::collections::VecDeque::new();
                let mut i = 0u8;
                while !stop.load(Ordering::SeqCst) {
                    held.push_back(connect_from([127, 0, 1, 10 + i % 20], addr));
                    if held.len() > 200 {
                        held.pop_front();
                    }
                    i = i.wrapping_add(1);
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        // A real client logs in promptly, again and again.
        for _ in 0..5 {
            let t = Instant::now();
            let mut s = connect_from([127, 0, 0, 2], addr);
            assert!(handshake(&mut s), "a client could not log in");
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "a login took {:?}",
                t.elapsed()
            );
        }
        stop.store(true, Ordering::SeqCst);
        churn.join().unwrap();
        // The idle ones hold no more than the handshake places.
        assert!(server.handshakes() <= gvfs::server::DEFAULT_MAX_HANDSHAKES);
        assert!(
            eventually(Duration::from_secs(10), || server.connections()
                <= gvfs::server::DEFAULT_MAX_HANDSHAKES),
            "{} connections",
            server.connections()
        );
        drop(idle);
        server.shutdown();
    });
}

/// Counts warnings and errors logged by gvfs (installed in the child
/// process of the descriptor test).
mod warnings {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Level, Metadata, Subscriber};

    pub static COUNT: AtomicUsize = AtomicUsize::new(0);

    pub struct Counter;

    impl Subscriber for Counter {
        fn enabled(&self, m: &Metadata<'_>) -> bool {
            *m.level() <= Level::WARN
        }
        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(1)
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, e: &Event<'_>) {
            if e.metadata().target().starts_with("gvfs") {
                COUNT.fetch_add(1, Ordering::SeqCst);
            }
        }
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }
}

const CHILD: &str = "GVFS_TEST_EMFILE_CHILD";

#[test]
fn accept_backs_off_when_descriptors_run_out() {
    // Run in a process of its own: it lowers the descriptor limit.
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "emfile_child", "--ignored", "--nocapture"])
        .env(CHILD, "1")
        .spawn()
        .unwrap();
    let mut status = None;
    for _ in 0..300 {
        if let Some(s) = child.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the child took longer than 30 s");
    };
    assert!(status.success(), "child failed: {status}");
}

#[test]
#[ignore = "run by accept_backs_off_when_descriptors_run_out in a process of its own"]
fn emfile_child() {
    use std::sync::atomic::Ordering;
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    tracing::subscriber::set_global_default(warnings::Counter).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let server = start(server_config(tmp.path()), "127.0.0.1:0");
    let addr = server.local_addr();
    // Few descriptors, all taken but one, which the client takes.
    let lim = libc::rlimit {
        rlim_cur: 256,
        rlim_max: 256,
    };
    // SAFETY: `lim` is a valid rlimit.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
    let mut fill = Vec::new();
    while let Ok(f) = fs::File::open("/dev/null") {
        fill.push(f);
    }
    fill.pop();
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&hello_frame()).unwrap();
    // The server cannot accept it for a second: it backs off, and says
    // so once, not once per try.
    std::thread::sleep(Duration::from_secs(1));
    let logged = warnings::COUNT.load(Ordering::SeqCst);
    assert!(logged <= 3, "{logged} warnings in one second");
    drop(fill);
    // Then it goes on: the connection is served.
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let w = proto::read_frame(&mut s)
        .unwrap_or_else(|e| panic!("no welcome: {e} ({e:?})"))
        .expect("a welcome");
    assert_eq!(
        proto::decode_welcome(&w).unwrap().status,
        proto::HelloStatus::Accepted
    );
    server.shutdown();
}
