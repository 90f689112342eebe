//! What the server lets peers and clients hold, and the tools that keep
//! them to it: per-peer and total connection counts, a bounded pool of
//! request places, and the deadline that ends a handshake still running.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::lock;

/// Connections in all, authenticated or not. Each is one client mount (a
/// host FUSE mount or one VM's share) and costs two threads and four
/// descriptors; a host agent serving a few hundred VMs stays well under.
/// Past it a new connection is closed at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// Connections from one IP address: one host running many VMs, each share
/// its own connection, fits; one peer cannot take every place.
pub const DEFAULT_MAX_CONNECTIONS_PER_PEER: usize = 256;

/// Connections still in their handshake, in all. A real handshake is done
/// in one or two round trips; a peer that holds one open does so for at
/// most [`DEFAULT_HANDSHAKE_TIMEOUT`]. When all are taken the server stops
/// accepting (new connections wait in the listen backlog) rather than
/// refusing: a burst of clients reconnecting after a restart gets in.
pub const DEFAULT_MAX_HANDSHAKES: usize = 128;

/// Handshakes from one IP address at once: enough for a host whose VMs all
/// reconnect together, and an unauthenticated peer holds at most this many
/// of the [`DEFAULT_MAX_HANDSHAKES`]. Past it a connection is closed at once.
pub const DEFAULT_MAX_HANDSHAKES_PER_PEER: usize = 32;

/// The whole handshake (TLS and GVFS), however the peer spaces its bytes:
/// ample for TLS over a slow link, short enough that a peer trickling
/// bytes cannot hold a place for long.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long writing an answer may make no progress before the client
/// counts as stopped and is dropped. A client's reader thread reads all
/// the time, so only a stuck or hostile one takes this long; it is half
/// the client's own default request time-out.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Requests read and not yet answered, in all. Each holds at most one
/// 1 MiB payload (a write, or a read's answer), so this bounds their
/// memory to about 512 MiB in the worst case; it is far more than the
/// worker pool needs to stay busy.
pub const DEFAULT_MAX_REQUESTS: usize = 512;

/// Requests read and not yet answered, per connection. The client reads
/// ahead 16 blocks per sequential reader: 64 lets four readers of one
/// mount pipeline fully. Past it the server reads no more from that
/// connection until answers are written (TCP pushes back on the client).
pub const DEFAULT_MAX_REQUESTS_PER_CONN: usize = 64;

/// Files one connection may hold open (one descriptor each), as the
/// client's own [`crate::client::DEFAULT_MAX_OPEN_FILES`]: far beyond
/// what one mount's processes usually hold, and a small share of the
/// descriptor limit a server raises itself to (typically 2^19 or more).
/// Past it an open gets EMFILE.
pub const DEFAULT_MAX_HANDLES_PER_CONN: usize = 8192;

/// Files open in all: by default as many as the descriptor limit allows
/// once connections, workers and a margin are kept back (see
/// [`ServerLimits::max_handles`]). Past it an open gets ENFILE.
pub const DEFAULT_MAX_HANDLES: usize = usize::MAX;

/// Descriptors one connection uses besides its open files: its socket, a
/// read and a write clone, and the one kept to shut it down.
pub(super) const FDS_PER_CONNECTION: usize = 4;
/// Descriptors a worker opens for a moment while it runs a request (a
/// directory, a probe, the file).
pub(super) const FDS_PER_WORKER: usize = 4;
/// Descriptors kept free besides: the listener, the export root, logs.
pub(super) const FDS_SPARE: usize = 64;

