//! The client session: CONNECT/CONNACK, keep-alive, QoS 1 and 2 both ways, receive-maximum flow
//! control, topic aliases from the server, and resumption after a reconnect.

use super::packet_id::PacketIds;
use super::DEFAULT_WINDOW;
use crate::config::ConfigError;
use bytes::{Bytes, BytesMut};
use mqtt_proto::{
    Ack, Auth, ConnAck, Connect, ConnectProperties, Decoder, Disconnect, MqttString, Packet, PacketId, Protocol,
    Publish, QoS, QosPid, ReasonCode, SubAck, Subscribe, Subscription, SubscriptionId, TopicFilter, TopicName,
    UnsubAck, Unsubscribe, Will,
};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};
use thiserror::Error;

/// Settings of a client session.
#[derive(Debug, Clone)]
pub struct ClientSessionConfig {
    /// Protocol version to speak.
    pub protocol: Protocol,
    /// Client identifier; empty asks the server to assign one.
    pub client_id: String,
    /// Start a new session instead of resuming one.
    pub clean_start: bool,
    /// Keep-alive in seconds (0 disables); the server may override it.
    pub keep_alive: u16,
    /// Seconds the server keeps the session after the connection ends (MQTT 5).
    pub session_expiry: u32,
    /// QoS 1 and 2 publishes we accept from the server at once (MQTT 5 Receive Maximum).
    pub receive_maximum: u16,
    /// Largest packet we accept.
    pub maximum_packet_size: u32,
    /// Topic aliases we accept from the server (0: none).
    pub topic_alias_maximum: u16,
    /// User name.
    pub username: Option<String>,
    /// Password.
    pub password: Option<Bytes>,
    /// The will message.
    pub will: Option<Will>,
    /// Further CONNECT properties (MQTT 5): request response / problem information, user
    /// properties, authentication method and data. The session sets session expiry, receive
    /// maximum, maximum packet size and topic alias maximum from the fields above.
    pub connect_properties: ConnectProperties,
    /// Give up if CONNACK has not come after this long.
    pub connect_timeout: Duration,
    /// Most of our QoS 1 and 2 publishes in flight, whatever the server allows.
    pub max_inflight: u16,
    /// Most publishes waiting for an in-flight slot; beyond it `publish` fails with `QueueFull`.
    pub max_queued: usize,
}

impl Default for ClientSessionConfig {
    fn default() -> Self {
        ClientSessionConfig {
            protocol: Protocol::V5,
            client_id: String::new(),
            clean_start: true,
            keep_alive: 60,
            session_expiry: 0,
            receive_maximum: DEFAULT_WINDOW,
            maximum_packet_size: mqtt_proto::DEFAULT_MAX_PACKET_SIZE,
            topic_alias_maximum: 16,
            username: None,
            password: None,
            will: None,
            connect_properties: ConnectProperties::default(),
            connect_timeout: Duration::from_secs(10),
            max_inflight: DEFAULT_WINDOW,
            max_queued: 10_000,
        }
    }
}

/// Identifies a publish, subscribe or unsubscribe request in the events that complete it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DisconnectReason {
    /// The server sent DISCONNECT with this code.
    #[error("the server disconnected: {0}")]
    ByServer(ReasonCode),
    /// We disconnected because the server broke the protocol (the code we sent).
    #[error("the server broke the protocol: {0}")]
    ProtocolViolation(ReasonCode),
    /// No PINGRESP within the keep-alive interval.
    #[error("no answer to keep-alive ping")]
    KeepAliveTimeout,
    /// No CONNACK within the connect timeout.
    #[error("no CONNACK in time")]
    ConnectTimeout,
    /// The transport closed under us.
    #[error("connection lost")]
    TransportLost,
    /// We asked for it with [`ClientSession::disconnect`].
    #[error("disconnected by this client")]
    Local,
}

/// What the session reports.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientEvent {
    /// CONNACK accepted the connection. Fires once per connection.
    Connected {
        /// Whether the server resumed a session.
        session_present: bool,
        /// The client identifier in force (assigned by the server when we sent none).
        client_id: String,
    },
    /// CONNACK refused the connection. Fires once; the transport should be closed.
    Refused {
        /// Why.
        reason: ReasonCode,
    },
    /// An application message arrived (QoS 2 messages exactly once).
    Message(Publish),
    /// A QoS 1 or 2 publish completed: `reason` is Success or the server's failure code. QoS 0
    /// publishes complete when written.
    Published {
        /// The request.
        id: RequestId,
        /// Outcome.
        reason: ReasonCode,
    },
    /// SUBACK arrived: one code per filter (granted QoS or failure).
    Subscribed {
        /// The request.
        id: RequestId,
        /// Per filter.
        reason_codes: Vec<ReasonCode>,
    },
    /// UNSUBACK arrived.
    Unsubscribed {
        /// The request.
        id: RequestId,
        /// Per filter (empty for MQTT 3.1.1).
        reason_codes: Vec<ReasonCode>,
    },
    /// A subscribe or unsubscribe whose connection ended before it was acknowledged. It may or
    /// may not have taken effect; repeat it on the next connection.
    Aborted {
        /// The request.
        id: RequestId,
    },
    /// The server sent AUTH (enhanced authentication): answer with [`ClientSession::auth`].
    Auth(Auth),
    /// The session's connection ended. Fires once per connection; the transport should be
    /// closed once `poll_transmit` is drained. Pending QoS 1 and 2 publishes are kept for the
    /// next connection.
    Disconnected {
        /// Why.
        reason: DisconnectReason,
    },
}

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum CommandError {
    /// Not connected (QoS 0 publishes, subscriptions and disconnect need a connection).
    #[error("not connected")]
    NotConnected,
    /// AUTH needs an authentication method in the CONNECT (MQTT 5 enhanced authentication).
    #[error("AUTH needs an authentication method set in the CONNECT properties")]
    NoAuthenticationMethod,
    /// AUTH must use the authentication method the CONNECT named.
    #[error("AUTH names method `{auth}` but the CONNECT named `{connect}`")]
    AuthenticationMethodMismatch {
        /// The CONNECT's method.
        connect: String,
        /// The AUTH's method.
        auth: String,
    },
    /// Too many publishes are waiting.
    #[error("publish queue is full ({0} waiting)")]
    QueueFull(usize),
    /// The packet would exceed the server's Maximum Packet Size.
    #[error("packet of {size} bytes exceeds the server's maximum of {max}")]
    PacketTooLarge {
        /// Encoded size.
        size: usize,
        /// The server's limit.
        max: u32,
    },
    /// The server does not support this QoS (CONNACK Maximum QoS).
    #[error("the server supports QoS up to {0:?}")]
    QosNotSupported(QoS),
    /// The server does not support retained messages.
    #[error("the server does not support retained messages")]
    RetainNotSupported,
    /// Nothing to subscribe or unsubscribe.
    #[error("at least one topic filter is needed")]
    Empty,
    /// All 65 535 packet identifiers are in use.
    #[error("no free packet identifier")]
    NoPacketId,
    /// The connection has already been started.
    #[error("already connecting or connected")]
    AlreadyConnected,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// A QoS 1 publish waiting for PUBACK, or a QoS 2 one waiting for PUBREC.
    Sent,
    /// A QoS 2 publish whose PUBREL was sent, waiting for PUBCOMP.
    Released,
}

#[derive(Debug, Clone)]
struct Outgoing {
    id: RequestId,
    publish: Publish,
}

#[derive(Debug, Clone)]
enum Request {
    Subscribe(RequestId, Vec<Subscription>),
    Unsubscribe(RequestId, Vec<TopicFilter>),
    /// A resubscription after a lost session: no event.
    Resubscribe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    Connecting,
    Connected,
    /// Disconnected event sent; waiting for `connection_lost` or a new `connect`.
    Closed,
}

/// The client side of one MQTT connection (and the session that outlives it).
pub struct ClientSession {
    config: ClientSessionConfig,
    state: State,
    decoder: Decoder,
    inbuf: BytesMut,
    out: BytesMut,
    events: VecDeque<ClientEvent>,
    ids: PacketIds,
    next_request: u64,
    /// Publishes in flight, in the order they were sent.
    inflight: Vec<(PacketId, Stage, Outgoing)>,
    /// Entries of `inflight` from here on were kept from an earlier connection and have not been
    /// sent again on this one yet: they wait for room under the server's Receive Maximum.
    resend_from: usize,
    /// Publishes waiting for an in-flight slot (or a connection).
    queued: VecDeque<Outgoing>,
    /// QoS 2 publishes received and acknowledged with PUBREC, waiting for PUBREL.
    incoming_qos2: BTreeSet<u16>,
    requests: BTreeMap<u16, Request>,
    /// Subscriptions the server granted, to restore when a session is lost.
    subscriptions: Vec<Subscription>,
    aliases: BTreeMap<u16, TopicName>,
    /// Aliases we assigned to topics on this connection (outbound).
    out_aliases: BTreeMap<TopicName, u16>,
    /// A packet could not fit the server's Maximum Packet Size: this connection sends nothing
    /// more.
    cut_off: bool,
    server_topic_alias_maximum: u16,
    // Limits from CONNACK.
    server_receive_maximum: u16,
    server_maximum_packet_size: u32,
    server_maximum_qos: QoS,
    server_retain_available: bool,
    keep_alive: Duration,
    client_id: String,
    // Timers.
    connack_deadline: Option<Instant>,
    /// When we last wrote a packet: keep-alive counts from here.
    last_sent: Option<Instant>,
    ping_deadline: Option<Instant>,
}

