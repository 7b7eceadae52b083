//! What every client driver needs besides sockets and timers, whatever its runtime: matching
//! acknowledgements to the callers waiting for them, the connection state users see, the first
//! connection's outcome, the messages waiting for the application, and a clean disconnect.
//!
//! [`ClientDriver`] wraps a [`ClientMachine`]. An adapter feeds it socket input and time like the
//! machine itself, hands it commands tagged with a token of its choice (a oneshot sender, a
//! request number), and polls completions, messages and state changes back out. The tokio,
//! async-std and mio adapters differ only in how they wait and how they deliver those.
//!
//! ```
//! use mqtt_quic_core::client::ClientMachine;
//! use mqtt_quic_core::driver::{ClientDriver, ConnectionState};
//! use mqtt_quic_core::session::client::ClientSessionConfig;
//! # #[allow(clippy::disallowed_methods)]
//! let now = std::time::Instant::now();
//! // Over a byte stream nobody opens, for the example: the first attempt fails.
//! let machine = ClientMachine::over_stream(ClientSessionConfig::default(), None, 1)?;
//! let mut driver: ClientDriver<u32> = ClientDriver::new(machine);
//! driver.start(now);
//! driver.handle_stream_failed(now, "connection refused");
//! assert!(matches!(driver.poll_connected(), Some(Err(_))));
//! assert!(matches!(driver.state(), ConnectionState::Closed { .. }));
//! # Ok::<(), mqtt_quic_core::config::ConfigError>(())
//! ```

use crate::client::{ClientMachine, ClientMachineConfig, ReconnectPolicy, StreamCommand};
use crate::config::{ClientConfig, ConfigError, TransportSettings};
use crate::machine::Datagram;
use crate::quic::Transmit;
use crate::session::client::ClientSessionConfig;
use crate::session::client::{ClientEvent, CommandError, DisconnectReason, RequestId};
use crate::tls::ClientTls;
use crate::url::{BrokerUrl, Transport};
use bytes::Bytes;
use mqtt_proto::{Publish, QoS, ReasonCode, Subscription, TopicFilter};
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use thiserror::Error;

/// [`ClientOptions::message_buffer`]'s default.
const DEFAULT_MESSAGE_BUFFER: usize = 1024;

/// How a client connects, whatever drives it.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The MQTT session: protocol version, client id, keep-alive, credentials, will...
    pub session: ClientSessionConfig,
    /// How to trust the broker (QUIC and `mqtts://`). Required for those; adapters fill in the
    /// operating system's CAs when the application gives none.
    pub tls: Option<ClientTls>,
    /// The name the broker's certificate must carry, if not the URL's host.
    pub server_name: Option<String>,
    /// Reconnect after the connection is lost (with the core's jittered backoff); `None` ends
    /// the client instead. The first connection is never retried: its failure is the
    /// connect call's error.
    pub reconnect: Option<ReconnectPolicy>,
    /// QUIC transport settings.
    pub transport: TransportSettings,
    /// Try 0-RTT when resuming over QUIC.
    pub zero_rtt: bool,
    /// Messages held for the application before the driver stops reading from the network.
    pub message_buffer: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            session: ClientSessionConfig::default(),
            tls: None,
            server_name: None,
            reconnect: Some(ReconnectPolicy::default()),
            transport: TransportSettings::default(),
            zero_rtt: true,
            message_buffer: DEFAULT_MESSAGE_BUFFER,
        }
    }
}

impl ClientOptions {
    /// MQTT 5, a server-assigned client id, clean start, keep-alive 60 s, reconnecting.
    pub fn new() -> ClientOptions {
        ClientOptions::default()
    }

    /// Sets the client identifier.
    pub fn client_id(mut self, id: impl Into<String>) -> ClientOptions {
        self.session.client_id = id.into();
        self
    }

    /// Sets user name and password.
    pub fn credentials(mut self, username: impl Into<String>, password: impl Into<Bytes>) -> ClientOptions {
        self.session.username = Some(username.into());
        self.session.password = Some(password.into());
        self
    }

    /// Sets how the broker's certificate is checked.
    pub fn tls(mut self, tls: ClientTls) -> ClientOptions {
        self.tls = Some(tls);
        self
    }

    /// The name the broker's certificate is checked against for `url`.
    pub fn server_name(&self, url: &BrokerUrl) -> String {
        self.server_name.clone().unwrap_or_else(|| url.host.clone())
    }

