//! The journal: what changed in the broker's durable state since the last batch, coalesced per
//! record, and the acknowledgements held until it is on disk (see [`crate::persist`]).
//!
//! Changes are coalesced by key until the adapter polls a batch: a message queued and
//! acknowledged within one batch is never written at all, and a session changed ten times is
//! written once, from its state at that moment. Session records are read from the broker's
//! state when the batch is made; messages, retained messages and wills are kept as their
//! changes come (they are cheap to clone and expensive to look up).
//!
//! Holding acknowledgements: a connection whose packet changed durable state is given a
//! ticket, and its output from then on waits in order behind the ticket until it is satisfied,
//! so its PUBACK, PUBREC, PUBCOMP, SUBACK or CONNACK never promises what a crash could still
//! take back. A ticket waits for two things: a batch number (the batch that carries the
//! session, subscription, retained message, will or QoS 2 state the packet changed), and each
//! message the packet routed to a kept session, until that message is either written (then
//! for its batch) or acknowledged by its subscriber before it was (then for nothing: it is no
//! longer the broker's to keep). So a publisher whose subscribers are quick gets its PUBACK
//! as soon as they have acknowledged, without a trip to the disk, and one whose subscriber is
//! slow or offline once the message is synced.

use super::links::Peer;
use super::machine::Broker;
use crate::persist::log::MessageLog;
use crate::persist::records::{client_key, messages_prefix, SessionRecord, TimedMessage};
use crate::persist::{Persistence, StoreBatch, StoreOp, Table};
use crate::quic::Lane;
use crate::session::outbound::Change;
use crate::session::server::SessionState;
use bytes::Bytes;
use mqtt_proto::{Publish, QoS};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

/// What a connection's held output waits for (see the module docs).
#[derive(Debug, Default)]
struct Ticket {
    /// This batch stored (0: none).
    batch: u64,
    /// Messages neither written nor acknowledged yet.
    waiting: usize,
}

/// One piece of a connection's held output.
#[derive(Debug)]
pub(super) enum Out {
    /// Bytes for one of its streams (empty: a marker from `regate`, nothing to send).
    Data(Lane, Bytes),
    /// Finish this data stream (its last bytes came before).
    FinishLane(Lane),
}

/// Output held behind tickets, per connection, in order.
#[derive(Debug, Default)]
struct Held {
    items: VecDeque<(u64, Out)>,
    /// Bytes in `items`.
    bytes: usize,
    /// The connection's session ended: finish its transport once everything is out.
    finish: bool,
}

/// The broker's pending store changes and held output.
#[derive(Debug)]
pub(super) struct Journal {
    mode: Persistence,
    /// The number the next batch gets.
    next: u64,
    /// The highest batch reported stored.
    stored: u64,
    /// Unsatisfied tickets, by number; a number not here is satisfied.
    tickets: BTreeMap<u64, Ticket>,
    /// The last ticket number given out.
    last_ticket: u64,
    /// The ticket of the packet being handled (`Journal::open`), and whether it changed
    /// anything beyond new messages.
    window: Option<(u64, bool)>,
    /// A ticket was satisfied since the last release.
    releasable: bool,
    /// A client's PUBLISH is being routed: the copies it makes are what its acknowledgement
    /// waits for (and may wait out the commit delay).
    pub(super) routing: bool,
    /// Sessions to delete with everything under them, before anything else in the batch.
    deleted: BTreeSet<String>,
    /// Sessions whose record is to be written from their current state.
    sessions: BTreeSet<String>,
    /// Sessions' messages (the part of the journal a client's store shares).
    messages: MessageLog,
    /// Retained messages: the message and when it was set, or `None` to delete.
    retained: BTreeMap<String, Option<(Instant, Publish)>>,
    /// Delayed wills: when the delay ends and the message, or `None` to delete.
    wills: BTreeMap<String, Option<(Instant, Publish)>>,
    held: BTreeMap<Peer, Held>,
    /// How long a batch of nothing but fresh QoS 1 messages may wait (see
    /// `BrokerConfig::commit_delay`).
    delay: Duration,
    /// The broker's latest time (set on every input).
    now: Option<Instant>,
    /// When the oldest message waiting out the commit delay arrived (`None` once its delay
    /// ran out: the next poll writes it).
    oldest: Option<Instant>,
    /// In a sharded broker: copies of a client's message routed to other shards, whose
    /// keeping the ticket of its packet waits for (by the number the other shard answers).
    remote: BTreeMap<u64, u64>,
    next_remote: u64,
    /// Tickets of messages routed here by other shards, and whom to tell (shard, their
    /// number) once they are satisfied; the answers ready to go.
    watchers: BTreeMap<u64, Vec<(u16, u64)>>,
    kept: Vec<(u16, u64)>,
}

