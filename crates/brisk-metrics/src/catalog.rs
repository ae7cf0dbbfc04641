//! Every metric brisk emits: name, kind, unit, labels and meaning, in one place.
//!
//! Crates never spell a metric name themselves; they take a row of this catalog and ask it for a
//! handle once (at build time), then use the handle on the hot path:
//!
//! ```
//! use brisk_metrics::catalog::CACHE_REQUESTS;
//!
//! // Once, when the cache is built:
//! let hits = CACHE_REQUESTS.counter(&[("cache", "users"), ("tier", "local"), ("outcome", "hit")]);
//! // Per request: an atomic add, no registry lookup.
//! hits.increment(1);
//! ```
//!
//! Names follow Prometheus conventions (base units in the name, `_total` on counters) and use the
//! OpenTelemetry semantic-convention name, mapped to Prometheus, wherever one exists
//! (`http.server.request.duration` becomes `http_server_request_duration_seconds`).
//! `docs/metrics.md` shows this catalog as a table; a test keeps the two identical.

use std::fmt::Write as _;

use metrics::{IntoLabels, Key, Unit};

use crate::{Counter, Gauge, Histogram};

/// What kind of series a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Kind {
    /// A monotonically increasing count (`_total`).
    Counter,
    /// A value that goes up and down.
    Gauge,
    /// A distribution with explicit buckets (never a summary).
    Histogram,
}

impl Kind {
    /// The Prometheus type name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
        }
    }
}

/// One row of the catalog.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MetricDef {
    /// The Prometheus name.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: Kind,
    /// The unit of the recorded values.
    pub unit: Unit,
    /// The label names every series of this metric carries, in order.
    pub labels: &'static [&'static str],
    /// What one observation means.
    pub help: &'static str,
    /// The crate that emits it.
    pub emitted_by: &'static str,
    /// The OpenTelemetry name this maps to, if a semantic convention exists.
    pub otel: Option<&'static str>,
    /// Histogram bucket upper bounds (empty for counters and gauges).
    pub buckets: &'static [f64],
}

/// Histogram buckets for durations, in seconds: 100 µs to 10 s, roughly ×2.5 apart.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Histogram buckets for sizes (items per batch): 1 to 10,000.
pub const SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1_000.0, 2_000.0, 5_000.0, 10_000.0,
];

/// Duration of HTTP server requests, by method, route template and status.
pub const HTTP_SERVER_REQUEST_DURATION: MetricDef = MetricDef {
    name: "http_server_request_duration_seconds",
    kind: Kind::Histogram,
    unit: Unit::Seconds,
    labels: &[
        "http_request_method",
        "http_route",
        "http_response_status_code",
    ],
    help: "Duration of HTTP server requests; its _count is the request counter.",
    emitted_by: "brisk-metrics (http)",
    otel: Some("http.server.request.duration"),
    buckets: SECONDS_BUCKETS,
};

/// HTTP server requests being served right now.
pub const HTTP_SERVER_ACTIVE_REQUESTS: MetricDef = MetricDef {
    name: "http_server_active_requests",
    kind: Kind::Gauge,
    unit: Unit::Count,
    labels: &["http_request_method", "http_route"],
    help: "HTTP server requests in flight.",
    emitted_by: "brisk-metrics (http)",
    otel: Some("http.server.active_requests"),
    buckets: &[],
};

/// Cache lookups by cache, tier and outcome.
pub const CACHE_REQUESTS: MetricDef = MetricDef {
    name: "brisk_cache_requests_total",
    kind: Kind::Counter,
    unit: Unit::Count,
    labels: &["cache", "tier", "outcome"],
    help: "Cache lookups per tier reached; outcome is hit, miss or error, and stale under the tier a stale value was served from.",
    emitted_by: "brisk-cache",
    otel: None,
    buckets: &[],
};

/// Loads run by a cache, by outcome.
pub const CACHE_LOADS: MetricDef = MetricDef {
    name: "brisk_cache_loads_total",
    kind: Kind::Counter,
    unit: Unit::Count,
    labels: &["cache", "outcome"],
    help: "Loader runs (one per key however many callers wait); outcome is loaded, none, error, timeout or panic.",
    emitted_by: "brisk-cache",
    otel: None,
    buckets: &[],
};

