//! Many clients on one QUIC endpoint (`ClientPool`) against the broker machine, in memory.

use mqtt_proto::{Publish, QoS, Subscription, TopicFilter, TopicName};
use mqtt_quic_core::broker::machine::{Broker, BrokerConfig};
use mqtt_quic_core::config::{ClientConfig, ServerConfig};
use mqtt_quic_core::pool::ClientPool;
use mqtt_quic_core::session::client::{ClientEvent, ClientSessionConfig};
use mqtt_quic_core::tls::{ClientTls, SelfSigned, ServerTls};
use mqtt_quic_core::Datagram;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Passes datagrams both ways and advances time by `step`.
fn step(broker: &mut Broker, pool: &mut ClientPool, now: &mut Instant, step: Duration) {
    let (server, client): (SocketAddr, SocketAddr) =
        ("10.0.0.1:14567".parse().unwrap(), "10.0.0.2:5000".parse().unwrap());
    let mut buf = Vec::new();
    for _ in 0..100 {
        let mut moved = false;
        while let Some(t) = pool.poll_transmit_batch(*now, 8, &mut buf) {
            moved = true;
            for d in t.datagrams(&buf) {
                broker.handle_datagram(*now, Datagram::new(client, d));
            }
        }
        while let Some(t) = broker.poll_transmit(*now, &mut buf) {
            moved = true;
            pool.handle_datagram(*now, Datagram::new(server, &buf[..t.size]));
        }
        if !moved {
            break;
        }
    }
    *now += step;
    broker.handle_timeout(*now);
    pool.handle_timeout(*now);
}

#[test]
fn fifty_clients_on_one_endpoint_talk_through_the_broker() {
    let cert = SelfSigned::generate(&["broker.test"]).unwrap();
    let mut broker =
        Broker::new(BrokerConfig::new(ServerConfig::new(ServerTls::from_self_signed(&cert).unwrap()))).unwrap();
    let mut pool = ClientPool::new(
        &ClientConfig::new(ClientTls::insecure()),
        "10.0.0.1:14567".parse().unwrap(),
        "broker.test",
        60,
    )
    .unwrap();
    #[allow(clippy::disallowed_methods)]
    let mut now = Instant::now();
    for i in 0..50 {
        pool.add(now, ClientSessionConfig { client_id: format!("c{i}"), ..Default::default() }).unwrap();
    }
    let mut connected = 0;
    for _ in 0..200 {
        step(&mut broker, &mut pool, &mut now, Duration::from_millis(1));
        while let Some((_, e)) = pool.poll_event() {
            connected += matches!(e, ClientEvent::Connected { .. }) as usize;
        }
        if connected == 50 {
            break;
        }
    }
    assert_eq!(connected, 50);
    assert_eq!(broker.connected(), 50);
    pool.subscribe(now, 0, vec![Subscription::new(TopicFilter::new("t/#").unwrap(), QoS::AtLeastOnce)]).unwrap();
    for _ in 0..20 {
        step(&mut broker, &mut pool, &mut now, Duration::from_millis(1));
    }
    for i in 1..50 {
        let p = Publish::new(TopicName::new(format!("t/{i}")).unwrap(), "x").with_qos(QoS::AtLeastOnce);
        pool.publish(now, i, p).unwrap();
    }
    let (mut got, mut acked) = (0, 0);
    for _ in 0..200 {
        step(&mut broker, &mut pool, &mut now, Duration::from_millis(1));
        while let Some((i, e)) = pool.poll_event() {
            match e {
                ClientEvent::Message(_) if i == 0 => got += 1,
                ClientEvent::Published { .. } => acked += 1,
                _ => {}
            }
        }
    }
    assert_eq!((got, acked), (49, 49));
    for i in 0..50 {
        pool.disconnect(now, i).unwrap();
    }
    for _ in 0..50 {
        step(&mut broker, &mut pool, &mut now, Duration::from_millis(1));
    }
    assert_eq!(broker.connected(), 0);
}

#[test]
fn a_rejected_certificate_is_reported_with_its_reason() {
    let cert = SelfSigned::generate(&["broker.test"]).unwrap();
    let mut broker =
        Broker::new(BrokerConfig::new(ServerConfig::new(ServerTls::from_self_signed(&cert).unwrap()))).unwrap();
    let wrong = ClientTls::pinned(&"00".repeat(32)).unwrap();
    let mut pool =
        ClientPool::new(&ClientConfig::new(wrong), "10.0.0.1:14567".parse().unwrap(), "broker.test", 60).unwrap();
    #[allow(clippy::disallowed_methods)]
    let mut now = Instant::now();
    let i = pool.add(now, ClientSessionConfig { client_id: "c".into(), ..Default::default() }).unwrap();
    assert!(pool.close_reason(i).is_none());
    let mut lost = false;
    for _ in 0..100 {
        step(&mut broker, &mut pool, &mut now, Duration::from_millis(1));
        while let Some((who, e)) = pool.poll_event() {
            lost |= who == i && matches!(e, ClientEvent::Disconnected { .. });
        }
        if lost {
            break;
        }
    }
    assert!(lost, "the session reports the lost connection");
    let reason = pool.close_reason(i).expect("a close reason").to_string();
    assert!(reason.contains("certificate"), "{reason}");
}
