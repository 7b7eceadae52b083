//! Retained messages: the last retained message of each topic, found by topic filter.
//!
//! Stored in a trie of topic levels, so a subscription's filter walks only the branches it can
//! match (`+` fans out over one level's children, `#` takes a whole subtree) instead of testing
//! every retained topic. Message expiry is honoured: an expired message is never sent, and the
//! expiry interval of one that is sent is reduced by the time it waited [MQTT-3.3.2-6].

use mqtt_proto::{Publish, TopicFilter};
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
}

#[derive(Debug, Clone)]
struct Stored {
    publish: Publish,
    stored_at: Instant,
}

#[derive(Debug, Default)]
struct Node {
    children: BTreeMap<Box<str>, Node>,
    message: Option<Stored>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.message.is_none()
    }
}

/// The retained message store.
#[derive(Debug)]
pub struct RetainedStore {
    root: Node,
    count: usize,
    max: usize,
}

impl RetainedStore {
    /// A store holding at most `max` messages.
    pub fn new(max: usize) -> RetainedStore {
        RetainedStore { root: Node::default(), count: 0, max }
    }

    /// Number of retained messages.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether none is retained.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Retains `publish` for its topic (replacing the previous one), or deletes the topic's
    /// retained message when the payload is empty [MQTT-3.3.1-6].
    pub fn set(&mut self, now: Instant, publish: &Publish) -> Result<(), RetainError> {
        let levels: Vec<&str> = publish.topic.as_str().split('/').collect();
        if publish.payload.is_empty() {
            if remove(&mut self.root, &levels) {
                self.count -= 1;
            }
            return Ok(());
        }
        let mut node = &mut self.root;
        for level in &levels {
            if !node.children.contains_key(*level) && self.count >= self.max {
                return Err(RetainError::Full(self.count));
            }
            node = node.children.entry((*level).into()).or_default();
        }
        if node.message.is_none() {
            if self.count >= self.max {
                return Err(RetainError::Full(self.count));
            }
            self.count += 1;
        }
        let mut stored = publish.clone();
        stored.dup = false;
        stored.retain = true;
        node.message = Some(Stored { publish: stored, stored_at: now });
        Ok(())
    }

    /// The retained messages whose topics match `filter` (a shared filter matches by its inner
    /// filter), with their remaining expiry; expired ones are left out.
    pub fn matching(&self, now: Instant, filter: &TopicFilter) -> Vec<Publish> {
        let levels: Vec<&str> = filter.match_filter().split('/').collect();
        let mut out = Vec::new();
        walk(&self.root, &levels, 0, now, &mut out);
        out
    }

    /// Drops every expired message.
    pub fn purge_expired(&mut self, now: Instant) {
        self.count -= purge(&mut self.root, now);
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

fn walk(node: &Node, levels: &[&str], depth: usize, now: Instant, out: &mut Vec<Publish>) {
    let Some((level, rest)) = levels.split_first() else {
        out.extend(node.message.as_ref().and_then(|m| live(m, now)));
        return;
    };
    // `$` topics are not matched by a wildcard in the first level [MQTT-4.7.2-1].
    let visible = |name: &str| depth > 0 || !name.starts_with('$');
    match *level {
        "#" => {
            // `#` also matches the parent level itself ("a/#" matches "a").
            out.extend(node.message.as_ref().filter(|_| depth > 0).and_then(|m| live(m, now)));
            for (name, child) in &node.children {
                if visible(name) {
                    subtree(child, now, out);
                }
            }
        }
        "+" => {
            for (name, child) in &node.children {
                if visible(name) {
                    walk(child, rest, depth + 1, now, out);
                }
            }
        }
        literal => {
            if let Some(child) = node.children.get(literal) {
                walk(child, rest, depth + 1, now, out);
            }
        }
    }
}

fn subtree(node: &Node, now: Instant, out: &mut Vec<Publish>) {
    out.extend(node.message.as_ref().and_then(|m| live(m, now)));
    for child in node.children.values() {
        subtree(child, now, out);
    }
}

fn remove(node: &mut Node, levels: &[&str]) -> bool {
    match levels.split_first() {
        None => node.message.take().is_some(),
        Some((level, rest)) => {
            let Some(child) = node.children.get_mut(*level) else { return false };
            let removed = remove(child, rest);
            if child.is_empty() {
                node.children.remove(*level);
            }
            removed
        }
    }
}

fn purge(node: &mut Node, now: Instant) -> usize {
    let mut n = 0;
    if node.message.as_ref().is_some_and(|m| live(m, now).is_none()) {
        node.message = None;
        n += 1;
    }
    node.children.retain(|_, child| {
        n += purge(child, now);
        !child.is_empty()
    });
    n
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
        let mut t: Vec<String> =
            store.matching(now, &TopicFilter::new(filter).unwrap()).into_iter().map(|p| p.topic.to_string()).collect();
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
        let mut s = RetainedStore::new(100);
        for topic in ["a", "a/b", "a/b/c", "x/b", "$SYS/uptime"] {
            s.set(t0, &msg(topic, "v1")).unwrap();
        }
        s.set(t0, &msg("a/b", "v2")).unwrap();
        assert_eq!(s.len(), 5);
        let got = s.matching(t0, &TopicFilter::new("a/b").unwrap());
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
        let mut s = RetainedStore::new(2);
        s.set(t0, &msg("a", "1")).unwrap();
        s.set(t0, &msg("b", "1")).unwrap();
        assert_eq!(s.set(t0, &msg("c", "1")), Err(RetainError::Full(2)));
        assert!(s.set(t0, &msg("a", "2")).is_ok());
    }

    #[test]
    fn expiry_counts_down_and_removes() {
        let t0 = now();
        let mut s = RetainedStore::new(10);
        let mut m = msg("t", "x");
        m.properties.message_expiry_interval = Some(10);
        s.set(t0, &m).unwrap();
        let later = s.matching(t0 + Duration::from_secs(4), &TopicFilter::new("t").unwrap());
        assert_eq!(later[0].properties.message_expiry_interval, Some(6));
        assert!(s.matching(t0 + Duration::from_secs(10), &TopicFilter::new("t").unwrap()).is_empty());
        s.purge_expired(t0 + Duration::from_secs(11));
        assert!(s.is_empty());
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
            let mut s = RetainedStore::new(1000);
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
