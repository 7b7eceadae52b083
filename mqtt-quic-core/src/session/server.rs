//! The server (broker) side of one connection: CONNECT first and once, keep-alive at 1.5x, the
//! limits it announced in CONNACK enforced with their reason codes, QoS 1 and 2 both ways.
//!
//! Decisions that need the broker's state (accept or refuse a CONNECT, grant subscriptions,
//! route messages) are events for the broker and commands back; the session does the protocol.

use super::alias_out::OutgoingAliases;
use super::packet_id::PacketIds;
use super::DEFAULT_WINDOW;
use bytes::{Bytes, BytesMut};
use mqtt_proto::{
    Ack, Auth, ConnAck, Connect, DecodeError, Decoder, Disconnect, MqttString, Packet, PacketId, Protocol, Publish,
    QoS, QosPid, ReasonCode, SubAck, Subscription, TopicFilter, TopicName, UnsubAck, Will,
};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};
use thiserror::Error;

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

/// Why a broker command was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ServerCommandError {
    /// The session is not in the state the command needs.
    #[error("not valid in this state of the connection")]
    WrongState,
    /// The message exceeds the client's Maximum Packet Size (drop it, as the spec says).
    #[error("packet of {size} bytes exceeds the client's maximum of {max}")]
    PacketTooLarge {
        /// Encoded size.
        size: usize,
        /// The client's limit.
        max: u32,
    },
    /// Too many messages are waiting for the client.
    #[error("queue for this client is full")]
    QueueFull,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitConnect,
    /// CONNECT reported; waiting for the broker's accept/refuse.
    Deciding,
    Connected,
    Ended,
}

/// What a broker keeps of a session between connections (when its expiry allows): the QoS 2
/// messages received but not yet released, and the messages for the client not yet
/// acknowledged. Take it with [`ServerSession::take_state`] when a connection ends; hand it to
/// [`ServerSession::resume`] when the client comes back.
#[derive(Debug, Clone, Default)]
pub struct SessionState {
    incoming_qos2: BTreeSet<u16>,
    /// Sent but unacknowledged: (packet id, PUBREL sent, request id, message).
    inflight: Vec<(PacketId, bool, u64, Publish)>,
    /// Waiting for an in-flight slot: (request id, message, when it was queued).
    queued: VecDeque<(u64, Publish, Instant)>,
    next_id: u64,
}

impl SessionState {
    /// Messages for the client not yet acknowledged.
    pub fn pending(&self) -> usize {
        self.inflight.len() + self.queued.len()
    }

    /// Drops the messages `keep` refuses: queued ones, and QoS 1 ones sent and not
    /// acknowledged. Returns how many were dropped. For a broker re-checking read rights when a
    /// session resumes, in case they changed while the client was away.
    pub fn retain_messages(&mut self, mut keep: impl FnMut(&Publish) -> bool) -> usize {
        let before = self.pending();
        // A QoS 2 message once sent stays whatever: the client may hold its packet identifier
        // in its receive state, and would take a new message under that identifier for a
        // duplicate.
        self.inflight.retain(|(_, released, _, p)| *released || p.qos() == QoS::ExactlyOnce || keep(p));
        self.queued.retain(|(_, p, _)| keep(p));
        before - self.pending()
    }

    /// Takes out the messages with these request ids (as returned by `publish`) for delivery
    /// elsewhere: queued ones, and QoS 1 ones already sent; their packet identifiers are freed.
    pub fn take_requests(&mut self, ids: &[u64]) -> Vec<Publish> {
        let mut out = Vec::new();
        self.inflight.retain(|(_, _, id, p)| {
            // A QoS 2 message once sent stays: its delivery completes with this client when it
            // comes back, and it never goes to another client [MQTT-4.8.2-4] [MQTT-4.8.2-5].
            let take = ids.contains(id) && p.qos() != QoS::ExactlyOnce;
            if take {
                out.push(p.clone());
            }
            !take
        });
        self.queued.retain(|(id, p, _)| {
            let take = ids.contains(id);
            if take {
                out.push(p.clone());
            }
            !take
        });
        out
    }

    /// Roughly the bytes the kept messages take (topics and payloads), for a broker's budget.
    pub fn bytes(&self) -> usize {
        let cost = |p: &Publish| message_cost(p);
        self.inflight.iter().map(|m| cost(&m.3)).sum::<usize>() + self.queued.iter().map(|m| cost(&m.1)).sum::<usize>()
    }

    /// Whether `max` messages wait already (see [`SessionState::enqueue`]).
    pub fn is_full(&self, max: usize) -> bool {
        self.pending() >= max
    }

    /// Makes every kept message own its bytes (see [`Publish::detached`]): messages routed to a
    /// live connection are slices of their publisher's receive buffer, which a session kept for
    /// days must not pin.
    pub fn detach_messages(&mut self) {
        for m in &mut self.inflight {
            m.3 = m.3.detached();
        }
        for m in &mut self.queued {
            m.1 = m.1.detached();
        }
    }

    /// Queues a message for a client that is offline; it goes out when the session resumes.
    /// Returns false (and drops the message) when `max` messages already wait.
    pub fn enqueue(&mut self, now: Instant, publish: Publish, max: usize) -> bool {
        if self.pending() >= max {
            return false;
        }
        self.next_id += 1;
        self.queued.push_back((self.next_id, publish, now));
        true
    }
}

/// What one kept message counts against a broker's byte budgets: its topic and payload, plus a
/// fixed allowance for the rest (properties are rare and small next to payloads).
pub fn message_cost(p: &Publish) -> usize {
    p.topic.as_str().len() + p.payload.len() + 64
}

/// The server side of one MQTT connection.
pub struct ServerSession {
    config: ServerSessionConfig,
    state: State,
    protocol: Protocol,
    decoder: Decoder,
    inbuf: BytesMut,
    out: BytesMut,
    events: VecDeque<ServerEvent>,
    will: Option<Will>,
    keep_alive: Duration,
    deadline: Option<Instant>,
    /// QoS 1 publishes reported to the broker and not yet acknowledged.
    unacked_qos1: BTreeSet<u16>,
    incoming_qos2: BTreeSet<u16>,
    aliases: BTreeMap<u16, TopicName>,
    client_receive_maximum: u16,
    client_maximum_packet_size: u32,
    ids: PacketIds,
    /// Our publishes in flight: (packet id, released (PUBREL sent), request id, message).
    inflight: Vec<(PacketId, bool, u64, Publish)>,
    /// How many of `inflight`, from the front, went out on this connection: all of them,
    /// except after a resume while the client's Receive Maximum holds some back.
    resent: usize,
    /// Session Expiry Interval for CONNACK, when it differs from the client's.
    announced_expiry: Option<u32>,
    /// Keep-alive the broker imposes on this client (see [`ServerSession::impose_keep_alive`]).
    imposed_keep_alive: Option<u16>,
    /// Our topic aliases towards the client.
    aliases_out: OutgoingAliases,
    /// The Session Expiry Interval of the client's CONNECT (0 when absent).
    connect_expiry: u32,
    /// Waiting for an in-flight slot: (request id, message, when it was queued).
    queued: VecDeque<(u64, Publish, Instant)>,
    next_id: u64,
    /// With timed redelivery (MQTT 3.1.1): per in-flight packet id, when it was last sent and
    /// how often it has been resent.
    resend: BTreeMap<u16, (Instant, u32)>,
    /// A packet that arrived after CONNECT while the broker was deciding on it.
    held: Option<Packet>,
    /// A packet could not fit the client's Maximum Packet Size: the session ended and writes
    /// nothing more.
    cut_off: bool,
}

impl ServerSession {
    /// A session for a connection that just opened; CONNECT is due within the connect timeout.
    pub fn new(now: Instant, config: ServerSessionConfig) -> ServerSession {
        ServerSession {
            decoder: Decoder::new(Protocol::V5).with_max_packet_size(config.maximum_packet_size),
            deadline: Some(now + config.connect_timeout),
            state: State::AwaitConnect,
            protocol: Protocol::V5,
            inbuf: BytesMut::new(),
            out: BytesMut::new(),
            events: VecDeque::new(),
            will: None,
            keep_alive: Duration::ZERO,
            unacked_qos1: BTreeSet::new(),
            incoming_qos2: BTreeSet::new(),
            aliases: BTreeMap::new(),
            client_receive_maximum: u16::MAX,
            client_maximum_packet_size: mqtt_proto::PROTOCOL_MAX_PACKET_SIZE,
            cut_off: false,
            resent: 0,
            announced_expiry: None,
            imposed_keep_alive: None,
            aliases_out: OutgoingAliases::default(),
            connect_expiry: 0,
            ids: PacketIds::default(),
            inflight: Vec::new(),
            queued: VecDeque::new(),
            next_id: 0,
            resend: BTreeMap::new(),
            held: None,
            config,
        }
    }

