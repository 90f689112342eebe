//! Guest disks on images (`vmplant run --disk PATH,overlay=FILE` and
//! `--disk image=NAME,store=...,overlay=FILE`): the test guest writes and
//! reads sectors through virtio-blk while the base stays as it was and
//! the overlay takes the writes; `vmplant image commit` of a VM's overlay
//! holds only the chunks it changed; a VM killed while writing leaves an
//! overlay whose every sector is old or new; an image of 1 GiB served by
//! `vmplant gvfs serve` is fetched a chunk at a time, as the guest reads
//! it, and a second VM with the same cache directory fetches nothing.
//! Needs root and /dev/kvm.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use vmplant_tests::blk::{SECTORS, crc, disk, lines, pattern, run};
use vmplant_tests::{GvfsServer, Vmm, vmplant};

const CHUNK: u64 = 512 * 1024;

/// `vmplant image --store STORE ARGS...`, which must succeed: its output.
fn image(store: &Path, args: &[&str]) -> String {
    let out = Command::new(vmplant())
        .args(["image", "--store"])
        .arg(store)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "image {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The files of a store's `chunks/`, with their bytes' hashes.
fn chunk_files(store: &Path) -> Vec<(String, String)> {
    let mut v: Vec<_> = std::fs::read_dir(store.join("chunks"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            (name, crc(&std::fs::read(e.path()).unwrap()))
        })
        .collect();
    v.sort();
    v
}

/// `key=N` from the VMM's log.
fn logged(stderr: &str, key: &str) -> u64 {
    let at = stderr
        .rfind(&format!("{key}="))
        .unwrap_or_else(|| panic!("no {key}= in the log:\n{stderr}"));
    stderr[at + key.len() + 1..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap()
}

#[test]
fn a_raw_base_stays_as_it_was_and_its_overlay_holds_the_writes() {
    let dir = tempfile::tempdir().unwrap();
    let base = disk(dir.path(), "base.img");
    let overlay = dir.path().join("vm.ovl");
    let before = std::fs::read(&base).unwrap();
    let spec = format!("{},overlay={}", base.display(), overlay.display());
    let done = run(
        "blk-info+blk-write:100:24:7+blk-read:100:24+blk-read:0:8+blk-write:8191:1:2",
        &[&spec],
    );
    let info = &lines(&done, "blk-info")[0];
    assert_eq!(info["sectors"], SECTORS, "{info}");
    assert_eq!(info["read_only"], false, "{info}");
    let written = pattern(7, 24);
    let reads = lines(&done, "blk-read");
    assert_eq!(reads[0]["crc32"], crc(&written), "{}", reads[0]);
    assert_eq!(reads[1]["crc32"], crc(&before[..4096]), "{}", reads[1]);
    assert_eq!(
        std::fs::read(&base).unwrap(),
        before,
        "the base is byte-identical"
    );

    // The overlay, opened on the host, holds the writes over the base.
    let disk = images::OverlayDisk::open(&base, &overlay).unwrap();
    let mut all = vec![0u8; before.len()];
    disk.read_at(&mut all, 0).unwrap();
    assert!(all[100 * 512..124 * 512] == written[..]);
    assert!(all[8191 * 512..] == pattern(2, 1)[..]);
    assert!(all[..100 * 512] == before[..100 * 512]);
    assert!(all[124 * 512..8191 * 512] == before[124 * 512..8191 * 512]);
    drop(disk);

    // A VM on the same overlay later reads what the first one wrote.
    let done = run("blk-read:100:24", &[&spec]);
    assert_eq!(lines(&done, "blk-read")[0]["crc32"], crc(&written));

    // While a VM writes over the base, the base cannot be opened to write.
    let out = Command::new(vmplant())
        .args(["run", "--kernel"])
        .arg(vmplant_tests::probe_elf())
        .args(["--no-stdin", "--disk", &spec, "--disk"])
        .arg(&base)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("in use"), "{err}");
}

#[test]
fn an_image_of_a_local_store_and_the_commit_of_its_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let raw = disk(dir.path(), "raw.img");
    let before = std::fs::read(&raw).unwrap();
    let store = dir.path().join("store");
    image(&store, &["import", "base", raw.to_str().unwrap()]);
    let chunks_before = chunk_files(&store);
    assert_eq!(chunks_before.len(), 8);
    let overlay = dir.path().join("vm.ovl");
    let spec = format!(
        "image=base,store={},overlay={}",
        store.display(),
        overlay.display()
    );
    // Sectors 100..124 are in chunk 0, 3000..3008 in chunk 2; sector
    // 2048 (chunk 2 too) is written with the bytes it has.
    let done = run(
        "blk-write:100:24:7+blk-write:3000:8:3+blk-read:100:24+blk-read:3000:8+blk-read:5000:16",
        &[&spec],
    );
    let reads = lines(&done, "blk-read");
    assert_eq!(reads[0]["crc32"], crc(&pattern(7, 24)), "{}", reads[0]);
    assert_eq!(reads[1]["crc32"], crc(&pattern(3, 8)), "{}", reads[1]);
    assert_eq!(
        reads[2]["crc32"],
        crc(&before[5000 * 512..5016 * 512]),
        "{}",
        reads[2]
    );
    assert_eq!(
        chunk_files(&store),
        chunks_before,
        "the store's chunks are as they were"
    );
    assert!(
        done.stderr.contains("chunks_read="),
        "the disk reports its reads at exit: {}",
        done.stderr
    );

    // The overlay becomes a layer of the two chunks it changed.
    let out = image(
        &store,
        &[
            "commit",
            "--overlay",
            overlay.to_str().unwrap(),
            "--base",
            "base",
            "derived",
        ],
    );
    let commit: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(commit["changed_chunks"], 2, "{commit}");
    assert_eq!(commit["new_chunks"], 2, "{commit}");
    let info: Value = serde_json::from_str(image(&store, &["info", "derived"]).trim()).unwrap();
    assert_eq!(info["layers"][0]["entries"], 2, "{info}");
    assert_eq!(chunk_files(&store).len(), 10, "the base's chunks once");

    // A VM on the new image reads the committed writes.
    let spec = format!(
        "image=derived,store={},overlay={}",
        store.display(),
        dir.path().join("vm2.ovl").display()
    );
    let done = run("blk-read:100:24+blk-read:3000:8+blk-read:0:8", &[&spec]);
    let reads = lines(&done, "blk-read");
    assert_eq!(reads[0]["crc32"], crc(&pattern(7, 24)));
    assert_eq!(reads[1]["crc32"], crc(&pattern(3, 8)));
    assert_eq!(reads[2]["crc32"], crc(&before[..4096]));
}

