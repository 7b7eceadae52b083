//! The client store against the real broker machine, over byte streams: a publisher with a
//! store "crashes" with a QoS 2 message released (its PUBREL lost with the process) and a
//! QoS 1 message sent but never delivered, and one queued; a new client machine restored from
//! the store finishes them. With the broker's session kept, the broker receives the same
//! identifiers (PUBLISH with DUP, PUBREL) and the subscriber gets every message once, the
//! QoS 2 one exactly once; with the session gone, they go out as new messages.

use super::client_store::{store_config, Disk};
use crate::broker::machine::{Broker, BrokerConfig, StreamId, StreamOutput};
use crate::client::{ClientMachine, StreamCommand};
use crate::config::ServerConfig;
use crate::persist::{ClientRestored, Table};
use crate::session::client::{ClientEvent, ClientSessionConfig};
use crate::tls::{SelfSigned, ServerTls};
use bytes::BytesMut;
use mqtt_proto::{Decoder, Packet, Protocol, Publish, QoS, ReasonCode, Subscription, TopicFilter, TopicName};
use std::sync::OnceLock;
use std::time::Instant;

fn broker() -> Broker {
    static CERT: OnceLock<SelfSigned> = OnceLock::new();
    let cert = CERT.get_or_init(|| SelfSigned::generate(&["localhost"]).unwrap());
    let mut config = BrokerConfig::new(ServerConfig::new(ServerTls::from_self_signed(cert).unwrap()));
    config.sys_interval = None;
    Broker::new(config).unwrap()
}

/// A client machine on a byte stream to the broker.
struct Node {
    machine: ClientMachine,
    stream: Option<StreamId>,
    /// Its store, when it has one.
    disk: Option<Disk>,
    /// What it wrote to the broker, decoded, delivered or not.
    sent: Vec<Packet>,
    out: BytesMut,
    decoder: Decoder,
    /// Which of its packets never reach the broker (they were still in the process when it
    /// died).
    lost: fn(&Packet) -> bool,
    events: Vec<ClientEvent>,
}

impl Node {
    fn new(config: ClientSessionConfig, disk: Option<Disk>, now: Instant) -> (Node, Option<ClientRestored>) {
        let mut machine = ClientMachine::over_stream(config, None, 7).unwrap();
        let restored = disk.as_ref().map(|d| machine.restore(now, d.records()).unwrap());
        machine.start(now).unwrap();
        let node = Node {
            machine,
            stream: None,
            disk,
            sent: Vec::new(),
            out: BytesMut::new(),
            decoder: Decoder::new(Protocol::V5),
            lost: |_| false,
            events: Vec::new(),
        };
        (node, restored)
    }

    fn publishes(&self, topic: &str) -> Vec<&Publish> {
        self.sent
            .iter()
            .filter_map(|p| if let Packet::Publish(p) = p { Some(p) } else { None })
            .filter(|p| p.topic.as_str() == topic)
            .collect()
    }

    fn messages(&self, topic: &str) -> usize {
        self.events.iter().filter(|e| matches!(e, ClientEvent::Message(m) if m.topic.as_str() == topic)).count()
    }
}

struct Net {
    broker: Broker,
    now: Instant,
    nodes: Vec<Node>,
}

impl Net {
    /// Runs every exchange until all is quiet; each store commits what it is handed at once.
    fn run(&mut self) {
        loop {
            let mut progress = false;
            for n in &mut self.nodes {
                if let Some(disk) = &mut n.disk {
                    let mut last = None;
                    while let Some(batch) = n.machine.poll_store(self.now) {
                        last = Some(batch.seq);
                        disk.apply(batch);
                    }
                    if let Some(seq) = last {
                        n.machine.handle_stored(self.now, seq);
                        progress = true;
                    }
                }
                while let Some(command) = n.machine.poll_stream() {
                    progress = true;
                    match command {
                        StreamCommand::Open(_) => {
                            n.stream = Some(self.broker.handle_stream_open(self.now, None));
                            n.machine.handle_stream_open(self.now);
                        }
                        StreamCommand::Data(bytes) => {
                            n.out.extend_from_slice(&bytes);
                            while let Some(p) = n.decoder.decode(&mut n.out).unwrap() {
                                n.sent.push(p.clone());
                                if let (false, Some(id)) = ((n.lost)(&p), n.stream) {
                                    let mut buf = BytesMut::new();
                                    p.encode(Protocol::V5, &mut buf).unwrap();
                                    self.broker.handle_stream_data(self.now, id, &buf);
                                }
                            }
                        }
                        StreamCommand::Close => {
                            if let Some(id) = n.stream.take() {
                                self.broker.handle_stream_closed(self.now, id);
                            }
                        }
                        other => panic!("a byte-stream client asked for {other:?}"),
                    }
                }
                while let Some(e) = n.machine.poll_event() {
                    progress = true;
                    n.events.push(e);
                }
            }
            while let Some((id, out)) = self.broker.poll_stream() {
                progress = true;
                let node = self.nodes.iter_mut().find(|n| n.stream == Some(id));
                match (out, node) {
                    (StreamOutput::Data(bytes), node) => {
                        self.broker.handle_stream_written(id, bytes.len());
                        if let Some(n) = node {
                            n.machine.handle_stream_data(self.now, &bytes);
                        }
                    }
                    (StreamOutput::Close, Some(n)) => {
                        n.stream = None;
                        n.machine.handle_stream_closed(self.now);
                    }
                    _ => {}
                }
            }
            if !progress {
                break;
            }
        }
    }

