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
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

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
        max_handles_per_conn: 16,
        max_handles: 24,
        ..ServerLimits::default()
    };
    let server = start_with(server_config(tmp.path()), limits);
    bounded(30, None, move || {
        let a = raw(server.local_addr());
        let f = lookup_node(&a, b"f");
        for _ in 0..16 {
            assert!(matches!(open_file(&a, f), Response::Opened { .. }));
        }
        // One client past its share: EMFILE, and nothing more held.
        assert_eq!(open_file(&a, f), Response::Error(libc::EMFILE));
        assert_eq!(server.open_handles(), 16);
        // Another client still gets descriptors, up to what is left in all.
        let b = raw(server.local_addr());
        for _ in 0..8 {
            assert!(matches!(open_file(&b, f), Response::Opened { .. }));
        }
        assert_eq!(open_file(&b, f), Response::Error(libc::ENFILE));
        // A client that goes away gives its descriptors back.
        drop(a);
        assert!(eventually(Duration::from_secs(5), || server.open_handles() == 8));
        assert!(matches!(open_file(&b, f), Response::Opened { .. }));
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

#[test]
fn queued_requests_are_bounded_per_connection_and_in_all() {
    let tmp = tempfile::tempdir().unwrap();
    export_with_file(tmp.path(), 1 << 20);
    let limits = ServerLimits {
        max_requests_per_conn: 8,
        max_requests: 12,
        write_timeout: Duration::from_secs(2),
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
        let f = lookup_node(&raw(addr), b"f");
        // Two clients pipeline 500 reads of 1 MiB each and read nothing.
        let mut stalled = Vec::new();
        for _ in 0..2 {
            let mut s = TcpStream::connect(addr).unwrap();
            assert!(handshake(&mut s));
            let mut reqs = proto::request_frame(1, &Request::Open { node: f, flags: 0 });
            for id in 2..502 {
                reqs.extend(proto::request_frame(
                    id,
                    &Request::Read {
                        handle: 1,
                        offset: 0,
                        len: proto::MAX_IO,
                    },
                ));
            }
            s.write_all(&reqs).unwrap();
            stalled.push(s);
        }
        let mut most = 0;
        for _ in 0..50 {
            most = most.max(server.requests_in_flight());
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(most > 0);
        assert!(most <= 12, "{most} requests held at once");
        // A third client is answered (at the latest once the stalled ones
        // are dropped).
        let c = raw(addr);
        assert!(matches!(open_file(&c, f), Response::Opened { .. }));
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
