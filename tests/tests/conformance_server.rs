//! Conformance tests of the broker and the sessions for MQTT 5.0 statements that bind the server
//! (see CONFORMANCE.md). Each test names the statements it checks.
//!
//! Most tests talk to the broker machine as raw MQTT clients over byte streams (the broker's
//! TCP path): the test encodes every packet it sends and decodes every packet the broker answers,
//! so flags, packet identifiers and properties are checked as they are on the wire. Time does not
//! pass unless a test says so, and nothing touches a socket: every run is the same.

use bytes::{Bytes, BytesMut};
use mqtt_proto::{
    Ack, ConnAck, Connect, Decoder, MqttString, Packet, PacketId, Protocol, Publish, QoS, QosPid, ReasonCode,
    RetainHandling, Subscribe, Subscription, SubscriptionOptions, TopicFilter, TopicName, UnsubAck, Unsubscribe,
    UserProperties, Will,
};
use mqtt_quic_core::broker::machine::{Broker, BrokerConfig, StreamId, StreamOutput};
use mqtt_quic_core::config::ServerConfig;
use mqtt_quic_core::session::client::{ClientEvent, ClientSession, ClientSessionConfig};
use mqtt_quic_core::session::server::{ServerEvent, ServerSession, ServerSessionConfig};
use mqtt_quic_core::tls::{SelfSigned, ServerTls};
use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Instant;

fn cert() -> &'static SelfSigned {
    static CERT: OnceLock<SelfSigned> = OnceLock::new();
    CERT.get_or_init(|| SelfSigned::generate(&["broker.test"]).unwrap())
}

/// The starting point of the tests' virtual time. Only differences from it matter, and no
/// test reads the clock again.
fn start() -> Instant {
    #[allow(clippy::disallowed_methods)]
    Instant::now()
}

/// What one raw client has received and not yet looked at.
#[derive(Default)]
struct Wire {
    buf: BytesMut,
    packets: Vec<Packet>,
    closed: bool,
}

/// A broker and the raw MQTT 5 clients connected to it over byte streams.
struct Bench {
    broker: Broker,
    now: Instant,
    wires: BTreeMap<StreamId, Wire>,
}

impl Bench {
    fn new() -> Bench {
        Bench::with(|_| {})
    }

    /// A broker with `tweak` applied to its configuration (no `$SYS` messages, so retained
    /// message counts are the test's own).
    fn with(tweak: impl FnOnce(&mut BrokerConfig)) -> Bench {
        let mut config = BrokerConfig::new(ServerConfig::new(ServerTls::from_self_signed(cert()).unwrap()));
        config.sys_interval = None;
        tweak(&mut config);
        Bench { broker: Broker::new(config).unwrap(), now: start(), wires: BTreeMap::new() }
    }

    fn open(&mut self) -> StreamId {
        let id = self.broker.handle_stream_open(self.now, None);
        self.wires.insert(id, Wire::default());
        id
    }

    fn send_bytes(&mut self, id: StreamId, bytes: &[u8]) {
        self.broker.handle_stream_data(self.now, id, bytes);
        self.collect();
    }

    fn send(&mut self, id: StreamId, packets: impl IntoIterator<Item = Packet>) {
        let mut bytes = BytesMut::new();
        for p in packets {
            p.encode(Protocol::V5, &mut bytes).unwrap();
        }
        self.send_bytes(id, &bytes);
    }

    /// Moves what the broker wrote to each stream into that stream's packets.
    fn collect(&mut self) {
        while let Some((id, out)) = self.broker.poll_stream() {
            let wire = self.wires.get_mut(&id).expect("a stream the test opened");
            match out {
                StreamOutput::Data(bytes) => {
                    self.broker.handle_stream_written(id, bytes.len());
                    wire.buf.extend_from_slice(&bytes);
                }
                StreamOutput::Close | StreamOutput::Abort => wire.closed = true,
                other => panic!("unexpected stream output {other:?}"),
            }
            let mut decoder = Decoder::new(Protocol::V5);
            while let Some(p) = decoder.decode(&mut wire.buf).unwrap() {
                wire.packets.push(p);
            }
        }
    }

    /// Everything the broker sent to `id` since the last call.
    fn take(&mut self, id: StreamId) -> Vec<Packet> {
        self.collect();
        std::mem::take(&mut self.wires.get_mut(&id).unwrap().packets)
    }

    fn is_closed(&mut self, id: StreamId) -> bool {
        self.collect();
        self.wires[&id].closed
    }

    /// The transport of `id` went away without a DISCONNECT.
    fn drop_stream(&mut self, id: StreamId) {
        self.broker.handle_stream_closed(self.now, id);
        self.collect();
    }

    /// Opens a stream, sends `connect` and returns the stream with the CONNACK.
    fn connect(&mut self, connect: Connect) -> (StreamId, ConnAck) {
        let (id, ack) = self.connect_answering(connect);
        assert_eq!(ack.reason_code, ReasonCode::Success);
        (id, ack)
    }

    /// Opens a stream, sends `connect` and returns the stream with the CONNACK, whatever its
    /// code; on a broker with `Auth`, the password check it hands out is answered at once.
    fn connect_answering(&mut self, connect: Connect) -> (StreamId, ConnAck) {
        let id = self.open();
        self.send(id, [connect.into()]);
        while let Some(r) = self.broker.poll_auth() {
            let verdict = r.verify();
            self.broker.handle_auth_result(self.now, r.id(), verdict);
        }
        let mut answer = self.take(id);
        assert!(!answer.is_empty(), "no CONNACK");
        let Packet::ConnAck(ack) = answer.remove(0) else { panic!("not a CONNACK first") };
        self.wires.get_mut(&id).unwrap().packets = answer;
        (id, *ack)
    }

    /// A connected client with a clean session that ends with the connection.
    fn client(&mut self, client_id: &str) -> StreamId {
        self.connect(connect(client_id)).0
    }

    /// Subscribes and returns the granted codes; what else arrived (retained messages) stays for
    /// [`Bench::take`].
    fn subscribe(&mut self, id: StreamId, packet_id: u16, subscriptions: Vec<Subscription>) -> Vec<ReasonCode> {
        let subscribe = Subscribe {
            packet_id: pid(packet_id),
            properties: Default::default(),
            subscriptions: subscriptions.into_iter().collect(),
        };
        self.send(id, [subscribe.into()]);
        let mut answer = self.take(id);
        let at = answer.iter().position(|p| matches!(p, Packet::SubAck(_))).expect("a SUBACK");
        let Packet::SubAck(ack) = answer.remove(at) else { unreachable!() };
        assert_eq!(ack.packet_id, pid(packet_id));
        self.wires.get_mut(&id).unwrap().packets = answer;
        ack.reason_codes.to_vec()
    }

    /// Publishes and returns the broker's answer to the publisher (PUBACK, PUBREC or nothing).
    fn publish(&mut self, id: StreamId, publish: Publish) -> Vec<Packet> {
        self.send(id, [publish.into()]);
        self.take(id)
    }
}

fn connect(client_id: &str) -> Connect {
    Connect::new(Protocol::V5, MqttString::try_from(client_id).unwrap())
}

/// A CONNECT asking to keep the session for a minute after the connection.
fn kept(client_id: &str, clean_start: bool) -> Connect {
    let mut c = connect(client_id);
    c.clean_start = clean_start;
    c.properties.session_expiry_interval = Some(60);
    c
}

fn pid(v: u16) -> PacketId {
    PacketId::new(v).unwrap()
}

fn topic(t: &str) -> TopicName {
    TopicName::new(t).unwrap()
}

fn sub(filter: &str, qos: QoS) -> Subscription {
    Subscription::new(TopicFilter::new(filter).unwrap(), qos)
}

fn sub_with(filter: &str, options: SubscriptionOptions) -> Subscription {
    Subscription { filter: TopicFilter::new(filter).unwrap(), options }
}

/// A message at `qos` (QoS 1 and 2 with packet identifier `id`).
fn message(t: &str, payload: &str, qos: QoS, id: u16, retain: bool) -> Publish {
    let mut p = Publish::new(topic(t), Bytes::copy_from_slice(payload.as_bytes()));
    p.qos_pid = QosPid::from_parts(qos, pid(id));
    p.retain = retain;
    p
}

fn publishes(packets: &[Packet]) -> Vec<Publish> {
    packets.iter().filter_map(|p| if let Packet::Publish(p) = p { Some(p.clone()) } else { None }).collect()
}

/// (topic, payload, retain) of every PUBLISH.
fn summary(packets: &[Packet]) -> Vec<(String, String, bool)> {
    publishes(packets)
        .into_iter()
        .map(|p| (p.topic.to_string(), String::from_utf8_lossy(&p.payload).into_owned(), p.retain))
        .collect()
}

