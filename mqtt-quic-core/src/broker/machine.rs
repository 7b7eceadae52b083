//! The broker machine: a QUIC server endpoint, one server session per connection, and the
//! state that outlives connections (subscriptions, retained messages, kept sessions, wills).
//! An application embedding it can subscribe and publish in-process
//! ([`Broker::subscribe_local`], [`Broker::publish_local`]) without a connection.

use super::auth::{Auth, AuthId, AuthRequest, AuthVerdict};
use super::limiter::FailureLimiter;
use super::retained::RetainedStore;
use super::router::{Entry, Router, SessionKey};
use crate::config::{invalid, ConfigError, ServerConfig, MAX_DURATION};
use crate::machine::Machine;
use crate::quic::{self, ConnId, QuicEndpoint, Transmit};
use crate::session::server::{message_cost, EndReason, ServerEvent, ServerSession, ServerSessionConfig, SessionState};
use crate::timers::TimerIndex;
use crate::EcnCodepoint;
use bytes::Bytes;
use mqtt_proto::{
    Connect, PacketId, Protocol, Publish, PublishProperties, QoS, QosPid, ReasonCode, RetainHandling, Subscription,
    SubscriptionId, TopicFilter, Will,
};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Settings of a broker.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// QUIC and TLS.
    pub quic: ServerConfig,
    /// Per-connection session limits.
    pub session: ServerSessionConfig,
    /// Most retained messages kept.
    pub max_retained: usize,
    /// Most messages queued for an offline client with a kept session. Beyond it new messages
    /// for that client are dropped (the oldest are kept: they are the ones it missed first).
    pub max_offline_queue: usize,
    /// Longest session expiry granted, in seconds.
    pub max_session_expiry: u32,
    /// Most subscriptions one client may hold; more are refused with Quota exceeded (0x97).
    pub max_subscriptions_per_client: usize,
    /// Most levels in a topic name or filter; deeper ones are refused (0x90 / 0x8F). Applies to
    /// every topic that enters the broker: PUBLISH, wills (at CONNECT), in-process publishes,
    /// and so to everything retained.
    pub max_topic_levels: usize,
    /// Longest topic name or filter, in bytes; longer ones are refused like deeper ones.
    pub max_topic_length: usize,
    /// Most bytes of retained messages (topic, payload and properties); a retained PUBLISH
    /// beyond it is refused with Quota exceeded (0x97).
    pub max_retained_bytes: usize,
    /// Most sessions kept, connected or not; a CONNECT that would create one more is refused
    /// with Quota exceeded (0x97; Server unavailable for MQTT 3.1.1). Reconnecting to an
    /// existing session is always possible.
    pub max_sessions: usize,
    /// Most bytes of messages queued for offline sessions, all together; beyond it new QoS 1
    /// and 2 messages for offline clients are dropped (counted as dropped).
    pub max_offline_bytes: usize,
    /// Most bytes waiting to be sent to all connected clients together; beyond it QoS 0
    /// messages are dropped for everyone (each client also has its own limit,
    /// `max_queued_bytes`).
    pub max_total_queued_bytes: usize,
    /// A client whose connection takes none of the bytes waiting for it for this long is
    /// disconnected, and what was queued for it is freed (its session is kept as for any lost
    /// connection).
    pub write_timeout: Duration,
    /// Longest keep-alive a client may use. An MQTT 5 client asking for more, or for none (0),
    /// is told this one in CONNACK (Server Keep Alive); an MQTT 3.1.1 client, which cannot be
    /// told, is refused (Identifier rejected), as mosquitto does. 0 turns the limit off.
    pub max_keepalive: u16,
    /// Password verifications out with the adapter at once, counting those whose client has
    /// gone meanwhile (their hash is being computed all the same); CONNECTs beyond it are
    /// refused with Server busy (0x89).
    pub max_pending_auth: usize,
    /// Of those, how many may come from one address (more get Server busy too), so that one
    /// address cannot take every slot.
    pub max_pending_auth_per_ip: usize,
    /// Failed logins allowed from one address per `auth_failure_window`; beyond it CONNECTs
    /// from that address are refused with Connection rate exceeded (0x9F) without verifying.
    /// 0 turns the limit off.
    pub max_auth_failures: u32,
    /// See `max_auth_failures`.
    pub auth_failure_window: Duration,
    /// Authentication and authorization; `None` lets everyone in and allows everything.
    pub auth: Option<Arc<dyn Auth>>,
    /// How often broker statistics are published under `$SYS/broker/` (retained, QoS 0, like
    /// mosquitto's); `None` turns them off.
    pub sys_interval: Option<Duration>,
    /// Bytes waiting to be sent to one client beyond which QoS 0 messages for it are dropped
    /// (counted in `$SYS/broker/messages/dropped`), as at-most-once allows, so that a client
    /// reading slower than it is sent to cannot make the broker hold an unbounded backlog. QoS 1
    /// and 2 messages are bounded by the session's in-flight window instead; a client whose
    /// backlog still reaches four times this is disconnected. For byte streams the adapter
    /// reports what it has written with [`Broker::stream_written`].
    pub max_queued_bytes: usize,
}

impl BrokerConfig {
    /// Defaults around a QUIC configuration.
    pub fn new(quic: ServerConfig) -> BrokerConfig {
        BrokerConfig {
            quic,
            session: ServerSessionConfig::default(),
            max_retained: 100_000,
            max_offline_queue: 1_000,
            max_session_expiry: 7 * 24 * 3600,
            sys_interval: Some(Duration::from_secs(10)),
            max_subscriptions_per_client: 1_000,
            max_topic_levels: 32,
            max_topic_length: 4096,
            max_retained_bytes: 64 << 20,
            max_sessions: 100_000,
            max_offline_bytes: 256 << 20,
            max_total_queued_bytes: 512 << 20,
            write_timeout: Duration::from_secs(60),
            max_keepalive: u16::MAX,
            max_pending_auth: 64,
            max_pending_auth_per_ip: 8,
            max_auth_failures: 10,
            auth_failure_window: Duration::from_secs(60),
            auth: None,
            max_queued_bytes: 16 << 20,
        }
    }

    /// Checks the settings: durations a deadline is computed from (at most a year, so no
    /// `now + d` can overflow) and limits that must be at least 1.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let durations = [
            ("connect timeout", Some(self.session.connect_timeout)),
            ("retry interval", self.session.retry_interval),
            ("sys interval", self.sys_interval),
            ("write timeout", Some(self.write_timeout)),
            ("auth failure window", Some(self.auth_failure_window)),
        ];
        for (name, d) in durations {
            if d.is_some_and(|d| d.is_zero() || d > MAX_DURATION) {
                return Err(invalid(format!("{name} must be above zero and at most a year")));
            }
        }
        let counts = [
            ("max_topic_levels", self.max_topic_levels),
            ("max_topic_length", self.max_topic_length),
            ("max_sessions", self.max_sessions),
            ("max_pending_auth", self.max_pending_auth),
            ("max_pending_auth_per_ip", self.max_pending_auth_per_ip),
        ];
        for (name, n) in counts {
            if n == 0 {
                return Err(invalid(format!("{name} must be at least 1")));
            }
        }
        Ok(())
    }
}

/// A byte-stream connection the adapter owns (TCP, TLS over TCP), numbered by the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub u64);

/// Where a client is connected: a QUIC connection of the broker's endpoint, or a byte stream
/// the adapter carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peer {
    /// A QUIC connection.
    Quic(ConnId),
    /// A byte stream (TCP or TLS).
    Stream(StreamId),
}

/// What the broker has for a byte-stream connection, from [`Broker::poll_stream`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamOutput {
    /// Bytes to write to the stream.
    Data(Bytes),
    /// The session is over: close the stream (after writing what came before).
    Close,
    /// The client does not take what is sent to it: drop the connection now, with whatever
    /// waits to be written (it would never be read).
    Abort,
}

/// How often expired retained messages are purged.
const HOUSEKEEPING: Duration = Duration::from_secs(60);

