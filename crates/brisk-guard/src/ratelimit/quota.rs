//! Quotas, the tiers that group them, and the GCRA step that enforces one.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::BuildError;

/// 100 years in microseconds: the longest a quota may take to refill.
const MAX_CAPACITY_US: u64 = 100 * 365 * 86_400 * 1_000_000;

/// At most this many quotas in one tier: a check holds every quota's state inline.
pub const MAX_QUOTAS: usize = 4;

/// `limit` requests per `period`, of which up to `burst` may come at once.
///
/// GCRA (the generic cell rate algorithm) enforces it: a key's capacity refills continuously,
/// one unit every `period / limit`, up to `burst` units. The default burst is the whole limit:
/// `Quota::per_second(20)` admits 20 at once, then one every 50 ms.
///
/// ```
/// use std::time::Duration;
/// use brisk_guard::ratelimit::Quota;
///
/// let steady = Quota::per_second(20).burst(5); // 20/s, at most 5 at once
/// let daily = Quota::per_day(10_000).named("daily");
/// let odd = Quota::new(3, Duration::from_secs(10)); // 3 every 10 s
/// # let _ = (steady, daily, odd);
/// ```
///
/// Counts are unsigned, so a negative quota cannot be written; zero limits, zero bursts, zero
/// periods, rates finer than one unit per microsecond (or, below 100 µs per unit, not a whole
/// number of microseconds per unit) and quotas that take more than 100 years to refill are
/// refused when the limiter is built.
#[derive(Clone, PartialEq, Eq)]
pub struct Quota {
    pub(crate) limit: u32,
    pub(crate) period: Duration,
    pub(crate) burst: Option<u32>,
    pub(crate) name: Option<Arc<str>>,
}

impl Quota {
    /// `limit` per `period`.
    #[must_use]
    pub fn new(limit: u32, period: Duration) -> Self {
        Self {
            limit,
            period,
            burst: None,
            name: None,
        }
    }

    /// `limit` per second.
    #[must_use]
    pub fn per_second(limit: u32) -> Self {
        Self::new(limit, Duration::from_secs(1))
    }

    /// `limit` per minute.
    #[must_use]
    pub fn per_minute(limit: u32) -> Self {
        Self::new(limit, Duration::from_secs(60))
    }

    /// `limit` per hour.
    #[must_use]
    pub fn per_hour(limit: u32) -> Self {
        Self::new(limit, Duration::from_secs(3_600))
    }

    /// `limit` per day.
    #[must_use]
    pub fn per_day(limit: u32) -> Self {
        Self::new(limit, Duration::from_secs(86_400))
    }

    /// At most `burst` at once (default: the whole limit).
    #[must_use]
    pub fn burst(mut self, burst: u32) -> Self {
        self.burst = Some(burst);
        self
    }

    /// The quota's name in the `RateLimit-Policy` and `RateLimit` headers (default:
    /// `<tier>-<limit>-per-<seconds>s`).
    #[must_use]
    pub fn named(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Checks the quota and works out its GCRA rule.
    pub(crate) fn rule(&self, tier: &str) -> Result<Rule, BuildError> {
        let refuse = |reason| BuildError::Quota {
            quota: format!("{self:?}"),
            reason,
        };
        if self.limit == 0 {
            return Err(refuse("the limit is zero: no request could ever pass"));
        }
        if self.period.is_zero() {
            return Err(refuse("the period is zero"));
        }
        let burst = self.burst.unwrap_or(self.limit);
        if burst == 0 {
            return Err(refuse("the burst is zero: no request could ever pass"));
        }
        let period_us = u64::try_from(self.period.as_micros()).unwrap_or(u64::MAX);
        let interval = period_us / u64::from(self.limit);
        if interval == 0 {
            return Err(refuse("more than one request per microsecond"));
        }
        // Times are whole microseconds: a unit's interval rounded down must stay within 1% of
        // the rate asked for (400,000/s would be 2.5 µs, enforced as 2 µs: 500,000/s).
        if interval < 100 && period_us % u64::from(self.limit) != 0 {
            return Err(refuse(
                "the interval between units is not a whole number of microseconds \
                 (below 100 µs it must be, to keep the rate within 1%)",
            ));
        }
        // Every time stays far inside what Redis's Lua numbers hold exactly (2^53 µs).
        let capacity = interval
            .checked_mul(u64::from(burst))
            .filter(|c| *c <= MAX_CAPACITY_US)
            .ok_or_else(|| refuse("burst × period / limit is longer than 100 years"))?;
        let name = match &self.name {
            Some(name) => name.clone(),
            None => format!("{tier}-{}-per-{}s", self.limit, self.window_secs()).into(),
        };
        if name.is_empty()
            || name
                .chars()
                .any(|c| c == '"' || c == '\\' || !c.is_ascii_graphic())
        {
            return Err(refuse(
                "a name must be visible ASCII without quotes or backslashes",
            ));
        }
        Ok(Rule {
            interval,
            capacity,
            limit: self.limit,
            burst,
            window: self.window_secs(),
            name,
        })
    }

    /// The policy window in whole seconds, as the `w` parameter of `RateLimit-Policy` needs.
    fn window_secs(&self) -> u64 {
        self.period.as_secs().max(1)
    }
}

impl fmt::Debug for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} per {:?}", self.limit, self.period)?;
        if let Some(burst) = self.burst {
            write!(f, " (burst {burst})")?;
        }
        if let Some(name) = &self.name {
            write!(f, " named {name:?}")?;
        }
        Ok(())
    }
}

