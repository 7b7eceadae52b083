//! The client side of EMQX's multi-stream mode: `ClientMachine` data streams against the broker,
//! in the simulator (QUIC) and over in-memory byte streams (where a stream handle falls back to
//! the one stream there is). What is checked is what a user can observe: which session holds a
//! subscription (the broker forgets a stream's subscriptions with the stream, and the control
//! session does not know them), that deliveries keep flowing after a reconnect, and how
//! requests in flight on a stream end when its connection drops.

use bytes::Bytes;
use mqtt_proto::{
    Packet, PacketId, Publish, QoS, QosPid, ReasonCode, Subscription, SubscriptionOptions, TopicFilter, TopicName,
};
use mqtt_quic_core::broker::machine::{Broker, BrokerConfig};
use mqtt_quic_core::client::{ClientMachine, ClientMachineConfig, ReconnectPolicy, StreamHandle};
use mqtt_quic_core::config::{ClientConfig, ServerConfig};
use mqtt_quic_core::quic::{ConnId, Lane, QuicEndpoint};
use mqtt_quic_core::session::client::{ClientEvent, ClientSessionConfig, RequestId};
use mqtt_quic_core::tls::{ClientTls, SelfSigned, ServerTls};
use mqtt_tests::node::Node;
use mqtt_tests::pipes::Pipes;
use mqtt_tests::sim::{Link, Sim};
use mqtt_tests::tap::{encode, Tap};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

fn cert() -> &'static SelfSigned {
    static CERT: OnceLock<SelfSigned> = OnceLock::new();
    CERT.get_or_init(|| SelfSigned::generate(&["broker.test"]).unwrap())
}

const BROKER: usize = 0;

fn broker_addr() -> SocketAddr {
    "10.0.0.1:14567".parse().unwrap()
}

fn policy() -> ReconnectPolicy {
    ReconnectPolicy { initial: Duration::from_millis(50), max: Duration::from_millis(200) }
}

struct World {
    sim: Sim<Node>,
}

impl World {
    fn new(seed: u64) -> World {
        let mut qc = ServerConfig::new(ServerTls::from_self_signed(cert()).unwrap());
        qc.seed = seed;
        let mut sim = Sim::new(seed, Link::default());
        sim.add_host(broker_addr(), Node::Broker(Box::new(Broker::new(BrokerConfig::new(qc)).unwrap())));
        World { sim }
    }

    /// A client machine that reconnects by itself, not started.
    fn client(&mut self, n: u8, id: &str) -> usize {
        let mut qc = ClientConfig::new(ClientTls::insecure());
        qc.seed = u64::from(n) * 7;
        let client = ClientMachine::new(ClientMachineConfig {
            quic: qc,
            session: ClientSessionConfig { client_id: id.into(), ..Default::default() },
            server: broker_addr(),
            server_name: "broker.test".into(),
            reconnect: Some(policy()),
        })
        .unwrap();
        self.sim.add_host(format!("10.0.1.{n}:5000{n}").parse().unwrap(), Node::client(client))
    }

    fn start(&mut self, host: usize) {
        let now = self.sim.now();
        self.c(host).start(now).unwrap();
        assert!(self.run_until(|w| w.c(host).is_connected()), "client {host} did not connect");
    }

    fn c(&mut self, host: usize) -> &mut ClientMachine {
        self.sim.machine(host).as_client()
    }

    fn events(&mut self, host: usize) -> &mut Vec<ClientEvent> {
        self.sim.machine(host).events()
    }

    fn broker(&mut self) -> &mut Broker {
        self.sim.machine(BROKER).as_broker()
    }

    fn run_until(&mut self, mut done: impl FnMut(&mut World) -> bool) -> bool {
        for _ in 0..100_000 {
            if done(self) {
                return true;
            }
            if !self.sim.step() {
                return done(self);
            }
        }
        done(self)
    }

    fn settle(&mut self) {
        let until = self.sim.now() + Duration::from_millis(300);
        self.sim.drive_to(until);
    }

    fn subscribe_on(&mut self, host: usize, stream: StreamHandle, filter: &str) -> RequestId {
        let now = self.sim.now();
        self.c(host).subscribe_on(now, stream, vec![sub(filter)], None).unwrap()
    }

