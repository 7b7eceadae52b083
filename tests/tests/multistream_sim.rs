//! EMQX's multi-stream mode and QUIC datagrams on the broker, in the simulator, with bare QUIC
//! clients that write and read MQTT packet by packet on the streams they choose: data streams
//! before CONNACK, acknowledgements on the stream of their packet, packet identifiers per stream,
//! subscriptions per stream, a data stream's end, one-way data streams (as the `mqtt5` crate's
//! client opens them), datagrams both ways and the opt-in for them.

use bytes::Bytes;
use mqtt_proto::{
    Ack, Connect, MqttString, Packet, PacketId, Protocol, Publish, QoS, QosPid, Subscribe, Subscription,
    SubscriptionOptions, TopicFilter, TopicName,
};
use mqtt_quic_core::broker::machine::{Broker, BrokerConfig};
use mqtt_quic_core::config::{ClientConfig, ServerConfig, TransportSettings};
use mqtt_quic_core::persist::Persistence;
use mqtt_quic_core::quic::{self, ConnId, Lane, LaneEnd, QuicEndpoint};
use mqtt_quic_core::tls::{ClientTls, SelfSigned, ServerTls};
use mqtt_tests::node::Node;
use mqtt_tests::sim::{Link, Sim};
use mqtt_tests::tap::{encode, Tap};
use std::collections::BTreeMap;
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

/// A bare client: its connection and what it received.
struct Raw {
    host: usize,
    conn: ConnId,
    tap: Tap,
}

impl std::ops::Deref for Raw {
    type Target = Tap;
    fn deref(&self) -> &Tap {
        &self.tap
    }
}

impl std::ops::DerefMut for Raw {
    fn deref_mut(&mut self) -> &mut Tap {
        &mut self.tap
    }
}

struct World {
    sim: Sim<Node>,
}

fn transport(datagrams: bool) -> TransportSettings {
    TransportSettings { datagrams, ..TransportSettings::default() }
}

impl World {
    fn new(seed: u64, datagrams: bool, link: Link) -> World {
        World::with(seed, datagrams, link, Persistence::Off)
    }

    /// With persistence on, the broker's store keeps every batch at once (see `Node`).
    fn with(seed: u64, datagrams: bool, link: Link, persistence: Persistence) -> World {
        let mut qc = ServerConfig::new(ServerTls::from_self_signed(cert()).unwrap());
        qc.seed = seed;
        qc.transport = transport(datagrams);
        let mut sim = Sim::new(seed, link);
        let mut config = BrokerConfig::new(qc);
        config.persistence = persistence;
        sim.add_host(broker_addr(), Node::Broker(Box::new(Broker::new(config).unwrap())));
        World { sim }
    }

    fn broker(&mut self) -> &mut Broker {
        self.sim.machine(BROKER).as_broker()
    }

    /// A bare client on its own address, connected at the QUIC level (no MQTT yet).
    fn raw(&mut self, n: u8, datagrams: bool) -> Raw {
        let mut qc = ClientConfig::new(ClientTls::insecure());
        qc.seed = u64::from(n) * 7;
        qc.transport = transport(datagrams);
        let endpoint = QuicEndpoint::client(&qc).unwrap();
        let host = self
            .sim
            .add_host(format!("10.0.1.{n}:5000{n}").parse().unwrap(), Node::Quic(Box::new(endpoint), Vec::new()));
        let now = self.sim.now();
        let conn = self.sim.machine(host).as_quic().0.connect(now, broker_addr(), "broker.test").unwrap();
        let mut raw = Raw { host, conn, tap: Tap::default() };
        assert!(self.run_until(|w| {
            w.take(&mut raw);
            raw.connected
        }));
        raw
    }

    fn run_until(&mut self, mut done: impl FnMut(&mut World) -> bool) -> bool {
        for _ in 0..50_000 {
            if done(self) {
                return true;
            }
            if !self.sim.step() {
                return done(self);
            }
        }
        done(self)
    }

    fn settle(&mut self, raws: &mut [&mut Raw]) {
        let until = self.sim.now() + Duration::from_millis(300);
        self.sim.drive_to(until);
        for raw in raws {
            self.take(raw);
        }
    }

    /// Decodes what the bare client received since the last call.
    fn take(&mut self, raw: &mut Raw) {
        let events = std::mem::take(self.sim.machine(raw.host).as_quic().1);
        raw.tap.take(events);
    }

