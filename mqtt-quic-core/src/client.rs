//! The client machine: one MQTT session over QUIC (the machine owns the QUIC endpoint) or over
//! a byte stream the adapter carries (TCP, TLS over TCP), and the reconnect policy. Adapters
//! drive it through [`Machine`](crate::Machine) (QUIC) or the `handle_stream_*` calls and `poll_stream` (byte streams), and forward
//! commands.
//!
//! Over a byte stream the machine still decides when to connect: it asks for a stream with
//! [`StreamCommand::Open`] (at [`ClientMachine::start`] and after each reconnect delay), and the
//! adapter answers with [`ClientMachine::handle_stream_open`] or [`ClientMachine::handle_stream_closed`].
//!
//! # Data streams (EMQX's multi-stream mode)
//!
//! Everything goes on one stream by default. [`ClientMachine::open_stream`] gives traffic a
//! stream of its own, so that a slow or lossy topic does not hold up the others (QUIC delivers
//! each stream in order, but streams independently of each other): publishes, subscribes and
//! unsubscribes made through its [`StreamHandle`] ([`ClientMachine::publish_on`],
//! [`ClientMachine::subscribe_on`], [`ClientMachine::unsubscribe_on`]) travel on it, their
//! acknowledgements come back on it, and the server delivers on it what its subscriptions
//! match. Each handle owns a [`ClientSession::data_stream`] session: its own packet
//! identifiers and in-flight window, under the limits of the connection's CONNACK. Its events
//! come out of [`ClientMachine::poll_event`] like the control session's, with request ids from
//! the same numbering, so a caller need not know which stream a request went on.
//!
//! - Over QUIC, the handle's QUIC stream is opened once CONNACK has come (the server serves a
//!   data stream only after it), with the handle's priority: when several streams have bytes
//!   waiting, the higher priority's go first. Commands given before (or while reconnecting)
//!   wait in the handle's session.
//! - The server forgets a stream's subscriptions when the stream or the connection ends. After
//!   a reconnect each handle gets a new QUIC stream and makes its subscriptions again on it,
//!   and its unacknowledged QoS 1 publishes go out again (DUP). A QoS 2 publish in flight when
//!   the connection dropped cannot keep its exactly-once promise (the server's QoS 2 state for
//!   it died with the stream): it ends with [`ClientEvent::Aborted`] instead of being resent.
//! - When the server ends a handle's stream (a reset, a FIN), the handle's pending
//!   subscribes, unsubscribes and QoS 2 publishes end with [`ClientEvent::Aborted`]; the
//!   handle stays usable, and its next command opens a new stream (which makes its
//!   subscriptions again, as after a reconnect).
//! - [`ClientMachine::close_stream`] ends a handle: its stream is finished (FIN) and
//!   everything still pending on it ends with [`ClientEvent::Aborted`].
//! - A stream the server does not allow yet (its limit on concurrent streams) stays without
//!   a QUIC stream, its requests waiting as while disconnected; it is tried again at the
//!   handle's next command and at the next connection.
//! - Over a byte stream (TCP, TLS) there is only one stream: a handle's commands go to the
//!   control session, exactly as [`ClientMachine::publish`] and its siblings would, and the
//!   priority is ignored. Code written for streams thus runs unchanged over TCP. Closing a
//!   handle there ends nothing but the handle: what was subscribed through it is the
//!   connection's, and stays.
//! - A server without the multi-stream mode refuses data streams: it resets the first one
//!   before answering anything on it (with another code than EMQX's 1, "this stream broke the
//!   protocol"), or allows no stream besides the control stream. Then what was in flight on
//!   handles ends with [`ClientEvent::Aborted`], and from then on, for the machine's life (the
//!   server stays the same), handles use the control stream as over TCP
//!   ([`ClientMachine::streams_refused`]).
//! - Streams the server opens (some brokers deliver on a stream of their own per topic, behind
//!   an MQoQ flow header, see [`crate::flow_header`]) are read like the control stream: their
//!   messages come out as [`ClientEvent::Message`], acknowledged on that stream (on the control
//!   stream for a one-way one).
//! - Messages published on streams are not journaled in a client store.
//!
//! # Datagrams
//!
//! With `transport.datagrams` on, the CONNECT asks the broker for QoS 0 messages as QUIC
//! datagrams (user property `quic-datagrams` = `qos0`), received datagrams carrying a QoS 0
//! PUBLISH come out as [`ClientEvent::Message`], and [`ClientMachine::publish`] sends a QoS 0
//! message that fits one as a datagram (unreliable and unordered: it may be lost, and may
//! overtake messages sent on the stream before it).

use crate::backoff::Backoff;
use crate::broker::DATAGRAM_PROPERTY;
use crate::config::{ClientConfig, ConfigError};
use crate::fallback::{FallbackPolicy, Target, Targets};
use crate::flow_header::{self, FlowHeader};
use crate::machine::Datagram;
use crate::persist::{ClientRestored, RestoreError, StoreBatch, StoredRecord};
use crate::quic::{self, ConnId, Lane, QuicEndpoint, Transmit};
use crate::rng::SplitMix64;
use crate::session::client::{
    ClientEvent, ClientSession, ClientSessionConfig, CommandError, DisconnectReason, RequestId,
};
use crate::url::{BrokerUrl, Transport};
use crate::ws::WsConn;
use bytes::Bytes;
use mqtt_proto::{MqttString, Publish, ReasonCode, Subscription, SubscriptionId, TopicFilter};
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// When and how fast to reconnect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconnectPolicy {
    /// Upper bound of the first delay.
    pub initial: Duration,
    /// Upper bound of any delay.
    pub max: Duration,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        ReconnectPolicy { initial: Duration::from_millis(200), max: Duration::from_secs(30) }
    }
}

/// Settings of a client machine over QUIC.
#[derive(Debug, Clone)]
pub struct ClientMachineConfig {
    /// QUIC and TLS.
    pub quic: ClientConfig,
    /// MQTT session.
    pub session: ClientSessionConfig,
    /// The broker's address.
    pub server: SocketAddr,
    /// The name its certificate is checked against.
    pub server_name: String,
    /// Reconnect after a lost connection; `None` stays disconnected.
    pub reconnect: Option<ReconnectPolicy>,
}

/// A QUIC idle timeout shorter than the MQTT keep-alive would cut a quiet but healthy session:
/// unless the configuration says otherwise, QUIC pings at half the idle timeout keep it open.
pub(crate) fn keep_quic_alive(quic: &mut ClientConfig, mqtt_keep_alive_secs: u16) {
    let t = &mut quic.transport;
    let mqtt_keep_alive = Duration::from_secs(u64::from(mqtt_keep_alive_secs));
    if t.keep_alive.is_none() && !mqtt_keep_alive.is_zero() && mqtt_keep_alive >= t.idle_timeout {
        t.keep_alive = Some(t.idle_timeout / 2);
    }
}

/// What a client machine asks of its adapter besides datagrams, from
/// [`ClientMachine::poll_stream`]: opening and closing byte streams (TCP, TLS over TCP),
/// writing to them, and resolving broker names for QUIC.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamCommand {
    /// Open a new connection to the broker at this URL (`mqtt://`: TCP; `mqtts://`: TLS over
    /// TCP), resolving its name now (names are resolved on each connection, so a broker that
    /// moved is found); report the outcome with [`ClientMachine::handle_stream_open`] or
    /// [`ClientMachine::handle_stream_failed`]. `None`: the one connection the machine was
    /// made for ([`ClientMachine::over_stream`]).
    Open(Option<BrokerUrl>),
    /// Write these bytes to the open connection.
    Data(Bytes),
    /// Close the connection after the bytes written before (the session is over on it).
    Close,
    /// Resolve this QUIC URL's host name and answer with [`ClientMachine::handle_resolved`]
    /// (the address to use, or why there is none). The UDP socket the machine's datagrams go
    /// out on must be of the address's family.
    Resolve(BrokerUrl),
}

