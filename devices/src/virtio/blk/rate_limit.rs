//! Per-disk rate limits: token buckets of bytes per second and requests
//! per second. Each bucket holds at most one second's worth and starts
//! full, so a disk that has been idle takes a one-second burst. A request
//! runs once each bucket holds its cost, or the whole bucket for a
//! request larger than one second's worth (it then leaves the bucket in
//! debt, which later requests wait out); the tokens are taken when it
//! starts. Flushes, GET_ID and malformed requests cost an operation and
//! no bytes; discards and write-zeroes too (they move no data).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Limits for one disk; `None`: not limited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimit {
    pub bytes_per_sec: Option<u64>,
    pub ops_per_sec: Option<u64>,
}

impl RateLimit {
    pub fn is_none(&self) -> bool {
        self.bytes_per_sec.is_none() && self.ops_per_sec.is_none()
    }
}

#[derive(Debug)]
struct Bucket {
    /// Tokens per second, and the most the bucket holds.
    rate: f64,
    /// May be below zero: debt of a request larger than the bucket.
    tokens: f64,
}

impl Bucket {
    fn new(rate: u64) -> Bucket {
        let rate = rate.max(1) as f64;
        Bucket { rate, tokens: rate }
    }

    fn refill(&mut self, elapsed: Duration) {
        self.tokens = (self.tokens + self.rate * elapsed.as_secs_f64()).min(self.rate);
    }

    /// How long until a request costing `cost` may start.
    fn wait(&self, cost: f64) -> Duration {
        let need = cost.min(self.rate) - self.tokens;
        if need <= 0.0 {
            Duration::ZERO
        } else {
            // At least a microsecond: zero means "go".
            Duration::from_secs_f64(need / self.rate).max(Duration::from_micros(1))
        }
    }
}

/// The buckets of one disk, shared by the threads that serve it.
#[derive(Debug)]
pub struct Limiter {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    bytes: Option<Bucket>,
    ops: Option<Bucket>,
    last: Instant,
}

impl Limiter {
    pub fn new(limit: RateLimit) -> Limiter {
        Limiter {
            state: Mutex::new(State {
                bytes: limit.bytes_per_sec.map(Bucket::new),
                ops: limit.ops_per_sec.map(Bucket::new),
                last: Instant::now(),
            }),
        }
    }

    /// Whether a request moving `bytes` may start at `now`: zero if so
    /// (its tokens are taken), else how long until it may (nothing is
    /// taken; ask again then).
    pub fn admit(&self, bytes: u64, now: Instant) -> Duration {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now.saturating_duration_since(s.last);
        s.last = s.last.max(now);
        let State { bytes: b, ops, .. } = &mut *s;
        let wait = [(b, bytes as f64), (ops, 1.0)]
            .into_iter()
            .filter_map(|(b, cost)| {
                let b = b.as_mut()?;
                b.refill(elapsed);
                Some(b.wait(cost))
            })
            .max()
            .unwrap_or(Duration::ZERO);
        if wait.is_zero() {
            if let Some(b) = &mut s.bytes {
                b.tokens -= bytes as f64;
            }
            if let Some(b) = &mut s.ops {
                b.tokens -= 1.0;
            }
        }
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_gives_a_one_second_burst_then_its_rate() {
        let l = Limiter::new(RateLimit {
            bytes_per_sec: None,
            ops_per_sec: Some(10),
        });
        let t0 = Instant::now();
        for _ in 0..10 {
            assert_eq!(l.admit(4096, t0), Duration::ZERO);
        }
        let wait = l.admit(4096, t0);
        assert!(wait > Duration::from_millis(99) && wait <= Duration::from_millis(101));
        assert_eq!(
            l.admit(4096, t0 + Duration::from_millis(100)),
            Duration::ZERO
        );
        // An idle disk saves up one second, not more.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..10 {
            assert_eq!(l.admit(1, later), Duration::ZERO);
        }
        assert!(!l.admit(1, later).is_zero());
    }

    #[test]
    fn a_request_larger_than_the_bucket_goes_once_it_is_full_and_leaves_debt() {
        let l = Limiter::new(RateLimit {
            bytes_per_sec: Some(1 << 20),
            ops_per_sec: None,
        });
        let t0 = Instant::now();
        assert_eq!(l.admit(4 << 20, t0), Duration::ZERO, "the full bucket");
        // 3 MiB of debt and 512 KiB to come: 3.5 s.
        let wait = l.admit(512 << 10, t0);
        assert!((wait.as_secs_f64() - 3.5).abs() < 0.01, "{wait:?}");
        assert_eq!(l.admit(512 << 10, t0 + wait), Duration::ZERO);
        assert!(RateLimit::default().is_none());
        let free = Limiter::new(RateLimit::default());
        assert_eq!(free.admit(u64::MAX, t0), Duration::ZERO);
    }
}
