//! Request processing (virtio 1.2, 5.2.6): each chain holds a 16-byte
//! header (type, reserved, sector) and, for writes, discards and
//! write-zeroes, the data in its device-readable part; then, in its
//! device-writable part, room for the data of a read or a GET_ID, and the
//! status byte last. Every descriptor is checked against guest memory
//! before the backend is called; guest memory is read and written only
//! through vm-memory's checked accessors.
//!
//! A chain that breaks the rules is answered with an error status when
//! it has a writable byte for one, and counted; it never stops the
//! device. Chains are taken off the queue ([`take`]) as [`Job`]s, run
//! ([`run`]) on whichever thread, and given back ([`complete`]) in the
//! order they finish; [`process`] does all three in order, on one thread.

use super::backend::BlockBackend;
use super::metrics::BlkCounters;
use super::{
    ID_LEN, MAX_ZEROES_SECTORS, MAX_ZEROES_SEG, SECTOR_SIZE, SEG_MAX, request as req, status,
};
use crate::throttle::Throttle;
use crate::virtio::{Drained, GuestMemoryMmap, QueueError, Served, drain_queue_deferred};
use std::sync::atomic::Ordering::Relaxed;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

/// Length of `virtio_blk_req`'s header.
const HEADER: usize = 16;
/// Length of a DISCARD or WRITE_ZEROES segment.
const ZEROES_SEGMENT: usize = 16;
/// WRITE_ZEROES flag: the range may be deallocated.
const FLAG_UNMAP: u32 = 1;
/// The most bytes moved between guest memory and the backend at once.
pub const CHUNK: usize = 1 << 20;

/// Why a request failed; each is answered with a status and counted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("a descriptor points outside guest memory")]
    OutOfMemory,
    #[error("a device-readable descriptor follows a device-writable one")]
    Order,
    #[error("the chain has no device-writable byte for the status")]
    NoStatus,
    #[error("the request header is shorter than {HEADER} bytes")]
    ShortHeader,
    #[error("the chain has {0} data segments, more than seg_max ({SEG_MAX})")]
    TooManySegments(usize),
    #[error("the data length {0} is not a whole number of sectors")]
    DataLength(u64),
    #[error("sectors {sector}..+{sectors} are past the disk's end ({capacity} sectors)")]
    PastEnd {
        sector: u64,
        sectors: u64,
        capacity: u64,
    },
    #[error("the disk is read-only")]
    ReadOnly,
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("a discard or write-zeroes request has {0} bytes of segments")]
    Segments(usize),
    #[error("a discard or write-zeroes segment has flags {0:#x}")]
    SegmentFlags(u32),
    #[error("the disk failed: {0}")]
    Backend(String),
}

impl RequestError {
    /// The status byte the guest gets.
    fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) | RequestError::SegmentFlags(_) => status::UNSUPP,
            _ => status::IOERR,
        }
    }

    /// Counts it.
    fn count(&self, c: &BlkCounters) {
        let counter = match self {
            RequestError::PastEnd { .. } => &c.out_of_range,
            RequestError::ReadOnly => &c.read_only_writes,
            RequestError::Unsupported(_) | RequestError::SegmentFlags(_) => &c.unsupported,
            RequestError::Backend(_) => &c.io_errors,
            _ => &c.malformed,
        };
        counter.fetch_add(1, Relaxed);
    }
}

/// One side (device-readable or device-writable) of a chain: its
/// descriptors, checked to lie in guest memory, as one byte stream.
#[derive(Debug, Default)]
struct Side {
    segs: Vec<(GuestAddress, usize)>,
    len: u64,
}

impl Side {
    fn push(&mut self, addr: GuestAddress, len: usize) {
        if len > 0 {
            self.segs.push((addr, len));
            self.len += len as u64;
        }
    }

