//! The server session's tests.

use super::Harness;
use crate::session::server::*;
use bytes::{Bytes, BytesMut};
use mqtt_proto::*;
use mqtt_proto::{Subscribe, SubscriptionOptions};
use std::num::NonZeroU16;
use std::time::{Duration, Instant};

type H = Harness<ServerSession>;

impl Harness<ServerSession> {
    fn new(config: ServerSessionConfig) -> H {
        Harness::with(Protocol::V5, |now| ServerSession::new(now, config))
    }

    /// Connected with `connect`, accepted.
    fn connected(config: ServerSessionConfig, connect: Connect) -> H {
        let mut h = H::new(config);
        h.set_protocol(connect.protocol);
        h.feed(connect.into());
        assert!(matches!(h.events()[..], [ServerEvent::Connect(_)]));
        h.session.accept(h.now, false, None).unwrap();
        assert!(matches!(h.sent()[..], [Packet::ConnAck(_)]));
        h
    }

    fn v5() -> H {
        H::connected(ServerSessionConfig::default(), connect(Protocol::V5))
    }
}

fn connect(protocol: Protocol) -> Connect {
    let mut c = Connect::new(protocol, MqttString::from_static("dev"));
    c.keep_alive = 10;
    c
}

fn publish(topic: &str, qos: QoS, id: u16) -> Publish {
    let mut p = Publish::new(TopicName::new(topic).unwrap(), &b"m"[..]);
    p.qos_pid = QosPid::from_parts(qos, PacketId::new(id).unwrap());
    p
}

fn ended(h: &mut H) -> Option<EndReason> {
    h.events().into_iter().find_map(|e| match e {
        ServerEvent::Ended { reason, .. } => Some(reason),
        _ => None,
    })
}

#[test]
fn timed_redelivery_is_for_mqtt_3_1_1_only_and_gives_up_after_max_retries() {
    let config =
        || ServerSessionConfig { retry_interval: Some(Duration::from_secs(5)), max_retries: 2, ..Default::default() };
    // MQTT 3.1.1: a QoS 1 message unacknowledged for 5 s goes out again with DUP.
    let mut v3 = connect(Protocol::V3_1_1);
    v3.keep_alive = 0;
    let mut h = H::connected(config(), v3);
    h.session.publish(h.now, publish("a", QoS::AtLeastOnce, 1)).unwrap();
    let Packet::Publish(first) = h.sent().remove(0) else { panic!() };
    assert!(!first.dup);
    assert_eq!(h.session.poll_timeout(), Some(h.now + Duration::from_secs(5)));
    h.advance(Duration::from_secs(4));
    assert!(h.sent().is_empty(), "resent early");
    h.advance(Duration::from_secs(1));
    let Packet::Publish(again) = h.sent().remove(0) else { panic!() };
    assert!(again.dup);
    assert_eq!(again.packet_id(), first.packet_id());
    // A QoS 2 message: after PUBREC it is the PUBREL that is resent.
    h.session.publish(h.now, publish("b", QoS::ExactlyOnce, 1)).unwrap();
    let Packet::Publish(q2) = h.sent().remove(0) else { panic!() };
    h.feed(Packet::PubRec(Ack::new(q2.packet_id().unwrap())));
    assert!(matches!(h.sent()[..], [Packet::PubRel(_)]));
    h.feed(Packet::PubAck(Ack::new(first.packet_id().unwrap())));
    h.advance(Duration::from_secs(5));
    assert_eq!(h.sent(), [Packet::PubRel(Ack::new(q2.packet_id().unwrap()))]);
    // Two resends used up: the third deadline ends the connection.
    h.advance(Duration::from_secs(5));
    assert_eq!(h.sent().len(), 1);
    assert_eq!(ended(&mut h), None);
    h.advance(Duration::from_secs(5));
    assert_eq!(ended(&mut h), Some(EndReason::RetriesExhausted));

    // MQTT 5: never resent on a live connection, whatever the setting.
    let mut h = H::connected(config(), connect(Protocol::V5));
    h.session.publish(h.now, publish("a", QoS::AtLeastOnce, 1)).unwrap();
    assert_eq!(h.sent().len(), 1);
    for _ in 0..4 {
        h.advance(Duration::from_secs(5));
    }
    assert!(!h.sent().iter().any(|p| matches!(p, Packet::Publish(_))), "MQTT 5 message resent");
    assert_eq!(ended(&mut h), Some(EndReason::KeepAliveTimeout));
}

