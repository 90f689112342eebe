//! The traffic matrix (Virtuoso's VTTIF): bytes and frames per (source,
//! destination) address pair over sliding windows, with ARP and
//! broadcast kept apart from unicast, a topology inference, and the
//! reports switches exchange over tunnels to build the global matrix.

use crate::frame::Mac;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Seconds of history kept per pair (the longest window).
const HISTORY: usize = 60;
/// At most this many pairs are tracked per switch.
const MAX_PAIRS: usize = 65536;
/// At most this many remote switches (origins) are kept; each is
/// relayed to every neighbour every second, so this bounds the memory
/// and the per-second work whatever origins peers make up. VNET
/// overlays are tens of hosts; 64 leaves room.
pub const MAX_REMOTE_ORIGINS: usize = 64;
/// A remote report keeps at most this many entries, its biggest pairs
/// over 60 s (the topology inference keeps the heavy pairs only): with
/// [`MAX_REMOTE_ORIGINS`], at most 65,536 remote entries (about 4 MiB),
/// as many as this switch's own pairs.
pub const MAX_REPORT_ENTRIES: usize = 1024;
/// A remote report older than this is left out of the global matrix.
const REMOTE_TTL_MS: u64 = 10_000;

/// Kind of traffic; only `Unicast` feeds the topology inference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrafficClass {
    Unicast,
    /// Broadcast and multicast (other than ARP).
    Broadcast,
    Arp,
}

/// A sliding window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Window {
    S1,
    S10,
    S60,
}

/// Bytes and frames in one window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub bytes: u64,
    pub frames: u64,
}

/// One cell of the matrix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MatrixEntry {
    pub src: Mac,
    pub dst: Mac,
    pub class: TrafficClass,
    pub last_1s: Volume,
    pub last_10s: Volume,
    pub last_60s: Volume,
}

impl MatrixEntry {
    pub fn volume(&self, w: Window) -> Volume {
        match w {
            Window::S1 => self.last_1s,
            Window::S10 => self.last_10s,
            Window::S60 => self.last_60s,
        }
    }
}

/// One switch's matrix, as sent to the others.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MatrixReport {
    /// The switch it comes from.
    pub origin: u64,
    /// Milliseconds since the Unix epoch when it was made; newer wins.
    pub seq: u64,
    pub entries: Vec<MatrixEntry>,
}

struct Pair {
    /// bytes, frames per second; index = second % HISTORY.
    buckets: [(u64, u64); HISTORY],
    last_sec: u64,
}

struct Remote {
    report: MatrixReport,
    received_ms: u64,
    /// Order of arrival, to push out the one heard of least lately.
    order: u64,
}

/// The matrix of one switch. It counts frames that enter by a local
/// (non-tunnel) port, so that the sum over all switches counts each frame
/// once.
pub struct TrafficMatrix {
    origin: u64,
    epoch: Instant,
    pairs: Mutex<HashMap<(Mac, Mac, TrafficClass), Pair>>,
    remote: Mutex<HashMap<u64, Remote>>,
    /// Reports taken in so far (orders [`Remote`]s).
    received: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn random_id() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most b.len() bytes into the valid buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 8 {
        return unix_ms() ^ u64::from(std::process::id()) << 32;
    }
    u64::from_ne_bytes(b)
}

impl Default for TrafficMatrix {
    fn default() -> Self {
        Self::new()
    }
}

impl TrafficMatrix {
    pub fn new() -> Self {
        TrafficMatrix {
            origin: random_id(),
            epoch: Instant::now(),
            pairs: Mutex::new(HashMap::with_capacity(64)),
            remote: Mutex::new(HashMap::new()),
            received: AtomicU64::new(0),
        }
    }

    /// This switch's id in exchanged reports.
    pub fn origin(&self) -> u64 {
        self.origin
    }

    fn now_sec(&self) -> u64 {
        self.epoch.elapsed().as_secs()
    }

    /// Counts one frame.
    pub fn record(&self, src: Mac, dst: Mac, class: TrafficClass, bytes: usize) {
        self.record_at(self.now_sec(), src, dst, class, bytes)
    }

    fn record_at(&self, sec: u64, src: Mac, dst: Mac, class: TrafficClass, bytes: usize) {
        let mut pairs = lock(&self.pairs);
        let len = pairs.len();
        let p = match pairs.get_mut(&(src, dst, class)) {
            Some(p) => p,
            None if len >= MAX_PAIRS => return,
            None => pairs.entry((src, dst, class)).or_insert(Pair {
                buckets: [(0, 0); HISTORY],
                last_sec: sec,
            }),
        };
        advance(p, sec);
        let b = &mut p.buckets[(sec % HISTORY as u64) as usize];
        b.0 += bytes as u64;
        b.1 += 1;
    }

