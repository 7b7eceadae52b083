//! The session registry: every client id the broker keeps a session for, connected or not,
//! with what outlives a connection (its queue while offline, its will waiting for its delay,
//! its expiry). It exists apart from the connections because a session's life is not a
//! connection's: a client takes its session over from another connection, comes back to it
//! later, or never does (then the session expires and its will goes out).
//!
//! [`Registry`] owns the records, the offline byte budget they count against and their timers;
//! the `impl Broker` block below is the life of a session across the rest of the broker
//! (admission and takeover, a connection's end, due wills and expiries), which also touches
//! connections, the router and routing.

use super::events::BrokerEvent;
use super::links::Peer;
use super::local::LOCAL_BASE;
use super::machine::Broker;
use super::router::{owner, SessionKey};
use crate::quic::Lane;
use crate::session::server::{message_cost, EndReason, ServerEvent, SessionState};
use crate::timers::TimerIndex;
use bytes::Bytes;
use mqtt_proto::{Connect, PacketId, Publish, PublishProperties, QosPid, ReasonCode, Will};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// A client's session as the broker keeps it.
pub(super) struct Record {
    pub(super) key: SessionKey,
    /// The user name that created the session: only that user may resume it.
    pub(super) owner: Option<String>,
    /// Bytes of messages waiting in `kept` (counted against `max_offline_bytes`).
    queued_bytes: usize,
    /// The live connection, if any.
    pub(super) conn: Option<Peer>,
    /// The session state while offline.
    kept: Option<SessionState>,
    /// Session expiry in seconds (`u32::MAX`: never, for MQTT 3.1.1 persistent sessions).
    pub(super) expiry: u32,
    /// When the offline session is discarded.
    expires_at: Option<Instant>,
    /// A will waiting for its delay, as the message it becomes.
    will: Option<(Instant, Publish)>,
    /// Kept across restarts: its changes are journaled for the store.
    pub(super) durable: bool,
}

impl Record {
    /// When the offline session is discarded (`None` while connected, or never).
    pub(super) fn expires_at(&self) -> Option<Instant> {
        self.expires_at
    }
}

/// The two deadlines of an offline session, each filed apart under its client id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum RecordTimer {
    /// Its will's delay ends.
    Will,
    /// The session expires.
    Expiry,
}

/// The kept sessions, by client id and by session key.
pub(super) struct Registry {
    clients: BTreeMap<String, Record>,
    keys: BTreeMap<SessionKey, String>,
    next_key: SessionKey,
    /// Bytes queued for offline sessions, all together.
    offline_bytes: usize,
    /// Will and expiry deadlines of offline sessions. A reconnect, or a session's removal,
    /// takes its entries out.
    timers: TimerIndex<(String, RecordTimer)>,
    /// Keyed hash for assigned client ids: unpredictable without the configured secret.
    id_key: ring::hmac::Key,
}

impl Registry {
    pub(super) fn new(id_key: ring::hmac::Key) -> Registry {
        Registry {
            clients: BTreeMap::new(),
            keys: BTreeMap::new(),
            next_key: 0,
            offline_bytes: 0,
            timers: TimerIndex::new(),
            id_key,
        }
    }

    /// Sessions kept (connected or not).
    pub(super) fn len(&self) -> usize {
        self.clients.len()
    }

    /// Sessions whose client is connected.
    pub(super) fn connected(&self) -> usize {
        self.clients.values().filter(|r| r.conn.is_some()).count()
    }

    pub(super) fn contains(&self, id: &str) -> bool {
        self.clients.contains_key(id)
    }

    pub(super) fn get(&self, id: &str) -> Option<&Record> {
        self.clients.get(id)
    }

    pub(super) fn get_mut(&mut self, id: &str) -> Option<&mut Record> {
        self.clients.get_mut(id)
    }

