//! The client session: CONNECT/CONNACK, keep-alive, QoS 1 and 2 both ways, receive-maximum flow
//! control, topic aliases from the server, and resumption after a reconnect.

use super::alias_in::IncomingAliases;
use super::inbound::{Arrival, Inbound};
use super::outbound::{Outbound, PubRec, Step};
use super::timer::{earliest, Timer};
use super::writer::Writer;
use super::DEFAULT_WINDOW;
use crate::config::ConfigError;
use crate::persist::client::{self as client_store, ClientJournal};
use crate::persist::{ClientRestored, RestoreError, StoreBatch, StoredRecord};
use bytes::{Bytes, BytesMut};
use mqtt_proto::{
    Ack, Auth, ConnAck, Connect, ConnectProperties, Decoder, Disconnect, MqttString, Packet, PacketId, Protocol,
    Publish, QoS, QosPid, ReasonCode, SubAck, Subscribe, Subscription, SubscriptionId, TopicFilter, TopicName,
    UnsubAck, Unsubscribe, Will,
};
use std::collections::{BTreeMap, VecDeque};
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
    /// The application acknowledges the server's QoS 1 and 2 messages itself, with
    /// [`ClientSession::ack`], once it has done with them (a bridge: once they are kept
    /// elsewhere); until then the server keeps them. Off: acknowledged on arrival. Only the
    /// control stream's messages: data streams acknowledge on arrival.
    pub manual_acks: bool,
    /// Say in CONNECT that this client is a bridge (mosquitto's flag, MQTT 3.1 and 3.1.1): a
    /// server that knows it does not send back what the bridge published. MQTT 5 uses No Local
    /// instead.
    pub bridge: bool,
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
            manual_acks: false,
            bridge: false,
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
    /// may not have taken effect; repeat it on the next connection. Fires once per request.
    ///
    /// On a data stream (see [`ClientSession::data_stream`]) it also ends a QoS 2 publish that
    /// was in flight when the stream ended (the connection was lost, the server reset the
    /// stream, or the stream was closed): the server's QoS 2 state for it died with the stream,
    /// so sending it again could deliver it twice, and the session gives it up instead (it may
    /// or may not have been delivered). Closing a data stream ends every publish still pending
    /// on it this way.
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

pub use crate::error::CommandError;

#[derive(Debug, Clone)]
enum Request {
    Subscribe(RequestId, Vec<Subscription>),
    Unsubscribe(RequestId, Vec<TopicFilter>),
    /// A resubscription after a lost session: no event.
    Resubscribe,
}