#[test]
fn connack_announces_the_limits() {
    let config = ServerSessionConfig {
        receive_maximum: 5,
        topic_alias_maximum: 3,
        maximum_qos: QoS::AtLeastOnce,
        ..Default::default()
    };
    let mut h = H::new(config);
    h.feed(connect(Protocol::V5).into());
    let Some(ServerEvent::Connect(c)) = h.session.poll_event() else { panic!() };
    assert_eq!(c.client_id, "dev");
    h.session.accept(h.now, true, None).unwrap();
    let Packet::ConnAck(ack) = h.sent().remove(0) else { panic!() };
    assert!(ack.session_present);
    assert_eq!(ack.properties.receive_maximum, NonZeroU16::new(5));
    assert_eq!(ack.properties.topic_alias_maximum, Some(3));
    assert_eq!(ack.properties.maximum_qos, Some(QoS::AtLeastOnce));
    // The CONNECT named no authentication method: none in CONNACK either [MQTT-4.12.0-6].
    assert_eq!(ack.properties.authentication_method, None);
    assert_eq!(ack.properties.authentication_data, None);
}

#[test]
fn packets_pipelined_after_connect_wait_for_the_decision() {
    let mut h = H::new(ServerSessionConfig::default());
    let mut b = BytesMut::new();
    Packet::from(connect(Protocol::V5)).encode(Protocol::V5, &mut b).unwrap();
    let sub = Subscribe {
        packet_id: PacketId::MIN,
        properties: Default::default(),
        subscriptions: [mqtt_proto::Subscription::new(TopicFilter::new("a").unwrap(), QoS::AtMostOnce)]
            .into_iter()
            .collect(),
    };
    Packet::from(sub).encode(Protocol::V5, &mut b).unwrap();
    Packet::PingReq.encode(Protocol::V5, &mut b).unwrap();
    h.session.handle_stream_data(h.now, &b);
    assert!(matches!(h.events()[..], [ServerEvent::Connect(_)]), "handled before the decision");
    assert!(h.sent().is_empty());
    h.session.accept(h.now, false, None).unwrap();
    assert!(matches!(h.events()[..], [ServerEvent::Subscribe { .. }]));
    assert!(matches!(h.sent()[..], [Packet::ConnAck(_), Packet::PingResp]));
}

#[test]
fn what_waits_behind_an_undecided_connect_is_bounded() {
    let config = ServerSessionConfig { maximum_packet_size: 1000, ..Default::default() };
    let mut h = H::new(config);
    let mut b = BytesMut::new();
    Packet::from(connect(Protocol::V5)).encode(Protocol::V5, &mut b).unwrap();
    Packet::PingReq.encode(Protocol::V5, &mut b).unwrap();
    h.session.handle_stream_data(h.now, &b);
    assert!(matches!(h.events()[..], [ServerEvent::Connect(_)]));
    // The broker has not decided; the client keeps sending.
    for _ in 0..600 {
        h.session.handle_stream_data(h.now, &[0xC0, 0x00]);
    }
    assert_eq!(ended(&mut h), Some(EndReason::ProtocolViolation(ReasonCode::QuotaExceeded)));
}

#[test]
fn connect_must_come_first_and_once() {
    let mut h = H::new(ServerSessionConfig::default());
    h.feed(Packet::PingReq);
    assert!(h.sent().is_empty(), "closed without a word");
    assert_eq!(ended(&mut h), Some(EndReason::ProtocolViolation(ReasonCode::ProtocolError)));

    let mut h = H::v5();
    h.feed(connect(Protocol::V5).into());
    assert_eq!(h.sent(), [Disconnect::new(ReasonCode::ProtocolError).into()]);
}

#[test]
fn unsupported_version_gets_the_refusal_its_client_can_read() {
    let answer = |level: u8| {
        let mut h = H::new(ServerSessionConfig::default());
        h.session.handle_stream_data(h.now, &[0x10, 0x0C, 0, 4, b'M', b'Q', b'T', b'T', level, 0x02, 0, 60, 0, 0]);
        let mut buf = BytesMut::new();
        while let Some(b) = h.session.poll_transmit() {
            buf.extend_from_slice(&b);
        }
        assert!(h.session.is_done());
        buf.to_vec()
    };
    // An older client reads a 3.1.1 CONNACK: return code 1, unacceptable protocol version.
    assert_eq!(answer(2), [0x20, 2, 0, 1]);
    // A newer one is answered as MQTT 5: 0x84 Unsupported Protocol Version.
    assert_eq!(answer(6), [0x20, 3, 0, 0x84, 0]);
}

