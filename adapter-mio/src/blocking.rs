//! A blocking client: a [`MioClient`] in a private `Poll` on the caller's thread, for code that
//! has no event loop (and wants no thread either: [`crate::client::Client`] is the threaded
//! one, with the other adapters' methods).
//!
//! ```no_run
//! use adapter_mio::blocking::Client;
//! use mqtt_proto::{Publish, QoS, TopicFilter, TopicName};
//! use mqtt_quic_core::driver::ClientOptions;
//! use mqtt_quic_core::tls::ClientTls;
//! use std::time::Duration;
//!
//! let options = ClientOptions::new().client_id("sensor-7").tls(ClientTls::insecure());
//! let mut client = Client::connect("quic://127.0.0.1:14567", options)?;
//! client.subscribe(TopicFilter::new("commands/#")?, QoS::AtLeastOnce)?;
//! client.publish(Publish::new(TopicName::new("sensors/7")?, "21.5").with_qos(QoS::AtLeastOnce))?;
//! if let Some(m) = client.recv(Duration::from_secs(1))? {
//!     println!("{}: {:?}", m.topic, m.payload);
//! }
//! client.disconnect()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::client::{MioClient, OwnConnection, RequestToken, StreamHandle};
use crate::now;
use mio::{Events, Poll, Token};
use mqtt_proto::{Publish, QoS, ReasonCode, Subscription, TopicFilter};
use mqtt_quic_core::driver::{ClientError, ClientOptions, ConnectionState, DriverError, Outcome};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How long a blocking call waits for its acknowledgement.
const PATIENCE: Duration = Duration::from_secs(30);

/// A connected client whose calls block until acknowledged.
pub struct Client {
    poll: Poll,
    events: Events,
    inner: MioClient,
    /// Completions that arrived while waiting for another.
    early: VecDeque<(RequestToken, Result<Outcome, DriverError>)>,
    /// Messages that arrived while waiting for something else. Taken from the machine at every
    /// turn, so that waiting for an acknowledgement never stops the reading that brings it
    /// (the queue grows instead, as it always has here: [`Client::recv`] takes from it).
    inbox: VecDeque<Publish>,
}

impl Client {
    /// Connects and returns once the broker accepted (CONNACK), or with why it did not.
    pub fn connect(url: &str, options: ClientOptions) -> Result<Client, ClientError> {
        Client::connect_urls([url], options)
    }

    /// Connects to the first of several brokers that answers, in order, keeping one MQTT
    /// session across them (see [`MioClient::connect_urls`](crate::client::MioClient::connect_urls)).
    pub fn connect_urls<S: AsRef<str>>(
        urls: impl IntoIterator<Item = S>,
        options: ClientOptions,
    ) -> Result<Client, ClientError> {
        let poll = Poll::new()?;
        let inner = MioClient::connect_urls(urls, options, poll.registry(), Token(0))?;
        Client::connected(poll, inner)
    }

    /// Connects over a connection the application opens itself (`Read + Write`: a Unix
    /// socket, a serial line, a tunnel; see [`OwnConnection`]), opened again on each
    /// reconnect; see [`MioClient::connect_with`].
    ///
    /// ```no_run
    /// use adapter_mio::blocking::Client;
    /// use mqtt_quic_core::driver::ClientOptions;
    /// use std::os::unix::net::UnixStream;
    /// let client = Client::connect_with("unix:/run/mqtt.sock", ClientOptions::new(), || {
    ///     UnixStream::connect("/run/mqtt.sock")
    /// })?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn connect_with<F, C>(name: &str, options: ClientOptions, connect: F) -> Result<Client, ClientError>
    where
        F: Fn() -> std::io::Result<C> + Send + 'static,
        C: OwnConnection,
    {
        let poll = Poll::new()?;
        let inner = MioClient::connect_with(name, options, poll.registry(), Token(0), connect)?;
        Client::connected(poll, inner)
    }

    /// Drives a starting client until the broker accepts it (or refuses).
    fn connected(poll: Poll, inner: MioClient) -> Result<Client, ClientError> {
        let mut c =
            Client { poll, events: Events::with_capacity(256), inner, early: VecDeque::new(), inbox: VecDeque::new() };
        let deadline = now() + PATIENCE;
        loop {
            if let Some(r) = c.inner.poll_connected() {
                return match r {
                    Ok(_) => Ok(c),
                    Err(e) => Err(c.inner.error(e)),
                };
            }
            c.turn(deadline)?;
            if now() >= deadline {
                return Err(c.inner.error(DriverError::Unreachable("no answer from the broker".into())));
            }
        }
    }

