//! Helpers shared by the workspace's integration tests: a deterministic network simulator, a
//! host type for brokers and clients on it, a throw-away certificate authority, and real-socket
//! fixtures.

pub mod clients;
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

/// A test harness that moves in steps of virtual time.
pub trait Stepped {
    /// The virtual clock.
    fn now(&self) -> std::time::Instant;

    /// Moves everything until quiet, then advances the clock one step.
    fn step(&mut self);

    /// Steps until `done`, for at most `limit` of virtual time; whether it came.
    fn run_until(&mut self, limit: std::time::Duration, mut done: impl FnMut(&mut Self) -> bool) -> bool
    where
        Self: Sized,
    {
        let end = self.now() + limit;
        while self.now() < end {
            if done(self) {
                return true;
            }
            self.step();
        }
        done(self)
    }
}