/// Loads started early, in the background, by a hit near its value's expiry.
pub const CACHE_EARLY_REFRESHES: MetricDef = MetricDef {
    name: "brisk_cache_early_refreshes_total",
    kind: Kind::Counter,
    unit: Unit::Count,
    labels: &["cache"],
    help: "Background reloads a hit started before its value expired (early refresh, XFetch).",
    emitted_by: "brisk-cache",
    otel: None,
    buckets: &[],
};

/// What loads did with the lease that keeps processes from loading one key together.
pub const CACHE_LEASES: MetricDef = MetricDef {
    name: "brisk_cache_leases_total",
    kind: Kind::Counter,
    unit: Unit::Count,
    labels: &["cache", "outcome"],
    help: "Leases of loads over Redis; outcome is acquired, waited (another process was loading the key) or fenced (an invalidation or write came first: the loaded value was not stored).",
    emitted_by: "brisk-cache",
    otel: None,
    buckets: &[],
};

/// Invalidations a cache's local tier took from other instances or from Redis.
pub const CACHE_INVALIDATIONS: MetricDef = MetricDef {
    name: "brisk_cache_invalidations_total",
    kind: Kind::Counter,
    unit: Unit::Count,
    labels: &["cache", "kind"],
    help: "Invalidations a local tier received: kind is key (one key dropped), tag (a tag or clear), or flush (the whole local tier dropped: a gap in a publisher's sequence, a lost or restored invalidation connection, or a key its type could not decode).",
    emitted_by: "brisk-cache",
    otel: None,
    buckets: &[],
};

/// Whether a cache's invalidation connection is subscribed (or tracking).
pub const CACHE_LISTENING: MetricDef = MetricDef {
    name: "brisk_cache_listening",
    kind: Kind::Gauge,
    unit: Unit::Count,
    labels: &["cache"],
    help: "1 while the cache's invalidation connection (backplane or tracking) is set up and hearing, 0 while it is not (the local tier is then bypassed).",
    emitted_by: "brisk-cache",
    otel: None,
    buckets: &[],
};

/// How long a cache's loads took.
pub const CACHE_LOAD_DURATION: MetricDef = MetricDef {
    name: "brisk_cache_load_duration_seconds",
    kind: Kind::Histogram,
    unit: Unit::Seconds,
    labels: &["cache"],
    help: "Duration of loader runs, whatever their outcome.",
    emitted_by: "brisk-cache",
    otel: None,
    buckets: SECONDS_BUCKETS,
};

/// How long a cache's remote-tier operations took.
pub const CACHE_REMOTE_DURATION: MetricDef = MetricDef {
    name: "brisk_cache_remote_duration_seconds",
    kind: Kind::Histogram,
    unit: Unit::Seconds,
    labels: &["cache", "operation"],
    help: "Duration of Redis operations (get, set, del, lease), failed ones included.",
    emitted_by: "brisk-cache",
    otel: None,
    buckets: SECONDS_BUCKETS,
};

/// The state of a cache's circuit breaker in front of Redis.
pub const CACHE_BREAKER_STATE: MetricDef = MetricDef {
    name: "brisk_cache_breaker_state",
    kind: Kind::Gauge,
    unit: Unit::Count,
    labels: &["cache"],
    help: "Circuit breaker in front of Redis: 0 closed, 1 half-open (probing), 2 open (Redis skipped).",
    emitted_by: "brisk-cache",
    otel: None,
    buckets: &[],
};

/// Values read from the remote tier that were not this cache's.
pub const CACHE_DECODE_FAILURES: MetricDef = MetricDef {
    name: "brisk_cache_decode_failures_total",
    kind: Kind::Counter,
    unit: Unit::Count,
    labels: &["cache", "reason"],
    help: "Remote values read as a miss because they did not decode; reason is foreign, version, codec, type, truncated or payload.",
    emitted_by: "brisk-cache",
    otel: None,
    buckets: &[],
};

/// Values too large for the remote tier.
pub const CACHE_OVERSIZE: MetricDef = MetricDef {
    name: "brisk_cache_oversize_total",
    kind: Kind::Counter,
    unit: Unit::Count,
    labels: &["cache"],
    help: "Values above the cache's max_value_size, kept out of the remote tier.",
    emitted_by: "brisk-cache",
    otel: None,
    buckets: &[],
};

