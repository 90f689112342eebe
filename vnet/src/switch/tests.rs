use super::*;
use crate::frame::build_frame;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Mutex;

/// Counts allocations made by the current thread.
struct CountingAlloc;

thread_local! {
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

#[derive(Default)]
struct Collector {
    frames: Mutex<Vec<Vec<u8>>>,
    fail: Option<DropReason>,
}

impl Collector {
    fn take(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.frames.lock().unwrap())
    }
    fn count(&self) -> usize {
        self.frames.lock().unwrap().len()
    }
}

impl PortSink for Collector {
    fn send(&self, frame: &dyn Frame) -> Result<(), DropReason> {
        if let Some(r) = self.fail {
            return Err(r);
        }
        let mut v = Vec::new();
        assert!(crate::frame::copy_frame(frame, &mut v));
        self.frames.lock().unwrap().push(v);
        Ok(())
    }
}

/// Counts frames without allocating.
#[derive(Default)]
struct Counter(AtomicU64);

impl PortSink for Counter {
    fn send(&self, frame: &dyn Frame) -> Result<(), DropReason> {
        let mut b = [0u8; 64];
        frame.read_at(0, &mut b);
        self.0.fetch_add(1, Relaxed);
        Ok(())
    }
}

fn sw(cfg: SwitchConfig) -> Arc<Switch> {
    Switch::new(cfg).unwrap()
}

fn ports(s: &Switch, kinds: &[PortKind]) -> Vec<(PortId, Arc<Collector>)> {
    kinds
        .iter()
        .enumerate()
        .map(|(i, &k)| {
            let c = Arc::new(Collector::default());
            (s.add_port(&format!("p{i}"), k, c.clone()), c)
        })
        .collect()
}

fn eth(dst: Mac, src: Mac) -> Vec<u8> {
    build_frame(dst, src, 0x0800, &[0xab; 46])
}

const A: Mac = Mac([2, 0, 0, 0, 0, 0xa]);
const B: Mac = Mac([2, 0, 0, 0, 0, 0xb]);
const C: Mac = Mac([2, 0, 0, 0, 0, 0xc]);

#[test]
fn broadcast_floods_to_all_but_ingress_then_learned_unicast_goes_to_one_port() {
    let s = sw(SwitchConfig::default());
    let p = ports(&s, &[PortKind::Tap, PortKind::Tap, PortKind::Guest]);
    s.ingress_bytes(p[0].0, &eth(Mac::BROADCAST, A));
    assert_eq!((p[0].1.count(), p[1].1.count(), p[2].1.count()), (0, 1, 1));
    // Unknown unicast floods too.
    s.ingress_bytes(p[1].0, &eth(C, B));
    assert_eq!((p[0].1.count(), p[1].1.count(), p[2].1.count()), (1, 1, 2));
    // B answers A: A was learned on port 0.
    let reply = eth(A, B);
    s.ingress_bytes(p[1].0, &reply);
    assert_eq!(p[0].1.take().last().unwrap(), &reply);
    assert_eq!((p[1].1.count(), p[2].1.count()), (1, 2));
    // A to B now goes to port 1 only.
    s.ingress_bytes(p[0].0, &eth(B, A));
    assert_eq!((p[0].1.count(), p[1].1.count(), p[2].1.count()), (0, 2, 2));
    assert_eq!(s.lookup(A, None), Some(p[0].0));
    assert_eq!(s.lookup(B, None), Some(p[1].0));
    let macs = s.macs();
    assert_eq!(macs.len(), 2);
    // A moves to port 2.
    s.ingress_bytes(p[2].0, &eth(Mac::BROADCAST, A));
    assert_eq!(s.lookup(A, None), Some(p[2].0));
}

