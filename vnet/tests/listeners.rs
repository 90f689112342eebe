//! TCP and TLS tunnel listeners against peers that do not play along:
//! trickled handshakes, oversized first messages, idle connections,
//! too many tunnels from one address, no descriptors left.

mod common;

use common::{eventually, pki};
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vnet::switch::{Switch, SwitchConfig};
use vnet::tunnel::wire::{self, MSG_HELLO};
use vnet::tunnel::{
    Endpoint, Listener, MAX_PEERS_PER_ADDR, MAX_PENDING, MAX_PENDING_PER_ADDR, Proto, TlsConfig,
    Tunnel, TunnelOptions, TunnelState,
};

fn switch() -> Arc<Switch> {
    Switch::new(SwitchConfig::default()).unwrap()
}

fn listen(sw: &Arc<Switch>, proto: Proto, tls: Option<TlsConfig>) -> Listener {
    let ep = Endpoint {
        proto,
        addr: "127.0.0.1:0".into(),
    };
    Listener::bind(
        sw,
        ep,
        &TunnelOptions {
            tls,
            ..Default::default()
        },
    )
    .unwrap()
}

/// A TCP connection to `to` from address `from` (any of 127/8 is this
/// host), as a peer at another address would open it.
fn connect_from(from: Ipv4Addr, to: SocketAddr) -> TcpStream {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, socket};
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .unwrap();
    bind(
        fd.as_raw_fd(),
        &SockaddrIn::from(SocketAddrV4::new(from, 0)),
    )
    .unwrap();
    let SocketAddr::V4(to) = to else {
        panic!("IPv4 only")
    };
    connect(fd.as_raw_fd(), &SockaddrIn::from(to)).unwrap();
    TcpStream::from(fd)
}

