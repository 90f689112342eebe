//! TCP steps: an echo server and client, and a bulk transfer whose bytes
//! follow the pattern of [`super::crc::Pattern`] (byte i = i % 251) and are
//! summed with CRC-32, so either end can check them against the other (or
//! against a Linux peer: `python3 -c 'import zlib; ...'`).

use super::ErrorField;
use super::crc::{Crc32, Pattern};
use super::pool;
use super::stack::Stack;
use super::time::{Deadline, Mbps};
use super::transport::kicks;
use crate::serial::{self, Json};
use core::net::Ipv4Addr;
use smoltcp::iface::{SocketHandle, SocketSet, SocketStorage};
use smoltcp::socket::tcp::{self, State};
use smoltcp::wire::IpAddress;

/// Socket buffer sizes (each way). Over 64 KiB, so window scaling is used.
const BULK_BUF: usize = 256 * 1024;
const ECHO_BUF: usize = 64 * 1024;
/// How long a connect may take.
const CONNECT_MS: u64 = 10_000;
/// How long a transfer may go without progress before it is abandoned.
const STALL_MS: u64 = 10_000;
/// How long to wait for the close handshake.
const CLOSE_MS: u64 = 2_000;

/// A TCP socket over pool buffers, in a one-socket set.
fn socket<'s>(
    storage: &'s mut [SocketStorage<'s>; 1],
    buf: usize,
) -> Option<(SocketSet<'s>, SocketHandle)> {
    let rx = pool::bytes(buf)?;
    let tx = pool::bytes(buf)?;
    let mut s = tcp::Socket::new(tcp::SocketBuffer::new(rx), tcp::SocketBuffer::new(tx));
    s.set_nagle_enabled(false);
    let mut set = SocketSet::new(&mut storage[..]);
    let h = set.add(s);
    Some((set, h))
}

fn no_memory(step: &str) {
    serial::line(format_args!(
        r#"{{"probe":"{}","error":"socket buffer pool exhausted"}}"#,
        Json(step)
    ));
}

/// Polls until `done` holds for the socket or `ms` pass; true if it held.
fn wait(
    stack: &mut Stack,
    set: &mut SocketSet<'_>,
    h: SocketHandle,
    ms: u64,
    done: impl Fn(&tcp::Socket<'_>) -> bool,
) -> bool {
    let end = Deadline::after_ms(ms);
    loop {
        stack.poll(set);
        if done(set.get::<tcp::Socket>(h)) {
            return true;
        }
        if end.expired() {
            return false;
        }
    }
}

/// Connects to `to:port`; an error message on failure.
fn connect(
    stack: &mut Stack,
    set: &mut SocketSet<'_>,
    h: SocketHandle,
    to: Ipv4Addr,
    port: u16,
) -> Result<(), &'static str> {
    let local = stack.ephemeral_port();
    let s = set.get_mut::<tcp::Socket>(h);
    s.connect(stack.iface.context(), (IpAddress::Ipv4(to), port), local)
        .map_err(|_| "connect")?;
    let ok = wait(stack, set, h, CONNECT_MS, |s| {
        s.state() == State::Established || s.state() == State::Closed
    });
    match set.get::<tcp::Socket>(h).state() {
        State::Established => Ok(()),
        _ if ok => Err("connection refused"),
        _ => Err("connect timeout"),
    }
}

/// Closes and waits (bounded) for the close handshake.
fn close(stack: &mut Stack, set: &mut SocketSet<'_>, h: SocketHandle) {
    set.get_mut::<tcp::Socket>(h).close();
    wait(stack, set, h, CLOSE_MS, |s| {
        matches!(s.state(), State::Closed | State::TimeWait)
    });
}

