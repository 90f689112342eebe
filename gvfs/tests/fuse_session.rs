//! A guest's FUSE session saved (as a VM snapshot saves it) and put back
//! into a new client on a new connection: the node ids and handles the
//! guest holds go on meaning the same files; a file deleted meanwhile is
//! an errno to the request that uses it; damaged states are refused.

mod common;

use common::*;
use gvfs::client::{FileState, FsOptions, InodeState, StateError};
use gvfs::fuse_proto::{
    DirState, FuseHandler, FuseProtoError, IN_HEADER, InitState, OUT_HEADER, SESSION_FORMAT,
    SessionState,
};
use std::fs;
use std::time::Duration;

const LOOKUP: u32 = 1;
const GETATTR: u32 = 3;
const OPEN: u32 = 14;
const READ: u32 = 15;
const WRITE: u32 = 16;
const RELEASE: u32 = 18;
const INIT: u32 = 26;
const OPENDIR: u32 = 27;
const READDIR: u32 = 28;
const RELEASEDIR: u32 = 29;
const CREATE: u32 = 35;

/// Sends one request; returns (errno, reply body).
fn call(h: &FuseHandler, opcode: u32, nodeid: u64, body: &[u8]) -> (i32, Vec<u8>) {
    let mut r = Vec::new();
    r.extend_from_slice(&((IN_HEADER + body.len()) as u32).to_le_bytes());
    r.extend_from_slice(&opcode.to_le_bytes());
    r.extend_from_slice(&7u64.to_le_bytes()); // unique
    r.extend_from_slice(&nodeid.to_le_bytes());
    r.extend_from_slice(&[0; 16]); // uid, gid, pid, padding
    r.extend_from_slice(body);
    let out = h.handle(&r).unwrap().expect("a reply");
    assert!(out.len() >= OUT_HEADER);
    let e = i32::from_le_bytes(out[4..8].try_into().unwrap());
    (-e, out[OUT_HEADER..].to_vec())
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}

fn init(h: &FuseHandler) {
    let mut body = Vec::new();
    for v in [7u32, 31, 1 << 20, 1 << 5] {
        body.extend_from_slice(&v.to_le_bytes());
    }
    body.extend_from_slice(&[0; 48]);
    assert_eq!(call(h, INIT, 0, &body).0, 0);
}

/// LOOKUP: (errno, node id).
fn lookup(h: &FuseHandler, parent: u64, name: &str) -> (i32, u64) {
    let mut body = name.as_bytes().to_vec();
    body.push(0);
    let (e, out) = call(h, LOOKUP, parent, &body);
    (e, if e == 0 { u64_at(&out, 0) } else { 0 })
}

/// OPEN (or OPENDIR) with `flags`: (errno, handle).
fn open(h: &FuseHandler, opcode: u32, node: u64, flags: u32) -> (i32, u64) {
    let mut body = flags.to_le_bytes().to_vec();
    body.extend_from_slice(&[0; 4]);
    let (e, out) = call(h, opcode, node, &body);
    (e, if e == 0 { u64_at(&out, 0) } else { 0 })
}

/// READ or READDIR of `size` bytes at `offset`.
fn read(
    h: &FuseHandler,
    opcode: u32,
    node: u64,
    fh: u64,
    offset: u64,
    size: u32,
) -> (i32, Vec<u8>) {
    let mut body = Vec::new();
    body.extend_from_slice(&fh.to_le_bytes());
    body.extend_from_slice(&offset.to_le_bytes());
    body.extend_from_slice(&size.to_le_bytes());
    body.extend_from_slice(&[0; 20]);
    call(h, opcode, node, &body)
}

fn write(h: &FuseHandler, node: u64, fh: u64, offset: u64, data: &[u8]) -> i32 {
    let mut body = Vec::new();
    body.extend_from_slice(&fh.to_le_bytes());
    body.extend_from_slice(&offset.to_le_bytes());
    body.extend_from_slice(&(data.len() as u32).to_le_bytes());
    body.extend_from_slice(&[0; 20]);
    body.extend_from_slice(data);
    call(h, WRITE, node, &body).0
}

