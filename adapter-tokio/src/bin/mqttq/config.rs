//! The broker's TOML configuration file. Every key is optional; command-line flags override it.
//!
//! ```toml
//! data_dir = "/var/lib/mqttq"
//! persistence = "sync"        # "sync" (default), "periodic" or "off": see README, Persistence
//! sync_interval = 1           # with "periodic": seconds between syncs to disk
//! shards = 8                  # broker machines, one per core (default: the store's, or the cores from 4 up)
//! commit_delay_us = 1000      # new QoS 1 messages wait this long for their subscribers' acks before being written (0: never)
//! cert = "/etc/mqttq/cert.pem"
//! key = "/etc/mqttq/key.pem"
//! timeout = 10                # CONNECT / handshake timeout, seconds
//! verbosity = "info"
//! retry_interval = 20         # MQTT 3.1.1 timed redelivery, seconds (off when absent)
//! max_retries = 5
//! password_file = "/etc/mqttq/passwords"
//! acl_file = "/etc/mqttq/acl"
//! allow_anonymous = true      # with a password file: may clients without a user name connect
//! max_packet_size = 1048576
//! max_inflight = 256
//! max_retained = 100000
//! max_offline_queue = 1000
//! max_session_expiry = 604800
//! max_subscriptions_per_client = 1000
//! max_queued_bytes = 16777216
//! sys_interval = 10           # $SYS statistics period, seconds (0: off)
//! max_topic_levels = 32       # deeper topics and filters are refused (PUBLISH, will, SUBSCRIBE)
//! max_topic_length = 4096     # longer ones too (bytes)
//! max_retained_bytes = 67108864
//! max_sessions = 100000       # sessions kept, connected or not
//! max_offline_bytes = 268435456   # queued for offline clients, all together
//! max_total_queued_bytes = 536870912  # waiting to be sent to all clients together
//! write_timeout = 60          # seconds a client may take none of the bytes waiting for it
//! max_keepalive = 65535       # MQTT 5: Server Keep Alive beyond it; MQTT 3.1.1: refused
//! max_pending_auth = 64       # password checks in flight; more CONNECTs get Server busy
//! max_pending_auth_per_ip = 8 # of those, from one address
//! max_auth_failures = 10      # failed logins per address per minute before 0x9F (0: off)
//! outgoing_topic_aliases = true  # aliases towards MQTT 5 clients that accept them (fewer bytes)
//!
//! [quic]
//! listen = "0.0.0.0:14567"    # or "off"
//! max_connections = 100000
//! idle_timeout = 30
//! zero_rtt = true
//! stateless_retry = false
//! congestion = "bbr"          # "bbr" (default: best under random loss), "cubic" or "newreno"
//! initial_rtt_ms = 100        # RTT assumed before the first sample (raise on satellite links)
//! data_streams = 16           # EMQX multi-stream: data streams per connection besides control (0: off)
//! datagrams = false           # QoS 0 in QUIC datagrams (RFC 9221), for clients that ask
//! server_id = "4d51"          # behind a QUIC-LB balancer: this broker's id (hex, 1-15 bytes) in
//!                             # every connection id (draft-ietf-quic-load-balancers, plaintext)
//! lb_config_rotation = 0      # with server_id: the balancer's config rotation codepoint (0-6)
//! lb_nonce_len = 8            # with server_id: random bytes after it (4-18)
//!
//! [tcp]
//! listen = "0.0.0.0:1883"
//! max_connections = 100000
//!
//! [tls]
//! listen = "0.0.0.0:8883"
//! max_connections = 100000
//! cafile = "/etc/mqttq/clients-ca.pem"  # verify client certificates (QUIC, TLS, wss) against it
//! require_certificate = true   # with cafile: clients without a certificate are refused
//! use_identity_as_username = true  # a certificate's common name is the user name (no password)
//! tls_version = "tlsv1.2"      # the oldest TLS the TLS and wss listeners speak (QUIC: 1.3)
//!
//! [metrics]                   # Prometheus metrics at http://ADDR/metrics (off by default)
//! listen = "127.0.0.1:9101"
//!
//! [ws]                        # MQTT over WebSocket (counts against [tcp]'s max_connections)
//! listen = "0.0.0.0:8083"
//! path = "/mqtt"              # where ws:// and wss:// serve MQTT (give it in either section)
//!
//! [wss]                       # over TLS, with the certificate above (counts against [tls]'s)
//! listen = "0.0.0.0:8084"
//!
//! # A bridge to an upstream broker (repeat the section for more). Keys as mosquitto's bridge
//! # settings (`connection`, `address`, `topic`, `remote_clientid`, ... are accepted too).
//! [[bridge]]
//! name = "cloud"              # $SYS/broker/connection/cloud/state; our session: $bridge/cloud
//! address = ["quic://cloud.example.com:14567", "mqtts://cloud.example.com:8883"]
//! topic = [                   # mosquitto: pattern [out|in|both [qos [local-prefix remote-prefix]]]
//!     "sensors/# out 1 \"\" site1/",
//!     "cmd/# in 1",
//! ]
//! bridge_protocol_version = "mqttv50"   # or "mqttv311"
//! remote_clientid = "site1-edge"
//! remote_username = "site1"
//! remote_password = "secret"
//! cleansession = false        # keep the upstream session across outages
//! session_expiry = 604800     # MQTT 5: how long upstream keeps it, seconds
//! keepalive_interval = 60
//! bridge_cafile = "/etc/mqttq/cloud-ca.pem"   # or bridge_fingerprint = "..." / bridge_insecure = true
//! fallback_timeout = 3        # seconds a QUIC attempt may take before the next address
//! max_inflight = 100          # messages taken here and not yet acknowledged upstream
//! ```

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub persistence: Option<String>,
    pub sync_interval: Option<u64>,
    pub shards: Option<u16>,
    pub commit_delay_us: Option<u64>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub timeout: Option<u64>,
    pub verbosity: Option<String>,
    pub retry_interval: Option<u64>,
    pub max_retries: Option<u32>,
    pub password_file: Option<PathBuf>,
    pub acl_file: Option<PathBuf>,
    pub allow_anonymous: Option<bool>,
    pub max_packet_size: Option<u32>,
    pub max_inflight: Option<u16>,
    pub max_retained: Option<usize>,
    pub max_offline_queue: Option<usize>,
    pub max_session_expiry: Option<u32>,
    pub max_subscriptions_per_client: Option<usize>,
    pub max_queued_bytes: Option<usize>,
    pub sys_interval: Option<u64>,
    pub max_topic_levels: Option<usize>,
    pub max_topic_length: Option<usize>,
    pub max_retained_bytes: Option<usize>,
    pub max_sessions: Option<usize>,
    pub max_offline_bytes: Option<usize>,
    pub max_total_queued_bytes: Option<usize>,
    pub write_timeout: Option<u64>,
    pub max_keepalive: Option<u16>,
    pub max_pending_auth: Option<usize>,
    pub max_pending_auth_per_ip: Option<usize>,
    pub max_auth_failures: Option<u32>,
    pub outgoing_topic_aliases: Option<bool>,
    #[serde(default)]
    pub quic: QuicSection,
    #[serde(default)]
    pub tcp: Listener,
    #[serde(default)]
    pub tls: TlsListener,
    #[serde(default)]
    pub metrics: MetricsSection,
    #[serde(default)]
    pub ws: WsListener,
    #[serde(default)]
    pub wss: WsListener,
    #[serde(default)]
    pub bridge: Vec<BridgeSection>,
}