#[test]
fn a_will_with_a_wildcard_topic_is_refused_with_0x90() {
    let mut h = H::new(ServerSessionConfig::default());
    // CONNECT (MQTT 5) with a will on "a/#".
    let mut bytes = vec![
        0x10, 0, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x06, 0, 60, 0, 0, 1, b'c', 0, 0, 3, b'a', b'/', b'#', 0, 1, b'x',
    ];
    bytes[1] = (bytes.len() - 2) as u8;
    h.session.handle_stream_data(h.now, &bytes);
    assert_eq!(h.sent(), [ConnAck { reason_code: ReasonCode::TopicNameInvalid, ..Default::default() }.into()]);
    assert!(h.session.is_done());
}

#[test]
fn empty_client_id_without_clean_session_is_rejected_in_311() {
    let mut c = Connect::new(Protocol::V3_1_1, MqttString::default());
    c.clean_start = false;
    let mut h = H::new(ServerSessionConfig::default());
    h.set_protocol(Protocol::V3_1_1);
    h.feed(c.into());
    assert_eq!(h.sent(), [ConnAck { reason_code: ReasonCode::ClientIdentifierNotValid, ..Default::default() }.into()]);
}

#[test]
fn kept_messages_can_be_detached_from_their_receive_buffers() {
    let buffer = Bytes::from(vec![0u8; 1 << 20]);
    let mut state = SessionState::default();
    let m = Publish::new(TopicName::new("t").unwrap(), buffer.slice(..10)).with_qos(QoS::AtLeastOnce);
    #[allow(clippy::disallowed_methods)]
    let now = Instant::now();
    assert!(state.enqueue(now, m, 10));
    assert!(!buffer.is_unique());
    state.detach_messages();
    assert!(buffer.is_unique(), "the kept message holds its own 10 bytes");
    assert_eq!(state.bytes(), 1 + 10 + 64);
    assert!(state.is_full(1) && !state.is_full(2));
}

#[test]
fn keep_alive_is_enforced_at_one_and_a_half_times() {
    let mut h = H::v5();
    h.advance(Duration::from_secs(14));
    h.feed(Packet::PingReq);
    assert_eq!(h.sent(), [Packet::PingResp]);
    h.advance(Duration::from_secs(14));
    assert!(ended(&mut h).is_none(), "activity restarts the clock");
    h.advance(Duration::from_secs(1));
    assert_eq!(h.sent(), [Disconnect::new(ReasonCode::KeepAliveTimeout).into()]);
    assert_eq!(ended(&mut h), Some(EndReason::KeepAliveTimeout));
}

#[test]
fn connect_timeout() {
    let mut h = H::new(ServerSessionConfig::default());
    h.advance(Duration::from_secs(10));
    assert_eq!(ended(&mut h), Some(EndReason::ConnectTimeout));
}

#[test]
fn limits_are_enforced_with_their_reason_codes() {
    let config = || ServerSessionConfig {
        receive_maximum: 2,
        maximum_packet_size: 100,
        topic_alias_maximum: 1,
        maximum_qos: QoS::AtLeastOnce,
        retain_available: false,
        ..Default::default()
    };
    let cases: Vec<(Vec<Packet>, ReasonCode)> = vec![
        (vec![Packet::Publish(publish("t", QoS::ExactlyOnce, 1))], ReasonCode::QosNotSupported),
        (
            vec![Packet::Publish({
                let mut p = publish("t", QoS::AtMostOnce, 1);
                p.retain = true;
                p
            })],
            ReasonCode::RetainNotSupported,
        ),
        (vec![Packet::Publish(Publish::new(TopicName::new("t").unwrap(), vec![0u8; 200]))], ReasonCode::PacketTooLarge),
        (
            vec![Packet::Publish({
                let mut p = publish("t", QoS::AtMostOnce, 1);
                p.properties.topic_alias = NonZeroU16::new(2);
                p
            })],
            ReasonCode::TopicAliasInvalid,
        ),
    ];
    for (packets, code) in cases {
        let mut h = H::connected(config(), connect(Protocol::V5));
        for p in packets {
            h.feed(p);
        }
        assert_eq!(h.sent(), [Disconnect::new(code).into()], "{code}");
        assert_eq!(ended(&mut h), Some(EndReason::ProtocolViolation(code)));
    }
}

