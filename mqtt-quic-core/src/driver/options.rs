//! How a client connects and where a server listens, whatever adapter drives them: the
//! options every adapter's `Client::connect` and `Server::start` take, and the addresses a
//! server reports.

use crate::client::{ClientMachine, ClientUrlsConfig, ReconnectPolicy};
use crate::config::{ClientConfig, ConfigError, TransportSettings};
use crate::fallback::FallbackPolicy;
use crate::session::client::ClientSessionConfig;
use crate::tls::ClientTls;
use crate::url::{BrokerUrl, Transport};
use bytes::Bytes;
use std::net::SocketAddr;
use std::time::Duration;

use super::ClientError;

/// [`ClientOptions::message_buffer`]'s default.
pub(super) const DEFAULT_MESSAGE_BUFFER: usize = 1024;

/// How a client connects, whatever drives it.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The MQTT session: protocol version, client id, keep-alive, credentials, will...
    pub session: ClientSessionConfig,
    /// How to trust the broker (QUIC and `mqtts://`). Required for those; adapters fill in the
    /// operating system's CAs when the application gives none.
    pub tls: Option<ClientTls>,
    /// The name the broker's certificate must carry, if not the URL's host.
    pub server_name: Option<String>,
    /// Reconnect after the connection is lost (with the core's jittered backoff); `None` ends
    /// the client instead. The first connection is never retried: its failure is the
    /// connect call's error.
    pub reconnect: Option<ReconnectPolicy>,
    /// QUIC transport settings.
    pub transport: TransportSettings,
    /// Try 0-RTT when resuming over QUIC.
    pub zero_rtt: bool,
    /// Messages held for the application before the driver stops reading from the network.
    pub message_buffer: usize,
    /// A directory for the client store (paho's and mqtt.go's "persistence"): unacknowledged
    /// QoS 1 and 2 messages, with their packet identifiers, and the broker's QoS 2 messages
    /// awaiting PUBREL survive a restart of the application. The client opens it before its
    /// first connection and resumes from what it holds (see
    /// [`ClientSession::restore`](crate::session::client::ClientSession::restore) for what
    /// comes back and how it is resent).
    ///
    /// One directory belongs to one client id (a store holding another client's records is
    /// refused, and two running clients cannot share one: the second gets
    /// [`ClientError::Store`]). The session must outlive its connections: a client id,
    /// `clean_start` false and, in MQTT 5, a session expiry above 0; otherwise connecting fails
    /// with [`ClientError::Config`]. Adapters without a store refuse the option
    /// ([`ClientError::Unsupported`]). `None` (the default): nothing is stored, and what was
    /// unacknowledged when the process stops is lost.
    pub store: Option<std::path::PathBuf>,
    /// With several broker URLs: when a QUIC attempt gives way to the next URL, and how often
    /// the first is tried again (see [`crate::fallback`]).
    pub fallback: FallbackPolicy,
    /// Keep trying the first connection while no broker can be reached (a device that boots
    /// before its network) instead of failing the connect call; see
    /// [`ClientDriver::retry_first_connection`](super::ClientDriver::retry_first_connection).
    pub retry_first_connection: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            session: ClientSessionConfig::default(),
            tls: None,
            server_name: None,
            reconnect: Some(ReconnectPolicy::default()),
            transport: TransportSettings::default(),
            zero_rtt: true,
            message_buffer: DEFAULT_MESSAGE_BUFFER,
            store: None,
            fallback: FallbackPolicy::default(),
            retry_first_connection: false,
        }
    }
}

impl ClientOptions {
    /// MQTT 5, a server-assigned client id, clean start, keep-alive 60 s, reconnecting.
    pub fn new() -> ClientOptions {
        ClientOptions::default()
    }

    /// Sets the client identifier.
    pub fn client_id(mut self, id: impl Into<String>) -> ClientOptions {
        self.session.client_id = id.into();
        self
    }

    /// Sets user name and password.
    pub fn credentials(mut self, username: impl Into<String>, password: impl Into<Bytes>) -> ClientOptions {
        self.session.username = Some(username.into());
        self.session.password = Some(password.into());
        self
    }

    /// Keeps the session in a client store in `dir` (see [`ClientOptions::store`]), with the
    /// settings a store needs: no clean start and, when the session expiry is 0, a session
    /// expiry of one day. Set the client id too.
    pub fn store(mut self, dir: impl Into<std::path::PathBuf>) -> ClientOptions {
        self.store = Some(dir.into());
        self.session.clean_start = false;
        if self.session.session_expiry == 0 {
            self.session.session_expiry = 24 * 3600;
        }
        self
    }

    /// Sets how the broker's certificate is checked.
    pub fn tls(mut self, tls: ClientTls) -> ClientOptions {
        self.tls = Some(tls);
        self
    }

    /// The name the broker's certificate is checked against for `url`.
    pub fn server_name(&self, url: &BrokerUrl) -> String {
        self.server_name.clone().unwrap_or_else(|| url.host.clone())
    }

