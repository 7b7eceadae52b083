//! Topic aliases a sender chooses for the PUBLISHes it sends (MQTT 5, 3.3.2.3.4): the first
//! PUBLISH to a topic carries the topic and a new alias, later ones an empty topic and the alias,
//! so a long topic crosses the link once per connection instead of once per message. The table
//! holds at most the receiver's Topic Alias Maximum entries; when it is full, the alias used
//! least recently is given to the new topic. It lives and dies with one connection
//! [MQTT-3.3.2-7].

use mqtt_proto::{Publish, TopicName};
use std::collections::{BTreeSet, HashMap};
use std::num::NonZeroU16;

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
    /// A table for a receiver that accepts `max` aliases.
    pub fn new(max: u16) -> OutgoingAliases {
        OutgoingAliases { max, ..OutgoingAliases::default() }
    }

    /// Rewrites `publish` to use an alias when that makes sense: an empty topic for a topic
    /// seen before, or the topic plus a new alias (taking the least recently used one when the
    /// table is full). `fits` says whether a candidate is within the receiver's Maximum Packet
    /// Size; a new alias is only set up when the PUBLISH still fits with it.
    pub fn apply(&mut self, publish: &mut Publish, fits: impl Fn(&Publish) -> bool) {
        if self.max == 0 || publish.topic.is_empty() {
            return;
        }
        self.clock += 1;
        if let Some(&(alias, used)) = self.by_topic.get(&publish.topic) {
            // Known: an empty topic and the alias (always smaller than the topic itself).
            self.lru.remove(&(used, alias));
            self.lru.insert((self.clock, alias));
            self.by_topic.insert(publish.topic.clone(), (alias, self.clock));
            publish.topic = TopicName::empty();
            publish.properties.topic_alias = NonZeroU16::new(alias);
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
        // Take the alias over (from its least recent topic, when the table was full).
        if let Some(old) = self.by_alias.get(usize::from(alias) - 1).cloned() {
            if let Some((_, used)) = self.by_topic.remove(&old) {
                self.lru.remove(&(used, alias));
            }
            self.by_alias[usize::from(alias) - 1] = publish.topic.clone();
        } else {
            self.by_alias.push(publish.topic.clone());
        }
        self.by_topic.insert(publish.topic.clone(), (alias, self.clock));
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
        assert_eq!(sent(&mut a, "b"), ("b".into(), Some(2)));
        assert_eq!(sent(&mut a, "a/long/topic"), ("".into(), Some(1)));
    }

    #[test]
    fn a_full_table_reuses_the_least_recently_used_alias() {
        let mut a = OutgoingAliases::new(2);
        sent(&mut a, "a");
        sent(&mut a, "b");
        sent(&mut a, "a");
        // "b" is the least recently used: "c" takes its alias, 2.
        assert_eq!(sent(&mut a, "c"), ("c".into(), Some(2)));
        assert_eq!(sent(&mut a, "b"), ("b".into(), Some(1)), "then \"a\" is the oldest");
        assert_eq!(sent(&mut a, "c"), ("".into(), Some(2)));
    }

    #[test]
    fn no_aliases_without_a_maximum_or_room() {
        let mut none = OutgoingAliases::new(0);
        assert_eq!(sent(&mut none, "a"), ("a".into(), None));
        let mut tight = OutgoingAliases::new(4);
        let mut p = msg("a");
        tight.apply(&mut p, |_| false);
        assert_eq!(p.properties.topic_alias, None, "no alias when it would not fit");
        assert_eq!(sent(&mut tight, "a"), ("a".into(), Some(1)), "and none was set up");
    }
}