    /// The machine for `url`, whose host resolved to `server`: QUIC for `quic://`, a byte
    /// stream the adapter carries otherwise (with TLS for `mqtts://`: see
    /// [`ClientOptions::stream_tls`]). `secret` (32 bytes from the operating system's random
    /// source) keys the QUIC endpoint and drives connection ids and backoff jitter.
    pub fn machine(&self, url: &BrokerUrl, server: SocketAddr, secret: [u8; 32]) -> Result<ClientMachine, ConfigError> {
        let mut seed = [0u8; 8];
        seed.copy_from_slice(&secret[..8]);
        let seed = u64::from_le_bytes(seed);
        match url.transport {
            Transport::Quic => {
                let mut quic = ClientConfig::new(self.tls.clone().ok_or_else(no_trust)?);
                quic.transport = self.transport.clone();
                quic.zero_rtt = self.zero_rtt;
                quic.seed = seed;
                quic.secret = Some(crate::config::Secret::new(secret));
                ClientMachine::new(ClientMachineConfig {
                    quic,
                    session: self.session.clone(),
                    server,
                    server_name: self.server_name(url),
                    reconnect: self.reconnect,
                })
            }
            Transport::Tcp | Transport::Tls => ClientMachine::over_stream(self.session.clone(), self.reconnect, seed),
        }
    }

    /// For `mqtts://`: the rustls configuration and server name to wrap the TCP stream in;
    /// `None` for other transports.
    pub fn stream_tls(
        &self,
        url: &BrokerUrl,
    ) -> Result<Option<(rustls::ClientConfig, rustls_pki_types::ServerName<'static>)>, ConfigError> {
        if url.transport != Transport::Tls {
            return Ok(None);
        }
        let config = self.tls.as_ref().ok_or_else(no_trust)?.rustls_config(false)?;
        let name = rustls_pki_types::ServerName::try_from(self.server_name(url))
            .map_err(|e| ConfigError::Invalid(format!("server name: {e}")))?;
        Ok(Some((config, name)))
    }
}

fn no_trust() -> ConfigError {
    ConfigError::Invalid("no TLS trust configured (a CA, a pinned certificate, or the system's CAs)".into())
}

/// How long a disconnect may take to deliver DISCONNECT and close before the driver gives up.
const LINGER: Duration = Duration::from_secs(2);

/// Where the connection stands, as users see it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionState {
    /// The first connection is being made.
    Connecting,
    /// The broker accepted the connection.
    Connected {
        /// Whether the broker resumed a kept session.
        session_present: bool,
    },
    /// The connection was lost; a new one is attempted after the backoff.
    Reconnecting {
        /// Why it was lost.
        reason: String,
    },
    /// The client is done (disconnected, or lost without reconnecting).
    Closed {
        /// Why.
        reason: String,
    },
}

/// Why a command, or the first connection, failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DriverError {
    /// The session refused the command.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// The broker answered with a failure code.
    #[error("the broker rejected it: {0}")]
    Rejected(ReasonCode),
    /// The connection ended before the broker answered; it may or may not have taken effect.
    #[error("the connection was lost before the broker answered")]
    ConnectionLost,
    /// The client has been disconnected.
    #[error("the client is closed")]
    Closed,
    /// CONNACK refused the first connection.
    #[error("the broker refused the connection: {0}")]
    Refused(ReasonCode),
    /// The first connection could not be made; the text says why (refused, timed out,
    /// certificate).
    #[error("{0}")]
    Unreachable(String),
}

