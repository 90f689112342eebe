//! Legacy PC devices on the port I/O bus.

pub mod i8042;
pub mod serial;

pub use i8042::I8042;
pub use serial::{Serial, SerialError, SerialPersist};

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
