//! Data streams of EMQX's multi-stream mode, on the broker side.
//!
//! A QUIC client may open, besides its first (control) stream, more bidirectional streams that
//! carry PUBLISH through UNSUBACK. Each is a lane of the connection's one MQTT session: its own
//! server session (packet identifiers, in-flight window, QoS 2 state), sharing the connection's
//! client identity, rights and keep-alive. What it subscribes to belongs to it: deliveries for
//! those subscriptions travel on it, the same filter on two streams is two subscriptions, and
//! the subscriptions end with the stream.
//!
//! The rules, as EMQX has them:
//! - a data stream opened before CONNACK waits (its bytes buffered, at most one packet's worth)
//!   and is served once the CONNECT is accepted; one opened on a connection that is refused
//!   ends with it;
//! - an acknowledgement travels on the stream of the packet it acknowledges;
//! - a reset, a stop, a malformed packet or a control packet (CONNECT, DISCONNECT, AUTH) on a
//!   data stream ends that stream and its subscriptions only (the stream is reset with
//!   application error 1); the control stream's end ends the connection;
//! - a client that finishes (FIN) a data stream gets what is due on it, then our FIN: its
//!   subscriptions end there, since it can no longer acknowledge on it.
//!
//! Some clients (the `mqtt5` crate's) open their data streams one way, client to server: what
//! comes on such a stream is handled by the connection's session and answered on the control
//! stream (the client cannot read the stream it wrote). A subscription made on one still
//! belongs to that stream, like one made on a two-way stream: its deliveries travel on a
//! stream the broker opens back to the client for it (two-way, so the client acknowledges
//! QoS 1 and 2 deliveries there), and it ends with the one-way stream. Where the client allows
//! the broker no streams, such a subscription is the session's and delivered on the control
//! stream.
//!
//! Across a reconnect, stream subscriptions are not part of the session: they are not stored,
//! nothing is queued for them while the client is away, and a resumed session has only the
//! subscriptions made on its control stream. A client that reconnects subscribes again on its
//! new streams (EMQX's data streams die with their stream in the same way). QoS 1 and 2
//! messages in flight on a stream that ends are dropped with its subscription, as after an
//! UNSUBSCRIBE; those of a shared subscription go to another member of the group.

use super::machine::{Broker, Peer};
use super::router::{lane_key, SessionKey, LANE_SEQ_MAX};
use crate::quic::{close_code, Lane, LaneEnd};
use crate::session::server::{ServerEvent, ServerSession};
use bytes::{Bytes, BytesMut};
use mqtt_proto::{Decoder, Packet, PacketId};

/// SUBSCRIBEs and UNSUBSCRIBEs from one-way streams whose answers a connection remembers at once
/// (the session answers each at once, so more means a session that dropped some).
const MAX_ORIGINS: usize = 64;
use std::time::Instant;

/// One data stream of a live connection.
pub(super) struct LaneState {
    /// A two-way stream's session, once the connection's CONNECT is accepted.
    pub(super) session: Option<ServerSession>,
    /// A one-way stream's packet decoder, from then on (its packets are the control
    /// session's).
    inbound: Option<Decoder>,
    /// Bytes that arrived before CONNACK; on a one-way stream, those of a packet not yet
    /// complete.
    early: BytesMut,
    /// Its subscriber key (see `router::lane_key`), once it has a session.
    pub(super) key: SessionKey,
    /// The client finished its side: ours follows once what is due is out.
    finishing: bool,
    /// A one-way stream's way back: the stream the broker opened for the deliveries of the
    /// subscriptions made on it.
    back: Option<Lane>,
}

impl LaneState {
    /// Whether it waits for the connection's CONNACK.
    pub(super) fn is_waiting(&self) -> bool {
        self.session.is_none() && self.inbound.is_none()
    }
}

impl Broker {
    /// The client opened a data stream.
    pub(super) fn lane_opened(&mut self, now: Instant, peer: Peer, lane: Lane) {
        let live = self.live(now, peer);
        let state =
            LaneState { session: None, inbound: None, early: BytesMut::new(), key: 0, finishing: false, back: None };
        live.lanes.insert(lane, state);
        self.dirty.insert(peer);
    }

