//! Topic names and topic filters (spec 4.7), matching, and shared subscriptions (spec 4.8.2).

use crate::error::DecodeError;
use crate::string::MqttString;
use bytes::Bytes;
use std::fmt;

/// The prefix of a shared subscription filter.
pub const SHARE_PREFIX: &str = "$share/";

/// A topic name: what a PUBLISH is addressed to. It contains no wildcard characters.
///
/// It may be empty only in an MQTT 5 PUBLISH that carries a Topic Alias; [`TopicName::new`]
/// refuses the empty string, the decoder allows it where the spec does.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct TopicName(MqttString);

impl TopicName {
    /// Checks a topic name: not empty, no `+` or `#`, no U+0000.
    pub fn new(name: impl Into<String>) -> Result<TopicName, DecodeError> {
        let bytes = Bytes::from(name.into());
        if bytes.is_empty() {
            return Err(DecodeError::InvalidTopicName);
        }
        TopicName::from_bytes(bytes)
    }

    /// Validates a decoded topic name; the empty name is allowed here (MQTT 5 alias use).
    #[inline]
    pub fn from_bytes(bytes: Bytes) -> Result<TopicName, DecodeError> {
        validate_name(&bytes)?;
        Ok(TopicName(MqttString::from_validated(bytes)))
    }

    /// Wraps a name validated before (crate-internal).
    pub(crate) fn from_validated(bytes: Bytes) -> TopicName {
        debug_assert!(validate_name(&bytes).is_ok());
        TopicName(MqttString::from_validated(bytes))
    }

    /// Validates an already-valid MQTT string as a topic name.
    pub fn from_mqtt_string(s: MqttString) -> Result<TopicName, DecodeError> {
        Self::check(s.as_bytes())?;
        Ok(TopicName(s))
    }

    #[inline]
    fn check(bytes: &[u8]) -> Result<(), DecodeError> {
        if bytes.iter().any(|&b| b == b'+' || b == b'#') {
            return Err(DecodeError::InvalidTopicName);
        }
        Ok(())
    }

    /// The empty topic name used with a topic alias.
    pub fn empty() -> TopicName {
        TopicName::default()
    }

    /// Whether this is the empty name (only legal with a topic alias).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Topics starting with `$` are reserved for the server (e.g. `$SYS/`): leading wildcards
    /// do not match them [MQTT-4.7.2-1].
    #[inline]
    pub fn is_system(&self) -> bool {
        self.0.as_bytes().first() == Some(&b'$')
    }
}

/// A topic filter: what a SUBSCRIBE asks for. `+` matches one level, `#` the rest; a filter of the
/// form `$share/{group}/{filter}` is a shared subscription.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicFilter(MqttString);

impl TopicFilter {
    /// Checks a topic filter.
    pub fn new(filter: impl Into<String>) -> Result<TopicFilter, DecodeError> {
        TopicFilter::from_bytes(Bytes::from(filter.into()))
    }

    /// Validates a decoded topic filter.
    pub fn from_bytes(bytes: Bytes) -> Result<TopicFilter, DecodeError> {
        validate_filter(&bytes)?;
        Ok(TopicFilter(MqttString::from_validated(bytes)))
    }

    /// Wraps bytes validated as a filter before (crate-internal).
    pub(crate) fn from_validated(bytes: Bytes) -> TopicFilter {
        debug_assert!(check_filter(&bytes).is_ok());
        TopicFilter(MqttString::from_validated(bytes))
    }

    /// For a shared subscription `$share/{group}/{filter}`, the group and the inner filter.
    pub fn shared(&self) -> Option<(&str, &str)> {
        let rest = self.as_str().strip_prefix(SHARE_PREFIX)?;
        // Validated at construction: a non-empty group followed by '/' and a filter.
        rest.split_once('/')
    }

    /// The filter that is matched against topic names: the inner filter of a shared subscription,
    /// the whole filter otherwise.
    pub fn match_filter(&self) -> &str {
        self.shared().map_or(self.as_str(), |(_, f)| f)
    }

    /// Whether the filter has a `+` or `#`.
    pub fn has_wildcards(&self) -> bool {
        self.match_filter().bytes().any(|b| b == b'+' || b == b'#')
    }

    /// Whether a PUBLISH to `topic` matches this filter (a shared filter matches by its inner
    /// filter).
    pub fn matches(&self, topic: &TopicName) -> bool {
        matches(self.match_filter(), topic.as_str())
    }
}

