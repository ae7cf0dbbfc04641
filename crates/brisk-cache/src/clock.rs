//! Wall-clock times for the envelope, read through tokio's clock.
//!
//! Values in Redis carry Unix times (other processes read them). The cache reads the wall clock
//! once, when it is built, and moves it on by tokio's monotonic clock: every expiry is then
//! decided by one clock, which tests drive with `tokio::time::pause()`. The cost: a wall clock
//! corrected later (NTP) is not followed, so a process's idea of "now" can drift from another's
//! by that correction, shifting when a remote value turns stale by as much. Redis's own TTL,
//! which deletes the key, is not affected.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    instant: Instant,
    unix_ms: u64,
    unix_us: u64,
}

impl Clock {
    pub(crate) fn new() -> Self {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            instant: Instant::now(),
            unix_ms: u64::try_from(since.as_millis()).unwrap_or(u64::MAX),
            unix_us: u64::try_from(since.as_micros()).unwrap_or(u64::MAX),
        }
    }

    /// `at` as Unix milliseconds.
    pub(crate) fn unix_ms(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.instant);
        self.unix_ms
            .saturating_add(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
    }

    /// `at` as Unix microseconds: when entries were made and tags invalidated, which must not
    /// tie for a write made just after an invalidation.
    pub(crate) fn unix_us(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.instant);
        self.unix_us
            .saturating_add(u64::try_from(since.as_micros()).unwrap_or(u64::MAX))
    }

    /// Unix milliseconds as an `Instant` (times before this clock's start are its start).
    pub(crate) fn instant(&self, unix_ms: u64) -> Instant {
        let since = Duration::from_millis(unix_ms.saturating_sub(self.unix_ms));
        self.instant
            .checked_add(since)
            .unwrap_or_else(|| self.instant + Duration::from_secs(86_400 * 365 * 30))
    }
}

/// Saturating milliseconds of a duration.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