fn entry(t: &str, payload: &str, retain: bool) -> (String, String, bool) {
    (t.to_string(), payload.to_string(), retain)
}

fn ack(v: u16) -> Ack {
    Ack::new(pid(v))
}

fn ack_with(v: u16, reason: ReasonCode) -> Ack {
    let mut a = Ack::new(pid(v));
    a.reason_code = reason;
    a
}

fn user_properties(pairs: &[(&str, &str)]) -> UserProperties {
    pairs.iter().map(|(k, v)| (MqttString::try_from(*k).unwrap(), MqttString::try_from(*v).unwrap())).collect()
}

/// [MQTT-3.3.1-12] [MQTT-3.3.1-13]: with Retain As Published 0 a forwarded message has RETAIN
/// 0 even when it was published retained; with 1 it keeps the RETAIN flag it was published with.
#[test]
fn retain_as_published_decides_the_forwarded_retain_flag() {
    let mut b = Bench::new();
    let cleared = b.client("cleared");
    let kept = b.client("kept");
    let publisher = b.client("publisher");
    b.subscribe(cleared, 1, vec![sub("news/#", QoS::AtMostOnce)]);
    let as_published = SubscriptionOptions { retain_as_published: true, ..Default::default() };
    b.subscribe(kept, 1, vec![sub_with("news/#", as_published)]);
    b.publish(publisher, message("news/a", "retained", QoS::AtMostOnce, 1, true));
    b.publish(publisher, message("news/b", "plain", QoS::AtMostOnce, 1, false));
    assert_eq!(summary(&b.take(cleared)), [entry("news/a", "retained", false), entry("news/b", "plain", false)]);
    assert_eq!(summary(&b.take(kept)), [entry("news/a", "retained", true), entry("news/b", "plain", false)]);
    assert_eq!(b.broker.retained(), 1, "the message was retained all the same");
}

/// [MQTT-3.3.1-10]: with Retain Handling 1 retained messages are sent when the subscription is
/// new, and not when it replaces an existing one.
#[test]
fn retain_handling_1_sends_retained_messages_only_for_a_new_subscription() {
    let mut b = Bench::new();
    let publisher = b.client("publisher");
    b.publish(publisher, message("room/1", "21.5", QoS::AtMostOnce, 1, true));
    let s = b.client("s");
    let if_new = SubscriptionOptions { retain_handling: RetainHandling::SendIfNew, ..Default::default() };
    b.subscribe(s, 1, vec![sub_with("room/+", if_new)]);
    assert_eq!(summary(&b.take(s)), [entry("room/1", "21.5", true)], "new subscription");
    b.subscribe(s, 2, vec![sub_with("room/+", if_new)]);
    assert_eq!(summary(&b.take(s)), [], "replaced subscription");
    // Another filter is another subscription, new again.
    b.subscribe(s, 3, vec![sub_with("room/#", if_new)]);
    assert_eq!(summary(&b.take(s)), [entry("room/1", "21.5", true)]);
}

/// [MQTT-3.3.1-11]: with Retain Handling 2 no retained message is sent, though the
/// subscription is made and live messages flow.
#[test]
fn retain_handling_2_sends_no_retained_messages() {
    let mut b = Bench::new();
    let publisher = b.client("publisher");
    b.publish(publisher, message("room/1", "21.5", QoS::AtMostOnce, 1, true));
    let s = b.client("s");
    let never = SubscriptionOptions { retain_handling: RetainHandling::DoNotSend, ..Default::default() };
    assert_eq!(b.subscribe(s, 1, vec![sub_with("room/+", never)]), [ReasonCode::Success]);
    assert_eq!(summary(&b.take(s)), []);
    b.publish(publisher, message("room/2", "19", QoS::AtMostOnce, 1, false));
    assert_eq!(summary(&b.take(s)), [entry("room/2", "19", false)]);
}

/// [MQTT-3.8.4-4]: a SUBSCRIBE that replaces an existing subscription with Retain Handling 0
/// sends the matching retained messages again, and the replaced subscription goes on without
/// losing or doubling a message.
#[test]
fn replacing_a_subscription_with_retain_handling_0_resends_retained_messages() {
    let mut b = Bench::new();
    let publisher = b.client("publisher");
    b.publish(publisher, message("door", "open", QoS::AtLeastOnce, 1, true));
    let s = b.client("s");
    assert_eq!(b.subscribe(s, 1, vec![sub("door", QoS::AtMostOnce)]), [ReasonCode::Success]);
    assert_eq!(summary(&b.take(s)), [entry("door", "open", true)]);
    // Replaced, now at QoS 1.
    assert_eq!(b.subscribe(s, 2, vec![sub("door", QoS::AtLeastOnce)]), [ReasonCode::GrantedQos1]);
    let again = b.take(s);
    assert_eq!(summary(&again), [entry("door", "open", true)]);
    assert_eq!(publishes(&again)[0].qos(), QoS::AtLeastOnce);
    b.send(s, [Packet::PubAck(ack(publishes(&again)[0].packet_id().unwrap().get()))]);
    b.publish(publisher, message("door", "closed", QoS::AtLeastOnce, 2, false));
    let live = b.take(s);
    assert_eq!(summary(&live), [entry("door", "closed", false)], "delivered once, by the replaced subscription");
    assert_eq!(publishes(&live)[0].qos(), QoS::AtLeastOnce);
}

/// [MQTT-3.3.1-8]: a PUBLISH with RETAIN 0 neither stores, replaces nor removes a retained
/// message, not even with an empty payload.
#[test]
fn publish_with_retain_0_leaves_the_retained_store_alone() {
    let mut b = Bench::new();
    let publisher = b.client("publisher");
    b.publish(publisher, message("state", "old", QoS::AtLeastOnce, 1, true));
    b.publish(publisher, message("state", "new", QoS::AtLeastOnce, 2, false));
    b.publish(publisher, message("state", "", QoS::AtLeastOnce, 3, false));
    b.publish(publisher, message("other", "x", QoS::AtLeastOnce, 4, false));
    assert_eq!(b.broker.retained(), 1);
    let late = b.client("late");
    b.subscribe(late, 1, vec![sub("#", QoS::AtLeastOnce)]);
    assert_eq!(summary(&b.take(late)), [entry("state", "old", true)]);
}

/// [MQTT-3.3.2-4] [MQTT-3.3.2-15] [MQTT-3.3.2-16] [MQTT-3.3.2-17] [MQTT-3.3.2-18]
/// [MQTT-3.3.2-20]: the Payload Format Indicator, Response Topic, Correlation Data, every User
/// Property (in order, repeated names included) and the Content Type reach the subscriber as
/// they were published.
#[test]
fn forwarded_messages_keep_their_properties() {
    let mut b = Bench::new();
    let s = b.client("s");
    b.subscribe(s, 1, vec![sub("rpc/#", QoS::ExactlyOnce)]);
    let publisher = b.client("publisher");
    let pairs = [("z", "1"), ("a", "2"), ("z", "0"), ("", "empty name"), ("m", "")];
    for (n, (qos, format)) in
        [(QoS::AtLeastOnce, true), (QoS::ExactlyOnce, false), (QoS::AtMostOnce, true)].into_iter().enumerate()
    {
        let mut p = message("rpc/request", "{\"op\":1}", qos, 1 + n as u16, false);
        let props = &mut *p.properties;
        props.payload_format_indicator = Some(format);
        props.response_topic = Some(topic("rpc/reply/42"));
        props.correlation_data = Some(Bytes::from_static(b"\x00\xFFcorr"));
        props.content_type = Some(MqttString::from_static("application/json; charset=utf-8"));
        props.user_properties = user_properties(&pairs);
        b.publish(publisher, p);
        let got = publishes(&b.take(s));
        assert_eq!(got.len(), 1);
        let got = &*got[0].properties;
        assert_eq!(got.payload_format_indicator, Some(format));
        assert_eq!(got.response_topic, Some(topic("rpc/reply/42")));
        assert_eq!(got.correlation_data.as_deref(), Some(&b"\x00\xFFcorr"[..]));
        assert_eq!(got.content_type.as_ref().map(|c| c.as_str()), Some("application/json; charset=utf-8"));
        assert_eq!(got.user_properties, user_properties(&pairs));
    }
}

/// A will on `topic` carrying `retain`, QoS 1, and these user properties.
fn will(t: &str, retain: bool, pairs: &[(&str, &str)]) -> Will {
    let mut will = Will {
        topic: topic(t),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain,
        properties: Default::default(),
    };
    if !pairs.is_empty() {
        will.properties.user_properties = user_properties(pairs);
    }
    will
}

