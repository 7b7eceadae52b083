//! The QUIC machine: one quinn-proto endpoint and its connections, each carrying an MQTT byte
//! stream (EMQX single-stream mode) and, in EMQX's multi-stream mode, data streams besides it
//! ([`Lane`]), plus QUIC datagrams (RFC 9221) where both sides enabled them.
//!
//! The client's first bidirectional stream is the control stream: its end ends the connection.
//! Later streams are data streams, each ending on its own ([`Event::LaneEnded`]) without
//! touching the connection. The client opens them; a server opens one only as the way back of
//! a client's one-way stream (see the broker's `lanes`).
//!
//! The same type serves both ends: built with [`QuicEndpoint::server`] it accepts connections,
//! with [`QuicEndpoint::client`] it opens them (any number, to any servers, each addressed by a
//! [`ConnId`]). The endpoint/connection event exchange of quinn-proto stays inside.

use crate::config::{ClientConfig, ConfigError, Secret, ServerConfig, TransportSettings};
use crate::machine::Datagram;
use crate::rng::SplitMix64;
use crate::timers::TimerIndex;
use bytes::{Bytes, BytesMut};
use quinn_proto::{
    ConnectionError, ConnectionHandle, DatagramEvent, Dir, EcnCodepoint, Event as QuinnEvent, Incoming, ReadError,
    SendDatagramError, StreamEvent, StreamId, VarInt, WriteError,
};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};
use thiserror::Error;

/// How long a finished MQTT stream may take to be acknowledged before the connection is closed
/// anyway: the peer has had the session's last bytes resent for this long, or does not want
/// them.
const FINISH_GRACE: Duration = Duration::from_secs(5);

/// Identifies one connection of an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub usize);

/// One MQTT stream of a connection, by its QUIC stream id: [`Lane::CONTROL`] (the client's first
/// bidirectional stream, the only one in single-stream mode) or a data stream. Data streams are
/// bidirectional (EMQX's multi-stream mode: answers and deliveries travel on them) or, as some
/// clients open them, unidirectional from the client (packets for the connection's session,
/// answered on the control stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lane(pub u64);

impl Lane {
    /// The control stream: CONNECT, AUTH, PINGREQ, DISCONNECT (and everything else in
    /// single-stream mode).
    pub const CONTROL: Lane = Lane(0);

    /// Whether this is the control stream.
    pub fn is_control(self) -> bool {
        self == Lane::CONTROL
    }

    /// Whether this stream goes one way only (from the side that opened it).
    pub fn is_unidirectional(self) -> bool {
        self.0 & 2 != 0
    }

    fn of(id: StreamId) -> Lane {
        Lane(VarInt::from(id).into_inner())
    }
}

/// How a data stream ended (see [`Event::LaneEnded`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum LaneEnd {
    /// The peer finished its side (FIN): it sends nothing more on it.
    #[error("the peer finished the stream")]
    Finished,
    /// The peer reset its side with this code.
    #[error("the peer reset the stream (code {0})")]
    Reset(u64),
    /// The peer asked us to stop sending on it (STOP_SENDING) with this code.
    #[error("the peer stopped reading the stream (code {0})")]
    Stopped(u64),
}

/// Why a datagram could not be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DatagramError {
    /// Datagrams are off on this side, or the peer did not offer them.
    #[error("QUIC datagrams were not negotiated with the peer")]
    NotNegotiated,
    /// Larger than the path allows now (see [`QuicEndpoint::max_datagram_size`]).
    #[error("the datagram is larger than the path allows")]
    TooLarge,
    /// The send buffer is full of datagrams QUIC has not sent yet: this one is dropped.
    #[error("the datagram send buffer is full")]
    Full,
    /// No such connection.
    #[error("unknown or closed connection")]
    UnknownConnection,
}

/// Application error codes sent in CONNECTION_CLOSE.
pub mod close_code {
    /// The MQTT stream ended (FIN) or the application closed normally.
    pub const NORMAL: u32 = 0;
    /// The peer reset the MQTT stream, or opened the wrong kind of stream.
    pub const STREAM_ERROR: u32 = 1;
    /// The handshake did not complete in time.
    pub const HANDSHAKE_TIMEOUT: u32 = 2;
    /// The peer did not read what was sent to it fast enough (a broker's slow-consumer limit).
    pub const SLOW_CONSUMER: u32 = 3;
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum CloseReason {
    /// The peer finished the MQTT stream (FIN): it will send nothing more.
    #[error("the peer ended the MQTT stream")]
    StreamFinished,
    /// The peer reset the MQTT stream with this code.
    #[error("the peer reset the MQTT stream (code {0})")]
    StreamReset(u64),
    /// The peer closed the connection with an application code and reason.
    #[error("the peer closed the connection (code {code}: {reason})")]
    PeerClosed {
        /// The code.
        code: u64,
        /// The peer's reason text (lossily decoded).
        reason: String,
    },
    /// Nothing was heard for the idle timeout.
    #[error("nothing heard from the peer within the idle timeout")]
    TimedOut,
    /// The handshake did not complete within the handshake timeout.
    #[error("the QUIC handshake did not complete in time (is a broker listening on that UDP port?)")]
    HandshakeTimeout,
    /// The server refused the connection (for example, at its connection limit).
    #[error("the server refused the connection")]
    Refused,
    /// This side closed it ([`QuicEndpoint::close`] or [`QuicEndpoint::finish`]).
    #[error("closed by this side")]
    Local,
    /// A transport or TLS failure; the text says which.
    #[error("{0}")]
    Transport(String),
}

/// What the machine reports. Drained with [`QuicEndpoint::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The handshake completed. Fires once per connection. `zero_rtt` says, on a client, whether
    /// the server accepted the data sent as 0-RTT (`None`: none was attempted).
    Connected {
        /// The connection.
        conn: ConnId,
        /// The peer's address.
        remote: SocketAddr,
        /// 0-RTT outcome on a client; on a server, whether the client's early data was accepted.
        zero_rtt: Option<bool>,
    },
    /// Bytes arrived on the MQTT stream, in order. Fires as often as data arrives.
    Received {
        /// The connection.
        conn: ConnId,
        /// The bytes.
        data: Bytes,
    },
    /// The peer opened a data stream (a client's, on a server in multi-stream mode; a server's
    /// way back, or a broker's delivery stream, on a client). Fires once per stream; its bytes
    /// follow as [`Event::LaneReceived`].
    LaneOpened {
        /// The connection.
        conn: ConnId,
        /// The stream.
        lane: Lane,
    },
    /// Bytes arrived on a data stream, in order. Fires as often as data arrives.
    LaneReceived {
        /// The connection.
        conn: ConnId,
        /// The stream.
        lane: Lane,
        /// The bytes.
        data: Bytes,
    },
    /// A data stream ended on the peer's side. Fires once per stream; the connection goes on.
    /// After a FIN, what is still sent on the stream goes out; otherwise the stream is gone.
    LaneEnded {
        /// The connection.
        conn: ConnId,
        /// The stream.
        lane: Lane,
        /// How.
        reason: LaneEnd,
    },
    /// A QUIC datagram arrived. Fires once per datagram.
    DatagramReceived {
        /// The connection.
        conn: ConnId,
        /// Its payload.
        data: Bytes,
    },
    /// The peer's address changed and the connection followed it (a NAT rebinding, or the
    /// client moving to another network). Fires once per change.
    Migrated {
        /// The connection.
        conn: ConnId,
        /// The peer's new address.
        remote: SocketAddr,
    },
    /// The connection ended. Fires once; the [`ConnId`] is then stale. A closure not preceded by
    /// an MQTT DISCONNECT is an ungraceful disconnect for the MQTT layer.
    Closed {
        /// The connection.
        conn: ConnId,
        /// Why.
        reason: CloseReason,
    },
}

