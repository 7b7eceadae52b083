//! The MQTT-over-QUIC client machine: a QUIC client endpoint, one MQTT session on its stream,
//! and the reconnect policy. Adapters drive it through [`Machine`] and forward commands.

use crate::backoff::Backoff;
use crate::config::{ClientConfig, ConfigError};
use crate::machine::Machine;
use crate::quic::{self, ConnId, QuicEndpoint, Transmit};
use crate::session::client::{
    ClientEvent, ClientSession, ClientSessionConfig, CommandError, DisconnectReason, RequestId,
};
use crate::EcnCodepoint;
use mqtt_proto::{Publish, ReasonCode, Subscription, SubscriptionId, TopicFilter};
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// When and how fast to reconnect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconnectPolicy {
    /// Upper bound of the first delay.
    pub initial: Duration,
    /// Upper bound of any delay.
    pub max: Duration,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        ReconnectPolicy { initial: Duration::from_millis(200), max: Duration::from_secs(30) }
    }
}

/// Settings of a client machine.
#[derive(Debug, Clone)]
pub struct MqttClientConfig {
    /// QUIC and TLS.
    pub quic: ClientConfig,
    /// MQTT session.
    pub session: ClientSessionConfig,
    /// The broker's address.
    pub server: SocketAddr,
    /// The name its certificate is checked against.
    pub server_name: String,
    /// Reconnect after a lost connection; `None` stays disconnected.
    pub reconnect: Option<ReconnectPolicy>,
}

/// A client machine: [`ClientSession`] over [`QuicEndpoint`], reconnecting by itself.
pub struct MqttClient {
    quic: QuicEndpoint,
    session: ClientSession,
    conn: Option<ConnId>,
    server: SocketAddr,
    server_name: String,
    reconnect: Option<ReconnectPolicy>,
    backoff: Backoff,
    reconnect_at: Option<Instant>,
    stopped: bool,
    events: VecDeque<ClientEvent>,
}

impl MqttClient {
    /// A machine, not yet connected.
    pub fn new(mut config: MqttClientConfig) -> Result<MqttClient, ConfigError> {
        let policy = config.reconnect.unwrap_or_default();
        // A QUIC idle timeout shorter than the MQTT keep-alive would cut a quiet but healthy
        // session; unless told otherwise, QUIC pings at half the idle timeout keep it open.
        let t = &mut config.quic.transport;
        let mqtt_keep_alive = Duration::from_secs(u64::from(config.session.keep_alive));
        if t.keep_alive.is_none() && !mqtt_keep_alive.is_zero() && mqtt_keep_alive >= t.idle_timeout {
            t.keep_alive = Some(t.idle_timeout / 2);
        }
        Ok(MqttClient {
            quic: QuicEndpoint::client(&config.quic)?,
            session: ClientSession::new(config.session)?,
            conn: None,
            server: config.server,
            server_name: config.server_name,
            reconnect: config.reconnect,
            backoff: Backoff::new(policy.initial, policy.max, config.quic.seed ^ 0x5EED),
            reconnect_at: None,
            stopped: false,
            events: VecDeque::new(),
        })
    }

    /// Opens the connection (CONNECT travels in 0-RTT when a ticket allows).
    pub fn start(&mut self, now: Instant) -> Result<(), quic::CommandError> {
        self.stopped = false;
        self.open(now)
    }

    fn open(&mut self, now: Instant) -> Result<(), quic::CommandError> {
        self.reconnect_at = None;
        let conn = self.quic.connect(now, self.server, &self.server_name)?;
        self.conn = Some(conn);
        // The session is idle after a lost connection; `connect` cannot fail then.
        let _ = self.session.connect(now);
        self.flush(now);
        Ok(())
    }

    /// Whether the MQTT session is connected.
    pub fn is_connected(&self) -> bool {
        self.session.is_connected()
    }

    /// The session (for inspection).
    pub fn session(&self) -> &ClientSession {
        &self.session
    }

    /// See [`ClientSession::publish`].
    pub fn publish(&mut self, now: Instant, publish: Publish) -> Result<RequestId, CommandError> {
        let id = self.session.publish(now, publish)?;
        self.flush(now);
        Ok(id)
    }

