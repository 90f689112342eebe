//! The FUSE mount of a served directory, driven with ordinary shell tools.

mod common;

use common::*;
use gvfs::client::FsOptions;
use std::fs;
use std::time::Duration;

#[test]
fn shell_tools_on_mount_match_the_export() {
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("export");
    let mnt = tmp.path().join("mnt");
    fs::create_dir_all(export.join("sub")).unwrap();
    fs::write(export.join("small.txt"), b"hello gvfs\n").unwrap();
    fs::write(export.join("big.bin"), data(3 * 1024 * 1024 + 777, 1)).unwrap();
    fs::write(export.join("sub/inner.txt"), b"inner").unwrap();
    let server = start(server_config(&export), "127.0.0.1:0");
    let fs_ = client(server.local_addr(), FsOptions::default());
    let m = mnt.clone();
    bounded(120, Some(mnt.clone()), move || {
        let guard = MountGuard::mount(fs_, &m);
        let m = m.display().to_string();
        let e = export.display().to_string();

        // ls and stat.
        let ls = sh_ok(&format!("ls -1 {m}"));
        assert_eq!(
            ls.lines().collect::<Vec<_>>(),
            ["big.bin", "small.txt", "sub"]
        );
        assert_eq!(sh_ok(&format!("stat -c %s {m}/big.bin")).trim(), "3146505");
        assert_eq!(sh_ok(&format!("stat -c %F {m}/sub")).trim(), "directory");
        // cat: content and checksums equal the export's.
        assert_eq!(sh_ok(&format!("cat {m}/small.txt")), "hello gvfs\n");
        assert_eq!(sh_ok(&format!("cat {m}/sub/inner.txt")), "inner");
        assert_eq!(
            sha256(&mnt_path(&m, "big.bin")),
            sha256(&export.join("big.bin"))
        );
        // cp onto the mount: the server has the same bytes.
        sh_ok(&format!("cp {e}/big.bin {m}/copy.bin"));
        assert_eq!(
            sha256(&export.join("copy.bin")),
            sha256(&export.join("big.bin"))
        );
        assert_eq!(
            sha256(&mnt_path(&m, "copy.bin")),
            sha256(&export.join("big.bin"))
        );
        // mv and rm.
        sh_ok(&format!("mv {m}/copy.bin {m}/sub/moved.bin"));
        assert!(!export.join("copy.bin").exists());
        assert_eq!(
            sha256(&export.join("sub/moved.bin")),
            sha256(&export.join("big.bin"))
        );
        sh_ok(&format!("rm {m}/sub/moved.bin"));
        assert!(!export.join("sub/moved.bin").exists());
        // mkdir and rmdir.
        sh_ok(&format!("mkdir {m}/newdir"));
        assert!(export.join("newdir").is_dir());
        sh_ok(&format!("echo x > {m}/newdir/f && test -f {e}/newdir/f"));
        let (ok, _, _) = sh(&format!("rmdir {m}/newdir"));
        assert!(!ok, "rmdir of a non-empty directory must fail");
        sh_ok(&format!("rm {m}/newdir/f && rmdir {m}/newdir"));
        assert!(!export.join("newdir").exists());
        // ln -s: the server has the link, reading through it works.
        sh_ok(&format!("ln -s small.txt {m}/link"));
        assert_eq!(
            fs::read_link(export.join("link"))
                .unwrap()
                .to_str()
                .unwrap(),
            "small.txt"
        );
        assert_eq!(sh_ok(&format!("readlink {m}/link")).trim(), "small.txt");
        assert_eq!(sh_ok(&format!("cat {m}/link")), "hello gvfs\n");
        // Hard link.
        sh_ok(&format!("ln {m}/small.txt {m}/hard"));
        assert_eq!(fs::read(export.join("hard")).unwrap(), b"hello gvfs\n");
        // truncate, both ways.
        sh_ok(&format!("truncate -s 5 {m}/small.txt"));
        assert_eq!(fs::read(export.join("small.txt")).unwrap(), b"hello");
        sh_ok(&format!("truncate -s 8 {m}/small.txt"));
        assert_eq!(fs::read(export.join("small.txt")).unwrap(), b"hello\0\0\0");
        assert_eq!(sh_ok(&format!("stat -c %s {m}/small.txt")).trim(), "8");
        // dd: write into the middle of a file without truncating it.
        sh_ok(&format!(
            "dd if=/dev/zero of={m}/big.bin bs=4096 count=3 seek=100 conv=notrunc status=none"
        ));
        let mut expect = data(3 * 1024 * 1024 + 777, 1);
        expect[409600..409600 + 12288].fill(0);
        assert_eq!(fs::read(export.join("big.bin")).unwrap(), expect);
        assert_eq!(
            sha256(&mnt_path(&m, "big.bin")),
            sha256(&export.join("big.bin"))
        );
        // dd reading a range.
        let out = sh_ok(&format!(
            "dd if={m}/big.bin bs=1 skip=409599 count=2 status=none | od -An -tu1"
        ));
        assert_eq!(
            out.split_whitespace().collect::<Vec<_>>(),
            [expect[409599].to_string(), "0".to_string()]
        );
        // chmod shows on the server.
        sh_ok(&format!("chmod 600 {m}/sub/inner.txt"));
        assert_eq!(
            sh_ok(&format!("stat -c %a {e}/sub/inner.txt")).trim(),
            "600"
        );
        // df works (statfs).
        sh_ok(&format!("df {m}"));
        guard.unmount();
    });
    server.shutdown();
}

