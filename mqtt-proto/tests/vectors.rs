//! Byte vectors written by hand from the figures and rules of the MQTT 3.1.1 and 5.0 specs: each
//! valid vector must decode to the expected packet and encode back to the same bytes; each invalid
//! one must fail with the expected error and reason code.

mod support;

use bytes::{Bytes, BytesMut};
use mqtt_proto::*;
use support::*;

/// Decodes, compares with `expected`, and checks the encoding is the same bytes.
fn both_ways(protocol: Protocol, bytes: &[u8], expected: Packet) {
    let decoded = dec(protocol, bytes).unwrap();
    assert_eq!(decoded, expected);
    assert_eq!(enc(protocol, &expected), bytes, "encoding of {expected:?}");
}

fn s(v: &str) -> MqttString {
    MqttString::try_from(v).unwrap()
}

fn pid(v: u16) -> PacketId {
    PacketId::new(v).unwrap()
}

#[test]
fn connect_v311_with_will_and_credentials() {
    let bytes = [
        0x10, 25, 0, 4, b'M', b'Q', b'T', b'T', 4, 0xCE, 0, 10, 0, 1, b'c', 0, 1, b'w', 0, 1, b'm', 0, 1, b'u', 0, 1,
        b'p',
    ];
    let mut c = Connect::new(V3, s("c"));
    c.keep_alive = 10;
    c.will = Some(Will {
        topic: TopicName::new("w").unwrap(),
        payload: Bytes::from_static(b"m"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Default::default(),
    });
    c.username = Some(s("u"));
    c.password = Some(Bytes::from_static(b"p"));
    both_ways(V3, &bytes, c.into());
}

#[test]
fn connect_v31_mqisdp() {
    let bytes = [0x10, 17, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 0x02, 0, 60, 0, 3, b'a', b'b', b'c'];
    let c = Connect::new(Protocol::V3_1, s("abc"));
    // CONNECT decodes the same whatever the decoder was set to.
    both_ways(V5, &bytes, c.into());
}

#[test]
fn connect_v5_with_properties() {
    let bytes = [
        0x10, 32, 0, 4, b'M', b'Q', b'T', b'T', 5, 0xCE, 0, 10, // header
        5, 0x11, 0, 0, 0, 10, // session expiry 10
        0, 1, b'c', // client id
        0,    // will properties
        0, 1, b'w', 0, 1, b'm', 0, 1, b'u', 0, 1, b'p',
    ];
    let mut c = Connect::new(V5, s("c"));
    c.keep_alive = 10;
    c.properties.session_expiry_interval = Some(10);
    c.will = Some(Will {
        topic: TopicName::new("w").unwrap(),
        payload: Bytes::from_static(b"m"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Default::default(),
    });
    c.username = Some(s("u"));
    c.password = Some(Bytes::from_static(b"p"));
    both_ways(V5, &bytes, c.into());
}

#[test]
fn connect_errors() {
    let base = |flags: u8, name: &[u8], level: u8| {
        let mut v = vec![0x10, 0];
        v.extend_from_slice(&(name.len() as u16).to_be_bytes());
        v.extend_from_slice(name);
        v.extend_from_slice(&[level, flags, 0, 60, 0, 1, b'c']);
        v[1] = (v.len() - 2) as u8;
        v
    };
    err(V3, &base(0x03, b"MQTT", 4), DecodeError::InvalidConnectFlags(0x03), ReasonCode::MalformedPacket);
    err(V3, &base(0x0A, b"MQTT", 4), DecodeError::InvalidConnectFlags(0x0A), ReasonCode::MalformedPacket);
    err(V3, &base(0x22, b"MQTT", 4), DecodeError::InvalidConnectFlags(0x22), ReasonCode::MalformedPacket);
    err(V3, &base(0x1C, b"MQTT", 4), DecodeError::InvalidQos, ReasonCode::MalformedPacket);
    err(V3, &base(0x42, b"MQTT", 4), DecodeError::PasswordWithoutUsername, ReasonCode::MalformedPacket);
    err(V3, &base(0x02, b"MQTX", 4), DecodeError::InvalidProtocolName, ReasonCode::UnsupportedProtocolVersion);
    err(V3, &base(0x02, b"MQTT", 6), DecodeError::UnsupportedProtocolLevel(6), ReasonCode::UnsupportedProtocolVersion);
    err(
        V3,
        &base(0x02, b"MQIsdp", 4),
        DecodeError::UnsupportedProtocolLevel(4),
        ReasonCode::UnsupportedProtocolVersion,
    );
    // CONNECT with its fixed-header flags set.
    let mut bad = base(0x02, b"MQTT", 4);
    bad[0] = 0x11;
    err(V3, &bad, DecodeError::InvalidFlags { packet_type: 1, flags: 1 }, ReasonCode::MalformedPacket);
}

#[test]
fn connack_both_versions() {
    let ok = ConnAck { session_present: true, ..Default::default() };
    both_ways(V3, &[0x20, 2, 0x01, 0x00], ok.clone().into());
    let refused = ConnAck { reason_code: ReasonCode::NotAuthorized, ..Default::default() };
    both_ways(V3, &[0x20, 2, 0x00, 0x05], refused.into());
    both_ways(V5, &[0x20, 3, 0x01, 0x00, 0x00], ok.into());
    let mut with_props = ConnAck::default();
    with_props.properties.receive_maximum = std::num::NonZeroU16::new(10);
    both_ways(V5, &[0x20, 6, 0x00, 0x00, 3, 0x21, 0, 10], with_props.into());

    err(V3, &[0x20, 2, 0x00, 0x06], DecodeError::InvalidConnAckCode(6), ReasonCode::MalformedPacket);
    err(V5, &[0x20, 3, 0x01, 0x80, 0], DecodeError::InvalidConnAckFlags(1), ReasonCode::MalformedPacket);
    err(V5, &[0x20, 3, 0x02, 0x00, 0], DecodeError::InvalidConnAckFlags(2), ReasonCode::MalformedPacket);
    err(
        V5,
        &[0x20, 3, 0x00, 0x8E, 0],
        DecodeError::InvalidReasonCode { code: 0x8E, packet: ReasonPacket::ConnAck },
        ReasonCode::MalformedPacket,
    );
    err(V3, &[0x20, 3, 0x00, 0x00, 0x00], DecodeError::TrailingBytes(1), ReasonCode::MalformedPacket);
}

#[test]
fn publish_vectors() {
    let mut p = Publish::new(TopicName::new("a/b").unwrap(), &b"hi"[..]);
    p.qos_pid = QosPid::AtLeastOnce(pid(10));
    both_ways(V3, &[0x32, 9, 0, 3, b'a', b'/', b'b', 0, 10, b'h', b'i'], p.clone().into());
    both_ways(V5, &[0x32, 10, 0, 3, b'a', b'/', b'b', 0, 10, 0, b'h', b'i'], p.clone().into());
    p.dup = true;
    p.retain = true;
    p.qos_pid = QosPid::ExactlyOnce(pid(10));
    both_ways(V3, &[0x3D, 9, 0, 3, b'a', b'/', b'b', 0, 10, b'h', b'i'], p.into());

    // MQTT 5: empty topic with a topic alias.
    let mut aliased = Publish::new(TopicName::empty(), &b"x"[..]);
    aliased.properties.topic_alias = std::num::NonZeroU16::new(1);
    both_ways(V5, &[0x30, 7, 0, 0, 3, 0x23, 0, 1, b'x'], aliased.into());
}

#[test]
fn publish_errors() {
    err(V3, &[0x36, 5, 0, 1, b'a', 0, 1], DecodeError::InvalidQos, ReasonCode::MalformedPacket);
    err(V3, &[0x38, 3, 0, 1, b'a'], DecodeError::DupOnQos0, ReasonCode::MalformedPacket);
    err(V3, &[0x32, 5, 0, 1, b'a', 0, 0], DecodeError::ZeroPacketId, ReasonCode::MalformedPacket);
    err(V3, &[0x32, 4, 0, 1, b'a', 0], DecodeError::UnexpectedEnd, ReasonCode::MalformedPacket);
    err(V3, &[0x30, 4, 0, 2, 0xC3, 0x28], DecodeError::InvalidUtf8, ReasonCode::MalformedPacket);
    err(V3, &[0x30, 4, 0, 2, b'a', 0x00], DecodeError::NullCharacter, ReasonCode::MalformedPacket);
    err(V3, &[0x30, 5, 0, 3, b'a', b'/', b'+'], DecodeError::InvalidTopicName, ReasonCode::TopicNameInvalid);
    err(V3, &[0x30, 3, 0, 1, b'#'], DecodeError::InvalidTopicName, ReasonCode::TopicNameInvalid);
    err(V3, &[0x30, 2, 0, 0], DecodeError::InvalidTopicName, ReasonCode::TopicNameInvalid);
    err(V5, &[0x30, 3, 0, 0, 0], DecodeError::EmptyTopicWithoutAlias, ReasonCode::ProtocolError);
    err(V5, &[0x30, 7, 0, 1, b'a', 3, 0x23, 0, 0], DecodeError::ZeroTopicAlias, ReasonCode::TopicAliasInvalid);
    err(
        V5,
        &[0x30, 14, 0, 1, b'a', 10, 0x02, 0, 0, 0, 1, 0x02, 0, 0, 0, 2],
        DecodeError::DuplicateProperty(0x02),
        ReasonCode::ProtocolError,
    );
    err(
        V5,
        &[0x30, 9, 0, 1, b'a', 5, 0x11, 0, 0, 0, 1],
        DecodeError::PropertyNotAllowed { id: 0x11, packet: "PUBLISH" },
        ReasonCode::MalformedPacket,
    );
    err(V5, &[0x30, 6, 0, 1, b'a', 2, 0x01, 2], DecodeError::InvalidPropertyValue(0x01), ReasonCode::ProtocolError);
    // Property length longer than the packet.
    err(V5, &[0x30, 5, 0, 1, b'a', 9, 0x01], DecodeError::UnexpectedEnd, ReasonCode::MalformedPacket);
    // A five-byte remaining length.
    err(V3, &[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01], DecodeError::MalformedVarInt, ReasonCode::MalformedPacket);
}

#[test]
fn pub_ack_family() {
    let ack = Ack::new(pid(1));
    both_ways(V3, &[0x40, 2, 0, 1], Packet::PubAck(ack.clone()));
    both_ways(V3, &[0x50, 2, 0, 1], Packet::PubRec(ack.clone()));
    both_ways(V3, &[0x62, 2, 0, 1], Packet::PubRel(ack.clone()));
    both_ways(V3, &[0x70, 2, 0, 1], Packet::PubComp(ack.clone()));
    both_ways(V5, &[0x40, 2, 0, 1], Packet::PubAck(ack.clone()));
    // The long form of a plain success decodes the same (spec 3.4.2.1).
    assert_eq!(dec(V5, &[0x40, 4, 0, 1, 0, 0]).unwrap(), Packet::PubAck(ack.clone()));
    assert_eq!(dec(V5, &[0x40, 3, 0, 1, 0]).unwrap(), Packet::PubAck(ack));
    let mut nms = Ack::new(pid(1));
    nms.reason_code = ReasonCode::NoMatchingSubscribers;
    both_ways(V5, &[0x40, 3, 0, 1, 0x10], Packet::PubAck(nms));
    let mut nf = Ack::new(pid(1));
    nf.reason_code = ReasonCode::PacketIdentifierNotFound;
    nf.properties.reason_string = Some(s("x"));
    both_ways(V5, &[0x70, 8, 0, 1, 0x92, 4, 0x1F, 0, 1, b'x'], Packet::PubComp(nf));

    err(V3, &[0x60, 2, 0, 1], DecodeError::InvalidFlags { packet_type: 6, flags: 0 }, ReasonCode::MalformedPacket);
    err(V3, &[0x41, 2, 0, 1], DecodeError::InvalidFlags { packet_type: 4, flags: 1 }, ReasonCode::MalformedPacket);
    err(V3, &[0x40, 2, 0, 0], DecodeError::ZeroPacketId, ReasonCode::MalformedPacket);
    err(V3, &[0x40, 3, 0, 1, 0], DecodeError::TrailingBytes(1), ReasonCode::MalformedPacket);
    err(
        V5,
        &[0x40, 3, 0, 1, 0x01],
        DecodeError::InvalidReasonCode { code: 1, packet: ReasonPacket::PubAckRec },
        ReasonCode::MalformedPacket,
    );
    err(
        V5,
        &[0x62, 3, 0, 1, 0x10],
        DecodeError::InvalidReasonCode { code: 0x10, packet: ReasonPacket::PubRelComp },
        ReasonCode::MalformedPacket,
    );
}

fn sub(filter: &str, qos: QoS) -> Subscription {
    Subscription {
        filter: TopicFilter::new(filter).unwrap(),
        options: SubscriptionOptions { qos, ..Default::default() },
    }
}

#[test]
fn subscribe_vectors() {
    let s3 = Subscribe {
        packet_id: pid(10),
        properties: Default::default(),
        subscriptions: [sub("a/b", QoS::AtLeastOnce), sub("c/d", QoS::ExactlyOnce)].into_iter().collect(),
    };
    both_ways(V3, &[0x82, 14, 0, 10, 0, 3, b'a', b'/', b'b', 1, 0, 3, b'c', b'/', b'd', 2], s3.into());

    let mut one = sub("a/+", QoS::AtLeastOnce);
    one.options.no_local = true;
    one.options.retain_as_published = true;
    one.options.retain_handling = RetainHandling::DoNotSend;
    let mut s5 =
        Subscribe { packet_id: pid(10), properties: Default::default(), subscriptions: [one].into_iter().collect() };
    s5.properties.subscription_identifier = SubscriptionId::new(5);
    both_ways(V5, &[0x82, 11, 0, 10, 2, 0x0B, 5, 0, 3, b'a', b'/', b'+', 0x2D], s5.into());

    err(
        V3,
        &[0x80, 6, 0, 1, 0, 1, b'a', 0],
        DecodeError::InvalidFlags { packet_type: 8, flags: 0 },
        ReasonCode::MalformedPacket,
    );
    err(V3, &[0x82, 2, 0, 1], DecodeError::EmptyPayload, ReasonCode::ProtocolError);
    err(V5, &[0x82, 3, 0, 1, 0], DecodeError::EmptyPayload, ReasonCode::ProtocolError);
    err(
        V3,
        &[0x82, 6, 0, 1, 0, 1, b'a', 0x04],
        DecodeError::InvalidSubscriptionOptions(4),
        ReasonCode::MalformedPacket,
    );
    err(V3, &[0x82, 6, 0, 1, 0, 1, b'a', 0x03], DecodeError::InvalidQos, ReasonCode::MalformedPacket);
    // 3.8.3.1: Retain Handling 3 and Maximum QoS 3 are Protocol Errors in MQTT 5.
    err(
        V5,
        &[0x82, 7, 0, 1, 0, 0, 1, b'a', 0x30],
        DecodeError::SubscriptionOptionOutOfRange(0x30),
        ReasonCode::ProtocolError,
    );
    err(
        V5,
        &[0x82, 7, 0, 1, 0, 0, 1, b'a', 0x40],
        DecodeError::InvalidSubscriptionOptions(0x40),
        ReasonCode::MalformedPacket,
    );
    err(
        V5,
        &[0x82, 7, 0, 1, 0, 0, 1, b'a', 0x03],
        DecodeError::SubscriptionOptionOutOfRange(0x03),
        ReasonCode::ProtocolError,
    );
    err(
        V3,
        &[0x82, 10, 0, 1, 0, 5, b'a', b'/', b'#', b'/', b'b', 0],
        DecodeError::InvalidTopicFilter,
        ReasonCode::TopicFilterInvalid,
    );
    err(V3, &[0x82, 7, 0, 1, 0, 2, b'a', b'+', 0], DecodeError::InvalidTopicFilter, ReasonCode::TopicFilterInvalid);
    err(V3, &[0x82, 5, 0, 1, 0, 0, 0], DecodeError::InvalidTopicFilter, ReasonCode::TopicFilterInvalid);
    let share = b"$share/g";
    let mut v = vec![0x82, 0, 0, 1, 0, share.len() as u8];
    v.extend_from_slice(share);
    v.push(0);
    v[1] = (v.len() - 2) as u8;
    err(V3, &v, DecodeError::InvalidTopicFilter, ReasonCode::TopicFilterInvalid);
    // No Local on a shared subscription [MQTT-3.8.3-4].
    let share = b"$share/g/a";
    let mut v = vec![0x82, 0, 0, 1, 0, 0, share.len() as u8];
    v.extend_from_slice(share);
    v.push(0x04);
    v[1] = (v.len() - 2) as u8;
    err(V5, &v, DecodeError::NoLocalOnSharedSubscription, ReasonCode::ProtocolError);
}

#[test]
fn suback_vectors() {
    let a = SubAck {
        packet_id: pid(10),
        properties: Default::default(),
        reason_codes: [ReasonCode::GrantedQos1, ReasonCode::UnspecifiedError].into_iter().collect(),
    };
    both_ways(V3, &[0x90, 4, 0, 10, 0x01, 0x80], a.into());
    let b = SubAck {
        packet_id: pid(10),
        properties: Default::default(),
        reason_codes: [ReasonCode::GrantedQos2, ReasonCode::TopicFilterInvalid].into_iter().collect(),
    };
    both_ways(V5, &[0x90, 5, 0, 10, 0, 0x02, 0x8F], b.into());
    err(V3, &[0x90, 3, 0, 10, 0x03], DecodeError::InvalidSubAckCode(3), ReasonCode::MalformedPacket);
    err(V3, &[0x90, 2, 0, 10], DecodeError::EmptyPayload, ReasonCode::ProtocolError);
}

#[test]
fn unsubscribe_and_unsuback_vectors() {
    let u = Unsubscribe {
        packet_id: pid(11),
        properties: Default::default(),
        filters: [TopicFilter::new("x").unwrap()].into_iter().collect(),
    };
    both_ways(V3, &[0xA2, 5, 0, 11, 0, 1, b'x'], u.clone().into());
    both_ways(V5, &[0xA2, 6, 0, 11, 0, 0, 1, b'x'], u.into());
    err(V3, &[0xA2, 2, 0, 11], DecodeError::EmptyPayload, ReasonCode::ProtocolError);
    err(
        V3,
        &[0xA0, 5, 0, 11, 0, 1, b'x'],
        DecodeError::InvalidFlags { packet_type: 10, flags: 0 },
        ReasonCode::MalformedPacket,
    );

    let a3 = UnsubAck { packet_id: pid(11), properties: Default::default(), reason_codes: Default::default() };
    both_ways(V3, &[0xB0, 2, 0, 11], a3.into());
    let a5 = UnsubAck {
        packet_id: pid(11),
        properties: Default::default(),
        reason_codes: [ReasonCode::NoSubscriptionExisted].into_iter().collect(),
    };
    both_ways(V5, &[0xB0, 4, 0, 11, 0, 0x11], a5.into());
    err(V3, &[0xB0, 3, 0, 11, 0], DecodeError::TrailingBytes(1), ReasonCode::MalformedPacket);
    err(V5, &[0xB0, 3, 0, 11, 0], DecodeError::EmptyPayload, ReasonCode::ProtocolError);
}

#[test]
fn ping_disconnect_auth() {
    both_ways(V3, &[0xC0, 0], Packet::PingReq);
    both_ways(V3, &[0xD0, 0], Packet::PingResp);
    both_ways(V3, &[0xE0, 0], Disconnect::default().into());
    both_ways(V5, &[0xE0, 0], Disconnect::default().into());
    both_ways(V5, &[0xE0, 1, 0x04], Disconnect::new(ReasonCode::DisconnectWithWill).into());
    let mut d = Disconnect::new(ReasonCode::SessionTakenOver);
    d.properties.reason_string = Some(s("bye"));
    both_ways(V5, &[0xE0, 8, 0x8E, 6, 0x1F, 0, 3, b'b', b'y', b'e'], d.into());
    err(V3, &[0xC0, 1, 0], DecodeError::TrailingBytes(1), ReasonCode::MalformedPacket);
    err(V3, &[0xE0, 1, 0x04], DecodeError::TrailingBytes(1), ReasonCode::MalformedPacket);
    err(
        V5,
        &[0xE0, 1, 0x85],
        DecodeError::InvalidReasonCode { code: 0x85, packet: ReasonPacket::Disconnect },
        ReasonCode::MalformedPacket,
    );

    both_ways(V5, &[0xF0, 0], Auth::default().into());
    let mut a = Auth { reason_code: ReasonCode::ContinueAuthentication, ..Default::default() };
    a.properties.authentication_method = Some(s("SCRAM"));
    both_ways(V5, &[0xF0, 10, 0x18, 8, 0x15, 0, 5, b'S', b'C', b'R', b'A', b'M'], a.into());
    err(V3, &[0xF0, 0], DecodeError::AuthBeforeV5, ReasonCode::MalformedPacket);
    err(V5, &[0x00, 0], DecodeError::ReservedPacketType(0), ReasonCode::MalformedPacket);
}

#[test]
fn encoding_refuses_what_cannot_be_sent() {
    let mut out = BytesMut::new();
    assert_eq!(Packet::Auth(Auth::default()).encode(V3, &mut out), Err(EncodeError::NotInProtocol("AUTH")));
    let p = Publish::new(TopicName::empty(), &b""[..]);
    assert_eq!(Packet::Publish(p).encode(V5, &mut out), Err(EncodeError::EmptyTopic));
    let big = Publish::new(TopicName::new("t").unwrap(), Bytes::from(vec![0u8; 268_435_455]));
    assert!(matches!(Packet::Publish(big).encode(V3, &mut out), Err(EncodeError::PacketTooLarge(_))));
    // Strings cannot be built too long; binary fields are checked when encoding.
    assert_eq!(MqttString::try_from("x".repeat(70_000)), Err(DecodeError::StringTooLong(70_000)));
    let mut long = Connect::new(V3, s("c"));
    long.username = Some(s("u"));
    long.password = Some(Bytes::from(vec![0u8; 70_000]));
    assert_eq!(Packet::from(long).encode(V3, &mut out), Err(EncodeError::FieldTooLong(70_000)));
    let empty = Subscribe { packet_id: pid(1), properties: Default::default(), subscriptions: Default::default() };
    assert_eq!(Packet::Subscribe(empty).encode(V3, &mut out), Err(EncodeError::EmptyPayload));
    assert!(out.is_empty(), "failed encodes write nothing");
}

#[test]
fn v311_drops_mqtt5_only_fields() {
    let mut ack = Ack::new(pid(3));
    ack.reason_code = ReasonCode::QuotaExceeded;
    ack.properties.reason_string = Some(s("full"));
    assert_eq!(enc(V3, &Packet::PubAck(ack)), [0x40, 2, 0, 3]);
    let refused = ConnAck { reason_code: ReasonCode::Banned, session_present: true, ..Default::default() };
    assert_eq!(enc(V3, &refused.into()), [0x20, 2, 0, 3]);
    // Subscription options beyond QoS are reserved in 3.1.1 and must go out as zero.
    let mut first = sub("a", QoS::ExactlyOnce);
    first.options.no_local = true;
    first.options.retain_as_published = true;
    first.options.retain_handling = RetainHandling::DoNotSend;
    let subscribe = Subscribe {
        packet_id: pid(2),
        properties: Default::default(),
        subscriptions: [first, sub("bc", QoS::AtLeastOnce)].into(),
    };
    assert_eq!(enc(V3, &subscribe.clone().into()), [0x82, 11, 0, 2, 0, 1, b'a', 0x02, 0, 2, b'b', b'c', 0x01]);
    assert_eq!(enc(V5, &subscribe.into()), [0x82, 12, 0, 2, 0, 0, 1, b'a', 0x2E, 0, 2, b'b', b'c', 0x01]);
}

/// mosquitto's bridge flag: the protocol level's top bit in MQTT 3.1.1 (0x84) and 3.1 (0x83),
/// read and written; MQTT 5 has none (0x85 is an unknown level).
#[test]
fn mosquitto_bridge_flag() {
    use mqtt_proto::{Connect, DecodeError, Decoder, MqttString, Packet, Protocol};
    let mut c = Connect::new(Protocol::V3_1_1, MqttString::try_from("edge").unwrap());
    c.bridge = true;
    let mut out = bytes::BytesMut::new();
    Packet::Connect(Box::new(c.clone())).encode(Protocol::V3_1_1, &mut out).unwrap();
    assert_eq!(out[8], 0x84, "protocol level with the bridge bit");
    let mut wire = out.clone();
    let decoded = Decoder::new(Protocol::V3_1_1).decode(&mut wire).unwrap().unwrap();
    assert_eq!(decoded, Packet::Connect(Box::new(c)));
    let mut v5 = out.clone();
    v5[8] = 0x85;
    assert_eq!(Decoder::new(Protocol::V5).decode(&mut v5), Err(DecodeError::UnsupportedProtocolLevel(0x85)));
}
