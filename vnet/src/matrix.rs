//! The traffic matrix (Virtuoso's VTTIF): bytes and frames per (source,
//! destination) address pair over sliding windows, with ARP and
//! broadcast kept apart from unicast, a topology inference, and the
//! reports switches exchange over tunnels to build the global matrix.

use crate::frame::Mac;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Seconds of history kept per pair (the longest window).
const HISTORY: usize = 60;
/// At most this many pairs are tracked per switch.
const MAX_PAIRS: usize = 65536;
/// At most this many remote switches (origins) are kept; each is
/// relayed to every neighbour every second, so this bounds the memory
/// and the per-second work whatever origins peers make up. VNET
/// overlays are tens of hosts; 64 leaves room. When it is full, a new
/// origin pushes out one introduced by the neighbour that introduced the
/// most (its own, on a tie): so each neighbour keeps at least its share
/// (64 over the number of neighbours), and one that makes up origins
/// pushes out only its own.
pub const MAX_REMOTE_ORIGINS: usize = 64;
/// A remote report keeps at most this many entries, its biggest pairs
/// over 60 s (the topology inference keeps the heavy pairs only): with
/// [`MAX_REMOTE_ORIGINS`], at most 65,536 remote entries (about 4 MiB),
/// as many as this switch's own pairs.
pub const MAX_REPORT_ENTRIES: usize = 1024;
/// A remote report older than this is left out of the global matrix.
const REMOTE_TTL_MS: u64 = 10_000;
/// The reports to send are built this often at most (per message size),
/// however many neighbours take them: the period they are sent at.
pub const REPORT_REUSE: Duration = Duration::from_secs(1);
/// Message sizes whose reports are kept built: one per transport and
/// UDP MTU in use (UDP with and without a key, streams); more are built
/// each time, evicting the oldest.
const MAX_ENCODINGS: usize = 4;
/// No entry's JSON is shorter than this (a unit test checks): bounds how
/// many entries a message of a given size can hold, so that only that
/// many of the biggest are measured.
const MIN_ENTRY_JSON: usize = 160;

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
    /// Entries left out (the smallest) to fit a message or a cap.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub omitted: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
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
    /// The neighbour that introduced it.
    via: u128,
}

