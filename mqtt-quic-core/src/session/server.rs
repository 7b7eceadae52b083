//! The server (broker) side of one connection: CONNECT first and once, keep-alive at 1.5x, the
//! limits it announced in CONNACK enforced with their reason codes, QoS 1 and 2 both ways.
//!
//! Decisions that need the broker's state (accept or refuse a CONNECT, grant subscriptions,
//! route messages) are events for the broker and commands back; the session does the protocol.

use super::alias_in::IncomingAliases;
use super::alias_out::OutgoingAliases;
use super::inbound::{Arrival, Inbound};
use super::outbound::{Change, Kept};
use super::outbound::{Outbound, PubRec, Step};
use super::timer::{earliest, Timer};
use super::writer::Writer;
use super::DEFAULT_WINDOW;
use bytes::{Bytes, BytesMut};
use mqtt_proto::{
    Ack, Auth, ConnAck, Connect, DecodeError, Decoder, Disconnect, MqttString, Packet, PacketId, Protocol, Publish,
    QoS, QosPid, ReasonCode, SubAck, Subscription, TopicFilter, UnsubAck, Will,
};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Limits a server session enforces and announces in CONNACK.
#[derive(Debug, Clone)]
pub struct ServerSessionConfig {
    /// Largest packet accepted from the client (0x95 beyond).
    pub maximum_packet_size: u32,
    /// QoS 2 publishes from the client awaiting PUBREL at once (0x93 beyond).
    pub receive_maximum: u16,
    /// Topic aliases accepted from the client (0x94 beyond).
    pub topic_alias_maximum: u16,
    /// Use topic aliases on the PUBLISHes sent to MQTT 5 clients that accept them (their
    /// Topic Alias Maximum): a long topic then crosses the link once per connection.
    pub outgoing_topic_aliases: bool,
    /// Highest QoS accepted from the client (0x9B beyond).
    pub maximum_qos: QoS,
    /// Whether retained messages are accepted (0x9A otherwise).
    pub retain_available: bool,
    /// Longest client identifier accepted (0x85 beyond).
    pub max_client_id_len: usize,
    /// Close connections that send no CONNECT within this time.
    pub connect_timeout: Duration,
    /// Keep-alive imposed on clients (Server Keep Alive), if any.
    pub server_keep_alive: Option<u16>,
    /// Our publishes in flight to the client, whatever its Receive Maximum allows.
    pub max_inflight: u16,
    /// Publishes waiting for an in-flight slot; beyond it `publish` fails.
    pub max_queued: usize,
    /// MQTT 3.1 and 3.1.1 sessions only: resend an unacknowledged PUBLISH (with DUP) or PUBREL
    /// after this long without an answer, as some 3.1.1 deployments expect. `None` (the
    /// default) resends only on reconnect. MQTT 5 forbids resending on a live connection
    /// [MQTT-4.4.0-1], so this never applies to MQTT 5 sessions.
    pub retry_interval: Option<Duration>,
    /// With `retry_interval`: resends of one message before the connection is given up as
    /// dead (the session is kept, so the message goes out again on reconnect).
    pub max_retries: u32,
}

impl Default for ServerSessionConfig {
    fn default() -> Self {
        ServerSessionConfig {
            maximum_packet_size: mqtt_proto::DEFAULT_MAX_PACKET_SIZE,
            receive_maximum: DEFAULT_WINDOW,
            topic_alias_maximum: 16,
            outgoing_topic_aliases: true,
            maximum_qos: QoS::ExactlyOnce,
            retain_available: true,
            max_client_id_len: 256,
            connect_timeout: Duration::from_secs(10),
            server_keep_alive: None,
            max_inflight: DEFAULT_WINDOW,
            retry_interval: None,
            max_retries: 5,
            max_queued: 10_000,
        }
    }
}

/// Why a server session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EndReason {
    /// The client sent DISCONNECT with this code.
    ClientDisconnect(ReasonCode),
    /// The client broke the protocol; we sent (MQTT 5) or would have sent this code.
    ProtocolViolation(ReasonCode),
    /// Nothing heard for 1.5 times the keep-alive.
    KeepAliveTimeout,
    /// An MQTT 3.1.1 client left a message unacknowledged through every timed resend.
    RetriesExhausted,
    /// No CONNECT in time.
    ConnectTimeout,
    /// We refused the CONNECT with this code.
    Refused(ReasonCode),
    /// The transport closed.
    TransportLost,
    /// The broker ended it with [`ServerSession::disconnect`].
    Server(ReasonCode),
}

