//! Topic aliases a sender chooses for the PUBLISHes it sends (MQTT 5, 3.3.2.3.4): the first
//! PUBLISH to a topic carries the topic and a new alias, later ones an empty topic and the alias,
//! so a long topic crosses the link once per connection instead of once per message. The table
//! holds at most the receiver's Topic Alias Maximum entries; when it is full, the alias used
//! least recently is given to the new topic. It lives and dies with one connection
//! [MQTT-3.3.2-7].

use mqtt_proto::bytes::Bytes;
use mqtt_proto::{Publish, TopicName};
use std::collections::{BTreeSet, HashMap};
use std::num::NonZeroU16;

/// Most aliases used towards one client, whatever it accepts: each holds a copy of its topic
/// for the life of the connection (up to the broker's topic length limit).
pub const MAX_OUTGOING_ALIASES: u16 = 64;

/// Topics this short are sent as they are: an empty topic plus the alias property is no smaller.
const MIN_ALIASED_TOPIC: usize = 4;

/// The alias table for one connection's outgoing PUBLISHes.
#[derive(Debug, Default)]
pub struct OutgoingAliases {
    /// The receiver's Topic Alias Maximum (0: no aliases).
    max: u16,
    /// Per topic: its alias and when it was last used.
    by_topic: HashMap<TopicName, (u16, u64)>,
    /// Per alias (index alias - 1): its topic.
    by_alias: Vec<TopicName>,
    /// Aliases by last use, least recent first.
    lru: BTreeSet<(u64, u16)>,
    clock: u64,
}

impl OutgoingAliases {
    /// A table for a receiver that accepts `max` aliases (at most [`MAX_OUTGOING_ALIASES`] are
    /// used).
    pub fn new(max: u16) -> OutgoingAliases {
        OutgoingAliases { max: max.min(MAX_OUTGOING_ALIASES), ..OutgoingAliases::default() }
    }

    /// Rewrites `publish` to use an alias when that makes sense: an empty topic for a topic
    /// seen before, or the topic plus a new alias (taking the least recently used one when the
    /// table is full). `fits` says whether a candidate is within the receiver's Maximum Packet
    /// Size; a new alias is only set up when the PUBLISH still fits with it.
    pub fn apply(&mut self, publish: &mut Publish, fits: impl Fn(&Publish) -> bool) {
        if self.max == 0 || publish.topic.as_str().len() < MIN_ALIASED_TOPIC {
            return;
        }
        self.clock += 1;
        if let Some(&(alias, used)) = self.by_topic.get(&publish.topic) {
            // Known: an empty topic and the alias, unless even that would not fit (the
            // varints of the lengths can grow by a byte); then the topic as it is.
            let mut candidate = publish.clone();
            candidate.topic = TopicName::empty();
            candidate.properties.topic_alias = NonZeroU16::new(alias);
            if !fits(&candidate) {
                return;
            }
            self.lru.remove(&(used, alias));
            self.lru.insert((self.clock, alias));
            if let Some(entry) = self.by_topic.get_mut(&publish.topic) {
                entry.1 = self.clock;
            }
            *publish = candidate;
            return;
        }
        let alias = if self.by_alias.len() < usize::from(self.max) {
            self.by_alias.len() as u16 + 1
        } else {
            match self.lru.first() {
                Some(&(_, alias)) => alias,
                None => return,
            }
        };
        let mut candidate = publish.clone();
        candidate.properties.topic_alias = NonZeroU16::new(alias);
        if !fits(&candidate) {
            return;
        }
        // Take the alias over (from its least recent topic, when the table was full). The table
        // keeps its own copy of the topic: the PUBLISH's is a slice of its publisher's receive
        // buffer, which it must not hold for the life of this connection.
        let topic = TopicName::from_bytes(Bytes::copy_from_slice(publish.topic.as_str().as_bytes()))
            .unwrap_or_else(|_| publish.topic.clone());
        if let Some(old) = self.by_alias.get(usize::from(alias) - 1).cloned() {
            if let Some((_, used)) = self.by_topic.remove(&old) {
                self.lru.remove(&(used, alias));
            }
            self.by_alias[usize::from(alias) - 1] = topic.clone();
        } else {
            self.by_alias.push(topic.clone());
        }
        self.by_topic.insert(topic, (alias, self.clock));
        self.lru.insert((self.clock, alias));
        publish.properties.topic_alias = NonZeroU16::new(alias);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(topic: &str) -> Publish {
        Publish::new(TopicName::new(topic).unwrap(), "x")
    }

    fn sent(a: &mut OutgoingAliases, topic: &str) -> (String, Option<u16>) {
        let mut p = msg(topic);
        a.apply(&mut p, |_| true);
        (p.topic.to_string(), p.properties.topic_alias.map(|n| n.get()))
    }

    #[test]
    fn first_use_sends_the_topic_then_only_the_alias() {
        let mut a = OutgoingAliases::new(2);
        assert_eq!(sent(&mut a, "a/long/topic"), ("a/long/topic".into(), Some(1)));
        assert_eq!(sent(&mut a, "a/long/topic"), ("".into(), Some(1)));
        assert_eq!(sent(&mut a, "b/b/b"), ("b/b/b".into(), Some(2)));
        assert_eq!(sent(&mut a, "a/long/topic"), ("".into(), Some(1)));
    }

    #[test]
    fn a_full_table_reuses_the_least_recently_used_alias() {
        let mut a = OutgoingAliases::new(2);
        sent(&mut a, "a/aa");
        sent(&mut a, "b/bb");
        sent(&mut a, "a/aa");
        // "b/bb" is the least recently used: "c/cc" takes its alias, 2.
        assert_eq!(sent(&mut a, "c/cc"), ("c/cc".into(), Some(2)));
        assert_eq!(sent(&mut a, "b/bb"), ("b/bb".into(), Some(1)), "then \"a/aa\" is the oldest");
        assert_eq!(sent(&mut a, "c/cc"), ("".into(), Some(2)));
    }

    #[test]
    fn no_aliases_without_a_maximum_or_room() {
        let mut none = OutgoingAliases::new(0);
        assert_eq!(sent(&mut none, "abcd"), ("abcd".into(), None));
        let mut tight = OutgoingAliases::new(4);
        let mut p = msg("abcd");
        tight.apply(&mut p, |_| false);
        assert_eq!(p.properties.topic_alias, None, "no alias when it would not fit");
        assert_eq!(sent(&mut tight, "abcd"), ("abcd".into(), Some(1)), "and none was set up");
        // A known alias that would not fit either: the topic goes as it is.
        let mut p = msg("abcd");
        tight.apply(&mut p, |_| false);
        assert_eq!((p.topic.as_str(), p.properties.topic_alias), ("abcd", None));
        // Short topics are never aliased: the alias would not be smaller.
        assert_eq!(sent(&mut tight, "abc"), ("abc".into(), None));
        // However many a client accepts, the table stays small.
        assert_eq!(OutgoingAliases::new(u16::MAX).max, MAX_OUTGOING_ALIASES);
    }

    #[test]
    fn the_table_does_not_hold_the_publishers_buffer() {
        let buffer = Bytes::from(format!("long/topic{}", "x".repeat(1 << 16)));
        let topic = TopicName::from_bytes(buffer.slice(..10)).unwrap();
        let mut p = Publish::new(topic, "x");
        let mut a = OutgoingAliases::new(4);
        a.apply(&mut p, |_| true);
        drop(p);
        assert!(buffer.is_unique());
    }
}
