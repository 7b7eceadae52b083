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
//!
//! The module's other files hold what the adapters share besides the driver: `options`
//! ([`ClientOptions`], [`ServerOptions`], [`ServerAddresses`]), `errors` ([`DriverError`],
//! [`ClientError`], [`ServerError`]), `outcome` ([`ConnectionState`], [`Outcome`]) and
//! `backlog` ([`MessageBacklog`]).

mod backlog;
mod errors;
mod options;
mod outcome;

pub use backlog::MessageBacklog;
pub use errors::{ClientError, DriverError, ServerError};
use options::DEFAULT_MESSAGE_BUFFER;
pub use options::{
    for_socket, local_bind_address, pick_address, tls_server_name, ClientOptions, ServerAddresses, ServerOptions,
};
pub use outcome::{ConnectionState, Outcome};

use crate::client::{ClientMachine, StreamCommand, StreamHandle};
use crate::machine::Datagram;
use crate::persist::{ClientRestored, RestoreError, StoreBatch, StoredRecord};
use crate::quic::Transmit;
use crate::session::client::{ClientEvent, CommandError, DisconnectReason, RequestId};
use mqtt_proto::{Publish, ReasonCode, Subscription, TopicFilter};
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// How long a disconnect may take to deliver DISCONNECT and close before the driver gives up.
const LINGER: Duration = Duration::from_secs(2);

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
    /// See [`ClientDriver::open_stream`].
    OpenStream(i32, T),
    /// See [`ClientDriver::publish_on`].
    PublishOn(StreamHandle, Publish, T),
    /// See [`ClientDriver::subscribe_on`].
    SubscribeOn(StreamHandle, Vec<Subscription>, T),
    /// See [`ClientDriver::unsubscribe_on`].
    UnsubscribeOn(StreamHandle, Vec<TopicFilter>, T),
    /// See [`ClientDriver::close_stream`].
    CloseStream(StreamHandle, Option<T>),
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
    /// Why the client store failed, once it has: the client stops, and its waiting callers
    /// get this.
    store_failed: Option<String>,
    /// An unreachable broker on the first connection is retried like a lost connection (see
    /// [`ClientDriver::retry_first_connection`]).
    retry_first: bool,
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
            store_failed: None,
            retry_first: false,
        }
    }

    /// Keeps trying the first connection while no broker can be reached (a device that boots
    /// before its network), with the machine's reconnect backoff: the first connection's
    /// outcome then waits for a broker's answer. A broker's refusal (CONNACK with an error)
    /// and a failed store are still reported at once. Adapters pass
    /// [`ClientOptions::retry_first_connection`]; it needs a reconnect policy.
    pub fn retry_first_connection(mut self, retry: bool) -> ClientDriver<T> {
        self.retry_first = retry;
        self
    }

    /// Takes the session's state from a client store before [`ClientDriver::start`] (see
    /// [`ClientSession::restore`](crate::session::client::ClientSession::restore)); then hand
    /// every batch of [`ClientDriver::poll_store`] to the store, and report what is written
    /// with [`ClientDriver::handle_stored`] (or [`ClientDriver::handle_store_failed`]).
    pub fn restore(&mut self, now: Instant, records: Vec<StoredRecord>) -> Result<ClientRestored, RestoreError> {
        self.machine.restore(now, records)
    }

    /// With a store: the next batch of changes to write; poll it after every input, like the
    /// other outputs.
    #[must_use]
    pub fn poll_store(&mut self, now: Instant) -> Option<StoreBatch> {
        self.machine.poll_store(now)
    }

    /// Batches up to `seq` are stored: output that waited for them goes out.
    pub fn handle_stored(&mut self, now: Instant, seq: u64) {
        self.machine.handle_stored(now, seq);
        self.update(now);
    }

    /// The store failed (`reason`: one line naming the file and what to do): nothing can be
    /// kept any more, so the client stops as if disconnected, with an error DISCONNECT (the
    /// broker publishes the will). Waiting callers, and the first connection if it is still
    /// pending, fail with [`DriverError::Store`].
    pub fn handle_store_failed(&mut self, now: Instant, reason: &str) {
        if self.store_failed.is_some() {
            return;
        }
        let text = format!("the client store failed: {reason}");
        self.store_failed = Some(text.clone());
        self.fail_first_now(now, DriverError::Store(text.clone()));
        if self.leaving.is_none() {
            let _ = self.machine.disconnect(now, ReasonCode::UnspecifiedError);
            self.leaving = Some((Vec::new(), now + LINGER));
        }
        self.last_reason = text.clone();
        self.set_state(ConnectionState::Closed { reason: text });
        self.update(now);
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
            self.fail_first_now(now, DriverError::Unreachable(e.to_string()));
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

    /// Opens a data stream with send `priority` (see "Data streams" in [`crate::client`]):
    /// the handle is there at once, its QUIC stream opens once connected, and over a byte
    /// stream the handle's traffic goes on the one stream. ([`Command::OpenStream`] completes
    /// with [`Outcome::Stream`].)
    pub fn open_stream(&mut self, now: Instant, priority: i32) -> Result<StreamHandle, DriverError> {
        if self.leaving.is_some() {
            return Err(DriverError::Closed);
        }
        let r = self.machine.open_stream(now, priority).map_err(DriverError::from);
        self.update(now);
        r
    }

    /// Publishes on a data stream; completes as [`ClientDriver::publish`] does, or with
    /// [`DriverError::ConnectionLost`] for a QoS 2 message whose stream ended under it (see
    /// [`ClientEvent::Aborted`]).
    pub fn publish_on(&mut self, now: Instant, handle: StreamHandle, publish: Publish, token: T) {
        let r = self.machine.publish_on(now, handle, publish);
        self.track(r, token);
        self.update(now);
    }

    /// Subscribes on a data stream (its deliveries travel on it); completes with SUBACK's
    /// codes.
    pub fn subscribe_on(&mut self, now: Instant, handle: StreamHandle, subscriptions: Vec<Subscription>, token: T) {
        let r = self.machine.subscribe_on(now, handle, subscriptions, None);
        self.track(r, token);
        self.update(now);
    }

    /// Unsubscribes on a data stream; completes with UNSUBACK's codes.
    pub fn unsubscribe_on(&mut self, now: Instant, handle: StreamHandle, filters: Vec<TopicFilter>, token: T) {
        let r = self.machine.unsubscribe_on(now, handle, filters);
        self.track(r, token);
        self.update(now);
    }

    /// Closes a data stream (see [`ClientMachine::close_stream`]): its pending requests
    /// complete with [`DriverError::ConnectionLost`]. ([`Command::CloseStream`]'s token
    /// completes with [`Outcome::Done`], or the error for a handle already closed.)
    pub fn close_stream(&mut self, now: Instant, handle: StreamHandle) -> Result<(), DriverError> {
        let r = self.machine.close_stream(now, handle).map_err(DriverError::from);
        self.update(now);
        r
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
            Some(Command::OpenStream(priority, t)) => {
                let r = self.open_stream(now, priority).map(Outcome::Stream);
                self.done.push_back((t, r));
            }
            Some(Command::PublishOn(h, p, t)) => self.publish_on(now, h, p, t),
            Some(Command::SubscribeOn(h, s, t)) => self.subscribe_on(now, h, s, t),
            Some(Command::UnsubscribeOn(h, f, t)) => self.unsubscribe_on(now, h, f, t),
            Some(Command::CloseStream(h, t)) => {
                let r = self.close_stream(now, h).map(|()| Outcome::Done);
                self.done.extend(t.map(|t| (t, r)));
            }
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
    /// reason; the first connection's failure is reported with it (with several brokers, once
    /// every one failed).
    pub fn handle_stream_failed(&mut self, now: Instant, reason: &str) {
        self.machine.handle_stream_failed(now, reason);
        self.update(now);
    }

    /// Over QUIC: the answer to a [`StreamCommand::Resolve`] (see
    /// [`ClientMachine::handle_resolved`]).
    pub fn handle_resolved(
        &mut self,
        now: Instant,
        url: &crate::url::BrokerUrl,
        result: Result<std::net::SocketAddr, String>,
    ) {
        self.machine.handle_resolved(now, url, result);
        self.update(now);
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

    /// Messages received and not yet taken with [`ClientDriver::poll_message`] (what the
    /// adapter has handed on but the application has not taken counts in the
    /// [`MessageBacklog`] instead; [`ClientDriver::is_reading`] weighs both).
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
            let error = || self.store_failed.clone().map_or(DriverError::Closed, DriverError::Store);
            self.done.extend(waiting.into_values().map(|t| (t, Err(error()))));
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
        if self.retry_first && matches!(error, DriverError::Unreachable(_)) && self.store_failed.is_none() {
            self.last_reason = error.to_string();
            return;
        }
        self.fail_first_now(now, error);
    }

    /// [`ClientDriver::fail_first`] whatever the retry setting says.
    fn fail_first_now(&mut self, now: Instant, error: DriverError) {
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
                    let text = match (&reason, self.machine.last_failure()) {
                        (DisconnectReason::TransportLost | DisconnectReason::ConnectTimeout, Some(why)) => {
                            why.to_string()
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