/// Names one of a client machine's data streams (see "Data streams" in the module docs).
/// Handles are never reused within a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamHandle(u64);

impl StreamHandle {
    /// The handle's number (the first stream a machine opens is 1).
    pub fn get(self) -> u64 {
        self.0
    }
}

/// One data stream: its session, and its QUIC stream on the current connection.
struct DataStream {
    session: ClientSession,
    priority: i32,
    /// Its QUIC stream, while open on the current connection.
    lane: Option<Lane>,
    /// Something arrived on that QUIC stream (a server that resets a stream it never answered
    /// on refuses data streams altogether).
    heard: bool,
}

/// A stream the server opened (some brokers deliver on one per topic): a session that takes
/// its messages and acknowledges them (there, or on the control stream for a one-way stream),
/// created once the connection's CONNACK is in (the stream may arrive with it).
struct ServerStream {
    session: Option<ClientSession>,
    /// Until its start is read: the bytes that may be an MQoQ flow header (see
    /// [`crate::flow_header`]).
    start: Option<Vec<u8>>,
    /// Bytes that came before the session could be made.
    early: Vec<u8>,
}

/// Bytes a server-opened stream may carry before CONNACK is read.
const SERVER_STREAM_EARLY: usize = 64 * 1024;

impl ServerStream {
    fn new() -> ServerStream {
        ServerStream { session: None, start: Some(Vec::new()), early: Vec::new() }
    }

    /// Bytes from the stream. False when it must be refused: another flow type than a
    /// server's data flow, or too much before CONNACK.
    fn feed(&mut self, now: Instant, data: &[u8]) -> bool {
        let Some(session) = &mut self.session else {
            if self.early.len() + data.len() > SERVER_STREAM_EARLY {
                return false;
            }
            self.early.extend_from_slice(data);
            return true;
        };
        let Some(start) = &mut self.start else {
            session.handle_stream_data(now, data);
            return true;
        };
        // Bounded: a header is at most 18 bytes.
        let before = start.len();
        start.extend_from_slice(&data[..data.len().min(32)]);
        match flow_header::parse(start) {
            FlowHeader::Incomplete if start.len() < 32 => true,
            FlowHeader::None => {
                self.start = None;
                session.handle_stream_data(now, data);
                true
            }
            FlowHeader::ServerData(n) => {
                // The header ends `n - before` bytes into this chunk (it did not end before).
                self.start = None;
                session.handle_stream_data(now, &data[n.saturating_sub(before).min(data.len())..]);
                true
            }
            FlowHeader::Incomplete | FlowHeader::Refused => false,
        }
    }

    /// Makes its session once `control` is connected, and hands it what waited. False when
    /// what waited must be refused.
    fn activate(&mut self, now: Instant, control: &ClientSession) -> bool {
        if self.session.is_some() || !control.is_connected() {
            return true;
        }
        let mut session = control.data_stream();
        if session.resume_data_stream(now, control).is_err() {
            return false;
        }
        self.session = Some(session);
        let early = std::mem::take(&mut self.early);
        self.feed(now, &early)
    }
}

/// The transport under the session now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// A connection of the machine's QUIC endpoint (`None`: being resolved, or lost).
    Quic { conn: Option<ConnId> },
    /// A byte stream the adapter carries; `open`: a connection is open or being opened.
    Stream { open: bool },
}

/// The QUIC connection `link` is on, with the endpoint. A free function so that callers may
/// borrow the machine's other fields meanwhile.
fn quic_conn<'a>(quic: &'a mut Option<Box<QuicEndpoint>>, link: &Link) -> Option<(&'a mut QuicEndpoint, ConnId)> {
    match (quic, link) {
        (Some(endpoint), Link::Quic { conn: Some(conn) }) => Some((endpoint, *conn)),
        _ => None,
    }
}

/// A QUIC handshake with the first broker while connected on another (see [`crate::fallback`]).
#[derive(Debug, Clone, Copy)]
struct Probe {
    /// `None` while its name is being resolved.
    conn: Option<ConnId>,
    /// When it gives up.
    deadline: Instant,
}

/// Settings of a client machine with a list of brokers to try in turn (see
/// [`crate::fallback`]).
#[derive(Debug, Clone)]
pub struct ClientUrlsConfig {
    /// The brokers, in order of preference (at least one).
    pub urls: Vec<BrokerUrl>,
    /// QUIC and TLS for `quic://` URLs (required when there is one; its `tls` also serves
    /// `mqtts://`, which the adapter wraps).
    pub quic: Option<ClientConfig>,
    /// MQTT session.
    pub session: ClientSessionConfig,
    /// The name brokers' certificates must carry, if not each URL's host.
    pub server_name: Option<String>,
    /// Reconnect after a lost connection; `None` stays disconnected (the addresses are still
    /// tried in turn for each connection).
    pub reconnect: Option<ReconnectPolicy>,
    /// When to fall back and move back.
    pub fallback: FallbackPolicy,
    /// Drives the reconnect jitter.
    pub seed: u64,
    /// Ask the adapter to resolve IP literals too ([`StreamCommand::Resolve`]), so that it can
    /// give the address in the form its UDP socket needs (a broker's bridge on a `[::]`
    /// socket: IPv4-mapped). Off: literals are used as they are.
    pub resolve_literals: bool,
}

/// A client machine: a [`ClientSession`] over QUIC or a byte stream, reconnecting by itself,
/// to one broker or to the first of several that answers (see [`crate::fallback`]).
pub struct ClientMachine {
    link: Link,
    /// The QUIC endpoint, when a target is QUIC. It outlives connections and fallbacks: its
    /// session tickets allow 0-RTT on the next QUIC connection.
    quic: Option<Box<QuicEndpoint>>,
    /// Commands for the adapter: byte streams to open, write and close, names to resolve.
    io_out: VecDeque<StreamCommand>,
    /// Why the last QUIC connection ended, as QUIC saw it.
    last_close: Option<quic::CloseReason>,
    targets: Targets,
    fallback: FallbackPolicy,
    /// The current QUIC attempt fails if its handshake has not completed by then (only set
    /// when there is another target to fall back to).
    handshake_deadline: Option<Instant>,
    /// A name the adapter is resolving: for the current attempt (false) or a probe (true).
    resolving: Option<(BrokerUrl, bool)>,
    /// CONNACK accepted the current connection.
    attempt_ok: bool,
    /// Why the current connection or attempt ended, as the adapter or a timer said.
    attempt_note: Option<String>,
    /// Why the last connection, or the last series of attempts, failed.
    last_failure: Option<String>,
    probe: Option<Probe>,
    /// When to try the first broker again.
    probe_at: Option<Instant>,
    /// A DISCONNECT of our own on the way back to the first broker: its event is not news.
    moving_back: bool,
    /// Connecting to the first broker after moving back: a refusal there sends the client to
    /// the next broker (the one that worked) rather than back to the first.
    moved_back: bool,
    session: ClientSession,
    reconnect: Option<ReconnectPolicy>,
    backoff: Backoff,
    reconnect_at: Option<Instant>,
    stopped: bool,
    events: VecDeque<ClientEvent>,
    /// Data streams (see "Data streams" in the module docs).
    streams: BTreeMap<StreamHandle, DataStream>,
    /// Streams the server opened on the current connection (some brokers deliver on a stream
    /// of their own per topic), each with a session that takes its messages and acknowledges
    /// them there.
    incoming: BTreeMap<Lane, ServerStream>,
    /// QoS 0 in QUIC datagrams both ways (the configuration's `transport.datagrams`).
    datagrams: bool,
    /// The server refused a data stream before answering anything on it: it does not speak
    /// EMQX's multi-stream mode, so handles use the control stream from then on.
    streams_refused: bool,
    /// The last handle given out.
    last_stream: u64,
    /// The WebSocket layer of the current byte stream, for a `ws://` or `wss://` broker: it
    /// frames the session's bytes, and CONNECT waits for its handshake.
    ws: Option<WsConn>,
    /// Draws each WebSocket connection's key and masks.
    ws_seeds: SplitMix64,
    /// The current WebSocket upgrade fails if the broker has not accepted it by then (the
    /// session's connect timeout, which starts only with CONNECT).
    ws_deadline: Option<Instant>,
}

