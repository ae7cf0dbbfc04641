//! A Prometheus exporter with real histograms, installed in one call.
//!
//! ```
//! let exporter = brisk_metrics::prometheus::install()?;
//! brisk_metrics::catalog::BATCH_SIZE.histogram(&[("loader", "authors")]).record(12.0);
//! let text = exporter.render(); // serve this at GET /metrics
//! assert!(text.contains("brisk_batch_size_bucket{loader=\"authors\",le=\"20\"} 1"));
//! # Ok::<(), brisk_metrics::Error>(())
//! ```
//!
//! Every histogram gets explicit buckets — [`catalog::SECONDS_BUCKETS`] (100 µs to 10 s) for
//! durations, and each catalog row's own buckets for the rest — so the output can be aggregated
//! across instances with `histogram_quantile`. The exporter never emits summaries.
//!
//! Histogram samples are folded into their buckets when [`Exporter::render`] runs, so scrape
//! regularly (every Prometheus scrape does) or call [`Exporter::run_upkeep`] from a timer.

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

use crate::Error;
use crate::catalog::{self, CATALOG};

/// Installs the Prometheus recorder as the process-wide recorder and describes the catalog.
///
/// # Errors
/// [`Error::RecorderAlreadyInstalled`] if any recorder was installed before (never a panic).
pub fn install() -> Result<Exporter, Error> {
    let handle = builder().install_recorder().map_err(|err| match err {
        BuildError::FailedToSetGlobalRecorder(_) => Error::RecorderAlreadyInstalled,
        other => Error::Prometheus(other),
    })?;
    catalog::describe_all();
    Ok(Exporter { handle })
}

/// The builder [`install`] uses, for callers who want to add global labels or install the
/// recorder another way (for example as a local recorder in tests and benchmarks).
#[must_use]
pub fn builder() -> PrometheusBuilder {
    let mut builder = PrometheusBuilder::new();
    for def in CATALOG.iter().filter(|def| !def.buckets.is_empty()) {
        builder = builder
            .set_buckets_for_metric(Matcher::Full(def.name.to_owned()), def.buckets)
            .expect("catalog buckets are non-empty, checked by the filter above");
    }
    // Histograms outside the catalog (the application's own) get the duration buckets too,
    // rather than the exporter's default of summaries.
    builder
        .set_buckets(catalog::SECONDS_BUCKETS)
        .expect("SECONDS_BUCKETS is non-empty")
}

/// A handle on the installed exporter.
#[derive(Debug, Clone)]
pub struct Exporter {
    handle: PrometheusHandle,
}

impl Exporter {
    /// Wraps a handle from [`builder`], for recorders installed by hand.
    #[must_use]
    pub fn from_handle(handle: PrometheusHandle) -> Self {
        Self { handle }
    }

    /// The Prometheus text exposition of every metric, for a `/metrics` endpoint.
    #[must_use]
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Folds pending histogram samples into their buckets without rendering.
    pub fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }
}
