//! The async client: a task owns the core's [`MqttClient`] machine and its socket; [`Client`]
//! is a cheap handle that sends it commands and awaits their acknowledgements.
//!
//! ```no_run
//! use adapter_tokio::client::{Client, ClientOptions};
//! use mqtt_proto::{Publish, QoS, TopicFilter, TopicName};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let client = Client::connect("quic://localhost", ClientOptions::new().client_id("demo")).await?;
//! let mut messages = client.messages().expect("taken once");
//! client.subscribe(TopicFilter::new("sensors/#")?, QoS::AtLeastOnce).await?;
//! client.publish(Publish::new(TopicName::new("sensors/t1")?, "21.5").with_qos(QoS::AtLeastOnce)).await?;
//! if let Some(message) = messages.recv().await {
//!     println!("{}: {:?}", message.topic, message.payload);
//! }
//! client.disconnect().await?;
//! # Ok(())
//! # }
//! ```

use crate::files::{self, FileError};
use crate::udp::Udp;
use crate::url::{BrokerUrl, Transport, UrlError};
use crate::{clock, NEVER};
use bytes::{Bytes, BytesMut};
use mqtt_proto::{Publish, QoS, ReasonCode, Subscription, TopicFilter};
use mqtt_quic_core::client::{MqttClient, MqttClientConfig, ReconnectPolicy, StreamCommand};
use mqtt_quic_core::config::{ClientConfig, ConfigError, TransportSettings};
use mqtt_quic_core::session::client::{ClientEvent, ClientSessionConfig, CommandError, DisconnectReason, RequestId};
use mqtt_quic_core::tls::ClientTls;
use mqtt_quic_core::Machine;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::debug;

/// How to connect.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The MQTT session: protocol version, client id, keep-alive, credentials, will...
    pub session: ClientSessionConfig,
    /// How to trust the broker (QUIC and `mqtts://`); `None` trusts the system's CAs.
    pub tls: Option<ClientTls>,
    /// The name the broker's certificate must carry, if not the URL's host.
    pub server_name: Option<String>,
    /// Reconnect after the connection is lost (with the core's jittered backoff); `None` ends
    /// the client instead. The first connection is never retried: its failure is `connect`'s
    /// error.
    pub reconnect: Option<ReconnectPolicy>,
    /// QUIC transport settings.
    pub transport: TransportSettings,
    /// Try 0-RTT when resuming over QUIC.
    pub zero_rtt: bool,
    /// Messages held for the application before the client stops reading from the network.
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
            message_buffer: 1024,
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
}

/// Where the connection stands. Observe it with [`Client::state`] and
/// [`Client::state_changes`].
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
    /// The connection was lost; a new one is being attempted after the backoff.
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

