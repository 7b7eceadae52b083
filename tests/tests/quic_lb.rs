//! QUIC-LB connection ids: a server configured with a server id puts it in every connection id
//! it issues, in the draft's plaintext layout, and the ids still change (a client that moves
//! to a new address switches to a new one). A balancer reading the first bytes of the
//! destination connection id of any short-header packet finds the server.

use bytes::Bytes;
use mqtt_quic_core::cid::QuicLb;
use mqtt_quic_core::config::{ClientConfig, ServerConfig};
use mqtt_quic_core::quic::{Event, QuicEndpoint};
use mqtt_quic_core::tls::{ClientTls, SelfSigned, ServerTls};
use mqtt_quic_core::Datagram;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

#[test]
fn issued_connection_ids_carry_the_server_id_and_rotate() {
    let lb = QuicLb { config_rotation: 1, server_id: vec![0x4D, 0x51], nonce_len: 8 };
    let cert = SelfSigned::generate(&["broker.test"]).unwrap();
    let mut sc = ServerConfig::new(ServerTls::from_self_signed(&cert).unwrap());
    sc.load_balancer = Some(lb.clone());
    let mut server = QuicEndpoint::server(&sc).unwrap();
    let mut client = QuicEndpoint::client(&ClientConfig::new(ClientTls::insecure())).unwrap();
    let server_addr: SocketAddr = "10.0.0.1:14567".parse().unwrap();
    let mut client_addr: SocketAddr = "10.0.1.1:50000".parse().unwrap();
    #[allow(clippy::disallowed_methods)] // the test owns the clock
    let mut now = Instant::now();
    let conn = client.connect(now, server_addr, "broker.test").unwrap();
    client.send(now, conn, Bytes::from_static(b"\x10")).unwrap();
    let mut seen = BTreeSet::new();
    let mut buf = Vec::new();
    let mut exchange = |client: &mut QuicEndpoint, server: &mut QuicEndpoint, now: Instant, from: SocketAddr| {
        for _ in 0..50 {
            let mut moved = false;
            while let Some(t) = client.poll_transmit(now, &mut buf) {
                moved = true;
                for d in t.datagrams(&buf) {
                    // Short header: the destination connection id follows the first byte.
                    if d[0] & 0x80 == 0 {
                        seen.insert(d[1..1 + lb.cid_len()].to_vec());
                    }
                    server.handle_datagram(now, Datagram::new(from, d));
                }
            }
            while let Some(t) = server.poll_transmit(now, &mut buf) {
                moved = true;
                let data = buf[..t.size].to_vec();
                client.handle_datagram(now, Datagram::new(server_addr, &data));
            }
            if !moved {
                break;
            }
        }
    };
    for _ in 0..20 {
        exchange(&mut client, &mut server, now, client_addr);
        now += Duration::from_millis(10);
        client.handle_timeout(now);
        server.handle_timeout(now);
    }
    assert!(std::iter::from_fn(|| client.poll_event()).any(|e| matches!(e, Event::Connected { .. })));
    // The client moves: it probes from the new address with a new connection id.
    client_addr = "10.0.2.1:50001".parse().unwrap();
    client.local_address_changed(now, conn).unwrap();
    client.send(now, conn, Bytes::from_static(b"\x00")).unwrap();
    for _ in 0..20 {
        exchange(&mut client, &mut server, now, client_addr);
        now += Duration::from_millis(10);
        client.handle_timeout(now);
        server.handle_timeout(now);
    }
    assert!(seen.len() >= 2, "the client used {} connection id(s)", seen.len());
    for cid in &seen {
        assert_eq!(lb.server_id_of(cid), Some(&[0x4D, 0x51][..]), "{cid:02x?}");
    }
}
