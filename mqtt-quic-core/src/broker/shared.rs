//! Shared subscriptions' delivery guarantee: a message a group handed to one member is that
//! member's to acknowledge, and if the member leaves first it goes to another member instead of
//! being lost with the session (or waiting for a member that may never come back).

use super::machine::Broker;
use super::policy::may_read;
use super::router::SessionKey;
use crate::session::server::SessionState;
use mqtt_proto::{PacketId, QosPid, TopicFilter};
use std::collections::BTreeMap;
use std::time::Instant;

/// Messages sent through a shared subscription and not yet acknowledged.
#[derive(Default)]
pub(super) struct SharedPending {
    /// By (session, request id): the group's filter.
    sent: BTreeMap<(SessionKey, u64), TopicFilter>,
}

impl SharedPending {
    /// Session `key` was handed request `id` through the group of `filter`.
    pub(super) fn insert(&mut self, key: SessionKey, id: u64, filter: TopicFilter) {
        self.sent.insert((key, id), filter);
    }

    /// Session `key` acknowledged request `id` (which may not have come through a group).
    pub(super) fn acknowledged(&mut self, key: SessionKey, id: u64) {
        self.sent.remove(&(key, id));
    }

    /// What session `key` has not acknowledged, by request id, in order.
    fn of(&self, key: SessionKey) -> Vec<(u64, TopicFilter)> {
        self.sent.range((key, 0)..=(key, u64::MAX)).map(|((_, id), f)| (*id, f.clone())).collect()
    }
}

impl Broker {
    /// Hands what a leaving member of shared subscriptions had not acknowledged to other
    /// members that are online and may read it.
    pub(super) fn redistribute(&mut self, now: Instant, key: SessionKey, state: &mut SessionState) {
        for (id, filter) in self.shared.of(key) {
            self.shared.acknowledged(key, id);
            for mut publish in state.take_requests(&[id]) {
                let auth = self.config.auth.as_deref();
                let registry = &self.registry;
                let eligible = |k| registry.is_online(k) && may_read(registry, auth, k, &publish.topic);
                let Some((other, entry)) = self.router.pick_shared(&filter, key, eligible) else { continue };
                publish.dup = false;
                publish.qos_pid = QosPid::from_parts(publish.qos().min(entry.options.qos), PacketId::MIN);
                if let Some(new_id) = self.deliver(now, other, publish) {
                    self.shared.insert(other, new_id, filter.clone());
                }
            }
        }
    }
}
