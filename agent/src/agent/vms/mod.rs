//! The VMs: their lifecycle, carried out on their VMM processes through
//! the control sockets, each change recorded before it is acted on.
//!
//! Every operation on one VM holds that VM's lock from its first record
//! to its last, so that operations, process exits and restarts on one VM
//! happen one after another.

use super::error::ApiError;
use super::model::{
    CloneReq, CreateVm, Created, Event, Restart, SnapshotRecord, SnapshotTaken, VmConfig, VmRecord,
    VmState,
};
use super::process::{self, Pid};
use super::store::Store;
use super::tokens::{Caller, Role};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;
use vmm::control::{self, Request};

mod adopt;
mod run;

/// How long a new VMM has to answer on its control socket.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a stopped VMM has to end before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the restart policy waits before starting a VM again, and how
/// many restarts it makes in a row before it gives up.
const RESTART_DELAY: Duration = Duration::from_millis(500);
const MAX_RESTARTS: u32 = 5;
/// How much of each console log is kept.
pub const CONSOLE_KEEP: u64 = 1 << 20;

/// For tests of the reconciliation: `VMPLANT_AGENT_CRASH_AT=POINT` makes
/// the agent SIGKILL itself at POINT: `create:spawned`
/// (a VMM started, its pid not yet recorded), `snapshot:saved` (the VMM
/// saved a snapshot, not yet recorded as done), `destroy:recorded` (a
/// destroy recorded, the VMM not yet asked to stop).
fn crash_point(point: &str) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let at = AT.get_or_init(|| std::env::var("VMPLANT_AGENT_CRASH_AT").ok());
    if at.as_deref() == Some(point) {
        tracing::warn!("VMPLANT_AGENT_CRASH_AT={point}: killing the agent");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        std::process::abort();
    }
}

/// The agent's VMs.
pub struct Vms {
    pub store: Store,
    pub state_dir: PathBuf,
    exe: PathBuf,
    /// Where tenants' kernels and initrds must be (admins' may be
    /// anywhere), canonical.
    kernel_dirs: Vec<PathBuf>,
    pub events: broadcast::Sender<Event>,
    locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Held from a create's quota check to its record.
    create: tokio::sync::Mutex<()>,
}

/// How a VMM process ended: its status if the agent is its parent.
#[derive(Debug, Clone, Copy)]
enum Exit {
    Status(std::process::ExitStatus),
    /// Watched by pid after an agent restart: no status.
    Unknown,
}

impl Vms {
    pub fn new(
        store: Store,
        state_dir: PathBuf,
        exe: PathBuf,
        kernel_dirs: Vec<PathBuf>,
    ) -> Arc<Vms> {
        Arc::new(Vms {
            store,
            state_dir,
            exe,
            kernel_dirs,
            events: broadcast::channel(1024).0,
            locks: Default::default(),
            create: Default::default(),
        })
    }

    fn lock_of(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(id.to_owned()).or_default().clone()
    }

    fn emit(&self, rec: &VmRecord, event: &str, reason: Option<&str>) {
        let time_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        tracing::info!(vm = %rec.id, tenant = %rec.tenant, reason, "{event}");
        let _ = self.events.send(Event {
            event: event.into(),
            id: rec.id.clone(),
            tenant: rec.tenant.clone(),
            reason: reason.map(String::from),
            time_ms,
        });
    }

