//! The server's boundaries: the export root, authentication, TLS,
//! read-only exports, and clients that lose and regain the server.

mod common;

use common::*;
use gvfs::client::conn::{Conn, ConnectConfig};
use gvfs::client::{ClientError, FsOptions, OnDisconnect, ROOT_INO};
use gvfs::proto::{self, HelloStatus, Request, Response};
use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn raw(addr: std::net::SocketAddr) -> Conn {
    Conn::connect(&connect_config(addr)).unwrap()
}

fn lookup(c: &Conn, parent: u64, name: &[u8]) -> Response {
    c.call(&Request::Lookup {
        parent,
        name: name.to_vec(),
    })
    .unwrap()
}

fn node(r: Response) -> u64 {
    match r {
        Response::Attr(a) => a.node,
        r => panic!("expected attributes, got {r:?}"),
    }
}

fn errno(r: Response) -> i32 {
    match r {
        Response::Error(e) => e,
        r => panic!("expected an error, got {r:?}"),
    }
}

#[test]
fn paths_that_leave_the_export_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("export");
    fs::create_dir_all(export.join("dir")).unwrap();
    fs::write(tmp.path().join("secret"), b"outside").unwrap();
    fs::write(export.join("dir/ok"), b"inside").unwrap();
    symlink("/etc", export.join("abs")).unwrap();
    symlink("../..", export.join("dir/up")).unwrap();
    symlink(tmp.path().join("secret"), export.join("abs_file")).unwrap();
    symlink("/nonexistent/x", export.join("dangling")).unwrap();
    let server = start(server_config(&export), "127.0.0.1:0");
    bounded(30, None, move || {
        let c = raw(server.local_addr());
        let root = proto::ROOT_NODE;
        // Names are single components: `..`, `.`, slashes are refused.
        assert_eq!(errno(lookup(&c, root, b"..")), libc::EACCES);
        assert_eq!(errno(lookup(&c, root, b".")), libc::EACCES);
        assert_eq!(errno(lookup(&c, root, b"dir/../../secret")), libc::EACCES);
        assert_eq!(errno(lookup(&c, root, b"/etc")), libc::EACCES);
        assert_eq!(errno(lookup(&c, root, b"")), libc::EINVAL);
        // Symlinks are links, never followed by the server.
        let abs = node(lookup(&c, root, b"abs"));
        assert_ne!(errno(lookup(&c, abs, b"passwd")), 0);
        let r = c
            .call(&Request::Readdir {
                node: abs,
                cookie: 0,
            })
            .unwrap();
        assert!(
            matches!(r, Response::Error(_)),
            "readdir through /etc: {r:?}"
        );
        let dir = node(lookup(&c, root, b"dir"));
        let up = node(lookup(&c, dir, b"up"));
        assert_ne!(errno(lookup(&c, up, b"secret")), 0);
        let r = c
            .call(&Request::Readdir {
                node: up,
                cookie: 0,
            })
            .unwrap();
        assert!(
            matches!(r, Response::Error(_)),
            "readdir through ../..: {r:?}"
        );
        for name in [&b"abs_file"[..], b"dangling", b"abs"] {
            let n = node(lookup(&c, root, name));
            let r = c.call(&Request::Open { node: n, flags: 0 }).unwrap();
            assert_eq!(errno(r), libc::ELOOP, "open of symlink {name:?}");
            let r = c
                .call(&Request::Setattr {
                    node: n,
                    set: proto::SetAttr {
                        mode: Some(0o777),
                        ..Default::default()
                    },
                })
                .unwrap();
            assert!(matches!(r, Response::Error(_)));
        }
        // A FIFO is not opened (it would block a server thread).
        let fifo =
            std::ffi::CString::new(export.join("fifo").as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `fifo` is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let n = node(lookup(&c, root, b"fifo"));
        let r = c.call(&Request::Open { node: n, flags: 0 }).unwrap();
        assert_eq!(errno(r), libc::EOPNOTSUPP);
        // Creating through a symlinked directory is refused too.
        let r = c
            .call(&Request::Create {
                parent: abs,
                name: b"owned".to_vec(),
                mode: 0o644,
                flags: libc::O_WRONLY as u32,
                uid: 0,
                gid: 0,
            })
            .unwrap();
        assert!(matches!(r, Response::Error(_)));
        assert!(!Path::new("/etc/owned").exists());
        // Unknown node ids and handles are errors, not panics.
        assert_eq!(
            errno(c.call(&Request::Getattr { node: 999_999 }).unwrap()),
            libc::ESTALE
        );
        let r = c
            .call(&Request::Read {
                handle: 77,
                offset: 0,
                len: 10,
            })
            .unwrap();
        assert_eq!(errno(r), libc::EBADF);
        // The outside file is untouched and inside files are readable.
        assert_eq!(fs::read(tmp_secret(&export)).unwrap(), b"outside");
        let ok = node(lookup(&c, dir, b"ok"));
        match c.call(&Request::Open { node: ok, flags: 0 }).unwrap() {
            Response::Opened { handle, .. } => {
                let r = c
                    .call(&Request::Read {
                        handle,
                        offset: 0,
                        len: 100,
                    })
                    .unwrap();
                assert_eq!(r, Response::Data(b"inside".to_vec()));
            }
            r => panic!("{r:?}"),
        }
        server.shutdown();
    });
}