fn release(h: &FuseHandler, opcode: u32, node: u64, fh: u64) -> i32 {
    let mut body = fh.to_le_bytes().to_vec();
    body.extend_from_slice(&[0; 16]);
    call(h, opcode, node, &body).0
}

/// The names of a READDIR answer.
fn names(out: &[u8]) -> Vec<String> {
    let mut names = Vec::new();
    let mut at = 0;
    while at + 24 <= out.len() {
        let len = u32_at(out, at + 16) as usize;
        names.push(String::from_utf8(out[at + 24..at + 24 + len].to_vec()).unwrap());
        at += (24 + len).div_ceil(8) * 8;
    }
    names.sort();
    names
}

/// A handler whose client never connects (the state checks need none).
fn offline(opts: FsOptions) -> FuseHandler {
    FuseHandler::new(client("127.0.0.1:9".parse().unwrap(), opts))
}

#[test]
fn a_saved_session_goes_on_in_a_new_client() {
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().to_path_buf();
    fs::create_dir(export.join("d")).unwrap();
    let content = data(300_000, 5);
    fs::write(export.join("d/file"), &content).unwrap();
    fs::write(export.join("d/gone"), b"deleted while the VM was saved").unwrap();
    fs::write(export.join("d/other"), b"o").unwrap();
    let server = start(server_config(&export), "127.0.0.1:0");
    bounded(60, None, move || {
        // The guest mounts, looks files up, and holds some open.
        let h1 = FuseHandler::new(client(server.local_addr(), FsOptions::default()));
        init(&h1);
        let (_, d) = lookup(&h1, 1, "d");
        let (_, file) = lookup(&h1, d, "file");
        let (_, gone) = lookup(&h1, d, "gone");
        let (e, fh) = open(&h1, OPEN, file, libc::O_RDWR as u32);
        assert_eq!(e, 0);
        let (e, out) = read(&h1, READ, file, fh, 0, 4096);
        assert_eq!((e, out.as_slice()), (0, &content[..4096]));
        let (e, gfh) = open(&h1, OPEN, gone, 0);
        assert_eq!(e, 0);
        let (e, dfh) = open(&h1, OPENDIR, d, 0);
        assert_eq!(e, 0);
        assert_eq!(server.open_handles(), 2);

        // Saved as a snapshot saves it, and the old process ends.
        let saved = bitcode::serialize(&h1.save_session()).unwrap();
        let state: SessionState = bitcode::deserialize(&saved).unwrap();
        assert_eq!(state.init.map(|i| (i.minor, i.flags)), Some((31, 1 << 5)));
        assert_eq!(state.fs.files.len(), 2);
        assert_eq!(state.dirs, [DirState { fh: dfh, ino: d }]);
        drop(h1);
        assert!(
            eventually(Duration::from_secs(5), || server.open_handles() == 0),
            "the old connection's files stay open"
        );
        fs::remove_file(export.join("d/gone")).unwrap();

        // A new client, a new connection: no INIT, the guest goes on.
        let h2 = FuseHandler::new(client(server.local_addr(), FsOptions::default()));
        h2.restore_session(state).unwrap();
        assert_eq!(server.open_handles(), 0, "files are opened again on use");
        let mut rest = Vec::new();
        loop {
            let at = 4096 + rest.len() as u64;
            let (e, out) = read(&h2, READ, file, fh, at, 128 << 10);
            assert_eq!(e, 0);
            if out.is_empty() {
                break;
            }
            rest.extend(out);
        }
        assert!(rest == content[4096..], "the same file through the same fh");
        assert_eq!(server.open_handles(), 1);
        let (e, attr) = call(&h2, GETATTR, file, &[0; 16]);
        assert_eq!((e, u64_at(&attr, 16 + 8)), (0, 300_000));
        assert_eq!(lookup(&h2, d, "file"), (0, file), "the same node id");
        assert_eq!(write(&h2, file, fh, 0, b"after"), 0);
        assert_eq!(&fs::read(export.join("d/file")).unwrap()[..5], b"after");

        // The file deleted meanwhile: errors, no panic.
        let (e, _) = read(&h2, READ, gone, gfh, 0, 4096);
        assert!(e == libc::ENOENT || e == libc::ESTALE, "READ: errno {e}");
        let (e, _) = call(&h2, GETATTR, gone, &[0; 16]);
        assert!(e == libc::ENOENT || e == libc::ESTALE, "GETATTR: errno {e}");
        assert_eq!(release(&h2, RELEASE, gone, gfh), 0);

        // The open directory is listed again.
        let (e, out) = read(&h2, READDIR, d, dfh, 0, 4096);
        assert_eq!((e, names(&out)), (0, vec!["file".into(), "other".into()]));
        assert_eq!(release(&h2, RELEASEDIR, d, dfh), 0);

        // New node ids and handles do not collide with the restored ones.
        let (_, other) = lookup(&h2, d, "other");
        assert!(![1, d, file, gone].contains(&other));
        let mut create = Vec::new();
        for v in [libc::O_WRONLY as u32, 0o644, 0, 0] {
            create.extend_from_slice(&v.to_le_bytes());
        }
        create.extend_from_slice(b"new\0");
        let (e, out) = call(&h2, CREATE, d, &create);
        assert_eq!(e, 0);
        let (new, nfh) = (u64_at(&out, 0), u64_at(&out, 128));
        assert!(![1, d, file, gone, other].contains(&new));
        assert!(![fh, gfh].contains(&nfh));
        assert_eq!(release(&h2, RELEASE, new, nfh), 0);
        assert_eq!(release(&h2, RELEASE, file, fh), 0);
        assert!(
            eventually(Duration::from_secs(5), || server.open_handles() == 0),
            "{} handles left",
            server.open_handles()
        );
        // The guest reboots: a new INIT starts a new session.
        init(&h2);
        server.shutdown();
    });
}

