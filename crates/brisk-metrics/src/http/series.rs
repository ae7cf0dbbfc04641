//! The bounded set of series behind the layer: handles are registered once per label set and
//! every label's distinct values are capped.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::Instant;

use http::{Extensions, Method, StatusCode};
use metrics::Label;

use crate::{Gauge, Histogram};

use super::RouteFn;
use super::layer::HttpMetricsLayerBuilder;
use crate::catalog::{HTTP_SERVER_ACTIVE_REQUESTS, HTTP_SERVER_REQUEST_DURATION};

/// OpenTelemetry's known methods, then `_OTHER` for the rest.
const METHODS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "_OTHER",
];
const UNMATCHED: &str = "unmatched";
const OVERFLOW: &str = "_overflow";

/// Status keys that no real status code uses (those are 100..=999).
const STATUS_ERROR: u16 = 0;
const STATUS_OVERFLOW: u16 = 1;

fn method_index(method: &Method) -> usize {
    let known = METHODS.len() - 1;
    METHODS[..known]
        .iter()
        .position(|name| *name == method.as_str())
        .unwrap_or(known)
}

pub(crate) struct Series {
    route_fn: RouteFn,
    max_routes: usize,
    routes: RwLock<HashMap<Box<str>, Arc<RouteSeries>>>,
    unmatched: Arc<RouteSeries>,
    overflow: Arc<RouteSeries>,
}

impl std::fmt::Debug for Series {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Series")
            .field("max_routes", &self.max_routes)
            .finish_non_exhaustive()
    }
}

impl Series {
    pub(crate) fn new(config: &HttpMetricsLayerBuilder) -> Self {
        let statuses = Arc::new(StatusCap {
            max: config.max_status_codes,
            seen: Mutex::default(),
        });
        Self {
            route_fn: config.route,
            max_routes: config.max_routes,
            routes: RwLock::default(),
            unmatched: Arc::new(RouteSeries::new(UNMATCHED.to_owned(), statuses.clone())),
            overflow: Arc::new(RouteSeries::new(OVERFLOW.to_owned(), statuses)),
        }
    }

    pub(crate) fn start(&self, method: &Method, extensions: &Extensions) -> InFlight {
        let route = self.route((self.route_fn)(extensions));
        let method = method_index(method);
        route.method(method).active.increment(1.0);
        InFlight {
            route,
            method,
            start: Instant::now(),
            done: false,
        }
    }

    fn route(&self, template: Option<&str>) -> Arc<RouteSeries> {
        let Some(template) = template else {
            return self.unmatched.clone();
        };
        {
            let routes = self.routes.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(series) = routes.get(template) {
                return series.clone();
            }
            if routes.len() >= self.max_routes {
                return self.overflow.clone();
            }
        }
        let mut routes = self.routes.write().unwrap_or_else(PoisonError::into_inner);
        if routes.len() >= self.max_routes && !routes.contains_key(template) {
            return self.overflow.clone();
        }
        let statuses = self.unmatched.statuses.clone();
        routes
            .entry(template.into())
            .or_insert_with(|| Arc::new(RouteSeries::new(template.to_owned(), statuses)))
            .clone()
    }
}

/// The distinct status codes admitted so far, shared by every route of one layer.
struct StatusCap {
    max: usize,
    seen: Mutex<HashSet<u16>>,
}

impl StatusCap {
    fn key(&self, status: StatusCode) -> u16 {
        let code = status.as_u16();
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.contains(&code) || (seen.len() < self.max && seen.insert(code)) {
            code
        } else {
            STATUS_OVERFLOW
        }
    }
}

struct RouteSeries {
    route: String,
    statuses: Arc<StatusCap>,
    methods: [OnceLock<MethodSeries>; METHODS.len()],
}

impl RouteSeries {
    fn new(route: String, statuses: Arc<StatusCap>) -> Self {
        Self {
            route,
            statuses,
            methods: Default::default(),
        }
    }

    fn method(&self, index: usize) -> &MethodSeries {
        self.methods[index].get_or_init(|| MethodSeries {
            active: HTTP_SERVER_ACTIVE_REQUESTS.gauge(vec![
                Label::new("http_request_method", METHODS[index]),
                Label::new("http_route", self.route.clone()),
            ]),
            durations: RwLock::default(),
        })
    }

    fn record(&self, method: usize, status: Option<StatusCode>, seconds: f64) {
        let series = self.method(method);
        let key = status.map_or(STATUS_ERROR, |status| status.as_u16());
        {
            let durations = series
                .durations
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some((_, histogram)) = durations.iter().find(|(k, _)| *k == key) {
                histogram.record(seconds);
                return;
            }
        }
        // First time this route and method answer with this status: admit it under the cap.
        let key = status.map_or(STATUS_ERROR, |status| self.statuses.key(status));
        let mut durations = series
            .durations
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some((_, histogram)) = durations.iter().find(|(k, _)| *k == key) {
            histogram.record(seconds);
            return;
        }
        let label = match key {
            STATUS_ERROR => "error".to_owned(),
            STATUS_OVERFLOW => OVERFLOW.to_owned(),
            code => code.to_string(),
        };
        let histogram = HTTP_SERVER_REQUEST_DURATION.histogram(vec![
            Label::new("http_request_method", METHODS[method]),
            Label::new("http_route", self.route.clone()),
            Label::new("http_response_status_code", label),
        ]);
        histogram.record(seconds);
        durations.push((key, histogram));
    }
}

struct MethodSeries {
    active: Gauge,
    /// Few entries (the statuses one route answers with), so a scan beats hashing.
    durations: RwLock<Vec<(u16, Histogram)>>,
}

/// One request in flight: counted in the gauge until it finishes or is dropped.
pub(crate) struct InFlight {
    route: Arc<RouteSeries>,
    method: usize,
    start: Instant,
    done: bool,
}

impl InFlight {
    /// Records the duration under `status` (`None`: the service failed) and leaves the gauge.
    pub(crate) fn finish(&mut self, status: Option<StatusCode>) {
        if self.done {
            return;
        }
        self.done = true;
        let seconds = self.start.elapsed().as_secs_f64();
        self.route.record(self.method, status, seconds);
        self.route.method(self.method).active.decrement(1.0);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.done {
            self.route.method(self.method).active.decrement(1.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_map_to_otel_names() {
        assert_eq!(METHODS[method_index(&Method::GET)], "GET");
        assert_eq!(METHODS[method_index(&Method::PATCH)], "PATCH");
        let odd = Method::from_bytes(b"PURGE").unwrap();
        assert_eq!(METHODS[method_index(&odd)], "_OTHER");
    }
}