    fn send(&mut self, raw: &Raw, lane: Lane, packet: Packet) {
        let now = self.sim.now();
        self.sim.machine(raw.host).as_quic().0.send_lane(now, raw.conn, lane, encode(&packet)).unwrap();
    }

    /// A "per-publish" client: `n` QoS 1 PUBLISHes to `t/x` (`m0`, `m1`, ...), each on a data
    /// stream of its own finished right after it; the streams used.
    fn publish_per_stream(&mut self, publ: &mut Raw, sub: &mut Raw, n: u16) -> Vec<Lane> {
        let mut lanes = Vec::new();
        for i in 0..n {
            let lane = self.open(publ);
            self.send(publ, lane, publish("t/x", &format!("m{i}"), QoS::AtLeastOnce, 1));
            let now = self.sim.now();
            self.sim.machine(publ.host).as_quic().0.finish_lane(now, publ.conn, lane).unwrap();
            lanes.push(lane);
            self.settle(&mut [&mut *sub, &mut *publ]);
        }
        lanes
    }

    fn open(&mut self, raw: &Raw) -> Lane {
        let now = self.sim.now();
        self.sim.machine(raw.host).as_quic().0.open_lane(now, raw.conn).unwrap()
    }

    fn connect(&mut self, raw: &mut Raw, id: &str, datagrams: bool) {
        let mut c = Connect::new(Protocol::V5, MqttString::try_from(id).unwrap());
        if datagrams {
            c.properties
                .user_properties
                .push((MqttString::try_from("quic-datagrams").unwrap(), MqttString::try_from("qos0").unwrap()));
        }
        self.send(raw, Lane::CONTROL, Packet::Connect(Box::new(c)));
        assert!(self.run_until(|w| {
            w.take(raw);
            raw.got.iter().any(|(_, p)| matches!(p, Packet::ConnAck(_)))
        }));
        raw.got.retain(|(_, p)| !matches!(p, Packet::ConnAck(_)));
    }
}

fn publish(topic: &str, payload: &str, qos: QoS, id: u16) -> Packet {
    let mut p = Publish::new(TopicName::new(topic).unwrap(), Bytes::copy_from_slice(payload.as_bytes()));
    p.qos_pid = QosPid::from_parts(qos, PacketId::new(id).unwrap_or(PacketId::MIN));
    Packet::Publish(p)
}

fn subscribe(filter: &str, qos: QoS, id: u16) -> Packet {
    let sub = Subscription {
        filter: TopicFilter::new(filter).unwrap(),
        options: SubscriptionOptions { qos, ..Default::default() },
    };
    Packet::Subscribe(Subscribe {
        packet_id: PacketId::new(id).unwrap(),
        properties: Default::default(),
        subscriptions: vec![sub].into(),
    })
}

/// The packets received on `lane` (datagrams with `None`), taken.
fn on(raw: &mut Raw, lane: Option<Lane>) -> Vec<Packet> {
    let (mine, rest) = std::mem::take(&mut raw.got).into_iter().partition(|(l, _)| *l == lane);
    raw.got = rest;
    mine.into_iter().map(|(_, p)| p).collect()
}

fn payloads(packets: &[Packet]) -> Vec<String> {
    packets
        .iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => Some(String::from_utf8_lossy(&p.payload).into_owned()),
            _ => None,
        })
        .collect()
}

