//! [`Client`]: a [`MioClient`] on a thread of its own, behind a handle with the tokio and
//! async-std clients' methods (blocking instead of async, the same names and result types).
//!
//! Take messages on another thread than the one making calls (as [`Client::on_message`] does):
//! the client stops reading from the network while `message_buffer` messages wait untaken
//! (the core's back-pressure rule, [`MessageBacklog`]), and a call blocked on the broker's
//! answer would then wait for an answer nobody reads.
//!
//! ```no_run
//! use adapter_mio::client::{Client, ClientOptions};
//! use mqtt_proto::{Publish, QoS, TopicFilter, TopicName};
//! use mqtt_quic_core::tls::ClientTls;
//!
//! let client = Client::connect("quic://127.0.0.1:14567", ClientOptions::new().tls(ClientTls::insecure()))?;
//! client.on_message(|m| println!("{}: {:?}", m.topic, m.payload));
//! client.subscribe(TopicFilter::new("sensors/#")?, QoS::AtLeastOnce)?;
//! client.publish(Publish::new(TopicName::new("sensors/1")?, "21.5").with_qos(QoS::AtLeastOnce))?;
//! client.disconnect()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::client::{MioClient, OwnConnection, RequestToken, StreamHandle};
use mio::{Events, Poll, Token, Waker};
use mqtt_proto::{Publish, QoS, ReasonCode, Subscription, TopicFilter};
use mqtt_quic_core::driver::{ClientError, ClientOptions, ConnectionState, MessageBacklog, Outcome};
use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::task::Wake;
use std::time::Duration;

/// The client's socket.
const SOCKET: Token = Token(0);
/// Wakes the client's thread for commands and for room in the message backlog.
const WAKE: Token = Token(1);

/// Where a command's result goes.
type Reply = SyncSender<Result<Outcome, ClientError>>;

type Command = mqtt_quic_core::driver::Command<Reply>;

/// State shared between the handles and the client's thread.
struct Shared {
    state: Mutex<ConnectionState>,
    watchers: Mutex<Vec<Sender<ConnectionState>>>,
}

/// What the handles hold: when the last one goes, the thread is told (the connection ends).
struct Handle {
    commands: Option<Sender<Command>>,
    waker: Arc<Waker>,
}

impl Handle {
    /// Hands a command to the client's thread and waits for its result.
    fn call(&self, make: impl FnOnce(Reply) -> Command) -> Result<Outcome, ClientError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let commands = self.commands.as_ref().ok_or(ClientError::Closed)?;
        commands.send(make(tx)).map_err(|_| ClientError::Closed)?;
        let _ = self.waker.wake();
        rx.recv().map_err(|_| ClientError::Closed)?
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // Closed first, so that the woken thread finds it closed.
        self.commands = None;
        let _ = self.waker.wake();
    }
}

/// Wakes the thread's `Poll` when the application makes room in the message backlog.
struct PollWaker(Arc<Waker>);

impl Wake for PollWaker {
    fn wake(self: Arc<Self>) {
        let _ = self.0.wake();
    }
}

/// Incoming messages, in order: call [`Messages::recv`], or iterate.
///
/// The client holds at most [`ClientOptions::message_buffer`] messages the application has not
/// taken; beyond that it stops reading from the network (back-pressure reaches the broker)
/// until the application catches up (the core's [`MessageBacklog`] rule, the same in every
/// adapter). Dropping it discards later messages.
pub struct Messages {
    rx: Receiver<Publish>,
    backlog: MessageBacklog,
}

impl Messages {
    /// The next message, waiting for it; `None` once the client is closed.
    pub fn recv(&mut self) -> Option<Publish> {
        let m = self.rx.recv().ok()?;
        self.backlog.taken();
        Some(m)
    }

    /// The next message, waiting at most `timeout`; `None` if none came (or the client is
    /// closed).
    pub fn recv_timeout(&mut self, timeout: Duration) -> Option<Publish> {
        let m = self.rx.recv_timeout(timeout).ok()?;
        self.backlog.taken();
        Some(m)
    }
}

