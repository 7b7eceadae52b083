//! Configuration of the QUIC machines, with defaults that suit MQTT on lossy links.
//!
//! Every setting is plain data, checked once by [`TransportSettings::validate`] when a machine is
//! built: an invalid value is a [`ConfigError`], never a panic deep inside quinn-proto.

use crate::tls::{ClientTls, ServerTls, TlsError};
use quinn_proto::congestion::{CubicConfig, NewRenoConfig};
use quinn_proto::{IdleTimeout, TransportConfig, VarInt};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

/// The congestion controller for a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Congestion {
    /// NewReno (RFC 9002's reference controller).
    NewReno,
    /// CUBIC (quinn-proto's default).
    Cubic,
    /// Our deterministic BBR ([`crate::bbr`]): models the path instead of reading every loss as
    /// congestion, so random loss does not collapse the window. The default: see the module docs
    /// and BENCHMARKS.md ("Lossy links") for the measurements that chose it.
    #[default]
    Bbr,
}

/// Transport settings shared by client and server. Build with struct update syntax from
/// `TransportSettings::default()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportSettings {
    /// Close a connection silent for this long (both ends agree on the smaller value).
    pub idle_timeout: Duration,
    /// Send QUIC PINGs this often so an idle connection stays open (and NAT bindings alive).
    /// `None` leaves keep-alive to MQTT's PINGREQ.
    pub keep_alive: Option<Duration>,
    /// Give up on a handshake that has not completed after this long.
    pub handshake_timeout: Duration,
    /// Bytes the peer may send on the MQTT stream before we read them.
    pub stream_window: u64,
    /// Bytes the peer may send on the whole connection before we read them.
    pub connection_window: u64,
    /// Bytes we buffer unacknowledged, per connection.
    pub send_window: u64,
    /// Congestion controller.
    pub congestion: Congestion,
    /// Largest UDP payload we accept (1200 to 65527).
    pub max_udp_payload: u16,
    /// UDP payload used before path MTU discovery (at least 1200).
    pub initial_mtu: u16,
    /// Round-trip estimate before the first sample: it sets how long a lost handshake packet
    /// waits before it is sent again (three times this at first). 100 ms (as Chromium uses)
    /// rather than RFC 9002's 333 ms: over a 30 ms link with 10% loss the 90th percentile of
    /// time to CONNACK drops from 1089 ms to 394 ms (`lossy_grid.rs`, `connect_times`); a path
    /// slower than that costs a spurious resend of the first flight, nothing more.
    pub initial_rtt: Duration,
    /// Data streams (EMQX's multi-stream mode) a client may have open at once besides its MQTT
    /// control stream, two-way and one-way each; 0 refuses them (single-stream mode). On a
    /// client, the streams a server may open (ways back, delivery streams).
    pub data_streams: u32,
    /// Offer QUIC datagrams (RFC 9221) for QoS 0 messages. Off by default: the transport
    /// parameter is sent only when this is on, so a peer sees no datagram support otherwise.
    pub datagrams: bool,
}

/// Bytes of received datagrams a connection buffers until they are read (older ones are
/// dropped beyond it), and of datagrams waiting to be sent.
const DATAGRAM_BUFFER: usize = 64 * 1024;

/// Most data streams a connection may be allowed: each may hold a stream window of our memory.
pub const MAX_DATA_STREAMS: u32 = 1024;

impl Default for TransportSettings {
    fn default() -> Self {
        TransportSettings {
            idle_timeout: Duration::from_secs(30),
            keep_alive: None,
            handshake_timeout: Duration::from_secs(10),
            stream_window: 1 << 20,
            connection_window: 4 << 20,
            send_window: 4 << 20,
            congestion: Congestion::default(),
            max_udp_payload: 1472,
            initial_mtu: 1200,
            initial_rtt: Duration::from_millis(100),
            data_streams: 16,
            datagrams: false,
        }
    }
}

/// Why a configuration is unusable.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A setting is out of range; the message names it and the allowed range.
    #[error("invalid setting: {0}")]
    Invalid(String),
    /// The TLS part could not be built.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// The longest duration any setting may have: a year. Far beyond any sensible timeout, and far
