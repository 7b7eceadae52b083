//! The async client for async-std: a task owns the core's [`ClientDriver`] and the socket;
//! [`Client`] is a cheap handle.

use crate::{now, os_secret, sleep_until};
use async_channel::{Receiver, Sender};
use async_std::io::{ReadExt, WriteExt};
use async_std::net::{TcpStream, UdpSocket};
use futures_lite::future;
use futures_lite::io::{ReadHalf, WriteHalf};
use mqtt_proto::{Publish, QoS, ReasonCode, Subscription, TopicFilter};
use mqtt_quic_core::client::{StreamCommand, StreamHandle};
use mqtt_quic_core::driver::{local_bind_address, pick_address, ClientDriver, DriverError, MessageBacklog, Outcome};
pub use mqtt_quic_core::driver::{ClientError, ClientOptions, ConnectionState};
use mqtt_quic_core::url::BrokerUrl;
use mqtt_quic_core::Datagram;
use mqtt_store::{ClientStore, StoreError};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

/// Most commands taken in one turn of the driver before it writes.
const COMMAND_BATCH: usize = 256;

type Reply = Sender<Result<Outcome, DriverError>>;

type Command = mqtt_quic_core::driver::Command<Reply>;

/// State shared between the handle and its task.
struct Shared {
    state: Mutex<ConnectionState>,
    watchers: Mutex<Vec<Sender<ConnectionState>>>,
}

/// A data stream of a [`Client`], from [`Client::open_stream`]: publishes, subscribes and
/// unsubscribes made through it travel on its own QUIC stream, their acknowledgements come
/// back on it, and the broker delivers on it what its subscriptions match. Messages arrive
/// with the client's others (in [`Client::messages`]).
///
/// Dropping it closes the stream, as [`ClientStream::close`] does. While it lives it keeps
/// the connection, as a [`Client`] handle does.
pub struct ClientStream {
    commands: Sender<Command>,
    handle: StreamHandle,
    /// Closed by `close`: nothing to do on drop.
    closed: bool,
}

impl ClientStream {
    /// The core's handle for this stream.
    pub fn handle(&self) -> StreamHandle {
        self.handle
    }

    /// Hands the command over now (see [`call`]).
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
            let _ = self.commands.try_send(Command::CloseStream(self.handle, None));
        }
    }
}

/// Incoming messages, in order: a `Stream`, or call [`Messages::recv`].
///
/// The client holds at most [`ClientOptions::message_buffer`] messages the application has not
/// taken; beyond that it stops reading from the network (back-pressure reaches the broker)
/// until the application catches up (the core's [`MessageBacklog`] rule, the same in every
/// adapter). Dropping it discards later messages.
pub struct Messages {
    rx: Pin<Box<Receiver<Publish>>>,
    backlog: MessageBacklog,
}

impl Messages {
    /// The next message; `None` once the client is closed.
    pub async fn recv(&mut self) -> Option<Publish> {
        let m = self.rx.recv().await.ok();
        if m.is_some() {
            self.backlog.taken();
        }
        m
    }
}

impl futures_lite::Stream for Messages {
    type Item = Publish;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Publish>> {
        let p = self.rx.as_mut().poll_next(cx);
        if let Poll::Ready(Some(_)) = &p {
            self.backlog.taken();
        }
        p
    }
}

impl Drop for Messages {
    fn drop(&mut self) {
        // Nobody takes messages any more: the client must not stop reading for them.
        self.backlog.detach();
    }
}

/// Connection state changes, from [`Client::state_changes`]: every change after the call, in
/// order.
pub struct StateChanges {
    rx: Receiver<ConnectionState>,
    shared: Arc<Shared>,
}

impl StateChanges {
    /// The next state the connection moves to; `None` once the client is gone.
    pub async fn recv(&mut self) -> Option<ConnectionState> {
        self.rx.recv().await.ok()
    }

    /// Waits until the state satisfies `pred` (the current one counts) and returns it; `None`
    /// if the client is gone first.
    pub async fn wait_for(&mut self, mut pred: impl FnMut(&ConnectionState) -> bool) -> Option<ConnectionState> {
        let now = self.shared.state.lock().ok().map(|s| s.clone());
        if let Some(s) = now.filter(|s| pred(s)) {
            return Some(s);
        }
        loop {
            let s = self.recv().await?;
            if pred(&s) {
                return Some(s);
            }
        }
    }
}

/// A handle to a connected client; clones share the connection, which ends with
/// [`Client::disconnect`] or when every handle is dropped.
#[derive(Clone)]
pub struct Client {
    commands: Sender<Command>,
    shared: Arc<Shared>,
    messages: Arc<Mutex<Option<Messages>>>,
    client_id: String,
}

