//! A deadline per key, ordered, for machines that hold many sessions: the next deadline is
//! found without looking at every session. The one timer index of the crate: the QUIC endpoint
//! files its connections here, the broker its sessions, kept sessions and stalled writers, the
//! pool its clients.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

/// Each key's one armed deadline.
///
/// Keys are cloned into both orders, so cheap-to-clone keys (numbers, small tuples) suit it
/// best; a `String` key works where timers change rarely (kept sessions).
#[derive(Debug)]
pub struct TimerIndex<K: Ord + Clone> {
    by_time: BTreeSet<(Instant, K)>,
    by_key: BTreeMap<K, Instant>,
}

impl<K: Ord + Clone> Default for TimerIndex<K> {
    fn default() -> TimerIndex<K> {
        TimerIndex::new()
    }
}

impl<K: Ord + Clone> TimerIndex<K> {
    /// An empty index.
    pub fn new() -> TimerIndex<K> {
        TimerIndex { by_time: BTreeSet::new(), by_key: BTreeMap::new() }
    }

    /// Sets `key`'s deadline (`None` disarms it). Setting the deadline it already has touches
    /// nothing: callers re-file after every input, and most find their deadline unchanged.
    pub fn set(&mut self, key: K, at: Option<Instant>) {
        if self.by_key.get(&key) == at.as_ref() {
            return;
        }
        if let Some(old) = self.by_key.remove(&key) {
            self.by_time.remove(&(old, key.clone()));
        }
        if let Some(at) = at {
            self.by_key.insert(key.clone(), at);
            self.by_time.insert((at, key));
        }
    }

    /// Disarms `key` (as `set(key, None)`), without needing an owned key.
    pub fn remove(&mut self, key: &K) {
        if let Some(old) = self.by_key.remove(key) {
            self.by_time.remove(&(old, key.clone()));
        }
    }

    /// `key`'s armed deadline.
    pub fn deadline(&self, key: &K) -> Option<Instant> {
        self.by_key.get(key).copied()
    }

    /// The earliest deadline.
    pub fn next(&self) -> Option<Instant> {
        self.by_time.first().map(|(t, _)| *t)
    }

    /// The keys whose deadline is at or before `now`, earliest first, left armed (for a caller
    /// that re-files each one itself after handling it).
    pub fn due(&self, now: Instant) -> impl Iterator<Item = &K> + '_ {
        self.by_time.iter().take_while(move |(t, _)| *t <= now).map(|(_, k)| k)
    }

    /// Takes out a key whose deadline is at or before `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<K> {
        if self.by_time.first()?.0 > now {
            return None;
        }
        let (_, key) = self.by_time.pop_first()?;
        self.by_key.remove(&key);
        Some(key)
    }

    /// Whether no deadline is armed.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// How many keys have a deadline armed.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn earliest_first_rearming_replaces() {
        #[allow(clippy::disallowed_methods)]
        let t0 = Instant::now();
        let mut idx = TimerIndex::new();
        idx.set(1u32, Some(t0 + Duration::from_secs(3)));
        idx.set(2, Some(t0 + Duration::from_secs(1)));
        idx.set(1, Some(t0 + Duration::from_secs(2)));
        assert_eq!(idx.next(), Some(t0 + Duration::from_secs(1)));
        assert_eq!(idx.pop_due(t0), None);
        assert_eq!(idx.pop_due(t0 + Duration::from_secs(5)), Some(2));
        assert_eq!(idx.pop_due(t0 + Duration::from_secs(5)), Some(1));
        assert_eq!(idx.pop_due(t0 + Duration::from_secs(5)), None);
        idx.set(3, None);
        assert_eq!(idx.next(), None);
    }

    #[test]
    fn owned_keys_remove_and_due_leave_the_rest() {
        #[allow(clippy::disallowed_methods)]
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut idx = TimerIndex::new();
        idx.set(("b".to_string(), 0u8), Some(t0 + s(1)));
        idx.set(("a".to_string(), 1), Some(t0 + s(1)));
        idx.set(("a".to_string(), 0), Some(t0 + s(4)));
        // Re-filing the same deadline changes nothing.
        idx.set(("a".to_string(), 1), Some(t0 + s(1)));
        assert_eq!(idx.len(), 3);
        let due: Vec<_> = idx.due(t0 + s(2)).cloned().collect();
        assert_eq!(due, [("a".to_string(), 1), ("b".to_string(), 0)]);
        assert_eq!(idx.len(), 3, "due leaves the entries armed");
        assert_eq!(idx.deadline(&("a".to_string(), 0)), Some(t0 + s(4)));
        idx.remove(&("a".to_string(), 0));
        idx.remove(&("zz".to_string(), 0));
        assert_eq!(idx.deadline(&("a".to_string(), 0)), None);
        assert_eq!(idx.pop_due(t0 + s(9)), Some(("a".to_string(), 1)));
        assert_eq!(idx.pop_due(t0 + s(9)), Some(("b".to_string(), 0)));
        assert!(idx.is_empty());
    }
}
