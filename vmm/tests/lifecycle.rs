//! The vCPU state machine on a real guest: the test guest counts and
//! prints progress; while paused its console must not move, after resume
//! it must, and a stop from the owner ends the VM with `Stopped`.
//!
//! Needs /dev/kvm and the test guest (tests/probe/build.sh).

use std::path::PathBuf;
use std::time::{Duration, Instant};
use vmm::{SerialOutput, Vm, VmConfig, VmExit};

fn probe() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/probe/probe.elf");
    assert!(p.is_file(), "{p:?} is missing: run tests/probe/build.sh");
    p
}

fn console_len(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn wait_for_growth(path: &std::path::Path, from: u64, timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        let len = console_len(path);
        if len > from {
            return len;
        }
        assert!(
            Instant::now() < deadline,
            "the console did not move in {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn pause_freezes_the_guest_and_resume_lets_it_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console");
    let mut config = VmConfig::new(probe());
    // Count for about a minute, printing every ~10^7 iterations.
    config.cmdline = Some("console=ttyS0 probe=count:100000000000:10000000".into());
    config.vcpus = 2;
    config.serial = SerialOutput::File(console.clone());
    let vm = Vm::build(&config, Instant::now()).unwrap().start().unwrap();

    let started = wait_for_growth(&console, 0, Duration::from_secs(10));
    wait_for_growth(&console, started + 200, Duration::from_secs(10));
    vm.pause().unwrap();
    let paused_at = console_len(&console);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        console_len(&console),
        paused_at,
        "the guest ran while paused"
    );

    vm.resume().unwrap();
    wait_for_growth(&console, paused_at, Duration::from_secs(10));

    vm.stop().unwrap();
    assert_eq!(vm.wait().unwrap(), VmExit::Stopped);
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(
        text.starts_with("{\"probe\":\"ready\",\"vcpu\":0}\n"),
        "{text}"
    );
    assert!(text.contains("\"probe\":\"count\""), "{text}");
}

#[test]
fn guest_shutdown_ends_the_vm() {
    let mut config = VmConfig::new(probe());
    config.cmdline = Some("console=ttyS0 probe=shutdown".into());
    config.serial = SerialOutput::None;
    let vm = Vm::build(&config, Instant::now()).unwrap().start().unwrap();
    assert_eq!(vm.wait().unwrap(), VmExit::GuestShutdown);
}
