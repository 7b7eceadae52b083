//! MQTT 5 reason codes (spec 2.4) and their MQTT 3.1.1 counterparts.
//!
//! One enum covers every code. The spec reuses a few values under different names depending on the
//! packet (0x00 is Success, Normal disconnection and Granted QoS 0); those names are associated
//! constants. Which codes a packet may carry is checked by the decoder with [`ReasonCode::allowed_in`].

use crate::error::DecodeError;
use std::fmt;

macro_rules! reason_codes {
    ($($(#[$meta:meta])* $name:ident = $value:literal, $text:literal;)*) => {
        /// An MQTT 5 reason code.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        #[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
        #[repr(u8)]
        pub enum ReasonCode {
            $($(#[$meta])* $name = $value,)*
        }

        impl ReasonCode {
            /// Parses a reason code byte; `None` for a value the spec does not define.
            pub const fn from_u8(value: u8) -> Option<ReasonCode> {
                match value {
                    $($value => Some(ReasonCode::$name),)*
                    _ => None,
                }
            }

            /// The spec's name for the code, as in its table 2-6.
            pub const fn description(self) -> &'static str {
                match self {
                    $(ReasonCode::$name => $text,)*
                }
            }
        }
    };
}

reason_codes! {
    /// 0x00: Success / Normal disconnection / Granted QoS 0.
    #[default]
    Success = 0x00, "Success";
    /// 0x01: Granted QoS 1.
    GrantedQos1 = 0x01, "Granted QoS 1";
    /// 0x02: Granted QoS 2.
    GrantedQos2 = 0x02, "Granted QoS 2";
    /// 0x04: Disconnect with Will Message.
    DisconnectWithWill = 0x04, "Disconnect with Will Message";
    /// 0x10: No matching subscribers.
    NoMatchingSubscribers = 0x10, "No matching subscribers";
    /// 0x11: No subscription existed.
    NoSubscriptionExisted = 0x11, "No subscription existed";
    /// 0x18: Continue authentication.
    ContinueAuthentication = 0x18, "Continue authentication";
    /// 0x19: Re-authenticate.
    ReAuthenticate = 0x19, "Re-authenticate";
    /// 0x80: Unspecified error.
    UnspecifiedError = 0x80, "Unspecified error";
    /// 0x81: Malformed Packet.
    MalformedPacket = 0x81, "Malformed Packet";
    /// 0x82: Protocol Error.
    ProtocolError = 0x82, "Protocol Error";
    /// 0x83: Implementation specific error.
    ImplementationSpecificError = 0x83, "Implementation specific error";
    /// 0x84: Unsupported Protocol Version.
    UnsupportedProtocolVersion = 0x84, "Unsupported Protocol Version";
    /// 0x85: Client Identifier not valid.
    ClientIdentifierNotValid = 0x85, "Client Identifier not valid";
    /// 0x86: Bad User Name or Password.
    BadUserNameOrPassword = 0x86, "Bad User Name or Password";
    /// 0x87: Not authorized.
    NotAuthorized = 0x87, "Not authorized";
    /// 0x88: Server unavailable.
    ServerUnavailable = 0x88, "Server unavailable";
    /// 0x89: Server busy.
    ServerBusy = 0x89, "Server busy";
    /// 0x8A: Banned.
    Banned = 0x8A, "Banned";
    /// 0x8B: Server shutting down.
    ServerShuttingDown = 0x8B, "Server shutting down";
    /// 0x8C: Bad authentication method.
    BadAuthenticationMethod = 0x8C, "Bad authentication method";
    /// 0x8D: Keep Alive timeout.
    KeepAliveTimeout = 0x8D, "Keep Alive timeout";
    /// 0x8E: Session taken over.
    SessionTakenOver = 0x8E, "Session taken over";
    /// 0x8F: Topic Filter invalid.
    TopicFilterInvalid = 0x8F, "Topic Filter invalid";
    /// 0x90: Topic Name invalid.
    TopicNameInvalid = 0x90, "Topic Name invalid";
    /// 0x91: Packet Identifier in use.
    PacketIdentifierInUse = 0x91, "Packet Identifier in use";
    /// 0x92: Packet Identifier not found.
    PacketIdentifierNotFound = 0x92, "Packet Identifier not found";
    /// 0x93: Receive Maximum exceeded.
    ReceiveMaximumExceeded = 0x93, "Receive Maximum exceeded";
    /// 0x94: Topic Alias invalid.
    TopicAliasInvalid = 0x94, "Topic Alias invalid";
    /// 0x95: Packet too large.
    PacketTooLarge = 0x95, "Packet too large";
    /// 0x96: Message rate too high.
    MessageRateTooHigh = 0x96, "Message rate too high";
    /// 0x97: Quota exceeded.
    QuotaExceeded = 0x97, "Quota exceeded";
    /// 0x98: Administrative action.
    AdministrativeAction = 0x98, "Administrative action";
    /// 0x99: Payload format invalid.
    PayloadFormatInvalid = 0x99, "Payload format invalid";
    /// 0x9A: Retain not supported.
    RetainNotSupported = 0x9A, "Retain not supported";
    /// 0x9B: QoS not supported.
    QosNotSupported = 0x9B, "QoS not supported";
    /// 0x9C: Use another server.
    UseAnotherServer = 0x9C, "Use another server";
    /// 0x9D: Server moved.
    ServerMoved = 0x9D, "Server moved";
    /// 0x9E: Shared Subscriptions not supported.
    SharedSubscriptionsNotSupported = 0x9E, "Shared Subscriptions not supported";
    /// 0x9F: Connection rate exceeded.
    ConnectionRateExceeded = 0x9F, "Connection rate exceeded";
    /// 0xA0: Maximum connect time.
    MaximumConnectTime = 0xA0, "Maximum connect time";
    /// 0xA1: Subscription Identifiers not supported.
    SubscriptionIdentifiersNotSupported = 0xA1, "Subscription Identifiers not supported";
    /// 0xA2: Wildcard Subscriptions not supported.
    WildcardSubscriptionsNotSupported = 0xA2, "Wildcard Subscriptions not supported";
}

/// The packets that carry reason codes; used to check that a code is legal where it appears.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasonPacket {
    /// CONNACK.
    ConnAck,
    /// PUBACK and PUBREC.
    PubAckRec,
    /// PUBREL and PUBCOMP.
    PubRelComp,
    /// SUBACK.
    SubAck,
    /// UNSUBACK.
    UnsubAck,
    /// DISCONNECT.
    Disconnect,
    /// AUTH.
    Auth,
}

impl ReasonCode {
    /// Normal disconnection (DISCONNECT), the same byte as [`ReasonCode::Success`].
    pub const NORMAL_DISCONNECTION: ReasonCode = ReasonCode::Success;
    /// Granted QoS 0 (SUBACK), the same byte as [`ReasonCode::Success`].
    pub const GRANTED_QOS_0: ReasonCode = ReasonCode::Success;

    /// The byte written on the wire.
    #[inline]
    pub const fn as_u8(self) -> u8 {
        self as u8
    }

    /// Codes 0x80 and above report a failure.
    #[inline]
    pub const fn is_error(self) -> bool {
        self as u8 >= 0x80
    }

    /// Whether the spec allows this code in that packet (the "Packets" column of table 2-6).
    pub fn allowed_in(self, packet: ReasonPacket) -> bool {
        use ReasonCode::*;
        match packet {
            ReasonPacket::ConnAck => matches!(
                self,
                Success
                    | UnspecifiedError
                    | MalformedPacket
                    | ProtocolError
                    | ImplementationSpecificError
                    | UnsupportedProtocolVersion
                    | ClientIdentifierNotValid
                    | BadUserNameOrPassword
                    | NotAuthorized
                    | ServerUnavailable
                    | ServerBusy
                    | Banned
                    | BadAuthenticationMethod
                    | TopicNameInvalid
                    | PacketTooLarge
                    | QuotaExceeded
                    | PayloadFormatInvalid
                    | RetainNotSupported
                    | QosNotSupported
                    | UseAnotherServer
                    | ServerMoved
                    | ConnectionRateExceeded
            ),
            ReasonPacket::PubAckRec => matches!(
                self,
                Success
                    | NoMatchingSubscribers
                    | UnspecifiedError
                    | ImplementationSpecificError
                    | NotAuthorized
                    | TopicNameInvalid
                    | PacketIdentifierInUse
                    | QuotaExceeded
                    | PayloadFormatInvalid
            ),
            ReasonPacket::PubRelComp => matches!(self, Success | PacketIdentifierNotFound),
            ReasonPacket::SubAck => matches!(
                self,
                Success
                    | GrantedQos1
                    | GrantedQos2
                    | UnspecifiedError
                    | ImplementationSpecificError
                    | NotAuthorized
                    | TopicFilterInvalid
                    | PacketIdentifierInUse
                    | QuotaExceeded
                    | SharedSubscriptionsNotSupported
                    | SubscriptionIdentifiersNotSupported
                    | WildcardSubscriptionsNotSupported
            ),
            ReasonPacket::UnsubAck => matches!(
                self,
                Success
                    | NoSubscriptionExisted
                    | UnspecifiedError
                    | ImplementationSpecificError
                    | NotAuthorized
                    | TopicFilterInvalid
                    | PacketIdentifierInUse
            ),
            ReasonPacket::Disconnect => !matches!(
                self,
                GrantedQos1
                    | GrantedQos2
                    | NoMatchingSubscribers
                    | NoSubscriptionExisted
                    | ContinueAuthentication
                    | ReAuthenticate
                    | UnsupportedProtocolVersion
                    | ClientIdentifierNotValid
                    | BadUserNameOrPassword
                    | ServerUnavailable
                    | Banned
                    | BadAuthenticationMethod
                    | PacketIdentifierInUse
                    | PacketIdentifierNotFound
            ),
            ReasonPacket::Auth => matches!(self, Success | ContinueAuthentication | ReAuthenticate),
        }
    }

    /// Parses a reason code byte and checks it is legal in `packet`.
    pub(crate) fn decode_for(value: u8, packet: ReasonPacket) -> Result<ReasonCode, DecodeError> {
        match ReasonCode::from_u8(value) {
            Some(code) if code.allowed_in(packet) => Ok(code),
            _ => Err(DecodeError::InvalidReasonCode { code: value, packet }),
        }
    }

    /// The MQTT 3.1.1 CONNACK return code for this reason, using the correspondence the MQTT 5
    /// spec gives; every other failure becomes 3 (server unavailable).
    pub const fn to_v3_connack(self) -> u8 {
        match self {
            ReasonCode::Success => 0,
            ReasonCode::UnsupportedProtocolVersion => 1,
            ReasonCode::ClientIdentifierNotValid => 2,
            ReasonCode::BadUserNameOrPassword => 4,
            ReasonCode::NotAuthorized => 5,
            _ => 3,
        }
    }

    /// The reason for an MQTT 3.1.1 CONNACK return code (0 to 5).
    pub const fn from_v3_connack(code: u8) -> Option<ReasonCode> {
        Some(match code {
            0 => ReasonCode::Success,
            1 => ReasonCode::UnsupportedProtocolVersion,
            2 => ReasonCode::ClientIdentifierNotValid,
            3 => ReasonCode::ServerUnavailable,
            4 => ReasonCode::BadUserNameOrPassword,
            5 => ReasonCode::NotAuthorized,
            _ => return None,
        })
    }

    /// The MQTT 3.1.1 SUBACK return code: the granted QoS, or 0x80 for any failure.
    pub const fn to_v3_suback(self) -> u8 {
        match self {
            ReasonCode::Success => 0,
            ReasonCode::GrantedQos1 => 1,
            ReasonCode::GrantedQos2 => 2,
            _ => 0x80,
        }
    }
}

impl fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (0x{:02X})", self.description(), self.as_u8())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_defined_byte_roundtrips() {
        let mut defined = 0;
        for b in 0..=255u8 {
            if let Some(code) = ReasonCode::from_u8(b) {
                assert_eq!(code.as_u8(), b);
                defined += 1;
            }
        }
        // Table 2-6 of the MQTT 5 spec lists 43 distinct byte values.
        assert_eq!(defined, 43);
    }

    #[test]
    fn packet_specific_codes() {
        assert!(ReasonCode::DisconnectWithWill.allowed_in(ReasonPacket::Disconnect));
        assert!(!ReasonCode::DisconnectWithWill.allowed_in(ReasonPacket::ConnAck));
        assert!(ReasonCode::PacketIdentifierNotFound.allowed_in(ReasonPacket::PubRelComp));
        assert!(!ReasonCode::GrantedQos1.allowed_in(ReasonPacket::PubAckRec));
        assert!(ReasonCode::SessionTakenOver.allowed_in(ReasonPacket::Disconnect));
        assert!(ReasonCode::ReAuthenticate.allowed_in(ReasonPacket::Auth));
        assert!(!ReasonCode::NotAuthorized.allowed_in(ReasonPacket::Auth));
    }

    #[test]
    fn v3_connack_mapping_roundtrips() {
        for code in 0..=5 {
            assert_eq!(ReasonCode::from_v3_connack(code).unwrap().to_v3_connack(), code);
        }
        assert_eq!(ReasonCode::from_v3_connack(6), None);
    }
}