    fn publish_on(&mut self, host: usize, stream: StreamHandle, topic: &str, payload: &str, qos: QoS) -> RequestId {
        let now = self.sim.now();
        self.c(host).publish_on(now, stream, message(topic, payload, qos)).unwrap()
    }

    /// Runs until the request completes; its event.
    fn wait(&mut self, host: usize, id: RequestId) -> ClientEvent {
        let mut found = None;
        assert!(
            self.run_until(|w| {
                found = w.events(host).iter().find(|e| request_of(e) == Some(id)).cloned();
                found.is_some()
            }),
            "request {id:?} did not complete"
        );
        found.unwrap()
    }

    fn payloads(&mut self, host: usize) -> Vec<String> {
        payloads(self.events(host))
    }
}

fn sub(filter: &str) -> Subscription {
    Subscription {
        filter: TopicFilter::new(filter).unwrap(),
        options: SubscriptionOptions { qos: QoS::ExactlyOnce, ..Default::default() },
    }
}

fn message(topic: &str, payload: &str, qos: QoS) -> Publish {
    let mut p = Publish::new(TopicName::new(topic).unwrap(), Bytes::copy_from_slice(payload.as_bytes()));
    p.qos_pid = QosPid::from_parts(qos, PacketId::MIN);
    p
}

fn request_of(e: &ClientEvent) -> Option<RequestId> {
    match e {
        ClientEvent::Published { id, .. }
        | ClientEvent::Subscribed { id, .. }
        | ClientEvent::Unsubscribed { id, .. }
        | ClientEvent::Aborted { id } => Some(*id),
        _ => None,
    }
}

fn payloads(events: &[ClientEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            ClientEvent::Message(p) => Some(String::from_utf8_lossy(&p.payload).into_owned()),
            _ => None,
        })
        .collect()
}

#[test]
fn streams_carry_their_own_subscriptions_publishes_and_acks() {
    let mut w = World::new(1);
    let s = w.client(1, "sub");
    let p = w.client(2, "pub");
    // Streams opened and used before the connection exists wait for its CONNACK.
    let now = w.sim.now();
    let a = w.c(s).open_stream(now, 10).unwrap();
    let b = w.c(s).open_stream(now, 0).unwrap();
    assert_eq!(w.c(s).stream_lane(a), None);
    let sub_a = w.subscribe_on(s, a, "t/a");
    w.start(s);
    w.start(p);
    assert!(
        matches!(w.wait(s, sub_a), ClientEvent::Subscribed { ref reason_codes, .. } if reason_codes == &[ReasonCode::GrantedQos2])
    );
    let sub_b = w.subscribe_on(s, b, "t/b");
    assert!(matches!(w.wait(s, sub_b), ClientEvent::Subscribed { .. }));
    assert_eq!(w.broker().subscriptions(), 2);
    // Each handle has a QUIC stream of its own, and each subscription belongs to its stream's
    // session, not the control session's.
    let (lane_a, lane_b) = (w.c(s).stream_lane(a).unwrap(), w.c(s).stream_lane(b).unwrap());
    assert!(lane_a != lane_b && !lane_a.is_control() && !lane_b.is_control());
    assert_eq!(w.c(s).stream_session(a).unwrap().subscriptions()[0].filter.as_str(), "t/a");
    assert_eq!(w.c(s).stream_session(b).unwrap().subscriptions()[0].filter.as_str(), "t/b");
    assert!(w.c(s).session().subscriptions().is_empty());

    // The publisher puts each QoS on a stream of its own; every publish completes (its
    // acknowledgements come back on its stream, which holds its in-flight window).
    let now = w.sim.now();
    let q1 = w.c(p).open_stream(now, 1).unwrap();
    let q2 = w.c(p).open_stream(now, 2).unwrap();
    let mut ids = vec![sub_a, sub_b];
    for i in 0..5 {
        ids.push(w.publish_on(p, q1, "t/a", &format!("a{i}"), QoS::AtLeastOnce));
        ids.push(w.publish_on(p, q2, "t/b", &format!("b{i}"), QoS::ExactlyOnce));
    }
    assert_eq!(w.c(p).stream_session(q1).unwrap().pending_publishes(), 5);
    assert_eq!(w.c(p).stream_session(q2).unwrap().pending_publishes(), 5);
    assert_eq!(w.c(p).session().pending_publishes(), 0);
    for id in &ids[2..] {
        assert!(matches!(w.wait(p, *id), ClientEvent::Published { reason: ReasonCode::Success, .. }));
    }
    // A QoS 0 message on the control stream too.
    let now = w.sim.now();
    ids.push(w.c(p).publish(now, message("t/a", "plain", QoS::AtMostOnce)).unwrap());
    assert!(w.run_until(|w| w.payloads(s).len() == 11));
    let got = w.payloads(s);
    let on = |prefix: &str| got.iter().filter(|m| m.starts_with(prefix)).cloned().collect::<Vec<_>>();
    // Each stream is delivered in order.
    assert_eq!(on("a"), ["a0", "a1", "a2", "a3", "a4"]);
    assert_eq!(on("b"), ["b0", "b1", "b2", "b3", "b4"]);
    assert!(got.contains(&"plain".to_string()));
    // Request ids are one numbering across a machine's control session and every stream.
    let publisher = &ids[2..];
    let unique: BTreeSet<RequestId> = publisher.iter().copied().collect();
    assert_eq!(unique.len(), publisher.len());
    assert!(sub_a != sub_b);

    // The control session never had "t/a": unsubscribing there finds nothing.
    let now = w.sim.now();
    let un = w.c(s).unsubscribe(now, vec![TopicFilter::new("t/a").unwrap()]).unwrap();
    assert!(
        matches!(w.wait(s, un), ClientEvent::Unsubscribed { ref reason_codes, .. } if reason_codes == &[ReasonCode::NoSubscriptionExisted])
    );
    // On its stream it is there.
    let now = w.sim.now();
    let un = w.c(s).unsubscribe_on(now, a, vec![TopicFilter::new("t/a").unwrap()]).unwrap();
    assert!(
        matches!(w.wait(s, un), ClientEvent::Unsubscribed { ref reason_codes, .. } if reason_codes == &[ReasonCode::Success])
    );
    assert_eq!(w.broker().subscriptions(), 1);
    // Closing a stream ends its subscriptions at the broker; the others go on.
    let now = w.sim.now();
    w.c(s).close_stream(now, b).unwrap();
    assert_eq!(w.c(s).close_stream(now, b), Err(mqtt_quic_core::session::client::CommandError::UnknownStream));
    w.settle();
    assert_eq!(w.broker().subscriptions(), 0);
    assert_eq!(w.c(s).streams(), [a]);
    assert!(w.c(s).is_connected() && w.c(p).is_connected());
}

