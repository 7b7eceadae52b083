//! Kept messages' changes, coalesced per message until a batch is made: what the broker's
//! journal and a client's store both do with an outbound window's changes (see
//! `Outbound::take_changes`), written once.
//!
//! A message queued and completed within one batch is never written at all, and one changed
//! several times is written once, as it last stood. Messages are kept as their changes come
//! (they are cheap to clone and expensive to look up again).

use super::records::{message_key, MessageRecord};
use super::{StoreOp, Table};
use crate::session::outbound::{Change, Kept};
use mqtt_proto::QoS;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// A message's pending change: its latest state, or its removal.
#[derive(Debug)]
struct Pending {
    /// The message, or `None` to delete it.
    kept: Option<Kept>,
    /// Added within this batch: never written, so removing it writes nothing.
    fresh: bool,
    /// A fresh QoS 1 message: its write may wait (the broker's commit delay), in case its
    /// client acknowledges it first (then it is never written).
    deferrable: bool,
    /// What waits for this message to be written or acknowledged (the broker's ticket for
    /// the PUBACK of the publish that routed it here).
    waiter: Option<u64>,
    /// When a deferrable message came (its commit delay counts from here).
    since: Option<Instant>,
}

impl Pending {
    /// Whether its write may still wait at `now`, with commit delay `delay`.
    fn young(&self, now: Instant, delay: Duration) -> bool {
        self.deferrable && self.since.is_some_and(|at| at + delay > now)
    }
}

/// What [`MessageLog::record`] recorded.
#[derive(Debug, Clone, Default)]
pub(crate) struct Recorded {
    /// Whether a fresh QoS 1 message came (one whose write may wait).
    pub(crate) deferrable: bool,
    /// How many new messages now wait with the waiter given.
    pub(crate) waiting: usize,
    /// The waiters of messages completed before they were written: they no longer wait for
    /// them.
    pub(crate) cancelled: Vec<u64>,
    /// Whether a message not new in this batch changed (its new state is to be written), or a
    /// new one came without a waiter.
    pub(crate) other: bool,
}

/// Pending changes to kept messages, by client id and message id.
#[derive(Debug, Default)]
pub(crate) struct MessageLog {
    pending: BTreeMap<(String, u64), Pending>,
    /// How many of `pending` may not wait (written with the next batch whatever its age), so
    /// that whether a batch may wait is known without a scan.
    undeferrable: usize,
}

impl MessageLog {
    /// Records changes to client `id`'s messages, at `now`; messages new here get `waiter`.
    pub(crate) fn record(
        &mut self,
        id: &str,
        changes: Vec<Change>,
        waiter: Option<u64>,
        now: Option<Instant>,
    ) -> Recorded {
        let mut recorded = Recorded::default();
        for change in changes {
            let (mid, kept, fresh) = match change {
                Change::Add(k) => (k.id, Some(k), true),
                Change::Put(k) => (k.id, Some(k), false),
                Change::Remove(mid) => (mid, None, false),
            };
            let key = (id.to_string(), mid);
            let qos1 = kept.as_ref().is_some_and(|k| k.publish.qos() == QoS::AtLeastOnce);
            match (self.pending.get_mut(&key), kept) {
                // Added and gone within one batch: nothing to write.
                (Some(pending), None) if pending.fresh => {
                    recorded.cancelled.extend(pending.waiter);
                    self.undeferrable -= usize::from(!pending.deferrable);
                    self.pending.remove(&key);
                }
                (Some(pending), kept) => {
                    recorded.other |= !pending.fresh && kept.is_some();
                    self.undeferrable += usize::from(pending.deferrable && !qos1);
                    pending.deferrable &= qos1;
                    pending.kept = kept;
                }
                (None, kept) => {
                    // Only a copy routed from a PUBLISH whose acknowledgement waits for it may
                    // wait out the commit delay: its publisher resends it if it is lost. Any
                    // other new message (moved from a leaving shared-subscription member, a
                    // will) is written with the change that made it, never after it.
                    let deferrable = fresh && qos1 && waiter.is_some();
                    recorded.deferrable |= deferrable;
                    recorded.other |= kept.is_some() && (!fresh || waiter.is_none());
                    let waiter = waiter.filter(|_| fresh);
                    recorded.waiting += usize::from(waiter.is_some());
                    let since = now.filter(|_| deferrable);
                    self.undeferrable += usize::from(!deferrable);
                    self.pending.insert(key, Pending { kept, fresh, deferrable, waiter, since });
                }
            }
        }
        recorded
    }

    /// Whether something pending is to be written with the next batch whatever its age
    /// (anything but a fresh QoS 1 copy, see [`Recorded::deferrable`]).
    pub(crate) fn has_undeferrable(&self) -> bool {
        self.undeferrable > 0
    }

    /// When the oldest message whose write may wait came (a scan: for when a deadline passed).
    pub(crate) fn oldest_young(&self) -> Option<Instant> {
        self.pending.values().filter(|m| m.deferrable).filter_map(|m| m.since).min()
    }

    /// Forgets what is pending for client `id` (its messages are deleted whole); returns the
    /// waiters of what it forgot (they wait for the deletion instead).
    pub(crate) fn forget(&mut self, id: &str) -> Vec<u64> {
        let stale: Vec<(String, u64)> =
            self.pending.range((id.to_string(), 0)..=(id.to_string(), u64::MAX)).map(|(k, _)| k.clone()).collect();
        let gone: Vec<Pending> = stale.iter().filter_map(|key| self.pending.remove(key)).collect();
        self.undeferrable -= gone.iter().filter(|p| !p.deferrable).count();
        gone.into_iter().filter_map(|p| p.waiter).collect()
    }

    /// Whether nothing is pending.
    pub(crate) fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Appends the store operations for everything pending, as of `now` (a queued message's
    /// time waited counts to here), and empties the log, except, with `defer`, fresh QoS 1
    /// messages younger than it. Returns the waiters of what it wrote.
    pub(crate) fn drain_into(&mut self, now: Instant, ops: &mut Vec<StoreOp>, defer: Option<Duration>) -> Vec<u64> {
        let mut waiters = Vec::new();
        // What stays is young and deferrable.
        self.undeferrable = 0;
        for ((id, mid), change) in std::mem::take(&mut self.pending) {
            if defer.is_some_and(|d| change.young(now, d)) {
                self.pending.insert((id, mid), change);
                continue;
            }
            waiters.extend(change.waiter);
            let key = message_key(&id, mid);
            ops.push(match change.kept {
                Some(kept) => {
                    let waited = kept.at.map_or(Duration::ZERO, |at| now.saturating_duration_since(at));
                    let record = MessageRecord {
                        packet_id: kept.packet_id,
                        released: kept.released,
                        waited,
                        publish: kept.publish,
                    };
                    StoreOp::Put { table: Table::Messages, key, value: record.encode() }
                }
                None => StoreOp::Delete { table: Table::Messages, key },
            });
        }
        waiters
    }
}
