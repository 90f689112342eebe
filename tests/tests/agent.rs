//! The agent daemon end to end: `vmplant agent` on a unix socket, driven
//! by `vmplant ctl`, its VMs booting the test guest in VMM processes of
//! their own. Checks the lifecycle against the guest's console ticks, VMs
//! that outlive a SIGKILLed agent and are re-adopted, crashes and the
//! restart policy, tenants, roles and quotas, and concurrent creates and
//! destroys that leave nothing behind. Needs root and /dev/kvm.

use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use vmplant_tests::{probe_elf, tick_n, vmplant};

const TOKENS: &str = r#"{"tokens":[
  {"token":"tok-admin","tenant":"ops","role":"admin"},
  {"token":"tok-a","tenant":"a","role":"tenant","quota":{"vms":3,"vcpus":4,"mem_mib":256}},
  {"token":"tok-b","tenant":"b","role":"tenant"},
  {"token":"tok-ra","tenant":"a","role":"reader"}
]}"#;

/// A `vmplant agent` in a scratch directory; on drop it and every VMM
/// it started are killed.
struct Agent {
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// More `vmplant agent` flags.
    extra: Vec<String>,
    /// Where the agent kills itself (VMPLANT_AGENT_CRASH_AT).
    crash_at: Option<String>,
}

impl Agent {
    fn start() -> Agent {
        Agent::start_with(&[])
    }

