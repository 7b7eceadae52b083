//! What a broker is configured with, and the check that it is usable: limits and durations
//! are validated once here, so the machine can compute deadlines and compare counts without
//! guarding against zero or overflow on every input.

use super::auth::Auth;
use crate::config::{invalid, ConfigError, ServerConfig, MAX_DURATION};
use crate::persist::Persistence;
use crate::session::server::ServerSessionConfig;
use std::sync::Arc;
use std::time::Duration;

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
    /// reports what it has written with [`Broker::handle_stream_written`](super::machine::Broker::handle_stream_written).
    pub max_queued_bytes: usize,
    /// Whether the broker journals its durable state for a store, and whether acknowledgements
    /// wait for it (see [`crate::persist`]). `Off` here, because an embedding application that
    /// does not drain [`Broker::poll_store`](super::machine::Broker::poll_store) would see its
    /// acknowledgements held forever; the `mqttq` broker defaults to `Sync`.
    pub persistence: Persistence,
    /// With persistence on: how long a newly routed QoS 1 message for a kept session stays out
    /// of store batches (PostgreSQL's `commit_delay`, for the same reason). A subscriber that
    /// acknowledges it within the delay spares its write altogether, and the publisher's
    /// PUBACK goes out then, without a trip to the disk; otherwise the message is written in
    /// the first batch after the delay. 0 writes everything at once.
    pub commit_delay: Duration,
    /// Bridges to upstream brokers (see [`crate::bridge`]): they connect once the broker
    /// starts ([`Broker::start`](super::machine::Broker::start)).
    pub bridges: Vec<crate::bridge::config::BridgeConfig>,
    /// The path MQTT over WebSocket is served on, for connections the adapter opens with
    /// [`Broker::handle_stream_open_ws`](super::machine::Broker::handle_stream_open_ws)
    /// (EMQX's `/mqtt` by default); upgrade requests for other paths are answered 404.
    pub websocket_path: String,
    /// mosquitto's `use_identity_as_username`: a client that logged in with a certificate
    /// (QUIC, or TLS over TCP with `Broker::set_stream_identity`) has its certificate's common
    /// name as its user name, whatever its CONNECT says, and no password check (the
    /// certificate, verified against the client CA, is its credential); the ACL applies to
    /// that name. A client without one (no certificate, one without a common name, or a
    /// listener without TLS) is refused with Bad user name or password, as mosquitto does.
    pub use_identity_as_username: bool,
    /// This machine's shard, when the broker is made of several (see
    /// [`crate::broker::shard`]); build each shard's configuration with
    /// [`BrokerConfig::for_shard`]. `None` (or a count of 1): a broker of one machine.
    pub shard: Option<crate::broker::shard::ShardConfig>,
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
            persistence: Persistence::Off,
            commit_delay: Duration::from_millis(1),
            bridges: Vec::new(),
            websocket_path: crate::ws::DEFAULT_PATH.to_string(),
            use_identity_as_username: false,
            shard: None,
        }
    }

    /// The configuration of shard `index` of `count` from the broker's: global limits split
    /// between the shards (connections, sessions, queued bytes, logins waiting for their
    /// password check), bridges on shard 0 only, and connection ids that carry the shard (in
    /// the QUIC-LB layout, with server id 0 unless one is configured), so a datagram finds its
    /// shard. With `count` 1 it is the configuration unchanged.
    pub fn for_shard(&self, index: u16, count: u16) -> BrokerConfig {
        let mut c = self.clone();
        if count <= 1 {
            return c;
        }
        let n = usize::from(count);
        let split = |v: usize| v.div_ceil(n).max(1);
        c.shard = Some(crate::broker::shard::ShardConfig { index, count });
        c.quic.max_connections = split(c.quic.max_connections);
        c.max_sessions = split(c.max_sessions);
        c.max_total_queued_bytes = split(c.max_total_queued_bytes);
        c.max_offline_bytes = split(c.max_offline_bytes);
        c.max_pending_auth = split(c.max_pending_auth);
        if index != 0 {
            c.bridges.clear();
        }
        c.quic.load_balancer.get_or_insert_with(|| crate::cid::QuicLb::new(vec![0]));
        c.quic.shard = Some(index as u8);
        c
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
        if self.commit_delay > Duration::from_secs(1) {
            return Err(invalid("commit delay must be at most a second".to_string()));
        }
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
        if let Some(shard) = self.shard {
            if !(1..=256).contains(&shard.count) || shard.index >= shard.count {
                return Err(invalid(format!(
                    "shard {} of {} is not a shard (2 to 256 shards)",
                    shard.index, shard.count
                )));
            }
            if shard.count > 1 && self.quic.load_balancer.is_none() {
                return Err(invalid(
                    "a sharded broker needs connection ids that carry the shard: use BrokerConfig::for_shard"
                        .to_string(),
                ));
            }
        }
        if !self.websocket_path.starts_with('/') || self.websocket_path.contains(char::is_whitespace) {
            return Err(invalid(format!(
                "websocket path `{}` must start with / and hold no spaces",
                self.websocket_path
            )));
        }
        for (i, bridge) in self.bridges.iter().enumerate() {
            bridge.validate()?;
            if self.bridges[..i].iter().any(|b| b.name == bridge.name) {
                return Err(invalid(format!("two bridges are named `{}`", bridge.name)));
            }
        }
        Ok(())
    }
}
