//! Request processing: each chain carries one FUSE request in its
//! device-readable part and room for the reply in its device-writable
//! part. Malformed chains go back to the guest (with an EIO reply when
//! the request's id can be read) and never stop the device.

use super::{FuseServer, MAX_REQUEST};
use crate::virtio::{Drained, GuestMemoryMmap, QueueError, Served, drain_queue_deferred};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// `fuse_out_header`: len, error, unique.
const OUT_HEADER: usize = 16;
/// Offset of `unique` in `fuse_in_header`.
const UNIQUE_AT: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("a descriptor points outside guest memory")]
    OutOfMemory,
    #[error("a readable descriptor follows a writable one")]
    Order,
    #[error("the request is larger than the {0} bytes this queue takes")]
    TooLarge(usize),
    #[error("the reply does not fit in the guest's buffers")]
    ReplyTooLarge,
}

/// Counts of one pass over a queue.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    pub requests: u64,
    pub malformed: u64,
    pub used: bool,
}

/// A chain's request and reply buffers, as gathered.
#[derive(Default)]
struct Scratch {
    request: Vec<u8>,
    writable: Vec<(GuestAddress, usize)>,
}

fn gather(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    max_request: usize,
    s: &mut Scratch,
) -> Result<(), RequestError> {
    s.request.clear();
    s.writable.clear();
    for d in chain {
        let len = d.len() as usize;
        if !GuestMemoryBackend::check_range(mem, d.addr(), len) {
            return Err(RequestError::OutOfMemory);
        }
        if d.is_write_only() {
            s.writable.push((d.addr(), len));
        } else {
            if !s.writable.is_empty() {
                return Err(RequestError::Order);
            }
            if s.request.len() + len > max_request {
                return Err(RequestError::TooLarge(max_request));
            }
            let at = s.request.len();
            s.request.resize(at + len, 0);
            mem.read_slice(&mut s.request[at..], d.addr())
                .map_err(|_| RequestError::OutOfMemory)?;
        }
    }
    Ok(())
}

fn write_reply(
    mem: &GuestMemoryMmap,
    writable: &[(GuestAddress, usize)],
    reply: &[u8],
) -> Result<(), RequestError> {
    let room: usize = writable.iter().map(|w| w.1).sum();
    if reply.len() > room {
        return Err(RequestError::ReplyTooLarge);
    }
    let mut rest = reply;
    for &(addr, len) in writable {
        if rest.is_empty() {
            break;
        }
        let n = len.min(rest.len());
        mem.write_slice(&rest[..n], addr)
            .map_err(|_| RequestError::OutOfMemory)?;
        rest = &rest[n..];
    }
    Ok(())
}

/// An EIO reply to the request with id `unique`.
fn eio_reply(unique: u64) -> [u8; OUT_HEADER] {
    let mut r = [0u8; OUT_HEADER];
    r[..4].copy_from_slice(&(OUT_HEADER as u32).to_le_bytes());
    r[4..8].copy_from_slice(&(-libc::EIO).to_le_bytes());
    r[8..].copy_from_slice(&unique.to_le_bytes());
    r
}

/// Bytes of requests one queue may hold (taken, not yet answered): past
/// this the device takes no more chains off that queue until answers free
/// room (the guest waits, as for a slow disk). 32 MiB is 32 full-size
/// writes in flight, more than a guest needs to keep a server busy, and
/// bounds what a guest can make the host hold at once.
pub const MAX_HELD_BYTES: usize = 32 << 20;

/// The chains of one queue that the device holds: taken off the queue and
/// not yet answered, with their requests' sizes. The driver may not make
/// a chain available again before the device gives it back, so the device
/// holds at most one request per queue entry, and at most about
/// [`MAX_HELD_BYTES`] in all.
#[derive(Debug, Default)]
pub struct InFlight {
    /// The request size of each held chain, by head.
    held: Vec<Option<usize>>,
    bytes: usize,
}

impl InFlight {
    /// Marks `head` as held with a request of `bytes`; false if it
    /// already was.
    fn hold(&mut self, head: u16, bytes: usize) -> bool {
        let i = usize::from(head);
        if self.held.len() <= i {
            self.held.resize(i + 1, None);
        }
        if self.held[i].is_some() {
            return false;
        }
        self.held[i] = Some(bytes);
        self.bytes += bytes;
        true
    }

    fn release(&mut self, head: u16) {
        if let Some(bytes) = self.held.get_mut(usize::from(head)).and_then(Option::take) {
            self.bytes -= bytes;
        }
    }

    /// How many chains are held.
    pub fn len(&self) -> usize {
        self.held.iter().filter(|h| h.is_some()).count()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes == 0 && self.len() == 0
    }

    /// Bytes of the requests held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether the queue may not take more until answers free room.
    pub fn full(&self) -> bool {
        self.bytes >= MAX_HELD_BYTES
    }
}

