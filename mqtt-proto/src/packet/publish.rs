//! PUBLISH (spec 3.3), the hot path: topic and payload are slices of the input.

use super::Sizes;
use crate::decoder::Decoder;
use crate::error::{DecodeError, EncodeError};
use crate::packet::Packet;
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

    /// A copy that owns its bytes: topic, payload and properties in one allocation the size of
    /// the message, instead of slices of the buffer it was decoded from. Decoded messages share
    /// their receive buffer (zero copy), so one kept for long (a retained message, one queued for
    /// an offline client) would pin that whole buffer, however small the message is.
    ///
    /// ```
    /// use mqtt_proto::{Publish, TopicName};
    /// use mqtt_proto::bytes::Bytes;
    ///
    /// let big = Bytes::from(vec![7u8; 1 << 20]);
    /// let m = Publish::new(TopicName::new("t")?, big.slice(0..10));
    /// let kept = m.detached();
    /// assert_eq!(kept, m);
    /// drop((m, big)); // `kept` holds 10 bytes of payload, not the 1 MiB buffer
    /// # Ok::<(), mqtt_proto::DecodeError>(())
    /// ```
    pub fn detached(&self) -> Publish {
        let packet = Packet::Publish(self.clone());
        let mut buf = BytesMut::new();
        if packet.encode(Protocol::V5, &mut buf).is_ok() {
            let mut bytes = buf.freeze();
            let mut decoder = Decoder::new(Protocol::V5).with_max_packet_size(crate::PROTOCOL_MAX_PACKET_SIZE);
            if let Ok(Some(Packet::Publish(p))) = decoder.decode_bytes(&mut bytes) {
                return p;
            }
        }
        // Not encodable as it stands (an empty topic, say): copy what can be large.
        let mut p = self.clone();
        p.payload = Bytes::copy_from_slice(&self.payload);
        p.topic = TopicName::from_validated(Bytes::copy_from_slice(self.topic.as_str().as_bytes()));
        p
    }

    /// The same message at `qos` (a sending session assigns the packet identifier).
    pub fn with_qos(mut self, qos: QoS) -> Publish {
        self.qos_pid = QosPid::from_parts(qos, self.packet_id().unwrap_or(PacketId::MIN));
        self
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

    /// The number of bytes this PUBLISH takes on the wire, without encoding it (for checks
    /// against a peer's Maximum Packet Size before queueing).
    pub fn encoded_len(&self, protocol: Protocol) -> Result<usize, EncodeError> {
        let body = self.sizes(protocol)?.body;
        if body > varint::MAX as usize {
            return Err(EncodeError::PacketTooLarge(body));
        }
        Ok(1 + varint::len(body as u32) + body)
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
        let (dup, qos, retain) = decode_flags(flags)?;
        let topic = TopicName::from_bytes(r.binary()?)?;
        let qos_pid = match qos {
            QoS::AtMostOnce => QosPid::AtMostOnce,
            QoS::AtLeastOnce => QosPid::AtLeastOnce(r.packet_id()?),
            QoS::ExactlyOnce => QosPid::ExactlyOnce(r.packet_id()?),
        };
        let properties = if v5 { PublishProperties::decode_boxed(r)? } else { PropBox::default() };
        check_empty_topic(topic.is_empty(), v5, &properties)?;
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

/// DUP, QoS and RETAIN from the fixed-header flags, checked.
#[inline]
fn decode_flags(flags: u8) -> Result<(bool, QoS, bool), DecodeError> {
    let dup = flags & 0b1000 != 0;
    let qos = QoS::from_u8((flags >> 1) & 0b11)?;
    if dup && qos == QoS::AtMostOnce {
        return Err(DecodeError::DupOnQos0);
    }
    Ok((dup, qos, flags & 0b0001 != 0))
}

/// An empty topic name is only legal in MQTT 5, and only with a topic alias.
#[inline]
fn check_empty_topic(empty: bool, v5: bool, properties: &PublishProperties) -> Result<(), DecodeError> {
    match (empty, v5) {
        (false, _) => Ok(()),
        (true, false) => Err(DecodeError::InvalidTopicName),
        (true, true) if properties.topic_alias.is_none() => Err(DecodeError::EmptyTopicWithoutAlias),
        (true, true) => Ok(()),
    }
}

/// A PUBLISH whose topic and payload borrow from the caller's buffer, from
/// [`Decoder::decode_ref`](crate::Decoder::decode_ref).
///
/// Decoding one costs no allocation and no reference counting (properties, when present, are the
/// exception: they are copied out and decoded as usual). It suits callers that consume messages
/// in place; [`PublishRef::to_owned`] makes a [`Publish`] to keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishRef<'a> {
    /// Set on a re-delivery of a QoS 1 or 2 message.
    pub dup: bool,
    /// QoS and, for QoS 1 and 2, the packet identifier.
    pub qos_pid: QosPid,
    /// Whether the server keeps the message for future subscribers.
    pub retain: bool,
    /// The topic name, validated; see [`PublishRef::topic`].
    topic: &'a [u8],
    /// Application payload.
    pub payload: &'a [u8],
    /// MQTT 5 properties.
    pub properties: PropBox<PublishProperties>,
}

impl<'a> PublishRef<'a> {
    /// Decodes the PUBLISH in `frame` (exactly one whole packet) whose body starts at `start`.
    #[inline(always)]
    pub(crate) fn decode(frame: &'a [u8], start: usize, flags: u8, v5: bool) -> Result<PublishRef<'a>, DecodeError> {
        let (dup, qos, retain) = decode_flags(flags)?;
        let body = frame.get(start..).unwrap_or_default();
        let (topic, mut at) = match body {
            [hi, lo, rest @ ..] => {
                let len = usize::from(u16::from_be_bytes([*hi, *lo]));
                (rest.get(..len).ok_or(DecodeError::UnexpectedEnd)?, 2 + len)
            }
            _ => return Err(DecodeError::UnexpectedEnd),
        };
        crate::topic::validate_name(topic)?;
        let qos_pid = if qos == QoS::AtMostOnce {
            QosPid::AtMostOnce
        } else {
            let id = body.get(at..at + 2).ok_or(DecodeError::UnexpectedEnd)?;
            at += 2;
            let id = PacketId::new(u16::from_be_bytes([id[0], id[1]])).ok_or(DecodeError::ZeroPacketId)?;
            QosPid::from_parts(qos, id)
        };
        let mut properties = PropBox::default();
        if v5 {
            let (len, n) = varint::decode(&body[at..])?.ok_or(DecodeError::UnexpectedEnd)?;
            let block = body.get(at..at + n + len as usize).ok_or(DecodeError::UnexpectedEnd)?;
            at += block.len();
            if len > 0 {
                // Rare on a hot path: copy the block out and decode it the usual way.
                let owned = Bytes::copy_from_slice(block);
                properties = PublishProperties::decode_boxed(&mut Reader::span(&owned, 0, owned.len()))?;
            }
        }
        check_empty_topic(topic.is_empty(), v5, &properties)?;
        Ok(PublishRef { dup, qos_pid, retain, topic, payload: &body[at..], properties })
    }

    /// The QoS.
    pub fn qos(&self) -> QoS {
        self.qos_pid.qos()
    }

    /// The topic name; empty only when an MQTT 5 topic alias stands for it.
    ///
    /// The bytes were validated when decoding; turning them into `&str` checks UTF-8 again
    /// because this crate has no `unsafe`, so callers that only route on the topic can use
    /// [`PublishRef::topic_bytes`] and skip that cost.
    pub fn topic(&self) -> &'a str {
        std::str::from_utf8(self.topic).unwrap_or_default()
    }

    /// The topic name as bytes (valid UTF-8, no wildcards, no U+0000).
    pub fn topic_bytes(&self) -> &'a [u8] {
        self.topic
    }

    /// A [`Publish`] owning copies of the topic and payload.
    pub fn to_owned(&self) -> Publish {
        Publish {
            dup: self.dup,
            qos_pid: self.qos_pid,
            retain: self.retain,
            topic: TopicName::from_validated(Bytes::copy_from_slice(self.topic)),
            payload: Bytes::copy_from_slice(self.payload),
            properties: self.properties.clone(),
        }
    }
}
