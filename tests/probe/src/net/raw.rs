//! Raw frames, bypassing smoltcp: `burst` sends N frames, `count-rx`
//! counts what arrives.
//!
//! A burst frame: destination, source (the device's MAC), EtherType
//! 0x88b5 (IEEE local experimental), "vmpb", a 32-bit big-endian sequence
//! number, then the bulk pattern up to SIZE bytes.

use super::Mac;
use super::stack::Stack;
use super::time::{self, Deadline, Mbps};
use super::transport::kicks;
use crate::{hw, serial};

/// Ethertype of burst frames.
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
const MAGIC: &[u8; 4] = b"vmpb";
/// Smallest burst frame (Ethernet minimum without FCS).
pub const MIN_SIZE: u64 = 60;

/// `burst:MAC:N:SIZE`.
pub fn burst(stack: &mut Stack, to: [u8; 6], n: u64, size: u16) {
    let from = stack.dev.mac();
    let size = usize::from(size);
    let (_, kicks0) = kicks();
    let t0 = hw::rdtsc();
    let mut sent = 0;
    for seq in 0..n {
        let ok = stack.dev.send_with(size, |f| {
            f[0..6].copy_from_slice(&to);
            f[6..12].copy_from_slice(&from);
            f[12..14].copy_from_slice(&ETHERTYPE);
            f[14..18].copy_from_slice(MAGIC);
            f[18..22].copy_from_slice(&(seq as u32).to_be_bytes());
            super::crc::Pattern::default().fill(&mut f[22..]);
        });
        if !ok {
            break;
        }
        sent += 1;
        // Keep receive buffers flowing (frames arriving meanwhile are
        // dropped, not left in the ring).
        while stack.dev.recv_with(|_| ()).is_some() {}
    }
    stack.dev.flush_tx();
    let ns = time::ns(hw::rdtsc().wrapping_sub(t0));
    serial::line(format_args!(
        r#"{{"probe":"burst","to":"{}","size":{},"sent":{},"ns":{},"fps":{},"mbit_s":{},"tx_kicks":{}{}}}"#,
        Mac(to),
        size,
        sent,
        ns,
        time::per_sec(sent, ns),
        Mbps(sent * size as u64, ns),
        kicks().1 - kicks0,
        if sent < n {
            r#","error":"no transmit buffer came free in 1 s""#
        } else {
            ""
        },
    ));
}

/// `count-rx:SECONDS[:N]`: counts frames for SECONDS, or until N burst
/// frames came.
pub fn count_rx(stack: &mut Stack, secs: u64, until: Option<u64>) {
    let (kicks0, _) = kicks();
    let end = Deadline::after_ms(secs * 1000);
    let (mut frames, mut bytes, mut bursts, mut lost) = (0u64, 0u64, 0u64, 0u64);
    let (mut first, mut last) = (0u64, 0u64);
    let mut next_seq = 0u32;
    while !end.expired() && until.is_none_or(|u| bursts < u) {
        let Some((len, seq)) = stack.dev.recv_with(|f| {
            let seq = (f.len() >= 22 && f[12..14] == ETHERTYPE && &f[14..18] == MAGIC)
                .then(|| u32::from_be_bytes([f[18], f[19], f[20], f[21]]));
            (f.len(), seq)
        }) else {
            continue;
        };
        frames += 1;
        bytes += len as u64;
        if let Some(seq) = seq {
            let now = hw::rdtsc();
            if bursts == 0 {
                first = now;
            } else if seq > next_seq {
                // A backward step is a new burst starting over: no gap.
                lost += u64::from(seq - next_seq);
            }
            next_seq = seq.wrapping_add(1);
            last = now;
            bursts += 1;
        }
    }
    let ns = time::ns(last.wrapping_sub(first));
    serial::line(format_args!(
        r#"{{"probe":"rx","seconds":{},"frames":{},"bytes":{},"burst_frames":{},"burst_gaps":{},"burst_ns":{},"burst_fps":{},"rx_kicks":{}}}"#,
        secs,
        frames,
        bytes,
        bursts,
        lost,
        ns,
        time::per_sec(bursts.saturating_sub(1), ns),
        kicks().0 - kicks0,
    ));
}
