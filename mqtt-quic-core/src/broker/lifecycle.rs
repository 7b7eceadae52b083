//! What a broker adapter does with the broker's [`BrokerEvent`]s: one log line per client
//! lifecycle event (the same text and level from every adapter, so operators grep one format
//! whatever runs the broker), and the messages of in-process subscriptions, which are the
//! embedding application's and must reach it.
//!
//! ```
//! use mqtt_quic_core::broker::lifecycle::{log_line, Level};
//! use mqtt_quic_core::broker::machine::{BrokerEvent, Peer};
//! # fn demo(event: BrokerEvent) {
//! if let Some(line) = log_line(&event, |_peer: &Peer| "tcp") {
//!     match line.level {
//!         Level::Warn => eprintln!("WARN {}", line.text),
//!         _ => eprintln!("INFO {}", line.text),
//!     }
//! }
//! # }
//! ```

use crate::broker::machine::{BrokerEvent, LocalSubscription, Peer};
use mqtt_proto::{Publish, ReasonCode};
use std::net::SocketAddr;

/// How loud a lifecycle line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Level {
    /// Routine: connections, disconnections, migrations, most refusals.
    Info,
    /// Worth an operator's attention: a refusal for wrong credentials or no authorization
    /// (someone guessing passwords shows up here).
    Warn,
}

/// One line for the log, at its level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// The level to log it at.
    pub level: Level,
    /// The text: starts with `client connected:`, `client refused:`, `client migrated:` or
    /// `client disconnected:`, then `key=value` pairs.
    pub text: String,
}

/// What a broker event asks of the adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Handling {
    /// Log this line with the adapter's logging facade.
    Log(LogLine),
    /// A message for an in-process subscription: hand it to the embedding application (never
    /// drop it: the application subscribed to get it).
    Message {
        /// The subscription it matched.
        subscription: LocalSubscription,
        /// The message.
        publish: Publish,
    },
}

/// What to do with `event`; `transport` names a connection's transport (`quic`, `tcp`, `tls`)
/// for the log. `None` for events that need nothing.
pub fn handle(event: BrokerEvent, transport: impl Fn(&Peer) -> &'static str) -> Option<Handling> {
    match event {
        BrokerEvent::Message { subscription, publish } => Some(Handling::Message { subscription, publish }),
        other => log_line(&other, transport).map(Handling::Log),
    }
}

/// The log line for a client lifecycle event, at info (a refusal for wrong credentials or no
/// authorization at warn): greppable by `client connected`, `client refused`,
/// `client migrated` and `client disconnected`. `None` for events that are not about a
/// client's lifecycle.
pub fn log_line(event: &BrokerEvent, transport: impl Fn(&Peer) -> &'static str) -> Option<LogLine> {
    let addr = |remote: &Option<SocketAddr>| remote.map_or_else(|| "-".to_string(), |a| a.to_string());
    // A bridge's session here rides a stream the broker carries itself, not the adapter's.
    let transport = |peer: &Peer, client_id: &str| match client_id.starts_with(crate::bridge::LOCAL_CLIENT_PREFIX) {
        true => "internal",
        false => transport(peer),
    };
    let info = |text: String| Some(LogLine { level: Level::Info, text });
    match event {
        BrokerEvent::ClientConnected { client_id, username, peer, remote, protocol, session_present } => info(format!(
            "client connected: id={client_id:?} user={:?} transport={} from={} protocol={protocol:?} session_present={session_present}",
            username.as_deref().unwrap_or(""),
            transport(peer, client_id),
            addr(remote),
        )),
        BrokerEvent::ClientRefused { client_id, username, peer, remote, reason } => {
            let text = format!(
                "client refused: id={client_id:?} user={:?} transport={} from={} reason={reason:?} (0x{:02X})",
                username.as_deref().unwrap_or(""),
                transport(peer, client_id),
                addr(remote),
                *reason as u8,
            );
            let level = if matches!(reason, ReasonCode::BadUserNameOrPassword | ReasonCode::NotAuthorized) {
                Level::Warn
            } else {
                Level::Info
            };
            Some(LogLine { level, text })
        }
        BrokerEvent::ClientMigrated { client_id, remote } => {
            info(format!("client migrated: id={client_id:?} transport=quic to={remote}"))
        }
        BrokerEvent::ClientDisconnected { client_id, peer, reason, detail, dropped } => info(format!(
            "client disconnected: id={client_id:?} transport={} reason={reason:?}{} dropped_qos0={dropped}",
            transport(peer, client_id),
            detail.as_deref().map_or_else(String::new, |d| format!(" ({d})")),
        )),
        BrokerEvent::BridgeState { name, connected: true, detail } => {
            info(format!("bridge connected: name={name:?} to={detail}"))
        }
        BrokerEvent::BridgeState { name, connected: false, detail } => {
            Some(LogLine { level: Level::Warn, text: format!("bridge disconnected: name={name:?} ({detail})") })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::machine::StreamId;
    use crate::session::server::EndReason;

    #[test]
    fn refusals_for_credentials_are_warnings_and_the_text_keeps_its_format() {
        let refused = |reason| BrokerEvent::ClientRefused {
            client_id: "c".into(),
            username: Some("u".into()),
            peer: Peer::Stream(StreamId(1)),
            remote: None,
            reason,
        };
        let line = log_line(&refused(ReasonCode::BadUserNameOrPassword), |_| "tls").unwrap();
        assert_eq!(line.level, Level::Warn);
        assert_eq!(
            line.text,
            "client refused: id=\"c\" user=\"u\" transport=tls from=- reason=BadUserNameOrPassword (0x86)"
        );
        assert_eq!(log_line(&refused(ReasonCode::ServerBusy), |_| "tcp").unwrap().level, Level::Info);
        let gone = BrokerEvent::ClientDisconnected {
            client_id: "c".into(),
            peer: Peer::Stream(StreamId(1)),
            reason: EndReason::KeepAliveTimeout,
            detail: Some("why".into()),
            dropped: 3,
        };
        assert_eq!(
            log_line(&gone, |_| "tcp").unwrap().text,
            "client disconnected: id=\"c\" transport=tcp reason=KeepAliveTimeout (why) dropped_qos0=3"
        );
    }
}
