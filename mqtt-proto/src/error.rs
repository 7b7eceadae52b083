//! Decode and encode errors. Every decode error names the reason code a receiver must send back
//! (in a DISCONNECT or CONNACK for MQTT 5; MQTT 3.1.1 receivers just close the connection).

use crate::reason::{ReasonCode, ReasonPacket};
use thiserror::Error;

/// Why a byte sequence is not a valid MQTT packet.
///
/// [`DecodeError::reason_code`] gives the reason code the spec prescribes for the receiver's
/// DISCONNECT (or CONNACK, when the offending packet is CONNECT).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The packet is larger than the receiver's Maximum Packet Size.
    #[error("packet of {size} bytes exceeds the maximum packet size of {max} bytes")]
    PacketTooLarge {
        /// Total size the fixed header announces (fixed header plus remaining length).
        size: u64,
        /// The configured maximum.
        max: u32,
    },
    /// A variable byte integer is longer than four bytes or not minimally encoded.
    #[error("malformed variable byte integer")]
    MalformedVarInt,
    /// The packet type nibble is reserved (0, or 15 before MQTT 5).
    #[error("reserved packet type {0}")]
    ReservedPacketType(u8),
    /// The low nibble of the first byte does not have the value the packet type requires.
    #[error("invalid fixed header flags 0x{flags:X} for packet type {packet_type}")]
    InvalidFlags {
        /// The packet type nibble.
        packet_type: u8,
        /// The offending flags nibble.
        flags: u8,
    },
    /// A QoS field holds 3.
    #[error("QoS 3 is not a valid quality of service")]
    InvalidQos,
    /// A QoS 0 PUBLISH has the DUP flag set [MQTT-3.3.1-2].
    #[error("DUP flag set on a QoS 0 PUBLISH")]
    DupOnQos0,
    /// A field runs past the end of the packet (the remaining length is too short for it).
    #[error("packet body ends in the middle of a field")]
    UnexpectedEnd,
    /// Bytes remain after the last field of the packet.
    #[error("{0} unexpected bytes after the end of the packet")]
    TrailingBytes(usize),
    /// A string is not well-formed UTF-8.
    #[error("string is not valid UTF-8")]
    InvalidUtf8,
    /// A string is longer than the 65 535 bytes a length prefix can describe (only possible when
    /// building strings, never when decoding).
    #[error("string of {0} bytes exceeds the 65535-byte limit")]
    StringTooLong(usize),
    /// A string contains U+0000 [MQTT-1.5.4-2].
    #[error("string contains the null character U+0000")]
    NullCharacter,
    /// A packet identifier is zero [MQTT-2.2.1-3].
    #[error("packet identifier 0 is not allowed")]
    ZeroPacketId,
    /// CONNECT names a protocol other than MQTT (or MQIsdp for 3.1).
    #[error("unknown protocol name in CONNECT")]
    InvalidProtocolName,
    /// CONNECT asks for a protocol level this codec does not speak.
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocolLevel(u8),
    /// A reserved bit of the CONNECT flags is set, or the will flags are inconsistent.
    #[error("invalid CONNECT flags 0x{0:02X}")]
    InvalidConnectFlags(u8),
    /// MQTT 3.1.1 forbids a password without a user name [MQTT-3.1.2-22].
    #[error("password given without a user name")]
    PasswordWithoutUsername,
    /// A reserved bit of the CONNACK acknowledge flags is set, or session present is set on a
    /// refusal.
    #[error("invalid CONNACK acknowledge flags 0x{0:02X}")]
    InvalidConnAckFlags(u8),
    /// An MQTT 3.1.1 CONNACK return code above 5.
    #[error("invalid CONNACK return code {0}")]
    InvalidConnAckCode(u8),
    /// A reason code that is undefined, or not allowed in the packet it appears in.
    #[error("reason code 0x{code:02X} is not valid in {packet:?}")]
    InvalidReasonCode {
        /// The byte found.
        code: u8,
        /// The packet it appeared in.
        packet: ReasonPacket,
    },
    /// An MQTT 3.1.1 SUBACK return code other than 0, 1, 2 or 0x80.
    #[error("invalid SUBACK return code 0x{0:02X}")]
    InvalidSubAckCode(u8),
    /// A property identifier that MQTT 5 does not define.
    #[error("unknown property identifier 0x{0:02X}")]
    UnknownProperty(u8),
    /// A property that exists but may not appear in this packet.
    #[error("property 0x{id:02X} is not allowed in {packet}")]
    PropertyNotAllowed {
        /// The property identifier.
        id: u8,
        /// The packet (or "will properties").
        packet: &'static str,
    },
    /// A property that may appear once appears twice.
    #[error("property 0x{0:02X} appears more than once")]
    DuplicateProperty(u8),
    /// A property holds a value the spec forbids (e.g. Receive Maximum 0).
    #[error("property 0x{0:02X} has a forbidden value")]
    InvalidPropertyValue(u8),
    /// A Topic Alias of 0 [MQTT-3.3.2-8].
    #[error("topic alias 0 is not allowed")]
    ZeroTopicAlias,
    /// A topic name is empty where it must not be, or contains `+` or `#`.
    #[error("invalid topic name")]
    InvalidTopicName,
    /// An MQTT 5 PUBLISH with an empty topic name and no Topic Alias [MQTT-3.3.2-1, 3.3.4].
    #[error("PUBLISH has an empty topic name and no topic alias")]
    EmptyTopicWithoutAlias,
    /// A topic filter is empty, misplaces `+` or `#`, or is a malformed `$share/` filter.
    #[error("invalid topic filter")]
    InvalidTopicFilter,
    /// A SUBSCRIBE or UNSUBSCRIBE with no topic filters, or a SUBACK/UNSUBACK with no codes.
    #[error("packet must carry at least one entry in its payload")]
    EmptyPayload,
    /// Reserved bits of the SUBSCRIBE options are set.
    #[error("invalid subscription options 0x{0:02X}")]
    InvalidSubscriptionOptions(u8),
    /// MQTT 5 SUBSCRIBE options ask for Maximum QoS 3 or Retain Handling 3 (a Protocol Error,
    /// 3.8.3.1).
    #[error("subscription options 0x{0:02X} ask for QoS 3 or retain handling 3")]
    SubscriptionOptionOutOfRange(u8),
    /// No Local set on a shared subscription [MQTT-3.8.3-4].
    #[error("no local is not allowed on a shared subscription")]
    NoLocalOnSharedSubscription,
    /// An MQTT 5-only packet (AUTH) received on an MQTT 3.1.1 connection.
    #[error("AUTH is only defined in MQTT 5")]
    AuthBeforeV5,
}

