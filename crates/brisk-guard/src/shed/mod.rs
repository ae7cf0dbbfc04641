//! Load shedding: a concurrency limit that admits in `call` and refuses, rather than queues,
//! past a bound.
//!
//! ```
//! use std::time::Duration;
//! use brisk_guard::shed::ConcurrencyLimitLayer;
//! use brisk_guard::{BoxError, Refusal};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let layer = ConcurrencyLimitLayer::builder().max_in_flight(1).queue(0).build()?;
//! let mut svc = ServiceBuilder::new()
//!     .layer(layer)
//!     .service_fn(|_: ()| async {
//!         tokio::time::sleep(Duration::from_millis(10)).await;
//!         Ok::<_, BoxError>(())
//!     });
//!
//! let first = svc.ready().await?.call(()); // holds the one slot until it completes
//! let second = svc.ready().await?.call(()).await.unwrap_err();
//! assert!(matches!(second.downcast_ref::<Refusal>(), Some(Refusal::Overloaded(_))));
//! first.await?;
//! # Ok(())
//! # }
//! ```
//!
//! A request is admitted while fewer than the limit are in flight; otherwise it waits in a
//! queue of bounded length, at most [`queue_timeout`](ConcurrencyLimitLayerBuilder::queue_timeout)
//! and never past the deadline in scope (it leaves with [`Overloaded`]
//! then); a request that finds the queue full is refused at once. A slot is held until the
//! response future completes or is dropped. The limit is fixed, or follows latency
//! ([`AdaptiveLimit`]).

mod adaptive;
mod future;
mod layer;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use brisk_metrics::catalog::{SHED_LIMIT, SHED_REQUESTS};
use brisk_metrics::{Counter, Gauge};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tower_service::Service;

pub use self::adaptive::AdaptiveLimit;
use self::adaptive::Aimd;
pub use self::future::ResponseFuture;
use self::future::State;
pub use self::layer::{ConcurrencyLimitLayer, ConcurrencyLimitLayerBuilder};
use crate::Overloaded;
use crate::respond::{Errors, Respond};

/// What every clone of one layer shares.
#[derive(Debug)]
pub(crate) struct Shared {
    semaphore: Arc<Semaphore>,
    /// The limit now.
    limit: AtomicUsize,
    /// Slots to take out of circulation as they come back (a cut below what is in flight).
    debt: AtomicUsize,
    queued: AtomicUsize,
    queue: usize,
    queue_timeout: Duration,
    adaptive: Option<Mutex<Aimd>>,
    counts: Counts,
}

#[derive(Debug)]
struct Counts {
    admitted: Counter,
    queued: Counter,
    shed: Counter,
    expired: Counter,
    limit: Gauge,
}

impl Shared {
    pub(crate) fn new(
        name: &str,
        limit: usize,
        queue: usize,
        queue_timeout: Duration,
        adaptive: Option<Aimd>,
    ) -> Self {
        let count = |outcome: &str| {
            SHED_REQUESTS.counter(&[("layer", name.to_owned()), ("outcome", outcome.to_owned())])
        };
        let counts = Counts {
            admitted: count("admitted"),
            queued: count("queued"),
            shed: count("shed"),
            expired: count("expired"),
            limit: SHED_LIMIT.gauge(&[("layer", name.to_owned())]),
        };
        counts.limit.set(limit as f64);
        Self {
            semaphore: Arc::new(Semaphore::new(limit)),
            limit: AtomicUsize::new(limit),
            debt: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            queue,
            queue_timeout,
            adaptive: adaptive.map(Mutex::new),
            counts,
        }
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Slots held now, read off the semaphore: the slots in circulation (the limit, and the
    /// debt still held past a cut) less those free.
    fn in_flight(&self) -> usize {
        (self.limit() + self.debt.load(Ordering::Acquire))
            .saturating_sub(self.semaphore.available_permits())
    }

    fn overloaded(&self, waited: Option<Duration>) -> Overloaded {
        Overloaded {
            limit: self.limit(),
            waited,
        }
    }

    /// Moves the limit to `limit`: new slots at once, fewer as slots are free or come back.
    fn set_limit(&self, limit: usize) {
        let before = self.limit.swap(limit, Ordering::Relaxed);
        self.counts.limit.set(limit as f64);
        if limit > before {
            let mut grow = limit - before;
            // Pay back debt before adding slots.
            while grow > 0 {
                let debt = self.debt.load(Ordering::Acquire);
                if debt == 0 {
                    break;
                }
                let paid = debt.min(grow);
                if self
                    .debt
                    .compare_exchange(debt, debt - paid, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    grow -= paid;
                }
            }
            self.semaphore.add_permits(grow);
        } else {
            let shrink = before - limit;
            let taken = self.semaphore.forget_permits(shrink);
            self.debt.fetch_add(shrink - taken, Ordering::AcqRel);
        }
    }
}

/// A slot, given back (or taken out of circulation, if the limit was cut) when dropped.
#[derive(Debug)]
pub(crate) struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    shared: Arc<Shared>,
    /// When it was admitted; read only for an adaptive limit.
    started: Option<Instant>,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, shared: Arc<Shared>) -> Self {
        let started = shared.adaptive.is_some().then(Instant::now);
        Self {
            permit: Some(permit),
            shared,
            started,
        }
    }

    /// The request completed: its latency teaches an adaptive limit.
    pub(crate) fn completed(&self) {
        let (Some(adaptive), Some(started)) = (&self.shared.adaptive, self.started) else {
            return;
        };
        let in_flight = self.shared.in_flight();
        // No user code runs under this lock.
        let changed = adaptive
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .record(started.elapsed(), in_flight);
        if let Some(limit) = changed {
            self.shared.set_limit(limit);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        let owed = self
            .shared
            .debt
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| d.checked_sub(1));
        if owed.is_ok() {
            permit.forget();
        }
    }
}

/// The service of [`ConcurrencyLimitLayer`].
#[derive(Debug, Clone)]
pub struct ConcurrencyLimit<S, R = Errors> {
    inner: S,
    shared: Arc<Shared>,
    respond: R,
}

impl<S, R> ConcurrencyLimit<S, R> {
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

    /// The concurrency limit now.
    pub fn limit(&self) -> usize {
        self.shared.limit()
    }
}

impl<S, Req, R> Service<Req> for ConcurrencyLimit<S, R>
where
    S: Service<Req> + Clone,
    R: Respond<S::Response, S::Error>,
{
    type Response = S::Response;
    type Error = R::Error;
    type Future = ResponseFuture<S, Req, R>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner
            .poll_ready(cx)
            .map_err(|error| self.respond.error(error))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let shared = &self.shared;
        let state = match shared.semaphore.clone().try_acquire_owned() {
            Ok(permit) => {
                shared.counts.admitted.increment(1);
                State::Calling {
                    future: self.inner.call(req),
                    slot: Some(Slot::new(permit, shared.clone())),
                }
            }
            Err(_) if self.enqueue() => {
                let clone = self.inner.clone();
                State::queued(
                    shared.clone(),
                    req,
                    std::mem::replace(&mut self.inner, clone),
                )
            }
            Err(_) => {
                shared.counts.shed.increment(1);
                State::Refused {
                    refusal: Some(shared.overloaded(None).into()),
                }
            }
        };
        ResponseFuture::new(state, self.respond.clone())
    }
}

impl<S, R> ConcurrencyLimit<S, R> {
    /// Takes a place in the queue if there is one.
    fn enqueue(&self) -> bool {
        let shared = &self.shared;
        shared
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q < shared.queue).then_some(q + 1)
            })
            .is_ok()
    }
}