    /// Calls `f(guest address, range of buf)` for each piece of the
    /// stream's bytes `at..at + len`.
    fn walk(
        &self,
        mut at: u64,
        len: usize,
        mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), RequestError>,
    ) -> Result<(), RequestError> {
        let mut done = 0usize;
        for &(addr, seg_len) in &self.segs {
            if done == len {
                break;
            }
            let seg_len = seg_len as u64;
            if at >= seg_len {
                at -= seg_len;
                continue;
            }
            let n = ((seg_len - at) as usize).min(len - done);
            f(addr.unchecked_add(at), done..done + n)?;
            done += n;
            at = 0;
        }
        if done == len {
            Ok(())
        } else {
            Err(RequestError::OutOfMemory)
        }
    }

    fn read(&self, mem: &GuestMemoryMmap, at: u64, buf: &mut [u8]) -> Result<(), RequestError> {
        self.walk(at, buf.len(), |addr, r| {
            mem.read_slice(&mut buf[r], addr)
                .map_err(|_| RequestError::OutOfMemory)
        })
    }

    fn write(&self, mem: &GuestMemoryMmap, at: u64, buf: &[u8]) -> Result<(), RequestError> {
        self.walk(at, buf.len(), |addr, r| {
            mem.write_slice(&buf[r], addr)
                .map_err(|_| RequestError::OutOfMemory)
        })
    }
}

/// A buffer for data between guest memory and the disk, reused from
/// request to request by whoever runs them.
#[derive(Debug, Default)]
pub struct Scratch {
    data: Vec<u8>,
}

/// A request taken off the queue: its chain's two sides, gathered and
/// checked; run by [`run`], given back by [`complete`].
#[derive(Debug)]
pub struct Job {
    pub head: u16,
    readable: Side,
    writable: Side,
    /// What is wrong with the chain, if anything.
    bad: Option<RequestError>,
}

impl Job {
    /// The bytes of data the request moves (what a rate limit counts):
    /// a read's device-writable part or a write's device-readable part,
    /// without header and status; 0 for the other types.
    pub fn data_bytes(&self, mem: &GuestMemoryMmap) -> u64 {
        let mut h = [0u8; 4];
        if self.bad.is_some() || self.readable.read(mem, 0, &mut h).is_err() {
            return 0;
        }
        match u32::from_le_bytes(h) {
            req::IN => self.writable.len.saturating_sub(1),
            req::OUT => self.readable.len.saturating_sub(HEADER as u64),
            _ => 0,
        }
    }
}

