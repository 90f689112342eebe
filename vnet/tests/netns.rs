//! Real Linux peers: network namespaces behind TAP ports of switches.
//! Needs root and /dev/net/tun (as in the project's test environment).

mod common;

use common::{NetNs, unique};
use std::sync::Arc;
use vnet::counters::DropReason;
use vnet::switch::{Switch, SwitchConfig};
use vnet::tap::TapPort;

fn tap_in(sw: &Arc<Switch>, ns: &NetNs, addr: &str) -> TapPort {
    let tap = TapPort::create(sw, &unique("vt")).expect("create TAP");
    ns.adopt(tap.name(), addr).unwrap();
    tap
}

#[test]
fn two_namespaces_on_one_switch_ping_and_iperf() {
    let sw = Switch::new(SwitchConfig::default()).unwrap();
    let (a, b) = (NetNs::new().unwrap(), NetNs::new().unwrap());
    let ta = tap_in(&sw, &a, "10.99.1.1/24");
    let tb = tap_in(&sw, &b, "10.99.1.2/24");
    let rtt = a.ping("10.99.1.2", 3).unwrap();
    assert!(rtt < 50.0, "rtt {rtt} ms");
    b.iperf_server().unwrap();
    let bps = a.iperf_client("10.99.1.2", 2).unwrap().received_bps;
    eprintln!("one switch: rtt {rtt:.3} ms, {:.0} Mbit/s", bps / 1e6);
    assert!(bps > 50e6, "throughput {bps} bit/s");
    // Both addresses learned on the right ports; traffic counted both ways.
    let macs = sw.macs();
    assert!(macs.iter().any(|m| m.port == ta.port()));
    assert!(macs.iter().any(|m| m.port == tb.port()));
    let pa = sw.port(ta.port()).unwrap().counters;
    let pb = sw.port(tb.port()).unwrap().counters;
    assert!(
        pa.rx_bytes > 1_000_000 && pb.tx_bytes > 1_000_000,
        "{pa:?} {pb:?}"
    );
    assert_eq!(pa.dropped(DropReason::Oversize), 0);
}