/// A datagram to send: `buf[..size]` of the buffer given to [`QuicEndpoint::poll_transmit`],
/// or, from [`QuicEndpoint::poll_transmit_batch`], several datagrams to one destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a transmit is a datagram to send: dropping it loses it"]
pub struct Transmit {
    /// Where to.
    pub destination: SocketAddr,
    /// ECN codepoint to set, if any.
    pub ecn: Option<EcnCodepoint>,
    /// Bytes written into the buffer.
    pub size: usize,
    /// Source address to send from, when the endpoint has several.
    pub src_ip: Option<IpAddr>,
    /// When set, the bytes are consecutive datagrams of this size (the last may be shorter), for
    /// one generic segmentation offload (GSO) send; [`Transmit::datagrams`] splits them for a
    /// socket without it.
    pub segment_size: Option<usize>,
}

impl Transmit {
    /// The datagrams in `buf` (the buffer this transmit was written into).
    pub fn datagrams<'a>(&self, buf: &'a [u8]) -> impl Iterator<Item = &'a [u8]> {
        let data = &buf[..self.size];
        data.chunks(self.segment_size.unwrap_or(self.size).max(1))
    }
}

pub use crate::error::CommandError;

/// A data stream of a connection.
struct DataLane {
    id: StreamId,
    /// Bytes waiting for flow-control credit.
    outbound: VecDeque<Bytes>,
    /// This side asked to finish it once `outbound` is written.
    finish_requested: bool,
    /// This side's FIN is sent (or the peer stopped the stream).
    finished: bool,
    /// The peer's side ended (FIN read, or reset).
    recv_done: bool,
}

struct Conn {
    quic: quinn_proto::Connection,
    /// The peer's address as last reported (to see a migration).
    remote: SocketAddr,
    /// The MQTT stream (the control stream), once opened (client) or accepted (server).
    stream: Option<StreamId>,
    /// Bytes waiting for flow-control credit.
    outbound: VecDeque<Bytes>,
    /// Bytes waiting on all the connection's streams.
    queued: usize,
    /// Bytes QUIC has taken from the connection's streams so far: progress, for a
    /// stalled-writer check.
    written: u64,
    /// Client bytes written before the handshake completed, kept to resend if 0-RTT is rejected.
    early: Vec<Bytes>,
    /// Data streams (multi-stream mode), by QUIC stream id.
    lanes: BTreeMap<Lane, DataLane>,
    /// Most data streams accepted from the peer at once.
    lane_limit: usize,
    finish_requested: bool,
    finished: bool,
    connected: bool,
    handshake_deadline: Option<Instant>,
    /// After `finish`: when the connection is closed even if the peer never acknowledged the
    /// end of the stream (a peer that keeps the connection alive without taking our FIN).
    finish_deadline: Option<Instant>,
    closed_reported: bool,
    /// A server connection in its handshake: the source address it counts against.
    handshake_ip: Option<std::net::IpAddr>,
}

/// Writes `outbound` to stream `id` while flow control allows, counting into `queued` and
/// `written`; each chunk (or part) taken goes to `sent`. Returns false when the peer stopped
/// the stream (what waited is dropped).
fn write_queue(
    quic: &mut quinn_proto::Connection,
    id: StreamId,
    outbound: &mut VecDeque<Bytes>,
    queued: &mut usize,
    written: &mut u64,
    mut sent: impl FnMut(Bytes),
) -> bool {
    while let Some(front) = outbound.front_mut() {
        match quic.send_stream(id).write(front) {
            Ok(n) if n == front.len() => {
                *queued -= n;
                *written += n as u64;
                sent(outbound.pop_front().unwrap_or_default());
            }
            Ok(n) => {
                *queued -= n;
                *written += n as u64;
                sent(front.split_to(n));
                return true;
            }
            Err(WriteError::Blocked) => return true,
            Err(WriteError::Stopped(_)) | Err(WriteError::ClosedStream) => {
                *queued -= outbound.iter().map(Bytes::len).sum::<usize>();
                outbound.clear();
                return false;
            }
        }
    }
    true
}

impl Conn {
    fn new(quic: quinn_proto::Connection, now: Instant, settings: &TransportSettings) -> Conn {
        let lane_limit = settings.data_streams as usize;
        Conn {
            remote: quic.remote_address(),
            quic,
            stream: None,
            outbound: VecDeque::new(),
            queued: 0,
            written: 0,
            early: Vec::new(),
            lanes: BTreeMap::new(),
            lane_limit,
            finish_requested: false,
            finished: false,
            connected: false,
            handshake_ip: None,
            handshake_deadline: Some(now + settings.handshake_timeout),
            finish_deadline: None,
            closed_reported: false,
        }
    }

    /// Writes queued bytes while flow control allows; finishes streams once asked and empty.
    /// Keeps `queued` and `written` in step.
    fn flush(&mut self) {
        if self.stream.is_none() && self.quic.side().is_client() && !self.outbound.is_empty() {
            // Opening succeeds once the server's stream limit is known: after the handshake, or
            // at once when resuming with 0-RTT.
            self.stream = self.quic.streams().open(Dir::Bi);
        }
        if let Some(id) = self.stream {
            let (connected, early) = (self.connected, &mut self.early);
            write_queue(&mut self.quic, id, &mut self.outbound, &mut self.queued, &mut self.written, |b| {
                if !connected {
                    early.push(b);
                }
            });
            if self.outbound.is_empty() && self.finish_requested && !self.finished {
                self.finished = self.quic.send_stream(id).finish().is_ok();
            }
        }
        let mut done = Vec::new();
        for (index, lane) in &mut self.lanes {
            let open =
                write_queue(&mut self.quic, lane.id, &mut lane.outbound, &mut self.queued, &mut self.written, drop);
            if !open {
                lane.finished = true;
            } else if lane.outbound.is_empty() && lane.finish_requested && !lane.finished {
                lane.finished = true;
                let _ = self.quic.send_stream(lane.id).finish();
            }
            if lane.finished && lane.recv_done {
                done.push(*index);
            }
        }
        for index in done {
            self.lanes.remove(&index);
        }
    }

