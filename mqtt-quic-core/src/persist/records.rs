//! The record format: how each table's keys and values are laid out in bytes (format
//! [`FORMAT_VERSION`](super::FORMAT_VERSION)).
//!
//! Messages are kept as MQTT 5 PUBLISH packets, so the encoding of a message is the one the
//! codec already defines, tests and fuzzes; the rest is a few fixed-width little-endian fields
//! and length-prefixed strings. Times are durations relative to the moment the batch was made
//! (the store adds the wall-clock stamp), so nothing here depends on a clock.
//!
//! Keys:
//! - sessions and wills: the client id's bytes;
//! - messages: the client id, a zero byte (MQTT strings never hold U+0000), the message's id
//!   big-endian (so a session's messages sort in queue order and share a prefix);
//! - retained: the topic's bytes.
//!
//! Decoding trusts nothing: a damaged record is an error naming what is wrong, never a panic.

use super::Table;
use crate::broker::router::Entry;
use bytes::{Bytes, BytesMut};
use mqtt_proto::{
    Decoder, Packet, PacketId, Protocol, Publish, QosPid, SubscriptionId, SubscriptionOptions, TopicFilter,
};
use std::fmt;
use std::time::Duration;

/// A record that cannot be read: the store is damaged or was written by something else.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{table} record {key}: {detail}")]
pub struct RecordError {
    /// The table's name.
    pub table: &'static str,
    /// The key, printable.
    pub key: String,
    /// What is wrong with it.
    pub detail: String,
}

impl RecordError {
    pub(crate) fn new(table: Table, key: &[u8], detail: impl fmt::Display) -> RecordError {
        RecordError { table: table.name(), key: String::from_utf8_lossy(key).into_owned(), detail: detail.to_string() }
    }
}

/// A kept session as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SessionRecord {
    /// The user that created it.
    pub(crate) owner: Option<String>,
    /// Its expiry interval in seconds (`u32::MAX`: never).
    pub(crate) expiry: u32,
    /// Offline at the time of the write: how long it had left before expiring (`None`: connected,
    /// or never expires).
    pub(crate) expires_in: Option<Duration>,
    /// Its subscriptions.
    pub(crate) subscriptions: Vec<(TopicFilter, Entry)>,
    /// The client's QoS 2 messages received and not yet released.
    pub(crate) qos2: Vec<u16>,
}

/// One message for a session as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MessageRecord {
    /// In flight under this identifier, or queued.
    pub(crate) packet_id: Option<PacketId>,
    /// QoS 2, PUBREC received.
    pub(crate) released: bool,
    /// How long it had been queued at the time of the write (zero once in flight).
    pub(crate) waited: Duration,
    /// The message.
    pub(crate) publish: Publish,
}

/// A message with a time: a retained message (how old it was at the write) or a will (how long
/// its delay still had to run).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TimedMessage {
    /// The duration.
    pub(crate) time: Duration,
    /// The message.
    pub(crate) publish: Publish,
}

/// The key of a session or will.
pub(crate) fn client_key(client_id: &str) -> Vec<u8> {
    client_id.as_bytes().to_vec()
}

/// The prefix shared by every message of a session.
pub(crate) fn messages_prefix(client_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(client_id.len() + 9);
    key.extend_from_slice(client_id.as_bytes());
    key.push(0);
    key
}

/// The key of one message of a session.
pub(crate) fn message_key(client_id: &str, id: u64) -> Vec<u8> {
    let mut key = messages_prefix(client_id);
    key.extend_from_slice(&id.to_be_bytes());
    key
}

/// Splits a message key into the client id and the message id.
pub(crate) fn split_message_key(key: &[u8]) -> Result<(String, u64), RecordError> {
    let err = |d: &str| RecordError::new(Table::Messages, key, d);
    let at = key.len().checked_sub(9).ok_or_else(|| err("key too short"))?;
    if key[at] != 0 {
        return Err(err("no separator in key"));
    }
    let client = std::str::from_utf8(&key[..at]).map_err(|_| err("client id is not UTF-8"))?;
    let id = u64::from_be_bytes(key[at + 1..].try_into().map_err(|_| err("bad message id"))?);
    Ok((client.to_string(), id))
}

/// A key that must be a client id or topic: UTF-8.
pub(crate) fn text_key(table: Table, key: &[u8]) -> Result<String, RecordError> {
    String::from_utf8(key.to_vec()).map_err(|_| RecordError::new(table, key, "key is not UTF-8"))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Appends little-endian fields and length-prefixed strings.
struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn str(&mut self, s: &str) {
        // MQTT strings are at most 65,535 bytes, so the prefix always fits.
        self.u16(u16::try_from(s.len()).unwrap_or(u16::MAX));
        self.0.extend_from_slice(&s.as_bytes()[..s.len().min(usize::from(u16::MAX))]);
    }
    fn publish(&mut self, publish: &Publish) {
        let mut buf = BytesMut::new();
        // A message the broker took or made always encodes; should one not, the record holds
        // an empty packet and reading it back reports the record damaged rather than guessing.
        if Packet::Publish(publish.clone()).encode(Protocol::V5, &mut buf).is_ok() {
            self.0.extend_from_slice(&buf);
        }
    }
}