/// What a server session reports to the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerEvent {
    /// A valid CONNECT: answer with [`ServerSession::accept`] or [`ServerSession::refuse`].
    Connect(Box<Connect>),
    /// A message from the client (a QoS 2 message once, however often it is resent). Answer a
    /// QoS 1 or 2 one with [`ServerSession::acknowledge`].
    Publish(Publish),
    /// A SUBSCRIBE: answer with [`ServerSession::suback`].
    Subscribe {
        /// Its identifier.
        packet_id: PacketId,
        /// The subscriptions.
        subscriptions: Vec<Subscription>,
        /// MQTT 5 subscription identifier.
        subscription_id: Option<mqtt_proto::SubscriptionId>,
    },
    /// An UNSUBSCRIBE: answer with [`ServerSession::unsuback`].
    Unsubscribe {
        /// Its identifier.
        packet_id: PacketId,
        /// The filters.
        filters: Vec<TopicFilter>,
    },
    /// The client acknowledged a message we published (PUBACK, or PUBCOMP for QoS 2).
    Delivered {
        /// The identifier from [`ServerSession::publish`].
        id: u64,
    },
    /// AUTH from the client (enhanced authentication).
    Auth(Auth),
    /// The client's DISCONNECT set a new Session Expiry Interval (seconds), which replaces the
    /// one from CONNECT [MQTT-3.14.2.2.2]. Fires at most once, just before `Ended`.
    SessionExpiry(u32),
    /// The connection ended. Fires once. `will` is the will message to publish (after its delay)
    /// unless the client disconnected normally.
    Ended {
        /// Why.
        reason: EndReason,
        /// The will to publish, if the ending calls for it.
        will: Option<Will>,
    },
}

pub use crate::error::CommandError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitConnect,
    /// CONNECT reported; waiting for the broker's accept/refuse.
    Deciding,
    Connected,
    Ended,
}

pub use super::state::{message_cost, SessionState};

/// The server side of one MQTT connection.
pub struct ServerSession {
    /// Packets each way since the broker last took the counts (see
    /// [`ServerSession::take_packet_counts`]).
    packets: crate::session::packet_counts::PacketCounts,
    config: ServerSessionConfig,
    state: State,
    decoder: Decoder,
    inbuf: BytesMut,
    /// Our packets, within the client's Maximum Packet Size (it knows the protocol spoken).
    writer: Writer,
    events: VecDeque<ServerEvent>,
    will: Option<Will>,
    keep_alive: Duration,
    /// The connect timeout until CONNECT is accepted, then the keep-alive (1.5 times).
    deadline: Timer,
    /// The client's QoS 1 and 2 messages not yet finished with.
    inbound: Inbound,
    /// Aliases the client set.
    aliases: IncomingAliases,
    client_receive_maximum: u16,
    /// Our messages to the client: queued and in flight (kept across connections in
    /// [`SessionState`]).
    outbound: Outbound,
    /// Session Expiry Interval for CONNACK, when it differs from the client's.
    announced_expiry: Option<u32>,
    /// Keep-alive the broker imposes on this client (see [`ServerSession::impose_keep_alive`]).
    imposed_keep_alive: Option<u16>,
    /// Our topic aliases towards the client.
    aliases_out: OutgoingAliases,
    /// The Session Expiry Interval of the client's CONNECT (0 when absent).
    connect_expiry: u32,
    /// The client said it is a bridge (mosquitto's flag, MQTT 3.1.1): its subscriptions are
    /// No Local and Retain As Published, as a 3.1.1 bridge expects.
    bridge: bool,
    /// A packet that arrived after CONNECT while the broker was deciding on it.
    held: Option<Packet>,
    /// A data stream's session (see [`ServerSession::data_stream`]).
    data_stream: bool,
}

impl ServerSession {
    /// A session for a connection that just opened; CONNECT is due within the connect timeout.
    pub fn new(now: Instant, config: ServerSessionConfig) -> ServerSession {
        let mut deadline = Timer::default();
        deadline.set(now + config.connect_timeout);
        ServerSession {
            packets: Default::default(),
            decoder: Decoder::new(Protocol::V5).with_max_packet_size(config.maximum_packet_size),
            deadline,
            state: State::AwaitConnect,
            inbuf: BytesMut::new(),
            writer: Writer::new(Protocol::V5),
            events: VecDeque::new(),
            will: None,
            keep_alive: Duration::ZERO,
            inbound: Inbound::default(),
            aliases: IncomingAliases::default(),
            client_receive_maximum: u16::MAX,
            outbound: Outbound::default(),
            announced_expiry: None,
            imposed_keep_alive: None,
            aliases_out: OutgoingAliases::default(),
            connect_expiry: 0,
            bridge: false,
            held: None,
            data_stream: false,
            config,
        }
    }

    /// The session of a data stream of this connection (EMQX's multi-stream mode), once its
    /// CONNECT is accepted: PUBLISH through UNSUBACK with their own packet identifiers,
    /// in-flight window and QoS 2 state, under the limits the connection agreed. The
    /// connection's keep-alive, will and session stay with this (the control stream's)
    /// session; CONNECT, DISCONNECT and AUTH on a data stream are protocol errors that end the
    /// data stream only, and it never sends DISCONNECT (its end is the stream's reset).
    /// Topic aliases are not used towards the client on data streams (the client may keep one
    /// table per connection); the client's own aliases are per stream.
    pub fn data_stream(&self, now: Instant) -> Result<ServerSession, CommandError> {
        if self.state != State::Connected {
            return Err(CommandError::WrongState);
        }
        let protocol = self.writer.protocol();
        let mut lane = ServerSession::new(now, self.config.clone());
        lane.deadline.clear();
        lane.decoder.set_protocol(protocol);
        lane.writer.set_protocol(protocol);
        lane.writer.set_max(self.writer.max());
        lane.client_receive_maximum = self.client_receive_maximum;
        lane.connect_expiry = self.connect_expiry;
        lane.state = State::Connected;
        lane.data_stream = true;
        Ok(lane)
    }

