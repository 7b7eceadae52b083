//! Messages across shards: other shards' interest indexed under keys standing for them,
//! PUBLISHes forwarded to the shards that want them, shared subscriptions placed across all
//! members, retained messages kept everywhere, `$SYS` figures added up on shard 0.

use super::{ShardBatch, ShardMessage, ShardReport};
use crate::broker::machine::Broker;
use crate::broker::policy::may_read;
use crate::broker::router::{shard_key, shard_of_key, Delivery, Entry, Router, DIRECT_MEMBER};
use mqtt_proto::{Publish, QoS, SubscriptionOptions, TopicFilter, TopicName};
use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

/// A retained topic's last change (see `Routing::versions`).
#[derive(Clone, Copy)]
struct Version {
    clock: u64,
    shard: u16,
    deleted: Option<Instant>,
}

impl Version {
    fn newer_than(&self, clock: u64, shard: u16) -> bool {
        (self.clock, self.shard) > (clock, shard)
    }
}

/// How long a deleted retained topic's version is kept: far longer than any batch takes to
/// cross shards.
const TOMBSTONE: std::time::Duration = std::time::Duration::from_secs(60);

/// Most members of one shared subscription one shard may announce (each is a key here).
const MAX_MEMBERS: u32 = 1 << 16;

/// What a shard keeps of the others.
#[derive(Default)]
pub(in crate::broker) struct Routing {
    /// Members of shared subscriptions on other shards, as announced.
    members: BTreeMap<(u16, TopicFilter), u32>,
    /// Subscriptions in the router that stand for other shards (not counted as this shard's).
    pub(in crate::broker) keys: usize,
    /// Each retained topic's last change: Lamport clock and shard, compared as a pair, and for
    /// a deletion when it happened (kept a while, so that an older change still in flight
    /// cannot bring the topic back on one shard only).
    versions: HashMap<TopicName, Version>,
    clock: u64,
    /// The other shards' latest `$SYS` figures (on shard 0).
    pub(in crate::broker) reports: BTreeMap<u16, ShardReport>,
    /// A retained change made here, sent once its message is routed.
    unsent_retain: Option<(Publish, u64)>,
}

impl Routing {
    /// Queues what changed in this shard's interest for every other shard.
    pub(super) fn flush_interest(
        &mut self,
        router: &mut Router,
        out: &mut BTreeMap<u16, ShardBatch>,
        index: u16,
        count: u16,
    ) {
        for (filter, n) in router.take_interest() {
            for to in (0..count).filter(|&s| s != index) {
                out.entry(to).or_default().push(ShardMessage::Interest { filter: filter.clone(), count: n });
            }
        }
    }
}

/// How a key standing for another shard subscribes: everything, as published (the shard
/// decides for its own subscribers).
fn standing_entry() -> Entry {
    Entry {
        options: SubscriptionOptions { qos: QoS::ExactlyOnce, retain_as_published: true, ..Default::default() },
        subscription_id: None,
    }
}

impl Broker {
    /// Shard `from` has `count` subscribers to `filter` (members, for a shared one).
    pub(super) fn remote_interest(&mut self, from: u16, filter: TopicFilter, count: u32) {
        let Some(shard) = self.shard.as_mut() else { return };
        let routing = &mut shard.routing;
        if filter.shared().is_none() {
            let key = shard_key(from, DIRECT_MEMBER);
            if count > 0 {
                if self.router.subscribe(key, &filter, standing_entry()) {
                    routing.keys += 1;
                }
            } else if self.router.unsubscribe(key, &filter) {
                routing.keys -= 1;
            }
            return;
        }
        let count = count.min(MAX_MEMBERS);
        let had = routing.members.get(&(from, filter.clone())).copied().unwrap_or(0);
        for member in count..had {
            if self.router.unsubscribe(shard_key(from, member), &filter) {
                routing.keys -= 1;
            }
        }
        for member in had..count {
            if self.router.subscribe(shard_key(from, member), &filter, standing_entry()) {
                routing.keys += 1;
            }
        }
        if count == 0 {
            routing.members.remove(&(from, filter));
        } else {
            routing.members.insert((from, filter), count);
        }
    }

