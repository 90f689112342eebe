//! Small tools for bounds: a counter that refuses past its maximum, and a
//! gate that lets a log line through at most once per interval (for
//! anything a peer or a guest can trigger over and over).

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How often a rate-limited log line may appear: often enough to see a
/// condition that persists, rare enough that a peer repeating it cannot
/// fill the log (at most 8,640 lines a day per limiter).
pub(crate) const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// A count bounded by a maximum: taking fails once all is taken.
#[derive(Debug)]
pub(crate) struct Budget {
    max: usize,
    used: AtomicUsize,
}

impl Budget {
    pub(crate) fn new(max: usize) -> Budget {
        Budget {
            max,
            used: AtomicUsize::new(0),
        }
    }

    /// Takes one; false (and nothing taken) if all is taken.
    pub(crate) fn try_take(&self) -> bool {
        self.try_take_n(1)
    }

    /// Takes `n` at once; false (and nothing taken) if they do not fit.
    pub(crate) fn try_take_n(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                u.checked_add(n).filter(|&t| t <= self.max)
            })
            .is_ok()
    }

    /// Gives `n` back.
    pub(crate) fn give(&self, n: usize) {
        let _ = self
            .used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                Some(u.saturating_sub(n))
            });
    }

    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::SeqCst)
    }
}

/// Lets a log line through at most once per [`LOG_INTERVAL`], counting
/// the ones it held back.
#[derive(Debug, Default)]
pub(crate) struct LogLimiter {
    /// When a line last went through, and how many were held back since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogLimiter {
    pub(crate) const fn new() -> LogLimiter {
        LogLimiter {
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(held_back)` if a line may be logged now (with how many were
    /// not since the last one), `None` if this one is to be dropped.
    pub(crate) fn allow(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match s.0 {
            Some(last) if now.duration_since(last) < LOG_INTERVAL => {
                s.1 += 1;
                None
            }
            _ => {
                let held = s.1;
                *s = (Some(now), 0);
                Some(held)
            }
        }
    }
}

/// An error and its sources on one line, for the log.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_refuses_past_its_maximum() {
        let b = Budget::new(3);
        assert!(b.try_take() && b.try_take());
        assert!(!b.try_take_n(2));
        assert!(b.try_take());
        assert!(!b.try_take());
        b.give(2);
        assert_eq!(b.used(), 1);
        assert!(b.try_take_n(2));
        b.give(10);
        assert_eq!(b.used(), 0);
        // No overflow near the top.
        let big = Budget::new(usize::MAX);
        assert!(big.try_take_n(usize::MAX));
        assert!(!big.try_take());
    }

    #[test]
    fn log_limiter_lets_one_line_through_per_interval() {
        let l = LogLimiter::new();
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), None);
        assert_eq!(l.allow(), None);
        // As if the interval had passed.
        l.state.lock().unwrap().0 = None;
        assert_eq!(l.allow(), Some(2));
    }
}