impl Journal {
    pub(super) fn new(mode: Persistence, delay: Duration) -> Journal {
        Journal {
            delay,
            now: None,
            oldest: None,
            mode,
            next: 1,
            stored: 0,
            tickets: BTreeMap::new(),
            last_ticket: 0,
            window: None,
            releasable: false,
            routing: false,
            deleted: BTreeSet::new(),
            sessions: BTreeSet::new(),
            messages: MessageLog::default(),
            retained: BTreeMap::new(),
            wills: BTreeMap::new(),
            held: BTreeMap::new(),
            remote: BTreeMap::new(),
            next_remote: 0,
            watchers: BTreeMap::new(),
            kept: Vec::new(),
        }
    }

    /// A copy of the client's message being routed goes to another shard (with
    /// `Persistence::Sync`): its packet's answers wait until that shard says the copies it
    /// made are kept (see [`Journal::remote_kept`]). The number to send along, if they wait.
    pub(super) fn await_remote(&mut self) -> Option<u64> {
        let (id, _) = self.window.filter(|_| self.routing && self.mode == Persistence::Sync)?;
        self.tickets.entry(id).or_default().waiting += 1;
        self.next_remote += 1;
        self.remote.insert(self.next_remote, id);
        Some(self.next_remote)
    }

    /// Another shard kept (or delivered and had acknowledged) its copies of a message routed
    /// there with number `number`.
    pub(super) fn remote_kept(&mut self, number: u64) {
        if let Some(id) = self.remote.remove(&number) {
            self.settle(id, 0);
        }
    }

    /// Once ticket `ticket` is satisfied, shard `shard` is to hear `number` (see
    /// [`Journal::take_kept`]).
    pub(super) fn watch(&mut self, ticket: u64, shard: u16, number: u64) {
        self.watchers.entry(ticket).or_default().push((shard, number));
        self.notify();
    }

    /// The answers due to other shards: their numbers whose copies are now kept.
    pub(super) fn take_kept(&mut self) -> Vec<(u16, u64)> {
        std::mem::take(&mut self.kept)
    }

    /// Moves the watchers of satisfied tickets to the answers.
    fn notify(&mut self) {
        if self.watchers.is_empty() {
            return;
        }
        let (tickets, kept) = (&self.tickets, &mut self.kept);
        self.watchers.retain(|id, w| {
            let waiting = tickets.contains_key(id);
            if !waiting {
                kept.append(w);
            }
            waiting
        });
    }

    /// Whether anything is journaled.
    pub(super) fn is_on(&self) -> bool {
        self.mode.is_on()
    }

    /// Starts handling a connection's packets: what they change is what their answers wait
    /// for (with `Persistence::Sync`).
    pub(super) fn open(&mut self) {
        if self.mode == Persistence::Sync {
            self.last_ticket += 1;
            self.window = Some((self.last_ticket, false));
        }
    }

