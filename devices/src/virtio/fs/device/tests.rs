//! The virtio-fs device's tests: requests through the mock driver, held
//! by servers that wait, reset, byte budgets, quiesce.

use super::*;
use virtio_queue::mock::MockSplitQueue;

/// Starts `fs` on the two mock queues, with events nobody watches.
fn activate(
    fs: &mut Fs,
    mem: &GuestMemoryMmap,
    hiprio: &MockSplitQueue<'_, GuestMemoryMmap>,
    requests: &MockSplitQueue<'_, GuestMemoryMmap>,
) {
    let evt = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
    fs.activate(ActivateContext {
        mem: mem.clone(),
        queues: vec![
            hiprio.create_queue().unwrap(),
            requests.create_queue().unwrap(),
        ],
        queue_events: vec![evt(), evt()],
        interrupt: Arc::new(VirtioInterrupt::new(evt())),
    })
    .unwrap();
}

struct Nobody;
impl FuseServer for Nobody {
    fn handle(&self, _request: &[u8]) -> Option<Vec<u8>> {
        None
    }
}

#[test]
fn tag_and_queue_count_are_in_config_space() {
    let fs = Fs::new("data", Arc::new(Nobody)).unwrap();
    let mut tag = [0u8; TAG_LEN];
    fs.read_config(0, &mut tag);
    assert_eq!(&tag[..5], b"data\0");
    let mut n = [0u8; 4];
    fs.read_config(TAG_LEN as u64, &mut n);
    assert_eq!(u32::from_le_bytes(n), 1);
    assert_eq!(fs.queue_max_sizes().len(), 2);
}

#[test]
fn bad_tags_are_refused() {
    for bad in ["", "a\0b", &"x".repeat(TAG_LEN + 1)] {
        assert!(Fs::new(bad, Arc::new(Nobody)).is_err(), "{bad:?}");
    }
    assert!(Fs::new(&"x".repeat(TAG_LEN), Arc::new(Nobody)).is_ok());
}

/// Holds request 1 until request 2 has been answered (or 10 s went
/// by), as a request waiting on the remote server would.
#[derive(Default)]
struct Slow {
    second_done: Mutex<bool>,
    done: std::sync::Condvar,
    first_saw_second: AtomicBool,
}

impl FuseServer for Slow {
    fn handle(&self, request: &[u8]) -> Option<Vec<u8>> {
        let unique = u64::from_le_bytes(request[8..16].try_into().unwrap());
        if unique == 1 {
            let g = self.second_done.lock().unwrap();
            let (g, _) = self
                .done
                .wait_timeout_while(g, std::time::Duration::from_secs(10), |d| !*d)
                .unwrap();
            self.first_saw_second.store(*g, Relaxed);
        } else {
            *self.second_done.lock().unwrap() = true;
            self.done.notify_all();
        }
        let mut r = vec![0u8; 16];
        r[..4].copy_from_slice(&16u32.to_le_bytes());
        r[8..16].copy_from_slice(&unique.to_le_bytes());
        Some(r)
    }
}

#[test]
fn a_slow_request_does_not_hold_up_the_next() {
    use crate::virtio::test_utils::add_chain;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
    let hiprio = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    let requests = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
    // Two requests (ids 1 and 2), each a readable and a writable
    // descriptor.
    for (n, unique) in [(0u16, 1u64), (1, 2)] {
        let mut req = vec![0u8; 40];
        req[..4].copy_from_slice(&40u32.to_le_bytes());
        req[4..8].copy_from_slice(&3u32.to_le_bytes()); // GETATTR
        req[8..16].copy_from_slice(&unique.to_le_bytes());
        let at = u64::from(n) * 0x1000;
        mem.write_slice(&req, GuestAddress(0x10_0000 + at)).unwrap();
        add_chain(
            &requests,
            2 * n,
            &[(0x10_0000 + at, 40, false), (0x20_0000 + at, 64, true)],
        );
    }
    let server = Arc::new(Slow::default());
    let mut fs = Fs::new("data", server.clone()).unwrap();
    activate(&mut fs, &mem, &hiprio, &requests);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while requests.used().idx().load() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "requests not answered"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(
        server.first_saw_second.load(Relaxed),
        "request 2 waited for request 1"
    );
    // Both replies are where the guest put room for them.
    for (n, unique) in [(0u64, 1u64), (1, 2)] {
        let got: u64 = mem
            .read_obj(GuestAddress(0x20_0000 + n * 0x1000 + 8))
            .unwrap();
        assert_eq!(got, unique);
    }
    let c = fs.counters();
    assert_eq!(c.requests.load(Relaxed), 2);
}

