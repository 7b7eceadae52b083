//! The QUIC machine: one quinn-proto endpoint and its connections, each carrying one MQTT byte
//! stream (EMQX single-stream mode).
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
    StreamEvent, StreamId, VarInt, WriteError,
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

struct Conn {
    quic: quinn_proto::Connection,
    /// The peer's address as last reported (to see a migration).
    remote: SocketAddr,
    /// The MQTT stream, once opened (client) or accepted (server).
    stream: Option<StreamId>,
    /// Bytes waiting for flow-control credit.
    outbound: VecDeque<Bytes>,
    /// Their total.
    queued: usize,
    /// Bytes QUIC has taken from `outbound` so far: progress, for a stalled-writer check.
    written: u64,
    /// Client bytes written before the handshake completed, kept to resend if 0-RTT is rejected.
    early: Vec<Bytes>,
    finish_requested: bool,
    finished: bool,
    connected: bool,
    handshake_deadline: Option<Instant>,
    /// After `finish`: when the connection is closed even if the peer never acknowledged the
    /// end of the stream (a peer that keeps the connection alive without taking our FIN).
    finish_deadline: Option<Instant>,
    closed_reported: bool,
}

impl Conn {
    fn new(quic: quinn_proto::Connection, now: Instant, settings: &TransportSettings) -> Conn {
        Conn {
            remote: quic.remote_address(),
            quic,
            stream: None,
            outbound: VecDeque::new(),
            queued: 0,
            written: 0,
            early: Vec::new(),
            finish_requested: false,
            finished: false,
            connected: false,
            handshake_deadline: Some(now + settings.handshake_timeout),
            finish_deadline: None,
            closed_reported: false,
        }
    }