/// from the overflow of `Instant + Duration`, which panics.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

pub(crate) fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

impl TransportSettings {
    /// Checks every value against what QUIC and quinn-proto accept.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.idle_timeout.is_zero() || IdleTimeout::try_from(self.idle_timeout).is_err() {
            return Err(invalid("idle_timeout must be above zero and below 2^62 ms"));
        }
        if let Some(k) = self.keep_alive {
            if k.is_zero() || k >= self.idle_timeout {
                return Err(invalid("keep_alive must be above zero and shorter than idle_timeout"));
            }
        }
        if self.handshake_timeout.is_zero() || self.handshake_timeout > MAX_DURATION {
            return Err(invalid("handshake_timeout must be above zero and at most a year"));
        }
        if self.idle_timeout > MAX_DURATION {
            return Err(invalid("idle_timeout must be at most a year"));
        }
        for (name, v) in [("stream_window", self.stream_window), ("connection_window", self.connection_window)] {
            if v == 0 || VarInt::from_u64(v).is_err() {
                return Err(invalid(format!("{name} must be between 1 and 2^62 - 1")));
            }
        }
        if self.data_streams > MAX_DATA_STREAMS {
            return Err(invalid(format!("data_streams must be at most {MAX_DATA_STREAMS}")));
        }
        if self.send_window == 0 {
            return Err(invalid("send_window must be above zero"));
        }
        if self.initial_rtt.is_zero() || self.initial_rtt > Duration::from_secs(10) {
            return Err(invalid("initial_rtt must be above zero and at most 10 s"));
        }
        if !(1200..=65527).contains(&self.max_udp_payload) {
            return Err(invalid("max_udp_payload must be between 1200 and 65527"));
        }
        if self.initial_mtu < 1200 || self.initial_mtu > self.max_udp_payload {
            return Err(invalid("initial_mtu must be between 1200 and max_udp_payload"));
        }
        Ok(())
    }

    /// quinn-proto's transport configuration for these settings (call `validate` first).
    pub(crate) fn quinn(&self) -> TransportConfig {
        let mut t = TransportConfig::default();
        t.max_idle_timeout(IdleTimeout::try_from(self.idle_timeout).ok());
        t.keep_alive_interval(self.keep_alive);
        t.stream_receive_window(VarInt::from_u64(self.stream_window).unwrap_or(VarInt::MAX));
        t.receive_window(VarInt::from_u64(self.connection_window).unwrap_or(VarInt::MAX));
        t.send_window(self.send_window);
        t.initial_mtu(self.initial_mtu);
        t.initial_rtt(self.initial_rtt);
        // The control stream and the data streams allowed besides it.
        t.max_concurrent_bidi_streams(VarInt::from_u32(self.data_streams.saturating_add(1)));
        // Some clients put their data streams one way (answers come on the control stream).
        t.max_concurrent_uni_streams(VarInt::from_u32(self.data_streams));
        if self.datagrams {
            t.datagram_receive_buffer_size(Some(DATAGRAM_BUFFER));
            t.datagram_send_buffer_size(DATAGRAM_BUFFER);
        } else {
            t.datagram_receive_buffer_size(None);
        }
        match self.congestion {
            Congestion::NewReno => t.congestion_controller_factory(Arc::new(NewRenoConfig::default())),
            Congestion::Cubic => t.congestion_controller_factory(Arc::new(CubicConfig::default())),
            Congestion::Bbr => t.congestion_controller_factory(Arc::new(crate::bbr::BbrConfig::default())),
        };
        t
    }
}

