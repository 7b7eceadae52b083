//! Helpers shared by the workspace's integration tests: a deterministic network simulator.

pub mod sim;
