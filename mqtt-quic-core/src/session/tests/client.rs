//! The client session's tests.

use super::Harness;
use crate::config::ConfigError;
use crate::session::client::*;
use crate::session::DEFAULT_WINDOW;
use bytes::Bytes;
use mqtt_proto::*;
use std::time::Duration;

fn string(s: &str) -> MqttString {
    MqttString::try_from(s).unwrap()
}
use mqtt_proto::{SubscriptionOptions, UnsubAck};
use std::num::NonZeroU16;

type H = Harness<ClientSession>;

impl Harness<ClientSession> {
    fn new(config: ClientSessionConfig) -> H {
        let protocol = config.protocol;
        Harness::with(protocol, |_| ClientSession::new(config).unwrap())
    }

    fn connected(config: ClientSessionConfig, connack: ConnAck) -> H {
        let mut h = H::new(config);
        h.session.connect(h.now).unwrap();
        assert!(matches!(h.sent()[..], [Packet::Connect(_)]));
        h.feed(connack.into());
        assert!(matches!(h.events()[..], [ClientEvent::Connected { .. }]));
        h
    }

    fn v5() -> H {
        H::connected(ClientSessionConfig::default(), ConnAck::default())
    }
}

fn publish(topic: &str, qos: QoS) -> Publish {
    let mut p = Publish::new(TopicName::new(topic).unwrap(), &b"payload"[..]);
    p.qos_pid = QosPid::from_parts(qos, PacketId::MIN);
    p
}

/// [MQTT-3.2.2-4]: a server claiming a session after we asked for a clean start is broken:
/// the connection ends as a protocol violation.
#[test]
fn session_present_after_a_clean_start_closes_the_connection() {
    let mut h = H::new(ClientSessionConfig::default());
    h.session.connect(h.now).unwrap();
    h.sent();
    h.feed(ConnAck { session_present: true, ..Default::default() }.into());
    assert_eq!(
        h.events(),
        [ClientEvent::Disconnected { reason: DisconnectReason::ProtocolViolation(ReasonCode::ProtocolError) }]
    );
    assert!(!h.session.is_connected());
}

/// [MQTT-3.2.2-15]: nothing we send exceeds the server's Maximum Packet Size: a topic alias
/// is left off when its bytes would not fit, and a SUBSCRIBE that cannot fit is refused
/// (found by the `client_session` fuzzer).
#[test]
fn nothing_sent_exceeds_the_server_maximum_packet_size() {
    let mut ack = ConnAck::default();
    ack.properties.maximum_packet_size = std::num::NonZeroU32::new(40);
    ack.properties.topic_alias_maximum = Some(4);
    let mut h = H::connected(ClientSessionConfig::default(), ack);
    // 40 bytes exactly without an alias; an alias would add 3.
    let p = Publish::new(TopicName::new("t").unwrap(), vec![0u8; 34]);
    assert_eq!(p.encoded_len(Protocol::V5).unwrap(), 40);
    h.session.publish(h.now, p).unwrap();
    assert!(matches!(&h.sent()[..], [Packet::Publish(p)] if p.properties.topic_alias.is_none()));
    let long = TopicFilter::new("x".repeat(60)).unwrap();
    let refused = h.session.subscribe(h.now, vec![Subscription::new(long.clone(), QoS::AtMostOnce)], None);
    assert!(matches!(refused, Err(CommandError::PacketTooLarge { max: 40, .. })), "{refused:?}");
    assert!(matches!(h.session.unsubscribe(h.now, vec![long]), Err(CommandError::PacketTooLarge { .. })));
    assert!(h.sent().is_empty());
}

/// [MQTT-4.12.0-7]: without an authentication method in CONNECT, the client sends no AUTH.
#[test]
fn auth_needs_an_authentication_method() {
    let mut h = H::v5();
    assert_eq!(h.session.auth(h.now, Auth::default()), Err(CommandError::NoAuthenticationMethod));
    assert!(h.sent().is_empty());
}

/// A session whose CONNECT names the authentication method `m`.
fn with_method(m: &str, connack: ConnAck) -> H {
    let mut config = ClientSessionConfig::default();
    config.connect_properties.authentication_method = Some(string(m));
    H::connected(config, connack)
}

#[test]
fn auth_carries_the_connect_method() {
    let mut h = with_method("SCRAM-SHA-256", ConnAck::default());
    let auth = Auth { reason_code: ReasonCode::ContinueAuthentication, ..Default::default() };
    h.session.auth(h.now, auth.clone()).unwrap();
    let sent = h.sent();
    let [Packet::Auth(a)] = &sent[..] else { panic!("{sent:?}") };
    assert_eq!(a.properties.authentication_method, Some(string("SCRAM-SHA-256")), "filled in");
    let mut other = auth;
    other.properties.authentication_method = Some(string("PLAIN"));
    let refused = h.session.auth(h.now, other);
    assert!(matches!(refused, Err(CommandError::AuthenticationMethodMismatch { .. })), "{refused:?}");
    assert!(h.sent().is_empty());
}