    /// A packet arrived on another stream of the connection: it counts for the keep-alive as
    /// one on this stream would [MQTT-3.1.2-22].
    pub fn handle_activity(&mut self, now: Instant) {
        self.touch(now);
    }

    /// A packet from a one-way data stream of the connection (a client that opens its data
    /// streams unidirectional): handled as if it came on this stream, and answered here.
    /// Only PUBLISH, its acknowledgements, SUBSCRIBE and UNSUBSCRIBE may come that way: any
    /// other packet, or any packet before CONNACK, is refused with `Err` (the caller ends that
    /// stream; the connection goes on).
    pub fn handle_stream_packet(&mut self, now: Instant, packet: Packet) -> Result<(), CommandError> {
        let data = matches!(
            packet,
            Packet::Publish(_)
                | Packet::PubAck(_)
                | Packet::PubRec(_)
                | Packet::PubRel(_)
                | Packet::PubComp(_)
                | Packet::Subscribe(_)
                | Packet::Unsubscribe(_)
        );
        if self.state != State::Connected || !data {
            return Err(CommandError::WrongState);
        }
        self.touch(now);
        self.handle_packet(now, packet);
        Ok(())
    }

    /// A QoS 0 message encoded as one datagram for the client (no topic alias: datagrams
    /// arrive in any order), or `None` when the client's Maximum Packet Size rules it out or
    /// the session is not connected.
    pub fn encode_datagram(&self, publish: &Publish) -> Option<Bytes> {
        if self.state != State::Connected || publish.qos() != QoS::AtMostOnce {
            return None;
        }
        let mut publish = publish.clone();
        publish.properties.topic_alias = None;
        let protocol = self.writer.protocol();
        if publish.encoded_len(protocol).ok()? > self.writer.max() as usize {
            return None;
        }
        let mut out = BytesMut::new();
        Packet::Publish(publish).encode(protocol, &mut out).ok()?;
        Some(out.freeze())
    }

    /// A QUIC datagram from the client: one whole QoS 0 PUBLISH, handled like one on the
    /// stream. Returns false, and does nothing else, for anything else (another packet, a QoS 1
    /// or 2 one, a topic alias, which cannot work on an unordered path, trailing bytes, bytes
    /// that do not decode, anything before CONNACK): a datagram may be lost anyway, so one
    /// that is dropped ends nothing, and the caller counts it.
    pub fn handle_datagram(&mut self, now: Instant, data: Bytes) -> bool {
        if self.state != State::Connected {
            return false;
        }
        let mut buf = data;
        let mut decoder = Decoder::new(self.writer.protocol()).with_max_packet_size(self.config.maximum_packet_size);
        let Ok(Some(Packet::Publish(publish))) = decoder.decode_bytes(&mut buf) else { return false };
        if !buf.is_empty() || publish.qos() != QoS::AtMostOnce || publish.properties.topic_alias.is_some() {
            return false;
        }
        self.touch(now);
        self.on_publish(publish);
        true
    }

    /// The protocol the client speaks (known after CONNECT).
    pub fn protocol(&self) -> Protocol {
        self.writer.protocol()
    }

    /// Whether the session has ended (the transport should be closed once drained).
    pub fn is_done(&self) -> bool {
        self.state == State::Ended
    }

    /// Accepts the CONNECT, resuming a kept session: CONNACK says session present, and what the
    /// client had not acknowledged is sent again (PUBLISH with DUP, or PUBREL) before anything
    /// new [MQTT-4.4.0-1].
    pub fn resume(&mut self, now: Instant, state: SessionState) -> Result<(), CommandError> {
        if self.state != State::Deciding {
            return Err(CommandError::WrongState);
        }
        // The identifiers in flight are taken before anything new is numbered, and their
        // messages go out right after CONNACK, ahead of what was queued meanwhile (found while
        // mapping CONFORMANCE.md: queued messages used to go first and could reuse an
        // identifier still in flight).
        self.inbound = state.inbound;
        self.outbound = state.outbound;
        self.outbound.resume();
        self.accept(now, true, None)
    }

    /// Most of our QoS 1 and 2 publishes unacknowledged at once: the client's Receive Maximum,
    /// capped by ours.
    fn window(&self) -> usize {
        usize::from(self.client_receive_maximum.min(self.config.max_inflight).max(1))
    }

