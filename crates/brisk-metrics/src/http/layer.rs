use std::sync::Arc;

use tower_layer::Layer;

use super::series::Series;
use super::{HttpMetrics, RouteFn, route_template};
use crate::Error;

/// Applies [`HttpMetrics`] to a service. Clones share one set of series.
#[derive(Debug, Clone)]
pub struct HttpMetricsLayer {
    series: Arc<Series>,
}

/// Settings for [`HttpMetricsLayer`], validated by [`build`](Self::build).
#[derive(Debug, Clone)]
#[must_use]
pub struct HttpMetricsLayerBuilder {
    pub(crate) max_routes: usize,
    pub(crate) max_status_codes: usize,
    pub(crate) route: RouteFn,
}

impl HttpMetricsLayer {
    /// A layer with the defaults: up to 200 route templates and 50 status codes, route taken
    /// from the [`RouteTemplate`](super::RouteTemplate) extension.
    #[must_use]
    pub fn new() -> Self {
        Self {
            series: Arc::new(Series::new(&Self::defaults())),
        }
    }

    /// Starts from the defaults to change them.
    pub fn builder() -> HttpMetricsLayerBuilder {
        Self::defaults()
    }

    pub(crate) fn defaults() -> HttpMetricsLayerBuilder {
        HttpMetricsLayerBuilder {
            max_routes: 200,
            max_status_codes: 50,
            route: route_template,
        }
    }
}

impl Default for HttpMetricsLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpMetricsLayerBuilder {
    /// How many distinct route templates get their own series; later ones share `_overflow`.
    pub fn max_routes(mut self, max: usize) -> Self {
        self.max_routes = max;
        self
    }

    /// How many distinct status codes get their own series; later ones share `_overflow`.
    pub fn max_status_codes(mut self, max: usize) -> Self {
        self.max_status_codes = max;
        self
    }

    /// Where to find the route template among a request's extensions, for frameworks that
    /// store it in a type of their own (axum's `MatchedPath`, for example).
    pub fn route_from(mut self, route: RouteFn) -> Self {
        self.route = route;
        self
    }

    /// Checks the settings and builds the layer.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if a maximum is zero.
    pub fn build(self) -> Result<HttpMetricsLayer, Error> {
        if self.max_routes == 0 {
            return Err(Error::InvalidConfig("max_routes must be at least 1"));
        }
        if self.max_status_codes == 0 {
            return Err(Error::InvalidConfig("max_status_codes must be at least 1"));
        }
        Ok(HttpMetricsLayer {
            series: Arc::new(Series::new(&self)),
        })
    }
}

impl<S> Layer<S> for HttpMetricsLayer {
    type Service = HttpMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HttpMetrics::with_series(inner, self.series.clone())
    }
}