fn mnt_path(m: &str, name: &str) -> std::path::PathBuf {
    std::path::Path::new(m).join(name)
}

#[test]
fn second_read_is_cached_and_disk_cache_survives_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("export");
    let mnt = tmp.path().join("mnt");
    let cache = tmp.path().join("cache");
    fs::create_dir_all(&export).unwrap();
    fs::write(export.join("f.bin"), data(2 * 1024 * 1024 + 5, 2)).unwrap();
    let server = start(server_config(&export), "127.0.0.1:0");
    let addr = server.local_addr();
    let opts = FsOptions {
        cache_dir: Some(cache.clone()),
        ..FsOptions::default()
    };
    let server = std::sync::Arc::new(server);
    let srv = server.clone();
    let m = mnt.clone();
    bounded(120, Some(mnt.clone()), move || {
        let want = sha256(&export.join("f.bin"));
        let f = m.join("f.bin");
        {
            let guard = MountGuard::mount(client(addr, opts.clone()), &m);
            assert_eq!(sha256(&f), want);
            let first = read_ops(&srv);
            assert!(first.1 >= 2 * 1024 * 1024, "first read fetched {first:?}");
            assert_eq!(sha256(&f), want);
            assert_eq!(
                read_ops(&srv),
                first,
                "second read must not reach the server"
            );
            guard.unmount();
        }
        // A new client (a restart) with the same cache directory.
        let before = read_ops(&srv);
        let fs2 = client(addr, opts.clone());
        let guard = MountGuard::mount(fs2.clone(), &m);
        assert_eq!(sha256(&f), want);
        assert_eq!(
            read_ops(&srv),
            before,
            "restarted client must read from its disk cache"
        );
        assert!(fs2.cache_stats().disk_hits >= 16);
        guard.unmount();
        // Corrupt one cached block: it is detected and fetched again.
        let entry = fs::read_dir(&cache)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let mut raw = fs::read(&entry).unwrap();
        let n = raw.len();
        raw[n - 1] ^= 0x55;
        fs::write(&entry, raw).unwrap();
        let fs3 = client(addr, opts.clone());
        let guard = MountGuard::mount(fs3.clone(), &m);
        assert_eq!(sha256(&f), want);
        // The corrupt block is found, and fetched again; twice if a small
        // read raced the kernel's read-ahead to it (seen under load).
        let corrupt = fs3.cache_stats().corrupt;
        assert!((1..=2).contains(&corrupt), "{corrupt} corrupt blocks found");
        let fetched = read_ops(&srv).0 - before.0;
        assert!((1..=2).contains(&fetched), "{fetched} blocks fetched again");
        guard.unmount();
    });
}

