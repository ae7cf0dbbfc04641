//! How long connections live: the same settings for deadpool and bb8.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use crate::{BuildError, MAX_PERIOD};

/// Connection lifetimes, applied the same way over either backend.
///
/// - **max lifetime**: a connection older than this is closed, so the database can rebalance,
///   rotate credentials or restart workers without every connection hanging on. Each connection
///   gets its own share of `jitter` off its lifetime, so connections opened together (at
///   warm-up) are not all closed, and reopened, in the same instant.
/// - **idle timeout**: a connection unused for this long is closed, so a quiet service gives
///   back the database backends it does not need.
/// - **min idle**: after reaping, the pool is topped up to this many idle connections.
///
/// Over deadpool, [`Instrumented::spawn_lifecycle`](crate::Instrumented::spawn_lifecycle)
/// applies it every `reap_every`; bb8 reaps by itself, configured by [`Lifecycle::bb8`].
///
/// Plain data with defaults; with the `serde` feature it reads from configuration, every field
/// optional (durations as `{ secs, nanos }`, serde's form).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct Lifecycle {
    /// Close connections older than this (minus their jitter). Default 30 minutes.
    pub max_lifetime: Option<Duration>,
    /// The most taken off one connection's lifetime. Default 3 minutes.
    pub jitter: Duration,
    /// Close connections idle this long. Default 10 minutes.
    pub idle_timeout: Option<Duration>,
    /// Keep at least this many idle connections open. Default 0.
    pub min_idle: usize,
    /// How often to reap. Default 30 seconds.
    pub reap_every: Duration,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self {
            max_lifetime: Some(Duration::from_secs(30 * 60)),
            jitter: Duration::from_secs(3 * 60),
            idle_timeout: Some(Duration::from_secs(10 * 60)),
            min_idle: 0,
            reap_every: Duration::from_secs(30),
        }
    }
}

impl Lifecycle {
    /// Checks the settings.
    ///
    /// # Errors
    /// [`BuildError`] for a `reap_every`, lifetime or idle timeout of zero or above
    /// [`MAX_PERIOD`] (use `None` for no limit), or a jitter not below the lifetime.
    pub fn validate(&self) -> Result<(), BuildError> {
        BuildError::check("reap_every", self.reap_every, MAX_PERIOD)?;
        if let Some(max) = self.max_lifetime {
            BuildError::check("max_lifetime", max, MAX_PERIOD)?;
        }
        if let Some(idle) = self.idle_timeout {
            BuildError::check("idle_timeout", idle, MAX_PERIOD)?;
        }
        if self.max_lifetime.is_some_and(|max| self.jitter >= max) {
            return Err(BuildError::invalid("jitter", "must be below max_lifetime"));
        }
        Ok(())
    }

    /// The lifetime of the connection created at `created`: the max lifetime minus that
    /// connection's own share of the jitter (a hash of its creation instant, so it is stable).
    #[must_use]
    pub fn lifetime_of(&self, created: Instant) -> Option<Duration> {
        let max = self.max_lifetime?;
        let mut hasher = std::hash::DefaultHasher::new();
        created.hash(&mut hasher);
        #[allow(clippy::cast_precision_loss)] // a fraction in [0, 1) needs no more precision
        let share = (hasher.finish() >> 11) as f64 / (1_u64 << 53) as f64;
        Some(max.saturating_sub(self.jitter.mul_f64(share)))
    }

    /// Whether a connection created at `created` and idle (in the pool, not checked out) for
    /// `idle` should stay open.
    #[must_use]
    pub fn keeps(&self, created: Instant, idle: Duration) -> bool {
        let young = self
            .lifetime_of(created)
            .is_none_or(|lifetime| created.elapsed() < lifetime);
        let busy = self.idle_timeout.is_none_or(|timeout| idle < timeout);
        young && busy
    }

