//! The rate limiter: tiers of quotas over a local or Redis store, and the decisions it makes.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use brisk_metrics::Counter;
use brisk_metrics::catalog::RATELIMIT_DECISIONS;
use foldhash::fast::FixedState;

use super::local::{LocalStore, MIN_ENTRIES};
use super::quota::{MAX_QUOTAS, Quota, Rule, Step, Tier};
use crate::BuildError;

/// Decides whether a key may make one more request, under the quotas of its tier.
///
/// Clones share one state, so a limiter cloned into every worker thread and every layer
/// enforces one limit. Build it with [`RateLimiter::builder`].
///
/// ```
/// use brisk_guard::ratelimit::{Quota, RateLimiter};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), brisk_guard::BuildError> {
/// # tokio::time::pause(); // exact times: no real time passes between the checks
/// let limiter = RateLimiter::builder("login").quota(Quota::per_minute(5)).build()?;
/// for _ in 0..5 {
///     assert!(limiter.check("alice@example.com").await.is_allowed());
/// }
/// let refused = limiter.check("alice@example.com").await;
/// assert!(!refused.is_allowed());
/// assert_eq!(refused.retry_after().as_secs(), 12); // one unit refills every 12 s
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RateLimiter {
    inner: Arc<Inner>,
}

struct Inner {
    name: Arc<str>,
    tiers: Vec<Policy>,
    by_name: HashMap<Arc<str>, usize, FixedState>,
    default_tier: usize,
    store: Store,
    shadow: bool,
    counts: Counts,
}

/// A tier as checks use it.
#[derive(Debug)]
pub(crate) struct Policy {
    pub(crate) name: Arc<str>,
    pub(crate) rules: Vec<Rule>,
    #[cfg(feature = "http")]
    pub(crate) fields: crate::http::PolicyFields,
}

enum Store {
    Local(LocalStore),
    #[cfg(feature = "redis")]
    Redis(super::redis::Remote),
}

/// The decision counters, registered once.
struct Counts {
    allowed: Counter,
    rejected: Counter,
    shadow_rejected: Counter,
    failed_open: Counter,
    failed_closed: Counter,
}

impl Counts {
    fn new(limiter: &str) -> Self {
        let counter = |decision: &'static str| {
            RATELIMIT_DECISIONS.counter(&[
                ("limiter", limiter.to_owned()),
                ("decision", decision.to_owned()),
            ])
        };
        Self {
            allowed: counter("allowed"),
            rejected: counter("rejected"),
            shadow_rejected: counter("shadow_rejected"),
            failed_open: counter("failed_open"),
            failed_closed: counter("failed_closed"),
        }
    }

    fn count(&self, outcome: Outcome) {
        match outcome {
            Outcome::Allowed => &self.allowed,
            Outcome::Rejected => &self.rejected,
            Outcome::ShadowRejected => &self.shadow_rejected,
            Outcome::FailedOpen => &self.failed_open,
            Outcome::FailedClosed => &self.failed_closed,
        }
        .increment(1);
    }
}

/// What a check decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Every quota had room: counted.
    Allowed,
    /// A quota had no room.
    Rejected,
    /// A quota had no room, but the limiter is in shadow mode: counted as a rejection in the
    /// metrics and let through.
    ShadowRejected,
    /// The store failed (Redis down or slow) and the policy is fail-open: let through.
    FailedOpen,
    /// The store failed and the policy is fail-closed: refused.
    FailedClosed,
}

/// One quota's state after a check.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuotaState {
    remaining: u64,
    reset_us: u64,
}

impl QuotaState {
    /// Units left.
    #[must_use]
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// Time until the quota is full again.
    #[must_use]
    pub fn reset(&self) -> Duration {
        Duration::from_micros(self.reset_us)
    }
}

/// The result of [`RateLimiter::check`].
#[derive(Debug, Clone)]
pub struct Decision {
    outcome: Outcome,
    retry_after_us: u64,
    tier: u16,
    len: u8,
    quotas: [QuotaState; MAX_QUOTAS],
}

impl Decision {
    /// Whether the request may go ahead (also true in shadow mode and when failing open).
    #[must_use]
    pub fn is_allowed(&self) -> bool {
        matches!(
            self.outcome,
            Outcome::Allowed | Outcome::ShadowRejected | Outcome::FailedOpen
        )
    }

    /// What was decided, and why.
    #[must_use]
    pub fn outcome(&self) -> Outcome {
        self.outcome
    }

