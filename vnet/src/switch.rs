//! The layer-2 switch: ports, MAC learning with ageing, forwarding rules,
//! flooding with split horizon, counters.
//!
//! A port is anything that implements [`PortSink`]; the switch calls its
//! `send` for each frame that leaves by it. Frames enter by
//! [`Switch::ingress`], which reads only the header, picks the
//! destination(s), and lets each destination's sink copy the frame to
//! where it goes. The hot path takes read locks and does not allocate
//! (learning a new address or adding a matrix pair does, once).

use crate::counters::{CounterSnapshot, Counters, DropReason};
use crate::frame::{
    Bytes, ETH_HEADER_LEN, ETHERTYPE_ARP, EthHeader, Frame, MAX_MTU, MIN_MTU, Mac, NetHdr,
    VLAN_TAG_LEN, copy_frame,
};
use crate::matrix::{TrafficClass, TrafficMatrix};
use crate::offload::for_each_plain;
use crate::ratelimit::LogLimit;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

/// A port's number on its switch; never reused by that switch.
pub type PortId = u32;

/// Errors of the switch's control API.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SwitchError {
    #[error("MTU {0} is outside 68..=9000")]
    BadMtu(usize),
    #[error("no port {0}")]
    NoSuchPort(PortId),
    #[error("no such rule")]
    NoSuchRule,
}

/// What is behind a port. Flooding treats tunnels apart (split horizon).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PortKind {
    /// A guest's virtio-net device.
    Guest,
    /// A host TAP interface.
    Tap,
    /// A tunnel to another switch.
    Tunnel,
    /// Anything else (tests, tools).
    Other,
}

/// The egress side of a port: the switch calls `send` for each frame that
/// leaves the switch by this port.
///
/// `send` is called on the thread of the ingress port, with the switch's
/// port table read-locked, so it must not block for long and must not call
/// back into the switch's control API. It copies the frame (the only copy
/// the switch makes) with [`Frame::read_at`] or [`Frame::as_contiguous`]
/// into its destination (a guest's RX buffers, a TAP, a tunnel queue) and
/// returns why if it could not.
pub trait PortSink: Send + Sync {
    fn send(&self, frame: &dyn Frame) -> Result<(), DropReason>;
    /// True if `send` takes frames with a [`NetHdr`] (partial checksums,
    /// TCP super-frames) and passes it on; otherwise the switch gives it
    /// plain frames only (completing checksums, segmenting).
    fn offloads(&self) -> bool {
        false
    }
}

thread_local! {
    /// Buffers for software offloads, per ingress thread.
    static SCRATCH: std::cell::RefCell<(Vec<u8>, Vec<u8>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Settings of a switch.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SwitchConfig {
    /// Largest payload (IP packet) a frame may carry: 68..=9000.
    pub mtu: usize,
    /// How long a learned address stays without traffic from it.
    pub ageing: Duration,
    /// Hub of a star of tunnels: floods and forwards between tunnels.
    pub hub: bool,
    /// At most this many learned addresses (further ones are not learned).
    pub max_macs: usize,
}

impl Default for SwitchConfig {
    fn default() -> Self {
        SwitchConfig {
            mtu: 1500,
            ageing: Duration::from_secs(300),
            hub: false,
            max_macs: 16384,
        }
    }
}

/// Which source addresses a port may send from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourcePolicy {
    /// Any unicast address (TAPs and tunnels bridge many hosts).
    #[default]
    Any,
    /// Only this address (a guest NIC's own): frames from any other are
    /// dropped as [`DropReason::SpoofedSource`] and not learned.
    Only(Mac),
}

/// A forwarding rule: frames to `dst` (on `vlan`, or on any VLAN if
/// `None`) go to `port`, whatever was learned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rule {
    pub dst: Mac,
    pub vlan: Option<u16>,
    pub port: PortId,
}

/// A port as listed by [`Switch::ports`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortInfo {
    pub id: PortId,
    pub name: String,
    pub kind: PortKind,
    /// The source addresses it may send from.
    #[serde(default)]
    pub source: SourcePolicy,
    pub counters: CounterSnapshot,
}