/// Bounds on what peers and clients may hold (see each default). Set
/// with [`super::Server::with_limits`].
#[derive(Debug, Clone)]
pub struct ServerLimits {
    pub max_connections: usize,
    pub max_connections_per_peer: usize,
    pub max_handshakes: usize,
    pub max_handshakes_per_peer: usize,
    pub handshake_timeout: Duration,
    pub write_timeout: Duration,
    pub max_requests: usize,
    pub max_requests_per_conn: usize,
    /// Open files in all; the server lowers it to what the descriptor
    /// limit leaves once `max_connections` connections and the workers
    /// have theirs (at least half of the limit).
    pub max_handles: usize,
    pub max_handles_per_conn: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_peer: DEFAULT_MAX_CONNECTIONS_PER_PEER,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            max_handshakes_per_peer: DEFAULT_MAX_HANDSHAKES_PER_PEER,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            max_requests: DEFAULT_MAX_REQUESTS,
            max_requests_per_conn: DEFAULT_MAX_REQUESTS_PER_CONN,
            max_handles: DEFAULT_MAX_HANDLES,
            max_handles_per_conn: DEFAULT_MAX_HANDLES_PER_CONN,
        }
    }
}

impl ServerLimits {
    /// Open files in all for a server with `workers` workers whose
    /// descriptor limit is `nofile`.
    pub(super) fn handle_budget(&self, workers: usize, nofile: usize) -> usize {
        let reserve = self
            .max_connections
            .saturating_mul(FDS_PER_CONNECTION)
            .saturating_add(workers.saturating_mul(FDS_PER_WORKER))
            .saturating_add(FDS_SPARE);
        let left = nofile
            .checked_sub(reserve)
            .filter(|&n| n >= nofile / 2)
            .unwrap_or(nofile / 2);
        self.max_handles.min(left)
    }
}

/// A bounded number of places that callers wait for.
#[derive(Debug)]
pub(super) struct Slots {
    max: usize,
    used: Mutex<usize>,
    freed: Condvar,
}

/// How often a wait for a place looks whether it should give up.
const SLOT_POLL: Duration = Duration::from_millis(100);

impl Slots {
    pub(super) fn new(max: usize) -> Slots {
        Slots {
            max: max.max(1),
            used: Mutex::new(0),
            freed: Condvar::new(),
        }
    }

    /// Waits for a place; false (and none taken) once `give_up` says so.
    pub(super) fn take(&self, give_up: impl Fn() -> bool) -> bool {
        let mut used = lock(&self.used);
        while *used >= self.max {
            if give_up() {
                return false;
            }
            used = self
                .freed
                .wait_timeout(used, SLOT_POLL)
                .map(|r| r.0)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        *used += 1;
        true
    }

    pub(super) fn give(&self) {
        let mut used = lock(&self.used);
        *used = used.saturating_sub(1);
        drop(used);
        self.freed.notify_one();
    }

    pub(super) fn used(&self) -> usize {
        *lock(&self.used)
    }
}

/// Why a new connection was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    Connections,
    PeerConnections,
    PeerHandshakes,
}

#[derive(Debug, Default)]
struct PeerCount {
    connections: usize,
    handshakes: usize,
}

/// The address a peer's connections are counted under: an IPv4 address
/// (also one mapped into IPv6), or the /64 prefix of an IPv6 address, as
/// one host or site is usually given a whole /64 to pick addresses from.
pub(super) fn peer_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

/// Connections and handshakes by peer address, and connections in all.
#[derive(Debug, Default)]
pub(super) struct Peers {
    inner: Mutex<(usize, HashMap<IpAddr, PeerCount>)>,
}

impl Peers {
    /// Counts a new connection (in its handshake) from `ip`, if the
    /// limits allow it.
    pub(super) fn admit(&self, ip: IpAddr, l: &ServerLimits) -> Result<(), Refusal> {
        let mut g = lock(&self.inner);
        let (total, peers) = &mut *g;
        if *total >= l.max_connections {
            return Err(Refusal::Connections);
        }
        let p = peers.entry(ip).or_default();
        if p.connections >= l.max_connections_per_peer {
            return Err(Refusal::PeerConnections);
        }
        if p.handshakes >= l.max_handshakes_per_peer {
            return Err(Refusal::PeerHandshakes);
        }
        p.connections += 1;
        p.handshakes += 1;
        *total += 1;
        Ok(())
    }

