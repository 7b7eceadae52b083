//! `MqttString`: a UTF-8 string as MQTT defines it (spec 1.5.4), sharing the packet's buffer.

use crate::error::DecodeError;
use bytes::Bytes;
use std::fmt;

/// The longest string or binary field MQTT can carry (two-byte length prefix).
pub const MAX_LEN: usize = u16::MAX as usize;

/// A UTF-8 encoded string with no U+0000, at most 65 535 bytes long.
///
/// It is a slice of the buffer the packet was decoded from (cloning it is a reference count
/// increment), and it is validated once, when it is built.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MqttString(Bytes);

impl MqttString {
    /// Validates `bytes` as an MQTT string: UTF-8, no U+0000, at most 65 535 bytes.
    pub fn from_bytes(bytes: Bytes) -> Result<MqttString, DecodeError> {
        validate(&bytes)?;
        Ok(MqttString(bytes))
    }

    /// Wraps bytes the caller has already validated (crate-internal fast path).
    #[inline]
    pub(crate) fn from_validated(bytes: Bytes) -> MqttString {
        debug_assert!(validate(&bytes).is_ok());
        MqttString(bytes)
    }

    /// Builds a string from static text; panics if it contains U+0000 or is longer than 65 535
    /// bytes (a programming error, like a bad literal).
    pub fn from_static(s: &'static str) -> MqttString {
        assert!(!s.contains('\0') && s.len() <= MAX_LEN, "not a valid MQTT string: {s:?}");
        MqttString(Bytes::from_static(s.as_bytes()))
    }

    /// The text.
    #[inline]
    pub fn as_str(&self) -> &str {
        // Validated at construction, so this never fails; std checks again because this crate
        // forbids `unsafe`. The check is a fast SIMD-friendly scan.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// The encoded bytes (without the length prefix).
    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The underlying shared buffer.
    #[inline]
    pub fn as_shared(&self) -> &Bytes {
        &self.0
    }

    /// Length in bytes.
    #[inline]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the string is empty.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Checks the length, UTF-8 well-formedness and the absence of U+0000 [MQTT-1.5.4-1, MQTT-1.5.4-2].
#[inline]
pub(crate) fn validate(bytes: &[u8]) -> Result<(), DecodeError> {
    if bytes.len() > MAX_LEN {
        return Err(DecodeError::StringTooLong(bytes.len()));
    }
    // One vectorisable pass finds NUL and non-ASCII bytes; only non-ASCII text needs the full
    // UTF-8 check.
    let mut nul = false;
    let mut high = 0u8;
    for &b in bytes {
        nul |= b == 0;
        high |= b;
    }
    if high >= 0x80 {
        std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8)?;
    }
    if nul {
        return Err(DecodeError::NullCharacter);
    }
    Ok(())
}

impl TryFrom<&str> for MqttString {
    type Error = DecodeError;
    fn try_from(s: &str) -> Result<Self, DecodeError> {
        MqttString::from_bytes(Bytes::copy_from_slice(s.as_bytes()))
    }
}

impl TryFrom<String> for MqttString {
    type Error = DecodeError;
    fn try_from(s: String) -> Result<Self, DecodeError> {
        MqttString::from_bytes(Bytes::from(s))
    }
}

impl fmt::Debug for MqttString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for MqttString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for MqttString {
    fn eq(&self, other: &str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl PartialEq<&str> for MqttString {
    fn eq(&self, other: &&str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

#[cfg(feature = "arbitrary")]
impl<'a> arbitrary::Arbitrary<'a> for MqttString {
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        let s: String = u.arbitrary()?;
        let s: String = s.chars().filter(|&c| c != '\0').take(64).collect();
        Ok(MqttString(Bytes::from(s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_nul_and_bad_utf8() {
        assert_eq!(MqttString::from_bytes(Bytes::from_static(b"a\0b")), Err(DecodeError::NullCharacter));
        assert_eq!(MqttString::from_bytes(Bytes::from_static(b"\xff")), Err(DecodeError::InvalidUtf8));
        assert_eq!(MqttString::from_bytes(Bytes::from_static("é\0".as_bytes())), Err(DecodeError::NullCharacter));
        // The spec's example 1.5.4: U+FEFF is allowed and must not be stripped [MQTT-1.5.4-3].
        let s = MqttString::from_bytes(Bytes::from_static(b"A\xF0\xAA\x9B\x94")).unwrap();
        assert_eq!(s.as_str(), "A\u{2A6D4}");
        assert!(MqttString::try_from("x\0").is_err());
        assert_eq!(MqttString::try_from("x".repeat(65_536)), Err(DecodeError::StringTooLong(65_536)));
        assert!(MqttString::try_from("x".repeat(65_535)).is_ok());
    }
}
