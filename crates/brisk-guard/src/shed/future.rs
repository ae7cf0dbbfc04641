use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use brisk_core::deadline;
use pin_project_lite::pin_project;
use tokio::sync::{AcquireError, OwnedSemaphorePermit};
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::{Shared, Slot};
use crate::Refusal;
use crate::respond::{Respond, refuse_once};

type Acquire = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

pin_project! {
    /// The response future of [`ConcurrencyLimit`](super::ConcurrencyLimit).
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<S: Service<Req>, Req, R> {
        #[pin]
        state: State<S, Req>,
        respond: R,
    }
}

pin_project! {
    #[project = StateProj]
    pub(crate) enum State<S: Service<Req>, Req> {
        Queued {
            acquire: Acquire,
            #[pin]
            sleep: Sleep,
            armed: bool,
            req: Option<Req>,
            inner: Option<S>,
            place: Place,
        },
        Calling {
            #[pin]
            future: S::Future,
            slot: Option<Slot>,
        },
        Refused {
            refusal: Option<Refusal>,
        },
    }
}

/// A place in the queue, given up when dropped (admitted, expired or cancelled alike).
#[derive(Debug)]
pub(crate) struct Place {
    shared: Arc<Shared>,
    since: Instant,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.shared.queued.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<S: Service<Req>, Req> State<S, Req> {
    /// A request waiting for a slot; its place is already counted in `shared.queued`.
    pub(crate) fn queued(shared: Arc<Shared>, req: Req, inner: S) -> Self {
        let since = Instant::now();
        Self::Queued {
            acquire: Box::pin(shared.semaphore.clone().acquire_owned()),
            sleep: tokio::time::sleep_until(since + shared.queue_timeout),
            armed: false,
            req: Some(req),
            inner: Some(inner),
            place: Place { shared, since },
        }
    }
}

impl<S: Service<Req>, Req, R> ResponseFuture<S, Req, R> {
    pub(crate) fn new(state: State<S, Req>, respond: R) -> Self {
        Self { state, respond }
    }
}

impl<S, Req, R> Future for ResponseFuture<S, Req, R>
where
    S: Service<Req>,
    R: Respond<S::Response, S::Error>,
{
    type Output = Result<S::Response, R::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Queued {
                    acquire,
                    mut sleep,
                    armed,
                    req,
                    inner,
                    place,
                } => {
                    if !*armed {
                        // The deadline is read here, inside the scope of an outer timeout,
                        // which `call` ran before entering.
                        *armed = true;
                        if let Some(until) = deadline::current()
                            && until < sleep.deadline()
                        {
                            sleep.as_mut().reset(until);
                        }
                    }
                    let next = match acquire.as_mut().poll(cx) {
                        Poll::Ready(Ok(permit)) => match (req.take(), inner.take()) {
                            (Some(req), Some(mut inner)) => {
                                place.shared.counts.queued.increment(1);
                                State::Calling {
                                    slot: Some(Slot::new(permit, place.shared.clone())),
                                    future: inner.call(req),
                                }
                            }
                            _ => unreachable!("a queued request is taken once"),
                        },
                        Poll::Pending if sleep.as_mut().poll(cx).is_pending() => {
                            return Poll::Pending;
                        }
                        // Its time ran out (or the semaphore closed, which it never is).
                        _ => {
                            place.shared.counts.expired.increment(1);
                            State::Refused {
                                refusal: Some(
                                    place.shared.overloaded(Some(place.since.elapsed())).into(),
                                ),
                            }
                        }
                    };
                    this.state.set(next);
                }
                StateProj::Calling { future, slot } => {
                    let result = std::task::ready!(future.poll(cx));
                    if let Some(slot) = slot.take() {
                        slot.completed();
                    }
                    return Poll::Ready(result.map_err(|error| this.respond.error(error)));
                }
                StateProj::Refused { refusal } => {
                    return Poll::Ready(refuse_once(this.respond, refusal));
                }
            }
        }
    }
}

impl<S: Service<Req>, Req, R> fmt::Debug for ResponseFuture<S, Req, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
