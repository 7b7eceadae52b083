//! Connection flags shared by `pub`, `sub` and `shell`, in mosquitto's spelling.

use adapter_tokio::client::{Client, ClientOptions};
use adapter_tokio::files;
use adapter_tokio::url::{BrokerUrl, Transport};
use bytes::Bytes;
use clap::{Args, ValueEnum};
use mqtt_proto::Protocol;
use mqtt_quic_core::tls::ClientTls;
use std::path::PathBuf;
use std::time::Duration;

/// Transport names on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TransportArg {
    // MQTT over QUIC (UDP, default port 14567).
    Quic,
    // Plain MQTT over TCP (default port 1883).
    Tcp,
    // MQTT over TLS (default port 8883).
    Tls,
    // MQTT over WebSocket (default port 8083, path /mqtt).
    Ws,
    // MQTT over WebSocket over TLS (default port 8084, path /mqtt).
    Wss,
}

/// MQTT versions on the command line (`-V 5`, `-V 311`, `-V mqttv5`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VersionArg {
    // MQTT 5.0.
    #[value(name = "5", alias = "mqttv5")]
    V5,
    // MQTT 3.1.1.
    #[value(name = "311", alias = "mqttv311")]
    V311,
    // MQTT 3.1.
    #[value(name = "31", alias = "mqttv31")]
    V31,
}

/// Where and how to connect.
#[derive(Debug, Clone, Args)]
pub struct ConnArgs {
    /// Broker host.
    #[arg(short = 'h', long, default_value = "localhost")]
    pub host: String,
    /// Broker port [default: 14567 for quic, 1883 for tcp, 8883 for tls, 8083 for ws, 8084 for
    /// wss].
    #[arg(short = 'p', long)]
    pub port: Option<u16>,
    /// Transport [default: from the port: 1883 tcp, 8883 tls, 8083 ws, 8084 wss; otherwise
    /// quic].
    #[arg(long, value_enum)]
    pub transport: Option<TransportArg>,
    /// mosquitto's `-L`: broker, credentials and topic in one URL,
    /// mqtt(s)://[username[:password]@]host[:port]/topic (ws, wss and quic schemes too).
    #[arg(short = 'L', long = "url-with-topic", value_name = "URL", conflicts_with_all = ["host", "port", "transport", "url"])]
    pub location: Option<String>,
    /// Broker URL (quic://, mqtt://, mqtts://, ws://host:port/path, wss://), instead of
    /// --host/--port/--transport. Repeat it to fall back: the URLs are tried in order (a QUIC one gets --fallback-timeout to
    /// finish its handshake), and the client moves back to the first once it answers again.
    #[arg(long, conflicts_with_all = ["host", "port", "transport"])]
    pub url: Vec<String>,
    /// With several --url: seconds a QUIC attempt may take before the next URL is tried.
    #[arg(long, value_name = "SECONDS", default_value_t = 3.0)]
    pub fallback_timeout: f64,
    /// Keep trying to connect while no broker can be reached (a device that boots before its
    /// network), and reconnect after a lost connection, instead of exiting.
    #[arg(long)]
    pub retry_connect: bool,
    /// Client identifier [default: assigned by the broker].
    #[arg(short = 'i', long = "id")]
    pub id: Option<String>,
    /// User name.
    #[arg(short = 'u', long)]
    pub username: Option<String>,
    /// Password.
    #[arg(short = 'P', long = "pw", requires = "username")]
    pub password: Option<String>,
    /// Keep-alive in seconds (0 disables).
    #[arg(short = 'k', long, default_value_t = 60)]
    pub keepalive: u16,
    /// MQTT version.
    #[arg(short = 'V', long = "protocol-version", value_enum, default_value = "5")]
    pub version: VersionArg,
    /// CA certificates (PEM) to check the broker's certificate against [default: the system's
    /// CAs and the certificate of a local `mqttq broker`].
    #[arg(long)]
    pub cafile: Option<PathBuf>,
    /// Accept the broker certificate with this SHA-256 fingerprint (hex), whoever signed it.
    #[arg(long, conflicts_with = "cafile")]
    pub fingerprint: Option<String>,
    /// Do not check the broker's certificate at all (testing only).
    #[arg(long, conflicts_with_all = ["cafile", "fingerprint"])]
    pub insecure: bool,
    /// Where a local broker keeps its certificate (see `mqttq broker --data-dir`).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Over QUIC: publish or subscribe on a data stream of its own (EMQX's multi-stream mode)
    /// instead of the control stream. Over TCP and TLS there is only one stream.
    #[arg(long)]
    pub data_stream: bool,
    /// Over QUIC: QoS 0 in QUIC datagrams (RFC 9221), both ways, where the broker offers them
    /// (a QoS 0 message too large for a datagram goes on the stream).
    #[arg(long)]
    pub datagrams: bool,
    /// Client certificate (PEM) to log in with, for brokers that verify client certificates
    /// (QUIC, TLS, wss).
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<std::path::PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<std::path::PathBuf>,
    /// Ask the broker to keep the session after disconnecting (no clean start).
    #[arg(short = 'c', long = "disable-clean-session")]
    pub persistent: bool,
    /// Session expiry in seconds (MQTT 5) [default: 3600 with -c, else 0].
    #[arg(short = 'x', long = "session-expiry")]
    pub session_expiry: Option<u32>,
    /// The will's topic: published by the broker if this client's connection ends without
    /// DISCONNECT.
    #[arg(long)]
    pub will_topic: Option<String>,
    /// The will's payload.
    #[arg(long, requires = "will_topic")]
    pub will_payload: Option<String>,
    /// The will's QoS.
    #[arg(long, requires = "will_topic", default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub will_qos: u8,
    /// Retain the will.
    #[arg(long, requires = "will_topic")]
    pub will_retain: bool,
    /// MQTT 5 property: `-D COMMAND IDENTIFIER VALUE` (COMMAND connect, publish or will;
    /// `user-property` takes a name and a value), as mosquitto_pub/sub. Repeat for more.
    #[arg(short = 'D', long = "property", num_args = 3..=4, action = clap::ArgAction::Append, value_names = ["COMMAND", "IDENTIFIER", "VALUE"])]
    pub property: Vec<String>,
    /// Print debug logs to stderr (or set RUST_LOG).
    #[arg(short = 'd', long)]
    pub debug: bool,
    /// Print help.
    #[arg(long, action = clap::ArgAction::Help)]
    pub help: Option<bool>,
}

