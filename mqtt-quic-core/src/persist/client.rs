//! A client's store: the client session's QoS state, journaled like the broker's so that an
//! application restarted with the same client id and store picks up where it stopped (the
//! paho / mqtt.go "persistence" habit).
//!
//! What is kept and which output waits for it: see "Client stores" in [`crate::persist`].

use super::log::MessageLog;
use super::records::{client_key, split_message_key, text_key, MessageRecord, SessionRecord};
use super::{RecordError, StoreBatch, StoreOp, StoredRecord, Table};
use crate::config::ConfigError;
use crate::session::outbound::{Change, Kept};
use mqtt_proto::QoS;
use std::time::Instant;
use thiserror::Error;

/// What a client session read back from its store (see
/// [`ClientSession::restore`](crate::session::client::ClientSession::restore)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientRestored {
    /// QoS 1 and 2 messages not yet acknowledged, in flight or queued.
    pub messages: usize,
    /// Of those, the ones that were in flight (sent under a packet identifier).
    pub in_flight: usize,
    /// The broker's QoS 2 messages awaiting PUBREL.
    pub qos2_received: usize,
}

/// Why a client session could not take its store.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RestoreError {
    /// The session cannot outlive a connection with these settings (clean start, no session
    /// expiry) or has no client id: a store would keep nothing the broker could resume.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A record cannot be read, or is not this client's.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// The session has connected or taken a request already (or was restored before): a
    /// store is read once, before anything else.
    #[error("a client store is restored once, before the first connection or request")]
    TooLate,
}

/// What a client's store gave back, in stored (request id) order.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    pub(crate) messages: Vec<Kept>,
    pub(crate) qos2: Vec<u16>,
}

/// Reads client `client_id`'s records. A record of another client, or of a kind only a broker
/// writes, is an error: one store belongs to one client id, and reading someone else's would
/// send their messages.
pub(crate) fn load(client_id: &str, records: Vec<StoredRecord>) -> Result<Loaded, RecordError> {
    let foreign = |table: Table, key: &[u8], other: &str| {
        RecordError::new(
            table,
            key,
            format!(
                "it belongs to client id {other:?}, not {client_id:?}: a client store directory belongs to one client id"
            ),
        )
    };
    let mut loaded = Loaded::default();
    let mut messages = Vec::new();
    for r in records {
        match r.table {
            Table::Sessions => {
                let id = text_key(r.table, &r.key)?;
                if id != client_id {
                    return Err(foreign(r.table, &r.key, &id));
                }
                loaded.qos2 = SessionRecord::decode(&r.key, &r.value)?.qos2;
            }
            Table::Messages => {
                let (id, mid) = split_message_key(&r.key)?;
                if id != client_id {
                    return Err(foreign(r.table, &r.key, &id));
                }
                let m = MessageRecord::decode(&r.key, &r.value)?;
                messages.push(Kept {
                    id: mid,
                    publish: m.publish,
                    packet_id: m.packet_id,
                    released: m.released,
                    at: None,
                });
            }
            Table::Retained | Table::Wills => {
                return Err(RecordError::new(r.table, &r.key, "a client store holds none: this is a broker's store"));
            }
        }
    }
    messages.sort_by_key(|k| k.id);
    loaded.messages = messages;
    Ok(loaded)
}

/// Refuses settings under which a store keeps nothing useful: without a client id the broker
/// assigns a new one every time, and with a clean start (or, in MQTT 5, a session expiry of 0)
/// the broker never has the session to resume.
pub(crate) fn check_config(
    client_id: &str,
    clean_start: bool,
    v5: bool,
    session_expiry: u32,
) -> Result<(), ConfigError> {
    let refuse = |why: &str| Err(ConfigError::Invalid(format!("a client store {why}")));
    if client_id.is_empty() {
        return refuse("needs a client id (the store keeps one client's session)");
    }
    if clean_start {
        return refuse(
            "keeps a session across restarts: set clean_start to false (a clean start discards the session the store resumes)",
        );
    }
    if v5 && session_expiry == 0 {
        return refuse(
            "keeps a session across restarts: set a session expiry above 0 (with 0 the broker discards the session when the connection ends)",
        );
    }
    Ok(())
}

/// A client session's pending store changes, and the output that waits for them.
#[derive(Debug)]
pub(crate) struct ClientJournal {
    client_id: String,
    /// The session expiry, written into the session record (informational: a client reads
    /// only the QoS 2 identifiers back).
    expiry: u32,
    messages: MessageLog,
    /// The QoS 2 receive state changed: the session record is written from it.
    session: bool,
    /// The number the next batch gets.
    next: u64,
    /// The highest batch reported stored.
    stored: u64,
    /// Output waits until this batch is stored (0: nothing waits).
    barrier: u64,
}

impl ClientJournal {
    pub(crate) fn new(client_id: &str, expiry: u32) -> ClientJournal {
        ClientJournal {
            client_id: client_id.to_string(),
            expiry,
            messages: MessageLog::default(),
            session: false,
            next: 1,
            stored: 0,
            barrier: 0,
        }
    }

    /// Records the outbound window's changes and whether the QoS 2 receive state changed. A
    /// QoS 2 message put in flight or released, or a change in the receive state, holds the
    /// output until the batch that carries it is stored (see the module docs).
    pub(crate) fn record(&mut self, changes: Vec<Change>, inbound: bool) {
        let qos2 = changes
            .iter()
            .any(|c| matches!(c, Change::Put(k) if k.packet_id.is_some() && k.publish.qos() == QoS::ExactlyOnce));
        if qos2 || inbound {
            self.barrier = self.next;
        }
        self.session |= inbound;
        // A client commits at once: the broker's commit delay (`Recorded::deferrable`) does not
        // apply.
        self.messages.record(&self.client_id, changes, None, None);
    }

    /// Whether output waits for a batch not yet reported stored.
    pub(crate) fn is_holding(&self) -> bool {
        self.barrier > self.stored
    }

    /// The next batch, if anything changed (or output waits on changes that cancelled out:
    /// then the batch is empty, so that its number can be reported stored). `qos2` gives the
    /// receive state's identifiers now.
    pub(crate) fn batch(&mut self, now: Instant, qos2: impl FnOnce() -> Vec<u16>) -> Option<StoreBatch> {
        if self.messages.is_empty() && !self.session && self.barrier < self.next {
            return None;
        }
        let seq = self.next;
        self.next += 1;
        let mut ops = Vec::new();
        if std::mem::take(&mut self.session) {
            let key = client_key(&self.client_id);
            let qos2 = qos2();
            ops.push(if qos2.is_empty() {
                StoreOp::Delete { table: Table::Sessions, key }
            } else {
                let record = SessionRecord {
                    owner: None,
                    expiry: self.expiry,
                    expires_in: None,
                    subscriptions: Vec::new(),
                    qos2,
                };
                StoreOp::Put { table: Table::Sessions, key, value: record.encode() }
            });
        }
        // No waiters: a client holds its output by batch number alone.
        let _ = self.messages.drain_into(now, &mut ops, None);
        Some(StoreBatch { seq, ops })
    }

    /// Batches up to `seq` are stored.
    pub(crate) fn stored(&mut self, seq: u64) {
        self.stored = self.stored.max(seq.min(self.next - 1));
    }
}
