//! The image store and its disks, through the public API: import and read
//! back, copy-on-write overlays, commit, sharing of chunks, rm, gc, and
//! damaged metadata.

use images::{Disk, OverlayDisk, Store, StoreError};
use std::path::{Path, PathBuf};

const CS: u32 = 64 * 1024;

/// Deterministic bytes (xorshift).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A raw image of 20 chunks and a half: data, a zero chunk, two equal
/// chunks, a short last chunk.
fn sample_image() -> Vec<u8> {
    let cs = CS as usize;
    let mut img = noise(1, cs * 20 + cs / 2);
    img[3 * cs..4 * cs].fill(0);
    let dup = img[5 * cs..6 * cs].to_vec();
    img[6 * cs..7 * cs].copy_from_slice(&dup);
    img
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    store: Store,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let store = Store::open_or_create(&root.join("store"), CS).unwrap();
    Fixture {
        _dir: dir,
        root,
        store,
    }
}

fn chunk_files(store: &Store) -> usize {
    std::fs::read_dir(store.chunks_dir())
        .unwrap()
        .filter(|e| {
            let n = e.as_ref().unwrap().file_name();
            !n.to_string_lossy().starts_with('.')
        })
        .count()
}

fn import(f: &Fixture, name: &str, data: &[u8]) {
    let file = f.root.join(format!("{name}.raw"));
    std::fs::write(&file, data).unwrap();
    f.store.import(name, &file, &mut |_| {}).unwrap();
}

fn read_all(disk: &Disk) -> Vec<u8> {
    let mut buf = vec![0u8; disk.capacity() as usize];
    disk.read_at(&mut buf, 0).unwrap();
    buf
}

#[test]
fn import_reads_back_byte_identical() {
    let f = fixture();
    let img = sample_image();
    let file = f.root.join("a.raw");
    std::fs::write(&file, &img).unwrap();
    let mut seen = Vec::new();
    let r = f.store.import("a", &file, &mut |p| seen.push(p)).unwrap();
    assert_eq!(seen.last(), Some(&100), "progress {seen:?}");
    assert_eq!(r.size, img.len() as u64);
    // 21 chunks: one all zeros (not stored), two equal (stored once).
    assert_eq!(r.chunks, 20);
    assert_eq!(r.new_chunks, 19);
    assert_eq!(chunk_files(&f.store), 19);

    let disk = Disk::open(&f.store, "a", &f.root.join("a.ovl")).unwrap();
    assert_eq!(disk.capacity(), img.len() as u64);
    assert!(read_all(&disk) == img);
    // Reads at odd offsets and lengths across chunks.
    for (off, len) in [
        (1, 10),
        (CS as u64 - 3, 7),
        (3 * CS as u64 - 5, CS as usize + 9),
    ] {
        let mut buf = vec![0u8; len];
        disk.read_at(&mut buf, off).unwrap();
        assert!(buf == img[off as usize..off as usize + len]);
    }
    let stats = disk.source_stats();
    assert_eq!(stats.chunks, 19, "{stats:?}");
    // Past the end: an error, not a panic.
    let mut buf = [0u8; 2];
    assert!(disk.read_at(&mut buf, img.len() as u64 - 1).is_err());
    assert!(disk.write_at(&buf, u64::MAX).is_err());
}

#[test]
fn writes_land_in_the_overlay_and_the_base_is_untouched() {
    let f = fixture();
    let img = sample_image();
    import(&f, "a", &img);
    let chunks_before: Vec<_> = std::fs::read_dir(f.store.chunks_dir())
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    let ovl = f.root.join("a.ovl");
    let mut want = img.clone();
    {
        let disk = Disk::open(&f.store, "a", &ovl).unwrap();
        // A sub-block write (copy-up), a write across blocks and chunks, a
        // write into the zero chunk, zeroes and a discard.
        let writes: Vec<(u64, Vec<u8>)> = vec![
            (100, noise(10, 300)),
            (CS as u64 - 1000, noise(11, 9000)),
            (3 * CS as u64 + 4096, noise(12, 4096)),
        ];
        for (off, data) in &writes {
            disk.write_at(data, *off).unwrap();
            want[*off as usize..*off as usize + data.len()].copy_from_slice(data);
        }
        disk.write_zeroes(8 * CS as u64 + 10, 3 * 4096).unwrap();
        want[8 * CS as usize + 10..][..3 * 4096].fill(0);
        disk.discard(9 * CS as u64, CS as u64).unwrap();
        want[9 * CS as usize..][..CS as usize].fill(0);
        assert!(read_all(&disk) == want);
        disk.flush().unwrap();
    }
    let disk = Disk::open(&f.store, "a", &ovl).unwrap();
    assert!(read_all(&disk) == want, "writes lost on reopen");
    let chunks_after: Vec<_> = std::fs::read_dir(f.store.chunks_dir())
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert!(chunks_before == chunks_after, "the store changed");
    // A second disk on the same overlay is refused while this one is open.
    let err = Disk::open(&f.store, "a", &ovl).err().unwrap();
    assert!(err.to_string().contains("in use"), "{err}");
}

