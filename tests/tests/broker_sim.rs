//! The broker machine through the simulator with real client machines over QUIC.

use bytes::Bytes;
use mqtt_proto::{
    PacketId, Protocol, Publish, QoS, QosPid, ReasonCode, Subscription, SubscriptionOptions, TopicFilter, TopicName,
    Will,
};
use mqtt_quic_core::broker::machine::{Broker, BrokerConfig};
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

fn cert() -> &'static SelfSigned {
    static CERT: OnceLock<SelfSigned> = OnceLock::new();
    CERT.get_or_init(|| SelfSigned::generate(&["broker.test"]).unwrap())
}

const BROKER: usize = 0;

fn broker_addr() -> SocketAddr {
    "10.0.0.1:14567".parse().unwrap()
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

    fn client(&mut self, n: u8, session: ClientSessionConfig) -> usize {
        let mut qc = ClientConfig::new(ClientTls::insecure());
        qc.seed = u64::from(n) * 7;
        let client = ClientMachine::new(ClientMachineConfig {
            quic: qc,
            session,
            server: broker_addr(),
            server_name: "broker.test".into(),
            reconnect: None,
        })
        .unwrap();
        let host = self.sim.add_host(format!("10.0.1.{n}:5000{n}").parse().unwrap(), Node::client(client));
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

    /// Lets 300 ms of virtual time pass (without jumping to far-away deadlines such as a
    /// session expiry).
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
}

fn session(id: &str) -> ClientSessionConfig {
    ClientSessionConfig { client_id: id.into(), ..Default::default() }
}

#[test]
fn publish_reaches_matching_subscribers_only() {
    let mut w = World::new(1);
    let a = w.client(1, session("a"));
    let b = w.client(2, session("b"));
    let p = w.client(3, session("p"));
    w.subscribe(a, "sensors/#", QoS::AtLeastOnce);
    w.subscribe(b, "other/+", QoS::AtLeastOnce);
    w.publish(p, "sensors/7/temp", "21.5", QoS::AtLeastOnce, false);
    assert!(w.run_until(|w| !w.messages(a).is_empty()));
    w.settle();
    assert_eq!(w.messages(a), [("sensors/7/temp".to_string(), "21.5".to_string(), false)]);
    assert!(w.messages(b).is_empty());
}

#[test]
fn retained_message_goes_to_later_subscribers_and_empty_payload_deletes_it() {
    let mut w = World::new(2);
    let p = w.client(1, session("p"));
    w.publish(p, "status/door", "open", QoS::AtLeastOnce, true);
    w.settle();
    assert_eq!(w.broker().retained(), 1);
    let a = w.client(2, session("a"));
    w.subscribe(a, "status/+", QoS::AtLeastOnce);
    let ok = w.run_until(|w| !w.messages(a).is_empty());
    let events = w.events(a).clone();
    assert!(ok, "{events:?}");
    assert_eq!(w.messages(a), [("status/door".to_string(), "open".to_string(), true)]);
    w.publish(p, "status/door", "", QoS::AtLeastOnce, true);
    w.settle();
    assert_eq!(w.broker().retained(), 0);
}

#[test]
fn will_is_published_when_a_client_vanishes() {
    let mut w = World::new(3);
    let watcher = w.client(1, session("watcher"));
    w.subscribe(watcher, "clients/+/status", QoS::AtLeastOnce);
    let mut with_will = session("device");
    with_will.will = Some(Will {
        topic: TopicName::new("clients/device/status").unwrap(),
        payload: Bytes::from_static(b"offline"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Default::default(),
    });
    let device = w.client(2, with_will);
    let now = w.sim.now();
    w.c(device).drop_connection(now);
    assert!(w.run_until(|w| !w.messages(watcher).is_empty()));
    assert_eq!(w.messages(watcher), [("clients/device/status".to_string(), "offline".to_string(), false)]);
}

#[test]
fn normal_disconnect_discards_the_will() {
    let mut w = World::new(4);
    let watcher = w.client(1, session("watcher"));
    w.subscribe(watcher, "clients/#", QoS::AtLeastOnce);
    let mut with_will = session("device");
    with_will.will = Some(Will {
        topic: TopicName::new("clients/device").unwrap(),
        payload: Bytes::from_static(b"offline"),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: Default::default(),
    });
    let device = w.client(2, with_will);
    let now = w.sim.now();
    w.c(device).disconnect(now, ReasonCode::NORMAL_DISCONNECTION).unwrap();
    w.settle();
    w.settle();
    assert!(w.messages(watcher).is_empty());
}

#[test]
fn second_connection_takes_the_session_over() {
    let mut w = World::new(5);
    let first = w.client(1, session("same"));
    let _second = w.client(2, session("same"));
    assert!(w.run_until(|w| w.events(first).iter().any(|e| matches!(
        e,
        ClientEvent::Disconnected { reason: DisconnectReason::ByServer(ReasonCode::SessionTakenOver) }
    ))));
    assert_eq!(w.broker().connected(), 1);
}

#[test]
fn kept_session_receives_what_was_published_while_offline() {
    let mut w = World::new(6);
    let persistent = ClientSessionConfig { clean_start: false, session_expiry: 3600, ..session("sub") };
    let sub = w.client(1, persistent);
    w.subscribe(sub, "jobs/#", QoS::AtLeastOnce);
    let now = w.sim.now();
    w.c(sub).disconnect(now, ReasonCode::NORMAL_DISCONNECTION).unwrap();
    w.settle();
    let p = w.client(2, session("pub"));
    for n in 0..3 {
        w.publish(p, "jobs/build", &n.to_string(), QoS::AtLeastOnce, false);
    }
    w.settle();
    w.start(sub);
    let events = w.events(sub).clone();
    assert!(events.iter().any(|e| matches!(e, ClientEvent::Connected { session_present: true, .. })), "{events:?}");
    assert!(w.run_until(|w| w.messages(sub).len() >= 3));
    let got: Vec<String> = w.messages(sub).into_iter().map(|(_, p, _)| p).collect();
    assert_eq!(got, ["0", "1", "2"]);
}

#[test]
fn qos_is_downgraded_to_the_subscription() {
    let mut w = World::new(7);
    let a = w.client(1, session("a"));
    w.subscribe(a, "t", QoS::AtMostOnce);
    let p = w.client(2, session("p"));
    w.publish(p, "t", "x", QoS::ExactlyOnce, false);
    assert!(w.run_until(|w| !w.messages(a).is_empty()));
    let qos: Vec<QoS> =
        w.events(a).iter().filter_map(|e| if let ClientEvent::Message(p) = e { Some(p.qos()) } else { None }).collect();
    assert_eq!(qos, [QoS::AtMostOnce]);
}

#[test]
fn mqtt_311_clients_share_the_broker_with_mqtt_5_ones() {
    let mut w = World::new(8);
    let old = w.client(1, ClientSessionConfig { protocol: Protocol::V3_1_1, ..session("old") });
    let new = w.client(2, session("new"));
    w.subscribe(old, "x/#", QoS::AtLeastOnce);
    w.publish(new, "x/y", "hello", QoS::AtLeastOnce, false);
    assert!(w.run_until(|w| !w.messages(old).is_empty()));
    assert_eq!(w.messages(old)[0].1, "hello");
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
fn will_waits_for_its_delay_and_a_reconnect_cancels_it() {
    let mut w = World::new(9);
    let watcher = w.client(1, session("watcher"));
    w.subscribe(watcher, "clients/#", QoS::AtLeastOnce);
    let late = w.client(2, delayed_will("late", 5));
    let back = w.client(3, delayed_will("back", 5));
    let now = w.sim.now();
    w.c(late).drop_connection(now);
    w.c(back).drop_connection(now);
    w.sim.drive_to(now + Duration::from_secs(3));
    assert!(w.messages(watcher).is_empty(), "not before the delay");
    // "back" returns within the delay: its will is cancelled.
    w.start(back);
    w.sim.drive_to(now + Duration::from_secs(6));
    assert_eq!(w.messages(watcher), [("clients/late".to_string(), "gone".to_string(), false)]);
    assert!(w.broker().has_session("late"), "the session is kept until it expires");
    w.sim.drive_to(now + Duration::from_secs(700));
    assert!(!w.broker().has_session("late"), "expired after 600 s");
    assert!(w.broker().has_session("back") && w.c(back).is_connected(), "quiet clients stay connected");
}

#[test]
fn embedding_application_subscribes_and_publishes_in_process() {
    use mqtt_quic_core::broker::machine::BrokerEvent;
    let mut w = World::new(10);
    let now = w.sim.now();
    let local = w.broker().subscribe_local(now, &TopicFilter::new("sensors/#").unwrap(), QoS::AtLeastOnce);
    let device = w.client(1, session("device"));
    w.publish(device, "sensors/1", "7", QoS::AtLeastOnce, false);
    let mut got = Vec::new();
    assert!(w.run_until(|w| {
        while let Some(BrokerEvent::Message { subscription, publish }) = w.broker().poll_event() {
            got.push((subscription, publish.topic.to_string()));
        }
        !got.is_empty()
    }));
    assert_eq!(got, [(local, "sensors/1".to_string())]);
    // The application publishes; a client receives it.
    w.subscribe(device, "commands/#", QoS::AtLeastOnce);
    let now = w.sim.now();
    w.broker().publish_local(now, Publish::new(TopicName::new("commands/reboot").unwrap(), &b"now"[..])).unwrap();
    assert!(w.run_until(|w| !w.messages(device).is_empty()));
    assert_eq!(w.messages(device)[0].0, "commands/reboot");
}

#[test]
fn sys_topics_publish_statistics_but_not_to_leading_wildcards() {
    let mut w = World::new(11);
    let admin = w.client(1, session("admin"));
    let everything = w.client(2, session("everything"));
    w.subscribe(admin, "$SYS/broker/#", QoS::AtMostOnce);
    w.subscribe(everything, "#", QoS::AtMostOnce);
    let now = w.sim.now();
    w.sim.drive_to(now + Duration::from_secs(11));
    let topics: Vec<String> = w.messages(admin).into_iter().map(|(t, _, _)| t).collect();
    assert!(topics.contains(&"$SYS/broker/uptime".to_string()), "{topics:?}");
    assert!(topics.contains(&"$SYS/broker/clients/connected".to_string()));
    let connected = w.messages(admin).into_iter().find(|(t, _, _)| t == "$SYS/broker/clients/connected").unwrap().1;
    assert_eq!(connected, "2");
    assert!(w.messages(everything).is_empty(), "# does not match $SYS topics");
    assert!(w.broker().stats().bytes_received > 0);
}

/// mosquitto's `$SYS/broker/version` and load averages: after two publications with traffic
/// between them, the 1-minute average of messages received per minute is above zero (and
/// below what an instant rate would say: an exponential average starts from zero).
#[test]
fn sys_topics_carry_the_version_and_load_averages() {
    let mut w = World::new(13);
    let admin = w.client(1, session("admin"));
    let talker = w.client(2, session("talker"));
    w.subscribe(admin, "$SYS/broker/#", QoS::AtMostOnce);
    for i in 0..30 {
        w.publish(talker, "chatter", &format!("{i}"), QoS::AtMostOnce, false);
    }
    let now = w.sim.now();
    w.sim.drive_to(now + Duration::from_secs(21));
    let seen = w.messages(admin);
    let value =
        |topic: &str| seen.iter().rev().find(|(t, _, _)| t == topic).map(|(_, v, _)| v.clone()).unwrap_or_default();
    let version = value("$SYS/broker/version");
    assert!(version.starts_with("mqtt-quic version "), "{version}");
    let load: f64 = value("$SYS/broker/load/messages/received/1min").parse().unwrap();
    assert!(load > 0.0 && load < 30.0 * 6.0, "{load}");
    let slow: f64 = value("$SYS/broker/load/messages/received/15min").parse().unwrap();
    assert!(slow > 0.0 && slow < load, "15 min {slow} vs 1 min {load}");
}

#[test]
fn clients_may_not_publish_to_sys_topics() {
    let mut w = World::new(12);
    let rogue = w.client(1, session("rogue"));
    w.events(rogue).clear();
    w.publish(rogue, "$SYS/broker/uptime", "0 seconds", QoS::AtLeastOnce, true);
    assert!(w.run_until(|w| w.events(rogue).iter().any(|e| matches!(e, ClientEvent::Published { .. }))));
    let reason = w.events(rogue).iter().find_map(|e| match e {
        ClientEvent::Published { reason, .. } => Some(*reason),
        _ => None,
    });
    assert_eq!(reason, Some(ReasonCode::NotAuthorized));
    assert_eq!(w.broker().retained(), 0, "not retained either");
}

#[test]
fn subscription_and_topic_depth_limits_answer_with_their_codes() {
    let mut qc = ServerConfig::new(ServerTls::from_self_signed(cert()).unwrap());
    qc.seed = 13;
    let mut config = BrokerConfig::new(qc);
    config.max_subscriptions_per_client = 2;
    config.max_topic_levels = 3;
    let mut w = World { sim: Sim::new(13, Link::default()) };
    w.sim.add_host(broker_addr(), Node::Broker(Box::new(Broker::new(config).unwrap())));
    let c = w.client(1, session("c"));
    let now = w.sim.now();
    let subs: Vec<Subscription> = ["a", "b", "c", "a", "x/y/z/w"]
        .iter()
        .map(|f| Subscription { filter: TopicFilter::new(*f).unwrap(), options: SubscriptionOptions::default() })
        .collect();
    w.c(c).subscribe(now, subs, None).unwrap();
    assert!(w.run_until(|w| w.events(c).iter().any(|e| matches!(e, ClientEvent::Subscribed { .. }))));
    let codes = w.events(c).iter().find_map(|e| match e {
        ClientEvent::Subscribed { reason_codes, .. } => Some(reason_codes.clone()),
        _ => None,
    });
    assert_eq!(
        codes.unwrap(),
        [
            ReasonCode::Success,
            ReasonCode::Success,
            ReasonCode::QuotaExceeded,
            ReasonCode::Success, // a repeat of an existing subscription is not a new one
            ReasonCode::TopicFilterInvalid,
        ]
    );
    w.events(c).clear();
    w.publish(c, "1/2/3/4", "deep", QoS::AtLeastOnce, false);
    assert!(w.run_until(|w| w.events(c).iter().any(|e| matches!(e, ClientEvent::Published { .. }))));
    let reason = w.events(c).iter().find_map(|e| match e {
        ClientEvent::Published { reason, .. } => Some(*reason),
        _ => None,
    });
    assert_eq!(reason, Some(ReasonCode::TopicNameInvalid));
}

#[test]
fn passwords_and_acl_are_enforced() {
    use mqtt_quic_core::broker::auth::FileAuth;
    use std::num::NonZeroU32;
    use std::sync::Arc;
    let passwords = FileAuth::hash_password("alice", "s3cret", [1; 16], NonZeroU32::new(1000).unwrap());
    let auth = FileAuth::new(false)
        .with_passwords(&passwords)
        .unwrap()
        .with_acl("user alice\ntopic readwrite alice/#\ntopic read news/#\n")
        .unwrap();
    let mut qc = ServerConfig::new(ServerTls::from_self_signed(cert()).unwrap());
    qc.seed = 14;
    let mut config = BrokerConfig::new(qc);
    config.auth = Some(Arc::new(auth));
    let mut w = World { sim: Sim::new(14, Link::default()) };
    w.sim.add_host(broker_addr(), Node::Broker(Box::new(Broker::new(config).unwrap())));

    // A wrong password is refused with 0x86.
    let wrong = ClientSessionConfig {
        username: Some("alice".into()),
        password: Some(Bytes::from_static(b"nope")),
        ..session("x")
    };
    let mut qc = ClientConfig::new(ClientTls::insecure());
    qc.seed = 99;
    let client = ClientMachine::new(ClientMachineConfig {
        quic: qc,
        session: wrong,
        server: broker_addr(),
        server_name: "broker.test".into(),
        reconnect: None,
    })
    .unwrap();
    let intruder = w.sim.add_host("10.0.1.9:50009".parse().unwrap(), Node::client(client));
    let now = w.sim.now();
    w.c(intruder).start(now).unwrap();
    assert!(w.run_until(|w| w.events(intruder).iter().any(|e| matches!(e, ClientEvent::Refused { .. }))));
    assert!(w.events(intruder).contains(&ClientEvent::Refused { reason: ReasonCode::BadUserNameOrPassword }));

    // The right one gets in; the ACL decides the rest.
    let alice = w.client(
        2,
        ClientSessionConfig {
            username: Some("alice".into()),
            password: Some(Bytes::from_static(b"s3cret")),
            ..session("alice")
        },
    );
    let now = w.sim.now();
    let subs = ["alice/inbox", "news/today", "secrets/#"]
        .iter()
        .map(|f| Subscription { filter: TopicFilter::new(*f).unwrap(), options: SubscriptionOptions::default() })
        .collect();
    w.c(alice).subscribe(now, subs, None).unwrap();
    assert!(w.run_until(|w| w.events(alice).iter().any(|e| matches!(e, ClientEvent::Subscribed { .. }))));
    let codes = w.events(alice).iter().find_map(|e| match e {
        ClientEvent::Subscribed { reason_codes, .. } => Some(reason_codes.clone()),
        _ => None,
    });
    assert_eq!(codes.unwrap(), [ReasonCode::Success, ReasonCode::Success, ReasonCode::NotAuthorized]);
    w.events(alice).clear();
    w.publish(alice, "news/today", "not hers to write", QoS::AtLeastOnce, false);
    assert!(w.run_until(|w| w.events(alice).iter().any(|e| matches!(e, ClientEvent::Published { .. }))));
    let reason = w.events(alice).iter().find_map(|e| match e {
        ClientEvent::Published { reason, .. } => Some(*reason),
        _ => None,
    });
    assert_eq!(reason, Some(ReasonCode::NotAuthorized));
}

#[test]
fn shared_subscription_redelivers_when_a_member_leaves_unacknowledged() {
    let mut w = World::new(15);
    let m1 = w.client(1, session("m1"));
    let m2 = w.client(2, session("m2"));
    w.subscribe(m1, "$share/workers/jobs/#", QoS::AtLeastOnce);
    w.subscribe(m2, "$share/workers/jobs/#", QoS::AtLeastOnce);
    let p = w.client(3, session("p"));
    w.publish(p, "jobs/1", "build", QoS::AtLeastOnce, false);
    // The broker hands the job to m1 (first in the group); m1 vanishes before it arrives.
    assert!(w.run_until(|w| w.broker().stats().messages_sent >= 1));
    let now = w.sim.now();
    w.c(m1).drop_connection(now);
    assert!(w.run_until(|w| !w.messages(m2).is_empty()));
    assert_eq!(w.messages(m2), [("jobs/1".to_string(), "build".to_string(), false)]);
    assert!(w.messages(m1).is_empty());
}

/// [MQTT-4.8.2-4] [MQTT-4.8.2-5]: a QoS 2 message a shared-subscription member was sent stays
/// with that member when its connection drops: it is completed when the member comes back, and
/// never handed to another member.
#[test]
fn shared_subscription_keeps_an_unfinished_qos_2_message_with_its_member() {
    let mut w = World::new(17);
    let kept = |id: &str| ClientSessionConfig { client_id: id.into(), session_expiry: 60, ..Default::default() };
    let m1 = w.client(1, kept("m1"));
    let m2 = w.client(2, kept("m2"));
    w.subscribe(m1, "$share/workers/jobs/#", QoS::ExactlyOnce);
    w.subscribe(m2, "$share/workers/jobs/#", QoS::ExactlyOnce);
    let p = w.client(3, session("p"));
    w.publish(p, "jobs/1", "build", QoS::ExactlyOnce, false);
    assert!(w.run_until(|w| w.broker().stats().messages_sent >= 1));
    let now = w.sim.now();
    w.c(m1).drop_connection(now);
    for _ in 0..10 {
        w.settle();
    }
    assert!(w.messages(m2).is_empty(), "another member got the QoS 2 message: {:?}", w.messages(m2));
    w.start(m1);
    assert!(w.run_until(|w| !w.messages(m1).is_empty()));
    assert_eq!(w.messages(m1), [("jobs/1".to_string(), "build".to_string(), false)]);
    assert!(w.messages(m2).is_empty());
}

#[test]
fn a_full_retained_store_refuses_new_retained_messages_with_0x97() {
    let mut qc = ServerConfig::new(ServerTls::from_self_signed(cert()).unwrap());
    qc.seed = 16;
    let mut config = BrokerConfig::new(qc);
    config.max_retained = 1;
    config.sys_interval = None;
    let mut w = World { sim: Sim::new(16, Link::default()) };
    w.sim.add_host(broker_addr(), Node::Broker(Box::new(Broker::new(config).unwrap())));
    let c = w.client(1, session("c"));
    let reasons = |w: &mut World| -> Vec<ReasonCode> {
        w.events(c)
            .iter()
            .filter_map(|e| match e {
                ClientEvent::Published { reason, .. } => Some(*reason),
                _ => None,
            })
            .collect()
    };
    w.publish(c, "a", "1", QoS::AtLeastOnce, true);
    w.publish(c, "b", "1", QoS::AtLeastOnce, true);
    w.publish(c, "a", "2", QoS::AtLeastOnce, true);
    assert!(w.run_until(|w| reasons(w).len() == 3));
    assert_eq!(reasons(&mut w), [ReasonCode::Success, ReasonCode::QuotaExceeded, ReasonCode::Success]);
    assert_eq!(w.broker().retained(), 1);
}

#[test]
fn a_byte_stream_client_and_a_quic_client_share_the_broker() {
    use mqtt_quic_core::broker::machine::StreamOutput;
    use mqtt_quic_core::session::client::ClientSession;
    let mut w = World::new(17);
    let quic_sub = w.client(1, session("quic-sub"));
    w.subscribe(quic_sub, "plant/#", QoS::AtLeastOnce);

    // A "TCP" client: a client session whose bytes the test carries to and from the broker.
    let mut tcp = ClientSession::new(ClientSessionConfig { protocol: Protocol::V3_1_1, ..session("tcp-pub") }).unwrap();
    let now = w.sim.now();
    let stream = w.broker().handle_stream_open(now, None);
    tcp.connect(now).unwrap();
    let mut closed = false;
    let mut carry = |w: &mut World, tcp: &mut ClientSession| {
        let now = w.sim.now();
        while let Some(bytes) = tcp.poll_transmit() {
            w.broker().handle_stream_data(now, stream, &bytes);
        }
        while let Some((id, out)) = w.broker().poll_stream() {
            assert_eq!(id, stream);
            match out {
                StreamOutput::Data(bytes) => tcp.handle_stream_data(now, &bytes),
                StreamOutput::Close => closed = true,
                _ => {}
            }
        }
    };
    carry(&mut w, &mut tcp);
    carry(&mut w, &mut tcp);
    assert!(tcp.is_connected(), "CONNACK over the stream");
    let mut p = Publish::new(TopicName::new("plant/line1/speed").unwrap(), &b"42"[..]);
    p.qos_pid = QosPid::AtLeastOnce(PacketId::MIN);
    tcp.publish(now, p).unwrap();
    carry(&mut w, &mut tcp);
    assert!(w.run_until(|w| !w.messages(quic_sub).is_empty()));
    assert_eq!(w.messages(quic_sub)[0].1, "42");
    // And the other way: the QUIC client publishes, the stream client has subscribed.
    tcp.subscribe(
        w.sim.now(),
        vec![Subscription { filter: TopicFilter::new("alerts").unwrap(), options: SubscriptionOptions::default() }],
        None,
    )
    .unwrap();
    carry(&mut w, &mut tcp);
    w.publish(quic_sub, "alerts", "fire", QoS::AtMostOnce, false);
    let mut got = Vec::new();
    assert!(w.run_until(|w| {
        carry(w, &mut tcp);
        while let Some(e) = tcp.poll_event() {
            if let ClientEvent::Message(m) = e {
                got.push(m.payload.clone());
            }
        }
        !got.is_empty()
    }));
    assert_eq!(&got[0][..], b"fire");
    // Disconnecting closes the stream.
    tcp.disconnect(w.sim.now(), ReasonCode::NORMAL_DISCONNECTION).unwrap();
    carry(&mut w, &mut tcp);
    assert!(closed);
    assert!(!w.broker().has_session("tcp-pub"), "clean session gone after disconnect");
}

/// Sends `packets` to the broker over a byte stream and returns what it answers (decoded) and
/// whether it closed the stream.
fn exchange_over_stream(
    w: &mut World,
    protocol: Protocol,
    packets: &[mqtt_proto::Packet],
) -> (Vec<mqtt_proto::Packet>, bool) {
    use mqtt_quic_core::broker::machine::StreamOutput;
    let now = w.sim.now();
    let stream = w.broker().handle_stream_open(now, None);
    let mut bytes = bytes::BytesMut::new();
    for p in packets {
        p.encode(protocol, &mut bytes).unwrap();
    }
    w.broker().handle_stream_data(now, stream, &bytes);
    let mut answer = bytes::BytesMut::new();
    let mut closed = false;
    while let Some((id, out)) = w.broker().poll_stream() {
        assert_eq!(id, stream);
        match out {
            StreamOutput::Data(b) => answer.extend_from_slice(&b),
            StreamOutput::Close => closed = true,
            _ => {}
        }
    }
    let mut decoder = mqtt_proto::Decoder::new(protocol);
    (std::iter::from_fn(|| decoder.decode(&mut answer).unwrap()).collect(), closed)
}

/// Enhanced authentication is not offered: a CONNECT asking for it gets 0x8C and the connection
/// closes [MQTT-4.12.0-1]; AUTH on a connection that agreed no method is a Protocol Error.
#[test]
fn enhanced_authentication_is_refused_and_stray_auth_is_a_protocol_error() {
    use mqtt_proto::{Auth, Connect, MqttString, Packet};
    let mut w = World::new(18);
    let mut with_method = Connect::new(Protocol::V5, MqttString::from_static("scram"));
    with_method.properties.authentication_method = Some(MqttString::from_static("SCRAM-SHA-1"));
    let (answer, closed) = exchange_over_stream(&mut w, Protocol::V5, &[with_method.into()]);
    assert!(
        matches!(&answer[..], [Packet::ConnAck(a)] if a.reason_code == ReasonCode::BadAuthenticationMethod),
        "{answer:?}"
    );
    assert!(closed);
    assert!(!w.broker().has_session("scram"));

    let plain = Connect::new(Protocol::V5, MqttString::from_static("plain"));
    let (answer, closed) = exchange_over_stream(&mut w, Protocol::V5, &[plain.into(), Auth::default().into()]);
    assert!(
        matches!(&answer[..], [Packet::ConnAck(a), Packet::Disconnect(d)]
            if a.reason_code == ReasonCode::Success && d.reason_code == ReasonCode::ProtocolError),
        "{answer:?}"
    );
    assert!(closed);
}

/// [MQTT-3.1.3-6]: identifiers the broker assigns never collide with one a client chose.
#[test]
fn assigned_client_identifiers_are_unique() {
    use mqtt_proto::{Connect, MqttString, Packet};
    let mut w = World::new(19);
    // Registering this session uses up the broker's first internal number, so "auto-2" is the
    // identifier it would assign next.
    let mut taken = Connect::new(Protocol::V5, MqttString::from_static("auto-2"));
    taken.properties.session_expiry_interval = Some(60);
    let (answer, _) = exchange_over_stream(&mut w, Protocol::V5, &[taken.into()]);
    assert!(matches!(&answer[..], [Packet::ConnAck(a)] if a.reason_code == ReasonCode::Success));
    let anonymous = Connect::new(Protocol::V5, MqttString::from_static(""));
    let (answer, _) = exchange_over_stream(&mut w, Protocol::V5, &[anonymous.into()]);
    let Some(Packet::ConnAck(ack)) = answer.first() else { panic!("{answer:?}") };
    let assigned = ack.properties.assigned_client_identifier.as_ref().expect("an assigned identifier");
    assert_ne!(assigned.as_str(), "auto-2");
}

/// [MQTT-3.1.2-8]: when a second connection takes a client's session over, the first
/// connection's will is published if it has no delay, and cancelled if it has one.
#[test]
fn session_takeover_publishes_an_undelayed_will_and_cancels_a_delayed_one() {
    let mut w = World::new(20);
    let watcher = w.client(1, session("watcher"));
    w.subscribe(watcher, "clients/#", QoS::AtLeastOnce);
    let _first = w.client(2, delayed_will("now", 0));
    let _first_delayed = w.client(3, delayed_will("later", 5));
    let _second = w.client(4, session("now"));
    let _second_delayed = w.client(5, session("later"));
    for _ in 0..30 {
        w.settle();
    }
    assert_eq!(w.messages(watcher), [("clients/now".to_string(), "gone".to_string(), false)]);
}

/// A Session Expiry Interval above the broker's maximum is capped, and CONNACK says so.
#[test]
fn capped_session_expiry_is_announced_in_connack() {
    use mqtt_proto::{Connect, MqttString, Packet};
    let mut w = World::new(21);
    let mut c = Connect::new(Protocol::V5, MqttString::from_static("forever"));
    c.properties.session_expiry_interval = Some(u32::MAX - 1);
    let (answer, _) = exchange_over_stream(&mut w, Protocol::V5, &[c.into()]);
    let Some(Packet::ConnAck(ack)) = answer.first() else { panic!("{answer:?}") };
    assert_eq!(ack.properties.session_expiry_interval, Some(7 * 24 * 3600));
    let mut c = Connect::new(Protocol::V5, MqttString::from_static("hour"));
    c.properties.session_expiry_interval = Some(3600);
    let (answer, _) = exchange_over_stream(&mut w, Protocol::V5, &[c.into()]);
    let Some(Packet::ConnAck(ack)) = answer.first() else { panic!("{answer:?}") };
    assert_eq!(ack.properties.session_expiry_interval, None, "granted as asked: nothing to announce");
}
