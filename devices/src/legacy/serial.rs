//! The 8250 UART at 0x3f8 (COM1), IRQ 4.

use super::{ByteRegisters, EventFdTrigger};
use serde::{Deserialize, Serialize};
use std::io::Write;
use vm_superio::serial::{NoEvents, SerialState};
use vmm_sys_util::eventfd::EventFd;

/// The I/O port base of COM1 and the length of its register window.
pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_LEN: u16 = 8;
/// The ISA interrupt line of COM1.
pub const COM1_IRQ: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("serial input is full")]
    InputFull,
    #[error("cannot raise the serial interrupt")]
    Interrupt(#[source] std::io::Error),
    #[error("a saved UART state holds {0} input bytes, more than its FIFO")]
    BadState(usize),
}

/// A UART whose transmitted bytes go to `out`, and whose interrupt line
/// is an event file descriptor the VMM binds to IRQ 4.
pub struct Serial {
    inner: vm_superio::Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl Serial {
    pub fn new(interrupt: EventFd, out: Box<dyn Write + Send>) -> Self {
        Serial {
            inner: vm_superio::Serial::new(EventFdTrigger(interrupt), out),
        }
    }

    /// Queues bytes for the guest to read, as if typed on the console.
    /// Returns how many fitted.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> Result<usize, SerialError> {
        self.inner.enqueue_raw_bytes(bytes).map_err(|e| match e {
            vm_superio::serial::Error::FullFifo => SerialError::InputFull,
            vm_superio::serial::Error::Trigger(e) => SerialError::Interrupt(e),
            vm_superio::serial::Error::IOError(e) => SerialError::Interrupt(e),
        })
    }

    /// Room left in the input FIFO.
    pub fn input_room(&self) -> usize {
        self.inner.fifo_capacity()
    }

    pub fn save(&self) -> SerialPersist {
        SerialPersist::from(self.inner.state())
    }

    /// Puts the UART back into a saved state, keeping its interrupt line
    /// and its output.
    pub fn set_state(&mut self, state: &SerialPersist) -> Result<(), SerialError> {
        let trigger = || {
            self.inner
                .interrupt_evt()
                .0
                .try_clone()
                .map(EventFdTrigger)
                .map_err(SerialError::Interrupt)
        };
        let (keep, placeholder) = (trigger()?, trigger()?);
        let old = std::mem::replace(
            &mut self.inner,
            vm_superio::Serial::new(placeholder, Box::new(std::io::sink())),
        );
        let out = old.into_writer();
        self.inner = vm_superio::Serial::from_state(&SerialState::from(state), keep, NoEvents, out)
            .map_err(|_| SerialError::BadState(state.in_buffer.len()))?;
        Ok(())
    }
}

impl ByteRegisters for Serial {
    fn read_register(&mut self, offset: u8) -> u8 {
        self.inner.read(offset)
    }

    fn write_register(&mut self, offset: u8, value: u8) {
        if let Err(e) = self.inner.write(offset, value) {
            tracing::warn!("serial write failed: {e}");
        }
    }
}

/// The UART's registers and input FIFO, as saved in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialPersist {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialPersist {
    fn from(s: SerialState) -> Self {
        SerialPersist {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialPersist> for SerialState {
    fn from(s: &SerialPersist) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmitted_bytes_reach_the_output() {
        let sink = Sink::default();
        let mut s = Serial::new(EventFd::new(0).unwrap(), Box::new(sink.clone()));
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        // Line status: transmitter empty.
        let mut lsr = [0];
        s.read(5, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60);
    }

    #[test]
    fn input_is_readable_and_raises_the_interrupt() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(irq.try_clone().unwrap(), Box::new(std::io::sink()));
        s.write(1, &[0x01]); // IER: interrupt on received data
        assert_eq!(s.enqueue_input(b"x").unwrap(), 1);
        assert_eq!(irq.read().unwrap(), 1);
        let mut b = [0];
        s.read(0, &mut b);
        assert_eq!(b[0], b'x');
    }

    #[test]
    fn state_survives_save_and_restore() {
        let mut s = Serial::new(EventFd::new(0).unwrap(), Box::new(std::io::sink()));
        s.write(7, &[0x5a]); // scratch register
        s.enqueue_input(b"ab").unwrap();
        let saved = s.save();
        let json: SerialPersist =
            serde_json::from_str(&serde_json::to_string(&saved).unwrap()).unwrap();
        let mut r = Serial::new(EventFd::new(0).unwrap(), Box::new(std::io::sink()));
        r.set_state(&json).unwrap();
        let mut b = [0];
        r.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        r.read(0, &mut b);
        assert_eq!(b[0], b'a');
    }
}
