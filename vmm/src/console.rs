//! Where the guest's serial console goes: its bytes are gathered and
//! written out a line at a time (or 4 KiB, or 20 ms after the last byte
//! when no newline comes, so that prompts show), instead of one write(2)
//! per byte as the UART sends them.

use event_manager::{EventOps, Events, MutEventSubscriber};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

/// Flush at this size even without a newline.
const MAX_PENDING: usize = 4096;
/// Flush a line without newline after this long.
const LINGER: Duration = Duration::from_millis(20);
/// The longest line a VM's console shows on a shared output: a guest that
/// never writes a newline has its output cut into lines of this length,
/// so the bytes waiting for a newline stay bounded.
pub const MAX_LINE: usize = 4096;

struct State {
    pending: Vec<u8>,
    out: Box<dyn Write + Send>,
    timer: TimerFd,
    armed: bool,
    failed: bool,
}

impl State {
    fn flush_out(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let result = self
            .out
            .write_all(&self.pending)
            .and_then(|()| self.out.flush());
        if let Err(e) = result
            && !self.failed
        {
            // A closed terminal or pipe must not stop the guest.
            tracing::warn!("the serial console output failed, further output is dropped: {e}");
            self.failed = true;
        }
        self.pending.clear();
    }
}

impl Drop for State {
    fn drop(&mut self) {
        self.flush_out();
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// The UART's side: takes bytes as they come.
pub struct ConsoleWriter(Arc<Mutex<State>>);

/// The event loop's side: writes out a pending partial line.
pub struct ConsoleFlusher(Arc<Mutex<State>>, std::os::fd::RawFd);

/// The VM owner's side: writes out whatever is pending, e.g. once the
/// vCPUs are paused, so that the console shows all the guest wrote.
#[derive(Clone)]
pub struct ConsoleHandle(Arc<Mutex<State>>);

impl ConsoleHandle {
    pub fn flush(&self) {
        lock(&self.0).flush_out();
    }
}

/// A console on `out`.
pub fn console(out: Box<dyn Write + Send>) -> std::io::Result<(ConsoleWriter, ConsoleFlusher)> {
    let timer = TimerFd::new().map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    let fd = timer.as_raw_fd();
    let state = Arc::new(Mutex::new(State {
        pending: Vec::with_capacity(MAX_PENDING),
        out,
        timer,
        armed: false,
        failed: false,
    }));
    Ok((ConsoleWriter(state.clone()), ConsoleFlusher(state, fd)))
}

impl Write for ConsoleWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let mut s = lock(&self.0);
        s.pending.extend_from_slice(data);
        if data.contains(&b'\n') || s.pending.len() >= MAX_PENDING {
            s.flush_out();
        } else if !s.armed {
            if let Err(e) = s.timer.reset(LINGER, None) {
                // Without the timer, write out at once rather than late.
                tracing::debug!("console timer: {e}");
                s.flush_out();
            } else {
                s.armed = true;
            }
        }
        Ok(data.len())
    }

    /// The UART flushes after every byte; lines are written out as above.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ConsoleFlusher {
    pub fn handle(&self) -> ConsoleHandle {
        ConsoleHandle(self.0.clone())
    }

    /// Writes out what waited for a newline, once the timer expired.
    fn on_timer(&self) {
        let mut s = lock(&self.0);
        // Consume the expiry; the fd is readable, so this does not block.
        let _ = s.timer.wait();
        s.armed = false;
        s.flush_out();
    }
}

impl MutEventSubscriber for ConsoleFlusher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.on_timer();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data_raw(self.1, 0, EventSet::IN)) {
            tracing::warn!("console flush timer unavailable: {e}");
        }
    }
}

/// Standard output shared by several VMs: whole lines only, each behind
/// the VM's prefix (one write each), so that lines of different VMs never
/// mix; lines longer than [`MAX_LINE`] are cut.
pub struct PrefixedLines<W: Write> {
    prefix: Vec<u8>,
    partial: Vec<u8>,
    line: Vec<u8>,
    out: W,
}

