//! The handles of catalog series: `metrics` handles that also work when the recorder is
//! installed after they were made.
//!
//! A `metrics::Counter` is bound to whatever recorder was in place when it was registered: made
//! before the application installs its exporter, it records into the no-op recorder, silently
//! and forever. Blocks register their handles when they are built (a loader, a pool), and an
//! application may well build them first. So a brisk handle registers at once if a recorder is
//! in place, and otherwise on its first use after one is: the hot path stays one atomic load
//! plus the `metrics` handle's own cost.
//!
//! ```
//! use brisk_metrics::catalog::CACHE_REQUESTS;
//! use brisk_metrics::testing::Capture;
//!
//! let labels = [("cache", "users"), ("tier", "local"), ("outcome", "hit")];
//! let hits = CACHE_REQUESTS.counter(&labels); // no recorder yet
//! hits.increment(1); // nothing to record into: dropped
//! let capture = Capture::new();
//! capture.run(|| hits.increment(2)); // the first use with a recorder registers the series
//! assert_eq!(capture.counter(CACHE_REQUESTS.name, &labels), 2);
//! ```
//!
//! The no-op recorder is told apart by its size (it is the only zero-sized recorder the
//! `metrics` crate has); a zero-sized recorder of your own would be asked to register the
//! series on every use — correct, only slower. A clone made before registration registers on
//! its own first use.

use std::fmt;
use std::sync::OnceLock;

use metrics::{Key, Level, Metadata, Recorder};

/// A series registered lazily; see the [module docs](self).
#[derive(Clone)]
struct Late<H> {
    key: Key,
    handle: OnceLock<H>,
    register: fn(&dyn Recorder, &Key, &Metadata<'_>) -> H,
}

impl<H> Late<H> {
    fn new(key: Key, register: fn(&dyn Recorder, &Key, &Metadata<'_>) -> H) -> Self {
        let late = Self {
            key,
            handle: OnceLock::new(),
            register,
        };
        late.resolve(|_| {});
        late
    }

    #[inline]
    fn with(&self, use_it: impl FnOnce(&H)) {
        match self.handle.get() {
            Some(handle) => use_it(handle),
            None => self.resolve(use_it),
        }
    }

    /// Whether there is a recorder to record into (registering with it if needed).
    #[inline]
    fn enabled(&self) -> bool {
        self.handle.get().is_some() || {
            self.resolve(|_| {});
            self.handle.get().is_some()
        }
    }

    #[cold]
    fn resolve(&self, use_it: impl FnOnce(&H)) {
        metrics::with_recorder(|recorder| {
            if size_of_val(recorder) == 0 {
                return; // the no-op recorder: keep waiting for a real one
            }
            let metadata = Metadata::new(module_path!(), Level::INFO, Some(module_path!()));
            let handle = self
                .handle
                .get_or_init(|| (self.register)(recorder, &self.key, &metadata));
            use_it(handle);
        });
    }

    fn fmt(&self, kind: &str, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct(kind)
            .field("key", &self.key)
            .field("registered", &self.handle.get().is_some())
            .finish()
    }
}

/// A counter series of the catalog.
#[derive(Clone)]
pub struct Counter(Late<metrics::Counter>);

impl Counter {
    pub(crate) fn new(key: Key) -> Self {
        Self(Late::new(key, |recorder, key, metadata| {
            recorder.register_counter(key, metadata)
        }))
    }

    /// Adds `value`.
    #[inline]
    pub fn increment(&self, value: u64) {
        self.0.with(|counter| counter.increment(value));
    }

    /// Sets the counter to `value` if that is higher.
    #[inline]
    pub fn absolute(&self, value: u64) {
        self.0.with(|counter| counter.absolute(value));
    }
}

/// A gauge series of the catalog.
#[derive(Clone)]
pub struct Gauge(Late<metrics::Gauge>);

impl Gauge {
    pub(crate) fn new(key: Key) -> Self {
        Self(Late::new(key, |recorder, key, metadata| {
            recorder.register_gauge(key, metadata)
        }))
    }

    /// Sets the gauge.
    #[inline]
    pub fn set(&self, value: f64) {
        self.0.with(|gauge| gauge.set(value));
    }

    /// Adds `value`.
    #[inline]
    pub fn increment(&self, value: f64) {
        self.0.with(|gauge| gauge.increment(value));
    }

    /// Subtracts `value`.
    #[inline]
    pub fn decrement(&self, value: f64) {
        self.0.with(|gauge| gauge.decrement(value));
    }
}

/// A histogram series of the catalog.
#[derive(Clone)]
pub struct Histogram(Late<metrics::Histogram>);

impl Histogram {
    pub(crate) fn new(key: Key) -> Self {
        Self(Late::new(key, |recorder, key, metadata| {
            recorder.register_histogram(key, metadata)
        }))
    }

    /// Records one observation.
    #[inline]
    pub fn record(&self, value: f64) {
        self.0.with(|histogram| histogram.record(value));
    }

    /// False while no recorder is installed: an observation that costs something to make (a
    /// clock read) can be skipped then. True from the first call that finds a recorder.
    #[inline]
    #[must_use]
    pub fn is_enabled(&self) -> bool {
        self.0.enabled()
    }
}

impl fmt::Debug for Counter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt("Counter", f)
    }
}

impl fmt::Debug for Gauge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt("Gauge", f)
    }
}

impl fmt::Debug for Histogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt("Histogram", f)
    }
}
