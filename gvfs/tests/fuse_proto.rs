//! The raw FUSE protocol handler (what the virtio-fs device calls), fed
//! requests laid out as a guest kernel writes them.

mod common;

use common::*;
use gvfs::client::FsOptions;
use gvfs::fuse_proto::{FuseHandler, IN_HEADER, OUT_HEADER};
use std::fs;
use std::time::Duration;

fn req(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(&((IN_HEADER + body.len()) as u32).to_le_bytes());
    r.extend_from_slice(&opcode.to_le_bytes());
    r.extend_from_slice(&unique.to_le_bytes());
    r.extend_from_slice(&nodeid.to_le_bytes());
    r.extend_from_slice(&0u32.to_le_bytes()); // uid
    r.extend_from_slice(&0u32.to_le_bytes()); // gid
    r.extend_from_slice(&1u32.to_le_bytes()); // pid
    r.extend_from_slice(&[0; 4]);
    r.extend_from_slice(body);
    r
}

/// (error, payload) of a reply, checking its header.
fn reply(r: Option<Vec<u8>>, unique: u64) -> (i32, Vec<u8>) {
    let r = r.expect("a reply");
    assert!(r.len() >= OUT_HEADER);
    assert_eq!(
        u32::from_le_bytes(r[0..4].try_into().unwrap()) as usize,
        r.len()
    );
    assert_eq!(u64::from_le_bytes(r[8..16].try_into().unwrap()), unique);
    let e = i32::from_le_bytes(r[4..8].try_into().unwrap());
    (-e, r[OUT_HEADER..].to_vec())
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

#[test]
fn guest_style_requests_are_served() {
    let tmp = tempfile::tempdir().unwrap();
    fs::create_dir_all(tmp.path().join("d")).unwrap();
    let content = data(300_000, 8);
    fs::write(tmp.path().join("d/file"), &content).unwrap();
    let export = tmp.path().to_path_buf();
    let server = start(server_config(tmp.path()), "127.0.0.1:0");
    bounded(30, None, move || {
        let h = FuseHandler::new(client(server.local_addr(), FsOptions::default()));
        // INIT: version 7.31 answered, 64-byte body.
        let mut init = Vec::new();
        for v in [7u32, 38, 1 << 20, 0xffff_ffff] {
            init.extend_from_slice(&v.to_le_bytes());
        }
        init.extend_from_slice(&[0; 48]);
        let (e, out) = reply(h.handle(&req(26, 1, 0, &init)).unwrap(), 1);
        assert_eq!(e, 0);
        assert_eq!(out.len(), 64);
        assert_eq!((u32_at(&out, 0), u32_at(&out, 4)), (7, 31));
        // LOOKUP d, then d/file.
        let (e, out) = reply(h.handle(&req(1, 2, 1, &cstr("d"))).unwrap(), 2);
        assert_eq!(e, 0);
        assert_eq!(out.len(), 128);
        let d = u64_at(&out, 0);
        assert_eq!(u32_at(&out, 40 + 60) & libc::S_IFMT, libc::S_IFDIR);
        let (e, out) = reply(h.handle(&req(1, 3, d, &cstr("file"))).unwrap(), 3);
        assert_eq!(e, 0);
        let file = u64_at(&out, 0);
        assert_eq!(u64_at(&out, 40 + 8), 300_000, "size in fuse_attr");
        // A missing name: ENOENT.
        let (e, _) = reply(h.handle(&req(1, 4, d, &cstr("nope"))).unwrap(), 4);
        assert_eq!(e, libc::ENOENT);
        // OPEN and READ the whole file in 128 KiB pieces.
        let (e, out) = reply(h.handle(&req(14, 5, file, &[0; 8])).unwrap(), 5);
        assert_eq!(e, 0);
        let fh = u64_at(&out, 0);
        let mut got = Vec::new();
        loop {
            let mut rd = Vec::new();
            rd.extend_from_slice(&fh.to_le_bytes());
            rd.extend_from_slice(&(got.len() as u64).to_le_bytes());
            rd.extend_from_slice(&(128u32 * 1024).to_le_bytes());
            rd.extend_from_slice(&[0; 20]);
            let (e, out) = reply(h.handle(&req(15, 6, file, &rd)).unwrap(), 6);
            assert_eq!(e, 0);
            if out.is_empty() {
                break;
            }
            got.extend(out);
        }
        assert_eq!(got, content);
        // (An open file keeps its inode: close it before the FORGETs below.)
        release(&h, 18, file, fh);
        // CREATE + WRITE: the server has the bytes.
        let mut cr = Vec::new();
        for v in [libc::O_WRONLY as u32, 0o100644, 0o022, 0] {
            cr.extend_from_slice(&v.to_le_bytes());
        }
        cr.extend(cstr("new"));
        let (e, out) = reply(h.handle(&req(35, 7, d, &cr)).unwrap(), 7);
        assert_eq!(e, 0);
        assert_eq!(out.len(), 128 + 16);
        let wfh = u64_at(&out, 128);
        let mut wr = Vec::new();
        wr.extend_from_slice(&wfh.to_le_bytes());
        wr.extend_from_slice(&0u64.to_le_bytes());
        wr.extend_from_slice(&5u32.to_le_bytes());
        wr.extend_from_slice(&[0; 20]);
        wr.extend_from_slice(b"guest");
        let (e, out) = reply(h.handle(&req(16, 8, 0, &wr)).unwrap(), 8);
        assert_eq!((e, u32_at(&out, 0)), (0, 5));
        assert_eq!(fs::read(export.join("d/new")).unwrap(), b"guest");
        // OPENDIR + READDIRPLUS: both entries with attributes.
        let (e, out) = reply(h.handle(&req(27, 9, d, &[0; 8])).unwrap(), 9);
        assert_eq!(e, 0);
        let dfh = u64_at(&out, 0);
        let mut rd = Vec::new();
        rd.extend_from_slice(&dfh.to_le_bytes());
        rd.extend_from_slice(&0u64.to_le_bytes());
        rd.extend_from_slice(&4096u32.to_le_bytes());
        rd.extend_from_slice(&[0; 20]);
        let (e, out) = reply(h.handle(&req(44, 10, d, &rd)).unwrap(), 10);
        assert_eq!(e, 0);
        let mut names = Vec::new();
        let mut pos = 0;
        while pos < out.len() {
            let namelen = u32_at(&out, pos + 128 + 16) as usize;
            names.push(
                String::from_utf8(out[pos + 128 + 24..pos + 128 + 24 + namelen].to_vec()).unwrap(),
            );
            pos += 128 + (24 + namelen).div_ceil(8) * 8;
        }
        names.sort();
        assert_eq!(names, ["file", "new"]);
        // FORGET takes no reply; once LOOKUP's and READDIRPLUS's references
        // are both forgotten, the node id is gone.
        assert!(
            h.handle(&req(2, 11, file, &1u64.to_le_bytes()))
                .unwrap()
                .is_none()
        );
        let (e, _) = reply(h.handle(&req(3, 12, file, &[0; 16])).unwrap(), 12);
        assert_eq!(e, 0, "one reference left");
        let mut batch = Vec::new();
        batch.extend_from_slice(&1u32.to_le_bytes());
        batch.extend_from_slice(&0u32.to_le_bytes());
        batch.extend_from_slice(&file.to_le_bytes());
        batch.extend_from_slice(&1u64.to_le_bytes());
        assert!(h.handle(&req(42, 13, 0, &batch)).unwrap().is_none());
        let (e, _) = reply(h.handle(&req(3, 14, file, &[0; 16])).unwrap(), 14);
        assert_eq!(e, libc::ESTALE);
        let (e, out) = reply(h.handle(&req(1, 15, d, &cstr("file"))).unwrap(), 15);
        assert_eq!(e, 0);
        assert_ne!(u64_at(&out, 0), file, "a new inode number after forget");
        server.shutdown();
    });
}

#[test]
fn malformed_requests_get_errors_not_panics() {
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("f"), b"x").unwrap();
    let server = start(server_config(tmp.path()), "127.0.0.1:0");
    bounded(60, None, move || {
        let h = FuseHandler::new(client(server.local_addr(), FsOptions::default()));
        // No complete header: an error, nothing to reply to.
        assert!(h.handle(&[0; 10]).is_err());
        // A name without its NUL.
        let (e, _) = reply(h.handle(&req(1, 1, 1, b"f")).unwrap(), 1);
        assert_eq!(e, libc::EINVAL);
        // A header length larger than the buffer.
        let mut r = req(3, 2, 1, &[0; 16]);
        r[0..4].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(reply(h.handle(&r).unwrap(), 2).0, libc::EINVAL);
        // A write whose size runs past the request.
        let mut wr = vec![0u8; 40];
        wr[16..20].copy_from_slice(&1_000_000u32.to_le_bytes());
        assert_eq!(
            reply(h.handle(&req(16, 3, 1, &wr)).unwrap(), 3).0,
            libc::EINVAL
        );
        // A read larger than announced.
        let mut rd = vec![0u8; 40];
        rd[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            reply(h.handle(&req(15, 4, 1, &rd)).unwrap(), 4).0,
            libc::EINVAL
        );
        // An unknown opcode.
        assert_eq!(
            reply(h.handle(&req(999, 5, 1, &[])).unwrap(), 5).0,
            libc::ENOSYS
        );
        // Truncated bodies of every opcode we know, and garbage.
        let mut x: u64 = 12345;
        for op in 0..60u32 {
            for len in [0usize, 3, 8, 17, 40, 90] {
                let body: Vec<u8> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect();
                // Node 1 (the root) so that lookups reach the server.
                let _ = h.handle(&req(op, 6, 1, &body));
            }
        }
        server.shutdown();
    });
}