/// `tcp-echo-server:PORT:SECONDS`: echoes every connection (one at a time)
/// for SECONDS.
pub fn echo_server(stack: &mut Stack, port: u16, secs: u64) {
    let mut storage = [SocketStorage::EMPTY; 1];
    let Some((mut set, h)) = socket(&mut storage, ECHO_BUF) else {
        return no_memory("tcp-echo-server");
    };
    let end = Deadline::after_ms(secs * 1000);
    let (mut connections, mut bytes) = (0u64, 0u64);
    let mut was_active = false;
    let mut chunk = [0u8; 2048];
    while !end.expired() {
        stack.poll(&mut set);
        let s = set.get_mut::<tcp::Socket>(h);
        if !s.is_open() && s.listen(port).is_err() {
            break;
        }
        if s.is_active() && !was_active {
            connections += 1;
        }
        was_active = s.is_active();
        while s.can_recv() && s.can_send() {
            let room = (s.send_capacity() - s.send_queue()).min(chunk.len());
            let n = s.recv_slice(&mut chunk[..room]).unwrap_or(0);
            if n == 0 {
                break;
            }
            let _ = s.send_slice(&chunk[..n]);
            bytes += n as u64;
        }
        if s.state() == State::CloseWait && s.send_queue() == 0 {
            s.close();
        }
    }
    set.get_mut::<tcp::Socket>(h).abort();
    stack.poll(&mut set);
    serial::line(format_args!(
        r#"{{"probe":"tcp-echo-server","port":{},"seconds":{},"connections":{},"bytes":{}}}"#,
        port, secs, connections, bytes
    ));
}

/// `tcp-echo:IP:PORT:BYTES`: sends BYTES of the pattern to an echo server
/// and checks that the same bytes come back.
pub fn echo_client(stack: &mut Stack, to: Ipv4Addr, port: u16, bytes: u64) {
    let mut storage = [SocketStorage::EMPTY; 1];
    let Some((mut set, h)) = socket(&mut storage, ECHO_BUF) else {
        return no_memory("tcp-echo");
    };
    let t = Deadline::after_ms(0);
    if let Err(e) = connect(stack, &mut set, h, to, port) {
        return report_error("tcp-echo", to, port, e);
    }
    let (mut sent, mut got) = (0u64, 0u64);
    let (mut out, mut back) = (Pattern::default(), Pattern::default());
    let mut intact = true;
    let mut stall = Deadline::after_ms(STALL_MS);
    let mut error = None;
    while got < bytes {
        stack.poll(&mut set);
        let s = set.get_mut::<tcp::Socket>(h);
        let before = (sent, got);
        if sent < bytes && s.can_send() {
            let want = (bytes - sent).min(usize::MAX as u64) as usize;
            sent += s
                .send(|buf| {
                    let n = buf.len().min(want);
                    out.fill(&mut buf[..n]);
                    (n, n as u64)
                })
                .unwrap_or(0);
        }
        if s.can_recv() {
            got += s
                .recv(|data| {
                    intact &= back.check(data);
                    (data.len(), data.len() as u64)
                })
                .unwrap_or(0);
        }
        if (sent, got) != before {
            stall = Deadline::after_ms(STALL_MS);
        } else if stall.expired() {
            error = Some("stalled 10 s");
            break;
        } else if !s.may_recv() {
            error = Some("closed by peer");
            break;
        }
    }
    close(stack, &mut set, h);
    let ns = t.elapsed_ns();
    serial::line(format_args!(
        r#"{{"probe":"tcp-echo","to":"{}:{}","sent":{},"received":{},"intact":{},"ns":{}{}}}"#,
        to,
        port,
        sent,
        got,
        intact && got == bytes,
        ns,
        ErrorField(error),
    ));
}

/// Displays an optional endpoint as `IP:PORT` (empty if none).
struct Endpoint(Option<smoltcp::wire::IpEndpoint>);

impl core::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Some(e) => write!(f, "{}", e),
            None => Ok(()),
        }
    }
}

fn report_error(step: &str, to: Ipv4Addr, port: u16, e: &str) {
    serial::line(format_args!(
        r#"{{"probe":"{}","to":"{}:{}","error":"{}"}}"#,
        Json(step),
        to,
        port,
        Json(e)
    ));
}

