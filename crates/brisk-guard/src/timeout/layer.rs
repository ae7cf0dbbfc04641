use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::{Counts, NoBudget, Timeout};
use crate::respond::Errors;

/// Applies a [`Timeout`] to a service. See the [module docs](super).
///
/// Per route under axum: `.route("/report", get(report).layer(TimeoutLayer::new(...)))`; an
/// inner (per-route) layer can shorten an outer (global) one's deadline, never extend it.
#[derive(Debug, Clone)]
pub struct TimeoutLayer<B = NoBudget, R = Errors> {
    timeout: Duration,
    budget: B,
    respond: R,
    counts: Arc<Counts>,
}

impl TimeoutLayer {
    /// Requests get at most `timeout` (a `Duration::MAX` timeout leaves only the budget and the
    /// deadline in scope).
    #[must_use]
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            budget: NoBudget,
            respond: Errors,
            counts: Arc::new(Counts::new("default")),
        }
    }
}

impl<B, R> TimeoutLayer<B, R> {
    /// Names the layer in its metrics (`layer` label; default `default`).
    #[must_use]
    pub fn name(mut self, name: &str) -> Self {
        self.counts = Arc::new(Counts::new(name));
        self
    }

    /// Reads each request's own budget (with `http`: a [`BudgetHeader`](super::BudgetHeader));
    /// one longer than the timeout is clamped to it.
    pub fn budget<B2>(self, budget: B2) -> TimeoutLayer<B2, R> {
        TimeoutLayer {
            timeout: self.timeout,
            budget,
            respond: self.respond,
            counts: self.counts,
        }
    }

    /// How a timeout leaves the service: [`Errors`], or [`HttpResponses`](crate::HttpResponses)
    /// (a 504).
    pub fn respond<R2>(self, respond: R2) -> TimeoutLayer<B, R2> {
        TimeoutLayer {
            timeout: self.timeout,
            budget: self.budget,
            respond,
            counts: self.counts,
        }
    }
}

impl<S, B: Clone, R: Clone> Layer<S> for TimeoutLayer<B, R> {
    type Service = Timeout<S, B, R>;

    fn layer(&self, inner: S) -> Self::Service {
        Timeout {
            inner,
            timeout: self.timeout,
            budget: self.budget.clone(),
            respond: self.respond.clone(),
            counts: self.counts.clone(),
        }
    }
}
