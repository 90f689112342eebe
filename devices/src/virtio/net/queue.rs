//! TX and RX processing: descriptor chains in guest memory to frames and
//! back, with every guest-supplied address and length checked. A bad chain
//! is returned to the guest unused and counted; it never stops the device.

use super::NET_HDR_LEN;
use crate::virtio::{GuestMemoryMmap, QueueError, drain_queue};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
use vnet::frame::NetHdr;
use vnet::{DropReason, Frame};

/// The largest frame a guest may send: a 64 KiB GSO packet plus headers.
pub const MAX_TX_FRAME: usize = 65_550;

/// A guest buffer: one descriptor's address and length.
pub type Segment = (GuestAddress, usize);

/// What went wrong with one chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("a descriptor points outside guest memory")]
    OutOfMemory,
    #[error("a TX descriptor is device-writable")]
    WrongDirection,
    #[error("the chain is shorter than a virtio-net header")]
    TooShort,
    #[error("the chain holds more than a frame can be")]
    TooLong,
}

/// Collects the chain's descriptors of one direction into `segs`,
/// checking each lies inside guest memory. Returns the total length.
fn collect<I>(
    mem: &GuestMemoryMmap,
    descs: I,
    writable: bool,
    segs: &mut Vec<Segment>,
) -> Result<usize, ChainError>
where
    I: Iterator<Item = virtio_queue::desc::split::Descriptor>,
{
    segs.clear();
    let mut total: usize = 0;
    for d in descs {
        if d.is_write_only() != writable {
            return Err(ChainError::WrongDirection);
        }
        let len = d.len() as usize;
        if len == 0 {
            continue;
        }
        if !GuestMemoryBackend::check_range(mem, d.addr(), len) {
            return Err(ChainError::OutOfMemory);
        }
        total = total.checked_add(len).ok_or(ChainError::TooLong)?;
        if total > MAX_TX_FRAME + NET_HDR_LEN {
            return Err(ChainError::TooLong);
        }
        segs.push((d.addr(), len));
    }
    Ok(total)
}

/// A frame that stays in the guest's TX buffers: `segs` after the
/// virtio-net header.
pub struct GuestFrame<'a> {
    mem: &'a GuestMemoryMmap,
    segs: &'a [Segment],
    /// Bytes of `segs` to skip (the header).
    skip: usize,
    len: usize,
    /// The guest's offload request, when offloads were negotiated.
    hdr: Option<NetHdr>,
}

impl<'a> GuestFrame<'a> {
    /// The frame behind the header in `segs` (`total` bytes). With
    /// `offloads`, the header's checksum and segmentation requests are
    /// passed on; without, the guest had no right to make them.
    pub fn new(
        mem: &'a GuestMemoryMmap,
        segs: &'a [Segment],
        total: usize,
        offloads: bool,
    ) -> Result<Self, ChainError> {
        let len = total.checked_sub(NET_HDR_LEN).ok_or(ChainError::TooShort)?;
        // Read the header through the same accessor, as a frame of its own.
        let mut frame = GuestFrame {
            mem,
            segs,
            skip: 0,
            len: NET_HDR_LEN,
            hdr: None,
        };
        if offloads {
            let mut raw = [0u8; NetHdr::LEN];
            if frame.read_at(0, &mut raw) == raw.len() {
                let hdr = NetHdr::from_bytes(&raw);
                frame.hdr = (!hdr.is_plain()).then_some(hdr);
            }
        }
        frame.skip = NET_HDR_LEN;
        frame.len = len;
        Ok(frame)
    }
}

