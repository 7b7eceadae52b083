//! PUBLISH (spec 3.3), the hot path: topic and payload are slices of the input.

use super::Sizes;
use crate::error::{DecodeError, EncodeError};
use crate::properties::{PropBox, PublishProperties};
use crate::topic::TopicName;
use crate::types::{PacketId, Protocol, QoS, QosPid};
use crate::varint;
use crate::wire::{field_len, put_string, Reader};
use bytes::{BufMut, Bytes, BytesMut};

/// PUBLISH: an application message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Publish {
    /// Set on a re-delivery of a QoS 1 or 2 message.
    pub dup: bool,
    /// QoS and, for QoS 1 and 2, the packet identifier.
    pub qos_pid: QosPid,
    /// Whether the server keeps the message for future subscribers.
    pub retain: bool,
    /// Topic name; empty only when an MQTT 5 topic alias stands for it.
    pub topic: TopicName,
    /// Application payload.
    #[cfg_attr(feature = "arbitrary", arbitrary(with = crate::arb::bytes))]
    pub payload: Bytes,
    /// MQTT 5 properties (out of line: no allocation when there are none).
    pub properties: PropBox<PublishProperties>,
}

impl Publish {
    /// A QoS 0, non-retained message with no properties.
    pub fn new(topic: TopicName, payload: impl Into<Bytes>) -> Publish {
        Publish {
            dup: false,
            qos_pid: QosPid::AtMostOnce,
            retain: false,
            topic,
            payload: payload.into(),
            properties: PropBox::default(),
        }
    }

    /// The QoS.
    #[inline]
    pub fn qos(&self) -> QoS {
        self.qos_pid.qos()
    }

    /// The packet identifier (QoS 1 and 2).
    #[inline]
    pub fn packet_id(&self) -> Option<PacketId> {
        self.qos_pid.packet_id()
    }

    #[inline]
    pub(super) fn flags(&self) -> u8 {
        // DUP is meaningless on QoS 0 and must not be sent there [MQTT-3.3.1-2].
        let dup = self.dup && self.qos_pid != QosPid::AtMostOnce;
        (u8::from(dup) << 3) | ((self.qos() as u8) << 1) | u8::from(self.retain)
    }

    #[inline]
    /// Reads everything but the payload, which starts at the returned position.
    pub(super) fn read_head(r: &mut Reader<'_>, flags: u8, v5: bool) -> Result<(Publish, usize), DecodeError> {
        let dup = flags & 0b1000 != 0;
        let retain = flags & 0b0001 != 0;
        let qos = QoS::from_u8((flags >> 1) & 0b11)?;
        if dup && qos == QoS::AtMostOnce {
            return Err(DecodeError::DupOnQos0);
        }
        let topic = TopicName::from_bytes(r.binary()?)?;
        let qos_pid = match qos {
            QoS::AtMostOnce => QosPid::AtMostOnce,
            QoS::AtLeastOnce => QosPid::AtLeastOnce(r.packet_id()?),
            QoS::ExactlyOnce => QosPid::ExactlyOnce(r.packet_id()?),
        };
        let properties = if v5 { PublishProperties::decode_boxed(r)? } else { PropBox::default() };
        if topic.is_empty() {
            if !v5 {
                return Err(DecodeError::InvalidTopicName);
            }
            if properties.topic_alias.is_none() {
                return Err(DecodeError::EmptyTopicWithoutAlias);
            }
        }
        Ok((Publish { dup, qos_pid, retain, topic, payload: Bytes::new(), properties }, r.pos()))
    }

    #[inline]
    pub(super) fn sizes(&self, protocol: Protocol) -> Result<Sizes, EncodeError> {
        let v5 = protocol.is_v5();
        if self.topic.is_empty() && !(v5 && self.properties.topic_alias.is_some()) {
            return Err(EncodeError::EmptyTopic);
        }
        let mut body = field_len(self.topic.as_mqtt_str().len())? + self.payload.len();
        if self.qos_pid != QosPid::AtMostOnce {
            body += 2;
        }
        let mut props = 0;
        if v5 {
            props = self.properties.len()?;
            body += varint::len(props as u32) + props;
        }
        Ok(Sizes { body, props })
    }

    #[inline]
    pub(super) fn write(&self, protocol: Protocol, sizes: Sizes, out: &mut BytesMut) {
        put_string(out, self.topic.as_mqtt_str());
        if let Some(id) = self.packet_id() {
            out.put_u16(id.get());
        }
        if protocol.is_v5() {
            self.properties.encode(sizes.props, out);
        }
        out.put_slice(&self.payload);
    }
}