    /// Why the client may not be sent `publish`: its Maximum Packet Size rules it out. Such a
    /// message is dropped unsent and treated as delivered [MQTT-3.1.2-25]: it was queued while
    /// the client was away, or in flight when it came back announcing a smaller maximum.
    fn refusal(protocol: Protocol, max: u32) -> impl Fn(&Publish) -> Option<ReasonCode> {
        move |p| p.encoded_len(protocol).map_or(true, |n| n > max as usize).then_some(ReasonCode::PacketTooLarge)
    }

    /// Timed redelivery's interval, where it applies: MQTT 3.1 and 3.1.1 only.
    fn retry_interval(&self) -> Option<Duration> {
        self.config.retry_interval.filter(|_| !self.writer.protocol().is_v5())
    }

    /// Tells the client in CONNACK (MQTT 5) the Session Expiry Interval the server will use, when
    /// it is not the one the client asked for (e.g. capped by the broker's maximum). Call before
    /// [`ServerSession::accept`] or [`ServerSession::resume`].
    pub fn announce_session_expiry(&mut self, secs: u32) {
        self.announced_expiry = Some(secs);
    }

    /// Imposes a keep-alive on this client (the broker's maximum, for a client that asked for
    /// more or for none): MQTT 5 clients are told in CONNACK (Server Keep Alive), and the
    /// session enforces it at 1.5 times. Call before [`ServerSession::accept`] or
    /// [`ServerSession::resume`]; the configured `server_keep_alive`, if any, still wins.
    pub fn impose_keep_alive(&mut self, secs: u16) {
        self.imposed_keep_alive = Some(secs);
    }

    /// Starts recording changes to durable state for a store (see [`crate::persist`]); with
    /// `on` false, stops.
    pub(crate) fn journal(&mut self, on: bool) {
        self.outbound.journal(on);
    }

    /// Whether changes are recorded for a store.
    pub(crate) fn is_journaled(&self) -> bool {
        self.outbound.is_journaled()
    }

    /// The changes to our kept messages since the last call, and whether the client's QoS 2
    /// identifiers awaiting PUBREL changed.
    pub(crate) fn take_changes(&mut self) -> (Vec<Change>, bool) {
        (self.outbound.take_changes(), self.inbound.take_changed())
    }

    /// Every kept message, as a store sees it.
    pub(crate) fn kept_messages(&self) -> Vec<Kept> {
        self.outbound.kept().collect()
    }

    /// The client's QoS 2 identifiers awaiting PUBREL.
    pub(crate) fn qos2_ids(&self) -> Vec<u16> {
        self.inbound.qos2_ids().collect()
    }

    /// The session state to keep after the connection ended (see [`SessionState`]).
    pub fn take_state(&mut self) -> SessionState {
        SessionState { inbound: self.inbound.take_kept(), outbound: std::mem::take(&mut self.outbound) }
    }

    /// Accepts the CONNECT reported by [`ServerEvent::Connect`]. `assigned_client_id` must be
    /// given when the client sent an empty one (MQTT 5).
    pub fn accept(
        &mut self,
        now: Instant,
        session_present: bool,
        assigned_client_id: Option<&str>,
    ) -> Result<(), CommandError> {
        if self.state != State::Deciding {
            return Err(CommandError::WrongState);
        }
        let mut ack = ConnAck { session_present, ..Default::default() };
        if self.writer.protocol().is_v5() {
            let p = &mut *ack.properties;
            p.receive_maximum = std::num::NonZeroU16::new(self.config.receive_maximum);
            p.maximum_packet_size = std::num::NonZeroU32::new(self.config.maximum_packet_size);
            p.topic_alias_maximum = Some(self.config.topic_alias_maximum);
            if self.config.maximum_qos != QoS::ExactlyOnce {
                p.maximum_qos = Some(self.config.maximum_qos);
            }
            if !self.config.retain_available {
                p.retain_available = Some(false);
            }
            p.server_keep_alive = self.config.server_keep_alive.or(self.imposed_keep_alive);
            p.session_expiry_interval = self.announced_expiry;
            p.assigned_client_identifier = assigned_client_id.and_then(|s| MqttString::try_from(s).ok());
        }
        if let Some(ka) = self.config.server_keep_alive.or(self.imposed_keep_alive) {
            self.keep_alive = Duration::from_secs(u64::from(ka));
        }
        self.state = State::Connected;
        self.write(&ack.into());
        self.touch(now);
        self.pump(now);
        if let Some(packet) = self.held.take() {
            self.handle_packet(now, packet);
            self.process(now);
        }
        Ok(())
    }

    /// Refuses the CONNECT with `reason` and ends the session.
    pub fn refuse(&mut self, _now: Instant, reason: ReasonCode) -> Result<(), CommandError> {
        if self.state != State::Deciding {
            return Err(CommandError::WrongState);
        }
        self.write(&ConnAck { reason_code: reason, ..Default::default() }.into());
        self.will = None;
        self.end(EndReason::Refused(reason));
        Ok(())
    }

    /// Answers a SUBSCRIBE.
    pub fn suback(&mut self, packet_id: PacketId, reason_codes: Vec<ReasonCode>) -> Result<(), CommandError> {
        if self.state != State::Connected {
            return Err(CommandError::WrongState);
        }
        self.write(&Packet::SubAck(SubAck {
            packet_id,
            properties: Default::default(),
            reason_codes: reason_codes.into_iter().collect(),
        }));
        Ok(())
    }