/// Why a client could not connect, or an operation failed: one error type for the clients of
/// every adapter.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The broker URL is malformed.
    #[error(transparent)]
    Url(#[from] crate::url::UrlError),
    /// The host name did not resolve.
    #[error("cannot resolve {host}: {reason}")]
    Resolve {
        /// The host.
        host: String,
        /// Why.
        reason: String,
    },
    /// A local socket could not be set up.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The settings are invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Trust material (CA files, the system's store) could not be loaded.
    #[error("{0}")]
    Trust(String),
    /// The adapter does not offer this (e.g. `mqtts://` where there is no TLS over TCP).
    #[error("not supported here: {0}")]
    Unsupported(&'static str),
    /// The broker could not be reached (refused, timed out, no route) or the TLS handshake
    /// failed (the reason names the certificate problem).
    #[error("cannot connect to {url}: {reason}")]
    Unreachable {
        /// Where.
        url: String,
        /// Why.
        reason: String,
    },
    /// CONNACK refused the connection.
    #[error("the broker refused the connection: {0}")]
    Refused(ReasonCode),
    /// The session refused the command.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// The broker answered with a failure code.
    #[error("the broker rejected it: {0}")]
    Rejected(ReasonCode),
    /// The connection ended before the broker answered; it may or may not have taken effect.
    #[error("the connection was lost before the broker answered")]
    ConnectionLost,
    /// The client has been disconnected.
    #[error("the client is closed")]
    Closed,
}

/// The broker address to use among those `url`'s host resolved to (or why there is none).
/// IPv4 is preferred when a name has both kinds: brokers listen on 0.0.0.0 by default, and
/// `localhost` often resolves to `::1` first.
pub fn pick_address(
    url: &BrokerUrl,
    resolved: std::io::Result<impl Iterator<Item = SocketAddr>>,
) -> Result<SocketAddr, ClientError> {
    let resolve = |reason: String| ClientError::Resolve { host: url.host.clone(), reason };
    let mut addrs: Vec<SocketAddr> = resolved.map_err(|e| resolve(e.to_string()))?.collect();
    addrs.sort_by_key(|a| a.is_ipv6());
    addrs.first().copied().ok_or_else(|| resolve("no address".into()))
}

/// The local address a client's UDP socket binds to for a broker at `server`: any address of
/// the same family, any port.
pub fn local_bind_address(server: SocketAddr) -> SocketAddr {
    if server.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    }
}

impl ClientError {
    /// The client error for a driver error, naming `url` where the connection failed.
    pub fn from_driver(e: DriverError, url: &str) -> ClientError {
        match e {
            DriverError::Command(c) => ClientError::Command(c),
            DriverError::Rejected(r) => ClientError::Rejected(r),
            DriverError::ConnectionLost => ClientError::ConnectionLost,
            DriverError::Refused(r) => ClientError::Refused(r),
            DriverError::Unreachable(reason) => ClientError::Unreachable { url: url.to_string(), reason },
            DriverError::Closed => ClientError::Closed,
        }
    }
}

/// Where and how a broker server listens, for every adapter's server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The broker machine's settings; its QUIC configuration also supplies the certificate for
    /// a TLS listener, and its `max_queued_bytes` bounds what waits for each client.
    pub broker: crate::broker::machine::BrokerConfig,
    /// UDP address for MQTT over QUIC, if any.
    pub quic: Option<SocketAddr>,
    /// TCP address for plain MQTT, if any.
    pub tcp: Option<SocketAddr>,
    /// TCP address for MQTT over TLS, if any (adapters without TLS over TCP refuse to start
    /// with one).
    pub tls: Option<SocketAddr>,
    /// Most simultaneous connections on the TCP listener; more are closed at accept.
    pub tcp_max_connections: usize,
    /// Most simultaneous connections on the TLS listener.
    pub tls_max_connections: usize,
    /// How long a TLS handshake may take.
    pub tls_handshake_timeout: Duration,
    /// How long a shutdown waits for clients to take their DISCONNECT.
    pub shutdown_grace: Duration,
}

impl ServerOptions {
    /// QUIC on `0.0.0.0:14567` and TCP on `0.0.0.0:1883`, no TLS listener, with this
    /// certificate and default broker settings.
    pub fn new(tls: crate::tls::ServerTls) -> ServerOptions {
        ServerOptions {
            broker: crate::broker::machine::BrokerConfig::new(crate::config::ServerConfig::new(tls)),
            quic: Some(SocketAddr::from(([0, 0, 0, 0], crate::url::QUIC_PORT))),
            tcp: Some(SocketAddr::from(([0, 0, 0, 0], crate::url::TCP_PORT))),
            tls: None,
            tcp_max_connections: 100_000,
            tls_max_connections: 100_000,
            tls_handshake_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(2),
        }
    }

    /// QUIC and TCP on 127.0.0.1 with ports chosen by the system (tests, embedding).
    pub fn loopback(tls: crate::tls::ServerTls) -> ServerOptions {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        ServerOptions { quic: Some(any), tcp: Some(any), ..ServerOptions::new(tls) }
    }
}