#[test]
fn data_streams_carry_their_own_acks_ids_and_subscriptions() {
    let mut w = World::new(1, false, Link::default());
    let mut sub = w.raw(1, false);
    // A data stream opened and used before CONNACK waits for it.
    let mut c = Connect::new(Protocol::V5, MqttString::try_from("sub").unwrap());
    c.keep_alive = 30;
    w.send(&sub, Lane::CONTROL, Packet::Connect(Box::new(c)));
    let a = w.open(&sub);
    w.send(&sub, a, subscribe("t/a", QoS::AtLeastOnce, 1));
    let b = w.open(&sub);
    // The same filter on two streams is two subscriptions, each with its packet id 1.
    w.send(&sub, b, subscribe("t/a", QoS::AtLeastOnce, 1));
    w.send(&sub, b, subscribe("t/b", QoS::AtLeastOnce, 2));
    w.settle(&mut [&mut sub]);
    assert!(matches!(on(&mut sub, Some(Lane::CONTROL))[..], [Packet::ConnAck(_)]));
    let on_a = on(&mut sub, Some(a));
    let on_b = on(&mut sub, Some(b));
    assert!(matches!(&on_a[..], [Packet::SubAck(s)] if s.packet_id.get() == 1), "{on_a:?}");
    assert!(
        matches!(&on_b[..], [Packet::SubAck(x), Packet::SubAck(y)] if x.packet_id.get() == 1 && y.packet_id.get() == 2)
    );
    assert_eq!(w.broker().subscriptions(), 3);

    let mut publ = w.raw(2, false);
    w.connect(&mut publ, "pub", false);
    let p = w.open(&publ);
    w.send(&publ, p, publish("t/a", "one", QoS::AtLeastOnce, 7));
    w.send(&publ, p, publish("t/b", "two", QoS::AtLeastOnce, 8));
    w.settle(&mut [&mut sub, &mut publ]);
    // The PUBACKs travel on the stream of their PUBLISH.
    let acks = on(&mut publ, Some(p));
    assert!(
        matches!(&acks[..], [Packet::PubAck(x), Packet::PubAck(y)] if x.packet_id.get() == 7 && y.packet_id.get() == 8),
        "{acks:?}"
    );
    assert!(on(&mut publ, Some(Lane::CONTROL)).iter().all(|p| !matches!(p, Packet::PubAck(_))));
    // Each subscription's deliveries travel on its stream, numbered by that stream.
    let on_a = on(&mut sub, Some(a));
    let on_b = on(&mut sub, Some(b));
    assert_eq!(payloads(&on_a), ["one"]);
    assert_eq!(payloads(&on_b), ["one", "two"]);
    let ids = |ps: &[Packet]| -> Vec<u16> {
        ps.iter()
            .filter_map(|p| if let Packet::Publish(p) = p { p.packet_id().map(|i| i.get()) } else { None })
            .collect()
    };
    assert_eq!(ids(&on_a), [1]);
    assert_eq!(ids(&on_b), [1, 2]);
    assert!(payloads(&on(&mut sub, Some(Lane::CONTROL))).is_empty());
    // The subscriber acknowledges on each stream; nothing is resent.
    w.send(&sub, a, Packet::PubAck(Ack::new(PacketId::new(1).unwrap())));
    w.send(&sub, b, Packet::PubAck(Ack::new(PacketId::new(1).unwrap())));
    w.send(&sub, b, Packet::PubAck(Ack::new(PacketId::new(2).unwrap())));
    w.settle(&mut [&mut sub, &mut publ]);
    assert!(sub.got.is_empty(), "{:?}", sub.got);

    // Resetting a data stream ends it and its subscriptions only.
    let now = w.sim.now();
    w.sim.machine(sub.host).as_quic().0.reset_lane(now, sub.conn, b, 0).unwrap();
    w.settle(&mut [&mut sub, &mut publ]);
    assert_eq!(w.broker().subscriptions(), 1);
    w.send(&publ, p, publish("t/a", "three", QoS::AtMostOnce, 0));
    w.send(&publ, Lane::CONTROL, publish("t/b", "four", QoS::AtMostOnce, 0));
    w.settle(&mut [&mut sub, &mut publ]);
    assert_eq!(payloads(&on(&mut sub, Some(a))), ["three"]);
    assert!(sub.got.is_empty() && sub.closed.is_none(), "{:?} {:?}", sub.got, sub.closed);
    assert_eq!(w.broker().connected(), 2);
}