#[test]
fn a_reconnect_makes_stream_subscriptions_again_and_resends_qos1() {
    let mut w = World::new(2);
    let s = w.client(1, "sub");
    let p = w.client(2, "pub");
    w.start(s);
    w.start(p);
    let now = w.sim.now();
    let a = w.c(s).open_stream(now, 0).unwrap();
    let id = w.subscribe_on(s, a, "t/#");
    assert!(matches!(w.wait(s, id), ClientEvent::Subscribed { .. }));
    assert!(w.c(s).stream_lane(a).is_some());

    // The subscriber's connection drops: the broker forgets the stream subscription.
    let now = w.sim.now();
    w.c(s).drop_connection(now);
    assert!(w.run_until(|w| w.broker().subscriptions() == 0));
    // Once back, the handle has a new stream and its subscription again.
    assert!(w.run_until(|w| w.c(s).is_connected() && w.broker().subscriptions() == 1));
    // (On a new QUIC connection the stream may have the same number as before.)
    assert!(w.c(s).stream_lane(a).is_some());
    let now = w.sim.now();
    let q = w.c(p).open_stream(now, 0).unwrap();
    let id = w.publish_on(p, q, "t/x", "after", QoS::AtLeastOnce);
    assert!(matches!(w.wait(p, id), ClientEvent::Published { reason: ReasonCode::Success, .. }));
    assert!(w.run_until(|w| w.payloads(s) == ["after"]));

    // The publisher's connection drops with a QoS 1 and a QoS 2 message in flight on its
    // stream: the QoS 1 one goes out again on the new stream; the QoS 2 one cannot keep its
    // exactly-once promise and is aborted.
    w.events(s).clear();
    let one = w.publish_on(p, q, "t/one", "one", QoS::AtLeastOnce);
    let two = w.publish_on(p, q, "t/two", "two", QoS::ExactlyOnce);
    let now = w.sim.now();
    w.c(p).drop_connection(now);
    assert!(matches!(w.wait(p, two), ClientEvent::Aborted { .. }));
    assert!(matches!(w.wait(p, one), ClientEvent::Published { reason: ReasonCode::Success, .. }));
    assert!(w.run_until(|w| w.payloads(s).contains(&"one".to_string())));
    // Whatever the drop cut off, "two" arrives at most once.
    w.settle();
    assert!(w.payloads(s).iter().filter(|m| *m == "two").count() <= 1);
}

