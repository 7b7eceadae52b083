//! Broker addresses as URLs: `quic://host:port` (also `mqtt+quic://` and `mqtt-quic://`),
//! `mqtt://` (also `tcp://`), `mqtts://` (also `ssl://`, `tls://`), and MQTT over WebSocket,
//! `ws://host:port/path` and `wss://` (the path defaults to `/mqtt`).

use std::fmt;
use std::str::FromStr;
use thiserror::Error;

/// Default UDP port of MQTT over QUIC (EMQX's convention).
pub const QUIC_PORT: u16 = 14567;
/// Default port of plain MQTT over TCP.
pub const TCP_PORT: u16 = 1883;
/// Default port of MQTT over TLS.
pub const TLS_PORT: u16 = 8883;

/// How bytes reach the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// MQTT over QUIC (TLS 1.3, ALPN `mqtt`, one bidirectional stream).
    Quic,
    /// Plain MQTT over TCP.
    Tcp,
    /// MQTT over TLS over TCP.
    Tls,
    /// MQTT over WebSocket over TCP.
    Ws,
    /// MQTT over WebSocket over TLS.
    Wss,
}

impl Transport {
    /// The port used when a URL names none.
    pub fn default_port(self) -> u16 {
        match self {
            Transport::Quic => QUIC_PORT,
            Transport::Tcp => TCP_PORT,
            Transport::Tls => TLS_PORT,
            Transport::Ws => crate::ws::WS_PORT,
            Transport::Wss => crate::ws::WSS_PORT,
        }
    }

    /// The URL scheme written for it.
    pub fn scheme(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::Tcp => "mqtt",
            Transport::Tls => "mqtts",
            Transport::Ws => "ws",
            Transport::Wss => "wss",
        }
    }

    /// Whether the bytes go over TLS (`mqtts`, `wss`): what the adapter puts below the
    /// stream when it opens one.
    pub fn is_tls(self) -> bool {
        matches!(self, Transport::Tls | Transport::Wss)
    }

    /// The ALPN protocol a TLS connection for this transport offers: `mqtt` (QUIC, `mqtts`),
    /// or `http/1.1` for `wss`, where TLS carries HTTP first (what browsers and HTTP proxies
    /// offer and expect).
    pub fn alpn(self) -> &'static [u8] {
        match self {
            Transport::Ws | Transport::Wss => b"http/1.1",
            _ => crate::tls::ALPN_MQTT,
        }
    }

    /// Whether MQTT travels in WebSocket frames (`ws`, `wss`).
    pub fn is_websocket(self) -> bool {
        matches!(self, Transport::Ws | Transport::Wss)
    }
}

impl FromStr for Transport {
    type Err = UrlError;
    fn from_str(s: &str) -> Result<Transport, UrlError> {
        match s.to_ascii_lowercase().as_str() {
            // `mqtt-quic://` is what NanoMQ and EMQX's tools write.
            "quic" | "mqtt+quic" | "mqtt-quic" => Ok(Transport::Quic),
            "mqtt" | "tcp" => Ok(Transport::Tcp),
            "mqtts" | "ssl" | "tls" | "mqtt+tls" => Ok(Transport::Tls),
            "ws" => Ok(Transport::Ws),
            "wss" => Ok(Transport::Wss),
            _ => Err(UrlError::Scheme(s.to_string())),
        }
    }
}

/// Why a broker URL was not understood.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum UrlError {
    /// The part before `://` is not a transport we speak.
    #[error("unknown scheme `{0}` (use quic://, mqtt://, mqtts://, ws:// or wss://)")]
    Scheme(String),
    /// No `scheme://`.
    #[error("`{0}` is not a broker URL (expected e.g. quic://localhost:14567)")]
    Shape(String),
    /// The host is empty.
    #[error("the URL `{0}` names no host")]
    NoHost(String),
    /// The port is not a number from 1 to 65535.
    #[error("bad port `{0}` (expected 1-65535)")]
    Port(String),
    /// A path on a URL whose transport has none (only `ws://` and `wss://` do).
    #[error("`{0}`: only ws:// and wss:// URLs have a path")]
    Path(String),
    /// A WebSocket path with spaces or control characters, which cannot go in a request.
    #[error("`{0}`: a WebSocket path may not hold spaces or control characters")]
    BadPath(String),
}

/// A broker to connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// How.
    pub transport: Transport,
    /// Host name or IP address (without brackets), also the name its certificate must carry.
    pub host: String,
    /// Port.
    pub port: u16,
    /// The HTTP path of a WebSocket URL (with its leading `/`, as written: `ws://h/` asks for
    /// `/`); empty for the other transports, and for a WebSocket URL without one, which asks
    /// for [`crate::ws::DEFAULT_PATH`].
    pub path: String,
}

impl BrokerUrl {
    /// A URL from its parts.
    pub fn new(transport: Transport, host: impl Into<String>, port: Option<u16>) -> BrokerUrl {
        BrokerUrl { transport, host: host.into(), port: port.unwrap_or(transport.default_port()), path: String::new() }
    }