#[test]
fn auth_drops_its_diagnostics_to_fit_the_server_maximum_packet_size() {
    let mut ack = ConnAck::default();
    ack.properties.maximum_packet_size = std::num::NonZeroU32::new(64);
    let mut h = with_method("m", ack);
    let mut auth = Auth { reason_code: ReasonCode::ContinueAuthentication, ..Default::default() };
    auth.properties.authentication_data = Some(Bytes::from_static(b"challenge"));
    auth.properties.reason_string = Some(string(&"r".repeat(100)));
    auth.properties.user_properties.push((string("k"), string(&"v".repeat(100))));
    h.session.auth(h.now, auth.clone()).unwrap();
    let sent = h.sent();
    let [Packet::Auth(a)] = &sent[..] else { panic!("{sent:?}") };
    assert_eq!(a.properties.reason_string, None);
    assert!(a.properties.user_properties.is_empty());
    assert_eq!(a.properties.authentication_data, Some(Bytes::from_static(b"challenge")), "data kept");
    // Data alone too large: refused, nothing sent, the connection stays.
    auth.properties.authentication_data = Some(Bytes::from(vec![0u8; 100]));
    assert!(matches!(h.session.auth(h.now, auth), Err(CommandError::PacketTooLarge { max: 64, .. })));
    assert!(h.sent().is_empty());
    assert!(h.session.is_connected());
}

#[test]
fn resume_resends_within_a_smaller_receive_maximum_in_order() {
    let config = ClientSessionConfig { session_expiry: 3600, ..Default::default() };
    let mut h = H::connected(config, ConnAck::default());
    for i in 0..5 {
        h.session.publish(h.now, publish(&format!("q{i}"), QoS::AtLeastOnce)).unwrap();
    }
    let first: Vec<PacketId> =
        h.sent().iter().filter_map(|p| if let Packet::Publish(p) = p { p.packet_id() } else { None }).collect();
    assert_eq!(first.len(), 5);
    h.session.handle_stream_closed(h.now);
    h.events();
    h.session.connect(h.now).unwrap();
    h.sent();
    let mut ack = ConnAck { session_present: true, ..Default::default() };
    ack.properties.receive_maximum = NonZeroU16::new(2);
    h.feed(ack.into());
    let resent = |h: &mut H| -> Vec<PacketId> {
        h.sent()
            .iter()
            .filter_map(|p| match p {
                Packet::Publish(p) if p.dup => p.packet_id(),
                Packet::Publish(p) => panic!("a new publish before the old ones: {p:?}"),
                _ => None,
            })
            .collect()
    };
    assert_eq!(resent(&mut h), first[..2], "two in flight at most [MQTT-4.9.0-2]");
    h.feed(Packet::PubAck(Ack::new(first[0])));
    assert_eq!(resent(&mut h), first[2..3], "an acknowledgement makes room for the next, in order");
    h.feed(Packet::PubAck(Ack::new(first[1])));
    h.feed(Packet::PubAck(Ack::new(first[2])));
    assert_eq!(resent(&mut h), first[3..5]);
    h.feed(Packet::PubAck(Ack::new(first[3])));
    h.feed(Packet::PubAck(Ack::new(first[4])));
    let done = h.events().iter().filter(|e| matches!(e, ClientEvent::Published { .. })).count();
    assert_eq!(done, 5);
    assert_eq!(h.session.pending_publishes(), 0);
}

#[test]
fn with_an_authentication_method_only_auth_goes_out_before_connack() {
    let mut config = ClientSessionConfig::default();
    config.connect_properties.authentication_method = Some(string("m"));
    let mut h = H::new(config);
    h.session.connect(h.now).unwrap();
    assert!(matches!(h.sent()[..], [Packet::Connect(_)]));
    // While connecting: QoS 0 and subscriptions are refused, QoS 1 waits; AUTH goes out.
    let filter = TopicFilter::new("t").unwrap();
    assert_eq!(h.session.publish(h.now, publish("t", QoS::AtMostOnce)), Err(CommandError::NotConnected));
    assert!(h.session.subscribe(h.now, vec![Subscription::new(filter.clone(), QoS::AtMostOnce)], None).is_err());
    assert!(h.session.unsubscribe(h.now, vec![filter]).is_err());
    h.session.publish(h.now, publish("t", QoS::AtLeastOnce)).unwrap();
    h.advance(Duration::from_secs(1));
    assert!(h.sent().is_empty(), "nothing but AUTH or DISCONNECT before CONNACK [MQTT-3.1.2-30]");
    h.session.auth(h.now, Auth { reason_code: ReasonCode::ContinueAuthentication, ..Default::default() }).unwrap();
    assert!(matches!(h.sent()[..], [Packet::Auth(_)]));
    let mut ack = ConnAck::default();
    ack.properties.authentication_method = Some(string("m"));
    h.feed(ack.into());
    assert!(matches!(h.sent()[..], [Packet::Publish(_)]), "the queued publish after CONNACK");
}