/// A learned address as listed by [`Switch::macs`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MacInfo {
    pub mac: Mac,
    pub vlan: Option<u16>,
    pub port: PortId,
    pub age_ms: u64,
}

/// Switch-wide state for listing.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SwitchInfo {
    pub mtu: usize,
    pub hub: bool,
    pub learned: usize,
    pub counters: CounterSnapshot,
}

struct PortEntry {
    id: PortId,
    name: String,
    kind: PortKind,
    sink: Arc<dyn PortSink>,
    counters: Counters,
    /// The port's [`SourcePolicy`], lock-free for the frame path: 0 for
    /// any, else [`SOURCE_ONLY`] with the address in the low 48 bits.
    source: AtomicU64,
    /// Spoofed frames are counted; a line is logged now and then.
    spoof_log: LogLimit,
}

/// Marks an encoded [`SourcePolicy::Only`].
const SOURCE_ONLY: u64 = 1 << 48;

impl SourcePolicy {
    fn encode(self) -> u64 {
        match self {
            SourcePolicy::Any => 0,
            SourcePolicy::Only(m) => {
                let mut b = [0u8; 8];
                b[2..].copy_from_slice(&m.0);
                SOURCE_ONLY | u64::from_be_bytes(b)
            }
        }
    }

    fn decode(v: u64) -> SourcePolicy {
        if v & SOURCE_ONLY == 0 {
            return SourcePolicy::Any;
        }
        let b = v.to_be_bytes();
        let mut m = [0u8; 6];
        m.copy_from_slice(&b[2..]);
        SourcePolicy::Only(Mac(m))
    }
}

struct MacEntry {
    port: PortId,
    last_seen_ms: AtomicU64,
}

/// VLAN key of the MAC table: 0 for untagged (VLAN 0 is "priority only").
type MacKey = (u16, Mac);

/// An Ethernet switch. Share it as `Arc<Switch>`.
pub struct Switch {
    mtu: AtomicUsize,
    hub: AtomicBool,
    ageing_ms: u64,
    max_macs: usize,
    epoch: Instant,
    next_port: AtomicU32,
    ports: RwLock<Vec<Arc<PortEntry>>>,
    macs: RwLock<HashMap<MacKey, MacEntry>>,
    rules: RwLock<HashMap<(Mac, Option<u16>), PortId>>,
    last_sweep_ms: AtomicU64,
    counters: Counters,
    matrix: TrafficMatrix,
}

fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

impl Switch {
    pub fn new(cfg: SwitchConfig) -> Result<Arc<Switch>, SwitchError> {
        check_mtu(cfg.mtu)?;
        Ok(Arc::new(Switch {
            mtu: AtomicUsize::new(cfg.mtu),
            hub: AtomicBool::new(cfg.hub),
            ageing_ms: cfg.ageing.as_millis() as u64,
            max_macs: cfg.max_macs,
            epoch: Instant::now(),
            next_port: AtomicU32::new(1),
            ports: RwLock::new(Vec::with_capacity(16)),
            macs: RwLock::new(HashMap::with_capacity(256)),
            rules: RwLock::new(HashMap::new()),
            last_sweep_ms: AtomicU64::new(0),
            counters: Counters::default(),
            matrix: TrafficMatrix::new(),
        }))
    }

    pub fn mtu(&self) -> usize {
        self.mtu.load(Relaxed)
    }

    pub fn set_mtu(&self, mtu: usize) -> Result<(), SwitchError> {
        check_mtu(mtu)?;
        self.mtu.store(mtu, Relaxed);
        Ok(())
    }

    /// Longest frame accepted: MTU plus header plus one VLAN tag.
    pub fn max_frame_len(&self) -> usize {
        self.mtu() + ETH_HEADER_LEN + VLAN_TAG_LEN
    }

    pub fn is_hub(&self) -> bool {
        self.hub.load(Relaxed)
    }

    pub fn set_hub(&self, hub: bool) {
        self.hub.store(hub, Relaxed);
    }