#[test]
fn frame_to_the_port_it_came_from_is_dropped_as_hairpin() {
    let s = sw(SwitchConfig::default());
    let p = ports(&s, &[PortKind::Tap, PortKind::Tap]);
    s.ingress_bytes(p[0].0, &eth(Mac::BROADCAST, A));
    s.ingress_bytes(p[0].0, &eth(A, B));
    assert_eq!(p[0].1.count(), 0);
    assert_eq!(p[1].1.count(), 1);
    assert_eq!(
        s.port(p[0].0)
            .unwrap()
            .counters
            .dropped(DropReason::Hairpin),
        1
    );
}

#[test]
fn rules_override_learning_and_vlan_rules_are_more_specific() {
    let s = sw(SwitchConfig::default());
    let p = ports(&s, &[PortKind::Tap, PortKind::Tap, PortKind::Tap]);
    s.ingress_bytes(p[1].0, &eth(Mac::BROADCAST, B));
    for c in &p {
        c.1.take();
    }
    s.add_rule(Rule {
        dst: B,
        vlan: None,
        port: p[2].0,
    })
    .unwrap();
    s.ingress_bytes(p[0].0, &eth(B, A));
    assert_eq!((p[1].1.count(), p[2].1.count()), (0, 1));
    // VLAN 7 frames to B go to port 0's neighbour... port 1 by a VLAN rule.
    s.add_rule(Rule {
        dst: B,
        vlan: Some(7),
        port: p[1].0,
    })
    .unwrap();
    let mut tagged = eth(B, C)[..12].to_vec();
    tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x07, 0x08, 0x00]);
    tagged.extend_from_slice(&[0; 46]);
    s.ingress_bytes(p[0].0, &tagged);
    assert_eq!((p[1].1.count(), p[2].1.count()), (1, 1));
    // VLAN 8 falls back to the any-VLAN rule.
    tagged[15] = 8;
    s.ingress_bytes(p[0].0, &tagged);
    assert_eq!((p[1].1.count(), p[2].1.count()), (1, 2));
    assert_eq!(s.rules().len(), 2);
    s.remove_rule(B, None).unwrap();
    s.remove_rule(B, Some(7)).unwrap();
    assert_eq!(s.remove_rule(B, None), Err(SwitchError::NoSuchRule));
    // Back to learning.
    s.ingress_bytes(p[0].0, &eth(B, A));
    assert_eq!((p[1].1.count(), p[2].1.count()), (2, 2));
    assert_eq!(
        s.add_rule(Rule {
            dst: B,
            vlan: None,
            port: 99
        }),
        Err(SwitchError::NoSuchPort(99))
    );
}

#[test]
fn learned_addresses_age_out() {
    let s = sw(SwitchConfig {
        ageing: Duration::from_millis(50),
        ..Default::default()
    });
    let p = ports(&s, &[PortKind::Tap, PortKind::Tap, PortKind::Tap]);
    s.ingress_bytes(p[1].0, &eth(Mac::BROADCAST, B));
    assert_eq!(s.lookup(B, None), Some(p[1].0));
    std::thread::sleep(Duration::from_millis(120));
    assert_eq!(s.lookup(B, None), None);
    assert!(s.macs().is_empty());
    s.ingress_bytes(p[0].0, &eth(B, A));
    assert_eq!(
        (p[1].1.count(), p[2].1.count()),
        (1, 2),
        "aged-out destination is flooded"
    );
    s.age_out();
    assert_eq!(s.macs().len(), 1, "only A, just learned, is left");
}

#[test]
fn tunnels_do_not_flood_to_tunnels_unless_hub() {
    let s = sw(SwitchConfig::default());
    let p = ports(&s, &[PortKind::Tunnel, PortKind::Tunnel, PortKind::Tap]);
    s.ingress_bytes(p[0].0, &eth(Mac::BROADCAST, A));
    assert_eq!((p[1].1.count(), p[2].1.count()), (0, 1));
    // A local broadcast still goes to every tunnel.
    s.ingress_bytes(p[2].0, &eth(Mac::BROADCAST, C));
    assert_eq!((p[0].1.count(), p[1].1.count()), (1, 1));
    // Learned unicast tunnel to tunnel is refused too.
    s.ingress_bytes(p[1].0, &eth(C, B));
    s.ingress_bytes(p[0].0, &eth(B, A));
    assert_eq!(p[1].1.count(), 1);
    assert_eq!(s.info().counters.dropped(DropReason::SplitHorizon), 1);
    s.set_hub(true);
    s.ingress_bytes(p[0].0, &eth(B, A));
    s.ingress_bytes(p[0].0, &eth(Mac::BROADCAST, A));
    assert_eq!(p[1].1.count(), 3);
}