/// Why a client operation failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The broker URL is malformed.
    #[error(transparent)]
    Url(#[from] UrlError),
    /// The host name did not resolve.
    #[error("cannot resolve {host}: {reason}")]
    Resolve {
        /// The host.
        host: String,
        /// Why.
        reason: String,
    },
    /// Trust material could not be loaded.
    #[error(transparent)]
    Files(#[from] FileError),
    /// The settings are invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
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

enum Command {
    Publish(Publish, oneshot::Sender<Result<(), ClientError>>),
    Subscribe(Vec<Subscription>, oneshot::Sender<Result<Vec<ReasonCode>, ClientError>>),
    Unsubscribe(Vec<TopicFilter>, oneshot::Sender<Result<Vec<ReasonCode>, ClientError>>),
    Disconnect(oneshot::Sender<()>),
}

/// Incoming messages, in order. A [`futures_core::Stream`], or call [`Messages::recv`].
///
/// The client holds at most [`ClientOptions::message_buffer`] messages the application has not
/// taken; beyond that it stops reading from the network (back-pressure reaches the broker)
/// until the application catches up.
pub struct Messages {
    rx: mpsc::Receiver<Publish>,
}

impl Messages {
    /// The next message; `None` once the client is closed.
    pub async fn recv(&mut self) -> Option<Publish> {
        self.rx.recv().await
    }
}

impl futures_core::Stream for Messages {
    type Item = Publish;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Publish>> {
        self.rx.poll_recv(cx)
    }
}

/// A handle to a connected client. Clones share the connection; the connection ends with
/// [`Client::disconnect`] or when every handle is dropped.
#[derive(Clone)]
pub struct Client {
    commands: mpsc::UnboundedSender<Command>,
    state: watch::Receiver<ConnectionState>,
    messages: Arc<Mutex<Option<Messages>>>,
    client_id: String,
}

impl Client {
    /// Connects to `url` (`quic://`, `mqtt+quic://`, `mqtt://`, `tcp://`, `mqtts://`) and
    /// resolves once the broker accepts the connection (CONNACK).
    pub async fn connect(url: &str, options: ClientOptions) -> Result<Client, ClientError> {
        let url: BrokerUrl = url.parse()?;
        let addr = resolve(&url).await?;
        let seed = crate::random_seed();
        let needs_tls = url.transport != Transport::Tcp;
        let tls = match (&options.tls, needs_tls) {
            (_, false) => None,
            (Some(tls), true) => Some(tls.clone()),
            (None, true) => Some(files::client_tls_from_system()?),
        };
        let server_name = options.server_name.clone().unwrap_or_else(|| url.host.clone());
        let (machine, io) = match url.transport {
            Transport::Quic => {
                let mut quic = ClientConfig::new(tls.unwrap_or_else(ClientTls::insecure));
                quic.transport = options.transport.clone();
                quic.zero_rtt = options.zero_rtt;
                quic.seed = seed;
                let machine = MqttClient::new(MqttClientConfig {
                    quic,
                    session: options.session.clone(),
                    server: addr,
                    server_name,
                    reconnect: options.reconnect,
                })?;
                let local: SocketAddr = if addr.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
                let udp = Udp::bind(local).map_err(|e| unreachable(&url, e))?;
                (machine, Io::Quic { udp, buf: Vec::with_capacity(2048) })
            }
            Transport::Tcp | Transport::Tls => {
                let machine = MqttClient::over_stream(options.session.clone(), options.reconnect, seed)?;
                let tls = match tls {
                    Some(tls) => {
                        let config = tls.rustls_config(false).map_err(|e| unreachable(&url, e))?;
                        let name = rustls_pki_types::ServerName::try_from(server_name.clone())
                            .map_err(|e| unreachable(&url, e))?;
                        Some((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
                    }
                    None => None,
                };
                let connector = Connector { addr, tls, timeout: options.session.connect_timeout };
                (machine, Io::Stream { connector, conn: None, opening: None, buf: BytesMut::new() })
            }
        };
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let (state_tx, state) = watch::channel(ConnectionState::Connecting);
        let (msg_tx, msg_rx) = mpsc::channel(options.message_buffer.max(1));
        let (first_tx, first_rx) = oneshot::channel();
        let driver = Driver {
            machine,
            io,
            url: url.to_string(),
            commands: commands_rx,
            replies: HashMap::new(),
            inbox: VecDeque::new(),
            inbox_limit: options.message_buffer.max(1),
            messages: msg_tx,
            state: state_tx,
            first: Some(first_tx),
            leaving: None,
            last_reason: "connection lost".into(),
        };
        tokio::spawn(driver.run());
        let client_id = first_rx.await.map_err(|_| ClientError::Closed)??;
        Ok(Client { commands, state, messages: Arc::new(Mutex::new(Some(Messages { rx: msg_rx }))), client_id })
    }

    /// The client identifier in force (the broker's choice when none was given).
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// The current connection state.
    pub fn state(&self) -> ConnectionState {
        self.state.borrow().clone()
    }

    /// A receiver of connection state changes.
    pub fn state_changes(&self) -> watch::Receiver<ConnectionState> {
        self.state.clone()
    }

    /// The incoming messages, to pull. There is one such stream per connection: the first call
    /// takes it (as does [`Client::on_message`]); later calls return `None`.
    pub fn messages(&self) -> Option<Messages> {
        self.messages.lock().ok()?.take()
    }

    /// Calls `callback` with each incoming message, on a task of its own (push). Takes the
    /// message stream; returns false if it was already taken.
    pub fn on_message(&self, mut callback: impl FnMut(Publish) + Send + 'static) -> bool {
        let Some(mut messages) = self.messages() else { return false };
        tokio::spawn(async move {
            while let Some(m) = messages.recv().await {
                callback(m);
            }
        });
        true
    }

    /// Publishes and resolves when done: QoS 0 once written, QoS 1 on PUBACK, QoS 2 on PUBCOMP.
    /// QoS 1 and 2 messages published while the connection is down wait for the next one.
    pub async fn publish(&self, publish: Publish) -> Result<(), ClientError> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::Publish(publish, tx)).map_err(|_| ClientError::Closed)?;
        rx.await.map_err(|_| ClientError::Closed)?
    }

    /// Subscribes to one filter; resolves with the granted QoS on SUBACK.
    pub async fn subscribe(&self, filter: TopicFilter, qos: QoS) -> Result<QoS, ClientError> {
        let codes = self.subscribe_many(vec![Subscription::new(filter, qos)]).await?;
        match codes.first() {
            Some(c) if !c.is_error() => Ok(QoS::from_u8(c.as_u8()).unwrap_or(QoS::AtMostOnce)),
            Some(c) => Err(ClientError::Rejected(*c)),
            None => Err(ClientError::Rejected(ReasonCode::UnspecifiedError)),
        }
    }

    /// Subscribes to several filters at once; resolves with SUBACK's code for each.
    pub async fn subscribe_many(&self, subscriptions: Vec<Subscription>) -> Result<Vec<ReasonCode>, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::Subscribe(subscriptions, tx)).map_err(|_| ClientError::Closed)?;
        rx.await.map_err(|_| ClientError::Closed)?
    }

    /// Unsubscribes; resolves with UNSUBACK's codes (empty for MQTT 3.1.1).
    pub async fn unsubscribe(&self, filters: Vec<TopicFilter>) -> Result<Vec<ReasonCode>, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::Unsubscribe(filters, tx)).map_err(|_| ClientError::Closed)?;
        rx.await.map_err(|_| ClientError::Closed)?
    }

    /// Sends DISCONNECT (normal, so the broker discards the will), waits for the connection to
    /// close, and ends the client. Unacknowledged QoS 1 and 2 publishes are abandoned.
    pub async fn disconnect(&self) -> Result<(), ClientError> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::Disconnect(tx)).map_err(|_| ClientError::Closed)?;
        rx.await.map_err(|_| ClientError::Closed)
    }
}

