//! The fifteen control packets, as one enum shared by MQTT 3.1, 3.1.1 and 5.0.
//!
//! One representation for every version keeps the session code above version-agnostic: MQTT 3.1.1
//! packets decode with empty properties and the reason codes the MQTT 5 spec maps their return
//! codes to; encoding for 3.1.1 leaves out what 3.1.1 cannot carry.

mod ack;
mod connect;
mod disconnect;
mod publish;
mod subscribe;

pub use ack::Ack;
pub use connect::{ConnAck, Connect, Will};
pub use disconnect::{Auth, Disconnect};
pub use publish::{Publish, PublishRef};
pub use subscribe::{SubAck, Subscribe, Subscription, SubscriptionOptions, UnsubAck, Unsubscribe};

use crate::error::{DecodeError, EncodeError};
use crate::reason::ReasonPacket;
use crate::types::Protocol;
use crate::varint;
use crate::wire::Reader;
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The packet type nibble of the fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
#[allow(missing_docs)]
pub enum PacketType {
    Connect = 1,
    ConnAck = 2,
    Publish = 3,
    PubAck = 4,
    PubRec = 5,
    PubRel = 6,
    PubComp = 7,
    Subscribe = 8,
    SubAck = 9,
    Unsubscribe = 10,
    UnsubAck = 11,
    PingReq = 12,
    PingResp = 13,
    Disconnect = 14,
    Auth = 15,
}

/// An MQTT control packet.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum Packet {
    /// CONNECT: client to server, first packet of a connection.
    Connect(Box<Connect>),
    /// CONNACK: the server's answer to CONNECT.
    ConnAck(Box<ConnAck>),
    /// PUBLISH: an application message, either direction.
    Publish(Publish),
    /// PUBACK: QoS 1 acknowledgement.
    PubAck(Ack),
    /// PUBREC: QoS 2, part 1.
    PubRec(Ack),
    /// PUBREL: QoS 2, part 2.
    PubRel(Ack),
    /// PUBCOMP: QoS 2, part 3.
    PubComp(Ack),
    /// SUBSCRIBE.
    Subscribe(Subscribe),
    /// SUBACK.
    SubAck(SubAck),
    /// UNSUBSCRIBE.
    Unsubscribe(Unsubscribe),
    /// UNSUBACK.
    UnsubAck(UnsubAck),
    /// PINGREQ.
    PingReq,
    /// PINGRESP.
    PingResp,
    /// DISCONNECT (from the server too, in MQTT 5).
    Disconnect(Disconnect),
    /// AUTH (MQTT 5 only).
    Auth(Auth),
}

/// A packet decoded from a borrowed buffer by [`Decoder::decode_ref`](crate::Decoder::decode_ref):
/// PUBLISH borrows from the buffer, every other packet is owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PacketRef<'a> {
    /// A PUBLISH borrowing its topic and payload.
    Publish(PublishRef<'a>),
    /// Any other packet (boxed: keeps the borrowed PUBLISH, the hot case, small to return).
    Other(Box<Packet>),
}

impl PacketRef<'_> {
    /// The owned packet (copies topic and payload of a PUBLISH).
    pub fn to_owned(&self) -> Packet {
        match self {
            PacketRef::Publish(p) => Packet::Publish(p.to_owned()),
            PacketRef::Other(p) => (**p).clone(),
        }
    }
}

/// Sizes computed once per encode: the remaining length and the length of the (first) property
/// block, so properties are not measured twice.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sizes {
    pub(crate) body: usize,
    pub(crate) props: usize,
}

impl Packet {
    /// The packet type.
    pub fn packet_type(&self) -> PacketType {
        match self {
            Packet::Connect(_) => PacketType::Connect,
            Packet::ConnAck(_) => PacketType::ConnAck,
            Packet::Publish(_) => PacketType::Publish,
            Packet::PubAck(_) => PacketType::PubAck,
            Packet::PubRec(_) => PacketType::PubRec,
            Packet::PubRel(_) => PacketType::PubRel,
            Packet::PubComp(_) => PacketType::PubComp,
            Packet::Subscribe(_) => PacketType::Subscribe,
            Packet::SubAck(_) => PacketType::SubAck,
            Packet::Unsubscribe(_) => PacketType::Unsubscribe,
            Packet::UnsubAck(_) => PacketType::UnsubAck,
            Packet::PingReq => PacketType::PingReq,
            Packet::PingResp => PacketType::PingResp,
            Packet::Disconnect(_) => PacketType::Disconnect,
            Packet::Auth(_) => PacketType::Auth,
        }
    }

