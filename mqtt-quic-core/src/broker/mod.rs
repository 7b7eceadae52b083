//! The broker: the machine serving clients over QUIC and byte streams ([`machine::Broker`]) and
//! the state that outlives connections.
//!
//! # Data flow
//!
//! A datagram (or stream bytes from the adapter) reaches the connection's server session; the
//! session's events (CONNECT, PUBLISH, SUBSCRIBE, its end) are decided by the broker with its
//! policy; a PUBLISH is routed to the matching sessions, each delivered to its connection or
//! queued while it is offline; what the sessions then have to send goes out through the
//! connection's transport. Outputs are polled: datagrams and deadlines (the `Machine` trait),
//! stream output, password checks to run, and events for the embedding application.
//!
//! # Modules
//!
//! - `machine`: the [`machine::Broker`] and its dispatch spine (inputs, sessions, routing,
//!   delivery, output), and the public paths of everything below.
//! - `config`: [`machine::BrokerConfig`], its defaults and validation.
//! - `links`: the transports behind one [`machine::Peer`] address (QUIC connections, byte
//!   streams), per-connection and total write backlogs, the write-timeout check.
//! - `registry`: kept sessions: takeover, offline queues and their byte budget, wills and
//!   expiry.
//! - `policy`: CONNECT admission (the password check handed out as [`auth::AuthRequest`]s, the
//!   per-address login limit of `limiter`), `$` topics, topic and subscription limits, read
//!   rights at delivery.
//! - `lanes`: data streams of EMQX's multi-stream mode (each a session of its own within the
//!   connection's), and one-way data streams feeding the connection's session.
//! - `datagrams`: QoS 0 messages in QUIC datagrams, both ways.
//! - `bridges`: the broker's bridges to upstream brokers ([`crate::bridge`]): their sessions
//!   here on internal streams, their upstream connections through the broker's socket and
//!   the adapter's dialling ([`Dial`]).
//! - `shared`: redelivery of shared-subscription messages a leaving member did not acknowledge.
//! - `sys`: `$SYS/broker/` statistics and the periodic work.
//! - [`shard`]: one broker as several machines on several cores: what crosses them.
//! - `local`: in-process subscribe and publish for the embedding application.
//! - `events`: [`machine::BrokerEvent`], what the application is told.
//! - [`stream_table`] and [`lifecycle`]: what every adapter does with the broker's output
//!   (routing byte-stream output to connections, lifecycle log lines, in-process messages).
//! - [`router`]: the subscription tree; [`retained`]: retained messages; [`auth`]: the
//!   authentication and authorization interface and its built-in implementation; [`limiter`]:
//!   failed logins per address.

pub mod auth;
mod bridges;
mod config;
mod datagrams;
mod events;
mod journal;
mod lanes;
pub mod lifecycle;
pub mod limiter;
mod links;
pub mod local;
pub mod machine;
mod policy;
mod registry;
mod restore;
pub mod retained;
pub mod router;
pub mod shard;
mod shared;
pub mod stream_table;

pub use bridges::{BridgeId, Dial, DialTls};
pub use datagrams::DATAGRAM_PROPERTY;
mod sys;