#[test]
fn a_stream_subscribe_made_while_reconnecting_waits_for_the_connection() {
    let mut w = World::new(3);
    let s = w.client(1, "sub");
    let p = w.client(2, "pub");
    w.start(s);
    w.start(p);
    let now = w.sim.now();
    w.c(s).drop_connection(now);
    assert!(!w.c(s).is_connected());
    let now = w.sim.now();
    let a = w.c(s).open_stream(now, 0).unwrap();
    let id = w.subscribe_on(s, a, "late/#");
    // QoS 0 needs the stream, as it needs a connection on the control stream.
    assert!(w.c(s).publish_on(now, a, message("x", "y", QoS::AtMostOnce)).is_err());
    assert!(matches!(w.wait(s, id), ClientEvent::Subscribed { .. }));
    let now = w.sim.now();
    w.c(p).publish(now, message("late/1", "hello", QoS::AtLeastOnce)).unwrap();
    assert!(w.run_until(|w| w.payloads(s) == ["hello"]));
}

#[test]
fn over_a_byte_stream_stream_handles_fall_back_to_the_one_stream() {
    let mut pipes = Pipes::new(2, policy());
    let now = pipes.now;
    for (c, _, _) in &mut pipes.clients {
        c.start(now).unwrap();
    }
    pipes.run_until(|p| p.clients.iter().all(|c| c.0.is_connected()));
    let now = pipes.now;
    let a = pipes.clients[0].0.open_stream(now, 5).unwrap();
    let q = pipes.clients[1].0.open_stream(now, 5).unwrap();
    let id = pipes.clients[0].0.subscribe_on(now, a, vec![sub("f/#")], None).unwrap();
    pipes.run_until(|p| p.clients[0].2.iter().any(|e| request_of(e) == Some(id)));
    // The subscription is the control session's: there is no other stream.
    assert_eq!(pipes.clients[0].0.stream_lane(a), None);
    assert_eq!(pipes.clients[0].0.session().subscriptions().len(), 1);
    assert_eq!(pipes.broker.subscriptions(), 1);
    let now = pipes.now;
    let one = pipes.clients[1].0.publish_on(now, q, message("f/1", "one", QoS::AtLeastOnce)).unwrap();
    let two = pipes.clients[1].0.publish_on(now, q, message("f/2", "two", QoS::ExactlyOnce)).unwrap();
    assert_ne!(one, two);
    pipes.run_until(|p| payloads(&p.clients[0].2) == ["one", "two"]);
    pipes.run_until(|p| {
        [one, two].iter().all(|id| {
            p.clients[1]
                .2
                .iter()
                .any(|e| matches!(e, ClientEvent::Published { id: i, reason: ReasonCode::Success } if i == id))
        })
    });
    // Closing a handle there closes nothing but the handle.
    let now = pipes.now;
    pipes.clients[0].0.close_stream(now, a).unwrap();
    pipes.run(Duration::from_millis(10));
    assert!(pipes.clients[0].0.is_connected());
    assert_eq!(pipes.broker.subscriptions(), 1);
    assert!(pipes.clients[0].0.publish_on(now, a, message("f/3", "x", QoS::AtMostOnce)).is_err());
}

/// A bare QUIC server in place of the broker, driven packet by packet: what the client sends
/// on each stream, and a way to answer or reset any stream.
#[derive(Default)]
struct Bare {
    tap: Tap,
}

const SERVER: usize = 0;

fn bare_world(seed: u64) -> (Sim<Node>, usize) {
    let mut qc = ServerConfig::new(ServerTls::from_self_signed(cert()).unwrap());
    qc.seed = seed;
    let mut sim = Sim::new(seed, Link::default());
    sim.add_host(broker_addr(), Node::Quic(Box::new(QuicEndpoint::server(&qc).unwrap()), Vec::new()));
    let mut cc = ClientConfig::new(ClientTls::insecure());
    cc.seed = 11;
    let client = ClientMachine::new(ClientMachineConfig {
        quic: cc,
        session: ClientSessionConfig { client_id: "c".into(), ..Default::default() },
        server: broker_addr(),
        server_name: "broker.test".into(),
        reconnect: None,
    })
    .unwrap();
    let host = sim.add_host("10.0.1.1:50001".parse().unwrap(), Node::client(client));
    (sim, host)
}