#[test]
fn receive_maximum_is_enforced_with_0x93() {
    let config = ServerSessionConfig { receive_maximum: 2, ..Default::default() };
    let mut h = H::connected(config, connect(Protocol::V5));
    // A QoS 1 message not yet acknowledged counts too.
    h.feed(Packet::Publish(publish("t", QoS::AtLeastOnce, 1)));
    h.feed(Packet::Publish(publish("t", QoS::ExactlyOnce, 2)));
    h.feed(Packet::Publish(publish("t", QoS::ExactlyOnce, 3)));
    assert_eq!(h.sent().last(), Some(&Disconnect::new(ReasonCode::ReceiveMaximumExceeded).into()));
}

#[test]
fn the_broker_decides_the_acknowledgement() {
    let mut h = H::v5();
    let q1 = publish("t", QoS::AtLeastOnce, 1);
    h.feed(Packet::Publish(q1.clone()));
    assert!(h.sent().is_empty(), "no PUBACK before the broker answers");
    h.session.acknowledge(q1.qos_pid, ReasonCode::NotAuthorized);
    let mut refused = Ack::new(PacketId::new(1).unwrap());
    refused.reason_code = ReasonCode::NotAuthorized;
    assert_eq!(h.sent(), [Packet::PubAck(refused)]);
    // A refused QoS 2 message frees its identifier: the same id is a new message.
    let q2 = publish("t", QoS::ExactlyOnce, 2);
    h.feed(Packet::Publish(q2.clone()));
    h.session.acknowledge(q2.qos_pid, ReasonCode::QuotaExceeded);
    h.sent();
    h.events();
    h.feed(Packet::Publish(q2));
    assert!(h.events().iter().any(|e| matches!(e, ServerEvent::Publish(_))));
}

#[test]
fn incoming_qos2_is_delivered_once() {
    let mut h = H::v5();
    let p = publish("t", QoS::ExactlyOnce, 4);
    h.feed(Packet::Publish(p.clone()));
    h.session.acknowledge(p.qos_pid, ReasonCode::Success);
    h.feed(Packet::Publish(p.clone()));
    let delivered = h.events().into_iter().filter(|e| matches!(e, ServerEvent::Publish(_))).count();
    assert_eq!(delivered, 1);
    let id = PacketId::new(4).unwrap();
    assert_eq!(h.sent(), [Packet::PubRec(Ack::new(id)), Packet::PubRec(Ack::new(id))]);
    h.feed(Packet::PubRel(Ack::new(id)));
    assert_eq!(h.sent(), [Packet::PubComp(Ack::new(id))]);
}

#[test]
fn outbound_flows_respect_the_client_receive_maximum() {
    let mut c = connect(Protocol::V5);
    c.properties.receive_maximum = NonZeroU16::new(1);
    let mut h = H::connected(ServerSessionConfig::default(), c);
    let a = h.session.publish(h.now, publish("x", QoS::AtLeastOnce, 1)).unwrap();
    let b = h.session.publish(h.now, publish("y", QoS::ExactlyOnce, 1)).unwrap();
    let sent = h.sent();
    assert_eq!(sent.len(), 1, "one in flight");
    let Packet::Publish(p) = &sent[0] else { panic!() };
    h.feed(Packet::PubAck(Ack::new(p.packet_id().unwrap())));
    assert_eq!(h.events(), [ServerEvent::Delivered { id: a }]);
    let Packet::Publish(q) = h.sent().remove(0) else { panic!() };
    let qid = q.packet_id().unwrap();
    h.feed(Packet::PubRec(Ack::new(qid)));
    assert_eq!(h.sent(), [Packet::PubRel(Ack::new(qid))]);
    h.feed(Packet::PubComp(Ack::new(qid)));
    assert_eq!(h.events(), [ServerEvent::Delivered { id: b }]);
}

/// [MQTT-4.3.3-7]: once a QoS 2 PUBLISH has gone out its expiry no longer applies: the
/// handshake finishes after the interval has passed, and a resumed session resends it.
#[test]
fn a_sent_qos2_message_does_not_expire() {
    let c = connect(Protocol::V5);
    let mut h = H::connected(ServerSessionConfig::default(), c.clone());
    let mut p = publish("q2", QoS::ExactlyOnce, 1);
    p.properties.message_expiry_interval = Some(2);
    h.session.publish(h.now, p.clone()).unwrap();
    h.session.publish(h.now, p).unwrap();
    let ids: Vec<PacketId> =
        h.sent().iter().filter_map(|p| if let Packet::Publish(p) = p { p.packet_id() } else { None }).collect();
    assert_eq!(ids.len(), 2);
    h.now += Duration::from_secs(5);
    h.session.handle_timeout(h.now);
    h.feed(Packet::PubRec(Ack::new(ids[0])));
    assert_eq!(h.sent(), [Packet::PubRel(Ack::new(ids[0]))]);
    // The second, unacknowledged, survives the connection's loss past its expiry.
    let state = lose(&mut h);
    let (_, sent) = resumed(c, state);
    assert!(sent.iter().any(|p| matches!(p, Packet::Publish(p) if p.dup && p.packet_id() == Some(ids[1]))), "{sent:?}");
}