impl Frame for GuestFrame<'_> {
    fn len(&self) -> usize {
        self.len
    }

    fn net_hdr(&self) -> Option<NetHdr> {
        self.hdr
    }

    fn read_at(&self, offset: usize, buf: &mut [u8]) -> usize {
        let mut pos = offset + self.skip; // position in the chain
        let mut done = 0;
        let mut seg_start = 0;
        for &(addr, len) in self.segs {
            let seg_end = seg_start + len;
            if done == buf.len() {
                break;
            }
            if pos < seg_end {
                let within = pos - seg_start;
                let n = (len - within).min(buf.len() - done);
                // Checked against guest memory when the chain was collected;
                // a failure here would mean the guest's memory map changed.
                if self
                    .mem
                    .read_slice(&mut buf[done..done + n], addr.unchecked_add(within as u64))
                    .is_err()
                {
                    return done;
                }
                done += n;
                pos += n;
            }
            seg_start = seg_end;
        }
        done.min(self.len.saturating_sub(offset))
    }
}

/// Outcome of one pass over the TX queue.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TxPass {
    pub frames: u64,
    pub bytes: u64,
    pub malformed: u64,
    /// Whether any chain went back to the guest (an interrupt may be due).
    pub used: bool,
    /// The pass stopped at its budget with chains left: come back.
    pub more: bool,
    /// The driver broke the queue: the device must fail.
    pub broken: Option<QueueError>,
}

/// Takes every available TX chain, hands each frame to `send`, and returns
/// the chains to the guest.
pub fn transmit(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    segs: &mut Vec<Segment>,
    offloads: bool,
    mut send: impl FnMut(&GuestFrame<'_>),
) -> TxPass {
    let mut pass = TxPass::default();
    let drained = drain_queue(mem, queue, |chain| {
        let head = chain.head_index();
        let result = collect(mem, chain, false, segs).and_then(|total| {
            let frame = GuestFrame::new(mem, segs, total, offloads)?;
            send(&frame);
            Ok(frame.len)
        });
        match result {
            Ok(len) => {
                pass.frames += 1;
                pass.bytes += len as u64;
            }
            Err(e) => {
                pass.malformed += 1;
                tracing::debug!("virtio-net: TX chain {head} dropped: {e}");
            }
        }
        0
    });
    match drained {
        Ok(drained) => {
            pass.used = drained.used;
            pass.more = drained.more;
        }
        Err(e) => pass.broken = Some(e),
    }
    pass
}

/// Writes bytes at an offset across a list of guest buffers.
struct SegWriter<'a> {
    mem: &'a GuestMemoryMmap,
    segs: &'a [Segment],
}

impl SegWriter<'_> {
    fn capacity(&self) -> usize {
        self.segs.iter().map(|s| s.1).sum()
    }

    fn write_at(&self, mut offset: usize, mut data: &[u8]) -> bool {
        for &(addr, len) in self.segs {
            if data.is_empty() {
                break;
            }
            if offset >= len {
                offset -= len;
                continue;
            }
            let n = (len - offset).min(data.len());
            if self
                .mem
                .write_slice(&data[..n], addr.unchecked_add(offset as u64))
                .is_err()
            {
                return false;
            }
            data = &data[n..];
            offset = 0;
        }
        data.is_empty()
    }
}

/// Copies `frame[from..from+n]` to the writer at `at`, through a small
/// bounce buffer when the frame is not one slice.
fn copy_frame(w: &SegWriter<'_>, at: usize, frame: &dyn Frame, from: usize, n: usize) -> bool {
    if let Some(bytes) = frame.as_contiguous() {
        return w.write_at(at, &bytes[from..from + n]);
    }
    let mut bounce = [0u8; 2048];
    let mut done = 0;
    while done < n {
        let chunk = (n - done).min(bounce.len());
        let got = frame.read_at(from + done, &mut bounce[..chunk]);
        if got == 0 || !w.write_at(at + done, &bounce[..got]) {
            return false;
        }
        done += got;
    }
    true
}

