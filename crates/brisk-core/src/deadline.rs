//! A request's remaining time budget, carried by the task that serves it.
//!
//! [`scope`] sets the deadline for everything a future awaits; [`remaining`] reads it anywhere
//! below; [`bounded`] runs a future for at most `min(timeout, remaining())` and says which of the
//! two bounds fired when it gives up.
//!
//! ```
//! use std::time::Duration;
//! use brisk_core::deadline::{self, Bound};
//! use tokio::time::Instant;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! # tokio::time::pause();
//! // The caller allows 10 ms; the operation's own timeout is one second: the budget wins.
//! let err = deadline::scope(Instant::now() + Duration::from_millis(10), async {
//!     deadline::bounded(Duration::from_secs(1), std::future::pending::<()>()).await
//! })
//! .await
//! .unwrap_err();
//! assert_eq!(err.bound(), Bound::Deadline);
//! # }
//! ```
//!
//! # Rules
//!
//! - No scope means no budget: [`remaining`] is `None` and [`bounded`] uses only its timeout.
//! - Nested scopes keep the earlier deadline: an inner scope can shorten the budget, never
//!   extend it.
//! - An expired budget is zero, not negative, and [`bounded`] fails at once without polling the
//!   future.
//! - The budget is task-local: [`tokio::spawn`] does not inherit it. Wrap the spawned future in
//!   `scope(deadline, …)` with [`current`] to carry it across.
//!
//! All times are [`tokio::time::Instant`], so tests can drive them with
//! `tokio::time::pause()` (tokio's `test-util` feature).

use std::fmt;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::task::futures::TaskLocalFuture;
use tokio::time::{Instant, Sleep};

tokio::task_local! {
    static DEADLINE: Instant;
}

/// Runs `future` with `deadline` as its budget; if a budget is already set where the scope is
/// first polled, the earlier one wins.
pub fn scope<F: IntoFuture>(deadline: Instant, future: F) -> Scope<F::IntoFuture> {
    Scope {
        deadline,
        future: Some(future.into_future()),
        inner: None,
    }
}

/// The deadline of the current task, if a [`scope`] set one.
#[must_use]
pub fn current() -> Option<Instant> {
    DEADLINE.try_with(|deadline| *deadline).ok()
}

/// The time left before the current deadline: `None` without a scope, zero once it has passed.
#[must_use]
pub fn remaining() -> Option<Duration> {
    current().map(|deadline| deadline.saturating_duration_since(Instant::now()))
}

/// Runs `future` for at most `min(timeout, remaining())`.
///
/// The bound is fixed when `bounded` is called. If it has already passed (an expired budget or a
/// zero timeout), the returned future fails on its first poll without polling `future`.
///
/// Without a deadline in scope, nothing reads the clock until `future` first has to wait, and
/// the timeout runs from then: a wait that does not wait costs neither a clock read nor a timer.
/// A `Duration::MAX` timeout means "only the deadline": without one in scope, no timer is made.
// Inlined so the wrapped future is built in place rather than copied in.
#[inline]
pub fn bounded<F: IntoFuture>(timeout: Duration, future: F) -> Bounded<F::IntoFuture> {
    let (until, bound, after) = match current() {
        None => (None, Bound::Timeout, timeout),
        Some(deadline) => {
            let now = Instant::now();
            let own = far_add(now, timeout);
            if deadline < own {
                let left = deadline.saturating_duration_since(now);
                (Some(deadline), Bound::Deadline, left)
            } else {
                (Some(own), Bound::Timeout, timeout)
            }
        }
    };
    Bounded {
        future: future.into_future(),
        until,
        sleep: None,
        elapsed: Elapsed { bound, after },
        expired: after.is_zero(),
    }
}

/// `now + timeout`, or about thirty years from now when that overflows (as tokio does): a
/// timeout too large to add is as good as none.
fn far_add(now: Instant, timeout: Duration) -> Instant {
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365 * 30))
}