impl Bare {
    fn take(&mut self, sim: &mut Sim<Node>) {
        self.tap.take(std::mem::take(sim.machine(SERVER).as_quic().1));
    }

    /// The connection the client came on.
    fn conn(&self) -> ConnId {
        self.tap.conn.expect("the client has sent something")
    }

    fn send(&mut self, sim: &mut Sim<Node>, lane: Lane, packet: Packet) {
        let now = sim.now();
        let conn = self.conn();
        sim.machine(SERVER).as_quic().0.send_lane(now, conn, lane, encode(&packet)).unwrap();
    }

    /// Runs until the client has sent a packet `pick` likes; takes it, with its stream.
    fn wait(&mut self, sim: &mut Sim<Node>, pick: impl Fn(&Packet) -> bool) -> (Lane, Packet) {
        for _ in 0..50_000 {
            self.take(sim);
            if let Some(i) = self.tap.got.iter().position(|(_, p)| pick(p)) {
                let (lane, packet) = self.tap.got.remove(i);
                return (lane.expect("the bare server takes no datagrams"), packet);
            }
            assert!(sim.step(), "the simulation ran dry");
        }
        panic!("the client did not send it");
    }
}

/// [`bare_world`] with the client started and given CONNACK.
fn bare_connected(seed: u64) -> (Sim<Node>, usize, Bare) {
    let (mut sim, c) = bare_world(seed);
    let mut srv = Bare::default();
    let now = sim.now();
    sim.machine(c).as_client().start(now).unwrap();
    srv.wait(&mut sim, |p| matches!(p, Packet::Connect(_)));
    srv.send(&mut sim, Lane::CONTROL, Packet::ConnAck(Box::default()));
    run_until_event(&mut sim, c, |e| matches!(e, ClientEvent::Connected { .. }));
    (sim, c, srv)
}

fn client_events(sim: &mut Sim<Node>, host: usize) -> &mut Vec<ClientEvent> {
    sim.machine(host).events()
}

fn run_until_event(sim: &mut Sim<Node>, host: usize, pick: impl Fn(&ClientEvent) -> bool) {
    for _ in 0..50_000 {
        if client_events(sim, host).iter().any(&pick) {
            return;
        }
        assert!(sim.step(), "the simulation ran dry");
    }
    panic!("no such event");
}

