//! What the API and the records say about VMs: request and response
//! bodies (with their OpenAPI schemas) and the stored records.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use utoipa::ToSchema;

/// What to do when a VM's process ends without being asked to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Restart {
    /// Leave it stopped or crashed.
    #[default]
    Never,
    /// Start it again when it crashed (not when the guest shut down).
    OnFailure,
    /// Start it again whenever it ended without an API stop.
    Always,
}

/// A VM's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    /// Recorded, never started (or `"start": false`).
    Created,
    /// Its VMM process is being started.
    Starting,
    Running,
    Paused,
    /// An API stop is under way.
    Stopping,
    /// Ended: the guest shut down or an API stop.
    Stopped,
    /// Its VMM process ended without being asked to.
    Crashed,
    /// A delete is under way.
    Destroying,
}

impl VmState {
    /// Whether a VMM process should be there.
    pub fn has_process(self) -> bool {
        matches!(
            self,
            VmState::Starting | VmState::Running | VmState::Paused | VmState::Stopping
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Created => "created",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Crashed => "crashed",
            VmState::Destroying => "destroying",
        }
    }
}

/// How a VM is booted: from a kernel, or restored from a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmConfig {
    /// The kernel (ELF vmlinux or bzImage); absent for a restored VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub kernel: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: String,
    pub vcpus: u8,
    pub mem_mib: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub initrd: Option<PathBuf>,
    /// The MACs of the VM's NICs (ports of the VMM's switch).
    #[serde(default)]
    pub nets: Vec<String>,
    /// The snapshot the VM is restored from (a clone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub snapshot: Option<PathBuf>,
}

/// A VM as the agent records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmRecord {
    pub id: String,
    pub tenant: String,
    pub config: VmConfig,
    pub restart: Restart,
    pub state: VmState,
    /// Why it stopped (shutdown, crashed, ...), and the exit as known.
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub last_exit: Option<String>,
    /// Its VMM process, and that process's start time (clock ticks since
    /// boot, /proc/PID/stat field 22) so that a reused pid is not taken
    /// for it.
    #[serde(default)]
    pub pid: Option<u32>,
    #[serde(default)]
    pub pid_start: Option<u64>,
    pub control: PathBuf,
    pub console: PathBuf,
    /// Unix time (s) of creation and of the last start.
    pub created_at: u64,
    #[serde(default)]
    pub started_at: Option<u64>,
    /// Restarts by the restart policy since the last API start.
    #[serde(default)]
    pub restarts: u32,
    /// The restart policy will start it again (survives an agent
    /// restart).
    #[serde(default)]
    pub restart_pending: bool,
    /// Snapshots taken of this VM, oldest first.
    #[serde(default)]
    pub snapshots: Vec<PathBuf>,
}

impl VmRecord {
    pub fn new(
        id: String,
        tenant: String,
        config: VmConfig,
        restart: Restart,
        state_dir: &Path,
    ) -> VmRecord {
        let dir = state_dir.join("vms").join(&id);
        VmRecord {
            control: dir.join("control.sock"),
            console: dir.join("console.log"),
            id,
            tenant,
            config,
            restart,
            state: VmState::Created,
            reason: None,
            last_exit: None,
            pid: None,
            pid_start: None,
            created_at: now(),
            started_at: None,
            restarts: 0,
            restart_pending: false,
            snapshots: Vec::new(),
        }
    }

    /// The VM's own directory in the state dir.
    pub fn dir(&self) -> &Path {
        self.control.parent().unwrap_or(Path::new("/"))
    }

    pub fn view(&self) -> VmView {
        let uptime_s = match (self.state, self.started_at) {
            (VmState::Running | VmState::Paused, Some(t)) => Some(now().saturating_sub(t)),
            _ => None,
        };
        VmView {
            id: self.id.clone(),
            tenant: self.tenant.clone(),
            state: self.state,
            reason: self.reason.clone(),
            last_exit: self.last_exit.clone(),
            config: self.config.clone(),
            restart: self.restart,
            pid: self.pid,
            uptime_s,
            restarts: self.restarts,
            snapshots: self
                .snapshots
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
        }
    }
}

