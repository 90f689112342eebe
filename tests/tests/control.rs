//! A VM's control socket as a user drives it with `vmplant vm`: info
//! describes the VM, pause stops its console and resume lets it go on,
//! stop ends it with status 0 and removes the socket; a missing socket
//! and one in use are one-line errors. Needs root and /dev/kvm.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;
use vmplant_tests::{Vmm, vmplant};

/// The test guest counting for minutes, printing about every 70 ms.
const COUNTING: &str = "count:1000000000000:200000000";

fn vm(control: &Path, op: &str) -> Output {
    Command::new(vmplant())
        .args(["vm", "--control"])
        .arg(control)
        .arg(op)
        .output()
        .unwrap()
}

fn is_count(line: &str) -> bool {
    line.contains(r#""probe":"count""#)
}

#[test]
fn info_pause_resume_and_stop_through_the_control_socket() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("vm.sock");
    let mut vmm = Vmm::probe(
        COUNTING,
        &[
            "--control",
            control.to_str().unwrap(),
            "--net",
            "52:54:00:00:00:2a",
            "--mem",
            "64",
        ],
    );
    vmm.expect_line("a count line", Duration::from_secs(20), is_count);

    let out = vm(&control, "info");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["state"], "running");
    assert_eq!(info["vcpus"], 1);
    assert_eq!(info["mem_mib"], 64);
    assert_eq!(info["protocol"], 1);
    assert_eq!(info["devices"][0]["type"], "net");
    assert_eq!(info["devices"][0]["mac"], "52:54:00:00:00:2a");

    assert!(vm(&control, "pause").status.success());
    let info: serde_json::Value = serde_json::from_slice(&vm(&control, "info").stdout).unwrap();
    assert_eq!(info["state"], "paused");
    // Lines written before the pause may still be on their way.
    vmm.lines_for(Duration::from_millis(300));
    let while_paused = vmm.lines_for(Duration::from_millis(700));
    assert!(
        !while_paused.iter().any(|l| is_count(l)),
        "the guest counted while paused: {while_paused:?}"
    );

    assert!(vm(&control, "resume").status.success());
    vmm.expect_line(
        "a count line after resume",
        Duration::from_secs(10),
        is_count,
    );

    assert!(vm(&control, "stop").status.success());
    let done = vmm.wait(Duration::from_secs(10));
    assert_eq!(done.status.code(), Some(0), "{}", done.stderr);
    assert!(!control.exists(), "the socket is removed when the VM ends");
}

#[test]
fn a_missing_socket_and_one_in_use_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.sock");
    let out = vm(&missing, "info");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("vmplant: cannot reach the VMM at")
            && stderr.contains("No such file or directory")
            && stderr.lines().count() == 1,
        "{stderr}"
    );

    let control = dir.path().join("vm.sock");
    let c = control.to_str().unwrap();
    let mut first = Vmm::probe(COUNTING, &["--control", c, "--mem", "64"]);
    first.expect_line("a count line", Duration::from_secs(20), is_count);
    let second =
        Vmm::probe(COUNTING, &["--control", c, "--mem", "64"]).wait(Duration::from_secs(10));
    assert_eq!(second.status.code(), Some(1), "{}", second.stderr);
    assert!(
        second.stderr.contains("is in use by a running VMM"),
        "{}",
        second.stderr
    );
    assert!(second.lines.is_empty(), "the second VM ran");
    // The first one is still served.
    assert!(vm(&control, "info").status.success());
    assert!(vm(&control, "stop").status.success());
    assert_eq!(first.wait(Duration::from_secs(10)).status.code(), Some(0));
}