    /// Bytes arrived on a data stream.
    pub(super) fn lane_received(&mut self, now: Instant, peer: Peer, lane: Lane, data: &[u8]) {
        self.stats.bytes_received += data.len() as u64;
        let max = self.config.session.maximum_packet_size as usize;
        let Some(live) = self.conns.get_mut(&peer) else { return };
        let Some(state) = live.lanes.get_mut(&lane) else { return };
        match (&mut state.session, &mut state.inbound) {
            (Some(session), _) => {
                session.handle_stream_data(now, data);
                live.session.handle_activity(now);
            }
            (None, Some(_)) => {
                state.early.extend_from_slice(data);
                if !self.decode_one_way(now, peer, lane) {
                    return self.lane_failed(now, peer, lane);
                }
            }
            (None, None) if state.early.len() + data.len() <= max => state.early.extend_from_slice(data),
            // More than a packet before CONNACK: the client does not wait as it should.
            (None, None) => return self.lane_failed(now, peer, lane),
        }
        self.dirty.insert(peer);
    }

    /// Hands the whole packets buffered for a one-way stream to the control session. Returns
    /// false when the stream must end: bytes that do not decode, or a packet that does not
    /// belong on a data stream. (A packet's size is bounded by the decoder, so the buffer is.)
    fn decode_one_way(&mut self, now: Instant, peer: Peer, lane: Lane) -> bool {
        let Some(live) = self.conns.get_mut(&peer) else { return true };
        let Some(state) = live.lanes.get_mut(&lane) else { return true };
        let Some(decoder) = &mut state.inbound else { return true };
        loop {
            match decoder.decode(&mut state.early) {
                Ok(Some(packet)) => {
                    // Which stream a SUBSCRIBE or UNSUBSCRIBE came on, for the session's event.
                    match &packet {
                        Packet::Subscribe(s) => live.origins.push_back((s.packet_id, lane)),
                        Packet::Unsubscribe(u) => live.origins.push_back((u.packet_id, lane)),
                        _ => {}
                    }
                    if live.origins.len() > MAX_ORIGINS {
                        live.origins.pop_front();
                    }
                    if live.session.handle_stream_packet(now, packet).is_err() {
                        return false;
                    }
                }
                Ok(None) => return true,
                Err(_) => return false,
            }
        }
    }

    /// A data stream ended on the client's side.
    pub(super) fn lane_ended(&mut self, now: Instant, peer: Peer, lane: Lane, reason: LaneEnd) {
        match reason {
            LaneEnd::Finished => {
                let Some(state) = self.conns.get_mut(&peer).and_then(|l| l.lanes.get_mut(&lane)) else { return };
                state.finishing = true;
                self.dirty.insert(peer);
            }
            // Reset or stopped: QUIC has ended it both ways already.
            _ => self.drop_lane(now, peer, lane),
        }
    }

    /// Gives the data streams that waited for CONNACK their sessions, once it is sent.
    pub(super) fn activate_lanes(&mut self, now: Instant, peer: Peer) {
        let owner = self.conns.get(&peer).and_then(|l| l.client.as_ref()).and_then(|c| self.registry.get(c));
        let Some(owner) = owner.filter(|r| r.conn == Some(peer)).map(|r| r.key) else { return };
        let Some(live) = self.conns.get(&peer) else { return };
        let waiting = live.lanes.iter().filter(|(_, s)| s.is_waiting());
        let waiting: Vec<Lane> = waiting.map(|(l, _)| *l).collect();
        let max = self.config.session.maximum_packet_size;
        for lane in waiting {
            let Some(live) = self.conns.get_mut(&peer) else { return };
            if lane.is_unidirectional() {
                let protocol = live.session.protocol();
                if let Some(state) = live.lanes.get_mut(&lane) {
                    state.inbound = Some(Decoder::new(protocol).with_max_packet_size(max));
                }
                if !self.decode_one_way(now, peer, lane) {
                    self.lane_failed(now, peer, lane);
                }
                continue;
            }
            let Ok(mut session) = live.session.data_stream(now) else { return };
            if live.next_lane > LANE_SEQ_MAX {
                self.lane_failed(now, peer, lane);
                continue;
            }
            let key = lane_key(owner, live.next_lane);
            live.next_lane += 1;
            let Some(state) = live.lanes.get_mut(&lane) else { continue };
            let early = std::mem::take(&mut state.early);
            if !early.is_empty() {
                session.handle_stream_data(now, &early);
            }
            state.session = Some(session);
            state.key = key;
            self.lane_keys.insert(key, (peer, lane));
        }
    }

