//! Ethernet frames: MAC addresses, header parsing, and the [`Frame`] trait
//! that lets a port hand the switch a frame wherever it lives (a buffer, or
//! a chain of guest descriptors) without copying it first.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// Length of an Ethernet header without a VLAN tag.
pub const ETH_HEADER_LEN: usize = 14;
/// Length of an 802.1Q tag.
pub const VLAN_TAG_LEN: usize = 4;
/// EtherType of an 802.1Q tag.
pub const ETHERTYPE_VLAN: u16 = 0x8100;
/// EtherType of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// Largest MTU a switch accepts (jumbo frames).
pub const MAX_MTU: usize = 9000;
/// Smallest MTU a switch accepts (the IPv4 minimum).
pub const MIN_MTU: usize = 68;

/// Errors of this module.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("a MAC address is six hex bytes separated by colons")]
    BadMac,
}

/// A 48-bit Ethernet address. Serialized as `aa:bb:cc:dd:ee:ff`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    pub const BROADCAST: Mac = Mac([0xff; 6]);

    /// Group (multicast or broadcast) address.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }

    pub fn is_broadcast(&self) -> bool {
        *self == Self::BROADCAST
    }

    /// A locally administered unicast address whose low bytes are `n`.
    pub fn local(n: u32) -> Mac {
        let b = n.to_be_bytes();
        Mac([0x02, 0x56, b[0], b[1], b[2], b[3]])
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Mac {
    type Err = FrameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for b in out.iter_mut() {
            let p = parts.next().ok_or(FrameError::BadMac)?;
            if p.is_empty() || p.len() > 2 {
                return Err(FrameError::BadMac);
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| FrameError::BadMac)?;
        }
        if parts.next().is_some() {
            return Err(FrameError::BadMac);
        }
        Ok(Mac(out))
    }
}

impl Serialize for Mac {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A frame as the switch sees it: a length and a way to read bytes.
///
/// A buffer is a frame (`[u8]` implements this). A virtio-net device
/// implements it over a TX descriptor chain in guest memory, so the switch
/// reads only the header and the destination port's sink copies the frame
/// once, straight into where it goes (a TAP write, a tunnel buffer, or
/// another guest's RX buffers).
pub trait Frame {
    /// Length of the whole frame in bytes (no virtio-net header).
    fn len(&self) -> usize;
    /// Copies bytes from `offset` into `buf`; returns how many were copied
    /// (less than `buf.len()` only at the end of the frame or on a fault).
    fn read_at(&self, offset: usize, buf: &mut [u8]) -> usize;
    /// The frame as one slice, if it is stored that way.
    fn as_contiguous(&self) -> Option<&[u8]> {
        None
    }
    /// Offload metadata (a virtio-net header) when the frame needs a
    /// checksum completed or is a TCP segmentation-offload super-frame.
    /// Ports whose sink does not take offloads get plain frames: the
    /// switch completes the checksum or segments for them.
    fn net_hdr(&self) -> Option<NetHdr> {
        None
    }
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Frame for [u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
    fn read_at(&self, offset: usize, buf: &mut [u8]) -> usize {
        let Some(src) = self.get(offset..) else {
            return 0;
        };
        let n = src.len().min(buf.len());
        buf[..n].copy_from_slice(&src[..n]);
        n
    }
    fn as_contiguous(&self) -> Option<&[u8]> {
        Some(self)
    }
}

/// A byte slice as a [`Frame`] (a `&[u8]` cannot be a `&dyn Frame`).
#[derive(Clone, Copy, Debug)]
pub struct Bytes<'a>(pub &'a [u8]);

impl Frame for Bytes<'_> {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn read_at(&self, offset: usize, buf: &mut [u8]) -> usize {
        self.0.read_at(offset, buf)
    }
    fn as_contiguous(&self) -> Option<&[u8]> {
        Some(self.0)
    }
}

/// The legacy virtio-net header (10 bytes, little endian), as TAPs with
/// `IFF_VNET_HDR` and virtio-net devices carry it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl NetHdr {
    pub const LEN: usize = 10;
    pub const F_NEEDS_CSUM: u8 = 1;
    pub const F_DATA_VALID: u8 = 2;
    pub const GSO_NONE: u8 = 0;
    pub const GSO_TCPV4: u8 = 1;
    pub const GSO_UDP: u8 = 3;
    pub const GSO_TCPV6: u8 = 4;
    pub const GSO_ECN: u8 = 0x80;

    pub fn from_bytes(b: &[u8; 10]) -> NetHdr {
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        NetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        }
    }

    pub fn to_bytes(&self) -> [u8; 10] {
        let mut b = [0u8; 10];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b
    }

    /// A segmentation-offload super-frame.
    pub fn is_gso(&self) -> bool {
        self.gso_type & !Self::GSO_ECN != Self::GSO_NONE
    }

    /// Nothing to do: no partial checksum, no segmentation.
    pub fn is_plain(&self) -> bool {
        self.flags & Self::F_NEEDS_CSUM == 0 && !self.is_gso()
    }
}

