//! Codec vectors for MQTT 5.0 conformance statements (see CONFORMANCE.md). Each test names the
//! statements it checks; byte vectors are written by hand from the spec.

mod support;

use bytes::Bytes;
use mqtt_proto::*;
use support::*;

/// A QoS 0 MQTT 5 PUBLISH to "t" with this property block (its bytes, without the length).
fn publish_with_properties(props: &[u8]) -> Vec<u8> {
    let mut v = vec![0x30, 0, 0, 1, b't', props.len() as u8];
    v.extend_from_slice(props);
    v.push(b'p');
    v[1] = (v.len() - 2) as u8;
    v
}

/// A User Property (0x26) with these raw name and value bytes.
fn user_property(name: &[u8], value: &[u8]) -> Vec<u8> {
    let mut v = vec![0x26];
    for half in [name, value] {
        v.extend_from_slice(&(half.len() as u16).to_be_bytes());
        v.extend_from_slice(half);
    }
    v
}

/// [MQTT-1.5.4-3]: the sequence EF BB BF is U+FEFF (ZERO WIDTH NO-BREAK SPACE), not a byte order
/// mark to strip: a receiver keeps it, in a topic name and in a string property alike, and
/// sends it on unchanged.
#[test]
fn a_leading_byte_order_mark_is_kept() {
    let bom = [0xEF, 0xBB, 0xBF];
    // PUBLISH to "\u{FEFF}t" with a User Property ("\u{FEFF}k", "\u{FEFF}").
    let mut name = bom.to_vec();
    name.push(b'k');
    let props = user_property(&name, &bom);
    let mut v = vec![0x30, 0, 0, 4, 0xEF, 0xBB, 0xBF, b't', props.len() as u8];
    v.extend_from_slice(&props);
    v.push(b'p');
    v[1] = (v.len() - 2) as u8;
    let Packet::Publish(p) = dec(V5, &v).unwrap() else { panic!("not a PUBLISH") };
    assert_eq!(p.topic.as_str(), "\u{FEFF}t");
    assert_eq!(p.topic.as_mqtt_str().as_bytes(), [0xEF, 0xBB, 0xBF, b't']);
    let pairs: Vec<(String, String)> =
        p.properties.user_properties.iter().map(|(k, v)| (k.as_str().to_string(), v.as_str().to_string())).collect();
    assert_eq!(pairs, [("\u{FEFF}k".to_string(), "\u{FEFF}".to_string())]);
    assert_eq!(enc(V5, &Packet::Publish(p)), v, "sent on byte for byte");

    // A string on its own, and a CONNECT client identifier (MQTT 3.1.1).
    let s = MqttString::from_bytes(Bytes::from_static(b"\xEF\xBB\xBFid")).unwrap();
    assert_eq!(s.as_bytes(), b"\xEF\xBB\xBFid");
    let connect = [0x10, 17, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 5, 0xEF, 0xBB, 0xBF, b'i', b'd'];
    let Packet::Connect(c) = dec(V3, &connect).unwrap() else { panic!("not a CONNECT") };
    assert_eq!(c.client_id.as_bytes(), b"\xEF\xBB\xBFid");
    assert_eq!(enc(V3, &Packet::Connect(c)), connect);
}

