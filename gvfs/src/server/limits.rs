//! What the server lets peers and clients hold, and the tools that keep
//! them to it: per-peer and total connection counts (with room made for
//! newcomers when every handshake place is taken), bounded pools of
//! request places and answer bytes, open files per peer and in all, and
//! the deadline that ends a handshake still running.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::lock;

/// Connections in all, authenticated or not. Each is one client mount (a
/// host FUSE mount or one VM's share) and costs two threads and four
/// descriptors; a host agent serving a few hundred VMs stays well under.
/// Past it a new connection is closed at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// Connections from one IP address (IPv6: one /64): one host running many
/// VMs, each share its own connection, fits up to this many shares; one
/// peer cannot take every place. A host with more shares to one server
/// needs a higher [`ServerLimits::max_connections_per_peer`].
pub const DEFAULT_MAX_CONNECTIONS_PER_PEER: usize = 256;

/// Connections still in their handshake, in all. A real handshake is done
/// in one or two round trips; a peer that holds one open does so for at
/// most [`DEFAULT_HANDSHAKE_TIMEOUT`]. When all are taken, a newcomer
/// takes the place of the oldest handshake of the address holding the
/// most, so that idle handshakes from a few addresses cannot keep anyone
/// out, and the accept loop never waits.
pub const DEFAULT_MAX_HANDSHAKES: usize = 128;

/// Handshakes from one IP address (IPv6: one /64) at once. A host's shares
/// reconnect one by one on their own schedules, so a handful at once is
/// plenty (and a burst past it is refused and retried with back-off);
/// kept low so that filling [`DEFAULT_MAX_HANDSHAKES`] takes 16 addresses,
/// and then each newcomer still pushes out one of theirs. Past it a
/// connection is closed at once.
pub const DEFAULT_MAX_HANDSHAKES_PER_PEER: usize = 8;

/// The whole handshake (TLS and GVFS), however the peer spaces its bytes:
/// ample for TLS over a slow link, short enough that a peer trickling
/// bytes cannot hold a place for long.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long writing one answer (at most about 1 MiB) may take, whole,
/// from its first byte: the client must read at least about 35 KiB/s on
/// average, however it paces its reads, or it counts as stopped and is
/// dropped. A client's reader thread reads all the time, so only a stuck,
/// hostile or hopelessly slow one takes this long; it is half the
/// client's own default request time-out.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Requests read and being worked on (queued for or run by a worker), in
/// all. Each holds at most one 1 MiB payload (a write, or a read's
/// answer), so this bounds their memory to about 512 MiB in the worst
/// case; it is far more than the worker pool needs to stay busy. A
/// request gives its place back once the worker is done with it, not
/// when its answer is written: a client that stops reading holds none.
pub const DEFAULT_MAX_REQUESTS: usize = 512;

/// Requests read and not yet answered (written), per connection. The
/// client reads ahead 16 blocks per sequential reader: 64 lets four
/// readers of one mount pipeline fully. Past it the server reads no more
/// from that connection until answers are written (TCP pushes back on the
/// client).
pub const DEFAULT_MAX_REQUESTS_PER_CONN: usize = 64;

/// Bytes of answers one connection may have queued and not yet written,
/// counting each request read by the largest answer it can get (a read's
/// length, a listing batch) until its answer is built. Four sequential
/// readers' read-ahead (16 blocks of 128 KiB each) fit; past it the
/// server reads no more from that connection until answers are written,
/// so a client that stops reading holds at most this much server memory
/// (and one more request) until the write deadline drops it.
pub const DEFAULT_MAX_ANSWER_BYTES_PER_CONN: usize = 8 << 20;

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

/// Files the connections from one IP address (IPv6: one /64) may hold
/// open together: eight connections' full share, so that a host whose
/// shares never close their files cannot take every descriptor. Past it
/// an open gets EMFILE. Besides, once more than half of the files in all
/// are open, each peer gets no more than its fair share
/// ([`Handles::try_take`]).
pub const DEFAULT_MAX_HANDLES_PER_PEER: usize = 8 * DEFAULT_MAX_HANDLES_PER_CONN;

