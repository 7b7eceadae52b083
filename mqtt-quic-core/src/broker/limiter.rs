//! Failed logins per source address: after `max` failures within `window`, an address's next
//! CONNECTs are refused (Connection rate exceeded, 0x9F) without spending a password
//! verification on them, until the window has passed. IPv6 addresses count by their /64 (one
//! host usually has a whole /64 to draw addresses from); IPv4 ones one by one.
//!
//! Bounded: at most `capacity` addresses are tracked. When full, entries whose window has
//! passed are dropped (oldest first, each in logarithmic time); if none has, a new address is not
//! tracked (an attacker with that many addresses is beyond what a per-address limit can stop;
//! the bounds on verifications in flight still hold).

use crate::timers::TimerIndex;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

/// Failures per address in a fixed window.
#[derive(Debug)]
pub struct FailureLimiter {
    max: u32,
    window: Duration,
    capacity: usize,
    /// Per address: when its window started, and its failures since.
    entries: BTreeMap<IpAddr, (Instant, u32)>,
    /// The same addresses by window start, to find expired ones without a scan.
    by_start: TimerIndex<IpAddr>,
}

/// The key an address counts under: itself for IPv4, its /64 for IPv6.
fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

impl FailureLimiter {
    /// Allows `max` failures per `window` from one address, tracking at most `capacity`
    /// addresses. `max == 0` turns the limit off.
    pub fn new(max: u32, window: Duration, capacity: usize) -> FailureLimiter {
        FailureLimiter { max, window, capacity, entries: BTreeMap::new(), by_start: TimerIndex::new() }
    }

    /// Whether `ip` has used up its failures for now.
    pub fn is_limited(&self, now: Instant, ip: IpAddr) -> bool {
        self.max > 0
            && self
                .entries
                .get(&key(ip))
                .is_some_and(|(start, n)| *n >= self.max && now.saturating_duration_since(*start) < self.window)
    }

    /// Counts a failed login from `ip`.
    pub fn record_failure(&mut self, now: Instant, ip: IpAddr) {
        if self.max == 0 {
            return;
        }
        let ip = key(ip);
        let window = self.window;
        let expired = |start: Instant| now.saturating_duration_since(start) >= window;
        if !self.entries.contains_key(&ip) {
            // Windows that started at or before `cutoff` have passed.
            let cutoff = now.checked_sub(window);
            while self.entries.len() >= self.capacity {
                let Some(old) = cutoff.and_then(|c| self.by_start.pop_due(c)) else { return };
                self.entries.remove(&old);
            }
        }
        let entry = self.entries.entry(ip).or_insert((now, 0));
        if entry.1 == 0 || expired(entry.0) {
            *entry = (now, 0);
            self.by_start.set(ip, Some(now));
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

    #[test]
    fn ipv6_addresses_count_by_their_64() {
        #[allow(clippy::disallowed_methods)]
        let t0 = Instant::now();
        let mut l = FailureLimiter::new(2, Duration::from_secs(60), 100);
        l.record_failure(t0, "2001:db8:1:2::1".parse().unwrap());
        l.record_failure(t0, "2001:db8:1:2:ffff::9".parse().unwrap());
        assert!(l.is_limited(t0, "2001:db8:1:2::77".parse().unwrap()), "same /64");
        assert!(!l.is_limited(t0, "2001:db8:1:3::1".parse().unwrap()), "another /64");
        l.record_failure(t0, "::ffff:192.0.2.1".parse().unwrap());
        l.record_failure(t0, "192.0.2.1".parse().unwrap());
        assert!(l.is_limited(t0, "192.0.2.1".parse().unwrap()), "IPv4-mapped is IPv4");
    }
}
