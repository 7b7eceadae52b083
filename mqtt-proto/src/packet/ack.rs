//! PUBACK, PUBREC, PUBREL and PUBCOMP (spec 3.4 to 3.7): one shape, four packet types.

use super::Sizes;
use crate::error::{DecodeError, EncodeError};
use crate::properties::{AckProperties, PropBox};
use crate::reason::{ReasonCode, ReasonPacket};
use crate::types::{PacketId, Protocol};
use crate::varint;
use crate::wire::Reader;
use bytes::{BufMut, BytesMut};

/// The body of PUBACK, PUBREC, PUBREL and PUBCOMP; the [`Packet`](crate::Packet) variant says
/// which.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Ack {
    /// The identifier of the PUBLISH (or PUBREL) acknowledged.
    pub packet_id: PacketId,
    /// MQTT 5 reason code; always Success for 3.1.1.
    pub reason_code: ReasonCode,
    /// MQTT 5 properties.
    pub properties: PropBox<AckProperties>,
}

impl Ack {
    /// A successful acknowledgement with no properties.
    pub fn new(packet_id: PacketId) -> Ack {
        Ack { packet_id, reason_code: ReasonCode::Success, properties: PropBox::default() }
    }

    pub(super) fn read(r: &mut Reader<'_>, v5: bool, kind: ReasonPacket) -> Result<Ack, DecodeError> {
        let packet_id = r.packet_id()?;
        let mut ack = Ack::new(packet_id);
        // MQTT 5: the reason code and the property length may be left out (spec 3.4.2.1).
        if v5 && !r.is_empty() {
            ack.reason_code = ReasonCode::decode_for(r.u8()?, kind)?;
            if !r.is_empty() {
                ack.properties = AckProperties::decode_boxed(r)?;
            }
        }
        Ok(ack)
    }

    pub(super) fn sizes(&self, protocol: Protocol, kind: ReasonPacket) -> Result<Sizes, EncodeError> {
        if !protocol.is_v5() {
            return Ok(Sizes { body: 2, props: 0 });
        }
        super::disconnect::check_code(self.reason_code, kind)?;
        let props = self.properties.len()?;
        let body = match (self.reason_code, props) {
            (ReasonCode::Success, 0) => 2,
            (_, 0) => 3,
            _ => 3 + varint::len(props as u32) + props,
        };
        Ok(Sizes { body, props })
    }

    pub(super) fn write(&self, protocol: Protocol, sizes: Sizes, out: &mut BytesMut) {
        out.put_u16(self.packet_id.get());
        if protocol.is_v5() && sizes.body > 2 {
            out.put_u8(self.reason_code.as_u8());
            if sizes.body > 3 {
                self.properties.encode(sizes.props, out);
            }
        }
    }
}
