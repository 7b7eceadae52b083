//! The subscription index: a trie over topic levels with `+` and `#` children.
//!
//! Matching a topic walks at most one literal child, one `+` child and one `#` set per level,
//! so its cost grows with the topic's depth and the number of matching subscriptions, not with
//! the number of subscriptions. Topics starting with `$` are not matched by filters whose first
//! level is a wildcard [MQTT-4.7.2-1]. Overlapping subscriptions of one session produce one
//! delivery at the highest QoS, carrying every matching subscription identifier; a shared
//! subscription group (`$share/{group}/{filter}`) delivers each message to one member, round
//! robin among those online.

use mqtt_proto::{QoS, SubscriptionId, SubscriptionOptions, TopicFilter, TopicName};
use smallvec::SmallVec;
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasherDefault;

/// A session, as the broker numbers them.
pub type SessionKey = u64;

/// Subscriber keys of data streams (EMQX's multi-stream mode) have this bit, their
/// connection's session key above [`LANE_SEQ_BITS`] and a number of the connection below: the
/// router then knows, for No Local, whose they are.
const LANE_FLAG: SessionKey = 1 << 62;
const LANE_SEQ_BITS: u32 = 24;
/// The highest data-stream number of one connection.
pub(crate) const LANE_SEQ_MAX: u64 = (1 << LANE_SEQ_BITS) - 1;

/// The subscriber key of data stream `seq` of the connection whose session is `owner`.
pub(crate) fn lane_key(owner: SessionKey, seq: u64) -> SessionKey {
    LANE_FLAG | (owner << LANE_SEQ_BITS) | (seq & LANE_SEQ_MAX)
}

/// Whether a subscriber key is a data stream's (see [`lane_key`]).
pub(crate) fn is_lane_key(key: SessionKey) -> bool {
    key & LANE_FLAG != 0 && key & (1 << 63) == 0
}

/// The session a subscriber key belongs to: itself, or a data stream's connection's.
pub(crate) fn owner(key: SessionKey) -> SessionKey {
    if is_lane_key(key) {
        (key & !LANE_FLAG) >> LANE_SEQ_BITS
    } else {
        key
    }
}

/// Subscriber keys standing for another shard of a sharded broker have this bit, the shard
/// above bit 32 and a member number below (see `broker::shard`): its direct subscriptions
/// are one key ([`DIRECT_MEMBER`]), each member of a shared subscription there another.
const SHARD_FLAG: SessionKey = 1 << 61;
/// The member number of a shard's key for its direct (not shared) subscriptions.
pub(crate) const DIRECT_MEMBER: u32 = u32::MAX;

/// The subscriber key standing for `member` of shard `shard`.
pub(crate) fn shard_key(shard: u16, member: u32) -> SessionKey {
    SHARD_FLAG | (u64::from(shard) << 32) | u64::from(member)
}

/// The shard a subscriber key stands for, if it is such a key.
pub(crate) fn shard_of_key(key: SessionKey) -> Option<u16> {
    (key & (1 << 63 | LANE_FLAG | SHARD_FLAG) == SHARD_FLAG).then_some((key >> 32) as u16)
}

/// The subscriptions of this shard's own subscribers, counted per filter, for a sharded broker
/// to tell the other shards what to send it (see `broker::shard`).
#[derive(Debug, Default)]
struct InterestLog {
    /// Subscribers per filter (members, for a shared subscription).
    counts: BTreeMap<TopicFilter, u32>,
    /// Filters whose count changed in a way the other shards must hear about: a direct filter
    /// gained its first or lost its last subscriber, a shared one any member.
    changed: std::collections::BTreeSet<TopicFilter>,
}

impl InterestLog {
    fn note(&mut self, filter: &TopicFilter, added: bool) {
        let count = self.counts.entry(filter.clone()).or_default();
        let before = *count;
        *count = if added { before + 1 } else { before.saturating_sub(1) };
        let after = *count;
        if after == 0 {
            self.counts.remove(filter);
        }
        if filter.shared().is_some() || (before == 0) != (after == 0) {
            self.changed.insert(filter.clone());
        }
    }
}