    /// How long until the request would have been admitted (zero if it was).
    #[must_use]
    pub fn retry_after(&self) -> Duration {
        Duration::from_micros(self.retry_after_us)
    }

    /// Every quota of the tier, in the order the tier lists them (empty if the store failed).
    #[must_use]
    pub fn quotas(&self) -> &[QuotaState] {
        &self.quotas[..usize::from(self.len)]
    }

    pub(crate) fn tier(&self) -> usize {
        usize::from(self.tier)
    }

    pub(crate) fn failed(&self) -> bool {
        matches!(self.outcome, Outcome::FailedOpen | Outcome::FailedClosed)
    }

    pub(crate) fn from_steps(tier: usize, steps: &[Step], allowed: bool, shadow: bool) -> Self {
        let mut quotas = [QuotaState::default(); MAX_QUOTAS];
        let mut retry_after_us = 0;
        for (state, step) in quotas.iter_mut().zip(steps) {
            // A quota that had room, in a check another quota refused, was not counted: it
            // shows the unit it still has.
            let uncounted = !allowed && step.allowed;
            *state = QuotaState {
                remaining: step.remaining + u64::from(uncounted),
                reset_us: if uncounted {
                    step.reset_before
                } else {
                    step.reset
                },
            };
            retry_after_us = retry_after_us.max(step.retry_after);
        }
        let outcome = match (allowed, shadow) {
            (true, _) => Outcome::Allowed,
            (false, false) => Outcome::Rejected,
            (false, true) => Outcome::ShadowRejected,
        };
        Self {
            outcome,
            retry_after_us,
            // The builder refuses more than u16::MAX tiers and MAX_QUOTAS quotas.
            tier: u16::try_from(tier).unwrap_or(u16::MAX),
            len: u8::try_from(steps.len()).unwrap_or(u8::MAX),
            quotas,
        }
    }

    #[cfg(feature = "redis")]
    pub(crate) fn failure(tier: usize, fail_open: bool, retry_after: Duration) -> Self {
        Self {
            outcome: if fail_open {
                Outcome::FailedOpen
            } else {
                Outcome::FailedClosed
            },
            retry_after_us: if fail_open {
                0
            } else {
                u64::try_from(retry_after.as_micros()).unwrap_or(u64::MAX)
            },
            tier: u16::try_from(tier).unwrap_or(u16::MAX),
            len: 0,
            quotas: [QuotaState::default(); MAX_QUOTAS],
        }
    }
}

impl RateLimiter {
    /// A builder for a limiter named `name` (the `limiter` label of its metrics and, with
    /// Redis, part of its keys).
    pub fn builder(name: impl Into<Arc<str>>) -> RateLimiterBuilder {
        RateLimiterBuilder {
            name: name.into(),
            tiers: Vec::new(),
            default_tier: None,
            max_keys: 100_000,
            shadow: false,
            #[cfg(feature = "redis")]
            redis: None,
        }
    }

    /// Checks one request of `key` in the default tier.
    ///
    /// With the local store the decision is made before this returns; the future is ready on
    /// its first poll. With Redis it is one round trip, bounded by the Redis timeout and the
    /// deadline in scope.
    pub fn check(&self, key: &str) -> Check {
        self.check_in(self.inner.default_tier, key)
    }

    /// Checks one request of `key` in the tier named `tier`; an unknown name is the default
    /// tier.
    pub fn check_tier(&self, tier: &str, key: &str) -> Check {
        self.check_in(self.tier_index(tier), key)
    }

    pub(crate) fn default_index(&self) -> usize {
        self.inner.default_tier
    }

    pub(crate) fn tier_index(&self, tier: &str) -> usize {
        self.inner
            .by_name
            .get(tier)
            .copied()
            .unwrap_or(self.inner.default_tier)
    }

    /// The decision for one request of `key` in the default tier, if the store can make it
    /// without waiting: always with the local store (this is [`check`](Self::check) without
    /// the future, for synchronous code), never with Redis (`None`: nothing was counted).
    #[must_use]
    pub fn check_now(&self, key: &str) -> Option<Decision> {
        self.check_now_in(self.inner.default_tier, key)
    }

