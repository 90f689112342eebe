//! Software offloads for ports that take plain frames only: completing a
//! partial checksum, and TCP segmentation of a GSO super-frame (IPv4 and
//! IPv6, with or without a VLAN tag).

use crate::counters::DropReason;
use crate::frame::{ETH_HEADER_LEN, ETHERTYPE_VLAN, NetHdr, VLAN_TAG_LEN};

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const PROTO_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// Ones-complement sum of `data` (big-endian 16-bit words) added to `acc`.
pub fn sum16(data: &[u8], mut acc: u64) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = chunks.remainder() {
        acc += u64::from(*b) << 8;
    }
    acc
}

/// Folds a sum to 16 bits.
pub fn fold(mut s: u64) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// Calls `out` with plain frames equivalent to `frame` with header `hdr`:
/// the frame with its checksum completed, or the segments of a TCP
/// super-frame. `scratch` is reused; segments longer than `max_len` are
/// refused.
pub fn for_each_plain(
    frame: &[u8],
    hdr: &NetHdr,
    max_len: usize,
    scratch: &mut Vec<u8>,
    mut out: impl FnMut(&[u8]) -> Result<(), DropReason>,
) -> Result<(), DropReason> {
    if !hdr.is_gso() {
        if hdr.flags & NetHdr::F_NEEDS_CSUM == 0 {
            return out(frame);
        }
        scratch.clear();
        scratch.extend_from_slice(frame);
        complete_csum(scratch, hdr)?;
        return out(scratch);
    }
    let gso = hdr.gso_type & !NetHdr::GSO_ECN;
    if gso != NetHdr::GSO_TCPV4 && gso != NetHdr::GSO_TCPV6 {
        return Err(DropReason::Offload);
    }
    segment_tcp(frame, hdr.gso_size as usize, max_len, scratch, &mut out)
}

