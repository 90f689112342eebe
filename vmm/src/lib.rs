//! The vmplant VMM: a KVM virtual machine with guest memory, vCPU threads,
//! the x86_64 boot path and the device buses.
//!
//! [`Vm::build`] turns a [`VmConfig`] into a VM ready to run, and
//! [`Vm::run`] runs it until the guest shuts down, fails, or the host asks
//! it to stop; the [`VmExit`] it returns says which.

pub mod config;
pub mod console;
pub mod control;
pub mod event_loop;
pub mod host;
pub mod layout;
pub mod loader;
pub mod memory;
pub mod migration;
pub mod snapshot;
pub mod vcpu;
pub mod vm;
pub mod vmgenid;
pub mod x86_64;

pub use config::{BootProtocol, ConfigError, SerialOutput, VmConfig};
pub use host::{HostInfo, Virtualization};
pub use vm::{RunningVm, Vm, VmError, VmExit};