    /// VM `id`'s lock, held, and its record, if `caller` may see it
    /// (others are 404). No lock is made for an id that has no record.
    async fn locked(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<(tokio::sync::OwnedMutexGuard<()>, VmRecord), ApiError> {
        self.visible(caller, id)?;
        let held = self.lock_of(id).lock_owned().await;
        // It may have been deleted while we waited.
        let rec = self.visible(caller, id)?;
        Ok((held, rec))
    }

    /// The record of VM `id` if `caller` may see it (others are 404).
    pub fn visible(&self, caller: &Caller, id: &str) -> Result<VmRecord, ApiError> {
        match self.store.get_vm(id)? {
            Some(rec) if caller.sees(&rec.tenant) => Ok(rec),
            _ => Err(ApiError::no_vm(id)),
        }
    }

    pub fn list(&self, caller: &Caller) -> Result<Vec<VmRecord>, ApiError> {
        let mut vms: Vec<VmRecord> = self
            .store
            .vms()?
            .into_iter()
            .filter(|v| caller.sees(&v.tenant))
            .collect();
        vms.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(vms)
    }

    // ---- create ----

    pub async fn create(
        self: &Arc<Self>,
        caller: &Caller,
        req: CreateVm,
    ) -> Result<Created, ApiError> {
        let config = match &req.snapshot {
            Some(dir) => {
                let snap = self.snapshot_for(caller, Path::new(dir))?;
                if req.kernel.is_some() || req.initrd.is_some() || req.cmdline.is_some() {
                    return Err(ApiError::BadRequest(
                        "a VM restored from a snapshot takes no kernel, initrd or cmdline".into(),
                    ));
                }
                VmConfig {
                    kernel: None,
                    cmdline: String::new(),
                    initrd: None,
                    nets: req.nets.clone().unwrap_or_default(),
                    snapshot: Some(snap.dir.clone()),
                    ..snap.config
                }
            }
            None => {
                let Some(kernel) = &req.kernel else {
                    return Err(ApiError::BadRequest(
                        "a VM needs a \"kernel\" (or a \"snapshot\" to restore)".into(),
                    ));
                };
                VmConfig {
                    kernel: Some(self.boot_file(caller, "kernel", kernel)?),
                    cmdline: req
                        .cmdline
                        .clone()
                        .unwrap_or_else(|| "console=ttyS0".into()),
                    vcpus: req.vcpus.unwrap_or(1),
                    mem_mib: req.mem_mib.unwrap_or(128),
                    initrd: req
                        .initrd
                        .as_deref()
                        .map(|i| self.boot_file(caller, "initrd", i))
                        .transpose()?,
                    nets: req.nets.clone().unwrap_or_default(),
                    snapshot: None,
                }
            }
        };
        if req.snapshot.is_some() && (req.vcpus.is_some() || req.mem_mib.is_some()) {
            return Err(ApiError::BadRequest(
                "a VM restored from a snapshot has its snapshot's vcpus and mem_mib".into(),
            ));
        }
        self.create_with(
            caller,
            config,
            req.restart.unwrap_or_default(),
            req.start.unwrap_or(true),
        )
        .await
    }

    pub async fn clone_vm(
        self: &Arc<Self>,
        caller: &Caller,
        id: &str,
        req: CloneReq,
    ) -> Result<Created, ApiError> {
        let src = self.visible(caller, id)?;
        let dir = match &req.snapshot {
            Some(d) => {
                let d = PathBuf::from(d);
                if !src.snapshots.contains(&d) {
                    return Err(ApiError::BadRequest(format!(
                        "{d:?} is not a snapshot of VM {id}"
                    )));
                }
                d
            }
            None => src.snapshots.last().cloned().ok_or_else(|| {
                ApiError::Conflict(format!("VM {id} has no snapshot to clone (take one first)"))
            })?,
        };
        let snap = self.snapshot_for(caller, &dir)?;
        let config = VmConfig {
            kernel: None,
            cmdline: String::new(),
            initrd: None,
            nets: Vec::new(),
            snapshot: Some(snap.dir),
            ..snap.config
        };
        self.create_with(
            caller,
            config,
            req.restart.unwrap_or_default(),
            req.start.unwrap_or(true),
        )
        .await
    }

    fn snapshot_for(&self, caller: &Caller, dir: &Path) -> Result<SnapshotRecord, ApiError> {
        match self.store.get_snapshot(dir)? {
            Some(s) if s.complete && caller.sees(&s.tenant) => Ok(s),
            _ => Err(ApiError::NotFound(format!(
                "no snapshot {dir:?} taken by this agent for tenant {:?}",
                caller.tenant
            ))),
        }
    }

    async fn create_with(
        self: &Arc<Self>,
        caller: &Caller,
        config: VmConfig,
        restart: Restart,
        start: bool,
    ) -> Result<Created, ApiError> {
        check_config(&config)?;
        // The new VM's lock is held from before its record exists, so
        // that nothing else acts on it before it has started.
        let id = new_id();
        let held = self.lock_of(&id).lock_owned().await;
        let rec = {
            let _quota = self.create.lock().await;
            if let Err(e) = self.check_quota(caller, &config) {
                drop(held);
                self.locks
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                return Err(e);
            }
            let mut rec =
                VmRecord::new(id, caller.tenant.clone(), config, restart, &self.state_dir);
            if start {
                rec.state = VmState::Starting;
            }
            self.store.put_vm(&rec)?;
            rec
        };
        self.emit(&rec, "created", None);
        if !start {
            return Ok(Created {
                id: rec.id,
                state: VmState::Created,
            });
        }
        let rec = self.start_locked(rec).await?;
        drop(held);
        Ok(Created {
            id: rec.id,
            state: rec.state,
        })
    }

    /// A kernel or initrd the caller may boot: an existing file, for a
    /// tenant inside one of the agent's `--kernel-dir`s (resolved, so no
    /// `..` or symlink leads out), so that no tenant hands its guest a
    /// host file it should not read.
    fn boot_file(&self, caller: &Caller, what: &str, path: &str) -> Result<PathBuf, ApiError> {
        let p = PathBuf::from(path);
        if !p.is_absolute() {
            return Err(ApiError::BadRequest(format!(
                "the {what} {path:?} is not an absolute path"
            )));
        }
        let inside = |real: &Path| self.kernel_dirs.iter().any(|d| real.starts_with(d));
        match std::fs::canonicalize(&p) {
            Ok(real) if !caller.is_admin() && !inside(&real) => Err(ApiError::Forbidden(format!(
                "a tenant's {what} must be in one of the agent's kernel directories ({})",
                self.kernel_dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
            Ok(real) if real.is_file() => Ok(p),
            _ if !caller.is_admin() && !self.kernel_dirs.iter().any(|d| p.starts_with(d)) => {
                // Say nothing of what exists outside.
                Err(ApiError::Forbidden(format!(
                    "a tenant's {what} must be in one of the agent's kernel directories"
                )))
            }
            _ => Err(ApiError::BadRequest(format!(
                "the {what} {path:?} is not a file"
            ))),
        }
    }

    fn check_quota(&self, caller: &Caller, config: &VmConfig) -> Result<(), ApiError> {
        let q = caller.quota;
        if q == Default::default() {
            return Ok(());
        }
        let mine: Vec<VmRecord> = self
            .store
            .vms()?
            .into_iter()
            .filter(|v| v.tenant == caller.tenant)
            .collect();
        let vms = mine.len() as u64 + 1;
        let vcpus =
            mine.iter().map(|v| u64::from(v.config.vcpus)).sum::<u64>() + u64::from(config.vcpus);
        let mem = mine.iter().map(|v| v.config.mem_mib).sum::<u64>() + config.mem_mib;
        let over = |what: &str, limit: u64, would: u64| {
            ApiError::Quota(format!(
                "quota exceeded: tenant {:?} may have {what} {limit}, this VM would make it {would}",
                caller.tenant
            ))
        };
        if let Some(limit) = q.vms.map(u64::from).filter(|l| vms > *l) {
            return Err(over("vms", limit, vms));
        }
        if let Some(limit) = q.vcpus.filter(|l| vcpus > *l) {
            return Err(over("vcpus", limit, vcpus));
        }
        if let Some(limit) = q.mem_mib.filter(|l| mem > *l) {
            return Err(over("mem_mib", limit, mem));
        }
        Ok(())
    }

    // ---- pause, resume, stop, snapshot ----

    /// Runs a control request on VM `id`'s VMM.
    async fn control(rec: &VmRecord, request: Request) -> Result<serde_json::Value, ApiError> {
        let path = rec.control.clone();
        tokio::task::spawn_blocking(move || control::call(&path, &request))
            .await
            .map_err(|e| ApiError::Failed(e.to_string()))?
            .map_err(|e| ApiError::Failed(format!("VM {}: {}", rec.id, crate::cli::chain(&e))))
    }

    fn need(rec: &VmRecord, states: &[VmState], op: &str) -> Result<(), ApiError> {
        if states.contains(&rec.state) {
            Ok(())
        } else {
            Err(ApiError::Conflict(format!(
                "VM {} is {}: cannot {op} it",
                rec.id,
                rec.state.as_str()
            )))
        }
    }

    pub async fn pause(
        &self,
        caller: &Caller,
        id: &str,
        pause: bool,
    ) -> Result<VmRecord, ApiError> {
        let (_held, mut rec) = self.locked(caller, id).await?;
        let (op, req, to, event) = if pause {
            ("pause", Request::Pause, VmState::Paused, "paused")
        } else {
            ("resume", Request::Resume, VmState::Running, "resumed")
        };
        Self::need(&rec, &[VmState::Running, VmState::Paused], op)?;
        // The VMM holds the truth about pausing (adoption asks it), so
        // the record follows the act.
        Self::control(&rec, req).await?;
        if rec.state != to {
            rec.state = to;
            self.store.put_vm(&rec)?;
            self.emit(&rec, event, None);
        }
        Ok(rec)
    }

    pub async fn stop(&self, caller: &Caller, id: &str) -> Result<VmRecord, ApiError> {
        let (_held, mut rec) = self.locked(caller, id).await?;
        Self::need(
            &rec,
            &[VmState::Running, VmState::Paused, VmState::Stopping],
            "stop",
        )?;
        rec.state = VmState::Stopping;
        self.store.put_vm(&rec)?;
        self.end_process(&rec).await;
        rec.state = VmState::Stopped;
        rec.reason = Some("shutdown".into());
        rec.last_exit = Some("stopped through the API".into());
        rec.pid = None;
        rec.pid_start = None;
        self.store.put_vm(&rec)?;
        self.emit(&rec, "stopped", Some("shutdown"));
        Ok(rec)
    }

    /// Ends the VMM of `rec`: a stop request, then SIGKILL if it does
    /// not end in time (or does not answer).
    async fn end_process(&self, rec: &VmRecord) {
        let Some(pid) = recorded_pid(rec).or_else(|| process::find_by_control(&rec.control)) else {
            return;
        };
        if !pid.alive() {
            return;
        }
        if Self::control(rec, Request::Stop).await.is_err() || !pid.wait_gone(STOP_TIMEOUT).await {
            tracing::warn!(vm = %rec.id, "the VMM did not stop: killing it");
            pid.kill();
            pid.wait_gone(STOP_TIMEOUT).await;
        }
        // A killed VMM leaves its socket.
        let _ = std::fs::remove_file(&rec.control);
    }

    pub async fn destroy(&self, caller: &Caller, id: &str) -> Result<(), ApiError> {
        let (_held, mut rec) = self.locked(caller, id).await?;
        let had_process = rec.state.has_process();
        rec.state = VmState::Destroying;
        self.store.put_vm(&rec)?;
        crash_point("destroy:recorded");
        self.finish_destroy(&rec).await?;
        if had_process {
            self.emit(&rec, "stopped", Some("destroyed"));
        }
        self.emit(&rec, "deleted", None);
        Ok(())
    }

    async fn finish_destroy(&self, rec: &VmRecord) -> Result<(), ApiError> {
        self.end_process(rec).await;
        match std::fs::remove_dir_all(rec.dir()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(ApiError::Failed(format!(
                    "cannot remove {:?}: {e}",
                    rec.dir()
                )));
            }
        }
        self.store.delete_vm(&rec.id)?;
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.remove(&rec.id);
        Ok(())
    }

    pub async fn snapshot(
        &self,
        caller: &Caller,
        id: &str,
        dir: Option<String>,
    ) -> Result<SnapshotTaken, ApiError> {
        self.visible(caller, id)?;
        let dir = match dir {
            Some(d) if caller.role == Role::Admin => {
                let d = PathBuf::from(d);
                if !d.is_absolute() {
                    return Err(ApiError::BadRequest(format!(
                        "{d:?} is not an absolute path"
                    )));
                }
                d
            }
            Some(_) => {
                return Err(ApiError::Forbidden(
                    "only an admin chooses a snapshot's directory".into(),
                ));
            }
            None => {
                let base = self.state_dir.join("snapshots");
                create_private_dir(&base)?;
                base.join(format!("{id}-{}", new_id().trim_start_matches("vm-")))
            }
        };
        let (_held, mut rec) = self.locked(caller, id).await?;
        Self::need(&rec, &[VmState::Running, VmState::Paused], "snapshot")?;
        let mut snap = SnapshotRecord {
            dir: dir.clone(),
            tenant: rec.tenant.clone(),
            vm: rec.id.clone(),
            config: rec.config.clone(),
            complete: false,
        };
        self.store.put_snapshot(&snap)?;
        let saved = match Self::control(
            &rec,
            Request::Snapshot {
                dir: dir.clone(),
                stop: false,
            },
        )
        .await
        {
            Ok(saved) => saved,
            Err(e) => {
                self.store.delete_snapshot(&dir)?;
                return Err(e);
            }
        };
        crash_point("snapshot:saved");
        let num = |k: &str| saved.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        snap.complete = true;
        self.store.put_snapshot(&snap)?;
        rec.snapshots.push(dir.clone());
        self.store.put_vm(&rec)?;
        Ok(SnapshotTaken {
            dir: dir.display().to_string(),
            state_bytes: num("state_bytes"),
            memory_bytes: num("memory_bytes"),
            memory_data_bytes: num("memory_data_bytes"),
            ms: saved.get("ms").and_then(|v| v.as_f64()).unwrap_or(0.0),
        })
    }

    /// Trims the console logs of VMs with a process, every few seconds.
    pub fn trim_consoles(self: &Arc<Self>) {
        let vms = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                if let Ok(all) = vms.store.vms() {
                    for rec in all.iter().filter(|r| r.state.has_process()) {
                        process::trim_console(&rec.console, CONSOLE_KEEP);
                    }
                }
            }
        });
    }
}