/// Why a broker server did not start.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ServerError {
    /// A listener could not be opened (port in use, no permission, no such address).
    #[error("cannot listen for {what} on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Another socket call failed (e.g. registering with a poll).
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The broker's configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The TLS listener's certificate could not be used.
    #[error("TLS listener: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The adapter does not offer this listener.
    #[error("not supported here: {0}")]
    Unsupported(&'static str),
    /// The running broker stopped without being asked to (a bug; the process should exit
    /// with a failure status so that its supervisor restarts it).
    #[error("the broker stopped unexpectedly: {0}")]
    Stopped(&'static str),
}

/// What a completed command produced.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Published (QoS 0 written, QoS 1 PUBACK, QoS 2 PUBCOMP) or disconnected.
    Done,
    /// SUBACK's or UNSUBACK's reason codes, one per filter (empty UNSUBACK codes for 3.1.1).
    Codes(Vec<ReasonCode>),
}

impl Outcome {
    /// SUBACK's or UNSUBACK's codes: what every adapter's `subscribe_many` and `unsubscribe`
    /// return (empty for a command that has none).
    pub fn into_codes(self) -> Vec<ReasonCode> {
        match self {
            Outcome::Codes(codes) => codes,
            Outcome::Done => Vec::new(),
        }
    }

    /// What every adapter's `subscribe` (one filter) returns for its SUBACK: the QoS the broker
    /// granted, or [`ClientError::Rejected`] with the failure code it answered with. A SUBACK
    /// without a code for the filter (a broker bug) counts as Unspecified error, so a caller
    /// never takes a subscription for granted that the broker did not confirm.
    pub fn granted_qos(self) -> Result<QoS, ClientError> {
        match self.into_codes().first() {
            Some(c) if !c.is_error() => Ok(QoS::from_u8(c.as_u8()).unwrap_or(QoS::AtMostOnce)),
            Some(c) => Err(ClientError::Rejected(*c)),
            None => Err(ClientError::Rejected(ReasonCode::UnspecifiedError)),
        }
    }
}

/// Where a broker server listens, as every adapter's `Server::addresses` reports it: the
/// addresses actually bound (with the ports the system chose for port 0), `None` for a
/// listener that is not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServerAddresses {
    /// MQTT over QUIC (UDP).
    pub quic: Option<SocketAddr>,
    /// Plain MQTT (TCP).
    pub tcp: Option<SocketAddr>,
    /// MQTT over TLS (TCP); always `None` for adapters without a TLS listener.
    pub tls: Option<SocketAddr>,
}

/// The one back-pressure rule of every client adapter, shared by the task that drives a
/// [`ClientDriver`] and the application's message receiver.
///
/// The adapter hands each message to the application as soon as it arrives
/// ([`MessageBacklog::handed`]); the receiver reports each one it gives the application
/// ([`MessageBacklog::taken`]). While [`ClientOptions::message_buffer`] messages are untaken,
/// [`ClientDriver::is_reading`] is false and the adapter stops reading from the network, so a
/// slow application slows the broker down (QUIC flow control, TCP windows, and past those the
/// broker's own per-client limit) instead of growing the client's memory. When the application
/// catches up, the task waiting on [`MessageBacklog::room`] wakes and reads again. Once the
/// application drops its receiver ([`MessageBacklog::detach`]) nothing is counted any more:
/// messages nobody can take are discarded, and the connection keeps going.
#[derive(Debug, Clone)]
pub struct MessageBacklog(Arc<BacklogInner>);

#[derive(Debug)]
struct BacklogInner {
    limit: usize,
    unread: AtomicUsize,
    detached: AtomicBool,
    /// The driving task, waiting for room.
    waiting: Mutex<Option<Waker>>,
}

impl MessageBacklog {
    /// Room for `limit` untaken messages (at least one).
    pub fn new(limit: usize) -> MessageBacklog {
        MessageBacklog(Arc::new(BacklogInner {
            limit: limit.max(1),
            unread: AtomicUsize::new(0),
            detached: AtomicBool::new(false),
            waiting: Mutex::new(None),
        }))
    }

    /// The most untaken messages before reading stops.
    pub fn limit(&self) -> usize {
        self.0.limit
    }