/// Entries in a cache's local tier.
pub const CACHE_LOCAL_ENTRIES: MetricDef = MetricDef {
    name: "brisk_cache_local_entries",
    kind: Kind::Gauge,
    unit: Unit::Count,
    labels: &["cache"],
    help: "Entries held in the in-process tier.",
    emitted_by: "brisk-cache",
    otel: None,
    buckets: &[],
};

/// Keys per dispatched batch.
pub const BATCH_SIZE: MetricDef = MetricDef {
    name: "brisk_batch_size",
    kind: Kind::Histogram,
    unit: Unit::Count,
    labels: &["loader"],
    help: "Keys per dispatched batch.",
    emitted_by: "brisk-batch",
    otel: None,
    buckets: SIZE_BUCKETS,
};

/// Batches dispatched.
pub const BATCH_BATCHES: MetricDef = MetricDef {
    name: "brisk_batch_batches_total",
    kind: Kind::Counter,
    unit: Unit::Count,
    labels: &["loader"],
    help: "Batches dispatched to the batch function.",
    emitted_by: "brisk-batch",
    otel: None,
    buckets: &[],
};

/// Batches of a single key: when most batches are, the N+1 problem is back.
pub const BATCH_SINGLETONS: MetricDef = MetricDef {
    name: "brisk_batch_singleton_batches_total",
    kind: Kind::Counter,
    unit: Unit::Count,
    labels: &["loader"],
    help: "Batches of exactly one key; a high share of all batches means loads are not batched.",
    emitted_by: "brisk-batch",
    otel: None,
    buckets: &[],
};

/// Keys asked of a loader, by what became of them.
pub const BATCH_KEYS: MetricDef = MetricDef {
    name: "brisk_batch_keys_total",
    kind: Kind::Counter,
    unit: Unit::Count,
    labels: &["loader", "kind"],
    help: "Keys by kind: requested (every load), deduplicated (joined a load in flight), cached, missing (absent from the answer).",
    emitted_by: "brisk-batch",
    otel: None,
    buckets: &[],
};

/// Time from a batch's first key to its dispatch.
pub const BATCH_QUEUE_WAIT: MetricDef = MetricDef {
    name: "brisk_batch_queue_wait_seconds",
    kind: Kind::Histogram,
    unit: Unit::Seconds,
    labels: &["loader"],
    help: "Time from a batch's first key to the call of the batch function (window plus wait for a free slot).",
    emitted_by: "brisk-batch",
    otel: None,
    buckets: SECONDS_BUCKETS,
};

/// Time the batch function took.
pub const BATCH_DURATION: MetricDef = MetricDef {
    name: "brisk_batch_duration_seconds",
    kind: Kind::Histogram,
    unit: Unit::Seconds,
    labels: &["loader"],
    help: "Duration of one call of the batch function.",
    emitted_by: "brisk-batch",
    otel: None,
    buckets: SECONDS_BUCKETS,
};

/// Batches that failed.
pub const BATCH_FAILURES: MetricDef = MetricDef {
    name: "brisk_batch_failures_total",
    kind: Kind::Counter,
    unit: Unit::Count,
    labels: &["loader", "reason"],
    help: "Batches whose function returned an error (reason=error) or panicked (reason=panic).",
    emitted_by: "brisk-batch",
    otel: None,
    buckets: &[],
};

/// Time a caller waited to check out a pooled connection.
pub const POOL_WAIT_TIME: MetricDef = MetricDef {
    name: "db_client_connection_wait_time_seconds",
    kind: Kind::Histogram,
    unit: Unit::Seconds,
    labels: &["db_client_connection_pool_name"],
    help: "Time to obtain an open connection from the pool.",
    emitted_by: "brisk-pool",
    otel: Some("db.client.connection.wait_time"),
    buckets: SECONDS_BUCKETS,
};

/// Time between checking a connection out and returning it.
pub const POOL_USE_TIME: MetricDef = MetricDef {
    name: "db_client_connection_use_time_seconds",
    kind: Kind::Histogram,
    unit: Unit::Seconds,
    labels: &["db_client_connection_pool_name"],
    help: "Time between borrowing a connection and returning it to the pool.",
    emitted_by: "brisk-pool",
    otel: Some("db.client.connection.use_time"),
    buckets: SECONDS_BUCKETS,
};

