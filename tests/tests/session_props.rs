//! MQTT's delivery guarantees through the whole stack (client machine, QUIC, simulated lossy
//! network, broker machine), while connections are dropped and re-established with a kept
//! session: every QoS 1 message arrives at least once, every QoS 2 message exactly once, and
//! per-topic order from one publisher holds. What the broker receives is observed through an
//! in-process subscription to `#`.

use bytes::Bytes;
use mqtt_proto::{PacketId, Protocol, Publish, QoS, QosPid, TopicFilter, TopicName};
use mqtt_quic_core::broker::machine::{Broker, BrokerConfig, BrokerEvent};
use mqtt_quic_core::client::{ClientMachine, ClientMachineConfig, ReconnectPolicy};
use mqtt_quic_core::config::{ClientConfig, ServerConfig};
use mqtt_quic_core::session::client::{ClientEvent, ClientSessionConfig};
use mqtt_quic_core::tls::{ClientTls, SelfSigned, ServerTls};
use mqtt_tests::node::Node;
use mqtt_tests::sim::{Link, Sim};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

fn cert() -> &'static SelfSigned {
    static CERT: OnceLock<SelfSigned> = OnceLock::new();
    CERT.get_or_init(|| SelfSigned::generate(&["broker.test"]).unwrap())
}

const SERVER: usize = 0;
const CLIENT: usize = 1;

#[derive(Debug, Clone)]
struct Scenario {
    seed: u64,
    loss: f64,
    protocol: Protocol,
    /// (topic index, QoS) of each message, published in this order.
    messages: Vec<(u8, u8)>,
    /// After how many published messages the connection is dropped.
    drops: Vec<usize>,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        any::<u64>(),
        prop_oneof![Just(0.0), 0.0..0.15f64],
        prop_oneof![Just(Protocol::V5), Just(Protocol::V3_1_1)],
        proptest::collection::vec((0..3u8, 0..3u8), 1..40),
        proptest::collection::vec(0..40usize, 0..4),
    )
        .prop_map(|(seed, loss, protocol, messages, drops)| Scenario { seed, loss, protocol, messages, drops })
}

