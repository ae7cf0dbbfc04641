use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use brisk_core::deadline::Scope;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use super::Counts;
use crate::respond::Respond;
use crate::{Refusal, TimedOut, TimeoutCause};

pin_project! {
    /// The response future of [`Timeout`](super::Timeout).
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<F, R> {
        #[pin]
        inner: Scope<F>,
        #[pin]
        sleep: Sleep,
        allowed: Duration,
        cause: TimeoutCause,
        respond: R,
        counts: Arc<Counts>,
    }
}

impl<F, R> ResponseFuture<F, R> {
    pub(crate) fn new(
        inner: Scope<F>,
        until: Instant,
        allowed: Duration,
        cause: TimeoutCause,
        respond: R,
        counts: Arc<Counts>,
    ) -> Self {
        Self {
            inner,
            sleep: tokio::time::sleep_until(until),
            allowed,
            cause,
            respond,
            counts,
        }
    }
}

impl<F, T, E, R> Future for ResponseFuture<F, R>
where
    F: Future<Output = Result<T, E>>,
    R: Respond<T, E>,
{
    type Output = Result<T, R::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(result) = this.inner.poll(cx) {
            return Poll::Ready(result.map_err(|error| this.respond.error(error)));
        }
        std::task::ready!(this.sleep.poll(cx));
        this.counts.timed_out(*this.cause);
        Poll::Ready(this.respond.refuse(Refusal::TimedOut(TimedOut {
            after: *this.allowed,
            cause: *this.cause,
        })))
    }
}

impl<F, R> fmt::Debug for ResponseFuture<F, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("allowed", &self.allowed)
            .field("cause", &self.cause)
            .finish_non_exhaustive()
    }
}