/// The broker's address. IPv4 is preferred when a name has both kinds: brokers listen on
/// 0.0.0.0 by default, and `localhost` often resolves to `::1` first.
async fn resolve(url: &BrokerUrl) -> Result<SocketAddr, ClientError> {
    let addrs = tokio::net::lookup_host(url.authority())
        .await
        .map_err(|e| ClientError::Resolve { host: url.host.clone(), reason: e.to_string() })?;
    let mut addrs: Vec<SocketAddr> = addrs.collect();
    addrs.sort_by_key(|a| a.is_ipv6());
    addrs.first().copied().ok_or_else(|| ClientError::Resolve { host: url.host.clone(), reason: "no address".into() })
}

fn unreachable(url: &BrokerUrl, reason: impl std::fmt::Display) -> ClientError {
    ClientError::Unreachable { url: url.to_string(), reason: reason.to_string() }
}

/// A byte stream to the broker: TCP, or TLS over TCP.
trait ByteStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> ByteStream for T {}
type BoxStream = Box<dyn ByteStream>;
type Opening = Pin<Box<dyn Future<Output = io::Result<BoxStream>> + Send>>;

/// Opens byte-stream connections when the machine asks.
struct Connector {
    addr: SocketAddr,
    tls: Option<(tokio_rustls::TlsConnector, rustls_pki_types::ServerName<'static>)>,
    timeout: Duration,
}

impl Connector {
    fn open(&self) -> Opening {
        let (addr, tls, timeout) = (self.addr, self.tls.clone(), self.timeout);
        Box::pin(async move {
            let work = async {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let _ = tcp.set_nodelay(true);
                Ok::<BoxStream, io::Error>(match tls {
                    None => Box::new(tcp),
                    Some((connector, name)) => Box::new(connector.connect(name, tcp).await?),
                })
            };
            tokio::time::timeout(timeout, work)
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connection timed out"))?
        })
    }
}

enum Io {
    Quic {
        udp: Udp,
        buf: Vec<u8>,
    },
    Stream {
        connector: Connector,
        conn: Option<(ReadHalf<BoxStream>, WriteHalf<BoxStream>)>,
        opening: Option<Opening>,
        buf: BytesMut,
    },
}

enum Reply {
    Publish(oneshot::Sender<Result<(), ClientError>>),
    Codes(oneshot::Sender<Result<Vec<ReasonCode>, ClientError>>),
}

/// The task that owns the machine.
struct Driver {
    machine: MqttClient,
    io: Io,
    url: String,
    commands: mpsc::UnboundedReceiver<Command>,
    replies: HashMap<RequestId, Reply>,
    /// Messages not yet taken by the application.
    inbox: VecDeque<Publish>,
    inbox_limit: usize,
    messages: mpsc::Sender<Publish>,
    state: watch::Sender<ConnectionState>,
    /// Resolves `Client::connect`.
    first: Option<oneshot::Sender<Result<String, ClientError>>>,
    /// A disconnect in progress: whom to tell, and the latest moment to give up waiting.
    leaving: Option<(Vec<oneshot::Sender<()>>, tokio::time::Instant)>,
    /// Why the last connection ended.
    last_reason: String,
}

enum Input {
    Command(Option<Command>),
    Datagrams(io::Result<()>),
    Bytes(io::Result<usize>),
    Opened(io::Result<BoxStream>),
    Deliver(Option<mpsc::OwnedPermit<Publish>>),
    Timer,
}

impl Driver {
    async fn run(mut self) {
        if let Err(e) = self.machine.start(clock()) {
            self.fail_first(ClientError::Unreachable { url: self.url.clone(), reason: e.to_string() });
        }
        loop {
            self.flush().await;
            self.events();
            if self.finished() {
                break;
            }
            let deadline = self.machine.poll_timeout().map(tokio::time::Instant::from_std);
            let deadline = match &self.leaving {
                Some((_, l)) => Some(deadline.map_or(*l, |d| d.min(*l))),
                None => deadline,
            };
            let reading = self.inbox.len() < self.inbox_limit;
            let input = tokio::select! {
                c = self.commands.recv(), if self.leaving.is_none() => Input::Command(c),
                i = wait_io(&mut self.io, reading) => i,
                p = self.messages.clone().reserve_owned(), if !self.inbox.is_empty() => Input::Deliver(p.ok()),
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(|| tokio::time::Instant::now() + NEVER)) => Input::Timer,
            };
            let now = clock();
            match input {
                Input::Command(Some(c)) => self.command(c),
                // Every handle is gone: nobody can use the connection any more.
                Input::Command(None) => self.leave(None),
                Input::Datagrams(Ok(())) => {
                    if let Io::Quic { udp, .. } = &self.io {
                        for d in udp.datagrams() {
                            self.machine.handle_datagram(now, d.remote, d.local_ip, d.ecn, d.data);
                        }
                    }
                }
                Input::Datagrams(Err(e)) => {
                    debug!("UDP receive failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Input::Bytes(Ok(0)) | Input::Bytes(Err(_)) => {
                    if let Io::Stream { conn, .. } = &mut self.io {
                        *conn = None;
                    }
                    self.machine.stream_closed(now);
                }
                Input::Bytes(Ok(_)) => {
                    if let Io::Stream { buf, .. } = &mut self.io {
                        let data = buf.split();
                        self.machine.handle_stream_bytes(now, &data);
                    }
                }
                Input::Opened(Ok(stream)) => {
                    if let Io::Stream { conn, .. } = &mut self.io {
                        *conn = Some(tokio::io::split(stream));
                    }
                    self.machine.stream_opened(now);
                }
                Input::Opened(Err(e)) => {
                    self.fail_first(ClientError::Unreachable { url: self.url.clone(), reason: e.to_string() });
                    self.machine.stream_closed(now);
                }
                Input::Deliver(Some(permit)) => {
                    if let Some(m) = self.inbox.pop_front() {
                        permit.send(m);
                    }
                }
                // The application dropped its message stream: nobody wants them.
                Input::Deliver(None) => self.inbox.clear(),
                Input::Timer => self.machine.handle_timeout(now),
            }
        }
        if let Some((waiting, _)) = self.leaving.take() {
            for w in waiting {
                let _ = w.send(());
            }
        }
        for (_, reply) in self.replies.drain() {
            match reply {
                Reply::Publish(tx) => drop(tx.send(Err(ClientError::Closed))),
                Reply::Codes(tx) => drop(tx.send(Err(ClientError::Closed))),
            }
        }
    }

