//! The client machine over a byte stream (the TCP/TLS path) against the broker's byte-stream
//! entry points, bytes passed in memory with a virtual clock.

use bytes::Bytes;
use mqtt_proto::{QoS, Subscription, TopicFilter, TopicName};
use mqtt_quic_core::broker::machine::{Broker, BrokerConfig, StreamId, StreamOutput};
use mqtt_quic_core::client::{ClientMachine, ReconnectPolicy, StreamCommand};
use mqtt_quic_core::config::ServerConfig;
use mqtt_quic_core::session::client::{ClientEvent, ClientSessionConfig, DisconnectReason};
use mqtt_quic_core::tls::{SelfSigned, ServerTls};
use std::time::{Duration, Instant};

/// Two clients on byte streams and a broker; `None` streams are closed.
struct Pipes {
    broker: Broker,
    clients: Vec<(ClientMachine, Option<StreamId>, Vec<ClientEvent>)>,
    now: Instant,
    opens: usize,
    /// Clients whose output is not delivered (a socket nobody reads), counted in bytes.
    stalled: Vec<(StreamId, usize)>,
}

impl Pipes {
    fn new(n: usize) -> Pipes {
        let cert = SelfSigned::generate(&["localhost"]).unwrap();
        let broker =
            Broker::new(BrokerConfig::new(ServerConfig::new(ServerTls::from_self_signed(&cert).unwrap()))).unwrap();
        let clients = (0..n)
            .map(|i| {
                let session = ClientSessionConfig { client_id: format!("c{i}"), ..Default::default() };
                let policy = ReconnectPolicy { initial: Duration::from_millis(100), max: Duration::from_secs(1) };
                (ClientMachine::over_stream(session, Some(policy), i as u64).unwrap(), None, Vec::new())
            })
            .collect();
        // The origin of virtual time; only differences matter from here on.
        #[allow(clippy::disallowed_methods)]
        let now = Instant::now();
        Pipes { broker, clients, now, opens: 0, stalled: Vec::new() }
    }

    /// Moves everything both ways until quiet, then advances the clock by `step`.
    fn run(&mut self, step: Duration) {
        loop {
            let mut moved = false;
            for (client, stream, events) in &mut self.clients {
                while let Some(cmd) = client.poll_stream() {
                    moved = true;
                    match cmd {
                        StreamCommand::Open => {
                            self.opens += 1;
                            *stream = Some(self.broker.handle_stream_open(self.now, None));
                            client.handle_stream_open(self.now);
                        }
                        StreamCommand::Data(bytes) => {
                            if let Some(id) = *stream {
                                self.broker.handle_stream_data(self.now, id, &bytes);
                            }
                        }
                        StreamCommand::Close => {
                            if let Some(id) = stream.take() {
                                self.broker.handle_stream_closed(self.now, id);
                            }
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                }
                events.extend(std::iter::from_fn(|| client.poll_event()));
            }
            while let Some((id, out)) = self.broker.poll_stream() {
                moved = true;
                if let Some(s) = self.stalled.iter_mut().find(|s| s.0 == id) {
                    if let StreamOutput::Data(bytes) = &out {
                        s.1 += bytes.len();
                        continue;
                    }
                }
                if let StreamOutput::Data(bytes) = &out {
                    self.broker.handle_stream_written(id, bytes.len());
                }
                let Some((client, stream, _)) = self.clients.iter_mut().find(|c| c.1 == Some(id)) else { continue };
                match out {
                    StreamOutput::Data(bytes) => client.handle_stream_data(self.now, &bytes),
                    StreamOutput::Close | StreamOutput::Abort => {
                        *stream = None;
                        client.handle_stream_closed(self.now);
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            if !moved {
                break;
            }
        }
        self.now += step;
        self.broker.handle_timeout(self.now);
        for (client, _, _) in &mut self.clients {
            client.handle_timeout(self.now);
        }
    }

    fn run_until(&mut self, mut done: impl FnMut(&Pipes) -> bool) {
        for _ in 0..2000 {
            if done(self) {
                return;
            }
            self.run(Duration::from_millis(10));
        }
        panic!("condition not reached");
    }
}

#[test]
fn publish_and_receive_over_streams_then_reconnect_after_loss() {
    let mut p = Pipes::new(2);
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
    let mut p = Pipes::new(1);
    let start = p.now;
    p.clients[0].0.start(start).unwrap();
    // The adapter could not connect (refused): it says so, and the machine asks again later.
    assert_eq!(p.clients[0].0.poll_stream(), Some(StreamCommand::Open));
    p.clients[0].0.handle_stream_closed(start);
    assert_eq!(p.clients[0].0.poll_stream(), None);
    let retry = p.clients[0].0.poll_timeout().expect("a reconnect deadline");
    assert!(retry > start && retry <= start + Duration::from_millis(100));
    p.clients[0].0.handle_timeout(retry);
    assert_eq!(p.clients[0].0.poll_stream(), Some(StreamCommand::Open));
}

#[test]
fn shutdown_tells_clients_and_closes_every_stream() {
    let mut p = Pipes::new(2);
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
    let mut p = Pipes::new(2);
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
