//! The QUIC machine through the deterministic simulator: handshakes, bulk transfer under loss,
//! 0-RTT, migration, idle timeout, stream closure and garbage floods.

use bytes::Bytes;
use mqtt_quic_core::config::{ClientConfig, ServerConfig, TransportSettings};
use mqtt_quic_core::quic::{CloseReason, ConnId, Event, QuicEndpoint};
use mqtt_quic_core::tls::{ClientTls, ServerTls};
use mqtt_quic_core::Datagram;
use mqtt_tests::sim::{Link, Rng, Sim};
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

const SERVER: usize = 0;
const CLIENT: usize = 1;

fn server_addr() -> SocketAddr {
    "10.0.0.1:14567".parse().unwrap()
}

fn client_addr() -> SocketAddr {
    "10.0.0.2:50000".parse().unwrap()
}

/// One certificate for the whole test binary: generating keys is the slow part of setup. Ed25519,
/// so handshakes are the same size every run and a seed replays a run exactly.
fn tls() -> &'static ServerTls {
    static TLS: OnceLock<ServerTls> = OnceLock::new();
    TLS.get_or_init(|| mqtt_tests::pki::ed25519_server_tls(&["broker.test"]))
}

fn pinned() -> ClientTls {
    ClientTls::pinned(&mqtt_quic_core::tls::fingerprint_hex(&tls().fingerprint())).unwrap()
}

fn pair(seed: u64, link: Link, transport: TransportSettings) -> Sim<QuicEndpoint> {
    let mut sc = ServerConfig::new(tls().clone());
    // Tests open many connections from the one client address.
    sc.max_handshakes_per_ip = 10_000;
    sc.transport = transport.clone();
    sc.seed = seed;
    let mut cc = ClientConfig::new(pinned());
    cc.transport = transport;
    cc.seed = seed + 1;
    let mut sim = Sim::new(seed, link);
    sim.add_host(server_addr(), QuicEndpoint::server(&sc).unwrap());
    sim.add_host(client_addr(), QuicEndpoint::client(&cc).unwrap());
    sim
}

/// What the two applications saw.
#[derive(Default, Debug)]
struct Seen {
    server: Vec<Event>,
    client: Vec<Event>,
    server_bytes: Vec<u8>,
    client_bytes: Vec<u8>,
}

impl Seen {
    /// Drains both machines' events; with `echo`, the server sends back what it receives.
    fn pump(&mut self, sim: &mut Sim<QuicEndpoint>, echo: bool) {
        let now = sim.now();
        while let Some(e) = sim.machine(SERVER).poll_event() {
            if let Event::Received { conn, data } = &e {
                self.server_bytes.extend_from_slice(data);
                if echo {
                    sim.machine(SERVER).send(now, *conn, data.clone()).unwrap();
                }
            }
            self.server.push(e);
        }
        while let Some(e) = sim.machine(CLIENT).poll_event() {
            if let Event::Received { data, .. } = &e {
                self.client_bytes.extend_from_slice(data);
            }
            self.client.push(e);
        }
    }

    fn closed(events: &[Event]) -> Option<CloseReason> {
        events.iter().find_map(|e| match e {
            Event::Closed { reason, .. } => Some(reason.clone()),
            _ => None,
        })
    }

    /// The connection the server accepted (panics if none: a test bug).
    fn server_conn(&self) -> ConnId {
        self.server
            .iter()
            .find_map(|e| match e {
                Event::Connected { conn, .. } => Some(*conn),
                _ => None,
            })
            .expect("the server accepted a connection")
    }

    fn connected(events: &[Event]) -> Option<Option<bool>> {
        events.iter().find_map(|e| match e {
            Event::Connected { zero_rtt, .. } => Some(*zero_rtt),
            _ => None,
        })
    }
}

fn connect(sim: &mut Sim<QuicEndpoint>) -> ConnId {
    let now = sim.now();
    sim.machine(CLIENT).connect(now, server_addr(), "broker.test").unwrap()
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    (0..len).map(|_| rng.next_u64() as u8).collect()
}

