//! A sharded broker (several broker machines exchanging shard batches, see
//! `mqtt_quic_core::broker::shard`) through the simulator with real client machines: MQTT's
//! guarantees hold across shards. Each test places its clients deliberately: the shard that
//! accepts a connection follows from the client's address (as `SO_REUSEPORT` would), the
//! shard that keeps its session from its client id, so connections relayed to another shard,
//! sessions on different shards and publishers and subscribers apart are all exercised.

use bytes::Bytes;
use mqtt_proto::{PacketId, Publish, QoS, QosPid, ReasonCode, Subscription, TopicFilter, TopicName, Will};
use mqtt_quic_core::broker::machine::{Broker, BrokerConfig};
use mqtt_quic_core::broker::shard::{home_of, ShardSet};
use mqtt_quic_core::client::{ClientMachine, ClientMachineConfig};
use mqtt_quic_core::config::{ClientConfig, ServerConfig};
use mqtt_quic_core::session::client::{ClientEvent, ClientSessionConfig, DisconnectReason};
use mqtt_quic_core::tls::{ClientTls, SelfSigned, ServerTls};
use mqtt_tests::clients;
use mqtt_tests::node::Node;
use mqtt_tests::sim::{Link, Sim};
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

const SHARDS: u16 = 4;
const BROKER: usize = 0;

fn cert() -> &'static SelfSigned {
    static CERT: OnceLock<SelfSigned> = OnceLock::new();
    CERT.get_or_init(|| SelfSigned::generate(&["broker.test"]).unwrap())
}

fn broker_addr() -> SocketAddr {
    "10.0.0.1:14567".parse().unwrap()
}

fn config(seed: u64) -> BrokerConfig {
    let mut qc = ServerConfig::new(ServerTls::from_self_signed(cert()).unwrap());
    qc.seed = seed;
    BrokerConfig::new(qc)
}

/// A client id whose session lives on shard `home`.
fn homed(prefix: &str, home: u16) -> String {
    (0..).map(|i| format!("{prefix}-{i}")).find(|id| home_of(id, SHARDS) == home).unwrap()
}

struct World {
    sim: Sim<Node>,
    next_host: u8,
}

impl World {
    fn new(seed: u64) -> World {
        World::with(seed, config(seed), Link::default())
    }

    fn with(seed: u64, config: BrokerConfig, link: Link) -> World {
        let mut sim = Sim::new(seed, link);
        sim.add_host(broker_addr(), Node::Shards(Box::new(ShardSet::new(&config, SHARDS).unwrap())));
        World { sim, next_host: 1 }
    }

    fn set(&mut self) -> &mut ShardSet {
        self.sim.machine(BROKER).as_shards()
    }

    /// An address whose connections the broker takes on shard `shard`.
    fn address_on(&mut self, shard: usize) -> SocketAddr {
        let set = self.sim.machine(BROKER).as_shards();
        (1..60000u16).map(|p| SocketAddr::from(([10, 0, 1, 1], p))).find(|a| set.shard_for(*a) == shard).unwrap()
    }