/// [MQTT-1.5.7-1]: both halves of a UTF-8 string pair (a User Property) must be valid MQTT
/// strings: bad UTF-8 or U+0000 in the name or in the value makes the packet malformed.
#[test]
fn user_property_halves_must_be_valid_utf8_strings() {
    // The well-formed pair, for contrast.
    let Packet::Publish(p) = dec(V5, &publish_with_properties(&user_property(b"k", b"v"))).unwrap() else {
        panic!("not a PUBLISH")
    };
    assert_eq!(p.properties.user_properties.len(), 1);

    let cases: [(&[u8], &[u8], DecodeError); 6] = [
        (b"\xC3\x28", b"v", DecodeError::InvalidUtf8),
        (b"k", b"\xC3\x28", DecodeError::InvalidUtf8),
        (b"\xFF", b"v", DecodeError::InvalidUtf8),
        (b"k", b"\xED\xA0\x80", DecodeError::InvalidUtf8), // a UTF-16 surrogate, U+D800
        (b"k\x00", b"v", DecodeError::NullCharacter),
        (b"k", b"\x00", DecodeError::NullCharacter),
    ];
    for (name, value, expected) in cases {
        let v = publish_with_properties(&user_property(name, value));
        err(V5, &v, expected, ReasonCode::MalformedPacket);
        // Second in the block, after a good pair.
        let mut props = user_property(b"ok", b"ok");
        props.extend_from_slice(&user_property(name, value));
        err(V5, &publish_with_properties(&props), expected, ReasonCode::MalformedPacket);
    }
    // The same rule in another packet's properties: DISCONNECT.
    let props = user_property(b"k", b"\xC3\x28");
    let mut v = vec![0xE0, 0, 0x00, props.len() as u8];
    v.extend_from_slice(&props);
    v[1] = (v.len() - 2) as u8;
    err(V5, &v, DecodeError::InvalidUtf8, ReasonCode::MalformedPacket);
}

/// [MQTT-3.14.1-1]: the reserved flags of DISCONNECT are 0; any other value is a Malformed
/// Packet (reason code 0x81), in MQTT 5 and 3.1.1, with or without a body.
#[test]
fn disconnect_with_reserved_flags_set_is_malformed() {
    for flags in 1..=0x0Fu8 {
        let first = 0xE0 | flags;
        let expected = DecodeError::InvalidFlags { packet_type: 14, flags };
        err(V5, &[first, 0], expected, ReasonCode::MalformedPacket);
        err(V5, &[first, 1, 0x04], expected, ReasonCode::MalformedPacket);
        err(V3, &[first, 0], expected, ReasonCode::MalformedPacket);
    }
    assert_eq!(dec(V5, &[0xE0, 0]).unwrap(), Disconnect::default().into());
    assert_eq!(enc(V5, &Disconnect::new(ReasonCode::DisconnectWithWill).into()), [0xE0, 1, 0x04]);
}

/// [MQTT-3.15.1-1]: the reserved flags of AUTH are 0; any other value is a Malformed Packet.
#[test]
fn auth_with_reserved_flags_set_is_malformed() {
    for flags in 1..=0x0Fu8 {
        let first = 0xF0 | flags;
        let expected = DecodeError::InvalidFlags { packet_type: 15, flags };
        err(V5, &[first, 0], expected, ReasonCode::MalformedPacket);
        err(V5, &[first, 2, 0x18, 0], expected, ReasonCode::MalformedPacket);
    }
    assert_eq!(dec(V5, &[0xF0, 0]).unwrap(), Auth::default().into());
    let reauth = Auth { reason_code: ReasonCode::ReAuthenticate, ..Default::default() };
    assert_eq!(enc(V5, &reauth.into())[0], 0xF0);
}

/// [MQTT-4.3.1-1]: a QoS 0 message goes out as a PUBLISH with QoS 0 and DUP 0, even when the
/// Publish it is encoded from has `dup` set.
#[test]
fn qos_0_publish_is_encoded_with_dup_0() {
    let mut p = Publish::new(TopicName::new("t").unwrap(), &b"x"[..]);
    p.dup = true;
    for protocol in [V3, V5] {
        let bytes = enc(protocol, &Packet::Publish(p.clone()));
        assert_eq!(bytes[0], 0x30, "{protocol:?}");
        let Packet::Publish(back) = dec(protocol, &bytes).unwrap() else { panic!("not a PUBLISH") };
        assert!(!back.dup);
        assert_eq!(back.qos_pid, QosPid::AtMostOnce);
    }
    p.retain = true;
    assert_eq!(enc(V5, &Packet::Publish(p))[0], 0x31, "RETAIN kept, DUP still 0");
}

