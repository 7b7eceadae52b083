//! The QUIC ceiling on this machine, in memory with no sockets: how fast one stream moves bytes
//! and how many handshakes complete per second, through `QuicEndpoint` (quinn-proto with rustls
//! and ring, plus this crate's machine). Every later QUIC figure is a fraction of these.
//!
//! Datagrams go straight from one machine to the other; the virtual clock advances 50 µs per
//! exchange round so pacing and timers behave as on a fast LAN.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use mqtt_quic_core::config::{ClientConfig, ServerConfig};
use mqtt_quic_core::quic::{ConnId, Event, QuicEndpoint};
use mqtt_quic_core::tls::{ClientTls, SelfSigned, ServerTls};
use mqtt_quic_core::Datagram;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

struct Pair {
    server: QuicEndpoint,
    client: QuicEndpoint,
    now: Instant,
    buf: Vec<u8>,
    server_addr: SocketAddr,
    client_addr: SocketAddr,
}

impl Pair {
    fn new(cert: &SelfSigned) -> Pair {
        let server = QuicEndpoint::server(&ServerConfig::new(ServerTls::from_self_signed(cert).unwrap())).unwrap();
        let mut cc = ClientConfig::new(ClientTls::insecure());
        // Measure full handshakes, not resumptions.
        cc.zero_rtt = false;
        let client = QuicEndpoint::client(&cc).unwrap();
        #[allow(clippy::disallowed_methods)]
        let now = Instant::now();
        Pair {
            server,
            client,
            now,
            buf: Vec::with_capacity(65536),
            server_addr: "10.0.0.1:14567".parse().unwrap(),
            client_addr: "10.0.0.2:50000".parse().unwrap(),
        }
    }

    /// One exchange round: advance the clock, fire timers, move every datagram across.
    fn round(&mut self) {
        self.now += Duration::from_micros(50);
        self.client.handle_timeout(self.now);
        self.server.handle_timeout(self.now);
        while let Some(t) = self.client.poll_transmit(self.now, &mut self.buf) {
            self.server.handle_datagram(self.now, Datagram::new(self.client_addr, &self.buf[..t.size]));
        }
        while let Some(t) = self.server.poll_transmit(self.now, &mut self.buf) {
            self.client.handle_datagram(self.now, Datagram::new(self.server_addr, &self.buf[..t.size]));
        }
    }

    /// Connects and waits until the server has the first stream byte; returns both ends' ids.
    fn connect(&mut self) -> (ConnId, ConnId) {
        let conn = self.client.connect(self.now, self.server_addr, "localhost").unwrap();
        self.client.send(self.now, conn, Bytes::from_static(b"C")).unwrap();
        loop {
            self.round();
            while let Some(e) = self.client.poll_event() {
                drop(e);
            }
            while let Some(e) = self.server.poll_event() {
                if let Event::Received { conn: server_conn, .. } = e {
                    return (conn, server_conn);
                }
            }
        }
    }
}

fn bulk(c: &mut Criterion) {
    let cert = SelfSigned::generate(&["localhost"]).unwrap();
    const TOTAL: usize = 16 << 20;
    let chunk = Bytes::from(vec![0x5Au8; 64 * 1024]);
    let mut g = c.benchmark_group("quic");
    g.throughput(Throughput::Bytes(TOTAL as u64));
    g.sample_size(10);
    g.bench_function("bulk_16MiB_one_stream", |b| {
        b.iter_batched(
            || {
                let mut pair = Pair::new(&cert);
                let ids = pair.connect();
                (pair, ids)
            },
            |(mut pair, (conn, _))| {
                let mut queued = 0;
                let mut received = 0;
                while received < TOTAL {
                    // Keep about 4 MiB queued ahead of the congestion window.
                    while queued < TOTAL && pair.client.queued(conn) < 4 << 20 {
                        pair.client.send(pair.now, conn, chunk.clone()).unwrap();
                        queued += chunk.len();
                    }
                    pair.round();
                    while let Some(e) = pair.server.poll_event() {
                        if let Event::Received { data, .. } = e {
                            received += data.len();
                        }
                    }
                    while pair.client.poll_event().is_some() {}
                }
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn handshakes(c: &mut Criterion) {
    let cert = SelfSigned::generate(&["localhost"]).unwrap();
    let mut pair = Pair::new(&cert);
    let mut g = c.benchmark_group("quic");
    g.throughput(Throughput::Elements(1));
    g.bench_function("handshake_1rtt_and_close", |b| {
        b.iter(|| {
            let (conn, _) = pair.connect();
            pair.client.close(pair.now, conn, 0, "").unwrap();
            // Let both ends drain the connection so state does not pile up.
            for _ in 0..4 {
                pair.now += Duration::from_secs(1);
                pair.round();
            }
            while pair.client.poll_event().is_some() {}
            while pair.server.poll_event().is_some() {}
        })
    });
    g.finish();
    assert_eq!(pair.client.connection_count() + pair.server.connection_count(), 0, "connections leak");
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(5));
    targets = bulk, handshakes
}
criterion_main!(benches);