    /// The events of a connection's data streams, with the stream each came from.
    pub(super) fn lane_events(&mut self, peer: Peer) -> Vec<(Lane, SessionKey, ServerEvent)> {
        let Some(live) = self.conns.get_mut(&peer) else { return Vec::new() };
        let mut events = Vec::new();
        for (lane, state) in &mut live.lanes {
            if let Some(session) = &mut state.session {
                events.extend(std::iter::from_fn(|| session.poll_event()).map(|e| (*lane, state.key, e)));
            }
        }
        events
    }

    /// Sends what the data streams have to send, and ends those that are over: a session
    /// ended by a protocol error resets its stream; one the client finished gets our FIN after
    /// its last bytes.
    pub(super) fn lane_output(&mut self, now: Instant, peer: Peer) {
        let Some(live) = self.conns.get_mut(&peer) else { return };
        let mut out = Vec::new();
        let mut over = Vec::new();
        for (lane, state) in &mut live.lanes {
            let Some(session) = &mut state.session else {
                if state.finishing && state.inbound.is_some() {
                    // A one-way stream the client finished: nothing of ours is on it.
                    over.push((*lane, true));
                }
                continue;
            };
            out.extend(std::iter::from_fn(|| session.poll_transmit()).map(|b| (*lane, b)));
            if session.is_done() {
                over.push((*lane, true));
            } else if state.finishing {
                over.push((*lane, false));
            }
        }
        for (lane, bytes) in out {
            self.stats.bytes_sent += bytes.len() as u64;
            self.emit_on(now, peer, lane, bytes);
        }
        for (lane, failed) in over {
            if lane.is_unidirectional() {
                let back = self.conns.get(&peer).and_then(|l| l.lanes.get(&lane)).and_then(|s| s.back);
                if let Some(back) = back {
                    self.end_lane(now, peer, back);
                    self.finish_lane(now, peer, back);
                }
                self.drop_lane(now, peer, lane);
            } else if failed {
                self.lane_failed(now, peer, lane);
            } else {
                self.end_lane(now, peer, lane);
                self.finish_lane(now, peer, lane);
            }
        }
    }

    /// A data stream broke the protocol (or could not be served): reset it, end its
    /// subscriptions.
    fn lane_failed(&mut self, now: Instant, peer: Peer, lane: Lane) {
        if let Peer::Quic(conn) = peer {
            let _ = self.links.quic.reset_lane(now, conn, lane, close_code::STREAM_ERROR);
        }
        self.drop_lane(now, peer, lane);
    }

    /// Forgets a data stream: its subscriptions end, and what a shared subscription had
    /// handed it unacknowledged goes to another member.
    pub(super) fn drop_lane(&mut self, now: Instant, peer: Peer, lane: Lane) {
        self.end_lane(now, peer, lane);
        let Some(state) = self.conns.get_mut(&peer).and_then(|l| l.lanes.remove(&lane)) else { return };
        if let (Some(back), Peer::Quic(conn)) = (state.back, peer) {
            if self.conns.get(&peer).is_some_and(|l| l.lanes.contains_key(&back)) {
                let _ = self.links.quic.reset_lane(now, conn, back, close_code::STREAM_ERROR);
                self.drop_lane(now, peer, back);
            }
        }
    }

    /// Where a SUBSCRIBE or UNSUBSCRIBE the control session reports came from: the one-way
    /// stream it was read on, if it was.
    pub(super) fn origin(&mut self, peer: Peer, packet_id: PacketId) -> Option<Lane> {
        let live = self.conns.get_mut(&peer)?;
        let at = live.origins.iter().position(|(id, _)| *id == packet_id)?;
        live.origins.remove(at).map(|(_, lane)| lane)
    }