fn tmp_secret(export: &Path) -> std::path::PathBuf {
    export.parent().unwrap().join("secret")
}

#[test]
fn clients_cannot_set_setuid_bits() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("f"), b"#!/bin/sh\n").unwrap();
    let export = tmp.path().to_path_buf();
    let server = start(server_config(tmp.path()), "127.0.0.1:0");
    bounded(30, None, move || {
        let fs_ = client(server.local_addr(), FsOptions::default());
        let f = fs_.lookup(ROOT_INO, b"f").unwrap();
        let a = fs_
            .setattr(
                f.ino,
                proto::SetAttr {
                    mode: Some(0o6755),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(a.perm, 0o755);
        let (e, _) = fs_
            .create(ROOT_INO, b"g", 0o4755, libc::O_WRONLY as u32, 0, 0)
            .unwrap();
        assert_eq!(e.attr.perm & 0o7000, 0);
        let d = fs_.mkdir(ROOT_INO, b"d", 0o4775, 0, 0).unwrap();
        assert_eq!(d.attr.perm & 0o7000, 0);
        let a = fs_
            .setattr(
                d.ino,
                proto::SetAttr {
                    mode: Some(0o6775),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(a.perm, 0o2775, "setgid stays allowed on directories");
        let mode = fs::metadata(export.join("f")).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o755);
        server.shutdown();
    });
}

#[test]
fn read_only_export_refuses_writes_with_erofs() {
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("f"), b"data").unwrap();
    let mut cfg = server_config(tmp.path());
    cfg.read_only = true;
    let server = start(cfg, "127.0.0.1:0");
    bounded(30, None, move || {
        let fs_ = client(server.local_addr(), FsOptions::default());
        assert!(fs_.read_only().unwrap());
        let f = fs_.lookup(ROOT_INO, b"f").unwrap();
        let o = fs_.open(f.ino, libc::O_RDONLY as u32).unwrap();
        assert_eq!(fs_.read(o.fh, 0, 100).unwrap(), b"data");
        let e = fs_.open(f.ino, libc::O_WRONLY as u32).unwrap_err();
        assert_eq!(e.errno(), libc::EROFS);
        let e = fs_.mkdir(ROOT_INO, b"d", 0o755, 0, 0).unwrap_err();
        assert_eq!(e.errno(), libc::EROFS);
        let e = fs_.unlink(ROOT_INO, b"f").unwrap_err();
        assert_eq!(e.errno(), libc::EROFS);
        let e = fs_
            .create(ROOT_INO, b"n", 0o644, libc::O_WRONLY as u32, 0, 0)
            .unwrap_err();
        assert_eq!(e.errno(), libc::EROFS);
        server.shutdown();
    });
}

struct Pki {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    ca: std::path::PathBuf,
}

fn make_pki(dir: &Path) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let pki = Pki {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        ca: dir.join("ca.pem"),
    };
    fs::write(&pki.cert, cert.pem()).unwrap();
    fs::write(&pki.key, key.serialize_pem()).unwrap();
    fs::write(&pki.ca, ca_cert.pem()).unwrap();
    pki
}