#[test]
fn overlay_disk_on_a_raw_file() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let ovl = dir.path().join("base.ovl");
    let data = noise(3, 1 << 20);
    std::fs::write(&base, &data).unwrap();
    let mut want = data.clone();
    {
        let disk = OverlayDisk::open(&base, &ovl).unwrap();
        disk.write_at(&[0xAB; 513], 1000).unwrap();
        want[1000..1513].fill(0xAB);
        disk.write_at(&noise(4, 65536), 65536).unwrap();
        want[65536..131072].copy_from_slice(&noise(4, 65536));
        disk.flush().unwrap();
    }
    let disk = OverlayDisk::open(&base, &ovl).unwrap();
    let mut buf = vec![0u8; data.len()];
    disk.read_at(&mut buf, 0).unwrap();
    assert!(buf == want);
    assert!(std::fs::read(&base).unwrap() == data, "the base changed");
    drop(disk);
    // A base of another size is refused.
    std::fs::write(&base, &data[..4096]).unwrap();
    let err = OverlayDisk::open(&base, &ovl).err().unwrap();
    assert!(err.to_string().contains("was made on"), "{err}");
}

#[test]
fn threads_write_disjoint_sectors_of_shared_blocks() {
    let f = fixture();
    let img = sample_image();
    import(&f, "a", &img);
    let disk = std::sync::Arc::new(Disk::open(&f.store, "a", &f.root.join("a.ovl")).unwrap());
    // Four threads write interleaved 512-byte sectors of the same blocks:
    // every one copies up concurrently with the others.
    let handles: Vec<_> = (0..4u64)
        .map(|t| {
            let disk = disk.clone();
            std::thread::spawn(move || {
                for s in (t..256).step_by(4) {
                    disk.write_at(&[t as u8 + 1; 512], s * 512).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let mut buf = vec![0u8; 256 * 512];
    disk.read_at(&mut buf, 0).unwrap();
    for s in 0..256usize {
        assert!(
            buf[s * 512..(s + 1) * 512]
                .iter()
                .all(|&b| b == (s % 4) as u8 + 1),
            "sector {s}"
        );
    }
}

#[test]
fn commit_keeps_only_changed_chunks_and_shares_the_base() {
    let f = fixture();
    let img = sample_image();
    import(&f, "base", &img);
    assert_eq!(chunk_files(&f.store), 19);
    let ovl = f.root.join("vm.ovl");
    let mut want = img.clone();
    {
        let disk = Disk::open(&f.store, "base", &ovl).unwrap();
        // Chunk 1 changes, chunk 2 is written with its own bytes (no
        // change), chunk 3 (zeros) gets data, chunk 4 becomes zeros.
        let cs = CS as usize;
        disk.write_at(&[7u8; 100], CS as u64 + 50).unwrap();
        want[cs + 50..cs + 150].fill(7);
        disk.write_at(&img[2 * cs..3 * cs], 2 * CS as u64).unwrap();
        disk.write_at(&[9u8; 4096], 3 * CS as u64).unwrap();
        want[3 * cs..3 * cs + 4096].fill(9);
        disk.write_zeroes(4 * CS as u64, CS as u64).unwrap();
        want[4 * cs..5 * cs].fill(0);
        disk.flush().unwrap();
    }
    let r = f.store.commit(&ovl, "base", "child").unwrap();
    assert_eq!(r.changed_chunks, 3, "{r:?}");
    assert_eq!(r.new_chunks, 2);
    assert_eq!(chunk_files(&f.store), 21);
    let info = f.store.info("child").unwrap();
    assert_eq!(info.layers.len(), 2);
    assert_eq!(info.layers[0].entries, 3);
    assert_eq!(info.unique_chunks, 2, "{info:?}");
    let base_info = f.store.info("base").unwrap();
    // The child's chain holds all of the base's layer: nothing is the
    // base's alone (removing it would free nothing).
    assert_eq!(base_info.unique_chunks, 0, "{base_info:?}");

    let disk = Disk::open(&f.store, "child", &f.root.join("child.ovl")).unwrap();
    assert!(read_all(&disk) == want);
    drop(disk);

    // A second image on the same base: only its own changes are stored.
    let ovl2 = f.root.join("vm2.ovl");
    {
        let disk = Disk::open(&f.store, "base", &ovl2).unwrap();
        disk.write_at(&[5u8; 10], 10 * CS as u64).unwrap();
    }
    f.store.commit(&ovl2, "base", "child2").unwrap();
    assert_eq!(chunk_files(&f.store), 22);
    // The same file imported again stores nothing new.
    import(&f, "again", &img);
    assert_eq!(chunk_files(&f.store), 22);
    let names: Vec<_> = f
        .store
        .list()
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["again", "base", "child", "child2"]);

    // An overlay made on another image is refused.
    let err = f.store.commit(&ovl2, "child", "x").unwrap_err();
    assert!(err.to_string().contains("was made on"), "{err}");
}

#[test]
fn rm_is_refused_while_used_and_gc_removes_only_unreferenced_chunks() {
    let f = fixture();
    let img = sample_image();
    import(&f, "base", &img);
    let ovl = f.root.join("vm.ovl");
    {
        let disk = Disk::open(&f.store, "base", &ovl).unwrap();
        disk.write_at(&noise(20, 2 * CS as usize), 0).unwrap();
    }
    f.store.commit(&ovl, "base", "child").unwrap();
    assert_eq!(chunk_files(&f.store), 21);

    // The base of another image.
    let err = f.store.remove("base").unwrap_err();
    assert!(matches!(err, StoreError::HasDependents { .. }), "{err}");
    // Open by a disk.
    let disk = Disk::open(&f.store, "child", &f.root.join("c.ovl")).unwrap();
    let err = f.store.remove("child").unwrap_err();
    assert!(matches!(err, StoreError::InUse { .. }), "{err}");
    drop(disk);

    // gc with everything referenced removes nothing.
    let g = f.store.gc().unwrap();
    assert_eq!((g.chunks_removed, g.layers_removed), (0, 0));
    f.store.remove("child").unwrap();
    let g = f.store.gc().unwrap();
    assert_eq!((g.chunks_removed, g.layers_removed), (2, 1), "{g:?}");
    assert_eq!(chunk_files(&f.store), 19);
    // The base still reads back whole.
    let disk = Disk::open(&f.store, "base", &f.root.join("b.ovl")).unwrap();
    assert!(read_all(&disk) == img);
    drop(disk);
    f.store.remove("base").unwrap();
    f.store.gc().unwrap();
    assert_eq!(chunk_files(&f.store), 0);
    assert!(matches!(
        f.store.remove("base").unwrap_err(),
        StoreError::NoImage(_)
    ));
}

fn only_file(dir: &Path) -> PathBuf {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1);
    files.remove(0)
}

#[test]
fn damaged_metadata_gives_clear_errors() {
    let f = fixture();
    import(&f, "a", &sample_image());
    let dir = f.store.dir().to_path_buf();
    let ovl = f.root.join("a.ovl");
    drop(Disk::open(&f.store, "a", &ovl).unwrap());

    // A truncated layer.
    let layer = only_file(&dir.join("layers"));
    let good = std::fs::read(&layer).unwrap();
    std::fs::write(&layer, &good[..good.len() / 2]).unwrap();
    let err = Disk::open(&f.store, "a", &ovl).err().unwrap();
    assert!(err.to_string().contains("do not match its id"), "{err}");
    assert!(f.store.gc().is_err(), "gc must refuse a broken store");
    std::fs::write(&layer, &good).unwrap();

    // An image file that is not JSON.
    let image = dir.join("images/a.json");
    let good_image = std::fs::read(&image).unwrap();
    std::fs::write(&image, b"{\"format\":1,\"lay").unwrap();
    let err = f.store.info("a").unwrap_err();
    assert!(err.to_string().contains("is corrupted"), "{err}");
    std::fs::write(&image, &good_image).unwrap();

    // A store.json that is garbage.
    let cfg = dir.join("store.json");
    let good_cfg = std::fs::read(&cfg).unwrap();
    std::fs::write(&cfg, b"\x00\x01").unwrap();
    assert!(Store::open(&dir).is_err());
    std::fs::write(&cfg, &good_cfg).unwrap();

    // An overlay whose header is damaged, truncated, or not an overlay.
    let good_ovl = std::fs::read(&ovl).unwrap();
    let mut bad = good_ovl.clone();
    bad[20] ^= 0xff;
    std::fs::write(&ovl, &bad).unwrap();
    let err = Disk::open(&f.store, "a", &ovl).err().unwrap();
    assert!(err.to_string().contains("checksum"), "{err}");
    std::fs::write(&ovl, &good_ovl[..good_ovl.len() - 4096]).unwrap();
    let err = Disk::open(&f.store, "a", &ovl).err().unwrap();
    assert!(err.to_string().contains("truncated"), "{err}");
    std::fs::write(&ovl, &good_ovl[..100]).unwrap();
    let err = Disk::open(&f.store, "a", &ovl).err().unwrap();
    assert!(err.to_string().contains("truncated"), "{err}");
    std::fs::write(&ovl, b"hello").unwrap();
    let err = Disk::open(&f.store, "a", &ovl).err().unwrap();
    assert!(err.to_string().contains("not a vmplant overlay"), "{err}");
    std::fs::write(&ovl, &good_ovl).unwrap();

    // A missing chunk fails the read that needs it, and only that one.
    let disk = Disk::open(&f.store, "a", &ovl).unwrap();
    let victim = std::fs::read_dir(f.store.chunks_dir())
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::remove_file(&victim).unwrap();
    let mut buf = vec![0u8; disk.capacity() as usize];
    let err = disk.read_at(&mut buf, 0).unwrap_err();
    assert!(
        images::chain_message(&err).contains("is missing"),
        "{}",
        images::chain_message(&err)
    );

    // Bad names never reach the file system.
    for name in ["", "../x", ".hidden", "a/b", "-x"] {
        assert!(matches!(
            f.store.import(name, &victim, &mut |_| {}).unwrap_err(),
            StoreError::BadName(_)
        ));
    }
}

#[test]
fn qcow2_without_qemu_img_is_a_clear_error() {
    let f = fixture();
    let file = f.root.join("disk.qcow2");
    let mut data = b"QFI\xfb".to_vec();
    data.resize(4096, 0);
    std::fs::write(&file, &data).unwrap();
    let has_qemu_img = std::process::Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok();
    let res = f.store.import("q", &file, &mut |_| {});
    if has_qemu_img {
        // A header of zeros is not a valid qcow2: qemu-img says so.
        assert!(res.is_err());
    } else {
        let err = res.unwrap_err();
        assert!(err.to_string().contains("needs qemu-img"), "{err}");
    }
}

#[test]
fn a_copy_up_never_undoes_a_concurrent_whole_block_write() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    const BLOCKS: u64 = 2000;
    std::fs::write(&base, vec![0x11u8; BLOCKS as usize * 4096]).unwrap();
    let disk = std::sync::Arc::new(OverlayDisk::open(&base, &dir.path().join("o")).unwrap());
    // One thread writes whole blocks, the other the first sector of each
    // (a copy-up): the other sectors must end up the whole write's.
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
    let spawn = |whole: bool| {
        let disk = disk.clone();
        let barrier = barrier.clone();
        std::thread::spawn(move || {
            barrier.wait();
            for b in 0..BLOCKS {
                if whole {
                    disk.write_at(&[0xAA; 4096], b * 4096).unwrap();
                } else {
                    disk.write_at(&[0xBB; 512], b * 4096).unwrap();
                }
            }
        })
    };
    let (a, b) = (spawn(true), spawn(false));
    a.join().unwrap();
    b.join().unwrap();
    let mut buf = vec![0u8; 4096];
    for b in 0..BLOCKS {
        disk.read_at(&mut buf, b * 4096).unwrap();
        assert!(buf[0] == 0xAA || buf[0] == 0xBB, "block {b}");
        assert!(
            buf[512..].iter().all(|&x| x == 0xAA),
            "block {b} lost its write"
        );
    }
}