/// A named group of quotas, all checked in one step: a request passes only if every quota has
/// room, and only then is it counted against all of them.
///
/// ```
/// use brisk_guard::ratelimit::{Quota, Tier};
///
/// let premium = Tier::new("premium")
///     .quota(Quota::per_second(100).burst(200))
///     .quota(Quota::per_day(1_000_000));
/// # let _ = premium;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tier {
    pub(crate) name: Arc<str>,
    pub(crate) quotas: Vec<Quota>,
}

impl Tier {
    /// A tier without quotas yet.
    #[must_use]
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        Self {
            name: name.into(),
            quotas: Vec::new(),
        }
    }

    /// Adds a quota (at most [`MAX_QUOTAS`]).
    #[must_use]
    pub fn quota(mut self, quota: Quota) -> Self {
        self.quotas.push(quota);
        self
    }
}

/// A quota in the units a check works in: microseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rule {
    /// Time one unit takes to refill.
    pub(crate) interval: u64,
    /// `burst × interval`: how far ahead of now the theoretical arrival time may run.
    pub(crate) capacity: u64,
    pub(crate) limit: u32,
    pub(crate) burst: u32,
    pub(crate) window: u64,
    pub(crate) name: Arc<str>,
}

/// One GCRA step for one quota.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Step {
    pub(crate) allowed: bool,
    /// The theoretical arrival time to store if every quota allows.
    pub(crate) tat: u64,
    /// Units left after this request (0 when refused).
    pub(crate) remaining: u64,
    /// Microseconds until the quota is full again.
    pub(crate) reset: u64,
    /// Microseconds until this request would pass (0 when allowed).
    pub(crate) retry_after: u64,
    /// Microseconds until the quota was full, before this request.
    pub(crate) reset_before: u64,
}

impl Rule {
    /// Where a key's stored theoretical arrival time `tat` (0 for a key never seen) leads at
    /// `now`. A `tat` at or before `now` is a full quota, so a state that has expired is the
    /// same as no state: that is what lets a store forget idle keys without changing a decision.
    pub(crate) fn step(&self, tat: u64, now: u64) -> Step {
        let start = tat.max(now);
        let next = start.saturating_add(self.interval);
        let ahead = next - now;
        if ahead <= self.capacity {
            Step {
                allowed: true,
                tat: next,
                remaining: (self.capacity - ahead) / self.interval,
                reset: ahead,
                retry_after: 0,
                reset_before: start - now,
            }
        } else {
            Step {
                allowed: false,
                tat: start,
                remaining: 0,
                reset: start - now,
                retry_after: ahead - self.capacity,
                reset_before: start - now,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(quota: &Quota) -> Rule {
        quota.rule("t").unwrap()
    }

    #[test]
    fn a_burst_then_one_per_interval() {
        let r = rule(&Quota::per_second(10).burst(3));
        let mut tat = 0;
        let now = 1_000_000;
        for left in [2, 1, 0] {
            let s = r.step(tat, now);
            assert!(s.allowed);
            assert_eq!(s.remaining, left);
            tat = s.tat;
        }
        let refused = r.step(tat, now);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after, 100_000, "one unit refills in 100 ms");
        assert_eq!(refused.reset, 300_000, "the whole burst refills in 300 ms");
        assert!(!r.step(tat, now + 99_999).allowed);
        assert!(r.step(tat, now + 100_000).allowed);
    }

    #[test]
    fn refused_rules_say_why() {
        for quota in [
            Quota::per_second(0),
            Quota::new(1, Duration::ZERO),
            Quota::per_second(5).burst(0),
            Quota::per_second(2_000_000),
            Quota::per_second(400_000),
            Quota::new(1, Duration::MAX),
            Quota::per_day(1).burst(100_000),
            Quota::per_second(1).named("has \"quotes\""),
            Quota::per_second(1).named(""),
        ] {
            assert!(
                matches!(quota.rule("t"), Err(BuildError::Quota { .. })),
                "{quota:?}"
            );
        }
    }

    #[test]
    fn default_names_say_the_quota() {
        assert_eq!(&*rule(&Quota::per_minute(30)).name, "t-30-per-60s");
    }
}