/// `[[bridge]]`: keys as mosquitto names them, with its aliases and a few of NanoMQ's.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeSection {
    #[serde(alias = "connection")]
    pub name: Option<String>,
    #[serde(alias = "addresses", alias = "server")]
    pub address: Option<OneOrMany>,
    #[serde(default)]
    pub topic: Vec<String>,
    #[serde(alias = "protocol")]
    pub bridge_protocol_version: Option<String>,
    #[serde(alias = "clientid")]
    pub remote_clientid: Option<String>,
    #[serde(alias = "username")]
    pub remote_username: Option<String>,
    #[serde(alias = "password")]
    pub remote_password: Option<String>,
    #[serde(alias = "clean_start")]
    pub cleansession: Option<bool>,
    pub session_expiry: Option<u32>,
    #[serde(alias = "keepalive")]
    pub keepalive_interval: Option<u16>,
    pub bridge_cafile: Option<PathBuf>,
    pub bridge_fingerprint: Option<String>,
    pub bridge_insecure: Option<bool>,
    pub server_name: Option<String>,
    pub fallback_timeout: Option<f64>,
    pub max_inflight: Option<u16>,
}

/// A string or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    /// Every entry, a string being split on whitespace (mosquitto's `address a:1883 b:1883`).
    pub fn entries(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => s.split_whitespace().map(str::to_string).collect(),
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// `[quic]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuicSection {
    pub listen: Option<String>,
    pub max_connections: Option<usize>,
    pub idle_timeout: Option<u64>,
    pub zero_rtt: Option<bool>,
    pub stateless_retry: Option<bool>,
    pub congestion: Option<String>,
    pub initial_rtt_ms: Option<u64>,
    pub data_streams: Option<u32>,
    pub datagrams: Option<bool>,
    pub server_id: Option<String>,
    pub lb_config_rotation: Option<u8>,
    pub lb_nonce_len: Option<usize>,
}

