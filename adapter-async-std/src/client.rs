//! The async client for async-std: a task owns the core's [`ClientDriver`] and the socket;
//! [`Client`] is a cheap handle.

use crate::{now, os_secret, sleep_until};
use async_channel::{Receiver, Sender};
use async_std::io::{ReadExt, WriteExt};
use async_std::net::{TcpStream, UdpSocket};
use futures_lite::future;
use mqtt_proto::{Publish, QoS, ReasonCode, Subscription, TopicFilter};
use mqtt_quic_core::client::StreamCommand;
use mqtt_quic_core::driver::{local_bind_address, pick_address, ClientDriver, DriverError, Outcome};
pub use mqtt_quic_core::driver::{ClientError, ClientOptions, ConnectionState};
use mqtt_quic_core::url::{BrokerUrl, Transport};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

/// Most commands taken in one turn of the driver before it writes.
const COMMAND_BATCH: usize = 256;

/// How often a driver held back by an application that is behind on its messages looks again.
const BACKLOG_CHECK: Duration = Duration::from_millis(5);

type Reply = Sender<Result<Outcome, DriverError>>;

type Command = mqtt_quic_core::driver::Command<Reply>;

/// State shared between the handle and its task.
struct Shared {
    state: Mutex<ConnectionState>,
    watchers: Mutex<Vec<Sender<ConnectionState>>>,
    /// Messages handed to the application's channel and not yet taken.
    unread: AtomicUsize,
}

/// Incoming messages, in order: a `Stream`, or call [`Messages::recv`]. While the application
/// has `message_buffer` of them untaken the client stops reading the network.
pub struct Messages {
    rx: Pin<Box<Receiver<Publish>>>,
    shared: Arc<Shared>,
}

impl Messages {
    /// The next message; `None` once the client is closed.
    pub async fn recv(&mut self) -> Option<Publish> {
        let m = self.rx.recv().await.ok();
        if m.is_some() {
            self.shared.unread.fetch_sub(1, Ordering::Relaxed);
        }
        m
    }
}

impl futures_lite::Stream for Messages {
    type Item = Publish;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Publish>> {
        let p = self.rx.as_mut().poll_next(cx);
        if let Poll::Ready(Some(_)) = &p {
            self.shared.unread.fetch_sub(1, Ordering::Relaxed);
        }
        p
    }
}

/// A handle to a connected client; clones share the connection.
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
    pub async fn connect(url: &str, options: ClientOptions) -> Result<Client, ClientError> {
        let url: BrokerUrl = url.parse()?;
        if url.transport == Transport::Tls {
            return Err(ClientError::Unsupported("mqtts:// (this adapter has no TLS over TCP)"));
        }
        let addr = pick_address(&url, async_std::net::ToSocketAddrs::to_socket_addrs(&url.authority()).await)?;
        let machine = options.machine(&url, addr, os_secret())?;
        let io = match url.transport {
            Transport::Quic => {
                let local = local_bind_address(addr);
                Io::Quic { socket: UdpSocket::bind(local).await?, buf: Vec::new(), inbuf: vec![0; 65_536] }
            }
            _ => Io::Stream {
                addr,
                timeout: options.session.connect_timeout,
                conn: None,
                opening: None,
                inbuf: vec![0; 65_536],
            },
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(ConnectionState::Connecting),
            watchers: Mutex::new(Vec::new()),
            unread: AtomicUsize::new(0),
        });
        let (commands, commands_rx) = async_channel::unbounded();
        let (msg_tx, msg_rx) = async_channel::unbounded();
        let (first_tx, first_rx) = async_channel::bounded(1);
        let task = Task {
            driver: ClientDriver::new(machine),
            io,
            commands: commands_rx,
            messages: msg_tx,
            limit: options.message_buffer.max(1),
            shared: shared.clone(),
            first: Some(first_tx),
            url: url.to_string(),
        };
        async_std::task::spawn(task.run());
        let client_id = first_rx.recv().await.map_err(|_| ClientError::Closed)??;
        let messages = Messages { rx: Box::pin(msg_rx), shared: shared.clone() };
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

    /// A channel that receives every later state change.
    pub fn state_changes(&self) -> Receiver<ConnectionState> {
        let (tx, rx) = async_channel::unbounded();
        if let Ok(mut w) = self.shared.watchers.lock() {
            w.push(tx);
        }
        rx
    }

    /// The incoming messages; the first call takes them, later calls return `None`.
    pub fn messages(&self) -> Option<Messages> {
        self.messages.lock().ok()?.take()
    }

    /// Hands the command over now (commands keep the order of the calls) and returns the wait
    /// for its result.
    fn call(
        &self,
        make: impl FnOnce(Reply) -> Command,
    ) -> impl Future<Output = Result<Outcome, ClientError>> + 'static {
        let (tx, rx) = async_channel::bounded(1);
        let sent = self.commands.try_send(make(tx)).is_ok();
        async move {
            if !sent {
                return Err(ClientError::Closed);
            }
            // Failures after the first connection concern commands: no URL to name.
            rx.recv().await.map_err(|_| ClientError::Closed)?.map_err(|e| ClientError::from_driver(e, ""))
        }
    }

    /// Publishes; resolves when done (QoS 0 written, QoS 1 PUBACK, QoS 2 PUBCOMP).
    pub fn publish(&self, publish: Publish) -> impl Future<Output = Result<(), ClientError>> + Send + 'static {
        let done = self.call(|tx| Command::Publish(publish, tx));
        async move { done.await.map(drop) }
    }

    /// Subscribes to one filter; resolves with SUBACK's code.
    pub async fn subscribe(&self, filter: TopicFilter, qos: QoS) -> Result<ReasonCode, ClientError> {
        let codes = match self.call(|tx| Command::Subscribe(vec![Subscription::new(filter, qos)], tx)).await? {
            Outcome::Codes(c) => c,
            _ => Vec::new(),
        };
        match codes.first() {
            Some(c) if !c.is_error() => Ok(*c),
            Some(c) => Err(ClientError::Rejected(*c)),
            None => Err(ClientError::Rejected(ReasonCode::UnspecifiedError)),
        }
    }

    /// Unsubscribes.
    pub async fn unsubscribe(&self, filters: Vec<TopicFilter>) -> Result<(), ClientError> {
        self.call(|tx| Command::Unsubscribe(filters, tx)).await.map(drop)
    }

    /// Disconnects cleanly and waits for the connection to close.
    pub async fn disconnect(&self) -> Result<(), ClientError> {
        self.call(|tx| Command::Disconnect(Some(tx))).await.map(drop)
    }
}

