//! Guest disks (`vmplant run --disk`): the test guest writes and reads
//! sectors of a raw file through virtio-blk with virtio-drivers' driver,
//! and the host checks the file; a read-only disk refuses writes and a
//! read past the end fails, the guest running on; a snapshot of a VM with
//! a disk restores with the disk. Needs root and /dev/kvm.

use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use vmplant_tests::blk::{SECTORS, crc, disk, lines, pattern, run};
use vmplant_tests::{Vmm, vmplant};

#[test]
fn the_guest_writes_and_reads_sectors_of_a_raw_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), "raw.img");
    let before = std::fs::read(&path).unwrap();
    let done = run(
        "blk-info+blk-write:100:24:7+blk-read:100:24+blk-read:0:8+blk-read:8184:8",
        &[path.to_str().unwrap()],
    );
    let info = &lines(&done, "blk-info")[0];
    assert_eq!(info["sectors"], SECTORS, "{info}");
    assert_eq!(info["read_only"], false);
    assert!(
        info["serial"].as_str().unwrap().starts_with("vmplant-"),
        "{info}"
    );

    let after = std::fs::read(&path).unwrap();
    let (from, to) = (100 * 512, 124 * 512);
    let written = pattern(7, 24);
    assert!(
        after[from..to] == written[..],
        "sectors 100..124 hold the pattern"
    );
    assert!(
        after[..from] == before[..from],
        "nothing changed before them"
    );
    assert!(after[to..] == before[to..], "nothing changed after them");

    let write = &lines(&done, "blk-write")[0];
    assert_eq!(write["crc32"], crc(&written), "{write}");
    let reads = lines(&done, "blk-read");
    assert_eq!(reads.len(), 3, "{}", done.console());
    assert_eq!(reads[0]["crc32"], crc(&after[from..to]), "{}", reads[0]);
    assert_eq!(reads[1]["crc32"], crc(&after[..4096]), "{}", reads[1]);
    assert_eq!(
        reads[2]["crc32"],
        crc(&after[(SECTORS as usize - 8) * 512..]),
        "the last sectors: {}",
        reads[2]
    );
}

#[test]
fn a_read_only_disk_refuses_writes_and_the_guest_runs_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), "ro.img");
    let before = std::fs::read(&path).unwrap();
    let spec = format!("{},ro", path.display());
    let done = run("blk-info+blk-write:0:8:1+blk-read:0:8", &[&spec]);
    let info = &lines(&done, "blk-info")[0];
    assert_eq!(info["read_only"], true, "{info}");
    let write = &lines(&done, "blk-write")[0];
    assert!(write.get("error").is_some(), "the write fails: {write}");
    assert!(write.get("crc32").is_none(), "{write}");
    let read = &lines(&done, "blk-read")[0];
    assert_eq!(
        read["crc32"],
        crc(&before[..4096]),
        "reads still work: {read}"
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the file is unchanged"
    );
    assert!(
        done.stderr.contains("read-only"),
        "the refusal is logged: {}",
        done.stderr
    );
}

#[test]
fn reads_past_the_end_fail_and_the_guest_runs_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), "end.img");
    let before = std::fs::read(&path).unwrap();
    let done = run(
        &format!(
            "blk-read:{SECTORS}:1+blk-read:{}:2+blk-write:{SECTORS}:1:3+blk-read:1:1",
            SECTORS - 1
        ),
        &[path.to_str().unwrap()],
    );
    let reads = lines(&done, "blk-read");
    assert_eq!(reads.len(), 3, "{}", done.console());
    for r in &reads[..2] {
        assert!(r.get("error").is_some(), "past the end: {r}");
    }
    assert!(lines(&done, "blk-write")[0].get("error").is_some());
    assert_eq!(reads[2]["crc32"], crc(&before[512..1024]), "{}", reads[2]);
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert!(done.events().iter().any(|v| v["probe"] == "shutdown"));
}