    /// A delivery the router chose for a key standing for another shard: the message goes
    /// there, once per shard for its direct subscribers, once per pick for shared ones.
    pub(in crate::broker) fn forward_routed(&mut self, to: u16, publish: &Publish, shared: Option<TopicFilter>) {
        if self.shard.is_none() {
            return;
        }
        // A client's QoS 1 or 2 message is acknowledged once every copy is kept, here or there.
        let kept = if publish.qos() == QoS::AtMostOnce { None } else { self.journal.await_remote() };
        let publish = publish.clone();
        let message = match shared {
            Some(filter) => ShardMessage::Shared { filter, publish, kept, declined: Vec::new() },
            None => ShardMessage::Route { publish, kept },
        };
        if let Some(shard) = self.shard.as_mut() {
            shard.send(to, message);
        }
    }

    /// Routes a message from shard `from` with `route`; with a `kept` number, the copies it
    /// makes are journaled like a client's, and `from` hears once they are kept.
    pub(super) fn remote_routing(&mut self, from: u16, kept: Option<u64>, route: impl FnOnce(&mut Broker)) {
        let Some(number) = kept else { return route(self) };
        self.journal.open();
        self.journal.routing = true;
        route(self);
        self.journal.routing = false;
        match self.journal.close() {
            Some(ticket) => self.journal.watch(ticket, from, number),
            None => {
                if let Some(shard) = self.shard.as_mut() {
                    shard.send(from, ShardMessage::Kept { kept: number });
                }
            }
        }
    }

    /// A message published on another shard, for this shard's direct subscribers.
    pub(super) fn route_remote(&mut self, now: Instant, publish: Publish) {
        // Shared groups are decided where it was published: none is picked here.
        for d in self.router.route(&publish.topic, None, |_| false) {
            if shard_of_key(d.session).is_none() {
                self.deliver_routed(now, &publish, d);
            }
        }
    }

    /// A message for one of this shard's members of a shared subscription.
    pub(super) fn shared_remote(
        &mut self,
        now: Instant,
        from: u16,
        filter: &TopicFilter,
        publish: Publish,
        mut declined: Vec<u16>,
    ) {
        let auth = self.config.auth.as_deref();
        let registry = &self.registry;
        let eligible =
            |k| shard_of_key(k).is_none() && registry.is_online(k) && may_read(registry, auth, k, &publish.topic);
        let Some((session, entry)) = self.router.pick_shared(filter, u64::MAX, eligible) else {
            // Nobody here can take it now: the sender picks again among the others.
            if let Some(shard) = self.shard.as_mut() {
                declined.push(shard.index);
                let message = ShardMessage::SharedDeclined { filter: filter.clone(), publish, declined };
                shard.send(from, message);
            }
            return;
        };
        self.deliver_shared(now, session, entry, filter, &publish);
    }

    /// A message this shard sent to another's members of a shared subscription came back:
    /// another member gets it, here or on a shard that has not declined it, among those
    /// online; if there is none, nobody does (as in a broker of one shard).
    pub(super) fn shared_declined(&mut self, now: Instant, filter: &TopicFilter, publish: Publish, declined: Vec<u16>) {
        let auth = self.config.auth.as_deref();
        let registry = &self.registry;
        let eligible = |k| match shard_of_key(k) {
            Some(s) => !declined.contains(&s),
            None => registry.is_online(k) && may_read(registry, auth, k, &publish.topic),
        };
        let Some((session, entry)) = self.router.pick_shared(filter, u64::MAX, eligible) else { return };
        match shard_of_key(session) {
            Some(to) => {
                if let Some(shard) = self.shard.as_mut() {
                    let message = ShardMessage::Shared { filter: filter.clone(), publish, kept: None, declined };
                    shard.send(to, message);
                }
            }
            None => self.deliver_shared(now, session, entry, filter, &publish),
        }
    }