/// [MQTT-4.7.3-3]: topic names and filters are UTF-8 strings of at most 65 535 bytes: one
/// longer cannot be built (so never goes out), and the longest one round-trips.
#[test]
fn topic_names_and_filters_beyond_65535_bytes_are_refused() {
    let longest = "a".repeat(65_535);
    let too_long = "a".repeat(65_536);
    assert!(TopicName::new(longest.clone()).is_ok());
    assert!(TopicFilter::new(longest.clone()).is_ok());
    assert_eq!(TopicName::new(too_long.clone()), Err(DecodeError::StringTooLong(65_536)));
    assert_eq!(TopicFilter::new(too_long.clone()), Err(DecodeError::StringTooLong(65_536)));
    assert_eq!(TopicName::from_bytes(Bytes::from(too_long.clone())), Err(DecodeError::StringTooLong(65_536)));
    assert_eq!(TopicFilter::from_bytes(Bytes::from(too_long)), Err(DecodeError::StringTooLong(65_536)));
    // Non-ASCII text and filters with wildcards are measured in bytes too.
    let wide = "\u{e9}".repeat(32_768); // 65 536 bytes
    assert_eq!(TopicName::new(wide.clone()), Err(DecodeError::StringTooLong(65_536)));
    assert_eq!(TopicFilter::new(wide), Err(DecodeError::StringTooLong(65_536)));
    let wildcard = format!("{}/#", "a".repeat(65_534));
    assert_eq!(TopicFilter::new(wildcard), Err(DecodeError::StringTooLong(65_536)));
    let shared = format!("$share/g/{}", "a".repeat(65_527));
    assert_eq!(TopicFilter::new(shared), Err(DecodeError::StringTooLong(65_536)));

    // The longest name and filter go on the wire and come back.
    let mut p = Publish::new(TopicName::new(longest.clone()).unwrap(), &b"x"[..]);
    p.qos_pid = QosPid::AtLeastOnce(PacketId::new(1).unwrap());
    let bytes = enc(V5, &Packet::Publish(p.clone()));
    assert_eq!(&bytes[4..6], [0xFF, 0xFF]);
    assert_eq!(dec(V5, &bytes).unwrap(), Packet::Publish(p));
    let s = Subscribe {
        packet_id: PacketId::new(1).unwrap(),
        properties: Default::default(),
        subscriptions: [Subscription::new(TopicFilter::new(longest).unwrap(), QoS::AtMostOnce)].into_iter().collect(),
    };
    let bytes = enc(V5, &Packet::Subscribe(s.clone()));
    assert_eq!(dec(V5, &bytes).unwrap(), Packet::Subscribe(s));
}

/// [MQTT-4.7.3-4]: matching compares topic names and filters without normalising them: NFC
/// and NFD forms of the same text, or different letter cases, do not match each other.
#[test]
fn topic_matching_does_no_normalisation() {
    let nfc = "caf\u{e9}";
    let nfd = "cafe\u{301}";
    assert!(topic::matches(nfc, nfc));
    assert!(topic::matches(nfd, nfd));
    assert!(!topic::matches(nfc, nfd));
    assert!(!topic::matches(nfd, nfc));
    assert!(!topic::matches("Caf\u{e9}", nfc));
    assert!(!topic::matches("\u{212b}", "\u{c5}"), "ANGSTROM SIGN is not LATIN CAPITAL A WITH RING");
    assert!(!topic::matches("\u{fb01}", "fi"), "no compatibility mapping of ligatures");
    assert!(topic::matches("menu/+/caf\u{e9}", "menu/x/caf\u{e9}"));
    assert!(!topic::matches("menu/+/caf\u{e9}", "menu/x/cafe\u{301}"));
    let filter = TopicFilter::new(format!("$share/g/{nfc}/#")).unwrap();
    assert!(filter.matches(&TopicName::new(format!("{nfc}/1")).unwrap()));
    assert!(!filter.matches(&TopicName::new(format!("{nfd}/1")).unwrap()));
}

