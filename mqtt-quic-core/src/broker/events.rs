//! What the broker tells the application embedding it: messages for its in-process
//! subscriptions and the lifecycle of clients (connected, refused, migrated, disconnected), for
//! logs and metrics. The events are queued as they happen and read with
//! [`Broker::poll_event`](super::machine::Broker::poll_event).

use super::links::Peer;
use super::local::LocalSubscription;
use super::machine::Broker;
use crate::session::server::EndReason;
use mqtt_proto::{Protocol, Publish, ReasonCode};
use std::net::SocketAddr;

/// What the broker reports to the application embedding it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BrokerEvent {
    /// A message matched an in-process subscription. Fires once per message and subscription.
    Message {
        /// The subscription it matched.
        subscription: LocalSubscription,
        /// The message (retained ones have `retain` set).
        publish: Publish,
    },
    /// A client's CONNECT was accepted. Fires once per connection. (For logs: which client,
    /// as whom, from where, over what.)
    ClientConnected {
        /// Its client id (the assigned one, if it sent none).
        client_id: String,
        /// The user name it gave.
        username: Option<String>,
        /// Its connection.
        peer: Peer,
        /// Where it connects from, when known.
        remote: Option<SocketAddr>,
        /// Its MQTT version.
        protocol: Protocol,
        /// Whether it resumed a kept session.
        session_present: bool,
    },
    /// A CONNECT was refused with `reason` (0x86 and 0x87: failed authentication). Fires once
    /// per connection.
    ClientRefused {
        /// The client id it sent.
        client_id: String,
        /// The user name it gave.
        username: Option<String>,
        /// Its connection.
        peer: Peer,
        /// Where it connects from, when known.
        remote: Option<SocketAddr>,
        /// Why.
        reason: ReasonCode,
    },
    /// A connected client's QUIC connection moved to a new address (NAT rebinding, another
    /// network) and the session went on. Fires once per change.
    ClientMigrated {
        /// Its client id.
        client_id: String,
        /// Its new address.
        remote: SocketAddr,
    },
    /// A connected client's connection ended. Fires once per connection that was connected.
    ClientDisconnected {
        /// Its client id.
        client_id: String,
        /// Its connection.
        peer: Peer,
        /// Why: its DISCONNECT, a keep-alive timeout, a protocol error with its code, a
        /// takeover (`Server(0x8E)`), the server shutting down, or the transport.
        reason: EndReason,
        /// For a transport that ended: how (the QUIC close reason, a slow consumer).
        detail: Option<String>,
        /// QoS 0 messages it lost on this connection because it read slower than they came.
        dropped: u64,
    },
    /// A bridge's upstream connection came up or went down (see [`crate::bridge`]).
    BridgeState {
        /// The bridge's name.
        name: String,
        /// Connected now.
        connected: bool,
        /// Where (connected), or why not (down).
        detail: String,
    },
}

impl Broker {
    /// The lifecycle event for a session that ended: a refusal (it had sent CONNECT) or a
    /// disconnection (it was connected).
    pub(super) fn report_end(&mut self, conn: Peer, reason: EndReason) {
        let remote = self.links.remote_addr(conn);
        let Some(live) = self.conns.get_mut(&conn) else { return };
        let event = match (&reason, live.client.clone(), live.hello.take()) {
            (EndReason::Refused(code), _, Some((client_id, username, remote))) => {
                BrokerEvent::ClientRefused { client_id, username, peer: conn, remote, reason: *code }
            }
            // Refused by the session itself, before the broker saw the CONNECT (an identifier
            // too long, a will it cannot honour): who it was is not known.
            (EndReason::Refused(code), _, None) => BrokerEvent::ClientRefused {
                client_id: String::new(),
                username: None,
                peer: conn,
                remote,
                reason: *code,
            },
            (_, Some(client_id), _) => {
                let detail = (reason == EndReason::TransportLost).then(|| live.detail.take()).flatten();
                BrokerEvent::ClientDisconnected { client_id, peer: conn, reason, detail, dropped: live.dropped }
            }
            _ => return,
        };
        self.events.push_back(event);
    }

    /// The next event for the embedding application.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<BrokerEvent> {
        self.events.pop_front()
    }
}
