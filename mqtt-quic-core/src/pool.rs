//! Many MQTT clients over one QUIC endpoint: one UDP socket can carry thousands of client
//! connections, each with its own session. The load generator uses it; so can a gateway that
//! speaks for many devices. Clients are numbered in the order they are added.
//!
//! There is no reconnecting here: a client whose connection ends stays down (its events say
//! so), which is what a load generator wants to count.

use crate::config::{ClientConfig, ConfigError};
use crate::machine::Datagram;
use crate::quic::{self, CloseReason, ConnId, QuicEndpoint, Transmit};
use crate::session::client::{ClientEvent, ClientSession, ClientSessionConfig, CommandError, RequestId};
use crate::timers::TimerIndex;
use mqtt_proto::{Publish, ReasonCode, Subscription};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::time::Instant;

/// A client of the pool, by the order it was added.
pub type ClientIndex = usize;

struct Member {
    session: ClientSession,
    conn: Option<ConnId>,
    /// Why its last QUIC connection ended, if one did.
    closed: Option<CloseReason>,
}

/// Client sessions multiplexed on one QUIC client endpoint. Driven like any [`Machine`](crate::Machine);
/// events come tagged with the client they concern.
pub struct ClientPool {
    quic: QuicEndpoint,
    members: Vec<Member>,
    by_conn: BTreeMap<ConnId, ClientIndex>,
    server: SocketAddr,
    server_name: String,
    timers: TimerIndex<ClientIndex>,
    /// Members with bytes or events to move.
    dirty: BTreeSet<ClientIndex>,
    events: VecDeque<(ClientIndex, ClientEvent)>,
}

impl ClientPool {
    /// A pool whose clients connect to `server`, checking its certificate for `server_name`.
    /// `mqtt_keep_alive` (seconds) is the keep-alive its clients will use: QUIC pings keep
    /// connections open when the QUIC idle timeout is shorter (as for [`ClientMachine`](crate::client::ClientMachine)).
    pub fn new(
        config: &ClientConfig,
        server: SocketAddr,
        server_name: &str,
        mqtt_keep_alive: u16,
    ) -> Result<ClientPool, ConfigError> {
        let mut config = config.clone();
        crate::client::keep_quic_alive(&mut config, mqtt_keep_alive);
        Ok(ClientPool {
            quic: QuicEndpoint::client(&config)?,
            members: Vec::new(),
            by_conn: BTreeMap::new(),
            server,
            server_name: server_name.to_string(),
            timers: TimerIndex::new(),
            dirty: BTreeSet::new(),
            events: VecDeque::new(),
        })
    }

    /// Adds a client and starts its connection; CONNECT goes out with the handshake.
    pub fn add(&mut self, now: Instant, session: ClientSessionConfig) -> Result<ClientIndex, ConfigError> {
        let mut session = ClientSession::new(session)?;
        let conn =
            self.quic.connect(now, self.server, &self.server_name).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let _ = session.connect(now);
        let i = self.members.len();
        self.members.push(Member { session, conn: Some(conn), closed: None });
        self.by_conn.insert(conn, i);
        self.dirty.insert(i);
        self.pump(now);
        Ok(i)
    }

    /// Why client `i`'s QUIC connection ended (a certificate the client rejected, a handshake
    /// timeout...), once it has: the session's own event only says the transport was lost.
    pub fn close_reason(&self, i: ClientIndex) -> Option<&CloseReason> {
        self.members.get(i)?.closed.as_ref()
    }

    /// Clients added.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether no client was added.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Whether client `i`'s session is connected.
    pub fn is_connected(&self, i: ClientIndex) -> bool {
        self.members.get(i).is_some_and(|m| m.session.is_connected())
    }

    /// Bytes client `i` has queued that QUIC has not taken yet (back-pressure for senders).
    pub fn queued(&self, i: ClientIndex) -> usize {
        self.members.get(i).and_then(|m| m.conn).map_or(0, |c| self.quic.queued(c))
    }

    /// Client `i`'s QoS 1 and 2 publishes in flight or waiting.
    pub fn pending(&self, i: ClientIndex) -> usize {
        self.members.get(i).map_or(0, |m| m.session.pending_publishes())
    }