#[test]
fn handshake_and_echo() {
    let mut sim = pair(1, Link::default(), TransportSettings::default());
    let conn = connect(&mut sim);
    let now = sim.now();
    sim.machine(CLIENT).send(now, conn, Bytes::from_static(b"CONNECT")).unwrap();
    let mut seen = Seen::default();
    assert!(sim.drive_until(10_000, |sim| {
        seen.pump(sim, true);
        seen.client_bytes == b"CONNECT"
    }));
    assert_eq!(Seen::connected(&seen.client), Some(None), "client connected without 0-RTT");
    assert!(Seen::connected(&seen.server).is_some());
    // 10 ms each way: handshake (1 RTT) then data (1 RTT) back: about 40 ms of virtual time.
    assert!(sim.elapsed() < Duration::from_millis(100), "{:?}", sim.elapsed());
}

/// Sends `len` bytes each way and checks both arrive intact.
fn bulk(seed: u64, loss: f64) -> Duration {
    let link = Link { latency: Duration::from_millis(15), loss, ..Link::default() };
    let mut sim = pair(seed, link, TransportSettings::default());
    let conn = connect(&mut sim);
    const LEN: usize = 1 << 20;
    let up = pattern(LEN, seed);
    let down = pattern(LEN, seed + 100);
    let now = sim.now();
    for chunk in up.chunks(16 * 1024) {
        sim.machine(CLIENT).send(now, conn, Bytes::copy_from_slice(chunk)).unwrap();
    }
    let mut seen = Seen::default();
    let mut server_conn = None;
    let done = sim.drive_until(2_000_000, |sim| {
        seen.pump(sim, false);
        if server_conn.is_none() {
            server_conn = seen.server.iter().find_map(|e| match e {
                Event::Connected { conn, .. } => Some(*conn),
                _ => None,
            });
            if let Some(c) = server_conn {
                let now = sim.now();
                for chunk in down.chunks(16 * 1024) {
                    sim.machine(SERVER).send(now, c, Bytes::copy_from_slice(chunk)).unwrap();
                }
            }
        }
        seen.server_bytes.len() == LEN && seen.client_bytes.len() == LEN
    });
    assert!(
        done,
        "transfer at {loss} loss did not finish: {} / {} bytes",
        seen.server_bytes.len(),
        seen.client_bytes.len()
    );
    assert!(seen.server_bytes == up, "upload corrupted at {loss} loss");
    assert!(seen.client_bytes == down, "download corrupted at {loss} loss");
    assert!(sim.stats.lost > 0 || loss == 0.0);
    eprintln!("loss {loss}: {:?} virtual, {:?}", sim.elapsed(), sim.stats);
    sim.elapsed()
}

#[test]
fn one_mib_each_way_without_loss() {
    bulk(10, 0.0);
}

#[test]
fn one_mib_each_way_at_5_percent_loss() {
    bulk(11, 0.05);
}

#[test]
fn one_mib_each_way_at_20_percent_loss() {
    bulk(12, 0.20);
}

#[test]
fn same_seed_same_run() {
    assert_eq!(bulk(21, 0.05), bulk(21, 0.05));
}

#[test]
fn idle_timeout_closes_both_ends() {
    let transport = TransportSettings { idle_timeout: Duration::from_secs(5), ..TransportSettings::default() };
    let mut sim = pair(3, Link::default(), transport);
    let conn = connect(&mut sim);
    let now = sim.now();
    sim.machine(CLIENT).send(now, conn, Bytes::from_static(b"x")).unwrap();
    let mut seen = Seen::default();
    assert!(sim.drive_until(100_000, |sim| {
        seen.pump(sim, false);
        Seen::closed(&seen.client).is_some() && Seen::closed(&seen.server).is_some()
    }));
    assert_eq!(Seen::closed(&seen.client), Some(CloseReason::TimedOut));
    assert_eq!(Seen::closed(&seen.server), Some(CloseReason::TimedOut));
    assert!(sim.elapsed() >= Duration::from_secs(5) && sim.elapsed() < Duration::from_secs(7), "{:?}", sim.elapsed());
}