/// Checks a topic name given as raw bytes (empty allowed).
#[inline]
pub(crate) fn validate_name(bytes: &[u8]) -> Result<(), DecodeError> {
    // The common case, a short ASCII name with no NUL or wildcard, is settled eight bytes at a
    // time; anything else (non-ASCII, or invalid) takes the exact checks.
    if !plain_ascii_name(bytes) || bytes.len() > crate::string::MAX_LEN {
        TopicName::check(bytes)?;
        crate::string::validate(bytes)?;
    }
    Ok(())
}

/// Whether `bytes` is all ASCII with no NUL, `+` or `#`, tested a word at a time (SWAR).
#[inline]
fn plain_ascii_name(bytes: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // High bit set in a byte of the result where that byte of `v` is zero (exact as a test for
    // "any zero byte").
    let zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    let bad = |w: u64| (w | zero(w) | zero(w ^ (ONES * u64::from(b'+'))) | zero(w ^ (ONES * u64::from(b'#')))) & HIGH;
    let mut chunks = bytes.chunks_exact(8);
    let mut acc = 0;
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        acc |= bad(u64::from_le_bytes(word));
    }
    acc == 0 && chunks.remainder().iter().all(|&b| b.is_ascii() && b != 0 && b != b'+' && b != b'#')
}

fn check_filter(bytes: &[u8]) -> Result<(), DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::InvalidTopicFilter);
    }
    let filter = match bytes.strip_prefix(SHARE_PREFIX.as_bytes()) {
        Some(rest) => {
            // $share/{ShareName}/{filter}: the share name is at least one character and has no
            // '/', '+' or '#' [MQTT-4.8.2-1, MQTT-4.8.2-2]; the filter follows the '/'.
            let slash = rest.iter().position(|&b| b == b'/').ok_or(DecodeError::InvalidTopicFilter)?;
            let (group, filter) = (&rest[..slash], &rest[slash + 1..]);
            if group.is_empty() || group.iter().any(|&b| b == b'+' || b == b'#') || filter.is_empty() {
                return Err(DecodeError::InvalidTopicFilter);
            }
            filter
        }
        None => bytes,
    };
    // Most filters have few wildcards: find them with a plain scan, then check each one's
    // neighbours. A wildcard must fill its level [MQTT-4.7.1-2, MQTT-4.7.1-3], and `#` must also
    // be the last character [MQTT-4.7.1-2].
    for (i, &b) in filter.iter().enumerate() {
        if b != b'+' && b != b'#' {
            continue;
        }
        let starts_level = i == 0 || filter[i - 1] == b'/';
        let last = i + 1 == filter.len();
        let ends_level = last || filter[i + 1] == b'/';
        if !starts_level || !ends_level || (b == b'#' && !last) {
            return Err(DecodeError::InvalidTopicFilter);
        }
    }
    Ok(())
}

/// Checks a topic filter given as raw bytes: filter rules, then MQTT string rules.
pub(crate) fn validate_filter(bytes: &[u8]) -> Result<(), DecodeError> {
    check_filter(bytes)?;
    crate::string::validate(bytes)
}

