//! Booting the test guest end to end: one and two vCPUs, both entry
//! points, power off through ACPI, a triple fault, Ctrl-C, and bad input
//! on the command line.

use serde_json::json;
use std::time::Duration;
use vmplant_tests::{Vmm, probe_elf};

const BOOT: Duration = Duration::from_secs(20);

/// The probe's `shutdown` tries ACPI S5 through the FADT's sleep control
/// register before the i8042; vmplant's ACPI tables give it that register.
#[test]
fn probe_shuts_down_through_the_i8042() {
    let done = Vmm::probe("ready+shutdown:i8042", &["--vcpus", "2"]).wait(BOOT);
    done.assert_success();
    assert!(done.events().contains(&json!({"probe":"shutdown"})));
    assert!(!done.stderr.contains("through ACPI"), "{}", done.stderr);
    assert!(
        done.stderr.contains("the guest shut down"),
        "{}",
        done.stderr
    );
}

#[test]
fn probe_boots_and_powers_off_through_acpi() {
    let done = Vmm::probe("ready+shutdown", &[]).wait(BOOT);
    done.assert_success();
    let events = done.events();
    assert_eq!(events.first(), Some(&json!({"probe":"ready","vcpu":0})));
    assert!(events.contains(&json!({"probe":"shutdown"})), "{events:?}");
    assert!(
        done.stderr
            .contains("the guest asked for power off (S5) through ACPI"),
        "the VM did not end through the ACPI sleep control register: {}",
        done.stderr
    );
    // The boot-complete marker (byte 123 at 0xC000_0000) was timed.
    assert!(
        done.stderr.contains("guest boot complete"),
        "{}",
        done.stderr
    );
}

fn smp_boots(boot: &str) {
    let done = Vmm::probe("smp+shutdown", &["--vcpus", "2", "--boot", boot]).wait(BOOT);
    done.assert_success();
    let events = done.events();
    for vcpu in 0..2 {
        assert!(
            events.contains(&json!({"probe":"ready","vcpu":vcpu})),
            "vCPU {vcpu} missing: {events:?}"
        );
    }
    assert!(
        events.contains(&json!({"probe":"smp","online":2,"expected":2})),
        "{events:?}"
    );
}

#[test]
fn two_vcpus_check_in_through_the_pvh_entry() {
    smp_boots("pvh");
}

#[test]
fn two_vcpus_check_in_through_the_linux_64bit_entry() {
    smp_boots("linux64");
}

#[test]
fn guest_work_runs_at_native_speed() {
    let done = Vmm::probe("count:200000000+shutdown", &[]).wait(BOOT);
    assert!(done.status.success(), "{}", done.stderr);
    let count = done
        .events()
        .into_iter()
        .find(|e| e["probe"] == "count" && e.get("n").is_some())
        .expect("no count result");
    assert_eq!(count["n"], 200_000_000);
    // Interpreted, 2e8 iterations would take minutes; natively, well under
    // a second (about one cycle each).
    let cycles = count["cycles"].as_u64().unwrap();
    assert!(cycles < 2_000_000_000, "{cycles} cycles");
}

#[test]
fn triple_fault_stops_the_vm_with_its_own_status() {
    let done = Vmm::probe("fault", &[]).wait(BOOT);
    assert_eq!(done.status.code(), Some(2), "{}", done.stderr);
    assert!(done.events().contains(&json!({"probe":"fault"})));
    assert!(done.stderr.contains("triple-faulted"), "{}", done.stderr);
}