/// [MQTT-3.1.3-10]: the will's User Properties are published in the order they were given.
#[test]
fn will_user_properties_keep_their_order() {
    let mut b = Bench::new();
    let watcher = b.client("watcher");
    b.subscribe(watcher, 1, vec![sub("wills/#", QoS::AtLeastOnce)]);
    let pairs = [("reason", "power"), ("at", "12:00"), ("reason", "battery"), ("a", "1")];
    let mut c = connect("device");
    c.will = Some(will("wills/device", false, &pairs));
    let (device, _) = b.connect(c);
    b.drop_stream(device);
    let got = publishes(&b.take(watcher));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].properties.user_properties, user_properties(&pairs));
}

/// [MQTT-3.1.2-14]: a will with Will Retain 0 is published as a non-retained message: a
/// subscriber that keeps the RETAIN flag as published sees 0, and nothing is retained.
#[test]
fn will_retain_0_is_published_unretained() {
    let mut b = Bench::new();
    let watcher = b.client("watcher");
    let as_published = SubscriptionOptions { qos: QoS::AtLeastOnce, retain_as_published: true, ..Default::default() };
    b.subscribe(watcher, 1, vec![sub_with("wills/#", as_published)]);
    let mut c = connect("device");
    c.will = Some(will("wills/device", false, &[]));
    let (device, _) = b.connect(c);
    b.drop_stream(device);
    assert_eq!(summary(&b.take(watcher)), [entry("wills/device", "gone", false)]);
    assert_eq!(b.broker.retained(), 0);
    let late = b.client("late");
    b.subscribe(late, 1, vec![sub("wills/#", QoS::AtLeastOnce)]);
    assert_eq!(summary(&b.take(late)), []);
}

/// [MQTT-3.1.2-15]: a will with Will Retain 1 is published as a retained message: kept for
/// later subscribers and forwarded with RETAIN 1 under Retain As Published.
#[test]
fn will_retain_1_is_published_retained() {
    let mut b = Bench::new();
    let watcher = b.client("watcher");
    let as_published = SubscriptionOptions { qos: QoS::AtLeastOnce, retain_as_published: true, ..Default::default() };
    b.subscribe(watcher, 1, vec![sub_with("wills/#", as_published)]);
    let mut c = connect("device");
    c.will = Some(will("wills/device", true, &[]));
    let (device, _) = b.connect(c);
    b.drop_stream(device);
    assert_eq!(summary(&b.take(watcher)), [entry("wills/device", "gone", true)]);
    assert_eq!(b.broker.retained(), 1);
    let late = b.client("late");
    b.subscribe(late, 1, vec![sub("wills/#", QoS::AtLeastOnce)]);
    assert_eq!(summary(&b.take(late)), [entry("wills/device", "gone", true)]);
}

/// [MQTT-3.10.4-4] [MQTT-3.10.4-5] [MQTT-3.10.4-6] [MQTT-3.11.3-1] [MQTT-3.11.3-2]
/// [MQTT-2.2.1-6]: an UNSUBSCRIBE with several filters gets one UNSUBACK with its packet
/// identifier and one Unsubscribe reason code per filter, in order: Success (0x00) for a
/// subscription that was removed, No subscription existed (0x11) otherwise, and an UNSUBSCRIBE
/// that deletes nothing is still answered.
#[test]
fn unsubscribe_is_answered_once_with_a_code_per_filter_in_order() {
    let mut b = Bench::new();
    let s = b.client("s");
    b.subscribe(s, 1, vec![sub("a", QoS::AtLeastOnce), sub("b/+", QoS::AtLeastOnce)]);
    let unsubscribe = |id: u16, filters: &[&str]| {
        Packet::Unsubscribe(Unsubscribe {
            packet_id: pid(id),
            properties: Default::default(),
            filters: filters.iter().map(|f| TopicFilter::new(*f).unwrap()).collect(),
        })
    };
    b.send(s, [unsubscribe(0x1234, &["b/+", "never/subscribed", "a"])]);
    let expected = UnsubAck {
        packet_id: pid(0x1234),
        properties: Default::default(),
        reason_codes: [ReasonCode::Success, ReasonCode::NoSubscriptionExisted, ReasonCode::Success]
            .into_iter()
            .collect(),
    };
    assert_eq!(b.take(s), [Packet::UnsubAck(expected)]);
    // Both subscriptions are gone.
    let publisher = b.client("publisher");
    b.publish(publisher, message("a", "1", QoS::AtMostOnce, 1, false));
    b.publish(publisher, message("b/c", "2", QoS::AtMostOnce, 1, false));
    assert_eq!(b.take(s), []);
    // Nothing left to delete: still one UNSUBACK with the same identifier.
    b.send(s, [unsubscribe(7, &["a"])]);
    let expected = UnsubAck {
        packet_id: pid(7),
        properties: Default::default(),
        reason_codes: [ReasonCode::NoSubscriptionExisted].into_iter().collect(),
    };
    assert_eq!(b.take(s), [Packet::UnsubAck(expected)]);
}

/// [MQTT-3.10.4-3]: QoS 1 and QoS 2 deliveries the server had started before an UNSUBSCRIBE are
/// completed: the QoS 2 handshake goes on (PUBREL, not "identifier not found"), and the QoS 1
/// message is sent again when the session resumes; new messages no longer come.
#[test]
fn unsubscribing_completes_deliveries_already_started() {
    let mut b = Bench::new();
    let (s, _) = b.connect(kept("s", true));
    b.subscribe(s, 1, vec![sub("one", QoS::AtLeastOnce), sub("two", QoS::ExactlyOnce)]);
    let publisher = b.client("publisher");
    b.publish(publisher, message("one", "q1", QoS::AtLeastOnce, 1, false));
    b.publish(publisher, message("two", "q2", QoS::ExactlyOnce, 2, false));
    let started = publishes(&b.take(s));
    assert_eq!(started.len(), 2);
    let (q1, q2) = (started[0].packet_id().unwrap().get(), started[1].packet_id().unwrap().get());
    let unsubscribe = Unsubscribe {
        packet_id: pid(2),
        properties: Default::default(),
        filters: [TopicFilter::new("one").unwrap(), TopicFilter::new("two").unwrap()].into_iter().collect(),
    };
    b.send(s, [unsubscribe.into()]);
    assert!(matches!(&b.take(s)[..], [Packet::UnsubAck(a)] if a.reason_codes[..] == [ReasonCode::Success; 2]));
    // QoS 2: the handshake completes.
    b.send(s, [Packet::PubRec(ack(q2))]);
    assert_eq!(b.take(s), [Packet::PubRel(ack(q2))]);
    b.send(s, [Packet::PubComp(ack(q2))]);
    assert_eq!(b.take(s), []);
    // QoS 1: still owed; it comes again (DUP) when the session resumes.
    b.drop_stream(s);
    let (s, connack) = b.connect(kept("s", false));
    assert!(connack.session_present);
    let resent = publishes(&b.take(s));
    assert_eq!(resent.len(), 1, "{resent:?}");
    assert_eq!((resent[0].packet_id().unwrap().get(), resent[0].dup, &resent[0].payload[..]), (q1, true, &b"q1"[..]));
    b.send(s, [Packet::PubAck(ack(q1))]);
    // The subscriptions are gone.
    b.publish(publisher, message("one", "later", QoS::AtLeastOnce, 3, false));
    assert_eq!(b.take(s), []);
}

/// [MQTT-3.1.2-4] [MQTT-3.1.4-4] [MQTT-3.2.2-2]: a CONNECT with Clean Start 1 discards the
/// session the server kept for that client (subscriptions and queued messages) and is
/// answered with Session Present 0.
#[test]
fn clean_start_discards_a_kept_session() {
    let mut b = Bench::new();
    let (s, connack) = b.connect(kept("s", false));
    assert!(!connack.session_present, "nothing kept yet");
    b.subscribe(s, 1, vec![sub("inbox", QoS::AtLeastOnce)]);
    b.send(s, [mqtt_proto::Disconnect::default().into()]);
    assert!(b.is_closed(s));
    assert!(b.broker.has_session("s"));
    let publisher = b.client("publisher");
    b.publish(publisher, message("inbox", "queued", QoS::AtLeastOnce, 1, false));

    let (s, connack) = b.connect(kept("s", true));
    assert!(!connack.session_present, "Clean Start 1 gets Session Present 0");
    assert_eq!(b.take(s), [], "the queued message went with the old session");
    b.publish(publisher, message("inbox", "live", QoS::AtLeastOnce, 2, false));
    assert_eq!(b.take(s), [], "and so did its subscription");

    // The new session is kept in its turn: resuming it now finds it.
    b.send(s, [mqtt_proto::Disconnect::default().into()]);
    let (s, connack) = b.connect(kept("s", false));
    assert!(connack.session_present);
    assert_eq!(b.take(s), []);
}