#[test]
fn a_broken_data_stream_ends_alone_and_the_control_stream_ends_the_connection() {
    let mut w = World::new(2, false, Link::default());
    let mut c = w.raw(1, false);
    w.connect(&mut c, "c", false);
    let good = w.open(&c);
    w.send(&c, good, subscribe("x", QoS::AtMostOnce, 1));
    // CONNECT on a data stream is a protocol error: that stream is reset, nothing else.
    let bad = w.open(&c);
    w.send(&c, bad, Packet::Connect(Box::new(Connect::new(Protocol::V5, MqttString::try_from("again").unwrap()))));
    w.settle(&mut [&mut c]);
    assert!(
        c.ended.iter().any(|(l, e)| *l == bad && matches!(e, LaneEnd::Reset(1) | LaneEnd::Stopped(1))),
        "{:?}",
        c.ended
    );
    assert!(c.closed.is_none());
    assert_eq!(w.broker().subscriptions(), 1);
    // Malformed bytes likewise.
    let junk = w.open(&c);
    let now = w.sim.now();
    w.sim.machine(c.host).as_quic().0.send_lane(now, c.conn, junk, Bytes::from_static(&[0xF0, 0x00])).unwrap();
    w.settle(&mut [&mut c]);
    assert!(c.ended.iter().any(|(l, _)| *l == junk));
    assert!(c.closed.is_none());
    assert_eq!(w.broker().connected(), 1);
    // Finishing the control stream ends the connection, and its data streams with it.
    let now = w.sim.now();
    w.sim.machine(c.host).as_quic().0.finish(now, c.conn).unwrap();
    w.settle(&mut [&mut c]);
    assert_eq!(w.broker().connected(), 0);
    assert_eq!(w.broker().subscriptions(), 0);
}

#[test]
fn a_finished_data_stream_gets_its_acks_then_our_fin() {
    let mut w = World::new(3, false, Link::default());
    let mut sub = w.raw(1, false);
    w.connect(&mut sub, "sub", false);
    w.send(&sub, Lane::CONTROL, subscribe("t/#", QoS::AtLeastOnce, 1));
    let mut publ = w.raw(2, false);
    w.connect(&mut publ, "pub", false);
    // One stream per PUBLISH, finished right after it.
    let lanes = w.publish_per_stream(&mut publ, &mut sub, 20);
    for lane in &lanes {
        assert!(matches!(&on(&mut publ, Some(*lane))[..], [Packet::PubAck(a)] if a.packet_id.get() == 1));
        assert!(publ.ended.contains(&(*lane, LaneEnd::Finished)), "no FIN on {lane:?}");
    }
    let got = payloads(&on(&mut sub, Some(Lane::CONTROL)));
    assert_eq!(got, (0..20).map(|i| format!("m{i}")).collect::<Vec<_>>());
    // More streams than the concurrent limit were used: finished ones were freed.
    assert!(lanes.len() > TransportSettings::default().data_streams as usize);
}

#[test]
fn finished_streams_leave_nothing_behind_when_acknowledgements_wait_for_the_store() {
    // With Persistence::Sync, a PUBACK for a message routed to a kept session waits for the
    // store, and so does the FIN after it.
    let mut w = World::with(8, false, Link::default(), Persistence::Sync);
    let mut sub = w.raw(1, false);
    let mut c = Connect::new(Protocol::V5, MqttString::try_from("kept").unwrap());
    c.clean_start = false;
    c.properties.session_expiry_interval = Some(600);
    w.send(&sub, Lane::CONTROL, Packet::Connect(Box::new(c)));
    w.send(&sub, Lane::CONTROL, subscribe("t/#", QoS::AtLeastOnce, 1));
    let mut publ = w.raw(2, false);
    w.connect(&mut publ, "pub", false);
    w.settle(&mut [&mut sub, &mut publ]);
    let lanes = w.publish_per_stream(&mut publ, &mut sub, 20);
    for lane in &lanes {
        assert!(matches!(&on(&mut publ, Some(*lane))[..], [Packet::PubAck(_)]), "no PUBACK on {lane:?}");
        assert!(publ.ended.contains(&(*lane, LaneEnd::Finished)), "no FIN on {lane:?}");
    }
    assert_eq!(w.broker().data_streams(), 0);
    assert_eq!(w.broker().subscriptions(), 1);
}

