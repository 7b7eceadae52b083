//! Topic aliases a sender chooses for the PUBLISHes it sends (MQTT 5, 3.3.2.3.4): the first
//! PUBLISH to a topic carries the topic and a new alias, later ones an empty topic and the alias,
//! so a long topic crosses the link once per connection instead of once per message. The table
//! holds at most the receiver's Topic Alias Maximum entries; when it is full, the alias used
//! least recently is given to the new topic. It lives and dies with one connection
//! [MQTT-3.3.2-7].

use mqtt_proto::bytes::Bytes;
use mqtt_proto::{Publish, TopicName};
use std::num::NonZeroU16;

/// Most aliases used towards one client, whatever it accepts: each holds a copy of its topic
/// for the life of the connection (up to the broker's topic length limit).
pub const MAX_OUTGOING_ALIASES: u16 = 64;

/// Topics this short are sent as they are: an empty topic plus the alias property is no smaller.
const MIN_ALIASED_TOPIC: usize = 4;

/// The alias table for one connection's outgoing PUBLISHes.
///
/// A plain vector indexed by alias: at most [`MAX_OUTGOING_ALIASES`] entries, so finding a topic
/// is a short scan (lengths compared first) and the least recently used entry is looked for only
/// when a new topic needs a slot in a full table; a delivery on a known topic costs no hashing
/// and no allocation.
#[derive(Debug, Default)]
pub struct OutgoingAliases {
    /// The receiver's Topic Alias Maximum, capped (0: no aliases).
    max: u16,
    /// Per alias (index alias - 1): its topic (our own copy) and when it was last used.
    by_alias: Vec<(TopicName, u64)>,
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
    /// Size; a new alias is only set up when the PUBLISH still fits with it. (A known alias never
    /// makes a PUBLISH bigger: the topic it replaces has at least 4 bytes, the alias takes 3.)
    pub fn apply(&mut self, publish: &mut Publish, fits: impl Fn(&Publish) -> bool) {
        let len = publish.topic.as_str().len();
        if self.max == 0 || len < MIN_ALIASED_TOPIC {
            return;
        }
        self.clock += 1;
        let known = self.by_alias.iter().position(|(t, _)| t.as_str().len() == len && *t == publish.topic);
        if let Some(i) = known {
            self.by_alias[i].1 = self.clock;
            publish.topic = TopicName::empty();
            publish.properties.topic_alias = NonZeroU16::new(i as u16 + 1);
            return;
        }
        let slot = if self.by_alias.len() < usize::from(self.max) {
            self.by_alias.len()
        } else {
            match self.by_alias.iter().enumerate().min_by_key(|(_, (_, used))| *used) {
                Some((i, _)) => i,
                None => return,
            }
        };
        let alias = NonZeroU16::new(slot as u16 + 1);
        let mut candidate = publish.clone();
        candidate.properties.topic_alias = alias;
        if !fits(&candidate) {
            return;
        }
        // The table keeps its own copy of the topic: the PUBLISH's is a slice of its publisher's
        // receive buffer, which it must not hold for the life of this connection.
        let topic = TopicName::from_bytes(Bytes::copy_from_slice(publish.topic.as_str().as_bytes()))
            .unwrap_or_else(|_| publish.topic.clone());
        if slot < self.by_alias.len() {
            self.by_alias[slot] = (topic, self.clock);
        } else {
            self.by_alias.push((topic, self.clock));
        }
        publish.properties.topic_alias = alias;
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
        // A known alias never makes a PUBLISH bigger.
        let plain = msg("abcd");
        let mut p = plain.clone();
        tight.apply(&mut p, |_| false);
        assert_eq!((p.topic.as_str(), p.properties.topic_alias.map(|n| n.get())), ("", Some(1)));
        let size = |m: &Publish| m.encoded_len(mqtt_proto::Protocol::V5).unwrap();
        assert!(size(&p) <= size(&plain));
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
