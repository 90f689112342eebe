//! A vCPU thread as an explicit state machine.
//!
//! ```text
//!            Resume              Pause
//! Created ---------> Running ---------> Paused
//!    |                 |  ^    Resume     |
//!    |                 |  +---------------+
//!    |  Stop           | guest stops / Stop
//!    +---------------> Stopped <----------+
//! ```
//!
//! Commands come over a typed channel. A running vCPU sits in KVM_RUN, so
//! a command is followed by a kick: a signal to the thread whose handler
//! sets `immediate_exit` in the thread's `kvm_run`, which makes KVM_RUN
//! return (now, or the next time it is entered) with EINTR. Every change
//! of state is acknowledged on a second channel. The thread is joined
//! when its handle is dropped.
//!
//! A paused vCPU's KVM state can be read on its own thread, which owns
//! its file descriptor: [`VcpuHandle::save_state`] sends a save request
//! down the same channel and waits for the answer on a channel of its own,
//! so acknowledgements of state changes are never mixed with it.

use crate::x86_64::vcpu_state::{self, VcpuStateError};
use devices::Bus;
use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::cell::Cell;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::Duration;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuCommand {
    Resume,
    Pause,
    Stop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuState {
    Created,
    Running,
    Paused,
    Stopped,
}

/// Why a vCPU stopped running the guest by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest asked to shut down or reset.
    GuestShutdown,
    /// The vCPU hit a triple fault (KVM_EXIT_SHUTDOWN).
    TripleFault { rip: Option<u64> },
    /// KVM could not go on (KVM_EXIT_INTERNAL_ERROR).
    InternalError {
        suberror: u32,
        rip: Option<u64>,
        data: Vec<u64>,
    },
    /// The CPU refused to enter the guest (KVM_EXIT_FAIL_ENTRY).
    FailEntry { reason: u64 },
    /// The guest reported a crash (KVM_SYSTEM_EVENT_CRASH).
    GuestCrash,
    /// KVM_RUN failed, or an exit we cannot handle.
    Error(String),
}

/// A stop of one vCPU, reported to the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuStop {
    pub vcpu: u8,
    pub reason: StopReason,
}

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot start the thread of vCPU {0}")]
    Spawn(u8, #[source] std::io::Error),
    #[error("cannot set up the vCPU kick signal")]
    Signal(#[source] vmm_sys_util::errno::Error),
    #[error("vCPU {0} is gone")]
    Gone(u8),
    #[error("vCPU {0} did not answer within {1:?}")]
    Timeout(u8, Duration),
    #[error("vCPU {0} is {1:?}: its state can only be saved while it is paused")]
    NotPaused(u8, VcpuState),
    #[error("cannot save the state of vCPU {0}")]
    Save(u8, #[source] VcpuStateError),
}

/// The answer to a save request.
type SaveReply = Result<vcpu_state::VcpuState, VcpuError>;

/// What a vCPU thread is asked to do.
enum Request {
    /// Change state.
    Command(VcpuCommand),
    /// Read the vCPU's state, if it is paused, and send it back.
    Save {
        msr_index_list: Vec<u32>,
        reply: Sender<SaveReply>,
    },
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, for the kick signal handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let flag = IMMEDIATE_EXIT.with(Cell::get);
    if !flag.is_null() {
        // The pointer is set by this same thread to a byte of its
        // own mmapped kvm_run, which outlives the registration (it is
        // cleared before the VcpuFd is dropped). A volatile byte store is
        // async-signal-safe.
        // SAFETY: sound for the reasons just given.
        unsafe { flag.write_volatile(1) };
    }
}

/// The signal that kicks vCPU threads out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

fn register_kick_handler() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| result = register_signal_handler(kick_signal(), kick_handler));
    result.map_err(VcpuError::Signal)
}

/// Everything a vCPU thread needs.
pub struct Vcpu {
    pub id: u8,
    pub fd: VcpuFd,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    /// Where stops are reported, with `stop_evt` written to wake the VM.
    pub stops: Sender<VcpuStop>,
    pub stop_evt: EventFd,
}