#[test]
fn tls_with_token_works_and_bad_clients_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("export");
    fs::create_dir_all(&export).unwrap();
    fs::write(export.join("f"), data(300_000, 9)).unwrap();
    let pki = make_pki(tmp.path());
    let mut cfg = server_config(&export);
    cfg.tls = Some(gvfs::transport::server_tls_config(&pki.cert, &pki.key).unwrap());
    let server = start(cfg, "127.0.0.1:0");
    let ca = pki.ca.clone();
    bounded(30, None, move || {
        let addr = server.local_addr();
        let tls = gvfs::transport::client_tls_config(&ca).unwrap();
        let good = ConnectConfig {
            tls: Some(tls.clone()),
            ..connect_config(addr)
        };
        // The right token over TLS: a whole file comes back intact.
        let fs_ = Arc::new(gvfs::client::Fs::new(good.clone(), FsOptions::default()).unwrap());
        let f = fs_.lookup(ROOT_INO, b"f").unwrap();
        let o = fs_.open(f.ino, 0).unwrap();
        let mut got = Vec::new();
        while got.len() < 300_000 {
            let d = fs_.read(o.fh, got.len() as u64, 65536).unwrap();
            assert!(!d.is_empty());
            got.extend(d);
        }
        assert_eq!(got, data(300_000, 9));
        // A bad token is refused at the handshake.
        let bad = ConnectConfig {
            token: b"wrong".to_vec(),
            ..good.clone()
        };
        assert!(matches!(
            Conn::connect(&bad),
            Err(ClientError::Refused(HelloStatus::BadToken))
        ));
        let fs_bad = gvfs::client::Fs::new(bad, FsOptions::default()).unwrap();
        assert_eq!(fs_bad.getattr(ROOT_INO).unwrap_err().errno(), libc::EACCES);
        // A plain-text client to the TLS server gets nothing.
        let plain = connect_config(addr);
        let t = Instant::now();
        assert!(Conn::connect(&plain).is_err());
        assert!(t.elapsed() < Duration::from_secs(15));
        // A client that does not trust the server's CA is refused.
        let other = make_pki(&tempfile::tempdir().unwrap().keep());
        let untrusting = ConnectConfig {
            tls: Some(gvfs::transport::client_tls_config(&other.ca).unwrap()),
            ..good
        };
        assert!(matches!(
            Conn::connect(&untrusting),
            Err(ClientError::Transport(_))
        ));
        server.shutdown();
    });
}

#[test]
fn plaintext_is_only_allowed_on_loopback() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = server_config(tmp.path());
    let r = gvfs::server::Server::bind(cfg, "0.0.0.0:0".parse().unwrap());
    assert!(matches!(
        r,
        Err(gvfs::server::ServerError::PlaintextNotLoopback(_))
    ));
}

#[test]
fn wait_mode_blocks_until_the_server_returns_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("export");
    fs::create_dir_all(export.join("d")).unwrap();
    let content = data(1024 * 1024, 5);
    fs::write(export.join("d/f"), &content).unwrap();
    let server = start(server_config(&export), "127.0.0.1:0");
    let addr = server.local_addr();
    bounded(60, None, move || {
        let opts = FsOptions {
            on_disconnect: OnDisconnect::Wait,
            ..FsOptions::default()
        };
        let fs_ = client(addr, opts);
        let d = fs_.lookup(ROOT_INO, b"d").unwrap();
        let f = fs_.lookup(d.ino, b"f").unwrap();
        let o = fs_.open(f.ino, libc::O_RDWR as u32).unwrap();
        assert_eq!(fs_.read(o.fh, 0, 4096).unwrap(), &content[..4096]);
        assert_eq!(fs_.write(o.fh, 10, b"ACKED").unwrap(), 5);
        server.shutdown();
        // The server is gone: the read waits, and finishes once it is back.
        let export2 = export.clone();
        let restart = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1500));
            start(server_config(&export), &addr.to_string())
        });
        let t = Instant::now();
        let got = fs_.read(o.fh, 900_000, 4096).unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(1000),
            "read did not wait"
        );
        assert_eq!(got, &content[900_000..904_096]);
        let server = restart.join().unwrap();
        // The acknowledged write survived; the handle was reopened.
        let mut expect = content.clone();
        expect[10..15].copy_from_slice(b"ACKED");
        assert_eq!(fs::read(export2.join("d/f")).unwrap()[..32], expect[..32]);
        let o2 = fs_.open(f.ino, 0).unwrap();
        assert_eq!(fs_.read(o2.fh, 0, 32).unwrap(), &expect[..32]);
        assert_eq!(fs_.write(o.fh, 20, b"again").unwrap(), 5);
        server.shutdown();
    });
}