/// Checkouts that gave up waiting.
pub const POOL_TIMEOUTS: MetricDef = MetricDef {
    name: "db_client_connection_timeouts_total",
    kind: Kind::Counter,
    unit: Unit::Count,
    labels: &["db_client_connection_pool_name"],
    help: "Connection requests that timed out waiting for the pool (its timeout or the caller's deadline).",
    emitted_by: "brisk-pool",
    otel: Some("db.client.connection.timeouts"),
    buckets: &[],
};

/// Open connections by state.
pub const POOL_CONNECTIONS: MetricDef = MetricDef {
    name: "db_client_connection_count",
    kind: Kind::Gauge,
    unit: Unit::Count,
    labels: &[
        "db_client_connection_pool_name",
        "db_client_connection_state",
    ],
    help: "Open connections; state is idle or used.",
    emitted_by: "brisk-pool",
    otel: Some("db.client.connection.count"),
    buckets: &[],
};

/// The most connections the pool may open.
pub const POOL_MAX: MetricDef = MetricDef {
    name: "db_client_connection_max",
    kind: Kind::Gauge,
    unit: Unit::Count,
    labels: &["db_client_connection_pool_name"],
    help: "The most open connections the pool allows.",
    emitted_by: "brisk-pool",
    otel: Some("db.client.connection.max"),
    buckets: &[],
};

/// Callers waiting for a connection.
pub const POOL_PENDING: MetricDef = MetricDef {
    name: "db_client_connection_pending_requests",
    kind: Kind::Gauge,
    unit: Unit::Count,
    labels: &["db_client_connection_pool_name"],
    help: "Callers waiting for a connection.",
    emitted_by: "brisk-pool",
    otel: Some("db.client.connection.pending_requests"),
    buckets: &[],
};

/// Checkouts that failed for another reason than time.
pub const POOL_ERRORS: MetricDef = MetricDef {
    name: "brisk_pool_checkout_errors_total",
    kind: Kind::Counter,
    unit: Unit::Count,
    labels: &["db_client_connection_pool_name", "reason"],
    help: "Checkouts that failed: reason is backend (creating or recycling a connection failed), unavailable (failed fast while backing off after connection failures) or closed.",
    emitted_by: "brisk-pool",
    otel: None,
    buckets: &[],
};

/// Checkouts by a task that already holds a connection of the same pool.
pub const POOL_NESTED: MetricDef = MetricDef {
    name: "brisk_pool_nested_checkouts_total",
    kind: Kind::Counter,
    unit: Unit::Count,
    labels: &["db_client_connection_pool_name"],
    help: "Checkouts by a task already holding a connection of the same pool: enough of them at once deadlock the pool. Counted when the task returns that first connection itself (one handed to another task is not counted).",
    emitted_by: "brisk-pool",
    otel: None,
    buckets: &[],
};

/// A pool size that fits the measured demand (Little's law).
pub const POOL_RECOMMENDED: MetricDef = MetricDef {
    name: "brisk_pool_recommended_size",
    kind: Kind::Gauge,
    unit: Unit::Count,
    labels: &["db_client_connection_pool_name"],
    help: "1.5x the average number of callers holding or waiting for a connection over the last window (Little's law: arrival rate x time each spends).",
    emitted_by: "brisk-pool",
    otel: None,
    buckets: &[],
};

/// Time to open a new connection.
pub const POOL_CREATE_TIME: MetricDef = MetricDef {
    name: "db_client_connection_create_time_seconds",
    kind: Kind::Histogram,
    unit: Unit::Seconds,
    labels: &["db_client_connection_pool_name"],
    help: "Time it took to open a new connection, failed attempts included.",
    emitted_by: "brisk-pool",
    otel: Some("db.client.connection.create_time"),
    buckets: SECONDS_BUCKETS,
};

/// Failed attempts to open a connection.
pub const POOL_CREATE_ERRORS: MetricDef = MetricDef {
    name: "brisk_pool_create_errors_total",
    kind: Kind::Counter,
    unit: Unit::Count,
    labels: &["db_client_connection_pool_name"],
    help: "Attempts to open a connection that failed.",
    emitted_by: "brisk-pool",
    otel: None,
    buckets: &[],
};

/// Every attempt to open a connection, as a `Measured` manager sees them.
pub const POOL_CONNECT_ATTEMPTS: MetricDef = MetricDef {
    name: "brisk_pool_connect_attempts_total",
    kind: Kind::Counter,
    unit: Unit::Count,
    labels: &["db_client_connection_pool_name"],
    help: "Attempts to open a connection, failed or not: while the database is down, the pool's backoff keeps their rate low.",
    emitted_by: "brisk-pool",
    otel: None,
    buckets: &[],
};