    /// Hands a shared subscription's message to the member picked for it.
    fn deliver_shared(&mut self, now: Instant, session: u64, entry: Entry, filter: &TopicFilter, publish: &Publish) {
        let d = Delivery {
            session,
            qos: entry.options.qos,
            retain_as_published: entry.options.retain_as_published,
            subscription_ids: entry.subscription_id.into_iter().collect(),
            shared: Some(filter.clone()),
        };
        self.deliver_routed(now, publish, d);
    }

    /// A retained message was set (or deleted) here: every other shard keeps it too (sent
    /// once the message is routed, see [`Broker::flush_retained`]).
    pub(in crate::broker) fn retained_here(&mut self, now: Instant, publish: &Publish) {
        let Some(shard) = self.shard.as_mut() else { return };
        let routing = &mut shard.routing;
        routing.clock += 1;
        let deleted = publish.payload.is_empty().then_some(now);
        let version = Version { clock: routing.clock, shard: shard.index, deleted };
        routing.versions.insert(publish.topic.clone(), version);
        routing.unsent_retain = Some((publish.clone(), routing.clock));
    }

    /// Sends the retained change made while routing a message to every other shard, saying
    /// whether that shard was also sent the message to route: one that was not (its interest
    /// was not known here yet) delivers it to its own subscribers itself, as a broker of one
    /// shard would have to one that subscribed just before.
    pub(in crate::broker) fn flush_retained(&mut self, routed: &[u16]) {
        let Some(shard) = self.shard.as_mut() else { return };
        let Some((publish, clock)) = shard.routing.unsent_retain.take() else { return };
        let (count, index) = (shard.count, shard.index);
        for to in (0..count).filter(|&s| s != index) {
            let message = ShardMessage::Retain { publish: publish.clone(), clock, routed: routed.contains(&to) };
            shard.send(to, message);
        }
    }

    /// Forgets the versions of retained topics that are gone (expired, or deleted a while
    /// ago): part of the periodic housekeeping.
    pub(in crate::broker) fn prune_versions(&mut self, now: Instant) {
        let Some(shard) = self.shard.as_mut() else { return };
        let retained = &self.retained;
        shard.routing.versions.retain(|topic, v| match v.deleted {
            Some(at) => now.saturating_duration_since(at) < TOMBSTONE,
            None => retained.contains(topic.as_str()),
        });
    }

    /// A retained message set on shard `from`: kept here unless this shard has seen a later
    /// change of the topic (so concurrent changes settle on the same message everywhere).
    pub(super) fn retain_remote(&mut self, now: Instant, from: u16, publish: Publish, clock: u64, routed: bool) {
        if !routed {
            self.route_remote(now, publish.clone());
        }
        let Some(shard) = self.shard.as_mut() else { return };
        let routing = &mut shard.routing;
        routing.clock = routing.clock.max(clock);
        if routing.versions.get(&publish.topic).is_some_and(|v| v.newer_than(clock, from)) {
            return;
        }
        if self.retained.set(now, &publish).is_ok() {
            let Some(shard) = self.shard.as_mut() else { return };
            let deleted = publish.payload.is_empty().then_some(now);
            shard.routing.versions.insert(publish.topic.clone(), Version { clock, shard: from, deleted });
            // Every shard's store keeps every retained message: each restores on its own.
            self.journal_retained(now, &publish);
        }
    }

    /// This shard's own `$SYS` figures.
    pub(in crate::broker) fn own_report(&self) -> ShardReport {
        ShardReport {
            stats: self.stats,
            connected: self.connected(),
            sessions: self.sessions(),
            subscriptions: self.subscriptions(),
        }
    }

    /// The `$SYS` figures of the whole broker: this shard's, plus the others' latest reports
    /// on shard 0.
    pub(in crate::broker) fn broker_report(&self) -> ShardReport {
        let mut total = self.own_report();
        if let Some(shard) = &self.shard {
            for r in shard.routing.reports.values() {
                total.stats.add(&r.stats);
                total.connected += r.connected;
                total.sessions += r.sessions;
                total.subscriptions += r.subscriptions;
            }
        }
        total
    }
}