    /// Messages handed to the application and not taken yet.
    pub fn unread(&self) -> usize {
        self.0.unread.load(Ordering::Acquire)
    }

    /// Whether the application can take more (or has gone, and takes nothing any more).
    pub fn has_room(&self) -> bool {
        self.0.detached.load(Ordering::Acquire) || self.unread() < self.0.limit
    }

    /// The adapter put a message where the application takes it from.
    pub fn handed(&self) {
        if !self.0.detached.load(Ordering::Acquire) {
            self.0.unread.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// The application took a message: wakes the driving task if that made room.
    pub fn taken(&self) {
        let _ = self.0.unread.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        if self.has_room() {
            self.wake();
        }
    }

    /// The application dropped its receiver: nothing waits to be taken any more.
    pub fn detach(&self) {
        self.0.detached.store(true, Ordering::Release);
        self.0.unread.store(0, Ordering::Release);
        self.wake();
    }

    /// Whether the application dropped its receiver.
    pub fn is_detached(&self) -> bool {
        self.0.detached.load(Ordering::Acquire)
    }

    /// Resolves once there is room (at once if there is): what a driving task waits on while
    /// it does not read. Runtime-agnostic: any executor's waker will do.
    pub fn room(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let backlog = self.clone();
        std::future::poll_fn(move |cx| backlog.poll_room(cx))
    }

    /// [`MessageBacklog::room`] as a poll: registers `cx`'s waker while there is none.
    pub fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.has_room() {
            return Poll::Ready(());
        }
        self.register(cx.waker());
        // Taken between the check and the registration: do not sleep through it.
        if self.has_room() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Registers the waker to wake when room comes back (replacing any earlier one): for
    /// drivers that are not futures, such as a thread waiting in a `mio::Poll`.
    pub fn register(&self, waker: &Waker) {
        if let Ok(mut w) = self.0.waiting.lock() {
            match &*w {
                Some(old) if old.will_wake(waker) => {}
                _ => *w = Some(waker.clone()),
            }
        }
    }

    fn wake(&self) {
        if let Some(w) = self.0.waiting.lock().ok().and_then(|mut w| w.take()) {
            w.wake();
        }
    }
}

/// A command for a [`ClientDriver`], as adapters carry them from user handles to the task
/// that owns the driver, each with the token its result goes to.
#[derive(Debug)]
#[non_exhaustive]
pub enum Command<T> {
    /// See [`ClientDriver::publish`].
    Publish(Publish, T),
    /// See [`ClientDriver::subscribe`].
    Subscribe(Vec<Subscription>, T),
    /// See [`ClientDriver::unsubscribe`].
    Unsubscribe(Vec<TopicFilter>, T),
    /// See [`ClientDriver::disconnect`].
    Disconnect(Option<T>),
}

enum First {
    Waiting,
    Ready(Result<String, DriverError>),
    Reported,
}

/// A client machine with its callers' bookkeeping. `T` is the adapter's token for a waiting
/// caller. See the module docs.
pub struct ClientDriver<T> {
    machine: ClientMachine,
    waiting: BTreeMap<RequestId, T>,
    done: VecDeque<(T, Result<Outcome, DriverError>)>,
    inbox: VecDeque<Publish>,
    state: ConnectionState,
    changes: VecDeque<ConnectionState>,
    first: First,
    /// A disconnect in progress: who waits for it, and when to stop waiting for the transport.
    leaving: Option<(Vec<T>, Instant)>,
    last_reason: String,
    backlog: MessageBacklog,
}

impl<T> ClientDriver<T> {
    /// Wraps a machine that has not been started.
    pub fn new(machine: ClientMachine) -> ClientDriver<T> {
        ClientDriver {
            machine,
            waiting: BTreeMap::new(),
            done: VecDeque::new(),
            inbox: VecDeque::new(),
            state: ConnectionState::Connecting,
            changes: VecDeque::new(),
            first: First::Waiting,
            leaving: None,
            last_reason: "connection lost".into(),
            backlog: MessageBacklog::new(DEFAULT_MESSAGE_BUFFER),
        }
    }

    /// Sets how many messages may wait for the application before the adapter stops reading
    /// (see [`MessageBacklog`]); adapters pass [`ClientOptions::message_buffer`].
    pub fn with_message_buffer(mut self, limit: usize) -> ClientDriver<T> {
        self.backlog = MessageBacklog::new(limit);
        self
    }

    /// The back-pressure counter shared with the application's receiver (see
    /// [`MessageBacklog`]).
    pub fn backlog(&self) -> &MessageBacklog {
        &self.backlog
    }

    /// Whether the adapter should read from the network now: false while the messages waiting
    /// here and those handed to the application but not taken fill
    /// [`ClientOptions::message_buffer`]. While it is false, wait on
    /// [`MessageBacklog::room`] besides commands and timers.
    pub fn is_reading(&self) -> bool {
        self.backlog.is_detached() || self.inbox.len() + self.backlog.unread() < self.backlog.limit()
    }

    /// The next message, counted as handed to the application (see [`MessageBacklog::handed`]):
    /// what adapters that deliver through a channel to the application use.
    pub fn hand_message(&mut self) -> Option<Publish> {
        let m = self.inbox.pop_front()?;
        self.backlog.handed();
        Some(m)
    }

    /// Starts the first connection; its outcome comes from [`ClientDriver::poll_connected`].
    pub fn start(&mut self, now: Instant) {
        if let Err(e) = self.machine.start(now) {
            self.fail_first(now, DriverError::Unreachable(e.to_string()));
        }
        self.update(now);
    }

    /// The machine, for inspection.
    pub fn machine(&self) -> &ClientMachine {
        &self.machine
    }

    /// Publishes; completes with [`Outcome::Done`] when acknowledged (see
    /// [`ClientMachine::publish`]).
    pub fn publish(&mut self, now: Instant, publish: Publish, token: T) {
        let r = self.machine.publish(now, publish);
        self.track(r, token);
        self.update(now);
    }

    /// Subscribes; completes with SUBACK's codes.
    pub fn subscribe(&mut self, now: Instant, subscriptions: Vec<Subscription>, token: T) {
        let r = self.machine.subscribe(now, subscriptions, None);
        self.track(r, token);
        self.update(now);
    }

    /// Unsubscribes; completes with UNSUBACK's codes.
    pub fn unsubscribe(&mut self, now: Instant, filters: Vec<TopicFilter>, token: T) {
        let r = self.machine.unsubscribe(now, filters);
        self.track(r, token);
        self.update(now);
    }

    /// Disconnects for good (DISCONNECT, normal: the broker drops the will). `token`, if any,
    /// completes with [`Outcome::Done`] once the transport has closed (or after a short
    /// linger), when [`ClientDriver::is_done`] turns true.
    pub fn disconnect(&mut self, now: Instant, token: Option<T>) {
        if self.leaving.is_none() {
            let _ = self.machine.disconnect(now, ReasonCode::Success);
            self.set_state(ConnectionState::Closed { reason: "disconnected".into() });
            self.leaving = Some((Vec::new(), now + LINGER));
        }
        if let Some((waiting, _)) = &mut self.leaving {
            waiting.extend(token);
        }
        self.update(now);
    }

    /// Carries out a command; `None` means every user handle is gone, which disconnects.
    pub fn command(&mut self, now: Instant, command: Option<Command<T>>) {
        match command {
            Some(Command::Publish(p, t)) => self.publish(now, p, t),
            Some(Command::Subscribe(s, t)) => self.subscribe(now, s, t),
            Some(Command::Unsubscribe(f, t)) => self.unsubscribe(now, f, t),
            Some(Command::Disconnect(t)) => self.disconnect(now, t),
            None => self.disconnect(now, None),
        }
    }

    /// Whether commands are still taken (no disconnect has begun).
    pub fn is_accepting(&self) -> bool {
        self.leaving.is_none()
    }

    fn track(&mut self, r: Result<RequestId, CommandError>, token: T) {
        match r {
            Ok(id) => drop(self.waiting.insert(id, token)),
            Err(e) => self.done.push_back((token, Err(e.into()))),
        }
    }

    /// Over QUIC: a received datagram.
    pub fn handle_datagram(&mut self, now: Instant, datagram: Datagram<'_>) {
        self.machine.handle_datagram(now, datagram);
        self.update(now);
    }

    /// Over QUIC: the next datagram to send, written into `buf`.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        self.poll_transmit_batch(now, 1, buf)
    }

    /// Over QUIC: up to `max_datagrams` datagrams to one destination at once (see
    /// [`Machine::poll_transmit_batch`](crate::Machine::poll_transmit_batch)).
    #[must_use]
    pub fn poll_transmit_batch(&mut self, now: Instant, max_datagrams: usize, buf: &mut Vec<u8>) -> Option<Transmit> {
        let t = self.machine.poll_transmit_batch(now, max_datagrams, buf);
        self.update(now);
        t
    }

    /// Over a byte stream: what to do next (see [`ClientMachine::poll_stream`]).
    #[must_use]
    pub fn poll_stream(&mut self) -> Option<StreamCommand> {
        self.machine.poll_stream()
    }

    /// Over a byte stream: the connection asked for is up.
    pub fn handle_stream_open(&mut self, now: Instant) {
        self.machine.handle_stream_open(now);
        self.update(now);
    }

    /// Over a byte stream: bytes read.
    pub fn handle_stream_data(&mut self, now: Instant, data: &[u8]) {
        self.machine.handle_stream_data(now, data);
        self.update(now);
    }

    /// Over a byte stream: the connection ended.
    pub fn handle_stream_closed(&mut self, now: Instant) {
        self.machine.handle_stream_closed(now);
        self.update(now);
    }

    /// Over a byte stream: a connection could not be opened (or a write failed) for this
    /// reason; the first connection's failure is reported with it.
    pub fn handle_stream_failed(&mut self, now: Instant, reason: &str) {
        self.fail_first(now, DriverError::Unreachable(reason.to_string()));
        self.handle_stream_closed(now);
    }

    /// Advances timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.machine.handle_timeout(now);
        self.update(now);
    }

