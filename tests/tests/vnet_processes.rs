//! Two `vmplant vnet` processes joined by a tunnel, a Linux network
//! namespace behind a TAP port of each: ping and iperf3 cross the tunnel,
//! over UDP, TCP and TLS in turn, and both processes stop cleanly on
//! SIGTERM (exit status 143).
//!
//! Needs root (TAP devices, network namespaces) and iperf3. Traffic stays
//! on this machine: loopback between the processes, and the namespaces
//! the test makes.

use std::net::{TcpListener, UdpSocket};
use std::time::Duration;
use vmplant_tests::Vmm;
use vnet::testbed::{NetNs, TempPki, eventually, unique};

/// A loopback port free right now for `proto`.
fn free_port(proto: &str) -> u16 {
    if proto == "udp" {
        UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    } else {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }
}

fn link_exists(name: &str) -> bool {
    std::process::Command::new("ip")
        .args(["link", "show", name])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn two_processes_carry_traffic(proto: &str) {
    let pki = TempPki::new(2).unwrap();
    let tls = |i: usize| -> Vec<String> {
        if proto != "tls" {
            return Vec::new();
        }
        let d = pki.dir();
        [
            "--tls-cert",
            &format!("sw{i}.pem"),
            "--tls-key",
            &format!("sw{i}.key"),
            "--tls-ca",
            "ca.pem",
        ]
        .chunks(2)
        .flat_map(|kv| [kv[0].to_string(), d.join(kv[1]).display().to_string()])
        .collect()
    };
    let endpoint = format!("{proto}:127.0.0.1:{}", free_port(proto));
    let (tap_a, tap_b) = (unique("vpa"), unique("vpb"));
    let mut a_args = vec![
        "vnet".to_string(),
        "--tap".into(),
        tap_a.clone(),
        "--listen".into(),
        endpoint.clone(),
    ];
    a_args.extend(tls(0));
    let mut b_args = vec![
        "vnet".to_string(),
        "--tap".into(),
        tap_b.clone(),
        "--connect".into(),
        endpoint.clone(),
    ];
    b_args.extend(tls(1));
    let a = Vmm::start(&a_args);
    let b = Vmm::start(&b_args);
    assert!(
        eventually(20, || link_exists(&tap_a) && link_exists(&tap_b)),
        "the TAP ports never appeared"
    );
    let (ns_a, ns_b) = (NetNs::new().unwrap(), NetNs::new().unwrap());
    ns_a.adopt(&tap_a, "10.77.0.1/24").unwrap();
    ns_b.adopt(&tap_b, "10.77.0.2/24").unwrap();
    // The tunnel comes up in the background; then every ping must pass.
    assert!(
        eventually(20, || ns_b.ping("10.77.0.1", 1).is_ok()),
        "no ping across the {proto} tunnel"
    );
    ns_b.ping("10.77.0.1", 5).unwrap();
    ns_a.iperf_server().unwrap();
    let iperf = ns_b.iperf_client("10.77.0.1", 2).unwrap();
    eprintln!("{proto} tunnel between two processes: {iperf:?}");
    assert!(
        iperf.received_bps > 1e6,
        "{proto}: iperf3 moved almost nothing: {iperf:?}"
    );
    for vmm in [a, b] {
        vmm.signal(libc::SIGTERM);
        let done = vmm.wait(Duration::from_secs(10));
        // A clean stop on SIGTERM: 128 + 15, as `run` and `gvfs` exit.
        assert_eq!(
            done.status.code(),
            Some(143),
            "{proto}: exit {:?}: {}",
            done.status,
            done.stderr
        );
    }
}

#[test]
fn udp_tunnel_between_two_processes() {
    two_processes_carry_traffic("udp");
}

#[test]
fn tcp_tunnel_between_two_processes() {
    two_processes_carry_traffic("tcp");
}

#[test]
fn tls_tunnel_between_two_processes() {
    two_processes_carry_traffic("tls");
}