impl Client {
    /// Connects to `url` (`quic://`, `mqtt+quic://`, `mqtt://`, `tcp://`) and resolves once
    /// the broker accepts (CONNACK). QUIC needs `options.tls`.
    ///
    /// With [`ClientOptions::store`], the store is opened and read first (on a blocking
    /// thread): what the last run left unacknowledged goes out again on this connection, and
    /// commits run on a thread of their own while the client lives. The store is closed, after
    /// a last commit, once the client ends ([`Client::disconnect`], or every handle dropped).
    pub async fn connect(url: &str, options: ClientOptions) -> Result<Client, ClientError> {
        Client::connect_urls([url], options).await
    }

    /// Connects to the first of several brokers that answers, in order (`quic://` first, then
    /// `mqtt://` for networks that block UDP), keeping one MQTT session across them, and moves
    /// back to the first once it answers again (see [`mqtt_quic_core::fallback`]). Host names
    /// are resolved again on each attempt.
    pub async fn connect_urls<S: AsRef<str>>(
        urls: impl IntoIterator<Item = S>,
        options: ClientOptions,
    ) -> Result<Client, ClientError> {
        let urls = urls.into_iter().map(|u| u.as_ref().parse()).collect::<Result<Vec<BrokerUrl>, _>>()?;
        if urls.iter().any(|u| u.transport.is_tls()) {
            return Err(ClientError::Unsupported("mqtts:// and wss:// (this adapter has no TLS over TCP)"));
        }
        let shown = urls.iter().map(|u| u.to_string()).collect::<Vec<_>>().join(", ");
        let machine = options.machine(&urls, os_secret())?;
        Client::start(machine, None, options, shown).await
    }

    /// Connects over a connection the application opens itself: `connect` is called for the
    /// first connection and again on each reconnect, and yields any byte stream (a Unix socket,
    /// an in-memory pipe, a tunnel); MQTT is spoken on it as on TCP. A call that fails, or
    /// takes longer than the session's connect timeout, counts as a failed connection. `name`
    /// is how errors name the broker.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), adapter_async_std::client::ClientError> {
    /// use adapter_async_std::client::{Client, ClientOptions};
    /// let client = Client::connect_with("unix:/run/mqtt.sock", ClientOptions::new(), || {
    ///     async_std::os::unix::net::UnixStream::connect("/run/mqtt.sock")
    /// })
    /// .await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect_with<F, Fut, S>(name: &str, options: ClientOptions, connect: F) -> Result<Client, ClientError>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = io::Result<S>> + Send + 'static,
        S: futures_lite::AsyncRead + futures_lite::AsyncWrite + Send + Unpin + 'static,
    {
        let machine = options.stream_machine(os_secret())?;
        let own: OwnConnector = Arc::new(move || {
            let opening = connect();
            Box::pin(async move { opening.await.map(|s| Box::new(s) as BoxStream) }) as Opening
        });
        Client::start(machine, Some(own), options, name.to_string()).await
    }

    /// Runs a client over `machine`, its byte streams opened with `own` (else to the URLs the
    /// machine names); resolves once the first connection is accepted (or refused).
    async fn start(
        machine: mqtt_quic_core::client::ClientMachine,
        own: Option<OwnConnector>,
        options: ClientOptions,
        shown: String,
    ) -> Result<Client, ClientError> {
        let io = Io {
            socket: None,
            buf: Vec::new(),
            udp_in: vec![0; 65_536],
            timeout: options.session.connect_timeout,
            own,
            conn: None,
            opening: None,
            resolving: None,
            inbuf: vec![0; 65_536],
        };
        let shared =
            Arc::new(Shared { state: Mutex::new(ConnectionState::Connecting), watchers: Mutex::new(Vec::new()) });
        let (commands, commands_rx) = async_channel::unbounded();
        // Unbounded: the driver's backlog rule bounds what waits here.
        let (msg_tx, msg_rx) = async_channel::unbounded();
        let (first_tx, first_rx) = async_channel::bounded(1);
        let mut driver = ClientDriver::new(machine)
            .with_message_buffer(options.message_buffer)
            .retry_first_connection(options.retry_first_connection);
        let (store, stored) = match options.store.clone() {
            Some(dir) => {
                // Opening checks the whole file: not on the executor's threads.
                let (back, store) = async_std::task::spawn_blocking(move || {
                    let store = ClientStore::open(&dir, &mut driver, now());
                    (driver, store)
                })
                .await;
                driver = back;
                let (tx, rx) = async_channel::unbounded();
                let store = store?.spawn(move |r| drop(tx.try_send(r)));
                log::debug!("{}", store.summary());
                (Some(store), Some(rx))
            }
            None => (None, None),
        };
        let backlog = driver.backlog().clone();
        let task = Task {
            driver,
            store,
            stored,
            io,
            commands: commands_rx,
            messages: msg_tx,
            shared: shared.clone(),
            first: Some(first_tx),
            url: shown,
        };
        async_std::task::spawn(task.run());
        let client_id = first_rx.recv().await.map_err(|_| ClientError::Closed)??;
        let messages = Messages { rx: Box::pin(msg_rx), backlog };
        Ok(Client { commands, shared, messages: Arc::new(Mutex::new(Some(messages))), client_id })
    }

