//! Live migration: a running VM moves to another VMM process (on this
//! host or another) over a byte stream, with the guest paused only for
//! the last few pages and the device and vCPU state.
//!
//! The source ([`RunningVm::migrate`]) sends all of guest memory that
//! holds data while the guest runs, then, in rounds, the pages written
//! meanwhile: KVM's dirty log for what the guest wrote, vm-memory's dirty
//! bitmap for what the devices wrote (used rings, received frames, file
//! reads). Once what is left would go within the downtime target at the
//! rate measured so far, it pauses the VM, sends the rest and the state
//! (as a snapshot's state file holds it), and waits for the destination
//! to say that it runs the VM; only then does the VM end here. Anything
//! that fails before that answer (the connection, the destination, a
//! VM that writes faster than the link) disables dirty logging and lets
//! the VM run on here.
//!
//! The destination ([`receive`]) checks each message against the memory
//! layout it was told, writes pages into fresh guest memory, and returns
//! the state and memory as a [`Snapshot`] for the owner to start as a
//! restore does; [`confirm`] then answers the source.
//!
//! `wire.rs` has the stream format, `link.rs` the connections (tcp, tls,
//! unix). Written here rather than taken from a
//! crate: no maintained crate speaks a VMM migration stream, and the
//! format is small.

pub mod link;
mod wire;

use crate::snapshot::{Snapshot, SnapshotError, SnapshotState, file, memory};
use crate::vm::{RunningVm, VmError};
use devices::virtio::GuestMemoryMmap;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use wire::{Header, MAX_RUN, PAGE};

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("cannot send to the destination")]
    Send(#[source] std::io::Error),
    #[error("cannot read the migration stream")]
    Receive(#[source] std::io::Error),
    #[error("the destination did not confirm that it runs the VM")]
    Confirm(#[source] std::io::Error),
    #[error("the destination refused the VM: {0}")]
    Refused(String),
    #[error("a migration of this VM is under way")]
    Busy,
    #[error(
        "the destination took the VM but did not say that it runs it: the VM stays paused here and must not be resumed unless the destination does not run it"
    )]
    Unconfirmed(#[source] Box<MigrationError>),
    #[error("bad migration stream: {0}")]
    Protocol(String),
    #[error(
        "the guest writes memory faster than it can be sent: {left_mib:.1} MiB still dirty after {rounds} rounds at {mib_s:.0} MiB/s; the VM runs on here"
    )]
    NoConvergence {
        rounds: u32,
        left_mib: f64,
        mib_s: f64,
    },
    #[error("cannot read KVM's dirty log")]
    DirtyLog(#[source] kvm_ioctls::Error),
    #[error("the migrated memory layout {got:?} is not that of a VM of its size")]
    Layout { got: Vec<(u64, u64)> },
    #[error("cannot create guest memory for the incoming VM")]
    Memory(#[from] crate::memory::MemoryError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

/// How [`RunningVm::migrate`] goes about it.
#[derive(Debug, Clone, Copy)]
pub struct MigrateOptions {
    /// The longest pause the guest should see.
    pub downtime: Duration,
    /// Rounds of dirty pages before giving up.
    pub max_rounds: u32,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            downtime: Duration::from_millis(20),
            max_rounds: 30,
        }
    }
}

/// What a migration took.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Migrated {
    /// From the start to the destination's confirmation.
    pub total: Duration,
    /// From the pause to the destination's confirmation.
    pub downtime: Duration,
    /// Rounds of dirty pages after the first copy.
    pub rounds: u32,
    /// Bytes of guest memory sent (pages with data).
    pub bytes: u64,
}

/// One round's progress, for the caller's log.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    pub round: u32,
    /// Bytes sent in this round.
    pub sent: u64,
    /// Dirty bytes found at its end.
    pub left: u64,
    /// The send rate measured so far.
    pub bytes_per_s: f64,
}

/// A connection a VM migrates over.
pub trait Link: Read + Write {
    /// Bytes written that have not left yet (the kernel's send queue), so
    /// that the rate is measured on what the link carried, not on what
    /// the buffers took; 0 where the link cannot tell.
    fn queued(&self) -> u64 {
        0
    }
    /// Whether the other end is on this host and can be handed file
    /// descriptors (a unix socket). Such a link starts with
    /// [`Link::send_memfd`] / [`Link::recv_memfd`].
    fn is_local(&self) -> bool {
        false
    }
    /// Sends the first byte of a local link, with the memfd of guest
    /// memory attached, or none.
    fn send_memfd(&mut self, _memfd: Option<&std::fs::File>) -> std::io::Result<()> {
        Ok(())
    }
    /// Receives the first byte of a local link and the memfd with it, if
    /// any.
    fn recv_memfd(&mut self) -> std::io::Result<Option<std::fs::File>> {
        Ok(None)
    }
}

