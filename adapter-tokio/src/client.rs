//! The async client: a task owns the core's [`ClientMachine`] machine and its socket; [`Client`]
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

use crate::files;
use crate::udp::Udp;
use crate::url::{BrokerUrl, Transport};
use crate::{clock, NEVER};
use bytes::BytesMut;
use mqtt_proto::{Publish, QoS, ReasonCode, Subscription, TopicFilter};
use mqtt_quic_core::client::{ClientMachine, StreamCommand, StreamHandle};
use mqtt_quic_core::driver::{
    local_bind_address, pick_address, tls_server_name, ClientDriver, MessageBacklog, Outcome,
};
pub use mqtt_quic_core::driver::{ClientError, ClientOptions, ConnectionState};
use mqtt_store::{ClientStore, StoreError};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::debug;

type Command = mqtt_quic_core::driver::Command<Reply>;

/// Most commands taken in one turn of the driver before it writes.
const COMMAND_BATCH: usize = 256;

/// Where a command's result goes.
type Reply = oneshot::Sender<Result<Outcome, ClientError>>;

/// The client store's commit reports, from its thread.
type StoredRx = mpsc::UnboundedReceiver<Result<u64, StoreError>>;

/// Incoming messages, in order. A [`futures_core::Stream`], or call [`Messages::recv`].
///
/// The client holds at most [`ClientOptions::message_buffer`] messages the application has not
/// taken; beyond that it stops reading from the network (back-pressure reaches the broker)
/// until the application catches up (the core's [`MessageBacklog`] rule, the same in every
/// adapter). Dropping it discards later messages.
pub struct Messages {
    rx: mpsc::UnboundedReceiver<Publish>,
    backlog: MessageBacklog,
}

impl Messages {
    /// The next message; `None` once the client is closed.
    pub async fn recv(&mut self) -> Option<Publish> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Publish>> {
        let p = self.rx.poll_recv(cx);
        if let Poll::Ready(Some(_)) = &p {
            self.backlog.taken();
        }
        p
    }
}

impl futures_core::Stream for Messages {
    type Item = Publish;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Publish>> {
        self.poll_recv(cx)
    }
}

impl Drop for Messages {
    fn drop(&mut self) {
        // Nobody takes messages any more: the client must not stop reading for them.
        self.backlog.detach();
    }
}

/// Connection state changes, from [`Client::state_changes`].
pub struct StateChanges {
    rx: watch::Receiver<ConnectionState>,
}

impl StateChanges {
    /// The next state the connection moves to (the latest, if several came since the last
    /// call); `None` once the client is gone.
    pub async fn recv(&mut self) -> Option<ConnectionState> {
        self.rx.changed().await.ok()?;
        Some(self.rx.borrow_and_update().clone())
    }