    /// The machine for `urls`, tried in turn (see [`crate::fallback`]): QUIC for `quic://`, a
    /// byte stream the adapter carries otherwise (with TLS for `mqtts://`: see
    /// [`ClientOptions::stream_tls_config`]). `secret` (32 bytes from the operating system's random
    /// source) keys the QUIC endpoint and drives connection ids and backoff jitter.
    pub fn machine(&self, urls: &[BrokerUrl], secret: [u8; 32]) -> Result<ClientMachine, ConfigError> {
        let seed = seed_of(&secret);
        let quic = match urls.iter().any(|u| u.transport == Transport::Quic) {
            true => {
                let mut quic = ClientConfig::new(self.tls.clone().ok_or_else(no_trust)?);
                quic.transport = self.transport.clone();
                quic.zero_rtt = self.zero_rtt;
                quic.seed = seed;
                quic.secret = Some(crate::config::Secret::new(secret));
                Some(quic)
            }
            false => None,
        };
        ClientMachine::with_urls(ClientUrlsConfig {
            urls: urls.to_vec(),
            quic,
            session: self.session.clone(),
            server_name: self.server_name.clone(),
            reconnect: self.reconnect,
            fallback: self.fallback,
            seed,
            resolve_literals: false,
        })
    }

    /// The machine for a connection the application opens itself (its own connector: a Unix
    /// socket, an in-memory pipe, a tunnel), asked for with [`StreamCommand::Open`] `(None)`
    /// on each (re)connect. `secret` drives the backoff jitter.
    ///
    /// [`StreamCommand::Open`]: crate::client::StreamCommand::Open
    pub fn stream_machine(&self, secret: [u8; 32]) -> Result<ClientMachine, ConfigError> {
        ClientMachine::over_stream(self.session.clone(), self.reconnect, seed_of(&secret))
    }

    /// For `mqtts://` and `wss://` URLs: the rustls configuration to wrap TCP streams in
    /// (name each connection with [`tls_server_name`]), offering `transport`'s ALPN protocol.
    pub fn stream_tls_config(&self, transport: Transport) -> Result<rustls::ClientConfig, ConfigError> {
        let mut config = self.tls.as_ref().ok_or_else(no_trust)?.rustls_config(false)?;
        config.alpn_protocols = vec![transport.alpn().to_vec()];
        Ok(config)
    }
}

/// The name a TLS broker at `url` must carry in its certificate: `server_name` when given
/// ([`ClientOptions::server_name`]), else the URL's host.
pub fn tls_server_name(
    server_name: Option<&str>,
    url: &BrokerUrl,
) -> Result<rustls_pki_types::ServerName<'static>, ConfigError> {
    rustls_pki_types::ServerName::try_from(server_name.unwrap_or(&url.host).to_string())
        .map_err(|e| ConfigError::Invalid(format!("server name: {e}")))
}

fn no_trust() -> ConfigError {
    ConfigError::Invalid("no TLS trust configured (a CA, a pinned certificate, or the system's CAs)".into())
}

/// The broker address to use among those `url`'s host resolved to (or why there is none).
/// IPv4 is preferred when a name has both kinds: brokers listen on 0.0.0.0 by default, and
/// `localhost` often resolves to `::1` first.
pub fn pick_address(
    url: &BrokerUrl,
    resolved: std::io::Result<impl Iterator<Item = SocketAddr>>,
) -> Result<SocketAddr, ClientError> {
    let resolve = |reason: String| ClientError::Resolve { host: url.host.clone(), reason };
    let mut addrs: Vec<SocketAddr> = resolved.map_err(|e| resolve(e.to_string()))?.collect();
    addrs.sort_by_key(|a| a.is_ipv6());
    addrs.first().copied().ok_or_else(|| resolve("no address".into()))
}