/// [MQTT-3.2.2-10]: a server whose Maximum QoS is 1 still accepts a SUBSCRIBE asking for QoS 2,
/// granting at most QoS 1, and delivers at that QoS.
#[test]
fn maximum_qos_1_server_accepts_a_qos_2_subscription() {
    let mut b = Bench::with(|c| c.session.maximum_qos = QoS::AtLeastOnce);
    let (s, connack) = b.connect(connect("s"));
    assert_eq!(connack.properties.maximum_qos, Some(QoS::AtLeastOnce));
    assert_eq!(b.subscribe(s, 1, vec![sub("t", QoS::ExactlyOnce)]), [ReasonCode::GrantedQos1]);
    let publisher = b.client("publisher");
    assert_eq!(b.publish(publisher, message("t", "x", QoS::AtLeastOnce, 1, false)), [Packet::PubAck(ack(1))]);
    let got = publishes(&b.take(s));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].qos(), QoS::AtLeastOnce);
}

/// [MQTT-3.3.1-3] [MQTT-4.3.3-2]: the DUP flag of what the server sends depends only on its
/// own retransmission: a first send has DUP 0 (QoS 1 and QoS 2) even when the publisher set
/// DUP, and a resend after the session resumes has DUP 1.
#[test]
fn outgoing_dup_depends_only_on_the_servers_own_resend() {
    let mut b = Bench::new();
    let (s, _) = b.connect(kept("s", true));
    b.subscribe(s, 1, vec![sub("t/#", QoS::ExactlyOnce)]);
    let publisher = b.client("publisher");
    let mut q2 = message("t/2", "two", QoS::ExactlyOnce, 5, false);
    q2.dup = true;
    let mut q1 = message("t/1", "one", QoS::AtLeastOnce, 6, false);
    q1.dup = true;
    assert_eq!(b.publish(publisher, q2), [Packet::PubRec(ack(5))]);
    assert_eq!(b.publish(publisher, q1), [Packet::PubAck(ack(6))]);
    let first = publishes(&b.take(s));
    assert_eq!(
        first.iter().map(|p| (p.qos(), p.dup)).collect::<Vec<_>>(),
        [(QoS::ExactlyOnce, false), (QoS::AtLeastOnce, false)]
    );
    // Unacknowledged, then the connection drops: the resumed session resends with DUP 1.
    b.drop_stream(s);
    let (s, _) = b.connect(kept("s", false));
    let again = publishes(&b.take(s));
    assert_eq!(
        again.iter().map(|p| (p.packet_id(), p.dup)).collect::<Vec<_>>(),
        [(first[0].packet_id(), true), (first[1].packet_id(), true)]
    );
}

/// [MQTT-4.3.2-5]: once the server has sent PUBACK, a QoS 1 PUBLISH with the same packet
/// identifier is a new message, DUP or not, and is forwarded again. The client session does the
/// same.
#[test]
fn a_qos_1_packet_identifier_reused_after_puback_is_a_new_message() {
    let mut b = Bench::new();
    let s = b.client("s");
    b.subscribe(s, 1, vec![sub("t", QoS::AtMostOnce)]);
    let publisher = b.client("publisher");
    assert_eq!(b.publish(publisher, message("t", "first", QoS::AtLeastOnce, 5, false)), [Packet::PubAck(ack(5))]);
    assert_eq!(b.publish(publisher, message("t", "second", QoS::AtLeastOnce, 5, false)), [Packet::PubAck(ack(5))]);
    let mut resent = message("t", "second", QoS::AtLeastOnce, 5, false);
    resent.dup = true;
    assert_eq!(b.publish(publisher, resent), [Packet::PubAck(ack(5))]);
    assert_eq!(
        summary(&b.take(s)),
        [entry("t", "first", false), entry("t", "second", false), entry("t", "second", false)]
    );

    // Client side.
    let (mut client, now) = connected_client(ClientSessionConfig::default());
    for payload in ["first", "second"] {
        client.handle_stream_data(now, &encode(&message("t", payload, QoS::AtLeastOnce, 5, false).into()));
        assert_eq!(transmitted(&mut client), [Packet::PubAck(ack(5))]);
    }
    let got: Vec<Bytes> = std::iter::from_fn(|| client.poll_event())
        .filter_map(|e| if let ClientEvent::Message(p) = e { Some(p.payload) } else { None })
        .collect();
    assert_eq!(got, [Bytes::from_static(b"first"), Bytes::from_static(b"second")]);
}

/// [MQTT-4.3.3-12]: once the server has sent PUBCOMP, a QoS 2 PUBLISH with the same packet
/// identifier is a new message and is forwarded again (before PUBREL, a resend is not). The
/// client session does the same.
#[test]
fn a_qos_2_packet_identifier_reused_after_pubcomp_is_a_new_message() {
    let mut b = Bench::new();
    let s = b.client("s");
    b.subscribe(s, 1, vec![sub("t", QoS::AtMostOnce)]);
    let publisher = b.client("publisher");
    assert_eq!(b.publish(publisher, message("t", "first", QoS::ExactlyOnce, 9, false)), [Packet::PubRec(ack(9))]);
    let mut resent = message("t", "first", QoS::ExactlyOnce, 9, false);
    resent.dup = true;
    assert_eq!(b.publish(publisher, resent), [Packet::PubRec(ack(9))]);
    b.send(publisher, [Packet::PubRel(ack(9))]);
    assert_eq!(b.take(publisher), [Packet::PubComp(ack(9))]);
    assert_eq!(b.publish(publisher, message("t", "second", QoS::ExactlyOnce, 9, false)), [Packet::PubRec(ack(9))]);
    b.send(publisher, [Packet::PubRel(ack(9))]);
    assert_eq!(b.take(publisher), [Packet::PubComp(ack(9))]);
    assert_eq!(summary(&b.take(s)), [entry("t", "first", false), entry("t", "second", false)]);

    // Client side.
    let (mut client, now) = connected_client(ClientSessionConfig::default());
    for payload in ["first", "second"] {
        client.handle_stream_data(now, &encode(&message("t", payload, QoS::ExactlyOnce, 9, false).into()));
        assert_eq!(transmitted(&mut client), [Packet::PubRec(ack(9))]);
        client.handle_stream_data(now, &encode(&Packet::PubRel(ack(9))));
        assert_eq!(transmitted(&mut client), [Packet::PubComp(ack(9))]);
    }
    let got: Vec<Bytes> = std::iter::from_fn(|| client.poll_event())
        .filter_map(|e| if let ClientEvent::Message(p) = e { Some(p.payload) } else { None })
        .collect();
    assert_eq!(got, [Bytes::from_static(b"first"), Bytes::from_static(b"second")]);
}

/// [MQTT-4.7.3-4]: topic matching compares the UTF-8 bytes as they are: no Unicode
/// normalisation (NFC "café" against NFD "café") and no case folding.
#[test]
fn topic_matching_does_not_normalise_characters() {
    let mut b = Bench::new();
    let composed = b.client("composed");
    let decomposed = b.client("decomposed");
    b.subscribe(composed, 1, vec![sub("menu/caf\u{e9}", QoS::AtMostOnce)]);
    b.subscribe(decomposed, 1, vec![sub("menu/cafe\u{301}/#", QoS::AtMostOnce)]);
    let publisher = b.client("publisher");
    b.publish(publisher, message("menu/cafe\u{301}", "nfd", QoS::AtMostOnce, 1, false));
    b.publish(publisher, message("menu/caf\u{e9}", "nfc", QoS::AtMostOnce, 1, false));
    b.publish(publisher, message("menu/CAF\u{c9}", "upper", QoS::AtMostOnce, 1, false));
    assert_eq!(summary(&b.take(composed)), [entry("menu/caf\u{e9}", "nfc", false)]);
    assert_eq!(summary(&b.take(decomposed)), [entry("menu/cafe\u{301}", "nfd", false)]);
}

