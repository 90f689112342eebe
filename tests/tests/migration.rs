//! Live migration as a user runs it: `vmplant run --incoming tcp:ADDR`
//! waits for a VM, `vmplant vm --control C migrate tcp:ADDR` moves a
//! running test guest there, and the guest ticks on from where it was
//! (no new boot) with the memory it filled; and a destination that fails
//! at each step leaves the guest running on the source. Over loopback
//! TCP. Needs root and /dev/kvm.

use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;
use vmplant_tests::Vmm;
use vmplant_tests::migration::{destination, destination_with, migrate, report, throttled_proxy};
use vmplant_tests::{assert_went_on, tick_n};

/// A guest that fills memory and ticks moves while it ticks: it ticks on
/// from the next n on the destination, its memory verifies there, the
/// source exits 0 saying where the VM went.
fn moves_and_goes_on(vcpus: &str, smp: &str) {
    // Which kind of host this ran on: the VMM saves only the state that
    // host's KVM has (no nested state on PVM), on either kind.
    let host = std::process::Command::new(vmplant_tests::vmplant())
        .arg("host")
        .output()
        .unwrap();
    let host: Value = serde_json::from_slice(&host.stdout).unwrap();
    let kind = host["virtualization"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(["pvm", "vmx", "svm"].contains(&kind.as_str()), "{host}");
    eprintln!("migrating on a {kind} host");
    let tmp = tempfile::tempdir().unwrap();
    let control = tmp.path().join("vm.sock");
    let (dest, to) = destination();
    let mut source = Vmm::probe(
        &format!("{smp}fill:16:3+tick:50:20+verify:16:3+shutdown"),
        &[
            "--vcpus",
            vcpus,
            "--mem",
            "64",
            "--control",
            control.to_str().unwrap(),
        ],
    );
    source.expect_line("tick 2", Duration::from_secs(30), |l| tick_n(l) == Some(2));
    let out = migrate(&control, &to, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done = report(&out);
    assert_eq!(done["migration"], "completed", "{done}");
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(
        progress.contains("migrating: round 0 sent 16 MiB"),
        "{progress}"
    );
    let bytes = done["bytes"].as_u64().unwrap();
    assert!(
        (16 << 20..24 << 20).contains(&bytes),
        "{bytes} bytes sent of a guest that filled 16 MiB"
    );
    assert!(done["downtime_ms"].as_f64().unwrap() <= done["total_ms"].as_f64().unwrap());

    let before = source.wait(Duration::from_secs(10));
    assert_eq!(before.status.code(), Some(0), "{}", before.stderr);
    assert!(before.stderr.contains("migrated to"), "{}", before.stderr);
    let after = dest.wait(Duration::from_secs(30));
    after.assert_success();
    assert_went_on(&before.lines, &after, 20, "migrated");
}

#[test]
fn a_ticking_guest_migrates_and_goes_on() {
    moves_and_goes_on("1", "");
}

#[test]
fn a_guest_with_two_vcpus_migrates_and_goes_on() {
    moves_and_goes_on("2", "smp+");
}

/// Boots a ticking guest with a control socket, waits for its second
/// tick, and moves it to `to` with `extra` flags: what the command said,
/// and the source's end.
fn move_ticking_guest(to: &str, extra: &[&str]) -> (Value, vmplant_tests::Finished) {
    let tmp = tempfile::tempdir().unwrap();
    let control = tmp.path().join("vm.sock");
    let mut source = Vmm::probe(
        "fill:8:3+tick:50",
        &["--mem", "32", "--control", control.to_str().unwrap()],
    );
    source.expect_line("tick 2", Duration::from_secs(30), |l| tick_n(l) == Some(2));
    let out = migrate(&control, to, extra);
    let said = report(&out);
    if out.status.success() {
        (said, source.wait(Duration::from_secs(10)))
    } else {
        // It must run on: a tick after the failure, then end it.
        source.expect_line("a tick after the failure", Duration::from_secs(5), |l| {
            tick_n(l).is_some()
        });
        (said, source.kill())
    }
}

/// Over TLS, each end shows a certificate the same CA signed: the guest
/// moves and ticks on. A source whose certificate another CA signed is
/// refused in the handshake, before any memory goes, and runs on.
#[test]
fn a_guest_migrates_over_mutual_tls() {
    let pki = vnet::testbed::TempPki::new(2).unwrap();
    let file = |name: &str| pki.dir().join(name).display().to_string();
    let (dest, to) = destination_with(
        "tls",
        &[
            "--tls-cert",
            &file("sw0.pem"),
            "--tls-key",
            &file("sw0.key"),
            "--tls-ca",
            &file("ca.pem"),
        ],
    );
    let (said, source) = move_ticking_guest(
        &to,
        &[
            "--tls-cert",
            &file("sw1.pem"),
            "--tls-key",
            &file("sw1.key"),
            "--tls-ca",
            &file("ca.pem"),
        ],
    );
    assert_eq!(said["migration"], "completed", "{said}");
    assert_eq!(source.status.code(), Some(0));
    let mut dest = dest;
    dest.expect_line("a tick on the destination", Duration::from_secs(10), |l| {
        tick_n(l).is_some()
    });
    dest.kill();

    let other = vnet::testbed::TempPki::new(1).unwrap();
    let stranger = |name: &str| other.dir().join(name).display().to_string();
    let (dest, to) = destination_with(
        "tls",
        &[
            "--tls-cert",
            &file("sw0.pem"),
            "--tls-key",
            &file("sw0.key"),
            "--tls-ca",
            &file("ca.pem"),
        ],
    );
    let (said, _) = move_ticking_guest(
        &to,
        &[
            "--tls-cert",
            &stranger("sw0.pem"),
            "--tls-key",
            &stranger("sw0.key"),
            "--tls-ca",
            &stranger("ca.pem"),
        ],
    );
    assert_eq!(said["migration"], "failed", "{said}");
    assert!(said["error"].as_str().unwrap().contains("TLS"), "{said}");
    assert_ne!(dest.wait(Duration::from_secs(10)).status.code(), Some(0));
}

/// A local migration, over a unix socket, to another VMM process on the
/// same host: guest memory in a memfd (`--shared-memory`) is handed over,
/// not copied, and the guest ticks on there with the memory it filled;
/// without a memfd it is copied.
#[test]
fn a_guest_migrates_to_a_local_vmm() {
    for (shared, copied) in [(true, false), (false, true)] {
        let tmp = tempfile::tempdir().unwrap();
        let sock = tmp.path().join("incoming.sock");
        let control = tmp.path().join("vm.sock");
        let to = format!("unix:{}", sock.display());
        let dest = Vmm::start(&["run", "--incoming", &to]);
        for _ in 0..200 {
            if sock.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut flags = vec!["--mem", "64", "--control", control.to_str().unwrap()];
        if shared {
            flags.push("--shared-memory");
        }
        let mut source = Vmm::probe("fill:16:9+tick:50:16+verify:16:9+shutdown", &flags);
        source.expect_line("tick 2", Duration::from_secs(30), |l| tick_n(l) == Some(2));
        let out = migrate(&control, &to, &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let said = report(&out);
        assert_eq!(said["migration"], "completed", "{said}");
        let bytes = said["bytes"].as_u64().unwrap();
        assert_eq!(
            bytes >= 16 << 20,
            copied,
            "shared {shared}: {bytes} bytes copied"
        );
        let before = source.wait(Duration::from_secs(10));
        assert_eq!(before.status.code(), Some(0));
        let after = dest.wait(Duration::from_secs(30));
        after.assert_success();
        assert_went_on(
            &before.lines,
            &after,
            16,
            &format!("shared memory {shared}"),
        );
        assert!(!sock.exists(), "the listening socket is left behind");
    }
}

/// A guest rewriting its memory at a rate the link keeps up with
/// converges, and its memory, rewritten meanwhile, verifies on the
/// destination.
#[test]
fn a_guest_dirtying_memory_converges() {
    let tmp = tempfile::tempdir().unwrap();
    let control = tmp.path().join("vm.sock");
    let (dest, to) = destination();
    let mut source = Vmm::probe(
        "fill:32:7+dirty:32:64:2+verify:32:7+shutdown",
        &["--mem", "64", "--control", control.to_str().unwrap()],
    );
    source.expect_line("dirtying", Duration::from_secs(30), |l| {
        l.contains("mib_written")
    });
    let out = migrate(&control, &to, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(report(&out)["migration"], "completed");
    assert_eq!(source.wait(Duration::from_secs(10)).status.code(), Some(0));
    let after = dest.wait(Duration::from_secs(30));
    after.assert_success();
    let verify = after
        .events()
        .into_iter()
        .find(|v| v["probe"] == "verify")
        .expect("verify");
    assert_eq!(verify["ok"], true, "{verify}");
}

/// A guest rewriting memory faster than the link carries it is given up
/// on after the last round: the command says why and fails, the guest
/// runs on at the source, and the destination exits non-zero.
/// (On these hosts a guest cannot write memory faster than loopback TCP
/// carries it: under dirty logging every first write to a page exits to
/// KVM. So the link here is a proxy held to 20 MiB/s.)
#[test]
fn a_guest_dirtying_faster_than_the_link_stays_on_the_source() {
    let tmp = tempfile::tempdir().unwrap();
    let control = tmp.path().join("vm.sock");
    let (dest, to) = destination();
    let mut source = Vmm::probe(
        // As fast as it can: its 4 MiB over and over in a round.
        "fill:4+dirty:4:1048576",
        &["--mem", "40", "--control", control.to_str().unwrap()],
    );
    source.expect_line("dirtying", Duration::from_secs(30), |l| {
        l.contains("mib_written")
    });
    let out = migrate(&control, &throttled_proxy(&to, 20 << 20), &[]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let failed = report(&out);
    assert_eq!(failed["migration"], "failed", "{failed}");
    let why = failed["error"].as_str().unwrap();
    assert!(why.contains("faster than it can be sent"), "{why}");
    let still = source.lines_for(Duration::from_millis(1500));
    assert!(
        still.iter().any(|l| l.contains("mib_written")),
        "the guest stopped on the source: {still:?}"
    );
    let dest = dest.wait(Duration::from_secs(10));
    assert_ne!(dest.status.code(), Some(0), "{}", dest.stderr);
}

/// How a fake destination fails.
#[derive(Debug, Clone, Copy)]
enum Failure {
    /// The connection drops after the first MiB (killed mid-copy).
    DuringCopy,
    /// Everything is read, then the connection closes unanswered (killed
    /// before it confirmed).
    BeforeConfirming,
    /// Everything is read, then it refuses the VM.
    Refusing,
}

/// A destination that fails as `how` says, on a thread; its address.
fn failing_destination(how: Failure) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let to = format!("tcp:{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let mut read = 0usize;
        conn.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        loop {
            match conn.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => read += n,
                // Quiet: the source sent all and waits for an answer.
                Err(_) => break,
            }
            if matches!(how, Failure::DuringCopy) && read >= 1 << 20 {
                return;
            }
        }
        if matches!(how, Failure::Refusing) {
            let _ = conn.write_all(b"{\"error\":\"no room here\"}\n");
        }
    });
    to
}

/// Whatever fails before the destination confirms, the guest keeps
/// ticking on the source, and a later migration can still succeed.
#[test]
fn a_failing_destination_leaves_the_guest_running_on_the_source() {
    let tmp = tempfile::tempdir().unwrap();
    let control = tmp.path().join("vm.sock");
    let mut source = Vmm::probe(
        // More than loopback's socket buffers hold, so that a copy cut
        // short fails while sending.
        "fill:48:5+tick:50",
        &["--mem", "96", "--control", control.to_str().unwrap()],
    );
    source.expect_line("tick 2", Duration::from_secs(30), |l| tick_n(l) == Some(2));
    for (how, expect) in [
        (Failure::DuringCopy, "cannot send"),
        (Failure::BeforeConfirming, "did not confirm"),
        (Failure::Refusing, "no room here"),
    ] {
        let out = migrate(&control, &failing_destination(how), &[]);
        assert_eq!(out.status.code(), Some(1), "{how:?}");
        let failed = report(&out);
        assert_eq!(failed["migration"], "failed", "{how:?}: {failed}");
        let why = failed["error"].as_str().unwrap();
        assert!(why.contains(expect), "{how:?}: {why}");
        let ticks: Vec<u64> = source
            .lines_for(Duration::from_millis(300))
            .iter()
            .filter_map(|l| tick_n(l))
            .collect();
        assert!(
            ticks.len() >= 2,
            "{how:?}: the guest stopped ticking: {ticks:?}"
        );
    }
    // And then it moves for real.
    let (dest, to) = destination();
    let out = migrate(&control, &to, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(source.wait(Duration::from_secs(10)).status.code(), Some(0));
    let mut dest = dest;
    dest.expect_line("a tick on the destination", Duration::from_secs(10), |l| {
        tick_n(l).is_some()
    });
    dest.kill();
}

/// The network follows the VM. Three processes' switches: the
/// destination's is the hub, the source's and a third one's are joined to
/// it by UDP tunnels. A guest on the third pings, every 10 ms, a guest on
/// the source, so the hub learns that guest's MAC behind the source's
/// tunnel. Then that guest moves to the hub's process, and the pings
/// reach it there: at most 2 are lost. (The moved NIC announces its MAC
/// from its new port; here the guest's first frame there, the answer to
/// a ping it took before the pause, would teach the hub too, so the
/// announcement itself is checked by the virtio-net unit tests.)
#[test]
fn pings_go_on_while_their_target_migrates() {
    let tmp = tempfile::tempdir().unwrap();
    let control = tmp.path().join("x.sock");
    let tunnel = format!(
        "udp:127.0.0.1:{}",
        vmplant_tests::migration::free_udp_port()
    );
    let (mut dest, to) = destination_with("tcp", &["--listen", &tunnel]);
    let mut source = Vmm::probe(
        "net:10.0.0.2/24+serve:8",
        &[
            "--mem",
            "32",
            "--net",
            "52:54:00:00:0a:02",
            "--control",
            control.to_str().unwrap(),
            "--connect",
            &tunnel,
        ],
    );
    source.expect_line("the target's NIC", Duration::from_secs(30), |l| {
        l.contains(r#""probe":"net""#)
    });
    let mut pinger = Vmm::probe(
        "net:10.0.0.3/24+ping:10.0.0.2:300:10+shutdown",
        &[
            "--mem",
            "32",
            "--net",
            "52:54:00:00:0a:03",
            "--connect",
            &tunnel,
        ],
    );
    pinger.expect_line("the pinger's NIC", Duration::from_secs(30), |l| {
        l.contains(r#""probe":"net""#)
    });
    std::thread::sleep(Duration::from_millis(800));
    let out = migrate(&control, &to, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(source.wait(Duration::from_secs(10)).status.code(), Some(0));
    let pinged = pinger.wait(Duration::from_secs(30));
    pinged.assert_success();
    let ping = pinged
        .events()
        .into_iter()
        .find(|v| v["probe"] == "ping")
        .expect("a ping line");
    let (sent, received) = (
        ping["sent"].as_u64().unwrap(),
        ping["received"].as_u64().unwrap(),
    );
    eprintln!(
        "pings: {sent} sent, {received} answered, {} lost across the move",
        sent - received
    );
    assert_eq!(sent, 300, "{ping}");
    assert!(
        sent - received <= 2,
        "{} pings lost: {ping}",
        sent - received
    );
    dest.expect_line(
        "the moved guest's serve line",
        Duration::from_secs(15),
        |l| l.contains(r#""probe":"serve""#),
    );
}