/// A fixed-key hasher: the index must not depend on unseeded randomness.
type Map<K, V> = HashMap<K, V, BuildHasherDefault<DefaultHasher>>;

/// One subscription of one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// The options it was made with.
    pub options: SubscriptionOptions,
    /// Its MQTT 5 subscription identifier.
    pub subscription_id: Option<SubscriptionId>,
}

#[derive(Debug, Default)]
struct Group {
    /// The whole `$share/{group}/{filter}`, to name the group in deliveries.
    filter: Option<TopicFilter>,
    members: BTreeMap<SessionKey, Entry>,
    /// Round-robin position: the key served last.
    last: Option<SessionKey>,
}

#[derive(Debug, Default)]
struct Subscribers {
    /// Sorted by session. Most topics have a handful of subscribers, where a sorted vector
    /// costs a fraction of a B-tree's memory (one small allocation instead of a node).
    direct: Vec<(SessionKey, Entry)>,
    shared: BTreeMap<Box<str>, Group>,
}

impl Subscribers {
    fn is_empty(&self) -> bool {
        self.direct.is_empty() && self.shared.is_empty()
    }
}

#[derive(Debug, Default)]
struct Node {
    children: Map<Box<str>, Node>,
    plus: Option<Box<Node>>,
    /// Subscriptions ending at this node (the filter's last level is this one).
    exact: Subscribers,
    /// Subscriptions whose filter continues with `#` after this node.
    hash: Subscribers,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.plus.is_none() && self.exact.is_empty() && self.hash.is_empty()
    }
}

/// One message delivery decided by the router.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The receiving session.
    pub session: SessionKey,
    /// The highest QoS among the matching subscriptions (the message's own QoS caps it later).
    pub qos: QoS,
    /// Whether any matching subscription asked for Retain As Published.
    pub retain_as_published: bool,
    /// Identifiers of every matching subscription that has one.
    pub subscription_ids: Vec<SubscriptionId>,
    /// The shared subscription (`$share/...`) that chose this session, if one did: should the
    /// session leave before acknowledging, another member gets the message.
    pub shared: Option<TopicFilter>,
}

/// The subscription index.
#[derive(Debug, Default)]
pub struct Router {
    root: Node,
    /// Each session's filters, so a session can be removed without searching the trie.
    by_session: Map<SessionKey, Vec<TopicFilter>>,
    /// Counts of this shard's own subscriptions, in a sharded broker.
    interest: Option<Box<InterestLog>>,
    count: usize,
}

/// Where in a node a filter lands: the `#` set or the exact set, of a shared group or not.
fn slot(node: &mut Node, hash: bool) -> &mut Subscribers {
    if hash {
        &mut node.hash
    } else {
        &mut node.exact
    }
}

impl Router {
    /// An empty index.
    pub fn new() -> Router {
        Router::default()
    }

    /// From now on, counts the subscriptions of this shard's own subscribers per filter (not
    /// those of keys standing for other shards), for [`Router::take_interest`].
    pub(crate) fn track_interest(&mut self) {
        self.interest.get_or_insert_with(Box::default);
    }

    /// The filters whose interest changed since the last call, with their counts now (0: no
    /// subscriber left).
    pub(crate) fn take_interest(&mut self) -> Vec<(TopicFilter, u32)> {
        let Some(log) = self.interest.as_mut() else { return Vec::new() };
        let changed = std::mem::take(&mut log.changed);
        changed.into_iter().map(|f| (log.counts.get(&f).copied().unwrap_or(0), f)).map(|(n, f)| (f, n)).collect()
    }