    /// A subscriber to `t/#` at QoS 2, connected.
    fn subscriber(&mut self) -> usize {
        let config = ClientSessionConfig { client_id: "sub".into(), keep_alive: 0, ..Default::default() };
        let (node, _) = Node::new(config, None, self.now);
        self.nodes.push(node);
        self.run();
        let at = self.nodes.len() - 1;
        let sub = Subscription::new(TopicFilter::new("t/#").unwrap(), QoS::ExactlyOnce);
        self.nodes[at].machine.subscribe(self.now, vec![sub], None).unwrap();
        self.run();
        assert!(self.nodes[at].events.iter().any(|e| matches!(e, ClientEvent::Subscribed { .. })));
        at
    }

    fn publish(&mut self, node: usize, topic: &str, qos: QoS) {
        let p = Publish::new(TopicName::new(topic).unwrap(), topic.as_bytes().to_vec()).with_qos(qos);
        self.nodes[node].machine.publish(self.now, p).unwrap();
        self.run();
    }
}

/// The first run, until the crash: returns the broker (with the publisher's session and the
/// subscriber), the publisher's store, and the identifiers it used for t/2 and t/1.
fn first_run() -> (Net, Disk, u16, u16) {
    #[allow(clippy::disallowed_methods)]
    let now = Instant::now();
    let mut net = Net { broker: broker(), now, nodes: Vec::new() };
    net.subscriber();
    let config = ClientSessionConfig { max_inflight: 2, ..store_config() };
    let (mut publisher, restored) = Node::new(config, Some(Disk::default()), now);
    assert_eq!(restored, Some(ClientRestored::default()));
    // The process dies with its PUBREL and t/1's PUBLISH still unsent.
    publisher.lost = |p| matches!(p, Packet::PubRel(_)) || matches!(p, Packet::Publish(p) if p.topic.as_str() == "t/1");
    net.nodes.push(publisher);
    net.run();
    net.publish(1, "t/2", QoS::ExactlyOnce);
    net.publish(1, "t/1", QoS::AtLeastOnce);
    net.publish(1, "t/3", QoS::AtLeastOnce);
    let p = net.nodes.remove(1);
    let rel = p.sent.iter().find_map(|p| if let Packet::PubRel(a) = p { Some(a.packet_id.get()) } else { None });
    let rel = rel.expect("PUBREC came back and PUBREL was written (after its batch was stored)");
    let t1 = p.publishes("t/1")[0].packet_id().unwrap().get();
    assert!(p.publishes("t/3").is_empty(), "t/3 waits behind the window of 2");
    net.broker.handle_stream_closed(now, p.stream.unwrap());
    net.run();
    let disk = p.disk.unwrap();
    assert_eq!(disk.count(Table::Messages), 3);
    (net, disk, rel, t1)
}

#[test]
fn a_restored_client_finishes_its_messages_with_the_broker_that_kept_its_session() {
    let (mut net, disk, rel, t1) = first_run();
    let config = ClientSessionConfig { max_inflight: 2, ..store_config() };
    let (publisher, restored) = Node::new(config, Some(disk), net.now);
    assert_eq!(restored, Some(ClientRestored { messages: 3, in_flight: 2, qos2_received: 0 }));
    net.nodes.push(publisher);
    net.run();
    let p = &net.nodes[1];
    assert!(matches!(p.events[0], ClientEvent::Connected { session_present: true, .. }), "{:?}", p.events);
    let owed: Vec<String> = p.sent[1..3]
        .iter()
        .map(|p| match p {
            Packet::PubRel(a) => format!("PUBREL {}", a.packet_id.get()),
            Packet::Publish(p) => {
                format!("PUBLISH {} {} dup={}", p.topic.as_str(), p.packet_id().unwrap().get(), p.dup)
            }
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(owed, [format!("PUBREL {rel}"), format!("PUBLISH t/1 {t1} dup=true")], "{:?}", p.sent);
    assert!(p.publishes("t/3").iter().all(|m| !m.dup), "t/3 was never sent: it goes out new");
    let done: Vec<_> =
        p.events.iter().filter(|e| matches!(e, ClientEvent::Published { reason: ReasonCode::Success, .. })).collect();
    assert_eq!(done.len(), 3, "{:?}", p.events);
    let s = &net.nodes[0];
    for topic in ["t/1", "t/2", "t/3"] {
        assert_eq!(s.messages(topic), 1, "{topic}: {:?}", s.events);
    }
    assert_eq!(p.disk.as_ref().unwrap().count(Table::Messages), 0, "everything acknowledged is gone from the store");
}

#[test]
fn a_restored_client_sends_its_messages_as_new_to_a_broker_without_its_session() {
    let (net, disk, _, _) = first_run();
    // The old broker delivered t/2 already; a new one has no session for the publisher.
    assert_eq!(net.nodes[0].messages("t/2"), 1);
    let mut net = Net { broker: broker(), now: net.now, nodes: Vec::new() };
    net.subscriber();
    let config = ClientSessionConfig { max_inflight: 2, ..store_config() };
    let (publisher, _) = Node::new(config, Some(disk), net.now);
    net.nodes.push(publisher);
    net.run();
    let p = &net.nodes[1];
    assert!(matches!(p.events[0], ClientEvent::Connected { session_present: false, .. }), "{:?}", p.events);
    for topic in ["t/1", "t/2", "t/3"] {
        let sent = p.publishes(topic);
        assert!(sent.len() == 1 && !sent[0].dup, "{topic} goes out once, as a new message: {sent:?}");
        assert_eq!(net.nodes[0].messages(topic), 1, "{topic}");
    }
    let first = p.sent.iter().position(|p| matches!(p, Packet::PubRel(_))).unwrap();
    assert!(
        first > p.sent.iter().position(|p| matches!(p, Packet::Publish(_))).unwrap(),
        "the PUBREL owed is not sent to a broker that lost the session: t/2 starts over"
    );
    assert_eq!(p.disk.as_ref().unwrap().count(Table::Messages), 0);
}
