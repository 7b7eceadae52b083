//! Failed logins per source address: after `max` failures within `window`, an address's next
//! CONNECTs with credentials are refused (Connection rate exceeded, 0x9F) without spending a
//! password verification on them, until the window has passed.
//!
//! Bounded: at most `capacity` addresses are tracked; when full, expired entries are dropped,
//! and if none has expired a new address is not tracked (an attacker with that many addresses
//! is beyond what a per-address limit can stop; the bound on verifications in flight still
//! holds).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Failures per address in a fixed window.
#[derive(Debug)]
pub struct FailureLimiter {
    max: u32,
    window: Duration,
    capacity: usize,
    /// Per address: when its window started, and its failures since.
    entries: BTreeMap<IpAddr, (Instant, u32)>,
}

impl FailureLimiter {
    /// Allows `max` failures per `window` from one address, tracking at most `capacity`
    /// addresses. `max == 0` turns the limit off.
    pub fn new(max: u32, window: Duration, capacity: usize) -> FailureLimiter {
        FailureLimiter { max, window, capacity, entries: BTreeMap::new() }
    }

    /// Whether `ip` has used up its failures for now.
    pub fn is_limited(&self, now: Instant, ip: IpAddr) -> bool {
        self.max > 0
            && self
                .entries
                .get(&ip)
                .is_some_and(|(start, n)| *n >= self.max && now.saturating_duration_since(*start) < self.window)
    }

    /// Counts a failed login from `ip`.
    pub fn record_failure(&mut self, now: Instant, ip: IpAddr) {
        if self.max == 0 {
            return;
        }
        let window = self.window;
        let expired = |start: Instant| now.saturating_duration_since(start) >= window;
        if !self.entries.contains_key(&ip) && self.entries.len() >= self.capacity {
            self.entries.retain(|_, (start, _)| !expired(*start));
            if self.entries.len() >= self.capacity {
                return;
            }
        }
        let entry = self.entries.entry(ip).or_insert((now, 0));
        if expired(entry.0) {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }

    /// Addresses tracked now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no address is tracked.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_within_the_window_and_forgets_after_it() {
        #[allow(clippy::disallowed_methods)]
        let t0 = Instant::now();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let mut l = FailureLimiter::new(3, Duration::from_secs(60), 1);
        for _ in 0..3 {
            assert!(!l.is_limited(t0, ip));
            l.record_failure(t0, ip);
        }
        assert!(l.is_limited(t0 + Duration::from_secs(59), ip));
        assert!(!l.is_limited(t0, other));
        // Full (capacity 1) and nothing expired: the other address is not tracked.
        l.record_failure(t0, other);
        assert_eq!(l.len(), 1);
        assert!(!l.is_limited(t0 + Duration::from_secs(60), ip));
        // Expired entries make room.
        l.record_failure(t0 + Duration::from_secs(61), other);
        assert_eq!(l.len(), 1);
        assert!(!l.is_limited(t0 + Duration::from_secs(61), ip));
    }
}