#[test]
fn bad_frames_are_counted_as_drops() {
    let s = sw(SwitchConfig::default());
    let p = ports(&s, &[PortKind::Tap, PortKind::Tap]);
    s.ingress_bytes(p[0].0, &[]);
    s.ingress_bytes(p[0].0, &[1u8; 13]);
    // A VLAN tag cut short.
    let mut t = eth(B, A)[..12].to_vec();
    t.extend_from_slice(&[0x81, 0x00, 0x00]);
    s.ingress_bytes(p[0].0, &t);
    s.ingress_bytes(p[0].0, &eth(B, Mac::BROADCAST));
    s.ingress_bytes(p[0].0, &vec![0u8; 1500 + 18 + 1]);
    s.ingress_bytes(p[0].0, &build_frame(B, A, 0x0800, &[0; 1505]));
    s.ingress_bytes(77, &eth(B, A));
    // Garbage of every length up to 2000 never panics.
    let mut x: u32 = 12345;
    for len in 0..2000 {
        let g: Vec<u8> = (0..len)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (x >> 16) as u8
            })
            .collect();
        s.ingress_bytes(p[0].0, &g);
    }
    let c = s.port(p[0].0).unwrap().counters;
    assert!(c.dropped(DropReason::Runt) >= 3 + 14);
    assert!(c.dropped(DropReason::Oversize) >= 482);
    assert!(c.dropped(DropReason::BadSource) >= 1);
    assert_eq!(s.info().counters.dropped(DropReason::NoPort), 1);
    // The exact 1518-byte tagged maximum passes.
    let mut max = eth(B, A)[..12].to_vec();
    max.extend_from_slice(&[0x81, 0x00, 0x00, 0x01, 0x08, 0x00]);
    max.resize(1518, 0);
    let before = p[1].1.count();
    s.ingress_bytes(p[0].0, &max);
    assert_eq!(p[1].1.count(), before + 1);
}

#[test]
fn mtu_is_configurable_up_to_9000() {
    assert!(matches!(
        Switch::new(SwitchConfig {
            mtu: 9001,
            ..Default::default()
        }),
        Err(SwitchError::BadMtu(9001))
    ));
    assert!(
        Switch::new(SwitchConfig {
            mtu: 67,
            ..Default::default()
        })
        .is_err()
    );
    let s = sw(SwitchConfig {
        mtu: 9000,
        ..Default::default()
    });
    let p = ports(&s, &[PortKind::Tap, PortKind::Tap]);
    let jumbo = build_frame(B, A, 0x0800, &[7; 9000]);
    s.ingress_bytes(p[0].0, &jumbo);
    assert_eq!(p[1].1.take(), vec![jumbo.clone()]);
    s.set_mtu(1500).unwrap();
    s.ingress_bytes(p[0].0, &jumbo);
    assert_eq!(p[1].1.count(), 0);
    assert_eq!(s.info().counters.dropped(DropReason::Oversize), 1);
}