/// A state that holds a file the guest unlinked while holding it open
/// brings it back detached: ESTALE, even though another file has its
/// name now.
#[test]
fn a_file_unlinked_while_open_comes_back_stale() {
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().to_path_buf();
    fs::write(export.join("f"), b"old").unwrap();
    let server = start(server_config(&export), "127.0.0.1:0");
    bounded(60, None, move || {
        let h1 = FuseHandler::new(client(server.local_addr(), FsOptions::default()));
        init(&h1);
        let (_, f) = lookup(&h1, 1, "f");
        let (_, fh) = open(&h1, OPEN, f, 0);
        assert_eq!(call(&h1, 10, 1, b"f\0").0, 0, "UNLINK");
        let state = h1.save_session();
        assert!(state.fs.inodes.iter().any(|i| i.ino == f && i.detached));
        drop(h1);
        fs::write(export.join("f"), b"new").unwrap();
        let h2 = FuseHandler::new(client(server.local_addr(), FsOptions::default()));
        h2.restore_session(state).unwrap();
        let (e, _) = read(&h2, READ, f, fh, 0, 10);
        assert_eq!(e, libc::ESTALE);
        let (e, new) = lookup(&h2, 1, "f");
        assert_eq!(e, 0);
        assert_ne!(new, f);
        server.shutdown();
    });
}

fn good_state() -> SessionState {
    let inode = |ino, parent, name: &str| InodeState {
        ino,
        parent,
        name: name.as_bytes().to_vec(),
        lookups: 1,
        detached: false,
    };
    SessionState {
        format: SESSION_FORMAT,
        init: Some(InitState {
            major: 7,
            minor: 31,
            max_readahead: 1 << 20,
            flags: 1 << 5,
            max_write: 1 << 20,
        }),
        fs: gvfs::client::FsState {
            inodes: vec![inode(1, 1, ""), inode(2, 1, "d"), inode(3, 2, "f")],
            files: vec![FileState {
                fh: 4,
                ino: 3,
                flags: 0,
            }],
            next_ino: 4,
            next_fh: 5,
        },
        dirs: vec![DirState { fh: 1, ino: 2 }],
        next_dir: 2,
    }
}