#[test]
fn eio_mode_fails_fast_and_reconnects() {
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("f"), data(4 << 20, 6)).unwrap();
    let export = tmp.path().to_path_buf();
    let server = start(server_config(&export), "127.0.0.1:0");
    let addr = server.local_addr();
    bounded(30, None, move || {
        let fs_ = client(addr, FsOptions::default());
        let f = fs_.lookup(ROOT_INO, b"f").unwrap();
        let o = fs_.open(f.ino, 0).unwrap();
        assert_eq!(fs_.read(o.fh, 0, 10).unwrap(), &data(4 << 20, 6)[..10]);
        server.shutdown();
        let e = fs_.read(o.fh, 3_800_000, 10).unwrap_err();
        assert_eq!(e.errno(), libc::EIO);
        let server = start(server_config(&export), &addr.to_string());
        assert_eq!(
            fs_.read(o.fh, 3_800_000, 10).unwrap(),
            &data(4 << 20, 6)[3_800_000..3_800_010]
        );
        server.shutdown();
    });
}

#[test]
fn many_requests_in_flight_on_one_connection() {
    let tmp = tempfile::tempdir().unwrap();
    for i in 0..20 {
        fs::write(tmp.path().join(format!("f{i}")), data(10_000, i)).unwrap();
    }
    let server = start(server_config(tmp.path()), "127.0.0.1:0");
    bounded(30, None, move || {
        let c = Arc::new(raw(server.local_addr()));
        // Send all lookups before waiting for any answer.
        let pending: Vec<_> = (0..20)
            .map(|i| {
                c.send(&Request::Lookup {
                    parent: proto::ROOT_NODE,
                    name: format!("f{i}").into_bytes(),
                })
                .unwrap()
            })
            .collect();
        for p in pending {
            assert!(matches!(p.wait().unwrap(), Response::Attr(a) if a.size == 10_000));
        }
        // Stats count what was sent.
        match c.call(&Request::Stats).unwrap() {
            Response::Stats(v) => {
                let l = v.iter().find(|o| o.op == proto::op::LOOKUP).unwrap();
                assert_eq!(l.count, 20);
                assert!(l.bytes >= 20 * proto::ATTR_LEN as u64);
            }
            r => panic!("{r:?}"),
        }
        server.shutdown();
    });
}

#[test]
fn random_and_sequential_reads_return_the_right_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let content = data(3 * 1024 * 1024 + 12345, 11);
    fs::write(tmp.path().join("f"), &content).unwrap();
    let server = start(server_config(tmp.path()), "127.0.0.1:0");
    bounded(60, None, move || {
        let fs_ = client(server.local_addr(), FsOptions::default());
        let f = fs_.lookup(ROOT_INO, b"f").unwrap();
        let o = fs_.open(f.ino, 0).unwrap();
        let mut x: u64 = 77;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        // Random reads (mostly uncached, some crossing block boundaries,
        // some past the end), then the same after a sequential pass.
        for pass in 0..2 {
            for _ in 0..300 {
                let off = next() % (content.len() as u64 + 1000);
                let len = (next() % 300_000) as u32 + 1;
                let got = fs_.read(o.fh, off, len).unwrap();
                let s = (off as usize).min(content.len());
                let e = (off as usize + len as usize).min(content.len());
                assert_eq!(got, &content[s..e], "pass {pass} off {off} len {len}");
            }
            let mut off = 0;
            while off < content.len() {
                let got = fs_.read(o.fh, off as u64, 128 * 1024).unwrap();
                assert_eq!(got, &content[off..(off + 128 * 1024).min(content.len())]);
                off += got.len();
            }
        }
        // Everything is cached now: reads do not reach the server.
        let before = read_ops(&server);
        assert_eq!(
            fs_.read(o.fh, 1_000_000, 4096).unwrap(),
            &content[1_000_000..1_004_096]
        );
        assert_eq!(read_ops(&server), before);
        server.shutdown();
    });
}

