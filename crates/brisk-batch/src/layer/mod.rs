//! Batch single requests into calls of a bulk service: `Service<Vec<Req>, Response =
//! Vec<Resp>>` becomes `Service<Req, Response = Resp>`, with the engine the
//! [`Loader`](crate::Loader) uses (size cap, window, concurrency limit, deadlines).
//!
//! ```
//! use brisk_batch::layer::BatchLayer;
//! use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A bulk endpoint: one round trip for many inserts.
//! let bulk = service_fn(|rows: Vec<String>| async move {
//!     Ok::<_, std::io::Error>(rows.iter().map(|row| row.len()).collect::<Vec<_>>())
//! });
//! let svc = ServiceBuilder::new().layer(BatchLayer::new()).service(bulk);
//! let (a, b) = tokio::join!(svc.clone().oneshot("ab".to_owned()), svc.clone().oneshot("abc".to_owned()));
//! assert_eq!((a?, b?), (2, 3)); // one call of `bulk` with both rows
//! # Ok(())
//! # }
//! ```
//!
//! Response `i` answers request `i`; a response vector of the wrong length fails every request
//! of that batch with [`BatchError::WrongLength`]. Requests are admitted in `call` (`poll_ready`
//! is always ready) and batches beyond `max_queued_batches` fail with
//! [`BatchError::Overloaded`]. The service is `Clone` over shared state: clones feed the same
//! batches. Each batch calls a clone of the inner service, so the inner service must be
//! `Clone` (wrap it in `tower::buffer::Buffer` if it is not).

mod error;
mod future;
#[allow(clippy::module_inception)] // tower's layout: a middleware's layer lives in layer.rs
mod layer;

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_util::future::{BoxFuture, FutureExt};
use tokio::sync::Semaphore;
use tower_service::Service;

pub use self::error::BatchError;
pub use self::future::ResponseFuture;
pub use self::layer::{BatchLayer, BatchLayerBuilder};
use crate::engine::{self, Abandoned, Limits, Owner, Queued, Settings, Wait, lock, panic_message};

/// What [`Batch`] needs of the service it batches into, named once: a cloneable bulk service
/// whose future and error can cross threads. Every such service has it.
pub trait BulkService<Req, Resp>:
    Service<Vec<Req>, Response = Vec<Resp>, Future: Send, Error: Send + Sync + 'static>
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S, Req, Resp> BulkService<Req, Resp> for S where
    S: Service<Vec<Req>, Response = Vec<Resp>, Future: Send, Error: Send + Sync + 'static>
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// The responses of one batch; each request takes its own out by index.
pub(crate) struct Responses<Resp>(Mutex<Vec<Option<Resp>>>);

impl<Resp> Responses<Resp> {
    fn take(&self, index: usize) -> Option<Resp> {
        lock(&self.0).get_mut(index).and_then(Option::take)
    }
}

/// The shared result of one batch.
pub(crate) type Outcome<Resp, E> = Arc<Result<Responses<Resp>, BatchError<E>>>;

/// Batches requests into calls of the inner bulk service. See the [module docs](self).
///
/// `Resp` is the element type of the inner service's response vector.
pub struct Batch<S, Req, Resp>
where
    S: Service<Vec<Req>, Response = Vec<Resp>>,
{
    shared: Arc<Shared<S, Req, Resp>>,
}

impl<S, Req, Resp> Clone for Batch<S, Req, Resp>
where
    S: Service<Vec<Req>, Response = Vec<Resp>>,
{
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S, Req, Resp> std::fmt::Debug for Batch<S, Req, Resp>
where
    S: Service<Vec<Req>, Response = Vec<Resp>>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("max_batch_size", &self.shared.settings.max_batch_size)
            .field("window", &self.shared.settings.window)
            .finish_non_exhaustive()
    }
}

/// A batch of requests through `S`.
type Round<S, Req, Resp> = engine::Batch<Outcome<Resp, <S as Service<Vec<Req>>>::Error>>;

/// The batch taking requests now, and its requests.
type Collecting<S, Req, Resp> = (Arc<Round<S, Req, Resp>>, Vec<Req>);

/// A request's place in a batch, or why it has none.
type Enqueued<S, Req, Resp> =
    Result<(BatchWait<S, Req, Resp>, usize), BatchError<<S as Service<Vec<Req>>>::Error>>;

pub(crate) struct Shared<S, Req, Resp>
where
    S: Service<Vec<Req>, Response = Vec<Resp>>,
{
    service: S,
    settings: Settings,
    slots: Arc<Semaphore>,
    max_queued: usize,
    queued: Arc<AtomicUsize>,
    next_id: AtomicU64,
    /// The batch taking requests now, with its requests; each waiter knows its index.
    collecting: Mutex<Option<Collecting<S, Req, Resp>>>,
}