/// Configuration of a server (broker) endpoint.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Certificate and client-certificate policy.
    pub tls: ServerTls,
    /// Transport settings.
    pub transport: TransportSettings,
    /// Most connections served at once; more are refused (CONNECTION_REFUSED) before any state
    /// is kept for them.
    pub max_connections: usize,
    /// Most connections still in their handshake from one IP address; more are refused. Bounds
    /// what one address (or one spoofer) can make the server hold before anyone is
    /// authenticated.
    pub max_handshakes_per_ip: usize,
    /// Accept 0-RTT data from resuming clients. See the crate docs for the replay caveat.
    pub zero_rtt: bool,
    /// Validate client addresses with a stateless Retry before keeping any state (costs one
    /// round trip; protects against spoofed-source floods).
    pub stateless_retry: bool,
    /// Seed for connection IDs and other endpoint randomness when `secret` is not set: the
    /// same seed gives the same run. For simulations and tests only: 64 bits that anyone who
    /// knows the default can reproduce.
    pub seed: u64,
    /// 32 bytes from the operating system's random source, from which the stateless-reset key,
    /// the Retry/NEW_TOKEN key, connection-id randomness and the broker's assigned client ids
    /// are derived. The adapters fill it in; leave it `None` only where runs must replay from
    /// `seed`.
    pub secret: Option<Secret>,
    /// Connection ids a QUIC-LB-aware load balancer can route (see [`crate::cid`]): this
    /// server's id in every connection id it issues. `None`: random ids.
    pub load_balancer: Option<crate::cid::QuicLb>,
    /// With `load_balancer`: the shard of a sharded broker, written as the first nonce byte of
    /// every connection id (see [`crate::broker::shard::shard_of_datagram`]).
    pub shard: Option<u8>,
}

/// 32 bytes of key material from the operating system's random source (see
/// [`ServerConfig::secret`]). Its `Debug` output does not show them, so configurations can be
/// logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret([u8; 32]);

impl Secret {
    /// Wraps key material (32 bytes from the OS random source; fixed bytes only in tests).
    pub fn new(bytes: [u8; 32]) -> Secret {
        Secret(bytes)
    }

    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl ServerConfig {
    /// Defaults around a TLS identity.
    pub fn new(tls: ServerTls) -> ServerConfig {
        ServerConfig {
            tls,
            transport: TransportSettings::default(),
            max_connections: 10_000,
            max_handshakes_per_ip: 64,
            zero_rtt: true,
            stateless_retry: false,
            seed: 0,
            secret: None,
            load_balancer: None,
            shard: None,
        }
    }
}

/// Configuration of a client endpoint.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientConfig {
    /// How the server is trusted, and an optional client certificate.
    pub tls: ClientTls,
    /// Transport settings.
    pub transport: TransportSettings,
    /// Keep session tickets and send the first stream data as 0-RTT when resuming.
    pub zero_rtt: bool,
    /// Seed for connection IDs and other endpoint randomness when `secret` is not set (see
    /// [`ServerConfig::seed`]).
    pub seed: u64,
    /// 32 bytes from the operating system's random source for the endpoint's keys and
    /// connection ids (see [`ServerConfig::secret`]); the adapters fill it in.
    pub secret: Option<Secret>,
    /// Connection ids that tell this endpoint's packets from a server's on a shared UDP socket,
    /// carrying this marker (see [`crate::cid::tagged_marker`]): what a broker's bridges use.
    pub tagged_cids: Option<u8>,
}

impl ClientConfig {
    /// Defaults around a trust policy.
    pub fn new(tls: ClientTls) -> ClientConfig {
        ClientConfig {
            tls,
            transport: TransportSettings::default(),
            zero_rtt: true,
            seed: 0,
            secret: None,
            tagged_cids: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_named() {
        assert!(TransportSettings::default().validate().is_ok());
        let mut t = TransportSettings { keep_alive: Some(Duration::from_secs(60)), ..Default::default() };
        assert!(matches!(t.validate(), Err(ConfigError::Invalid(m)) if m.contains("keep_alive")));
        t.keep_alive = None;
        t.max_udp_payload = 100;
        assert!(matches!(t.validate(), Err(ConfigError::Invalid(m)) if m.contains("max_udp_payload")));
        t.max_udp_payload = 1472;
        t.stream_window = 0;
        assert!(matches!(t.validate(), Err(ConfigError::Invalid(m)) if m.contains("stream_window")));
    }
}