#[test]
fn a_full_node_table_is_dropped_and_clients_recover() {
    let tmp = tempfile::tempdir().unwrap();
    fs::create_dir_all(tmp.path().join("a/b")).unwrap();
    for i in 0..40 {
        fs::write(tmp.path().join(format!("a/b/f{i}")), format!("file {i}")).unwrap();
    }
    let mut cfg = server_config(tmp.path());
    cfg.max_nodes = 8;
    let server = start(cfg, "127.0.0.1:0");
    bounded(30, None, move || {
        let opts = FsOptions {
            attr_timeout: Duration::ZERO,
            ..FsOptions::default()
        };
        let fs_ = client(server.local_addr(), opts);
        let a = fs_.lookup(ROOT_INO, b"a").unwrap();
        let b = fs_.lookup(a.ino, b"b").unwrap();
        // Listing 40 files overflows the 8-node table several times.
        let items = fs_.readdir(b.ino).unwrap();
        assert_eq!(items.len(), 40);
        for it in &items {
            // Each getattr and read goes by node ids long dropped.
            let a = fs_.getattr(it.ino).unwrap();
            let o = fs_.open(it.ino, 0).unwrap();
            let want = format!("file {}", std::str::from_utf8(&it.name[1..]).unwrap());
            assert_eq!(a.size, want.len() as u64);
            assert_eq!(fs_.read(o.fh, 0, 100).unwrap(), want.as_bytes());
            fs_.release(o.fh).unwrap();
        }
        server.shutdown();
    });
}

#[test]
fn forget_releases_an_inode_after_its_last_reference() {
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("f"), b"abc").unwrap();
    let server = start(server_config(tmp.path()), "127.0.0.1:0");
    bounded(30, None, move || {
        let fs_ = client(server.local_addr(), FsOptions::default());
        let base = fs_.inode_count();
        let e1 = fs_.lookup(ROOT_INO, b"f").unwrap();
        let e2 = fs_.lookup(ROOT_INO, b"f").unwrap();
        assert_eq!(e1.ino, e2.ino);
        assert_eq!(fs_.inode_count(), base + 1);
        fs_.forget(e1.ino, 1);
        assert_eq!(fs_.getattr(e1.ino).unwrap().size, 3, "one reference left");
        fs_.forget(e1.ino, 1);
        assert_eq!(fs_.inode_count(), base);
        assert_eq!(fs_.getattr(e1.ino).unwrap_err().errno(), libc::ESTALE);
        fs_.forget(ROOT_INO, 100);
        assert!(fs_.getattr(ROOT_INO).is_ok(), "the root is never forgotten");
        let e3 = fs_.lookup(ROOT_INO, b"f").unwrap();
        assert_eq!(fs_.getattr(e3.ino).unwrap().size, 3);
        server.shutdown();
    });
}

#[test]
fn malformed_frames_get_errors_and_never_take_the_server_down() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("f"), b"ok").unwrap();
    let server = start(server_config(tmp.path()), "127.0.0.1:0");
    bounded(30, None, move || {
        let addr = server.local_addr();
        let hello = proto::encode_hello(&proto::Hello {
            version: proto::VERSION,
            token: TOKEN.to_vec(),
        });
        let open = || {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            proto::write_frame(&mut s, &hello).unwrap();
            let w = proto::read_frame(&mut s).unwrap().unwrap();
            assert_eq!(
                proto::decode_welcome(&w).unwrap().status,
                HelloStatus::Accepted
            );
            s
        };
        // An unknown op and a truncated lookup: EINVAL answers to their ids.
        let mut s = open();
        let mut body = 42u64.to_le_bytes().to_vec();
        body.push(250);
        proto::write_frame(&mut s, &body).unwrap();
        let (id, r) = proto::decode_response(&proto::read_frame(&mut s).unwrap().unwrap()).unwrap();
        assert_eq!((id, r), (42, Response::Error(libc::EINVAL)));
        let mut body = 43u64.to_le_bytes().to_vec();
        body.extend_from_slice(&[proto::op::LOOKUP, 1, 0, 0]);
        proto::write_frame(&mut s, &body).unwrap();
        let (id, r) = proto::decode_response(&proto::read_frame(&mut s).unwrap().unwrap()).unwrap();
        assert_eq!((id, r), (43, Response::Error(libc::EINVAL)));
        // A frame too short for an id, then one claiming 4 GiB: dropped.
        proto::write_frame(&mut s, &[1, 2, 3]).unwrap();
        assert!(matches!(proto::read_frame(&mut s), Ok(None) | Err(_)));
        let mut s = open();
        s.write_all(&u32::MAX.to_le_bytes()).unwrap();
        assert!(matches!(proto::read_frame(&mut s), Ok(None) | Err(_)));
        // A wrong magic in the handshake is refused.
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        proto::write_frame(&mut s, b"NOPE\x01\x00\x00\x00\x00\x00").unwrap();
        assert!(matches!(proto::read_frame(&mut s), Ok(None) | Err(_)));
        // The server still serves well-behaved clients.
        let c = raw(addr);
        assert!(matches!(lookup(&c, proto::ROOT_NODE, b"f"), Response::Attr(a) if a.size == 2));
        server.shutdown();
    });
}