    /// Ends a data stream both ways at once (RESET_STREAM and STOP_SENDING) and forgets it.
    fn reset_lane(&mut self, index: Lane, code: u32) {
        if let Some(lane) = self.lanes.remove(&index) {
            self.queued -= lane.outbound.iter().map(Bytes::len).sum::<usize>();
            let ours = lane.id.initiator() == self.quic.side();
            if lane.id.dir() == Dir::Bi || ours {
                let _ = self.quic.send_stream(lane.id).reset(VarInt::from_u32(code));
            }
            if !lane.recv_done && (lane.id.dir() == Dir::Bi || !ours) {
                let _ = self.quic.recv_stream(lane.id).stop(VarInt::from_u32(code));
            }
        }
    }

    /// Data streams the peer opened that are still open (what its allowance counts).
    fn peer_lanes(&self) -> usize {
        let side = self.quic.side();
        self.lanes.values().filter(|l| l.id.initiator() != side).count()
    }
}

/// The wall clock quinn-proto consults for address-validation (Retry) tokens, driven by the
/// `now` of every call instead of the system clock: the core reads no clock. Token times only
/// matter relative to each other, so the epoch is arbitrary.
#[derive(Debug, Default)]
struct DrivenClock {
    first: OnceLock<Instant>,
    elapsed_ns: AtomicU64,
}

impl DrivenClock {
    fn advance(&self, now: Instant) {
        let first = *self.first.get_or_init(|| now);
        let ns = u64::try_from(now.saturating_duration_since(first).as_nanos()).unwrap_or(u64::MAX);
        self.elapsed_ns.fetch_max(ns, Ordering::Relaxed);
    }
}

impl quinn_proto::TimeSource for DrivenClock {
    fn now(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_nanos(self.elapsed_ns.load(Ordering::Relaxed))
    }
}

/// The sans-IO QUIC endpoint. See the crate docs for the driving contract.
pub struct QuicEndpoint {
    inner: quinn_proto::Endpoint,
    client: Option<quinn_proto::ClientConfig>,
    settings: TransportSettings,
    max_connections: usize,
    max_handshakes_per_ip: usize,
    stateless_retry: bool,
    /// Boxed: a connection is several KiB, and a map's nodes hold their values inline (each
    /// half-empty node would waste that much per free slot).
    conns: BTreeMap<usize, Box<Conn>>,
    /// Accepted connections still in their handshake, by source address (the per-address
    /// bound on handshakes in flight), kept up to date so a new one is checked without
    /// scanning every connection.
    handshaking: BTreeMap<std::net::IpAddr, usize>,
    /// Bytes queued on all connections' MQTT streams (the sum of their `queued`).
    queued_total: usize,
    events: VecDeque<Event>,
    /// Datagrams the endpoint itself produced (version negotiation, retry, refusals, resets).
    responses: VecDeque<(Transmit, Vec<u8>)>,
    /// Round-robin position for fairness between connections in `poll_transmit`.
    cursor: usize,
    /// Connections that may have something to send (touched since they last had nothing), so
    /// `poll_transmit` never scans idle ones.
    ready: BTreeSet<usize>,
    /// Every connection's next deadline, ordered, so `poll_timeout` and `handle_timeout` never
    /// scan all connections.
    timers: TimerIndex<usize>,
    clock: Arc<DrivenClock>,
    /// What the endpoint has seen so far (see [`QuicEndpoint::metrics`]).
    counters: QuicCounters,
}

/// Counts of a QUIC endpoint's life, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuicCounters {
    /// Handshakes completed.
    pub handshakes: u64,
    /// Of those, the ones whose 0-RTT data was accepted (a resumed client's CONNECT with its
    /// first flight).
    pub zero_rtt_accepted: u64,
    /// Connections whose peer moved to another address (NAT rebinding, a phone changing
    /// networks) and stayed up.
    pub migrations: u64,
    /// Packets declared lost, by connections that have closed.
    pub lost_packets_closed: u64,
    /// Packets sent, by connections that have closed.
    pub sent_packets_closed: u64,
}

/// A snapshot of a QUIC endpoint for metrics: its counters and its open connections' paths.
#[derive(Debug, Clone, Default)]
pub struct QuicMetrics {
    /// Counts so far.
    pub counters: QuicCounters,
    /// Packets declared lost, by every connection so far (open and closed).
    pub lost_packets: u64,
    /// Packets sent, by every connection so far.
    pub sent_packets: u64,
    /// Each established connection's smoothed round-trip time.
    pub rtts: Vec<Duration>,
    /// Each established connection's congestion window, bytes.
    pub cwnds: Vec<u64>,
}

fn seed_bytes(seed: u64, domain: u8) -> [u8; 32] {
    // Spread a 64-bit seed over 32 bytes, distinctly per use.
    let mut rng = SplitMix64::new(seed ^ (u64::from(domain) << 56) ^ 0x9E37_79B9_7F4A_7C15);
    let mut out = [0u8; 32];
    for chunk in out.chunks_mut(8) {
        chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    out
}

/// 32 bytes of key material for one use (`domain`): derived from the configured secret (an
/// HMAC-SHA256 of the domain, keyed with the operating system's random bytes the adapter put
/// there), or, for replayable runs without one, spread from the 64-bit seed.
pub(crate) fn derive_key(secret: Option<&Secret>, seed: u64, domain: u8) -> [u8; 32] {
    match secret {
        Some(secret) => {
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.bytes());
            let tag = ring::hmac::sign(&key, &[b'm', b'q', b't', b't', b'q', domain]);
            let mut out = [0u8; 32];
            out.copy_from_slice(tag.as_ref());
            out
        }
        None => seed_bytes(seed, domain),
    }
}

/// Key-material domains.
pub(crate) mod domain {
    pub const RESET: u8 = 1;
    pub const RNG: u8 = 2;
    pub const TOKEN: u8 = 3;
    pub const CLIENT_ID: u8 = 4;
    pub const CID: u8 = 5;
    pub const BRIDGE: u8 = 6;
}