impl ClientMachine {
    /// A machine over QUIC to one broker address, not yet connected.
    pub fn new(config: ClientMachineConfig) -> Result<ClientMachine, ConfigError> {
        let target = Target {
            url: None,
            transport: Transport::Quic,
            addr: Some(config.server),
            server_name: config.server_name,
        };
        let seed = config.quic.seed;
        ClientMachine::build(
            vec![target],
            Some(config.quic),
            config.session,
            config.reconnect,
            Default::default(),
            seed,
        )
    }

    /// A machine over a byte stream (TCP, TLS over TCP) that the adapter opens when asked
    /// ([`StreamCommand::Open`] with `None`). `seed` drives the reconnect jitter.
    pub fn over_stream(
        session: ClientSessionConfig,
        reconnect: Option<ReconnectPolicy>,
        seed: u64,
    ) -> Result<ClientMachine, ConfigError> {
        let target = Target { url: None, transport: Transport::Tcp, addr: None, server_name: String::new() };
        ClientMachine::build(vec![target], None, session, reconnect, Default::default(), seed)
    }

    /// A machine for a list of brokers, tried in turn (see [`crate::fallback`]): QUIC ones
    /// through the machine's endpoint (host names resolved by the adapter on each attempt,
    /// [`StreamCommand::Resolve`]), the others as byte streams the adapter opens
    /// ([`StreamCommand::Open`]).
    pub fn with_urls(config: ClientUrlsConfig) -> Result<ClientMachine, ConfigError> {
        if config.urls.is_empty() {
            return Err(ConfigError::Invalid("no broker URL given".into()));
        }
        let targets: Vec<Target> = config
            .urls
            .iter()
            .map(|url| {
                let mut target = Target::from_url(url, config.server_name.clone().unwrap_or_else(|| url.host.clone()));
                if config.resolve_literals && target.transport == Transport::Quic {
                    target.addr = None;
                }
                target
            })
            .collect();
        if config.quic.is_none() && targets.iter().any(|t| t.transport == Transport::Quic) {
            return Err(ConfigError::Invalid("a quic:// URL needs a QUIC configuration (TLS trust)".into()));
        }
        ClientMachine::build(targets, config.quic, config.session, config.reconnect, config.fallback, config.seed)
    }

    fn build(
        targets: Vec<Target>,
        quic: Option<ClientConfig>,
        mut session: ClientSessionConfig,
        reconnect: Option<ReconnectPolicy>,
        fallback: FallbackPolicy,
        seed: u64,
    ) -> Result<ClientMachine, ConfigError> {
        let targets = Targets::new(targets);
        let mut datagrams = false;
        let endpoint = match quic {
            Some(mut quic) if targets.any_quic() => {
                keep_quic_alive(&mut quic, session.keep_alive);
                datagrams = quic.transport.datagrams;
                if datagrams && session.protocol.is_v5() {
                    // Ask the broker for QoS 0 messages as datagrams (see the broker's
                    // `datagrams`).
                    let (k, v) = (MqttString::try_from(DATAGRAM_PROPERTY), MqttString::try_from("qos0"));
                    if let (Ok(k), Ok(v)) = (k, v) {
                        session.connect_properties.user_properties.push((k, v));
                    }
                }
                Some(Box::new(QuicEndpoint::client(&quic)?))
            }
            _ => None,
        };
        let policy = reconnect.unwrap_or_default();
        // Until the first attempt, the link is of the first target's kind: commands on stream
        // handles wait in their sessions for a QUIC connection, as while reconnecting.
        let link = match targets.current().transport {
            Transport::Quic => Link::Quic { conn: None },
            Transport::Tcp | Transport::Tls | Transport::Ws | Transport::Wss => Link::Stream { open: false },
        };
        Ok(ClientMachine {
            link,
            quic: endpoint,
            io_out: VecDeque::new(),
            last_close: None,
            targets,
            fallback,
            handshake_deadline: None,
            resolving: None,
            attempt_ok: false,
            attempt_note: None,
            last_failure: None,
            probe: None,
            probe_at: None,
            moving_back: false,
            moved_back: false,
            session: ClientSession::new(session)?,
            reconnect,
            backoff: Backoff::new(policy.initial, policy.max, seed ^ 0x5EED),
            reconnect_at: None,
            stopped: false,
            events: VecDeque::new(),
            streams: BTreeMap::new(),
            last_stream: 0,
            incoming: BTreeMap::new(),
            datagrams,
            streams_refused: false,
            ws: None,
            ws_seeds: SplitMix64::new(seed ^ 0x5753_5753),
            ws_deadline: None,
        })
    }

    /// Opens the connection (over QUIC, CONNECT travels in 0-RTT when a ticket allows; over a
    /// byte stream, [`StreamCommand::Open`] asks the adapter for one). With several brokers, a
    /// first one that cannot be reached is left for the next.
    pub fn start(&mut self, now: Instant) -> Result<(), quic::CommandError> {
        self.stopped = false;
        match self.open(now) {
            Err(e) if self.targets.len() > 1 => {
                self.attempt_failed(now, DisconnectReason::TransportLost, e.to_string());
                self.pump(now);
                Ok(())
            }
            r => r,
        }
    }

    /// Starts an attempt on the current target.
    fn open(&mut self, now: Instant) -> Result<(), quic::CommandError> {
        self.reconnect_at = None;
        self.attempt_ok = false;
        self.attempt_note = None;
        let target = self.targets.current().clone();
        match target.transport {
            Transport::Quic => {
                self.link = Link::Quic { conn: None };
                if self.targets.len() > 1 {
                    self.handshake_deadline = Some(now + self.fallback.handshake_timeout);
                }
                match (target.addr, target.url) {
                    (Some(addr), _) => self.connect_quic(now, addr, &target.server_name)?,
                    (None, Some(url)) => {
                        self.resolving = Some((url.clone(), false));
                        self.io_out.push_back(StreamCommand::Resolve(url));
                    }
                    // (A QUIC target always has one or the other.)
                    (None, None) => {}
                }
            }
            Transport::Tcp | Transport::Tls | Transport::Ws | Transport::Wss => {
                if self.link != (Link::Stream { open: true }) {
                    self.link = Link::Stream { open: true };
                    self.io_out.push_back(StreamCommand::Open(target.url));
                }
            }
        }
        Ok(())
    }

    /// A QUIC connection for the current attempt; CONNECT goes out on it.
    fn connect_quic(&mut self, now: Instant, addr: SocketAddr, server_name: &str) -> Result<(), quic::CommandError> {
        let Some(endpoint) = &mut self.quic else { return Err(quic::CommandError::UnknownConnection) };
        let conn = endpoint.connect(now, addr, server_name)?;
        self.link = Link::Quic { conn: Some(conn) };
        // The session is idle after a lost connection; `connect` cannot fail then.
        let _ = self.session.connect(now);
        self.flush(now);
        Ok(())
    }

