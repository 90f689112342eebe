//! Snapshots: a VM's state and memory saved to a directory, and a VM
//! restored from one in a fresh process.
//!
//! A snapshot directory holds:
//! - `state`: the [`SnapshotState`] (vCPUs, the in-kernel interrupt
//!   controllers, PIT and clock, the devices, the VM's configuration and
//!   its owner's device plan), framed by `file.rs` (magic, version,
//!   checksum);
//! - `memory`: guest RAM as a sparse file (`memory.rs`), mapped private
//!   and copy-on-write on restore, so restores of one snapshot share the
//!   pages they do not write.
//!
//! A snapshot is taken with the vCPUs paused and the devices quiesced
//! (they touch neither guest memory nor their queues meanwhile). Each
//! virtio device is saved as its transport's registers with the device's
//! live queue positions, plus its own state (a file share's FUSE session);
//! the owner builds the same devices again before a restore, which
//! restarts them where they were. Devices that cannot be saved (a
//! vhost-user share, whose state is in its backend) make the snapshot fail
//! with an error naming them, and the VM goes on.

pub mod file;
pub mod memory;
pub mod vm_state;
pub mod working_set;

use crate::config::VmConfig;
use crate::control::RunState;
use crate::vm::{RunningVm, Vm, VmError};
use crate::x86_64::vcpu_state::{self, VcpuState};
use devices::legacy::SerialPersist;
use devices::virtio::mmio::MmioPersist;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vm_state::KvmVmState;

/// The state file in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// The memory file in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// How long a paused vCPU may take to hand over its state.
const VCPU_SAVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything a restore needs besides guest memory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotState {
    /// The VM as it was configured (its kernel is not loaded again).
    pub config: VmConfig,
    /// What the VM's owner needs to build its devices again, as it wrote
    /// it (the command line's device plan, as JSON).
    pub owner: String,
    pub memory: memory::Layout,
    /// The id the memory file's trailer holds too.
    pub memory_id: [u8; 16],
    pub vm: KvmVmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialPersist,
    /// The virtio devices, in the order they were added.
    pub devices: Vec<DeviceState>,
}