fn init(h: &FuseHandler, unique: u64) {
    let mut init = Vec::new();
    for v in [7u32, 31, 1 << 20, 0] {
        init.extend_from_slice(&v.to_le_bytes());
    }
    init.extend_from_slice(&[0; 48]);
    let (e, _) = reply(h.handle(&req(26, unique, 0, &init)).unwrap(), unique);
    assert_eq!(e, 0);
}

/// (errno, handle) of an OPEN (opcode 14) or OPENDIR (27) of `node`.
fn open(h: &FuseHandler, opcode: u32, node: u64) -> (i32, u64) {
    let (e, out) = reply(h.handle(&req(opcode, 100, node, &[0; 8])).unwrap(), 100);
    (e, if e == 0 { u64_at(&out, 0) } else { 0 })
}

fn release(h: &FuseHandler, opcode: u32, node: u64, fh: u64) {
    let mut b = fh.to_le_bytes().to_vec();
    b.extend_from_slice(&[0; 16]);
    let (e, _) = reply(h.handle(&req(opcode, 101, node, &b)).unwrap(), 101);
    assert_eq!(e, 0);
}

#[test]
fn open_files_are_capped_per_session_and_released_by_a_new_session() {
    const CAP: usize = 16;
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("f"), b"x").unwrap();
    let server = start(server_config(tmp.path()), "127.0.0.1:0");
    bounded(30, None, move || {
        let opts = FsOptions {
            max_open_files: CAP,
            ..FsOptions::default()
        };
        let h = FuseHandler::new(client(server.local_addr(), opts));
        init(&h, 1);
        let (e, out) = reply(h.handle(&req(1, 2, 1, &cstr("f"))).unwrap(), 2);
        assert_eq!(e, 0);
        let f = u64_at(&out, 0);
        // OPEN without RELEASE, past the cap: EMFILE, and the server
        // holds no more than the cap.
        let mut fhs = Vec::new();
        for _ in 0..CAP {
            let (e, fh) = open(&h, 14, f);
            assert_eq!(e, 0);
            fhs.push(fh);
        }
        for _ in 0..3 {
            assert_eq!(open(&h, 14, f).0, libc::EMFILE);
        }
        assert_eq!(server.open_handles(), CAP);
        // A RELEASE makes room for one more.
        release(&h, 18, f, fhs[0]);
        assert_eq!(open(&h, 14, f).0, 0);
        assert_eq!(open(&h, 14, f).0, libc::EMFILE);
        // A new session (the guest rebooted and sent INIT again) releases
        // what the old one left open.
        init(&h, 3);
        assert!(
            eventually(Duration::from_secs(5), || server.open_handles() == 0),
            "{} handles left on the server",
            server.open_handles()
        );
        assert_eq!(open(&h, 14, f).0, 0);
        server.shutdown();
    });
}

