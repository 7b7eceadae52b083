//! The variable byte integer of MQTT (spec 1.5.5): 7 bits per byte, least significant group first,
//! at most four bytes, so at most 268 435 455.

use crate::error::DecodeError;
use bytes::BufMut;

/// The largest value a variable byte integer can carry (four bytes).
pub const MAX: u32 = 268_435_455;

/// Reads a variable byte integer from the start of `buf`.
///
/// Returns `Ok(None)` when `buf` ends before the integer does (more input is needed), and
/// `Ok(Some((value, bytes_used)))` otherwise. A fifth continuation byte is malformed whether or not
/// it has arrived yet, so the error is reported as early as possible.
#[inline]
pub fn decode(buf: &[u8]) -> Result<Option<(u32, usize)>, DecodeError> {
    let mut value = 0u32;
    for (i, &byte) in buf.iter().enumerate().take(4) {
        value |= u32::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            if i > 0 && byte == 0 {
                // A non-minimal encoding (e.g. 0x80 0x00) is not what the spec's algorithm writes;
                // the spec says the encoding MUST use the minimum number of bytes [MQTT-1.5.5-1].
                return Err(DecodeError::MalformedVarInt);
            }
            return Ok(Some((value, i + 1)));
        }
    }
    if buf.len() >= 4 {
        Err(DecodeError::MalformedVarInt)
    } else {
        Ok(None)
    }
}

/// The number of bytes `value` takes on the wire. Values above [`MAX`] report 5, which the
/// encoders turn into an error.
#[inline]
pub const fn len(value: u32) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        2_097_152..=MAX => 4,
        _ => 5,
    }
}

/// Writes `value` (which must not exceed [`MAX`]; callers check) into `out`.
#[inline]
pub fn encode(mut value: u32, out: &mut impl BufMut) {
    debug_assert!(value <= MAX);
    if value < 0x80 {
        // Most packets are under 128 bytes.
        out.put_u8(value as u8);
        return;
    }
    loop {
        let mut byte = (value & 0x7f) as u8;
        value >>= 7;
        if value > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if value == 0 {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_boundaries() {
        // The table in spec section 1.5.5.
        let cases: &[(u32, &[u8])] = &[
            (0, &[0x00]),
            (127, &[0x7f]),
            (128, &[0x80, 0x01]),
            (16_383, &[0xff, 0x7f]),
            (16_384, &[0x80, 0x80, 0x01]),
            (2_097_151, &[0xff, 0xff, 0x7f]),
            (2_097_152, &[0x80, 0x80, 0x80, 0x01]),
            (MAX, &[0xff, 0xff, 0xff, 0x7f]),
        ];
        for &(value, bytes) in cases {
            let mut out = Vec::new();
            encode(value, &mut out);
            assert_eq!(out, bytes, "encode {value}");
            assert_eq!(len(value), bytes.len());
            assert_eq!(decode(bytes).unwrap(), Some((value, bytes.len())));
            // Every strict prefix needs more input.
            for cut in 0..bytes.len() {
                assert_eq!(decode(&bytes[..cut]).unwrap(), None);
            }
        }
    }

    #[test]
    fn five_bytes_is_malformed_even_before_the_fifth_arrives() {
        assert_eq!(decode(&[0xff, 0xff, 0xff, 0xff]), Err(DecodeError::MalformedVarInt));
        assert_eq!(decode(&[0x80, 0x80, 0x80, 0x80, 0x01]), Err(DecodeError::MalformedVarInt));
    }

    #[test]
    fn non_minimal_encoding_is_malformed() {
        assert_eq!(decode(&[0x80, 0x00]), Err(DecodeError::MalformedVarInt));
        assert_eq!(decode(&[0xff, 0x80, 0x00]), Err(DecodeError::MalformedVarInt));
    }
}