    /// The adapter resolved the name of a [`StreamCommand::Resolve`]: the address to use (of
    /// the family of the UDP socket it will receive on), or why there is none (one line).
    pub fn handle_resolved(&mut self, now: Instant, url: &BrokerUrl, result: Result<SocketAddr, String>) {
        match self.resolving.take() {
            Some((want, false)) if want == *url => {
                if self.stopped || self.link != (Link::Quic { conn: None }) {
                    return;
                }
                let name = self.targets.current().server_name.clone();
                let connected = match result {
                    Ok(addr) => self.connect_quic(now, addr, &name).map_err(|e| e.to_string()),
                    Err(e) => Err(format!("resolving {}: {e}", url.host)),
                };
                if let Err(text) = connected {
                    self.attempt_note = Some(text);
                    self.transport_lost(now);
                }
            }
            Some((want, true)) if want == *url => match (result, self.targets.primary_to_retry().cloned()) {
                (Ok(addr), Some(primary)) => self.probe_connect(now, addr, &primary.server_name),
                _ => self.probe_failed(now),
            },
            other => self.resolving = other,
        }
        self.pump(now);
    }

    /// Whether the MQTT session is connected.
    pub fn is_connected(&self) -> bool {
        self.session.is_connected()
    }

    /// Whether the machine has given up for good (after [`ClientMachine::disconnect`], or a lost
    /// connection without a reconnect policy) and has no connection left: over QUIC, the last
    /// one has also delivered its final bytes (DISCONNECT, FIN) and closed, so an adapter that
    /// keeps driving until this is true does not cut off a clean disconnect.
    pub fn is_done(&self) -> bool {
        let idle = match self.link {
            Link::Quic { conn } => conn.is_none(),
            Link::Stream { open } => !open,
        };
        let quiet = self.quic.as_ref().is_none_or(|e| e.connection_count() == 0)
            && self.probe.is_none()
            && self.resolving.is_none();
        idle && quiet && self.reconnect_at.is_none() && (self.stopped || self.reconnect.is_none())
    }

    /// Over QUIC: why the last connection ended (a TLS failure names the certificate problem),
    /// for adapters to report when a connection attempt fails.
    pub fn last_close_reason(&self) -> Option<&quic::CloseReason> {
        self.last_close.as_ref()
    }

    /// Why the last connection ended, or (with several brokers) why each failed in the last
    /// series of attempts, as one line.
    pub fn last_failure(&self) -> Option<&str> {
        self.last_failure.as_deref()
    }

    /// The broker the machine is connected or connecting to: its index in the list (0 for a
    /// machine made for one) and its URL, where it was made from one.
    pub fn current_broker(&self) -> (usize, Option<&BrokerUrl>) {
        (self.targets.index(), self.targets.current().url.as_ref())
    }

    /// Bytes waiting to be sent on the current connection: over QUIC, what the endpoint holds
    /// for it; over a byte stream, what the session has not handed out yet (the adapter's own
    /// backlog is not known here).
    pub fn queued_bytes(&self) -> usize {
        let quic = match (&self.quic, self.link) {
            (Some(endpoint), Link::Quic { conn: Some(conn) }) => endpoint.queued(conn),
            _ => 0,
        };
        quic + self.session.buffered()
    }

    /// Over QUIC: the address of the broker the current connection (or the move back to the
    /// first broker) talks to.
    pub fn quic_remotes(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        let conns = [
            match self.link {
                Link::Quic { conn } => conn,
                Link::Stream { .. } => None,
            },
            self.probe.and_then(|p| p.conn),
        ];
        conns.into_iter().flatten().filter_map(|c| self.quic.as_ref()?.remote_address(c))
    }

    /// The session (for inspection).
    pub fn session(&self) -> &ClientSession {
        &self.session
    }

    /// Takes the session's state from a client store, before [`ClientMachine::start`]: see
    /// [`ClientSession::restore`]. From then on poll [`ClientMachine::poll_store`] after every
    /// input and report commits with [`ClientMachine::handle_stored`].
    pub fn restore(&mut self, now: Instant, records: Vec<StoredRecord>) -> Result<ClientRestored, RestoreError> {
        self.session.restore(now, records)
    }

    /// With a store: the next batch of changes to write (see [`ClientSession::poll_store`]).
    #[must_use]
    pub fn poll_store(&mut self, now: Instant) -> Option<StoreBatch> {
        self.session.poll_store(now)
    }

    /// Batches up to `seq` are stored: output that waited for them goes out.
    pub fn handle_stored(&mut self, now: Instant, seq: u64) {
        self.session.handle_stored(seq);
        self.flush(now);
    }

    /// See [`ClientSession::publish`].
    /// With datagrams on (and negotiated), a QoS 0 message that fits one goes as a QUIC
    /// datagram: unreliable and unordered, never resent.
    pub fn publish(&mut self, now: Instant, publish: Publish) -> Result<RequestId, CommandError> {
        if self.datagrams {
            if let Some((endpoint, conn)) = quic_conn(&mut self.quic, &self.link) {
                if let Some(max) = endpoint.max_datagram_size(conn) {
                    if let Some((id, bytes)) = self.session.publish_datagram(&publish, max)? {
                        // A full send buffer drops it, as a lost datagram would be.
                        let _ = endpoint.send_datagram(now, conn, bytes);
                        self.flush(now);
                        return Ok(id);
                    }
                }
            }
        }
        let id = self.session.publish(now, publish)?;
        self.flush(now);
        Ok(id)
    }

    /// With `manual_acks`: acknowledges the server's message with this packet identifier (see
    /// [`ClientSession::ack`]).
    pub fn ack(&mut self, now: Instant, id: mqtt_proto::PacketId) -> Result<(), CommandError> {
        self.session.ack(now, id)?;
        self.flush(now);
        Ok(())
    }

    /// See [`ClientSession::subscribe`].
    pub fn subscribe(
        &mut self,
        now: Instant,
        subscriptions: Vec<Subscription>,
        subscription_id: Option<SubscriptionId>,
    ) -> Result<RequestId, CommandError> {
        let id = self.session.subscribe(now, subscriptions, subscription_id)?;
        self.flush(now);
        Ok(id)
    }

    /// See [`ClientSession::unsubscribe`].
    pub fn unsubscribe(&mut self, now: Instant, filters: Vec<TopicFilter>) -> Result<RequestId, CommandError> {
        let id = self.session.unsubscribe(now, filters)?;
        self.flush(now);
        Ok(id)
    }

    /// Opens a data stream with send `priority` (higher goes first; the control stream is at
    /// 0): see "Data streams" in the module docs. Over QUIC its QUIC stream opens now if
    /// connected, else once CONNACK comes; over a byte stream the handle stands for the one
    /// stream there is. Refused with [`CommandError::NotConnected`] after
    /// [`ClientMachine::disconnect`].
    pub fn open_stream(&mut self, now: Instant, priority: i32) -> Result<StreamHandle, CommandError> {
        if self.stopped {
            return Err(CommandError::NotConnected);
        }
        self.last_stream += 1;
        let handle = StreamHandle(self.last_stream);
        let session = self.session.data_stream();
        self.streams.insert(handle, DataStream { session, priority, lane: None, heard: false });
        self.open_lane(now, handle);
        self.flush(now);
        Ok(handle)
    }

    /// Ends a data stream (see "Data streams" in the module docs): what it had written goes
    /// out, then its FIN; the server drops its subscriptions, and its pending requests end with
    /// [`ClientEvent::Aborted`]. [`CommandError::UnknownStream`] for a handle already closed.
    pub fn close_stream(&mut self, now: Instant, handle: StreamHandle) -> Result<(), CommandError> {
        let mut stream = self.streams.remove(&handle).ok_or(CommandError::UnknownStream)?;
        self.share_requests(&mut stream.session);
        let last = stream.session.close_data_stream(now);
        if let (Some((endpoint, conn)), Some(lane)) = (quic_conn(&mut self.quic, &self.link), stream.lane) {
            if let Some(bytes) = last {
                let _ = endpoint.send_lane(now, conn, lane, bytes);
            }
            let _ = endpoint.finish_lane(now, conn, lane);
        }
        self.events.extend(std::iter::from_fn(|| stream.session.poll_event()).filter(is_request_event));
        self.pump(now);
        Ok(())
    }

