//! The clock of checkout measurements.
//!
//! Measurements, not timers: real time even when a test pauses tokio's clock. quanta's
//! calibrated TSC reads cost about half of `std::time::Instant::now` here, but
//! `quanta::Instant::now` first looks up a thread-local mock clock (which brisk never
//! installs) and then its global clock: about a third of a checkout's own instructions went
//! to those lookups. A clock of our own skips both.

use std::sync::OnceLock;

pub(crate) use quanta::Instant;

/// Now, by brisk-pool's clock: compare it only with instants from this function.
#[inline]
pub(crate) fn now() -> Instant {
    static CLOCK: OnceLock<quanta::Clock> = OnceLock::new();
    CLOCK.get_or_init(quanta::Clock::new).now()
}
