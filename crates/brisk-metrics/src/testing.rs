//! Capture what code emitted inside one test, without a global recorder.
//!
//! ```
//! use brisk_metrics::{catalog::CACHE_REQUESTS, testing::Capture};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let capture = Capture::new();
//! capture
//!     .scope(async {
//!         let labels = [("cache", "users"), ("tier", "local"), ("outcome", "hit")];
//!         CACHE_REQUESTS.counter(&labels).increment(2);
//!     })
//!     .await;
//! let labels = [("cache", "users"), ("tier", "local"), ("outcome", "hit")];
//! assert_eq!(capture.counter(CACHE_REQUESTS.name, &labels), 2);
//! # }
//! ```
//!
//! [`Capture::scope`] installs the capture as the *local* recorder each time the future is
//! polled, so tests running in parallel threads never see each other's metrics. Handles created
//! inside the scope keep recording into the capture wherever they are used later, so a block
//! built inside the scope is observed even from tasks it spawns; metrics a spawned task
//! registers on its own go to that task's recorder, not the capture.

use std::future::Future;
use std::sync::atomic::Ordering;

use metrics::{
    Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString, Unit,
};
use metrics_util::registry::{AtomicStorage, Registry};

/// A private recorder for one test. See the [module docs](self).
///
/// Reading a value never resets it, so a test can assert as often as it likes.
pub struct Capture {
    registry: Registry<Key, AtomicStorage>,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture").finish_non_exhaustive()
    }
}

impl Default for Capture {
    fn default() -> Self {
        Self::new()
    }
}

impl Capture {
    /// An empty capture.
    #[must_use]
    pub fn new() -> Self {
        Self {
            registry: Registry::atomic(),
        }
    }

    /// Runs `future` with this capture as its recorder.
    pub async fn scope<F: Future>(&self, future: F) -> F::Output {
        let mut future = std::pin::pin!(future);
        std::future::poll_fn(|cx| metrics::with_local_recorder(self, || future.as_mut().poll(cx)))
            .await
    }

    /// Runs `f` with this capture as its recorder.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(self, f)
    }

    /// The value of a counter series (zero if it was never registered).
    #[must_use]
    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        find(self.registry.get_counter_handles(), name, labels)
            .map_or(0, |value| value.load(Ordering::Acquire))
    }

    /// The value of a gauge series, if it was registered.
    #[must_use]
    pub fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        find(self.registry.get_gauge_handles(), name, labels)
            .map(|value| f64::from_bits(value.load(Ordering::Acquire)))
    }

    /// Every sample recorded into a histogram series so far.
    #[must_use]
    pub fn histogram(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        find(self.registry.get_histogram_handles(), name, labels)
            .map(|bucket| bucket.data())
            .unwrap_or_default()
    }

    /// How many series named `name` exist, of any kind and with any labels.
    #[must_use]
    pub fn series_count(&self, name: &str) -> usize {
        let named = |key: &Key| key.name() == name;
        self.registry
            .get_counter_handles()
            .keys()
            .filter(|k| named(k))
            .count()
            + self
                .registry
                .get_gauge_handles()
                .keys()
                .filter(|k| named(k))
                .count()
            + self
                .registry
                .get_histogram_handles()
                .keys()
                .filter(|k| named(k))
                .count()
    }

    /// The names of every series registered so far, sorted, without repeats.
    #[must_use]
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = (self.registry.get_counter_handles().into_keys())
            .chain(self.registry.get_gauge_handles().into_keys())
            .chain(self.registry.get_histogram_handles().into_keys())
            .map(|key| key.name().to_owned())
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }
}

impl Recorder for Capture {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.registry
            .get_or_create_counter(key, |value| Counter::from_arc(value.clone()))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.registry
            .get_or_create_gauge(key, |value| Gauge::from_arc(value.clone()))
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        self.registry
            .get_or_create_histogram(key, |value| Histogram::from_arc(value.clone()))
    }
}

/// The handle whose key has `name` and exactly `labels`, in any order.
fn find<T>(
    handles: impl IntoIterator<Item = (Key, T)>,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<T> {
    let same = |key: &Key| {
        let have: Vec<&Label> = key.labels().collect();
        key.name() == name
            && have.len() == labels.len()
            && labels
                .iter()
                .all(|(k, v)| have.iter().any(|l| l.key() == *k && l.value() == *v))
    };
    handles
        .into_iter()
        .find(|(key, _)| same(key))
        .map(|(_, value)| value)
}
