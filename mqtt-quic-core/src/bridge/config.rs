//! What a bridge is told: where the upstream broker is, who to be there, and which topics go
//! which way (mosquitto's `topic pattern [[[out | in | both] qos] local-prefix remote-prefix]`).

use crate::client::ReconnectPolicy;
use crate::config::{ConfigError, TransportSettings};
use crate::fallback::FallbackPolicy;
use crate::tls::ClientTls;
use crate::url::BrokerUrl;
use bytes::Bytes;
use mqtt_proto::{Protocol, QoS, TopicFilter, TopicName};
use std::fmt;
use std::str::FromStr;

/// Which way a mapping carries messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From this broker to the upstream one.
    Out,
    /// From the upstream broker to this one.
    In,
    /// Both ways (loops are prevented: see [`crate::bridge`]).
    Both,
}

impl Direction {
    /// Whether it carries messages out (to the upstream broker).
    pub fn is_out(self) -> bool {
        matches!(self, Direction::Out | Direction::Both)
    }

    /// Whether it carries messages in (from the upstream broker).
    pub fn is_in(self) -> bool {
        matches!(self, Direction::In | Direction::Both)
    }
}

/// One `topic` line: messages matching `local_prefix + pattern` here go out as
/// `remote_prefix + the rest`, and those matching `remote_prefix + pattern` upstream come in as
/// `local_prefix + the rest` (each only in its direction).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicMapping {
    /// The topic filter, without prefixes (empty with prefixes: the prefixes are whole topics).
    pub pattern: String,
    /// Which way.
    pub direction: Direction,
    /// The highest QoS carried (a message goes at the lower of its own and this).
    pub qos: QoS,
    /// Prefix of the topics on this broker.
    pub local_prefix: String,
    /// Prefix of the topics on the upstream broker.
    pub remote_prefix: String,
}

/// Why a `topic` line was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bridge topic `{line}`: {reason} (expected `pattern [out|in|both [qos [local-prefix remote-prefix]]]`)")]
pub struct MappingError {
    line: String,
    reason: String,
}

impl FromStr for TopicMapping {
    type Err = MappingError;

    /// Parses mosquitto's `topic` syntax; `""` stands for an empty pattern or prefix.
    ///
    /// ```
    /// use mqtt_quic_core::bridge::config::{Direction, TopicMapping};
    /// let m: TopicMapping = "sensors/# out 1 \"\" site1/".parse()?;
    /// assert_eq!((m.direction, m.remote_prefix.as_str()), (Direction::Out, "site1/"));
    /// assert_eq!(m.to_remote("sensors/t").as_deref(), Some("site1/sensors/t"));
    /// # Ok::<(), mqtt_quic_core::bridge::config::MappingError>(())
    /// ```
    fn from_str(line: &str) -> Result<TopicMapping, MappingError> {
        let bad = |reason: &str| MappingError { line: line.to_string(), reason: reason.to_string() };
        let words: Vec<&str> = line.split_whitespace().map(|w| if w == "\"\"" { "" } else { w }).collect();
        let (pattern, rest) = words.split_first().ok_or_else(|| bad("empty"))?;
        let direction = match rest.first().copied() {
            None | Some("out") => Direction::Out,
            Some("in") => Direction::In,
            Some("both") => Direction::Both,
            Some(_) => return Err(bad("the direction must be out, in or both")),
        };
        let qos = match rest.get(1).copied() {
            None | Some("0") => QoS::AtMostOnce,
            Some("1") => QoS::AtLeastOnce,
            Some("2") => QoS::ExactlyOnce,
            Some(_) => return Err(bad("the QoS must be 0, 1 or 2")),
        };
        let (local_prefix, remote_prefix) = match &rest[rest.len().min(2)..] {
            [] => ("", ""),
            [local, remote] => (*local, *remote),
            _ => return Err(bad("give both prefixes or neither")),
        };
        let mapping = TopicMapping {
            pattern: pattern.to_string(),
            direction,
            qos,
            local_prefix: local_prefix.to_string(),
            remote_prefix: remote_prefix.to_string(),
        };
        for side in [mapping.local_filter(), mapping.remote_filter()] {
            TopicFilter::new(&side).map_err(|e| bad(&format!("`{side}` is not a topic filter: {e}")))?;
        }
        if pattern.is_empty()
            && (mapping.local_prefix.contains(['+', '#']) || mapping.remote_prefix.contains(['+', '#']))
        {
            return Err(bad("with an empty pattern the prefixes are topics, without wildcards"));
        }
        Ok(mapping)
    }
}

impl fmt::Display for TopicMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let q = |s: &str| if s.is_empty() { "\"\"".to_string() } else { s.to_string() };
        let dir = match self.direction {
            Direction::Out => "out",
            Direction::In => "in",
            Direction::Both => "both",
        };
        write!(f, "{} {dir} {}", q(&self.pattern), self.qos as u8)?;
        if !(self.local_prefix.is_empty() && self.remote_prefix.is_empty()) {
            write!(f, " {} {}", q(&self.local_prefix), q(&self.remote_prefix))?;
        }
        Ok(())
    }
}

impl TopicMapping {
    /// The filter subscribed to on this broker.
    pub fn local_filter(&self) -> String {
        format!("{}{}", self.local_prefix, self.pattern)
    }

    /// The filter subscribed to upstream.
    pub fn remote_filter(&self) -> String {
        format!("{}{}", self.remote_prefix, self.pattern)
    }

    /// The upstream topic of a local message this mapping carries out, `None` if it carries
    /// no such message.
    pub fn to_remote(&self, local: &str) -> Option<String> {
        swap(local, &self.local_prefix, &self.remote_prefix, &self.local_filter()).filter(|_| self.direction.is_out())
    }

