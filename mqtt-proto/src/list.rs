//! Lists kept in their wire encoding: user properties, subscription identifiers, the topic
//! filters of SUBSCRIBE and UNSUBSCRIBE.
//!
//! Why not a `Vec`: a list entry can be as short as two to five bytes on the wire but costs 32 to
//! 64 bytes as a Rust value, so a `Vec` would let a peer make the receiver allocate many times
//! the packet's size. A [`WireList`] is a validated slice of the packet itself (or, for
//! properties that were interleaved with others, one copy of them): decoding allocates no more
//! than the packet's size, encoding is a single copy, and iterating hands out entries as cheap
//! `Bytes` slices.

use crate::error::DecodeError;
use crate::packet::{Subscription, SubscriptionOptions};
use crate::properties::id;
use crate::string::MqttString;
use crate::topic::TopicFilter;
use crate::types::SubscriptionId;
use crate::varint;
use crate::wire::{put_string, Reader};
use bytes::{BufMut, Bytes, BytesMut};
use std::fmt;
use std::marker::PhantomData;

mod sealed {
    pub trait Sealed {}
}

/// The encoding of one kind of list entry. Implemented (only) by the marker types of this module;
/// its methods are internal, hence hidden.
#[allow(private_interfaces)]
pub trait WireEntry: sealed::Sealed {
    /// What iteration yields.
    type Item;
    /// Reads an entry that was validated when the list was built.
    #[doc(hidden)]
    fn read(r: &mut Reader<'_>) -> Result<Self::Item, DecodeError>;
    /// Appends an entry's encoding.
    #[doc(hidden)]
    fn write(item: &Self::Item, out: &mut BytesMut);
}

/// A user property entry: `0x26`, name, value.
#[derive(Debug)]
pub enum UserPropertyEntry {}
impl sealed::Sealed for UserPropertyEntry {}
#[allow(private_interfaces)]
impl WireEntry for UserPropertyEntry {
    type Item = (MqttString, MqttString);
    fn read(r: &mut Reader<'_>) -> Result<Self::Item, DecodeError> {
        r.u8()?;
        Ok((MqttString::from_validated(r.binary()?), MqttString::from_validated(r.binary()?)))
    }
    fn write((k, v): &Self::Item, out: &mut BytesMut) {
        out.put_u8(id::USER_PROPERTY);
        put_string(out, k);
        put_string(out, v);
    }
}

/// A subscription identifier entry of PUBLISH: `0x0B`, variable byte integer.
#[derive(Debug)]
pub enum SubscriptionIdEntry {}
impl sealed::Sealed for SubscriptionIdEntry {}
#[allow(private_interfaces)]
impl WireEntry for SubscriptionIdEntry {
    type Item = SubscriptionId;
    fn read(r: &mut Reader<'_>) -> Result<Self::Item, DecodeError> {
        r.u8()?;
        SubscriptionId::new(r.varint()?).ok_or(DecodeError::InvalidPropertyValue(id::SUBSCRIPTION_IDENTIFIER))
    }
    fn write(item: &Self::Item, out: &mut BytesMut) {
        out.put_u8(id::SUBSCRIPTION_IDENTIFIER);
        varint::encode(item.get(), out);
    }
}

/// A SUBSCRIBE payload entry: topic filter, options byte (MQTT 5 layout).
#[derive(Debug)]
pub enum SubscriptionEntry {}
impl sealed::Sealed for SubscriptionEntry {}
#[allow(private_interfaces)]
impl WireEntry for SubscriptionEntry {
    type Item = Subscription;
    fn read(r: &mut Reader<'_>) -> Result<Self::Item, DecodeError> {
        let filter = TopicFilter::from_validated(r.binary()?);
        let options = SubscriptionOptions::decode(r.u8()?, true)?;
        Ok(Subscription { filter, options })
    }
    fn write(item: &Self::Item, out: &mut BytesMut) {
        put_string(out, item.filter.as_mqtt_str());
        out.put_u8(item.options.encode(true));
    }
}

/// An UNSUBSCRIBE payload entry: topic filter.
#[derive(Debug)]
pub enum TopicFilterEntry {}
impl sealed::Sealed for TopicFilterEntry {}
#[allow(private_interfaces)]
impl WireEntry for TopicFilterEntry {
    type Item = TopicFilter;
    fn read(r: &mut Reader<'_>) -> Result<Self::Item, DecodeError> {
        Ok(TopicFilter::from_validated(r.binary()?))
    }
    fn write(item: &Self::Item, out: &mut BytesMut) {
        put_string(out, item.as_mqtt_str());
    }
}

/// A list stored as its validated wire encoding. See the [module docs](self) for why.
pub struct WireList<E> {
    raw: Bytes,
    len: usize,
    entry: PhantomData<fn() -> E>,
}

/// User properties, in the order they appeared.
pub type UserProperties = WireList<UserPropertyEntry>;
/// Subscription identifiers of a PUBLISH (one per matching subscription).
pub type SubscriptionIds = WireList<SubscriptionIdEntry>;
/// The subscriptions of a SUBSCRIBE.
pub type Subscriptions = WireList<SubscriptionEntry>;
/// The topic filters of an UNSUBSCRIBE.
pub type TopicFilters = WireList<TopicFilterEntry>;

impl<E: WireEntry> WireList<E> {
    /// An empty list.
    pub const fn new() -> Self {
        WireList { raw: Bytes::new(), len: 0, entry: PhantomData }
    }