/// `tcp-bulk-send:IP:PORT:BYTES`: sends BYTES of the pattern, then closes;
/// the time runs from the connection being established to the last byte
/// being acknowledged.
pub fn bulk_send(stack: &mut Stack, to: Ipv4Addr, port: u16, bytes: u64) {
    let mut storage = [SocketStorage::EMPTY; 1];
    let Some((mut set, h)) = socket(&mut storage, BULK_BUF) else {
        return no_memory("tcp-bulk-send");
    };
    if let Err(e) = connect(stack, &mut set, h, to, port) {
        return report_error("tcp-bulk-send", to, port, e);
    }
    let c0 = stack.dev.counters();
    let k0 = kicks();
    let t = Deadline::after_ms(0);
    let mut sent = 0u64;
    let mut pattern = Pattern::default();
    let mut crc = Crc32::new();
    let mut stall = Deadline::after_ms(STALL_MS);
    let mut acked = 0u64;
    let mut error = None;
    loop {
        stack.poll(&mut set);
        let s = set.get_mut::<tcp::Socket>(h);
        if sent < bytes && s.can_send() {
            let want = (bytes - sent).min(usize::MAX as u64) as usize;
            sent += s
                .send(|buf| {
                    let n = buf.len().min(want);
                    pattern.fill(&mut buf[..n]);
                    crc.update(&buf[..n]);
                    (n, n as u64)
                })
                .unwrap_or(0);
        }
        let now_acked = sent - s.send_queue() as u64;
        if now_acked != acked {
            acked = now_acked;
            stall = Deadline::after_ms(STALL_MS);
        }
        if acked == bytes {
            break;
        }
        if !s.may_send() {
            error = Some("closed by peer");
            break;
        }
        if stall.expired() {
            error = Some("stalled 10 s");
            break;
        }
    }
    let ns = t.elapsed_ns();
    let c = stack.dev.counters();
    let k = kicks();
    close(stack, &mut set, h);
    serial::line(format_args!(
        r#"{{"probe":"tcp-bulk-send","to":"{}:{}","bytes":{},"ns":{},"mbit_s":{},"crc32":"{:08x}","frames_tx":{},"frames_rx":{},"tx_kicks":{},"rx_kicks":{}{}}}"#,
        to,
        port,
        acked,
        ns,
        Mbps(acked, ns),
        crc.value(),
        c.tx_frames - c0.tx_frames,
        c.rx_frames - c0.rx_frames,
        k.1 - k0.1,
        k.0 - k0.0,
        ErrorField(error),
    ));
}

/// `tcp-bulk-recv:PORT:SECONDS`: accepts one connection within SECONDS and
/// receives until the peer closes (or SECONDS pass); the time runs from the
/// first byte to the peer's FIN.
pub fn bulk_recv(stack: &mut Stack, port: u16, secs: u64) {
    let mut storage = [SocketStorage::EMPTY; 1];
    let Some((mut set, h)) = socket(&mut storage, BULK_BUF) else {
        return no_memory("tcp-bulk-recv");
    };
    if set.get_mut::<tcp::Socket>(h).listen(port).is_err() {
        return no_memory("tcp-bulk-recv");
    }
    let c0 = stack.dev.counters();
    let k0 = kicks();
    let end = Deadline::after_ms(secs * 1000);
    let mut start: Option<Deadline> = None;
    let ns;
    let mut got = 0u64;
    let mut pattern = Pattern::default();
    let mut crc = Crc32::new();
    let mut intact = true;
    let mut from = None;
    let mut error = None;
    loop {
        stack.poll(&mut set);
        let s = set.get_mut::<tcp::Socket>(h);
        if from.is_none() && s.may_recv() {
            // Established (may_recv is false while listening or in
            // SYN-RECEIVED).
            from = s.remote_endpoint();
        }
        if s.can_recv() {
            if start.is_none() {
                start = Some(Deadline::after_ms(0));
            }
            got += s
                .recv(|data| {
                    intact &= pattern.check(data);
                    crc.update(data);
                    (data.len(), data.len() as u64)
                })
                .unwrap_or(0);
        }
        if from.is_some() && !s.may_recv() && !s.can_recv() {
            ns = start.map_or(0, |d| d.elapsed_ns());
            break;
        }
        if end.expired() {
            ns = start.map_or(0, |d| d.elapsed_ns());
            error = Some(if from.is_some() {
                "timeout before the peer closed"
            } else {
                "no connection"
            });
            break;
        }
    }
    let c = stack.dev.counters();
    let k = kicks();
    close(stack, &mut set, h);
    serial::line(format_args!(
        r#"{{"probe":"tcp-bulk-recv","port":{},"from":"{}","bytes":{},"ns":{},"mbit_s":{},"crc32":"{:08x}","pattern_ok":{},"frames_rx":{},"frames_tx":{},"rx_kicks":{},"tx_kicks":{}{}}}"#,
        port,
        Endpoint(from),
        got,
        ns,
        Mbps(got, ns),
        crc.value(),
        intact,
        c.rx_frames - c0.rx_frames,
        c.tx_frames - c0.tx_frames,
        k.0 - k0.0,
        k.1 - k0.1,
        ErrorField(error),
    ));
}