/// Redis connections found broken and reconnected.
pub const REDIS_RECONNECTS: MetricDef = MetricDef {
    name: "brisk_redis_reconnects_total",
    kind: Kind::Counter,
    unit: Unit::Count,
    labels: &["server"],
    help: "Times a multiplexed Redis connection was found broken and a reconnection began; server is the URL without credentials.",
    emitted_by: "brisk-pool",
    otel: None,
    buckets: &[],
};

/// Rate limiter decisions by limiter and decision.
pub const RATELIMIT_DECISIONS: MetricDef = MetricDef {
    name: "brisk_ratelimit_decisions_total",
    kind: Kind::Counter,
    unit: Unit::Count,
    labels: &["limiter", "decision"],
    help: "Rate limit checks; decision is allowed, rejected, shadow_rejected (over a quota, let through in shadow mode), failed_open or failed_closed (the store did not answer).",
    emitted_by: "brisk-guard",
    otel: None,
    buckets: &[],
};

/// Requests a timeout layer cut off, by which bound fired.
pub const TIMEOUTS: MetricDef = MetricDef {
    name: "brisk_timeouts_total",
    kind: Kind::Counter,
    unit: Unit::Count,
    labels: &["layer", "cause"],
    help: "Requests a timeout layer cut off; cause is timeout (the layer's own), budget (the caller's budget header) or deadline (a deadline already in scope).",
    emitted_by: "brisk-guard",
    otel: None,
    buckets: &[],
};

/// Budget headers a timeout layer read, by what it made of them.
pub const BUDGET_HEADERS: MetricDef = MetricDef {
    name: "brisk_budget_headers_total",
    kind: Kind::Counter,
    unit: Unit::Count,
    labels: &["layer", "outcome"],
    help: "Budget headers a timeout layer read; outcome is used, clamped (longer than the layer's timeout) or malformed (ignored).",
    emitted_by: "brisk-guard",
    otel: None,
    buckets: &[],
};

/// Requests a concurrency limit saw, by what became of them.
pub const SHED_REQUESTS: MetricDef = MetricDef {
    name: "brisk_shed_requests_total",
    kind: Kind::Counter,
    unit: Unit::Count,
    labels: &["layer", "outcome"],
    help: "Requests a concurrency limit saw; outcome is admitted, queued (admitted after waiting), shed (limit and queue full) or expired (left the queue when its time ran out).",
    emitted_by: "brisk-guard",
    otel: None,
    buckets: &[],
};

/// The current concurrency limit of a layer (moves when the limit is adaptive).
pub const SHED_LIMIT: MetricDef = MetricDef {
    name: "brisk_shed_limit",
    kind: Kind::Gauge,
    unit: Unit::Count,
    labels: &["layer"],
    help: "The concurrency limit of a load-shedding layer now; an adaptive limit moves with latency.",
    emitted_by: "brisk-guard",
    otel: None,
    buckets: &[],
};

/// The whole catalog, in the order of `docs/metrics.md`.
pub const CATALOG: &[MetricDef] = &[
    HTTP_SERVER_REQUEST_DURATION,
    HTTP_SERVER_ACTIVE_REQUESTS,
    CACHE_REQUESTS,
    CACHE_LOADS,
    CACHE_LOAD_DURATION,
    CACHE_REMOTE_DURATION,
    CACHE_LEASES,
    CACHE_EARLY_REFRESHES,
    CACHE_INVALIDATIONS,
    CACHE_LISTENING,
    CACHE_BREAKER_STATE,
    CACHE_DECODE_FAILURES,
    CACHE_OVERSIZE,
    CACHE_LOCAL_ENTRIES,
    BATCH_SIZE,
    BATCH_BATCHES,
    BATCH_SINGLETONS,
    BATCH_KEYS,
    BATCH_QUEUE_WAIT,
    BATCH_DURATION,
    BATCH_FAILURES,
    POOL_WAIT_TIME,
    POOL_USE_TIME,
    POOL_TIMEOUTS,
    POOL_CONNECTIONS,
    POOL_MAX,
    POOL_PENDING,
    POOL_ERRORS,
    POOL_NESTED,
    POOL_RECOMMENDED,
    POOL_CREATE_TIME,
    POOL_CREATE_ERRORS,
    POOL_CONNECT_ATTEMPTS,
    REDIS_RECONNECTS,
    RATELIMIT_DECISIONS,
    TIMEOUTS,
    BUDGET_HEADERS,
    SHED_REQUESTS,
    SHED_LIMIT,
];