    /// Configures a bb8 pool to apply these settings itself. bb8 has no per-connection jitter,
    /// so its lifetime is the max lifetime minus half the jitter (the average here). Periods
    /// above [`MAX_PERIOD`] are clamped to it (bb8 panics on a period it cannot add to an
    /// `Instant`); [`validate`](Self::validate) refuses them.
    #[cfg(feature = "bb8")]
    pub fn bb8<M: bb8::ManageConnection>(&self, builder: bb8::Builder<M>) -> bb8::Builder<M> {
        let lifetime = self
            .max_lifetime
            .map(|max| max.saturating_sub(self.jitter / 2));
        let min_idle = u32::try_from(self.min_idle).unwrap_or(u32::MAX);
        // Clamped: bb8 panics adding a period too long to an `Instant`, and a lifecycle read
        // through serde may not have been validated.
        let period = |d: Duration| d.min(MAX_PERIOD);
        builder
            .max_lifetime(lifetime.map(period))
            .idle_timeout(self.idle_timeout.map(period))
            .min_idle((min_idle > 0).then_some(min_idle))
            .reaper_rate(period(self.reap_every))
    }
}

/// Since when each idle connection has been idle, as far as [`Pool::reap`](crate::Pool::reap)
/// rounds can tell.
///
/// deadpool records when a connection was last *checked out*, not when it came back, so its
/// "idle for" counts the time the connection was in use: one held longer than the idle timeout
/// was closed the moment it returned. A connection is idle since the first reap round that saw
/// it in the pool with the use count it still has; so an idle timeout closes a connection
/// between `idle_timeout` and `idle_timeout + reap_every` after its return, never earlier.
#[derive(Debug, Default)]
pub struct IdleSince {
    /// Per connection (by creation instant): its use count and when it was first seen idle so.
    seen: HashMap<Instant, (usize, Instant)>,
    /// The same for the round in progress; connections it does not see are forgotten.
    current: HashMap<Instant, (usize, Instant)>,
}

impl IdleSince {
    /// How long the connection created at `created`, checked out `uses` times so far, has
    /// been idle at `now`: zero the first time a round sees it idle with that count.
    pub fn idle_for(&mut self, created: Instant, uses: usize, now: Instant) -> Duration {
        let since = match self.seen.get(&created) {
            Some(&(seen_uses, since)) if seen_uses == uses => since,
            _ => now,
        };
        self.current.insert(created, (uses, since));
        now.saturating_duration_since(since)
    }

    /// Ends a round: the connections it did not see (closed, or checked out) are forgotten.
    pub fn end_round(&mut self) {
        self.seen = std::mem::take(&mut self.current);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_connection_gets_its_own_jitter_within_bounds() {
        let lifecycle = Lifecycle {
            max_lifetime: Some(Duration::from_secs(100)),
            jitter: Duration::from_secs(10),
            ..Lifecycle::default()
        };
        let base = Instant::now();
        let lifetimes: Vec<Duration> = (0..200)
            .map(|i| {
                lifecycle
                    .lifetime_of(base + Duration::from_nanos(i * 7_919))
                    .unwrap()
            })
            .collect();
        assert!(
            lifetimes
                .iter()
                .all(|l| (Duration::from_secs(90)..=Duration::from_secs(100)).contains(l))
        );
        let distinct: std::collections::HashSet<_> = lifetimes.iter().collect();
        assert!(
            distinct.len() > 150,
            "spread: {} distinct of 200",
            distinct.len()
        );
        assert_eq!(
            lifecycle.lifetime_of(base),
            lifecycle.lifetime_of(base),
            "stable per connection"
        );
    }

    #[test]
    fn bad_settings_are_errors() {
        let bad = |f: fn(&mut Lifecycle)| {
            let mut lifecycle = Lifecycle::default();
            f(&mut lifecycle);
            lifecycle.validate().unwrap_err().to_string()
        };
        assert!(bad(|l| l.reap_every = Duration::ZERO).contains("reap_every"));
        assert!(bad(|l| l.max_lifetime = Some(Duration::ZERO)).contains("max_lifetime"));
        assert!(bad(|l| l.idle_timeout = Some(Duration::ZERO)).contains("idle_timeout"));
        assert!(bad(|l| l.jitter = Duration::from_secs(3_600)).contains("jitter"));
        assert!(bad(|l| l.reap_every = Duration::MAX).contains("reap_every of"));
        assert!(bad(|l| l.max_lifetime = Some(Duration::MAX)).contains("max_lifetime of"));
        assert!(bad(|l| l.idle_timeout = Some(Duration::MAX)).contains("idle_timeout of"));
        assert!(Lifecycle::default().validate().is_ok());
    }
}