/// One well-formed request taken off a queue: the request's bytes and
/// where its reply goes. It stays the device's until [`complete`].
#[derive(Debug)]
pub struct Job {
    head: u16,
    pub request: Vec<u8>,
    writable: Vec<(GuestAddress, usize)>,
}

/// Takes every available request off `queue`. Each well-formed one goes
/// to `dispatch` as a [`Job`], to be answered later, in any order, with
/// [`complete`]; a malformed one goes back to the guest at once, with an
/// EIO reply when its id can be read. A request longer than
/// `max_request` is malformed. Notifications stay off while the queue is
/// drained; the pass stops once `in_flight` is [full](InFlight::full)
/// (then [`Drained::more`]). Returns what the pass did, or why the queue
/// is broken (a chain the device still holds made available again, say);
/// the requests taken before still go to `dispatch`.
pub fn take(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    in_flight: &mut InFlight,
    max_request: usize,
    pass: &mut Pass,
    mut dispatch: impl FnMut(Job),
) -> Result<Drained, QueueError> {
    if in_flight.full() {
        return Ok(Drained {
            used: false,
            more: true,
        });
    }
    let mut s = Scratch::default();
    let mut jobs = Vec::new();
    let drained = drain_queue_deferred(mem, queue, |chain| {
        let head = chain.head_index();
        if in_flight
            .held
            .get(usize::from(head))
            .is_some_and(Option::is_some)
        {
            return Err(QueueError::HeadInFlight(head));
        }
        Ok(match gather(mem, chain, max_request, &mut s) {
            Ok(()) => {
                pass.requests += 1;
                in_flight.hold(head, s.request.len());
                jobs.push(Job {
                    head,
                    request: std::mem::take(&mut s.request),
                    writable: std::mem::take(&mut s.writable),
                });
                Served::Kept {
                    full: in_flight.full(),
                }
            }
            Err(e) => {
                pass.malformed += 1;
                tracing::debug!("virtio-fs: request {head} dropped: {e}");
                let eio = eio_reply(unique_of(&s.request));
                let len = if s.request.len() >= UNIQUE_AT + 8
                    && write_reply(mem, &s.writable, &eio).is_ok()
                {
                    eio.len()
                } else {
                    0
                };
                Served::Done(len as u32)
            }
        })
    });
    jobs.into_iter().for_each(&mut dispatch);
    drained
}

/// Writes `reply` (`None`: the request gets none, as FORGET) into the
/// job's buffers and gives its chain back to the guest; a reply larger
/// than the guest's buffers becomes EIO. Returns whether the chain went
/// back.
pub fn complete(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    in_flight: &mut InFlight,
    job: Job,
    reply: Option<&[u8]>,
) -> bool {
    in_flight.release(job.head);
    let len = match reply {
        None => 0,
        Some(reply) => match write_reply(mem, &job.writable, reply) {
            Ok(()) => reply.len(),
            Err(e) => {
                // The guest offered less room than its request needs.
                tracing::debug!("virtio-fs: request {}: {e}", job.head);
                let eio = eio_reply(unique_of(&job.request));
                if write_reply(mem, &job.writable, &eio).is_ok() {
                    eio.len()
                } else {
                    0
                }
            }
        },
    };
    if queue.add_used(mem, job.head, len as u32).is_err() {
        tracing::warn!("virtio-fs: used ring is not writable");
        return false;
    }
    true
}

/// Serves every available request on `queue`, one after the other.
pub fn process(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    server: &dyn FuseServer,
) -> Result<Pass, QueueError> {
    let mut pass = Pass::default();
    let mut jobs = Vec::new();
    let mut in_flight = InFlight::default();
    pass.used = take(mem, queue, &mut in_flight, MAX_REQUEST, &mut pass, |job| {
        jobs.push(job)
    })?
    .used;
    for job in jobs {
        let reply = server.handle(&job.request);
        pass.used |= complete(mem, queue, &mut in_flight, job, reply.as_deref());
    }
    Ok(pass)
}