    /// This switch's own entries (pairs with traffic in the last 60 s).
    pub fn local(&self) -> MatrixReport {
        let now = self.now_sec();
        let mut pairs = lock(&self.pairs);
        let mut entries = Vec::with_capacity(pairs.len());
        pairs.retain(|&(src, dst, class), p| {
            advance(p, now);
            let vol = |w: u64| {
                let mut v = Volume::default();
                for s in (now + 1).saturating_sub(w)..=now {
                    let b = p.buckets[(s % HISTORY as u64) as usize];
                    v.bytes += b.0;
                    v.frames += b.1;
                }
                v
            };
            let e = MatrixEntry {
                src,
                dst,
                class,
                last_1s: vol(1),
                last_10s: vol(10),
                last_60s: vol(60),
            };
            let keep = e.last_60s.frames > 0;
            if keep {
                entries.push(e);
            }
            keep
        });
        entries.sort_by_key(|e| (e.src, e.dst, e.class));
        MatrixReport {
            origin: self.origin,
            seq: unix_ms(),
            entries,
        }
    }

    /// Takes in reports received from another switch; keeps the newest
    /// per origin and ignores this switch's own. Keeps at most
    /// [`MAX_REMOTE_ORIGINS`] origins (a new one pushes out the one heard
    /// of least lately) and [`MAX_REPORT_ENTRIES`] entries per report.
    pub fn merge(&self, reports: Vec<MatrixReport>) {
        let now = unix_ms();
        let mut remote = lock(&self.remote);
        remote.retain(|_, r| now.saturating_sub(r.received_ms) <= REMOTE_TTL_MS * 6);
        // A neighbour sends its own report and those it relays: no more
        // than the cap (and this switch's own) make sense in one message.
        for mut r in reports.into_iter().take(MAX_REMOTE_ORIGINS + 2) {
            if r.origin == self.origin {
                continue;
            }
            match remote.get(&r.origin) {
                Some(old) if old.report.seq >= r.seq => continue,
                Some(_) => {}
                None if remote.len() >= MAX_REMOTE_ORIGINS => {
                    let stalest = remote.iter().min_by_key(|(_, r)| r.order).map(|(&o, _)| o);
                    if let Some(o) = stalest {
                        remote.remove(&o);
                    }
                }
                None => {}
            }
            keep_biggest(&mut r.entries, MAX_REPORT_ENTRIES);
            remote.insert(
                r.origin,
                Remote {
                    report: r,
                    received_ms: now,
                    order: self.received.fetch_add(1, Relaxed),
                },
            );
        }
    }

    /// What to send to a neighbour: this switch's report and the fresh
    /// ones it heard of (so a hub relays between spokes).
    pub fn reports_to_send(&self) -> Vec<MatrixReport> {
        let mut out = vec![self.local()];
        out.extend(self.fresh_remote());
        out
    }

    fn fresh_remote(&self) -> Vec<MatrixReport> {
        let now = unix_ms();
        lock(&self.remote)
            .values()
            .filter(|r| now.saturating_sub(r.received_ms) <= REMOTE_TTL_MS)
            .map(|r| r.report.clone())
            .collect()
    }

    /// Origins of the remote reports currently in the global matrix.
    pub fn remote_origins(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.fresh_remote().iter().map(|r| r.origin).collect();
        v.sort();
        v
    }

    /// The global matrix: this switch's entries plus those of every switch
    /// heard of in the last 10 s, summed per pair.
    pub fn global(&self) -> Vec<MatrixEntry> {
        let mut sum: BTreeMap<(Mac, Mac, TrafficClass), MatrixEntry> = BTreeMap::new();
        let mut reports = self.fresh_remote();
        reports.push(self.local());
        for r in reports {
            for e in r.entries {
                let s = sum.entry((e.src, e.dst, e.class)).or_insert(MatrixEntry {
                    src: e.src,
                    dst: e.dst,
                    class: e.class,
                    last_1s: Volume::default(),
                    last_10s: Volume::default(),
                    last_60s: Volume::default(),
                });
                for (a, b) in [
                    (&mut s.last_1s, e.last_1s),
                    (&mut s.last_10s, e.last_10s),
                    (&mut s.last_60s, e.last_60s),
                ] {
                    a.bytes += b.bytes;
                    a.frames += b.frames;
                }
            }
        }
        sum.into_values().collect()
    }
}