/// [MQTT-4.8.2-3]: a message delivered through a shared subscription goes at the QoS granted to
/// the member that gets it, also when it is handed on because a member left without
/// acknowledging it.
#[test]
fn shared_delivery_respects_each_members_granted_qos() {
    let mut b = Bench::new();
    let low = b.client("low");
    let high = b.client("high");
    assert_eq!(b.subscribe(low, 1, vec![sub("$share/g/jobs/#", QoS::AtMostOnce)]), [ReasonCode::Success]);
    assert_eq!(b.subscribe(high, 1, vec![sub("$share/g/jobs/#", QoS::AtLeastOnce)]), [ReasonCode::GrantedQos1]);
    let publisher = b.client("publisher");
    for n in 1..=4u16 {
        b.publish(publisher, message(&format!("jobs/{n}"), "work", QoS::ExactlyOnce, n, false));
        b.send(publisher, [Packet::PubRel(ack(n))]);
    }
    let to_low = publishes(&b.take(low));
    let to_high = publishes(&b.take(high));
    assert_eq!(to_low.len(), 2, "round robin");
    assert_eq!(to_high.len(), 2, "round robin");
    assert!(to_low.iter().all(|p| p.qos() == QoS::AtMostOnce), "{to_low:?}");
    assert!(to_high.iter().all(|p| p.qos() == QoS::AtLeastOnce), "{to_high:?}");
    // "high" leaves with its messages unacknowledged: they go to "low", at QoS 0.
    b.drop_stream(high);
    let handed_on = publishes(&b.take(low));
    assert_eq!(
        handed_on.iter().map(|p| p.topic.to_string()).collect::<Vec<_>>(),
        to_high.iter().map(|p| p.topic.to_string()).collect::<Vec<_>>()
    );
    assert!(handed_on.iter().all(|p| p.qos() == QoS::AtMostOnce), "{handed_on:?}");
}

/// [MQTT-4.8.2-6]: when a member of a shared subscription answers a message with a failing
/// PUBACK or PUBREC, the message is discarded: it is not sent to another member, even when the
/// refusing member then leaves (while a message it left unacknowledged is handed on).
#[test]
fn a_failing_ack_from_a_shared_member_discards_the_message() {
    for qos in [QoS::AtLeastOnce, QoS::ExactlyOnce] {
        let mut b = Bench::new();
        let m1 = b.client("m1");
        let m2 = b.client("m2");
        b.subscribe(m1, 1, vec![sub("$share/g/jobs/#", qos)]);
        b.subscribe(m2, 1, vec![sub("$share/g/jobs/#", qos)]);
        let publisher = b.client("publisher");
        let mut next = 0u16;
        let mut publish = |b: &mut Bench, payload: &str| {
            next += 1;
            b.publish(publisher, message(&format!("jobs/{next}"), payload, qos, next, false));
            if qos == QoS::ExactlyOnce {
                b.send(publisher, [Packet::PubRel(ack(next))]);
            }
        };
        // Round robin: m1, m2, m1.
        publish(&mut b, "refused");
        let refused = publishes(&b.take(m1));
        assert_eq!(refused.len(), 1, "{qos:?}");
        let id = refused[0].packet_id().unwrap().get();
        let failure = ack_with(id, ReasonCode::UnspecifiedError);
        b.send(m1, [if qos == QoS::AtLeastOnce { Packet::PubAck(failure) } else { Packet::PubRec(failure) }]);
        assert_eq!(b.take(m1), [], "no PUBREL after a failing PUBREC");
        publish(&mut b, "done");
        let done = publishes(&b.take(m2));
        assert_eq!(done.len(), 1);
        let id = done[0].packet_id().unwrap().get();
        if qos == QoS::AtLeastOnce {
            b.send(m2, [Packet::PubAck(ack(id))]);
        } else {
            b.send(m2, [Packet::PubRec(ack(id))]);
            b.send(m2, [Packet::PubComp(ack(id))]);
        }
        publish(&mut b, "unanswered");
        assert_eq!(publishes(&b.take(m1)).len(), 1);
        b.drop_stream(m1);
        let handed_on = summary(&b.take(m2));
        if qos == QoS::AtLeastOnce {
            assert_eq!(handed_on, [entry("jobs/3", "unanswered", false)]);
        } else {
            // A QoS 2 message once sent stays with its member [MQTT-4.8.2-5].
            assert_eq!(handed_on, []);
        }
    }
}

/// [MQTT-3.3.4-10] [MQTT-4.9.0-3]: with the client's Receive Maximum used up by unacknowledged
/// QoS 1 messages, the server holds back further PUBLISHes but still answers PINGREQ,
/// SUBSCRIBE, UNSUBSCRIBE and the client's own PUBLISH at once.
#[test]
fn a_full_client_receive_maximum_holds_back_publishes_only() {
    let mut b = Bench::new();
    let mut c = connect("s");
    c.properties.receive_maximum = std::num::NonZeroU16::new(1);
    let (s, _) = b.connect(c);
    b.subscribe(s, 1, vec![sub("q", QoS::AtLeastOnce)]);
    let publisher = b.client("publisher");
    b.publish(publisher, message("q", "1", QoS::AtLeastOnce, 1, false));
    b.publish(publisher, message("q", "2", QoS::AtLeastOnce, 2, false));
    let first = b.take(s);
    assert_eq!(summary(&first), [entry("q", "1", false)]);
    let first = publishes(&first)[0].packet_id().unwrap();

    b.send(s, [Packet::PingReq]);
    assert_eq!(b.take(s), [Packet::PingResp]);
    assert_eq!(b.subscribe(s, 2, vec![sub("other", QoS::AtMostOnce)]), [ReasonCode::Success]);
    b.send(
        s,
        [Packet::Unsubscribe(Unsubscribe {
            packet_id: pid(3),
            properties: Default::default(),
            filters: [TopicFilter::new("other").unwrap()].into_iter().collect(),
        })],
    );
    assert!(matches!(&b.take(s)[..], [Packet::UnsubAck(a)] if a.packet_id == pid(3)));
    assert_eq!(b.publish(s, message("elsewhere", "x", QoS::AtLeastOnce, 4, false)), [Packet::PubAck(ack(4))]);
    assert!(!b.is_closed(s));

    // Acknowledging the first makes room for the second.
    b.send(s, [Packet::PubAck(Ack::new(first))]);
    assert_eq!(summary(&b.take(s)), [entry("q", "2", false)]);
}

/// [MQTT-3.14.1-1] [MQTT-3.15.1-1]: a DISCONNECT or AUTH whose reserved fixed-header flags are
/// not 0 is a Malformed Packet: the server answers DISCONNECT 0x81 and closes the connection.
#[test]
fn reserved_flags_on_disconnect_and_auth_close_with_malformed_packet() {
    for first in [0xE1u8, 0xE8, 0xEF, 0xF1, 0xF4, 0xFF] {
        let mut b = Bench::new();
        let s = b.client("s");
        b.send_bytes(s, &[first, 0]);
        let answer = b.take(s);
        assert!(
            matches!(&answer[..], [Packet::Disconnect(d)] if d.reason_code == ReasonCode::MalformedPacket),
            "{first:#04X}: {answer:?}"
        );
        assert!(b.is_closed(s), "{first:#04X}");
    }
}

fn encode(packet: &Packet) -> BytesMut {
    let mut out = BytesMut::new();
    packet.encode(Protocol::V5, &mut out).unwrap();
    out
}

/// Decodes what a client session wrote.
fn transmitted(client: &mut ClientSession) -> Vec<Packet> {
    let mut buf = BytesMut::new();
    while let Some(bytes) = client.poll_transmit() {
        buf.extend_from_slice(&bytes);
    }
    let mut decoder = Decoder::new(Protocol::V5);
    std::iter::from_fn(|| decoder.decode(&mut buf).unwrap()).collect()
}

/// A client session that sent CONNECT and was accepted with `connack` properties applied.
fn connected_client_with(config: ClientSessionConfig, connack: ConnAck) -> (ClientSession, Instant) {
    let now = start();
    let mut client = ClientSession::new(config).unwrap();
    client.connect(now).unwrap();
    assert!(matches!(&transmitted(&mut client)[..], [Packet::Connect(_)]));
    client.handle_stream_data(now, &encode(&connack.into()));
    assert!(client.is_connected());
    while client.poll_event().is_some() {}
    (client, now)
}

fn connected_client(config: ClientSessionConfig) -> (ClientSession, Instant) {
    connected_client_with(config, ConnAck::default())
}

/// A server session that accepted a plain MQTT 5 CONNECT.
fn accepted_server_session() -> (ServerSession, Instant) {
    let now = start();
    let mut server = ServerSession::new(now, ServerSessionConfig::default());
    server.handle_stream_data(now, &encode(&connect("c").into()));
    assert!(matches!(server.poll_event(), Some(ServerEvent::Connect(_))));
    server.accept(now, false, None).unwrap();
    while server.poll_transmit().is_some() {}
    (server, now)
}