    /// The client identifier in force.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// The connection state now.
    pub fn state(&self) -> ConnectionState {
        self.shared.state.lock().map(|s| s.clone()).unwrap_or(ConnectionState::Closed { reason: "poisoned".into() })
    }

    /// A receiver of every later state change.
    pub fn state_changes(&self) -> StateChanges {
        let (tx, rx) = async_channel::unbounded();
        if let Ok(mut w) = self.shared.watchers.lock() {
            w.push(tx);
        }
        StateChanges { rx, shared: self.shared.clone() }
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
        async_std::task::spawn(async move {
            while let Some(m) = messages.recv().await {
                callback(m);
            }
        });
        true
    }

    /// Hands the command over now (see [`call`]).
    fn call(
        &self,
        make: impl FnOnce(Reply) -> Command,
    ) -> impl Future<Output = Result<Outcome, ClientError>> + 'static {
        call(&self.commands, make)
    }

    /// Publishes; resolves when done (QoS 0 written, QoS 1 PUBACK, QoS 2 PUBCOMP). The
    /// message is queued when this is called, so messages keep the order of the calls.
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
    /// there is one stream: the handle's traffic goes on it.
    pub async fn open_stream(&self, priority: i32) -> Result<ClientStream, ClientError> {
        let handle = self.call(|tx| Command::OpenStream(priority, tx)).await?.into_stream()?;
        Ok(ClientStream { commands: self.commands.clone(), handle, closed: false })
    }

    /// Disconnects cleanly and waits for the connection to close. With a store
    /// ([`ClientOptions::store`]), unacknowledged QoS 1 and 2 messages stay in it for the next
    /// client with that store, and the store is closed before this returns.
    pub async fn disconnect(&self) -> Result<(), ClientError> {
        self.call(|tx| Command::Disconnect(Some(tx))).await.map(drop)
    }
}

/// A byte stream to the broker: TCP, or the application's own.
trait ByteStream: futures_lite::AsyncRead + futures_lite::AsyncWrite + Send + Unpin {}
impl<T: futures_lite::AsyncRead + futures_lite::AsyncWrite + Send + Unpin> ByteStream for T {}
type BoxStream = Box<dyn ByteStream>;
type Opening = Pin<Box<dyn Future<Output = io::Result<BoxStream>> + Send>>;
/// The application's connector (see [`Client::connect_with`]).
type OwnConnector = Arc<dyn Fn() -> Opening + Send + Sync>;
type Resolving = Pin<Box<dyn Future<Output = (BrokerUrl, Result<SocketAddr, String>)> + Send>>;

/// The client's sockets: a UDP socket for QUIC (bound on first use, for the family of the
/// broker's address) and a TCP stream, either or both in use while falling back or moving
/// back between brokers.
struct Io {
    socket: Option<UdpSocket>,
    buf: Vec<u8>,
    udp_in: Vec<u8>,
    timeout: Duration,
    /// The application's connector (see [`Client::connect_with`]), if it gave one.
    own: Option<OwnConnector>,
    conn: Option<(ReadHalf<BoxStream>, WriteHalf<BoxStream>)>,
    opening: Option<Opening>,
    resolving: Option<Resolving>,
    inbuf: Vec<u8>,
}

impl Io {
    /// The UDP socket for datagrams to `to`, bound now if there is none of its family.
    async fn udp_for(&mut self, to: SocketAddr) -> io::Result<&UdpSocket> {
        let fits = self.socket.as_ref().and_then(|u| u.local_addr().ok()).is_some_and(|a| a.is_ipv4() == to.is_ipv4());
        if !fits {
            self.socket = Some(UdpSocket::bind(local_bind_address(to)).await?);
        }
        self.socket.as_ref().ok_or_else(|| io::Error::other("no UDP socket"))
    }
}

/// Resolves `url`'s host now (names are resolved on each attempt).
async fn lookup(url: &BrokerUrl) -> Result<SocketAddr, ClientError> {
    pick_address(url, async_std::net::ToSocketAddrs::to_socket_addrs(&url.authority()).await)
}