impl Iterator for Messages {
    type Item = Publish;
    fn next(&mut self) -> Option<Publish> {
        self.recv()
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
    /// The next state the connection moves to, waiting for it; `None` once the client is gone.
    pub fn recv(&mut self) -> Option<ConnectionState> {
        self.rx.recv().ok()
    }

    /// Waits until the state satisfies `pred` (the current one counts) and returns it; `None`
    /// if the client is gone first.
    pub fn wait_for(&mut self, mut pred: impl FnMut(&ConnectionState) -> bool) -> Option<ConnectionState> {
        let now = self.shared.state.lock().ok().map(|s| s.clone());
        if let Some(s) = now.filter(|s| pred(s)) {
            return Some(s);
        }
        loop {
            let s = self.recv()?;
            if pred(&s) {
                return Some(s);
            }
        }
    }
}

/// A handle to a connected client whose calls block until done; clones share the connection,
/// which ends with [`Client::disconnect`] or when every handle is dropped. Its
/// [`MioClient`] runs on a thread of its own. Take messages on another thread than the one
/// making calls (see the module docs): a call waits for the broker's answer, which is not read
/// while `message_buffer` messages wait untaken.
#[derive(Clone)]
pub struct Client {
    handle: Arc<Handle>,
    shared: Arc<Shared>,
    messages: Arc<Mutex<Option<Messages>>>,
    client_id: String,
}

impl Client {
    /// Connects to `url` (`quic://`, `mqtt+quic://`, `mqtt://`, `tcp://`) and returns once the
    /// broker accepts (CONNACK), or with why it did not. QUIC needs `options.tls`.
    pub fn connect(url: &str, options: ClientOptions) -> Result<Client, ClientError> {
        Client::connect_urls([url], options)
    }

    /// Connects to the first of several brokers that answers, in order, keeping one MQTT
    /// session across them (see [`MioClient::connect_urls`]).
    pub fn connect_urls<S: AsRef<str>>(
        urls: impl IntoIterator<Item = S>,
        options: ClientOptions,
    ) -> Result<Client, ClientError> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
        let inner = MioClient::connect_urls(urls, options, poll.registry(), SOCKET)?;
        Client::spawn(poll, waker, inner)
    }

    /// Connects over a connection the application opens itself (`Read + Write`; see
    /// [`OwnConnection`]), opened again on each reconnect; see [`MioClient::connect_with`].
    pub fn connect_with<F, C>(name: &str, options: ClientOptions, connect: F) -> Result<Client, ClientError>
    where
        F: Fn() -> std::io::Result<C> + Send + 'static,
        C: OwnConnection,
    {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
        let inner = MioClient::connect_with(name, options, poll.registry(), SOCKET, connect)?;
        Client::spawn(poll, waker, inner)
    }

    /// Runs a starting client on a thread of its own; returns once the broker accepts it.
    fn spawn(poll: Poll, waker: Arc<Waker>, inner: MioClient) -> Result<Client, ClientError> {
        let shared =
            Arc::new(Shared { state: Mutex::new(ConnectionState::Connecting), watchers: Mutex::new(Vec::new()) });
        let (commands, commands_rx) = mpsc::channel();
        let (messages_tx, messages_rx) = mpsc::channel();
        let (first_tx, first_rx) = mpsc::sync_channel(1);
        let backlog = inner.backlog().clone();
        let thread = Thread {
            inner,
            poll,
            waker: std::task::Waker::from(Arc::new(PollWaker(waker.clone()))),
            commands: commands_rx,
            messages: messages_tx,
            shared: shared.clone(),
            first: Some(first_tx),
            waiting: HashMap::new(),
        };
        std::thread::Builder::new().name("mqtt-client".into()).spawn(move || thread.run())?;
        let client_id = first_rx.recv().map_err(|_| ClientError::Closed)??;
        let messages = Messages { rx: messages_rx, backlog };
        Ok(Client {
            handle: Arc::new(Handle { commands: Some(commands), waker }),
            shared,
            messages: Arc::new(Mutex::new(Some(messages))),
            client_id,
        })
    }

