//! Bridges in memory with a virtual clock: an edge broker bridged to a cloud broker over QUIC
//! (through the edge's own UDP socket) or TCP (dialled through the adapter's path), carrying
//! topics out, in and both ways without loops; the cloud killed for 10 s during a QoS 1 flow,
//! and the edge restarted from its store: no message the edge acknowledged is lost.

use bytes::Bytes;
use mqtt_proto::{Publish, QoS, ReasonCode, TopicFilter, TopicName};
use mqtt_quic_core::bridge::config::{BridgeConfig, TopicMapping};
use mqtt_quic_core::broker::machine::{Broker, BrokerConfig, BrokerEvent, StreamId, StreamOutput};
use mqtt_quic_core::broker::Dial;
use mqtt_quic_core::client::{ClientMachine, ReconnectPolicy, StreamCommand};
use mqtt_quic_core::config::ServerConfig;
use mqtt_quic_core::persist::Persistence;
use mqtt_quic_core::session::client::{ClientEvent, ClientSessionConfig};
use mqtt_quic_core::tls::{ClientTls, SelfSigned, ServerTls};
use mqtt_quic_core::Datagram;
use mqtt_tests::{disk, Stepped};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const STEP: Duration = Duration::from_millis(10);

fn cert() -> &'static SelfSigned {
    static CERT: OnceLock<SelfSigned> = OnceLock::new();
    CERT.get_or_init(|| SelfSigned::generate(&["cloud.test"]).unwrap())
}

fn edge_addr() -> SocketAddr {
    "10.0.0.1:14567".parse().unwrap()
}

fn cloud_addr() -> SocketAddr {
    "10.0.0.2:14567".parse().unwrap()
}

fn broker_config(seed: u64) -> BrokerConfig {
    let mut quic = ServerConfig::new(ServerTls::from_self_signed(cert()).unwrap());
    quic.seed = seed;
    let mut config = BrokerConfig::new(quic);
    config.sys_interval = None;
    config
}

fn bridge(urls: &[&str], mappings: &[&str]) -> BridgeConfig {
    let mut b = BridgeConfig::new("cloud", urls.iter().map(|u| u.parse().unwrap()).collect());
    b.tls = Some(ClientTls::insecure());
    b.client_id = "edge-1".into();
    b.mappings = mappings.iter().map(|m| m.parse::<TopicMapping>().unwrap()).collect();
    b.reconnect = ReconnectPolicy { initial: Duration::from_millis(200), max: Duration::from_secs(1) };
    b
}

fn edge_config(bridge: BridgeConfig) -> BrokerConfig {
    let mut config = broker_config(1);
    config.persistence = Persistence::Sync;
    config.bridges = vec![bridge];
    config
}

impl Stepped for Net {
    fn now(&self) -> Instant {
        self.now
    }

    fn step(&mut self) {
        self.step_once();
    }
}

/// The edge broker (with the bridge and a store), the cloud broker, a client of the edge over
/// a byte stream, and the network between them.
struct Net {
    now: Instant,
    edge: Broker,
    edge_config: BrokerConfig,
    cloud: Broker,
    cloud_up: bool,
    udp_blocked: bool,
    disk: disk::Disk,
    /// The edge's dialled streams and the cloud's numbers for them.
    dialed: BTreeMap<StreamId, StreamId>,
    client: ClientMachine,
    client_stream: Option<StreamId>,
    client_events: Vec<ClientEvent>,
    at_cloud: Vec<Publish>,
    at_edge: Vec<Publish>,
    dials: usize,
}

impl Net {
    fn new(bridge: BridgeConfig) -> Net {
        // The origin of virtual time; only differences matter from here on.
        #[allow(clippy::disallowed_methods)]
        let now = Instant::now();
        let edge_config = edge_config(bridge);
        let mut edge = Broker::new(edge_config.clone()).unwrap();
        edge.start(now);
        let session = ClientSessionConfig {
            client_id: "sensor".into(),
            clean_start: false,
            session_expiry: 3600,
            keep_alive: 0,
            ..Default::default()
        };
        let policy = ReconnectPolicy { initial: Duration::from_millis(100), max: Duration::from_millis(500) };
        let mut client = ClientMachine::over_stream(session, Some(policy), 3).unwrap();
        client.start(now).unwrap();
        Net {
            now,
            edge,
            edge_config,
            cloud: Broker::new(broker_config(2)).unwrap(),
            cloud_up: true,
            udp_blocked: false,
            disk: BTreeMap::new(),
            dialed: BTreeMap::new(),
            client,
            client_stream: None,
            client_events: Vec::new(),
            at_cloud: Vec::new(),
            at_edge: Vec::new(),
            dials: 0,
        }
    }