/// The VM's side of a vCPU thread.
pub struct VcpuHandle {
    id: u8,
    commands: Sender<Request>,
    acks: Receiver<VcpuState>,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    /// Starts the vCPU's thread, in state Created.
    pub fn spawn(vcpu: Vcpu) -> Result<Self, VcpuError> {
        register_kick_handler()?;
        let id = vcpu.id;
        let (commands, command_rx) = mpsc::channel();
        let (ack_tx, acks) = mpsc::channel();
        let span = tracing::Span::current();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || span.in_scope(|| vcpu.run(command_rx, ack_tx)))
            .map_err(|e| VcpuError::Spawn(id, e))?;
        Ok(VcpuHandle {
            id,
            commands,
            acks,
            thread: Some(thread),
        })
    }

    pub fn id(&self) -> u8 {
        self.id
    }

    /// Sends a command and kicks the thread out of KVM_RUN. A Resume
    /// needs no kick: only a thread that is not running waits for it, on
    /// the channel (a kick would only cost its first KVM_RUN an EINTR).
    pub fn send(&self, cmd: VcpuCommand) -> Result<(), VcpuError> {
        self.commands
            .send(Request::Command(cmd))
            .map_err(|_| VcpuError::Gone(self.id))?;
        if cmd != VcpuCommand::Resume {
            self.kick();
        }
        Ok(())
    }

    fn kick(&self) {
        if let Some(t) = &self.thread {
            // A thread that already left KVM_RUN picks the request up from
            // the channel; a failed kick of a finished thread is harmless.
            let _ = t.kill(kick_signal());
        }
    }

    /// Reads the vCPU's KVM state on its thread; `msr_index_list` is
    /// KVM_GET_MSR_INDEX_LIST's answer ([`vcpu_state::save`]). Only a
    /// paused vCPU answers with its state; any other gives
    /// [`VcpuError::NotPaused`] (a running one is kicked out of KVM_RUN to
    /// answer, and goes on running).
    ///
    /// The state is consistent: a vCPU only pauses after a KVM_RUN that
    /// returned EINTR, and on x86 KVM completes a port or MMIO access it
    /// handed to us (the instruction's result, RIP past it) before it
    /// checks `immediate_exit` and returns.
    pub fn save_state(
        &self,
        msr_index_list: &[u32],
        timeout: Duration,
    ) -> Result<vcpu_state::VcpuState, VcpuError> {
        let (reply, answer) = mpsc::channel();
        self.commands
            .send(Request::Save {
                msr_index_list: msr_index_list.to_vec(),
                reply,
            })
            .map_err(|_| VcpuError::Gone(self.id))?;
        self.kick();
        match answer.recv_timeout(timeout) {
            Ok(result) => result,
            Err(RecvTimeoutError::Timeout) => Err(VcpuError::Timeout(self.id, timeout)),
            Err(RecvTimeoutError::Disconnected) => Err(VcpuError::Gone(self.id)),
        }
    }

    /// Waits for the thread to acknowledge a state.
    pub fn wait_for(&self, state: VcpuState, timeout: Duration) -> Result<(), VcpuError> {
        loop {
            match self.acks.recv_timeout(timeout) {
                Ok(s) if s == state => return Ok(()),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => return Err(VcpuError::Timeout(self.id, timeout)),
                Err(RecvTimeoutError::Disconnected) => return Err(VcpuError::Gone(self.id)),
            }
        }
    }

    /// Stops the thread and waits for it to end.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.commands.send(Request::Command(VcpuCommand::Stop));
            let _ = t.kill(kick_signal());
            if t.join().is_err() {
                tracing::error!(vcpu = self.id, "vCPU thread panicked");
            }
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// What the exit handler decided.
enum Next {
    Continue,
    Stop(StopReason),
}

