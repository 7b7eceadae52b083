//! Incremental decoding of a byte stream into packets.
//!
//! The decoder keeps no partial state between calls: each call re-reads the fixed header (at
//! most five bytes) of the buffer it is given. That makes "need more" free of side effects, so
//! the caller may append input and call again, or hand the buffer to someone else, at any point.

use crate::error::DecodeError;
use crate::packet::{Packet, PacketRef, PacketType, PublishRef};
use crate::types::Protocol;
use crate::varint;
use bytes::{Bytes, BytesMut};

/// The default maximum packet size: 1 MiB. Large enough for typical IoT payloads, small enough
/// that one connection cannot make the receiver buffer hundreds of megabytes.
pub const DEFAULT_MAX_PACKET_SIZE: u32 = 1024 * 1024;

/// The largest packet MQTT can frame: a 268 435 455-byte body behind a five-byte fixed header.
pub const PROTOCOL_MAX_PACKET_SIZE: u32 = varint::MAX + 5;

/// The fixed header (spec 2.1): first byte and remaining length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedHeader {
    /// Packet type (high nibble) and flags (low nibble).
    pub first_byte: u8,
    /// Length of the body that follows the header.
    pub remaining_length: u32,
    /// Bytes taken by the header itself (2 to 5).
    pub header_len: usize,
}

impl FixedHeader {
    /// Parses the fixed header at the start of `buf`; `Ok(None)` if `buf` ends inside it.
    #[inline]
    pub fn parse(buf: &[u8]) -> Result<Option<FixedHeader>, DecodeError> {
        let Some(&first_byte) = buf.first() else {
            return Ok(None);
        };
        if first_byte >> 4 == 0 {
            return Err(DecodeError::ReservedPacketType(0));
        }
        // Most packets are shorter than 128 bytes: a one-byte remaining length.
        if let Some(&len) = buf.get(1) {
            if len < 0x80 {
                return Ok(Some(FixedHeader { first_byte, remaining_length: u32::from(len), header_len: 2 }));
            }
        }
        Ok(varint::decode(&buf[1..])?.map(|(remaining_length, n)| FixedHeader {
            first_byte,
            remaining_length,
            header_len: 1 + n,
        }))
    }

    /// Header plus body: the number of bytes the whole packet takes.
    #[inline]
    pub fn packet_len(&self) -> usize {
        self.header_len + self.remaining_length as usize
    }
}

/// Turns a byte stream into [`Packet`]s.
///
/// ```
/// use bytes::BytesMut;
/// use mqtt_proto::{Decoder, Packet, Protocol};
///
/// let mut decoder = Decoder::new(Protocol::V5);
/// let mut buf = BytesMut::from(&[0xD0, 0x00, 0xC0][..]); // PINGRESP and half a PINGREQ
/// assert_eq!(decoder.decode(&mut buf)?, Some(Packet::PingResp));
/// assert_eq!(decoder.decode(&mut buf)?, None); // needs more; nothing consumed
/// assert_eq!(buf.len(), 1);
/// buf.extend_from_slice(&[0x00]);
/// assert_eq!(decoder.decode(&mut buf)?, Some(Packet::PingReq));
/// # Ok::<(), mqtt_proto::DecodeError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Decoder {
    protocol: Protocol,
    max_packet_size: u32,
}

impl Decoder {
    /// A decoder for `protocol` with the [`DEFAULT_MAX_PACKET_SIZE`].
    ///
    /// CONNECT names its own protocol and decodes the same whatever `protocol` is; a server
    /// learns the protocol from it and calls [`Decoder::set_protocol`] before the next packet.
    pub fn new(protocol: Protocol) -> Decoder {
        Decoder { protocol, max_packet_size: DEFAULT_MAX_PACKET_SIZE }
    }

    /// Sets the largest packet accepted (whole packet, header included), clamped to what MQTT
    /// can frame. A larger packet is refused with [`DecodeError::PacketTooLarge`] as soon as its
    /// fixed header is read, before its body is buffered.
    pub fn with_max_packet_size(mut self, max: u32) -> Decoder {
        self.max_packet_size = max.min(PROTOCOL_MAX_PACKET_SIZE);
        self
    }

    /// The protocol packets are decoded as.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// Switches protocol (after CONNECT).
    pub fn set_protocol(&mut self, protocol: Protocol) {
        self.protocol = protocol;
    }

    /// The maximum packet size in force.
    pub fn max_packet_size(&self) -> u32 {
        self.max_packet_size
    }

    /// Reads the fixed header and enforces the size limit.
    #[inline]
    fn header(&self, buf: &[u8]) -> Result<Option<FixedHeader>, DecodeError> {
        let Some(h) = FixedHeader::parse(buf)? else {
            return Ok(None);
        };
        let size = h.packet_len() as u64;
        if size > u64::from(self.max_packet_size) {
            return Err(DecodeError::PacketTooLarge { size, max: self.max_packet_size });
        }
        Ok(Some(h))
    }

    /// Decodes the next packet from the front of `buf`.
    ///
    /// Returns `Ok(None)` and leaves `buf` untouched when it does not yet hold a whole packet;
    /// [`Decoder::needed`] says how much is missing. On success the packet's bytes are split off
    /// `buf`, and the packet's topic, payload and strings share them (no copy). On error the
    /// offending packet may have been consumed; the connection is to be closed with
    /// [`DecodeError::reason_code`].
    #[inline]
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Packet>, DecodeError> {
        let Some(h) = self.header(buf)? else {
            return Ok(None);
        };
        if buf.len() < h.packet_len() {
            return Ok(None);
        }
        let frame = buf.split_to(h.packet_len()).freeze();
        Packet::decode_frame(h.first_byte, frame, h.header_len, self.protocol).map(Some)
    }

