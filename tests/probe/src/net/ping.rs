//! `ping:IP:COUNT[:INTERVAL_MS]`: ICMP echo requests, one at a time, each
//! waiting up to 1 s for its reply, and each sent at least INTERVAL_MS
//! after the one before; RTT from the TSC.

use super::stack::Stack;
use super::time::{self, Deadline};
use crate::{clock, hw, serial};
use core::net::Ipv4Addr;
use smoltcp::iface::{SocketSet, SocketStorage};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::socket::icmp;
use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr, IpAddress};

const IDENT: u16 = 0x7072;
const PAYLOAD: usize = 56;
/// How long to wait for each reply.
const TIMEOUT_MS: u64 = 1000;
/// Replies whose RTT goes into the median.
const SAMPLES: usize = 512;

pub fn ping(stack: &mut Stack, to: Ipv4Addr, count: u32, interval_ms: u64) {
    let mut rx_meta = [icmp::PacketMetadata::EMPTY; 4];
    let mut rx_data = [0u8; 1024];
    let mut tx_meta = [icmp::PacketMetadata::EMPTY; 4];
    let mut tx_data = [0u8; 1024];
    let socket = icmp::Socket::new(
        icmp::PacketBuffer::new(&mut rx_meta[..], &mut rx_data[..]),
        icmp::PacketBuffer::new(&mut tx_meta[..], &mut tx_data[..]),
    );
    let mut storage = [SocketStorage::EMPTY; 1];
    let mut sockets = SocketSet::new(&mut storage[..]);
    let handle = sockets.add(socket);
    if sockets
        .get_mut::<icmp::Socket>(handle)
        .bind(icmp::Endpoint::Ident(IDENT))
        .is_err()
    {
        serial::line(format_args!(r#"{{"probe":"ping","error":"bind"}}"#));
        return;
    }
    let caps = ChecksumCapabilities::default();
    let (mut received, mut min, mut max, mut sum) = (0u32, u64::MAX, 0u64, 0u64);
    let mut first = None;
    // RTTs of the first SAMPLES replies, for the median.
    let mut samples = [0u32; SAMPLES];
    let mut nsamples = 0;
    let mut sent = 0u32;
    let start = hw::rdtsc();
    for seq in 0..count {
        if seq > 0 && interval_ms > 0 {
            // Until this request's turn; the interface keeps answering.
            let due = clock::ticks_ms(interval_ms.saturating_mul(u64::from(seq)));
            while hw::rdtsc().wrapping_sub(start) < due {
                stack.poll(&mut sockets);
            }
        }
        let socket = sockets.get_mut::<icmp::Socket>(handle);
        let payload = [0x5au8; PAYLOAD];
        let repr = Icmpv4Repr::EchoRequest {
            ident: IDENT,
            seq_no: seq as u16,
            data: &payload,
        };
        let Ok(buf) = socket.send(repr.buffer_len(), IpAddress::Ipv4(to)) else {
            break;
        };
        repr.emit(&mut Icmpv4Packet::new_unchecked(buf), &caps);
        let t0 = hw::rdtsc();
        sent += 1;
        let wait = Deadline::after_ms(TIMEOUT_MS);
        'wait: while !wait.expired() {
            stack.poll(&mut sockets);
            let socket = sockets.get_mut::<icmp::Socket>(handle);
            while let Ok((data, _from)) = socket.recv() {
                let t1 = hw::rdtsc();
                let Ok(packet) = Icmpv4Packet::new_checked(data) else {
                    continue;
                };
                if let Ok(Icmpv4Repr::EchoReply { ident, seq_no, .. }) =
                    Icmpv4Repr::parse(&packet, &caps)
                    && ident == IDENT
                    && seq_no == seq as u16
                {
                    let rtt = time::ns(t1.wrapping_sub(t0)) / 1000;
                    received += 1;
                    first.get_or_insert(rtt);
                    if nsamples < SAMPLES {
                        samples[nsamples] = rtt.min(u64::from(u32::MAX)) as u32;
                        nsamples += 1;
                    }
                    min = min.min(rtt);
                    max = max.max(rtt);
                    sum += rtt;
                    break 'wait;
                }
            }
        }
    }
    let ms = time::ns(hw::rdtsc().wrapping_sub(start)) / 1_000_000;
    if received == 0 {
        serial::line(format_args!(
            r#"{{"probe":"ping","to":"{}","sent":{},"received":0,"ms":{}}}"#,
            to, sent, ms
        ));
    } else {
        serial::line(format_args!(
            r#"{{"probe":"ping","to":"{}","sent":{},"received":{},"ms":{},"rtt_us_min":{},"rtt_us_avg":{},"rtt_us_max":{},"rtt_us_median":{},"rtt_us_first":{}}}"#,
            to,
            sent,
            received,
            ms,
            min,
            sum / u64::from(received),
            max,
            {
                let s = &mut samples[..nsamples];
                s.sort_unstable();
                s[nsamples / 2]
            },
            first.unwrap_or(0)
        ));
    }
}
