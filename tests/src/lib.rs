//! Helpers shared by the workspace's integration tests: a deterministic network simulator, a
//! host type for brokers and clients on it, and a throw-away certificate authority.

pub mod node;
pub mod pki;
pub mod sim;
