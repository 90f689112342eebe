//! Helpers of the live migration tests: the `migrate` command, its report,
//! a destination process listening on a free port.

use crate::{Vmm, vmplant};
use serde_json::Value;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

/// `vmplant vm --control CONTROL migrate TO EXTRA...`.
pub fn migrate(control: &Path, to: &str, extra: &[&str]) -> Output {
    Command::new(vmplant())
        .args(["vm", "--control"])
        .arg(control)
        .args(["migrate", to])
        .args(extra)
        .output()
        .unwrap()
}

/// The last JSON line `vmplant vm migrate` printed.
pub fn report(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {stdout:?}"))
}

/// A free loopback port (free when this returns; the destination binds
/// it right after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A destination on a free port, listening, and its address for
/// `migrate`.
pub fn destination() -> (Vmm, String) {
    destination_with("tcp", &[])
}

/// A destination listening on `proto:127.0.0.1:PORT` (tcp or tls), with
/// `extra` flags; its address.
pub fn destination_with(proto: &str, extra: &[&str]) -> (Vmm, String) {
    let port = free_port();
    let to = format!("{proto}:127.0.0.1:{port}");
    let mut args = vec!["run", "--incoming", &to];
    args.extend(extra);
    let vmm = Vmm::start(&args);
    wait_listening(port);
    (vmm, to)
}

/// Waits until something listens on `port`, without connecting to it.
pub fn wait_listening(port: u16) {
    for _ in 0..200 {
        let listening = std::fs::read_to_string("/proc/net/tcp")
            .unwrap()
            .lines()
            .skip(1)
            .any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.get(1)
                    .is_some_and(|a| a.ends_with(&format!(":{port:04X}")))
                    && f.get(3) == Some(&"0A")
            });
        if listening {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listens on {port}");
}

/// A TCP proxy to `to` (`tcp:HOST:PORT`) that passes at most
/// `bytes_per_s` towards it (answers come back at once), for one
/// connection; its address for `migrate`.
pub fn throttled_proxy(to: &str, bytes_per_s: u64) -> String {
    use std::io::{Read, Write};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("tcp:{}", listener.local_addr().unwrap());
    let to = to.strip_prefix("tcp:").unwrap().to_string();
    std::thread::spawn(move || {
        let Ok((mut from, _)) = listener.accept() else {
            return;
        };
        let Ok(mut dest) = std::net::TcpStream::connect(&to) else {
            return;
        };
        let (mut back_from, mut back_to) = (dest.try_clone().unwrap(), from.try_clone().unwrap());
        std::thread::spawn(move || std::io::copy(&mut back_from, &mut back_to));
        let mut buf = vec![0u8; 16 << 10];
        let start = std::time::Instant::now();
        let mut sent = 0u64;
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if dest.write_all(&buf[..n]).is_err() {
                break;
            }
            sent += n as u64;
            let due = Duration::from_secs_f64(sent as f64 / bytes_per_s as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        let _ = dest.shutdown(std::net::Shutdown::Write);
    });
    addr
}

/// A free loopback UDP port.
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