#[test]
fn keep_alive_holds_an_idle_connection_open() {
    let transport = TransportSettings {
        idle_timeout: Duration::from_secs(5),
        keep_alive: Some(Duration::from_secs(2)),
        ..TransportSettings::default()
    };
    let mut sim = pair(4, Link::default(), transport);
    let conn = connect(&mut sim);
    let now = sim.now();
    sim.machine(CLIENT).send(now, conn, Bytes::from_static(b"x")).unwrap();
    let mut seen = Seen::default();
    // A minute of virtual time: the keep-alives must keep it open throughout.
    sim.drive_until(100_000, |sim| {
        seen.pump(sim, false);
        sim.elapsed() > Duration::from_secs(60)
    });
    assert_eq!(Seen::closed(&seen.client), None);
    assert_eq!(Seen::closed(&seen.server), None);
}

#[test]
fn finishing_the_stream_closes_the_connection() {
    let mut sim = pair(5, Link::default(), TransportSettings::default());
    let conn = connect(&mut sim);
    let now = sim.now();
    sim.machine(CLIENT).send(now, conn, Bytes::from_static(b"DISCONNECT")).unwrap();
    sim.machine(CLIENT).finish(now, conn).unwrap();
    let mut seen = Seen::default();
    assert!(sim.drive_until(10_000, |sim| {
        seen.pump(sim, false);
        Seen::closed(&seen.client).is_some() && Seen::closed(&seen.server).is_some()
    }));
    // The bytes before the FIN arrive, then the server sees the stream end.
    assert_eq!(seen.server_bytes, b"DISCONNECT");
    assert_eq!(Seen::closed(&seen.server), Some(CloseReason::StreamFinished));
    assert!(matches!(Seen::closed(&seen.client), Some(CloseReason::Local | CloseReason::PeerClosed { code: 0, .. })));
    sim.drive(10_000);
    assert_eq!(sim.machine(SERVER).connection_count(), 0);
    assert_eq!(sim.machine(CLIENT).connection_count(), 0);
}

/// A server that finished a session's stream closes the connection five seconds later even if
/// the peer never acknowledges the FIN (here: nothing gets through any more), instead of
/// holding it until the idle timeout (30 s).
#[test]
fn a_server_closes_a_finished_connection_the_peer_does_not_acknowledge() {
    let mut sim = pair(6, Link::default(), TransportSettings::default());
    let conn = connect(&mut sim);
    let now = sim.now();
    sim.machine(CLIENT).send(now, conn, Bytes::from_static(b"CONNECT")).unwrap();
    let mut seen = Seen::default();
    assert!(sim.drive_until(10_000, |sim| {
        seen.pump(sim, false);
        seen.server_bytes == b"CONNECT"
    }));
    let server_conn = seen.server_conn();
    sim.set_link(Link { loss: 1.0, ..Link::default() });
    let finished = sim.now();
    sim.machine(SERVER).send(finished, server_conn, Bytes::from_static(b"DISCONNECT")).unwrap();
    sim.machine(SERVER).finish(finished, server_conn).unwrap();
    assert!(sim.drive_until(100_000, |sim| {
        seen.pump(sim, false);
        Seen::closed(&seen.server).is_some()
    }));
    let after = sim.now() - finished;
    assert!(after >= Duration::from_secs(5) && after < Duration::from_secs(6), "closed after {after:?}");
}

#[test]
fn zero_rtt_reconnect_delivers_a_round_trip_sooner() {
    let rtt = Duration::from_millis(40);
    let link = Link { latency: rtt / 2, ..Link::default() };
    let mut sim = pair(6, link, TransportSettings::default());
    let mut first_byte_after = Vec::new();
    let mut zero_rtt = Vec::new();
    for _ in 0..2 {
        let start = sim.now();
        let conn = connect(&mut sim);
        sim.machine(CLIENT).send(start, conn, Bytes::from_static(b"CONNECT")).unwrap();
        let mut seen = Seen::default();
        assert!(sim.drive_until(10_000, |sim| {
            seen.pump(sim, true);
            !seen.server_bytes.is_empty()
        }));
        first_byte_after.push(sim.now() - start);
        // Let the handshake finish and the session ticket arrive, then close.
        assert!(sim.drive_until(10_000, |sim| {
            seen.pump(sim, true);
            seen.client_bytes == b"CONNECT"
        }));
        let now = sim.now();
        sim.machine(CLIENT).close(now, conn, 0, "bye").unwrap();
        sim.drive(10_000);
        seen.pump(&mut sim, false);
        zero_rtt.push(Seen::connected(&seen.client).unwrap());
    }
    assert_eq!(zero_rtt, [None, Some(true)], "second connection must use accepted 0-RTT");
    // Full handshake: the first byte travels with the client's second flight (1.5 RTT). 0-RTT:
    // with the first flight (0.5 RTT).
    assert_eq!(first_byte_after[0], rtt + rtt / 2);
    assert_eq!(first_byte_after[1], rtt / 2);
}

