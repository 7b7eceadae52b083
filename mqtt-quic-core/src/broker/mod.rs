//! The broker: the machine serving clients over QUIC ([`machine::Broker`]) and the state that
//! outlives connections: subscriptions and routing, retained messages, kept sessions and wills.
//! (Still to come: limits, `$SYS`, authentication and authorization, in-process clients.)

pub mod auth;
pub mod limiter;
pub mod machine;
pub mod retained;
pub mod router;
