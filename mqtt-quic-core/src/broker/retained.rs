//! Retained messages: the last retained message of each topic, found by topic filter.
//!
//! Stored in a trie of topic levels, so a subscription's filter walks only the branches it can
//! match (`+` fans out over one level's children, `#` takes a whole subtree) instead of testing
//! every retained topic. Message expiry is honoured: an expired message is never sent, and the
//! expiry interval of one that is sent is reduced by the time it waited [MQTT-3.3.2-6];
//! [`RetainedStore::purge_expired`] frees expired ones.
//!
//! The store is bounded twice, by messages and by bytes, and keeps its own copy of each message
//! (see [`Publish::detached`]), so a small retained message never holds a large receive buffer.
//! Every walk of the trie, and its drop, is a loop with an explicit stack: topic depth is chosen
//! by clients.

use mqtt_proto::{Protocol, Publish, TopicFilter};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use thiserror::Error;

/// Why a retained message was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum RetainError {
    /// The store holds its maximum number of messages (Quota exceeded, 0x97).
    #[error("retained message store is full ({0} messages)")]
    Full(usize),
    /// The store holds its maximum number of bytes (Quota exceeded, 0x97).
    #[error("retained message store is full ({0} bytes)")]
    FullBytes(usize),
}

#[derive(Debug, Clone)]
struct Stored {
    publish: Publish,
    stored_at: Instant,
    /// What it counts against the byte budget.
    cost: usize,
}

#[derive(Debug, Default)]
struct Node {
    children: BTreeMap<Box<str>, Node>,
    message: Option<Stored>,
}

impl Drop for Node {
    /// Frees the subtree with a loop: the default drop would recurse once per level.
    fn drop(&mut self) {
        let mut stack: Vec<Node> = std::mem::take(&mut self.children).into_values().collect();
        while let Some(mut node) = stack.pop() {
            stack.extend(std::mem::take(&mut node.children).into_values());
        }
    }
}

/// The retained message store.
#[derive(Debug)]
pub struct RetainedStore {
    root: Node,
    count: usize,
    bytes: usize,
    max: usize,
    max_bytes: usize,
}

/// What a message costs the store: its encoded size (topic, payload, properties) plus the
/// topic again for the trie's keys.
fn cost(publish: &Publish) -> usize {
    publish.encoded_len(Protocol::V5).unwrap_or(usize::MAX / 2) + publish.topic.as_str().len()
}

impl RetainedStore {
    /// A store holding at most `max` messages and `max_bytes` bytes of them.
    pub fn new(max: usize, max_bytes: usize) -> RetainedStore {
        RetainedStore { root: Node::default(), count: 0, bytes: 0, max, max_bytes }
    }

    /// Number of retained messages.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Bytes the retained messages take (as counted against the byte budget).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether none is retained.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether a message is retained for `topic` (expired or not).
    pub fn contains(&self, topic: &str) -> bool {
        let mut node = &self.root;
        for level in topic.split('/') {
            match node.children.get(level) {
                Some(child) => node = child,
                None => return false,
            }
        }
        node.message.is_some()
    }

    /// Retains `publish` for its topic (replacing the previous one), or deletes the topic's
    /// retained message when the payload is empty [MQTT-3.3.1-6].
    pub fn set(&mut self, now: Instant, publish: &Publish) -> Result<(), RetainError> {
        let levels: Vec<&str> = publish.topic.as_str().split('/').collect();
        if publish.payload.is_empty() {
            if let Some(old) = self.remove(&levels) {
                self.count -= 1;
                self.bytes -= old.cost;
            }
            return Ok(());
        }
        let new_cost = cost(publish);
        let old_cost = self.get(&levels).map_or(0, |m| m.cost);
        let replaces = old_cost > 0;
        if !replaces && self.count >= self.max {
            return Err(RetainError::Full(self.count));
        }
        if self.bytes - old_cost + new_cost > self.max_bytes {
            return Err(RetainError::FullBytes(self.bytes));
        }
        let mut node = &mut self.root;
        for level in &levels {
            node = node.children.entry((*level).into()).or_default();
        }
        let mut stored = publish.detached();
        stored.dup = false;
        stored.retain = true;
        node.message = Some(Stored { publish: stored, stored_at: now, cost: new_cost });
        if !replaces {
            self.count += 1;
        }
        self.bytes = self.bytes - old_cost + new_cost;
        Ok(())
    }