impl ClientSession {
    /// A session, not yet connected. Fails on a client id or user name that is not a valid MQTT
    /// string.
    pub fn new(config: ClientSessionConfig) -> Result<ClientSession, ConfigError> {
        for (what, value) in [("client_id", Some(&config.client_id)), ("username", config.username.as_ref())] {
            if let Some(v) = value {
                MqttString::try_from(v.as_str()).map_err(|e| ConfigError::Invalid(format!("{what}: {e}")))?;
            }
        }
        if config.receive_maximum == 0 || config.max_inflight == 0 {
            return Err(ConfigError::Invalid("receive_maximum and max_inflight must be at least 1".into()));
        }
        let decoder = Decoder::new(config.protocol).with_max_packet_size(config.maximum_packet_size);
        Ok(ClientSession {
            decoder,
            state: State::Idle,
            inbuf: BytesMut::new(),
            out: BytesMut::new(),
            events: VecDeque::new(),
            ids: PacketIds::default(),
            next_request: 0,
            inflight: Vec::new(),
            resend_from: 0,
            queued: VecDeque::new(),
            incoming_qos2: BTreeSet::new(),
            requests: BTreeMap::new(),
            subscriptions: Vec::new(),
            aliases: BTreeMap::new(),
            out_aliases: BTreeMap::new(),
            cut_off: false,
            server_topic_alias_maximum: 0,
            server_receive_maximum: u16::MAX,
            server_maximum_packet_size: mqtt_proto::PROTOCOL_MAX_PACKET_SIZE,
            server_maximum_qos: QoS::ExactlyOnce,
            server_retain_available: true,
            keep_alive: Duration::from_secs(u64::from(config.keep_alive)),
            client_id: config.client_id.clone(),
            connack_deadline: None,
            last_sent: None,
            ping_deadline: None,
            config,
        })
    }

    /// Whether CONNACK accepted the current connection.
    pub fn is_connected(&self) -> bool {
        self.state == State::Connected
    }

    /// Publishes in flight plus those waiting.
    pub fn pending_publishes(&self) -> usize {
        self.inflight.len() + self.queued.len()
    }

    /// Starts a connection over a fresh transport: queues CONNECT. Later calls (after
    /// [`ClientSession::connection_lost`]) resume the session: `clean_start` is then false.
    pub fn connect(&mut self, now: Instant) -> Result<(), CommandError> {
        if matches!(self.state, State::Connecting | State::Connected) {
            return Err(CommandError::AlreadyConnected);
        }
        self.inbuf.clear();
        self.out.clear();
        self.aliases.clear();
        self.out_aliases.clear();
        self.cut_off = false;
        self.server_topic_alias_maximum = 0;
        self.decoder.set_protocol(self.config.protocol);
        let mut connect = Connect::new(self.config.protocol, string(&self.client_id));
        connect.clean_start = self.config.clean_start;
        connect.keep_alive = self.config.keep_alive;
        connect.will = self.config.will.clone();
        connect.username = self.config.username.as_deref().map(string);
        connect.password = self.config.password.clone();
        if self.config.protocol.is_v5() {
            connect.properties = self.config.connect_properties.clone().into();
            let p = &mut *connect.properties;
            p.session_expiry_interval = (self.config.session_expiry > 0).then_some(self.config.session_expiry);
            p.receive_maximum = std::num::NonZeroU16::new(self.config.receive_maximum);
            p.maximum_packet_size = std::num::NonZeroU32::new(self.config.maximum_packet_size);
            p.topic_alias_maximum = (self.config.topic_alias_maximum > 0).then_some(self.config.topic_alias_maximum);
        }
        self.state = State::Connecting;
        self.connack_deadline = Some(now + self.config.connect_timeout);
        self.write(now, &connect.into());
        Ok(())
    }

    /// Publishes a message. QoS 0 needs a connection; QoS 1 and 2 are queued while
    /// disconnected and complete with [`ClientEvent::Published`].
    pub fn publish(&mut self, now: Instant, mut publish: Publish) -> Result<RequestId, CommandError> {
        if publish.qos() > self.server_maximum_qos {
            return Err(CommandError::QosNotSupported(self.server_maximum_qos));
        }
        if publish.retain && !self.server_retain_available {
            return Err(CommandError::RetainNotSupported);
        }
        publish.dup = false;
        // Subscription Identifiers are the server's business [MQTT-3.3.4-6]: a message received
        // and published again must not carry them.
        if !publish.properties.subscription_identifiers.is_empty() {
            publish.properties.subscription_identifiers = mqtt_proto::WireList::new();
        }
        // Size as it will go out: the packet identifier is assigned later but its size is fixed.
        let size = publish.encoded_len(self.config.protocol).unwrap_or(usize::MAX);
        if size > self.server_maximum_packet_size as usize {
            return Err(CommandError::PacketTooLarge { size, max: self.server_maximum_packet_size });
        }
        let id = self.request_id();
        if publish.qos() == QoS::AtMostOnce {
            if self.state != State::Connected {
                return Err(CommandError::NotConnected);
            }
            self.write_publish(now, publish);
            self.events.push_back(ClientEvent::Published { id, reason: ReasonCode::Success });
            return Ok(id);
        }
        if self.queued.len() >= self.config.max_queued {
            return Err(CommandError::QueueFull(self.queued.len()));
        }
        self.queued.push_back(Outgoing { id, publish });
        self.pump(now);
        Ok(id)
    }

    /// Subscribes, tagging deliveries with `subscription_id` (MQTT 5) when given; completes with
    /// [`ClientEvent::Subscribed`].
    pub fn subscribe(
        &mut self,
        now: Instant,
        subscriptions: Vec<Subscription>,
        subscription_id: Option<SubscriptionId>,
    ) -> Result<RequestId, CommandError> {
        if subscriptions.is_empty() {
            return Err(CommandError::Empty);
        }
        if self.state != State::Connected {
            return Err(CommandError::NotConnected);
        }
        let mut packet = Subscribe {
            packet_id: PacketId::MIN,
            properties: Default::default(),
            subscriptions: subscriptions.iter().cloned().collect(),
        };
        if let Some(sid) = subscription_id {
            packet.properties.subscription_identifier = Some(sid);
        }
        let packet = Packet::Subscribe(packet);
        self.check_size(&packet)?;
        let Packet::Subscribe(mut packet) = packet else { unreachable!("built above") };
        packet.packet_id = self.ids.allocate().ok_or(CommandError::NoPacketId)?;
        let packet_id = packet.packet_id;
        let id = self.request_id();
        self.requests.insert(packet_id.get(), Request::Subscribe(id, subscriptions));
        self.write(now, &Packet::Subscribe(packet));
        Ok(id)
    }

    /// Unsubscribes; completes with [`ClientEvent::Unsubscribed`].
    pub fn unsubscribe(&mut self, now: Instant, filters: Vec<TopicFilter>) -> Result<RequestId, CommandError> {
        if filters.is_empty() {
            return Err(CommandError::Empty);
        }
        if self.state != State::Connected {
            return Err(CommandError::NotConnected);
        }
        let packet = Packet::Unsubscribe(Unsubscribe {
            packet_id: PacketId::MIN,
            properties: Default::default(),
            filters: filters.iter().cloned().collect(),
        });
        self.check_size(&packet)?;
        let Packet::Unsubscribe(mut packet) = packet else { unreachable!("built above") };
        packet.packet_id = self.ids.allocate().ok_or(CommandError::NoPacketId)?;
        let packet_id = packet.packet_id;
        let id = self.request_id();
        self.requests.insert(packet_id.get(), Request::Unsubscribe(id, filters));
        self.write(now, &Packet::Unsubscribe(packet));
        Ok(id)
    }

    /// Sends DISCONNECT with `reason` (MQTT 5; 3.1.1 has no code) and ends the connection.
    /// Use [`ReasonCode::DisconnectWithWill`] to have the server publish the will anyway.
    pub fn disconnect(&mut self, now: Instant, reason: ReasonCode) -> Result<(), CommandError> {
        if self.state != State::Connected {
            return Err(CommandError::NotConnected);
        }
        self.write(now, &Disconnect::new(reason).into());
        self.close(DisconnectReason::Local);
        Ok(())
    }