/// Holds every request until opened (or 10 s went by), counting those
/// it started on.
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    opened: std::sync::Condvar,
    started: AtomicU64,
}

impl Gate {
    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }

    fn wait_started(&self, n: u64) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.started.load(Relaxed) < n {
            assert!(std::time::Instant::now() < deadline, "requests not started");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
}

impl FuseServer for Gate {
    fn handle(&self, _request: &[u8]) -> Option<Vec<u8>> {
        self.started.fetch_add(1, Relaxed);
        let g = self.open.lock().unwrap();
        let _ = self
            .opened
            .wait_timeout_while(g, std::time::Duration::from_secs(10), |o| !*o)
            .unwrap();
        None
    }

    fn save_session(&self) -> Result<Vec<u8>, String> {
        Ok(b"gate".to_vec())
    }
}

/// A started share whose request queue (16 entries) holds `n` GETATTR
/// requests, heads 0, 2, 4, ...
struct Started {
    fs: Fs,
    interrupt: Arc<VirtioInterrupt>,
    kick: EventFd,
    mem: GuestMemoryMmap,
    avail: vm_memory::GuestAddress,
    used: vm_memory::GuestAddress,
}

fn started_share(
    server: Arc<dyn FuseServer>,
    n: u16,
    tweak: impl FnOnce(&GuestMemoryMmap, vm_memory::GuestAddress),
) -> Started {
    use crate::virtio::test_utils::add_chain;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
    let hiprio = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    let requests = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
    for i in 0..n {
        let mut req = vec![0u8; 40];
        req[..4].copy_from_slice(&40u32.to_le_bytes());
        req[4..8].copy_from_slice(&3u32.to_le_bytes()); // GETATTR
        req[8..16].copy_from_slice(&u64::from(i + 1).to_le_bytes());
        let at = 0x10_0000 + u64::from(i) * 0x1000;
        mem.write_slice(&req, GuestAddress(at)).unwrap();
        add_chain(&requests, 2 * i, &[(at, 40, false), (at + 0x800, 64, true)]);
    }
    tweak(&mem, requests.avail_addr());
    let mut fs = Fs::new("data", server).unwrap();
    let evt = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let interrupt = Arc::new(VirtioInterrupt::new(evt()));
    let kick = evt();
    fs.activate(ActivateContext {
        mem: mem.clone(),
        queues: vec![
            hiprio.create_queue().unwrap(),
            requests.create_queue().unwrap(),
        ],
        queue_events: vec![evt(), kick.try_clone().unwrap()],
        interrupt: interrupt.clone(),
    })
    .unwrap();
    Started {
        fs,
        interrupt,
        kick,
        avail: requests.avail_addr(),
        used: requests.used_addr(),
        mem,
    }
}

/// A ring whose avail index runs past its size fails the device, and
/// a later reset (which waits for the queue thread) returns.
#[test]
fn a_broken_ring_fails_the_device_and_reset_still_returns() {
    use crate::virtio::test_utils::{finishes_within, repost};
    let needs_reset = finishes_within(10, || {
        let mut s = started_share(Arc::new(Nobody), 1, |m, a| repost(m, a, 16, 0, 20));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !s.interrupt.needs_reset() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let failed = s.interrupt.needs_reset();
        s.fs.reset();
        failed
    });
    assert!(needs_reset);
}

/// A chain made available again while its request is still being
/// answered is a driver error: the device fails instead of queueing
/// another copy of the request.
#[test]
fn a_chain_posted_again_while_held_fails_the_device() {
    use crate::virtio::test_utils::repost;

    let gate = Arc::new(Gate::default());
    let s = started_share(gate.clone(), 1, |_, _| {});
    gate.wait_started(1);
    // The driver posts head 0 again, 15 times, and kicks.
    repost(&s.mem, s.avail, 16, 0, 15);
    s.kick.write(1).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !s.interrupt.needs_reset() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert!(s.interrupt.needs_reset());
    gate.open();
    drop(s);
    assert_eq!(gate.started.load(Relaxed), 1, "the copies were not run");
}