/// Session keys from here up belong to in-process subscriptions, not to clients.
const LOCAL_BASE: SessionKey = 1 << 63;

/// A subscription of the application that embeds the broker: it receives messages as
/// [`BrokerEvent::Message`], with no connection involved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LocalSubscription(SessionKey);

/// What the broker reports to the application embedding it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BrokerEvent {
    /// A message matched an in-process subscription. Fires once per message and subscription.
    Message {
        /// The subscription it matched.
        subscription: LocalSubscription,
        /// The message (retained ones have `retain` set).
        publish: Publish,
    },
    /// A client's CONNECT was accepted. Fires once per connection. (For logs: which client,
    /// as whom, from where, over what.)
    ClientConnected {
        /// Its client id (the assigned one, if it sent none).
        client_id: String,
        /// The user name it gave.
        username: Option<String>,
        /// Its connection.
        peer: Peer,
        /// Where it connects from, when known.
        remote: Option<SocketAddr>,
        /// Its MQTT version.
        protocol: Protocol,
        /// Whether it resumed a kept session.
        session_present: bool,
    },
    /// A CONNECT was refused with `reason` (0x86 and 0x87: failed authentication). Fires once
    /// per connection.
    ClientRefused {
        /// The client id it sent.
        client_id: String,
        /// The user name it gave.
        username: Option<String>,
        /// Its connection.
        peer: Peer,
        /// Where it connects from, when known.
        remote: Option<SocketAddr>,
        /// Why.
        reason: ReasonCode,
    },
    /// A connected client's QUIC connection moved to a new address (NAT rebinding, another
    /// network) and the session went on. Fires once per change.
    ClientMigrated {
        /// Its client id.
        client_id: String,
        /// Its new address.
        remote: SocketAddr,
    },
    /// A connected client's connection ended. Fires once per connection that was connected.
    ClientDisconnected {
        /// Its client id.
        client_id: String,
        /// Its connection.
        peer: Peer,
        /// Why: its DISCONNECT, a keep-alive timeout, a protocol error with its code, a
        /// takeover (`Server(0x8E)`), the server shutting down, or the transport.
        reason: EndReason,
        /// For a transport that ended: how (the QUIC close reason, a slow consumer).
        detail: Option<String>,
        /// QoS 0 messages it lost on this connection because it read slower than they came.
        dropped: u64,
    },
}

/// Counters published under `$SYS/broker/`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// PUBLISH packets received from clients.
    pub messages_received: u64,
    /// PUBLISH packets handed to client sessions.
    pub messages_sent: u64,
    /// Bytes of MQTT stream received.
    pub bytes_received: u64,
    /// Bytes of MQTT stream sent.
    pub bytes_sent: u64,
    /// Messages dropped: QoS 0 ones for clients that were not keeping up, QoS 1 and 2 ones for
    /// offline clients beyond their queue or the offline byte budget.
    pub messages_dropped: u64,
    /// Deliveries held back because the receiver may not read the topic (any more).
    pub messages_denied: u64,
    /// CONNECTs refused for wrong credentials.
    pub auth_failures: u64,
    /// Clients disconnected because their connection took nothing for the write timeout.
    pub stalled_clients: u64,
}

/// A client's session as the broker keeps it.
struct Record {
    key: SessionKey,
    /// The user name that created the session: only that user may resume it.
    owner: Option<String>,
    /// Bytes of messages waiting in `kept` (counted against `max_offline_bytes`).
    queued_bytes: usize,
    /// The live connection, if any.
    conn: Option<Peer>,
    /// The session state while offline.
    kept: Option<SessionState>,
    /// Session expiry in seconds (`u32::MAX`: never, for MQTT 3.1.1 persistent sessions).
    expiry: u32,
    /// When the offline session is discarded.
    expires_at: Option<Instant>,
    /// A will waiting for its delay.
    will: Option<(Instant, Will)>,
}

/// The two deadlines of an offline session, each filed apart under its client id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum RecordTimer {
    /// Its will's delay ends.
    Will,
    /// The session expires.
    Expiry,
}

struct Live {
    session: ServerSession,
    client: Option<String>,
    username: Option<String>,
    /// The password verification this connection waits for, if any.
    auth: Option<AuthId>,
    /// From its CONNECT, for the lifecycle events: client id, user name, remote address.
    hello: Option<(String, Option<String>, Option<SocketAddr>)>,
    /// How its transport ended, when it did (for `BrokerEvent::ClientDisconnected`).
    detail: Option<String>,
    /// QoS 0 messages dropped because it did not keep up.
    dropped: u64,
}

/// A password verification the adapter is running.
struct PendingAuth {
    /// The connection and its CONNECT, or `None` once the connection has gone: the entry stays
    /// until the verdict comes, so it still counts against the bounds and a wrong password
    /// still counts as a failure of its address.
    waiting: Option<(Peer, Box<Connect>)>,
    ip: Option<IpAddr>,
}

/// The broker machine. See the crate docs for the driving contract.
pub struct Broker {
    quic: QuicEndpoint,
    config: BrokerConfig,
    conns: BTreeMap<Peer, Live>,
    clients: BTreeMap<String, Record>,
    keys: BTreeMap<SessionKey, String>,
    next_key: SessionKey,
    router: Router,
    retained: RetainedStore,
    /// Connections with something to do (bytes or events in, messages delivered to them), so a
    /// datagram for one connection does not make the broker look at all of them.
    dirty: BTreeSet<Peer>,
    /// Each connection's session deadline (keep-alive, connect timeout), ordered.
    session_timers: TimerIndex<Peer>,
    /// Output for byte-stream connections, in order, for the adapter.
    stream_out: VecDeque<(StreamId, StreamOutput)>,
    /// Bytes handed to the adapter for each byte stream and not yet reported written, and
    /// bytes reported written so far (progress).
    stream_backlog: BTreeMap<StreamId, (usize, u64)>,
    /// The sum of the byte streams' backlogs.
    stream_backlog_total: usize,
    /// Where the adapter said each byte stream comes from.
    stream_remote: BTreeMap<StreamId, SocketAddr>,
    /// Connections with bytes waiting: since when, with how much progress then.
    stalls: BTreeMap<Peer, (Instant, u64)>,
    stall_timers: TimerIndex<Peer>,
    /// Password verifications handed out and not answered.
    pending_auth: BTreeMap<AuthId, PendingAuth>,
    auth_out: VecDeque<AuthRequest>,
    next_auth: u64,
    limiter: FailureLimiter,
    /// Keyed hash for assigned client ids: unpredictable without the configured secret.
    id_key: ring::hmac::Key,
    /// Bytes queued for offline sessions, all together.
    offline_bytes: usize,
    next_housekeeping: Option<Instant>,
    next_stream: u64,
    /// Will and expiry deadlines of offline sessions, ordered. A reconnect, or a session's
    /// removal, takes its entries out.
    record_timers: TimerIndex<(String, RecordTimer)>,
    events: VecDeque<BrokerEvent>,
    /// Messages sent through a shared subscription and not yet acknowledged, by (session,
    /// request id): redelivered to another member if the session leaves first.
    shared_pending: BTreeMap<(SessionKey, u64), TopicFilter>,
    next_local: SessionKey,
    stats: Stats,
    started: Option<Instant>,
    next_sys: Option<Instant>,
    /// Set by a shutdown: the latest moment it ends.
    closing_until: Option<Instant>,
}

