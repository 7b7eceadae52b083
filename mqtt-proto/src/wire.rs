//! Primitive field readers and writers shared by every packet (spec 1.5): two- and four-byte
//! integers, variable byte integers, length-prefixed strings and binary data.

use crate::error::{DecodeError, EncodeError};
use crate::string::MqttString;
use crate::types::PacketId;
use crate::varint;
use bytes::{BufMut, Bytes, BytesMut};

/// A cursor over one packet's body. Slices it returns share the packet's buffer.
#[derive(Clone)]
pub(crate) struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
    end: usize,
}

impl<'a> Reader<'a> {
    /// A reader over all of `buf`.
    #[cfg(test)]
    pub(crate) fn new(buf: &'a Bytes) -> Reader<'a> {
        Reader { buf, pos: 0, end: buf.len() }
    }

    /// A reader over `buf[start..end]`; callers guarantee the range is in bounds.
    #[inline]
    pub(crate) fn span(buf: &'a Bytes, start: usize, end: usize) -> Reader<'a> {
        debug_assert!(start <= end && end <= buf.len());
        Reader { buf, pos: start, end }
    }

    /// The position in the underlying buffer.
    #[inline]
    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    /// `buf[start..end]` of the underlying buffer (positions from [`Reader::pos`]).
    pub(crate) fn absolute(&self, start: usize, end: usize) -> &'a [u8] {
        &self.buf[start..end]
    }

    /// Like [`Reader::absolute`], as a shared slice.
    pub(crate) fn absolute_bytes(&self, start: usize, end: usize) -> Bytes {
        self.buf.slice(start..end)
    }

    #[inline]
    pub(crate) fn remaining(&self) -> usize {
        self.end - self.pos
    }

    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.pos == self.end
    }

    /// Fails unless every byte was consumed.
    #[inline]
    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(DecodeError::TrailingBytes(n)),
        }
    }

    #[inline]
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::UnexpectedEnd);
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    #[inline]
    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    #[inline]
    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    #[inline]
    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    #[inline]
    pub(crate) fn varint(&mut self) -> Result<u32, DecodeError> {
        match varint::decode(&self.buf[self.pos..self.end])? {
            Some((value, used)) => {
                self.pos += used;
                Ok(value)
            }
            None => Err(DecodeError::UnexpectedEnd),
        }
    }

    #[inline]
    pub(crate) fn packet_id(&mut self) -> Result<PacketId, DecodeError> {
        PacketId::new(self.u16()?).ok_or(DecodeError::ZeroPacketId)
    }

    /// `n` bytes as a shared slice.
    #[inline]
    pub(crate) fn bytes(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::UnexpectedEnd);
        }
        let b = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(b)
    }

    /// Two-byte length followed by that many bytes (binary data, spec 1.5.6).
    #[inline]
    pub(crate) fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let len = self.u16()? as usize;
        self.bytes(len)
    }

    /// Like [`Reader::binary`], borrowed: for fields that are validated but not kept.
    #[inline]
    pub(crate) fn binary_slice(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.u16()? as usize;
        self.take(len)
    }

    /// A UTF-8 string (spec 1.5.4), validated.
    #[inline]
    pub(crate) fn string(&mut self) -> Result<MqttString, DecodeError> {
        MqttString::from_bytes(self.binary()?)
    }

    /// Splits off the next `n` bytes as a sub-reader (used for the property block) and skips
    /// them here.
    #[inline]
    pub(crate) fn sub(&mut self, n: usize) -> Result<Reader<'a>, DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::UnexpectedEnd);
        }
        let r = Reader { buf: self.buf, pos: self.pos, end: self.pos + n };
        self.pos += n;
        Ok(r)
    }
}

/// Length of a length-prefixed field, checked against the 65 535-byte limit.
#[inline]
pub(crate) fn field_len(len: usize) -> Result<usize, EncodeError> {
    if len > u16::MAX as usize {
        return Err(EncodeError::FieldTooLong(len));
    }
    Ok(2 + len)
}

#[inline]
pub(crate) fn put_binary(out: &mut BytesMut, data: &[u8]) {
    // Lengths were checked by `field_len` when the packet's size was computed.
    out.put_u16(data.len() as u16);
    out.put_slice(data);
}

#[inline]
pub(crate) fn put_string(out: &mut BytesMut, s: &MqttString) {
    put_binary(out, s.as_bytes());
}