    /// The client identifier in force (the broker's choice when none was given).
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// The connection state now.
    pub fn state(&self) -> ConnectionState {
        self.shared.state.lock().map(|s| s.clone()).unwrap_or(ConnectionState::Closed { reason: "poisoned".into() })
    }

    /// A receiver of every later state change.
    pub fn state_changes(&self) -> StateChanges {
        let (tx, rx) = mpsc::channel();
        if let Ok(mut w) = self.shared.watchers.lock() {
            w.push(tx);
        }
        StateChanges { rx, shared: self.shared.clone() }
    }

    /// The incoming messages, to pull. There is one such receiver per connection: the first
    /// call takes it (as does [`Client::on_message`]); later calls return `None`.
    pub fn messages(&self) -> Option<Messages> {
        self.messages.lock().ok()?.take()
    }

    /// Calls `callback` with each incoming message, on a thread of its own (push). Takes the
    /// message receiver; returns false if it was already taken.
    pub fn on_message(&self, mut callback: impl FnMut(Publish) + Send + 'static) -> bool {
        let Some(mut messages) = self.messages() else { return false };
        let spawned = std::thread::Builder::new().name("mqtt-messages".into()).spawn(move || {
            while let Some(m) = messages.recv() {
                callback(m);
            }
        });
        spawned.is_ok()
    }

    /// Hands the command to the client's thread and waits for its result.
    fn call(&self, make: impl FnOnce(Reply) -> Command) -> Result<Outcome, ClientError> {
        self.handle.call(make)
    }

    /// Publishes and returns when done: QoS 0 once written, QoS 1 on PUBACK, QoS 2 on PUBCOMP.
    /// QoS 1 and 2 messages published while the connection is down wait for the next one.
    pub fn publish(&self, publish: Publish) -> Result<(), ClientError> {
        self.call(|tx| Command::Publish(publish, tx)).map(drop)
    }

    /// Subscribes to one filter; returns the granted QoS on SUBACK, or
    /// [`ClientError::Rejected`] with the broker's failure code (see
    /// [`Outcome::granted_qos`]).
    pub fn subscribe(&self, filter: TopicFilter, qos: QoS) -> Result<QoS, ClientError> {
        self.call(|tx| Command::Subscribe(vec![Subscription::new(filter, qos)], tx))?.granted_qos()
    }

    /// Subscribes to several filters at once; returns SUBACK's code for each.
    pub fn subscribe_many(&self, subscriptions: Vec<Subscription>) -> Result<Vec<ReasonCode>, ClientError> {
        Ok(self.call(|tx| Command::Subscribe(subscriptions, tx))?.into_codes())
    }

    /// Unsubscribes; returns UNSUBACK's codes (empty for MQTT 3.1.1).
    pub fn unsubscribe(&self, filters: Vec<TopicFilter>) -> Result<Vec<ReasonCode>, ClientError> {
        Ok(self.call(|tx| Command::Unsubscribe(filters, tx))?.into_codes())
    }

    /// Opens a data stream (EMQX's multi-stream mode) with send `priority`: traffic put on it
    /// through the returned [`ClientStream`] is not held up behind the other streams' (QUIC
    /// delivers each stream in order, streams independently), and when several streams have
    /// bytes waiting the higher priority's go first. Its QUIC stream opens once connected,
    /// and again after each reconnect, making its subscriptions again (see "Data streams" in
    /// [`mqtt_quic_core::client`] for what happens to requests in flight then). Over `mqtt://`
    /// there is one stream: the handle's traffic goes on it.
    pub fn open_stream(&self, priority: i32) -> Result<ClientStream, ClientError> {
        let stream = self.call(|tx| Command::OpenStream(priority, tx))?.into_stream()?;
        Ok(ClientStream { handle: self.handle.clone(), stream, closed: false })
    }