/// A UTF-8 string field: the 2-byte length, then the raw bytes.
fn string_field(bytes: &[u8]) -> Vec<u8> {
    let mut v = (bytes.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(bytes);
    v
}

/// [MQTT-3.3.2-13] [MQTT-3.3.2-19]: Response Topic (0x08) and Content Type (0x03) are UTF-8
/// strings; [MQTT-3.3.2-14]: a Response Topic carries no wildcards. Either broken is a
/// malformed PUBLISH.
#[test]
fn response_topic_and_content_type_must_be_valid() {
    for id in [0x08u8, 0x03] {
        let mut good = vec![id];
        good.extend_from_slice(&string_field(b"a/b"));
        let Packet::Publish(p) = dec(V5, &publish_with_properties(&good)).unwrap() else { panic!("not a PUBLISH") };
        match id {
            0x08 => assert_eq!(p.properties.response_topic.as_ref().map(|t| t.as_str()), Some("a/b")),
            _ => assert_eq!(p.properties.content_type.as_ref().map(|t| t.as_str()), Some("a/b")),
        }
        let mut bad = vec![id];
        bad.extend_from_slice(&string_field(b"a/\xC3\x28"));
        err(V5, &publish_with_properties(&bad), DecodeError::InvalidUtf8, ReasonCode::MalformedPacket);
    }
    for wildcard in [&b"a/+"[..], b"a/#", b"#"] {
        let mut props = vec![0x08];
        props.extend_from_slice(&string_field(wildcard));
        let e = dec(V5, &publish_with_properties(&props)).unwrap_err();
        assert_eq!(e, DecodeError::InvalidTopicName, "{wildcard:?}");
    }
}

/// [MQTT-3.8.3-1] [MQTT-3.10.3-1]: the Topic Filters of SUBSCRIBE and UNSUBSCRIBE are UTF-8
/// strings; one that is not makes the packet malformed.
#[test]
fn subscribe_and_unsubscribe_filters_must_be_utf8() {
    for (first, tail) in [(0x82u8, &[0x01u8][..]), (0xA2, &[][..])] {
        // Packet identifier 1, no properties, one filter (SUBSCRIBE adds its options byte).
        let build = |filter: &[u8]| {
            let mut v = vec![first, 0, 0, 1, 0];
            v.extend_from_slice(&string_field(filter));
            v.extend_from_slice(tail);
            v[1] = (v.len() - 2) as u8;
            v
        };
        assert!(dec(V5, &build(b"a/+")).is_ok());
        err(V5, &build(b"a/\xFF"), DecodeError::InvalidUtf8, ReasonCode::MalformedPacket);
        let mut v3 = build(b"a/\xC3\x28");
        v3.remove(4); // MQTT 3.1.1 has no property length
        v3[1] -= 1;
        let e = dec(V3, &v3).unwrap_err();
        assert_eq!(e, DecodeError::InvalidUtf8);
    }
}

/// [MQTT-3.1.3-11] [MQTT-3.1.3-12]: the Will Topic and the User Name of a CONNECT are UTF-8
/// strings: not UTF-8 is a malformed CONNECT.
#[test]
fn will_topic_and_user_name_must_be_utf8() {
    // MQTT 5 CONNECT, keep-alive 60, no properties, client id "c"; flags: will (QoS 0) or user name.
    let build = |flags: u8, tail: &[u8]| {
        let mut v = vec![0x10, 0, 0, 4, b'M', b'Q', b'T', b'T', 5, flags, 0, 60, 0];
        v.extend_from_slice(&string_field(b"c"));
        v.extend_from_slice(tail);
        v[1] = (v.len() - 2) as u8;
        v
    };
    let will = |topic: &[u8]| {
        let mut t = vec![0]; // will properties: none
        t.extend_from_slice(&string_field(topic));
        t.extend_from_slice(&string_field(b"bye"));
        t
    };
    let Packet::Connect(c) = dec(V5, &build(0x06, &will(b"w/t"))).unwrap() else { panic!("not a CONNECT") };
    assert_eq!(c.will.map(|w| w.topic.as_str().to_string()).as_deref(), Some("w/t"));
    err(V5, &build(0x06, &will(b"w/\xC3\x28")), DecodeError::InvalidUtf8, ReasonCode::MalformedPacket);

    let Packet::Connect(c) = dec(V5, &build(0x82, &string_field(b"user"))).unwrap() else { panic!("not a CONNECT") };
    assert_eq!(c.username.as_ref().map(|u| u.as_str()), Some("user"));
    err(V5, &build(0x82, &string_field(b"us\xFFer")), DecodeError::InvalidUtf8, ReasonCode::MalformedPacket);
}
