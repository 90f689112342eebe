//! Devices of a vmplant guest: the I/O buses they sit on, the legacy PC
//! devices (8250 serial, i8042), the boot-complete marker, and the virtio
//! devices with their MMIO transport.
//!
//! Nothing here knows about KVM: a device sees byte accesses at offsets
//! and raises interrupts through [`vmm_sys_util::eventfd::EventFd`]s that
//! the VMM binds to guest interrupt lines.

pub mod boot_timer;
pub mod bus;
pub mod legacy;
pub mod throttle;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
