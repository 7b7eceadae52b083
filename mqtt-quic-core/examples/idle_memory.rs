//! What an idle QUIC connection costs the server, in memory with no sockets: `N` clients
//! connect (full handshake, the MQTT stream opened with a few bytes), then everything is left
//! idle; the server endpoint is dropped and the bytes that frees, less an empty endpoint's,
//! divided by `N`, is the heap one idle connection holds. The transport settings are the
//! broker's defaults (or `--data-streams K`).
//!
//! ```sh
//! cargo run --release -p mqtt-quic-core --example idle_memory -- 2000
//! ```

use bytes::Bytes;
use mqtt_quic_core::config::{ClientConfig, ServerConfig};
use mqtt_quic_core::quic::{Event, QuicEndpoint};
use mqtt_quic_core::tls::{ClientTls, SelfSigned, ServerTls};
use mqtt_quic_core::Datagram;
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use std::alloc::System;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(2000);
    let data_streams: Option<u32> =
        args.iter().position(|a| a == "--data-streams").and_then(|i| args.get(i + 1)?.parse().ok());
    let cert = SelfSigned::generate(&["localhost"]).expect("certificate");
    let per_connection = |n: usize| -> f64 {
        let mut sc = ServerConfig::new(ServerTls::from_self_signed(&cert).expect("TLS"));
        sc.seed = 1;
        if let Some(k) = data_streams {
            sc.transport.data_streams = k;
        }
        let mut cc = ClientConfig::new(ClientTls::insecure());
        cc.zero_rtt = false;
        cc.seed = 2;
        let mut client = QuicEndpoint::client(&cc).expect("client");
        let mut server = QuicEndpoint::server(&sc).expect("server");
        let server_addr: SocketAddr = "10.0.0.1:14567".parse().expect("address");
        #[allow(clippy::disallowed_methods)] // the example is the driver: it owns the clock
        let mut now = Instant::now();
        let mut buf = Vec::new();
        let client_addr: SocketAddr = "10.0.0.2:50000".parse().expect("address");
        // Time passes by `step`; both sides' datagrams are delivered; whether the server
        // received MQTT bytes (the client's events are dropped).
        let mut round = |client: &mut QuicEndpoint, server: &mut QuicEndpoint, now: &mut Instant, step: Duration| {
            *now += step;
            let now = *now;
            client.handle_timeout(now);
            server.handle_timeout(now);
            while let Some(t) = client.poll_transmit(now, &mut buf) {
                server.handle_datagram(now, Datagram::new(client_addr, &buf[..t.size]));
            }
            while let Some(t) = server.poll_transmit(now, &mut buf) {
                client.handle_datagram(now, Datagram::new(server_addr, &buf[..t.size]));
            }
            while client.poll_event().is_some() {}
            let mut got = false;
            while let Some(e) = server.poll_event() {
                got |= matches!(e, Event::Received { .. });
            }
            got
        };
        for _ in 0..n {
            let at = now;
            let conn = client.connect(at, server_addr, "localhost").expect("connect");
            client.send(at, conn, Bytes::from_static(b"CONNECT")).expect("send");
            while !round(&mut client, &mut server, &mut now, Duration::from_micros(50)) {}
        }
        // Let acknowledgements and handshake confirmation settle: the connections are idle.
        for _ in 0..20 {
            round(&mut client, &mut server, &mut now, Duration::from_millis(100));
        }
        let region = Region::new(GLOBAL);
        drop(server);
        let stats = region.change();
        drop(client);
        (stats.bytes_deallocated as f64 - stats.bytes_allocated as f64) / 1024.0
    };
    let empty = per_connection(0);
    let full = per_connection(n);
    println!("{n} idle connections: {:.2} KiB each on the server", (full - empty) / n as f64);
}