    /// Wraps bytes the decoder validated as `len` entries.
    pub(crate) fn from_validated(raw: Bytes, len: usize) -> Self {
        WireList { raw, len, entry: PhantomData }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The entries, in order.
    pub fn iter(&self) -> Iter<'_, E> {
        Iter { r: Reader::span(&self.raw, 0, self.raw.len()), left: self.len, entry: PhantomData }
    }

    /// The first entry.
    pub fn first(&self) -> Option<E::Item> {
        self.iter().next()
    }

    /// Appends an entry. This copies the list (lists are rarely built one entry at a time; use
    /// `collect` to build one from many).
    pub fn push(&mut self, item: E::Item) {
        let mut out = BytesMut::with_capacity(self.raw.len() + 16);
        out.extend_from_slice(&self.raw);
        E::write(&item, &mut out);
        self.raw = out.freeze();
        self.len += 1;
    }

    /// The wire encoding of the entries.
    pub fn as_bytes(&self) -> &[u8] {
        &self.raw
    }

    pub(crate) fn encoded_len(&self) -> usize {
        self.raw.len()
    }

    pub(crate) fn write(&self, out: &mut BytesMut) {
        out.put_slice(&self.raw);
    }
}

impl WireList<SubscriptionEntry> {
    /// The entries as (filter bytes, options byte), without building values: for encoding.
    pub(crate) fn raw_entries(&self) -> impl Iterator<Item = (&[u8], u8)> {
        let mut rest: &[u8] = &self.raw;
        std::iter::from_fn(move || {
            let (len, tail) = rest.split_first_chunk::<2>()?;
            let len = usize::from(u16::from_be_bytes(*len));
            let (filter, tail) = tail.split_at_checked(len)?;
            let (&options, tail) = tail.split_first()?;
            rest = tail;
            Some((filter, options))
        })
    }
}

/// Iterator over a [`WireList`].
pub struct Iter<'a, E> {
    r: Reader<'a>,
    left: usize,
    entry: PhantomData<fn() -> E>,
}

impl<E: WireEntry> Iterator for Iter<'_, E> {
    type Item = E::Item;
    fn next(&mut self) -> Option<E::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        // Entries were validated when the list was built, so this does not fail; should it,
        // iteration ends rather than panicking.
        match E::read(&mut self.r) {
            Ok(item) => Some(item),
            Err(_) => {
                self.left = 0;
                None
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.left))
    }
}

impl<'a, E: WireEntry> IntoIterator for &'a WireList<E> {
    type Item = E::Item;
    type IntoIter = Iter<'a, E>;
    fn into_iter(self) -> Iter<'a, E> {
        self.iter()
    }
}

