//! What a bare QUIC endpoint (a [`crate::node::Node::Quic`] host) received, decoded as MQTT 5
//! packets stream by stream, for tests that speak MQTT over QUIC packet by packet.

use bytes::{Bytes, BytesMut};
use mqtt_proto::{Decoder, Packet, Protocol};
use mqtt_quic_core::quic::{self, CloseReason, ConnId, Lane, LaneEnd};
use std::collections::BTreeMap;

/// The packets and stream ends a bare endpoint has seen so far.
#[derive(Default)]
pub struct Tap {
    decoders: BTreeMap<Lane, (Decoder, BytesMut)>,
    /// Packets received, with their stream (`None`: a datagram).
    pub got: Vec<(Option<Lane>, Packet)>,
    /// Data streams the peer ended, and how.
    pub ended: Vec<(Lane, LaneEnd)>,
    /// Why the connection closed, once it has.
    pub closed: Option<CloseReason>,
    /// The handshake completed.
    pub connected: bool,
    /// The connection the last control-stream bytes came on (what a bare server answers on).
    pub conn: Option<ConnId>,
}

impl Tap {
    /// Takes the endpoint's events (drained from its host).
    pub fn take(&mut self, events: Vec<quic::Event>) {
        for e in events {
            let (lane, data) = match e {
                quic::Event::Received { conn, data } => {
                    self.conn = Some(conn);
                    (Lane::CONTROL, data)
                }
                quic::Event::LaneReceived { lane, data, .. } => (lane, data),
                quic::Event::LaneEnded { lane, reason, .. } => {
                    self.ended.push((lane, reason));
                    continue;
                }
                quic::Event::DatagramReceived { data, .. } => {
                    let mut buf = BytesMut::from(&data[..]);
                    self.got.push((None, Decoder::new(Protocol::V5).decode(&mut buf).unwrap().unwrap()));
                    continue;
                }
                quic::Event::Closed { reason, .. } => {
                    self.closed = Some(reason);
                    continue;
                }
                quic::Event::Connected { .. } => {
                    self.connected = true;
                    continue;
                }
                _ => continue,
            };
            let (decoder, buf) =
                self.decoders.entry(lane).or_insert_with(|| (Decoder::new(Protocol::V5), BytesMut::new()));
            buf.extend_from_slice(&data);
            while let Some(p) = decoder.decode(buf).unwrap() {
                self.got.push((Some(lane), p));
            }
        }
    }

    /// Whether the peer ended this data stream.
    pub fn ended(&self, lane: Lane) -> bool {
        self.ended.iter().any(|(l, _)| *l == lane)
    }
}

/// A packet encoded as MQTT 5.
pub fn encode(packet: &Packet) -> Bytes {
    let mut out = BytesMut::new();
    packet.encode(Protocol::V5, &mut out).unwrap();
    out.freeze()
}