    /// The data streams open (handles given out and not closed).
    pub fn streams(&self) -> Vec<StreamHandle> {
        self.streams.keys().copied().collect()
    }

    /// The QUIC stream a handle's traffic travels on now: `None` over a byte stream, while
    /// not connected, or for an unknown handle.
    pub fn stream_lane(&self, handle: StreamHandle) -> Option<Lane> {
        self.streams.get(&handle)?.lane
    }

    /// A data stream's session (for inspection); over a byte stream it is unused (the
    /// control session carries the handle's traffic).
    pub fn stream_session(&self, handle: StreamHandle) -> Option<&ClientSession> {
        self.streams.get(&handle).map(|s| &s.session)
    }

    /// Publishes on a data stream: see [`ClientSession::publish`] and "Data streams" in the
    /// module docs. [`CommandError::UnknownStream`] for a closed handle.
    pub fn publish_on(
        &mut self,
        now: Instant,
        handle: StreamHandle,
        publish: Publish,
    ) -> Result<RequestId, CommandError> {
        self.on_stream(now, handle, |s, now| s.publish(now, publish))
    }

    /// Subscribes on a data stream: deliveries for these subscriptions travel on it. See
    /// [`ClientSession::subscribe`] and "Data streams" in the module docs.
    pub fn subscribe_on(
        &mut self,
        now: Instant,
        handle: StreamHandle,
        subscriptions: Vec<Subscription>,
        subscription_id: Option<SubscriptionId>,
    ) -> Result<RequestId, CommandError> {
        self.on_stream(now, handle, |s, now| s.subscribe(now, subscriptions, subscription_id))
    }

    /// Unsubscribes on a data stream (from what was subscribed on it). See
    /// [`ClientSession::unsubscribe`].
    pub fn unsubscribe_on(
        &mut self,
        now: Instant,
        handle: StreamHandle,
        filters: Vec<TopicFilter>,
    ) -> Result<RequestId, CommandError> {
        self.on_stream(now, handle, |s, now| s.unsubscribe(now, filters))
    }

    /// Runs a command on a data stream's session (over a byte stream, on the control session),
    /// opening its QUIC stream first if it has none and the connection is up.
    fn on_stream(
        &mut self,
        now: Instant,
        handle: StreamHandle,
        command: impl FnOnce(&mut ClientSession, Instant) -> Result<RequestId, CommandError>,
    ) -> Result<RequestId, CommandError> {
        if !self.streams.contains_key(&handle) {
            return Err(CommandError::UnknownStream);
        }
        if matches!(self.link, Link::Stream { .. }) || self.streams_refused {
            let id = command(&mut self.session, now)?;
            self.flush(now);
            return Ok(id);
        }
        self.open_lane(now, handle);
        let Some(mut stream) = self.streams.remove(&handle) else { return Err(CommandError::UnknownStream) };
        self.share_requests(&mut stream.session);
        let r = command(&mut stream.session, now);
        self.session.set_request_counter(stream.session.request_counter());
        self.streams.insert(handle, stream);
        let id = r?;
        self.flush(now);
        Ok(id)
    }

    /// Whether the server refused a data stream before answering anything on it (a broker
    /// without EMQX's multi-stream mode): the requests in flight on it ended with
    /// [`ClientEvent::Aborted`], and stream handles use the control stream from then on.
    pub fn streams_refused(&self) -> bool {
        self.streams_refused
    }

    /// Continues the machine's request numbering in a data stream's session.
    fn share_requests(&self, session: &mut ClientSession) {
        session.set_request_counter(self.session.request_counter());
    }

    /// Over QUIC and connected: gives a data stream without one its QUIC stream, and its
    /// session goes live on it. A stream the server does not allow yet (its stream limit) is
    /// tried again at the handle's next command or the next connection.
    fn open_lane(&mut self, now: Instant, handle: StreamHandle) {
        let Some((endpoint, conn)) = quic_conn(&mut self.quic, &self.link) else { return };
        if !self.session.is_connected() || self.streams_refused {
            return;
        }
        let Some(stream) = self.streams.get_mut(&handle) else { return };
        if stream.lane.is_some() {
            return;
        }
        let lane = match endpoint.open_lane(now, conn) {
            Ok(lane) => lane,
            Err(quic::CommandError::StreamLimit) if self.streams.values().all(|s| s.lane.is_none()) => {
                // The server allows no stream besides the control stream (a broker without
                // the multi-stream mode, or with it off): handles use the control stream, and
                // what waited for this one ends.
                self.streams_refused = true;
                if let Some(stream) = self.streams.get_mut(&handle) {
                    let _ = stream.session.close_data_stream(now);
                }
                return;
            }
            Err(_) => return,
        };
        let _ = endpoint.set_lane_priority(conn, lane, stream.priority);
        stream.heard = false;
        stream.session.set_request_counter(self.session.request_counter());
        if stream.session.resume_data_stream(now, &self.session).is_ok() {
            stream.lane = Some(lane);
        } else {
            let _ = endpoint.reset_lane(now, conn, lane, quic::close_code::STREAM_ERROR);
        }
    }

    /// The connection's session ended: every data stream's QUIC stream is gone with it.
    fn lanes_lost(&mut self, now: Instant) {
        for stream in self.streams.values_mut() {
            stream.lane = None;
            stream.session.handle_stream_closed(now);
        }
        self.incoming.clear();
    }

    /// Disconnects for good (no reconnect): DISCONNECT, then the stream is finished. Without a
    /// connection it only cancels the pending reconnect.
    pub fn disconnect(&mut self, now: Instant, reason: ReasonCode) -> Result<(), CommandError> {
        self.stopped = true;
        self.reconnect_at = None;
        self.handshake_deadline = None;
        self.probe_at = None;
        self.resolving = None;
        self.end_probe(now);
        if !self.session.is_connected() {
            // Nothing to say DISCONNECT on: drop a half-open connection quietly.
            self.close_link(now);
            self.session.handle_stream_closed(now);
            self.pump(now);
            return Err(CommandError::NotConnected);
        }
        self.session.disconnect(now, reason)?;
        self.flush(now);
        Ok(())
    }

    /// Drops the current connection as if the network had failed (tests and "switch network now").
    pub fn drop_connection(&mut self, now: Instant) {
        if self.close_link(now) {
            self.transport_lost(now);
        }
        self.pump(now);
    }

    /// The next event.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// Over a byte stream: the connection asked for with [`StreamCommand::Open`] is up; CONNECT
    /// follows as [`StreamCommand::Data`].
    pub fn handle_stream_open(&mut self, now: Instant) {
        if let Link::Stream { open: true } = self.link {
            let target = self.targets.current();
            match target.url.as_ref().filter(|u| u.transport.is_websocket()) {
                // Over WebSocket, the upgrade comes first; CONNECT once it is accepted.
                Some(url) => {
                    let mut ws = WsConn::client(&url.authority(), url.websocket_path(), self.ws_seeds.next_u64());
                    queue_ws_output(&mut self.io_out, &mut ws);
                    self.ws = Some(ws);
                    self.ws_deadline = Some(now + self.session.connect_timeout());
                }
                None => {
                    self.ws = None;
                    let _ = self.session.connect(now);
                    self.flush(now);
                }
            }
        }
    }