#[test]
fn a_stream_the_server_ends_fails_its_pending_requests_and_reopens_on_next_use() {
    let (mut sim, c, mut srv) = bare_connected(4);

    // A subscribe on a stream; the server resets the stream instead of answering.
    let now = sim.now();
    let h = sim.machine(c).as_client().open_stream(now, 3).unwrap();
    let x = sim.machine(c).as_client().subscribe_on(now, h, vec![sub("x")], None).unwrap();
    let (l1, _) = srv.wait(&mut sim, |p| matches!(p, Packet::Subscribe(_)));
    assert!(!l1.is_control());
    let now = sim.now();
    sim.machine(SERVER).as_quic().0.reset_lane(now, srv.conn(), l1, 1).unwrap();
    run_until_event(&mut sim, c, |e| *e == ClientEvent::Aborted { id: x });
    assert_eq!(sim.machine(c).as_client().stream_lane(h), None);
    assert!(sim.machine(c).as_client().is_connected());

    // The handle's next command opens a new stream.
    let now = sim.now();
    let y = sim.machine(c).as_client().subscribe_on(now, h, vec![sub("y")], None).unwrap();
    let (l2, p) = srv.wait(&mut sim, |p| matches!(p, Packet::Subscribe(_)));
    assert!(l2 != l1 && !l2.is_control());
    let Packet::Subscribe(s) = p else { unreachable!() };
    assert_eq!(s.subscriptions.iter().map(|s| s.filter.to_string()).collect::<Vec<_>>(), ["y"]);
    let ack = mqtt_proto::SubAck {
        packet_id: s.packet_id,
        properties: Default::default(),
        reason_codes: vec![ReasonCode::GrantedQos2].into(),
    };
    srv.send(&mut sim, l2, Packet::SubAck(ack));
    run_until_event(&mut sim, c, |e| matches!(e, ClientEvent::Subscribed { id, .. } if *id == y));

    // Reset again: the granted subscription is made again on the next stream, before the
    // publish that reopened it.
    let now = sim.now();
    sim.machine(SERVER).as_quic().0.reset_lane(now, srv.conn(), l2, 1).unwrap();
    let until = sim.now() + Duration::from_millis(200);
    sim.drive_to(until);
    assert_eq!(sim.machine(c).as_client().stream_lane(h), None);
    let now = sim.now();
    sim.machine(c).as_client().publish_on(now, h, message("t", "m", QoS::AtLeastOnce)).unwrap();
    let (l3, p) = srv.wait(&mut sim, |p| matches!(p, Packet::Subscribe(_)));
    assert!(l3 != l2 && !l3.is_control());
    assert!(
        matches!(p, Packet::Subscribe(s) if s.subscriptions.iter().map(|s| s.filter.to_string()).collect::<Vec<_>>() == ["y"])
    );
    let (l, _) = srv.wait(&mut sim, |p| matches!(p, Packet::Publish(_)));
    assert_eq!(l, l3);

    // A control packet on a data stream breaks it: the client resets that stream only.
    srv.send(&mut sim, l3, Packet::PingResp);
    for _ in 0..50_000 {
        srv.take(&mut sim);
        if srv.tap.ended(l3) {
            break;
        }
        assert!(sim.step());
    }
    assert!(srv.tap.ended(l3));
    assert!(sim.machine(c).as_client().is_connected());
    // The QoS 1 message in flight there is kept, for the stream's next QUIC stream.
    assert_eq!(sim.machine(c).as_client().stream_session(h).unwrap().pending_publishes(), 1);
}

#[test]
fn messages_on_streams_the_server_opens_are_taken_and_acknowledged_there() {
    // Some brokers (the `mqtt5` crate's, by default) deliver on a stream they open per topic.
    let (mut sim, c, mut srv) = bare_connected(5);
    let now = sim.now();
    let lane = sim.machine(SERVER).as_quic().0.open_lane(now, srv.conn()).unwrap();
    let mut p = message("by/server", "on its stream", QoS::AtLeastOnce);
    p.qos_pid = QosPid::from_parts(QoS::AtLeastOnce, PacketId::new(5).unwrap());
    srv.send(&mut sim, lane, Packet::Publish(p));
    run_until_event(&mut sim, c, |e| matches!(e, ClientEvent::Message(_)));
    assert_eq!(payloads(client_events(&mut sim, c)), ["on its stream"]);
    let (l, ack) = srv.wait(&mut sim, |p| matches!(p, Packet::PubAck(_)));
    assert_eq!(l, lane);
    assert!(matches!(ack, Packet::PubAck(a) if a.packet_id.get() == 5));
    // The server finishes it: the client's side follows.
    let now = sim.now();
    sim.machine(SERVER).as_quic().0.finish_lane(now, srv.conn(), lane).unwrap();
    for _ in 0..50_000 {
        srv.take(&mut sim);
        if srv.tap.ended(lane) {
            break;
        }
        assert!(sim.step());
    }
    assert!(srv.tap.ended(lane));
    assert!(sim.machine(c).as_client().is_connected());
}

