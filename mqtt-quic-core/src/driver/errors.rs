//! What the adapters' clients and servers report when something fails: the driver's own
//! errors, what a user's call returns, and why a server could not start or stopped.

use crate::config::ConfigError;
use crate::session::client::CommandError;
use mqtt_proto::ReasonCode;
use std::net::SocketAddr;
use thiserror::Error;

/// Why a command, or the first connection, failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DriverError {
    /// The session refused the command.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// The broker answered with a failure code.
    #[error("the broker rejected it: {0}")]
    Rejected(ReasonCode),
    /// The connection ended before the broker answered; it may or may not have taken effect.
    #[error("the connection was lost before the broker answered")]
    ConnectionLost,
    /// The client has been disconnected.
    #[error("the client is closed")]
    Closed,
    /// CONNACK refused the first connection.
    #[error("the broker refused the connection: {0}")]
    Refused(ReasonCode),
    /// The first connection could not be made; the text says why (refused, timed out,
    /// certificate).
    #[error("{0}")]
    Unreachable(String),
    /// The client store failed (one line naming the file and what to do): the client stopped,
    /// since it could no longer keep what it promises to keep.
    #[error("{0}")]
    Store(String),
}

/// Why a client could not connect, or an operation failed: one error type for the clients of
/// every adapter.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The broker URL is malformed.
    #[error(transparent)]
    Url(#[from] crate::url::UrlError),
    /// The host name did not resolve.
    #[error("cannot resolve {host}: {reason}")]
    Resolve {
        /// The host.
        host: String,
        /// Why.
        reason: String,
    },
    /// A local socket could not be set up.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The settings are invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Trust material (CA files, the system's store) could not be loaded.
    #[error("{0}")]
    Trust(String),
    /// The adapter does not offer this (e.g. `mqtts://` where there is no TLS over TCP).
    #[error("not supported here: {0}")]
    Unsupported(&'static str),
    /// The broker could not be reached (refused, timed out, no route) or the TLS handshake
    /// failed (the reason names the certificate problem).
    #[error("cannot connect to {url}: {reason}")]
    Unreachable {
        /// Where.
        url: String,
        /// Why.
        reason: String,
    },
    /// CONNACK refused the connection.
    #[error("the broker refused the connection: {0}")]
    Refused(ReasonCode),
    /// The session refused the command.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// The broker answered with a failure code.
    #[error("the broker rejected it: {0}")]
    Rejected(ReasonCode),
    /// The connection ended before the broker answered; it may or may not have taken effect.
    #[error("the connection was lost before the broker answered")]
    ConnectionLost,
    /// The client has been disconnected.
    #[error("the client is closed")]
    Closed,
    /// The client store ([`ClientOptions::store`](super::ClientOptions::store)) could not be
    /// opened, read or written: one line naming the file and what to do. A client whose store
    /// fails while running stops.
    #[error("{0}")]
    Store(String),
}

impl ClientError {
    /// The client error for a driver error, naming `url` where the connection failed.
    pub fn from_driver(e: DriverError, url: &str) -> ClientError {
        match e {
            DriverError::Command(c) => ClientError::Command(c),
            DriverError::Rejected(r) => ClientError::Rejected(r),
            DriverError::ConnectionLost => ClientError::ConnectionLost,
            DriverError::Refused(r) => ClientError::Refused(r),
            DriverError::Unreachable(reason) => ClientError::Unreachable { url: url.to_string(), reason },
            DriverError::Closed => ClientError::Closed,
            DriverError::Store(reason) => ClientError::Store(reason),
        }
    }
}

/// Why a broker server did not start.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ServerError {
    /// A listener could not be opened (port in use, no permission, no such address).
    #[error("cannot listen for {what} on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Another socket call failed (e.g. registering with a poll).
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The broker's configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The TLS listener's certificate could not be used.
    #[error("TLS listener: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The store could not be opened, read or written (the message names the file and what to
    /// do), or persistence is on without a data directory.
    #[error("{0}")]
    Store(String),
    /// The adapter does not offer this listener.
    #[error("not supported here: {0}")]
    Unsupported(&'static str),
    /// The running broker stopped without being asked to (a bug; the process should exit
    /// with a failure status so that its supervisor restarts it).
    #[error("the broker stopped unexpectedly: {0}")]
    Stopped(&'static str),
    /// An in-process call reached a broker that is no longer running (it was shut down).
    #[error("the broker is not running")]
    NotRunning,
    /// The broker refused an in-process publish, with the reason code a client would get for
    /// it (a topic beyond the limits, no room for a retained message).
    #[error("the broker refused the message: {0:?}")]
    Refused(mqtt_proto::ReasonCode),
}