impl ConnArgs {
    /// The broker URL these flags name (the first, with several --url).
    pub fn url(&self) -> Result<BrokerUrl, String> {
        Ok(self.urls()?.remove(0))
    }

    /// The broker URLs these flags name, in order of preference (at least one).
    pub fn urls(&self) -> Result<Vec<BrokerUrl>, String> {
        if let Some(l) = &self.location {
            let l = crate::props::location(l)?;
            return Ok(vec![l.url.parse().map_err(|e: adapter_tokio::url::UrlError| e.to_string())?]);
        }
        if !self.url.is_empty() {
            return self
                .url
                .iter()
                .map(|u| u.parse().map_err(|e: adapter_tokio::url::UrlError| e.to_string()))
                .collect();
        }
        // mosquitto users give `-p 1883` and mean TCP: a well-known port picks its transport
        // when --transport does not.
        let from_port = match self.port {
            Some(1883) => TransportArg::Tcp,
            Some(8883) => TransportArg::Tls,
            Some(8083) => TransportArg::Ws,
            Some(8084) => TransportArg::Wss,
            _ => TransportArg::Quic,
        };
        let transport = match self.transport.unwrap_or(from_port) {
            TransportArg::Quic => Transport::Quic,
            TransportArg::Tcp => Transport::Tcp,
            TransportArg::Tls => Transport::Tls,
            TransportArg::Ws => Transport::Ws,
            TransportArg::Wss => Transport::Wss,
        };
        Ok(vec![BrokerUrl::new(transport, self.host.clone(), self.port)])
    }