    /// Waits until the state satisfies `pred` (the current one counts) and returns it; `None`
    /// if the client is gone first.
    pub async fn wait_for(&mut self, mut pred: impl FnMut(&ConnectionState) -> bool) -> Option<ConnectionState> {
        self.rx.wait_for(|s| pred(s)).await.ok().map(|s| s.clone())
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
    /// resolves once the broker accepts the connection (CONNACK). Without `options.tls`, QUIC
    /// and `mqtts://` trust the operating system's CAs.
    ///
    /// With [`ClientOptions::store`], the store is opened and read first (on a blocking
    /// thread): what the last run left unacknowledged goes out again on this connection (see
    /// [`ClientOptions::store`]), and commits run on a thread of their own while the client
    /// lives. The store is closed once the client ends ([`Client::disconnect`], or every handle
    /// dropped), after a last commit; a client stopped any other way (its runtime shut down,
    /// the process killed) leaves what was committed, which is what it resumes from.
    pub async fn connect(url: &str, options: ClientOptions) -> Result<Client, ClientError> {
        Client::connect_urls([url], options).await
    }

    /// Connects to the first of several brokers that answers, in order (say `quic://` first,
    /// then `mqtts://` or `mqtt://` for networks that block UDP), keeping one MQTT session
    /// across them: a QUIC attempt gets [`ClientOptions::fallback`]'s handshake timeout before
    /// the next URL is tried, and once connected on a later URL the client tries the first
    /// again now and then and moves back to it (see [`mqtt_quic_core::fallback`]). Host names
    /// are resolved again on each attempt. Resolves once a broker accepts the connection; the
    /// error lists what each URL said when none did.
    pub async fn connect_urls<S: AsRef<str>>(
        urls: impl IntoIterator<Item = S>,
        mut options: ClientOptions,
    ) -> Result<Client, ClientError> {
        let urls = urls.into_iter().map(|u| u.as_ref().parse()).collect::<Result<Vec<BrokerUrl>, _>>()?;
        let shown = urls.iter().map(|u| u.to_string()).collect::<Vec<_>>().join(", ");
        if options.tls.is_none() && urls.iter().any(|u| u.transport == Transport::Quic || u.transport.is_tls()) {
            options.tls = Some(files::client_tls_from_system().map_err(|e| ClientError::Trust(e.to_string()))?);
        }
        let machine = options.machine(&urls, crate::os_secret())?;
        let tls = |transport: Transport| match urls.iter().any(|u| u.transport == transport) {
            true => options.stream_tls_config(transport).map(|c| Some(Arc::new(c))),
            false => Ok(None),
        };
        let (tls, tls_ws) = (tls(Transport::Tls)?, tls(Transport::Wss)?);
        let connector = Connector::Urls { tls, tls_ws, server_name: options.server_name.clone() };
        Client::start(machine, connector, options, shown).await
    }

    /// Connects over a connection the application opens itself: `connect` is called for the
    /// first connection and again on each reconnect, and yields any byte stream (a Unix socket,
    /// an in-memory duplex, a tunnel, TLS of its own making); MQTT is spoken on it as on TCP.
    /// A call that fails, or takes longer than the session's connect timeout, counts as a
    /// failed connection (retried under [`ClientOptions::reconnect`] once connected). `name`
    /// is how errors and logs name the broker.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), adapter_tokio::client::ClientError> {
    /// use adapter_tokio::client::{Client, ClientOptions};
    /// // MQTT over a Unix socket (a broker behind a local proxy, say).
    /// let client = Client::connect_with("unix:/run/mqtt.sock", ClientOptions::new(), || {
    ///     tokio::net::UnixStream::connect("/run/mqtt.sock")
    /// })
    /// .await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect_with<F, Fut, S>(name: &str, options: ClientOptions, connect: F) -> Result<Client, ClientError>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = io::Result<S>> + Send + 'static,
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let machine = options.stream_machine(crate::os_secret())?;
        let own: OwnConnector = Arc::new(move || {
            let opening = connect();
            Box::pin(async move { opening.await.map(|s| Box::new(s) as BoxStream) }) as Opening
        });
        Client::start(machine, Connector::Own(own), options, name.to_string()).await
    }