    fn get(&self, levels: &[&str]) -> Option<&Stored> {
        let mut node = &self.root;
        for level in levels {
            node = node.children.get(*level)?;
        }
        node.message.as_ref()
    }

    /// Takes the message at `levels` out and drops the nodes left empty, deepest first.
    fn remove(&mut self, levels: &[&str]) -> Option<Stored> {
        let mut node = &mut self.root;
        for level in levels {
            node = node.children.get_mut(*level)?;
        }
        let removed = node.message.take()?;
        if !node.children.is_empty() {
            return Some(removed);
        }
        // The now empty end of the path goes, with the chain of nodes that held nothing but it:
        // cut below the deepest node that holds something else (one pass down, one cut).
        let mut cut = 0;
        let mut node = &self.root;
        for (depth, level) in levels.iter().enumerate() {
            if node.message.is_some() || node.children.len() > 1 {
                cut = depth;
            }
            node = node.children.get(*level)?;
        }
        let mut parent = &mut self.root;
        for level in &levels[..cut] {
            parent = parent.children.get_mut(*level)?;
        }
        parent.children.remove(levels[cut]);
        Some(removed)
    }

    /// The retained messages whose topics match `filter` (a shared filter matches by its inner
    /// filter), with their remaining expiry, at most `limit` of them (in topic order); expired
    /// ones are left out.
    pub fn matching(&self, now: Instant, filter: &TopicFilter, limit: usize) -> Vec<Publish> {
        let levels: Vec<&str> = filter.match_filter().split('/').collect();
        let mut out = Vec::new();
        // Depth-first with an explicit stack: (node, depth in the filter).
        let mut stack: Vec<(&Node, usize)> = vec![(&self.root, 0)];
        while let Some((node, depth)) = stack.pop() {
            if out.len() >= limit {
                break;
            }
            let Some(level) = levels.get(depth) else {
                out.extend(node.message.as_ref().and_then(|m| live(m, now)));
                continue;
            };
            // `$` topics are not matched by a wildcard in the first level [MQTT-4.7.2-1].
            let visible = |name: &str| depth > 0 || !name.starts_with('$');
            match *level {
                "#" => {
                    // `#` also matches the parent level itself ("a/#" matches "a").
                    out.extend(node.message.as_ref().filter(|_| depth > 0).and_then(|m| live(m, now)));
                    for (name, child) in node.children.iter() {
                        if visible(name) {
                            subtree(child, now, &mut out, limit);
                        }
                    }
                }
                "+" => {
                    for (name, child) in node.children.iter().rev() {
                        if visible(name) {
                            stack.push((child, depth + 1));
                        }
                    }
                }
                literal => {
                    if let Some(child) = node.children.get(literal) {
                        stack.push((child, depth + 1));
                    }
                }
            }
        }
        out
    }

    /// Drops every expired message.
    pub fn purge_expired(&mut self, now: Instant) {
        // First find them (a read-only walk), then remove each by its topic.
        let mut expired: Vec<String> = Vec::new();
        let mut stack: Vec<&Node> = vec![&self.root];
        while let Some(node) = stack.pop() {
            if let Some(m) = &node.message {
                if live(m, now).is_none() {
                    expired.push(m.publish.topic.as_str().to_string());
                }
            }
            stack.extend(node.children.values());
        }
        for topic in expired {
            let levels: Vec<&str> = topic.split('/').collect();
            if let Some(old) = self.remove(&levels) {
                self.count -= 1;
                self.bytes -= old.cost;
            }
        }
    }
}

