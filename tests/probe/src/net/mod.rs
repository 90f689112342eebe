//! Network steps: a virtio-net device (virtio-mmio, found on the kernel
//! command line) driven by virtio-drivers' raw driver, and smoltcp for ARP,
//! ICMP echo and TCP. Everything is polled and every wait is bounded.
//!
//! - `mmio`: `virtio_mmio.device=` entries; `hal`, `pool`: DMA memory;
//!   `transport`: Linux's order of status writes;
//! - `dev`: the device and smoltcp's `Device`; `stack`: the interface;
//! - `ping`, `raw` (burst, count-rx), `tcp` (echo, bulk): the steps;
//! - `time`, `crc`: TSC time, CRC-32 and the bulk pattern.

pub mod crc;
mod dev;
pub mod hal;
pub mod mmio;
mod ping;
pub mod pool;
mod raw;
mod stack;
mod tcp;
pub mod time;
pub mod transport;

use crate::serial::{self, Json};
use core::net::Ipv4Addr;
pub use stack::Stack;

/// One parsed network step.
#[derive(Clone, Copy)]
pub enum Cmd {
    Up {
        ip: Ipv4Addr,
        prefix: u8,
        index: u32,
        stepwise: bool,
    },
    Serve {
        secs: u64,
    },
    Ping {
        to: Ipv4Addr,
        count: u32,
        interval_ms: u64,
    },
    Burst {
        to: [u8; 6],
        n: u64,
        size: u16,
    },
    CountRx {
        secs: u64,
        until: Option<u64>,
    },
    TcpEchoServer {
        port: u16,
        secs: u64,
    },
    TcpEcho {
        to: Ipv4Addr,
        port: u16,
        bytes: u64,
    },
    TcpBulkSend {
        to: Ipv4Addr,
        port: u16,
        bytes: u64,
    },
    TcpBulkRecv {
        port: u16,
        secs: u64,
    },
}

/// Longest wait a step may be given, in seconds.
const MAX_SECS: u64 = 3600;

/// Parses network step `name` with its arguments: `None` if `name` is not
/// a network step, `Err(arg)` for a bad or missing argument.
pub fn parse<'a>(
    name: &str,
    args: &mut impl Iterator<Item = &'a str>,
) -> Option<Result<Cmd, &'a str>> {
    let cmd = || -> Result<Cmd, &'a str> {
        let mut next = || args.next().ok_or("");
        Ok(match name {
            "net" => {
                let a = next()?;
                let (ip, prefix) = a.split_once('/').ok_or(a)?;
                let prefix = prefix.parse().ok().filter(|p| *p <= 32).ok_or(a)?;
                let index = match next() {
                    Err(_) => 0,
                    Ok(i) => i.parse().map_err(|_| i)?,
                };
                let stepwise = match next() {
                    Err(_) => true,
                    Ok("vd-status") => false,
                    Ok(o) => return Err(o),
                };
                Cmd::Up {
                    ip: ip.parse().map_err(|_| a)?,
                    prefix,
                    index,
                    stepwise,
                }
            }
            "serve" => Cmd::Serve {
                secs: secs(next()?)?,
            },
            "ping" => Cmd::Ping {
                to: ipv4(next()?)?,
                count: num(next()?, 1, 100_000)? as u32,
                interval_ms: match next() {
                    Err(_) => 0,
                    Ok(a) => num(a, 0, 60_000)?,
                },
            },
            "burst" => {
                let a = next()?;
                Cmd::Burst {
                    to: mac(a).ok_or(a)?,
                    n: num(next()?, 1, u64::MAX)?,
                    size: num(next()?, raw::MIN_SIZE, dev::MAX_FRAME as u64)? as u16,
                }
            }
            "count-rx" => Cmd::CountRx {
                secs: secs(next()?)?,
                until: match next() {
                    Err(_) => None,
                    Ok(a) => Some(num(a, 1, u64::MAX)?),
                },
            },
            "tcp-echo-server" => Cmd::TcpEchoServer {
                port: port(next()?)?,
                secs: secs(next()?)?,
            },
            "tcp-echo" => Cmd::TcpEcho {
                to: ipv4(next()?)?,
                port: port(next()?)?,
                bytes: num(next()?, 1, u64::MAX)?,
            },
            "tcp-bulk-send" => Cmd::TcpBulkSend {
                to: ipv4(next()?)?,
                port: port(next()?)?,
                bytes: num(next()?, 1, u64::MAX)?,
            },
            "tcp-bulk-recv" => Cmd::TcpBulkRecv {
                port: port(next()?)?,
                secs: secs(next()?)?,
            },
            _ => return Err(""),
        })
    };
    const NAMES: [&str; 9] = [
        "net",
        "serve",
        "ping",
        "burst",
        "count-rx",
        "tcp-echo-server",
        "tcp-echo",
        "tcp-bulk-send",
        "tcp-bulk-recv",
    ];
    NAMES.contains(&name).then(cmd)
}

fn num(a: &str, min: u64, max: u64) -> Result<u64, &str> {
    a.parse().ok().filter(|v| (min..=max).contains(v)).ok_or(a)
}

/// A number of seconds for a step (at most an hour).
pub fn secs(a: &str) -> Result<u64, &str> {
    num(a, 0, MAX_SECS)
}

fn port(a: &str) -> Result<u16, &str> {
    Ok(num(a, 1, 65535)? as u16)
}

fn ipv4(a: &str) -> Result<Ipv4Addr, &str> {
    a.parse().map_err(|_| a)
}