#[test]
fn change_on_server_is_seen_after_attr_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("export");
    let mnt = tmp.path().join("mnt");
    fs::create_dir_all(&export).unwrap();
    fs::write(export.join("f.txt"), b"version one\n").unwrap();
    let server = start(server_config(&export), "127.0.0.1:0");
    let opts = FsOptions {
        attr_timeout: Duration::from_secs(1),
        ..FsOptions::default()
    };
    let fs_ = client(server.local_addr(), opts);
    let m = mnt.clone();
    bounded(60, Some(mnt.clone()), move || {
        let guard = MountGuard::mount(fs_, &m);
        let f = m.join("f.txt").display().to_string();
        assert_eq!(sh_ok(&format!("cat {f}")), "version one\n");
        assert_eq!(sh_ok(&format!("ls {}", m.display())), "f.txt\n");
        // Listed again unchanged: the kernel keeps its readdir cache.
        assert_eq!(sh_ok(&format!("ls {}", m.display())), "f.txt\n");
        // Changed behind the client's back, same size and a new name beside it.
        fs::write(export.join("f.txt"), b"version TWO\n").unwrap();
        fs::write(export.join("g.txt"), b"new").unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(sh_ok(&format!("cat {f}")), "version TWO\n");
        assert_eq!(sh_ok(&format!("ls {}", m.display())), "f.txt\ng.txt\n");
        // And a longer version, read through the same path.
        fs::write(export.join("f.txt"), b"version three, longer\n").unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(sh_ok(&format!("cat {f}")), "version three, longer\n");
        // A name removed on the server leaves the listing (no stale
        // readdir cache), even with the directory's mtime put back as it
        // was, so that the kernel's own mtime check cannot tell.
        let mtime = fs::metadata(&export).unwrap().modified().unwrap();
        fs::remove_file(export.join("g.txt")).unwrap();
        fs::File::open(&export)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(sh_ok(&format!("ls {}", m.display())), "f.txt\n");
        guard.unmount();
    });
    server.shutdown();
}

#[test]
fn a_directory_larger_than_one_reply_lists_whole_and_in_order() {
    // About 1,100 entries fit in one READDIR reply: 3,000 take three, and
    // the mount hands out the first while the server reads the others.
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("export");
    let mnt = tmp.path().join("mnt");
    fs::create_dir_all(export.join("big")).unwrap();
    let mut names: Vec<String> = (0..3000).map(|i| format!("entry-{i:05}")).collect();
    for n in &names {
        fs::write(export.join("big").join(n), n.as_bytes()).unwrap();
    }
    names.sort();
    let server = start(server_config(&export), "127.0.0.1:0");
    let fs_ = client(server.local_addr(), FsOptions::default());
    let m = mnt.clone();
    bounded(60, Some(mnt.clone()), move || {
        let guard = MountGuard::mount(fs_, &m);
        let dir = m.join("big");
        for pass in ["from the server", "from the caches"] {
            let mut got: Vec<String> = fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            got.sort();
            assert_eq!(got.len(), names.len(), "{pass}");
            assert!(got == names, "{pass}: the names differ");
        }
        // Every entry's attributes came with the listing: a file is whole.
        assert_eq!(
            fs::read_to_string(dir.join("entry-02999")).unwrap(),
            "entry-02999"
        );
        guard.unmount();
    });
    server.shutdown();
}