#[test]
fn no_topic_alias_when_the_server_allows_none() {
    // CONNACK without Topic Alias Maximum (absent means 0), then one announcing 0.
    for maximum in [None, Some(0)] {
        let mut ack = ConnAck::default();
        ack.properties.topic_alias_maximum = maximum;
        let mut h = H::connected(ClientSessionConfig::default(), ack);
        for _ in 0..3 {
            h.session.publish(h.now, publish("a/b", QoS::AtMostOnce)).unwrap();
        }
        for p in h.sent() {
            let Packet::Publish(p) = p else { panic!("{p:?}") };
            assert!(p.properties.topic_alias.is_none() && p.topic.as_str() == "a/b", "[MQTT-3.2.2-18]");
        }
    }
}

#[test]
fn acknowledgements_go_out_in_the_order_their_packets_arrived() {
    let mut h = H::v5();
    // PUBACKs in the order the QoS 1 PUBLISHes arrived [MQTT-4.6.0-2], PUBRECs likewise
    // for QoS 2 [MQTT-4.6.0-3]: identifiers deliberately out of numeric order.
    let order = [5u16, 2, 9, 1];
    for (qos, make) in [
        (QoS::AtLeastOnce, QosPid::AtLeastOnce as fn(PacketId) -> QosPid),
        (QoS::ExactlyOnce, QosPid::ExactlyOnce as fn(PacketId) -> QosPid),
    ] {
        for id in order {
            let mut p = publish("in", qos);
            p.qos_pid = make(pid(id));
            h.feed(Packet::Publish(p));
        }
        let acked: Vec<u16> = h
            .sent()
            .into_iter()
            .map(|p| match p {
                Packet::PubAck(a) | Packet::PubRec(a) => a.packet_id.get(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(acked, order, "{qos:?}");
    }
    // PUBRELs in the order the PUBRECs arrived [MQTT-4.6.0-4].
    for i in 0..3 {
        h.session.publish(h.now, publish(&format!("out/{i}"), QoS::ExactlyOnce)).unwrap();
    }
    let ids: Vec<PacketId> =
        h.sent().iter().filter_map(|p| if let Packet::Publish(p) = p { p.packet_id() } else { None }).collect();
    for i in [2, 0, 1] {
        h.feed(Packet::PubRec(Ack::new(ids[i])));
    }
    let released: Vec<PacketId> =
        h.sent().iter().filter_map(|p| if let Packet::PubRel(a) = p { Some(a.packet_id) } else { None }).collect();
    assert_eq!(released, [ids[2], ids[0], ids[1]]);
}

/// [MQTT-3.3.4-6]: a client PUBLISH carries no Subscription Identifier, even when the
/// application republishes a message it received.
#[test]
fn republished_messages_lose_their_subscription_identifiers() {
    let mut h = H::v5();
    let mut p = publish("t", QoS::AtMostOnce);
    p.properties.subscription_identifiers.push(mqtt_proto::SubscriptionId::new(3).unwrap());
    h.session.publish(h.now, p).unwrap();
    assert!(matches!(&h.sent()[..], [Packet::Publish(p)] if p.properties.subscription_identifiers.is_empty()));
}

/// Messages queued before CONNACK are checked against the limits it announces
/// [MQTT-3.2.2-11] [MQTT-3.2.2-14] [MQTT-3.2.2-15]: what this server does not allow
/// completes with the reason instead of going out (found by the `client_session` fuzzer: a
/// 66-byte PUBLISH was sent to a server accepting 64).
#[test]
fn queued_messages_obey_the_limits_connack_announces() {
    let mut h = H::new(ClientSessionConfig::default());
    h.session.connect(h.now).unwrap();
    h.sent();
    let big = Publish::new(TopicName::new("t").unwrap(), vec![0u8; 100]).with_qos(QoS::AtLeastOnce);
    let big = h.session.publish(h.now, big).unwrap();
    let qos2 = h.session.publish(h.now, publish("t", QoS::ExactlyOnce)).unwrap();
    let mut retained = publish("t", QoS::AtLeastOnce);
    retained.retain = true;
    let retained = h.session.publish(h.now, retained).unwrap();
    let fine = h.session.publish(h.now, publish("t", QoS::AtLeastOnce)).unwrap();
    let mut ack = ConnAck::default();
    ack.properties.maximum_packet_size = std::num::NonZeroU32::new(64);
    ack.properties.maximum_qos = Some(QoS::AtLeastOnce);
    ack.properties.retain_available = Some(false);
    h.feed(ack.into());
    let events = h.events();
    for (id, reason) in [
        (big, ReasonCode::PacketTooLarge),
        (qos2, ReasonCode::QosNotSupported),
        (retained, ReasonCode::RetainNotSupported),
    ] {
        assert!(events.contains(&ClientEvent::Published { id, reason }), "{id:?} {reason:?} in {events:?}");
    }
    let sent = h.sent();
    assert!(matches!(&sent[..], [Packet::Publish(p)] if p.qos() == QoS::AtLeastOnce && !p.retain), "{sent:?}");
    let _ = fine;
}

fn pid(v: u16) -> PacketId {
    PacketId::new(v).unwrap()
}

fn ack_with(id: u16, code: ReasonCode) -> Ack {
    let mut a = Ack::new(pid(id));
    a.reason_code = code;
    a
}

#[test]
fn connect_carries_the_configured_properties() {
    let config = ClientSessionConfig {
        client_id: "dev-1".into(),
        keep_alive: 30,
        session_expiry: 600,
        receive_maximum: 10,
        topic_alias_maximum: 5,
        ..Default::default()
    };
    let mut h = H::new(config);
    h.session.connect(h.now).unwrap();
    let Packet::Connect(c) = h.sent().remove(0) else { panic!("no CONNECT") };
    assert_eq!(c.client_id, "dev-1");
    assert_eq!(c.keep_alive, 30);
    assert_eq!(c.properties.session_expiry_interval, Some(600));
    assert_eq!(c.properties.receive_maximum, NonZeroU16::new(10));
    assert_eq!(c.properties.topic_alias_maximum, Some(5));
    assert_eq!(h.session.connect(h.now), Err(CommandError::AlreadyConnected));
}

#[test]
fn extra_connect_properties_are_sent() {
    let mut extra = ConnectProperties::default();
    extra.request_problem_information = Some(false);
    extra.authentication_method = Some(MqttString::from_static("SCRAM-SHA-256"));
    extra.user_properties.push((MqttString::from_static("site"), MqttString::from_static("7")));
    let mut h = H::new(ClientSessionConfig { connect_properties: extra, ..Default::default() });
    h.session.connect(h.now).unwrap();
    let Packet::Connect(c) = h.sent().remove(0) else { panic!() };
    assert_eq!(c.properties.request_problem_information, Some(false));
    assert_eq!(c.properties.authentication_method.as_ref().map(|m| m.as_str()), Some("SCRAM-SHA-256"));
    assert_eq!(c.properties.user_properties.len(), 1);
    assert_eq!(c.properties.receive_maximum, NonZeroU16::new(DEFAULT_WINDOW), "session fields still set");
}

#[test]
fn invalid_configuration_is_refused() {
    let bad = ClientSessionConfig { client_id: "a\0b".into(), ..Default::default() };
    assert!(matches!(ClientSession::new(bad), Err(ConfigError::Invalid(m)) if m.contains("client_id")));
}

#[test]
fn assigned_client_id_and_server_keep_alive_are_honoured() {
    let mut ack = ConnAck::default();
    ack.properties.assigned_client_identifier = Some(MqttString::from_static("auto-42"));
    ack.properties.server_keep_alive = Some(5);
    let mut h = H::new(ClientSessionConfig::default());
    h.session.connect(h.now).unwrap();
    h.sent();
    h.feed(ack.into());
    assert!(matches!(&h.events()[..], [ClientEvent::Connected { client_id, .. }] if client_id == "auto-42"));
    h.advance(Duration::from_secs(5));
    assert_eq!(h.sent(), [Packet::PingReq]);
}

#[test]
fn refusal_is_reported() {
    let mut h = H::new(ClientSessionConfig::default());
    h.session.connect(h.now).unwrap();
    h.feed(ConnAck { reason_code: ReasonCode::NotAuthorized, ..Default::default() }.into());
    assert_eq!(h.events(), [ClientEvent::Refused { reason: ReasonCode::NotAuthorized }]);
}

#[test]
fn connect_timeout() {
    let mut h = H::new(ClientSessionConfig::default());
    h.session.connect(h.now).unwrap();
    h.advance(Duration::from_secs(9));
    assert!(h.events().is_empty());
    h.advance(Duration::from_secs(1));
    assert_eq!(h.events(), [ClientEvent::Disconnected { reason: DisconnectReason::ConnectTimeout }]);
}

#[test]
fn qos1_publish_completes_on_puback() {
    let mut h = H::v5();
    let id = h.session.publish(h.now, publish("a/b", QoS::AtLeastOnce)).unwrap();
    let sent = h.sent();
    let Packet::Publish(p) = &sent[0] else { panic!("{sent:?}") };
    let packet_id = p.packet_id().unwrap();
    assert!(!p.dup);
    h.feed(Packet::PubAck(Ack::new(packet_id)));
    assert_eq!(h.events(), [ClientEvent::Published { id, reason: ReasonCode::Success }]);
    assert_eq!(h.session.pending_publishes(), 0);
}

#[test]
fn qos2_publish_runs_pubrec_pubrel_pubcomp() {
    let mut h = H::v5();
    let id = h.session.publish(h.now, publish("a/b", QoS::ExactlyOnce)).unwrap();
    let Packet::Publish(p) = h.sent().remove(0) else { panic!() };
    let packet_id = p.packet_id().unwrap();
    h.feed(Packet::PubRec(Ack::new(packet_id)));
    assert_eq!(h.sent(), [Packet::PubRel(Ack::new(packet_id))]);
    assert!(h.events().is_empty(), "not complete before PUBCOMP");
    h.feed(Packet::PubComp(Ack::new(packet_id)));
    assert_eq!(h.events(), [ClientEvent::Published { id, reason: ReasonCode::Success }]);
}

#[test]
fn qos2_refused_at_pubrec_completes_with_the_failure() {
    let mut h = H::v5();
    let id = h.session.publish(h.now, publish("a/b", QoS::ExactlyOnce)).unwrap();
    let Packet::Publish(p) = h.sent().remove(0) else { panic!() };
    h.feed(Packet::PubRec(ack_with(p.packet_id().unwrap().get(), ReasonCode::QuotaExceeded)));
    assert!(h.sent().is_empty(), "no PUBREL after a failed PUBREC");
    assert_eq!(h.events(), [ClientEvent::Published { id, reason: ReasonCode::QuotaExceeded }]);
}

#[test]
fn receive_maximum_limits_what_is_in_flight() {
    let mut ack = ConnAck::default();
    ack.properties.receive_maximum = NonZeroU16::new(2);
    let mut h = H::connected(ClientSessionConfig::default(), ack);
    for _ in 0..5 {
        h.session.publish(h.now, publish("t", QoS::AtLeastOnce)).unwrap();
    }
    let first = h.sent();
    assert_eq!(first.len(), 2, "only two in flight");
    let Packet::Publish(p) = &first[0] else { panic!() };
    h.feed(Packet::PubAck(Ack::new(p.packet_id().unwrap())));
    assert_eq!(h.sent().len(), 1, "one acknowledged, one more sent");
    assert_eq!(h.session.pending_publishes(), 4);
}

#[test]
fn incoming_qos1_and_qos2_are_acknowledged_and_qos2_delivered_once() {
    let mut h = H::v5();
    let mut q1 = publish("in/1", QoS::AtLeastOnce);
    q1.qos_pid = QosPid::AtLeastOnce(pid(7));
    h.feed(Packet::Publish(q1.clone()));
    assert_eq!(h.events(), [ClientEvent::Message(q1)]);
    assert_eq!(h.sent(), [Packet::PubAck(Ack::new(pid(7)))]);

    let mut q2 = publish("in/2", QoS::ExactlyOnce);
    q2.qos_pid = QosPid::ExactlyOnce(pid(8));
    h.feed(Packet::Publish(q2.clone()));
    assert_eq!(h.events(), [ClientEvent::Message(q2.clone())]);
    assert_eq!(h.sent(), [Packet::PubRec(Ack::new(pid(8)))]);
    // The server resends (it lost our PUBREC): acknowledged again, not delivered again.
    q2.dup = true;
    h.feed(Packet::Publish(q2));
    assert!(h.events().is_empty());
    assert_eq!(h.sent(), [Packet::PubRec(Ack::new(pid(8)))]);
    h.feed(Packet::PubRel(Ack::new(pid(8))));
    assert_eq!(h.sent(), [Packet::PubComp(Ack::new(pid(8)))]);
    // A PUBREL for an identifier we do not hold.
    h.feed(Packet::PubRel(Ack::new(pid(9))));
    assert_eq!(h.sent(), [Packet::PubComp(ack_with(9, ReasonCode::PacketIdentifierNotFound))]);
}

#[test]
fn server_exceeding_our_receive_maximum_is_disconnected_with_0x93() {
    let config = ClientSessionConfig { receive_maximum: 2, ..Default::default() };
    let mut h = H::connected(config, ConnAck::default());
    for id in 1..=3 {
        let mut q2 = publish("x", QoS::ExactlyOnce);
        q2.qos_pid = QosPid::ExactlyOnce(pid(id));
        h.feed(Packet::Publish(q2));
    }
    let sent = h.sent();
    assert_eq!(sent.last(), Some(&Disconnect::new(ReasonCode::ReceiveMaximumExceeded).into()));
    assert!(h.events().contains(&ClientEvent::Disconnected {
        reason: DisconnectReason::ProtocolViolation(ReasonCode::ReceiveMaximumExceeded)
    }));
}

#[test]
fn keep_alive_pings_and_times_out() {
    let config = ClientSessionConfig { keep_alive: 10, ..Default::default() };
    let mut h = H::connected(config, ConnAck::default());
    assert_eq!(h.session.poll_timeout(), Some(h.now + Duration::from_secs(10)));
    h.advance(Duration::from_secs(10));
    assert_eq!(h.sent(), [Packet::PingReq]);
    h.feed(Packet::PingResp);
    h.advance(Duration::from_secs(10));
    assert_eq!(h.sent(), [Packet::PingReq]);
    // No PINGRESP this time.
    h.advance(Duration::from_secs(10));
    assert!(h.events().contains(&ClientEvent::Disconnected { reason: DisconnectReason::KeepAliveTimeout }));
}

#[test]
fn sending_anything_postpones_the_ping() {
    let config = ClientSessionConfig { keep_alive: 10, ..Default::default() };
    let mut h = H::connected(config, ConnAck::default());
    h.advance(Duration::from_secs(8));
    h.session.publish(h.now, publish("t", QoS::AtMostOnce)).unwrap();
    h.sent();
    h.advance(Duration::from_secs(8));
    assert!(h.sent().is_empty());
    h.advance(Duration::from_secs(2));
    assert_eq!(h.sent(), [Packet::PingReq]);
}

#[test]
fn resumed_session_resends_publish_with_dup_and_pubrel() {
    let config = ClientSessionConfig { session_expiry: 3600, ..Default::default() };
    let mut h = H::connected(config, ConnAck::default());
    h.session.publish(h.now, publish("q1", QoS::AtLeastOnce)).unwrap();
    h.session.publish(h.now, publish("q2", QoS::ExactlyOnce)).unwrap();
    let sent = h.sent();
    let ids: Vec<PacketId> =
        sent.iter().filter_map(|p| if let Packet::Publish(p) = p { p.packet_id() } else { None }).collect();
    h.feed(Packet::PubRec(Ack::new(ids[1])));
    h.sent();
    h.session.handle_stream_closed(h.now);
    assert_eq!(h.events(), [ClientEvent::Disconnected { reason: DisconnectReason::TransportLost }]);
    h.session.connect(h.now).unwrap();
    let Packet::Connect(c) = h.sent().remove(0) else { panic!() };
    assert!(!c.clean_start, "reconnects resume the session");
    h.feed(ConnAck { session_present: true, ..Default::default() }.into());
    let resent = h.sent();
    let Packet::Publish(p) = &resent[0] else { panic!("{resent:?}") };
    assert!(p.dup && p.packet_id() == Some(ids[0]) && p.topic.as_str() == "q1");
    assert_eq!(resent[1], Packet::PubRel(Ack::new(ids[1])));
}

#[test]
fn lost_session_sends_pending_publishes_again_and_resubscribes() {
    let mut h = H::v5();
    let sub = Subscription {
        filter: TopicFilter::new("cmd/#").unwrap(),
        options: SubscriptionOptions { qos: QoS::AtLeastOnce, ..Default::default() },
    };
    let sid = h.session.subscribe(h.now, vec![sub.clone()], SubscriptionId::new(7)).unwrap();
    let Packet::Subscribe(s) = h.sent().remove(0) else { panic!() };
    assert_eq!(s.properties.subscription_identifier, SubscriptionId::new(7));
    h.feed(Packet::SubAck(SubAck {
        packet_id: s.packet_id,
        properties: Default::default(),
        reason_codes: [ReasonCode::GrantedQos1].into_iter().collect(),
    }));
    assert_eq!(h.events(), [ClientEvent::Subscribed { id: sid, reason_codes: vec![ReasonCode::GrantedQos1] }]);
    h.session.publish(h.now, publish("q1", QoS::AtLeastOnce)).unwrap();
    let pending = h.session.unsubscribe(h.now, vec![TopicFilter::new("x").unwrap()]).unwrap();
    h.sent();
    h.session.handle_stream_closed(h.now);
    assert!(h.events().contains(&ClientEvent::Aborted { id: pending }));
    h.session.connect(h.now).unwrap();
    h.sent();
    h.feed(ConnAck::default().into());
    let after = h.sent();
    assert!(matches!(&after[0], Packet::Subscribe(s) if s.subscriptions.first() == Some(sub)), "{after:?}");
    assert!(matches!(&after[1], Packet::Publish(p) if !p.dup && p.topic.as_str() == "q1"), "{after:?}");
}

#[test]
fn topic_aliases_from_the_server() {
    let config = ClientSessionConfig { topic_alias_maximum: 2, ..Default::default() };
    let mut h = H::connected(config, ConnAck::default());
    let mut set = publish("long/topic/name", QoS::AtMostOnce);
    set.properties.topic_alias = NonZeroU16::new(1);
    h.feed(Packet::Publish(set));
    let mut used = Publish::new(TopicName::empty(), &b"x"[..]);
    used.properties.topic_alias = NonZeroU16::new(1);
    h.feed(Packet::Publish(used));
    let events = h.events();
    assert!(matches!(&events[1], ClientEvent::Message(p) if p.topic.as_str() == "long/topic/name"));
    // Beyond our maximum: Topic Alias invalid.
    let mut bad = publish("t", QoS::AtMostOnce);
    bad.properties.topic_alias = NonZeroU16::new(3);
    h.feed(Packet::Publish(bad));
    assert_eq!(h.sent(), [Disconnect::new(ReasonCode::TopicAliasInvalid).into()]);
}

#[test]
fn outbound_topic_aliases_within_the_server_maximum() {
    let mut ack = ConnAck::default();
    ack.properties.topic_alias_maximum = Some(1);
    let mut h = H::connected(ClientSessionConfig::default(), ack);
    for topic in ["a/b", "a/b", "c"] {
        h.session.publish(h.now, publish(topic, QoS::AtMostOnce)).unwrap();
    }
    let sent: Vec<(String, Option<u16>)> = h
        .sent()
        .into_iter()
        .map(|p| match p {
            Packet::Publish(p) => (p.topic.to_string(), p.properties.topic_alias.map(|a| a.get())),
            other => panic!("{other:?}"),
        })
        .collect();
    // Set, used, and no alias left for the third topic.
    assert_eq!(sent, [("a/b".into(), Some(1)), ("".into(), Some(1)), ("c".into(), None)]);
}

#[test]
fn unknown_alias_is_a_protocol_error() {
    let mut h = H::v5();
    let mut used = Publish::new(TopicName::empty(), &b"x"[..]);
    used.properties.topic_alias = NonZeroU16::new(1);
    h.feed(Packet::Publish(used));
    assert_eq!(h.sent(), [Disconnect::new(ReasonCode::ProtocolError).into()]);
}

#[test]
fn unsubscribe_completes_with_codes() {
    let mut h = H::v5();
    let id = h.session.unsubscribe(h.now, vec![TopicFilter::new("a").unwrap()]).unwrap();
    let Packet::Unsubscribe(u) = h.sent().remove(0) else { panic!() };
    h.feed(Packet::UnsubAck(UnsubAck {
        packet_id: u.packet_id,
        properties: Default::default(),
        reason_codes: [ReasonCode::NoSubscriptionExisted].into_iter().collect(),
    }));
    assert_eq!(h.events(), [ClientEvent::Unsubscribed { id, reason_codes: vec![ReasonCode::NoSubscriptionExisted] }]);
}

#[test]
fn server_breaking_the_protocol_gets_the_reason_code() {
    // A packet only clients send.
    let mut h = H::v5();
    h.feed(Packet::PingReq);
    assert_eq!(h.sent(), [Disconnect::new(ReasonCode::ProtocolError).into()]);
    // Malformed bytes.
    let mut h = H::v5();
    h.session.handle_stream_data(h.now, &[0x40, 0x02, 0x00, 0x00]);
    assert_eq!(h.sent(), [Disconnect::new(ReasonCode::MalformedPacket).into()]);
    assert!(h.events().contains(&ClientEvent::Disconnected {
        reason: DisconnectReason::ProtocolViolation(ReasonCode::MalformedPacket)
    }));
    // The server's DISCONNECT.
    let mut h = H::v5();
    h.feed(Disconnect::new(ReasonCode::SessionTakenOver).into());
    assert_eq!(
        h.events(),
        [ClientEvent::Disconnected { reason: DisconnectReason::ByServer(ReasonCode::SessionTakenOver) }]
    );
}

#[test]
fn limits_from_connack_are_enforced_on_publish() {
    let mut ack = ConnAck::default();
    ack.properties.maximum_qos = Some(QoS::AtLeastOnce);
    ack.properties.retain_available = Some(false);
    ack.properties.maximum_packet_size = std::num::NonZeroU32::new(64);
    let mut h = H::connected(ClientSessionConfig::default(), ack);
    assert_eq!(
        h.session.publish(h.now, publish("t", QoS::ExactlyOnce)),
        Err(CommandError::QosNotSupported(QoS::AtLeastOnce))
    );
    let mut r = publish("t", QoS::AtMostOnce);
    r.retain = true;
    assert_eq!(h.session.publish(h.now, r), Err(CommandError::RetainNotSupported));
    let big = Publish::new(TopicName::new("t").unwrap(), vec![0u8; 100]);
    assert!(matches!(h.session.publish(h.now, big), Err(CommandError::PacketTooLarge { max: 64, .. })));
}

#[test]
fn mqtt_311_session() {
    let config = ClientSessionConfig { protocol: Protocol::V3_1_1, client_id: "c".into(), ..Default::default() };
    let mut h = H::connected(config, ConnAck::default());
    let id = h.session.publish(h.now, publish("a", QoS::AtLeastOnce)).unwrap();
    let Packet::Publish(p) = h.sent().remove(0) else { panic!() };
    h.feed(Packet::PubAck(Ack::new(p.packet_id().unwrap())));
    assert_eq!(h.events(), [ClientEvent::Published { id, reason: ReasonCode::Success }]);
    // 3.1.1 has no reason codes to send: a violation just ends the connection.
    h.feed(Packet::PingReq);
    assert!(h.sent().is_empty());
    assert!(matches!(h.events()[..], [ClientEvent::Disconnected { .. }]));
}

/// A control session connected with `connack`, and a data stream's session of it.
fn with_data_stream(connack: ConnAck) -> (H, H) {
    let control = H::connected(ClientSessionConfig::default(), connack);
    let stream = Harness::with(Protocol::V5, |_| control.session.data_stream());
    (control, stream)
}

#[test]
fn a_data_stream_waits_for_its_stream_then_obeys_the_connack_limits_without_aliases() {
    let mut ack = ConnAck::default();
    ack.properties.receive_maximum = NonZeroU16::new(2);
    ack.properties.topic_alias_maximum = Some(10);
    ack.properties.maximum_qos = Some(QoS::AtLeastOnce);
    let (control, mut d) = with_data_stream(ack);
    assert!(d.session.is_data_stream() && !control.session.is_data_stream());
    // The control stream's packets are not a data stream's to send.
    assert_eq!(d.session.connect(d.now), Err(CommandError::WrongState));
    assert_eq!(d.session.disconnect(d.now, ReasonCode::Success), Err(CommandError::WrongState));
    assert_eq!(d.session.auth(d.now, Auth::default()), Err(CommandError::WrongState));
    // The CONNACK's limits hold from the start.
    assert_eq!(
        d.session.publish(d.now, publish("a", QoS::ExactlyOnce)),
        Err(CommandError::QosNotSupported(QoS::AtLeastOnce))
    );
    // Before its stream is open, requests wait (QoS 0 needs the stream).
    assert_eq!(d.session.publish(d.now, publish("a", QoS::AtMostOnce)), Err(CommandError::NotConnected));
    let sub = d
        .session
        .subscribe(d.now, vec![Subscription::new(TopicFilter::new("s").unwrap(), QoS::AtLeastOnce)], None)
        .unwrap();
    let ids: Vec<RequestId> =
        (0..3).map(|_| d.session.publish(d.now, publish("a/b", QoS::AtLeastOnce)).unwrap()).collect();
    assert!(ids.iter().all(|id| *id > sub));
    assert!(d.sent().is_empty());
    d.session.resume_data_stream(d.now, &control.session).unwrap();
    assert_eq!(d.session.resume_data_stream(d.now, &control.session), Err(CommandError::WrongState));
    let sent = d.sent();
    // The SUBSCRIBE, then as many PUBLISHes as the Receive Maximum allows, none with an alias.
    assert!(matches!(&sent[0], Packet::Subscribe(s) if s.subscriptions.len() == 1), "{sent:?}");
    assert_eq!(sent.len(), 3, "{sent:?}");
    for p in &sent[1..] {
        let Packet::Publish(p) = p else { panic!("{p:?}") };
        assert!(p.properties.topic_alias.is_none() && p.topic.as_str() == "a/b");
    }
}

#[test]
fn a_data_stream_that_ends_gives_up_qos_2_in_flight_and_resends_qos_1_on_the_next() {
    let (control, mut d) = with_data_stream(ConnAck::default());
    d.session.resume_data_stream(d.now, &control.session).unwrap();
    let filter = TopicFilter::new("s/#").unwrap();
    let sub = d.session.subscribe(d.now, vec![Subscription::new(filter.clone(), QoS::AtLeastOnce)], None).unwrap();
    let Packet::Subscribe(s) = d.sent().remove(0) else { panic!() };
    d.feed(
        SubAck {
            packet_id: s.packet_id,
            properties: Default::default(),
            reason_codes: vec![ReasonCode::GrantedQos1].into(),
        }
        .into(),
    );
    assert!(matches!(&d.events()[..], [ClientEvent::Subscribed { id, .. }] if *id == sub));
    let one = d.session.publish(d.now, publish("t", QoS::AtLeastOnce)).unwrap();
    let two = d.session.publish(d.now, publish("t", QoS::ExactlyOnce)).unwrap();
    assert_eq!(d.sent().len(), 2);
    d.session.handle_stream_closed(d.now);
    // Its stream (and the server's QoS 2 state with it) is gone: QoS 2 is given up.
    let events = d.events();
    assert!(events.contains(&ClientEvent::Aborted { id: two }), "{events:?}");
    assert!(!events.iter().any(|e| matches!(e, ClientEvent::Aborted { id } if *id == one)));
    // On its next stream: the subscription again, then the QoS 1 message again (DUP).
    d.session.resume_data_stream(d.now, &control.session).unwrap();
    let sent = d.sent();
    assert!(
        matches!(&sent[..], [Packet::Subscribe(s), Packet::Publish(p)]
        if s.subscriptions.iter().next().is_some_and(|s| s.filter == filter) && p.dup && p.qos() == QoS::AtLeastOnce),
        "{sent:?}"
    );
    assert_eq!(d.session.pending_publishes(), 1);
    // Closing it for good ends what is left.
    assert!(d.session.close_data_stream(d.now).is_none());
    assert!(d.events().contains(&ClientEvent::Aborted { id: one }));
    assert!(d.session.subscriptions().is_empty());
}

#[test]
fn a_control_packet_on_a_data_stream_ends_that_stream_without_disconnect() {
    for packet in [Packet::PingResp, ConnAck::default().into(), Disconnect::new(ReasonCode::Success).into()] {
        let (control, mut d) = with_data_stream(ConnAck::default());
        d.session.resume_data_stream(d.now, &control.session).unwrap();
        d.feed(packet);
        assert_eq!(
            d.events(),
            [ClientEvent::Disconnected { reason: DisconnectReason::ProtocolViolation(ReasonCode::ProtocolError) }]
        );
        assert!(d.sent().is_empty(), "no DISCONNECT on a data stream");
    }
}
