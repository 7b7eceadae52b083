//! Reconnect delays: exponential backoff with full jitter, from a seeded generator, so the
//! adapter only sleeps until the deadline the core computes (and tests are repeatable).

use crate::rng::SplitMix64;
use std::time::Duration;

/// Exponential backoff with full jitter: attempt `n` waits a uniform random time in
/// `[0, min(max, initial * 2^n)]` (which spreads reconnecting clients after a broker restart).
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
    rng: SplitMix64,
}

impl Backoff {
    /// A policy starting at `initial`, capped at `max`, drawing jitter from `seed`.
    pub fn new(initial: Duration, max: Duration, seed: u64) -> Backoff {
        Backoff { initial, max: max.max(initial), attempt: 0, rng: SplitMix64::new(seed) }
    }

    /// The delay before the next attempt; each call counts one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let cap = self.initial.saturating_mul(1u32 << self.attempt.min(20)).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        cap.mul_f64(self.rng.next_f64())
    }

    /// Forgets the failures (after a successful connection).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_caps_resets_and_repeats_for_a_seed() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5), 7);
        let delays: Vec<Duration> = (0..12).map(|_| b.next_delay()).collect();
        for (n, d) in delays.iter().enumerate() {
            let cap = Duration::from_millis(100).saturating_mul(1 << n).min(Duration::from_secs(5));
            assert!(*d <= cap, "attempt {n}: {d:?} > {cap:?}");
        }
        assert!(delays[8..].iter().any(|d| *d > Duration::from_secs(1)), "grows toward the cap");
        let mut same = Backoff::new(Duration::from_millis(100), Duration::from_secs(5), 7);
        assert_eq!((0..12).map(|_| same.next_delay()).collect::<Vec<_>>(), delays);
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