/// [MQTT-4.3.3-13]: a receiver finishes the QoS 2 handshake of a message even after the
/// message's expiry interval has passed.
#[test]
fn an_incoming_qos2_handshake_finishes_after_expiry() {
    let mut h = H::v5();
    let mut p = publish("in", QoS::ExactlyOnce, 4);
    p.properties.message_expiry_interval = Some(1);
    h.feed(Packet::Publish(p));
    assert!(h.events().iter().any(|e| matches!(e, ServerEvent::Publish(_))));
    let id = PacketId::new(4).unwrap();
    h.session.acknowledge(QosPid::ExactlyOnce(id), ReasonCode::Success);
    assert_eq!(h.sent(), [Packet::PubRec(Ack::new(id))]);
    h.now += Duration::from_secs(10);
    h.session.handle_timeout(h.now);
    h.feed(Packet::PubRel(Ack::new(id)));
    assert_eq!(h.sent(), [Packet::PubComp(Ack::new(id))]);
}

#[test]
fn message_expiry_counts_down_while_queued() {
    let mut c = connect(Protocol::V5);
    c.properties.receive_maximum = NonZeroU16::new(1);
    let mut h = H::connected(ServerSessionConfig::default(), c);
    let with_expiry = |topic: &str, secs| {
        let mut p = publish(topic, QoS::AtLeastOnce, 1);
        p.properties.message_expiry_interval = Some(secs);
        p
    };
    h.session.publish(h.now, publish("first", QoS::AtLeastOnce, 1)).unwrap();
    h.session.publish(h.now, with_expiry("short", 2)).unwrap();
    h.session.publish(h.now, with_expiry("long", 10)).unwrap();
    let Packet::Publish(first) = h.sent().remove(0) else { panic!() };
    h.now += Duration::from_secs(3);
    h.feed(Packet::PubAck(Ack::new(first.packet_id().unwrap())));
    // "short" expired while waiting; "long" goes out with 7 s left.
    let sent = h.sent();
    assert_eq!(sent.len(), 1, "{sent:?}");
    let Packet::Publish(p) = &sent[0] else { panic!() };
    assert_eq!(p.topic.as_str(), "long");
    assert_eq!(p.properties.message_expiry_interval, Some(7));
}

#[test]
fn messages_above_the_client_maximum_packet_size_are_refused() {
    let mut c = connect(Protocol::V5);
    c.properties.maximum_packet_size = std::num::NonZeroU32::new(50);
    let mut h = H::connected(ServerSessionConfig::default(), c);
    let big = Publish::new(TopicName::new("t").unwrap(), vec![0u8; 100]);
    assert!(matches!(h.session.publish(h.now, big), Err(CommandError::PacketTooLarge { max: 50, .. })));
}

/// Ends `h`'s connection and returns the session state, as the broker keeps it.
fn lose(h: &mut H) -> SessionState {
    h.session.handle_stream_closed(h.now);
    h.events();
    h.session.take_state()
}

/// A new connection of the same client (`connect`, clean start off) resuming `state`.
fn resumed(mut connect: Connect, state: SessionState) -> (H, Vec<Packet>) {
    let mut h = H::new(ServerSessionConfig::default());
    connect.clean_start = false;
    h.feed(connect.into());
    assert!(matches!(h.events()[..], [ServerEvent::Connect(_)]));
    h.session.resume(h.now, state).unwrap();
    let sent = h.sent();
    (h, sent)
}

