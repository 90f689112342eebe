//! The i8042 keyboard controller, kept only for its CPU reset line: a
//! guest that reboots with `reboot=k` (or the test guest's `shutdown`
//! step) writes 0xFE to port 0x64, and the VMM ends the VM.

use super::{ByteRegisters, EventFdTrigger};
use vmm_sys_util::eventfd::EventFd;

/// The controller's ports: data at 0x60, command/status at 0x64.
pub const I8042_BASE: u16 = 0x60;
pub const I8042_LEN: u16 = 5;

pub struct I8042 {
    inner: vm_superio::I8042Device<EventFdTrigger>,
}

impl I8042 {
    /// `reset` is written when the guest asks for a CPU reset.
    pub fn new(reset: EventFd) -> Self {
        I8042 {
            inner: vm_superio::I8042Device::new(EventFdTrigger(reset)),
        }
    }
}

impl ByteRegisters for I8042 {
    fn read_register(&mut self, offset: u8) -> u8 {
        self.inner.read(offset)
    }

    fn write_register(&mut self, offset: u8, value: u8) {
        if let Err(e) = self.inner.write(offset, value) {
            tracing::error!("cannot signal the guest's reset request: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;

    #[test]
    fn reset_command_signals_the_vmm() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(evt.try_clone().unwrap());
        dev.write(4, &[0xAA]); // some other command: ignored
        assert!(evt.read().is_err());
        dev.write(4, &[0xFE]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
