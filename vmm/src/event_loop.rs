//! The VM's event loop, on event-manager: subscribers for the events that
//! end a VM (guest reset, a vCPU stop, SIGINT/SIGTERM) and for console
//! input. Device subscribers join the same loop.

use crate::vcpu::VcpuStop;
use devices::legacy::Serial;
use event_manager::{EventOps, Events, MutEventSubscriber};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// What ended the VM, as the loop saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitEvent {
    /// The guest asked for a reset through the i8042.
    GuestReset,
    /// A vCPU stopped; see its reason.
    Vcpu(VcpuStop),
    /// The host asked the VMM to stop with this signal.
    Signal(i32),
    /// The VMM's owner asked the VM to stop.
    HostStop,
}

/// Shared slot where the loop leaves the first exit event.
pub type ExitSlot = Arc<Mutex<Option<ExitEvent>>>;

/// The events that SIGINT and SIGTERM are routed to: one per VM of the
/// process (-1 marks a free slot).
static SIGNAL_FDS: [AtomicI32; MAX_SIGNAL_ROUTES] =
    [const { AtomicI32::new(-1) }; MAX_SIGNAL_ROUTES];
const MAX_SIGNAL_ROUTES: usize = 256;
static LAST_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_stop_signal(signum: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    LAST_SIGNAL.store(signum, Ordering::SeqCst);
    for slot in &SIGNAL_FDS {
        let fd = slot.load(Ordering::SeqCst);
        if fd >= 0 {
            let one: u64 = 1;
            // SAFETY: write(2) is async-signal-safe; `one` is a valid 8-byte
            // buffer and `fd` is an eventfd its VM keeps open until it
            // clears the slot.
            unsafe { libc::write(fd, (&raw const one).cast(), 8) };
        }
    }
}

/// Routes SIGINT and SIGTERM to `evt` until the returned guard is dropped.
pub fn route_stop_signals(evt: &EventFd) -> std::io::Result<SignalRoute> {
    let fd = evt.as_raw_fd();
    let slot = SIGNAL_FDS
        .iter()
        .position(|s| {
            s.compare_exchange(-1, fd, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        })
        .ok_or_else(|| std::io::Error::other("too many VMs in one process for signal routing"))?;
    for sig in [libc::SIGINT, libc::SIGTERM] {
        vmm_sys_util::signal::register_signal_handler(sig, on_stop_signal)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    }
    Ok(SignalRoute { slot })
}

/// Keeps a VM's stop event registered for SIGINT and SIGTERM.
#[derive(Debug)]
pub struct SignalRoute {
    slot: usize,
}

impl Drop for SignalRoute {
    fn drop(&mut self) {
        SIGNAL_FDS[self.slot].store(-1, Ordering::SeqCst);
    }
}

/// Watches the events that end a VM.
pub struct ExitWatcher {
    /// Dropped before `signal_evt`, so a signal never meets a closed fd.
    pub signal_route: SignalRoute,
    pub reset_evt: EventFd,
    pub host_stop_evt: EventFd,
    pub stop_evt: EventFd,
    pub signal_evt: EventFd,
    pub stops: Receiver<VcpuStop>,
    pub slot: ExitSlot,
}

impl ExitWatcher {
    fn record(&self, event: ExitEvent) {
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(event);
        }
    }
}

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.reset_evt.as_raw_fd() {
            let _ = self.reset_evt.read();
            self.record(ExitEvent::GuestReset);
        } else if fd == self.stop_evt.as_raw_fd() {
            let _ = self.stop_evt.read();
            while let Ok(stop) = self.stops.try_recv() {
                self.record(ExitEvent::Vcpu(stop));
            }
        } else if fd == self.signal_evt.as_raw_fd() {
            let _ = self.signal_evt.read();
            self.record(ExitEvent::Signal(LAST_SIGNAL.load(Ordering::SeqCst)));
        } else if fd == self.host_stop_evt.as_raw_fd() {
            let _ = self.host_stop_evt.read();
            self.record(ExitEvent::HostStop);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for evt in [
            &self.reset_evt,
            &self.stop_evt,
            &self.signal_evt,
            &self.host_stop_evt,
        ] {
            if let Err(e) = ops.add(event_manager::Events::new(evt, EventSet::IN)) {
                tracing::error!("cannot watch a VM exit event: {e}");
            }
        }
    }
}

/// Feeds the host's standard input to the guest's serial console.
pub struct ConsoleInput {
    pub input: RawFd,
    pub serial: Arc<Mutex<Serial>>,
}

impl MutEventSubscriber for ConsoleInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        // SAFETY: `buf` is valid for its length and the fd is open; epoll
        // said it is readable, so this does not block.
        let n = unsafe { libc::read(self.input, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            // End of input or a broken descriptor: stop watching it.
            let _ = ops.remove(events);
            return;
        }
        let bytes = &buf[..n as usize];
        let mut serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        // What the guest has no room for is dropped, as a UART would.
        match serial.enqueue_input(bytes) {
            Ok(taken) if taken < bytes.len() => {
                tracing::debug!(dropped = bytes.len() - taken, "console input overflow")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("console input dropped: {e}"),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        match ops.add(Events::with_data_raw(self.input, 0, EventSet::IN)) {
            Ok(()) => {}
            // Regular files and /dev/null cannot be polled: nothing to feed.
            Err(event_manager::Error::Epoll(e)) if e.errno() == libc::EPERM => {
                tracing::debug!("standard input cannot be polled; no console input")
            }
            Err(e) => tracing::warn!("console input unavailable: {e}"),
        }
    }
}