    /// See [`ClientSession::subscribe`].
    pub fn subscribe(
        &mut self,
        now: Instant,
        subscriptions: Vec<Subscription>,
        subscription_id: Option<SubscriptionId>,
    ) -> Result<RequestId, CommandError> {
        let id = self.session.subscribe(now, subscriptions, subscription_id)?;
        self.flush(now);
        Ok(id)
    }

    /// See [`ClientSession::unsubscribe`].
    pub fn unsubscribe(&mut self, now: Instant, filters: Vec<TopicFilter>) -> Result<RequestId, CommandError> {
        let id = self.session.unsubscribe(now, filters)?;
        self.flush(now);
        Ok(id)
    }

    /// Disconnects for good (no reconnect): DISCONNECT, then the stream is finished.
    pub fn disconnect(&mut self, now: Instant, reason: ReasonCode) -> Result<(), CommandError> {
        self.stopped = true;
        self.reconnect_at = None;
        self.session.disconnect(now, reason)?;
        self.flush(now);
        Ok(())
    }

    /// Drops the current connection as if the network had failed (tests and "switch network now").
    pub fn drop_connection(&mut self, now: Instant) {
        if let Some(conn) = self.conn.take() {
            let _ = self.quic.close(now, conn, quic::close_code::NORMAL, "dropped");
            self.session.connection_lost(now);
            self.after_loss(now);
        }
        self.pump(now);
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// Moves session bytes onto the stream.
    fn flush(&mut self, now: Instant) {
        while let Some(bytes) = self.session.poll_transmit() {
            if let Some(conn) = self.conn {
                let _ = self.quic.send(now, conn, bytes);
            }
        }
        self.pump(now);
    }

    fn after_loss(&mut self, now: Instant) {
        if let (Some(_), false) = (self.reconnect, self.stopped) {
            self.reconnect_at = Some(now + self.backoff.next_delay());
        }
    }

    /// Runs the exchange between the QUIC machine and the session until both are quiet.
    fn pump(&mut self, now: Instant) {
        loop {
            let mut progressed = false;
            while let Some(event) = self.quic.poll_event() {
                progressed = true;
                match event {
                    quic::Event::Received { conn, data } if Some(conn) == self.conn => {
                        self.session.handle_bytes(now, &data);
                    }
                    quic::Event::Closed { conn, .. } if Some(conn) == self.conn => {
                        self.conn = None;
                        self.session.connection_lost(now);
                        self.after_loss(now);
                    }
                    _ => {}
                }
            }
            while let Some(bytes) = self.session.poll_transmit() {
                progressed = true;
                if let Some(conn) = self.conn {
                    let _ = self.quic.send(now, conn, bytes);
                }
            }
            while let Some(event) = self.session.poll_event() {
                progressed = true;
                let ended = match &event {
                    ClientEvent::Connected { .. } => {
                        self.backoff.reset();
                        false
                    }
                    // A lost transport was handled where it was noticed.
                    ClientEvent::Disconnected { reason } => *reason != DisconnectReason::TransportLost,
                    ClientEvent::Refused { .. } => true,
                    _ => false,
                };
                if ended {
                    // The session is over on this connection: end the stream after what the
                    // session wrote last (DISCONNECT), and come back later unless stopped.
                    if let Some(conn) = self.conn.take() {
                        let _ = self.quic.finish(now, conn);
                    }
                    self.session.connection_lost(now);
                    self.after_loss(now);
                }
                self.events.push_back(event);
            }
            if !progressed {
                break;
            }
        }
    }
}

impl Machine for MqttClient {
    fn handle_datagram(
        &mut self,
        now: Instant,
        remote: SocketAddr,
        local_ip: Option<IpAddr>,
        ecn: Option<EcnCodepoint>,
        data: &[u8],
    ) {
        self.quic.handle_datagram(now, remote, local_ip, ecn, data);
        self.pump(now);
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.quic.handle_timeout(now);
        self.session.handle_timeout(now);
        self.pump(now);
        if self.reconnect_at.is_some_and(|t| t <= now) && !self.stopped && self.open(now).is_err() {
            self.after_loss(now);
        }
    }

    fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        let t = self.quic.poll_transmit(now, buf);
        self.pump(now);
        t
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        [self.quic.poll_timeout(), self.session.poll_timeout(), self.reconnect_at].into_iter().flatten().min()
    }
}