fn unique_of(request: &[u8]) -> u64 {
    request
        .get(UNIQUE_AT..UNIQUE_AT + 8)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::add_chain;
    use std::sync::Mutex;
    use virtio_queue::mock::MockSplitQueue;

    /// Echoes the request's id and length back as the reply, or answers
    /// nothing for opcode 2 (FORGET).
    #[derive(Default)]
    struct Echo {
        seen: Mutex<Vec<Vec<u8>>>,
    }

    impl FuseServer for Echo {
        fn handle(&self, request: &[u8]) -> Option<Vec<u8>> {
            self.seen.lock().unwrap().push(request.to_vec());
            let opcode = u32::from_le_bytes(request[4..8].try_into().unwrap());
            if opcode == 2 {
                return None;
            }
            let mut r = vec![0u8; OUT_HEADER + 4];
            r[..4].copy_from_slice(&((OUT_HEADER + 4) as u32).to_le_bytes());
            r[8..16].copy_from_slice(&request[8..16]);
            r[16..20].copy_from_slice(&(request.len() as u32).to_le_bytes());
            Some(r)
        }
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
    }

    fn request(opcode: u32, unique: u64, body: &[u8]) -> Vec<u8> {
        let mut r = vec![0u8; 40];
        r[..4].copy_from_slice(&((40 + body.len()) as u32).to_le_bytes());
        r[4..8].copy_from_slice(&opcode.to_le_bytes());
        r[8..16].copy_from_slice(&unique.to_le_bytes());
        r.extend_from_slice(body);
        r
    }

    fn used(q: &MockSplitQueue<'_, GuestMemoryMmap>, i: usize) -> u32 {
        q.used().ring().ref_at(i).unwrap().load().len()
    }

    #[test]
    fn a_request_across_descriptors_gets_its_reply() {
        let m = mem();
        let mq = MockSplitQueue::new(&m, 16);
        let mut q: Queue = mq.create_queue().unwrap();
        let req = request(1, 77, b"hello\0");
        m.write_slice(&req[..20], GuestAddress(0x10000)).unwrap();
        m.write_slice(&req[20..], GuestAddress(0x20000)).unwrap();
        add_chain(
            &mq,
            0,
            &[
                (0x10000, 20, false),
                (0x20000, (req.len() - 20) as u32, false),
                (0x30000, 64, true),
            ],
        );
        let server = Echo::default();
        let pass = process(&m, &mut q, &server).unwrap();
        assert_eq!(
            pass,
            Pass {
                requests: 1,
                malformed: 0,
                used: true
            }
        );
        assert_eq!(server.seen.lock().unwrap()[0], req);
        assert_eq!(used(&mq, 0), 20);
        let mut reply = [0u8; 20];
        m.read_slice(&mut reply, GuestAddress(0x30000)).unwrap();
        assert_eq!(u64::from_le_bytes(reply[8..16].try_into().unwrap()), 77);
        assert_eq!(
            u32::from_le_bytes(reply[16..20].try_into().unwrap()),
            req.len() as u32
        );
    }

    #[test]
    fn forget_gets_no_reply() {
        let m = mem();
        let mq = MockSplitQueue::new(&m, 16);
        let mut q: Queue = mq.create_queue().unwrap();
        let req = request(2, 5, &[0u8; 8]);
        m.write_slice(&req, GuestAddress(0x10000)).unwrap();
        add_chain(&mq, 0, &[(0x10000, req.len() as u32, false)]);
        let pass = process(&m, &mut q, &Echo::default()).unwrap();
        assert_eq!(pass.requests, 1);
        assert_eq!(used(&mq, 0), 0);
    }

    #[test]
    fn reply_without_room_becomes_eio() {
        let m = mem();
        let mq = MockSplitQueue::new(&m, 16);
        let mut q: Queue = mq.create_queue().unwrap();
        let req = request(1, 9, b"x\0");
        m.write_slice(&req, GuestAddress(0x10000)).unwrap();
        add_chain(
            &mq,
            0,
            &[(0x10000, req.len() as u32, false), (0x30000, 16, true)],
        );
        process(&m, &mut q, &Echo::default()).unwrap();
        assert_eq!(used(&mq, 0), 16);
        let mut reply = [0u8; 16];
        m.read_slice(&mut reply, GuestAddress(0x30000)).unwrap();
        assert_eq!(
            i32::from_le_bytes(reply[4..8].try_into().unwrap()),
            -libc::EIO
        );
        assert_eq!(u64::from_le_bytes(reply[8..16].try_into().unwrap()), 9);
    }

    #[test]
    fn malformed_chains_are_returned_and_counted() {
        let m = mem();
        let mq = MockSplitQueue::new(&m, 16);
        let mut q: Queue = mq.create_queue().unwrap();
        let req = request(1, 3, b"y\0");
        m.write_slice(&req, GuestAddress(0x10000)).unwrap();
        // Outside guest memory.
        add_chain(&mq, 0, &[(0xff_0000, 0x20_0000, false)]);
        // Readable after writable.
        add_chain(
            &mq,
            1,
            &[(0x30000, 64, true), (0x10000, req.len() as u32, false)],
        );
        // Larger than any request may be.
        add_chain(
            &mq,
            3,
            &[
                (0x10000, (MAX_REQUEST + 1) as u32, false),
                (0x30000, 64, true),
            ],
        );
        let server = Echo::default();
        let pass = process(&m, &mut q, &server).unwrap();
        assert_eq!(pass.malformed, 3);
        assert!(server.seen.lock().unwrap().is_empty());
        assert_eq!(
            mq.used().idx().load(),
            3,
            "every chain goes back to the guest"
        );
    }
}
