//! A deadline per key, ordered, for machines that hold many sessions: the next deadline is
//! found without looking at every session.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

/// Each key's one armed deadline.
#[derive(Debug, Default)]
pub struct TimerIndex<K: Ord + Copy> {
    by_time: BTreeSet<(Instant, K)>,
    by_key: BTreeMap<K, Instant>,
}

impl<K: Ord + Copy> TimerIndex<K> {
    /// An empty index.
    pub fn new() -> TimerIndex<K> {
        TimerIndex { by_time: BTreeSet::new(), by_key: BTreeMap::new() }
    }

    /// Sets `key`'s deadline (`None` disarms it).
    pub fn set(&mut self, key: K, at: Option<Instant>) {
        if let Some(old) = self.by_key.remove(&key) {
            self.by_time.remove(&(old, key));
        }
        if let Some(at) = at {
            self.by_key.insert(key, at);
            self.by_time.insert((at, key));
        }
    }

    /// The earliest deadline.
    pub fn next(&self) -> Option<Instant> {
        self.by_time.first().map(|(t, _)| *t)
    }

    /// Takes out a key whose deadline is at or before `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<K> {
        let (at, key) = *self.by_time.first()?;
        if at > now {
            return None;
        }
        self.by_time.pop_first();
        self.by_key.remove(&key);
        Some(key)
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
}