/// Keeps the `n` entries with the most bytes over 60 s.
fn keep_biggest(entries: &mut Vec<MatrixEntry>, n: usize) {
    if entries.len() > n {
        entries.select_nth_unstable_by(n, |a, b| b.last_60s.bytes.cmp(&a.last_60s.bytes));
        entries.truncate(n);
    }
}

fn advance(p: &mut Pair, sec: u64) {
    if sec <= p.last_sec {
        return;
    }
    let gap = (sec - p.last_sec).min(HISTORY as u64);
    for s in 1..=gap {
        p.buckets[((p.last_sec + s) % HISTORY as u64) as usize] = (0, 0);
    }
    p.last_sec = sec;
}

/// An undirected graph of who talks to whom.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    pub nodes: BTreeSet<Mac>,
    /// Each edge once, smaller address first.
    pub edges: BTreeSet<(Mac, Mac)>,
}

impl Topology {
    pub fn degree(&self, m: Mac) -> usize {
        self.edges
            .iter()
            .filter(|(a, b)| *a == m || *b == m)
            .count()
    }

    /// True if the graph is one cycle through all its nodes (n >= 3).
    pub fn is_ring(&self) -> bool {
        let n = self.nodes.len();
        if n < 3 || self.edges.len() != n || self.nodes.iter().any(|&m| self.degree(m) != 2) {
            return false;
        }
        // Connected: walk from the first node.
        let mut seen = BTreeSet::new();
        let mut stack = vec![*self.nodes.iter().next().unwrap_or(&Mac::default())];
        while let Some(m) = stack.pop() {
            if !seen.insert(m) {
                continue;
            }
            for &(a, b) in &self.edges {
                if a == m {
                    stack.push(b);
                } else if b == m {
                    stack.push(a);
                }
            }
        }
        seen.len() == n
    }
}