/// Runs a scenario, checks the guarantees, and returns what the server received (message
/// number, topic) with the virtual time it took, for repeatability checks.
fn run(s: &Scenario) -> Result<(Vec<(usize, String)>, Duration), TestCaseError> {
    let link = Link { latency: Duration::from_millis(10), loss: s.loss, ..Link::default() };
    let mut sim: Sim<Node> = Sim::new(s.seed, link);
    let server_addr: SocketAddr = "10.0.0.1:14567".parse().unwrap();
    let mut sc = ServerConfig::new(ServerTls::from_self_signed(cert()).unwrap());
    sc.seed = s.seed;
    let mut config = BrokerConfig::new(sc);
    config.sys_interval = None;
    sim.add_host(server_addr, Node::Broker(Box::new(Broker::new(config).unwrap())));
    let mut qc = ClientConfig::new(ClientTls::insecure());
    qc.seed = s.seed.wrapping_add(1);
    let session = ClientSessionConfig {
        protocol: s.protocol,
        client_id: "publisher".into(),
        // 3.1.1 keeps a session with clean_session = false; MQTT 5 with an expiry.
        clean_start: !matches!(s.protocol, Protocol::V3_1_1),
        session_expiry: 3600,
        keep_alive: 30,
        ..Default::default()
    };
    let client = ClientMachine::new(ClientMachineConfig {
        quic: qc,
        session,
        server: server_addr,
        server_name: "broker.test".into(),
        reconnect: Some(ReconnectPolicy { initial: Duration::from_millis(50), max: Duration::from_millis(500) }),
    })
    .unwrap();
    sim.add_host("10.0.0.2:50000".parse().unwrap(), Node::client(client));
    let now = sim.now();
    sim.machine(SERVER).as_broker().subscribe_local(now, &TopicFilter::new("#").unwrap(), QoS::ExactlyOnce);
    sim.machine(CLIENT).as_client().start(now).unwrap();

    // Publish each message once connected; drop the connection at the scripted points.
    let mut next = 0;
    let mut completed: BTreeMap<u64, bool> = BTreeMap::new();
    let mut ids = BTreeMap::new();
    let mut received: Vec<(usize, String)> = Vec::new();
    let done = sim.drive_until(2_000_000, |sim| {
        let now = sim.now();
        while let Some(BrokerEvent::Message { publish, .. }) = sim.machine(SERVER).as_broker().poll_event() {
            received.push((std::str::from_utf8(&publish.payload).unwrap().parse().unwrap(), publish.topic.to_string()));
        }
        let node = sim.machine(CLIENT);
        for e in node.events().drain(..) {
            if let ClientEvent::Published { id, .. } = e {
                completed.insert(id.0, true);
            }
        }
        let client = node.as_client();
        if client.is_connected() && next < s.messages.len() {
            let (topic, qos) = s.messages[next];
            let mut p = Publish::new(TopicName::new(format!("t/{topic}")).unwrap(), Bytes::from(format!("{next}")));
            let qos = [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce][usize::from(qos)];
            p.qos_pid = QosPid::from_parts(qos, PacketId::MIN);
            if let Ok(id) = client.publish(now, p) {
                ids.insert(next, (id.0, qos));
            }
            next += 1;
            if s.drops.contains(&next) {
                client.drop_connection(now);
            }
        }
        next == s.messages.len()
            && ids.values().filter(|(_, q)| *q != QoS::AtMostOnce).all(|(id, _)| completed.contains_key(id))
            && client.session().pending_publishes() == 0
    });
    prop_assert!(done, "not every QoS>0 publish completed within the step budget ({s:?})");
    // Let in-flight acknowledgements settle.
    let settle = sim.now() + Duration::from_secs(1);
    sim.drive_to(settle);
    while let Some(BrokerEvent::Message { publish, .. }) = sim.machine(SERVER).as_broker().poll_event() {
        received.push((std::str::from_utf8(&publish.payload).unwrap().parse().unwrap(), publish.topic.to_string()));
    }
    let elapsed = sim.elapsed();
    let mut counts = vec![0usize; s.messages.len()];
    for (n, _) in &received {
        counts[*n] += 1;
    }
    for (n, (_, qos)) in ids.iter().map(|(n, v)| (*n, *v)) {
        match qos {
            QoS::AtLeastOnce => prop_assert!(counts[n] >= 1, "QoS 1 message {n} lost"),
            QoS::ExactlyOnce => prop_assert_eq!(counts[n], 1, "QoS 2 message {} delivered {} times", n, counts[n]),
            QoS::AtMostOnce => prop_assert!(counts[n] <= 1, "QoS 0 message {n} duplicated"),
        }
    }
    // Per topic, first arrivals of QoS>0 messages keep the publish order.
    let mut seen = vec![false; s.messages.len()];
    let mut last: BTreeMap<String, usize> = BTreeMap::new();
    for (n, topic) in received.iter().cloned() {
        if seen[n] || ids.get(&n).is_none_or(|(_, q)| *q == QoS::AtMostOnce) {
            seen[n] = true;
            continue;
        }
        seen[n] = true;
        if let Some(prev) = last.insert(topic.clone(), n) {
            prop_assert!(prev < n, "on {topic}, message {n} arrived after {prev}");
        }
    }
    Ok((received, elapsed))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn delivery_guarantees_hold_across_loss_and_reconnects(s in scenario()) {
        run(&s)?;
    }
}

#[test]
fn a_run_with_drops_and_loss_is_repeatable() {
    let s = Scenario {
        seed: 42,
        loss: 0.1,
        protocol: Protocol::V5,
        messages: (0..30).map(|i| (i % 3, i % 3)).collect(),
        drops: vec![5, 17],
    };
    let first = run(&s).unwrap();
    assert!(first.0.len() >= 20, "most messages arrive: {}", first.0.len());
    assert_eq!(run(&s).unwrap(), first, "same seed, same run");
}
