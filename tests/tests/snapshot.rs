//! Snapshots as a user takes them: `vmplant vm snapshot DIR --stop` on a
//! running test guest, then `vmplant run --restore DIR` in a new process,
//! where the guest goes on counting from where it was (no new boot); and
//! damaged snapshot files refused with one-line errors. Needs root and
//! /dev/kvm.

use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;
use vmplant_tests::{Vmm, vmplant};

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

fn count_at(line: &str) -> Option<u64> {
    let v: Value = serde_json::from_str(line).ok()?;
    (v["probe"] == "count").then(|| v["at"].as_u64())?
}

/// Boots a counting guest with `vcpus`, snapshots it into `dir` with
/// `--stop`, and returns the last count it printed.
fn snapshot_a_counting_guest(dir: &Path, vcpus: &str, steps: &str) -> u64 {
    let control = dir.with_extension("sock");
    let mut vmm = Vmm::probe(
        &format!("{steps}count:100000000000000:{EVERY}"),
        &[
            "--vcpus",
            vcpus,
            "--mem",
            "64",
            "--control",
            control.to_str().unwrap(),
        ],
    );
    vmm.expect_line("a count line", Duration::from_secs(30), |l| {
        count_at(l).is_some()
    });
    let out = vm(&control, &["snapshot", dir.to_str().unwrap(), "--stop"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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

fn restore_goes_on(vcpus: &str, steps: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snap");
    let last = snapshot_a_counting_guest(&dir, vcpus, steps);
    // On disk, the memory file is sparse: about what the guest used.
    use std::os::unix::fs::MetadataExt;
    let disk = std::fs::metadata(dir.join("memory")).unwrap().blocks() * 512;
    assert!(disk < 8 << 20, "the memory file takes {disk} bytes");

    let control = tmp.path().join("restored.sock");
    let mut restored = Vmm::start(&[
        "run",
        "--restore",
        dir.to_str().unwrap(),
        "--control",
        control.to_str().unwrap(),
    ]);
    let first = restored.expect_line("a count line", Duration::from_secs(20), |l| {
        count_at(l).is_some()
    });
    assert_eq!(
        count_at(&first),
        Some(last + EVERY),
        "it goes on from {last}"
    );
    assert!(vm(&control, &["stop"]).status.success());
    let done = restored.wait(Duration::from_secs(10));
    assert_eq!(done.status.code(), Some(0), "{}", done.stderr);
    assert!(
        !done.lines.iter().any(|l| l.contains(r#""probe":"ready""#)),
        "the restored guest booted again: {:?}",
        done.lines
    );
}

#[test]
fn a_counting_guest_goes_on_after_restore() {
    restore_goes_on("1", "");
}

#[test]
fn a_guest_with_two_vcpus_goes_on_after_restore() {
    restore_goes_on("2", "smp+");
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
    refused(
        &dir,
        "is 1048576 bytes, but the snapshot's guest has 67108864",
    );
    refused(&tmp.path().join("missing"), "cannot read the state file");
}

/// A guest with a NIC, serving pings, is saved and restored next to a
/// new guest on the same switch, which pings it.
#[test]
fn a_guest_with_a_nic_answers_pings_after_restore() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snap");
    let control = tmp.path().join("a.sock");
    let mut a = Vmm::probe(
        "net:10.0.0.1/24+serve:8+shutdown",
        &[
            "--mem",
            "64",
            "--net",
            "52:54:00:00:00:0a",
            "--control",
            control.to_str().unwrap(),
        ],
    );
    a.expect_line("the NIC up", Duration::from_secs(30), |l| {
        l.contains(r#""probe":"net""#)
    });
    let out = vm(&control, &["snapshot", dir.to_str().unwrap(), "--stop"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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

/// File shares cannot be saved yet: the snapshot fails saying so, and
/// the guest runs on.
#[test]
fn a_vm_with_a_file_share_is_refused_and_runs_on() {
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("gvfs");
    std::fs::create_dir_all(export.join("export")).unwrap();
    let server = vmplant_tests::GvfsServer::start(&export);
    let control = tmp.path().join("vm.sock");
    let mut vmm = Vmm::probe(
        &format!("count:100000000000000:{EVERY}"),
        &[
            "--mem",
            "64",
            "--fs",
            &server.share("data"),
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
        stderr.contains("virtio device 0 (type 26) cannot be saved"),
        "{stderr}"
    );
    vmm.expect_line(
        "a count line after the refusal",
        Duration::from_secs(10),
        |l| count_at(l).is_some(),
    );
    assert!(vm(&control, &["stop"]).status.success());
    assert_eq!(vmm.wait(Duration::from_secs(10)).status.code(), Some(0));
}