fn recorded_pid(rec: &VmRecord) -> Option<Pid> {
    Some(Pid {
        pid: rec.pid?,
        start: rec.pid_start?,
    })
}

/// Waits until the VMM answers on its control socket (or ends).
async fn wait_ready(control: &Path, pid: Pid) -> Result<(), process::ProcessError> {
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    loop {
        if control.exists() {
            let path = control.to_owned();
            let answered =
                tokio::task::spawn_blocking(move || control::call(&path, &Request::Info).is_ok())
                    .await
                    .unwrap_or(false);
            if answered {
                return Ok(());
            }
        }
        if !pid.alive() {
            return Err(process::ProcessError::EndedAtStart("see its log".into()));
        }
        if std::time::Instant::now() > deadline {
            return Err(process::ProcessError::NotReady(READY_TIMEOUT));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn check_config(c: &VmConfig) -> Result<(), ApiError> {
    if c.vcpus == 0 {
        return Err(ApiError::BadRequest("vcpus must be at least 1".into()));
    }
    if c.mem_mib < 16 || c.mem_mib > (1 << 22) {
        return Err(ApiError::BadRequest(format!(
            "mem_mib must be 16..={}, not {}",
            1u64 << 22,
            c.mem_mib
        )));
    }
    for mac in &c.nets {
        let ok = mac.len() == 17
            && mac
                .split(':')
                .all(|b| b.len() == 2 && b.chars().all(|c| c.is_ascii_hexdigit()));
        if !ok {
            return Err(ApiError::BadRequest(format!(
                "{mac:?} is not a MAC address"
            )));
        }
    }
    if c.cmdline.len() > 2048 || c.cmdline.contains('\0') {
        return Err(ApiError::BadRequest(
            "cmdline is too long or holds a NUL".into(),
        ));
    }
    Ok(())
}

pub fn create_private_dir(path: &Path) -> Result<(), ApiError> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
    {
        Ok(()) => Ok(()),
        Err(e) => Err(ApiError::Failed(format!("cannot create {path:?}: {e}"))),
    }
}

/// A new VM id: `vm-` and 12 random hex digits.
pub fn new_id() -> String {
    use std::io::Read;
    let mut b = [0u8; 6];
    let got = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    if got.is_err() {
        // Time and a counter still make ids unique in one agent.
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let t = super::model::now() ^ n.rotate_left(32);
        b.copy_from_slice(&t.to_le_bytes()[..6]);
    }
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("vm-{hex}")
}