impl DecodeError {
    /// The MQTT 5 reason code a receiver sends in its DISCONNECT (or CONNACK) for this error.
    pub const fn reason_code(&self) -> ReasonCode {
        use DecodeError::*;
        match self {
            PacketTooLarge { .. } => ReasonCode::PacketTooLarge,
            UnsupportedProtocolLevel(_) | InvalidProtocolName => ReasonCode::UnsupportedProtocolVersion,
            // "It is a Protocol Error to include ... more than once" / "... a value of 0".
            DuplicateProperty(_)
            | InvalidPropertyValue(_)
            | EmptyPayload
            | EmptyTopicWithoutAlias
            | SubscriptionOptionOutOfRange(_)
            | NoLocalOnSharedSubscription => ReasonCode::ProtocolError,
            ZeroTopicAlias => ReasonCode::TopicAliasInvalid,
            InvalidTopicName => ReasonCode::TopicNameInvalid,
            InvalidTopicFilter => ReasonCode::TopicFilterInvalid,
            MalformedVarInt
            | ReservedPacketType(_)
            | InvalidFlags { .. }
            | InvalidQos
            | DupOnQos0
            | StringTooLong(_)
            | UnexpectedEnd
            | TrailingBytes(_)
            | InvalidUtf8
            | NullCharacter
            | ZeroPacketId
            | InvalidConnectFlags(_)
            | PasswordWithoutUsername
            | InvalidConnAckFlags(_)
            | InvalidConnAckCode(_)
            | InvalidReasonCode { .. }
            | InvalidSubAckCode(_)
            | UnknownProperty(_)
            | PropertyNotAllowed { .. }
            | InvalidSubscriptionOptions(_)
            | AuthBeforeV5 => ReasonCode::MalformedPacket,
        }
    }
}

/// Why a packet cannot be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The remaining length would exceed 268 435 455 bytes, the most MQTT can frame.
    #[error("packet body of {0} bytes exceeds MQTT's 268435455-byte limit")]
    PacketTooLarge(usize),
    /// A string or binary field is longer than 65 535 bytes.
    #[error("field of {0} bytes exceeds the 65535-byte limit of a length-prefixed field")]
    FieldTooLong(usize),
    /// The packet cannot be expressed in the connection's protocol version (AUTH before MQTT 5).
    #[error("{0} cannot be sent with MQTT 3.1.1")]
    NotInProtocol(&'static str),
    /// A SUBSCRIBE, UNSUBSCRIBE, SUBACK or UNSUBACK with nothing in its payload.
    #[error("packet must carry at least one entry in its payload")]
    EmptyPayload,
    /// The packet breaks a rule of the spec that its receiver would reject it for.
    #[error("invalid packet: {0}")]
    Invalid(&'static str),
    /// A reason code the spec does not allow in this packet.
    #[error("reason code {code} is not allowed in {packet:?}")]
    ReasonCodeNotAllowed {
        /// The code.
        code: ReasonCode,
        /// The packet.
        packet: ReasonPacket,
    },
    /// An MQTT 3.1.1 PUBLISH needs a topic name; an empty one is only legal with an MQTT 5 alias.
    #[error("PUBLISH needs a topic name (or an MQTT 5 topic alias)")]
    EmptyTopic,
}