/// [MQTT-4.4.0-1] [MQTT-2.2.1-4]: on resume, what was in flight goes out again right after
/// CONNACK, before anything queued while the client was away, and a queued message never
/// takes an identifier still in flight.
#[test]
fn resume_resends_in_flight_first_and_keeps_their_identifiers() {
    let mut c = connect(Protocol::V5);
    c.properties.receive_maximum = NonZeroU16::new(2);
    let mut h = H::connected(ServerSessionConfig::default(), c.clone());
    h.session.publish(h.now, publish("in-flight", QoS::AtLeastOnce, 1)).unwrap();
    let Packet::Publish(first) = h.sent().remove(0) else { panic!() };
    let mut state = lose(&mut h);
    // Arrived while the client was offline.
    assert!(state.enqueue(h.now, publish("queued", QoS::AtLeastOnce, 1), 10));
    let (_, sent) = resumed(c, state);
    assert!(
        matches!(&sent[..], [Packet::ConnAck(ack), Packet::Publish(p), Packet::Publish(q)]
            if ack.session_present && p.dup && p.topic.as_str() == "in-flight" && p.packet_id() == first.packet_id()
                && q.topic.as_str() == "queued" && !q.dup && q.packet_id() != first.packet_id()),
        "{sent:?}"
    );
}

/// [MQTT-4.9.0-2]: a client that comes back with a smaller Receive Maximum gets the
/// unacknowledged messages resent within it, the rest as it acknowledges.
#[test]
fn resume_respects_a_smaller_receive_maximum() {
    let mut c = connect(Protocol::V5);
    c.properties.receive_maximum = NonZeroU16::new(3);
    let mut h = H::connected(ServerSessionConfig::default(), c.clone());
    for topic in ["a", "b", "c"] {
        h.session.publish(h.now, publish(topic, QoS::AtLeastOnce, 1)).unwrap();
    }
    assert_eq!(h.sent().len(), 3);
    let mut state = lose(&mut h);
    assert!(state.enqueue(h.now, publish("d", QoS::AtLeastOnce, 1), 10));
    c.properties.receive_maximum = NonZeroU16::new(1);
    let (mut h, sent) = resumed(c, state);
    let topics = |sent: &[Packet]| -> Vec<(String, bool, PacketId)> {
        sent.iter()
            .filter_map(|p| match p {
                Packet::Publish(p) => Some((p.topic.to_string(), p.dup, p.packet_id().unwrap())),
                _ => None,
            })
            .collect()
    };
    let mut order = Vec::new();
    let mut next = topics(&sent);
    while let [(topic, dup, id)] = &next[..] {
        order.push((topic.clone(), *dup));
        h.feed(Packet::PubAck(Ack::new(*id)));
        next = topics(&h.sent());
    }
    assert!(next.is_empty(), "more than one unacknowledged: {next:?}");
    let want = [("a", true), ("b", true), ("c", true), ("d", false)].map(|(t, d)| (t.to_string(), d));
    assert_eq!(order, want);
}

/// [MQTT-3.1.2-25]: a message that no longer fits the client's Maximum Packet Size (queued
/// while it was away, or in flight when it came back with a smaller one) is dropped unsent
/// and counts as delivered; the session carries on.
#[test]
fn messages_too_large_for_the_returning_client_are_dropped_as_delivered() {
    let c = connect(Protocol::V5);
    let mut h = H::connected(ServerSessionConfig::default(), c.clone());
    let big = Publish::new(TopicName::new("big").unwrap(), vec![0u8; 200]).with_qos(QoS::AtLeastOnce);
    let in_flight = h.session.publish(h.now, big.clone()).unwrap();
    h.sent();
    let mut state = lose(&mut h);
    assert!(state.enqueue(h.now, big, 10));
    assert!(state.enqueue(h.now, publish("small", QoS::AtLeastOnce, 1), 10));
    let mut small_client = c;
    small_client.properties.maximum_packet_size = std::num::NonZeroU32::new(100);
    let (mut h, sent) = resumed(small_client, state);
    assert!(matches!(&sent[..], [Packet::ConnAck(_), Packet::Publish(p)] if p.topic.as_str() == "small"), "{sent:?}");
    let delivered: Vec<_> = h.events().into_iter().filter(|e| matches!(e, ServerEvent::Delivered { .. })).collect();
    assert_eq!(delivered.len(), 2, "{delivered:?}");
    assert!(delivered.contains(&ServerEvent::Delivered { id: in_flight }));
    assert!(!h.session.is_done());
}