    /// Done handling a connection's packets: the ticket its output from now on waits behind,
    /// if they changed anything durable.
    pub(super) fn close(&mut self) -> Option<u64> {
        let (id, other) = self.window.take()?;
        if other {
            self.tickets.entry(id).or_default().batch = self.next;
        }
        // Its messages may all have been acknowledged while it was open.
        let t = self.tickets.get(&id)?;
        if t.waiting == 0 && t.batch <= self.stored {
            self.tickets.remove(&id);
            return None;
        }
        Some(id)
    }

    /// The ticket `current` (a connection's), made to wait also for the batch that will carry
    /// a change made now; a new ticket if `current` is satisfied already (with
    /// `Persistence::Sync`). Output made before the change and not sent yet may be behind
    /// `current`: it must wait for both, so `current` is kept rather than replaced.
    pub(super) fn batch_ticket(&mut self, current: u64) -> Option<u64> {
        if self.mode != Persistence::Sync {
            return None;
        }
        if let Some(t) = self.tickets.get_mut(&current) {
            t.batch = t.batch.max(self.next);
            return Some(current);
        }
        self.last_ticket += 1;
        self.tickets.insert(self.last_ticket, Ticket { batch: self.next, waiting: 0 });
        Some(self.last_ticket)
    }

    /// The ticket a connection's output waits behind becomes `new`. If its current one `old`
    /// is not satisfied yet and none of its output is held, output made under `old` and not
    /// sent yet would slip behind `new` alone: a marker keeps it (and all that follows) behind
    /// `old` too.
    pub(super) fn regate(&mut self, peer: Peer, old: u64, new: u64) -> u64 {
        if old != new && self.tickets.contains_key(&old) && !self.held.contains_key(&peer) {
            self.held.entry(peer).or_default().items.push_back((old, Out::Data(Lane::CONTROL, Bytes::new())));
        }
        new
    }

    /// Bytes held for `peer` (they count against its backlog like bytes the transport has).
    pub(super) fn held_bytes(&self, peer: Peer) -> usize {
        self.held.get(&peer).map_or(0, |h| h.bytes)
    }

    /// A change that is not a new message: the open ticket waits for the next batch.
    fn other(&mut self) {
        if let Some((_, other)) = &mut self.window {
            *other = true;
        }
    }

    /// A message ticket `id` waited for was written in batch `batch`, or acknowledged (`0`).
    fn settle(&mut self, id: u64, batch: u64) {
        let open = self.window.map(|w| w.0);
        if let Some(t) = self.tickets.get_mut(&id) {
            t.waiting = t.waiting.saturating_sub(1);
            t.batch = t.batch.max(batch);
            if t.waiting == 0 && t.batch <= self.stored && open != Some(id) {
                self.tickets.remove(&id);
                self.releasable = true;
                self.notify();
            }
        }
    }

    /// The session's record is to be written (or deleted, if it is no longer kept).
    pub(super) fn session(&mut self, id: &str) {
        if self.is_on() {
            self.other();
            if !self.sessions.contains(id) {
                self.sessions.insert(id.to_string());
            }
        }
    }

    /// The session is gone, with its messages and will.
    pub(super) fn delete_session(&mut self, id: &str) {
        if !self.is_on() {
            return;
        }
        self.other();
        self.sessions.remove(id);
        self.wills.remove(id);
        // What waited for its messages waits for the deletion instead.
        for waiter in self.messages.forget(id) {
            self.settle(waiter, self.next);
        }
        self.deleted.insert(id.to_string());
    }

    /// Changes to a session's messages (see `Outbound::take_changes`).
    pub(super) fn messages(&mut self, id: &str, changes: Vec<Change>) {
        let waiter = self.window.map(|w| w.0).filter(|_| self.routing);
        let recorded = self.messages.record(id, changes, waiter, self.now);
        if let (Some(waiter), true) = (waiter, recorded.waiting > 0) {
            self.tickets.entry(waiter).or_default().waiting += recorded.waiting;
        }
        for cancelled in recorded.cancelled {
            self.settle(cancelled, 0);
        }
        if recorded.other {
            self.other();
        }
        if recorded.deferrable && self.oldest.is_none() {
            self.oldest = self.now;
        }
    }