    /// Runs a client over `machine`, its streams opened by `connector`; resolves once the first
    /// connection is accepted (or refused).
    async fn start(
        machine: ClientMachine,
        connector: Connector,
        options: ClientOptions,
        shown: String,
    ) -> Result<Client, ClientError> {
        let timeout = options.session.connect_timeout;
        let io = Io {
            udp: None,
            datagram_buf: Vec::with_capacity(2048),
            connector,
            timeout,
            conn: None,
            opening: None,
            resolving: None,
            buf: BytesMut::new(),
        };
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let (state_tx, state) = watch::channel(ConnectionState::Connecting);
        // Unbounded: the driver's backlog rule bounds what waits here.
        let (msg_tx, msg_rx) = mpsc::unbounded_channel();
        let (first_tx, first_rx) = oneshot::channel();
        let mut driver = ClientDriver::new(machine)
            .with_message_buffer(options.message_buffer)
            .retry_first_connection(options.retry_first_connection);
        let (store, stored) = match options.store.clone() {
            Some(dir) => {
                // Opening checks the whole file: not on the runtime's threads.
                let (back, store) = tokio::task::spawn_blocking(move || {
                    let store = ClientStore::open(&dir, &mut driver, clock());
                    (driver, store)
                })
                .await
                .map_err(|e| ClientError::Store(format!("opening the client store failed: {e}")))?;
                driver = back;
                let (tx, rx) = mpsc::unbounded_channel();
                let store = store?.spawn(move |r| drop(tx.send(r)));
                debug!("{}", store.summary());
                (Some(store), Some(rx))
            }
            None => (None, None),
        };
        let backlog = driver.backlog().clone();
        let driver = Driver {
            driver,
            store,
            stored,
            io,
            url: shown,
            commands: commands_rx,
            messages: msg_tx,
            state: state_tx,
            first: Some(first_tx),
        };
        tokio::spawn(driver.run());
        let client_id = first_rx.await.map_err(|_| ClientError::Closed)??;
        let messages = Messages { rx: msg_rx, backlog };
        Ok(Client { commands, state, messages: Arc::new(Mutex::new(Some(messages))), client_id })
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
    pub fn state_changes(&self) -> StateChanges {
        // Changes after this call, as in the other adapters: the state now counts as seen.
        let mut rx = self.state.clone();
        rx.borrow_and_update();
        StateChanges { rx }
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

    /// Hands the command to the driver now (see [`call`]).
    fn call(
        &self,
        make: impl FnOnce(Reply) -> Command,
    ) -> impl Future<Output = Result<Outcome, ClientError>> + 'static {
        call(&self.commands, make)
    }

    /// Publishes and resolves when done: QoS 0 once written, QoS 1 on PUBACK, QoS 2 on PUBCOMP.
    /// QoS 1 and 2 messages published while the connection is down wait for the next one.
    ///
    /// The message is queued when this is called, not when the future is first polled: messages
    /// go out in the order of the calls, so many can be in flight at once (spawn or join the
    /// futures) without losing their order.
    pub fn publish(&self, publish: Publish) -> impl Future<Output = Result<(), ClientError>> + Send + 'static {
        let done = self.call(|tx| Command::Publish(publish, tx));
        async move { done.await.map(drop) }
    }

    /// Subscribes to one filter; resolves with the granted QoS on SUBACK, or
    /// [`ClientError::Rejected`] with the broker's failure code (see
    /// [`Outcome::granted_qos`]).
    pub async fn subscribe(&self, filter: TopicFilter, qos: QoS) -> Result<QoS, ClientError> {
        self.call(|tx| Command::Subscribe(vec![Subscription::new(filter, qos)], tx)).await?.granted_qos()
    }

    /// Subscribes to several filters at once; resolves with SUBACK's code for each.
    pub async fn subscribe_many(&self, subscriptions: Vec<Subscription>) -> Result<Vec<ReasonCode>, ClientError> {
        Ok(self.call(|tx| Command::Subscribe(subscriptions, tx)).await?.into_codes())
    }

    /// Unsubscribes; resolves with UNSUBACK's codes (empty for MQTT 3.1.1).
    pub async fn unsubscribe(&self, filters: Vec<TopicFilter>) -> Result<Vec<ReasonCode>, ClientError> {
        Ok(self.call(|tx| Command::Unsubscribe(filters, tx)).await?.into_codes())
    }

    /// Opens a data stream (EMQX's multi-stream mode) with send `priority`: traffic put on it
    /// through the returned [`ClientStream`] is not held up behind the other streams' (QUIC
    /// delivers each stream in order, streams independently), and when several streams have
    /// bytes waiting the higher priority's go first. Its QUIC stream opens once connected,
    /// and again after each reconnect, making its subscriptions again (see "Data streams" in
    /// [`mqtt_quic_core::client`] for what happens to requests in flight then). Over `mqtt://`
    /// and `mqtts://` there is one stream: the handle's traffic goes on it.
    pub async fn open_stream(&self, priority: i32) -> Result<ClientStream, ClientError> {
        let handle = self.call(|tx| Command::OpenStream(priority, tx)).await?.into_stream()?;
        Ok(ClientStream { commands: self.commands.clone(), handle, closed: false })
    }