    pub(crate) fn check_now_in(&self, tier: usize, key: &str) -> Option<Decision> {
        let inner = &self.inner;
        let Store::Local(store) = &inner.store else {
            return None;
        };
        let rules = &inner.tiers[tier].rules;
        let mut steps = [Step::default(); MAX_QUOTAS];
        let allowed = store.check(tier, rules, key, &mut steps);
        let decision = Decision::from_steps(tier, &steps[..rules.len()], allowed, inner.shadow);
        inner.counts.count(decision.outcome);
        Some(decision)
    }

    pub(crate) fn check_in(&self, tier: usize, key: &str) -> Check {
        let inner = &self.inner;
        match &inner.store {
            Store::Local(_) => Check(Checking::Ready(self.check_now_in(tier, key))),
            #[cfg(feature = "redis")]
            Store::Redis(remote) => {
                let limiter = self.clone();
                let check = remote.check(&inner.name, &inner.tiers[tier], key);
                Check(Checking::Remote(Box::pin(async move {
                    let inner = &limiter.inner;
                    let decision = match check.await {
                        Ok((steps, allowed)) => Decision::from_steps(
                            tier,
                            &steps[..inner.tiers[tier].rules.len()],
                            allowed,
                            inner.shadow,
                        ),
                        Err(failure) => failure.decision(tier),
                    };
                    inner.counts.count(decision.outcome);
                    decision
                })))
            }
        }
    }

    /// Whether the limiter is in shadow mode (deciding and counting, never refusing).
    #[must_use]
    pub fn is_shadow(&self) -> bool {
        self.inner.shadow
    }

    /// The limiter's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Entries the local store holds now (one per key and quota; 0 with Redis).
    #[must_use]
    pub fn local_entries(&self) -> usize {
        match &self.inner.store {
            Store::Local(store) => store.len(),
            #[cfg(feature = "redis")]
            Store::Redis(_) => 0,
        }
    }

    pub(crate) fn tier_name(&self, tier: usize) -> &str {
        &self.inner.tiers[tier].name
    }

    #[cfg(feature = "http")]
    pub(crate) fn fields(&self, tier: usize) -> &crate::http::PolicyFields {
        &self.inner.tiers[tier].fields
    }
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &self.inner;
        f.debug_struct("RateLimiter")
            .field("name", &inner.name)
            .field("tiers", &inner.tiers)
            .field("shadow", &inner.shadow)
            .field(
                "store",
                &match inner.store {
                    Store::Local(_) => "local",
                    #[cfg(feature = "redis")]
                    Store::Redis(_) => "redis",
                },
            )
            .finish_non_exhaustive()
    }
}

/// The future of [`RateLimiter::check`].
#[must_use = "futures do nothing unless polled"]
pub struct Check(Checking);

enum Checking {
    Ready(Option<Decision>),
    #[cfg(feature = "redis")]
    Remote(Pin<Box<dyn Future<Output = Decision> + Send>>),
}

impl Future for Check {
    type Output = Decision;

    #[cfg_attr(not(feature = "redis"), expect(unused_variables))]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Decision> {
        match &mut self.0 {
            Checking::Ready(decision) => Poll::Ready(
                decision
                    .take()
                    .expect("a Check is not polled after it completed"),
            ),
            #[cfg(feature = "redis")]
            Checking::Remote(future) => future.as_mut().poll(cx),
        }
    }
}

impl fmt::Debug for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Check").finish_non_exhaustive()
    }
}

/// Settings of a [`RateLimiter`], checked by [`build`](Self::build).
#[must_use]
pub struct RateLimiterBuilder {
    name: Arc<str>,
    tiers: Vec<Tier>,
    default_tier: Option<Arc<str>>,
    max_keys: usize,
    shadow: bool,
    #[cfg(feature = "redis")]
    redis: Option<super::redis::RemoteConfig>,
}

impl fmt::Debug for RateLimiterBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiterBuilder")
            .field("name", &self.name)
            .field("tiers", &self.tiers)
            .field("max_keys", &self.max_keys)
            .field("shadow", &self.shadow)
            .finish_non_exhaustive()
    }
}

impl RateLimiterBuilder {
    /// Adds a quota to the tier named `default`.
    pub fn quota(mut self, quota: Quota) -> Self {
        match self.tiers.iter_mut().find(|t| &*t.name == "default") {
            Some(tier) => tier.quotas.push(quota),
            None => self.tiers.push(Tier::new("default").quota(quota)),
        }
        self
    }

    /// Adds a tier. Requests go to the default tier unless a tier resolver (or
    /// [`RateLimiter::check_tier`]) names another.
    pub fn tier(mut self, tier: Tier) -> Self {
        self.tiers.push(tier);
        self
    }

