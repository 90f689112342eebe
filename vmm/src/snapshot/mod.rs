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

use crate::config::VmConfig;
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
    /// Pauses the VM and saves it into `dir` (created if missing; its
    /// `state` and `memory` files are replaced), then lets it run again
    /// unless `stay_paused`. `owner` is kept as it is, for the restore.
    pub fn snapshot(&self, dir: &Path, owner: &str, stay_paused: bool) -> Result<Saved, VmError> {
        for (index, t) in self.transports.iter().enumerate() {
            let t = crate::vm::lock(t);
            if let Err(why) = t.can_snapshot() {
                return Err(SnapshotError::Device {
                    index,
                    device_type: t.device_type(),
                    why,
                }
                .into());
            }
        }
        std::fs::create_dir_all(dir).map_err(dir_err(dir))?;
        let was_running = self.state() == crate::control::RunState::Running;
        self.pause()?;
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
        // Whatever happened, the VM goes on as it was unless asked.
        if was_running && !stay_paused {
            self.resume()?;
        }
        saved
    }

    fn save_paused(&self, dir: &Path, owner: &str) -> Result<(u64, memory::Saved), VmError> {
        let msrs = kvm_ioctls::Kvm::new()
            .map_err(VmError::OpenKvm)?
            .get_msr_index_list()
            .map_err(SnapshotError::MsrList)?;
        let vcpus = self
            .vcpu_handles()
            .iter()
            .map(|v| {
                v.save_state(msrs.as_slice(), VCPU_SAVE_TIMEOUT)
                    .map_err(|e| SnapshotError::SaveVcpu(v.id(), e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let state = SnapshotState {
            config: self.config.clone(),
            owner: owner.to_owned(),
            memory: memory::layout(self.memory()),
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
        };
        let memory =
            memory::save(self.memory(), &dir.join(MEMORY_FILE)).map_err(SnapshotError::from)?;
        let state_bytes =
            file::write(&dir.join(STATE_FILE), &state).map_err(SnapshotError::from)?;
        Ok((state_bytes, memory))
    }
}

/// A snapshot opened for a restore: its state read and checked, its
/// memory mapped.
pub struct Snapshot {
    pub state: SnapshotState,
    pub memory: devices::virtio::GuestMemoryMmap,
}

impl Snapshot {
    /// Reads `dir`'s state file and maps its memory file.
    pub fn open(dir: &Path) -> Result<Snapshot, SnapshotError> {
        let state: SnapshotState = file::read(&dir.join(STATE_FILE))?;
        if state.vcpus.len() != usize::from(state.config.vcpus) {
            return Err(SnapshotError::VcpuCount {
                found: state.vcpus.len(),
                want: state.config.vcpus,
            });
        }
        let total: u64 = state.memory.iter().map(|r| r.1).sum();
        if total != state.config.mem_bytes()
            || state.memory
                != crate::memory::ram_ranges(total)
                    .into_iter()
                    .map(|(a, l)| (a.0, l))
                    .collect::<Vec<_>>()
        {
            return Err(SnapshotError::Layout(state.config.mem_mib));
        }
        let memory = memory::map(&dir.join(MEMORY_FILE), &state.memory)?;
        Ok(Snapshot { state, memory })
    }
}

impl Vm {
    /// Starts a VM built on a snapshot's memory
    /// ([`Vm::build_with_memory`]) from the snapshot's state instead of
    /// booting its kernel. The owner adds the same devices first.
    pub fn start_restored(mut self, state: &SnapshotState) -> Result<RunningVm, VmError> {
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
        // Every restore may be a clone: each gets its own generation ID.
        crate::vmgenid::renew(&self.mem)?;
        for (index, (t, saved)) in self.transports.iter().zip(&state.devices).enumerate() {
            let mut t = crate::vm::lock(t);
            t.restore_device(&saved.device)
                .and_then(|()| t.restore(&saved.transport))
                .map_err(|source| SnapshotError::RestoreDevice { index, source })?;
        }
        self.launch()
    }
}