#[test]
fn a_vm_killed_while_writing_leaves_every_sector_old_or_new() {
    let dir = tempfile::tempdir().unwrap();
    let raw = disk(dir.path(), "raw.img");
    let before = std::fs::read(&raw).unwrap();
    let store = dir.path().join("store");
    image(&store, &["import", "base", raw.to_str().unwrap()]);
    let overlay = dir.path().join("vm.ovl");
    let spec = format!(
        "image=base,store={},overlay={}",
        store.display(),
        overlay.display()
    );
    // 61 sectors from sector 5: partial 4 KiB blocks at both ends (copy-up).
    const FIRST: u64 = 5;
    const COUNT: u64 = 61;
    let patterns: Vec<Vec<u8>> = (0..=400).map(|s| pattern(s, COUNT)).collect();
    for round in 0..3 {
        let mut vmm = Vmm::probe(
            &format!("blk-write-loop:{FIRST}:{COUNT}:400+shutdown"),
            &["--disk", &spec],
        );
        let want = 20 + 40 * round;
        let line = vmm.expect_line("writes", Duration::from_secs(30), |l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .and_then(|v| v["seed"].as_u64())
                .is_some_and(|s| s >= want)
        });
        vmm.signal(libc::SIGKILL);
        let done = vmm.wait(Duration::from_secs(10));
        let flushed = serde_json::from_str::<Value>(&line).unwrap()["seed"]
            .as_u64()
            .unwrap();
        let last = lines(&done, "blk-write-loop")
            .iter()
            .filter_map(|v| v["seed"].as_u64())
            .max()
            .unwrap_or(flushed);
        // Reopened: each sector holds the base's bytes (before any
        // flush), or those of a write no older than the last flushed one.
        let disk = images::Disk::open(&images::Store::open(&store).unwrap(), "base", &overlay)
            .expect("the overlay reopens");
        let mut got = vec![0u8; (COUNT * 512) as usize];
        disk.read_at(&mut got, FIRST * 512).unwrap();
        // Seeds restart at 1 each round: a flushed write of this round
        // is the floor.
        for (k, sector) in got.chunks(512).enumerate() {
            let at = k * 512;
            let seed =
                (1..=(last + 2).min(400)).find(|&s| patterns[s as usize][at..at + 512] == *sector);
            match seed {
                Some(s) => assert!(
                    s >= flushed,
                    "round {round}: sector {} went back to seed {s}, before the flushed {flushed}",
                    FIRST + k as u64
                ),
                None => panic!(
                    "round {round}: sector {} holds no write of seed 1..={} (flushed {flushed})",
                    FIRST + k as u64,
                    last + 2
                ),
            }
        }
        // The sectors around the range are the base's.
        let mut edge = vec![0u8; 512 * 5];
        disk.read_at(&mut edge, 0).unwrap();
        assert!(edge[..] == before[..512 * 5]);
        disk.read_at(&mut edge, (FIRST + COUNT) * 512).unwrap();
        let end = ((FIRST + COUNT) * 512) as usize;
        assert!(edge[..] == before[end..end + 512 * 5]);
        drop(disk);
    }
}

