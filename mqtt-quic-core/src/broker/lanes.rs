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
//! - a data stream opened before CONNACK waits (its bytes buffered, within the limits below)
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
//!
//! Limits: before CONNACK a connection may hold at most `data_streams` waiting streams and one
//! packet's worth (`maximum_packet_size`) of their bytes in all; more resets the stream. At most
//! [`MAX_ORIGINS`] SUBSCRIBEs and UNSUBSCRIBEs read on one-way streams may wait for the session
//! at once; more resets the stream they came on. A connection's subscriptions, on all its
//! streams together, count against `max_subscriptions_per_client`.

use super::machine::{Broker, Peer};
use super::router::{lane_key, owner, SessionKey, LANE_SEQ_MAX};
use crate::quic::{close_code, Lane, LaneEnd};
use crate::session::server::{ServerEvent, ServerSession};
use bytes::{Bytes, BytesMut};
use mqtt_proto::{Decoder, Packet, PacketId};
use std::time::Instant;

/// SUBSCRIBEs and UNSUBSCRIBEs read on one-way streams that may wait for the session at once.
pub(super) const MAX_ORIGINS: usize = 1024;

/// Where a data stream is in its life.
enum Phase {
    /// Waiting for the connection's CONNACK; its bytes are buffered.
    Waiting,
    /// A two-way stream: its session and subscriber key (see `router::lane_key`).
    Live { session: Box<ServerSession>, key: SessionKey },
    /// A one-way stream: its packets decoded for the control session.
    OneWay(Decoder),
    /// Its MQTT state is over; the stream waits for its last bytes (and FIN) to go out.
    Ended,
}

/// One data stream of a live connection.
pub(super) struct LaneState {
    phase: Phase,
    /// Bytes that arrived before CONNACK; on a one-way stream, those of a packet not yet
    /// complete.
    early: BytesMut,
    /// The client finished its side: ours follows once what is due is out.
    finishing: bool,
    /// A one-way stream's way back: the stream the broker opened for the deliveries of the
    /// subscriptions made on it.
    back: Option<Lane>,
}

impl LaneState {
    /// Whether it waits for the connection's CONNACK.
    pub(super) fn is_waiting(&self) -> bool {
        matches!(self.phase, Phase::Waiting)
    }

    /// Its session's next deadline (a two-way stream's timed resends, MQTT 3.1.1).
    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Live { session, .. } => session.poll_timeout(),
            _ => None,
        }
    }

    /// Fires its session's timers.
    pub(super) fn handle_timeout(&mut self, now: Instant) {
        if let Phase::Live { session, .. } = &mut self.phase {
            session.handle_timeout(now);
        }
    }
}

impl Broker {
    /// The client opened a data stream. Before CONNACK, at most `data_streams` may wait.
    pub(super) fn lane_opened(&mut self, now: Instant, peer: Peer, lane: Lane) {
        let max_waiting = self.config.quic.transport.data_streams as usize;
        // A connection whose session is over (a refused CONNECT, a DISCONNECT) takes none.
        let Some(live) = self.conns.get_mut(&peer) else { return self.reset_lane(now, peer, lane) };
        if live.lanes.values().filter(|l| l.is_waiting()).count() >= max_waiting {
            return self.reset_lane(now, peer, lane);
        }
        let state = LaneState { phase: Phase::Waiting, early: BytesMut::new(), finishing: false, back: None };
        live.lanes.insert(lane, state);
        self.dirty.insert(peer);
    }

    /// Bytes arrived on a data stream.
    pub(super) fn lane_received(&mut self, now: Instant, peer: Peer, lane: Lane, data: &[u8]) {
        self.stats.bytes_received += data.len() as u64;
        let max = self.config.session.maximum_packet_size as usize;
        let Some(live) = self.conns.get_mut(&peer) else { return };
        // What all the connection's waiting streams hold (one packet's worth at most), counted
        // only while this one waits.
        let waiting = match live.lanes.get(&lane) {
            Some(state) if state.is_waiting() => {
                live.lanes.values().filter(|l| l.is_waiting()).map(|l| l.early.len()).sum()
            }
            _ => 0,
        };
        let Some(state) = live.lanes.get_mut(&lane) else { return };
        match &mut state.phase {
            Phase::Live { session, .. } => {
                session.handle_stream_data(now, data);
                live.session.handle_activity(now);
            }
            Phase::OneWay(_) => {
                state.early.extend_from_slice(data);
                if !self.decode_one_way(now, peer, lane) {
                    return self.lane_failed(now, peer, lane);
                }
            }
            Phase::Waiting if waiting + data.len() <= max => state.early.extend_from_slice(data),
            // More than a packet before CONNACK: the client does not wait as it should.
            Phase::Waiting => return self.lane_failed(now, peer, lane),
            Phase::Ended => return,
        }
        self.dirty.insert(peer);
    }

