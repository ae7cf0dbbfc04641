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
//! of that batch with [`LoadError::WrongLength`]. Requests are admitted in `call` (`poll_ready`
//! is always ready) and batches beyond `max_queued_batches` fail with
//! [`LoadError::Overloaded`]. Each batch runs on its own task, so a batch completes whether or
//! not the future of its first request is ever polled, and the inner service runs under no
//! caller's deadline; each caller still stops waiting at its own. The service is `Clone` over shared state: clones feed the same
//! batches. Each batch calls a clone of the inner service, so the inner service must be
//! `Clone` (wrap it in `tower::buffer::Buffer` if it is not).

mod future;
#[allow(clippy::module_inception)] // tower's layout: a middleware's layer lives in layer.rs
mod layer;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tower_service::Service;

pub use self::future::ResponseFuture;
pub use self::layer::{BatchLayer, BatchLayerBuilder};
use crate::LoadError;
use crate::engine::{self, Abandoned, Engine, Limits, OwnedBatch, Owner, Wait, lock};

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
            .field("max_batch_size", &self.shared.engine.max_batch_size)
            .field("window", &self.shared.engine.window)
            .finish_non_exhaustive()
    }
}

/// A batch of requests through `S`.
type Round<S, Req, Resp> = OwnedBatch<Shared<S, Req, Resp>>;

pub(crate) struct Shared<S, Req, Resp>
where
    S: Service<Vec<Req>, Response = Vec<Resp>>,
{
    service: S,
    engine: Engine,
    /// The batch taking requests now, with its requests; each waiter knows its index.
    #[allow(clippy::type_complexity)]
    collecting: Mutex<
        Option<(
            Arc<engine::Batch<Req, engine::Outcome<Responses<Resp>, S::Error>>>,
            Vec<Req>,
        )>,
    >,
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
                engine: limits.engine(Abandoned::Cancel),
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
    type Error = LoadError<S::Error>;
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
pub(crate) type BatchWait<S, Req, Resp> = Wait<Shared<S, Req, Resp>>;

impl<S, Req, Resp> Batch<S, Req, Resp>
where
    S: BulkService<Req, Resp>,
    Req: Send + 'static,
    Resp: Send + 'static,
{
    /// Adds `request` to the collecting batch (starting one). No user code runs here.
    #[allow(clippy::type_complexity)]
    fn enqueue(
        &self,
        request: Req,
    ) -> Result<(BatchWait<S, Req, Resp>, usize), LoadError<S::Error>> {
        let shared = &self.shared;
        let mut collecting = lock(&shared.collecting);
        let mut started = None;
        let (batch, index) = match &mut *collecting {
            Some((batch, requests)) => {
                requests.push(request);
                (Arc::clone(batch), requests.len() - 1)
            }
            None => {
                let (batch, starter) = engine::create(&**shared)?;
                *collecting = Some((Arc::clone(&batch), vec![request]));
                started = Some(starter);
                (batch, 0)
            }
        };
        batch.serves(engine::requester().as_ref());
        let wait = Wait::new(shared, &batch);
        if shared.engine.seal_now(&batch, index + 1)
            && let Some((_, requests)) = collecting.take()
        {
            batch.seal(requests);
        }
        drop(collecting);
        if let Some(starter) = started {
            starter.start(shared, &batch);
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
    type Done = Responses<Resp>;
    type Error = S::Error;

    fn engine(&self) -> &Engine {
        &self.engine
    }

    fn detach(&self, batch: &Round<S, Req, Resp>) -> Option<Vec<Req>> {
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
        _: &Arc<Round<S, Req, Resp>>,
        requests: Vec<Req>,
    ) -> impl Future<Output = Result<Responses<Resp>, LoadError<S::Error>>> + Send + 'static {
        let mut service = self.service.clone();
        async move {
            let expected = requests.len();
            std::future::poll_fn(|cx| service.poll_ready(cx))
                .await
                .map_err(|err| LoadError::Batch(Arc::new(err)))?;
            let responses = service
                .call(requests)
                .await
                .map_err(|err| LoadError::Batch(Arc::new(err)))?;
            if responses.len() != expected {
                return Err(LoadError::WrongLength {
                    expected,
                    got: responses.len(),
                });
            }
            Ok(Responses(Mutex::new(
                responses.into_iter().map(Some).collect(),
            )))
        }
    }

    fn forget(&self, batch: &Arc<Round<S, Req, Resp>>) {
        let mut collecting = lock(&self.collecting);
        if batch.waiters() > 0 {
            return;
        }
        batch.give_up();
        if let Some((current, _)) = &*collecting
            && current.id == batch.id
            && let Some((_, requests)) = collecting.take()
        {
            batch.seal(requests);
        }
        drop(collecting);
        batch.cancel();
    }

    fn unrun(&self, _: &Round<S, Req, Resp>, requests: Vec<Req>) {
        drop(requests);
    }
}