    /// Answers an AUTH challenge (MQTT 5 enhanced authentication).
    pub fn auth(&mut self, now: Instant, mut auth: Auth) -> Result<(), CommandError> {
        if !matches!(self.state, State::Connecting | State::Connected) {
            return Err(CommandError::NotConnected);
        }
        // AUTH belongs to an exchange our CONNECT asked for [MQTT-4.12.0-7], with its method
        // [MQTT-4.12.0-5]: filled in when the caller left it out, refused when it differs.
        let Some(method) = self.config.connect_properties.authentication_method.clone() else {
            return Err(CommandError::NoAuthenticationMethod);
        };
        match &auth.properties.authentication_method {
            None => auth.properties.authentication_method = Some(method),
            Some(m) if *m == method => {}
            Some(m) => {
                return Err(CommandError::AuthenticationMethodMismatch {
                    connect: method.as_str().to_string(),
                    auth: m.as_str().to_string(),
                })
            }
        }
        // Diagnostics give way to the server's Maximum Packet Size [MQTT-3.15.2-2]
        // [MQTT-3.15.2-3]; the method and data cannot.
        let mut packet = Packet::Auth(auth);
        if self.check_size(&packet).is_err() {
            if let Packet::Auth(a) = &mut packet {
                a.properties.reason_string = None;
                a.properties.user_properties = Default::default();
            }
            self.check_size(&packet)?;
        }
        self.write(now, &packet);
        Ok(())
    }

    /// The transport closed. In-flight and queued publishes are kept for the next
    /// [`ClientSession::connect`].
    pub fn connection_lost(&mut self, _now: Instant) {
        if matches!(self.state, State::Connecting | State::Connected) {
            self.close(DisconnectReason::TransportLost);
        }
        // Subscribe and unsubscribe are not resent on resumption: report them unfinished.
        for (packet_id, request) in std::mem::take(&mut self.requests) {
            if let Some(id) = PacketId::new(packet_id) {
                self.ids.release(id);
            }
            if let Request::Subscribe(id, _) | Request::Unsubscribe(id, _) = request {
                self.events.push_back(ClientEvent::Aborted { id });
            }
        }
        self.state = State::Idle;
        self.inbuf.clear();
        self.out.clear();
    }

    /// Bytes received from the transport.
    pub fn handle_bytes(&mut self, now: Instant, data: &[u8]) {
        if !matches!(self.state, State::Connecting | State::Connected) {
            return;
        }
        self.inbuf.extend_from_slice(data);
        loop {
            match self.decoder.decode(&mut self.inbuf) {
                Ok(Some(packet)) => self.handle_packet(now, packet),
                Ok(None) => break,
                Err(e) => {
                    self.violation(now, e.reason_code());
                    break;
                }
            }
            if !matches!(self.state, State::Connecting | State::Connected) {
                break;
            }
        }
    }