    /// The broker's clock moved to `now`: the commit delay may have run out.
    pub(super) fn tick(&mut self, now: Instant) {
        self.now = Some(now);
        if self.oldest.is_some_and(|at| at + self.delay <= now) {
            self.oldest = None;
        }
    }

    /// When the commit delay of the messages waiting out runs out.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.oldest.filter(|_| !self.messages.is_empty()).map(|at| at + self.delay)
    }

    /// Whether a batch may wait: it would hold nothing but fresh QoS 1 messages, each within
    /// the commit delay. Their clients may acknowledge them meanwhile, and then they are never
    /// written; a publisher's PUBACK waiting on them goes out then (or once they are stored,
    /// when the delay runs out first).
    fn may_wait(&mut self, now: Instant) -> bool {
        if !(self.deleted.is_empty()
            && self.sessions.is_empty()
            && self.retained.is_empty()
            && self.wills.is_empty()
            && !self.messages.has_undeferrable())
        {
            return false;
        }
        // `oldest` is never later than the oldest waiting copy's arrival (it is not moved
        // forward when that copy is acknowledged): only once its delay has passed is the exact
        // one looked for, so a poll after every input costs no scan.
        if self.oldest.is_none_or(|at| at + self.delay <= now) {
            self.oldest = self.messages.oldest_young();
        }
        self.oldest.is_some_and(|at| at + self.delay > now)
    }

    /// A retained message set (`Some`) or cleared.
    pub(super) fn retained(&mut self, now: Instant, topic: &str, publish: Option<&Publish>) {
        if self.is_on() {
            self.other();
            self.retained.insert(topic.to_string(), publish.map(|p| (now, p.detached())));
        }
    }

    /// A delayed will pending (`Some`: when its delay ends, and the message) or gone.
    pub(super) fn will(&mut self, id: &str, will: Option<(Instant, Publish)>) {
        if self.is_on() {
            self.other();
            self.wills.insert(id.to_string(), will);
        }
    }

    /// Changes in a kept (offline) session's state; returns whether there were any.
    pub(super) fn state(&mut self, id: &str, state: &mut SessionState) -> bool {
        let (changes, inbound) = state.take_changes();
        if !self.is_on() {
            return false;
        }
        let changed = inbound || !changes.is_empty();
        if inbound {
            self.session(id);
        }
        self.messages(id, changes);
        changed
    }

    /// When nothing is outstanding and nothing is journaled, yet a ticket waits on the next
    /// batch (its changes cancelled out), that batch number is used up without a batch.
    fn skip_empty(&mut self) {
        let next = self.next;
        if self.stored + 1 == next
            && self.is_empty()
            && self.tickets.values().any(|t| t.waiting == 0 && t.batch == next)
        {
            self.next += 1;
            self.stored(next);
        }
    }

    fn is_empty(&self) -> bool {
        self.deleted.is_empty()
            && self.sessions.is_empty()
            && self.messages.is_empty()
            && self.retained.is_empty()
            && self.wills.is_empty()
    }

    /// Holds `bytes` for `peer` if its ticket is not satisfied (or it already holds output);
    /// gives them back to send now otherwise.
    pub(super) fn hold(&mut self, peer: Peer, ticket: u64, out: Out) -> Option<Out> {
        let held = match self.held.get_mut(&peer) {
            Some(held) => held,
            None if self.tickets.contains_key(&ticket) => self.held.entry(peer).or_default(),
            None => return Some(out),
        };
        if let Out::Data(_, bytes) = &out {
            held.bytes += bytes.len();
        }
        held.items.push_back((ticket, out));
        None
    }

    /// The connection's session ended: whether its transport can be finished now (nothing is
    /// held for it); otherwise it is finished once its output is released.
    pub(super) fn finish(&mut self, peer: Peer) -> bool {
        match self.held.get_mut(&peer) {
            Some(held) => {
                held.finish = true;
                false
            }
            None => true,
        }
    }

    /// The connection's transport is gone: whatever it held goes nowhere.
    pub(super) fn forget(&mut self, peer: Peer) {
        self.held.remove(&peer);
    }

    /// Batches up to `seq` are stored: the tickets they satisfy are done.
    fn stored(&mut self, seq: u64) {
        self.stored = self.stored.max(seq.min(self.next - 1));
        let (stored, open) = (self.stored, self.window.map(|w| w.0));
        let before = self.tickets.len();
        self.tickets.retain(|id, t| t.waiting > 0 || t.batch > stored || open == Some(*id));
        self.releasable |= self.tickets.len() != before;
        self.notify();
    }

    /// The output no longer held, per connection, in order, and whether to finish the
    /// connection after it.
    fn release(&mut self) -> Vec<(Peer, Vec<Out>, bool)> {
        self.skip_empty();
        if !std::mem::take(&mut self.releasable) {
            return Vec::new();
        }
        let mut out = Vec::new();
        let tickets = &self.tickets;
        self.held.retain(|peer, held| {
            let mut ready = Vec::new();
            while held.items.front().is_some_and(|(t, _)| !tickets.contains_key(t)) {
                // (Markers from `regate` are empty: nothing to send.)
                match held.items.pop_front().map(|(_, out)| out) {
                    Some(Out::Data(_, bytes)) if bytes.is_empty() => {}
                    Some(Out::Data(lane, bytes)) => {
                        held.bytes -= bytes.len();
                        ready.push(Out::Data(lane, bytes));
                    }
                    Some(out) => ready.push(out),
                    None => {}
                }
            }
            let done = held.items.is_empty();
            if !ready.is_empty() || done {
                out.push((*peer, ready, done && held.finish));
            }
            !done
        });
        out
    }
}