enum Input {
    Command(Option<Command>),
    Datagram(io::Result<(usize, SocketAddr)>),
    Read(io::Result<usize>),
    Opened(io::Result<BoxStream>),
    Resolved(BrokerUrl, Result<SocketAddr, String>),
    /// The application took messages: there is room to read again.
    Room,
    Timer,
    /// The client store committed batches up to this one, or failed (`None`: its thread is
    /// gone, after an error already reported).
    Stored(Option<Result<u64, StoreError>>),
}

/// The task that owns the driver.
struct Task {
    driver: ClientDriver<Reply>,
    /// The client store ([`ClientOptions::store`]), committing on a thread of its own.
    store: Option<ClientStore>,
    /// Its commit reports.
    stored: Option<Receiver<Result<u64, StoreError>>>,
    io: Io,
    commands: Receiver<Command>,
    messages: Sender<Publish>,
    shared: Arc<Shared>,
    first: Option<Sender<Result<String, ClientError>>>,
    url: String,
}

impl Task {
    async fn run(mut self) {
        self.driver.start(now());
        loop {
            // Changes go to the store before the output they came with reaches the network.
            if let Some(store) = &mut self.store {
                store.submit(&mut self.driver, now());
            }
            self.send_out().await;
            self.hand_out();
            if self.driver.is_done(now()) {
                if let Some(store) = self.store.take() {
                    // The last commit; what is unfinished stays for the next run.
                    if let Err(e) = store.close(&mut self.driver, now()) {
                        log::warn!("{e}");
                    }
                }
                self.hand_out();
                break;
            }
            // The core's back-pressure rule: no reading while the application is behind, and
            // a wake-up when it catches up.
            let reading = self.driver.is_reading();
            let room = self.driver.backlog().room();
            let deadline = self.driver.poll_timeout();
            let accepting = self.driver.is_accepting();
            let commands = &self.commands;
            let next_command = async move {
                if accepting {
                    Input::Command(commands.recv().await.ok())
                } else {
                    future::pending().await
                }
            };
            let timer = async move {
                sleep_until(deadline).await;
                Input::Timer
            };
            let room = async move {
                if reading {
                    future::pending::<()>().await;
                }
                room.await;
                Input::Room
            };
            let stored = self.stored.clone();
            let stored = async move {
                match stored {
                    Some(rx) => Input::Stored(rx.recv().await.ok()),
                    None => future::pending().await,
                }
            };
            let input = future::or(
                future::or(next_command, input(&mut self.io, reading)),
                future::or(future::or(room, timer), stored),
            )
            .await;
            let t = now();
            match input {
                // `None`: every handle is gone, nobody can use the connection any more.
                Input::Command(c) => {
                    self.driver.command(t, c);
                    // Take what else is waiting too, so that one write carries them all.
                    for _ in 0..COMMAND_BATCH {
                        let Ok(c) = self.commands.try_recv() else { break };
                        self.driver.command(t, Some(c));
                    }
                }
                Input::Datagram(Ok((n, from))) => {
                    self.driver.handle_datagram(t, Datagram::new(from, &self.io.udp_in[..n]));
                }
                Input::Datagram(Err(_)) => async_std::task::sleep(Duration::from_millis(1)).await,
                Input::Read(Ok(n)) if n > 0 => {
                    self.driver.handle_stream_data(t, &self.io.inbuf[..n]);
                }
                Input::Read(_) => {
                    self.io.conn = None;
                    self.driver.handle_stream_closed(t);
                }
                Input::Opened(Ok(stream)) => {
                    self.io.conn = Some(futures_lite::io::split(stream));
                    self.driver.handle_stream_open(t);
                }
                Input::Resolved(url, r) => self.driver.handle_resolved(t, &url, r),
                Input::Opened(Err(e)) => self.driver.handle_stream_failed(t, &e.to_string()),
                Input::Room => {}
                Input::Timer => self.driver.handle_timeout(t),
                Input::Stored(r) => match (r, &mut self.store) {
                    (Some(Ok(seq)), Some(store)) => store.stored(&mut self.driver, t, seq),
                    (Some(Err(e)), Some(store)) => store.failed(&mut self.driver, t, e),
                    (None, _) => self.stored = None,
                    (Some(_), None) => {}
                },
            }
        }
    }

