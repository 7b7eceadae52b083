//! A client that lives in your `mio::Poll` loop ([`MioClient`]), or on a thread of its own
//! ([`Client`], with the same methods as the tokio and async-std clients, blocking).

use crate::conn::{Conn, ReadOutcome};
use crate::udp::Udp;
use crate::{now, os_secret};
use mio::event::Event;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use mqtt_proto::{Publish, Subscription, TopicFilter};
use mqtt_quic_core::client::StreamCommand;
pub use mqtt_quic_core::client::StreamHandle;
use mqtt_quic_core::driver::{local_bind_address, pick_address, ClientDriver, DriverError, MessageBacklog, Outcome};
pub use mqtt_quic_core::driver::{ClientError, ClientOptions, ConnectionState};
use mqtt_quic_core::Datagram;
use mqtt_store::ClientStore;

pub use crate::threaded::{Client, ClientStream, Messages, StateChanges};
use mqtt_quic_core::url::{BrokerUrl, Transport};
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

/// Identifies a command in [`MioClient::poll_completion`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestToken(pub u64);

enum Io {
    Quic(Udp),
    Stream { addr: SocketAddr, conn: Option<Conn>, connecting: bool },
}

/// An MQTT client (QUIC or TCP) registered with a caller's `Registry` under one token.
pub struct MioClient {
    url: String,
    driver: ClientDriver<RequestToken>,
    io: Io,
    token: Token,
    next: u64,
    read_buf: Box<[u8]>,
    buf: Vec<u8>,
    /// Input was left unread because the application is behind on its messages (see
    /// [`MioClient::poll_message`]): read it once there is room.
    paused: bool,
    /// The client store ([`ClientOptions::store`]), committing inline.
    store: Option<ClientStore>,
}

impl MioClient {
    /// Starts connecting to `url` (`quic://` or `mqtt://`; the name is resolved here, blocking)
    /// with its socket registered under `token`. The outcome comes from
    /// [`MioClient::poll_connected`] once you drive the loop. QUIC needs `options.tls`.
    ///
    /// With [`ClientOptions::store`], the store is opened and read here, before the first
    /// connection (what the last run left unacknowledged goes out again on it), and every
    /// change is committed durably, on the caller's thread, before the output it came with is
    /// sent: one sync (a few milliseconds on most disks) per turn of the loop that changed
    /// something, and nothing is lost if the process dies after it. The store is closed when
    /// the client is done ([`MioClient::is_done`]) or dropped.
    pub fn connect(
        url: &str,
        options: ClientOptions,
        registry: &Registry,
        token: Token,
    ) -> Result<MioClient, ClientError> {
        let url: BrokerUrl = url.parse()?;
        let addr = pick_address(&url, url.authority().to_socket_addrs())?;
        let machine = options.machine(&url, addr, os_secret())?;
        if url.transport == Transport::Tls {
            // Refused before the store is opened.
            return Err(ClientError::Unsupported("mqtts:// (this adapter has no TLS over TCP)"));
        }
        let mut driver = ClientDriver::new(machine).with_message_buffer(options.message_buffer);
        let store = match &options.store {
            Some(dir) => Some(ClientStore::open(dir, &mut driver, now())?),
            None => None,
        };
        if let Some(store) = &store {
            log::debug!("{}", store.summary());
        }
        let io = match url.transport {
            Transport::Quic => {
                let local = local_bind_address(addr);
                let mut udp = Udp::bind(local)?;
                registry.register(&mut udp.socket, token, Interest::READABLE | Interest::WRITABLE)?;
                Io::Quic(udp)
            }
            Transport::Tcp => Io::Stream { addr, conn: None, connecting: false },
            Transport::Tls => return Err(ClientError::Unsupported("mqtts:// (this adapter has no TLS over TCP)")),
        };
        let mut client = MioClient {
            url: url.to_string(),
            driver,
            io,
            token,
            next: 0,
            read_buf: vec![0; 64 * 1024].into_boxed_slice(),
            buf: Vec::with_capacity(2048),
            paused: false,
            store,
        };
        client.driver.start(now());
        client.flush(registry);
        Ok(client)
    }