    /// Over a byte stream: bytes read from the connection.
    pub fn handle_stream_data(&mut self, now: Instant, data: &[u8]) {
        if let Link::Stream { open: true } = self.link {
            match &mut self.ws {
                None => self.session.handle_stream_data(now, data),
                Some(ws) => {
                    let was_open = ws.is_open();
                    let mut mqtt = Vec::new();
                    let result = ws.receive(data, &mut mqtt);
                    let (now_open, closed) = (ws.is_open(), ws.is_closed());
                    queue_ws_output(&mut self.io_out, ws);
                    if !was_open && now_open {
                        self.ws_deadline = None;
                        let _ = self.session.connect(now);
                    }
                    if !mqtt.is_empty() {
                        self.session.handle_stream_data(now, &mqtt);
                    }
                    if closed {
                        // The server closed the WebSocket, refused the upgrade or broke the
                        // framing: the connection is over.
                        let note = match result {
                            Err(e) => e.to_string(),
                            Ok(()) => "the broker closed the WebSocket".to_string(),
                        };
                        self.attempt_note = Some(note);
                        self.close_link(now);
                        self.transport_lost(now);
                    }
                }
            }
            self.pump(now);
        }
    }

    /// Over a byte stream: the connection closed, failed, or could not be opened. The machine
    /// reconnects later if its policy says so (at once to the next broker, with several, if
    /// this one never answered).
    pub fn handle_stream_closed(&mut self, now: Instant) {
        self.ws = None;
        if let Link::Stream { open } = &mut self.link {
            if std::mem::take(open) {
                self.transport_lost(now);
            }
        }
        self.pump(now);
    }

    /// Over a byte stream: the connection could not be opened, or failed, for `reason` (one
    /// line, reported with the failure); otherwise as [`ClientMachine::handle_stream_closed`].
    pub fn handle_stream_failed(&mut self, now: Instant, reason: &str) {
        if let Link::Stream { open: true } = self.link {
            self.attempt_note = Some(reason.to_string());
        }
        self.handle_stream_closed(now);
    }

    /// Over a byte stream: what the adapter should do next. The session's bytes come out here,
    /// as one write for everything since the last call. Over QUIC: names to resolve, and the
    /// closing of a byte stream fallen back from.
    #[must_use]
    pub fn poll_stream(&mut self) -> Option<StreamCommand> {
        self.io_out.pop_front().or_else(|| match self.link {
            Link::Stream { open: true } => match &mut self.ws {
                None => self.session.poll_transmit().map(StreamCommand::Data),
                // Nothing of MQTT before the upgrade is accepted.
                Some(ws) if !ws.is_open() => None,
                Some(ws) => self.session.poll_transmit().map(|bytes| StreamCommand::Data(ws.frame(&bytes))),
            },
            _ => None,
        })
    }

    /// Ends the current connection; whether there was one.
    fn close_link(&mut self, now: Instant) -> bool {
        match &mut self.link {
            Link::Quic { conn } => match (conn.take(), &mut self.quic) {
                (Some(c), Some(endpoint)) => {
                    let _ = endpoint.close(now, c, quic::close_code::NORMAL, "dropped");
                    true
                }
                _ => false,
            },
            Link::Stream { open } => {
                let was = std::mem::take(open);
                if was {
                    self.io_out.push_back(StreamCommand::Close);
                }
                self.ws = None;
                was
            }
        }
    }

    /// Ends the current connection after what the session wrote last (its DISCONNECT).
    fn finish_link(&mut self, now: Instant) {
        self.drain_session_bytes(now, true);
        match &mut self.link {
            Link::Quic { conn } => {
                if let (Some(c), Some(endpoint)) = (conn.take(), &mut self.quic) {
                    let _ = endpoint.finish(now, c);
                }
            }
            Link::Stream { open } => {
                if std::mem::take(open) {
                    // A WebSocket says goodbye with a closing frame.
                    if let Some(mut ws) = self.ws.take() {
                        ws.close();
                        queue_ws_output(&mut self.io_out, &mut ws);
                    }
                    self.io_out.push_back(StreamCommand::Close);
                }
            }
        }
    }

    /// Moves session bytes onto the transport.
    fn flush(&mut self, now: Instant) {
        self.drain_session_bytes(now, false);
        self.pump(now);
    }

    /// Moves the session's bytes to the transport. Over a byte stream they stay in the session
    /// until the adapter asks ([`ClientMachine::poll_stream`]), so that everything written between
    /// two of its turns leaves in one write; `force` queues them now (before a Close).
    fn drain_session_bytes(&mut self, now: Instant, force: bool) -> bool {
        if let (Link::Stream { .. }, false) = (self.link, force) {
            return false;
        }
        // Over WebSocket, nothing of MQTT goes before the upgrade is accepted.
        if self.ws.as_ref().is_some_and(|ws| !ws.is_open()) {
            return false;
        }
        let mut any = false;
        while let Some(bytes) = self.session.poll_transmit() {
            any = true;
            match (self.link, &mut self.quic) {
                (Link::Quic { conn: Some(conn) }, Some(endpoint)) => {
                    let _ = endpoint.send(now, conn, bytes);
                }
                (Link::Stream { open: true }, _) => match &mut self.ws {
                    Some(ws) => self.io_out.push_back(StreamCommand::Data(ws.frame(&bytes))),
                    None => self.io_out.push_back(StreamCommand::Data(bytes)),
                },
                _ => {}
            }
        }
        if let Some((endpoint, conn)) = quic_conn(&mut self.quic, &self.link) {
            for stream in self.streams.values_mut() {
                let Some(lane) = stream.lane else { continue };
                while let Some(bytes) = stream.session.poll_transmit() {
                    any = true;
                    let _ = endpoint.send_lane(now, conn, lane, bytes);
                }
            }
            for (lane, stream) in &mut self.incoming {
                let Some(session) = &mut stream.session else { continue };
                while let Some(bytes) = session.poll_transmit() {
                    any = true;
                    // Acknowledgements for a stream the server opened one way go on the
                    // control stream (nothing can be sent on it).
                    let _ = match lane.is_unidirectional() {
                        true => endpoint.send(now, conn, bytes),
                        false => endpoint.send_lane(now, conn, *lane, bytes),
                    };
                }
            }
        }
        any
    }

    /// The transport under the session ended (`attempt_note` may say why). A session that
    /// began on it reports its end as an event (handled in `pump`, in order with what it read
    /// last, such as a refusing CONNACK); an idle one means the attempt failed before it began.
    fn transport_lost(&mut self, now: Instant) {
        let idle = self.session.is_idle();
        self.session.handle_stream_closed(now);
        if idle && !self.stopped && !self.attempt_ok {
            let text = self.attempt_note.take().unwrap_or_else(|| "connection lost".into());
            self.attempt_failed(now, DisconnectReason::TransportLost, text);
        }
    }

    /// The current attempt failed before CONNACK (`text`: why, one line): the next broker is
    /// tried at once, or, once every broker failed in a row, the failure is reported as
    /// `reason` and the next series waits for the backoff.
    fn attempt_failed(&mut self, now: Instant, reason: DisconnectReason, text: String) {
        self.handshake_deadline = None;
        self.resolving = self.resolving.take().filter(|(_, probe)| *probe);
        if self.stopped {
            return;
        }
        if !self.targets.failed(&text) {
            self.last_failure = Some(text);
            self.reconnect_at = Some(now);
            return;
        }
        self.last_failure = Some(if self.targets.len() > 1 { self.targets.report() } else { text });
        self.targets.new_round();
        self.events.push_back(ClientEvent::Disconnected { reason });
        self.after_loss(now);
    }

    /// A connected session lost its connection: reconnect after the backoff, starting with
    /// the broker that was in use.
    fn connection_lost(&mut self, now: Instant) {
        self.end_probe(now);
        self.probe_at = None;
        self.last_failure = Some(self.attempt_note.take().unwrap_or_else(|| "connection lost".into()));
        self.targets.new_round();
        self.after_loss(now);
    }

    fn after_loss(&mut self, now: Instant) {
        if let (Some(_), false) = (self.reconnect, self.stopped) {
            self.reconnect_at = Some(now + self.backoff.next_delay());
        }
    }

    /// Connected on a later broker than a QUIC first one: try the first again in a while.
    fn schedule_probe(&mut self, now: Instant) {
        self.probe_at = match (self.targets.primary_to_retry(), self.session.is_connected(), self.stopped) {
            (Some(_), true, false) => Some(now + self.fallback.retry_primary),
            _ => None,
        };
    }

