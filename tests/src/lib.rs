//! Helpers shared by the workspace's integration tests: a deterministic network simulator and a
//! throw-away certificate authority.

pub mod pki;
pub mod sim;
pub mod sink;