    /// Sends DISCONNECT (normal, so the broker discards the will), waits for the connection to
    /// close, and ends the client. Unacknowledged QoS 1 and 2 publishes are abandoned, unless
    /// the client has a store ([`ClientOptions::store`]): then they stay in it for the next
    /// client with that store, and the store is closed before this returns.
    pub async fn disconnect(&self) -> Result<(), ClientError> {
        self.call(|tx| Command::Disconnect(Some(tx))).await.map(drop)
    }
}

/// A data stream of a [`Client`], from [`Client::open_stream`]: publishes, subscribes and
/// unsubscribes made through it travel on its own QUIC stream, their acknowledgements come
/// back on it, and the broker delivers on it what its subscriptions match. Messages arrive
/// with the client's others (in [`Client::messages`]).
///
/// Dropping it closes the stream, as [`ClientStream::close`] does. While it lives it keeps
/// the connection, as a [`Client`] handle does.
pub struct ClientStream {
    commands: mpsc::UnboundedSender<Command>,
    handle: StreamHandle,
    /// Closed by `close`: nothing to do on drop.
    closed: bool,
}

impl ClientStream {
    /// The core's handle for this stream.
    pub fn handle(&self) -> StreamHandle {
        self.handle
    }

    /// Hands the command to the driver now (see [`call`]).
    fn call(
        &self,
        make: impl FnOnce(Reply) -> Command,
    ) -> impl Future<Output = Result<Outcome, ClientError>> + 'static {
        call(&self.commands, make)
    }

    /// Publishes on this stream; resolves as [`Client::publish`] does. A QoS 2 message in
    /// flight when the connection drops fails with [`ClientError::ConnectionLost`] (the
    /// broker's QoS 2 state for it ended with the stream, so it is not sent again).
    pub fn publish(&self, publish: Publish) -> impl Future<Output = Result<(), ClientError>> + Send + 'static {
        let handle = self.handle;
        let done = self.call(move |tx| Command::PublishOn(handle, publish, tx));
        async move { done.await.map(drop) }
    }

    /// Subscribes to one filter on this stream (its messages are delivered on it); resolves
    /// with the granted QoS, as [`Client::subscribe`] does.
    pub async fn subscribe(&self, filter: TopicFilter, qos: QoS) -> Result<QoS, ClientError> {
        let handle = self.handle;
        self.call(|tx| Command::SubscribeOn(handle, vec![Subscription::new(filter, qos)], tx)).await?.granted_qos()
    }

    /// Subscribes to several filters on this stream; resolves with SUBACK's code for each.
    pub async fn subscribe_many(&self, subscriptions: Vec<Subscription>) -> Result<Vec<ReasonCode>, ClientError> {
        let handle = self.handle;
        Ok(self.call(|tx| Command::SubscribeOn(handle, subscriptions, tx)).await?.into_codes())
    }

    /// Unsubscribes on this stream; resolves with UNSUBACK's codes.
    pub async fn unsubscribe(&self, filters: Vec<TopicFilter>) -> Result<Vec<ReasonCode>, ClientError> {
        let handle = self.handle;
        Ok(self.call(|tx| Command::UnsubscribeOn(handle, filters, tx)).await?.into_codes())
    }

    /// Closes the stream: the broker drops its subscriptions, and what is still pending on it
    /// fails with [`ClientError::ConnectionLost`].
    pub async fn close(mut self) -> Result<(), ClientError> {
        self.closed = true;
        let handle = self.handle;
        self.call(|tx| Command::CloseStream(handle, Some(tx))).await.map(drop)
    }
}

impl Drop for ClientStream {
    fn drop(&mut self) {
        if !self.closed {
            // Fails only once the client is gone, and the stream with it.
            let _ = self.commands.send(Command::CloseStream(self.handle, None));
        }
    }
}

