//! Starting from a store: the records an adapter read back become kept sessions (offline, with
//! their subscriptions, queues and QoS state), retained messages and delayed wills, aged by the
//! time they spent on disk.

use super::machine::Broker;
use crate::persist::records::{split_message_key, text_key, MessageRecord, SessionRecord, TimedMessage};
use crate::persist::{RecordError, StoredRecord, Table};
use crate::session::outbound::Kept;
use crate::session::server::SessionState;
use mqtt_proto::Publish;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// What [`Broker::restore`] brought back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Restored {
    /// Kept sessions.
    pub sessions: usize,
    /// Messages queued or in flight for them.
    pub messages: usize,
    /// Retained messages.
    pub retained: usize,
    /// Delayed wills still waiting.
    pub wills: usize,
    /// Records dropped (and deleted from the store): sessions and messages that expired while
    /// the broker was down, retained messages beyond the configured limits, messages and wills
    /// of no session.
    pub dropped: usize,
}

/// Reduces a message's expiry interval by `age`; `None` when it has expired.
fn age_message(mut publish: Publish, age: Duration) -> Option<Publish> {
    if let Some(secs) = publish.properties.message_expiry_interval {
        let left = u64::from(secs).checked_sub(age.as_secs()).filter(|l| *l > 0)?;
        publish.properties.message_expiry_interval = Some(u32::try_from(left).unwrap_or(u32::MAX));
    }
    Some(publish)
}

impl Broker {
    /// Loads what a store holds (see [`crate::persist`]), before any client connects: each kept
    /// session comes back offline, with its subscriptions, its queue, the messages it had in
    /// flight (resent on reconnect, under the same identifiers) and the client's QoS 2
    /// identifiers awaiting PUBREL; retained messages and delayed wills come back too. Records
    /// are aged by how long they were on disk: a session or message that expired meanwhile is
    /// dropped (and deleted from the store), a will whose delay ran out is published at the
    /// first [`Broker::handle_timeout`]. A session that was connected when the broker stopped
    /// starts its expiry now.
    ///
    /// A record that cannot be read is an error: the store is damaged, and starting without
    /// it would silently lose what it held.
    pub fn restore(&mut self, now: Instant, records: Vec<StoredRecord>) -> Result<Restored, RecordError> {
        self.tick(now);
        let mut sessions = BTreeMap::new();
        let mut messages: BTreeMap<String, Vec<(u64, Duration, MessageRecord)>> = BTreeMap::new();
        let mut retained = Vec::new();
        let mut wills = BTreeMap::new();
        for r in records {
            match r.table {
                Table::Sessions => {
                    let id = text_key(r.table, &r.key)?;
                    sessions.insert(id, (r.age, SessionRecord::decode(&r.key, &r.value)?));
                }
                Table::Messages => {
                    let (id, mid) = split_message_key(&r.key)?;
                    let record = MessageRecord::decode(&r.key, &r.value)?;
                    messages.entry(id).or_default().push((mid, r.age, record));
                }
                Table::Retained => {
                    let topic = text_key(r.table, &r.key)?;
                    let record = TimedMessage::decode(r.table, &r.key, &r.value)?;
                    if record.publish.topic.as_str() != topic {
                        return Err(RecordError::new(r.table, &r.key, "topic differs from its key"));
                    }
                    retained.push((r.age, record));
                }
                Table::Wills => {
                    let id = text_key(r.table, &r.key)?;
                    wills.insert(id, (r.age, TimedMessage::decode(r.table, &r.key, &r.value)?));
                }
            }
        }
        let mut done = Restored::default();
        for (age, record) in retained {
            let topic = record.publish.topic.as_str().to_string();
            match age_message(record.publish, age + record.time) {
                Some(publish) if self.retained.set(now, &publish).is_ok() => done.retained += 1,
                // Expired, or beyond this configuration's limits: gone for good.
                _ => {
                    done.dropped += 1;
                    self.journal.retained(now, &topic, None);
                }
            }
        }
        for (id, (age, record)) in sessions {
            let will = wills.remove(&id);
            let expires_at = match (record.expires_in, record.expiry) {
                (_, u32::MAX) => None,
                (Some(left), _) => match left.checked_sub(age).filter(|l| !l.is_zero()) {
                    Some(left) => Some(now + left),
                    None => {
                        // Expired while the broker was down: gone, and its will due.
                        done.dropped += 1 + messages.remove(&id).map_or(0, |m| m.len());
                        self.journal.delete_session(&id);
                        if let Some((_, will)) = will {
                            self.publish(now, will.publish, None);
                        }
                        continue;
                    }
                },
                // Connected when the broker stopped: offline from now.
                (None, secs) => Some(now + Duration::from_secs(u64::from(secs))),
            };
            let mut kept = Vec::new();
            for (mid, m_age, m) in messages.remove(&id).unwrap_or_default() {
                // A queued message ages on disk; one in flight was sent already, and goes out
                // again as it was.
                let publish = match m.packet_id {
                    Some(_) => Some(m.publish),
                    None => age_message(m.publish, m_age + m.waited),
                };
                match publish {
                    Some(publish) => {
                        kept.push(Kept { id: mid, publish, packet_id: m.packet_id, released: m.released, at: None })
                    }
                    None => done.dropped += 1,
                }
            }
            done.messages += kept.len();
            let will = will.map(|(w_age, w)| (now + w.time.saturating_sub(w_age), w.publish));
            done.wills += usize::from(will.is_some());
            let state = SessionState::restored(now, record.qos2, kept);
            let key = self.registry.restore(&id, record.owner, record.expiry, state, expires_at, will);
            for (filter, entry) in &record.subscriptions {
                self.router.subscribe(key, filter, *entry);
            }
            done.sessions += 1;
        }
        // Messages and wills of no session: left over, never to be delivered.
        for (id, list) in messages {
            done.dropped += list.len();
            self.journal.delete_session(&id);
        }
        for (id, _) in wills {
            done.dropped += 1;
            self.journal.delete_session(&id);
        }
        Ok(done)
    }
}
