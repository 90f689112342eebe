//! Snapshots as a user takes them: `vmplant vm snapshot DIR --stop` on a
//! running test guest, then `vmplant run --restore DIR` in a new process,
//! where the guest goes on counting from where it was (no new boot); and
//! damaged snapshot files refused with one-line errors. Needs root and
//! /dev/kvm.

use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;
use vmplant_tests::{Vmm, assert_went_on, tick_n, ticks_after, vmplant};

/// Counts for minutes, printing every 3 * 10^8 counts (about 0.1 s).
const EVERY: u64 = 300_000_000;

fn vm(control: &Path, args: &[&str]) -> Output {
    Command::new(vmplant())
        .args(["vm", "--control"])
        .arg(control)
        .args(args)
        .output()
        .unwrap()
}

/// `vmplant vm --control CONTROL snapshot DIR --stop`, which must succeed:
/// what it printed.
fn snapshot_stop(control: &Path, dir: &Path) -> Output {
    let out = vm(control, &["snapshot", dir.to_str().unwrap(), "--stop"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Boots the test guest with `probe=STEPS`, the extra `vmplant run`
/// flags, and its control socket at `control`.
fn probe_with_control(control: &Path, steps: &str, extra: &[&str]) -> Vmm {
    let mut args = extra.to_vec();
    args.extend(["--control", control.to_str().unwrap()]);
    Vmm::probe(steps, &args)
}

fn count_at(line: &str) -> Option<u64> {
    let v: Value = serde_json::from_str(line).ok()?;
    (v["probe"] == "count").then(|| v["at"].as_u64())?
}

/// Boots a counting guest with `vcpus`, snapshots it into `dir` with
/// `--stop`, and returns the last count it printed.
fn snapshot_a_counting_guest(dir: &Path, vcpus: &str, steps: &str) -> u64 {
    let control = dir.with_extension("sock");
    let mut vmm = probe_with_control(
        &control,
        &format!("{steps}count:100000000000000:{EVERY}"),
        &["--vcpus", vcpus, "--mem", "64"],
    );
    vmm.expect_line("a count line", Duration::from_secs(30), |l| {
        count_at(l).is_some()
    });
    let out = snapshot_stop(&control, dir);
    let saved: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(saved["memory_bytes"], 64 << 20);
    let data = saved["memory_data_bytes"].as_u64().unwrap();
    assert!(
        data < 8 << 20,
        "{data} bytes of a 64 MiB guest that used little"
    );
    let done = vmm.wait(Duration::from_secs(10));
    assert_eq!(done.status.code(), Some(0), "{}", done.stderr);
    done.lines
        .iter()
        .filter_map(|l| count_at(l))
        .max()
        .expect("counted")
}

/// A guest that fills memory and ticks is saved after two ticks and
/// restored in a new process: it ticks on from 3 (no new boot), and the
/// memory it filled before verifies after.
fn restore_goes_on(vcpus: &str, smp: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snap");
    let control = tmp.path().join("vm.sock");
    let mut vmm = probe_with_control(
        &control,
        &format!("{smp}fill:16:3+tick:100:12+verify:16:3+shutdown"),
        &["--vcpus", vcpus, "--mem", "64"],
    );
    vmm.expect_line("tick 2", Duration::from_secs(30), |l| tick_n(l) == Some(2));
    let out = snapshot_stop(&control, &dir);
    let saved: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(saved["memory_bytes"], 64 << 20);
    let data = saved["memory_data_bytes"].as_u64().unwrap();
    assert!(
        (16 << 20..24 << 20).contains(&data),
        "{data} bytes saved of a guest that filled 16 MiB"
    );
    let before = vmm.wait(Duration::from_secs(10));
    assert_eq!(before.status.code(), Some(0), "{}", before.stderr);
    // On disk, the memory file is sparse: about what the guest used.
    use std::os::unix::fs::MetadataExt;
    let disk = std::fs::metadata(dir.join("memory")).unwrap().blocks() * 512;
    assert!(disk < 24 << 20, "the memory file takes {disk} bytes");

    let done =
        Vmm::start(&["run", "--restore", dir.to_str().unwrap()]).wait(Duration::from_secs(30));
    done.assert_success();
    assert_went_on(&before.lines, &done, 12, "restored");
}

/// The first restore that runs for a second records the pages its guest
/// touched as the snapshot's working set (REAP): a small file naming a few
/// runs of pages, for this snapshot, which later restores read ahead; a
/// later restore goes on as well.
#[test]
fn a_restore_records_the_working_set_that_later_restores_read_ahead() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snap");
    let control = tmp.path().join("vm.sock");
    let mut vmm = probe_with_control(&control, "fill:8:3+tick:100", &["--mem", "64"]);
    vmm.expect_line("tick 2", Duration::from_secs(30), |l| tick_n(l) == Some(2));
    snapshot_stop(&control, &dir);
    vmm.wait(Duration::from_secs(10));
    let ws = dir.join("working-set");
    assert!(!ws.exists());
    let mut restored = Vmm::start(&["run", "--restore", dir.to_str().unwrap()]);
    restored.expect_line("tick 15", Duration::from_secs(30), |l| {
        tick_n(l) == Some(15)
    });
    restored.kill();
    let bytes = std::fs::read(&ws).expect("a working set after a second of running");
    assert_eq!(&bytes[..8], b"VMPLWSET");
    let runs = u32::from_le_bytes(bytes[24..28].try_into().unwrap()) as usize;
    assert_eq!(bytes.len(), 28 + 8 * runs);
    let pages: u64 = bytes[28..]
        .chunks_exact(8)
        .map(|c| u64::from(u32::from_le_bytes(c[4..8].try_into().unwrap())))
        .sum();
    // The ticking guest's code, stacks and tables: not the 8 MiB it filled.
    assert!(
        (1..512).contains(&pages),
        "{pages} pages in the working set"
    );
    let mut again = Vmm::start(&["run", "--restore", dir.to_str().unwrap()]);
    again.expect_line("a tick", Duration::from_secs(30), |l| tick_n(l).is_some());
    again.kill();
}

#[test]
fn a_ticking_guest_goes_on_after_restore() {
    restore_goes_on("1", "");
}

#[test]
fn a_guest_with_two_vcpus_goes_on_after_restore() {
    restore_goes_on("2", "smp+");
}

/// Twenty clones of one snapshot run at once on one switch, each with the
/// MAC it was given and a generation ID of its own, each with the memory
/// the original filled.
#[test]
fn twenty_clones_run_with_their_own_macs_and_generation_ids() {
    const CLONES: usize = 20;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snap");
    let control = tmp.path().join("vm.sock");
    let mut base = probe_with_control(
        &control,
        "fill:8:5+tick:100:6+identity+verify:8:5+shutdown",
        &["--mem", "48", "--net", "52:54:00:00:01:00"],
    );
    base.expect_line("tick 1", Duration::from_secs(30), |l| tick_n(l) == Some(1));
    snapshot_stop(&control, &dir);
    assert_eq!(base.wait(Duration::from_secs(10)).status.code(), Some(0));

    let mac = |i: usize| format!("52:54:00:00:02:{i:02x}");
    let vms: Vec<Value> = (0..CLONES)
        .map(|i| serde_json::json!({"name": format!("c{i}"), "restore": dir, "nets": [mac(i)]}))
        .collect();
    let config = tmp.path().join("vms.json");
    std::fs::write(&config, serde_json::json!({ "vms": vms }).to_string()).unwrap();
    let done =
        Vmm::start(&["run", "--config", config.to_str().unwrap()]).wait(Duration::from_secs(60));
    done.assert_success();
    let mut ids = std::collections::HashSet::new();
    for i in 0..CLONES {
        let name = format!("c{i}");
        let (_, identity) = done.vm_event(&name, "identity");
        assert_eq!(identity["macs"], serde_json::json!([mac(i)]), "{name}");
        let id = identity["vmgenid"]
            .as_str()
            .expect("a generation ID")
            .to_string();
        assert_eq!(id.len(), 32);
        ids.insert(id);
        let (_, verify) = done.vm_event(&name, "verify");
        assert_eq!(verify["ok"], true, "{name}: {verify}");
    }
    assert_eq!(ids.len(), CLONES, "every clone has its own generation ID");
}

/// A guest learns that its generation ID changed the way Linux's ACPI
/// generic event device driver does: the interrupt the DSDT gives for the
/// device comes once after each restore, with the new ID already in
/// place, and never while the original runs.
#[test]
fn each_restored_clone_is_told_its_generation_id_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snap");
    let control = tmp.path().join("vm.sock");
    let mut base = probe_with_control(&control, "vmgenid-watch:20", &["--mem", "32"]);
    let watch = base.expect_line("the watch armed", Duration::from_secs(30), |l| {
        l.contains(r#""probe":"vmgenid-watch""#)
    });
    let watch: Value = serde_json::from_str(&watch).unwrap();
    let original = watch["vmgenid"]
        .as_str()
        .expect("a generation ID")
        .to_string();
    let quiet = base.lines_for(Duration::from_millis(300));
    assert!(
        !quiet.iter().any(|l| l.contains("vmgenid-changed")),
        "a notification without a restore: {quiet:?}"
    );
    snapshot_stop(&control, &dir);
    base.wait(Duration::from_secs(10));

    let mut ids = vec![original];
    for _ in 0..2 {
        let mut clone = Vmm::start(&["run", "--restore", dir.to_str().unwrap()]);
        let line = clone.expect_line("the notification", Duration::from_secs(10), |l| {
            l.contains("vmgenid-changed")
        });
        let changed: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(changed["interrupts"], 1, "{line}");
        let id = changed["vmgenid"].as_str().expect("a generation ID");
        assert!(
            !ids.iter().any(|old| old == id),
            "{id} seen before: {ids:?}"
        );
        ids.push(id.to_string());
        clone.kill();
    }
}

/// Runs `vmplant run --restore DIR` and expects a one-line error naming
/// `what`, exit 1, and no guest output.
fn refused(dir: &Path, what: &str) {
    let done =
        Vmm::start(&["run", "--restore", dir.to_str().unwrap()]).wait(Duration::from_secs(10));
    assert_eq!(done.status.code(), Some(1), "{what}: {}", done.stderr);
    let errors: Vec<&str> = done
        .stderr
        .lines()
        .filter(|l| l.starts_with("vmplant: "))
        .collect();
    assert_eq!(errors.len(), 1, "{}", done.stderr);
    assert!(errors[0].contains(what), "{:?} lacks {what:?}", errors[0]);
    assert!(done.lines.is_empty(), "a guest ran: {:?}", done.lines);
    assert!(!done.stderr.contains("panicked"));
}

#[test]
fn damaged_snapshots_are_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good");
    snapshot_a_counting_guest(&good, "1", "");
    let state = std::fs::read(good.join("state")).unwrap();
    let damaged = |name: &str, state: &[u8]| {
        let dir = tmp.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("state"), state).unwrap();
        std::fs::copy(good.join("memory"), dir.join("memory")).unwrap();
        dir
    };
    refused(
        &damaged("truncated", &state[..state.len() / 2]),
        "is truncated",
    );
    let mut bad = state.clone();
    bad[state.len() / 2] ^= 1;
    refused(
        &damaged("corrupted", &bad),
        "is corrupted (checksum mismatch)",
    );
    let mut bad = state.clone();
    bad[8] = 99;
    refused(&damaged("version", &bad), "snapshot format version 99");
    let mut bad = state.clone();
    bad[0] = b'X';
    refused(&damaged("magic", &bad), "not a vmplant snapshot state file");
    let dir = damaged("memory", &state);
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("memory"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    refused(&dir, "is 1048576 bytes, but the snapshot's is 67112960");
    refused(&tmp.path().join("missing"), "cannot read the state file");
}

/// A guest with a NIC, serving pings, is saved and restored next to a
/// new guest on the same switch, which pings it.
#[test]
fn a_guest_with_a_nic_answers_pings_after_restore() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snap");
    let control = tmp.path().join("a.sock");
    let mut a = probe_with_control(
        &control,
        "net:10.0.0.1/24+serve:8+shutdown",
        &["--mem", "64", "--net", "52:54:00:00:00:0a"],
    );
    a.expect_line("the NIC up", Duration::from_secs(30), |l| {
        l.contains(r#""probe":"net""#)
    });
    snapshot_stop(&control, &dir);
    assert_eq!(a.wait(Duration::from_secs(10)).status.code(), Some(0));

    let config = tmp.path().join("vms.json");
    let spec = serde_json::json!({"vms": [
        {"name": "a", "restore": dir},
        {"name": "b", "kernel": vmplant_tests::probe_elf(), "mem_mib": 64,
         "nets": ["52:54:00:00:00:0b"],
         "cmdline": "console=ttyS0 probe=net:10.0.0.2/24+ping:10.0.0.1:5+shutdown"},
    ]});
    std::fs::write(&config, spec.to_string()).unwrap();
    let done =
        Vmm::start(&["run", "--config", config.to_str().unwrap()]).wait(Duration::from_secs(60));
    done.assert_success();
    let (_, ping) = done.vm_event("b", "ping");
    assert_eq!(
        (ping["sent"].as_u64(), ping["received"].as_u64()),
        (Some(5), Some(5)),
        "{ping}"
    );
    let (_, serve) = done.vm_event("a", "serve");
    assert!(serve["rx"].as_u64().unwrap() >= 5, "{serve}");
    assert!(
        done.vm_events("a")
            .iter()
            .all(|(_, v)| v["probe"] != "ready"),
        "the restored guest booted again"
    );
}

/// Deterministic pseudo-random bytes (xorshift64*).
fn random_bytes(n: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        out.extend_from_slice(&seed.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(n);
    out
}

/// The probe's lines of kind `kind`.
fn events_of(done: &vmplant_tests::Finished, kind: &str) -> Vec<Value> {
    done.events()
        .into_iter()
        .filter(|v| v["probe"] == kind)
        .collect()
}

/// What a restored guest on a share shows: it ticks on from `last`, reads
/// the file again with the host's CRC and writes one that lands on
/// `export`, without a new boot (no `ready` line) or a new FUSE_INIT (no
/// `fs` line: its device stayed up).
fn check_restored_share_io(
    done: &vmplant_tests::Finished,
    before: &[String],
    export: &Path,
    crc: &str,
) {
    done.assert_success();
    let (last, ticks) = ticks_after(before, &done.lines);
    assert_eq!(ticks, (last + 1..=12).collect::<Vec<_>>(), "ticks go on");
    for kind in ["ready", "fs"] {
        assert!(
            events_of(done, kind).is_empty(),
            "a {kind} line after the restore: {:?}",
            done.lines
        );
    }
    let reads = events_of(done, "fs-read");
    assert_eq!(reads.len(), 1, "{:?}", done.lines);
    assert_eq!(
        (reads[0]["bytes"].as_u64(), reads[0]["crc32"].as_str()),
        (Some(SHARED as u64), Some(crc)),
        "{}",
        reads[0]
    );
    let writes = events_of(done, "fs-write");
    assert_eq!(writes.len(), 1, "{:?}", done.lines);
    assert!(writes[0].get("error").is_none(), "{}", writes[0]);
    let expected: Vec<u8> = (0..WRITTEN).map(|i| (i % 251) as u8).collect();
    let on_export = std::fs::read(export.join("out.bin")).expect("/out.bin on the export");
    assert!(
        on_export == expected,
        "/out.bin on the export is not the pattern"
    );
}

/// Bytes of the file the guest reads through its share.
const SHARED: usize = 300_000 + 17;
/// Bytes of the file it writes.
const WRITTEN: usize = 100_000;

/// A guest that mounted a virtio-fs share and read a file through it is
/// saved while it ticks and restored in a new process: the share is
/// connected again from the snapshot (its session, node ids and all, come
/// back with the device), and the guest reads the file again and writes
/// one. Restored again with `--fs` naming another server for the same
/// tag, it uses that one.
#[test]
fn a_guest_uses_its_file_share_after_restore() {
    let tmp = tempfile::tempdir().unwrap();
    let content = random_bytes(SHARED, 0x5eed ^ u64::from(std::process::id()));
    let crc = format!("{:08x}", crc32fast::hash(&content));
    let export_dir = |name: &str| {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(dir.join("export")).unwrap();
        std::fs::write(dir.join("export/data.bin"), &content).unwrap();
        dir
    };
    let (first, second) = (export_dir("gvfs1"), export_dir("gvfs2"));
    let server = vmplant_tests::GvfsServer::start(&first);
    let dir = tmp.path().join("snap");
    let control = tmp.path().join("vm.sock");
    let mut vmm = probe_with_control(
        &control,
        "fs-read:/data.bin+tick:100:12+fs-read:/data.bin+fs-write:/out.bin:100000+shutdown",
        &["--mem", "64", "--fs", &server.share("data")],
    );
    let read = vmm.expect_line("the first read", Duration::from_secs(30), |l| {
        l.contains(r#""probe":"fs-read""#)
    });
    let read: Value = serde_json::from_str(&read).unwrap();
    assert_eq!(read["crc32"], crc.as_str(), "{read}");
    vmm.expect_line("tick 2", Duration::from_secs(30), |l| tick_n(l) == Some(2));
    snapshot_stop(&control, &dir);
    let before = vmm.wait(Duration::from_secs(10));
    assert_eq!(before.status.code(), Some(0), "{}", before.stderr);
    assert!(
        !first.join("export/out.bin").exists(),
        "written before the snapshot"
    );

    // The share comes back from the snapshot alone.
    let done =
        Vmm::start(&["run", "--restore", dir.to_str().unwrap()]).wait(Duration::from_secs(60));
    check_restored_share_io(&done, &before.lines, &first.join("export"), &crc);

    // And with --fs, from another server exporting the same files.
    let other = vmplant_tests::GvfsServer::start(&second);
    let done = Vmm::start(&[
        "run",
        "--restore",
        dir.to_str().unwrap(),
        "--fs",
        &other.share("data"),
    ])
    .wait(Duration::from_secs(60));
    check_restored_share_io(&done, &before.lines, &second.join("export"), &crc);

    // --fs for another tag is refused.
    let done = Vmm::start(&[
        "run",
        "--restore",
        dir.to_str().unwrap(),
        "--fs",
        &other.share("home"),
    ])
    .wait(Duration::from_secs(10));
    assert_eq!(done.status.code(), Some(1), "{}", done.stderr);
    assert!(done.stderr.contains(r#"tag "home""#), "{}", done.stderr);
    assert!(done.lines.is_empty(), "a guest ran: {:?}", done.lines);
    drop((server, other));
}

/// A vhost-user-fs share keeps its state in its backend: the snapshot
/// fails saying so, and the guest runs on.
/// The same guest moved live to another process (`vmplant vm migrate`):
/// the destination connects the share again (given with `--fs`: over
/// plain tcp: it takes no host files from the sender, and refuses a VM
/// with a share without it), and the guest reads and writes through it
/// there, its session and open files as they were.
#[test]
fn a_guest_uses_its_file_share_after_migration() {
    let tmp = tempfile::tempdir().unwrap();
    let content = random_bytes(SHARED, 0x5eed ^ u64::from(std::process::id()) ^ 7);
    let crc = format!("{:08x}", crc32fast::hash(&content));
    let export = tmp.path().join("gvfs/export");
    std::fs::create_dir_all(&export).unwrap();
    std::fs::write(export.join("data.bin"), &content).unwrap();
    let server = vmplant_tests::GvfsServer::start(&tmp.path().join("gvfs"));
    let control = tmp.path().join("vm.sock");
    let mut vmm = probe_with_control(
        &control,
        "fs-read:/data.bin+tick:100:12+fs-read:/data.bin+fs-write:/out.bin:100000+shutdown",
        &["--mem", "64", "--fs", &server.share("data")],
    );
    vmm.expect_line("tick 2", Duration::from_secs(30), |l| tick_n(l) == Some(2));
    // Over plain tcp:, a destination takes no host files from the sender:
    // without --fs it refuses the VM, which runs on at the source.
    let (refusing, to) = vmplant_tests::migration::destination();
    let out = vmplant_tests::migration::migrate(&control, &to, &[]);
    assert_eq!(out.status.code(), Some(1));
    let said = vmplant_tests::migration::report(&out);
    assert!(
        said["error"].as_str().unwrap_or_default().contains("--fs"),
        "{said}"
    );
    assert_ne!(
        refusing.wait(Duration::from_secs(10)).status.code(),
        Some(0)
    );
    let share = server.share("data");
    let (dest, to) = vmplant_tests::migration::destination_with("tcp", &["--fs", &share]);
    let out = vmplant_tests::migration::migrate(&control, &to, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before = vmm.wait(Duration::from_secs(10));
    assert_eq!(before.status.code(), Some(0), "{}", before.stderr);
    let done = dest.wait(Duration::from_secs(60));
    check_restored_share_io(&done, &before.lines, &export, &crc);
}

#[test]
fn a_vm_with_a_vhost_user_share_is_refused_and_runs_on() {
    use std::process::Stdio;
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("export");
    std::fs::create_dir_all(&export).unwrap();
    let socket = tmp.path().join("virtiofsd.sock");
    let mut backend = vmplant_tests::Process {
        child: Command::new(vmplant_tests::virtiofsd())
            .arg("--shared-dir")
            .arg(&export)
            .arg("--socket-path")
            .arg(&socket)
            .args(["--sandbox", "none", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot start virtiofsd"),
        dir: tmp.path().join("backend"),
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(
            backend.child.try_wait().unwrap().is_none(),
            "virtiofsd exited"
        );
        assert!(std::time::Instant::now() < deadline, "no virtiofsd socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let control = tmp.path().join("vm.sock");
    let mut vmm = Vmm::probe(
        &format!("count:100000000000000:{EVERY}"),
        &[
            "--mem",
            "64",
            "--vhost-user-fs",
            &format!("data={}", socket.display()),
            "--control",
            control.to_str().unwrap(),
        ],
    );
    vmm.expect_line("a count line", Duration::from_secs(30), |l| {
        count_at(l).is_some()
    });
    let out = vm(
        &control,
        &["snapshot", tmp.path().join("s").to_str().unwrap()],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the vhost-user-fs share \"data\" keeps its state in its backend"),
        "{stderr}"
    );
    vmm.expect_line(
        "a count line after the refusal",
        Duration::from_secs(10),
        |l| count_at(l).is_some(),
    );
    assert!(vm(&control, &["stop"]).status.success());
    assert_eq!(vmm.wait(Duration::from_secs(10)).status.code(), Some(0));
    drop(backend);
}

/// A VM restored from DIR is snapshotted into DIR again while it runs:
/// the new files replace the old whole, so the running VM (which maps the
/// old memory file) goes on intact, and a restore of the new snapshot
/// goes on from where it was taken.
#[test]
fn a_restored_vm_snapshotted_into_its_own_dir_runs_on() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snap");
    let control = tmp.path().join("base.sock");
    let steps = "fill:8:9+tick:100:25+verify:8:9+shutdown";
    let mut base = probe_with_control(&control, steps, &["--mem", "48"]);
    base.expect_line("tick 1", Duration::from_secs(30), |l| tick_n(l) == Some(1));
    snapshot_stop(&control, &dir);
    assert_eq!(base.wait(Duration::from_secs(10)).status.code(), Some(0));

    let control = tmp.path().join("a.sock");
    let mut a = Vmm::start(&[
        "run",
        "--restore",
        dir.to_str().unwrap(),
        "--control",
        control.to_str().unwrap(),
    ]);
    a.expect_line("tick 4", Duration::from_secs(30), |l| tick_n(l) == Some(4));
    let out = vm(&control, &["snapshot", dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a = a.wait(Duration::from_secs(30));
    a.assert_success();
    let verify = a
        .events()
        .into_iter()
        .find(|v| v["probe"] == "verify")
        .expect("verify");
    assert_eq!(
        verify["ok"], true,
        "the running VM's memory changed: {verify}"
    );

    let b = Vmm::start(&["run", "--restore", dir.to_str().unwrap()]).wait(Duration::from_secs(30));
    b.assert_success();
    let ticks: Vec<u64> = b.lines.iter().filter_map(|l| tick_n(l)).collect();
    assert!(
        ticks.first().is_some_and(|&n| n >= 5) && ticks.last() == Some(&25),
        "{ticks:?}"
    );
    let verify = b
        .events()
        .into_iter()
        .find(|v| v["probe"] == "verify")
        .expect("verify");
    assert_eq!(verify["ok"], true, "{verify}");
    // Nothing half-written is left behind: the state, the memory, and the
    // working set a restore recorded.
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "working-set")
        .collect();
    names.sort();
    assert_eq!(names, ["memory", "state"]);
}