    /// Fires due timers (connect timeout, keep-alive). Early calls do nothing.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.connack_deadline.is_some_and(|d| d <= now) {
            self.connack_deadline = None;
            if self.state == State::Connecting {
                self.close(DisconnectReason::ConnectTimeout);
            }
        }
        if self.state != State::Connected {
            return;
        }
        if self.ping_deadline.is_some_and(|d| d <= now) {
            self.close(DisconnectReason::KeepAliveTimeout);
            return;
        }
        if self.ping_due().is_some_and(|d| d <= now) {
            self.write(now, &Packet::PingReq);
            self.ping_deadline = Some(now + self.keep_alive);
        }
    }

    fn ping_due(&self) -> Option<Instant> {
        if self.keep_alive.is_zero() || self.ping_deadline.is_some() {
            return None;
        }
        self.last_sent.map(|t| t + self.keep_alive)
    }

    /// The next instant `handle_timeout` has work to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let keep_alive = if self.state == State::Connected { [self.ping_due(), self.ping_deadline] } else { [None; 2] };
        [self.connack_deadline].into_iter().chain(keep_alive).flatten().min()
    }

    /// Bytes to write to the transport, if any.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        (!self.out.is_empty()).then(|| self.out.split().freeze())
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    fn request_id(&mut self) -> RequestId {
        self.next_request += 1;
        RequestId(self.next_request)
    }

    /// Refuses a request whose packet would exceed the server's Maximum Packet Size
    /// [MQTT-3.2.2-15].
    fn check_size(&self, packet: &Packet) -> Result<(), CommandError> {
        let max = self.server_maximum_packet_size;
        match packet.encoded_len(self.config.protocol) {
            Ok(size) if size <= max as usize => Ok(()),
            Ok(size) => Err(CommandError::PacketTooLarge { size, max }),
            Err(_) => Err(CommandError::PacketTooLarge { size: usize::MAX, max }),
        }
    }

    fn write(&mut self, now: Instant, packet: &Packet) {
        if self.cut_off {
            return;
        }
        // Requests and PUBLISH were checked against the server's Maximum Packet Size when made;
        // what else we send (acknowledgements, PINGREQ, DISCONNECT, a subscription restored on
        // reconnect) only fails to fit a server whose limit is too small to talk to at all:
        // then nothing more is sent and the connection ends [MQTT-3.2.2-15].
        if self.check_size(packet).is_err() {
            self.cut_off = true;
            self.close(DisconnectReason::ProtocolViolation(ReasonCode::PacketTooLarge));
            return;
        }
        if packet.encode(self.config.protocol, &mut self.out).is_ok() {
            self.last_sent = Some(now);
        }
    }

    /// Writes a PUBLISH, using a topic alias when the server allows them (MQTT 5): the first
    /// message on a topic sets the alias, later ones send it instead of the topic. Aliases last
    /// one connection; the stored message keeps its topic.
    fn write_publish(&mut self, now: Instant, mut publish: Publish) {
        if self.config.protocol.is_v5() && self.server_topic_alias_maximum > 0 && !publish.topic.is_empty() {
            match self.out_aliases.get(&publish.topic) {
                Some(&alias) => {
                    publish.properties.topic_alias = std::num::NonZeroU16::new(alias);
                    publish.topic = TopicName::empty();
                }
                None if self.out_aliases.len() < usize::from(self.server_topic_alias_maximum) => {
                    let alias = self.out_aliases.len() as u16 + 1;
                    publish.properties.topic_alias = std::num::NonZeroU16::new(alias);
                    // Setting an alias adds bytes: never past the server's limit, which the
                    // message was checked against without it (found by the `client_session`
                    // fuzzer).
                    if publish
                        .encoded_len(self.config.protocol)
                        .is_ok_and(|n| n <= self.server_maximum_packet_size as usize)
                    {
                        self.out_aliases.insert(publish.topic.clone(), alias);
                    } else {
                        publish.properties.topic_alias = None;
                    }
                }
                None => {}
            }
        }
        self.write(now, &Packet::Publish(publish));
    }

    /// Ends the connection and reports why (once).
    fn close(&mut self, reason: DisconnectReason) {
        if matches!(self.state, State::Connecting | State::Connected) {
            self.state = State::Closed;
            self.connack_deadline = None;
            self.ping_deadline = None;
            self.events.push_back(ClientEvent::Disconnected { reason });
        }
    }

    /// The server broke the protocol: tell it why (MQTT 5) and end the connection.
    fn violation(&mut self, now: Instant, code: ReasonCode) {
        if self.config.protocol.is_v5() && self.state == State::Connected {
            self.write(now, &Disconnect::new(code).into());
        }
        self.close(DisconnectReason::ProtocolViolation(code));
    }

    /// Moves queued publishes into flight while the server's Receive Maximum allows.
    fn pump(&mut self, now: Instant) {
        if self.state != State::Connected {
            return;
        }
        let limit = usize::from(self.server_receive_maximum.min(self.config.max_inflight).max(1));
        // What a resumed session still owes goes first, in its original order [MQTT-4.4.0-1],
        // and no more of it than the server's Receive Maximum allows [MQTT-4.9.0-2]: PUBLISH
        // again with DUP set, or PUBREL.
        while self.resend_from < self.inflight.len() && self.resend_from < limit {
            let (packet_id, stage, out) = &self.inflight[self.resend_from];
            match stage {
                Stage::Sent => {
                    let mut p = out.publish.clone();
                    p.dup = true;
                    self.write_publish(now, p);
                }
                Stage::Released => {
                    let packet_id = *packet_id;
                    self.write(now, &Packet::PubRel(Ack::new(packet_id)));
                }
            }
            self.resend_from += 1;
        }
        while self.resend_from == self.inflight.len() && self.inflight.len() < limit {
            let Some(mut out) = self.queued.pop_front() else { break };
            if let Some(reason) = self.refusal(&out.publish) {
                self.events.push_back(ClientEvent::Published { id: out.id, reason });
                continue;
            }
            let Some(packet_id) = self.ids.allocate() else {
                self.queued.push_front(out);
                break;
            };
            out.publish.qos_pid = QosPid::from_parts(out.publish.qos(), packet_id);
            self.write_publish(now, out.publish.clone());
            self.inflight.push((packet_id, Stage::Sent, out));
            self.resend_from = self.inflight.len();
        }
    }

    /// Why this server may not be sent `publish`, if it may not. A message queued or in flight
    /// across a reconnect was checked against the last connection's limits; the new CONNACK may
    /// announce tighter ones, which we must obey [MQTT-3.2.2-11] [MQTT-3.2.2-14] [MQTT-3.1.2-24].
    /// Such a message completes with the reason the server would have given.
    fn refusal(&self, publish: &Publish) -> Option<ReasonCode> {
        if publish.qos() > self.server_maximum_qos {
            Some(ReasonCode::QosNotSupported)
        } else if publish.retain && !self.server_retain_available {
            Some(ReasonCode::RetainNotSupported)
        } else if publish
            .encoded_len(self.config.protocol)
            .map_or(true, |n| n > self.server_maximum_packet_size as usize)
        {
            Some(ReasonCode::PacketTooLarge)
        } else {
            None
        }
    }

    fn complete(&mut self, index: usize, reason: ReasonCode) {
        let (packet_id, _, out) = self.inflight.remove(index);
        if index < self.resend_from {
            self.resend_from -= 1;
        }
        self.ids.release(packet_id);
        self.events.push_back(ClientEvent::Published { id: out.id, reason });
    }

    fn find(&self, packet_id: PacketId, stage: Stage, qos: QoS) -> Option<usize> {
        self.inflight.iter().position(|(id, st, out)| *id == packet_id && *st == stage && out.publish.qos() == qos)
    }

    fn handle_packet(&mut self, now: Instant, packet: Packet) {
        let v5 = self.config.protocol.is_v5();
        match (self.state, packet) {
            (State::Connecting, Packet::ConnAck(ack)) => self.on_connack(now, *ack),
            (State::Connecting, Packet::Auth(auth)) if v5 => self.events.push_back(ClientEvent::Auth(auth)),
            (State::Connecting, Packet::Disconnect(d)) if v5 => self.close(DisconnectReason::ByServer(d.reason_code)),
            (State::Connecting, _) => self.violation(now, ReasonCode::ProtocolError),
            (State::Connected, Packet::Publish(p)) => self.on_publish(now, p),
            (State::Connected, Packet::PubAck(ack)) => {
                if let Some(i) = self.find(ack.packet_id, Stage::Sent, QoS::AtLeastOnce) {
                    self.complete(i, ack.reason_code);
                    self.pump(now);
                }
            }
            (State::Connected, Packet::PubRec(ack)) => match self.find(ack.packet_id, Stage::Sent, QoS::ExactlyOnce) {
                Some(i) if ack.reason_code.is_error() => {
                    self.complete(i, ack.reason_code);
                    self.pump(now);
                }
                Some(i) => {
                    self.inflight[i].1 = Stage::Released;
                    self.write(now, &Packet::PubRel(Ack::new(ack.packet_id)));
                }
                None => {
                    let mut rel = Ack::new(ack.packet_id);
                    rel.reason_code = ReasonCode::PacketIdentifierNotFound;
                    self.write(now, &Packet::PubRel(rel));
                }
            },
            (State::Connected, Packet::PubComp(ack)) => {
                if let Some(i) = self.find(ack.packet_id, Stage::Released, QoS::ExactlyOnce) {
                    self.complete(i, ack.reason_code);
                    self.pump(now);
                }
            }
            (State::Connected, Packet::PubRel(ack)) => {
                let mut comp = Ack::new(ack.packet_id);
                if !self.incoming_qos2.remove(&ack.packet_id.get()) {
                    comp.reason_code = ReasonCode::PacketIdentifierNotFound;
                }
                self.write(now, &Packet::PubComp(comp));
            }
            (State::Connected, Packet::SubAck(ack)) => self.on_suback(ack),
            (State::Connected, Packet::UnsubAck(ack)) => self.on_unsuback(ack),
            (State::Connected, Packet::PingResp) => self.ping_deadline = None,
            (State::Connected, Packet::Disconnect(d)) => self.close(DisconnectReason::ByServer(d.reason_code)),
            (State::Connected, Packet::Auth(auth)) if v5 => self.events.push_back(ClientEvent::Auth(auth)),
            // CONNACK twice, or packets only a client sends.
            (State::Connected, _) => self.violation(now, ReasonCode::ProtocolError),
            (State::Idle | State::Closed, _) => {}
        }
    }

    fn on_connack(&mut self, now: Instant, ack: ConnAck) {
        self.connack_deadline = None;
        if ack.reason_code != ReasonCode::Success {
            self.state = State::Closed;
            self.events.push_back(ClientEvent::Refused { reason: ack.reason_code });
            return;
        }
        // We asked for a new session: a server claiming to have one is broken [MQTT-3.2.2-4].
        if ack.session_present && self.config.clean_start {
            self.violation(now, ReasonCode::ProtocolError);
            return;
        }
        let p = &*ack.properties;
        self.server_receive_maximum = p.receive_maximum.map_or(u16::MAX, |v| v.get());
        self.server_maximum_packet_size =
            p.maximum_packet_size.map_or(mqtt_proto::PROTOCOL_MAX_PACKET_SIZE, |v| v.get());
        self.server_maximum_qos = p.maximum_qos.unwrap_or(QoS::ExactlyOnce);
        self.server_retain_available = p.retain_available.unwrap_or(true);
        self.server_topic_alias_maximum = p.topic_alias_maximum.unwrap_or(0);
        if let Some(ka) = p.server_keep_alive {
            self.keep_alive = Duration::from_secs(u64::from(ka));
        }
        if let Some(id) = &p.assigned_client_identifier {
            self.client_id = id.as_str().to_string();
        }
        self.state = State::Connected;
        // Reconnections resume the session when the server keeps one: an MQTT 5 session with an
        // expiry. (In 3.1.1 clean_session=false would create a persistent session the user did
        // not ask for, so the configured value stays.)
        if self.config.protocol.is_v5() && self.config.session_expiry > 0 {
            self.config.clean_start = false;
        }
        self.events.push_back(ClientEvent::Connected {
            session_present: ack.session_present,
            client_id: self.client_id.clone(),
        });
        if ack.session_present {
            // Resend what the server has not acknowledged (`pump` does, within its Receive
            // Maximum). A PUBLISH this server's limits no longer allow completes with its
            // reason instead.
            self.resend_from = 0;
            let mut i = 0;
            while i < self.inflight.len() {
                if self.inflight[i].1 == Stage::Sent {
                    if let Some(reason) = self.refusal(&self.inflight[i].2.publish) {
                        self.complete(i, reason);
                        continue;
                    }
                }
                i += 1;
            }
        } else {
            // The server forgot everything: what was in flight goes out again as new messages,
            // ahead of the queue, and the subscriptions are made again.
            self.incoming_qos2.clear();
            for (packet_id, _, out) in self.inflight.drain(..).rev() {
                self.ids.release(packet_id);
                self.queued.push_front(out);
            }
            self.resend_from = 0;
            if !self.subscriptions.is_empty() {
                if let Some(packet_id) = self.ids.allocate() {
                    let subscriptions = self.subscriptions.iter().cloned().collect();
                    self.requests.insert(packet_id.get(), Request::Resubscribe);
                    self.write(
                        now,
                        &Packet::Subscribe(Subscribe { packet_id, properties: Default::default(), subscriptions }),
                    );
                }
            }
        }
        self.pump(now);
    }

    fn on_publish(&mut self, now: Instant, mut publish: Publish) {
        // Topic aliases (MQTT 5): set or use.
        if let Some(alias) = publish.properties.topic_alias {
            if alias.get() > self.config.topic_alias_maximum {
                return self.violation(now, ReasonCode::TopicAliasInvalid);
            }
            if publish.topic.is_empty() {
                match self.aliases.get(&alias.get()) {
                    Some(topic) => publish.topic = topic.clone(),
                    None => return self.violation(now, ReasonCode::ProtocolError),
                }
            } else {
                self.aliases.insert(alias.get(), publish.topic.clone());
            }
        }
        match publish.qos_pid {
            QosPid::AtMostOnce => self.events.push_back(ClientEvent::Message(publish)),
            QosPid::AtLeastOnce(id) => {
                self.events.push_back(ClientEvent::Message(publish));
                self.write(now, &Packet::PubAck(Ack::new(id)));
            }
            QosPid::ExactlyOnce(id) => {
                if !self.incoming_qos2.contains(&id.get()) {
                    if self.incoming_qos2.len() >= usize::from(self.config.receive_maximum) {
                        return self.violation(now, ReasonCode::ReceiveMaximumExceeded);
                    }
                    self.incoming_qos2.insert(id.get());
                    self.events.push_back(ClientEvent::Message(publish));
                }
                // A duplicate gets PUBREC again but is not delivered again.
                self.write(now, &Packet::PubRec(Ack::new(id)));
            }
        }
    }

    fn on_suback(&mut self, ack: SubAck) {
        let Some(request) = self.requests.remove(&ack.packet_id.get()) else { return };
        self.ids.release(ack.packet_id);
        let codes: Vec<ReasonCode> = ack.reason_codes.to_vec();
        match request {
            Request::Subscribe(id, subs) => {
                for (sub, code) in subs.into_iter().zip(&codes) {
                    if !code.is_error() {
                        self.subscriptions.retain(|s| s.filter != sub.filter);
                        self.subscriptions.push(sub);
                    }
                }
                self.events.push_back(ClientEvent::Subscribed { id, reason_codes: codes });
            }
            Request::Resubscribe => {}
            Request::Unsubscribe(..) => {}
        }
    }

    fn on_unsuback(&mut self, ack: UnsubAck) {
        let Some(request) = self.requests.remove(&ack.packet_id.get()) else { return };
        self.ids.release(ack.packet_id);
        if let Request::Unsubscribe(id, filters) = request {
            self.subscriptions.retain(|s| !filters.contains(&s.filter));
            self.events.push_back(ClientEvent::Unsubscribed { id, reason_codes: ack.reason_codes.to_vec() });
        }
    }
}

