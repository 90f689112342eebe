//! Frame, byte and drop counters for ports and switches.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why a frame was dropped. Every drop is counted under one of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// Shorter than an Ethernet header.
    Runt,
    /// Longer than the switch MTU allows.
    Oversize,
    /// Source address is a group address.
    BadSource,
    /// The only destination is the port it came in by.
    Hairpin,
    /// Tunnel to tunnel on a switch that is not the hub.
    SplitHorizon,
    /// Ingress or egress port no longer exists.
    NoPort,
    /// The egress port's queue was full.
    QueueFull,
    /// The egress port failed to send (I/O error, link down).
    TxError,
    /// Bigger than the tunnel can carry.
    PathMtu,
    /// A tunnel message that could not be decoded.
    Malformed,
    /// Fragments that never completed.
    Reassembly,
    /// An offload (checksum, segmentation) the switch could not do for a
    /// port without offloads (not TCP, bad headers).
    Offload,
    /// Source address other than the one the port may send from (a guest
    /// NIC sending from an address that is not its own).
    SpoofedSource,
    /// A tunnel datagram without a valid tag where a key is set.
    Unauthenticated,
    /// A tunnel datagram whose counter was seen already (sent again by
    /// someone who recorded it), or too far behind the newest.
    Replayed,
}

impl DropReason {
    pub const ALL: [DropReason; 15] = [
        DropReason::Runt,
        DropReason::Oversize,
        DropReason::BadSource,
        DropReason::Hairpin,
        DropReason::SplitHorizon,
        DropReason::NoPort,
        DropReason::QueueFull,
        DropReason::TxError,
        DropReason::PathMtu,
        DropReason::Malformed,
        DropReason::Reassembly,
        DropReason::Offload,
        DropReason::SpoofedSource,
        DropReason::Unauthenticated,
        DropReason::Replayed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Runt => "runt",
            DropReason::Oversize => "oversize",
            DropReason::BadSource => "bad_source",
            DropReason::Hairpin => "hairpin",
            DropReason::SplitHorizon => "split_horizon",
            DropReason::NoPort => "no_port",
            DropReason::QueueFull => "queue_full",
            DropReason::TxError => "tx_error",
            DropReason::PathMtu => "path_mtu",
            DropReason::Malformed => "malformed",
            DropReason::Reassembly => "reassembly",
            DropReason::Offload => "offload",
            DropReason::SpoofedSource => "spoofed_source",
            DropReason::Unauthenticated => "unauthenticated",
            DropReason::Replayed => "replayed",
        }
    }
}

/// Lock-free counters of one port or switch.
#[derive(Debug, Default)]
pub struct Counters {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub flooded: AtomicU64,
    drops: [AtomicU64; DropReason::ALL.len()],
}

impl Counters {
    pub fn rx(&self, bytes: usize) {
        self.rx_frames.fetch_add(1, Relaxed);
        self.rx_bytes.fetch_add(bytes as u64, Relaxed);
    }
    pub fn tx(&self, bytes: usize) {
        self.tx_frames.fetch_add(1, Relaxed);
        self.tx_bytes.fetch_add(bytes as u64, Relaxed);
    }
    pub fn drop(&self, reason: DropReason) {
        self.drops[reason as usize].fetch_add(1, Relaxed);
    }
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize].load(Relaxed)
    }
    pub fn snapshot(&self) -> CounterSnapshot {
        let mut drops = BTreeMap::new();
        for r in DropReason::ALL {
            let n = self.drops(r);
            if n > 0 {
                drops.insert(r, n);
            }
        }
        CounterSnapshot {
            rx_frames: self.rx_frames.load(Relaxed),
            rx_bytes: self.rx_bytes.load(Relaxed),
            tx_frames: self.tx_frames.load(Relaxed),
            tx_bytes: self.tx_bytes.load(Relaxed),
            flooded: self.flooded.load(Relaxed),
            drops,
        }
    }
}

/// A copy of [`Counters`] at one moment. `rx` is what entered the switch
/// by the port, `tx` what left by it; `drops` lists non-zero reasons.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterSnapshot {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub flooded: u64,
    pub drops: BTreeMap<DropReason, u64>,
}

impl CounterSnapshot {
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops.get(&reason).copied().unwrap_or(0)
    }
    pub fn total_drops(&self) -> u64 {
        self.drops.values().sum()
    }
}