/// `[tcp]` and `[tls]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub listen: Option<OneOrMany>,
    pub max_connections: Option<usize>,
}

/// `[tls]`: the TLS listener, and mosquitto's client-certificate and TLS version settings
/// (the client certificate settings apply to QUIC and wss too).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsListener {
    pub listen: Option<OneOrMany>,
    pub max_connections: Option<usize>,
    pub cafile: Option<PathBuf>,
    pub require_certificate: Option<bool>,
    pub use_identity_as_username: Option<bool>,
    pub tls_version: Option<String>,
}

/// `[metrics]`: the Prometheus endpoint, off unless `listen` is given.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    pub listen: Option<String>,
}

/// `[ws]` and `[wss]`: their connections count against `[tcp]`'s and `[tls]`'s limits.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WsListener {
    pub listen: Option<OneOrMany>,
    pub path: Option<String>,
}

impl FileConfig {
    /// Reads and parses `path`; the error names the file and the offending key.
    pub fn load(path: &Path) -> Result<FileConfig, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {}", path.display(), e.message()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_parses_and_typos_are_named() {
        let doc = include_str!("config.rs");
        let example: String = doc
            .lines()
            .skip_while(|l| !l.starts_with("//! ```toml"))
            .skip(1)
            .take_while(|l| !l.starts_with("//! ```"))
            .map(|l| l.trim_start_matches("//!").trim_start().to_string() + "\n")
            .collect();
        let c: FileConfig = toml::from_str(&example).unwrap();
        assert_eq!(c.quic.congestion.as_deref(), Some("bbr"));
        assert_eq!(c.quic.initial_rtt_ms, Some(100));
        assert_eq!(c.tls.listen.as_ref().map(|l| l.entries()), Some(vec!["0.0.0.0:8883".to_string()]));
        assert_eq!(c.bridge[0].topic.len(), 2);
        assert_eq!(c.bridge[0].address.as_ref().unwrap().entries().len(), 2);
        let mosquitto = "[[bridge]]\nconnection = \"c\"\naddress = \"a:1883 b:1884\"\ntopic = [\"# both 1\"]\n";
        let m: FileConfig = toml::from_str(mosquitto).unwrap();
        assert_eq!(m.bridge[0].address.as_ref().unwrap().entries(), ["a:1883", "b:1884"]);
        let e = toml::from_str::<FileConfig>("[quic]\nidle_timout = 3\n").unwrap_err();
        assert!(e.message().contains("idle_timout"), "{}", e.message());
    }
}
