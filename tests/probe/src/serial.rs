//! Polled 8250 UART at 0x3f8: one JSON line per event, whole lines only.
//!
//! Each port access is a VM exit (about 50 µs on PVM), so a 16550A's
//! transmit FIFO is used when there is one: FIFOs enabled (FCR) at the
//! first byte, and when IIR then says "FIFOs enabled" (bits 7:6), LSR is
//! polled for THR-empty (which then means the 16-byte FIFO is empty) once
//! per 16 bytes instead of before every byte, as Linux's 8250 driver does.
//! That halves the exits of a line.

use crate::hw::{inb, outb};
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

const COM1: u16 = 0x3f8;
const LSR: u16 = COM1 + 5;
/// FIFO control (write) and interrupt identification (read).
const FCR: u16 = COM1 + 2;
const IIR: u16 = FCR;
/// FCR: enable the FIFOs, clear both.
const FCR_ENABLE_CLEAR: u8 = 0x07;
/// IIR bits 7:6 both set: FIFOs enabled (a 16550A).
const IIR_FIFOS: u8 = 0xc0;
/// A 16550A's transmit FIFO.
const FIFO_LEN: u32 = 16;
const LSR_THR_EMPTY: u8 = 0x20;
/// How many LSR reads to wait for THR-empty before writing anyway.
const LSR_SPINS: u32 = 1000;
/// How long to wait for another vCPU's line before writing anyway.
const LOCK_SPINS: u64 = 20_000_000;

static LOCK: AtomicBool = AtomicBool::new(false);
/// Set once a wait for THR-empty timed out: the UART never reports it, so
/// stop polling (each poll is a VM exit).
static LSR_STUCK: AtomicBool = AtomicBool::new(false);
/// Bytes that may still be written before LSR must be polled again.
static ROOM: AtomicU32 = AtomicU32::new(0);
/// Bytes the UART takes once THR-empty shows: 0 until the FIFO check
/// ran, then 16 with a 16550A FIFO, else 1.
static BURST: AtomicU32 = AtomicU32::new(0);

struct Uart;

impl Write for Uart {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            put(b);
        }
        Ok(())
    }
}

fn put(b: u8) {
    let room = ROOM.load(Ordering::Relaxed);
    if room > 0 {
        ROOM.store(room - 1, Ordering::Relaxed);
    } else if !LSR_STUCK.load(Ordering::Relaxed) {
        let ready = (0..LSR_SPINS).any(|_| inb(LSR) & LSR_THR_EMPTY != 0);
        if ready {
            ROOM.store(burst() - 1, Ordering::Relaxed);
        } else {
            LSR_STUCK.store(true, Ordering::Relaxed);
        }
    }
    outb(COM1, b);
}

/// How many bytes to write per THR-empty, enabling the FIFOs the first
/// time (16 if IIR then reports them, else 1).
fn burst() -> u32 {
    let mut n = BURST.load(Ordering::Relaxed);
    if n == 0 {
        outb(FCR, FCR_ENABLE_CLEAR);
        n = if inb(IIR) & IIR_FIFOS == IIR_FIFOS {
            FIFO_LEN
        } else {
            1
        };
        BURST.store(n, Ordering::Relaxed);
    }
    n
}

/// Takes the line lock, waiting a bounded time; false if it was not
/// taken (then it must not be released).
fn lock() -> bool {
    for _ in 0..LOCK_SPINS {
        if LOCK
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            return true;
        }
        core::hint::spin_loop();
    }
    false
}

/// Writes one line (the text plus `\n`) without interleaving with other
/// vCPUs. A vCPU that died holding the lock delays others by a bounded time.
pub fn line(args: fmt::Arguments<'_>) {
    let locked = lock();
    let _ = Uart.write_fmt(args);
    put(b'\n');
    if locked {
        LOCK.store(false, Ordering::Release);
    }
}

/// Writes `n` times the byte `b` and then `\n`, as one line, as fast as
/// the port takes them: without waiting for THR-empty (a careless driver;
/// one VM exit per byte instead of two).
pub fn repeat_line(b: u8, n: u64) {
    let locked = lock();
    for _ in 0..n {
        outb(COM1, b);
    }
    outb(COM1, b'\n');
    if locked {
        LOCK.store(false, Ordering::Release);
    }
}

/// Displays a string as JSON string contents (without the quotes).
pub struct Json<'a>(pub &'a str);

impl fmt::Display for Json<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            match c {
                '"' => f.write_str("\\\"")?,
                '\\' => f.write_str("\\\\")?,
                c if (c as u32) < 0x20 => write!(f, "\\u{:04x}", c as u32)?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}