    /// When to call [`ClientDriver::handle_timeout`] next.
    #[must_use]
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        let linger = self.leaving.as_ref().map(|(_, t)| *t);
        [self.machine.poll_timeout(), linger].into_iter().flatten().min()
    }

    /// The first connection's outcome, once: the client id in force, or why it failed.
    #[must_use]
    pub fn poll_connected(&mut self) -> Option<Result<String, DriverError>> {
        match std::mem::replace(&mut self.first, First::Reported) {
            First::Ready(r) => Some(r),
            other => {
                self.first = other;
                None
            }
        }
    }

    /// A command that finished, with the caller's token.
    #[must_use]
    pub fn poll_completion(&mut self) -> Option<(T, Result<Outcome, DriverError>)> {
        self.done.pop_front()
    }

    /// The next message for the application, taken at once (not counted: for applications that
    /// take messages from the driver itself, such as an embedded mio client's loop).
    #[must_use]
    pub fn poll_message(&mut self) -> Option<Publish> {
        self.inbox.pop_front()
    }

    /// Messages waiting for the application (an adapter stops reading the network while this
    /// is at its limit, so a slow application slows the broker down instead of growing memory).
    pub fn pending_messages(&self) -> usize {
        self.inbox.len()
    }

    /// The connection state now.
    pub fn state(&self) -> &ConnectionState {
        &self.state
    }

    /// State changes, in order.
    #[must_use]
    pub fn poll_state_change(&mut self) -> Option<ConnectionState> {
        self.changes.pop_front()
    }

    /// Whether the driver is done: disconnected (or lost for good) with its transport closed,
    /// or the disconnect's linger is over. Waiting callers have been completed by then.
    pub fn is_done(&mut self, now: Instant) -> bool {
        let lingered = self.leaving.as_ref().is_some_and(|(_, t)| now >= *t);
        let finished = self.machine.is_done() || lingered;
        if finished {
            if !matches!(self.state, ConnectionState::Closed { .. }) {
                self.set_state(ConnectionState::Closed { reason: self.last_reason.clone() });
            }
            if matches!(self.first, First::Waiting) {
                self.first = First::Ready(Err(DriverError::Unreachable(self.last_reason.clone())));
            }
            let waiting = std::mem::take(&mut self.waiting);
            self.done.extend(waiting.into_values().map(|t| (t, Err(DriverError::Closed))));
            if let Some((tokens, _)) = &mut self.leaving {
                self.done.extend(tokens.drain(..).map(|t| (t, Ok(Outcome::Done))));
            }
        }
        finished
    }

    fn set_state(&mut self, state: ConnectionState) {
        if self.state != state {
            self.state = state.clone();
            self.changes.push_back(state);
        }
    }

    /// The first connection failed: report it and stop (no retries for a connection that never
    /// worked: the caller gets the error instead).
    fn fail_first(&mut self, now: Instant, error: DriverError) {
        if matches!(self.first, First::Waiting) {
            self.last_reason = error.to_string();
            self.first = First::Ready(Err(error));
            if self.leaving.is_none() {
                let _ = self.machine.disconnect(now, ReasonCode::Success);
                self.leaving = Some((Vec::new(), now + LINGER));
            }
            self.set_state(ConnectionState::Closed { reason: self.last_reason.clone() });
        }
    }

    /// Turns the machine's events into completions, messages and state.
    fn update(&mut self, now: Instant) {
        while let Some(event) = self.machine.poll_event() {
            match event {
                ClientEvent::Connected { session_present, client_id } => {
                    if matches!(self.first, First::Waiting) {
                        self.first = First::Ready(Ok(client_id));
                    }
                    if self.leaving.is_none() {
                        self.set_state(ConnectionState::Connected { session_present });
                    }
                }
                ClientEvent::Refused { reason } => {
                    self.fail_first(now, DriverError::Refused(reason));
                    if self.leaving.is_none() {
                        self.last_reason = format!("refused: {reason}");
                        self.set_state(ConnectionState::Reconnecting { reason: self.last_reason.clone() });
                    }
                }
                ClientEvent::Message(m) => self.inbox.push_back(m),
                ClientEvent::Published { id, reason } => {
                    if let Some(t) = self.waiting.remove(&id) {
                        let r = if reason.is_error() { Err(DriverError::Rejected(reason)) } else { Ok(Outcome::Done) };
                        self.done.push_back((t, r));
                    }
                }
                ClientEvent::Subscribed { id, reason_codes } | ClientEvent::Unsubscribed { id, reason_codes } => {
                    if let Some(t) = self.waiting.remove(&id) {
                        self.done.push_back((t, Ok(Outcome::Codes(reason_codes))));
                    }
                }
                ClientEvent::Aborted { id } => {
                    if let Some(t) = self.waiting.remove(&id) {
                        self.done.push_back((t, Err(DriverError::ConnectionLost)));
                    }
                }
                ClientEvent::Disconnected { reason } => {
                    let text = match (&reason, self.machine.last_close_reason()) {
                        (DisconnectReason::TransportLost, Some(close)) => close.to_string(),
                        (DisconnectReason::ConnectTimeout, _) if matches!(self.first, First::Waiting) => {
                            format!("{reason} (is an MQTT broker listening there?)")
                        }
                        _ => reason.to_string(),
                    };
                    self.last_reason = text.clone();
                    self.fail_first(now, DriverError::Unreachable(text.clone()));
                    if self.leaving.is_none() {
                        self.set_state(ConnectionState::Reconnecting { reason: text });
                    }
                }
                _ => {}
            }
        }
    }
}

