//! A circuit breaker in front of Redis: after failures in a row it stops calling for a while,
//! then lets one probe through.

use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use brisk_metrics::Gauge;
use tokio::time::Instant;

const CLOSED: u8 = 0;
const HALF_OPEN: u8 = 1;
const OPEN: u8 = 2;

/// When to open, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Failures in a row (timeouts, refused connections, errors) that open the breaker.
    pub failures: u32,
    /// How long it stays open before one call probes Redis again.
    pub open_for: Duration,
}

impl Default for BreakerConfig {
    /// Five failures in a row open it for 500 ms: a Redis that is back is used again within about
    /// half a second, and a Redis that is down costs one probe every half second.
    fn default() -> Self {
        Self {
            failures: 5,
            open_for: Duration::from_millis(500),
        }
    }
}

/// Lock-free: a closed breaker costs one atomic load per call.
#[derive(Debug)]
pub(crate) struct Breaker {
    config: BreakerConfig,
    state: AtomicU8,
    failures: AtomicU32,
    /// When the breaker last opened or let a probe through, in ms since `base`.
    since: AtomicU64,
    base: Instant,
    gauge: Gauge,
    cache: std::sync::Arc<str>,
}

impl Breaker {
    pub(crate) fn new(config: BreakerConfig, gauge: Gauge, cache: std::sync::Arc<str>) -> Self {
        gauge.set(0.0);
        Self {
            config,
            state: AtomicU8::new(CLOSED),
            failures: AtomicU32::new(0),
            since: AtomicU64::new(0),
            base: Instant::now(),
            gauge,
            cache,
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether the breaker is closed (no failures in a row enough to open it): reads may then
    /// share a batch. No side effect, unlike [`allow`](Self::allow).
    pub(crate) fn is_closed(&self) -> bool {
        self.state.load(Ordering::Acquire) == CLOSED
    }

    /// May this call go to Redis? An open breaker lets one call through once `open_for` has
    /// passed; so does a half-open one whose probe never reported (its caller was dropped).
    pub(crate) fn allow(&self) -> bool {
        if self.state.load(Ordering::Acquire) == CLOSED {
            return true;
        }
        let since = self.since.load(Ordering::Acquire);
        let now = self.now_ms();
        let open_ms = u64::try_from(self.config.open_for.as_millis()).unwrap_or(u64::MAX);
        if now.saturating_sub(since) < open_ms {
            return false;
        }
        // One caller wins the probe; the rest keep skipping.
        let probe = self
            .since
            .compare_exchange(
                since,
                now.max(since + 1),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok();
        if probe {
            self.state.store(HALF_OPEN, Ordering::Release);
            self.gauge.set(f64::from(HALF_OPEN));
        }
        probe
    }

    pub(crate) fn success(&self) {
        self.failures.store(0, Ordering::Relaxed);
        if self.state.swap(CLOSED, Ordering::AcqRel) != CLOSED {
            self.gauge.set(f64::from(CLOSED));
            tracing::info!(cache = %self.cache, "Redis answers again: the cache's circuit breaker closed");
        }
    }

    pub(crate) fn failure(&self) {
        let failures = self
            .failures
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        let state = self.state.load(Ordering::Acquire);
        if state == HALF_OPEN || (state == CLOSED && failures >= self.config.failures) {
            self.since.store(self.now_ms(), Ordering::Release);
            if self.state.swap(OPEN, Ordering::AcqRel) == CLOSED {
                tracing::warn!(
                    cache = %self.cache,
                    failures,
                    open_for = ?self.config.open_for,
                    "Redis failed repeatedly: the cache skips it for a while and serves from the local tier and the loader"
                );
            }
            self.gauge.set(f64::from(OPEN));
        }
    }

    #[cfg(test)]
    fn is_open(&self) -> bool {
        self.state.load(Ordering::Acquire) != CLOSED
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(
            BreakerConfig {
                failures: 3,
                open_for: Duration::from_secs(1),
            },
            brisk_metrics::catalog::CACHE_BREAKER_STATE.gauge(&[("cache", "t")]),
            "t".into(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_failures_in_a_row_and_probes_once() {
        let b = breaker();
        b.failure();
        b.failure();
        b.success(); // a success resets the count
        b.failure();
        b.failure();
        assert!(b.allow());
        b.failure();
        assert!(b.is_open());
        assert!(!b.allow());
        tokio::time::advance(Duration::from_millis(1_001)).await;
        assert!(b.allow(), "one probe");
        assert!(!b.allow(), "only one");
        b.failure(); // the probe failed: open again
        assert!(!b.allow());
        tokio::time::advance(Duration::from_millis(1_001)).await;
        assert!(b.allow());
        b.success();
        assert!(b.allow() && b.allow());
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_never_reports_is_retried() {
        let b = breaker();
        for _ in 0..3 {
            b.failure();
        }
        tokio::time::advance(Duration::from_millis(1_001)).await;
        assert!(b.allow()); // its caller is dropped: no success, no failure
        assert!(!b.allow());
        tokio::time::advance(Duration::from_millis(1_001)).await;
        assert!(b.allow(), "another probe once open_for passed again");
    }
}