/// Past `1 / FAIR_SHARE_DIVISOR` of the files in all, a peer may open one
/// more only while it holds less than that fraction of the files divided
/// among the peers holding any: a peer alone stops at half, and the other
/// half is left for peers that come later, each of which still gets a
/// share.
const FAIR_SHARE_DIVISOR: usize = 2;

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
    /// Connections from one IP address (IPv6: one /64); raise it for a
    /// host with more than [`DEFAULT_MAX_CONNECTIONS_PER_PEER`] shares to
    /// this server.
    pub max_connections_per_peer: usize,
    pub max_handshakes: usize,
    pub max_handshakes_per_peer: usize,
    pub handshake_timeout: Duration,
    /// Time to write one answer whole.
    pub write_timeout: Duration,
    pub max_requests: usize,
    pub max_requests_per_conn: usize,
    pub max_answer_bytes_per_conn: usize,
    /// Open files in all; the server lowers it to what the descriptor
    /// limit leaves once `max_connections` connections and the workers
    /// have theirs (at least half of the limit).
    pub max_handles: usize,
    pub max_handles_per_conn: usize,
    pub max_handles_per_peer: usize,
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
            max_answer_bytes_per_conn: DEFAULT_MAX_ANSWER_BYTES_PER_CONN,
            max_handles: DEFAULT_MAX_HANDLES,
            max_handles_per_conn: DEFAULT_MAX_HANDLES_PER_CONN,
            max_handles_per_peer: DEFAULT_MAX_HANDLES_PER_PEER,
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