/// Writes `frame`, behind a virtio-net header, into the guest's RX
/// buffers: one chain, or several when MRG_RXBUF was negotiated. Chains
/// taken for a frame that cannot be delivered are put back.
pub fn receive(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    frame: &dyn Frame,
    mergeable: bool,
    offloads: bool,
    segs: &mut Vec<Segment>,
) -> Result<u16, DropReason> {
    let total = NET_HDR_LEN + frame.len();
    let mut written = 0usize; // bytes of header+frame placed so far
    let mut heads: [(u16, u32); 32] = [(0, 0); 32];
    let mut used = 0usize;
    let mut header_segs: [Segment; 4] = [(GuestAddress(0), 0); 4];
    let mut n_header_segs = 0;
    let give_back = |queue: &mut Queue, used: usize| {
        for _ in 0..used {
            queue.go_to_previous_position();
        }
    };
    while written < total {
        if used == heads.len() || (!mergeable && used == 1) {
            give_back(queue, used);
            return Err(DropReason::Oversize);
        }
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            give_back(queue, used);
            return Err(DropReason::QueueFull);
        };
        let head = chain.head_index();
        used += 1;
        if collect_writable(mem, chain, segs).is_err() {
            // A malformed RX chain goes back empty. Before any part of the
            // frame is placed, the next chain is tried; after, the chains
            // taken so far go back empty too and the frame is dropped.
            let _ = queue.add_used(mem, head, 0);
            used -= 1;
            if used == 0 {
                continue;
            }
            for &(h, _) in &heads[..used] {
                let _ = queue.add_used(mem, h, 0);
            }
            return Err(DropReason::Malformed);
        }
        let w = SegWriter { mem, segs };
        let room = w.capacity();
        if used == 1 {
            // Keep where the header goes, to fill in num_buffers at the end.
            let mut left = NET_HDR_LEN;
            for &(a, l) in segs.iter() {
                if left == 0 || n_header_segs == header_segs.len() {
                    break;
                }
                let take = l.min(left);
                header_segs[n_header_segs] = (a, take);
                n_header_segs += 1;
                left -= take;
            }
            if left > 0 {
                give_back(queue, used);
                return Err(DropReason::Oversize);
            }
        }
        let start = if used == 1 { NET_HDR_LEN } else { 0 };
        let frame_from = written.saturating_sub(NET_HDR_LEN);
        let n = (room - start.min(room)).min(total - written.max(NET_HDR_LEN));
        if !copy_frame(&w, start, frame, frame_from, n) {
            give_back(queue, used);
            return Err(DropReason::TxError);
        }
        written = written.max(NET_HDR_LEN) + n;
        heads[used - 1] = (head, (start + n) as u32);
        if room <= start && !mergeable {
            give_back(queue, used);
            return Err(DropReason::Oversize);
        }
    }
    let mut header = [0u8; NET_HDR_LEN];
    if offloads && let Some(hdr) = frame.net_hdr() {
        header[..NetHdr::LEN].copy_from_slice(&hdr.to_bytes());
    }
    header[10..12].copy_from_slice(&(used as u16).to_le_bytes());
    let hw = SegWriter {
        mem,
        segs: &header_segs[..n_header_segs],
    };
    if !hw.write_at(0, &header) {
        give_back(queue, used);
        return Err(DropReason::TxError);
    }
    for &(head, len) in &heads[..used] {
        if queue.add_used(mem, head, len).is_err() {
            return Err(DropReason::TxError);
        }
    }
    Ok(used as u16)
}