/// A guest that sends requests no driver should (too short, partial
/// sectors, past the end, unknown, outside its memory, no writable
/// status) gets an error status for each it can, the device keeps
/// working (no reset needed) and the VM runs on.
#[test]
fn malformed_requests_get_error_statuses_and_the_disk_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), "hostile.img");
    let before = std::fs::read(&path).unwrap();
    let done = run("hostile-blk+blk-read:2:1", &[path.to_str().unwrap()]);
    let h = &lines(&done, "hostile-blk")[0];
    // IOERR 1, UNSUPP 2, untouched 255, OK 0.
    assert_eq!(
        h["status"],
        serde_json::json!([1, 1, 1, 2, 1, 255, 0]),
        "{h}"
    );
    assert_eq!(h["used"], serde_json::json!([1, 1, 1, 1, 1, 0, 513]), "{h}");
    assert_eq!(h["needs_reset"], false, "{h}");
    let read = &lines(&done, "blk-read")[0];
    assert_eq!(read["crc32"], crc(&before[1024..1536]), "{read}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert!(!done.stderr.contains("panicked"), "{}", done.stderr);
}

/// `,iops=50`: 100 random reads take the one-second burst of 50, then
/// 50 more at 50/s; `,bps=1048576`: two 1 MiB reads take the burst,
/// then wait a second. Unlimited, either takes milliseconds.
#[test]
fn rate_limits_hold_a_disk_to_its_requests_and_bytes_per_second() {
    let dir = tempfile::tempdir().unwrap();
    let a = disk(dir.path(), "iops.img");
    let b = disk(dir.path(), "bps.img");
    let done = run(
        "blk-rand-read:100:4096:0+blk-seq-read:2:1",
        &[
            &format!("{},iops=50", a.display()),
            &format!("{},bps=1048576", b.display()),
        ],
    );
    let rand = &lines(&done, "blk-rand-read")[0];
    let iops = rand["iops"].as_u64().unwrap();
    assert!((40..=120).contains(&iops), "{rand}");
    let seq = &lines(&done, "blk-seq-read")[0];
    let ms = seq["ns"].as_u64().unwrap() / 1_000_000;
    assert!((900..=1500).contains(&ms), "{seq}");
}

/// `"disks"` in a `--config` entry, a relative path being the file's.
#[test]
fn a_config_file_gives_its_vms_their_disks() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), "a.img");
    disk(dir.path(), "b.img");
    let before = std::fs::read(&path).unwrap();
    let config = dir.path().join("vms.json");
    let vm = |name: &str, steps: &str, disks: &[&str]| {
        serde_json::json!({
            "name": name,
            "kernel": vmplant_tests::probe_elf(),
            "cmdline": format!("console=ttyS0 probe={steps}+shutdown"),
            "disks": disks,
        })
    };
    let vms = serde_json::json!({"vms": [
        vm("w", "blk-write:0:8:9", &["a.img"]),
        vm("r", "blk-info", &["b.img,ro"]),
    ]});
    std::fs::write(&config, vms.to_string()).unwrap();
    let done =
        Vmm::start(&["run", "--config", config.to_str().unwrap()]).wait(Duration::from_secs(30));
    done.assert_success();
    let (_, w) = done.vm_event("w", "blk-write");
    assert_eq!(w["crc32"], crc(&pattern(9, 8)), "{w}");
    let (_, r) = done.vm_event("r", "blk-info");
    assert_eq!(r["read_only"], true, "{r}");
    let after = std::fs::read(&path).unwrap();
    assert!(after[..4096] == pattern(9, 8)[..]);
    assert!(after[4096..] == before[4096..]);
}

#[test]
fn a_missing_disk_or_a_bad_option_is_a_one_line_error() {
    let bad = |spec: &str, what: &str| {
        let out = Command::new(vmplant())
            .args(["run", "--kernel"])
            .arg(vmplant_tests::probe_elf())
            .args(["--no-stdin", "--disk", spec])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{spec}: {err}");
        assert!(err.contains(what), "{spec}: {err:?} lacks {what:?}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(out.stdout.is_empty(), "no guest ran");
    };
    bad(
        "/nonexistent/disk.img",
        "cannot open the disk \"/nonexistent/disk.img\": No such file or directory",
    );
    bad("/tmp/x.img,rw", "unknown disk option \"rw\"");
    bad(
        "/tmp/x.img,iops=0",
        "\"iops=0\" wants a whole number above 0",
    );
    // One file, two read-write disks: it is locked by the first.
    let dir = tempfile::tempdir().unwrap();
    let twice = disk(dir.path(), "twice.img");
    let out = Command::new(vmplant())
        .args(["run", "--kernel"])
        .arg(vmplant_tests::probe_elf())
        .args(["--no-stdin", "--disk"])
        .arg(&twice)
        .arg("--disk")
        .arg(&twice)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("is in use by another VM"), "{err}");
}

