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
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// A message's pending change: its latest state, or its removal.
#[derive(Debug)]
struct Pending {
    /// The message, or `None` to delete it.
    kept: Option<Kept>,
    /// Added within this batch: never written, so removing it writes nothing.
    fresh: bool,
}

/// Pending changes to kept messages, by client id and message id.
#[derive(Debug, Default)]
pub(crate) struct MessageLog {
    pending: BTreeMap<(String, u64), Pending>,
}

impl MessageLog {
    /// Records changes to client `id`'s messages; returns how many there were.
    pub(crate) fn record(&mut self, id: &str, changes: Vec<Change>) -> usize {
        let count = changes.len();
        for change in changes {
            let (mid, kept, fresh) = match change {
                Change::Add(k) => (k.id, Some(k), true),
                Change::Put(k) => (k.id, Some(k), false),
                Change::Remove(mid) => (mid, None, false),
            };
            let key = (id.to_string(), mid);
            match (self.pending.get_mut(&key), kept) {
                // Added and gone within one batch: nothing to write.
                (Some(pending), None) if pending.fresh => drop(self.pending.remove(&key)),
                (Some(pending), kept) => pending.kept = kept,
                (None, kept) => drop(self.pending.insert(key, Pending { kept, fresh })),
            }
        }
        count
    }

    /// Forgets what is pending for client `id` (its messages are deleted whole).
    pub(crate) fn forget(&mut self, id: &str) {
        let stale: Vec<(String, u64)> =
            self.pending.range((id.to_string(), 0)..=(id.to_string(), u64::MAX)).map(|(k, _)| k.clone()).collect();
        for key in stale {
            self.pending.remove(&key);
        }
    }

    /// Whether nothing is pending.
    pub(crate) fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Appends the store operations for everything pending, as of `now` (a queued message's
    /// time waited counts to here), and empties the log.
    pub(crate) fn drain_into(&mut self, now: Instant, ops: &mut Vec<StoreOp>) {
        for ((id, mid), change) in std::mem::take(&mut self.pending) {
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
    }
}