fn server_transmitted(server: &mut ServerSession) -> Vec<Packet> {
    let mut buf = BytesMut::new();
    while let Some(bytes) = server.poll_transmit() {
        buf.extend_from_slice(&bytes);
    }
    let mut decoder = Decoder::new(Protocol::V5);
    std::iter::from_fn(|| decoder.decode(&mut buf).unwrap()).collect()
}

/// [MQTT-4.3.1-1] [MQTT-4.3.3-2]: both sessions send a QoS 0 message with DUP 0 and the first
/// send of a QoS 2 (and QoS 1) message with DUP 0, whatever `dup` the caller's Publish had. The
/// broker's own messages go the same way.
#[test]
fn sessions_send_first_deliveries_with_dup_0() {
    let dups = |packets: Vec<Packet>| publishes(&packets).into_iter().map(|p| (p.qos(), p.dup)).collect::<Vec<_>>();
    let expected = [(QoS::AtMostOnce, false), (QoS::AtLeastOnce, false), (QoS::ExactlyOnce, false)];
    let with_dup = |qos: QoS| {
        let mut p = message("t", "x", qos, 1, false);
        p.dup = true;
        p
    };

    let (mut server, now) = accepted_server_session();
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        server.publish(now, with_dup(qos)).unwrap();
    }
    assert_eq!(dups(server_transmitted(&mut server)), expected);

    let (mut client, now) = connected_client(ClientSessionConfig::default());
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        client.publish(now, with_dup(qos)).unwrap();
    }
    assert_eq!(dups(transmitted(&mut client)), expected);

    let mut b = Bench::new();
    let s = b.client("s");
    b.subscribe(s, 1, vec![sub("t", QoS::ExactlyOnce)]);
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        b.broker.publish_local(b.now, with_dup(qos)).unwrap();
    }
    assert_eq!(dups(b.take(s)), expected);
}

/// [MQTT-4.9.0-3] (client side) [MQTT-3.3.4-8]: with the server's Receive Maximum used up, the
/// client session holds back its next QoS 1 PUBLISH but still sends SUBSCRIBE and PINGREQ, and
/// still acknowledges the server's PUBLISH.
#[test]
fn a_client_with_no_send_quota_keeps_processing_other_packets() {
    let mut connack = ConnAck::default();
    connack.properties.receive_maximum = std::num::NonZeroU16::new(1);
    let config = ClientSessionConfig { keep_alive: 10, ..Default::default() };
    let (mut client, now) = connected_client_with(config, connack);
    client.publish(now, message("t", "1", QoS::AtLeastOnce, 1, false)).unwrap();
    client.publish(now, message("t", "2", QoS::AtLeastOnce, 1, false)).unwrap();
    let sent = transmitted(&mut client);
    assert_eq!(summary(&sent), [entry("t", "1", false)], "{sent:?}");
    let first = publishes(&sent)[0].packet_id().unwrap();

    client.subscribe(now, vec![sub("x", QoS::AtLeastOnce)], None).unwrap();
    assert!(matches!(&transmitted(&mut client)[..], [Packet::Subscribe(_)]));
    client.handle_stream_data(now, &encode(&message("in", "y", QoS::AtLeastOnce, 7, false).into()));
    assert_eq!(transmitted(&mut client), [Packet::PubAck(ack(7))]);
    let later = now + std::time::Duration::from_secs(10);
    client.handle_timeout(later);
    assert_eq!(transmitted(&mut client), [Packet::PingReq]);

    client.handle_stream_data(later, &encode(&Packet::PubAck(Ack::new(first))));
    assert_eq!(summary(&transmitted(&mut client)), [entry("t", "2", false)]);
}

// Limits a broker exposed to the internet keeps (issue 17: hardening). Not spec statements, but
// the same harness: each test shows the limit holding and the broker still serving.

/// An MQTT 3.1.1 persistent session has no expiry of its own: the broker's maximum applies, so
/// a client that never returns does not hold its session (and queue) for ever.
#[test]
fn a_311_persistent_session_expires_at_the_broker_maximum() {
    let mut b = Bench::with(|c| c.max_session_expiry = 10);
    let mut c = Connect::new(Protocol::V3_1_1, MqttString::try_from("old").unwrap());
    c.clean_start = false;
    // Raw broker calls: the bench decodes what it reads as MQTT 5.
    let id = b.broker.handle_stream_open(b.now, None);
    let mut bytes = BytesMut::new();
    Packet::from(c).encode(Protocol::V3_1_1, &mut bytes).unwrap();
    b.broker.handle_stream_data(b.now, id, &bytes);
    let connack = b.broker.poll_stream();
    assert_eq!(connack, Some((id, StreamOutput::Data(Bytes::from_static(&[0x20, 2, 0, 0])))));
    b.broker.handle_stream_closed(b.now, id);
    assert!(b.broker.has_session("old"));
    b.now += std::time::Duration::from_secs(11);
    mqtt_quic_core::Machine::handle_timeout(&mut b.broker, b.now);
    assert!(!b.broker.has_session("old"));
}

/// Messages queued for offline clients count against one byte budget; beyond it they are
/// dropped (and counted), the earlier ones kept.
#[test]
fn offline_queues_share_a_byte_budget() {
    // One 50-byte message to `t` costs 1 + 50 + 64 = 115: two fit in 300, a third does not.
    let mut b = Bench::with(|c| c.max_offline_bytes = 300);
    let (s, _) = b.connect(kept("sleeper", true));
    b.subscribe(s, 1, vec![sub("t", QoS::AtLeastOnce)]);
    b.drop_stream(s);
    let p = b.client("p");
    let payload = "x".repeat(50);
    for i in 1..=5 {
        b.publish(p, message("t", &payload, QoS::AtLeastOnce, i, false));
    }
    assert_eq!(b.broker.stats().messages_dropped, 3);
    let (s, ack) = b.connect(kept("sleeper", false));
    assert!(ack.session_present);
    assert_eq!(publishes(&b.take(s)).len(), 2);
}

/// A retained message beyond the store's byte budget is refused with Quota exceeded; the store
/// keeps what it had.
#[test]
fn the_retained_store_has_a_byte_budget() {
    let mut b = Bench::with(|c| c.max_retained_bytes = 1000);
    let p = b.client("p");
    assert_eq!(b.publish(p, message("r/1", &"x".repeat(500), QoS::AtLeastOnce, 1, true)), [Packet::PubAck(ack(1))]);
    let answer = b.publish(p, message("r/2", &"x".repeat(600), QoS::AtLeastOnce, 2, true));
    let Packet::PubAck(refused) = &answer[0] else { panic!("{answer:?}") };
    assert_eq!(refused.reason_code, ReasonCode::QuotaExceeded);
    assert_eq!(b.broker.retained(), 1);
}

/// In-process publishes meet the same topic limits as clients' (and so does what they retain).
#[test]
fn in_process_publishes_are_bounded_like_clients() {
    let mut b = Bench::new();
    let deep = TopicName::new("a/".repeat(40) + "b").unwrap();
    let mut p = Publish::new(deep, Bytes::from_static(b"x"));
    p.retain = true;
    assert_eq!(b.broker.publish_local(b.now, p), Err(ReasonCode::TopicNameInvalid));
    assert_eq!(b.broker.retained(), 0);
    let long = TopicName::new("x".repeat(5000)).unwrap();
    assert_eq!(b.broker.publish_local(b.now, Publish::new(long, Bytes::new())), Err(ReasonCode::TopicNameInvalid));
}

/// Password checks are handed out, never run on the broker's loop; at most `max_pending_auth`
/// wait at once (more CONNECTs get Server busy), and a verdict for a connection that left in the
/// meantime lands nowhere.
#[test]
fn password_checks_are_handed_out_and_bounded() {
    use mqtt_quic_core::broker::auth::FileAuth;
    use std::num::NonZeroU32;
    let entry = FileAuth::hash_password("alice", "pw", [3; 16], NonZeroU32::new(1000).unwrap());
    let auth = FileAuth::new(false).with_passwords(&entry).unwrap();
    let mut b = Bench::with(|c| {
        c.auth = Some(std::sync::Arc::new(auth));
        c.max_pending_auth = 1;
    });
    let login = |id: &str| {
        let mut c = connect(id);
        c.username = Some(MqttString::try_from("alice").unwrap());
        c.password = Some(Bytes::from_static(b"pw"));
        c
    };
    let first = b.open();
    b.send(first, [login("one").into()]);
    assert!(b.take(first).is_empty(), "waits for the verdict");
    let request = b.broker.poll_auth().expect("a password check handed out");
    assert_eq!(request.username(), Some("alice"));
    let second = b.open();
    b.send(second, [login("two").into()]);
    let Packet::ConnAck(busy) = &b.take(second)[0] else { panic!("no CONNACK") };
    assert_eq!(busy.reason_code, ReasonCode::ServerBusy);
    let verdict = request.verify();
    b.broker.handle_auth_result(b.now, request.id(), verdict);
    let Packet::ConnAck(ok) = &b.take(first)[0] else { panic!("no CONNACK") };
    assert_eq!(ok.reason_code, ReasonCode::Success);

    // A connection that goes while its check runs: the verdict is dropped.
    let third = b.open();
    b.send(third, [login("three").into()]);
    let request = b.broker.poll_auth().expect("a password check handed out");
    b.drop_stream(third);
    b.broker.handle_auth_result(b.now, request.id(), Ok(()));
    assert!(!b.broker.has_session("three"));
    assert!(b.broker.poll_auth().is_none());
}