#[test]
fn migration_mid_transfer_loses_nothing() {
    let link = Link { latency: Duration::from_millis(15), ..Link::default() };
    let mut sim = pair(7, link, TransportSettings::default());
    let conn = connect(&mut sim);
    const LEN: usize = 512 * 1024;
    let up = pattern(LEN, 7);
    let now = sim.now();
    for chunk in up.chunks(8 * 1024) {
        sim.machine(CLIENT).send(now, conn, Bytes::copy_from_slice(chunk)).unwrap();
    }
    let mut seen = Seen::default();
    // Half-way through, the client's NAT rebinds it to a new address.
    assert!(sim.drive_until(1_000_000, |sim| {
        seen.pump(sim, false);
        seen.server_bytes.len() >= LEN / 2
    }));
    let moved: SocketAddr = "10.0.0.99:61000".parse().unwrap();
    sim.set_address(CLIENT, moved);
    assert!(sim.drive_until(1_000_000, |sim| {
        seen.pump(sim, false);
        seen.server_bytes.len() == LEN
    }));
    assert!(seen.server_bytes == up, "data corrupted across migration");
    let server_conn = seen.server_conn();
    assert_eq!(sim.machine(SERVER).remote_address(server_conn), Some(moved));
    assert_eq!(Seen::closed(&seen.server), None);
    // The server reported the move once (for the broker's log).
    let migrations: Vec<&Event> = seen.server.iter().filter(|e| matches!(e, Event::Migrated { .. })).collect();
    assert_eq!(migrations, [&Event::Migrated { conn: server_conn, remote: moved }]);
}

#[test]
fn garbage_flood_leaves_the_server_serving() {
    let mut sim = pair(8, Link::default(), TransportSettings::default());
    let mut rng = Rng::new(99);
    // 20 000 datagrams of random bytes, truncated-looking lengths, from 500 addresses.
    for i in 0..20_000u32 {
        let len = (rng.next_u64() % 1400) as usize;
        let mut data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        if i % 3 == 0 && !data.is_empty() {
            // Long-header-looking first byte, so the server parses further.
            data[0] = 0xC0 | (data[0] & 0x0F);
        }
        let from: SocketAddr = format!("10.9.{}.{}:{}", (i % 500) / 250, i % 250, 1024 + i % 500).parse().unwrap();
        sim.send(from, server_addr(), data);
        if i % 1000 == 0 {
            sim.step();
        }
    }
    sim.drive(100_000);
    let conn = connect(&mut sim);
    let now = sim.now();
    sim.machine(CLIENT).send(now, conn, Bytes::from_static(b"still here")).unwrap();
    let mut seen = Seen::default();
    assert!(sim.drive_until(10_000, |sim| {
        seen.pump(sim, true);
        seen.client_bytes == b"still here"
    }));
    assert_eq!(sim.machine(SERVER).connection_count(), 1, "garbage must not create connections");
}

