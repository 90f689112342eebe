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

#[test]
fn names_a_server_invents_do_not_grow_the_inode_table() {
    use std::sync::atomic::{AtomicU64, Ordering};
    // Every listing of the root is 1,000 names never seen before.
    let next = AtomicU64::new(0);
    let addr = fake_server(move |req| match req {
        Request::Readdir { .. } => {
            let base = next.fetch_add(1000, Ordering::SeqCst);
            Response::Dir {
                entries: (base..base + 1000)
                    .map(|i| DirEntry {
                        name: format!("n{i}").into_bytes(),
                        attr: attr(10 + i, Kind::File, 1),
                    })
                    .collect(),
                next: None,
            }
        }
        _ => Response::Error(libc::ENOSYS),
    });
    bounded(120, None, move || {
        let fs = client(
            addr,
            FsOptions {
                attr_timeout: std::time::Duration::ZERO,
                ..FsOptions::default()
            },
        );
        for _ in 0..200 {
            assert_eq!(fs.readdir(ROOT_INO).unwrap().len(), 1000);
        }
        // 200,000 names listed; no one holds a reference to any.
        assert!(
            fs.inode_count() <= gvfs::client::DEFAULT_MAX_IDLE_INODES + 1,
            "{} inodes kept",
            fs.inode_count()
        );
    });
}

#[test]
fn cached_listings_are_bounded() {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    // 20 directories of 1,000 entries each, against a bound of 10,000
    // entries in all.
    const DIRS: u64 = 20;
    const CACHED: usize = 10_000;
    let listed: Arc<Mutex<HashMap<u64, u64>>> = Arc::default();
    let counts = listed.clone();
    let addr = fake_server(move |req| match req {
        Request::Lookup { name, .. } => {
            let Some(i) = std::str::from_utf8(&name[1..])
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .filter(|&i| name[0] == b'd' && i < DIRS)
            else {
                return Response::Error(libc::ENOENT);
            };
            Response::Attr(attr(1000 + i, Kind::Dir, 0))
        }
        Request::Readdir { node, .. } => {
            *counts.lock().unwrap().entry(node).or_default() += 1;
            Response::Dir {
                entries: (0..1000u64)
                    .map(|i| DirEntry {
                        name: format!("e{i}").into_bytes(),
                        attr: attr(node * 10_000 + i, Kind::File, 1),
                    })
                    .collect(),
                next: None,
            }
        }
        _ => Response::Error(libc::ENOSYS),
    });
    bounded(120, None, move || {
        // Listings stay fresh for the whole test, and so many idle inodes
        // are kept that only the bound on listings drops the first one.
        let fs = client(
            addr,
            FsOptions {
                attr_timeout: std::time::Duration::from_secs(3600),
                max_idle_inodes: 1 << 20,
                max_cached_dir_entries: CACHED,
                ..FsOptions::default()
            },
        );
        let d0 = fs.lookup(ROOT_INO, b"d0").unwrap().ino;
        fs.readdir(d0).unwrap();
        fs.readdir(d0).unwrap();
        assert_eq!(
            listed.lock().unwrap()[&1000],
            1,
            "a fresh listing is cached"
        );
        for i in 1..DIRS {
            let d = fs.lookup(ROOT_INO, format!("d{i}").as_bytes()).unwrap().ino;
            assert_eq!(fs.readdir(d).unwrap().len(), 1000);
        }
        assert!(fs.cached_dir_entries() <= CACHED);
        // 19,000 entries listed since: the first listing made room.
        fs.readdir(d0).unwrap();
        assert_eq!(
            listed.lock().unwrap()[&1000],
            2,
            "the first listing was kept with 19,000 entries listed after it"
        );
    });
}