fn endpoint_config(
    secret: Option<&Secret>,
    seed: u64,
    settings: &TransportSettings,
) -> Result<quinn_proto::EndpointConfig, ConfigError> {
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &derive_key(secret, seed, domain::RESET));
    let mut config = quinn_proto::EndpointConfig::new(Arc::new(reset_key));
    config
        .max_udp_payload_size(settings.max_udp_payload)
        .map_err(|e| ConfigError::Invalid(format!("max_udp_payload: {e}")))?;
    config.rng_seed(Some(derive_key(secret, seed, domain::RNG)));
    Ok(config)
}

/// quinn-proto's server configuration for `config`, its tokens timed by `clock`.
fn quinn_server_config(
    config: &ServerConfig,
    clock: &Arc<DrivenClock>,
) -> Result<quinn_proto::ServerConfig, ConfigError> {
    let tls = config.tls.rustls_config(config.zero_rtt)?;
    let crypto = quinn_proto::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| ConfigError::Invalid(format!("TLS configuration unusable for QUIC: {e}")))?;
    let token_key = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, &[]).extract(&derive_key(
        config.secret.as_ref(),
        config.seed,
        domain::TOKEN,
    ));
    let mut server = quinn_proto::ServerConfig::new(Arc::new(crypto), Arc::new(token_key));
    server.transport_config(Arc::new(config.transport.quinn()));
    server.migration(true);
    server.time_source(clock.clone());
    Ok(server)
}

impl QuicEndpoint {
    /// A server endpoint.
    pub fn server(config: &ServerConfig) -> Result<QuicEndpoint, ConfigError> {
        config.transport.validate()?;
        if config.max_connections == 0 || config.max_handshakes_per_ip == 0 {
            return Err(ConfigError::Invalid("max_connections and max_handshakes_per_ip must be at least 1".into()));
        }
        let clock = Arc::new(DrivenClock::default());
        let server = quinn_server_config(config, &clock)?;
        let mut endpoint_config = endpoint_config(config.secret.as_ref(), config.seed, &config.transport)?;
        if let Some(lb) = &config.load_balancer {
            lb.validate()?;
            let (lb, key) = (lb.clone(), derive_key(config.secret.as_ref(), config.seed, domain::CID));
            let shard = config.shard;
            endpoint_config
                .cid_generator(move || Box::new(crate::cid::QuicLbGenerator::new(lb.clone(), key, shard)) as Box<_>);
        }
        let inner = quinn_proto::Endpoint::new(Arc::new(endpoint_config), Some(Arc::new(server)), false, None);
        let mut endpoint =
            QuicEndpoint::with(inner, None, config.transport.clone(), config.max_connections, config.stateless_retry);
        endpoint.max_handshakes_per_ip = config.max_handshakes_per_ip;
        endpoint.clock = clock;
        Ok(endpoint)
    }

    /// Serves new connections with `config`'s certificate (and client-certificate rules, and
    /// transport settings); connections already open keep theirs. How a broker rotates its
    /// certificate without dropping anyone. Address validation tokens issued before stay valid
    /// (their key comes from the same secret).
    pub fn set_server_config(&mut self, config: &ServerConfig) -> Result<(), ConfigError> {
        let server = quinn_server_config(config, &self.clock)?;
        self.inner.set_server_config(Some(Arc::new(server)));
        Ok(())
    }