impl Broker {
    /// The next batch of storage operations, when persistence is on and something changed.
    /// Poll it after every input (see [`crate::persist`]); apply each batch's operations in
    /// order and atomically, then report the highest batch stored with
    /// [`Broker::handle_stored`].
    #[must_use]
    pub fn poll_store(&mut self, now: Instant) -> Option<StoreBatch> {
        self.journal.tick(now);
        if self.journal.is_empty() || self.journal.may_wait(now) {
            return None;
        }
        self.make_batch(now, Some(self.journal.delay))
    }

    /// Everything journaled, as one last batch, commit delay or not: for an adapter closing
    /// its store at shutdown (after the last [`Broker::poll_store`]), so that nothing the
    /// broker changed is left out.
    #[must_use]
    pub fn flush_store(&mut self, now: Instant) -> Option<StoreBatch> {
        self.journal.tick(now);
        if self.journal.is_empty() {
            return None;
        }
        self.make_batch(now, None)
    }

    /// The next batch: everything journaled, except, with `defer`, new QoS 1 copies younger
    /// than it.
    fn make_batch(&mut self, now: Instant, defer: Option<Duration>) -> Option<StoreBatch> {
        let seq = self.journal.next;
        self.journal.next += 1;
        let mut ops = Vec::new();
        for id in std::mem::take(&mut self.journal.deleted) {
            ops.push(StoreOp::Delete { table: Table::Sessions, key: client_key(&id) });
            ops.push(StoreOp::DeletePrefix { table: Table::Messages, prefix: messages_prefix(&id) });
            ops.push(StoreOp::Delete { table: Table::Wills, key: client_key(&id) });
        }
        for id in std::mem::take(&mut self.journal.sessions) {
            match self.session_record(now, &id) {
                Some(record) => {
                    ops.push(StoreOp::Put { table: Table::Sessions, key: client_key(&id), value: record.encode() })
                }
                None => {
                    // Not kept any more: its pending messages go with it, not after it.
                    for waiter in self.journal.messages.forget(&id) {
                        self.journal.settle(waiter, seq);
                    }
                    ops.push(StoreOp::Delete { table: Table::Sessions, key: client_key(&id) });
                    ops.push(StoreOp::DeletePrefix { table: Table::Messages, prefix: messages_prefix(&id) });
                }
            }
        }
        // New QoS 1 messages within their commit delay wait for the next batch (their
        // subscribers may acknowledge them first).
        for waiter in self.journal.messages.drain_into(now, &mut ops, defer) {
            self.journal.settle(waiter, seq);
        }
        self.journal.oldest = self.journal.messages.oldest_young();
        for (topic, change) in std::mem::take(&mut self.journal.retained) {
            let key = topic.into_bytes();
            ops.push(match change {
                Some((at, publish)) => {
                    let record = TimedMessage { time: now.saturating_duration_since(at), publish };
                    StoreOp::Put { table: Table::Retained, key, value: record.encode() }
                }
                None => StoreOp::Delete { table: Table::Retained, key },
            });
        }
        for (id, change) in std::mem::take(&mut self.journal.wills) {
            let key = client_key(&id);
            ops.push(match change {
                Some((at, publish)) => {
                    let record = TimedMessage { time: at.saturating_duration_since(now), publish };
                    StoreOp::Put { table: Table::Wills, key, value: record.encode() }
                }
                None => StoreOp::Delete { table: Table::Wills, key },
            });
        }
        Some(StoreBatch { seq, ops })
    }

