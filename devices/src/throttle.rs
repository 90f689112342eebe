//! Warnings a guest can cause at will (a refused register write, say) are
//! logged the first few times and then only at each power of two, with
//! their count, so that a guest cannot flood the host's log.

use std::sync::atomic::{AtomicU64, Ordering};

/// Occurrences logged one by one before the log thins out.
const FIRST: u64 = 8;

/// Counts one kind of guest-caused warning.
#[derive(Debug, Default)]
pub struct Throttle {
    count: AtomicU64,
}

impl Throttle {
    /// Counts one more occurrence; returns its number when it is to be
    /// logged.
    pub fn hit(&self) -> Option<u64> {
        let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        (n <= FIRST || n.is_power_of_two()).then_some(n)
    }

    /// Occurrences so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_million_hits_log_about_twenty_lines() {
        let t = Throttle::default();
        let logged = (0..1_000_000).filter(|_| t.hit().is_some()).count();
        assert_eq!(logged, 8 + 16, "the first 8, then 16, 32, ... 2^19");
        assert_eq!(t.count(), 1_000_000);
    }
}