/// One virtio device in a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceState {
    /// The virtio device ID (1 net, 26 fs).
    pub device_type: u32,
    pub transport: MmioPersist,
    /// The device's own state (opaque here; see
    /// `VirtioDevice::save_device`).
    pub device: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot create the snapshot directory {path:?}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    File(#[from] file::StateFileError),
    #[error(transparent)]
    Memory(#[from] memory::MemoryFileError),
    #[error(transparent)]
    KvmState(#[from] vm_state::VmStateError),
    #[error("cannot save the state of vCPU {0}")]
    SaveVcpu(u8, #[source] crate::vcpu::VcpuError),
    #[error("cannot restore the state of vCPU {0}")]
    RestoreVcpu(u8, #[source] vcpu_state::VcpuStateError),
    #[error("cannot list the MSRs KVM can save")]
    MsrList(#[source] kvm_ioctls::Error),
    #[error("virtio device {index} (type {device_type}) cannot be saved: {why}")]
    Device {
        index: usize,
        device_type: u32,
        why: String,
    },
    #[error(
        "the snapshot has {saved} virtio devices of types {saved_types:?}; the VM being restored has {types:?}"
    )]
    Devices {
        saved: usize,
        saved_types: Vec<u32>,
        types: Vec<u32>,
    },
    #[error("cannot restore virtio device {index}")]
    RestoreDevice {
        index: usize,
        #[source]
        source: devices::virtio::mmio::MmioError,
    },
    #[error("the snapshot has {found} vCPU states for {want} vCPUs")]
    VcpuCount { found: usize, want: u8 },
    #[error("the snapshot's memory layout does not match its {0} MiB of guest memory")]
    Layout(u64),
    #[error("cannot restore the serial port")]
    Serial(#[source] devices::legacy::SerialError),
    #[error("cannot create vCPU {0}")]
    CreateVcpu(u8, #[source] kvm_ioctls::Error),
    #[error("the VM has ended")]
    Ended,
    #[error("cannot read random bytes")]
    Random(#[source] std::io::Error),
    #[error(
        "the snapshot directory {path:?} must belong to this user and be writable by no one else"
    )]
    UnsafeDir { path: PathBuf },
}

/// What [`RunningVm::snapshot`] wrote, and how long it took.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Saved {
    pub state_bytes: u64,
    pub memory: memory::Saved,
    /// From the pause to the files being on disk.
    pub took: Duration,
}

fn dir_err(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Dir {
        path: path.to_owned(),
        source,
    }
}

impl RunningVm {
    /// Pauses the VM and saves it into `dir` (created, readable by this
    /// user only, if missing; its `state` and `memory` files are replaced
    /// whole, so VMs restored from the old ones run on), then lets it run
    /// again unless `stay_paused`. `owner` is kept as it is, for the
    /// restore. No other pause, resume or snapshot runs meanwhile.
    pub fn snapshot(&self, dir: &Path, owner: &str, stay_paused: bool) -> Result<Saved, VmError> {
        self.check_can_save()?;
        prepare_dir(dir)?;
        let mut state = self.lock_state();
        let was_running = *state == RunState::Running;
        self.pause_locked(&mut state)?;
        let t0 = Instant::now();
        for t in &self.transports {
            crate::vm::lock(t).quiesce();
        }
        let saved = self
            .save_paused(dir, owner)
            .map(|(state_bytes, memory)| Saved {
                state_bytes,
                memory,
                took: t0.elapsed(),
            });
        for t in &self.transports {
            crate::vm::lock(t).unquiesce();
        }
        // The VM goes on as it was unless asked to stay paused, and always
        // if the snapshot failed.
        if was_running && (!stay_paused || saved.is_err()) {
            self.resume_locked(&mut state)?;
        }
        saved
    }

    /// Refuses, naming it, a device whose state cannot be saved (before
    /// the VM is paused for a snapshot or a migration).
    pub(crate) fn check_can_save(&self) -> Result<(), SnapshotError> {
        for (index, t) in self.transports.iter().enumerate() {
            let t = crate::vm::lock(t);
            if let Err(why) = t.can_snapshot() {
                return Err(SnapshotError::Device {
                    index,
                    device_type: t.device_type(),
                    why,
                });
            }
        }
        Ok(())
    }

    /// The state of the paused VM with its devices quiesced: everything
    /// but guest memory. `memory_id` is what the memory file's trailer
    /// will hold.
    pub(crate) fn capture(
        &self,
        owner: &str,
        memory_id: [u8; 16],
    ) -> Result<SnapshotState, VmError> {
        let msrs = kvm_ioctls::Kvm::new()
            .map_err(VmError::OpenKvm)?
            .get_msr_index_list()
            .map_err(SnapshotError::MsrList)?;
        let handles = self.vcpu_handles();
        if handles.len() != usize::from(self.config.vcpus) {
            return Err(SnapshotError::Ended.into());
        }
        let vcpus = handles
            .iter()
            .map(|v| {
                v.save_state(msrs.as_slice(), VCPU_SAVE_TIMEOUT)
                    .map_err(|e| SnapshotError::SaveVcpu(v.id(), e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        drop(handles);
        Ok(SnapshotState {
            config: self.config.clone(),
            owner: owner.to_owned(),
            memory: memory::layout(self.memory()),
            memory_id,
            vm: KvmVmState::save(&self.fd).map_err(SnapshotError::from)?,
            vcpus,
            serial: crate::vm::lock(&self.serial).save(),
            devices: self
                .transports
                .iter()
                .enumerate()
                .map(|(index, t)| {
                    let t = crate::vm::lock(t);
                    let device = t.save_device().map_err(|why| SnapshotError::Device {
                        index,
                        device_type: t.device_type(),
                        why,
                    })?;
                    Ok(DeviceState {
                        device_type: t.device_type(),
                        transport: t.save(),
                        device,
                    })
                })
                .collect::<Result<_, SnapshotError>>()?,
        })
    }

    fn save_paused(&self, dir: &Path, owner: &str) -> Result<(u64, memory::Saved), VmError> {
        let memory_id = crate::vmgenid::random_bytes().map_err(SnapshotError::Random)?;
        let state = self.capture(owner, memory_id)?;
        // Both files are written under new names, then renamed into place,
        // memory first: a snapshot cut short leaves the old pair, or a new
        // memory file its old state refuses (their ids differ).
        let mem_tmp = NewFile::create(dir, MEMORY_FILE)?;
        let memory = memory::save(self.memory(), &mem_tmp.file, &mem_tmp.path, &memory_id)
            .map_err(SnapshotError::from)?;
        let mut state_tmp = NewFile::create(dir, STATE_FILE)?;
        let state_bytes = file::write(&mut state_tmp.file, &state_tmp.path, &state)
            .map_err(SnapshotError::from)?;
        mem_tmp.rename_to(&dir.join(MEMORY_FILE))?;
        state_tmp.rename_to(&dir.join(STATE_FILE))?;
        // The old snapshot's working set is not this one's (its id says
        // so too): the next restore records this one's.
        let _ = std::fs::remove_file(dir.join(working_set::FILE));
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok((state_bytes, memory))
    }
}

/// Creates `dir` readable by this user only if it is missing, and refuses
/// one that another user could write into (snapshots hold guest memory).
fn prepare_dir(dir: &Path) -> Result<(), SnapshotError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(dir_err(dir)(e)),
    }
    let meta = std::fs::metadata(dir).map_err(dir_err(dir))?;
    if !meta.is_dir() || meta.uid() != nix::unistd::geteuid().as_raw() || meta.mode() & 0o022 != 0 {
        return Err(SnapshotError::UnsafeDir {
            path: dir.to_owned(),
        });
    }
    Ok(())
}

/// A file being written under a new name, renamed into place when done,
/// removed if dropped before.
struct NewFile {
    file: std::fs::File,
    path: PathBuf,
    renamed: bool,
}

impl NewFile {
    /// `dir/.NAME.PID.RANDOM`, created new (never through a link), mode
    /// 0600.
    fn create(dir: &Path, name: &str) -> Result<NewFile, SnapshotError> {
        use std::os::unix::fs::OpenOptionsExt;
        let tag = crate::vmgenid::random_bytes().map_err(SnapshotError::Random)?;
        let path = dir.join(format!(
            ".{name}.{}.{:016x}",
            std::process::id(),
            u64::from_le_bytes(tag[..8].try_into().unwrap_or_default())
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(dir_err(&path))?;
        Ok(NewFile {
            file,
            path,
            renamed: false,
        })
    }

    fn rename_to(mut self, to: &Path) -> Result<(), SnapshotError> {
        std::fs::rename(&self.path, to).map_err(dir_err(to))?;
        self.renamed = true;
        Ok(())
    }
}

impl Drop for NewFile {
    fn drop(&mut self) {
        if !self.renamed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A snapshot opened for a restore: its state read and checked, its
/// memory mapped.
pub struct Snapshot {
    pub state: SnapshotState,
    pub memory: devices::virtio::GuestMemoryMmap,
    /// The snapshot directory it came from (none for a migration).
    pub dir: Option<PathBuf>,
}

impl Snapshot {
    /// Reads `dir`'s state file and maps its memory file.
    pub fn open(dir: &Path) -> Result<Snapshot, SnapshotError> {
        let state: SnapshotState = file::read(&dir.join(STATE_FILE))?;
        state.check()?;
        let memory = memory::map(&dir.join(MEMORY_FILE), &state.memory, &state.memory_id)?;
        working_set::prefetch(dir, &memory, &state.memory_id);
        Ok(Snapshot {
            state,
            memory,
            dir: Some(dir.to_owned()),
        })
    }
}

impl SnapshotState {
    /// Checks that the state is whole: a vCPU state for each vCPU, and the
    /// memory layout a VM of its size has.
    pub fn check(&self) -> Result<(), SnapshotError> {
        let state = self;
        if state.vcpus.len() != usize::from(state.config.vcpus) {
            return Err(SnapshotError::VcpuCount {
                found: state.vcpus.len(),
                want: state.config.vcpus,
            });
        }
        let total = state
            .memory
            .iter()
            .try_fold(0u64, |sum, r| sum.checked_add(r.1))
            .ok_or(SnapshotError::Layout(state.config.mem_mib))?;
        if total != state.config.mem_bytes()
            || state.memory
                != crate::memory::ram_ranges(total)
                    .into_iter()
                    .map(|(a, l)| (a.0, l))
                    .collect::<Vec<_>>()
        {
            return Err(SnapshotError::Layout(state.config.mem_mib));
        }
        Ok(())
    }
}

/// What a restore is, which decides how the VM comes up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restore {
    /// From a snapshot, maybe one of many clones: a new VM generation ID
    /// (and the event that tells the guest), NICs announced, running.
    Snapshot,
    /// The end of a live migration: the same VM, so the same generation
    /// ID; left paused until the source lets go
    /// ([`RunningVm::resume_migrated`]).
    Migration,
}

impl Vm {
    /// Starts a VM built on a snapshot's memory
    /// ([`Vm::build_with_memory`]) from the snapshot's state instead of
    /// booting its kernel. The owner adds the same devices first.
    pub fn start_restored(
        mut self,
        state: &SnapshotState,
        how: Restore,
    ) -> Result<RunningVm, VmError> {
        let types: Vec<u32> = self
            .transports
            .iter()
            .map(|t| crate::vm::lock(t).device_type())
            .collect();
        let saved_types: Vec<u32> = state.devices.iter().map(|d| d.device_type).collect();
        if types != saved_types {
            return Err(SnapshotError::Devices {
                saved: saved_types.len(),
                saved_types,
                types,
            }
            .into());
        }
        if state.vcpus.len() != usize::from(self.config.vcpus) {
            return Err(SnapshotError::VcpuCount {
                found: state.vcpus.len(),
                want: self.config.vcpus,
            }
            .into());
        }
        state.vm.restore(&self.fd).map_err(SnapshotError::from)?;
        for (id, saved) in state.vcpus.iter().enumerate() {
            let id = id as u8;
            let fd = self
                .fd
                .create_vcpu(u64::from(id))
                .map_err(|e| SnapshotError::CreateVcpu(id, e))?;
            vcpu_state::restore(&fd, saved).map_err(|e| SnapshotError::RestoreVcpu(id, e))?;
            self.vcpu_fds.push(fd);
        }
        crate::vm::lock(&self.serial)
            .set_state(&state.serial)
            .map_err(SnapshotError::Serial)?;
        // Every restore of a snapshot may be a clone: each gets its own
        // generation ID. A migrated VM is the same VM and keeps its own.
        if how == Restore::Snapshot {
            crate::vmgenid::renew(&self.mem)?;
        }
        for (index, (t, saved)) in self.transports.iter().zip(&state.devices).enumerate() {
            let mut t = crate::vm::lock(t);
            t.restore_device(&saved.device)
                .and_then(|()| t.restore(&saved.transport))
                .map_err(|source| SnapshotError::RestoreDevice { index, source })?;
        }
        if how == Restore::Migration {
            // Until the source lets go, the devices leave guest memory
            // alone too (with a handed-over memfd it is the source's).
            for t in &self.transports {
                crate::vm::lock(t).quiesce();
            }
            return self.launch(false);
        }
        // With the interrupt controllers restored, the generic event
        // device's interrupt is pending when the vCPUs start: the guest
        // learns that its generation ID changed.
        self.genid_changed.write(1).map_err(VmError::Event)?;
        let running = self.launch(true)?;
        running.announce();
        Ok(running)
    }
}

impl Snapshot {
    /// Once the VM restored from this snapshot has run for a second,
    /// records the pages it touched as the snapshot's working set (if the
    /// snapshot has none yet and its directory can be written), on a
    /// thread of its own.
    pub fn record_working_set_later(&self, vm: std::sync::Arc<RunningVm>) {
        let (Some(dir), id) = (self.dir.clone(), self.state.memory_id) else {
            return;
        };
        let _ = std::thread::Builder::new()
            .name("working-set".into())
            .spawn(move || {
                std::thread::sleep(Duration::from_secs(1));
                working_set::record(&dir, vm.memory(), &id);
            });
    }
}

impl RunningVm {
    /// Lets a migrated VM ([`Restore::Migration`]) run here once its
    /// source has let it go (paused if it was paused there), and
    /// announces its NICs where they are now.
    pub fn resume_migrated(&self, run: bool) -> Result<(), VmError> {
        for t in &self.transports {
            crate::vm::lock(t).unquiesce();
        }
        if run {
            self.resume()?;
        }
        self.announce();
        Ok(())
    }

    /// Tells each device that the VM was restored or moved here (a NIC
    /// announces its MAC).
    pub(crate) fn announce(&self) {
        for t in &self.transports {
            crate::vm::lock(t).announce();
        }
    }
}
