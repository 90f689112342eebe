//! Guests on VNET end to end: two test guests on one switch ping each
//! other and move bulk TCP data; a test guest and a Linux network
//! namespace reach each other through a TAP port.
//!
//! Needs root (TAP devices, network namespaces) and /dev/kvm. All traffic
//! stays on this machine, inside the namespaces the test makes.

use serde_json::{Value, json};
use std::process::Command;
use std::time::{Duration, Instant};
use vmplant_tests::{Finished, Vmm, probe_elf};

const RUN: Duration = Duration::from_secs(60);

/// The probe's JSON line of kind `kind` from VM `vm` ("a: {...}").
fn event(done: &Finished, vm: &str, kind: &str) -> Value {
    done.vm_event(vm, kind).1
}

fn run_pair(a_steps: &str, b_steps: &str) -> Finished {
    let dir = std::env::temp_dir().join(format!(
        "vmplant-net-{}-{}",
        std::process::id(),
        a_steps.len()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("vms.json");
    let probe = probe_elf();
    let vm = |name: &str, mac: &str, ip: &str, steps: &str| {
        json!({"name": name, "kernel": probe, "nets": [mac],
               "cmdline": format!("console=ttyS0 probe=net:{ip}/24+{steps}+shutdown")})
    };
    let spec = json!({"vms": [
        vm("a", "52:54:00:00:00:0a", "10.0.0.1", a_steps),
        vm("b", "52:54:00:00:00:0b", "10.0.0.2", b_steps),
    ]});
    std::fs::write(&config, spec.to_string()).unwrap();
    let done = Vmm::start(&["run", "--config", config.to_str().unwrap()]).wait(RUN);
    std::fs::remove_dir_all(&dir).unwrap();
    done.assert_success();
    done
}

#[test]
fn two_guests_on_one_switch_ping_each_other() {
    let done = run_pair("serve:6", "ping:10.0.0.1:5");
    let net = event(&done, "b", "net");
    assert_eq!(
        (net["mac"].as_str(), net["link"].as_bool()),
        (Some("52:54:00:00:00:0b"), Some(true))
    );
    let ping = event(&done, "b", "ping");
    assert_eq!(ping["sent"], 5);
    assert_eq!(ping["received"], 5, "{ping}");
    let serve = event(&done, "a", "serve");
    assert!(serve["rx"].as_u64().unwrap() >= 5, "{serve}");
    assert_eq!(serve["device_errors"], 0);
}

#[test]
fn two_guests_move_bulk_tcp_data_intact() {
    const BYTES: u64 = 20_000_000;
    // The sender first gives the receiver time to listen: a connection
    // to a port nobody listens on yet is refused at once.
    let done = run_pair(
        "tcp-bulk-recv:5001:40",
        &format!("serve:3+tcp-bulk-send:10.0.0.1:5001:{BYTES}"),
    );
    let sent = event(&done, "b", "tcp-bulk-send");
    let got = event(&done, "a", "tcp-bulk-recv");
    assert_eq!(sent["bytes"], BYTES);
    assert_eq!(got["bytes"], BYTES, "{got}");
    assert_eq!(got["crc32"], sent["crc32"]);
    assert_eq!(got["pattern_ok"], true);
    eprintln!("guest to guest TCP: {} Mbit/s", got["mbit_s"]);
}

/// A network namespace, deleted when dropped.
struct Netns(String);

impl Netns {
    fn new(name: &str) -> Netns {
        let _ = ip(&["netns", "del", name]);
        ip(&["netns", "add", name]).expect("cannot make a network namespace");
        Netns(name.into())
    }

    fn exec(&self, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.0]);
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

#[test]
fn guest_and_linux_namespace_ping_through_a_tap_port() {
    let tap = format!("vpt{}", std::process::id() % 100_000);
    let ns = Netns::new(&format!("vmplant-tap-{}", std::process::id()));
    let probe = probe_elf();
    let cmdline = "console=ttyS0 probe=net:10.0.9.2/24+serve:8+ping:10.0.9.1:5+shutdown";
    let vmm = Vmm::start(&[
        "run",
        "--kernel",
        probe.to_str().unwrap(),
        "--cmdline",
        cmdline,
        "--net",
        "52:54:00:00:09:02",
        "--tap",
        &tap,
    ]);
    // The switch makes the TAP; move it into the namespace and address it.
    let deadline = Instant::now() + Duration::from_secs(20);
    while ip(&["link", "show", &tap]).is_err() {
        assert!(Instant::now() < deadline, "the TAP {tap} never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    ip(&["link", "set", &tap, "netns", &ns.0]).unwrap();
    for args in [
        vec!["ip", "addr", "add", "10.0.9.1/24", "dev", &tap],
        vec!["ip", "link", "set", &tap, "up"],
    ] {
        let out = ns.exec(&args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Linux pings the guest while it serves.
    let out = ns.exec(&["ping", "-c", "3", "-W", "2", "10.0.9.2"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ping from the namespace failed:\n{text}"
    );
    // Then the guest pings Linux.
    let done = vmm.wait(RUN);
    done.assert_success();
    let ping = done
        .events()
        .into_iter()
        .find(|e| e["probe"] == "ping")
        .expect("no ping line");
    assert!(ping["received"].as_u64().unwrap() >= 4, "{ping}");
}

/// virtio-drivers writes ACKNOWLEDGE | DRIVER in one status write; the
/// device must accept that as well as Linux's one bit at a time.
#[test]
fn the_device_comes_up_under_virtio_drivers_own_initialisation() {
    let probe = probe_elf();
    let done = Vmm::start(&[
        "run",
        "--kernel",
        probe.to_str().unwrap(),
        "--mem",
        "64",
        "--net",
        "52:54:00:00:00:0c",
        "--cmdline",
        "console=ttyS0 probe=net:10.0.0.3/24:0:vd-status+shutdown",
    ])
    .wait(RUN);
    done.assert_success();
    let net = done
        .events()
        .into_iter()
        .find(|e| e["probe"] == "net")
        .expect("no net line");
    assert_eq!(net["link"], true, "{net}");
    assert!(net.get("error").is_none(), "{net}");
    assert!(
        !done.stderr.contains("status change refused"),
        "{}",
        done.stderr
    );
}