/// Hands a command to the driver now (so commands keep the order of the calls, however their
/// futures are awaited) and returns the wait for its result.
fn call(
    commands: &mpsc::UnboundedSender<Command>,
    make: impl FnOnce(Reply) -> Command,
) -> impl Future<Output = Result<Outcome, ClientError>> + 'static {
    let (tx, rx) = oneshot::channel();
    let sent = commands.send(make(tx)).is_ok();
    async move {
        if !sent {
            return Err(ClientError::Closed);
        }
        rx.await.map_err(|_| ClientError::Closed)?
    }
}

/// A byte stream to the broker: TCP, or TLS over TCP.
trait ByteStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> ByteStream for T {}
type BoxStream = Box<dyn ByteStream>;
type Opening = Pin<Box<dyn Future<Output = io::Result<BoxStream>> + Send>>;
type Resolving = Pin<Box<dyn Future<Output = (BrokerUrl, Result<SocketAddr, String>)> + Send>>;

/// The application's connector (see [`Client::connect_with`]).
type OwnConnector = Arc<dyn Fn() -> Opening + Send + Sync>;

/// Opens byte-stream connections when the machine asks, within `timeout`.
enum Connector {
    /// To the URL the machine names.
    Urls {
        /// For `mqtts://` (ALPN `mqtt`).
        tls: Option<Arc<rustls::ClientConfig>>,
        /// For `wss://` (ALPN `http/1.1`).
        tls_ws: Option<Arc<rustls::ClientConfig>>,
        /// The name certificates must carry, if not the URL's host.
        server_name: Option<String>,
    },
    /// However the application opens them.
    Own(OwnConnector),
}

impl Connector {
    /// Connects: to `url` (its host resolved now, so a broker that moved is found), or with the
    /// application's connector.
    fn open(&self, url: Option<BrokerUrl>, timeout: Duration) -> Opening {
        let (tls, server_name) = match self {
            Connector::Urls { tls, tls_ws, server_name } => {
                let tls = match url.as_ref().map(|u| u.transport) {
                    Some(Transport::Wss) => tls_ws.clone(),
                    _ => tls.clone(),
                };
                (tls, server_name.clone())
            }
            Connector::Own(connect) => {
                let opening = connect();
                return Box::pin(async move {
                    tokio::time::timeout(timeout, opening)
                        .await
                        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connection timed out"))?
                });
            }
        };
        Box::pin(async move {
            let url = url.ok_or_else(|| io::Error::other("no broker URL"))?;
            let work = async {
                let addr = pick_address(&url, tokio::net::lookup_host(url.authority()).await)
                    .map_err(|e| io::Error::other(e.to_string()))?;
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let _ = tcp.set_nodelay(true);
                Ok::<BoxStream, io::Error>(match (url.transport, tls) {
                    (t, Some(config)) if t.is_tls() => {
                        let name = tls_server_name(server_name.as_deref(), &url).map_err(io::Error::other)?;
                        Box::new(tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?)
                    }
                    _ => Box::new(tcp),
                })
            };
            tokio::time::timeout(timeout, work)
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connection timed out"))?
        })
    }
}

/// Resolves a QUIC broker's name, as the machine asks on each attempt.
fn resolve(url: BrokerUrl) -> Resolving {
    Box::pin(async move {
        let r = pick_address(&url, tokio::net::lookup_host(url.authority()).await).map_err(|e| e.to_string());
        (url, r)
    })
}

/// The client's sockets: a UDP socket for QUIC (bound on first use, for the family of the
/// broker's address) and a byte stream, either or both in use while falling back or moving
/// back between brokers.
struct Io {
    udp: Option<Udp>,
    datagram_buf: Vec<u8>,
    connector: Connector,
    /// How long opening a connection may take.
    timeout: Duration,
    conn: Option<(ReadHalf<BoxStream>, WriteHalf<BoxStream>)>,
    opening: Option<Opening>,
    resolving: Option<Resolving>,
    buf: BytesMut,
}

impl Io {
    /// The UDP socket for datagrams to `to`, bound now if there is none of its family.
    fn udp_for(&mut self, to: SocketAddr) -> io::Result<&Udp> {
        let fits = self.udp.as_ref().and_then(|u| u.local_addr().ok()).is_some_and(|a| a.is_ipv4() == to.is_ipv4());
        if !fits {
            self.udp = Some(Udp::bind(local_bind_address(to))?);
        }
        self.udp.as_ref().ok_or_else(|| io::Error::other("no UDP socket"))
    }
}