fn collect_writable(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    segs: &mut Vec<Segment>,
) -> Result<usize, ChainError> {
    collect(mem, chain, true, segs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::add_chain;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;
    use vnet::frame::Bytes as FrameBytes;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
    }

    fn used_len(q: &MockSplitQueue<'_, GuestMemoryMmap>, i: usize) -> u32 {
        q.used().ring().ref_at(i).unwrap().load().len()
    }

    #[test]
    fn tx_reads_the_frame_behind_the_header_across_descriptors() {
        let m = mem();
        let mq = MockSplitQueue::new(&m, 16);
        let mut q: Queue = mq.create_queue().unwrap();
        m.write_slice(&[0u8; 12], GuestAddress(0x10000)).unwrap();
        let frame: Vec<u8> = (0..100u8).collect();
        m.write_slice(&frame[..40], GuestAddress(0x20000)).unwrap();
        m.write_slice(&frame[40..], GuestAddress(0x30000)).unwrap();
        add_chain(
            &mq,
            0,
            &[
                (0x10000, 12, false),
                (0x20000, 40, false),
                (0x30000, 60, false),
            ],
        );
        let mut got = Vec::new();
        let pass = transmit(&m, &mut q, &mut Vec::new(), false, |f| {
            let mut buf = vec![0u8; f.len()];
            assert_eq!(f.read_at(0, &mut buf), 100);
            let mut tail = [0u8; 8];
            assert_eq!(f.read_at(95, &mut tail), 5);
            got = buf;
        });
        assert_eq!(got, frame);
        assert_eq!(
            pass,
            TxPass {
                frames: 1,
                bytes: 100,
                malformed: 0,
                used: true,
                more: false,
                broken: None,
            }
        );
        assert_eq!(mq.used().idx().load(), 1);
    }

    #[test]
    fn malformed_tx_chains_are_returned_and_counted() {
        let m = mem();
        let mq = MockSplitQueue::new(&m, 16);
        let mut q: Queue = mq.create_queue().unwrap();
        add_chain(&mq, 0, &[(0xff_f000, 0x10_0000, false)]); // runs past the end of memory
        add_chain(&mq, 2, &[(0x10000, 12, false), (0x20000, 64, true)]); // writable in TX
        add_chain(&mq, 4, &[(0x10000, 8, false)]); // shorter than the header
        add_chain(&mq, 6, &[(0x10000, 70_000, false)]); // longer than any frame
        let mut sent = 0;
        let pass = transmit(&m, &mut q, &mut Vec::new(), false, |_| sent += 1);
        assert_eq!(sent, 0);
        assert_eq!(pass.malformed, 4);
        assert_eq!(
            mq.used().idx().load(),
            4,
            "every chain goes back to the guest"
        );
    }

    #[test]
    fn rx_writes_header_and_frame_into_one_chain() {
        let m = mem();
        let mq = MockSplitQueue::new(&m, 16);
        let mut q: Queue = mq.create_queue().unwrap();
        add_chain(&mq, 0, &[(0x40000, 2048, true)]);
        let frame: Vec<u8> = (0..200).map(|i| i as u8).collect();
        let n = receive(
            &m,
            &mut q,
            &FrameBytes(&frame),
            false,
            false,
            &mut Vec::new(),
        )
        .unwrap();
        assert_eq!(n, 1);
        assert_eq!(used_len(&mq, 0), 212);
        let mut back = vec![0u8; 212];
        m.read_slice(&mut back, GuestAddress(0x40000)).unwrap();
        assert_eq!(&back[12..], &frame[..]);
        assert_eq!(u16::from_le_bytes([back[10], back[11]]), 1, "num_buffers");
    }

    #[test]
    fn rx_spreads_a_frame_over_merged_buffers() {
        let m = mem();
        let mq = MockSplitQueue::new(&m, 16);
        let mut q: Queue = mq.create_queue().unwrap();
        add_chain(&mq, 0, &[(0x40000, 100, true)]);
        add_chain(&mq, 1, &[(0x50000, 100, true)]);
        add_chain(&mq, 2, &[(0x60000, 100, true)]);
        let frame: Vec<u8> = (0..250).map(|i| i as u8).collect();
        assert_eq!(
            receive(
                &m,
                &mut q,
                &FrameBytes(&frame),
                true,
                false,
                &mut Vec::new()
            )
            .unwrap(),
            3
        );
        assert_eq!(
            (used_len(&mq, 0), used_len(&mq, 1), used_len(&mq, 2)),
            (100, 100, 62)
        );
        let mut back = vec![0u8; 300];
        m.read_slice(&mut back[..100], GuestAddress(0x40000))
            .unwrap();
        m.read_slice(&mut back[100..200], GuestAddress(0x50000))
            .unwrap();
        m.read_slice(&mut back[200..], GuestAddress(0x60000))
            .unwrap();
        assert_eq!(u16::from_le_bytes([back[10], back[11]]), 3);
        assert_eq!(&back[12..262], &frame[..]);
    }

    #[test]
    fn rx_without_room_drops_and_keeps_the_buffers() {
        let m = mem();
        let mq = MockSplitQueue::new(&m, 16);
        let mut q: Queue = mq.create_queue().unwrap();
        let frame = [0u8; 300];
        assert_eq!(
            receive(
                &m,
                &mut q,
                &FrameBytes(&frame[..]),
                true,
                false,
                &mut Vec::new()
            ),
            Err(DropReason::QueueFull)
        );
        add_chain(&mq, 0, &[(0x40000, 100, true)]);
        // Too small and not mergeable: dropped, and the buffer stays for the next frame.
        assert_eq!(
            receive(
                &m,
                &mut q,
                &FrameBytes(&frame[..]),
                false,
                false,
                &mut Vec::new()
            ),
            Err(DropReason::Oversize)
        );
        assert_eq!(mq.used().idx().load(), 0);
        assert_eq!(
            receive(
                &m,
                &mut q,
                &FrameBytes(&frame[..50]),
                false,
                false,
                &mut Vec::new()
            ),
            Ok(1)
        );
        // Mergeable but the guest has too few buffers: nothing is consumed.
        add_chain(&mq, 1, &[(0x50000, 100, true)]);
        assert_eq!(
            receive(
                &m,
                &mut q,
                &FrameBytes(&frame[..]),
                true,
                false,
                &mut Vec::new()
            ),
            Err(DropReason::QueueFull)
        );
        assert_eq!(mq.used().idx().load(), 1);
    }

    #[test]
    fn rx_chain_outside_memory_is_skipped() {
        let m = mem();
        let mq = MockSplitQueue::new(&m, 16);
        let mut q: Queue = mq.create_queue().unwrap();
        add_chain(&mq, 0, &[(0x2000_0000, 2048, true)]);
        add_chain(&mq, 1, &[(0x40000, 2048, true)]);
        let frame = [7u8; 60];
        assert_eq!(
            receive(
                &m,
                &mut q,
                &FrameBytes(&frame[..]),
                false,
                false,
                &mut Vec::new()
            ),
            Ok(1)
        );
        assert_eq!(used_len(&mq, 0), 0);
        assert_eq!(used_len(&mq, 1), 72);
    }

    #[test]
    fn offload_headers_pass_through_only_when_negotiated() {
        let m = mem();
        let mq = MockSplitQueue::new(&m, 16);
        let mut q: Queue = mq.create_queue().unwrap();
        // A TSO request: needs checksum, TCPv4, 1448-byte segments.
        let hdr = NetHdr {
            flags: NetHdr::F_NEEDS_CSUM,
            gso_type: NetHdr::GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        };
        let mut chain = hdr.to_bytes().to_vec();
        chain.extend([0u8; 2]);
        chain.extend([0xabu8; 3000]);
        m.write_slice(&chain, GuestAddress(0x10000)).unwrap();
        add_chain(&mq, 0, &[(0x10000, chain.len() as u32, false)]);
        add_chain(&mq, 1, &[(0x10000, chain.len() as u32, false)]);
        let mut seen = Vec::new();
        transmit(&m, &mut q, &mut Vec::new(), true, |f| {
            seen.push(f.net_hdr())
        });
        assert_eq!(seen, vec![Some(hdr), Some(hdr)]);
        // Without the CSUM feature the same bytes carry no request.
        let mq = MockSplitQueue::new(&m, 16);
        let mut q: Queue = mq.create_queue().unwrap();
        add_chain(&mq, 0, &[(0x10000, chain.len() as u32, false)]);
        let mut seen = Vec::new();
        transmit(&m, &mut q, &mut Vec::new(), false, |f| {
            seen.push(f.net_hdr())
        });
        assert_eq!(seen, vec![None]);
    }
}