    /// The first byte of the fixed header.
    fn first_byte(&self) -> u8 {
        let flags = match self {
            Packet::Publish(p) => p.flags(),
            Packet::PubRel(_) | Packet::Subscribe(_) | Packet::Unsubscribe(_) => 0b0010,
            _ => 0,
        };
        ((self.packet_type() as u8) << 4) | flags
    }

    fn sizes(&self, protocol: Protocol) -> Result<Sizes, EncodeError> {
        let sizes = match self {
            Packet::Connect(p) => p.sizes()?,
            Packet::ConnAck(p) => p.sizes(protocol)?,
            Packet::Publish(p) => p.sizes(protocol)?,
            Packet::PubAck(p) | Packet::PubRec(p) => p.sizes(protocol, ReasonPacket::PubAckRec)?,
            Packet::PubRel(p) | Packet::PubComp(p) => p.sizes(protocol, ReasonPacket::PubRelComp)?,
            Packet::Subscribe(p) => p.sizes(protocol)?,
            Packet::SubAck(p) => p.sizes(protocol)?,
            Packet::Unsubscribe(p) => p.sizes(protocol)?,
            Packet::UnsubAck(p) => p.sizes(protocol)?,
            Packet::PingReq | Packet::PingResp => Sizes { body: 0, props: 0 },
            Packet::Disconnect(p) => p.sizes(protocol)?,
            Packet::Auth(p) => p.sizes(protocol)?,
        };
        if sizes.body > varint::MAX as usize {
            return Err(EncodeError::PacketTooLarge(sizes.body));
        }
        Ok(sizes)
    }

    /// The number of bytes [`Packet::encode`] writes, computed without encoding.
    ///
    /// CONNECT is always sized for the protocol it names itself; `protocol` applies to the rest.
    pub fn encoded_len(&self, protocol: Protocol) -> Result<usize, EncodeError> {
        let body = self.sizes(protocol)?.body;
        Ok(1 + varint::len(body as u32) + body)
    }

    /// Appends the packet, framed, to `out` (reserving the space first).
    ///
    /// CONNECT is encoded for the protocol it names itself; `protocol` applies to the rest.
    /// Encoding for MQTT 3.1/3.1.1 drops properties and MQTT 5-only reason codes, and refuses
    /// AUTH.
    ///
    /// ```
    /// use bytes::BytesMut;
    /// use mqtt_proto::{Packet, Protocol};
    ///
    /// let mut out = BytesMut::new();
    /// Packet::PingReq.encode(Protocol::V5, &mut out)?;
    /// assert_eq!(&out[..], &[0xC0, 0x00]);
    /// # Ok::<(), mqtt_proto::EncodeError>(())
    /// ```
    pub fn encode(&self, protocol: Protocol, out: &mut BytesMut) -> Result<(), EncodeError> {
        // One match, so each packet type gets a straight-line encoder.
        let first = self.first_byte();
        match self {
            Packet::Connect(p) => frame(first, p.sizes(), out, |s, out| p.write(s, out)),
            Packet::ConnAck(p) => frame(first, p.sizes(protocol), out, |s, out| p.write(protocol, s, out)),
            Packet::Publish(p) => frame(first, p.sizes(protocol), out, |s, out| p.write(protocol, s, out)),
            Packet::PubAck(p) | Packet::PubRec(p) => {
                frame(first, p.sizes(protocol, ReasonPacket::PubAckRec), out, |s, out| p.write(protocol, s, out))
            }
            Packet::PubRel(p) | Packet::PubComp(p) => {
                frame(first, p.sizes(protocol, ReasonPacket::PubRelComp), out, |s, out| p.write(protocol, s, out))
            }
            Packet::Subscribe(p) => frame(first, p.sizes(protocol), out, |s, out| p.write(protocol, s, out)),
            Packet::SubAck(p) => frame(first, p.sizes(protocol), out, |s, out| p.write(protocol, s, out)),
            Packet::Unsubscribe(p) => frame(first, p.sizes(protocol), out, |s, out| p.write(protocol, s, out)),
            Packet::UnsubAck(p) => frame(first, p.sizes(protocol), out, |s, out| p.write(protocol, s, out)),
            Packet::PingReq | Packet::PingResp => frame(first, Ok(Sizes { body: 0, props: 0 }), out, |_, _| {}),
            Packet::Disconnect(p) => frame(first, p.sizes(protocol), out, |s, out| p.write(protocol, s, out)),
            Packet::Auth(p) => frame(first, p.sizes(protocol), out, |s, out| p.write(s, out)),
        }
    }