#[test]
fn damaged_states_are_refused_and_change_nothing() {
    let refused = |opts: FsOptions, state: SessionState| {
        let h = offline(opts);
        let err = h.restore_session(state).unwrap_err();
        // Nothing was restored: a good state still goes in.
        h.restore_session(good_state()).unwrap();
        err
    };
    let opts = FsOptions::default;
    let bad = |f: fn(&mut SessionState)| {
        let mut s = good_state();
        f(&mut s);
        s
    };
    assert!(matches!(
        refused(opts(), bad(|s| s.format = 2)),
        FuseProtoError::SessionFormat(2)
    ));
    assert!(matches!(
        refused(opts(), bad(|s| s.init.as_mut().unwrap().flags = 1 << 30)),
        FuseProtoError::SessionInit { .. }
    ));
    assert!(matches!(
        refused(
            opts(),
            bad(|s| s.init.as_mut().unwrap().max_write = 1 << 24)
        ),
        FuseProtoError::SessionInit { .. }
    ));
    assert!(matches!(
        refused(opts(), bad(|s| s.dirs.push(DirState { fh: 1, ino: 2 }))),
        FuseProtoError::SessionDirHandle(1)
    ));
    let few = || FsOptions {
        max_open_dirs: 1,
        max_open_files: 1,
        ..FsOptions::default()
    };
    assert!(matches!(
        refused(few(), bad(|s| s.dirs.push(DirState { fh: 9, ino: 2 }))),
        FuseProtoError::SessionDirs { found: 2, max: 1 }
    ));
    let mut two_files = good_state();
    two_files.fs.files.push(FileState {
        fh: 8,
        ino: 3,
        flags: 0,
    });
    assert!(matches!(
        refused(few(), two_files),
        FuseProtoError::SessionState(StateError::TooMany { found: 2, .. })
    ));
    assert!(matches!(
        refused(opts(), bad(|s| s.fs.files[0].ino = 77)),
        FuseProtoError::SessionState(StateError::FileInode { fh: 4, ino: 77 })
    ));
    assert!(matches!(
        refused(opts(), bad(|s| s.fs.inodes[1].parent = 3)),
        FuseProtoError::SessionState(StateError::Loop(_))
    ));
    assert!(matches!(
        refused(opts(), bad(|s| s.fs.inodes[2].name = b"../x".to_vec())),
        FuseProtoError::SessionState(StateError::BadName { ino: 3, .. })
    ));
    assert!(matches!(
        refused(opts(), bad(|s| s.fs.inodes[2].parent = 40)),
        FuseProtoError::SessionState(StateError::NoParent { ino: 3, parent: 40 })
    ));

    // A handler that already serves a guest is not restored into.
    let h = offline(FsOptions::default());
    h.restore_session(good_state()).unwrap();
    assert!(matches!(
        h.restore_session(good_state()),
        Err(FuseProtoError::SessionInUse)
    ));

    // Bytes that are not a state do not decode (and do not panic).
    let bytes = bitcode::serialize(&good_state()).unwrap();
    for cut in [0, 1, bytes.len() / 2, bytes.len() - 1] {
        assert!(bitcode::deserialize::<SessionState>(&bytes[..cut]).is_err());
    }
    let _ = bitcode::deserialize::<SessionState>(&[0xff; 200]);
}

/// A restored state's counters go on past the saved numbers, whatever
/// `next_*` says.
#[test]
fn new_numbers_go_on_past_the_restored_ones() {
    let h = offline(FsOptions::default());
    let mut s = good_state();
    s.fs.next_ino = 0;
    s.fs.next_fh = 0;
    s.next_dir = 0;
    h.restore_session(s).unwrap();
    let again = h.save_session();
    assert_eq!(
        (again.fs.next_ino, again.fs.next_fh, again.next_dir),
        (4, 5, 2)
    );
    assert_eq!(again.fs.files, good_state().fs.files);
    assert_eq!(again.fs.inodes, good_state().fs.inodes);
    assert_eq!(again.dirs, good_state().dirs);
}