    /// Hands the whole packets buffered for a one-way stream to the control session. Returns
    /// false when the stream must end: bytes that do not decode, a packet that does not belong
    /// on a data stream, or too many SUBSCRIBEs and UNSUBSCRIBEs waiting. (A packet's size is
    /// bounded by the decoder, so the buffer is.)
    fn decode_one_way(&mut self, now: Instant, peer: Peer, lane: Lane) -> bool {
        let Some(live) = self.conns.get_mut(&peer) else { return true };
        let Some(state) = live.lanes.get_mut(&lane) else { return true };
        let Phase::OneWay(decoder) = &mut state.phase else { return true };
        loop {
            match decoder.decode(&mut state.early) {
                Ok(Some(packet)) => {
                    // Which stream a SUBSCRIBE or UNSUBSCRIBE came on, for the session's event.
                    let origin = match &packet {
                        Packet::Subscribe(s) => Some(s.packet_id),
                        Packet::Unsubscribe(u) => Some(u.packet_id),
                        _ => None,
                    };
                    if let Some(id) = origin {
                        if live.origins.len() >= MAX_ORIGINS {
                            return false;
                        }
                        live.origins.push_back((id, lane));
                    }
                    if live.session.handle_stream_packet(now, packet).is_err() {
                        if origin.is_some() {
                            live.origins.pop_back();
                        }
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

    /// The next subscriber key for a data stream of session `owner`: a number no live stream
    /// of that session holds (the numbers go round after 2^24 streams).
    fn next_lane_key(&mut self, owner: SessionKey) -> SessionKey {
        loop {
            self.lane_seq = (self.lane_seq + 1) & LANE_SEQ_MAX;
            let key = lane_key(owner, self.lane_seq);
            if !self.lane_keys.contains_key(&key) {
                return key;
            }
        }
    }

    /// Gives the data streams that waited for CONNACK their sessions, once it is sent.
    pub(super) fn activate_lanes(&mut self, now: Instant, peer: Peer) {
        let owner = self.conns.get(&peer).and_then(|l| l.client.as_ref()).and_then(|c| self.registry.get(c));
        let Some(owner) = owner.filter(|r| r.conn == Some(peer)).map(|r| r.key) else { return };
        let Some(live) = self.conns.get(&peer) else { return };
        let waiting: Vec<Lane> = live.lanes.iter().filter(|(_, s)| s.is_waiting()).map(|(l, _)| *l).collect();
        let max = self.config.session.maximum_packet_size;
        for lane in waiting {
            let Some(live) = self.conns.get_mut(&peer) else { return };
            if lane.is_unidirectional() {
                let protocol = live.session.protocol();
                if let Some(state) = live.lanes.get_mut(&lane) {
                    state.phase = Phase::OneWay(Decoder::new(protocol).with_max_packet_size(max));
                }
                if !self.decode_one_way(now, peer, lane) {
                    self.lane_failed(now, peer, lane);
                }
                continue;
            }
            let Ok(mut session) = live.session.data_stream(now) else { return };
            let key = self.next_lane_key(owner);
            let Some(state) = self.conns.get_mut(&peer).and_then(|l| l.lanes.get_mut(&lane)) else { continue };
            let early = std::mem::take(&mut state.early);
            if !early.is_empty() {
                session.handle_stream_data(now, &early);
            }
            state.phase = Phase::Live { session: Box::new(session), key };
            self.lane_keys.insert(key, (peer, lane));
        }
    }

    /// The events of a connection's two-way data streams, with the stream and subscriber key
    /// each came from.
    pub(super) fn lane_events(&mut self, peer: Peer) -> Vec<(Lane, SessionKey, ServerEvent)> {
        let Some(live) = self.conns.get_mut(&peer) else { return Vec::new() };
        let mut events = Vec::new();
        for (lane, state) in &mut live.lanes {
            if let Phase::Live { session, key } = &mut state.phase {
                events.extend(std::iter::from_fn(|| session.poll_event()).map(|e| (*lane, *key, e)));
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
        let mut packets = crate::session::packet_counts::PacketCounts::default();
        for (lane, state) in &mut live.lanes {
            match &mut state.phase {
                Phase::Live { session, .. } => {
                    out.extend(std::iter::from_fn(|| session.poll_transmit()).map(|b| (*lane, b)));
                    packets.add(&session.take_packet_counts());
                    if session.is_done() {
                        over.push((*lane, true));
                    } else if state.finishing {
                        over.push((*lane, false));
                    }
                }
                // A one-way stream the client finished: nothing of ours is on it.
                Phase::OneWay(_) if state.finishing => over.push((*lane, false)),
                _ => {}
            }
        }
        self.packets.add(&packets);
        for (lane, bytes) in out {
            self.stats.bytes_sent += bytes.len() as u64;
            self.emit_on(now, peer, lane, bytes);
        }
        for (lane, failed) in over {
            if lane.is_unidirectional() {
                // Its way back ends too, after what is due on it.
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

    /// Resets a stream both ways (QUIC only).
    fn reset_lane(&mut self, now: Instant, peer: Peer, lane: Lane) {
        if let Peer::Quic(conn) = peer {
            let _ = self.links.quic.reset_lane(now, conn, lane, close_code::STREAM_ERROR);
        }
    }

    /// A data stream broke the protocol (or could not be served): reset it, end its
    /// subscriptions.
    fn lane_failed(&mut self, now: Instant, peer: Peer, lane: Lane) {
        self.reset_lane(now, peer, lane);
        self.drop_lane(now, peer, lane);
    }

    /// Forgets a data stream: its subscriptions end, and what a shared subscription had
    /// handed it unacknowledged goes to another member. A one-way stream's way back goes with
    /// it.
    pub(super) fn drop_lane(&mut self, now: Instant, peer: Peer, lane: Lane) {
        self.end_lane(now, peer, lane);
        let Some(state) = self.conns.get_mut(&peer).and_then(|l| l.lanes.remove(&lane)) else { return };
        if let Some(back) = state.back {
            if self.conns.get(&peer).is_some_and(|l| l.lanes.contains_key(&back)) {
                self.reset_lane(now, peer, back);
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

    /// The subscriber key of a one-way stream's way back, if it has one.
    pub(super) fn way_back_key(&self, peer: Peer, one_way: Lane) -> Option<SessionKey> {
        let live = self.conns.get(&peer)?;
        let back = live.lanes.get(&one_way)?.back?;
        match &live.lanes.get(&back)?.phase {
            Phase::Live { key, .. } => Some(*key),
            _ => None,
        }
    }

    /// The subscriber key of a one-way stream's subscriptions: that of the stream the broker
    /// opens back to the client for their deliveries (opened at the first SUBSCRIBE). `None`
    /// when it cannot be opened (the client allows the broker no streams, or the one-way stream
    /// is gone): the subscription is then the session's.
    pub(super) fn way_back(&mut self, now: Instant, peer: Peer, one_way: Lane) -> Option<SessionKey> {
        if let Some(key) = self.way_back_key(peer, one_way) {
            return Some(key);
        }
        let Peer::Quic(conn) = peer else { return None };
        let live = self.conns.get(&peer)?;
        let state = live.lanes.get(&one_way)?;
        if state.finishing || state.back.is_some() {
            return None;
        }
        let owner = live.client.as_ref().and_then(|c| self.registry.get(c)).map(|r| r.key)?;
        let session = live.session.data_stream(now).ok()?;
        let back = self.links.quic.open_lane(now, conn).ok()?;
        let key = self.next_lane_key(owner);
        let live = self.conns.get_mut(&peer)?;
        let state = LaneState {
            phase: Phase::Live { session: Box::new(session), key },
            early: BytesMut::new(),
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
        state.finishing = false;
        let Phase::Live { mut session, key } = std::mem::replace(&mut state.phase, Phase::Ended) else { return };
        self.lane_keys.remove(&key);
        self.router.remove_session(key);
        let mut kept = session.take_state();
        self.redistribute(now, key, &mut kept);
    }

    /// Every data stream of a connection that ended, or whose session another connection
    /// took over.
    pub(super) fn drop_lanes(&mut self, now: Instant, peer: Peer) {
        let lanes: Vec<Lane> = self.conns.get(&peer).map_or_else(Vec::new, |l| l.lanes.keys().copied().collect());
        for lane in lanes {
            self.reset_lane(now, peer, lane);
            self.drop_lane(now, peer, lane);
        }
        if let Some(live) = self.conns.get_mut(&peer) {
            live.origins.clear();
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
        let Phase::Live { session, .. } = &mut self.conns.get_mut(&peer)?.lanes.get_mut(&lane)?.phase else {
            return None;
        };
        let id = session.publish(now, publish).ok();
        if id.is_some() {
            self.stats.messages_sent += 1;
        } else {
            // Its queue is full (or the message is too large for the client).
            self.stats.messages_dropped += 1;
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
        match &mut live.lanes.get_mut(&lane)?.phase {
            Phase::Live { session, .. } => Some(session),
            _ => None,
        }
    }

    /// Subscriptions held by session `key` (a session or a data stream's subscriber key) and
    /// every data stream of its connection: what `max_subscriptions_per_client` limits.
    pub(super) fn subscriptions_of(&self, key: SessionKey) -> usize {
        let owner = owner(key);
        let streams = self.lane_keys.range(lane_key(owner, 0)..=lane_key(owner, LANE_SEQ_MAX));
        self.router.filters(owner).len() + streams.map(|(k, _)| self.router.filters(*k).len()).sum::<usize>()
    }

    /// Sends our FIN on a data stream and forgets it.
    pub(super) fn finish_lane_now(&mut self, now: Instant, peer: Peer, lane: Lane) {
        self.end_lane(now, peer, lane);
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