impl Broker {
    /// A broker, serving nobody yet.
    pub fn new(config: BrokerConfig) -> Result<Broker, ConfigError> {
        config.validate()?;
        let id_key = ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            &quic::derive_key(config.quic.secret.as_ref(), config.quic.seed, quic::domain::CLIENT_ID),
        );
        Ok(Broker {
            quic: QuicEndpoint::server(&config.quic)?,
            stream_backlog_total: 0,
            stream_remote: BTreeMap::new(),
            stalls: BTreeMap::new(),
            stall_timers: TimerIndex::new(),
            pending_auth: BTreeMap::new(),
            auth_out: VecDeque::new(),
            next_auth: 0,
            limiter: FailureLimiter::new(config.max_auth_failures, config.auth_failure_window, 100_000),
            id_key,
            offline_bytes: 0,
            next_housekeeping: None,
            conns: BTreeMap::new(),
            clients: BTreeMap::new(),
            keys: BTreeMap::new(),
            next_key: 0,
            router: Router::new(),
            retained: RetainedStore::new(config.max_retained, config.max_retained_bytes),
            dirty: BTreeSet::new(),
            session_timers: TimerIndex::new(),
            stream_out: VecDeque::new(),
            stream_backlog: BTreeMap::new(),
            next_stream: 0,
            record_timers: TimerIndex::new(),
            events: VecDeque::new(),
            shared_pending: BTreeMap::new(),
            next_local: LOCAL_BASE,
            stats: Stats::default(),
            started: None,
            next_sys: None,
            closing_until: None,
            config,
        })
    }

    /// Connected clients.
    pub fn connected(&self) -> usize {
        self.clients.values().filter(|r| r.conn.is_some()).count()
    }

    /// Sessions kept (connected or not).
    pub fn sessions(&self) -> usize {
        self.clients.len()
    }

    /// Subscribes the embedding application: matching messages (and the retained ones now)
    /// come out of [`Broker::poll_event`].
    pub fn subscribe_local(&mut self, now: Instant, filter: &TopicFilter, qos: QoS) -> LocalSubscription {
        self.next_local += 1;
        let key = self.next_local;
        let options = mqtt_proto::SubscriptionOptions { qos, ..Default::default() };
        self.router.subscribe(key, filter, Entry { options, subscription_id: None });
        if filter.shared().is_none() {
            for publish in self.retained.matching(now, filter, usize::MAX) {
                self.events.push_back(BrokerEvent::Message { subscription: LocalSubscription(key), publish });
            }
        }
        LocalSubscription(key)
    }

    /// Ends an in-process subscription.
    pub fn unsubscribe_local(&mut self, subscription: LocalSubscription) {
        self.router.remove_session(subscription.0);
    }

    /// Publishes from the embedding application, as a client would (retain honoured). The
    /// topic limits apply as to clients: a topic beyond them is refused with Topic Name invalid,
    /// a retained message the store has no room for with Quota exceeded.
    pub fn publish_local(&mut self, now: Instant, publish: Publish) -> Result<(), ReasonCode> {
        self.tick(now);
        if let Some(code) = self.topic_refusal(publish.topic.as_str()) {
            return Err(code);
        }
        if publish.retain && self.retained.set(now, &publish).is_err() {
            return Err(ReasonCode::QuotaExceeded);
        }
        self.route(now, publish, None);
        self.pump(now);
        Ok(())
    }

    /// Whether a topic name or filter is beyond the configured length or depth: the reason
    /// code to refuse it with.
    fn topic_refusal(&self, topic: &str) -> Option<ReasonCode> {
        let levels = topic.bytes().filter(|&b| b == b'/').count() + 1;
        (topic.len() > self.config.max_topic_length || levels > self.config.max_topic_levels)
            .then_some(ReasonCode::TopicNameInvalid)
    }

    /// The next password verification to run off the event loop (see [`AuthRequest`]). Poll it
    /// after every input, like the other outputs; answer each with
    /// [`Broker::handle_auth_result`]. Comes only when the configuration has `auth`.
    #[must_use]
    pub fn poll_auth(&mut self) -> Option<AuthRequest> {
        self.auth_out.pop_front()
    }

    /// The verdict on an [`AuthRequest`]: the client is let in (and its session set up) or
    /// refused with the verdict's code. A verdict for a connection that has gone meanwhile is
    /// ignored.
    pub fn handle_auth_result(&mut self, now: Instant, id: AuthId, verdict: AuthVerdict) {
        self.tick(now);
        let Some(pending) = self.pending_auth.remove(&id) else { return };
        if verdict.is_err() {
            // Counted even when the client has gone: dropping the connection right after
            // CONNECT must not make guessing free.
            self.stats.auth_failures += 1;
            if let Some(ip) = pending.ip {
                self.limiter.record_failure(now, ip);
            }
        }
        let Some((conn, connect)) = pending.waiting else { return };
        let Some(live) = self.conns.get_mut(&conn).filter(|l| l.auth == Some(id)) else { return };
        live.auth = None;
        match verdict {
            Ok(()) => self.admit(now, conn, *connect),
            Err(code) => self.refuse(now, conn, code),
        }
        self.dirty.insert(conn);
        self.pump(now);
    }

    /// Where a connection comes from, when known (QUIC always; byte streams when the adapter
    /// said, with [`Broker::open_stream_from`]).
    fn remote_ip(&self, conn: Peer) -> Option<IpAddr> {
        self.remote_addr(conn).map(|a| a.ip())
    }

    /// Ends every connection for a server shutdown: MQTT 5 clients get DISCONNECT with Server
    /// shutting down (0x8B), then each stream is finished (QUIC) or closed (byte streams). The
    /// adapter keeps driving until [`Broker::is_shut_down`], which waits for the QUIC
    /// connections to deliver their last bytes and close, for at most `grace`.
    pub fn shutdown(&mut self, now: Instant, grace: Duration) {
        self.tick(now);
        self.closing_until.get_or_insert(now + grace);
        let peers: Vec<Peer> = self.conns.keys().copied().collect();
        for peer in peers {
            if let Some(live) = self.conns.get_mut(&peer) {
                if live.session.disconnect(ReasonCode::ServerShuttingDown).is_err()
                    && live.session.refuse(now, ReasonCode::ServerUnavailable).is_err()
                {
                    // Not connected yet (no CONNECT): there is nobody to tell.
                    live.session.connection_lost();
                }
                self.dirty.insert(peer);
            }
        }
        self.pump(now);
    }

    /// After [`Broker::shutdown`]: whether every connection has closed or the grace is over.
    pub fn is_shut_down(&self, now: Instant) -> bool {
        self.closing_until.is_some_and(|t| now >= t || (self.conns.is_empty() && self.quic.connection_count() == 0))
    }

    /// Live connections, counting those that have not sent CONNECT yet.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// The next event for the embedding application.
    pub fn poll_event(&mut self) -> Option<BrokerEvent> {
        self.events.pop_front()
    }

    /// The counters behind `$SYS/broker/`.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Starts the clocks that need a first `now` (uptime, `$SYS` publishing).
    fn tick(&mut self, now: Instant) {
        if self.started.is_none() {
            self.started = Some(now);
            self.next_sys = self.config.sys_interval.map(|i| now + i);
            self.next_housekeeping = Some(now + HOUSEKEEPING);
        }
        if self.next_housekeeping.is_some_and(|at| at <= now) {
            self.next_housekeeping = Some(now + HOUSEKEEPING);
            self.retained.purge_expired(now);
        }
        if let (Some(at), Some(interval)) = (self.next_sys, self.config.sys_interval) {
            if at <= now {
                self.next_sys = Some(now + interval);
                self.publish_sys(now);
            }
        }
    }

    /// Publishes the statistics as retained messages under `$SYS/broker/`.
    fn publish_sys(&mut self, now: Instant) {
        let uptime = self.started.map_or(0, |s| now.saturating_duration_since(s).as_secs());
        let values = [
            ("clients/connected", self.connected().to_string()),
            ("clients/total", self.sessions().to_string()),
            ("messages/received", self.stats.messages_received.to_string()),
            ("messages/sent", self.stats.messages_sent.to_string()),
            ("messages/dropped", self.stats.messages_dropped.to_string()),
            ("bytes/received", self.stats.bytes_received.to_string()),
            ("bytes/sent", self.stats.bytes_sent.to_string()),
            ("subscriptions/count", self.router.len().to_string()),
            ("retained messages/count", self.retained.len().to_string()),
            ("messages/denied", self.stats.messages_denied.to_string()),
            ("clients/auth failures", self.stats.auth_failures.to_string()),
            ("clients/stalled", self.stats.stalled_clients.to_string()),
            ("uptime", format!("{uptime} seconds")),
        ];
        for (name, value) in values {
            let Ok(topic) = mqtt_proto::TopicName::new(format!("$SYS/broker/{name}")) else { continue };
            let mut p = Publish::new(topic, value.into_bytes());
            p.retain = true;
            self.publish(now, p, None);
        }
    }

    /// Whether a session is kept for this client id (connected or not).
    pub fn has_session(&self, client_id: &str) -> bool {
        self.clients.contains_key(client_id)
    }

    /// Retained messages.
    pub fn retained(&self) -> usize {
        self.retained.len()
    }

    fn pump(&mut self, now: Instant) {
        loop {
            while let Some(event) = self.quic.poll_event() {
                match event {
                    quic::Event::Connected { conn, .. } => {
                        self.live(now, Peer::Quic(conn));
                        self.dirty.insert(Peer::Quic(conn));
                    }
                    quic::Event::Received { conn, data } => {
                        // Bytes after the session ended (the client may go on writing while our
                        // FIN is on its way) start nothing new on a finishing connection.
                        if self.conns.contains_key(&Peer::Quic(conn)) || !self.quic.is_finishing(conn) {
                            self.received(now, Peer::Quic(conn), &data);
                        }
                    }
                    quic::Event::Closed { conn, reason } => {
                        if let Some(live) = self.conns.get_mut(&Peer::Quic(conn)) {
                            live.detail.get_or_insert_with(|| format!("QUIC: {reason}"));
                        }
                        self.lost(Peer::Quic(conn));
                    }
                    quic::Event::Migrated { conn, remote } => {
                        let client = self.conns.get(&Peer::Quic(conn)).and_then(|l| l.client.clone());
                        if let Some(client_id) = client {
                            self.events.push_back(BrokerEvent::ClientMigrated { client_id, remote });
                        }
                    }
                }
            }
            let Some(conn) = self.dirty.pop_first() else { break };
            self.serve(now, conn);
        }
    }

    fn received(&mut self, now: Instant, peer: Peer, data: &[u8]) {
        self.stats.bytes_received += data.len() as u64;
        self.live(now, peer).session.handle_bytes(now, data);
        self.dirty.insert(peer);
    }

    fn lost(&mut self, peer: Peer) {
        if let Some(live) = self.conns.get_mut(&peer) {
            live.session.connection_lost();
            self.dirty.insert(peer);
        }
    }

    fn send(&mut self, now: Instant, peer: Peer, bytes: Bytes) {
        match peer {
            Peer::Quic(conn) => {
                let _ = self.quic.send(now, conn, bytes);
            }
            Peer::Stream(id) => {
                self.stream_backlog.entry(id).or_default().0 += bytes.len();
                self.stream_backlog_total += bytes.len();
                self.stream_out.push_back((id, StreamOutput::Data(bytes)));
            }
        }
        if self.backlog(peer) > self.config.max_queued_bytes.saturating_mul(4) {
            // Not reading at all: its session ends as for a lost connection (will, kept session).
            self.drop_slow(now, peer);
        } else if self.backlog(peer) > 0 && !self.stalls.contains_key(&peer) {
            // Bytes wait: from now on the connection must take some within the write timeout.
            self.stalls.insert(peer, (now, self.progress(peer)));
            self.stall_timers.set(peer, Some(now + self.config.write_timeout));
        }
    }

    /// Ends a connection that does not take what is sent to it.
    fn drop_slow(&mut self, now: Instant, peer: Peer) {
        self.forget_stall(peer);
        if let Some(live) = self.conns.get_mut(&peer) {
            live.detail = Some("slow consumer: it took nothing for the write timeout, or fell too far behind".into());
        }
        match peer {
            Peer::Quic(conn) => {
                let _ = self.quic.close(now, conn, quic::close_code::SLOW_CONSUMER, "not reading");
            }
            Peer::Stream(id) => {
                self.forget_stream(id);
                self.stream_out.push_back((id, StreamOutput::Abort));
                self.lost(peer);
            }
        }
    }

    fn forget_stall(&mut self, peer: Peer) {
        self.stalls.remove(&peer);
        self.stall_timers.set(peer, None);
    }

    /// Drops the byte-stream bookkeeping of a connection that is gone.
    fn forget_stream(&mut self, id: StreamId) {
        if let Some((backlog, _)) = self.stream_backlog.remove(&id) {
            self.stream_backlog_total -= backlog;
        }
        self.stream_remote.remove(&id);
        self.forget_stall(Peer::Stream(id));
    }

    /// The write-timeout check of connections with bytes waiting: one that took nothing since
    /// the last check is dropped; one that took some is checked again a timeout later.
    fn check_stalls(&mut self, now: Instant) {
        while let Some(peer) = self.stall_timers.pop_due(now) {
            let Some((_, before)) = self.stalls.remove(&peer) else { continue };
            if self.backlog(peer) == 0 {
                continue;
            }
            let progress = self.progress(peer);
            if progress == before && self.conns.contains_key(&peer) {
                self.stats.stalled_clients += 1;
                self.drop_slow(now, peer);
            } else {
                self.stalls.insert(peer, (now, progress));
                self.stall_timers.set(peer, Some(now + self.config.write_timeout));
            }
        }
    }

    /// Bytes waiting to be sent to a connection.
    fn backlog(&self, peer: Peer) -> usize {
        match peer {
            Peer::Quic(conn) => self.quic.queued(conn),
            Peer::Stream(id) => self.stream_backlog.get(&id).map_or(0, |b| b.0),
        }
    }

    /// Bytes a connection has taken so far (a counter: it stands still while the client reads
    /// nothing).
    fn progress(&self, peer: Peer) -> u64 {
        match peer {
            Peer::Quic(conn) => self.quic.written(conn),
            Peer::Stream(id) => self.stream_backlog.get(&id).map_or(0, |b| b.1),
        }
    }

    /// Whether QoS 0 messages for this connection are dropped now: its own backlog, or all
    /// clients' together, is over its limit.
    fn over_budget(&self, peer: Peer) -> bool {
        // What the session holds that has not reached the transport counts too: a burst (the
        // retained messages of a SUBSCRIBE to `#`) is written before the transport sees any.
        let buffered = self.conns.get(&peer).map_or(0, |l| l.session.buffered());
        self.backlog(peer) + buffered > self.config.max_queued_bytes
            || self.quic.queued_total() + self.stream_backlog_total > self.config.max_total_queued_bytes
    }

    /// The adapter wrote `bytes` of a byte stream's output to its socket: they no longer count
    /// against the client's backlog (see [`BrokerConfig::max_queued_bytes`]).
    pub fn stream_written(&mut self, id: StreamId, bytes: usize) {
        if let Some(b) = self.stream_backlog.get_mut(&id) {
            let n = bytes.min(b.0);
            b.0 -= n;
            b.1 += n as u64;
            self.stream_backlog_total -= n;
        }
    }

    fn finish(&mut self, now: Instant, peer: Peer) {
        self.forget_stall(peer);
        match peer {
            Peer::Quic(conn) => {
                let _ = self.quic.finish(now, conn);
            }
            Peer::Stream(id) => {
                self.forget_stream(id);
                self.stream_out.push_back((id, StreamOutput::Close));
            }
        }
    }

    /// A byte-stream connection (TCP, TLS) was accepted by the adapter: the broker expects
    /// CONNECT on it within the connect timeout.
    pub fn open_stream(&mut self, now: Instant) -> StreamId {
        self.tick(now);
        self.next_stream += 1;
        let id = StreamId(self.next_stream);
        self.live(now, Peer::Stream(id));
        self.rearm(Peer::Stream(id));
        id
    }

    /// [`Broker::open_stream`] for a connection from `remote`: failed logins are then limited
    /// per address (see [`BrokerConfig::max_auth_failures`]), as they are for QUIC.
    pub fn open_stream_from(&mut self, now: Instant, remote: SocketAddr) -> StreamId {
        let id = self.open_stream(now);
        self.stream_remote.insert(id, remote);
        id
    }

    /// Bytes read from a byte-stream connection.
    pub fn handle_stream_bytes(&mut self, now: Instant, id: StreamId, data: &[u8]) {
        self.tick(now);
        if self.conns.contains_key(&Peer::Stream(id)) {
            self.received(now, Peer::Stream(id), data);
            self.pump(now);
        }
    }

    /// The byte-stream connection closed (or failed).
    pub fn stream_closed(&mut self, now: Instant, id: StreamId) {
        if let Some(live) = self.conns.get_mut(&Peer::Stream(id)) {
            live.detail.get_or_insert_with(|| "the connection closed".into());
        }
        self.forget_stream(id);
        self.lost(Peer::Stream(id));
        self.pump(now);
    }

    /// Output for byte-stream connections: bytes to write, or the signal to close.
    pub fn poll_stream(&mut self) -> Option<(StreamId, StreamOutput)> {
        self.stream_out.pop_front()
    }

    /// Files a connection's session deadline (or forgets it, for a connection that is gone).
    fn rearm(&mut self, conn: Peer) {
        let next = self.conns.get(&conn).and_then(|l| l.session.poll_timeout());
        self.session_timers.set(conn, next);
    }

    fn live(&mut self, now: Instant, conn: Peer) -> &mut Live {
        let config = self.config.session.clone();
        self.conns.entry(conn).or_insert_with(|| Live {
            session: ServerSession::new(now, config),
            client: None,
            username: None,
            auth: None,
            hello: None,
            detail: None,
            dropped: 0,
        })
    }

    /// Moves one connection's events and bytes along.
    fn serve(&mut self, now: Instant, conn: Peer) {
        // Handling an event can raise more (accepting CONNECT releases the packets the client
        // sent right after it), so go on until the session is quiet.
        loop {
            let Some(live) = self.conns.get_mut(&conn) else { return self.rearm(conn) };
            let events: Vec<ServerEvent> = std::iter::from_fn(|| live.session.poll_event()).collect();
            if events.is_empty() {
                break;
            }
            for event in events {
                self.on_event(now, conn, event);
            }
        }
        let Some(live) = self.conns.get_mut(&conn) else { return self.rearm(conn) };
        let out: Vec<Bytes> = std::iter::from_fn(|| live.session.poll_transmit()).collect();
        let ended = live.session.is_ended();
        for bytes in out {
            self.stats.bytes_sent += bytes.len() as u64;
            self.send(now, conn, bytes);
        }
        if ended {
            if let Some(Live { auth: Some(id), .. }) = self.conns.remove(&conn) {
                // Its verdict, when it comes, must not land on a later connection that reuses
                // this one's number; the entry itself stays until then (see `PendingAuth`).
                if let Some(pending) = self.pending_auth.get_mut(&id) {
                    pending.waiting = None;
                }
            }
            self.finish(now, conn);
        }
        self.rearm(conn);
    }

    fn on_event(&mut self, now: Instant, conn: Peer, event: ServerEvent) {
        let key =
            self.conns.get(&conn).and_then(|l| l.client.as_ref()).and_then(|c| self.clients.get(c)).map(|r| r.key);
        match event {
            ServerEvent::Connect(c) => self.on_connect(now, conn, *c),
            ServerEvent::Publish(p) => {
                self.stats.messages_received += 1;
                // The limits first (cheap, and they bound what the ACL walks), then the rights:
                // `$` topics are the broker's (e.g. `$SYS`), clients may not publish there.
                let allowed = || match (&self.config.auth, self.conns.get(&conn)) {
                    (Some(auth), Some(live)) => {
                        auth.can_publish(live.client.as_deref().unwrap_or(""), live.username.as_deref(), &p.topic)
                    }
                    _ => true,
                };
                let mut reason = if let Some(code) = self.topic_refusal(p.topic.as_str()) {
                    code
                } else if p.topic.is_system() || !allowed() {
                    ReasonCode::NotAuthorized
                } else {
                    ReasonCode::Success
                };
                // A retained message the store has no room for is refused as a whole.
                if reason == ReasonCode::Success && p.retain && self.retained.set(now, &p).is_err() {
                    reason = ReasonCode::QuotaExceeded;
                }
                if let Some(live) = self.conns.get_mut(&conn) {
                    live.session.acknowledge(p.qos_pid, reason);
                }
                if reason == ReasonCode::Success {
                    self.route(now, p, key);
                }
            }
            ServerEvent::Subscribe { packet_id, subscriptions, subscription_id } => {
                if let Some(key) = key {
                    self.subscribe(now, conn, key, packet_id, subscriptions, subscription_id);
                }
            }
            ServerEvent::Unsubscribe { packet_id, filters } => {
                if let Some(key) = key {
                    let codes = filters
                        .iter()
                        .map(|f| {
                            if self.router.unsubscribe(key, f) {
                                ReasonCode::Success
                            } else {
                                ReasonCode::NoSubscriptionExisted
                            }
                        })
                        .collect();
                    if let Some(live) = self.conns.get_mut(&conn) {
                        let _ = live.session.unsuback(packet_id, codes);
                    }
                }
            }
            ServerEvent::Delivered { id } => {
                if let Some(key) = key {
                    self.shared_pending.remove(&(key, id));
                }
            }
            ServerEvent::SessionExpiry(secs) => {
                // The broker's maximum caps it as at CONNECT.
                let record =
                    self.conns.get(&conn).and_then(|l| l.client.as_ref()).and_then(|c| self.clients.get_mut(c));
                if let Some(record) = record.filter(|r| r.conn == Some(conn)) {
                    record.expiry = secs.min(self.config.max_session_expiry);
                }
            }
            ServerEvent::Ended { will, reason } => {
                self.report_end(conn, reason);
                self.on_end(now, conn, will)
            }
            ServerEvent::Auth(_) => {
                // No authentication method was agreed (a CONNECT carrying one is refused), so
                // AUTH from the client breaks the protocol: DISCONNECT once connected, a refused
                // CONNECT while its password is being checked.
                if let Some(live) = self.conns.get_mut(&conn) {
                    if live.session.disconnect(ReasonCode::ProtocolError).is_err() {
                        let _ = live.session.refuse(now, ReasonCode::ProtocolError);
                    }
                }
            }
        }
    }

    /// The lifecycle event for a session that ended: a refusal (it had sent CONNECT) or a
    /// disconnection (it was connected).
    fn report_end(&mut self, conn: Peer, reason: EndReason) {
        let remote = self.remote_addr(conn);
        let Some(live) = self.conns.get_mut(&conn) else { return };
        let event = match (&reason, live.client.clone(), live.hello.take()) {
            (EndReason::Refused(code), _, Some((client_id, username, remote))) => {
                BrokerEvent::ClientRefused { client_id, username, peer: conn, remote, reason: *code }
            }
            // Refused by the session itself, before the broker saw the CONNECT (an identifier
            // too long, a will it cannot honour): who it was is not known.
            (EndReason::Refused(code), _, None) => BrokerEvent::ClientRefused {
                client_id: String::new(),
                username: None,
                peer: conn,
                remote,
                reason: *code,
            },
            (_, Some(client_id), _) => {
                let detail = (reason == EndReason::TransportLost).then(|| live.detail.take()).flatten();
                BrokerEvent::ClientDisconnected { client_id, peer: conn, reason, detail, dropped: live.dropped }
            }
            _ => return,
        };
        self.events.push_back(event);
    }

    /// Where a connection comes from, when known.
    fn remote_addr(&self, conn: Peer) -> Option<SocketAddr> {
        match conn {
            Peer::Quic(c) => self.quic.remote_address(c),
            Peer::Stream(id) => self.stream_remote.get(&id).copied(),
        }
    }

    /// Refuses a CONNECT with `code` (mapped to the 3.1.1 return code for 3.1.1 clients).
    fn refuse(&mut self, now: Instant, conn: Peer, code: ReasonCode) {
        if let Some(live) = self.conns.get_mut(&conn) {
            let _ = live.session.refuse(now, code);
        }
    }

    /// A CONNECT: what can be decided without knowing who the client is, then the password
    /// check (handed out, see [`Broker::poll_auth`]), then [`Broker::admit`].
    fn on_connect(&mut self, now: Instant, conn: Peer, c: Connect) {
        let remote = self.remote_addr(conn);
        let username = c.username.as_ref().map(|u| u.as_str().to_string());
        if let Some(live) = self.conns.get_mut(&conn) {
            live.hello = Some((c.client_id.to_string(), username.clone(), remote));
        }
        if self.closing_until.is_some() {
            // Shutting down: a client that reconnects at once must not land here again.
            return self.refuse(now, conn, ReasonCode::ServerUnavailable);
        }
        // Enhanced authentication (an AUTH exchange) is not offered: a client that asks for it
        // is refused with 0x8C and the connection closed [MQTT-4.12.0-1].
        if c.properties.authentication_method.is_some() {
            return self.refuse(now, conn, ReasonCode::BadAuthenticationMethod);
        }
        // A will is a publish that happens later: the same topic rules apply now, when the
        // client can still be told (0x90 beyond the limits, 0x87 for a `$` topic).
        if let Some(will) = &c.will {
            if let Some(code) = self.topic_refusal(will.topic.as_str()) {
                return self.refuse(now, conn, code);
            }
            if will.topic.is_system() {
                return self.refuse(now, conn, ReasonCode::NotAuthorized);
            }
        }
        let Some(auth) = self.config.auth.clone() else { return self.admit(now, conn, c) };
        let ip = self.remote_ip(conn);
        if ip.is_some_and(|ip| self.limiter.is_limited(now, ip)) {
            return self.refuse(now, conn, ReasonCode::ConnectionRateExceeded);
        }
        let from_ip = ip.map_or(0, |ip| self.pending_auth.values().filter(|p| p.ip == Some(ip)).count());
        if self.pending_auth.len() >= self.config.max_pending_auth || from_ip >= self.config.max_pending_auth_per_ip {
            return self.refuse(now, conn, ReasonCode::ServerBusy);
        }
        self.next_auth += 1;
        let id = AuthId(self.next_auth);
        let Some(live) = self.conns.get_mut(&conn) else { return };
        live.auth = Some(id);
        self.auth_out.push_back(AuthRequest {
            id,
            auth,
            client_id: c.client_id.to_string(),
            username,
            // A copy: a slice would hold the whole CONNECT frame while the hash runs.
            password: c.password.as_deref().map(Bytes::copy_from_slice),
        });
        self.pending_auth.insert(id, PendingAuth { waiting: Some((conn, Box::new(c))), ip });
    }

    /// A client id for a client that sent none: unpredictable (a keyed hash of a counter, the
    /// key derived from the configured secret), so nobody can guess and take over the session
    /// of a client that will be given one; unique [MQTT-3.1.3-6].
    fn assign_client_id(&mut self) -> String {
        loop {
            self.next_key += 1;
            let tag = ring::hmac::sign(&self.id_key, &self.next_key.to_le_bytes());
            let hex: String = tag.as_ref()[..16].iter().map(|b| format!("{b:02x}")).collect();
            let id = format!("auto-{hex}");
            if !self.clients.contains_key(&id) {
                return id;
            }
        }
    }

    /// Takes the client in once it is authenticated: the rules that need its identity (will
    /// ACL, session ownership, limits), then takeover, and its session accepted or resumed.
    fn admit(&mut self, now: Instant, conn: Peer, c: Connect) {
        let assigned = c.client_id.is_empty().then(|| self.assign_client_id());
        let id = assigned.clone().unwrap_or_else(|| c.client_id.to_string());
        let username = c.username.as_ref().map(|u| u.as_str().to_string());
        if let (Some(will), Some(auth)) = (&c.will, &self.config.auth) {
            if !auth.can_publish(&id, username.as_deref(), &will.topic) {
                return self.refuse(now, conn, ReasonCode::NotAuthorized);
            }
        }
        // No connection is exempt from liveness checks: a keep-alive beyond the maximum (or
        // none) is replaced for MQTT 5; MQTT 3.1.1 has no way to say so, and is refused.
        let max_keepalive = self.config.max_keepalive;
        let impose = max_keepalive > 0 && (c.keep_alive == 0 || c.keep_alive > max_keepalive);
        if impose && !c.protocol.is_v5() {
            return self.refuse(now, conn, ReasonCode::ClientIdentifierNotValid);
        }
        // A session belongs to the user that created it: another user presenting the same
        // client id is refused, and neither takes over the live connection nor gets (or
        // discards) the kept session.
        match self.clients.get(&id) {
            Some(record) if record.owner != username => return self.refuse(now, conn, ReasonCode::NotAuthorized),
            None if self.clients.len() >= self.config.max_sessions => {
                return self.refuse(now, conn, ReasonCode::QuotaExceeded)
            }
            _ => {}
        }
        let expiry = if c.protocol.is_v5() {
            c.properties.session_expiry_interval.unwrap_or(0).min(self.config.max_session_expiry)
        } else if c.clean_start {
            0
        } else {
            // MQTT 3.1.1 persistent sessions have no expiry of their own: the broker's maximum.
            self.config.max_session_expiry
        };
        if impose {
            if let Some(live) = self.conns.get_mut(&conn) {
                live.session.impose_keep_alive(max_keepalive);
            }
        }
        // Takeover: the previous connection of this client ends with 0x8E and its session
        // state comes here.
        let mut taken_over_will = None;
        if let Some(other) = self.clients.get(&id).and_then(|r| r.conn) {
            if let Some(old) = self.conns.get_mut(&other) {
                let _ = old.session.disconnect(ReasonCode::SessionTakenOver);
                old.client = None;
                // The old connection's will: published now if it has no delay (the delay is
                // over at once), cancelled by this new connection otherwise [MQTT-3.1.2-8].
                taken_over_will = std::iter::from_fn(|| old.session.poll_event())
                    .find_map(|e| match e {
                        ServerEvent::Ended { will, .. } => will,
                        _ => None,
                    })
                    .filter(|w| w.properties.will_delay_interval.unwrap_or(0) == 0);
                let state = old.session.take_state();
                let dropped = old.dropped;
                let out: Vec<Bytes> = std::iter::from_fn(|| old.session.poll_transmit()).collect();
                for bytes in out {
                    self.send(now, other, bytes);
                }
                // Serving the ended session closes its transport.
                self.dirty.insert(other);
                self.events.push_back(BrokerEvent::ClientDisconnected {
                    client_id: id.clone(),
                    peer: other,
                    reason: EndReason::Server(ReasonCode::SessionTakenOver),
                    detail: None,
                    dropped,
                });
                if let Some(r) = self.clients.get_mut(&id) {
                    r.conn = None;
                }
                self.keep(&id, state);
            }
        }
        if let Some(will) = taken_over_will {
            self.publish(now, will_message(will), None);
        }
        // Clean start discards any kept session [MQTT-3.1.2-4].
        let existed = self.clients.contains_key(&id) && !c.clean_start;
        if c.clean_start {
            self.remove_record(&id);
        }
        let next_key = &mut self.next_key;
        let record = self.clients.entry(id.clone()).or_insert_with(|| {
            *next_key += 1;
            Record {
                key: *next_key,
                owner: username.clone(),
                queued_bytes: 0,
                conn: None,
                kept: None,
                expiry,
                expires_at: None,
                will: None,
            }
        });
        let state = record.kept.take();
        self.offline_bytes -= std::mem::take(&mut record.queued_bytes);
        record.conn = Some(conn);
        record.expiry = expiry;
        // Reconnecting cancels the expiry and, within the will delay, the will: their timer
        // entries go too, so a client that comes and goes does not grow the timer set.
        if record.expires_at.take().is_some() {
            self.record_timers.remove(&(id.clone(), RecordTimer::Expiry));
        }
        if record.will.take().is_some() {
            self.record_timers.remove(&(id.clone(), RecordTimer::Will));
        }
        self.keys.insert(record.key, id.clone());
        let Some(live) = self.conns.get_mut(&conn) else { return };
        live.client = Some(id);
        live.username = username;
        let asked = c.properties.session_expiry_interval.unwrap_or(0);
        if c.protocol.is_v5() && asked != expiry {
            live.session.announce_session_expiry(expiry);
        }
        let session_present = existed && state.is_some();
        let remote = live.hello.as_ref().and_then(|h| h.2);
        let connected = BrokerEvent::ClientConnected {
            client_id: live.client.clone().unwrap_or_default(),
            username: live.username.clone(),
            peer: conn,
            remote,
            protocol: c.protocol,
            session_present,
        };
        match (existed, state) {
            (true, Some(mut state)) => {
                // Read rights may have changed while the client was away (an `Auth` backed by
                // something that changes): what it may no longer read does not go out.
                if let Some(auth) = &self.config.auth {
                    let client = live.client.as_deref().unwrap_or("");
                    let user = live.username.as_deref();
                    let denied = state.retain_messages(|p| auth.can_read(client, user, &p.topic));
                    self.stats.messages_denied += denied as u64;
                }
                let _ = live.session.resume(now, state);
            }
            _ => {
                let _ = live.session.accept(now, false, assigned.as_deref());
            }
        }
        self.events.push_back(connected);
    }

    fn on_end(&mut self, now: Instant, conn: Peer, will: Option<Will>) {
        let Some(live) = self.conns.get_mut(&conn) else { return };
        let Some(id) = live.client.take() else { return };
        let mut state = live.session.take_state();
        if let Some(key) = self.clients.get(&id).map(|r| r.key) {
            self.redistribute(now, key, &mut state);
        }
        let Some(record) = self.clients.get_mut(&id) else { return };
        if record.conn != Some(conn) {
            return;
        }
        record.conn = None;
        self.keep(&id, state);
        let Some(record) = self.clients.get_mut(&id) else { return };
        if let Some(will) = will {
            let delay = will.properties.will_delay_interval.unwrap_or(0);
            let at = now + Duration::from_secs(u64::from(delay.min(record.expiry)));
            record.will = Some((at, will));
            self.record_timers.set((id.clone(), RecordTimer::Will), Some(at));
        }
        record.expires_at = match record.expiry {
            u32::MAX => None,
            secs => Some(now + Duration::from_secs(u64::from(secs))),
        };
        if let Some(at) = record.expires_at {
            self.record_timers.set((id, RecordTimer::Expiry), Some(at));
        }
        self.fire(now);
    }

    /// Keeps a session's state while its client is away, counting its messages against the
    /// offline byte budget.
    fn keep(&mut self, id: &str, mut state: SessionState) {
        let Some(record) = self.clients.get_mut(id) else { return };
        state.detach_messages();
        let bytes = state.bytes();
        self.offline_bytes = self.offline_bytes - record.queued_bytes + bytes;
        record.queued_bytes = bytes;
        record.kept = Some(state);
    }

    /// Forgets a session: its subscriptions, its queue (and the bytes it counted) and its
    /// timer entries.
    fn remove_record(&mut self, id: &str) -> Option<Record> {
        let mut record = self.clients.remove(id)?;
        self.router.remove_session(record.key);
        self.keys.remove(&record.key);
        self.offline_bytes -= std::mem::take(&mut record.queued_bytes);
        if record.expires_at.is_some() {
            self.record_timers.remove(&(id.to_string(), RecordTimer::Expiry));
        }
        if record.will.is_some() {
            self.record_timers.remove(&(id.to_string(), RecordTimer::Will));
        }
        Some(record)
    }

    /// Hands what a leaving member of shared subscriptions had not acknowledged to other members.
    fn redistribute(&mut self, now: Instant, key: SessionKey, state: &mut SessionState) {
        let pending: Vec<((SessionKey, u64), TopicFilter)> =
            self.shared_pending.range((key, 0)..=(key, u64::MAX)).map(|(k, f)| (*k, f.clone())).collect();
        for ((_, id), filter) in pending {
            self.shared_pending.remove(&(key, id));
            for mut publish in state.take_requests(&[id]) {
                let auth = self.config.auth.as_deref();
                let eligible = |k| {
                    is_online(&self.clients, &self.keys, k)
                        && may_read(&self.clients, &self.keys, auth, k, &publish.topic)
                };
                let Some((other, entry)) = self.router.pick_shared(&filter, key, eligible) else { continue };
                publish.dup = false;
                publish.qos_pid = QosPid::from_parts(publish.qos().min(entry.options.qos), PacketId::MIN);
                if let Some(new_id) = self.deliver(now, other, publish) {
                    self.shared_pending.insert((other, new_id), filter.clone());
                }
            }
        }
    }

    /// Publishes due wills and drops expired sessions.
    fn fire(&mut self, now: Instant) {
        while let Some((id, _)) = self.record_timers.pop_due(now) {
            let Some(record) = self.clients.get_mut(&id) else { continue };
            // A reconnect cancels both; entries it made stale are skipped here.
            if record.will.as_ref().is_some_and(|(t, _)| *t <= now) {
                if let Some((_, will)) = record.will.take() {
                    self.publish(now, will_message(will), None);
                }
            }
            let Some(record) = self.clients.get(&id) else { continue };
            if record.conn.is_none() && record.expires_at.is_some_and(|t| t <= now) {
                if let Some(record) = self.remove_record(&id) {
                    if let Some((_, will)) = record.will {
                        // A session that ends before its will delay publishes the will then.
                        self.publish(now, will_message(will), None);
                    }
                }
            }
        }
    }

    /// Routes a message the broker itself publishes (a will, `$SYS`), and retains it when asked:
    /// nobody can be told of a refusal, so a full store keeps its older messages and the
    /// message is routed all the same. (Client and in-process publishes are refused instead.)
    fn publish(&mut self, now: Instant, publish: Publish, from: Option<SessionKey>) {
        if publish.retain {
            let _ = self.retained.set(now, &publish);
        }
        self.route(now, publish, from);
    }

    /// Routes a message to every matching subscription.
    fn route(&mut self, now: Instant, publish: Publish, from: Option<SessionKey>) {
        // A shared group picks among members that are online and may read the topic, so a
        // member whose rights exclude it does not swallow the group's message.
        let auth = self.config.auth.as_deref();
        let eligible =
            |k| is_online(&self.clients, &self.keys, k) && may_read(&self.clients, &self.keys, auth, k, &publish.topic);
        for d in self.router.route(&publish.topic, from, eligible) {
            let mut out = publish.clone();
            out.dup = false;
            out.qos_pid = QosPid::from_parts(publish.qos().min(d.qos), PacketId::MIN);
            out.retain = publish.retain && d.retain_as_published;
            out.properties.topic_alias = None;
            out.properties.subscription_identifiers = d.subscription_ids.into();
            let acknowledged = out.qos() != QoS::AtMostOnce;
            let id = self.deliver(now, d.session, out);
            if let (Some(filter), Some(id), true) = (d.shared, id, acknowledged) {
                self.shared_pending.insert((d.session, id), filter);
            }
        }
    }

    /// Hands a message to a session: its connection when online, its queue when offline.
    /// Returns the session's request id when the message went to a live connection. Read rights
    /// are checked here, on every path that delivers, not only at SUBSCRIBE.
    fn deliver(&mut self, now: Instant, key: SessionKey, publish: Publish) -> Option<u64> {
        if key > LOCAL_BASE {
            self.events.push_back(BrokerEvent::Message { subscription: LocalSubscription(key), publish });
            return None;
        }
        let id = self.keys.get(&key)?;
        let record = self.clients.get(id)?;
        if let Some(auth) = &self.config.auth {
            let username = record.owner.as_deref();
            if !auth.can_read(id, username, &publish.topic) {
                self.stats.messages_denied += 1;
                return None;
            }
        }
        if let Some(conn) = record.conn {
            if publish.qos() == QoS::AtMostOnce && self.over_budget(conn) {
                self.stats.messages_dropped += 1;
                if let Some(live) = self.conns.get_mut(&conn) {
                    live.dropped += 1;
                }
                return None;
            }
            if let Some(live) = self.conns.get_mut(&conn) {
                let id = live.session.publish(now, publish).ok();
                if id.is_some() {
                    self.stats.messages_sent += 1;
                }
                self.dirty.insert(conn);
                return id;
            }
        }
        // Offline (or its connection already gone): QoS 1 and 2 wait in the kept session, as
        // their own copy (not a slice of a receive buffer), within the offline budgets.
        if publish.qos() != QoS::AtMostOnce {
            let cost = message_cost(&publish);
            let over = self.offline_bytes + cost > self.config.max_offline_bytes;
            let max = self.config.max_offline_queue;
            let record = self.keys.get(&key).and_then(|id| self.clients.get_mut(id));
            match record {
                // Full is checked before the copy is made: a full queue costs nothing more.
                Some(Record { kept: Some(state), queued_bytes, .. }) if !over && !state.is_full(max) => {
                    state.enqueue(now, publish.detached(), max);
                    *queued_bytes += cost;
                    self.offline_bytes += cost;
                }
                _ => self.stats.messages_dropped += 1,
            }
        }
        None
    }

    fn subscribe(
        &mut self,
        now: Instant,
        conn: Peer,
        key: SessionKey,
        packet_id: PacketId,
        subscriptions: Vec<Subscription>,
        subscription_id: Option<SubscriptionId>,
    ) {
        let max = self.config.session.maximum_qos;
        // The same filter twice in one SUBSCRIBE is one subscription, decided where it first
        // appears with the options of its last occurrence (which would replace the earlier
        // ones [MQTT-3.8.4-3]), and its retained messages are sent once; each occurrence still
        // gets the code, so the SUBACK lines up [MQTT-3.9.3-1].
        let mut last: BTreeMap<&TopicFilter, usize> = BTreeMap::new();
        for (i, s) in subscriptions.iter().enumerate() {
            last.insert(&s.filter, i);
        }
        let mut decided: BTreeMap<&TopicFilter, ReasonCode> = BTreeMap::new();
        let mut retained = Vec::new();
        // At most as many retained messages per SUBSCRIBE as the session can queue: the rest
        // would be dropped anyway, and collecting them costs memory and time.
        let mut room = self.config.session.max_queued;
        for s in &subscriptions {
            if decided.contains_key(&s.filter) {
                continue;
            }
            let s = last.get(&s.filter).map_or(s, |&i| &subscriptions[i]);
            let mut options = s.options;
            options.qos = options.qos.min(max);
            let known = self.router.filters(key).contains(&s.filter);
            let code = if self.topic_refusal(s.filter.match_filter()).is_some() {
                ReasonCode::TopicFilterInvalid
            } else if self.config.auth.as_ref().zip(self.conns.get(&conn)).is_some_and(|(auth, live)| {
                !auth.can_subscribe(live.client.as_deref().unwrap_or(""), live.username.as_deref(), &s.filter)
            }) {
                ReasonCode::NotAuthorized
            } else if !known && self.router.filters(key).len() >= self.config.max_subscriptions_per_client {
                ReasonCode::QuotaExceeded
            } else {
                match options.qos {
                    QoS::AtMostOnce => ReasonCode::Success,
                    QoS::AtLeastOnce => ReasonCode::GrantedQos1,
                    QoS::ExactlyOnce => ReasonCode::GrantedQos2,
                }
            };
            decided.insert(&s.filter, code);
            if code.is_error() {
                continue;
            }
            let new = self.router.subscribe(key, &s.filter, Entry { options, subscription_id });
            let send = match options.retain_handling {
                RetainHandling::SendAtSubscribe => true,
                RetainHandling::SendIfNew => new,
                RetainHandling::DoNotSend => false,
            };
            // Retained messages are not sent for shared subscriptions (spec 4.8.2).
            if send && s.filter.shared().is_none() {
                let found = self.retained.matching(now, &s.filter, room);
                room -= found.len();
                for mut m in found {
                    m.qos_pid = QosPid::from_parts(m.qos().min(options.qos), PacketId::MIN);
                    if let Some(id) = subscription_id {
                        m.properties.subscription_identifiers = vec![id].into();
                    }
                    retained.push(m);
                }
            }
        }
        let codes =
            subscriptions.iter().map(|s| decided.get(&s.filter).copied().unwrap_or(ReasonCode::UnspecifiedError));
        let codes: Vec<ReasonCode> = codes.collect();
        if let Some(live) = self.conns.get_mut(&conn) {
            let _ = live.session.suback(packet_id, codes);
        }
        // After the SUBACK, through the same path as live traffic: read rights, and the
        // client's backlog limit for QoS 0 and its queue limit for QoS 1 and 2.
        for m in retained {
            self.deliver(now, key, m);
        }
    }

    /// The broker's own next deadline: a will, a session expiry or a session timer.
    fn next_deadline(&self) -> Option<Instant> {
        let records = self.record_timers.next();
        let sessions = self.session_timers.next();
        [records, sessions, self.next_sys, self.stall_timers.next(), self.next_housekeeping].into_iter().flatten().min()
    }
}