    /// Whether the task is done.
    fn finished(&mut self) -> bool {
        let idle = match &self.io {
            Io::Stream { conn, opening, .. } => conn.is_none() && opening.is_none(),
            Io::Quic { .. } => true,
        };
        let stopped = self.machine.is_stopped() && idle;
        if stopped && self.leaving.is_none() && self.first.is_none() {
            // Lost for good without a reconnect policy.
            self.state.send_replace(ConnectionState::Closed { reason: self.last_reason.clone() });
        }
        let timed_out = self.leaving.as_ref().is_some_and(|(_, l)| tokio::time::Instant::now() >= *l);
        stopped || timed_out
    }

    fn command(&mut self, command: Command) {
        let now = clock();
        match command {
            Command::Publish(p, tx) => match self.machine.publish(now, p) {
                Ok(id) => drop(self.replies.insert(id, Reply::Publish(tx))),
                Err(e) => drop(tx.send(Err(e.into()))),
            },
            Command::Subscribe(subs, tx) => match self.machine.subscribe(now, subs, None) {
                Ok(id) => drop(self.replies.insert(id, Reply::Codes(tx))),
                Err(e) => drop(tx.send(Err(e.into()))),
            },
            Command::Unsubscribe(filters, tx) => match self.machine.unsubscribe(now, filters) {
                Ok(id) => drop(self.replies.insert(id, Reply::Codes(tx))),
                Err(e) => drop(tx.send(Err(e.into()))),
            },
            Command::Disconnect(tx) => self.leave(Some(tx)),
        }
    }

