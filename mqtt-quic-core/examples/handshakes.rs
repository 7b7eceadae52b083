//! A deterministic load for profiling connection setup: `N` full QUIC + TLS 1.3 handshakes
//! (1-RTT, no resumption) between a client and a server endpoint in memory, each closed and
//! drained. Under `valgrind --tool=callgrind`, the difference between two values of `N`
//! divided by their difference is the instruction cost of one handshake, both ends together:
//!
//! ```sh
//! cargo build --release -p mqtt-quic-core --example handshakes
//! valgrind --tool=callgrind target/release/examples/handshakes 20
//! valgrind --tool=callgrind target/release/examples/handshakes 120
//! ```

use bytes::Bytes;
use mqtt_quic_core::config::{ClientConfig, ServerConfig};
use mqtt_quic_core::quic::{Event, QuicEndpoint};
use mqtt_quic_core::tls::{ClientTls, SelfSigned, ServerTls};
use mqtt_quic_core::Datagram;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(100);
    let cert = SelfSigned::generate(&["localhost"]).expect("certificate");
    let mut sc = ServerConfig::new(ServerTls::from_self_signed(&cert).expect("TLS"));
    sc.seed = 1;
    let mut server = QuicEndpoint::server(&sc).expect("server");
    let mut cc = ClientConfig::new(ClientTls::insecure());
    cc.zero_rtt = false;
    cc.seed = 2;
    let mut client = QuicEndpoint::client(&cc).expect("client");
    let server_addr: SocketAddr = "10.0.0.1:14567".parse().expect("address");
    let client_addr: SocketAddr = "10.0.0.2:50000".parse().expect("address");
    #[allow(clippy::disallowed_methods)] // the example is the driver: it owns the clock
    let mut now = Instant::now();
    let mut buf = Vec::new();
    let mut round = |client: &mut QuicEndpoint, server: &mut QuicEndpoint, now: &mut Instant| {
        *now += Duration::from_micros(50);
        client.handle_timeout(*now);
        server.handle_timeout(*now);
        while let Some(t) = client.poll_transmit(*now, &mut buf) {
            server.handle_datagram(*now, Datagram::new(client_addr, &buf[..t.size]));
        }
        while let Some(t) = server.poll_transmit(*now, &mut buf) {
            client.handle_datagram(*now, Datagram::new(server_addr, &buf[..t.size]));
        }
    };
    for _ in 0..n {
        let conn = client.connect(now, server_addr, "localhost").expect("connect");
        client.send(now, conn, Bytes::from_static(b"C")).expect("send");
        'handshake: loop {
            round(&mut client, &mut server, &mut now);
            while client.poll_event().is_some() {}
            while let Some(e) = server.poll_event() {
                if matches!(e, Event::Received { .. }) {
                    break 'handshake;
                }
            }
        }
        client.close(now, conn, 0, "").expect("close");
        for _ in 0..4 {
            now += Duration::from_secs(1);
            round(&mut client, &mut server, &mut now);
        }
        while client.poll_event().is_some() {}
        while server.poll_event().is_some() {}
    }
    println!("{n} handshakes");
}