/// A snapshot the agent took, and whose it is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub dir: PathBuf,
    pub tenant: String,
    pub vm: String,
    /// The source VM's configuration (a clone has its vCPUs and memory).
    pub config: VmConfig,
    /// False from before the VMM is asked until it has saved it.
    #[serde(default = "yes")]
    pub complete: bool,
}

fn yes() -> bool {
    true
}

/// Unix time in seconds.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

// ---- API bodies ----

/// `POST /vms`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    /// The kernel to boot, an absolute path (required unless `snapshot`
    /// is given).
    #[serde(default)]
    #[schema(pattern = "^/")]
    pub kernel: Option<String>,
    #[serde(default)]
    pub cmdline: Option<String>,
    /// vCPUs (default 1; a clone has its snapshot's).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 255)]
    pub vcpus: Option<u8>,
    /// Guest memory in MiB (default 128; a clone has its snapshot's).
    #[serde(default)]
    #[schema(minimum = 16, maximum = 4194304)]
    pub mem_mib: Option<u64>,
    /// An initrd, an absolute path.
    #[serde(default)]
    #[schema(pattern = "^/")]
    pub initrd: Option<String>,
    /// MACs of virtio-net NICs (`52:54:00:12:34:56`).
    #[serde(default)]
    #[schema(inline, value_type = Option<Vec<Mac>>)]
    pub nets: Option<Vec<String>>,
    #[serde(default)]
    pub restart: Option<Restart>,
    /// Start it at once (default true).
    #[serde(default)]
    pub start: Option<bool>,
    /// A snapshot (taken by this agent) to restore the VM from.
    #[serde(default)]
    #[schema(pattern = "^/")]
    pub snapshot: Option<String>,
}

/// A MAC address.
#[derive(ToSchema)]
#[schema(pattern = "^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")]
#[allow(dead_code)]
pub struct Mac(String);

/// `POST /vms/{id}/snapshot`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotReq {
    /// Where to save it (an absolute path; admins only). Default: a new
    /// directory under the state dir's `snapshots/`.
    #[serde(default)]
    #[schema(pattern = "^/")]
    pub dir: Option<String>,
}

/// `POST /vms/{id}/clone`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloneReq {
    /// One of the VM's snapshots (default: its latest).
    #[serde(default)]
    #[schema(pattern = "^/")]
    pub snapshot: Option<String>,
    #[serde(default)]
    pub restart: Option<Restart>,
    /// Start it at once (default true).
    #[serde(default)]
    pub start: Option<bool>,
}

/// The answer to a create or a clone.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Created {
    pub id: String,
    pub state: VmState,
}

/// A VM as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VmView {
    pub id: String,
    pub tenant: String,
    pub state: VmState,
    /// Why it stopped: shutdown, crashed or destroyed.
    pub reason: Option<String>,
    /// How its last VMM process ended, as far as the agent knows.
    pub last_exit: Option<String>,
    pub config: VmConfig,
    pub restart: Restart,
    pub pid: Option<u32>,
    /// Seconds since it was started (running or paused VMs).
    pub uptime_s: Option<u64>,
    pub restarts: u32,
    pub snapshots: Vec<String>,
}

/// `GET /vms`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VmList {
    pub vms: Vec<VmView>,
}

/// The answer to a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SnapshotTaken {
    pub dir: String,
    pub state_bytes: u64,
    pub memory_bytes: u64,
    pub memory_data_bytes: u64,
    pub ms: f64,
}

/// `GET /host`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HostView {
    pub vcpus: u32,
    pub mem_total_mib: u64,
    pub mem_free_mib: u64,
    /// VMs the caller can see, and those of them with a process.
    pub vms: u32,
    pub vms_running: u32,
}

/// A lifecycle event (`GET /events`, one JSON object per line).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Event {
    /// created, started, paused, resumed, stopped, deleted.
    pub event: String,
    pub id: String,
    #[serde(skip)]
    pub tenant: String,
    /// For stopped: shutdown, crashed or destroyed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Unix time in milliseconds.
    pub time_ms: u64,
}

/// Every error: a code and a message.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// bad-request, unauthorized, forbidden, not-found, conflict,
    /// quota-exceeded, too-large, failed.
    pub code: String,
    pub message: String,
}