    /// Decodes the packet `frame` holds (exactly one whole packet) from its first byte and the
    /// position `start` where its body begins.
    #[inline]
    pub(crate) fn decode_frame(
        first: u8,
        frame: Bytes,
        start: usize,
        protocol: Protocol,
    ) -> Result<Packet, DecodeError> {
        let kind = first >> 4;
        let flags = first & 0x0f;
        let expect_flags = |want: u8| {
            if flags == want {
                Ok(())
            } else {
                Err(DecodeError::InvalidFlags { packet_type: kind, flags })
            }
        };
        let v5 = protocol.is_v5();
        let mut r = Reader::span(&frame, start, frame.len());
        let r = &mut r;
        let packet = match kind {
            1 => {
                expect_flags(0)?;
                Packet::Connect(Box::new(Connect::read(r)?))
            }
            2 => {
                expect_flags(0)?;
                Packet::ConnAck(Box::new(ConnAck::read(r, v5)?))
            }
            3 => {
                let (mut publish, at) = Publish::read_head(r, flags, v5)?;
                // The payload is the rest of the frame. Narrowing the frame we own costs no
                // reference-count update, where slicing it would (see BENCHMARKS.md).
                let mut payload = frame;
                payload.advance(at);
                publish.payload = payload;
                return Ok(Packet::Publish(publish));
            }
            4 => {
                expect_flags(0)?;
                Packet::PubAck(Ack::read(r, v5, ReasonPacket::PubAckRec)?)
            }
            5 => {
                expect_flags(0)?;
                Packet::PubRec(Ack::read(r, v5, ReasonPacket::PubAckRec)?)
            }
            6 => {
                expect_flags(0b0010)?;
                Packet::PubRel(Ack::read(r, v5, ReasonPacket::PubRelComp)?)
            }
            7 => {
                expect_flags(0)?;
                Packet::PubComp(Ack::read(r, v5, ReasonPacket::PubRelComp)?)
            }
            8 => {
                expect_flags(0b0010)?;
                Packet::Subscribe(Subscribe::read(r, v5)?)
            }
            9 => {
                expect_flags(0)?;
                Packet::SubAck(SubAck::read(r, v5)?)
            }
            10 => {
                expect_flags(0b0010)?;
                Packet::Unsubscribe(Unsubscribe::read(r, v5)?)
            }
            11 => {
                expect_flags(0)?;
                Packet::UnsubAck(UnsubAck::read(r, v5)?)
            }
            12 => {
                expect_flags(0)?;
                Packet::PingReq
            }
            13 => {
                expect_flags(0)?;
                Packet::PingResp
            }
            14 => {
                expect_flags(0)?;
                Packet::Disconnect(Disconnect::read(r, v5)?)
            }
            15 if v5 => {
                expect_flags(0)?;
                Packet::Auth(Auth::read(r)?)
            }
            15 => return Err(DecodeError::AuthBeforeV5),
            other => return Err(DecodeError::ReservedPacketType(other)),
        };
        r.finish()?;
        Ok(packet)
    }
}

/// Writes the fixed header for a body of `sizes`, then the body. Nothing is written when the
/// sizes are an error.
#[inline(always)]
fn frame(
    first: u8,
    sizes: Result<Sizes, EncodeError>,
    out: &mut BytesMut,
    body: impl FnOnce(Sizes, &mut BytesMut),
) -> Result<(), EncodeError> {
    let sizes = sizes?;
    if sizes.body > varint::MAX as usize {
        return Err(EncodeError::PacketTooLarge(sizes.body));
    }
    out.reserve(1 + varint::len(sizes.body as u32) + sizes.body);
    out.put_u8(first);
    varint::encode(sizes.body as u32, out);
    let start = out.len();
    body(sizes, out);
    debug_assert_eq!(out.len() - start, sizes.body, "encoded size differs from the computed size");
    Ok(())
}

macro_rules! from_impls {
    ($($variant:ident($ty:ty)),*) => {
        $(impl From<$ty> for Packet {
            fn from(p: $ty) -> Packet {
                Packet::$variant(p)
            }
        })*
    };
}
from_impls!(
    Publish(Publish),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(UnsubAck),
    Disconnect(Disconnect),
    Auth(Auth)
);

impl From<Connect> for Packet {
    fn from(p: Connect) -> Packet {
        Packet::Connect(Box::new(p))
    }
}

impl From<ConnAck> for Packet {
    fn from(p: ConnAck) -> Packet {
        Packet::ConnAck(Box::new(p))
    }
}