    /// The protocol the client speaks (known after CONNECT).
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// Whether the session has ended (the transport should be closed once drained).
    pub fn is_ended(&self) -> bool {
        self.state == State::Ended
    }

    /// Accepts the CONNECT, resuming a kept session: CONNACK says session present, and what the
    /// client had not acknowledged is sent again (PUBLISH with DUP, or PUBREL) before anything
    /// new [MQTT-4.4.0-1].
    pub fn resume(&mut self, now: Instant, state: SessionState) -> Result<(), ServerCommandError> {
        if self.state != State::Deciding {
            return Err(ServerCommandError::WrongState);
        }
        self.incoming_qos2 = state.incoming_qos2;
        self.queued = state.queued;
        self.next_id = state.next_id;
        // The identifiers in flight are taken before anything new is numbered, and their
        // messages go out right after CONNACK, ahead of what was queued meanwhile (found while
        // mapping CONFORMANCE.md: queued messages used to go first and could reuse an
        // identifier still in flight).
        for (packet_id, ..) in &state.inflight {
            self.ids.mark(*packet_id);
        }
        self.inflight = state.inflight;
        self.resent = 0;
        self.accept(now, true, None)
    }

    /// Most of our QoS 1 and 2 publishes unacknowledged at once: the client's Receive Maximum,
    /// capped by ours.
    fn window(&self) -> usize {
        usize::from(self.client_receive_maximum.min(self.config.max_inflight).max(1))
    }

    /// Whether the client's Maximum Packet Size rules this message out. Such a message is
    /// dropped unsent and treated as delivered [MQTT-3.1.2-25]: it was queued while the client
    /// was away, or in flight when it came back announcing a smaller maximum.
    fn too_large(&self, publish: &Publish) -> bool {
        publish.encoded_len(self.protocol).map_or(true, |n| n > self.client_maximum_packet_size as usize)
    }