    /// Starts a QUIC handshake with the first broker, to move back to it.
    fn start_probe(&mut self, now: Instant) {
        self.probe_at = None;
        let Some(primary) = self.targets.primary_to_retry().cloned() else { return };
        if !self.session.is_connected() || self.probe.is_some() || self.quic.is_none() {
            return;
        }
        self.probe = Some(Probe { conn: None, deadline: now + self.fallback.handshake_timeout });
        match (primary.addr, primary.url) {
            (Some(addr), _) => self.probe_connect(now, addr, &primary.server_name),
            (None, Some(url)) => {
                self.resolving = Some((url.clone(), true));
                self.io_out.push_back(StreamCommand::Resolve(url));
            }
            (None, None) => self.probe_failed(now),
        }
    }

    fn probe_connect(&mut self, now: Instant, addr: SocketAddr, server_name: &str) {
        let (Some(endpoint), Some(probe)) = (&mut self.quic, &mut self.probe) else { return };
        match endpoint.connect(now, addr, server_name) {
            Ok(conn) => probe.conn = Some(conn),
            Err(_) => self.probe_failed(now),
        }
    }

    /// The first broker did not answer: try again later.
    fn probe_failed(&mut self, now: Instant) {
        self.end_probe(now);
        self.schedule_probe(now);
    }

    fn end_probe(&mut self, now: Instant) {
        if let Some(Probe { conn: Some(conn), .. }) = self.probe.take() {
            if let Some(endpoint) = &mut self.quic {
                let _ = endpoint.close(now, conn, quic::close_code::NORMAL, "not needed");
            }
        }
        self.resolving = self.resolving.take().filter(|(_, probe)| !*probe);
    }

    /// The first broker answered the probe: DISCONNECT (normal: no will) on the connection in
    /// use, and CONNECT on the probe's, which becomes the link.
    fn move_back(&mut self, now: Instant, conn: ConnId) {
        if !self.session.is_connected() {
            // The connection in use ended meanwhile: the reconnect under way decides.
            return self.probe_failed(now);
        }
        self.probe = None;
        if self.session.disconnect(now, ReasonCode::Success).is_ok() {
            self.moving_back = true;
        }
        self.moved_back = true;
        self.finish_link(now);
        self.lanes_lost(now);
        self.session.handle_stream_closed(now);
        self.targets.back_to_primary();
        self.attempt_ok = false;
        self.attempt_note = None;
        self.handshake_deadline = None;
        self.link = Link::Quic { conn: Some(conn) };
        let _ = self.session.connect(now);
        self.drain_session_bytes(now, false);
    }

    /// Runs the exchange between the transport and the session until both are quiet.
    fn pump(&mut self, now: Instant) {
        loop {
            let mut progressed = false;
            let mut lost = false;
            let mut back = None;
            let mut probe_lost = false;
            if let Some(endpoint) = &mut self.quic {
                let mut conn = match self.link {
                    Link::Quic { conn } => conn,
                    Link::Stream { .. } => None,
                };
                let probe = self.probe.and_then(|p| p.conn);
                while let Some(event) = endpoint.poll_event() {
                    progressed = true;
                    match event {
                        quic::Event::Connected { conn: c, .. } if Some(c) == conn => self.handshake_deadline = None,
                        quic::Event::Connected { conn: c, .. } if Some(c) == probe => {
                            back = Some(c);
                            break;
                        }
                        quic::Event::Closed { conn: c, .. } if Some(c) == probe => probe_lost = true,
                        quic::Event::Received { conn: c, data } if Some(c) == conn => {
                            self.session.handle_stream_data(now, &data);
                        }
                        quic::Event::Closed { conn: c, reason } if Some(c) == conn => {
                            conn = None;
                            self.link = Link::Quic { conn: None };
                            self.attempt_note = Some(reason.to_string());
                            self.last_close = Some(reason);
                            lost = true;
                        }
                        quic::Event::LaneOpened { conn: c, lane } if Some(c) == conn => {
                            // The server opened a stream to deliver on: take what comes (its
                            // session is made below, once CONNACK is in).
                            self.incoming.insert(lane, ServerStream::new());
                        }
                        quic::Event::DatagramReceived { conn: c, data } if Some(c) == conn && self.datagrams => {
                            self.session.handle_datagram(data);
                        }
                        quic::Event::LaneReceived { conn: c, lane, data } if Some(c) == conn => {
                            if let Some(s) = self.streams.values_mut().find(|s| s.lane == Some(lane)) {
                                s.heard = true;
                                s.session.handle_stream_data(now, &data);
                            } else if let Some(s) = self.incoming.get_mut(&lane) {
                                if !s.feed(now, &data) {
                                    self.incoming.remove(&lane);
                                    let _ = endpoint.reset_lane(now, c, lane, quic::close_code::STREAM_ERROR);
                                }
                            }
                        }
                        quic::Event::LaneEnded { conn: c, lane, .. }
                            if self.incoming.contains_key(&lane) && Some(c) == conn =>
                        {
                            // A stream the server opened, ended by it: ours ends after what
                            // is due on it.
                            if let Some(ServerStream { session: Some(mut session), .. }) = self.incoming.remove(&lane) {
                                while let Some(bytes) = session.poll_transmit() {
                                    let _ = match lane.is_unidirectional() {
                                        true => endpoint.send(now, c, bytes),
                                        false => endpoint.send_lane(now, c, lane, bytes),
                                    };
                                }
                                let events = std::iter::from_fn(|| session.poll_event());
                                self.events.extend(events.filter(is_request_event));
                            }
                            if !lane.is_unidirectional() {
                                let _ = endpoint.finish_lane(now, c, lane);
                            }
                        }
                        quic::Event::LaneEnded { conn: c, lane, reason } if Some(c) == conn => {
                            // The server ended the stream: it forgot its subscriptions and
                            // QoS state. The handle gets a new stream at its next command, or
                            // uses the control stream if the server refuses data streams.
                            if let Some(s) = self.streams.values_mut().find(|s| s.lane == Some(lane)) {
                                s.lane = None;
                                // (Application error 1 is EMQX's and our broker's "this stream
                                // broke the protocol": a server that says it speaks the mode.)
                                let code = match reason {
                                    quic::LaneEnd::Reset(code) | quic::LaneEnd::Stopped(code) => Some(code),
                                    _ => None,
                                };
                                if !s.heard && code.is_some_and(|c| c != u64::from(quic::close_code::STREAM_ERROR)) {
                                    // Nothing waits for a stream that will not come: what was
                                    // in flight on it ends now.
                                    self.streams_refused = true;
                                    let _ = s.session.close_data_stream(now);
                                } else {
                                    s.session.handle_stream_closed(now);
                                }
                                let _ = endpoint.reset_lane(now, c, lane, quic::close_code::NORMAL);
                            }
                        }
                        _ => {}
                    }
                }
            }
            if let Some(conn) = back {
                self.move_back(now, conn);
            }
            if probe_lost {
                self.probe = None;
                self.probe_failed(now);
            }
            if lost {
                self.transport_lost(now);
            }
            progressed |= self.drain_session_bytes(now, false);
            progressed |= self.stream_events(now);
            while let Some(event) = self.session.poll_event() {
                progressed = true;
                if let (true, ClientEvent::Disconnected { reason: DisconnectReason::Local }) =
                    (self.moving_back, &event)
                {
                    // Our own DISCONNECT on the way back to the first broker.
                    self.moving_back = false;
                    continue;
                }
                if let ClientEvent::Connected { .. } = event {
                    self.attempt_ok = true;
                    self.moved_back = false;
                    self.handshake_deadline = None;
                    self.targets.new_round();
                    self.backoff.reset();
                    if let Link::Stream { .. } = self.link {
                        // Over a byte stream the handles use the control session: what waited
                        // in their sessions for a QUIC stream ends now (instead of waiting for
                        // a QUIC connection that may not come), and they start afresh.
                        for stream in self.streams.values_mut() {
                            let _ = stream.session.close_data_stream(now);
                            let ended = std::iter::from_fn(|| stream.session.poll_event());
                            self.events.extend(ended.filter(is_request_event));
                            stream.session = self.session.data_stream();
                        }
                    }
                    let handles: Vec<StreamHandle> = self.streams.keys().copied().collect();
                    for handle in handles {
                        self.open_lane(now, handle);
                    }
                    self.schedule_probe(now);
                }
                // A lost transport was noticed where it happened; anything else ends the
                // session on this connection.
                let ended = match &event {
                    ClientEvent::Disconnected { reason } => *reason != DisconnectReason::TransportLost,
                    ClientEvent::Refused { .. } => true,
                    _ => false,
                };
                if let ClientEvent::Disconnected { .. } = event {
                    self.lanes_lost(now);
                }
                if ended {
                    // End the stream after what the session wrote last (DISCONNECT).
                    self.finish_link(now);
                    self.session.handle_stream_closed(now);
                }
                match event {
                    ClientEvent::Disconnected { reason } if !self.attempt_ok && !self.stopped => {
                        // No CONNACK on this attempt: the next broker, or a report.
                        let text = match (self.attempt_note.take(), &reason) {
                            (Some(note), _) => note,
                            (None, DisconnectReason::ConnectTimeout) => {
                                format!("{reason} (is an MQTT broker listening there?)")
                            }
                            (None, _) => reason.to_string(),
                        };
                        self.attempt_failed(now, reason, text);
                        continue;
                    }
                    ClientEvent::Refused { reason } if std::mem::take(&mut self.moved_back) => {
                        // The first broker answered QUIC but refused the session: back to the
                        // broker that worked, after the backoff.
                        let _ = self.targets.failed(&format!("refused: {reason}"));
                        self.connection_lost(now);
                        self.attempt_ok = false;
                    }
                    ClientEvent::Disconnected { .. } | ClientEvent::Refused { .. } => {
                        self.connection_lost(now);
                        self.attempt_ok = false;
                    }
                    _ => {}
                }
                self.events.push_back(event);
            }
            if !progressed {
                break;
            }
        }
    }
}

