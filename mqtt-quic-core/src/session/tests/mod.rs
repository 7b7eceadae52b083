//! Tests of both session roles, driven through one harness: a session under test and a scripted
//! peer that decodes what the session writes as the other side would.

use super::client::{ClientEvent, ClientSession};
use super::server::{ServerEvent, ServerSession};
use bytes::{Bytes, BytesMut};
use mqtt_proto::{Decoder, Packet, Protocol};
use std::time::{Duration, Instant};

mod client;
mod client_store;
mod client_store_broker;
mod server;

/// What the harness needs of a session: the polling contract both roles share.
pub(super) trait Role {
    type Event;
    fn handle_stream_data(&mut self, now: Instant, data: &[u8]);
    fn handle_timeout(&mut self, now: Instant);
    fn poll_transmit(&mut self) -> Option<Bytes>;
    fn poll_event(&mut self) -> Option<Self::Event>;
}

impl Role for ClientSession {
    type Event = ClientEvent;
    fn handle_stream_data(&mut self, now: Instant, data: &[u8]) {
        ClientSession::handle_stream_data(self, now, data)
    }
    fn handle_timeout(&mut self, now: Instant) {
        ClientSession::handle_timeout(self, now)
    }
    fn poll_transmit(&mut self) -> Option<Bytes> {
        ClientSession::poll_transmit(self)
    }
    fn poll_event(&mut self) -> Option<ClientEvent> {
        ClientSession::poll_event(self)
    }
}

impl Role for ServerSession {
    type Event = ServerEvent;
    fn handle_stream_data(&mut self, now: Instant, data: &[u8]) {
        ServerSession::handle_stream_data(self, now, data)
    }
    fn handle_timeout(&mut self, now: Instant) {
        ServerSession::handle_timeout(self, now)
    }
    fn poll_transmit(&mut self) -> Option<Bytes> {
        ServerSession::poll_transmit(self)
    }
    fn poll_event(&mut self) -> Option<ServerEvent> {
        ServerSession::poll_event(self)
    }
}

/// A session and its scripted peer.
pub(super) struct Harness<S> {
    pub(super) session: S,
    /// Decodes what the session writes.
    peer: Decoder,
    /// The protocol spoken (what `feed` encodes in).
    pub(super) protocol: Protocol,
    pub(super) now: Instant,
}

impl<S: Role> Harness<S> {
    /// A harness around the session `make` builds at the harness's start time.
    pub(super) fn with(protocol: Protocol, make: impl FnOnce(Instant) -> S) -> Harness<S> {
        #[allow(clippy::disallowed_methods)]
        let now = Instant::now();
        Harness { session: make(now), peer: Decoder::new(protocol), protocol, now }
    }

    /// Speak `protocol` from now on, both ways.
    pub(super) fn set_protocol(&mut self, protocol: Protocol) {
        self.protocol = protocol;
        self.peer.set_protocol(protocol);
    }

    /// The peer sends `packet`.
    pub(super) fn feed(&mut self, packet: Packet) {
        let mut b = BytesMut::new();
        packet.encode(self.protocol, &mut b).unwrap();
        self.session.handle_stream_data(self.now, &b);
    }

    /// What the session wrote, decoded (a CONNECT sets the protocol the peer decodes in).
    pub(super) fn sent(&mut self) -> Vec<Packet> {
        let mut buf = BytesMut::new();
        while let Some(b) = self.session.poll_transmit() {
            buf.extend_from_slice(&b);
        }
        let mut out = Vec::new();
        while let Some(p) = self.peer.decode(&mut buf).unwrap() {
            if let Packet::Connect(c) = &p {
                self.peer.set_protocol(c.protocol);
            }
            out.push(p);
        }
        out
    }

    pub(super) fn events(&mut self) -> Vec<S::Event> {
        std::iter::from_fn(|| self.session.poll_event()).collect()
    }

    pub(super) fn advance(&mut self, d: Duration) {
        self.now += d;
        self.session.handle_timeout(self.now);
    }
}