impl Link for std::net::TcpStream {
    fn queued(&self) -> u64 {
        send_queue(self)
    }
}

impl Link for std::os::unix::net::UnixStream {
    fn queued(&self) -> u64 {
        send_queue(self)
    }
}

/// The bytes in a socket's send queue (SIOCOUTQ), 0 if it cannot tell.
fn send_queue(socket: &impl std::os::fd::AsRawFd) -> u64 {
    let mut queued: libc::c_int = 0;
    // SIOCOUTQ (TIOCOUTQ) writes one int through the pointer,
    // which points at `queued`, alive for the call; the descriptor is the
    // socket's own, open while it is borrowed.
    // SAFETY: sound for the reasons just given.
    let r = unsafe { libc::ioctl(socket.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
    if r == 0 { queued.max(0) as u64 } else { 0 }
}

/// Sends guest memory, counting what went.
struct Sender<'a, W: Write> {
    out: &'a mut W,
    buf: Vec<u8>,
    /// Guest memory sent (pages with data).
    bytes: u64,
    /// Everything written, headers included.
    wire: u64,
}

impl<W: Write> Sender<'_, W> {
    /// Sends `pages` pages of `mem` from `gpa`, as runs of data and runs
    /// of zeros.
    fn send_pages(
        &mut self,
        mem: &GuestMemoryMmap,
        gpa: u64,
        pages: u64,
    ) -> Result<(), MigrationError> {
        let mut done = 0;
        while done < pages {
            let n = (pages - done).min(u64::from(MAX_RUN));
            let at = gpa + done * PAGE;
            self.buf.resize((n * PAGE) as usize, 0);
            // A volatile copy: the guest may be writing these pages (they
            // are sent again if so).
            mem.read_slice(&mut self.buf, GuestAddress(at))
                .map_err(|e| MigrationError::Protocol(format!("guest memory at {at:#x}: {e}")))?;
            let mut p = 0;
            while p < n {
                let zero = is_zero(&self.buf, p);
                let mut q = p + 1;
                while q < n && is_zero(&self.buf, q) == zero {
                    q += 1;
                }
                let run_at = at + p * PAGE;
                self.wire += wire::RUN_HEADER;
                if zero {
                    wire::write_zeros(self.out, run_at, (q - p) as u32)
                } else {
                    let bytes = &self.buf[(p * PAGE) as usize..(q * PAGE) as usize];
                    self.bytes += bytes.len() as u64;
                    self.wire += bytes.len() as u64;
                    wire::write_pages(self.out, run_at, bytes)
                }
                .map_err(MigrationError::Send)?;
                p = q;
            }
            done += n;
        }
        Ok(())
    }
}

/// The runs of consecutive pages below `pages` for which `set` holds:
/// (first page, pages).
fn runs(pages: u64, set: impl Fn(u64) -> bool) -> impl Iterator<Item = (u64, u64)> {
    let mut p = 0;
    std::iter::from_fn(move || {
        while p < pages && !set(p) {
            p += 1;
        }
        if p >= pages {
            return None;
        }
        let first = p;
        while p < pages && set(p) {
            p += 1;
        }
        Some((first, p - first))
    })
}

fn is_zero(buf: &[u8], page: u64) -> bool {
    let page = &buf[(page * PAGE) as usize..((page + 1) * PAGE) as usize];
    page.iter().all(|&b| b == 0)
}

/// Which pages of `mem` were written since the last call: KVM's dirty log
/// (the guest) or-ed with vm-memory's bitmap (the VMM), both cleared.
/// One bit per page, one vector per region.
fn take_dirty(vm: &RunningVm) -> Result<Vec<Vec<u64>>, MigrationError> {
    vm.memory()
        .iter()
        .enumerate()
        .map(|(slot, region)| {
            let mut bits = vm
                .fd
                .get_dirty_log(slot as u32, region.len() as usize)
                .map_err(MigrationError::DirtyLog)?;
            // The region's own bitmap (the trait's `bitmap` is a view),
            // taken and cleared word by word, atomically: a page a device
            // marks meanwhile is in this round or the next.
            let vmm: &AtomicBitmap = vm_memory::mmap::MmapRegion::bitmap(region);
            for (word, taken) in bits.iter_mut().zip(vmm.get_and_reset()) {
                *word |= taken;
            }
            Ok(bits)
        })
        .collect()
}