    fn leave(&mut self, tx: Option<oneshot::Sender<()>>) {
        let _ = self.machine.disconnect(clock(), ReasonCode::Success);
        self.state.send_replace(ConnectionState::Closed { reason: "disconnected".into() });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        let (waiting, _) = self.leaving.get_or_insert_with(|| (Vec::new(), deadline));
        waiting.extend(tx);
    }

    fn fail_first(&mut self, error: ClientError) {
        if let Some(first) = self.first.take() {
            let _ = first.send(Err(error));
            // The caller gets an error instead of a client: stop here, no retries.
            let _ = self.machine.disconnect(clock(), ReasonCode::Success);
            self.leaving.get_or_insert_with(|| (Vec::new(), tokio::time::Instant::now() + Duration::from_secs(1)));
        }
    }

    /// Sends what the machine has for the network.
    async fn flush(&mut self) {
        match &mut self.io {
            Io::Quic { udp, buf } => {
                while let Some(t) = self.machine.poll_transmit_batch(clock(), udp.max_gso_segments(), buf) {
                    if let Err(e) = udp.send(&t, &buf[..t.size]).await {
                        debug!("UDP send to {} failed: {e}", t.destination);
                    }
                }
            }
            Io::Stream { connector, conn, opening, .. } => {
                while let Some(cmd) = self.machine.poll_stream() {
                    match cmd {
                        StreamCommand::Open => *opening = Some(connector.open()),
                        StreamCommand::Write(bytes) => {
                            let failed = match conn {
                                Some((_, w)) => w.write_all(&bytes).await.is_err(),
                                None => false,
                            };
                            if failed {
                                *conn = None;
                                self.machine.stream_closed(clock());
                            }
                        }
                        StreamCommand::Close => {
                            if let Some((_, mut w)) = conn.take() {
                                let _ = w.shutdown().await;
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    /// Acts on the machine's events.
    fn events(&mut self) {
        while let Some(event) = self.machine.poll_event() {
            match event {
                ClientEvent::Connected { session_present, client_id } => {
                    if let Some(first) = self.first.take() {
                        let _ = first.send(Ok(client_id));
                    }
                    if self.leaving.is_none() {
                        self.state.send_replace(ConnectionState::Connected { session_present });
                    }
                }
                ClientEvent::Refused { reason } => {
                    self.fail_first(ClientError::Refused(reason));
                    if self.leaving.is_none() {
                        self.state.send_replace(ConnectionState::Reconnecting { reason: format!("refused: {reason}") });
                    }
                }
                ClientEvent::Message(m) => self.inbox.push_back(m),
                ClientEvent::Published { id, reason } => {
                    if let Some(Reply::Publish(tx)) = self.replies.remove(&id) {
                        let _ = tx.send(if reason.is_error() { Err(ClientError::Rejected(reason)) } else { Ok(()) });
                    }
                }
                ClientEvent::Subscribed { id, reason_codes } | ClientEvent::Unsubscribed { id, reason_codes } => {
                    if let Some(Reply::Codes(tx)) = self.replies.remove(&id) {
                        let _ = tx.send(Ok(reason_codes));
                    }
                }
                ClientEvent::Aborted { id } => match self.replies.remove(&id) {
                    Some(Reply::Publish(tx)) => drop(tx.send(Err(ClientError::ConnectionLost))),
                    Some(Reply::Codes(tx)) => drop(tx.send(Err(ClientError::ConnectionLost))),
                    None => {}
                },
                ClientEvent::Disconnected { reason } => {
                    let text = match (&reason, self.machine.last_close_reason()) {
                        (DisconnectReason::TransportLost, Some(close)) => close.to_string(),
                        (DisconnectReason::ConnectTimeout, _) if self.first.is_some() => {
                            format!("{reason} (is an MQTT broker listening there?)")
                        }
                        _ => reason.to_string(),
                    };
                    self.last_reason = text.clone();
                    self.fail_first(ClientError::Unreachable { url: self.url.clone(), reason: text.clone() });
                    if self.leaving.is_none() {
                        self.state.send_replace(ConnectionState::Reconnecting { reason: text });
                    }
                }
                _ => {}
            }
        }
    }
}

/// Waits for input on the connection: a batch of datagrams, stream bytes (while `reading`),
/// or the outcome of opening a stream.
async fn wait_io(io: &mut Io, reading: bool) -> Input {
    match io {
        Io::Quic { udp, .. } if reading => Input::Datagrams(udp.recv().await),
        Io::Stream { opening: opening @ Some(_), .. } => {
            let result = match opening {
                Some(f) => f.await,
                None => unreachable!("matched Some"),
            };
            *opening = None;
            Input::Opened(result)
        }
        Io::Stream { conn: Some((r, _)), buf, .. } if reading => {
            buf.reserve(16 * 1024);
            Input::Bytes(r.read_buf(buf).await)
        }
        _ => std::future::pending().await,
    }
}