    /// The traffic matrix this switch fills.
    pub fn matrix(&self) -> &TrafficMatrix {
        &self.matrix
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Adds a port that may send from any address; frames leaving by it
    /// go to `sink`. A guest NIC's port is [`Switch::add_guest_port`].
    pub fn add_port(&self, name: &str, kind: PortKind, sink: Arc<dyn PortSink>) -> PortId {
        self.add_port_with(name, kind, sink, SourcePolicy::Any)
    }

    /// Adds a guest NIC's port: it may send only from the NIC's address
    /// `mac`, so that a guest cannot take over another's address or fill
    /// the address table. [`Switch::set_source_policy`] relaxes that (a
    /// guest that bridges other hosts).
    pub fn add_guest_port(&self, name: &str, mac: Mac, sink: Arc<dyn PortSink>) -> PortId {
        self.add_port_with(name, PortKind::Guest, sink, SourcePolicy::Only(mac))
    }

    /// Adds a port of `kind` that may send from the addresses `source`
    /// allows.
    pub fn add_port_with(
        &self,
        name: &str,
        kind: PortKind,
        sink: Arc<dyn PortSink>,
        source: SourcePolicy,
    ) -> PortId {
        let id = self.next_port.fetch_add(1, Relaxed);
        let entry = Arc::new(PortEntry {
            id,
            name: name.to_string(),
            kind,
            sink,
            counters: Counters::default(),
            source: AtomicU64::new(source.encode()),
            spoof_log: LogLimit::default(),
        });
        write(&self.ports).push(entry);
        tracing::debug!(port = id, name, ?kind, ?source, "port added");
        id
    }

    /// Sets which source addresses port `id` may send from, while
    /// traffic flows.
    pub fn set_source_policy(&self, id: PortId, policy: SourcePolicy) -> Result<(), SwitchError> {
        let ports = read(&self.ports);
        let p = ports
            .iter()
            .find(|p| p.id == id)
            .ok_or(SwitchError::NoSuchPort(id))?;
        p.source.store(policy.encode(), Relaxed);
        tracing::info!(port = id, ?policy, "source policy set");
        Ok(())
    }

    /// Removes a port with its learned addresses and the rules that point
    /// to it. Frames in flight through it finish first.
    pub fn remove_port(&self, id: PortId) -> Result<(), SwitchError> {
        {
            let mut ports = write(&self.ports);
            let i = ports
                .iter()
                .position(|p| p.id == id)
                .ok_or(SwitchError::NoSuchPort(id))?;
            ports.remove(i);
        }
        write(&self.macs).retain(|_, e| e.port != id);
        write(&self.rules).retain(|_, p| *p != id);
        tracing::debug!(port = id, "port removed");
        Ok(())
    }

    /// Adds or replaces the rule for (`dst`, `vlan`).
    pub fn add_rule(&self, rule: Rule) -> Result<(), SwitchError> {
        if !read(&self.ports).iter().any(|p| p.id == rule.port) {
            return Err(SwitchError::NoSuchPort(rule.port));
        }
        write(&self.rules).insert((rule.dst, rule.vlan), rule.port);
        Ok(())
    }

    pub fn remove_rule(&self, dst: Mac, vlan: Option<u16>) -> Result<Rule, SwitchError> {
        let port = write(&self.rules)
            .remove(&(dst, vlan))
            .ok_or(SwitchError::NoSuchRule)?;
        Ok(Rule { dst, vlan, port })
    }

    pub fn rules(&self) -> Vec<Rule> {
        let mut v: Vec<Rule> = read(&self.rules)
            .iter()
            .map(|(&(dst, vlan), &port)| Rule { dst, vlan, port })
            .collect();
        v.sort_by_key(|r| (r.dst, r.vlan));
        v
    }

    pub fn ports(&self) -> Vec<PortInfo> {
        read(&self.ports)
            .iter()
            .map(|p| PortInfo {
                id: p.id,
                name: p.name.clone(),
                kind: p.kind,
                source: SourcePolicy::decode(p.source.load(Relaxed)),
                counters: p.counters.snapshot(),
            })
            .collect()
    }

    pub fn port(&self, id: PortId) -> Option<PortInfo> {
        self.ports().into_iter().find(|p| p.id == id)
    }

    /// Learned addresses that have not aged out.
    pub fn macs(&self) -> Vec<MacInfo> {
        let now = self.now_ms();
        let mut v: Vec<MacInfo> = read(&self.macs)
            .iter()
            .filter_map(|(&(vlan, mac), e)| {
                let age = now.saturating_sub(e.last_seen_ms.load(Relaxed));
                (age <= self.ageing_ms).then_some(MacInfo {
                    mac,
                    vlan: (vlan != 0).then_some(vlan),
                    port: e.port,
                    age_ms: age,
                })
            })
            .collect();
        v.sort_by_key(|m| (m.mac, m.vlan));
        v
    }

    /// Port a frame to `mac` would go to (rule first, then learning).
    pub fn lookup(&self, mac: Mac, vlan: Option<u16>) -> Option<PortId> {
        self.route(mac, vlan, self.now_ms())
    }

    pub fn info(&self) -> SwitchInfo {
        SwitchInfo {
            mtu: self.mtu(),
            hub: self.is_hub(),
            learned: self.macs().len(),
            counters: self.counters.snapshot(),
        }
    }

    /// Forgets addresses not seen for the ageing time.
    pub fn age_out(&self) {
        let now = self.now_ms();
        self.last_sweep_ms.store(now, Relaxed);
        write(&self.macs)
            .retain(|_, e| now.saturating_sub(e.last_seen_ms.load(Relaxed)) <= self.ageing_ms);
    }

    /// Counts a drop that happened before a frame reached the switch (a
    /// port's own decoding); `port` gets it too if it exists.
    pub fn count_drop(&self, port: PortId, reason: DropReason) {
        self.counters.drop(reason);
        if let Some(p) = read(&self.ports).iter().find(|p| p.id == port) {
            p.counters.drop(reason);
        }
    }

    fn route(&self, dst: Mac, vlan: Option<u16>, now: u64) -> Option<PortId> {
        {
            let rules = read(&self.rules);
            if !rules.is_empty() {
                if let Some(&p) = rules.get(&(dst, vlan)) {
                    return Some(p);
                }
                if vlan.is_some()
                    && let Some(&p) = rules.get(&(dst, None))
                {
                    return Some(p);
                }
            }
        }
        if dst.is_multicast() {
            return None;
        }
        let macs = read(&self.macs);
        let e = macs.get(&(vlan.unwrap_or(0), dst))?;
        (now.saturating_sub(e.last_seen_ms.load(Relaxed)) <= self.ageing_ms).then_some(e.port)
    }

    fn learn(&self, src: Mac, vlan: Option<u16>, port: PortId, now: u64) {
        let key = (vlan.unwrap_or(0), src);
        {
            let macs = read(&self.macs);
            if let Some(e) = macs.get(&key)
                && e.port == port
            {
                e.last_seen_ms.store(now, Relaxed);
                return;
            }
        }
        if now.saturating_sub(self.last_sweep_ms.load(Relaxed)) > self.ageing_ms {
            self.age_out();
        }
        let mut macs = write(&self.macs);
        if macs.len() >= self.max_macs && !macs.contains_key(&key) {
            return;
        }
        let entry = MacEntry {
            port,
            last_seen_ms: AtomicU64::new(now),
        };
        if let Some(old) = macs.insert(key, entry)
            && old.port != port
        {
            tracing::debug!(mac = %src, from = old.port, to = port, "address moved");
        }
    }

    /// [`Switch::ingress`] for a frame in one buffer.
    pub fn ingress_bytes(&self, ingress: PortId, frame: &[u8]) {
        self.ingress(ingress, &Bytes(frame))
    }

    /// A frame enters the switch by port `ingress`. Forwards it to the
    /// rule's port, the learned port, or floods it; counts everything.
    pub fn ingress(&self, ingress: PortId, frame: &dyn Frame) {
        let len = frame.len();
        let ports = read(&self.ports);
        let Some(inp) = ports.iter().find(|p| p.id == ingress) else {
            self.counters.drop(DropReason::NoPort);
            return;
        };
        self.counters.rx(len);
        inp.counters.rx(len);
        let drop = |r: DropReason| {
            self.counters.drop(r);
            inp.counters.drop(r);
        };
        let hdr = frame.net_hdr();
        let max = match hdr {
            Some(h) if h.is_gso() => MAX_GSO_FRAME,
            _ => self.max_frame_len(),
        };
        if len > max {
            return drop(DropReason::Oversize);
        }
        let Some(h) = EthHeader::read(frame) else {
            return drop(DropReason::Runt);
        };
        if h.src.is_multicast() {
            return drop(DropReason::BadSource);
        }
        if let SourcePolicy::Only(own) = SourcePolicy::decode(inp.source.load(Relaxed))
            && h.src != own
        {
            if let Some(held) = inp.spoof_log.check() {
                tracing::warn!(port = ingress, name = %inp.name, src = %h.src, own = %own, held_back = held,
                    "dropping frames from an address that is not the port's");
            }
            return drop(DropReason::SpoofedSource);
        }
        let now = self.now_ms();
        self.learn(h.src, h.vlan, ingress, now);
        let from_tunnel = inp.kind == PortKind::Tunnel;
        if !from_tunnel {
            let class = if h.ethertype == ETHERTYPE_ARP {
                TrafficClass::Arp
            } else if h.dst.is_multicast() {
                TrafficClass::Broadcast
            } else {
                TrafficClass::Unicast
            };
            self.matrix.record(h.src, h.dst, class, len);
        }
        let split = from_tunnel && !self.is_hub();
        match self.route(h.dst, h.vlan, now) {
            Some(out) if out == ingress => drop(DropReason::Hairpin),
            Some(out) => match ports.iter().find(|p| p.id == out) {
                None => drop(DropReason::NoPort),
                Some(p) if split && p.kind == PortKind::Tunnel => drop(DropReason::SplitHorizon),
                Some(p) => self.deliver(p, frame, len),
            },
            None => {
                self.counters.flooded.fetch_add(1, Relaxed);
                inp.counters.flooded.fetch_add(1, Relaxed);
                for p in ports.iter() {
                    if p.id == ingress || (split && p.kind == PortKind::Tunnel) {
                        continue;
                    }
                    self.deliver(p, frame, len);
                }
            }
        }
    }

    fn deliver(&self, p: &PortEntry, frame: &dyn Frame, len: usize) {
        let res = match frame.net_hdr() {
            Some(h) if !p.sink.offloads() => self.deliver_plain(p, frame, &h),
            _ => p.sink.send(frame),
        };
        match res {
            Ok(()) => {
                p.counters.tx(len);
                self.counters.tx(len);
            }
            Err(r) => {
                p.counters.drop(r);
                self.counters.drop(r);
            }
        }
    }
}

impl Switch {
    /// Software offloads for a sink that takes plain frames only.
    fn deliver_plain(
        &self,
        p: &PortEntry,
        frame: &dyn Frame,
        hdr: &NetHdr,
    ) -> Result<(), DropReason> {
        let max = self.max_frame_len();
        SCRATCH.with(|s| {
            let Ok(mut s) = s.try_borrow_mut() else {
                return Err(DropReason::Offload);
            };
            let (whole, seg) = &mut *s;
            let data = match frame.as_contiguous() {
                Some(d) => d,
                None => {
                    if !copy_frame(frame, whole) {
                        return Err(DropReason::TxError);
                    }
                    &whole[..]
                }
            };
            for_each_plain(data, hdr, max, seg, |f| p.sink.send(&Bytes(f)))
        })
    }
}

/// Largest frame with segmentation offload: a 64 KiB IP packet.
pub const MAX_GSO_FRAME: usize = 65535 + ETH_HEADER_LEN + VLAN_TAG_LEN;

fn check_mtu(mtu: usize) -> Result<(), SwitchError> {
    if (MIN_MTU..=MAX_MTU).contains(&mtu) {
        Ok(())
    } else {
        Err(SwitchError::BadMtu(mtu))
    }
}

#[cfg(test)]
mod tests;