    fn step_once(&mut self) {
        let mut buf = Vec::new();
        loop {
            let mut moved = false;
            let passes = self.cloud_up && !self.udp_blocked;
            while let Some(t) = self.edge.poll_transmit(self.now, &mut buf) {
                moved = true;
                if passes && t.destination == cloud_addr() {
                    for d in t.datagrams(&buf) {
                        self.cloud.handle_datagram(self.now, Datagram::new(edge_addr(), d));
                    }
                }
            }
            while let Some(t) = self.cloud.poll_transmit(self.now, &mut buf) {
                moved = true;
                if passes && t.destination == edge_addr() {
                    for d in t.datagrams(&buf) {
                        self.edge.handle_datagram(self.now, Datagram::new(cloud_addr(), d));
                    }
                }
            }
            while let Some(dial) = self.edge.poll_dial() {
                moved = true;
                match dial {
                    Dial::Open { id, url, .. } => {
                        self.dials += 1;
                        assert_eq!(url.port, 1883);
                        if self.cloud_up {
                            let cid = self.cloud.handle_stream_open(self.now, Some(edge_addr()));
                            self.dialed.insert(id, cid);
                            self.edge.handle_dialed(self.now, id, Ok(()));
                        } else {
                            self.edge.handle_dialed(self.now, id, Err("connection refused".into()));
                        }
                    }
                    Dial::Resolve { bridge, url } => {
                        assert_eq!(url.host, "cloud.test");
                        self.edge.handle_resolved(self.now, bridge, &url, Ok(cloud_addr()));
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            while let Some((id, out)) = self.edge.poll_stream() {
                moved = true;
                if let StreamOutput::Data(b) = &out {
                    self.edge.handle_stream_written(id, b.len());
                }
                if self.client_stream == Some(id) {
                    match out {
                        StreamOutput::Data(b) => self.client.handle_stream_data(self.now, &b),
                        _ => {
                            self.client_stream = None;
                            self.client.handle_stream_closed(self.now);
                        }
                    }
                } else if let Some(&cid) = self.dialed.get(&id) {
                    match out {
                        StreamOutput::Data(b) => self.cloud.handle_stream_data(self.now, cid, &b),
                        _ => {
                            self.dialed.remove(&id);
                            self.cloud.handle_stream_closed(self.now, cid);
                        }
                    }
                }
            }
            while let Some((cid, out)) = self.cloud.poll_stream() {
                moved = true;
                if let StreamOutput::Data(b) = &out {
                    self.cloud.handle_stream_written(cid, b.len());
                }
                let Some((&id, _)) = self.dialed.iter().find(|(_, c)| **c == cid) else { continue };
                match out {
                    StreamOutput::Data(b) => self.edge.handle_stream_data(self.now, id, &b),
                    _ => {
                        self.dialed.remove(&id);
                        self.edge.handle_stream_closed(self.now, id);
                    }
                }
            }
            while let Some(cmd) = self.client.poll_stream() {
                moved = true;
                match cmd {
                    StreamCommand::Open(_) => {
                        self.client_stream = Some(self.edge.handle_stream_open(self.now, None));
                        self.client.handle_stream_open(self.now);
                    }
                    StreamCommand::Data(b) => {
                        if let Some(id) = self.client_stream {
                            self.edge.handle_stream_data(self.now, id, &b);
                        }
                    }
                    StreamCommand::Close => {
                        if let Some(id) = self.client_stream.take() {
                            self.edge.handle_stream_closed(self.now, id);
                        }
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            while let Some(batch) = self.edge.poll_store(self.now) {
                moved = true;
                let seq = batch.seq;
                disk::apply(&mut self.disk, batch);
                self.edge.handle_stored(self.now, seq);
            }
            while let Some(e) = self.edge.poll_event() {
                if let BrokerEvent::Message { publish, .. } = e {
                    self.at_edge.push(publish);
                }
            }
            while let Some(e) = self.cloud.poll_event() {
                if let BrokerEvent::Message { publish, .. } = e {
                    self.at_cloud.push(publish);
                }
            }
            self.client_events.extend(std::iter::from_fn(|| self.client.poll_event()));
            if !moved {
                break;
            }
        }
        self.now += STEP;
        self.edge.handle_timeout(self.now);
        self.cloud.handle_timeout(self.now);
        self.client.handle_timeout(self.now);
    }

    fn bridge_up(&self) -> bool {
        self.edge.bridges().next().is_some_and(|b| b.stats().connected)
    }

    fn publish(&mut self, topic: &str, payload: &str, qos: QoS) {
        let p = Publish::new(TopicName::new(topic).unwrap(), Bytes::from(payload.to_string())).with_qos(qos);
        self.client.publish(self.now, p).unwrap();
    }

    fn acked(&self) -> usize {
        self.client_events.iter().filter(|e| matches!(e, ClientEvent::Published { .. })).count()
    }

    /// The cloud broker dies: every connection to it is gone (a new one starts empty).
    fn kill_cloud(&mut self) {
        self.cloud_up = false;
        for (id, _) in std::mem::take(&mut self.dialed) {
            self.edge.handle_stream_closed(self.now, id);
        }
        self.cloud = Broker::new(broker_config(3)).unwrap();
    }

    /// The edge broker restarts from its store; its client's connection drops with it.
    fn restart_edge(&mut self) {
        self.edge = Broker::new(self.edge_config.clone()).unwrap();
        self.edge.restore(self.now, disk::records(&self.disk)).unwrap();
        self.edge.start(self.now);
        self.dialed.clear();
        if self.client_stream.take().is_some() {
            self.client.handle_stream_closed(self.now);
        }
    }

    fn payloads(messages: &[Publish], topic_prefix: &str) -> Vec<String> {
        messages
            .iter()
            .filter(|m| m.topic.as_str().starts_with(topic_prefix))
            .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
            .collect()
    }
}

fn filter(f: &str) -> TopicFilter {
    TopicFilter::new(f).unwrap()
}

const MAPPINGS: [&str; 3] = ["sensors/# out 1 \"\" site1/", "cmd/# in 1", "chat/# both 1"];

#[test]
fn a_quic_bridge_carries_topics_out_in_and_both_ways_without_loops() {
    let mut net = Net::new(bridge(&["quic://cloud.test"], &MAPPINGS));
    let now = net.now;
    net.cloud.subscribe_local(now, &filter("#"), QoS::AtLeastOnce);
    net.edge.subscribe_local(now, &filter("#"), QoS::AtLeastOnce);
    let state = net.edge.subscribe_local(now, &filter("$SYS/broker/connection/+/state"), QoS::AtMostOnce);
    assert!(net.run_until(Duration::from_secs(5), |n| n.bridge_up() && n.client.is_connected()));
    assert_eq!(net.dials, 0, "QUIC needs no dialling");
    assert!(net.run_until(Duration::from_secs(1), |n| n.at_edge.iter().any(|m| m.payload == "1")));
    net.edge.unsubscribe_local(state);

    net.publish("sensors/t1", "21.5", QoS::AtLeastOnce);
    net.publish("chat/edge", "from the edge", QoS::AtLeastOnce);
    net.publish("cmd/ignored", "not out", QoS::AtLeastOnce);
    let now = net.now;
    net.cloud.publish_local(now, Publish::new(TopicName::new("cmd/reboot").unwrap(), "now")).unwrap();
    net.cloud.publish_local(now, Publish::new(TopicName::new("chat/cloud").unwrap(), "from the cloud")).unwrap();
    net.cloud.publish_local(now, Publish::new(TopicName::new("sensors/x").unwrap(), "not in")).unwrap();
    net.run_until(Duration::from_secs(3), |_| false);

    assert_eq!(Net::payloads(&net.at_cloud, "site1/sensors/"), ["21.5"], "out, with the remote prefix");
    let mut cmd = Net::payloads(&net.at_edge, "cmd/");
    cmd.sort();
    assert_eq!(cmd, ["not out", "now"], "in (and the edge's own cmd/ message stays here)");
    // Both ways, each message once on each side: no loop back.
    for side in [&net.at_cloud, &net.at_edge] {
        let mut chat = Net::payloads(side, "chat/");
        chat.sort();
        assert_eq!(chat, ["from the cloud", "from the edge"]);
    }
    assert!(Net::payloads(&net.at_cloud, "cmd/").len() == 1, "cmd is not carried out");
    assert!(Net::payloads(&net.at_edge, "sensors/x").is_empty(), "sensors is not carried in");
    let stats = net.edge.bridges().next().unwrap().stats();
    assert_eq!((stats.sent, stats.received, stats.dropped), (2, 2, 0), "{stats:?}");
}

#[test]
fn a_cloud_outage_loses_no_message_the_edge_acknowledged() {
    let mut net = Net::new(bridge(&["quic://cloud.test"], &MAPPINGS));
    assert!(net.run_until(Duration::from_secs(5), |n| n.bridge_up() && n.client.is_connected()));
    for i in 0..10 {
        net.publish("sensors/t", &format!("before {i}"), QoS::AtLeastOnce);
    }
    net.run_until(Duration::from_millis(500), |_| false);
    net.kill_cloud();
    // During the outage the edge keeps acknowledging: the messages wait in the bridge's
    // session here.
    for i in 0..50 {
        net.publish("sensors/t", &format!("during {i}"), QoS::AtLeastOnce);
        net.step();
    }
    assert!(net.run_until(Duration::from_secs(2), |n| n.acked() == 60));
    net.run_until(Duration::from_secs(10), |_| false);
    net.cloud_up = true;
    let now = net.now;
    net.cloud.subscribe_local(now, &filter("#"), QoS::AtLeastOnce);
    // The restarted cloud does not know the old QUIC connection, and its stateless resets
    // carry another key (a new process): the bridge gives the connection up at its idle
    // timeout (30 s from the last packet heard) and connects again.
    assert!(net.run_until(Duration::from_secs(30), |n| Net::payloads(&n.at_cloud, "site1/").len() >= 50));
    let got = Net::payloads(&net.at_cloud, "site1/");
    for i in 0..50 {
        assert!(got.contains(&format!("during {i}")), "lost `during {i}`: {got:?}");
    }
}

#[test]
fn a_restart_of_the_edge_loses_no_message_it_acknowledged() {
    let mut net = Net::new(bridge(&["quic://cloud.test"], &MAPPINGS));
    assert!(net.run_until(Duration::from_secs(5), |n| n.bridge_up() && n.client.is_connected()));
    net.kill_cloud();
    for i in 0..20 {
        net.publish("sensors/t", &format!("m{i}"), QoS::AtLeastOnce);
    }
    assert!(net.run_until(Duration::from_secs(2), |n| n.acked() == 20));
    net.restart_edge();
    net.run_until(Duration::from_secs(1), |_| false);
    net.cloud_up = true;
    let now = net.now;
    net.cloud.subscribe_local(now, &filter("#"), QoS::AtLeastOnce);
    assert!(net.run_until(Duration::from_secs(10), |n| Net::payloads(&n.at_cloud, "site1/").len() >= 20));
    let got = Net::payloads(&net.at_cloud, "site1/");
    for i in 0..20 {
        assert!(got.contains(&format!("m{i}")), "lost m{i}: {got:?}");
    }
}

#[test]
fn a_tcp_bridge_is_dialled_by_the_adapter_when_udp_is_blocked() {
    let mut b = bridge(&["quic://cloud.test", "mqtt://cloud.test"], &MAPPINGS);
    b.fallback.handshake_timeout = Duration::from_millis(500);
    let mut net = Net::new(b);
    net.udp_blocked = true;
    let now = net.now;
    net.cloud.subscribe_local(now, &filter("#"), QoS::AtLeastOnce);
    net.edge.subscribe_local(now, &filter("cmd/#"), QoS::AtLeastOnce);
    assert!(net.run_until(Duration::from_secs(5), |n| n.bridge_up() && n.client.is_connected()));
    assert_eq!(net.dials, 1);
    net.publish("sensors/t", "over tcp", QoS::AtLeastOnce);
    let now = net.now;
    net.cloud.publish_local(now, Publish::new(TopicName::new("cmd/a").unwrap(), "down")).unwrap();
    assert!(net.run_until(Duration::from_secs(2), |n| {
        !Net::payloads(&n.at_cloud, "site1/").is_empty() && !n.at_edge.is_empty()
    }));
    assert_eq!(Net::payloads(&net.at_cloud, "site1/sensors/t"), ["over tcp"]);
    assert_eq!(net.at_edge[0].payload, "down");
}

#[test]
fn clients_cannot_take_a_bridge_session() {
    let mut net = Net::new(bridge(&["quic://cloud.test"], &MAPPINGS));
    let session = ClientSessionConfig { client_id: "$bridge/cloud".into(), ..Default::default() };
    net.client = ClientMachine::over_stream(session, None, 9).unwrap();
    net.client.start(net.now).unwrap();
    net.run_until(Duration::from_secs(1), |n| !n.client_events.is_empty());
    assert!(
        matches!(net.client_events[0], ClientEvent::Refused { reason: ReasonCode::ClientIdentifierNotValid }),
        "{:?}",
        net.client_events
    );
    assert!(net.run_until(Duration::from_secs(5), |n| n.bridge_up()), "the bridge itself is unaffected");
}

/// MQTT 3.1.1 has no No Local: the bridge says it is one with mosquitto's flag (protocol level
/// 0x84), and the upstream (ours here) then does not send it back what it published.
#[test]
fn a_3_1_1_bridge_uses_mosquitto_s_flag_and_does_not_loop() {
    let mut b = bridge(&["quic://cloud.test"], &["chat/# both 1"]);
    b.protocol = mqtt_proto::Protocol::V3_1_1;
    let mut net = Net::new(b);
    let now = net.now;
    net.cloud.subscribe_local(now, &filter("chat/#"), QoS::AtLeastOnce);
    net.edge.subscribe_local(now, &filter("chat/#"), QoS::AtLeastOnce);
    assert!(net.run_until(Duration::from_secs(5), |n| n.bridge_up() && n.client.is_connected()));
    net.run_until(Duration::from_millis(500), |_| false);
    net.publish("chat/edge", "from the edge", QoS::AtLeastOnce);
    let now = net.now;
    net.cloud.publish_local(now, Publish::new(TopicName::new("chat/cloud").unwrap(), "from the cloud")).unwrap();
    net.run_until(Duration::from_secs(3), |_| false);
    for side in [&net.at_cloud, &net.at_edge] {
        let mut chat = Net::payloads(side, "chat/");
        chat.sort();
        assert_eq!(chat, ["from the cloud", "from the edge"]);
    }
}

/// An upstream that takes at most QoS 1 (as AWS IoT and Azure do) gets a QoS 2 mapping's
/// messages at QoS 1, not refused and dropped (found in review).
#[test]
fn messages_go_at_the_upstream_s_maximum_qos() {
    let mut net = Net::new(bridge(&["quic://cloud.test"], &["q2/# out 2"]));
    let mut cloud = broker_config(2);
    cloud.session.maximum_qos = QoS::AtLeastOnce;
    net.cloud = Broker::new(cloud).unwrap();
    let now = net.now;
    net.cloud.subscribe_local(now, &filter("q2/#"), QoS::ExactlyOnce);
    assert!(net.run_until(Duration::from_secs(5), |n| n.bridge_up() && n.client.is_connected()));
    net.publish("q2/t", "exactly once here", QoS::ExactlyOnce);
    assert!(net.run_until(Duration::from_secs(3), |n| !n.at_cloud.is_empty()));
    assert_eq!(
        (net.at_cloud[0].payload.as_ref(), net.at_cloud[0].qos()),
        (&b"exactly once here"[..], QoS::AtLeastOnce)
    );
    assert_eq!(net.edge.bridges().next().unwrap().stats().dropped, 0);
}

/// The in direction across a restart of the edge: what the cloud holds for the bridge's kept
/// session there while the edge is down arrives once it is back, and is acknowledged to the
/// cloud only once the edge has it.
#[test]
fn messages_coming_in_survive_a_restart_of_the_edge() {
    let mut net = Net::new(bridge(&["quic://cloud.test"], &MAPPINGS));
    assert!(net.run_until(Duration::from_secs(5), |n| n.bridge_up() && n.client.is_connected()));
    net.run_until(Duration::from_millis(500), |_| false);
    // The edge goes down; the cloud's publishers go on.
    net.cloud_up = false;
    net.run_until(Duration::from_secs(1), |_| false);
    for i in 0..20 {
        let now = net.now;
        let p = Publish::new(TopicName::new("cmd/x").unwrap(), format!("c{i}")).with_qos(QoS::AtLeastOnce);
        net.cloud.publish_local(now, p).unwrap();
    }
    net.restart_edge();
    let now = net.now;
    net.edge.subscribe_local(now, &filter("cmd/#"), QoS::AtLeastOnce);
    net.cloud_up = true;
    // The old QUIC connection to the cloud is given up at its idle timeout, then the bridge's
    // session there hands over what it kept.
    assert!(net.run_until(Duration::from_secs(40), |n| Net::payloads(&n.at_edge, "cmd/").len() >= 20));
    let got = Net::payloads(&net.at_edge, "cmd/");
    for i in 0..20 {
        assert!(got.contains(&format!("c{i}")), "lost c{i}: {got:?}");
    }
}
