//! Exit statuses and error messages of every command, as the README's
//! table gives them: usage errors and bad input exit 1 with a one-line
//! error that names the cause (the OS's reason) and what to do; signals
//! exit 128 + N after a clean stop; a `--fs` share whose server is down
//! or refuses the token stops `vmplant run` before the guest starts, with
//! the message `vmplant gvfs mount` gives.
//!
//! Needs root (TAPs, FUSE) and /dev/kvm for the `run` cases.

use serde_json::json;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use vmplant_tests::{GvfsServer, Vmm, probe_elf, vmplant};

const WAIT: Duration = Duration::from_secs(20);

/// A scratch directory of this test, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("vmplant-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn path(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn vmplant_out(args: &[&str]) -> Output {
    Command::new(vmplant())
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Runs `vmplant ARGS` expecting exit status 1 and one `vmplant: ` line
/// on standard error that contains every one of `expect`; returns it.
#[track_caller]
fn fails(args: &[&str], expect: &[&str]) -> String {
    let out = vmplant_out(args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("vmplant: "))
        .collect();
    assert_eq!(errors.len(), 1, "{args:?}: {stderr}");
    for e in expect {
        assert!(
            errors[0].contains(e),
            "{args:?}: {:?} lacks {e:?}",
            errors[0]
        );
    }
    errors[0].to_string()
}

/// Makes a CA and certificates with `vmplant pki` in `dir`/pki.
fn pki(dir: &Scratch, certs: &[&str]) -> String {
    let pki = dir.path("pki");
    let out = vmplant_out(&["pki", "--dir", &pki, "ca"]);
    assert!(out.status.success(), "{out:?}");
    for name in certs {
        let out = vmplant_out(&["pki", "--dir", &pki, "cert", name, "--san", "127.0.0.1"]);
        assert!(out.status.success(), "{out:?}");
    }
    pki
}

/// Waits for `child` to end; panics after `WAIT`.
fn wait_code(vmm: Vmm) -> (Option<i32>, String) {
    let done = vmm.wait(WAIT);
    (done.status.code(), done.stderr)
}

