//! The i8042 keyboard controller, kept only for its CPU reset line: a
//! guest that reboots with `reboot=k` (or the test guest's `shutdown`
//! step) writes 0xFE to port 0x64, and the VMM ends the VM.

use super::EventFdTrigger;
use crate::bus::BusDevice;
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

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data.len()) {
            (Ok(off), 1) => data[0] = self.inner.read(off),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [value]) = (u8::try_from(offset), data)
            && let Err(e) = self.inner.write(off, *value)
        {
            tracing::error!("cannot signal the guest's reset request: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