fn count(dirty: &[Vec<u64>]) -> u64 {
    dirty
        .iter()
        .flatten()
        .map(|w| u64::from(w.count_ones()))
        .sum()
}

impl RunningVm {
    /// Moves the VM to the VMM at the other end of `stream` (see the
    /// module docs), named `to` in logs and in the VM's exit. `owner` is
    /// what a snapshot keeps for the owner. `progress` hears of each
    /// round. On success the VM stays paused here for the caller to end
    /// with [`RunningVm::stop`] (`wait` then says
    /// [`crate::VmExit::Migrated`]); on failure it runs on as before.
    pub fn migrate<S: Link>(
        &self,
        stream: &mut S,
        to: &str,
        owner: &str,
        opts: MigrateOptions,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Migrated, VmError> {
        self.check_can_save()?;
        let start = Instant::now();
        if self
            .migrating
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return Err(MigrationError::Busy.into());
        }
        let result = self.migrate_once(stream, to, owner, opts, progress, start);
        self.migrating
            .store(false, std::sync::atomic::Ordering::SeqCst);
        result
    }

    fn migrate_once<S: Link>(
        &self,
        stream: &mut S,
        to: &str,
        owner: &str,
        opts: MigrateOptions,
        progress: &mut dyn FnMut(Progress),
        start: Instant,
    ) -> Result<Migrated, VmError> {
        // A local destination is handed the memfd guest memory lives in,
        // if it does: nothing to copy, nothing to track.
        let handover = if stream.is_local() {
            let memfd = crate::memory::memfd_of(self.memory());
            stream.send_memfd(memfd).map_err(MigrationError::Send)?;
            memfd.is_some()
        } else {
            false
        };
        if !handover {
            crate::vm::set_memory_flags(
                &self.fd,
                self.memory(),
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES,
            )?;
        }
        let result = self.migrate_logged(stream, to, owner, opts, progress, start, !handover);
        if result.is_err() && !handover {
            // The VM runs on here, without the cost of dirty logging.
            if let Err(e) = crate::vm::set_memory_flags(&self.fd, self.memory(), 0) {
                tracing::warn!("cannot turn dirty logging off again: {e}");
            }
        }
        result
    }

