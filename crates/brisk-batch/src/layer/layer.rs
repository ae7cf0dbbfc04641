use std::marker::PhantomData;
use std::time::Duration;

use tower_layer::Layer;

use super::Batch;
use crate::BuildError;
use crate::engine::{Abandoned, Settings};

/// Applies [`Batch`] to a bulk service. See the [module docs](super).
#[derive(Debug)]
pub struct BatchLayer<Req> {
    pub(super) settings: Settings,
    pub(super) max_concurrent_batches: usize,
    pub(super) max_queued_batches: usize,
    _request: PhantomData<fn(Req)>,
}

impl<Req> Clone for BatchLayer<Req> {
    fn clone(&self) -> Self {
        Self {
            settings: self.settings.clone(),
            max_concurrent_batches: self.max_concurrent_batches,
            max_queued_batches: self.max_queued_batches,
            _request: PhantomData,
        }
    }
}

/// Settings for [`BatchLayer`]; every setter consumes and returns the builder.
#[derive(Debug, Clone)]
#[must_use]
pub struct BatchLayerBuilder {
    max_batch_size: usize,
    window: Option<Duration>,
    max_concurrent_batches: usize,
    max_queued_batches: usize,
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
            max_batch_size: 500,
            window: None,
            max_concurrent_batches: 10,
            max_queued_batches: 1_000,
        }
    }

    /// The most requests in one call of the inner service.
    pub fn max_batch_size(mut self, max: usize) -> Self {
        self.max_batch_size = max;
        self
    }

    /// Collect requests for this long after a batch's first, instead of one scheduler turn.
    pub fn window(mut self, window: Duration) -> Self {
        self.window = Some(window);
        self
    }

    /// The most calls of the inner service at once.
    pub fn max_concurrent_batches(mut self, max: usize) -> Self {
        self.max_concurrent_batches = max;
        self
    }

    /// The most sealed batches waiting for a slot; past it, calls fail with `Overloaded`.
    pub fn max_queued_batches(mut self, max: usize) -> Self {
        self.max_queued_batches = max;
        self
    }

    /// Checks the settings and builds the layer.
    ///
    /// # Errors
    /// [`BuildError`] if a size or limit is zero, or the window is zero.
    pub fn build<Req>(self) -> Result<BatchLayer<Req>, BuildError> {
        for (value, why) in [
            (self.max_batch_size, "max_batch_size must be at least 1"),
            (
                self.max_concurrent_batches,
                "max_concurrent_batches must be at least 1",
            ),
            (
                self.max_queued_batches,
                "max_queued_batches must be at least 1",
            ),
        ] {
            if value == 0 {
                return Err(BuildError(why));
            }
        }
        if self.window.is_some_and(|w| w.is_zero()) {
            return Err(BuildError(
                "window must be positive; leave it unset to batch per scheduler turn",
            ));
        }
        Ok(BatchLayer {
            settings: Settings {
                max_batch_size: self.max_batch_size,
                window: self.window,
                abandoned: Abandoned::Cancel,
            },
            max_concurrent_batches: self.max_concurrent_batches,
            max_queued_batches: self.max_queued_batches,
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
        Batch::with_settings(
            inner,
            self.settings.clone(),
            self.max_concurrent_batches,
            self.max_queued_batches,
        )
    }
}
