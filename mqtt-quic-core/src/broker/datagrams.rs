//! QoS 0 messages in QUIC datagrams (RFC 9221), both ways, where the broker's configuration
//! enables them (`TransportSettings::datagrams`; the transport parameter is offered only then).
//!
//! In: a datagram carries one whole QoS 0 PUBLISH, handled like one on the control stream
//! (rights, topic rules, routing). Anything else in a datagram is dropped and counted; it ends
//! nothing, since datagrams may be lost anyway.
//!
//! Out: a client that negotiated datagrams gets its QoS 0 messages as datagrams only if it
//! asked for them, with the CONNECT user property [`DATAGRAM_PROPERTY`] set to `qos0` (a client
//! may accept the transport parameter and never read datagrams, as some do). A message larger
//! than a datagram can carry now goes on the stream; one the full send buffer cannot take is
//! dropped and counted, as a QoS 0 message for a client that does not keep up is.

use super::machine::{Broker, Peer};
use crate::quic::DatagramError;
use bytes::Bytes;
use mqtt_proto::{Connect, Publish};
use std::time::Instant;

/// The CONNECT user property with which a client asks for its QoS 0 messages as QUIC datagrams
/// (value `qos0`).
pub const DATAGRAM_PROPERTY: &str = "quic-datagrams";

/// Whether a CONNECT asks for QoS 0 messages as datagrams.
pub(super) fn asks_for_datagrams(connect: &Connect) -> bool {
    connect.properties.user_properties.iter().any(|(k, v)| k.as_str() == DATAGRAM_PROPERTY && v.as_str() == "qos0")
}

impl Broker {
    /// A QUIC datagram from a client.
    pub(super) fn datagram_received(&mut self, now: Instant, peer: Peer, data: Bytes) {
        self.stats.datagrams_received += 1;
        self.stats.bytes_received += data.len() as u64;
        let accepted = self.conns.get_mut(&peer).is_some_and(|l| l.session.handle_datagram(now, data));
        if accepted {
            self.dirty.insert(peer);
        } else {
            self.stats.datagrams_dropped += 1;
        }
    }

    /// Sends a QoS 0 message to a client as a datagram when it asked for that and the message
    /// fits one. Returns the message back when it must go on the stream instead; `None` when
    /// it was sent or dropped (a full send buffer).
    pub(super) fn try_datagram(&mut self, now: Instant, peer: Peer, publish: Publish) -> Option<Publish> {
        let Peer::Quic(conn) = peer else { return Some(publish) };
        let Some(live) = self.conns.get(&peer).filter(|l| l.datagrams) else { return Some(publish) };
        let Some(max) = self.links.quic.max_datagram_size(conn) else { return Some(publish) };
        let Some(bytes) = live.session.encode_datagram(&publish).filter(|b| b.len() <= max) else {
            return Some(publish);
        };
        let len = bytes.len();
        match self.links.quic.send_datagram(now, conn, bytes) {
            Ok(()) => {
                self.stats.datagrams_sent += 1;
                self.stats.messages_sent += 1;
                self.stats.bytes_sent += len as u64;
                None
            }
            Err(DatagramError::Full) => {
                self.stats.datagrams_dropped += 1;
                self.stats.messages_dropped += 1;
                None
            }
            Err(_) => Some(publish),
        }
    }
}
