//! CONNECT (spec 3.1) and CONNACK (spec 3.2).

use super::Sizes;
use crate::error::{DecodeError, EncodeError};
use crate::properties::{ConnAckProperties, ConnectProperties, PropBox, WillProperties};
use crate::reason::{ReasonCode, ReasonPacket};
use crate::string::MqttString;
use crate::topic::TopicName;
use crate::types::{Protocol, QoS};
use crate::varint;
use crate::wire::{field_len, put_binary, put_string, Reader};
use bytes::{BufMut, Bytes, BytesMut};

/// CONNECT: the first packet a client sends.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Connect {
    /// The protocol version the client speaks; it decides how everything after is framed.
    pub protocol: Protocol,
    /// Clean Start (MQTT 5) / Clean Session (3.1.1): discard any existing session.
    pub clean_start: bool,
    /// Keep alive in seconds; 0 turns it off.
    pub keep_alive: u16,
    /// Client identifier; empty asks the server to assign one.
    pub client_id: MqttString,
    /// The will message, published if the connection ends without DISCONNECT.
    pub will: Option<Will>,
    /// User name.
    pub username: Option<MqttString>,
    /// Password (binary data).
    #[cfg_attr(feature = "arbitrary", arbitrary(with = crate::arb::ArbField::arb))]
    pub password: Option<Bytes>,
    /// MQTT 5 properties (empty for 3.1.1).
    pub properties: PropBox<ConnectProperties>,
    /// mosquitto's bridge flag (MQTT 3.1 and 3.1.1 only: the protocol level with its top bit
    /// set, 0x83 or 0x84): the client is a bridge, and the server should not send it back the
    /// messages it published (the No Local that 3.1.1 lacks). Not sent in MQTT 5, which has
    /// No Local instead.
    pub bridge: bool,
}

/// The will message of a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Will {
    /// Where the will is published.
    pub topic: TopicName,
    /// Its payload.
    #[cfg_attr(feature = "arbitrary", arbitrary(with = crate::arb::bytes))]
    pub payload: Bytes,
    /// Its QoS.
    pub qos: QoS,
    /// Whether it is retained.
    pub retain: bool,
    /// MQTT 5 will properties (delay, expiry, ...).
    pub properties: PropBox<WillProperties>,
}

impl Connect {
    /// A CONNECT with defaults: clean start, keep alive 60 s, no will, no credentials.
    pub fn new(protocol: Protocol, client_id: MqttString) -> Connect {
        Connect {
            protocol,
            clean_start: true,
            keep_alive: 60,
            client_id,
            will: None,
            username: None,
            password: None,
            properties: PropBox::default(),
            bridge: false,
        }
    }

    pub(super) fn read(r: &mut Reader<'_>) -> Result<Connect, DecodeError> {
        let name = r.binary()?;
        let level = r.u8()?;
        // mosquitto's bridges set the top bit of a 3.1 or 3.1.1 level.
        let bridge = matches!((&name[..], level), (b"MQTT", 0x84) | (b"MQIsdp", 0x83));
        let protocol = match (&name[..], level & if bridge { 0x7F } else { 0xFF }) {
            (b"MQTT", 4) => Protocol::V3_1_1,
            (b"MQTT", 5) => Protocol::V5,
            (b"MQIsdp", 3) => Protocol::V3_1,
            (b"MQTT" | b"MQIsdp", other) => return Err(DecodeError::UnsupportedProtocolLevel(other)),
            _ => return Err(DecodeError::InvalidProtocolName),
        };
        let v5 = protocol.is_v5();
        let flags = r.u8()?;
        let has_username = flags & 0x80 != 0;
        let has_password = flags & 0x40 != 0;
        let will_retain = flags & 0x20 != 0;
        let will_qos = QoS::from_u8((flags >> 3) & 0b11)?;
        let has_will = flags & 0x04 != 0;
        let clean_start = flags & 0x02 != 0;
        // Reserved bit [MQTT-3.1.2-3]; will QoS and retain must be 0 without a will
        // [MQTT-3.1.2-11, MQTT-3.1.2-13, MQTT-3.1.2-15].
        if flags & 0x01 != 0 || (!has_will && (will_retain || will_qos != QoS::AtMostOnce)) {
            return Err(DecodeError::InvalidConnectFlags(flags));
        }
        if !v5 && has_password && !has_username {
            return Err(DecodeError::PasswordWithoutUsername);
        }
        let keep_alive = r.u16()?;
        let properties = if v5 { ConnectProperties::decode_boxed(r)? } else { PropBox::default() };
        let client_id = r.string()?;
        let will = if has_will {
            let properties = if v5 { WillProperties::decode_boxed(r)? } else { PropBox::default() };
            let topic = TopicName::from_mqtt_string(r.string()?)?;
            if topic.is_empty() {
                return Err(DecodeError::InvalidTopicName);
            }
            let payload = r.binary()?;
            Some(Will { topic, payload, qos: will_qos, retain: will_retain, properties })
        } else {
            None
        };
        let username = if has_username { Some(r.string()?) } else { None };
        let password = if has_password { Some(r.binary()?) } else { None };
        Ok(Connect { protocol, clean_start, keep_alive, client_id, will, username, password, properties, bridge })
    }