#[test]
fn open_directories_are_capped_per_session() {
    const CAP: usize = 8;
    let tmp = tempfile::tempdir().unwrap();
    fs::create_dir(tmp.path().join("d")).unwrap();
    for i in 0..20 {
        fs::write(tmp.path().join(format!("d/f{i}")), b"x").unwrap();
    }
    let server = start(server_config(tmp.path()), "127.0.0.1:0");
    bounded(30, None, move || {
        // Up to CAP open directories, and listings of up to 50 entries
        // held in all.
        let opts = FsOptions {
            max_open_dirs: CAP,
            max_dir_entries: 50,
            ..FsOptions::default()
        };
        let h = FuseHandler::new(client(server.local_addr(), opts));
        init(&h, 1);
        let (e, out) = reply(h.handle(&req(1, 2, 1, &cstr("d"))).unwrap(), 2);
        assert_eq!(e, 0);
        let d = u64_at(&out, 0);
        // The root has one entry: CAP of them fit.
        let mut fhs = Vec::new();
        for _ in 0..CAP {
            let (e, fh) = open(&h, 27, 1);
            assert_eq!(e, 0);
            fhs.push(fh);
        }
        assert_eq!(open(&h, 27, 1).0, libc::EMFILE);
        for fh in fhs.drain(..) {
            release(&h, 29, 1, fh);
        }
        // d has 20 entries: two listings of it fit in 50, a third not.
        fhs.push(open(&h, 27, d).1);
        fhs.push(open(&h, 27, d).1);
        assert_eq!(open(&h, 27, d).0, libc::ENOMEM);
        release(&h, 29, d, fhs[0]);
        assert_eq!(open(&h, 27, d).0, 0);
        server.shutdown();
    });
}

