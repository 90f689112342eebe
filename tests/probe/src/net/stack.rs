//! The smoltcp interface over the device, and the `serve` step.

use super::dev::NetDev;
use super::pool;
use super::time::{self, Deadline};
use crate::{hw, serial};
use core::net::Ipv4Addr;
use smoltcp::iface::{Config, Interface, PollResult, SocketSet};
use smoltcp::wire::{EthernetAddress, IpCidr, Ipv4Cidr};

/// The device and its interface.
pub struct Stack {
    pub dev: NetDev,
    pub iface: Interface,
}

impl Stack {
    /// Brings up the interface with `ip/prefix`; the stack lives in the pool.
    pub fn new(mut dev: NetDev, ip: Ipv4Addr, prefix: u8) -> Option<&'static mut Stack> {
        let mut config = Config::new(EthernetAddress(dev.mac()).into());
        config.random_seed = hw::rdtsc();
        let mut iface = Interface::new(config, &mut dev, time::now());
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::Ipv4(Ipv4Cidr::new(ip, prefix)));
        });
        pool::place(Stack { dev, iface })
    }

    /// One round of smoltcp processing; true if a socket may have changed.
    pub fn poll(&mut self, sockets: &mut SocketSet<'_>) -> bool {
        let changed = self.iface.poll(time::now(), &mut self.dev, sockets) != PollResult::None;
        self.dev.flush_tx();
        changed
    }

    /// An ephemeral local port for an outgoing connection.
    pub fn ephemeral_port(&self) -> u16 {
        49152 + (hw::rdtsc() % 16384) as u16
    }
}

/// `serve:SECONDS`: answers ARP and ping for that long.
pub fn serve(stack: &mut Stack, secs: u64) {
    let before = stack.dev.counters();
    let mut storage: [smoltcp::iface::SocketStorage<'_>; 0] = [];
    let mut sockets = SocketSet::new(&mut storage[..]);
    let end = Deadline::after_ms(secs * 1000);
    while !end.expired() {
        stack.poll(&mut sockets);
    }
    let after = stack.dev.counters();
    serial::line(format_args!(
        r#"{{"probe":"serve","seconds":{},"rx":{},"tx":{},"device_errors":{}}}"#,
        secs,
        after.rx_frames - before.rx_frames,
        after.tx_frames - before.tx_frames,
        after.device_errors - before.device_errors,
    ));
}
