//! MQTT 5 properties (spec 2.2.2): one typed struct per packet, each field an `Option` (or a list
//! for the properties that may repeat).
//!
//! Decoding rejects unknown identifiers and identifiers the packet may not carry (Malformed
//! Packet), repeated single-valued properties and forbidden values (Protocol Error).

use crate::error::{DecodeError, EncodeError};
use crate::list::{Collector, SubscriptionIds, UserProperties};
use crate::string::MqttString;
use crate::topic::TopicName;
use crate::types::{QoS, SubscriptionId};
use crate::varint;
use crate::wire::{field_len, put_binary, put_string, Reader};
use bytes::{BufMut, Bytes, BytesMut};
use std::num::{NonZeroU16, NonZeroU32};

/// Property identifiers (spec table 2-4).
pub mod id {
    #![allow(missing_docs)]
    pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
    pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const CORRELATION_DATA: u8 = 0x09;
    pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
    pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
    pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub const AUTHENTICATION_METHOD: u8 = 0x15;
    pub const AUTHENTICATION_DATA: u8 = 0x16;
    pub const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
    pub const WILL_DELAY_INTERVAL: u8 = 0x18;
    pub const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
    pub const RESPONSE_INFORMATION: u8 = 0x1A;
    pub const SERVER_REFERENCE: u8 = 0x1C;
    pub const REASON_STRING: u8 = 0x1F;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const MAXIMUM_QOS: u8 = 0x24;
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    pub const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
    pub const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
    pub const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;

    /// Whether MQTT 5 defines this identifier at all.
    pub const fn is_known(id: u32) -> bool {
        matches!(
            id,
            0x01 | 0x02 | 0x03 | 0x08 | 0x09 | 0x0B | 0x11 | 0x12 | 0x13 | 0x15..=0x1A | 0x1C
                | 0x1F | 0x21..=0x2A
        )
    }
}

/// A user property: a name/value pair that may repeat and whose order is kept.
pub type UserProperty = (MqttString, MqttString);

/// Property structs that have a `'static` empty value, for [`PropBox`] to lend out.
pub trait EmptyProperties: Default + 'static {
    /// The shared empty value.
    fn empty() -> &'static Self;
}

/// Properties kept out of line: a single pointer inside the packet, and no allocation at all
/// while empty (the common case for PUBLISH).
///
/// Reading through it (`publish.properties.topic_alias`) sees an empty set when nothing is
/// stored; writing (`publish.properties.topic_alias = Some(..)`) allocates on first use. It keeps
/// [`Publish`](crate::Publish) small, which matters because decoded packets are moved by value.
#[derive(Clone, Default)]
pub struct PropBox<T>(Option<Box<T>>);

impl<T: EmptyProperties> PropBox<T> {
    /// Wraps a property set.
    pub fn new(props: T) -> PropBox<T> {
        PropBox(Some(Box::new(props)))
    }
}

/// Encoding of a property set, shared by the macro-generated structs.
pub(crate) trait PropertyCodec {
    /// Length of the properties, without the property length prefix.
    fn props_len(&self) -> Result<usize, EncodeError>;
    /// Writes the properties, length prefix included.
    fn write_props(&self, len: usize, out: &mut BytesMut);
}

#[allow(private_bounds)] // crate-internal methods on a public type
impl<T: EmptyProperties + PropertyCodec> PropBox<T> {
    /// Length of the properties; an unallocated box is known empty without looking.
    #[inline]
    pub(crate) fn len(&self) -> Result<usize, EncodeError> {
        match &self.0 {
            None => Ok(0),
            Some(p) => p.props_len(),
        }
    }

    /// Writes the properties with their length prefix (a single 0 when there are none).
    #[inline]
    pub(crate) fn encode(&self, len: usize, out: &mut BytesMut) {
        match &self.0 {
            None => out.put_u8(0),
            Some(p) => p.write_props(len, out),
        }
    }
}

impl<T: EmptyProperties> std::ops::Deref for PropBox<T> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        match &self.0 {
            Some(props) => props,
            None => T::empty(),
        }
    }
}

