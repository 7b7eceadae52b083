//! The one error a command to any machine can return: a QUIC endpoint's, a session's (either
//! role), a client machine's or a pool's. Commands are refused, never half done: the error
//! says why, and the machine is as it was before the call.

use mqtt_proto::QoS;
use thiserror::Error;

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum CommandError {
    /// Not connected (QoS 0 publishes, subscriptions and disconnect need a connection).
    #[error("not connected")]
    NotConnected,
    /// The session is not in the state the command needs (a broker answering a CONNECT that
    /// was not reported, or acting on a session that has ended).
    #[error("not valid in this state of the connection")]
    WrongState,
    /// The connection has already been started.
    #[error("already connecting or connected")]
    AlreadyConnected,
    /// No such QUIC connection (closed, or never existed).
    #[error("unknown or closed connection")]
    UnknownConnection,
    /// This endpoint was built without a client configuration.
    #[error("this endpoint cannot open connections (built as a server)")]
    NotAClient,
    /// quinn-proto refused to start the connection.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The stream was already finished by this side.
    #[error("the MQTT stream was already finished")]
    Finished,
    /// AUTH needs an authentication method in the CONNECT (MQTT 5 enhanced authentication).
    #[error("AUTH needs an authentication method set in the CONNECT properties")]
    NoAuthenticationMethod,
    /// AUTH must use the authentication method the CONNECT named.
    #[error("AUTH names method `{auth}` but the CONNECT named `{connect}`")]
    AuthenticationMethodMismatch {
        /// The CONNECT's method.
        connect: String,
        /// The AUTH's method.
        auth: String,
    },
    /// Too many publishes are waiting for the peer.
    #[error("publish queue is full ({0} waiting)")]
    QueueFull(usize),
    /// The packet would exceed the peer's Maximum Packet Size (a broker drops such a message,
    /// as the spec says).
    #[error("packet of {size} bytes exceeds the peer's maximum of {max}")]
    PacketTooLarge {
        /// Encoded size.
        size: usize,
        /// The peer's limit.
        max: u32,
    },
    /// The server does not support this QoS (CONNACK Maximum QoS).
    #[error("the server supports QoS up to {0:?}")]
    QosNotSupported(QoS),
    /// The server does not support retained messages.
    #[error("the server does not support retained messages")]
    RetainNotSupported,
    /// Nothing to subscribe or unsubscribe.
    #[error("at least one topic filter is needed")]
    Empty,
    /// The peer allows no more streams now (its stream limit): wait until one ends.
    #[error("the peer allows no more streams now")]
    StreamLimit,
    /// No such stream on this connection (never opened, or ended).
    #[error("unknown or ended stream")]
    UnknownStream,
    /// All 65 535 packet identifiers are in use.
    #[error("no free packet identifier")]
    NoPacketId,
    /// No message with this packet identifier waits for the application's acknowledgement
    /// (its connection ended; the server sends it again).
    #[error("no message with this packet identifier waits for acknowledgement")]
    UnknownMessage,
}
