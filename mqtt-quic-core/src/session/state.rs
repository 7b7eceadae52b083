//! What a broker keeps of a client's session between its connections: the window of messages
//! for the client (`outbound.rs`) and the client's QoS 2 messages awaiting PUBREL (`inbound.rs`).
//! The server session hands it over when a connection ends and takes it back when the client
//! returns; the broker meanwhile queues messages into it and applies its budgets.

use super::inbound::Inbound;
use super::outbound::{Change, Kept, Outbound};
use mqtt_proto::Publish;
use std::time::Instant;

/// What a broker keeps of a session between connections (when its expiry allows): the QoS 2
/// messages received but not yet released, and the messages for the client not yet
/// acknowledged. Take it with [`ServerSession::take_state`](super::server::ServerSession::take_state)
/// when a connection ends; hand it to
/// [`ServerSession::resume`](super::server::ServerSession::resume) when the client comes back.
#[derive(Debug, Clone, Default)]
pub struct SessionState {
    pub(crate) inbound: Inbound,
    pub(crate) outbound: Outbound,
}

impl SessionState {
    /// Messages for the client not yet acknowledged.
    pub fn pending(&self) -> usize {
        self.outbound.pending()
    }

    /// Drops the messages `keep` refuses: queued ones, and QoS 1 ones sent and not
    /// acknowledged. Returns how many were dropped. For a broker re-checking read rights when a
    /// session resumes, in case they changed while the client was away.
    pub fn retain_messages(&mut self, keep: impl FnMut(&Publish) -> bool) -> usize {
        self.outbound.retain(keep)
    }

    /// Takes out the messages with these request ids (as returned by `publish`) for delivery
    /// elsewhere: queued ones, and QoS 1 ones already sent; their packet identifiers are freed.
    pub fn take_requests(&mut self, ids: &[u64]) -> Vec<Publish> {
        self.outbound.take(ids)
    }

    /// Roughly the bytes the kept messages take (topics and payloads), for a broker's budget.
    pub fn bytes(&self) -> usize {
        self.outbound.messages().map(message_cost).sum()
    }

    /// Whether `max` messages wait already (see [`SessionState::enqueue`]).
    pub fn is_full(&self, max: usize) -> bool {
        self.pending() >= max
    }

    /// Makes every kept message own its bytes (see [`Publish::detached`]): messages routed to a
    /// live connection are slices of their publisher's receive buffer, which a session kept for
    /// days must not pin.
    pub fn detach_messages(&mut self) {
        self.outbound.detach();
    }

    /// Queues a message for a client that is offline; it goes out when the session resumes.
    /// Returns false (and drops the message) when `max` messages already wait.
    pub fn enqueue(&mut self, now: Instant, publish: Publish, max: usize) -> bool {
        if self.pending() >= max {
            return false;
        }
        let id = self.outbound.new_id();
        self.outbound.push(id, publish, now);
        true
    }
}

impl SessionState {
    /// A session read back from a store: the client's QoS 2 identifiers awaiting PUBREL, and
    /// our messages in stored (id) order, queued ones as of `now`. Changes are recorded.
    pub(crate) fn restored(now: Instant, qos2: Vec<u16>, messages: Vec<Kept>) -> SessionState {
        let mut outbound = Outbound::default();
        for kept in messages {
            outbound.restore(now, kept);
        }
        outbound.resume();
        outbound.journal(true);
        SessionState { inbound: Inbound::restored(qos2), outbound }
    }

    /// See [`ServerSession::take_changes`](super::server::ServerSession::take_changes).
    pub(crate) fn take_changes(&mut self) -> (Vec<Change>, bool) {
        (self.outbound.take_changes(), self.inbound.take_changed())
    }

    /// The client's QoS 2 identifiers awaiting PUBREL.
    pub(crate) fn qos2_ids(&self) -> Vec<u16> {
        self.inbound.qos2_ids().collect()
    }
}

/// What one kept message counts against a broker's byte budgets: its topic and payload, plus a
/// fixed allowance for the rest (properties are rare and small next to payloads).
pub fn message_cost(p: &Publish) -> usize {
    p.topic.as_str().len() + p.payload.len() + 64
}