    /// The handshake of a connection from `ip` is over.
    pub(super) fn handshake_done(&self, ip: IpAddr) {
        if let Some(p) = lock(&self.inner).1.get_mut(&ip) {
            p.handshakes = p.handshakes.saturating_sub(1);
        }
    }

    /// A connection from `ip` is gone (its handshake too).
    pub(super) fn gone(&self, ip: IpAddr) {
        let mut g = lock(&self.inner);
        let (total, peers) = &mut *g;
        *total = total.saturating_sub(1);
        if let Some(p) = peers.get_mut(&ip) {
            p.connections = p.connections.saturating_sub(1);
            if p.connections == 0 {
                peers.remove(&ip);
            }
        }
    }
}

/// Handshake deadlines: (when, connection id), earliest first. A thread
/// ([`super::Shared::reap`]) shuts down each connection whose deadline
/// passes, which wakes whatever read or write holds it.
#[derive(Debug, Default)]
pub(super) struct Deadlines {
    pub(super) due: Mutex<BTreeSet<(Instant, u64)>>,
    pub(super) changed: Condvar,
}

impl Deadlines {
    pub(super) fn watch(&self, at: Instant, id: u64) {
        lock(&self.due).insert((at, id));
        self.changed.notify_one();
    }

    pub(super) fn unwatch(&self, at: Instant, id: u64) {
        lock(&self.due).remove(&(at, id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handle_budget_keeps_descriptors_back() {
        let l = ServerLimits {
            max_connections: 100,
            ..ServerLimits::default()
        };
        // 100 connections, 4 workers: 400 + 16 + 64 kept back.
        assert_eq!(l.handle_budget(4, 10_000), 10_000 - 480);
        // A limit too low for the reserve: half of it.
        assert_eq!(l.handle_budget(4, 600), 300);
        let l = ServerLimits {
            max_handles: 10,
            ..l
        };
        assert_eq!(l.handle_budget(4, 10_000), 10);
    }

    #[test]
    fn peers_are_counted_per_address_and_in_all() {
        let l = ServerLimits {
            max_connections: 3,
            max_connections_per_peer: 2,
            max_handshakes_per_peer: 1,
            ..ServerLimits::default()
        };
        let (a, b, c) = (
            IpAddr::from([10, 0, 0, 1]),
            IpAddr::from([10, 0, 0, 2]),
            IpAddr::from([10, 0, 0, 3]),
        );
        let p = Peers::default();
        assert_eq!(p.admit(a, &l), Ok(()));
        assert_eq!(p.admit(a, &l), Err(Refusal::PeerHandshakes));
        p.handshake_done(a);
        assert_eq!(p.admit(a, &l), Ok(()));
        p.handshake_done(a);
        assert_eq!(p.admit(a, &l), Err(Refusal::PeerConnections));
        assert_eq!(p.admit(b, &l), Ok(()));
        assert_eq!(p.admit(c, &l), Err(Refusal::Connections));
        p.gone(a);
        assert_eq!(p.admit(c, &l), Ok(()));
    }

    #[test]
    fn ipv6_peers_are_counted_by_their_64_prefix() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::7".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(peer_key(a), peer_key(b));
        assert_ne!(peer_key(a), peer_key(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(peer_key(mapped), IpAddr::from([10, 0, 0, 1]));
        assert_eq!(
            peer_key(IpAddr::from([10, 0, 0, 1])),
            IpAddr::from([10, 0, 0, 1])
        );
    }

    #[test]
    fn slots_wait_and_give_up() {
        let s = Slots::new(1);
        assert!(s.take(|| false));
        assert!(!s.take(|| true));
        s.give();
        assert!(s.take(|| true));
        assert_eq!(s.used(), 1);
    }
}
