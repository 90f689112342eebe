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

fn tick_n(line: &str) -> Option<u64> {
    let v: Value = serde_json::from_str(line).ok()?;
    (v["probe"] == "tick").then(|| v["n"].as_u64())?
}

/// A guest that fills memory and ticks is saved after two ticks and
/// restored in a new process: it ticks on from 3 (no new boot), and the
/// memory it filled before verifies after.
fn restore_goes_on(vcpus: &str, smp: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snap");
    let control = tmp.path().join("vm.sock");
    let mut vmm = Vmm::probe(
        &format!("{smp}fill:16:3+tick:100:12+verify:16:3+shutdown"),
        &[
            "--vcpus",
            vcpus,
            "--mem",
            "64",
            "--control",
            control.to_str().unwrap(),
        ],
    );
    vmm.expect_line("tick 2", Duration::from_secs(30), |l| tick_n(l) == Some(2));
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
        (16 << 20..24 << 20).contains(&data),
        "{data} bytes saved of a guest that filled 16 MiB"
    );
    let before = vmm.wait(Duration::from_secs(10));
    assert_eq!(before.status.code(), Some(0), "{}", before.stderr);
    let last = before.lines.iter().filter_map(|l| tick_n(l)).max().unwrap();
    // On disk, the memory file is sparse: about what the guest used.
    use std::os::unix::fs::MetadataExt;
    let disk = std::fs::metadata(dir.join("memory")).unwrap().blocks() * 512;
    assert!(disk < 24 << 20, "the memory file takes {disk} bytes");

    let done =
        Vmm::start(&["run", "--restore", dir.to_str().unwrap()]).wait(Duration::from_secs(30));
    done.assert_success();
    let ticks: Vec<u64> = done.lines.iter().filter_map(|l| tick_n(l)).collect();
    let expected: Vec<u64> = (last + 1..=12).collect();
    assert_eq!(ticks, expected, "ticks go on from {last}");
    let verify = done
        .events()
        .into_iter()
        .find(|v| v["probe"] == "verify")
        .expect("verify");
    assert_eq!(verify["ok"], true, "{verify}");
    assert!(
        !done.lines.iter().any(|l| l.contains(r#""probe":"ready""#)),
        "the restored guest booted again: {:?}",
        done.lines
    );
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
    let mut base = Vmm::probe(
        "fill:8:5+tick:100:6+identity+verify:8:5+shutdown",
        &[
            "--mem",
            "48",
            "--net",
            "52:54:00:00:01:00",
            "--control",
            control.to_str().unwrap(),
        ],
    );
    base.expect_line("tick 1", Duration::from_secs(30), |l| tick_n(l) == Some(1));
    let out = vm(&control, &["snapshot", dir.to_str().unwrap(), "--stop"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
        stderr.contains("the virtio-fs share \"data\" cannot be saved yet"),
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