#[test]
fn counters_per_port_and_switch() {
    let s = sw(SwitchConfig::default());
    let full = Arc::new(Collector {
        fail: Some(DropReason::QueueFull),
        ..Default::default()
    });
    let p = ports(&s, &[PortKind::Tap, PortKind::Tap]);
    let pf = s.add_port("full", PortKind::Tap, full);
    let f = eth(Mac::BROADCAST, A);
    for _ in 0..3 {
        s.ingress_bytes(p[0].0, &f);
    }
    let c0 = s.port(p[0].0).unwrap().counters;
    assert_eq!(
        (c0.rx_frames, c0.rx_bytes, c0.flooded, c0.tx_frames),
        (3, 3 * 60, 3, 0)
    );
    let c1 = s.port(p[1].0).unwrap().counters;
    assert_eq!((c1.tx_frames, c1.tx_bytes), (3, 180));
    let cf = s.port(pf).unwrap().counters;
    assert_eq!((cf.tx_frames, cf.dropped(DropReason::QueueFull)), (0, 3));
    let sc = s.info().counters;
    assert_eq!(
        (
            sc.rx_frames,
            sc.tx_frames,
            sc.dropped(DropReason::QueueFull)
        ),
        (3, 3, 3)
    );
    let json = serde_json::to_value(s.ports()).unwrap();
    assert_eq!(json[2]["counters"]["drops"]["queue_full"], 3);
    assert_eq!(json[0]["kind"], "tap");
}

#[test]
fn removing_a_port_forgets_its_addresses_and_rules() {
    let s = sw(SwitchConfig::default());
    let p = ports(&s, &[PortKind::Tap, PortKind::Tap, PortKind::Tap]);
    s.ingress_bytes(p[1].0, &eth(Mac::BROADCAST, B));
    s.add_rule(Rule {
        dst: C,
        vlan: None,
        port: p[1].0,
    })
    .unwrap();
    s.remove_port(p[1].0).unwrap();
    assert_eq!(s.lookup(B, None), None);
    assert!(s.rules().is_empty());
    assert_eq!(s.remove_port(p[1].0), Err(SwitchError::NoSuchPort(p[1].0)));
    s.ingress_bytes(p[0].0, &eth(B, A));
    assert_eq!(p[2].1.count(), 2);
    assert_eq!(p[1].1.count(), 0);
    let ids: Vec<PortId> = s.ports().iter().map(|p| p.id).collect();
    assert_eq!(ids, vec![p[0].0, p[2].0]);
}

/// A frame in two pieces, like a guest's descriptor chain; counts what
/// is read from it.
struct Scattered {
    parts: [Vec<u8>; 2],
    read: AtomicU64,
}

impl Frame for Scattered {
    fn len(&self) -> usize {
        self.parts[0].len() + self.parts[1].len()
    }
    fn read_at(&self, mut offset: usize, buf: &mut [u8]) -> usize {
        let mut n = 0;
        for part in &self.parts {
            if offset >= part.len() {
                offset -= part.len();
                continue;
            }
            let k = (part.len() - offset).min(buf.len() - n);
            buf[n..n + k].copy_from_slice(&part[offset..offset + k]);
            n += k;
            offset = 0;
        }
        self.read.fetch_add(n as u64, Relaxed);
        n
    }
}

#[test]
fn scattered_frame_is_read_once_by_the_destination_only() {
    let s = sw(SwitchConfig::default());
    let p = ports(&s, &[PortKind::Guest, PortKind::Guest]);
    let whole = build_frame(B, A, 0x0800, &[5; 1000]);
    let f = Scattered {
        parts: [whole[..10].to_vec(), whole[10..].to_vec()],
        read: AtomicU64::new(0),
    };
    s.ingress(p[0].0, &f);
    assert_eq!(p[1].1.take(), vec![whole.clone()]);
    // The header (at most 18 bytes) for the switch, then one full copy.
    assert_eq!(f.read.load(Relaxed), 18 + whole.len() as u64);
}