    /// One round of the loop: wait for events or the next deadline (at most until `deadline`).
    fn turn(&mut self, deadline: Instant) -> Result<(), ClientError> {
        let left = deadline.saturating_duration_since(now());
        let wait = self.inner.timeout().map_or(left, |t| t.min(left));
        match self.poll.poll(&mut self.events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
        for event in self.events.iter() {
            self.inner.handle_event(self.poll.registry(), event);
        }
        self.inner.handle_timeout(self.poll.registry());
        while let Some(m) = self.inner.poll_message() {
            self.inbox.push_back(m);
        }
        Ok(())
    }

    /// Runs the loop until `token` completes.
    fn wait(&mut self, token: RequestToken) -> Result<Outcome, ClientError> {
        let deadline = now() + PATIENCE;
        loop {
            while let Some((t, r)) = self.inner.poll_completion() {
                self.early.push_back((t, r));
            }
            if let Some(i) = self.early.iter().position(|(t, _)| *t == token) {
                let (_, r) = self.early.remove(i).unwrap_or((token, Err(DriverError::Closed)));
                return r.map_err(|e| self.inner.error(e));
            }
            if now() >= deadline {
                return Err(ClientError::ConnectionLost);
            }
            self.turn(deadline)?;
        }
    }

    /// Publishes and returns when done (QoS 0 written, QoS 1 PUBACK, QoS 2 PUBCOMP).
    pub fn publish(&mut self, publish: Publish) -> Result<(), ClientError> {
        let t = self.inner.publish(self.poll.registry(), publish);
        self.wait(t).map(drop)
    }

    /// Subscribes to one filter; returns the granted QoS on SUBACK, or
    /// [`ClientError::Rejected`] with the broker's failure code (see [`Outcome::granted_qos`]).
    pub fn subscribe(&mut self, filter: TopicFilter, qos: QoS) -> Result<QoS, ClientError> {
        let t = self.inner.subscribe(self.poll.registry(), vec![Subscription::new(filter, qos)]);
        self.wait(t)?.granted_qos()
    }

    /// Subscribes to several filters at once; returns SUBACK's code for each.
    pub fn subscribe_many(&mut self, subscriptions: Vec<Subscription>) -> Result<Vec<ReasonCode>, ClientError> {
        let t = self.inner.subscribe(self.poll.registry(), subscriptions);
        Ok(self.wait(t)?.into_codes())
    }

    /// Unsubscribes; returns UNSUBACK's codes (empty for MQTT 3.1.1).
    pub fn unsubscribe(&mut self, filters: Vec<TopicFilter>) -> Result<Vec<ReasonCode>, ClientError> {
        let t = self.inner.unsubscribe(self.poll.registry(), filters);
        Ok(self.wait(t)?.into_codes())
    }

    /// Opens a data stream (EMQX's multi-stream mode) with send `priority`; see
    /// [`MioClient::open_stream`]. Use the handle with [`Client::publish_on`] and its siblings
    /// (this client is used through `&mut`, so its streams are handles rather than objects).
    pub fn open_stream(&mut self, priority: i32) -> Result<StreamHandle, ClientError> {
        self.inner.open_stream(self.poll.registry(), priority)
    }

    /// Publishes on a data stream and returns when done, as [`Client::publish`] does.
    pub fn publish_on(&mut self, stream: StreamHandle, publish: Publish) -> Result<(), ClientError> {
        let t = self.inner.publish_on(self.poll.registry(), stream, publish);
        self.wait(t).map(drop)
    }

    /// Subscribes to one filter on a data stream (its messages are delivered on it); returns
    /// the granted QoS, as [`Client::subscribe`] does.
    pub fn subscribe_on(&mut self, stream: StreamHandle, filter: TopicFilter, qos: QoS) -> Result<QoS, ClientError> {
        let t = self.inner.subscribe_on(self.poll.registry(), stream, vec![Subscription::new(filter, qos)]);
        self.wait(t)?.granted_qos()
    }

    /// Unsubscribes on a data stream; returns UNSUBACK's codes.
    pub fn unsubscribe_on(
        &mut self,
        stream: StreamHandle,
        filters: Vec<TopicFilter>,
    ) -> Result<Vec<ReasonCode>, ClientError> {
        let t = self.inner.unsubscribe_on(self.poll.registry(), stream, filters);
        Ok(self.wait(t)?.into_codes())
    }

    /// Closes a data stream (see [`MioClient::close_stream`]).
    pub fn close_stream(&mut self, stream: StreamHandle) -> Result<(), ClientError> {
        self.inner.close_stream(self.poll.registry(), stream)
    }

    /// The next message, waiting at most `timeout`; `None` if none came.
    pub fn recv(&mut self, timeout: Duration) -> Result<Option<Publish>, ClientError> {
        let deadline = now() + timeout;
        loop {
            if let Some(m) = self.inbox.pop_front().or_else(|| self.inner.poll_message()) {
                return Ok(Some(m));
            }
            if now() >= deadline {
                return Ok(None);
            }
            self.turn(deadline)?;
        }
    }

    /// The connection state.
    pub fn state(&self) -> &ConnectionState {
        self.inner.state()
    }

    /// Disconnects cleanly and waits for the connection to close.
    pub fn disconnect(mut self) -> Result<(), ClientError> {
        let t = self.inner.disconnect(self.poll.registry());
        let deadline = now() + PATIENCE;
        while !self.inner.is_done(self.poll.registry()) && now() < deadline {
            self.turn(deadline)?;
        }
        while let Some((token, r)) = self.inner.poll_completion() {
            if token == t {
                r.map_err(|e| self.inner.error(e))?;
            }
        }
        Ok(())
    }
}