#[test]
fn connection_limit_refuses_the_excess() {
    let mut sc = ServerConfig::new(tls().clone());
    sc.max_connections = 1;
    let mut sim = Sim::new(9, Link::default());
    sim.add_host(server_addr(), QuicEndpoint::server(&sc).unwrap());
    sim.add_host(client_addr(), QuicEndpoint::client(&ClientConfig::new(ClientTls::insecure())).unwrap());
    let a = connect(&mut sim);
    let b = connect(&mut sim);
    let mut seen = Seen::default();
    sim.drive_until(10_000, |sim| {
        seen.pump(sim, false);
        seen.client.iter().any(|e| matches!(e, Event::Closed { .. }))
    });
    let closed: Vec<(ConnId, CloseReason)> = seen
        .client
        .iter()
        .filter_map(|e| match e {
            Event::Closed { conn, reason } => Some((*conn, reason.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(closed, [(b, CloseReason::Refused)]);
    assert!(seen.client.iter().any(|e| matches!(e, Event::Connected { conn, .. } if *conn == a)));
}

/// A handshake between a server and a client built from these TLS settings; returns what the
/// client saw: connected, or the close reason.
fn tls_outcome(server: ServerTls, client: ClientTls, name: &str) -> Result<(), CloseReason> {
    let mut sim = Sim::new(30, Link::default());
    sim.add_host(server_addr(), QuicEndpoint::server(&ServerConfig::new(server)).unwrap());
    sim.add_host(client_addr(), QuicEndpoint::client(&ClientConfig::new(client)).unwrap());
    let now = sim.now();
    let conn = sim.machine(CLIENT).connect(now, server_addr(), name).unwrap();
    sim.machine(CLIENT).send(now, conn, Bytes::from_static(b"hi")).unwrap();
    let mut seen = Seen::default();
    sim.drive_until(10_000, |sim| {
        seen.pump(sim, true);
        seen.client_bytes == b"hi" || Seen::closed(&seen.client).is_some()
    });
    match Seen::closed(&seen.client) {
        Some(reason) => Err(reason),
        None if seen.client_bytes == b"hi" => Ok(()),
        None => panic!("neither connected nor closed: {seen:?}"),
    }
}

#[test]
fn ca_verification_checks_chain_and_name() {
    let pki = mqtt_tests::pki::Pki::new();
    let leaf = pki.issue(&["broker.test"], false);
    let server = || ServerTls::from_pem(leaf.cert_pem.as_bytes(), leaf.key_pem.as_bytes()).unwrap();
    let trusting = ClientTls::with_ca_pem(pki.ca_pem.as_bytes()).unwrap();
    assert_eq!(tls_outcome(server(), trusting.clone(), "broker.test"), Ok(()));
    // Wrong name, or a CA that did not issue the certificate: refused.
    assert!(matches!(tls_outcome(server(), trusting, "other.test"), Err(CloseReason::Transport(_))));
    let stranger = mqtt_tests::pki::Pki::new();
    let distrusting = ClientTls::with_ca_pem(stranger.ca_pem.as_bytes()).unwrap();
    assert!(matches!(tls_outcome(server(), distrusting, "broker.test"), Err(CloseReason::Transport(_))));
}

#[test]
fn pinning_accepts_only_the_pinned_certificate() {
    let server = || tls().clone();
    let right = pinned();
    assert_eq!(tls_outcome(server(), right, "anything"), Ok(()));
    let wrong = ClientTls::pinned(&"00".repeat(32)).unwrap();
    assert!(matches!(tls_outcome(server(), wrong, "anything"), Err(CloseReason::Transport(_))));
}

#[test]
fn mutual_tls_requires_a_client_certificate_from_the_ca() {
    let pki = mqtt_tests::pki::Pki::new();
    let leaf = pki.issue(&["broker.test"], false);
    let device = pki.issue(&["device-7"], true);
    let server = || {
        ServerTls::from_pem(leaf.cert_pem.as_bytes(), leaf.key_pem.as_bytes())
            .unwrap()
            .require_client_certificates(pki.ca_pem.as_bytes())
            .unwrap()
    };
    let anonymous = ClientTls::with_ca_pem(pki.ca_pem.as_bytes()).unwrap();
    assert!(tls_outcome(server(), anonymous.clone(), "broker.test").is_err());
    let with_cert = anonymous.with_client_certificate(device.cert_pem.as_bytes(), device.key_pem.as_bytes()).unwrap();
    assert_eq!(tls_outcome(server(), with_cert, "broker.test"), Ok(()));
}

#[test]
fn impaired_link_with_jitter_duplication_reordering_and_bursts() {
    let link = Link {
        latency: Duration::from_millis(20),
        jitter: Duration::from_millis(15),
        loss: 0.02,
        burst: Some((0.01, 0.3)),
        duplicate: 0.05,
        reorder: 0.1,
        mtu: 1500,
    };
    let mut sim = pair(13, link, TransportSettings::default());
    let conn = connect(&mut sim);
    const LEN: usize = 256 * 1024;
    let up = pattern(LEN, 13);
    let now = sim.now();
    sim.machine(CLIENT).send(now, conn, Bytes::from(up.clone())).unwrap();
    let mut seen = Seen::default();
    assert!(sim.drive_until(1_000_000, |sim| {
        seen.pump(sim, true);
        seen.client_bytes.len() == LEN
    }));
    assert!(seen.server_bytes == up && seen.client_bytes == up, "echo corrupted");
    assert!(sim.stats.duplicated > 0 && sim.stats.lost > 0, "{:?}", sim.stats);
}

#[test]
fn datagrams_above_the_path_mtu_are_never_needed() {
    // A path that drops anything above 1280 bytes: QUIC's 1200-byte initial MTU still works.
    let link = Link { mtu: 1280, ..Link::default() };
    let mut sim = pair(14, link, TransportSettings::default());
    let conn = connect(&mut sim);
    let data = pattern(100_000, 14);
    let now = sim.now();
    sim.machine(CLIENT).send(now, conn, Bytes::from(data.clone())).unwrap();
    let mut seen = Seen::default();
    assert!(sim.drive_until(1_000_000, |sim| {
        seen.pump(sim, false);
        seen.server_bytes.len() == data.len()
    }));
    assert!(seen.server_bytes == data);
}

#[test]
fn client_rebinds_on_command() {
    let mut sim = pair(15, Link::default(), TransportSettings::default());
    let conn = connect(&mut sim);
    let now = sim.now();
    sim.machine(CLIENT).send(now, conn, Bytes::from_static(b"one")).unwrap();
    let mut seen = Seen::default();
    assert!(sim.drive_until(10_000, |sim| {
        seen.pump(sim, true);
        seen.client_bytes == b"one"
    }));
    // The client moves to another network and tells its machine.
    let moved: SocketAddr = "10.0.1.7:40000".parse().unwrap();
    sim.set_address(CLIENT, moved);
    let now = sim.now();
    sim.machine(CLIENT).local_address_changed(now, conn).unwrap();
    sim.machine(CLIENT).send(now, conn, Bytes::from_static(b"two")).unwrap();
    assert!(sim.drive_until(10_000, |sim| {
        seen.pump(sim, true);
        seen.client_bytes == b"onetwo"
    }));
    let server_conn = seen.server.iter().find_map(|e| match e {
        Event::Connected { conn, .. } => Some(*conn),
        _ => None,
    });
    assert_eq!(sim.machine(SERVER).remote_address(server_conn.unwrap()), Some(moved));
}

#[test]
fn stateless_retry_validates_the_address_first() {
    let mut sc = ServerConfig::new(tls().clone());
    sc.stateless_retry = true;
    let mut sim = Sim::new(16, Link::default());
    sim.add_host(server_addr(), QuicEndpoint::server(&sc).unwrap());
    sim.add_host(client_addr(), QuicEndpoint::client(&ClientConfig::new(ClientTls::insecure())).unwrap());
    let start = sim.now();
    let conn = connect(&mut sim);
    sim.machine(CLIENT).send(start, conn, Bytes::from_static(b"hi")).unwrap();
    let mut seen = Seen::default();
    assert!(sim.drive_until(10_000, |sim| {
        seen.pump(sim, false);
        !seen.server_bytes.is_empty()
    }));
    // The Retry round trip comes first: 2.5 RTT (RTT 20 ms) instead of 1.5.
    assert_eq!(sim.now() - start, Duration::from_millis(50));
}

#[test]
fn one_client_machine_holds_a_thousand_connections() {
    let mut sim = pair(17, Link::default(), TransportSettings::default());
    let now = sim.now();
    let conns: Vec<ConnId> =
        (0..1000).map(|_| sim.machine(CLIENT).connect(now, server_addr(), "broker.test").unwrap()).collect();
    for (i, c) in conns.iter().enumerate() {
        sim.machine(CLIENT).send(now, *c, Bytes::from(format!("{i:04}"))).unwrap();
    }
    let mut seen = Seen::default();
    assert!(sim.drive_until(1_000_000, |sim| {
        seen.pump(sim, true);
        seen.client_bytes.len() == 4000
    }));
    assert_eq!(sim.machine(CLIENT).connection_count(), 1000);
    assert_eq!(sim.machine(SERVER).connection_count(), 1000);
    // Every connection got its own bytes back.
    let mut per_conn: Vec<(ConnId, Vec<u8>)> = Vec::new();
    for e in &seen.client {
        if let Event::Received { conn, data } = e {
            match per_conn.iter_mut().find(|(c, _)| c == conn) {
                Some((_, v)) => v.extend_from_slice(data),
                None => per_conn.push((*conn, data.to_vec())),
            }
        }
    }
    for (i, c) in conns.iter().enumerate() {
        let got = &per_conn.iter().find(|(x, _)| x == c).unwrap().1;
        assert_eq!(got, format!("{i:04}").as_bytes());
    }
}

#[test]
fn handshakes_from_one_address_are_bounded() {
    let mut sc = ServerConfig::new(tls().clone());
    sc.max_handshakes_per_ip = 4;
    let mut sim = Sim::new(18, Link::default());
    sim.add_host(server_addr(), QuicEndpoint::server(&sc).unwrap());
    sim.add_host(client_addr(), QuicEndpoint::client(&ClientConfig::new(ClientTls::insecure())).unwrap());
    let now = sim.now();
    for _ in 0..10 {
        sim.machine(CLIENT).connect(now, server_addr(), "x").unwrap();
    }
    let mut seen = Seen::default();
    sim.drive_until(10_000, |sim| {
        seen.pump(sim, false);
        seen.client.iter().filter(|e| matches!(e, Event::Connected { .. } | Event::Closed { .. })).count() == 10
    });
    let refused =
        seen.client.iter().filter(|e| matches!(e, Event::Closed { reason: CloseReason::Refused, .. })).count();
    let connected = seen.client.iter().filter(|e| matches!(e, Event::Connected { .. })).count();
    assert_eq!((connected, refused), (4, 6), "{:?}", seen.client);
    // Once those four are through their handshake, the same address may start new ones.
    let now = sim.now();
    let late = sim.machine(CLIENT).connect(now, server_addr(), "x").unwrap();
    assert!(sim.drive_until(10_000, |sim| {
        seen.pump(sim, false);
        seen.client.iter().any(|e| matches!(e, Event::Connected { conn, .. } if *conn == late))
    }));
}

/// GSO batches: several datagrams of one connection per transmit, split back by
/// `Transmit::datagrams`, carry a bulk transfer intact.
#[test]
fn batched_transmits_carry_a_transfer_intact() {
    let mut server = QuicEndpoint::server(&ServerConfig::new(tls().clone())).unwrap();
    let mut client = QuicEndpoint::client(&ClientConfig::new(ClientTls::insecure())).unwrap();
    #[allow(clippy::disallowed_methods)]
    let mut now = std::time::Instant::now();
    let conn = client.connect(now, server_addr(), "broker.test").unwrap();
    let data = pattern(200_000, 9);
    client.send(now, conn, Bytes::from(data.clone())).unwrap();
    let (mut buf, mut got, mut batches) = (Vec::new(), Vec::new(), 0);
    for _ in 0..500 {
        now += Duration::from_millis(1);
        client.handle_timeout(now);
        server.handle_timeout(now);
        while let Some(t) = client.poll_transmit_batch(now, 10, &mut buf) {
            if t.segment_size.is_some_and(|s| s < t.size) {
                batches += 1;
            }
            let parts: Vec<&[u8]> = t.datagrams(&buf).collect();
            assert_eq!(parts.iter().map(|p| p.len()).sum::<usize>(), t.size);
            for d in parts {
                server.handle_datagram(now, Datagram::new(client_addr(), d));
            }
        }
        while let Some(t) = server.poll_transmit_batch(now, 10, &mut buf) {
            for d in t.datagrams(&buf) {
                client.handle_datagram(now, Datagram::new(server_addr(), d));
            }
        }
        while let Some(e) = server.poll_event() {
            if let Event::Received { data, .. } = e {
                got.extend_from_slice(&data);
            }
        }
        if got.len() == data.len() {
            break;
        }
    }
    assert_eq!(got, data);
    assert!(batches > 0, "no transmit carried more than one datagram");
}