/// A 1 GiB image whose 2,048 chunks each differ (an index and a few
/// bytes of noise in a sparse file), so that any chunk read is fetched.
fn big_image(dir: &Path) -> PathBuf {
    use std::os::unix::fs::FileExt;
    let path = dir.join("big.img");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(1 << 30).unwrap();
    for i in 0..(1u64 << 30) / CHUNK {
        let mut mark = [0u8; 64];
        mark[..8].copy_from_slice(&i.to_le_bytes());
        mark[8..].copy_from_slice(&pattern(i + 1, 1)[..56]);
        f.write_all_at(&mark, i * CHUNK).unwrap();
    }
    path
}

#[test]
fn an_image_on_a_gvfs_server_is_fetched_a_chunk_at_a_time_and_cached() {
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("served");
    let store = served.join("export");
    std::fs::create_dir_all(&served).unwrap();
    let raw = big_image(dir.path());
    image(&store, &["import", "big", raw.to_str().unwrap()]);
    std::fs::remove_file(&raw).unwrap();
    let server = GvfsServer::start(&served);
    let cache = dir.path().join("cache");
    let spec = |overlay: &str| {
        format!(
            "image=big,store=gvfs://{},token-file={},plaintext,cache-dir={},overlay={}",
            server.addr,
            served.join("token").display(),
            cache.display(),
            dir.path().join(overlay).display()
        )
    };
    // 100 scattered sectors, then chunk 1000's first sector.
    let steps = "blk-info+blk-rand-read:100:512+blk-read:1024000:1";
    let mut mark = vec![0u8; 512];
    mark[..8].copy_from_slice(&1000u64.to_le_bytes());
    mark[8..64].copy_from_slice(&pattern(1001, 1)[..56]);

    // The first VM ticks once its reads are done: `vm info` then shows
    // what its disk fetched so far.
    let control = dir.path().join("vm.sock");
    let a = spec("a.ovl");
    let mut vmm = Vmm::probe(
        &format!("{steps}+tick:100:3+shutdown"),
        &["--disk", &a, "--control", control.to_str().unwrap()],
    );
    vmm.expect_line("a tick", Duration::from_secs(60), |l| {
        l.contains(r#""probe":"tick""#)
    });
    let info: Value = serde_json::from_str(&vm(&control, &["info"])).unwrap();
    let dev = &info["devices"][0];
    assert_eq!(dev["path"], "image=big", "{info}");
    assert_eq!(dev["store"], format!("gvfs://{}", server.addr), "{info}");
    let live = dev["fetched_bytes"].as_u64().unwrap();
    let first = vmm.wait(Duration::from_secs(30));
    first.assert_success();
    assert_eq!(live, logged(&first.stderr, "fetched_bytes"), "{info}");
    assert_eq!(lines(&first, "blk-info")[0]["sectors"], 1u64 << 21);
    assert_eq!(lines(&first, "blk-read")[0]["crc32"], crc(&mark));
    let bytes = logged(&first.stderr, "fetched_bytes");
    let chunks = logged(&first.stderr, "fetched_chunks");
    eprintln!("first VM: fetched {bytes} bytes, {chunks} chunks");
    assert!(
        (90..=101).contains(&chunks),
        "about 100 chunks: {}",
        first.stderr
    );
    // Whole chunks of 512 KiB, and the store's metadata (a layer of 2,048
    // entries is about 150 KiB).
    assert!(
        bytes <= chunks * CHUNK + (1 << 20),
        "{bytes} bytes for {chunks} chunks"
    );
    assert!(bytes >= chunks * CHUNK, "{bytes} bytes for {chunks} chunks");

    // A second VM on this host, with the same cache directory: the same
    // sectors come from the cache.
    let second = run(steps, &[&spec("b.ovl")]);
    assert_eq!(lines(&second, "blk-read")[0]["crc32"], crc(&mark));
    let bytes = logged(&second.stderr, "fetched_bytes");
    eprintln!("second VM: fetched {bytes} bytes");
    assert_eq!(bytes, 0, "nothing fetched: {}", second.stderr);
}

/// `vmplant vm --control CONTROL ARGS...`, which must succeed.
fn vm(control: &Path, args: &[&str]) -> String {
    let out = Command::new(vmplant())
        .args(["vm", "--control"])
        .arg(control)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A `--config` VM on a base under an overlay (relative paths, the
/// file's), saved while it runs: the snapshot's device plan names the
/// disk with its overlay, and the restored guest reads what it wrote
/// before (the overlay was flushed for the snapshot).
#[test]
fn a_config_vm_on_an_overlay_is_saved_and_restored_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let base = disk(dir.path(), "base.img");
    let before = std::fs::read(&base).unwrap();
    let control = dir.path().join("vm.sock");
    let snap = dir.path().join("snap");
    let config = dir.path().join("vms.json");
    let vms = serde_json::json!({"vms": [{
        "name": "a",
        "kernel": vmplant_tests::probe_elf(),
        "cmdline": "console=ttyS0 probe=blk-write:16:8:5+tick:100:8+blk-read:16:8+shutdown",
        "disks": ["base.img,overlay=a.ovl"],
        "control": "vm.sock",
    }]});
    std::fs::write(&config, vms.to_string()).unwrap();
    let mut vmm = Vmm::start(&["run", "--config", config.to_str().unwrap()]);
    vmm.expect_line("a tick", Duration::from_secs(30), |l| {
        l.contains(r#""probe":"tick""#)
    });
    let info: Value = serde_json::from_str(&vm(&control, &["info"])).unwrap();
    let dev = &info["devices"][0];
    assert_eq!(dev["path"], base.to_str().unwrap(), "{info}");
    assert_eq!(
        dev["overlay"],
        dir.path().join("a.ovl").to_str().unwrap(),
        "{info}"
    );
    vm(&control, &["snapshot", snap.to_str().unwrap(), "--stop"]);
    vmm.wait(Duration::from_secs(10)).assert_success();

    let done =
        Vmm::start(&["run", "--restore", snap.to_str().unwrap()]).wait(Duration::from_secs(30));
    done.assert_success();
    let read = &lines(&done, "blk-read")[0];
    assert_eq!(
        read["crc32"],
        crc(&pattern(5, 8)),
        "{read}\n{}",
        done.stderr
    );
    assert_eq!(
        std::fs::read(&base).unwrap(),
        before,
        "the base is untouched"
    );
}