    /// The migration proper: with `precopy`, memory is copied (dirty
    /// logging on); without, the destination has it already (a handed
    /// over memfd) and only the state goes.
    #[allow(clippy::too_many_arguments)]
    fn migrate_logged<S: Link>(
        &self,
        stream: &mut S,
        to: &str,
        owner: &str,
        opts: MigrateOptions,
        progress: &mut dyn FnMut(Progress),
        start: Instant,
        precopy: bool,
    ) -> Result<Migrated, VmError> {
        let mem = self.memory();
        let mut out = std::io::BufWriter::with_capacity(1 << 20, &mut *stream);
        let mut sender = Sender {
            out: &mut out,
            buf: Vec::new(),
            bytes: 0,
            wire: 0,
        };
        let copied = wire::write_hello(sender.out, &memory::layout(mem))
            .map_err(|e| VmError::from(MigrationError::Send(e)))
            .and_then(|()| {
                if precopy {
                    self.precopy(&mut sender, opts, progress, start)
                } else {
                    Ok(0)
                }
            });
        let rounds = match copied {
            Ok(rounds) => rounds,
            Err(e) => {
                // What is buffered is dropped, not sent: a failed
                // migration ends now, not after another write timeout.
                let _ = out.into_parts();
                return Err(e);
            }
        };

        let mut state = self.lock_state();
        let was_running = *state == crate::control::RunState::Running;
        self.pause_locked(&mut state)?;
        let paused = Instant::now();
        for t in &self.transports {
            crate::vm::lock(t).quiesce();
        }
        let last = (if precopy {
            take_dirty(self)
        } else {
            Ok(Vec::new())
        })
        .map_err(VmError::from)
        .and_then(|dirty| send_dirty(&mut sender, mem, &dirty).map_err(VmError::from))
        .and_then(|()| self.capture(owner, [0; 16]))
        .and_then(|vm_state| {
            let bytes = file::encode(&vm_state).map_err(SnapshotError::from)?;
            wire::write_state(sender.out, &bytes).map_err(MigrationError::Send)?;
            sender.out.flush().map_err(MigrationError::Send)?;
            Ok(())
        });
        let bytes = sender.bytes;
        let _ = out.into_parts();
        // The destination has built the VM, paused: let it go. Once the
        // go is sent, the VM must not run here again, whatever happens.
        let let_go = last
            .and_then(|()| wire::expect(stream, "ready").map_err(VmError::from))
            .and_then(|()| {
                wire::write_line(stream, &serde_json::json!({"go": true, "run": was_running}))
                    .map_err(|e| MigrationError::Send(e).into())
            });
        if let Err(e) = let_go {
            for t in &self.transports {
                crate::vm::lock(t).unquiesce();
            }
            if was_running {
                self.resume_locked(&mut state)?;
            }
            return Err(e);
        }
        // Paused here for good: no request makes it run here again.
        *state = crate::control::RunState::Stopping;
        drop(state);
        match wire::expect(stream, "running") {
            Ok(()) => {
                *crate::vm::lock(&self.migrated_to) = Some(to.to_owned());
                Ok(Migrated {
                    total: start.elapsed(),
                    downtime: paused.elapsed(),
                    rounds,
                    bytes,
                })
            }
            Err(e) => {
                // Paused, not ended: its owner decides, once it knows
                // whether the destination runs it.
                *self.lock_state() = crate::control::RunState::Paused;
                Err(MigrationError::Unconfirmed(Box::new(e)).into())
            }
        }
    }
}

/// Sends the pages of `region` that may hold data: of anonymous memory or
/// a memfd, those mapped here (the page map says which without touching
/// the others, which read as zeros and the destination has as zeros); of
/// memory mapped from a snapshot file (a restored VM), all.
fn send_region<W: Write>(
    sender: &mut Sender<'_, W>,
    mem: &GuestMemoryMmap,
    region: &vm_memory::GuestRegionMmap<AtomicBitmap>,
) -> Result<(), MigrationError> {
    const CHUNK: u64 = 2 << 20;
    // A memfd's pages the guest touched are mapped here: the page map
    // tells them too (reading the others would allocate them).
    let shared = crate::memory::memfd_of(mem).is_some();
    let start = region.start_addr().0;
    let len = region.len();
    let mut entries = Vec::new();
    let mut off = 0;
    while off < len {
        let n = CHUNK.min(len - off);
        let pages = n / PAGE;
        let host = region.as_ptr().wrapping_add(off as usize);
        let mapped = (region.file_offset().is_none() || shared)
            && memory::page_map(host, pages as usize, &mut entries).is_ok();
        if !mapped {
            sender.send_pages(mem, start + off, pages)?;
        } else {
            let present =
                |p: u64| entries[p as usize] & (memory::PM_PRESENT | memory::PM_SWAPPED) != 0;
            for (p, n) in runs(pages, present) {
                sender.send_pages(mem, start + off + p * PAGE, n)?;
            }
        }
        off += n;
    }
    Ok(())
}

