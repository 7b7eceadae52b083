//! DISCONNECT (spec 3.14) and AUTH (spec 3.15).

use super::Sizes;
use crate::error::{DecodeError, EncodeError};
use crate::properties::{AuthProperties, DisconnectProperties, PropBox};
use crate::reason::{ReasonCode, ReasonPacket};
use crate::types::Protocol;
use crate::varint;
use crate::wire::Reader;
use bytes::{BufMut, BytesMut};

/// Checks that `code` may be sent in `packet`.
pub(super) fn check_code(code: ReasonCode, packet: ReasonPacket) -> Result<(), EncodeError> {
    if code.allowed_in(packet) {
        Ok(())
    } else {
        Err(EncodeError::ReasonCodeNotAllowed { code, packet })
    }
}

/// DISCONNECT: the last packet of a connection, sent by the client or (MQTT 5) the server.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Disconnect {
    /// Why; MQTT 3.1.1 always decodes as Normal disconnection.
    pub reason_code: ReasonCode,
    /// MQTT 5 properties.
    pub properties: PropBox<DisconnectProperties>,
}

impl Disconnect {
    /// A DISCONNECT with `reason_code` and no properties.
    pub fn new(reason_code: ReasonCode) -> Disconnect {
        Disconnect { reason_code, properties: PropBox::default() }
    }

    pub(super) fn read(r: &mut Reader<'_>, v5: bool) -> Result<Disconnect, DecodeError> {
        let mut d = Disconnect::default();
        // MQTT 5: both fields may be left out (spec 3.14.2.1, 3.14.2.2.1).
        if v5 && !r.is_empty() {
            d.reason_code = ReasonCode::decode_for(r.u8()?, ReasonPacket::Disconnect)?;
            if !r.is_empty() {
                d.properties = DisconnectProperties::decode_boxed(r)?;
            }
        }
        Ok(d)
    }

    pub(super) fn sizes(&self, protocol: Protocol) -> Result<Sizes, EncodeError> {
        if !protocol.is_v5() {
            return Ok(Sizes { body: 0, props: 0 });
        }
        check_code(self.reason_code, ReasonPacket::Disconnect)?;
        let props = self.properties.len()?;
        let body = match (self.reason_code, props) {
            (ReasonCode::Success, 0) => 0,
            (_, 0) => 1,
            _ => 1 + varint::len(props as u32) + props,
        };
        Ok(Sizes { body, props })
    }

    pub(super) fn write(&self, protocol: Protocol, sizes: Sizes, out: &mut BytesMut) {
        if protocol.is_v5() && sizes.body > 0 {
            out.put_u8(self.reason_code.as_u8());
            if sizes.body > 1 {
                self.properties.encode(sizes.props, out);
            }
        }
    }
}

/// AUTH: a step of MQTT 5 enhanced authentication.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Auth {
    /// Success, Continue authentication or Re-authenticate.
    pub reason_code: ReasonCode,
    /// Method, data and diagnostics.
    pub properties: PropBox<AuthProperties>,
}

impl Auth {
    pub(super) fn read(r: &mut Reader<'_>) -> Result<Auth, DecodeError> {
        let mut a = Auth::default();
        if !r.is_empty() {
            a.reason_code = ReasonCode::decode_for(r.u8()?, ReasonPacket::Auth)?;
            if !r.is_empty() {
                a.properties = AuthProperties::decode_boxed(r)?;
            }
        }
        Ok(a)
    }

    pub(super) fn sizes(&self, protocol: Protocol) -> Result<Sizes, EncodeError> {
        if !protocol.is_v5() {
            return Err(EncodeError::NotInProtocol("AUTH"));
        }
        check_code(self.reason_code, ReasonPacket::Auth)?;
        let props = self.properties.len()?;
        let body = match (self.reason_code, props) {
            (ReasonCode::Success, 0) => 0,
            _ => 1 + varint::len(props as u32) + props,
        };
        Ok(Sizes { body, props })
    }

    pub(super) fn write(&self, sizes: Sizes, out: &mut BytesMut) {
        if sizes.body > 0 {
            out.put_u8(self.reason_code.as_u8());
            self.properties.encode(sizes.props, out);
        }
    }
}
