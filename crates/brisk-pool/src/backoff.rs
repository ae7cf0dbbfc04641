//! How long checkouts fail fast after connection attempts failed: shared by `Instrumented`
//! and, through `Creations`, the `Measured` manager that sees every attempt.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::Instant;

/// Connection attempts that failed in a row, and until when checkouts that would open a
/// connection fail fast instead.
pub(crate) struct Backoff {
    first: Duration,
    max: Duration,
    /// What `until_ns` counts from: the pool's wrapping.
    created: Instant,
    pub(crate) failures: AtomicU32,
    /// Nanoseconds since the pool was wrapped; [`HEALTHY`] when no attempt failed last.
    pub(crate) until_ns: AtomicU64,
}

pub(crate) const HEALTHY: u64 = 0;

impl Backoff {
    pub(crate) fn new(first: Duration, max: Duration, created: Instant) -> Self {
        Self {
            first,
            max,
            created,
            failures: AtomicU32::new(0),
            until_ns: AtomicU64::new(HEALTHY),
        }
    }

    /// `at` as nanoseconds since the pool was wrapped.
    pub(crate) fn nanos_at(&self, at: Instant) -> u64 {
        u64::try_from(at.duration_since(self.created).as_nanos()).unwrap_or(u64::MAX)
    }

    /// An attempt to connect failed at `at`: pause longer.
    pub(crate) fn failed(&self, at: Instant) {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let until = self.until(failures, self.nanos_at(at));
        self.until_ns.store(until, Ordering::Relaxed);
    }

    /// An attempt succeeded: no pause.
    pub(crate) fn succeeded(&self) {
        self.failures.store(0, Ordering::Relaxed);
        self.until_ns.store(HEALTHY, Ordering::Relaxed);
    }

    /// The pause after `failures` failures in a row: `first` doubling up to `max`, then a
    /// random share of up to half taken off, so the instances of a service that saw the
    /// database go down together do not all come back in the same instant.
    fn pause(&self, failures: u32, now_ns: u64) -> Duration {
        let doubled = self
            .first
            .saturating_mul(1_u32 << failures.saturating_sub(1).min(20))
            .min(self.max);
        let hash = foldhash::fast::FixedState::with_seed(failures.into()).hash_one(now_ns);
        #[allow(clippy::cast_precision_loss)] // a fraction in [0, 1) needs no more precision
        let share = (hash >> 11) as f64 / (1_u64 << 53) as f64;
        doubled.mul_f64(1.0 - share / 2.0)
    }

    /// `now_ns` plus the pause after `failures` failures.
    pub(crate) fn until(&self, failures: u32, now_ns: u64) -> u64 {
        let pause = u64::try_from(self.pause(failures, now_ns).as_nanos()).unwrap_or(u64::MAX);
        now_ns.saturating_add(pause).max(1)
    }
}