/// The retained messages a SUBSCRIBE brings go through the client's backlog limit like live
/// traffic: QoS 0 ones beyond it are dropped (and counted), and the client keeps its
/// connection instead of being cut off for a backlog four times the limit.
#[test]
fn retained_messages_at_subscribe_respect_the_backlog_limit() {
    let mut b = Bench::with(|c| {
        c.max_queued_bytes = 10_000;
        c.max_retained = 1000;
    });
    let p = b.client("p");
    for i in 0..100 {
        b.publish(p, message(&format!("r/{i}"), &"x".repeat(1000), QoS::AtMostOnce, 1, true));
    }
    assert_eq!(b.broker.retained(), 100);
    let s = b.client("s");
    b.subscribe(s, 1, vec![sub("r/#", QoS::AtMostOnce)]);
    let got = publishes(&b.take(s)).len();
    assert!((10..=12).contains(&got), "{got} retained messages sent");
    assert_eq!(b.broker.stats().messages_dropped, 100 - got as u64);
    assert!(!b.is_closed(s));
    // Counted for the client too: its disconnection says how many it lost.
    while b.broker.poll_event().is_some() {}
    b.drop_stream(s);
    let dropped = std::iter::from_fn(|| b.broker.poll_event()).find_map(|e| match e {
        mqtt_quic_core::broker::machine::BrokerEvent::ClientDisconnected { dropped, .. } => Some(dropped),
        _ => None,
    });
    assert_eq!(dropped, Some(100 - got as u64));
}

/// Read rights are asked again when a session resumes: messages queued while the client was
/// away, under rights it has lost since, are not sent (an `Auth` whose answers change, as one
/// backed by a directory would).
#[test]
fn a_resumed_session_gets_nothing_it_may_no_longer_read() {
    use mqtt_quic_core::broker::auth::Auth;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    #[derive(Debug, Default)]
    struct Switch(AtomicBool);
    impl Auth for Switch {
        fn connect(&self, _: &str, _: Option<&str>, _: Option<&[u8]>) -> Result<(), ReasonCode> {
            Ok(())
        }
        fn can_publish(&self, _: &str, _: Option<&str>, _: &TopicName) -> bool {
            true
        }
        fn can_subscribe(&self, _: &str, _: Option<&str>, _: &TopicFilter) -> bool {
            true
        }
        fn can_read(&self, _: &str, _: Option<&str>, _: &TopicName) -> bool {
            !self.0.load(Ordering::Relaxed)
        }
    }
    let revoked = Arc::new(Switch::default());
    let mut b = Bench::with(|c| c.auth = Some(revoked.clone()));
    let (s, _) = b.connect_answering(kept("reader", true));
    b.subscribe(s, 1, vec![sub("news", QoS::AtLeastOnce)]);
    b.drop_stream(s);
    let (p, _) = b.connect_answering(connect("p"));
    b.publish(p, message("news", "1", QoS::AtLeastOnce, 1, false));
    b.publish(p, message("news", "2", QoS::AtLeastOnce, 2, false));
    revoked.0.store(true, Ordering::Relaxed);
    let (s, ack) = b.connect_answering(kept("reader", false));
    assert!(ack.session_present);
    assert!(publishes(&b.take(s)).is_empty());
    assert_eq!(b.broker.stats().messages_denied, 2);
}

fn login(client_id: &str, user: &str, password: &'static str) -> Connect {
    let mut c = connect(client_id);
    c.username = Some(MqttString::try_from(user).unwrap());
    c.password = Some(Bytes::from_static(password.as_bytes()));
    c
}

fn file_auth(users: &[&str], acl: &str) -> std::sync::Arc<mqtt_quic_core::broker::auth::FileAuth> {
    use mqtt_quic_core::broker::auth::FileAuth;
    let rounds = std::num::NonZeroU32::new(1000).unwrap();
    let entries: String = users.iter().map(|u| FileAuth::hash_password(u, "pw", [4; 16], rounds) + "\n").collect();
    std::sync::Arc::new(FileAuth::new(false).with_passwords(&entries).unwrap().with_acl(acl).unwrap())
}

/// A shared subscription group picks among the members that may read the topic: a member whose
/// rights exclude it (a `deny` under a wider grant) does not swallow the group's message.
#[test]
fn a_shared_group_skips_members_that_may_not_read_the_topic() {
    let acl = "user a\ntopic read #\ntopic deny secret/#\nuser b\ntopic read #\nuser p\ntopic write #\n";
    let mut b = Bench::with(|c| c.auth = Some(file_auth(&["a", "b", "p"], acl)));
    let (a, _) = b.connect_answering(login("a", "a", "pw"));
    let (bb, _) = b.connect_answering(login("b", "b", "pw"));
    b.subscribe(a, 1, vec![sub("$share/g/#", QoS::AtMostOnce)]);
    b.subscribe(bb, 1, vec![sub("$share/g/#", QoS::AtMostOnce)]);
    let (p, _) = b.connect_answering(login("p", "p", "pw"));
    for i in 0..4 {
        b.publish(p, message("secret/x", &i.to_string(), QoS::AtMostOnce, 1, false));
    }
    assert!(publishes(&b.take(a)).is_empty());
    assert_eq!(publishes(&b.take(bb)).len(), 4, "every secret message reached the member that may read it");
    assert_eq!(b.broker.stats().messages_denied, 0);
}

/// A client that sends CONNECT with a wrong password and leaves at once still counts a failure
/// for its address, and its check still holds its slot until the verdict comes: dropping the
/// connection does not make guessing free or unbounded.
#[test]
fn abandoned_password_checks_still_count() {
    let mut b = Bench::with(|c| {
        c.auth = Some(file_auth(&["u"], "topic read #\n"));
        c.max_auth_failures = 1;
        c.max_pending_auth = 1;
    });
    let from: std::net::SocketAddr = "192.0.2.7:40000".parse().unwrap();
    let guess = b.broker.handle_stream_open(b.now, Some(from));
    b.wires.insert(guess, Wire::default());
    b.send(guess, [login("g", "u", "wrong").into()]);
    let request = b.broker.poll_auth().expect("a check handed out");
    b.drop_stream(guess);
    // The slot is still taken: another client is told the server is busy.
    let other = b.broker.handle_stream_open(b.now, Some("198.51.100.1:1".parse().unwrap()));
    b.wires.insert(other, Wire::default());
    b.send(other, [login("o", "u", "pw").into()]);
    let Packet::ConnAck(busy) = &b.take(other)[0] else { panic!("no CONNACK") };
    assert_eq!(busy.reason_code, ReasonCode::ServerBusy);
    let verdict = request.verify();
    b.broker.handle_auth_result(b.now, request.id(), verdict);
    // The failure counted for the address that left: its next CONNECT is refused unchecked.
    let again = b.broker.handle_stream_open(b.now, Some(from));
    b.wires.insert(again, Wire::default());
    b.send(again, [login("g", "u", "pw").into()]);
    let Packet::ConnAck(limited) = &b.take(again)[0] else { panic!("no CONNACK") };
    assert_eq!(limited.reason_code, ReasonCode::ConnectionRateExceeded);
    assert!(b.broker.poll_auth().is_none());
}

/// AUTH sent while the broker checks the CONNECT's password breaks the protocol (no
/// authentication method was agreed): the CONNECT is refused with Protocol error.
#[test]
fn auth_during_the_password_check_is_a_protocol_error() {
    let mut b = Bench::with(|c| c.auth = Some(file_auth(&["u"], "topic read #\n")));
    let id = b.open();
    b.send(id, [login("c", "u", "pw").into(), Packet::Auth(Default::default())]);
    let Packet::ConnAck(refused) = &b.take(id)[0] else { panic!("no CONNACK") };
    assert_eq!(refused.reason_code, ReasonCode::ProtocolError);
    assert!(b.is_closed(id));
    // Its check, answered later, lands nowhere.
    let request = b.broker.poll_auth().expect("the check was handed out");
    b.broker.handle_auth_result(b.now, request.id(), Ok(()));
    assert!(!b.broker.has_session("c"));
}

