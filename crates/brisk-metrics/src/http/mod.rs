//! HTTP RED metrics as a tower layer: duration, rate (the histogram's `_count`) and errors (the
//! `http_response_status_code` label), plus requests in flight.
//!
//! ```
//! use brisk_metrics::http::{HttpMetricsLayer, RouteTemplate};
//! use http::{Request, Response};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut svc = ServiceBuilder::new()
//!     .layer(HttpMetricsLayer::new())
//!     .service_fn(|_req: Request<()>| async { Ok::<_, std::convert::Infallible>(Response::new(())) });
//!
//! // The framework glue (brisk-axum, brisk-actix) puts the matched route template here.
//! let mut req = Request::get("/users/42").body(())?;
//! req.extensions_mut().insert(RouteTemplate::new("/users/{id}"));
//! svc.ready().await?.call(req).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Labels, and why they cannot explode
//!
//! Every series carries `http_request_method`, `http_route` and (on the histogram)
//! `http_response_status_code`, as in OpenTelemetry's HTTP semantic conventions:
//!
//! - **method**: the nine standard methods, and `_OTHER` for anything else.
//! - **route**: the route *template* the framework matched, taken from the request's
//!   extensions ([`RouteTemplate`] by default, or any extension through
//!   [`HttpMetricsLayerBuilder::route_from`]). A request without one is `unmatched`; the raw path
//!   is never used. At most [`HttpMetricsLayerBuilder::max_routes`] distinct templates get their
//!   own series; later ones share `_overflow`.
//! - **status**: the response's status code; at most
//!   [`HttpMetricsLayerBuilder::max_status_codes`] distinct codes, then `_overflow`. A service
//!   error (no response at all) is `error`.
//!
//! So a client sending random paths or methods cannot grow the series count.
//!
//! # What is measured
//!
//! The duration runs from `call` until the inner service's future yields the response head;
//! streaming a body afterwards is not included. A request whose future is dropped before it
//! completes (a client that went away) leaves the in-flight gauge and records no duration.
//!
//! Handles are registered once per series, so the per-request cost is a read-locked map lookup,
//! two clock reads and two atomic updates.

mod future;
mod layer;
mod series;

use std::borrow::Cow;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

pub use self::future::ResponseFuture;
pub use self::layer::{HttpMetricsLayer, HttpMetricsLayerBuilder};
use self::series::Series;

/// How the layer finds a request's route template among its extensions.
pub type RouteFn = for<'a> fn(&'a http::Extensions) -> Option<&'a str>;

/// The matched route template of a request (`/users/{id}`), as a request extension.
///
/// Framework glue inserts it after routing; [`HttpMetricsLayer`] reads it. Insert one yourself
/// when you route by hand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteTemplate(Cow<'static, str>);

impl RouteTemplate {
    /// A route template.
    pub fn new(template: impl Into<Cow<'static, str>>) -> Self {
        Self(template.into())
    }

    /// The template as text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

pub(crate) fn route_template(extensions: &http::Extensions) -> Option<&str> {
    extensions.get::<RouteTemplate>().map(RouteTemplate::as_str)
}

/// Records RED metrics for every request to the inner service. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct HttpMetrics<S> {
    inner: S,
    series: Arc<Series>,
}

impl<S> HttpMetrics<S> {
    /// Wraps `inner` with the default settings of [`HttpMetricsLayer::new`].
    pub fn new(inner: S) -> Self {
        Self::with_series(inner, Arc::new(Series::new(&HttpMetricsLayer::defaults())))
    }

    pub(crate) fn with_series(inner: S, series: Arc<Series>) -> Self {
        Self { inner, series }
    }

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
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for HttpMetrics<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let in_flight = self.series.start(req.method(), req.extensions());
        ResponseFuture::new(self.inner.call(req), in_flight)
    }
}