/// Whether the other end has closed `s` (reads and drops what it sent).
fn closed(s: &mut TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// Sends `bytes` one at a time, `every` apart; true if the listener
/// closed the connection before they were all sent.
fn trickle(mut s: TcpStream, bytes: &[u8], every: Duration) -> bool {
    for b in bytes {
        if closed(&mut s) || s.write_all(&[*b]).is_err() {
            return true;
        }
        std::thread::sleep(every);
    }
    closed(&mut s)
}

fn hello_msg(origin: u64) -> Vec<u8> {
    let mut m = Vec::new();
    wire::encode_stream(&mut m, MSG_HELLO, &wire::hello(origin));
    m
}

#[test]
fn a_peer_trickling_its_handshake_is_dropped_at_the_deadline() {
    let p = pki(1).unwrap();
    let (swt, swl) = (switch(), switch());
    let tcp = listen(&swt, Proto::Tcp, None);
    let tls = listen(&swl, Proto::Tls, Some(p[0].tls_config().unwrap()));
    let started = Instant::now();
    std::thread::scope(|s| {
        // TCP: a whole hello, one byte every 400 ms (7.2 s in all).
        let t = s.spawn(|| {
            let c = TcpStream::connect(tcp.local_addr()).unwrap();
            trickle(c, &hello_msg(7), Duration::from_millis(400))
        });
        // TLS: a 12 KiB handshake record, a byte every 300 ms.
        let l = s.spawn(|| {
            let c = TcpStream::connect(tls.local_addr()).unwrap();
            let mut rec = vec![0x16, 0x03, 0x01, 0x30, 0x00];
            rec.resize(30, 0);
            trickle(c, &rec, Duration::from_millis(300))
        });
        assert!(t.join().unwrap(), "the TCP listener waited for the trickle");
        assert!(l.join().unwrap(), "the TLS listener waited for the trickle");
    });
    eprintln!("dropped after {:?}", started.elapsed());
    assert!(swt.ports().is_empty() && swl.ports().is_empty());
    assert!(tcp.info().tunnels.iter().all(|t| t.ups == 0));
}

#[test]
fn a_first_message_bigger_than_a_hello_is_refused_at_once() {
    let sw = switch();
    let l = listen(&sw, Proto::Tcp, None);
    let mut c = TcpStream::connect(l.local_addr()).unwrap();
    // A length prefix of 1 MiB (the largest message) and a hello type:
    // the listener must not read (or hold a buffer for) that much from a
    // peer it does not know yet. The trickle (3 s) keeps a per-read
    // timeout from ever firing, and ends before the deadline.
    c.write_all(&[0x00, 0x10, 0x00, 0x00, MSG_HELLO]).unwrap();
    assert!(
        trickle(c, &[0; 12], Duration::from_millis(250)),
        "the listener waited for a 1 MiB hello"
    );
    assert!(sw.ports().is_empty());
}

#[test]
fn idle_connections_are_capped_and_do_not_keep_out_a_real_peer() {
    let sw = switch();
    let l = listen(&sw, Proto::Tcp, None);
    let n = 3 * MAX_PENDING;
    // Idle connections from eight addresses: more than the listener
    // takes in all, more than it takes per address.
    let idle: Vec<TcpStream> = (0..n)
        .map(|i| connect_from(Ipv4Addr::new(127, 0, 0, 2 + (i % 8) as u8), l.local_addr()))
        .collect();
    assert!(
        eventually(5, || {
            let i = l.info();
            i.tunnels.len() + i.refused as usize >= n
        }),
        "{:?}",
        l.info()
    );
    let info = l.info();
    let waiting: Vec<_> = info
        .tunnels
        .iter()
        .filter(|t| t.state == TunnelState::Connecting)
        .collect();
    assert!(
        waiting.len() <= MAX_PENDING && info.pending <= MAX_PENDING,
        "{} connections in their handshake, {} pending",
        waiting.len(),
        info.pending
    );
    for k in 2..10u8 {
        let from = format!("127.0.0.{k}:");
        let per = waiting.iter().filter(|t| t.peer.starts_with(&from)).count();
        assert!(per <= MAX_PENDING_PER_ADDR, "{per} from {from}");
    }
    // A real switch still gets in, while the idle ones are still open.
    let other = switch();
    let t = Tunnel::connect(
        &other,
        Endpoint {
            proto: Proto::Tcp,
            addr: l.local_addr().to_string(),
        },
        &TunnelOptions::default(),
    )
    .unwrap();
    assert!(
        eventually(4, || t.info().state == TunnelState::Up),
        "{:?}",
        t.info()
    );
    assert_eq!(sw.ports().len(), 1);
    drop(idle);
}

#[test]
fn tunnels_from_one_address_are_capped() {
    let sw = switch();
    let l = listen(&sw, Proto::Tcp, None);
    let from = Ipv4Addr::new(127, 0, 0, 3);
    let mut up = Vec::new();
    let mut turned_away = 0;
    // One after the other, each a whole handshake: a peer that says
    // hello gets a hello back and a port; past the cap it is closed.
    for i in 0..MAX_PEERS_PER_ADDR + 4 {
        let mut c = connect_from(from, l.local_addr());
        c.write_all(&hello_msg(100 + i as u64)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut h = [0u8; 4 + 1 + wire::HELLO_LEN];
        match c.read_exact(&mut h) {
            Ok(()) => {
                assert!(
                    eventually(3, || sw.ports().len() == up.len() + 1),
                    "{:?}",
                    l.info()
                );
                up.push(c);
            }
            Err(_) => turned_away += 1,
        }
    }
    assert_eq!(up.len(), MAX_PEERS_PER_ADDR, "{:?}", l.info());
    assert_eq!(turned_away, 4);
    assert_eq!(sw.ports().len(), MAX_PEERS_PER_ADDR);
    assert!(l.info().refused >= 4);
    // Another address still gets in.
    let mut c = connect_from(Ipv4Addr::new(127, 0, 0, 4), l.local_addr());
    c.write_all(&hello_msg(1)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut h = [0u8; 4 + 1 + wire::HELLO_LEN];
    c.read_exact(&mut h).unwrap();
    assert!(eventually(3, || sw.ports().len() == MAX_PEERS_PER_ADDR + 1));
}

const CHILD: &str = "VNET_TEST_EMFILE_CHILD";

/// The accept loop when the process has no descriptor left: the peer's
/// connection waits in the backlog, so every accept fails at once. It
/// must not spin, must log rarely, and must take the peer in once
/// descriptors are back. Runs in a child process (it lowers the
/// process's descriptor limit).
#[test]
fn accepting_without_descriptors_neither_spins_nor_floods_the_log() {
    const NAME: &str = "accepting_without_descriptors_neither_spins_nor_floods_the_log";
    if std::env::var_os(CHILD).is_some() {
        return emfile_child();
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    let lines = text.lines().filter(|l| l.contains("accept failed")).count();
    assert!(
        (1..=2).contains(&lines),
        "{lines} log lines in 2 s:\n{text}"
    );
}

fn cpu_time() -> Duration {
    // SAFETY: rusage is plain old data; zeroes are a valid value.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the live struct it is given.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) }, 0);
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Sets the soft limit on open descriptors; returns the old limits.
fn set_nofile(soft: Option<libc::rlimit>) -> libc::rlimit {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the live struct it is given.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut old) }, 0);
    let new = soft.unwrap_or(libc::rlimit {
        rlim_cur: 0,
        rlim_max: old.rlim_max,
    });
    // SAFETY: setrlimit reads the live struct it is given.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) }, 0);
    old
}

fn emfile_child() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .init();
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, connect, socket};
    use std::os::fd::AsRawFd;
    let sw = switch();
    let l = listen(&sw, Proto::Tcp, None);
    let SocketAddr::V4(to) = l.local_addr() else {
        panic!("IPv4 only")
    };
    // The peers' sockets exist before the limit drops; connecting them
    // needs no new descriptor, accepting them does.
    let peers: Vec<_> = (0..3)
        .map(|_| {
            socket(
                AddressFamily::Inet,
                SockType::Stream,
                SockFlag::empty(),
                None,
            )
            .unwrap()
        })
        .collect();
    let old = set_nofile(None);
    for p in &peers {
        connect(p.as_raw_fd(), &SockaddrIn::from(to)).unwrap();
    }
    let cpu = cpu_time();
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_time() - cpu;
    set_nofile(Some(old));
    assert!(used < Duration::from_millis(500), "{used:?} of CPU in 2 s");
    // Descriptors back: a peer gets in and through its handshake.
    let mut c = TcpStream::connect(l.local_addr()).unwrap();
    c.write_all(&hello_msg(5)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut h = [0u8; 4 + 1 + wire::HELLO_LEN];
    c.read_exact(&mut h).unwrap();
    assert!(eventually(3, || sw.ports().len() == 1));
}