    /// Number of subscriptions.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Adds or replaces a subscription. Returns true when it is new (retain handling 1 sends
    /// retained messages only then).
    pub fn subscribe(&mut self, session: SessionKey, filter: &TopicFilter, entry: Entry) -> bool {
        let (group, path, hash) = split(filter);
        let mut node = &mut self.root;
        for level in &path {
            node = match *level {
                "+" => node.plus.get_or_insert_with(Box::default),
                literal => node.children.entry(literal.into()).or_default(),
            };
        }
        let subscribers = slot(node, hash);
        let previous = match group {
            None => match subscribers.direct.binary_search_by_key(&session, |(k, _)| *k) {
                Ok(i) => Some(std::mem::replace(&mut subscribers.direct[i].1, entry)),
                Err(i) => {
                    subscribers.direct.insert(i, (session, entry));
                    None
                }
            },
            Some(g) => {
                let group = subscribers.shared.entry(g.into()).or_default();
                group.filter.get_or_insert_with(|| filter.clone());
                group.members.insert(session, entry)
            }
        };
        if previous.is_none() {
            self.count += 1;
            // (Keys standing for other shards are never listed or removed as a session: their
            // thousands of filters would make each unsubscribe linear.)
            if shard_of_key(session).is_none() {
                self.by_session.entry(session).or_default().push(filter.clone());
            }
            if let (Some(log), None) = (self.interest.as_mut(), shard_of_key(session)) {
                log.note(filter, true);
            }
        }
        previous.is_none()
    }

    /// Removes a subscription; returns whether it existed.
    pub fn unsubscribe(&mut self, session: SessionKey, filter: &TopicFilter) -> bool {
        let (group, path, hash) = split(filter);
        let removed = remove(&mut self.root, &path, hash, group, session);
        if removed {
            self.count -= 1;
            if let (Some(log), None) = (self.interest.as_mut(), shard_of_key(session)) {
                log.note(filter, false);
            }
            if let Some(filters) = self.by_session.get_mut(&session).filter(|_| shard_of_key(session).is_none()) {
                filters.retain(|f| f != filter);
                if filters.is_empty() {
                    self.by_session.remove(&session);
                }
            }
        }
        removed
    }

    /// Removes every subscription of a session (its session ended). Linear in its number of
    /// subscriptions (removing them one by one with `unsubscribe` would rescan its list each
    /// time).
    pub fn remove_session(&mut self, session: SessionKey) {
        for filter in self.by_session.remove(&session).unwrap_or_default() {
            let (group, path, hash) = split(&filter);
            if remove(&mut self.root, &path, hash, group, session) {
                self.count -= 1;
                if let (Some(log), None) = (self.interest.as_mut(), shard_of_key(session)) {
                    log.note(&filter, false);
                }
            }
        }
    }

    /// A session's subscription to `filter`, with its options.
    pub fn entry(&self, session: SessionKey, filter: &TopicFilter) -> Option<Entry> {
        let (group, path, hash) = split(filter);
        let mut node = &self.root;
        for level in &path {
            node = match *level {
                "+" => node.plus.as_deref()?,
                literal => node.children.get(literal)?,
            };
        }
        let subscribers = if hash { &node.hash } else { &node.exact };
        match group {
            None => {
                let i = subscribers.direct.binary_search_by_key(&session, |(k, _)| *k).ok()?;
                Some(subscribers.direct[i].1)
            }
            Some(g) => subscribers.shared.get(g)?.members.get(&session).copied(),
        }
    }

    /// The filters a session is subscribed to.
    pub fn filters(&self, session: SessionKey) -> &[TopicFilter] {
        self.by_session.get(&session).map_or(&[], |v| v.as_slice())
    }

    /// Another online member of the shared subscription `filter` than `exclude`, chosen round
    /// robin, with its subscription: for redelivering what a leaving member did not acknowledge.
    pub fn pick_shared(
        &mut self,
        filter: &TopicFilter,
        exclude: SessionKey,
        online: impl Fn(SessionKey) -> bool,
    ) -> Option<(SessionKey, Entry)> {
        let (Some(group_name), path, hash) = split(filter) else { return None };
        let node = descend(&mut self.root, &path)?;
        let group = slot(node, hash).shared.get_mut(group_name)?;
        let after = group.last.map_or(0, |k| k.wrapping_add(1));
        let pick = group
            .members
            .range(after..)
            .chain(group.members.range(..after))
            .find(|(k, _)| **k != exclude && online(**k))
            .map(|(k, e)| (*k, *e))?;
        group.last = Some(pick.0);
        Some(pick)
    }

