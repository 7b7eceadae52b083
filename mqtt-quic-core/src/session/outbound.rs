//! The outbound QoS window: our QoS 1 and 2 PUBLISHes from the moment they are queued until the
//! peer has acknowledged them, for either role.
//!
//! Three rules live here and nowhere else:
//! - at most `limit` (the peer's Receive Maximum, capped by ours) are unacknowledged at once
//!   [MQTT-4.9.0-2];
//! - after a reconnect, what the peer had not acknowledged goes out again first, in its original
//!   order, as PUBLISH with DUP or as PUBREL, still within the limit, before anything queued
//!   [MQTT-4.4.0-1]; a queued message never takes an identifier still in flight [MQTT-2.2.1-4];
//! - a packet identifier is free again only once its exchange has completed.
//!
//! The window does no I/O and raises no events: [`Outbound::next_step`] says what to write or
//! what to report next, and the role (client or server session) writes it its own way (topic
//! aliases, size limits) and reports it in its own vocabulary.

use super::packet_id::PacketIds;
use mqtt_proto::{Ack, Packet, PacketId, Publish, QoS, QosPid, ReasonCode};
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// One of our messages in flight.
#[derive(Debug, Clone)]
struct InFlight {
    packet_id: PacketId,
    /// QoS 2: PUBREC came and PUBREL was sent; PUBCOMP completes it.
    released: bool,
    /// The caller's id for the message (what completion reports).
    id: u64,
    /// The message as first sent (its topic, never an alias: aliases belong to one connection).
    publish: Publish,
}

impl InFlight {
    fn kept(&self) -> Kept {
        Kept {
            id: self.id,
            publish: self.publish.clone(),
            packet_id: Some(self.packet_id),
            released: self.released,
            at: None,
        }
    }
}

/// One of our messages waiting for a slot in the window.
#[derive(Debug, Clone)]
struct Queued {
    id: u64,
    publish: Publish,
    /// When it was queued: message expiry counts down from here.
    at: Instant,
}

impl Queued {
    fn kept(&self) -> Kept {
        Kept { id: self.id, publish: self.publish.clone(), packet_id: None, released: false, at: Some(self.at) }
    }
}

/// What the window wants done next (see [`Outbound::next_step`]).
#[derive(Debug)]
pub(crate) enum Step {
    /// Write this PUBLISH (new, or again with DUP).
    Publish(Publish),
    /// Write PUBREL for this identifier (again, after a reconnect).
    Release(PacketId),
    /// The message with this id was dropped unsent, for this reason (the peer's limits rule it
    /// out); it is complete.
    Dropped {
        /// The caller's id.
        id: u64,
        /// Why.
        reason: ReasonCode,
    },
}

/// What a PUBREC meant (see [`Outbound::on_pubrec`]).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PubRec {
    /// Accepted: send PUBREL (the message now waits for PUBCOMP).
    Release,
    /// Refused with an error code: the message with this id is complete.
    Completed(u64),
    /// No QoS 2 message of ours has this identifier: answer PUBREL 0x92.
    Unknown,
}

/// Our QoS 1 and 2 messages: queued, in flight, and the packet identifiers they hold.
#[derive(Debug, Clone, Default)]
pub(crate) struct Outbound {
    ids: PacketIds,
    /// Sent and unacknowledged, in the order they were first sent.
    inflight: Vec<InFlight>,
    /// How many of `inflight`, from the front, went out on the current connection: all of
    /// them, except after a reconnect while the limit holds some back.
    resent: usize,
    queued: VecDeque<Queued>,
    next_id: u64,
    /// Timed redelivery only (see [`Outbound::note_sent`]): per identifier in flight, when its
    /// PUBLISH or PUBREL last went out on this connection and how often it has been resent.
    resend: BTreeMap<u16, (Instant, u32)>,
    /// With persistence, every change to a kept message, for the broker's journal (see
    /// [`Outbound::journal`]); `None` when nobody stores this window.
    changes: Option<Vec<Change>>,
}

/// A change to one of our messages, for a store (see [`Outbound::journal`]).
#[derive(Debug, Clone)]
pub(crate) enum Change {
    /// A new message (never stored before).
    Add(Kept),
    /// The message as it now stands (sent, released, or queued again).
    Put(Kept),
    /// The message with this id is complete or dropped.
    Remove(u64),
}

/// One kept message as a store sees it.
#[derive(Debug, Clone)]
pub(crate) struct Kept {
    /// The window's id for it: unique within the session, increasing in queue order.
    pub(crate) id: u64,
    /// The message (with its identifier, when in flight).
    pub(crate) publish: Publish,
    /// In flight under this identifier, or still queued.
    pub(crate) packet_id: Option<PacketId>,
    /// QoS 2, PUBREC received: PUBREL is what is owed.
    pub(crate) released: bool,
    /// When it was queued, while it waits (message expiry counts down from here); `None` once
    /// sent.
    pub(crate) at: Option<Instant>,
}