/// Reports built for one message size.
struct Encoded {
    max_len: usize,
    built: Instant,
    bytes: Arc<Vec<u8>>,
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
    /// The reports to send, as built lately per message size.
    encoded: Mutex<Vec<Encoded>>,
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
            encoded: Mutex::new(Vec::new()),
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
            omitted: 0,
        }
    }

    /// Takes in reports from a neighbour that is not told apart from
    /// others ([`TrafficMatrix::merge_from`] with neighbour 0).
    pub fn merge(&self, reports: Vec<MatrixReport>) {
        self.merge_from(0, reports)
    }

    /// Takes in reports received from neighbour `neighbour` (any id of
    /// the peer they came by; tunnels use its address: an IPv4 address,
    /// or an IPv6 /64). Keeps the newest per origin and ignores this
    /// switch's own. Keeps at most [`MAX_REMOTE_ORIGINS`] origins: a new
    /// one pushes out the one heard of least lately of those introduced
    /// by the neighbour that introduced the most (this one's own on a
    /// tie); and at most [`MAX_REPORT_ENTRIES`] entries per report.
    pub fn merge_from(&self, neighbour: u128, reports: Vec<MatrixReport>) {
        let now = unix_ms();
        let mut remote = lock(&self.remote);
        remote.retain(|_, r| now.saturating_sub(r.received_ms) <= REMOTE_TTL_MS * 6);
        // A neighbour sends its own report and those it relays: no more
        // than the cap (and this switch's own) make sense in one message.
        for mut r in reports.into_iter().take(MAX_REMOTE_ORIGINS + 2) {
            if r.origin == self.origin {
                continue;
            }
            let via = match remote.get(&r.origin) {
                Some(old) if old.report.seq >= r.seq => continue,
                Some(old) => old.via,
                None => {
                    if remote.len() >= MAX_REMOTE_ORIGINS
                        && let Some(o) = make_room(&remote, neighbour)
                    {
                        remote.remove(&o);
                    }
                    neighbour
                }
            };
            if r.entries.len() > MAX_REPORT_ENTRIES {
                r.omitted += (r.entries.len() - MAX_REPORT_ENTRIES) as u64;
                keep_biggest(&mut r.entries, MAX_REPORT_ENTRIES);
            }
            remote.insert(
                r.origin,
                Remote {
                    report: r,
                    received_ms: now,
                    order: self.received.fetch_add(1, Relaxed),
                    via,
                },
            );
        }
    }

    /// The reports to send to a neighbour ([`Self::reports_to_send`]) as
    /// the JSON of a `MATRIX` message of at most `max_len` bytes: the
    /// biggest pairs of all reports that fit (the others counted in each
    /// report's `omitted`). Built at most once per [`REPORT_REUSE`] per
    /// size, whatever the number of neighbours.
    pub fn encoded_reports(&self, max_len: usize) -> Arc<Vec<u8>> {
        let mut cache = lock(&self.encoded);
        if let Some(e) = cache.iter().find(|e| e.max_len == max_len)
            && e.built.elapsed() < REPORT_REUSE
        {
            return e.bytes.clone();
        }
        let bytes = Arc::new(encode_within(self.reports_to_send(), max_len));
        cache.retain(|e| e.max_len != max_len);
        if cache.len() >= MAX_ENCODINGS {
            cache.remove(0);
        }
        cache.push(Encoded {
            max_len,
            built: Instant::now(),
            bytes: bytes.clone(),
        });
        bytes
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

/// The origin to push out for a new one from `neighbour`: the one heard
/// of least lately of the neighbour that introduced the most (this one on
/// a tie).
fn make_room(remote: &HashMap<u64, Remote>, neighbour: u128) -> Option<u64> {
    let mut count: HashMap<u128, usize> = HashMap::new();
    for r in remote.values() {
        *count.entry(r.via).or_default() += 1;
    }
    let most = count.values().copied().max()?;
    let gives_way = |via: u128| {
        if count.get(&neighbour) == Some(&most) {
            via == neighbour
        } else {
            count.get(&via) == Some(&most)
        }
    };
    remote
        .iter()
        .filter(|(_, r)| gives_way(r.via))
        .min_by_key(|(_, r)| r.order)
        .map(|(&o, _)| o)
}

/// Counts the bytes written to it.
#[derive(Default)]
struct Count(usize);

impl std::io::Write for Count {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0 += b.len();
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn json_len<T: Serialize>(v: &T) -> usize {
    let mut c = Count::default();
    // Writing to a counter does not fail (nor does serializing these).
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

/// `reports` as JSON of at most `max_len` bytes: all of them if they
/// fit; else the biggest pairs (by bytes over 60 s, across reports) that
/// fit, each report saying in `omitted` how many of its own were left
/// out. A report whose header alone does not fit goes (remote ones
/// first: this switch's own is first in the list).
fn encode_within(mut reports: Vec<MatrixReport>, max_len: usize) -> Vec<u8> {
    let total: usize = reports.iter().map(|r| r.entries.len()).sum();
    // Few enough entries that they may all fit: try (a message's worth
    // of work at most).
    if total.saturating_mul(MIN_ENTRY_JSON) <= max_len
        && let Ok(v) = serde_json::to_vec(&reports)
        && v.len() <= max_len
    {
        return v;
    }
    // Each report without entries and `omitted` as big as it can get,
    // with its comma; the list's brackets.
    let header = |r: &MatrixReport| {
        json_len(&MatrixReport {
            origin: r.origin,
            seq: r.seq,
            entries: Vec::new(),
            omitted: r.omitted + r.entries.len() as u64,
        }) + 1
    };
    let mut budget = max_len.saturating_sub(1);
    let mut keep = 0;
    for r in &reports {
        let h = header(r);
        if h > budget {
            break;
        }
        budget -= h;
        keep += 1;
    }
    reports.truncate(keep);
    // The biggest entries, as many as could fit at the shortest.
    let mut order: Vec<(u64, usize, usize)> = reports
        .iter()
        .enumerate()
        .flat_map(|(i, r)| {
            r.entries
                .iter()
                .enumerate()
                .map(move |(j, e)| (e.last_60s.bytes, i, j))
        })
        .collect();
    let most = (budget / MIN_ENTRY_JSON + 1).min(order.len());
    if most < order.len() {
        order.select_nth_unstable_by(most, |a, b| b.0.cmp(&a.0));
        order.truncate(most);
    }
    order.sort_unstable_by_key(|o| std::cmp::Reverse(o.0));
    let mut chosen: Vec<Vec<bool>> = reports
        .iter()
        .map(|r| vec![false; r.entries.len()])
        .collect();
    for &(_, i, j) in &order {
        // Its JSON and a comma.
        let n = json_len(&reports[i].entries[j]) + 1;
        if n > budget {
            break;
        }
        budget -= n;
        chosen[i][j] = true;
    }
    for (r, chosen) in reports.iter_mut().zip(chosen) {
        let before = r.entries.len();
        let mut it = chosen.into_iter();
        r.entries.retain(|_| it.next().unwrap_or(false));
        r.omitted += (before - r.entries.len()) as u64;
    }
    match serde_json::to_vec(&reports) {
        Ok(v) if v.len() <= max_len => v,
        _ => b"[]".to_vec(),
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
            omitted: 0,
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

    fn report(origin: u64, entries: u32) -> MatrixReport {
        MatrixReport {
            origin,
            seq: 1,
            omitted: 0,
            entries: (0..entries)
                .map(|i| MatrixEntry {
                    src: Mac::local(i),
                    dst: Mac::local(0),
                    class: TrafficClass::Unicast,
                    last_1s: Volume::default(),
                    last_10s: Volume::default(),
                    last_60s: Volume {
                        bytes: u64::from(i),
                        frames: 1,
                    },
                })
                .collect(),
        }
    }

    #[test]
    fn a_neighbour_making_up_origins_pushes_out_only_its_own() {
        let m = TrafficMatrix::new();
        // A hub (neighbour 1) relays 20 real switches.
        m.merge_from(1, (100..120).map(|o| report(o, 1)).collect());
        // Neighbour 2 makes up thousands, heard of after the real ones.
        for k in 0..100 {
            m.merge_from(2, (0..50).map(|i| report(10_000 + k * 50 + i, 0)).collect());
        }
        let has = |o: std::ops::Range<u64>| {
            let origins = m.remote_origins();
            o.clone().all(|x| origins.contains(&x))
        };
        assert_eq!(m.remote_origins().len(), MAX_REMOTE_ORIGINS);
        assert!(has(100..120), "real origins pushed out");
        // A third neighbour's own origin gets in, in place of one of 2's.
        m.merge_from(3, vec![report(7, 1)]);
        assert!(has(7..8) && has(100..120));
        // As more switches join behind the hub, it takes places from the
        // one making up until they hold as many (the third keeps its
        // one), then gives up its own least lately heard.
        m.merge_from(1, (120..150).map(|o| report(o, 1)).collect());
        assert_eq!(m.remote_origins().len(), MAX_REMOTE_ORIGINS);
        let count =
            |r: std::ops::Range<u64>| m.remote_origins().iter().filter(|o| r.contains(o)).count();
        assert_eq!((count(100..150), count(10_000..20_000)), (32, 31));
        assert!(has(118..150) && has(7..8));
    }

    #[test]
    fn the_reports_are_built_once_per_tick_and_fit_the_limit() {
        let m = TrafficMatrix::new();
        for i in 0..3000u32 {
            m.record(
                Mac::local(i),
                Mac::local(0xffff),
                TrafficClass::Unicast,
                60 + i as usize,
            );
        }
        m.merge_from(1, vec![report(5, 500)]);
        const LIMIT: usize = 64 * 1024;
        let a = m.encoded_reports(LIMIT);
        assert!(
            std::sync::Arc::ptr_eq(&a, &m.encoded_reports(LIMIT)),
            "built again within the tick"
        );
        assert!(a.len() <= LIMIT, "{} bytes", a.len());
        let v: Vec<MatrixReport> = serde_json::from_slice(&a).unwrap();
        assert_eq!(v.len(), 2, "both reports, trimmed");
        assert_eq!(v[0].origin, m.origin());
        // The biggest pairs are kept: every pair left out is smaller than
        // every pair kept.
        let kept = &v[0].entries;
        assert!(kept.len() > 100 && kept.len() < 3000, "{}", kept.len());
        let smallest = kept.iter().map(|e| e.last_60s.bytes).min().unwrap();
        assert_eq!(smallest, 60 + 3000 - kept.len() as u64);
        assert_eq!(v[0].omitted, 3000 - kept.len() as u64, "it says so");
        assert_eq!(v[1].entries.len() as u64 + v[1].omitted, 500);
        // A size that holds everything gets everything.
        let all: Vec<MatrixReport> = serde_json::from_slice(&m.encoded_reports(4 << 20)).unwrap();
        assert_eq!((all[0].entries.len(), all[0].omitted), (3000, 0));
        // One too small for any entry still says who is there.
        let none: Vec<MatrixReport> = serde_json::from_slice(&m.encoded_reports(300)).unwrap();
        assert!(
            none.iter().all(|r| r.entries.is_empty() && r.omitted > 0),
            "{none:?}"
        );
        assert!(!none.is_empty());
        assert_eq!(&m.encoded_reports(10)[..], b"[]");
    }

    #[test]
    fn no_entry_is_shorter_than_the_shortest_assumed() {
        let e = MatrixEntry {
            src: Mac::default(),
            dst: Mac::default(),
            class: TrafficClass::Arp,
            last_1s: Volume::default(),
            last_10s: Volume::default(),
            last_60s: Volume::default(),
        };
        let n = json_len(&e);
        assert!(n >= MIN_ENTRY_JSON, "{n}");
        assert!(n < MIN_ENTRY_JSON + 20, "{n}: the bound could be closer");
    }
}
