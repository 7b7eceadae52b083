//! What users see of a client: where its connection stands, and what a completed command
//! produced (SUBACK and UNSUBACK read once, here, for every adapter).

use mqtt_proto::{QoS, ReasonCode};

use super::ClientError;
use crate::client::StreamHandle;

/// Where the connection stands, as users see it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionState {
    /// The first connection is being made.
    Connecting,
    /// The broker accepted the connection.
    Connected {
        /// Whether the broker resumed a kept session.
        session_present: bool,
    },
    /// The connection was lost; a new one is attempted after the backoff.
    Reconnecting {
        /// Why it was lost.
        reason: String,
    },
    /// The client is done (disconnected, or lost without reconnecting).
    Closed {
        /// Why.
        reason: String,
    },
}

/// What a completed command produced.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Published (QoS 0 written, QoS 1 PUBACK, QoS 2 PUBCOMP) or disconnected.
    Done,
    /// SUBACK's or UNSUBACK's reason codes, one per filter (empty UNSUBACK codes for 3.1.1).
    Codes(Vec<ReasonCode>),
    /// A data stream was opened (see [`ClientDriver::open_stream`](super::ClientDriver::open_stream)).
    Stream(StreamHandle),
}

impl Outcome {
    /// SUBACK's or UNSUBACK's codes: what every adapter's `subscribe_many` and `unsubscribe`
    /// return (empty for a command that has none).
    pub fn into_codes(self) -> Vec<ReasonCode> {
        match self {
            Outcome::Codes(codes) => codes,
            Outcome::Done | Outcome::Stream(_) => Vec::new(),
        }
    }

    /// The handle of [`Command::OpenStream`](super::Command::OpenStream)'s outcome: what every
    /// adapter's `open_stream` returns. Any other outcome (a bug) reads as
    /// [`ClientError::Closed`].
    pub fn into_stream(self) -> Result<StreamHandle, ClientError> {
        match self {
            Outcome::Stream(handle) => Ok(handle),
            _ => Err(ClientError::Closed),
        }
    }

    /// What every adapter's `subscribe` (one filter) returns for its SUBACK: the QoS the broker
    /// granted, or [`ClientError::Rejected`] with the failure code it answered with. A SUBACK
    /// without a code for the filter (a broker bug) counts as Unspecified error, so a caller
    /// never takes a subscription for granted that the broker did not confirm.
    pub fn granted_qos(self) -> Result<QoS, ClientError> {
        match self.into_codes().first() {
            Some(c) if !c.is_error() => Ok(QoS::from_u8(c.as_u8()).unwrap_or(QoS::AtMostOnce)),
            Some(c) => Err(ClientError::Rejected(*c)),
            None => Err(ClientError::Rejected(ReasonCode::UnspecifiedError)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suback_is_read_one_way() {
        assert_eq!(Outcome::Codes(vec![ReasonCode::GrantedQos2]).granted_qos().unwrap(), QoS::ExactlyOnce);
        assert_eq!(Outcome::Codes(vec![ReasonCode::Success]).granted_qos().unwrap(), QoS::AtMostOnce);
        assert!(matches!(
            Outcome::Codes(vec![ReasonCode::NotAuthorized]).granted_qos(),
            Err(ClientError::Rejected(ReasonCode::NotAuthorized))
        ));
        assert!(matches!(Outcome::Done.granted_qos(), Err(ClientError::Rejected(ReasonCode::UnspecifiedError))));
        assert_eq!(Outcome::Done.into_codes(), []);
    }
}
