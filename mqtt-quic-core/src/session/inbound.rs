//! The inbound QoS state: the peer's QoS 1 and 2 PUBLISHes from arrival until our side of the
//! exchange is done, for either role.
//!
//! Its rules: a QoS 2 message is delivered once however often the peer resends it, until PUBREL
//! frees its identifier [MQTT-4.3.3-9]; and no more than our Receive Maximum wait for our
//! acknowledgement at once, beyond which the peer broke the protocol (0x93) [MQTT-3.3.4-9].

use std::collections::BTreeSet;

/// What an arriving QoS 1 or 2 PUBLISH is (see [`Inbound::qos1`], [`Inbound::qos2`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// A new message: deliver it, and acknowledge it.
    New,
    /// A QoS 2 message already taken: acknowledge it again (PUBREC), do not deliver it again.
    Duplicate,
    /// Beyond the Receive Maximum: a protocol violation (0x93).
    OverLimit,
}

/// The identifiers of the peer's messages we have not finished with.
#[derive(Debug, Clone, Default)]
pub(crate) struct Inbound {
    /// QoS 1 messages handed on and not yet acknowledged (a role that acknowledges at once
    /// never has any).
    unacked_qos1: BTreeSet<u16>,
    /// QoS 2 messages acknowledged with PUBREC, waiting for PUBREL.
    qos2: BTreeSet<u16>,
    /// Whether `qos2` changed since [`Inbound::take_changed`] (a store keeps it).
    changed: bool,
}

impl Inbound {
    pub(crate) fn waiting(&self) -> usize {
        self.unacked_qos1.len() + self.qos2.len()
    }

    /// A QoS 1 PUBLISH that will be acknowledged later ([`Inbound::ack_qos1`]); `limit` is our
    /// Receive Maximum. The same identifier again before its PUBACK is simply a resend.
    pub(crate) fn qos1(&mut self, id: u16, limit: u16) -> Arrival {
        if self.waiting() >= usize::from(limit) && !self.unacked_qos1.contains(&id) {
            return Arrival::OverLimit;
        }
        self.unacked_qos1.insert(id);
        Arrival::New
    }

    /// Whether a QoS 1 message with this identifier waited for its PUBACK (which may now go).
    pub(crate) fn ack_qos1(&mut self, id: u16) -> bool {
        self.unacked_qos1.remove(&id)
    }

    /// A QoS 2 PUBLISH; `limit` is our Receive Maximum.
    pub(crate) fn qos2(&mut self, id: u16, limit: u16) -> Arrival {
        if self.qos2.contains(&id) {
            return Arrival::Duplicate;
        }
        if self.waiting() >= usize::from(limit) {
            return Arrival::OverLimit;
        }
        self.qos2.insert(id);
        self.changed = true;
        Arrival::New
    }

    /// PUBREL for this identifier, or a QoS 2 message refused with PUBREC: the exchange is
    /// over. False when no such message waited (PUBCOMP then says 0x92).
    pub(crate) fn release(&mut self, id: u16) -> bool {
        let released = self.qos2.remove(&id);
        self.changed |= released;
        released
    }

    /// Whether the QoS 2 identifiers awaiting PUBREL changed since the last call.
    pub(crate) fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// The QoS 2 identifiers awaiting PUBREL (what a store keeps).
    pub(crate) fn qos2_ids(&self) -> impl Iterator<Item = u16> + '_ {
        self.qos2.iter().copied()
    }

    /// Inbound state read back from a store: these QoS 2 identifiers await PUBREL.
    pub(crate) fn restored(ids: impl IntoIterator<Item = u16>) -> Inbound {
        Inbound { unacked_qos1: BTreeSet::new(), qos2: ids.into_iter().collect(), changed: false }
    }

    /// What outlives a connection: the QoS 2 messages awaiting PUBREL (unacknowledged QoS 1
    /// messages are the peer's to resend). Leaves this empty.
    pub(crate) fn take_kept(&mut self) -> Inbound {
        self.unacked_qos1.clear();
        let changed = std::mem::take(&mut self.changed);
        Inbound { unacked_qos1: BTreeSet::new(), qos2: std::mem::take(&mut self.qos2), changed }
    }

    /// Forgets everything (the peer has no session).
    pub(crate) fn clear(&mut self) {
        self.unacked_qos1.clear();
        self.changed |= !self.qos2.is_empty();
        self.qos2.clear();
    }
}