    /// The path a WebSocket client asks for: the URL's, or [`crate::ws::DEFAULT_PATH`].
    pub fn websocket_path(&self) -> &str {
        match self.path.as_str() {
            "" => crate::ws::DEFAULT_PATH,
            p => p,
        }
    }

    /// `host:port` as the resolver wants it (IPv6 literals in brackets).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl FromStr for BrokerUrl {
    type Err = UrlError;

    /// Parses `scheme://host[:port][/]`, and `ws[s]://host[:port][/path]`.
    ///
    /// ```
    /// use mqtt_quic_core::url::{BrokerUrl, Transport};
    /// let url: BrokerUrl = "quic://[::1]".parse()?;
    /// assert_eq!((url.transport, url.host.as_str(), url.port), (Transport::Quic, "::1", 14567));
    /// # Ok::<(), mqtt_quic_core::url::UrlError>(())
    /// ```
    fn from_str(s: &str) -> Result<BrokerUrl, UrlError> {
        let (scheme, rest) = s.split_once("://").ok_or_else(|| UrlError::Shape(s.to_string()))?;
        let transport: Transport = scheme.parse()?;
        let (rest, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let path = match (transport.is_websocket(), path) {
            (_, "") | (false, "/") => String::new(),
            (true, p) if p.chars().any(|c| c.is_whitespace() || c.is_control()) => {
                return Err(UrlError::BadPath(s.to_string()))
            }
            (true, p) => p.to_string(),
            (false, _) => return Err(UrlError::Path(s.to_string())),
        };
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| UrlError::Shape(s.to_string()))?;
            match after {
                "" => (host, None),
                _ => (host, Some(after.strip_prefix(':').ok_or_else(|| UrlError::Shape(s.to_string()))?)),
            }
        } else {
            match rest.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            }
        };
        if host.is_empty() {
            return Err(UrlError::NoHost(s.to_string()));
        }
        let port = match port {
            None => None,
            Some(p) => Some(p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| UrlError::Port(p.to_string()))?),
        };
        Ok(BrokerUrl { path, ..BrokerUrl::new(transport, host, port) })
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.transport.scheme(), self.authority(), self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_hosts_and_ports() {
        assert_eq!("mqtt-quic://b:1".parse::<BrokerUrl>().unwrap().transport, Transport::Quic);
        let u: BrokerUrl = "mqtt+quic://broker.example:1000".parse().unwrap();
        assert_eq!(u, BrokerUrl::new(Transport::Quic, "broker.example", Some(1000)));
        assert_eq!("tcp://h".parse::<BrokerUrl>().unwrap(), BrokerUrl::new(Transport::Tcp, "h", Some(1883)));
        assert_eq!("mqtts://h/".parse::<BrokerUrl>().unwrap().port, 8883);
        assert_eq!("quic://[::1]:9".parse::<BrokerUrl>().unwrap().authority(), "[::1]:9");
        assert_eq!("quic://127.0.0.1".parse::<BrokerUrl>().unwrap().to_string(), "quic://127.0.0.1:14567");
        assert!(matches!("http://h".parse::<BrokerUrl>(), Err(UrlError::Scheme(_))));
        assert!(matches!("localhost:1883".parse::<BrokerUrl>(), Err(UrlError::Shape(_))));
        assert!(matches!("mqtt://:1883".parse::<BrokerUrl>(), Err(UrlError::NoHost(_))));
        assert!(matches!("mqtt://h:0".parse::<BrokerUrl>(), Err(UrlError::Port(_))));
        assert!(matches!("mqtt://h:99999".parse::<BrokerUrl>(), Err(UrlError::Port(_))));
        assert!(matches!("mqtt://h/topic".parse::<BrokerUrl>(), Err(UrlError::Path(_))));
    }

    #[test]
    fn websocket_urls_keep_their_path() {
        let u: BrokerUrl = "ws://[::1]:9001/ws/mqtt".parse().unwrap();
        assert_eq!((u.transport, u.host.as_str(), u.port, u.path.as_str()), (Transport::Ws, "::1", 9001, "/ws/mqtt"));
        assert_eq!(u.to_string(), "ws://[::1]:9001/ws/mqtt");
        let u: BrokerUrl = "wss://broker.example".parse().unwrap();
        assert_eq!((u.port, u.websocket_path(), u.transport.is_tls()), (8084, "/mqtt", true));
        let root: BrokerUrl = "ws://h/".parse().unwrap();
        assert_eq!((root.port, root.websocket_path()), (8083, "/"), "an explicit / is asked for as given");
        assert!(matches!("ws://h/a b".parse::<BrokerUrl>(), Err(UrlError::BadPath(_))));
        assert!(matches!("ws://h/a\r\nX: y".parse::<BrokerUrl>(), Err(UrlError::BadPath(_))));
    }
}