impl<T: EmptyProperties> std::ops::DerefMut for PropBox<T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        self.0.get_or_insert_with(Box::default)
    }
}

impl<T: EmptyProperties + PartialEq> PartialEq for PropBox<T> {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl<T: EmptyProperties + Eq> Eq for PropBox<T> {}

impl<T: EmptyProperties + std::fmt::Debug> std::fmt::Debug for PropBox<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

impl<T: EmptyProperties> From<T> for PropBox<T> {
    fn from(props: T) -> Self {
        PropBox::new(props)
    }
}

#[cfg(feature = "arbitrary")]
impl<'a, T: EmptyProperties + arbitrary::Arbitrary<'a>> arbitrary::Arbitrary<'a> for PropBox<T> {
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(if u.arbitrary()? { PropBox::new(T::arbitrary(u)?) } else { PropBox::default() })
    }
}

/// How one property type is read, sized and written.
trait PropCodec {
    type Value;
    fn read(r: &mut Reader<'_>, id: u8) -> Result<Self::Value, DecodeError>;
    /// Length of the value alone (the identifier byte is added by the caller).
    fn len(v: &Self::Value) -> Result<usize, EncodeError>;
    fn write(v: &Self::Value, out: &mut BytesMut);
}

/// Codecs for fixed-width values: read the raw integer, then check and convert it.
macro_rules! fixed_codec {
    ($(#[$meta:meta])* $name:ident: $ty:ty = $read:ident / $put:ident ($len:literal),
     read: $from:expr, write: $to:expr) => {
        $(#[$meta])*
        struct $name;
        impl PropCodec for $name {
            type Value = $ty;
            fn read(r: &mut Reader<'_>, id: u8) -> Result<$ty, DecodeError> {
                ($from)(r.$read()?, id)
            }
            fn len(_: &$ty) -> Result<usize, EncodeError> {
                Ok($len)
            }
            fn write(v: &$ty, out: &mut BytesMut) {
                out.$put(($to)(v))
            }
        }
    };
}

fixed_codec!(
    /// A byte that must be 0 or 1.
    Flag: bool = u8 / put_u8 (1),
    read: |v, id| match v {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(DecodeError::InvalidPropertyValue(id)),
    },
    write: |v: &bool| u8::from(*v)
);
fixed_codec!(U16: u16 = u16 / put_u16 (2), read: |v, _| Ok(v), write: |v: &u16| *v);
fixed_codec!(U32: u32 = u32 / put_u32 (4), read: |v, _| Ok(v), write: |v: &u32| *v);
fixed_codec!(
    /// A two-byte integer where 0 is a Protocol Error (Receive Maximum).
    U16Nz: NonZeroU16 = u16 / put_u16 (2),
    read: |v, id| NonZeroU16::new(v).ok_or(DecodeError::InvalidPropertyValue(id)),
    write: |v: &NonZeroU16| v.get()
);
fixed_codec!(
    /// Topic Alias: 0 is not permitted and has its own reason code.
    Alias: NonZeroU16 = u16 / put_u16 (2),
    read: |v, _| NonZeroU16::new(v).ok_or(DecodeError::ZeroTopicAlias),
    write: |v: &NonZeroU16| v.get()
);
fixed_codec!(
    /// A four-byte integer where 0 is a Protocol Error (Maximum Packet Size).
    U32Nz: NonZeroU32 = u32 / put_u32 (4),
    read: |v, id| NonZeroU32::new(v).ok_or(DecodeError::InvalidPropertyValue(id)),
    write: |v: &NonZeroU32| v.get()
);

/// Maximum QoS: a byte that must be 0 or 1 (QoS 2 is expressed by omitting the property).
struct MaxQos;
impl PropCodec for MaxQos {
    type Value = QoS;
    fn read(r: &mut Reader<'_>, id: u8) -> Result<QoS, DecodeError> {
        match r.u8()? {
            0 => Ok(QoS::AtMostOnce),
            1 => Ok(QoS::AtLeastOnce),
            _ => Err(DecodeError::InvalidPropertyValue(id)),
        }
    }
    fn len(v: &QoS) -> Result<usize, EncodeError> {
        match v {
            QoS::ExactlyOnce => Err(EncodeError::Invalid("Maximum QoS can only be 0 or 1; omit it for 2")),
            _ => Ok(1),
        }
    }
    fn write(v: &QoS, out: &mut BytesMut) {
        out.put_u8(*v as u8);
    }
}

/// Subscription Identifier: a variable byte integer from 1 to 268 435 455.
struct SubId;
impl PropCodec for SubId {
    type Value = SubscriptionId;
    fn read(r: &mut Reader<'_>, id: u8) -> Result<SubscriptionId, DecodeError> {
        SubscriptionId::new(r.varint()?).ok_or(DecodeError::InvalidPropertyValue(id))
    }
    fn len(v: &SubscriptionId) -> Result<usize, EncodeError> {
        Ok(varint::len(v.get()))
    }
    fn write(v: &SubscriptionId, out: &mut BytesMut) {
        varint::encode(v.get(), out);
    }
}

struct Utf8;
impl PropCodec for Utf8 {
    type Value = MqttString;
    fn read(r: &mut Reader<'_>, _: u8) -> Result<MqttString, DecodeError> {
        r.string()
    }
    fn len(v: &MqttString) -> Result<usize, EncodeError> {
        field_len(v.len())
    }
    fn write(v: &MqttString, out: &mut BytesMut) {
        put_string(out, v);
    }
}

/// Response Topic: a topic name, so no wildcards [MQTT-3.3.2-14].
struct Topic;
impl PropCodec for Topic {
    type Value = TopicName;
    fn read(r: &mut Reader<'_>, _: u8) -> Result<TopicName, DecodeError> {
        let name = TopicName::from_mqtt_string(r.string()?)?;
        if name.is_empty() {
            return Err(DecodeError::InvalidTopicName);
        }
        Ok(name)
    }
    fn len(v: &TopicName) -> Result<usize, EncodeError> {
        field_len(v.as_mqtt_str().len())
    }
    fn write(v: &TopicName, out: &mut BytesMut) {
        put_string(out, v.as_mqtt_str());
    }
}

struct Bin;
impl PropCodec for Bin {
    type Value = Bytes;
    fn read(r: &mut Reader<'_>, _: u8) -> Result<Bytes, DecodeError> {
        r.binary()
    }
    fn len(v: &Bytes) -> Result<usize, EncodeError> {
        field_len(v.len())
    }
    fn write(v: &Bytes, out: &mut BytesMut) {
        put_binary(out, v);
    }
}

/// Skips the value of property `pid` in a block that was already validated (used to gather
/// interleaved list entries in a second pass).
pub(crate) fn skip_value(pid: u32, r: &mut Reader<'_>) -> Result<(), DecodeError> {
    use id::*;
    match u8::try_from(pid).unwrap_or(0) {
        PAYLOAD_FORMAT_INDICATOR
        | REQUEST_PROBLEM_INFORMATION
        | REQUEST_RESPONSE_INFORMATION
        | MAXIMUM_QOS
        | RETAIN_AVAILABLE
        | WILDCARD_SUBSCRIPTION_AVAILABLE
        | SUBSCRIPTION_IDENTIFIER_AVAILABLE
        | SHARED_SUBSCRIPTION_AVAILABLE => {
            r.u8()?;
        }
        SERVER_KEEP_ALIVE | RECEIVE_MAXIMUM | TOPIC_ALIAS_MAXIMUM | TOPIC_ALIAS => {
            r.u16()?;
        }
        MESSAGE_EXPIRY_INTERVAL | SESSION_EXPIRY_INTERVAL | WILL_DELAY_INTERVAL | MAXIMUM_PACKET_SIZE => {
            r.u32()?;
        }
        SUBSCRIPTION_IDENTIFIER => {
            r.varint()?;
        }
        CONTENT_TYPE
        | RESPONSE_TOPIC
        | CORRELATION_DATA
        | ASSIGNED_CLIENT_IDENTIFIER
        | AUTHENTICATION_METHOD
        | AUTHENTICATION_DATA
        | RESPONSE_INFORMATION
        | SERVER_REFERENCE
        | REASON_STRING => {
            r.binary()?;
        }
        USER_PROPERTY => {
            r.binary()?;
            r.binary()?;
        }
        other => return Err(DecodeError::UnknownProperty(other)),
    }
    Ok(())
}

/// The error for an identifier this packet may not carry.
fn unexpected(id: u32, packet: &'static str) -> DecodeError {
    match u8::try_from(id) {
        Ok(id) if id::is_known(u32::from(id)) => DecodeError::PropertyNotAllowed { id, packet },
        _ => DecodeError::UnknownProperty(u8::try_from(id).unwrap_or(u8::MAX)),
    }
}

#[inline]
fn set_once<T>(slot: &mut Option<T>, id: u8, value: T) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::DuplicateProperty(id));
    }
    *slot = Some(value);
    Ok(())
}