impl RunningVm {
    /// Copies guest memory while the guest runs: all that holds data,
    /// then, in rounds, what was written meanwhile, until the rest fits
    /// the downtime (left marked dirty for the final copy); the rounds.
    fn precopy<S: Link>(
        &self,
        sender: &mut Sender<'_, std::io::BufWriter<&mut S>>,
        opts: MigrateOptions,
        progress: &mut dyn FnMut(Progress),
        start: Instant,
    ) -> Result<u32, VmError> {
        let mem = self.memory();
        let mut rounds = 0u32;
        // Everything that holds data, the guest running. Pages it writes
        // meanwhile show in the first dirty log.
        take_dirty(self)?; // both logs start clean
        for region in mem.iter() {
            send_region(sender, mem, region)?;
        }
        let mut drained_since: Option<Instant> = None;
        loop {
            let dirty = take_dirty(self)?;
            let left = count(&dirty) * PAGE;
            // The rate the link carried so far, and what it has yet to
            // carry: what went into its buffers is not gone yet.
            sender.out.flush().map_err(MigrationError::Send)?;
            let queued = sender.out.get_ref().queued();
            let elapsed = start.elapsed().as_secs_f64().max(1e-6);
            let rate = sender.wire.saturating_sub(queued).max(1) as f64 / elapsed;
            let fits = |bytes: u64| bytes as f64 <= rate * opts.downtime.as_secs_f64();
            let report = Progress {
                round: rounds,
                sent: sender.bytes,
                left,
                bytes_per_s: rate,
            };
            if fits(left + queued) {
                // The rest goes with the VM paused.
                progress(report);
                put_back(self, &dirty);
                return Ok(rounds);
            }
            if fits(left) {
                // Only what the link has yet to carry is in the way: wait
                // for it to drain rather than spend a round.
                put_back(self, &dirty);
                let waiting = drained_since.get_or_insert_with(Instant::now);
                if waiting.elapsed() > link::IO_TIMEOUT {
                    return Err(MigrationError::Send(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "the destination has not read {queued} bytes for {:?}",
                            link::IO_TIMEOUT
                        ),
                    ))
                    .into());
                }
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            drained_since = None;
            progress(report);
            if rounds >= opts.max_rounds {
                return Err(MigrationError::NoConvergence {
                    rounds,
                    left_mib: left as f64 / f64::from(1 << 20),
                    mib_s: rate / f64::from(1 << 20),
                }
                .into());
            }
            rounds += 1;
            send_dirty(sender, mem, &dirty)?;
        }
    }
}

/// Marks the pages of `dirty` dirty again in vm-memory's bitmap, so that
/// the next [`take_dirty`] (with the VM paused) finds them.
fn put_back(vm: &RunningVm, dirty: &[Vec<u64>]) {
    for (region, bits) in vm.memory().iter().zip(dirty) {
        for (w, &word) in bits.iter().enumerate() {
            let mut word = word;
            while word != 0 {
                let bit = word.trailing_zeros() as usize;
                word &= word - 1;
                vm_memory::mmap::MmapRegion::bitmap(region).set_bit(w * 64 + bit);
            }
        }
    }
}

/// Sends the pages set in `dirty`, in runs.
fn send_dirty<W: Write>(
    sender: &mut Sender<'_, W>,
    mem: &GuestMemoryMmap,
    dirty: &[Vec<u64>],
) -> Result<(), MigrationError> {
    for (region, bits) in mem.iter().zip(dirty) {
        let pages = region.len() / PAGE;
        let set = |p: u64| bits[(p / 64) as usize] & (1 << (p % 64)) != 0;
        for (p, n) in runs(pages, set) {
            sender.send_pages(mem, region.start_addr().0 + p * PAGE, n)?;
        }
    }
    Ok(())
}

/// Receives a VM from the source at the other end of `stream`: its
/// memory, written into fresh guest memory, and its state. The caller
/// builds and starts it as a restore, then calls [`confirm`].
pub fn receive<S: Link>(stream: &mut S) -> Result<Snapshot, MigrationError> {
    let memfd = if stream.is_local() {
        stream.recv_memfd().map_err(MigrationError::Receive)?
    } else {
        None
    };
    let mut input = std::io::BufReader::with_capacity(1 << 20, stream);
    let layout = wire::read_hello(&mut input)?;
    let size = layout
        .iter()
        .try_fold(0u64, |sum, &(_, len)| sum.checked_add(len))
        .filter(|&s| s > 0)
        .ok_or_else(|| MigrationError::Layout {
            got: layout.clone(),
        })?;
    let expected: Vec<(u64, u64)> = crate::memory::ram_ranges(size)
        .into_iter()
        .map(|(a, l)| (a.0, l))
        .collect();
    if layout != expected {
        return Err(MigrationError::Layout { got: layout });
    }
    // A stream claims a size; nothing is allocated for more than the host
    // has.
    let host = crate::host::mem_total_bytes();
    if size > host {
        return Err(MigrationError::Protocol(format!(
            "a VM of {size} bytes of memory, more than this host's {host}"
        )));
    }
    let memory = match memfd {
        Some(file) => crate::memory::from_memfd(size, file)?,
        None => crate::memory::create(size, false)?,
    };
    let mut buf = vec![0u8; (u64::from(MAX_RUN) * PAGE) as usize];
    let out_of_range = |gpa: u64, pages: u32| {
        MigrationError::Protocol(format!("{pages} pages at {gpa:#x} are not guest memory"))
    };
    loop {
        match wire::read_header(&mut input)? {
            Header::Pages { gpa, pages } => {
                let data = &mut buf[..(u64::from(pages) * PAGE) as usize];
                input.read_exact(data).map_err(MigrationError::Receive)?;
                memory
                    .write_slice(data, GuestAddress(gpa))
                    .map_err(|_| out_of_range(gpa, pages))?;
            }
            Header::Zeros { gpa, pages } => {
                zero_pages(&memory, gpa, pages).map_err(|_| out_of_range(gpa, pages))?;
            }
            Header::State { len } => {
                let mut bytes = vec![0u8; len as usize];
                input
                    .read_exact(&mut bytes)
                    .map_err(MigrationError::Receive)?;
                let state: SnapshotState = file::decode(Path::new("the migration stream"), &bytes)
                    .map_err(SnapshotError::from)?;
                state.check()?;
                if state.memory != expected {
                    return Err(MigrationError::Layout { got: state.memory });
                }
                return Ok(Snapshot {
                    state,
                    memory,
                    dir: None,
                });
            }
        }
    }
}