#[test]
fn forwarding_does_not_allocate() {
    let s = sw(SwitchConfig::default());
    let sinks: Vec<Arc<Counter>> = (0..4).map(|_| Arc::new(Counter::default())).collect();
    let ids: Vec<PortId> = sinks
        .iter()
        .enumerate()
        .map(|(i, c)| s.add_port(&format!("c{i}"), PortKind::Guest, c.clone()))
        .collect();
    let bcast = eth(Mac::BROADCAST, A);
    let uni = eth(A, B);
    let uni2 = eth(B, A);
    // Warm up: learn both, create the matrix pairs.
    s.ingress_bytes(ids[0], &bcast);
    s.ingress_bytes(ids[1], &uni);
    s.ingress_bytes(ids[0], &uni2);
    let before = ALLOCS.with(|c| c.get());
    for _ in 0..1000 {
        s.ingress_bytes(ids[0], &bcast);
        s.ingress_bytes(ids[1], &uni);
        s.ingress_bytes(ids[0], &uni2);
    }
    let after = ALLOCS.with(|c| c.get());
    assert_eq!(after - before, 0, "allocations on the forwarding path");
    assert_eq!(sinks[0].0.load(Relaxed), 1001);
    assert_eq!(sinks[1].0.load(Relaxed), 1002 + 1000);
    assert_eq!(sinks[2].0.load(Relaxed), 1001);
}

#[test]
fn matrix_counts_local_traffic_only() {
    let s = sw(SwitchConfig::default());
    let p = ports(&s, &[PortKind::Tap, PortKind::Tunnel]);
    s.ingress_bytes(p[0].0, &eth(B, A));
    s.ingress_bytes(p[1].0, &eth(A, B));
    let m = s.matrix().local();
    assert_eq!(m.entries.len(), 1);
    assert_eq!((m.entries[0].src, m.entries[0].dst), (A, B));
}

/// Records frames with their offload header.
#[derive(Default)]
struct OffloadSink {
    frames: Mutex<Vec<(Option<crate::frame::NetHdr>, Vec<u8>)>>,
}

impl PortSink for OffloadSink {
    fn send(&self, frame: &dyn Frame) -> Result<(), DropReason> {
        let mut v = Vec::new();
        crate::frame::copy_frame(frame, &mut v);
        self.frames.lock().unwrap().push((frame.net_hdr(), v));
        Ok(())
    }
    fn offloads(&self) -> bool {
        true
    }
}

#[test]
fn super_frames_pass_to_offload_ports_and_are_segmented_for_others() {
    use crate::frame::{HdrFrame, NetHdr};
    let s = sw(SwitchConfig::default());
    let p = ports(&s, &[PortKind::Tap, PortKind::Guest]);
    let off = Arc::new(OffloadSink::default());
    let po = s.add_port("off", PortKind::Tap, off.clone());
    // IPv4/TCP, 20 + 20 header bytes, 4000 bytes of payload.
    let mut ip = vec![
        0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
    ];
    ip.extend_from_slice(&[
        0, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0x50, 0x18, 1, 0, 0, 0, 0, 0,
    ]);
    ip.extend(std::iter::repeat_n(7u8, 4000));
    let data = build_frame(Mac::BROADCAST, A, 0x0800, &ip);
    let f = HdrFrame {
        hdr: NetHdr {
            flags: NetHdr::F_NEEDS_CSUM,
            gso_type: NetHdr::GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        },
        data: &data,
    };
    s.ingress(p[0].0, &f);
    let got = off.frames.lock().unwrap().clone();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, Some(f.hdr));
    assert_eq!(got[0].1, data);
    let segs = p[1].1.take();
    assert_eq!(segs.len(), 3, "4000 bytes in 1448-byte segments");
    assert!(segs.iter().all(|s| s.len() <= 1514));
    assert_eq!(segs.iter().map(|s| s.len() - 54).sum::<usize>(), 4000);
    assert_eq!(s.port(po).unwrap().counters.tx_frames, 1);
    // Too big without offload metadata: oversize.
    s.ingress_bytes(p[0].0, &data);
    assert_eq!(
        s.port(p[0].0)
            .unwrap()
            .counters
            .dropped(DropReason::Oversize),
        1
    );
}