pin_project! {
    /// The future returned by [`scope`].
    #[must_use = "futures do nothing unless polled"]
    pub struct Scope<F> {
        deadline: Instant,
        // Until the first poll: the outer budget is read there, not where the scope was built
        // (a scope built outside the outer one, then awaited inside it, must still see it).
        future: Option<F>,
        #[pin]
        inner: Option<TaskLocalFuture<Instant, F>>,
    }
}

impl<F: Future> Future for Scope<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Some(future) = this.future.take() {
            let effective = current().map_or(*this.deadline, |outer| outer.min(*this.deadline));
            this.inner.set(Some(DEADLINE.scope(effective, future)));
        }
        match this.inner.as_pin_mut() {
            Some(inner) => inner.poll(cx),
            None => unreachable!("the inner future is set on the first poll"),
        }
    }
}

impl<F> fmt::Debug for Scope<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scope").finish_non_exhaustive()
    }
}

pin_project! {
    /// The future returned by [`bounded`].
    ///
    /// Its timer is made only if the future is not ready on its first poll, so a wait that does
    /// not wait (a pool with a free connection, a cache hit) costs no timer at all.
    #[must_use = "futures do nothing unless polled"]
    pub struct Bounded<F> {
        #[pin]
        future: F,
        // `None`: no deadline; the timeout (`elapsed.after`) runs from the first wait.
        until: Option<Instant>,
        sleep: Option<Pin<Box<Sleep>>>,
        elapsed: Elapsed,
        expired: bool,
    }
}

impl<F: Future> Future for Bounded<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if *this.expired {
            return Poll::Ready(Err(*this.elapsed));
        }
        if let Poll::Ready(output) = this.future.poll(cx) {
            return Poll::Ready(Ok(output));
        }
        let (until, after) = (*this.until, this.elapsed.after);
        if until.is_none() && after == Duration::MAX {
            // No deadline and no timeout of its own (a loader waiting for its batch): nothing
            // can fire, so no timer — a thirty-year one would still cost a trip through
            // tokio's timer wheel per wait.
            return Poll::Pending;
        }
        let sleep = this.sleep.get_or_insert_with(|| {
            let until = until.unwrap_or_else(|| far_add(Instant::now(), after));
            Box::pin(tokio::time::sleep_until(until))
        });
        sleep.as_mut().poll(cx).map(|()| Err(*this.elapsed))
    }
}

impl<F> fmt::Debug for Bounded<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bounded")
            .field("bound", &self.elapsed.bound)
            .field("after", &self.elapsed.after)
            .finish_non_exhaustive()
    }
}

/// Which bound stopped a [`bounded`] wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Bound {
    /// The operation's own timeout was the shorter bound and it passed.
    Timeout,
    /// The caller's deadline (from [`scope`]) was the shorter bound and it passed.
    Deadline,
}

/// A [`bounded`] wait gave up: its timeout or the request's deadline passed first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.describe())]
pub struct Elapsed {
    bound: Bound,
    after: Duration,
}

impl Elapsed {
    /// Which bound fired.
    #[must_use]
    pub fn bound(&self) -> Bound {
        self.bound
    }

    /// How long the wait was allowed to take (zero when the budget was already spent).
    #[must_use]
    pub fn after(&self) -> Duration {
        self.after
    }

    /// True when the caller's deadline, not the operation's timeout, fired.
    #[must_use]
    pub fn is_deadline(&self) -> bool {
        self.bound == Bound::Deadline
    }

    fn describe(&self) -> String {
        match self.bound {
            Bound::Timeout => format!("timed out after {:?}", self.after),
            Bound::Deadline if self.after.is_zero() => {
                "request deadline exceeded: the budget was already spent".to_owned()
            }
            Bound::Deadline => format!(
                "request deadline exceeded: the wait was allowed {:?}, what the budget had left",
                self.after
            ),
        }
    }
}