/// Whether a session can take a message now: in-process subscriptions always, clients while
/// connected. (A free function so it can borrow these maps while the router is borrowed.)
fn is_online(clients: &BTreeMap<String, Record>, keys: &BTreeMap<SessionKey, String>, key: SessionKey) -> bool {
    key > LOCAL_BASE || keys.get(&key).and_then(|id| clients.get(id)).is_some_and(|r| r.conn.is_some())
}

/// Whether a session may read `topic` (always, without `Auth`, and for in-process
/// subscriptions). A free function for the same reason as [`is_online`].
fn may_read(
    clients: &BTreeMap<String, Record>,
    keys: &BTreeMap<SessionKey, String>,
    auth: Option<&dyn Auth>,
    key: SessionKey,
    topic: &mqtt_proto::TopicName,
) -> bool {
    let Some(auth) = auth else { return true };
    if key > LOCAL_BASE {
        return true;
    }
    keys.get(&key)
        .and_then(|id| Some((id, clients.get(id)?)))
        .is_some_and(|(id, r)| auth.can_read(id, r.owner.as_deref(), topic))
}

/// The PUBLISH a will becomes.
fn will_message(will: Will) -> Publish {
    let mut p = Publish::new(will.topic, will.payload);
    p.qos_pid = QosPid::from_parts(will.qos, PacketId::MIN);
    p.retain = will.retain;
    let w = &*will.properties;
    if !w.is_empty() {
        let mut props = PublishProperties::default();
        props.payload_format_indicator = w.payload_format_indicator;
        props.message_expiry_interval = w.message_expiry_interval;
        props.content_type = w.content_type.clone();
        props.response_topic = w.response_topic.clone();
        props.correlation_data = w.correlation_data.clone();
        props.user_properties = w.user_properties.clone();
        p.properties = props.into();
    }
    p
}

impl Machine for Broker {
    fn handle_datagram(
        &mut self,
        now: Instant,
        remote: SocketAddr,
        local_ip: Option<IpAddr>,
        ecn: Option<EcnCodepoint>,
        data: &[u8],
    ) {
        self.tick(now);
        self.quic.handle_datagram(now, remote, local_ip, ecn, data);
        self.pump(now);
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.tick(now);
        self.quic.handle_timeout(now);
        while let Some(conn) = self.session_timers.pop_due(now) {
            if let Some(live) = self.conns.get_mut(&conn) {
                live.session.handle_timeout(now);
                self.dirty.insert(conn);
            }
        }
        self.fire(now);
        self.check_stalls(now);
        self.pump(now);
    }

    fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        self.poll_transmit_batch(now, 1, buf)
    }

    fn poll_transmit_batch(&mut self, now: Instant, max_datagrams: usize, buf: &mut Vec<u8>) -> Option<Transmit> {
        let t = self.quic.poll_transmit_batch(now, max_datagrams, buf);
        self.pump(now);
        t
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        [self.quic.poll_timeout(), self.next_deadline(), self.closing_until].into_iter().flatten().min()
    }
}