#[test]
fn a_takeover_ends_the_old_connections_streams_and_keeps_the_new_ones() {
    let mut w = World::new(9, false, Link::default());
    let kept = || {
        let mut c = Connect::new(Protocol::V5, MqttString::try_from("same").unwrap());
        c.clean_start = false;
        c.properties.session_expiry_interval = Some(600);
        Packet::Connect(Box::new(c))
    };
    let mut old = w.raw(1, false);
    w.send(&old, Lane::CONTROL, kept());
    w.settle(&mut [&mut old]);
    let a = w.open(&old);
    w.send(&old, a, subscribe("old", QoS::AtLeastOnce, 1));
    w.settle(&mut [&mut old]);
    assert_eq!(w.broker().subscriptions(), 1);
    // The new connection's stream is opened before its CONNACK.
    let mut new = w.raw(2, false);
    w.send(&new, Lane::CONTROL, kept());
    let b = w.open(&new);
    w.send(&new, b, subscribe("new", QoS::AtLeastOnce, 1));
    w.settle(&mut [&mut old, &mut new]);
    assert!(matches!(&on(&mut new, Some(b))[..], [Packet::SubAck(_)]));
    assert_eq!(w.broker().subscriptions(), 1, "the old stream's subscription ends with it");
    let mut publ = w.raw(3, false);
    w.connect(&mut publ, "pub", false);
    w.send(&publ, Lane::CONTROL, publish("old", "to old", QoS::AtMostOnce, 0));
    w.send(&publ, Lane::CONTROL, publish("new", "to new", QoS::AtMostOnce, 0));
    w.settle(&mut [&mut old, &mut new, &mut publ]);
    assert_eq!(payloads(&on(&mut new, Some(b))), ["to new"]);
    assert!(payloads(&on(&mut new, Some(Lane::CONTROL))).is_empty());
    assert!(payloads(&on(&mut old, Some(a))).is_empty());
}

#[test]
fn streams_before_connack_are_bounded() {
    let mut w = World::new(10, false, Link::default());
    let mut c = w.raw(1, false);
    // The first byte of a CONNECT that never comes, then one-way streams with 200 KB each,
    // finished (QUIC frees their slots, so the client may open more).
    let now = w.sim.now();
    w.sim.machine(c.host).as_quic().0.send(now, c.conn, Bytes::from_static(&[0x10])).unwrap();
    w.settle(&mut [&mut c]);
    let chunk = Bytes::from(vec![0x30u8; 200_000]);
    let mut lanes = Vec::new();
    for _ in 0..40 {
        let now = w.sim.now();
        let Ok(lane) = w.sim.machine(c.host).as_quic().0.open_uni_lane(now, c.conn) else { break };
        let q = w.sim.machine(c.host).as_quic().0;
        let _ = q.send_lane(now, c.conn, lane, chunk.clone());
        let _ = q.finish_lane(now, c.conn, lane);
        lanes.push(lane);
        let until = w.sim.now() + Duration::from_millis(50);
        w.sim.drive_to(until);
        w.take(&mut c);
    }
    w.settle(&mut [&mut c]);
    let limit = TransportSettings::default().data_streams as usize;
    assert!(lanes.len() > 2 * limit, "opened {}", lanes.len());
    assert!(w.broker().data_streams() <= limit, "{} streams held", w.broker().data_streams());
    assert_eq!(w.broker().connected(), 0);
}