/// The expiry-adjusted copy of a stored message, or `None` once it has expired.
fn live(stored: &Stored, now: Instant) -> Option<Publish> {
    let mut p = stored.publish.clone();
    if let Some(secs) = p.properties.message_expiry_interval {
        let waited = now.saturating_duration_since(stored.stored_at);
        let left = Duration::from_secs(u64::from(secs)).checked_sub(waited).filter(|d| !d.is_zero())?;
        p.properties.message_expiry_interval = Some(left.as_secs().max(1) as u32);
    }
    Some(p)
}

/// Every live message in a subtree, in topic order, with a loop, until `out` holds `limit`.
fn subtree(root: &Node, now: Instant, out: &mut Vec<Publish>, limit: usize) {
    let mut stack = vec![root];
    while let Some(node) = stack.pop() {
        if out.len() >= limit {
            return;
        }
        out.extend(node.message.as_ref().and_then(|m| live(m, now)));
        stack.extend(node.children.values().rev());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use mqtt_proto::TopicName;
    use proptest::prelude::*;

    fn msg(topic: &str, payload: &str) -> Publish {
        Publish::new(TopicName::new(topic).unwrap(), Bytes::copy_from_slice(payload.as_bytes()))
    }

    fn topics(store: &RetainedStore, now: Instant, filter: &str) -> Vec<String> {
        let mut t: Vec<String> = store
            .matching(now, &TopicFilter::new(filter).unwrap(), usize::MAX)
            .into_iter()
            .map(|p| p.topic.to_string())
            .collect();
        t.sort();
        t
    }

    #[allow(clippy::disallowed_methods)]
    fn now() -> Instant {
        Instant::now()
    }

    #[test]
    fn set_replace_delete_and_match() {
        let t0 = now();
        let mut s = RetainedStore::new(100, usize::MAX);
        for topic in ["a", "a/b", "a/b/c", "x/b", "$SYS/uptime"] {
            s.set(t0, &msg(topic, "v1")).unwrap();
        }
        s.set(t0, &msg("a/b", "v2")).unwrap();
        assert_eq!(s.len(), 5);
        let got = s.matching(t0, &TopicFilter::new("a/b").unwrap(), usize::MAX);
        assert_eq!(&got[0].payload[..], b"v2");
        assert!(got[0].retain);
        assert_eq!(topics(&s, t0, "a/#"), ["a", "a/b", "a/b/c"]);
        assert_eq!(topics(&s, t0, "+/b"), ["a/b", "x/b"]);
        assert_eq!(topics(&s, t0, "#"), ["a", "a/b", "a/b/c", "x/b"], "no $ topics for a leading wildcard");
        assert_eq!(topics(&s, t0, "$SYS/#"), ["$SYS/uptime"]);
        assert_eq!(topics(&s, t0, "$share/g/x/+"), ["x/b"]);
        s.set(t0, &msg("a/b", "")).unwrap();
        assert_eq!(s.len(), 4);
        assert_eq!(topics(&s, t0, "a/#"), ["a", "a/b/c"]);
    }

    #[test]
    fn full_store_refuses_new_topics_but_replaces() {
        let t0 = now();
        let mut s = RetainedStore::new(2, usize::MAX);
        s.set(t0, &msg("a", "1")).unwrap();
        s.set(t0, &msg("b", "1")).unwrap();
        assert_eq!(s.set(t0, &msg("c", "1")), Err(RetainError::Full(2)));
        assert!(s.set(t0, &msg("a", "2")).is_ok());
    }

    #[test]
    fn expiry_counts_down_and_removes() {
        let t0 = now();
        let mut s = RetainedStore::new(10, usize::MAX);
        let mut m = msg("t", "x");
        m.properties.message_expiry_interval = Some(10);
        s.set(t0, &m).unwrap();
        let later = s.matching(t0 + Duration::from_secs(4), &TopicFilter::new("t").unwrap(), usize::MAX);
        assert_eq!(later[0].properties.message_expiry_interval, Some(6));
        assert!(s.matching(t0 + Duration::from_secs(10), &TopicFilter::new("t").unwrap(), usize::MAX).is_empty());
        s.purge_expired(t0 + Duration::from_secs(11));
        assert!(s.is_empty());
    }

    #[test]
    fn byte_budget_counts_replacements_and_deletions() {
        let t0 = now();
        let one = cost(&msg("a", "0123456789"));
        let mut s = RetainedStore::new(100, 2 * one);
        s.set(t0, &msg("a", "0123456789")).unwrap();
        s.set(t0, &msg("b", "0123456789")).unwrap();
        assert_eq!(s.bytes(), 2 * one);
        assert_eq!(s.set(t0, &msg("c", "0123456789")), Err(RetainError::FullBytes(2 * one)));
        assert_eq!(s.set(t0, &msg("a", "0123456789012")).unwrap_err(), RetainError::FullBytes(2 * one));
        s.set(t0, &msg("a", "9876543210")).unwrap();
        s.set(t0, &msg("a", "")).unwrap();
        assert_eq!(s.bytes(), one);
        s.set(t0, &msg("c", "0123456789")).unwrap();
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn kept_messages_do_not_pin_the_receive_buffer() {
        let buffer = Bytes::from(vec![1u8; 1 << 20]);
        let m = Publish::new(TopicName::new("t").unwrap(), buffer.slice(0..10));
        let mut s = RetainedStore::new(10, usize::MAX);
        s.set(now(), &m).unwrap();
        drop(m);
        // The only other owner of the 1 MiB buffer is gone: the store holds a copy.
        assert!(buffer.is_unique());
    }

    #[test]
    fn a_very_deep_topic_is_walked_and_dropped_without_recursion() {
        let t0 = now();
        let deep = "/".repeat(60_000);
        let mut s = RetainedStore::new(10, usize::MAX);
        s.set(t0, &msg(&deep, "x")).unwrap();
        s.set(t0, &msg(&format!("{deep}a"), "y")).unwrap();
        assert_eq!(s.matching(t0, &TopicFilter::new("#").unwrap(), usize::MAX).len(), 2);
        assert_eq!(s.matching(t0, &TopicFilter::new(format!("{deep}+")).unwrap(), usize::MAX).len(), 2);
        assert_eq!(s.matching(t0, &TopicFilter::new(format!("{deep}a")).unwrap(), usize::MAX).len(), 1);
        s.set(t0, &msg(&deep, "")).unwrap();
        assert_eq!(s.len(), 1);
        drop(s);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

        /// The trie finds exactly the retained topics a plain scan finds.
        #[test]
        fn matches_like_a_naive_scan(
            stored in proptest::collection::vec("(a|b|\\$s|)(/(a|b|c|)){0,2}", 0..30),
            filters in proptest::collection::vec("(a|b|\\+|\\$s)(/(a|b|\\+|)){0,2}(/#)?|#", 1..8),
        ) {
            let t0 = now();
            let mut s = RetainedStore::new(1000, usize::MAX);
            let mut naive = std::collections::BTreeSet::new();
            for topic in stored.iter().filter(|t| !t.is_empty()) {
                s.set(t0, &msg(topic, "x")).unwrap();
                naive.insert(topic.clone());
            }
            for filter in filters {
                let Ok(f) = TopicFilter::new(filter.as_str()) else { continue };
                let expected: Vec<String> = naive.iter().filter(|t| mqtt_proto::topic::matches(&filter, t)).cloned().collect();
                prop_assert_eq!(topics(&s, t0, &filter), expected, "filter {}", f);
            }
        }
    }
}