#[test]
fn usage_errors_exit_1_for_every_command() {
    for args in [
        &["run", "--kernal", "x"][..],
        &["vm", "--control", "/x", "bogus"],
        &["vnet", "--bogus"],
        &["gvfs", "serve", "--bogus"],
        &["gvfs", "mount", "--bogus"],
        &["host", "--bogus"],
        &["pki", "--dir", "/x", "bogus"],
        &["bench", "boot", "--bogus"],
        &["bogus"],
    ] {
        let out = vmplant_out(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("error:"), "{args:?}: {stderr}");
    }
    // Asking for help is no error.
    let out = vmplant_out(&["run", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("or several"), "{help}");
    let out = vmplant_out(&["--help"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("or several"));
}

#[test]
fn bad_input_exits_1_for_every_command() {
    let dir = Scratch::new("bad");
    fails(
        &["run", "--kernel", "/nonexistent"],
        &[
            "cannot read the kernel \"/nonexistent\"",
            "No such file or directory (os error 2)",
        ],
    );
    fails(
        &["vm", "--control", &dir.path("none.sock"), "info"],
        &["none.sock"],
    );
    fails(&["vnet"], &["nothing to switch"]);
    fails(
        &[
            "gvfs",
            "serve",
            "--plaintext",
            "--listen",
            "127.0.0.1:0",
            "--export",
            "/",
            "--token-file",
            &dir.path("missing-token"),
        ],
        &["missing-token", "No such file or directory"],
    );
    fails(
        &[
            "gvfs",
            "mount",
            "--server",
            "localhost",
            "--plaintext",
            "--token-file",
            "/etc/hostname",
            &dir.0.display().to_string(),
        ],
        &["\"localhost\" is not a server address", "HOST:PORT"],
    );
    fails(
        &[
            "pki",
            "--dir",
            &dir.path("no-ca"),
            "cert",
            "a",
            "--san",
            "127.0.0.1",
        ],
        &["cannot read", "ca.key", "make a CA first", "No such file"],
    );
    let out = vmplant_out(&["gvfs", "serve", "--listen", "localhost", "--export", "/"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("\"localhost\" is not IP:PORT"), "{stderr}");
    // A size whose bytes do not fit in 64 bits: a usage error, status 1.
    let out = vmplant_out(&["bench", "virtio-fs", "--file-mib", "17592186044544"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

#[test]
fn run_errors_name_the_cause_and_the_remedy() {
    let dir = Scratch::new("run");
    let probe = probe_elf();
    let probe = probe.to_str().unwrap();
    fails(
        &[
            "run",
            "--kernel",
            probe,
            "--serial-file",
            "/nonexistent/dir/console",
        ],
        &[
            "cannot open the serial output file \"/nonexistent/dir/console\"",
            "No such file or directory",
        ],
    );
    // The real range, not clap's u8 range.
    for n in ["300", "255", "0"] {
        let out = vmplant_out(&["run", "--kernel", probe, "--vcpus", n]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(&format!("{n} is not in 1..=254")),
            "{stderr}"
        );
    }
    let out = vmplant_out(&["run", "--kernel", probe, "--net", "52:54:00:zz:00:01"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("colons or dashes") && stderr.contains("52-54-00-12-34-56"),
        "{stderr}"
    );
    // One MAC on two NICs, of one VM or of two.
    fails(
        &[
            "run",
            "--kernel",
            probe,
            "--net",
            "52:54:00:00:00:01",
            "--net",
            "52-54-00-00-00-01",
        ],
        &["MAC 52:54:00:00:00:01 is given to two NICs (NIC 0 and NIC 1)"],
    );
    let config = dir.0.join("vms.json");
    let spec = json!({"vms": [
        {"name": "a", "kernel": probe, "nets": ["52:54:00:00:00:0a"]},
        {"name": "b", "kernel": probe, "nets": ["52:54:00:00:00:0A"]},
    ]});
    std::fs::write(&config, spec.to_string()).unwrap();
    fails(
        &["run", "--config", config.to_str().unwrap()],
        &["given to two NICs", "VM \"a\" NIC 0", "VM \"b\" NIC 0"],
    );
}

#[test]
fn tls_file_errors_say_which_file_holds_what() {
    let dir = Scratch::new("tls");
    let pki = pki(&dir, &["sw0", "sw1"]);
    let f = |n: &str| format!("{pki}/{n}");
    let vnet = |cert: &str, key: &str| -> Vec<String> {
        [
            "vnet",
            "--listen",
            "tls:127.0.0.1:0",
            "--tls-cert",
            &f(cert),
            "--tls-key",
            &f(key),
            "--tls-ca",
            &f("ca.pem"),
        ]
        .map(String::from)
        .to_vec()
    };
    let serve = |cert: &str, key: &str| -> Vec<String> {
        [
            "gvfs",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--export",
            &pki,
            "--token-file",
            &f("ca.pem"),
            "--tls-cert",
            &f(cert),
            "--tls-key",
            &f(key),
        ]
        .map(String::from)
        .to_vec()
    };
    for cmd in [&vnet as &dyn Fn(&str, &str) -> Vec<String>, &serve] {
        let run = |cert: &str, key: &str, expect: &[&str]| {
            let args = cmd(cert, key);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            fails(&args, expect);
        };
        run(
            "sw0.pem",
            "nokey.pem",
            &["cannot read", "nokey.pem", "No such file or directory"],
        );
        run(
            "sw0.key",
            "sw0.pem",
            &["sw0.key holds a private key and no certificate", "swapped"],
        );
        run(
            "sw0.pem",
            "sw1.key",
            &[
                "the private key in",
                "sw1.key does not belong to the certificate in",
                "sw0.pem",
            ],
        );
    }
    // A client's CA file that holds a key.
    fails(
        &[
            "gvfs",
            "mount",
            "--server",
            "127.0.0.1:1",
            "--tls-ca",
            &f("ca.key"),
            "--token-file",
            &f("ca.pem"),
            &dir.0.display().to_string(),
        ],
        &["ca.key holds no PEM CA certificate"],
    );
}

#[test]
fn a_tap_held_by_another_process_is_named_as_such() {
    let tap = format!("vpbusy{}", std::process::id() % 100_000);
    let holder = Vmm::start(&["vnet", "--tap", &tap]);
    let deadline = Instant::now() + WAIT;
    while !Command::new("ip")
        .args(["link", "show", &tap])
        .output()
        .unwrap()
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "the TAP never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    fails(
        &["vnet", "--tap", &tap],
        &[
            &tap,
            "another process holds this TAP",
            "Device or resource busy",
        ],
    );
    fails(
        &["vnet", "--tap", "lo"],
        &["TUNSETIFF lo: an interface of that name exists and is not a TAP"],
    );
    holder.signal(libc::SIGTERM);
    let (code, stderr) = wait_code(holder);
    assert_eq!(code, Some(143), "{stderr}");
}

#[test]
fn a_share_whose_server_is_down_or_refuses_the_token_stops_run_before_the_guest() {
    let dir = Scratch::new("fs");
    let probe = probe_elf();
    let probe = probe.to_str().unwrap();
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let token = dir.path("token");
    std::fs::write(&token, "a token\n").unwrap();
    let addr = format!("127.0.0.1:{port}");
    let mount_err = fails(
        &[
            "gvfs",
            "mount",
            "--server",
            &addr,
            "--plaintext",
            "--token-file",
            &token,
            &dir.0.display().to_string(),
        ],
        &["cannot connect to", "Connection refused"],
    );
    let share = format!("data={addr},token-file={token},plaintext");
    let started = Instant::now();
    let run_err = fails(
        &[
            "run",
            "--kernel",
            probe,
            "--fs",
            &share,
            "--cmdline",
            "console=ttyS0 probe=ready",
        ],
        &["share data: cannot connect to", "Connection refused"],
    );
    // The same message, named with the share's tag.
    let what = mount_err.trim_start_matches("vmplant: ");
    assert!(run_err.ends_with(what), "{run_err:?} vs {mount_err:?}");
    assert!(started.elapsed() < Duration::from_secs(10));

    // With several VMs, none starts: the shares connect first.
    let config = dir.0.join("vms.json");
    let spec = json!({"vms": [
        {"name": "a", "kernel": probe, "cmdline": "console=ttyS0 probe=ready"},
        {"name": "b", "kernel": probe, "shares": [share]},
    ]});
    std::fs::write(&config, spec.to_string()).unwrap();
    let out = vmplant_out(&["run", "--config", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("vmplant: VM b: share data: {what}")),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "VM a ran: {out:?}");

    // A live server and a wrong token.
    let export = std::env::temp_dir().join(format!("vmplant-cli-fsrv-{}", std::process::id()));
    std::fs::create_dir_all(export.join("export")).unwrap();
    let server = GvfsServer::start(&export);
    let wrong = format!("data={},token-file={token},plaintext", server.addr);
    let out = Command::new(vmplant())
        .args(["run", "--kernel", probe, "--fs", &wrong])
        .args(["--cmdline", "console=ttyS0 probe=ready"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("vmplant: share data: server refused the handshake: wrong token"),
        "{stderr}"
    );
    // The guest never started.
    assert!(
        out.stdout.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    let mount = Command::new(vmplant())
        .args(["gvfs", "mount", "--server", &server.addr, "--plaintext"])
        .args(["--token-file", &token, &dir.0.display().to_string()])
        .output()
        .unwrap();
    let mount_stderr = String::from_utf8_lossy(&mount.stderr);
    assert_eq!(mount.status.code(), Some(1), "{mount_stderr}");
    assert!(
        mount_stderr.contains("vmplant: server refused the handshake: wrong token"),
        "{mount_stderr}"
    );
}

#[test]
fn a_share_logs_its_disconnects_and_reconnects_with_its_tag() {
    let export = std::env::temp_dir().join(format!("vmplant-cli-rec-{}", std::process::id()));
    std::fs::create_dir_all(export.join("export")).unwrap();
    std::fs::write(export.join("export/a.txt"), "a").unwrap();
    let server = GvfsServer::start(&export);
    let share = server.share("data");
    // The guest reads once, counts for a while (the server restarts
    // meanwhile), and reads again.
    let mut vmm = Vmm::probe(
        "fs-read:/a.txt+count:10000000000+fs-read:/a.txt+shutdown",
        &["--mem", "64", "--fs", &share],
    );
    vmm.expect_line("the first read", WAIT, |l| l.contains("\"fs-read\""));
    let addr = server.addr.clone();
    drop(server);
    // A server at the same address again, for the reconnect.
    std::fs::create_dir_all(export.join("export")).unwrap();
    std::fs::write(export.join("export/a.txt"), "a").unwrap();
    std::fs::write(export.join("token"), "fs-test-token\n").unwrap();
    let mut again = Command::new(vmplant())
        .args(["gvfs", "serve", "--plaintext", "--listen", &addr])
        .arg("--export")
        .arg(export.join("export"))
        .arg("--token-file")
        .arg(export.join("token"))
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let done = vmm.wait(Duration::from_secs(120));
    let _ = again.kill();
    let _ = again.wait();
    let _ = std::fs::remove_dir_all(&export);
    done.assert_success();
    let reads: Vec<_> = done
        .events()
        .into_iter()
        .filter(|e| e["probe"] == "fs-read")
        .collect();
    assert_eq!(reads.len(), 2, "{reads:?}");
    assert!(reads[1].get("error").is_none(), "{reads:?}");
    let log = &done.stderr;
    let lost = log
        .lines()
        .find(|l| l.contains("disconnected from the server"))
        .unwrap_or_else(|| panic!("no disconnect logged: {log}"));
    assert!(lost.contains("share=data"), "{lost}");
    let back = log
        .lines()
        .find(|l| l.contains("reconnected"))
        .unwrap_or_else(|| panic!("no reconnect logged: {log}"));
    assert!(back.contains("share=data"), "{back}");
}

#[test]
fn signals_end_every_long_running_command_with_128_plus_n() {
    let dir = Scratch::new("sig");
    for (sig, code) in [(libc::SIGINT, 130), (libc::SIGTERM, 143)] {
        // vnet
        let vnet = Vmm::start(&["vnet", "--listen", "udp:127.0.0.1:0"]);
        std::thread::sleep(Duration::from_millis(300));
        vnet.signal(sig);
        let (got, stderr) = wait_code(vnet);
        assert_eq!(got, Some(code), "vnet, signal {sig}: {stderr}");
        // gvfs serve
        let token = dir.path("token");
        std::fs::write(&token, "t").unwrap();
        let serve = Vmm::start(&[
            "gvfs",
            "serve",
            "--plaintext",
            "--listen",
            "127.0.0.1:0",
            "--export",
            &dir.0.display().to_string(),
            "--token-file",
            &token,
        ]);
        std::thread::sleep(Duration::from_millis(300));
        serve.signal(sig);
        let (got, stderr) = wait_code(serve);
        assert_eq!(got, Some(code), "gvfs serve, signal {sig}: {stderr}");
        // run
        let mut run = Vmm::probe("ready", &[]);
        run.expect_line("the done line", WAIT, |l| l.contains(r#""probe":"done""#));
        run.signal(sig);
        let (got, stderr) = wait_code(run);
        assert_eq!(got, Some(code), "run, signal {sig}: {stderr}");
    }
}

#[test]
fn several_vms_log_under_their_names_and_the_pvm_warning_once() {
    let dir = Scratch::new("names");
    let probe = probe_elf();
    let config = dir.0.join("vms.json");
    let spec = json!({"vms": [
        {"name": "alpha", "kernel": probe, "cmdline": "console=ttyS0 probe=shutdown"},
        {"name": "beta", "kernel": probe, "cmdline": "console=ttyS0 probe=shutdown"},
    ]});
    std::fs::write(&config, spec.to_string()).unwrap();
    let done = Vmm::start(&["run", "--config", config.to_str().unwrap()]).wait(WAIT);
    done.assert_success();
    let log = &done.stderr;
    for name in ["alpha", "beta"] {
        let span = format!("vm{{name={name}}}");
        for what in ["guest boot complete", "asked for power off"] {
            assert!(
                log.lines().any(|l| l.contains(&span) && l.contains(what)),
                "no {what:?} line for {name}: {log}"
            );
        }
    }
    // No switch line: there is no TAP or tunnel, and no NIC.
    assert!(!log.contains("switch running"), "{log}");
    // The host's warning, once, and about no VM in particular.
    let pvm: Vec<&str> = log.lines().filter(|l| l.contains("PVM")).collect();
    assert!(pvm.len() <= 1, "{log}");
    assert!(pvm.iter().all(|l| !l.contains("vm{")), "{log}");
}

/// Logs that cannot be written (standard error a pipe whose reader is
/// gone) are dropped: the VM runs to its end and exits 0.
#[test]
fn a_closed_standard_error_does_not_stop_the_guest() {
    let probe = probe_elf();
    let mut child = Command::new(vmplant())
        .args(["run", "--kernel", probe.to_str().unwrap()])
        .args(["--cmdline", "console=ttyS0 probe=count:100000000+shutdown"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the VM hung once its log could not be written");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "{status}");
}