    /// Passes results, messages and state changes to whoever waits for them.
    fn hand_out(&mut self) {
        if let Some(r) = self.driver.poll_connected() {
            if let Some(first) = self.first.take() {
                let _ = first.try_send(r.map_err(|e| ClientError::from_driver(e, &self.url)));
            }
        }
        while let Some((reply, r)) = self.driver.poll_completion() {
            let _ = reply.try_send(r);
        }
        while let Some(m) = self.driver.hand_message() {
            // Fails only once the application dropped its stream: nobody wants them.
            let _ = self.messages.try_send(m);
        }
        while let Some(state) = self.driver.poll_state_change() {
            if let Ok(mut s) = self.shared.state.lock() {
                *s = state.clone();
            }
            if let Ok(mut w) = self.shared.watchers.lock() {
                w.retain(|tx| tx.try_send(state.clone()).is_ok());
            }
        }
    }

    /// Sends what the machine has for the network.
    async fn send_out(&mut self) {
        let io = &mut self.io;
        loop {
            let mut buf = std::mem::take(&mut io.buf);
            let t = self.driver.poll_transmit(now(), &mut buf);
            if let Some(t) = &t {
                if let Ok(socket) = io.udp_for(t.destination).await {
                    for d in t.datagrams(&buf) {
                        let _ = socket.send_to(d, t.destination).await;
                    }
                }
            }
            io.buf = buf;
            if t.is_none() {
                break;
            }
        }
        while let Some(cmd) = self.driver.poll_stream() {
            match cmd {
                StreamCommand::Open(url) => {
                    let timeout = io.timeout;
                    let opening: Opening = match &io.own {
                        Some(connect) => connect(),
                        None => Box::pin(async move {
                            let url = url.ok_or_else(|| io::Error::other("no broker URL"))?;
                            let addr = lookup(&url).await.map_err(|e| io::Error::other(e.to_string()))?;
                            let tcp = TcpStream::connect(addr).await?;
                            let _ = tcp.set_nodelay(true);
                            Ok(Box::new(tcp) as BoxStream)
                        }),
                    };
                    io.opening = Some(Box::pin(async_std::io::timeout(timeout, opening)));
                }
                StreamCommand::Resolve(url) => {
                    io.resolving = Some(Box::pin(async move {
                        let r = lookup(&url).await.map_err(|e| e.to_string());
                        (url, r)
                    }));
                }
                StreamCommand::Data(bytes) => {
                    let failed = match &mut io.conn {
                        Some((_, w)) => w.write_all(&bytes).await.is_err(),
                        None => false,
                    };
                    if failed {
                        io.conn = None;
                        self.driver.handle_stream_closed(now());
                    }
                }
                StreamCommand::Close => {
                    io.opening = None;
                    if let Some((_, mut w)) = io.conn.take() {
                        let _ = futures_lite::AsyncWriteExt::close(&mut w).await;
                    }
                }
                _ => {}
            }
        }
    }
}

/// The next input from the connection: a datagram, stream bytes (while `reading`), the
/// outcome of opening a stream, or a resolved name.
async fn input(io: &mut Io, reading: bool) -> Input {
    let Io { socket, udp_in, conn, opening, resolving, inbuf, .. } = io;
    let datagram = async {
        match socket {
            Some(socket) if reading => Input::Datagram(socket.recv_from(udp_in).await),
            _ => future::pending().await,
        }
    };
    let opened = async {
        // Taken out only once done: this future may be dropped for another input first.
        let result = std::future::poll_fn(|cx| match opening.as_mut() {
            Some(f) => f.as_mut().poll(cx),
            None => std::task::Poll::Pending,
        })
        .await;
        *opening = None;
        Input::Opened(result)
    };
    let resolved = async {
        let (url, r) = std::future::poll_fn(|cx| match resolving.as_mut() {
            Some(f) => f.as_mut().poll(cx),
            None => std::task::Poll::Pending,
        })
        .await;
        *resolving = None;
        Input::Resolved(url, r)
    };
    let read = async {
        match conn {
            Some((r, _)) if reading => Input::Read(r.read(inbuf).await),
            _ => future::pending().await,
        }
    };
    future::or(future::or(datagram, opened), future::or(resolved, read)).await
}

/// Hands a command over now (commands keep the order of the calls) and returns the wait for
/// its result.
fn call(
    commands: &Sender<Command>,
    make: impl FnOnce(Reply) -> Command,
) -> impl Future<Output = Result<Outcome, ClientError>> + 'static {
    let (tx, rx) = async_channel::bounded(1);
    let sent = commands.try_send(make(tx)).is_ok();
    async move {
        if !sent {
            return Err(ClientError::Closed);
        }
        // Failures after the first connection concern commands: no URL to name.
        rx.recv().await.map_err(|_| ClientError::Closed)?.map_err(|e| ClientError::from_driver(e, ""))
    }
}