impl<E: WireEntry> FromIterator<E::Item> for WireList<E> {
    fn from_iter<I: IntoIterator<Item = E::Item>>(iter: I) -> Self {
        let mut out = BytesMut::new();
        let mut len = 0;
        for item in iter {
            E::write(&item, &mut out);
            len += 1;
        }
        WireList { raw: out.freeze(), len, entry: PhantomData }
    }
}

impl<E: WireEntry> From<Vec<E::Item>> for WireList<E> {
    fn from(items: Vec<E::Item>) -> Self {
        items.into_iter().collect()
    }
}

impl<E: WireEntry, const N: usize> From<[E::Item; N]> for WireList<E> {
    fn from(items: [E::Item; N]) -> Self {
        items.into_iter().collect()
    }
}

impl<E> Clone for WireList<E> {
    fn clone(&self) -> Self {
        WireList { raw: self.raw.clone(), len: self.len, entry: PhantomData }
    }
}

impl<E: WireEntry> Default for WireList<E> {
    fn default() -> Self {
        Self::new()
    }
}

/// Equal when the entries are equal in order (the encoding of a validated entry is canonical).
impl<E> PartialEq for WireList<E> {
    fn eq(&self, other: &Self) -> bool {
        self.raw == other.raw
    }
}

impl<E> Eq for WireList<E> {}

impl<E: WireEntry> fmt::Debug for WireList<E>
where
    E::Item: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[cfg(feature = "arbitrary")]
impl<'a, E: WireEntry> arbitrary::Arbitrary<'a> for WireList<E>
where
    E::Item: arbitrary::Arbitrary<'a>,
{
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        let n = u.int_in_range(0..=4)?;
        (0..n).map(|_| E::Item::arbitrary(u)).collect()
    }
}

/// Gathers the entries of one list that appear among other properties: a zero-copy slice while
/// they are contiguous (the usual case), else one exactly-sized copy made by a second pass.
pub(crate) struct Collector {
    start: usize,
    end: usize,
    bytes: usize,
    len: usize,
    contiguous: bool,
}

impl Collector {
    pub(crate) const fn new() -> Collector {
        Collector { start: 0, end: 0, bytes: 0, len: 0, contiguous: true }
    }

    /// Records the entry at buffer positions `start..end`.
    pub(crate) fn add(&mut self, start: usize, end: usize) {
        if self.len == 0 {
            (self.start, self.end) = (start, end);
        } else if self.contiguous && start == self.end {
            self.end = end;
        } else {
            self.contiguous = false;
        }
        self.bytes += end - start;
        self.len += 1;
    }

    /// Builds the list from the (already validated) property `block` the entries came from.
    pub(crate) fn finish<E: WireEntry>(self, block: &Reader<'_>, id: u8) -> Result<WireList<E>, DecodeError> {
        if self.len == 0 {
            return Ok(WireList::new());
        }
        if self.contiguous {
            return Ok(WireList::from_validated(block.absolute_bytes(self.start, self.end), self.len));
        }
        let mut out = BytesMut::with_capacity(self.bytes);
        let mut r = block.clone();
        while !r.is_empty() {
            let start = r.pos();
            let pid = r.varint()?;
            crate::properties::skip_value(pid, &mut r)?;
            if pid == u32::from(id) {
                out.extend_from_slice(r.absolute(start, r.pos()));
            }
        }
        Ok(WireList::from_validated(out.freeze(), self.len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_collect_iterate() {
        let a = (MqttString::from_static("k1"), MqttString::from_static("v1"));
        let b = (MqttString::from_static("k2"), MqttString::from_static(""));
        let mut list = UserProperties::new();
        list.push(a.clone());
        list.push(b.clone());
        assert_eq!(list.len(), 2);
        assert_eq!(list.iter().collect::<Vec<_>>(), vec![a.clone(), b.clone()]);
        assert_eq!(list, UserProperties::from([a, b]));
        assert_eq!(list.as_bytes()[0], 0x26);
    }
}