/// A data stream's subscribe or unsubscribe, made while its stream was not open: it goes out
/// once the stream is (see [`ClientSession::resume_data_stream`]).
#[derive(Debug, Clone)]
enum Waiting {
    Subscribe(RequestId, Vec<Subscription>, Option<SubscriptionId>),
    Unsubscribe(RequestId, Vec<TopicFilter>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    Connecting,
    Connected,
    /// Disconnected event sent; waiting for `handle_stream_closed` or a new `connect`.
    Closed,
}

/// The client side of one MQTT connection (and the session that outlives it).
pub struct ClientSession {
    config: ClientSessionConfig,
    state: State,
    decoder: Decoder,
    inbuf: BytesMut,
    /// Our packets, within the server's Maximum Packet Size.
    writer: Writer,
    events: VecDeque<ClientEvent>,
    next_request: u64,
    /// Our QoS 1 and 2 publishes, queued and in flight, and the packet identifiers of every
    /// request (SUBSCRIBE and UNSUBSCRIBE take theirs from the same space).
    outbound: Outbound,
    /// The server's QoS 2 publishes acknowledged with PUBREC, waiting for PUBREL.
    inbound: Inbound,
    requests: BTreeMap<u16, Request>,
    /// Subscriptions the server granted, to restore when a session is lost.
    subscriptions: Vec<Subscription>,
    /// Aliases the server set on this connection.
    aliases: IncomingAliases,
    /// Aliases we assigned to topics on this connection (outbound).
    out_aliases: BTreeMap<TopicName, u16>,
    server_topic_alias_maximum: u16,
    // Limits from CONNACK (the Maximum Packet Size is the writer's).
    server_receive_maximum: u16,
    server_maximum_qos: QoS,
    server_retain_available: bool,
    keep_alive: Duration,
    client_id: String,
    // Timers.
    connack_deadline: Timer,
    /// When we last wrote a packet: keep-alive counts from here.
    last_sent: Option<Instant>,
    ping_deadline: Timer,
    /// With a store (see [`ClientSession::restore`]): changes to write, and the output that
    /// waits for them.
    store: Option<ClientJournal>,
    /// Our side ended the connection while output waited for the store: that output was
    /// dropped, and the DISCONNECT goes out without waiting.
    unheld: bool,
    /// A data stream's session (see [`ClientSession::data_stream`]).
    data_stream: bool,
    /// A data stream's requests made while its stream was not open.
    waiting: VecDeque<Waiting>,
    /// With `manual_acks`: the server's QoS 1 and 2 messages handed on and not yet
    /// acknowledged on this connection, by packet identifier.
    held: BTreeMap<u16, QoS>,
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
            writer: Writer::new(config.protocol),
            events: VecDeque::new(),
            next_request: 0,
            outbound: Outbound::default(),
            inbound: Inbound::default(),
            requests: BTreeMap::new(),
            subscriptions: Vec::new(),
            aliases: IncomingAliases::default(),
            out_aliases: BTreeMap::new(),
            server_topic_alias_maximum: 0,
            server_receive_maximum: u16::MAX,
            server_maximum_qos: QoS::ExactlyOnce,
            server_retain_available: true,
            keep_alive: Duration::from_secs(u64::from(config.keep_alive)),
            client_id: config.client_id.clone(),
            connack_deadline: Timer::default(),
            last_sent: None,
            ping_deadline: Timer::default(),
            store: None,
            unheld: false,
            data_stream: false,
            waiting: VecDeque::new(),
            held: BTreeMap::new(),
            config,
        })
    }

    /// The session of a data stream of this connection (EMQX's multi-stream mode, mirroring
    /// [`ServerSession::data_stream`](crate::session::server::ServerSession::data_stream)):
    /// PUBLISH through UNSUBACK with its own packet identifiers, in-flight window and QoS 2
    /// state, under the limits the server announced in this session's CONNACK. It is not
    /// connected until [`ClientSession::resume_data_stream`] says its QUIC stream is open;
    /// QoS 1 and 2 publishes, subscribes and unsubscribes made before wait for it (QoS 0 needs
    /// the stream, as it needs a connection on the control stream).
    ///
    /// CONNECT, keep-alive, AUTH and DISCONNECT stay with this (the control stream's) session:
    /// a data stream sends none of them ([`ClientSession::connect`], [`ClientSession::auth`]
    /// and [`ClientSession::disconnect`] are refused with [`CommandError::WrongState`]), and a
    /// CONNACK, PINGRESP, AUTH or DISCONNECT arriving on it is a protocol error that ends the
    /// stream only ([`ClientEvent::Disconnected`] with
    /// [`DisconnectReason::ProtocolViolation`], and no DISCONNECT written). It uses no topic
    /// aliases towards the server (a server may keep one alias table per connection, not per
    /// stream), and has no store: what it publishes is not kept across a restart.
    ///
    /// Request ids continue this session's numbering; a caller with several sessions keeps
    /// them apart (as [`ClientMachine`](crate::client::ClientMachine) does).
    pub fn data_stream(&self) -> ClientSession {
        // (Acknowledgements by hand are the control stream's: `ClientMachine::ack` takes no stream.)
        let config = ClientSessionConfig { keep_alive: 0, will: None, manual_acks: false, ..self.config.clone() };
        let decoder = Decoder::new(self.config.protocol).with_max_packet_size(config.maximum_packet_size);
        let mut writer = Writer::new(self.config.protocol);
        writer.set_max(self.writer.max());
        ClientSession {
            decoder,
            state: State::Idle,
            inbuf: BytesMut::new(),
            writer,
            events: VecDeque::new(),
            next_request: self.next_request,
            outbound: Outbound::default(),
            inbound: Inbound::default(),
            requests: BTreeMap::new(),
            subscriptions: Vec::new(),
            aliases: IncomingAliases::default(),
            out_aliases: BTreeMap::new(),
            server_topic_alias_maximum: 0,
            server_receive_maximum: self.server_receive_maximum,
            server_maximum_qos: self.server_maximum_qos,
            server_retain_available: self.server_retain_available,
            keep_alive: Duration::ZERO,
            client_id: self.client_id.clone(),
            connack_deadline: Timer::default(),
            last_sent: None,
            ping_deadline: Timer::default(),
            store: None,
            unheld: false,
            data_stream: true,
            waiting: VecDeque::new(),
            held: BTreeMap::new(),
            config,
        }
    }

    /// Whether this is a data stream's session (see [`ClientSession::data_stream`]).
    pub fn is_data_stream(&self) -> bool {
        self.data_stream
    }

    /// A data stream's session goes live on a newly opened QUIC stream, `control` being the
    /// connection's session, connected: it takes the limits of `control`'s CONNACK, and since
    /// the server knows nothing of a new stream, it makes its subscriptions again, sends its
    /// unacknowledged QoS 1 publishes again (with DUP), then what waited. Refused with
    /// [`CommandError::WrongState`] for a session that is not a data stream's, one already
    /// live, or while `control` is not connected.
    pub fn resume_data_stream(&mut self, now: Instant, control: &ClientSession) -> Result<(), CommandError> {
        if !self.data_stream || self.state == State::Connected || control.state != State::Connected {
            return Err(CommandError::WrongState);
        }
        self.server_receive_maximum = control.server_receive_maximum;
        self.server_maximum_qos = control.server_maximum_qos;
        self.server_retain_available = control.server_retain_available;
        self.server_topic_alias_maximum = 0;
        self.config.protocol = control.config.protocol;
        self.decoder.set_protocol(control.config.protocol);
        self.writer.reset(control.config.protocol);
        self.writer.set_max(control.writer.max());
        self.inbuf.clear();
        self.aliases.clear();
        self.out_aliases.clear();
        // The server's QoS 2 messages on the old stream are forgotten with it.
        self.inbound.clear();
        self.abandon_qos2();
        self.state = State::Connected;
        self.outbound.resend_all();
        let (refuse, events) = (self.refusal(), &mut self.events);
        self.outbound.drop_refused(refuse, |id, reason| {
            events.push_back(ClientEvent::Published { id: RequestId(id), reason });
        });
        if !self.subscriptions.is_empty() {
            if let Some(packet_id) = self.outbound.allocate_id() {
                let subscriptions = self.subscriptions.iter().cloned().collect();
                self.requests.insert(packet_id.get(), Request::Resubscribe);
                self.write(
                    now,
                    &Packet::Subscribe(Subscribe { packet_id, properties: Default::default(), subscriptions }),
                );
            }
        }
        for waiting in std::mem::take(&mut self.waiting) {
            let (id, r) = match waiting {
                Waiting::Subscribe(id, subs, sid) => (id, self.send_subscribe(now, id, subs, sid)),
                Waiting::Unsubscribe(id, filters) => (id, self.send_unsubscribe(now, id, filters)),
            };
            // Refused under the server's limits (too large, no identifier left): it cannot be
            // made on this stream.
            if r.is_err() {
                self.events.push_back(ClientEvent::Aborted { id });
            }
        }
        self.pump(now);
        Ok(())
    }

    /// A data stream gives up its QoS 2 publishes in flight (see [`ClientEvent::Aborted`]).
    fn abandon_qos2(&mut self) {
        for id in self.outbound.abandon(|p, inflight| inflight && p.qos() == QoS::ExactlyOnce) {
            self.events.push_back(ClientEvent::Aborted { id: RequestId(id) });
        }
    }

    /// A data stream is closed for good: every request still pending on it ends with
    /// [`ClientEvent::Aborted`] (publishes queued or in flight, subscribes and unsubscribes
    /// sent or waiting), and it forgets its subscriptions. Returns the bytes it had not yet
    /// handed out, to send before the stream's FIN. Does nothing to a control session.
    pub fn close_data_stream(&mut self, now: Instant) -> Option<Bytes> {
        if !self.data_stream {
            return None;
        }
        let ids = self.outbound.abandon(|_, _| true);
        self.events.extend(ids.into_iter().map(|id| ClientEvent::Aborted { id: RequestId(id) }));
        for waiting in std::mem::take(&mut self.waiting) {
            let (Waiting::Subscribe(id, ..) | Waiting::Unsubscribe(id, _)) = waiting;
            self.events.push_back(ClientEvent::Aborted { id });
        }
        let bytes = self.writer.take();
        self.handle_stream_closed(now);
        self.subscriptions.clear();
        bytes
    }

    /// The request numbering shared by a connection's sessions (see
    /// [`ClientSession::data_stream`]): the last id handed out.
    pub(crate) fn request_counter(&self) -> u64 {
        self.next_request
    }

    /// Continues the numbering from `last` (the last id another session of the connection
    /// handed out).
    pub(crate) fn set_request_counter(&mut self, last: u64) {
        self.next_request = self.next_request.max(last);
    }

    /// Takes the session's state from a client store and journals every change from now on
    /// (see "Client stores" in [`crate::persist`]): call it once, before the first
    /// [`ClientSession::connect`], with every record the store holds (none for a new store).
    /// Then poll [`ClientSession::poll_store`] after every input and report what was written
    /// with [`ClientSession::handle_stored`]; output that promises what a crash could take back
    /// (QoS 2 PUBLISH and PUBREL, PUBREC, PUBCOMP) waits in [`ClientSession::poll_transmit`]
    /// until the batch recording it is stored.
    ///
    /// The messages come back as they were: queued, or in flight under their packet
    /// identifiers, or released (PUBREL owed); the broker's QoS 2 identifiers awaiting PUBREL
    /// come back too. On CONNACK with the session present, what was in flight goes out again
    /// under the same identifiers (PUBLISH with DUP, or PUBREL); without it, in-flight messages
    /// go out again as new messages and the QoS 2 identifiers are forgotten, as after any lost
    /// session. Their completions are reported with request ids this run never handed out
    /// (the stored ones). Message expiry intervals are sent as stored, not reduced by the time
    /// on disk (a client never counts them down).
    ///
    /// Refused unless the session can outlive a connection: it needs a client id, `clean_start`
    /// false and, in MQTT 5, a session expiry above 0 ([`RestoreError::Config`]): with a clean
    /// start the broker would discard the very session the store resumes (paho and mqtt.go
    /// silently reset their store then; refusing says so instead). A record of another client
    /// id, or one that cannot be read, is [`RestoreError::Record`].
    pub fn restore(&mut self, now: Instant, records: Vec<StoredRecord>) -> Result<ClientRestored, RestoreError> {
        if self.state != State::Idle || self.store.is_some() || self.next_request > 0 || self.data_stream {
            return Err(RestoreError::TooLate);
        }
        let c = &self.config;
        client_store::check_config(&c.client_id, c.clean_start, c.protocol.is_v5(), c.session_expiry)?;
        let loaded = client_store::load(&self.client_id, records)?;
        let mut restored = ClientRestored { qos2_received: loaded.qos2.len(), ..Default::default() };
        for kept in loaded.messages {
            restored.messages += 1;
            restored.in_flight += usize::from(kept.packet_id.is_some());
            // New requests number on from the stored ones, so messages stay in queue order.
            self.next_request = self.next_request.max(kept.id);
            self.outbound.restore(now, kept);
        }
        self.outbound.resume();
        self.outbound.journal(true);
        self.inbound = Inbound::restored(loaded.qos2);
        self.store = Some(ClientJournal::new(&self.client_id, self.config.session_expiry));
        Ok(restored)
    }

    /// With a store: the next batch of changes to write (see [`ClientSession::restore`] and
    /// [`crate::persist`]). Apply each batch's operations in order and atomically; batches may
    /// be committed together. `None` when nothing changed, or without a store.
    #[must_use]
    pub fn poll_store(&mut self, now: Instant) -> Option<StoreBatch> {
        self.collect();
        let inbound = &self.inbound;
        self.store.as_mut()?.batch(now, || inbound.qos2_ids().collect())
    }

    /// Batches up to `seq` are stored: output that waited for them can go
    /// ([`ClientSession::poll_transmit`]).
    pub fn handle_stored(&mut self, seq: u64) {
        if let Some(store) = &mut self.store {
            store.stored(seq);
        }
    }

    /// Whether the session journals its state for a store.
    pub fn has_store(&self) -> bool {
        self.store.is_some()
    }

    /// Moves the outbound and inbound changes into the store's journal.
    fn collect(&mut self) {
        if let Some(store) = &mut self.store {
            store.record(self.outbound.take_changes(), self.inbound.take_changed());
        }
    }

    /// Whether output waits for the store.
    fn is_holding(&mut self) -> bool {
        self.collect();
        !self.unheld && self.store.as_ref().is_some_and(ClientJournal::is_holding)
    }

    /// Our side is ending the connection: output still waiting for the store is dropped so
    /// that the DISCONNECT goes out now. That is safe: everything held is kept state that the
    /// next connection sends again (a message, PUBREL), or that the broker sends again and we
    /// answer again (its PUBLISH, PUBREL); a QoS 0 message or SUBSCRIBE held with it is lost
    /// or aborted as on a lost connection.
    fn drop_held_output(&mut self) {
        if self.is_holding() {
            self.writer.clear();
            self.unheld = true;
        }
    }

    /// How long CONNACK may take (the session's configuration); a client machine gives a
    /// WebSocket upgrade as long.
    pub fn connect_timeout(&self) -> std::time::Duration {
        self.config.connect_timeout
    }

    /// Whether CONNACK accepted the current connection.
    pub fn is_connected(&self) -> bool {
        self.state == State::Connected
    }

    /// Bytes written and not yet handed to the transport.
    pub fn buffered(&self) -> usize {
        self.writer.buffered()
    }

    /// The highest QoS the server accepts (from its last CONNACK; QoS 2 before any).
    pub fn server_maximum_qos(&self) -> QoS {
        self.server_maximum_qos
    }

    /// Whether the server accepts retained messages (from its last CONNACK).
    pub fn server_retain_available(&self) -> bool {
        self.server_retain_available
    }

    /// Whether no connection has begun since the last one ended (nothing to report about the
    /// transport: a session that was connecting or connected reports its end as an event).
    pub fn is_idle(&self) -> bool {
        self.state == State::Idle
    }

    /// The subscriptions the server granted on this session (on a data stream: on this
    /// stream), which it makes again when the server has forgotten them.
    pub fn subscriptions(&self) -> &[Subscription] {
        &self.subscriptions
    }

    /// Publishes in flight plus those waiting.
    pub fn pending_publishes(&self) -> usize {
        self.outbound.pending()
    }

    /// Starts a connection over a fresh transport: queues CONNECT. Later calls (after
    /// [`ClientSession::handle_stream_closed`]) resume the session: `clean_start` is then false.
    pub fn connect(&mut self, now: Instant) -> Result<(), CommandError> {
        if self.data_stream {
            return Err(CommandError::WrongState);
        }
        if matches!(self.state, State::Connecting | State::Connected) {
            return Err(CommandError::AlreadyConnected);
        }
        self.inbuf.clear();
        self.unheld = false;
        self.writer.reset(self.config.protocol);
        self.aliases.clear();
        self.out_aliases.clear();
        self.server_topic_alias_maximum = 0;
        self.decoder.set_protocol(self.config.protocol);
        let mut connect = Connect::new(self.config.protocol, string(&self.client_id));
        connect.clean_start = self.config.clean_start;
        connect.bridge = self.config.bridge;
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
        self.connack_deadline.set(now + self.config.connect_timeout);
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
        if size > self.writer.max() as usize {
            return Err(CommandError::PacketTooLarge { size, max: self.writer.max() });
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
        if self.outbound.queued() >= self.config.max_queued {
            return Err(CommandError::QueueFull(self.outbound.queued()));
        }
        self.outbound.push(id.0, publish, now);
        self.pump(now);
        Ok(id)
    }

    /// A QoS 0 message as one QUIC datagram (RFC 9221), for a caller that negotiated
    /// datagrams: checked as [`ClientSession::publish`] checks it, encoded without a topic alias
    /// (datagrams arrive in any order), and reported [`ClientEvent::Published`] at once. `Ok(None)`
    /// when it is not QoS 0 or would not fit in `max` bytes: publish it on the stream instead.
    pub fn publish_datagram(
        &mut self,
        publish: &Publish,
        max: usize,
    ) -> Result<Option<(RequestId, Bytes)>, CommandError> {
        if publish.qos() != QoS::AtMostOnce {
            return Ok(None);
        }
        if self.state != State::Connected {
            return Err(CommandError::NotConnected);
        }
        if publish.retain && !self.server_retain_available {
            return Err(CommandError::RetainNotSupported);
        }
        let mut publish = publish.clone();
        publish.dup = false;
        publish.properties.topic_alias = None;
        publish.properties.subscription_identifiers = mqtt_proto::WireList::new();
        let size = publish.encoded_len(self.config.protocol).unwrap_or(usize::MAX);
        if size > self.writer.max() as usize || size > max {
            return Ok(None);
        }
        let mut out = BytesMut::new();
        if Packet::Publish(publish).encode(self.config.protocol, &mut out).is_err() {
            return Ok(None);
        }
        let id = self.request_id();
        self.events.push_back(ClientEvent::Published { id, reason: ReasonCode::Success });
        Ok(Some((id, out.freeze())))
    }

    /// A QUIC datagram from the server: a QoS 0 message is reported as
    /// [`ClientEvent::Message`]. Anything else (another packet, a topic alias, bytes that do not
    /// decode) is dropped: a datagram may be lost anyway. Returns whether it was a message.
    pub fn handle_datagram(&mut self, data: Bytes) -> bool {
        if self.state != State::Connected {
            return false;
        }
        let mut buf = data;
        let mut decoder = Decoder::new(self.config.protocol).with_max_packet_size(self.config.maximum_packet_size);
        let Ok(Some(Packet::Publish(publish))) = decoder.decode_bytes(&mut buf) else { return false };
        if !buf.is_empty() || publish.qos() != QoS::AtMostOnce || publish.properties.topic_alias.is_some() {
            return false;
        }
        self.events.push_back(ClientEvent::Message(publish));
        true
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
        if self.data_stream && self.state != State::Connected {
            let id = self.request_id();
            self.waiting.push_back(Waiting::Subscribe(id, subscriptions, subscription_id));
            return Ok(id);
        }
        if self.state != State::Connected {
            return Err(CommandError::NotConnected);
        }
        self.send_subscribe(now, RequestId(self.next_request + 1), subscriptions, subscription_id)
    }

    /// Writes a SUBSCRIBE for request `id` (the next one, unless it waited).
    fn send_subscribe(
        &mut self,
        now: Instant,
        id: RequestId,
        subscriptions: Vec<Subscription>,
        subscription_id: Option<SubscriptionId>,
    ) -> Result<RequestId, CommandError> {
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
        packet.packet_id = self.outbound.allocate_id().ok_or(CommandError::NoPacketId)?;
        let packet_id = packet.packet_id;
        let id = self.take_request_id(id);
        self.requests.insert(packet_id.get(), Request::Subscribe(id, subscriptions));
        self.write(now, &Packet::Subscribe(packet));
        Ok(id)
    }

    /// Unsubscribes; completes with [`ClientEvent::Unsubscribed`].
    pub fn unsubscribe(&mut self, now: Instant, filters: Vec<TopicFilter>) -> Result<RequestId, CommandError> {
        if filters.is_empty() {
            return Err(CommandError::Empty);
        }
        if self.data_stream && self.state != State::Connected {
            let id = self.request_id();
            self.waiting.push_back(Waiting::Unsubscribe(id, filters));
            return Ok(id);
        }
        if self.state != State::Connected {
            return Err(CommandError::NotConnected);
        }
        self.send_unsubscribe(now, RequestId(self.next_request + 1), filters)
    }

    /// Writes an UNSUBSCRIBE for request `id` (the next one, unless it waited).
    fn send_unsubscribe(
        &mut self,
        now: Instant,
        id: RequestId,
        filters: Vec<TopicFilter>,
    ) -> Result<RequestId, CommandError> {
        let packet = Packet::Unsubscribe(Unsubscribe {
            packet_id: PacketId::MIN,
            properties: Default::default(),
            filters: filters.iter().cloned().collect(),
        });
        self.check_size(&packet)?;
        let Packet::Unsubscribe(mut packet) = packet else { unreachable!("built above") };
        packet.packet_id = self.outbound.allocate_id().ok_or(CommandError::NoPacketId)?;
        let packet_id = packet.packet_id;
        let id = self.take_request_id(id);
        self.requests.insert(packet_id.get(), Request::Unsubscribe(id, filters));
        self.write(now, &Packet::Unsubscribe(packet));
        Ok(id)
    }

    /// Sends DISCONNECT with `reason` (MQTT 5; 3.1.1 has no code) and ends the connection.
    /// Use [`ReasonCode::DisconnectWithWill`] to have the server publish the will anyway.
    pub fn disconnect(&mut self, now: Instant, reason: ReasonCode) -> Result<(), CommandError> {
        if self.data_stream {
            return Err(CommandError::WrongState);
        }
        if self.state != State::Connected {
            return Err(CommandError::NotConnected);
        }
        self.drop_held_output();
        self.write(now, &Disconnect::new(reason).into());
        self.close(DisconnectReason::Local);
        Ok(())
    }

    /// With `manual_acks`: acknowledges the server's QoS 1 or 2 message with this packet
    /// identifier (PUBACK, or PUBREC and then the rest of the exchange). Fails with
    /// [`CommandError::UnknownMessage`] when no such message waits on this connection: the
    /// connection it came on has ended, and the server will send it again.
    pub fn ack(&mut self, now: Instant, id: PacketId) -> Result<(), CommandError> {
        let qos = self.held.remove(&id.get()).ok_or(CommandError::UnknownMessage)?;
        if qos == QoS::ExactlyOnce {
            let _ = self.inbound.qos2(id.get(), u16::MAX);
            self.write(now, &Packet::PubRec(Ack::new(id)));
        } else {
            self.write(now, &Packet::PubAck(Ack::new(id)));
        }
        Ok(())
    }

    /// Answers an AUTH challenge (MQTT 5 enhanced authentication).
    pub fn auth(&mut self, now: Instant, mut auth: Auth) -> Result<(), CommandError> {
        if self.data_stream {
            return Err(CommandError::WrongState);
        }
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
    pub fn handle_stream_closed(&mut self, _now: Instant) {
        if matches!(self.state, State::Connecting | State::Connected) {
            self.close(DisconnectReason::TransportLost);
        }
        if self.data_stream {
            self.abandon_qos2();
        }
        // Subscribe and unsubscribe are not resent on resumption: report them unfinished.
        for (packet_id, request) in std::mem::take(&mut self.requests) {
            if let Some(id) = PacketId::new(packet_id) {
                self.outbound.release_id(id);
            }
            if let Request::Subscribe(id, _) | Request::Unsubscribe(id, _) = request {
                self.events.push_back(ClientEvent::Aborted { id });
            }
        }
        self.state = State::Idle;
        self.inbuf.clear();
        self.writer.clear();
        // What was not acknowledged comes again on the next connection.
        self.held.clear();
    }

    /// Bytes received from the transport.
    pub fn handle_stream_data(&mut self, now: Instant, data: &[u8]) {
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
        // Firing disarms it, whatever the state.
        if self.connack_deadline.fire(now) && self.state == State::Connecting {
            self.close(DisconnectReason::ConnectTimeout);
        }
        if self.state != State::Connected {
            return;
        }
        if self.ping_deadline.fire(now) {
            self.close(DisconnectReason::KeepAliveTimeout);
            return;
        }
        if self.ping_due().is_some_and(|d| d <= now) {
            self.write(now, &Packet::PingReq);
            self.ping_deadline.set(now + self.keep_alive);
        }
    }

    fn ping_due(&self) -> Option<Instant> {
        if self.keep_alive.is_zero() || self.ping_deadline.is_armed() {
            return None;
        }
        self.last_sent.map(|t| t + self.keep_alive)
    }

    /// The next instant `handle_timeout` has work to do.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let keep_alive =
            if self.state == State::Connected { [self.ping_due(), self.ping_deadline.at()] } else { [None; 2] };
        earliest([self.connack_deadline.at()].into_iter().chain(keep_alive))
    }

    /// Bytes to write to the transport, if any. With a store, output that waits for a batch
    /// to be stored stays here until [`ClientSession::handle_stored`] reports it.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        if self.is_holding() {
            return None;
        }
        self.writer.take()
    }

    /// The next event.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    fn request_id(&mut self) -> RequestId {
        self.next_request += 1;
        RequestId(self.next_request)
    }

    /// Request `id` is made now: the next id when it is the next one, else one that waited.
    fn take_request_id(&mut self, id: RequestId) -> RequestId {
        if id.0 > self.next_request {
            self.request_id()
        } else {
            id
        }
    }

    /// Refuses a request whose packet would exceed the server's Maximum Packet Size
    /// [MQTT-3.2.2-15].
    fn check_size(&self, packet: &Packet) -> Result<(), CommandError> {
        match self.writer.fits(packet) {
            Ok(_) => Ok(()),
            Err(size) => Err(CommandError::PacketTooLarge { size, max: self.writer.max() }),
        }
    }

    fn write(&mut self, now: Instant, packet: &Packet) {
        // Requests and PUBLISH were checked against the server's Maximum Packet Size when made;
        // what else we send (acknowledgements, PINGREQ, DISCONNECT, a subscription restored on
        // reconnect) only fails to fit a server whose limit is too small to talk to at all:
        // then nothing more is sent and the connection ends [MQTT-3.2.2-15].
        match self.writer.write(packet) {
            Ok(true) => self.last_sent = Some(now),
            Ok(false) => {}
            Err(_) => {
                self.writer.cut_off();
                self.close(DisconnectReason::ProtocolViolation(ReasonCode::PacketTooLarge));
            }
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
                    if publish.encoded_len(self.config.protocol).is_ok_and(|n| n <= self.writer.max() as usize) {
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
            self.connack_deadline.clear();
            self.ping_deadline.clear();
            self.events.push_back(ClientEvent::Disconnected { reason });
        }
    }

    /// The server broke the protocol: tell it why (MQTT 5) and end the connection.
    fn violation(&mut self, now: Instant, code: ReasonCode) {
        if self.config.protocol.is_v5() && self.state == State::Connected && !self.data_stream {
            self.drop_held_output();
            self.write(now, &Disconnect::new(code).into());
        }
        self.close(DisconnectReason::ProtocolViolation(code));
    }

    /// Moves queued publishes into flight while the server's Receive Maximum allows. What a
    /// resumed session still owes goes first, in its original order [MQTT-4.4.0-1], and no more
    /// of it than the server's Receive Maximum allows [MQTT-4.9.0-2]: PUBLISH again with DUP
    /// set, or PUBREL.
    fn pump(&mut self, now: Instant) {
        if self.state != State::Connected {
            return;
        }
        let limit = usize::from(self.server_receive_maximum.min(self.config.max_inflight).max(1));
        let refuse = self.refusal();
        while let Some(step) = self.outbound.next_step(now, limit, false, &refuse) {
            match step {
                Step::Publish(p) => self.write_publish(now, p),
                Step::Release(packet_id) => self.write(now, &Packet::PubRel(Ack::new(packet_id))),
                Step::Dropped { id, reason } => {
                    self.events.push_back(ClientEvent::Published { id: RequestId(id), reason })
                }
            }
        }
    }

    /// Why this server may not be sent a message, if it may not. A message queued or in flight
    /// across a reconnect was checked against the last connection's limits; the new CONNACK may
    /// announce tighter ones, which we must obey [MQTT-3.2.2-11] [MQTT-3.2.2-14] [MQTT-3.1.2-24].
    /// Such a message completes with the reason the server would have given.
    fn refusal(&self) -> impl Fn(&Publish) -> Option<ReasonCode> {
        let (max_qos, retain, protocol, max) =
            (self.server_maximum_qos, self.server_retain_available, self.config.protocol, self.writer.max());
        move |publish| {
            if publish.qos() > max_qos {
                Some(ReasonCode::QosNotSupported)
            } else if publish.retain && !retain {
                Some(ReasonCode::RetainNotSupported)
            } else if publish.encoded_len(protocol).map_or(true, |n| n > max as usize) {
                Some(ReasonCode::PacketTooLarge)
            } else {
                None
            }
        }
    }

    /// PUBACK or PUBCOMP.
    fn acknowledged(&mut self, now: Instant, ack: &Ack, qos: QoS, released: bool) {
        if let Some(id) = self.outbound.complete(ack.packet_id, qos, released) {
            self.events.push_back(ClientEvent::Published { id: RequestId(id), reason: ack.reason_code });
            self.pump(now);
        }
    }

    fn handle_packet(&mut self, now: Instant, packet: Packet) {
        let v5 = self.config.protocol.is_v5();
        match (self.state, packet) {
            // The control stream's packets, on a data stream.
            (State::Connected, Packet::ConnAck(_) | Packet::PingResp | Packet::Disconnect(_) | Packet::Auth(_))
                if self.data_stream =>
            {
                self.violation(now, ReasonCode::ProtocolError)
            }
            (State::Connecting, Packet::ConnAck(ack)) => self.on_connack(now, *ack),
            (State::Connecting, Packet::Auth(auth)) if v5 => self.events.push_back(ClientEvent::Auth(auth)),
            (State::Connecting, Packet::Disconnect(d)) if v5 => self.close(DisconnectReason::ByServer(d.reason_code)),
            (State::Connecting, _) => self.violation(now, ReasonCode::ProtocolError),
            (State::Connected, Packet::Publish(p)) => self.on_publish(now, p),
            (State::Connected, Packet::PubAck(ack)) => self.acknowledged(now, &ack, QoS::AtLeastOnce, false),
            (State::Connected, Packet::PubRec(ack)) => {
                match self.outbound.on_pubrec(ack.packet_id, ack.reason_code.is_error()) {
                    PubRec::Completed(id) => {
                        self.events.push_back(ClientEvent::Published { id: RequestId(id), reason: ack.reason_code });
                        self.pump(now);
                    }
                    PubRec::Release => self.write(now, &Packet::PubRel(Ack::new(ack.packet_id))),
                    PubRec::Unknown => {
                        let mut rel = Ack::new(ack.packet_id);
                        rel.reason_code = ReasonCode::PacketIdentifierNotFound;
                        self.write(now, &Packet::PubRel(rel));
                    }
                }
            }
            (State::Connected, Packet::PubComp(ack)) => self.acknowledged(now, &ack, QoS::ExactlyOnce, true),
            (State::Connected, Packet::PubRel(ack)) => {
                let mut comp = Ack::new(ack.packet_id);
                if !self.inbound.release(ack.packet_id.get()) {
                    comp.reason_code = ReasonCode::PacketIdentifierNotFound;
                }
                self.write(now, &Packet::PubComp(comp));
            }
            (State::Connected, Packet::SubAck(ack)) => self.on_suback(ack),
            (State::Connected, Packet::UnsubAck(ack)) => self.on_unsuback(ack),
            (State::Connected, Packet::PingResp) => self.ping_deadline.clear(),
            (State::Connected, Packet::Disconnect(d)) => self.close(DisconnectReason::ByServer(d.reason_code)),
            (State::Connected, Packet::Auth(auth)) if v5 => self.events.push_back(ClientEvent::Auth(auth)),
            // CONNACK twice, or packets only a client sends.
            (State::Connected, _) => self.violation(now, ReasonCode::ProtocolError),
            (State::Idle | State::Closed, _) => {}
        }
    }

    fn on_connack(&mut self, now: Instant, ack: ConnAck) {
        self.connack_deadline.clear();
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
        self.writer.set_max(p.maximum_packet_size.map_or(mqtt_proto::PROTOCOL_MAX_PACKET_SIZE, |v| v.get()));
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
            self.outbound.resend_all();
            let (refuse, events) = (self.refusal(), &mut self.events);
            self.outbound.drop_refused(refuse, |id, reason| {
                events.push_back(ClientEvent::Published { id: RequestId(id), reason });
            });
        } else {
            // The server forgot everything: what was in flight goes out again as new messages,
            // ahead of the queue, and the subscriptions are made again.
            self.inbound.clear();
            self.outbound.requeue_inflight(now);
            if !self.subscriptions.is_empty() {
                if let Some(packet_id) = self.outbound.allocate_id() {
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
        if let Err(code) = self.aliases.resolve(&mut publish, self.config.topic_alias_maximum) {
            return self.violation(now, code);
        }
        match publish.qos_pid {
            QosPid::AtMostOnce => self.events.push_back(ClientEvent::Message(publish)),
            QosPid::AtLeastOnce(id) | QosPid::ExactlyOnce(id) if self.config.manual_acks => {
                let qos = publish.qos();
                if self.held.contains_key(&id.get()) {
                    // Sent again before we acknowledged it: the application has it.
                    return;
                }
                if qos == QoS::ExactlyOnce && self.inbound.qos2_ids().any(|i| i == id.get()) {
                    // Acknowledged (PUBREC) before: say so again, do not deliver again.
                    return self.write(now, &Packet::PubRec(Ack::new(id)));
                }
                // (MQTT 3.1.1 cannot tell the server our Receive Maximum: there only the packet
                // identifiers bound what is held.)
                let window = usize::from(self.config.receive_maximum);
                if self.config.protocol.is_v5() && self.held.len() + self.inbound.waiting() >= window {
                    return self.violation(now, ReasonCode::ReceiveMaximumExceeded);
                }
                self.held.insert(id.get(), qos);
                self.events.push_back(ClientEvent::Message(publish));
            }
            QosPid::AtLeastOnce(id) => {
                self.events.push_back(ClientEvent::Message(publish));
                self.write(now, &Packet::PubAck(Ack::new(id)));
            }
            QosPid::ExactlyOnce(id) => {
                match self.inbound.qos2(id.get(), self.config.receive_maximum) {
                    Arrival::OverLimit => return self.violation(now, ReasonCode::ReceiveMaximumExceeded),
                    Arrival::New => self.events.push_back(ClientEvent::Message(publish)),
                    Arrival::Duplicate => {}
                }
                // A duplicate gets PUBREC again but is not delivered again.
                self.write(now, &Packet::PubRec(Ack::new(id)));
            }
        }
    }

    fn on_suback(&mut self, ack: SubAck) {
        let Some(request) = self.requests.remove(&ack.packet_id.get()) else { return };
        self.outbound.release_id(ack.packet_id);
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
        self.outbound.release_id(ack.packet_id);
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