/// The task that owns the machine: socket input and time in, the core's [`ClientDriver`]
/// does the rest, and results go out through channels.
struct Driver {
    driver: ClientDriver<Reply>,
    /// The client store, if configured.
    store: Option<ClientStore>,
    /// Its commit reports.
    stored: Option<StoredRx>,
    io: Io,
    url: String,
    commands: mpsc::UnboundedReceiver<Command>,
    messages: mpsc::UnboundedSender<Publish>,
    state: watch::Sender<ConnectionState>,
    /// Resolves `Client::connect`.
    first: Option<oneshot::Sender<Result<String, ClientError>>>,
}

enum Input {
    Command(Option<Command>),
    Datagrams(io::Result<()>),
    Bytes(io::Result<usize>),
    Opened(io::Result<BoxStream>),
    Resolved(BrokerUrl, Result<SocketAddr, String>),
    /// The application took messages: there is room to read again.
    Room,
    Timer,
    /// The client store committed batches up to this one, or failed (`None`: its thread is
    /// gone, after an error already reported).
    Stored(Option<Result<u64, StoreError>>),
}

impl Driver {
    async fn run(mut self) {
        self.driver.start(clock());
        loop {
            // Changes go to the store before the output they came with reaches the network.
            if let Some(store) = &mut self.store {
                store.submit(&mut self.driver, clock());
            }
            self.flush().await;
            self.outputs();
            if self.driver.is_done(clock()) {
                if let Some(store) = self.store.take() {
                    // The last commit; what is unfinished stays for the next run.
                    if let Err(e) = store.close(&mut self.driver, clock()) {
                        debug!("{e}");
                    }
                }
                self.outputs();
                break;
            }
            let deadline = self.driver.poll_timeout().map(tokio::time::Instant::from_std);
            // The core's back-pressure rule: no reading while the application is behind.
            let reading = self.driver.is_reading();
            let room = self.driver.backlog().room();
            let input = tokio::select! {
                c = self.commands.recv(), if self.driver.is_accepting() => Input::Command(c),
                i = wait_io(&mut self.io, reading) => i,
                _ = room, if !reading => Input::Room,
                r = recv_stored(&mut self.stored) => Input::Stored(r),
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(|| tokio::time::Instant::now() + NEVER)) => Input::Timer,
            };
            let now = clock();
            match input {
                // `None`: every handle is gone, nobody can use the connection any more.
                Input::Command(c) => {
                    self.driver.command(now, c);
                    // Take what else is waiting too, so that one write carries them all.
                    for _ in 0..COMMAND_BATCH {
                        let Ok(c) = self.commands.try_recv() else { break };
                        self.driver.command(now, Some(c));
                    }
                }
                Input::Datagrams(Ok(())) => {
                    if let Some(udp) = &self.io.udp {
                        for d in udp.datagrams() {
                            self.driver.handle_datagram(now, d);
                        }
                    }
                }
                Input::Datagrams(Err(e)) => {
                    debug!("UDP receive failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Input::Bytes(Ok(0)) | Input::Bytes(Err(_)) => {
                    self.io.conn = None;
                    self.driver.handle_stream_closed(now);
                }
                Input::Bytes(Ok(_)) => {
                    let data = self.io.buf.split();
                    self.driver.handle_stream_data(now, &data);
                }
                Input::Opened(Ok(stream)) => {
                    self.io.conn = Some(tokio::io::split(stream));
                    self.driver.handle_stream_open(now);
                }
                Input::Resolved(url, r) => self.driver.handle_resolved(now, &url, r),
                Input::Opened(Err(e)) => self.driver.handle_stream_failed(now, &e.to_string()),
                Input::Room => {}
                Input::Timer => self.driver.handle_timeout(now),
                Input::Stored(r) => match (r, &mut self.store) {
                    (Some(Ok(seq)), Some(store)) => store.stored(&mut self.driver, now, seq),
                    (Some(Err(e)), Some(store)) => store.failed(&mut self.driver, now, e),
                    (None, _) => self.stored = None,
                    (Some(_), None) => {}
                },
            }
        }
    }

