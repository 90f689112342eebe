//! `vmplant image` as a user runs it: import, ls, info, commit of an
//! overlay, rm (refused while a disk has the image open or another image is
//! made on it), gc, and the one-line errors of bad input. The overlays are
//! written in this process through the images crate, as a VM's disk would.
//! No KVM, no root.

use images::{Disk, Store};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use vmplant_tests::vmplant;

const CS: usize = 64 * 1024;

fn image(store: &Path, args: &[&str]) -> Output {
    Command::new(vmplant())
        .arg("image")
        .arg("--store")
        .arg(store)
        .args(args)
        .output()
        .expect("cannot run vmplant image")
}

/// Runs `vmplant image`, expects success, returns its standard output.
fn ok(store: &Path, args: &[&str]) -> String {
    let out = image(store, args);
    assert!(
        out.status.success(),
        "vmplant image {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `vmplant image`, expects exit status 1 and a one-line error
/// holding `want`.
fn fails(store: &Path, args: &[&str], want: &str) {
    let out = image(store, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "vmplant image {args:?}: {stderr}"
    );
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("vmplant: ") && last.contains(want),
        "vmplant image {args:?}: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

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

fn chunk_files(store: &Path) -> usize {
    std::fs::read_dir(store.join("chunks"))
        .unwrap()
        .filter(|e| {
            !e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with('.')
        })
        .count()
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
}

struct Dirs {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    store: PathBuf,
}

fn dirs() -> Dirs {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let store = root.join("store");
    Dirs {
        _tmp: tmp,
        root,
        store,
    }
}

/// Imports a 16-chunk image (64 KiB chunks) of noise; returns its bytes.
fn import_base(d: &Dirs) -> Vec<u8> {
    let data = noise(1, 16 * CS);
    let file = d.root.join("base.raw");
    std::fs::write(&file, &data).unwrap();
    let out = ok(
        &d.store,
        &[
            "import",
            "--chunk-kib",
            "64",
            "base",
            file.to_str().unwrap(),
        ],
    );
    let r = json(&out);
    assert_eq!(r["size"], 16 * CS as u64);
    assert_eq!(r["chunks"], 16);
    data
}

/// Writes `writes` to a new overlay on `base`, as a VM would, and stops.
fn write_overlay(store: &Path, base: &str, overlay: &Path, writes: &[(usize, Vec<u8>)]) {
    let store = Store::open(store).unwrap();
    let disk = Disk::open(&store, base, overlay).unwrap();
    for (off, data) in writes {
        disk.write_at(data, *off as u64).unwrap();
    }
    disk.flush().unwrap();
}

#[test]
fn import_ls_info_and_read_back() {
    let d = dirs();
    let data = import_base(&d);
    let ls = ok(&d.store, &["ls"]);
    let lines: Vec<_> = ls.lines().map(json).collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["name"], "base");
    assert_eq!(lines[0]["layers"], 1);
    let info = json(&ok(&d.store, &["info", "base"]));
    assert_eq!(info["chunks"], 16);
    assert_eq!(info["unique_bytes"], 16 * CS as u64);
    assert_eq!(info["layers"].as_array().unwrap().len(), 1);

    let store = Store::open(&d.store).unwrap();
    let disk = Disk::open(&store, "base", &d.root.join("vm.ovl")).unwrap();
    let mut back = vec![0u8; data.len()];
    disk.read_at(&mut back, 0).unwrap();
    assert!(back == data, "the image does not read back as imported");

    fails(&d.store, &["info", "nope"], "no image named \"nope\"");
    fails(
        &d.store,
        &["import", "base", d.root.join("base.raw").to_str().unwrap()],
        "exists already",
    );
    fails(&d.root.join("elsewhere"), &["ls"], "is not an image store");
}

#[test]
fn commit_stores_only_changed_chunks_and_shares_the_base() {
    let d = dirs();
    let data = import_base(&d);
    assert_eq!(chunk_files(&d.store), 16);

    // VM 1 changes chunks 0 and 5 (one of them by a single sector) and
    // rewrites chunk 9 with the bytes it holds.
    let ovl1 = d.root.join("vm1.ovl");
    write_overlay(
        &d.store,
        "base",
        &ovl1,
        &[
            (100, vec![1u8; 512]),
            (5 * CS, noise(2, CS)),
            (9 * CS, data[9 * CS..10 * CS].to_vec()),
        ],
    );
    let ovl1 = ovl1.to_str().unwrap();
    let r = json(&ok(
        &d.store,
        &["commit", "--overlay", ovl1, "--base", "base", "web"],
    ));
    assert_eq!(r["changed_chunks"], 2, "{r}");
    assert_eq!(chunk_files(&d.store), 18);
    let info = json(&ok(&d.store, &["info", "web"]));
    let layers = info["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    assert_eq!(layers[0]["entries"], 2);
    assert_eq!(info["unique_chunks"], 2);

    // VM 2, on the same base, changes one chunk: the base is stored once.
    let ovl2 = d.root.join("vm2.ovl");
    write_overlay(&d.store, "base", &ovl2, &[(3 * CS + 7, vec![2u8; 10])]);
    let ovl2 = ovl2.to_str().unwrap();
    ok(
        &d.store,
        &["commit", "--overlay", ovl2, "--base", "base", "db"],
    );
    assert_eq!(chunk_files(&d.store), 19);

    // The new image reads as the base with VM 1's writes.
    let mut want = data.clone();
    want[100..612].fill(1);
    want[5 * CS..6 * CS].copy_from_slice(&noise(2, CS));
    let store = Store::open(&d.store).unwrap();
    let disk = Disk::open(&store, "web", &d.root.join("web.ovl")).unwrap();
    let mut back = vec![0u8; want.len()];
    disk.read_at(&mut back, 0).unwrap();
    assert!(back == want);
    drop(disk);

    // An overlay on another image, a running VM's overlay, a bad name.
    fails(
        &d.store,
        &["commit", "--overlay", ovl2, "--base", "web", "x"],
        "was made on",
    );
    let running = Disk::open(&store, "base", Path::new(ovl2)).unwrap();
    fails(
        &d.store,
        &["commit", "--overlay", ovl2, "--base", "base", "y"],
        "in use by another process",
    );
    drop(running);
    fails(
        &d.store,
        &["commit", "--overlay", ovl2, "--base", "base", "../z"],
        "not a valid image name",
    );
}

#[test]
fn rm_refused_while_used_and_gc_frees_only_unreferenced_chunks() {
    let d = dirs();
    import_base(&d);
    let ovl = d.root.join("vm.ovl");
    write_overlay(&d.store, "base", &ovl, &[(0, noise(3, 2 * CS))]);
    ok(
        &d.store,
        &[
            "commit",
            "--overlay",
            ovl.to_str().unwrap(),
            "--base",
            "base",
            "child",
        ],
    );
    assert_eq!(chunk_files(&d.store), 18);

    fails(&d.store, &["rm", "base"], "is the base of image \"child\"");
    let store = Store::open(&d.store).unwrap();
    let disk = Disk::open(&store, "child", &d.root.join("child.ovl")).unwrap();
    fails(&d.store, &["rm", "child"], "in use by a running VM");
    drop(disk);

    let g = json(&ok(&d.store, &["gc"]));
    assert_eq!(g["chunks_removed"], 0);
    ok(&d.store, &["rm", "child"]);
    assert_eq!(chunk_files(&d.store), 18, "rm alone frees nothing");
    let g = json(&ok(&d.store, &["gc"]));
    assert_eq!(g["chunks_removed"], 2, "{g}");
    assert_eq!(g["layers_removed"], 1, "{g}");
    assert_eq!(chunk_files(&d.store), 16);
    // The base is whole.
    let info = json(&ok(&d.store, &["info", "base"]));
    assert_eq!(info["chunks"], 16);
    let disk = Disk::open(&store, "base", &d.root.join("b.ovl")).unwrap();
    let mut back = vec![0u8; 16 * CS];
    disk.read_at(&mut back, 0).unwrap();
    assert!(back == noise(1, 16 * CS));
}

#[test]
fn damaged_store_and_bad_input_are_one_line_errors() {
    let d = dirs();
    import_base(&d);
    let layer = std::fs::read_dir(d.store.join("layers"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let good = std::fs::read(&layer).unwrap();
    std::fs::write(&layer, &good[..good.len() - 10]).unwrap();
    fails(&d.store, &["info", "base"], "is corrupted");
    fails(&d.store, &["gc"], "gc refuses to delete anything");
    assert_eq!(chunk_files(&d.store), 16);
    std::fs::write(&layer, &good).unwrap();

    std::fs::write(d.store.join("images/base.json"), b"not json").unwrap();
    fails(&d.store, &["ls"], "is corrupted");

    let missing = d.root.join("missing.raw");
    fails(
        &d.store,
        &["import", "other", missing.to_str().unwrap()],
        "No such file",
    );
    let empty = d.root.join("empty.raw");
    std::fs::write(&empty, b"").unwrap();
    fails(
        &d.store,
        &["import", "other", empty.to_str().unwrap()],
        "is empty",
    );

    let has_qemu_img = Command::new("qemu-img").arg("--version").output().is_ok();
    if !has_qemu_img {
        let q = d.root.join("disk.qcow2");
        let mut data = b"QFI\xfb".to_vec();
        data.resize(4096, 0);
        std::fs::write(&q, &data).unwrap();
        fails(
            &d.store,
            &["import", "q", q.to_str().unwrap()],
            "needs qemu-img",
        );
    }
}