    /// Who receives a message published to `topic` by `publisher` (for No Local), choosing one
    /// online member per shared group. Deliveries come sorted by session.
    pub fn route(
        &mut self,
        topic: &TopicName,
        publisher: Option<SessionKey>,
        online: impl Fn(SessionKey) -> bool,
    ) -> Vec<Delivery> {
        // Per routed message: the levels on the stack, and one vector of deliveries, merged
        // per session after a sort (a map here cost two more allocations per message).
        let levels: SmallVec<[&str; 16]> = topic.as_str().split('/').collect();
        let system = topic.is_system();
        let mut found: Vec<Delivery> = Vec::new();
        collect(&mut self.root, &levels, system, publisher, &online, &mut found);
        if found.len() > 1 {
            // A session matched by several subscriptions gets one message [MQTT-3.3.4-2]: the
            // highest QoS, every subscription identifier, in the order they were found.
            found.sort_by_key(|d| d.session);
            found.dedup_by(|later, kept| {
                // A key standing for another shard's shared members is picked once per group:
                // two groups picking it are two messages for that shard to place.
                if later.session != kept.session
                    || (shard_of_key(kept.session).is_some() && later.shared != kept.shared)
                {
                    return false;
                }
                kept.qos = kept.qos.max(later.qos);
                kept.retain_as_published |= later.retain_as_published;
                for id in later.subscription_ids.drain(..) {
                    if !kept.subscription_ids.contains(&id) {
                        kept.subscription_ids.push(id);
                    }
                }
                if kept.shared.is_none() {
                    kept.shared = later.shared.take();
                }
                true
            });
        }
        found
    }
}

/// The share group name, the filter's levels before a trailing `#`, and whether there is one:
/// where in the trie a subscription lives.
fn split(filter: &TopicFilter) -> (Option<&str>, Vec<&str>, bool) {
    let (group, inner) = match filter.shared() {
        Some((group, inner)) => (Some(group), inner),
        None => (None, filter.as_str()),
    };
    let mut levels: Vec<&str> = inner.split('/').collect();
    let hash = levels.last() == Some(&"#");
    if hash {
        levels.pop();
    }
    (group, levels, hash)
}

fn remove(root: &mut Node, path: &[&str], hash: bool, group: Option<&str>, session: SessionKey) -> bool {
    let Some(node) = descend(root, path) else { return false };
    let subscribers = slot(node, hash);
    let removed = match group {
        None => match subscribers.direct.binary_search_by_key(&session, |(k, _)| *k) {
            Ok(i) => {
                subscribers.direct.remove(i);
                if subscribers.direct.is_empty() {
                    subscribers.direct = Vec::new();
                }
                true
            }
            Err(_) => false,
        },
        Some(g) => {
            let removed = subscribers.shared.get_mut(g).is_some_and(|grp| grp.members.remove(&session).is_some());
            if subscribers.shared.get(g).is_some_and(|grp| grp.members.is_empty()) {
                subscribers.shared.remove(g);
            }
            removed
        }
    };
    prune(root, path);
    removed
}

/// The node at the end of `path` (`+` levels through the `+` child), if it exists.
fn descend<'a>(root: &'a mut Node, path: &[&str]) -> Option<&'a mut Node> {
    let mut node = root;
    for level in path {
        node = match *level {
            "+" => node.plus.as_deref_mut()?,
            literal => node.children.get_mut(literal)?,
        };
    }
    Some(node)
}