    /// Publishes from client `i` (see [`ClientSession::publish`]).
    pub fn publish(&mut self, now: Instant, i: ClientIndex, publish: Publish) -> Result<RequestId, CommandError> {
        let m = self.members.get_mut(i).ok_or(CommandError::NotConnected)?;
        let id = m.session.publish(now, publish)?;
        self.dirty.insert(i);
        self.pump(now);
        Ok(id)
    }

    /// Subscribes client `i`.
    pub fn subscribe(
        &mut self,
        now: Instant,
        i: ClientIndex,
        subs: Vec<Subscription>,
    ) -> Result<RequestId, CommandError> {
        let m = self.members.get_mut(i).ok_or(CommandError::NotConnected)?;
        let id = m.session.subscribe(now, subs, None)?;
        self.dirty.insert(i);
        self.pump(now);
        Ok(id)
    }

    /// Disconnects client `i` normally.
    pub fn disconnect(&mut self, now: Instant, i: ClientIndex) -> Result<(), CommandError> {
        let m = self.members.get_mut(i).ok_or(CommandError::NotConnected)?;
        m.session.disconnect(now, ReasonCode::Success)?;
        self.dirty.insert(i);
        self.pump(now);
        Ok(())
    }

    /// The next event, with the client it concerns.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<(ClientIndex, ClientEvent)> {
        self.events.pop_front()
    }

    /// Moves bytes between QUIC and the sessions, and collects events, until quiet.
    fn pump(&mut self, now: Instant) {
        loop {
            while let Some(event) = self.quic.poll_event() {
                match event {
                    quic::Event::Received { conn, data } => {
                        if let Some(&i) = self.by_conn.get(&conn) {
                            self.members[i].session.handle_stream_data(now, &data);
                            self.dirty.insert(i);
                        }
                    }
                    quic::Event::Closed { conn, reason } => {
                        if let Some(i) = self.by_conn.remove(&conn) {
                            self.members[i].conn = None;
                            self.members[i].closed = Some(reason);
                            self.members[i].session.handle_stream_closed(now);
                            self.dirty.insert(i);
                        }
                    }
                    _ => {}
                }
            }
            let Some(i) = self.dirty.pop_first() else { break };
            let m = &mut self.members[i];
            while let Some(bytes) = m.session.poll_transmit() {
                if let Some(conn) = m.conn {
                    let _ = self.quic.send(now, conn, bytes);
                }
            }
            while let Some(event) = m.session.poll_event() {
                let over = matches!(event, ClientEvent::Disconnected { .. } | ClientEvent::Refused { .. });
                if over {
                    if let Some(conn) = m.conn.take() {
                        self.by_conn.remove(&conn);
                        let _ = self.quic.finish(now, conn);
                    }
                }
                self.events.push_back((i, event));
            }
            self.timers.set(i, m.session.poll_timeout());
        }
    }
}

/// The [`Machine`](crate::Machine) interface, as inherent methods (the trait forwards to them).
impl ClientPool {
    /// Feeds one received UDP datagram (see [`Machine::handle_datagram`](crate::Machine::handle_datagram)).
    pub fn handle_datagram(&mut self, now: Instant, datagram: Datagram<'_>) {
        self.quic.handle_datagram(now, datagram);
        self.pump(now);
    }

    /// Advances timers; early calls do nothing.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.quic.handle_timeout(now);
        while let Some(i) = self.timers.pop_due(now) {
            self.members[i].session.handle_timeout(now);
            self.dirty.insert(i);
        }
        self.pump(now);
    }

    /// The next datagram to send, written into `buf`.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        self.poll_transmit_batch(now, 1, buf)
    }

    /// Up to `max_datagrams` datagrams to one destination at once (see [`Machine::poll_transmit_batch`](crate::Machine::poll_transmit_batch)).
    #[must_use]
    pub fn poll_transmit_batch(&mut self, now: Instant, max_datagrams: usize, buf: &mut Vec<u8>) -> Option<Transmit> {
        let t = self.quic.poll_transmit_batch(now, max_datagrams, buf);
        self.pump(now);
        t
    }

    /// When to call `handle_timeout` next.
    #[must_use]
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        [self.quic.poll_timeout(), self.timers.next()].into_iter().flatten().min()
    }
}

crate::machine::forward_machine!(ClientPool);