    /// Hands out what the driver has for callers: the first connection's outcome, completions,
    /// messages and state changes.
    fn outputs(&mut self) {
        while let Some(m) = self.driver.hand_message() {
            // Fails only once the application dropped its stream: nobody wants them.
            let _ = self.messages.send(m);
        }
        if let Some(r) = self.driver.poll_connected() {
            if let Some(first) = self.first.take() {
                let _ = first.send(r.map_err(|e| ClientError::from_driver(e, &self.url)));
            }
        }
        while let Some((reply, r)) = self.driver.poll_completion() {
            let _ = reply.send(r.map_err(|e| ClientError::from_driver(e, &self.url)));
        }
        while let Some(state) = self.driver.poll_state_change() {
            self.state.send_replace(state);
        }
    }

    /// Sends what the machine has for the network.
    async fn flush(&mut self) {
        let io = &mut self.io;
        loop {
            let mut buf = std::mem::take(&mut io.datagram_buf);
            let max = io.udp.as_ref().map_or(1, |u| u.max_gso_segments());
            let t = self.driver.poll_transmit_batch(clock(), max, &mut buf);
            if let Some(t) = &t {
                let sent = match io.udp_for(t.destination) {
                    Ok(udp) => udp.send(t, &buf[..t.size]).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = sent {
                    debug!("UDP send to {} failed: {e}", t.destination);
                }
            }
            io.datagram_buf = buf;
            if t.is_none() {
                break;
            }
        }
        while let Some(cmd) = self.driver.poll_stream() {
            match cmd {
                StreamCommand::Open(url) => io.opening = Some(io.connector.open(url, io.timeout)),
                StreamCommand::Resolve(url) => io.resolving = Some(resolve(url)),
                StreamCommand::Data(bytes) => {
                    let failed = match &mut io.conn {
                        Some((_, w)) => w.write_all(&bytes).await.is_err(),
                        None => false,
                    };
                    if failed {
                        io.conn = None;
                        self.driver.handle_stream_closed(clock());
                    }
                }
                StreamCommand::Close => {
                    // (A connection still opening is dropped with its future.)
                    io.opening = None;
                    if let Some((_, mut w)) = io.conn.take() {
                        let _ = w.shutdown().await;
                    }
                }
                _ => {}
            }
        }
    }
}

/// The next report of the client store's thread (never, without a store).
async fn recv_stored(rx: &mut Option<StoredRx>) -> Option<Result<u64, StoreError>> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Waits for input on the connection: a batch of datagrams, stream bytes (while `reading`),
/// the outcome of opening a stream, or a resolved name.
async fn wait_io(io: &mut Io, reading: bool) -> Input {
    let Io { udp, conn, opening, resolving, buf, .. } = io;
    let datagrams = async {
        match udp {
            Some(udp) if reading => Input::Datagrams(udp.recv().await),
            _ => std::future::pending().await,
        }
    };
    let opened = async {
        // Taken out only once done: this future may be dropped for another input first.
        let result = std::future::poll_fn(|cx| match opening.as_mut() {
            Some(f) => f.as_mut().poll(cx),
            None => Poll::Pending,
        })
        .await;
        *opening = None;
        Input::Opened(result)
    };
    let resolved = async {
        let (url, r) = std::future::poll_fn(|cx| match resolving.as_mut() {
            Some(f) => f.as_mut().poll(cx),
            None => Poll::Pending,
        })
        .await;
        *resolving = None;
        Input::Resolved(url, r)
    };
    let bytes = async {
        match conn {
            Some((r, _)) if reading => {
                buf.reserve(16 * 1024);
                Input::Bytes(r.read_buf(buf).await)
            }
            _ => std::future::pending().await,
        }
    };
    tokio::select! {
        i = datagrams => i,
        i = opened => i,
        i = resolved => i,
        i = bytes => i,
    }
}