#[test]
fn a_hung_server_gives_eio_after_the_request_timeout() {
    // A "server" that completes the handshake and then never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let hung = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let _hello = proto::read_frame(&mut s).unwrap();
        let w = proto::encode_welcome(&proto::Welcome {
            version: proto::VERSION,
            status: HelloStatus::Accepted,
            read_only: false,
        });
        proto::write_frame(&mut s, &w).unwrap();
        // Read requests, answer none, until the client gives up.
        while let Ok(Some(_)) = proto::read_frame(&mut s) {}
    });
    bounded(30, None, move || {
        let cfg = ConnectConfig {
            request_timeout: Duration::from_millis(700),
            ..connect_config(addr)
        };
        let fs_ = gvfs::client::Fs::new(cfg, FsOptions::default()).unwrap();
        let t = Instant::now();
        let e = fs_.lookup(ROOT_INO, b"f").unwrap_err();
        assert_eq!(e.errno(), libc::EIO);
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(600) && took < Duration::from_secs(10),
            "{took:?}"
        );
        hung.join().unwrap();
    });
}

fn create(c: &Conn, name: &str, flags: i32, uid: u32) -> Response {
    c.call(&Request::Create {
        parent: proto::ROOT_NODE,
        name: name.as_bytes().to_vec(),
        mode: 0o644,
        flags: flags as u32,
        uid,
        gid: uid,
    })
    .unwrap()
}

fn mknod(path: &Path, mode: libc::mode_t, dev: libc::dev_t) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path.
    let r = unsafe { libc::mknod(c.as_ptr(), mode, dev) };
    assert_eq!(r, 0, "mknod: {}", std::io::Error::last_os_error());
}

#[test]
fn create_refuses_an_existing_device_node() {
    let tmp = tempfile::tempdir().unwrap();
    // A character device that reads as zeros (as /dev/zero).
    mknod(
        &tmp.path().join("dev"),
        libc::S_IFCHR | 0o666,
        libc::makedev(1, 5),
    );
    let server = start(server_config(tmp.path()), "127.0.0.1:0");
    bounded(30, None, move || {
        let c = raw(server.local_addr());
        for flags in [libc::O_RDONLY, libc::O_RDWR, libc::O_WRONLY | libc::O_TRUNC] {
            let r = create(&c, "dev", flags, 0);
            assert_eq!(errno(r), libc::EOPNOTSUPP, "CREATE on a device node");
        }
        // Nothing was changed: still the same device.
        let st = fs::symlink_metadata(tmp.path().join("dev")).unwrap();
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        assert!(st.file_type().is_char_device());
        assert_eq!(st.rdev(), libc::makedev(1, 5));
        server.shutdown();
    });
}

#[test]
fn create_on_a_fifo_does_not_block_workers() {
    let tmp = tempfile::tempdir().unwrap();
    mknod(&tmp.path().join("pipe"), libc::S_IFIFO | 0o666, 0);
    fs::write(tmp.path().join("f"), b"ok").unwrap();
    let server = start(
        gvfs::server::ServerConfig {
            workers: 2,
            ..server_config(tmp.path())
        },
        "127.0.0.1:0",
    );
    bounded(30, None, move || {
        let c = Conn::connect(&ConnectConfig {
            request_timeout: Duration::from_secs(5),
            ..connect_config(server.local_addr())
        })
        .unwrap();
        // Two CREATEs that would each block a worker in open(2) (one per
        // worker), then a request that needs a free worker.
        let mut pending = Vec::new();
        for flags in [libc::O_WRONLY, libc::O_WRONLY | libc::O_APPEND] {
            pending.push(
                c.send(&Request::Create {
                    parent: proto::ROOT_NODE,
                    name: b"pipe".to_vec(),
                    mode: 0o644,
                    flags: flags as u32,
                    uid: 0,
                    gid: 0,
                })
                .unwrap(),
            );
        }
        let r = c
            .call(&Request::Lookup {
                parent: proto::ROOT_NODE,
                name: b"f".to_vec(),
            })
            .expect("the server must go on serving");
        assert!(matches!(r, Response::Attr(a) if a.size == 2));
        for p in pending {
            assert_eq!(errno(p.wait().unwrap()), libc::EOPNOTSUPP);
        }
        server.shutdown();
    });
}

