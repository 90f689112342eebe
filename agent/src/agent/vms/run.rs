//! Starting a VM's VMM, learning how it ended, and the restart policy.

use super::{Exit, MAX_RESTARTS, RESTART_DELAY, Vms, crash_point, wait_ready};
use crate::agent::error::ApiError;
use crate::agent::model::{Restart, VmRecord, VmState};
use crate::agent::process::{self, Pid};
use crate::agent::tokens::Caller;
use std::sync::Arc;

impl Vms {
    pub async fn start(self: &Arc<Self>, caller: &Caller, id: &str) -> Result<VmRecord, ApiError> {
        let (_held, mut rec) = self.locked(caller, id).await?;
        if !matches!(
            rec.state,
            VmState::Created | VmState::Stopped | VmState::Crashed
        ) {
            return Err(ApiError::Conflict(format!(
                "VM {id} is {}: only a created, stopped or crashed VM starts",
                rec.state.as_str()
            )));
        }
        rec.restarts = 0;
        rec.restart_pending = false;
        self.start_locked(rec).await
    }

    fn vmm_args(&self, rec: &VmRecord) -> Vec<std::ffi::OsString> {
        let c = &rec.config;
        let mut args: Vec<std::ffi::OsString> = vec!["run".into()];
        match &c.snapshot {
            Some(dir) => {
                args.push("--restore".into());
                args.push(dir.into());
            }
            None => {
                if let Some(k) = &c.kernel {
                    args.push("--kernel".into());
                    args.push(k.into());
                }
                if let Some(i) = &c.initrd {
                    args.push("--initrd".into());
                    args.push(i.into());
                }
                args.push("--cmdline".into());
                args.push(c.cmdline.clone().into());
                args.push("--vcpus".into());
                args.push(c.vcpus.to_string().into());
                args.push("--mem".into());
                args.push(c.mem_mib.to_string().into());
            }
        }
        for mac in &c.nets {
            args.push("--net".into());
            args.push(mac.into());
        }
        args.push("--control".into());
        args.push(rec.control.clone().into());
        args.push("--serial-file".into());
        args.push(rec.console.clone().into());
        args.push("--no-stdin".into());
        args
    }

    /// Starts the VMM of `rec` (whose lock the caller holds) and waits for
    /// its control socket. (Boxed: a start may end in a restart, which
    /// starts again.)
    pub(super) fn start_locked(
        self: &Arc<Self>,
        rec: VmRecord,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<VmRecord, ApiError>> + Send + '_>> {
        Box::pin(self.start_inner(rec))
    }

    async fn start_inner(self: &Arc<Self>, mut rec: VmRecord) -> Result<VmRecord, ApiError> {
        // Recorded before the VMM is spawned (a create records its VM as
        // starting already). Its pid is recorded with its start once it
        // answers: an agent that dies before finds it by its control
        // socket's path.
        if rec.state != VmState::Starting || rec.pid.is_some() || rec.reason.is_some() {
            rec.state = VmState::Starting;
            rec.pid = None;
            rec.pid_start = None;
            rec.reason = None;
            self.store.put_vm(&rec)?;
        }
        let log = rec.dir().join("vmm.log");
        // The VMM truncates its console file: keep the previous boot's
        // (a crash's last words) beside it.
        if std::fs::metadata(&rec.console).is_ok_and(|m| m.len() > 0) {
            let _ = std::fs::rename(&rec.console, rec.dir().join("console.log.prev"));
        }
        let (mut child, pid) = match process::spawn(&self.exe, &self.vmm_args(&rec), &log) {
            Ok(x) => x,
            Err(e) => {
                rec.state = VmState::Crashed;
                rec.last_exit = Some(crate::cli::chain(&e));
                self.store.put_vm(&rec)?;
                return Err(ApiError::Failed(crate::cli::chain(&e)));
            }
        };
        crash_point("create:spawned");
        rec.pid = Some(pid.pid);
        rec.pid_start = Some(pid.start);
        rec.started_at = Some(crate::agent::model::now());
        // Until it answers, an exit is a failed start (whose status tells
        // bad input, 1, from the rest).
        let ready = tokio::select! {
            status = child.wait() => Err(status.ok()),
            ready = wait_ready(&rec.control, pid) => Ok(ready),
        };
        let failure = match ready {
            Ok(Ok(())) => {
                // Reap it, and learn how it ends.
                let vms = self.clone();
                let id = rec.id.clone();
                tokio::spawn(async move {
                    if let Ok(status) = child.wait().await {
                        vms.ended(&id, pid, Exit::Status(status)).await;
                    }
                });
                rec.state = VmState::Running;
                self.store.put_vm(&rec)?;
                self.emit(&rec, "started", None);
                return Ok(rec);
            }
            // It ended (seen by pid before the reaper saw it), or it
            // did not answer in time and is killed.
            Ok(Err(e)) => {
                let ended = matches!(e, process::ProcessError::EndedAtStart(_));
                if !ended {
                    let _ = child.start_kill();
                }
                let status = child.wait().await.ok();
                match status {
                    Some(s) if ended => (Some(s), process::describe(s)),
                    _ => (None, crate::cli::chain(&e)),
                }
            }
            Err(status) => (
                status,
                status.map_or_else(|| "it ended".into(), process::describe),
            ),
        };
        let (status, how) = failure;
        rec.state = VmState::Crashed;
        rec.pid = None;
        rec.pid_start = None;
        let why = format!("{how}: {}", process::log_tail(&log));
        rec.last_exit = Some(why.clone());
        rec.reason = Some("crashed".into());
        self.store.put_vm(&rec)?;
        let msg = format!("VM {} did not start: {why}", rec.id);
        // vmplant run exits 1 on bad input (a file that is no kernel, a
        // snapshot that does not load).
        Err(if status.and_then(|s| s.code()) == Some(1) {
            ApiError::BadRequest(msg)
        } else {
            ApiError::Failed(msg)
        })
    }