    /// The state of an offline session.
    pub(super) fn kept(&self, id: &str) -> Option<&SessionState> {
        self.clients.get(id)?.kept.as_ref()
    }

    /// The state of an offline session, by key, with its client id.
    pub(super) fn kept_by_key(&mut self, key: SessionKey) -> Option<(&str, &mut SessionState)> {
        let id = self.keys.get(&key)?;
        Some((id.as_str(), self.clients.get_mut(id)?.kept.as_mut()?))
    }

    /// A session read back from a store, offline: its state, its expiry (`expires_at`, `None`
    /// for never) and its pending will. Returns its key, for its subscriptions.
    pub(super) fn restore(
        &mut self,
        id: &str,
        owner: Option<String>,
        expiry: u32,
        state: SessionState,
        expires_at: Option<Instant>,
        will: Option<(Instant, Publish)>,
    ) -> SessionKey {
        self.next_key += 1;
        let key = self.next_key;
        let record =
            Record { key, owner, queued_bytes: 0, conn: None, kept: None, expiry, expires_at, will, durable: true };
        if let Some(at) = expires_at {
            self.timers.set((id.to_string(), RecordTimer::Expiry), Some(at));
        }
        if let Some((at, _)) = &record.will {
            self.timers.set((id.to_string(), RecordTimer::Will), Some(*at));
        }
        self.clients.insert(id.to_string(), record);
        self.keys.insert(key, id.to_string());
        self.keep(id, state);
        key
    }

    /// A session by its key (a data stream's subscriber key gives its connection's session),
    /// with its client id.
    pub(super) fn by_key(&self, key: SessionKey) -> Option<(&String, &Record)> {
        let id = self.keys.get(&owner(key))?;
        Some((id, self.clients.get(id)?))
    }

    /// Whether a session can take a message now: in-process subscriptions always, clients while
    /// connected.
    pub(super) fn is_online(&self, key: SessionKey) -> bool {
        key > LOCAL_BASE
            || self.keys.get(&owner(key)).and_then(|id| self.clients.get(id)).is_some_and(|r| r.conn.is_some())
    }

    /// A client id for a client that sent none: unpredictable (a keyed hash of a counter, the
    /// key derived from the configured secret), so nobody can guess and take over the session
    /// of a client that will be given one; unique [MQTT-3.1.3-6].
    pub(super) fn assign_client_id(&mut self) -> String {
        loop {
            self.next_key += 1;
            let tag = ring::hmac::sign(&self.id_key, &self.next_key.to_le_bytes());
            let hex: String = tag.as_ref()[..16].iter().map(|b| format!("{b:02x}")).collect();
            let id = format!("auto-{hex}");
            if !self.clients.contains_key(&id) {
                return id;
            }
        }
    }

    /// Connects a session to `conn`, creating it (owned by `username`) if it is new: its kept
    /// state comes out (and its bytes leave the offline budget), and its expiry and will are
    /// cancelled, timer entries included, so a client that comes and goes does not grow the
    /// timers.
    fn attach(&mut self, id: &str, username: &Option<String>, expiry: u32, conn: Peer) -> (Option<SessionState>, bool) {
        let next_key = &mut self.next_key;
        let record = self.clients.entry(id.to_string()).or_insert_with(|| {
            *next_key += 1;
            Record {
                key: *next_key,
                owner: username.clone(),
                queued_bytes: 0,
                conn: None,
                kept: None,
                expiry,
                expires_at: None,
                will: None,
                durable: false,
            }
        });
        let state = record.kept.take();
        self.offline_bytes -= std::mem::take(&mut record.queued_bytes);
        record.conn = Some(conn);
        record.expiry = expiry;
        if record.expires_at.take().is_some() {
            self.timers.remove(&(id.to_string(), RecordTimer::Expiry));
        }
        let will = record.will.take().is_some();
        if will {
            self.timers.remove(&(id.to_string(), RecordTimer::Will));
        }
        self.keys.insert(record.key, id.to_string());
        (state, will)
    }