impl<W: Write> PrefixedLines<W> {
    pub fn new(prefix: Vec<u8>, out: W) -> Self {
        PrefixedLines {
            prefix,
            partial: Vec::new(),
            line: Vec::new(),
            out,
        }
    }

    /// Writes out the prefix, what waited, and `end` as one line.
    fn emit(&mut self, end: &[u8]) -> std::io::Result<()> {
        self.line.clear();
        self.line.extend_from_slice(&self.prefix);
        self.line.extend_from_slice(&self.partial);
        self.line.extend_from_slice(end);
        self.partial.clear();
        self.out.write_all(&self.line)?;
        self.out.flush()
    }
}

impl<W: Write> Write for PrefixedLines<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for mut piece in buf.split_inclusive(|&b| b == b'\n') {
            loop {
                let room = MAX_LINE - self.partial.len();
                let ends_line = piece.ends_with(b"\n");
                if piece.len() - usize::from(ends_line) <= room {
                    if ends_line {
                        self.emit(piece)?;
                    } else {
                        self.partial.extend_from_slice(piece);
                    }
                    break;
                }
                self.partial.extend_from_slice(&piece[..room]);
                self.emit(b"\n")?;
                piece = &piece[room..];
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<W: Write> Drop for PrefixedLines<W> {
    fn drop(&mut self) {
        if !self.partial.is_empty() {
            let _ = self.emit(b"\n");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<Vec<u8>>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_line_is_one_write() {
        let sink = Sink::default();
        let (mut w, _f) = console(Box::new(sink.clone())).unwrap();
        for b in b"{\"probe\":\"ready\"}\n" {
            w.write_all(&[*b]).unwrap();
            w.flush().unwrap();
        }
        assert_eq!(
            *sink.0.lock().unwrap(),
            vec![b"{\"probe\":\"ready\"}\n".to_vec()]
        );
    }

    #[test]
    fn a_partial_line_goes_out_after_the_timer() {
        let sink = Sink::default();
        let (mut w, f) = console(Box::new(sink.clone())).unwrap();
        w.write_all(b"login: ").unwrap();
        assert!(sink.0.lock().unwrap().is_empty());
        // The event loop calls this when the timer fires; the read of the
        // expiry blocks until then.
        f.on_timer();
        assert_eq!(*sink.0.lock().unwrap(), vec![b"login: ".to_vec()]);
    }

    #[test]
    fn what_is_pending_is_written_when_the_vm_goes() {
        let sink = Sink::default();
        let (mut w, f) = console(Box::new(sink.clone())).unwrap();
        w.write_all(b"bye").unwrap();
        drop(w);
        drop(f);
        assert_eq!(*sink.0.lock().unwrap(), vec![b"bye".to_vec()]);
    }

    #[test]
    fn shared_output_cuts_a_line_that_never_ends() {
        let sink = Sink::default();
        let mut out = PrefixedLines::new(b"vm1: ".to_vec(), sink.clone());
        out.write_all(b"short\n").unwrap();
        for _ in 0..1024 {
            out.write_all(&[b'x'; 1024]).unwrap();
        }
        assert!(
            out.partial.len() <= MAX_LINE,
            "{} bytes held",
            out.partial.len()
        );
        out.write_all(b"end\n").unwrap();
        drop(out);
        let lines = sink.0.lock().unwrap().clone();
        assert_eq!(lines[0], b"vm1: short\n");
        assert_eq!(lines.len(), 1 + (1 << 20) / MAX_LINE + 1);
        for l in &lines[1..] {
            assert!(l.starts_with(b"vm1: ") && l.ends_with(b"\n"));
            assert!(l.len() <= 5 + MAX_LINE + 1);
        }
        assert_eq!(lines.last().unwrap(), b"vm1: end\n");
        let xs: usize = lines
            .iter()
            .map(|l| l.iter().filter(|&&b| b == b'x').count())
            .sum();
        assert_eq!(xs, 1 << 20, "nothing lost");
    }
}