/// Reads what [`Writer`] wrote, failing on anything short or malformed.
struct Reader<'a> {
    buf: &'a [u8],
    table: Table,
    key: &'a [u8],
}

impl<'a> Reader<'a> {
    fn err(&self, detail: impl fmt::Display) -> RecordError {
        RecordError::new(self.table, self.key, detail)
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        if self.buf.len() < n {
            return Err(self.err("value ends early"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, RecordError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().map_err(|_| self.err("short field"))?))
    }
    fn u32(&mut self) -> Result<u32, RecordError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().map_err(|_| self.err("short field"))?))
    }
    fn u64(&mut self) -> Result<u64, RecordError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().map_err(|_| self.err("short field"))?))
    }
    fn str(&mut self) -> Result<String, RecordError> {
        let n = usize::from(self.u16()?);
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.err("string is not UTF-8"))
    }
    fn publish(&mut self) -> Result<Publish, RecordError> {
        let mut bytes = Bytes::copy_from_slice(std::mem::take(&mut self.buf));
        let mut decoder = Decoder::new(Protocol::V5).with_max_packet_size(u32::MAX);
        match decoder.decode_bytes(&mut bytes) {
            Ok(Some(Packet::Publish(p))) if bytes.is_empty() => Ok(p),
            Ok(Some(_)) => Err(self.err("not a single PUBLISH")),
            Ok(None) => Err(self.err("PUBLISH ends early")),
            Err(e) => Err(self.err(format!("PUBLISH: {e}"))),
        }
    }
    fn end(&self) -> Result<(), RecordError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.err("trailing bytes"))
        }
    }
}

impl SessionRecord {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(64));
        let flags = u8::from(self.owner.is_some()) | (u8::from(self.expires_in.is_some()) << 1);
        w.u8(flags);
        if let Some(owner) = &self.owner {
            w.str(owner);
        }
        w.u32(self.expiry);
        if let Some(left) = self.expires_in {
            w.u64(millis(left));
        }
        w.u32(u32::try_from(self.subscriptions.len()).unwrap_or(u32::MAX));
        for (filter, entry) in &self.subscriptions {
            w.str(filter.as_str());
            w.u8(entry.options.encode(true));
            w.u32(entry.subscription_id.map_or(0, |id| id.get()));
        }
        w.u16(u16::try_from(self.qos2.len()).unwrap_or(u16::MAX));
        for id in &self.qos2 {
            w.u16(*id);
        }
        w.0
    }

    pub(crate) fn decode(key: &[u8], value: &[u8]) -> Result<SessionRecord, RecordError> {
        let mut r = Reader { buf: value, table: Table::Sessions, key };
        let flags = r.u8()?;
        let owner = if flags & 1 != 0 { Some(r.str()?) } else { None };
        let expiry = r.u32()?;
        let expires_in = if flags & 2 != 0 { Some(Duration::from_millis(r.u64()?)) } else { None };
        let count = r.u32()?;
        let mut subscriptions = Vec::new();
        for _ in 0..count {
            let filter = TopicFilter::new(r.str()?).map_err(|e| r.err(format!("filter: {e}")))?;
            let options = SubscriptionOptions::decode(r.u8()?, true).map_err(|e| r.err(format!("options: {e}")))?;
            let subscription_id = SubscriptionId::new(r.u32()?);
            subscriptions.push((filter, Entry { options, subscription_id }));
        }
        let count = r.u16()?;
        let qos2 = (0..count).map(|_| r.u16()).collect::<Result<Vec<u16>, _>>()?;
        r.end()?;
        Ok(SessionRecord { owner, expiry, expires_in, subscriptions, qos2 })
    }
}

impl MessageRecord {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(32 + self.publish.payload.len()));
        w.u8(u8::from(self.packet_id.is_some()) | (u8::from(self.released) << 1));
        w.u16(self.packet_id.map_or(0, |p| p.get()));
        w.u64(millis(self.waited));
        let mut publish = self.publish.clone();
        // The stored packet always carries an identifier (any will do for a queued one), so
        // QoS 1 and 2 messages encode.
        publish.qos_pid = QosPid::from_parts(publish.qos(), self.packet_id.unwrap_or(PacketId::MIN));
        w.publish(&publish);
        w.0
    }

    pub(crate) fn decode(key: &[u8], value: &[u8]) -> Result<MessageRecord, RecordError> {
        let mut r = Reader { buf: value, table: Table::Messages, key };
        let flags = r.u8()?;
        let raw = r.u16()?;
        let waited = Duration::from_millis(r.u64()?);
        let packet_id = match flags & 1 {
            0 => None,
            _ => Some(PacketId::new(raw).ok_or_else(|| r.err("packet identifier 0"))?),
        };
        let publish = r.publish()?;
        let released = flags & 2 != 0;
        if publish.qos() == mqtt_proto::QoS::AtMostOnce {
            return Err(r.err("a kept message has QoS 0"));
        }
        if released && (packet_id.is_none() || publish.qos() != mqtt_proto::QoS::ExactlyOnce) {
            return Err(r.err("released but not a QoS 2 message in flight"));
        }
        if packet_id.is_some() && publish.packet_id() != packet_id {
            return Err(r.err("its packet identifier differs from its PUBLISH's"));
        }
        Ok(MessageRecord { packet_id, released, waited, publish })
    }
}