impl<S, Req, Resp> Batch<S, Req, Resp>
where
    S: Service<Vec<Req>, Response = Vec<Resp>>,
{
    /// Wraps `inner` with the defaults of [`BatchLayer::new`].
    pub fn new(inner: S) -> Self {
        Self::with_limits(inner, &Limits::default())
    }

    pub(crate) fn with_limits(inner: S, limits: &Limits) -> Self {
        Self {
            shared: Arc::new(Shared {
                service: inner,
                settings: limits.settings(Abandoned::Cancel),
                slots: limits.slots(),
                max_queued: limits.max_queued_batches,
                queued: Arc::new(AtomicUsize::new(0)),
                next_id: AtomicU64::new(0),
                collecting: Mutex::new(None),
            }),
        }
    }
}

impl<S, Req, Resp> Service<Req> for Batch<S, Req, Resp>
where
    S: BulkService<Req, Resp>,
    Req: Send + 'static,
    Resp: Send + 'static,
{
    type Response = Resp;
    type Error = BatchError<S::Error>;
    type Future = ResponseFuture<S, Req, Resp>;

    /// Always ready: requests are admitted (or refused as overloaded) in `call`.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        match self.enqueue(request) {
            Ok((wait, index)) => ResponseFuture::waiting(wait, index),
            Err(err) => ResponseFuture::failed(err),
        }
    }
}

/// A waiter of one of this service's batches.
pub(crate) type BatchWait<S, Req, Resp> =
    Wait<Shared<S, Req, Resp>, Outcome<Resp, <S as Service<Vec<Req>>>::Error>>;

impl<S, Req, Resp> Batch<S, Req, Resp>
where
    S: BulkService<Req, Resp>,
    Req: Send + 'static,
    Resp: Send + 'static,
{
    fn enqueue(&self, request: Req) -> Enqueued<S, Req, Resp> {
        let shared = &self.shared;
        let mut collecting = lock(&shared.collecting);
        let (batch, index, creator) = match &mut *collecting {
            Some((batch, requests)) => {
                requests.push(request);
                (Arc::clone(batch), requests.len() - 1, false)
            }
            None => {
                if shared.queued.load(Ordering::Acquire) >= shared.max_queued {
                    return Err(BatchError::Overloaded);
                }
                let batch = Arc::new(Round::<S, Req, Resp>::new(
                    shared.next_id.fetch_add(1, Ordering::Relaxed),
                ));
                *collecting = Some((Arc::clone(&batch), vec![request]));
                (batch, 0, true)
            }
        };
        let wait = Wait::new(Arc::clone(shared), Arc::clone(&batch), creator);
        let sealed = if shared.settings.seal_now(&batch, index + 1) {
            collecting.take().map(|(_, requests)| requests)
        } else {
            None
        };
        drop(collecting);
        if let Some(requests) = sealed {
            engine::seal_with(shared, &batch, requests);
        }
        Ok((wait, index))
    }
}

impl<S, Req, Resp> Owner for Shared<S, Req, Resp>
where
    S: BulkService<Req, Resp>,
    Req: Send + 'static,
    Resp: Send + 'static,
{
    type Item = Req;
    type Output = Outcome<Resp, S::Error>;

    fn take_items(&self, batch: &engine::Batch<Self::Output>) -> Option<Vec<Req>> {
        let mut collecting = lock(&self.collecting);
        match &*collecting {
            Some((current, _)) if current.id == batch.id => {
                collecting.take().map(|(_, requests)| requests)
            }
            _ => None,
        }
    }

    fn run(
        self: &Arc<Self>,
        _: &engine::Batch<Self::Output>,
        requests: Vec<Req>,
    ) -> BoxFuture<'static, Self::Output> {
        let mut service = self.service.clone();
        let slots = Arc::clone(&self.slots);
        let queued = Queued::new(&self.queued);
        Box::pin(async move {
            let _slot = slots
                .acquire_owned()
                .await
                .expect("the layer never closes its semaphore");
            drop(queued);
            let expected = requests.len();
            let call = async move {
                std::future::poll_fn(|cx| service.poll_ready(cx)).await?;
                service.call(requests).await
            };
            let outcome = match AssertUnwindSafe(call).catch_unwind().await {
                Ok(Ok(responses)) if responses.len() == expected => Ok(Responses(Mutex::new(
                    responses.into_iter().map(Some).collect(),
                ))),
                Ok(Ok(responses)) => Err(BatchError::WrongLength {
                    expected,
                    got: responses.len(),
                }),
                Ok(Err(err)) => Err(BatchError::Service(Arc::new(err))),
                Err(panic) => Err(BatchError::Panicked(panic_message(&*panic).into())),
            };
            Arc::new(outcome)
        })
    }

    fn forget(&self, batch: &Arc<engine::Batch<Self::Output>>) {
        // Sealed batches take no new waiters here, so a batch with none left stays that way.
        if batch.waiters() == 0 && !batch.finished() {
            batch.abandon(self.settings.abandoned);
        }
    }

    fn settings(&self) -> &Settings {
        &self.settings
    }
}
