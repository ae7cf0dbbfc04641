//! What the layers refuse a request with, and what a bad setting is refused with.

use std::fmt;
use std::time::Duration;

use crate::ratelimit::{Decision, RateLimiter};

/// A request one of the layers refused.
///
/// With [`HttpResponses`](crate::HttpResponses) a refusal becomes a response (429, 503 or 504
/// with its headers) and the service keeps its own error type (axum's `Infallible`). Otherwise
/// it is the service's error, boxed as tower's layers do: `error.downcast_ref::<Refusal>()`.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The caller is over one of its quotas.
    #[error(transparent)]
    RateLimited(#[from] RateLimited),
    /// The request ran out of time.
    #[error(transparent)]
    TimedOut(#[from] TimedOut),
    /// Too many requests in flight: this one was shed.
    #[error(transparent)]
    Overloaded(#[from] Overloaded),
}

/// The caller is over a quota; it may try again after [`retry_after`](Self::retry_after).
#[derive(Debug, Clone)]
pub struct RateLimited {
    pub(crate) decision: Decision,
    /// For the headers of the tier's policy.
    pub(crate) limiter: RateLimiter,
}

impl RateLimited {
    /// How long until the request would be admitted.
    #[must_use]
    pub fn retry_after(&self) -> Duration {
        self.decision.retry_after()
    }

    /// The name of the tier whose quota refused the request.
    #[must_use]
    pub fn tier(&self) -> &str {
        self.limiter.tier_name(self.decision.tier())
    }

    /// The whole decision: every quota's remaining units and reset time.
    #[must_use]
    pub fn decision(&self) -> &Decision {
        &self.decision
    }
}

impl fmt::Display for RateLimited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.decision.failed() {
            write!(
                f,
                "rate limited: the limiter's store failed and the policy is fail-closed"
            )
        } else {
            write!(f, "rate limited: retry after {:?}", self.retry_after())
        }
    }
}

impl std::error::Error for RateLimited {}

/// The request did not finish within its time.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", describe_timeout(self))]
pub struct TimedOut {
    pub(crate) after: Duration,
    pub(crate) cause: TimeoutCause,
}

/// Which bound a [`TimedOut`] request ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TimeoutCause {
    /// The layer's own timeout.
    Timeout,
    /// The budget the caller sent in a header (clamped to the layer's timeout).
    Budget,
    /// A deadline already in scope around the layer (an outer layer's, or the caller's).
    Deadline,
}

impl TimedOut {
    /// How long the request was allowed.
    #[must_use]
    pub fn after(&self) -> Duration {
        self.after
    }

    /// Which bound fired.
    #[must_use]
    pub fn cause(&self) -> TimeoutCause {
        self.cause
    }
}

fn describe_timeout(t: &TimedOut) -> String {
    match t.cause {
        TimeoutCause::Timeout => format!("timed out: the layer's timeout of {:?} passed", t.after),
        TimeoutCause::Budget => {
            format!(
                "timed out: the caller's budget of {:?} (from its header) ran out",
                t.after
            )
        }
        TimeoutCause::Deadline => {
            format!(
                "timed out: the deadline in scope ({:?} away) passed",
                t.after
            )
        }
    }
}

/// The request was shed: in flight and queued requests were at their bounds, or it waited in the
/// queue until its time ran out.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", describe_overload(self))]
pub struct Overloaded {
    pub(crate) limit: usize,
    pub(crate) waited: Option<Duration>,
}

impl Overloaded {
    /// The concurrency limit when the request was shed.
    #[must_use]
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// How long it waited in the queue, if it was queued at all.
    #[must_use]
    pub fn waited(&self) -> Option<Duration> {
        self.waited
    }
}

fn describe_overload(o: &Overloaded) -> String {
    match o.waited {
        None => format!(
            "overloaded: {} requests in flight and the queue full",
            o.limit
        ),
        Some(waited) => format!(
            "overloaded: waited {waited:?} in the queue (limit {}) until its time ran out",
            o.limit
        ),
    }
}

/// A setting [`build`](crate::ratelimit::RateLimiterBuilder::build) refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// A quota cannot be enforced as given.
    #[error("invalid quota {quota}: {reason}")]
    Quota {
        /// The quota, as written.
        quota: String,
        /// Why not.
        reason: &'static str,
    },
    /// Another setting is out of range.
    #[error("invalid {setting}: {reason}")]
    Setting {
        /// Which setting.
        setting: &'static str,
        /// Why not.
        reason: String,
    },
}

impl BuildError {
    pub(crate) fn setting(setting: &'static str, reason: impl Into<String>) -> Self {
        Self::Setting {
            setting,
            reason: reason.into(),
        }
    }
}
