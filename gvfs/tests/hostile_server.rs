//! What a hostile or broken server can send the client: it must get an
//! error, never a hang, a wrapped offset or a panic.

mod common;

use common::*;
use gvfs::client::{FsOptions, ROOT_INO};
use gvfs::proto::{Attr, DirEntry, Kind, Request, Response, SetAttr, Time};

fn attr(node: u64, kind: Kind, size: u64) -> Attr {
    Attr {
        node,
        dev: 1,
        ino: node,
        kind,
        perm: 0o644,
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        size,
        blocks: 0,
        blksize: 4096,
        atime: Time::default(),
        mtime: Time::default(),
        ctime: Time::default(),
    }
}

#[test]
fn endless_readdir_cookies_give_eio() {
    // Every batch empty, and always "more to come".
    let addr = fake_server(|req| match req {
        Request::Readdir { cookie, .. } => Response::Dir {
            entries: Vec::new(),
            next: Some(cookie + 1),
        },
        _ => Response::Error(libc::ENOSYS),
    });
    bounded(30, None, move || {
        let fs = client(addr, FsOptions::default());
        let e = fs
            .readdir(ROOT_INO)
            .expect_err("an endless listing must fail");
        assert_eq!(e.errno(), libc::EIO);
    });
}

#[test]
fn a_listing_past_the_entry_bound_gives_eio() {
    // The same ten entries again and again, cookie after cookie (slowly,
    // so that a client without a bound does not eat the test machine).
    let addr = fake_server(|req| match req {
        Request::Readdir { cookie, .. } => {
            std::thread::sleep(std::time::Duration::from_millis(1));
            Response::Dir {
                entries: (0..10u64)
                    .map(|i| DirEntry {
                        name: format!("e{i}").into_bytes(),
                        attr: attr(10 + i, Kind::File, 1),
                    })
                    .collect(),
                next: Some(cookie + 1),
            }
        }
        _ => Response::Error(libc::ENOSYS),
    });
    bounded(30, None, move || {
        let fs = client(
            addr,
            FsOptions {
                max_dir_entries: 1000,
                ..FsOptions::default()
            },
        );
        let e = fs
            .readdir(ROOT_INO)
            .expect_err("an endless listing must fail");
        assert_eq!(e.errno(), libc::EIO);
    });
}

#[test]
fn a_file_size_near_u64_max_does_not_wrap_or_hang() {
    const SIZE: u64 = u64::MAX - 1;
    let addr = fake_server(|req| match req {
        Request::Lookup { .. } | Request::Getattr { .. } => {
            Response::Attr(attr(2, Kind::File, SIZE))
        }
        Request::Setattr { set, .. } => {
            Response::Attr(attr(2, Kind::File, set.size.unwrap_or(SIZE)))
        }
        Request::Open { .. } => Response::Opened {
            handle: 1,
            attr: attr(2, Kind::File, SIZE),
        },
        Request::Read { len, .. } => Response::Data(vec![7; len as usize]),
        Request::Write { data, .. } => Response::Written {
            len: data.len() as u32,
            attr: attr(2, Kind::File, SIZE),
        },
        Request::Release { .. } => Response::Ok,
        _ => Response::Error(libc::ENOSYS),
    });
    bounded(30, None, move || {
        let fs = client(addr, FsOptions::default());
        let e = fs.lookup(ROOT_INO, b"big").unwrap();
        assert_eq!(e.attr.size, SIZE);
        let o = fs.open(e.ino, libc::O_RDWR as u32).unwrap();
        // A read that ends past u64::MAX: cut at the size.
        let d = fs.read(o.fh, SIZE - 100, 4096).unwrap();
        assert_eq!(d.len(), 100);
        assert!(d.iter().all(|&b| b == 7));
        // A read at the very end, and a sequential one from the start.
        assert!(fs.read(o.fh, SIZE, 4096).unwrap().is_empty());
        assert_eq!(fs.read(o.fh, 0, 4096).unwrap().len(), 4096);
        // A write whose end would pass u64::MAX is refused, not wrapped.
        let e2 = fs.write(o.fh, u64::MAX - 4, b"0123456789").unwrap_err();
        assert_eq!(e2.errno(), libc::EFBIG);
        // Truncating such a file drops its cached blocks without walking
        // every block index up to the old size.
        let a = fs
            .setattr(
                e.ino,
                SetAttr {
                    size: Some(0),
                    ..SetAttr::default()
                },
            )
            .unwrap();
        assert_eq!(a.size, 0);
        fs.release(o.fh).unwrap();
    });
}
