//! A timeout that becomes the request's deadline, so every brisk call inside the handler (cache,
//! loader, pool checkout, Redis limiter) waits at most for what is left of it.
//!
//! ```
//! use std::time::Duration;
//! use brisk_core::deadline;
//! use brisk_guard::timeout::TimeoutLayer;
//! use brisk_guard::{BoxError, Refusal};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! # tokio::time::pause();
//! let mut svc = ServiceBuilder::new()
//!     .layer(TimeoutLayer::new(Duration::from_millis(100)))
//!     .service_fn(|_: ()| async {
//!         // The handler sees its budget, and so does everything it awaits.
//!         assert!(deadline::remaining().unwrap() <= Duration::from_millis(100));
//!         tokio::time::sleep(Duration::from_secs(1)).await;
//!         Ok::<_, BoxError>(())
//!     });
//!
//! let error = svc.ready().await?.call(()).await.unwrap_err();
//! assert!(matches!(error.downcast_ref::<Refusal>(), Some(Refusal::TimedOut(_))));
//! # Ok(())
//! # }
//! ```
//!
//! # Which bound wins
//!
//! The request gets the least of: the layer's timeout, the budget the caller sent (with the
//! `http` feature and [`TimeoutLayer::budget`]; a budget above the timeout is clamped to it), and
//! a deadline already in scope around the layer (an outer `TimeoutLayer`, say). The inner
//! service's future is polled inside [`deadline::scope`] with that
//! deadline. Work that the inner service does synchronously in `call` runs before the scope is
//! entered; tower services (axum handlers included) do theirs when polled.

#[cfg(feature = "http")]
mod budget;
mod future;
mod layer;

use std::task::{Context, Poll};
use std::time::Duration;

use brisk_core::deadline;
use brisk_metrics::Counter;
use brisk_metrics::catalog::{BUDGET_HEADERS, TIMEOUTS};
use tokio::time::Instant;
use tower_service::Service;

#[cfg(feature = "http")]
pub use self::budget::BudgetHeader;
pub use self::future::ResponseFuture;
pub use self::layer::TimeoutLayer;
use crate::TimeoutCause;
use crate::respond::{Errors, Respond};

/// Reads a request's own time budget. With `http`, [`BudgetHeader`] is one; [`NoBudget`] is
/// the default.
pub trait BudgetFn<Req>: Clone + Send + Sync + 'static {
    /// `None` if the request carries no budget, `Err(())` if it carries one that does not parse.
    #[allow(clippy::result_unit_err)]
    fn budget(&self, request: &Req) -> Option<Result<Duration, ()>>;
}

/// No budget is read: every request gets the layer's timeout.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoBudget;

impl<Req> BudgetFn<Req> for NoBudget {
    fn budget(&self, _: &Req) -> Option<Result<Duration, ()>> {
        None
    }
}

/// The counters of one layer, registered once.
#[derive(Debug)]
pub(crate) struct Counts {
    timeout: Counter,
    budget: Counter,
    deadline: Counter,
    used: Counter,
    clamped: Counter,
    malformed: Counter,
}

impl Counts {
    pub(crate) fn new(layer: &str) -> Self {
        let timeouts = |cause: &str| {
            TIMEOUTS.counter(&[("layer", layer.to_owned()), ("cause", cause.to_owned())])
        };
        let headers = |outcome: &str| {
            BUDGET_HEADERS.counter(&[("layer", layer.to_owned()), ("outcome", outcome.to_owned())])
        };
        Self {
            timeout: timeouts("timeout"),
            budget: timeouts("budget"),
            deadline: timeouts("deadline"),
            used: headers("used"),
            clamped: headers("clamped"),
            malformed: headers("malformed"),
        }
    }

    pub(crate) fn timed_out(&self, cause: TimeoutCause) {
        match cause {
            TimeoutCause::Timeout => &self.timeout,
            TimeoutCause::Budget => &self.budget,
            TimeoutCause::Deadline => &self.deadline,
        }
        .increment(1);
    }
}

/// The service of [`TimeoutLayer`].
#[derive(Debug, Clone)]
pub struct Timeout<S, B = NoBudget, R = Errors> {
    inner: S,
    timeout: Duration,
    budget: B,
    respond: R,
    counts: std::sync::Arc<Counts>,
}

impl<S, B, R> Timeout<S, B, R> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, Req, B, R> Service<Req> for Timeout<S, B, R>
where
    S: Service<Req>,
    B: BudgetFn<Req>,
    R: Respond<S::Response, S::Error>,
{
    type Response = S::Response;
    type Error = R::Error;
    type Future = ResponseFuture<S::Future, R>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner
            .poll_ready(cx)
            .map_err(|error| self.respond.error(error))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let mut allowed = self.timeout;
        let mut cause = TimeoutCause::Timeout;
        match self.budget.budget(&req) {
            None => {}
            Some(Err(())) => self.counts.malformed.increment(1),
            Some(Ok(budget)) if budget < allowed => {
                self.counts.used.increment(1);
                allowed = budget;
                cause = TimeoutCause::Budget;
            }
            Some(Ok(_)) => self.counts.clamped.increment(1),
        }
        let now = Instant::now();
        let mut until = now
            .checked_add(allowed)
            .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365 * 30));
        if let Some(outer) = deadline::current()
            && outer < until
        {
            until = outer;
            allowed = outer.saturating_duration_since(now);
            cause = TimeoutCause::Deadline;
        }
        ResponseFuture::new(
            deadline::scope(until, self.inner.call(req)),
            until,
            allowed,
            cause,
            self.respond.clone(),
            self.counts.clone(),
        )
    }
}