    /// Sends DISCONNECT (normal, so the broker discards the will), waits for the connection to
    /// close, and ends the client. Unacknowledged QoS 1 and 2 publishes are abandoned.
    pub fn disconnect(&self) -> Result<(), ClientError> {
        self.call(|tx| Command::Disconnect(Some(tx))).map(drop)
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
    handle: Arc<Handle>,
    stream: StreamHandle,
    /// Closed by `close`: nothing to do on drop.
    closed: bool,
}

impl ClientStream {
    /// The core's handle for this stream.
    pub fn handle(&self) -> StreamHandle {
        self.stream
    }

    /// Hands the command to the client's thread and waits for its result.
    fn call(&self, make: impl FnOnce(Reply) -> Command) -> Result<Outcome, ClientError> {
        self.handle.call(make)
    }

    /// Publishes on this stream and returns when done, as [`Client::publish`] does. A QoS 2
    /// message in flight when the connection drops fails with [`ClientError::ConnectionLost`]
    /// (the broker's QoS 2 state for it ended with the stream, so it is not sent again).
    pub fn publish(&self, publish: Publish) -> Result<(), ClientError> {
        self.call(|tx| Command::PublishOn(self.stream, publish, tx)).map(drop)
    }

    /// Subscribes to one filter on this stream (its messages are delivered on it); returns
    /// the granted QoS, as [`Client::subscribe`] does.
    pub fn subscribe(&self, filter: TopicFilter, qos: QoS) -> Result<QoS, ClientError> {
        self.call(|tx| Command::SubscribeOn(self.stream, vec![Subscription::new(filter, qos)], tx))?.granted_qos()
    }

    /// Subscribes to several filters on this stream; returns SUBACK's code for each.
    pub fn subscribe_many(&self, subscriptions: Vec<Subscription>) -> Result<Vec<ReasonCode>, ClientError> {
        Ok(self.call(|tx| Command::SubscribeOn(self.stream, subscriptions, tx))?.into_codes())
    }

    /// Unsubscribes on this stream; returns UNSUBACK's codes.
    pub fn unsubscribe(&self, filters: Vec<TopicFilter>) -> Result<Vec<ReasonCode>, ClientError> {
        Ok(self.call(|tx| Command::UnsubscribeOn(self.stream, filters, tx))?.into_codes())
    }