    /// A client endpoint, able to open any number of connections.
    pub fn client(config: &ClientConfig) -> Result<QuicEndpoint, ConfigError> {
        config.transport.validate()?;
        let tls = config.tls.rustls_config(config.zero_rtt)?;
        let crypto = quinn_proto::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| ConfigError::Invalid(format!("TLS configuration unusable for QUIC: {e}")))?;
        let mut client = quinn_proto::ClientConfig::new(Arc::new(crypto));
        client.transport_config(Arc::new(config.transport.quinn()));
        let mut endpoint_config = endpoint_config(config.secret.as_ref(), config.seed, &config.transport)?;
        if let Some(marker) = config.tagged_cids {
            let key = derive_key(config.secret.as_ref(), config.seed, domain::CID);
            endpoint_config.cid_generator(move || Box::new(crate::cid::TaggedCidGenerator::new(key, marker)) as Box<_>);
        }
        let inner = quinn_proto::Endpoint::new(Arc::new(endpoint_config), None, false, None);
        Ok(QuicEndpoint::with(inner, Some(client), config.transport.clone(), usize::MAX, false))
    }

    fn with(
        inner: quinn_proto::Endpoint,
        client: Option<quinn_proto::ClientConfig>,
        settings: TransportSettings,
        max_connections: usize,
        stateless_retry: bool,
    ) -> QuicEndpoint {
        QuicEndpoint {
            inner,
            client,
            settings,
            max_connections,
            max_handshakes_per_ip: usize::MAX,
            stateless_retry,
            conns: BTreeMap::new(),
            handshaking: BTreeMap::new(),
            queued_total: 0,
            events: VecDeque::new(),
            responses: VecDeque::new(),
            cursor: 0,
            ready: BTreeSet::new(),
            timers: TimerIndex::new(),
            clock: Arc::default(),
            counters: QuicCounters::default(),
        }
    }

    /// What the endpoint has seen so far, and where its open connections stand (round-trip
    /// times and congestion windows, one entry per established connection).
    pub fn metrics(&self) -> QuicMetrics {
        let mut m = QuicMetrics { counters: self.counters, ..QuicMetrics::default() };
        m.lost_packets = self.counters.lost_packets_closed;
        m.sent_packets = self.counters.sent_packets_closed;
        for c in self.conns.values() {
            let path = c.quic.stats().path;
            m.lost_packets += path.lost_packets;
            m.sent_packets += path.sent_packets;
            if c.connected {
                m.rtts.push(path.rtt);
                m.cwnds.push(path.cwnd);
            }
        }
        m
    }

    /// The end-entity certificate (DER) a connection's peer presented, if it presented one
    /// (a server that requires client certificates has verified it).
    pub fn peer_certificate(&self, conn: ConnId) -> Option<Vec<u8>> {
        let identity = self.conns.get(&conn.0)?.quic.crypto_session().peer_identity()?;
        let chain = identity.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok()?;
        chain.first().map(|c| c.to_vec())
    }

    /// Number of open connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// The peer address of a connection (it changes when the client migrates).
    pub fn remote_address(&self, conn: ConnId) -> Option<SocketAddr> {
        self.conns.get(&conn.0).map(|c| c.quic.remote_address())
    }

    /// Opens a connection to `remote`, verifying its certificate for `server_name`. The MQTT
    /// stream opens with the first bytes given to [`QuicEndpoint::send`]; bytes sent before the
    /// handshake completes go out as 0-RTT when a session ticket allows it.
    pub fn connect(&mut self, now: Instant, remote: SocketAddr, server_name: &str) -> Result<ConnId, CommandError> {
        let config = self.client.clone().ok_or(CommandError::NotAClient)?;
        let (handle, quic) =
            self.inner.connect(now, config, remote, server_name).map_err(|e| CommandError::Connect(e.to_string()))?;
        self.conns.insert(handle.0, Box::new(Conn::new(quic, now, &self.settings)));
        self.drive(now, handle);
        Ok(ConnId(handle.0))
    }

    /// Queues bytes on the MQTT stream of `conn`. They are sent as flow control allows, in order.
    pub fn send(&mut self, now: Instant, conn: ConnId, data: Bytes) -> Result<(), CommandError> {
        let c = self.conns.get_mut(&conn.0).ok_or(CommandError::UnknownConnection)?;
        if c.finish_requested {
            return Err(CommandError::Finished);
        }
        if !data.is_empty() {
            c.queued += data.len();
            self.queued_total += data.len();
            c.outbound.push_back(data);
        }
        self.drive(now, ConnectionHandle(conn.0));
        Ok(())
    }

    /// Opens a two-way data stream, once connected: a client's in multi-stream mode, or a
    /// server's way back for a one-way stream of its client (where the client allows the server
    /// streams). The peer learns of it with the first bytes sent on it.
    pub fn open_lane(&mut self, now: Instant, conn: ConnId) -> Result<Lane, CommandError> {
        let c = self.conns.get_mut(&conn.0).ok_or(CommandError::UnknownConnection)?;
        // The control stream is the first: data streams wait for it and for the handshake.
        if !c.connected || c.stream.is_none() || c.finish_requested {
            return Err(CommandError::NotConnected);
        }
        let id = c.quic.streams().open(Dir::Bi).ok_or(CommandError::StreamLimit)?;
        let lane =
            DataLane { id, outbound: VecDeque::new(), finish_requested: false, finished: false, recv_done: false };
        c.lanes.insert(Lane::of(id), lane);
        self.drive(now, ConnectionHandle(conn.0));
        Ok(Lane::of(id))
    }

    /// Opens a one-way data stream to the server (as some clients put their data streams):
    /// what is sent on it is answered on the control stream.
    pub fn open_uni_lane(&mut self, now: Instant, conn: ConnId) -> Result<Lane, CommandError> {
        let c = self.conns.get_mut(&conn.0).ok_or(CommandError::UnknownConnection)?;
        if !c.quic.side().is_client() {
            return Err(CommandError::NotAClient);
        }
        if !c.connected || c.stream.is_none() || c.finish_requested {
            return Err(CommandError::NotConnected);
        }
        let id = c.quic.streams().open(Dir::Uni).ok_or(CommandError::StreamLimit)?;
        let lane =
            DataLane { id, outbound: VecDeque::new(), finish_requested: false, finished: false, recv_done: true };
        c.lanes.insert(Lane::of(id), lane);
        self.drive(now, ConnectionHandle(conn.0));
        Ok(Lane::of(id))
    }

    /// Queues bytes on one stream of `conn`: the control stream is [`QuicEndpoint::send`]'s.
    pub fn send_lane(&mut self, now: Instant, conn: ConnId, lane: Lane, data: Bytes) -> Result<(), CommandError> {
        if lane.is_control() {
            return self.send(now, conn, data);
        }
        let c = self.conns.get_mut(&conn.0).ok_or(CommandError::UnknownConnection)?;
        let l = c.lanes.get_mut(&lane).ok_or(CommandError::UnknownStream)?;
        if l.finish_requested || l.finished {
            return Err(CommandError::Finished);
        }
        if !data.is_empty() {
            c.queued += data.len();
            self.queued_total += data.len();
            l.outbound.push_back(data);
        }
        self.drive(now, ConnectionHandle(conn.0));
        Ok(())
    }

    /// Finishes a data stream after what is queued on it (FIN); it is forgotten once the peer
    /// has ended its side too.
    pub fn finish_lane(&mut self, now: Instant, conn: ConnId, lane: Lane) -> Result<(), CommandError> {
        let c = self.conns.get_mut(&conn.0).ok_or(CommandError::UnknownConnection)?;
        c.lanes.get_mut(&lane).ok_or(CommandError::UnknownStream)?.finish_requested = true;
        self.drive(now, ConnectionHandle(conn.0));
        Ok(())
    }

    /// Ends a data stream at once, both ways, with an application error code (what waited on
    /// it is dropped). The connection goes on.
    pub fn reset_lane(&mut self, now: Instant, conn: ConnId, lane: Lane, code: u32) -> Result<(), CommandError> {
        let c = self.conns.get_mut(&conn.0).ok_or(CommandError::UnknownConnection)?;
        if !c.lanes.contains_key(&lane) {
            return Err(CommandError::UnknownStream);
        }
        let before = c.queued;
        c.reset_lane(lane, code);
        self.queued_total -= before - c.queued;
        self.drive(now, ConnectionHandle(conn.0));
        Ok(())
    }

    /// Sets a data stream's send priority: when several streams have bytes waiting, the
    /// higher one's go first (equal ones share). The control stream stays at 0.
    pub fn set_lane_priority(&mut self, conn: ConnId, lane: Lane, priority: i32) -> Result<(), CommandError> {
        let c = self.conns.get_mut(&conn.0).ok_or(CommandError::UnknownConnection)?;
        let id = c.lanes.get(&lane).ok_or(CommandError::UnknownStream)?.id;
        c.quic.send_stream(id).set_priority(priority).map_err(|_| CommandError::UnknownStream)
    }

    /// The data streams of `conn` now open, in order.
    pub fn lanes(&self, conn: ConnId) -> Vec<Lane> {
        self.conns.get(&conn.0).map_or_else(Vec::new, |c| c.lanes.keys().copied().collect())
    }

    /// Sends one QUIC datagram (RFC 9221): unreliable, unordered, never resent.
    pub fn send_datagram(&mut self, now: Instant, conn: ConnId, data: Bytes) -> Result<(), DatagramError> {
        let c = self.conns.get_mut(&conn.0).ok_or(DatagramError::UnknownConnection)?;
        if !self.settings.datagrams {
            return Err(DatagramError::NotNegotiated);
        }
        c.quic.datagrams().send(data, false).map_err(|e| match e {
            SendDatagramError::UnsupportedByPeer | SendDatagramError::Disabled => DatagramError::NotNegotiated,
            SendDatagramError::TooLarge => DatagramError::TooLarge,
            SendDatagramError::Blocked(_) => DatagramError::Full,
        })?;
        self.drive(now, ConnectionHandle(conn.0));
        Ok(())
    }

    /// The largest datagram `conn` can carry now, or `None` when datagrams were not negotiated
    /// (off on either side).
    pub fn max_datagram_size(&mut self, conn: ConnId) -> Option<usize> {
        let c = self.conns.get_mut(&conn.0)?;
        if !self.settings.datagrams {
            return None;
        }
        c.quic.datagrams().max_size()
    }

    /// Bytes queued on `conn` and not yet accepted by QUIC flow control (for back-pressure).
    pub fn queued(&self, conn: ConnId) -> usize {
        self.conns.get(&conn.0).map_or(0, |c| c.queued)
    }

    /// Whether this side has finished the connection's MQTT stream (see
    /// [`QuicEndpoint::finish`]): its session is over.
    pub fn is_finishing(&self, conn: ConnId) -> bool {
        self.conns.get(&conn.0).is_some_and(|c| c.finish_requested)
    }

    /// Bytes queued on all connections (for a global budget).
    pub fn queued_total(&self) -> usize {
        self.queued_total
    }

    /// Bytes of `conn`'s MQTT stream QUIC has taken so far: a counter that stands still while
    /// the peer grants no flow-control credit (a reader that stopped reading).
    pub fn written(&self, conn: ConnId) -> u64 {
        self.conns.get(&conn.0).map_or(0, |c| c.written)
    }

    /// Finishes the MQTT stream after the queued bytes (FIN), then closes the connection
    /// normally once the peer has them. A server closes it at most five seconds later anyway:
    /// a session that ended does not keep its connection for a peer that takes nothing.
    pub fn finish(&mut self, now: Instant, conn: ConnId) -> Result<(), CommandError> {
        let c = self.conns.get_mut(&conn.0).ok_or(CommandError::UnknownConnection)?;
        c.finish_requested = true;
        if !c.quic.side().is_client() {
            c.finish_deadline.get_or_insert(now + FINISH_GRACE);
        }
        if c.stream.is_none() && !c.quic.side().is_client() {
            // The client never opened an MQTT stream (the session ended on its connect
            // timeout): there is nothing to finish, so the connection closes now instead of
            // being held until the idle timeout.
            c.quic.close(now, VarInt::from_u32(close_code::NORMAL), Bytes::from_static(b"no MQTT stream"));
        }
        self.drive(now, ConnectionHandle(conn.0));
        Ok(())
    }

    /// Closes the connection at once with an application error code.
    pub fn close(&mut self, now: Instant, conn: ConnId, code: u32, reason: &str) -> Result<(), CommandError> {
        let c = self.conns.get_mut(&conn.0).ok_or(CommandError::UnknownConnection)?;
        c.quic.close(now, VarInt::from_u32(code), Bytes::copy_from_slice(reason.as_bytes()));
        self.drive(now, ConnectionHandle(conn.0));
        Ok(())
    }

    /// The client's address changed (new network, or the adapter rebound its socket): probe the
    /// path from the new address. The server follows on its own.
    pub fn local_address_changed(&mut self, now: Instant, conn: ConnId) -> Result<(), CommandError> {
        let c = self.conns.get_mut(&conn.0).ok_or(CommandError::UnknownConnection)?;
        c.quic.local_address_changed();
        self.drive(now, ConnectionHandle(conn.0));
        Ok(())
    }

    /// Feeds one received UDP datagram.
    pub fn handle_datagram(&mut self, now: Instant, datagram: Datagram<'_>) {
        self.clock.advance(now);
        let mut buf = Vec::new();
        let Datagram { remote, local_ip, ecn, data } = datagram;
        match self.inner.handle(now, remote, local_ip, ecn, BytesMut::from(data), &mut buf) {
            Some(DatagramEvent::ConnectionEvent(handle, event)) => {
                if let Some(c) = self.conns.get_mut(&handle.0) {
                    c.quic.handle_event(event);
                    self.drive(now, handle);
                }
            }
            Some(DatagramEvent::NewConnection(incoming)) => self.incoming(now, incoming),
            Some(DatagramEvent::Response(t)) => self.respond(t, buf),
            None => {}
        }
    }

    fn respond(&mut self, t: quinn_proto::Transmit, buf: Vec<u8>) {
        let transmit =
            Transmit { destination: t.destination, ecn: t.ecn, size: t.size, src_ip: t.src_ip, segment_size: None };
        self.responses.push_back((transmit, buf));
    }

    fn incoming(&mut self, now: Instant, incoming: Incoming) {
        let mut buf = Vec::new();
        let ip = incoming.remote_address().ip();
        let handshaking_from_ip = self.handshaking.get(&ip).copied().unwrap_or(0);
        if self.conns.len() >= self.max_connections || handshaking_from_ip >= self.max_handshakes_per_ip {
            let t = self.inner.refuse(incoming, &mut buf);
            self.respond(t, buf);
            return;
        }
        if self.stateless_retry && !incoming.remote_address_validated() && incoming.may_retry() {
            if let Ok(t) = self.inner.retry(incoming, &mut buf) {
                self.respond(t, buf);
            }
            return;
        }
        match self.inner.accept(incoming, now, &mut buf, None) {
            Ok((handle, quic)) => {
                let mut c = Box::new(Conn::new(quic, now, &self.settings));
                c.handshake_ip = Some(ip);
                *self.handshaking.entry(ip).or_default() += 1;
                self.conns.insert(handle.0, c);
                self.drive(now, handle);
            }
            Err(e) => {
                if let Some(t) = e.response {
                    self.respond(t, buf);
                }
            }
        }
    }

    /// Advances timers. Calling it early is harmless: nothing is due yet, nothing happens.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.clock.advance(now);
        // Left filed: driving each one re-files its next deadline.
        let due: Vec<usize> = self.timers.due(now).copied().collect();
        for h in due {
            if let Some(c) = self.conns.get_mut(&h) {
                if c.finish_deadline.is_some_and(|t| t <= now) {
                    c.finish_deadline = None;
                    c.quic.close(now, VarInt::from_u32(close_code::NORMAL), Bytes::from_static(b"finished"));
                }
                if c.handshake_deadline.is_some_and(|t| t <= now) {
                    c.handshake_deadline = None;
                    c.quic.close(
                        now,
                        VarInt::from_u32(close_code::HANDSHAKE_TIMEOUT),
                        Bytes::from_static(b"handshake timeout"),
                    );
                    if !c.closed_reported {
                        c.closed_reported = true;
                        self.events.push_back(Event::Closed { conn: ConnId(h), reason: CloseReason::HandshakeTimeout });
                    }
                }
                // quinn can re-arm a timer at an instant already past (a loss time in another
                // packet number space after a long gap): handle those too, so the deadline we
                // report after this call is in the future (found by the `broker_quic` fuzzer).
                for _ in 0..8 {
                    if c.quic.poll_timeout().is_none_or(|t| t > now) {
                        break;
                    }
                    c.quic.handle_timeout(now);
                }
            }
            self.drive(now, ConnectionHandle(h));
        }
    }

    /// The next instant [`QuicEndpoint::handle_timeout`] should be called, if any.
    #[must_use]
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        self.timers.next()
    }

    /// Files a connection's next deadline (or removes it, for a connection that is gone).
    fn rearm(&mut self, h: usize) {
        let next = self
            .conns
            .get_mut(&h)
            .and_then(|c| [c.quic.poll_timeout(), c.handshake_deadline, c.finish_deadline].into_iter().flatten().min());
        // Most calls find the deadline unchanged: the index then leaves both its maps alone
        // (each update is a remove and an insert in two B-trees, per datagram and per write).
        self.timers.set(h, next);
    }

    /// The next datagram to send, written into `buf` (which is cleared first).
    #[must_use]
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        self.poll_transmit_batch(now, 1, buf)
    }

    /// Like [`QuicEndpoint::poll_transmit`], but up to `max_datagrams` datagrams of one
    /// connection at once, for a socket with GSO (see [`Transmit::segment_size`]).
    #[must_use]
    pub fn poll_transmit_batch(&mut self, now: Instant, max_datagrams: usize, buf: &mut Vec<u8>) -> Option<Transmit> {
        if let Some((t, data)) = self.responses.pop_front() {
            buf.clear();
            buf.extend_from_slice(&data[..t.size]);
            return Some(t);
        }
        // Round robin over the connections that may have something to send, starting after
        // the one served last. One that has nothing leaves the set until it is touched again.
        while let Some(h) = self.ready.range(self.cursor..).next().or_else(|| self.ready.first()).copied() {
            let Some(c) = self.conns.get_mut(&h) else {
                self.ready.remove(&h);
                continue;
            };
            buf.clear();
            let sent = c.quic.poll_transmit(now, max_datagrams.max(1), buf);
            match sent {
                Some(t) => {
                    self.cursor = h + 1;
                    // Sending may have queued endpoint events (e.g. retired connection IDs),
                    // and moves the connection's timers.
                    self.drive(now, ConnectionHandle(h));
                    return Some(Transmit {
                        destination: t.destination,
                        ecn: t.ecn,
                        size: t.size,
                        src_ip: t.src_ip,
                        segment_size: t.segment_size,
                    });
                }
                None => {
                    self.ready.remove(&h);
                    // A paced connection arms a timer instead of sending.
                    self.rearm(h);
                }
            }
        }
        None
    }

    /// The next event, if any.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Runs the endpoint/connection exchange and turns quinn events into ours.
    fn drive(&mut self, now: Instant, handle: ConnectionHandle) {
        let Some(c) = self.conns.get_mut(&handle.0) else { return };
        // What this call adds to or takes from the connection's queues, for the total.
        let before = c.queued;
        while let Some(event) = c.quic.poll_endpoint_events() {
            if let Some(reply) = self.inner.handle_event(handle, event) {
                c.quic.handle_event(reply);
            }
        }
        let conn = ConnId(handle.0);
        while let Some(event) = c.quic.poll() {
            match event {
                QuinnEvent::Connected => {
                    c.connected = true;
                    handshake_over(&mut self.handshaking, c);
                    c.handshake_deadline = None;
                    // (quinn's `accepted_0rtt` means something only on a client; a server has
                    // 0-RTT keys only when it accepted the client's early data.)
                    let zero_rtt = if c.quic.side().is_client() {
                        c.quic.has_0rtt().then(|| c.quic.accepted_0rtt())
                    } else {
                        Some(c.quic.has_0rtt())
                    };
                    if c.quic.side().is_client() && zero_rtt == Some(false) {
                        // The server discarded the 0-RTT data and quinn dropped the streams it
                        // opened: open the MQTT stream again and resend the early bytes first.
                        c.stream = None;
                        for b in c.early.drain(..).rev() {
                            c.queued += b.len();
                            c.outbound.push_front(b);
                        }
                    }
                    c.early.clear();
                    self.counters.handshakes += 1;
                    self.counters.zero_rtt_accepted += u64::from(zero_rtt == Some(true));
                    self.events.push_back(Event::Connected { conn, remote: c.quic.remote_address(), zero_rtt });
                }
                QuinnEvent::Stream(StreamEvent::Opened { dir }) => {
                    while let Some(id) = c.quic.streams().accept(dir) {
                        if dir == Dir::Bi && c.stream.is_none() && !c.quic.side().is_client() {
                            c.stream = Some(id);
                            read_stream(c, now, conn, id, &mut self.events);
                        } else if c.stream.is_some() && c.peer_lanes() < c.lane_limit {
                            // Multi-stream mode: a data stream. One that goes one way has
                            // nothing to finish on our side.
                            let one_way = dir == Dir::Uni;
                            let lane = DataLane {
                                id,
                                outbound: VecDeque::new(),
                                finish_requested: one_way,
                                finished: one_way,
                                recv_done: false,
                            };
                            c.lanes.insert(Lane::of(id), lane);
                            self.events.push_back(Event::LaneOpened { conn, lane: Lane::of(id) });
                            read_lane(c, conn, id, &mut self.events);
                        } else {
                            // Single-stream mode, or more data streams than allowed: refused
                            // both ways.
                            let _ = c.quic.recv_stream(id).stop(VarInt::from_u32(close_code::STREAM_ERROR));
                            if dir == Dir::Bi {
                                let _ = c.quic.send_stream(id).reset(VarInt::from_u32(close_code::STREAM_ERROR));
                            }
                        }
                    }
                }
                QuinnEvent::Stream(StreamEvent::Readable { id }) if Some(id) == c.stream => {
                    read_stream(c, now, conn, id, &mut self.events);
                }
                QuinnEvent::Stream(StreamEvent::Readable { id }) if c.lanes.contains_key(&Lane::of(id)) => {
                    read_lane(c, conn, id, &mut self.events);
                }
                QuinnEvent::Stream(StreamEvent::Finished { id }) if Some(id) == c.stream => {
                    // The peer acknowledged everything up to our FIN: the MQTT session ended
                    // cleanly.
                    c.quic.close(now, VarInt::from_u32(close_code::NORMAL), Bytes::new());
                    report_close(c, conn, CloseReason::Local, &mut self.events);
                }
                QuinnEvent::Stream(StreamEvent::Stopped { id, error_code }) if Some(id) == c.stream => {
                    // The peer will not read what we send: the MQTT session is over.
                    c.quic.close(
                        now,
                        VarInt::from_u32(close_code::STREAM_ERROR),
                        Bytes::from_static(b"stream stopped"),
                    );
                    report_close(c, conn, CloseReason::StreamReset(error_code.into_inner()), &mut self.events);
                }
                QuinnEvent::Stream(StreamEvent::Stopped { id, error_code }) if c.lanes.contains_key(&Lane::of(id)) => {
                    // The peer reads nothing more of this data stream: it is over, both ways.
                    let (lane, code) = (Lane::of(id), error_code.into_inner());
                    c.reset_lane(lane, close_code::STREAM_ERROR);
                    self.events.push_back(Event::LaneEnded { conn, lane, reason: LaneEnd::Stopped(code) });
                }
                QuinnEvent::DatagramReceived => {
                    while let Some(data) = c.quic.datagrams().recv() {
                        self.events.push_back(Event::DatagramReceived { conn, data });
                    }
                }
                QuinnEvent::Stream(_) | QuinnEvent::HandshakeDataReady => {}
                QuinnEvent::DatagramsUnblocked => {}
                QuinnEvent::ConnectionLost { reason } => {
                    let reason = match reason {
                        ConnectionError::TimedOut => CloseReason::TimedOut,
                        ConnectionError::LocallyClosed => CloseReason::Local,
                        ConnectionError::ApplicationClosed(close) => CloseReason::PeerClosed {
                            code: close.error_code.into_inner(),
                            reason: String::from_utf8_lossy(&close.reason).into_owned(),
                        },
                        ConnectionError::ConnectionClosed(close)
                            if close.error_code == quinn_proto::TransportErrorCode::CONNECTION_REFUSED =>
                        {
                            CloseReason::Refused
                        }
                        other => CloseReason::Transport(other.to_string()),
                    };
                    report_close(c, conn, reason, &mut self.events);
                }
            }
        }
        let remote = c.quic.remote_address();
        if c.connected && !c.closed_reported && remote != c.remote {
            c.remote = remote;
            self.counters.migrations += 1;
            self.events.push_back(Event::Migrated { conn, remote });
        }
        c.flush();
        self.queued_total = self.queued_total + c.queued - before;
        while let Some(event) = c.quic.poll_endpoint_events() {
            if let Some(reply) = self.inner.handle_event(handle, event) {
                c.quic.handle_event(reply);
            }
        }
        if c.quic.is_drained() {
            report_close(c, conn, CloseReason::Local, &mut self.events);
            self.queued_total -= c.queued;
            let path = c.quic.stats().path;
            self.counters.lost_packets_closed += path.lost_packets;
            self.counters.sent_packets_closed += path.sent_packets;
            handshake_over(&mut self.handshaking, c);
            self.conns.remove(&handle.0);
            self.ready.remove(&handle.0);
        } else {
            self.ready.insert(handle.0);
        }
        self.rearm(handle.0);
    }
}