/// VTTIF's inference: sum unicast bytes of both directions per pair over
/// `window`, and keep the pairs with at least `fraction` of the largest.
pub fn infer_topology(entries: &[MatrixEntry], window: Window, fraction: f64) -> Topology {
    let mut pairs: BTreeMap<(Mac, Mac), u64> = BTreeMap::new();
    for e in entries.iter().filter(|e| e.class == TrafficClass::Unicast) {
        let k = if e.src <= e.dst {
            (e.src, e.dst)
        } else {
            (e.dst, e.src)
        };
        *pairs.entry(k).or_default() += e.volume(window).bytes;
    }
    let max = pairs.values().copied().max().unwrap_or(0);
    let mut t = Topology::default();
    if max == 0 {
        return t;
    }
    for (k, v) in pairs {
        if v > 0 && v as f64 >= fraction * max as f64 {
            t.nodes.insert(k.0);
            t.nodes.insert(k.1);
            t.edges.insert(k);
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_slide_and_classes_stay_apart() {
        let m = TrafficMatrix::new();
        let (a, b) = (Mac::local(1), Mac::local(2));
        m.record_at(0, a, b, TrafficClass::Unicast, 100);
        m.record_at(0, a, Mac::BROADCAST, TrafficClass::Arp, 42);
        m.record_at(0, a, Mac::BROADCAST, TrafficClass::Broadcast, 60);
        m.record_at(5, a, b, TrafficClass::Unicast, 1000);
        {
            let mut pairs = lock(&m.pairs);
            let p = pairs.get_mut(&(a, b, TrafficClass::Unicast)).unwrap();
            advance(p, 5);
            // Second 0 still in the 10 s window, not in the 1 s one.
            let w10: u64 = (0..=5).map(|s| p.buckets[s].0).sum();
            assert_eq!(w10, 1100);
            assert_eq!(p.buckets[5].0, 1000);
            advance(p, 65);
            assert!(
                p.buckets.iter().all(|b| *b == (0, 0)),
                "60 s later all history is gone"
            );
        }
        let classes: BTreeSet<TrafficClass> = lock(&m.pairs).keys().map(|k| k.2).collect();
        assert_eq!(classes.len(), 3);
    }

    #[test]
    fn local_report_sums_windows() {
        let m = TrafficMatrix::new();
        let (a, b) = (Mac::local(1), Mac::local(2));
        for _ in 0..10 {
            m.record(a, b, TrafficClass::Unicast, 100);
        }
        let r = m.local();
        assert_eq!(r.entries.len(), 1);
        assert_eq!(
            r.entries[0].last_60s,
            Volume {
                bytes: 1000,
                frames: 10
            }
        );
        assert_eq!(
            r.entries[0].last_10s,
            Volume {
                bytes: 1000,
                frames: 10
            }
        );
    }

    #[test]
    fn ring_of_four_talkers_is_inferred_as_a_ring() {
        let m = TrafficMatrix::new();
        let n: Vec<Mac> = (1..=4).map(Mac::local).collect();
        for i in 0..4 {
            let (x, y) = (n[i], n[(i + 1) % 4]);
            for _ in 0..100 {
                m.record(x, y, TrafficClass::Unicast, 1000);
                m.record(y, x, TrafficClass::Unicast, 100);
            }
            // Chatter across the ring and broadcasts stay below the cut.
            m.record(n[i], n[(i + 2) % 4], TrafficClass::Unicast, 1000);
            for _ in 0..1000 {
                m.record(n[i], Mac::BROADCAST, TrafficClass::Broadcast, 1000);
                m.record(n[i], Mac::BROADCAST, TrafficClass::Arp, 60);
            }
        }
        let t = infer_topology(&m.local().entries, Window::S60, 0.2);
        assert_eq!(t.nodes.len(), 4);
        assert!(t.is_ring(), "{t:?}");
        for i in 0..4 {
            let (x, y) = (n[i], n[(i + 1) % 4]);
            assert!(t.edges.contains(&(x.min(y), x.max(y))));
        }
        // With no cut the chords appear and it is no longer a ring.
        let all = infer_topology(&m.local().entries, Window::S60, 0.0);
        assert_eq!(all.edges.len(), 6);
        assert!(!all.is_ring());
    }

    #[test]
    fn global_matrix_sums_reports_of_other_switches() {
        let (m1, m2, m3) = (
            TrafficMatrix::new(),
            TrafficMatrix::new(),
            TrafficMatrix::new(),
        );
        let (a, b, c) = (Mac::local(1), Mac::local(2), Mac::local(3));
        m1.record(a, b, TrafficClass::Unicast, 100);
        m2.record(b, a, TrafficClass::Unicast, 200);
        m3.record(c, a, TrafficClass::Unicast, 300);
        // Star: m3 -> m2 (hub) -> m1; m1 hears of m3 through m2.
        m2.merge(m3.reports_to_send());
        m1.merge(m2.reports_to_send());
        m1.merge(m1.reports_to_send());
        assert_eq!(m1.remote_origins().len(), 2);
        let g = m1.global();
        assert_eq!(g.len(), 3);
        let bytes: u64 = g.iter().map(|e| e.last_60s.bytes).sum();
        assert_eq!(bytes, 600);
        // An older report from the same origin does not replace a newer one.
        let mut old = m3.local();
        old.seq = 1;
        old.entries.clear();
        m1.merge(vec![old]);
        assert_eq!(m1.global().len(), 3);
    }

    #[test]
    fn remote_origins_and_entries_are_capped() {
        let m = TrafficMatrix::new();
        let report = |origin: u64, entries: usize| MatrixReport {
            origin,
            seq: 1,
            entries: (0..entries)
                .map(|i| MatrixEntry {
                    src: Mac::local(i as u32),
                    dst: Mac::local(0),
                    class: TrafficClass::Unicast,
                    last_1s: Volume::default(),
                    last_10s: Volume::default(),
                    last_60s: Volume {
                        bytes: i as u64,
                        frames: 1,
                    },
                })
                .collect(),
        };
        for k in 0..100u64 {
            m.merge((0..10).map(|i| report(1000 + k * 10 + i, 0)).collect());
        }
        assert_eq!(m.remote_origins().len(), MAX_REMOTE_ORIGINS);
        // The one heard of last is kept; the first ones were pushed out.
        m.merge(vec![report(7, MAX_REPORT_ENTRIES + 10)]);
        let origins = m.remote_origins();
        assert_eq!(origins.len(), MAX_REMOTE_ORIGINS);
        assert!(origins.contains(&7) && !origins.contains(&1000));
        let kept = m
            .fresh_remote()
            .into_iter()
            .find(|r| r.origin == 7)
            .unwrap();
        assert_eq!(kept.entries.len(), MAX_REPORT_ENTRIES);
        assert!(
            kept.entries.iter().all(|e| e.last_60s.bytes >= 10),
            "the biggest are kept"
        );
    }
}
