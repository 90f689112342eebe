//! The ACPI power control of a hardware-reduced platform: the FADT's sleep
//! control and status registers and its reset register, two byte-wide I/O
//! ports. A guest that powers off (S5, as Linux's `poweroff` or the test
//! guest's `shutdown` step do) or resets through ACPI ends the VM, through
//! the same event as the i8042's reset line.

use super::ByteRegisters;
use vmm_sys_util::eventfd::EventFd;

/// The ports: sleep control and status share the first, the reset
/// register is the second. (Cloud Hypervisor uses 0x600 too; nothing
/// else of ours lives there.)
pub const ACPI_PM_BASE: u16 = 0x600;
pub const ACPI_PM_LEN: u16 = 2;
/// Offsets of the registers from [`ACPI_PM_BASE`].
pub const SLEEP_CONTROL_OFFSET: u8 = 0;
pub const SLEEP_STATUS_OFFSET: u8 = 0;
pub const RESET_OFFSET: u8 = 1;
/// What the guest writes to the reset register (the FADT's RESET_VALUE).
pub const RESET_VALUE: u8 = 1;
/// The sleep type of S5 (soft off), as the DSDT's `\_S5_` object gives it.
pub const S5_SLEEP_TYPE: u8 = 5;

/// Sleep control register: SLP_TYPx in bits 2..=4, SLP_EN in bit 5.
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0b111;
const SLP_EN: u8 = 1 << 5;

pub struct AcpiPowerControl {
    exit: EventFd,
}

impl AcpiPowerControl {
    /// `exit` is written when the guest powers off or resets.
    pub fn new(exit: EventFd) -> Self {
        AcpiPowerControl { exit }
    }

    fn end_vm(&self, why: &str) {
        tracing::info!("the guest asked for {why} through ACPI");
        if let Err(e) = self.exit.write(1) {
            tracing::error!("cannot signal the guest's {why} request: {e}");
        }
    }
}

impl ByteRegisters for AcpiPowerControl {
    /// The sleep status register: WAK_STS stays clear, as nothing wakes
    /// a VM that went to sleep; it only ever powers off. The reset
    /// register is write-only.
    fn read_register(&mut self, _offset: u8) -> u8 {
        0
    }

    fn write_register(&mut self, offset: u8, value: u8) {
        match offset {
            SLEEP_CONTROL_OFFSET => {
                // Writes without SLP_EN (clearing WAK_STS) and other sleep
                // states are ignored.
                let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
                if value & SLP_EN != 0 && sleep_type == S5_SLEEP_TYPE {
                    self.end_vm("power off (S5)");
                }
            }
            RESET_OFFSET if value == RESET_VALUE => self.end_vm("a reset"),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;

    fn device() -> (AcpiPowerControl, EventFd) {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (AcpiPowerControl::new(evt.try_clone().unwrap()), evt)
    }

    #[test]
    fn s5_with_sleep_enable_ends_the_vm() {
        let (mut dev, evt) = device();
        // What Linux and the test guest write: SLP_TYP=5, SLP_EN.
        dev.write(0, &[(5 << 2) | (1 << 5)]);
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn other_sleep_writes_do_not() {
        let (mut dev, evt) = device();
        dev.write(0, &[0x80]); // clearing WAK_STS in the status register
        dev.write(0, &[5 << 2]); // S5 without SLP_EN
        dev.write(0, &[(3 << 2) | (1 << 5)]); // S3
        dev.write(0, &[0, 0x34]); // a word: not a byte register access
        dev.write(1, &[0xfe]); // not the reset value
        assert!(evt.read().is_err());
        let mut status = [0xffu8];
        dev.read(0, &mut status);
        assert_eq!(status, [0], "WAK_STS must read clear");
    }

    #[test]
    fn reset_register_ends_the_vm() {
        let (mut dev, evt) = device();
        dev.write(u64::from(RESET_OFFSET), &[RESET_VALUE]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