/// A server connection's handshake ended (completed, or the connection is gone): it no longer
/// counts against its source address.
fn handshake_over(handshaking: &mut BTreeMap<std::net::IpAddr, usize>, c: &mut Conn) {
    let Some(ip) = c.handshake_ip.take() else { return };
    if let std::collections::btree_map::Entry::Occupied(mut e) = handshaking.entry(ip) {
        *e.get_mut() -= 1;
        if *e.get() == 0 {
            e.remove();
        }
    }
}

fn report_close(c: &mut Conn, conn: ConnId, reason: CloseReason, events: &mut VecDeque<Event>) {
    if !c.closed_reported {
        c.closed_reported = true;
        events.push_back(Event::Closed { conn, reason });
    }
}

/// Reads everything available on stream `id`, each chunk to `chunk`, and returns the stream's
/// end if it came: `Ok(())` for a FIN, `Err(code)` for a reset. `None` also when the stream
/// cannot be read (already ended).
fn drain_stream(c: &mut Conn, id: StreamId, mut chunk: impl FnMut(Bytes)) -> Option<Result<(), u64>> {
    let mut recv = c.quic.recv_stream(id);
    let Ok(mut chunks) = recv.read(true) else { return None };
    let end = loop {
        match chunks.next(usize::MAX) {
            Ok(Some(c)) => chunk(c.bytes),
            Ok(None) => break Some(Ok(())),
            Err(ReadError::Blocked) => break None,
            Err(ReadError::Reset(code)) => break Some(Err(code.into_inner())),
        }
    };
    // Returns flow-control credit to the peer; without it the stream stalls.
    let _ = chunks.finalize();
    end
}

