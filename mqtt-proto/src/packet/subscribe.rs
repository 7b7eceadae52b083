//! SUBSCRIBE, SUBACK, UNSUBSCRIBE and UNSUBACK (spec 3.8 to 3.11).

use super::Sizes;
use crate::error::{DecodeError, EncodeError};
use crate::list::{Subscriptions, TopicFilters};
use crate::properties::{PropBox, SubAckProperties, SubscribeProperties, UnsubscribeProperties};
use crate::reason::{ReasonCode, ReasonPacket};
use crate::topic::{validate_filter, TopicFilter, SHARE_PREFIX};
use crate::types::{PacketId, Protocol, QoS, RetainHandling};
use crate::varint;
use crate::wire::Reader;
use bytes::{BufMut, BytesMut};
use smallvec::SmallVec;

/// The options byte of one subscription (spec 3.8.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct SubscriptionOptions {
    /// Maximum QoS the subscriber accepts.
    pub qos: QoS,
    /// MQTT 5: do not deliver the client's own publishes back to it.
    pub no_local: bool,
    /// MQTT 5: keep the RETAIN flag as published instead of clearing it.
    pub retain_as_published: bool,
    /// MQTT 5: when to send retained messages.
    pub retain_handling: RetainHandling,
}

impl SubscriptionOptions {
    /// Reads the options byte of a SUBSCRIBE (MQTT 5 layout with `v5`, else QoS only); the
    /// same byte [`SubscriptionOptions::encode`] writes, so it also serves stores.
    pub fn decode(byte: u8, v5: bool) -> Result<SubscriptionOptions, DecodeError> {
        let reserved = if v5 { 0b1100_0000 } else { 0b1111_1100 };
        if byte & reserved != 0 {
            return Err(DecodeError::InvalidSubscriptionOptions(byte));
        }
        // MQTT 5 makes Maximum QoS 3 and Retain Handling 3 Protocol Errors (3.8.3.1), not
        // malformed packets; MQTT 3.1.1 calls QoS 3 malformed [MQTT-3.8.3-4].
        if v5 && (byte & 0b11 == 3 || (byte >> 4) & 0b11 == 3) {
            return Err(DecodeError::SubscriptionOptionOutOfRange(byte));
        }
        let retain_handling = match (byte >> 4) & 0b11 {
            0 => RetainHandling::SendAtSubscribe,
            1 => RetainHandling::SendIfNew,
            _ => RetainHandling::DoNotSend,
        };
        Ok(SubscriptionOptions {
            qos: QoS::from_u8(byte & 0b11)?,
            no_local: byte & 0b0100 != 0,
            retain_as_published: byte & 0b1000 != 0,
            retain_handling,
        })
    }

    /// The options byte of a SUBSCRIBE (MQTT 5 layout with `v5`, else QoS only).
    pub fn encode(self, v5: bool) -> u8 {
        let mut byte = self.qos as u8;
        if v5 {
            byte |= (u8::from(self.no_local) << 2)
                | (u8::from(self.retain_as_published) << 3)
                | ((self.retain_handling as u8) << 4);
        }
        byte
    }
}

/// One topic filter of a SUBSCRIBE with its options.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Subscription {
    /// What to subscribe to.
    pub filter: TopicFilter,
    /// How.
    pub options: SubscriptionOptions,
}

impl Subscription {
    /// A subscription to `filter` at maximum QoS `qos`, other options at their defaults.
    pub fn new(filter: TopicFilter, qos: QoS) -> Subscription {
        Subscription { filter, options: SubscriptionOptions { qos, ..SubscriptionOptions::default() } }
    }
}

/// SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Subscribe {
    /// Identifier echoed by the SUBACK.
    pub packet_id: PacketId,
    /// MQTT 5 properties.
    pub properties: PropBox<SubscribeProperties>,
    /// The subscriptions (at least one).
    pub subscriptions: Subscriptions,
}

fn check_not_empty(len: usize) -> Result<(), EncodeError> {
    if len == 0 {
        return Err(EncodeError::EmptyPayload);
    }
    Ok(())
}

fn props_size(v5: bool, props: Result<usize, EncodeError>) -> Result<(usize, usize), EncodeError> {
    if !v5 {
        return Ok((0, 0));
    }
    let props = props?;
    Ok((varint::len(props as u32) + props, props))
}