#[test]
fn one_way_data_streams_are_answered_on_the_control_stream_and_delivered_on_a_way_back() {
    let mut w = World::new(4, false, Link::default());
    let mut sub = w.raw(1, false);
    w.connect(&mut sub, "sub", false);
    let mut publ = w.raw(2, false);
    w.connect(&mut publ, "pub", false);
    // As the `mqtt5` crate's client does: unidirectional streams, one per topic.
    let now = w.sim.now();
    let uni = w.sim.machine(sub.host).as_quic().0.open_uni_lane(now, sub.conn).unwrap();
    assert!(uni.is_unidirectional());
    w.send(&sub, uni, subscribe("u/1", QoS::AtLeastOnce, 3));
    w.send(&sub, Lane::CONTROL, subscribe("u/2", QoS::AtLeastOnce, 4));
    w.settle(&mut [&mut sub, &mut publ]);
    // (Two streams: in either order.)
    let mut acks: Vec<u16> = on(&mut sub, Some(Lane::CONTROL))
        .iter()
        .map(|p| if let Packet::SubAck(a) = p { a.packet_id.get() } else { 0 })
        .collect();
    acks.sort();
    assert_eq!(acks, [3, 4]);
    let now = w.sim.now();
    let puni = w.sim.machine(publ.host).as_quic().0.open_uni_lane(now, publ.conn).unwrap();
    w.send(&publ, puni, publish("u/1", "hello", QoS::AtLeastOnce, 9));
    w.send(&publ, puni, publish("u/2", "control", QoS::AtLeastOnce, 10));
    w.settle(&mut [&mut sub, &mut publ]);
    let acks = on(&mut publ, Some(Lane::CONTROL));
    assert!(
        matches!(&acks[..], [Packet::PubAck(a), Packet::PubAck(b)] if a.packet_id.get() == 9 && b.packet_id.get() == 10)
    );
    // The one-way stream's subscription is delivered on a stream the broker opened back; the
    // session's on the control stream.
    assert_eq!(payloads(&on(&mut sub, Some(Lane::CONTROL))), ["control"]);
    let back: Vec<(Option<Lane>, Packet)> = std::mem::take(&mut sub.got);
    assert!(
        matches!(&back[..], [(Some(l), Packet::Publish(p))] if !l.is_unidirectional() && l.0 & 1 == 1 && &p.payload[..] == b"hello"),
        "{back:?}"
    );
    let (Some(way_back), Packet::Publish(p)) = &back[0] else { unreachable!() };
    // Acknowledged on the way back: nothing is resent.
    w.send(&sub, *way_back, Packet::PubAck(Ack::new(p.packet_id().unwrap())));
    w.settle(&mut [&mut sub, &mut publ]);
    assert!(sub.got.is_empty());
    // The subscription ends with the one-way stream (and the way back is finished).
    assert_eq!(w.broker().subscriptions(), 2);
    let now = w.sim.now();
    w.sim.machine(sub.host).as_quic().0.finish_lane(now, sub.conn, uni).unwrap();
    w.settle(&mut [&mut sub, &mut publ]);
    assert_eq!(w.broker().subscriptions(), 1);
    assert!(sub.ended.contains(&(*way_back, LaneEnd::Finished)), "{:?}", sub.ended);
}

#[test]
fn stream_subscriptions_do_not_outlive_the_connection_of_a_kept_session() {
    let mut w = World::new(5, false, Link::default());
    let mut sub = w.raw(1, false);
    let mut c = Connect::new(Protocol::V5, MqttString::try_from("kept").unwrap());
    c.clean_start = false;
    c.properties.session_expiry_interval = Some(600);
    w.send(&sub, Lane::CONTROL, Packet::Connect(Box::new(c.clone())));
    w.settle(&mut [&mut sub]);
    w.send(&sub, Lane::CONTROL, subscribe("k/control", QoS::AtLeastOnce, 1));
    let lane = w.open(&sub);
    w.send(&sub, lane, subscribe("k/stream", QoS::AtLeastOnce, 1));
    w.settle(&mut [&mut sub]);
    assert_eq!(w.broker().subscriptions(), 2);
    let now = w.sim.now();
    w.sim.machine(sub.host).as_quic().0.close(now, sub.conn, 0, "gone").unwrap();
    w.settle(&mut [&mut sub]);
    // Offline: the session keeps its control-stream subscription only.
    assert_eq!(w.broker().subscriptions(), 1);
    let mut publ = w.raw(2, false);
    w.connect(&mut publ, "pub", false);
    w.send(&publ, Lane::CONTROL, publish("k/control", "queued", QoS::AtLeastOnce, 1));
    w.send(&publ, Lane::CONTROL, publish("k/stream", "not queued", QoS::AtLeastOnce, 2));
    w.settle(&mut [&mut publ]);
    let mut back = w.raw(3, false);
    w.send(&back, Lane::CONTROL, Packet::Connect(Box::new(c)));
    w.settle(&mut [&mut back]);
    assert_eq!(payloads(&on(&mut back, Some(Lane::CONTROL))), ["queued"]);
}