    /// Keeps a session's state while its client is away, counting its messages against the
    /// offline byte budget.
    pub(super) fn keep(&mut self, id: &str, mut state: SessionState) {
        let Some(record) = self.clients.get_mut(id) else { return };
        state.detach_messages();
        let bytes = state.bytes();
        self.offline_bytes = self.offline_bytes - record.queued_bytes + bytes;
        record.queued_bytes = bytes;
        record.kept = Some(state);
    }

    /// Starts an offline session's clocks: its will (delayed, at most until the session
    /// expires) and its expiry (none for `u32::MAX`).
    fn arm(&mut self, now: Instant, id: &str, will: Option<Will>) -> Option<(Instant, Publish)> {
        let record = self.clients.get_mut(id)?;
        if let Some(will) = will {
            let delay = will.properties.will_delay_interval.unwrap_or(0);
            let at = now + Duration::from_secs(u64::from(delay.min(record.expiry)));
            record.will = Some((at, will_message(will)));
            self.timers.set((id.to_string(), RecordTimer::Will), Some(at));
        }
        record.expires_at = match record.expiry {
            u32::MAX => None,
            secs => Some(now + Duration::from_secs(u64::from(secs))),
        };
        if let Some(at) = record.expires_at {
            self.timers.set((id.to_string(), RecordTimer::Expiry), Some(at));
        }
        record.will.clone()
    }

    /// Forgets a session: its queue (and the bytes it counted) and its timer entries. (Its
    /// subscriptions are the router's: see `Broker::remove_record`.)
    fn remove(&mut self, id: &str) -> Option<Record> {
        let mut record = self.clients.remove(id)?;
        self.keys.remove(&record.key);
        self.offline_bytes -= std::mem::take(&mut record.queued_bytes);
        if record.expires_at.is_some() {
            self.timers.remove(&(id.to_string(), RecordTimer::Expiry));
        }
        if record.will.is_some() {
            self.timers.remove(&(id.to_string(), RecordTimer::Will));
        }
        Some(record)
    }

    /// Queues a QoS 1 or 2 message for an offline session, as its own copy (not a slice of a
    /// receive buffer), within the offline budgets. Returns whether it was queued (otherwise it
    /// is dropped).
    pub(super) fn enqueue(
        &mut self,
        now: Instant,
        key: SessionKey,
        publish: Publish,
        max_offline_bytes: usize,
        max_queue: usize,
    ) -> bool {
        let cost = message_cost(&publish);
        let over = self.offline_bytes + cost > max_offline_bytes;
        let record = self.keys.get(&key).and_then(|id| self.clients.get_mut(id));
        match record {
            // Full is checked before the copy is made: a full queue costs nothing more.
            Some(Record { kept: Some(state), queued_bytes, .. }) if !over && !state.is_full(max_queue) => {
                state.enqueue(now, publish.detached(), max_queue);
                *queued_bytes += cost;
                self.offline_bytes += cost;
                true
            }
            _ => false,
        }
    }

    /// The next will or expiry.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.timers.next()
    }
}