    /// Closes the stream: the broker drops its subscriptions, and what is still pending on it
    /// fails with [`ClientError::ConnectionLost`].
    pub fn close(mut self) -> Result<(), ClientError> {
        self.closed = true;
        self.call(|tx| Command::CloseStream(self.stream, Some(tx))).map(drop)
    }
}

impl Drop for ClientStream {
    fn drop(&mut self) {
        if let (false, Some(commands)) = (self.closed, self.handle.commands.as_ref()) {
            // Fails only once the client is gone, and the stream with it.
            if commands.send(Command::CloseStream(self.stream, None)).is_ok() {
                let _ = self.handle.waker.wake();
            }
        }
    }
}

/// The client's thread: its own `Poll`, the [`MioClient`], and the channels to the handles.
struct Thread {
    inner: MioClient,
    poll: Poll,
    /// Registered with the backlog while input waits for the application.
    waker: std::task::Waker,
    commands: Receiver<Command>,
    messages: Sender<Publish>,
    shared: Arc<Shared>,
    /// Resolves `Client::connect`.
    first: Option<SyncSender<Result<String, ClientError>>>,
    waiting: HashMap<RequestToken, Reply>,
}

impl Thread {
    fn run(mut self) {
        let mut events = Events::with_capacity(256);
        let mut handles_gone = false;
        loop {
            if !handles_gone {
                handles_gone = self.take_commands();
            }
            self.hand_out();
            if self.inner.is_done(self.poll.registry()) {
                self.hand_out();
                break;
            }
            if self.inner.is_paused() {
                // Woken (through the `Poll`'s waker) when the application takes messages.
                let _ = self.inner.backlog().poll_room(&mut std::task::Context::from_waker(&self.waker));
            }
            match self.poll.poll(&mut events, self.inner.timeout()) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // The poll itself is broken: nothing can be sent or received any more.
                    let error = ClientError::Unreachable { url: String::new(), reason: e.to_string() };
                    if let Some(first) = self.first.take() {
                        let _ = first.send(Err(error));
                    }
                    break;
                }
            }
            for event in events.iter() {
                if event.token() == SOCKET {
                    self.inner.handle_event(self.poll.registry(), event);
                }
            }
            self.inner.handle_timeout(self.poll.registry());
        }
        // Commands that came too late, and callers still waiting: the client is closed.
        for (_, reply) in self.waiting.drain() {
            let _ = reply.send(Err(ClientError::Closed));
        }
    }

    /// Carries out the commands waiting; true once every handle is gone (which disconnects).
    fn take_commands(&mut self) -> bool {
        loop {
            let command = match self.commands.try_recv() {
                Ok(c) => c,
                Err(TryRecvError::Empty) => return false,
                Err(TryRecvError::Disconnected) => {
                    if self.inner.is_accepting() {
                        let _ = self.inner.disconnect(self.poll.registry());
                    }
                    return true;
                }
            };
            if !self.inner.is_accepting() {
                if let Some(reply) = reply_of(command) {
                    let _ = reply.send(Err(ClientError::Closed));
                }
                continue;
            }
            let registry = self.poll.registry();
            let (token, reply) = match command {
                Command::Publish(p, reply) => (self.inner.publish(registry, p), Some(reply)),
                Command::Subscribe(s, reply) => (self.inner.subscribe(registry, s), Some(reply)),
                Command::Unsubscribe(f, reply) => (self.inner.unsubscribe(registry, f), Some(reply)),
                Command::Disconnect(reply) => (self.inner.disconnect(registry), reply),
                Command::PublishOn(h, p, reply) => (self.inner.publish_on(registry, h, p), Some(reply)),
                Command::SubscribeOn(h, s, reply) => (self.inner.subscribe_on(registry, h, s), Some(reply)),
                Command::UnsubscribeOn(h, f, reply) => (self.inner.unsubscribe_on(registry, h, f), Some(reply)),
                // Done at once: answered here.
                Command::OpenStream(priority, reply) => {
                    let _ = reply.send(self.inner.open_stream(registry, priority).map(Outcome::Stream));
                    continue;
                }
                Command::CloseStream(h, reply) => {
                    let r = self.inner.close_stream(registry, h).map(|()| Outcome::Done);
                    if let Some(reply) = reply {
                        let _ = reply.send(r);
                    }
                    continue;
                }
                _ => continue,
            };
            if let Some(reply) = reply {
                self.waiting.insert(token, reply);
            }
        }
    }

    /// Passes results, messages and state changes to whoever waits for them.
    fn hand_out(&mut self) {
        if let Some(r) = self.inner.poll_connected() {
            if let Some(first) = self.first.take() {
                let _ = first.send(r.map_err(|e| self.inner.error(e)));
            }
        }
        while let Some((token, r)) = self.inner.poll_completion() {
            if let Some(reply) = self.waiting.remove(&token) {
                let _ = reply.send(r.map_err(|e| self.inner.error(e)));
            }
        }
        while let Some(m) = self.inner.hand_message() {
            // Fails only once the application dropped its receiver: nobody wants them.
            let _ = self.messages.send(m);
        }
        while let Some(state) = self.inner.poll_state_change() {
            if let Ok(mut s) = self.shared.state.lock() {
                *s = state.clone();
            }
            if let Ok(mut w) = self.shared.watchers.lock() {
                w.retain(|tx| tx.send(state.clone()).is_ok());
            }
        }
    }
}

/// Where a command's result would go.
fn reply_of(command: Command) -> Option<Reply> {
    match command {
        Command::Publish(_, r)
        | Command::Subscribe(_, r)
        | Command::Unsubscribe(_, r)
        | Command::OpenStream(_, r)
        | Command::PublishOn(_, _, r)
        | Command::SubscribeOn(_, _, r)
        | Command::UnsubscribeOn(_, _, r) => Some(r),
        Command::Disconnect(r) | Command::CloseStream(_, r) => r,
        _ => None,
    }
}