#[test]
fn datagrams_carry_qos0_both_ways_for_clients_that_ask() {
    let mut w = World::new(6, true, Link::default());
    let mut asks = w.raw(1, true);
    w.connect(&mut asks, "asks", true);
    w.send(&asks, Lane::CONTROL, subscribe("d/#", QoS::AtLeastOnce, 1));
    let mut quiet = w.raw(2, true);
    w.connect(&mut quiet, "quiet", false);
    w.send(&quiet, Lane::CONTROL, subscribe("d/#", QoS::AtMostOnce, 1));
    let mut publ = w.raw(3, true);
    w.connect(&mut publ, "pub", false);
    w.settle(&mut [&mut asks, &mut quiet, &mut publ]);
    on(&mut asks, Some(Lane::CONTROL));
    on(&mut quiet, Some(Lane::CONTROL));
    let now = w.sim.now();
    let q = w.sim.machine(publ.host).as_quic().0;
    q.send_datagram(now, publ.conn, encode(&publish("d/1", "by datagram", QoS::AtMostOnce, 0))).unwrap();
    // Not a QoS 0 PUBLISH: dropped and counted, nothing else happens.
    q.send_datagram(now, publ.conn, encode(&publish("d/1", "qos1", QoS::AtLeastOnce, 4))).unwrap();
    q.send_datagram(now, publ.conn, Bytes::from_static(&[0x30, 0x7F])).unwrap();
    w.settle(&mut [&mut asks, &mut quiet, &mut publ]);
    // The client that asked gets QoS 0 as a datagram; the other on its stream.
    assert_eq!(payloads(&on(&mut asks, None)), ["by datagram"]);
    assert_eq!(payloads(&on(&mut quiet, Some(Lane::CONTROL))), ["by datagram"]);
    assert!(on(&mut publ, Some(Lane::CONTROL)).is_empty() && publ.closed.is_none());
    // QoS 1 keeps to the stream, and a message too large for a datagram goes there too.
    w.send(&publ, Lane::CONTROL, publish("d/2", "reliable", QoS::AtLeastOnce, 5));
    let big = "x".repeat(4000);
    w.send(&publ, Lane::CONTROL, publish("d/3", &big, QoS::AtMostOnce, 0));
    w.settle(&mut [&mut asks, &mut quiet, &mut publ]);
    assert_eq!(payloads(&on(&mut asks, Some(Lane::CONTROL))), ["reliable", &big]);
    assert!(on(&mut asks, None).is_empty());
    let stats = w.broker().stats();
    assert_eq!((stats.datagrams_received, stats.datagrams_sent, stats.datagrams_dropped), (3, 1, 2));
}

#[test]
fn datagrams_are_not_offered_unless_enabled() {
    let mut w = World::new(7, false, Link::default());
    let mut c = w.raw(1, true);
    w.connect(&mut c, "c", true);
    assert_eq!(w.sim.machine(c.host).as_quic().0.max_datagram_size(c.conn), None);
    let now = w.sim.now();
    let err = w.sim.machine(c.host).as_quic().0.send_datagram(now, c.conn, Bytes::from_static(b"x")).unwrap_err();
    assert_eq!(err, quic::DatagramError::NotNegotiated);
}

