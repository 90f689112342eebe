//! How many peers a listener takes in, and from where.
//!
//! Every connection a listener accepts (a TCP or TLS stream, or a UDP
//! peer that echoed its cookie) holds an admission ticket while it
//! lives. Tickets are bounded in all and per peer address; those still
//! in their handshake ("pending": unauthenticated, each on a thread) are
//! bounded tighter. When the pending ones are all taken, a newcomer
//! takes the place of the oldest pending connection of the address that
//! holds the most, so a peer that opens connections and sends nothing
//! cannot keep others out; and each handshake must finish within
//! [`HANDSHAKE_DEADLINE`] however the peer paces its bytes.

use super::{Status, lock};
use crate::ratelimit::LogLimit;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Time a peer has for the whole handshake (TCP connect to hello, TLS
/// included) before it is dropped: a handful of round trips on the
/// slowest path plus a loaded host's scheduling; the same 5 s after
/// which a silent peer is down.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);
/// Connections in their handshake per listener. Each has a thread and a
/// few KiB until it says hello; peers reconnect with back-off, so a
/// star of a few hundred switches comes up through a few dozen slots.
pub const MAX_PENDING: usize = 32;
/// Connections in their handshake per peer address: a switch opens one
/// at a time; a few allow several switches behind one address (NAT).
pub const MAX_PENDING_PER_ADDR: usize = 4;
/// Tunnels (pending or up) per listener: each up tunnel is a port that
/// every flooded frame is copied to, and holds about 256 KiB of buffers
/// (TCP, TLS; its message buffer grows to its biggest message, at most
/// 256 KiB more); 256 covers the hub of a large star.
pub const MAX_PEERS: usize = 256;
/// Tunnels (pending or up) per peer address: a host runs a few switches
/// (one per `vmplant` process); 16 leaves room for NAT.
pub const MAX_PEERS_PER_ADDR: usize = 16;

/// The part of a peer's address that counts as one peer: an IPv4
/// address, or the /64 of an IPv6 one (what one host is given).
pub(crate) fn addr_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut o = v6.octets();
                o[8..].fill(0);
                IpAddr::V6(o.into())
            }
        },
    }
}