/// `addr` as a UDP socket bound to `local` can send to it: an IPv4 address becomes IPv4-mapped
/// IPv6 for an IPv6 socket (dual-stack), as the broker's bridges need when the broker listens on
/// `[::]` (their QUIC connections leave from its socket).
pub fn for_socket(addr: SocketAddr, local: Option<SocketAddr>) -> SocketAddr {
    match (addr, local) {
        (SocketAddr::V4(v4), Some(SocketAddr::V6(_))) => {
            SocketAddr::V6(std::net::SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        _ => addr,
    }
}

/// The local address a client's UDP socket binds to for a broker at `server`: any address of
/// the same family, any port.
pub fn local_bind_address(server: SocketAddr) -> SocketAddr {
    if server.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    }
}

/// The seed a machine's jitter and ids draw from: the secret's first 8 bytes.
fn seed_of(secret: &[u8; 32]) -> u64 {
    let mut seed = [0u8; 8];
    seed.copy_from_slice(&secret[..8]);
    u64::from_le_bytes(seed)
}

/// Where and how a broker server listens, for every adapter's server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The broker machine's settings; its QUIC configuration also supplies the certificate for
    /// a TLS listener, and its `max_queued_bytes` bounds what waits for each client.
    pub broker: crate::broker::machine::BrokerConfig,
    /// UDP address for MQTT over QUIC, if any.
    pub quic: Option<SocketAddr>,
    /// TCP address for plain MQTT, if any.
    pub tcp: Option<SocketAddr>,
    /// TCP address for MQTT over TLS, if any (adapters without TLS over TCP refuse to start
    /// with one).
    pub tls: Option<SocketAddr>,
    /// TCP address for MQTT over WebSocket (`ws://`, served at `broker.websocket_path`), if
    /// any. Its connections count against `tcp_max_connections`.
    pub ws: Option<SocketAddr>,
    /// TCP address for MQTT over WebSocket over TLS (`wss://`), if any (adapters without TLS
    /// over TCP refuse to start with one). Its connections count against
    /// `tls_max_connections`.
    pub wss: Option<SocketAddr>,
    /// More listeners of the byte-stream kinds (`Transport::Tcp`, `Tls`, `Ws`, `Wss`) beside
    /// the first of each above, as mosquitto's several `listener` lines (each counts against
    /// its kind's connection limit). Adapters that do not offer them refuse to start with any
    /// ([`ServerError::Unsupported`](super::ServerError::Unsupported)).
    pub extra_listeners: Vec<(Transport, SocketAddr)>,
    /// Most simultaneous connections on the TCP listener; more are closed at accept.
    pub tcp_max_connections: usize,
    /// Most simultaneous connections on the TLS listener.
    pub tls_max_connections: usize,
    /// How long a TLS handshake may take.
    pub tls_handshake_timeout: Duration,
    /// How long a shutdown waits for clients to take their DISCONNECT.
    pub shutdown_grace: Duration,
    /// Where the store lives when `broker.persistence` is on (required then): the adapter
    /// loads it before opening any listener, and writes the broker's batches to it.
    pub data_dir: Option<std::path::PathBuf>,
    /// With `Persistence::Periodic`: how often the store is synced to disk (a crash loses at
    /// most this much).
    pub sync_interval: Duration,
    /// Broker machines, each on a core of its own (see [`crate::broker::shard`]); 1 is a
    /// broker of one machine. Adapters that do not run shards refuse more than 1
    /// ([`ServerError::Unsupported`](super::ServerError::Unsupported)).
    pub shards: u16,
}

impl ServerOptions {
    /// QUIC on `0.0.0.0:14567` and TCP on `0.0.0.0:1883`, no TLS listener, with this
    /// certificate and default broker settings.
    pub fn new(tls: crate::tls::ServerTls) -> ServerOptions {
        ServerOptions {
            broker: crate::broker::machine::BrokerConfig::new(crate::config::ServerConfig::new(tls)),
            quic: Some(SocketAddr::from(([0, 0, 0, 0], crate::url::QUIC_PORT))),
            tcp: Some(SocketAddr::from(([0, 0, 0, 0], crate::url::TCP_PORT))),
            tls: None,
            ws: None,
            wss: None,
            extra_listeners: Vec::new(),
            tcp_max_connections: 100_000,
            tls_max_connections: 100_000,
            tls_handshake_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(2),
            data_dir: None,
            sync_interval: Duration::from_secs(1),
            shards: 1,
        }
    }

    /// What the listeners must allow for the bridges: a bridge's QUIC connection leaves from
    /// the broker's UDP socket (see [`crate::bridge`]), so a `quic://` upstream needs the QUIC
    /// listener, and one bound to a loopback address reaches only upstreams on this host.
    /// Adapters call it before opening anything.
    pub fn check_bridges(&self) -> Result<(), ConfigError> {
        for bridge in &self.broker.bridges {
            for url in bridge.urls.iter().filter(|u| u.transport == Transport::Quic) {
                let why = match self.quic {
                    None => "the QUIC listener is off".to_string(),
                    Some(addr) if addr.ip().is_loopback() && !is_local(&url.host) => {
                        format!("the QUIC listener is bound to {addr}, which cannot reach it")
                    }
                    _ => continue,
                };
                return Err(ConfigError::Invalid(format!(
                    "bridge `{}` to {url}: its QUIC connection leaves from the broker's QUIC socket, and {why} \
                     (listen on 0.0.0.0, or bridge over mqtts://)",
                    bridge.name
                )));
            }
        }
        Ok(())
    }

    /// QUIC and TCP on 127.0.0.1 with ports chosen by the system (tests, embedding).
    pub fn loopback(tls: crate::tls::ServerTls) -> ServerOptions {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        ServerOptions { quic: Some(any), tcp: Some(any), ..ServerOptions::new(tls) }
    }
}

/// Whether a URL host is this machine (a loopback address, or `localhost`).
fn is_local(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Where a broker server listens, as every adapter's `Server::addresses` reports it: the
/// addresses actually bound (with the ports the system chose for port 0), `None` for a
/// listener that is not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServerAddresses {
    /// MQTT over QUIC (UDP).
    pub quic: Option<SocketAddr>,
    /// Plain MQTT (TCP).
    pub tcp: Option<SocketAddr>,
    /// MQTT over TLS (TCP); always `None` for adapters without a TLS listener.
    pub tls: Option<SocketAddr>,
    /// MQTT over WebSocket (TCP).
    pub ws: Option<SocketAddr>,
    /// MQTT over WebSocket over TLS (TCP); always `None` for adapters without TLS over TCP.
    pub wss: Option<SocketAddr>,
}