    /// Writes queued bytes while flow control allows; finishes the stream once asked and empty.
    /// Keeps `queued` and `written` in step.
    fn flush(&mut self) {
        if self.stream.is_none() && self.quic.side().is_client() && !self.outbound.is_empty() {
            // Opening succeeds once the server's stream limit is known: after the handshake, or
            // at once when resuming with 0-RTT.
            self.stream = self.quic.streams().open(Dir::Bi);
        }
        let Some(id) = self.stream else { return };
        while let Some(front) = self.outbound.front_mut() {
            match self.quic.send_stream(id).write(front) {
                Ok(n) if n == front.len() => {
                    self.queued -= n;
                    self.written += n as u64;
                    let sent = self.outbound.pop_front();
                    if !self.connected {
                        self.early.extend(sent);
                    }
                }
                Ok(n) => {
                    self.queued -= n;
                    self.written += n as u64;
                    let sent = front.split_to(n);
                    if !self.connected {
                        self.early.push(sent);
                    }
                    return;
                }
                Err(WriteError::Blocked) => return,
                Err(WriteError::Stopped(_)) | Err(WriteError::ClosedStream) => {
                    self.outbound.clear();
                    self.queued = 0;
                    return;
                }
            }
        }
        if self.finish_requested && !self.finished {
            self.finished = self.quic.send_stream(id).finish().is_ok();
        }
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
    conns: BTreeMap<usize, Conn>,
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

impl QuicEndpoint {
    /// A server endpoint.
    pub fn server(config: &ServerConfig) -> Result<QuicEndpoint, ConfigError> {
        config.transport.validate()?;
        if config.max_connections == 0 || config.max_handshakes_per_ip == 0 {
            return Err(ConfigError::Invalid("max_connections and max_handshakes_per_ip must be at least 1".into()));
        }
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
        let clock = Arc::new(DrivenClock::default());
        server.time_source(clock.clone());
        let inner = quinn_proto::Endpoint::new(
            Arc::new(endpoint_config(config.secret.as_ref(), config.seed, &config.transport)?),
            Some(Arc::new(server)),
            false,
            None,
        );
        let mut endpoint =
            QuicEndpoint::with(inner, None, config.transport.clone(), config.max_connections, config.stateless_retry);
        endpoint.max_handshakes_per_ip = config.max_handshakes_per_ip;
        endpoint.clock = clock;
        Ok(endpoint)
    }

    /// A client endpoint, able to open any number of connections.
    pub fn client(config: &ClientConfig) -> Result<QuicEndpoint, ConfigError> {
        config.transport.validate()?;
        let tls = config.tls.rustls_config(config.zero_rtt)?;
        let crypto = quinn_proto::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| ConfigError::Invalid(format!("TLS configuration unusable for QUIC: {e}")))?;
        let mut client = quinn_proto::ClientConfig::new(Arc::new(crypto));
        client.transport_config(Arc::new(config.transport.quinn()));
        let inner = quinn_proto::Endpoint::new(
            Arc::new(endpoint_config(config.secret.as_ref(), config.seed, &config.transport)?),
            None,
            false,
            None,
        );
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
            queued_total: 0,
            events: VecDeque::new(),
            responses: VecDeque::new(),
            cursor: 0,
            ready: BTreeSet::new(),
            timers: TimerIndex::new(),
            clock: Arc::default(),
        }
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
        self.conns.insert(handle.0, Conn::new(quic, now, &self.settings));
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
        let handshaking_from_ip =
            self.conns.values().filter(|c| !c.connected && c.quic.remote_address().ip() == ip).count();
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
                self.conns.insert(handle.0, Conn::new(quic, now, &self.settings));
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
                    c.handshake_deadline = None;
                    let zero_rtt = if c.quic.side().is_client() {
                        c.quic.has_0rtt().then(|| c.quic.accepted_0rtt())
                    } else {
                        Some(c.quic.accepted_0rtt())
                    };
                    if c.quic.side().is_client() && zero_rtt == Some(false) {
                        // The server discarded the 0-RTT data and quinn dropped the streams it
                        // opened: open the MQTT stream again and resend the early bytes first.
                        c.stream = None;
                        for b in c.early.drain(..).rev() {
                            c.queued += b.len();
                            self.queued_total += b.len();
                            c.outbound.push_front(b);
                        }
                    }
                    c.early.clear();
                    self.events.push_back(Event::Connected { conn, remote: c.quic.remote_address(), zero_rtt });
                }
                QuinnEvent::Stream(StreamEvent::Opened { dir: Dir::Bi }) => {
                    while let Some(id) = c.quic.streams().accept(Dir::Bi) {
                        if c.stream.is_none() {
                            c.stream = Some(id);
                            read_stream(c, now, conn, id, &mut self.events);
                        } else {
                            // Single-stream mode: further streams are refused.
                            let _ = c.quic.recv_stream(id).stop(VarInt::from_u32(close_code::STREAM_ERROR));
                        }
                    }
                }
                QuinnEvent::Stream(StreamEvent::Readable { id }) if Some(id) == c.stream => {
                    read_stream(c, now, conn, id, &mut self.events);
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
                QuinnEvent::Stream(_) | QuinnEvent::HandshakeDataReady => {}
                QuinnEvent::DatagramReceived | QuinnEvent::DatagramsUnblocked => {}
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
            self.events.push_back(Event::Migrated { conn, remote });
        }
        let before = c.queued;
        c.flush();
        self.queued_total -= before - c.queued;
        while let Some(event) = c.quic.poll_endpoint_events() {
            if let Some(reply) = self.inner.handle_event(handle, event) {
                c.quic.handle_event(reply);
            }
        }
        if c.quic.is_drained() {
            report_close(c, conn, CloseReason::Local, &mut self.events);
            self.queued_total -= c.queued;
            self.conns.remove(&handle.0);
            self.ready.remove(&handle.0);
        } else {
            self.ready.insert(handle.0);
        }
        self.rearm(handle.0);
    }
}

fn report_close(c: &mut Conn, conn: ConnId, reason: CloseReason, events: &mut VecDeque<Event>) {
    if !c.closed_reported {
        c.closed_reported = true;
        events.push_back(Event::Closed { conn, reason });
    }
}

/// Reads everything available on the MQTT stream; a FIN or reset ends the connection.
fn read_stream(c: &mut Conn, now: Instant, conn: ConnId, id: StreamId, events: &mut VecDeque<Event>) {
    let mut recv = c.quic.recv_stream(id);
    let Ok(mut chunks) = recv.read(true) else { return };
    let mut end = None;
    loop {
        match chunks.next(usize::MAX) {
            Ok(Some(chunk)) => events.push_back(Event::Received { conn, data: chunk.bytes }),
            Ok(None) => {
                end = Some(CloseReason::StreamFinished);
                break;
            }
            Err(ReadError::Blocked) => break,
            Err(ReadError::Reset(code)) => {
                end = Some(CloseReason::StreamReset(code.into_inner()));
                break;
            }
        }
    }
    // Returns flow-control credit to the peer; without it the stream stalls.
    let _ = chunks.finalize();
    if let Some(reason) = end {
        let code = if reason == CloseReason::StreamFinished { close_code::NORMAL } else { close_code::STREAM_ERROR };
        c.quic.close(now, VarInt::from_u32(code), Bytes::new());
        report_close(c, conn, reason, events);
    }
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