/// Completes a partial checksum: the field at csum_start + csum_offset
/// holds the pseudo-header sum; add everything from csum_start.
fn complete_csum(f: &mut [u8], hdr: &NetHdr) -> Result<(), DropReason> {
    let start = hdr.csum_start as usize;
    let at = start + hdr.csum_offset as usize;
    if start >= f.len() || at + 2 > f.len() {
        return Err(DropReason::Offload);
    }
    let mut c = !fold(sum16(&f[start..], 0));
    if c == 0 {
        c = 0xffff;
    }
    f[at..at + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

struct Layout {
    l3: usize,
    l4: usize,
    payload: usize,
    v4: bool,
}

fn layout(f: &[u8]) -> Option<Layout> {
    let mut l3 = ETH_HEADER_LEN;
    let mut et = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    if et == ETHERTYPE_VLAN {
        l3 += VLAN_TAG_LEN;
        et = u16::from_be_bytes([*f.get(16)?, *f.get(17)?]);
    }
    let (v4, l4) = match et {
        ETHERTYPE_IPV4 => {
            let ihl = usize::from(f.get(l3)? & 0x0f) * 4;
            if ihl < 20 || *f.get(l3 + 9)? != PROTO_TCP {
                return None;
            }
            (true, l3 + ihl)
        }
        ETHERTYPE_IPV6 => {
            if *f.get(l3 + 6)? != PROTO_TCP {
                return None;
            }
            (false, l3 + 40)
        }
        _ => return None,
    };
    let doff = usize::from(f.get(l4 + 12)? >> 4) * 4;
    if doff < 20 || l4 + doff > f.len() {
        return None;
    }
    Some(Layout {
        l3,
        l4,
        payload: l4 + doff,
        v4,
    })
}

fn segment_tcp(
    f: &[u8],
    mss: usize,
    max_len: usize,
    seg: &mut Vec<u8>,
    out: &mut impl FnMut(&[u8]) -> Result<(), DropReason>,
) -> Result<(), DropReason> {
    let l = layout(f).ok_or(DropReason::Offload)?;
    if mss == 0 {
        return Err(DropReason::Offload);
    }
    if l.payload + mss > max_len {
        return Err(DropReason::Oversize);
    }
    let payload = &f[l.payload..];
    let seq0 = u32::from_be_bytes([f[l.l4 + 4], f[l.l4 + 5], f[l.l4 + 6], f[l.l4 + 7]]);
    let flags0 = f[l.l4 + 13];
    let id0 = u16::from_be_bytes([f[l.l3 + 4], f[l.l3 + 5]]);
    let n = payload.len().div_ceil(mss).max(1);
    for i in 0..n {
        let chunk = payload
            .get(i * mss..((i + 1) * mss).min(payload.len()))
            .unwrap_or(&[]);
        seg.clear();
        seg.extend_from_slice(&f[..l.payload]);
        seg.extend_from_slice(chunk);
        let tcp_len = seg.len() - l.l4;
        if l.v4 {
            let tot = (seg.len() - l.l3) as u16;
            seg[l.l3 + 2..l.l3 + 4].copy_from_slice(&tot.to_be_bytes());
            seg[l.l3 + 4..l.l3 + 6].copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
            seg[l.l3 + 10..l.l3 + 12].fill(0);
            let c = !fold(sum16(&seg[l.l3..l.l4], 0));
            seg[l.l3 + 10..l.l3 + 12].copy_from_slice(&c.to_be_bytes());
        } else {
            seg[l.l3 + 4..l.l3 + 6].copy_from_slice(&(tcp_len as u16).to_be_bytes());
        }
        let seq = seq0.wrapping_add((i * mss) as u32);
        seg[l.l4 + 4..l.l4 + 8].copy_from_slice(&seq.to_be_bytes());
        let mut flags = flags0;
        if i + 1 < n {
            flags &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            flags &= !TCP_CWR;
        }
        seg[l.l4 + 13] = flags;
        seg[l.l4 + 16..l.l4 + 18].fill(0);
        let pseudo = if l.v4 {
            sum16(&seg[l.l3 + 12..l.l3 + 20], 0)
        } else {
            sum16(&seg[l.l3 + 8..l.l3 + 40], 0)
        } + u64::from(PROTO_TCP)
            + tcp_len as u64;
        let c = !fold(sum16(&seg[l.l4..], pseudo));
        seg[l.l4 + 16..l.l4 + 18].copy_from_slice(&c.to_be_bytes());
        out(seg)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Mac, build_frame};

    fn tcp_frame(v4: bool, payload: usize, flags: u8) -> Vec<u8> {
        let mut ip = Vec::new();
        let tcp_len = 20 + payload;
        if v4 {
            ip.extend_from_slice(&[0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, PROTO_TCP, 0, 0]);
            ip.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
        } else {
            ip.extend_from_slice(&[0x60, 0, 0, 0]);
            ip.extend_from_slice(&(tcp_len as u16).to_be_bytes());
            ip.extend_from_slice(&[PROTO_TCP, 64]);
            ip.extend_from_slice(&[0xfd; 16]);
            ip.extend_from_slice(&[0xfe; 16]);
        }
        let mut tcp = vec![
            0x30, 0x39, 0x00, 0x50, 0, 0, 0x10, 0, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0,
        ];
        tcp.extend((0..payload).map(|i| (i % 251) as u8));
        ip.extend_from_slice(&tcp);
        let et = if v4 { ETHERTYPE_IPV4 } else { ETHERTYPE_IPV6 };
        build_frame(Mac::local(2), Mac::local(1), et, &ip)
    }

    /// Checks the IPv4 header and TCP checksums of a plain frame.
    fn checksums_ok(f: &[u8]) -> bool {
        let l = layout(f).unwrap();
        let tcp_len = f.len() - l.l4;
        let pseudo = if l.v4 {
            if fold(sum16(&f[l.l3..l.l4], 0)) != 0xffff {
                return false;
            }
            sum16(&f[l.l3 + 12..l.l3 + 20], 0)
        } else {
            sum16(&f[l.l3 + 8..l.l3 + 40], 0)
        } + u64::from(PROTO_TCP)
            + tcp_len as u64;
        fold(sum16(&f[l.l4..], pseudo)) == 0xffff
    }

    #[test]
    fn tcp_super_frames_are_segmented_with_valid_headers() {
        for v4 in [true, false] {
            let f = tcp_frame(v4, 3500, TCP_PSH | TCP_FIN | TCP_CWR);
            let mss: u16 = if v4 { 1448 } else { 1440 };
            let hdr = NetHdr {
                flags: NetHdr::F_NEEDS_CSUM,
                gso_type: if v4 {
                    NetHdr::GSO_TCPV4
                } else {
                    NetHdr::GSO_TCPV6
                },
                gso_size: mss,
                ..Default::default()
            };
            let mut segs = Vec::new();
            for_each_plain(&f, &hdr, 1518, &mut Vec::new(), |s| {
                segs.push(s.to_vec());
                Ok(())
            })
            .unwrap();
            assert_eq!(segs.len(), 3);
            let l = layout(&f).unwrap();
            let mut data = Vec::new();
            for (i, s) in segs.iter().enumerate() {
                assert!(checksums_ok(s), "segment {i} v4={v4}");
                assert!(s.len() <= 1518);
                let seq = u32::from_be_bytes(s[l.l4 + 4..l.l4 + 8].try_into().unwrap());
                assert_eq!(seq, 0x1000 + (i as u32) * u32::from(mss));
                let fl = s[l.l4 + 13];
                assert_eq!(fl & TCP_FIN != 0, i == 2, "FIN only on the last");
                assert_eq!(fl & TCP_CWR != 0, i == 0, "CWR only on the first");
                if v4 {
                    let tot = u16::from_be_bytes([s[l.l3 + 2], s[l.l3 + 3]]) as usize;
                    assert_eq!(tot, s.len() - l.l3);
                } else {
                    let pl = u16::from_be_bytes([s[l.l3 + 4], s[l.l3 + 5]]) as usize;
                    assert_eq!(pl, s.len() - l.l4);
                }
                data.extend_from_slice(&s[l.payload..]);
            }
            assert_eq!(data, f[l.payload..]);
        }
    }

    #[test]
    fn partial_checksum_is_completed() {
        let mut f = tcp_frame(true, 100, TCP_PSH);
        let l = layout(&f).unwrap();
        // The pseudo-header sum in the field, as the kernel leaves it.
        let tcp_len = (f.len() - l.l4) as u64;
        let pseudo = fold(sum16(&f[l.l3 + 12..l.l3 + 20], 0) + 6 + tcp_len);
        f[l.l4 + 16..l.l4 + 18].copy_from_slice(&pseudo.to_be_bytes());
        let ip_c = !fold(sum16(&f[l.l3..l.l4], 0));
        f[l.l3 + 10..l.l3 + 12].copy_from_slice(&ip_c.to_be_bytes());
        let hdr = NetHdr {
            flags: NetHdr::F_NEEDS_CSUM,
            csum_start: l.l4 as u16,
            csum_offset: 16,
            ..Default::default()
        };
        assert!(!checksums_ok(&f));
        let mut got = None;
        for_each_plain(&f, &hdr, 1518, &mut Vec::new(), |s| {
            got = Some(s.to_vec());
            Ok(())
        })
        .unwrap();
        assert!(checksums_ok(&got.unwrap()));
    }

    #[test]
    fn bad_offload_requests_are_refused_not_panics() {
        let f = tcp_frame(true, 3000, 0);
        let tso = NetHdr {
            gso_type: NetHdr::GSO_TCPV4,
            gso_size: 1448,
            ..Default::default()
        };
        let ok = |_: &[u8]| Ok(());
        let mut s = Vec::new();
        assert_eq!(
            for_each_plain(&f[..40], &tso, 1518, &mut s, ok),
            Err(DropReason::Offload)
        );
        let udp = NetHdr {
            gso_type: NetHdr::GSO_UDP,
            ..tso
        };
        assert_eq!(
            for_each_plain(&f, &udp, 1518, &mut s, ok),
            Err(DropReason::Offload)
        );
        let zero = NetHdr { gso_size: 0, ..tso };
        assert_eq!(
            for_each_plain(&f, &zero, 1518, &mut s, ok),
            Err(DropReason::Offload)
        );
        let big = NetHdr {
            gso_size: 4000,
            ..tso
        };
        assert_eq!(
            for_each_plain(&f, &big, 1518, &mut s, ok),
            Err(DropReason::Oversize)
        );
        let csum = NetHdr {
            flags: NetHdr::F_NEEDS_CSUM,
            csum_start: 5000,
            ..Default::default()
        };
        assert_eq!(
            for_each_plain(&f, &csum, 1518, &mut s, ok),
            Err(DropReason::Offload)
        );
        for n in 0..80 {
            let mut g = f[..n.min(f.len())].to_vec();
            g.resize(n, 0x45);
            let _ = for_each_plain(&g, &tso, 1518, &mut s, ok);
        }
    }
}