    /// The local topic of an upstream message this mapping carries in.
    pub fn to_local(&self, remote: &str) -> Option<String> {
        swap(remote, &self.remote_prefix, &self.local_prefix, &self.remote_filter()).filter(|_| self.direction.is_in())
    }
}

/// `topic` with `from` swapped for `to`, when it matches `filter`; never an empty topic.
fn swap(topic: &str, from: &str, to: &str, filter: &str) -> Option<String> {
    if !mqtt_proto::topic::matches(filter, topic) {
        return None;
    }
    let rest = topic.strip_prefix(from)?;
    let out = format!("{to}{rest}");
    TopicName::new(&out).ok().map(|_| out)
}

/// One bridge to an upstream broker (a `[[bridge]]` section of `mqttq broker`'s file).
#[derive(Debug, Clone)]
pub struct BridgeConfig {
    /// Its name: in `$SYS/broker/connection/<name>/state` and the logs, and in the client id
    /// of its session on this broker (`$bridge/<name>`).
    pub name: String,
    /// The upstream broker's addresses, tried in turn with the client's fallback (QUIC first,
    /// say, then TLS or TCP).
    pub urls: Vec<BrokerUrl>,
    /// MQTT version spoken upstream.
    pub protocol: Protocol,
    /// Client id upstream.
    pub client_id: String,
    /// Credentials upstream.
    pub username: Option<String>,
    /// Password upstream.
    pub password: Option<Bytes>,
    /// How to trust the upstream broker (QUIC and `mqtts://`).
    pub tls: Option<ClientTls>,
    /// The name the upstream certificate must carry, if not the URL's host.
    pub server_name: Option<String>,
    /// Keep-alive upstream, in seconds.
    pub keep_alive: u16,
    /// Start upstream with a new session each time (mosquitto's `cleansession`). Off by
    /// default: the upstream broker keeps what it has for the bridge across outages.
    pub clean_start: bool,
    /// MQTT 5: how long the upstream broker keeps the bridge's session after a disconnection.
    pub session_expiry: u32,
    /// The topic mappings.
    pub mappings: Vec<TopicMapping>,
    /// How long to wait before reconnecting upstream.
    pub reconnect: ReconnectPolicy,
    /// When to fall back to the next address, and move back.
    pub fallback: FallbackPolicy,
    /// QUIC settings upstream.
    pub transport: TransportSettings,
    /// Messages taken from this broker and not yet acknowledged upstream, at most (the rest
    /// wait in the bridge's session here, kept like any client's).
    pub max_inflight: u16,
}

impl BridgeConfig {
    /// A bridge named `name` to `urls`, MQTT 5, no mappings yet.
    pub fn new(name: impl Into<String>, urls: Vec<BrokerUrl>) -> BridgeConfig {
        let name = name.into();
        BridgeConfig {
            client_id: format!("mqttq-bridge-{name}"),
            name,
            urls,
            protocol: Protocol::V5,
            username: None,
            password: None,
            tls: None,
            server_name: None,
            keep_alive: 60,
            clean_start: false,
            session_expiry: 7 * 24 * 3600,
            mappings: Vec::new(),
            reconnect: ReconnectPolicy {
                initial: std::time::Duration::from_secs(1),
                max: std::time::Duration::from_secs(30),
            },
            fallback: FallbackPolicy::default(),
            transport: TransportSettings::default(),
            max_inflight: 100,
        }
    }

    /// Checks what the bridge cannot run without.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |what: String| Err(ConfigError::Invalid(format!("bridge `{}`: {what}", self.name)));
        if self.name.is_empty() || self.name.contains(['/', '+', '#']) {
            return bad("the name must be non-empty, without `/`, `+` or `#`".into());
        }
        if self.urls.is_empty() {
            return bad("no upstream address".into());
        }
        if self.mappings.is_empty() {
            return bad("no topic mapping".into());
        }
        if self.max_inflight == 0 {
            return bad("max_inflight must be at least 1".into());
        }
        if self.urls.iter().any(|u| u.transport == crate::url::Transport::Quic || u.transport.is_tls())
            && self.tls.is_none()
        {
            return bad("a quic:// or mqtts:// address needs TLS trust (a CA file, a fingerprint, or insecure)".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mosquitto_topic_lines() {
        let m: TopicMapping = "sensors/#".parse().unwrap();
        assert_eq!((m.direction, m.qos), (Direction::Out, QoS::AtMostOnce));
        assert_eq!(m.to_remote("sensors/a").as_deref(), Some("sensors/a"));
        assert_eq!(m.to_local("sensors/a"), None, "out only");

        let m: TopicMapping = "# both 2 edge/ cloud/site1/".parse().unwrap();
        assert_eq!((m.local_filter().as_str(), m.remote_filter().as_str()), ("edge/#", "cloud/site1/#"));
        assert_eq!(m.to_remote("edge/t/1").as_deref(), Some("cloud/site1/t/1"));
        assert_eq!(m.to_local("cloud/site1/cmd").as_deref(), Some("edge/cmd"));
        assert_eq!(m.to_remote("other/t"), None);

        let m: TopicMapping = "\"\" in 1 local/exact remote/exact".parse().unwrap();
        assert_eq!(m.to_local("remote/exact").as_deref(), Some("local/exact"));
        assert_eq!(m.to_local("remote/exact/more"), None);
        assert_eq!(m.to_string(), "\"\" in 1 local/exact remote/exact");

        for bad in ["", "a sideways", "a out 3", "a out 1 onlyone", "a/#/b", "\"\" out 0 a/# b/"] {
            assert!(bad.parse::<TopicMapping>().is_err(), "{bad}");
        }
    }
}