    pub(super) fn sizes(&self) -> Result<Sizes, EncodeError> {
        let v5 = self.protocol.is_v5();
        if !v5 && self.password.is_some() && self.username.is_none() {
            return Err(EncodeError::Invalid("MQTT 3.1.1 needs a user name to send a password"));
        }
        // Protocol name, level, flags, keep alive.
        let mut body = field_len(self.protocol.name().len())? + 1 + 1 + 2;
        let mut props = 0;
        if v5 {
            props = self.properties.len()?;
            body += varint::len(props as u32) + props;
        }
        body += field_len(self.client_id.len())?;
        if let Some(will) = &self.will {
            if v5 {
                let wp = will.properties.len()?;
                body += varint::len(wp as u32) + wp;
            }
            if will.topic.is_empty() {
                return Err(EncodeError::EmptyTopic);
            }
            body += field_len(will.topic.as_mqtt_str().len())? + field_len(will.payload.len())?;
        }
        if let Some(u) = &self.username {
            body += field_len(u.len())?;
        }
        if let Some(p) = &self.password {
            body += field_len(p.len())?;
        }
        Ok(Sizes { body, props })
    }

    pub(super) fn write(&self, sizes: Sizes, out: &mut BytesMut) {
        let v5 = self.protocol.is_v5();
        let mut flags = 0u8;
        if self.username.is_some() {
            flags |= 0x80;
        }
        if self.password.is_some() {
            flags |= 0x40;
        }
        if let Some(will) = &self.will {
            flags |= 0x04 | ((will.qos as u8) << 3);
            if will.retain {
                flags |= 0x20;
            }
        }
        if self.clean_start {
            flags |= 0x02;
        }
        // The variable header before the properties, written at once.
        let [ka_hi, ka_lo] = self.keep_alive.to_be_bytes();
        let bridge = if self.bridge { 0x80 } else { 0 };
        match self.protocol {
            Protocol::V3_1 => {
                out.put_slice(&[0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3 | bridge, flags, ka_hi, ka_lo])
            }
            Protocol::V3_1_1 => out.put_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4 | bridge, flags, ka_hi, ka_lo]),
            Protocol::V5 => out.put_slice(&[0, 4, b'M', b'Q', b'T', b'T', 5, flags, ka_hi, ka_lo]),
        }
        if v5 {
            self.properties.encode(sizes.props, out);
        }
        put_string(out, &self.client_id);
        if let Some(will) = &self.will {
            if v5 {
                // Measured again: will properties are rare and small.
                let wp = will.properties.len().unwrap_or(0);
                will.properties.encode(wp, out);
            }
            put_string(out, will.topic.as_mqtt_str());
            put_binary(out, &will.payload);
        }
        if let Some(u) = &self.username {
            put_string(out, u);
        }
        if let Some(p) = &self.password {
            put_binary(out, p);
        }
    }
}

/// CONNACK: the server's answer to CONNECT.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct ConnAck {
    /// Whether the server resumed an existing session.
    pub session_present: bool,
    /// Success, or why the connection is refused. MQTT 3.1.1 return codes map to the MQTT 5
    /// codes of the same meaning (see [`ReasonCode::from_v3_connack`]).
    pub reason_code: ReasonCode,
    /// MQTT 5 properties.
    pub properties: PropBox<ConnAckProperties>,
}

impl ConnAck {
    pub(super) fn read(r: &mut Reader<'_>, v5: bool) -> Result<ConnAck, DecodeError> {
        let flags = r.u8()?;
        let code = r.u8()?;
        let reason_code = if v5 {
            ReasonCode::decode_for(code, ReasonPacket::ConnAck)?
        } else {
            ReasonCode::from_v3_connack(code).ok_or(DecodeError::InvalidConnAckCode(code))?
        };
        let session_present = flags & 1 != 0;
        // Reserved bits [MQTT-3.2.2-1]; no session on refusal [MQTT-3.2.2-6 / 3.1.1 MQTT-3.2.2-4].
        if flags & 0xFE != 0 || (session_present && reason_code != ReasonCode::Success) {
            return Err(DecodeError::InvalidConnAckFlags(flags));
        }
        let properties = if v5 { ConnAckProperties::decode_boxed(r)? } else { PropBox::default() };
        Ok(ConnAck { session_present, reason_code, properties })
    }

    pub(super) fn sizes(&self, protocol: Protocol) -> Result<Sizes, EncodeError> {
        if protocol.is_v5() {
            super::disconnect::check_code(self.reason_code, ReasonPacket::ConnAck)?;
            let props = self.properties.len()?;
            Ok(Sizes { body: 2 + varint::len(props as u32) + props, props })
        } else {
            Ok(Sizes { body: 2, props: 0 })
        }
    }

    pub(super) fn write(&self, protocol: Protocol, sizes: Sizes, out: &mut BytesMut) {
        // A refusal never carries session present, whatever the caller set.
        let present = self.session_present && self.reason_code == ReasonCode::Success;
        out.put_u8(u8::from(present));
        if protocol.is_v5() {
            out.put_u8(self.reason_code.as_u8());
            self.properties.encode(sizes.props, out);
        } else {
            out.put_u8(self.reason_code.to_v3_connack());
        }
    }
}