    /// Feeds a readiness event; false if it is not this client's (another of your sockets).
    ///
    /// While [`ClientOptions::message_buffer`] messages wait for [`MioClient::poll_message`]
    /// the client leaves input unread (the core's back-pressure rule: a slow application slows
    /// the broker down instead of growing memory); it reads it in
    /// [`MioClient::handle_timeout`] once they are taken, and [`MioClient::timeout`] is zero
    /// then.
    pub fn handle_event(&mut self, registry: &Registry, event: &Event) -> bool {
        if event.token() != self.token {
            return false;
        }
        let t = now();
        let reading = self.driver.is_reading();
        if event.is_readable() && !reading {
            self.paused = true;
        }
        match &mut self.io {
            Io::Quic(udp) => {
                if event.is_writable() {
                    udp.retry();
                }
                if event.is_readable() && reading {
                    self.read(registry);
                }
            }
            Io::Stream { conn, connecting, .. } => {
                if *connecting && (event.is_writable() || event.is_error() || event.is_write_closed()) {
                    *connecting = false;
                    match conn.as_ref().map(|c| (c.stream.take_error(), c.stream.peer_addr())) {
                        Some((Ok(None), Ok(_))) => self.driver.handle_stream_open(t),
                        Some((Ok(Some(e)) | Err(e), _)) | Some((_, Err(e))) => {
                            if let Some(mut c) = conn.take() {
                                let _ = registry.deregister(&mut c.stream);
                            }
                            self.driver.handle_stream_failed(t, &e.to_string());
                        }
                        None => {}
                    }
                }
                if let Some(c) = conn.as_mut() {
                    if event.is_writable() && c.flush().is_none() {
                        self.drop_stream(registry);
                    }
                }
                if event.is_readable() && reading {
                    self.read(registry);
                }
            }
        }
        self.flush(registry);
        true
    }

    /// Reads everything the socket has.
    fn read(&mut self, registry: &Registry) {
        let t = now();
        let driver = &mut self.driver;
        match &mut self.io {
            Io::Quic(udp) => udp.recv_all(|from, data| driver.handle_datagram(t, Datagram::new(from, data))),
            Io::Stream { conn: Some(c), .. } => {
                if let ReadOutcome::Closed = c.read_all(&mut self.read_buf, |data| driver.handle_stream_data(t, data)) {
                    self.drop_stream(registry);
                }
            }
            Io::Stream { .. } => {}
        }
    }

    fn drop_stream(&mut self, registry: &Registry) {
        if let Io::Stream { conn, connecting, .. } = &mut self.io {
            *connecting = false;
            if let Some(mut c) = conn.take() {
                let _ = registry.deregister(&mut c.stream);
                self.driver.handle_stream_closed(now());
            }
        }
    }

    /// How long `Poll::poll` may sleep before [`MioClient::handle_timeout`] is due (zero when
    /// input left unread for a slow application can be read now).
    pub fn timeout(&mut self) -> Option<Duration> {
        if self.paused && self.driver.is_reading() {
            return Some(Duration::ZERO);
        }
        self.driver.poll_timeout().map(|t| t.saturating_duration_since(now()))
    }

    /// Fires due timers (calling it early does nothing), reads input left unread while the
    /// application was behind if it has caught up, and sends what they produced.
    pub fn handle_timeout(&mut self, registry: &Registry) {
        if self.paused && self.driver.is_reading() {
            self.paused = false;
            self.read(registry);
        }
        self.driver.handle_timeout(now());
        self.flush(registry);
    }

    /// Whether input waits unread for the application to take its messages.
    pub(crate) fn is_paused(&self) -> bool {
        self.paused && !self.driver.is_reading()
    }