    /// The adapter stored every batch up to `seq` (see [`Broker::poll_store`]): output held
    /// for it goes out.
    pub fn handle_stored(&mut self, now: Instant, seq: u64) {
        self.tick(now);
        self.journal.stored(seq);
        self.pump(now);
    }

    /// Sends the output whose tickets are satisfied, finishing connections that ended. Returns
    /// whether anything was released.
    pub(super) fn release_held(&mut self, now: Instant) -> bool {
        let released = self.journal.release();
        let any = !released.is_empty();
        for (peer, out, finish) in released {
            for out in out {
                match out {
                    Out::Data(lane, bytes) => self.send_on(now, peer, lane, bytes),
                    Out::FinishLane(lane) => self.finish_lane_now(now, peer, lane),
                }
            }
            if finish {
                self.links.finish(now, peer);
            }
        }
        any
    }

    /// A session's record as it stands, if it is kept across a restart (its expiry is not 0).
    fn session_record(&self, now: Instant, id: &str) -> Option<SessionRecord> {
        let record = self.registry.get(id).filter(|r| r.expiry > 0)?;
        let live = record.conn.and_then(|c| self.conns.get(&c));
        let qos2 = match (live, self.registry.kept(id)) {
            (Some(live), _) => live.session.qos2_ids(),
            (None, Some(state)) => state.qos2_ids(),
            (None, None) => Vec::new(),
        };
        let subscriptions = self
            .router
            .filters(record.key)
            .iter()
            .filter_map(|f| self.router.entry(record.key, f).map(|e| (f.clone(), e)))
            .collect();
        Some(SessionRecord {
            owner: record.owner.clone(),
            expiry: record.expiry,
            expires_in: record.expires_at().map(|at| at.saturating_duration_since(now)),
            subscriptions,
            qos2,
        })
    }

    /// Hands bytes for one of a connection's streams on, or holds them behind its ticket.
    pub(super) fn emit_on(&mut self, now: Instant, conn: Peer, lane: Lane, bytes: Bytes) {
        let ticket = self.conns.get(&conn).map_or(0, |l| l.gate);
        if let Some(Out::Data(lane, bytes)) = self.journal.hold(conn, ticket, Out::Data(lane, bytes)) {
            self.send_on(now, conn, lane, bytes);
        }
    }