/// [MQTT-3.1.2-24]: a CONNACK that cannot fit the client's Maximum Packet Size is not sent;
/// a bare refusal that fits is, and the session ends (found by the `server_session` fuzzer:
/// a client announcing 11 bytes got a 27-byte CONNACK).
#[test]
fn connack_never_exceeds_the_client_maximum_packet_size() {
    for (max, expect_refusal) in [(11, true), (4, false)] {
        let mut c = connect(Protocol::V5);
        c.properties.maximum_packet_size = std::num::NonZeroU32::new(max);
        let mut h = H::new(ServerSessionConfig::default());
        h.feed(c.into());
        assert!(matches!(h.events()[..], [ServerEvent::Connect(_)]));
        h.session.accept(h.now, false, Some("assigned-identifier")).unwrap();
        let mut bytes = Vec::new();
        while let Some(b) = h.session.poll_transmit() {
            bytes.extend_from_slice(&b);
        }
        assert!(bytes.len() <= max as usize, "{} bytes sent, the client accepts {max}", bytes.len());
        if expect_refusal {
            assert_eq!(bytes, [0x20, 0x03, 0x00, 0x95, 0x00]);
        }
        assert!(matches!(
            h.events()[..],
            [ServerEvent::Ended { reason: EndReason::ProtocolViolation(ReasonCode::PacketTooLarge), .. }]
        ));
        assert!(h.session.is_done());
    }
}

/// A topic alias on a message routed from another connection is not sent on this one
/// [MQTT-3.3.2-7] (found by the `server_session` fuzzer).
#[test]
fn routed_messages_carry_no_foreign_topic_alias() {
    let mut h = H::v5();
    let mut p = Publish::new(TopicName::new("t").unwrap(), &b"m"[..]);
    p.properties.topic_alias = NonZeroU16::new(7);
    h.session.publish(h.now, p).unwrap();
    let sent = h.sent();
    assert!(matches!(&sent[..], [Packet::Publish(p)] if p.properties.topic_alias.is_none()), "{sent:?}");
}

/// [MQTT-3.2.2-12] [MQTT-3.2.2-13]: a will above the Maximum QoS, or retained where retain
/// is unavailable, gets CONNACK 0x9B / 0x9A and no session.
#[test]
fn a_will_the_server_cannot_honour_is_refused() {
    let config = ServerSessionConfig { maximum_qos: QoS::AtLeastOnce, retain_available: false, ..Default::default() };
    for (qos, retain, code) in [
        (QoS::ExactlyOnce, false, ReasonCode::QosNotSupported),
        (QoS::AtMostOnce, true, ReasonCode::RetainNotSupported),
    ] {
        let mut c = connect(Protocol::V5);
        c.will = Some(Will {
            topic: TopicName::new("status").unwrap(),
            payload: Bytes::from_static(b"gone"),
            qos,
            retain,
            properties: Default::default(),
        });
        let mut h = H::new(config.clone());
        h.feed(c.into());
        assert!(matches!(&h.sent()[..], [Packet::ConnAck(ack)] if ack.reason_code == code));
        assert!(
            matches!(h.events()[..], [ServerEvent::Ended { reason: EndReason::Refused(r), will: None }] if r == code)
        );
    }
}

/// Authentication Data without an Authentication Method is a Protocol Error (CONNACK 0x82).
#[test]
fn authentication_data_without_a_method_is_refused() {
    let mut c = connect(Protocol::V5);
    c.properties.authentication_data = Some(Bytes::from_static(b"secret"));
    let mut h = H::new(ServerSessionConfig::default());
    h.feed(c.clone().into());
    assert!(matches!(&h.sent()[..], [Packet::ConnAck(a)] if a.reason_code == ReasonCode::ProtocolError));
    // Even a refusal respects the client's Maximum Packet Size [MQTT-3.1.2-24].
    c.properties.maximum_packet_size = std::num::NonZeroU32::new(3);
    let mut h = H::new(ServerSessionConfig::default());
    h.feed(c.into());
    assert!(h.sent().is_empty());
    assert!(h.session.is_done());
}

/// [MQTT-3.3.4-6]: a PUBLISH from a client carrying a Subscription Identifier is a
/// Protocol Error: DISCONNECT 0x82, the session ends, and the message reaches nobody.
#[test]
fn a_client_publish_with_a_subscription_identifier_is_a_protocol_error() {
    let mut h = H::v5();
    let mut p = publish("t", QoS::AtMostOnce, 1);
    p.properties.subscription_identifiers.push(mqtt_proto::SubscriptionId::new(7).unwrap());
    h.feed(p.into());
    assert_eq!(h.sent(), [Packet::Disconnect(Disconnect::new(ReasonCode::ProtocolError))]);
    assert!(!h.events().iter().any(|e| matches!(e, ServerEvent::Publish(_))));
    assert!(h.session.is_done());
}

