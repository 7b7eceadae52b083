//! A session's deadlines (connect timeout, keep-alive, PINGRESP), each one armed or not. Both
//! roles keep a few; the session's `poll_timeout` is the earliest of them and `handle_timeout`
//! fires those due, so a timer that fires disarms itself and an early call fires nothing.

use std::time::{Duration, Instant};

/// One deadline, armed or not.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Timer(Option<Instant>);

impl Timer {
    /// Arms it for `at`.
    pub(crate) fn set(&mut self, at: Instant) {
        self.0 = Some(at);
    }

    /// Arms it for `now + after`, or disarms it when `after` is `None`.
    pub(crate) fn set_after(&mut self, now: Instant, after: Option<Duration>) {
        self.0 = after.map(|d| now + d);
    }

    /// Disarms it.
    pub(crate) fn clear(&mut self) {
        self.0 = None;
    }

    /// When it fires, if armed.
    pub(crate) fn at(&self) -> Option<Instant> {
        self.0
    }

    /// Whether it is armed.
    pub(crate) fn is_armed(&self) -> bool {
        self.0.is_some()
    }

    /// Whether it is due at `now`; a due timer is disarmed.
    pub(crate) fn fire(&mut self, now: Instant) -> bool {
        let due = self.0.is_some_and(|at| at <= now);
        if due {
            self.0 = None;
        }
        due
    }
}

/// The earliest of some deadlines.
pub(crate) fn earliest(deadlines: impl IntoIterator<Item = Option<Instant>>) -> Option<Instant> {
    deadlines.into_iter().flatten().min()
}