/// Drops the end of `path` if it was left empty, with the chain of nodes above it that held
/// nothing else: one pass down to find the deepest node that holds something besides the path,
/// one cut below it. (A loop: the depth is the peer's.)
fn prune(root: &mut Node, path: &[&str]) {
    let mut cut = 0;
    let mut node: &Node = root;
    for (depth, level) in path.iter().enumerate() {
        let branches = node.children.len() + usize::from(node.plus.is_some());
        if branches > 1 || !node.exact.is_empty() || !node.hash.is_empty() {
            cut = depth;
        }
        let next = match *level {
            "+" => node.plus.as_deref(),
            literal => node.children.get(literal),
        };
        let Some(next) = next else { return };
        node = next;
    }
    if path.is_empty() || !node.is_empty() {
        return;
    }
    let Some(parent) = descend(root, &path[..cut]) else { return };
    match path[cut] {
        "+" => parent.plus = None,
        literal => drop(parent.children.remove(literal)),
    }
}

/// Adds the subscribers of one set to the deliveries.
fn take(
    subscribers: &mut Subscribers,
    publisher: Option<SessionKey>,
    online: &dyn Fn(SessionKey) -> bool,
    found: &mut Vec<Delivery>,
) {
    for (session, entry) in &subscribers.direct {
        let session = *session;
        add(found, session, entry, publisher, None);
    }
    for group in subscribers.shared.values_mut() {
        // Round robin: the first online member after the one served last, wrapping around.
        let after = group.last.map_or(0, |k| k.wrapping_add(1));
        let pick = group
            .members
            .range(after..)
            .chain(group.members.range(..after))
            .find(|(k, _)| online(**k))
            .map(|(k, e)| (*k, *e));
        if let Some((session, entry)) = pick {
            group.last = Some(session);
            // No Local is not allowed on shared subscriptions, so the publisher may get it.
            add(found, session, &entry, None, group.filter.as_ref());
        }
    }
}

fn add(
    found: &mut Vec<Delivery>,
    session: SessionKey,
    entry: &Entry,
    publisher: Option<SessionKey>,
    shared: Option<&TopicFilter>,
) {
    // No Local spares every stream of the publishing connection [MQTT-3.8.3-3].
    if entry.options.no_local && publisher == Some(owner(session)) {
        return;
    }
    found.push(Delivery {
        session,
        qos: entry.options.qos,
        retain_as_published: entry.options.retain_as_published,
        subscription_ids: entry.subscription_id.into_iter().collect(),
        shared: shared.cloned(),
    });
}

/// Gathers the deliveries for a topic's levels: a depth-first walk with an explicit stack (the
/// literal child before the `+` child, as a recursion would), so no peer-chosen depth reaches
/// the call stack.
fn collect(
    root: &mut Node,
    levels: &[&str],
    system: bool,
    publisher: Option<SessionKey>,
    online: &dyn Fn(SessionKey) -> bool,
    found: &mut Vec<Delivery>,
) {
    let mut stack: SmallVec<[(&mut Node, usize); 16]> = SmallVec::new();
    stack.push((root, 0));
    while let Some((node, depth)) = stack.pop() {
        let Node { children, plus, exact, hash } = node;
        // A wildcard in the first level does not match a `$` topic.
        let wild_ok = !(system && depth == 0);
        if wild_ok {
            take(hash, publisher, online, found);
        }
        let Some(level) = levels.get(depth) else {
            take(exact, publisher, online, found);
            continue;
        };
        // Pushed in reverse: the literal child is walked first.
        if wild_ok {
            if let Some(child) = plus.as_deref_mut() {
                stack.push((child, depth + 1));
            }
        }
        if let Some(child) = children.get_mut(*level) {
            stack.push((child, depth + 1));
        }
    }
}