/// Reads everything available on a data stream; a FIN or reset ends the stream (a reset ends it
/// both ways at once).
fn read_lane(c: &mut Conn, conn: ConnId, id: StreamId, events: &mut VecDeque<Event>) {
    let lane = Lane::of(id);
    let end = drain_stream(c, id, |data| events.push_back(Event::LaneReceived { conn, lane, data }));
    let Some(end) = end else { return };
    if let Some(l) = c.lanes.get_mut(&lane) {
        l.recv_done = true;
    }
    let reason = match end {
        Ok(()) => {
            if c.lanes.get(&lane).is_some_and(|l| l.finished) {
                c.lanes.remove(&lane);
            }
            LaneEnd::Finished
        }
        Err(code) => {
            c.reset_lane(lane, close_code::STREAM_ERROR);
            LaneEnd::Reset(code)
        }
    };
    events.push_back(Event::LaneEnded { conn, lane, reason });
}

/// Reads everything available on the MQTT stream; a FIN or reset ends the connection.
fn read_stream(c: &mut Conn, now: Instant, conn: ConnId, id: StreamId, events: &mut VecDeque<Event>) {
    let end = drain_stream(c, id, |data| events.push_back(Event::Received { conn, data }));
    let (code, reason) = match end {
        None => return,
        Some(Ok(())) => (close_code::NORMAL, CloseReason::StreamFinished),
        Some(Err(code)) => (close_code::STREAM_ERROR, CloseReason::StreamReset(code)),
    };
    c.quic.close(now, VarInt::from_u32(code), Bytes::new());
    report_close(c, conn, reason, events);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_from_the_secret_when_there_is_one() {
        let (one, two) = (Secret::new([1; 32]), Secret::new([2; 32]));
        let a = derive_key(Some(&one), 0, domain::RESET);
        assert_eq!(a, derive_key(Some(&one), 7, domain::RESET), "the seed is not used with a secret");
        assert_ne!(a, derive_key(Some(&two), 0, domain::RESET));
        assert_ne!(a, derive_key(Some(&one), 0, domain::TOKEN), "one key per use");
        assert_eq!(format!("{one:?}"), "Secret(..)");
        assert_ne!(a, derive_key(None, 0, domain::RESET));
        assert_eq!(derive_key(None, 3, domain::RNG), derive_key(None, 3, domain::RNG), "replayable without one");
    }
}