#[test]
fn identity_mapping_shows_mapped_owner_both_ways() {
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("export");
    let mnt = tmp.path().join("mnt");
    fs::create_dir_all(&export).unwrap();
    fs::write(export.join("theirs"), b"x").unwrap();
    sh_ok(&format!("chown 1234:2345 {}/theirs", export.display()));
    // The export root is owned by a mapped uid too, so root can create in it.
    let mut cfg = server_config(&export);
    // remote 4242 <-> local 1234; remote 0 (the client's root) <-> local 1235.
    cfg.uid_map.pairs = vec![(4242, 1234), (0, 1235)];
    cfg.gid_map.pairs = vec![(5353, 2345)];
    let server = start(cfg, "127.0.0.1:0");
    let fs_ = client(server.local_addr(), FsOptions::default());
    let m = mnt.clone();
    bounded(60, Some(mnt.clone()), move || {
        let guard = MountGuard::mount(fs_, &m);
        let md = m.display();
        assert_eq!(
            sh_ok(&format!("stat -c %u:%g {md}/theirs")).trim(),
            "4242:5353"
        );
        sh_ok(&format!("touch {md}/mine"));
        // Created by the client's root: owned by local 1235 on the server,
        // shown as 0 on the client.
        assert_eq!(
            sh_ok(&format!("stat -c %u {}/mine", export.display())).trim(),
            "1235"
        );
        assert_eq!(sh_ok(&format!("stat -c %u {md}/mine")).trim(), "0");
        // chown to a remote id lands as the mapped local id.
        sh_ok(&format!("chown 4242 {md}/mine"));
        assert_eq!(
            sh_ok(&format!("stat -c %u {}/mine", export.display())).trim(),
            "1234"
        );
        guard.unmount();
    });
    server.shutdown();
}

#[test]
fn server_killed_mid_read_gives_eio_then_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("export");
    let mnt = tmp.path().join("mnt");
    fs::create_dir_all(&export).unwrap();
    let content = data(4 * 1024 * 1024, 3);
    fs::write(export.join("f.bin"), &content).unwrap();
    let server = start(server_config(&export), "127.0.0.1:0");
    let addr = server.local_addr();
    let fs_ = client(addr, FsOptions::default());
    let m = mnt.clone();
    bounded(90, Some(mnt.clone()), move || {
        let guard = MountGuard::mount(fs_, &m);
        let f = m.join("f.bin").display().to_string();
        // Read the first MiB, then the server dies.
        let head = sh_ok(&format!("dd if={f} bs=1M count=1 status=none | sha256sum"));
        assert_eq!(
            head.split_whitespace().next(),
            Some(&*sha_of(&content[..1 << 20]))
        );
        server.shutdown();
        let (ok, _, err) = sh(&format!(
            "dd if={f} bs=1M skip=3 count=1 status=none | wc -c && dd if={f} of=/dev/null bs=1M skip=3 count=1 status=none"
        ));
        assert!(!ok, "read with the server down must fail");
        assert!(err.contains("Input/output error"), "stderr: {err}");
        // The server comes back on the same address: reads work again.
        let server = start(server_config(&export), &addr.to_string());
        assert_eq!(sha256(&m.join("f.bin")), sha_of(&content));
        // A write acknowledged after the restart is on the server.
        sh_ok(&format!("echo written > {}/after", m.display()));
        assert_eq!(fs::read(export.join("after")).unwrap(), b"written\n");
        guard.unmount();
        server.shutdown();
    });
}

fn sha_of(bytes: &[u8]) -> String {
    let tmp = tempfile::NamedTempFile::new().unwrap();
    fs::write(tmp.path(), bytes).unwrap();
    sha256(tmp.path())
}

