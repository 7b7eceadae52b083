//! proptest strategies for every packet of MQTT 3.1.1 and 5.0.
//!
//! `packet(protocol)` only produces packets that protocol can carry in full (no properties or
//! MQTT 5 reason codes for 3.1.1), so `decode(encode(p)) == p` must hold exactly.

#![allow(dead_code)]

use bytes::Bytes;
use mqtt_proto::*;
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use std::num::{NonZeroU16, NonZeroU32};

pub fn protocol() -> impl Strategy<Value = Protocol> {
    prop_oneof![Just(Protocol::V3_1_1), Just(Protocol::V5)]
}

pub fn string() -> impl Strategy<Value = MqttString> {
    // Mostly ASCII, sometimes any non-NUL char, to exercise both validation paths.
    prop_oneof!["[a-zA-Z0-9 _./-]{0,12}", "[^\u{0}]{0,6}",].prop_map(|s| MqttString::try_from(s).unwrap())
}

pub fn binary() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..24).prop_map(Bytes::from)
}

fn level() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z0-9]{0,6}", "[^\u{0}+#/]{1,3}"]
}

pub fn topic_name() -> impl Strategy<Value = TopicName> {
    vec(level(), 1..4).prop_map(|levels| levels.join("/")).prop_filter_map("non-empty", |s| TopicName::new(s).ok())
}

pub fn topic_filter() -> impl Strategy<Value = TopicFilter> {
    let lvl = prop_oneof![3 => level(), 1 => Just("+".to_string())];
    (vec(lvl, 1..4), any::<bool>(), option::weighted(0.2, "[a-z]{1,4}")).prop_filter_map(
        "valid filter",
        |(levels, hash, share)| {
            let mut s = levels.join("/");
            if hash {
                s.push_str("/#");
            }
            if let Some(group) = share {
                s = format!("$share/{group}/{s}");
            }
            TopicFilter::new(s).ok()
        },
    )
}

pub fn packet_id() -> impl Strategy<Value = PacketId> {
    (1..=u16::MAX).prop_map(|v| PacketId::new(v).unwrap())
}

pub fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce), Just(QoS::ExactlyOnce)]
}

fn nz16() -> impl Strategy<Value = NonZeroU16> {
    (1..=u16::MAX).prop_map(|v| NonZeroU16::new(v).unwrap())
}

fn nz32() -> impl Strategy<Value = NonZeroU32> {
    (1..=u32::MAX).prop_map(|v| NonZeroU32::new(v).unwrap())
}

fn sub_id() -> impl Strategy<Value = SubscriptionId> {
    (1..=SubscriptionId::MAX).prop_map(|v| SubscriptionId::new(v).unwrap())
}

pub fn user_properties() -> impl Strategy<Value = UserProperties> {
    vec((string(), string()), 0..3).prop_map(UserProperties::from)
}

fn reason(packet: ReasonPacket) -> impl Strategy<Value = ReasonCode> {
    let all: Vec<ReasonCode> = (0..=255u8).filter_map(ReasonCode::from_u8).filter(|c| c.allowed_in(packet)).collect();
    proptest::sample::select(all)
}

fn opt<T: std::fmt::Debug + Clone>(s: impl Strategy<Value = T>) -> impl Strategy<Value = Option<T>> {
    option::of(s)
}

pub fn connect_properties() -> impl Strategy<Value = ConnectProperties> {
    (
        (opt(any::<u32>()), opt(nz16()), opt(nz32()), opt(any::<u16>())),
        (opt(any::<bool>()), opt(any::<bool>()), opt(string()), opt(binary())),
        user_properties(),
    )
        .prop_map(|((a, b, c, d), (e, f, g, h), user)| {
            let mut p = ConnectProperties::default();
            p.session_expiry_interval = a;
            p.receive_maximum = b;
            p.maximum_packet_size = c;
            p.topic_alias_maximum = d;
            p.request_response_information = e;
            p.request_problem_information = f;
            p.authentication_method = g;
            p.authentication_data = h;
            p.user_properties = user;
            p
        })
}

pub fn will_properties() -> impl Strategy<Value = WillProperties> {
    (
        (opt(any::<u32>()), opt(any::<bool>()), opt(any::<u32>())),
        (opt(string()), opt(topic_name()), opt(binary())),
        user_properties(),
    )
        .prop_map(|((a, b, c), (d, e, f), user)| {
            let mut p = WillProperties::default();
            p.will_delay_interval = a;
            p.payload_format_indicator = b;
            p.message_expiry_interval = c;
            p.content_type = d;
            p.response_topic = e;
            p.correlation_data = f;
            p.user_properties = user;
            p
        })
}