macro_rules! properties {
    (
        $(#[doc = $doc:literal])*
        $name:ident, $packet:literal {
            $( $(#[doc = $fdoc:literal])* $field:ident: $ty:ty = $fid:ident as $codec:ident, )*
        }
        $( list $(#[doc = $ldoc:literal])* $lfield:ident: $lid:ident as $lcodec:ident, )?
    ) => {
        $(#[doc = $doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Default)]
        #[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
        #[non_exhaustive]
        pub struct $name {
            $( $(#[doc = $fdoc])*
            #[cfg_attr(feature = "arbitrary", arbitrary(with = crate::arb::ArbField::arb))]
            pub $field: Option<$ty>, )*
            $( $(#[doc = $ldoc])* pub $lfield: SubscriptionIds, )?
            /// User properties, in the order they appeared.
            pub user_properties: UserProperties,
        }

        impl $name {
            /// No property set, as a constant.
            pub const EMPTY: $name = $name {
                $( $field: None, )*
                $( $lfield: SubscriptionIds::new(), )?
                user_properties: UserProperties::new(),
            };

            /// Reads the property length and the properties that follow it.
            /// Reads `len` bytes of properties (the length prefix was read by the caller).
            fn decode_block(r: &mut Reader<'_>, len: usize) -> Result<Self, DecodeError> {
                let mut p = Self::default();
                if len == 0 {
                    return Ok(p);
                }
                let block = r.sub(len)?;
                let mut r = block.clone();
                let mut user = Collector::new();
                $( let mut $lfield = Collector::new(); )?
                while !r.is_empty() {
                    let start = r.pos();
                    let pid = r.varint()?;
                    match u8::try_from(pid).unwrap_or(0) {
                        $( id::$fid => {
                            let v = $codec::read(&mut r, id::$fid)?;
                            set_once(&mut p.$field, id::$fid, v)?;
                        } )*
                        $( id::$lid => {
                            $lcodec::read(&mut r, id::$lid)?;
                            $lfield.add(start, r.pos());
                        } )?
                        id::USER_PROPERTY => {
                            r.string()?;
                            r.string()?;
                            user.add(start, r.pos());
                        }
                        _ => return Err(unexpected(pid, $packet)),
                    }
                }
                p.user_properties = user.finish(&block, id::USER_PROPERTY)?;
                $( p.$lfield = $lfield.finish(&block, id::$lid)?; )?
                Ok(p)
            }

            /// Length of the properties, without the property length prefix.
            pub(crate) fn len(&self) -> Result<usize, EncodeError> {
                let mut len = 0;
                $( if let Some(v) = &self.$field {
                    len += 1 + $codec::len(v)?;
                } )*
                $( len += self.$lfield.encoded_len(); )?
                len += self.user_properties.encoded_len();
                Ok(len)
            }

            /// Writes the properties (length prefix included); `len` is what [`Self::len`] said.
            pub(crate) fn encode(&self, len: usize, out: &mut BytesMut) {
                varint::encode(len as u32, out);
                $( if let Some(v) = &self.$field {
                    out.put_u8(id::$fid);
                    $codec::write(v, out);
                } )*
                $( self.$lfield.write(out); )?
                self.user_properties.write(out);
            }

            /// Reads the properties into a [`PropBox`], which stays unallocated when there
            /// are none.
            #[inline]
            pub(crate) fn decode_boxed(r: &mut Reader<'_>) -> Result<PropBox<Self>, DecodeError> {
                // The common case, no properties, builds nothing.
                let len = r.varint()? as usize;
                if len == 0 {
                    return Ok(PropBox::default());
                }
                Ok(PropBox::new(Self::decode_block(r, len)?))
            }

            /// Whether no property is set.
            pub fn is_empty(&self) -> bool {
                true $( && self.$field.is_none() )* $( && self.$lfield.is_empty() )?
                    && self.user_properties.is_empty()
            }
        }

        impl PropertyCodec for $name {
            fn props_len(&self) -> Result<usize, EncodeError> {
                self.len()
            }
            fn write_props(&self, len: usize, out: &mut BytesMut) {
                self.encode(len, out)
            }
        }

        impl EmptyProperties for $name {
            fn empty() -> &'static Self {
                static EMPTY: $name = $name::EMPTY;
                &EMPTY
            }
        }
    };
}

properties! {
    /// Properties of CONNECT (spec 3.1.2.11).
    ConnectProperties, "CONNECT" {
        /// Seconds the session outlives the connection; absent means 0.
        session_expiry_interval: u32 = SESSION_EXPIRY_INTERVAL as U32,
        /// How many QoS 1 and 2 publishes the client accepts concurrently; absent means 65 535.
        receive_maximum: NonZeroU16 = RECEIVE_MAXIMUM as U16Nz,
        /// Largest packet the client accepts; absent means no limit beyond the protocol's.
        maximum_packet_size: NonZeroU32 = MAXIMUM_PACKET_SIZE as U32Nz,
        /// Highest topic alias the client accepts from the server; absent means 0 (none).
        topic_alias_maximum: u16 = TOPIC_ALIAS_MAXIMUM as U16,
        /// Ask the server for Response Information in CONNACK.
        request_response_information: bool = REQUEST_RESPONSE_INFORMATION as Flag,
        /// Whether the server may send Reason Strings and User Properties on failures.
        request_problem_information: bool = REQUEST_PROBLEM_INFORMATION as Flag,
        /// Name of the enhanced authentication method.
        authentication_method: MqttString = AUTHENTICATION_METHOD as Utf8,
        /// Data of the enhanced authentication method.
        authentication_data: Bytes = AUTHENTICATION_DATA as Bin,
    }
}

properties! {
    /// Properties of the will message inside CONNECT (spec 3.1.3.2).
    WillProperties, "will properties" {
        /// Seconds the server waits before publishing the will.
        will_delay_interval: u32 = WILL_DELAY_INTERVAL as U32,
        /// Whether the payload is UTF-8 text (true) or unspecified bytes.
        payload_format_indicator: bool = PAYLOAD_FORMAT_INDICATOR as Flag,
        /// Lifetime of the will message in seconds.
        message_expiry_interval: u32 = MESSAGE_EXPIRY_INTERVAL as U32,
        /// MIME type of the payload.
        content_type: MqttString = CONTENT_TYPE as Utf8,
        /// Topic for a response (request/response pattern).
        response_topic: TopicName = RESPONSE_TOPIC as Topic,
        /// Data correlating a response with its request.
        correlation_data: Bytes = CORRELATION_DATA as Bin,
    }
}

properties! {
    /// Properties of CONNACK (spec 3.2.2.3).
    ConnAckProperties, "CONNACK" {
        /// Session expiry the server uses, if it overrides the client's.
        session_expiry_interval: u32 = SESSION_EXPIRY_INTERVAL as U32,
        /// How many QoS 1 and 2 publishes the server accepts concurrently.
        receive_maximum: NonZeroU16 = RECEIVE_MAXIMUM as U16Nz,
        /// Highest QoS the server supports (absent means 2).
        maximum_qos: QoS = MAXIMUM_QOS as MaxQos,
        /// Whether retained messages are supported (absent means yes).
        retain_available: bool = RETAIN_AVAILABLE as Flag,
        /// Largest packet the server accepts.
        maximum_packet_size: NonZeroU32 = MAXIMUM_PACKET_SIZE as U32Nz,
        /// Client identifier assigned by the server when the client sent an empty one.
        assigned_client_identifier: MqttString = ASSIGNED_CLIENT_IDENTIFIER as Utf8,
        /// Highest topic alias the server accepts from the client.
        topic_alias_maximum: u16 = TOPIC_ALIAS_MAXIMUM as U16,
        /// Human-readable diagnostics.
        reason_string: MqttString = REASON_STRING as Utf8,
        /// Whether wildcard subscriptions are supported (absent means yes).
        wildcard_subscription_available: bool = WILDCARD_SUBSCRIPTION_AVAILABLE as Flag,
        /// Whether subscription identifiers are supported (absent means yes).
        subscription_identifiers_available: bool = SUBSCRIPTION_IDENTIFIER_AVAILABLE as Flag,
        /// Whether shared subscriptions are supported (absent means yes).
        shared_subscription_available: bool = SHARED_SUBSCRIPTION_AVAILABLE as Flag,
        /// Keep alive the server imposes, overriding the client's.
        server_keep_alive: u16 = SERVER_KEEP_ALIVE as U16,
        /// Basis for response topics, when the client asked for it.
        response_information: MqttString = RESPONSE_INFORMATION as Utf8,
        /// Another server to use.
        server_reference: MqttString = SERVER_REFERENCE as Utf8,
        /// Enhanced authentication method.
        authentication_method: MqttString = AUTHENTICATION_METHOD as Utf8,
        /// Enhanced authentication data.
        authentication_data: Bytes = AUTHENTICATION_DATA as Bin,
    }
}

properties! {
    /// Properties of PUBLISH (spec 3.3.2.3).
    PublishProperties, "PUBLISH" {
        /// Whether the payload is UTF-8 text (true) or unspecified bytes.
        payload_format_indicator: bool = PAYLOAD_FORMAT_INDICATOR as Flag,
        /// Lifetime of the message in seconds.
        message_expiry_interval: u32 = MESSAGE_EXPIRY_INTERVAL as U32,
        /// Topic alias standing for (or being set to) the topic name.
        topic_alias: NonZeroU16 = TOPIC_ALIAS as Alias,
        /// Topic for a response.
        response_topic: TopicName = RESPONSE_TOPIC as Topic,
        /// Data correlating a response with its request.
        correlation_data: Bytes = CORRELATION_DATA as Bin,
        /// MIME type of the payload.
        content_type: MqttString = CONTENT_TYPE as Utf8,
    }
    list
    /// Identifiers of the subscriptions that matched (server to client only).
    subscription_identifiers: SUBSCRIPTION_IDENTIFIER as SubId,
}

properties! {
    /// Properties of PUBACK, PUBREC, PUBREL and PUBCOMP (spec 3.4.2.2).
    AckProperties, "PUBACK/PUBREC/PUBREL/PUBCOMP" {
        /// Human-readable diagnostics.
        reason_string: MqttString = REASON_STRING as Utf8,
    }
}

properties! {
    /// Properties of SUBSCRIBE (spec 3.8.2.1).
    SubscribeProperties, "SUBSCRIBE" {
        /// Identifier the server attaches to deliveries for these subscriptions.
        subscription_identifier: SubscriptionId = SUBSCRIPTION_IDENTIFIER as SubId,
    }
}

properties! {
    /// Properties of SUBACK and UNSUBACK (spec 3.9.2.1, 3.11.2.1).
    SubAckProperties, "SUBACK/UNSUBACK" {
        /// Human-readable diagnostics.
        reason_string: MqttString = REASON_STRING as Utf8,
    }
}

properties! {
    /// Properties of UNSUBSCRIBE (spec 3.10.2.1): user properties only.
    UnsubscribeProperties, "UNSUBSCRIBE" {
    }
}

properties! {
    /// Properties of DISCONNECT (spec 3.14.2.2).
    DisconnectProperties, "DISCONNECT" {
        /// New session expiry (client to server only).
        session_expiry_interval: u32 = SESSION_EXPIRY_INTERVAL as U32,
        /// Human-readable diagnostics.
        reason_string: MqttString = REASON_STRING as Utf8,
        /// Another server to use.
        server_reference: MqttString = SERVER_REFERENCE as Utf8,
    }
}

properties! {
    /// Properties of AUTH (spec 3.15.2.2).
    AuthProperties, "AUTH" {
        /// Enhanced authentication method.
        authentication_method: MqttString = AUTHENTICATION_METHOD as Utf8,
        /// Enhanced authentication data.
        authentication_data: Bytes = AUTHENTICATION_DATA as Bin,
        /// Human-readable diagnostics.
        reason_string: MqttString = REASON_STRING as Utf8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode<T: EmptyProperties + Clone>(
        bytes: &'static [u8],
        f: fn(&mut Reader<'_>) -> Result<PropBox<T>, DecodeError>,
    ) -> Result<T, DecodeError> {
        let b = Bytes::from_static(bytes);
        let mut r = Reader::new(&b);
        let v = f(&mut r)?;
        r.finish()?;
        Ok((*v).clone())
    }

    #[test]
    fn duplicate_single_property_is_protocol_error() {
        let e = decode(&[6, 0x21, 0, 5, 0x21, 0, 6], ConnectProperties::decode_boxed).unwrap_err();
        assert_eq!(e, DecodeError::DuplicateProperty(0x21));
        assert_eq!(e.reason_code(), crate::ReasonCode::ProtocolError);
    }

    #[test]
    fn property_from_another_packet_is_malformed() {
        // Topic Alias is a PUBLISH property, not a CONNECT one.
        let e = decode(&[3, 0x23, 0, 1], ConnectProperties::decode_boxed).unwrap_err();
        assert_eq!(e, DecodeError::PropertyNotAllowed { id: 0x23, packet: "CONNECT" });
        assert_eq!(e.reason_code(), crate::ReasonCode::MalformedPacket);
        assert_eq!(decode(&[2, 0x7f, 0], ConnectProperties::decode_boxed), Err(DecodeError::UnknownProperty(0x7f)));
    }

    #[test]
    fn forbidden_values() {
        assert_eq!(
            decode(&[3, 0x21, 0, 0], ConnectProperties::decode_boxed),
            Err(DecodeError::InvalidPropertyValue(0x21))
        );
        assert_eq!(
            decode(&[2, 0x17, 2], ConnectProperties::decode_boxed),
            Err(DecodeError::InvalidPropertyValue(0x17))
        );
        assert_eq!(
            decode(&[2, 0x24, 2], ConnAckProperties::decode_boxed),
            Err(DecodeError::InvalidPropertyValue(0x24))
        );
        assert_eq!(decode(&[3, 0x23, 0, 0], PublishProperties::decode_boxed), Err(DecodeError::ZeroTopicAlias));
        assert_eq!(
            decode(&[2, 0x0B, 0], SubscribeProperties::decode_boxed),
            Err(DecodeError::InvalidPropertyValue(0x0B))
        );
    }

    #[test]
    fn repeated_properties_keep_order() {
        let p = decode(
            &[14, 0x0B, 5, 0x0B, 0x80, 0x01, 0x26, 0, 1, b'k', 0, 1, b'v', 0x0B, 1],
            PublishProperties::decode_boxed,
        )
        .unwrap();
        let ids: Vec<u32> = p.subscription_identifiers.iter().map(|v| v.get()).collect();
        assert_eq!(ids, [5, 128, 1]);
        assert_eq!(p.user_properties.len(), 1);
        assert_eq!(p.user_properties.first().unwrap().0, "k");
        // The ids were not contiguous, so they were gathered into a copy; re-encoding keeps them
        // in order, followed by the user property.
        let mut out = BytesMut::new();
        p.encode(p.len().unwrap(), &mut out);
        assert_eq!(&out[..], &[14, 0x0B, 5, 0x0B, 0x80, 0x01, 0x0B, 1, 0x26, 0, 1, b'k', 0, 1, b'v']);
    }

    #[test]
    fn property_block_longer_than_packet() {
        assert_eq!(decode(&[9, 0x21, 0, 5], ConnectProperties::decode_boxed), Err(DecodeError::UnexpectedEnd));
    }
}
