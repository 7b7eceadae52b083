//! A client that lives in your `mio::Poll` loop ([`MioClient`]), or on a thread of its own
//! ([`Client`], with the same methods as the tokio and async-std clients, blocking).

use crate::conn::{Conn, ReadOutcome, Stream};
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
use mqtt_quic_core::url::BrokerUrl;
use std::io::{Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

/// Identifies a command in [`MioClient::poll_completion`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestToken(pub u64);

/// The client's sockets, registered under its token: a UDP socket for QUIC (bound on first
/// use, for the family of the broker's address) and a TCP stream, either or both in use while
/// falling back or moving back between brokers.
struct Io {
    udp: Option<Udp>,
    conn: Option<Conn>,
    /// The TCP connection is being opened.
    connecting: bool,
    /// The application's connector (see [`MioClient::connect_with`]), if it gave one.
    own: Option<OwnConnector>,
}

/// A blocking connection the application opens for the mio clients
/// ([`MioClient::connect_with`]): read on one thread while written on another, and shut down
/// to end it (which also ends a read blocked on it). Implemented for TCP and Unix sockets;
/// implement it for a connection of your own (a serial line, a tunnel).
pub trait OwnConnection: Read + Write + Send + Sync + 'static {
    /// Another handle on the same connection.
    fn try_clone(&self) -> std::io::Result<Self>
    where
        Self: Sized;
    /// Ends the connection both ways.
    fn shutdown(&self) -> std::io::Result<()>;
}

impl OwnConnection for std::net::TcpStream {
    fn try_clone(&self) -> std::io::Result<Self> {
        std::net::TcpStream::try_clone(self)
    }
    fn shutdown(&self) -> std::io::Result<()> {
        std::net::TcpStream::shutdown(self, std::net::Shutdown::Both)
    }
}

impl OwnConnection for std::os::unix::net::UnixStream {
    fn try_clone(&self) -> std::io::Result<Self> {
        std::os::unix::net::UnixStream::try_clone(self)
    }
    fn shutdown(&self) -> std::io::Result<()> {
        std::os::unix::net::UnixStream::shutdown(self, std::net::Shutdown::Both)
    }
}

/// One opened connection of the application's: a reader, a writer, and its shutdown.
struct Piped {
    reader: Box<dyn Read + Send>,
    writer: Box<dyn Write + Send>,
    shutdown: Arc<Box<dyn Fn() + Send + Sync>>,
}

/// The application's connector.
type OwnConnector = Box<dyn Fn() -> std::io::Result<Piped> + Send>;

/// Opens the application's connection and joins it to one end of a socket pair, which the
/// loop polls like a TCP stream: one thread copies what the connection reads into the pair,
/// another what the loop writes into the connection (flushing each piece, so a buffered
/// writer holds nothing back). Whichever side ends first shuts the connection down, so the
/// other thread ends too (a read blocked on the connection returns).
fn open_piped(connect: &OwnConnector) -> std::io::Result<Stream> {
    let Piped { mut reader, mut writer, shutdown } = connect()?;
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    let mut into_pair = theirs.try_clone()?;
    let mut from_pair = theirs;
    let shutdown_in = shutdown.clone();
    let spawned = std::thread::Builder::new().name("mqtt-conn-in".into()).spawn(move || {
        let _ = std::io::copy(&mut reader, &mut into_pair);
        // The loop sees the end of the stream; the writing thread's read of the pair ends
        // once the loop drops its end.
        let _ = into_pair.shutdown(std::net::Shutdown::Write);
        shutdown_in();
    });
    if let Err(e) = spawned {
        shutdown();
        return Err(e);
    }
    let shutdown_out = shutdown.clone();
    let spawned = std::thread::Builder::new().name("mqtt-conn-out".into()).spawn(move || {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match from_pair.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if writer.write_all(&buf[..n]).and_then(|()| writer.flush()).is_err() {
                        break;
                    }
                }
            }
        }
        // The loop closed its end (or the connection failed): end the connection, which
        // also ends the reading thread.
        shutdown_out();
    });
    if let Err(e) = spawned {
        // The reading thread ends with the connection.
        shutdown();
        return Err(e);
    }
    ours.set_nonblocking(true)?;
    Ok(Stream::Piped(mio::net::UnixStream::from_std(ours)))
}