    /// Answers an UNSUBSCRIBE.
    pub fn unsuback(&mut self, packet_id: PacketId, reason_codes: Vec<ReasonCode>) -> Result<(), CommandError> {
        if self.state != State::Connected {
            return Err(CommandError::WrongState);
        }
        self.write(&Packet::UnsubAck(UnsubAck {
            packet_id,
            properties: Default::default(),
            reason_codes: reason_codes.into_iter().collect(),
        }));
        Ok(())
    }

    /// Sends a message to the client. QoS 1 and 2 messages wait for a slot under the client's
    /// Receive Maximum and complete with [`ServerEvent::Delivered`]. Returns the id used there.
    pub fn publish(&mut self, now: Instant, mut publish: Publish) -> Result<u64, CommandError> {
        if self.state != State::Connected {
            return Err(CommandError::WrongState);
        }
        publish.dup = false;
        // A topic alias belongs to the connection it arrived on, never to this one.
        if publish.properties.topic_alias.is_some() {
            publish.properties.topic_alias = None;
        }
        let max = self.writer.max();
        let size = publish.encoded_len(self.writer.protocol()).unwrap_or(usize::MAX);
        if size > max as usize {
            return Err(CommandError::PacketTooLarge { size, max });
        }
        let id = self.outbound.new_id();
        if publish.qos() == QoS::AtMostOnce {
            self.write_publish(publish);
            return Ok(id);
        }
        if self.outbound.queued() >= self.config.max_queued {
            return Err(CommandError::QueueFull(self.outbound.queued()));
        }
        self.outbound.push(id, publish, now);
        self.pump(now);
        Ok(id)
    }

    /// Ends the connection with DISCONNECT `reason` (MQTT 5), e.g. Session taken over (0x8E).
    pub fn disconnect(&mut self, reason: ReasonCode) -> Result<(), CommandError> {
        if self.state != State::Connected {
            return Err(CommandError::WrongState);
        }
        if self.writer.protocol().is_v5() {
            self.write(&Disconnect::new(reason).into());
        }
        let will = self.will.take();
        self.events.push_back(ServerEvent::Ended { reason: EndReason::Server(reason), will });
        self.state = State::Ended;
        Ok(())
    }

    /// The transport closed.
    pub fn handle_stream_closed(&mut self, _now: Instant) {
        if self.state != State::Ended {
            let will = self.will.take();
            self.events.push_back(ServerEvent::Ended { reason: EndReason::TransportLost, will });
            self.state = State::Ended;
        }
    }

    /// Bytes from the transport.
    pub fn handle_stream_data(&mut self, now: Instant, data: &[u8]) {
        if self.state == State::Ended {
            return;
        }
        self.inbuf.extend_from_slice(data);
        self.process(now);
    }

    /// Decodes and handles what is buffered. While the broker decides on CONNECT, a client may
    /// already have sent its next packets (clients need not wait for CONNACK): the first one
    /// that is not AUTH is held, with everything after it left undecoded, until `accept`.
    fn process(&mut self, now: Instant) {
        loop {
            if self.state == State::Deciding && self.held.is_some() {
                // Waiting for the broker (enhanced authentication can take a while): what the
                // client sends meanwhile is kept, but not without bound.
                if self.inbuf.len() > self.config.maximum_packet_size as usize {
                    self.violation(ReasonCode::QuotaExceeded);
                }
                break;
            }
            match self.decoder.decode(&mut self.inbuf) {
                Ok(Some(packet)) => {
                    self.touch(now);
                    if self.state == State::Deciding && !matches!(packet, Packet::Auth(_)) {
                        self.held = Some(packet);
                    } else {
                        self.handle_packet(now, packet);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    self.decode_error(e);
                    break;
                }
            }
            if matches!(self.state, State::Ended) {
                break;
            }
        }
    }

    /// Fires the connect timeout and the keep-alive (one and a half times the interval, spec
    /// 3.1.2.10).
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.deadline.fire(now) {
            match self.state {
                State::AwaitConnect | State::Deciding => self.end(EndReason::ConnectTimeout),
                State::Connected => {
                    if self.writer.protocol().is_v5() {
                        self.write(&Disconnect::new(ReasonCode::KeepAliveTimeout).into());
                    }
                    self.end(EndReason::KeepAliveTimeout);
                }
                State::Ended => {}
            }
        }
        self.retry(now);
    }