/// Topic matching on plain strings: `filter` must be a valid (non-shared) filter.
///
/// `$`-topics are not matched by a filter whose first level is a wildcard [MQTT-4.7.2-1].
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// What topic names and filters share as validated wrappers of an [`MqttString`].
macro_rules! string_wrapper {
    ($($name:ident),*) => {$(
        impl $name {
            /// The text.
            #[inline]
            pub fn as_str(&self) -> &str {
                self.0.as_str()
            }

            /// The underlying MQTT string.
            #[inline]
            pub fn as_mqtt_str(&self) -> &MqttString {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(self.as_str(), f)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl TryFrom<&str> for $name {
            type Error = DecodeError;
            fn try_from(s: &str) -> Result<Self, DecodeError> {
                $name::new(s)
            }
        }
    )*};
}

string_wrapper!(TopicName, TopicFilter);

#[cfg(feature = "arbitrary")]
impl<'a> arbitrary::Arbitrary<'a> for TopicName {
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        let levels = u.int_in_range(1..=4)?;
        let mut s = String::new();
        for i in 0..levels {
            if i > 0 {
                s.push('/');
            }
            let level: String = u.arbitrary()?;
            s.extend(level.chars().filter(|c| !matches!(c, '\0' | '+' | '#' | '/')).take(12));
        }
        if s.is_empty() {
            s.push('t');
        }
        TopicName::new(s).map_err(|_| arbitrary::Error::IncorrectFormat)
    }
}

#[cfg(feature = "arbitrary")]
impl<'a> arbitrary::Arbitrary<'a> for TopicFilter {
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        let levels = u.int_in_range(1..=4)?;
        let mut s = String::new();
        if u.ratio(1, 8)? {
            s.push_str("$share/g/");
        }
        for i in 0..levels {
            if i > 0 {
                s.push('/');
            }
            match u.int_in_range(0..=5)? {
                0 => s.push('+'),
                1 if i + 1 == levels => s.push('#'),
                _ => {
                    let level: String = u.arbitrary()?;
                    s.extend(level.chars().filter(|c| !matches!(c, '\0' | '+' | '#' | '/')).take(12));
                }
            }
        }
        TopicFilter::new(s).map_err(|_| arbitrary::Error::IncorrectFormat)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_and_invalid_filters() {
        for ok in ["#", "+", "a/+/b", "a/#", "+/+", "/", "sport/tennis/#", "$share/g/a/#", "$share/g//"] {
            assert!(TopicFilter::new(ok).is_ok(), "{ok}");
        }
        for bad in
            ["", "a#", "a/#/b", "a+", "+a/b", "sport/tennis#", "$share/g", "$share//a", "$share/g+/a", "$share/g/"]
        {
            assert_eq!(TopicFilter::new(bad), Err(DecodeError::InvalidTopicFilter), "{bad}");
        }
    }

    #[test]
    fn word_at_a_time_check_agrees_with_the_plain_one() {
        let plain = |b: &[u8]| b.iter().all(|&c| c.is_ascii() && c != 0 && c != b'+' && c != b'#');
        let mut samples: Vec<Vec<u8>> = vec![b"sensors/device-0042/temperature".to_vec(), Vec::new()];
        for bad in [0u8, b'+', b'#', 0x80, 0xFF, 0x7F, b'*', b'"', 0x2A, 0x2C, 0x22, 0x24] {
            for at in 0..17 {
                let mut v = b"abcdefghijklmnopq".to_vec();
                v[at] = bad;
                samples.push(v.clone());
                samples.push(v[..at + 1].to_vec());
            }
        }
        for s in samples {
            assert_eq!(plain_ascii_name(&s), plain(&s), "{s:?}");
        }
    }

    #[test]
    fn topic_names() {
        assert!(TopicName::new("a/b").is_ok());
        assert!(TopicName::new("/").is_ok());
        assert_eq!(TopicName::new(""), Err(DecodeError::InvalidTopicName));
        assert_eq!(TopicName::new("a/+"), Err(DecodeError::InvalidTopicName));
        assert_eq!(TopicName::new("a/#"), Err(DecodeError::InvalidTopicName));
    }

    #[test]
    fn spec_matching_examples() {
        // Spec 4.7.1.2 and 4.7.1.3.
        assert!(matches("sport/tennis/player1/#", "sport/tennis/player1"));
        assert!(matches("sport/tennis/player1/#", "sport/tennis/player1/ranking"));
        assert!(matches("sport/#", "sport"));
        assert!(matches("sport/tennis/+", "sport/tennis/player1"));
        assert!(!matches("sport/tennis/+", "sport/tennis/player1/ranking"));
        assert!(!matches("sport/+", "sport"));
        assert!(matches("sport/+", "sport/"));
        assert!(matches("+/+", "/finance"));
        assert!(matches("/+", "/finance"));
        assert!(!matches("+", "/finance"));
        assert!(matches("#", "a/b/c"));
        // Spec 4.7.2: $-topics.
        assert!(!matches("#", "$SYS/broker"));
        assert!(!matches("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(matches("$SYS/#", "$SYS/monitor/Clients"));
        assert!(matches("$SYS/monitor/+", "$SYS/monitor/Clients"));
    }

    #[test]
    fn shared_subscriptions() {
        let f = TopicFilter::new("$share/consumer1/sport/tennis/+").unwrap();
        assert_eq!(f.shared(), Some(("consumer1", "sport/tennis/+")));
        assert!(f.matches(&TopicName::new("sport/tennis/p1").unwrap()));
        assert!(f.has_wildcards());
        let plain = TopicFilter::new("$sharex/a").unwrap();
        assert_eq!(plain.shared(), None);
    }
}