#[test]
fn create_keeps_the_owner_of_an_existing_file() {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().unwrap();
    let theirs = tmp.path().join("theirs");
    fs::write(&theirs, b"their data").unwrap();
    std::os::unix::fs::chown(&theirs, Some(1234), Some(1234)).unwrap();
    let server = start(server_config(tmp.path()), "127.0.0.1:0");
    bounded(30, None, move || {
        let c = raw(server.local_addr());
        // An existing file is opened, not taken over.
        assert!(matches!(
            create(&c, "theirs", libc::O_RDWR, 4321),
            Response::Opened { attr, .. } if attr.size == 10
        ));
        let st = fs::metadata(&theirs).unwrap();
        assert_eq!((st.uid(), st.gid()), (1234, 1234), "owner unchanged");
        // O_EXCL still refuses it; a new file gets the caller's ids.
        assert_eq!(
            errno(create(&c, "theirs", libc::O_RDWR | libc::O_EXCL, 4321)),
            libc::EEXIST
        );
        assert!(matches!(
            create(&c, "mine", libc::O_RDWR, 4321),
            Response::Opened { .. }
        ));
        let st = fs::metadata(tmp.path().join("mine")).unwrap();
        assert_eq!((st.uid(), st.gid()), (4321, 4321));
        // A directory by that name: EISDIR, as open(2) says.
        fs::create_dir(tmp.path().join("d")).unwrap();
        assert_eq!(errno(create(&c, "d", libc::O_RDWR, 0)), libc::EISDIR);
        server.shutdown();
    });
}

/// A character device major number no driver has registered (from the
/// ranges set aside for local use): opening such a node fails (ENXIO),
/// so a server that opens it cannot change it.
fn unused_char_major() -> u32 {
    let devices = fs::read_to_string("/proc/devices").unwrap();
    let chars = devices
        .split("Block devices:")
        .next()
        .unwrap_or_default()
        .to_string();
    let used: Vec<u32> = chars
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    (60..=63)
        .chain(120..=127)
        .chain(240..=254)
        .find(|m| !used.contains(m))
        .expect("a free character major")
}