/// A frame in one buffer with a virtio-net header (from a TAP or a
/// tunnel that carries offloads).
#[derive(Clone, Copy, Debug)]
pub struct HdrFrame<'a> {
    pub hdr: NetHdr,
    pub data: &'a [u8],
}

impl Frame for HdrFrame<'_> {
    fn len(&self) -> usize {
        self.data.len()
    }
    fn read_at(&self, offset: usize, buf: &mut [u8]) -> usize {
        self.data.read_at(offset, buf)
    }
    fn as_contiguous(&self) -> Option<&[u8]> {
        Some(self.data)
    }
    fn net_hdr(&self) -> Option<NetHdr> {
        (!self.hdr.is_plain()).then_some(self.hdr)
    }
}

/// Copies a whole frame into `out` (cleared first); false if the frame
/// could not be read in full.
pub fn copy_frame(frame: &dyn Frame, out: &mut Vec<u8>) -> bool {
    out.clear();
    if let Some(s) = frame.as_contiguous() {
        out.extend_from_slice(s);
        return true;
    }
    let len = frame.len();
    out.resize(len, 0);
    frame.read_at(0, out) == len
}

/// The parts of an Ethernet header the switch looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EthHeader {
    pub dst: Mac,
    pub src: Mac,
    /// 802.1Q VLAN id, if the frame is tagged.
    pub vlan: Option<u16>,
    /// EtherType after any VLAN tag.
    pub ethertype: u16,
}

impl EthHeader {
    /// Parses the first bytes of a frame; `None` if too short.
    pub fn parse(b: &[u8]) -> Option<EthHeader> {
        if b.len() < ETH_HEADER_LEN {
            return None;
        }
        let dst = Mac(b[0..6].try_into().ok()?);
        let src = Mac(b[6..12].try_into().ok()?);
        let mut ethertype = u16::from_be_bytes([b[12], b[13]]);
        let mut vlan = None;
        if ethertype == ETHERTYPE_VLAN {
            if b.len() < ETH_HEADER_LEN + VLAN_TAG_LEN {
                return None;
            }
            vlan = Some(u16::from_be_bytes([b[14], b[15]]) & 0x0fff);
            ethertype = u16::from_be_bytes([b[16], b[17]]);
        }
        Some(EthHeader {
            dst,
            src,
            vlan,
            ethertype,
        })
    }

    /// Reads and parses the header of any frame (no allocation).
    pub fn read(frame: &dyn Frame) -> Option<EthHeader> {
        let mut b = [0u8; ETH_HEADER_LEN + VLAN_TAG_LEN];
        let n = frame.read_at(0, &mut b);
        Self::parse(&b[..n])
    }
}

/// Builds a frame (tests and tools): header, then payload.
pub fn build_frame(dst: Mac, src: Mac, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_HEADER_LEN + payload.len());
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trips_through_text_and_json() {
        let m: Mac = "02:56:00:00:00:0a".parse().unwrap();
        assert_eq!(m, Mac::local(10));
        assert_eq!(m.to_string(), "02:56:00:00:00:0a");
        let j = serde_json::to_string(&m).unwrap();
        assert_eq!(j, "\"02:56:00:00:00:0a\"");
        assert_eq!(serde_json::from_str::<Mac>(&j).unwrap(), m);
        assert!("02:56:00:00:00".parse::<Mac>().is_err());
        assert!("02:56:00:00:00:0a:01".parse::<Mac>().is_err());
        assert!("zz:56:00:00:00:0a".parse::<Mac>().is_err());
        assert!(Mac::BROADCAST.is_multicast());
        assert!(!Mac::local(1).is_multicast());
    }

    #[test]
    fn header_parses_vlan_tags_and_rejects_runts() {
        let f = build_frame(Mac::BROADCAST, Mac::local(1), ETHERTYPE_ARP, &[0; 28]);
        let h = EthHeader::parse(&f).unwrap();
        assert_eq!(
            (h.dst, h.src, h.vlan, h.ethertype),
            (Mac::BROADCAST, Mac::local(1), None, ETHERTYPE_ARP)
        );
        let mut t = f[..12].to_vec();
        t.extend_from_slice(&[0x81, 0x00, 0x20, 0x2a, 0x08, 0x00]);
        let h = EthHeader::parse(&t).unwrap();
        assert_eq!((h.vlan, h.ethertype), (Some(42), 0x0800));
        assert!(EthHeader::parse(&t[..15]).is_none());
        assert!(EthHeader::parse(&f[..13]).is_none());
        assert!(EthHeader::read(&Bytes(&f)).is_some());
    }
}