type Opening = Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>>;

enum Io {
    Quic { socket: UdpSocket, buf: Vec<u8>, inbuf: Vec<u8> },
    Stream { addr: SocketAddr, timeout: Duration, conn: Option<TcpStream>, opening: Option<Opening>, inbuf: Vec<u8> },
}

enum Input {
    Command(Option<Command>),
    Datagram(io::Result<(usize, SocketAddr)>),
    Read(io::Result<usize>),
    Opened(io::Result<TcpStream>),
    Timer,
}

/// The task that owns the driver.
struct Task {
    driver: ClientDriver<Reply>,
    io: Io,
    commands: Receiver<Command>,
    messages: Sender<Publish>,
    limit: usize,
    shared: Arc<Shared>,
    first: Option<Sender<Result<String, ClientError>>>,
    url: String,
}

impl Task {
    async fn run(mut self) {
        self.driver.start(now());
        loop {
            self.send_out().await;
            self.hand_out();
            if self.driver.is_finished(now()) {
                self.hand_out();
                break;
            }
            let reading = self.shared.unread.load(Ordering::Relaxed) < self.limit;
            let mut deadline = self.driver.poll_timeout();
            if !reading {
                deadline = Some(deadline.map_or(now() + BACKLOG_CHECK, |d| d.min(now() + BACKLOG_CHECK)));
            }
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
            let input = future::or(future::or(next_command, input(&mut self.io, reading)), timer).await;
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
                    if let Io::Quic { inbuf, .. } = &self.io {
                        self.driver.handle_datagram(t, from, None, None, &inbuf[..n]);
                    }
                }
                Input::Datagram(Err(_)) => async_std::task::sleep(Duration::from_millis(1)).await,
                Input::Read(Ok(n)) if n > 0 => {
                    if let Io::Stream { inbuf, .. } = &self.io {
                        self.driver.handle_stream_bytes(t, &inbuf[..n]);
                    }
                }
                Input::Read(_) => {
                    if let Io::Stream { conn, .. } = &mut self.io {
                        *conn = None;
                    }
                    self.driver.stream_closed(t);
                }
                Input::Opened(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    if let Io::Stream { conn, .. } = &mut self.io {
                        *conn = Some(stream);
                    }
                    self.driver.stream_opened(t);
                }
                Input::Opened(Err(e)) => self.driver.stream_failed(t, &e.to_string()),
                Input::Timer => self.driver.handle_timeout(t),
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
        while let Some(m) = self.driver.poll_message() {
            if self.messages.try_send(m).is_ok() {
                self.shared.unread.fetch_add(1, Ordering::Relaxed);
            }
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
        match &mut self.io {
            Io::Quic { socket, buf, .. } => {
                while let Some(t) = self.driver.poll_transmit(now(), 1, buf) {
                    for d in t.datagrams(buf) {
                        let _ = socket.send_to(d, t.destination).await;
                    }
                }
            }
            Io::Stream { addr, timeout, conn, opening, .. } => {
                while let Some(cmd) = self.driver.poll_stream() {
                    match cmd {
                        StreamCommand::Open => {
                            let (addr, timeout) = (*addr, *timeout);
                            *opening = Some(Box::pin(async_std::io::timeout(timeout, TcpStream::connect(addr))));
                        }
                        StreamCommand::Write(bytes) => {
                            let failed = match conn {
                                Some(c) => c.write_all(&bytes).await.is_err(),
                                None => false,
                            };
                            if failed {
                                *conn = None;
                                self.driver.stream_closed(now());
                            }
                        }
                        StreamCommand::Close => {
                            if let Some(c) = conn.take() {
                                let _ = c.shutdown(std::net::Shutdown::Write);
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

/// The next input from the connection: a datagram, stream bytes (while `reading`), or the
/// outcome of opening a stream.
async fn input(io: &mut Io, reading: bool) -> Input {
    match io {
        Io::Quic { socket, inbuf, .. } if reading => Input::Datagram(socket.recv_from(inbuf).await),
        Io::Stream { opening: opening @ Some(_), .. } => {
            // Taken out only once done: this future may be dropped for another input first.
            let result = std::future::poll_fn(|cx| match opening.as_mut() {
                Some(f) => f.as_mut().poll(cx),
                None => std::task::Poll::Pending,
            })
            .await;
            *opening = None;
            Input::Opened(result)
        }
        Io::Stream { conn: Some(c), inbuf, .. } if reading => Input::Read(c.read(inbuf).await),
        _ => future::pending().await,
    }
}