pub fn connect(protocol: Protocol) -> impl Strategy<Value = Connect> {
    let v5 = protocol.is_v5();
    let will = (topic_name(), binary(), qos(), any::<bool>(), will_properties()).prop_map(
        move |(topic, payload, qos, retain, props)| Will {
            topic,
            payload,
            qos,
            retain,
            properties: if v5 { props.into() } else { Default::default() },
        },
    );
    let flags = (any::<bool>(), any::<bool>());
    (flags, any::<u16>(), string(), opt(will), opt(string()), opt(binary()), connect_properties()).prop_map(
        move |((clean_start, bridge), keep_alive, client_id, will, username, password, props)| {
            let mut c = Connect::new(protocol, client_id);
            c.clean_start = clean_start;
            // mosquitto's bridge flag exists in 3.1 and 3.1.1 only.
            c.bridge = bridge && !v5;
            c.keep_alive = keep_alive;
            c.will = will;
            // 3.1.1 needs a user name to carry a password [MQTT-3.1.2-22].
            c.password = if v5 || username.is_some() { password } else { None };
            c.username = username;
            if v5 {
                c.properties = props.into();
            }
            c
        },
    )
}

pub fn connack(protocol: Protocol) -> impl Strategy<Value = ConnAck> {
    let v5 = protocol.is_v5();
    let v3_codes: Vec<ReasonCode> = (0..=5).filter_map(ReasonCode::from_v3_connack).collect();
    let props = (
        (
            opt(any::<u32>()),
            opt(nz16()),
            opt(prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce)]),
            opt(any::<bool>()),
        ),
        (opt(nz32()), opt(string()), opt(any::<u16>()), opt(string())),
        (opt(any::<bool>()), opt(any::<bool>()), opt(any::<bool>()), opt(any::<u16>())),
        (opt(string()), opt(string()), opt(string()), opt(binary())),
        user_properties(),
    )
        .prop_map(|((a, b, c, d), (e, f, g, h), (i, j, k, l), (m, n, o, q), user)| {
            let mut p = ConnAckProperties::default();
            p.session_expiry_interval = a;
            p.receive_maximum = b;
            p.maximum_qos = c;
            p.retain_available = d;
            p.maximum_packet_size = e;
            p.assigned_client_identifier = f;
            p.topic_alias_maximum = g;
            p.reason_string = h;
            p.wildcard_subscription_available = i;
            p.subscription_identifiers_available = j;
            p.shared_subscription_available = k;
            p.server_keep_alive = l;
            p.response_information = m;
            p.server_reference = n;
            p.authentication_method = o;
            p.authentication_data = q;
            p.user_properties = user;
            p
        });
    let code = if v5 { reason(ReasonPacket::ConnAck).boxed() } else { proptest::sample::select(v3_codes).boxed() };
    (any::<bool>(), code, props).prop_map(move |(present, reason_code, props)| ConnAck {
        session_present: present && reason_code == ReasonCode::Success,
        reason_code,
        properties: if v5 { props.into() } else { Default::default() },
    })
}

pub fn publish(protocol: Protocol) -> impl Strategy<Value = Publish> {
    let v5 = protocol.is_v5();
    let props = (
        (opt(any::<bool>()), opt(any::<u32>()), opt(nz16())),
        (opt(topic_name()), opt(binary()), opt(string())),
        vec(sub_id(), 0..3),
        user_properties(),
    )
        .prop_map(|((a, b, c), (d, e, f), ids, user)| {
            let mut p = PublishProperties::default();
            p.payload_format_indicator = a;
            p.message_expiry_interval = b;
            p.topic_alias = c;
            p.response_topic = d;
            p.correlation_data = e;
            p.content_type = f;
            p.subscription_identifiers = ids.into();
            p.user_properties = user;
            p
        });
    (any::<bool>(), qos(), packet_id(), any::<bool>(), topic_name(), any::<bool>(), vec(any::<u8>(), 0..300), props)
        .prop_map(move |(dup, qos, id, retain, topic, alias_only, payload, props)| {
            let qos_pid = QosPid::from_parts(qos, id);
            let mut p = Publish::new(topic, payload);
            p.dup = dup && qos != QoS::AtMostOnce;
            p.qos_pid = qos_pid;
            p.retain = retain;
            if v5 {
                if alias_only && props.topic_alias.is_some() {
                    p.topic = TopicName::empty();
                }
                p.properties = props.into();
            }
            p
        })
}

pub fn ack(protocol: Protocol, kind: ReasonPacket) -> impl Strategy<Value = Ack> {
    let v5 = protocol.is_v5();
    (packet_id(), reason(kind), opt(string()), user_properties()).prop_map(move |(id, code, rs, user)| {
        let mut a = Ack::new(id);
        if v5 {
            a.reason_code = code;
            a.properties.reason_string = rs;
            a.properties.user_properties = user;
        }
        a
    })
}