/// A MAC as six hex bytes separated by `-` (`:` separates arguments), or
/// twelve hex digits, or `broadcast`.
pub fn mac(a: &str) -> Option<[u8; 6]> {
    if a == "broadcast" {
        return Some([0xff; 6]);
    }
    let mut out = [0u8; 6];
    if a.len() == 12 && !a.contains('-') {
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(a.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        return Some(out);
    }
    let mut parts = a.split('-');
    for o in &mut out {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *o = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// Displays a MAC as `52:54:00:12:34:56`.
pub struct Mac(pub [u8; 6]);

impl core::fmt::Display for Mac {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// Displays `,"error":"MSG"` for `Some(MSG)`, nothing for `None`.
pub struct ErrorField(pub Option<&'static str>);

impl core::fmt::Display for ErrorField {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Some(msg) => write!(f, r#","error":"{}""#, Json(msg)),
            None => Ok(()),
        }
    }
}

/// State the network steps share: the command line (for the device list)
/// and the interface once `net` brought it up.
pub struct Ctx<'a> {
    cmdline: &'a str,
    stack: Option<&'static mut Stack>,
}

impl<'a> Ctx<'a> {
    pub fn new(cmdline: &'a str) -> Self {
        Ctx {
            cmdline,
            stack: None,
        }
    }

    /// Runs one network step.
    pub fn exec(&mut self, cmd: Cmd) {
        if let Cmd::Up {
            ip,
            prefix,
            index,
            stepwise,
        } = cmd
        {
            self.up(ip, prefix, index, stepwise);
            return;
        }
        let Some(stack) = self.stack.as_deref_mut() else {
            serial::line(format_args!(
                r#"{{"probe":"{}","error":"no interface (run net:IP/PREFIX first)"}}"#,
                step_name(cmd)
            ));
            return;
        };
        match cmd {
            Cmd::Up { .. } => {}
            Cmd::Serve { secs } => stack::serve(stack, secs),
            Cmd::Ping {
                to,
                count,
                interval_ms,
            } => ping::ping(stack, to, count, interval_ms),
            Cmd::Burst { to, n, size } => raw::burst(stack, to, n, size),
            Cmd::CountRx { secs, until } => raw::count_rx(stack, secs, until),
            Cmd::TcpEchoServer { port, secs } => tcp::echo_server(stack, port, secs),
            Cmd::TcpEcho { to, port, bytes } => tcp::echo_client(stack, to, port, bytes),
            Cmd::TcpBulkSend { to, port, bytes } => tcp::bulk_send(stack, to, port, bytes),
            Cmd::TcpBulkRecv { port, secs } => tcp::bulk_recv(stack, port, secs),
        }
    }

    /// The interface, once `net` brought it up.
    pub fn stack(&mut self) -> Option<&mut Stack> {
        self.stack.as_deref_mut()
    }

    fn up(&mut self, ip: Ipv4Addr, prefix: u8, index: u32, stepwise: bool) {
        let fail =
            |msg: &str| serial::line(format_args!(r#"{{"probe":"net","error":"{}"}}"#, Json(msg)));
        if self.stack.is_some() {
            return fail("interface already up");
        }
        let Some(dev) = mmio::net_device(self.cmdline, index) else {
            return fail("no virtio-net device with that index on the command line");
        };
        let (dev_base, dev_irq) = (dev.base, dev.irq);
        let nd = match dev::NetDev::up(dev, stepwise) {
            Ok(nd) => nd,
            Err(dev::UpError::Transport) => return fail("virtio-mmio transport refused"),
            Err(dev::UpError::NoMemory) => return fail("DMA pool exhausted"),
            Err(dev::UpError::Status(status)) => {
                serial::line(format_args!(
                    r#"{{"probe":"net","error":"device status {:#x} after initialisation, not {:#x}"}}"#,
                    status,
                    dev::STATUS_UP
                ));
                return;
            }
            Err(dev::UpError::QueueTooSmall(max)) => {
                serial::line(format_args!(
                    r#"{{"probe":"net","error":"queue size max {} < {}"}}"#,
                    max,
                    dev::QSIZE
                ));
                return;
            }
            Err(dev::UpError::Driver(e)) => {
                serial::line(format_args!(
                    r#"{{"probe":"net","error":"virtio-drivers: {:?}"}}"#,
                    e
                ));
                return;
            }
        };
        let mac = nd.mac();
        let link = nd.link();
        let Some(stack) = Stack::new(nd, ip, prefix) else {
            return fail("DMA pool exhausted");
        };
        self.stack = Some(stack);
        let link = match link {
            None => "null",
            Some(true) => "true",
            Some(false) => "false",
        };
        serial::line(format_args!(
            r#"{{"probe":"net","mac":"{}","ip":"{}/{}","mtu":{},"link":{},"base":"{:#x}","irq":{},"queue":{}}}"#,
            Mac(mac),
            ip,
            prefix,
            dev::MTU,
            link,
            dev_base,
            dev_irq,
            dev::QSIZE
        ));
    }
}

fn step_name(cmd: Cmd) -> &'static str {
    match cmd {
        Cmd::Up { .. } => "net",
        Cmd::Serve { .. } => "serve",
        Cmd::Ping { .. } => "ping",
        Cmd::Burst { .. } => "burst",
        Cmd::CountRx { .. } => "rx",
        Cmd::TcpEchoServer { .. } => "tcp-echo-server",
        Cmd::TcpEcho { .. } => "tcp-echo",
        Cmd::TcpBulkSend { .. } => "tcp-bulk-send",
        Cmd::TcpBulkRecv { .. } => "tcp-bulk-recv",
    }
}
