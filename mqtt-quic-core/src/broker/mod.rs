//! The broker: the machine serving clients over QUIC ([`machine::Broker`]) and the state that
//! outlives connections: subscriptions and routing, retained messages, kept sessions and wills.
//! Limits, `$SYS` and in-process clients live in `machine`; authentication (handed out as
//! [`auth::AuthRequest`]s for the adapter to verify off its loop) and authorization in `auth`;
//! the per-address login limit in `limiter`. What every adapter does with the broker's output
//! (byte-stream routing, lifecycle lines, in-process messages) is in `stream_table` and
//! `lifecycle`.

pub mod auth;
pub mod lifecycle;
pub mod limiter;
pub mod machine;
pub mod retained;
pub mod router;
pub mod stream_table;
