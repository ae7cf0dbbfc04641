use std::marker::PhantomData;
use std::time::Duration;

use tower_layer::Layer;

use super::Batch;
use crate::BuildError;
use crate::engine::Limits;

/// Applies [`Batch`] to a bulk service. See the [module docs](super).
#[derive(Debug)]
pub struct BatchLayer<Req> {
    pub(super) limits: Limits,
    _request: PhantomData<fn(Req)>,
}

impl<Req> Clone for BatchLayer<Req> {
    fn clone(&self) -> Self {
        Self {
            limits: self.limits.clone(),
            _request: PhantomData,
        }
    }
}

/// Settings for [`BatchLayer`]; every setter consumes and returns the builder.
#[derive(Debug, Clone)]
#[must_use]
pub struct BatchLayerBuilder {
    limits: Limits,
}

impl<Req> BatchLayer<Req> {
    /// A layer with the defaults: batches of up to 500, a one-turn window, 10 batches at once,
    /// 1,000 queued. [`BatchLayerBuilder`] changes them.
    #[must_use]
    pub fn new() -> Self {
        BatchLayerBuilder::new()
            .build()
            .expect("the default settings are valid")
    }
}

impl<Req> Default for BatchLayer<Req> {
    fn default() -> Self {
        Self::new()
    }
}

impl Default for BatchLayerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl BatchLayerBuilder {
    /// Starts from the defaults of [`BatchLayer::new`].
    pub fn new() -> Self {
        Self {
            limits: Limits::default(),
        }
    }

    /// The most requests in one call of the inner service.
    pub fn max_batch_size(mut self, max: usize) -> Self {
        self.limits.max_batch_size = max;
        self
    }

    /// Collect requests for this long after a batch's first, instead of one scheduler turn.
    pub fn window(mut self, window: Duration) -> Self {
        self.limits.window = Some(window);
        self
    }

    /// The most calls of the inner service at once.
    pub fn max_concurrent_batches(mut self, max: usize) -> Self {
        self.limits.max_concurrent_batches = max;
        self
    }

    /// The most sealed batches waiting for a slot; past it, calls fail with `Overloaded`.
    pub fn max_queued_batches(mut self, max: usize) -> Self {
        self.limits.max_queued_batches = max;
        self
    }

    /// Checks the settings and builds the layer.
    ///
    /// # Errors
    /// [`BuildError`] if a size or limit is zero, or the window is zero.
    pub fn build<Req>(self) -> Result<BatchLayer<Req>, BuildError> {
        self.limits.validate()?;
        Ok(BatchLayer {
            limits: self.limits,
            _request: PhantomData,
        })
    }
}

impl<S, Req, Resp> Layer<S> for BatchLayer<Req>
where
    S: tower_service::Service<Vec<Req>, Response = Vec<Resp>>,
{
    type Service = Batch<S, Req, Resp>;

    fn layer(&self, inner: S) -> Self::Service {
        Batch::with_limits(inner, &self.limits)
    }
}