pub fn subscribe(protocol: Protocol) -> impl Strategy<Value = Subscribe> {
    let v5 = protocol.is_v5();
    let sub =
        (topic_filter(), qos(), any::<bool>(), any::<bool>(), 0..3u8).prop_map(move |(filter, qos, nl, rap, rh)| {
            let mut options = SubscriptionOptions { qos, ..Default::default() };
            if v5 {
                options.no_local = nl && filter.shared().is_none();
                options.retain_as_published = rap;
                options.retain_handling = match rh {
                    0 => RetainHandling::SendAtSubscribe,
                    1 => RetainHandling::SendIfNew,
                    _ => RetainHandling::DoNotSend,
                };
            }
            Subscription { filter, options }
        });
    (packet_id(), vec(sub, 1..5), opt(sub_id()), user_properties()).prop_map(move |(packet_id, subs, id, user)| {
        let mut properties = SubscribeProperties::default();
        if v5 {
            properties.subscription_identifier = id;
            properties.user_properties = user;
        }
        Subscribe { packet_id, properties: properties.into(), subscriptions: subs.into() }
    })
}

fn suback_properties(v5: bool) -> impl Strategy<Value = SubAckProperties> {
    (opt(string()), user_properties()).prop_map(move |(rs, user)| {
        let mut p = SubAckProperties::default();
        if v5 {
            p.reason_string = rs;
            p.user_properties = user;
        }
        p
    })
}

pub fn suback(protocol: Protocol) -> impl Strategy<Value = SubAck> {
    let v5 = protocol.is_v5();
    let v3 = vec![ReasonCode::Success, ReasonCode::GrantedQos1, ReasonCode::GrantedQos2, ReasonCode::UnspecifiedError];
    let code = if v5 { reason(ReasonPacket::SubAck).boxed() } else { proptest::sample::select(v3).boxed() };
    (packet_id(), suback_properties(v5), vec(code, 1..6)).prop_map(|(packet_id, properties, codes)| SubAck {
        packet_id,
        properties: properties.into(),
        reason_codes: codes.into(),
    })
}

pub fn unsubscribe(protocol: Protocol) -> impl Strategy<Value = Unsubscribe> {
    let v5 = protocol.is_v5();
    (packet_id(), vec(topic_filter(), 1..5), user_properties()).prop_map(move |(packet_id, filters, user)| {
        let mut properties = UnsubscribeProperties::default();
        if v5 {
            properties.user_properties = user;
        }
        Unsubscribe { packet_id, properties: properties.into(), filters: filters.into() }
    })
}

pub fn unsuback(protocol: Protocol) -> impl Strategy<Value = UnsubAck> {
    let v5 = protocol.is_v5();
    (packet_id(), suback_properties(v5), vec(reason(ReasonPacket::UnsubAck), 1..6)).prop_map(
        move |(packet_id, properties, codes)| UnsubAck {
            packet_id,
            properties: properties.into(),
            reason_codes: if v5 { codes.into() } else { Default::default() },
        },
    )
}

pub fn disconnect(protocol: Protocol) -> impl Strategy<Value = Disconnect> {
    let v5 = protocol.is_v5();
    (reason(ReasonPacket::Disconnect), opt(any::<u32>()), opt(string()), opt(string()), user_properties()).prop_map(
        move |(code, sei, rs, sr, user)| {
            let mut d = Disconnect::default();
            if v5 {
                d.reason_code = code;
                d.properties.session_expiry_interval = sei;
                d.properties.reason_string = rs;
                d.properties.server_reference = sr;
                d.properties.user_properties = user;
            }
            d
        },
    )
}

pub fn auth() -> impl Strategy<Value = Auth> {
    (reason(ReasonPacket::Auth), opt(string()), opt(binary()), opt(string()), user_properties()).prop_map(
        |(code, m, d, rs, user)| {
            let mut a = Auth { reason_code: code, ..Default::default() };
            a.properties.authentication_method = m;
            a.properties.authentication_data = d;
            a.properties.reason_string = rs;
            a.properties.user_properties = user;
            a
        },
    )
}

/// Any packet `protocol` can carry in full.
pub fn packet(protocol: Protocol) -> BoxedStrategy<Packet> {
    let common = prop_oneof![
        connect(protocol).prop_map(Packet::from),
        connack(protocol).prop_map(Packet::from),
        publish(protocol).prop_map(Packet::Publish),
        ack(protocol, ReasonPacket::PubAckRec).prop_map(Packet::PubAck),
        ack(protocol, ReasonPacket::PubAckRec).prop_map(Packet::PubRec),
        ack(protocol, ReasonPacket::PubRelComp).prop_map(Packet::PubRel),
        ack(protocol, ReasonPacket::PubRelComp).prop_map(Packet::PubComp),
        subscribe(protocol).prop_map(Packet::Subscribe),
        suback(protocol).prop_map(Packet::SubAck),
        unsubscribe(protocol).prop_map(Packet::Unsubscribe),
        unsuback(protocol).prop_map(Packet::UnsubAck),
        Just(Packet::PingReq),
        Just(Packet::PingResp),
        disconnect(protocol).prop_map(Packet::Disconnect),
    ];
    if protocol.is_v5() {
        prop_oneof![14 => common, 1 => auth().prop_map(Packet::Auth)].boxed()
    } else {
        common.boxed()
    }
}