/// Makes `pages` pages of guest memory at `gpa` read as zeros, giving
/// back the host pages rather than writing zeros into them (fresh
/// memory's untouched pages stay untouched).
fn zero_pages(memory: &GuestMemoryMmap, gpa: u64, pages: u32) -> Result<(), ()> {
    let len = u64::from(pages) * PAGE;
    let anonymous = memory
        .find_region(GuestAddress(gpa))
        .is_some_and(|r| r.file_offset().is_none());
    if !anonymous {
        return memory
            .write_slice(&vec![0u8; len as usize], GuestAddress(gpa))
            .map_err(|_| ());
    }
    // The whole range must be guest memory, in one region.
    let host = memory
        .get_slice(GuestAddress(gpa), len as usize)
        .map_err(|_| ())?
        .ptr_guard_mut()
        .as_ptr();
    // `host..host + len` is guest memory of one region (checked
    // just above), page-aligned (gpa and the region's mapping are), and
    // MADV_DONTNEED on it only drops pages the kernel refills with zeros
    // (private anonymous memory, checked above): no
    // Rust object lives there, and the guest is not running yet.
    // SAFETY: sound for the reasons just given.
    let r = unsafe { libc::madvise(host.cast(), len as usize, libc::MADV_DONTNEED) };
    if r == 0 {
        return Ok(());
    }
    // Where the kernel will not, zeros are written.
    memory
        .write_slice(&vec![0u8; len as usize], GuestAddress(gpa))
        .map_err(|_| ())
}

/// Tells the source whether this VMM has built the VM it sent (paused,
/// [`crate::snapshot::Restore::Migration`]); if so, waits for the source
/// to let it go and returns whether the VM was running there (then it
/// runs here: [`RunningVm::resume_migrated`]). An error means the VM
/// must not run here.
pub fn ready<S: Read + Write>(
    stream: &mut S,
    built: Result<(), &str>,
) -> Result<bool, MigrationError> {
    let line = match built {
        Ok(()) => serde_json::json!({"ready": true}),
        Err(why) => serde_json::json!({"error": why}),
    };
    wire::write_line(stream, &line).map_err(MigrationError::Send)?;
    if let Err(why) = built {
        return Err(MigrationError::Refused(why.to_string()));
    }
    let go = wire::read_line(stream).map_err(MigrationError::Receive)?;
    if go["go"] != true {
        return Err(MigrationError::Protocol(format!(
            "the source sent {go} instead of go"
        )));
    }
    Ok(go["run"] != false)
}

/// Tells the source that the VM runs here now.
pub fn running<W: Write>(stream: &mut W) -> std::io::Result<()> {
    wire::write_line(stream, &serde_json::json!({"running": true}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_the_stretches_of_set_pages() {
        let set = [false, true, true, false, true, false, false, true];
        let got: Vec<_> = runs(set.len() as u64, |p| set[p as usize]).collect();
        assert_eq!(got, vec![(1, 2), (4, 1), (7, 1)]);
        assert_eq!(runs(4, |_| false).count(), 0);
        assert_eq!(runs(3, |_| true).collect::<Vec<_>>(), vec![(0, 3)]);
    }
}
