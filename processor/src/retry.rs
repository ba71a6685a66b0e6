//! Backoff with jitter for infrastructure faults, which are retried and never skipped.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff from `start` to `max`, doubling per failure.
#[derive(Debug, Clone)]
pub struct Backoff {
    start: Duration,
    max: Duration,
    current: Duration,
    /// Failures since the last success.
    pub attempts: u32,
}

impl Backoff {
    /// A backoff from `start` up to `max`.
    pub fn new(start: Duration, max: Duration) -> Self {
        Self {
            start,
            max,
            current: start,
            attempts: 0,
        }
    }

    /// The next delay, with jitter, and advances the backoff.
    pub fn next_delay(&mut self) -> Duration {
        self.attempts += 1;
        let d = jitter(self.current);
        self.current = (self.current * 2).min(self.max);
        d
    }

    /// Back to the first delay after a success.
    pub fn reset(&mut self) {
        self.current = self.start;
        self.attempts = 0;
    }
}

/// A random delay between half and all of `d`, so that many workers retrying after the
/// same outage do not hit the database in lockstep.
pub fn jitter(d: Duration) -> Duration {
    let ms = d.as_millis().max(2) as u64;
    Duration::from_millis(rand::thread_rng().gen_range(ms / 2..=ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let delays: Vec<_> = (0..5).map(|_| b.next_delay()).collect();
        assert!(delays[0] <= Duration::from_millis(100));
        assert!(delays[4] >= Duration::from_millis(200) && delays[4] <= Duration::from_millis(400));
        assert_eq!(b.attempts, 5);
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