    /// Finishes a data stream after the output that came before, now or once it is released.
    pub(super) fn finish_lane(&mut self, now: Instant, conn: Peer, lane: Lane) {
        let ticket = self.conns.get(&conn).map_or(0, |l| l.gate);
        if self.journal.hold(conn, ticket, Out::FinishLane(lane)).is_some() {
            self.finish_lane_now(now, conn, lane);
        }
    }

    /// Journals what changed in a live session's durable state; a QoS 2 message put in flight
    /// to it holds its output (the client must not see a QoS 2 message the broker could lose
    /// and then route again under another identifier), as does one released (the PUBREL must
    /// not go out before the store knows it: the client answers PUBCOMP and frees the
    /// identifier, and a broker restarted from a store that still has the message unreleased
    /// would send the PUBLISH again, which the client takes for a new message [MQTT-4.3.3-6]),
    /// and a change to the client's QoS 2 receive state (PUBREC, PUBCOMP).
    pub(super) fn journal_live(&mut self, conn: Peer) {
        if !self.journal.is_on() {
            return;
        }
        let Some(live) = self.conns.get_mut(&conn) else { return };
        let Some(id) = live.client.clone() else { return };
        if !live.session.is_journaled() {
            return;
        }
        let (changes, inbound) = live.session.take_changes();
        let qos2 = changes
            .iter()
            .any(|c| matches!(c, Change::Put(k) if k.packet_id.is_some() && k.publish.qos() == QoS::ExactlyOnce));
        if inbound {
            self.journal.session(&id);
        }
        // Recorded before the ticket is made, so that it is for the batch that carries them.
        self.journal.messages(&id, changes);
        if qos2 || inbound {
            if let Some(live) = self.conns.get_mut(&conn) {
                if let Some(ticket) = self.journal.batch_ticket(live.gate) {
                    live.gate = self.journal.regate(conn, live.gate, ticket);
                }
            }
        }
    }

    /// The session record of the client on `conn` is to be written again (its subscriptions
    /// or expiry changed).
    pub(super) fn journal_client(&mut self, conn: Peer) {
        // Only sessions kept across restarts are journaled (the flag is set at CONNECT).
        let live = self.conns.get(&conn).filter(|l| l.session.is_journaled());
        if let Some(id) = live.and_then(|l| l.client.as_deref()) {
            self.journal.session(id);
        }
    }

    /// A retained message was set (an empty payload clears it). `$SYS` statistics are made
    /// anew by every broker run and are not stored.
    pub(super) fn journal_retained(&mut self, now: Instant, publish: &Publish) {
        let topic = publish.topic.as_str();
        if !topic.starts_with("$SYS/") {
            let set = (!publish.payload.is_empty()).then_some(publish);
            self.journal.retained(now, topic, set);
        }
    }

    /// A connection's session now belongs to client `id`: with persistence on and a session
    /// kept across restarts, its changes are recorded from here on (everything it holds
    /// already is written once).
    pub(super) fn journal_attach(&mut self, conn: Peer, id: &str, persistent: bool, removed: bool) {
        if !self.journal.is_on() {
            return;
        }
        let Some(live) = self.conns.get_mut(&conn) else { return };
        let was = live.session.is_journaled();
        live.session.journal(persistent);
        if persistent && !was {
            let all = live.session.kept_messages().into_iter().map(Change::Put).collect();
            self.journal.messages(id, all);
        }
        if persistent {
            self.journal.session(id);
        } else if was {
            // No longer kept across restarts: its record and messages go (including messages
            // journaled but not written yet, which would otherwise come back at a restart).
            self.journal.delete_session(id);
        }
        // CONNACK (session present or not) and what a resumed session resends wait for the
        // session's record, or its removal, to be stored: also when the CONNECT was admitted
        // outside the handling of its packets (after a password check).
        if persistent || was || removed {
            if let Some(live) = self.conns.get_mut(&conn) {
                if let Some(ticket) = self.journal.batch_ticket(live.gate) {
                    live.gate = self.journal.regate(conn, live.gate, ticket);
                }
            }
        }
    }
}