crate::machine::forward_machine!(impl<T> for ClientDriver<T>);

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn the_backlog_stops_reading_at_its_limit_and_wakes_the_driver_when_room_comes_back() {
        let backlog = MessageBacklog::new(2);
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        backlog.handed();
        assert!(backlog.has_room());
        backlog.handed();
        assert!(!backlog.has_room());
        assert!(backlog.poll_room(&mut cx).is_pending());
        backlog.taken();
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "woken once there is room");
        assert!(backlog.poll_room(&mut cx).is_ready());
        // An application that dropped its receiver holds nothing up any more.
        backlog.handed();
        backlog.detach();
        backlog.handed();
        assert!(backlog.has_room());
        assert_eq!(backlog.unread(), 0);
    }

    #[test]
    fn suback_is_read_one_way() {
        assert_eq!(Outcome::Codes(vec![ReasonCode::GrantedQos2]).granted_qos().unwrap(), QoS::ExactlyOnce);
        assert_eq!(Outcome::Codes(vec![ReasonCode::Success]).granted_qos().unwrap(), QoS::AtMostOnce);
        assert!(matches!(
            Outcome::Codes(vec![ReasonCode::NotAuthorized]).granted_qos(),
            Err(ClientError::Rejected(ReasonCode::NotAuthorized))
        ));
        assert!(matches!(Outcome::Done.granted_qos(), Err(ClientError::Rejected(ReasonCode::UnspecifiedError))));
        assert_eq!(Outcome::Done.into_codes(), []);
    }
}