/// A peer's address as the traffic matrix tells neighbours apart: its
/// [`addr_key`], as an IPv6 address's bits (IPv4 mapped).
pub(crate) fn neighbour_id(ip: IpAddr) -> u128 {
    match addr_key(ip) {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

struct Conn {
    id: u64,
    key: IpAddr,
    pending: bool,
    since: Instant,
    status: Arc<Status>,
}

/// The connections of one listener.
#[derive(Default)]
pub(crate) struct Admission {
    conns: Mutex<Vec<Conn>>,
    next: AtomicU64,
    refused: AtomicU64,
    log: LogLimit,
}

/// A connection's place; given back when dropped.
pub(crate) struct Ticket {
    adm: Arc<Admission>,
    id: u64,
}

impl Ticket {
    /// The handshake is done: the connection no longer counts as pending.
    pub(crate) fn established(&self) {
        if let Some(c) = lock(&self.adm.conns).iter_mut().find(|c| c.id == self.id) {
            c.pending = false;
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        lock(&self.adm.conns).retain(|c| c.id != self.id);
    }
}

impl Admission {
    /// A ticket for a connection from `peer` (stopped through `status` if
    /// it must make room), or `None` if the listener is full for it.
    pub(crate) fn admit(self: &Arc<Self>, peer: IpAddr, status: &Arc<Status>) -> Option<Ticket> {
        let key = addr_key(peer);
        let mut conns = lock(&self.conns);
        let from_peer = conns.iter().filter(|c| c.key == key);
        let (all, pending) =
            from_peer.fold((0, 0), |(a, p), c| (a + 1, p + usize::from(c.pending)));
        let why = if conns.len() >= MAX_PEERS {
            Some("listener full")
        } else if all >= MAX_PEERS_PER_ADDR {
            Some("too many tunnels from this address")
        } else if pending >= MAX_PENDING_PER_ADDR {
            Some("too many handshakes from this address")
        } else {
            None
        };
        if let Some(why) = why {
            drop(conns);
            self.refused.fetch_add(1, Relaxed);
            if let Some(held) = self.log.check() {
                tracing::info!(%peer, reason = why, held_back = held, "tunnel connection refused");
            }
            return None;
        }
        if conns.iter().filter(|c| c.pending).count() >= MAX_PENDING
            && let Some(i) = oldest_of_busiest(&conns)
        {
            let victim = conns.swap_remove(i);
            victim.status.stop();
            self.refused.fetch_add(1, Relaxed);
            if let Some(held) = self.log.check() {
                tracing::info!(peer = %victim.key, held_back = held, "handshake dropped to make room");
            }
        }
        let id = self.next.fetch_add(1, Relaxed);
        conns.push(Conn {
            id,
            key,
            pending: true,
            since: Instant::now(),
            status: status.clone(),
        });
        Some(Ticket {
            adm: self.clone(),
            id,
        })
    }

    /// Connections in their handshake now.
    pub(crate) fn pending(&self) -> usize {
        lock(&self.conns).iter().filter(|c| c.pending).count()
    }

    /// Connections refused, or dropped to make room, so far.
    pub(crate) fn refused(&self) -> u64 {
        self.refused.load(Relaxed)
    }
}

/// The oldest pending connection of the address with the most pending.
fn oldest_of_busiest(conns: &[Conn]) -> Option<usize> {
    let count = |k: IpAddr| conns.iter().filter(|c| c.pending && c.key == k).count();
    conns
        .iter()
        .enumerate()
        .filter(|(_, c)| c.pending)
        .max_by(|(_, a), (_, b)| count(a.key).cmp(&count(b.key)).then(b.since.cmp(&a.since)))
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::{Proto, Role, TunnelState};

    fn status() -> Arc<Status> {
        Arc::new(Status::new(0, Proto::Tcp, Role::Accepted, String::new()))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn bounds_per_address_and_in_all_and_room_for_newcomers() {
        let adm = Arc::new(Admission::default());
        let a = ip("10.0.0.1");
        let mut held: Vec<(Ticket, Arc<Status>)> = Vec::new();
        for _ in 0..MAX_PENDING_PER_ADDR {
            let s = status();
            held.push((adm.admit(a, &s).unwrap(), s));
        }
        assert!(adm.admit(a, &status()).is_none(), "pending per address");
        for (t, _) in &held {
            t.established();
        }
        while held.len() < MAX_PEERS_PER_ADDR {
            let s = status();
            let t = adm.admit(a, &s).unwrap();
            t.established();
            held.push((t, s));
        }
        assert!(adm.admit(a, &status()).is_none(), "tunnels per address");
        assert_eq!(adm.refused(), 2);
        held.pop();
        assert!(adm.admit(a, &status()).is_some(), "a place given back");

        // Idle handshakes from many addresses fill the pending places; a
        // newcomer still gets in, in place of the oldest of the busiest.
        let adm = Arc::new(Admission::default());
        let mut idle = Vec::new();
        for i in 0..MAX_PENDING {
            let s = status();
            let who = ip(&format!("10.1.0.{}", i % 8));
            idle.push((adm.admit(who, &s).unwrap(), s));
        }
        assert_eq!(adm.pending(), MAX_PENDING);
        let s = status();
        let _t = adm.admit(ip("10.2.0.1"), &s).unwrap();
        assert_eq!(adm.pending(), MAX_PENDING);
        assert_eq!(adm.refused(), 1);
        assert!(idle[0].1.stopped(), "the oldest idle handshake was stopped");
        assert!(idle[1..].iter().all(|(_, s)| !s.stopped()));
        assert_eq!(idle[0].1.info().state, TunnelState::Connecting);
        assert_eq!(
            addr_key(ip("2001:db8:1:2:3:4:5:6")),
            ip("2001:db8:1:2::"),
            "an IPv6 peer counts by its /64"
        );
        assert_eq!(addr_key(ip("::ffff:10.0.0.1")), ip("10.0.0.1"));
    }
}