#[test]
fn setattr_never_opens_device_nodes_or_fifos() {
    use gvfs::proto::{SetAttr, SetTime, Time};
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let tmp = tempfile::tempdir().unwrap();
    let rdev = libc::makedev(unused_char_major(), 0);
    mknod(&tmp.path().join("dev"), libc::S_IFCHR | 0o600, rdev);
    mknod(&tmp.path().join("pipe"), libc::S_IFIFO | 0o600, 0);
    // One worker: a SETATTR that blocked would stop the server.
    let server = start(
        gvfs::server::ServerConfig {
            workers: 1,
            ..server_config(tmp.path())
        },
        "127.0.0.1:0",
    );
    bounded(30, None, move || {
        let c = Conn::connect(&ConnectConfig {
            request_timeout: Duration::from_secs(5),
            ..connect_config(server.local_addr())
        })
        .unwrap();
        let setattr = |node, set| c.call(&Request::Setattr { node, set }).unwrap();
        for name in ["dev", "pipe"] {
            let n = node(lookup(&c, proto::ROOT_NODE, name.as_bytes()));
            let r = setattr(
                n,
                SetAttr {
                    mode: Some(0o640),
                    ..SetAttr::default()
                },
            );
            assert!(
                matches!(r, Response::Attr(a) if a.perm == 0o640),
                "chmod {name}: {r:?}"
            );
            let r = setattr(
                n,
                SetAttr {
                    uid: Some(123),
                    gid: Some(456),
                    ..SetAttr::default()
                },
            );
            assert!(
                matches!(r, Response::Attr(a) if (a.uid, a.gid) == (123, 456)),
                "chown {name}: {r:?}"
            );
            let r = setattr(
                n,
                SetAttr {
                    mtime: Some(SetTime::At(Time {
                        sec: 1_000_000,
                        nsec: 0,
                    })),
                    atime: Some(SetTime::Now),
                    ..SetAttr::default()
                },
            );
            assert!(
                matches!(r, Response::Attr(a) if a.mtime.sec == 1_000_000),
                "utimes {name}: {r:?}"
            );
            // Only a regular file has a size to set.
            let r = setattr(
                n,
                SetAttr {
                    size: Some(0),
                    ..SetAttr::default()
                },
            );
            assert_eq!(errno(r), libc::EINVAL, "truncate {name}");
            let st = fs::symlink_metadata(tmp.path().join(name)).unwrap();
            assert_eq!(st.mode() & 0o7777, 0o640);
            assert_eq!((st.uid(), st.gid(), st.mtime()), (123, 456, 1_000_000));
        }
        let st = fs::symlink_metadata(tmp.path().join("dev")).unwrap();
        assert!(st.file_type().is_char_device() && st.rdev() == rdev);
        assert!(
            fs::symlink_metadata(tmp.path().join("pipe"))
                .unwrap()
                .file_type()
                .is_fifo()
        );
        // The worker is free.
        assert!(matches!(
            c.call(&Request::Getattr {
                node: proto::ROOT_NODE
            }),
            Ok(Response::Attr(_))
        ));
        server.shutdown();
    });
}

#[test]
fn a_tls_client_reading_too_slowly_is_dropped() {
    use std::io::{Read, Write};
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("export");
    fs::create_dir_all(&export).unwrap();
    fs::write(export.join("f"), data(1 << 20, 3)).unwrap();
    let pki = make_pki(tmp.path());
    let mut cfg = server_config(&export);
    cfg.tls = Some(gvfs::transport::server_tls_config(&pki.cert, &pki.key).unwrap());
    let limits = gvfs::server::ServerLimits {
        write_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let server = gvfs::server::Server::bind(cfg, "127.0.0.1:0".parse().unwrap())
        .unwrap()
        .with_limits(limits)
        .spawn();
    let ca = pki.ca.clone();
    bounded(60, None, move || {
        let addr = server.local_addr();
        let tls = gvfs::transport::client_tls_config(&ca).unwrap();
        let f = node(lookup(
            &Conn::connect(&ConnectConfig {
                tls: Some(tls.clone()),
                ..connect_config(addr)
            })
            .unwrap(),
            proto::ROOT_NODE,
            b"f",
        ));
        assert!(eventually(Duration::from_secs(5), || server.connections() == 0));
        // Log in over TLS, ask for 200 MiB, then read the raw stream at
        // 512 KiB/s: always some progress, but a 1 MiB answer cannot go
        // out within its 1 s.
        let sock = std::net::TcpStream::connect(addr).unwrap();
        let split =
            gvfs::transport::Split::tls_client(sock, tls, "localhost", Duration::from_secs(5))
                .unwrap();
        let (mut reader, mut writer, socket) = (split.reader, split.writer, split.socket);
        proto::write_frame(&mut writer, &hello_frame()[4..]).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let w = proto::read_frame(&mut reader).unwrap().unwrap();
        assert_eq!(
            proto::decode_welcome(&w).unwrap().status,
            HelloStatus::Accepted
        );
        std::thread::spawn(move || {
            let mut reqs = proto::request_frame(1, &Request::Open { node: f, flags: 0 });
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
            let _ = writer.write_all(&reqs);
        });
        let mut raw = socket.try_clone().unwrap();
        raw.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let slow = std::thread::spawn(move || {
            let mut buf = vec![0u8; 128 << 10];
            while !stopped.load(std::sync::atomic::Ordering::SeqCst) {
                match raw.read(&mut buf) {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        });
        assert!(
            eventually(Duration::from_secs(15), || server.connections() == 0),
            "a TLS client reading 512 KiB/s was kept"
        );
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        gvfs::transport::shutdown(&socket);
        slow.join().unwrap();
        server.shutdown();
    });
}