#[test]
fn clients_with_datagrams_on_send_and_receive_qos0_in_datagrams() {
    let transport = mqtt_quic_core::config::TransportSettings { datagrams: true, ..Default::default() };
    let mut qc = ServerConfig::new(ServerTls::from_self_signed(cert()).unwrap());
    qc.seed = 6;
    qc.transport = transport.clone();
    let mut sim = Sim::new(6, Link::default());
    sim.add_host(broker_addr(), Node::Broker(Box::new(Broker::new(BrokerConfig::new(qc)).unwrap())));
    let mut w = World { sim };
    let mut hosts = Vec::new();
    for (n, id, datagrams) in [(1u8, "sub", true), (2, "pub", true), (3, "plain", false)] {
        let mut cc = ClientConfig::new(ClientTls::insecure());
        cc.seed = u64::from(n);
        cc.transport = mqtt_quic_core::config::TransportSettings { datagrams, ..Default::default() };
        let client = ClientMachine::new(ClientMachineConfig {
            quic: cc,
            session: ClientSessionConfig { client_id: id.into(), ..Default::default() },
            server: broker_addr(),
            server_name: "broker.test".into(),
            reconnect: None,
        })
        .unwrap();
        let host = w.sim.add_host(format!("10.0.1.{n}:5000{n}").parse().unwrap(), Node::client(client));
        w.start(host);
        hosts.push(host);
    }
    let (s, p, plain) = (hosts[0], hosts[1], hosts[2]);
    for host in [s, plain] {
        let now = w.sim.now();
        let id = w.c(host).subscribe(now, vec![sub("dg/#")], None).unwrap();
        w.wait(host, id);
    }
    let now = w.sim.now();
    let id = w.c(p).publish(now, message("dg/1", "in a datagram", QoS::AtMostOnce)).unwrap();
    w.wait(p, id);
    w.settle();
    assert_eq!(w.payloads(s), ["in a datagram"]);
    assert_eq!(w.payloads(plain), ["in a datagram"]);
    let stats = w.broker().stats();
    // In by datagram from the publisher; out by datagram to the client that asked, by stream
    // to the other.
    assert_eq!((stats.datagrams_received, stats.datagrams_sent, stats.datagrams_dropped), (1, 1, 0));
}

#[test]
fn a_server_that_refuses_data_streams_gets_the_handles_traffic_on_the_control_stream() {
    // The `mqtt5` crate's broker resets a client's two-way data stream at once (code 0xB5).
    let (mut sim, c, mut srv) = bare_connected(7);
    let now = sim.now();
    let h = sim.machine(c).as_client().open_stream(now, 0).unwrap();
    let x = sim.machine(c).as_client().subscribe_on(now, h, vec![sub("x")], None).unwrap();
    let (l1, _) = srv.wait(&mut sim, |p| matches!(p, Packet::Subscribe(_)));
    let now = sim.now();
    sim.machine(SERVER).as_quic().0.reset_lane(now, srv.conn(), l1, 0xB5).unwrap();
    run_until_event(&mut sim, c, |e| *e == ClientEvent::Aborted { id: x });
    assert!(sim.machine(c).as_client().streams_refused());
    // From then on the handle's traffic takes the control stream.
    let now = sim.now();
    sim.machine(c).as_client().subscribe_on(now, h, vec![sub("y")], None).unwrap();
    let (l2, _) = srv.wait(&mut sim, |p| matches!(p, Packet::Subscribe(_)));
    assert_eq!(l2, Lane::CONTROL);
}

/// Where the message published alone lands among those of a flood on another stream, as the
/// subscriber receives them: the flood's stream has priority `flood`, the single one's `single`.
fn position_of_single(seed: u64, flood: i32, single: i32) -> usize {
    let mut w = World::new(seed);
    let s = w.client(1, "sub");
    let p = w.client(2, "pub");
    w.start(s);
    w.start(p);
    let now = w.sim.now();
    let id = w.c(s).subscribe(now, vec![sub("#")], None).unwrap();
    w.wait(s, id);
    let now = w.sim.now();
    let big = w.c(p).open_stream(now, flood).unwrap();
    let small = w.c(p).open_stream(now, single).unwrap();
    // Both streams open (on the first command), then everything is queued at once.
    w.publish_on(p, big, "warm", "x", QoS::AtMostOnce);
    w.publish_on(p, small, "warm", "x", QoS::AtMostOnce);
    w.settle();
    w.events(s).clear();
    let payload = "f".repeat(8_000);
    for _ in 0..100 {
        w.publish_on(p, big, "flood", &payload, QoS::AtMostOnce);
    }
    w.publish_on(p, small, "single", "s", QoS::AtMostOnce);
    assert!(w.run_until(|w| w.payloads(s).len() == 101), "got {}", w.payloads(s).len());
    w.payloads(s).iter().position(|m| m == "s").unwrap()
}

#[test]
fn a_higher_priority_stream_goes_first() {
    // The single message after a 800 KB flood: on a stream of higher priority it overtakes the
    // flood; on one of lower priority it waits behind all of it.
    let first = position_of_single(12, 0, 10);
    let last = position_of_single(12, 10, 0);
    assert!(first < 20, "the higher-priority message came {first}th");
    assert_eq!(last, 100, "the lower-priority message came {last}th");
}