/// A configured string, validated by `ClientSession::new`.
fn string(s: &str) -> MqttString {
    MqttString::try_from(s).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqtt_proto::{SubscriptionOptions, UnsubAck};
    use std::num::NonZeroU16;

    /// A session and a scripted server: what the client writes is decoded as the server would.
    struct Harness {
        session: ClientSession,
        server: Decoder,
        now: Instant,
    }

    impl Harness {
        fn new(config: ClientSessionConfig) -> Harness {
            #[allow(clippy::disallowed_methods)]
            let now = Instant::now();
            let server = Decoder::new(config.protocol);
            Harness { session: ClientSession::new(config).unwrap(), server, now }
        }

        fn connected(config: ClientSessionConfig, connack: ConnAck) -> Harness {
            let mut h = Harness::new(config);
            h.session.connect(h.now).unwrap();
            assert!(matches!(h.sent()[..], [Packet::Connect(_)]));
            h.feed(connack.into());
            assert!(matches!(h.events()[..], [ClientEvent::Connected { .. }]));
            h
        }

        fn v5() -> Harness {
            Harness::connected(ClientSessionConfig::default(), ConnAck::default())
        }

        fn feed(&mut self, packet: Packet) {
            let mut b = BytesMut::new();
            packet.encode(self.session.config.protocol, &mut b).unwrap();
            self.session.handle_bytes(self.now, &b);
        }

        fn sent(&mut self) -> Vec<Packet> {
            let mut buf = BytesMut::new();
            while let Some(b) = self.session.poll_transmit() {
                buf.extend_from_slice(&b);
            }
            let mut out = Vec::new();
            while let Some(p) = self.server.decode(&mut buf).unwrap() {
                if let Packet::Connect(c) = &p {
                    self.server.set_protocol(c.protocol);
                }
                out.push(p);
            }
            out
        }

        fn events(&mut self) -> Vec<ClientEvent> {
            std::iter::from_fn(|| self.session.poll_event()).collect()
        }

        fn advance(&mut self, d: Duration) {
            self.now += d;
            self.session.handle_timeout(self.now);
        }
    }

    fn publish(topic: &str, qos: QoS) -> Publish {
        let mut p = Publish::new(TopicName::new(topic).unwrap(), &b"payload"[..]);
        p.qos_pid = QosPid::from_parts(qos, PacketId::MIN);
        p
    }

    /// [MQTT-3.2.2-4]: a server claiming a session after we asked for a clean start is broken:
    /// the connection ends as a protocol violation.
    #[test]
    fn session_present_after_a_clean_start_closes_the_connection() {
        let mut h = Harness::new(ClientSessionConfig::default());
        h.session.connect(h.now).unwrap();
        h.sent();
        h.feed(ConnAck { session_present: true, ..Default::default() }.into());
        assert_eq!(
            h.events(),
            [ClientEvent::Disconnected { reason: DisconnectReason::ProtocolViolation(ReasonCode::ProtocolError) }]
        );
        assert!(!h.session.is_connected());
    }

    /// [MQTT-3.2.2-15]: nothing we send exceeds the server's Maximum Packet Size: a topic alias
    /// is left off when its bytes would not fit, and a SUBSCRIBE that cannot fit is refused
    /// (found by the `client_session` fuzzer).
    #[test]
    fn nothing_sent_exceeds_the_server_maximum_packet_size() {
        let mut ack = ConnAck::default();
        ack.properties.maximum_packet_size = std::num::NonZeroU32::new(40);
        ack.properties.topic_alias_maximum = Some(4);
        let mut h = Harness::connected(ClientSessionConfig::default(), ack);
        // 40 bytes exactly without an alias; an alias would add 3.
        let p = Publish::new(TopicName::new("t").unwrap(), vec![0u8; 34]);
        assert_eq!(p.encoded_len(Protocol::V5).unwrap(), 40);
        h.session.publish(h.now, p).unwrap();
        assert!(matches!(&h.sent()[..], [Packet::Publish(p)] if p.properties.topic_alias.is_none()));
        let long = TopicFilter::new("x".repeat(60)).unwrap();
        let refused = h.session.subscribe(h.now, vec![Subscription::new(long.clone(), QoS::AtMostOnce)], None);
        assert!(matches!(refused, Err(CommandError::PacketTooLarge { max: 40, .. })), "{refused:?}");
        assert!(matches!(h.session.unsubscribe(h.now, vec![long]), Err(CommandError::PacketTooLarge { .. })));
        assert!(h.sent().is_empty());
    }

    /// [MQTT-4.12.0-7]: without an authentication method in CONNECT, the client sends no AUTH.
    #[test]
    fn auth_needs_an_authentication_method() {
        let mut h = Harness::v5();
        assert_eq!(h.session.auth(h.now, Auth::default()), Err(CommandError::NoAuthenticationMethod));
        assert!(h.sent().is_empty());
    }

    /// A session whose CONNECT names the authentication method `m`.
    fn with_method(m: &str, connack: ConnAck) -> Harness {
        let mut config = ClientSessionConfig::default();
        config.connect_properties.authentication_method = Some(string(m));
        Harness::connected(config, connack)
    }

    #[test]
    fn auth_carries_the_connect_method() {
        let mut h = with_method("SCRAM-SHA-256", ConnAck::default());
        let auth = Auth { reason_code: ReasonCode::ContinueAuthentication, ..Default::default() };
        h.session.auth(h.now, auth.clone()).unwrap();
        let sent = h.sent();
        let [Packet::Auth(a)] = &sent[..] else { panic!("{sent:?}") };
        assert_eq!(a.properties.authentication_method, Some(string("SCRAM-SHA-256")), "filled in");
        let mut other = auth;
        other.properties.authentication_method = Some(string("PLAIN"));
        let refused = h.session.auth(h.now, other);
        assert!(matches!(refused, Err(CommandError::AuthenticationMethodMismatch { .. })), "{refused:?}");
        assert!(h.sent().is_empty());
    }

    #[test]
    fn auth_drops_its_diagnostics_to_fit_the_server_maximum_packet_size() {
        let mut ack = ConnAck::default();
        ack.properties.maximum_packet_size = std::num::NonZeroU32::new(64);
        let mut h = with_method("m", ack);
        let mut auth = Auth { reason_code: ReasonCode::ContinueAuthentication, ..Default::default() };
        auth.properties.authentication_data = Some(Bytes::from_static(b"challenge"));
        auth.properties.reason_string = Some(string(&"r".repeat(100)));
        auth.properties.user_properties.push((string("k"), string(&"v".repeat(100))));
        h.session.auth(h.now, auth.clone()).unwrap();
        let sent = h.sent();
        let [Packet::Auth(a)] = &sent[..] else { panic!("{sent:?}") };
        assert_eq!(a.properties.reason_string, None);
        assert!(a.properties.user_properties.is_empty());
        assert_eq!(a.properties.authentication_data, Some(Bytes::from_static(b"challenge")), "data kept");
        // Data alone too large: refused, nothing sent, the connection stays.
        auth.properties.authentication_data = Some(Bytes::from(vec![0u8; 100]));
        assert!(matches!(h.session.auth(h.now, auth), Err(CommandError::PacketTooLarge { max: 64, .. })));
        assert!(h.sent().is_empty());
        assert!(h.session.is_connected());
    }

    #[test]
    fn resume_resends_within_a_smaller_receive_maximum_in_order() {
        let config = ClientSessionConfig { session_expiry: 3600, ..Default::default() };
        let mut h = Harness::connected(config, ConnAck::default());
        for i in 0..5 {
            h.session.publish(h.now, publish(&format!("q{i}"), QoS::AtLeastOnce)).unwrap();
        }
        let first: Vec<PacketId> =
            h.sent().iter().filter_map(|p| if let Packet::Publish(p) = p { p.packet_id() } else { None }).collect();
        assert_eq!(first.len(), 5);
        h.session.connection_lost(h.now);
        h.events();
        h.session.connect(h.now).unwrap();
        h.sent();
        let mut ack = ConnAck { session_present: true, ..Default::default() };
        ack.properties.receive_maximum = NonZeroU16::new(2);
        h.feed(ack.into());
        let resent = |h: &mut Harness| -> Vec<PacketId> {
            h.sent()
                .iter()
                .filter_map(|p| match p {
                    Packet::Publish(p) if p.dup => p.packet_id(),
                    Packet::Publish(p) => panic!("a new publish before the old ones: {p:?}"),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(resent(&mut h), first[..2], "two in flight at most [MQTT-4.9.0-2]");
        h.feed(Packet::PubAck(Ack::new(first[0])));
        assert_eq!(resent(&mut h), first[2..3], "an acknowledgement makes room for the next, in order");
        h.feed(Packet::PubAck(Ack::new(first[1])));
        h.feed(Packet::PubAck(Ack::new(first[2])));
        assert_eq!(resent(&mut h), first[3..5]);
        h.feed(Packet::PubAck(Ack::new(first[3])));
        h.feed(Packet::PubAck(Ack::new(first[4])));
        let done = h.events().iter().filter(|e| matches!(e, ClientEvent::Published { .. })).count();
        assert_eq!(done, 5);
        assert_eq!(h.session.pending_publishes(), 0);
    }

    #[test]
    fn with_an_authentication_method_only_auth_goes_out_before_connack() {
        let mut config = ClientSessionConfig::default();
        config.connect_properties.authentication_method = Some(string("m"));
        let mut h = Harness::new(config);
        h.session.connect(h.now).unwrap();
        assert!(matches!(h.sent()[..], [Packet::Connect(_)]));
        // While connecting: QoS 0 and subscriptions are refused, QoS 1 waits; AUTH goes out.
        let filter = TopicFilter::new("t").unwrap();
        assert_eq!(h.session.publish(h.now, publish("t", QoS::AtMostOnce)), Err(CommandError::NotConnected));
        assert!(h.session.subscribe(h.now, vec![Subscription::new(filter.clone(), QoS::AtMostOnce)], None).is_err());
        assert!(h.session.unsubscribe(h.now, vec![filter]).is_err());
        h.session.publish(h.now, publish("t", QoS::AtLeastOnce)).unwrap();
        h.advance(Duration::from_secs(1));
        assert!(h.sent().is_empty(), "nothing but AUTH or DISCONNECT before CONNACK [MQTT-3.1.2-30]");
        h.session.auth(h.now, Auth { reason_code: ReasonCode::ContinueAuthentication, ..Default::default() }).unwrap();
        assert!(matches!(h.sent()[..], [Packet::Auth(_)]));
        let mut ack = ConnAck::default();
        ack.properties.authentication_method = Some(string("m"));
        h.feed(ack.into());
        assert!(matches!(h.sent()[..], [Packet::Publish(_)]), "the queued publish after CONNACK");
    }

    #[test]
    fn no_topic_alias_when_the_server_allows_none() {
        // CONNACK without Topic Alias Maximum (absent means 0), then one announcing 0.
        for maximum in [None, Some(0)] {
            let mut ack = ConnAck::default();
            ack.properties.topic_alias_maximum = maximum;
            let mut h = Harness::connected(ClientSessionConfig::default(), ack);
            for _ in 0..3 {
                h.session.publish(h.now, publish("a/b", QoS::AtMostOnce)).unwrap();
            }
            for p in h.sent() {
                let Packet::Publish(p) = p else { panic!("{p:?}") };
                assert!(p.properties.topic_alias.is_none() && p.topic.as_str() == "a/b", "[MQTT-3.2.2-18]");
            }
        }
    }

    #[test]
    fn acknowledgements_go_out_in_the_order_their_packets_arrived() {
        let mut h = Harness::v5();
        // PUBACKs in the order the QoS 1 PUBLISHes arrived [MQTT-4.6.0-2], PUBRECs likewise
        // for QoS 2 [MQTT-4.6.0-3]: identifiers deliberately out of numeric order.
        let order = [5u16, 2, 9, 1];
        for (qos, make) in [
            (QoS::AtLeastOnce, QosPid::AtLeastOnce as fn(PacketId) -> QosPid),
            (QoS::ExactlyOnce, QosPid::ExactlyOnce as fn(PacketId) -> QosPid),
        ] {
            for id in order {
                let mut p = publish("in", qos);
                p.qos_pid = make(pid(id));
                h.feed(Packet::Publish(p));
            }
            let acked: Vec<u16> = h
                .sent()
                .into_iter()
                .map(|p| match p {
                    Packet::PubAck(a) | Packet::PubRec(a) => a.packet_id.get(),
                    other => panic!("{other:?}"),
                })
                .collect();
            assert_eq!(acked, order, "{qos:?}");
        }
        // PUBRELs in the order the PUBRECs arrived [MQTT-4.6.0-4].
        for i in 0..3 {
            h.session.publish(h.now, publish(&format!("out/{i}"), QoS::ExactlyOnce)).unwrap();
        }
        let ids: Vec<PacketId> =
            h.sent().iter().filter_map(|p| if let Packet::Publish(p) = p { p.packet_id() } else { None }).collect();
        for i in [2, 0, 1] {
            h.feed(Packet::PubRec(Ack::new(ids[i])));
        }
        let released: Vec<PacketId> =
            h.sent().iter().filter_map(|p| if let Packet::PubRel(a) = p { Some(a.packet_id) } else { None }).collect();
        assert_eq!(released, [ids[2], ids[0], ids[1]]);
    }

    /// [MQTT-3.3.4-6]: a client PUBLISH carries no Subscription Identifier, even when the
    /// application republishes a message it received.
    #[test]
    fn republished_messages_lose_their_subscription_identifiers() {
        let mut h = Harness::v5();
        let mut p = publish("t", QoS::AtMostOnce);
        p.properties.subscription_identifiers.push(mqtt_proto::SubscriptionId::new(3).unwrap());
        h.session.publish(h.now, p).unwrap();
        assert!(matches!(&h.sent()[..], [Packet::Publish(p)] if p.properties.subscription_identifiers.is_empty()));
    }

    /// Messages queued before CONNACK are checked against the limits it announces
    /// [MQTT-3.2.2-11] [MQTT-3.2.2-14] [MQTT-3.2.2-15]: what this server does not allow
    /// completes with the reason instead of going out (found by the `client_session` fuzzer: a
    /// 66-byte PUBLISH was sent to a server accepting 64).
    #[test]
    fn queued_messages_obey_the_limits_connack_announces() {
        let mut h = Harness::new(ClientSessionConfig::default());
        h.session.connect(h.now).unwrap();
        h.sent();
        let big = Publish::new(TopicName::new("t").unwrap(), vec![0u8; 100]).with_qos(QoS::AtLeastOnce);
        let big = h.session.publish(h.now, big).unwrap();
        let qos2 = h.session.publish(h.now, publish("t", QoS::ExactlyOnce)).unwrap();
        let mut retained = publish("t", QoS::AtLeastOnce);
        retained.retain = true;
        let retained = h.session.publish(h.now, retained).unwrap();
        let fine = h.session.publish(h.now, publish("t", QoS::AtLeastOnce)).unwrap();
        let mut ack = ConnAck::default();
        ack.properties.maximum_packet_size = std::num::NonZeroU32::new(64);
        ack.properties.maximum_qos = Some(QoS::AtLeastOnce);
        ack.properties.retain_available = Some(false);
        h.feed(ack.into());
        let events = h.events();
        for (id, reason) in [
            (big, ReasonCode::PacketTooLarge),
            (qos2, ReasonCode::QosNotSupported),
            (retained, ReasonCode::RetainNotSupported),
        ] {
            assert!(events.contains(&ClientEvent::Published { id, reason }), "{id:?} {reason:?} in {events:?}");
        }
        let sent = h.sent();
        assert!(matches!(&sent[..], [Packet::Publish(p)] if p.qos() == QoS::AtLeastOnce && !p.retain), "{sent:?}");
        let _ = fine;
    }

    fn pid(v: u16) -> PacketId {
        PacketId::new(v).unwrap()
    }

    fn ack_with(id: u16, code: ReasonCode) -> Ack {
        let mut a = Ack::new(pid(id));
        a.reason_code = code;
        a
    }

    #[test]
    fn connect_carries_the_configured_properties() {
        let config = ClientSessionConfig {
            client_id: "dev-1".into(),
            keep_alive: 30,
            session_expiry: 600,
            receive_maximum: 10,
            topic_alias_maximum: 5,
            ..Default::default()
        };
        let mut h = Harness::new(config);
        h.session.connect(h.now).unwrap();
        let Packet::Connect(c) = h.sent().remove(0) else { panic!("no CONNECT") };
        assert_eq!(c.client_id, "dev-1");
        assert_eq!(c.keep_alive, 30);
        assert_eq!(c.properties.session_expiry_interval, Some(600));
        assert_eq!(c.properties.receive_maximum, NonZeroU16::new(10));
        assert_eq!(c.properties.topic_alias_maximum, Some(5));
        assert_eq!(h.session.connect(h.now), Err(CommandError::AlreadyConnected));
    }

    #[test]
    fn extra_connect_properties_are_sent() {
        let mut extra = ConnectProperties::default();
        extra.request_problem_information = Some(false);
        extra.authentication_method = Some(MqttString::from_static("SCRAM-SHA-256"));
        extra.user_properties.push((MqttString::from_static("site"), MqttString::from_static("7")));
        let mut h = Harness::new(ClientSessionConfig { connect_properties: extra, ..Default::default() });
        h.session.connect(h.now).unwrap();
        let Packet::Connect(c) = h.sent().remove(0) else { panic!() };
        assert_eq!(c.properties.request_problem_information, Some(false));
        assert_eq!(c.properties.authentication_method.as_ref().map(|m| m.as_str()), Some("SCRAM-SHA-256"));
        assert_eq!(c.properties.user_properties.len(), 1);
        assert_eq!(c.properties.receive_maximum, NonZeroU16::new(DEFAULT_WINDOW), "session fields still set");
    }

    #[test]
    fn invalid_configuration_is_refused() {
        let bad = ClientSessionConfig { client_id: "a\0b".into(), ..Default::default() };
        assert!(matches!(ClientSession::new(bad), Err(ConfigError::Invalid(m)) if m.contains("client_id")));
    }

    #[test]
    fn assigned_client_id_and_server_keep_alive_are_honoured() {
        let mut ack = ConnAck::default();
        ack.properties.assigned_client_identifier = Some(MqttString::from_static("auto-42"));
        ack.properties.server_keep_alive = Some(5);
        let mut h = Harness::new(ClientSessionConfig::default());
        h.session.connect(h.now).unwrap();
        h.sent();
        h.feed(ack.into());
        assert!(matches!(&h.events()[..], [ClientEvent::Connected { client_id, .. }] if client_id == "auto-42"));
        h.advance(Duration::from_secs(5));
        assert_eq!(h.sent(), [Packet::PingReq]);
    }

    #[test]
    fn refusal_is_reported() {
        let mut h = Harness::new(ClientSessionConfig::default());
        h.session.connect(h.now).unwrap();
        h.feed(ConnAck { reason_code: ReasonCode::NotAuthorized, ..Default::default() }.into());
        assert_eq!(h.events(), [ClientEvent::Refused { reason: ReasonCode::NotAuthorized }]);
    }

    #[test]
    fn connect_timeout() {
        let mut h = Harness::new(ClientSessionConfig::default());
        h.session.connect(h.now).unwrap();
        h.advance(Duration::from_secs(9));
        assert!(h.events().is_empty());
        h.advance(Duration::from_secs(1));
        assert_eq!(h.events(), [ClientEvent::Disconnected { reason: DisconnectReason::ConnectTimeout }]);
    }

    #[test]
    fn qos1_publish_completes_on_puback() {
        let mut h = Harness::v5();
        let id = h.session.publish(h.now, publish("a/b", QoS::AtLeastOnce)).unwrap();
        let sent = h.sent();
        let Packet::Publish(p) = &sent[0] else { panic!("{sent:?}") };
        let packet_id = p.packet_id().unwrap();
        assert!(!p.dup);
        h.feed(Packet::PubAck(Ack::new(packet_id)));
        assert_eq!(h.events(), [ClientEvent::Published { id, reason: ReasonCode::Success }]);
        assert_eq!(h.session.pending_publishes(), 0);
    }

    #[test]
    fn qos2_publish_runs_pubrec_pubrel_pubcomp() {
        let mut h = Harness::v5();
        let id = h.session.publish(h.now, publish("a/b", QoS::ExactlyOnce)).unwrap();
        let Packet::Publish(p) = h.sent().remove(0) else { panic!() };
        let packet_id = p.packet_id().unwrap();
        h.feed(Packet::PubRec(Ack::new(packet_id)));
        assert_eq!(h.sent(), [Packet::PubRel(Ack::new(packet_id))]);
        assert!(h.events().is_empty(), "not complete before PUBCOMP");
        h.feed(Packet::PubComp(Ack::new(packet_id)));
        assert_eq!(h.events(), [ClientEvent::Published { id, reason: ReasonCode::Success }]);
    }

    #[test]
    fn qos2_refused_at_pubrec_completes_with_the_failure() {
        let mut h = Harness::v5();
        let id = h.session.publish(h.now, publish("a/b", QoS::ExactlyOnce)).unwrap();
        let Packet::Publish(p) = h.sent().remove(0) else { panic!() };
        h.feed(Packet::PubRec(ack_with(p.packet_id().unwrap().get(), ReasonCode::QuotaExceeded)));
        assert!(h.sent().is_empty(), "no PUBREL after a failed PUBREC");
        assert_eq!(h.events(), [ClientEvent::Published { id, reason: ReasonCode::QuotaExceeded }]);
    }

    #[test]
    fn receive_maximum_limits_what_is_in_flight() {
        let mut ack = ConnAck::default();
        ack.properties.receive_maximum = NonZeroU16::new(2);
        let mut h = Harness::connected(ClientSessionConfig::default(), ack);
        for _ in 0..5 {
            h.session.publish(h.now, publish("t", QoS::AtLeastOnce)).unwrap();
        }
        let first = h.sent();
        assert_eq!(first.len(), 2, "only two in flight");
        let Packet::Publish(p) = &first[0] else { panic!() };
        h.feed(Packet::PubAck(Ack::new(p.packet_id().unwrap())));
        assert_eq!(h.sent().len(), 1, "one acknowledged, one more sent");
        assert_eq!(h.session.pending_publishes(), 4);
    }

    #[test]
    fn incoming_qos1_and_qos2_are_acknowledged_and_qos2_delivered_once() {
        let mut h = Harness::v5();
        let mut q1 = publish("in/1", QoS::AtLeastOnce);
        q1.qos_pid = QosPid::AtLeastOnce(pid(7));
        h.feed(Packet::Publish(q1.clone()));
        assert_eq!(h.events(), [ClientEvent::Message(q1)]);
        assert_eq!(h.sent(), [Packet::PubAck(Ack::new(pid(7)))]);

        let mut q2 = publish("in/2", QoS::ExactlyOnce);
        q2.qos_pid = QosPid::ExactlyOnce(pid(8));
        h.feed(Packet::Publish(q2.clone()));
        assert_eq!(h.events(), [ClientEvent::Message(q2.clone())]);
        assert_eq!(h.sent(), [Packet::PubRec(Ack::new(pid(8)))]);
        // The server resends (it lost our PUBREC): acknowledged again, not delivered again.
        q2.dup = true;
        h.feed(Packet::Publish(q2));
        assert!(h.events().is_empty());
        assert_eq!(h.sent(), [Packet::PubRec(Ack::new(pid(8)))]);
        h.feed(Packet::PubRel(Ack::new(pid(8))));
        assert_eq!(h.sent(), [Packet::PubComp(Ack::new(pid(8)))]);
        // A PUBREL for an identifier we do not hold.
        h.feed(Packet::PubRel(Ack::new(pid(9))));
        assert_eq!(h.sent(), [Packet::PubComp(ack_with(9, ReasonCode::PacketIdentifierNotFound))]);
    }

    #[test]
    fn server_exceeding_our_receive_maximum_is_disconnected_with_0x93() {
        let config = ClientSessionConfig { receive_maximum: 2, ..Default::default() };
        let mut h = Harness::connected(config, ConnAck::default());
        for id in 1..=3 {
            let mut q2 = publish("x", QoS::ExactlyOnce);
            q2.qos_pid = QosPid::ExactlyOnce(pid(id));
            h.feed(Packet::Publish(q2));
        }
        let sent = h.sent();
        assert_eq!(sent.last(), Some(&Disconnect::new(ReasonCode::ReceiveMaximumExceeded).into()));
        assert!(h.events().contains(&ClientEvent::Disconnected {
            reason: DisconnectReason::ProtocolViolation(ReasonCode::ReceiveMaximumExceeded)
        }));
    }

    #[test]
    fn keep_alive_pings_and_times_out() {
        let config = ClientSessionConfig { keep_alive: 10, ..Default::default() };
        let mut h = Harness::connected(config, ConnAck::default());
        assert_eq!(h.session.poll_timeout(), Some(h.now + Duration::from_secs(10)));
        h.advance(Duration::from_secs(10));
        assert_eq!(h.sent(), [Packet::PingReq]);
        h.feed(Packet::PingResp);
        h.advance(Duration::from_secs(10));
        assert_eq!(h.sent(), [Packet::PingReq]);
        // No PINGRESP this time.
        h.advance(Duration::from_secs(10));
        assert!(h.events().contains(&ClientEvent::Disconnected { reason: DisconnectReason::KeepAliveTimeout }));
    }

    #[test]
    fn sending_anything_postpones_the_ping() {
        let config = ClientSessionConfig { keep_alive: 10, ..Default::default() };
        let mut h = Harness::connected(config, ConnAck::default());
        h.advance(Duration::from_secs(8));
        h.session.publish(h.now, publish("t", QoS::AtMostOnce)).unwrap();
        h.sent();
        h.advance(Duration::from_secs(8));
        assert!(h.sent().is_empty());
        h.advance(Duration::from_secs(2));
        assert_eq!(h.sent(), [Packet::PingReq]);
    }

    #[test]
    fn resumed_session_resends_publish_with_dup_and_pubrel() {
        let config = ClientSessionConfig { session_expiry: 3600, ..Default::default() };
        let mut h = Harness::connected(config, ConnAck::default());
        h.session.publish(h.now, publish("q1", QoS::AtLeastOnce)).unwrap();
        h.session.publish(h.now, publish("q2", QoS::ExactlyOnce)).unwrap();
        let sent = h.sent();
        let ids: Vec<PacketId> =
            sent.iter().filter_map(|p| if let Packet::Publish(p) = p { p.packet_id() } else { None }).collect();
        h.feed(Packet::PubRec(Ack::new(ids[1])));
        h.sent();
        h.session.connection_lost(h.now);
        assert_eq!(h.events(), [ClientEvent::Disconnected { reason: DisconnectReason::TransportLost }]);
        h.session.connect(h.now).unwrap();
        let Packet::Connect(c) = h.sent().remove(0) else { panic!() };
        assert!(!c.clean_start, "reconnects resume the session");
        h.feed(ConnAck { session_present: true, ..Default::default() }.into());
        let resent = h.sent();
        let Packet::Publish(p) = &resent[0] else { panic!("{resent:?}") };
        assert!(p.dup && p.packet_id() == Some(ids[0]) && p.topic.as_str() == "q1");
        assert_eq!(resent[1], Packet::PubRel(Ack::new(ids[1])));
    }

    #[test]
    fn lost_session_sends_pending_publishes_again_and_resubscribes() {
        let mut h = Harness::v5();
        let sub = Subscription {
            filter: TopicFilter::new("cmd/#").unwrap(),
            options: SubscriptionOptions { qos: QoS::AtLeastOnce, ..Default::default() },
        };
        let sid = h.session.subscribe(h.now, vec![sub.clone()], SubscriptionId::new(7)).unwrap();
        let Packet::Subscribe(s) = h.sent().remove(0) else { panic!() };
        assert_eq!(s.properties.subscription_identifier, SubscriptionId::new(7));
        h.feed(Packet::SubAck(SubAck {
            packet_id: s.packet_id,
            properties: Default::default(),
            reason_codes: [ReasonCode::GrantedQos1].into_iter().collect(),
        }));
        assert_eq!(h.events(), [ClientEvent::Subscribed { id: sid, reason_codes: vec![ReasonCode::GrantedQos1] }]);
        h.session.publish(h.now, publish("q1", QoS::AtLeastOnce)).unwrap();
        let pending = h.session.unsubscribe(h.now, vec![TopicFilter::new("x").unwrap()]).unwrap();
        h.sent();
        h.session.connection_lost(h.now);
        assert!(h.events().contains(&ClientEvent::Aborted { id: pending }));
        h.session.connect(h.now).unwrap();
        h.sent();
        h.feed(ConnAck::default().into());
        let after = h.sent();
        assert!(matches!(&after[0], Packet::Subscribe(s) if s.subscriptions.first() == Some(sub)), "{after:?}");
        assert!(matches!(&after[1], Packet::Publish(p) if !p.dup && p.topic.as_str() == "q1"), "{after:?}");
    }

    #[test]
    fn topic_aliases_from_the_server() {
        let config = ClientSessionConfig { topic_alias_maximum: 2, ..Default::default() };
        let mut h = Harness::connected(config, ConnAck::default());
        let mut set = publish("long/topic/name", QoS::AtMostOnce);
        set.properties.topic_alias = NonZeroU16::new(1);
        h.feed(Packet::Publish(set));
        let mut used = Publish::new(TopicName::empty(), &b"x"[..]);
        used.properties.topic_alias = NonZeroU16::new(1);
        h.feed(Packet::Publish(used));
        let events = h.events();
        assert!(matches!(&events[1], ClientEvent::Message(p) if p.topic.as_str() == "long/topic/name"));
        // Beyond our maximum: Topic Alias invalid.
        let mut bad = publish("t", QoS::AtMostOnce);
        bad.properties.topic_alias = NonZeroU16::new(3);
        h.feed(Packet::Publish(bad));
        assert_eq!(h.sent(), [Disconnect::new(ReasonCode::TopicAliasInvalid).into()]);
    }

    #[test]
    fn outbound_topic_aliases_within_the_server_maximum() {
        let mut ack = ConnAck::default();
        ack.properties.topic_alias_maximum = Some(1);
        let mut h = Harness::connected(ClientSessionConfig::default(), ack);
        for topic in ["a/b", "a/b", "c"] {
            h.session.publish(h.now, publish(topic, QoS::AtMostOnce)).unwrap();
        }
        let sent: Vec<(String, Option<u16>)> = h
            .sent()
            .into_iter()
            .map(|p| match p {
                Packet::Publish(p) => (p.topic.to_string(), p.properties.topic_alias.map(|a| a.get())),
                other => panic!("{other:?}"),
            })
            .collect();
        // Set, used, and no alias left for the third topic.
        assert_eq!(sent, [("a/b".into(), Some(1)), ("".into(), Some(1)), ("c".into(), None)]);
    }

    #[test]
    fn unknown_alias_is_a_protocol_error() {
        let mut h = Harness::v5();
        let mut used = Publish::new(TopicName::empty(), &b"x"[..]);
        used.properties.topic_alias = NonZeroU16::new(1);
        h.feed(Packet::Publish(used));
        assert_eq!(h.sent(), [Disconnect::new(ReasonCode::ProtocolError).into()]);
    }

    #[test]
    fn unsubscribe_completes_with_codes() {
        let mut h = Harness::v5();
        let id = h.session.unsubscribe(h.now, vec![TopicFilter::new("a").unwrap()]).unwrap();
        let Packet::Unsubscribe(u) = h.sent().remove(0) else { panic!() };
        h.feed(Packet::UnsubAck(UnsubAck {
            packet_id: u.packet_id,
            properties: Default::default(),
            reason_codes: [ReasonCode::NoSubscriptionExisted].into_iter().collect(),
        }));
        assert_eq!(
            h.events(),
            [ClientEvent::Unsubscribed { id, reason_codes: vec![ReasonCode::NoSubscriptionExisted] }]
        );
    }

    #[test]
    fn server_breaking_the_protocol_gets_the_reason_code() {
        // A packet only clients send.
        let mut h = Harness::v5();
        h.feed(Packet::PingReq);
        assert_eq!(h.sent(), [Disconnect::new(ReasonCode::ProtocolError).into()]);
        // Malformed bytes.
        let mut h = Harness::v5();
        h.session.handle_bytes(h.now, &[0x40, 0x02, 0x00, 0x00]);
        assert_eq!(h.sent(), [Disconnect::new(ReasonCode::MalformedPacket).into()]);
        assert!(h.events().contains(&ClientEvent::Disconnected {
            reason: DisconnectReason::ProtocolViolation(ReasonCode::MalformedPacket)
        }));
        // The server's DISCONNECT.
        let mut h = Harness::v5();
        h.feed(Disconnect::new(ReasonCode::SessionTakenOver).into());
        assert_eq!(
            h.events(),
            [ClientEvent::Disconnected { reason: DisconnectReason::ByServer(ReasonCode::SessionTakenOver) }]
        );
    }

    #[test]
    fn limits_from_connack_are_enforced_on_publish() {
        let mut ack = ConnAck::default();
        ack.properties.maximum_qos = Some(QoS::AtLeastOnce);
        ack.properties.retain_available = Some(false);
        ack.properties.maximum_packet_size = std::num::NonZeroU32::new(64);
        let mut h = Harness::connected(ClientSessionConfig::default(), ack);
        assert_eq!(
            h.session.publish(h.now, publish("t", QoS::ExactlyOnce)),
            Err(CommandError::QosNotSupported(QoS::AtLeastOnce))
        );
        let mut r = publish("t", QoS::AtMostOnce);
        r.retain = true;
        assert_eq!(h.session.publish(h.now, r), Err(CommandError::RetainNotSupported));
        let big = Publish::new(TopicName::new("t").unwrap(), vec![0u8; 100]);
        assert!(matches!(h.session.publish(h.now, big), Err(CommandError::PacketTooLarge { max: 64, .. })));
    }

    #[test]
    fn mqtt_311_session() {
        let config = ClientSessionConfig { protocol: Protocol::V3_1_1, client_id: "c".into(), ..Default::default() };
        let mut h = Harness::connected(config, ConnAck::default());
        let id = h.session.publish(h.now, publish("a", QoS::AtLeastOnce)).unwrap();
        let Packet::Publish(p) = h.sent().remove(0) else { panic!() };
        h.feed(Packet::PubAck(Ack::new(p.packet_id().unwrap())));
        assert_eq!(h.events(), [ClientEvent::Published { id, reason: ReasonCode::Success }]);
        // 3.1.1 has no reason codes to send: a violation just ends the connection.
        h.feed(Packet::PingReq);
        assert!(h.sent().is_empty());
        assert!(matches!(h.events()[..], [ClientEvent::Disconnected { .. }]));
    }
}