fn check_codes(codes: &[ReasonCode], packet: ReasonPacket) -> Result<(), EncodeError> {
    check_not_empty(codes.len())?;
    match codes.iter().find(|c| !c.allowed_in(packet)) {
        Some(&code) => Err(EncodeError::ReasonCodeNotAllowed { code, packet }),
        None => Ok(()),
    }
}

/// Reads the rest of the packet as a non-empty list of one-byte reason codes (SUBACK, UNSUBACK).
fn read_codes(
    r: &mut Reader<'_>,
    decode: impl Fn(u8) -> Result<ReasonCode, DecodeError>,
) -> Result<SmallVec<[ReasonCode; 4]>, DecodeError> {
    // One code per byte: sizing from the bytes present allocates no more than the packet.
    let mut codes = SmallVec::with_capacity(r.remaining());
    while !r.is_empty() {
        codes.push(decode(r.u8()?)?);
    }
    if codes.is_empty() {
        return Err(DecodeError::EmptyPayload);
    }
    Ok(codes)
}

impl Subscribe {
    pub(super) fn read(r: &mut Reader<'_>, v5: bool) -> Result<Subscribe, DecodeError> {
        let packet_id = r.packet_id()?;
        let properties = if v5 { SubscribeProperties::decode_boxed(r)? } else { PropBox::default() };
        // Validate every entry, then keep the payload as it is (see `list`).
        let start = r.pos();
        let mut count = 0;
        while !r.is_empty() {
            let filter = r.binary_slice()?;
            validate_filter(filter)?;
            let options = SubscriptionOptions::decode(r.u8()?, v5)?;
            if options.no_local && filter.starts_with(SHARE_PREFIX.as_bytes()) {
                return Err(DecodeError::NoLocalOnSharedSubscription);
            }
            count += 1;
        }
        if count == 0 {
            return Err(DecodeError::EmptyPayload);
        }
        let subscriptions = Subscriptions::from_validated(r.absolute_bytes(start, r.pos()), count);
        Ok(Subscribe { packet_id, properties, subscriptions })
    }

    pub(super) fn sizes(&self, protocol: Protocol) -> Result<Sizes, EncodeError> {
        let v5 = protocol.is_v5();
        check_not_empty(self.subscriptions.len())?;
        let (plen, props) = props_size(v5, self.properties.len())?;
        if v5
            && self
                .subscriptions
                .raw_entries()
                .any(|(filter, options)| options & 0b100 != 0 && filter.starts_with(SHARE_PREFIX.as_bytes()))
        {
            return Err(EncodeError::Invalid("no local on a shared subscription"));
        }
        Ok(Sizes { body: 2 + plen + self.subscriptions.encoded_len(), props })
    }

    pub(super) fn write(&self, protocol: Protocol, sizes: Sizes, out: &mut BytesMut) {
        let v5 = protocol.is_v5();
        out.put_u16(self.packet_id.get());
        if v5 {
            self.properties.encode(sizes.props, out);
        }
        if v5 {
            self.subscriptions.write(out);
        } else {
            // MQTT 3.1.1 has only the QoS bits; the others are reserved there. Copy the list,
            // then clear them in the copy.
            let start = out.len();
            self.subscriptions.write(out);
            let mut at = start;
            while at + 2 <= out.len() {
                at += 2 + usize::from(u16::from_be_bytes([out[at], out[at + 1]]));
                if let Some(options) = out.get_mut(at) {
                    *options &= 0b11;
                }
                at += 1;
            }
        }
    }
}

/// SUBACK: one reason code per subscription, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct SubAck {
    /// The SUBSCRIBE's identifier.
    pub packet_id: PacketId,
    /// MQTT 5 properties.
    pub properties: PropBox<SubAckProperties>,
    /// Granted QoS or failure, per subscription. MQTT 3.1.1's 0x80 decodes as
    /// [`ReasonCode::UnspecifiedError`]; every failure encodes as 0x80 there.
    pub reason_codes: SmallVec<[ReasonCode; 4]>,
}

impl SubAck {
    pub(super) fn read(r: &mut Reader<'_>, v5: bool) -> Result<SubAck, DecodeError> {
        let packet_id = r.packet_id()?;
        let properties = if v5 { SubAckProperties::decode_boxed(r)? } else { PropBox::default() };
        let reason_codes = read_codes(r, |byte| {
            if v5 {
                return ReasonCode::decode_for(byte, ReasonPacket::SubAck);
            }
            match byte {
                0 => Ok(ReasonCode::Success),
                1 => Ok(ReasonCode::GrantedQos1),
                2 => Ok(ReasonCode::GrantedQos2),
                0x80 => Ok(ReasonCode::UnspecifiedError),
                other => Err(DecodeError::InvalidSubAckCode(other)),
            }
        })?;
        Ok(SubAck { packet_id, properties, reason_codes })
    }