impl Vcpu {
    fn run(mut self, commands: Receiver<Request>, acks: Sender<VcpuState>) {
        let flag: *mut u8 = &mut self.fd.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|c| c.set(flag));
        let mut state = VcpuState::Created;
        let ack = |s| {
            let _ = acks.send(s);
        };
        loop {
            state = match state {
                VcpuState::Created | VcpuState::Paused => match commands.recv() {
                    Ok(Request::Command(VcpuCommand::Resume)) => {
                        ack(VcpuState::Running);
                        VcpuState::Running
                    }
                    Ok(Request::Command(VcpuCommand::Pause)) => {
                        ack(VcpuState::Paused);
                        VcpuState::Paused
                    }
                    Ok(Request::Command(VcpuCommand::Stop)) | Err(_) => break,
                    Ok(Request::Save {
                        msr_index_list,
                        reply,
                    }) => {
                        self.answer_save(state, &msr_index_list, &reply);
                        state
                    }
                },
                VcpuState::Running => match self.run_once() {
                    Ok(Next::Continue) => VcpuState::Running,
                    Ok(Next::Stop(reason)) => {
                        self.report(reason);
                        ack(VcpuState::Stopped);
                        VcpuState::Stopped
                    }
                    Err(Interrupted) => {
                        self.fd.set_kvm_immediate_exit(0);
                        let mut next = VcpuState::Running;
                        while let Ok(req) = commands.try_recv() {
                            next = match req {
                                Request::Command(VcpuCommand::Resume) => VcpuState::Running,
                                Request::Command(VcpuCommand::Pause) => VcpuState::Paused,
                                Request::Command(VcpuCommand::Stop) => VcpuState::Stopped,
                                // Answered in the state the requests before
                                // it left: out of KVM_RUN either way.
                                Request::Save {
                                    msr_index_list,
                                    reply,
                                } => {
                                    self.answer_save(next, &msr_index_list, &reply);
                                    next
                                }
                            };
                        }
                        if next == VcpuState::Stopped {
                            break;
                        }
                        if next != VcpuState::Running {
                            ack(next);
                        }
                        next
                    }
                },
                VcpuState::Stopped => match commands.recv() {
                    Ok(Request::Command(VcpuCommand::Stop)) | Err(_) => break,
                    Ok(Request::Command(_)) => {
                        ack(VcpuState::Stopped);
                        VcpuState::Stopped
                    }
                    Ok(Request::Save {
                        msr_index_list,
                        reply,
                    }) => {
                        self.answer_save(state, &msr_index_list, &reply);
                        state
                    }
                },
            };
        }
        IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
        ack(VcpuState::Stopped);
    }

    /// Saves the vCPU's state if it is paused, and answers.
    fn answer_save(&self, state: VcpuState, msr_index_list: &[u32], reply: &Sender<SaveReply>) {
        let result = if state == VcpuState::Paused {
            vcpu_state::save(&self.fd, msr_index_list).map_err(|e| VcpuError::Save(self.id, e))
        } else {
            Err(VcpuError::NotPaused(self.id, state))
        };
        // The owner may have stopped waiting.
        let _ = reply.send(result);
    }

    fn report(&self, reason: StopReason) {
        let _ = self.stops.send(VcpuStop {
            vcpu: self.id,
            reason,
        });
        if let Err(e) = self.stop_evt.write(1) {
            tracing::error!(vcpu = self.id, "cannot wake the VM: {e}");
        }
    }

    /// One KVM_RUN and the handling of its exit.
    fn run_once(&mut self) -> Result<Next, Interrupted> {
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return Err(Interrupted);
            }
            Err(e) => {
                return Ok(Next::Stop(StopReason::Error(format!(
                    "KVM_RUN failed: {e}"
                ))));
            }
        };
        let special = match exit {
            VcpuExit::IoIn(port, data) => {
                self.pio.read(u64::from(port), data);
                None
            }
            VcpuExit::IoOut(port, data) => {
                self.pio.write(u64::from(port), data);
                None
            }
            VcpuExit::MmioRead(addr, data) => {
                self.mmio.read(addr, data);
                None
            }
            VcpuExit::MmioWrite(addr, data) => {
                self.mmio.write(addr, data);
                None
            }
            VcpuExit::SystemEvent(kind, _) => Some(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN | KVM_SYSTEM_EVENT_RESET => StopReason::GuestShutdown,
                KVM_SYSTEM_EVENT_CRASH => StopReason::GuestCrash,
                other => StopReason::Error(format!("unknown KVM system event {other}")),
            }),
            VcpuExit::Shutdown => Some(StopReason::TripleFault { rip: None }),
            VcpuExit::InternalError => Some(StopReason::InternalError {
                suberror: 0,
                rip: None,
                data: Vec::new(),
            }),
            VcpuExit::FailEntry(reason, _) => Some(StopReason::FailEntry { reason }),
            VcpuExit::Hlt => Some(StopReason::Error(
                "the vCPU halted outside the in-kernel interrupt controller".into(),
            )),
            VcpuExit::Intr => return Err(Interrupted),
            other => Some(StopReason::Error(format!("unhandled exit {other:?}"))),
        };
        Ok(match special {
            None => Next::Continue,
            Some(reason) => Next::Stop(self.with_details(reason)),
        })
    }

    /// Fills in the registers and KVM's own report, now that the exit's
    /// borrow of the vCPU is over.
    fn with_details(&mut self, reason: StopReason) -> StopReason {
        let rip = self.fd.get_regs().ok().map(|r| r.rip);
        match reason {
            StopReason::TripleFault { .. } => StopReason::TripleFault { rip },
            StopReason::InternalError { .. } => {
                let run = self.fd.get_kvm_run();
                // The last exit was KVM_EXIT_INTERNAL_ERROR, for which
                // KVM fills the `internal` member of the exit union.
                // SAFETY: sound for the reasons just given.
                let internal = unsafe { run.__bindgen_anon_1.internal };
                let n = (internal.ndata as usize).min(internal.data.len());
                StopReason::InternalError {
                    suberror: internal.suberror,
                    rip,
                    data: internal.data[..n].to_vec(),
                }
            }
            other => other,
        }
    }
}

/// KVM_RUN returned because of a kick or a signal.
struct Interrupted;

/// A human sentence for KVM's internal error sub-codes.
pub fn describe_internal_error(suberror: u32) -> &'static str {
    match suberror {
        1 => "KVM's instruction emulator could not run a guest instruction",
        2 => "an exception occurred while KVM was delivering another one",
        3 => "KVM could not deliver an event to the guest",
        4 => "KVM saw a hardware exit it does not know",
        _ => "KVM stopped the vCPU",
    }
}