#[test]
fn opendir_past_the_cap_lists_nothing() {
    const CAP: usize = 4;
    let tmp = tempfile::tempdir().unwrap();
    for i in 0..10 {
        fs::write(tmp.path().join(format!("f{i}")), b"x").unwrap();
    }
    let server = start(server_config(tmp.path()), "127.0.0.1:0");
    bounded(30, None, move || {
        // No listing cache: every OPENDIR that lists asks the server.
        let opts = FsOptions {
            max_open_dirs: CAP,
            attr_timeout: Duration::ZERO,
            ..FsOptions::default()
        };
        let h = FuseHandler::new(client(server.local_addr(), opts));
        init(&h, 1);
        for _ in 0..CAP {
            assert_eq!(open(&h, 27, 1).0, 0);
        }
        let listed = server.op_stats(gvfs::proto::op::READDIR).count;
        for _ in 0..5 {
            assert_eq!(open(&h, 27, 1).0, libc::EMFILE);
        }
        assert_eq!(
            server.op_stats(gvfs::proto::op::READDIR).count,
            listed,
            "an OPENDIR past the cap fetched the listing"
        );
        server.shutdown();
    });
}

#[test]
fn entries_given_out_stay_valid_after_their_idle_inodes_are_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    for i in 0..50 {
        fs::write(tmp.path().join(format!("f{i:02}")), format!("{i}")).unwrap();
    }
    let server = start(server_config(tmp.path()), "127.0.0.1:0");
    bounded(30, None, move || {
        // The listing interns 50 inodes nothing holds; only 10 are kept.
        let opts = FsOptions {
            max_idle_inodes: 10,
            ..FsOptions::default()
        };
        let fs_ = client(server.local_addr(), opts);
        let h = FuseHandler::new(fs_.clone());
        init(&h, 1);
        let (e, dfh) = open(&h, 27, 1);
        assert_eq!(e, 0);
        assert!(fs_.inode_count() <= 11);
        // READDIRPLUS hands every entry out; each is a live inode.
        let mut rd = Vec::new();
        rd.extend_from_slice(&dfh.to_le_bytes());
        rd.extend_from_slice(&0u64.to_le_bytes());
        rd.extend_from_slice(&(64u32 << 10).to_le_bytes());
        rd.extend_from_slice(&[0; 20]);
        let (e, out) = reply(h.handle(&req(44, 2, 1, &rd)).unwrap(), 2);
        assert_eq!(e, 0);
        let mut pos = 0;
        let mut given = Vec::new();
        while pos < out.len() {
            let ino = u64_at(&out, pos);
            assert_eq!(u64_at(&out, pos + 128), ino, "entry and dirent agree");
            let namelen = u32_at(&out, pos + 128 + 16) as usize;
            let name = out[pos + 128 + 24..pos + 128 + 24 + namelen].to_vec();
            given.push((ino, name));
            pos += 128 + (24 + namelen).div_ceil(8) * 8;
        }
        assert_eq!(given.len(), 50);
        for (i, (ino, name)) in given.iter().enumerate() {
            let (e, out) = reply(
                h.handle(&req(3, 10 + i as u64, *ino, &[0; 16])).unwrap(),
                10 + i as u64,
            );
            assert_eq!(e, 0, "GETATTR of {}", String::from_utf8_lossy(name));
            let want = format!(
                "{}",
                String::from_utf8_lossy(&name[1..]).parse::<u32>().unwrap()
            );
            assert_eq!(
                u64_at(&out, 16 + 8),
                want.len() as u64,
                "size of {}",
                String::from_utf8_lossy(name)
            );
        }
        // Held by the guest: all kept, whatever the bound on idle ones.
        assert!(fs_.inode_count() >= 51);
        server.shutdown();
    });
}