impl TimedMessage {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(32 + self.publish.payload.len()));
        w.u64(millis(self.time));
        let mut publish = self.publish.clone();
        if publish.qos() != mqtt_proto::QoS::AtMostOnce {
            publish.qos_pid = QosPid::from_parts(publish.qos(), PacketId::MIN);
        }
        w.publish(&publish);
        w.0
    }

    pub(crate) fn decode(table: Table, key: &[u8], value: &[u8]) -> Result<TimedMessage, RecordError> {
        let mut r = Reader { buf: value, table, key };
        let time = Duration::from_millis(r.u64()?);
        let publish = r.publish()?;
        Ok(TimedMessage { time, publish })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqtt_proto::{QoS, RetainHandling, TopicName};

    fn message(qos: QoS) -> Publish {
        let mut p = Publish::new(TopicName::new("a/b").unwrap(), &b"hello"[..]);
        p.qos_pid = QosPid::from_parts(qos, PacketId::new(7).unwrap());
        p.properties.message_expiry_interval = Some(60);
        p.properties.subscription_identifiers = vec![SubscriptionId::new(3).unwrap()].into();
        p
    }

    #[test]
    fn sessions_round_trip() {
        let options = SubscriptionOptions {
            qos: QoS::ExactlyOnce,
            no_local: true,
            retain_as_published: true,
            retain_handling: RetainHandling::SendIfNew,
        };
        let record = SessionRecord {
            owner: Some("alice".into()),
            expiry: 3600,
            expires_in: Some(Duration::from_millis(1234)),
            subscriptions: vec![
                (TopicFilter::new("a/+").unwrap(), Entry { options, subscription_id: SubscriptionId::new(9) }),
                (TopicFilter::new("$share/g/#").unwrap(), Entry { options, subscription_id: None }),
            ],
            qos2: vec![1, 65535],
        };
        let bytes = record.encode();
        assert_eq!(SessionRecord::decode(b"c", &bytes).unwrap(), record);
        let bare =
            SessionRecord { owner: None, expiry: u32::MAX, expires_in: None, subscriptions: vec![], qos2: vec![] };
        assert_eq!(SessionRecord::decode(b"c", &bare.encode()).unwrap(), bare);
        // Every truncation is an error, never a panic.
        for n in 0..bytes.len() {
            assert!(SessionRecord::decode(b"c", &bytes[..n]).is_err(), "{n}");
        }
    }

    #[test]
    fn messages_round_trip() {
        for (packet_id, released, qos) in [
            (None, false, QoS::AtLeastOnce),
            (PacketId::new(5), false, QoS::ExactlyOnce),
            (PacketId::new(6), true, QoS::ExactlyOnce),
        ] {
            let mut publish = message(qos);
            publish.qos_pid = QosPid::from_parts(qos, packet_id.unwrap_or(PacketId::MIN));
            let record = MessageRecord { packet_id, released, waited: Duration::from_millis(42), publish };
            let bytes = record.encode();
            assert_eq!(MessageRecord::decode(b"k", &bytes).unwrap(), record);
            for n in 0..bytes.len() {
                assert!(MessageRecord::decode(b"k", &bytes[..n]).is_err(), "{n}");
            }
        }
        let timed = TimedMessage { time: Duration::from_secs(9), publish: message(QoS::AtMostOnce) };
        let mut expect = timed.clone();
        expect.publish.qos_pid = QosPid::AtMostOnce;
        assert_eq!(TimedMessage::decode(Table::Retained, b"a/b", &timed.encode()).unwrap(), expect);
    }

    #[test]
    fn message_keys_split_back_and_share_the_session_prefix() {
        let key = message_key("dev-1", 258);
        assert!(key.starts_with(&messages_prefix("dev-1")));
        assert!(!key.starts_with(&messages_prefix("dev-")));
        assert_eq!(split_message_key(&key).unwrap(), ("dev-1".to_string(), 258));
        assert!(message_key("c", 1) < message_key("c", 256), "ids sort in queue order");
        assert!(split_message_key(b"short").is_err());
    }
}