/// `vmplant vm --control CONTROL ARGS...`, which must succeed: what it
/// printed.
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

#[test]
fn a_snapshot_of_a_vm_with_a_disk_restores_with_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), "snap.img");
    let snap = dir.path().join("snap");
    let control = dir.path().join("vm.sock");
    // Writes, then ticks while it is saved, then reads back after the
    // restore.
    let mut vmm = Vmm::probe(
        "blk-write:16:8:5+tick:100:8+blk-read:16:8+shutdown",
        &[
            "--disk",
            path.to_str().unwrap(),
            "--control",
            control.to_str().unwrap(),
        ],
    );
    vmm.expect_line("a tick", Duration::from_secs(30), |l| {
        l.contains(r#""probe":"tick""#)
    });
    let info: Value = serde_json::from_str(&vm(&control, &["info"])).unwrap();
    assert_eq!(
        info["devices"][0],
        serde_json::json!({"type": "blk", "path": path, "read_only": false, "sectors": SECTORS}),
        "{info}"
    );
    vm(&control, &["snapshot", snap.to_str().unwrap(), "--stop"]);
    let before = vmm.wait(Duration::from_secs(10));
    before.assert_success();
    assert!(
        lines(&before, "blk-read").is_empty(),
        "saved before the read"
    );
    let written = pattern(5, 8);
    assert_eq!(lines(&before, "blk-write")[0]["crc32"], crc(&written));

    // Another disk of another size is refused, with the reason.
    let small = dir.path().join("small.img");
    std::fs::write(&small, vec![0u8; 1 << 20]).unwrap();
    let refused = Vmm::start(&[
        "run",
        "--restore",
        snap.to_str().unwrap(),
        "--disk",
        small.to_str().unwrap(),
    ])
    .wait(Duration::from_secs(10));
    assert_eq!(refused.status.code(), Some(1), "{}", refused.stderr);
    assert!(
        refused.stderr.contains("8192 sectors"),
        "{}",
        refused.stderr
    );
    assert!(refused.lines.is_empty());

    // The snapshot alone reopens the disk; the guest reads what it wrote.
    let done =
        Vmm::start(&["run", "--restore", snap.to_str().unwrap()]).wait(Duration::from_secs(30));
    done.assert_success();
    let read = &lines(&done, "blk-read")[0];
    assert_eq!(read["crc32"], crc(&written), "{read}\n{}", done.console());
    assert!(
        !done.lines.iter().any(|l| l.contains(r#""probe":"ready""#)),
        "no new boot"
    );

    // A copy of the disk given with --disk: the guest reads the copy.
    let copy = dir.path().join("copy.img");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[16 * 512..24 * 512].fill(0x11);
    std::fs::write(&copy, &bytes).unwrap();
    let done = Vmm::start(&[
        "run",
        "--restore",
        snap.to_str().unwrap(),
        "--disk",
        copy.to_str().unwrap(),
    ])
    .wait(Duration::from_secs(30));
    done.assert_success();
    let read = &lines(&done, "blk-read")[0];
    assert_eq!(read["crc32"], crc(&[0x11; 8 * 512]), "{read}");
}

/// `,poll=US`: the device polls the queue after each request (the guest
/// then sends the next without a kick); the bytes are the same, and the
/// disk goes back to kicks when the guest stops.
#[test]
fn a_polled_disk_reads_and_writes_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), "polled.img");
    let before = std::fs::read(&path).unwrap();
    let spec = format!("{},poll=200", path.display());
    let done = run(
        "blk-write:100:24:7+blk-rand-read:2000:4096+blk-read:100:24+tick:100:2+blk-read:0:8+blk-seq-read:16",
        &[&spec],
    );
    let reads = lines(&done, "blk-read");
    assert_eq!(reads[0]["crc32"], crc(&pattern(7, 24)), "{}", reads[0]);
    assert_eq!(
        reads[1]["crc32"],
        crc(&before[..4096]),
        "after idling: {}",
        reads[1]
    );
    assert_eq!(lines(&done, "blk-rand-read")[0]["count"], 2000);
    assert_eq!(lines(&done, "blk-seq-read")[0]["mib"], 16);
    let after = std::fs::read(&path).unwrap();
    assert!(after[100 * 512..124 * 512] == pattern(7, 24)[..]);
}