#[test]
fn sigint_stops_a_running_vm_cleanly() {
    let mut vmm = Vmm::probe("ready", &["--vcpus", "2"]);
    vmm.expect_line("the done line", BOOT, |l| l.contains(r#""probe":"done""#));
    vmm.signal(libc::SIGINT);
    let done = vmm.wait(Duration::from_secs(5));
    assert_eq!(done.status.code(), Some(130), "{}", done.stderr);
    assert!(
        done.stderr.contains("stopped by signal 2"),
        "{}",
        done.stderr
    );
    assert!(!done.stderr.contains("panicked"), "{}", done.stderr);
    // Logs into a pipe carry no terminal colour codes.
    assert!(!done.stderr.contains('\x1b'), "{:?}", done.stderr);
}

/// Runs `vmplant run ARGS` expecting a one-line error containing `expect`.
fn refused(args: &[&str], expect: &str) {
    let done = Vmm::start(args).wait(Duration::from_secs(10));
    assert_eq!(done.status.code(), Some(1), "{args:?}: {}", done.stderr);
    let errors: Vec<&str> = done
        .stderr
        .lines()
        .filter(|l| l.starts_with("vmplant: "))
        .collect();
    assert_eq!(errors.len(), 1, "{args:?}: {}", done.stderr);
    assert!(
        errors[0].contains(expect),
        "{args:?}: {:?} lacks {expect:?}",
        errors[0]
    );
    assert!(!done.stderr.contains("panicked"), "{}", done.stderr);
    assert!(
        done.lines.is_empty(),
        "a refused VM printed {:?}",
        done.lines
    );
}

#[test]
fn bad_input_gets_one_line_errors() {
    let probe = probe_elf();
    let probe = probe.to_str().unwrap();
    refused(
        &["run", "--kernel", "/nonexistent/vmlinux"],
        "cannot read the kernel \"/nonexistent/vmlinux\": No such file or directory",
    );
    let garbage = std::env::temp_dir().join(format!("vmplant-garbage-{}", std::process::id()));
    std::fs::write(&garbage, vec![0x5au8; 8192]).unwrap();
    refused(
        &["run", "--kernel", garbage.to_str().unwrap()],
        "neither an ELF vmlinux nor a bzImage",
    );
    // An ELF cut short after its headers.
    let bytes = std::fs::read(probe).unwrap();
    std::fs::write(&garbage, &bytes[..200]).unwrap();
    refused(
        &["run", "--kernel", garbage.to_str().unwrap()],
        "cannot load the kernel",
    );
    std::fs::remove_file(&garbage).unwrap();
    refused(&["run", "--kernel", probe, "--mem", "1"], "too small");
    refused(
        &["run", "--kernel", probe, "--mem", "100000000"],
        "but the host has",
    );
    // 2^44 MiB is 2^64 bytes: it must not wrap round to a small size.
    for (flag, mib) in [("--mem", "17592186044544"), ("--mem", "17592186044416")] {
        let done = Vmm::start(&["run", "--kernel", probe, flag, mib]).wait(Duration::from_secs(10));
        assert_eq!(done.status.code(), Some(1), "{mib}: {}", done.stderr);
        assert!(done.stderr.contains("too large"), "{mib}: {}", done.stderr);
        assert!(done.lines.is_empty(), "{mib}: the VM ran");
    }
    // (--vcpus 0 and 255 are usage errors: tests/tests/cli_exit.rs.)
    refused(
        &["run", "--kernel", probe, "--cmdline", "probe=ready\u{1}"],
        "not printable ASCII",
    );
    refused(
        &["run", "--kernel", probe, "--initrd", "/nonexistent"],
        "cannot read the initrd",
    );
}

#[test]
fn several_vms_run_in_one_process_with_their_consoles_apart() {
    let dir = std::env::temp_dir().join(format!("vmplant-two-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("vms.json");
    let probe = probe_elf();
    let spec = json!({"vms": [
        {"name": "a", "kernel": probe, "cmdline": "console=ttyS0 probe=count:1000:500+shutdown",
         "nets": ["52:54:00:00:00:0a"]},
        {"name": "b", "kernel": probe, "cmdline": "console=ttyS0 probe=smp+shutdown", "vcpus": 2,
         "serial_file": "b.console"},
    ]});
    std::fs::write(&config, spec.to_string()).unwrap();
    let done = Vmm::start(&["run", "--config", config.to_str().unwrap()]).wait(BOOT);
    done.assert_success();
    // VM a's console is on standard output behind its name.
    assert!(
        done.lines.iter().all(|l| l.starts_with("a: ")),
        "{:?}",
        done.lines
    );
    assert!(
        done.lines
            .contains(&r#"a: {"probe":"shutdown"}"#.to_string()),
        "{:?}",
        done.lines
    );
    // VM b's is in its file, next to the config.
    let b = std::fs::read_to_string(dir.join("b.console")).unwrap();
    assert!(
        b.contains(r#"{"probe":"smp","online":2,"expected":2}"#),
        "{b}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