/// Sorts the chain's descriptors into its two sides, each checked to lie
/// in guest memory.
fn gather(mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> Job {
    let mut job = Job {
        head: chain.head_index(),
        readable: Side::default(),
        writable: Side::default(),
        bad: None,
    };
    for d in chain {
        let len = d.len() as usize;
        if !GuestMemoryBackend::check_range(mem, d.addr(), len) {
            job.bad.get_or_insert(RequestError::OutOfMemory);
        } else if d.is_write_only() {
            job.writable.push(d.addr(), len);
        } else if !job.writable.segs.is_empty() {
            job.bad.get_or_insert(RequestError::Order);
        } else {
            job.readable.push(d.addr(), len);
        }
    }
    job
}

/// Runs one request against the disk and writes its status; returns the
/// bytes written into the chain (its used length).
pub fn run(
    mem: &GuestMemoryMmap,
    job: &Job,
    disk: &dyn BlockBackend,
    counters: &BlkCounters,
    s: &mut Scratch,
    log: &Throttle,
) -> u32 {
    counters.requests.fetch_add(1, Relaxed);
    // The status is the chain's last byte, when it is device-writable.
    let Some(status_at) = job.writable.len.checked_sub(1) else {
        let e = job.bad.clone().unwrap_or(RequestError::NoStatus);
        e.count(counters);
        if let Some(n) = log.hit() {
            tracing::warn!(count = n, "virtio-blk: a request goes back unanswered: {e}");
        }
        return 0;
    };
    let outcome = match &job.bad {
        Some(e) => Err(e.clone()),
        None => execute(mem, disk, counters, job, s, status_at),
    };
    let (code, written) = match outcome {
        Ok(n) => (status::OK, n),
        Err(e) => {
            e.count(counters);
            if let Some(n) = log.hit() {
                tracing::warn!(count = n, "virtio-blk: a request failed: {e}");
            }
            (e.status(), 0)
        }
    };
    match job.writable.write(mem, status_at, &[code]) {
        // The status byte is in guest memory: gather checked it.
        Ok(()) => u32::try_from(written + 1).unwrap_or(u32::MAX),
        Err(_) => 0,
    }
}

/// The chains of the queue that the device holds: taken off it and not
/// yet given back. The driver may not make a chain available again
/// before the device gives it back, so there are at most a queue's worth.
#[derive(Debug, Default)]
pub struct InFlight {
    held: Vec<bool>,
    count: usize,
}

impl InFlight {
    /// Marks `head` as held; false if it already was.
    fn hold(&mut self, head: u16) -> bool {
        let i = usize::from(head);
        if self.held.len() <= i {
            self.held.resize(i + 1, false);
        }
        if self.held[i] {
            return false;
        }
        self.held[i] = true;
        self.count += 1;
        true
    }

    fn release(&mut self, head: u16) {
        if let Some(h) = self.held.get_mut(usize::from(head))
            && std::mem::take(h)
        {
            self.count -= 1;
        }
    }

    /// How many chains are held.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// Takes the chains the driver has made available (a queue's worth at
/// most, see [`drain_queue_deferred`]) and hands each to `dispatch` as a
/// [`Job`], held in `in_flight` until [`complete`] gives it back. Returns
/// what the pass did, or why the queue is broken (a chain the device
/// still holds made available again, say); the jobs taken before still
/// go to `dispatch`.
pub fn take(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    in_flight: &mut InFlight,
    mut dispatch: impl FnMut(Job),
) -> Result<Drained, QueueError> {
    let mut jobs = Vec::new();
    let drained = drain_queue_deferred(mem, queue, |chain| {
        let head = chain.head_index();
        if !in_flight.hold(head) {
            return Err(QueueError::HeadInFlight(head));
        }
        jobs.push(gather(mem, chain));
        Ok(Served::Kept { full: false })
    });
    jobs.into_iter().for_each(&mut dispatch);
    drained
}

/// Gives a job's chain back to the driver with `len` bytes written into
/// it. Returns whether it went back.
pub fn complete(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    in_flight: &mut InFlight,
    head: u16,
    len: u32,
) -> bool {
    in_flight.release(head);
    if queue.add_used(mem, head, len).is_err() {
        tracing::warn!("virtio-blk: the used ring is not writable");
        return false;
    }
    true
}

/// Runs a well-formed chain's request; returns the bytes of data written
/// into the chain (before its status byte).
fn execute(
    mem: &GuestMemoryMmap,
    disk: &dyn BlockBackend,
    c: &BlkCounters,
    job: &Job,
    s: &mut Scratch,
    status_at: u64,
) -> Result<u64, RequestError> {
    if job.readable.len < HEADER as u64 {
        return Err(RequestError::ShortHeader);
    }
    let mut h = [0u8; HEADER];
    job.readable.read(mem, 0, &mut h)?;
    let kind = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
    let capacity = disk.capacity() / SECTOR_SIZE;
    // Data bytes on each side besides the header and the status.
    let out_len = job.readable.len - HEADER as u64;
    let in_len = status_at;
    let range = |len: u64| -> Result<u64, RequestError> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(RequestError::DataLength(len));
        }
        let sectors = len / SECTOR_SIZE;
        match sector.checked_add(sectors) {
            Some(end) if end <= capacity => Ok(sector * SECTOR_SIZE),
            _ => Err(RequestError::PastEnd {
                sector,
                sectors,
                capacity,
            }),
        }
    };
    match kind {
        req::IN => {
            data_segments(job, true)?;
            let offset = range(in_len)?;
            copy_in(mem, disk, job, s, offset, in_len)?;
            c.read_ops.fetch_add(1, Relaxed);
            c.read_bytes.fetch_add(in_len, Relaxed);
            Ok(in_len)
        }
        req::OUT => {
            data_segments(job, false)?;
            let offset = range(out_len)?;
            if disk.read_only() {
                return Err(RequestError::ReadOnly);
            }
            copy_out(mem, disk, job, s, offset, out_len)?;
            c.write_ops.fetch_add(1, Relaxed);
            c.write_bytes.fetch_add(out_len, Relaxed);
            Ok(0)
        }
        req::FLUSH => {
            disk.flush().map_err(backend)?;
            c.flushes.fetch_add(1, Relaxed);
            Ok(0)
        }
        req::GET_ID => {
            let mut id = [0u8; ID_LEN];
            let given = disk.id();
            let n = given.len().min(ID_LEN);
            id[..n].copy_from_slice(&given.as_bytes()[..n]);
            let room = usize::try_from(in_len).unwrap_or(usize::MAX).min(ID_LEN);
            job.writable.write(mem, 0, &id[..room])?;
            Ok(room as u64)
        }
        req::DISCARD | req::WRITE_ZEROES => {
            zeroes(mem, disk, job, kind, out_len, capacity)?;
            let counter = if kind == req::DISCARD {
                &c.discards
            } else {
                &c.write_zeroes
            };
            counter.fetch_add(1, Relaxed);
            Ok(0)
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

fn backend(e: std::io::Error) -> RequestError {
    RequestError::Backend(e.to_string())
}

/// Checks the number of data descriptors against `seg_max`.
fn data_segments(job: &Job, read: bool) -> Result<(), RequestError> {
    let n = if read {
        job.writable.segs.len().saturating_sub(1)
    } else {
        job.readable.segs.len().saturating_sub(1)
    };
    if n > SEG_MAX as usize {
        return Err(RequestError::TooManySegments(n));
    }
    Ok(())
}

/// A read: from the disk into the chain's writable side.
fn copy_in(
    mem: &GuestMemoryMmap,
    disk: &dyn BlockBackend,
    job: &Job,
    s: &mut Scratch,
    offset: u64,
    len: u64,
) -> Result<(), RequestError> {
    if let Some(file) = disk.file() {
        // Straight from the file into each segment of guest memory.
        return job.writable.walk(0, len as usize, |addr, r| {
            let mut src = FileAt {
                file,
                offset: offset + r.start as u64,
            };
            mem.read_exact_volatile_from(addr, &mut src, r.len())
                .map_err(|e| RequestError::Backend(e.to_string()))
        });
    }
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(CHUNK as u64) as usize;
        s.data.resize(n, 0);
        disk.read_at(&mut s.data[..n], offset + done)
            .map_err(backend)?;
        job.writable.write(mem, done, &s.data[..n])?;
        done += n as u64;
    }
    Ok(())
}

/// A file read from `offset` on with `pread`, into guest memory (the
/// pages written marked dirty, for a migration's dirty log).
struct FileAt<'a> {
    file: &'a std::fs::File,
    offset: u64,
}

impl vm_memory::ReadVolatile for FileAt<'_> {
    fn read_volatile<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        buf: &mut vm_memory::VolatileSlice<B>,
    ) -> Result<usize, vm_memory::VolatileMemoryError> {
        use std::os::fd::AsRawFd;
        let guard = buf.ptr_guard_mut();
        let dst = guard.as_ptr();
        let mut done = 0usize;
        // Whole or to the end of the file (a regular file's pread is
        // short only there, or on a signal).
        while done < buf.len() {
            let Ok(at) = libc::off_t::try_from(self.offset) else {
                return Err(vm_memory::VolatileMemoryError::IOError(
                    std::io::Error::from(std::io::ErrorKind::InvalidInput),
                ));
            };
            // `dst` points to `buf.len()` bytes of guest memory
            // that the VolatileSlice (from the guest memory map, checked
            // against its regions) guarantees valid for writes while the
            // guard lives; pread writes at most `buf.len() - done` bytes
            // from `done` on, and the descriptor is the disk's open file.
            // SAFETY: sound for the reasons just given.
            let n = unsafe {
                libc::pread(
                    self.file.as_raw_fd(),
                    dst.wrapping_add(done).cast::<libc::c_void>(),
                    buf.len() - done,
                    at,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                buf.bitmap().mark_dirty(0, buf.len());
                return Err(vm_memory::VolatileMemoryError::IOError(e));
            }
            if n == 0 {
                break;
            }
            done += n as usize;
            self.offset += n as u64;
        }
        buf.bitmap().mark_dirty(0, done);
        Ok(done)
    }
}