#[test]
fn will_follows_how_the_connection_ended() {
    let with_will = || {
        let mut c = connect(Protocol::V5);
        c.will = Some(Will {
            topic: TopicName::new("status").unwrap(),
            payload: Bytes::from_static(b"gone"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Default::default(),
        });
        c
    };
    let will_of = |h: &mut H| {
        h.events().into_iter().find_map(|e| match e {
            ServerEvent::Ended { will, .. } => Some(will.is_some()),
            _ => None,
        })
    };
    let mut h = H::connected(ServerSessionConfig::default(), with_will());
    h.session.handle_stream_closed(h.now);
    assert_eq!(will_of(&mut h), Some(true), "ungraceful: will");
    let mut h = H::connected(ServerSessionConfig::default(), with_will());
    h.feed(Disconnect::default().into());
    assert_eq!(will_of(&mut h), Some(false), "normal disconnect: no will");
    let mut h = H::connected(ServerSessionConfig::default(), with_will());
    h.feed(Disconnect::new(ReasonCode::DisconnectWithWill).into());
    assert_eq!(will_of(&mut h), Some(true), "0x04: will");
}

#[test]
fn subscriptions_are_reported_and_answered() {
    let mut h = H::v5();
    let sub = Subscription {
        filter: TopicFilter::new("a/+").unwrap(),
        options: SubscriptionOptions { qos: QoS::AtLeastOnce, ..Default::default() },
    };
    let packet_id = PacketId::new(3).unwrap();
    h.feed(Packet::Subscribe(Subscribe {
        packet_id,
        properties: Default::default(),
        subscriptions: [sub.clone()].into(),
    }));
    assert_eq!(h.events(), [ServerEvent::Subscribe { packet_id, subscriptions: vec![sub], subscription_id: None }]);
    h.session.suback(packet_id, vec![ReasonCode::GrantedQos1]).unwrap();
    assert!(matches!(&h.sent()[..], [Packet::SubAck(a)] if a.reason_codes[0] == ReasonCode::GrantedQos1));
}

#[test]
fn resumed_state_keeps_qos2_exactly_once_and_resends_unacknowledged() {
    let mut h = H::v5();
    // The client's QoS 2 message arrives; the connection drops before PUBREL.
    h.feed(Packet::Publish(publish("in", QoS::ExactlyOnce, 9)));
    h.session.acknowledge(QosPid::ExactlyOnce(PacketId::new(9).unwrap()), ReasonCode::Success);
    // Our QoS 1 message to the client is not acknowledged.
    h.session.publish(h.now, publish("out", QoS::AtLeastOnce, 1)).unwrap();
    h.sent();
    h.session.handle_stream_closed(h.now);
    h.events();
    let state = h.session.take_state();
    assert_eq!(state.pending(), 1);

    let mut h2 = H::new(ServerSessionConfig::default());
    h2.feed(connect(Protocol::V5).into());
    h2.events();
    h2.session.resume(h2.now, state).unwrap();
    let sent = h2.sent();
    assert!(matches!(&sent[0], Packet::ConnAck(a) if a.session_present));
    assert!(matches!(&sent[1], Packet::Publish(p) if p.dup && p.topic.as_str() == "out"), "{sent:?}");
    // The client resends its QoS 2 message (DUP): not delivered a second time.
    let mut again = publish("in", QoS::ExactlyOnce, 9);
    again.dup = true;
    h2.feed(Packet::Publish(again));
    assert!(!h2.events().iter().any(|e| matches!(e, ServerEvent::Publish(_))));
    h2.feed(Packet::PubRel(Ack::new(PacketId::new(9).unwrap())));
    assert!(h2.sent().contains(&Packet::PubComp(Ack::new(PacketId::new(9).unwrap()))));
}

#[test]
fn takeover_disconnects_with_0x8e() {
    let mut h = H::v5();
    h.session.disconnect(ReasonCode::SessionTakenOver).unwrap();
    assert_eq!(h.sent(), [Disconnect::new(ReasonCode::SessionTakenOver).into()]);
    assert!(h.session.is_done());
}

#[test]
fn client_topic_aliases_are_resolved_for_the_broker() {
    let mut h = H::v5();
    let mut set = publish("long/name", QoS::AtMostOnce, 1);
    set.properties.topic_alias = NonZeroU16::new(1);
    h.feed(Packet::Publish(set));
    let mut used = Publish::new(TopicName::empty(), &b"m"[..]);
    used.properties.topic_alias = NonZeroU16::new(1);
    h.feed(Packet::Publish(used));
    let topics: Vec<String> = h
        .events()
        .into_iter()
        .filter_map(|e| if let ServerEvent::Publish(p) = e { Some(p.topic.to_string()) } else { None })
        .collect();
    assert_eq!(topics, ["long/name", "long/name"]);
}