    /// Like [`Decoder::decode`], for input that is already an immutable [`Bytes`]: the packet is
    /// split off the front of `buf`.
    #[inline]
    pub fn decode_bytes(&mut self, buf: &mut Bytes) -> Result<Option<Packet>, DecodeError> {
        let Some(h) = self.header(buf)? else {
            return Ok(None);
        };
        if buf.len() < h.packet_len() {
            return Ok(None);
        }
        let frame = buf.split_to(h.packet_len());
        Packet::decode_frame(h.first_byte, frame, h.header_len, self.protocol).map(Some)
    }

    /// Decodes the next packet from the front of `buf` without taking ownership of it.
    ///
    /// A PUBLISH comes back borrowing its topic and payload from `buf`: no allocation, no
    /// reference counting, for callers that consume messages in place. Other packets, which are
    /// rare on a hot path, are copied out and decoded as [`Decoder::decode`] does. Returns the
    /// packet and the number of bytes it took; `Ok(None)` when `buf` does not yet hold a whole
    /// packet.
    ///
    /// ```
    /// use mqtt_proto::{Decoder, PacketRef, Protocol};
    ///
    /// let wire = [0x30, 0x07, 0x00, 0x03, b'a', b'/', b'b', b'h', b'i', 0xC0, 0x00];
    /// let decoder = Decoder::new(Protocol::V3_1_1);
    /// let (packet, used) = decoder.decode_ref(&wire)?.unwrap();
    /// match packet {
    ///     PacketRef::Publish(p) => assert_eq!((p.topic(), p.payload), ("a/b", &b"hi"[..])),
    ///     PacketRef::Other(p) => panic!("unexpected {p:?}"),
    /// }
    /// assert_eq!(used, 9);
    /// # Ok::<(), mqtt_proto::DecodeError>(())
    /// ```
    #[inline]
    pub fn decode_ref<'a>(&self, buf: &'a [u8]) -> Result<Option<(PacketRef<'a>, usize)>, DecodeError> {
        let Some(h) = self.header(buf)? else {
            return Ok(None);
        };
        let len = h.packet_len();
        let Some(frame) = buf.get(..len) else {
            return Ok(None);
        };
        let packet = if h.first_byte >> 4 == PacketType::Publish as u8 {
            PacketRef::Publish(PublishRef::decode(frame, h.header_len, h.first_byte & 0x0f, self.protocol.is_v5())?)
        } else {
            let frame = Bytes::copy_from_slice(frame);
            PacketRef::Other(Box::new(Packet::decode_frame(h.first_byte, frame, h.header_len, self.protocol)?))
        };
        Ok(Some((packet, len)))
    }

    /// How many more bytes `buf` needs before [`Decoder::decode`] can return a packet: at least
    /// 1 while the fixed header is incomplete, 0 when a whole packet is there. Errors are those
    /// the header alone reveals. Drivers use it to size their reads.
    pub fn needed(&self, buf: &[u8]) -> Result<usize, DecodeError> {
        Ok(match self.header(buf)? {
            None => 1,
            Some(h) => h.packet_len().saturating_sub(buf.len()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversize_is_refused_from_the_header_alone() {
        let mut d = Decoder::new(Protocol::V5).with_max_packet_size(100);
        // A PUBLISH announcing 200 bytes; only the header has arrived.
        let mut buf = BytesMut::from(&[0x30, 0xC8, 0x01][..]);
        assert_eq!(d.decode(&mut buf), Err(DecodeError::PacketTooLarge { size: 203, max: 100 }));
        assert_eq!(d.decode(&mut buf).unwrap_err().reason_code(), crate::ReasonCode::PacketTooLarge);
    }

    #[test]
    fn need_more_consumes_nothing() {
        let mut d = Decoder::new(Protocol::V3_1_1);
        let full = [0x30, 0x05, 0x00, 0x01, b'a', b'h', b'i'];
        for cut in 0..full.len() {
            let mut buf = BytesMut::from(&full[..cut]);
            assert_eq!(d.decode(&mut buf), Ok(None), "cut at {cut}");
            assert_eq!(buf.len(), cut);
            assert!(d.needed(&buf).unwrap() > 0);
        }
        let mut buf = BytesMut::from(&full[..]);
        assert_eq!(d.needed(&buf), Ok(0));
        let p = d.decode(&mut buf).unwrap().unwrap();
        assert!(buf.is_empty());
        match p {
            Packet::Publish(p) => {
                assert_eq!(p.topic.as_str(), "a");
                assert_eq!(&p.payload[..], b"hi");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn reserved_type_zero_is_rejected_at_once() {
        let mut d = Decoder::new(Protocol::V5);
        assert_eq!(d.decode(&mut BytesMut::from(&[0x00][..])), Err(DecodeError::ReservedPacketType(0)));
    }

    #[test]
    fn decode_bytes_advances() {
        let mut d = Decoder::new(Protocol::V5);
        let mut buf = Bytes::from_static(&[0xC0, 0x00, 0xD0, 0x00, 0xE0]);
        assert_eq!(d.decode_bytes(&mut buf), Ok(Some(Packet::PingReq)));
        assert_eq!(d.decode_bytes(&mut buf), Ok(Some(Packet::PingResp)));
        assert_eq!(d.decode_bytes(&mut buf), Ok(None));
        assert_eq!(buf.len(), 1);
    }
}
