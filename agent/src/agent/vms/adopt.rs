//! Reconciliation at start: the records against the VMM processes there
//! are.

use super::{Exit, Vms, recorded_pid, wait_ready};
use crate::agent::error::ApiError;
use crate::agent::model::VmState;
use crate::agent::process::{self, Pid};
use std::sync::Arc;
use std::time::Duration;
use vmm::control::Request;

/// How long a VMM found running has to answer `info` at adoption.
const ADOPT_TIMEOUT: Duration = Duration::from_secs(2);

impl Vms {
    /// Reconciles the records with the VMM processes there are, at
    /// start: a recorded VM whose process lives and answers is adopted
    /// (and watched by pid), one whose process is gone has ended (and its
    /// restart policy applies), a destroy cut short is finished.
    pub async fn adopt(self: &Arc<Self>) -> Result<(), ApiError> {
        self.finish_snapshots()?;
        for mut rec in self.store.vms()? {
            let lock = self.lock_of(&rec.id);
            let held = lock.lock().await;
            if rec.state == VmState::Destroying {
                tracing::info!(vm = %rec.id, "finishing a destroy cut short");
                self.finish_destroy(&rec).await?;
                continue;
            }
            if !rec.state.has_process() {
                if rec.restart_pending {
                    tracing::info!(vm = %rec.id, "a restart was pending: restarting");
                    self.restart_later(rec.id.clone(), rec.restarts);
                }
                continue;
            }
            let found = recorded_pid(&rec)
                .filter(Pid::alive)
                .or_else(|| process::find_by_control(&rec.control));
            if found.is_none() && rec.state == VmState::Starting && rec.pid.is_none() {
                tracing::warn!(vm = %rec.id, "its start was cut short: no VMM runs");
                rec.state = VmState::Crashed;
                rec.reason = Some("crashed".into());
                rec.last_exit = Some("the agent ended before its VMM was started".into());
                self.store.put_vm(&rec)?;
                continue;
            }
            let Some(pid) = found else {
                // Make the exit handler see it as this process's end.
                let pid = recorded_pid(&rec).unwrap_or(Pid { pid: 0, start: 0 });
                rec.pid = Some(pid.pid);
                rec.pid_start = Some(pid.start);
                self.store.put_vm(&rec)?;
                drop(held);
                self.ended(&rec.id, pid, Exit::Unknown).await;
                continue;
            };
            rec.pid = Some(pid.pid);
            rec.pid_start = Some(pid.start);
            if rec.state == VmState::Stopping {
                self.store.put_vm(&rec)?;
                self.end_process(&rec).await;
                rec.state = VmState::Stopped;
                rec.reason = Some("shutdown".into());
                rec.pid = None;
                rec.pid_start = None;
                self.store.put_vm(&rec)?;
                self.emit(&rec, "stopped", Some("shutdown"));
                continue;
            }
            // A hung VMM must not hold up the others' adoption (nor the
            // API, which is served once all are adopted).
            let info = tokio::time::timeout(ADOPT_TIMEOUT, Self::control(&rec, Request::Info))
                .await
                .unwrap_or_else(|_| {
                    Err(ApiError::Failed(format!(
                        "no answer within {ADOPT_TIMEOUT:?}"
                    )))
                });
            match info {
                Ok(info) => {
                    rec.state = match info.get("state").and_then(|s| s.as_str()) {
                        Some("paused") => VmState::Paused,
                        _ => VmState::Running,
                    };
                    tracing::info!(vm = %rec.id, pid = pid.pid, state = rec.state.as_str(), "adopted");
                }
                Err(e) if rec.state == VmState::Starting => {
                    tracing::info!(vm = %rec.id, pid = pid.pid, "adopted while starting: {e}");
                    self.store.put_vm(&rec)?;
                    drop(held);
                    self.watch(rec.id.clone(), pid);
                    self.finish_start(rec.id.clone(), pid);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(vm = %rec.id, pid = pid.pid, "adopted, but its control socket does not answer: {e}");
                }
            }
            self.store.put_vm(&rec)?;
            drop(held);
            self.watch(rec.id.clone(), pid);
        }
        Ok(())
    }

    /// A VMM adopted before it answered: running once it does.
    fn finish_start(self: &Arc<Self>, id: String, pid: Pid) {
        let vms = self.clone();
        tokio::spawn(async move {
            let Ok(Some(rec)) = vms.store.get_vm(&id) else {
                return;
            };
            let ready = wait_ready(&rec.control, pid).await;
            if !matches!(vms.store.get_vm(&id), Ok(Some(_))) {
                return;
            }
            let lock = vms.lock_of(&id);
            let _held = lock.lock().await;
            let Ok(Some(mut rec)) = vms.store.get_vm(&id) else {
                return;
            };
            if rec.state != VmState::Starting || rec.pid != Some(pid.pid) {
                return;
            }
            match ready {
                Ok(()) => {
                    rec.state = VmState::Running;
                    if vms.store.put_vm(&rec).is_ok() {
                        vms.emit(&rec, "started", None);
                    }
                }
                Err(e) => {
                    tracing::warn!(vm = %id, "the adopted VMM never answered: {e}; killing it");
                    pid.kill();
                }
            }
        });
    }

    /// Snapshots cut short by an agent that died: one whose files are
    /// both there is done (the VMM renames them into place, memory
    /// first, so `state` is there only once all is); one without is
    /// removed.
    fn finish_snapshots(&self) -> Result<(), ApiError> {
        for mut snap in self.store.snapshots()? {
            if snap.complete {
                continue;
            }
            if snap.dir.join("state").is_file() && snap.dir.join("memory").is_file() {
                tracing::info!(dir = %snap.dir.display(), vm = %snap.vm, "completing a snapshot record cut short");
                if let Some(mut rec) = self.store.get_vm(&snap.vm)?
                    && !rec.snapshots.contains(&snap.dir)
                {
                    rec.snapshots.push(snap.dir.clone());
                    self.store.put_vm(&rec)?;
                }
                snap.complete = true;
                self.store.put_snapshot(&snap)?;
            } else {
                tracing::info!(dir = %snap.dir.display(), "removing a snapshot cut short");
                if snap.dir.starts_with(self.state_dir.join("snapshots")) {
                    let _ = std::fs::remove_dir_all(&snap.dir);
                }
                self.store.delete_snapshot(&snap.dir)?;
            }
        }
        Ok(())
    }

    /// Watches a VMM the agent is not the parent of, by pid.
    fn watch(self: &Arc<Self>, id: String, pid: Pid) {
        let vms = self.clone();
        tokio::spawn(async move {
            while pid.alive() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            vms.ended(&id, pid, Exit::Unknown).await;
        });
    }
}