/// One head-of-line run: 4 topics, 200 messages a second in all for 20 s of virtual time, over
/// a 30 ms round trip with `loss` each way; topics on 4 data streams each side, or all on the
/// control stream, or QoS 0 in datagrams. Returns each topic's delivery latency p50 and p99 (ms).
///
/// For the tables in BENCHMARKS.md: `HOL_N` sets the number of messages (4000), and `HOL_ALIGN`
/// sends the four topics' messages together every 20 ms instead of one every 5 ms (as
/// `mqttv5 bench --mode hol-blocking` does).
fn head_of_line(seed: u64, loss: f64, mode: &str) -> Vec<(f64, f64)> {
    const TOPICS: usize = 4;
    let datagrams = mode == "datagrams";
    let streams = mode == "streams";
    let (qos, pub_qos) =
        if datagrams { (QoS::AtMostOnce, QoS::AtMostOnce) } else { (QoS::AtLeastOnce, QoS::AtLeastOnce) };
    let clean = Link { latency: Duration::from_millis(15), ..Link::default() };
    let mut w = World::new(seed, datagrams, clean.clone());
    let mut sub = w.raw(1, datagrams);
    w.connect(&mut sub, "sub", datagrams);
    let mut publ = w.raw(2, datagrams);
    w.connect(&mut publ, "pub", false);
    let lanes = |w: &mut World, raw: &Raw| -> Vec<Lane> {
        (0..TOPICS).map(|_| if streams { w.open(raw) } else { Lane::CONTROL }).collect()
    };
    let sub_lanes = lanes(&mut w, &sub);
    let pub_lanes = lanes(&mut w, &publ);
    for (i, lane) in sub_lanes.iter().enumerate() {
        w.send(&sub, *lane, subscribe(&format!("hol/{i}"), qos, i as u16 + 1));
    }
    w.settle(&mut [&mut sub, &mut publ]);
    sub.got.clear();
    publ.got.clear();
    w.sim.set_link(Link { loss, ..clean });
    let start = w.sim.now();
    let mut latencies: Vec<Vec<f64>> = vec![Vec::new(); TOPICS];
    let mut next_id: BTreeMap<Lane, u16> = BTreeMap::new();
    let total: u32 = std::env::var("HOL_N").ok().and_then(|v| v.parse().ok()).unwrap_or(4000);
    let aligned = std::env::var_os("HOL_ALIGN").is_some();
    for n in 0..=total {
        let at =
            if aligned { start + Duration::from_millis(20) * (n / 4) } else { start + Duration::from_millis(5) * n };
        // Everything that happens before the next send, with arrivals timed as they happen.
        while w.sim.next_event().is_some_and(|t| t <= at) {
            w.sim.step();
            w.take(&mut sub);
            let now = w.sim.now();
            for (lane, packet) in std::mem::take(&mut sub.got) {
                let Packet::Publish(p) = packet else { continue };
                let text = String::from_utf8_lossy(&p.payload).into_owned();
                let (topic, sent) = text.split_once(' ').unwrap();
                let sent: u64 = sent.parse().unwrap();
                let latency = now.duration_since(start).as_secs_f64() * 1000.0 - sent as f64 / 1000.0;
                latencies[topic.parse::<usize>().unwrap()].push(latency);
                if let (Some(lane), Some(id)) = (lane, p.packet_id()) {
                    w.send(&sub, lane, Packet::PubAck(Ack::new(id)));
                }
            }
            publ.got.clear();
            w.take(&mut publ);
            publ.got.clear();
        }
        w.sim.drive_to(at);
        if n == total {
            break;
        }
        let topic = n as usize % TOPICS;
        let sent_us = (at - start).as_micros();
        let lane = pub_lanes[topic];
        let id = next_id.entry(lane).or_insert(0);
        *id = id.checked_add(1).unwrap_or(1);
        let packet = publish(&format!("hol/{topic}"), &format!("{topic} {sent_us}"), pub_qos, *id);
        if datagrams {
            let now = w.sim.now();
            let _ = w.sim.machine(publ.host).as_quic().0.send_datagram(now, publ.conn, encode(&packet));
        } else {
            w.send(&publ, lane, packet);
        }
    }
    latencies
        .into_iter()
        .map(|mut l| {
            l.sort_by(f64::total_cmp);
            let at = |q: usize| l.get(l.len() * q / 100).copied().unwrap_or(f64::NAN);
            (at(50), at(99))
        })
        .collect()
}

/// Head-of-line blocking, measured in virtual time (printed with `--nocapture`; the table is
/// in BENCHMARKS.md): with one topic per data stream a loss delays only its own topic, so the
/// worst topic's p99 is lower than with every topic behind one stream; QoS 0 in datagrams is
/// never resent, so its p99 at 5% loss stays near the clean link's.
#[test]
fn head_of_line_blocking_streams_and_datagrams() {
    let worst = |r: &[(f64, f64)]| r.iter().map(|x| x.1).fold(0.0, f64::max);
    let show = |r: &[(f64, f64)]| r.iter().map(|(a, b)| format!("{a:.0}/{b:.0}")).collect::<Vec<_>>().join(" ");
    let clean = head_of_line(11, 0.0, "datagrams");
    eprintln!("loss  mode       per-topic p50/p99 ms");
    eprintln!("0%    datagrams  {}", show(&clean));
    for loss in [0.01, 0.05, 0.10] {
        let one = head_of_line(11, loss, "one");
        let four = head_of_line(11, loss, "streams");
        let dg = head_of_line(11, loss, "datagrams");
        eprintln!("{:<4}  one stream {}", format!("{:.0}%", loss * 100.0), show(&one));
        eprintln!("{:<4}  4 streams  {}", "", show(&four));
        eprintln!("{:<4}  datagrams  {}", "", show(&dg));
        if loss >= 0.05 {
            assert!(worst(&four) < worst(&one), "streams {four:?} vs one {one:?} at {loss}");
        }
        if loss == 0.05 {
            assert!(worst(&dg) <= worst(&clean) * 1.2, "datagrams {dg:?} vs clean {clean:?}");
        }
    }
}