#[test]
fn a_guest_port_sends_only_from_its_own_mac_until_relaxed() {
    let s = sw(SwitchConfig::default());
    let (ca, cb, ct) = (
        Arc::new(Collector::default()),
        Arc::new(Collector::default()),
        Arc::new(Collector::default()),
    );
    let a = s.add_guest_port("vm-a", A, ca.clone());
    let b = s.add_guest_port("vm-b", B, cb.clone());
    let t = s.add_port("tap", PortKind::Tap, ct.clone());
    s.ingress_bytes(b, &eth(Mac::BROADCAST, B));
    assert_eq!(s.lookup(B, None), Some(b));
    ca.take();
    ct.take();

    // A takes over B's address: dropped, counted, not learned.
    s.ingress_bytes(a, &eth(Mac::BROADCAST, B));
    s.ingress_bytes(a, &eth(C, B));
    assert_eq!((cb.count(), ct.count()), (0, 0));
    let spoofed = |p| {
        s.port(p)
            .unwrap()
            .counters
            .dropped(DropReason::SpoofedSource)
    };
    assert_eq!(spoofed(a), 2);
    assert_eq!(s.info().counters.dropped(DropReason::SpoofedSource), 2);
    assert_eq!(s.lookup(B, None), Some(b), "B's address stays on B's port");
    // A fills the table with made-up addresses: none is learned.
    for i in 0..100 {
        s.ingress_bytes(a, &eth(Mac::BROADCAST, Mac::local(1000 + i)));
    }
    assert_eq!(s.macs().len(), 1, "{:?}", s.macs());
    assert_eq!(spoofed(a), 102);
    // Nor counted in the traffic matrix: only B's own broadcast is there.
    assert_eq!(s.matrix().local().entries.len(), 1);
    // The real owner still gets its frames.
    s.ingress_bytes(t, &eth(B, C));
    assert_eq!(cb.take().len(), 1);
    // A's own address passes.
    s.ingress_bytes(a, &eth(Mac::BROADCAST, A));
    assert_eq!((cb.take().len(), ct.take().len()), (1, 1));
    assert_eq!(s.lookup(A, None), Some(a));

    assert_eq!(s.port(a).unwrap().source, SourcePolicy::Only(A));
    assert_eq!(s.port(t).unwrap().source, SourcePolicy::Any);
    // Relaxed at run time (a guest that bridges others), A may send from
    // any address; locked again, it may not.
    s.set_source_policy(a, SourcePolicy::Any).unwrap();
    assert_eq!(s.port(a).unwrap().source, SourcePolicy::Any);
    s.ingress_bytes(a, &eth(Mac::BROADCAST, C));
    assert_eq!(s.lookup(C, None), Some(a));
    assert_eq!(ct.take().len(), 1);
    s.set_source_policy(a, SourcePolicy::Only(A)).unwrap();
    s.ingress_bytes(a, &eth(Mac::BROADCAST, Mac::local(7)));
    assert_eq!(ct.count(), 0);
    assert_eq!(spoofed(a), 103);
    assert_eq!(
        s.set_source_policy(999, SourcePolicy::Any),
        Err(SwitchError::NoSuchPort(999))
    );
}

#[test]
fn a_guest_port_made_with_any_source_sends_from_any_address() {
    // What `vmplant run --net MAC,any-source` makes (a guest that bridges
    // other hosts): a guest port whose rule lets every source through.
    let s = sw(SwitchConfig::default());
    let ct = Arc::new(Collector::default());
    let g = s.add_port_with(
        "vm-bridge",
        PortKind::Guest,
        Arc::new(Collector::default()),
        SourcePolicy::Any,
    );
    s.add_port("tap", PortKind::Tap, ct.clone());
    assert_eq!(s.port(g).unwrap().source, SourcePolicy::Any);
    for m in [A, B, C] {
        s.ingress_bytes(g, &eth(Mac::BROADCAST, m));
        assert_eq!(s.lookup(m, None), Some(g));
    }
    assert_eq!(ct.take().len(), 3);
    assert_eq!(
        s.port(g)
            .unwrap()
            .counters
            .dropped(DropReason::SpoofedSource),
        0
    );
}
