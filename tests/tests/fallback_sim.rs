//! A client with several brokers (`quic://` then `mqtt://`) on a network that blocks UDP, in
//! memory with a virtual clock: it falls back to TCP within the handshake timeout, keeps its
//! MQTT session across the switch (in-flight QoS 1 continued, subscriptions kept, no will), moves
//! back to QUIC once UDP passes again, resolves names on each attempt, and reports every
//! broker's failure when none answers (or keeps trying, when asked to).

use bytes::Bytes;
use mqtt_proto::{Publish, QoS, ReasonCode, Subscription, TopicFilter, TopicName, Will};
use mqtt_quic_core::broker::machine::{Broker, BrokerConfig, BrokerEvent, StreamId, StreamOutput};
use mqtt_quic_core::client::{ClientMachine, ClientUrlsConfig, ReconnectPolicy, StreamCommand};
use mqtt_quic_core::config::{ClientConfig, ServerConfig};
use mqtt_quic_core::driver::{ClientDriver, ConnectionState, DriverError};
use mqtt_quic_core::fallback::FallbackPolicy;
use mqtt_quic_core::session::client::ClientSessionConfig;
use mqtt_quic_core::tls::{ClientTls, SelfSigned, ServerTls};
use mqtt_quic_core::url::BrokerUrl;
use mqtt_quic_core::Datagram;
use mqtt_tests::Stepped;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const STEP: Duration = Duration::from_millis(10);

fn policy() -> FallbackPolicy {
    FallbackPolicy { handshake_timeout: Duration::from_secs(3), retry_primary: Duration::from_secs(20) }
}

impl Stepped for Net {
    fn now(&self) -> Instant {
        self.now
    }

    fn step(&mut self) {
        self.run();
    }
}

/// One broker serving QUIC and TCP, one client driver, and a network whose UDP and TCP can be
/// cut separately; names resolve through `dns`.
struct Net {
    broker: Broker,
    client: ClientDriver<u32>,
    now: Instant,
    start: Instant,
    udp_blocked: bool,
    tcp_up: bool,
    /// Where `broker.test` resolves to (its QUIC port; TCP is on 1883 of the same host).
    dns: Option<SocketAddr>,
    stream: Option<StreamId>,
    resolves: usize,
    opens: usize,
    client_addr: SocketAddr,
    local: Vec<Publish>,
    events: Vec<ConnectionState>,
}

fn urls() -> Vec<BrokerUrl> {
    vec!["quic://broker.test".parse().unwrap(), "mqtt://broker.test".parse().unwrap()]
}

impl Net {
    fn new(session: ClientSessionConfig, retry_first: bool) -> Net {
        let cert = SelfSigned::generate(&["broker.test"]).unwrap();
        let broker =
            Broker::new(BrokerConfig::new(ServerConfig::new(ServerTls::from_self_signed(&cert).unwrap()))).unwrap();
        let machine = ClientMachine::with_urls(ClientUrlsConfig {
            urls: urls(),
            quic: Some(ClientConfig::new(ClientTls::insecure())),
            session,
            server_name: None,
            reconnect: Some(ReconnectPolicy { initial: Duration::from_millis(100), max: Duration::from_secs(1) }),
            fallback: policy(),
            seed: 7,
            resolve_literals: false,
        })
        .unwrap();
        // The origin of virtual time; only differences matter from here on.
        #[allow(clippy::disallowed_methods)]
        let now = Instant::now();
        Net {
            broker,
            client: ClientDriver::new(machine).retry_first_connection(retry_first),
            now,
            start: now,
            udp_blocked: false,
            tcp_up: true,
            dns: Some("10.0.0.1:14567".parse().unwrap()),
            stream: None,
            resolves: 0,
            opens: 0,
            client_addr: "10.0.9.9:50000".parse().unwrap(),
            local: Vec::new(),
            events: Vec::new(),
        }
    }

    fn broker_addr(&self) -> SocketAddr {
        self.dns.unwrap_or_else(|| "10.0.0.1:14567".parse().unwrap())
    }

