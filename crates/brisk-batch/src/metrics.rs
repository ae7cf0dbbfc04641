//! A loader's metric handles, registered once when it is built.

use brisk_metrics::catalog::{
    BATCH_BATCHES, BATCH_DURATION, BATCH_FAILURES, BATCH_KEYS, BATCH_QUEUE_WAIT, BATCH_SINGLETONS,
    BATCH_SIZE,
};
use brisk_metrics::{Counter, Histogram};
use metrics::Label;

pub(crate) struct Metrics {
    pub(crate) batches: Counter,
    pub(crate) singletons: Counter,
    pub(crate) size: Histogram,
    pub(crate) requested: Counter,
    pub(crate) deduplicated: Counter,
    pub(crate) cached: Counter,
    pub(crate) missing: Counter,
    pub(crate) queue_wait: Histogram,
    pub(crate) duration: Histogram,
    pub(crate) errors: Counter,
    pub(crate) panics: Counter,
}

impl Metrics {
    pub(crate) fn new(loader: &str) -> Self {
        let name = || vec![Label::new("loader", loader.to_owned())];
        let keys = |kind: &'static str| {
            BATCH_KEYS.counter(vec![
                Label::new("loader", loader.to_owned()),
                Label::new("kind", kind),
            ])
        };
        let failures = |reason: &'static str| {
            BATCH_FAILURES.counter(vec![
                Label::new("loader", loader.to_owned()),
                Label::new("reason", reason),
            ])
        };
        Self {
            batches: BATCH_BATCHES.counter(name()),
            singletons: BATCH_SINGLETONS.counter(name()),
            size: BATCH_SIZE.histogram(name()),
            requested: keys("requested"),
            deduplicated: keys("deduplicated"),
            cached: keys("cached"),
            missing: keys("missing"),
            queue_wait: BATCH_QUEUE_WAIT.histogram(name()),
            duration: BATCH_DURATION.histogram(name()),
            errors: failures("error"),
            panics: failures("panic"),
        }
    }

    pub(crate) fn dispatched(&self, size: usize, waited: Option<std::time::Duration>) {
        self.batches.increment(1);
        if size == 1 {
            self.singletons.increment(1);
        }
        #[allow(clippy::cast_precision_loss)] // batch sizes are far below 2^52
        self.size.record(size as f64);
        if let Some(waited) = waited {
            self.queue_wait.record(waited.as_secs_f64());
        }
    }
}
