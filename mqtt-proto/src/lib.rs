//! `mqtt-proto`: a strict, zero-copy codec for MQTT 3.1, 3.1.1 and 5.0. Bytes in, packets out,
//! and back; no I/O.
//!
//! - [`Decoder`] turns a byte stream into [`Packet`]s. Input may arrive split at any byte: the
//!   decoder answers "need more" (`Ok(None)`) without consuming anything, and refuses a packet
//!   larger than its maximum as soon as the fixed header is read.
//! - [`Packet::encode`] appends a packet to a [`bytes::BytesMut`]; [`Packet::encoded_len`]
//!   sizes it without encoding.
//! - Topic names, payloads and strings of a decoded packet are [`bytes::Bytes`] slices of the
//!   input: decoding copies no payload. [`Decoder::decode_ref`] decodes from a borrowed buffer
//!   instead, handing out PUBLISH topic and payload as `&str`/`&[u8]` for callers that consume
//!   messages in place.
//! - Every violation a codec can detect is a [`DecodeError`] whose
//!   [`reason_code`](DecodeError::reason_code) is the MQTT 5 reason code the receiver must send.
//!   No input panics the decoder, and it allocates only in proportion to the bytes it was given.
//!
//! One [`Packet`] type serves all versions: MQTT 3.1.1 packets decode with empty properties, so
//! the session code above does not branch on the version except where the protocol does.
//!
//! ```
//! use bytes::BytesMut;
//! use mqtt_proto::{Decoder, Packet, Protocol, Publish, QosPid, PacketId, TopicName};
//!
//! let mut publish = Publish::new(TopicName::new("sensors/7/temp")?, &b"21.5"[..]);
//! publish.qos_pid = QosPid::AtLeastOnce(PacketId::new(1).unwrap());
//! let packet = Packet::Publish(publish);
//!
//! let mut wire = BytesMut::new();
//! packet.encode(Protocol::V5, &mut wire)?;
//! assert_eq!(wire.len(), packet.encoded_len(Protocol::V5)?);
//!
//! let mut decoder = Decoder::new(Protocol::V5);
//! assert_eq!(decoder.decode(&mut wire)?, Some(packet));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#[cfg(feature = "arbitrary")]
mod arb;
mod decoder;
mod error;
pub mod list;
mod packet;
pub mod properties;
mod reason;
mod string;
pub mod topic;
mod types;
pub mod varint;
mod wire;

pub use decoder::{Decoder, FixedHeader, DEFAULT_MAX_PACKET_SIZE, PROTOCOL_MAX_PACKET_SIZE};
pub use error::{DecodeError, EncodeError};
pub use list::{SubscriptionIds, Subscriptions, TopicFilters, UserProperties, WireList};
pub use packet::{
    Ack, Auth, ConnAck, Connect, Disconnect, Packet, PacketRef, PacketType, Publish, PublishRef, SubAck, Subscribe,
    Subscription, SubscriptionOptions, UnsubAck, Unsubscribe, Will,
};
pub use properties::{
    AckProperties, AuthProperties, ConnAckProperties, ConnectProperties, DisconnectProperties, PropBox,
    PublishProperties, SubAckProperties, SubscribeProperties, UnsubscribeProperties, UserProperty, WillProperties,
};
pub use reason::{ReasonCode, ReasonPacket};
pub use string::MqttString;
pub use topic::{TopicFilter, TopicName};
pub use types::{PacketId, Protocol, QoS, QosPid, RetainHandling, SubscriptionId};

/// Re-exported so users need not depend on `bytes` for the basics.
pub use bytes;
