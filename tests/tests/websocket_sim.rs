//! MQTT over WebSocket between the core's machines, bytes passed in memory on a virtual clock:
//! client machines with `ws://` URLs against the broker's WebSocket streams, and a hand-driven
//! client for what a well-behaved one never sends.

use bytes::Bytes;
use mqtt_proto::{Publish, QoS, Subscription, TopicFilter, TopicName, Will};
use mqtt_quic_core::broker::machine::{BrokerEvent, StreamOutput};
use mqtt_quic_core::client::ReconnectPolicy;
use mqtt_quic_core::session::client::{ClientEvent, ClientSession, ClientSessionConfig};
use mqtt_quic_core::ws::WsConn;
use mqtt_tests::pipes::Pipes;
use std::time::Duration;

const POLICY: ReconnectPolicy = ReconnectPolicy { initial: Duration::from_millis(100), max: Duration::from_secs(1) };

#[test]
fn clients_over_websocket_subscribe_publish_and_reconnect() {
    let mut p = Pipes::over_websocket(2, POLICY, "ws://broker.test/mqtt");
    let now = p.now;
    for (c, _, _) in &mut p.clients {
        c.start(now).unwrap();
    }
    p.run_until(|p| p.clients.iter().all(|c| c.0.is_connected()));
    let sub = Subscription::new(TopicFilter::new("a/#").unwrap(), QoS::ExactlyOnce);
    let now = p.now;
    p.clients[1].0.subscribe(now, vec![sub], None).unwrap();
    p.run_until(|p| p.clients[1].2.iter().any(|e| matches!(e, ClientEvent::Subscribed { .. })));
    // Large enough for a 16-bit frame length, and QoS 2 for the whole exchange of packets.
    let payload = Bytes::from(vec![b'x'; 70_000]);
    let now = p.now;
    let publish = Publish::new(TopicName::new("a/b").unwrap(), payload.clone()).with_qos(QoS::ExactlyOnce);
    p.clients[0].0.publish(now, publish).unwrap();
    p.run_until(|p| p.clients[1].2.iter().any(|e| matches!(e, ClientEvent::Message(m) if m.payload == payload)));
    p.run_until(|p| p.clients[0].2.iter().any(|e| matches!(e, ClientEvent::Published { .. })));

    // The connection drops: the machine opens a new one, upgrades it again and resumes.
    let id = p.clients[0].1.take().unwrap();
    let now = p.now;
    p.broker.handle_stream_closed(now, id);
    p.clients[0].0.handle_stream_closed(now);
    p.run_until(|p| p.clients[0].0.is_connected());
    assert_eq!(p.opens, 3);
}

#[test]
fn a_client_asking_for_another_path_is_refused_and_says_why() {
    let mut p = Pipes::over_websocket(1, POLICY, "ws://broker.test/elsewhere");
    let now = p.now;
    p.clients[0].0.start(now).unwrap();
    p.run_until(|p| p.clients[0].0.last_failure().is_some());
    let why = p.clients[0].0.last_failure().unwrap();
    assert!(why.contains("HTTP 404"), "{why}");
    assert!(!p.clients[0].0.is_connected());
    assert_eq!(p.broker.connections(), 0, "the refused connection is gone");
}

