use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::adaptive::{AdaptiveLimit, Aimd};
use super::{ConcurrencyLimit, Shared};
use crate::BuildError;
use crate::respond::Errors;

/// Applies a [`ConcurrencyLimit`] to a service; clones share one limit. See the
/// [module docs](super).
#[derive(Debug, Clone)]
pub struct ConcurrencyLimitLayer<R = Errors> {
    shared: Arc<Shared>,
    respond: R,
}

/// Settings of a [`ConcurrencyLimitLayer`], checked by [`build`](Self::build).
#[derive(Debug, Clone)]
#[must_use]
pub struct ConcurrencyLimitLayerBuilder {
    name: String,
    max_in_flight: usize,
    queue: usize,
    queue_timeout: Duration,
    adaptive: Option<AdaptiveLimit>,
}

impl ConcurrencyLimitLayer {
    /// Starts from the defaults: 64 in flight, a queue of 16 waiting at most 100 ms.
    pub fn builder() -> ConcurrencyLimitLayerBuilder {
        ConcurrencyLimitLayerBuilder {
            name: "default".to_owned(),
            max_in_flight: 64,
            queue: 16,
            queue_timeout: Duration::from_millis(100),
            adaptive: None,
        }
    }
}

impl<R> ConcurrencyLimitLayer<R> {
    /// How a shed request leaves the service: [`Errors`], or
    /// [`HttpResponses`](crate::HttpResponses) (a 503).
    pub fn respond<R2>(self, respond: R2) -> ConcurrencyLimitLayer<R2> {
        ConcurrencyLimitLayer {
            shared: self.shared,
            respond,
        }
    }

    /// The concurrency limit now.
    #[must_use]
    pub fn limit(&self) -> usize {
        self.shared.limit()
    }
}

impl ConcurrencyLimitLayerBuilder {
    /// Names the layer in its metrics (`layer` label; default `default`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Requests in flight at once (a fixed limit; default 64).
    pub fn max_in_flight(mut self, limit: usize) -> Self {
        self.max_in_flight = limit;
        self
    }

    /// Requests that may wait for a slot (default 16; 0 sheds at once).
    pub fn queue(mut self, len: usize) -> Self {
        self.queue = len;
        self
    }

    /// How long a request waits in the queue at most (default 100 ms; never past the deadline
    /// in scope).
    pub fn queue_timeout(mut self, timeout: Duration) -> Self {
        self.queue_timeout = timeout;
        self
    }

    /// A limit that follows latency instead of the fixed one.
    pub fn adaptive(mut self, adaptive: AdaptiveLimit) -> Self {
        self.adaptive = Some(adaptive);
        self
    }

    /// Checks the settings and builds the layer.
    ///
    /// # Errors
    /// [`BuildError::Setting`] for a limit of zero or above 1,000,000, a queue above 100,000, a
    /// zero queue timeout with a queue or one above 60 s, or bad [`AdaptiveLimit`] settings.
    pub fn build(self) -> Result<ConcurrencyLimitLayer, BuildError> {
        let (limit, aimd) = match self.adaptive {
            Some(adaptive) => {
                let initial = adaptive.validate()?;
                if adaptive.max > 1_000_000 {
                    return Err(BuildError::setting(
                        "adaptive limit",
                        format!("max {} is above 1,000,000", adaptive.max),
                    ));
                }
                (initial, Some(Aimd::new(adaptive, initial)))
            }
            None => (self.max_in_flight, None),
        };
        if limit == 0 || limit > 1_000_000 {
            return Err(BuildError::setting(
                "max_in_flight",
                format!("{limit} is outside 1 ..= 1,000,000"),
            ));
        }
        if self.queue > 100_000 {
            return Err(BuildError::setting(
                "queue",
                format!("{} is above 100,000", self.queue),
            ));
        }
        if self.queue > 0
            && (self.queue_timeout.is_zero() || self.queue_timeout > Duration::from_secs(60))
        {
            return Err(BuildError::setting(
                "queue_timeout",
                format!("{:?} is outside (0, 60 s]", self.queue_timeout),
            ));
        }
        Ok(ConcurrencyLimitLayer {
            shared: Arc::new(Shared::new(
                &self.name,
                limit,
                self.queue,
                self.queue_timeout,
                aimd,
            )),
            respond: Errors,
        })
    }
}

impl<S, R: Clone> Layer<S> for ConcurrencyLimitLayer<R> {
    type Service = ConcurrencyLimit<S, R>;

    fn layer(&self, inner: S) -> Self::Service {
        ConcurrencyLimit {
            inner,
            shared: self.shared.clone(),
            respond: self.respond.clone(),
        }
    }
}