    fn run(&mut self) {
        let mut buf = Vec::new();
        loop {
            let mut moved = false;
            while let Some(t) = self.client.poll_transmit(self.now, &mut buf) {
                moved = true;
                if !self.udp_blocked && t.destination == self.broker_addr() {
                    for d in t.datagrams(&buf) {
                        self.broker.handle_datagram(self.now, Datagram::new(self.client_addr, d));
                    }
                }
            }
            while let Some(t) = self.broker.poll_transmit(self.now, &mut buf) {
                moved = true;
                if !self.udp_blocked && t.destination == self.client_addr {
                    let from = self.broker_addr();
                    for d in t.datagrams(&buf) {
                        self.client.handle_datagram(self.now, Datagram::new(from, d));
                    }
                }
            }
            while let Some(cmd) = self.client.poll_stream() {
                moved = true;
                match cmd {
                    StreamCommand::Resolve(url) => {
                        self.resolves += 1;
                        assert_eq!(url.host, "broker.test");
                        let r = self.dns.ok_or_else(|| "no such host".to_string());
                        self.client.handle_resolved(self.now, &url, r);
                    }
                    StreamCommand::Open(url) => {
                        self.opens += 1;
                        assert_eq!(url.map(|u| u.port), Some(1883));
                        if self.tcp_up {
                            self.stream = Some(self.broker.handle_stream_open(self.now, Some(self.client_addr)));
                            self.client.handle_stream_open(self.now);
                        } else {
                            self.client.handle_stream_failed(self.now, "connection refused");
                        }
                    }
                    StreamCommand::Data(bytes) => {
                        if let Some(id) = self.stream {
                            self.broker.handle_stream_data(self.now, id, &bytes);
                        }
                    }
                    StreamCommand::Close => {
                        if let Some(id) = self.stream.take() {
                            self.broker.handle_stream_closed(self.now, id);
                        }
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            while let Some((id, out)) = self.broker.poll_stream() {
                moved = true;
                if let StreamOutput::Data(bytes) = &out {
                    self.broker.handle_stream_written(id, bytes.len());
                }
                if self.stream != Some(id) {
                    continue;
                }
                match out {
                    StreamOutput::Data(bytes) => self.client.handle_stream_data(self.now, &bytes),
                    StreamOutput::Close | StreamOutput::Abort => {
                        self.stream = None;
                        self.client.handle_stream_closed(self.now);
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            while let Some(check) = self.broker.poll_auth() {
                moved = true;
                let verdict = check.verify();
                self.broker.handle_auth_result(self.now, check.id(), verdict);
            }
            while let Some(e) = self.broker.poll_event() {
                if let BrokerEvent::Message { publish, .. } = e {
                    self.local.push(publish);
                }
            }
            while let Some(s) = self.client.poll_state_change() {
                moved = true;
                self.events.push(s);
            }
            if !moved {
                break;
            }
        }
        self.now += STEP;
        self.broker.handle_timeout(self.now);
        self.client.handle_timeout(self.now);
    }

    fn connected_on(&self) -> Option<usize> {
        let machine = self.client.machine();
        machine.is_connected().then(|| machine.current_broker().0)
    }

    fn elapsed(&self) -> Duration {
        self.now - self.start
    }
}

fn session() -> ClientSessionConfig {
    ClientSessionConfig {
        client_id: "device-1".into(),
        session_expiry: 3600,
        keep_alive: 10,
        will: Some(Will {
            topic: TopicName::new("wills/device-1").unwrap(),
            payload: Bytes::from_static(b"gone"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Default::default(),
        }),
        ..Default::default()
    }
}

fn qos1(topic: &str, payload: &'static [u8]) -> Publish {
    Publish::new(TopicName::new(topic).unwrap(), Bytes::from_static(payload)).with_qos(QoS::AtLeastOnce)
}

#[test]
fn udp_blocked_falls_back_to_tcp_after_the_handshake_timeout_and_moves_back_when_it_passes() {
    let mut net = Net::new(session(), false);
    let wills = net.broker.subscribe_local(net.now, &TopicFilter::new("wills/#").unwrap(), QoS::AtLeastOnce);
    net.udp_blocked = true;
    net.client.start(net.now);
    assert!(net.run_until(Duration::from_secs(10), |n| n.connected_on().is_some()));
    assert_eq!(net.connected_on(), Some(1), "connected over TCP");
    let took = net.elapsed();
    assert!(took >= Duration::from_secs(3) && took < Duration::from_millis(3500), "fell back after {took:?}");
    assert_eq!((net.resolves, net.opens), (1, 1));
    assert!(matches!(net.client.poll_connected(), Some(Ok(id)) if id == "device-1"));

    // Subscribed over TCP; the subscription is the session's and survives the move back.
    let filter = TopicFilter::new("cmd/#").unwrap();
    net.client.subscribe(net.now, vec![Subscription::new(filter, QoS::AtLeastOnce)], 1);
    assert!(net.run_until(Duration::from_secs(1), |n| n.client.poll_completion().is_some()));

    // UDP passes again: within `retry_primary` the client is back on QUIC, same session.
    net.udp_blocked = false;
    let back = net.now;
    assert!(net.run_until(Duration::from_secs(25), |n| n.connected_on() == Some(0)));
    assert!(net.now - back <= Duration::from_secs(21), "moved back after {:?}", net.now - back);
    assert!(net.stream.is_none(), "the TCP connection is closed");
    assert_eq!(net.broker.connections(), 1);
    assert!(matches!(net.events.last(), Some(ConnectionState::Connected { session_present: true })));
    // The move back is not a lost connection for the application.
    assert!(!net.events.iter().any(|s| matches!(s, ConnectionState::Reconnecting { .. })), "{:?}", net.events);

    net.broker.publish_local(net.now, qos1("cmd/reboot", b"now")).unwrap();
    assert!(net.run_until(Duration::from_secs(1), |n| n.client.pending_messages() > 0));
    assert_eq!(net.client.poll_message().map(|m| m.payload), Some(Bytes::from_static(b"now")));
    // The switch said DISCONNECT (normal): no will.
    net.broker.unsubscribe_local(wills);
    assert!(net.local.is_empty(), "a will was published: {:?}", net.local);
    // And it stays on QUIC.
    net.run_until(Duration::from_secs(60), |_| false);
    assert_eq!(net.connected_on(), Some(0));
}

#[test]
fn a_qos_1_message_in_flight_when_udp_is_cut_arrives_over_tcp() {
    let mut net = Net::new(session(), false);
    let _sink = net.broker.subscribe_local(net.now, &TopicFilter::new("data/#").unwrap(), QoS::AtLeastOnce);
    net.client.start(net.now);
    assert!(net.run_until(Duration::from_secs(1), |n| n.connected_on() == Some(0)), "connected over QUIC");
    // UDP is cut with a QoS 1 message unacknowledged.
    net.udp_blocked = true;
    net.client.publish(net.now, qos1("data/t", b"21.5"), 9);
    // Keep-alive finds the connection dead; the reconnect tries QUIC, then TCP, same session.
    assert!(net.run_until(Duration::from_secs(60), |n| n.connected_on() == Some(1)), "{:?}", net.events);
    assert!(net.run_until(Duration::from_secs(1), |n| !n.local.is_empty()));
    assert_eq!(net.local[0].payload, Bytes::from_static(b"21.5"));
    assert!(matches!(net.client.poll_completion(), Some((9, Ok(_)))));
    assert!(net.events.iter().any(|s| matches!(s, ConnectionState::Connected { session_present: true })));
    assert!(net.resolves >= 2, "the name is resolved again on reconnect");
}

#[test]
fn when_no_broker_answers_the_first_connection_reports_each_one() {
    let mut net = Net::new(session(), false);
    net.udp_blocked = true;
    net.tcp_up = false;
    net.client.start(net.now);
    assert!(net.run_until(Duration::from_secs(10), |n| n.client.is_done(n.now)));
    let Some(Err(DriverError::Unreachable(why))) = net.client.poll_connected() else { panic!("no failure") };
    assert!(why.contains("quic://broker.test:14567: no QUIC handshake within 3000 ms"), "{why}");
    assert!(why.contains("mqtt://broker.test:1883: connection refused"), "{why}");
}

#[test]
fn a_device_that_boots_before_its_network_keeps_trying() {
    let mut net = Net::new(session(), true);
    net.udp_blocked = true;
    net.tcp_up = false;
    net.dns = None;
    net.client.start(net.now);
    assert!(!net.run_until(Duration::from_secs(30), |n| n.client.poll_connected().is_some()), "gave up");
    assert!(matches!(net.client.state(), ConnectionState::Reconnecting { reason } if reason.contains("no such host")));
    assert!(net.resolves > 5, "each attempt resolves the name again ({})", net.resolves);
    // The network comes up, at a new address.
    net.dns = Some("10.0.0.2:14567".parse().unwrap());
    net.udp_blocked = false;
    assert!(net.run_until(Duration::from_secs(5), |n| n.connected_on() == Some(0)));
    assert!(matches!(net.client.poll_connected(), Some(Ok(_))));
}

#[test]
fn a_refusal_is_not_a_reason_to_fall_back() {
    let mut session = session();
    session.username = Some("x".into());
    session.password = Some(Bytes::from_static(b"wrong"));
    let mut net = Net::new(session, true);
    let mut config = BrokerConfig::new(ServerConfig::new(
        ServerTls::from_self_signed(&SelfSigned::generate(&["broker.test"]).unwrap()).unwrap(),
    ));
    // No users: every CONNECT is refused (bad user name or password).
    config.auth = Some(std::sync::Arc::new(mqtt_quic_core::broker::auth::FileAuth::new(false)));
    net.broker = Broker::new(config).unwrap();
    net.client.start(net.now);
    let mut first = None;
    assert!(net.run_until(Duration::from_secs(5), |n| {
        first = first.take().or_else(|| n.client.poll_connected());
        first.is_some() || n.opens > 0
    }));
    assert_eq!(net.opens, 0, "fell back to TCP after a refusal");
    assert!(matches!(first, Some(Err(DriverError::Refused(ReasonCode::BadUserNameOrPassword)))), "{first:?}");
}