impl Drop for Node {
    /// Frees the subtree with a loop: the default drop would recurse once per level.
    fn drop(&mut self) {
        let mut stack: Vec<Node> = self.children.drain().map(|(_, n)| n).collect();
        stack.extend(self.plus.take().map(|b| *b));
        while let Some(mut node) = stack.pop() {
            stack.extend(node.children.drain().map(|(_, n)| n));
            stack.extend(node.plus.take().map(|b| *b));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(qos: QoS) -> Entry {
        Entry { options: SubscriptionOptions { qos, ..Default::default() }, subscription_id: None }
    }

    fn f(s: &str) -> TopicFilter {
        TopicFilter::new(s).unwrap()
    }

    fn t(s: &str) -> TopicName {
        TopicName::new(s).unwrap()
    }

    fn sessions(r: &mut Router, topic: &str) -> Vec<SessionKey> {
        r.route(&t(topic), None, |_| true).into_iter().map(|d| d.session).collect()
    }

    #[test]
    fn a_very_deep_filter_is_matched_removed_and_dropped_without_recursion() {
        let mut r = Router::new();
        let deep = "/".repeat(60_000);
        r.subscribe(1, &f(&format!("{deep}#")), entry(QoS::AtMostOnce));
        r.subscribe(2, &f(&format!("{deep}+")), entry(QoS::AtMostOnce));
        r.subscribe(3, &f("#"), entry(QoS::AtMostOnce));
        assert_eq!(sessions(&mut r, &format!("{deep}x")), [1, 2, 3]);
        r.remove_session(2);
        assert_eq!(sessions(&mut r, &format!("{deep}x")), [1, 3]);
        assert_eq!(r.len(), 2);
        drop(r);
    }

    #[test]
    fn spec_examples_and_dollar_topics() {
        let mut r = Router::new();
        let filters =
            ["sport/tennis/player1/#", "sport/tennis/+", "sport/#", "+/+", "/+", "#", "$SYS/#", "+/monitor/Clients"];
        for (i, filter) in filters.iter().enumerate() {
            r.subscribe(i as u64, &f(filter), entry(QoS::AtMostOnce));
        }
        assert_eq!(sessions(&mut r, "sport/tennis/player1"), [0, 1, 2, 5]);
        assert_eq!(sessions(&mut r, "sport/tennis/player1/ranking"), [0, 2, 5]);
        assert_eq!(sessions(&mut r, "sport"), [2, 5]);
        assert_eq!(sessions(&mut r, "/finance"), [3, 4, 5]);
        assert_eq!(sessions(&mut r, "$SYS/monitor/Clients"), [6], "no leading wildcard on $ topics");
    }

    #[test]
    fn overlapping_subscriptions_give_one_delivery_at_the_highest_qos() {
        let mut r = Router::new();
        let id = |v| SubscriptionId::new(v);
        r.subscribe(
            1,
            &f("a/+"),
            Entry {
                options: SubscriptionOptions { qos: QoS::AtLeastOnce, ..Default::default() },
                subscription_id: id(3),
            },
        );
        r.subscribe(
            1,
            &f("a/#"),
            Entry {
                options: SubscriptionOptions { qos: QoS::ExactlyOnce, ..Default::default() },
                subscription_id: id(4),
            },
        );
        r.subscribe(1, &f("a/b"), entry(QoS::AtMostOnce));
        let d = r.route(&t("a/b"), None, |_| true);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].qos, QoS::ExactlyOnce);
        let mut ids: Vec<u32> = d[0].subscription_ids.iter().map(|i| i.get()).collect();
        ids.sort_unstable();
        assert_eq!(ids, [3, 4]);
    }

    #[test]
    fn no_local_skips_the_publisher_only() {
        let mut r = Router::new();
        let nl = Entry { options: SubscriptionOptions { no_local: true, ..Default::default() }, subscription_id: None };
        r.subscribe(1, &f("chat"), nl);
        r.subscribe(2, &f("chat"), nl);
        let got: Vec<SessionKey> = r.route(&t("chat"), Some(1), |_| true).into_iter().map(|d| d.session).collect();
        assert_eq!(got, [2]);
    }

