//! The client machine over a byte stream (the TCP/TLS path) against the broker's byte-stream
//! entry points, bytes passed in memory with a virtual clock.

use bytes::Bytes;
use mqtt_proto::{QoS, Subscription, TopicFilter, TopicName};
use mqtt_quic_core::broker::machine::{Broker, BrokerConfig};
use mqtt_quic_core::client::{ReconnectPolicy, StreamCommand};
use mqtt_quic_core::config::ServerConfig;
use mqtt_quic_core::session::client::{ClientEvent, DisconnectReason};
use mqtt_quic_core::tls::{SelfSigned, ServerTls};
use mqtt_tests::pipes::Pipes;
use std::time::Duration;

const POLICY: ReconnectPolicy = ReconnectPolicy { initial: Duration::from_millis(100), max: Duration::from_secs(1) };

#[test]
fn publish_and_receive_over_streams_then_reconnect_after_loss() {
    let mut p = Pipes::new(2, POLICY);
    let now = p.now;
    for (c, _, _) in &mut p.clients {
        c.start(now).unwrap();
    }
    p.run_until(|p| p.clients.iter().all(|c| c.0.is_connected()));
    assert_eq!(p.opens, 2);
    assert_eq!(p.clients[0].0.poll_transmit(now, &mut Vec::new()), None, "no datagrams on a stream client");

    let sub = Subscription::new(TopicFilter::new("a/#").unwrap(), QoS::ExactlyOnce);
    let now = p.now;
    p.clients[1].0.subscribe(now, vec![sub], None).unwrap();
    p.run_until(|p| p.clients[1].2.iter().any(|e| matches!(e, ClientEvent::Subscribed { .. })));
    let now = p.now;
    let publish =
        mqtt_proto::Publish::new(TopicName::new("a/b").unwrap(), Bytes::from_static(b"hi")).with_qos(QoS::AtLeastOnce);
    p.clients[0].0.publish(now, publish).unwrap();
    p.run_until(|p| p.clients[1].2.iter().any(|e| matches!(e, ClientEvent::Message(m) if m.payload == "hi")));
    assert!(p.clients[0].2.iter().any(|e| matches!(e, ClientEvent::Published { .. })));

    // The broker drops client 0's stream (as a broken TCP connection would): the machine asks
    // for a new one after its backoff and connects again.
    let id = p.clients[0].1.take().unwrap();
    let now = p.now;
    p.broker.handle_stream_closed(now, id);
    p.clients[0].0.handle_stream_closed(now);
    assert!(!p.clients[0].0.is_connected());
    p.run_until(|p| p.clients[0].0.is_connected());
    assert_eq!(p.opens, 3);

    // A clean disconnect stops the machine: no more opens.
    let now = p.now;
    p.clients[0].0.disconnect(now, mqtt_proto::ReasonCode::Success).unwrap();
    for _ in 0..300 {
        p.run(Duration::from_millis(10));
    }
    assert!(p.clients[0].0.is_done());
    assert!(p.clients[0].1.is_none());
    assert_eq!(p.opens, 3);
}

#[test]
fn a_failed_open_is_retried_with_backoff() {
    let mut p = Pipes::new(1, POLICY);
    let start = p.now;
    p.clients[0].0.start(start).unwrap();
    // The adapter could not connect (refused): it says so, and the machine asks again later.
    assert_eq!(p.clients[0].0.poll_stream(), Some(StreamCommand::Open(None)));
    p.clients[0].0.handle_stream_closed(start);
    assert_eq!(p.clients[0].0.poll_stream(), None);
    let retry = p.clients[0].0.poll_timeout().expect("a reconnect deadline");
    assert!(retry > start && retry <= start + Duration::from_millis(100));
    p.clients[0].0.handle_timeout(retry);
    assert_eq!(p.clients[0].0.poll_stream(), Some(StreamCommand::Open(None)));
}

#[test]
fn shutdown_tells_clients_and_closes_every_stream() {
    let mut p = Pipes::new(2, POLICY);
    let now = p.now;
    for (c, _, _) in &mut p.clients {
        c.start(now).unwrap();
    }
    p.run_until(|p| p.clients.iter().all(|c| c.0.is_connected()));
    let now = p.now;
    p.broker.shutdown(now, Duration::from_secs(1));
    p.run(Duration::ZERO);
    assert_eq!(p.broker.connections(), 0);
    assert!(p.broker.is_done(p.now));
    for (_, stream, events) in &p.clients {
        assert!(stream.is_none(), "stream left open");
        assert!(events.iter().any(|e| matches!(
            e,
            ClientEvent::Disconnected {
                reason: DisconnectReason::ByServer(mqtt_proto::ReasonCode::ServerShuttingDown)
            }
        )));
    }
}

#[test]
fn a_stream_nobody_reads_loses_qos_0_then_is_cut_off_at_four_times_the_allowance() {
    let mut p = Pipes::new(2, POLICY);
    let mut config = BrokerConfig::new(ServerConfig::new(
        ServerTls::from_self_signed(&SelfSigned::generate(&["localhost"]).unwrap()).unwrap(),
    ));
    config.max_queued_bytes = 10_000;
    p.broker = Broker::new(config).unwrap();
    let now = p.now;
    for (c, _, _) in &mut p.clients {
        c.start(now).unwrap();
    }
    p.run_until(|p| p.clients.iter().all(|c| c.0.is_connected()));
    let now = p.now;
    p.clients[1]
        .0
        .subscribe(now, vec![Subscription::new(TopicFilter::new("f").unwrap(), QoS::AtLeastOnce)], None)
        .unwrap();
    p.run_until(|p| p.clients[1].2.iter().any(|e| matches!(e, ClientEvent::Subscribed { .. })));
    // From here on, nothing the broker writes to client 1 is read.
    p.stalled.push((p.clients[1].1.unwrap(), 0));
    let payload = Bytes::from(vec![1u8; 1000]);
    for _ in 0..100 {
        let now = p.now;
        p.clients[0].0.publish(now, mqtt_proto::Publish::new(TopicName::new("f").unwrap(), payload.clone())).unwrap();
        p.run(Duration::from_millis(1));
    }
    let held = p.stalled[0].1;
    assert!(held > 10_000 && held < 12_000, "{held} bytes handed out for a client that reads nothing");
    assert!(p.broker.stats().messages_dropped >= 88, "{:?}", p.broker.stats());
    assert!(p.broker.has_session("c1") && p.broker.connected() == 2, "cut off for QoS 0");
    // QoS 1 cannot be dropped: the backlog grows until four times the allowance, then the
    // broker gives the connection up.
    for _ in 0..60 {
        let now = p.now;
        let m = mqtt_proto::Publish::new(TopicName::new("f").unwrap(), payload.clone()).with_qos(QoS::AtLeastOnce);
        p.clients[0].0.publish(now, m).unwrap();
        p.run(Duration::from_millis(1));
    }
    assert_eq!(p.broker.connected(), 1, "the stalled client is still connected");
    assert!(p.stalled[0].1 <= 41_100, "{} bytes handed out", p.stalled[0].1);
}