    /// The next deadline.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let resend = match (self.retry_interval(), self.state) {
            (Some(interval), State::Connected) => self.outbound.next_resend(interval),
            _ => None,
        };
        earliest([self.deadline.at(), resend])
    }

    /// Timed redelivery (MQTT 3.1.1 only): resends what has waited a full interval for its
    /// answer, or gives the connection up when a message has used all its resends.
    fn retry(&mut self, now: Instant) {
        let Some(interval) = self.retry_interval() else { return };
        if self.state != State::Connected {
            return;
        }
        let mut due = Vec::new();
        let alive = self.outbound.due_resends(now, interval, self.config.max_retries, |p| due.push(p));
        for packet in due {
            self.write_packet(packet);
        }
        if !alive {
            self.end(EndReason::RetriesExhausted);
        }
    }

    /// Bytes written and not yet taken by [`ServerSession::poll_transmit`] (a broker counts
    /// them against the client's backlog while it hands the session many messages at once).
    pub fn buffered(&self) -> usize {
        self.writer.buffered()
    }

    /// Bytes to write to the transport.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.writer.take()
    }

    /// The packets received and sent since the last call, by type (the broker adds them up for
    /// its metrics).
    pub fn take_packet_counts(&mut self) -> crate::session::packet_counts::PacketCounts {
        std::mem::take(&mut self.packets)
    }

    /// The next event.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        self.events.pop_front()
    }

    fn touch(&mut self, now: Instant) {
        if self.state == State::Connected {
            self.deadline.set_after(now, (!self.keep_alive.is_zero()).then(|| self.keep_alive.mul_f32(1.5)));
        }
    }

    /// Writes a packet of ours (a PUBLISH through [`ServerSession::write_publish`]).
    fn write_packet(&mut self, packet: Packet) {
        match packet {
            Packet::Publish(publish) => self.write_publish(publish),
            packet => self.write(&packet),
        }
    }

    /// Writes a PUBLISH, with a topic alias where the client accepts them (what is kept for
    /// resending keeps its topic: aliases belong to one connection).
    fn write_publish(&mut self, mut publish: Publish) {
        let (protocol, max) = (self.writer.protocol(), self.writer.max() as usize);
        self.aliases_out.apply(&mut publish, |p| p.encoded_len(protocol).is_ok_and(|n| n <= max));
        self.write(&Packet::Publish(publish));
    }

    fn write(&mut self, packet: &Packet) {
        // Our packets are well formed, so the only way encoding fails is a size beyond what the
        // client accepts (PUBLISH sizes were checked by `publish`).
        if let Ok(written) = self.writer.write(packet) {
            // (Not written: the connection is cut off, and nothing goes out any more.)
            if written {
                self.packets.sent(packet.packet_type());
            }
            return;
        }
        // [MQTT-3.1.2-24]: nothing beyond the client's Maximum Packet Size. We send no reason
        // strings or user properties to drop, so a CONNACK or acknowledgement that does not fit
        // means the client's limit is too small to be served: say so with the smallest packet
        // that can carry 0x95 (if even that fits), then end.
        let code = ReasonCode::PacketTooLarge;
        let bare: Packet = match packet {
            Packet::ConnAck(_) => ConnAck { reason_code: code, ..Default::default() }.into(),
            _ => Disconnect::new(code).into(),
        };
        if !self.data_stream {
            let _ = self.writer.write(&bare);
        }
        self.writer.cut_off();
        self.end(EndReason::ProtocolViolation(code));
    }

    fn end(&mut self, reason: EndReason) {
        if self.state != State::Ended {
            self.state = State::Ended;
            self.deadline.clear();
            let will = self.will.take();
            self.events.push_back(ServerEvent::Ended { reason, will });
        }
    }

    /// The client broke the protocol: DISCONNECT with the code (MQTT 5, after CONNACK), or
    /// CONNACK with it when CONNECT itself is bad; then end.
    fn violation(&mut self, code: ReasonCode) {
        match self.state {
            State::Connected if self.writer.protocol().is_v5() && !self.data_stream => {
                self.write(&Disconnect::new(code).into())
            }
            State::AwaitConnect => self.write(&ConnAck { reason_code: code, ..Default::default() }.into()),
            _ => {}
        }
        self.end(EndReason::ProtocolViolation(code));
    }

    fn decode_error(&mut self, e: DecodeError) {
        if self.state == State::AwaitConnect {
            // CONNECT could not be read: answer in the version the client asked for when known.
            // An unsupported version gets the 3.1.1 code 1 / MQTT 5 0x84 [MQTT-3.1.2-2].
            if let DecodeError::UnsupportedProtocolLevel(l) = e {
                if l < 5 {
                    self.writer.set_protocol(Protocol::V3_1_1);
                }
            }
        }
        self.violation(e.reason_code());
    }

    /// Sends what the window allows: first what a resumed session still owes, then queued
    /// messages, within the client's Receive Maximum capped by ours.
    fn pump(&mut self, now: Instant) {
        if self.state != State::Connected {
            return;
        }
        let limit = self.window();
        let refuse = Self::refusal(self.writer.protocol(), self.writer.max());
        let timed = self.retry_interval().is_some();
        while let Some(step) = self.outbound.next_step(now, limit, true, &refuse) {
            let packet_id = match step {
                Step::Publish(publish) => {
                    let packet_id = publish.packet_id();
                    self.write_publish(publish);
                    packet_id
                }
                Step::Release(packet_id) => {
                    self.write(&Packet::PubRel(Ack::new(packet_id)));
                    Some(packet_id)
                }
                Step::Dropped { id, .. } => {
                    self.events.push_back(ServerEvent::Delivered { id });
                    None
                }
            };
            if let (true, Some(packet_id)) = (timed, packet_id) {
                self.outbound.note_sent(now, packet_id);
            }
        }
    }

    /// PUBACK or PUBCOMP.
    fn acknowledged(&mut self, now: Instant, packet_id: PacketId, qos: QoS, released: bool) {
        if let Some(id) = self.outbound.complete(packet_id, qos, released) {
            self.events.push_back(ServerEvent::Delivered { id });
            self.pump(now);
        }
    }

    fn handle_packet(&mut self, now: Instant, packet: Packet) {
        self.packets.received(packet.packet_type());
        match (self.state, packet) {
            (State::AwaitConnect, Packet::Connect(connect)) => self.on_connect(now, connect),
            // Anything before CONNECT: close without a word [MQTT-3.1.0-1].
            (State::AwaitConnect, _) => self.end(EndReason::ProtocolViolation(ReasonCode::ProtocolError)),
            (State::Deciding, Packet::Auth(auth)) => self.events.push_back(ServerEvent::Auth(auth)),
            (State::Deciding, _) => self.violation(ReasonCode::ProtocolError),
            (State::Connected, Packet::Publish(p)) => self.on_publish(p),
            (State::Connected, Packet::PubAck(ack)) => self.acknowledged(now, ack.packet_id, QoS::AtLeastOnce, false),
            (State::Connected, Packet::PubRec(ack)) => {
                match self.outbound.on_pubrec(ack.packet_id, ack.reason_code.is_error()) {
                    PubRec::Completed(id) => {
                        self.events.push_back(ServerEvent::Delivered { id });
                        self.pump(now);
                    }
                    PubRec::Release => {
                        self.write(&Packet::PubRel(Ack::new(ack.packet_id)));
                        if self.retry_interval().is_some() {
                            self.outbound.note_sent(now, ack.packet_id);
                        }
                    }
                    PubRec::Unknown => {
                        let mut rel = Ack::new(ack.packet_id);
                        rel.reason_code = ReasonCode::PacketIdentifierNotFound;
                        self.write(&Packet::PubRel(rel));
                    }
                }
            }
            (State::Connected, Packet::PubComp(ack)) => self.acknowledged(now, ack.packet_id, QoS::ExactlyOnce, true),
            (State::Connected, Packet::PubRel(ack)) => {
                let mut comp = Ack::new(ack.packet_id);
                if !self.inbound.release(ack.packet_id.get()) {
                    comp.reason_code = ReasonCode::PacketIdentifierNotFound;
                }
                self.write(&Packet::PubComp(comp));
            }
            (State::Connected, Packet::Subscribe(s)) => {
                let mut subscriptions: Vec<_> = s.subscriptions.iter().collect();
                if self.bridge {
                    for sub in &mut subscriptions {
                        sub.options.no_local = true;
                        sub.options.retain_as_published = true;
                    }
                }
                self.events.push_back(ServerEvent::Subscribe {
                    packet_id: s.packet_id,
                    subscription_id: s.properties.subscription_identifier,
                    subscriptions,
                })
            }
            (State::Connected, Packet::Unsubscribe(u)) => self
                .events
                .push_back(ServerEvent::Unsubscribe { packet_id: u.packet_id, filters: u.filters.iter().collect() }),
            (State::Connected, Packet::PingReq) => self.write(&Packet::PingResp),
            // The control stream's packets, on a data stream.
            (State::Connected, Packet::Disconnect(_) | Packet::Auth(_)) if self.data_stream => {
                self.violation(ReasonCode::ProtocolError)
            }
            (State::Connected, Packet::Disconnect(d)) => {
                if let Some(secs) = d.properties.session_expiry_interval {
                    // A session that was to end with the connection cannot be made to outlive
                    // it at DISCONNECT: that is a Protocol Error (3.14.2.2.2).
                    if self.connect_expiry == 0 && secs != 0 {
                        return self.violation(ReasonCode::ProtocolError);
                    }
                    self.events.push_back(ServerEvent::SessionExpiry(secs));
                }
                // A normal DISCONNECT discards the will [MQTT-3.14.4-3]; 0x04 asks for it.
                if d.reason_code != ReasonCode::DisconnectWithWill {
                    self.will = None;
                }
                self.end(EndReason::ClientDisconnect(d.reason_code));
            }
            (State::Connected, Packet::Auth(auth)) if self.writer.protocol().is_v5() => {
                self.events.push_back(ServerEvent::Auth(auth))
            }
            // A second CONNECT, or packets only a server sends.
            (State::Connected, _) => self.violation(ReasonCode::ProtocolError),
            (State::Ended, _) => {}
        }
    }

    fn on_connect(&mut self, now: Instant, connect: Box<Connect>) {
        self.writer.set_protocol(connect.protocol);
        self.decoder.set_protocol(connect.protocol);
        let v5 = connect.protocol.is_v5();
        // The client's limits hold from the first byte we answer, a refusal included
        // [MQTT-3.1.2-24] (found by the `server_session` fuzzer).
        let p = &*connect.properties;
        self.connect_expiry = p.session_expiry_interval.unwrap_or(0);
        self.bridge = connect.bridge && !v5;
        if v5 && self.config.outgoing_topic_aliases {
            self.aliases_out = OutgoingAliases::new(p.topic_alias_maximum.unwrap_or(0));
        }
        self.client_receive_maximum = p.receive_maximum.map_or(u16::MAX, |v| v.get());
        self.writer.set_max(p.maximum_packet_size.map_or(mqtt_proto::PROTOCOL_MAX_PACKET_SIZE, |v| v.get()));
        let id_len = connect.client_id.len();
        if id_len > self.config.max_client_id_len || (id_len == 0 && !v5 && !connect.clean_start) {
            // 3.1.1 rejects an empty id unless the session is clean [MQTT-3.1.3-8].
            self.state = State::Deciding;
            let _ = self.refuse(now, ReasonCode::ClientIdentifierNotValid);
            return;
        }
        // A will the server could not publish as asked is refused up front [MQTT-3.2.2-12]
        // [MQTT-3.2.2-13].
        if let Some(will) = &connect.will {
            let refusal = if will.qos > self.config.maximum_qos {
                Some(ReasonCode::QosNotSupported)
            } else if will.retain && !self.config.retain_available {
                Some(ReasonCode::RetainNotSupported)
            } else {
                None
            };
            if let Some(code) = refusal {
                self.state = State::Deciding;
                let _ = self.refuse(now, code);
                return;
            }
        }
        // Authentication Data belongs to an Authentication Method: alone it is a Protocol Error.
        if v5 && connect.properties.authentication_data.is_some() && connect.properties.authentication_method.is_none()
        {
            self.state = State::Deciding;
            let _ = self.refuse(now, ReasonCode::ProtocolError);
            return;
        }
        self.keep_alive = Duration::from_secs(u64::from(connect.keep_alive));
        self.will = connect.will.clone();
        self.state = State::Deciding;
        self.events.push_back(ServerEvent::Connect(connect));
    }

    fn on_publish(&mut self, mut publish: Publish) {
        // Subscription Identifiers are the server's to add per subscriber: a client that sends
        // one breaks the protocol [MQTT-3.3.4-6] (DISCONNECT 0x82), and nothing it sent goes on.
        if !publish.properties.subscription_identifiers.is_empty() {
            return self.violation(ReasonCode::ProtocolError);
        }
        if publish.qos() > self.config.maximum_qos {
            return self.violation(ReasonCode::QosNotSupported);
        }
        if publish.retain && !self.config.retain_available {
            return self.violation(ReasonCode::RetainNotSupported);
        }
        if let Err(code) = self.aliases.resolve(&mut publish, self.config.topic_alias_maximum) {
            return self.violation(code);
        }
        // The alias is this connection's business; the broker sees the topic.
        publish.properties.topic_alias = None;
        // QoS 1 and 2 publishes count against our Receive Maximum until acknowledged.
        let limit = self.config.receive_maximum;
        let arrival = match publish.qos_pid {
            QosPid::AtMostOnce => Arrival::New,
            QosPid::AtLeastOnce(id) => self.inbound.qos1(id.get(), limit),
            QosPid::ExactlyOnce(id) => self.inbound.qos2(id.get(), limit),
        };
        match (arrival, publish.qos_pid) {
            (Arrival::New, _) => self.events.push_back(ServerEvent::Publish(publish)),
            // A resend of a message already taken: acknowledged again, not delivered again.
            (Arrival::Duplicate, QosPid::ExactlyOnce(id)) => self.write(&Packet::PubRec(Ack::new(id))),
            (Arrival::Duplicate, _) => {}
            (Arrival::OverLimit, _) => self.violation(ReasonCode::ReceiveMaximumExceeded),
        }
    }

    /// Answers a QoS 1 or 2 [`ServerEvent::Publish`]: PUBACK or PUBREC with `reason` (Success,
    /// or why the broker would not take it, e.g. Not authorized). Every such event must be
    /// answered; until then the message counts against the Receive Maximum. QoS 0 needs none.
    pub fn acknowledge(&mut self, qos_pid: QosPid, reason: ReasonCode) {
        if self.state != State::Connected {
            return;
        }
        match qos_pid {
            QosPid::AtMostOnce => {}
            QosPid::AtLeastOnce(id) => {
                if self.inbound.ack_qos1(id.get()) {
                    let mut ack = Ack::new(id);
                    ack.reason_code = reason;
                    self.write(&Packet::PubAck(ack));
                }
            }
            QosPid::ExactlyOnce(id) => {
                if reason.is_error() {
                    // Refused: the exchange ends here, and the identifier is free again.
                    self.inbound.release(id.get());
                }
                let mut ack = Ack::new(id);
                ack.reason_code = reason;
                self.write(&Packet::PubRec(ack));
            }
        }
    }
}
