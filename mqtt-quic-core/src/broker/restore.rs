//! Starting from a store: the records an adapter read back become kept sessions (offline, with
//! their subscriptions, queues and QoS state), retained messages and delayed wills, aged by the
//! time they spent on disk.

use super::machine::Broker;
use crate::persist::records::{split_message_key, text_key, MessageRecord, SessionRecord, TimedMessage};
use crate::persist::{RecordError, StoredRecord, Table};
use crate::session::outbound::{Change, Kept};
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
        // Wills of sessions that ended while the broker was down go out once every session is
        // back, so that each of them can receive them.
        let mut due_wills = Vec::new();
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
                        due_wills.extend(will.map(|(_, w)| w.publish));
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
                    None => {
                        done.dropped += 1;
                        self.journal.messages(&id, vec![Change::Remove(mid)]);
                    }
                }
            }
            done.messages += kept.len();
            let will = will.map(|(w_age, w)| (now + w.time.saturating_sub(w_age), w.publish));
            done.wills += usize::from(will.is_some());
            let mut state = SessionState::restored(now, record.qos2, kept);
            if !self.journal.is_on() {
                // Restored into a broker that stores nothing: nobody would take its changes.
                state.outbound.journal(false);
            }
            let key = self.registry.restore(&id, record.owner, record.expiry, state, expires_at, will);
            for (filter, entry) in &record.subscriptions {
                self.router.subscribe(key, filter, *entry);
            }
            done.sessions += 1;
        }
        for will in due_wills {
            self.publish(now, will, None);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::machine::BrokerConfig;
    use crate::config::{Secret, ServerConfig};
    use crate::persist::records::{client_key, message_key, SessionRecord, TimedMessage};
    use crate::persist::{Persistence, StoreOp};
    use crate::tls::{SelfSigned, ServerTls};
    use mqtt_proto::{PacketId, QoS, QosPid, TopicName};

    fn broker() -> Broker {
        let cert = SelfSigned::generate(&["localhost"]).unwrap();
        let mut config = BrokerConfig::new(ServerConfig::new(ServerTls::from_self_signed(&cert).unwrap()));
        config.quic.secret = Some(Secret::new([1; 32]));
        config.persistence = Persistence::Sync;
        Broker::new(config).unwrap()
    }

    fn message(topic: &str, expiry: Option<u32>) -> Publish {
        let mut p = Publish::new(TopicName::new(topic).unwrap(), &b"x"[..]);
        p.qos_pid = QosPid::from_parts(QoS::AtLeastOnce, PacketId::MIN);
        p.properties.message_expiry_interval = expiry;
        p
    }

    /// The test's clock (the machine never reads one).
    #[allow(clippy::disallowed_methods)]
    fn start() -> Instant {
        Instant::now()
    }

    fn record(table: Table, key: Vec<u8>, value: Vec<u8>, age: Duration) -> StoredRecord {
        StoredRecord { table, key, value, age }
    }

    /// Time on disk counts: a session, a queued message, a retained message that expired
    /// while the broker was down are gone (and deleted from the store); what is left keeps
    /// what remains of its time; the will of a session that expired meanwhile is published.
    #[test]
    fn records_age_by_their_time_on_disk() {
        let mut b = broker();
        let now = start();
        let hour = Duration::from_secs(3600);
        let session = |expires_in| SessionRecord {
            owner: None,
            expiry: 7200,
            expires_in: Some(expires_in),
            subscriptions: vec![],
            qos2: vec![],
        };
        let queued = |expiry| MessageRecord {
            packet_id: None,
            released: false,
            waited: Duration::ZERO,
            publish: message("q", expiry),
        };
        let records = vec![
            record(Table::Sessions, client_key("alive"), session(2 * hour).encode(), hour),
            record(Table::Sessions, client_key("gone"), session(hour / 2).encode(), hour),
            record(Table::Messages, message_key("alive", 1), queued(Some(60)).encode(), hour),
            record(Table::Messages, message_key("alive", 2), queued(Some(7200)).encode(), hour),
            record(Table::Messages, message_key("alive", 3), queued(None).encode(), hour),
            record(Table::Messages, message_key("nobody", 1), queued(None).encode(), hour),
            record(
                Table::Retained,
                b"r/old".to_vec(),
                TimedMessage {
                    time: Duration::ZERO,
                    publish: {
                        let mut p = message("r/old", Some(60));
                        p.retain = true;
                        p
                    },
                }
                .encode(),
                hour,
            ),
            record(
                Table::Retained,
                b"r/new".to_vec(),
                TimedMessage {
                    time: Duration::ZERO,
                    publish: {
                        let mut p = message("r/new", Some(7200));
                        p.retain = true;
                        p
                    },
                }
                .encode(),
                hour,
            ),
            record(
                Table::Wills,
                client_key("gone"),
                TimedMessage {
                    time: 2 * hour,
                    publish: {
                        let mut p = message("r/will", None);
                        p.retain = true;
                        p
                    },
                }
                .encode(),
                hour,
            ),
        ];
        let done = b.restore(now, records).unwrap();
        assert_eq!((done.sessions, done.messages, done.retained, done.wills), (1, 2, 1, 0));
        // The expired session, the expired message and retained one, the orphan message.
        assert_eq!(done.dropped, 4);
        assert!(b.has_session("alive") && !b.has_session("gone"));
        // The will of the session that expired meanwhile was published (and retained).
        let retained = b.retained.matching(now, &mqtt_proto::TopicFilter::new("r/#").unwrap(), 10);
        let mut topics: Vec<&str> = retained.iter().map(|p| p.topic.as_str()).collect();
        topics.sort();
        assert_eq!(topics, ["r/new", "r/will"]);
        let kept = retained.iter().find(|p| p.topic.as_str() == "r/new").unwrap();
        assert_eq!(kept.properties.message_expiry_interval, Some(3600), "an hour on disk counts");
        // The store is told to forget what was dropped.
        let batch = b.poll_store(now).unwrap();
        let deletes = |table| {
            batch.ops.iter().filter(move |op| match op {
                StoreOp::Delete { table: t, .. } | StoreOp::DeletePrefix { table: t, .. } => *t == table,
                StoreOp::Put { .. } => false,
            })
        };
        assert!(deletes(Table::Sessions).count() >= 2, "{batch:?}");
        assert!(batch.ops.contains(&StoreOp::Delete { table: Table::Messages, key: message_key("alive", 1) }));
        assert!(batch.ops.contains(&StoreOp::Delete { table: Table::Retained, key: b"r/old".to_vec() }));
    }

    /// A record that cannot be read is an error naming it, not a panic or a silent skip.
    #[test]
    fn a_damaged_record_is_an_error() {
        let mut b = broker();
        let bad = vec![record(Table::Sessions, client_key("c"), vec![1, 2, 3], Duration::ZERO)];
        let e = b.restore(start(), bad).unwrap_err();
        assert_eq!(e.table, "sessions");
        assert!(e.to_string().contains("sessions record c"), "{e}");
    }
}