impl Io {
    /// The UDP socket for datagrams to `to`, bound and registered now if there is none of
    /// its family.
    fn udp_for(&mut self, registry: &Registry, token: Token, to: SocketAddr) -> std::io::Result<&mut Udp> {
        let fits =
            self.udp.as_ref().and_then(|u| u.socket.local_addr().ok()).is_some_and(|a| a.is_ipv4() == to.is_ipv4());
        if !fits {
            if let Some(mut old) = self.udp.take() {
                let _ = registry.deregister(&mut old.socket);
            }
            let mut udp = Udp::bind(local_bind_address(to))?;
            registry.register(&mut udp.socket, token, Interest::READABLE | Interest::WRITABLE)?;
            self.udp = Some(udp);
        }
        self.udp.as_mut().ok_or_else(|| std::io::Error::other("no UDP socket"))
    }
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
        MioClient::connect_urls([url], options, registry, token)
    }

    /// Starts connecting to the first of several brokers that answers, in order (`quic://`
    /// first, then `mqtt://` for networks that block UDP), keeping one MQTT session across
    /// them, and moving back to the first once it answers again (see
    /// [`mqtt_quic_core::fallback`]). Names are resolved on each attempt, blocking the loop
    /// while they are.
    pub fn connect_urls<S: AsRef<str>>(
        urls: impl IntoIterator<Item = S>,
        options: ClientOptions,
        registry: &Registry,
        token: Token,
    ) -> Result<MioClient, ClientError> {
        let urls = urls.into_iter().map(|u| u.as_ref().parse()).collect::<Result<Vec<BrokerUrl>, _>>()?;
        if urls.iter().any(|u| u.transport.is_tls()) {
            // Refused before the store is opened.
            return Err(ClientError::Unsupported("mqtts:// and wss:// (this adapter has no TLS over TCP)"));
        }
        let machine = options.machine(&urls, os_secret())?;
        let shown = urls.iter().map(|u| u.to_string()).collect::<Vec<_>>().join(", ");
        MioClient::start(machine, None, options, shown, registry, token)
    }

    /// Starts connecting over a connection the application opens itself: `connect` is called
    /// (on the loop's thread, blocking it while it runs) for the first connection and again on
    /// each reconnect, and gives a blocking [`OwnConnection`] (a Unix socket, a TCP stream of
    /// its own making, a serial line). Two threads of the client's own move bytes between it
    /// and one end of a socket pair that the loop polls; when either side ends, the connection
    /// is shut down, which ends both threads. `name` is how errors name the broker.
    ///
    /// ```no_run
    /// use adapter_mio::client::MioClient;
    /// use mqtt_quic_core::driver::ClientOptions;
    /// use std::os::unix::net::UnixStream;
    /// let poll = mio::Poll::new()?;
    /// let connect = || UnixStream::connect("/run/mqtt.sock");
    /// let client = MioClient::connect_with("unix:/run/mqtt.sock", ClientOptions::new(), poll.registry(), mio::Token(0), connect)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn connect_with<F, C>(
        name: &str,
        options: ClientOptions,
        registry: &Registry,
        token: Token,
        connect: F,
    ) -> Result<MioClient, ClientError>
    where
        F: Fn() -> std::io::Result<C> + Send + 'static,
        C: OwnConnection,
    {
        let machine = options.stream_machine(os_secret())?;
        let own: OwnConnector = Box::new(move || {
            let conn = connect()?;
            let reader = conn.try_clone()?;
            let closer = conn.try_clone()?;
            let shutdown: Box<dyn Fn() + Send + Sync> = Box::new(move || drop(closer.shutdown()));
            Ok(Piped { reader: Box::new(reader), writer: Box::new(conn), shutdown: Arc::new(shutdown) })
        });
        MioClient::start(machine, Some(own), options, name.to_string(), registry, token)
    }

    fn start(
        machine: mqtt_quic_core::client::ClientMachine,
        own: Option<OwnConnector>,
        options: ClientOptions,
        shown: String,
        registry: &Registry,
        token: Token,
    ) -> Result<MioClient, ClientError> {
        let mut driver = ClientDriver::new(machine)
            .with_message_buffer(options.message_buffer)
            .retry_first_connection(options.retry_first_connection);
        let store = match &options.store {
            Some(dir) => Some(ClientStore::open(dir, &mut driver, now())?),
            None => None,
        };
        if let Some(store) = &store {
            log::debug!("{}", store.summary());
        }
        let io = Io { udp: None, conn: None, connecting: false, own };
        let mut client = MioClient {
            url: shown,
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
        // (The UDP socket and the TCP stream share the token: the event may be either's.)
        if let (Some(udp), true) = (&mut self.io.udp, event.is_writable()) {
            udp.retry();
        }
        let io = &mut self.io;
        if io.connecting && (event.is_writable() || event.is_error() || event.is_write_closed()) {
            match io.conn.as_ref().map(|c| (c.stream.take_error(), c.stream.connected())) {
                Some((Ok(None), Ok(_))) => {
                    io.connecting = false;
                    self.driver.handle_stream_open(t);
                }
                // Not yet: the event was the UDP socket's.
                Some((Ok(None), Err(e))) if e.kind() == std::io::ErrorKind::NotConnected && !event.is_error() => {}
                Some((Ok(Some(e)) | Err(e), _)) | Some((_, Err(e))) => {
                    io.connecting = false;
                    if let Some(mut c) = io.conn.take() {
                        let _ = registry.deregister(&mut c.stream);
                    }
                    self.driver.handle_stream_failed(t, &e.to_string());
                }
                None => io.connecting = false,
            }
        }
        if let Some(c) = self.io.conn.as_mut() {
            if !self.io.connecting && event.is_writable() && c.flush().is_none() {
                self.drop_stream(registry);
            }
        }
        if event.is_readable() && reading {
            self.read(registry);
        }
        self.flush(registry);
        true
    }

    /// Reads everything the socket has.
    fn read(&mut self, registry: &Registry) {
        let t = now();
        let driver = &mut self.driver;
        if let Some(udp) = &mut self.io.udp {
            udp.recv_all(|from, data| driver.handle_datagram(t, Datagram::new(from, data)));
        }
        if let (Some(c), false) = (&mut self.io.conn, self.io.connecting) {
            if let ReadOutcome::Closed = c.read_all(&mut self.read_buf, |data| driver.handle_stream_data(t, data)) {
                self.drop_stream(registry);
            }
        }
    }

    fn drop_stream(&mut self, registry: &Registry) {
        self.io.connecting = false;
        if let Some(mut c) = self.io.conn.take() {
            let _ = registry.deregister(&mut c.stream);
            self.driver.handle_stream_closed(now());
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
        // Answering a command (a resolved name) can make datagrams to send, and sending can
        // make commands: until neither has anything.
        while self.flush_once(registry) {}
    }

    /// One pass of [`MioClient::flush`]; whether a stream command was carried out.
    fn flush_once(&mut self, registry: &Registry) -> bool {
        let mut commands = false;
        loop {
            if self.io.udp.as_mut().is_some_and(|u| u.is_stalled() && !u.retry()) {
                break;
            }
            let Some(t) = self.driver.poll_transmit(now(), &mut self.buf) else { break };
            match self.io.udp_for(registry, self.token, t.destination) {
                Ok(udp) => {
                    if !udp.send(&t, &self.buf) {
                        break;
                    }
                }
                Err(e) => log::debug!("UDP socket for {}: {e}", t.destination),
            }
        }
        while let Some(cmd) = self.driver.poll_stream() {
            commands = true;
            let io = &mut self.io;
            match cmd {
                StreamCommand::Open(url) => {
                    let opened = match (&io.own, url.map(|u| pick_address(&u, u.authority().to_socket_addrs()))) {
                        (Some(connect), _) => open_piped(connect).map_err(|e| e.to_string()),
                        (None, Some(Ok(addr))) => TcpStream::connect(addr).map(Stream::Tcp).map_err(|e| e.to_string()),
                        (None, Some(Err(e))) => Err(e.to_string()),
                        (None, None) => Err("no broker URL".into()),
                    };
                    let registered = opened.and_then(|mut stream| {
                        registry
                            .register(&mut stream, self.token, Interest::READABLE | Interest::WRITABLE)
                            .map(|()| stream)
                            .map_err(|e| e.to_string())
                    });
                    match registered {
                        Ok(stream) => {
                            if let Stream::Tcp(tcp) = &stream {
                                let _ = tcp.set_nodelay(true);
                            }
                            io.conn = Some(Conn::over(stream));
                            io.connecting = true;
                        }
                        Err(e) => self.driver.handle_stream_failed(now(), &e),
                    }
                }
                StreamCommand::Resolve(url) => {
                    let r = pick_address(&url, url.authority().to_socket_addrs()).map_err(|e| e.to_string());
                    self.driver.handle_resolved(now(), &url, r);
                }
                StreamCommand::Data(bytes) if io.conn.as_mut().is_some_and(|c| c.write(&bytes).is_none()) => {
                    self.drop_stream(registry);
                }
                StreamCommand::Close => {
                    io.connecting = false;
                    if let Some(c) = io.conn.as_mut() {
                        c.closing = true;
                        let _ = c.flush();
                        if c.is_drained() {
                            if let Some(mut c) = io.conn.take() {
                                let _ = registry.deregister(&mut c.stream);
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        commands
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
            if let Some(mut udp) = self.io.udp.take() {
                let _ = registry.deregister(&mut udp.socket);
            }
            if let Some(mut c) = self.io.conn.take() {
                let _ = registry.deregister(&mut c.stream);
            }
        }
        done
    }
}