impl MetricDef {
    /// A counter series of this metric, registered with the current recorder, or with the
    /// first one in place when it is used (see [`crate::handle`]).
    ///
    /// Call once and keep the handle: that is what keeps the hot path free of registry lookups.
    /// In debug builds, a wrong kind or wrong label names panic, so a mistake shows in tests.
    pub fn counter(&self, labels: impl IntoLabels) -> Counter {
        Counter::new(self.key(Kind::Counter, labels))
    }

    /// Registers a gauge series of this metric; see [`MetricDef::counter`].
    pub fn gauge(&self, labels: impl IntoLabels) -> Gauge {
        Gauge::new(self.key(Kind::Gauge, labels))
    }

    /// Registers a histogram series of this metric; see [`MetricDef::counter`].
    pub fn histogram(&self, labels: impl IntoLabels) -> Histogram {
        Histogram::new(self.key(Kind::Histogram, labels))
    }

    fn key(&self, kind: Kind, labels: impl IntoLabels) -> Key {
        let labels = labels.into_labels();
        debug_assert_eq!(self.kind, kind, "{} is a {}", self.name, self.kind.as_str());
        debug_assert!(
            labels
                .iter()
                .map(metrics::Label::key)
                .eq(self.labels.iter().copied()),
            "{} takes the labels {:?}",
            self.name,
            self.labels
        );
        Key::from_parts(self.name, labels)
    }

    /// Tells the current recorder this metric's unit and help text.
    pub fn describe(&self) {
        match self.kind {
            Kind::Counter => metrics::describe_counter!(self.name, self.unit, self.help),
            Kind::Gauge => metrics::describe_gauge!(self.name, self.unit, self.help),
            Kind::Histogram => metrics::describe_histogram!(self.name, self.unit, self.help),
        }
    }
}

/// Describes every catalog metric to the current recorder (unit and help text).
///
/// [`crate::prometheus::install`] calls this for you; call it yourself after installing any
/// other exporter.
pub fn describe_all() {
    CATALOG.iter().for_each(MetricDef::describe);
}

/// The catalog as the Markdown table that `docs/metrics.md` shows.
#[must_use]
pub fn markdown_table() -> String {
    let mut out = String::from(
        "| name | kind | unit | labels | OpenTelemetry | emitted by | meaning |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for def in CATALOG {
        let labels = def.labels.join(", ");
        let otel = def
            .otel
            .map_or_else(|| "—".to_owned(), |name| format!("`{name}`"));
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {} | {} | {} | {} |",
            def.name,
            def.kind.as_str(),
            def.unit.as_str(),
            labels,
            otel,
            def.emitted_by,
            def.help
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        for def in CATALOG {
            assert!(
                def.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{} is not snake_case",
                def.name
            );
            match def.kind {
                Kind::Counter => assert!(def.name.ends_with("_total"), "{}", def.name),
                _ => assert!(!def.name.ends_with("_total"), "{}", def.name),
            }
            if def.unit == Unit::Seconds {
                assert!(
                    def.name.ends_with("_seconds"),
                    "{} must say its unit",
                    def.name
                );
            }
            assert_eq!(
                def.kind == Kind::Histogram,
                !def.buckets.is_empty(),
                "{}",
                def.name
            );
            assert!(
                def.buckets.windows(2).all(|w| w[0] < w[1]),
                "{} buckets",
                def.name
            );
        }
    }

    #[test]
    fn names_are_unique() {
        let mut names: Vec<_> = CATALOG.iter().map(|d| d.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), CATALOG.len());
    }

    #[test]
    fn seconds_buckets_span_100us_to_10s() {
        assert_eq!(SECONDS_BUCKETS.first(), Some(&0.000_1));
        assert_eq!(SECONDS_BUCKETS.last(), Some(&10.0));
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "takes the labels")]
    fn wrong_labels_panic_in_debug_builds() {
        let _ = BATCH_SIZE.histogram(&[("pool", "x")]);
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "is a histogram")]
    fn wrong_kind_panics_in_debug_builds() {
        let _ = BATCH_SIZE.counter(&[("loader", "x")]);
    }
}