    #[test]
    fn shared_groups_round_robin_over_online_members() {
        let mut r = Router::new();
        for s in 1..=3 {
            r.subscribe(s, &f("$share/g/jobs/#"), entry(QoS::AtLeastOnce));
        }
        r.subscribe(9, &f("jobs/x"), entry(QoS::AtMostOnce));
        let mut picks = Vec::new();
        for _ in 0..6 {
            let d = r.route(&t("jobs/x"), None, |s| s != 2);
            assert!(d.iter().any(|d| d.session == 9), "plain subscribers still get every message");
            picks.extend(d.into_iter().map(|d| d.session).filter(|s| *s != 9));
        }
        assert_eq!(picks, [1, 3, 1, 3, 1, 3], "one member per message, skipping the offline one");
        // Redelivery picks another online member than the one leaving.
        let filter = f("$share/g/jobs/#");
        assert_eq!(r.pick_shared(&filter, 1, |s| s != 2).map(|(k, _)| k), Some(3));
        assert_eq!(r.pick_shared(&filter, 3, |s| s == 3), None);
    }

    #[test]
    fn unsubscribe_and_session_removal_prune_the_trie() {
        let mut r = Router::new();
        assert!(r.subscribe(1, &f("a/b/c"), entry(QoS::AtMostOnce)));
        assert!(!r.subscribe(1, &f("a/b/c"), entry(QoS::AtLeastOnce)), "a repeat replaces");
        r.subscribe(1, &f("a/+/#"), entry(QoS::AtMostOnce));
        r.subscribe(2, &f("$share/g/a/b/c"), entry(QoS::AtMostOnce));
        assert_eq!(r.len(), 3);
        assert!(r.unsubscribe(1, &f("a/b/c")));
        assert!(!r.unsubscribe(1, &f("a/b/c")));
        r.remove_session(1);
        r.remove_session(2);
        assert!(r.is_empty());
        assert!(r.root.is_empty(), "empty nodes are removed");
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![Just("a".to_string()), Just("b".to_string()), Just("".to_string()), Just("$x".to_string())]
    }

    fn topic() -> impl Strategy<Value = String> {
        proptest::collection::vec(level(), 1..4).prop_map(|l| l.join("/")).prop_filter("non-empty", |t| !t.is_empty())
    }

    fn filter() -> impl Strategy<Value = String> {
        let lvl = prop_oneof![3 => level(), 1 => Just("+".to_string())];
        (proptest::collection::vec(lvl, 1..4), any::<bool>())
            .prop_map(|(mut l, hash)| {
                if hash {
                    l.push("#".into());
                }
                l.join("/")
            })
            .prop_filter("valid filter", |s| TopicFilter::new(s.as_str()).is_ok())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 500, failure_persistence: None, ..ProptestConfig::default() })]

        /// The trie agrees with a plain scan over every subscription.
        #[test]
        fn trie_matches_like_a_naive_scan(
            subs in proptest::collection::vec((0..8u64, filter(), 0..3u8), 0..40),
            topics in proptest::collection::vec(topic(), 1..10),
        ) {
            let mut r = Router::new();
            let mut naive: BTreeMap<(u64, String), QoS> = BTreeMap::new();
            for (s, filter, q) in &subs {
                let qos = QoS::from_u8(*q).unwrap();
                r.subscribe(*s, &f(filter), entry(qos));
                naive.insert((*s, filter.clone()), qos);
            }
            for topic in topics {
                let mut expected: BTreeMap<u64, QoS> = BTreeMap::new();
                for ((s, filter), qos) in &naive {
                    if mqtt_proto::topic::matches(filter, &topic) {
                        let e = expected.entry(*s).or_insert(QoS::AtMostOnce);
                        *e = (*e).max(*qos);
                    }
                }
                let got: BTreeMap<u64, QoS> = r.route(&t(&topic), None, |_| true).into_iter().map(|d| (d.session, d.qos)).collect();
                prop_assert_eq!(got, expected, "topic {}", topic);
            }
        }
    }
}