    pub(super) fn sizes(&self, protocol: Protocol) -> Result<Sizes, EncodeError> {
        check_codes(&self.reason_codes, ReasonPacket::SubAck)?;
        let (plen, props) = props_size(protocol.is_v5(), self.properties.len())?;
        Ok(Sizes { body: 2 + plen + self.reason_codes.len(), props })
    }

    pub(super) fn write(&self, protocol: Protocol, sizes: Sizes, out: &mut BytesMut) {
        out.put_u16(self.packet_id.get());
        if protocol.is_v5() {
            self.properties.encode(sizes.props, out);
            out.extend(self.reason_codes.iter().map(|c| c.as_u8()));
        } else {
            out.extend(self.reason_codes.iter().map(|c| c.to_v3_suback()));
        }
    }
}

/// UNSUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Unsubscribe {
    /// Identifier echoed by the UNSUBACK.
    pub packet_id: PacketId,
    /// MQTT 5 properties.
    pub properties: PropBox<UnsubscribeProperties>,
    /// The filters to remove (at least one).
    pub filters: TopicFilters,
}

impl Unsubscribe {
    pub(super) fn read(r: &mut Reader<'_>, v5: bool) -> Result<Unsubscribe, DecodeError> {
        let packet_id = r.packet_id()?;
        let properties = if v5 { UnsubscribeProperties::decode_boxed(r)? } else { PropBox::default() };
        let start = r.pos();
        let mut count = 0;
        while !r.is_empty() {
            validate_filter(r.binary_slice()?)?;
            count += 1;
        }
        if count == 0 {
            return Err(DecodeError::EmptyPayload);
        }
        let filters = TopicFilters::from_validated(r.absolute_bytes(start, r.pos()), count);
        Ok(Unsubscribe { packet_id, properties, filters })
    }

    pub(super) fn sizes(&self, protocol: Protocol) -> Result<Sizes, EncodeError> {
        check_not_empty(self.filters.len())?;
        let (plen, props) = props_size(protocol.is_v5(), self.properties.len())?;
        Ok(Sizes { body: 2 + plen + self.filters.encoded_len(), props })
    }

    pub(super) fn write(&self, protocol: Protocol, sizes: Sizes, out: &mut BytesMut) {
        out.put_u16(self.packet_id.get());
        if protocol.is_v5() {
            self.properties.encode(sizes.props, out);
        }
        self.filters.write(out);
    }
}

/// UNSUBACK. MQTT 3.1.1 carries only the packet identifier; `reason_codes` is then empty and
/// ignored when encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct UnsubAck {
    /// The UNSUBSCRIBE's identifier.
    pub packet_id: PacketId,
    /// MQTT 5 properties.
    pub properties: PropBox<SubAckProperties>,
    /// MQTT 5: one reason code per filter, in order.
    pub reason_codes: SmallVec<[ReasonCode; 4]>,
}

impl UnsubAck {
    pub(super) fn read(r: &mut Reader<'_>, v5: bool) -> Result<UnsubAck, DecodeError> {
        let packet_id = r.packet_id()?;
        let mut ack = UnsubAck { packet_id, properties: PropBox::default(), reason_codes: SmallVec::new() };
        if !v5 {
            return Ok(ack);
        }
        ack.properties = SubAckProperties::decode_boxed(r)?;
        ack.reason_codes = read_codes(r, |byte| ReasonCode::decode_for(byte, ReasonPacket::UnsubAck))?;
        Ok(ack)
    }

    pub(super) fn sizes(&self, protocol: Protocol) -> Result<Sizes, EncodeError> {
        if !protocol.is_v5() {
            return Ok(Sizes { body: 2, props: 0 });
        }
        check_codes(&self.reason_codes, ReasonPacket::UnsubAck)?;
        let (plen, props) = props_size(true, self.properties.len())?;
        Ok(Sizes { body: 2 + plen + self.reason_codes.len(), props })
    }

    pub(super) fn write(&self, protocol: Protocol, sizes: Sizes, out: &mut BytesMut) {
        out.put_u16(self.packet_id.get());
        if protocol.is_v5() {
            self.properties.encode(sizes.props, out);
            out.extend(self.reason_codes.iter().map(|c| c.as_u8()));
        }
    }
}