    /// Resends, after a resume, what the client had not acknowledged: PUBLISH with DUP, or
    /// PUBREL, in the original order and within the client's Receive Maximum (the rest as
    /// acknowledgements make room) [MQTT-4.4.0-1] [MQTT-4.9.0-2].
    fn resend_inflight(&mut self, now: Instant) {
        while self.resent < self.inflight.len() && self.resent < self.window() {
            let (packet_id, released, id, publish) = &self.inflight[self.resent];
            let (packet_id, id) = (*packet_id, *id);
            let packet = if *released {
                Packet::PubRel(Ack::new(packet_id))
            } else if self.too_large(publish) {
                self.inflight.remove(self.resent);
                self.ids.release(packet_id);
                self.events.push_back(ServerEvent::Delivered { id });
                continue;
            } else {
                let mut p = publish.clone();
                p.dup = true;
                Packet::Publish(p)
            };
            self.write_packet(packet);
            self.sent(now, packet_id);
            self.resent += 1;
        }
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

    /// The session state to keep after the connection ended (see [`SessionState`]).
    pub fn take_state(&mut self) -> SessionState {
        self.resend.clear();
        SessionState {
            incoming_qos2: std::mem::take(&mut self.incoming_qos2),
            inflight: std::mem::take(&mut self.inflight),
            queued: std::mem::take(&mut self.queued),
            next_id: self.next_id,
        }
    }

    /// Accepts the CONNECT reported by [`ServerEvent::Connect`]. `assigned_client_id` must be
    /// given when the client sent an empty one (MQTT 5).
    pub fn accept(
        &mut self,
        now: Instant,
        session_present: bool,
        assigned_client_id: Option<&str>,
    ) -> Result<(), ServerCommandError> {
        if self.state != State::Deciding {
            return Err(ServerCommandError::WrongState);
        }
        let mut ack = ConnAck { session_present, ..Default::default() };
        if self.protocol.is_v5() {
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
    pub fn refuse(&mut self, _now: Instant, reason: ReasonCode) -> Result<(), ServerCommandError> {
        if self.state != State::Deciding {
            return Err(ServerCommandError::WrongState);
        }
        self.write(&ConnAck { reason_code: reason, ..Default::default() }.into());
        self.will = None;
        self.end(EndReason::Refused(reason));
        Ok(())
    }

    /// Answers a SUBSCRIBE.
    pub fn suback(&mut self, packet_id: PacketId, reason_codes: Vec<ReasonCode>) -> Result<(), ServerCommandError> {
        if self.state != State::Connected {
            return Err(ServerCommandError::WrongState);
        }
        self.write(&Packet::SubAck(SubAck {
            packet_id,
            properties: Default::default(),
            reason_codes: reason_codes.into_iter().collect(),
        }));
        Ok(())
    }

    /// Answers an UNSUBSCRIBE.
    pub fn unsuback(&mut self, packet_id: PacketId, reason_codes: Vec<ReasonCode>) -> Result<(), ServerCommandError> {
        if self.state != State::Connected {
            return Err(ServerCommandError::WrongState);
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
    pub fn publish(&mut self, now: Instant, mut publish: Publish) -> Result<u64, ServerCommandError> {
        if self.state != State::Connected {
            return Err(ServerCommandError::WrongState);
        }
        publish.dup = false;
        // A topic alias belongs to the connection it arrived on, never to this one.
        if publish.properties.topic_alias.is_some() {
            publish.properties.topic_alias = None;
        }
        let size = publish.encoded_len(self.protocol).unwrap_or(usize::MAX);
        if size > self.client_maximum_packet_size as usize {
            return Err(ServerCommandError::PacketTooLarge { size, max: self.client_maximum_packet_size });
        }
        self.next_id += 1;
        let id = self.next_id;
        if publish.qos() == QoS::AtMostOnce {
            self.write_packet(Packet::Publish(publish));
            return Ok(id);
        }
        if self.queued.len() >= self.config.max_queued {
            return Err(ServerCommandError::QueueFull);
        }
        self.queued.push_back((id, publish, now));
        self.pump(now);
        Ok(id)
    }

    /// Ends the connection with DISCONNECT `reason` (MQTT 5), e.g. Session taken over (0x8E).
    pub fn disconnect(&mut self, reason: ReasonCode) -> Result<(), ServerCommandError> {
        if self.state != State::Connected {
            return Err(ServerCommandError::WrongState);
        }
        if self.protocol.is_v5() {
            self.write(&Disconnect::new(reason).into());
        }
        let will = self.will.take();
        self.events.push_back(ServerEvent::Ended { reason: EndReason::Server(reason), will });
        self.state = State::Ended;
        Ok(())
    }

    /// The transport closed.
    pub fn connection_lost(&mut self) {
        if self.state != State::Ended {
            let will = self.will.take();
            self.events.push_back(ServerEvent::Ended { reason: EndReason::TransportLost, will });
            self.state = State::Ended;
        }
    }

    /// Bytes from the transport.
    pub fn handle_bytes(&mut self, now: Instant, data: &[u8]) {
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
        if self.deadline.is_some_and(|d| d <= now) {
            self.deadline = None;
            match self.state {
                State::AwaitConnect | State::Deciding => self.end(EndReason::ConnectTimeout),
                State::Connected => {
                    if self.protocol.is_v5() {
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
    pub fn poll_timeout(&self) -> Option<Instant> {
        let resend = match (self.config.retry_interval, self.state) {
            (Some(interval), State::Connected) => self.resend.values().map(|(at, _)| *at + interval).min(),
            _ => None,
        };
        [self.deadline, resend].into_iter().flatten().min()
    }

    /// Notes that an in-flight message (or its PUBREL) went out, for timed redelivery.
    fn sent(&mut self, now: Instant, packet_id: PacketId) {
        if self.config.retry_interval.is_some() && !self.protocol.is_v5() {
            let retries = self.resend.get(&packet_id.get()).map_or(0, |r| r.1);
            self.resend.insert(packet_id.get(), (now, retries));
        }
    }

    /// Timed redelivery (MQTT 3.1.1 only): resends what has waited a full interval for its
    /// answer, or gives the connection up when a message has used all its resends.
    fn retry(&mut self, now: Instant) {
        let Some(interval) = self.config.retry_interval else { return };
        if self.state != State::Connected {
            return;
        }
        let due: Vec<u16> =
            self.resend.iter().filter(|(_, (at, _))| *at + interval <= now).map(|(id, _)| *id).collect();
        for id in due {
            let Some(entry) = self.resend.get_mut(&id) else { continue };
            if entry.1 >= self.config.max_retries {
                self.end(EndReason::RetriesExhausted);
                return;
            }
            *entry = (now, entry.1 + 1);
            let packet = self.inflight.iter().find(|(pid, ..)| pid.get() == id).map(|(pid, released, _, p)| {
                if *released {
                    Packet::PubRel(Ack::new(*pid))
                } else {
                    let mut p = p.clone();
                    p.dup = true;
                    Packet::Publish(p)
                }
            });
            match packet {
                Some(packet) => self.write_packet(packet),
                None => drop(self.resend.remove(&id)),
            }
        }
    }

    /// Bytes written and not yet taken by [`ServerSession::poll_transmit`] (a broker counts
    /// them against the client's backlog while it hands the session many messages at once).
    pub fn buffered(&self) -> usize {
        self.out.len()
    }

    /// Bytes to write to the transport.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        (!self.out.is_empty()).then(|| self.out.split().freeze())
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        self.events.pop_front()
    }

    fn touch(&mut self, now: Instant) {
        if self.state == State::Connected {
            self.deadline = (!self.keep_alive.is_zero()).then(|| now + self.keep_alive.mul_f32(1.5));
        }
    }

    /// Writes a packet of ours, a PUBLISH with a topic alias where the client accepts them
    /// (what is kept for resending keeps its topic: aliases belong to one connection).
    fn write_packet(&mut self, packet: Packet) {
        let Packet::Publish(mut publish) = packet else { return self.write(&packet) };
        let (protocol, max) = (self.protocol, self.client_maximum_packet_size as usize);
        self.aliases_out.apply(&mut publish, |p| p.encoded_len(protocol).is_ok_and(|n| n <= max));
        self.write(&Packet::Publish(publish));
    }

    fn write(&mut self, packet: &Packet) {
        if self.cut_off {
            return;
        }
        let max = self.client_maximum_packet_size as usize;
        // Our packets are well formed, so the only way encoding fails is a size beyond what the
        // client accepts (PUBLISH sizes were checked by `publish`).
        if packet.encoded_len(self.protocol).is_ok_and(|n| n <= max) {
            let _ = packet.encode(self.protocol, &mut self.out);
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
        if bare.encoded_len(self.protocol).is_ok_and(|n| n <= max) {
            let _ = bare.encode(self.protocol, &mut self.out);
        }
        self.cut_off = true;
        self.end(EndReason::ProtocolViolation(code));
    }

    fn end(&mut self, reason: EndReason) {
        if self.state != State::Ended {
            self.state = State::Ended;
            self.deadline = None;
            let will = self.will.take();
            self.events.push_back(ServerEvent::Ended { reason, will });
        }
    }

    /// The client broke the protocol: DISCONNECT with the code (MQTT 5, after CONNACK), or
    /// CONNACK with it when CONNECT itself is bad; then end.
    fn violation(&mut self, code: ReasonCode) {
        match self.state {
            State::Connected if self.protocol.is_v5() => self.write(&Disconnect::new(code).into()),
            State::AwaitConnect => self.write(&ConnAck { reason_code: code, ..Default::default() }.into()),
            _ => {}
        }
        self.end(EndReason::ProtocolViolation(code));
    }

    fn decode_error(&mut self, e: DecodeError) {
        if self.state == State::AwaitConnect {
            // CONNECT could not be read: answer in the version the client asked for when known.
            // An unsupported version gets the 3.1.1 code 1 / MQTT 5 0x84 [MQTT-3.1.2-2].
            self.protocol = match e {
                DecodeError::UnsupportedProtocolLevel(l) if l < 5 => Protocol::V3_1_1,
                _ => self.protocol,
            };
        }
        self.violation(e.reason_code());
    }

    fn pump(&mut self, now: Instant) {
        if self.state != State::Connected {
            return;
        }
        self.resend_inflight(now);
        if self.resent < self.inflight.len() {
            // Messages from before the resume go first.
            return;
        }
        while self.inflight.len() < self.window() {
            let Some((id, mut publish, queued_at)) = self.queued.pop_front() else { break };
            if self.too_large(&publish) {
                self.events.push_back(ServerEvent::Delivered { id });
                continue;
            }
            // Message expiry counts down while queued [MQTT-3.3.2-5, MQTT-3.3.2-6]: an expired
            // message is dropped, a live one goes out with what is left of its interval.
            if let Some(secs) = publish.properties.message_expiry_interval {
                let waited = now.saturating_duration_since(queued_at).as_secs();
                match u64::from(secs).checked_sub(waited).filter(|left| *left > 0) {
                    Some(left) => publish.properties.message_expiry_interval = Some(left as u32),
                    None => continue,
                }
            }
            let Some(packet_id) = self.ids.allocate() else {
                self.queued.push_front((id, publish, queued_at));
                break;
            };
            publish.qos_pid = QosPid::from_parts(publish.qos(), packet_id);
            self.write_packet(Packet::Publish(publish.clone()));
            self.sent(now, packet_id);
            self.inflight.push((packet_id, false, id, publish));
            self.resent = self.inflight.len();
        }
    }

    fn acknowledged(&mut self, now: Instant, packet_id: PacketId, qos: QoS, released: bool) {
        let found =
            self.inflight.iter().position(|(id, rel, _, p)| *id == packet_id && *rel == released && p.qos() == qos);
        if let Some(i) = found {
            let (packet_id, _, id, _) = self.inflight.remove(i);
            if i < self.resent {
                self.resent -= 1;
            }
            self.resend.remove(&packet_id.get());
            self.ids.release(packet_id);
            self.events.push_back(ServerEvent::Delivered { id });
            self.pump(now);
        }
    }

    fn handle_packet(&mut self, now: Instant, packet: Packet) {
        match (self.state, packet) {
            (State::AwaitConnect, Packet::Connect(connect)) => self.on_connect(now, connect),
            // Anything before CONNECT: close without a word [MQTT-3.1.0-1].
            (State::AwaitConnect, _) => self.end(EndReason::ProtocolViolation(ReasonCode::ProtocolError)),
            (State::Deciding, Packet::Auth(auth)) => self.events.push_back(ServerEvent::Auth(auth)),
            (State::Deciding, _) => self.violation(ReasonCode::ProtocolError),
            (State::Connected, Packet::Publish(p)) => self.on_publish(p),
            (State::Connected, Packet::PubAck(ack)) => self.acknowledged(now, ack.packet_id, QoS::AtLeastOnce, false),
            (State::Connected, Packet::PubRec(ack)) => {
                let found = self
                    .inflight
                    .iter_mut()
                    .find(|(id, rel, _, p)| *id == ack.packet_id && !*rel && p.qos() == QoS::ExactlyOnce);
                match found {
                    Some(entry) if ack.reason_code.is_error() => {
                        entry.1 = true;
                        self.acknowledged(now, ack.packet_id, QoS::ExactlyOnce, true);
                    }
                    Some(entry) => {
                        entry.1 = true;
                        self.write(&Packet::PubRel(Ack::new(ack.packet_id)));
                        self.sent(now, ack.packet_id);
                    }
                    None => {
                        let mut rel = Ack::new(ack.packet_id);
                        rel.reason_code = ReasonCode::PacketIdentifierNotFound;
                        self.write(&Packet::PubRel(rel));
                    }
                }
            }
            (State::Connected, Packet::PubComp(ack)) => self.acknowledged(now, ack.packet_id, QoS::ExactlyOnce, true),
            (State::Connected, Packet::PubRel(ack)) => {
                let mut comp = Ack::new(ack.packet_id);
                if !self.incoming_qos2.remove(&ack.packet_id.get()) {
                    comp.reason_code = ReasonCode::PacketIdentifierNotFound;
                }
                self.write(&Packet::PubComp(comp));
            }
            (State::Connected, Packet::Subscribe(s)) => self.events.push_back(ServerEvent::Subscribe {
                packet_id: s.packet_id,
                subscription_id: s.properties.subscription_identifier,
                subscriptions: s.subscriptions.iter().collect(),
            }),
            (State::Connected, Packet::Unsubscribe(u)) => self
                .events
                .push_back(ServerEvent::Unsubscribe { packet_id: u.packet_id, filters: u.filters.iter().collect() }),
            (State::Connected, Packet::PingReq) => self.write(&Packet::PingResp),
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
            (State::Connected, Packet::Auth(auth)) if self.protocol.is_v5() => {
                self.events.push_back(ServerEvent::Auth(auth))
            }
            // A second CONNECT, or packets only a server sends.
            (State::Connected, _) => self.violation(ReasonCode::ProtocolError),
            (State::Ended, _) => {}
        }
    }

    fn on_connect(&mut self, now: Instant, connect: Box<Connect>) {
        self.protocol = connect.protocol;
        self.decoder.set_protocol(connect.protocol);
        let v5 = self.protocol.is_v5();
        // The client's limits hold from the first byte we answer, a refusal included
        // [MQTT-3.1.2-24] (found by the `server_session` fuzzer).
        let p = &*connect.properties;
        self.connect_expiry = p.session_expiry_interval.unwrap_or(0);
        if v5 && self.config.outgoing_topic_aliases {
            self.aliases_out = OutgoingAliases::new(p.topic_alias_maximum.unwrap_or(0));
        }
        self.client_receive_maximum = p.receive_maximum.map_or(u16::MAX, |v| v.get());
        self.client_maximum_packet_size =
            p.maximum_packet_size.map_or(mqtt_proto::PROTOCOL_MAX_PACKET_SIZE, |v| v.get());
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
        if let Some(alias) = publish.properties.topic_alias {
            if alias.get() > self.config.topic_alias_maximum {
                return self.violation(ReasonCode::TopicAliasInvalid);
            }
            if publish.topic.is_empty() {
                match self.aliases.get(&alias.get()) {
                    Some(t) => publish.topic = t.clone(),
                    None => return self.violation(ReasonCode::ProtocolError),
                }
            } else {
                self.aliases.insert(alias.get(), publish.topic.clone());
            }
            // The alias is this connection's business; the broker sees the topic.
            publish.properties.topic_alias = None;
        }
        // QoS 1 and 2 publishes count against our Receive Maximum until acknowledged.
        let unacknowledged = self.unacked_qos1.len() + self.incoming_qos2.len();
        match publish.qos_pid {
            QosPid::AtMostOnce => self.events.push_back(ServerEvent::Publish(publish)),
            QosPid::AtLeastOnce(id) => {
                if unacknowledged >= usize::from(self.config.receive_maximum) && !self.unacked_qos1.contains(&id.get())
                {
                    return self.violation(ReasonCode::ReceiveMaximumExceeded);
                }
                self.unacked_qos1.insert(id.get());
                self.events.push_back(ServerEvent::Publish(publish));
            }
            QosPid::ExactlyOnce(id) => {
                if self.incoming_qos2.contains(&id.get()) {
                    // A resend of a message already taken: acknowledged again, not delivered again.
                    self.write(&Packet::PubRec(Ack::new(id)));
                    return;
                }
                if unacknowledged >= usize::from(self.config.receive_maximum) {
                    return self.violation(ReasonCode::ReceiveMaximumExceeded);
                }
                self.incoming_qos2.insert(id.get());
                self.events.push_back(ServerEvent::Publish(publish));
            }
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
                if self.unacked_qos1.remove(&id.get()) {
                    let mut ack = Ack::new(id);
                    ack.reason_code = reason;
                    self.write(&Packet::PubAck(ack));
                }
            }
            QosPid::ExactlyOnce(id) => {
                if reason.is_error() {
                    // Refused: the exchange ends here, and the identifier is free again.
                    self.incoming_qos2.remove(&id.get());
                }
                let mut ack = Ack::new(id);
                ack.reason_code = reason;
                self.write(&Packet::PubRec(ack));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqtt_proto::{Subscribe, SubscriptionOptions};
    use std::num::NonZeroU16;

    struct Harness {
        session: ServerSession,
        client: Decoder,
        protocol: Protocol,
        now: Instant,
    }

    impl Harness {
        fn new(config: ServerSessionConfig) -> Harness {
            #[allow(clippy::disallowed_methods)]
            let now = Instant::now();
            Harness {
                session: ServerSession::new(now, config),
                client: Decoder::new(Protocol::V5),
                protocol: Protocol::V5,
                now,
            }
        }

        /// Connected with `connect`, accepted.
        fn connected(config: ServerSessionConfig, connect: Connect) -> Harness {
            let mut h = Harness::new(config);
            h.protocol = connect.protocol;
            h.client.set_protocol(connect.protocol);
            h.feed(connect.into());
            assert!(matches!(h.events()[..], [ServerEvent::Connect(_)]));
            h.session.accept(h.now, false, None).unwrap();
            assert!(matches!(h.sent()[..], [Packet::ConnAck(_)]));
            h
        }

        fn v5() -> Harness {
            Harness::connected(ServerSessionConfig::default(), connect(Protocol::V5))
        }

        fn feed(&mut self, packet: Packet) {
            let mut b = BytesMut::new();
            packet.encode(self.protocol, &mut b).unwrap();
            self.session.handle_bytes(self.now, &b);
        }

        fn sent(&mut self) -> Vec<Packet> {
            let mut buf = BytesMut::new();
            while let Some(b) = self.session.poll_transmit() {
                buf.extend_from_slice(&b);
            }
            std::iter::from_fn(|| self.client.decode(&mut buf).unwrap()).collect()
        }

        fn events(&mut self) -> Vec<ServerEvent> {
            std::iter::from_fn(|| self.session.poll_event()).collect()
        }

        fn advance(&mut self, d: Duration) {
            self.now += d;
            self.session.handle_timeout(self.now);
        }
    }

    fn connect(protocol: Protocol) -> Connect {
        let mut c = Connect::new(protocol, MqttString::from_static("dev"));
        c.keep_alive = 10;
        c
    }

    fn publish(topic: &str, qos: QoS, id: u16) -> Publish {
        let mut p = Publish::new(TopicName::new(topic).unwrap(), &b"m"[..]);
        p.qos_pid = QosPid::from_parts(qos, PacketId::new(id).unwrap());
        p
    }

    fn ended(h: &mut Harness) -> Option<EndReason> {
        h.events().into_iter().find_map(|e| match e {
            ServerEvent::Ended { reason, .. } => Some(reason),
            _ => None,
        })
    }

    #[test]
    fn timed_redelivery_is_for_mqtt_3_1_1_only_and_gives_up_after_max_retries() {
        let config = || ServerSessionConfig {
            retry_interval: Some(Duration::from_secs(5)),
            max_retries: 2,
            ..Default::default()
        };
        // MQTT 3.1.1: a QoS 1 message unacknowledged for 5 s goes out again with DUP.
        let mut v3 = connect(Protocol::V3_1_1);
        v3.keep_alive = 0;
        let mut h = Harness::connected(config(), v3);
        h.session.publish(h.now, publish("a", QoS::AtLeastOnce, 1)).unwrap();
        let Packet::Publish(first) = h.sent().remove(0) else { panic!() };
        assert!(!first.dup);
        assert_eq!(h.session.poll_timeout(), Some(h.now + Duration::from_secs(5)));
        h.advance(Duration::from_secs(4));
        assert!(h.sent().is_empty(), "resent early");
        h.advance(Duration::from_secs(1));
        let Packet::Publish(again) = h.sent().remove(0) else { panic!() };
        assert!(again.dup);
        assert_eq!(again.packet_id(), first.packet_id());
        // A QoS 2 message: after PUBREC it is the PUBREL that is resent.
        h.session.publish(h.now, publish("b", QoS::ExactlyOnce, 1)).unwrap();
        let Packet::Publish(q2) = h.sent().remove(0) else { panic!() };
        h.feed(Packet::PubRec(Ack::new(q2.packet_id().unwrap())));
        assert!(matches!(h.sent()[..], [Packet::PubRel(_)]));
        h.feed(Packet::PubAck(Ack::new(first.packet_id().unwrap())));
        h.advance(Duration::from_secs(5));
        assert_eq!(h.sent(), [Packet::PubRel(Ack::new(q2.packet_id().unwrap()))]);
        // Two resends used up: the third deadline ends the connection.
        h.advance(Duration::from_secs(5));
        assert_eq!(h.sent().len(), 1);
        assert_eq!(ended(&mut h), None);
        h.advance(Duration::from_secs(5));
        assert_eq!(ended(&mut h), Some(EndReason::RetriesExhausted));

        // MQTT 5: never resent on a live connection, whatever the setting.
        let mut h = Harness::connected(config(), connect(Protocol::V5));
        h.session.publish(h.now, publish("a", QoS::AtLeastOnce, 1)).unwrap();
        assert_eq!(h.sent().len(), 1);
        for _ in 0..4 {
            h.advance(Duration::from_secs(5));
        }
        assert!(!h.sent().iter().any(|p| matches!(p, Packet::Publish(_))), "MQTT 5 message resent");
        assert_eq!(ended(&mut h), Some(EndReason::KeepAliveTimeout));
    }

    #[test]
    fn connack_announces_the_limits() {
        let config = ServerSessionConfig {
            receive_maximum: 5,
            topic_alias_maximum: 3,
            maximum_qos: QoS::AtLeastOnce,
            ..Default::default()
        };
        let mut h = Harness::new(config);
        h.feed(connect(Protocol::V5).into());
        let Some(ServerEvent::Connect(c)) = h.session.poll_event() else { panic!() };
        assert_eq!(c.client_id, "dev");
        h.session.accept(h.now, true, None).unwrap();
        let Packet::ConnAck(ack) = h.sent().remove(0) else { panic!() };
        assert!(ack.session_present);
        assert_eq!(ack.properties.receive_maximum, NonZeroU16::new(5));
        assert_eq!(ack.properties.topic_alias_maximum, Some(3));
        assert_eq!(ack.properties.maximum_qos, Some(QoS::AtLeastOnce));
        // The CONNECT named no authentication method: none in CONNACK either [MQTT-4.12.0-6].
        assert_eq!(ack.properties.authentication_method, None);
        assert_eq!(ack.properties.authentication_data, None);
    }

    #[test]
    fn packets_pipelined_after_connect_wait_for_the_decision() {
        let mut h = Harness::new(ServerSessionConfig::default());
        let mut b = BytesMut::new();
        Packet::from(connect(Protocol::V5)).encode(Protocol::V5, &mut b).unwrap();
        let sub = Subscribe {
            packet_id: PacketId::MIN,
            properties: Default::default(),
            subscriptions: [mqtt_proto::Subscription::new(TopicFilter::new("a").unwrap(), QoS::AtMostOnce)]
                .into_iter()
                .collect(),
        };
        Packet::from(sub).encode(Protocol::V5, &mut b).unwrap();
        Packet::PingReq.encode(Protocol::V5, &mut b).unwrap();
        h.session.handle_bytes(h.now, &b);
        assert!(matches!(h.events()[..], [ServerEvent::Connect(_)]), "handled before the decision");
        assert!(h.sent().is_empty());
        h.session.accept(h.now, false, None).unwrap();
        assert!(matches!(h.events()[..], [ServerEvent::Subscribe { .. }]));
        assert!(matches!(h.sent()[..], [Packet::ConnAck(_), Packet::PingResp]));
    }

    #[test]
    fn what_waits_behind_an_undecided_connect_is_bounded() {
        let config = ServerSessionConfig { maximum_packet_size: 1000, ..Default::default() };
        let mut h = Harness::new(config);
        let mut b = BytesMut::new();
        Packet::from(connect(Protocol::V5)).encode(Protocol::V5, &mut b).unwrap();
        Packet::PingReq.encode(Protocol::V5, &mut b).unwrap();
        h.session.handle_bytes(h.now, &b);
        assert!(matches!(h.events()[..], [ServerEvent::Connect(_)]));
        // The broker has not decided; the client keeps sending.
        for _ in 0..600 {
            h.session.handle_bytes(h.now, &[0xC0, 0x00]);
        }
        assert_eq!(ended(&mut h), Some(EndReason::ProtocolViolation(ReasonCode::QuotaExceeded)));
    }

    #[test]
    fn connect_must_come_first_and_once() {
        let mut h = Harness::new(ServerSessionConfig::default());
        h.feed(Packet::PingReq);
        assert!(h.sent().is_empty(), "closed without a word");
        assert_eq!(ended(&mut h), Some(EndReason::ProtocolViolation(ReasonCode::ProtocolError)));

        let mut h = Harness::v5();
        h.feed(connect(Protocol::V5).into());
        assert_eq!(h.sent(), [Disconnect::new(ReasonCode::ProtocolError).into()]);
    }

    #[test]
    fn unsupported_version_gets_the_refusal_its_client_can_read() {
        let answer = |level: u8| {
            let mut h = Harness::new(ServerSessionConfig::default());
            h.session.handle_bytes(h.now, &[0x10, 0x0C, 0, 4, b'M', b'Q', b'T', b'T', level, 0x02, 0, 60, 0, 0]);
            let mut buf = BytesMut::new();
            while let Some(b) = h.session.poll_transmit() {
                buf.extend_from_slice(&b);
            }
            assert!(h.session.is_ended());
            buf.to_vec()
        };
        // An older client reads a 3.1.1 CONNACK: return code 1, unacceptable protocol version.
        assert_eq!(answer(2), [0x20, 2, 0, 1]);
        // A newer one is answered as MQTT 5: 0x84 Unsupported Protocol Version.
        assert_eq!(answer(6), [0x20, 3, 0, 0x84, 0]);
    }

    #[test]
    fn a_will_with_a_wildcard_topic_is_refused_with_0x90() {
        let mut h = Harness::new(ServerSessionConfig::default());
        // CONNECT (MQTT 5) with a will on "a/#".
        let mut bytes = vec![
            0x10, 0, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x06, 0, 60, 0, 0, 1, b'c', 0, 0, 3, b'a', b'/', b'#', 0, 1, b'x',
        ];
        bytes[1] = (bytes.len() - 2) as u8;
        h.session.handle_bytes(h.now, &bytes);
        assert_eq!(h.sent(), [ConnAck { reason_code: ReasonCode::TopicNameInvalid, ..Default::default() }.into()]);
        assert!(h.session.is_ended());
    }

    #[test]
    fn empty_client_id_without_clean_session_is_rejected_in_311() {
        let mut c = Connect::new(Protocol::V3_1_1, MqttString::default());
        c.clean_start = false;
        let mut h = Harness::new(ServerSessionConfig::default());
        h.protocol = Protocol::V3_1_1;
        h.client.set_protocol(Protocol::V3_1_1);
        h.feed(c.into());
        assert_eq!(
            h.sent(),
            [ConnAck { reason_code: ReasonCode::ClientIdentifierNotValid, ..Default::default() }.into()]
        );
    }

    #[test]
    fn kept_messages_can_be_detached_from_their_receive_buffers() {
        let buffer = Bytes::from(vec![0u8; 1 << 20]);
        let mut state = SessionState::default();
        let m = Publish::new(TopicName::new("t").unwrap(), buffer.slice(..10)).with_qos(QoS::AtLeastOnce);
        #[allow(clippy::disallowed_methods)]
        let now = Instant::now();
        assert!(state.enqueue(now, m, 10));
        assert!(!buffer.is_unique());
        state.detach_messages();
        assert!(buffer.is_unique(), "the kept message holds its own 10 bytes");
        assert_eq!(state.bytes(), 1 + 10 + 64);
        assert!(state.is_full(1) && !state.is_full(2));
    }

    #[test]
    fn keep_alive_is_enforced_at_one_and_a_half_times() {
        let mut h = Harness::v5();
        h.advance(Duration::from_secs(14));
        h.feed(Packet::PingReq);
        assert_eq!(h.sent(), [Packet::PingResp]);
        h.advance(Duration::from_secs(14));
        assert!(ended(&mut h).is_none(), "activity restarts the clock");
        h.advance(Duration::from_secs(1));
        assert_eq!(h.sent(), [Disconnect::new(ReasonCode::KeepAliveTimeout).into()]);
        assert_eq!(ended(&mut h), Some(EndReason::KeepAliveTimeout));
    }

    #[test]
    fn connect_timeout() {
        let mut h = Harness::new(ServerSessionConfig::default());
        h.advance(Duration::from_secs(10));
        assert_eq!(ended(&mut h), Some(EndReason::ConnectTimeout));
    }

    #[test]
    fn limits_are_enforced_with_their_reason_codes() {
        let config = || ServerSessionConfig {
            receive_maximum: 2,
            maximum_packet_size: 100,
            topic_alias_maximum: 1,
            maximum_qos: QoS::AtLeastOnce,
            retain_available: false,
            ..Default::default()
        };
        let cases: Vec<(Vec<Packet>, ReasonCode)> = vec![
            (vec![Packet::Publish(publish("t", QoS::ExactlyOnce, 1))], ReasonCode::QosNotSupported),
            (
                vec![Packet::Publish({
                    let mut p = publish("t", QoS::AtMostOnce, 1);
                    p.retain = true;
                    p
                })],
                ReasonCode::RetainNotSupported,
            ),
            (
                vec![Packet::Publish(Publish::new(TopicName::new("t").unwrap(), vec![0u8; 200]))],
                ReasonCode::PacketTooLarge,
            ),
            (
                vec![Packet::Publish({
                    let mut p = publish("t", QoS::AtMostOnce, 1);
                    p.properties.topic_alias = NonZeroU16::new(2);
                    p
                })],
                ReasonCode::TopicAliasInvalid,
            ),
        ];
        for (packets, code) in cases {
            let mut h = Harness::connected(config(), connect(Protocol::V5));
            for p in packets {
                h.feed(p);
            }
            assert_eq!(h.sent(), [Disconnect::new(code).into()], "{code}");
            assert_eq!(ended(&mut h), Some(EndReason::ProtocolViolation(code)));
        }
    }

    #[test]
    fn receive_maximum_is_enforced_with_0x93() {
        let config = ServerSessionConfig { receive_maximum: 2, ..Default::default() };
        let mut h = Harness::connected(config, connect(Protocol::V5));
        // A QoS 1 message not yet acknowledged counts too.
        h.feed(Packet::Publish(publish("t", QoS::AtLeastOnce, 1)));
        h.feed(Packet::Publish(publish("t", QoS::ExactlyOnce, 2)));
        h.feed(Packet::Publish(publish("t", QoS::ExactlyOnce, 3)));
        assert_eq!(h.sent().last(), Some(&Disconnect::new(ReasonCode::ReceiveMaximumExceeded).into()));
    }

    #[test]
    fn the_broker_decides_the_acknowledgement() {
        let mut h = Harness::v5();
        let q1 = publish("t", QoS::AtLeastOnce, 1);
        h.feed(Packet::Publish(q1.clone()));
        assert!(h.sent().is_empty(), "no PUBACK before the broker answers");
        h.session.acknowledge(q1.qos_pid, ReasonCode::NotAuthorized);
        let mut refused = Ack::new(PacketId::new(1).unwrap());
        refused.reason_code = ReasonCode::NotAuthorized;
        assert_eq!(h.sent(), [Packet::PubAck(refused)]);
        // A refused QoS 2 message frees its identifier: the same id is a new message.
        let q2 = publish("t", QoS::ExactlyOnce, 2);
        h.feed(Packet::Publish(q2.clone()));
        h.session.acknowledge(q2.qos_pid, ReasonCode::QuotaExceeded);
        h.sent();
        h.events();
        h.feed(Packet::Publish(q2));
        assert!(h.events().iter().any(|e| matches!(e, ServerEvent::Publish(_))));
    }

    #[test]
    fn incoming_qos2_is_delivered_once() {
        let mut h = Harness::v5();
        let p = publish("t", QoS::ExactlyOnce, 4);
        h.feed(Packet::Publish(p.clone()));
        h.session.acknowledge(p.qos_pid, ReasonCode::Success);
        h.feed(Packet::Publish(p.clone()));
        let delivered = h.events().into_iter().filter(|e| matches!(e, ServerEvent::Publish(_))).count();
        assert_eq!(delivered, 1);
        let id = PacketId::new(4).unwrap();
        assert_eq!(h.sent(), [Packet::PubRec(Ack::new(id)), Packet::PubRec(Ack::new(id))]);
        h.feed(Packet::PubRel(Ack::new(id)));
        assert_eq!(h.sent(), [Packet::PubComp(Ack::new(id))]);
    }

    #[test]
    fn outbound_flows_respect_the_client_receive_maximum() {
        let mut c = connect(Protocol::V5);
        c.properties.receive_maximum = NonZeroU16::new(1);
        let mut h = Harness::connected(ServerSessionConfig::default(), c);
        let a = h.session.publish(h.now, publish("x", QoS::AtLeastOnce, 1)).unwrap();
        let b = h.session.publish(h.now, publish("y", QoS::ExactlyOnce, 1)).unwrap();
        let sent = h.sent();
        assert_eq!(sent.len(), 1, "one in flight");
        let Packet::Publish(p) = &sent[0] else { panic!() };
        h.feed(Packet::PubAck(Ack::new(p.packet_id().unwrap())));
        assert_eq!(h.events(), [ServerEvent::Delivered { id: a }]);
        let Packet::Publish(q) = h.sent().remove(0) else { panic!() };
        let qid = q.packet_id().unwrap();
        h.feed(Packet::PubRec(Ack::new(qid)));
        assert_eq!(h.sent(), [Packet::PubRel(Ack::new(qid))]);
        h.feed(Packet::PubComp(Ack::new(qid)));
        assert_eq!(h.events(), [ServerEvent::Delivered { id: b }]);
    }

    /// [MQTT-4.3.3-7]: once a QoS 2 PUBLISH has gone out its expiry no longer applies: the
    /// handshake finishes after the interval has passed, and a resumed session resends it.
    #[test]
    fn a_sent_qos2_message_does_not_expire() {
        let c = connect(Protocol::V5);
        let mut h = Harness::connected(ServerSessionConfig::default(), c.clone());
        let mut p = publish("q2", QoS::ExactlyOnce, 1);
        p.properties.message_expiry_interval = Some(2);
        h.session.publish(h.now, p.clone()).unwrap();
        h.session.publish(h.now, p).unwrap();
        let ids: Vec<PacketId> =
            h.sent().iter().filter_map(|p| if let Packet::Publish(p) = p { p.packet_id() } else { None }).collect();
        assert_eq!(ids.len(), 2);
        h.now += Duration::from_secs(5);
        h.session.handle_timeout(h.now);
        h.feed(Packet::PubRec(Ack::new(ids[0])));
        assert_eq!(h.sent(), [Packet::PubRel(Ack::new(ids[0]))]);
        // The second, unacknowledged, survives the connection's loss past its expiry.
        let state = lose(&mut h);
        let (_, sent) = resumed(c, state);
        assert!(
            sent.iter().any(|p| matches!(p, Packet::Publish(p) if p.dup && p.packet_id() == Some(ids[1]))),
            "{sent:?}"
        );
    }

    /// [MQTT-4.3.3-13]: a receiver finishes the QoS 2 handshake of a message even after the
    /// message's expiry interval has passed.
    #[test]
    fn an_incoming_qos2_handshake_finishes_after_expiry() {
        let mut h = Harness::v5();
        let mut p = publish("in", QoS::ExactlyOnce, 4);
        p.properties.message_expiry_interval = Some(1);
        h.feed(Packet::Publish(p));
        assert!(h.events().iter().any(|e| matches!(e, ServerEvent::Publish(_))));
        let id = PacketId::new(4).unwrap();
        h.session.acknowledge(QosPid::ExactlyOnce(id), ReasonCode::Success);
        assert_eq!(h.sent(), [Packet::PubRec(Ack::new(id))]);
        h.now += Duration::from_secs(10);
        h.session.handle_timeout(h.now);
        h.feed(Packet::PubRel(Ack::new(id)));
        assert_eq!(h.sent(), [Packet::PubComp(Ack::new(id))]);
    }

    #[test]
    fn message_expiry_counts_down_while_queued() {
        let mut c = connect(Protocol::V5);
        c.properties.receive_maximum = NonZeroU16::new(1);
        let mut h = Harness::connected(ServerSessionConfig::default(), c);
        let with_expiry = |topic: &str, secs| {
            let mut p = publish(topic, QoS::AtLeastOnce, 1);
            p.properties.message_expiry_interval = Some(secs);
            p
        };
        h.session.publish(h.now, publish("first", QoS::AtLeastOnce, 1)).unwrap();
        h.session.publish(h.now, with_expiry("short", 2)).unwrap();
        h.session.publish(h.now, with_expiry("long", 10)).unwrap();
        let Packet::Publish(first) = h.sent().remove(0) else { panic!() };
        h.now += Duration::from_secs(3);
        h.feed(Packet::PubAck(Ack::new(first.packet_id().unwrap())));
        // "short" expired while waiting; "long" goes out with 7 s left.
        let sent = h.sent();
        assert_eq!(sent.len(), 1, "{sent:?}");
        let Packet::Publish(p) = &sent[0] else { panic!() };
        assert_eq!(p.topic.as_str(), "long");
        assert_eq!(p.properties.message_expiry_interval, Some(7));
    }

    #[test]
    fn messages_above_the_client_maximum_packet_size_are_refused() {
        let mut c = connect(Protocol::V5);
        c.properties.maximum_packet_size = std::num::NonZeroU32::new(50);
        let mut h = Harness::connected(ServerSessionConfig::default(), c);
        let big = Publish::new(TopicName::new("t").unwrap(), vec![0u8; 100]);
        assert!(matches!(h.session.publish(h.now, big), Err(ServerCommandError::PacketTooLarge { max: 50, .. })));
    }

    /// Ends `h`'s connection and returns the session state, as the broker keeps it.
    fn lose(h: &mut Harness) -> SessionState {
        h.session.connection_lost();
        h.events();
        h.session.take_state()
    }

    /// A new connection of the same client (`connect`, clean start off) resuming `state`.
    fn resumed(mut connect: Connect, state: SessionState) -> (Harness, Vec<Packet>) {
        let mut h = Harness::new(ServerSessionConfig::default());
        connect.clean_start = false;
        h.feed(connect.into());
        assert!(matches!(h.events()[..], [ServerEvent::Connect(_)]));
        h.session.resume(h.now, state).unwrap();
        let sent = h.sent();
        (h, sent)
    }

    /// [MQTT-4.4.0-1] [MQTT-2.2.1-4]: on resume, what was in flight goes out again right after
    /// CONNACK, before anything queued while the client was away, and a queued message never
    /// takes an identifier still in flight.
    #[test]
    fn resume_resends_in_flight_first_and_keeps_their_identifiers() {
        let mut c = connect(Protocol::V5);
        c.properties.receive_maximum = NonZeroU16::new(2);
        let mut h = Harness::connected(ServerSessionConfig::default(), c.clone());
        h.session.publish(h.now, publish("in-flight", QoS::AtLeastOnce, 1)).unwrap();
        let Packet::Publish(first) = h.sent().remove(0) else { panic!() };
        let mut state = lose(&mut h);
        // Arrived while the client was offline.
        assert!(state.enqueue(h.now, publish("queued", QoS::AtLeastOnce, 1), 10));
        let (_, sent) = resumed(c, state);
        assert!(
            matches!(&sent[..], [Packet::ConnAck(ack), Packet::Publish(p), Packet::Publish(q)]
                if ack.session_present && p.dup && p.topic.as_str() == "in-flight" && p.packet_id() == first.packet_id()
                    && q.topic.as_str() == "queued" && !q.dup && q.packet_id() != first.packet_id()),
            "{sent:?}"
        );
    }

    /// [MQTT-4.9.0-2]: a client that comes back with a smaller Receive Maximum gets the
    /// unacknowledged messages resent within it, the rest as it acknowledges.
    #[test]
    fn resume_respects_a_smaller_receive_maximum() {
        let mut c = connect(Protocol::V5);
        c.properties.receive_maximum = NonZeroU16::new(3);
        let mut h = Harness::connected(ServerSessionConfig::default(), c.clone());
        for topic in ["a", "b", "c"] {
            h.session.publish(h.now, publish(topic, QoS::AtLeastOnce, 1)).unwrap();
        }
        assert_eq!(h.sent().len(), 3);
        let mut state = lose(&mut h);
        assert!(state.enqueue(h.now, publish("d", QoS::AtLeastOnce, 1), 10));
        c.properties.receive_maximum = NonZeroU16::new(1);
        let (mut h, sent) = resumed(c, state);
        let topics = |sent: &[Packet]| -> Vec<(String, bool, PacketId)> {
            sent.iter()
                .filter_map(|p| match p {
                    Packet::Publish(p) => Some((p.topic.to_string(), p.dup, p.packet_id().unwrap())),
                    _ => None,
                })
                .collect()
        };
        let mut order = Vec::new();
        let mut next = topics(&sent);
        while let [(topic, dup, id)] = &next[..] {
            order.push((topic.clone(), *dup));
            h.feed(Packet::PubAck(Ack::new(*id)));
            next = topics(&h.sent());
        }
        assert!(next.is_empty(), "more than one unacknowledged: {next:?}");
        let want = [("a", true), ("b", true), ("c", true), ("d", false)].map(|(t, d)| (t.to_string(), d));
        assert_eq!(order, want);
    }

    /// [MQTT-3.1.2-25]: a message that no longer fits the client's Maximum Packet Size (queued
    /// while it was away, or in flight when it came back with a smaller one) is dropped unsent
    /// and counts as delivered; the session carries on.
    #[test]
    fn messages_too_large_for_the_returning_client_are_dropped_as_delivered() {
        let c = connect(Protocol::V5);
        let mut h = Harness::connected(ServerSessionConfig::default(), c.clone());
        let big = Publish::new(TopicName::new("big").unwrap(), vec![0u8; 200]).with_qos(QoS::AtLeastOnce);
        let in_flight = h.session.publish(h.now, big.clone()).unwrap();
        h.sent();
        let mut state = lose(&mut h);
        assert!(state.enqueue(h.now, big, 10));
        assert!(state.enqueue(h.now, publish("small", QoS::AtLeastOnce, 1), 10));
        let mut small_client = c;
        small_client.properties.maximum_packet_size = std::num::NonZeroU32::new(100);
        let (mut h, sent) = resumed(small_client, state);
        assert!(
            matches!(&sent[..], [Packet::ConnAck(_), Packet::Publish(p)] if p.topic.as_str() == "small"),
            "{sent:?}"
        );
        let delivered: Vec<_> = h.events().into_iter().filter(|e| matches!(e, ServerEvent::Delivered { .. })).collect();
        assert_eq!(delivered.len(), 2, "{delivered:?}");
        assert!(delivered.contains(&ServerEvent::Delivered { id: in_flight }));
        assert!(!h.session.is_ended());
    }

    /// [MQTT-3.1.2-24]: a CONNACK that cannot fit the client's Maximum Packet Size is not sent;
    /// a bare refusal that fits is, and the session ends (found by the `server_session` fuzzer:
    /// a client announcing 11 bytes got a 27-byte CONNACK).
    #[test]
    fn connack_never_exceeds_the_client_maximum_packet_size() {
        for (max, expect_refusal) in [(11, true), (4, false)] {
            let mut c = connect(Protocol::V5);
            c.properties.maximum_packet_size = std::num::NonZeroU32::new(max);
            let mut h = Harness::new(ServerSessionConfig::default());
            h.feed(c.into());
            assert!(matches!(h.events()[..], [ServerEvent::Connect(_)]));
            h.session.accept(h.now, false, Some("assigned-identifier")).unwrap();
            let mut bytes = Vec::new();
            while let Some(b) = h.session.poll_transmit() {
                bytes.extend_from_slice(&b);
            }
            assert!(bytes.len() <= max as usize, "{} bytes sent, the client accepts {max}", bytes.len());
            if expect_refusal {
                assert_eq!(bytes, [0x20, 0x03, 0x00, 0x95, 0x00]);
            }
            assert!(matches!(
                h.events()[..],
                [ServerEvent::Ended { reason: EndReason::ProtocolViolation(ReasonCode::PacketTooLarge), .. }]
            ));
            assert!(h.session.is_ended());
        }
    }

    /// A topic alias on a message routed from another connection is not sent on this one
    /// [MQTT-3.3.2-7] (found by the `server_session` fuzzer).
    #[test]
    fn routed_messages_carry_no_foreign_topic_alias() {
        let mut h = Harness::v5();
        let mut p = Publish::new(TopicName::new("t").unwrap(), &b"m"[..]);
        p.properties.topic_alias = NonZeroU16::new(7);
        h.session.publish(h.now, p).unwrap();
        let sent = h.sent();
        assert!(matches!(&sent[..], [Packet::Publish(p)] if p.properties.topic_alias.is_none()), "{sent:?}");
    }

    /// [MQTT-3.2.2-12] [MQTT-3.2.2-13]: a will above the Maximum QoS, or retained where retain
    /// is unavailable, gets CONNACK 0x9B / 0x9A and no session.
    #[test]
    fn a_will_the_server_cannot_honour_is_refused() {
        let config =
            ServerSessionConfig { maximum_qos: QoS::AtLeastOnce, retain_available: false, ..Default::default() };
        for (qos, retain, code) in [
            (QoS::ExactlyOnce, false, ReasonCode::QosNotSupported),
            (QoS::AtMostOnce, true, ReasonCode::RetainNotSupported),
        ] {
            let mut c = connect(Protocol::V5);
            c.will = Some(Will {
                topic: TopicName::new("status").unwrap(),
                payload: Bytes::from_static(b"gone"),
                qos,
                retain,
                properties: Default::default(),
            });
            let mut h = Harness::new(config.clone());
            h.feed(c.into());
            assert!(matches!(&h.sent()[..], [Packet::ConnAck(ack)] if ack.reason_code == code));
            assert!(
                matches!(h.events()[..], [ServerEvent::Ended { reason: EndReason::Refused(r), will: None }] if r == code)
            );
        }
    }

    /// Authentication Data without an Authentication Method is a Protocol Error (CONNACK 0x82).
    #[test]
    fn authentication_data_without_a_method_is_refused() {
        let mut c = connect(Protocol::V5);
        c.properties.authentication_data = Some(Bytes::from_static(b"secret"));
        let mut h = Harness::new(ServerSessionConfig::default());
        h.feed(c.clone().into());
        assert!(matches!(&h.sent()[..], [Packet::ConnAck(a)] if a.reason_code == ReasonCode::ProtocolError));
        // Even a refusal respects the client's Maximum Packet Size [MQTT-3.1.2-24].
        c.properties.maximum_packet_size = std::num::NonZeroU32::new(3);
        let mut h = Harness::new(ServerSessionConfig::default());
        h.feed(c.into());
        assert!(h.sent().is_empty());
        assert!(h.session.is_ended());
    }

    /// [MQTT-3.3.4-6]: a PUBLISH from a client carrying a Subscription Identifier is a
    /// Protocol Error: DISCONNECT 0x82, the session ends, and the message reaches nobody.
    #[test]
    fn a_client_publish_with_a_subscription_identifier_is_a_protocol_error() {
        let mut h = Harness::v5();
        let mut p = publish("t", QoS::AtMostOnce, 1);
        p.properties.subscription_identifiers.push(mqtt_proto::SubscriptionId::new(7).unwrap());
        h.feed(p.into());
        assert_eq!(h.sent(), [Packet::Disconnect(Disconnect::new(ReasonCode::ProtocolError))]);
        assert!(!h.events().iter().any(|e| matches!(e, ServerEvent::Publish(_))));
        assert!(h.session.is_ended());
    }

    #[test]
    fn will_follows_how_the_connection_ended() {
        let with_will = || {
            let mut c = connect(Protocol::V5);
            c.will = Some(Will {
                topic: TopicName::new("status").unwrap(),
                payload: Bytes::from_static(b"gone"),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: Default::default(),
            });
            c
        };
        let will_of = |h: &mut Harness| {
            h.events().into_iter().find_map(|e| match e {
                ServerEvent::Ended { will, .. } => Some(will.is_some()),
                _ => None,
            })
        };
        let mut h = Harness::connected(ServerSessionConfig::default(), with_will());
        h.session.connection_lost();
        assert_eq!(will_of(&mut h), Some(true), "ungraceful: will");
        let mut h = Harness::connected(ServerSessionConfig::default(), with_will());
        h.feed(Disconnect::default().into());
        assert_eq!(will_of(&mut h), Some(false), "normal disconnect: no will");
        let mut h = Harness::connected(ServerSessionConfig::default(), with_will());
        h.feed(Disconnect::new(ReasonCode::DisconnectWithWill).into());
        assert_eq!(will_of(&mut h), Some(true), "0x04: will");
    }

    #[test]
    fn subscriptions_are_reported_and_answered() {
        let mut h = Harness::v5();
        let sub = Subscription {
            filter: TopicFilter::new("a/+").unwrap(),
            options: SubscriptionOptions { qos: QoS::AtLeastOnce, ..Default::default() },
        };
        let packet_id = PacketId::new(3).unwrap();
        h.feed(Packet::Subscribe(Subscribe {
            packet_id,
            properties: Default::default(),
            subscriptions: [sub.clone()].into(),
        }));
        assert_eq!(h.events(), [ServerEvent::Subscribe { packet_id, subscriptions: vec![sub], subscription_id: None }]);
        h.session.suback(packet_id, vec![ReasonCode::GrantedQos1]).unwrap();
        assert!(matches!(&h.sent()[..], [Packet::SubAck(a)] if a.reason_codes[0] == ReasonCode::GrantedQos1));
    }

    #[test]
    fn resumed_state_keeps_qos2_exactly_once_and_resends_unacknowledged() {
        let mut h = Harness::v5();
        // The client's QoS 2 message arrives; the connection drops before PUBREL.
        h.feed(Packet::Publish(publish("in", QoS::ExactlyOnce, 9)));
        h.session.acknowledge(QosPid::ExactlyOnce(PacketId::new(9).unwrap()), ReasonCode::Success);
        // Our QoS 1 message to the client is not acknowledged.
        h.session.publish(h.now, publish("out", QoS::AtLeastOnce, 1)).unwrap();
        h.sent();
        h.session.connection_lost();
        h.events();
        let state = h.session.take_state();
        assert_eq!(state.pending(), 1);

        let mut h2 = Harness::new(ServerSessionConfig::default());
        h2.feed(connect(Protocol::V5).into());
        h2.events();
        h2.session.resume(h2.now, state).unwrap();
        let sent = h2.sent();
        assert!(matches!(&sent[0], Packet::ConnAck(a) if a.session_present));
        assert!(matches!(&sent[1], Packet::Publish(p) if p.dup && p.topic.as_str() == "out"), "{sent:?}");
        // The client resends its QoS 2 message (DUP): not delivered a second time.
        let mut again = publish("in", QoS::ExactlyOnce, 9);
        again.dup = true;
        h2.feed(Packet::Publish(again));
        assert!(!h2.events().iter().any(|e| matches!(e, ServerEvent::Publish(_))));
        h2.feed(Packet::PubRel(Ack::new(PacketId::new(9).unwrap())));
        assert!(h2.sent().contains(&Packet::PubComp(Ack::new(PacketId::new(9).unwrap()))));
    }

    #[test]
    fn takeover_disconnects_with_0x8e() {
        let mut h = Harness::v5();
        h.session.disconnect(ReasonCode::SessionTakenOver).unwrap();
        assert_eq!(h.sent(), [Disconnect::new(ReasonCode::SessionTakenOver).into()]);
        assert!(h.session.is_ended());
    }

    #[test]
    fn client_topic_aliases_are_resolved_for_the_broker() {
        let mut h = Harness::v5();
        let mut set = publish("long/name", QoS::AtMostOnce, 1);
        set.properties.topic_alias = NonZeroU16::new(1);
        h.feed(Packet::Publish(set));
        let mut used = Publish::new(TopicName::empty(), &b"m"[..]);
        used.properties.topic_alias = NonZeroU16::new(1);
        h.feed(Packet::Publish(used));
        let topics: Vec<String> = h
            .events()
            .into_iter()
            .filter_map(|e| if let ServerEvent::Publish(p) = e { Some(p.topic.to_string()) } else { None })
            .collect();
        assert_eq!(topics, ["long/name", "long/name"]);
    }
}