/// A SUBSCRIBE brings at most as many retained messages as the session can queue; collecting
/// more would cost memory for messages that are dropped anyway.
#[test]
fn retained_messages_per_subscribe_are_capped_at_the_session_queue() {
    let mut b = Bench::with(|c| {
        c.session.max_queued = 5;
        c.session.max_inflight = 1;
    });
    let p = b.client("p");
    for i in 0..20 {
        b.publish(p, message(&format!("r/{i:02}"), "v", QoS::AtLeastOnce, 1, true));
    }
    let s = b.client("s");
    b.subscribe(s, 1, vec![sub("r/#", QoS::AtLeastOnce), sub("r/+", QoS::AtLeastOnce)]);
    // One in flight at a time (the window); the rest wait in the queue for acknowledgements.
    let mut received = 0;
    for _ in 0..40 {
        let got = publishes(&b.take(s));
        if got.is_empty() {
            break;
        }
        received += got.len();
        let acks: Vec<Packet> = got.iter().map(|m| Packet::PubAck(Ack::new(m.packet_id().unwrap()))).collect();
        b.send(s, acks);
    }
    assert_eq!(received, 5, "retained messages for a session queue of 5 (20 match)");
}

/// 3.14.2.2.2: a Session Expiry Interval in the client's DISCONNECT replaces the one from
/// CONNECT; 0 there ends the session with the connection.
#[test]
fn the_session_expiry_of_disconnect_replaces_the_connects() {
    let mut b = Bench::new();
    let (c, _) = b.connect(kept("shorter", true));
    let mut d = mqtt_proto::Disconnect::new(ReasonCode::Success);
    d.properties.session_expiry_interval = Some(5);
    b.send(c, [d.into()]);
    assert!(b.is_closed(c));
    b.now += std::time::Duration::from_secs(4);
    mqtt_quic_core::Machine::handle_timeout(&mut b.broker, b.now);
    assert!(b.broker.has_session("shorter"), "kept for the 5 s DISCONNECT asked for");
    b.now += std::time::Duration::from_secs(2);
    mqtt_quic_core::Machine::handle_timeout(&mut b.broker, b.now);
    assert!(!b.broker.has_session("shorter"), "not for the 60 s of CONNECT");

    let (c, _) = b.connect(kept("none", true));
    let mut d = mqtt_proto::Disconnect::new(ReasonCode::Success);
    d.properties.session_expiry_interval = Some(0);
    b.send(c, [d.into()]);
    assert!(!b.broker.has_session("none"));
}

/// 3.14.2.2.2: a session that was to end with the connection (Session Expiry Interval 0 at
/// CONNECT) cannot be given a life at DISCONNECT: that DISCONNECT is a Protocol Error.
#[test]
fn a_disconnect_cannot_extend_a_session_that_had_no_expiry() {
    let mut b = Bench::new();
    let c = b.client("brief");
    let mut d = mqtt_proto::Disconnect::new(ReasonCode::Success);
    d.properties.session_expiry_interval = Some(30);
    b.send(c, [d.into()]);
    assert_eq!(b.take(c), [Packet::Disconnect(mqtt_proto::Disconnect::new(ReasonCode::ProtocolError))]);
    assert!(b.is_closed(c));
    assert!(!b.broker.has_session("brief"));
}

/// 3.8.3.1: SUBSCRIBE options with Maximum QoS 3 or Retain Handling 3 are Protocol Errors
/// (DISCONNECT 0x82), reserved bits make the packet malformed (0x81) [MQTT-3.8.3-5].
#[test]
fn subscribe_options_out_of_range_are_protocol_errors() {
    for (options, code) in
        [(0x03, ReasonCode::ProtocolError), (0x30, ReasonCode::ProtocolError), (0x40, ReasonCode::MalformedPacket)]
    {
        let mut b = Bench::new();
        let c = b.client("s");
        // SUBSCRIBE, packet id 1, no properties, filter "a", the options byte.
        b.send_bytes(c, &[0x82, 7, 0, 1, 0, 0, 1, b'a', options]);
        assert_eq!(b.take(c), [Packet::Disconnect(mqtt_proto::Disconnect::new(code))], "options 0x{options:02x}");
        assert!(b.is_closed(c));
    }
}

/// The broker reports each client's connection, refusal and end as events, for the adapter's
/// log (issue 18: one greppable line each).
#[test]
fn lifecycle_events_report_connects_refusals_and_ends() {
    use mqtt_quic_core::broker::machine::BrokerEvent;
    use mqtt_quic_core::session::server::EndReason;
    let mut b = Bench::with(|c| c.auth = Some(file_auth(&["u"], "topic readwrite #\n")));
    let events = |b: &mut Bench| std::iter::from_fn(|| b.broker.poll_event()).collect::<Vec<_>>();
    let (c, _) = b.connect_answering(login("dev", "u", "pw"));
    assert!(matches!(
        &events(&mut b)[..],
        [BrokerEvent::ClientConnected { client_id, username: Some(u), session_present: false, .. }] if client_id == "dev" && u == "u"
    ));
    let refused = b.open();
    b.send(refused, [login("intruder", "u", "guess").into()]);
    while let Some(r) = b.broker.poll_auth() {
        let verdict = r.verify();
        b.broker.handle_auth_result(b.now, r.id(), verdict);
    }
    assert!(matches!(
        &events(&mut b)[..],
        [BrokerEvent::ClientRefused { client_id, reason: ReasonCode::BadUserNameOrPassword, .. }] if client_id == "intruder"
    ));
    // A takeover ends the first connection, a dropped transport the second.
    let (second, _) = b.connect_answering(login("dev", "u", "pw"));
    let got = events(&mut b);
    assert!(
        got.iter().any(|e| matches!(
            e,
            BrokerEvent::ClientDisconnected { reason: EndReason::Server(ReasonCode::SessionTakenOver), .. }
        )),
        "{got:?}"
    );
    assert!(got.iter().any(|e| matches!(e, BrokerEvent::ClientConnected { .. })), "{got:?}");
    let _ = c;
    b.drop_stream(second);
    assert!(matches!(
        &events(&mut b)[..],
        [BrokerEvent::ClientDisconnected { reason: EndReason::TransportLost, detail: Some(_), .. }]
    ));
}

/// The broker uses topic aliases towards a client that accepts them: the first message on a
/// topic carries the topic and an alias, the next ones only the alias; a client that accepts
/// none gets every topic in full. Prints the bytes either client received (BENCHMARKS.md,
/// "Topic aliases towards subscribers").
#[test]
fn the_broker_aliases_topics_towards_clients_that_accept_them() {
    let mut b = Bench::new();
    let mut with = connect("with-aliases");
    with.properties.topic_alias_maximum = Some(4);
    let (aliased, _) = b.connect(with);
    let plain = b.client("without");
    b.subscribe(aliased, 1, vec![sub("fleet/#", QoS::AtMostOnce)]);
    b.subscribe(plain, 1, vec![sub("fleet/#", QoS::AtMostOnce)]);
    let p = b.client("p");
    let topic = "fleet/region-eu-west/site-0042/building-7/floor-3/sensor/temperature";
    for i in 0..100 {
        b.publish(p, message(topic, &format!("{:016}", i), QoS::AtMostOnce, 1, false));
    }
    let size = |packets: &[Packet]| packets.iter().map(|p| p.encoded_len(Protocol::V5).unwrap()).sum::<usize>();
    let (got, full) = (b.take(aliased), b.take(plain));
    let got_publishes = publishes(&got);
    assert_eq!(got_publishes.len(), 100);
    assert_eq!(got_publishes[0].topic.as_str(), topic);
    assert!(got_publishes[1..]
        .iter()
        .all(|m| m.topic.is_empty() && m.properties.topic_alias == got_publishes[0].properties.topic_alias));
    assert!(publishes(&full).iter().all(|m| m.topic.as_str() == topic && m.properties.topic_alias.is_none()));
    let (aliased_bytes, plain_bytes) = (size(&got), size(&full));
    eprintln!(
        "100 messages of 16 B on a {}-byte topic: {plain_bytes} B without aliases, {aliased_bytes} B with ({:.0}% saved)",
        topic.len(),
        100.0 * (plain_bytes - aliased_bytes) as f64 / plain_bytes as f64
    );
    assert!(aliased_bytes * 2 < plain_bytes);
}