impl Broker {
    /// Takes the client in once it is authenticated: the rules that need its identity (see
    /// `Broker::identity_refusal`), then takeover, and its session accepted or resumed.
    pub(super) fn admit(&mut self, now: Instant, conn: Peer, c: Connect) {
        let assigned = c.client_id.is_empty().then(|| self.assign_client_id());
        let id = assigned.clone().unwrap_or_else(|| c.client_id.to_string());
        let username = c.username.as_ref().map(|u| u.as_str().to_string());
        let impose = match self.identity_refusal(&id, username.as_deref(), &c) {
            Ok(impose) => impose,
            Err(code) => return self.refuse(now, conn, code),
        };
        let expiry = if c.protocol.is_v5() {
            c.properties.session_expiry_interval.unwrap_or(0).min(self.config.max_session_expiry)
        } else if c.clean_start {
            0
        } else {
            // MQTT 3.1.1 persistent sessions have no expiry of their own: the broker's maximum.
            self.config.max_session_expiry
        };
        if impose {
            if let Some(live) = self.conns.get_mut(&conn) {
                live.session.impose_keep_alive(self.config.max_keepalive);
            }
        }
        self.take_over(now, &id);
        // Clean start discards any kept session [MQTT-3.1.2-4].
        let existed = self.registry.contains(&id) && !c.clean_start;
        let removed = c.clean_start && self.remove_record(&id).is_some_and(|r| r.durable);
        let (state, cancelled_will) = self.registry.attach(&id, &username, expiry, conn);
        let durable = self.journal.is_on() && expiry > 0;
        if let Some(record) = self.registry.get_mut(&id) {
            if record.durable && cancelled_will {
                self.journal.will(&id, None);
            }
            record.durable = durable;
        }
        let Some(live) = self.conns.get_mut(&conn) else { return };
        live.client = Some(id.clone());
        live.username = username;
        let asked = c.properties.session_expiry_interval.unwrap_or(0);
        if c.protocol.is_v5() && asked != expiry {
            live.session.announce_session_expiry(expiry);
        }
        let session_present = existed && state.is_some();
        let remote = live.hello.as_ref().and_then(|h| h.2);
        self.stats.connects += 1;
        let connected = BrokerEvent::ClientConnected {
            client_id: live.client.clone().unwrap_or_default(),
            username: live.username.clone(),
            peer: conn,
            remote,
            protocol: c.protocol,
            session_present,
        };
        match (existed, state) {
            (true, Some(mut state)) => {
                // Read rights may have changed while the client was away (an `Auth` backed by
                // something that changes): what it may no longer read does not go out.
                if let Some(auth) = &self.config.auth {
                    let client = live.client.as_deref().unwrap_or("");
                    let user = live.username.as_deref();
                    let denied = state.retain_messages(|p| auth.can_read(client, user, &p.topic));
                    self.stats.messages_denied += denied as u64;
                }
                let _ = live.session.resume(now, state);
            }
            _ => {
                let _ = live.session.accept(now, false, assigned.as_deref());
            }
        }
        self.journal_attach(conn, &id, durable, removed);
        self.events.push_back(connected);
    }

    /// Takeover: the previous connection of client `id`, if any, ends with 0x8E and its session
    /// state is kept for the new one.
    fn take_over(&mut self, now: Instant, id: &str) {
        let mut taken_over_will = None;
        if let Some(other) = self.registry.get(id).and_then(|r| r.conn) {
            // Its data streams end now: their subscriber keys are the session's, which the
            // new connection's streams are about to use.
            self.drop_lanes(now, other);
            if let Some(old) = self.conns.get_mut(&other) {
                let _ = old.session.disconnect(ReasonCode::SessionTakenOver);
                old.client = None;
                // The old connection's will: published now if it has no delay (the delay is
                // over at once), cancelled by this new connection otherwise [MQTT-3.1.2-8].
                taken_over_will = std::iter::from_fn(|| old.session.poll_event())
                    .find_map(|e| match e {
                        ServerEvent::Ended { will, .. } => will,
                        _ => None,
                    })
                    .filter(|w| w.properties.will_delay_interval.unwrap_or(0) == 0);
                let mut state = old.session.take_state();
                let dropped = old.dropped;
                let out: Vec<Bytes> = std::iter::from_fn(|| old.session.poll_transmit()).collect();
                // What the old connection's last packets changed (a PUBREL it was just sent,
                // a PUBREC) is stored before those packets go out.
                if self.journal.state(id, &mut state) {
                    if let Some(old) = self.conns.get_mut(&other) {
                        if let Some(ticket) = self.journal.batch_ticket(old.gate) {
                            old.gate = self.journal.regate(other, old.gate, ticket);
                        }
                    }
                }
                for bytes in out {
                    self.emit_on(now, other, Lane::CONTROL, bytes);
                }
                // Serving the ended session closes its transport.
                self.dirty.insert(other);
                self.events.push_back(BrokerEvent::ClientDisconnected {
                    client_id: id.to_string(),
                    peer: other,
                    reason: EndReason::Server(ReasonCode::SessionTakenOver),
                    detail: None,
                    dropped,
                });
                if let Some(r) = self.registry.get_mut(id) {
                    r.conn = None;
                }
                self.registry.keep(id, state);
            }
        }
        if let Some(will) = taken_over_will {
            self.publish(now, will_message(will), None);
        }
    }

