//! Frames for the guest that arrived while its RX ring had no free
//! buffers, kept in order until it posts more: the in-process switch's
//! counterpart of a TAP device's transmit queue. Bounded in frames and
//! bytes; buffers are reused, so a warm backlog does not allocate.

use std::collections::VecDeque;
use vnet::Frame;
use vnet::frame::NetHdr;

/// Most frames held for one NIC (a TAP's default txqueuelen is 1000).
pub const MAX_FRAMES: usize = 1024;
/// Most bytes held for one NIC (TSO super-frames are up to 64 KiB).
pub const MAX_BYTES: usize = 4 << 20;

/// One held frame, with its offload header.
#[derive(Debug, Default)]
pub struct Held {
    data: Vec<u8>,
    hdr: Option<NetHdr>,
}

impl Frame for Held {
    fn len(&self) -> usize {
        self.data.len()
    }
    fn read_at(&self, offset: usize, buf: &mut [u8]) -> usize {
        self.data.as_slice().read_at(offset, buf)
    }
    fn as_contiguous(&self) -> Option<&[u8]> {
        Some(&self.data)
    }
    fn net_hdr(&self) -> Option<NetHdr> {
        self.hdr
    }
}

#[derive(Debug, Default)]
pub struct Backlog {
    frames: VecDeque<Held>,
    bytes: usize,
    /// Buffers of delivered frames, for the next ones.
    spare: Vec<Vec<u8>>,
}

impl Backlog {
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Copies `frame` to the back; false (and nothing kept) when the
    /// backlog is full or the frame cannot be read whole.
    pub fn push(&mut self, frame: &dyn Frame) -> bool {
        let n = frame.len();
        if self.frames.len() >= MAX_FRAMES || self.bytes + n > MAX_BYTES {
            return false;
        }
        let mut data = self.spare.pop().unwrap_or_default();
        data.clear();
        match frame.as_contiguous() {
            Some(bytes) => data.extend_from_slice(bytes),
            None => {
                data.resize(n, 0);
                if frame.read_at(0, &mut data) != n {
                    self.spare.push(data);
                    return false;
                }
            }
        }
        self.bytes += n;
        self.frames.push_back(Held {
            data,
            hdr: frame.net_hdr(),
        });
        true
    }

    /// The oldest frame.
    pub fn front(&self) -> Option<&Held> {
        self.frames.front()
    }

    /// Drops the oldest frame (delivered, or refused for good), keeping
    /// its buffer.
    pub fn pop(&mut self) {
        if let Some(h) = self.frames.pop_front() {
            self.bytes -= h.data.len();
            if self.spare.len() < 64 {
                self.spare.push(h.data);
            }
        }
    }

    /// Drops every frame; returns how many there were.
    pub fn clear(&mut self) -> usize {
        let n = self.frames.len();
        while !self.frames.is_empty() {
            self.pop();
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vnet::frame::HdrFrame;

    #[test]
    fn keeps_frames_and_headers_in_order() {
        let mut b = Backlog::default();
        assert!(b.push(&vnet::frame::Bytes(b"first")));
        let hdr = NetHdr {
            flags: NetHdr::F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 16,
            ..Default::default()
        };
        assert!(b.push(&HdrFrame {
            hdr,
            data: b"second",
        }));
        assert_eq!(b.len(), 2);
        let f = b.front().unwrap();
        assert_eq!(
            (f.as_contiguous().unwrap(), f.net_hdr()),
            (&b"first"[..], None)
        );
        b.pop();
        let f = b.front().unwrap();
        assert_eq!(f.as_contiguous().unwrap(), b"second");
        assert_eq!(f.net_hdr(), Some(hdr));
        b.pop();
        assert!(b.is_empty());
        assert_eq!(b.bytes, 0);
    }

    #[test]
    fn is_bounded_in_frames_and_bytes() {
        let mut b = Backlog::default();
        for _ in 0..MAX_FRAMES {
            assert!(b.push(&vnet::frame::Bytes(&[0u8; 60])));
        }
        assert!(!b.push(&vnet::frame::Bytes(&[0u8; 60])));
        assert_eq!(b.clear(), MAX_FRAMES);
        let big = vec![0u8; 65536];
        for _ in 0..MAX_BYTES / big.len() {
            assert!(b.push(&vnet::frame::Bytes(&big)));
        }
        assert!(!b.push(&vnet::frame::Bytes(&big)));
        assert!(b.push(&vnet::frame::Bytes(&[])));
    }

    #[test]
    fn reuses_the_buffers_of_delivered_frames() {
        let mut b = Backlog::default();
        assert!(b.push(&vnet::frame::Bytes(&[1u8; 1500])));
        let ptr = b.front().unwrap().data.as_ptr();
        b.pop();
        assert!(b.push(&vnet::frame::Bytes(&[2u8; 100])));
        assert_eq!(b.front().unwrap().data.as_ptr(), ptr);
        assert_eq!(b.front().unwrap().as_contiguous().unwrap(), &[2u8; 100][..]);
    }
}
