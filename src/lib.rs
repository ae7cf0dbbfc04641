//! brisk: backend performance building blocks for tokio and tower services.
//!
//! This umbrella crate re-exports the blocks behind features, so one dependency brings what a
//! service needs:
//!
//! | feature | default | what it brings |
//! |---|---|---|
//! | — | yes | [`deadline`]: the request's time budget, carried by the task (`brisk-core`) |
//! | `metrics` | yes | [`metrics`]: the metric catalog and its handles (`brisk-metrics`) |
//! | `http` | no | [`metrics::http`]: the tower HTTP RED metrics layer |
//! | `prometheus` | no | [`metrics::prometheus`]: one-call Prometheus exporter with real histograms |
//! | `batch` | no | [`batch`]: the batching engine and DataLoader (`brisk-batch`) |
//! | `pool` | no | [`pool`]: instrumented, bounded pooling over deadpool and bb8 (`brisk-pool`) |
//! | `redis` | no | [`pool::redis_source`]: the Redis connection sources |
//! | `tls` | no | `rediss://` for the Redis sources (rustls with ring) |
//! | `cache` | no | [`cache`]: the two-tier cache over Redis or memory (`brisk-cache`); brings `redis` |
//! | `cache-postcard` | no | the cache's `Codec::Postcard` |
//! | `cache-lz4` | no | LZ4 compression of large cached values |
//! | `guard` | no | [`guard`]: timeout with deadline propagation, rate limiting, load shedding (`brisk-guard`); with `http`, refusals as responses; with `redis`, limits shared through Redis |
//! | `serde` | no | configuration types (the pool `Lifecycle`) through serde |
//! | `full` | no | everything above |
//!
//! Blocks still to come (Axum and Actix glue) join this table as they land; the README lists
//! their status.
//!
//! ```
//! use std::time::Duration;
//! use brisk::prelude::*;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let budget = tokio::time::Instant::now() + Duration::from_millis(100);
//! let left = deadline::scope(budget, async { deadline::remaining() }).await;
//! assert!(left.unwrap() <= Duration::from_millis(100));
//! # }
//! ```
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

#[cfg(feature = "batch")]
pub use brisk_batch as batch;
#[cfg(feature = "cache")]
pub use brisk_cache as cache;
pub use brisk_core::deadline;
#[cfg(feature = "guard")]
pub use brisk_guard as guard;
#[cfg(feature = "metrics")]
pub use brisk_metrics as metrics;
#[cfg(any(feature = "pool", feature = "redis"))]
pub use brisk_pool as pool;

/// The names most services use, in one import.
pub mod prelude {
    #[cfg(feature = "batch")]
    pub use crate::batch::{BatchFn, LoadError, Loader};
    #[cfg(feature = "cache")]
    pub use crate::cache::{Cache, LocalTier};
    pub use crate::deadline;
    #[cfg(feature = "guard")]
    pub use crate::guard::ratelimit::{Quota, RateLimitLayer, RateLimiter};
    #[cfg(feature = "guard")]
    pub use crate::guard::timeout::TimeoutLayer;
    #[cfg(feature = "http")]
    pub use crate::metrics::http::{HttpMetricsLayer, RouteTemplate};
    #[cfg(feature = "pool")]
    pub use crate::pool::Instrumented;
    #[cfg(feature = "redis")]
    pub use crate::pool::redis_source::{Multiplexed, RedisSource};
}

/// The README's quickstart, compiled and run as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// The batching guide's example, compiled and run as a doc test.
#[cfg(all(doctest, feature = "batch"))]
#[doc = include_str!("../docs/batching.md")]
pub struct BatchingGuideDoctests;

/// The metrics guide's examples, compiled and run as doc tests.
#[cfg(all(doctest, feature = "http", feature = "prometheus"))]
#[doc = include_str!("../docs/metrics.md")]
pub struct MetricsGuideDoctests;

/// The guard guide's examples, compiled and run as doc tests as a user of `brisk` writes them.
#[cfg(all(doctest, feature = "guard", feature = "http", feature = "redis"))]
#[doc = include_str!("../docs/guard.md")]
pub struct GuardGuideDoctests;

/// The caching guide's examples, compiled and run as doc tests as a user of `brisk` writes them.
#[cfg(all(doctest, feature = "cache", feature = "batch"))]
#[doc = include_str!("../docs/caching.md")]
pub struct CachingGuideDoctests;

/// The pooling guide's examples, compiled as doc tests as a user of `brisk` writes them.
#[cfg(all(doctest, feature = "pool", feature = "tls"))]
#[doc = include_str!("../docs/pooling.md")]
pub struct PoolingGuideDoctests;