    /// A connected client's session ended: what it had not acknowledged of shared subscriptions
    /// goes to other members, its state is kept, and its will and expiry clocks start.
    pub(super) fn on_end(&mut self, now: Instant, conn: Peer, will: Option<Will>) {
        let Some(live) = self.conns.get_mut(&conn) else { return };
        let Some(id) = live.client.take() else { return };
        let mut state = live.session.take_state();
        if let Some(key) = self.registry.get(&id).map(|r| r.key) {
            self.redistribute(now, key, &mut state);
        }
        let Some(record) = self.registry.get_mut(&id) else { return };
        if record.conn != Some(conn) {
            return;
        }
        record.conn = None;
        let durable = record.durable;
        let _ = self.journal.state(&id, &mut state);
        self.registry.keep(&id, state);
        let will = self.registry.arm(now, &id, will);
        if durable {
            // Its record now says when it expires; a delayed will waits on disk too.
            self.journal.session(&id);
            if will.as_ref().is_some_and(|(at, _)| *at > now) {
                self.journal.will(&id, will);
            }
        }
        self.fire(now);
    }

    /// Forgets a session: its subscriptions, its queue (and the bytes it counted) and its
    /// timer entries.
    pub(super) fn remove_record(&mut self, id: &str) -> Option<Record> {
        let record = self.registry.remove(id)?;
        self.router.remove_session(record.key);
        if record.durable {
            self.journal.delete_session(id);
        }
        Some(record)
    }

    /// Publishes due wills and drops expired sessions.
    pub(super) fn fire(&mut self, now: Instant) {
        while let Some((id, _)) = self.registry.timers.pop_due(now) {
            let Some(record) = self.registry.clients.get_mut(&id) else { continue };
            // A reconnect cancels both; entries it made stale are skipped here.
            if record.will.as_ref().is_some_and(|(t, _)| *t <= now) {
                if let Some((_, will)) = record.will.take() {
                    if record.durable {
                        self.journal.will(&id, None);
                    }
                    self.publish(now, will, None);
                }
            }
            let Some(record) = self.registry.clients.get(&id) else { continue };
            if record.conn.is_none() && record.expires_at.is_some_and(|t| t <= now) {
                if let Some(record) = self.remove_record(&id) {
                    if let Some((_, will)) = record.will {
                        // A session that ends before its will delay publishes the will then.
                        self.publish(now, will, None);
                    }
                }
            }
        }
    }
}

/// The PUBLISH a will becomes.
fn will_message(will: Will) -> Publish {
    let mut p = Publish::new(will.topic, will.payload);
    p.qos_pid = QosPid::from_parts(will.qos, PacketId::MIN);
    p.retain = will.retain;
    let w = &*will.properties;
    if !w.is_empty() {
        let mut props = PublishProperties::default();
        props.payload_format_indicator = w.payload_format_indicator;
        props.message_expiry_interval = w.message_expiry_interval;
        props.content_type = w.content_type.clone();
        props.response_topic = w.response_topic.clone();
        props.correlation_data = w.correlation_data.clone();
        props.user_properties = w.user_properties.clone();
        p.properties = props.into();
    }
    p
}