    fn start_with(extra: &[&str]) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokens.json"), TOKENS).unwrap();
        for who in ["admin", "a", "b", "ra"] {
            std::fs::write(
                dir.path().join(format!("{who}.token")),
                format!("tok-{who}\n"),
            )
            .unwrap();
        }
        std::fs::write(dir.path().join("none.token"), "").unwrap();
        std::fs::write(dir.path().join("bad.token"), "tok-nobody\n").unwrap();
        let mut agent = Agent {
            dir,
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            crash_at: None,
        };
        agent.spawn();
        agent
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("api.sock")
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(self.socket());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))
            .unwrap();
        let mut cmd = Command::new(vmplant());
        if let Some(point) = &self.crash_at {
            cmd.env("VMPLANT_AGENT_CRASH_AT", point);
        }
        let child = cmd
            .arg("agent")
            .arg("--state-dir")
            .arg(self.state())
            .arg("--listen")
            .arg(format!("unix:{}", self.socket().display()))
            .arg("--tokens")
            .arg(self.dir.path().join("tokens.json"))
            .arg("--kernel-dir")
            .arg(probe_elf().parent().unwrap())
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(self.socket()).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("the agent ended ({status}): {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "the agent does not serve: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// Starts the agent again (after killing it if it runs), set to kill
    /// itself at `crash_at`.
    fn restart(&mut self, crash_at: Option<&str>) {
        self.kill();
        self.crash_at = crash_at.map(String::from);
        self.spawn();
    }

    /// Stops the agent with SIGTERM (its VMs run on); it must exit 0.
    fn term(&mut self) {
        let mut c = self.child.take().expect("the agent runs");
        // SAFETY: kill(2) has no memory effects.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let status = c.wait().unwrap();
        assert!(status.success(), "the agent ended {status}: {}", self.log());
    }

    /// SIGKILLs the agent (its VMs run on).
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn ctl(&self, who: &str, args: &[&str]) -> Output {
        Command::new(vmplant())
            .arg("ctl")
            .arg("--agent")
            .arg(format!("unix:{}", self.socket().display()))
            .arg("--token-file")
            .arg(self.dir.path().join(format!("{who}.token")))
            .args(args)
            .output()
            .unwrap()
    }

    /// `vmplant ctl --json ARGS` as `who`, which must succeed.
    #[track_caller]
    fn json(&self, who: &str, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.ctl(who, &all);
        assert!(
            out.status.success(),
            "ctl {args:?} failed: {}\nagent log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(text.trim()).unwrap_or(Value::Null)
    }

    /// `vmplant ctl ARGS` as `who`, which must fail: its message.
    #[track_caller]
    fn fails(&self, who: &str, args: &[&str]) -> String {
        let out = self.ctl(who, args);
        assert!(!out.status.success(), "ctl {args:?} as {who} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Creates a VM booting the probe with `steps` (plus flags).
    #[track_caller]
    fn create(&self, who: &str, steps: &str, extra: &[&str]) -> String {
        let probe = probe_elf();
        let cmdline = format!("console=ttyS0 probe={steps}");
        let mut args = vec![
            "create",
            "--kernel",
            probe.to_str().unwrap(),
            "--cmdline",
            &cmdline,
        ];
        if !extra.contains(&"--mem") {
            args.extend_from_slice(&["--mem", "64"]);
        }
        args.extend_from_slice(extra);
        let v = self.json(who, &args);
        v["id"].as_str().expect("an id").to_owned()
    }

    fn show(&self, id: &str) -> Value {
        self.json("admin", &["show", id])
    }

    /// The ticks in a VM's console (through the API).
    fn ticks(&self, id: &str) -> Vec<u64> {
        let out = self.ctl("admin", &["console", id]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(tick_n)
            .collect()
    }

    /// Waits until VM `id` has printed a tick past `n`; returns the ticks.
    #[track_caller]
    fn wait_tick_past(&self, id: &str, n: u64, within: Duration) -> Vec<u64> {
        let deadline = Instant::now() + within;
        loop {
            let ticks = self.ticks(id);
            if ticks.last().is_some_and(|t| *t > n) {
                return ticks;
            }
            assert!(
                Instant::now() < deadline,
                "VM {id} printed no tick past {n} within {within:?}: {ticks:?}\n{}\nagent log:\n{}",
                self.show(id),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `pred` holds for VM `id`'s record.
    #[track_caller]
    fn wait_state(&self, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v = self.show(id);
            if pred(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "VM {id} never {what}: {v}\nagent log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(30));
        }
    }

    /// One raw HTTP request on the API socket: status and body.
    fn http(&self, request: &str) -> (u16, String) {
        let mut s = UnixStream::connect(self.socket()).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        let status = out
            .split_whitespace()
            .nth(1)
            .and_then(|x| x.parse().ok())
            .unwrap_or(0);
        let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
        (status, body)
    }

    /// The live VMM processes of this agent.
    fn vmms(&self) -> Vec<u32> {
        let needle = self.state().join("vms").display().to_string();
        let mut out = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.contains(&needle) && alive(pid) {
                out.push(pid);
            }
        }
        out
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        for pid in self.vmms() {
            // SAFETY: kill(2) has no memory effects.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// Whether `pid` runs (and is no zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

fn kill9(pid: u64) {
    // SAFETY: kill(2) has no memory effects.
    let r = unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    assert_eq!(r, 0, "cannot kill {pid}");
}

/// `vmplant ctl events --json` in the background: its lines.
struct Events {
    child: Child,
    lines: std::sync::mpsc::Receiver<Value>,
    seen: Vec<Value>,
}

impl Events {
    fn watch(agent: &Agent) -> Events {
        let mut child = Command::new(vmplant())
            .arg("ctl")
            .arg("--agent")
            .arg(format!("unix:{}", agent.socket().display()))
            .arg("--token-file")
            .arg(agent.dir.path().join("admin.token"))
            .args(["--json", "events"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&line)
                    && tx.send(v).is_err()
                {
                    break;
                }
            }
        });
        let mut events = Events {
            child,
            lines,
            seen: Vec::new(),
        };
        // Subscribed once a VM created now is seen (that VM is deleted).
        let probe = probe_elf();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v = agent.json(
                "admin",
                &["create", "--kernel", probe.to_str().unwrap(), "--no-start"],
            );
            let id = v["id"].as_str().unwrap().to_owned();
            agent.json("admin", &["rm", &id]);
            if let Ok(v) = events.lines.recv_timeout(Duration::from_millis(500)) {
                events.seen.push(v);
                break;
            }
            assert!(Instant::now() < deadline, "the event stream says nothing");
        }
        events
    }

    /// Waits for event `event` (with `reason`, if given) of VM `id`.
    #[track_caller]
    fn expect(&mut self, id: &str, event: &str, reason: Option<&str>) {
        let matches = |v: &Value| {
            v["id"] == id && v["event"] == event && reason.is_none_or(|r| v["reason"] == r)
        };
        if self.seen.iter().any(matches) {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while let Ok(v) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            let hit = matches(&v);
            self.seen.push(v);
            if hit {
                return;
            }
        }
        panic!("no {event} {reason:?} event for {id}: {:?}", self.seen);
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn lifecycle_through_ctl_follows_the_guest_console() {
    let agent = Agent::start();
    let mut events = Events::watch(&agent);
    let id = agent.create("admin", "tick:100", &[]);
    events.expect(&id, "created", None);
    events.expect(&id, "started", None);
    let vm = agent.show(&id);
    assert_eq!(vm["state"], "running", "{vm}");
    let pid = vm["pid"].as_u64().unwrap();
    assert!(alive(pid as u32));
    agent.wait_tick_past(&id, 3, Duration::from_secs(20));

    // Paused: no ticks.
    assert_eq!(agent.json("admin", &["pause", &id])["state"], "paused");
    events.expect(&id, "paused", None);
    std::thread::sleep(Duration::from_millis(200));
    let before = agent.ticks(&id);
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(agent.ticks(&id), before, "the guest ticked while paused");
    // Resumed: on from where it was.
    assert_eq!(agent.json("admin", &["resume", &id])["state"], "running");
    events.expect(&id, "resumed", None);
    let last = *before.last().unwrap();
    agent.wait_tick_past(&id, last + 2, Duration::from_secs(10));

    // A snapshot, and a clone of it that goes on from the snapshot's
    // tick (not a new boot).
    let snap = agent.json("admin", &["snapshot", &id]);
    let snap_dir = snap["dir"].as_str().unwrap().to_owned();
    assert!(Path::new(&snap_dir).join("state").is_file(), "{snap}");
    let at_snapshot = *agent.ticks(&id).last().unwrap();
    let clone = agent.json("admin", &["clone", &id])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(agent.show(&clone)["state"], "running");
    assert_eq!(agent.show(&clone)["config"]["snapshot"], snap_dir.as_str());
    let ticks = agent.wait_tick_past(&clone, at_snapshot, Duration::from_secs(20));
    assert!(
        // (+2: a line the snapshot's pause cut is not a whole tick)
        ticks[0] > 1 && ticks[0] <= at_snapshot + 2,
        "the clone rebooted or skipped: {ticks:?} (snapshot at {at_snapshot})"
    );
    // The source goes on too.
    agent.wait_tick_past(&id, at_snapshot + 3, Duration::from_secs(10));

    // Stop: the process ends, the VM stays; start boots it again.
    let stopped = agent.json("admin", &["stop", &id]);
    assert_eq!(stopped["state"], "stopped");
    assert_eq!(stopped["reason"], "shutdown");
    events.expect(&id, "stopped", Some("shutdown"));
    assert!(!alive(pid as u32), "the VMM still runs after stop");

    // Destroy both: no process, directory or record left.
    agent.json("admin", &["rm", &id]);
    agent.json("admin", &["rm", &clone]);
    events.expect(&clone, "stopped", Some("destroyed"));
    events.expect(&clone, "deleted", None);
    assert_eq!(agent.json("admin", &["ls"])["vms"], serde_json::json!([]));
    assert!(agent.vmms().is_empty(), "VMMs left: {:?}", agent.vmms());
    let left: Vec<_> = std::fs::read_dir(agent.state().join("vms"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(agent.fails("admin", &["show", &id]).contains("no VM"));
}

#[test]
fn vms_outlive_a_killed_agent_and_are_adopted_again() {
    let mut agent = Agent::start();
    let a = agent.create("admin", "tick:100", &[]);
    let b = agent.create("admin", "tick:100", &["--restart", "never"]);
    agent.wait_tick_past(&a, 2, Duration::from_secs(20));
    agent.wait_tick_past(&b, 2, Duration::from_secs(20));
    let pid_a = agent.show(&a)["pid"].as_u64().unwrap();
    let pid_b = agent.show(&b)["pid"].as_u64().unwrap();

    agent.kill();
    // The VMs tick on without the agent (read their logs directly).
    let console = |id: &str| {
        let text = std::fs::read_to_string(agent.state().join("vms").join(id).join("console.log"))
            .unwrap_or_default();
        text.lines().filter_map(tick_n).max().unwrap_or(0)
    };
    let n = console(&a);
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        console(&a) >= n + 3,
        "VM a stopped ticking without the agent"
    );
    assert!(alive(pid_a as u32) && alive(pid_b as u32));
    // One of them dies while the agent is away.
    kill9(pid_b);

    agent.spawn();
    let va = agent.show(&a);
    assert_eq!(va["state"], "running", "{va}");
    assert_eq!(va["pid"], pid_a, "{va}");
    let vb = agent.show(&b);
    assert_eq!(vb["state"], "crashed", "{vb}");
    assert_eq!(vb["reason"], "crashed", "{vb}");
    // The adopted VM is driven as before.
    assert_eq!(agent.json("admin", &["pause", &a])["state"], "paused");
    assert_eq!(agent.json("admin", &["resume", &a])["state"], "running");
    let n = *agent.ticks(&a).last().unwrap();
    agent.wait_tick_past(&a, n + 2, Duration::from_secs(10));
    // A VM watched by pid (the agent is not its parent) that is killed
    // shows as crashed too.
    kill9(pid_a);
    agent.wait_state(&a, "crashed", |v| v["state"] == "crashed");

    // A VM whose restart was due when the agent died is restarted by
    // the next one.
    let c = agent.create("admin", "tick:100", &["--restart", "on-failure"]);
    let pid_c = agent.show(&c)["pid"].as_u64().unwrap();
    kill9(pid_c);
    std::thread::sleep(Duration::from_millis(100));
    agent.kill();
    agent.spawn();
    let vc = agent.wait_state(&c, "restarted", |v| {
        v["state"] == "running" && v["pid"] != pid_c
    });
    assert_eq!(vc["restarts"], 1, "{vc}");
    agent.wait_tick_past(&c, 1, Duration::from_secs(20));
    // A SIGTERM (systemctl stop) ends the agent, not its VMs.
    let pid_c = vc["pid"].as_u64().unwrap() as u32;
    agent.term();
    assert!(!agent.socket().exists(), "the API socket is left behind");
    assert!(alive(pid_c));
    agent.spawn();
    assert_eq!(agent.show(&c)["pid"], u64::from(pid_c));
    for id in [&a, &b, &c] {
        agent.json("admin", &["rm", id]);
    }
    assert!(agent.vmms().is_empty());
}

#[test]
fn a_killed_vmm_shows_crashed_and_on_failure_brings_it_back() {
    let agent = Agent::start();
    let mut events = Events::watch(&agent);
    let never = agent.create("admin", "tick:100", &[]);
    let back = agent.create("admin", "tick:100", &["--restart", "on-failure"]);
    agent.wait_tick_past(&never, 1, Duration::from_secs(20));
    agent.wait_tick_past(&back, 1, Duration::from_secs(20));
    let pid_never = agent.show(&never)["pid"].as_u64().unwrap();
    let pid_back = agent.show(&back)["pid"].as_u64().unwrap();
    kill9(pid_never);
    kill9(pid_back);

    let v = agent.wait_state(&never, "crashed", |v| v["state"] == "crashed");
    assert!(v["last_exit"].as_str().unwrap().contains("signal 9"), "{v}");
    events.expect(&never, "stopped", Some("crashed"));
    events.expect(&back, "stopped", Some("crashed"));
    // Restarted: a new process, booted anew (ticks from 1 again).
    let v = agent.wait_state(&back, "restarted", |v| {
        v["state"] == "running" && v["pid"] != pid_back && v["restarts"] == 1
    });
    assert!(alive(v["pid"].as_u64().unwrap() as u32));
    events.expect(&back, "started", None);
    // A new boot ticks from 1 in a new console log; the crashed boot's
    // is kept beside it.
    let ticks = agent.wait_tick_past(&back, 1, Duration::from_secs(20));
    assert_eq!(ticks[0], 1, "{ticks:?}");
    let prev = std::fs::read_to_string(
        agent
            .state()
            .join("vms")
            .join(&back)
            .join("console.log.prev"),
    )
    .unwrap();
    assert!(prev.lines().filter_map(tick_n).count() >= 2, "{prev}");
    // The never VM stays crashed, and starts again when asked.
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(agent.show(&never)["state"], "crashed");
    assert_eq!(agent.json("admin", &["start", &never])["state"], "running");
    agent.json("admin", &["rm", &never]);
    agent.json("admin", &["rm", &back]);
    assert!(agent.vmms().is_empty());
}

#[test]
fn tenants_see_only_their_vms_readers_change_nothing_and_quotas_hold() {
    let agent = Agent::start();
    let probe = probe_elf();
    let k = probe.to_str().unwrap();
    let a1 = agent.json("a", &["create", "--kernel", k, "--mem", "64", "--no-start"]);
    let a1 = a1["id"].as_str().unwrap().to_owned();
    assert_eq!(agent.show(&a1)["state"], "created");
    assert_eq!(agent.show(&a1)["tenant"], "a");

    // No token, a bad token: 401.
    assert!(agent.fails("none", &["ls"]).contains("HTTP 401"));
    assert!(agent.fails("bad", &["ls"]).contains("HTTP 401"));
    // Tenant b sees nothing of a's, and cannot touch it.
    assert_eq!(agent.json("b", &["ls"])["vms"], serde_json::json!([]));
    for op in [
        &["show", &a1][..],
        &["rm", &a1],
        &["start", &a1],
        &["console", &a1],
    ] {
        assert!(agent.fails("b", op).contains("HTTP 404"), "{op:?}");
    }
    // A reader of a sees a's VMs and changes nothing.
    assert_eq!(agent.json("ra", &["ls"])["vms"][0]["id"], a1.as_str());
    assert!(agent.json("ra", &["show", &a1])["id"] == a1.as_str());
    for op in [
        &["start", &a1][..],
        &["rm", &a1],
        &["create", "--kernel", k, "--no-start"],
    ] {
        let e = agent.fails("ra", op);
        assert!(
            e.contains("HTTP 403") && e.contains("reader"),
            "{op:?}: {e}"
        );
    }
    // The admin sees every tenant's.
    assert_eq!(agent.json("admin", &["ls"])["vms"][0]["id"], a1.as_str());

    // Quotas: vms 3, vcpus 4, mem_mib 256 for tenant a.
    let e = agent.fails(
        "a",
        &["create", "--kernel", k, "--mem", "256", "--no-start"],
    );
    assert!(e.contains("HTTP 403") && e.contains("mem_mib 256"), "{e}");
    let e = agent.fails(
        "a",
        &[
            "create",
            "--kernel",
            k,
            "--mem",
            "64",
            "--vcpus",
            "4",
            "--no-start",
        ],
    );
    assert!(e.contains("HTTP 403") && e.contains("vcpus 4"), "{e}");
    for _ in 0..2 {
        agent.json("a", &["create", "--kernel", k, "--mem", "64", "--no-start"]);
    }
    let e = agent.fails("a", &["create", "--kernel", k, "--mem", "16", "--no-start"]);
    assert!(e.contains("HTTP 403") && e.contains("vms 3"), "{e}");
    // Tenant b has no quota.
    agent.json(
        "b",
        &["create", "--kernel", k, "--mem", "1024", "--no-start"],
    );
    assert_eq!(agent.json("b", &["ls"])["vms"].as_array().unwrap().len(), 1);
    assert_eq!(agent.json("a", &["ls"])["vms"].as_array().unwrap().len(), 3);
    // A tenant boots kernels from the agent's kernel directories only.
    let not_a_kernel = agent.dir.path().join("tokens.json");
    let not_a_kernel = not_a_kernel.to_str().unwrap();
    for path in [not_a_kernel, "/etc/hostname", "/nonexistent"] {
        let e = agent.fails("b", &["create", "--kernel", path]);
        assert!(
            e.contains("HTTP 403") && e.contains("kernel directories"),
            "{e}"
        );
    }
    let outside = format!("{}/../../README.md", probe.parent().unwrap().display());
    let e = agent.fails("b", &["create", "--kernel", &outside]);
    assert!(e.contains("HTTP 403"), "{e}");
    // A file that is no kernel (an admin may name any): the VMM refuses
    // it (status 1), a client error; the VM stays, crashed, saying why.
    let e = agent.fails("admin", &["create", "--kernel", not_a_kernel]);
    assert!(e.contains("HTTP 400") && e.contains("did not start"), "{e}");
    let vms = agent.json("admin", &["ls"]);
    let crashed = vms["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["state"] == "crashed");
    assert!(
        crashed.is_some_and(|v| v["last_exit"].as_str().unwrap().contains("exit status 1")),
        "{vms}"
    );
    agent.json("admin", &["rm", crashed.unwrap()["id"].as_str().unwrap()]);

    // Errors are JSON with a code; unknown fields and large bodies are
    // refused; the served OpenAPI document is the checked-in one.
    let post = |body: &str| {
        agent.http(&format!(
            "POST /vms HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer tok-b\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ))
    };
    let (status, body) = post(&format!(r#"{{"kernel":"{k}","bogus":1}}"#));
    assert_eq!(status, 400, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["code"], "bad-request");
    assert!(v["message"].as_str().unwrap().contains("bogus"), "{v}");
    let (status, body) = post(&format!(
        r#"{{"kernel":"{k}","cmdline":"{}"}}"#,
        "x".repeat(70_000)
    ));
    assert_eq!(status, 413, "{body}");
    let (status, body) =
        agent.http("GET /nothing HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
    assert_eq!(status, 404);
    assert!(body.contains("\"code\""), "{body}");
    let (status, body) =
        agent.http("GET /openapi.json HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
    assert_eq!(status, 200);
    let checked_in =
        std::fs::read_to_string(vmplant_tests::root().join("docs/openapi.json")).unwrap();
    assert!(
        serde_json::from_str::<Value>(&body).unwrap()
            == serde_json::from_str::<Value>(&checked_in).unwrap(),
        "the served OpenAPI document is not docs/openapi.json"
    );
    let host = agent.json("a", &["host"]);
    assert_eq!(host["vms"], 3);
    assert!(host["mem_total_mib"].as_u64().unwrap() > 0);
}

#[test]
fn concurrent_creates_and_destroys_leave_nothing_behind() {
    let agent = Agent::start();
    const N: usize = 12;
    let ids: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..N)
            .map(|_| s.spawn(|| agent.create("admin", "tick:1000", &["--mem", "32"])))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let vms = agent.json("admin", &["ls"]);
    let vms = vms["vms"].as_array().unwrap();
    assert_eq!(vms.len(), N);
    assert!(vms.iter().all(|v| v["state"] == "running"), "{vms:?}");
    assert_eq!(agent.vmms().len(), N);
    std::thread::scope(|s| {
        for id in &ids {
            let agent = &agent;
            s.spawn(move || agent.json("admin", &["rm", id]));
        }
    });
    assert_eq!(agent.json("admin", &["ls"])["vms"], serde_json::json!([]));
    assert!(agent.vmms().is_empty(), "VMMs left: {:?}", agent.vmms());
    let left: Vec<_> = std::fs::read_dir(agent.state().join("vms"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "left in vms/: {left:?}");
}

#[test]
fn the_api_is_served_over_tls_on_tcp() {
    let certs = tempfile::tempdir().unwrap();
    let write_cert = |name: &str| {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = certs.path().join(format!("{name}.pem"));
        let key = certs.path().join(format!("{name}.key"));
        std::fs::write(&cert, c.cert.pem()).unwrap();
        std::fs::write(&key, c.signing_key.serialize_pem()).unwrap();
        (cert, key)
    };
    let (cert, key) = write_cert("agent");
    let (other, _) = write_cert("other");
    let agent = Agent::start_with(&[
        "--listen",
        "tcp:127.0.0.1:0",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let port = loop {
        let log = agent.log();
        if let Some(port) = log
            .lines()
            .find_map(|l| l.strip_prefix("agent: serving on tcp:127.0.0.1:"))
            .and_then(|rest| rest.split_whitespace().next())
        {
            break port.to_owned();
        }
        assert!(Instant::now() < deadline, "no tcp listener: {log}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let url = format!("https://localhost:{port}");
    let over_tls = |who: &str, ca: &Path, args: &[&str]| {
        Command::new(vmplant())
            .args(["ctl", "--agent", &url, "--ca"])
            .arg(ca)
            .arg("--token-file")
            .arg(agent.dir.path().join(format!("{who}.token")))
            .args(args)
            .output()
            .unwrap()
    };
    let k = probe_elf();
    let out = over_tls(
        "a",
        &cert,
        &[
            "--json",
            "create",
            "--kernel",
            k.to_str().unwrap(),
            "--no-start",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id: Value = serde_json::from_slice(&out.stdout).unwrap();
    // The same VM over the unix socket.
    assert_eq!(agent.show(id["id"].as_str().unwrap())["tenant"], "a");
    let out = over_tls("a", &cert, &["--json", "ls"]);
    assert!(out.status.success());
    let ls: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ls["vms"][0]["id"], id["id"]);
    // Tokens hold over TLS too.
    let out = over_tls("bad", &cert, &["ls"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("HTTP 401"));
    // A client that does not trust the agent's certificate stops.
    let out = over_tls("a", &other, &["ls"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("certificate"),
        "{err}"
    );
}

#[test]
fn records_and_processes_agree_after_the_agent_dies_mid_operation() {
    let mut agent = Agent::start();
    let probe = probe_elf();
    let k = probe.to_str().unwrap();
    let create = [
        "create",
        "--kernel",
        k,
        "--cmdline",
        "console=ttyS0 probe=tick:100",
        "--mem",
        "64",
    ];

    // Killed once the VMM is spawned, before its pid is recorded: the
    // next agent finds it by its control socket and adopts it.
    agent.restart(Some("create:spawned"));
    let out = agent.ctl("admin", &create);
    assert!(!out.status.success(), "the agent did not die in the create");
    agent.restart(None);
    let vms = agent.json("admin", &["ls"]);
    let id = vms["vms"][0]["id"]
        .as_str()
        .expect("the VM's record")
        .to_owned();
    let vm = agent.wait_state(&id, "running", |v| v["state"] == "running");
    let vmms = agent.vmms();
    assert_eq!(vmms, vec![vm["pid"].as_u64().unwrap() as u32], "{vm}");
    agent.wait_tick_past(&id, 2, Duration::from_secs(20));

    // Killed once the VMM saved a snapshot, before it is recorded: the
    // next agent finds the files and completes the record.
    agent.restart(Some("snapshot:saved"));
    let out = agent.ctl("admin", &["snapshot", &id]);
    assert!(
        !out.status.success(),
        "the agent did not die in the snapshot"
    );
    agent.restart(None);
    let vm = agent.show(&id);
    assert_eq!(vm["state"], "running", "{vm}");
    let snaps = vm["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 1, "{vm}");
    assert!(
        Path::new(snaps[0].as_str().unwrap())
            .join("state")
            .is_file()
    );
    // It clones like any other.
    let clone = agent.json("admin", &["clone", &id])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    agent.wait_tick_past(&clone, 2, Duration::from_secs(20));
    agent.json("admin", &["rm", &clone]);

    // Killed once a destroy is recorded, before the VMM is stopped: the
    // next agent finishes it.
    agent.restart(Some("destroy:recorded"));
    let out = agent.ctl("admin", &["rm", &id]);
    assert!(
        !out.status.success(),
        "the agent did not die in the destroy"
    );
    assert_eq!(agent.vmms().len(), 1, "the VMM ended with the agent");
    agent.restart(None);
    assert_eq!(agent.json("admin", &["ls"])["vms"], serde_json::json!([]));
    assert!(agent.vmms().is_empty(), "VMMs left: {:?}", agent.vmms());
    let left: Vec<_> = std::fs::read_dir(agent.state().join("vms"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "left in vms/: {left:?}");
}
