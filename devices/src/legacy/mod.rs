//! Legacy PC devices on the port I/O bus.

pub mod acpi_pm;
pub mod i8042;
pub mod serial;

pub use acpi_pm::AcpiPowerControl;
pub use i8042::I8042;
pub use serial::{Serial, SerialError, SerialPersist};

use crate::bus::BusDevice;
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// An interrupt line or event raised by writing to an [`EventFd`].
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// A device of byte-wide registers, as legacy PC devices are. Wider or
/// out-of-range accesses read as all ones and are dropped on write.
pub trait ByteRegisters: Send {
    fn read_register(&mut self, offset: u8) -> u8;
    fn write_register(&mut self, offset: u8, value: u8);
}

impl<T: ByteRegisters> BusDevice for T {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data.len()) {
            (Ok(off), 1) => data[0] = self.read_register(off),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [value]) = (u8::try_from(offset), data) {
            self.write_register(off, *value);
        }
    }
}