    /// Which tier a request without a known tier is checked in (default: the first tier added).
    pub fn default_tier(mut self, name: impl Into<Arc<str>>) -> Self {
        self.default_tier = Some(name.into());
        self
    }

    /// The bound of the local store, in entries (one per key and quota; default 100,000, about
    /// 2 MB). When it is full, entries whose quota has refilled are forgotten first (which
    /// changes no decision), then those not refused lately, nearest to full first.
    pub fn max_keys(mut self, max: usize) -> Self {
        self.max_keys = max;
        self
    }

    /// Shadow mode: decide and count as usual, never refuse (and send no rate-limit headers),
    /// so a new limit can be watched on real traffic before it is enforced.
    pub fn shadow(mut self, shadow: bool) -> Self {
        self.shadow = shadow;
        self
    }

    #[cfg(feature = "redis")]
    pub(crate) fn remote(mut self, config: super::redis::RemoteConfig) -> Self {
        self.redis = Some(config);
        self
    }

    /// Checks every setting and builds the limiter.
    ///
    /// # Errors
    /// [`BuildError`] for: no tier or a tier without quotas, more than [`MAX_QUOTAS`] quotas in a
    /// tier, a refused [`Quota`], two tiers or two quotas of a tier with one name, an unknown
    /// default tier, an empty name or one with `{`, `}` or spaces, or `max_keys` below 16.
    pub fn build(self) -> Result<RateLimiter, BuildError> {
        let name = self.name;
        if name.is_empty()
            || name
                .chars()
                .any(|c| c == '{' || c == '}' || !c.is_ascii_graphic())
        {
            return Err(BuildError::setting(
                "limiter name",
                format!("{name:?} must be visible ASCII without braces"),
            ));
        }
        if self.tiers.is_empty() {
            return Err(BuildError::setting(
                "tiers",
                "a limiter needs at least one quota",
            ));
        }
        if u16::try_from(self.tiers.len()).is_err() {
            return Err(BuildError::setting("tiers", "more than 65,535 tiers"));
        }
        if self.max_keys < MIN_ENTRIES {
            return Err(BuildError::setting(
                "max_keys",
                format!("{} is below the least of {MIN_ENTRIES}", self.max_keys),
            ));
        }
        let mut tiers = Vec::with_capacity(self.tiers.len());
        let mut by_name = HashMap::with_hasher(FixedState::default());
        for (index, tier) in self.tiers.iter().enumerate() {
            if tier.quotas.is_empty() || tier.quotas.len() > MAX_QUOTAS {
                return Err(BuildError::setting(
                    "tier",
                    format!(
                        "{:?} has {} quotas; a tier takes 1 to {MAX_QUOTAS}",
                        tier.name,
                        tier.quotas.len()
                    ),
                ));
            }
            let rules = tier
                .quotas
                .iter()
                .map(|q| q.rule(&tier.name))
                .collect::<Result<Vec<_>, _>>()?;
            for (i, rule) in rules.iter().enumerate() {
                if rules[..i].iter().any(|r| r.name == rule.name) {
                    return Err(BuildError::setting(
                        "tier",
                        format!("{:?} has two quotas named {:?}", tier.name, rule.name),
                    ));
                }
            }
            if by_name.insert(tier.name.clone(), index).is_some() {
                return Err(BuildError::setting(
                    "tier",
                    format!("two tiers are named {:?}", tier.name),
                ));
            }
            tiers.push(Policy {
                name: tier.name.clone(),
                #[cfg(feature = "http")]
                fields: crate::http::PolicyFields::new(&rules),
                rules,
            });
        }
        let default_tier = match &self.default_tier {
            None => 0,
            Some(wanted) => *by_name.get(wanted).ok_or_else(|| {
                BuildError::setting("default tier", format!("no tier is named {wanted:?}"))
            })?,
        };
        #[cfg(feature = "redis")]
        let store = match self.redis {
            Some(config) => Store::Redis(config.build()?),
            None => Store::Local(LocalStore::new(self.max_keys, tiers.len())),
        };
        #[cfg(not(feature = "redis"))]
        let store = Store::Local(LocalStore::new(self.max_keys, tiers.len()));
        Ok(RateLimiter {
            inner: Arc::new(Inner {
                counts: Counts::new(&name),
                name,
                tiers,
                by_name,
                default_tier,
                store,
                shadow: self.shadow,
            }),
        })
    }
}
