//! The check behind the `quic_server` fuzz target: a QUIC server machine fed fuzzer-chosen
//! datagrams at fuzzer-chosen (monotonic) times must never panic, and must never hold more
//! connections than its limit. `tests/tests/fuzz_corpus_quic.rs` replays the committed corpus.

use mqtt_quic_core::config::ServerConfig;
use mqtt_quic_core::quic::QuicEndpoint;
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