    /// A VMM process ended: record how, and apply the restart policy.
    pub(super) async fn ended(self: &Arc<Self>, id: &str, pid: Pid, exit: Exit) {
        if !matches!(self.store.get_vm(id), Ok(Some(_))) {
            return;
        }
        let lock = self.lock_of(id);
        let held = lock.lock().await;
        let Ok(Some(mut rec)) = self.store.get_vm(id) else {
            return;
        };
        if rec.pid != Some(pid.pid) || rec.pid_start != Some(pid.start) || !rec.state.has_process()
        {
            // An operation that ended it has recorded it already.
            return;
        }
        let (clean, how) = match exit {
            Exit::Status(s) => (s.success(), process::describe(s)),
            // A VMM that ends by itself removes its control socket; one
            // that was killed leaves it behind.
            Exit::Unknown if !rec.control.exists() => (
                true,
                "ended while the agent was away (its control socket was removed)".into(),
            ),
            Exit::Unknown => (
                false,
                "ended while the agent was away, leaving its control socket (killed?)".into(),
            ),
        };
        let asked = rec.state == VmState::Stopping;
        let reason = if clean || asked {
            "shutdown"
        } else {
            "crashed"
        };
        let log = process::log_tail(&rec.dir().join("vmm.log"));
        rec.last_exit = Some(if log.is_empty() || clean {
            how
        } else {
            format!("{how}: {log}")
        });
        rec.state = if reason == "crashed" {
            VmState::Crashed
        } else {
            VmState::Stopped
        };
        rec.reason = Some(reason.into());
        rec.pid = None;
        rec.pid_start = None;
        // Restarts count in a row: one that ran a minute is a fresh start.
        if rec
            .started_at
            .is_some_and(|t| crate::agent::model::now().saturating_sub(t) >= 60)
        {
            rec.restarts = 0;
        }
        if let Err(e) = self.store.put_vm(&rec) {
            tracing::error!(
                vm = id,
                "cannot record the end of the VM: {}",
                crate::cli::chain(&e)
            );
            return;
        }
        self.emit(&rec, "stopped", Some(reason));
        let again = !asked
            && match rec.restart {
                Restart::Never => false,
                Restart::OnFailure => reason == "crashed",
                Restart::Always => true,
            };
        if !again {
            return;
        }
        if rec.restarts >= MAX_RESTARTS {
            tracing::warn!(
                vm = id,
                "not restarted: it ended {MAX_RESTARTS} times in a row"
            );
            return;
        }
        rec.restart_pending = true;
        if let Err(e) = self.store.put_vm(&rec) {
            tracing::error!(
                vm = id,
                "cannot record the restart: {}",
                crate::cli::chain(&e)
            );
        }
        drop(held);
        self.restart_later(id.to_owned(), rec.restarts);
    }

    /// Starts VM `id` again after [`RESTART_DELAY`], unless someone
    /// started, stopped or deleted it meanwhile.
    pub(super) fn restart_later(self: &Arc<Self>, id: String, restarts: u32) {
        let vms = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(RESTART_DELAY).await;
            if !matches!(vms.store.get_vm(&id), Ok(Some(_))) {
                return;
            }
            let lock = vms.lock_of(&id);
            let _held = lock.lock().await;
            let Ok(Some(mut rec)) = vms.store.get_vm(&id) else {
                return;
            };
            // Unless someone started, stopped or deleted it meanwhile.
            if !matches!(rec.state, VmState::Stopped | VmState::Crashed)
                || rec.restarts != restarts
                || !rec.restart_pending
            {
                return;
            }
            rec.restarts += 1;
            rec.restart_pending = false;
            tracing::info!(vm = %id, restarts = rec.restarts, "restarting ({:?} policy)", rec.restart);
            if let Err(e) = vms.start_locked(rec).await {
                tracing::warn!(vm = %id, "restart failed: {}", crate::cli::chain(&e));
            }
        });
    }
}
