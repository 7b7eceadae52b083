//! Helpers shared by the workspace's integration tests: a deterministic network simulator, a
//! host type for brokers and clients on it, a throw-away certificate authority, and real-socket
//! fixtures.

pub mod disk;
pub mod fixtures;
pub mod node;
pub mod pipes;
pub mod pki;
pub mod sim;
pub mod tap;

/// The Rust examples in the workspace README, compiled (and run unless marked `no_run`) as
/// doctests of this crate, which depends on every adapter.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