/// Waits until no handler thread holds `server` any more (the test's
/// own reference and the device's remain).
fn wait_handlers_gone(server: &Arc<Gate>) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while Arc::strong_count(server) > 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "handlers still running"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// A reset drops the requests the handlers have not started on.
#[test]
fn reset_drops_queued_requests() {
    let gate = Arc::new(Gate::default());
    let mut s = started_share(gate.clone(), 8, |_, _| {});
    gate.wait_started(HANDLERS as u64);
    s.fs.reset();
    gate.open();
    wait_handlers_gone(&gate);
    assert_eq!(gate.started.load(Relaxed), HANDLERS as u64);
    use vm_memory::{Address, Bytes};
    let used_idx: u16 = s.mem.read_obj(s.used.unchecked_add(2)).unwrap();
    assert_eq!(used_idx, 0, "no answer went back after the reset");
}

/// A reset (a guest write to Status, on a vCPU) does not wait for a
/// request stuck on the remote server.
#[test]
fn reset_does_not_wait_for_a_request_on_the_server() {
    use crate::virtio::test_utils::finishes_within;
    let gate = Arc::new(Gate::default());
    let s = started_share(gate.clone(), 1, |_, _| {});
    gate.wait_started(1);
    let mut fs = s.fs;
    finishes_within(5, move || fs.reset());
    gate.open();
    wait_handlers_gone(&gate);
}

/// Requests held past the byte budget stay on the ring until answers
/// free room; then they are taken and answered too.
#[test]
fn held_requests_are_bounded_in_bytes() {
    use super::queue::MAX_HELD_BYTES;
    use crate::virtio::test_utils::add_chain;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const MIB: u32 = 1 << 20;
    let n = (MAX_HELD_BYTES / MIB as usize) as u16 + 8;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x200_0000)]).unwrap();
    let hiprio = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    let requests = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 128);
    // Every request is the same 1 MiB GETATTR (a header, then
    // padding), as a guest can post the same buffer again and again.
    let mut req = vec![0u8; 40];
    req[..4].copy_from_slice(&MIB.to_le_bytes());
    req[4..8].copy_from_slice(&3u32.to_le_bytes());
    mem.write_slice(&req, GuestAddress(0x100_0000)).unwrap();
    for i in 0..n {
        let reply = 0x10_0000 + u64::from(i) * 0x100;
        add_chain(
            &requests,
            2 * i,
            &[(0x100_0000, MIB, false), (reply, 64, true)],
        );
    }
    let gate = Arc::new(Gate::default());
    let mut fs = Fs::new("data", gate.clone()).unwrap();
    activate(&mut fs, &mem, &hiprio, &requests);
    gate.wait_started(HANDLERS as u64);
    let taken = fs.counters().requests.load(Relaxed);
    assert_eq!(taken, (MAX_HELD_BYTES / MIB as usize) as u64);
    gate.open();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while requests.used().idx().load() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {n} answered",
            requests.used().idx().load()
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(fs.counters().requests.load(Relaxed), u64::from(n));
}

/// The index of the used ring at `used`.
fn used_idx(mem: &GuestMemoryMmap, used: vm_memory::GuestAddress) -> u16 {
    use vm_memory::{Address, Bytes};
    mem.read_obj(used.unchecked_add(2)).unwrap()
}

