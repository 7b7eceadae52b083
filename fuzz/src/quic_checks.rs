//! The checks behind the `quic_server` and `sessions` fuzz targets (the mqtt-quic-core ones).
//!
//! - `quic_server`: a QUIC server machine fed fuzzer-chosen datagrams at fuzzer-chosen
//!   (monotonic) times never panics and never holds more connections than its limit.
//! - `sessions`: a server session and a client session fed fuzzer-chosen bytes as if from their
//!   peers never panic, and keep what they hold within their limits.
//! - `broker`: the broker machine with four byte-stream clients sending fuzzer-chosen bytes
//!   (routing, takeovers, wills, retained messages and limits all reachable) never panics.
//!
//! `tests/tests/fuzz_corpus_quic.rs` replays the committed corpora.

use mqtt_quic_core::broker::machine::{Broker, BrokerConfig};
use mqtt_quic_core::config::ServerConfig;
use mqtt_quic_core::quic::QuicEndpoint;
use mqtt_quic_core::session::client::{ClientSession, ClientSessionConfig};
use mqtt_quic_core::session::server::{ServerEvent, ServerSession, ServerSessionConfig};
use mqtt_quic_core::tls::{SelfSigned, ServerTls};
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const MAX_CONNECTIONS: usize = 8;

fn server() -> QuicEndpoint {
    static TLS: OnceLock<ServerTls> = OnceLock::new();
    let tls = TLS.get_or_init(|| ServerTls::from_self_signed(&SelfSigned::generate(&["fuzz"]).unwrap()).unwrap());
    let mut config = ServerConfig::new(tls.clone());
    config.max_connections = MAX_CONNECTIONS;
    QuicEndpoint::server(&config).unwrap()
}

/// Input: records of `[delay_ms: u8][source: u8][len: u16 BE][len bytes]` until the data ends.
/// A delay advances the clock (and fires timers); the source picks one of 16 client addresses.
pub fn quic_server(data: &[u8]) {
    let mut server = server();
    #[allow(clippy::disallowed_methods)] // the fuzz harness is the driver: it owns the clock
    let mut now = Instant::now();
    let mut buf = Vec::new();
    let mut rest = data;
    while let [delay, source, hi, lo, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
        let (datagram, next) = tail.split_at(len);
        rest = next;
        now += Duration::from_millis(u64::from(*delay));
        server.handle_timeout(now);
        let from = SocketAddr::from(([10, 0, 0, source % 16], 40_000 + u16::from(source % 16)));
        server.handle_datagram(now, from, None, None, datagram);
        while server.poll_transmit(now, &mut buf).is_some() {}
        while server.poll_event().is_some() {}
        assert!(server.connection_count() <= MAX_CONNECTIONS, "connection limit exceeded");
        if let Some(deadline) = server.poll_timeout() {
            assert!(deadline >= now - Duration::from_secs(1), "deadline in the past");
        }
    }
}

/// Input: the first byte picks the protocol and which session is fed; then records of
/// `[delay_ms: u8][len: u8][len bytes]`, each a piece of the peer's byte stream.
pub fn sessions(data: &[u8]) {
    let Some((&mode, mut rest)) = data.split_first() else { return };
    #[allow(clippy::disallowed_methods)] // the harness owns the clock
    let mut now = Instant::now();
    let protocol = if mode & 1 == 0 { mqtt_proto::Protocol::V5 } else { mqtt_proto::Protocol::V3_1_1 };
    let server_config = ServerSessionConfig { receive_maximum: 4, topic_alias_maximum: 2, ..Default::default() };
    let mut server = ServerSession::new(now, server_config);
    let client_config =
        ClientSessionConfig { protocol, receive_maximum: 4, topic_alias_maximum: 2, ..Default::default() };
    let mut client = ClientSession::new(client_config).expect("valid config");
    let _ = client.connect(now);
    while let [delay, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (piece, next) = tail.split_at(n);
        rest = next;
        now += Duration::from_millis(u64::from(*delay) * 10);
        if mode & 2 == 0 {
            server.handle_timeout(now);
            server.handle_bytes(now, piece);
            while let Some(event) = server.poll_event() {
                match event {
                    ServerEvent::Connect(_) => {
                        let _ = server.accept(now, false, Some("fuzz"));
                    }
                    ServerEvent::Publish(p) => server.acknowledge(p.qos_pid, mqtt_proto::ReasonCode::Success),
                    ServerEvent::Subscribe { packet_id, subscriptions, .. } => {
                        let _ = server.suback(packet_id, vec![mqtt_proto::ReasonCode::Success; subscriptions.len()]);
                    }
                    _ => {}
                }
            }
            while server.poll_transmit().is_some() {}
            assert!(server.take_state().pending() <= 10_000, "server session holds too much");
        } else {
            client.handle_timeout(now);
            client.handle_bytes(now, piece);
            while client.poll_event().is_some() {}
            while client.poll_transmit().is_some() {}
            assert!(client.pending_publishes() == 0, "nothing was published, nothing may be pending");
        }
    }
}

/// Input: records of `[delay_ms: u8][stream: u8][len: u8][len bytes]`. Stream numbers pick one
/// of four byte-stream clients; a stream that was closed is opened again on its next record.
pub fn broker(data: &[u8]) {
    static TLS: OnceLock<ServerTls> = OnceLock::new();
    let tls = TLS.get_or_init(|| ServerTls::from_self_signed(&SelfSigned::generate(&["fuzz"]).unwrap()).unwrap());
    let mut config = BrokerConfig::new(ServerConfig::new(tls.clone()));
    config.max_retained = 8;
    config.max_offline_queue = 8;
    config.max_subscriptions_per_client = 8;
    let mut broker = Broker::new(config).expect("valid config");
    #[allow(clippy::disallowed_methods)] // the harness owns the clock
    let mut now = Instant::now();
    let mut streams = [None; 4];
    let mut rest = data;
    while let [delay, which, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (piece, next) = tail.split_at(n);
        rest = next;
        now += Duration::from_millis(u64::from(*delay) * 50);
        mqtt_quic_core::Machine::handle_timeout(&mut broker, now);
        let slot = usize::from(*which % 4);
        let id = *streams[slot].get_or_insert_with(|| broker.open_stream(now));
        if *which >= 252 {
            broker.stream_closed(now, id);
            streams[slot] = None;
        } else {
            broker.handle_stream_bytes(now, id, piece);
        }
        while let Some((id, out)) = broker.poll_stream() {
            if matches!(out, mqtt_quic_core::broker::machine::StreamOutput::Close) {
                for s in streams.iter_mut() {
                    if *s == Some(id) {
                        *s = None;
                    }
                }
            }
        }
        while broker.poll_event().is_some() {}
    }
}
