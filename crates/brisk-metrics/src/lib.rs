//! The brisk metrics facade: one catalog of metric names, handles for the hot path, a
//! Prometheus installer and an HTTP RED layer.
//!
//! brisk is a library, so it only *emits* through the [`metrics`] crate and never installs a
//! recorder: your executable picks the exporter. With the `prometheus` feature that is one call:
//!
//! ```
//! # #[cfg(feature = "prometheus")] {
//! let exporter = brisk_metrics::prometheus::install().expect("no other recorder installed");
//! brisk_metrics::catalog::CACHE_REQUESTS
//!     .counter(&[("cache", "users"), ("tier", "local"), ("outcome", "hit")])
//!     .increment(1);
//! assert!(exporter.render().contains("brisk_cache_requests_total"));
//! # }
//! ```
//!
//! | feature | what it adds |
//! |---|---|
//! | `http` | [`http::HttpMetricsLayer`]: request duration histogram and in-flight gauge per method, route template and status, with capped label values |
//! | `prometheus` | [`prometheus::install`]: a Prometheus exporter with real histograms (never summaries) |
//! | `testing` | [`testing::Capture`]: what a future emitted, without a global recorder |
//!
//! Every metric name lives in [`catalog`]; `docs/metrics.md` lists them.
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

pub mod catalog;
mod error;
pub mod handle;
#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "prometheus")]
pub mod prometheus;
#[cfg(feature = "testing")]
pub mod testing;

pub use error::Error;
pub use handle::{Counter, Gauge, Histogram};