/// `"io_bytes" : N` of the first read section of fio's JSON output.
fn fio_read_bytes(json: &str) -> u64 {
    let read = json.find("\"read\"").expect("fio read section");
    let rest = &json[read..];
    let at = rest.find("\"io_bytes\"").expect("io_bytes");
    rest[at + 10..]
        .trim_start_matches([' ', ':'])
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn fio_sequential_and_random_reads() {
    if !sh("command -v fio").0 {
        panic!("fio is not installed (apt-get install -y fio)");
    }
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("export");
    let mnt = tmp.path().join("mnt");
    fs::create_dir_all(&export).unwrap();
    fs::write(export.join("fio.dat"), data(64 << 20, 4)).unwrap();
    let server = start(server_config(&export), "127.0.0.1:0");
    let fs_ = client(server.local_addr(), FsOptions::default());
    let m = mnt.clone();
    bounded(180, Some(mnt.clone()), move || {
        let guard = MountGuard::mount(fs_, &m);
        let f = m.join("fio.dat").display().to_string();
        for (rw, bs) in [("read", "1M"), ("randread", "4k")] {
            let out = sh_ok(&format!(
                "fio --name={rw} --filename={f} --rw={rw} --bs={bs} --size=64M \
                 --runtime=10 --ioengine=psync --output-format=json"
            ));
            let bytes = fio_read_bytes(&out);
            assert!(bytes > 0, "fio {rw} read nothing");
            if rw == "read" {
                assert_eq!(bytes, 64 << 20, "sequential job reads the whole file");
            }
        }
        // The file is unchanged and reads back identical.
        assert_eq!(sha256(&m.join("fio.dat")), sha256(&export.join("fio.dat")));
        guard.unmount();
    });
    server.shutdown();
}

#[test]
fn forgotten_inodes_are_released() {
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("export");
    let mnt = tmp.path().join("mnt");
    fs::create_dir_all(export.join("many")).unwrap();
    for i in 0..300 {
        fs::write(export.join(format!("many/f{i}")), format!("{i}")).unwrap();
    }
    let server = start(server_config(&export), "127.0.0.1:0");
    let fs_ = client(server.local_addr(), FsOptions::default());
    let m = mnt.clone();
    bounded(60, Some(mnt.clone()), move || {
        let guard = MountGuard::mount(fs_.clone(), &m);
        let md = m.display();
        assert_eq!(
            sh_ok(&format!("ls -l {md}/many | grep -c '^-'")).trim(),
            "300"
        );
        assert!(fs_.inode_count() > 300);
        // Make the kernel drop its dentries and inodes: it sends FORGETs.
        let mut released = false;
        for _ in 0..50 {
            fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
            if fs_.inode_count() < 50 {
                released = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(released, "{} inodes still held", fs_.inode_count());
        // Everything still works through fresh lookups.
        assert_eq!(sh_ok(&format!("cat {md}/many/f123")), "123");
        assert_eq!(sh_ok(&format!("ls {md}/many | wc -l")).trim(), "300");
        guard.unmount();
    });
    server.shutdown();
}

/// Drops the kernel's page cache of `path` (`dd iflag=nocache count=0`).
fn drop_file_cache(path: &std::path::Path) {
    sh_ok(&format!(
        "dd if='{}' iflag=nocache count=0 status=none",
        path.display()
    ));
}

/// Reads `path` once the kernel has forgotten its pages, and tells
/// whether the read reached the client core (its block cache).
fn read_reaches_client(fs_: &gvfs::client::Fs, path: &std::path::Path, want: &str) -> bool {
    drop_file_cache(path);
    let before = fs_.cache_stats();
    assert_eq!(sha256(path), want);
    fs_.cache_stats() != before
}

#[test]
fn whole_copy_passes_reads_through_until_the_file_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("export");
    let mnt = tmp.path().join("mnt");
    fs::create_dir_all(&export).unwrap();
    let len = 3 * 1024 * 1024 + 123;
    fs::write(export.join("f.bin"), data(len, 7)).unwrap();
    let server = std::sync::Arc::new(start(server_config(&export), "127.0.0.1:0"));
    let addr = server.local_addr();
    let srv = server.clone();
    let m = mnt.clone();
    bounded(120, Some(mnt.clone()), move || {
        let f = m.join("f.bin");
        let want = sha256(&export.join("f.bin"));
        let opts = FsOptions {
            whole_copy_bytes: 64 << 20,
            ..FsOptions::default()
        };
        // Without passthrough (a read-write mount makes no copies), a read
        // the page cache cannot answer reaches the client: this is what
        // the assertions below tell apart.
        {
            let fs_ = client(addr, opts.clone());
            let guard = MountGuard::mount(fs_.clone(), &m);
            assert_eq!(sha256(&f), want);
            assert_eq!(fs_.whole_copy_bytes(), 0);
            assert!(read_reaches_client(&fs_, &f, &want));
            guard.unmount();
        }
        let fs_ = client(addr, opts);
        let guard = MountGuard::mount_read_only(fs_.clone(), &m);
        // The first read makes the copy (and is a normal read).
        assert_eq!(sha256(&f), want);
        fs_.flush_whole_copies();
        assert_eq!(fs_.whole_copy_bytes(), len as u64);
        // The next opens pass through to it: no read reaches the client
        // or the server.
        let fetched = read_ops(&srv);
        assert!(!read_reaches_client(&fs_, &f, &want), "not passed through");
        assert!(!read_reaches_client(&fs_, &f, &want), "not passed through");
        assert_eq!(read_ops(&srv), fetched);

        // Changed on the server, same size: the next open sees the new
        // version (not the copy), and its read makes a new copy.
        fs::write(export.join("f.bin"), data(len, 8)).unwrap();
        let want2 = sha256(&export.join("f.bin"));
        assert_ne!(want, want2);
        assert!(read_reaches_client(&fs_, &f, &want2), "stale copy used");
        fs_.flush_whole_copies();
        assert!(!read_reaches_client(&fs_, &f, &want2), "new copy not used");

        // Changed on the server while a passed-through open is held: a
        // new open sees the new version, and so does the held one (as
        // after a page cache drop for a new version).
        let held = fs::File::open(&f).unwrap();
        let v3 = data(len - 1000, 9);
        fs::write(export.join("f.bin"), &v3).unwrap();
        let want3 = sha_of(&v3);
        assert_eq!(sha256(&f), want3);
        let mut head = vec![0u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(&held, &mut head, 0).unwrap();
        assert_eq!(head, v3[..4096]);
        drop(held);
        assert!(
            !read_reaches_client(&fs_, &f, &want3),
            "refilled copy not used"
        );
        assert_eq!(fs_.whole_copy_bytes(), v3.len() as u64);
        guard.unmount();
    });
}

#[test]
fn page_cache_of_a_version_a_backing_file_replaced_is_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("export");
    let mnt = tmp.path().join("mnt");
    fs::create_dir_all(&export).unwrap();
    let len = 1024 * 1024 + 5;
    fs::write(export.join("f.bin"), data(len, 11)).unwrap();
    fs::write(export.join("g.bin"), data(len, 12)).unwrap();
    let server = start(server_config(&export), "127.0.0.1:0");
    let fs_ = client(
        server.local_addr(),
        FsOptions {
            // Room for one copy; attributes the kernel does not refresh
            // by itself during the test.
            whole_copy_bytes: len as u64,
            attr_timeout: Duration::from_secs(60),
            ..FsOptions::default()
        },
    );
    let m = mnt.clone();
    bounded(120, Some(mnt.clone()), move || {
        let guard = MountGuard::mount_read_only(fs_.clone(), &m);
        let (f, g) = (m.join("f.bin"), m.join("g.bin"));
        // A page-cache read: the kernel holds version one's pages.
        assert_eq!(sha256(&f), sha256(&export.join("f.bin")));
        // Passed through while version two arrives: the backing file
        // takes it (the kernel's page cache is not told).
        let held = fs::File::open(&f).unwrap();
        fs::write(export.join("f.bin"), data(len, 13)).unwrap();
        let want2 = sha256(&export.join("f.bin"));
        assert_eq!(sha256(&f), want2);
        drop(held);
        // The copy goes (g's takes its room), so the next open of f is a
        // page-cache open of an unchanged version: the old pages must
        // not be kept.
        assert_eq!(sha256(&g), sha256(&export.join("g.bin")));
        assert_eq!(sha256(&f), want2);
        guard.unmount();
    });
    server.shutdown();
}

#[test]
fn held_passed_through_open_sees_a_server_change_after_the_attr_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("export");
    let mnt = tmp.path().join("mnt");
    fs::create_dir_all(&export).unwrap();
    let len = 2 * 1024 * 1024 + 3;
    fs::write(export.join("f.bin"), data(len, 21)).unwrap();
    let server = start(server_config(&export), "127.0.0.1:0");
    let fs_ = client(
        server.local_addr(),
        FsOptions {
            whole_copy_bytes: 64 << 20,
            attr_timeout: Duration::from_secs(1),
            ..FsOptions::default()
        },
    );
    let m = mnt.clone();
    bounded(120, Some(mnt.clone()), move || {
        use std::io::Read;
        use std::os::unix::fs::FileExt;
        let guard = MountGuard::mount_read_only(fs_.clone(), &m);
        let f = m.join("f.bin");
        let want = sha256(&export.join("f.bin"));
        assert_eq!(sha256(&f), want);
        fs_.flush_whole_copies();
        // The page-cache open's release may still be on its way.
        std::thread::sleep(Duration::from_millis(200));
        let mut held = fs::File::open(&f).unwrap();
        assert!(!read_reaches_client(&fs_, &f, &want), "not passed through");
        let v2 = data(len, 22);
        fs::write(export.join("f.bin"), &v2).unwrap();
        std::thread::sleep(Duration::from_millis(2500));
        let mut head = vec![0u8; 4096];
        held.read_exact_at(&mut head, 0).unwrap();
        assert_eq!(head, v2[..4096], "held open still reads the old version");
        let mut all = Vec::new();
        held.read_to_end(&mut all).unwrap();
        assert!(all == v2, "held open reads a mix of versions");
        drop(held);
        guard.unmount();
    });
    server.shutdown();
}

#[test]
fn open_files_and_directories_are_capped_per_mount() {
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("export");
    let mnt = tmp.path().join("mnt");
    fs::create_dir_all(export.join("d")).unwrap();
    fs::write(export.join("f"), b"x").unwrap();
    let server = start(server_config(&export), "127.0.0.1:0");
    let opts = FsOptions {
        max_open_files: 8,
        max_open_dirs: 4,
        ..FsOptions::default()
    };
    let fs_ = client(server.local_addr(), opts);
    let m = mnt.clone();
    bounded(60, Some(mnt.clone()), move || {
        let guard = MountGuard::mount(fs_, &m);
        fn errno<T>(r: std::io::Result<T>) -> Option<i32> {
            r.map(drop).unwrap_err().raw_os_error()
        }
        // Eight files open at once, not nine.
        let mut files: Vec<fs::File> = (0..8)
            .map(|_| fs::File::open(m.join("f")).unwrap())
            .collect();
        assert_eq!(errno(fs::File::open(m.join("f"))), Some(libc::EMFILE));
        assert_eq!(server.open_handles(), 8);
        // Closing one makes room (RELEASE comes after close returns).
        files.pop();
        assert!(eventually(Duration::from_secs(5), || fs::File::open(
            m.join("f")
        )
        .map(|f| files.push(f))
        .is_ok()));
        drop(files);
        // Four open directories, not five.
        let dirs: Vec<fs::ReadDir> = (0..4).map(|_| fs::read_dir(m.join("d")).unwrap()).collect();
        assert_eq!(errno(fs::read_dir(m.join("d"))), Some(libc::EMFILE));
        drop(dirs);
        guard.unmount();
        server.shutdown();
    });
}