impl Outbound {
    /// Starts (or stops) recording every change to the kept messages, for a store; the changes
    /// are taken with [`Outbound::take_changes`]. Turning it on while it is on keeps what was
    /// recorded: a resumed session puts its queued messages in flight (new identifiers) before
    /// the broker confirms it is journaled, and those changes must reach the store (found by
    /// tests/persistence_sim.rs: they were dropped here, so the store kept a QoS 2 message as
    /// queued that the client had been sent under an identifier, and after a crash the broker
    /// sent it again under another, a duplicate).
    pub(crate) fn journal(&mut self, on: bool) {
        if !on {
            self.changes = None;
        } else if self.changes.is_none() {
            self.changes = Some(Vec::new());
        }
    }

    /// Whether changes are recorded.
    pub(crate) fn is_journaled(&self) -> bool {
        self.changes.is_some()
    }

    /// The changes recorded since the last call.
    pub(crate) fn take_changes(&mut self) -> Vec<Change> {
        self.changes.as_mut().map(std::mem::take).unwrap_or_default()
    }

    fn note(&mut self, change: impl FnOnce() -> Change) {
        if let Some(changes) = &mut self.changes {
            changes.push(change());
        }
    }

    /// Every kept message as a store sees it, in flight first (in sending order), then queued.
    pub(crate) fn kept(&self) -> impl Iterator<Item = Kept> + '_ {
        let inflight = self.inflight.iter().map(InFlight::kept);
        inflight.chain(self.queued.iter().map(Queued::kept))
    }

    /// Puts back one message read from a store (its expiry interval already reduced by the
    /// time it spent on disk), in the order they are stored (by id): in flight under its
    /// identifier, or queued as of `now`. Call [`Outbound::resume`] after the last.
    pub(crate) fn restore(&mut self, now: Instant, kept: Kept) {
        self.next_id = self.next_id.max(kept.id);
        let Kept { id, publish, packet_id, released, .. } = kept;
        match packet_id {
            Some(packet_id) if !self.inflight.iter().any(|e| e.packet_id == packet_id) => {
                self.inflight.push(InFlight { packet_id, released, id, publish })
            }
            _ => self.queued.push_back(Queued { id, publish, at: now }),
        }
    }

    /// A fresh id for a message (for a role that has no request ids of its own).
    pub(crate) fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Messages in flight plus those waiting.
    pub(crate) fn pending(&self) -> usize {
        self.inflight.len() + self.queued.len()
    }

    /// Messages waiting for a slot.
    pub(crate) fn queued(&self) -> usize {
        self.queued.len()
    }

    /// Queues a message under the caller's `id`; it goes out from [`Outbound::next_step`].
    pub(crate) fn push(&mut self, id: u64, publish: Publish, now: Instant) {
        let queued = Queued { id, publish, at: now };
        self.note(|| Change::Add(queued.kept()));
        self.queued.push_back(queued);
    }

    /// A packet identifier for something other than a PUBLISH (a client's SUBSCRIBE), from the
    /// same space, so it never collides with a message in flight.
    pub(crate) fn allocate_id(&mut self) -> Option<PacketId> {
        self.ids.allocate()
    }

    /// Frees an identifier from [`Outbound::allocate_id`].
    pub(crate) fn release_id(&mut self, id: PacketId) {
        self.ids.release(id);
    }

    /// The next thing to write or report, or `None` when the window is full or nothing waits.
    /// `limit` is the most unacknowledged at once; `refuse` says why the peer may not be sent a
    /// message (checked on resends and new sends); with `expire`, message expiry counts down
    /// while queued [MQTT-3.3.2-5] [MQTT-3.3.2-6]: an expired message is dropped silently, a
    /// live one goes out with what is left of its interval.
    #[inline(always)]
    pub(crate) fn next_step(
        &mut self,
        now: Instant,
        limit: usize,
        expire: bool,
        refuse: impl Fn(&Publish) -> Option<ReasonCode>,
    ) -> Option<Step> {
        // What is owed from before a reconnect goes first.
        if self.resent < self.inflight.len() {
            if self.resent >= limit {
                return None;
            }
            let entry = &self.inflight[self.resent];
            let step = if entry.released {
                Step::Release(entry.packet_id)
            } else if let Some(reason) = refuse(&entry.publish) {
                let id = self.remove(self.resent);
                return Some(Step::Dropped { id, reason });
            } else {
                let mut p = entry.publish.clone();
                p.dup = true;
                Step::Publish(p)
            };
            self.resent += 1;
            return Some(step);
        }
        while self.inflight.len() < limit {
            let Queued { id, mut publish, at } = self.queued.pop_front()?;
            if let Some(reason) = refuse(&publish) {
                self.note(|| Change::Remove(id));
                return Some(Step::Dropped { id, reason });
            }
            if let (true, Some(secs)) = (expire, publish.properties.message_expiry_interval) {
                let waited = now.saturating_duration_since(at).as_secs();
                match u64::from(secs).checked_sub(waited).filter(|left| *left > 0) {
                    Some(left) => publish.properties.message_expiry_interval = Some(left as u32),
                    None => {
                        self.note(|| Change::Remove(id));
                        continue;
                    }
                }
            }
            let Some(packet_id) = self.ids.allocate() else {
                self.queued.push_front(Queued { id, publish, at });
                return None;
            };
            publish.qos_pid = QosPid::from_parts(publish.qos(), packet_id);
            let entry = InFlight { packet_id, released: false, id, publish: publish.clone() };
            self.note(|| Change::Put(entry.kept()));
            self.inflight.push(entry);
            self.resent = self.inflight.len();
            return Some(Step::Publish(publish));
        }
        None
    }

    fn position(&self, packet_id: PacketId, qos: QoS, released: bool) -> Option<usize> {
        self.inflight.iter().position(|e| e.packet_id == packet_id && e.released == released && e.publish.qos() == qos)
    }

    fn remove(&mut self, index: usize) -> u64 {
        let entry = self.inflight.remove(index);
        self.note(|| Change::Remove(entry.id));
        if index < self.resent {
            self.resent -= 1;
        }
        self.ids.release(entry.packet_id);
        self.resend.remove(&entry.packet_id.get());
        entry.id
    }

    /// PUBACK (QoS 1, `released` false) or PUBCOMP (QoS 2, `released` true) for this
    /// identifier: the id of the message it completes, if it completes one.
    pub(crate) fn complete(&mut self, packet_id: PacketId, qos: QoS, released: bool) -> Option<u64> {
        let i = self.position(packet_id, qos, released)?;
        Some(self.remove(i))
    }

    /// PUBREC for this identifier; `refused` when its reason code is an error.
    pub(crate) fn on_pubrec(&mut self, packet_id: PacketId, refused: bool) -> PubRec {
        let Some(i) = self.position(packet_id, QoS::ExactlyOnce, false) else { return PubRec::Unknown };
        if refused {
            return PubRec::Completed(self.remove(i));
        }
        self.inflight[i].released = true;
        let entry = self.inflight[i].kept();
        self.note(|| Change::Put(entry));
        PubRec::Release
    }

    /// A reconnect resumed the session: everything in flight goes out again from the start.
    pub(crate) fn resend_all(&mut self) {
        self.resent = 0;
    }

    /// Drops the PUBLISHes in flight (not yet released) that `refuse` rules out, reporting each
    /// with its reason: a peer that came back with tighter limits cannot be sent them.
    pub(crate) fn drop_refused(
        &mut self,
        refuse: impl Fn(&Publish) -> Option<ReasonCode>,
        mut dropped: impl FnMut(u64, ReasonCode),
    ) {
        let mut i = 0;
        while i < self.inflight.len() {
            let entry = &self.inflight[i];
            match (entry.released, refuse(&entry.publish)) {
                (false, Some(reason)) => dropped(self.remove(i), reason),
                _ => i += 1,
            }
        }
    }

    /// The peer lost the session: what was in flight goes out again as new messages, ahead of
    /// the queue, with new identifiers.
    pub(crate) fn requeue_inflight(&mut self, now: Instant) {
        for entry in std::mem::take(&mut self.inflight).into_iter().rev() {
            self.ids.release(entry.packet_id);
            let queued = Queued { id: entry.id, publish: entry.publish, at: now };
            self.note(|| Change::Put(queued.kept()));
            self.queued.push_front(queued);
        }
        self.resent = 0;
    }

    /// Carried to a new connection of the same session (a broker resuming it): identifiers are
    /// numbered afresh around those still in flight, everything in flight is resent first, and
    /// no timed resend carries over.
    pub(crate) fn resume(&mut self) {
        self.ids = PacketIds::default();
        for entry in &self.inflight {
            self.ids.mark(entry.packet_id);
        }
        self.resend.clear();
        self.resent = 0;
    }

    /// For timed redelivery (see [`Outbound::due_resends`]): the PUBLISH or PUBREL of the
    /// message with this identifier just went out. Roles that never resend on a live
    /// connection do not call it, and pay nothing for the feature.
    pub(crate) fn note_sent(&mut self, now: Instant, packet_id: PacketId) {
        let resends = self.resend.get(&packet_id.get()).map_or(0, |r| r.1);
        self.resend.insert(packet_id.get(), (now, resends));
    }

    /// When the earliest timed resend is due (see [`Outbound::due_resends`]).
    pub(crate) fn next_resend(&self, interval: Duration) -> Option<Instant> {
        self.resend.values().map(|(at, _)| *at + interval).min()
    }

    /// Timed redelivery (an MQTT 3.1.1 option; MQTT 5 forbids it [MQTT-4.4.0-1]): what has waited
    /// `interval` for its answer is sent again (PUBLISH with DUP, or PUBREL) into `send`. Returns
    /// false, after sending what came before it, when a message has used `max_resends`: the
    /// connection is to be given up.
    pub(crate) fn due_resends(
        &mut self,
        now: Instant,
        interval: Duration,
        max_resends: u32,
        mut send: impl FnMut(Packet),
    ) -> bool {
        let due: Vec<u16> =
            self.resend.iter().filter(|(_, (at, _))| *at + interval <= now).map(|(id, _)| *id).collect();
        for id in due {
            let Some(entry) = self.resend.get_mut(&id) else { continue };
            if entry.1 >= max_resends {
                return false;
            }
            *entry = (now, entry.1 + 1);
            let packet = self.inflight.iter().find(|e| e.packet_id.get() == id).map(|e| {
                if e.released {
                    Packet::PubRel(Ack::new(e.packet_id))
                } else {
                    let mut p = e.publish.clone();
                    p.dup = true;
                    Packet::Publish(p)
                }
            });
            match packet {
                Some(packet) => send(packet),
                None => drop(self.resend.remove(&id)),
            }
        }
        true
    }

    /// Drops the messages `keep` refuses: queued ones, and QoS 1 ones sent and not acknowledged
    /// (a QoS 2 message once sent stays whatever: the peer may hold its identifier in its
    /// receive state, and would take a new message under it for a duplicate). Returns how many.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&Publish) -> bool) -> usize {
        let before = self.pending();
        let mut i = 0;
        while i < self.inflight.len() {
            let e = &self.inflight[i];
            if e.released || e.publish.qos() == QoS::ExactlyOnce || keep(&e.publish) {
                i += 1;
            } else {
                // Through `remove`, so the identifier is free and the resend cursor stays right.
                self.remove(i);
            }
        }
        let changes = &mut self.changes;
        self.queued.retain(|q| {
            let kept = keep(&q.publish);
            if let (false, Some(changes)) = (kept, changes.as_mut()) {
                changes.push(Change::Remove(q.id));
            }
            kept
        });
        before - self.pending()
    }

    /// Takes out the messages with these ids for delivery elsewhere: queued ones, and QoS 1
    /// ones already sent (a QoS 2 message once sent completes with this peer, never another
    /// [MQTT-4.8.2-4] [MQTT-4.8.2-5]). Their identifiers are freed.
    pub(crate) fn take(&mut self, ids: &[u64]) -> Vec<Publish> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.inflight.len() {
            let e = &self.inflight[i];
            if ids.contains(&e.id) && e.publish.qos() != QoS::ExactlyOnce {
                out.push(e.publish.clone());
                self.remove(i);
            } else {
                i += 1;
            }
        }
        let changes = &mut self.changes;
        self.queued.retain(|q| {
            let take = ids.contains(&q.id);
            if take {
                out.push(q.publish.clone());
                if let Some(changes) = changes.as_mut() {
                    changes.push(Change::Remove(q.id));
                }
            }
            !take
        });
        out
    }

    /// Takes out the messages `drop` picks, in flight (`true`) or queued (`false`), freeing
    /// their identifiers, and returns their ids: what a client's data stream gives up when the
    /// stream ends (its QoS 2 exchanges died with it) or is closed (everything).
    pub(crate) fn abandon(&mut self, mut drop: impl FnMut(&Publish, bool) -> bool) -> Vec<u64> {
        let mut ids = Vec::new();
        let mut i = 0;
        while i < self.inflight.len() {
            if drop(&self.inflight[i].publish, true) {
                ids.push(self.remove(i));
            } else {
                i += 1;
            }
        }
        let changes = &mut self.changes;
        self.queued.retain(|q| {
            let gone = drop(&q.publish, false);
            if gone {
                ids.push(q.id);
                if let Some(changes) = changes.as_mut() {
                    changes.push(Change::Remove(q.id));
                }
            }
            !gone
        });
        ids
    }

    /// Every kept message.
    pub(crate) fn messages(&self) -> impl Iterator<Item = &Publish> {
        self.inflight.iter().map(|e| &e.publish).chain(self.queued.iter().map(|q| &q.publish))
    }

    /// Makes every kept message own its bytes (see [`Publish::detached`]).
    pub(crate) fn detach(&mut self) {
        for e in &mut self.inflight {
            e.publish = e.publish.detached();
        }
        for q in &mut self.queued {
            q.publish = q.publish.detached();
        }
    }
}