/// Whether a data stream's event is one the machine reports (its connection's events are the
/// control session's to report).
fn is_request_event(event: &ClientEvent) -> bool {
    !matches!(event, ClientEvent::Connected { .. } | ClientEvent::Disconnected { .. } | ClientEvent::Refused { .. })
}

impl ClientMachine {
    /// Moves the data streams' events to the machine's; a stream whose session the server
    /// broke (a control packet on it, bytes that do not decode) is reset, and its handle gets
    /// a new stream at its next command. Whether there were any.
    fn stream_events(&mut self, now: Instant) -> bool {
        let mut any = false;
        let mut broken = Vec::new();
        // Streams the server opened get their sessions once CONNACK is in.
        let control = &self.session;
        for (lane, stream) in &mut self.incoming {
            if !stream.activate(now, control) {
                broken.push(*lane);
            }
        }
        for (lane, stream) in &mut self.incoming {
            let Some(session) = &mut stream.session else { continue };
            while let Some(event) = session.poll_event() {
                any = true;
                if let ClientEvent::Disconnected { .. } = event {
                    broken.push(*lane);
                } else if is_request_event(&event) {
                    self.events.push_back(event);
                }
            }
        }
        for lane in broken {
            self.incoming.remove(&lane);
            if let Some((endpoint, conn)) = quic_conn(&mut self.quic, &self.link) {
                let _ = endpoint.reset_lane(now, conn, lane, quic::close_code::STREAM_ERROR);
            }
        }
        for stream in self.streams.values_mut() {
            while let Some(event) = stream.session.poll_event() {
                any = true;
                if let ClientEvent::Disconnected { reason: DisconnectReason::ProtocolViolation(_) } = event {
                    if let (Some((endpoint, conn)), Some(lane)) = (quic_conn(&mut self.quic, &self.link), stream.lane) {
                        let _ = endpoint.reset_lane(now, conn, lane, quic::close_code::STREAM_ERROR);
                    }
                    stream.lane = None;
                    stream.session.handle_stream_closed(now);
                }
                if is_request_event(&event) {
                    self.events.push_back(event);
                }
            }
        }
        any
    }
}

/// The [`Machine`](crate::Machine) interface, as inherent methods (the trait forwards to them).
impl ClientMachine {
    /// Feeds one received UDP datagram (see [`Machine::handle_datagram`](crate::Machine::handle_datagram)).
    pub fn handle_datagram(&mut self, now: Instant, datagram: Datagram<'_>) {
        if let Some(endpoint) = &mut self.quic {
            endpoint.handle_datagram(now, datagram);
            self.pump(now);
        }
    }

    /// Advances timers; early calls do nothing.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(endpoint) = &mut self.quic {
            endpoint.handle_timeout(now);
        }
        self.session.handle_timeout(now);
        self.pump(now);
        if self.ws_deadline.is_some_and(|t| t <= now) {
            self.ws_deadline = None;
            if self.ws.as_ref().is_some_and(|ws| !ws.is_open()) {
                self.attempt_note = Some("the broker did not accept the WebSocket upgrade in time".into());
                self.close_link(now);
                self.transport_lost(now);
                self.pump(now);
            }
        }
        if self.handshake_deadline.is_some_and(|t| t <= now) {
            // UDP blocked, or nothing QUIC there: the next broker.
            self.handshake_deadline = None;
            self.attempt_note = Some(format!(
                "no QUIC handshake within {} ms (is UDP blocked?)",
                self.fallback.handshake_timeout.as_millis()
            ));
            self.close_link(now);
            self.transport_lost(now);
            self.pump(now);
        }
        if self.probe.is_some_and(|p| p.deadline <= now) {
            self.probe_failed(now);
        }
        if self.probe_at.is_some_and(|t| t <= now) {
            self.start_probe(now);
            self.pump(now);
        }
        if self.reconnect_at.is_some_and(|t| t <= now) && !self.stopped {
            if let Err(e) = self.open(now) {
                self.attempt_failed(now, DisconnectReason::TransportLost, e.to_string());
            }
            self.pump(now);
        }
    }

    /// The next datagram to send, written into `buf`.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        self.poll_transmit_batch(now, 1, buf)
    }

    /// Up to `max_datagrams` datagrams to one destination at once (see [`Machine::poll_transmit_batch`](crate::Machine::poll_transmit_batch)).
    #[must_use]
    pub fn poll_transmit_batch(&mut self, now: Instant, max_datagrams: usize, buf: &mut Vec<u8>) -> Option<Transmit> {
        let t = self.quic.as_mut()?.poll_transmit_batch(now, max_datagrams, buf);
        self.pump(now);
        t
    }

    /// When to call `handle_timeout` next.
    #[must_use]
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        let quic = self.quic.as_mut().and_then(|e| e.poll_timeout());
        let probe = self.probe.map(|p| p.deadline);
        let ws = self.ws_deadline;
        [quic, self.session.poll_timeout(), self.reconnect_at, self.handshake_deadline, probe, self.probe_at, ws]
            .into_iter()
            .flatten()
            .min()
    }
}

/// Queues what a WebSocket connection has to write besides framed MQTT (its upgrade request,
/// Pongs, its closing frame) for the adapter, in order.
fn queue_ws_output(io_out: &mut VecDeque<StreamCommand>, ws: &mut WsConn) {
    while let Some(bytes) = ws.poll_output() {
        io_out.push_back(StreamCommand::Data(bytes));
    }
}

crate::machine::forward_machine!(ClientMachine);
