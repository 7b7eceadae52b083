//! Several brokers for one client: the order in which a [`ClientMachine`](crate::client::ClientMachine)
//! tries them, when it falls back from QUIC to TCP, and when it moves back.
//!
//! UDP is blocked on many enterprise and hotel networks, where a QUIC handshake never
//! completes: nothing answers, nothing fails. A client given `quic://` and then `mqtts://`
//! (or `mqtt://`) therefore gives each QUIC attempt [`FallbackPolicy::handshake_timeout`] to
//! finish its handshake before it tries the next address. The MQTT session goes along (same
//! client id, clean start off once the session has an expiry, unacknowledged QoS 1 and 2
//! continued). Once connected on a later address, the client tries the first one again every
//! [`FallbackPolicy::retry_primary`] in the background (a handshake only), and moves back when
//! it answers: DISCONNECT (normal, so no will) on the fallback connection, CONNECT on the QUIC
//! connection already up.
//!
//! Attempts go down the list from the address that last worked; a failure before CONNACK moves
//! on to the next address at once, and only when every address failed in a row does the
//! client wait (the reconnect backoff) or, for the first connection, report the failures.
//! A broker that answers CONNACK with a refusal is not a reason to fall back: the refusal is
//! reported as it is.

use crate::url::{BrokerUrl, Transport};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// When a client with several brokers falls back and moves back (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FallbackPolicy {
    /// How long a QUIC attempt may take to finish its handshake (name resolution included)
    /// before the next address is tried. Only used when there is a next address.
    pub handshake_timeout: Duration,
    /// While connected on a later address than the first and the first is QUIC: how often a
    /// QUIC handshake with the first is tried, to move back to it.
    pub retry_primary: Duration,
}

impl Default for FallbackPolicy {
    fn default() -> Self {
        FallbackPolicy { handshake_timeout: Duration::from_secs(3), retry_primary: Duration::from_secs(60) }
    }
}

/// One broker address to try.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// Where, as the user wrote it (`None` for a machine built for one pre-resolved address
    /// or one byte stream the adapter already knows).
    pub url: Option<BrokerUrl>,
    pub transport: Transport,
    /// The address, when known without asking the adapter to resolve a name: an IP literal,
    /// or the one address the machine was made for.
    pub addr: Option<SocketAddr>,
    /// The name the broker's certificate must carry.
    pub server_name: String,
}

impl Target {
    /// A target for `url`: an IP literal needs no resolution.
    pub fn from_url(url: &BrokerUrl, server_name: String) -> Target {
        let addr = url.host.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, url.port));
        Target { url: Some(url.clone()), transport: url.transport, addr, server_name }
    }

    /// How the target is named in reports.
    pub fn describe(&self) -> String {
        match (&self.url, self.addr) {
            (Some(url), _) => url.to_string(),
            (None, Some(addr)) => format!("{}://{addr}", self.transport.scheme()),
            (None, None) => self.transport.scheme().to_string(),
        }
    }
}

/// The list of targets and where the client is in it.
#[derive(Debug)]
pub(crate) struct Targets {
    list: Vec<Target>,
    at: usize,
    /// Where the current series of failed attempts began.
    round_start: usize,
    /// What failed in this series, one line per attempt.
    failures: Vec<String>,
}

impl Targets {
    /// Panics on an empty list (constructors check).
    pub fn new(list: Vec<Target>) -> Targets {
        assert!(!list.is_empty(), "at least one broker address");
        Targets { list, at: 0, round_start: 0, failures: Vec::new() }
    }

    pub fn current(&self) -> &Target {
        &self.list[self.at]
    }

    pub fn index(&self) -> usize {
        self.at
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    #[cfg(test)]
    pub fn get(&self, i: usize) -> Option<&Target> {
        self.list.get(i)
    }

    pub fn any_quic(&self) -> bool {
        self.list.iter().any(|t| t.transport == Transport::Quic)
    }

    /// The attempt on the current target failed (`reason`: one line): moves to the next.
    /// True when that completes a series in which every target failed.
    pub fn failed(&mut self, reason: &str) -> bool {
        // Bounded: a series is at most one failure per target.
        if self.failures.len() < self.list.len() {
            self.failures.push(format!("{}: {reason}", self.current().describe()));
        }
        self.at = (self.at + 1) % self.list.len();
        self.at == self.round_start
    }

    /// What failed in this series, for the report once every target has.
    pub fn report(&self) -> String {
        self.failures.join("; ")
    }

    /// A new series of attempts begins at the current target (after a success, or after the
    /// backoff that follows a failed series).
    pub fn new_round(&mut self) {
        self.round_start = self.at;
        self.failures.clear();
    }

    /// The first target, when the client is on another and the first is QUIC: the one to
    /// move back to.
    pub fn primary_to_retry(&self) -> Option<&Target> {
        (self.at != 0 && self.list[0].transport == Transport::Quic).then(|| &self.list[0])
    }

    /// Moves to the first target (the retry of the primary succeeded).
    pub fn back_to_primary(&mut self) {
        self.at = 0;
        self.new_round();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets(urls: &[&str]) -> Targets {
        Targets::new(
            urls.iter()
                .map(|u| {
                    let url: BrokerUrl = u.parse().unwrap();
                    Target::from_url(&url, url.host.clone())
                })
                .collect(),
        )
    }

    #[test]
    fn a_series_ends_when_every_target_failed_from_where_it_began() {
        let mut t = targets(&["quic://a", "mqtts://a", "mqtt://b"]);
        assert!(!t.failed("handshake timed out"));
        assert_eq!(t.current().transport, Transport::Tls);
        assert!(!t.failed("refused"));
        assert!(t.failed("refused"));
        assert_eq!(t.index(), 0);
        assert_eq!(t.report(), "quic://a:14567: handshake timed out; mqtts://a:8883: refused; mqtt://b:1883: refused");
        // Connected on the second: the next series starts there, and the first is retried.
        t.new_round();
        assert!(!t.failed("x"));
        t.new_round();
        assert_eq!(t.index(), 1);
        assert_eq!(t.primary_to_retry().map(|p| p.transport), Some(Transport::Quic));
        assert!(!t.failed("lost"));
        assert!(!t.failed("lost"));
        assert!(t.failed("lost"));
        assert_eq!(t.index(), 1);
        t.back_to_primary();
        assert!(t.primary_to_retry().is_none());
    }

    #[test]
    fn ip_literals_need_no_resolution() {
        let t = targets(&["quic://127.0.0.1:9", "quic://[::1]", "quic://broker.example"]);
        assert_eq!(t.get(0).unwrap().addr, Some("127.0.0.1:9".parse().unwrap()));
        assert_eq!(t.get(1).unwrap().addr, Some("[::1]:14567".parse().unwrap()));
        assert_eq!(t.get(2).unwrap().addr, None);
    }
}