    /// A client whose connection lands on shard `on`, connected.
    fn client_on(&mut self, on: usize, session: ClientSessionConfig) -> usize {
        let mut addr = self.address_on(on);
        // Distinct addresses for distinct hosts: the next port with the same shard.
        while self.sim.hosts.iter().any(|h| h.addr == addr) {
            let set = self.sim.machine(BROKER).as_shards();
            let next = (addr.port() + 1..60000).map(|p| SocketAddr::from(([10, 0, 1, 1], p)));
            addr = next.clone().find(|a| set.shard_for(*a) == on).unwrap();
        }
        let mut qc = ClientConfig::new(ClientTls::insecure());
        qc.seed = u64::from(self.next_host) * 7;
        self.next_host += 1;
        let client = ClientMachine::new(ClientMachineConfig {
            quic: qc,
            session,
            server: broker_addr(),
            server_name: "broker.test".into(),
            reconnect: None,
        })
        .unwrap();
        let host = self.sim.add_host(addr, Node::client(client));
        self.start(host);
        host
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

    fn run_until(&mut self, mut done: impl FnMut(&mut World) -> bool) -> bool {
        for _ in 0..200_000 {
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
        clients::settle(&mut self.sim);
    }

    fn subscribe(&mut self, host: usize, filter: &str, qos: QoS) {
        clients::subscribe(&mut self.sim, host, filter, qos);
    }

    fn publish(&mut self, host: usize, topic: &str, payload: &str, qos: QoS, retain: bool) {
        clients::publish(&mut self.sim, host, topic, payload, qos, retain);
    }

    fn messages(&mut self, host: usize) -> Vec<(String, String, bool)> {
        clients::messages(&mut self.sim, host)
    }

    fn payloads(&mut self, host: usize) -> Vec<String> {
        self.messages(host).into_iter().map(|(_, p, _)| p).collect()
    }
}

fn session(id: &str) -> ClientSessionConfig {
    ClientSessionConfig { client_id: id.into(), ..Default::default() }
}

/// Where a session lives: the one shard that holds it.
fn holder(w: &mut World, id: &str) -> Vec<usize> {
    (0..usize::from(SHARDS)).filter(|&i| w.set().shards()[i].has_session(id)).collect()
}

#[test]
fn sessions_live_on_the_home_of_their_client_id_wherever_they_connect() {
    let mut w = World::new(1);
    // Every combination of accepting shard and home shard, including the same one.
    let mut hosts = Vec::new();
    for on in 0..usize::from(SHARDS) {
        for home in 0..SHARDS {
            let id = homed(&format!("c{on}"), home);
            hosts.push((w.client_on(on, session(&id)), id, home));
        }
    }
    for (_, id, home) in &hosts {
        assert_eq!(holder(&mut w, id), [usize::from(*home)], "{id}");
    }
    assert_eq!(w.set().connected(), hosts.len());
    // Everybody hears everybody: one message each, routed across every pair of shards.
    for &(host, _, _) in &hosts {
        w.subscribe(host, "all/#", QoS::AtLeastOnce);
    }
    for (i, &(host, _, _)) in hosts.iter().enumerate() {
        w.publish(host, &format!("all/{i}"), &i.to_string(), QoS::AtLeastOnce, false);
    }
    let n = hosts.len();
    assert!(w.run_until(|w| hosts.iter().all(|&(h, _, _)| w.messages(h).len() >= n)));
    w.settle();
    for &(host, _, _) in &hosts {
        let mut got = w.payloads(host);
        got.sort_by_key(|p| p.parse::<usize>().unwrap());
        assert_eq!(got, (0..n).map(|i| i.to_string()).collect::<Vec<_>>());
    }
}

#[test]
fn one_publisher_s_messages_arrive_in_order_on_every_shard() {
    let mut w = World::new(2);
    // The publisher's session on shard 1, reached through shard 3; a subscriber homed on
    // each shard.
    let publisher = w.client_on(3, session(&homed("pub", 1)));
    let subs: Vec<usize> = (0..SHARDS).map(|h| w.client_on(usize::from(h), session(&homed("sub", h)))).collect();
    for &s in &subs {
        w.subscribe(s, "seq", QoS::AtLeastOnce);
    }
    for i in 0..300 {
        let qos = [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce][i % 3];
        w.publish(publisher, "seq", &i.to_string(), qos, false);
    }
    assert!(w.run_until(|w| subs.iter().all(|&s| w.messages(s).len() >= 300)));
    for &s in &subs {
        assert_eq!(w.payloads(s), (0..300).map(|i| i.to_string()).collect::<Vec<_>>());
    }
}

#[test]
fn qos_1_and_2_hold_across_shards_on_a_lossy_link() {
    let link = Link { loss: 0.1, reorder: 0.05, jitter: Duration::from_millis(5), ..Link::default() };
    let mut w = World::with(3, config(3), link);
    let publisher = w.client_on(0, session(&homed("pub", 2)));
    let at_least = w.client_on(1, session(&homed("one", 3)));
    let exactly = w.client_on(2, session(&homed("two", 0)));
    w.subscribe(at_least, "data", QoS::AtLeastOnce);
    w.subscribe(exactly, "data", QoS::ExactlyOnce);
    for i in 0..200 {
        w.publish(publisher, "data", &i.to_string(), QoS::ExactlyOnce, false);
    }
    assert!(w.run_until(|w| w.messages(exactly).len() >= 200 && w.messages(at_least).len() >= 200));
    w.settle();
    let expected: Vec<String> = (0..200).map(|i| i.to_string()).collect();
    assert_eq!(w.payloads(exactly), expected, "exactly once, in order");
    let mut once = w.payloads(at_least);
    once.dedup();
    assert_eq!(once, expected, "at least once, in order");
}

#[test]
fn a_client_takes_its_session_over_from_a_connection_on_another_shard() {
    let mut w = World::new(4);
    let id = homed("device", 2);
    let kept = ClientSessionConfig { clean_start: false, session_expiry: 600, ..session(&id) };
    // First from shard 0, relayed to 2; it subscribes, then its link goes quiet.
    let first = w.client_on(0, kept.clone());
    w.subscribe(first, "jobs/#", QoS::AtLeastOnce);
    let publisher = w.client_on(1, session(&homed("pub", 3)));
    // The same client id from an address on shard 3: it takes the session over.
    let second = w.client_on(3, kept);
    assert!(w.run_until(|w| w.events(first).iter().any(|e| matches!(
        e,
        ClientEvent::Disconnected { reason: DisconnectReason::ByServer(ReasonCode::SessionTakenOver) }
    ))));
    let events = w.events(second).clone();
    assert!(events.iter().any(|e| matches!(e, ClientEvent::Connected { session_present: true, .. })), "{events:?}");
    assert_eq!(holder(&mut w, &id), [2]);
    assert_eq!(w.set().connected(), 2);
    // Its subscription came with it.
    w.publish(publisher, "jobs/1", "build", QoS::AtLeastOnce, false);
    assert!(w.run_until(|w| !w.messages(second).is_empty()));
    assert_eq!(w.payloads(second), ["build"]);
    // Offline, its messages wait in the session; back on yet another shard, it gets them.
    let now = w.sim.now();
    w.c(second).drop_connection(now);
    w.settle();
    for n in 0..3 {
        w.publish(publisher, "jobs/2", &n.to_string(), QoS::AtLeastOnce, false);
    }
    w.settle();
    w.events(second).clear();
    w.start(second);
    assert!(w.run_until(|w| w.messages(second).len() >= 3));
    assert_eq!(w.payloads(second), ["0", "1", "2"]);
}

#[test]
fn shared_subscriptions_are_balanced_over_members_on_every_shard() {
    let mut w = World::new(5);
    // Two members homed on shard 0, one on each of 1 and 2; the publisher on shard 3.
    let homes = [0, 0, 1, 2];
    let members: Vec<usize> =
        homes.iter().enumerate().map(|(i, &h)| w.client_on(3 - i, session(&homed(&format!("m{i}"), h)))).collect();
    for &m in &members {
        w.subscribe(m, "$share/workers/jobs/#", QoS::AtLeastOnce);
    }
    let publisher = w.client_on(3, session(&homed("boss", 3)));
    for i in 0..400 {
        w.publish(publisher, &format!("jobs/{}", i % 7), &i.to_string(), QoS::AtLeastOnce, false);
    }
    let total = |w: &mut World| members.iter().map(|&m| w.messages(m).len()).sum::<usize>();
    assert!(w.run_until(|w| total(w) >= 400));
    w.settle();
    assert_eq!(total(&mut w), 400, "each message once");
    let mut all: Vec<usize> = members.iter().flat_map(|&m| w.payloads(m)).map(|p| p.parse().unwrap()).collect();
    all.sort();
    assert_eq!(all, (0..400).collect::<Vec<_>>());
    for &m in &members {
        let n = w.messages(m).len();
        assert!((80..=120).contains(&n), "a member got {n} of 400");
    }
}

#[test]
fn retained_messages_are_found_on_every_shard_and_settle_alike() {
    let mut w = World::new(6);
    let a = w.client_on(0, session(&homed("a", 1)));
    let b = w.client_on(2, session(&homed("b", 3)));
    w.publish(a, "status/door", "open", QoS::AtLeastOnce, true);
    w.settle();
    for shard in w.set().shards() {
        assert_eq!(shard.retained(), 1);
    }
    // Later subscribers on each shard find it.
    for h in 0..SHARDS {
        let s = w.client_on(usize::from(h), session(&homed("late", h)));
        w.subscribe(s, "status/+", QoS::AtLeastOnce);
        assert!(w.run_until(|w| !w.messages(s).is_empty()));
        assert_eq!(w.messages(s), [("status/door".to_string(), "open".to_string(), true)]);
    }
    // Two shards change the same topic at the same moment (each before hearing of the other's
    // change): every shard settles on the same one.
    let now = w.sim.now();
    for (shard, payload) in [(1, "from-1"), (3, "from-3")] {
        let mut p = Publish::new(TopicName::new("status/window").unwrap(), Bytes::from_static(payload.as_bytes()));
        p.retain = true;
        w.set().shards()[shard].publish_local(now, p).unwrap();
    }
    w.set().exchange(now);
    w.settle();
    let mut seen = Vec::new();
    for h in 0..SHARDS {
        let s = w.client_on(usize::from(h), session(&homed("check", h)));
        w.subscribe(s, "status/window", QoS::AtLeastOnce);
        assert!(w.run_until(|w| !w.messages(s).is_empty()));
        seen.push(w.payloads(s));
    }
    assert!(seen.windows(2).all(|p| p[0] == p[1]), "{seen:?}");
    // A subscription made on shard 2 while a retained message is published on shard 0, before
    // either hears of the other: the subscriber still gets the message (as a broker of one
    // shard gives it, live or retained).
    let now = w.sim.now();
    let filter = TopicFilter::new("race/#").unwrap();
    let local = w.set().shards()[2].subscribe_local(now, &filter, QoS::AtLeastOnce);
    let mut p = Publish::new(TopicName::new("race/1").unwrap(), Bytes::from_static(b"both"));
    p.retain = true;
    w.set().shards()[0].publish_local(now, p).unwrap();
    w.set().exchange(now);
    let mut got = Vec::new();
    while let Some(event) = w.set().shards()[2].poll_event() {
        if let mqtt_quic_core::broker::machine::BrokerEvent::Message { subscription, publish } = event {
            assert_eq!(subscription, local);
            got.push(publish.payload.clone());
        }
    }
    assert_eq!(got, [Bytes::from_static(b"both")]);
    // Deleted everywhere.
    w.publish(b, "status/door", "", QoS::AtLeastOnce, true);
    w.settle();
    for shard in w.set().shards() {
        assert_eq!(shard.retained(), 2, "status/window and race/1 are left");
    }
}

fn delayed_will(id: &str, delay: u32) -> ClientSessionConfig {
    let mut will = Will {
        topic: TopicName::new(format!("clients/{id}")).unwrap(),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Default::default(),
    };
    will.properties.will_delay_interval = Some(delay);
    ClientSessionConfig { will: Some(will), session_expiry: 600, ..session(id) }
}

#[test]
fn wills_wait_for_their_delay_and_a_reconnect_on_another_shard_cancels_one() {
    let mut w = World::new(7);
    let watcher = w.client_on(0, session(&homed("watcher", 0)));
    w.subscribe(watcher, "clients/#", QoS::AtLeastOnce);
    let late_id = homed("late", 2);
    let back_id = homed("back", 3);
    let late = w.client_on(1, delayed_will(&late_id, 5));
    let back = w.client_on(2, delayed_will(&back_id, 5));
    let now = w.sim.now();
    w.c(late).drop_connection(now);
    w.c(back).drop_connection(now);
    w.sim.drive_to(now + Duration::from_secs(3));
    assert!(w.messages(watcher).is_empty(), "not before the delay");
    // "back" returns within the delay, from an address on another shard.
    let again = w.client_on(0, delayed_will(&back_id, 5));
    w.sim.drive_to(now + Duration::from_secs(6));
    assert_eq!(w.messages(watcher), [(format!("clients/{late_id}"), "gone".to_string(), false)]);
    assert!(w.c(again).is_connected());
    assert!(w.set().has_session(&late_id), "the session is kept until it expires");
    w.sim.drive_to(now + Duration::from_secs(700));
    assert!(!w.set().has_session(&late_id), "expired after 600 s");
    let _ = back;
}

#[test]
fn a_client_that_moves_to_another_address_keeps_its_connection_across_shards() {
    let mut w = World::new(8);
    let sub = w.client_on(1, session(&homed("sub", 2)));
    w.subscribe(sub, "t", QoS::AtLeastOnce);
    let publisher = w.client_on(0, session(&homed("pub", 0)));
    w.publish(publisher, "t", "before", QoS::AtLeastOnce, false);
    assert!(w.run_until(|w| w.messages(sub).len() == 1));
    // A NAT rebinding: its datagrams now reach shard 3 first, which forwards them to shard 1,
    // where its QUIC connection is.
    let moved = w.address_on(3);
    w.sim.set_address(sub, moved);
    w.publish(publisher, "t", "after", QoS::AtLeastOnce, false);
    assert!(w.run_until(|w| w.messages(sub).len() == 2));
    assert_eq!(w.payloads(sub), ["before", "after"]);
    assert!(w.c(sub).is_connected());
}

#[test]
fn sys_topics_count_the_whole_broker() {
    let mut config = config(9);
    config.sys_interval = Some(Duration::from_secs(1));
    let mut w = World::with(9, config, Link::default());
    let admin = w.client_on(0, session(&homed("admin", 0)));
    for h in 1..SHARDS {
        let c = w.client_on(usize::from(h), session(&homed("c", h)));
        w.subscribe(c, &format!("x/{h}"), QoS::AtMostOnce);
    }
    w.subscribe(admin, "$SYS/broker/clients/connected", QoS::AtMostOnce);
    // Two intervals: the other shards report, then shard 0 publishes the sum.
    let until = w.sim.now() + Duration::from_millis(2500);
    w.sim.drive_to(until);
    let counts: Vec<String> = w.payloads(admin);
    assert_eq!(counts.last().map(String::as_str), Some("4"), "{counts:?}");
}

#[test]
fn one_shard_is_the_broker_as_it_was() {
    let c = config(10);
    let one = c.for_shard(0, 1);
    assert!(one.shard.is_none() && one.quic.load_balancer.is_none());
    assert_eq!(format!("{:?}", one.quic.tls), format!("{:?}", c.quic.tls));
    assert_eq!(Broker::new(one).unwrap().shard(), None);
    // Global limits are split.
    let three = c.for_shard(2, 3);
    assert_eq!(three.max_sessions, c.max_sessions.div_ceil(3));
    assert_eq!(three.quic.max_connections, c.quic.max_connections.div_ceil(3));
}

/// Byte streams into a sharded broker with a store per shard that commits only when told:
/// what a publisher is acknowledged, and what a restarted broker reads back.
mod durable {
    use super::*;
    use bytes::BytesMut;
    use mqtt_proto::{Connect, Decoder, MqttString, Packet, Protocol, Subscribe};
    use mqtt_quic_core::broker::machine::{StreamId, StreamOutput};
    use mqtt_quic_core::persist::{Persistence, StoreBatch};
    use mqtt_tests::disk::{self, Disk};
    use std::collections::BTreeMap;
    use std::time::Instant;

    struct Rig {
        set: ShardSet,
        now: Instant,
        disks: Vec<Disk>,
        /// Batches polled and not committed yet, per shard.
        pending: Vec<Vec<StoreBatch>>,
        /// Shards whose batches are held back.
        holding: Vec<bool>,
        received: BTreeMap<StreamId, Vec<Packet>>,
        buffers: BTreeMap<StreamId, BytesMut>,
    }

    fn durable_config() -> BrokerConfig {
        let mut c = config(11);
        c.persistence = Persistence::Sync;
        c.sys_interval = None;
        c
    }

    impl Rig {
        fn new(disks: Vec<Disk>) -> Rig {
            #[allow(clippy::disallowed_methods)] // the test's virtual epoch
            let now = Instant::now();
            let mut set = ShardSet::new(&durable_config(), SHARDS).unwrap();
            for (shard, disk) in set.shards().iter_mut().zip(&disks) {
                shard.restore(now, disk::records(disk)).unwrap();
            }
            let n = usize::from(SHARDS);
            Rig {
                set,
                now,
                disks,
                pending: vec![Vec::new(); n],
                holding: vec![false; n],
                received: BTreeMap::new(),
                buffers: BTreeMap::new(),
            }
        }

        /// Moves everything along: store batches (committed unless held), stream output.
        fn settle(&mut self) {
            for _ in 0..20 {
                // Past the commit delay each round.
                self.now += Duration::from_millis(2);
                self.set.handle_timeout(self.now);
                let mut moved = false;
                for (i, shard) in self.set.shards().iter_mut().enumerate() {
                    while let Some(batch) = shard.poll_store(self.now) {
                        self.pending[i].push(batch);
                    }
                    if !self.holding[i] {
                        if let Some(last) = self.pending[i].last().map(|b| b.seq) {
                            for batch in self.pending[i].drain(..) {
                                disk::apply(&mut self.disks[i], batch);
                            }
                            shard.handle_stored(self.now, last);
                            moved = true;
                        }
                    }
                }
                self.set.exchange(self.now);
                while let Some((id, out)) = self.set.poll_stream() {
                    moved = true;
                    if let StreamOutput::Data(bytes) = out {
                        self.set.handle_stream_written(id, bytes.len());
                        let buf = self.buffers.entry(id).or_default();
                        buf.extend_from_slice(&bytes);
                        let mut decoder = Decoder::new(Protocol::V5);
                        while let Some(p) = decoder.decode(buf).unwrap() {
                            self.received.entry(id).or_default().push(p);
                        }
                    }
                }
                if !moved {
                    return;
                }
            }
        }

        fn open(&mut self) -> StreamId {
            let id = self.set.handle_stream_open(self.now, None, false);
            self.settle();
            id
        }

        fn send(&mut self, id: StreamId, packets: impl IntoIterator<Item = Packet>) {
            let mut bytes = BytesMut::new();
            for p in packets {
                p.encode(Protocol::V5, &mut bytes).unwrap();
            }
            self.set.handle_stream_data(self.now, id, &bytes);
            self.settle();
        }

        fn got(&self, id: StreamId) -> &[Packet] {
            self.received.get(&id).map_or(&[], |v| v.as_slice())
        }
    }

    fn connect(id: &str, kept: bool) -> Packet {
        let mut c = Connect::new(Protocol::V5, MqttString::try_from(id).unwrap());
        c.clean_start = !kept;
        c.keep_alive = 0;
        if kept {
            c.properties.session_expiry_interval = Some(3600);
        }
        c.into()
    }

    #[test]
    fn a_publisher_is_acknowledged_once_another_shard_has_kept_its_message() {
        let mut rig = Rig::new(vec![Disk::new(); usize::from(SHARDS)]);
        // The subscriber's session lives on shard 2; it subscribes and goes away.
        let sub_id = homed("keeper", 2);
        let s = rig.open();
        let filter = Subscription::new(TopicFilter::new("t").unwrap(), QoS::AtLeastOnce);
        let subscribe = Subscribe {
            packet_id: PacketId::MIN,
            properties: Default::default(),
            subscriptions: [filter].into_iter().collect(),
        };
        rig.send(s, [connect(&sub_id, true), subscribe.into()]);
        assert!(rig.got(s).iter().any(|p| matches!(p, Packet::SubAck(_))), "{:?}", rig.got(s));
        rig.set.handle_stream_closed(rig.now, s);
        rig.settle();
        // The publisher's session lives on shard 3. Shard 2's store is slow.
        rig.holding[2] = true;
        let p = rig.open();
        let mut message = Publish::new(TopicName::new("t").unwrap(), Bytes::from_static(b"kept"));
        message.qos_pid = QosPid::from_parts(QoS::AtLeastOnce, PacketId::MIN);
        rig.send(p, [connect(&homed("writer", 3), false)]);
        assert!(rig.got(p).iter().any(|x| matches!(x, Packet::ConnAck(_))));
        rig.send(p, [message.into()]);
        let acked = |rig: &Rig| rig.got(p).iter().any(|x| matches!(x, Packet::PubAck(_)));
        assert!(!acked(&rig), "no PUBACK before shard 2 has the message on disk");
        assert!(!rig.pending[2].is_empty(), "shard 2 journaled it");
        rig.holding[2] = false;
        rig.settle();
        assert!(acked(&rig), "PUBACK once it is kept");
        // A restart: every shard reads its own store back; the session and its message are
        // on shard 2 again.
        let disks = std::mem::take(&mut rig.disks);
        let mut rig = Rig::new(disks);
        assert_eq!(holder_in(&mut rig.set, &sub_id), [2]);
        let again = rig.open();
        rig.send(again, [connect(&sub_id, true)]);
        let payloads: Vec<Bytes> = rig
            .got(again)
            .iter()
            .filter_map(|x| if let Packet::Publish(m) = x { Some(m.payload.clone()) } else { None })
            .collect();
        assert_eq!(payloads, [Bytes::from_static(b"kept")]);
    }

    fn holder_in(set: &mut ShardSet, id: &str) -> Vec<usize> {
        (0..usize::from(SHARDS)).filter(|&i| set.shards()[i].has_session(id)).collect()
    }
}

#[test]
fn a_client_resumes_with_0_rtt_on_another_shard_and_is_relayed_before_its_handshake_completes() {
    use mqtt_proto::{Connect, MqttString, Packet, Protocol};
    use mqtt_quic_core::quic::{Event, QuicEndpoint};
    let mut w = World::new(12);
    let id = homed("phone", 1);
    let connect = || {
        let mut c = Connect::new(Protocol::V5, MqttString::try_from(id.as_str()).unwrap());
        c.keep_alive = 0;
        let mut bytes = bytes::BytesMut::new();
        Packet::from(c).encode(Protocol::V5, &mut bytes).unwrap();
        bytes.freeze()
    };
    // A bare QUIC client: its CONNECT goes with the first flight (0-RTT once it has a ticket).
    let mut qc = ClientConfig::new(ClientTls::insecure());
    qc.seed = 99;
    let first_addr = w.address_on(0);
    let host = w.sim.add_host(first_addr, Node::Quic(Box::new(QuicEndpoint::client(&qc).unwrap()), Vec::new()));
    let connack = |w: &mut World| {
        let now = w.sim.now();
        let (endpoint, events) = w.sim.machine(host).as_quic();
        events.clear();
        let conn = endpoint.connect(now, broker_addr(), "broker.test").unwrap();
        endpoint.send(now, conn, connect()).unwrap();
        assert!(w.run_until(|w| w.sim.machine(host).as_quic().1.iter().any(|e| matches!(e, Event::Received { .. }))));
        conn
    };
    let first = connack(&mut w);
    // (The session ticket arrives after the handshake.)
    w.settle();
    let now = w.sim.now();
    w.sim.machine(host).as_quic().0.close(now, first, 0, "bye").unwrap();
    w.settle();
    // Back from another network, whose flow the kernel gives shard 2: the ticket shard 0
    // issued is good there, and the CONNECT in the 0-RTT data is relayed to shard 1 before
    // the handshake completes.
    let moved = w.address_on(2);
    w.sim.set_address(host, moved);
    let second = connack(&mut w);
    w.settle();
    let now = w.sim.now();
    assert_eq!(w.set().shards()[2].metrics(now).quic.counters.zero_rtt_accepted, 1, "resumed with 0-RTT on shard 2");
    assert_eq!(holder(&mut w, &id), [1]);
    // Well past the connect timeout: the relayed connection is still up and its session too.
    let until = w.sim.now() + Duration::from_secs(15);
    w.sim.drive_to(until);
    let closed =
        w.sim.machine(host).as_quic().1.iter().any(|e| matches!(e, Event::Closed { conn, .. } if *conn == second));
    assert!(!closed, "the relayed connection was closed");
    assert_eq!(w.set().connected(), 1);
}

#[test]
fn a_shared_subscription_skips_members_offline_on_another_shard() {
    let mut w = World::new(13);
    let online = w.client_on(0, session(&homed("worker-up", 0)));
    let kept = ClientSessionConfig { clean_start: false, session_expiry: 600, ..session(&homed("worker-down", 1)) };
    let offline = w.client_on(1, kept);
    for m in [online, offline] {
        w.subscribe(m, "$share/pool/jobs", QoS::AtLeastOnce);
    }
    let now = w.sim.now();
    w.c(offline).disconnect(now, ReasonCode::NORMAL_DISCONNECTION).unwrap();
    w.settle();
    // Published on shard 2, whose round robin also picks shard 1's member: shard 1 declines
    // (its member is offline) and shard 2 picks the online one.
    let boss = w.client_on(2, session(&homed("boss", 2)));
    for i in 0..40 {
        w.publish(boss, "jobs", &i.to_string(), QoS::AtLeastOnce, false);
    }
    assert!(w.run_until(|w| w.messages(online).len() >= 40));
    w.settle();
    let mut got: Vec<usize> = w.payloads(online).iter().map(|p| p.parse().unwrap()).collect();
    got.sort();
    assert_eq!(got, (0..40).collect::<Vec<_>>(), "every message to the member online");
    // Nothing waited for the offline member.
    w.events(offline).clear();
    w.start(offline);
    w.settle();
    assert!(w.messages(offline).is_empty());
}
