//! Rate limits for log lines that a guest or a network peer can trigger
//! over and over (refused connections, spoofed frames, failing accepts).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// How often a rate-limited log line may repeat: often enough to see that
/// something still happens, rarely enough that a peer cannot flood the
/// log (at most 6 lines a minute per limiter).
pub(crate) const LOG_EVERY: Duration = Duration::from_secs(10);

fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    // +1 so that 0 means "never logged".
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// Lets one line through per period and counts the ones held back.
/// Lock-free, so it can sit on the frame path.
#[derive(Debug)]
pub(crate) struct LogLimit {
    every_ms: u64,
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl Default for LogLimit {
    fn default() -> Self {
        LogLimit::new(LOG_EVERY)
    }
}

impl LogLimit {
    pub(crate) const fn new(every: Duration) -> LogLimit {
        LogLimit {
            every_ms: every.as_millis() as u64,
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` if a line may be logged now (`n` lines were held back
    /// since the last one), `None` if it must be held back.
    pub(crate) fn check(&self) -> Option<u64> {
        let now = now_ms();
        let next = self.next_ms.load(Relaxed);
        if now >= next
            && self
                .next_ms
                .compare_exchange(next, now + self.every_ms, Relaxed, Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Relaxed));
        }
        self.suppressed.fetch_add(1, Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_period_and_the_rest_are_counted() {
        let l = LogLimit::new(Duration::from_millis(200));
        assert_eq!(l.check(), Some(0));
        for _ in 0..1000 {
            assert_eq!(l.check(), None);
        }
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(l.check(), Some(1000));
        assert_eq!(l.check(), None);
    }
}