fn wait_used(s: &Started, n: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while used_idx(&s.mem, s.used) < n {
        assert!(Instant::now() < deadline, "{n} answers did not come");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A snapshot's quiesce waits until the requests being answered are
/// answered, takes no new ones meanwhile, and the device then saves;
/// requests queued meanwhile are taken once it goes on.
#[test]
fn quiesce_waits_for_the_requests_being_answered() {
    use vm_memory::{Address, Bytes};
    let gate = Arc::new(Gate::default());
    // Three requests on the ring, the third not made available yet.
    let mut s = started_share(gate.clone(), 3, |m, avail| {
        m.write_obj(2u16, avail.unchecked_add(2)).unwrap();
    });
    gate.wait_started(2);
    let quiesced = std::thread::scope(|scope| {
        let fs = &mut s.fs;
        let q = scope.spawn(move || {
            fs.quiesce();
            Instant::now()
        });
        std::thread::sleep(Duration::from_millis(200));
        assert!(!q.is_finished(), "quiesce returned with requests held");
        let opened = Instant::now();
        gate.open();
        let quiesced = q.join().unwrap();
        assert!(quiesced >= opened);
        quiesced
    });
    assert!(quiesced.elapsed() < Duration::from_secs(5));
    assert_eq!(
        used_idx(&s.mem, s.used),
        2,
        "both answered before it returned"
    );
    // The guest makes the third available and kicks: not taken.
    s.mem.write_obj(3u16, s.avail.unchecked_add(2)).unwrap();
    s.kick.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(s.fs.counters().requests.load(Relaxed), 2);
    assert_eq!(used_idx(&s.mem, s.used), 2);
    let queues = s.fs.queue_states();
    assert_eq!(queues.len(), 2);
    assert_eq!((queues[1].next_avail, queues[1].next_used), (2, 2));
    let saved: FsPersist = bitcode::deserialize(&s.fs.save_device().unwrap()).unwrap();
    assert_eq!(
        saved,
        FsPersist {
            format: FS_PERSIST_FORMAT,
            tag: "data".into(),
            session: b"gate".to_vec(),
        }
    );
    s.fs.unquiesce();
    wait_used(&s, 3);
    assert_eq!(s.fs.counters().requests.load(Relaxed), 3);
}

/// A request still being answered when the quiesce time-out passes
/// fails the snapshot instead of saving a session that changes; the
/// device goes on, and a later snapshot succeeds.
#[test]
fn a_request_answered_past_the_time_out_fails_the_snapshot() {
    let gate = Arc::new(Gate::default());
    let mut s = started_share(gate.clone(), 1, |_, _| {});
    gate.wait_started(1);
    s.fs.set_quiesce_timeout(Duration::from_millis(100));
    let t0 = Instant::now();
    s.fs.quiesce();
    assert!(t0.elapsed() >= Duration::from_millis(100));
    let err = s.fs.save_device().unwrap_err();
    assert!(
        err.contains("still had 1 request(s) being answered"),
        "{err}"
    );
    s.fs.unquiesce();
    gate.open();
    wait_used(&s, 1);
    s.fs.quiesce();
    assert!(s.fs.save_device().is_ok());
    s.fs.unquiesce();
}

/// Saves what it is given back, and records what it restores.
#[derive(Default)]
struct Recorder {
    restored: Mutex<Option<Vec<u8>>>,
}

impl FuseServer for Recorder {
    fn handle(&self, _request: &[u8]) -> Option<Vec<u8>> {
        None
    }
    fn save_session(&self) -> Result<Vec<u8>, String> {
        Ok(b"session".to_vec())
    }
    fn restore_session(&self, state: &[u8]) -> Result<(), String> {
        *self.restored.lock().unwrap() = Some(state.to_vec());
        Ok(())
    }
}

#[test]
fn restore_takes_back_the_session_of_the_same_share_only() {
    let saved = Fs::new("data", Arc::new(Recorder::default()))
        .unwrap()
        .save_device()
        .unwrap();
    let server = Arc::new(Recorder::default());
    let mut fs = Fs::new("data", server.clone()).unwrap();
    fs.restore_device(&saved).unwrap();
    assert_eq!(
        server.restored.lock().unwrap().as_deref(),
        Some(&b"session"[..])
    );

    let other = Arc::new(Recorder::default());
    let err = Fs::new("other", other.clone())
        .unwrap()
        .restore_device(&saved)
        .unwrap_err();
    assert!(err.contains("\"data\""), "{err}");
    assert!(other.restored.lock().unwrap().is_none());

    // Damaged state: an error, never a panic.
    for bad in [&[][..], &saved[..saved.len() / 2], &[0xff; 64][..]] {
        let mut fs = Fs::new("data", Arc::new(Recorder::default())).unwrap();
        assert!(fs.restore_device(bad).is_err(), "{bad:?}");
    }
    let mut wrong = bitcode::deserialize::<FsPersist>(&saved).unwrap();
    wrong.format = 99;
    let err = Fs::new("data", Arc::new(Recorder::default()))
        .unwrap()
        .restore_device(&bitcode::serialize(&wrong).unwrap())
        .unwrap_err();
    assert!(err.contains("format 99"), "{err}");
}

/// A server that cannot save its session makes the snapshot fail,
/// saying so.
#[test]
fn a_server_without_sessions_cannot_be_saved() {
    let err = Fs::new("data", Arc::new(Nobody))
        .unwrap()
        .save_device()
        .unwrap_err();
    assert!(err.contains("\"data\""), "{err}");
}