    /// The subscriber key of a one-way stream's subscriptions: that of the stream the broker
    /// opens back to the client for their deliveries (opened at the first one). `None` when it
    /// cannot be opened (the client allows the broker no streams, or the one-way stream is
    /// gone): the subscription is then the session's.
    pub(super) fn way_back(&mut self, now: Instant, peer: Peer, one_way: Lane) -> Option<SessionKey> {
        let Peer::Quic(conn) = peer else { return None };
        let live = self.conns.get(&peer)?;
        let back = live.lanes.get(&one_way)?.back;
        if let Some(key) = back.and_then(|b| live.lanes.get(&b)).and_then(|s| s.session.as_ref().map(|_| s.key)) {
            return Some(key);
        }
        let owner = live.client.as_ref().and_then(|c| self.registry.get(c)).map(|r| r.key)?;
        if live.next_lane > LANE_SEQ_MAX {
            return None;
        }
        let session = live.session.data_stream(now).ok()?;
        let back = self.links.quic.open_lane(now, conn).ok()?;
        let live = self.conns.get_mut(&peer)?;
        let key = lane_key(owner, live.next_lane);
        live.next_lane += 1;
        let state = LaneState {
            session: Some(session),
            inbound: None,
            early: BytesMut::new(),
            key,
            finishing: false,
            back: None,
        };
        live.lanes.insert(back, state);
        if let Some(s) = live.lanes.get_mut(&one_way) {
            s.back = Some(back);
        }
        self.lane_keys.insert(key, (peer, back));
        Some(key)
    }

    /// Ends a data stream's MQTT state (its stream may still carry its last bytes).
    fn end_lane(&mut self, now: Instant, peer: Peer, lane: Lane) {
        let Some(live) = self.conns.get_mut(&peer) else { return };
        let Some(state) = live.lanes.get_mut(&lane) else { return };
        let Some(mut session) = state.session.take() else { return };
        // Nothing more comes from it (a FIN lane keeps its place until the FIN is out).
        let key = state.key;
        state.finishing = false;
        self.lane_keys.remove(&key);
        self.router.remove_session(key);
        let mut kept = session.take_state();
        self.redistribute(now, key, &mut kept);
    }

    /// Every data stream of a connection that ended.
    pub(super) fn drop_lanes(&mut self, now: Instant, peer: Peer) {
        let lanes: Vec<Lane> = self.conns.get(&peer).map_or_else(Vec::new, |l| l.lanes.keys().copied().collect());
        for lane in lanes {
            self.drop_lane(now, peer, lane);
        }
    }

    /// A message for a data stream's subscription (read rights were checked by the caller).
    /// Returns the stream session's request id, as `deliver` does.
    pub(super) fn deliver_lane(&mut self, now: Instant, key: SessionKey, publish: mqtt_proto::Publish) -> Option<u64> {
        let &(peer, lane) = self.lane_keys.get(&key)?;
        if publish.qos() == mqtt_proto::QoS::AtMostOnce && self.over_budget(peer) {
            self.stats.messages_dropped += 1;
            if let Some(live) = self.conns.get_mut(&peer) {
                live.dropped += 1;
            }
            return None;
        }
        let session = self.conns.get_mut(&peer)?.lanes.get_mut(&lane)?.session.as_mut()?;
        let id = session.publish(now, publish).ok();
        if id.is_some() {
            self.stats.messages_sent += 1;
        }
        self.dirty.insert(peer);
        id
    }

    /// The session a packet of `lane` is answered on.
    pub(super) fn session_on(&mut self, peer: Peer, lane: Lane) -> Option<&mut ServerSession> {
        let live = self.conns.get_mut(&peer)?;
        if lane.is_control() {
            return Some(&mut live.session);
        }
        live.lanes.get_mut(&lane)?.session.as_mut()
    }

    /// Sends our FIN on a data stream and forgets it.
    pub(super) fn finish_lane_now(&mut self, now: Instant, peer: Peer, lane: Lane) {
        if let Peer::Quic(conn) = peer {
            let _ = self.links.quic.finish_lane(now, conn, lane);
        }
        if let Some(live) = self.conns.get_mut(&peer) {
            live.lanes.remove(&lane);
        }
    }

    /// Bytes for one of a connection's streams, straight to its transport; a connection
    /// fallen too far behind is dropped.
    pub(super) fn send_on(&mut self, now: Instant, peer: Peer, lane: Lane, bytes: Bytes) {
        if self.links.send(now, peer, lane, bytes) {
            // Not reading at all: its session ends as for a lost connection (will, kept session).
            self.drop_slow(now, peer);
        }
    }
}