/// A bounded number of places (or bytes) that callers wait for.
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
        self.take_n(1, give_up)
    }

    /// Waits for `n` places; false (and none taken) once `give_up` says
    /// so. With none taken, `n` may pass the maximum (so that one large
    /// request never waits forever).
    pub(super) fn take_n(&self, n: usize, give_up: impl Fn() -> bool) -> bool {
        let mut used = lock(&self.used);
        while *used > 0 && used.saturating_add(n) > self.max {
            if give_up() {
                return false;
            }
            used = self
                .freed
                .wait_timeout(used, SLOT_POLL)
                .map(|r| r.0)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        *used = used.saturating_add(n);
        true
    }

    /// Takes `n` more places at once, full or not (what is already
    /// taken grew).
    pub(super) fn add(&self, n: usize) {
        let mut used = lock(&self.used);
        *used = used.saturating_add(n);
    }

    pub(super) fn give(&self) {
        self.give_n(1);
    }

    pub(super) fn give_n(&self, n: usize) {
        let mut used = lock(&self.used);
        *used = used.saturating_sub(n);
        drop(used);
        // One place lets one waiter on; more may let several.
        if n == 1 {
            self.freed.notify_one();
        } else {
            self.freed.notify_all();
        }
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

#[derive(Debug, Default)]
struct PeerTable {
    /// Connections in all.
    total: usize,
    by_peer: HashMap<IpAddr, PeerCount>,
    /// Connections in their handshake: connection id (which grows with
    /// age) to peer.
    handshaking: BTreeMap<u64, IpAddr>,
}

impl PeerTable {
    /// The handshake of connection `id` is over (or never was): counted
    /// once, however often this is called.
    fn handshake_done(&mut self, id: u64) {
        if let Some(ip) = self.handshaking.remove(&id)
            && let Some(p) = self.by_peer.get_mut(&ip)
        {
            p.handshakes = p.handshakes.saturating_sub(1);
        }
    }

    /// The oldest handshake of the peer holding the most (of those
    /// holding as many, the one whose handshake is oldest).
    fn oldest_of_busiest(&self) -> Option<u64> {
        let most = self.by_peer.values().map(|p| p.handshakes).max()?;
        self.handshaking
            .iter()
            .find(|(_, ip)| self.by_peer.get(ip).is_some_and(|p| p.handshakes == most))
            .map(|(&id, _)| id)
    }
}

/// Connections and handshakes by peer address, and connections in all.
#[derive(Debug, Default)]
pub(super) struct Peers {
    inner: Mutex<PeerTable>,
}

impl Peers {
    /// Counts a new connection `id` (in its handshake) from `ip`, if the
    /// limits allow it. With every handshake place taken, it takes the
    /// place of the oldest handshake of the peer holding the most: the
    /// id returned, no longer counted as in its handshake, is to be shut
    /// down.
    pub(super) fn admit(
        &self,
        id: u64,
        ip: IpAddr,
        l: &ServerLimits,
    ) -> Result<Option<u64>, Refusal> {
        let mut t = lock(&self.inner);
        if t.total >= l.max_connections {
            return Err(Refusal::Connections);
        }
        let (connections, handshakes) = t
            .by_peer
            .get(&ip)
            .map_or((0, 0), |p| (p.connections, p.handshakes));
        if connections >= l.max_connections_per_peer {
            return Err(Refusal::PeerConnections);
        }
        if handshakes >= l.max_handshakes_per_peer {
            return Err(Refusal::PeerHandshakes);
        }
        let evicted = if t.handshaking.len() >= l.max_handshakes.max(1) {
            let victim = t.oldest_of_busiest();
            if let Some(v) = victim {
                t.handshake_done(v);
            }
            victim
        } else {
            None
        };
        let p = t.by_peer.entry(ip).or_default();
        p.connections += 1;
        p.handshakes += 1;
        t.total += 1;
        t.handshaking.insert(id, ip);
        Ok(evicted)
    }

    /// The handshake of connection `id` is over.
    pub(super) fn handshake_done(&self, id: u64) {
        lock(&self.inner).handshake_done(id);
    }

    /// Connection `id` from `ip` is gone (its handshake too).
    pub(super) fn gone(&self, id: u64, ip: IpAddr) {
        let mut t = lock(&self.inner);
        t.handshake_done(id);
        t.total = t.total.saturating_sub(1);
        if let Some(p) = t.by_peer.get_mut(&ip) {
            p.connections = p.connections.saturating_sub(1);
            if p.connections == 0 {
                t.by_peer.remove(&ip);
            }
        }
    }

    /// Connections in their handshake now.
    pub(super) fn handshakes(&self) -> usize {
        lock(&self.inner).handshaking.len()
    }
}

/// Why an open was refused: the errno to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum HandleRefusal {
    /// The peer holds its most (EMFILE).
    Peer,
    /// The server holds its most, or more than half of it and the peer
    /// its fair share (ENFILE).
    Server,
}

impl HandleRefusal {
    pub(super) fn errno(self) -> i32 {
        match self {
            HandleRefusal::Peer => libc::EMFILE,
            HandleRefusal::Server => libc::ENFILE,
        }
    }
}

/// Open files by peer address and in all.
#[derive(Debug)]
pub(super) struct Handles {
    max: usize,
    max_per_peer: usize,
    /// Files open in all, and by peer (peers holding none are not kept).
    inner: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

impl Handles {
    pub(super) fn new(max: usize, max_per_peer: usize) -> Handles {
        Handles {
            max,
            max_per_peer,
            inner: Mutex::new((0, HashMap::new())),
        }
    }

    /// Counts one more open file of `ip`, if the bounds allow it: at most
    /// `max_per_peer` per peer and `max` in all, and once more than
    /// `max / FAIR_SHARE_DIVISOR` are open, a peer holding its fair share
    /// (`max / FAIR_SHARE_DIVISOR` divided among the peers holding any,
    /// this one included) gets no more.
    pub(super) fn try_take(&self, ip: IpAddr) -> Result<(), HandleRefusal> {
        let mut g = lock(&self.inner);
        let (total, by_peer) = &mut *g;
        let mine = by_peer.get(&ip).copied().unwrap_or(0);
        if mine >= self.max_per_peer {
            return Err(HandleRefusal::Peer);
        }
        if *total >= self.max {
            return Err(HandleRefusal::Server);
        }
        if *total >= self.max / FAIR_SHARE_DIVISOR {
            let holders = by_peer.len() + usize::from(mine == 0);
            let share = (self.max / FAIR_SHARE_DIVISOR / holders.max(1)).max(1);
            if mine >= share {
                return Err(HandleRefusal::Server);
            }
        }
        *total += 1;
        *by_peer.entry(ip).or_default() += 1;
        Ok(())
    }

    /// `ip` closed `n` files.
    pub(super) fn give(&self, ip: IpAddr, n: usize) {
        if n == 0 {
            return;
        }
        let mut g = lock(&self.inner);
        let (total, by_peer) = &mut *g;
        *total = total.saturating_sub(n);
        if let Some(mine) = by_peer.get_mut(&ip) {
            *mine = mine.saturating_sub(n);
            if *mine == 0 {
                by_peer.remove(&ip);
            }
        }
    }

    pub(super) fn used(&self) -> usize {
        lock(&self.inner).0
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
        assert_eq!(p.admit(1, a, &l), Ok(None));
        assert_eq!(p.admit(2, a, &l), Err(Refusal::PeerHandshakes));
        p.handshake_done(1);
        p.handshake_done(1);
        assert_eq!(p.admit(3, a, &l), Ok(None));
        p.handshake_done(3);
        assert_eq!(p.admit(4, a, &l), Err(Refusal::PeerConnections));
        assert_eq!(p.admit(5, b, &l), Ok(None));
        assert_eq!(p.admit(6, c, &l), Err(Refusal::Connections));
        p.gone(1, a);
        assert_eq!(p.admit(7, c, &l), Ok(None));
    }

    #[test]
    fn a_newcomer_takes_the_place_of_the_oldest_handshake_of_the_busiest_peer() {
        let l = ServerLimits {
            max_handshakes: 5,
            max_handshakes_per_peer: 3,
            ..ServerLimits::default()
        };
        let (a, b, c) = (
            IpAddr::from([10, 0, 0, 1]),
            IpAddr::from([10, 0, 0, 2]),
            IpAddr::from([10, 0, 0, 3]),
        );
        let p = Peers::default();
        // b: 1 and 2; a: 3, 4 and 5. All five places taken.
        for (id, ip) in [(1, b), (2, b), (3, a), (4, a), (5, a)] {
            assert_eq!(p.admit(id, ip, &l), Ok(None));
        }
        // c comes: a holds the most, its oldest (3) makes room.
        assert_eq!(p.admit(6, c, &l), Ok(Some(3)));
        assert_eq!(p.handshakes(), 5);
        // Now a and b hold two each: the oldest of those (1, of b) goes.
        assert_eq!(p.admit(7, c, &l), Ok(Some(1)));
        // The one pushed out ending later changes nothing more.
        p.gone(3, a);
        p.gone(1, b);
        assert_eq!(p.handshakes(), 5);
        // A peer at its own limit is refused rather than let in.
        assert_eq!(p.admit(8, c, &l), Ok(Some(4)));
        assert_eq!(p.admit(9, c, &l), Err(Refusal::PeerHandshakes));
    }

    #[test]
    fn open_files_are_capped_per_peer_and_shared_fairly_past_half() {
        let (a, b, c) = (
            IpAddr::from([10, 0, 0, 1]),
            IpAddr::from([10, 0, 0, 2]),
            IpAddr::from([10, 0, 0, 3]),
        );
        let take_all = |h: &Handles, ip| {
            let mut n = 0;
            let why = loop {
                match h.try_take(ip) {
                    Ok(()) => n += 1,
                    Err(why) => break why,
                }
            };
            (n, why)
        };
        // Per peer first.
        let h = Handles::new(100, 10);
        assert_eq!(take_all(&h, a), (10, HandleRefusal::Peer));
        h.give(a, 10);
        assert_eq!(h.used(), 0);
        // Alone, a peer stops at half; then each newcomer gets a share.
        let h = Handles::new(40, 100);
        assert_eq!(take_all(&h, a), (20, HandleRefusal::Server));
        assert_eq!(take_all(&h, b), (10, HandleRefusal::Server));
        assert_eq!(take_all(&h, c), (6, HandleRefusal::Server));
        assert_eq!(h.used(), 36);
        // A peer that gives back may take again up to its share.
        h.give(a, 15);
        assert_eq!(take_all(&h, a), (1, HandleRefusal::Server));
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
        // Weighted: more than the maximum only when nothing is taken.
        let s = Slots::new(10);
        assert!(s.take_n(4, || true));
        assert!(!s.take_n(7, || true));
        s.give_n(4);
        assert!(s.take_n(25, || true));
        assert!(!s.take_n(1, || true));
        s.add(5);
        s.give_n(30);
        assert_eq!(s.used(), 0);
    }
}