    /// The back-pressure counter shared with a message receiver (see [`MessageBacklog`]).
    pub(crate) fn backlog(&self) -> &MessageBacklog {
        self.driver.backlog()
    }

    /// The next message, counted as handed to a receiver (see [`ClientDriver::hand_message`]).
    pub(crate) fn hand_message(&mut self) -> Option<Publish> {
        self.driver.hand_message()
    }

    /// Whether commands are still taken (no disconnect has begun).
    pub fn is_accepting(&self) -> bool {
        self.driver.is_accepting()
    }

    /// Commits the store's changes (which releases the output that waited for them), then
    /// sends what the machine has for the network, and opens or closes the TCP connection when
    /// it asks.
    fn flush(&mut self, registry: &Registry) {
        if let Some(store) = &mut self.store {
            store.submit(&mut self.driver, now());
        }
        match &mut self.io {
            Io::Quic(udp) => {
                if udp.is_stalled() && !udp.retry() {
                    return;
                }
                while let Some(t) = self.driver.poll_transmit(now(), &mut self.buf) {
                    if !udp.send(&t, &self.buf) {
                        break;
                    }
                }
            }
            Io::Stream { .. } => {
                while let Some(cmd) = self.driver.poll_stream() {
                    let Io::Stream { addr, conn, connecting } = &mut self.io else { return };
                    match cmd {
                        StreamCommand::Open => match TcpStream::connect(*addr) {
                            Ok(mut stream) => {
                                match registry.register(
                                    &mut stream,
                                    self.token,
                                    Interest::READABLE | Interest::WRITABLE,
                                ) {
                                    Ok(()) => {
                                        *conn = Some(Conn::new(stream));
                                        *connecting = true;
                                    }
                                    Err(e) => self.driver.handle_stream_failed(now(), &e.to_string()),
                                }
                            }
                            Err(e) => self.driver.handle_stream_failed(now(), &e.to_string()),
                        },
                        StreamCommand::Data(bytes) if conn.as_mut().is_some_and(|c| c.write(&bytes).is_none()) => {
                            self.drop_stream(registry);
                        }
                        StreamCommand::Close => {
                            if let Some(c) = conn.as_mut() {
                                c.closing = true;
                                let _ = c.flush();
                                if c.is_drained() {
                                    if let Some(mut c) = conn.take() {
                                        let _ = registry.deregister(&mut c.stream);
                                    }
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    fn token(&mut self) -> RequestToken {
        self.next += 1;
        RequestToken(self.next)
    }

    /// Publishes; completes in [`MioClient::poll_completion`] when acknowledged.
    pub fn publish(&mut self, registry: &Registry, publish: Publish) -> RequestToken {
        let token = self.token();
        self.driver.publish(now(), publish, token);
        self.flush(registry);
        token
    }

    /// Subscribes; completes with SUBACK's codes.
    pub fn subscribe(&mut self, registry: &Registry, subscriptions: Vec<Subscription>) -> RequestToken {
        let token = self.token();
        self.driver.subscribe(now(), subscriptions, token);
        self.flush(registry);
        token
    }

    /// Unsubscribes; completes with UNSUBACK's codes.
    pub fn unsubscribe(&mut self, registry: &Registry, filters: Vec<TopicFilter>) -> RequestToken {
        let token = self.token();
        self.driver.unsubscribe(now(), filters, token);
        self.flush(registry);
        token
    }

    /// Opens a data stream (EMQX's multi-stream mode) with send `priority`: what is published,
    /// subscribed or unsubscribed through its handle ([`MioClient::publish_on`] and siblings)
    /// travels on its own QUIC stream, so it is not held up behind the other streams' traffic,
    /// and the higher priority's bytes go first. Its QUIC stream opens once connected, and
    /// again after each reconnect, making its subscriptions again (see "Data streams" in
    /// [`mqtt_quic_core::client`]). Over `mqtt://` there is one stream: the handle's traffic
    /// goes on it. Messages arrive in [`MioClient::poll_message`] with the others.
    pub fn open_stream(&mut self, registry: &Registry, priority: i32) -> Result<StreamHandle, ClientError> {
        let r = self.driver.open_stream(now(), priority);
        self.flush(registry);
        r.map_err(|e| self.error(e))
    }

    /// Publishes on a data stream; completes as [`MioClient::publish`] does (a QoS 2 message
    /// in flight when the connection drops fails with [`DriverError::ConnectionLost`]).
    pub fn publish_on(&mut self, registry: &Registry, stream: StreamHandle, publish: Publish) -> RequestToken {
        let token = self.token();
        self.driver.publish_on(now(), stream, publish, token);
        self.flush(registry);
        token
    }

    /// Subscribes on a data stream (the messages are delivered on it); completes with
    /// SUBACK's codes.
    pub fn subscribe_on(
        &mut self,
        registry: &Registry,
        stream: StreamHandle,
        subscriptions: Vec<Subscription>,
    ) -> RequestToken {
        let token = self.token();
        self.driver.subscribe_on(now(), stream, subscriptions, token);
        self.flush(registry);
        token
    }

    /// Unsubscribes on a data stream; completes with UNSUBACK's codes.
    pub fn unsubscribe_on(
        &mut self,
        registry: &Registry,
        stream: StreamHandle,
        filters: Vec<TopicFilter>,
    ) -> RequestToken {
        let token = self.token();
        self.driver.unsubscribe_on(now(), stream, filters, token);
        self.flush(registry);
        token
    }

    /// Closes a data stream: the broker drops its subscriptions, and what is still pending on
    /// it completes with [`DriverError::ConnectionLost`].
    pub fn close_stream(&mut self, registry: &Registry, stream: StreamHandle) -> Result<(), ClientError> {
        let r = self.driver.close_stream(now(), stream);
        self.flush(registry);
        r.map_err(|e| self.error(e))
    }

    /// Disconnects (DISCONNECT, then the connection closes); the token completes when done.
    pub fn disconnect(&mut self, registry: &Registry) -> RequestToken {
        let token = self.token();
        self.driver.disconnect(now(), Some(token));
        self.flush(registry);
        token
    }

    /// The first connection's outcome, once: the client id in force, or why it failed.
    pub fn poll_connected(&mut self) -> Option<Result<String, DriverError>> {
        self.driver.poll_connected()
    }

    /// A finished command.
    pub fn poll_completion(&mut self) -> Option<(RequestToken, Result<Outcome, DriverError>)> {
        self.driver.poll_completion()
    }

    /// The next incoming message.
    pub fn poll_message(&mut self) -> Option<Publish> {
        self.driver.poll_message()
    }

    /// A driver error as the client error it is for this client's broker.
    pub fn error(&self, e: DriverError) -> ClientError {
        ClientError::from_driver(e, &self.url)
    }

    /// The connection state.
    pub fn state(&self) -> &ConnectionState {
        self.driver.state()
    }

    /// The connection's state changes, in order.
    pub fn poll_state_change(&mut self) -> Option<ConnectionState> {
        self.driver.poll_state_change()
    }

    /// Whether the client is done (see [`ClientDriver::is_done`]); deregisters its socket
    /// when it is.
    pub fn is_done(&mut self, registry: &Registry) -> bool {
        let done = self.driver.is_done(now());
        if done {
            if let Some(store) = self.store.take() {
                // The last commit; what is unfinished stays for the next run.
                if let Err(e) = store.close(&mut self.driver, now()) {
                    log::warn!("{e}");
                }
            }
            match &mut self.io {
                Io::Quic(udp) => drop(registry.deregister(&mut udp.socket)),
                Io::Stream { conn, .. } => {
                    if let Some(mut c) = conn.take() {
                        let _ = registry.deregister(&mut c.stream);
                    }
                }
            }
        }
        done
    }
}