    /// Client options from the flags.
    pub fn options(&self) -> Result<ClientOptions, String> {
        let mut options = ClientOptions::new();
        let s = &mut options.session;
        s.client_id = self.id.clone().unwrap_or_default();
        s.keep_alive = self.keepalive;
        s.protocol = match self.version {
            VersionArg::V5 => Protocol::V5,
            VersionArg::V311 => Protocol::V3_1_1,
            VersionArg::V31 => Protocol::V3_1,
        };
        s.username = self.username.clone();
        s.password = self.password.clone().map(Bytes::from);
        if let Some(l) = &self.location {
            let l = crate::props::location(l)?;
            if l.username.is_some() {
                (s.username, s.password) = (l.username, l.password.map(Bytes::from));
            }
        }
        let mut props = crate::props::parse(&self.property)?;
        // The session writes these from its own settings: `-D connect` sets those.
        let c = &mut props.connect;
        if let Some(v) = c.session_expiry_interval.take() {
            s.session_expiry = v;
        }
        if let Some(v) = c.receive_maximum.take() {
            s.receive_maximum = v.get();
        }
        if let Some(v) = c.maximum_packet_size.take() {
            s.maximum_packet_size = v.get();
        }
        if let Some(v) = c.topic_alias_maximum.take() {
            s.topic_alias_maximum = v;
        }
        s.connect_properties = props.connect;
        if self.persistent {
            s.clean_start = false;
            s.session_expiry = 3600;
        }
        if let Some(x) = self.session_expiry {
            s.session_expiry = x;
        }
        if let Some(topic) = &self.will_topic {
            s.will = Some(mqtt_proto::Will {
                topic: mqtt_proto::TopicName::new(topic).map_err(|e| format!("--will-topic `{topic}`: {e}"))?,
                payload: Bytes::from(self.will_payload.clone().unwrap_or_default()),
                qos: mqtt_proto::QoS::from_u8(self.will_qos).unwrap_or(mqtt_proto::QoS::AtMostOnce),
                retain: self.will_retain,
                properties: props.will.into(),
            });
        }
        s.connect_timeout = Duration::from_secs(10);
        // A command-line client reports a lost connection instead of hiding it behind retries,
        // unless told to retry.
        if !self.retry_connect {
            options.reconnect = None;
        }
        options.retry_first_connection = self.retry_connect;
        if !(self.fallback_timeout > 0.0 && self.fallback_timeout < 3600.0) {
            return Err("--fallback-timeout: expected seconds above 0 and below 3600".into());
        }
        options.fallback.handshake_timeout = Duration::from_secs_f64(self.fallback_timeout);
        options.transport.datagrams = self.datagrams;
        if self.urls()?.iter().any(|u| u.transport == Transport::Quic || u.transport.is_tls()) {
            options.tls = Some(self.trust()?);
        }
        Ok(options)
    }

    fn trust(&self) -> Result<ClientTls, String> {
        let trust = self.server_trust()?;
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let read =
                    |p: &std::path::PathBuf| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
                trust.with_client_certificate(&read(cert)?, &read(key)?).map_err(|e| format!("--cert/--key: {e}"))
            }
            (None, None) => Ok(trust),
            _ => Err("give both --cert and --key".into()),
        }
    }

    fn server_trust(&self) -> Result<ClientTls, String> {
        if self.insecure {
            return Ok(ClientTls::insecure());
        }
        if let Some(fp) = &self.fingerprint {
            return ClientTls::pinned(fp).map_err(|e| format!("--fingerprint: {e}"));
        }
        if let Some(ca) = &self.cafile {
            return files::client_tls_from_ca_file(ca).map_err(|e| e.to_string());
        }
        let dir = self.data_dir.clone().unwrap_or_else(files::default_data_dir);
        files::client_tls_default(&dir).map_err(|e| e.to_string())
    }

    /// The topic of `-L`, if given.
    pub fn location_topic(&self) -> Result<Option<String>, String> {
        self.location.as_deref().map(|l| crate::props::location(l).map(|l| l.topic)).transpose()
    }

    /// The PUBLISH properties of `-D publish ...`.
    pub fn publish_properties(&self) -> Result<mqtt_proto::PublishProperties, String> {
        Ok(crate::props::parse(&self.property)?.publish)
    }

    /// Sets up logging and connects.
    pub async fn connect(&self, options: ClientOptions) -> Result<Client, String> {
        crate::init_logging(self.debug.then_some("debug"), "warn")?;
        let urls = self.urls()?;
        let shown: Vec<String> = urls.iter().map(|u| u.to_string()).collect();
        Client::connect_urls(&shown, options).await.map_err(|e| {
            let mut why = e.to_string();
            // A QUIC attempt at a TCP-only port times out: say what was tried.
            if urls.len() == 1
                && urls[0].transport == Transport::Quic
                && self.transport.is_none()
                && self.url.is_empty()
            {
                why.push_str(&format!(
                    " (tried MQTT over QUIC on UDP port {}; for TCP give --transport tcp, or -p 1883)",
                    urls[0].port
                ));
            }
            why
        })
    }
}