/// A write: from the chain's readable side (after the header) to the disk.
fn copy_out(
    mem: &GuestMemoryMmap,
    disk: &dyn BlockBackend,
    job: &Job,
    s: &mut Scratch,
    offset: u64,
    len: u64,
) -> Result<(), RequestError> {
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(CHUNK as u64) as usize;
        s.data.resize(n, 0);
        job.readable
            .read(mem, HEADER as u64 + done, &mut s.data[..n])?;
        disk.write_at(&s.data[..n], offset + done)
            .map_err(backend)?;
        done += n as u64;
    }
    Ok(())
}

/// DISCARD and WRITE_ZEROES: their segments (sector, num_sectors, flags)
/// follow the header.
fn zeroes(
    mem: &GuestMemoryMmap,
    disk: &dyn BlockBackend,
    job: &Job,
    kind: u32,
    len: u64,
    capacity: u64,
) -> Result<(), RequestError> {
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    let count = len / ZEROES_SEGMENT;
    if !len.is_multiple_of(ZEROES_SEGMENT) || count == 0 || count > MAX_ZEROES_SEG as usize {
        return Err(RequestError::Segments(len));
    }
    let mut seg = [0u8; ZEROES_SEGMENT];
    job.readable.read(mem, HEADER as u64, &mut seg)?;
    let sector = u64::from_le_bytes(seg[0..8].try_into().expect("8 bytes"));
    let sectors = u32::from_le_bytes(seg[8..12].try_into().expect("4 bytes"));
    let flags = u32::from_le_bytes(seg[12..16].try_into().expect("4 bytes"));
    // Unknown flags, and "unmap" on a discard, are not supported (5.2.6.2).
    if flags & !FLAG_UNMAP != 0 || (kind == req::DISCARD && flags != 0) {
        return Err(RequestError::SegmentFlags(flags));
    }
    let past = RequestError::PastEnd {
        sector,
        sectors: u64::from(sectors),
        capacity,
    };
    if sectors > MAX_ZEROES_SECTORS {
        return Err(past);
    }
    match sector.checked_add(u64::from(sectors)) {
        Some(end) if end <= capacity => {}
        _ => return Err(past),
    }
    if disk.read_only() {
        return Err(RequestError::ReadOnly);
    }
    let (offset, bytes) = (sector * SECTOR_SIZE, u64::from(sectors) * SECTOR_SIZE);
    if kind == req::DISCARD {
        disk.discard(offset, bytes)
    } else {
        disk.write_zeroes(offset, bytes)
    }
    .map_err(backend)
}

/// Serves every chain the driver has made available (a queue's worth at
/// most), one after the other, in order.
pub fn process(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    disk: &dyn BlockBackend,
    counters: &BlkCounters,
    scratch: &mut Scratch,
    log: &Throttle,
) -> Result<Drained, QueueError> {
    let mut jobs = Vec::new();
    let mut in_flight = InFlight::default();
    let mut drained = take(mem, queue, &mut in_flight, |job| jobs.push(job))?;
    for job in jobs {
        let len = run(mem, &job, disk, counters, scratch, log);
        drained.used |= complete(mem, queue, &mut in_flight, job.head, len);
    }
    Ok(drained)
}

#[cfg(test)]
mod tests;