/// The broker's side, driven by hand: a client that has upgraded and connected (with a will),
/// then sends a text frame, which MQTT forbids [MQTT-6.0.0-1]. The broker closes with status
/// 1003, ends the connection, and the will goes out.
#[test]
fn a_text_frame_ends_the_connection_and_the_will_goes_out() {
    let mut p = Pipes::new(0, POLICY);
    let now = p.now;
    let wills = p.broker.subscribe_local(now, &TopicFilter::new("wills/#").unwrap(), QoS::AtLeastOnce);
    let id = p.broker.handle_stream_open_ws(now, None);
    let mut ws = WsConn::client("broker.test", "/mqtt", 5);
    let mut session = ClientSession::new(ClientSessionConfig {
        client_id: "dev".into(),
        will: Some(Will {
            topic: TopicName::new("wills/dev").unwrap(),
            payload: Bytes::from_static(b"gone"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Default::default(),
        }),
        ..Default::default()
    })
    .unwrap();
    let mut to_broker: Vec<Bytes> = std::iter::from_fn(|| ws.poll_output()).collect();
    let mut mqtt = Vec::new();
    let mut closed = false;
    let mut refused_text = false;
    for round in 0..10 {
        for bytes in to_broker.drain(..) {
            p.broker.handle_stream_data(now, id, &bytes);
        }
        while let Some((at, out)) = p.broker.poll_stream() {
            assert_eq!(at, id);
            match out {
                StreamOutput::Data(bytes) => {
                    p.broker.handle_stream_written(id, bytes.len());
                    if closed {
                        continue;
                    }
                    let was_open = ws.is_open();
                    match ws.receive(&bytes, &mut mqtt) {
                        Ok(()) if ws.is_closed() => refused_text = true,
                        Ok(()) => {}
                        Err(e) => panic!("{e}"),
                    }
                    if !was_open && ws.is_open() {
                        session.connect(now).unwrap();
                    }
                    session.handle_stream_data(now, &mqtt);
                    mqtt.clear();
                }
                _ => closed = true,
            }
        }
        while let Some(bytes) = session.poll_transmit() {
            to_broker.push(ws.frame(&bytes));
        }
        // Once connected: a text frame (masked with zeros, as any mask is allowed).
        if round == 3 {
            assert!(session.is_connected(), "connected over WebSocket");
            to_broker.push(Bytes::from_static(&[0x81, 0x82, 0, 0, 0, 0, b'{', b'}']));
        }
    }
    assert!(refused_text, "the broker answered with a closing frame");
    assert!(closed, "the broker closed the connection");
    let will = std::iter::from_fn(|| p.broker.poll_event()).find_map(|e| match e {
        BrokerEvent::Message { subscription, publish } if subscription == wills => Some(publish),
        _ => None,
    });
    assert_eq!(will.map(|w| w.payload), Some(Bytes::from_static(b"gone")));
}

/// An upgrade that never completes (a slow or silent client) is ended by the connect timeout
/// like a CONNECT that never comes.
#[test]
fn an_upgrade_that_never_completes_is_ended_by_the_connect_timeout() {
    let mut p = Pipes::new(0, POLICY);
    let now = p.now;
    let id = p.broker.handle_stream_open_ws(now, None);
    p.broker.handle_stream_data(now, id, b"GET /mqtt HTTP/1.1\r\nHost: b\r\n");
    let mut ended = false;
    for _ in 0..3000 {
        p.run(Duration::from_millis(10));
        while let Some((at, out)) = p.broker.poll_stream() {
            ended |= at == id && matches!(out, StreamOutput::Close | StreamOutput::Abort);
        }
        if ended {
            break;
        }
    }
    assert!(ended, "the broker closed the silent upgrade");
    assert_eq!(p.broker.connections(), 0);
}

/// Found in review: a client that sends Pings and reads nothing made the broker queue Pongs
/// without end. Pongs count against the client's backlog like everything else: past its limit
/// they stop (RFC 6455 lets a Pong answer only the latest Ping).
#[test]
fn a_ping_flood_from_a_client_that_does_not_read_stays_bounded() {
    use mqtt_quic_core::broker::machine::{Broker, BrokerConfig};
    use mqtt_quic_core::config::ServerConfig;
    use mqtt_quic_core::tls::{SelfSigned, ServerTls};
    let cert = SelfSigned::generate(&["localhost"]).unwrap();
    let mut config = BrokerConfig::new(ServerConfig::new(ServerTls::from_self_signed(&cert).unwrap()));
    config.max_queued_bytes = 4096;
    let mut broker = Broker::new(config).unwrap();
    let p = Pipes::new(0, POLICY);
    let now = p.now;
    let id = broker.handle_stream_open_ws(now, None);
    let mut ws = WsConn::client("broker.test", "/mqtt", 9);
    broker.handle_stream_data(now, id, &ws.poll_output().unwrap());
    let ping = {
        let mut frame = vec![0x89, 0x80 | 125, 0, 0, 0, 0];
        frame.extend_from_slice(&[b'p'; 125]);
        frame
    };
    let mut queued = 0;
    for _ in 0..10_000 {
        broker.handle_stream_data(now, id, &ping);
        // Nothing is reported written: the client reads nothing.
        while let Some((_, out)) = broker.poll_stream() {
            if let StreamOutput::Data(bytes) = out {
                queued += bytes.len();
            }
        }
    }
    assert!(queued <= 4096 + 127 + 200, "{queued} bytes queued for a client that reads nothing");
}

/// Found in review: a `ws://` client whose server accepts TCP and never answers the upgrade
/// waited for ever (CONNECT, and so its timeout, waits for the upgrade). The upgrade gets the
/// session's connect timeout.
#[test]
fn a_client_gives_up_on_an_upgrade_that_is_never_answered() {
    use mqtt_quic_core::client::{ClientMachine, ClientUrlsConfig, StreamCommand};
    let config = ClientUrlsConfig {
        urls: vec!["ws://broker.test/mqtt".parse().unwrap()],
        quic: None,
        session: ClientSessionConfig { client_id: "c".into(), ..Default::default() },
        server_name: None,
        reconnect: None,
        fallback: Default::default(),
        seed: 1,
        resolve_literals: false,
    };
    let mut client = ClientMachine::with_urls(config).unwrap();
    let mut now = Pipes::new(0, POLICY).now;
    client.start(now).unwrap();
    assert!(matches!(client.poll_stream(), Some(StreamCommand::Open(Some(_)))));
    client.handle_stream_open(now);
    assert!(matches!(client.poll_stream(), Some(StreamCommand::Data(_))), "the upgrade request");
    let mut closed = false;
    for _ in 0..200 {
        now += Duration::from_millis(100);
        client.handle_timeout(now);
        while let Some(command) = client.poll_stream() {
            closed |= matches!(command, StreamCommand::Close);
        }
    }
    assert!(closed, "the connection was closed");
    let why = client.last_failure().unwrap_or_default();
    assert!(why.contains("WebSocket upgrade"), "{why}");
}
